//! Request path normalization: the one place where a request target becomes
//! the path that policies match *and* the proxy forwards, so the application
//! and the policy can never disagree about which resource was asked for.
//!
//! The rules, in order (RFC 3986 §6.2.2 plus the bypasses listed in
//! `SPECS.md`): the target must be origin-form; `#` is refused; every
//! percent-escape must be well formed; escapes of unreserved characters are
//! decoded and the hex of the others upper-cased; `%2F`, `%5C` and `\` are
//! refused or decoded as configured; `%00` and control characters are
//! refused; escaped bytes above 0x7F must form valid UTF-8; dot segments are
//! resolved (a `..` above the root is refused); runs of `/` are merged; `;`
//! is refused unless configured as a literal character. The query is kept as
//! sent. Matching stays case-sensitive, like the applications behind us.

use std::borrow::Cow;

/// How to treat an encoded slash (`%2F`) in a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EscapedSlash {
    /// Refuse the request (the default: `%2F` is how `/data/..%2fadmin` works).
    #[default]
    Reject,
    /// Decode it into a real `/`, which then takes part in `..` resolution and
    /// slash merging.
    Decode,
}

/// How to treat a backslash, raw (`\`) or encoded (`%5C`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backslash {
    /// Refuse the request (the default).
    #[default]
    Reject,
    /// Turn it into `/`, as browsers and some servers do.
    DecodeToSlash,
}

/// How to treat `;` (path parameters, as in `/data;jsessionid=1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Semicolon {
    /// Refuse the request (the default): some servers strip `;...` from a
    /// segment, so `/admin;x` would reach `/admin` while not matching it.
    #[default]
    Reject,
    /// Keep `;` as an ordinary character. Only safe when the application
    /// behind the proxy does not interpret path parameters.
    KeepLiteral,
}

/// Options for [`normalize_path`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NormalizeOptions {
    /// What `%2F` does.
    pub escaped_slash: EscapedSlash,
    /// What `\` and `%5C` do.
    pub backslash: Backslash,
    /// What `;` does.
    pub semicolon: Semicolon,
}

/// Why a request target could not be normalized. The client is at fault;
/// the proxy answers 400 (see [`PathError::http_status`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Empty request target.
    #[error("request target is empty")]
    Empty,
    /// Not origin-form (absolute-form `http://h/p`, authority-form, `*`).
    #[error("request target is not origin-form (must start with '/')")]
    NotOriginForm,
    /// A `#` fragment was sent; clients must never send one.
    #[error("request target contains a fragment ('#')")]
    Fragment,
    /// `%` not followed by two hex digits.
    #[error("malformed percent-escape at byte {0}")]
    BadEscape(usize),
    /// `%00`.
    #[error("path contains an encoded NUL byte")]
    Nul,
    /// A raw control character, space, or non-ASCII byte in the path.
    #[error("path contains a byte that must be percent-encoded at byte {0}")]
    BadByte(usize),
    /// `%2F` while configured to reject it.
    #[error("path contains an encoded slash (%2F)")]
    EscapedSlash,
    /// `\` or `%5C` while configured to reject it.
    #[error("path contains a backslash")]
    Backslash,
    /// `;` while configured to reject it.
    #[error("path contains ';' (path parameters)")]
    Semicolon,
    /// Escaped bytes above 0x7F that are not valid UTF-8 (e.g. the overlong
    /// `%C0%AE`).
    #[error("path contains percent-escapes that are not valid UTF-8")]
    InvalidUtf8,
    /// A `..` segment would climb above the root.
    #[error("path climbs above the root with '..'")]
    AboveRoot,
}

impl PathError {
    /// The status the proxy answers with: always 400 Bad Request.
    pub fn http_status(self) -> http::StatusCode {
        http::StatusCode::BAD_REQUEST
    }

    /// A short, fixed label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            PathError::Empty => "empty",
            PathError::NotOriginForm => "not_origin_form",
            PathError::Fragment => "fragment",
            PathError::BadEscape(_) => "bad_escape",
            PathError::Nul => "nul",
            PathError::BadByte(_) => "bad_byte",
            PathError::EscapedSlash => "escaped_slash",
            PathError::Backslash => "backslash",
            PathError::Semicolon => "semicolon",
            PathError::InvalidUtf8 => "invalid_utf8",
            PathError::AboveRoot => "above_root",
        }
    }
}

/// A normalized request target: the path policies match and the proxy
/// forwards, and the query exactly as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalizedPath<'a> {
    /// The normalized path; borrowed when the input was already normal.
    pub path: Cow<'a, str>,
    /// The query without its `?`, `None` when there was no `?`.
    pub query: Option<&'a str>,
}

