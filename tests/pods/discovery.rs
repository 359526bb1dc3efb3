//! Discovery end to end with the static file source, in network
//! namespaces: a client pod whose app dials a service's virtual IP, its
//! captured connection balanced per request over the backend pods the
//! endpoints file names, each backend's sidecar held to the SPIFFE ID the
//! file gives it.

use crate::support;

use std::collections::BTreeMap;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rampart_app::config::{Config, IdentityConfig, PortConfig};
use rampart_discovery::dns::{DnsConfig, DnsName};
use rampart_proxy::config::TransparentConfig;
use support::pki::parse_id;
use support::{Net, PROXY_UID, Pki, Pod, Proc, TempDir, apps, rampart_bin};

pub(crate) const APP_PORT: u16 = 8080;
pub(crate) const APP_UID: u32 = 1000;
pub(crate) const WAIT: Duration = Duration::from_secs(15);
const BACKEND_ID: &str = "spiffe://example.org/backend";
const CLIENT_ID: &str = "spiffe://example.org/client";

pub(crate) fn issue(pki: &Pki, dir: &TempDir, id: &str) -> PathBuf {
    let leaf = id.rsplit('/').next().unwrap();
    let out = pki.issue_into(id, &dir.path().join(format!("svid-{leaf}")));
    for f in ["", "svid.pem", "svid.key", "bundle.pem"] {
        std::os::unix::fs::chown(out.join(f), Some(PROXY_UID), Some(PROXY_UID)).unwrap();
    }
    out
}

/// Runs `rampart init` in `pod`, then its sidecar (capturing, with the
/// SVID in `svid`) as the proxy UID, with the configuration `edit` makes;
/// returns once it is ready.
pub(crate) fn sidecar(
    pod: &Pod,
    dir: &TempDir,
    svid: &Path,
    edit: impl FnOnce(&mut Config),
) -> Proc {
    pod.exec_ok([rampart_bin(), "init"]);
    let mut cfg = Config::new(IdentityConfig::files_in(svid));
    cfg.transparent = Some(TransparentConfig::default());
    cfg.log.level = "info".into();
    edit(&mut cfg);
    let path = dir.write(&format!("{}.yaml", pod.name()), cfg.to_yaml());
    let proc = pod.spawn_as(
        PROXY_UID,
        [rampart_bin(), "run", "--config", path.to_str().unwrap()],
    );
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if pod
            .admin_get("/ready")
            .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
        {
            return proc;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("sidecar in {} not ready:\n{}", pod.name(), proc.logs());
}

/// An HTTP/1.1 backend answering every GET with its name; while the file
/// `<slow>` exists, each answer waits 20 ms first.
pub(crate) const BACKEND: &str = r#"
import os, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
port, name, slow = int(sys.argv[1]), sys.argv[2], sys.argv[3]
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        if os.path.exists(slow):
            time.sleep(0.02)
        body = name.encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer(("0.0.0.0", port), H).serve_forever()
"#;

/// Sends `n` GETs on ONE keep-alive connection to `host:port` (with a 4th
/// argument, for that many seconds instead) and prints a JSON object:
/// answers per body, failures per status or error, and the wall-clock
/// time of each body's first and last answer.
pub(crate) const LOAD: &str = r#"
import http.client, json, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
until = time.time() + float(sys.argv[4]) if len(sys.argv) > 4 else None
counts, failures, first, last = {}, {}, {}, {}
conn = http.client.HTTPConnection(host, port, timeout=10)
i = 0
while (i < n) if until is None else (time.time() < until):
    i += 1
    try:
        conn.request("GET", "/")
        r = conn.getresponse()
        body = r.read().decode()
        if r.status == 200:
            counts[body] = counts.get(body, 0) + 1
            now = time.time()
            first.setdefault(body, now)
            last[body] = now
        else:
            key = "%d %s" % (r.status, body[:120])
            failures[key] = failures.get(key, 0) + 1
    except Exception as e:
        key = type(e).__name__
        failures[key] = failures.get(key, 0) + 1
        conn.close()
        conn = http.client.HTTPConnection(host, port, timeout=10)
print(json.dumps({"counts": counts, "failures": failures, "first": first, "last": last}))
"#;

pub(crate) fn python(script: &str, args: &[String]) -> Vec<String> {
    let mut v = vec![
        apps::python().expect("python3"),
        "-u".into(),
        "-c".into(),
        script.into(),
    ];
    v.extend(args.iter().cloned());
    v
}

pub(crate) struct Load {
    pub(crate) counts: BTreeMap<String, u64>,
    pub(crate) failures: BTreeMap<String, u64>,
    /// Wall-clock seconds of the first and last answer of each backend.
    pub(crate) first: BTreeMap<String, f64>,
    pub(crate) last: BTreeMap<String, f64>,
}

pub(crate) fn load(client: &Pod, to: SocketAddr, n: usize) -> Load {
    finish_load(start_load(client, to, n, None))
}

/// Starts the load client in `client`: `n` requests, or `seconds` of them.
pub(crate) fn start_load(client: &Pod, to: SocketAddr, n: usize, seconds: Option<f64>) -> Proc {
    let mut args = vec![to.ip().to_string(), to.port().to_string(), n.to_string()];
    args.extend(seconds.map(|s| s.to_string()));
    client.spawn_as(APP_UID, python(LOAD, &args))
}

/// Waits for a load client and reads its report.
pub(crate) fn finish_load(mut proc: Proc) -> Load {
    // Debug builds on a shared machine: a few ms per request.
    let status = proc.wait_exit(Duration::from_secs(300));
    let text = proc.stdout();
    let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "load ({status}) output {text:?}: {e}; stderr: {}",
            proc.stderr()
        )
    });
    let map = |k: &str| {
        v[k].as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
            .collect()
    };
    let times = |k: &str| {
        v[k].as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_f64().unwrap()))
            .collect()
    };
    Load {
        counts: map("counts"),
        failures: map("failures"),
        first: times("first"),
        last: times("last"),
    }
}

