//! Policy bundles: unpacking, signatures and compilation, each refusal
//! leaving nothing half-loaded.

use crate::support;

use std::collections::BTreeMap;

use rampart_authz::central::bundle::{self, BundleError, BundleOptions, Limits};
use rampart_authz::central::signature::{
    SIGNATURES_FILE, SignatureError, SigningKey, Verification, VerificationKey,
};
use support::get;

const REGO: &str = r#"package envoy.authz
default allow := false
allow if {
    input.attributes.request.http.method == "GET"
    input.parsed_path[0] in data.open.paths
}
"#;

fn files(list: &[(&str, &str)]) -> BTreeMap<String, Vec<u8>> {
    list.iter()
        .map(|(n, b)| ((*n).to_owned(), b.as_bytes().to_vec()))
        .collect()
}

fn opa_bundle() -> BTreeMap<String, Vec<u8>> {
    files(&[
        ("authz/policy.rego", REGO),
        ("open/data.json", r#"{"paths": ["data"]}"#),
        (".manifest", r#"{"revision": "r1", "roots": [""]}"#),
    ])
}

fn es256() -> SigningKey {
    let rng = ring::rand::SystemRandom::new();
    let der = ring::signature::EcdsaKeyPair::generate_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        &rng,
    )
    .unwrap();
    SigningKey::es256_pkcs8(der.as_ref()).unwrap()
}

fn verifying(key: &SigningKey, id: &str) -> BundleOptions {
    let pem = key.public_pem().unwrap();
    let vk = VerificationKey::from_public_pem(
        id,
        rampart_authz::central::signature::SigningAlgorithm::Es256,
        &pem,
    )
    .unwrap();
    BundleOptions {
        verification: Some(Verification {
            keys: vec![vk],
            scope: None,
        }),
        ..BundleOptions::default()
    }
}

fn signed(
    mut f: BTreeMap<String, Vec<u8>>,
    key: &SigningKey,
    id: &str,
) -> BTreeMap<String, Vec<u8>> {
    let sig = rampart_authz::central::signature::sign(&f, key, id, None).unwrap();
    f.insert(SIGNATURES_FILE.into(), sig);
    f
}

#[test]
fn an_opa_bundle_is_one_rego_policy_over_its_modules_and_data() {
    let b = bundle::load(&bundle::pack(&opa_bundle()), &BundleOptions::default()).unwrap();
    assert_eq!(b.revision, "r1");
    assert!(!b.verified);
    assert_eq!(b.authorizer.policies()[0].name, "bundle");
    assert!(get("/data/x").allowed(&b.authorizer));
    assert!(!get("/admin").allowed(&b.authorizer));
    assert!(!get("/data/x").method("POST").allowed(&b.authorizer));
}

#[test]
fn a_bundle_may_carry_rampart_policy_files() {
    let f = files(&[
        (
            "web/mesh.policy.yaml",
            "policies:\n  - name: web\n    action: ALLOW\n    rules:\n      - to: { paths: [\"/ok\"] }\n  - name: opa\n    kind: rego\n    modules: [rules/x.rego]\n    data_files: [../open/data.json]\n    query: data.envoy.authz.allow\n",
        ),
        ("web/rules/x.rego", REGO),
        ("open/data.json", r#"{"open": {"paths": ["ok"]}}"#),
    ]);
    let b = bundle::compile(f, &BundleOptions::default()).unwrap();
    let names: Vec<_> = b
        .authorizer
        .policies()
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(names, ["web", "opa"]);
    let d = get("/ok")
        .from("spiffe://example.org/a")
        .check(&b.authorizer)
        .unwrap();
    assert!(d.is_allowed(), "{}", d.explain());
    assert!(
        !get("/nope")
            .from("spiffe://example.org/a")
            .allowed(&b.authorizer)
    );
}

#[test]
fn signed_bundles_verify_and_tampering_is_refused() {
    let key = es256();
    let opts = verifying(&key, "central");
    let good = signed(opa_bundle(), &key, "central");
    let b = bundle::load(&bundle::pack(&good), &opts).unwrap();
    assert!(b.verified);

    let allow_all = "package envoy.authz\nallow := true\n";
    type Files = BTreeMap<String, Vec<u8>>;
    type Check = fn(&SignatureError) -> bool;
    let cases: Vec<(&str, Files, Check)> = vec![
        ("unsigned", opa_bundle(), |e| {
            matches!(e, SignatureError::Unsigned)
        }),
        (
            "module replaced",
            {
                let mut f = good.clone();
                f.insert("authz/policy.rego".into(), allow_all.into());
                f
            },
            |e| matches!(e, SignatureError::DigestMismatch(n) if n == "authz/policy.rego"),
        ),
        (
            "module added",
            {
                let mut f = good.clone();
                f.insert("authz/z.rego".into(), allow_all.into());
                f
            },
            |e| matches!(e, SignatureError::UnsignedFile(n) if n == "authz/z.rego"),
        ),
        (
            "file removed",
            {
                let mut f = good.clone();
                f.remove("open/data.json");
                f
            },
            |e| matches!(e, SignatureError::MissingFile(n) if n == "open/data.json"),
        ),
        (
            "signed by another key",
            signed(opa_bundle(), &es256(), "central"),
            |e| matches!(e, SignatureError::BadSignature),
        ),
        (
            "unknown key id",
            signed(opa_bundle(), &key, "other"),
            |e| matches!(e, SignatureError::UnknownKey(Some(k)) if k == "other"),
        ),
        (
            "HS256 with the public key as secret",
            signed(
                opa_bundle(),
                &SigningKey::Hs256(key.public_pem().unwrap().into_bytes()),
                "central",
            ),
            |e| matches!(e, SignatureError::AlgorithmMismatch { .. }),
        ),
    ];
    for (name, f, want) in cases {
        match bundle::load(&bundle::pack(&f), &opts) {
            Err(BundleError::Signature(e)) => assert!(want(&e), "{name}: {e}"),
            Err(e) => panic!("{name}: wrong error {e}"),
            Ok(_) => panic!("{name}: accepted"),
        }
    }
}

#[test]
fn json_files_are_hashed_canonically() {
    // Re-encoding data.json (spacing, key order) keeps its signature valid.
    let key = SigningKey::Hs256(b"s3cret".to_vec());
    let mut f = signed(opa_bundle(), &key, "k");
    f.insert(
        "open/data.json".into(),
        b"{ \"paths\" : [ \"data\" ] }\n".to_vec(),
    );
    f.insert(
        ".manifest".into(),
        br#"{"roots":[""],"revision":"r1"}"#.to_vec(),
    );
    let opts = BundleOptions {
        verification: Some(Verification {
            keys: vec![VerificationKey::hmac_secret("k", b"s3cret").unwrap()],
            scope: None,
        }),
        ..BundleOptions::default()
    };
    bundle::compile(f, &opts).unwrap();
}

#[test]
fn broken_bundles_are_refused_whole() {
    let mut syntax = opa_bundle();
    syntax.insert(
        "authz/bad.rego".into(),
        b"package envoy.authz\nallow if {".to_vec(),
    );
    let mut bad_data = opa_bundle();
    bad_data.insert("open/data.json".into(), b"{".to_vec());
    let mut traversal = BTreeMap::new();
    traversal.insert("../x.rego".to_owned(), REGO.as_bytes().to_vec());
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("rego syntax error", bundle::pack(&syntax), "compile_error"),
        ("bad data", bundle::pack(&bad_data), "invalid"),
        ("not gzip", b"<html>oops</html>".to_vec(), "corrupt"),
        (
            "truncated",
            bundle::pack(&opa_bundle())[..40].to_vec(),
            "corrupt",
        ),
        (
            "empty",
            bundle::pack(&files(&[("open/data.json", "{}")])),
            "invalid",
        ),
    ];
    for (name, bytes, label) in cases {
        match bundle::load(&bytes, &BundleOptions::default()) {
            Err(e) => assert_eq!(e.as_str(), label, "{name}: {e}"),
            Ok(_) => panic!("{name}: accepted"),
        }
    }
    let small = Limits {
        max_unpacked_bytes: 10,
        max_files: 10,
    };
    match bundle::unpack(&bundle::pack(&opa_bundle()), &small) {
        Err(BundleError::TooLarge(_)) => {}
        other => panic!("over the limit: {other:?}"),
    }
}

/// RS256 with a key made by `openssl` (ring cannot generate RSA keys), the
/// JWT assembled by hand as `opa sign` would.
#[test]
#[ignore = "needs openssl"]
fn rs256_signatures_made_with_openssl_verify() {
    use base64::Engine as _;
    use std::process::Command;
    let dir = tempfile_dir();
    let key = dir.join("k.pem");
    let ok = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&key)
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(ok, "openssl is required to make the RSA key");
    let pubkey = Command::new("openssl")
        .arg("pkey")
        .arg("-in")
        .arg(&key)
        .arg("-pubout")
        .output()
        .unwrap();
    let pem = String::from_utf8(pubkey.stdout).unwrap();

    let f = opa_bundle();
    let listed: Vec<_> = f
        .iter()
        .map(|(n, b)| {
            let hash = rampart_authz::central::signature::file_digest(n, b, "SHA-256").unwrap();
            serde_json::json!({"name": format!("/{n}"), "hash": hash, "algorithm": "SHA-256"})
        })
        .collect();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = b64.encode(r#"{"alg":"RS256","typ":"JWT"}"#);
    let payload = b64.encode(serde_json::json!({"files": listed, "keyid": "rsa"}).to_string());
    let input = format!("{header}.{payload}");
    let input_file = dir.join("input");
    std::fs::write(&input_file, &input).unwrap();
    let sig = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(&key)
        .arg(&input_file)
        .output()
        .unwrap();
    assert!(sig.status.success());
    let jwt = format!("{input}.{}", b64.encode(&sig.stdout));
    let mut signed = f.clone();
    signed.insert(
        SIGNATURES_FILE.into(),
        serde_json::json!({"signatures": [jwt]})
            .to_string()
            .into_bytes(),
    );
    let alg = rampart_authz::central::signature::SigningAlgorithm::Rs256;
    let opts = BundleOptions {
        verification: Some(Verification {
            keys: vec![VerificationKey::from_public_pem("rsa", alg, &pem).unwrap()],
            scope: None,
        }),
        ..BundleOptions::default()
    };
    assert!(bundle::compile(signed.clone(), &opts).unwrap().verified);
    signed.insert("open/data.json".into(), br#"{"paths": ["admin"]}"#.to_vec());
    assert!(matches!(
        bundle::compile(signed, &opts),
        Err(BundleError::Signature(SignatureError::DigestMismatch(_)))
    ));
    // An RSA key is not an ES256 key.
    let es = rampart_authz::central::signature::SigningAlgorithm::Es256;
    assert!(VerificationKey::from_public_pem("rsa", es, &pem).is_err());
    let _ = std::fs::remove_dir_all(dir);
}

fn tempfile_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("rampart-bundle-test-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// OPA reads `data.yaml` beside `data.json`, enforces the manifest's
/// `roots` on packages and data, and honours per-file Rego versions.
#[test]
fn bundles_are_read_as_opa_reads_them() {
    let compile = |list: &[(&str, &str)]| bundle::compile(files(list), &BundleOptions::default());
    // data.yaml is a data document like data.json.
    let b = compile(&[
        ("authz/policy.rego", REGO),
        ("open/data.yaml", "paths: [data]\n"),
    ])
    .unwrap();
    assert!(get("/data/x").allowed(&b.authorizer));
    // Roots: the package and the data must lie under one.
    let roots = r#"{"roots": ["envoy/authz", "open"]}"#;
    let ok = compile(&[
        ("authz/policy.rego", REGO),
        ("open/data.json", r#"{"paths": ["data"]}"#),
        (".manifest", roots),
    ]);
    assert!(ok.is_ok(), "{:?}", ok.err());
    let outside_data = compile(&[
        ("authz/policy.rego", REGO),
        ("open/data.json", r#"{"paths": ["data"]}"#),
        ("other/data.json", r#"{"x": 1}"#),
        (".manifest", roots),
    ])
    .expect_err("data outside the roots");
    assert!(outside_data.to_string().contains("other"), "{outside_data}");
    let outside_package = compile(&[
        ("authz/policy.rego", REGO),
        ("x.rego", "package elsewhere\nx := 1\n"),
        ("open/data.json", r#"{"paths": ["data"]}"#),
        (".manifest", roots),
    ])
    .expect_err("a package outside the roots");
    assert!(
        outside_package.to_string().contains("package elsewhere"),
        "{outside_package}"
    );
    // A root-level data.json may hold documents under the roots only.
    let top = compile(&[
        ("authz/policy.rego", REGO),
        ("data.json", r#"{"open": {"paths": ["data"]}, "stray": 1}"#),
        (".manifest", roots),
    ])
    .expect_err("a root-level document outside the roots");
    assert!(top.to_string().contains("stray"), "{top}");
    // Per-file versions: a v0 module in a v1 bundle.
    let v0 =
        "package envoy.authz\ndefault allow = false\nallow { input.parsed_path[0] == \"old\" }\n";
    let b = compile(&[
        ("authz/policy.rego", v0),
        (
            ".manifest",
            r#"{"rego_version": 1, "file_rego_versions": {"/authz/policy.rego": 0}}"#,
        ),
    ])
    .unwrap();
    assert!(get("/old").allowed(&b.authorizer));
    let glob = compile(&[
        ("authz/policy.rego", v0),
        (
            ".manifest",
            r#"{"file_rego_versions": {"/authz/*.rego": 0}}"#,
        ),
    ])
    .expect_err("globs are refused");
    assert!(glob.to_string().contains("glob"), "{glob}");
}
