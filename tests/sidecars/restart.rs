//! A hot restart on the same host (issue 19, item 12): listeners are bound
//! with `SO_REUSEPORT`, so a replacement sidecar binds the same ports while
//! the old one still serves; the old one then drains and exits, and no
//! request fails on the way.

use crate::observability::{eventually, get, pair_with_files, same};
use crate::support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rampart_app::config::Config;
use support::sidecar::{Sidecar, free_addr};

/// ec-web may GET /data on ec-backend.
const POLICY: &str = "policies:\n  - name: backend\n    action: ALLOW\n    rules:\n      - name: web-gets\n        from: {principals: [\"spiffe://example.org/ec-web\"]}\n        to: {methods: [GET], paths: [\"/data\"]}\n";

#[test]
fn a_replacement_binds_the_same_ports_and_the_old_one_drains_without_a_failed_request() {
    let mut p = pair_with_files(POLICY, &[], &same, &same);
    assert_eq!(get(p.out, "/data", &[]).0, 200, "{}", p.backend.logs());

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

    // The same configuration (same listeners), its own admin address so
    // that the test can tell the two apart.
    let dir = p.pki.dir.path().to_owned();
    let mut cfg = Config::load(&dir.join("ec-backend.yaml")).expect("the backend's configuration");
    cfg.admin.address = free_addr();
    let next = Sidecar::start(&dir, "ec-backend-next", &cfg);
    std::thread::sleep(Duration::from_millis(500));

    assert_eq!(p.backend.admin("POST", "/drain", "").0, 202);
    let exited = p.backend.wait_exit(Duration::from_secs(30));
    assert!(
        exited.is_some(),
        "the old sidecar did not drain:\n{}",
        p.backend.logs()
    );
    // Traffic now only reaches the replacement.
    let served_before = ok.load(Ordering::SeqCst);
    assert!(
        eventually(Duration::from_secs(10), || ok.load(Ordering::SeqCst)
            > served_before + 10),
        "no traffic after the drain:\n{}",
        next.logs()
    );
    stop.store(true, Ordering::SeqCst);
    let statuses = load.join().unwrap();
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "failed requests {statuses:?} of {}:\nold:\n{}\nnew:\n{}",
        ok.load(Ordering::SeqCst),
        p.backend.logs(),
        next.logs()
    );
    assert_eq!(next.get("/ready"), Some(200));
    let _ = (&p.web, p.inbound);
}

/// A drain does not close an HTTP/1 keep-alive connection under its
/// client (`limits.http1_drain_grace`): ec-web's pooled connection to the
/// draining ec-backend, whose listener is already closed, still carries
/// the next request, whose response says `Connection: close`; the backend
/// then exits as soon as that connection is done, not when the grace or
/// the drain timeout (both two minutes here) ends.
#[test]
fn a_draining_sidecar_serves_the_next_request_on_a_kept_alive_connection_then_exits() {
    let long = |c: &mut Config| {
        c.limits.drain_timeout = Duration::from_secs(120);
        c.limits.http1_drain_grace = Duration::from_secs(120);
    };
    let mut p = pair_with_files(POLICY, &[], &long, &same);
    // The hop connection from ec-web to ec-backend is pooled now.
    assert_eq!(get(p.out, "/data", &[]).0, 200, "{}", p.backend.logs());

    assert_eq!(p.backend.admin("POST", "/drain", "").0, 202);
    assert!(
        eventually(Duration::from_secs(10), || p.backend.get("/ready")
            != Some(200)),
        "still ready after /drain"
    );
    assert_eq!(
        get(p.out, "/data", &[]).0,
        200,
        "the request on the kept-alive connection failed:\nbackend:\n{}\nweb:\n{}",
        p.backend.logs(),
        p.web.logs()
    );
    let exited = p.backend.wait_exit(Duration::from_secs(60));
    assert!(
        exited.is_some_and(|s| s.success()),
        "the backend did not exit once its last connection closed: {exited:?}\n{}",
        p.backend.logs()
    );
    assert!(p.backend.logs().contains("drained"), "{}", p.backend.logs());
}
