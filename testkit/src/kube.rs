//! A real Kubernetes control plane on loopback: `etcd` and `kube-apiserver`
//! built from their Go modules by `tests/peers/peer-kube.sh`, with no
//! kubelet, scheduler or controller manager. Objects, watches, admission
//! webhooks and the API's own validation are all real; a test plays the
//! controllers' part by creating the objects they would (a ReplicaSet's
//! pods, a namespace's `default` service account).
//!
//! ```text
//! let api = kube::ControlPlane::start();
//! api.create("/api/v1/namespaces", &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ec"}}));
//! let pod = api.get("/api/v1/namespaces/ec/pods/web");
//! ```
//!
//! Authentication is by client certificate: the admin's has
//! `O=system:masters`. [`ControlPlane::kubeconfig`] is a kubeconfig with it,
//! for any client (the discovery tests read it too).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value as Json;

use crate::Proc;
use crate::sidecar::free_addr;

/// How long the API server may take to become ready (2 shared cores).
const READY_WITHIN: Duration = Duration::from_secs(120);

/// The two peer binaries.
#[derive(Debug, Clone)]
pub struct KubeBinaries {
    /// `kube-apiserver`.
    pub apiserver: PathBuf,
    /// `etcd`.
    pub etcd: PathBuf,
}

/// Where `tests/peers/peer-kube.sh` put the binaries, at the versions it
/// pins (read from the script itself, so the two never drift), or why
/// they are not there.
pub fn binaries() -> Result<KubeBinaries, String> {
    // The test kit is a crate of the workspace, one level below its root.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/peers/peer-kube.sh");
    let text =
        std::fs::read_to_string(&script).map_err(|e| format!("{}: {e}", script.display()))?;
    let pinned = |var: &str| -> Result<String, String> {
        if let Ok(v) = std::env::var(var) {
            return Ok(v);
        }
        let marker = format!("${{{var}:-");
        let start = text
            .find(&marker)
            .ok_or(format!("{var} is not in {}", script.display()))?
            + marker.len();
        let end = text[start..].find('}').ok_or("unterminated default")? + start;
        Ok(text[start..end].to_owned())
    };
    let peers =
        std::env::var("RAMPART_PEERS_DIR").unwrap_or_else(|_| "/var/tmp/rampart-peers".to_owned());
    let apiserver = Path::new(&peers)
        .join(format!("kube-{}", pinned("RAMPART_K8S_VERSION")?))
        .join("bin/kube-apiserver");
    let etcd = Path::new(&peers)
        .join(format!("etcd-{}", pinned("RAMPART_ETCD_VERSION")?))
        .join("bin/etcd");
    for bin in [&apiserver, &etcd] {
        if !bin.is_file() {
            return Err(format!(
                "{} is not built (run tests/peers/peer-kube.sh)",
                bin.display()
            ));
        }
    }
    Ok(KubeBinaries { apiserver, etcd })
}

/// The binaries; panics, saying how to build them, when they are missing
/// (tests that use them are `#[ignore]`d for it).
pub fn require_binaries() -> KubeBinaries {
    binaries().unwrap_or_else(|reason| panic!("the Kubernetes peers are missing: {reason}"))
}

/// A CA for test certificates (rcgen), and the PEM files it writes.
pub struct TestCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    /// The CA certificate, PEM.
    pub cert_pem: String,
}

/// A certificate and key written to disk.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// PEM certificate.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

