//! The Rampart pair in transparent mode, as in two pods: two network
//! namespaces joined by a veth pair on 10.213.251.0/24 (inside the project's
//! test range; the host's interfaces, routes and iptables are never
//! touched), `rampart init` rules in each, and a `rampart run` sidecar with
//! `transparent: {}` as UID [`PROXY_UID`] in each. The load client's threads
//! join the client namespace and connect to the server pod's real address:
//! port 8080 is captured on both sides (client -> outbound sidecar -> mTLS ->
//! inbound sidecar -> app), port 8081 is excluded from capture on both sides
//! and reaches the same app directly over the same veth (the baseline).
//! Root only; everything is removed on drop.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::apps::HttpApp;
use crate::topology::{Env, Proc, SERVER_ID, wait_admin_ready};

/// The sidecars' UID (`rampart init`'s default): its sockets are not captured.
pub const PROXY_UID: u32 = 2102;
/// The client pod's address.
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 213, 251, 2);
/// The server pod's address.
const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 213, 251, 3);
/// The app's port through the sidecars.
const MESHED_PORT: u16 = 8080;
/// The app's port around them.
const DIRECT_PORT: u16 = 8081;
/// Namespace names start with this and the harness's pid.
const PREFIX: &str = "rampart-bench-";

/// Moves the calling thread (only) into the network namespace at `path`.
pub fn enter(path: &Path) {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    // SAFETY: the fd is valid for the call; setns changes only this thread's
    // network namespace, which is why callers use threads of their own.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "setns {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// Why the transparent topology cannot run here, if it cannot.
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root (it needs network namespaces and iptables)".into());
    }
    let missing: Vec<&str> = ["ip", "iptables", "iptables-save", "setpriv"]
        .into_iter()
        .filter(|t| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect();
    (!missing.is_empty()).then(|| format!("missing tools: {}", missing.join(", ")))
}

/// Two pods with transparent sidecars; see the module documentation.
pub struct Transparent {
    /// The client pod's namespace (for the load client's threads).
    pub client_ns: PathBuf,
    /// The server pod's app around the sidecars.
    pub direct: SocketAddr,
    /// The server pod's app through the sidecars.
    pub meshed: SocketAddr,
    /// The app, serving both ports.
    pub app: HttpApp,
    // Dropped in this order: sidecars, then namespaces, then files.
    /// Client sidecar first.
    procs: Vec<Proc>,
    _namespaces: Namespaces,
    _files: tempfile::TempDir,
}

/// Deletes its namespaces (and whatever still runs inside) on drop.
struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.0 {
            remove_netns(ns);
        }
    }
}

