//! The transparent mesh end to end, in network namespaces: pods whose
//! traffic `rampart init` captures, sidecars running as the proxy UID, real
//! apps, and a look at the wire between pods.

use crate::support;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use rampart_app::config::{Config, IdentityConfig, PortConfig};
use rampart_proxy::config::{ServerRule, TlsMode, TransparentConfig};
use support::pki::parse_id;
use support::{Net, PROXY_UID, Pki, Pod, Proc, TempDir, apps, looks_like_tls, rampart_bin};

const APP_PORT: u16 = 8080;
/// UID of the apps: anything but the proxy's.
const APP_UID: u32 = 1000;
const WAIT: Duration = Duration::from_secs(15);

/// Issues an SVID for `id` from `pki` into `<dir>/<label>-<leaf>`, owned
/// by the proxy UID (the key is 0600, and the sidecar runs as that UID).
fn issue(pki: &Pki, dir: &TempDir, label: &str, id: &str) -> PathBuf {
    let leaf = id.rsplit('/').next().unwrap();
    let out = pki.issue_into(id, &dir.path().join(format!("{label}-{leaf}")));
    for f in ["", "svid.pem", "svid.key", "bundle.pem"] {
        std::os::unix::fs::chown(out.join(f), Some(PROXY_UID), Some(PROXY_UID)).unwrap();
    }
    out
}

/// A pod with `rampart init` rules and a sidecar running as the proxy UID,
/// transparent, with the configuration `edit` makes.
fn sidecar(pod: &Pod, dir: &TempDir, svid: &Path, edit: impl FnOnce(&mut Config)) -> Proc {
    pod.exec_ok([rampart_bin(), "init"]);
    let mut cfg = Config::new(IdentityConfig::files_in(svid));
    cfg.transparent = Some(TransparentConfig::default());
    cfg.log.level = "debug".into();
    edit(&mut cfg);
    let path = dir.write(&format!("{}.yaml", pod.name()), cfg.to_yaml());
    let proc = pod.spawn_as(
        PROXY_UID,
        [rampart_bin(), "run", "--config", path.to_str().unwrap()],
    );
    wait_ready(pod, &proc);
    proc
}

fn wait_ready(pod: &Pod, proc: &Proc) {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if pod
            .admin_get("/ready")
            .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("sidecar in {} not ready:\n{}", pod.name(), proc.logs());
}

/// The server side: the app port admits `allowed` (an allow-list, no policy).
fn server_config(allowed: &str) -> impl FnOnce(&mut Config) {
    let allowed = parse_id(allowed);
    move |c| {
        c.inbound.ports = vec![PortConfig {
            allowed_peers: Some(vec![allowed]),
            ..PortConfig::new(APP_PORT)
        }]
    }
}

/// The app port of every pod of the test network is in the mesh, with
/// the server identity `expect`.
fn mesh_servers(expect: &str) -> Vec<ServerRule> {
    vec![ServerRule {
        cidrs: vec![support::TEST_SUBNET.parse::<IpNet>().unwrap()],
        ports: vec![APP_PORT],
        identities: vec![parse_id(expect)],
        trust_domains: Vec::new(),
        allow_dns_san_servers: Vec::new(),
    }]
}

/// The client side: the mesh expects `spiffe://example.org/server`, and
/// `external` is outside it (plaintext).
fn client_config(external: Ipv4Addr) -> impl FnOnce(&mut Config) {
    move |c| {
        c.outbound.passthrough_cidrs = vec![IpNet::from(std::net::IpAddr::V4(external))];
        c.outbound.servers = mesh_servers("spiffe://example.org/server");
    }
}

