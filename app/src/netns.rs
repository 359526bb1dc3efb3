//! Pods as Linux network namespaces on a private switch: the one
//! namespace harness of the project.
//!
//! `rampart demo --transparent` (a product feature) runs its workloads in
//! such pods; the test kit's `Net`/`Pod` (tests and the benchmark harness)
//! wrap the same code with process spawning, logs and captures. It lives
//! here, in the application library, because the demo must not depend on
//! the test kit (which itself depends on this crate).
//!
//! A [`Switch`] is a Linux bridge inside a namespace of its own, so the
//! host's interfaces, routes and iptables are never touched; each pod is a
//! [`Namespace`] with `lo` up and a veth `eth0` whose peer is a port of the
//! bridge ([`Switch::attach`]). Every namespace is named `<prefix><pid>-...`
//! by its caller, so [`sweep_stale`] can remove those of runs whose process
//! is gone (killed before their guards ran). Root only ([`is_root`]).

use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where `ip netns` keeps its namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// Why a namespace step failed.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// `ip` (iproute2) could not be started.
    #[error("cannot run ip (iproute2; apt-get install iproute2): {0}")]
    IpMissing(#[source] std::io::Error),
    /// An `ip` command failed; its arguments and error output.
    #[error("ip {args}: {stderr}")]
    Ip {
        /// The arguments, space-separated.
        args: String,
        /// What `ip` printed on stderr.
        stderr: String,
    },
    /// The namespace file could not be opened or joined.
    #[error("cannot enter network namespace {}: {source}", path.display())]
    Enter {
        /// The namespace file.
        path: PathBuf,
        /// The error of `open` or `setns`.
        #[source]
        source: std::io::Error,
    },
}

/// Whether this process runs as root (namespaces and iptables need it).
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// The file of namespace `name` (what `setns` opens).
pub fn path_of(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Moves the calling thread (only) into the network namespace at `path`.
/// Threads it starts afterwards are born there too, which is why callers
/// use a thread of their own (or, like the demo, do it before building
/// their runtime).
pub fn enter(path: &Path) -> Result<(), NetnsError> {
    let enter_error = |source| NetnsError::Enter {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(enter_error)?;
    rustix::thread::move_into_link_name_space(
        file.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .map_err(|e| enter_error(e.into()))
}

/// Runs `ip ARGS` to completion; an error carries its stderr.
pub fn ip(args: &[&str]) -> Result<(), NetnsError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(NetnsError::IpMissing)?;
    if out.status.success() {
        return Ok(());
    }
    Err(NetnsError::Ip {
        args: args.join(" "),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    })
}

/// A named network namespace with `lo` up; on drop, every process inside
/// (but this one) is killed and the namespace deleted, and with it its
/// interfaces and iptables rules.
#[derive(Debug)]
pub struct Namespace {
    name: String,
}

impl Namespace {
    /// Creates namespace `name` and brings its `lo` up.
    pub fn create(name: &str) -> Result<Namespace, NetnsError> {
        ip(&["netns", "add", name])?;
        // From here on the guard deletes it, even if a step below fails.
        let ns = Namespace {
            name: name.to_owned(),
        };
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Its name (as `ip netns` lists it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its file under [`NETNS_DIR`].
    pub fn path(&self) -> PathBuf {
        path_of(&self.name)
    }

    /// Moves the calling thread into it (see [`enter`]).
    pub fn enter(&self) -> Result<(), NetnsError> {
        enter(&self.path())
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        remove(&self.name);
    }
}

/// A bridge `br0` in a namespace of its own that pods attach to.
#[derive(Debug)]
pub struct Switch {
    ns: Namespace,
}

impl Switch {
    /// Creates the switch's namespace `name` and its bridge.
    pub fn create(name: &str) -> Result<Switch, NetnsError> {
        let ns = Namespace::create(name)?;
        ip(&["-n", ns.name(), "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", ns.name(), "link", "set", "br0", "up"])?;
        Ok(Switch { ns })
    }

    /// The switch's namespace.
    pub fn namespace(&self) -> &Namespace {
        &self.ns
    }

    /// Plugs `pod` in: a veth pair made in the switch's namespace, one end
    /// the bridge port `port`, the other moved into `pod` as `eth0` with
    /// `addr/24`. Nothing appears in the host's namespace.
    pub fn attach(&self, pod: &Namespace, port: &str, addr: Ipv4Addr) -> Result<(), NetnsError> {
        let sw = self.ns.name();
        ip(&[
            "-n",
            sw,
            "link",
            "add",
            port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            pod.name(),
        ])?;
        ip(&["-n", sw, "link", "set", port, "master", "br0", "up"])?;
        ip(&[
            "-n",
            pod.name(),
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", pod.name(), "link", "set", "eth0", "up"])
    }
}

/// Kills every process inside namespace `ns` except this one (the demo
/// lives in one of its pods), then deletes it. Never fails: it runs in
/// `Drop`, and a namespace already gone is what it wants.
pub fn remove(ns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        let me = std::process::id();
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let pid = pid.parse::<u32>().ok().filter(|p| *p != me);
            if let Some(pid) = pid.and_then(|p| rustix::process::Pid::from_raw(p as i32)) {
                // Already gone (ESRCH) is fine.
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
    }
    let _ = Command::new("ip").args(["netns", "del", ns]).output();
}

/// Removes the namespaces named `<prefix><pid>-...` whose process `pid` is
/// gone; returns their names. Creates and deletes one namespace first: the
/// first `ip netns add` on a machine sets up the /run/netns mount, and
/// parallel first calls race on it.
pub fn sweep_stale(prefix: &str) -> Result<Vec<String>, NetnsError> {
    let warmup = format!("{prefix}{}-warmup", std::process::id());
    ip(&["netns", "add", &warmup])?;
    remove(&warmup);
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map_err(NetnsError::IpMissing)?;
    let mut removed = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(ns) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = ns.strip_prefix(prefix).and_then(|r| r.split('-').next()) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            remove(ns);
            removed.push(ns.to_owned());
        }
    }
    Ok(removed)
}
