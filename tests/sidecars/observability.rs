//! End-to-end observability and operations on loopback sidecars: policy hot
//! reload, the admin API, access logs, metrics (parsed by the Python
//! `prometheus_client`), and tracing headers.

use crate::support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rampart_app::config::{Config, PortConfig, TracingSection};
use rampart_proxy::config::TlsMode;
use support::apps;
use support::sidecar::{
    LocalProc, Loopback, Sidecar, base_config, free_addr, inbound_listener, outbound_listener,
    wait_listening,
};

const BACKEND: &str = "spiffe://example.org/ec-backend";
const WEB: &str = "spiffe://example.org/ec-web";

/// ec-web's sidecar -> ec-backend's sidecar (with a policy file) -> an app.
pub(crate) struct Pair {
    pub(crate) pki: Loopback,
    _app: LocalProc,
    pub(crate) backend: Sidecar,
    pub(crate) web: Sidecar,
    /// ec-web's outbound listener.
    pub(crate) out: SocketAddr,
    /// ec-backend's inbound listener.
    pub(crate) inbound: SocketAddr,
    pub(crate) policy: std::path::PathBuf,
}

/// An ALLOW policy letting ec-web GET exactly `path`.
fn allow_get(path: &str) -> String {
    format!(
        "policies:\n  - name: backend\n    action: ALLOW\n    rules:\n      - name: web-gets\n        from: {{principals: [\"{WEB}\"]}}\n        to: {{methods: [GET], paths: [\"{path}\"]}}\n"
    )
}

/// A configuration change for one side of a [`Pair`].
type Edit<'a> = &'a dyn Fn(&mut Config);

/// No change.
pub(crate) fn same(_: &mut Config) {}

fn pair(policy: &str, backend_edit: Edit, web_edit: Edit) -> Pair {
    pair_with_files(policy, &[], backend_edit, web_edit)
}

/// As [`pair`], with `files` (name, contents) written beside the policy.
pub(crate) fn pair_with_files(
    policy: &str,
    files: &[(&str, &str)],
    backend_edit: Edit,
    web_edit: Edit,
) -> Pair {
    pair_at(free_addr(), policy, files, backend_edit, web_edit)
}

/// As [`pair_with_files`], with ec-backend's app on `app_addr`.
fn pair_at(
    app_addr: SocketAddr,
    policy: &str,
    files: &[(&str, &str)],
    backend_edit: Edit,
    web_edit: Edit,
) -> Pair {
    let pki = Loopback::new();
    for (name, text) in files {
        std::fs::write(pki.dir.path().join(name), text).unwrap();
    }
    let app = LocalProc::spawn(
        &apps::http_app(app_addr.port(), "ec-backend"),
        pki.dir.path(),
        "app",
    );
    wait_listening(app_addr);
    let policy_file = pki.dir.path().join("policy.yaml");
    std::fs::write(&policy_file, policy).unwrap();
    let inbound = free_addr();
    let backend = pki.sidecar_with(BACKEND, |c| {
        c.listeners.push(inbound_listener("in", inbound, app_addr));
        c.inbound.policies = vec![policy_file.clone()];
        backend_edit(c);
    });
    let out = free_addr();
    let web = pki.sidecar_with(WEB, |c| {
        c.listeners
            .push(outbound_listener("out", out, inbound, BACKEND));
        web_edit(c);
    });
    Pair {
        pki,
        _app: app,
        backend,
        web,
        out,
        inbound,
        policy: policy_file,
    }
}

/// The status of a GET through ec-web's sidecar (0 when it failed).
pub(crate) fn get(out: SocketAddr, path: &str, headers: &[&str]) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-i", "--max-time", "10"]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    let o = cmd
        .arg(format!("http://{out}{path}"))
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// Polls `cond` every 50 ms until it holds or `within` passes.
pub(crate) fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// The value of a sample in Prometheus text, 0 when absent. `series` is
/// the name with its labels exactly as rendered, e.g. `x_total{result="ok"}`.
pub(crate) fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

