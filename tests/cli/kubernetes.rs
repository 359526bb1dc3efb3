//! The Kubernetes manifests, checked offline: every manifest in deploy/,
//! and `rampart inject`'s output for every example and golden input,
//! validates against the Kubernetes schemas with `kubernetes-validate`
//! (PyPI, in tests/requirements.txt), strictly (unknown fields are errors).
//! Every policy the examples ship in a ConfigMap compiles with the real
//! policy loader.
//!
//! Kinds without a schema offline are skipped here, and only these: the
//! SPIRE custom resources (`ClusterSPIFFEID`, ..., validated against their
//! vendored CRDs by tests/deploy.rs), the Gateway API kinds of scenario 3's
//! Gateway variants, `PodMonitor` (a CRD of the Prometheus Operator) and
//! `List` (a client-side wrapper; its items are validated one by one).
//! The test is `#[ignore]`d for `kubernetes-validate` (PyPI), and fails
//! without it when run (`cargo test -- --include-ignored`, as CI does).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Deserialize as _;
use serde_yaml::Value;

/// Kinds that `kubernetes-validate` has no schema for; see the module doc.
const NO_SCHEMA: &[&str] = &[
    "ClusterSPIFFEID",
    "ClusterFederatedTrustDomain",
    "ClusterStaticEntry",
    "Gateway",
    "HTTPRoute",
    "BackendTLSPolicy",
    "PodMonitor",
];

#[test]
#[ignore = "needs kubernetes-validate (pip install -r tests/requirements.txt)"]
fn manifests_and_inject_outputs_validate_against_the_kubernetes_schemas() {
    assert!(
        Command::new("kubernetes-validate")
            .arg("--version")
            .output()
            .is_ok(),
        "kubernetes-validate is not installed (pip install -r tests/requirements.txt)"
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = tempfile::tempdir().unwrap();
    let mut written = vec![];
    let mut write = |origin: String, text: String| {
        let file = out.path().join(format!("{:04}.yaml", written.len()));
        std::fs::write(&file, text).unwrap();
        written.push((file, origin));
    };

    let mut manifests = yaml_files(&root.join("deploy"));
    manifests.retain(|f| f.file_name().is_some_and(|n| n != "kustomization.yaml"));
    assert!(
        manifests.len() >= 10,
        "deploy/ has too few manifests: {manifests:?}"
    );
    let mut goldens = yaml_files(&root.join("tests/golden/inject"));
    goldens.retain(|f| !f.to_string_lossy().ends_with(".injected.yaml"));

    for file in manifests.iter().chain(&goldens) {
        let text = std::fs::read_to_string(file).unwrap();
        let injected = inject(file);
        let name = file.strip_prefix(root).unwrap().display().to_string();
        let is_manifest = file.starts_with(root.join("deploy"));
        let sources = [(format!("{name} (injected)"), injected)];
        let sources = if is_manifest {
            vec![(name.clone(), text), sources[0].clone()]
        } else {
            sources.to_vec()
        };
        for (origin, text) in sources {
            let docs = documents(&text);
            let as_written = docs.iter().all(|d| {
                let kind = d.get("kind").and_then(Value::as_str).unwrap_or("");
                kind != "List" && !NO_SCHEMA.contains(&kind)
            });
            if as_written {
                // The text itself, so that the way it is written (quoting)
                // is checked too, by a YAML 1.1 reader as kubectl's is.
                write(origin, text);
                continue;
            }
            for item in docs.into_iter().flat_map(flatten) {
                let kind = item.get("kind").and_then(Value::as_str).unwrap_or("");
                if !NO_SCHEMA.contains(&kind) {
                    write(
                        format!("{origin} ({kind})"),
                        serde_json::to_string(&item).unwrap(),
                    );
                }
            }
        }
    }

    let files: Vec<&PathBuf> = written.iter().map(|(f, _)| f).collect();
    let result = Command::new("kubernetes-validate")
        .args(["--strict", "--quiet"])
        .args(&files)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let mut report = String::from_utf8_lossy(&result.stdout).into_owned();
    report += &String::from_utf8_lossy(&result.stderr);
    for (file, origin) in &written {
        report = report.replace(&file.display().to_string(), origin);
    }
    assert!(
        result.status.success()
            && !report.contains("ERROR")
            && !report.contains("Couldn't find schema"),
        "{} documents checked:\n{report}",
        written.len()
    );
}

#[test]
fn example_policies_compile() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut checked = 0;
    for file in yaml_files(&root.join("deploy/examples")) {
        for doc in documents(&std::fs::read_to_string(&file).unwrap()) {
            let policy = doc
                .get("data")
                .and_then(|d| d.get("policy.yaml"))
                .and_then(Value::as_str);
            if let Some(policy) = policy {
                let origin = file.display().to_string();
                let options = rampart_authz::Options::default();
                if let Err(e) =
                    rampart_authz::Authorizer::from_yaml(&origin, policy, root, &options)
                {
                    panic!("{origin}: {e}");
                }
                checked += 1;
            }
        }
    }
    assert!(
        checked >= 6,
        "only {checked} policies found in deploy/examples"
    );
}

