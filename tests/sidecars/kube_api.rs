//! Kubernetes integration. `rampart webhook` against a real API server (etcd and
//! kube-apiserver built from their Go modules by tests/peers/peer-kube.sh;
//! no kubelet or controllers: the test creates the objects a Deployment's
//! controllers would). The API server calls the webhook through the
//! MutatingWebhookConfiguration that deploy/webhook/ ships, stores the
//! injected pod after its own validation, keeps calling the webhook across
//! a certificate rotation, refuses other meshes' pods, and fails closed.
//! And the probes injection rewrites, run by a real sidecar against real
//! HTTP and gRPC apps.

use crate::support;

use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value as Json, json};

use support::Proc;
use support::kube::{ControlPlane, TestCa};
use support::sidecar::free_addr;

const NS: &str = "ec";
const IMAGE: &str = "rampart:test";

/// The pod template of the test's Deployment: an app whose HTTP readiness
/// probe (named port), gRPC liveness probe and TCP startup probe must be
/// rewritten to the sidecar's admin port, and an `exec` probe that stays.
fn template() -> Json {
    json!({
        "metadata": {"labels": {"app": "web"}, "annotations": {"release-date": "2024-01-01"}},
        "spec": {
            "containers": [{
                "name": "app", "image": "registry.example/web:1",
                "ports": [{"name": "http", "containerPort": 8080}, {"containerPort": 9090}],
                "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http",
                    "httpHeaders": [{"name": "X-Probe", "value": "kubelet"}]}, "periodSeconds": 2},
                "livenessProbe": {"grpc": {"port": 9090, "service": "web"}, "timeoutSeconds": 3},
                "startupProbe": {"tcpSocket": {"port": 8080}, "failureThreshold": 30}
            }, {
                "name": "log-shipper", "image": "registry.example/shipper:1",
                "livenessProbe": {"exec": {"command": ["true"]}}
            }]
        }
    })
}

