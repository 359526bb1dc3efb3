//! Topologies under test, as real processes on loopback: an echo app, an
//! HTTP app, and pairs of proxies (outbound -> mTLS -> inbound) with SVIDs
//! from the development CA: Rampart sidecars, and nginx and HAProxy doing the
//! same hop with the same certificates (see [`Kind`]).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
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

/// The DNS SAN put on the server SVIDs (genuine and imposter) so that nginx
/// and HAProxy, which check names and not SPIFFE URIs, have a name to check.
pub const SERVER_DNS: &str = "server.bench.internal";
/// The SPIFFE ID that the client side expects of the server side.
pub const SERVER_ID: &str = "spiffe://example.org/server";
/// A valid SVID from the same CA, with the same DNS SAN, but another ID.
pub const IMPOSTER_ID: &str = "spiffe://example.org/imposter";
/// The client side's SPIFFE ID.
pub const CLIENT_ID: &str = "spiffe://example.org/client";

/// Which proxy runs both sides of a pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Two `rampart run` sidecars; HTTP/2 between them, an ALLOW policy
    /// evaluated per request, SPIFFE IDs checked on both sides.
    Rampart,
    /// Two nginx instances (master and 2 workers each); HTTP/1.1 keep-alive
    /// between them. Verifies the chain and a DNS name, not the SPIFFE ID.
    Nginx,
    /// Two HAProxy processes (2 threads each); HTTP/1.1 keep-alive between
    /// them. Verifies the chain, not the SPIFFE ID.
    Haproxy,
}

impl Kind {
    /// Its name in results.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Rampart => "rampart",
            Kind::Nginx => "nginx",
            Kind::Haproxy => "haproxy",
        }
    }

    /// The executable for nginx and HAProxy (found on PATH or in /usr/sbin),
    /// or why this kind cannot run here.
    pub fn available(self) -> Result<PathBuf, String> {
        let exe = match self {
            Kind::Rampart => return Ok(rampart_bin()),
            Kind::Nginx => "nginx",
            Kind::Haproxy => "haproxy",
        };
        let path = std::env::var("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
            .map(|d| d.join(exe))
            .find(|p| p.is_file())
            .ok_or_else(|| format!("{exe} is not installed (benches/setup.sh installs it)"))
    }
}

