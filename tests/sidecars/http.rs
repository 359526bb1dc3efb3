//! End-to-end HTTP through real sidecars on loopback (explicit listeners,
//! no root): curl, raw sockets and grpcio as clients, Python apps behind.
//! Scenario 1 (per-request policies, native and Rego, XFCC), scenario 2
//! (STRICT and PERMISSIVE ports, h2c and h2 over mTLS), request smuggling
//! and malformed heads, slowloris, app failures, timeouts and limits
//! (pool cap, HTTP/2 idle), drain, WebSocket and CONNECT tunnels, gRPC
//! streaming, and opaque server-speaks-first TCP.

use crate::support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use rampart_app::config::{Config, PortConfig};
use rampart_proxy::config::{DeclaredProtocol, Limits, TlsMode};
use support::apps;
use support::curl::curl;
use support::sidecar::{
    LocalProc, Loopback, Sidecar, free_addr, inbound_listener, inbound_listener_as, wait_listening,
};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("authz/tests/fixtures/scenario1")
        .join(name)
}

/// An HTTP app on loopback.
fn http_app(pki: &Loopback, name: &str) -> (LocalProc, SocketAddr) {
    let addr = free_addr();
    let app = LocalProc::spawn(&apps::http_app(addr.port(), name), pki.dir.path(), name);
    wait_listening(addr);
    (app, addr)
}

/// A client sidecar for `id` with one outbound listener per target, each
/// expecting `expect`; returns the listeners' addresses in order.
fn client(
    pki: &Loopback,
    id: &str,
    targets: &[SocketAddr],
    expect: &str,
) -> (Sidecar, Vec<SocketAddr>) {
    client_with(pki, id, targets, expect, |_| {})
}

/// [`client`] with the configuration `edit` makes of the default.
fn client_with(
    pki: &Loopback,
    id: &str,
    targets: &[SocketAddr],
    expect: &str,
    edit: impl FnOnce(&mut Config),
) -> (Sidecar, Vec<SocketAddr>) {
    pki.outbound_sidecar_with(id, targets, expect, edit)
}

/// A sidecar for `id` with one inbound listener on `listen` in front of
/// the app at `app`, authorizing with the policy file `policy`.
fn server(
    pki: &Loopback,
    id: &str,
    listen: SocketAddr,
    app: SocketAddr,
    policy: &std::path::Path,
) -> Sidecar {
    server_with(pki, id, listen, app, policy, |_| {})
}

/// [`server`] with the configuration `edit` makes of it.
fn server_with(
    pki: &Loopback,
    id: &str,
    listen: SocketAddr,
    app: SocketAddr,
    policy: &std::path::Path,
    edit: impl FnOnce(&mut Config),
) -> Sidecar {
    pki.sidecar_with(id, |c| {
        c.listeners.push(inbound_listener("in", listen, app));
        c.inbound.policies = vec![policy.to_owned()];
        edit(c);
    })
}

/// Port `port` accepting plaintext beside mTLS.
fn permissive(port: u16) -> PortConfig {
    PortConfig {
        mode: TlsMode::PermissiveAllowPlaintext,
        ..PortConfig::new(port)
    }
}

/// Port `port` declared to speak `protocol`.
fn declared(port: u16, protocol: DeclaredProtocol) -> PortConfig {
    PortConfig {
        protocol,
        ..PortConfig::new(port)
    }
}

struct Scenario1 {
    pki: Loopback,
    app: LocalProc,
    backend: Sidecar,
    ec_web: (Sidecar, SocketAddr),
    news_web: (Sidecar, SocketAddr),
}

/// ec-backend behind its sidecar with `policy`, and the ec-web and
/// news-web sidecars in front of it.
fn scenario1(policy: &str) -> Scenario1 {
    let pki = Loopback::new();
    let (app, app_addr) = http_app(&pki, "ec-backend");
    let inbound = free_addr();
    let backend = server(
        &pki,
        "spiffe://example.org/ec-backend",
        inbound,
        app_addr,
        &fixture(policy),
    );
    let backend_id = "spiffe://example.org/ec-backend";
    let (ec, ec_out) = client(&pki, "spiffe://example.org/ec-web", &[inbound], backend_id);
    let (news, news_out) = client(
        &pki,
        "spiffe://example.org/news-web",
        &[inbound],
        backend_id,
    );
    Scenario1 {
        pki,
        app,
        backend,
        ec_web: (ec, ec_out[0]),
        news_web: (news, news_out[0]),
    }
}

const TRACEPARENT: &str = "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const B3: &str = "b3: 80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90";

const FORGED_XFCC: &str = "x-forwarded-client-cert: By=spiffe://example.org/ec-backend;Hash=00;URI=spiffe://example.org/ec-web";