#[test]
#[ignore = "needs kube-apiserver and etcd (tests/peers/peer-kube.sh)"]
fn the_api_server_calls_the_webhook_and_stores_injected_pods() {
    let api = ControlPlane::start();
    let dir = api.dir.path().join("webhook");
    std::fs::create_dir_all(&dir).unwrap();
    let first_ca = TestCa::new("webhook-ca-1");
    install(&dir, &first_ca.issue(&dir, "issued", &["127.0.0.1"], None));
    let addr = free_addr();
    let mut webhook = std::process::Command::new(support::rampart_bin());
    webhook
        .args(["webhook", "--image", IMAGE, "--listen", &addr.to_string()])
        .arg("--tls-cert")
        .arg(dir.join("tls.crt"))
        .arg("--tls-key")
        .arg(dir.join("tls.key"))
        .args(["--tls-reload-interval", "1s", "--log-format", "json"]);
    let mut webhook = Proc::spawn(webhook, "webhook", api.dir.path());
    support::sidecar::wait_listening(addr);

    // The shipped configuration, pointed at this webhook by URL.
    let mut config = shipped_webhook_configuration();
    assert_eq!(
        config["webhooks"][0]["failurePolicy"], "Fail",
        "fail closed is kept"
    );
    config["webhooks"][0]["clientConfig"] = json!({
        "url": format!("https://{addr}/inject"),
        "caBundle": b64(&first_ca.cert_pem),
    });
    api.create(
        "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations",
        &config,
    );
    api.namespace(NS, &json!({"rampart.io/inject": "enabled"}));
    api.namespace("plain", &json!({}));
    wait_injecting(&api, "the first certificate");

    // Deployment -> ReplicaSet -> Pods, as their controllers would create them.
    let deployment = api.create(
        &format!("/apis/apps/v1/namespaces/{NS}/deployments"),
        &json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}}, "template": template()}}),
    );
    // The webhook injects pods, not templates: the Deployment stays as written.
    assert_eq!(
        deployment["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert!(
        deployment["spec"]["template"]["spec"]
            .get("initContainers")
            .is_none()
    );
    let mut rs_template = deployment["spec"]["template"].clone();
    rs_template["metadata"]["labels"]["pod-template-hash"] = json!("5d9c7b8f4");
    let replicaset = api.create(
        &format!("/apis/apps/v1/namespaces/{NS}/replicasets"),
        &json!({"apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {"name": "web-5d9c7b8f4", "labels": rs_template["metadata"]["labels"],
                "ownerReferences": [owner(&deployment, "Deployment")]},
            "spec": {"replicas": 2,
                "selector": {"matchLabels": {"app": "web", "pod-template-hash": "5d9c7b8f4"}},
                "template": rs_template}}),
    );
    for _ in 0..2 {
        let pod = create_pod(&api, &replicaset);
        check_injected(&pod);
    }
    let pods = api.get(&format!("/api/v1/namespaces/{NS}/pods"));
    assert_eq!(pods["items"].as_array().unwrap().len(), 2);

    // `rampart inject`'s own output for the Deployment passes the API
    // server's validation too (dry run, in a namespace the webhook skips).
    let injected = inject_cli(&json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}}, "template": template()}}));
    let stored = api.create(
        "/apis/apps/v1/namespaces/plain/deployments?dryRun=All",
        &injected,
    );
    check_injected(
        &json!({"metadata": stored["spec"]["template"]["metadata"], "spec": stored["spec"]["template"]["spec"]}),
    );

    // Another mesh's pod is refused, with the reason.
    for (pod, expected) in [
        (
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "istio"},
                "spec": {"containers": [{"name": "app", "image": "a"}, {"name": "istio-proxy", "image": "b"}]}}),
            "already meshed by Istio (container istio-proxy)",
        ),
        (
            json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "linkerd", "annotations": {"linkerd.io/inject": "enabled"}},
                "spec": {"containers": [{"name": "app", "image": "a"}]}}),
            "already meshed by Linkerd (annotation linkerd.io/inject: enabled)",
        ),
    ] {
        let (status, answer) =
            api.request("POST", &format!("/api/v1/namespaces/{NS}/pods"), Some(&pod));
        let message = answer["message"].as_str().unwrap_or_default();
        assert_eq!(status, 400, "{answer}");
        assert!(
            message.contains("admission webhook \"inject.rampart.io\" denied the request")
                && message.contains(expected),
            "{message}"
        );
    }

    // Rotation: a certificate from a new CA replaces the files (certificate
    // first, so the webhook sees a mismatched pair for a moment); once the
    // API server trusts only the new CA, pods are still injected by the
    // same process.
    let second_ca = TestCa::new("webhook-ca-2");
    let second = second_ca.issue(&dir, "issued", &["127.0.0.1"], None);
    install(&dir, &second);
    wait_log(&webhook, "serving certificate reloaded");
    let path =
        "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/rampart-injector";
    let mut current = api.get(path);
    current["webhooks"][0]["clientConfig"]["caBundle"] = json!(b64(&second_ca.cert_pem));
    let (status, answer) = api.request("PUT", path, Some(&current));
    assert_eq!(status, 200, "{answer}");
    wait_injecting(&api, "the rotated certificate");
    check_injected(&create_pod(&api, &replicaset));
    assert!(webhook.try_status().is_none(), "the webhook kept running");

    // The webhook's log: JSON lines, no terminal colours.
    let log = webhook.stderr();
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escapes in a non-terminal log:\n{log}"
    );
    let lines: Vec<Json> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.iter().any(|l| {
        l["fields"]["message"] == "admission reviewed"
            && l["fields"]["allowed"] == false
            && l["fields"]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("Istio"))
    }));

    // Fail closed: with the webhook gone, no pod is created without its sidecar.
    webhook.kill();
    let (status, answer) = api.request(
        "POST",
        &format!("/api/v1/namespaces/{NS}/pods"),
        Some(&pod_of(&replicaset)),
    );
    assert_eq!(status, 500, "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .unwrap_or_default()
            .contains("failed calling webhook \"inject.rampart.io\""),
        "{answer}"
    );
    let pods = api.get(&format!("/api/v1/namespaces/{NS}/pods"));
    assert_eq!(pods["items"].as_array().unwrap().len(), 3);
}