/// Which SVID the server side of a pair presents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerSvid {
    /// The one the client side expects.
    Genuine,
    /// A valid SVID with the wrong SPIFFE ID ([`IMPOSTER_ID`]).
    Imposter,
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
        let env = Env { dir, bin };
        env.issue(SERVER_ID, "server", &[SERVER_DNS]);
        env.issue(IMPOSTER_ID, "imposter", &[SERVER_DNS]);
        env.issue(CLIENT_ID, "client", &[]);
        env
    }

    fn svid(&self, which: ServerSvid) -> PathBuf {
        self.dir.path().join(match which {
            ServerSvid::Genuine => "server",
            ServerSvid::Imposter => "imposter",
        })
    }

    fn issue(&self, id: &str, name: &str, dns: &[&str]) -> PathBuf {
        let out = self.dir.path().join(name);
        let ok = Command::new(&self.bin)
            .args(["ca", "issue", "--spiffe-id", id, "--dir"])
            .arg(self.dir.path().join("ca"))
            .args(dns.iter().flat_map(|d| ["--dns", d]))
            .arg("--out")
            .arg(&out)
            .stdout(Stdio::null())
            .status()
            .expect("rampart ca issue")
            .success();
        assert!(ok, "rampart ca issue failed");
        out
    }

    fn sidecar(&self, name: &str, svid: &Path, body: &str) -> Proc {
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
        let p = Proc { child };
        wait_admin_ready(admin);
        p
    }

    /// Client sidecar (outbound listener) -> server sidecar (inbound) -> `app`,
    /// authorized per connection by an allowlist.
    pub fn rampart_pair(&self, app: SocketAddr) -> Pair {
        self.pair(
            ServerSvid::Genuine,
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
        self.rampart_http_pair_with(app, ServerSvid::Genuine)
    }

    fn rampart_http_pair_with(&self, app: SocketAddr, server_svid: ServerSvid) -> Pair {
        let policy = self.dir.path().join("allow.yaml");
        std::fs::write(
            &policy,
            "policies:\n  - name: bench\n    action: ALLOW\n    rules:\n      - name: client-gets\n        from: {principals: [\"spiffe://example.org/client\"]}\n        to: {methods: [GET], paths: [/bench]}\n",
        )
        .expect("write policy");
        self.pair(
            server_svid,
            app,
            &format!("inbound:\n  policies: [\"{}\"]\n", policy.display()),
        )
    }

    /// A pair of `kind` in front of the HTTP app at `app`; the server side
    /// presents `server_svid`.
    pub fn http_pair(&self, kind: Kind, app: SocketAddr, server_svid: ServerSvid) -> Pair {
        match kind {
            Kind::Rampart => self.rampart_http_pair_with(app, server_svid),
            Kind::Nginx => self.nginx_pair(app, server_svid),
            Kind::Haproxy => self.haproxy_pair(app, server_svid),
        }
    }

    fn pair(&self, server_svid: ServerSvid, app: SocketAddr, inbound_cfg: &str) -> Pair {
        let server_svid = self.svid(server_svid);
        let client_svid = self.dir.path().join("client");
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
            procs: vec![client, server],
        }
    }

    /// nginx on both sides. The client side originates TLS with the client
    /// SVID and verifies the server's chain against the bundle and its DNS
    /// SAN against [`SERVER_DNS`] (`proxy_ssl_verify` checks names only);
    /// the server side requires a client certificate from the bundle.
    fn nginx_pair(&self, app: SocketAddr, server_svid: ServerSvid) -> Pair {
        let d = self.dir.path();
        let (srv, cli) = (self.svid(server_svid), d.join("client"));
        let inbound = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let entry = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let server = self.nginx(
            "nginx-server",
            &format!(
                "upstream app {{ server {app}; keepalive 32; keepalive_requests 1000000; }}\n\
                 server {{\n\
                   listen {inbound} ssl;\n\
                   ssl_certificate {s}/svid.pem; ssl_certificate_key {s}/svid.key;\n\
                   ssl_client_certificate {s}/bundle.pem; ssl_verify_client on;\n\
                   location / {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n\
                 }}\n",
                s = srv.display()
            ),
        );
        let client = self.nginx(
            "nginx-client",
            &format!(
                "upstream server_side {{ server {inbound}; keepalive 32; keepalive_requests 1000000; }}\n\
                 server {{\n\
                   listen {entry};\n\
                   location / {{\n\
                     proxy_pass https://server_side; proxy_http_version 1.1; proxy_set_header Connection \"\";\n\
                     proxy_ssl_certificate {c}/svid.pem; proxy_ssl_certificate_key {c}/svid.key;\n\
                     proxy_ssl_trusted_certificate {c}/bundle.pem; proxy_ssl_verify on; proxy_ssl_verify_depth 2;\n\
                     proxy_ssl_name {SERVER_DNS}; proxy_ssl_server_name on; proxy_ssl_session_reuse on;\n\
                   }}\n\
                 }}\n",
                c = cli.display()
            ),
        );
        wait_listening(inbound);
        wait_listening(entry);
        Pair {
            entry,
            procs: vec![client, server],
        }
    }

    fn nginx(&self, name: &str, servers: &str) -> Proc {
        let d = self.dir.path().join(name);
        std::fs::create_dir_all(&d).expect("nginx dir");
        let cfg = format!(
            "daemon off;\nmaster_process on;\nworker_processes 2;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n\
               access_log off; keepalive_requests 1000000;\n\
               client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;\n\
               uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
               {servers}\n\
             }}\n",
            d = d.display()
        );
        let path = d.join("nginx.conf");
        std::fs::write(&path, cfg).expect("write nginx.conf");
        let exe = Kind::Nginx.available().unwrap_or_else(|e| panic!("{e}"));
        let child = Command::new(exe)
            .arg("-p")
            .arg(&d)
            .arg("-e")
            .arg(d.join("error.log"))
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn nginx");
        Proc { child }
    }

    /// HAProxy on both sides: the client side originates TLS with the
    /// client SVID and `verify required` against the bundle (no
    /// `verifyhost`: the SVID's DNS SAN is the only name it could check);
    /// the server side requires a client certificate from the bundle.
    fn haproxy_pair(&self, app: SocketAddr, server_svid: ServerSvid) -> Pair {
        let d = self.dir.path();
        let (srv, cli) = (self.svid(server_svid), d.join("client"));
        let inbound = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let entry = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let server = self.haproxy(
            "haproxy-server",
            &format!(
                "frontend fe\n  bind {inbound} ssl crt {crt} ca-file {s}/bundle.pem verify required\n  default_backend app\n\
                 backend app\n  server app {app}\n",
                crt = combined_pem(&srv).display(),
                s = srv.display()
            ),
        );
        let client = self.haproxy(
            "haproxy-client",
            &format!(
                "frontend fe\n  bind {entry}\n  default_backend server_side\n\
                 backend server_side\n  server s {inbound} ssl crt {crt} ca-file {c}/bundle.pem verify required\n",
                crt = combined_pem(&cli).display(),
                c = cli.display()
            ),
        );
        wait_listening(inbound);
        wait_listening(entry);
        Pair {
            entry,
            procs: vec![client, server],
        }
    }

    fn haproxy(&self, name: &str, body: &str) -> Proc {
        let path = self.dir.path().join(format!("{name}.cfg"));
        let cfg = format!(
            "global\n  nbthread 2\n  maxconn 4096\n\
             defaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  http-reuse always\n\
             {body}"
        );
        std::fs::write(&path, cfg).expect("write haproxy config");
        let exe = Kind::Haproxy.available().unwrap_or_else(|e| panic!("{e}"));
        let child = Command::new(exe)
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn haproxy");
        Proc { child }
    }
}