pub(crate) struct Backend {
    pub(crate) pod: Pod,
    pub(crate) app: Proc,
    pub(crate) sidecar: Proc,
    pub(crate) slow: PathBuf,
}

/// Backend pod `name`: the app and a sidecar presenting `id`, admitting
/// only `client`.
pub(crate) fn backend(
    net: &Net,
    pki: &Pki,
    dir: &TempDir,
    name: &str,
    id: &str,
    client: &str,
) -> Backend {
    let pod = net.pod(name);
    let slow = dir.path().join(format!("slow-{name}"));
    let app = pod.spawn_as(
        APP_UID,
        python(
            BACKEND,
            &[
                APP_PORT.to_string(),
                name.to_owned(),
                slow.display().to_string(),
            ],
        ),
    );
    pod.wait_tcp_listening(APP_PORT, WAIT);
    let svid = issue(pki, dir, id);
    let sidecar = sidecar(&pod, dir, &svid, |c| {
        c.inbound.ports = vec![PortConfig {
            allowed_peers: Some(vec![parse_id(client)]),
            ..PortConfig::new(APP_PORT)
        }]
    });
    Backend {
        pod,
        app,
        sidecar,
        slow,
    }
}

/// The endpoints file: service `backend` at `vip`, with `endpoints`
/// (address, expected identity).
fn endpoints_file(vip: SocketAddr, endpoints: &[(SocketAddr, &str)]) -> String {
    let mut s =
        format!("services:\n  - name: backend\n    destinations: [\"{vip}\"]\n    endpoints:\n");
    if endpoints.is_empty() {
        s = format!(
            "services:\n  - name: backend\n    destinations: [\"{vip}\"]\n    endpoints: []\n"
        );
    }
    for (a, id) in endpoints {
        s.push_str(&format!("      - address: {a}\n        identity: {id}\n"));
    }
    s
}

struct Mesh {
    _net: Net,
    dir: TempDir,
    backends: Vec<Backend>,
    client: Pod,
    client_sidecar: Proc,
    vip: SocketAddr,
    file: PathBuf,
}

/// `n` backends named b0.. presenting `ids[i]` (default: the backend ID),
/// listed in the file as expecting the backend ID; a client pod whose
/// sidecar reads the file.
fn mesh(name: &str, ids: &[&str]) -> Mesh {
    support::require_root();
    let net = Net::new(name);
    let dir = TempDir::new();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let pki = Pki::new("example.org");
    let backends: Vec<Backend> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| backend(&net, &pki, &dir, &format!("b{i}"), id, CLIENT_ID))
        .collect();
    let client = net.pod("client");
    // An address on the pods' subnet that nothing answers: only the
    // sidecar knows where it leads.
    let vip = SocketAddr::new(
        std::net::IpAddr::V4(std::net::Ipv4Addr::from(
            u32::from(client.ip()) & 0xffff_ff00 | 200,
        )),
        80,
    );
    let eps: Vec<_> = backends
        .iter()
        .map(|b| (b.pod.addr(APP_PORT), BACKEND_ID))
        .collect();
    let file = dir.write("endpoints.yaml", endpoints_file(vip, &eps));
    let client_sidecar = sidecar(&client, &dir, &issue(&pki, &dir, CLIENT_ID), |c| {
        c.discovery.file = Some(file.clone())
    });
    Mesh {
        _net: net,
        dir,
        backends,
        client,
        client_sidecar,
        vip,
        file,
    }
}