/// What a pod created through the API gets for its service-account token,
/// and what the injected sidecar gets: the ServiceAccount admission plugin
/// (on by default; the test's API server has the signing key it needs)
/// adds the projected `kube-api-access-*` volume and mounts it into the
/// containers present when it runs, before the webhook adds the sidecar;
/// injection gives the sidecar the same mount, which its in-cluster
/// discovery reads. A pod with `automountServiceAccountToken: false` gets
/// no token at all, the sidecar neither.
#[test]
#[ignore = "needs kube-apiserver and etcd (tests/peers/peer-kube.sh)"]
fn the_injected_sidecar_mounts_the_service_account_token_the_app_gets() {
    let api = ControlPlane::start();
    let dir = api.dir.path().join("webhook");
    std::fs::create_dir_all(&dir).unwrap();
    let ca = TestCa::new("webhook-ca");
    install(&dir, &ca.issue(&dir, "issued", &["127.0.0.1"], None));
    let addr = free_addr();
    let mut webhook = std::process::Command::new(support::rampart_bin());
    webhook
        .args(["webhook", "--image", IMAGE, "--listen", &addr.to_string()])
        .arg("--tls-cert")
        .arg(dir.join("tls.crt"))
        .arg("--tls-key")
        .arg(dir.join("tls.key"));
    let _webhook = Proc::spawn(webhook, "webhook", api.dir.path());
    support::sidecar::wait_listening(addr);
    let mut config = shipped_webhook_configuration();
    config["webhooks"][0]["clientConfig"] = json!({
        "url": format!("https://{addr}/inject"),
        "caBundle": b64(&ca.cert_pem),
    });
    api.create(
        "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations",
        &config,
    );
    api.namespace(NS, &json!({"rampart.io/inject": "enabled"}));
    wait_injecting(&api, "the certificate");

    let pod = |name: &str, automount: Option<bool>| {
        let mut spec = json!({"containers": [{"name": "app", "image": "registry.example/web:1"}]});
        if let Some(a) = automount {
            spec["automountServiceAccountToken"] = json!(a);
        }
        api.create(
            &format!("/api/v1/namespaces/{NS}/pods"),
            &json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}),
        )
    };
    let token_mount = |container: &Json| -> Option<Json> {
        container["volumeMounts"]
            .as_array()?
            .iter()
            .find(|m| m["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount")
            .cloned()
    };
    let stored = pod("web", None);
    let spec = &stored["spec"];
    let app = token_mount(&spec["containers"][0])
        .unwrap_or_else(|| panic!("the API server mounted no token into the app: {stored}"));
    let volume = app["name"].as_str().unwrap();
    assert!(volume.starts_with("kube-api-access-"), "{app}");
    let projected = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == volume)
        .unwrap_or_else(|| panic!("no volume {volume}: {stored}"));
    assert!(
        projected["projected"]["sources"][0]["serviceAccountToken"]["path"] == "token",
        "{projected}"
    );
    let proxy = &spec["initContainers"][1];
    assert_eq!(proxy["name"], "rampart-proxy");
    eprintln!(
        "stored pod: app mounts {app}; the sidecar mounts {:?}; the init container {:?}",
        token_mount(proxy),
        token_mount(&spec["initContainers"][0])
    );
    let mount = token_mount(proxy).unwrap_or_else(|| panic!("the sidecar has no token: {proxy}"));
    assert_eq!(mount["name"], volume);
    assert_eq!(mount["readOnly"], true);
    let mounts_of_volume = proxy["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["name"] == volume)
        .count();
    assert_eq!(mounts_of_volume, 1, "mounted once: {proxy}");

    // Opted out: no token in the pod, none in the sidecar.
    let stored = pod("no-token", Some(false));
    let spec = &stored["spec"];
    assert!(
        spec["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| !v["name"].as_str().unwrap().starts_with("kube-api-access-")),
        "{stored}"
    );
    assert_eq!(token_mount(&spec["containers"][0]), None);
    assert_eq!(token_mount(&spec["initContainers"][1]), None);
}

/// A sidecar whose Kubernetes discovery is in-cluster (no kubeconfig) in a
/// container without a service-account token (a pod with
/// `automountServiceAccountToken: false`) refuses to start, saying why,
/// rather than running without discovery.
#[test]
fn in_cluster_discovery_without_a_token_fails_at_start_with_the_reason() {
    let token = std::path::Path::new("/var/run/secrets/kubernetes.io/serviceaccount/token");
    assert!(!token.exists(), "this machine has a token at {token:?}");
    let pki = support::sidecar::Loopback::new();
    let mut cfg = pki.config("spiffe://example.org/client");
    cfg.transparent = None;
    let app = free_addr();
    cfg.listeners.push(support::sidecar::outbound_listener(
        "out",
        free_addr(),
        app,
        "spiffe://example.org/s",
    ));
    cfg.discovery.kubernetes = Some(rampart_discovery::kubernetes::KubernetesConfig::default());
    let mut sidecar = support::sidecar::Sidecar::spawn_with_env(
        pki.dir.path(),
        "client",
        &cfg,
        &[
            ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
            ("KUBERNETES_SERVICE_PORT", "443"),
        ],
    );
    let status = sidecar
        .wait_exit(Duration::from_secs(20))
        .expect("the sidecar exits");
    assert!(!status.success(), "{status}");
    let log = sidecar.logs();
    assert!(
        log.contains(
            "no service-account token at /var/run/secrets/kubernetes.io/serviceaccount/token"
        ) && log.contains("automountServiceAccountToken: false"),
        "{log}"
    );
    assert_eq!(sidecar.get("/ready"), None, "never served");
}

/// What the stored pod must hold: the init container and the native
/// sidecar first, the app's probes on the admin port with the originals in
/// the sidecar's environment, the `exec` probe untouched, and the quoted
/// date still a string.
fn check_injected(pod: &Json) {
    let spec = &pod["spec"];
    let init = spec["initContainers"]
        .as_array()
        .unwrap_or_else(|| panic!("no initContainers: {pod}"));
    assert_eq!(init[0]["name"], "rampart-init", "{pod}");
    assert_eq!(init[1]["name"], "rampart-proxy");
    assert_eq!(init[1]["restartPolicy"], "Always");
    assert_eq!(init[1]["image"], IMAGE);
    assert!(pod["metadata"]["annotations"]["rampart.io/status"].is_string());
    assert_eq!(pod["metadata"]["annotations"]["release-date"], "2024-01-01");
    let app = &spec["containers"][0];
    assert_eq!(
        app["readinessProbe"]["httpGet"]["path"],
        "/app-health/app/readyz"
    );
    assert_eq!(app["readinessProbe"]["httpGet"]["port"], 15000);
    assert_eq!(app["readinessProbe"]["periodSeconds"], 2);
    assert_eq!(
        app["livenessProbe"]["httpGet"]["path"],
        "/app-health/app/livez"
    );
    assert!(app["livenessProbe"].get("grpc").is_none());
    assert_eq!(
        app["startupProbe"]["httpGet"]["path"],
        "/app-health/app/startupz"
    );
    assert_eq!(
        spec["containers"][1]["livenessProbe"]["exec"]["command"][0],
        "true"
    );
    let env = init[1]["env"].as_array().unwrap();
    let probes = env
        .iter()
        .find(|e| e["name"] == "RAMPART_APP_PROBES")
        .unwrap();
    let mut probes: Json = serde_json::from_str(probes["value"].as_str().unwrap()).unwrap();
    // The API server defaults `scheme` before admission: the webhook sees
    // (and carries) it; `rampart inject` sees the template as written.
    let http = probes["/app-health/app/readyz"]["httpGet"]
        .as_object_mut()
        .unwrap();
    if let Some(scheme) = http.remove("scheme") {
        assert_eq!(scheme, "HTTP");
    }
    assert_eq!(
        probes,
        json!({
            "/app-health/app/readyz": {"httpGet": {"path": "/healthz", "port": 8080,
                "httpHeaders": [{"name": "X-Probe", "value": "kubelet"}]}, "timeoutSeconds": 1,
                "portName": "http"},
            "/app-health/app/livez": {"grpc": {"port": 9090, "service": "web"}, "timeoutSeconds": 3},
            "/app-health/app/startupz": {"tcpSocket": {"port": 8080}, "timeoutSeconds": 1}
        })
    );
}

/// A pod of `replicaset`, as the ReplicaSet controller makes one.
fn pod_of(replicaset: &Json) -> Json {
    let template = &replicaset["spec"]["template"];
    let name = replicaset["metadata"]["name"].as_str().unwrap();
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": format!("{name}-"), "labels": template["metadata"]["labels"],
            "annotations": template["metadata"]["annotations"],
            "ownerReferences": [owner(replicaset, "ReplicaSet")]},
        "spec": template["spec"]})
}