/// HAProxy wants the certificate chain and its key in one file.
fn combined_pem(svid: &Path) -> PathBuf {
    let out = svid.join("combined.pem");
    let mut pem = std::fs::read(svid.join("svid.pem")).expect("read svid.pem");
    pem.extend(std::fs::read(svid.join("svid.key")).expect("read svid.key"));
    std::fs::write(&out, pem).expect("write combined.pem");
    out
}

fn wait_admin_ready(admin: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(mut c) = TcpStream::connect(admin) {
            let _ = c.write_all(b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let mut s = String::new();
            let _ = c.read_to_string(&mut s);
            if s.starts_with("HTTP/1.1 200") {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("sidecar on admin {admin} did not become ready");
}

fn wait_listening(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if TcpStream::connect(addr).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nothing listening on {addr}");
}

/// A proxy process, killed on drop.
pub struct Proc {
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two proxies (client side first); connect to `entry`.
pub struct Pair {
    /// Where the load client connects.
    pub entry: SocketAddr,
    procs: Vec<Proc>,
}

impl Pair {
    /// The process ids of both sides, each with its descendants (nginx
    /// workers), for CPU and memory accounting.
    pub fn pids(&self) -> Vec<u32> {
        self.procs
            .iter()
            .flat_map(|p| crate::procstat::tree(p.child.id()))
            .collect()
    }
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
    /// Requests answered so far.
    pub served: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl HttpApp {
    /// Starts it on an ephemeral loopback port.
    pub fn start() -> Self {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let served = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let count = served.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let _ = s.set_nodelay(true);
                let count = count.clone();
                std::thread::spawn(move || {
                    let mut buf = Vec::with_capacity(4096);
                    let mut chunk = [0u8; 4096];
                    loop {
                        while let Some(end) = find_head_end(&buf) {
                            buf.drain(..end);
                            count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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
        HttpApp { addr, served }
    }
}

/// The length of the first complete HTTP head in `buf`, if any.
pub fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}
