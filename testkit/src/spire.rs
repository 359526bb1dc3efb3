//! The real SPIRE (spire-server and spire-agent built by
//! `tests/peers/peer-spire.sh`), one trust domain per pod: a server with
//! join-token node attestation and an on-disk CA key, and a node agent with
//! the `unix` workload attestor, so that registration entries select
//! workloads by UID. Sidecars in other pods reach the agent's Workload API
//! over its Unix socket (a file, so network namespaces do not matter).
//!
//! ```ignore
//! let bins = spire::Bins::require();
//! let spire = Spire::start(net.pod("spire"), &bins, "example.org");
//! spire.register("web", "spiffe://example.org/web", 2201, 20, &[]);
//! // a sidecar running as UID 2201 with identity.workload_api.socket:
//! //   spire.endpoint()
//! ```

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::process::{self, Proc};
use crate::{Pod, TempDir};

/// The SPIRE release the tests run (tests/peers/peer-spire.sh builds it).
pub const VERSION: &str = "v1.13.3";
/// The server's agent API port inside its pod.
pub const SERVER_PORT: u16 = 8081;
/// The server's SPIFFE bundle endpoint port (`https_spiffe` profile).
pub const BUNDLE_PORT: u16 = 8443;
/// How long the server and agent get to become healthy.
const START: Duration = Duration::from_secs(30);

/// The two SPIRE binaries.
#[derive(Debug, Clone)]
pub struct Bins {
    /// spire-server.
    pub server: PathBuf,
    /// spire-agent.
    pub agent: PathBuf,
}

impl Bins {
    /// The binaries; panics when tests/peers/peer-spire.sh has not built
    /// them.
    pub fn require() -> Bins {
        Bins {
            server: crate::peers::require("spire", VERSION, "spire-server"),
            agent: crate::peers::require("spire", VERSION, "spire-agent"),
        }
    }
}

/// SPIRE for one trust domain: a server and one node agent in `pod`.
/// Both are killed on drop; `stop_*`/`start_*` restart them with the same
/// data (the server keeps its CA key and datastore, the agent its SVID).
pub struct Spire {
    pod: Pod,
    bins: Bins,
    td: String,
    dir: TempDir,
    server: Option<Proc>,
    agent: Option<Proc>,
}

impl Spire {
    /// Starts the server, mints a join token for the node
    /// `spiffe://<td>/node`, and starts the agent with it; returns once both
    /// report healthy. The agent syncs with the server every second (its
    /// `experimental.sync_interval`), so that short test SVIDs rotate
    /// promptly; everything else is SPIRE's defaults.
    pub fn start(pod: Pod, bins: &Bins, trust_domain: &str) -> Spire {
        let dir = TempDir::new();
        for sub in ["server", "agent", "sockets"] {
            std::fs::create_dir(dir.path().join(sub)).expect("create SPIRE directory");
        }
        // The sockets directory must be searchable by the workloads' UIDs.
        dir.write("sockets/.keep", "");
        let mut spire = Spire {
            pod,
            bins: bins.clone(),
            td: trust_domain.to_owned(),
            dir,
            server: None,
            agent: None,
        };
        spire.write_server_config();
        spire.start_server();
        let token = spire.cli(&["token", "generate", "-spiffeID", &spire.node_id()]);
        let token = token
            .lines()
            .find_map(|l| l.strip_prefix("Token: "))
            .unwrap_or_else(|| panic!("no token in {token:?}"))
            .trim()
            .to_owned();
        let bundle = spire.cli(&["bundle", "show"]);
        spire.dir.write("bootstrap.pem", bundle);
        spire.write_agent_config(&token);
        spire.start_agent();
        spire
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.td
    }

    /// The pod the server and agent run in.
    pub fn pod(&self) -> &Pod {
        &self.pod
    }

