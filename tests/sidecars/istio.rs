//! Istio resources as a sidecar reads them (`inbound.istio`), end to end on
//! loopback: `rampart run` with an AuthorizationPolicy and a
//! PeerAuthentication written as Istio publishes them, curl as the client
//! (with an SVID, or plaintext), a Python HTTP/1.1 app behind.

use crate::support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use rampart_app::config::{Config, IstioConfig, PortConfig};
use rampart_proxy::config::DeclaredProtocol;
use support::apps;
use support::sidecar::{
    LocalProc, Loopback, Sidecar, free_addr, inbound_listener_as, wait_listening,
};

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
  - when:
    - key: connection.sni
      values: ["blocked.example"]
"#;

struct Setup {
    pki: Loopback,
    _app: LocalProc,
    sidecar: Sidecar,
    strict: SocketAddr,
    permissive: SocketAddr,
}

fn setup(resources: &str) -> Setup {
    let pki = Loopback::new();
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
    let sidecar = pki.sidecar_with(
        "spiffe://example.org/ns/foo/sa/httpbin",
        config(strict, permissive, app_addr, &file),
    );
    Setup {
        pki,
        _app: app,
        sidecar,
        strict,
        permissive,
    }
}

/// The sidecar of `httpbin` in namespace `foo`: one inbound listener per
/// `(listen, port)` in front of `app`, each port declared HTTP, decided by
/// the Istio resources in `file`.
fn istio_sidecar(
    listeners: Vec<(SocketAddr, u16)>,
    app: SocketAddr,
    file: &Path,
) -> impl FnOnce(&mut Config) {
    let file = file.to_owned();
    move |cfg| {
        for (i, (listen, port)) in listeners.into_iter().enumerate() {
            cfg.listeners
                .push(inbound_listener_as(&format!("in{i}"), listen, app, port));
            cfg.inbound.ports.push(PortConfig {
                protocol: DeclaredProtocol::Http,
                ..PortConfig::new(port)
            });
        }
        cfg.inbound.istio = Some(IstioConfig {
            labels: [("app".to_owned(), "httpbin".to_owned())].into(),
            trust_domain: "example.org".into(),
            ..IstioConfig::new(vec![file], "foo")
        });
    }
}

/// [`istio_sidecar`] with the STRICT and PERMISSIVE ports.
fn config(
    strict: SocketAddr,
    permissive: SocketAddr,
    app: SocketAddr,
    file: &Path,
) -> impl FnOnce(&mut Config) {
    istio_sidecar(vec![(strict, STRICT), (permissive, PERMISSIVE)], app, file)
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
    // connection.sni is the server name curl sends for a host name.
    let port = s.strict.port();
    for (host, want) in [("blocked.example", 403), ("httpbin.foo.svc", 200)] {
        let resolve = format!("{host}:{port}:127.0.0.1");
        let url = format!("https://{host}:{port}/data");
        assert_eq!(
            status(&url, Some(&curl_id), &["--resolve", &resolve]),
            want,
            "SNI {host}"
        );
    }
}

