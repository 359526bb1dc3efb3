//! The latency harness: starts each topology on loopback with real
//! processes and measures what the sidecars add, interleaving repetitions
//! (A B A B ...) because the machine is shared and noisy.
//!
//! `cargo build --release -p rampart -p rampart-bench &&
//! target/release/rampart-bench mesh --out bench-results` (the default
//! profile; see benches/RESULTS.md), or `tcp-rtt` / `http-rtt`.

#![forbid(unsafe_code)]

mod apps;
mod footprint;
mod h2load;
mod load;
mod mesh;
mod netns;
mod procstat;
mod report;
mod topology;
mod unscraped;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use load::HttpConn;

fn usage() -> ! {
    let d = mesh::Options::default();
    let list = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    eprintln!(
        "usage: rampart-bench [mesh] [--only W1,W2] [--rates R1,R2] [--conns N] [--sat-conns C1,C2]\n\
         \x20        [--h2-rates R1,R2]\n\
         \x20        [--h2-conns N] [--newconn-rate R] [--many-conns N] [--many-rate R]\n\
         \x20        [--duration SECS] [--reps N] [--out DIR] [--require-all]\n\
         \x20      rampart-bench tcp-rtt|http-rtt [--requests N] [--reps N] [--size BYTES] [--conns N]\n\
         \x20                                     [--also NAME=RAMPART_BINARY]...\n\
         \x20      rampart-bench unscraped [--minutes M] [--rate R] [--conns N]\n\
         \x20      rampart-bench footprint [--conns N] [--requests N] [--strace] [--allocs] [--opaque]\n\
         \x20                        [--also NAME=BIN]...\n\n\
         mesh (the default): direct versus Rampart, nginx and HAProxy pairs doing the same\n\
         mTLS hop, --duration ({dur}) s per run, --reps ({reps}) interleaved, in workloads\n\
         (--only, default all):\n\
         \x20 http1        keep-alive HTTP/1.1, open loop at --rates ({rates}) req/s over --conns\n\
         \x20              ({conns}) connections, and closed-loop saturation over each of\n\
         \x20              --sat-conns ({sat}) connections; also against the Rampart pair\n\
         \x20              with the port declared opaque (rampart-opaque, the L4 reference)\n\
         \x20 newconn      a fresh connection per request at --newconn-rate ({newconn}) req/s, also\n\
         \x20              against pairs that do not reuse connections on the hop (-nopool)\n\
         \x20 concurrency  --many-conns ({many}) keep-alive connections at --many-rate ({many_rate}) req/s\n\
         \x20              in total; the proxies' RSS with them open\n\
         \x20 h2, grpc     GET and unary gRPC over h2c, at --h2-rates ({h2}) req/s and saturation,\n\
         \x20              over --h2-conns ({h2c}) connections\n\
         \x20 transparent  the Rampart pair in transparent mode in network namespaces, at --rates\n\
         \x20              and saturation (root; skipped otherwise)\n\
         writes results.json, results.md and PNG plots to --out (bench-results). nginx,\n\
         HAProxy and the transparent mode are skipped when they cannot run, unless\n\
         --require-all or RAMPART_REQUIRE_E2E=1.\n\
         tcp-rtt: round trips of a small request/response on one TCP connection,\n\
         direct to an echo app versus through two Rampart sidecars (mTLS).\n\
         http-rtt: small HTTP/1.1 GETs on one keep-alive connection, direct versus\n\
         through two sidecars with an ALLOW policy checked per request; then\n\
         requests/s over --conns connections (default 16). Each --also adds a pair run by\n\
         another rampart executable (an older build, say), measured in the same run; the\n\
         pairs take turns in a rotating order so that none always runs right after direct.\n\
         unscraped: a Rampart HTTP pair at --rate (2000) req/s for --minutes (30), /metrics\n\
         never scraped; the sidecars' RSS at minute 2 and at the end (issue 19, R2).\n\
         footprint: per sidecar of the HTTP-aware pair, idle RSS (anonymous and file),\n\
         memory per idle keep-alive connection with --conns (1000) open, after a burst with\n\
         a request in flight on each, and per request on one connection (--requests, 2000):\n\
         context switches, read/write system calls, CPU, with --strace every system call,\n\
         with --allocs heap allocations (perf uprobes on libc); --opaque also measures\n\
         each executable's pair with the port declared opaque.",
        dur = d.duration.as_secs_f64(),
        reps = d.reps,
        rates = list(&d.rates),
        conns = d.conns,
        sat = d
            .sat_conns
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(","),
        newconn = d.newconn_rate,
        many = d.many_conns,
        many_rate = d.many_rate,
        h2 = list(&d.h2_rates),
        h2c = d.h2_conns,
    );
    std::process::exit(2)
}

