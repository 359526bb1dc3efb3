//! The Rampart pair in transparent mode, as in two pods: two pods of the
//! test kit ([`rampart_testkit::Net`]: network namespaces on a private
//! switch, inside the tests' 10.213.0.0/16; the host's interfaces, routes
//! and iptables are never touched), `rampart init` rules in each, and a
//! `rampart run` sidecar with `transparent: {}` as UID [`PROXY_UID`] in
//! each. The load client's threads join the client pod and connect to the
//! server pod's real address: port 8080 is captured on both sides (client
//! -> outbound sidecar -> mTLS -> inbound sidecar -> app), port 8081 is
//! excluded from capture on both sides and reaches the same app directly
//! over the same switch (the baseline). Root only; everything is removed on
//! drop.

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use rampart_app::config::{Config, IdentityConfig};
use rampart_proxy::config::{ServerRule, TransparentConfig};
use rampart_testkit::pki::parse_id;
use rampart_testkit::{Net, PROXY_UID, Pod, Proc};

use crate::apps::HttpApp;
use crate::topology::{Env, SERVER_ID, wait_admin_ready};

/// The app's port through the sidecars.
const MESHED_PORT: u16 = 8080;
/// The app's port around them.
const DIRECT_PORT: u16 = 8081;

/// Moves the calling thread (only) into the network namespace at `path`.
pub fn enter(path: &Path) {
    rampart_testkit::enter_netns(path);
}

/// Why the transparent topology cannot run here, if it cannot.
pub fn unavailable() -> Option<String> {
    if !rampart_testkit::is_root() {
        return Some("not running as root (it needs network namespaces and iptables)".into());
    }
    let missing: Vec<&str> = ["ip", "iptables", "iptables-save", "setpriv"]
        .into_iter()
        .filter(|t| !rampart_testkit::on_path(t))
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
    // Dropped in this order: sidecars, then pods and their switch, then files.
    /// Client sidecar first.
    procs: Vec<Proc>,
    _pods: [Pod; 2],
    _net: Net,
    _files: tempfile::TempDir,
}

impl Transparent {
    /// Creates the pods, installs the rules and starts the sidecars; the
    /// server's sidecar evaluates the same ALLOW policy as the loopback pair.
    pub fn start(env: &Env) -> Transparent {
        let net = Net::new("bench");
        let (client, server) = (net.pod("client"), net.pod("server"));
        let files = proxy_readable_dir();
        let bin = env.bin();
        for (pod, flag) in [
            (&client, "--exclude-outbound-ports"),
            (&server, "--exclude-inbound-ports"),
        ] {
            pod.exec_ok([
                bin.as_os_str(),
                "init".as_ref(),
                "--proxy-uid".as_ref(),
                PROXY_UID.to_string().as_ref(),
                flag.as_ref(),
                DIRECT_PORT.to_string().as_ref(),
            ]);
        }

        let listeners = server.in_netns(|| {
            [MESHED_PORT, DIRECT_PORT]
                .map(|p| TcpListener::bind(("0.0.0.0", p)).expect("bind the app in the server pod"))
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
        let server_ip = server.ip();
        let procs = vec![
            start_sidecar(&client, bin, dir, &csvid, |c| {
                c.outbound.servers = vec![ServerRule {
                    cidrs: vec![IpNet::from(IpAddr::V4(server_ip))],
                    ports: Vec::new(),
                    identities: vec![parse_id(SERVER_ID)],
                    trust_domains: Vec::new(),
                    allow_dns_san_servers: Vec::new(),
                }]
            }),
            start_sidecar(&server, bin, dir, &ssvid, |c| {
                c.inbound.policies = vec![policy.clone()]
            }),
        ];
        Transparent {
            client_ns: client.netns_path(),
            direct: server.addr(DIRECT_PORT),
            meshed: server.addr(MESHED_PORT),
            app,
            procs,
            _pods: [client, server],
            _net: net,
            _files: files,
        }
    }

    /// The sidecars' process ids, client side first.
    pub fn pids(&self) -> Vec<Vec<u32>> {
        self.procs.iter().map(|p| vec![p.pid()]).collect()
    }
}

/// Starts `pod`'s transparent sidecar as [`PROXY_UID`] with the SVID in
/// `svid`, its admin on the pod's loopback, and what `edit` adds; its
/// configuration is written into `dir`. Returns once it is ready.
fn start_sidecar(
    pod: &Pod,
    bin: &Path,
    dir: &Path,
    svid: &Path,
    edit: impl FnOnce(&mut Config),
) -> Proc {
    let admin = SocketAddr::from(([127, 0, 0, 1], 15000));
    let mut config = Config::new(IdentityConfig::files_in(svid));
    config.admin.address = admin;
    config.log.level = "warn".into();
    config.transparent = Some(TransparentConfig::default());
    edit(&mut config);
    let cfg = dir.join(format!("{}.yaml", pod.name()));
    write_owned(&cfg, &config.to_yaml());
    let proc = pod.spawn_as(
        PROXY_UID,
        [
            bin.as_os_str(),
            "run".as_ref(),
            "--config".as_ref(),
            cfg.as_os_str(),
        ],
    );
    pod.in_netns(move || wait_admin_ready(admin));
    proc
}

/// A scratch directory that [`PROXY_UID`] can read (configs, SVIDs, policy).
fn proxy_readable_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::Builder::new()
        .prefix("rampart-bench-")
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