impl TestCa {
    /// A new self-signed CA named `name`.
    pub fn new(name: &str) -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert_pem = params.self_signed(&key).unwrap().pem();
        TestCa {
            issuer: rcgen::Issuer::new(params, key),
            cert_pem,
        }
    }

    /// Writes the CA certificate to `path`.
    pub fn write_cert(&self, path: &Path) -> PathBuf {
        std::fs::write(path, &self.cert_pem).unwrap();
        path.to_path_buf()
    }

    /// Issues a certificate: `sans` are DNS names or IP addresses; `org`
    /// becomes the subject's O (Kubernetes reads it as the group). Written
    /// to `<dir>/<name>.crt` and `.key`.
    pub fn issue(&self, dir: &Path, name: &str, sans: &[&str], org: Option<&str>) -> CertFiles {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        if let Some(org) = org {
            params
                .distinguished_name
                .push(rcgen::DnType::OrganizationName, org);
        }
        params.subject_alt_names = sans
            .iter()
            .map(|s| match s.parse::<std::net::IpAddr>() {
                Ok(ip) => rcgen::SanType::IpAddress(ip),
                Err(_) => rcgen::SanType::DnsName((*s).try_into().unwrap()),
            })
            .collect();
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let files = CertFiles {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        files
    }
}

/// etcd and kube-apiserver, killed on drop.
pub struct ControlPlane {
    // Dropped last: the processes write into it.
    _etcd: Proc,
    apiserver: Proc,
    /// The API server's URL (`https://127.0.0.1:PORT`).
    pub url: String,
    /// The CA that signed the serving and client certificates.
    pub ca: PathBuf,
    /// The admin's client certificate (`O=system:masters`).
    pub admin: CertFiles,
    /// A kubeconfig for the admin.
    pub kubeconfig: PathBuf,
    /// The working directory (certificates, logs, etcd data).
    pub dir: tempfile::TempDir,
}

impl ControlPlane {
    /// Starts etcd and the API server and waits for `/readyz`; panics
    /// when the peers are not built.
    pub fn start() -> ControlPlane {
        ControlPlane::start_with(&require_binaries())
    }

