//! The `mesh` profile: direct versus Rampart, nginx and HAProxy pairs doing
//! the same mTLS hop, repetitions interleaved (A B C D A B C D ...), in
//! workloads (see [`Workload`]) that each start the topologies they need:
//! keep-alive HTTP/1.1 at fixed rates and at saturation, a fresh connection
//! per request (with and without connection reuse on the hop), 1,000 open
//! keep-alive connections, HTTP/2 and unary gRPC, and the Rampart pair in
//! transparent mode inside network namespaces (root only). Then the
//! SPIFFE-ID verification check. Writes `results.json`, `results.md` and PNG
//! plots (see `report`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::h2load::{self, Call};
use crate::load::{self, HttpConn, Load, Reuse, Run};
use crate::netns::{self, Transparent};
use crate::procstat;
use crate::report;
use crate::topology::{
    Env, Flavor, H2App, HttpApp, IMPOSTER_ID, Kind, Pair, SERVER_ID, ServerSvid,
};

/// Groups of phases, each with its own topologies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// Keep-alive HTTP/1.1 at `--rates` and at saturation over `--conns`.
    Http1,
    /// A fresh TCP connection per request at `--newconn-rate`, against the
    /// pairs as configured and against variants with no reuse on the hop.
    NewConn,
    /// `--many-conns` keep-alive connections at `--many-rate` in total, on
    /// freshly started pairs, with the proxies' RSS sampled while they are open.
    Concurrency,
    /// `GET /bench` over h2c at `--h2-rates` and at saturation.
    H2,
    /// Unary gRPC calls over h2c, same loads as `H2`.
    Grpc,
    /// The Rampart pair in transparent mode in network namespaces (root).
    Transparent,
}

impl Workload {
    /// Every workload, in the order they run.
    pub const ALL: [Workload; 6] = [
        Workload::Http1,
        Workload::NewConn,
        Workload::Concurrency,
        Workload::H2,
        Workload::Grpc,
        Workload::Transparent,
    ];

    /// Its name on the command line and in results.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Http1 => "http1",
            Workload::NewConn => "newconn",
            Workload::Concurrency => "concurrency",
            Workload::H2 => "h2",
            Workload::Grpc => "grpc",
            Workload::Transparent => "transparent",
        }
    }

    /// Parses [`Workload::name`].
    pub fn parse(s: &str) -> Option<Workload> {
        Self::ALL.into_iter().find(|w| w.name() == s)
    }
}

/// The `mesh` profile's options.
pub struct Options {
    /// Keep-alive HTTP/1.1 rates, requests/s (also the transparent mode's).
    pub rates: Vec<u64>,
    /// Keep-alive HTTP/1.1 connections at fixed rates.
    pub conns: usize,
    /// Keep-alive HTTP/1.1 connections of the closed-loop runs, one run each.
    pub sat_conns: Vec<usize>,
    /// HTTP/2 and gRPC rates.
    pub h2_rates: Vec<u64>,
    /// HTTP/2 connections.
    pub h2_conns: usize,
    /// Requests/s with a fresh connection each.
    pub newconn_rate: u64,
    /// Open connections in the concurrency workload.
    pub many_conns: usize,
    /// Their total rate.
    pub many_rate: u64,
    /// Which workloads run.
    pub only: Vec<Workload>,
    /// Length of one measured run.
    pub duration: Duration,
    /// Interleaved repetitions.
    pub reps: u32,
    /// Where results go.
    pub out: PathBuf,
    /// Fail instead of skipping nginx, HAProxy or the transparent mode when
    /// they cannot run.
    pub require_all: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            rates: vec![1_000, 5_000, 10_000],
            conns: 16,
            sat_conns: vec![1, 16, 64],
            h2_rates: vec![1_000],
            h2_conns: 4,
            newconn_rate: 500,
            many_conns: 1_000,
            many_rate: 2_000,
            only: Workload::ALL.to_vec(),
            duration: Duration::from_secs(3),
            reps: 3,
            out: PathBuf::from("bench-results"),
            require_all: false,
        }
    }
}

