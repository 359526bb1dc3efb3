//! End to end: `rampart agent` serves the SPIFFE Workload API; an independent
//! client (py-spiffe) and Rampart sidecars obtain SVIDs from it; SVIDs rotate
//! under steady traffic; the agent goes away and comes back.
//!
//! Every process is the real binary. Traffic stays on 127.0.0.1.

use crate::wl_support;

use std::time::{Duration, Instant};

use wl_support::{Agent, Client, EchoApp, HttpConn, HttpOk, Pod, Sidecar, wait_for};

/// SVID lifetime for the rotation test: the agent pushes a new SVID every
/// half-life, so a 4s TTL rotates every 2s.
const SHORT_TTL: &str = "4s";
/// SVID lifetime for the restart test: a quick restart must fit in the
/// remaining validity (at least half the TTL) with reconnection backoff.
const RESTART_TTL: &str = "6s";

#[test]
#[ignore = "needs python3 with spiffe and grpcio (pip install -r tests/requirements.txt)"]
fn py_spiffe_fetches_an_svid_that_openssl_verifies_against_the_bundle() {
    wl_support::require_python_spiffe();
    let pod = Pod::new();
    let agent = Agent::start(&pod, "1h");
    let out = pod.dir();
    let fetched = std::process::Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/py/spiffe_fetch.py"
        ))
        .arg(agent.endpoint())
        .arg(out)
        .output()
        .unwrap();
    assert!(
        fetched.status.success(),
        "py-spiffe failed: {}",
        String::from_utf8_lossy(&fetched.stderr)
    );
    let id = String::from_utf8_lossy(&fetched.stdout);
    assert_eq!(id.trim(), wl_support::CLIENT_ID);
    let verify = std::process::Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(out.join("bundle.pem"))
        .arg(out.join("svid.pem"))
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "openssl verify: {}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
}

