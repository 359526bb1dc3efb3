//! What App Mesh and OSM users bring, end to end on loopback:
//!
//! - a server with a DNS-SAN-only certificate from the mesh CA (ACM PCA,
//!   file certificates) as an expected server identity, pinned by name in
//!   the handshake (`outbound.servers[].allow_dns_san_servers`): a Python
//!   TLS server stands for it, a `rampart run` client sidecar dials it;
//! - an HTTP/2 client on an undeclared (`detect`) port reaches an
//!   HTTP/1.1-only app as HTTP/1.1 through a real pair.

use crate::support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rampart_proxy::config::{ListenerConfig, ServerRule};
use support::apps;
use support::curl::curl;
use support::sidecar::{
    LocalProc, Loopback, Sidecar, free_addr, inbound_listener, outbound_listener, wait_listening,
};
use support::wait;

const BLUE: &str = "color-blue.mesh.local";

/// An HTTPS/1.1 server that requires a client certificate from `ca`,
/// presents `cert`/`key`, prints `HANDSHAKE-OK`, `HANDSHAKE-FAILED <why>`
/// and `GET <path>` lines, and answers `hello from <name>`.
const TLS_APP: &str = r#"
import http.server, ssl, sys
port, cert, key, ca, name = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.minimum_version = ssl.TLSVersion.TLSv1_3
ctx.load_cert_chain(cert, key)
ctx.load_verify_locations(ca)
ctx.verify_mode = ssl.CERT_REQUIRED
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        print("GET", self.path, flush=True)
        body = ("hello from %s" % name).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
class Server(http.server.ThreadingHTTPServer):
    def finish_request(self, request, client_address):
        try:
            conn = ctx.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as e:
            print("HANDSHAKE-FAILED", e, flush=True)
            return
        print("HANDSHAKE-OK", flush=True)
        self.RequestHandlerClass(conn, client_address, self)
Server(("127.0.0.1", port), Handler).serve_forever()
"#;

/// The DNS-SAN server: its certificate (only `names` as SANs, from the
/// loopback CA) written beside the other files, the process, its address.
fn dns_san_server(pki: &Loopback, names: &[&str]) -> (LocalProc, SocketAddr) {
    let dir = pki.dir.path().join("dns-server");
    std::fs::create_dir_all(&dir).unwrap();
    let issued = pki.pki.dns_server(names);
    let (cert, key, ca) = (
        dir.join("cert.pem"),
        dir.join("cert.key"),
        dir.join("ca.pem"),
    );
    std::fs::write(&cert, &issued.chain_pem).unwrap();
    std::fs::write(&key, &issued.key_pem).unwrap();
    std::fs::write(&ca, pki.pki.ca_pem()).unwrap();
    let addr = free_addr();
    let python = apps::python().expect("python3");
    let argv: Vec<String> = [
        python,
        "-u".into(),
        "-c".into(),
        TLS_APP.into(),
        addr.port().to_string(),
        path(&cert),
        path(&key),
        path(&ca),
        "blue".into(),
    ]
    .into();
    let proc = LocalProc::spawn(&argv, pki.dir.path(), "dns-server");
    wait_listening(addr);
    (proc, addr)
}

fn path(p: &Path) -> String {
    p.to_str().unwrap().to_owned()
}

/// A client sidecar whose outbound listener to `server` is routed by one
/// `outbound.servers` rule (`rule` edits it).
fn client_to(
    pki: &Loopback,
    name: &str,
    server: SocketAddr,
    rule: ServerRule,
) -> (Sidecar, SocketAddr) {
    let out = free_addr();
    let sidecar = pki.sidecar_with(&format!("spiffe://example.org/{name}"), |c| {
        c.listeners.push(ListenerConfig {
            server_identities: None,
            ..outbound_listener("out", out, server, "spiffe://example.org/unused")
        });
        c.outbound.servers = vec![ServerRule {
            cidrs: vec!["127.0.0.1/32".parse().unwrap()],
            ports: vec![server.port()],
            ..rule
        }];
    });
    (sidecar, out)
}

fn rule() -> ServerRule {
    ServerRule {
        cidrs: Vec::new(),
        ports: Vec::new(),
        identities: Vec::new(),
        trust_domains: Vec::new(),
        allow_dns_san_servers: Vec::new(),
    }
}

