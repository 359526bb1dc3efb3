//! The bundle poller against nginx (Debian's, started as a plain process on
//! a loopback port, serving a temporary directory; nginx sets ETags on
//! static files): a replaced bundle changes decisions within the polling
//! interval, and a corrupt bundle, a bundle with a Rego syntax error, a
//! bundle with a bad signature and the server going away all leave the
//! previous decisions in force.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use rampart_authz::central::bundle::{self, BundleOptions};
use rampart_authz::central::signature::{
    self, SIGNATURES_FILE, SigningAlgorithm, SigningKey, Verification, VerificationKey,
};
use rampart_authz::{Authorizer, ConnectionInfo, HttpProtocol, RequestInfo};
use rampart_central::bundle_poller::{self, BundleSource, PolicyHandle};

use rampart_testkit::nginx::Nginx;

const REGO: &str = "package envoy.authz\n\ndefault allow := false\n\nallow if input.attributes.request.http.path == data.allowed_path\n";

fn bundle_files(revision: &str, path: &str, rego: &str) -> BTreeMap<String, Vec<u8>> {
    let mut f = BTreeMap::new();
    f.insert("authz/policy.rego".to_owned(), rego.as_bytes().to_vec());
    f.insert(
        "data.json".to_owned(),
        format!("{{\"allowed_path\": \"{path}\"}}").into_bytes(),
    );
    f.insert(
        ".manifest".to_owned(),
        format!("{{\"revision\": \"{revision}\"}}").into_bytes(),
    );
    f
}

fn signed(mut f: BTreeMap<String, Vec<u8>>, key: &SigningKey) -> Vec<u8> {
    let sig = signature::sign(&f, key, "central", None).unwrap();
    f.insert(SIGNATURES_FILE.to_owned(), sig);
    bundle::pack(&f)
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

fn allowed(a: &Authorizer, path: &str) -> bool {
    let headers = http::HeaderMap::new();
    let conn = ConnectionInfo::new(None, "127.0.0.1".parse().unwrap(), 8080);
    let req = RequestInfo {
        method: &http::Method::GET,
        authority: "app",
        path,
        raw_path_and_query: path,
        query: None,
        headers: &headers,
        protocol: HttpProtocol::Http11,
        scheme: "http",
        grpc_method: None,
        source: "127.0.0.1:40000".parse().unwrap(),
        destination: "127.0.0.1:8080".parse().unwrap(),
        local_identity: None,
        peer_cert_sha256: None,
    };
    a.check_request(&conn, &req).is_allowed()
}

/// Waits (polling, with a deadline) until `cond` holds.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn decisions(h: &PolicyHandle) -> (bool, bool) {
    let a = h.current().expect("a policy is in force");
    (allowed(&a, "/v1"), allowed(&a, "/v2"))
}

fn poll_fast(url: http::Uri) -> BundleSource {
    BundleSource {
        poll_interval: Duration::from_millis(100),
        timeout: Duration::from_secs(2),
        ..BundleSource::new(url)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nginx (apt-get install nginx)"]
async fn replaced_bundles_take_effect_and_bad_ones_change_nothing() {
    let mut nginx = Nginx::start();
    let key = es256();
    let options = BundleOptions {
        verification: Some(Verification {
            keys: vec![
                VerificationKey::from_public_pem(
                    "central",
                    SigningAlgorithm::Es256,
                    &key.public_pem().unwrap(),
                )
                .unwrap(),
            ],
            scope: None,
        }),
        ..BundleOptions::default()
    };
    nginx.publish(
        "bundle.tar.gz",
        &signed(bundle_files("1", "/v1", REGO), &key),
    );
    let (h, task) =
        bundle_poller::spawn(poll_fast(nginx.url("bundle.tar.gz")), options, None, None);

    eventually("the first bundle", || h.has_policy()).await;
    assert_eq!(decisions(&h), (true, false));
    assert_eq!(h.revision().as_deref(), Some("1"));
    assert!(h.status().verified);

    nginx.publish(
        "bundle.tar.gz",
        &signed(bundle_files("2", "/v2", REGO), &key),
    );
    eventually("revision 2", || h.revision().as_deref() == Some("2")).await;
    assert_eq!(decisions(&h), (false, true));
    // Unchanged polls are answered 304 thanks to If-None-Match.
    eventually("a 304", || nginx.log("access.log").contains("\" 304 ")).await;

    type Bad = (&'static str, Vec<u8>, &'static str);
    let syntax = "package envoy.authz\nallow if {\n";
    let allow_all = "package envoy.authz\nallow := true\n";
    let bad: Vec<Bad> = vec![
        (
            "corrupt",
            b"\x1f\x8b this is not a bundle".to_vec(),
            "corrupt",
        ),
        (
            "rego syntax error",
            signed(bundle_files("3", "/v1", syntax), &key),
            "compile",
        ),
        (
            "bad signature",
            signed(bundle_files("4", "/v1", allow_all), &es256()),
            "signature",
        ),
    ];
    for (name, bytes, error) in bad {
        nginx.publish("bundle.tar.gz", &bytes);
        eventually(name, || {
            h.status().last_error.is_some_and(|e| e.contains(error))
        })
        .await;
        assert_eq!(h.revision().as_deref(), Some("2"), "{name}");
        assert_eq!(
            decisions(&h),
            (false, true),
            "{name}: previous decisions in force"
        );
    }

    nginx.stop();
    eventually("the download error", || {
        h.status()
            .last_error
            .is_some_and(|e| !e.contains("signature"))
    })
    .await;
    assert_eq!(decisions(&h), (false, true), "server gone: nothing changes");
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nginx (apt-get install nginx)"]
async fn a_sidecar_without_a_bundle_is_not_ready_unless_it_has_a_fallback() {
    let nginx = Nginx::start();
    let (h, task) = bundle_poller::spawn(
        poll_fast(nginx.url("missing.tar.gz")),
        BundleOptions::default(),
        None,
        None,
    );
    eventually("the 404", || h.status().last_error.is_some()).await;
    assert!(!h.has_policy());
    task.abort();

    let fallback = Authorizer::from_yaml(
        "fallback.yaml",
        "policies: []\n",
        Path::new("."),
        &rampart_authz::Options::default(),
    )
    .unwrap();
    let (h, task) = bundle_poller::spawn(
        poll_fast(nginx.url("missing.tar.gz")),
        BundleOptions::default(),
        None,
        Some(fallback),
    );
    assert!(h.has_policy());
    assert_eq!(h.revision(), None);
    nginx.publish(
        "missing.tar.gz",
        &bundle::pack(&bundle_files("7", "/v1", REGO)),
    );
    eventually("the bundle replaces the fallback", || {
        h.revision().as_deref() == Some("7")
    })
    .await;
    assert_eq!(decisions(&h), (true, false));
    task.abort();
}
