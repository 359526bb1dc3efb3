//! A small DSL for the Workload API tests, on loopback (no namespaces, no
//! root): a pod (a temp dir with a development CA and registrations), the
//! agent, an echo app, a pair of sidecars and a client. Processes run under
//! the shared `support::Proc` guard, which prints their logs on failure.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rampart_app::config::{Config, IdentityConfig, PortConfig};
use rampart_proxy::config::{Direction, ListenerConfig};

use crate::support::pki::parse_id;
use crate::support::sidecar::free_addr;
use crate::support::{Pki, Proc, TempDir};

/// The SPIFFE ID of the client-side sidecar (the caller's default identity).
pub const CLIENT_ID: &str = "spiffe://example.org/client";
/// The SPIFFE ID of the server-side sidecar.
pub const SERVER_ID: &str = "spiffe://example.org/server";

/// Panics unless `python3 -c "import spiffe, grpc"` works (the tests that
/// call it are `#[ignore]`d for it).
pub fn require_python_spiffe() {
    let ok = Command::new("python3")
        .args(["-c", "import spiffe, grpc"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "python3 cannot import spiffe and grpc (pip install -r tests/requirements.txt)"
    );
}

/// Polls `cond` every 50ms until it holds, or panics after `limit`.
pub fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn rampart() -> Command {
    Command::new(env!("CARGO_BIN_EXE_rampart"))
}

/// A temp dir with a development CA and a registration file granting this
/// test process's UID both SPIFFE IDs (client first: the default).
pub struct Pod {
    dir: TempDir,
}

impl Pod {
    pub fn new() -> Self {
        let dir = TempDir::new();
        // The agent reads the CA from disk, as `rampart ca init` writes it.
        Pki::new("example.org").save_ca(&dir.path().join("ca"));
        let uid = rustix::process::getuid().as_raw();
        std::fs::write(
            dir.path().join("registrations.yaml"),
            format!(
                "registrations:\n  - {{uid: {uid}, spiffe_id: {CLIENT_ID}}}\n  - {{uid: {uid}, spiffe_id: {SERVER_ID}}}\n"
            ),
        )
        .unwrap();
        Pod { dir }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("agent.sock")
    }
}

/// A running `rampart agent`.
pub struct Agent {
    proc: Option<Proc>,
    socket: PathBuf,
}

impl Agent {
    /// Starts the agent with SVID lifetime `ttl` and waits until it accepts.
    pub fn start(pod: &Pod, ttl: &str) -> Self {
        let mut cmd = rampart();
        cmd.arg("agent")
            .arg("--socket")
            .arg(pod.socket())
            .arg("--ca-dir")
            .arg(pod.dir().join("ca"))
            .arg("--registrations")
            .arg(pod.dir().join("registrations.yaml"))
            .args(["--ttl", ttl, "--log-level", "debug,h2=info,tonic=info"]);
        let proc = Proc::spawn(cmd, "agent", pod.dir());
        let socket = pod.socket();
        wait_for("the agent socket", Duration::from_secs(10), || {
            std::os::unix::net::UnixStream::connect(&socket).is_ok()
        });
        Agent {
            proc: Some(proc),
            socket,
        }
    }

    /// The endpoint URI.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// Kills the agent (SIGKILL: no goodbye to open streams).
    pub fn stop(&mut self) {
        self.proc = None;
    }

    pub fn is_running(&self) -> bool {
        self.proc.is_some()
    }
}

/// An echo server on 127.0.0.1: writes back every line it reads.
pub struct EchoApp {
    pub addr: SocketAddr,
}

impl EchoApp {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut w = stream.try_clone().unwrap();
                    let mut r = BufReader::new(stream);
                    let mut line = String::new();
                    while r.read_line(&mut line).is_ok_and(|n| n > 0) {
                        if w.write_all(line.as_bytes()).is_err() {
                            return;
                        }
                        line.clear();
                    }
                });
            }
        });
        EchoApp { addr }
    }
}