pub(crate) fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn policy_file_changes_apply_and_broken_files_keep_the_last_good_version() {
    let p = pair(&allow_get("/data"), &same, &same);
    assert_eq!(get(p.out, "/data", &[]).0, 200, "{}", p.backend.logs());
    assert_eq!(get(p.out, "/other", &[]).0, 403);

    write_atomically(&p.policy, &allow_get("/other"));
    assert!(
        eventually(Duration::from_secs(5), || get(p.out, "/other", &[]).0
            == 200),
        "new policy not in force:\n{}",
        p.backend.logs()
    );
    assert_eq!(get(p.out, "/data", &[]).0, 403);
    let m = p.backend.metrics();
    assert_eq!(
        sample(&m, "rampart_policy_reloads_total{result=\"ok\"}"),
        1.0,
        "{m}"
    );

    // A broken file (an unknown field) changes nothing but the error count.
    write_atomically(&p.policy, &allow_get("/data").replace("action:", "acton:"));
    assert!(
        eventually(Duration::from_secs(5), || {
            sample(
                &p.backend.metrics(),
                "rampart_policy_reloads_total{result=\"error\"}",
            ) == 1.0
        }),
        "broken policy not counted:\n{}",
        p.backend.logs()
    );
    assert_eq!(get(p.out, "/other", &[]).0, 200);
    assert_eq!(get(p.out, "/data", &[]).0, 403);
    assert!(p.backend.logs().contains("policy reload failed"));
    // Access logs are off here, but denials are still written.
    let out = p.backend.stdout();
    assert!(out.contains("\"authz.decision\":\"deny\""), "{out}");
    assert!(!out.contains("\"authz.decision\":\"allow\""), "{out}");
    let _ = (&p.pki, &p.web, p.inbound);
}

/// A Rego module allowing GET of exactly `path` (OPA-Envoy's input).
pub(crate) fn rego_allow_get(path: &str) -> String {
    format!(
        "package envoy.authz\n\ndefault allow := false\n\nallow if {{\n  input.attributes.request.http.method == \"GET\"\n  input.parsed_path == [\"{}\"]\n}}\n",
        path.trim_start_matches('/')
    )
}

#[test]
fn a_changed_rego_module_is_reloaded() {
    let p = pair_with_files(
        "policies:\n  - name: backend\n    kind: rego\n    modules: [backend.rego]\n",
        &[("backend.rego", &rego_allow_get("/data"))],
        &same,
        &same,
    );
    assert_eq!(get(p.out, "/data", &[]).0, 200, "{}", p.backend.logs());
    assert_eq!(get(p.out, "/other", &[]).0, 403);
    // Only the module changes; the policy file stays as it is.
    write_atomically(
        &p.policy.with_file_name("backend.rego"),
        &rego_allow_get("/other"),
    );
    assert!(
        eventually(Duration::from_secs(5), || get(p.out, "/other", &[]).0
            == 200),
        "changed module not in force:\n{}",
        p.backend.logs()
    );
    assert_eq!(get(p.out, "/data", &[]).0, 403);
    // A module with a syntax error keeps the last good version.
    write_atomically(
        &p.policy.with_file_name("backend.rego"),
        "package envoy.authz\nallow if {",
    );
    assert!(
        eventually(Duration::from_secs(5), || {
            sample(
                &p.backend.metrics(),
                "rampart_policy_reloads_total{result=\"error\"}",
            ) == 1.0
        }),
        "broken module not counted:\n{}",
        p.backend.logs()
    );
    assert_eq!(get(p.out, "/other", &[]).0, 200);
}

/// The base64 lines of a PEM file (its key material).
fn pem_body_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() > 16)
        .map(str::to_owned)
        .collect()
}