fn create_pod(api: &ControlPlane, replicaset: &Json) -> Json {
    api.create(
        &format!("/api/v1/namespaces/{NS}/pods"),
        &pod_of(replicaset),
    )
}

fn owner(object: &Json, kind: &str) -> Json {
    json!({"apiVersion": "apps/v1", "kind": kind, "name": object["metadata"]["name"],
        "uid": object["metadata"]["uid"], "controller": true, "blockOwnerDeletion": true})
}

/// Dry-run pod creations until the API server's answer is injected: the
/// API server picks webhook configuration changes up asynchronously.
fn wait_injecting(api: &ControlPlane, what: &str) {
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"generateName": "probe-"},
        "spec": {"containers": [{"name": "app", "image": "a"}]}});
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, answer) = api.request(
            "POST",
            &format!("/api/v1/namespaces/{NS}/pods?dryRun=All"),
            Some(&pod),
        );
        if status == 201 && answer["spec"]["initContainers"][1]["name"] == "rampart-proxy" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not injecting with {what}: {status} {answer}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn wait_log(proc: &Proc, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !proc.stderr().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in:\n{}",
            proc.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Puts `issued` in place as the webhook's `tls.crt` and `tls.key`, each
/// by an atomic rename (as the kubelet updates a Secret volume), the
/// certificate first.
fn install(dir: &std::path::Path, issued: &support::kube::CertFiles) {
    std::fs::rename(&issued.cert, dir.join("tls.crt")).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    std::fs::rename(&issued.key, dir.join("tls.key")).unwrap();
}

fn shipped_webhook_configuration() -> Json {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/webhook/webhook.yaml"
    ))
    .unwrap();
    for document in serde_yaml::Deserializer::from_str(&text) {
        let value: Json = serde::Deserialize::deserialize(document).unwrap();
        if value["kind"] == "MutatingWebhookConfiguration" {
            return value;
        }
    }
    panic!("deploy/webhook/webhook.yaml has no MutatingWebhookConfiguration");
}