/// Sends `payload` from `pod` as the app UID; returns what came back (empty on failure).
fn send(pod: &Pod, to: SocketAddr, payload: &str) -> String {
    let out = pod.exec_as(APP_UID, apps::client(to, payload));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct ServerPod {
    pod: Pod,
    _app: Proc,
    sidecar: Proc,
}

fn server_pod(net: &Net, pki: &Pki, dir: &TempDir) -> ServerPod {
    let pod = net.pod("server");
    let app = pod.spawn_as(APP_UID, apps::echo_server(APP_PORT));
    pod.wait_tcp_listening(APP_PORT, WAIT);
    let svid = issue(pki, dir, "ca", "spiffe://example.org/server");
    let sidecar = sidecar(
        &pod,
        dir,
        &svid,
        server_config("spiffe://example.org/client"),
    );
    ServerPod {
        pod,
        _app: app,
        sidecar,
    }
}

#[test]
#[ignore = "needs root, network namespaces and iptables (as root: cargo test -- --include-ignored)"]
fn captured_on_both_sides_and_carried_over_mtls() {
    support::require_root();
    let net = Net::new("mtls");
    let dir = TempDir::new();
    let pki = Pki::new("example.org");
    let server = server_pod(&net, &pki, &dir);
    let client = net.pod("client");
    let svid = issue(&pki, &dir, "ca", "spiffe://example.org/client");
    let _client_sidecar = sidecar(
        &client,
        &dir,
        &svid,
        client_config(Ipv4Addr::new(192, 0, 2, 1)),
    );

    let capture = server.pod.capture("eth0", APP_PORT);
    // One line with its end: a stream that cannot be an HTTP request, so the
    // `detect` port carries it as opaque TCP (an unfinished first line could
    // still become a request line, and is served as HTTP: issue 19's F1).
    let payload = "hello from the client app\n";
    let reply = send(&client, server.pod.addr(APP_PORT), payload);
    assert_eq!(reply, payload, "server logs:\n{}", server.sidecar.logs());

    let first = capture.first_payloads(WAIT);
    let to_server = first
        .to_port
        .expect("bytes towards the server were captured");
    assert!(
        looks_like_tls(&to_server),
        "first bytes on the wire: {to_server:?}"
    );
    let wire: Vec<u8> = capture
        .payloads()
        .into_iter()
        .flat_map(|s| s.bytes)
        .collect();
    assert!(
        !wire.windows(payload.len()).any(|w| w == payload.as_bytes()),
        "plaintext payload seen on the wire"
    );
    // The server sidecar saw the client's SPIFFE ID.
    let logs = server.sidecar.logs();
    assert!(
        logs.contains("peer.id=spiffe://example.org/client"),
        "{logs}"
    );
}

#[test]
#[ignore = "needs root, network namespaces and iptables (as root: cargo test -- --include-ignored)"]
fn pod_without_sidecar_is_refused_by_strict_inbound() {
    support::require_root();
    let net = Net::new("strict");
    let dir = TempDir::new();
    let pki = Pki::new("example.org");
    let server = server_pod(&net, &pki, &dir);
    let plain = net.pod("plain");
    let reply = send(&plain, server.pod.addr(APP_PORT), "let me in");
    // At most a TLS alert comes back (0x15), never the app's echo.
    assert!(!reply.contains("let me in"), "{reply:?}");
    assert!(reply.is_empty() || reply.as_bytes()[0] == 0x15, "{reply:?}");
    let deadline = Instant::now() + WAIT;
    while !server.sidecar.logs().contains("handshake failed") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        server.sidecar.logs().contains("handshake failed"),
        "{}",
        server.sidecar.logs()
    );
}

#[test]
#[ignore = "needs root, network namespaces and iptables (as root: cargo test -- --include-ignored)"]
fn sidecar_with_an_id_not_allowed_is_refused() {
    support::require_root();
    let net = Net::new("notallowed");
    let dir = TempDir::new();
    let pki = Pki::new("example.org");
    let server = server_pod(&net, &pki, &dir);
    let intruder = net.pod("intruder");
    let svid = issue(&pki, &dir, "ca", "spiffe://example.org/intruder");
    let _s = sidecar(
        &intruder,
        &dir,
        &svid,
        client_config(Ipv4Addr::new(192, 0, 2, 1)),
    );
    let reply = send(&intruder, server.pod.addr(APP_PORT), "hello\n");
    assert_eq!(reply, "");
    let logs = server.sidecar.logs();
    assert!(logs.contains("connection denied"), "{logs}");
    assert!(logs.contains("spiffe://example.org/intruder"), "{logs}");
    let metrics = server.pod.admin_get("/metrics").unwrap();
    // The allowlist compiles to policy `port-<port>`; no rule decided.
    let series = format!(
        "rampart_authz_decisions_total{{action=\"deny\",reason=\"not_allowed\",policy=\"port-{APP_PORT}\",rule=\"-\"}} 1"
    );
    assert!(metrics.contains(&series), "{metrics}");
}

#[test]
#[ignore = "needs root, network namespaces and iptables (as root: cargo test -- --include-ignored)"]
fn sidecar_with_an_svid_from_another_ca_is_refused() {
    support::require_root();
    let net = Net::new("otherca");
    let dir = TempDir::new();
    let pki = Pki::new("example.org");
    let rogue = Pki::new("example.org");
    let server = server_pod(&net, &pki, &dir);
    let client = net.pod("client");
    let svid = issue(&rogue, &dir, "rogue", "spiffe://example.org/client");
    let _s = sidecar(
        &client,
        &dir,
        &svid,
        client_config(Ipv4Addr::new(192, 0, 2, 1)),
    );
    let reply = send(&client, server.pod.addr(APP_PORT), "hello\n");
    assert_eq!(reply, "");
}

