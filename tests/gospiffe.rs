//! `rampart agent` and the Rampart sidecar against go-spiffe v2, the
//! reference SPIFFE library (our small client on it, tests/peers/gospiffe,
//! built by tests/peers/peer-gospiffe.sh): go-spiffe fetches SVIDs and
//! bundles from the development agent and parses them by its own rules,
//! completes an mTLS handshake with them, and authenticates a Rampart
//! sidecar in both directions. Loopback only, no root.

mod support;
mod wl_support;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use support::Proc;
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
    let server_side = Sidecar::start(
        &pod,
        "server",
        SERVER_ID,
        &format!(
            "listeners:\n  - name: in\n    direction: inbound\n    listen: {inbound}\n    target: {app}\ninbound:\n  ports:\n    - port: {port}\n      allowed_peers: [{CLIENT_ID}]\n",
            app = app.addr,
            port = app.addr.port()
        ),
        None,
    );
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
    let client_side = Sidecar::start(
        &pod,
        "client",
        CLIENT_ID,
        &format!(
            "listeners:\n  - name: out\n    direction: outbound\n    listen: {outbound}\n    target: {go_addr}\n    server_identities: [{SERVER_ID}]\n"
        ),
        Some(outbound.port()),
    );
    wait_for("outbound sidecar ready", Duration::from_secs(20), || {
        client_side.ready_status() == Some(200)
    });
    Client::new(outbound.port())
        .request(7)
        .expect("a line through Rampart to go-spiffe and back");
}
