//! `rampart demo`: scenario 1 of the project's scenarios (the ec and news
//! sites) on loopback, with no root and no files: a development CA issues
//! short-lived SVIDs, four small apps each sit behind their own Rampart
//! sidecar, and the scenario's requests are sent and checked. Exits 0 only
//! if every row is as expected. With `--transparent` (root), the same mesh
//! runs in network namespaces with captured traffic (see [`transparent`]).

mod apps;
mod transparent;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use http::StatusCode;
use std::sync::Arc;

use rampart_identity::agent::{Agent, Registrations};
use rampart_proxy::config::{Direction, ListenerConfig, TlsMode};

use crate::config::{Config, ConfigError, IdentityConfig, PortConfig};
use crate::netns::NetnsError;
use rampart_identity::ca::{CaError, DevCa};
use rampart_identity::{SpiffeId, TrustDomain};

use apps::App;
use tokio::signal::unix::{SignalKind, signal};

/// Arguments of `rampart demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Use the scenario's Rego policies (as OPA-for-Envoy users write them)
    /// instead of the native ones; the decisions must be the same.
    #[arg(long)]
    pub rego: bool,
    /// Leave the mesh running and print curl commands to try; Ctrl-C stops it.
    #[arg(long)]
    pub keep_running: bool,
    /// Replace a policy by a file of your own, as `WORKLOAD=FILE`
    /// (for example to see the demo catch a wrong policy).
    #[arg(long = "policy", value_name = "WORKLOAD=FILE")]
    pub policy_overrides: Vec<String>,
    /// Run every workload in a network namespace of its own, with
    /// `rampart init` capturing its traffic: apps use real addresses and
    /// never see their sidecar. Needs root.
    #[arg(long)]
    pub transparent: bool,
}

/// Arguments of the hidden `rampart demo-app`: one of the demo's apps as
/// a process of its own (used by `rampart demo --transparent`).
#[derive(Debug, Args)]
pub struct DemoAppArgs {
    /// `backend` or `web`.
    #[arg(long)]
    pub kind: String,
    /// The workload's name, as in the greeting.
    #[arg(long)]
    pub name: String,
    /// Address to listen on.
    #[arg(long)]
    pub listen: SocketAddr,
    /// The web tier's backend.
    #[arg(long)]
    pub upstream: Option<SocketAddr>,
    /// Other services the web tier may call on `/call/NAME/...`, as `NAME=ADDR`.
    #[arg(long = "peer", value_name = "NAME=ADDR")]
    pub peers: Vec<String>,
}