#[test]
fn an_istio_field_rampart_cannot_honour_stops_the_sidecar_naming_it() {
    let pki = Loopback::new();
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
    let mut sidecar = pki.sidecar_unready_with(
        "spiffe://example.org/ns/foo/sa/httpbin",
        config(a, b, app, &file),
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

/// RS256 tokens signed by `openssl dgst` with a key made by `openssl
/// genrsa`, and the matching JWKS (modulus from `openssl rsa -modulus`).
/// Shared with `istio_kube`.
pub(crate) struct Issuer {
    key: std::path::PathBuf,
}

impl Issuer {
    pub(crate) fn new(dir: &Path) -> Issuer {
        let key = dir.join("issuer.key");
        let o = Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(&key)
            .arg("2048")
            .output()
            .expect("openssl");
        assert!(o.status.success(), "{o:?}");
        Issuer { key }
    }

    pub(crate) fn jwks(&self) -> String {
        use base64::Engine as _;
        let o = Command::new("openssl")
            .args(["rsa", "-noout", "-modulus", "-in"])
            .arg(&self.key)
            .output()
            .expect("openssl");
        let text = String::from_utf8_lossy(&o.stdout);
        let hex = text.trim().trim_start_matches("Modulus=");
        let n: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            r#"{{"keys":[{{"kty":"RSA","kid":"test","alg":"RS256","n":"{}","e":"AQAB"}}]}}"#,
            b64.encode(n)
        )
    }

    pub(crate) fn token(&self, claims: &str) -> String {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let msg = format!(
            "{}.{}",
            b64.encode(r#"{"alg":"RS256","kid":"test","typ":"JWT"}"#),
            b64.encode(claims)
        );
        let mut child = Command::new("openssl")
            .args(["dgst", "-sha256", "-sign"])
            .arg(&self.key)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("openssl");
        use std::io::Write as _;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(msg.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        format!("{msg}.{}", b64.encode(out.stdout))
    }
}

pub(crate) fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn jwt_request_authentication_through_a_sidecar_pair() {
    let pki = Loopback::new();
    let dir = pki.dir.path();
    let issuer = Issuer::new(dir);
    let keys_dir = dir.join("keys");
    std::fs::create_dir_all(&keys_dir).unwrap();
    std::fs::write(keys_dir.join("jwks.json"), issuer.jwks()).unwrap();
    // The JWKS server: Python's http.server, fetched by the sidecar.
    let keys_addr = free_addr();
    let python = apps::python().expect("python3");
    let _keys = LocalProc::spawn(
        &[
            python,
            "-m".into(),
            "http.server".into(),
            keys_addr.port().to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--directory".into(),
            keys_dir.display().to_string(),
        ],
        dir,
        "jwks-server",
    );
    wait_listening(keys_addr);
    let app_addr = free_addr();
    let app = LocalProc::spawn(&apps::http_app(app_addr.port(), "httpbin"), dir, "httpbin");
    wait_listening(app_addr);
    let file = dir.join("istio.yaml");
    std::fs::write(
        &file,
        format!(
            r#"apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata:
  name: jwt-example
  namespace: foo
spec:
  selector:
    matchLabels:
      app: httpbin
  jwtRules:
  - issuer: "https://issuer.test"
    audiences: ["httpbin"]
    jwksUri: "http://{keys_addr}/jwks.json"
    outputPayloadToHeader: x-user
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: require-jwt
  namespace: foo
spec:
  selector:
    matchLabels:
      app: httpbin
  action: ALLOW
  rules:
  - from:
    - source:
        requestPrincipals: ["https://issuer.test/*"]
    to:
    - operation:
        paths: ["/data"]
  - to:
    - operation:
        paths: ["/public/*"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-banned-group
  namespace: foo
spec:
  action: DENY
  rules:
  - when:
    - key: request.auth.claims[groups]
      values: ["banned"]
"#
        ),
    )
    .unwrap();
    let inbound = free_addr();
    let server = pki.sidecar_with(
        "spiffe://example.org/ns/foo/sa/httpbin",
        istio_sidecar(vec![(inbound, STRICT)], app_addr, &file),
    );
    let (_client, outs) = pki.outbound_sidecar_with(
        "spiffe://example.org/ns/foo/sa/curl",
        &[inbound],
        "spiffe://example.org/ns/foo/sa/httpbin",
        |_| {},
    );
    let out = outs[0];
    let get = |path: &str, token: Option<&str>| -> support::curl::Reply {
        let auth = token.map(|t| format!("authorization: Bearer {t}"));
        let mut extra = Vec::new();
        if let Some(a) = &auth {
            extra.extend(["-H", a.as_str()]);
        }
        support::curl::curl(&format!("http://{out}{path}"), &extra)
    };
    let claims = |iss: &str, aud: &str, exp: u64, group: &str| {
        format!(r#"{{"iss":"{iss}","sub":"alice","aud":"{aud}","exp":{exp},"groups":["{group}"]}}"#)
    };
    let valid = issuer.token(&claims(
        "https://issuer.test",
        "httpbin",
        now() + 600,
        "dev",
    ));
    // The sidecar fetches the keys off the request path: poll until in.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let ok = loop {
        let r = get("/data", Some(&valid));
        if r.status == 200 || std::time::Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(ok.status, 200, "{}\n{}", ok.head, server.logs());
    assert_eq!(ok.body, "Hi httpbin client!");
    // forwardOriginalToken is false: the app does not see the token, but
    // gets the verified payload in x-user.
    assert_eq!(ok.header("x-app-authorization"), Some("-"));
    let payload = ok.header("x-app-x-user").unwrap_or("-").to_owned();
    assert_eq!(payload, valid.split('.').nth(1).unwrap());
    let forged = {
        let mut parts: Vec<&str> = valid.split('.').collect();
        let other = issuer.token(&claims(
            "https://issuer.test",
            "httpbin",
            now() + 600,
            "admin",
        ));
        let body = other.split('.').nth(1).unwrap().to_owned();
        parts[1] = Box::leak(body.into_boxed_str());
        parts.join(".")
    };
    let cases: &[(&str, &str, Option<String>, u16)] = &[
        (
            "expired",
            "/data",
            Some(issuer.token(&claims(
                "https://issuer.test",
                "httpbin",
                now() - 3600,
                "dev",
            ))),
            401,
        ),
        (
            "wrong issuer",
            "/data",
            Some(issuer.token(&claims("https://other.test", "httpbin", now() + 600, "dev"))),
            401,
        ),
        (
            "wrong audience",
            "/data",
            Some(issuer.token(&claims("https://issuer.test", "other", now() + 600, "dev"))),
            401,
        ),
        (
            "payload swapped (bad signature)",
            "/data",
            Some(forged),
            401,
        ),
        (
            "missing token where a principal is required",
            "/data",
            None,
            403,
        ),
        ("missing token on a public path", "/public/x", None, 200),
        (
            "invalid token on a public path",
            "/public/x",
            Some("not-a-jwt".into()),
            401,
        ),
        (
            "banned group claim",
            "/data",
            Some(issuer.token(&claims(
                "https://issuer.test",
                "httpbin",
                now() + 600,
                "banned",
            ))),
            403,
        ),
    ];
    let seen = app.stdout().lines().count();
    for (name, path, token, want) in cases {
        let r = get(path, token.as_deref());
        assert_eq!(r.status, *want, "{name}: {}\n{}", r.head, server.logs());
    }
    assert_eq!(
        app.stdout().lines().count(),
        seen + 1,
        "only the public request reached the app"
    );
}
