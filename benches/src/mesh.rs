//! The `mesh` profile: direct versus Rampart, nginx and HAProxy pairs doing
//! the same mTLS hop, under open-loop constant-rate load and closed-loop
//! saturation, repetitions interleaved (A B C D A B C D ...), plus the
//! SPIFFE-ID verification check. Writes `results.json`, `results.md` and
//! PNG plots (see `report`).

use std::path::PathBuf;
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::load::{self, HttpConn, Load};
use crate::procstat;
use crate::report;
use crate::topology::{Env, HttpApp, IMPOSTER_ID, Kind, SERVER_ID, ServerSvid};

/// The `mesh` profile's options.
pub struct Options {
    /// Fixed rates, requests/s.
    pub rates: Vec<u64>,
    /// Connections for every phase.
    pub conns: usize,
    /// Length of one measured run.
    pub duration: Duration,
    /// Interleaved repetitions.
    pub reps: u32,
    /// Where results go.
    pub out: PathBuf,
    /// Fail instead of skipping nginx or HAProxy when missing.
    pub require_all: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            rates: vec![1_000, 5_000],
            conns: 16,
            duration: Duration::from_secs(5),
            reps: 3,
            out: PathBuf::from("bench-results"),
            require_all: false,
        }
    }
}

/// One phase's measurements for one topology, one entry per repetition.
pub struct Series {
    /// Latency histograms (ns).
    pub hists: Vec<Histogram<u64>>,
    /// Achieved requests/s.
    pub throughput: Vec<f64>,
    /// CPU seconds of the proxy processes per 10,000 requests.
    pub cpu_per_10k: Vec<f64>,
    /// Connections that failed.
    pub errors: u64,
}

/// What a topology cost in memory.
pub struct Memory {
    /// Resident KiB after start, before any request (both sides).
    pub idle_rss_kib: u64,
    /// Peak resident KiB at the end of the run (both sides).
    pub peak_rss_kib: u64,
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
    /// Topology names, `direct` first.
    pub topologies: Vec<&'static str>,
    /// Topologies left out, and why.
    pub skipped: Vec<(&'static str, String)>,
    /// Phase names (`1000 rps`, ..., `saturation`), and per topology a series.
    pub phases: Vec<(String, Vec<Series>)>,
    /// Per proxy topology (not `direct`).
    pub memory: Vec<(&'static str, Memory)>,
    /// Per proxy topology.
    pub verification: Vec<Verification>,
}

/// Runs the profile and writes its outputs into `opts.out`.
pub fn run(opts: Options) {
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
                skipped.push((kind.name(), why));
            }
        }
    }
    let env = Env::new();
    let app = HttpApp::start();
    let pairs: Vec<_> = kinds
        .iter()
        .map(|k| env.http_pair(*k, app.addr, ServerSvid::Genuine))
        .collect();
    let idle: Vec<u64> = pairs
        .iter()
        .map(|p| procstat::status_kib(&p.pids(), "VmRSS"))
        .collect();
    let mut targets = vec![("direct", app.addr, Vec::new())];
    for (k, p) in kinds.iter().zip(&pairs) {
        // Fail early, with a clear message, if a pair does not pass requests.
        HttpConn::open(p.entry)
            .get()
            .unwrap_or_else(|e| panic!("{} pair does not answer: {e}", k.name()));
        targets.push((k.name(), p.entry, p.pids()));
    }

    let loads: Vec<(String, Load)> = opts
        .rates
        .iter()
        .map(|r| (format!("{r} rps"), Load::Rate(*r)))
        .chain([(format!("saturation ({} conns)", opts.conns), Load::Saturate)])
        .collect();
    let mut phases = Vec::new();
    for (phase, load) in &loads {
        let mut series: Vec<Series> = targets
            .iter()
            .map(|_| Series {
                hists: Vec::new(),
                throughput: Vec::new(),
                cpu_per_10k: Vec::new(),
                errors: 0,
            })
            .collect();
        for rep in 0..opts.reps {
            for (i, (name, addr, pids)) in targets.iter().enumerate() {
                eprint!("\r{phase}: rep {}/{}: {name:<8}", rep + 1, opts.reps);
                let cpu0 = procstat::cpu_time(pids);
                let r = load::run(*addr, *load, opts.conns, opts.duration);
                let cpu = (procstat::cpu_time(pids) - cpu0).as_secs_f64();
                let s = &mut series[i];
                s.throughput
                    .push(r.completed as f64 / r.elapsed.as_secs_f64().max(1e-9));
                s.cpu_per_10k
                    .push(cpu * 10_000.0 / r.completed.max(1) as f64);
                s.errors += r.errors;
                s.hists.push(r.hist);
            }
        }
        eprintln!();
        phases.push((phase.clone(), series));
    }
    let memory = kinds
        .iter()
        .zip(&pairs)
        .zip(idle)
        .map(|((k, p), idle_rss_kib)| {
            let peak_rss_kib = procstat::status_kib(&p.pids(), "VmHWM");
            (
                k.name(),
                Memory {
                    idle_rss_kib,
                    peak_rss_kib,
                },
            )
        })
        .collect();
    drop(pairs);

    let verification = kinds.iter().map(|k| verify(&env, *k)).collect();
    let results = Results {
        topologies: targets.iter().map(|t| t.0).collect(),
        skipped,
        phases,
        memory,
        verification,
        opts,
    };
    report::write(&results);
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
    let served = app.served.load(std::sync::atomic::Ordering::SeqCst);
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