    /// Starts etcd and the API server from `bins`.
    pub fn start_with(bins: &KubeBinaries) -> ControlPlane {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ca = TestCa::new("rampart-test-kubernetes-ca");
        let ca_file = ca.write_cert(&d.join("ca.crt"));
        let serving = ca.issue(
            d,
            "kube-apiserver",
            &[
                "127.0.0.1",
                "localhost",
                "kubernetes",
                "kubernetes.default.svc",
            ],
            None,
        );
        let admin = ca.issue(d, "rampart-test-admin", &[], Some("system:masters"));
        // The service-account token signer (ES256).
        let sa = rcgen::KeyPair::generate().unwrap();
        std::fs::write(d.join("sa.key"), sa.serialize_pem()).unwrap();
        std::fs::write(d.join("sa.pub"), sa.public_key_pem()).unwrap();

        let (client, peer) = (free_addr(), free_addr());
        let mut etcd = Command::new(&bins.etcd);
        etcd.args(["--name", "default", "--data-dir"])
            .arg(d.join("etcd"))
            .arg(format!("--listen-client-urls=http://{client}"))
            .arg(format!("--advertise-client-urls=http://{client}"))
            .arg(format!("--listen-peer-urls=http://{peer}"))
            .arg(format!("--initial-advertise-peer-urls=http://{peer}"))
            .arg(format!("--initial-cluster=default=http://{peer}"))
            // A throwaway store: no need to wait for the disk.
            .arg("--unsafe-no-fsync")
            .arg("--log-level=warn");
        let etcd = Proc::spawn(etcd, "etcd", d);
        wait_tcp(client, &etcd);

        let secure = free_addr();
        let path = |p: &Path| p.display().to_string();
        let mut api = Command::new(&bins.apiserver);
        api.arg(format!("--etcd-servers=http://{client}"))
            .arg(format!("--bind-address={}", secure.ip()))
            .arg(format!("--advertise-address={}", secure.ip()))
            .arg(format!("--secure-port={}", secure.port()))
            .arg(format!("--tls-cert-file={}", path(&serving.cert)))
            .arg(format!("--tls-private-key-file={}", path(&serving.key)))
            .arg(format!("--client-ca-file={}", path(&ca_file)))
            .arg(format!(
                "--service-account-key-file={}",
                path(&d.join("sa.pub"))
            ))
            .arg(format!(
                "--service-account-signing-key-file={}",
                path(&d.join("sa.key"))
            ))
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            .arg("--service-cluster-ip-range=10.213.252.0/24")
            .arg("--authorization-mode=Node,RBAC")
            .arg(format!("--cert-dir={}", path(&d.join("apiserver-certs"))))
            .arg("--v=1");
        let apiserver = Proc::spawn(api, "kube-apiserver", d);
        let url = format!("https://{secure}");

        let kubeconfig = d.join("kubeconfig");
        let b64 = |p: &Path| {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.encode(std::fs::read(p).unwrap())
        };
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {url}\n    certificate-authority-data: {}\nusers:\n- name: admin\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\ncontexts:\n- name: test\n  context: {{cluster: test, user: admin}}\ncurrent-context: test\n",
                b64(&ca_file),
                b64(&admin.cert),
                b64(&admin.key)
            ),
        )
        .unwrap();

        let plane = ControlPlane {
            _etcd: etcd,
            apiserver,
            url,
            ca: ca_file,
            admin,
            kubeconfig,
            dir,
        };
        plane.wait_ready();
        plane
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            let (status, body) = self.raw("GET", "/readyz", None);
            if status == 200 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "kube-apiserver not ready within {READY_WITHIN:?}: {status} {body}\n{}",
                self.apiserver.stderr()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The API server's log so far.
    pub fn log(&self) -> String {
        self.apiserver.stderr()
    }

    /// One request as the admin; returns the status and the body (0 when
    /// the exchange failed).
    pub fn raw(&self, method: &str, path: &str, body: Option<&Json>) -> (u16, String) {
        let mut curl = Command::new("curl");
        curl.args([
            "-sS",
            "--max-time",
            "30",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "-X",
            method,
        ])
        .arg("--cacert")
        .arg(&self.ca)
        .arg("--cert")
        .arg(&self.admin.cert)
        .arg("--key")
        .arg(&self.admin.key)
        .args(["-H", "Accept: application/json"]);
        if let Some(body) = body {
            curl.args(["-H", "Content-Type: application/json", "--data-binary"])
                .arg(serde_json::to_string(body).unwrap());
        }
        let out = curl
            .arg(format!("{}{path}", self.url))
            .output()
            .expect("run curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.trim().parse().unwrap_or(0), body.to_owned())
    }

    /// One request as the admin, with a JSON answer.
    pub fn request(&self, method: &str, path: &str, body: Option<&Json>) -> (u16, Json) {
        let (status, text) = self.raw(method, path, body);
        let json = serde_json::from_str(&text).unwrap_or(Json::String(text));
        (status, json)
    }

    /// POSTs `object` to the collection at `path`; panics unless created.
    pub fn create(&self, path: &str, object: &Json) -> Json {
        let (status, answer) = self.request("POST", path, Some(object));
        assert_eq!(status, 201, "POST {path}: {answer}");
        answer
    }

    /// GETs `path`; panics unless found.
    pub fn get(&self, path: &str) -> Json {
        let (status, answer) = self.request("GET", path, None);
        assert_eq!(status, 200, "GET {path}: {answer}");
        answer
    }

    /// Creates namespace `name` and its `default` service account (the
    /// controller manager's job on a real cluster; pods need it to pass the
    /// ServiceAccount admission plugin). `labels` go on the namespace.
    pub fn namespace(&self, name: &str, labels: &Json) {
        self.create(
            "/api/v1/namespaces",
            &serde_json::json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": name, "labels": labels}}),
        );
        self.create(
            &format!("/api/v1/namespaces/{name}/serviceaccounts"),
            &serde_json::json!({"apiVersion": "v1", "kind": "ServiceAccount",
                "metadata": {"name": "default"}}),
        );
    }
}

fn wait_tcp(addr: SocketAddr, proc: &Proc) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "nothing on {addr}: {}",
            proc.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
