//! Hostile policy files (issue 19, R1): a Rego module that regorus would
//! take hours to parse, written over a good one while traffic flows, or
//! present at start, never stalls the data plane or the admin API.

use crate::observability::{
    eventually, get, pair_with_files, rego_allow_get, same, sample, write_atomically,
};
use crate::support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rampart_proxy::policy::CompileBudget;
use support::sidecar::{Loopback, Sidecar, free_addr, inbound_listener};

/// The module that took a sidecar down (R1): 26 nested brackets, which
/// regorus 0.14 parses in time exponential in their depth (20 take 23 s).
fn bracket_bomb(depth: usize) -> String {
    format!(
        "package envoy.authz\n\ndefault allow := false\n\nallow if {{\n  x := {}1{}\n}}\n",
        "[".repeat(depth),
        "]".repeat(depth)
    )
}

/// A module whose rule nests `depth` objects (`{"a": {"a": ... 1}}`).
fn object_nest(depth: usize) -> String {
    format!(
        "package envoy.authz\n\ndefault allow := false\n\nallow if {{\n  x := {}1{}\n}}\n",
        "{\"a\": ".repeat(depth),
        "}".repeat(depth)
    )
}

/// Rego allowing GET of any of `paths`.
fn rego_allow_paths(paths: &[&str]) -> String {
    let set: Vec<String> = paths
        .iter()
        .map(|p| format!("\"{}\"", p.trim_start_matches('/')))
        .collect();
    format!(
        "package envoy.authz\n\ndefault allow := false\n\nallow if {{\n  input.attributes.request.http.method == \"GET\"\n  input.parsed_path[0] in {{{}}}\n}}\n",
        set.join(", ")
    )
}

/// `GET /live` on the admin API within `within`; its status, or None.
fn live_within(admin: SocketAddr, within: Duration) -> Option<u16> {
    let mut c = TcpStream::connect_timeout(&admin, within).ok()?;
    c.set_read_timeout(Some(within)).ok()?;
    c.write_all(b"GET /live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut s = String::new();
    c.read_to_string(&mut s).ok()?;
    s.split(' ').nth(1)?.parse().ok()
}

#[test]
fn a_bracket_bomb_written_under_traffic_changes_nothing_and_a_later_edit_applies() {
    let p = pair_with_files(
        "policies:\n  - name: backend\n    kind: rego\n    modules: [backend.rego]\n",
        &[("backend.rego", &rego_allow_get("/data"))],
        &same,
        &same,
    );
    assert_eq!(get(p.out, "/data", &[]).0, 200, "{}", p.backend.logs());
    let module = p.policy.with_file_name("backend.rego");

    // Traffic for the whole test: every request's status is recorded.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let load = {
        let (stop, ok, failed, out) = (stop.clone(), ok.clone(), failed.clone(), p.out);
        std::thread::spawn(move || {
            let mut statuses = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                match get(out, "/data", &[]).0 {
                    200 => ok.fetch_add(1, Ordering::SeqCst),
                    s => {
                        statuses.push(s);
                        failed.fetch_add(1, Ordering::SeqCst)
                    }
                };
            }
            statuses
        })
    };
    std::thread::sleep(Duration::from_millis(500));

    write_atomically(&module, &bracket_bomb(26));
    assert!(
        eventually(Duration::from_secs(5), || {
            sample(
                &p.backend.metrics(),
                "rampart_policy_reloads_total{result=\"error\"}",
            ) == 1.0
        }),
        "the bomb was not refused:\n{}",
        p.backend.logs()
    );
    let logs = p.backend.logs();
    assert!(
        logs.contains("brackets nest deeper than 12 levels") && logs.contains("backend.rego"),
        "refusal logged with the file:\n{logs}"
    );
    // The admin API answers at once, and keeps answering.
    let before = ok.load(Ordering::SeqCst);
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert_eq!(
            live_within(p.backend.admin_addr(), Duration::from_secs(1)),
            Some(200),
            "/live stalled:\n{}",
            p.backend.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        ok.load(Ordering::SeqCst) > before + 5,
        "traffic stalled under the last good policy"
    );

    // A later valid edit is picked up.
    write_atomically(&module, &rego_allow_paths(&["/data", "/other"]));
    assert!(
        eventually(Duration::from_secs(5), || get(p.out, "/other", &[]).0
            == 200),
        "the later edit was not applied:\n{}",
        p.backend.logs()
    );
    stop.store(true, Ordering::SeqCst);
    let statuses = load.join().unwrap();
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "failed requests (statuses {statuses:?}) of {}",
        ok.load(Ordering::SeqCst)
    );
    let _ = (&p.pki, &p.web, p.inbound);
}

/// A policy over budget at start is a configuration error: `rampart run`
/// exits 64 at once with the reason, rather than never answering `/live`.
#[test]
fn a_policy_over_budget_at_start_exits_with_the_reason() {
    let pki = Loopback::new();
    let module = pki.dir.path().join("backend.rego");
    let policy = pki.dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        "policies:\n  - name: backend\n    kind: rego\n    modules: [backend.rego]\n",
    )
    .unwrap();
    let (listen, target) = (free_addr(), free_addr());
    let default = CompileBudget::default();
    let cases = [
        // The nesting guard: refused before regorus sees it.
        (
            bracket_bomb(26),
            default,
            "brackets nest deeper than 12 levels",
        ),
        // The time budget: within the nesting limit (11 levels), but 10 nested objects
        // take regorus far more than a millisecond (tens of ms and up).
        (
            object_nest(10),
            CompileBudget {
                time: Duration::from_millis(1),
                ..default
            },
            "took longer than the 1ms budget",
        ),
        // The size budget.
        (
            rego_allow_get("/data"),
            CompileBudget {
                max_bytes: 64,
                ..default
            },
            "over the 64-byte budget",
        ),
    ];
    for (i, (source, budget, reason)) in cases.into_iter().enumerate() {
        std::fs::write(&module, source).unwrap();
        let mut cfg = pki.config("spiffe://example.org/ec-backend");
        cfg.listeners.push(inbound_listener("in", listen, target));
        cfg.inbound.policies = vec![policy.clone()];
        cfg.inbound.policy_budget = budget;
        let mut s = Sidecar::spawn(pki.dir.path(), &format!("start-{i}"), &cfg);
        let status = s.wait_exit(Duration::from_secs(30));
        let logs = s.logs();
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(64),
            "case {i}: not a configuration error:\n{logs}"
        );
        assert!(logs.contains(reason), "case {i}: reason missing:\n{logs}");
    }
}
