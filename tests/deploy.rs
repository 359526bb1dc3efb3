//! deploy/ as a cluster would take it, checked offline:
//!
//! - every kustomization renders with the library behind `kubectl
//!   kustomize` (tests/peers/kustomize, built by peer-kustomize.sh), from
//!   the disk only: no remote resource (the CRDs are vendored);
//! - every rendered object validates strictly against the Kubernetes
//!   schemas (`kubernetes-validate --strict`), and so does every workload
//!   after `rampart inject`; the SPIRE custom resources validate strictly
//!   against the vendored CRDs' own schemas (tests/py/crd_validate.py);
//! - `spire-server validate` and `spire-agent validate` accept the exact
//!   configuration files that deploy/spire renders into its ConfigMaps;
//! - the cluster-level facts of issue 16's E1-E9, read from the rendered
//!   objects (the controller manager's socket path, the CRDs it needs, the
//!   webhook ordering, fsGroup, no host port for the agent's health, the
//!   default identity and configuration of a pod with no annotation).
//!
//! The Gateway API kinds of the scenario 3 Gateway variants (Gateway,
//! HTTPRoute, BackendTLSPolicy) and the PodMonitor of deploy/observability
//! have no schema offline and are only checked to render.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Deserialize as _;
use serde_yaml::Value;

/// Kinds validated against the vendored CRDs instead of kubernetes-validate.
const SPIRE_KINDS: &[&str] = &[
    "ClusterSPIFFEID",
    "ClusterFederatedTrustDomain",
    "ClusterStaticEntry",
];
/// Kinds with no schema offline: rendered, not validated (the Gateway API
/// kinds, and prometheus-operator's PodMonitor of deploy/observability).
const NO_SCHEMA_KINDS: &[&str] = &["Gateway", "HTTPRoute", "BackendTLSPolicy", "PodMonitor"];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Panics unless `tool` runs (the tests that need one are `#[ignore]`d).
fn require(tool: &str, check: &[&str]) {
    let runs = Command::new(tool)
        .args(check)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    assert!(
        runs,
        "{tool} is not installed (pip install -r tests/requirements.txt)"
    );
}

/// Every directory of deploy/ with a kustomization.yaml.
fn kustomizations() -> Vec<PathBuf> {
    let mut found = vec![];
    let mut stack = vec![root().join("deploy")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.file_name().is_some_and(|n| n == "kustomization.yaml") {
                found.push(dir.clone());
            }
        }
    }
    found.sort();
    found
}

/// `kubectl kustomize DIR`, offline.
fn render(kustomize: &Path, dir: &Path) -> String {
    let out = Command::new(kustomize).arg(dir).output().unwrap();
    assert!(
        out.status.success(),
        "kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn documents(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn kind(doc: &Value) -> &str {
    doc.get("kind").and_then(Value::as_str).unwrap_or("")
}

fn name(doc: &Value) -> &str {
    doc["metadata"]["name"].as_str().unwrap_or("")
}

fn find<'a>(docs: &'a [Value], kind_: &str, name_: &str) -> &'a Value {
    docs.iter()
        .find(|d| kind(d) == kind_ && name(d) == name_)
        .unwrap_or_else(|| panic!("no {kind_}/{name_} rendered"))
}

fn kustomize_bin() -> PathBuf {
    support::peers::require("kustomize", "v0.21.2", "rampart-kustomize")
}

/// All rendered kustomizations, by directory (relative to the repository).
fn rendered(kustomize: &Path) -> BTreeMap<String, Vec<Value>> {
    kustomizations()
        .into_iter()
        .map(|dir| {
            let name = dir.strip_prefix(root()).unwrap().display().to_string();
            (name, documents(&render(kustomize, &dir)))
        })
        .collect()
}

