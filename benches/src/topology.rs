//! Topologies under test, as real processes on loopback: an echo app, and a
//! pair of Rampart sidecars (outbound -> mTLS -> inbound) with SVIDs from the
//! development CA.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `rampart` binary next to this one (same profile).
pub fn rampart_bin() -> PathBuf {
    let me = std::env::current_exe().expect("current exe");
    let bin = me.with_file_name("rampart");
    if !bin.exists() {
        eprintln!(
            "{} not found: build it first (cargo build --release)",
            bin.display()
        );
        std::process::exit(2);
    }
    bin
}

/// A scratch directory with a development CA.
pub struct Env {
    dir: tempfile::TempDir,
    bin: PathBuf,
}

impl Default for Env {
    fn default() -> Self {
        Self::new()
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

impl Env {
    /// Creates the CA.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = rampart_bin();
        let ok = Command::new(&bin)
            .args(["ca", "init", "--dir"])
            .arg(dir.path().join("ca"))
            .stdout(Stdio::null())
            .status()
            .expect("rampart ca init")
            .success();
        assert!(ok, "rampart ca init failed");
        Env { dir, bin }
    }

    fn issue(&self, id: &str, name: &str) -> PathBuf {
        let out = self.dir.path().join(name);
        let ok = Command::new(&self.bin)
            .args(["ca", "issue", "--spiffe-id", id, "--dir"])
            .arg(self.dir.path().join("ca"))
            .arg("--out")
            .arg(&out)
            .stdout(Stdio::null())
            .status()
            .expect("rampart ca issue")
            .success();
        assert!(ok, "rampart ca issue failed");
        out
    }

    fn sidecar(&self, name: &str, svid: &std::path::Path, body: &str) -> Sidecar {
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let cfg = format!(
            "identity:\n  files: {{cert: {s}/svid.pem, key: {s}/svid.key, bundle: {s}/bundle.pem}}\nadmin: {{address: \"{admin}\"}}\nlog: {{level: warn}}\n{body}",
            s = svid.display()
        );
        let path = self.dir.path().join(format!("{name}.yaml"));
        std::fs::write(&path, cfg).expect("write config");
        let child = Command::new(&self.bin)
            .arg("run")
            .arg("--config")
            .arg(&path)
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn rampart");
        let s = Sidecar { child, admin };
        s.wait_ready();
        s
    }

    /// Client sidecar (outbound listener) -> server sidecar (inbound) -> `app`,
    /// authorized per connection by an allowlist.
    pub fn rampart_pair(&self, app: SocketAddr) -> Pair {
        self.pair(
            app,
            &format!(
                "inbound:\n  ports:\n    - port: {}\n      allowed_peers: [\"spiffe://example.org/client\"]\n",
                app.port()
            ),
        )
    }

    /// The same pair in front of an HTTP app, with an ALLOW policy that is
    /// evaluated on every request (principal, method and path).
    pub fn rampart_http_pair(&self, app: SocketAddr) -> Pair {
        let policy = self.dir.path().join("allow.yaml");
        std::fs::write(
            &policy,
            "policies:\n  - name: bench\n    action: ALLOW\n    rules:\n      - name: client-gets\n        from: {principals: [\"spiffe://example.org/client\"]}\n        to: {methods: [GET], paths: [/bench]}\n",
        )
        .expect("write policy");
        self.pair(
            app,
            &format!("inbound:\n  policies: [\"{}\"]\n", policy.display()),
        )
    }

    fn pair(&self, app: SocketAddr, inbound_cfg: &str) -> Pair {
        let server_svid = self.issue("spiffe://example.org/server", "server");
        let client_svid = self.issue("spiffe://example.org/client", "client");
        let inbound = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let entry = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let server = self.sidecar(
            "server",
            &server_svid,
            &format!(
                "listeners:\n  - {{name: in, direction: inbound, listen: \"{inbound}\", target: \"{app}\"}}\n{inbound_cfg}"
            ),
        );
        let client = self.sidecar(
            "client",
            &client_svid,
            &format!(
                "listeners:\n  - {{name: out, direction: outbound, listen: \"{entry}\", target: \"{inbound}\", server_identities: [\"spiffe://example.org/server\"]}}\n"
            ),
        );
        Pair {
            entry,
            _sidecars: vec![server, client],
        }
    }
}

/// A running sidecar, killed on drop.
pub struct Sidecar {
    child: Child,
    admin: SocketAddr,
}

impl Sidecar {
    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(mut c) = TcpStream::connect(self.admin) {
                let _ = c.write_all(b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
                let mut s = String::new();
                let _ = c.read_to_string(&mut s);
                if s.starts_with("HTTP/1.1 200") {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("sidecar on admin {} did not become ready", self.admin);
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two sidecars; connect to `entry`.
pub struct Pair {
    /// Where the load client connects.
    pub entry: SocketAddr,
    _sidecars: Vec<Sidecar>,
}

/// A threaded echo app.
pub struct EchoApp {
    /// Its address.
    pub addr: SocketAddr,
}

impl EchoApp {
    /// Starts it on an ephemeral loopback port.
    pub fn start() -> Self {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let _ = s.set_nodelay(true);
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16384];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 || s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = s.shutdown(Shutdown::Write);
                });
            }
        });
        EchoApp { addr }
    }
}

/// A threaded HTTP/1.1 app: answers every request head with `200 ok`,
/// keeping the connection alive. Request bodies are not read (GET only).
pub struct HttpApp {
    /// Its address.
    pub addr: SocketAddr,
}

impl HttpApp {
    /// Starts it on an ephemeral loopback port.
    pub fn start() -> Self {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let _ = s.set_nodelay(true);
                std::thread::spawn(move || {
                    let mut buf = Vec::with_capacity(4096);
                    let mut chunk = [0u8; 4096];
                    loop {
                        while let Some(end) = find_head_end(&buf) {
                            buf.drain(..end);
                            let resp = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if s.write_all(resp).is_err() {
                                return;
                            }
                        }
                        match s.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                });
            }
        });
        HttpApp { addr }
    }
}

/// The length of the first complete HTTP head in `buf`, if any.
pub fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}