fn main() {
    let mut args = std::env::args().skip(1).peekable();
    let profile = match args.peek() {
        Some(p) if !p.starts_with("--") => args.next().unwrap_or_default(),
        _ => "mesh".to_string(),
    };
    if profile == "mesh" {
        mesh::run(mesh_options(args));
        return;
    }
    if profile == "footprint" {
        let mut o = footprint::Options::default();
        while let Some(a) = args.next() {
            if a == "--strace" {
                o.strace = true;
                continue;
            }
            if a == "--allocs" {
                o.allocs = true;
                continue;
            }
            if a == "--opaque" {
                o.opaque = true;
                continue;
            }
            let v = args.next().unwrap_or_else(|| usage());
            match a.as_str() {
                "--conns" => o.conns = v.parse().unwrap_or_else(|_| usage()),
                "--requests" => o.requests = v.parse().unwrap_or_else(|_| usage()),
                "--also" => o.also.push(also_binary(&v)),
                _ => usage(),
            }
        }
        if o.conns == 0 || o.requests == 0 {
            usage()
        }
        footprint::run(&o);
        return;
    }
    if profile == "unscraped" {
        let mut o = unscraped::Options::default();
        while let Some(a) = args.next() {
            let v = args.next().unwrap_or_else(|| usage());
            match a.as_str() {
                "--minutes" => o.minutes = v.parse().unwrap_or_else(|_| usage()),
                "--rate" => o.rate = v.parse().unwrap_or_else(|_| usage()),
                "--conns" => o.conns = v.parse().unwrap_or_else(|_| usage()),
                _ => usage(),
            }
        }
        unscraped::run(&o);
        return;
    }
    let mut requests = 20_000u64;
    let mut reps = 3u32;
    let mut size = 64usize;
    let mut conns = 16usize;
    let mut also: Vec<(String, PathBuf)> = Vec::new();
    while let Some(a) = args.next() {
        let v = args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--also" => also.push(also_binary(&v)),
            "--requests" => requests = v.parse().unwrap_or_else(|_| usage()),
            "--reps" => reps = v.parse().unwrap_or_else(|_| usage()),
            "--size" => size = v.parse().unwrap_or_else(|_| usage()),
            "--conns" => conns = v.parse().unwrap_or_else(|_| usage()),
            _ => usage(),
        }
    }
    match profile.as_str() {
        "tcp-rtt" if also.is_empty() => tcp_rtt(requests, reps, size),
        "http-rtt" => http_rtt(requests, reps, conns, &also),
        _ => usage(),
    }
}

/// `NAME=PATH` of another `rampart` executable, or exits with why not.
fn also_binary(v: &str) -> (String, PathBuf) {
    let (name, bin) = v.split_once('=').unwrap_or_else(|| usage());
    let bin = PathBuf::from(bin);
    if name.is_empty() || name == "direct" || name == "rampart" || !bin.is_file() {
        eprintln!("--also {v}: want NAME=PATH of an executable, NAME not direct/rampart");
        std::process::exit(2);
    }
    (name.to_string(), bin)
}

