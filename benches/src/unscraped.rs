//! `rampart-bench unscraped`: memory with nobody scraping `/metrics`
//! (issue 19, R2). A Rampart HTTP pair carries a fixed open-loop rate for
//! `--minutes`; the sidecars' RSS is sampled every 10 s and never a byte
//! is read from their admin API. Before the recorder's upkeep ran on a
//! timer, histogram samples piled up until a scrape (~19 bytes a request);
//! the run reports RSS at minute 2 and at the end, per side.

use std::time::{Duration, Instant};

use crate::load::{self, Load, Reuse};
use crate::{procstat, topology};

/// What to run.
pub struct Options {
    /// How long, in minutes.
    pub minutes: f64,
    /// Requests per second in total.
    pub rate: u64,
    /// Keep-alive client connections.
    pub conns: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            minutes: 30.0,
            rate: 2000,
            conns: 16,
        }
    }
}

/// Runs it and prints a Markdown table on stdout (progress on stderr).
pub fn run(o: &Options) {
    let env = topology::Env::new();
    let app = topology::HttpApp::start();
    let mesh = env.rampart_http_pair(app.addr);
    let total = Duration::from_secs_f64(o.minutes * 60.0);
    let sides = mesh.sides();
    let rss = |i: usize| procstat::status_kib(&sides[i], "VmRSS");
    let (entry, rate, conns) = (mesh.entry, o.rate, o.conns);
    let load = std::thread::spawn(move || {
        load::run(
            entry,
            Load::Rate(rate),
            conns,
            total,
            Reuse::KeepAlive,
            None,
        )
    });
    let start = Instant::now();
    let load_at_start = loadavg();
    let at_start = [rss(0), rss(1)];
    let mut at_two: Option<[u64; 2]> = None;
    let mut samples = Vec::new();
    while !load.is_finished() {
        std::thread::sleep(Duration::from_secs(10));
        let now = [rss(0), rss(1)];
        let t = start.elapsed();
        eprintln!(
            "{:>6.1} min: client side {} KiB, server side {} KiB",
            t.as_secs_f64() / 60.0,
            now[0],
            now[1]
        );
        if at_two.is_none() && t >= Duration::from_secs(120) {
            at_two = Some(now);
        }
        samples.push((t, now));
    }
    let run = load.join().expect("the load thread");
    let end = samples.last().map(|s| s.1).unwrap_or(at_start);
    println!(
        "# {:.1} min at {} req/s over {} keep-alive connections, /metrics never scraped",
        o.minutes, o.rate, o.conns
    );
    println!(
        "# {} requests answered, {} failed connections, p99 {:.2} ms",
        run.completed,
        run.errors,
        run.hist.value_at_quantile(0.99) as f64 / 1e6
    );
    // The machine's load, since RSS and p99 mean little on a busy host.
    println!(
        "# load average (1/5/15 min) at start {load_at_start}, at the end {}",
        loadavg()
    );
    println!(
        "| side | RSS at start (KiB) | RSS at minute 2 (KiB) | RSS at the end (KiB) | end / minute 2 |"
    );
    println!("|---|---|---|---|---|");
    for (i, name) in ["client sidecar", "server sidecar"].iter().enumerate() {
        match at_two {
            Some(two) => println!(
                "| {name} | {} | {} | {} | {:.3} |",
                at_start[i],
                two[i],
                end[i],
                end[i] as f64 / two[i].max(1) as f64
            ),
            None => println!(
                "| {name} | {} | (run shorter than 2 min) | {} | - |",
                at_start[i], end[i]
            ),
        }
    }
    drop(mesh);
}

/// The first three fields of /proc/loadavg, or `?` off Linux.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".to_owned())
}
