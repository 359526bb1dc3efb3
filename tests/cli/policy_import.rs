//! `rampart policy import` through the real binary: the files it writes are
//! what `rampart policy check` loads, and the report names what was left
//! out and what to pass for it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("authz/tests/fixtures/import")
        .join(name)
}

fn rampart(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(args)
        .output()
        .expect("run rampart")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn imported_appmesh_files_are_checked_by_policy_check() {
    let dir = tempfile::tempdir().unwrap();
    let file = fixture("appmesh-mtls.yaml");
    let out = rampart(&[
        "policy",
        "import",
        "--from",
        "appmesh",
        file.to_str().unwrap(),
        "--address",
        "howto-k8s-mtls-sds-based/green=10.100.0.0/16",
        "--out-dir",
        dir.path().to_str().unwrap(),
    ]);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("checked in the handshake"), "{err}");
    assert!(
        err.contains("--allow-dns-san front.howto-k8s-mtls-sds-based.svc.cluster.local"),
        "{err}"
    );
    let policy = dir.path().join("howto-k8s-mtls-sds-based.blue.policy.yaml");
    let check = rampart(&["policy", "check", policy.to_str().unwrap()]);
    assert!(check.status.success(), "{}", text(&check.stderr));
    assert!(text(&check.stdout).contains("1 policies OK"));
    let config = std::fs::read_to_string(
        dir.path()
            .join("howto-k8s-mtls-sds-based.front.config.yaml"),
    )
    .unwrap();
    assert!(
        config.contains("spiffe://howto-k8s-mtls-sds-based.aws/colorgreen"),
        "{config}"
    );
}

#[test]
fn osm_import_prints_policies_and_says_what_a_service_source_needs() {
    let file = fixture("osm-ingress.yaml");
    let out = rampart(&["policy", "import", "--from", "osm", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("# ---- for the sidecar of Service httpbin/httpbin"),
        "{stdout}"
    );
    assert!(stdout.contains("source_cidrs"), "{stdout}");
    let err = text(&out.stderr);
    assert!(
        err.contains("--address ingress-nginx/ingress-nginx-controller=CIDR"),
        "{err}"
    );
    assert!(err.contains("admit less than the source"), "{err}");
    let bad = rampart(&[
        "policy",
        "import",
        "--from",
        "osm",
        file.to_str().unwrap(),
        "--address",
        "nonsense",
    ]);
    assert!(!bad.status.success());
    assert!(text(&bad.stderr).contains("NAMESPACE/NAME=CIDR"));
}