impl NormalizedPath<'_> {
    /// The request target to forward: normalized path plus the original query.
    pub fn path_and_query(&self) -> Cow<'_, str> {
        match self.query {
            None => Cow::Borrowed(&*self.path),
            Some(q) => Cow::Owned(format!("{}?{q}", self.path)),
        }
    }

    /// Whether normalization changed the path.
    pub fn is_rewritten(&self) -> bool {
        matches!(self.path, Cow::Owned(_))
    }
}

/// Normalizes an origin-form request target (`/path?query`).
///
/// Does not allocate when the path is already normal (the common case).
pub fn normalize_path<'a>(
    raw_path_and_query: &'a str,
    opts: &NormalizeOptions,
) -> Result<NormalizedPath<'a>, PathError> {
    if raw_path_and_query.is_empty() {
        return Err(PathError::Empty);
    }
    if !raw_path_and_query.starts_with('/') {
        return Err(PathError::NotOriginForm);
    }
    if raw_path_and_query.contains('#') {
        return Err(PathError::Fragment);
    }
    let (path, query) = match raw_path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (raw_path_and_query, None),
    };
    for (i, b) in query.unwrap_or("").bytes().enumerate() {
        if !(0x21..0x7f).contains(&b) {
            return Err(PathError::BadByte(path.len() + 1 + i));
        }
    }
    if is_already_normal(path)? {
        return Ok(NormalizedPath {
            path: Cow::Borrowed(path),
            query,
        });
    }
    let decoded = decode(path, opts)?;
    let path = resolve(&decoded)?;
    Ok(NormalizedPath {
        path: Cow::Owned(path),
        query,
    })
}

/// Fast scan: `Ok(true)` when nothing needs rewriting. Refuses bytes that are
/// never valid in a path so the slow path need not re-check them.
fn is_already_normal(path: &str) -> Result<bool, PathError> {
    let bytes = path.as_bytes();
    let mut normal = true;
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            0x00..=0x20 | 0x7f..=0xff => return Err(PathError::BadByte(i)),
            b'%' | b'\\' | b';' => normal = false,
            b'/' => {
                let rest = &bytes[i + 1..];
                if rest.starts_with(b"/")
                    || rest == b"."
                    || rest == b".."
                    || rest.starts_with(b"./")
                    || rest.starts_with(b"../")
                {
                    normal = false;
                }
            }
            _ => {}
        }
    }
    Ok(normal)
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

/// Decodes escapes of unreserved characters (and `%2F`/`%5C` when configured),
/// upper-cases the others, and applies the `\` and `;` choices.
fn decode(path: &str, opts: &NormalizeOptions) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    // Escaped bytes above 0x7F, to check that they form valid UTF-8.
    let mut high: Vec<u8> = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b != b'%' {
            flush_high(&mut high)?;
        }
        match b {
            b'%' => {
                let (h, l) = match (bytes.get(i + 1), bytes.get(i + 2)) {
                    (Some(&h), Some(&l)) => (h, l),
                    _ => return Err(PathError::BadEscape(i)),
                };
                let v = match (hex_val(h), hex_val(l)) {
                    (Some(h), Some(l)) => h * 16 + l,
                    _ => return Err(PathError::BadEscape(i)),
                };
                if v < 0x80 {
                    flush_high(&mut high)?;
                }
                match v {
                    0 => return Err(PathError::Nul),
                    b'/' => match opts.escaped_slash {
                        EscapedSlash::Reject => return Err(PathError::EscapedSlash),
                        EscapedSlash::Decode => out.push('/'),
                    },
                    b'\\' => match opts.backslash {
                        Backslash::Reject => return Err(PathError::Backslash),
                        Backslash::DecodeToSlash => out.push('/'),
                    },
                    v if is_unreserved(v) => out.push(char::from(v)),
                    v => {
                        if v >= 0x80 {
                            high.push(v);
                        }
                        out.push('%');
                        out.push(char::from(HEX_UPPER[usize::from(v >> 4)]));
                        out.push(char::from(HEX_UPPER[usize::from(v & 0xf)]));
                    }
                }
                i += 3;
                continue;
            }
            b'\\' => match opts.backslash {
                Backslash::Reject => return Err(PathError::Backslash),
                Backslash::DecodeToSlash => out.push('/'),
            },
            b';' => match opts.semicolon {
                Semicolon::Reject => return Err(PathError::Semicolon),
                Semicolon::KeepLiteral => out.push(';'),
            },
            // is_already_normal refused every non-ASCII and control byte.
            b => out.push(char::from(b)),
        }
        i += 1;
    }
    flush_high(&mut high)?;
    Ok(out)
}

fn flush_high(high: &mut Vec<u8>) -> Result<(), PathError> {
    if high.is_empty() {
        return Ok(());
    }
    let ok = std::str::from_utf8(high).is_ok();
    high.clear();
    if ok {
        Ok(())
    } else {
        Err(PathError::InvalidUtf8)
    }
}

