//! End-to-end tests on loopback, no root needed: real `rampart` processes
//! with explicit listeners, a real echo app, real sockets. They cover the
//! mTLS and authorization cases that do not depend on iptables capture.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support;

use rampart_app::config::PortConfig;
use rampart_proxy::config::{Direction, ListenerConfig};
use support::pki::parse_id;
use support::sidecar::{Loopback, Sidecar, base_config, free_addr, rampart};

fn free_port() -> u16 {
    free_addr().port()
}

/// An echo app that records whether any connection reached it.
struct EchoApp {
    addr: SocketAddr,
    hits: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl EchoApp {
    fn start() -> EchoApp {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let h = hits.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                std::thread::spawn(move || {
                    let mut buf = [0u8; 65536];
                    loop {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if s.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = s.shutdown(Shutdown::Write);
                });
            }
        });
        EchoApp { addr, hits }
    }

    fn hits(&self) -> usize {
        self.hits.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Sends `payload`, half-closes, and reads everything back.
fn exchange(addr: SocketAddr, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut c = TcpStream::connect(addr)?;
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    c.write_all(payload)?;
    c.shutdown(Shutdown::Write)?;
    let mut out = Vec::new();
    c.read_to_end(&mut out)?;
    Ok(out)
}

struct Mesh {
    pki: Loopback,
    app: EchoApp,
    server: Sidecar,
    inbound: SocketAddr,
}

/// A server sidecar for `spiffe://example.org/server` in front of an echo
/// app, allowing only `spiffe://example.org/client`.
fn server_side() -> Mesh {
    let pki = Loopback::new();
    let app = EchoApp::start();
    let svid = pki.issue("spiffe://example.org/server", "server");
    let inbound = free_addr();
    let mut cfg = base_config(&svid);
    cfg.listeners.push(ListenerConfig {
        name: "in".into(),
        direction: Direction::Inbound,
        listen: inbound,
        target: app.addr.into(),
        port: None,
        server_identities: None,
    });
    cfg.inbound.ports.push(PortConfig {
        allowed_peers: Some(vec![parse_id("spiffe://example.org/client")]),
        ..PortConfig::new(app.addr.port())
    });
    let server = Sidecar::start(pki.dir.path(), "server", &cfg);
    Mesh {
        pki,
        app,
        server,
        inbound,
    }
}

fn client_side(
    pki: &Loopback,
    dir: &Path,
    id: &str,
    target: SocketAddr,
    expect: &str,
) -> (Sidecar, SocketAddr) {
    let name = id.rsplit('/').next().unwrap();
    let svid = pki.issue(id, name);
    let outbound = free_addr();
    let mut cfg = base_config(&svid);
    cfg.listeners.push(ListenerConfig {
        name: "out".into(),
        direction: Direction::Outbound,
        listen: outbound,
        target: target.into(),
        port: None,
        server_identities: Some(vec![parse_id(expect)]),
    });
    (
        Sidecar::start(dir, &format!("client-{name}"), &cfg),
        outbound,
    )
}

#[test]
fn payload_crosses_two_sidecars_intact() {
    let m = server_side();
    let (_c, out) = client_side(
        &m.pki,
        m.pki.dir.path(),
        "spiffe://example.org/client",
        m.inbound,
        "spiffe://example.org/server",
    );
    // 1 MiB of non-repeating bytes, to cross many TLS records and buffers.
    let payload: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let back = exchange(out, &payload).unwrap();
    assert_eq!(back.len(), payload.len());
    assert!(back == payload, "payload corrupted");
}

#[test]
fn client_refuses_server_with_unexpected_id() {
    let m = server_side();
    let (c, out) = client_side(
        &m.pki,
        m.pki.dir.path(),
        "spiffe://example.org/client",
        m.inbound,
        "spiffe://example.org/somebody-else",
    );
    // A line that cannot be an HTTP request line: opaque at once (a lone
    // word without its line end could still become one, and is HTTP
    // after the detect timeout).
    let back = exchange(out, b"secret\n").unwrap_or_default();
    assert!(back.is_empty(), "data flowed to an unverified server");
    assert_eq!(m.app.hits(), 0, "app was reached");
    assert!(c.logs().contains("id_not_allowed"), "{}", c.logs());
}

#[test]
fn server_refuses_peer_not_in_allowed_set() {
    let m = server_side();
    let (_c, out) = client_side(
        &m.pki,
        m.pki.dir.path(),
        "spiffe://example.org/intruder",
        m.inbound,
        "spiffe://example.org/server",
    );
    let back = exchange(out, b"hello\n").unwrap_or_default();
    assert!(back.is_empty());
    assert_eq!(m.app.hits(), 0, "app was reached");
    let logs = m.server.logs();
    assert!(logs.contains("connection denied"), "{logs}");
    assert!(logs.contains("spiffe://example.org/intruder"), "{logs}");
    let metrics = m.server.metrics();
    // The allowlist compiles to policy `port-<port>`; no rule decided.
    let series = format!(
        "rampart_authz_decisions_total{{action=\"deny\",reason=\"not_allowed\",policy=\"port-{}\",rule=\"-\"}} 1",
        m.app.addr.port()
    );
    assert!(metrics.contains(&series), "{metrics}");
}

#[test]
fn server_refuses_svid_from_another_ca() {
    let m = server_side();
    let rogue = Loopback::new();
    let (_c, out) = client_side(
        &rogue,
        m.pki.dir.path(),
        "spiffe://example.org/client",
        m.inbound,
        "spiffe://example.org/server",
    );
    let back = exchange(out, b"hello\n").unwrap_or_default();
    assert!(back.is_empty());
    assert_eq!(m.app.hits(), 0);
}

#[test]
fn plaintext_client_is_refused_by_strict_inbound() {
    let m = server_side();
    let back = exchange(m.inbound, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap_or_default();
    // The sidecar answers with a TLS alert at most, never with app data.
    assert!(!back.windows(4).any(|w| w == b"HTTP"), "{back:?}");
    assert_eq!(m.app.hits(), 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !m.server.logs().contains("handshake failed") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        m.server.logs().contains("handshake failed"),
        "{}",
        m.server.logs()
    );
}

#[test]
#[ignore = "needs openssl"]
fn openssl_without_client_cert_fails_the_handshake() {
    let m = server_side();
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &m.inbound.to_string(),
            "-tls1_3",
            "-quiet",
        ])
        .stdin(Stdio::null())
        .output();
    let out = out.expect("openssl is not installed");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("certificate required") || err.contains("alert"),
        "{err}"
    );
    assert_eq!(m.app.hits(), 0);
}

#[test]
fn bad_config_names_file_line_and_field_and_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "identity:\n  files: {cert: a.pem, key: a.key, bundle: b.pem}\ntransparent:\n  inbound: not-an-address\n",
    )
    .unwrap();
    let out = rampart(&["run", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}:4:", path.display())), "{err}");
    assert!(err.contains("transparent.inbound"), "{err}");
}

#[test]
fn missing_certificate_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    let admin = free_port();
    std::fs::write(
        &path,
        format!("identity:\n  files: {{cert: nope.pem, key: nope.key, bundle: nope-bundle.pem}}\nadmin: {{address: \"127.0.0.1:{admin}\"}}\ntransparent: {{outbound: \"127.0.0.1:0\", inbound: \"127.0.0.1:0\"}}\n"),
    )
    .unwrap();
    let out = rampart(&["run", "--config", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nope.pem"), "{err}");
    assert!(err.contains("No such file"), "{err}");
    // It failed before opening any socket.
    assert!(TcpListener::bind(("127.0.0.1", admin)).is_ok());
}
