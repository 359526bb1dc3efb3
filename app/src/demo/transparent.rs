//! `rampart demo --transparent`: the same mesh, but each workload is a pod
//! (a network namespace) whose traffic `rampart init` captures, so apps use
//! real addresses and never see their sidecar. Root only.
//!
//! Layout: a bridge in a namespace of its own joins one veth per pod on
//! 10.214.0.0/24 (the tests own 10.213.0.0/16). Every namespace is named
//! `rampart-demo-<pid>-<name>`; [`Pods`] deletes them on drop, and
//! [`Pods::new`] first sweeps those of demo processes that are gone.
//! [`pod_mesh`] starts each workload in its pod; the demo itself (the
//! Workload API and the checks) runs in the sidecar-less viewer pod.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::Context;

use ipnet::IpNet;
use rampart_proxy::config::{ServerRule, TransparentConfig};

use super::{DemoArgs, Entries, Sidecar, VIEWER, WORKLOADS, policy_file, workload_id};
use crate::config::{Config, IdentityConfig, PortConfig};

/// Every namespace of the demo starts with this, then the demo's pid.
const PREFIX: &str = "rampart-demo-";
/// UID of the sidecars (the default of `rampart init --proxy-uid`).
pub const PROXY_UID: u32 = 2102;
/// UID of the apps: anything but the proxy's, so their traffic is captured.
pub const APP_UID: u32 = 2103;
/// The port every app listens on, in its own pod.
pub const APP_PORT: u16 = 8080;
/// The sidecars' admin port, reachable on the pod address (never captured).
pub const ADMIN_PORT: u16 = 15000;

/// The pods of the demo, deleted (with whatever still runs in them) on drop.
pub struct Pods {
    switch: String,
    pods: Vec<(String, String, Ipv4Addr)>,
}

impl Pods {
    /// Creates the switch and one pod per name, `.2`, `.3`, ... in order.
    pub fn new(names: &[&str]) -> anyhow::Result<Pods> {
        sweep_stale();
        let me = std::process::id();
        let switch = format!("{PREFIX}{me}-switch");
        ip(&["netns", "add", &switch])?;
        let mut pods = Pods {
            switch,
            pods: Vec::new(),
        };
        let sw = pods.switch.clone();
        ip(&["-n", &sw, "link", "set", "lo", "up"])?;
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        for (i, name) in names.iter().enumerate() {
            let host = 2 + i as u8;
            let ns = format!("{PREFIX}{me}-{name}");
            let addr = Ipv4Addr::new(10, 214, 0, host);
            ip(&["netns", "add", &ns])?;
            // From here on the guard deletes it, even if a step below fails.
            pods.pods.push((name.to_string(), ns.clone(), addr));
            let port = format!("p{host}");
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ])?;
            ip(&["-n", &sw, "link", "set", &port, "master", "br0", "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        }
        Ok(pods)
    }

    /// The pod's address.
    pub fn ip(&self, name: &str) -> Ipv4Addr {
        self.find(name).2
    }

    /// The pod's namespace.
    pub fn netns(&self, name: &str) -> &str {
        &self.find(name).1
    }

    fn find(&self, name: &str) -> &(String, String, Ipv4Addr) {
        // Invariant: callers only ask for the names they created.
        self.pods
            .iter()
            .find(|p| p.0 == name)
            .expect("a pod the demo created")
    }

    /// Moves the calling thread into the pod's namespace; threads it
    /// starts afterwards (the runtime's workers) are born there too.
    pub fn enter(&self, name: &str) -> anyhow::Result<()> {
        let path = format!("/run/netns/{}", self.netns(name));
        let f = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
        // SAFETY: setns(2) on a valid namespace fd; it only affects this thread.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setns");
        }
        Ok(())
    }

    /// Runs `rampart init` in the pod.
    pub fn init(&self, name: &str, bin: &Path) -> anyhow::Result<()> {
        let out = Command::new("ip")
            .args(["netns", "exec", self.netns(name)])
            .arg(bin)
            .arg("init")
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "rampart init in {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// Starts `bin ARGS` in the pod as `uid`, stderr to `log`.
    pub fn spawn_as(
        &self,
        name: &str,
        uid: u32,
        bin: &Path,
        args: &[&str],
        log: &Path,
    ) -> anyhow::Result<Child> {
        Command::new("ip")
            .args(["netns", "exec", self.netns(name), "setpriv"])
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={uid}"))
            .args(["--clear-groups", "--"])
            .arg(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log)?)
            .spawn()
            .with_context(|| format!("starting {args:?} in {name}"))
    }

    /// `ip:port` in the pod.
    pub fn addr(&self, name: &str, port: u16) -> SocketAddr {
        SocketAddr::from((self.ip(name), port))
    }
}