#[test]
fn admin_api_shows_config_identity_and_policies_without_key_material() {
    let p = pair(&allow_get("/data"), &same, &same);
    let b = &p.backend;
    let (status, config) = b.admin("GET", "/config", "");
    assert_eq!(status, 200, "{config}");
    assert!(config.contains("svid.key"), "{config}");
    let (status, identity) = b.admin("GET", "/identity", "");
    assert_eq!(status, 200, "{identity}");
    assert!(
        identity.contains(&format!("\"spiffe_id\": \"{BACKEND}\"")),
        "{identity}"
    );
    assert!(identity.contains("\"serial\""), "{identity}");
    assert!(identity.contains("\"not_after_unix\""), "{identity}");
    assert!(identity.contains("\"example.org\""), "{identity}");
    let key_lines = pem_body_lines(&p.pki.dir.path().join("ec-backend/svid.key"));
    assert!(!key_lines.is_empty());
    for body in [&config, &identity] {
        assert!(!body.contains("PRIVATE KEY"), "{body}");
        for l in &key_lines {
            assert!(!body.contains(l.as_str()), "key material in {body}");
        }
    }
    let (status, policy) = b.admin("GET", "/policy", "");
    assert_eq!(status, 200, "{policy}");
    assert!(policy.contains("\"name\": \"backend\""), "{policy}");
    assert!(policy.contains("\"content_hash\""), "{policy}");
    assert!(policy.contains("\"loaded_at_unix\""), "{policy}");

    assert_eq!(b.admin("GET", "/nope", "").0, 404);
    let (status, resp) = b.admin("DELETE", "/config", "");
    assert_eq!(status, 405);
    assert!(
        resp.to_ascii_lowercase().contains("allow: get, head"),
        "{resp}"
    );
    let (status, resp) = b.admin("GET", "/drain", "");
    assert_eq!(status, 405);
    assert!(resp.to_ascii_lowercase().contains("allow: post"), "{resp}");
    let _ = &p.web;
}

#[test]
fn log_filter_changes_at_runtime() {
    let p = pair(&allow_get("/data"), &same, &same);
    let b = &p.backend;
    let forwarded = || b.logs().matches("request forwarded").count();
    let (status, _) = b.admin("PUT", "/logging", "info");
    assert_eq!(status, 200);
    assert!(b.admin("GET", "/logging", "").1.ends_with("info\n"));
    let before = forwarded();
    assert_eq!(get(p.out, "/data", &[]).0, 200);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(forwarded(), before, "debug line at info:\n{}", b.logs());

    assert_eq!(
        b.admin("PUT", "/logging", "info,rampart_proxy=debug").0,
        200
    );
    assert_eq!(get(p.out, "/data", &[]).0, 200);
    assert!(
        eventually(Duration::from_secs(5), || forwarded() > before),
        "no debug line after the change:\n{}",
        b.logs()
    );
    assert_eq!(b.admin("PUT", "/logging", "not a [filter").0, 400);
}

#[test]
fn admin_drain_turns_the_sidecar_not_ready_and_exits() {
    let p = pair(&allow_get("/data"), &same, &same);
    assert_eq!(p.backend.admin("POST", "/drain", "").0, 202);
    assert!(
        eventually(Duration::from_secs(10), || p.backend.get("/ready")
            != Some(200)),
        "still ready after /drain"
    );
}

