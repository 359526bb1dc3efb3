//! Sidecars on loopback with explicit listeners, no namespaces or root:
//! configurations built as typed [`Config`] values and written by serde,
//! `rampart run` processes killed on drop, and local app processes.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rampart_app::config::{Config, IdentityConfig};
use rampart_proxy::config::{Direction as ProxyDirection, ListenerConfig};

use crate::pki::{Pki, parse_id};
use crate::rampart_bin;

/// A loopback address with a port nobody listens on (yet), never the same
/// twice in one test binary: the kernel may hand a released port out again
/// before its first taker binds it.
pub fn free_addr() -> SocketAddr {
    static TAKEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let mut taken = TAKEN.lock().unwrap();
        if !taken.contains(&addr.port()) {
            taken.push(addr.port());
            return addr;
        }
    }
}

/// Runs the CLI to completion.
pub fn rampart(args: &[&str]) -> std::process::Output {
    Command::new(rampart_bin())
        .args(args)
        .output()
        .expect("run rampart")
}

/// Sidecars on loopback: a temp dir (configurations, SVIDs, logs) and one
/// [`Pki`] for `example.org` that issues every sidecar's SVID.
pub struct Loopback {
    /// The directory (SVIDs, configurations, logs).
    pub dir: tempfile::TempDir,
    /// The CA.
    pub pki: Pki,
}

impl Default for Loopback {
    fn default() -> Self {
        Self::new()
    }
}

impl Loopback {
    /// A new directory and CA.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let pki = Pki::new("example.org");
        // Also on disk, for tests that run `rampart ca issue` themselves.
        pki.save_ca(&dir.path().join("ca"));
        Loopback { dir, pki }
    }

    /// Issues an SVID for `id` into `<dir>/<name>`.
    pub fn issue(&self, id: &str, name: &str) -> PathBuf {
        self.pki.issue_into(id, &self.dir.path().join(name))
    }

    /// The configuration of a sidecar for `id`: its SVID's files (issued
    /// now), a free admin address, debug logs; no listeners yet.
    pub fn config(&self, id: &str) -> Config {
        let name = id.rsplit('/').next().expect("a SPIFFE ID has a path");
        let svid = self.issue(id, name);
        base_config(&svid)
    }

    /// Starts a sidecar for `id` with the configuration `edit` makes of
    /// [`Loopback::config`]; returns once it is ready.
    pub fn sidecar_with(&self, id: &str, edit: impl FnOnce(&mut Config)) -> Sidecar {
        let mut cfg = self.config(id);
        edit(&mut cfg);
        let s = Sidecar::spawn(self.dir.path(), name_of(id), &cfg);
        s.wait_ready();
        s
    }

    /// Like [`Loopback::sidecar_with`], but returns as soon as the process
    /// runs, ready or not.
    pub fn sidecar_unready_with(&self, id: &str, edit: impl FnOnce(&mut Config)) -> Sidecar {
        let mut cfg = self.config(id);
        edit(&mut cfg);
        Sidecar::spawn(self.dir.path(), name_of(id), &cfg)
    }

    /// A sidecar for `id` with one outbound listener per target, each
    /// expecting the server identity `expect`, and the configuration `edit`
    /// makes of [`Loopback::config`] before the listeners are added;
    /// returns it and the listeners' addresses, in order.
    pub fn outbound_sidecar_with(
        &self,
        id: &str,
        targets: &[SocketAddr],
        expect: &str,
        edit: impl FnOnce(&mut Config),
    ) -> (Sidecar, Vec<SocketAddr>) {
        let mut cfg = self.config(id);
        edit(&mut cfg);
        let mut outs = Vec::new();
        for (i, t) in targets.iter().enumerate() {
            let out = free_addr();
            cfg.listeners
                .push(outbound_listener(&format!("out{i}"), out, *t, expect));
            outs.push(out);
        }
        let s = Sidecar::spawn(self.dir.path(), name_of(id), &cfg);
        s.wait_ready();
        (s, outs)
    }
}

/// An inbound listener `name` on `listen` in front of the app at
/// `target`; its policies and port settings see the target's port.
pub fn inbound_listener(name: &str, listen: SocketAddr, target: SocketAddr) -> ListenerConfig {
    ListenerConfig {
        name: name.to_owned(),
        direction: ProxyDirection::Inbound,
        listen,
        target: target.into(),
        port: None,
        server_identities: None,
    }
}

/// [`inbound_listener`] whose policies and port settings see `port`
/// instead of the target's (several listeners in front of one app).
pub fn inbound_listener_as(
    name: &str,
    listen: SocketAddr,
    target: SocketAddr,
    port: u16,
) -> ListenerConfig {
    ListenerConfig {
        port: Some(port),
        ..inbound_listener(name, listen, target)
    }
}

