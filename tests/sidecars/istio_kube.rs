//! Istio's security resources from a real Kubernetes API server
//! (`inbound.istio.kubernetes`), end to end on loopback: the API server and
//! etcd of `tests/peers/peer-kube.sh` with the three kinds installed from
//! `istio-crds.yaml` (ours: structural, `spec` kept as is, so the API server
//! validates nothing and Rampart's loader is the only check), the sidecar
//! reading them as a user with only deploy/istio's ClusterRole bound in its
//! namespace and the root namespace, and a real pair (curl → client
//! sidecar → server sidecar → a Python HTTP/1.1 app). Policies are
//! created, updated and deleted through the API while the pair serves,
//! and every decision is asserted on the wire.

use crate::central::policy;
use crate::istio::{Issuer, now};
use crate::support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use rampart_app::config::{IstioConfig, PortConfig};
use rampart_app::istio_kube::IstioKubernetes;
use rampart_proxy::config::DeclaredProtocol;
use serde_json::{Value as Json, json};
use support::apps;
use support::curl::curl;
use support::kube::ControlPlane;
use support::sidecar::{LocalProc, Loopback, free_addr, inbound_listener_as, wait_listening};
use support::wait;

const APP_PORT: u16 = 8080;
const SERVER: &str = "spiffe://example.org/ns/foo/sa/httpbin";
const CLIENT: &str = "spiffe://example.org/ns/foo/sa/sleep";
/// The sidecar's API user (its client certificate's CN).
const USER: &str = "rampart-httpbin";
/// How long a change may take to reach the decisions (watch, compile).
const WITHIN: Duration = Duration::from_secs(15);

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The collection of `kind` (plural) in `ns`, at `version`.
fn at(version: &str, ns: &str, plural: &str) -> String {
    format!("/apis/security.istio.io/{version}/namespaces/{ns}/{plural}")
}

fn resource(version: &str, kind: &str, ns: &str, name: &str, spec: Json) -> Json {
    json!({
        "apiVersion": format!("security.istio.io/{version}"),
        "kind": kind,
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    })
}

fn plural(kind: &str) -> &'static str {
    match kind {
        "AuthorizationPolicy" => "authorizationpolicies",
        "PeerAuthentication" => "peerauthentications",
        "RequestAuthentication" => "requestauthentications",
        other => panic!("not an Istio security kind: {other}"),
    }
}

/// Creates a `security.istio.io/v1` resource.
fn create(api: &ControlPlane, kind: &str, ns: &str, name: &str, spec: Json) {
    api.create(
        &at("v1", ns, plural(kind)),
        &resource("v1", kind, ns, name, spec),
    );
}

/// Replaces the spec of a resource (GET, then PUT with its version).
fn update(api: &ControlPlane, kind: &str, ns: &str, name: &str, spec: Json) {
    let path = format!("{}/{name}", at("v1", ns, plural(kind)));
    let mut obj = api.get(&path);
    obj["spec"] = spec;
    let (status, answer) = api.request("PUT", &path, Some(&obj));
    assert_eq!(status, 200, "PUT {path}: {answer}");
}

/// Deletes a resource through the collection at `version`.
fn delete(api: &ControlPlane, version: &str, kind: &str, ns: &str, name: &str) {
    let path = format!("{}/{name}", at(version, ns, plural(kind)));
    let (status, answer) = api.request("DELETE", &path, None);
    assert_eq!(status, 200, "DELETE {path}: {answer}");
}

/// Installs the CRDs and waits until both versions are served.
fn install_crds(api: &ControlPlane) {
    let crds = std::fs::read_to_string(repo().join("tests/sidecars/istio-crds.yaml")).unwrap();
    api.apply_yaml(&crds);
    wait::until_true("the Istio CRDs served", Duration::from_secs(30), || {
        ["v1", "v1beta1"].iter().all(|v| {
            [
                "authorizationpolicies",
                "peerauthentications",
                "requestauthentications",
            ]
            .iter()
            .all(|p| api.raw("GET", &at(v, "foo", p), None).0 == 200)
        })
    });
}

/// deploy/istio's ClusterRole, bound to [`USER`] in `namespaces`.
fn grant(api: &ControlPlane, namespaces: &[&str]) {
    let rbac = std::fs::read_to_string(repo().join("deploy/istio/rbac.yaml")).unwrap();
    api.apply_yaml(&rbac);
    for ns in namespaces {
        api.create(
            &format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings"),
            &json!({
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": "rampart-istio-security", "namespace": ns},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                    "name": "rampart-istio-security"},
                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": USER}],
            }),
        );
    }
}

