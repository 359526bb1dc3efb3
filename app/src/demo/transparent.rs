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
use std::path::Path;
use std::process::{Child, Command, Stdio};

use ipnet::IpNet;
use rampart_proxy::config::{ServerRule, TransparentConfig};

use super::{
    DemoArgs, DemoError, Entries, Sidecar, VIEWER, WORKLOADS, io_error, policy_file, workload_id,
};
use crate::config::{Config, IdentityConfig, PortConfig};
use crate::netns::{Namespace, Switch};

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
    // Dropped in this order: the pods, then the switch they hang on.
    pods: Vec<(String, Namespace, Ipv4Addr)>,
    _switch: Switch,
}

impl Pods {
    /// Creates the switch and one pod per name, `.2`, `.3`, ... in order.
    pub fn new(names: &[&str]) -> Result<Pods, DemoError> {
        for ns in crate::netns::sweep_stale(PREFIX)? {
            println!("removed stale demo namespace {ns}");
        }
        let me = std::process::id();
        let switch = Switch::create(&format!("{PREFIX}{me}-switch"))?;
        let mut pods = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let host = 2 + i as u8;
            let addr = Ipv4Addr::new(10, 214, 0, host);
            let ns = Namespace::create(&format!("{PREFIX}{me}-{name}"))?;
            switch.attach(&ns, &format!("p{host}"), addr)?;
            pods.push((name.to_string(), ns, addr));
        }
        Ok(Pods {
            pods,
            _switch: switch,
        })
    }

    /// The pod's address.
    pub fn ip(&self, name: &str) -> Ipv4Addr {
        self.find(name).2
    }

    /// The pod's namespace.
    pub fn netns(&self, name: &str) -> &str {
        self.find(name).1.name()
    }

    fn find(&self, name: &str) -> &(String, Namespace, Ipv4Addr) {
        // Invariant: callers only ask for the names they created.
        self.pods
            .iter()
            .find(|p| p.0 == name)
            .expect("a pod the demo created")
    }

    /// Moves the calling thread into the pod's namespace; threads it
    /// starts afterwards (the runtime's workers) are born there too.
    pub fn enter(&self, name: &str) -> Result<(), DemoError> {
        Ok(self.find(name).1.enter()?)
    }

    /// Runs `rampart init` in the pod.
    pub fn init(&self, name: &str, bin: &Path) -> Result<(), DemoError> {
        let out = Command::new("ip")
            .args(["netns", "exec", self.netns(name)])
            .arg(bin)
            .arg("init")
            .output()
            .map_err(io_error(format!("running rampart init in {name}")))?;
        if !out.status.success() {
            return Err(DemoError::Init {
                pod: name.to_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
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
    ) -> Result<Child, DemoError> {
        let what = || format!("starting {args:?} in {name}");
        Command::new("ip")
            .args(["netns", "exec", self.netns(name), "setpriv"])
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={uid}"))
            .args(["--clear-groups", "--"])
            .arg(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).map_err(io_error(what()))?)
            .spawn()
            .map_err(io_error(what()))
    }

    /// `ip:port` in the pod.
    pub fn addr(&self, name: &str, port: u16) -> SocketAddr {
        SocketAddr::from((self.ip(name), port))
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
) -> Result<(Vec<Sidecar>, Entries, Vec<AppProc>), DemoError> {
    // A copy the other UIDs may run, whoever built or installed ours.
    let exe = dir.join("rampart");
    std::fs::copy(bin, &exe).map_err(io_error("copying the rampart binary for the pods"))?;
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
            workload_id(w),
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
                    identities: vec![workload_id(b)],
                    trust_domains: Vec::new(),
                    allow_dns_san_servers: Vec::new(),
                });
            }
        }
        let cfg = cfg.check(w)?;
        let path = dir.join(format!("{w}.yaml"));
        std::fs::write(&path, cfg.to_yaml())
            .map_err(io_error(format!("writing {}", path.display())))?;
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
