//! Smoke test of the `mesh` profile: tiny rates for a fraction of a second,
//! every topology that can run here (nginx and HAProxy are skipped, with the
//! reason printed, when not installed, unless RAMPART_REQUIRE_E2E=1), and a
//! check that `results.json` is well formed and the plots are PNG files.
//! It asserts nothing about speed.

use std::path::PathBuf;
use std::process::Command;

/// The `rampart` binary the harness runs: next to `rampart-bench`, built
/// here if `cargo test -p rampart-bench` alone did not build it.
fn ensure_rampart(bench: &std::path::Path) {
    let rampart = bench.with_file_name("rampart");
    if rampart.exists() {
        return;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build.args(["build", "-p", "rampart"]);
    if bench.parent().and_then(|d| d.file_name()) == Some("release".as_ref()) {
        build.arg("--release");
    }
    assert!(
        build.status().expect("run cargo").success(),
        "cargo build -p rampart failed"
    );
}

#[test]
fn mesh_profile_writes_results_and_plots() {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_rampart-bench"));
    ensure_rampart(&bench);
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(&bench)
        .args([
            "mesh",
            "--rates",
            "50,100",
            "--conns",
            "2",
            "--duration",
            "0.3",
            "--reps",
            "2",
        ])
        .arg("--out")
        .arg(out.path())
        .output()
        .expect("run rampart-bench");
    let stderr = String::from_utf8_lossy(&run.stderr);
    for line in stderr.lines().filter(|l| l.starts_with("skipping")) {
        println!("{line}");
    }
    assert!(run.status.success(), "rampart-bench failed:\n{stderr}");

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("results.json")).unwrap()).unwrap();
    let topologies: Vec<&str> = json["topologies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(topologies[..2], ["direct", "rampart"]);
    let phases = json["phases"].as_array().unwrap();
    assert_eq!(phases.len(), 3, "two rates and saturation");
    for phase in phases {
        let results = phase["results"].as_array().unwrap();
        assert_eq!(results.len(), topologies.len());
        for r in results {
            for key in [
                "p50_us",
                "p99_us",
                "p999_us",
                "max_us",
                "added_p50_us",
                "throughput_rps",
                "cpu_s_per_10k_requests",
            ] {
                assert!(r[key].is_number(), "{key} in {r}");
            }
            assert!(
                r["p50_us"].as_f64().unwrap() <= r["max_us"].as_f64().unwrap(),
                "{r}"
            );
            assert_eq!(r["reps"].as_array().unwrap().len(), 2);
        }
    }
    let memory = json["memory"].as_array().unwrap();
    assert_eq!(memory.len(), topologies.len() - 1);
    assert!(
        memory
            .iter()
            .all(|m| m["peak_rss_kib"].as_u64().unwrap() > 0)
    );
    // Rampart must refuse a server with the wrong SPIFFE ID; whether nginx
    // and HAProxy do is recorded, not asserted (they cannot check it).
    let verification = json["verification"].as_array().unwrap();
    assert_eq!(verification.len(), topologies.len() - 1);
    assert_eq!(verification[0]["topology"], "rampart");
    assert_eq!(verification[0]["refused_before_request"], true, "{json}");

    let pngs: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    assert_eq!(
        pngs.len(),
        4,
        "three latency plots and the added-latency bars: {pngs:?}"
    );
    for png in pngs {
        let bytes = std::fs::read(&png).unwrap();
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "{}", png.display());
    }
    assert!(
        std::fs::read_to_string(out.path().join("results.md"))
            .unwrap()
            .contains("| rampart |")
    );
}
