//! `rampart init` for real: the rules it installs in a pod's namespace,
//! idempotence, `--clean`, `--dry-run`, and what the rules do to traffic.

use crate::support;

use std::time::Duration;

use support::{Net, PROXY_UID, Pod, apps, rampart_bin};

const INBOUND_PORT: u16 = 15006;
const OUTBOUND_PORT: u16 = 15001;
const WAIT: Duration = Duration::from_secs(10);

/// Runs `rampart init ARGS` in `pod` and asserts it succeeded.
fn init(pod: &Pod, args: &[&str]) {
    pod.exec_ok([rampart_bin(), "init"].iter().chain(args));
}

/// The pod's nat table (IPv4 and IPv6) without comments and counters,
/// which change between two saves of the same rules.
fn nat_rules(pod: &Pod) -> String {
    let mut rules = String::new();
    for save in ["iptables-save", "ip6tables-save"] {
        let text = pod.exec_ok([save, "-t", "nat"]);
        for line in text.lines().filter(|line| !line.starts_with('#')) {
            let line = match line.find(" [") {
                Some(counters) if line.starts_with(':') => &line[..counters],
                _ => line,
            };
            rules.push_str(line);
            rules.push('\n');
        }
    }
    rules
}

#[test]
fn dry_run_prints_the_rules_and_needs_no_privileges() {
    // Runs everywhere: a dry run touches no iptables and needs no root.
    let output = std::process::Command::new(rampart_bin())
        .args(["init", "--dry-run", "--exclude-outbound-ports=5432"])
        .output()
        .expect("run rampart init --dry-run");
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("*nat\n"), "{text}");
    assert!(
        text.contains("-A RAMPART_OUTPUT -p tcp --dport 5432 -j RETURN\n"),
        "{text}"
    );
    assert!(
        text.contains("-A OUTPUT -p tcp -j RAMPART_OUTPUT\n"),
        "{text}"
    );
    assert!(text.ends_with("COMMIT\n"), "{text}");
}

#[test]
#[ignore = "needs root, network namespaces and iptables (as root: cargo test -- --include-ignored)"]
fn dry_run_changes_nothing() {
    support::require_root();
    let net = Net::new("dryrun");
    let pod = net.pod("app");
    let before = nat_rules(&pod);
    init(&pod, &["--dry-run"]);
    assert_eq!(nat_rules(&pod), before);
    assert!(!before.contains("RAMPART"), "{before}");
}

#[test]
#[ignore = "needs root, network namespaces and iptables (as root: cargo test -- --include-ignored)"]
fn installs_rules_idempotently() {
    support::require_root();
    let net = Net::new("idem");
    let pod = net.pod("app");
    init(&pod, &["--exclude-inbound-ports=22"]);
    let once = nat_rules(&pod);
    for expected in [
        "-A PREROUTING -p tcp -j RAMPART_INBOUND",
        "-A OUTPUT -p tcp -j RAMPART_OUTPUT",
        "-A RAMPART_INBOUND -p tcp -m tcp --dport 22 -j RETURN",
        "-A RAMPART_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
        "-A RAMPART_OUTPUT -m owner --uid-owner 2102 -j RETURN",
        "-A RAMPART_OUT_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        "-A RAMPART_OUTPUT -d ::1/128 -j RETURN",
    ] {
        assert!(once.contains(expected), "{expected:?} missing from\n{once}");
    }
    init(&pod, &["--exclude-inbound-ports=22"]);
    assert_eq!(nat_rules(&pod), once, "a second run changed the rules");
}

#[test]
#[ignore = "needs root, network namespaces and iptables (as root: cargo test -- --include-ignored)"]
fn clean_removes_only_its_own_chains_and_jumps() {
    support::require_root();
    let net = Net::new("clean");
    let pod = net.pod("app");
    pod.exec_ok(["iptables", "-t", "nat", "-N", "USER_CHAIN"]);
    pod.exec_ok([
        "iptables",
        "-t",
        "nat",
        "-A",
        "USER_CHAIN",
        "-p",
        "tcp",
        "--dport",
        "9",
        "-j",
        "RETURN",
    ]);
    pod.exec_ok([
        "iptables",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "-j",
        "USER_CHAIN",
    ]);
    let before = nat_rules(&pod);

    init(&pod, &[]);
    // A second, different install must not leave the first one's jumps.
    init(&pod, &["--exclude-outbound-ports=443"]);
    assert!(nat_rules(&pod).contains("RAMPART_"));
    init(&pod, &["--clean"]);
    assert_eq!(nat_rules(&pod), before);
    // Cleaning a clean table is fine too.
    init(&pod, &["--clean"]);
    assert_eq!(nat_rules(&pod), before);
}

/// Who answers a connection, as the whoami server reports it.
struct Case<'a> {
    what: &'static str,
    uid: u32,
    dst: &'a Pod,
    dst_port: u16,
    expected_listener: u16,
}

