//! Switches and pods: every one a network namespace of its own.
//!
//! A `Net` is a bridge inside a dedicated namespace, so the host's network
//! is never touched; each `Pod` is a namespace with `lo` up and a veth
//! `eth0` whose peer is a port of that bridge. The namespaces themselves
//! are made by [`rampart_app::netns`], which the transparent demo uses too;
//! this module adds what tests and benches need on top: processes inside a
//! pod with their logs, readiness polls and captures.

use std::ffi::OsStr;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rampart_app::netns::{self, Namespace};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use super::capture::Capture;
use super::process::{self, Proc};

/// Every namespace the DSL creates starts with this, then the pid of the
/// test process, so leftovers of dead runs can be recognised.
const PREFIX: &str = "rampart-e2e-";

/// The default time limit of [`Pod::exec`].
const EXEC_TIMEOUT: Duration = Duration::from_secs(20);

static SEQ: AtomicU32 = AtomicU32::new(0);

/// An isolated switch (a Linux bridge in a namespace of its own) that
/// pods attach to; owns one /24 of 10.213.0.0/16.
pub struct Net {
    inner: Arc<Switch>,
}

/// A pod: a network namespace with `lo` and `eth0` on a [`Net`]. Removed,
/// with every process still inside, on drop.
pub struct Pod {
    name: String,
    // Dropped before `switch`: the pod, then (if it was the last) its switch.
    ns: Namespace,
    ip: Ipv4Addr,
    switch: Arc<Switch>,
}

impl Net {
    /// Creates a switch; `name` only makes namespace names readable.
    pub fn new(name: &str) -> Net {
        sweep_stale();
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let bridge = netns::Switch::create(&unique(name, seq))
            .unwrap_or_else(|e| panic!("creating switch {name}: {e}"));
        let switch = Switch {
            // Switches are isolated from each other, so equal subnets could
            // not collide; distinct ones just keep logs unambiguous.
            octet: 1 + (seq % 254) as u8,
            bridge,
            next_host: AtomicU32::new(2),
            logs: tempfile::Builder::new()
                .prefix(&format!("{PREFIX}{}-logs-", std::process::id()))
                .tempdir()
                .expect("a temporary directory for process logs"),
        };
        Net {
            inner: Arc::new(switch),
        }
    }

    /// Creates a pod on this switch, with the next free address.
    pub fn pod(&self, name: &str) -> Pod {
        let host = self.inner.next_host.fetch_add(1, Ordering::Relaxed);
        assert!(host < 255, "too many pods on one Net");
        let ns = Namespace::create(&unique(name, SEQ.fetch_add(1, Ordering::Relaxed)))
            .unwrap_or_else(|e| panic!("creating pod {name}: {e}"));
        let ip_addr = Ipv4Addr::new(10, 213, self.inner.octet, host as u8);
        // The namespace guard cleans up if this fails.
        self.inner
            .bridge
            .attach(&ns, &format!("p{host}"), ip_addr)
            .unwrap_or_else(|e| panic!("plugging pod {name} in: {e}"));
        Pod {
            name: name.to_owned(),
            ns,
            ip: ip_addr,
            switch: self.inner.clone(),
        }
    }

    /// The switch's namespace.
    pub fn netns(&self) -> &str {
        self.inner.bridge.namespace().name()
    }
}

impl Pod {
    /// The name the test gave the pod.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The pod's network namespace (under /run/netns).
    pub fn netns(&self) -> &str {
        self.ns.name()
    }

    /// The file of the pod's network namespace (for threads that join it:
    /// [`enter_netns`]).
    pub fn netns_path(&self) -> PathBuf {
        self.ns.path()
    }