/// Why `rampart demo` could not run. A row that is not as expected is not
/// one of these: it is the verdict, and the exit code says so.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A `--policy WORKLOAD=FILE` names a file that cannot be read (the
    /// caller's fault).
    #[error("policy override for {workload}: {file}: {source}")]
    PolicyOverride {
        /// The workload it was meant for.
        workload: &'static str,
        /// The file as given.
        file: String,
        /// Why it could not be read.
        #[source]
        source: std::io::Error,
    },
    /// The pods of `--transparent` could not be made (the machine: root,
    /// iproute2).
    #[error("pods: {0}")]
    Netns(#[from] NetnsError),
    /// `rampart init` failed in a pod (the machine: iptables).
    #[error("rampart init in pod {pod}: {stderr}")]
    Init {
        /// The pod.
        pod: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// A file, socket, runtime or process of the demo's could not be made
    /// (the machine).
    #[error("{what}: {source}")]
    Io {
        /// What the demo was doing.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A sidecar did not become ready (its log says why).
    #[error(transparent)]
    NotReady(#[from] NotReady),
    /// The development CA could not be made (a bug, or no randomness).
    #[error("development CA: {0}")]
    Ca(#[from] CaError),
    /// A configuration the demo built is invalid (a bug).
    #[error("the demo built an invalid sidecar configuration (a bug):\n{0}")]
    Config(#[from] ConfigError),
}

/// Why `rampart demo-app` could not start (its arguments come from the
/// demo, so these are bugs of the caller or a busy port).
#[derive(Debug, thiserror::Error)]
pub enum DemoAppError {
    /// `--kind` is neither `backend` nor `web`.
    #[error("unknown app kind {0:?} (backend or web)")]
    UnknownKind(String),
    /// A `--peer` is not `NAME=ADDR` with a socket address.
    #[error("--peer takes NAME=ADDR (a socket address), not {0:?}")]
    BadPeer(String),
    /// A web app was started without `--upstream`.
    #[error("a web app needs --upstream")]
    NoUpstream,
    /// The runtime or the listener could not be made.
    #[error("{what}: {source}")]
    Io {
        /// What the app was doing.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// `map_err` adapter: an I/O error while doing `what`.
fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DemoError {
    let what = what.into();
    move |source| DemoError::Io { what, source }
}

/// Runs one demo app until killed.
pub fn run_app(args: DemoAppArgs) -> Result<std::process::ExitCode, DemoAppError> {
    // Leaked once per process: the app's names live as long as it does.
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    let name = leak(args.name);
    let app = match args.kind.as_str() {
        "backend" => App::Backend { name },
        "web" => {
            let mut peers = Vec::new();
            for p in args.peers {
                let peer = p
                    .split_once('=')
                    .and_then(|(n, a)| Some((n, a.parse::<SocketAddr>().ok()?)));
                let Some((n, a)) = peer else {
                    return Err(DemoAppError::BadPeer(p));
                };
                peers.push((leak(n.to_owned()), a));
            }
            App::Web {
                name,
                upstream: args.upstream.ok_or(DemoAppError::NoUpstream)?,
                peers,
            }
        }
        other => return Err(DemoAppError::UnknownKind(other.to_owned())),
    };
    let io = |what: &str| {
        let what = what.to_owned();
        move |source| DemoAppError::Io { what, source }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io("building the runtime"))?;
    rt.block_on(async {
        apps::start_on(app, args.listen)
            .await
            .map_err(io(&format!("listening on {}", args.listen)))?;
        std::future::pending::<Result<std::process::ExitCode, DemoAppError>>().await
    })
}

const WORKLOADS: [&str; 4] = ["ec-web", "ec-backend", "news-web", "news-backend"];
/// The pod the viewer requests come from in transparent mode (no sidecar).
const VIEWER: &str = "viewer";
/// SVID lifetime: short, so that rotations happen while the demo runs.
const SVID_TTL: Duration = Duration::from_secs(4);

fn policy_text(workload: &str, rego: bool) -> (&'static str, Option<(&'static str, &'static str)>) {
    // (policy file, optional (rego module name, rego module text))
    macro_rules! p {
        ($w:literal) => {
            if rego {
                (
                    include_str!(concat!("policies/", $w, ".rego.yaml")),
                    Some((
                        concat!($w, ".rego"),
                        include_str!(concat!("policies/", $w, ".rego")),
                    )),
                )
            } else {
                (include_str!(concat!("policies/", $w, ".native.yaml")), None)
            }
        };
    }
    match workload {
        "ec-web" => p!("ec-web"),
        "ec-backend" => p!("ec-backend"),
        "news-web" => p!("news-web"),
        _ => p!("news-backend"),
    }
}

/// A loopback address with a port nobody listened on when asked, never the
/// same twice in this process: the kernel may hand a released port out
/// again before its first taker binds it. (Another process may still take
/// it; [`loopback_mesh`] is then started again.)
fn free_addr() -> Result<SocketAddr, DemoError> {
    static TAKEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(io_error("picking a free loopback port"))?;
        // Poisoning needs a panic while holding the lock, which only pushes.
        let mut taken = TAKEN.lock().unwrap_or_else(|p| p.into_inner());
        if !taken.contains(&addr.port()) {
            taken.push(addr.port());
            return Ok(addr);
        }
    }
}

/// A sidecar child process, stopped on drop.
struct Sidecar {
    name: &'static str,
    child: Child,
    admin: SocketAddr,
    log: PathBuf,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        // SIGTERM first, so the sidecar drains like in Kubernetes. (An
        // error means it is gone already.)
        let pid = rustix::process::Pid::from_child(&self.child);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where each workload's sockets are.
struct Addrs {
    app: SocketAddr,
    inbound: SocketAddr,
    outbound: Option<SocketAddr>,
    /// news-web's and ec-web's extra outbound listener to the other site's backend.
    cross: Option<SocketAddr>,
}

/// One expected outcome.
struct Row {
    request: String,
    caller: &'static str,
    entry: SocketAddr,
    path: String,
    headers: Vec<(&'static str, &'static str)>,
    expect: StatusCode,
    expect_body: Option<&'static str>,
}

/// Runs the demo; returns the exit code.
pub fn run(args: DemoArgs) -> Result<std::process::ExitCode, DemoError> {
    let started = Instant::now();
    let pods = if args.transparent {
        if !crate::netns::is_root() {
            eprintln!(
                "rampart demo --transparent needs root: it creates network namespaces and iptables rules (run it with sudo, or drop --transparent for the loopback demo)"
            );
            return Ok(std::process::ExitCode::from(2));
        }
        let mut names = WORKLOADS.to_vec();
        names.push(VIEWER);
        let pods = transparent::Pods::new(&names)?;
        let listing: Vec<String> = names
            .iter()
            .map(|n| format!("{n} {}", pods.ip(n)))
            .collect();
        println!(
            "[{:>5.1}s] pods (namespaces {}*) on 10.214.0.0/24: {}",
            started.elapsed().as_secs_f64(),
            pods.netns(VIEWER).trim_end_matches(VIEWER),
            listing.join(", ")
        );
        // The checks (and the agent) run in the viewer pod, outside the
        // mesh; the runtime's workers, built below, are born there too.
        pods.enter(VIEWER)?;
        Some(pods)
    } else {
        None
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(io_error("building the runtime"))?;
    let keep_running = args.keep_running;
    let result = rt.block_on(async {
        if keep_running {
            // The demo waits for Ctrl-C itself.
            return demo(args, pods.as_ref(), started).await;
        }
        // Ctrl-C drops the demo, whose guards stop the sidecars and apps.
        let mut interrupt = signal(SignalKind::interrupt()).map_err(io_error("handling SIGINT"))?;
        tokio::select! {
            r = demo(args, pods.as_ref(), started) => r,
            _ = interrupt.recv() => {
                println!("interrupted: stopping");
                Ok(std::process::ExitCode::from(130))
            }
        }
    });
    drop(rt);
    // Namespaces last: nothing of ours runs in them any more.
    drop(pods);
    result
}

async fn demo(
    args: DemoArgs,
    pods: Option<&transparent::Pods>,
    started: Instant,
) -> Result<std::process::ExitCode, DemoError> {
    let dir = tempfile::Builder::new()
        .prefix("rampart-demo-")
        .tempdir()
        .map_err(io_error("making a temporary directory"))?;
    if pods.is_some() {
        // The sidecars run as the proxy UID and read their files here.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .map_err(io_error("opening the temporary directory to the proxy UID"))?;
    }
    let td = TrustDomain::parse("example.org").expect("a constant, valid trust domain");
    let ca = DevCa::generate(&td, Duration::from_secs(3600))?;
    // The in-process development Workload API: every sidecar runs as one
    // UID (ours on loopback, the proxy UID in pods), and picks its own
    // SPIFFE ID among those registered for it.
    let mut registrations = Registrations::new();
    let uid = match pods {
        Some(_) => transparent::PROXY_UID,
        None => rustix::process::getuid().as_raw(),
    };
    for w in WORKLOADS {
        registrations.add(uid, workload_id(w));
    }
    let socket = dir.path().join("agent.sock");
    let listener = tokio::net::UnixListener::bind(&socket)
        .map_err(io_error(format!("binding {}", socket.display())))?;
    if pods.is_some() {
        use std::os::unix::fs::PermissionsExt;
        // Sidecars as the proxy UID connect; the agent attests them by UID.
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666))
            .map_err(io_error("opening the Workload API socket to the proxy UID"))?;
    }
    let agent = Agent::new(Arc::new(ca), registrations, SVID_TTL);
    let (stop_agent, agent_stopped) = tokio::sync::oneshot::channel::<()>();
    let agent_task = tokio::spawn(agent.serve(listener, async {
        let _ = agent_stopped.await;
    }));
    println!(
        "[{:>5.1}s] development CA for {td} and Workload API on {} started; SVIDs live {}s and rotate at half-life",
        started.elapsed().as_secs_f64(),
        socket.display(),
        SVID_TTL.as_secs()
    );

    let bin = std::env::current_exe().map_err(io_error("finding the rampart executable"))?;
    let (sidecars, entries, _apps) = match pods {
        Some(pods) => {
            let (mut sidecars, entries, apps) =
                transparent::pod_mesh(pods, &args, dir.path(), &socket, &bin)?;
            for s in &mut sidecars {
                wait_ready(s).await?;
                print_ready(s, started);
            }
            (sidecars, entries, apps)
        }
        None => {
            let mut attempt = 1;
            loop {
                let (mut sidecars, entries) =
                    loopback_mesh(&args, dir.path(), &socket, &bin).await?;
                match wait_all_ready(&mut sidecars, started).await {
                    Ok(()) => break (sidecars, entries, Vec::new()),
                    // Another process took a port between our probe and the
                    // sidecar's bind: pick new ones (the mesh is all or nothing).
                    Err(NotReady::PortTaken(name)) if attempt < PORT_ATTEMPTS => {
                        println!(
                            "[{:>5.1}s] a port of the {name} sidecar was taken by another process; starting the mesh again on new ports",
                            started.elapsed().as_secs_f64()
                        );
                        attempt += 1;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
    };
    // Let every sidecar rotate its SVID once before the checks, so the
    // requests below run on rotated identities.
    let deadline = Instant::now() + SVID_TTL * 3;
    while rotations(&sidecars).await < sidecars.len() as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "[{:>5.1}s] SVIDs rotated: {} rotations across {} sidecars, traffic not yet started",
        started.elapsed().as_secs_f64(),
        rotations(&sidecars).await,
        sidecars.len()
    );

    if args.keep_running {
        // Handlers first, then the commands: whoever reads them may send
        // SIGINT at once, and it must stop the demo through its guards.
        let mut interrupt = signal(SignalKind::interrupt()).map_err(io_error("handling SIGINT"))?;
        let mut terminate =
            signal(SignalKind::terminate()).map_err(io_error("handling SIGTERM"))?;
        print_try_it(&entries);
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        println!("stopping: draining sidecars");
        drop(sidecars);
        let _ = stop_agent.send(());
        let _ = agent_task.await;
        return Ok(std::process::ExitCode::SUCCESS);
    }

    let rows = rows(&entries);
    println!();
    println!(
        "{:<44} {:<10} {:>6} {:>6} {:>9}  decided by",
        "request", "caller", "expect", "got", "latency"
    );
    let mut failures = 0;
    for r in &rows {
        let mut samples = Vec::new();
        let mut outcome = Err("not sent".to_owned());
        for _ in 0..15 {
            let t = Instant::now();
            outcome = apps::get(r.entry, &r.path, &r.headers).await;
            samples.push(t.elapsed());
        }
        samples.sort();
        let median = samples[samples.len() / 2];
        let (got, body) = match &outcome {
            Ok((s, b)) => (s.as_u16().to_string(), b.clone()),
            Err(e) => ("error".to_owned(), e.clone()),
        };
        let ok = match &outcome {
            Ok((s, b)) => *s == r.expect && r.expect_body.is_none_or(|want| b == want),
            Err(_) => false,
        };
        if !ok {
            failures += 1;
        }
        let decided = if outcome.as_ref().is_ok_and(|(s, _)| s.is_success()) {
            format!("allowed: {}", truncate(&body, 40))
        } else {
            truncate(&body, 70)
        };
        println!(
            "{:<44} {:<10} {:>6} {:>6} {:>7.2}ms  {}{}",
            r.request,
            r.caller,
            r.expect.as_u16(),
            got,
            median.as_secs_f64() * 1000.0,
            decided,
            if ok { "" } else { "   <-- NOT AS EXPECTED" }
        );
    }
    let rotations = rotations(&sidecars).await;
    println!();
    println!("SVID rotations so far: {rotations}");
    let verdict = if failures == 0 {
        println!(
            "verdict: all {} rows as expected ({} policies) in {:.1}s",
            rows.len(),
            if args.rego { "Rego" } else { "native" },
            started.elapsed().as_secs_f64()
        );
        std::process::ExitCode::SUCCESS
    } else {
        println!("verdict: {failures} of {} rows NOT as expected", rows.len());
        for s in &sidecars {
            println!("--- {} sidecar log: {}", s.name, s.log.display());
        }
        std::process::ExitCode::FAILURE
    };
    drop(sidecars);
    let _ = stop_agent.send(());
    let _ = agent_task.await;
    Ok(verdict)
}

fn truncate(s: &str, n: usize) -> String {
    let one_line: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() > n {
        format!("{}...", one_line.chars().take(n).collect::<String>())
    } else {
        one_line
    }
}

/// Where the viewer's requests enter the mesh, per mode.
enum Entries {
    /// Sidecar listeners on loopback.
    Loopback(std::collections::HashMap<&'static str, Addrs>),
    /// Pod addresses; the requests leave from the viewer pod.
    Pods {
        web: std::collections::HashMap<&'static str, SocketAddr>,
        viewer_netns: String,
    },
}

/// A request the other site's web tier makes to `backend`.
struct Cross {
    entry: SocketAddr,
    path: String,
    headers: Vec<(&'static str, &'static str)>,
}

impl Entries {
    /// Where a viewer reaches the web tier `web`.
    fn web(&self, web: &str) -> SocketAddr {
        match self {
            Entries::Loopback(addrs) => addrs[web].inbound,
            Entries::Pods { web: addrs, .. } => addrs[web],
        }
    }

    /// How to make the web tier `caller` call `backend`'s `/data`.
    fn cross(&self, caller: &'static str, backend: &str) -> Cross {
        match self {
            // The caller's own outbound listener to the other backend.
            Entries::Loopback(addrs) => Cross {
                entry: addrs[caller]
                    .cross
                    .expect("web tiers have a cross listener"),
                path: "/data".to_owned(),
                headers: vec![],
            },
            // The caller's app, asked by a viewer to call the backend at
            // its real address; its sidecar captures that call.
            Entries::Pods { web, .. } => Cross {
                entry: web[caller],
                path: format!("/call/{backend}/data"),
                headers: vec![("x-opa-secret", secret_of(caller))],
            },
        }
    }

    /// What to put before `curl` to send from where the viewer is.
    fn curl_prefix(&self) -> String {
        match self {
            Entries::Loopback(_) => String::new(),
            Entries::Pods { viewer_netns, .. } => format!("ip netns exec {viewer_netns} "),
        }
    }
}

fn secret_of(web: &str) -> &'static str {
    if web == "ec-web" {
        "ec-web-secret"
    } else {
        "news-web-secret"
    }
}

fn rows(entries: &Entries) -> Vec<Row> {
    let mut rows = Vec::new();
    for (site, other) in [("ec", "news"), ("news", "ec")] {
        let web = if site == "ec" { "ec-web" } else { "news-web" };
        let backend_body: &'static str = if site == "ec" {
            "Hi ec-backend client!"
        } else {
            "Hi news-backend client!"
        };
        let secret = secret_of(web);
        let noproxy_body: &'static str = if site == "ec" {
            "Hello from ec-web"
        } else {
            "Hello from news-web"
        };
        let entry = entries.web(web);
        rows.push(Row {
            request: format!("GET {web} /noproxy (secret header)"),
            caller: "viewer",
            entry,
            path: "/noproxy".to_owned(),
            headers: vec![("x-opa-secret", secret)],
            expect: StatusCode::OK,
            expect_body: Some(noproxy_body),
        });
        rows.push(Row {
            request: format!("GET {web} /noproxy (no header)"),
            caller: "viewer",
            entry,
            path: "/noproxy".to_owned(),
            headers: vec![],
            expect: StatusCode::FORBIDDEN,
            expect_body: None,
        });
        rows.push(Row {
            request: format!("GET {web} /data -> {site}-backend"),
            caller: "viewer",
            entry,
            path: "/data".to_owned(),
            headers: vec![("x-opa-secret", secret)],
            expect: StatusCode::OK,
            expect_body: Some(backend_body),
        });
        rows.push(Row {
            request: format!("GET {web} /admin -> {site}-backend"),
            caller: "viewer",
            entry,
            path: "/admin".to_owned(),
            headers: vec![("x-opa-secret", secret)],
            expect: StatusCode::FORBIDDEN,
            expect_body: None,
        });
        // The other site's web tier calling this site's backend.
        let other_web = if other == "ec" { "ec-web" } else { "news-web" };
        let cross = entries.cross(other_web, &format!("{site}-backend"));
        rows.push(Row {
            request: format!("GET {site}-backend /data"),
            caller: other_web,
            entry: cross.entry,
            path: cross.path,
            headers: cross.headers,
            expect: StatusCode::FORBIDDEN,
            expect_body: None,
        });
    }
    rows
}

fn print_try_it(entries: &Entries) {
    let pre = entries.curl_prefix();
    let ec = entries.web("ec-web");
    let news = entries.web("news-web");
    let cross = entries.cross("news-web", "ec-backend");
    let cross_headers: String = cross
        .headers
        .iter()
        .map(|(k, v)| format!("-H '{k}: {v}' "))
        .collect();
    println!("\nThe mesh is up. Try (Ctrl-C stops everything):");
    println!(
        "  {pre}curl -i -H 'X-Opa-Secret: ec-web-secret' http://{ec}/noproxy     # 200 from ec-web"
    );
    println!(
        "  {pre}curl -i -H 'X-Opa-Secret: ec-web-secret' http://{ec}/data        # 200 Hi ec-backend client!"
    );
    println!("  {pre}curl -i http://{ec}/noproxy          # 403: no secret header");
    println!(
        "  {pre}curl -i -H 'X-Opa-Secret: ec-web-secret' http://{ec}/admin       # 403 from ec-backend's sidecar"
    );
    println!(
        "  {pre}curl -i -H 'X-Opa-Secret: news-web-secret' http://{news}/data    # 200 Hi news-backend client!"
    );
    println!(
        "  {pre}curl -i {cross_headers}http://{}{}    # 403: news-web may not call ec-backend",
        cross.entry, cross.path
    );
}

/// Writes (or picks, when overridden) `w`'s policy; returns its path and
/// the port mode: web tiers face viewers outside the mesh, so their port
/// accepts plaintext (PERMISSIVE); backends accept only mTLS (STRICT).
fn policy_file(
    w: &'static str,
    dir: &Path,
    rego: bool,
    overrides: &[String],
) -> Result<(PathBuf, TlsMode), DemoError> {
    let (policy, module) = policy_text(w, rego);
    let path = match overrides
        .iter()
        .find_map(|o| o.strip_prefix(w).and_then(|r| r.strip_prefix('=')))
    {
        Some(file) => std::fs::canonicalize(file).map_err(|source| DemoError::PolicyOverride {
            workload: w,
            file: file.to_owned(),
            source,
        })?,
        None => {
            let p = dir.join(format!("{w}.policy.yaml"));
            std::fs::write(&p, policy).map_err(io_error(format!("writing {}", p.display())))?;
            if let Some((name, text)) = module {
                std::fs::write(dir.join(name), text)
                    .map_err(io_error(format!("writing the Rego module {name}")))?;
            }
            p
        }
    };
    let mode = if w.ends_with("-web") {
        TlsMode::PermissiveAllowPlaintext
    } else {
        TlsMode::Strict
    };
    Ok((path, mode))
}

/// How many times the loopback mesh is started on fresh ports when one was
/// taken by another process.
const PORT_ATTEMPTS: u32 = 3;

/// Starts the loopback mesh: the four apps in process, then their sidecars
/// as `rampart run` processes on free loopback ports (not yet ready).
async fn loopback_mesh(
    args: &DemoArgs,
    dir: &Path,
    socket: &Path,
    bin: &Path,
) -> Result<(Vec<Sidecar>, Entries), DemoError> {
    // Addresses first: sidecars and apps refer to each other.
    let mut addrs = std::collections::HashMap::new();
    for w in WORKLOADS {
        let web = w.ends_with("-web");
        addrs.insert(
            w,
            Addrs {
                app: free_addr()?,
                inbound: free_addr()?,
                outbound: if web { Some(free_addr()?) } else { None },
                cross: if web { Some(free_addr()?) } else { None },
            },
        );
    }
    // Apps.
    for w in WORKLOADS {
        let a = &addrs[w];
        let app = match w {
            "ec-web" | "news-web" => App::Web {
                name: w,
                upstream: a.outbound.expect("web tiers have an outbound listener"),
                peers: Vec::new(),
            },
            _ => App::Backend { name: w },
        };
        let bound = apps::start(app)
            .await
            .map_err(io_error(format!("starting the {w} app")))?;
        // The app binds its own port; record it.
        if let Some(a) = addrs.get_mut(w) {
            a.app = bound;
        }
    }
    // Sidecars.
    let mut sidecars = Vec::new();
    for w in WORKLOADS {
        let cfg = sidecar_config(w, &addrs, dir, socket, args.rego, &args.policy_overrides)?;
        let admin = cfg.admin.address;
        let path = dir.join(format!("{w}.yaml"));
        std::fs::write(&path, cfg.to_yaml())
            .map_err(io_error(format!("writing {}", path.display())))?;
        let log = dir.join(format!("{w}.log"));
        let child = Command::new(bin)
            .arg("run")
            .arg("--config")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(&log)
                    .map_err(io_error(format!("creating {}", log.display())))?,
            )
            .spawn()
            .map_err(io_error(format!("starting the {w} sidecar")))?;
        sidecars.push(Sidecar {
            name: w,
            child,
            admin,
            log,
        });
    }
    Ok((sidecars, Entries::Loopback(addrs)))
}

/// Why a sidecar did not become ready.
#[derive(Debug, thiserror::Error)]
pub enum NotReady {
    /// It exited because one of its ports was in use.
    #[error("the {0} sidecar could not bind a port: it is in use")]
    PortTaken(&'static str),
    /// It exited for another reason; its log.
    #[error("the {0} sidecar exited ({1}):\n{2}")]
    Exited(&'static str, std::process::ExitStatus, String),
    /// It was still not ready at the deadline.
    #[error("the {0} sidecar did not become ready within {1:?}")]
    Timeout(&'static str, Duration),
}

async fn wait_all_ready(sidecars: &mut [Sidecar], started: Instant) -> Result<(), NotReady> {
    for s in sidecars {
        wait_ready(s).await?;
        print_ready(s, started);
    }
    Ok(())
}

fn print_ready(s: &Sidecar, started: Instant) {
    println!(
        "[{:>5.1}s] {:<13} sidecar ready (spiffe://example.org/{})",
        started.elapsed().as_secs_f64(),
        s.name,
        s.name
    );
}

/// Polls the sidecar's `/ready` until it answers 200 (20 s at most),
/// watching for an early exit.
async fn wait_ready(s: &mut Sidecar) -> Result<(), NotReady> {
    const LIMIT: Duration = Duration::from_secs(20);
    let deadline = Instant::now() + LIMIT;
    while Instant::now() < deadline {
        if let Ok((status, _)) = apps::get(s.admin, "/ready", &[]).await
            && status == StatusCode::OK
        {
            return Ok(());
        }
        if let Ok(Some(exit)) = s.child.try_wait() {
            let log = std::fs::read_to_string(&s.log).unwrap_or_default();
            if log.contains("Address already in use") {
                return Err(NotReady::PortTaken(s.name));
            }
            return Err(NotReady::Exited(s.name, exit, log));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Err(NotReady::Timeout(s.name, LIMIT))
}

async fn rotations(sidecars: &[Sidecar]) -> u64 {
    let mut total = 0;
    for s in sidecars {
        if let Ok((_, body)) = apps::get(s.admin, "/metrics", &[]).await {
            for line in body.lines() {
                if line.starts_with("rampart_identity_rotations_total")
                    && let Some(v) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok())
                {
                    total += v as u64;
                }
            }
        }
    }
    total
}

/// The typed configuration of `w`'s sidecar on loopback: the Workload API
/// identity, an inbound listener in front of its app, and for a web tier
/// one outbound listener to each site's backend.
fn sidecar_config(
    w: &'static str,
    addrs: &std::collections::HashMap<&str, Addrs>,
    dir: &Path,
    socket: &Path,
    rego: bool,
    overrides: &[String],
) -> Result<Config, DemoError> {
    let a = &addrs[w];
    let (policy_path, mode) = policy_file(w, dir, rego, overrides)?;
    let mut cfg = Config::new(IdentityConfig::workload_api(
        format!("unix://{}", socket.display()),
        workload_id(w),
    ));
    cfg.admin.address = free_addr()?;
    cfg.listeners.push(ListenerConfig {
        name: "inbound".into(),
        direction: Direction::Inbound,
        listen: a.inbound,
        target: a.app.into(),
        port: None,
        server_identities: None,
    });
    if let (Some(out), Some(cross)) = (a.outbound, a.cross) {
        let mine = if w == "ec-web" {
            "ec-backend"
        } else {
            "news-backend"
        };
        let theirs = if mine == "ec-backend" {
            "news-backend"
        } else {
            "ec-backend"
        };
        for (backend, listen) in [(mine, out), (theirs, cross)] {
            cfg.listeners.push(ListenerConfig {
                name: format!("to-{backend}"),
                direction: Direction::Outbound,
                listen,
                target: addrs[backend].inbound.into(),
                port: None,
                server_identities: Some(vec![workload_id(backend)]),
            });
        }
    }
    cfg.inbound.policies = vec![policy_path];
    cfg.inbound.ports = vec![PortConfig {
        mode,
        ..PortConfig::new(a.app.port())
    }];
    Ok(cfg.check(w)?)
}

/// The SPIFFE ID of one of the demo's [`WORKLOADS`] (or the viewer).
fn workload_id(w: &str) -> SpiffeId {
    SpiffeId::parse(&format!("spiffe://example.org/{w}"))
        .expect("the demo's workload names are valid SPIFFE ID path segments")
}