/// One phase's measurements for one topology, one entry per repetition.
#[derive(Default)]
pub struct Series {
    /// Latency histograms (ns).
    pub hists: Vec<Histogram<u64>>,
    /// Achieved requests/s.
    pub throughput: Vec<f64>,
    /// CPU seconds of the proxy processes per 10,000 requests.
    pub cpu_per_10k: Vec<f64>,
    /// Highest resident KiB of each side (client side first) while the
    /// run was under way, sampled every 50 ms; empty for baselines.
    pub rss_kib_by_side: Vec<Vec<u64>>,
    /// Connections (HTTP/1.1) or calls (HTTP/2) that failed.
    pub errors: u64,
}

/// One phase: the same load against each topology, the baseline first.
pub struct Phase {
    /// Its heading, such as `http1 1000 rps (16 conns)`.
    pub name: String,
    /// For file names, such as `1000rps` or `grpc-saturation`.
    pub slug: String,
    /// The workload it belongs to.
    pub workload: Workload,
    /// Whether the load was a fixed rate (not saturation).
    pub fixed_rate: bool,
    /// Per topology, the baseline (`direct`) first.
    pub series: Vec<(String, Series)>,
}

/// What a topology cost in memory, per side (client side first).
pub struct Memory {
    /// Resident KiB after start, before any request.
    pub idle_rss_kib: Vec<u64>,
    /// Peak resident KiB at the end of the workload (`VmHWM`).
    pub peak_rss_kib: Vec<u64>,
}

/// The SPIFFE-ID check: does the client side refuse a server side whose
/// valid certificate carries the wrong SPIFFE ID, before the request is sent?
pub struct Verification {
    /// The topology.
    pub topology: &'static str,
    /// Whether the request never reached the app.
    pub refused: bool,
    /// What the load client saw.
    pub client_saw: String,
}

/// Everything one `mesh` run measured.
pub struct Results {
    /// The options it ran with.
    pub opts: Options,
    /// Proxy kinds that ran (`rampart`, `nginx`, `haproxy`).
    pub kinds: Vec<&'static str>,
    /// Topologies or workloads left out, and why.
    pub skipped: Vec<(String, String)>,
    /// In the order they ran.
    pub phases: Vec<Phase>,
    /// Per pair of the keep-alive HTTP/1.1 workload.
    pub memory: Vec<(String, Memory)>,
    /// Per proxy kind.
    pub verification: Vec<Verification>,
}

/// Where one topology is driven, and whose processes to account.
struct Target {
    name: String,
    addr: SocketAddr,
    /// Process ids per side; empty for baselines.
    sides: Vec<Vec<u32>>,
    /// The network namespace the load client joins.
    netns: Option<PathBuf>,
}

impl Target {
    fn direct(name: &str, addr: SocketAddr) -> Target {
        Target {
            name: name.into(),
            addr,
            sides: Vec::new(),
            netns: None,
        }
    }

    fn pair(name: String, p: &Pair) -> Target {
        // Fail early, with a clear message, if a pair does not pass requests.
        HttpConn::open(p.entry)
            .get()
            .unwrap_or_else(|e| panic!("{name} pair does not answer: {e}"));
        Target {
            name,
            addr: p.entry,
            sides: p.sides(),
            netns: None,
        }
    }
}

