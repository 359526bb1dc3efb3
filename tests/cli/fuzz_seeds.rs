//! The fuzz targets' bodies (`fuzz/src/bodies.rs`) on the stable toolchain:
//! every committed seed in `fuzz/seeds/<target>/`, then proptest inputs
//! shaped like each target's input. libFuzzer runs them for real
//! (`fuzz/README.md`); this keeps them compiling and their invariants true.

#[path = "../../fuzz/src/bodies.rs"]
#[allow(dead_code)]
mod bodies;

use std::path::Path;

use proptest::prelude::*;

#[test]
fn every_seed_passes_its_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    for (name, body) in bodies::TARGETS {
        let dir = root.join(name);
        let mut seeds = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            // A panic names the seed: run it again with `cargo fuzz run <target> <seed>`.
            eprintln!("{name}: {}", path.display());
            body(&data);
            seeds += 1;
        }
        assert!(seeds > 0, "{name} has no seeds in {}", dir.display());
    }
}

/// Bytes that look like the input of a text parser: mostly from `alphabet`.
fn texty(alphabet: &'static str, max: usize) -> impl Strategy<Value = Vec<u8>> {
    let chars: Vec<u8> = alphabet.bytes().collect();
    proptest::collection::vec(
        prop_oneof![
            8 => proptest::sample::select(chars),
            1 => any::<u8>(),
        ],
        0..max,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn spiffe_id(data in texty("spiffe:/example.org-_.AZaz09%", 64)) {
        bodies::spiffe_id(&data);
    }

    #[test]
    fn xfcc(data in texty("By=URI;DNS,\"\\spiffe:/a.b\n", 64)) {
        bodies::xfcc(&data);
    }

    #[test]
    fn normalize_path(data in texty("/./..%2e2f5cAa;?#\\=&", 48)) {
        bodies::normalize(&data);
    }

    #[test]
    fn detect(data in prop_oneof![
        texty("GET POST /HTTP1.0\r\n", 48),
        Just(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec()),
        proptest::collection::vec(any::<u8>(), 0..32),
    ]) {
        bodies::detect(&data);
    }

    #[test]
    fn smuggling(data in texty(
        "POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n0123456789abcdef;\r\n",
        600,
    )) {
        bodies::smuggling(&data);
    }

    #[test]
    fn policy_file(data in texty("policies:\n - name: p\n action: ALLOW DENY\n rules: [{to: {paths: [/a]}}]\n kind: rego\n", 200)) {
        bodies::policy_file(&data);
    }

    #[test]
    fn http_detect(
        method in "[A-Za-z]{1,8}",
        target in "/[!-~]{0,20}",
        version in "[0-9]\\.[0-9]",
        lead in 0usize..3,
        rest in texty("Host: a\r\nx-forwarded-client-cert: By=\r\n\t ", 64),
    ) {
        let mut data = "\r\n".repeat(lead).into_bytes();
        data.extend_from_slice(format!("{method} {target} HTTP/{version}\r\n").as_bytes());
        data.extend_from_slice(&rest);
        bodies::http_detect(&data);
    }

    #[test]
    fn admin_inputs(data in prop_oneof![
        texty("/liveradymtcsg.?%2e", 24),
        texty("{\"/app-health/a/livez\": {\"httpGet\": {\"port\": 1, \"path\": \"/\"}}}", 80),
    ]) {
        bodies::admin_inputs(&data);
    }
}
