//! Topologies under test, as real processes on loopback: pairs of proxies
//! (outbound -> mTLS -> inbound) in front of an app from `apps`, with SVIDs
//! from the test kit's PKI: Rampart sidecars (configured with typed
//! [`Config`] values, written by serde), and nginx and HAProxy doing the
//! same hop with the same certificates (see [`Kind`] and [`Flavor`]).

use std::cell::Cell;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rampart_app::config::{Config, PortConfig};
use rampart_proxy::config::DeclaredProtocol;
use rampart_testkit::Pki;
use rampart_testkit::pki::parse_id;
use rampart_testkit::sidecar::{base_config, inbound_listener, outbound_listener};

use crate::apps::GRPC_PATH;
pub use crate::apps::{EchoApp, H2App, HttpApp};

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

/// A scratch directory with the SVIDs of a development CA.
pub struct Env {
    dir: tempfile::TempDir,
    pki: Pki,
    bin: PathBuf,
    seq: Cell<u32>,
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

/// What a pair is set up for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// HTTP/1.1 from the client; each proxy's default connection reuse on
    /// the hop (Rampart: one pooled HTTP/2 connection; nginx: upstream
    /// keep-alive; HAProxy: `http-reuse always`).
    Http1,
    /// HTTP/1.1 from the client, and a new mTLS connection on the hop for
    /// each client connection (Rampart: the port declared in
    /// `outbound.opaque_ports`, so each connection is tunneled over its own
    /// mTLS connection; nginx: no upstream keep-alive; HAProxy: `http-reuse
    /// never`). Session resumption stays as each proxy does it by default.
    Http1NoPool,
    /// h2c (prior knowledge) from the client, gRPC included.
    Http2,
}