#[test]
fn scenario1_through_two_sidecars_with_native_and_rego_policies() {
    for policy in ["ec-backend.native.yaml", "ec-backend.rego.yaml"] {
        let s = scenario1(policy);
        let ec = format!("http://{}", s.ec_web.1);
        let news = format!("http://{}", s.news_web.1);

        // 3: ec-web may GET /data; a forged XFCC from the client is replaced.
        // Trace context passes untouched; a request ID is added when absent.
        let r = curl(
            &format!("{ec}/data"),
            &["-H", FORGED_XFCC, "-H", TRACEPARENT, "-H", B3],
        );
        assert_eq!(r.status, 200, "{policy}: {r:?}\n{}", s.backend.logs());
        assert_eq!(r.body, "Hi ec-backend client!", "{policy}");
        assert_eq!(
            r.header("x-app-traceparent"),
            TRACEPARENT.split_once(": ").map(|x| x.1)
        );
        assert_eq!(r.header("x-app-b3"), B3.split_once(": ").map(|x| x.1));
        let id = r.header("x-app-x-request-id").unwrap();
        assert!(
            id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "{id}"
        );
        let r = curl(&format!("{ec}/data"), &["-H", "x-request-id: mine-1"]);
        assert_eq!(r.header("x-app-x-request-id"), Some("mine-1"));
        let xfcc = r.header("x-app-xfcc").unwrap();
        let hash = xfcc
            .strip_prefix("By=spiffe://example.org/ec-backend;Hash=")
            .and_then(|rest| rest.strip_suffix(";URI=spiffe://example.org/ec-web"))
            .unwrap_or_else(|| panic!("{policy}: unexpected XFCC {xfcc:?}"));
        assert!(
            hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()),
            "{xfcc}"
        );

        // 4: /admin is refused by ec-backend's sidecar, which says so.
        let r = curl(&format!("{ec}/admin"), &[]);
        assert_eq!(r.status, 403, "{policy}: {r:?}");
        assert!(
            r.body.starts_with(
                "RBAC: access denied by spiffe://example.org/ec-backend policy ec-backend"
            ),
            "{policy}: {:?}",
            r.body
        );

        // 5: news-web may not, even claiming to be ec-web in XFCC.
        let r = curl(&format!("{news}/data"), &["-H", FORGED_XFCC]);
        assert_eq!(r.status, 403, "{policy}: {r:?}");

        // Only GET.
        let r = curl(&format!("{ec}/data"), &["-X", "DELETE"]);
        assert_eq!(r.status, 403, "{policy}: {r:?}");

        // The normalized path is both what is checked and what is forwarded.
        let r = curl(&format!("{ec}/x/../data"), &["--path-as-is"]);
        assert_eq!(r.status, 200, "{policy}: {r:?}");
        assert_eq!(r.header("x-app-path"), Some("/data"));

        let seen = s.app.stdout();
        assert!(
            !seen.contains("/admin") && !seen.contains("DELETE"),
            "{seen}"
        );
        drop(s.pki);
    }
}

#[test]
fn keep_alive_requests_share_one_connection() {
    let s = scenario1("ec-backend.native.yaml");
    let url = format!("http://{}/data", s.ec_web.1);
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}:%{num_connects} ",
        ])
        .args([&url, "-o", "/dev/null", &url, "-o", "/dev/null"])
        .args([&url, "-o", "/dev/null"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "200:1 200:0 200:0"
    );
}

/// One sidecar for `spiffe://example.org/color` with an open policy and
/// these listeners (policy ports in brackets):
/// 0 permissive [18001] -> app, 1 strict [18002] -> app,
/// 2 permissive [18003] -> nothing listening,
/// 3 strict opaque [18004] -> banner server, 4 strict [18005] -> banner server.
struct Color {
    pki: Loopback,
    app: LocalProc,
    _banner: LocalProc,
    sidecar: Sidecar,
    listen: Vec<SocketAddr>,
}