pub(crate) fn share(l: &Load, name: &str) -> f64 {
    let total: u64 = l.counts.values().sum();
    *l.counts.get(name).unwrap_or(&0) as f64 / total.max(1) as f64
}

pub(crate) fn metric(pod: &Pod, series: &str) -> f64 {
    let text = pod.admin_get("/metrics").unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with(series))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
#[ignore = "needs root, network namespaces and iptables (as root: cargo test -- --include-ignored)"]
fn file_source_balances_requests_of_one_connection_and_avoids_a_slow_backend() {
    let m = mesh("disc-lb", &[BACKEND_ID, BACKEND_ID, BACKEND_ID]);
    let first = load(&m.client, m.vip, 3000);
    eprintln!("3 equal backends, 3000 requests: {:?}", first.counts);
    assert!(
        first.failures.is_empty(),
        "{:?}\n{}",
        first.failures,
        m.client_sidecar.logs()
    );
    for b in ["b0", "b1", "b2"] {
        let s = share(&first, b);
        assert!((0.28..=0.38).contains(&s), "{b}: {s} of {:?}", first.counts);
    }
    std::fs::write(&m.backends[0].slow, b"").unwrap();
    let slowed = load(&m.client, m.vip, 3000);
    eprintln!("b0 slowed by 20 ms, 3000 requests: {:?}", slowed.counts);
    assert!(slowed.failures.is_empty(), "{:?}", slowed.failures);
    let s = share(&slowed, "b0");
    assert!(s < 0.15, "slow b0 got {s} of {:?}", slowed.counts);
    // The admin listing names the service, its endpoints and their IDs.
    let listing = m
        .client
        .admin_get(&format!("/discovery?dst={}", m.vip))
        .unwrap();
    assert!(listing.contains("\"service\": \"backend\""), "{listing}");
    for b in &m.backends {
        assert!(
            listing.contains(&format!("\"address\": \"{}\"", b.pod.addr(APP_PORT))),
            "{listing}"
        );
    }
    assert!(listing.contains(BACKEND_ID), "{listing}");
    assert!(
        metric(
            &m.client,
            "rampart_discovery_requests_total{service=\"backend\",result=\"answered\"}"
        ) >= 6000.0
    );
}

#[test]
#[ignore = "needs root, network namespaces and iptables (as root: cargo test -- --include-ignored)"]
fn file_source_endpoint_presenting_another_identity_is_refused_in_the_handshake() {
    // b2's sidecar has a valid SVID of the trust domain, but not the
    // backend's: the file says b2 must be the backend.
    let m = mesh(
        "disc-id",
        &[BACKEND_ID, BACKEND_ID, "spiffe://example.org/intruder"],
    );
    let l = load(&m.client, m.vip, 300);
    eprintln!(
        "with an intruder endpoint, 300 requests: {:?} failed {:?}",
        l.counts, l.failures
    );
    assert!(
        l.failures.is_empty(),
        "{:?}\n{}",
        l.failures,
        m.client_sidecar.logs()
    );
    assert_eq!(l.counts.get("b2"), None, "{:?}", l.counts);
    assert_eq!(l.counts.values().sum::<u64>(), 300);
    let refused = metric(
        &m.client,
        "rampart_discovery_ejections_total{service=\"backend\",reason=\"handshake\"}",
    );
    assert!(
        refused >= 1.0,
        "{}",
        m.client.admin_get("/metrics").unwrap()
    );
    let handshakes = metric(
        &m.client,
        "rampart_tls_handshakes_total{direction=\"outbound\",result=\"id_not_allowed\"}",
    );
    assert!(handshakes >= 1.0);
    let logs = m.client_sidecar.logs();
    assert!(logs.contains("endpoint ejected"), "{logs}");
    // The intruder's app never saw a request; its sidecar saw no mTLS
    // session complete for the client.
    assert!(
        !m.backends[2]
            .sidecar
            .logs()
            .contains("peer.id=spiffe://example.org/client")
    );
}

