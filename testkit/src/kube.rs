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
//! for any client; [`ControlPlane::kubeconfig_for`] makes one for another
//! user (whose rights RBAC decides, as for a sidecar's service account).
//!
//! The API server listens on the host's loopback, which a pod (a network
//! namespace of [`crate::Net`]) cannot reach. [`ControlPlane::relay_into`]
//! gives a pod the same address on its own loopback: a relay in the test
//! process accepts there, inside the pod's namespace, and connects from
//! the host's. So one kubeconfig (`https://127.0.0.1:PORT`, the serving
//! certificate's IP SAN) works on the host and in every relayed pod, and
//! the pod's sidecar reaches the API server as a kubelet-run pod reaches
//! `kubernetes.default` (its own traffic, not captured).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value as Json;

use crate::sidecar::free_addr;
use crate::{Pod, Proc};

/// The Services' ClusterIP range (IPv4, the primary family).
pub const SERVICE_CIDR: &str = "10.213.240.0/20";
/// The IPv6 ClusterIP range: the API server is dual-stack, so a Service
/// with `ipFamilyPolicy: RequireDualStack` has a ClusterIP of each family
/// (single-stack Services, the default, keep IPv4 only).
pub const SERVICE_CIDR_V6: &str = "fd00:10:213:240::/108";

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
    issuer: TestCa,
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
            // ClusterIPs: the top /20 of the test subnet (4,094 Services; a
            // `Net` takes the /24s from the bottom).
            .arg(format!(
                "--service-cluster-ip-range={SERVICE_CIDR},{SERVICE_CIDR_V6}"
            ))
            .arg("--authorization-mode=Node,RBAC")
            .arg(format!("--cert-dir={}", path(&d.join("apiserver-certs"))))
            .arg("--v=1");
        let apiserver = Proc::spawn(api, "kube-apiserver", d);
        let url = format!("https://{secure}");

        let kubeconfig = d.join("kubeconfig");
        write_kubeconfig(&kubeconfig, &url, &ca_file, &admin);

        let plane = ControlPlane {
            _etcd: etcd,
            apiserver,
            url,
            ca: ca_file,
            admin,
            kubeconfig,
            dir,
            issuer: ca,
        };
        plane.wait_ready();
        plane
    }

    /// A kubeconfig (readable by any user: sidecars run as the proxy UID)
    /// for `user` in group `group`, by client certificate (CN and O). What
    /// it may do is up to RBAC.
    pub fn kubeconfig_for(&self, user: &str, group: Option<&str>) -> PathBuf {
        let dir = self.dir.path().join(format!("user-{user}"));
        std::fs::create_dir_all(&dir).unwrap();
        let cert = self.issuer.issue(&dir, user, &[], group);
        let path = dir.join("kubeconfig");
        write_kubeconfig(&path, &self.url, &self.ca, &cert);
        // The working directory is private to root: let the proxy UID
        // through (not list) to the files it is given.
        std::fs::set_permissions(
            self.dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o711),
        )
        .unwrap();
        for p in [&dir, &path] {
            let mode = if p.is_dir() { 0o755 } else { 0o644 };
            std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(mode))
                .unwrap();
        }
        path
    }

    /// The API server's socket address on the host's loopback.
    pub fn addr(&self) -> SocketAddr {
        // Invariant: `url` is `https://` and the address `start_with` bound.
        self.url.trim_start_matches("https://").parse().unwrap()
    }

    /// Relays the API server's address (`127.0.0.1:PORT`) on `pod`'s own
    /// loopback to the API server, until the relay drops.
    pub fn relay_into(&self, pod: &Pod) -> Relay {
        Relay::start(pod, self.addr())
    }

    /// The objects of a multi-document YAML text (a file of deploy/, say),
    /// each created at the collection its `apiVersion`, `kind` and
    /// `metadata.namespace` name (the core and named groups' plural
    /// resource names of the kinds deploy/ uses).
    pub fn apply_yaml(&self, text: &str) {
        for doc in text.split("\n---") {
            let v: serde_yaml::Value = serde_yaml::from_str(doc).unwrap();
            if v.is_null() {
                continue;
            }
            let json: Json = serde_json::to_value(v).unwrap();
            self.create(&collection_of(&json), &json);
        }
    }
}

/// The collection path of `object` (its kind's plural: lower case plus
/// `s`, which holds for every kind deploy/ ships).
pub fn collection_of(object: &Json) -> String {
    let api = object["apiVersion"].as_str().unwrap_or("v1");
    let kind = object["kind"].as_str().unwrap_or("");
    let plural = format!("{}s", kind.to_ascii_lowercase());
    let root = if api.contains('/') {
        format!("/apis/{api}")
    } else {
        format!("/api/{api}")
    };
    match object["metadata"]["namespace"].as_str() {
        Some(ns) => format!("{root}/namespaces/{ns}/{plural}"),
        None => format!("{root}/{plural}"),
    }
}

fn write_kubeconfig(path: &Path, url: &str, ca: &Path, user: &CertFiles) {
    let b64 = |p: &Path| {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(std::fs::read(p).unwrap())
    };
    std::fs::write(
        path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {url}\n    certificate-authority-data: {}\nusers:\n- name: user\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\ncontexts:\n- name: test\n  context: {{cluster: test, user: user}}\ncurrent-context: test\n",
            b64(ca),
            b64(&user.cert),
            b64(&user.key)
        ),
    )
    .unwrap();
}

/// A TCP relay from a pod's loopback to the host's: accepts inside the
/// pod's network namespace, connects from the host's, copies both ways.
/// Every relayed connection is shut down when it drops.
pub struct Relay {
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    accept: Option<std::thread::JoinHandle<()>>,
    /// Connections relayed so far.
    pub accepted: Arc<std::sync::atomic::AtomicU64>,
}

impl Relay {
    /// Listens on `to`'s address inside `pod` and relays to `to` from the
    /// calling thread's namespace (the host's, in a test).
    pub fn start(pod: &Pod, to: SocketAddr) -> Relay {
        let listener = pod.in_netns(move || TcpListener::bind(to));
        let listener = listener.unwrap_or_else(|e| panic!("relay on {to} in {}: {e}", pod.name()));
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let accepted = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let accept = {
            let (stop, conns, accepted) = (stop.clone(), conns.clone(), accepted.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let down = match listener.accept() {
                        Ok((c, _)) => c,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(10));
                            continue;
                        }
                        Err(_) => continue,
                    };
                    let Ok(up) = TcpStream::connect(to) else {
                        continue;
                    };
                    accepted.fetch_add(1, Ordering::Relaxed);
                    let _ = down.set_nonblocking(false);
                    if let (Ok(d2), Ok(u2)) = (down.try_clone(), up.try_clone()) {
                        if let Ok(mut c) = conns.lock() {
                            c.extend(down.try_clone().ok());
                            c.extend(up.try_clone().ok());
                        }
                        std::thread::spawn(move || copy(down, u2));
                        std::thread::spawn(move || copy(up, d2));
                    }
                }
            })
        };
        Relay {
            stop,
            conns,
            accept: Some(accept),
            accepted,
        }
    }
}

fn copy(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        if let Ok(c) = self.conns.lock() {
            for s in c.iter() {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }
}

impl ControlPlane {
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