const OPEN_POLICY: &str = "policies:
  - name: open
    action: ALLOW
    rules:
      - name: outside
        from: {unauthenticated: true}
      - name: ec-web
        from: {principals: [\"spiffe://example.org/ec-web\"]}
";

fn color() -> Color {
    let pki = Loopback::new();
    let (app, app_addr) = http_app(&pki, "color");
    let banner_addr = free_addr();
    let banner = LocalProc::spawn(
        &apps::banner_server(banner_addr.port(), "220 hello\r\n"),
        pki.dir.path(),
        "banner",
    );
    wait_listening(banner_addr);
    let policy = pki.dir.path().join("open.yaml");
    std::fs::write(&policy, OPEN_POLICY).unwrap();
    let targets = [
        (app_addr, 18001),
        (app_addr, 18002),
        (free_addr(), 18003),
        (banner_addr, 18004),
        (banner_addr, 18005),
    ];
    let listen: Vec<SocketAddr> = targets.iter().map(|_| free_addr()).collect();
    let sidecar = pki.sidecar_with("spiffe://example.org/color", |c| {
        for (i, ((t, port), l)) in targets.iter().zip(&listen).enumerate() {
            c.listeners
                .push(inbound_listener_as(&format!("in{i}"), *l, *t, *port));
        }
        c.inbound.policies = vec![policy.clone()];
        c.inbound.ports = vec![
            permissive(18001),
            PortConfig {
                mode: TlsMode::Strict,
                ..PortConfig::new(18002)
            },
            permissive(18003),
            declared(18004, DeclaredProtocol::Opaque),
        ];
        c.limits.http_header_read_timeout = Duration::from_secs(1);
        c.limits.http_response_timeout = Duration::from_secs(2);
    });
    Color {
        pki,
        app,
        _banner: banner,
        sidecar,
        listen,
    }
}

#[test]
fn permissive_and_strict_ports_in_one_sidecar() {
    let c = color();
    let (_client, outs) = client(
        &c.pki,
        "spiffe://example.org/ec-web",
        &c.listen[..2],
        "spiffe://example.org/color",
    );

    // PERMISSIVE: plaintext is served, with no identity.
    let r = curl(&format!("http://{}/p", c.listen[0]), &["-H", FORGED_XFCC]);
    assert_eq!(r.status, 200, "{r:?}\n{}", c.sidecar.logs());
    assert_eq!(r.header("x-app-xfcc"), Some("-"), "a forged XFCC passed");
    // STRICT: plaintext is refused.
    let r = curl(&format!("http://{}/s", c.listen[1]), &[]);
    assert_eq!(r.status, 0, "{r:?}");
    // mTLS works on both.
    for out in outs {
        let r = curl(&format!("http://{out}/m"), &[]);
        assert_eq!(r.status, 200, "{r:?}\n{}", c.sidecar.logs());
        assert!(
            r.header("x-app-xfcc")
                .unwrap()
                .ends_with(";URI=spiffe://example.org/ec-web")
        );
    }
    assert!(!c.app.stdout().contains("/s"));
}

#[test]
fn app_down_is_502_and_app_too_slow_is_504() {
    let c = color();
    let r = curl(&format!("http://{}/x", c.listen[2]), &[]);
    assert_eq!(r.status, 502, "{r:?}");
    let start = Instant::now();
    let r = curl(&format!("http://{}/slow", c.listen[0]), &[]);
    assert_eq!(r.status, 504, "{r:?}");
    assert!(start.elapsed() < Duration::from_millis(2900));
    let m = c.sidecar.metrics();
    for code in ["502", "504"] {
        let counted = m.lines().any(|l| {
            l.starts_with("rampart_http_requests_total{direction=\"inbound\",source_id=\"none\",")
                && l.contains(&format!("status_code=\"{code}\",status_class=\"5xx\""))
                && l.ends_with("} 1")
        });
        assert!(counted, "no {code}: {m}");
    }
}

fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Content-Length with Transfer-Encoding, in either order, on the first
/// request of a connection or after a keep-alive one, from a plaintext
/// client or from an app through the outbound sidecar: 400, and nothing of
/// it (or of what it smuggles) reaches the app.
#[test]
fn request_smuggling_is_rejected_and_nothing_forwarded() {
    let c = color();
    let (_client, outs) = client(
        &c.pki,
        "spiffe://example.org/ec-web",
        &c.listen[1..2],
        "spiffe://example.org/color",
    );
    let mut n = 0;
    for entry in [c.listen[0], outs[0]] {
        for order in [
            "Content-Length: 6\r\nTransfer-Encoding: chunked",
            "Transfer-Encoding: chunked\r\nContent-Length: 6",
        ] {
            for first in ["", "GET /benign HTTP/1.1\r\nHost: x\r\n\r\n"] {
                n += 1;
                let request = format!(
                    "{first}POST /first{n} HTTP/1.1\r\nHost: x\r\n{order}\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
                );
                let reply = raw_exchange(entry, request.as_bytes());
                let last = reply.rsplit("HTTP/1.1 ").next().unwrap_or("");
                assert!(last.starts_with("400"), "{entry}: {reply}");
                assert!(!reply.contains("/smuggled"), "{reply}");
            }
        }
    }
    let seen = c.app.stdout();
    assert!(
        !seen.contains("/first") && !seen.contains("/smuggled"),
        "{seen}"
    );
    assert!(seen.contains("/benign"), "{seen}");
}

/// Malformed heads, on a plaintext port and from an app through the
/// outbound sidecar: 400, nothing forwarded.
#[test]
fn malformed_requests_are_400_and_nothing_forwarded() {
    let c = color();
    let (_client, outs) = client(
        &c.pki,
        "spiffe://example.org/ec-web",
        &c.listen[1..2],
        "spiffe://example.org/color",
    );
    let heads = [
        // A space in a field name.
        "GET /bad1 HTTP/1.1\r\nHost: x\r\nBad Name: 1\r\n\r\n",
        // Whitespace between name and colon (RFC 9112 §5.1: MUST reject).
        "GET /bad2 HTTP/1.1\r\nHost: x\r\nX-Foo : 1\r\n\r\n",
        // A separator in a field name.
        "GET /bad3 HTTP/1.1\r\nHost: x\r\nX(y): 1\r\n\r\n",
        // A line that is not a field.
        "GET /bad4 HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
    ];
    for entry in [c.listen[0], outs[0]] {
        for head in heads {
            let reply = raw_exchange(entry, head.as_bytes());
            assert!(
                reply.starts_with("HTTP/1.1 400"),
                "{entry} {head:?}: {reply}"
            );
        }
    }
    let seen = c.app.stdout();
    assert!(!seen.contains("/bad"), "{seen}");
}

#[test]
fn slowloris_is_cut_off() {
    let c = color();
    let mut s = TcpStream::connect(c.listen[0]).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /slow-head HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let start = Instant::now();
    // One header byte every 200 ms: never a complete head.
    let cut = loop {
        std::thread::sleep(Duration::from_millis(200));
        if s.write_all(b"X").is_err() || start.elapsed() > Duration::from_secs(8) {
            break start.elapsed();
        }
        let mut probe = [0u8; 1];
        s.set_nonblocking(true).unwrap();
        let r = s.read(&mut probe);
        s.set_nonblocking(false).unwrap();
        if r.is_ok() {
            break start.elapsed();
        }
    };
    assert!(
        cut < Duration::from_secs(4),
        "connection kept open for {cut:?}"
    );
    assert!(!c.app.stdout().contains("/slow-head"));
}

#[test]
fn large_body_streams_with_flat_memory() {
    let c = color();
    let (client, outs) = client(
        &c.pki,
        "spiffe://example.org/ec-web",
        &c.listen[1..2],
        "spiffe://example.org/color",
    );
    let file = c.pki.dir.path().join("big");
    let mut f = std::fs::File::create(&file).unwrap();
    let chunk: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let mut h = 0usize;
    for _ in 0..128 {
        f.write_all(&chunk).unwrap();
        h += chunk.len();
    }
    drop(f);
    let r = curl(
        &format!("http://{}/upload", outs[0]),
        &[
            "--data-binary",
            &format!("@{}", file.display()),
            "--max-time",
            "60",
        ],
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.starts_with(&format!("{h} ")), "{}", r.body);
    for pid in [c.sidecar.pid(), client.pid()] {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let hwm: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .unwrap();
        assert!(hwm < 64 * 1024, "peak RSS {hwm} kB for a 128 MiB body");
    }
}

#[test]
fn opaque_server_speaks_first_through_two_sidecars() {
    let c = color();
    // The client side declares the first destination opaque too.
    let (_client, outs) = client_with(
        &c.pki,
        "spiffe://example.org/ec-web",
        &c.listen[3..5],
        "spiffe://example.org/color",
        |cfg| cfg.outbound.opaque_ports = vec![c.listen[3].port()],
    );
    // Declared opaque: the greeting comes at once. Undeclared: after the
    // detect timeout (1 s), still correct.
    for (out, within) in [
        (outs[0], Duration::from_millis(700)),
        (outs[1], Duration::from_secs(3)),
    ] {
        let start = Instant::now();
        let mut s = TcpStream::connect(out).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 11];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"220 hello\r\n");
        assert!(start.elapsed() < within, "{:?}", start.elapsed());
        s.write_all(b"ping").unwrap();
        let mut back = [0u8; 4];
        s.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"ping");
    }
}