/// The value of the metric series `series` (0 when absent).
fn metric(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// One GET on an open keep-alive connection; the status, 0 when the
/// connection was closed instead.
fn get_on(conn: &mut TcpStream, path: &str) -> u16 {
    if write!(conn, "GET {path} HTTP/1.1\r\nHost: httpbin\r\n\r\n").is_err() {
        return 0;
    }
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match conn.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return 0,
        }
    }
    let head = String::from_utf8_lossy(&head);
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    if conn.read_exact(&mut body).is_err() {
        return 0;
    }
    head.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn claims(iss: &str, aud: &str, exp: u64) -> String {
    json!({"iss": iss, "sub": "dev", "aud": aud, "exp": exp}).to_string()
}

#[test]
#[ignore = "needs the Kubernetes peers (tests/peers/peer-kube.sh; cargo test -- --include-ignored)"]
fn istio_resources_from_the_api_server_decide_through_a_sidecar_pair() {
    let api = ControlPlane::start();
    for ns in ["foo", "istio-system"] {
        api.namespace(ns, &json!({}));
    }
    install_crds(&api);
    grant(&api, &["foo", "istio-system"]);
    let kubeconfig = api.kubeconfig_for(USER, None);

    // Before the sidecar starts: mesh-wide STRICT and a root-namespace
    // DENY, a namespace-wide PERMISSIVE that overrides the mesh's mode.
    create(
        &api,
        "PeerAuthentication",
        "istio-system",
        "default",
        json!({"mtls": {"mode": "STRICT"}}),
    );
    create(
        &api,
        "AuthorizationPolicy",
        "istio-system",
        "deny-admin",
        json!({"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}]}),
    );
    create(
        &api,
        "PeerAuthentication",
        "foo",
        "default",
        json!({"mtls": {"mode": "PERMISSIVE"}}),
    );

    let pki = Loopback::new();
    let dir = pki.dir.path();
    let app_addr = free_addr();
    let _app = LocalProc::spawn(&apps::http_app(app_addr.port(), "httpbin"), dir, "httpbin");
    wait_listening(app_addr);
    let inbound = free_addr();
    let started = std::time::Instant::now();
    let server = pki.sidecar_with(SERVER, |c| {
        c.listeners
            .push(inbound_listener_as("in", inbound, app_addr, APP_PORT));
        c.inbound.ports = vec![PortConfig {
            protocol: DeclaredProtocol::Http,
            ..PortConfig::new(APP_PORT)
        }];
        c.inbound.istio = Some(IstioConfig {
            labels: [("app".to_owned(), "httpbin".to_owned())].into(),
            trust_domain: "example.org".into(),
            kubernetes: Some(IstioKubernetes {
                kubeconfig: Some(kubeconfig.clone()),
                ..IstioKubernetes::default()
            }),
            ..IstioConfig::new(Vec::new(), "foo")
        });
    });
    let ready_after = started.elapsed();
    let (_client, outs) = pki.outbound_sidecar_with(CLIENT, &[inbound], SERVER, |_| {});
    let mesh = |path: &str, extra: &[&str]| curl(&format!("http://{}{path}", outs[0]), extra);
    let plaintext = |path: &str| curl(&format!("http://{inbound}{path}"), &[]).status;
    let logs = || server.logs();

    // Ready once the lists loaded: the root namespace's DENY is in force,
    // and the namespace's PERMISSIVE overrides the mesh's STRICT.
    assert_eq!(mesh("/data", &[]).status, 200, "{}", logs());
    let admin = mesh("/admin", &[]);
    assert_eq!(admin.status, 403, "{}", logs());
    assert_eq!(policy(&server)["origin"], "kubernetes");
    assert!(admin.body.contains("RBAC: access denied"), "{}", admin.body);
    assert_eq!(plaintext("/data"), 200, "PERMISSIVE in foo: {}", logs());
    let mut live = TcpStream::connect(inbound).unwrap();
    live.set_read_timeout(Some(WITHIN)).unwrap();
    assert_eq!(get_on(&mut live, "/data"), 200);

    // A DENY-everything for another workload's labels does not attach.
    create(
        &api,
        "AuthorizationPolicy",
        "foo",
        "deny-other",
        json!({"selector": {"matchLabels": {"app": "other"}}, "action": "DENY", "rules": [{}]}),
    );
    wait::until_true("deny-other compiled", WITHIN, || {
        logs().contains("AuthorizationPolicy foo/deny-other (Kubernetes API)")
    });
    assert_eq!(mesh("/data", &[]).status, 200);
    assert_eq!(plaintext("/data"), 200);

    // A workload-level STRICT (selector on the pod's labels): plaintext
    // fails the handshake, and the live plaintext connection is cut.
    let changed = std::time::Instant::now();
    create(
        &api,
        "PeerAuthentication",
        "foo",
        "httpbin-strict",
        json!({"selector": {"matchLabels": {"app": "httpbin"}}, "mtls": {"mode": "STRICT"}}),
    );
    wait::until_true("plaintext refused once STRICT", WITHIN, || {
        plaintext("/data") == 0
    });
    let applied_after = changed.elapsed();
    assert_ne!(
        get_on(&mut live, "/data"),
        200,
        "a plaintext connection outlived STRICT"
    );
    assert_eq!(mesh("/data", &[]).status, 200);

    // An ALLOW for the client's principal (Istio's form) on GET.
    create(
        &api,
        "AuthorizationPolicy",
        "foo",
        "allow-sleep",
        json!({"selector": {"matchLabels": {"app": "httpbin"}}, "action": "ALLOW",
            "rules": [{"from": [{"source": {"principals": ["example.org/ns/foo/sa/sleep"]}}],
                       "to": [{"operation": {"methods": ["GET"]}}]}]}),
    );
    wait::until_true("POST refused by allow-sleep", WITHIN, || {
        mesh("/data", &["-X", "POST", "-d", "x"]).status == 403
    });
    assert_eq!(mesh("/data", &[]).status, 200);

    // Updated to another principal: the client is no longer allowed.
    update(
        &api,
        "AuthorizationPolicy",
        "foo",
        "allow-sleep",
        json!({"selector": {"matchLabels": {"app": "httpbin"}}, "action": "ALLOW",
            "rules": [{"from": [{"source": {"principals": ["example.org/ns/foo/sa/nobody"]}}]}]}),
    );
    wait::until_true("GET refused after the update", WITHIN, || {
        mesh("/data", &[]).status == 403
    });

    // A RequestAuthentication (created as v1beta1) with the test's keys,
    // and the ALLOW now asking for a token of its issuer.
    let issuer = Issuer::new(dir);
    api.create(
        &at("v1beta1", "foo", "requestauthentications"),
        &resource(
            "v1beta1",
            "RequestAuthentication",
            "foo",
            "jwt",
            json!({"selector": {"matchLabels": {"app": "httpbin"}},
                "jwtRules": [{"issuer": "https://issuer.test", "audiences": ["httpbin"],
                              "jwks": issuer.jwks()}]}),
        ),
    );
    update(
        &api,
        "AuthorizationPolicy",
        "foo",
        "allow-sleep",
        json!({"selector": {"matchLabels": {"app": "httpbin"}}, "action": "ALLOW",
            "rules": [{"from": [{"source": {"requestPrincipals": ["https://issuer.test/*"]}}]}]}),
    );
    let bearer = |claims: &str| format!("authorization: Bearer {}", issuer.token(claims));
    let valid = bearer(&claims("https://issuer.test", "httpbin", now() + 600));
    wait::until_true("a valid token allowed", WITHIN, || {
        mesh("/data", &["-H", &valid]).status == 200
    });
    assert_eq!(
        mesh("/data", &[]).status,
        403,
        "no token, a principal required"
    );
    let expired = bearer(&claims("https://issuer.test", "httpbin", now() - 600));
    assert_eq!(mesh("/data", &["-H", &expired]).status, 401, "expired");
    let wrong_aud = bearer(&claims("https://issuer.test", "other", now() + 600));
    assert_eq!(mesh("/data", &["-H", &wrong_aud]).status, 401, "audience");

    // A policy with a field Rampart refuses: refused by name, counted, and
    // the set in force stays, whole: a later good change (deleting the
    // root namespace's DENY) waits until the broken policy is gone.
    let refused_before = metric(
        &server.metrics(),
        "rampart_istio_resources_refused_total{kind=\"AuthorizationPolicy\"}",
    );
    create(
        &api,
        "AuthorizationPolicy",
        "foo",
        "bad",
        json!({"selector": {"matchLabels": {"app": "httpbin"}}, "action": "DENY",
            "rules": [{"when": [{"key": "experimental.envoy.filters.network.mysql_proxy[db.table]",
                                 "values": ["[update]"]}]}]}),
    );
    wait::until_true("the broken policy refused", WITHIN, || {
        metric(
            &server.metrics(),
            "rampart_istio_resources_refused_total{kind=\"AuthorizationPolicy\"}",
        ) > refused_before
    });
    let log = logs();
    assert!(
        log.contains("Istio resource refused")
            && log.contains("AuthorizationPolicy foo/bad (Kubernetes API)")
            && log.contains("experimental"),
        "{log}"
    );
    delete(
        &api,
        "v1",
        "AuthorizationPolicy",
        "istio-system",
        "deny-admin",
    );
    // Give the deletion the time a change takes, then check nothing moved.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(mesh("/data", &["-H", &valid]).status, 200);
    assert_eq!(mesh("/data", &[]).status, 403);
    assert_eq!(
        mesh("/admin", &["-H", &valid]).status,
        403,
        "deny-admin kept"
    );
    assert_eq!(plaintext("/data"), 0, "STRICT kept");

    // The broken policy deleted: the set loads, deny-admin's deletion too.
    delete(&api, "v1", "AuthorizationPolicy", "foo", "bad");
    wait::until_true("the set in force again", WITHIN, || {
        mesh("/admin", &["-H", &valid]).status == 200
    });
    assert_eq!(mesh("/data", &[]).status, 403);
    println!(
        "istio_kube: sidecar ready {ready_after:?} after start (lists of 6 watches loaded); a created PeerAuthentication refused plaintext {applied_after:?} after the POST (curl polling); load average {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
}

/// The CRDs of `istio-crds.yaml` as an older cluster has them: only
/// `v1beta1` served (and stored).
fn v1beta1_only_crds() -> Vec<Json> {
    let text = std::fs::read_to_string(repo().join("tests/sidecars/istio-crds.yaml")).unwrap();
    text.split("\n---")
        .filter_map(|doc| serde_yaml::from_str::<Option<Json>>(doc).unwrap())
        .map(|mut crd| {
            let versions = crd["spec"]["versions"].as_array_mut().unwrap();
            versions.retain(|v| v["name"] == "v1beta1");
            versions[0]["storage"] = json!(true);
            crd
        })
        .collect()
}

#[test]
#[ignore = "needs the Kubernetes peers (tests/peers/peer-kube.sh; cargo test -- --include-ignored)"]
fn a_cluster_serving_only_v1beta1_istio_files_beside_the_api_and_fetched_keys() {
    let api = ControlPlane::start();
    for ns in ["foo", "istio-system"] {
        api.namespace(ns, &json!({}));
    }
    for crd in v1beta1_only_crds() {
        api.create(
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
            &crd,
        );
    }
    wait::until_true("the v1beta1 CRDs served", Duration::from_secs(30), || {
        api.raw("GET", &at("v1beta1", "foo", "authorizationpolicies"), None)
            .0
            == 200
    });
    assert_eq!(
        api.raw("GET", &at("v1", "foo", "authorizationpolicies"), None)
            .0,
        404,
        "v1 is not served"
    );
    grant(&api, &["foo", "istio-system"]);
    let kubeconfig = api.kubeconfig_for(USER, None);
    let pki = Loopback::new();
    let dir = pki.dir.path();

    // A user the API refuses (no binding): nothing is in force, the
    // sidecar is not ready, the log says why.
    let unbound = api.kubeconfig_for("rampart-unbound", None);
    let refused = pki.sidecar_unready_with("spiffe://example.org/ns/foo/sa/unbound", |c| {
        c.listeners.push(inbound_listener_as(
            "in",
            free_addr(),
            free_addr(),
            APP_PORT,
        ));
        c.inbound.istio = Some(IstioConfig {
            kubernetes: Some(IstioKubernetes {
                kubeconfig: Some(unbound),
                ..IstioKubernetes::default()
            }),
            ..IstioConfig::new(Vec::new(), "foo")
        });
    });
    let deadline = std::time::Instant::now() + WITHIN;
    while !refused.logs().contains("listing Istio resources failed") {
        assert!(
            std::time::Instant::now() < deadline,
            "the refused list not logged:\n{}",
            refused.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(refused.logs().contains("forbidden"), "{}", refused.logs());
    assert_eq!(refused.get("/ready"), Some(503), "{}", refused.logs());
    assert_eq!(policy(&refused)["origin"], "waiting_for_kubernetes");
    drop(refused);

    let deny = |path: &str| json!({"action": "DENY", "rules": [{"to": [{"operation": {"paths": [path]}}]}]});
    api.create(
        &at("v1beta1", "istio-system", "authorizationpolicies"),
        &resource(
            "v1beta1",
            "AuthorizationPolicy",
            "istio-system",
            "deny-api",
            deny("/from-api"),
        ),
    );

    let file = dir.join("istio.yaml");
    let write_file = |path: &str| {
        let doc = resource("v1", "AuthorizationPolicy", "foo", "deny-file", deny(path));
        let tmp = file.with_extension("tmp");
        std::fs::write(&tmp, serde_yaml::to_string(&doc).unwrap()).unwrap();
        std::fs::rename(&tmp, &file).unwrap();
    };
    write_file("/from-file");
    let app_addr = free_addr();
    let _app = LocalProc::spawn(&apps::http_app(app_addr.port(), "httpbin"), dir, "httpbin");
    wait_listening(app_addr);
    let inbound = free_addr();
    let server = pki.sidecar_with(SERVER, |c| {
        c.listeners
            .push(inbound_listener_as("in", inbound, app_addr, APP_PORT));
        c.inbound.ports = vec![PortConfig {
            protocol: DeclaredProtocol::Http,
            ..PortConfig::new(APP_PORT)
        }];
        c.inbound.istio = Some(IstioConfig {
            trust_domain: "example.org".into(),
            kubernetes: Some(IstioKubernetes {
                kubeconfig: Some(kubeconfig.clone()),
                ..IstioKubernetes::default()
            }),
            ..IstioConfig::new(vec![file.clone()], "foo")
        });
    });
    let (_client, outs) = pki.outbound_sidecar_with(CLIENT, &[inbound], SERVER, |_| {});
    let status = |path: &str| curl(&format!("http://{}{path}", outs[0]), &[]).status;
    assert_eq!(status("/data"), 200, "{}", server.logs());
    assert_eq!(status("/from-api"), 403, "the v1beta1 policy");
    assert_eq!(status("/from-file"), 403, "the file's policy");

    // A file edit applies, the API's resources staying in the set.
    write_file("/edited");
    wait::until_true("the file edit in force", WITHIN, || {
        status("/edited") == 403
    });
    assert_eq!(status("/from-file"), 200);
    assert_eq!(status("/from-api"), 403);
    // And an API change keeps the edited file.
    delete(
        &api,
        "v1beta1",
        "AuthorizationPolicy",
        "istio-system",
        "deny-api",
    );
    wait::until_true("deny-api deleted", WITHIN, || status("/from-api") == 200);
    assert_eq!(status("/edited"), 403);

    // A RequestAuthentication whose keys are at an http:// jwksUri, first
    // seen from the API: fetched once it is in force.
    let issuer = Issuer::new(dir);
    let keys_dir = dir.join("keys");
    std::fs::create_dir_all(&keys_dir).unwrap();
    std::fs::write(keys_dir.join("jwks.json"), issuer.jwks()).unwrap();
    let keys_addr = free_addr();
    let python = apps::python().expect("python3");
    let _keys = LocalProc::spawn(
        &[
            python,
            "-m".into(),
            "http.server".into(),
            keys_addr.port().to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--directory".into(),
            keys_dir.display().to_string(),
        ],
        dir,
        "jwks-server",
    );
    wait_listening(keys_addr);
    api.create(
        &at("v1beta1", "foo", "requestauthentications"),
        &resource(
            "v1beta1",
            "RequestAuthentication",
            "foo",
            "jwt",
            json!({"jwtRules": [{"issuer": "https://issuer.test",
                "jwksUri": format!("http://{keys_addr}/jwks.json")}]}),
        ),
    );
    api.create(
        &at("v1beta1", "foo", "authorizationpolicies"),
        &resource(
            "v1beta1",
            "AuthorizationPolicy",
            "foo",
            "jwt-on-data",
            json!({"action": "DENY", "rules": [{
                "from": [{"source": {"notRequestPrincipals": ["*"]}}],
                "to": [{"operation": {"paths": ["/data"]}}]}]}),
        ),
    );
    let token = format!(
        "authorization: Bearer {}",
        issuer.token(&claims("https://issuer.test", "httpbin", now() + 600))
    );
    let with_token = || curl(&format!("http://{}/data", outs[0]), &["-H", &token]).status;
    wait::until_true("the fetched keys verify the token", WITHIN, || {
        with_token() == 200
    });
    assert_eq!(status("/data"), 403, "no token on /data");
    assert!(server.logs().contains("JWKS fetched"), "{}", server.logs());
}