    /// The agent's Workload API endpoint, `unix:///...`.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.agent_socket().display())
    }

    /// The SPIFFE ID the agent's node gets (the parent of every entry).
    pub fn node_id(&self) -> String {
        format!("spiffe://{}/node", self.td)
    }

    /// Creates the registration entry `entry_id`: `spiffe_id` for
    /// processes running as `uid` on the agent's node, with X.509-SVIDs of
    /// `ttl_secs`, receiving the bundles of `federates_with` too.
    pub fn register(
        &self,
        entry_id: &str,
        spiffe_id: &str,
        uid: u32,
        ttl_secs: u32,
        federates_with: &[&str],
    ) {
        let node = self.node_id();
        let selector = format!("unix:uid:{uid}");
        let ttl = ttl_secs.to_string();
        let mut args = vec![
            "entry",
            "create",
            "-entryID",
            entry_id,
            "-parentID",
            &node,
            "-spiffeID",
            spiffe_id,
            "-selector",
            &selector,
            "-x509SVIDTTL",
            &ttl,
        ];
        let federated: Vec<String> = federates_with
            .iter()
            .map(|td| format!("spiffe://{td}"))
            .collect();
        for td in &federated {
            args.extend(["-federatesWith", td.as_str()]);
        }
        self.cli(&args);
    }

    /// Deletes registration entry `entry_id`.
    pub fn delete_entry(&self, entry_id: &str) {
        self.cli(&["entry", "delete", "-entryID", entry_id]);
    }

    /// The server's bundle in the SPIFFE bundle format (JWKS).
    pub fn spiffe_bundle(&self) -> String {
        self.cli(&["bundle", "show", "-format", "spiffe"])
    }

    /// Makes `other`'s trust domain a federated one: a federation
    /// relationship to its bundle endpoint with the `https_spiffe` profile,
    /// bootstrapped with its current bundle, then refreshed from the
    /// endpoint (which fails unless the endpoint serves and authenticates).
    pub fn federate_with(&self, other: &Spire) {
        let bundle = self
            .dir
            .write(&format!("{}.spiffe.json", other.td), other.spiffe_bundle());
        let url = format!("https://{}:{BUNDLE_PORT}", other.pod.ip());
        let endpoint_id = format!("spiffe://{}/spire/server", other.td);
        self.cli(&[
            "federation",
            "create",
            "-trustDomain",
            &other.td,
            "-bundleEndpointURL",
            &url,
            "-bundleEndpointProfile",
            "https_spiffe",
            "-endpointSpiffeID",
            &endpoint_id,
            "-trustDomainBundlePath",
            bundle.to_str().expect("UTF-8 temp path"),
            "-trustDomainBundleFormat",
            "spiffe",
        ]);
        self.cli(&["federation", "refresh", "-id", &other.td]);
    }

    /// Runs `spire-server ARGS -socketPath <admin socket>`; panics unless it
    /// succeeds; returns its stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = self.run_cli(args);
        assert!(
            out.status.success(),
            "spire-server {}: {}",
            args.join(" "),
            process::describe(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn run_cli(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(&self.bins.server);
        cmd.args(args).arg("-socketPath").arg(self.server_socket());
        process::run(cmd, Duration::from_secs(20))
    }

    /// Starts the server (again) and waits until it is healthy.
    pub fn start_server(&mut self) {
        assert!(self.server.is_none(), "spire-server is already running");
        let config = self.dir.path().join("server.conf");
        let mut proc = self.pod.spawn([
            self.bins.server.as_os_str(),
            "run".as_ref(),
            "-config".as_ref(),
            config.as_os_str(),
        ]);
        let mut healthy = || {
            let mut cmd = Command::new(&self.bins.server);
            cmd.args(["healthcheck", "-socketPath"])
                .arg(self.server_socket());
            process::run(cmd, Duration::from_secs(10)).status.success()
        };
        wait_until("spire-server healthy", START, &mut proc, &mut healthy);
        self.server = Some(proc);
    }

    /// Kills the server (SIGKILL).
    pub fn stop_server(&mut self) {
        self.server = None;
    }

    /// Starts the agent (again) and waits until it is healthy.
    pub fn start_agent(&mut self) {
        assert!(self.agent.is_none(), "spire-agent is already running");
        let config = self.dir.path().join("agent.conf");
        let mut proc = self.pod.spawn([
            self.bins.agent.as_os_str(),
            "run".as_ref(),
            "-config".as_ref(),
            config.as_os_str(),
        ]);
        let mut healthy = || {
            let mut cmd = Command::new(&self.bins.agent);
            cmd.args(["healthcheck", "-socketPath"])
                .arg(self.agent_socket());
            process::run(cmd, Duration::from_secs(10)).status.success()
        };
        wait_until("spire-agent healthy", START, &mut proc, &mut healthy);
        self.agent = Some(proc);
    }

    /// Kills the agent (SIGKILL: open Workload API streams just break).
    pub fn stop_agent(&mut self) {
        self.agent = None;
    }

    /// What the server and the agent logged so far.
    pub fn logs(&self) -> String {
        [&self.server, &self.agent]
            .into_iter()
            .flatten()
            .map(Proc::logs)
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn server_socket(&self) -> PathBuf {
        self.dir.path().join("server.sock")
    }

    fn agent_socket(&self) -> PathBuf {
        self.dir.path().join("sockets/agent.sock")
    }

    fn write_server_config(&self) {
        let d = self.dir.path();
        let config = format!(
            r#"server {{
  bind_address = "0.0.0.0"
  bind_port = "{SERVER_PORT}"
  socket_path = "{socket}"
  trust_domain = "{td}"
  data_dir = "{data}"
  log_level = "DEBUG"
  ca_key_type = "ec-p256"
  federation {{
    bundle_endpoint {{
      address = "0.0.0.0"
      port = {BUNDLE_PORT}
    }}
  }}
}}
plugins {{
  DataStore "sql" {{
    plugin_data {{
      database_type = "sqlite3"
      connection_string = "{data}/datastore.sqlite3"
    }}
  }}
  NodeAttestor "join_token" {{
    plugin_data {{}}
  }}
  KeyManager "disk" {{
    plugin_data {{
      keys_path = "{data}/keys.json"
    }}
  }}
}}
"#,
            socket = self.server_socket().display(),
            td = self.td,
            data = d.join("server").display(),
        );
        self.dir.write("server.conf", config);
    }

    fn write_agent_config(&self, token: &str) {
        let d = self.dir.path();
        let config = format!(
            r#"agent {{
  data_dir = "{data}"
  log_level = "DEBUG"
  server_address = "127.0.0.1"
  server_port = "{SERVER_PORT}"
  socket_path = "{socket}"
  trust_domain = "{td}"
  trust_bundle_path = "{bootstrap}"
  join_token = "{token}"
  experimental {{
    sync_interval = "1s"
  }}
}}
plugins {{
  NodeAttestor "join_token" {{
    plugin_data {{}}
  }}
  KeyManager "disk" {{
    plugin_data {{
      directory = "{data}"
    }}
  }}
  WorkloadAttestor "unix" {{
    plugin_data {{}}
  }}
}}
"#,
            data = d.join("agent").display(),
            socket = self.agent_socket().display(),
            td = self.td,
            bootstrap = d.join("bootstrap.pem").display(),
        );
        self.dir.write("agent.conf", config);
    }

    /// The directory holding configurations and data.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// Polls `ready` every 100 ms until it holds; panics with the process's
/// logs when it exits first or `within` passes.
fn wait_until(what: &str, within: Duration, proc: &mut Proc, ready: &mut dyn FnMut() -> bool) {
    let deadline = Instant::now() + within;
    loop {
        if ready() {
            return;
        }
        if let Some(status) = proc.try_status() {
            panic!("{what}: it exited ({status})\n{}", proc.logs());
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {within:?}\n{}",
            proc.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