/// An outbound listener `name` on `listen` to the peer sidecar at
/// `target`, which must present the SPIFFE ID `expect`.
pub fn outbound_listener(
    name: &str,
    listen: SocketAddr,
    target: SocketAddr,
    expect: &str,
) -> ListenerConfig {
    ListenerConfig {
        name: name.to_owned(),
        direction: ProxyDirection::Outbound,
        listen,
        target: target.into(),
        port: None,
        server_identities: Some(vec![parse_id(expect)]),
    }
}

fn name_of(id: &str) -> &str {
    id.rsplit('/').next().expect("a SPIFFE ID has a path")
}

/// A sidecar configuration with the SVID files in `svid` (as
/// [`Pki::issue_into`] writes them), a free admin address and debug logs.
pub fn base_config(svid: &Path) -> Config {
    let mut cfg = Config::new(IdentityConfig::files_in(svid));
    cfg.admin.address = free_addr();
    cfg.log.level = "debug".into();
    cfg
}

/// A running sidecar, killed on drop.
pub struct Sidecar {
    child: Child,
    admin: SocketAddr,
    log: PathBuf,
    stdout: PathBuf,
}

impl Sidecar {
    /// Writes `cfg` as `<dir>/<name>.yaml` and starts `rampart run` on it;
    /// returns once it is ready.
    pub fn start(dir: &Path, name: &str, cfg: &Config) -> Sidecar {
        let s = Sidecar::spawn(dir, name, cfg);
        s.wait_ready();
        s
    }

    /// Writes `cfg` as `<dir>/<name>.yaml` and starts `rampart run` on it,
    /// without waiting.
    pub fn spawn(dir: &Path, name: &str, cfg: &Config) -> Sidecar {
        Sidecar::spawn_with_env(dir, name, cfg, &[])
    }

    /// As [`Sidecar::spawn`], with environment variables for the process
    /// (`RAMPART_APP_PROBES`, as injection sets it).
    pub fn spawn_with_env(dir: &Path, name: &str, cfg: &Config, env: &[(&str, &str)]) -> Sidecar {
        let path = dir.join(format!("{name}.yaml"));
        std::fs::write(&path, cfg.to_yaml()).unwrap();
        let log = dir.join(format!("{name}.log"));
        let stdout = dir.join(format!("{name}.sidecar.stdout"));
        let child = Command::new(rampart_bin())
            .args(["run", "--config", path.to_str().unwrap()])
            .envs(env.iter().copied())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Sidecar {
            child,
            admin: cfg.admin.address,
            log,
            stdout,
        }
    }

    /// The status of an admin GET, if it answered.
    pub fn get(&self, path: &str) -> Option<u16> {
        let mut c = TcpStream::connect(self.admin).ok()?;
        write!(
            c,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut s = String::new();
        c.read_to_string(&mut s).ok()?;
        s.split(' ').nth(1)?.parse().ok()
    }

    /// An admin request: its status and the whole response (head and body).
    pub fn admin(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        let mut c = TcpStream::connect(self.admin).unwrap();
        write!(
            c,
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut s = String::new();
        c.read_to_string(&mut s).unwrap();
        let status = s
            .split(' ')
            .nth(1)
            .and_then(|x| x.parse().ok())
            .unwrap_or(0);
        (status, s)
    }

    /// The admin listener's address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// The admin `/metrics` text.
    pub fn metrics(&self) -> String {
        let mut c = TcpStream::connect(self.admin).unwrap();
        write!(
            c,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut s = String::new();
        c.read_to_string(&mut s).unwrap();
        s
    }

    /// Waits (20 s at most) until `/ready` answers 200.
    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.get("/ready") == Some(200) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("sidecar not ready:\n{}", self.logs());
    }

    /// Its log so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// What it wrote on stdout so far (access events).
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Polls until the process has exited; its status, or `None` if it is
    /// still running after `within`.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A local process (an app), killed on drop; stdout goes to a file.
pub struct LocalProc {
    child: Child,
    stdout: PathBuf,
}

impl LocalProc {
    /// Starts `argv` with stdout captured in `dir`.
    pub fn spawn(argv: &[String], dir: &Path, name: &str) -> LocalProc {
        let stdout = dir.join(format!("{name}.stdout"));
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        LocalProc { child, stdout }
    }

    /// What it printed so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }
}

impl Drop for LocalProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls until something accepts connections on `addr`.
pub fn wait_listening(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if TcpStream::connect(addr).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nothing listening on {addr}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_addresses_are_never_handed_out_twice() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            assert!(seen.insert(free_addr().port()));
        }
    }
}