#[test]
#[ignore = "needs root, network namespaces and iptables (as root: cargo test -- --include-ignored)"]
fn destination_outside_the_mesh_passes_through_in_plaintext() {
    support::require_root();
    let net = Net::new("passthru");
    let dir = TempDir::new();
    let pki = Pki::new("example.org");
    let external = net.pod("external");
    let _app = external.spawn_as(APP_UID, apps::echo_server(APP_PORT));
    external.wait_tcp_listening(APP_PORT, WAIT);
    let client = net.pod("client");
    let svid = issue(&pki, &dir, "ca", "spiffe://example.org/client");
    let _s = sidecar(&client, &dir, &svid, client_config(external.ip()));
    let capture = external.capture("eth0", APP_PORT);
    let reply = send(&client, external.addr(APP_PORT), "plain hello");
    assert_eq!(reply, "plain hello");
    let first = capture.first_payloads(WAIT);
    assert_eq!(first.to_port.as_deref(), Some(&b"plain hello"[..]));
}

/// Scenario 1 with capture on both sides: the client app's plain HTTP/1.1
/// is carried over the pooled mTLS HTTP/2 connection, and ec-backend's
/// sidecar authorizes every request with the native policy.
#[test]
#[ignore = "needs root, network namespaces and iptables (as root: cargo test -- --include-ignored)"]
fn http_requests_are_authorized_per_request_between_captured_pods() {
    support::require_root();
    let net = Net::new("http");
    let dir = TempDir::new();
    let pki = Pki::new("example.org");
    let policy = dir.write(
        "ec-backend.native.yaml",
        std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("authz/tests/fixtures/scenario1/ec-backend.native.yaml"),
        )
        .unwrap(),
    );
    let server = net.pod("ec-backend");
    let _app = server.spawn_as(APP_UID, apps::http_app(APP_PORT, "ec-backend"));
    server.wait_tcp_listening(APP_PORT, WAIT);
    let server_sidecar = sidecar(
        &server,
        &dir,
        &issue(&pki, &dir, "ca", "spiffe://example.org/ec-backend"),
        |c| c.inbound.policies = vec![policy.clone()],
    );
    let client = net.pod("ec-web");
    let _client_sidecar = sidecar(
        &client,
        &dir,
        &issue(&pki, &dir, "ca", "spiffe://example.org/ec-web"),
        |c| c.outbound.servers = mesh_servers("spiffe://example.org/ec-backend"),
    );
    let get = |path: &str| {
        let url = format!("http://{}{path}", server.addr(APP_PORT));
        let out = client.exec_as(
            APP_UID,
            [
                "curl",
                "-s",
                "--max-time",
                "10",
                "-w",
                " %{http_code}",
                &url,
            ],
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(
        get("/data"),
        "Hi ec-backend client! 200",
        "{}",
        server_sidecar.logs()
    );
    let denied = get("/admin");
    assert!(
        denied.starts_with(
            "RBAC: access denied by spiffe://example.org/ec-backend policy ec-backend"
        ) && denied.ends_with(" 403"),
        "{denied}"
    );
}

/// Scenario 3.1: an ingress outside the mesh reaches app2 over plain HTTP,
/// allowed by its source address on a PERMISSIVE port; every other
/// plaintext source is still refused, per request, with 403.
#[test]
#[ignore = "needs root, network namespaces and iptables (as root: cargo test -- --include-ignored)"]
fn ingress_reaches_a_permissive_port_by_source_address_only() {
    support::require_root();
    let net = Net::new("ingress");
    let dir = TempDir::new();
    let pki = Pki::new("example.org");
    let app2 = net.pod("app2");
    let ingress = net.pod("ingress");
    let other = net.pod("other");
    let _app = app2.spawn_as(APP_UID, apps::http_app(APP_PORT, "app2"));
    app2.wait_tcp_listening(APP_PORT, WAIT);
    let policy = dir.write(
        "app2.policy.yaml",
        format!(
            "policies:\n  - name: app2\n    action: ALLOW\n    ports: [{APP_PORT}]\n    rules:\n      - name: ingress-plaintext\n        from: {{unauthenticated: true, source_cidrs: [\"{}/32\"]}}\n",
            ingress.ip()
        ),
    );
    let svid = issue(&pki, &dir, "ca", "spiffe://example.org/app2");
    let _s = sidecar(&app2, &dir, &svid, |c| {
        c.inbound.policies = vec![policy.clone()];
        c.inbound.ports = vec![PortConfig {
            mode: TlsMode::PermissiveAllowPlaintext,
            ..PortConfig::new(APP_PORT)
        }];
    });
    let url = format!("http://{}/data", app2.addr(APP_PORT));
    let status = |pod: &Pod| {
        pod.exec_ok([
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            url.as_str(),
        ])
    };
    assert_eq!(status(&ingress), "200");
    assert_eq!(status(&other), "403");
}
