//! Istio resources as a sidecar reads them (`inbound.istio`), end to end on
//! loopback: `rampart run` with an AuthorizationPolicy and a
//! PeerAuthentication written as Istio publishes them, curl as the client
//! (with an SVID, or plaintext), a Python HTTP/1.1 app behind.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::apps;
use support::sidecar::{LocalProc, Pki, Sidecar, free_addr, wait_listening};

/// Two app ports: STRICT and (per port) PERMISSIVE by PeerAuthentication.
const STRICT: u16 = 8080;
const PERMISSIVE: u16 = 8081;

const RESOURCES: &str = r#"apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: httpbin
  namespace: foo
spec:
  selector:
    matchLabels:
      app: httpbin
  mtls:
    mode: STRICT
  portLevelMtls:
    "8081":
      mode: PERMISSIVE
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: httpbin-viewer
  namespace: foo
spec:
  selector:
    matchLabels:
      app: httpbin
  action: ALLOW
  rules:
  - to:
    - operation:
        methods: ["GET"]
        paths: ["/data*", "/public/*"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-banned
  namespace: foo
spec:
  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/foo/sa/banned"]
  - when:
    - key: request.headers[x-block]
      values: ["*"]
"#;

struct Setup {
    pki: Pki,
    _app: LocalProc,
    sidecar: Sidecar,
    strict: SocketAddr,
    permissive: SocketAddr,
}

fn setup(resources: &str) -> Setup {
    let pki = Pki::new();
    let app_addr = free_addr();
    let app = LocalProc::spawn(
        &apps::http_app(app_addr.port(), "httpbin"),
        pki.dir.path(),
        "httpbin",
    );
    wait_listening(app_addr);
    let file = pki.dir.path().join("istio.yaml");
    std::fs::write(&file, resources).unwrap();
    let (strict, permissive) = (free_addr(), free_addr());
    let sidecar = pki.sidecar(
        "spiffe://example.org/ns/foo/sa/httpbin",
        &config(strict, permissive, app_addr, &file),
    );
    Setup {
        pki,
        _app: app,
        sidecar,
        strict,
        permissive,
    }
}

fn config(strict: SocketAddr, permissive: SocketAddr, app: SocketAddr, file: &Path) -> String {
    format!(
        "listeners:
  - {{name: strict, direction: inbound, listen: \"{strict}\", target: \"{app}\", port: {STRICT}}}
  - {{name: permissive, direction: inbound, listen: \"{permissive}\", target: \"{app}\", port: {PERMISSIVE}}}
inbound:
  ports:
    - {{port: {STRICT}, protocol: http}}
    - {{port: {PERMISSIVE}, protocol: http}}
  istio:
    files: [\"{}\"]
    namespace: foo
    labels: {{app: httpbin}}
    trust_domain: example.org
",
        file.display()
    )
}

/// curl's status (0 when the exchange failed) for `GET url`, with the SVID
/// in `svid` when given.
fn status(url: &str, svid: Option<&Path>, extra: &[&str]) -> u16 {
    let mut c = Command::new("curl");
    c.args([
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-k",
        "--max-time",
        "10",
    ]);
    if let Some(dir) = svid {
        c.arg("--cert").arg(dir.join("svid.pem"));
        c.arg("--key").arg(dir.join("svid.key"));
    }
    let out = c.args(extra).arg(url).output().expect("run curl");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

#[test]
fn istio_resources_decide_with_istio_semantics_through_a_real_sidecar() {
    let s = setup(RESOURCES);
    let curl_id = s.pki.issue("spiffe://example.org/ns/foo/sa/curl", "curl");
    let banned = s
        .pki
        .issue("spiffe://example.org/ns/foo/sa/banned", "banned");
    let https = |addr: SocketAddr, path: &str| format!("https://{addr}{path}");
    // (what, URL, client SVID, extra curl arguments, expected status)
    type Case<'a> = (&'a str, String, Option<&'a Path>, &'a [&'a str], u16);
    let cases: &[Case<'_>] = &[
        (
            "mTLS GET /data",
            https(s.strict, "/data"),
            Some(&curl_id),
            &[],
            200,
        ),
        (
            "mTLS GET /public/x over h2",
            https(s.strict, "/public/x"),
            Some(&curl_id),
            &["--http2"],
            200,
        ),
        (
            "mTLS GET /private: an ALLOW policy applies",
            https(s.strict, "/private"),
            Some(&curl_id),
            &[],
            403,
        ),
        (
            "mTLS POST /data",
            https(s.strict, "/data"),
            Some(&curl_id),
            &["-X", "POST"],
            403,
        ),
        // cluster.local in the policy names the mesh's trust domain.
        (
            "banned principal",
            https(s.strict, "/data"),
            Some(&banned),
            &[],
            403,
        ),
        (
            "x-block present",
            https(s.strict, "/data"),
            Some(&curl_id),
            &["-H", "x-block: 1"],
            403,
        ),
        // A rule without `from` admits any source, plaintext included, on
        // the port PeerAuthentication makes PERMISSIVE.
        (
            "plaintext GET /data on the PERMISSIVE port",
            format!("http://{}/data", s.permissive),
            None,
            &[],
            200,
        ),
        (
            "plaintext GET /private on the PERMISSIVE port",
            format!("http://{}/private", s.permissive),
            None,
            &[],
            403,
        ),
        (
            "plaintext on the STRICT port",
            format!("http://{}/data", s.strict),
            None,
            &[],
            0,
        ),
    ];
    for (name, url, svid, extra, want) in cases {
        assert_eq!(
            status(url, *svid, extra),
            *want,
            "{name}\n{}",
            s.sidecar.logs()
        );
    }
}

#[test]
fn an_istio_field_rampart_cannot_honour_stops_the_sidecar_naming_it() {
    let pki = Pki::new();
    let file = pki.dir.path().join("istio.yaml");
    std::fs::write(
        &file,
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: meta, namespace: foo}
spec:
  action: DENY
  rules:
  - when:
    - key: experimental.envoy.filters.network.mysql_proxy[db.table]
      values: [\"[update]\"]
",
    )
    .unwrap();
    let (a, b, app) = (free_addr(), free_addr(), free_addr());
    let mut sidecar = pki.sidecar_unready(
        "spiffe://example.org/ns/foo/sa/httpbin",
        &config(a, b, app, &file),
    );
    let exit = sidecar.wait_exit(Duration::from_secs(20)).expect("exits");
    assert_eq!(exit.code(), Some(64), "{}", sidecar.logs());
    let logs = sidecar.logs();
    assert!(
        logs.contains("istio.yaml:1:")
            && logs.contains("experimental.envoy.filters.network.mysql_proxy"),
        "{logs}"
    );
}
