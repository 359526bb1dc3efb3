//! Istio resources that change while the sidecar runs, end to end on
//! loopback: a PeerAuthentication edited STRICT → PERMISSIVE → STRICT
//! under a real pair (a client sidecar in front of curl, a server sidecar
//! in front of a Python HTTP/1.1 app), with a plaintext curl refused or
//! admitted as the mode in force says; a broken edit keeps the last good.

use crate::support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use rampart_app::config::{IstioConfig, PortConfig};
use rampart_proxy::config::DeclaredProtocol;
use support::apps;
use support::curl::curl;
use support::sidecar::{LocalProc, Loopback, free_addr, inbound_listener_as, wait_listening};
use support::wait;

const APP_PORT: u16 = 8080;
const SERVER: &str = "spiffe://example.org/ns/foo/sa/httpbin";
const CLIENT: &str = "spiffe://example.org/ns/foo/sa/sleep";

/// The namespace-wide PeerAuthentication with `mode`, and an ALLOW policy
/// that admits any source (Istio: a rule without `from`) on GET.
fn resources(mode: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: default, namespace: foo}}
spec:
  mtls: {{mode: {mode}}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: get-only, namespace: foo}}
spec:
  action: ALLOW
  rules:
  - to:
    - operation: {{methods: [GET]}}
"
    )
}

/// Rewrites the watched file in one step (a rename), as a ConfigMap
/// update does, so the watcher never reads half a file.
fn write_resources(file: &Path, mode: &str) {
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, resources(mode)).unwrap();
    std::fs::rename(&tmp, file).unwrap();
}

/// The reload count with `result` on the sidecar's `/metrics`.
fn reloads(metrics: &str, result: &str) -> u64 {
    let series = format!("rampart_policy_reloads_total{{result=\"{result}\"}}");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series.as_str()))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// One GET on an open keep-alive connection; the status, 0 when the
/// connection was closed instead.
fn get_on(conn: &mut TcpStream, path: &str) -> u16 {
    if write!(conn, "GET {path} HTTP/1.1\r\nHost: httpbin\r\n\r\n").is_err() {
        return 0;
    }
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match conn.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return 0,
        }
    }
    let head = String::from_utf8_lossy(&head);
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    if conn.read_exact(&mut body).is_err() {
        return 0;
    }
    head.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_peer_authentication_edited_under_a_pair_applies_without_a_restart() {
    let pki = Loopback::new();
    let app_addr = free_addr();
    let _app = LocalProc::spawn(
        &apps::http_app(app_addr.port(), "httpbin"),
        pki.dir.path(),
        "httpbin",
    );
    wait_listening(app_addr);
    let file = pki.dir.path().join("istio.yaml");
    write_resources(&file, "STRICT");
    let inbound = free_addr();
    let server = pki.sidecar_with(SERVER, |c| {
        c.listeners
            .push(inbound_listener_as("in", inbound, app_addr, APP_PORT));
        c.inbound.ports = vec![PortConfig {
            protocol: DeclaredProtocol::Http,
            ..PortConfig::new(APP_PORT)
        }];
        c.inbound.istio = Some(IstioConfig::new(
            vec![file.clone()],
            "foo",
            Default::default(),
            "cluster.local",
        ));
    });
    let (_client, outs) = pki.outbound_sidecar_with(CLIENT, &[inbound], SERVER, |_| {});
    let mesh = format!("http://{}/data", outs[0]);
    let plaintext = format!("http://{inbound}/data");
    let status = |url: &str| curl(url, &[]).status;
    let within = Duration::from_secs(10);

    // STRICT at start: the pair's mTLS passes, plaintext fails the handshake.
    assert_eq!(status(&mesh), 200, "{}", server.logs());
    assert_eq!(status(&plaintext), 0, "plaintext on STRICT");

    write_resources(&file, "PERMISSIVE");
    wait::until_true("plaintext admitted once PERMISSIVE", within, || {
        status(&plaintext) == 200
    });
    assert_eq!(status(&mesh), 200, "mTLS on PERMISSIVE");
    // The ALLOW policy still decides plaintext requests.
    assert_eq!(curl(&plaintext, &["-X", "DELETE"]).status, 403);
    // A plaintext keep-alive connection opened while PERMISSIVE.
    let mut live = TcpStream::connect(inbound).unwrap();
    live.set_read_timeout(Some(within)).unwrap();
    assert_eq!(get_on(&mut live, "/data"), 200);

    // A mode Istio does not have: refused by name, the last good stays.
    let ok_before = reloads(&server.metrics(), "ok");
    write_resources(&file, "STRIKT");
    wait::until_true("the broken edit refused", within, || {
        reloads(&server.metrics(), "error") >= 1
    });
    assert!(
        server.logs().contains("spec.mtls.mode"),
        "the refusal names the field:\n{}",
        server.logs()
    );
    assert_eq!(reloads(&server.metrics(), "ok"), ok_before);
    assert_eq!(status(&plaintext), 200, "the last good (PERMISSIVE) stays");

    write_resources(&file, "STRICT");
    wait::until_true("plaintext refused once STRICT again", within, || {
        status(&plaintext) == 0
    });
    assert_eq!(status(&mesh), 200, "mTLS on STRICT");
    // The connection accepted while PERMISSIVE gets no more through.
    assert_ne!(
        get_on(&mut live, "/data"),
        200,
        "a plaintext connection outlived the switch to STRICT"
    );
}
