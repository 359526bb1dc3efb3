//! The inbound HTTP boundary (issue 19, part A), end to end through real
//! sidecars on loopback: no identity header the sidecar did not set
//! reaches an app, whatever the client does to the detector (F1, a table
//! of triggers and a property test over random request prefixes);
//! CONNECT and upgrades need a rule naming their method (F2); header
//! timeouts from the first byte (F4); strict heads and framing (F5-F7);
//! keep-alive and pre-opened connections that fit real clients (R3, R4).
//!
//! The app is a recorder: it logs every byte it receives (Python `repr`,
//! one line per read) and answers each complete HTTP/1.1 request `200 ok`,
//! so a test asserts on exactly what reached the app.

use crate::support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use rampart_app::config::PortConfig;
use rampart_proxy::config::{Limits, TlsMode};
use support::apps;
use support::sidecar::{
    LocalProc, Loopback, Sidecar, free_addr, inbound_listener, inbound_listener_as, wait_listening,
};

/// The forged identity every test sends; the sidecar's own XFCC never
/// contains it.
const FORGED: &str = "FORGEDID";

const RECORDER: &str = r#"
import re, socket, sys, threading
port = int(sys.argv[1])
def complete(buf):
    i = buf.find(b"\r\n\r\n")
    if i < 0:
        return None
    head, pos = buf[:i].lower(), i + 4
    if b"transfer-encoding: chunked" in head:
        while True:
            j = buf.find(b"\r\n", pos)
            if j < 0:
                return None
            size, pos = int(buf[pos:j].split(b";")[0], 16), j + 2
            if size == 0:
                while True:
                    k = buf.find(b"\r\n", pos)
                    if k < 0:
                        return None
                    line, pos = buf[pos:k], k + 2
                    if not line:
                        return pos
            if len(buf) < pos + size + 2:
                return None
            pos += size + 2
    m = re.search(rb"content-length:\s*(\d+)", head)
    n = int(m.group(1)) if m else 0
    return pos + n if len(buf) >= pos + n else None
def serve(conn):
    buf = b""
    with conn:
        try:
            while data := conn.recv(65536):
                print(repr(data), flush=True)
                buf += data
                while (end := complete(buf)) is not None:
                    buf = buf[end:]
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        except (OSError, ValueError):
            pass
srv = socket.create_server(("127.0.0.1", port), backlog=128)
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"#;

/// A real, lenient HTTP server (Python's `http.server`, which splits the
/// request line on any whitespace, Latin-1 NBSP and NEL included): it
/// prints each request it parsed with every header as a WSGI server maps
/// it (`_` and `-` alike, any case), and answers `200 ok`.
const PARSING_APP: &str = r#"
import sys
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def __getattr__(self, name):
        if name.startswith("do_"):
            return self.reply
        raise AttributeError(name)
    def reply(self):
        fields = ["%s=%s" % (k.lower().replace("_", "-"), v) for k, v in self.headers.items()]
        print("REQ", self.command, self.path[:24], " ".join(fields), flush=True)
        n = int(self.headers.get("content-length") or 0)
        if n:
            self.rfile.read(n)
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;