impl Drop for Pods {
    fn drop(&mut self) {
        for (_, ns, _) in self.pods.drain(..) {
            remove_netns(&ns);
        }
        remove_netns(&self.switch);
    }
}

/// A demo app process (transparent mode), killed on drop.
pub(super) struct AppProc(Child);

impl Drop for AppProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the four workloads in their pods: `rampart init`, the app as
/// [`APP_UID`], the sidecar as [`PROXY_UID`].
pub(super) fn pod_mesh(
    pods: &Pods,
    args: &DemoArgs,
    dir: &Path,
    socket: &Path,
    bin: &Path,
) -> anyhow::Result<(Vec<Sidecar>, Entries, Vec<AppProc>)> {
    // A copy the other UIDs may run, whoever built or installed ours.
    let exe = dir.join("rampart");
    std::fs::copy(bin, &exe).context("copying the rampart binary for the pods")?;
    let port = APP_PORT;
    let mut apps = Vec::new();
    let mut sidecars = Vec::new();
    let mut web = std::collections::HashMap::new();
    for w in WORKLOADS {
        let listen = format!("0.0.0.0:{port}");
        let mut app_args = vec!["demo-app".to_owned(), "--name".into(), w.into()];
        let backend_of = |web: &str| web.replace("-web", "-backend");
        if w.ends_with("-web") {
            web.insert(w, pods.addr(w, port));
            app_args.extend([
                "--kind".into(),
                "web".into(),
                "--upstream".into(),
                pods.addr(&backend_of(w), port).to_string(),
            ]);
            for b in ["ec-backend", "news-backend"] {
                app_args.extend(["--peer".into(), format!("{b}={}", pods.addr(b, port))]);
            }
        } else {
            app_args.extend(["--kind".into(), "backend".into()]);
        }
        app_args.extend(["--listen".into(), listen]);
        let app_args: Vec<&str> = app_args.iter().map(String::as_str).collect();
        pods.init(w, &exe)?;
        apps.push(AppProc(pods.spawn_as(
            w,
            APP_UID,
            &exe,
            &app_args,
            &dir.join(format!("{w}.app.log")),
        )?));

        let (policy_path, mode) = policy_file(w, dir, args.rego, &args.policy_overrides)?;
        let mut cfg = Config::new(IdentityConfig::workload_api(
            format!("unix://{}", socket.display()),
            workload_id(w)?,
        ));
        // Reachable from the viewer pod; the admin port is never captured.
        cfg.admin.address = SocketAddr::from(([0, 0, 0, 0], ADMIN_PORT));
        cfg.transparent = Some(TransparentConfig::default());
        cfg.inbound.policies = vec![policy_path];
        cfg.inbound.ports = vec![PortConfig {
            mode,
            ..PortConfig::new(port)
        }];
        if w.ends_with("-web") {
            for b in ["ec-backend", "news-backend"] {
                cfg.outbound.servers.push(ServerRule {
                    cidrs: vec![IpNet::V4(ipnet::Ipv4Net::from(pods.ip(b)))],
                    ports: vec![port],
                    identities: vec![workload_id(b)?],
                    trust_domains: Vec::new(),
                });
            }
        }
        let cfg = cfg.check(w)?;
        let path = dir.join(format!("{w}.yaml"));
        std::fs::write(&path, cfg.to_yaml())?;
        let log = dir.join(format!("{w}.log"));
        let config = path.to_string_lossy().into_owned();
        let child = pods.spawn_as(w, PROXY_UID, &exe, &["run", "--config", &config], &log)?;
        sidecars.push(Sidecar {
            name: w,
            child,
            admin: pods.addr(w, ADMIN_PORT),
            log,
        });
    }
    let entries = Entries::Pods {
        web,
        viewer_netns: pods.netns(VIEWER).to_owned(),
    };
    Ok((sidecars, entries, apps))
}

/// Whether we may build namespaces: root only.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    anyhow::ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Kills whatever runs in `ns`, then deletes it.
fn remove_netns(ns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            // The demo itself lives in the viewer pod: spare it.
            if let Ok(pid) = pid.parse::<i32>()
                && pid as u32 != std::process::id()
            {
                // SAFETY: kill(2) has no memory-safety preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    let _ = Command::new("ip").args(["netns", "del", ns]).output();
}

/// Removes the namespaces of demo runs whose process is gone (killed
/// before their guards could run).
fn sweep_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(ns) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = ns.strip_prefix(PREFIX).and_then(|r| r.split('-').next()) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            println!("removing stale demo namespace {ns}");
            remove_netns(ns);
        }
    }
}