#[test]
#[ignore = "needs root, network namespaces and iptables (as root: cargo test -- --include-ignored)"]
fn file_source_service_without_endpoints_answers_503_and_reloads() {
    let m = mesh("disc-empty", &[BACKEND_ID]);
    std::fs::write(&m.file, endpoints_file(m.vip, &[])).unwrap();
    // Reloaded within the poll interval.
    let deadline = Instant::now() + WAIT;
    let mut last;
    loop {
        let started = Instant::now();
        last = load(&m.client, m.vip, 1);
        if last.failures.keys().any(|k| k.starts_with("503")) {
            // At once: no connect attempt, no timeout.
            assert!(started.elapsed() < Duration::from_secs(2));
            break;
        }
        assert!(Instant::now() < deadline, "{:?}", last.failures);
        std::thread::sleep(Duration::from_millis(200));
    }
    let reason = last.failures.keys().next().unwrap().clone();
    assert!(
        reason.contains("service backend has no endpoints"),
        "{reason}"
    );
    // A broken file keeps the last good version (still no endpoints).
    std::fs::write(&m.file, "services:\n  - name: [\n").unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(m.client_sidecar.logs().contains("endpoints file rejected"));
    // A good one with the endpoint back is served again.
    let eps = [(m.backends[0].pod.addr(APP_PORT), BACKEND_ID)];
    std::fs::write(&m.file, endpoints_file(m.vip, &eps)).unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let l = load(&m.client, m.vip, 1);
        if l.counts.get("b0") == Some(&1) {
            break;
        }
        assert!(Instant::now() < deadline, "{:?}", l.failures);
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = &m.dir;
}

/// A DNS server (UDP, port 53): answers A and SRV queries from the JSON
/// file `<records>` (read on every query; `{"name.": ["10.0.0.1", ...]}`
/// for A records, `{"_http._tcp.name.": [{"priority": 0, "port": 8080,
/// "target": "host."}, ...]}` for SRV), TTL 1 s; an unknown name is
/// NXDOMAIN; a known name asked for another type has no answer (NODATA).
const DNS: &str = r#"
import json, socket, struct, sys
records = sys.argv[1]
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("0.0.0.0", 53))
while True:
    q, peer = sock.recvfrom(512)
    try:
        qid, flags = struct.unpack("!HH", q[:4])
        i, labels = 12, []
        while q[i]:
            labels.append(q[i + 1 : i + 1 + q[i]].decode().lower())
            i += 1 + q[i]
        qtype, qclass = struct.unpack("!HH", q[i + 1 : i + 5])
        question = q[12 : i + 5]
        name = ".".join(labels) + "."
        with open(records) as f:
            table = json.load(f)
        answers = []
        rcode = 0
        if name not in table:
            rcode = 3
        elif qtype == 1:
            for ip in table[name]:
                if isinstance(ip, str):
                    answers.append(struct.pack("!HHHIH", 0xC00C, 1, 1, 1, 4) + socket.inet_aton(ip))
        elif qtype == 33:
            for srv in table[name]:
                if isinstance(srv, dict):
                    target = b"".join(bytes([len(l)]) + l.encode() for l in srv["target"].rstrip(".").split(".")) + b"\0"
                    rdata = struct.pack("!HHH", srv["priority"], 1, srv["port"]) + target
                    answers.append(struct.pack("!HHHIH", 0xC00C, 33, 1, 1, len(rdata)) + rdata)
        header = struct.pack("!HHHHHH", qid, 0x8180 | (flags & 0x0100) | rcode, 1, len(answers), 0, 0)
        sock.sendto(header + question + b"".join(answers), peer)
    except Exception as e:
        print("bad query", e, file=sys.stderr)
"#;