/// Runs the profile and writes its outputs into `opts.out`.
pub fn run(opts: Options) {
    raise_fd_limit();
    let mut kinds = Vec::new();
    let mut skipped = Vec::new();
    for kind in [Kind::Rampart, Kind::Nginx, Kind::Haproxy] {
        match kind.available() {
            Ok(_) => kinds.push(kind),
            Err(why) if opts.require_all => {
                eprintln!(
                    "{why}, and RAMPART_REQUIRE_E2E=1 / --require-all asks for every topology"
                );
                std::process::exit(1);
            }
            Err(why) => {
                eprintln!("skipping {}: {why}", kind.name());
                skipped.push((kind.name().to_string(), why));
            }
        }
    }
    let env = Env::new();
    let has = |w: Workload| opts.only.contains(&w);
    let (d, reps) = (opts.duration, opts.reps);
    let mut phases = Vec::new();
    let mut memory = Vec::new();

    let app = HttpApp::start();
    if has(Workload::Http1) || has(Workload::NewConn) {
        let pairs = start_pairs(&env, &kinds, Flavor::Http1, app.addr);
        let idle: Vec<Vec<u64>> = pairs.iter().map(|p| rss_by_side(&p.sides())).collect();
        let mut targets = vec![Target::direct("direct", app.addr)];
        targets.extend(
            kinds
                .iter()
                .zip(&pairs)
                .map(|(k, p)| Target::pair(k.name().into(), p)),
        );
        // The L4 reference: the same sidecars with the port declared opaque.
        let opaque = kinds
            .contains(&Kind::Rampart)
            .then(|| env.rampart_opaque_pair(app.addr));
        let opaque_idle = opaque.as_ref().map(|p| rss_by_side(&p.sides()));
        let mut http1_targets: Vec<Target> = Vec::new();
        for t in &targets {
            http1_targets.push(Target {
                name: t.name.clone(),
                addr: t.addr,
                sides: t.sides.clone(),
                netns: None,
            });
            if t.name == "rampart"
                && let Some(p) = &opaque
            {
                http1_targets.push(Target::pair("rampart-opaque".into(), p));
            }
        }
        if has(Workload::Http1) {
            let loads = opts
                .rates
                .iter()
                .map(|r| (Load::Rate(*r), opts.conns, format!("{r}rps")))
                .chain(
                    opts.sat_conns
                        .iter()
                        .map(|c| (Load::Saturate, *c, format!("saturation-c{c}"))),
                );
            for (l, conns, slug) in loads {
                let name = format!("http1 {} ({conns} conns)", load_name(l));
                phases.push(run_phase(
                    &name,
                    slug,
                    Workload::Http1,
                    l,
                    &http1_targets,
                    reps,
                    |t| load::run(t.addr, l, conns, d, Reuse::KeepAlive, None),
                ));
            }
            if let (Some(p), Some(idle)) = (&opaque, &opaque_idle) {
                let peak = p
                    .sides()
                    .iter()
                    .map(|s| procstat::status_kib(s, "VmHWM"))
                    .collect();
                memory.push((
                    "rampart-opaque".to_string(),
                    Memory {
                        idle_rss_kib: idle.clone(),
                        peak_rss_kib: peak,
                    },
                ));
            }
            for ((k, p), idle) in kinds.iter().zip(&pairs).zip(idle) {
                let peak = p
                    .sides()
                    .iter()
                    .map(|s| procstat::status_kib(s, "VmHWM"))
                    .collect();
                memory.push((
                    k.name().to_string(),
                    Memory {
                        idle_rss_kib: idle,
                        peak_rss_kib: peak,
                    },
                ));
            }
        }
        if has(Workload::NewConn) {
            let nopool = start_pairs(&env, &kinds, Flavor::Http1NoPool, app.addr);
            let mut with_variants = vec![Target::direct("direct", app.addr)];
            for (i, k) in kinds.iter().enumerate() {
                with_variants.push(Target::pair(k.name().into(), &pairs[i]));
                with_variants.push(Target::pair(
                    format!("{}{}", k.name(), Flavor::Http1NoPool.suffix()),
                    &nopool[i],
                ));
            }
            let l = Load::Rate(opts.newconn_rate);
            let name = format!(
                "new connection per request, {} ({} client threads)",
                load_name(l),
                opts.conns
            );
            phases.push(run_phase(
                &name,
                format!("newconn-{}rps", opts.newconn_rate),
                Workload::NewConn,
                l,
                &with_variants,
                reps,
                |t| load::run(t.addr, l, opts.conns, d, Reuse::Fresh, None),
            ));
        }
    }

    if has(Workload::Concurrency) {
        // Fresh pairs: their RSS is start-up plus what the open connections cost.
        let pairs = start_pairs(&env, &kinds, Flavor::Http1, app.addr);
        let mut targets = vec![Target::direct("direct", app.addr)];
        targets.extend(
            kinds
                .iter()
                .zip(&pairs)
                .map(|(k, p)| Target::pair(k.name().into(), p)),
        );
        let l = Load::Rate(opts.many_rate);
        let name = format!("http1 {} over {} open conns", load_name(l), opts.many_conns);
        phases.push(run_phase(
            &name,
            format!("conns{}-{}rps", opts.many_conns, opts.many_rate),
            Workload::Concurrency,
            l,
            &targets,
            reps,
            |t| load::run(t.addr, l, opts.many_conns, d, Reuse::KeepAlive, None),
        ));
    }

    if has(Workload::H2) || has(Workload::Grpc) {
        let h2app = H2App::start();
        let pairs = start_pairs(&env, &kinds, Flavor::Http2, h2app.addr);
        let mut targets = vec![Target::direct("direct", h2app.addr)];
        for (k, p) in kinds.iter().zip(&pairs) {
            // Fail early if the pair does not pass h2 and gRPC to the app.
            let before = h2app.served.load(Ordering::SeqCst);
            check_h2(k.name(), p.entry);
            assert_eq!(
                h2app.served.load(Ordering::SeqCst),
                before + 2,
                "{} h2 pair: the request and the call did not both reach the app",
                k.name()
            );
            targets.push(Target {
                name: k.name().into(),
                addr: p.entry,
                sides: p.sides(),
                netns: None,
            });
        }
        for (w, call) in [(Workload::H2, Call::Get), (Workload::Grpc, Call::Grpc)] {
            if !has(w) {
                continue;
            }
            let loads = opts
                .h2_rates
                .iter()
                .map(|r| (Load::Rate(*r), format!("{}-{r}rps", w.name())))
                .chain([(Load::Saturate, format!("{}-saturation", w.name()))]);
            for (l, slug) in loads {
                let streams = match l {
                    Load::Rate(_) => String::new(),
                    Load::Saturate => format!(" x {} streams", h2load::SATURATION_STREAMS),
                };
                let name = format!(
                    "{} {} ({} conns{streams})",
                    w.name(),
                    load_name(l),
                    opts.h2_conns
                );
                phases.push(run_phase(&name, slug, w, l, &targets, reps, |t| {
                    h2load::run(t.addr, call, l, opts.h2_conns, d, None)
                }));
            }
        }
    }

    if has(Workload::Transparent) {
        match netns::unavailable() {
            None if kinds.contains(&Kind::Rampart) => {
                let t = Transparent::start(&env);
                let targets = [
                    Target {
                        name: "direct-netns".into(),
                        addr: t.direct,
                        sides: Vec::new(),
                        netns: Some(t.client_ns.clone()),
                    },
                    Target {
                        name: "rampart-transparent".into(),
                        addr: t.meshed,
                        sides: t.pids(),
                        netns: Some(t.client_ns.clone()),
                    },
                ];
                let ns = t.client_ns.clone();
                std::thread::scope(|s| {
                    s.spawn(|| {
                        netns::enter(&ns);
                        HttpConn::open(t.meshed)
                            .get()
                            .unwrap_or_else(|e| panic!("the transparent pair does not answer: {e}"))
                    })
                    .join()
                    .expect("transparent check")
                });
                assert_eq!(
                    t.app.served.load(Ordering::SeqCst),
                    1,
                    "through the transparent pair"
                );
                let loads = opts
                    .rates
                    .iter()
                    .map(|r| (Load::Rate(*r), format!("transparent-{r}rps")))
                    .chain([(Load::Saturate, "transparent-saturation".to_string())]);
                for (l, slug) in loads {
                    let name = format!("transparent http1 {} ({} conns)", load_name(l), opts.conns);
                    phases.push(run_phase(
                        &name,
                        slug,
                        Workload::Transparent,
                        l,
                        &targets,
                        reps,
                        |t| {
                            load::run(
                                t.addr,
                                l,
                                opts.conns,
                                d,
                                Reuse::KeepAlive,
                                t.netns.as_deref(),
                            )
                        },
                    ));
                }
            }
            None => skipped.push(("transparent".into(), "rampart is not available".into())),
            Some(why) if opts.require_all => {
                eprintln!(
                    "transparent mode: {why}, and RAMPART_REQUIRE_E2E=1 / --require-all asks for every topology"
                );
                std::process::exit(1);
            }
            Some(why) => {
                eprintln!("skipping transparent: {why}");
                skipped.push(("transparent".into(), why));
            }
        }
    }

    let verification = kinds.iter().map(|k| verify(&env, *k)).collect();
    let results = Results {
        kinds: kinds.iter().map(|k| k.name()).collect(),
        skipped,
        phases,
        memory,
        verification,
        opts,
    };
    report::write(&results);
}