/// A keep-alive HTTP/1.1 app on 127.0.0.1 that answers every request
/// `200 ok`.
pub struct HttpOk {
    pub addr: SocketAddr,
}

impl HttpOk {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut w = stream.try_clone().unwrap();
                    let mut r = BufReader::new(stream);
                    loop {
                        // Requests without a body: read the head, answer.
                        let mut line = String::new();
                        loop {
                            line.clear();
                            match r.read_line(&mut line) {
                                Ok(0) | Err(_) => return,
                                Ok(_) if line == "\r\n" => break,
                                Ok(_) => {}
                            }
                        }
                        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                        if w.write_all(ok).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        HttpOk { addr }
    }
}

/// A `rampart run` process.
pub struct Sidecar {
    _proc: Proc,
    admin: u16,
    outbound: Option<u16>,
}

impl Sidecar {
    /// Two sidecars on loopback, both fed by the pod's agent: the client
    /// side (outbound listener, SVID `CLIENT_ID`) originates mTLS to the
    /// server side (inbound listener, SVID `SERVER_ID`) in front of `app`,
    /// which only admits `CLIENT_ID`.
    pub fn pair(pod: &Pod, app: &EchoApp) -> (Sidecar, Sidecar) {
        Self::pair_to(pod, app.addr)
    }

    /// A client-side and a server-side sidecar in front of the app at `app`.
    pub fn pair_to(pod: &Pod, app: SocketAddr) -> (Sidecar, Sidecar) {
        let inbound = free_addr();
        let mut server = Self::config(pod, SERVER_ID);
        server.listeners.push(ListenerConfig {
            name: "in".into(),
            direction: Direction::Inbound,
            listen: inbound,
            target: app.into(),
            port: None,
            server_identities: None,
        });
        server.inbound.ports.push(PortConfig {
            allowed_peers: Some(vec![parse_id(CLIENT_ID)]),
            ..PortConfig::new(app.port())
        });
        let server = Self::start(pod, "server", &server, None);
        let outbound = free_addr();
        let mut client = Self::config(pod, CLIENT_ID);
        client.listeners.push(ListenerConfig {
            name: "out".into(),
            direction: Direction::Outbound,
            listen: outbound,
            target: inbound.into(),
            port: None,
            server_identities: Some(vec![parse_id(SERVER_ID)]),
        });
        let client = Self::start(pod, "client", &client, Some(outbound.port()));
        wait_for("sidecars' admin", Duration::from_secs(10), || {
            client.ready_status().is_some() && server.ready_status().is_some()
        });
        (client, server)
    }

    /// A sidecar for `id` fed by the pod's agent (fast reconnects), with
    /// a free admin address and no listeners yet.
    pub fn config(pod: &Pod, id: &str) -> Config {
        let mut identity = IdentityConfig::workload_api(
            format!("unix://{}", pod.socket().display()),
            parse_id(id),
        );
        if let Some(w) = identity.workload_api.as_mut() {
            w.backoff_initial = Duration::from_millis(100);
            w.backoff_max = Duration::from_secs(1);
        }
        let mut cfg = Config::new(identity);
        cfg.admin.address = free_addr();
        cfg.log.level = "info".into();
        cfg
    }

    pub fn start(pod: &Pod, name: &str, cfg: &Config, outbound: Option<u16>) -> Self {
        let admin = cfg.admin.address.port();
        let path = pod.dir().join(format!("{name}.yaml"));
        std::fs::write(&path, cfg.to_yaml()).unwrap();
        let mut cmd = rampart();
        cmd.arg("run").arg("--config").arg(&path);
        Sidecar {
            _proc: Proc::spawn(cmd, name, pod.dir()),
            admin,
            outbound,
        }
    }

    /// The outbound listener's port (client side only).
    pub fn outbound_port(&self) -> u16 {
        self.outbound.expect("not a client-side sidecar")
    }

    /// The status of `GET /ready`, or None if the admin port does not answer.
    pub fn ready_status(&self) -> Option<u16> {
        let (status, _) = self.get("/ready")?;
        Some(status)
    }