/// The outbound handshake count with `result` on `/metrics`.
fn handshakes(s: &Sidecar, result: &str) -> u64 {
    let series =
        format!("rampart_tls_handshakes_total{{direction=\"outbound\",result=\"{result}\"}}");
    s.metrics()
        .lines()
        .find_map(|l| l.strip_prefix(series.as_str()))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_dns_san_server_pinned_by_name_is_checked_in_the_handshake() {
    let pki = Loopback::new();
    let (server, addr) = dns_san_server(&pki, &[BLUE]);
    let requests = |p: &LocalProc| p.stdout().lines().filter(|l| l.starts_with("GET")).count();

    // Opted in by its name (any case): the request goes through.
    let (good, out) = client_to(
        &pki,
        "front",
        addr,
        ServerRule {
            allow_dns_san_servers: vec!["Color-Blue.Mesh.Local".into()],
            ..rule()
        },
    );
    let r = curl(&format!("http://{out}/color"), &[]);
    assert_eq!(r.status, 200, "{r:?}\n{}", good.logs());
    assert_eq!(r.body, "hello from blue");
    assert_eq!(requests(&server), 1);

    // (what, the rule, the handshake result the client counts)
    let refused: [(&str, ServerRule, &str); 3] = [
        (
            "another DNS name",
            ServerRule {
                allow_dns_san_servers: vec!["color-red.mesh.local".into()],
                ..rule()
            },
            "id_not_allowed",
        ),
        (
            "a SPIFFE ID only: a DNS-SAN certificate is no SVID",
            ServerRule {
                identities: vec![support::pki::parse_id("spiffe://example.org/color-blue")],
                ..rule()
            },
            "invalid_svid",
        ),
        (
            "the trust domain only",
            ServerRule {
                trust_domains: vec!["example.org".parse().unwrap()],
                ..rule()
            },
            "invalid_svid",
        ),
    ];
    for (i, (what, rule, result)) in refused.into_iter().enumerate() {
        let (client, out) = client_to(&pki, &format!("front{i}"), addr, rule);
        let failed_before = server
            .stdout()
            .lines()
            .filter(|l| l.starts_with("HANDSHAKE-FAILED"))
            .count();
        let r = curl(&format!("http://{out}/color"), &[]);
        assert_eq!(r.status, 502, "{what}: {r:?}\n{}", client.logs());
        wait::until_true(
            &format!("{what}: the client counts {result}"),
            Duration::from_secs(5),
            || handshakes(&client, result) >= 1,
        );
        // The server saw the handshake fail, and no request.
        wait::until_true(
            &format!("{what}: the server sees the handshake fail"),
            Duration::from_secs(5),
            || {
                server
                    .stdout()
                    .lines()
                    .filter(|l| l.starts_with("HANDSHAKE-FAILED"))
                    .count()
                    > failed_before
            },
        );
        assert_eq!(requests(&server), 1, "{what}: a request reached the server");
    }
}

#[test]
fn a_dns_san_server_name_must_be_a_host_name() {
    let pki = Loopback::new();
    let mut cfg = pki.config("spiffe://example.org/front");
    cfg.outbound.servers = vec![ServerRule {
        allow_dns_san_servers: vec!["*.mesh.local".into()],
        ..rule()
    }];
    let mut s = Sidecar::spawn(pki.dir.path(), "front", &cfg);
    let status = s.wait_exit(Duration::from_secs(20)).expect("it exits");
    assert_eq!(status.code(), Some(64), "{}", s.logs());
    assert!(
        s.logs()
            .contains("outbound.servers[0].allow_dns_san_servers[0]"),
        "{}",
        s.logs()
    );
}

/// An HTTP/1.1-only app (Python's http.server) behind an undeclared port.
fn http1_app(pki: &Loopback) -> (LocalProc, SocketAddr) {
    let app = free_addr();
    let proc = LocalProc::spawn(&apps::http_app(app.port(), "app2"), pki.dir.path(), "app2");
    wait_listening(app);
    (proc, app)
}

#[test]
fn an_h2_client_on_an_undeclared_port_reaches_an_http1_app_as_http1() {
    let pki = Loopback::new();
    let (app, app_addr) = http1_app(&pki);
    let policy: PathBuf = pki.dir.path().join("open.yaml");
    std::fs::write(
        &policy,
        "policies:
  - name: app2
    action: ALLOW
    rules:
      - name: callers
        from: {principals: [\"spiffe://example.org/app1\", \"spiffe://example.org/ingress\"]}
",
    )
    .unwrap();
    let inbound = free_addr();
    let server = pki.sidecar_with("spiffe://example.org/app2", |c| {
        // No `inbound.ports`: the port is undeclared (detect).
        c.listeners.push(inbound_listener("in", inbound, app_addr));
        c.inbound.policies = vec![policy.clone()];
    });
    let (_client, outs) = pki.outbound_sidecar_with(
        "spiffe://example.org/app1",
        &[inbound],
        "spiffe://example.org/app2",
        |_| {},
    );
    let svid = pki.issue("spiffe://example.org/ingress", "ingress");
    let (cert, key) = (path(&svid.join("svid.pem")), path(&svid.join("svid.key")));
    let h2_over_mtls = ["--http2", "-k", "--cert", &cert, "--key", &key];
    // (what, URL, curl arguments)
    let cases: [(&str, String, &[&str]); 3] = [
        (
            "h2c through the pair",
            format!("http://{}/h2c", outs[0]),
            &["--http2-prior-knowledge"],
        ),
        (
            "h2 over mTLS (ALPN h2) straight to the inbound",
            format!("https://{inbound}/alpn"),
            &h2_over_mtls,
        ),
        (
            "HTTP/1.1 through the pair",
            format!("http://{}/h1", outs[0]),
            &[],
        ),
    ];
    for (what, url, args) in cases {
        let r = curl(&url, args);
        assert_eq!(r.status, 200, "{what}: {r:?}\n{}", server.logs());
        let path = url.rsplit('/').next().unwrap();
        assert_eq!(
            r.header("x-app-path"),
            Some(format!("/{path}").as_str()),
            "{what}: {r:?}"
        );
    }
    let seen = app.stdout();
    for path in ["/h2c", "/alpn", "/h1"] {
        assert!(seen.contains(&format!("GET {path}")), "{path}: {seen}");
    }
}