#[test]
#[ignore = "needs root, network namespaces and iptables (as root: cargo test -- --include-ignored)"]
fn captures_outbound_except_proxy_uid_and_excluded_ports() {
    support::require_root();
    let net = Net::new("outbound");
    let app = net.pod("app");
    let server = net.pod("server");
    let database = net.pod("database");
    let excluded_cidr = format!("--exclude-outbound-cidrs={}/32", database.ip());
    init(&app, &["--exclude-outbound-ports=9090", &excluded_cidr]);
    let _proxy = app.spawn(apps::whoami_server(&[OUTBOUND_PORT]));
    let _server = server.spawn(apps::whoami_server(&[8080, 9090]));
    let _database = database.spawn(apps::whoami_server(&[8080]));
    for port in [8080, 9090] {
        server.wait_tcp_listening(port, WAIT);
    }
    database.wait_tcp_listening(8080, WAIT);
    app.wait_tcp_listening(OUTBOUND_PORT, WAIT);

    #[rustfmt::skip]
    let cases = [
        Case { what: "app traffic is redirected", uid: 1000, dst: &server, dst_port: 8080, expected_listener: OUTBOUND_PORT },
        Case { what: "root's traffic is redirected", uid: 0, dst: &server, dst_port: 8080, expected_listener: OUTBOUND_PORT },
        Case { what: "the proxy's own traffic is not", uid: PROXY_UID, dst: &server, dst_port: 8080, expected_listener: 8080 },
        Case { what: "an excluded port is not", uid: 1000, dst: &server, dst_port: 9090, expected_listener: 9090 },
        Case { what: "an excluded network is not", uid: 1000, dst: &database, dst_port: 8080, expected_listener: 8080 },
    ];
    for case in cases {
        let dst = case.dst.addr(case.dst_port);
        let output = app.exec_as(case.uid, apps::client(dst, "hello"));
        let reply = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{}: {output:?}", case.what);
        assert!(
            reply.starts_with(&format!("port={} ", case.expected_listener)),
            "{}: got {reply:?}",
            case.what
        );
        if case.expected_listener == OUTBOUND_PORT {
            // The outbound listener learns where the app meant to go.
            assert_eq!(
                reply.trim_end(),
                format!("port={OUTBOUND_PORT} orig={dst}"),
                "{}",
                case.what
            );
        }
    }
}

#[test]
#[ignore = "needs root, network namespaces and iptables (as root: cargo test -- --include-ignored)"]
fn captures_inbound_except_excluded_ports() {
    support::require_root();
    let net = Net::new("inbound");
    let app = net.pod("app");
    let client = net.pod("client");
    init(&app, &["--exclude-inbound-ports=7070"]);
    let _app = app.spawn(apps::whoami_server(&[INBOUND_PORT, 8080, 7070]));
    for port in [INBOUND_PORT, 8080, 7070] {
        app.wait_tcp_listening(port, WAIT);
    }

    let to_app = client.exec_ok(apps::client(app.addr(8080), ""));
    assert_eq!(
        to_app.trim_end(),
        format!("port={INBOUND_PORT} orig={}", app.addr(8080))
    );
    let excluded = client.exec_ok(apps::client(app.addr(7070), ""));
    assert!(excluded.starts_with("port=7070 "), "{excluded}");
}

#[test]
#[ignore = "needs root, network namespaces and iptables (as root: cargo test -- --include-ignored)"]
fn app_to_own_pod_ip_is_not_captured() {
    support::require_root();
    let net = Net::new("self");
    let app = net.pod("app");
    init(&app, &[]);
    let _app = app.spawn(apps::whoami_server(&[OUTBOUND_PORT, INBOUND_PORT, 8080]));
    app.wait_tcp_listening(8080, WAIT);
    // The pod's own IP is routed through lo: traffic that never leaves the pod.
    let reply = app.exec_as(1000, apps::client(app.addr(8080), ""));
    assert!(
        String::from_utf8_lossy(&reply.stdout).starts_with("port=8080 "),
        "{reply:?}"
    );
}

#[test]
#[ignore = "needs root, network namespaces and iptables (as root: cargo test -- --include-ignored)"]
fn include_list_limits_capture_to_its_networks() {
    support::require_root();
    let net = Net::new("include");
    let app = net.pod("app");
    let mesh = net.pod("mesh");
    let outside = net.pod("outside");
    init(&app, &[&format!("--include-outbound-cidrs={}", mesh.ip())]);
    let _proxy = app.spawn(apps::whoami_server(&[OUTBOUND_PORT]));
    let _mesh = mesh.spawn(apps::whoami_server(&[8080]));
    let _outside = outside.spawn(apps::whoami_server(&[8080]));
    app.wait_tcp_listening(OUTBOUND_PORT, WAIT);
    mesh.wait_tcp_listening(8080, WAIT);
    outside.wait_tcp_listening(8080, WAIT);

    let to_mesh = app.exec_ok(apps::client(mesh.addr(8080), ""));
    assert!(
        to_mesh.starts_with(&format!("port={OUTBOUND_PORT} ")),
        "{to_mesh}"
    );
    let to_outside = app.exec_ok(apps::client(outside.addr(8080), ""));
    assert!(to_outside.starts_with("port=8080 "), "{to_outside}");
}

#[test]
#[ignore = "needs root, network namespaces and iptables (as root: cargo test -- --include-ignored)"]
fn refuses_clearly_when_it_cannot_work() {
    support::require_root();
    let net = Net::new("refuse");
    let pod = net.pod("app");
    let not_root = pod.exec_as(1000, [rampart_bin(), "init"]);
    let no_iptables = pod.exec(["env", "PATH=/nonexistent", rampart_bin(), "init"]);
    let bad_cidr = pod.exec([
        rampart_bin(),
        "init",
        "--exclude-outbound-cidrs=10.0.0.0/40",
    ]);
    for (output, expected) in [
        (not_root, "needs CAP_NET_ADMIN"),
        (no_iptables, "`iptables-save` was not found in PATH"),
        (bad_cidr, "'--exclude-outbound-cidrs <CIDRS>'"),
    ] {
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{expected}: {output:?}");
        assert!(stderr.contains(expected), "{expected:?} not in {stderr}");
    }
    assert!(!nat_rules(&pod).contains("RAMPART"));
}