/// A policy that admits the peer at connection level (the issue's F1
/// precondition): plaintext clients and ec-web, any method, any path.
const OPEN_POLICY: &str = "policies:
  - name: open
    action: ALLOW
    rules:
      - name: outside
        from: {unauthenticated: true}
      - name: ec-web
        from: {principals: [\"spiffe://example.org/ec-web\"]}
";

/// An HTTP-conditioned policy: only `/ok/...` from ec-web or plaintext.
const PATH_POLICY: &str = "policies:
  - name: paths
    action: ALLOW
    rules:
      - name: ok
        from: {unauthenticated: true}
        to: {paths: [\"/ok/*\"]}
      - name: ec-web
        from: {principals: [\"spiffe://example.org/ec-web\"]}
        to: {paths: [\"/ok/*\"]}
";

/// The recorder behind a sidecar for `spiffe://example.org/edge` with two
/// inbound listeners on `detect` ports (0: PERMISSIVE, plaintext served
/// directly; 1: STRICT), and an ec-web client sidecar whose one outbound
/// listener (`out`) leads to listener 1.
struct Edge {
    pki: Loopback,
    app: LocalProc,
    server: Sidecar,
    _client: Sidecar,
    plain: SocketAddr,
    out: SocketAddr,
}

fn edge(policy: &str, limits: impl Fn(&mut Limits)) -> Edge {
    edge_with(RECORDER, policy, limits)
}

/// [`edge`] with another app script (its one argument: the port).
fn edge_with(app: &str, policy: &str, limits: impl Fn(&mut Limits)) -> Edge {
    let pki = Loopback::new();
    let app_addr = free_addr();
    let python = apps::python().expect("python3 is installed");
    let argv = [python, "-u".into(), "-c".into(), app.into()]
        .into_iter()
        .chain([app_addr.port().to_string()])
        .collect::<Vec<_>>();
    let app = LocalProc::spawn(&argv, pki.dir.path(), "recorder");
    wait_listening(app_addr);
    let policy_file = pki.dir.path().join("policy.yaml");
    std::fs::write(&policy_file, policy).unwrap();
    let (plain, strict) = (free_addr(), free_addr());
    let server = pki.sidecar_with("spiffe://example.org/edge", |c| {
        c.listeners
            .push(inbound_listener_as("p", plain, app_addr, 18101));
        c.listeners
            .push(inbound_listener_as("s", strict, app_addr, 18102));
        c.inbound.policies = vec![policy_file.clone()];
        c.inbound.ports = vec![PortConfig {
            mode: TlsMode::PermissiveAllowPlaintext,
            ..PortConfig::new(18101)
        }];
        limits(&mut c.limits);
    });
    let (client, outs) = pki.outbound_sidecar_with(
        "spiffe://example.org/ec-web",
        &[strict],
        "spiffe://example.org/edge",
        |c| limits(&mut c.limits),
    );
    Edge {
        pki,
        app,
        server,
        _client: client,
        plain,
        out: outs[0],
    }
}

/// Limits with the header read timeout `secs` seconds.
fn header_timeout(secs: u64) -> impl Fn(&mut Limits) {
    move |l| l.http_header_read_timeout = Duration::from_secs(secs)
}

/// What a client sends: bytes, or a pause.
#[derive(Debug, Clone)]
enum Send {
    Bytes(Vec<u8>),
    Pause(Duration),
}

/// Sends `parts` on a fresh connection and returns the response that came
/// back (within 5 s; empty when the connection closed without one). No
/// half-close: hyper closes a connection whose client half-closed.
fn exchange(addr: SocketAddr, parts: &[Send]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for p in parts {
        match p {
            // A write may fail once the sidecar has refused and closed.
            Send::Bytes(b) => {
                if s.write_all(b).is_err() {
                    break;
                }
            }
            Send::Pause(d) => std::thread::sleep(*d),
        }
    }
    read_response(&mut s)
}

fn bytes(s: impl AsRef<[u8]>) -> Send {
    Send::Bytes(s.as_ref().to_vec())
}

/// One row of the F1 table: a trigger, and whether hyper takes the
/// request (the app then gets it, without the forged header) or refuses
/// it (the app gets nothing).
struct Trigger {
    name: &'static str,
    parts: Vec<Send>,
    reaches_app: bool,
}

fn triggers(tag: &str) -> Vec<Trigger> {
    let xfcc = format!("X-Forwarded-Client-Cert: By=spiffe://example.org/edge;URI={FORGED}");
    let rest = |line: &str| format!("{line}\r\nHost: edge\r\n{xfcc}\r\n\r\n");
    let long = "a".repeat(9 * 1024);
    vec![
        Trigger {
            name: "leading CRLF",
            parts: vec![bytes(format!(
                "\r\n{}",
                rest(&format!("GET /{tag}1 HTTP/1.1"))
            ))],
            reaches_app: true,
        },
        Trigger {
            name: "request line over 8 KiB",
            parts: vec![bytes(rest(&format!("GET /{tag}2?{long} HTTP/1.1")))],
            reaches_app: true,
        },
        Trigger {
            name: "first byte, then silence beyond detect_timeout",
            parts: vec![
                bytes("G"),
                Send::Pause(Duration::from_millis(1500)),
                bytes(rest(&format!("ET /{tag}3 HTTP/1.1"))),
            ],
            reaches_app: true,
        },
        Trigger {
            name: "HTTP/1.2",
            parts: vec![bytes(rest(&format!("GET /{tag}4 HTTP/1.2")))],
            reaches_app: false,
        },
        Trigger {
            name: "lower-case method",
            parts: vec![bytes(rest(&format!("get /{tag}5 HTTP/1.1")))],
            reaches_app: true,
        },
        Trigger {
            name: "tabs",
            parts: vec![bytes(rest(&format!("GET\t/{tag}6\tHTTP/1.1")))],
            reaches_app: false,
        },
        Trigger {
            name: "underscore spelling",
            parts: vec![bytes(format!(
                "GET /{tag}7 HTTP/1.1\r\nHost: edge\r\nX_Forwarded_Client_Cert: {FORGED}\r\nx-forwarded_client-cert: {FORGED}\r\n\r\n"
            ))],
            reaches_app: true,
        },
        Trigger {
            name: "HTTP/1.1 chunked trailer (HTTP/2 trailers between the sidecars)",
            parts: vec![bytes(format!(
                "POST /{tag}8 HTTP/1.1\r\nHost: edge\r\nTransfer-Encoding: chunked\r\nTrailer: x-forwarded-client-cert, x_forwarded_client_cert\r\n\r\n3\r\nabc\r\n0\r\n{xfcc}\r\nx_forwarded_client_cert: {FORGED}\r\n\r\n"
            ))],
            reaches_app: true,
        },
        // Found by the property test: HTTP/0.9's form, after which
        // Python's `http.server` still reads header fields.
        Trigger {
            name: "no version (HTTP/0.9)",
            parts: vec![bytes(rest(&format!("GET /{tag}9")))],
            reaches_app: false,
        },
    ]
}

/// F1: every trigger of the issue, on a PERMISSIVE port straight from a
/// plaintext client and through the client sidecar (mTLS), with a policy
/// that admits the peer at connection level. Parsed by hyper or refused;
/// never spliced with the client's headers.
#[test]
fn forged_identity_headers_never_reach_the_app_whatever_the_detector_is_fed() {
    let e = edge(OPEN_POLICY, header_timeout(4));
    for (entry, via) in [(e.plain, "plaintext"), (e.out, "mesh")] {
        let tag = format!("row-{via}-");
        for t in triggers(&tag) {
            let reply = exchange(entry, &t.parts);
            let n = t.name;
            if t.reaches_app {
                assert!(
                    reply.starts_with("HTTP/1.1 200"),
                    "{via}, {n}: {reply}\n{}",
                    e.server.logs()
                );
            } else {
                assert!(
                    reply.is_empty()
                        || reply.starts_with("HTTP/1.1 4")
                        || reply.starts_with("HTTP/1.1 505"),
                    "{via}, {n}: {reply}"
                );
            }
        }
        let seen = e.app.stdout();
        for (i, t) in triggers(&tag).iter().enumerate() {
            let path = format!("/{tag}{}", i + 1);
            assert_eq!(
                seen.contains(&path),
                t.reaches_app,
                "{via}, {}: the app saw:\n{seen}",
                t.name
            );
        }
        assert!(
            !seen.to_ascii_uppercase().contains(FORGED),
            "{via}: a forged identity reached the app:\n{seen}"
        );
    }
    // The verified caller's XFCC is still set on the mesh path.
    let seen = e.app.stdout();
    assert!(
        seen.contains("x-forwarded-client-cert: By=spiffe://example.org/edge;Hash="),
        "{seen}"
    );
}

/// F1's property: random request prefixes (leading whitespace, methods in
/// any case, separators servers disagree on, versions, line ends, the
/// identity header spelled any way, pauses across the detect timeout)
/// never deliver the forged identity to an app that parses HTTP as
/// leniently as Python's `http.server`.
#[test]
fn random_request_prefixes_never_deliver_a_forged_identity() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    let e = edge_with(PARSING_APP, OPEN_POLICY, header_timeout(2));
    // Byte strings: 0xa0 and 0x85 are single Latin-1 bytes, which some
    // servers split words on.
    type B = &'static [u8];
    let bs = |v: &[B]| v.to_vec();
    let lead = prop::sample::select::<B>(bs(&[
        b"",
        b"",
        b"",
        b"\r\n",
        b"\n",
        b" ",
        b"\t",
        b"\r\n\r\n",
        b"\x0b",
        b"\xa0",
    ]));
    let method = prop::sample::select::<B>(bs(&[
        b"GET", b"get", b"Get", b"POST", b"pOsT", b"PRI", b"CONNECT", b"X-Y",
    ]));
    let sep = prop::sample::select::<B>(bs(&[
        b" ", b" ", b" ", b" ", b"\t", b"  ", b"\x0c", b"\x1f", b"\xa0", b"\x85",
    ]));
    let version = prop::sample::select::<B>(bs(&[
        b"HTTP/1.1",
        b"HTTP/1.1",
        b"HTTP/1.1",
        b"HTTP/1.0",
        b"HTTP/1.2",
        b"HTTP/2.0",
        b"HTTP/0.9",
        b"http/1.1",
        b"HTTP/1.1 ",
        b"",
    ]));
    let eol = prop::sample::select::<B>(bs(&[b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r"]));
    let name = (any::<[bool; 23]>(), any::<[bool; 3]>()).prop_map(|(upper, under)| {
        let mut n: Vec<u8> = b"x-forwarded-client-cert".to_vec();
        for (b, up) in n.iter_mut().zip(upper) {
            if up {
                b.make_ascii_uppercase();
            }
        }
        for (dash, u) in [1, 11, 18].into_iter().zip(under) {
            if u {
                n[dash] = b'_';
            }
        }
        n
    });
    let target_len = 0usize..10_000;
    let pause = prop::sample::select(vec![0u64, 0, 0, 0, 0, 1200]);
    let strategy = (
        lead,
        method,
        sep,
        target_len,
        version,
        eol,
        name,
        pause,
        any::<bool>(),
    );
    let mut runner = TestRunner::new(Config {
        cases: 64,
        failure_persistence: None,
        ..Config::default()
    });
    let plain = e.plain;
    let out = e.out;
    let case = std::cell::Cell::new(0u32);
    runner
        .run(
            &strategy,
            |(lead, method, sep, len, version, eol, name, pause, mesh)| {
                case.set(case.get() + 1);
                let case = case.get();
                let target = format!("/p{case}?{}", "a".repeat(len));
                let mut bytes = Vec::new();
                for part in [lead, method, sep, target.as_bytes(), sep, version, eol] {
                    bytes.extend_from_slice(part);
                }
                for part in [
                    b"Host: edge".as_slice(),
                    eol,
                    &name,
                    b": ",
                    FORGED.as_bytes(),
                    eol,
                    eol,
                ] {
                    bytes.extend_from_slice(part);
                }
                let split = 1.min(bytes.len());
                let parts = [
                    Send::Bytes(bytes[..split].to_vec()),
                    Send::Pause(Duration::from_millis(pause)),
                    Send::Bytes(bytes[split..].to_vec()),
                ];
                exchange(if mesh { out } else { plain }, &parts);
                Ok(())
            },
        )
        .unwrap();
    let seen = e.app.stdout();
    assert!(
        !seen.to_ascii_uppercase().contains(FORGED),
        "a forged identity reached the app:\n{seen}"
    );
    // Not vacuous: some of the requests were served.
    assert!(seen.contains("REQ "), "no request reached the app:\n{seen}");
}

/// Reads one response (head, then a `content-length` body) from `s`.
fn read_response(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => return String::from_utf8_lossy(&head).into_owned(),
        }
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let len = text
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    let _ = s.read_exact(&mut body);
    text + &String::from_utf8_lossy(&body)
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// F4: a client that sends a first byte and then one byte at a time never
/// completes its head: it is cut off at the header read timeout (counted
/// from the first byte; at most the detect timeout more while the detector
/// waits on the undecided prefix), and the app sees nothing. Today's main
/// turned it into an opaque tunnel after the detect timeout, held for as
/// long as the client kept sending.
#[test]
fn slowloris_from_the_first_byte_is_cut_off_on_detect_ports() {
    let e = edge(OPEN_POLICY, header_timeout(2));
    for (entry, via) in [(e.plain, "plaintext"), (e.out, "mesh")] {
        let mut s = connect(entry);
        let start = Instant::now();
        let cut = loop {
            if s.write_all(b"G").is_err() || start.elapsed() > Duration::from_secs(10) {
                break start.elapsed();
            }
            std::thread::sleep(Duration::from_millis(200));
            s.set_nonblocking(true).unwrap();
            let mut probe = [0u8; 64];
            let r = s.read(&mut probe);
            s.set_nonblocking(false).unwrap();
            // EOF or a reset: the sidecar closed it.
            if matches!(r, Ok(0))
                || r.as_ref()
                    .is_err_and(|e| e.kind() != std::io::ErrorKind::WouldBlock)
            {
                break start.elapsed();
            }
        };
        assert!(
            cut < Duration::from_millis(3800),
            "{via}: connection held for {cut:?}"
        );
    }
    let seen = e.app.stdout();
    assert!(!seen.contains("GG"), "the app got the slow bytes:\n{seen}");
}

/// F5 and F7: two `Host` fields, a `Host` that disagrees with an
/// absolute-form target, and malformed chunked framing are 400 (the last
/// was 502), on a plaintext port and through the client sidecar; and
/// `Connection` cannot take away the request ID the sidecar sets.
#[test]
fn ambiguous_heads_and_broken_framing_are_400() {
    let e = edge(OPEN_POLICY, |_| {});
    let plain_only = [
        (
            "duplicate Host",
            "GET /f5a HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        ),
        (
            "Host against an absolute-form target",
            "GET http://a/f5b HTTP/1.1\r\nHost: b\r\n\r\n",
        ),
    ];
    for (name, req) in plain_only {
        let reply = exchange(e.plain, &[bytes(req)]);
        assert!(reply.starts_with("HTTP/1.1 400"), "{name}: {reply}");
    }
    // The same target and Host agree: served.
    let reply = exchange(
        e.plain,
        &[bytes("GET http://edge/f5c HTTP/1.1\r\nHost: edge\r\n\r\n")],
    );
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    let broken = "POST /f7-broken HTTP/1.1\r\nHost: edge\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n\r\n";
    for (entry, via) in [(e.plain, "plaintext"), (e.out, "mesh")] {
        let reply = exchange(entry, &[bytes(broken)]);
        assert!(
            reply.starts_with("HTTP/1.1 400"),
            "{via}: {reply}\n{}",
            e.server.logs()
        );
        let reply = exchange(
            entry,
            &[bytes(format!(
                "GET /f7-{via} HTTP/1.1\r\nHost: edge\r\nConnection: close, x-request-id\r\n\r\n"
            ))],
        );
        assert!(reply.starts_with("HTTP/1.1 200"), "{via}: {reply}");
    }
    let seen = e.app.stdout();
    assert!(!seen.contains("/f5a") && !seen.contains("/f5b"), "{seen}");
    assert!(seen.contains("/f5c"), "{seen}");
    for via in ["plaintext", "mesh"] {
        let line = seen
            .lines()
            .find(|l| l.contains(&format!("/f7-{via} ")))
            .unwrap_or_else(|| panic!("{via}: {seen}"));
        assert!(
            line.contains("x-request-id: "),
            "{via}: no request ID in {line}"
        );
    }
}

/// R3: an idle keep-alive connection outlives the header read timeout (the
/// idle timeout is its own setting, minutes by default): a client that
/// sends its next request after it is served on the same connection, by
/// the client sidecar and on a plaintext port alike.
#[test]
fn keep_alive_connections_outlive_the_header_read_timeout() {
    let e = edge(OPEN_POLICY, header_timeout(1));
    for (entry, via) in [(e.plain, "plaintext"), (e.out, "mesh")] {
        let mut s = connect(entry);
        for i in 0..2 {
            write!(s, "GET /r3-{via}-{i} HTTP/1.1\r\nHost: edge\r\n\r\n").unwrap();
            let reply = read_response(&mut s);
            assert!(reply.starts_with("HTTP/1.1 200"), "{via} #{i}: {reply:?}");
            std::thread::sleep(Duration::from_millis(2500));
        }
    }
}

/// R4: a connection opened ahead of its first request (as client pools do)
/// and silent past the detect timeout and the header read timeout is
/// served as HTTP when the request comes, also when the port's policy asks
/// for HTTP (it admits no opaque connection): a 200 or a 403, never a
/// closed connection without an answer.
#[test]
fn pre_opened_silent_connections_are_served_as_http_when_their_request_comes() {
    let e = edge(PATH_POLICY, header_timeout(1));
    for (entry, via) in [(e.plain, "plaintext"), (e.out, "mesh")] {
        let mut ok = connect(entry);
        let mut denied = connect(entry);
        std::thread::sleep(Duration::from_millis(2500));
        write!(ok, "GET /ok/r4-{via} HTTP/1.1\r\nHost: edge\r\n\r\n").unwrap();
        let reply = read_response(&mut ok);
        assert!(
            reply.starts_with("HTTP/1.1 200"),
            "{via}: {reply:?}\n{}",
            e.server.logs()
        );
        write!(denied, "GET /no/r4-{via} HTTP/1.1\r\nHost: edge\r\n\r\n").unwrap();
        let reply = read_response(&mut denied);
        assert!(reply.starts_with("HTTP/1.1 403"), "{via}: {reply:?}");
    }
    let seen = e.app.stdout();
    assert!(!seen.contains("/no/r4"), "{seen}");
    drop(e.pki);
}

/// F2: CONNECT and upgrades are refused (403) unless an ALLOW rule names
/// their method: here the only ALLOW admits ec-web with any method, and a
/// DENY rule guards `/admin`, which a CONNECT tunnel would have bypassed.
/// An ordinary request is still served.
#[test]
fn connect_and_upgrades_need_a_rule_that_names_their_method() {
    let pki = Loopback::new();
    let app_addr = free_addr();
    let app = LocalProc::spawn(&apps::tunnel_app(app_addr.port()), pki.dir.path(), "tunnel");
    wait_listening(app_addr);
    let policy = pki.dir.path().join("any-method.yaml");
    std::fs::write(
        &policy,
        "policies:
  - name: no-admin
    action: DENY
    rules:
      - name: admin
        to: {paths: [\"/admin\", \"/admin/*\"]}
  - name: ec-web
    action: ALLOW
    rules:
      - name: any-method
        from: {principals: [\"spiffe://example.org/ec-web\"]}
",
    )
    .unwrap();
    let inbound = free_addr();
    let server = pki.sidecar_with("spiffe://example.org/tunnel", |c| {
        c.listeners.push(inbound_listener("in", inbound, app_addr));
        c.inbound.policies = vec![policy.clone()];
    });
    let (_client, outs) = pki.outbound_sidecar_with(
        "spiffe://example.org/ec-web",
        &[inbound],
        "spiffe://example.org/tunnel",
        |_| {},
    );
    let mut s = connect(outs[0]);
    s.write_all(b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n\r\n")
        .unwrap();
    let reply = read_response(&mut s);
    assert!(
        reply.starts_with("HTTP/1.1 403"),
        "{reply}\n{}",
        server.logs()
    );
    assert!(
        reply.contains("CONNECT is refused unless an ALLOW rule names its method"),
        "{reply}"
    );
    let mut s = connect(outs[0]);
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: chat\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        .unwrap();
    let reply = read_response(&mut s);
    assert!(reply.starts_with("HTTP/1.1 403"), "{reply}");
    let reply = exchange(outs[0], &[bytes("GET /plain HTTP/1.1\r\nHost: x\r\n\r\n")]);
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    let seen = app.stdout();
    assert!(!seen.contains("CONNECT") && !seen.contains("/ws"), "{seen}");
    let m = server.metrics();
    assert!(m.contains("reason=\"tunnel_not_allowed\"} 2"), "{m}");
}

/// F1 and R4 where a policy admits the connection as opaque: a client
/// silent past the detect timeout is spliced (a server may speak first),
/// but when it speaks first and in HTTP, it is served as HTTP: the forged
/// identity never reaches the app. A server that speaks first is still
/// spliced (`http::opaque_server_speaks_first_through_two_sidecars`).
#[test]
fn a_silent_client_that_then_speaks_http_is_served_as_http_where_opaque_is_admitted() {
    let e = edge(OPEN_POLICY, header_timeout(1));
    for (entry, via) in [(e.plain, "plaintext"), (e.out, "mesh")] {
        let mut s = connect(entry);
        std::thread::sleep(Duration::from_millis(2000));
        write!(
            s,
            "GET /late-{via} HTTP/1.1\r\nHost: edge\r\nX-Forwarded-Client-Cert: By=x;URI={FORGED}\r\n\r\n"
        )
        .unwrap();
        let reply = read_response(&mut s);
        assert!(
            reply.starts_with("HTTP/1.1 200"),
            "{via}: {reply:?}\n{}",
            e.server.logs()
        );
        // The same connection goes on as HTTP.
        write!(s, "GET /late-{via}-again HTTP/1.1\r\nHost: edge\r\n\r\n").unwrap();
        let reply = read_response(&mut s);
        assert!(reply.starts_with("HTTP/1.1 200"), "{via}: {reply:?}");
    }
    let seen = e.app.stdout();
    assert!(seen.contains("/late-mesh-again"), "{seen}");
    assert!(
        !seen.to_ascii_uppercase().contains(FORGED),
        "a forged identity reached the app:\n{seen}"
    );
}