    /// The pod's address on `eth0`.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The pod's address with `port`.
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ip, port))
    }

    /// Starts `cmd` inside the pod as root; killed when the guard drops.
    pub fn spawn<I, S>(&self, cmd: I) -> Proc
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Proc::spawn(self.command(None, cmd), &self.name, self.switch.logs.path())
    }

    /// Starts `cmd` inside the pod as `uid` (group `uid`, no extra groups).
    pub fn spawn_as<I, S>(&self, uid: u32, cmd: I) -> Proc
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Proc::spawn(
            self.command(Some(uid), cmd),
            &self.name,
            self.switch.logs.path(),
        )
    }

    /// Runs `cmd` inside the pod as root to completion (panics after 20s).
    pub fn exec<I, S>(&self, cmd: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        process::run(self.command(None, cmd), EXEC_TIMEOUT)
    }

    /// Runs `cmd` inside the pod as `uid` to completion (panics after 20s).
    pub fn exec_as<I, S>(&self, uid: u32, cmd: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        process::run(self.command(Some(uid), cmd), EXEC_TIMEOUT)
    }

    /// Runs `cmd` inside the pod, asserts it succeeded, returns its stdout.
    pub fn exec_ok<I, S>(&self, cmd: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let output = self.exec(cmd);
        assert!(
            output.status.success(),
            "in pod {}: {}",
            self.name,
            process::describe(&output)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Waits until something listens on TCP `port` in the pod (any
    /// address, IPv4 or IPv6); panics when `within` has passed.
    pub fn wait_tcp_listening(&self, port: u16, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let listening = in_netns(self.ns.name(), move || {
                ["tcp", "tcp6"].iter().any(|table| {
                    std::fs::read_to_string(format!("/proc/thread-self/net/{table}"))
                        .is_ok_and(|text| listens_on(&text, port))
                })
            });
            if listening {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nothing listened on tcp port {port} in pod {} within {within:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts recording the TCP payloads to and from `tcp_port` seen on
    /// `iface` inside the pod.
    pub fn capture(&self, iface: &str, tcp_port: u16) -> Capture {
        Capture::start(self.netns_path(), iface, tcp_port)
    }

    /// Runs `f` on a thread inside the pod's network namespace (sockets it
    /// creates stay in the pod).
    pub fn in_netns<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_netns(self.ns.name(), f)
    }

    /// `GET path` on the pod's sidecar admin port (127.0.0.1:15000 inside
    /// the pod): the whole response (status line, fields and body), or None
    /// when nothing answers within 5 s.
    pub fn admin_get(&self, path: &str) -> Option<String> {
        use std::io::{Read, Write};
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        self.in_netns(move || {
            let mut c = std::net::TcpStream::connect("127.0.0.1:15000").ok()?;
            c.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            c.write_all(request.as_bytes()).ok()?;
            let mut s = String::new();
            c.read_to_string(&mut s).ok()?;
            Some(s)
        })
    }

    fn command<I, S>(&self, uid: Option<u32>, cmd: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", self.ns.name()]);
        if let Some(uid) = uid {
            command.args([
                "setpriv",
                &format!("--reuid={uid}"),
                &format!("--regid={uid}"),
                "--clear-groups",
                "--",
            ]);
        }
        command.args(cmd);
        command
    }
}

/// The switch behind a [`Net`]; the last pod or the `Net` removes it.
struct Switch {
    bridge: netns::Switch,
    octet: u8,
    next_host: AtomicU32,
    logs: tempfile::TempDir,
}

/// Runs `f` on a fresh thread that first joins namespace `ns`.
pub(crate) fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = netns::path_of(ns);
    std::thread::spawn(move || {
        enter_netns(&path);
        f()
    })
    .join()
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// Moves the calling thread (only) into the network namespace at `path`;
/// panics if it cannot.
pub fn enter_netns(path: &Path) {
    netns::enter(path).unwrap_or_else(|e| panic!("{e}"));
}

/// Whether `/proc/net/tcp{,6}` text has a listener on `port`.
fn listens_on(table: &str, port: u16) -> bool {
    const LISTEN: &str = "0A";
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() > 3
            && fields[3] == LISTEN
            && fields[1]
                .rsplit(':')
                .next()
                .and_then(|hex| u16::from_str_radix(hex, 16).ok())
                == Some(port)
    })
}

fn unique(name: &str, seq: u32) -> String {
    format!("{PREFIX}{}-{seq}-{name}", std::process::id())
}

/// Once per test process: removes the namespaces of earlier runs whose
/// process is gone (a crash or a kill skipped their Drop guards).
fn sweep_stale() {
    static SWEEP: Once = Once::new();
    SWEEP.call_once(|| {
        let removed =
            netns::sweep_stale(PREFIX).unwrap_or_else(|e| panic!("sweeping old namespaces: {e}"));
        for ns in removed {
            eprintln!("removed stale test namespace {ns}");
        }
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_listeners() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 00000000:3A99 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n   1: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 20 4 30 10 -1\n";
        assert!(super::listens_on(table, 15001));
        assert!(
            !super::listens_on(table, 8080),
            "established, not listening"
        );
    }
}
