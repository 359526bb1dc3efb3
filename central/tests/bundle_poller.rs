//! The bundle poller against nginx (Debian's, started as a plain process on
//! a loopback port, serving a temporary directory; nginx sets ETags on
//! static files): a replaced bundle changes decisions within the polling
//! interval, and a corrupt bundle, a bundle with a Rego syntax error, a
//! bundle with a bad signature and the server going away all leave the
//! previous decisions in force.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant, SystemTime};

use rampart_authz::central::bundle::{self, BundleOptions};
use rampart_authz::central::signature::{
    self, SIGNATURES_FILE, SigningAlgorithm, SigningKey, Verification, VerificationKey,
};
use rampart_authz::{Authorizer, ConnectionInfo, HttpProtocol, RequestInfo};
use rampart_central::bundle_poller::{self, BundleSource, PolicyHandle};

/// nginx serving `www/` of a temporary directory on 127.0.0.1.
struct Nginx {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
}

impl Nginx {
    /// `None` (with the reason printed) when nginx is not installed and the
    /// end-to-end tests are not required.
    fn start() -> Option<Nginx> {
        let bin = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists());
        let Some(bin) = bin else {
            if std::env::var_os("RAMPART_REQUIRE_E2E").is_some_and(|v| v == "1") {
                panic!("nginx is required (RAMPART_REQUIRE_E2E=1): apt-get install nginx");
            }
            eprintln!("skipped: nginx is not installed (apt-get install nginx)");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("www")).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let d = dir.path().display();
        let conf = format!(
            "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/tmp;\n\
               proxy_temp_path {d}/tmp;\n  fastcgi_temp_path {d}/tmp;\n  uwsgi_temp_path {d}/tmp;\n\
               scgi_temp_path {d}/tmp;\n\
               server {{ listen 127.0.0.1:{port}; root {d}/www; }}\n}}\n"
        );
        std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
        let child = Command::new(bin)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .spawn()
            .unwrap();
        let n = Nginx { child, dir, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nginx did not start: {}",
                n.log("error.log")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(n)
    }

    fn url(&self, file: &str) -> http::Uri {
        format!("http://127.0.0.1:{}/{file}", self.port)
            .parse()
            .unwrap()
    }

    /// Replaces a served file atomically, with a later modification time so
    /// that nginx's ETag (mtime and size) changes even within one second.
    fn publish(&self, file: &str, bytes: &[u8]) {
        static STEP: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let www = self.dir.path().join("www");
        let tmp = www.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, bytes).unwrap();
        let step = STEP.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let f = std::fs::File::options().write(true).open(&tmp).unwrap();
        f.set_modified(SystemTime::now() + Duration::from_secs(10 * step))
            .unwrap();
        drop(f);
        std::fs::rename(&tmp, www.join(file)).unwrap();
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}

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
async fn replaced_bundles_take_effect_and_bad_ones_change_nothing() {
    let Some(mut nginx) = Nginx::start() else {
        return;
    };
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
async fn a_sidecar_without_a_bundle_is_not_ready_unless_it_has_a_fallback() {
    let Some(nginx) = Nginx::start() else { return };
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