fn inject(file: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .arg("inject")
        .arg(file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "inject {}: {}",
        file.display(),
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

/// A `List`'s items, or the object itself.
fn flatten(doc: Value) -> Vec<Value> {
    match doc.get("kind").and_then(Value::as_str) {
        Some("List") => doc
            .get("items")
            .and_then(Value::as_sequence)
            .cloned()
            .unwrap_or_default(),
        _ => vec![doc],
    }
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = vec![];
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(yaml_files(&path));
        } else if path.extension().is_some_and(|e| e == "yaml") {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// Every sidecar configuration shipped in deploy/examples passes the real
/// configuration loader (`rampart run` exits 64 on any problem before
/// opening a socket), with its policy ConfigMap in place of the mounted file.
#[test]
fn example_sidecar_configs_load() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for file in yaml_files(&root.join("deploy/examples")) {
        let docs = documents(&std::fs::read_to_string(&file).unwrap());
        let policy = docs.iter().find_map(|d| {
            d.get("data")
                .and_then(|d| d.get("policy.yaml"))
                .and_then(Value::as_str)
        });
        for doc in &docs {
            let Some(config) = doc
                .get("data")
                .and_then(|d| d.get("config.yaml"))
                .and_then(Value::as_str)
            else {
                continue;
            };
            let policy_path = tmp.path().join(format!("policy-{checked}.yaml"));
            std::fs::write(&policy_path, policy.unwrap_or("policies: []\n")).unwrap();
            // Point the mounted paths at the extracted files; keep the rest as shipped,
            // but move the listeners off privileged and shared ports.
            let config = config
                .replace(
                    "/etc/rampart/policy/policy.yaml",
                    policy_path.to_str().unwrap(),
                )
                .replace("0.0.0.0:15000", "127.0.0.1:0");
            let path = tmp.path().join(format!("config-{checked}.yaml"));
            std::fs::write(&path, &config).unwrap();
            let mut child = Command::new(env!("CARGO_BIN_EXE_rampart"))
                .args(["run", "--config", path.to_str().unwrap()])
                .env_remove("SPIFFE_ENDPOINT_SOCKET")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            // A valid configuration keeps running (waiting for its Workload API);
            // an invalid one exits 64 at once.
            std::thread::sleep(std::time::Duration::from_millis(700));
            match child.try_wait().unwrap() {
                None => {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                Some(status) => {
                    let out = child.wait_with_output().unwrap();
                    assert_ne!(
                        status.code(),
                        Some(64),
                        "{}: {}",
                        file.display(),
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            }
            checked += 1;
        }
    }
    assert!(
        checked >= 4,
        "only {checked} sidecar configs in deploy/examples"
    );
}