fn mesh_options(mut args: impl Iterator<Item = String>) -> mesh::Options {
    let mut o = mesh::Options {
        require_all: std::env::var("RAMPART_REQUIRE_E2E").is_ok_and(|v| v == "1"),
        ..Default::default()
    };
    let rates = |v: &str| -> Vec<u64> {
        v.split(',')
            .map(|r| r.trim().parse().unwrap_or_else(|_| usage()))
            .collect()
    };
    let num = |v: &str| -> u64 { v.parse().unwrap_or_else(|_| usage()) };
    while let Some(a) = args.next() {
        if a == "--require-all" {
            o.require_all = true;
            continue;
        }
        let v = args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--only" => {
                o.only = v
                    .split(',')
                    .map(|w| mesh::Workload::parse(w.trim()).unwrap_or_else(|| usage()))
                    .collect()
            }
            "--rates" => o.rates = rates(&v),
            "--conns" => o.conns = num(&v) as usize,
            "--sat-conns" => o.sat_conns = rates(&v).into_iter().map(|c| c as usize).collect(),
            "--h2-rates" => o.h2_rates = rates(&v),
            "--h2-conns" => o.h2_conns = num(&v) as usize,
            "--newconn-rate" => o.newconn_rate = num(&v),
            "--many-conns" => o.many_conns = num(&v) as usize,
            "--many-rate" => o.many_rate = num(&v),
            "--duration" => {
                o.duration =
                    std::time::Duration::from_secs_f64(v.parse().unwrap_or_else(|_| usage()))
            }
            "--reps" => o.reps = num(&v) as u32,
            "--out" => o.out = v.into(),
            _ => usage(),
        }
    }
    if o.reps == 0
        || o.conns == 0
        || o.h2_conns == 0
        || o.many_conns == 0
        || o.sat_conns.is_empty()
        || o.sat_conns.contains(&0)
    {
        usage()
    }
    o
}

fn tcp_rtt(requests: u64, reps: u32, size: usize) {
    let env = topology::Env::new();
    let app = topology::EchoApp::start();
    let mesh = env.rampart_pair(app.addr);
    let targets = [("direct", app.addr), ("rampart", mesh.entry)];
    let mut results: Vec<(&str, Vec<Histogram<u64>>)> =
        targets.iter().map(|(n, _)| (*n, Vec::new())).collect();
    for rep in 0..reps {
        for (i, (name, addr)) in targets.iter().enumerate() {
            eprint!("\rrep {}/{reps}: {name:<8}", rep + 1);
            let h = ping_pong(*addr, requests, size);
            results[i].1.push(h);
        }
    }
    eprintln!();
    println!("# TCP round trip, {size}-byte request and response, one keep-alive connection");
    println!("# {requests} round trips x {reps} interleaved repetitions; medians over repetitions");
    print_latency_table(&results);
    drop(mesh);
}

fn http_rtt(requests: u64, reps: u32, conns: usize, also: &[(String, PathBuf)]) {
    let load_before = load_average();
    let env = topology::Env::new();
    let app = topology::HttpApp::start();
    let mut pairs = vec![env.rampart_http_pair(app.addr)];
    pairs.extend(
        also.iter()
            .map(|(_, bin)| env.rampart_http_pair_with(bin, app.addr)),
    );
    let mut targets: Vec<(&str, SocketAddr)> =
        vec![("direct", app.addr), ("rampart", pairs[0].entry)];
    targets.extend(
        also.iter()
            .zip(&pairs[1..])
            .map(|((n, _), p)| (n.as_str(), p.entry)),
    );
    let mut results: Vec<(&str, Vec<Histogram<u64>>)> =
        targets.iter().map(|(n, _)| (*n, Vec::new())).collect();
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    let proxied = targets.len() - 1;
    for rep in 0..reps as usize {
        // Direct first, then the pairs in an order that rotates per
        // repetition (A B, B A, ...), so no pair always follows direct.
        let order = std::iter::once(0).chain((0..proxied).map(|k| 1 + (k + rep) % proxied));
        for i in order {
            let (name, addr) = targets[i];
            eprint!("\rrep {}/{reps}: {name:<8}", rep + 1);
            results[i].1.push(http_ping_pong(addr, requests));
            rates[i].push(http_saturate(addr, conns, Duration::from_secs(3)));
        }
    }
    eprintln!();
    println!("# HTTP/1.1 GET /bench, 2-byte response, one keep-alive connection;");
    println!("# through Rampart: HTTP/2 between the sidecars, ALLOW policy checked per request");
    println!("# {requests} requests x {reps} interleaved repetitions; medians over repetitions");
    for (name, bin) in also {
        println!("# {name}: {}", bin.display());
    }
    println!(
        "# load average (1, 5, 15 min) before: {load_before}, after: {}",
        load_average()
    );
    print_latency_table(&results);
    println!();
    println!("| topology | requests/s ({conns} connections) | / direct |");
    println!("|---|---|---|");
    let direct = median(&rates[0]);
    for (i, (name, _)) in targets.iter().enumerate() {
        let r = median(&rates[i]);
        println!("| {name} | {r:.0} | {:.2} |", r / direct);
    }
    drop(pairs);
}

