//! Smoke test of the `mesh` profile: every workload at tiny rates for a
//! fraction of a second, every topology that can run here (nginx and
//! HAProxy are skipped, with the reason printed, when not installed, and the
//! transparent mode when not root, unless RAMPART_REQUIRE_E2E=1), and a
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
    // Every workload, tiny rates, 0.05 s per run, two interleaved repetitions.
    let flags = [
        ("--rates", "200"),
        ("--conns", "2"),
        ("--h2-rates", "200"),
        ("--h2-conns", "2"),
        ("--newconn-rate", "100"),
        ("--many-conns", "50"),
        ("--many-rate", "200"),
        ("--duration", "0.05"),
        ("--reps", "2"),
    ];
    let run = Command::new(&bench)
        .arg("mesh")
        .args(flags.iter().flat_map(|(f, v)| [f, v]))
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
    let kinds: Vec<&str> = ["rampart", "nginx", "haproxy"]
        .into_iter()
        .filter(|k| {
            !json["skipped"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["topology"] == *k)
        })
        .collect();
    assert_eq!(kinds[0], "rampart");
    let transparent = !json["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["topology"] == "transparent");
    let phases = json["phases"].as_array().unwrap();
    let names = |p: &serde_json::Value| -> Vec<String> {
        p["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["topology"].as_str().unwrap().to_string())
            .collect()
    };
    let plain: Vec<String> = ["direct"]
        .into_iter()
        .chain(kinds.clone())
        .map(String::from)
        .collect();
    // Keep-alive HTTP/1.1 also runs the pair with the port declared opaque
    // (the L4 reference), closed loop at 1, 16 and 64 connections.
    let with_opaque: Vec<String> = ["direct", "rampart", "rampart-opaque"]
        .into_iter()
        .map(String::from)
        .chain(kinds[1..].iter().map(|k| k.to_string()))
        .collect();
    let mut expected = vec![
        ("http1", "200rps", with_opaque.clone()),
        ("http1", "saturation-c1", with_opaque.clone()),
        ("http1", "saturation-c16", with_opaque.clone()),
        ("http1", "saturation-c64", with_opaque.clone()),
        (
            "newconn",
            "newconn-100rps",
            ["direct".to_string()]
                .into_iter()
                .chain(
                    kinds
                        .iter()
                        .flat_map(|k| [k.to_string(), format!("{k}-nopool")]),
                )
                .collect(),
        ),
        ("concurrency", "conns50-200rps", plain.clone()),
        ("h2", "h2-200rps", plain.clone()),
        ("h2", "h2-saturation", plain.clone()),
        ("grpc", "grpc-200rps", plain.clone()),
        ("grpc", "grpc-saturation", plain.clone()),
    ];
    if transparent {
        let t = vec![
            "direct-netns".to_string(),
            "rampart-transparent".to_string(),
        ];
        expected.push(("transparent", "transparent-200rps", t.clone()));
        expected.push(("transparent", "transparent-saturation", t));
    }
    let got: Vec<(&str, &str, Vec<String>)> = phases
        .iter()
        .map(|p| {
            (
                p["workload"].as_str().unwrap(),
                p["slug"].as_str().unwrap(),
                names(p),
            )
        })
        .collect();
    assert_eq!(got, expected);
    for phase in phases {
        for r in phase["results"].as_array().unwrap() {
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
            assert_eq!(r["failures"], 0, "{r}");
            let reps = r["reps"].as_array().unwrap();
            assert_eq!(reps.len(), 2);
            assert!(
                reps.iter().all(|rep| rep["requests"].as_u64().unwrap() > 0),
                "{r}"
            );
            // Both sides of every pair were sampled while the load ran.
            let rss = r["max_rss_kib_by_side"].as_array().unwrap();
            if r["topology"].as_str().unwrap().starts_with("direct") {
                assert!(rss.is_empty(), "{r}");
            } else {
                assert_eq!(rss.len(), 2, "{r}");
                assert!(rss.iter().all(|k| k.as_u64().unwrap() > 0), "{r}");
            }
        }
    }
    // Memory is sampled for every proxy pair, the opaque reference included.
    let memory = json["memory"].as_array().unwrap();
    assert_eq!(memory.len(), kinds.len() + 1, "{memory:?}");
    assert!(
        memory
            .iter()
            .all(|m| m["peak_rss_kib"].as_u64().unwrap() > 0)
    );
    // Rampart must refuse a server with the wrong SPIFFE ID; whether nginx
    // and HAProxy do is recorded, not asserted (they cannot check it).
    let verification = json["verification"].as_array().unwrap();
    assert_eq!(verification.len(), kinds.len());
    assert_eq!(verification[0]["topology"], "rampart");
    assert_eq!(verification[0]["refused_before_request"], true, "{json}");

    let mut pngs: Vec<String> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|p| p.ends_with(".png"))
        .collect();
    pngs.sort();
    let mut want: Vec<String> = expected
        .iter()
        .map(|(_, slug, _)| format!("latency-{slug}.png"))
        .chain(
            ["", "-newconn", "-concurrency", "-h2", "-grpc"]
                .iter()
                .chain(transparent.then_some(&"-transparent"))
                .map(|w| format!("added-latency{w}.png")),
        )
        .collect();
    want.sort();
    assert_eq!(
        pngs, want,
        "a latency plot per phase and an added-latency plot per workload"
    );
    for png in pngs {
        let bytes = std::fs::read(out.path().join(&png)).unwrap();
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "{png}");
    }
    let md = std::fs::read_to_string(out.path().join("results.md")).unwrap();
    assert!(md.contains("| rampart |"));
    assert!(md.contains("RSS while the 50 connections were open"));
}
