//! `rampart demo`: scenario 1 of the project's scenarios (the ec and news
//! sites) on loopback, with no root and no files: a development CA issues
//! short-lived SVIDs, four small apps each sit behind their own Rampart
//! sidecar, and the scenario's requests are sent and checked. Exits 0 only
//! if every row is as expected.

mod apps;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use http::StatusCode;
use std::sync::Arc;

use rampart_identity::agent::{Agent, Registrations};
use rampart_identity::ca::DevCa;
use rampart_identity::{SpiffeId, TrustDomain};

use apps::App;

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
}

const WORKLOADS: [&str; 4] = ["ec-web", "ec-backend", "news-web", "news-backend"];
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

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
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
        // SIGTERM first, so the sidecar drains like in Kubernetes.
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
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
    path: &'static str,
    headers: Vec<(&'static str, &'static str)>,
    expect: StatusCode,
    expect_body: Option<&'static str>,
}

/// Runs the demo; returns the exit code.
pub fn run(args: DemoArgs) -> anyhow::Result<std::process::ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(demo(args))
}

async fn demo(args: DemoArgs) -> anyhow::Result<std::process::ExitCode> {
    let started = Instant::now();
    let dir = tempfile::Builder::new().prefix("rampart-demo-").tempdir()?;
    let td = TrustDomain::parse("example.org")?;
    let ca = DevCa::generate(&td, Duration::from_secs(3600))?;
    // The in-process development Workload API: every sidecar runs as our
    // UID, and picks its own SPIFFE ID among those registered for it.
    let mut registrations = Registrations::new();
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    for w in WORKLOADS {
        registrations.add(uid, SpiffeId::parse(&format!("spiffe://example.org/{w}"))?);
    }
    let socket = dir.path().join("agent.sock");
    let listener = tokio::net::UnixListener::bind(&socket)
        .with_context(|| format!("binding {}", socket.display()))?;
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
                upstream: a.outbound.context("web tier has an outbound listener")?,
            },
            _ => App::Backend { name: w },
        };
        let bound = apps::start(app).await?;
        // The app binds its own port; record it.
        addrs.get_mut(w).context("workload")?.app = bound;
    }
    // Sidecars.
    let bin = std::env::current_exe()?;
    let mut sidecars = Vec::new();
    for w in WORKLOADS {
        let cfg = sidecar_config(
            w,
            &addrs,
            dir.path(),
            &socket,
            args.rego,
            &args.policy_overrides,
        )?;
        let path = dir.path().join(format!("{w}.yaml"));
        std::fs::write(&path, cfg)?;
        let log = dir.path().join(format!("{w}.log"));
        let child = Command::new(&bin)
            .arg("run")
            .arg("--config")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting the {w} sidecar"))?;
        sidecars.push(Sidecar {
            name: w,
            child,
            admin: admin_addr(&path)?,
            log,
        });
    }
    for s in &mut sidecars {
        wait_ready(s).await?;
        println!(
            "[{:>5.1}s] {:<13} sidecar ready (spiffe://example.org/{})",
            started.elapsed().as_secs_f64(),
            s.name,
            s.name
        );
    }

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
        print_try_it(&addrs);
        tokio::signal::ctrl_c().await?;
        println!("stopping: draining sidecars");
        drop(sidecars);
        let _ = stop_agent.send(());
        let _ = agent_task.await;
        return Ok(std::process::ExitCode::SUCCESS);
    }

    let rows = rows(&addrs);
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
            outcome = apps::get(r.entry, r.path, &r.headers).await;
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

fn rows(addrs: &std::collections::HashMap<&str, Addrs>) -> Vec<Row> {
    let mut rows = Vec::new();
    for (site, other) in [("ec", "news"), ("news", "ec")] {
        let web = if site == "ec" { "ec-web" } else { "news-web" };
        let backend_body: &'static str = if site == "ec" {
            "Hi ec-backend client!"
        } else {
            "Hi news-backend client!"
        };
        let secret: &'static str = if site == "ec" {
            "ec-web-secret"
        } else {
            "news-web-secret"
        };
        let noproxy_body: &'static str = if site == "ec" {
            "Hello from ec-web"
        } else {
            "Hello from news-web"
        };
        let entry = addrs[web].inbound;
        rows.push(Row {
            request: format!("GET {web} /noproxy (secret header)"),
            caller: "viewer",
            entry,
            path: "/noproxy",
            headers: vec![("x-opa-secret", secret)],
            expect: StatusCode::OK,
            expect_body: Some(noproxy_body),
        });
        rows.push(Row {
            request: format!("GET {web} /noproxy (no header)"),
            caller: "viewer",
            entry,
            path: "/noproxy",
            headers: vec![],
            expect: StatusCode::FORBIDDEN,
            expect_body: None,
        });
        rows.push(Row {
            request: format!("GET {web} /data -> {site}-backend"),
            caller: "viewer",
            entry,
            path: "/data",
            headers: vec![("x-opa-secret", secret)],
            expect: StatusCode::OK,
            expect_body: Some(backend_body),
        });
        rows.push(Row {
            request: format!("GET {web} /admin -> {site}-backend"),
            caller: "viewer",
            entry,
            path: "/admin",
            headers: vec![("x-opa-secret", secret)],
            expect: StatusCode::FORBIDDEN,
            expect_body: None,
        });
        // The other site's web tier calling this site's backend.
        let other_web = if other == "ec" { "ec-web" } else { "news-web" };
        rows.push(Row {
            request: format!("GET {site}-backend /data"),
            caller: if other == "ec" { "ec-web" } else { "news-web" },
            entry: addrs[other_web]
                .cross
                .expect("web tiers have a cross listener"),
            path: "/data",
            headers: vec![],
            expect: StatusCode::FORBIDDEN,
            expect_body: None,
        });
    }
    rows
}