impl Transparent {
    /// Creates the pods, installs the rules and starts the sidecars; the
    /// server's sidecar evaluates the same ALLOW policy as the loopback pair.
    pub fn start(env: &Env) -> Transparent {
        sweep_stale();
        let pid = std::process::id();
        let (cns, sns) = (
            format!("{PREFIX}{pid}-client"),
            format!("{PREFIX}{pid}-server"),
        );
        let files = proxy_readable_dir();
        let mut namespaces = Namespaces(Vec::new());
        for ns in [&cns, &sns] {
            run(Command::new("ip").args(["netns", "add", ns]));
            namespaces.0.push(ns.clone());
            run(Command::new("ip").args(["-n", ns, "link", "set", "lo", "up"]));
        }
        // The veth pair is made inside the client pod, its peer moved straight
        // into the server pod: nothing appears in the host's namespace.
        run(Command::new("ip").args([
            "-n", &cns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns",
            &sns,
        ]));
        for (ns, ip) in [(&cns, CLIENT_IP), (&sns, SERVER_IP)] {
            run(Command::new("ip").args([
                "-n",
                ns,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                "eth0",
            ]));
            run(Command::new("ip").args(["-n", ns, "link", "set", "eth0", "up"]));
        }
        let bin = env.bin();
        run(Command::new("ip")
            .args(["netns", "exec", &cns])
            .arg(bin)
            .args(["init", "--proxy-uid", &PROXY_UID.to_string()])
            .args(["--exclude-outbound-ports", &DIRECT_PORT.to_string()]));
        run(Command::new("ip")
            .args(["netns", "exec", &sns])
            .arg(bin)
            .args(["init", "--proxy-uid", &PROXY_UID.to_string()])
            .args(["--exclude-inbound-ports", &DIRECT_PORT.to_string()]));

        let server_ns = netns_path(&sns);
        let listeners = std::thread::scope(|s| {
            s.spawn(|| {
                enter(&server_ns);
                [MESHED_PORT, DIRECT_PORT].map(|p| {
                    TcpListener::bind(("0.0.0.0", p)).expect("bind the app in the server pod")
                })
            })
            .join()
            .expect("bind thread")
        });
        let app = HttpApp::serve(listeners.into());

        let dir = files.path();
        let policy = dir.join("allow.yaml");
        write_owned(&policy, &env.policy_text());
        let svid = |name: &str| {
            let d = dir.join(name);
            std::fs::create_dir(&d).expect("svid dir");
            chown(&d);
            for f in ["svid.pem", "svid.key", "bundle.pem"] {
                let bytes = std::fs::read(env.dir().join(name).join(f)).expect("read svid file");
                write_owned(&d.join(f), &String::from_utf8_lossy(&bytes));
            }
            d
        };
        let (csvid, ssvid) = (svid("client"), svid("server"));
        let client_cfg = format!(
            "transparent: {{}}\noutbound:\n  servers:\n    - {{cidrs: [\"{SERVER_IP}/32\"], identities: [\"{SERVER_ID}\"]}}\n"
        );
        let server_cfg = format!(
            "transparent: {{}}\ninbound:\n  policies: [\"{}\"]\n",
            policy.display()
        );
        let mut procs = Vec::new();
        for (ns, name, svid, body) in [
            (&cns, "client", &csvid, client_cfg),
            (&sns, "server", &ssvid, server_cfg),
        ] {
            let cfg = dir.join(format!("{name}.yaml"));
            write_owned(
                &cfg,
                &format!(
                    "identity:\n  files: {{cert: {s}/svid.pem, key: {s}/svid.key, bundle: {s}/bundle.pem}}\nadmin: {{address: \"127.0.0.1:15000\"}}\nlog: {{level: warn}}\n{body}",
                    s = svid.display()
                ),
            );
            let child = Command::new("ip")
                .args(["netns", "exec", ns, "setpriv"])
                .args([
                    format!("--reuid={PROXY_UID}"),
                    format!("--regid={PROXY_UID}"),
                    "--clear-groups".into(),
                    "--".into(),
                ])
                .arg(bin)
                .arg("run")
                .arg("--config")
                .arg(&cfg)
                .stdout(Stdio::null())
                .spawn()
                .expect("spawn a transparent sidecar");
            procs.push(Proc::new(child));
            let path = netns_path(ns);
            std::thread::scope(|s| {
                s.spawn(|| {
                    enter(&path);
                    wait_admin_ready(SocketAddr::from(([127, 0, 0, 1], 15000)));
                })
                .join()
                .expect("readiness thread")
            });
        }
        Transparent {
            client_ns: netns_path(&cns),
            direct: SocketAddr::from((SERVER_IP, DIRECT_PORT)),
            meshed: SocketAddr::from((SERVER_IP, MESHED_PORT)),
            app,
            procs,
            _namespaces: namespaces,
            _files: files,
        }
    }

    /// The sidecars' process ids, client side first.
    pub fn pids(&self) -> Vec<Vec<u32>> {
        self.procs.iter().map(|p| vec![p.id()]).collect()
    }
}

fn netns_path(ns: &str) -> PathBuf {
    Path::new("/var/run/netns").join(ns)
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run a setup command");
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A scratch directory that [`PROXY_UID`] can read (configs, SVIDs, policy).
fn proxy_readable_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::Builder::new()
        .prefix(PREFIX)
        .tempdir()
        .expect("tempdir");
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o711))
        .expect("chmod the scratch directory");
    chown(d.path());
    d
}

fn write_owned(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write a sidecar file");
    chown(path);
}

fn chown(path: &Path) {
    std::os::unix::fs::chown(path, Some(PROXY_UID), Some(PROXY_UID))
        .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
}

/// Kills whatever runs in `ns`, then deletes it. Never panics (runs in Drop).
fn remove_netns(ns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                // SAFETY: kill has no memory-safety preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    let _ = Command::new("ip").args(["netns", "del", ns]).output();
}

/// Removes the namespaces of earlier harness runs that were killed before
/// their guards ran.
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
        if !Path::new("/proc").join(pid).exists() {
            eprintln!("removing stale namespace {ns}");
            remove_netns(ns);
        }
    }
}
