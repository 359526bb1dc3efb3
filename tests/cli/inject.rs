//! `rampart inject` and `rampart webhook` through the real binary: golden
//! files for every workload kind, idempotency, the `--uninject` round trip,
//! and a real AdmissionReview whose patch, applied, equals `inject`'s output.
//!
//! Golden files live in tests/golden/inject/: `<case>.yaml` is the input,
//! `<case>.injected.yaml` the expected output. After an intended change,
//! regenerate them with `RAMPART_UPDATE_GOLDEN=1 cargo test --test cli`
//! and review the diff.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value as Json, json};

/// The image every golden file names, so that a version bump changes none.
const IMAGE: &str = "--image=localhost/rampart:golden";

/// Every case: the input file's stem and the extra flags it is injected with.
const CASES: &[(&str, &[&str])] = &[
    ("pod", &[]),
    ("deployment", &[]),
    ("statefulset", &[]),
    ("daemonset", &["--spire-socket=host-path"]),
    ("replicaset", &["--config-map=cache-sidecar"]),
    ("job", &[]),
    ("cronjob", &[]),
    ("list", &[]),
    ("probes", &[]),
];

#[test]
fn golden_inject_of_every_workload_kind() {
    let update = std::env::var("RAMPART_UPDATE_GOLDEN").as_deref() == Ok("1");
    let mut mismatched = vec![];
    for (case, flags) in CASES {
        let input = golden(&format!("{case}.yaml"));
        let output = inject_file(&input, flags);
        let expected_path = golden(&format!("{case}.injected.yaml"));
        if update {
            std::fs::write(&expected_path, &output).unwrap();
            continue;
        }
        let expected = std::fs::read_to_string(&expected_path).unwrap_or_default();
        if output != expected {
            mismatched.push(format!("--- {case}: got\n{output}"));
        }
    }
    assert!(
        mismatched.is_empty(),
        "output differs from tests/golden/inject/*.injected.yaml \
         (RAMPART_UPDATE_GOLDEN=1 regenerates them):\n{}",
        mismatched.join("\n")
    );
}

#[test]
fn injecting_twice_changes_nothing() {
    for (case, flags) in CASES {
        let once = inject_file(&golden(&format!("{case}.yaml")), flags);
        let twice = rampart(&[&["inject", IMAGE], *flags].concat(), &once);
        assert_eq!(twice, once, "{case}: a second injection changed the output");
    }
}

#[test]
fn uninject_restores_the_input() {
    for (case, flags) in CASES {
        let input = std::fs::read_to_string(golden(&format!("{case}.yaml"))).unwrap();
        let injected = inject_file(&golden(&format!("{case}.yaml")), flags);
        assert_ne!(injected, input, "{case}: nothing was injected");
        let restored = rampart(&["inject", "--uninject"], &injected);
        // Comments and formatting are lost, so compare with the input as
        // re-serialized by the same YAML library.
        let reserialized = rampart(&["inject", "--uninject"], &input);
        assert_eq!(
            restored, reserialized,
            "{case}: --uninject did not restore the input"
        );
        for added in [
            "rampart-init",
            "rampart-proxy",
            "rampart-config",
            "rampart.io/status",
        ] {
            assert!(
                !restored.contains(added),
                "{case}: {added} left over:\n{restored}"
            );
        }
    }
}

#[test]
fn stdin_and_several_files_are_read() {
    let input = std::fs::read_to_string(golden("job.yaml")).unwrap();
    let from_stdin = rampart(&["inject", IMAGE, "-"], &input);
    assert_eq!(from_stdin, inject_file(&golden("job.yaml"), &[]));
    let (job, pod) = (golden("job.yaml"), golden("replicaset.yaml"));
    let both = rampart(
        &[
            "inject",
            IMAGE,
            job.to_str().unwrap(),
            pod.to_str().unwrap(),
        ],
        "",
    );
    assert_eq!(both.matches("name: rampart-proxy").count(), 2, "{both}");
}

#[test]
fn a_bad_annotation_fails_with_the_file_object_and_annotation() {
    let input = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  annotations:\n    rampart.io/exclude-outbound-ports: smtp\nspec:\n  containers: [{name: a, image: b}]\n";
    let out = run_rampart(&["inject", "-"], input);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "-: Pod/p: annotation rampart.io/exclude-outbound-ports: 'smtp' is not a TCP port"
        ),
        "{stderr}"
    );
}