/// The JSON access events a sidecar wrote.
fn access_events(s: &Sidecar) -> Vec<serde_json::Value> {
    s.stdout()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[test]
fn access_events_name_peer_decision_and_path_but_no_header_values() {
    let p = pair(
        &allow_get("/data"),
        &|c| {
            c.log.access = true;
            c.log.access_headers = vec!["x-tenant".into()];
        },
        &|c| c.log.access = true,
    );
    let secret = "Bearer s3cr3t-t0ken";
    assert_eq!(
        get(
            p.out,
            "/data?q=hidden",
            &[&format!("authorization: {secret}"), "x-tenant: blue"]
        )
        .0,
        200
    );
    assert_eq!(get(p.out, "/other", &[]).0, 403);
    let mut events = Vec::new();
    assert!(eventually(Duration::from_secs(5), || {
        events = access_events(&p.backend);
        events.len() >= 2
    }));
    let ok = &events[0];
    assert_eq!(ok["event"], "http");
    assert_eq!(ok["direction"], "inbound");
    assert_eq!(ok["peer.id"], WEB);
    assert_eq!(ok["method"], "GET");
    assert_eq!(ok["path"], "/data");
    assert_eq!(ok["status"], 200);
    assert_eq!(ok["authz.decision"], "allow");
    assert_eq!(ok["authz.policy"], "backend");
    assert_eq!(ok["authz.rule"], "web-gets");
    assert!(ok["duration_ms"].as_f64().unwrap() > 0.0);
    // Only the header the operator named, and only its value.
    assert_eq!(ok["headers"], serde_json::json!({"x-tenant": "blue"}));
    let denied = &events[1];
    assert_eq!(denied["authz.decision"], "deny");
    assert_eq!(denied["status"], 403);
    let all = p.backend.stdout();
    assert!(!all.contains("s3cr3t") && !all.contains("hidden"), "{all}");
    // ec-web's sidecar logs its side: outbound, no decision of its own.
    let mut out_events = Vec::new();
    assert!(eventually(Duration::from_secs(5), || {
        out_events = access_events(&p.web);
        out_events.len() >= 2
    }));
    let sent = &out_events[0];
    assert_eq!(sent["direction"], "outbound");
    assert_eq!(sent["dst.addr"], p.inbound.to_string());
    assert_eq!(sent["path"], "/data");
    assert_eq!(sent["status"], 200);
    assert_eq!(sent["authz.decision"], "none");
    assert_eq!(out_events[1]["status"], 403);
    let web_out = p.web.stdout();
    assert!(
        !web_out.contains("s3cr3t") && !web_out.contains("hidden"),
        "{web_out}"
    );
}

/// A helper script run by the `python3` on PATH (where pip installed
/// tests/requirements.txt), not the system one the apps use.
fn py(script: &str) -> Command {
    let mut c = Command::new("python3");
    c.arg(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/py")
            .join(script),
    );
    c
}

fn require_prometheus_client() {
    let ok = Command::new("python3")
        .args(["-c", "import prometheus_client"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "python3 has no prometheus_client (pip install -r tests/requirements.txt)"
    );
}

/// The sidecar's metrics as parsed by `prometheus_client`: sample name with
/// sorted labels -> value.
fn scrape(s: &Sidecar) -> BTreeMap<String, f64> {
    let (status, resp) = s.admin("GET", "/metrics", "");
    assert_eq!(status, 200);
    let body = resp.split_once("\r\n\r\n").unwrap().1;
    let mut child = py("metrics_parse.py")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "parser failed: {body}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The value of label `label_start` (e.g. `destination_service="`) in the
/// first sample whose key starts with `prefix`.
fn find_key(m: &BTreeMap<String, f64>, prefix: &str, label_start: &str) -> String {
    let key = m
        .keys()
        .find(|k| k.starts_with(prefix) && k.contains(label_start))
        .unwrap_or_else(|| panic!("no {prefix}..{label_start}: {m:#?}"));
    let value = &key[key.find(label_start).unwrap() + label_start.len()..];
    value[..value.find('"').unwrap()].to_owned()
}

fn delta(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>, key: &str) -> f64 {
    after.get(key).copied().unwrap_or(0.0) - before.get(key).copied().unwrap_or(0.0)
}

#[test]
#[ignore = "needs python3 with prometheus_client (pip install -r tests/requirements.txt)"]
fn metrics_move_exactly_and_random_traffic_adds_no_series() {
    require_prometheus_client();
    let p = pair(&allow_get("/data"), &same, &same);
    // Warm up every series the traffic below can touch.
    assert_eq!(get(p.out, "/data", &[]).0, 200);
    assert_eq!(get(p.out, "/warm", &[]).0, 403);
    let before = scrape(&p.backend);

    assert_eq!(get(p.out, "/data", &[]).0, 200);
    assert_eq!(get(p.out, "/nope", &[]).0, 403);
    // A plaintext client at a STRICT port: one failed handshake.
    let mut raw = std::net::TcpStream::connect(p.inbound).unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let _ = raw.read(&mut [0u8; 64]);
    drop(raw);
    let failed = |m: &BTreeMap<String, f64>| -> f64 {
        m.iter()
            .filter(|(k, _)| {
                k.starts_with("rampart_tls_handshakes_total{")
                    && k.contains("direction=\"inbound\"")
                    && !k.contains("result=\"ok\"")
            })
            .map(|(_, v)| v)
            .sum()
    };
    let mut after = BTreeMap::new();
    assert!(eventually(Duration::from_secs(5), || {
        after = scrape(&p.backend);
        failed(&after) - failed(&before) >= 1.0
    }));
    assert_eq!(failed(&after) - failed(&before), 1.0);
    // ec-backend's sidecar: from ec-web, to itself, at its app's address
    // (an explicit listener's target is its destination).
    let app = find_key(
        &after,
        "rampart_http_requests_total{",
        "destination_service=\"",
    );
    let by_web = |code: &str, class: &str| {
        format!(
            "rampart_http_requests_total{{destination_id=\"{BACKEND}\",destination_service=\"{app}\",direction=\"inbound\",source_id=\"{WEB}\",status_class=\"{class}\",status_code=\"{code}\"}}"
        )
    };
    let (ok_key, denied_key) = (by_web("200", "2xx"), by_web("403", "4xx"));
    let duration_key = format!(
        "rampart_http_request_duration_milliseconds_count{{destination_id=\"{BACKEND}\",destination_service=\"{app}\",direction=\"inbound\",source_id=\"{WEB}\"}}"
    );
    let expect = [
        (ok_key.as_str(), 1.0),
        (denied_key.as_str(), 1.0),
        (
            "rampart_authz_decisions_total{action=\"allow\",policy=\"backend\",reason=\"matched\",rule=\"web-gets\"}",
            1.0,
        ),
        (
            "rampart_authz_decisions_total{action=\"deny\",policy=\"backend\",reason=\"not_allowed\",rule=\"-\"}",
            1.0,
        ),
        (duration_key.as_str(), 2.0),
        // ec-web's sidecar counts its side of the same requests, without a peer.
    ];
    for (key, want) in expect {
        assert_eq!(delta(&before, &after, key), want, "{key}: {after:#?}");
    }

    // 100,000 requests with random paths, queries and headers (pipelined on
    // one keep-alive connection; about a minute with debug sidecars) leave
    // the set of series unchanged: no label takes a value from a request.
    let series = after.keys().cloned().collect::<Vec<_>>();
    let out = py("random_requests.py")
        .args([
            p.out.ip().to_string(),
            p.out.port().to_string(),
            "100000".into(),
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "100000");
    let later = scrape(&p.backend);
    let now = later.keys().cloned().collect::<Vec<_>>();
    assert_eq!(now, series, "series changed under random traffic");
    let _ = &p.web;
}

#[test]
#[ignore = "needs python3 with prometheus_client (pip install -r tests/requirements.txt)"]
fn outbound_requests_are_counted_and_a_silent_client_is_a_detect_timeout() {
    require_prometheus_client();
    let p = pair(&allow_get("/data"), &same, &|c| {
        c.limits.detect_timeout = Duration::from_millis(300)
    });
    assert_eq!(get(p.out, "/data", &[]).0, 200);
    let before = scrape(&p.web);
    assert_eq!(get(p.out, "/data", &[]).0, 200);
    assert_eq!(get(p.out, "/nope", &[]).0, 403);
    // A client of the outbound listener that sends nothing: detection gives
    // up after 300 ms and tunnels it as opaque TCP.
    let silent = std::net::TcpStream::connect(p.out).unwrap();
    let timeouts = "rampart_detect_timeouts_total{direction=\"outbound\"}";
    let mut after = BTreeMap::new();
    assert!(eventually(Duration::from_secs(5), || {
        after = scrape(&p.web);
        delta(&before, &after, timeouts) >= 1.0
    }));
    drop(silent);
    assert_eq!(delta(&before, &after, timeouts), 1.0);
    // The destination is the peer sidecar's verified identity, the service
    // the address the app dialed (the outbound listener's target here).
    let inbound = p.inbound;
    let out = |code: &str, class: &str| {
        format!(
            "rampart_http_requests_total{{destination_id=\"{BACKEND}\",destination_service=\"{inbound}\",direction=\"outbound\",source_id=\"{WEB}\",status_class=\"{class}\",status_code=\"{code}\"}}"
        )
    };
    assert_eq!(
        delta(&before, &after, &out("200", "2xx")),
        1.0,
        "{after:#?}"
    );
    assert_eq!(
        delta(&before, &after, &out("403", "4xx")),
        1.0,
        "{after:#?}"
    );
    let latency = format!(
        "rampart_http_request_duration_milliseconds_bucket{{destination_id=\"{BACKEND}\",destination_service=\"{inbound}\",direction=\"outbound\",le=\"60000\",source_id=\"{WEB}\"}}"
    );
    assert_eq!(delta(&before, &after, &latency), 2.0, "{after:#?}");
}

#[test]
#[ignore = "needs python3 with prometheus_client (pip install -r tests/requirements.txt)"]
fn a_silent_plaintext_client_on_a_permissive_port_waits_for_one_detect_timeout_then_its_request() {
    require_prometheus_client();
    let app = free_addr();
    let p = pair_at(
        app,
        &allow_get("/data"),
        &[],
        &|c| {
            c.inbound.ports = vec![PortConfig {
                mode: TlsMode::PermissiveAllowPlaintext,
                ..PortConfig::new(app.port())
            }];
            c.limits.detect_timeout = Duration::from_millis(300);
        },
        &same,
    );
    let before = scrape(&p.backend);
    let denials = |m: &BTreeMap<String, f64>| -> f64 {
        m.iter()
            .filter(|(k, _)| {
                k.starts_with("rampart_authz_decisions_total{") && k.contains("action=\"deny\"")
            })
            .map(|(_, v)| v)
            .sum()
    };
    // Sends nothing for longer than one detect timeout. No policy admits an
    // opaque connection here (the policy is HTTP-only), so the sidecar keeps
    // waiting for the request of a client that opened its connection ahead
    // of use (issue 19, R4) and answers it as HTTP when it comes; it counts
    // one detect timeout, not two, and refuses nothing before the request.
    let timeouts = "rampart_detect_timeouts_total{direction=\"inbound\"}";
    let mut silent = std::net::TcpStream::connect(p.inbound).unwrap();
    let mut after = BTreeMap::new();
    assert!(eventually(Duration::from_secs(5), || {
        after = scrape(&p.backend);
        delta(&before, &after, timeouts) >= 1.0
    }));
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(denials(&scrape(&p.backend)) - denials(&before), 0.0);
    silent
        .write_all(b"GET /data HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut answer = String::new();
    let _ = silent.read_to_string(&mut answer);
    // Plaintext carries no principal: the policy's answer, as HTTP.
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    after = scrape(&p.backend);
    assert_eq!(denials(&after) - denials(&before), 1.0, "{after:#?}");
    assert_eq!(delta(&before, &after, timeouts), 1.0, "{after:#?}");
}

#[test]
fn metrics_can_be_turned_off() {
    let p = pair(&allow_get("/data"), &|c| c.admin.metrics = false, &same);
    assert_eq!(get(p.out, "/data", &[]).0, 200);
    assert_eq!(get(p.out, "/nope", &[]).0, 403);
    let (status, resp) = p.backend.admin("GET", "/metrics", "");
    assert_eq!(status, 200);
    let body = resp.split_once("\r\n\r\n").unwrap().1;
    assert!(!body.contains("rampart_"), "{body}");
    assert!(body.contains("metrics are turned off"), "{body}");
    // The other sidecar still records.
    let (_, web) = p.web.admin("GET", "/metrics", "");
    assert!(web.contains("rampart_http_requests_total"), "{web}");
}

#[test]
fn credential_headers_cannot_be_access_logged() {
    let pki = Loopback::new();
    let svid = pki.issue(BACKEND, "ec-backend");
    let cfg = pki.dir.path().join("cfg.yaml");
    std::fs::write(
        &cfg,
        format!(
            "identity:\n  files: {{cert: {s}/svid.pem, key: {s}/svid.key, bundle: {s}/bundle.pem}}\nlog:\n  access: true\n  access_headers: [x-tenant, Authorization]\n",
            s = svid.display()
        ),
    )
    .unwrap();
    let out = Command::new(support::rampart_bin())
        .args(["run", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cfg.yaml") && err.contains("log.access_headers[1]"),
        "{err}"
    );
}

#[test]
fn a_broken_policy_at_start_exits_64_and_is_never_ready() {
    let pki = Loopback::new();
    let svid = pki.issue(BACKEND, "ec-backend");
    let policy = pki.dir.path().join("policy.yaml");
    std::fs::write(&policy, allow_get("/data").replace("action:", "acton:")).unwrap();
    let mut config = base_config(&svid);
    config
        .listeners
        .push(inbound_listener("in", free_addr(), free_addr()));
    config.inbound.policies = vec![policy.clone()];
    let cfg = pki.dir.path().join("broken.yaml");
    std::fs::write(&cfg, config.to_yaml()).unwrap();
    let out = Command::new(support::rampart_bin())
        .args(["run", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("policy.yaml"),
        "{out:?}"
    );
}

/// Every query of the shipped Grafana dashboard (panels and template
/// variables) names only series that a running pair of sidecars exports,
/// with label names those series carry.
#[test]
#[ignore = "needs python3 with prometheus_client (pip install -r tests/requirements.txt)"]
fn the_grafana_dashboard_queries_only_exported_series() {
    require_prometheus_client();
    let p = pair(&allow_get("/data"), &same, &same);
    assert_eq!(get(p.out, "/data", &[]).0, 200);
    assert_eq!(get(p.out, "/nope", &[]).0, 403);
    let mut exported: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for sidecar in [&p.web, &p.backend] {
        for key in scrape(sidecar).keys() {
            let (name, labels) = key.split_once('{').unwrap();
            let names = exported.entry(name.to_owned()).or_default();
            for pair in labels.trim_end_matches('}').split("\",") {
                if let Some((label, _)) = pair.split_once('=') {
                    if !names.iter().any(|n| n == label) {
                        names.push(label.to_owned());
                    }
                }
            }
        }
    }
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/observability/grafana-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut queries = vec![];
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            queries.push(target["expr"].as_str().unwrap().to_owned());
        }
    }
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(q) = variable["definition"].as_str() {
            queries.push(q.to_owned());
        }
    }
    assert!(queries.len() >= 12, "{queries:?}");
    for query in &queries {
        let (metrics, labels) = promql_names(query);
        assert!(!metrics.is_empty(), "no metric in {query}");
        for metric in &metrics {
            assert!(
                exported.contains_key(metric),
                "{query}: {metric} is not exported; exported: {:?}",
                exported.keys()
            );
        }
        for label in &labels {
            assert!(
                metrics.iter().any(|m| exported[m].contains(label)),
                "{query}: no series of {metrics:?} has label {label}"
            );
        }
    }
}

/// The metric names (`rampart_*`) and the label names (in selectors, in
/// `by (...)` and in `label_values(_, label)`) of a PromQL query.
fn promql_names(query: &str) -> (Vec<String>, Vec<String>) {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let (mut metrics, mut labels) = (vec![], vec![]);
    let bytes: Vec<char> = query.chars().collect();
    let mut i = 0;
    let mut in_selector = false;
    let mut in_by = false;
    while i < bytes.len() {
        let c = bytes[i];
        if c == '"' {
            // Skip a string (label values, never names).
            i += 1;
            while i < bytes.len() && bytes[i] != '"' {
                i += if bytes[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            continue;
        }
        if ident(c) && (i == 0 || !ident(bytes[i - 1])) {
            let start = i;
            while i < bytes.len() && ident(bytes[i]) {
                i += 1;
            }
            let word: String = bytes[start..i].iter().collect();
            let rest: String = bytes[i..].iter().collect();
            let rest = rest.trim_start();
            if in_selector || in_by {
                if !word.chars().all(|c| c.is_ascii_digit()) {
                    labels.push(word);
                }
            } else if word.starts_with("rampart_") {
                metrics.push(word);
            } else if (word == "by" || word == "without") && rest.starts_with('(') {
                in_by = true;
            } else if word == "label_values" {
                // label_values(metric, label)
                let inner = rest.trim_start_matches('(');
                if let Some((_, label)) = inner.split_once(',') {
                    labels.push(label.trim().trim_end_matches(')').trim().to_owned());
                }
            }
            continue;
        }
        match c {
            '{' => in_selector = true,
            '}' => in_selector = false,
            ')' => in_by = false,
            _ => {}
        }
        i += 1;
    }
    (metrics, labels)
}

/// Trace spans reach an independent OTLP/HTTP receiver (Python, decoding
/// with the `opentelemetry-proto` package): a request that arrives with a
/// W3C `traceparent` gives ec-web's client span (the caller's span as its
/// parent) and ec-backend's server span (ec-web's as its parent), and the
/// app receives a `traceparent` naming ec-backend's span; a B3 caller's
/// trace is continued the same way, and its `b3` header handed on.
#[test]
fn spans_reach_an_otlp_receiver_and_continue_the_callers_trace() {
    let has_proto = Command::new("python3")
        .args([
            "-c",
            "import opentelemetry.proto.collector.trace.v1.trace_service_pb2",
        ])
        .status()
        .is_ok_and(|s| s.success());
    if !has_proto {
        assert!(
            std::env::var_os("RAMPART_REQUIRE_E2E").is_none(),
            "opentelemetry-proto missing (pip install -r tests/requirements.txt)"
        );
        eprintln!("skipped: python3 opentelemetry-proto missing");
        return;
    }
    let receiver_addr = free_addr();
    let dir = tempfile::tempdir().unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/py/otlp_receiver.py");
    let receiver = LocalProc::spawn(
        &[
            "python3".into(),
            script.display().to_string(),
            receiver_addr.port().to_string(),
        ],
        dir.path(),
        "otlp",
    );
    wait_listening(receiver_addr);
    let tracing = |service: &str| TracingSection {
        otlp_endpoint: format!("http://{receiver_addr}/v1/traces"),
        service_name: service.into(),
        sampling: 1.0,
        flush_interval: Duration::from_millis(200),
    };
    let p = pair(
        &allow_get("/data"),
        &|c| c.tracing = Some(tracing("ec-backend")),
        &|c| c.tracing = Some(tracing("ec-web")),
    );

    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let (status, text) = get(
        p.out,
        "/data",
        &[&format!("traceparent: 00-{trace}-00f067aa0ba902b7-01")],
    );
    assert_eq!(status, 200, "{text}");
    let spans = wait_spans(&receiver, trace, 2);
    let web = spans.iter().find(|s| s["service"] == "ec-web").unwrap();
    let backend = spans.iter().find(|s| s["service"] == "ec-backend").unwrap();
    // SpanKind: 2 is SERVER, 3 is CLIENT.
    assert_eq!(
        (web["kind"].as_i64(), backend["kind"].as_i64()),
        (Some(3), Some(2)),
        "{spans:?}"
    );
    assert_eq!(web["parent_span_id"], "00f067aa0ba902b7");
    assert_eq!(backend["parent_span_id"], web["span_id"]);
    assert_eq!(web["attributes"]["peer.spiffe_id"], BACKEND);
    assert_eq!(backend["attributes"]["peer.spiffe_id"], WEB);
    assert_eq!(backend["attributes"]["http.response.status_code"], 200);
    assert_eq!(backend["attributes"]["url.path"], "/data");
    let seen = header_of(&text, "x-app-traceparent");
    assert_eq!(
        seen,
        format!("00-{trace}-{}-01", backend["span_id"].as_str().unwrap())
    );

    // B3 (single header, 64-bit trace ID) in: the same chain, B3 handed on.
    let b3_trace = "a3ce929d0e0e4736";
    let (status, text) = get(
        p.out,
        "/data",
        &[&format!("b3: {b3_trace}-e457b5a2e4d86bd1-1")],
    );
    assert_eq!(status, 200, "{text}");
    let long = format!("{b3_trace:0>32}");
    let spans = wait_spans(&receiver, &long, 2);
    let web = spans.iter().find(|s| s["service"] == "ec-web").unwrap();
    let backend = spans.iter().find(|s| s["service"] == "ec-backend").unwrap();
    assert_eq!(web["parent_span_id"], "e457b5a2e4d86bd1");
    assert_eq!(backend["parent_span_id"], web["span_id"]);
    let b3 = header_of(&text, "x-app-b3");
    assert_eq!(
        b3,
        format!("{long}-{}-1", backend["span_id"].as_str().unwrap())
    );
}

/// Waits for `count` spans of trace `trace` in the receiver's output.
fn wait_spans(receiver: &LocalProc, trace: &str, count: usize) -> Vec<serde_json::Value> {
    let mut spans = vec![];
    let found = eventually(Duration::from_secs(10), || {
        spans = receiver
            .stdout()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|s| s["trace_id"] == trace)
            .collect();
        spans.len() >= count
    });
    assert!(found, "spans of {trace}: {spans:?}\n{}", receiver.stdout());
    spans
}

fn header_of(response: &str, name: &str) -> String {
    response
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
        .unwrap_or_else(|| panic!("no {name} in {response}"))
}