#[test]
fn app_connections_reuse_one_pooled_http1_connection_between_sidecars() {
    let s = scenario1("ec-backend.native.yaml");
    for _ in 0..3 {
        let r = curl(&format!("http://{}/data", s.ec_web.1), &[]);
        assert_eq!(r.status, 200, "{r:?}");
    }
    // One mTLS connection between the sidecars carried the three app
    // connections' requests, as HTTP/1.1 (no translation).
    let m = s.backend.metrics();
    let handshakes = "rampart_tls_handshakes_total{direction=\"inbound\",result=\"ok\"} 1\n";
    assert!(m.contains(handshakes), "{m}");
    assert!(
        m.contains("rampart_detected_protocol_total{direction=\"inbound\",protocol=\"http1\"} 1\n"),
        "{m}"
    );
}

/// Panics when python3 has no grpcio (the gRPC tests are `#[ignore]`d for it).
fn require_grpcio() {
    assert!(
        apps::has_grpcio(),
        "python3 has no grpcio (pip install -r tests/requirements.txt)"
    );
}

#[test]
#[ignore = "needs python3 with grpcio (pip install -r tests/requirements.txt)"]
fn grpc_through_two_sidecars_is_authorized_per_method() {
    require_grpcio();
    let pki = Loopback::new();
    let app_addr = free_addr();
    let _app = LocalProc::spawn(&apps::grpc_server(app_addr.port()), pki.dir.path(), "grpc");
    wait_listening(app_addr);
    let policy = pki.dir.path().join("grpc.yaml");
    std::fs::write(
        &policy,
        "policies:\n  - name: greeter\n    action: ALLOW\n    rules:\n      - name: hello-only\n        from: {principals: [\"spiffe://example.org/ec-web\"]}\n        to: {paths: [/demo.Greeter/Hello]}\n",
    )
    .unwrap();
    let inbound = free_addr();
    let server = server(
        &pki,
        "spiffe://example.org/greeter",
        inbound,
        app_addr,
        &policy,
    );
    let (_client, outs) = client(
        &pki,
        "spiffe://example.org/ec-web",
        &[inbound],
        "spiffe://example.org/greeter",
    );
    let call = |method: &str| {
        let argv = apps::grpc_client(outs[0], method);
        let out = Command::new(&argv[0]).args(&argv[1..]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(
        call("/demo.Greeter/Hello"),
        "OK hello world",
        "{}",
        server.logs()
    );
    let denied = call("/demo.Greeter/Secret");
    assert!(
        denied.starts_with("ERR PERMISSION_DENIED RBAC: access denied by spiffe://example.org/greeter policy greeter"),
        "{denied}"
    );
}

/// One row of the streaming gRPC table: method, call shape, request
/// messages, and the lines the client must print (in this order).
struct GrpcCase {
    method: &'static str,
    kind: &'static str,
    messages: &'static [&'static str],
    expect: &'static [&'static str],
}