fn inject_cli(object: &Json) -> Json {
    use std::io::Write as _;
    let mut child = std::process::Command::new(support::rampart_bin())
        .args(["inject", "--image", IMAGE])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_yaml::to_string(object).unwrap().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    serde_yaml::from_slice(&out.stdout).unwrap()
}

fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// The probes injection rewrote, run by a real sidecar for a kubelet-style
/// client (curl with the kubelet's `User-Agent`) against real apps on a
/// STRICT port: an HTTP app (Python's http.server) and a gRPC app with
/// grpcio's standard health service (grpcio-health-checking).
#[test]
#[ignore = "needs python3 with grpcio and grpcio-health-checking (pip install -r tests/requirements.txt)"]
fn rewritten_probes_reach_the_app_through_the_admin_port() {
    let python = support::apps::python().expect("python3 is not installed");
    let health = std::process::Command::new(&python)
        .args(["-c", "import grpc, grpc_health.v1.health"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        health,
        "grpcio and grpcio-health-checking are not installed (pip install -r tests/requirements.txt)"
    );
    let pki = support::sidecar::Loopback::new();
    let dir = pki.dir.path();
    let (http_app, grpc_app, inbound) = (free_addr(), free_addr(), free_addr());
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web"},
        "spec": {"containers": [{"name": "app", "image": "a",
            "ports": [{"name": "http", "containerPort": http_app.port()}],
            "readinessProbe": {"httpGet": {"path": "/healthz?full=1", "port": "http",
                "httpHeaders": [{"name": "X-Probe", "value": "kubelet"}]}},
            "livenessProbe": {"grpc": {"port": grpc_app.port(), "service": "web"}, "timeoutSeconds": 2},
            "startupProbe": {"tcpSocket": {"port": http_app.port()}}}]}});
    let injected = inject_cli(&pod);
    let sidecar = &injected["spec"]["initContainers"][1];
    let probes = sidecar["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "RAMPART_APP_PROBES")
        .unwrap()["value"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = |kind: &str| {
        injected["spec"]["containers"][0][kind]["httpGet"]["path"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (ready, live, startup) = (
        path("readinessProbe"),
        path("livenessProbe"),
        path("startupProbe"),
    );

    let (http_sick, grpc_sick) = (dir.join("http-sick"), dir.join("grpc-sick"));
    let script = |source: &str, port: u16, flag: &std::path::Path| {
        vec![
            python.clone(),
            "-u".into(),
            "-c".into(),
            source.into(),
            port.to_string(),
            flag.display().to_string(),
        ]
    };
    let http = support::sidecar::LocalProc::spawn(
        &script(HTTP_APP, http_app.port(), &http_sick),
        dir,
        "http-app",
    );
    let grpc = support::sidecar::LocalProc::spawn(
        &script(GRPC_HEALTH_APP, grpc_app.port(), &grpc_sick),
        dir,
        "grpc-app",
    );
    support::sidecar::wait_listening(http_app);
    support::sidecar::wait_listening(grpc_app);

    // The app port is STRICT (the default): only mTLS peers get in.
    let id = "spiffe://example.org/web";
    let svid = pki.issue(id, "web");
    let mut cfg = support::sidecar::base_config(&svid);
    cfg.listeners.push(rampart_proxy::config::ListenerConfig {
        name: "in".into(),
        direction: rampart_proxy::config::Direction::Inbound,
        listen: inbound,
        target: http_app.into(),
        port: None,
        server_identities: None,
    });
    cfg.inbound.ports.push(rampart_app::config::PortConfig {
        allowed_peers: Some(vec![support::pki::parse_id("spiffe://example.org/client")]),
        ..rampart_app::config::PortConfig::new(http_app.port())
    });
    let sidecar = support::sidecar::Sidecar::spawn_with_env(
        dir,
        "web",
        &cfg,
        &[("RAMPART_APP_PROBES", &probes)],
    );
    sidecar.wait_ready();
    let admin = sidecar.admin_addr();
    let kubelet = |path: &str| {
        support::curl::curl(&format!("http://{admin}{path}"), &["-A", "kube-probe/1.36"])
    };

    // What the kubelet would get on the app port itself: refused.
    assert_ne!(
        support::curl::curl(&format!("http://{inbound}/healthz"), &[]).status,
        200
    );

    // HTTP: the original path, query and headers reach the app.
    let r = kubelet(&ready);
    assert_eq!(r.status, 200, "{r:?}\n{}", sidecar.logs());
    let seen: Json = serde_json::from_str(http.stdout().lines().last().unwrap()).unwrap();
    assert_eq!(seen["path"], "/healthz?full=1");
    assert_eq!(seen["probe"], "kubelet");
    assert_eq!(seen["agent"], "kube-probe/1.36");
    // gRPC: the standard health check of service `web`; TCP: a connect.
    assert_eq!(kubelet(&live).status, 200);
    assert_eq!(kubelet(&startup).status, 200);
    // Only the declared probes are served.
    assert_eq!(kubelet("/app-health/app/other").status, 404);
    assert_eq!(
        support::curl::curl(&format!("http://{admin}{ready}"), &["-X", "POST"]).status,
        405
    );

    // The app's own answers: its failing status as it is, NOT_SERVING as 503.
    std::fs::write(&http_sick, "").unwrap();
    assert_eq!(kubelet(&ready).status, 503);
    std::fs::write(&grpc_sick, "").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while kubelet(&live).status != 503 {
        assert!(
            Instant::now() < deadline,
            "gRPC health never turned NOT_SERVING: {}",
            grpc.stdout()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The app gone: every probe fails, none hangs past its timeout.
    drop(grpc);
    drop(http);
    let started = Instant::now();
    for path in [&ready, &live, &startup] {
        assert_eq!(kubelet(path).status, 503, "{path}");
    }
    assert!(started.elapsed() < Duration::from_secs(8));
}

/// An HTTP app: answers 200 (503 once the file argv[2] exists) and prints
/// each request's path and probe headers as a JSON line.
const HTTP_APP: &str = r#"
import http.server, json, os, sys
port, flag = int(sys.argv[1]), sys.argv[2]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        print(json.dumps({"path": self.path, "probe": self.headers.get("X-Probe"),
                          "agent": self.headers.get("User-Agent")}), flush=True)
        self.send_response(503 if os.path.exists(flag) else 200)
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"ok\n")
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"#;

/// A gRPC app with grpcio's standard health service: `web` is SERVING
/// until the file argv[2] exists, then NOT_SERVING.
const GRPC_HEALTH_APP: &str = r#"
import os, sys, time
from concurrent import futures
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
port, flag = int(sys.argv[1]), sys.argv[2]
server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
servicer = health.HealthServicer()
health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
server.add_insecure_port(f"127.0.0.1:{port}")
servicer.set("web", health_pb2.HealthCheckResponse.SERVING)
server.start()
print("serving", flush=True)
while not os.path.exists(flag):
    time.sleep(0.05)
servicer.set("web", health_pb2.HealthCheckResponse.NOT_SERVING)
print("not serving", flush=True)
server.wait_for_termination()
"#;