/// The API server's view: an AdmissionReview (admission.k8s.io/v1) for a
/// pod goes to the webhook over TLS; the answer's JSON patch, applied to
/// the pod, gives exactly what `rampart inject` makes of the same pod.
#[test]
#[ignore = "needs openssl and curl"]
fn webhook_patch_equals_inject_output() {
    let (Some(openssl), Some(curl)) = (which("openssl"), which("curl")) else {
        panic!("openssl and curl are needed for the webhook test");
    };
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let made = Command::new(openssl)
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
        ])
        .args(["-subj", "/CN=rampart-webhook.rampart-system.svc"])
        .args([
            "-addext",
            "subjectAltName=DNS:rampart-webhook.rampart-system.svc,IP:127.0.0.1",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");

    let port = free_port();
    let mut server = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(["webhook", IMAGE, "--listen", &format!("127.0.0.1:{port}")])
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _guard = KillOnDrop(&mut server);

    let pod_yaml = std::fs::read_to_string(golden("pod.yaml")).unwrap();
    let pod: Json = serde_yaml::from_str(&pod_yaml).unwrap();
    // The shape of the Kubernetes API reference ("Dynamic Admission Control").
    let review = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "name": "ec-web",
            "namespace": "ec",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller", "groups": ["system:serviceaccounts"]},
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
        }
    });
    let review_file = dir.path().join("review.json");
    std::fs::write(&review_file, serde_json::to_vec(&review).unwrap()).unwrap();
    let url = format!("https://127.0.0.1:{port}/inject");
    let deadline = Instant::now() + Duration::from_secs(20);
    let answer = loop {
        let out = Command::new(&curl)
            .args(["-sS", "--fail", "--cacert"])
            .arg(&cert)
            .args(["-H", "Content-Type: application/json", "--data-binary"])
            .arg(format!("@{}", review_file.display()))
            .arg(&url)
            .output()
            .unwrap();
        if out.status.success() {
            break serde_json::from_slice::<Json>(&out.stdout).unwrap();
        }
        assert!(Instant::now() < deadline, "webhook never answered: {out:?}");
        std::thread::sleep(Duration::from_millis(100));
    };

    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    let response = &answer["response"];
    assert_eq!(response["uid"], review["request"]["uid"]);
    assert_eq!(response["allowed"], true);
    assert_eq!(response["patchType"], "JSONPatch");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().unwrap())
        .unwrap();
    let patch: Vec<Json> = serde_json::from_slice(&patch).unwrap();
    let mut patched = pod.clone();
    apply_patch(&mut patched, &patch);

    let injected: Json = serde_yaml::from_str(&inject_file(&golden("pod.yaml"), &[])).unwrap();
    assert_eq!(patched, injected);
}

/// RFC 6902 `add`, `remove` and `replace`, enough for the webhook's patches;
/// written here so that the test does not share code with the server.
fn apply_patch(doc: &mut Json, patch: &[Json]) {
    for op in patch {
        let path = op["path"].as_str().unwrap();
        let tokens: Vec<String> = path
            .split('/')
            .skip(1)
            .map(|t| t.replace("~1", "/").replace("~0", "~"))
            .collect();
        let (last, parents) = tokens
            .split_last()
            .expect("the webhook never patches the root");
        let mut target = &mut *doc;
        for token in parents {
            target = match target {
                Json::Object(map) => map.get_mut(token).unwrap(),
                Json::Array(items) => &mut items[token.parse::<usize>().unwrap()],
                other => panic!("{path}: {other} has no children"),
            };
        }
        match (op["op"].as_str().unwrap(), target) {
            ("add" | "replace", Json::Object(map)) => {
                map.insert(last.clone(), op["value"].clone());
            }
            ("remove", Json::Object(map)) => {
                map.remove(last).unwrap();
            }
            ("add", Json::Array(items)) if last == "-" => items.push(op["value"].clone()),
            ("add", Json::Array(items)) => items.insert(last.parse().unwrap(), op["value"].clone()),
            ("replace", Json::Array(items)) => {
                items[last.parse::<usize>().unwrap()] = op["value"].clone()
            }
            ("remove", Json::Array(items)) => {
                items.remove(last.parse::<usize>().unwrap());
            }
            (other, _) => panic!("unexpected operation {other} at {path}"),
        }
    }
}

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/inject")
        .join(name)
}

fn inject_file(file: &Path, flags: &[&str]) -> String {
    rampart(
        &[&["inject", IMAGE], flags, &[file.to_str().unwrap()]].concat(),
        "",
    )
}

/// Runs the binary with `stdin`; asserts success; returns stdout.
fn rampart(args: &[&str], stdin: &str) -> String {
    let out = run_rampart(args, stdin);
    assert!(
        out.status.success(),
        "rampart {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn run_rampart(args: &[&str], stdin: &str) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(tool))
        .find(|p| p.is_file())
}

struct KillOnDrop<'a>(&'a mut std::process::Child);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