#[test]
#[ignore = "needs root, network namespaces and iptables (as root: cargo test -- --include-ignored)"]
fn dns_source_balances_follows_record_changes_and_refuses_another_identity() {
    support::require_root();
    let net = Net::new("disc-dns");
    let dir = TempDir::new();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let pki = Pki::new("example.org");
    let ids = [
        BACKEND_ID,
        BACKEND_ID,
        BACKEND_ID,
        "spiffe://example.org/intruder",
    ];
    let backends: Vec<Backend> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| backend(&net, &pki, &dir, &format!("b{i}"), id, CLIENT_ID))
        .collect();
    let name = "backend.mesh.test";
    let records = dir.write("records.json", "{}");
    let set_records = |pods: &[usize]| {
        let ips: Vec<String> = pods
            .iter()
            .map(|&i| backends[i].pod.ip().to_string())
            .collect();
        // SRV records: b1 and b2 at the lowest priority, b0 a fallback.
        let srv = |target: &str, priority: u16| serde_json::json!({"priority": priority, "port": APP_PORT, "target": format!("{target}.mesh.test.")});
        let mut table = serde_json::json!({
            format!("{name}."): ips,
            "_http._tcp.srv.mesh.test.": [srv("b1", 0), srv("b2", 0), srv("b0", 10)],
        });
        for (i, b) in backends.iter().enumerate().take(3) {
            table[format!("b{i}.mesh.test.")] = serde_json::json!([b.pod.ip().to_string()]);
        }
        let tmp = dir.write("records.tmp", table.to_string());
        std::fs::rename(tmp, &records).unwrap();
    };
    set_records(&[0, 1, 2]);
    let dns = net.pod("dns");
    let _dns = dns.spawn(python(DNS, &[records.display().to_string()]));
    let client = net.pod("client");
    let vip = SocketAddr::new(
        std::net::IpAddr::V4(std::net::Ipv4Addr::from(
            u32::from(client.ip()) & 0xffff_ff00 | 200,
        )),
        80,
    );
    let srv_vip = SocketAddr::new(vip.ip(), 81);
    let client_sidecar = sidecar(&client, &dir, &issue(&pki, &dir, CLIENT_ID), |c| {
        let named = |name: &str, port: u16, dst: SocketAddr| DnsName {
            name: name.into(),
            port,
            identity: parse_id(BACKEND_ID),
            destinations: vec![dst.to_string()],
        };
        c.discovery.dns = Some(DnsConfig {
            servers: vec![dns.ip().to_string()],
            names: vec![
                named(name, APP_PORT, vip),
                named("_http._tcp.srv.mesh.test", 9, srv_vip),
            ],
        });
    });
    // The first lookup may still be under way: wait for the endpoints.
    let deadline = Instant::now() + WAIT;
    while !client
        .admin_get(&format!("/discovery?dst={vip}"))
        .unwrap_or_default()
        .contains(&backends[2].pod.addr(APP_PORT).to_string())
    {
        assert!(Instant::now() < deadline, "{}", client_sidecar.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    let first = load(&client, vip, 3000);
    eprintln!("DNS, 3 equal backends, 3000 requests: {:?}", first.counts);
    assert!(first.failures.is_empty(), "{:?}", first.failures);
    for b in ["b0", "b1", "b2"] {
        let s = share(&first, b);
        assert!((0.28..=0.38).contains(&s), "{b}: {s} of {:?}", first.counts);
    }
    // The records change: b0 leaves, the intruder's address comes.
    set_records(&[1, 2, 3]);
    let deadline = Instant::now() + WAIT;
    while !client
        .admin_get(&format!("/discovery?dst={vip}"))
        .unwrap_or_default()
        .contains(&backends[3].pod.addr(APP_PORT).to_string())
    {
        assert!(Instant::now() < deadline, "{}", client_sidecar.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = load(&client, vip, 600);
    eprintln!(
        "DNS after the change, 600 requests: {:?} failed {:?}",
        after.counts, after.failures
    );
    assert!(after.failures.is_empty(), "{:?}", after.failures);
    assert_eq!(after.counts.get("b0"), None, "{:?}", after.counts);
    assert_eq!(after.counts.get("b3"), None, "{:?}", after.counts);
    assert_eq!(after.counts.values().sum::<u64>(), 600);
    assert!(
        metric(
            &client,
            &format!(
                "rampart_discovery_ejections_total{{service=\"{name}:{APP_PORT}\",reason=\"handshake\"}}"
            )
        ) >= 1.0
    );
    // By name: an explicit destination `name:port` resolves to the service.
    let listing = client
        .admin_get(&format!("/discovery?dst={name}:{APP_PORT}"))
        .unwrap();
    assert!(listing.contains("\"source\": \"dns\""), "{listing}");

    // SRV records: the targets of the lowest priority, each at the port
    // its record gives (the configured port, 9, answers nothing); b0 at a
    // higher priority is only a fallback, so it gets nothing.
    let deadline = Instant::now() + WAIT;
    while !client
        .admin_get(&format!("/discovery?dst={srv_vip}"))
        .unwrap_or_default()
        .contains(&backends[2].pod.addr(APP_PORT).to_string())
    {
        assert!(Instant::now() < deadline, "{}", client_sidecar.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    let by_srv = load(&client, srv_vip, 300);
    eprintln!(
        "DNS SRV, 300 requests: {:?} failed {:?}",
        by_srv.counts, by_srv.failures
    );
    assert!(by_srv.failures.is_empty(), "{:?}", by_srv.failures);
    assert_eq!(by_srv.counts.get("b0"), None, "{:?}", by_srv.counts);
    assert!(
        by_srv.counts.get("b1").is_some_and(|n| *n > 50),
        "{:?}",
        by_srv.counts
    );
    assert!(
        by_srv.counts.get("b2").is_some_and(|n| *n > 50),
        "{:?}",
        by_srv.counts
    );
}
