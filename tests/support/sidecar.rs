//! Sidecars on loopback with explicit listeners, no namespaces or root:
//! a PKI made by the real CLI, `rampart run` processes killed on drop, and
//! local app processes.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::rampart_bin;

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

/// A PKI in a temp dir: one CA and SVIDs issued by the real CLI.
pub struct Pki {
    /// The directory (CA, SVIDs, configurations, logs).
    pub dir: tempfile::TempDir,
}

impl Pki {
    /// A new CA.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        let out = rampart(&["ca", "init", "--dir", ca.to_str().unwrap()]);
        assert!(out.status.success(), "{out:?}");
        Pki { dir }
    }

    /// Issues an SVID for `id` into `<dir>/<name>`.
    pub fn issue(&self, id: &str, name: &str) -> PathBuf {
        let out_dir = self.dir.path().join(name);
        let ca = self.dir.path().join("ca");
        let out = rampart(&[
            "ca",
            "issue",
            "--dir",
            ca.to_str().unwrap(),
            "--spiffe-id",
            id,
            "--out",
            out_dir.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{out:?}");
        out_dir
    }

    /// Issues an SVID for `id` and starts a sidecar with it; `body` is the
    /// configuration after `identity`, `admin` and `log` (unless `body` has
    /// its own `log:` line).
    pub fn sidecar(&self, id: &str, body: &str) -> Sidecar {
        let s = self.sidecar_unready(id, body);
        s.wait_ready();
        s
    }

    /// A sidecar for `id` with one outbound listener per target, each
    /// expecting the server identity `expect`, then `extra` configuration;
    /// returns it and the listeners' addresses, in order.
    pub fn outbound_sidecar(
        &self,
        id: &str,
        targets: &[SocketAddr],
        expect: &str,
        extra: &str,
    ) -> (Sidecar, Vec<SocketAddr>) {
        let mut body = String::from("listeners:\n");
        let mut outs = Vec::new();
        for (i, t) in targets.iter().enumerate() {
            let out = free_addr();
            body.push_str(&format!(
                "  - {{name: out{i}, direction: outbound, listen: \"{out}\", target: \"{t}\", server_identities: [\"{expect}\"]}}\n"
            ));
            outs.push(out);
        }
        body.push_str(extra);
        (self.sidecar(id, &body), outs)
    }

    /// Like [`Pki::sidecar`], but returns as soon as the process runs,
    /// ready or not.
    pub fn sidecar_unready(&self, id: &str, body: &str) -> Sidecar {
        let name = id.rsplit('/').next().unwrap();
        let svid = self.issue(id, name);
        Sidecar::spawn(self.dir.path(), name, &svid, body)
    }
}

/// A running sidecar, killed on drop.
pub struct Sidecar {
    child: Child,
    admin: SocketAddr,
    log: PathBuf,
    stdout: PathBuf,
}

impl Sidecar {
    /// Writes its configuration and starts it; returns once it is ready.
    pub fn start(dir: &Path, name: &str, svid: &Path, body: &str) -> Sidecar {
        let s = Sidecar::spawn(dir, name, svid, body);
        s.wait_ready();
        s
    }

    /// Writes its configuration and starts it, without waiting.
    pub fn spawn(dir: &Path, name: &str, svid: &Path, body: &str) -> Sidecar {
        Sidecar::spawn_with_env(dir, name, svid, body, &[])
    }

    /// As [`Sidecar::spawn`], with environment variables for the process
    /// (`RAMPART_APP_PROBES`, as injection sets it).
    pub fn spawn_with_env(
        dir: &Path,
        name: &str,
        svid: &Path,
        body: &str,
        env: &[(&str, &str)],
    ) -> Sidecar {
        let admin = free_addr();
        // A body with its own `admin: {...}` line gets the address added to it.
        let (admin_line, body) = if body.lines().any(|l| l.starts_with("admin: {")) {
            (
                String::new(),
                body.replace("admin: {", &format!("admin: {{address: \"{admin}\", ")),
            )
        } else {
            (
                format!("admin: {{address: \"{admin}\"}}\n"),
                body.to_owned(),
            )
        };
        let cfg = format!(
            "identity:\n  files: {{cert: {s}/svid.pem, key: {s}/svid.key, bundle: {s}/bundle.pem}}\n{admin_line}{log}{body}",
            s = svid.display(),
            // A body with its own `log` section replaces the default one.
            log = if body.lines().any(|l| l.starts_with("log:")) {
                ""
            } else {
                "log: {level: debug}\n"
            },
        );
        let path = dir.join(format!("{name}.yaml"));
        std::fs::write(&path, cfg).unwrap();
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
            admin,
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