#[test]
#[ignore = "needs python3 with grpcio (pip install -r tests/requirements.txt)"]
fn grpc_streaming_calls_through_two_sidecars_keep_status_trailers_and_metadata() {
    require_grpcio();
    let pki = Loopback::new();
    let app_addr = free_addr();
    let app = LocalProc::spawn(&apps::grpc_server(app_addr.port()), pki.dir.path(), "grpc");
    wait_listening(app_addr);
    let policy = pki.dir.path().join("grpc.yaml");
    std::fs::write(
        &policy,
        "policies:\n  - name: greeter\n    action: ALLOW\n    rules:\n      - name: public\n        from: {principals: [\"spiffe://example.org/ec-web\"]}\n        to: {paths: [/demo.Greeter/Count, /demo.Greeter/CountFail, /demo.Greeter/Chat, /demo.Greeter/Fail]}\n",
    )
    .unwrap();
    let inbound = free_addr();
    let server = server_with(
        &pki,
        "spiffe://example.org/greeter",
        inbound,
        app_addr,
        &policy,
        |c| c.inbound.ports = vec![declared(app_addr.port(), DeclaredProtocol::Grpc)],
    );
    let (_client, outs) = client(
        &pki,
        "spiffe://example.org/ec-web",
        &[inbound],
        "spiffe://example.org/greeter",
    );
    const DENIED: &str = "STATUS PERMISSION_DENIED RBAC: access denied by spiffe://example.org/greeter policy greeter";
    let cases = [
        // Server-streaming: every message, then OK with the app's trailer;
        // the caller's metadata reached the app (echoed as initial metadata).
        GrpcCase {
            method: "/demo.Greeter/Count",
            kind: "server",
            messages: &["3"],
            expect: &[
                "MSG 1",
                "MSG 2",
                "MSG 3",
                "STATUS OK ",
                "INITIAL x-meta-seen from-client",
                "TRAILER x-trailer counted",
            ],
        },
        // A status after messages travels in the trailers.
        GrpcCase {
            method: "/demo.Greeter/CountFail",
            kind: "server",
            messages: &["x"],
            expect: &["MSG 1", "MSG 2", "STATUS RESOURCE_EXHAUSTED quota gone"],
        },
        // Bidirectional, ping-pong: each message is sent only after the
        // previous reply, so neither direction may be held back.
        GrpcCase {
            method: "/demo.Greeter/Chat",
            kind: "bidi",
            messages: &["a", "b", "c"],
            expect: &[
                "MSG re:a",
                "MSG re:b",
                "MSG re:c",
                "STATUS OK ",
                "TRAILER x-trailer chatted",
            ],
        },
        // An app status in a trailers-only response.
        GrpcCase {
            method: "/demo.Greeter/Fail",
            kind: "unary",
            messages: &["x"],
            expect: &["STATUS NOT_FOUND no such greeting"],
        },
        // Denied by the server's sidecar, per method, for every shape.
        GrpcCase {
            method: "/demo.Greeter/SecretCount",
            kind: "server",
            messages: &["3"],
            expect: &[DENIED],
        },
        GrpcCase {
            method: "/demo.Greeter/SecretChat",
            kind: "bidi",
            messages: &["a"],
            expect: &[DENIED],
        },
    ];
    for case in &cases {
        let argv = apps::grpc_call(outs[0], case.method, case.kind, case.messages);
        let out = Command::new(&argv[0]).args(&argv[1..]).output().unwrap();
        let printed = String::from_utf8_lossy(&out.stdout);
        // Replies in order; then the status, metadata and trailers named
        // (grpcio adds metadata of its own, which is not asserted).
        let msgs = |v: &mut dyn Iterator<Item = &str>| -> Vec<String> {
            v.filter(|l| l.starts_with("MSG"))
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(
            msgs(&mut printed.lines()),
            msgs(&mut case.expect.iter().copied()),
            "{}: {printed}\n{}",
            case.method,
            server.logs()
        );
        for e in case.expect.iter().filter(|l| !l.starts_with("MSG")) {
            assert!(
                printed.lines().any(|l| l.starts_with(e)),
                "{}: missing {e:?} in\n{printed}\n{}",
                case.method,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let seen = app.stdout();
    assert!(!seen.contains("Secret"), "{seen}");
}

#[test]
fn oversized_request_head_is_431() {
    let c = color();
    let big = format!("x-big: {}", "a".repeat(70 * 1024));
    let r = curl(&format!("http://{}/h", c.listen[0]), &["-H", &big]);
    assert_eq!(r.status, 431, "{r:?}");
}

#[test]
#[ignore = "needs python3 with grpcio (pip install -r tests/requirements.txt)"]
fn curl_h2c_and_h2_over_mtls_reach_an_http2_app() {
    require_grpcio();
    // A gRPC app is the HTTP/2 app; curl speaks gRPC framing by hand.
    let pki = Loopback::new();
    let app_addr = free_addr();
    let _app = LocalProc::spawn(&apps::grpc_server(app_addr.port()), pki.dir.path(), "grpc");
    wait_listening(app_addr);
    let policy = pki.dir.path().join("open.yaml");
    std::fs::write(&policy, OPEN_POLICY).unwrap();
    let (permissive_addr, strict) = (free_addr(), free_addr());
    let _server = pki.sidecar_with("spiffe://example.org/greeter", |c| {
        c.listeners.extend([
            inbound_listener_as("p", permissive_addr, app_addr, 18001),
            inbound_listener_as("s", strict, app_addr, 18002),
        ]);
        c.inbound.policies = vec![policy.clone()];
        c.inbound.ports = vec![permissive(18001)];
    });
    let (_client, outs) = client(
        &pki,
        "spiffe://example.org/ec-web",
        &[strict],
        "spiffe://example.org/greeter",
    );
    let svid = pki.issue("spiffe://example.org/ec-web", "curl-client");
    let (cert, key) = (svid.join("svid.pem"), svid.join("svid.key"));
    let frame = pki.dir.path().join("frame");
    std::fs::write(&frame, b"\0\0\0\0\x01x").unwrap();
    let from_ec_web = |xfcc: &str| {
        xfcc.starts_with("By=spiffe://example.org/greeter;Hash=")
            && xfcc.ends_with(";URI=spiffe://example.org/ec-web")
    };
    let tls_args = [
        "--http2",
        "-k",
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ];
    /// Name, URL base, curl arguments, and what the app must see as XFCC.
    type Case<'a> = (&'a str, String, &'a [&'a str], &'a dyn Fn(&str) -> bool);
    let cases: [Case; 3] = [
        (
            "h2c to a permissive port: no identity",
            format!("http://{permissive_addr}"),
            &["--http2-prior-knowledge"],
            &|x| x == "-",
        ),
        (
            "h2c through the outbound sidecar",
            format!("http://{}", outs[0]),
            &["--http2-prior-knowledge"],
            &from_ec_web,
        ),
        (
            "h2 over mTLS with curl's own SVID to a strict port",
            format!("https://{strict}"),
            &tls_args,
            &from_ec_web,
        ),
    ];
    for (name, base, args, xfcc_ok) in cases {
        let head = pki.dir.path().join("head");
        let out = Command::new("curl")
            .args(["-s", "--max-time", "10", "-o", "-", "-D"])
            .arg(&head)
            .args(["-w", "%{stderr}%{http_version}"])
            .args(args)
            .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
            .arg("--data-binary")
            .arg(format!("@{}", frame.display()))
            .arg(format!("{base}/demo.Greeter/Whoami"))
            .output()
            .unwrap();
        let head = std::fs::read_to_string(&head).unwrap_or_default();
        assert_eq!(String::from_utf8_lossy(&out.stderr), "2", "{name}: {head}");
        assert!(head.starts_with("HTTP/2 200"), "{name}: {head}");
        // The status arrives in the trailers, after the message.
        assert!(head.contains("grpc-status: 0"), "{name}: {head}");
        let body = out.stdout.get(5..).unwrap_or_default();
        let xfcc = String::from_utf8_lossy(body);
        assert!(xfcc_ok(&xfcc), "{name}: XFCC {xfcc:?}");
    }
}

#[test]
fn chunked_upload_through_two_sidecars() {
    let c = color();
    let (_client, outs) = client(
        &c.pki,
        "spiffe://example.org/ec-web",
        &c.listen[1..2],
        "spiffe://example.org/color",
    );
    let file = c.pki.dir.path().join("chunked");
    let data: Vec<u8> = (0..3_000_017u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&file, &data).unwrap();
    let sum = Command::new("sha256sum").arg(&file).output().unwrap();
    let sum = String::from_utf8_lossy(&sum.stdout);
    let sum = sum.split(' ').next().unwrap();
    let r = curl(
        &format!("http://{}/upload", outs[0]),
        &[
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            &format!("@{}", file.display()),
        ],
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, format!("{} {sum}", data.len()));
}

#[test]
fn drain_lets_in_flight_requests_finish() {
    let mut c = color();
    let (_client, outs) = client(
        &c.pki,
        "spiffe://example.org/ec-web",
        &c.listen[1..2],
        "spiffe://example.org/color",
    );
    // A stream of requests: several in flight on the pooled HTTP/2
    // connection when SIGTERM comes; none may fail.
    let in_flight: Vec<_> = (0..4)
        .map(|i| {
            let url = format!("http://{}/pause{i}", outs[0]);
            std::thread::spawn(move || curl(&url, &[]))
        })
        .collect();
    // Poll until the app has them all, then ask the sidecar to stop.
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.app.stdout().matches("/pause").count() < 4 {
        assert!(Instant::now() < deadline, "requests never reached the app");
        std::thread::sleep(Duration::from_millis(10));
    }
    let killed = Command::new("kill")
        .args(["-TERM", &c.sidecar.pid().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    for (i, t) in in_flight.into_iter().enumerate() {
        let r = t.join().unwrap();
        assert_eq!(r.status, 200, "{r:?}\n{}", c.sidecar.logs());
        assert_eq!(r.body, format!("color /pause{i}"));
    }
    // Then the process exits by itself, with 0.
    let status = c.sidecar.wait_exit(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        c.sidecar.logs()
    );
    assert!(c.sidecar.logs().contains("drained"), "{}", c.sidecar.logs());
}

/// A tunnel app behind a sidecar for `spiffe://example.org/tunnel` whose
/// policy lets ec-web upgrade `GET /ws` and `CONNECT db.internal:5432`
/// only, and an ec-web client sidecar in front of it.
struct Tunnels {
    _pki: Loopback,
    app: LocalProc,
    server: Sidecar,
    client: Sidecar,
    out: SocketAddr,
}

const TUNNEL_POLICY: &str = "policies:
  - name: tunnels
    action: ALLOW
    rules:
      - name: websocket
        from: {principals: [\"spiffe://example.org/ec-web\"]}
        to: {methods: [GET], paths: [/ws]}
      - name: connect-db
        from: {principals: [\"spiffe://example.org/ec-web\"]}
        to: {methods: [CONNECT], hosts: [\"db.internal:5432\"]}
";

fn tunnels() -> Tunnels {
    let pki = Loopback::new();
    let app_addr = free_addr();
    let app = LocalProc::spawn(&apps::tunnel_app(app_addr.port()), pki.dir.path(), "tunnel");
    wait_listening(app_addr);
    let policy = pki.dir.path().join("tunnels.yaml");
    std::fs::write(&policy, TUNNEL_POLICY).unwrap();
    let inbound = free_addr();
    let server = server(
        &pki,
        "spiffe://example.org/tunnel",
        inbound,
        app_addr,
        &policy,
    );
    let (client, outs) = client(
        &pki,
        "spiffe://example.org/ec-web",
        &[inbound],
        "spiffe://example.org/tunnel",
    );
    Tunnels {
        _pki: pki,
        app,
        server,
        client,
        out: outs[0],
    }
}

/// Reads a response head (through the blank line) byte by byte, so that
/// nothing after it is consumed.
fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// The RFC 6455 §1.3 sample key and the accept value it must produce.
const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const WS_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

fn ws_handshake(addr: SocketAddr, path: &str) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: chat.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n{FORGED_XFCC}\r\n\r\n"
    )
    .unwrap();
    let head = read_head(&mut s);
    (s, head)
}

/// Sends one masked text frame (clients must mask, RFC 6455 §5.3).
fn ws_send(s: &mut TcpStream, payload: &[u8]) {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut f = vec![0x81];
    if payload.len() < 126 {
        f.push(0x80 | payload.len() as u8);
    } else {
        f.push(0x80 | 126);
        f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    s.write_all(&f).unwrap();
}

/// Reads one unmasked server text frame's payload.
fn ws_recv(s: &mut TcpStream) -> Vec<u8> {
    let mut head = [0u8; 2];
    s.read_exact(&mut head).unwrap();
    assert_eq!(head[0], 0x81, "not a final text frame");
    let mut len = usize::from(head[1] & 0x7f);
    if len == 126 {
        let mut ext = [0u8; 2];
        s.read_exact(&mut ext).unwrap();
        len = usize::from(u16::from_be_bytes(ext));
    }
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).unwrap();
    payload
}

#[test]
fn websocket_round_trip_through_two_sidecars_with_half_close() {
    let t = tunnels();
    let (mut s, head) = ws_handshake(t.out, "/ws");
    assert!(
        head.starts_with("HTTP/1.1 101"),
        "{head}\n{}\n{}",
        t.client.logs(),
        t.server.logs()
    );
    let accept = head
        .lines()
        .find_map(|l| l.strip_prefix("sec-websocket-accept: "))
        .or_else(|| {
            head.lines()
                .find_map(|l| l.strip_prefix("Sec-WebSocket-Accept: "))
        });
    assert_eq!(accept, Some(WS_ACCEPT), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: websocket"),
        "{head}"
    );

    ws_send(&mut s, b"hello");
    assert_eq!(ws_recv(&mut s), b"echo:hello");
    // Past 125 bytes, frames carry a 16-bit length.
    let longer = vec![b'x'; 300];
    ws_send(&mut s, &longer);
    assert_eq!(ws_recv(&mut s), [b"echo:".as_slice(), &longer].concat());
    // Half-close: the app still gets to answer after the client's FIN,
    // through both sidecars, then closes.
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(ws_recv(&mut s), b"bye");
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{rest:?}");

    // The app saw the upgrade with the verified caller's XFCC, not the forged one.
    let seen = t.app.stdout();
    let line = seen
        .lines()
        .find(|l| l.starts_with("GET /ws HTTP/1.1"))
        .unwrap_or_else(|| panic!("{seen}"));
    assert!(
        line.contains("xfcc=By=spiffe://example.org/tunnel;Hash=")
            && line.ends_with(";URI=spiffe://example.org/ec-web"),
        "{line}"
    );

    // Denied by policy: 403 from the server's sidecar; the app sees nothing.
    let (_s, head) = ws_handshake(t.out, "/not-ws");
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert!(!t.app.stdout().contains("/not-ws"));
}

#[test]
fn connect_is_tunneled_to_the_destination_and_authorized() {
    let t = tunnels();
    // curl through the outbound sidecar as its proxy: CONNECT, then an
    // HTTP request inside the tunnel, answered by the app (the proxy).
    let out = Command::new("curl")
        .args(["-s", "--max-time", "10", "--proxytunnel", "-x"])
        .arg(format!("http://{}", t.out))
        .arg("http://db.internal:5432/hello")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "tunneled to db.internal:5432: GET /hello HTTP/1.1",
        "{}\n{}",
        t.client.logs(),
        t.server.logs()
    );
    assert!(
        t.app.stdout().lines().any(|l| l
            .starts_with("CONNECT db.internal:5432 HTTP/1.1 xfcc=By=spiffe://example.org/tunnel;")),
        "{}",
        t.app.stdout()
    );

    // Raw bytes both ways, with half-close.
    let mut s = TcpStream::connect(t.out).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n\r\n")
        .unwrap();
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        !head.to_ascii_lowercase().contains("content-length"),
        "{head}"
    );
    s.write_all(b"ping").unwrap();
    let mut back = [0u8; 4];
    s.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"ping");
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = String::new();
    s.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "<eof:db.internal:5432>");

    // Another target is refused by the server's sidecar, before the app.
    let mut s = TcpStream::connect(t.out).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"CONNECT other.internal:443 HTTP/1.1\r\nHost: other.internal:443\r\n\r\n")
        .unwrap();
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert!(!t.app.stdout().contains("other.internal"));
    // A plain request on the same port is not a tunnel and not allowed.
    let r = curl(&format!("http://{}/plain", t.out), &[]);
    assert_eq!(r.status, 403, "{r:?}");
}

/// A sidecar for `spiffe://example.org/color` with an open policy and
/// `listeners` inbound listeners to the HTTP app, `limits` as given, and
/// an ec-web client sidecar with one outbound listener to each and
/// `client_limits`.
struct Limited {
    _pki: Loopback,
    app: LocalProc,
    server: Sidecar,
    client: Sidecar,
    outs: Vec<SocketAddr>,
}

fn limited(
    listeners: usize,
    limits: impl FnOnce(&mut Limits),
    client_limits: impl FnOnce(&mut Limits),
) -> Limited {
    let pki = Loopback::new();
    let (app, app_addr) = http_app(&pki, "color");
    let policy = pki.dir.path().join("open.yaml");
    std::fs::write(&policy, OPEN_POLICY).unwrap();
    let inbound: Vec<SocketAddr> = (0..listeners).map(|_| free_addr()).collect();
    let server = pki.sidecar_with("spiffe://example.org/color", |c| {
        for (i, l) in inbound.iter().enumerate() {
            c.listeners
                .push(inbound_listener_as(&format!("in{i}"), *l, app_addr, 18001));
        }
        c.inbound.policies = vec![policy.clone()];
        c.inbound.ports = vec![permissive(18001)];
        limits(&mut c.limits);
    });
    let (client, outs) = client_with(
        &pki,
        "spiffe://example.org/ec-web",
        &inbound,
        "spiffe://example.org/color",
        |c| client_limits(&mut c.limits),
    );
    Limited {
        _pki: pki,
        app,
        server,
        client,
        outs,
    }
}

/// The value of a metric line `name{labels} value`, 0 when absent.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn pooled_connection_cap_waits_then_answers_503() {
    // One pooled connection at most; a second destination waits up to the
    // connect timeout (1 s) for it to close (idle after 2 s), so the first
    // try is 503 and a later one gets the freed slot.
    let l = limited(
        2,
        |_| {},
        |c| {
            c.http_pool_max_connections = 1;
            c.http_pool_idle_timeout = Duration::from_secs(2);
            c.connect_timeout = Duration::from_secs(1);
        },
    );
    let r = curl(&format!("http://{}/a", l.outs[0]), &[]);
    assert_eq!(r.status, 200, "{r:?}");
    let r = curl(&format!("http://{}/b", l.outs[1]), &[]);
    assert_eq!(r.status, 503, "{r:?}\n{}", l.client.logs());
    assert!(
        l.client.logs().contains("pooled connection limit reached"),
        "{}",
        l.client.logs()
    );
    let m = l.client.metrics();
    assert_eq!(
        metric(
            &m,
            "rampart_http_local_responses_total{direction=\"outbound\",reason=\"pool_full\"}"
        ),
        1.0,
        "{m}"
    );
    assert!(!l.app.stdout().contains("/b"));
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = curl(&format!("http://{}/b", l.outs[1]), &[]);
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 503, "{r:?}");
        assert!(Instant::now() < deadline, "the slot was never freed");
    }
    // The first destination's connection was the one that went away.
    let m = l.server.metrics();
    assert_eq!(
        metric(
            &m,
            "rampart_tls_handshakes_total{direction=\"inbound\",result=\"ok\"}"
        ),
        2.0,
        "{m}"
    );
}

#[test]
fn idle_pooled_connections_are_closed_but_not_while_a_request_is_in_flight() {
    let l = limited(
        1,
        |_| {},
        |c| c.http_pool_idle_timeout = Duration::from_secs(1),
    );
    let handshakes = |l: &Limited| {
        metric(
            &l.server.metrics(),
            "rampart_tls_handshakes_total{direction=\"inbound\",result=\"ok\"}",
        )
    };
    let open = |l: &Limited| {
        metric(
            &l.server.metrics(),
            "rampart_tcp_connections_active{direction=\"inbound\"}",
        )
    };
    // A 3 s response on the pooled connection outlives the client pool's
    // 1 s idle timeout: the connection has a request in flight, so it
    // stays, and the next request still uses it.
    let r = curl(&format!("http://{}/slow", l.outs[0]), &[]);
    assert_eq!(r.status, 200, "{r:?}");
    let r = curl(&format!("http://{}/data", l.outs[0]), &[]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(handshakes(&l), 1.0);
    // Then, with no request, it is closed.
    let deadline = Instant::now() + Duration::from_secs(10);
    while open(&l) != 0.0 {
        assert!(
            Instant::now() < deadline,
            "idle connection kept open\n{}",
            l.server.metrics()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The next request opens a new one.
    let r = curl(&format!("http://{}/data", l.outs[0]), &[]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(handshakes(&l), 2.0);
}

#[test]
fn response_timeout_starts_when_the_upload_ends() {
    // 2 s response timeout on both sidecars; an upload that takes 3 s to a
    // healthy app is answered, while an app that then stays silent (3 s)
    // gets 504. Each gap of the upload (300 ms) stays far below the
    // timeout, which also bounds an upload's silences, so a loaded machine
    // cannot turn a moving upload into a stalled one.
    let timeout = Duration::from_secs(2);
    let l = limited(
        1,
        |c| c.http_response_timeout = timeout,
        |c| c.http_response_timeout = timeout,
    );
    let body = b"0123456789";
    let mut s = TcpStream::connect(l.outs[0]).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    for b in body {
        std::thread::sleep(Duration::from_millis(300));
        s.write_all(&[*b]).unwrap();
    }
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(
        reply.ends_with(" 84d89877f0d4041efb6bf91a16f0248f2fd573e6af05c19f96bedb9f882f7882"),
        "{reply}"
    );
    let r = curl(&format!("http://{}/slow", l.outs[0]), &[]);
    assert_eq!(r.status, 504, "{r:?}");
    // An upload that stops moving is still cut off: 408.
    let mut s = TcpStream::connect(l.outs[0]).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"POST /stalled HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n01")
        .unwrap();
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
}