#[test]
#[ignore = "needs the Go-built kustomize peer (tests/peers/peer-kustomize.sh) and kubernetes-validate (cargo test -- --include-ignored)"]
fn every_kustomization_renders_offline_and_validates_strictly() {
    let kustomize = kustomize_bin();
    require("kubernetes-validate", &["--version"]);
    let all = rendered(&kustomize);
    for expected in [
        "deploy/spire",
        "deploy/spire/registration",
        "deploy/webhook",
        "deploy/examples/scenario1",
        "deploy/examples/scenario3/plaintext",
        "deploy/examples/scenario3/mtls",
        "deploy/examples/scenario3/gateway",
        "deploy/examples/scenario3/gateway-mtls",
    ] {
        assert!(
            all.contains_key(expected),
            "{expected} not rendered: {:?}",
            all.keys()
        );
    }
    let out = tempfile::tempdir().unwrap();
    let mut files: Vec<(PathBuf, String)> = vec![];
    let mut crs = vec![];
    let mut write = |dir: &Path, origin: String, doc: &Value| {
        let file = dir.join(format!("{:04}.json", files.len()));
        std::fs::write(&file, serde_json::to_string(doc).unwrap()).unwrap();
        files.push((file, origin));
    };
    for (dir, docs) in &all {
        for doc in docs {
            let k = kind(doc);
            let origin = format!("{dir}: {k}/{}", name(doc));
            if SPIRE_KINDS.contains(&k) {
                let file = out.path().join(format!("cr-{}.yaml", crs.len()));
                std::fs::write(&file, serde_yaml::to_string(doc).unwrap()).unwrap();
                crs.push(file);
            } else if !NO_SCHEMA_KINDS.contains(&k) {
                write(out.path(), origin.clone(), doc);
            }
            // Every workload as the injector would send it to the API server.
            if matches!(
                k,
                "Deployment" | "StatefulSet" | "DaemonSet" | "Pod" | "Job"
            ) {
                let text = serde_yaml::to_string(doc).unwrap();
                let injected = inject(&text);
                for d in documents(&injected) {
                    write(out.path(), format!("{origin} (injected)"), &d);
                }
            }
        }
    }
    let paths: Vec<&PathBuf> = files.iter().map(|(f, _)| f).collect();
    let result = Command::new("kubernetes-validate")
        .args(["--strict", "--quiet"])
        .args(&paths)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let mut report = String::from_utf8_lossy(&result.stdout).into_owned();
    report += &String::from_utf8_lossy(&result.stderr);
    for (file, origin) in &files {
        report = report.replace(&file.display().to_string(), origin);
    }
    assert!(
        result.status.success()
            && !report.contains("ERROR")
            && !report.contains("Couldn't find schema"),
        "{} objects checked:\n{report}",
        files.len()
    );

    // The SPIRE custom resources, against the CRDs deploy/spire installs.
    assert!(crs.len() >= 2, "no ClusterSPIFFEIDs rendered");
    let crds: Vec<PathBuf> = std::fs::read_dir(root().join("deploy/spire/crds"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    let checked = Command::new("python3")
        .arg(root().join("tests/py/crd_validate.py"))
        .args(&crds)
        .arg("--")
        .args(&crs)
        .output()
        .unwrap();
    assert!(
        checked.status.success(),
        "{}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
}

fn inject(text: &str) -> String {
    let mut child = Command::new(support::rampart_bin())
        .arg("inject")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "rampart inject: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The configuration files inside deploy/spire's ConfigMaps, exactly as
/// rendered, checked by SPIRE's own `validate` commands.
#[test]
#[ignore = "needs the Go-built kustomize and SPIRE peers (tests/peers/peer-kustomize.sh, peer-spire.sh; cargo test -- --include-ignored)"]
fn spire_validates_the_configuration_files_deploy_renders() {
    let kustomize = kustomize_bin();
    let bins = support::spire::Bins::require();
    let docs = documents(&render(&kustomize, &root().join("deploy/spire")));
    let dir = tempfile::tempdir().unwrap();
    for (bin, map, key) in [
        (&bins.server, "spire-server", "server.conf"),
        (&bins.agent, "spire-agent", "agent.conf"),
    ] {
        let text = find(&docs, "ConfigMap", map)["data"][key]
            .as_str()
            .unwrap_or_else(|| panic!("ConfigMap {map} has no {key}"));
        let file = dir.path().join(key);
        std::fs::write(&file, text).unwrap();
        let out = Command::new(bin)
            .args(["validate", "-config"])
            .arg(&file)
            .output()
            .unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && said.contains("is valid"),
            "{} validate {key}: {said}\n{text}",
            bin.display()
        );
    }
    // A broken file is refused, so the check above means something.
    let broken = dir.path().join("broken.conf");
    std::fs::write(&broken, "server {\n  bind_port = \"not a port\"\n}\n").unwrap();
    let out = Command::new(&bins.server)
        .args(["validate", "-config"])
        .arg(&broken)
        .output()
        .unwrap();
    assert!(!out.status.success());
}

/// Issue 16's E1-E9, read from the rendered objects.
#[test]
#[ignore = "needs the Go-built kustomize peer (tests/peers/peer-kustomize.sh; cargo test -- --include-ignored)"]
fn the_rendered_cluster_objects_fix_e1_to_e9() {
    let kustomize = kustomize_bin();
    let all = rendered(&kustomize);
    let spire = &all["deploy/spire"];
    let yaml = |doc: &Value, key: &str| -> Value {
        serde_yaml::from_str(doc["data"][key].as_str().unwrap()).unwrap()
    };

    // E1: the controller manager dials the socket the server shares with it.
    let cm = yaml(
        find(spire, "ConfigMap", "spire-controller-manager"),
        "config.yaml",
    );
    let socket = cm["spireServerSocketPath"]
        .as_str()
        .expect("spireServerSocketPath");
    let server_conf = find(spire, "ConfigMap", "spire-server")["data"]["server.conf"]
        .as_str()
        .unwrap();
    assert!(
        server_conf.contains(&format!("socket_path = \"{socket}\"")),
        "{server_conf}"
    );
    let sts = find(spire, "StatefulSet", "spire-server");
    let containers = sts["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .unwrap();
    let dir = Path::new(socket).parent().unwrap().to_str().unwrap();
    for c in containers {
        let mounts = c["volumeMounts"].as_sequence().unwrap();
        assert!(
            mounts
                .iter()
                .any(|m| m["mountPath"] == dir && m["name"] == "spire-server-socket"),
            "{:?} does not mount {dir}",
            c["name"]
        );
    }

    // E2: every CRD the controller manager reconciles is installed.
    for crd in [
        "clusterspiffeids.spire.spiffe.io",
        "clusterfederatedtrustdomains.spire.spiffe.io",
        "clusterstaticentries.spire.spiffe.io",
    ] {
        find(spire, "CustomResourceDefinition", crd);
    }

    // E3: the ClusterSPIFFEIDs are not in the same apply as the webhook
    // that refuses them until the controller manager runs.
    assert!(spire.iter().all(|d| kind(d) != "ClusterSPIFFEID"));
    let vwc = find(
        spire,
        "ValidatingWebhookConfiguration",
        "spire-controller-manager-webhook",
    );
    assert!(
        vwc["webhooks"]
            .as_sequence()
            .unwrap()
            .iter()
            .all(|w| w["failurePolicy"] == "Fail")
    );
    assert_eq!(
        cm["validatingWebhookConfigurationName"],
        "spire-controller-manager-webhook"
    );
    let registration = &all["deploy/spire/registration"];
    assert!(registration.iter().all(|d| kind(d) == "ClusterSPIFFEID"));

    // E4: the server's data volume is writable by its UID.
    let security = &sts["spec"]["template"]["spec"]["securityContext"];
    assert_eq!(security["runAsUser"], 1000);
    assert_eq!(security["fsGroup"], 1000);

    // E5: the health probe address is a key the controller manager reads,
    // and the container's probes use it.
    let health = cm["health"]["healthProbeBindAddress"].as_str().unwrap();
    assert!(cm.get("healthProbe").is_none());
    let port: u16 = health.rsplit(':').next().unwrap().parse().unwrap();
    let manager = containers
        .iter()
        .find(|c| c["name"] == "spire-controller-manager")
        .unwrap();
    assert!(
        manager["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|p| p["containerPort"] == port)
    );
    assert_eq!(manager["readinessProbe"]["httpGet"]["path"], "/readyz");

    // E6: the agent (host network) opens no health port on the node.
    let agent_conf = find(spire, "ConfigMap", "spire-agent")["data"]["agent.conf"]
        .as_str()
        .unwrap();
    assert!(
        !agent_conf
            .lines()
            .any(|l| l.trim_start().starts_with("health_checks")),
        "{agent_conf}"
    );
    let ds = find(spire, "DaemonSet", "spire-agent");
    let agent = &ds["spec"]["template"]["spec"]["containers"][0];
    for probe in ["livenessProbe", "readinessProbe"] {
        assert!(agent[probe]["httpGet"].is_null(), "{probe}");
        assert_eq!(agent[probe]["exec"]["command"][1], "healthcheck");
    }

    // E7: nothing is fetched (checked by rendering offline above), and no
    // kustomization names a remote resource.
    for dir in kustomizations() {
        let text = std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap();
        let k: Value = serde_yaml::from_str(&text).unwrap();
        for resource in k["resources"].as_sequence().unwrap() {
            let resource = resource.as_str().unwrap();
            assert!(
                !resource.contains("://") && dir.join(resource).exists(),
                "{}: resource {resource} is not a local file",
                dir.display()
            );
        }
    }

    // E8: scenario 3 has Gateway API variants.
    for variant in ["gateway", "gateway-mtls"] {
        let docs = &all[&format!("deploy/examples/scenario3/{variant}")];
        assert!(docs.iter().any(|d| kind(d) == "Gateway"));
        assert!(docs.iter().any(|d| kind(d) == "HTTPRoute"));
    }
    let mtls = &all["deploy/examples/scenario3/gateway-mtls"];
    assert_eq!(
        find(mtls, "BackendTLSPolicy", "app2")["spec"]["validation"]["subjectAltNames"][0]["uri"],
        "spiffe://example.org/ns/app2/sa/app2"
    );

    // E9: a pod with no annotation or label, in a meshed namespace, is
    // selected by a ClusterSPIFFEID (by its service account) and gets a
    // sidecar configuration with nothing to create (checked end to end in
    // `a_bare_pod_mounts_no_config_map` and, against SPIRE, tests/spire.rs's
    // `a_bare_pod_gets_its_service_account_identity_and_a_default_config`).
    let by_sa = find(
        registration,
        "ClusterSPIFFEID",
        "rampart-by-service-account",
    );
    assert_eq!(
        by_sa["spec"]["spiffeIDTemplate"],
        "spiffe://{{ .TrustDomain }}/ns/{{ .PodMeta.Namespace }}/sa/{{ .PodSpec.ServiceAccountName }}"
    );
    let exprs = by_sa["spec"]["podSelector"]["matchExpressions"]
        .as_sequence()
        .unwrap();
    assert_eq!(exprs.len(), 1);
    assert_eq!(
        exprs[0]["operator"], "NotIn",
        "a pod without the label must match"
    );
    let webhook = &all["deploy/webhook"];
    let args =
        find(webhook, "Deployment", "rampart-webhook")["spec"]["template"]["spec"]["containers"][0]
            ["args"]
            .as_sequence()
            .unwrap();
    assert!(
        !args
            .iter()
            .any(|a| a.as_str().is_some_and(|a| a.starts_with("--config-map"))),
        "the webhook names a ConfigMap that deploy/ never creates"
    );
}

/// E9: a bare pod (no Rampart annotation or label) injected with the
/// default flags mounts only what exists (its own annotation, no
/// ConfigMap). tests/spire.rs runs that configuration against SPIRE.
#[test]
fn a_bare_pod_mounts_no_config_map() {
    let bare = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: bare\n  namespace: shop\nspec:\n  serviceAccountName: cart\n  containers:\n    - name: app\n      image: nginx\n";
    let pod = &documents(&inject(bare))[0];
    let volumes = pod["spec"]["volumes"].as_sequence().unwrap();
    assert!(
        volumes.iter().all(|v| v["configMap"].is_null()),
        "a bare pod must not mount a ConfigMap: {volumes:?}"
    );
    let config = pod["metadata"]["annotations"]["rampart.io/sidecar-config"]
        .as_str()
        .expect("the default configuration");
    assert!(config.contains("workload_api"), "{config}");
}

/// The identity rules by which the example sidecars derive each endpoint's
/// expected SPIFFE ID (`discovery.kubernetes.identities`) are the
/// ClusterSPIFFEIDs by which SPIRE issues the SVIDs
/// (deploy/spire/registration): the same templates, character for
/// character, with the same pod selectors. Were they to drift, a sidecar
/// would expect an ID its peer never gets (every request refused) or,
/// worse, accept one it should not.
#[test]
fn discovery_identity_rules_are_the_registration_s_cluster_spiffe_ids() {
    let text = std::fs::read_to_string(root().join("deploy/spire/registration/registration.yaml"))
        .unwrap();
    // (template, selector) in the sidecar's spelling.
    let mut registered: Vec<(String, Value)> = documents(&text)
        .iter()
        .filter(|d| kind(d) == "ClusterSPIFFEID")
        .map(|d| {
            let spec = &d["spec"];
            let sel = &spec["podSelector"];
            let exprs: Vec<Value> = sel["matchExpressions"]
                .as_sequence()
                .into_iter()
                .flatten()
                .cloned()
                .collect();
            let mut ours = serde_yaml::Mapping::new();
            if let Some(labels) = sel.get("matchLabels") {
                ours.insert("match_labels".into(), labels.clone());
            }
            if !exprs.is_empty() {
                ours.insert("match_expressions".into(), Value::Sequence(exprs));
            }
            (
                spec["spiffeIDTemplate"].as_str().unwrap().to_owned(),
                Value::Mapping(ours),
            )
        })
        .collect();
    registered.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(registered.len(), 2, "{registered:?}");
    let mut checked = 0;
    let mut stack = vec![root().join("deploy/examples")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "yaml") {
                continue;
            }
            for doc in documents(&std::fs::read_to_string(&path).unwrap()) {
                let Some(config) = doc["data"]["config.yaml"].as_str() else {
                    continue;
                };
                let config: Value = serde_yaml::from_str(config).unwrap();
                let Some(rules) = config["discovery"]["kubernetes"]["identities"].as_sequence()
                else {
                    continue;
                };
                let mut ours: Vec<(String, Value)> = rules
                    .iter()
                    .map(|r| {
                        (
                            r["template"].as_str().unwrap().to_owned(),
                            r["pod_selector"].clone(),
                        )
                    })
                    .collect();
                ours.sort_by(|a, b| a.0.cmp(&b.0));
                assert_eq!(
                    ours,
                    registered,
                    "{}: {} identity rules differ from deploy/spire/registration",
                    path.display(),
                    name(&doc)
                );
                checked += 1;
            }
        }
    }
    assert!(
        checked >= 4,
        "only {checked} sidecar configurations use discovery"
    );
}