#[test]
#[ignore = "needs python3 with spiffe and grpcio (pip install -r tests/requirements.txt)"]
fn the_security_header_is_required() {
    wl_support::require_python_spiffe();
    let pod = Pod::new();
    let agent = Agent::start(&pod, "1h");
    for (mode, want) in [
        ("with-header", "OK"),
        ("without-header", "INVALID_ARGUMENT"),
    ] {
        let out = std::process::Command::new("python3")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/raw_call.py"))
            .arg(agent.endpoint())
            .arg(mode)
            .output()
            .unwrap();
        let got = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            got.trim(),
            want,
            "{mode}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn svids_rotate_under_steady_traffic_with_zero_failed_requests() {
    let pod = Pod::new();
    let app = EchoApp::start();
    let (client_side, server_side) = Sidecar::pair(&pod, &app);
    // Fail closed: no identity, not ready.
    assert_eq!(client_side.ready_status(), Some(503));
    assert_eq!(server_side.ready_status(), Some(503));

    let started = Instant::now();
    let _agent = Agent::start(&pod, SHORT_TTL);
    wait_for("both sidecars ready", Duration::from_secs(20), || {
        client_side.ready_status() == Some(200) && server_side.ready_status() == Some(200)
    });
    eprintln!(
        "agent start to both sidecars ready: {} ms",
        started.elapsed().as_millis()
    );

    let client = Client::new(client_side.outbound_port());
    // A long-lived opaque connection lives as long as the certificates it
    // was made with (issue 19 R5): it is closed when the client's SVID or
    // the server's expires (at most the TTL after it opened), and the
    // next one works.
    let mut long_lived = client.open().expect("long-lived connection");
    let mut opened = Instant::now();
    let mut lifetimes = Vec::new();
    let before = client_side.rotations();
    let deadline = Instant::now() + Duration::from_secs(9);
    let mut sent = 0;
    let mut failures = Vec::new();
    while Instant::now() < deadline {
        if let Err(e) = client.request(sent) {
            failures.push(format!("request {sent}: {e}"));
        }
        if sent % 25 == 0 && long_lived.ping(sent).is_err() {
            lifetimes.push(opened.elapsed());
            long_lived = client.open().expect("a new long-lived connection");
            opened = Instant::now();
            if let Err(e) = long_lived.ping(sent) {
                failures.push(format!("new long-lived connection at {sent}: {e}"));
            }
        }
        sent += 1;
        std::thread::sleep(Duration::from_millis(10));
    }
    let rotations = client_side.rotations() - before;
    eprintln!(
        "{sent} requests, {rotations} rotations of the client sidecar, long-lived connections closed after {lifetimes:?}"
    );
    assert!(
        failures.is_empty(),
        "{} failures: {failures:#?}",
        failures.len()
    );
    assert!(
        !lifetimes.is_empty(),
        "a connection outlived the 4 s certificates it was made with"
    );
    // Pings every ~250 ms: a close is seen within that of the expiry.
    for l in &lifetimes {
        assert!(*l <= Duration::from_millis(5_000), "{lifetimes:?}");
    }
    assert!(rotations >= 3, "only {rotations} rotations in 9s");
    assert!(server_side.rotations() >= 3);
}

/// Issue 19 R5: under steady traffic on one keep-alive app connection,
/// the pooled mTLS connection between the sidecars is replaced when the
/// SVID it was made with (or the peer's) expires, with no failed request.
/// Before, that one connection carried traffic past both certificates.
#[test]
fn pooled_connections_end_with_their_certificates_and_requests_move_on() {
    let pod = Pod::new();
    let app = HttpOk::start();
    let (client_side, server_side) = Sidecar::pair_to(&pod, app.addr);
    let _agent = Agent::start(&pod, SHORT_TTL);
    wait_for("both sidecars ready", Duration::from_secs(20), || {
        client_side.ready_status() == Some(200) && server_side.ready_status() == Some(200)
    });
    let handshakes = || {
        server_side
            .metric("rampart_tls_handshakes_total{direction=\"inbound\",result=\"ok\"}")
            .unwrap_or(0.0)
    };
    let mut conn = HttpConn::open(client_side.outbound_port()).expect("app connection");
    let first = handshakes();
    let deadline = Instant::now() + Duration::from_secs(9);
    let mut sent = 0;
    let mut failures = Vec::new();
    while Instant::now() < deadline {
        if let Err(e) = conn.get(sent) {
            failures.push(format!("request {sent}: {e}"));
            conn = HttpConn::open(client_side.outbound_port()).expect("app connection");
        }
        sent += 1;
        std::thread::sleep(Duration::from_millis(10));
    }
    let made = handshakes() - first;
    eprintln!("{sent} requests on one app connection; {made} new mTLS connections");
    assert!(
        failures.is_empty(),
        "{} failures: {failures:#?}",
        failures.len()
    );
    // 4 s certificates over 9 s: at least two replacements.
    assert!(
        made >= 2.0,
        "the pooled connection outlived its certificates ({made} new connections)"
    );
}

#[test]
fn agent_restart_keeps_traffic_and_expiry_fails_closed_then_recovers() {
    let pod = Pod::new();
    let app = EchoApp::start();
    let (client_side, server_side) = Sidecar::pair(&pod, &app);
    let mut agent = Agent::start(&pod, RESTART_TTL);
    let both = |status| {
        client_side.ready_status() == Some(status) && server_side.ready_status() == Some(status)
    };
    wait_for("both sidecars ready", Duration::from_secs(20), || both(200));
    let client = Client::new(client_side.outbound_port());

    // A quick agent restart: the current SVIDs are still valid, traffic goes on.
    agent.stop();
    let down = Instant::now();
    let mut failures = Vec::new();
    let mut sent = 0;
    while down.elapsed() < Duration::from_secs(4) {
        if down.elapsed() > Duration::from_millis(500) && !agent.is_running() {
            agent = Agent::start(&pod, RESTART_TTL);
        }
        if let Err(e) = client.request(sent) {
            failures.push(format!("request {sent} at {:?}: {e}", down.elapsed()));
        }
        sent += 1;
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(failures.is_empty(), "{failures:#?}");

    // A long outage: the SVIDs expire, the sidecars withdraw them.
    agent.stop();
    wait_for("both sidecars not ready", Duration::from_secs(15), || {
        both(503)
    });
    assert!(
        client.request(0).is_err(),
        "a connection got through without an identity"
    );
    assert_eq!(
        client_side.metric("rampart_identity_source_connected"),
        Some(0.0)
    );

    // The agent returns; the sidecars recover by themselves.
    let _agent = Agent::start(&pod, RESTART_TTL);
    wait_for("both sidecars ready again", Duration::from_secs(15), || {
        both(200)
    });
    client.request(1).expect("request after recovery");
}