fn print_try_it(addrs: &std::collections::HashMap<&str, Addrs>) {
    let ec = addrs["ec-web"].inbound;
    let news = addrs["news-web"].inbound;
    let cross = addrs["news-web"].cross.expect("cross listener");
    println!("\nThe mesh is up. Try (Ctrl-C stops everything):");
    println!(
        "  curl -i -H 'X-Opa-Secret: ec-web-secret' http://{ec}/noproxy     # 200 from ec-web"
    );
    println!(
        "  curl -i -H 'X-Opa-Secret: ec-web-secret' http://{ec}/data        # 200 Hi ec-backend client!"
    );
    println!(
        "  curl -i http://{ec}/noproxy                                       # 403: no secret header"
    );
    println!(
        "  curl -i -H 'X-Opa-Secret: ec-web-secret' http://{ec}/admin       # 403 from ec-backend's sidecar"
    );
    println!(
        "  curl -i -H 'X-Opa-Secret: news-web-secret' http://{news}/data    # 200 Hi news-backend client!"
    );
    println!(
        "  curl -i http://{cross}/data                                       # 403: news-web may not call ec-backend"
    );
}

async fn wait_ready(s: &mut Sidecar) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok((status, _)) = apps::get(s.admin, "/ready", &[]).await
            && status == StatusCode::OK
        {
            return Ok(());
        }
        if let Ok(Some(exit)) = s.child.try_wait() {
            anyhow::bail!(
                "the {} sidecar exited ({exit}):\n{}",
                s.name,
                std::fs::read_to_string(&s.log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    anyhow::bail!("the {} sidecar did not become ready", s.name)
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

fn admin_addr(config: &Path) -> anyhow::Result<SocketAddr> {
    let text = std::fs::read_to_string(config)?;
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("admin: {address: \""))
        .context("admin address in generated config")?;
    Ok(line.trim_end_matches("\"}").parse()?)
}

fn sidecar_config(
    w: &'static str,
    addrs: &std::collections::HashMap<&str, Addrs>,
    dir: &Path,
    socket: &Path,
    rego: bool,
    overrides: &[String],
) -> anyhow::Result<String> {
    let a = &addrs[w];
    let (policy, module) = policy_text(w, rego);
    let policy_path = match overrides
        .iter()
        .find_map(|o| o.strip_prefix(w).and_then(|r| r.strip_prefix('=')))
    {
        Some(file) => std::fs::canonicalize(file)
            .with_context(|| format!("policy override for {w}: {file}"))?,
        None => {
            let p = dir.join(format!("{w}.policy.yaml"));
            std::fs::write(&p, policy)?;
            if let Some((name, text)) = module {
                std::fs::write(dir.join(name), text)?;
            }
            p
        }
    };
    let admin = free_addr()?;
    let mut cfg = format!(
        "identity:\n  workload_api: {{socket: \"unix://{}\", spiffe_id: \"spiffe://example.org/{w}\"}}\nadmin: {{address: \"{admin}\"}}\nlog: {{level: info}}\nlisteners:\n",
        socket.display()
    );
    cfg.push_str(&format!(
        "  - {{name: inbound, direction: inbound, listen: \"{}\", target: \"{}\"}}\n",
        a.inbound, a.app
    ));
    let backend_of = |web: &str| {
        if web == "ec-web" {
            "ec-backend"
        } else {
            "news-backend"
        }
    };
    if let (Some(out), Some(cross)) = (a.outbound, a.cross) {
        let mine = backend_of(w);
        let theirs = if mine == "ec-backend" {
            "news-backend"
        } else {
            "ec-backend"
        };
        cfg.push_str(&format!(
            "  - {{name: to-{mine}, direction: outbound, listen: \"{out}\", target: \"{}\", server_identities: [\"spiffe://example.org/{mine}\"]}}\n",
            addrs[mine].inbound
        ));
        cfg.push_str(&format!(
            "  - {{name: to-{theirs}, direction: outbound, listen: \"{cross}\", target: \"{}\", server_identities: [\"spiffe://example.org/{theirs}\"]}}\n",
            addrs[theirs].inbound
        ));
    }
    // Web tiers face viewers outside the mesh: their port accepts plaintext
    // (PERMISSIVE); backends accept only mTLS (STRICT).
    let mode = if w.ends_with("-web") {
        "permissive"
    } else {
        "strict"
    };
    cfg.push_str(&format!(
        "inbound:\n  policies: [\"{}\"]\n  ports:\n    - {{port: {}, mode: {mode}}}\n",
        policy_path.display(),
        a.app.port()
    ));
    Ok(cfg)
}
