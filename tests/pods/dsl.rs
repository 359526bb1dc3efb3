//! The test DSL checks itself: pods reach each other, apps answer, and a
//! capture sees the bytes on the wire.

use crate::support;

use std::time::Duration;

use support::{Net, apps, looks_like_tls};

const WAIT: Duration = Duration::from_secs(10);

#[test]
#[ignore = "needs root, network namespaces and iptables (as root: cargo test -- --include-ignored)"]
fn pods_talk_and_captures_see_first_bytes() {
    support::require_root();
    let net = Net::new("dsl");
    let client = net.pod("client");
    let server = net.pod("server");
    let _echo = server.spawn(apps::echo_server(8080));
    let _banner = server.spawn(apps::banner_server(8081, "220 hello\n"));
    server.wait_tcp_listening(8080, WAIT);
    server.wait_tcp_listening(8081, WAIT);

    let capture = server.capture("eth0", 8080);
    assert_eq!(
        client.exec_ok(apps::client(server.addr(8080), "ping")),
        "ping"
    );
    let first = capture.first_payloads(WAIT);
    assert_eq!(first.to_port.as_deref(), Some(&b"ping"[..]));
    assert_eq!(first.from_port.as_deref(), Some(&b"ping"[..]));
    assert!(!looks_like_tls(b"ping"));

    let banner = client.exec_ok(apps::client(server.addr(8081), "x"));
    assert_eq!(banner, "220 hello\nx");
}

#[test]
#[ignore = "needs root, network namespaces and iptables (as root: cargo test -- --include-ignored)"]
fn captures_recognise_a_real_tls_client_hello() {
    support::require_root();
    let net = Net::new("tls");
    let client = net.pod("client");
    let server = net.pod("server");
    let _echo = server.spawn(apps::echo_server(8443));
    server.wait_tcp_listening(8443, WAIT);

    let capture = client.capture("eth0", 8443);
    // The echo server is no TLS server: only the first bytes matter here.
    client.exec_ok(apps::tls_client(server.addr(8443)));
    let first = capture.first_payloads(WAIT);
    let hello = first.to_port.expect("the client sent a ClientHello");
    assert!(looks_like_tls(&hello), "{hello:02x?}");
}
