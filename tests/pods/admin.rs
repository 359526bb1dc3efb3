//! The admin API from outside the pod (issue 19, S1): with `admin.address`
//! on every interface, as on Kubernetes, a client in another network
//! namespace reaches the probe endpoints only; the mutating and sensitive
//! ones answer the pod's own loopback.

use crate::support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use rampart_app::config::{Config, IdentityConfig};
use support::sidecar::inbound_listener;
use support::{Net, Pki, Pod, TempDir, rampart_bin};

const ADMIN_PORT: u16 = 15000;

/// One HTTP/1.1 request from inside `pod` to `addr`: the status and body,
/// or None when nothing answers.
fn call(
    pod: &Pod,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> Option<(u16, String)> {
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    pod.in_netns(move || {
        let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
        c.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        c.write_all(request.as_bytes()).ok()?;
        let mut s = String::new();
        c.read_to_string(&mut s).ok()?;
        let status = s.split(' ').nth(1)?.parse().ok()?;
        let (_, body) = s.split_once("\r\n\r\n")?;
        Some((status, body.to_owned()))
    })
}

#[test]
#[ignore = "needs root and network namespaces (as root: cargo test -- --include-ignored)"]
fn admin_api_serves_only_probes_outside_the_pod() {
    support::require_root();
    let dir = TempDir::new();
    let pki = Pki::new("example.org");
    let svid = pki.issue_into(
        "spiffe://example.org/ns/default/sa/app",
        &dir.path().join("app"),
    );
    let net = Net::new("admin");
    let pod = net.pod("app");
    let outsider = net.pod("outsider");

    let mut cfg = Config::new(IdentityConfig::files_in(&svid));
    cfg.listeners.push(inbound_listener(
        "in",
        SocketAddr::from(([0, 0, 0, 0], 15006)),
        SocketAddr::from(([127, 0, 0, 1], 8080)),
    ));
    // What injection writes on Kubernetes: the kubelet must reach it.
    cfg.admin.address = SocketAddr::from(([0, 0, 0, 0], ADMIN_PORT));
    let path = dir.write("app.yaml", cfg.to_yaml());
    let mut proc = pod.spawn([rampart_bin(), "run", "--config", path.to_str().unwrap()]);
    let inside = SocketAddr::from(([127, 0, 0, 1], ADMIN_PORT));
    let outside = pod.addr(ADMIN_PORT);
    let deadline = Instant::now() + Duration::from_secs(15);
    while call(&pod, inside, "GET", "/ready", "").map(|r| r.0) != Some(200) {
        assert!(Instant::now() < deadline, "not ready:\n{}", proc.logs());
        std::thread::sleep(Duration::from_millis(50));
    }

    // The kubelet's and the scraper's view: the probes answer.
    for p in ["/live", "/ready", "/metrics"] {
        let r = call(&outsider, outside, "GET", p, "");
        assert_eq!(
            r.as_ref().map(|r| r.0),
            Some(200),
            "GET {p} from outside: {r:?}"
        );
    }
    // Everything else is refused, including paths that do not exist (a
    // path added later is loopback-only by default).
    for (method, p, body) in [
        ("POST", "/drain", ""),
        ("PUT", "/logging", "trace"),
        ("POST", "/logging", "trace"),
        ("GET", "/logging", ""),
        ("GET", "/config", ""),
        ("GET", "/identity", ""),
        ("GET", "/policy", ""),
        ("GET", "/app-health/app/livez", ""),
        ("GET", "/not-yet-written", ""),
    ] {
        let r = call(&outsider, outside, method, p, body);
        assert_eq!(
            r.as_ref().map(|r| r.0),
            Some(403),
            "{method} {p} from outside: {r:?}"
        );
    }
    assert!(
        proc.try_status().is_none(),
        "the outsider's /drain stopped the sidecar"
    );
    let level = call(&pod, inside, "GET", "/logging", "").unwrap().1;
    assert!(
        !level.contains("trace"),
        "the outsider changed the log filter: {level}"
    );
    let metrics = call(&pod, inside, "GET", "/metrics", "").unwrap().1;
    assert!(
        metrics.contains("rampart_admin_requests_refused_total 9"),
        "refusals counted:\n{metrics}"
    );

    // Inside the pod, on loopback, everything works.
    for p in ["/config", "/identity", "/policy"] {
        let r = call(&pod, inside, "GET", p, "");
        assert_eq!(
            r.as_ref().map(|r| r.0),
            Some(200),
            "GET {p} from loopback: {r:?}"
        );
    }
    assert_eq!(
        call(&pod, inside, "PUT", "/logging", "info").map(|r| r.0),
        Some(200)
    );
    assert_eq!(
        call(&pod, inside, "POST", "/drain", "").map(|r| r.0),
        Some(202)
    );
    let status = proc.wait_exit(Duration::from_secs(30));
    assert!(
        status.success(),
        "drained from loopback: {status:?}\n{}",
        proc.logs()
    );
}
