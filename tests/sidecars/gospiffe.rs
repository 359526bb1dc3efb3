//! `rampart agent` and the Rampart sidecar against go-spiffe v2, the
//! reference SPIFFE library (our small client on it, tests/peers/gospiffe,
//! built by tests/peers/peer-gospiffe.sh): go-spiffe fetches SVIDs and
//! bundles from the development agent and parses them by its own rules,
//! completes an mTLS handshake with them, and authenticates a Rampart
//! sidecar in both directions. Loopback only, no root.

use crate::support;
use crate::wl_support;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use rampart_app::config::PortConfig;
use rampart_proxy::config::{Direction, ListenerConfig};
use support::Proc;
use support::pki::parse_id;
use support::sidecar::free_addr;
use wl_support::{Agent, CLIENT_ID, Client, EchoApp, Pod, SERVER_ID, Sidecar, wait_for};

const GO_SPIFFE: &str = "v2.9.0";

fn gospiffe() -> PathBuf {
    support::peers::require("gospiffe", GO_SPIFFE, "rampart-gospiffe")
}

fn run(bin: &PathBuf, args: &[&str]) -> std::process::Output {
    Command::new(bin)
        .args(args)
        .output()
        .expect("run rampart-gospiffe")
}

/// Starts `rampart-gospiffe serve` and waits until it listens.
fn serve(bin: &PathBuf, pod: &Pod, args: &[&str]) -> Proc {
    let mut cmd = Command::new(bin);
    cmd.arg("serve").args(args);
    let proc = Proc::spawn(cmd, "gospiffe-serve", pod.dir());
    wait_for(
        "go-spiffe server listening",
        Duration::from_secs(20),
        || proc.stdout().contains("listening"),
    );
    proc
}

#[test]
#[ignore = "needs go-spiffe (tests/peers/peer-gospiffe.sh; cargo test -- --include-ignored)"]
fn go_spiffe_fetches_svids_and_bundles_from_rampart_agent() {
    let bin = gospiffe();
    let pod = Pod::new();
    let agent = Agent::start(&pod, "1h");
    let out = pod.dir().join("fetched");
    std::fs::create_dir(&out).unwrap();
    let fetched = run(&bin, &["fetch", &agent.endpoint(), out.to_str().unwrap()]);
    assert!(
        fetched.status.success(),
        "{}",
        String::from_utf8_lossy(&fetched.stderr)
    );
    // Both SVIDs, the default (first registered) first, and the bundle.
    assert_eq!(
        String::from_utf8_lossy(&fetched.stdout),
        format!("svid {CLIENT_ID}\nsvid {SERVER_ID}\nbundle example.org\n")
    );
    // go-spiffe checked the key against the leaf; openssl checks the chain.
    let verify = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(out.join("bundle-example.org.pem"))
        .arg(out.join("svid.pem"))
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
}

#[test]
#[ignore = "needs go-spiffe (tests/peers/peer-gospiffe.sh; cargo test -- --include-ignored)"]
fn go_spiffe_completes_mtls_with_svids_from_rampart_agent() {
    let bin = gospiffe();
    let pod = Pod::new();
    let agent = Agent::start(&pod, "1h");
    let endpoint = agent.endpoint();
    let addr = free_addr().to_string();
    let _server = serve(
        &bin,
        &pod,
        &["-svid", SERVER_ID, &endpoint, &addr, CLIENT_ID],
    );
    let ok = run(&bin, &["dial", &endpoint, &addr, SERVER_ID, "hello"]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&ok.stdout), "hello\n");
    // The reference verifier also refuses a server that is not the one named.
    let wrong = run(
        &bin,
        &[
            "dial",
            &endpoint,
            &addr,
            "spiffe://example.org/other",
            "hello",
        ],
    );
    assert!(!wrong.status.success());
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("unexpected ID"),
        "{}",
        String::from_utf8_lossy(&wrong.stderr)
    );
}

/// go-spiffe as the client of a Rampart inbound sidecar, and as the server
/// behind a Rampart outbound sidecar: each authenticates the other's SVID.
#[test]
#[ignore = "needs go-spiffe (tests/peers/peer-gospiffe.sh; cargo test -- --include-ignored)"]
fn go_spiffe_and_rampart_sidecars_authenticate_each_other() {
    let bin = gospiffe();
    let pod = Pod::new();
    let agent = Agent::start(&pod, "1h");
    let endpoint = agent.endpoint();
    let app = EchoApp::start();

    // go-spiffe (CLIENT_ID) -> Rampart inbound (SERVER_ID) -> echo app.
    let inbound = free_addr();
    let mut server_cfg = Sidecar::config(&pod, SERVER_ID);
    server_cfg.listeners.push(ListenerConfig {
        name: "in".into(),
        direction: Direction::Inbound,
        listen: inbound,
        target: app.addr.into(),
        port: None,
        server_identities: None,
    });
    server_cfg.inbound.ports.push(PortConfig {
        allowed_peers: Some(vec![parse_id(CLIENT_ID)]),
        ..PortConfig::new(app.addr.port())
    });
    let server_side = Sidecar::start(&pod, "server", &server_cfg, None);
    wait_for("inbound sidecar ready", Duration::from_secs(20), || {
        server_side.ready_status() == Some(200)
    });
    let through = run(
        &bin,
        &[
            "dial",
            &endpoint,
            &inbound.to_string(),
            SERVER_ID,
            "to rampart",
        ],
    );
    assert!(
        through.status.success(),
        "{}",
        String::from_utf8_lossy(&through.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&through.stdout), "to rampart\n");
    // A go-spiffe client with an SVID the port does not allow is refused.
    let refused = run(
        &bin,
        &[
            "dial",
            "-svid",
            SERVER_ID,
            &endpoint,
            &inbound.to_string(),
            SERVER_ID,
            "x",
        ],
    );
    assert!(!refused.status.success(), "an unlisted peer got through");

    // plain app -> Rampart outbound (CLIENT_ID) -> go-spiffe server (SERVER_ID).
    let go_addr = free_addr();
    let _go_server = serve(
        &bin,
        &pod,
        &[
            "-svid",
            SERVER_ID,
            &endpoint,
            &go_addr.to_string(),
            CLIENT_ID,
        ],
    );
    let outbound = free_addr();
    let mut client_cfg = Sidecar::config(&pod, CLIENT_ID);
    client_cfg.listeners.push(ListenerConfig {
        name: "out".into(),
        direction: Direction::Outbound,
        listen: outbound,
        target: go_addr.into(),
        port: None,
        server_identities: Some(vec![parse_id(SERVER_ID)]),
    });
    let client_side = Sidecar::start(&pod, "client", &client_cfg, Some(outbound.port()));
    wait_for("outbound sidecar ready", Duration::from_secs(20), || {
        client_side.ready_status() == Some(200)
    });
    Client::new(outbound.port())
        .request(7)
        .expect("a line through Rampart to go-spiffe and back");
}