fn load_name(l: Load) -> String {
    match l {
        Load::Rate(r) => format!("{r} rps"),
        Load::Saturate => "saturation".into(),
    }
}

fn start_pairs(env: &Env, kinds: &[Kind], flavor: Flavor, app: SocketAddr) -> Vec<Pair> {
    kinds
        .iter()
        .map(|k| env.pair(*k, flavor, app, ServerSvid::Genuine))
        .collect()
}

/// One `GET /bench` and one gRPC call through an h2 pair, or a panic that
/// says which failed.
fn check_h2(name: &str, addr: SocketAddr) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let mut s = h2load::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("{name} h2 pair: connect: {e}"));
        for call in [Call::Get, Call::Grpc] {
            if let Err(e) = h2load::check(&mut s, call).await {
                panic!("{name} h2 pair does not answer {call:?}: {e}");
            }
        }
    });
}

/// Runs `drive` against each target, `reps` times interleaved, accounting
/// CPU and sampling RSS of the targets' processes.
fn run_phase(
    name: &str,
    slug: String,
    workload: Workload,
    load: Load,
    targets: &[Target],
    reps: u32,
    drive: impl Fn(&Target) -> Run,
) -> Phase {
    let mut series: Vec<(String, Series)> = targets
        .iter()
        .map(|t| (t.name.clone(), Series::default()))
        .collect();
    for rep in 0..reps {
        for (i, t) in targets.iter().enumerate() {
            eprint!("\r{name}: rep {}/{reps}: {:<20}", rep + 1, t.name);
            let pids: Vec<u32> = t.sides.iter().flatten().copied().collect();
            let cpu0 = procstat::cpu_time(&pids);
            let done = AtomicBool::new(false);
            let (r, rss) = std::thread::scope(|s| {
                let sampler = s.spawn(|| {
                    let mut max = vec![0u64; t.sides.len()];
                    while !done.load(Ordering::Relaxed) {
                        for (m, now) in max.iter_mut().zip(rss_by_side(&t.sides)) {
                            *m = (*m).max(now);
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    max
                });
                let r = drive(t);
                done.store(true, Ordering::Relaxed);
                (r, sampler.join().expect("RSS sampler"))
            });
            let cpu = (procstat::cpu_time(&pids) - cpu0).as_secs_f64();
            let s = &mut series[i].1;
            s.throughput
                .push(r.completed as f64 / r.elapsed.as_secs_f64().max(1e-9));
            s.cpu_per_10k
                .push(cpu * 10_000.0 / r.completed.max(1) as f64);
            s.errors += r.errors;
            s.hists.push(r.hist);
            if !t.sides.is_empty() {
                s.rss_kib_by_side.push(rss);
            }
        }
    }
    eprintln!();
    Phase {
        name: name.to_string(),
        slug,
        workload,
        fixed_rate: matches!(load, Load::Rate(_)),
        series,
    }
}

fn rss_by_side(sides: &[Vec<u32>]) -> Vec<u64> {
    sides
        .iter()
        .map(|s| procstat::status_kib(s, "VmRSS"))
        .collect()
}

/// 1,000 connections are 2,000 descriptors in this process when the app
/// is direct; proxies started from here inherit the limit.
fn raise_fd_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    if lim.current < lim.maximum {
        // Up to the hard limit, which needs no privilege; if that fails the
        // concurrency workload reports its connection errors.
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: lim.maximum,
                maximum: lim.maximum,
            },
        );
    }
}

/// Starts a pair of `kind` whose server side presents [`IMPOSTER_ID`] while
/// the client side expects [`SERVER_ID`], and sends one request.
fn verify(env: &Env, kind: Kind) -> Verification {
    let app = HttpApp::start();
    let pair = env.http_pair(kind, app.addr, ServerSvid::Imposter);
    let client_saw = match HttpConn::try_open(pair.entry).and_then(|mut c| c.get_status()) {
        Ok(status) => format!("HTTP {status}"),
        Err(e) => format!("error: {e}"),
    };
    let served = app.served.load(Ordering::SeqCst);
    eprintln!(
        "verification: {} with server {IMPOSTER_ID} (expected {SERVER_ID}): app served {served}, client saw {client_saw}",
        kind.name()
    );
    Verification {
        topology: kind.name(),
        refused: served == 0,
        client_saw,
    }
}