/// The first three fields of /proc/loadavg, or why they could not be read.
fn load_average() -> String {
    match std::fs::read_to_string("/proc/loadavg") {
        Ok(s) => s.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        Err(e) => format!("unknown ({e})"),
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median over repetitions of a quantile, in microseconds.
fn med(hs: &[Histogram<u64>], q: f64) -> f64 {
    let v: Vec<f64> = hs
        .iter()
        .map(|h| h.value_at_quantile(q) as f64 / 1000.0)
        .collect();
    median(&v)
}

/// One row per topology; the first is the baseline.
fn print_latency_table(results: &[(&str, Vec<Histogram<u64>>)]) {
    println!("| topology | p50 µs | p99 µs | p50 / direct | p99 / direct | added p50 µs |");
    println!("|---|---|---|---|---|---|");
    let d50 = med(&results[0].1, 0.5);
    let d99 = med(&results[0].1, 0.99);
    for (name, hs) in results {
        let p50 = med(hs, 0.5);
        let p99 = med(hs, 0.99);
        println!(
            "| {name} | {p50:.1} | {p99:.1} | {:.2} | {:.2} | {:.1} |",
            p50 / d50,
            p99 / d99,
            p50 - d50
        );
    }
}

/// Closed-loop ping-pong on one connection; latency in nanoseconds.
fn ping_pong(addr: SocketAddr, n: u64, size: usize) -> Histogram<u64> {
    let mut h = Histogram::<u64>::new_with_bounds(1_000, 10_000_000_000, 3).expect("bounds");
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_nodelay(true).ok();
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let req = vec![b'x'; size];
    let mut resp = vec![0u8; size];
    // Warm up: the handshake and first buffers are not what we measure.
    for _ in 0..200 {
        s.write_all(&req).expect("write");
        s.read_exact(&mut resp).expect("read");
    }
    for _ in 0..n {
        let t = Instant::now();
        s.write_all(&req).expect("write");
        s.read_exact(&mut resp).expect("read");
        let _ = h.record(t.elapsed().as_nanos().max(1_000) as u64);
    }
    h
}

/// Closed-loop GETs on one connection; latency in nanoseconds.
fn http_ping_pong(addr: SocketAddr, n: u64) -> Histogram<u64> {
    let mut h = Histogram::<u64>::new_with_bounds(1_000, 10_000_000_000, 3).expect("bounds");
    let mut c = HttpConn::open(addr);
    for _ in 0..200 {
        c.get().expect("GET");
    }
    for _ in 0..n {
        let t = Instant::now();
        c.get().expect("GET");
        let _ = h.record(t.elapsed().as_nanos().max(1_000) as u64);
    }
    h
}

/// Requests per second over `conns` closed-loop connections for `dur`.
fn http_saturate(addr: SocketAddr, conns: usize, dur: Duration) -> f64 {
    let start = Instant::now();
    let total: u64 = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..conns)
            .map(|_| {
                scope.spawn(move || {
                    let mut c = HttpConn::open(addr);
                    let mut n = 0u64;
                    while start.elapsed() < dur {
                        c.get().expect("GET");
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("client")).sum()
    });
    total as f64 / start.elapsed().as_secs_f64()
}
