//! curl as the HTTP client of the end-to-end tests.

use std::process::Command;

/// A response as curl saw it; status 0 when the exchange failed.
#[derive(Debug)]
pub struct Reply {
    /// The final status (after interim responses).
    pub status: u16,
    /// The status line and header fields.
    pub head: String,
    /// The body.
    pub body: String,
}

impl Reply {
    /// The first value of header field `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// `curl -s -i --max-time 10 EXTRA... URL`.
pub fn curl(url: &str, extra: &[&str]) -> Reply {
    let out = Command::new("curl")
        .args(["-s", "-i", "--max-time", "10"])
        .args(extra)
        .arg(url)
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut rest = text.as_str();
    // Skip interim responses (100 Continue).
    while rest.starts_with("HTTP/1.1 1") {
        rest = rest.split_once("\r\n\r\n").map_or("", |(_, r)| r);
    }
    let (head, body) = rest.split_once("\r\n\r\n").unwrap_or((rest, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Reply {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}