impl Flavor {
    /// The suffix of the topology's name in results.
    pub fn suffix(self) -> &'static str {
        match self {
            Flavor::Http1 | Flavor::Http2 => "",
            Flavor::Http1NoPool => "-nopool",
        }
    }

    /// Whether a Rampart client side declares the server side's port
    /// opaque (`outbound.opaque_ports`).
    fn rampart_opaque(self) -> bool {
        match self {
            // HTTP/2 from the app is tunneled on its own connection anyway.
            Flavor::Http1 | Flavor::Http2 => false,
            Flavor::Http1NoPool => true,
        }
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
        let env = Env {
            dir: tempfile::tempdir().expect("tempdir"),
            pki: Pki::new("example.org"),
            bin: rampart_bin(),
            seq: Cell::new(0),
        };
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
        self.pki
            .issue_into_with_dns(id, dns, &self.dir.path().join(name))
    }

    /// The `rampart` binary.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// The scratch directory (SVIDs in `client/`, `server/`, `imposter/`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The ALLOW policy every Rampart server side evaluates per request:
    /// the client may `GET /bench` and call the gRPC method.
    pub fn policy_text(&self) -> String {
        format!(
            "policies:\n  - name: bench\n    action: ALLOW\n    rules:\n      - name: client-gets\n        from: {{principals: [\"{CLIENT_ID}\"]}}\n        to: {{methods: [GET], paths: [/bench]}}\n      - name: client-calls\n        from: {{principals: [\"{CLIENT_ID}\"]}}\n        to: {{methods: [POST], paths: [\"{GRPC_PATH}\"]}}\n"
        )
    }

    /// A name for one proxy's files, unique in this run.
    fn unique(&self, name: &str) -> String {
        let n = self.seq.get();
        self.seq.set(n + 1);
        format!("{name}-{n}")
    }

    /// Starts `bin run` with the SVID in `svid`, a free admin address,
    /// warnings only, and what `edit` adds; returns once it is ready.
    fn sidecar(&self, bin: &Path, name: &str, svid: &Path, edit: impl FnOnce(&mut Config)) -> Proc {
        let mut cfg = base_config(svid);
        cfg.log.level = "warn".into();
        edit(&mut cfg);
        let admin = cfg.admin.address;
        let path = self.dir.path().join(format!("{}.yaml", self.unique(name)));
        std::fs::write(&path, cfg.to_yaml()).expect("write config");
        let child = Command::new(bin)
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
        self.sidecar_pair(
            &self.bin,
            ServerSvid::Genuine,
            app,
            |c| {
                c.inbound.ports = vec![PortConfig {
                    allowed_peers: Some(vec![parse_id(CLIENT_ID)]),
                    ..PortConfig::new(app.port())
                }]
            },
            false,
        )
    }

    /// The pair with the app's port declared opaque on both sides (the L4
    /// reference): one mTLS connection per client connection, authorized
    /// once by an allowlist; no HTTP parsing.
    pub fn rampart_opaque_pair(&self, app: SocketAddr) -> Pair {
        self.sidecar_pair(
            &self.bin,
            ServerSvid::Genuine,
            app,
            |c| {
                c.inbound.ports = vec![PortConfig {
                    protocol: DeclaredProtocol::Opaque,
                    allowed_peers: Some(vec![parse_id(CLIENT_ID)]),
                    ..PortConfig::new(app.port())
                }]
            },
            true,
        )
    }

    /// [`Env::rampart_opaque_pair`] with another `rampart` executable.
    pub fn rampart_opaque_pair_with(&self, bin: &Path, app: SocketAddr) -> Pair {
        self.sidecar_pair(
            bin,
            ServerSvid::Genuine,
            app,
            |c| {
                c.inbound.ports = vec![PortConfig {
                    protocol: DeclaredProtocol::Opaque,
                    allowed_peers: Some(vec![parse_id(CLIENT_ID)]),
                    ..PortConfig::new(app.port())
                }]
            },
            true,
        )
    }

    /// The same pair in front of an HTTP app, with an ALLOW policy that is
    /// evaluated on every request (principal, method and path).
    pub fn rampart_http_pair(&self, app: SocketAddr) -> Pair {
        self.pair(Kind::Rampart, Flavor::Http1, app, ServerSvid::Genuine)
    }

    /// [`Env::rampart_http_pair`] with another `rampart` executable (an
    /// older build, to compare two versions in one run). It must read the
    /// same configuration schema as the one beside this harness.
    pub fn rampart_http_pair_with(&self, bin: &Path, app: SocketAddr) -> Pair {
        let policy = self.policy_file();
        self.sidecar_pair(
            bin,
            ServerSvid::Genuine,
            app,
            |c| c.inbound.policies = vec![policy],
            false,
        )
    }

    /// [`Env::policy_text`] written to a file, for `inbound.policies`.
    pub fn policy_file(&self) -> PathBuf {
        let policy = self.dir.path().join("allow.yaml");
        std::fs::write(&policy, self.policy_text()).expect("write policy");
        policy
    }

    /// A pair of `kind` in front of the HTTP app at `app`; the server side
    /// presents `server_svid`.
    pub fn http_pair(&self, kind: Kind, app: SocketAddr, server_svid: ServerSvid) -> Pair {
        self.pair(kind, Flavor::Http1, app, server_svid)
    }

    /// A pair of `kind` set up for `flavor` in front of `app` (the HTTP/1.1
    /// app, or for [`Flavor::Http2`] the HTTP/2 app); the server side
    /// presents `server_svid`.
    pub fn pair(
        &self,
        kind: Kind,
        flavor: Flavor,
        app: SocketAddr,
        server_svid: ServerSvid,
    ) -> Pair {
        match kind {
            Kind::Rampart => {
                let policy = self.policy_file();
                self.sidecar_pair(
                    &self.bin,
                    server_svid,
                    app,
                    |c| {
                        c.inbound.policies = vec![policy];
                        if flavor == Flavor::Http2 {
                            // The HTTP/2 app, as the nginx and HAProxy
                            // pairs speak to it: an undeclared port talks
                            // HTTP/1.1 to its app (gRPC aside).
                            c.inbound.ports = vec![PortConfig {
                                protocol: DeclaredProtocol::Http2,
                                ..PortConfig::new(app.port())
                            }];
                        }
                    },
                    flavor.rampart_opaque(),
                )
            }
            Kind::Nginx => self.nginx_pair(flavor, app, server_svid),
            Kind::Haproxy => self.haproxy_pair(flavor, app, server_svid),
        }
    }

    /// The server side with an inbound listener in front of `app` and what
    /// `inbound_edit` adds; the client side with an outbound listener to
    /// it, which with `opaque` declares the server side's port opaque.
    fn sidecar_pair(
        &self,
        bin: &Path,
        server_svid: ServerSvid,
        app: SocketAddr,
        inbound_edit: impl FnOnce(&mut Config),
        opaque: bool,
    ) -> Pair {
        let server_svid = self.svid(server_svid);
        let client_svid = self.dir.path().join("client");
        let inbound = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let entry = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let server = self.sidecar(bin, "server", &server_svid, |c| {
            c.listeners.push(inbound_listener("in", inbound, app));
            inbound_edit(c);
        });
        let client = self.sidecar(bin, "client", &client_svid, |c| {
            c.listeners
                .push(outbound_listener("out", entry, inbound, SERVER_ID));
            if opaque {
                c.outbound.opaque_ports = vec![inbound.port()];
            }
        });
        Pair {
            entry,
            procs: vec![client, server],
        }
    }

    /// nginx on both sides. The client side originates TLS with the client
    /// SVID and verifies the server's chain against the bundle and its DNS
    /// SAN against [`SERVER_DNS`] (`proxy_ssl_verify` checks names only);
    /// the server side requires a client certificate from the bundle.
    /// HTTP/1.1 on the hop (`proxy_pass` speaks nothing else), keep-alive
    /// except for [`Flavor::Http1NoPool`]; for [`Flavor::Http2`] the client
    /// side accepts h2c, gRPC goes over h2 with `grpc_pass grpcs://` (same
    /// checks, `grpc_ssl_*`) and other requests over HTTP/1.1.
    fn nginx_pair(&self, flavor: Flavor, app: SocketAddr, server_svid: ServerSvid) -> Pair {
        let d = self.dir.path();
        let (srv, cli) = (self.svid(server_svid), d.join("client"));
        let inbound = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let entry = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let keepalive = match flavor {
            Flavor::Http1NoPool => "",
            Flavor::Http1 | Flavor::Http2 => "keepalive 32; keepalive_requests 1000000;",
        };
        let h2 = flavor == Flavor::Http2;
        let grpc_server = if h2 {
            format!(
                "upstream app_grpc {{ server {app}; keepalive 32; keepalive_requests 1000000; }}\n"
            )
        } else {
            String::new()
        };
        let grpc_location = if h2 {
            "location /rampart.bench.Bench/ { grpc_pass grpc://app_grpc; }\n"
        } else {
            ""
        };
        let server = self.nginx(
            "nginx-server",
            &format!(
                "upstream app {{ server {app}; keepalive 32; keepalive_requests 1000000; }}\n{grpc_server}\
                 server {{\n\
                   listen {inbound} ssl{http2};\n\
                   ssl_certificate {s}/svid.pem; ssl_certificate_key {s}/svid.key;\n\
                   ssl_client_certificate {s}/bundle.pem; ssl_verify_client on;\n\
                   location / {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n\
                   {grpc_location}\
                 }}\n",
                s = srv.display(),
                http2 = if h2 { " http2" } else { "" },
            ),
        );
        let c = cli.display();
        let grpc_client = if h2 {
            format!(
                "upstream server_side_grpc {{ server {inbound}; keepalive 32; keepalive_requests 1000000; }}\n"
            )
        } else {
            String::new()
        };
        let grpc_client_location = if h2 {
            format!(
                "location /rampart.bench.Bench/ {{\n\
                   grpc_pass grpcs://server_side_grpc;\n\
                   grpc_ssl_certificate {c}/svid.pem; grpc_ssl_certificate_key {c}/svid.key;\n\
                   grpc_ssl_trusted_certificate {c}/bundle.pem; grpc_ssl_verify on; grpc_ssl_verify_depth 2;\n\
                   grpc_ssl_name {SERVER_DNS}; grpc_ssl_server_name on; grpc_ssl_session_reuse on;\n\
                 }}\n"
            )
        } else {
            String::new()
        };
        let client = self.nginx(
            "nginx-client",
            &format!(
                "upstream server_side {{ server {inbound}; {keepalive} }}\n{grpc_client}\
                 server {{\n\
                   listen {entry}{http2};\n\
                   location / {{\n\
                     proxy_pass https://server_side; proxy_http_version 1.1; proxy_set_header Connection \"\";\n\
                     proxy_ssl_certificate {c}/svid.pem; proxy_ssl_certificate_key {c}/svid.key;\n\
                     proxy_ssl_trusted_certificate {c}/bundle.pem; proxy_ssl_verify on; proxy_ssl_verify_depth 2;\n\
                     proxy_ssl_name {SERVER_DNS}; proxy_ssl_server_name on; proxy_ssl_session_reuse on;\n\
                   }}\n\
                   {grpc_client_location}\
                 }}\n",
                http2 = if h2 { " http2" } else { "" },
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
        let d = self.dir.path().join(self.unique(name));
        std::fs::create_dir_all(&d).expect("nginx dir");
        let cfg = format!(
            "daemon off;\nmaster_process on;\nworker_processes 2;\nworker_rlimit_nofile 16384;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 8192; }}\n\
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
    /// HTTP/1.1 on the hop, reused across client connections (`http-reuse
    /// always`) except for [`Flavor::Http1NoPool`] (`http-reuse never`); for
    /// [`Flavor::Http2`] h2c from the client, h2 (ALPN) on the hop and h2c
    /// to the app.
    fn haproxy_pair(&self, flavor: Flavor, app: SocketAddr, server_svid: ServerSvid) -> Pair {
        let d = self.dir.path();
        let (srv, cli) = (self.svid(server_svid), d.join("client"));
        let inbound = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let entry = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let (h2_bind, h2_hop, h2_app) = match flavor {
            Flavor::Http2 => (" proto h2", " alpn h2", " proto h2"),
            Flavor::Http1 | Flavor::Http1NoPool => ("", "", ""),
        };
        let reuse = match flavor {
            Flavor::Http1NoPool => "never",
            Flavor::Http1 | Flavor::Http2 => "always",
        };
        let server = self.haproxy(
            "haproxy-server",
            &format!(
                "frontend fe\n  bind {inbound} ssl crt {crt} ca-file {s}/bundle.pem verify required{h2_hop}\n  default_backend app\n\
                 backend app\n  server app {app}{h2_app}\n",
                crt = combined_pem(&srv).display(),
                s = srv.display()
            ),
        );
        let client = self.haproxy(
            "haproxy-client",
            &format!(
                "frontend fe\n  bind {entry}{h2_bind}\n  default_backend server_side\n\
                 backend server_side\n  http-reuse {reuse}\n  server s {inbound} ssl crt {crt} ca-file {c}/bundle.pem verify required{h2_hop}\n",
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
        let path = self.dir.path().join(format!("{}.cfg", self.unique(name)));
        let cfg = format!(
            "global\n  nbthread 2\n  maxconn 8192\n\
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

/// Polls the sidecar's `/ready` until it answers 200 (panics after 20 s).
pub fn wait_admin_ready(admin: SocketAddr) {
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

/// A proxy process, killed on drop with its descendants.
pub struct Proc {
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        // nginx's workers outlive a killed master: kill its descendants too.
        let descendants = crate::procstat::tree(self.child.id());
        let _ = self.child.kill();
        // These pids are this child's descendants, read from /proc just
        // before; one already gone is fine.
        for pid in descendants.into_iter().skip(1) {
            if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
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
    /// The process ids per side (client side first), each with its
    /// descendants (nginx workers), for CPU and memory accounting.
    pub fn sides(&self) -> Vec<Vec<u32>> {
        self.procs
            .iter()
            .map(|p| crate::procstat::tree(p.child.id()))
            .collect()
    }
}