/// Resolves dot segments and merges slashes in an already decoded path.
fn resolve(decoded: &str) -> Result<String, PathError> {
    let mut segments: Vec<&str> = Vec::new();
    let trailing = decoded.ends_with('/');
    let mut last_was_dir = trailing;
    for seg in decoded.split('/') {
        match seg {
            "" => {}
            "." => last_was_dir = true,
            ".." => {
                if segments.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
                last_was_dir = true;
            }
            s => {
                segments.push(s);
                last_was_dir = false;
            }
        }
    }
    // "/a/b/.." names the directory "/a/", as in RFC 3986 §5.2.4.
    if trailing {
        last_was_dir = true;
    }
    let mut out = String::with_capacity(decoded.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || (last_was_dir && !segments.is_empty()) {
        out.push('/');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(s: &str) -> Result<String, PathError> {
        normalize_path(s, &NormalizeOptions::default()).map(|n| n.path.into_owned())
    }

    #[test]
    fn already_normal_paths_are_borrowed() {
        for p in [
            "/",
            "/data",
            "/a/b/c",
            "/a/b/",
            "/a.b/c..d/.e",
            "/x?y=1&z=%2F",
        ] {
            let n = normalize_path(p, &NormalizeOptions::default()).unwrap();
            assert!(!n.is_rewritten(), "{p}");
            assert_eq!(n.path_and_query(), p);
        }
    }

    #[test]
    fn rewrites() {
        let cases = [
            ("/data/../admin", "/admin"),
            ("/data/%2e%2e/admin", "/admin"),
            ("/data/%2E./admin", "/admin"),
            ("//admin", "/admin"),
            ("/a//b///c", "/a/b/c"),
            ("/%61dmin", "/admin"),
            ("/%7euser", "/~user"),
            ("/a/./b", "/a/b"),
            ("/a/b/.", "/a/b/"),
            ("/a/b/..", "/a/"),
            ("/a/%20b", "/a/%20b"),
            ("/a/%3b", "/a/%3B"),
            ("/caf%c3%a9", "/caf%C3%A9"),
            ("/a/%25", "/a/%25"),
        ];
        for (input, want) in cases {
            assert_eq!(norm(input).as_deref(), Ok(want), "{input}");
        }
    }

    #[test]
    fn refusals() {
        let cases = [
            ("", PathError::Empty),
            ("http://h/admin", PathError::NotOriginForm),
            ("*", PathError::NotOriginForm),
            ("admin", PathError::NotOriginForm),
            ("/data#x", PathError::Fragment),
            ("/data%", PathError::BadEscape(5)),
            ("/data%2", PathError::BadEscape(5)),
            ("/data%zz", PathError::BadEscape(5)),
            ("/admin%00", PathError::Nul),
            ("/admin%2f", PathError::EscapedSlash),
            ("/data/..%2fadmin", PathError::EscapedSlash),
            ("/data\\..\\admin", PathError::Backslash),
            ("/data%5c..%5cadmin", PathError::Backslash),
            ("/data;/../admin", PathError::Semicolon),
            ("/admin;x", PathError::Semicolon),
            ("/%c0%ae%c0%ae/admin", PathError::InvalidUtf8),
            ("/%ff", PathError::InvalidUtf8),
            ("/%c3", PathError::InvalidUtf8),
            ("/..", PathError::AboveRoot),
            ("/../admin", PathError::AboveRoot),
            ("/data/../../admin", PathError::AboveRoot),
            ("/a b", PathError::BadByte(2)),
            ("/a\tb", PathError::BadByte(2)),
            ("/caf\u{e9}", PathError::BadByte(4)),
            ("/a?b c", PathError::BadByte(4)),
        ];
        for (input, want) in cases {
            assert_eq!(norm(input), Err(want), "{input:?}");
        }
    }

    #[test]
    fn configured_decoding() {
        let opts = NormalizeOptions {
            escaped_slash: EscapedSlash::Decode,
            backslash: Backslash::DecodeToSlash,
            semicolon: Semicolon::KeepLiteral,
        };
        let cases = [
            ("/data/..%2fadmin", "/admin"),
            ("/admin%2f", "/admin/"),
            ("/data\\..\\admin", "/admin"),
            ("/data%5C..%5Cadmin", "/admin"),
            ("/data;/../admin", "/admin"),
            ("/admin;x", "/admin;x"),
        ];
        for (input, want) in cases {
            let got = normalize_path(input, &opts).map(|n| n.path.into_owned());
            assert_eq!(got.as_deref(), Ok(want), "{input}");
        }
    }

    #[test]
    fn query_is_kept_verbatim() {
        let n = normalize_path("//a/../b?x=%2e%2e&y", &NormalizeOptions::default()).unwrap();
        assert_eq!(n.path, "/b");
        assert_eq!(n.query, Some("x=%2e%2e&y"));
        assert_eq!(n.path_and_query(), "/b?x=%2e%2e&y");
    }
}
