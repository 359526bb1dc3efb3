//! Scenario 3.2 end to end on loopback: an ingress outside the mesh presents
//! a mesh-CA certificate whose only SAN is a DNS name, and app2's inbound
//! sidecar admits it on a port that opts in (`allow_dns_san_clients`) by a
//! `dns:` principal rule. Real processes: the CLI issues the certificates,
//! `rampart run` is the sidecar, a Python app is app2, curl is the ingress,
//! and `openssl s_client` reads the alert a client without a certificate gets.

use crate::support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rampart_app::config::PortConfig;
use rampart_proxy::config::DeclaredProtocol;
use support::apps;
use support::sidecar::{
    LocalProc, Loopback, Sidecar, free_addr, inbound_listener_as, rampart, wait_listening,
};

const INGRESS: &str = "ingress-nginx.ext.cluster.local";
/// The port that accepts DNS-SAN clients, and one that does not.
const OPTED_IN: u16 = 8080;
const STRICT: u16 = 8081;

/// Issues a DNS-SAN client certificate from the CA in `ca` into `out`.
fn issue_dns(ca: &Path, name: &str, out: &Path) {
    let o = rampart(&[
        "ca",
        "issue",
        "--dir",
        ca.to_str().unwrap(),
        "--dns",
        name,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{o:?}");
    assert!(out.join("cert.pem").exists() && out.join("cert.key").exists());
}

struct Setup {
    pki: Loopback,
    app: LocalProc,
    sidecar: Sidecar,
    /// Inbound listeners: the opted-in port and the strict one.
    opted_in: SocketAddr,
    strict: SocketAddr,
    /// The ingress's certificate from the mesh CA, and one from another CA.
    ingress: PathBuf,
    rogue: PathBuf,
}

fn setup() -> Setup {
    let pki = Loopback::new();
    let app_addr = free_addr();
    let app = LocalProc::spawn(
        &apps::http_app(app_addr.port(), "app2"),
        pki.dir.path(),
        "app2",
    );
    wait_listening(app_addr);
    let policy = pki.dir.path().join("app2.policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "policies:
  - name: app2
    action: ALLOW
    ports: [{OPTED_IN}, {STRICT}]
    rules:
      - name: app1-get
        from: {{principals: [\"spiffe://example.org/app1\"]}}
        to: {{methods: [GET]}}
      - name: ingress-mtls
        from: {{principals: [\"dns:{INGRESS}\"]}}
        to: {{methods: [GET], paths: [/data, /public/*]}}
"
        ),
    )
    .unwrap();
    let (opted_in, strict) = (free_addr(), free_addr());
    let sidecar = pki.sidecar_with("spiffe://example.org/app2", |c| {
        c.listeners.extend([
            inbound_listener_as("ingress", opted_in, app_addr, OPTED_IN),
            inbound_listener_as("mesh", strict, app_addr, STRICT),
        ]);
        c.inbound.policies = vec![policy.clone()];
        let http = |port| PortConfig {
            protocol: DeclaredProtocol::Http,
            ..PortConfig::new(port)
        };
        c.inbound.ports = vec![
            PortConfig {
                allow_dns_san_clients: true,
                ..http(OPTED_IN)
            },
            http(STRICT),
        ];
    });
    let ingress = pki.dir.path().join("ingress");
    issue_dns(&pki.dir.path().join("ca"), INGRESS, &ingress);
    let rogue_ca = pki.dir.path().join("rogue-ca");
    let o = rampart(&["ca", "init", "--dir", rogue_ca.to_str().unwrap()]);
    assert!(o.status.success(), "{o:?}");
    let rogue = pki.dir.path().join("rogue");
    issue_dns(&rogue_ca, INGRESS, &rogue);
    Setup {
        pki,
        app,
        sidecar,
        opted_in,
        strict,
        ingress,
        rogue,
    }
}

/// What curl got: status (0 when the exchange failed), response head and
/// body, and curl's error text.
struct Reply {
    status: u16,
    head: String,
    body: String,
    error: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// curl as the ingress: mTLS with the certificate in `cert_dir`. The
/// server's certificate is an SVID (no host name), which curl cannot check
/// by name; the sidecar's job here is checking the client.
fn curl(cert_dir: &Path, addr: SocketAddr, method: &str, path: &str, extra: &[&str]) -> Reply {
    let out = Command::new("curl")
        .args(["-s", "-S", "-i", "-k", "--no-alpn", "--max-time", "10"])
        .args(["--tlsv1.3", "-X", method])
        .arg("--cert")
        .arg(cert_dir.join("cert.pem"))
        .arg("--key")
        .arg(cert_dir.join("cert.key"))
        .args(extra)
        .arg(format!("https://{addr}{path}"))
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Reply {
        status: head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        head: head.to_owned(),
        body: body.to_owned(),
        error: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// SHA-256 of the certificate's DER, lower-case hex, as openssl computes it.
fn cert_sha256(cert: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(cert)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let hex = text.trim().rsplit('=').next().unwrap();
    hex.replace(':', "").to_ascii_lowercase()
}

/// How many requests the app has received so far.
fn app_requests(app: &LocalProc) -> usize {
    app.stdout().lines().count()
}

fn metric_with(text: &str, needle: &str) -> bool {
    text.lines()
        .any(|l| !l.starts_with('#') && l.contains(needle))
}

#[test]
fn ingress_with_a_dns_san_certificate_reaches_app2_by_dns_principal() {
    let s = setup();
    let ok = curl(
        &s.ingress,
        s.opted_in,
        "GET",
        "/data",
        // A forged identity header from the client must not survive.
        &[
            "-H",
            "x-forwarded-client-cert: URI=spiffe://example.org/app1",
        ],
    );
    assert_eq!(ok.status, 200, "{}\n{}", ok.error, s.sidecar.logs());
    assert_eq!(ok.body, "Hi app2 client!");
    let hash = cert_sha256(&s.ingress.join("cert.pem"));
    assert_eq!(
        ok.header("x-app-xfcc"),
        Some(format!("By=spiffe://example.org/app2;Hash={hash};URI=").as_str()),
        "XFCC is the seed's Envoy's (By, Hash, URI: empty for a DNS-only peer) and replaces the client's"
    );
    assert_eq!(
        curl(&s.ingress, s.opted_in, "GET", "/public/a", &[]).status,
        200
    );
    // The policy allows GET on /data and /public/* only.
    let seen = app_requests(&s.app);
    for (method, path) in [("POST", "/data"), ("GET", "/admin"), ("GET", "/Data")] {
        let denied = curl(&s.ingress, s.opted_in, method, path, &[]);
        assert_eq!(denied.status, 403, "{method} {path}: {}", denied.error);
        assert!(
            denied
                .body
                .contains("RBAC: access denied by spiffe://example.org/app2 policy app2"),
            "{}",
            denied.body
        );
    }
    assert_eq!(
        app_requests(&s.app),
        seen,
        "a refused request reached the app"
    );
    let m = s.sidecar.metrics();
    assert!(
        metric_with(&m, "rule=\"ingress-mtls\"") && metric_with(&m, "action=\"allow\""),
        "{m}"
    );
}

#[test]
fn dns_san_certificates_are_refused_in_the_handshake_from_another_ca_or_without_the_opt_in() {
    let s = setup();
    let seen = app_requests(&s.app);
    let rogue = curl(&s.rogue, s.opted_in, "GET", "/data", &[]);
    assert_eq!(rogue.status, 0, "another CA's certificate was accepted");
    assert!(!rogue.error.is_empty());
    let not_opted = curl(&s.ingress, s.strict, "GET", "/data", &[]);
    assert_eq!(not_opted.status, 0, "accepted on a port without the opt-in");
    assert!(!not_opted.error.is_empty());
    assert_eq!(app_requests(&s.app), seen);
    // Both were counted as refused handshakes, for the reasons they are.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = s.sidecar.metrics();
        if metric_with(&m, "result=\"unknown_ca\"") && metric_with(&m, "result=\"invalid_svid\"") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "handshake refusals not counted:\n{m}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // A mesh workload still gets in on both ports.
    let app1 = s.pki.issue("spiffe://example.org/app1", "app1");
    for addr in [s.opted_in, s.strict] {
        let out = Command::new("curl")
            .args([
                "-s",
                "-k",
                "--no-alpn",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
            ])
            .arg("--cert")
            .arg(app1.join("svid.pem"))
            .arg("--key")
            .arg(app1.join("svid.key"))
            .arg(format!("https://{addr}/anything"))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "{addr}");
    }
}

/// A client with no certificate gets TLS 1.3's `certificate_required` alert
/// (116, RFC 8446 §6.2), on the opted-in port as on any other.
#[test]
fn a_client_without_a_certificate_gets_the_certificate_required_alert() {
    let s = setup();
    for addr in [s.strict, s.opted_in] {
        let mut child = Command::new("openssl")
            .args(["s_client", "-tls1_3", "-ign_eof", "-connect"])
            .arg(addr.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("openssl s_client still connected to {addr}: the server never refused");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains("alert certificate required") && text.contains("alert number 116"),
            "{addr}: {text}"
        );
    }
    assert!(metric_with(
        &s.sidecar.metrics(),
        "result=\"no_client_cert\""
    ));
}

/// curl as the ingress, letting curl offer ALPN (`--http1.1`: only
/// `http/1.1`; `--http2`: `h2,http/1.1`). Returns the status line and body.
fn curl_alpn(cert_dir: &Path, addr: SocketAddr, version: &str, path: &str) -> (String, String) {
    let out = Command::new("curl")
        .args([
            "-s",
            "-S",
            "-i",
            "-k",
            "--max-time",
            "10",
            "--tlsv1.3",
            version,
        ])
        .arg("--cert")
        .arg(cert_dir.join("cert.pem"))
        .arg("--key")
        .arg(cert_dir.join("cert.key"))
        .arg(format!("https://{addr}{path}"))
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status_line = head.lines().next().unwrap_or("").trim().to_owned();
    (
        format!("{status_line}{}", String::from_utf8_lossy(&out.stderr)),
        body.to_owned(),
    )
}

#[test]
fn an_ingress_negotiating_http11_or_h2_by_alpn_reaches_an_http11_app() {
    let s = setup();
    // ALPN `http/1.1` only: the handshake succeeds and HTTP/1.1 is served.
    let (status, body) = curl_alpn(&s.ingress, s.opted_in, "--http1.1", "/data");
    assert_eq!(status, "HTTP/1.1 200 OK", "{}", s.sidecar.logs());
    assert_eq!(body, "Hi app2 client!");
    // ALPN `h2,http/1.1`: h2 to the sidecar, HTTP/1.1 to the app (a Python
    // http.server, which speaks nothing else: HTTP/2 to it would be a 502).
    let (status, body) = curl_alpn(&s.ingress, s.opted_in, "--http2", "/data");
    assert_eq!(status, "HTTP/2 200", "{}", s.sidecar.logs());
    assert_eq!(body, "Hi app2 client!");
    let (status, _) = curl_alpn(&s.ingress, s.opted_in, "--http2", "/admin");
    assert_eq!(status, "HTTP/2 403", "the policy still decides over h2");
}