    /// A metric's value from `/metrics` (summed over its label sets).
    pub fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = self.get("/metrics")?;
        let mut found = None;
        for line in body.lines() {
            let Some(rest) = line.strip_prefix(name) else {
                continue;
            };
            if !(rest.starts_with(' ') || rest.starts_with('{')) {
                continue;
            }
            let v: f64 = rest.rsplit(' ').next()?.parse().ok()?;
            *found.get_or_insert(0.0) += v;
        }
        found
    }

    /// SVID rotations so far.
    pub fn rotations(&self) -> u64 {
        self.metric("rampart_identity_rotations_total")
            .unwrap_or(0.0) as u64
    }

    fn get(&self, path: &str) -> Option<(u16, String)> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.admin));
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut resp = String::new();
        s.read_to_string(&mut resp).ok()?;
        let status = resp.split(' ').nth(1)?.parse().ok()?;
        let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
        Some((status, body))
    }
}

/// Sends lines through the client-side sidecar and checks the echo.
pub struct Client {
    addr: SocketAddr,
}

/// An open connection through the sidecars.
pub struct Conn {
    stream: BufReader<TcpStream>,
}

impl Client {
    pub fn new(port: u16) -> Self {
        Client {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    /// A connection kept open by the caller.
    pub fn open(&self) -> Result<Conn, String> {
        let s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(2))
            .map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))
            .map_err(|e| e.to_string())?;
        Ok(Conn {
            stream: BufReader::new(s),
        })
    }

    /// One request on a new connection.
    pub fn request(&self, n: u64) -> Result<(), String> {
        self.open()?.ping(n)
    }
}

impl Conn {
    /// Writes a line and expects it back.
    pub fn ping(&mut self, n: u64) -> Result<(), String> {
        let line = format!("ping {n}\n");
        self.stream
            .get_mut()
            .write_all(line.as_bytes())
            .map_err(|e| format!("write: {e}"))?;
        let mut back = String::new();
        self.stream
            .read_line(&mut back)
            .map_err(|e| format!("read: {e}"))?;
        if back == line {
            Ok(())
        } else {
            Err(format!("echo mismatch: {back:?}"))
        }
    }
}

/// A keep-alive HTTP/1.1 connection through the client-side sidecar.
pub struct HttpConn {
    stream: BufReader<TcpStream>,
}

impl HttpConn {
    pub fn open(port: u16) -> Result<Self, String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))
            .map_err(|e| e.to_string())?;
        Ok(HttpConn {
            stream: BufReader::new(s),
        })
    }

    /// `GET /n`; Ok if the app's `200 ok` came back.
    pub fn get(&mut self, n: u64) -> Result<(), String> {
        // One write: several small ones would meet Nagle and delayed ACKs.
        let req = format!("GET /{n} HTTP/1.1\r\nHost: app\r\n\r\n");
        self.stream
            .get_mut()
            .write_all(req.as_bytes())
            .map_err(|e| format!("write: {e}"))?;
        let mut status = String::new();
        self.stream
            .read_line(&mut status)
            .map_err(|e| format!("read: {e}"))?;
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            match self.stream.read_line(&mut line) {
                Ok(0) => return Err(format!("closed after {status:?}")),
                Err(e) => return Err(format!("read: {e}")),
                Ok(_) if line == "\r\n" => break,
                Ok(_) => {
                    if let Some((k, v)) = line.split_once(':')
                        && k.eq_ignore_ascii_case("content-length")
                    {
                        length = v.trim().parse().map_err(|_| format!("bad {line:?}"))?;
                    }
                }
            }
        }
        let mut body = vec![0; length];
        self.stream
            .read_exact(&mut body)
            .map_err(|e| format!("body: {e}"))?;
        if status.starts_with("HTTP/1.1 200") && body == b"ok" {
            Ok(())
        } else {
            Err(format!("{status:?} {:?}", String::from_utf8_lossy(&body)))
        }
    }
}
