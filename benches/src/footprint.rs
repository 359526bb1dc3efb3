//! `rampart-bench footprint`: what the HTTP-aware pair costs that can be
//! counted exactly on a loaded machine (issue 20), where request rates are
//! noise. Per sidecar: idle memory (`/proc/PID/smaps_rollup`, resident
//! split into anonymous and file-backed pages), memory per idle keep-alive
//! app connection, memory after a burst with a request in flight on every
//! connection, and per request on one keep-alive connection: context
//! switches (voluntary, all threads), read/write system calls and CPU time, and with
//! `--strace` every system call (`strace -c -f` attached to both sides).
//! Each `--also NAME=BIN` is another `rampart` executable measured the
//! same way in the same run (an older build: before against after).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::load::HttpConn;
use crate::{procstat, topology};

/// What to run.
pub struct Options {
    /// Keep-alive app connections opened (and kept idle).
    pub conns: usize,
    /// Requests counted on one keep-alive connection.
    pub requests: u64,
    /// Also count system calls with strace.
    pub strace: bool,
    /// Also count heap allocations (`malloc`, `calloc`, `realloc`) with
    /// `perf stat` on libc uprobes (root, `perf probe`).
    pub allocs: bool,
    /// Also measure each executable's pair with the port declared opaque
    /// (the L4 reference), named `NAME-opaque`.
    pub opaque: bool,
    /// Other `rampart` executables, by name.
    pub also: Vec<(String, PathBuf)>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            conns: 1_000,
            requests: 2_000,
            strace: false,
            allocs: false,
            opaque: false,
            also: Vec::new(),
        }
    }
}

/// How long to wait before reading memory: past `src/memory.rs`'s 5 s
/// `malloc_trim` period, so that freed memory is counted as given back.
const SETTLE: Duration = Duration::from_secs(6);

/// Resident memory of one process, in KiB.
#[derive(Clone, Copy, Debug, Default)]
pub struct Resident {
    /// All resident pages.
    pub rss: u64,
    /// Anonymous pages (heap, stacks).
    pub anon: u64,
    /// File-backed pages (the binary, shared libraries).
    pub file: u64,
}

/// `/proc/PID/smaps_rollup`'s `Rss` and `Anonymous`.
pub fn resident(pid: u32) -> Resident {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    let (rss, anon) = (field("Rss"), field("Anonymous"));
    Resident {
        rss,
        anon,
        file: rss.saturating_sub(anon),
    }
}

/// Per-process counters summed over its threads.
#[derive(Clone, Copy, Debug, Default)]
struct Counters {
    switches: u64,
    syscr: u64,
    syscw: u64,
    cpu: Duration,
}

fn counters(pid: u32) -> Counters {
    let mut switches = 0;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let s = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            switches += s
                .lines()
                // Voluntary only: the waits for I/O, which the code decides;
                // preemptions count how loaded the machine is.
                .filter_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .filter_map(|v| v.trim().parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    let io_field = |name: &str| -> u64 {
        io.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    Counters {
        switches,
        syscr: io_field("syscr"),
        syscw: io_field("syscw"),
        cpu: procstat::cpu_time(&[pid]),
    }
}

/// What one binary's pair measured, per side (client side first).
struct Measured {
    name: String,
    idle: [Resident; 2],
    with_conns: [Resident; 2],
    after_burst: [Resident; 2],
    closed: [Resident; 2],
    burst_failed: usize,
    switches: [f64; 2],
    rw_syscalls: [f64; 2],
    cpu_us: [f64; 2],
    syscalls: Option<[Syscalls; 2]>,
    allocations: Option<[f64; 2]>,
}

/// strace's summary of one side, per request.
#[derive(Clone, Debug, Default)]
struct Syscalls {
    total: f64,
    /// The most frequent calls, most first.
    top: Vec<(String, f64)>,
}

/// Runs it and prints Markdown tables on stdout (progress on stderr).
pub fn run(o: &Options) {
    let load_before = crate::load_average();
    let env = topology::Env::new();
    let app = topology::HttpApp::start();
    let mut bins = vec![("rampart".to_string(), env.bin().to_path_buf())];
    bins.extend(o.also.iter().cloned());
    let strace = o.strace && strace_available();
    if o.strace && !strace {
        eprintln!("skipping system call counts: strace is not installed");
    }
    let allocs = o.allocs && alloc_probes();
    if o.allocs && !allocs {
        eprintln!("skipping allocation counts: perf probes on libc could not be set");
    }
    let mut runs: Vec<(String, PathBuf, bool)> = Vec::new();
    for (name, bin) in &bins {
        runs.push((name.clone(), bin.clone(), false));
        if o.opaque {
            runs.push((format!("{name}-opaque"), bin.clone(), true));
        }
    }
    let results: Vec<Measured> = runs
        .iter()
        .map(|(name, bin, opaque)| measure(&env, app.addr, name, bin, *opaque, o, strace, allocs))
        .collect();
    println!(
        "# HTTP-aware pair footprint: {} idle keep-alive app connections, {} requests on one",
        o.conns, o.requests
    );
    println!(
        "# load average (1, 5, 15 min) before: {load_before}, after: {}",
        crate::load_average()
    );
    for (name, bin) in &bins {
        println!("# {name}: {}", bin.display());
    }
    let mib = |k: u64| k as f64 / 1024.0;
    let delta = |a: u64, b: u64| (a as f64 - b as f64) / 1024.0;
    let per_k = |a: u64, b: u64| (a as f64 - b as f64) / 1024.0 * 1000.0 / o.conns as f64;
    println!();
    println!(
        "| pair | side | idle RSS MiB | anon | file | with {n} conns: RSS | anon | anon MiB per 1,000 conns | after a burst on all: RSS | anon | burst errors | all closed: RSS | anon |",
        n = o.conns
    );
    println!("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for m in &results {
        for (side, s) in ["client", "server"].iter().enumerate() {
            println!(
                "| {} | {s} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {:.1} | {:.1} |",
                m.name,
                mib(m.idle[side].rss),
                mib(m.idle[side].anon),
                mib(m.idle[side].file),
                mib(m.with_conns[side].rss),
                mib(m.with_conns[side].anon),
                per_k(m.with_conns[side].anon, m.idle[side].anon),
                mib(m.after_burst[side].rss),
                mib(m.after_burst[side].anon),
                m.burst_failed,
                mib(m.closed[side].rss),
                mib(m.closed[side].anon),
            );
        }
    }
    println!();
    println!(
        "| pair | side | voluntary context switches / request | read+write syscalls / request | CPU µs / request | allocations / request | all syscalls / request (strace) | most frequent |"
    );
    println!("|---|---|--:|--:|--:|--:|--:|---|");
    for m in &results {
        for (side, s) in ["client", "server"].iter().enumerate() {
            let (total, top) = match &m.syscalls {
                Some(sc) => (
                    format!("{:.2}", sc[side].total),
                    sc[side]
                        .top
                        .iter()
                        .map(|(n, c)| format!("{n} {c:.2}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                ),
                None => ("-".into(), "-".into()),
            };
            let allocs = m
                .allocations
                .map_or_else(|| "-".to_string(), |a| format!("{:.2}", a[side]));
            println!(
                "| {} | {s} | {:.2} | {:.2} | {:.1} | {allocs} | {total} | {top} |",
                m.name, m.switches[side], m.rw_syscalls[side], m.cpu_us[side],
            );
        }
    }
    // The growth left once everything closed, for a leak check by eye.
    for m in &results {
        eprintln!(
            "{}: anon after closing all minus idle: client {:+.1} MiB, server {:+.1} MiB",
            m.name,
            delta(m.closed[0].anon, m.idle[0].anon),
            delta(m.closed[1].anon, m.idle[1].anon),
        );
    }
}

#[allow(
    clippy::too_many_arguments,
    reason = "one call site, each a setting of the run"
)]
fn measure(
    env: &topology::Env,
    app: std::net::SocketAddr,
    name: &str,
    bin: &Path,
    opaque: bool,
    o: &Options,
    strace: bool,
    allocs: bool,
) -> Measured {
    eprintln!("{name}: starting the pair");
    let pair = if opaque {
        env.rampart_opaque_pair_with(bin, app)
    } else {
        env.rampart_http_pair_with(bin, app)
    };
    let pids: Vec<u32> = pair.sides().iter().map(|s| s[0]).collect();
    let read = || [resident(pids[0]), resident(pids[1])];
    // One request first: what every sidecar has done once it carried any.
    HttpConn::open(pair.entry).get().expect("first GET");
    std::thread::sleep(SETTLE);
    let idle = read();

    eprintln!("{name}: {} requests on one connection", o.requests);
    let mut c = HttpConn::open(pair.entry);
    for _ in 0..200 {
        c.get().expect("GET");
    }
    let before = [counters(pids[0]), counters(pids[1])];
    for _ in 0..o.requests {
        c.get().expect("GET");
    }
    let after = [counters(pids[0]), counters(pids[1])];
    let n = o.requests as f64;
    let per = |f: &dyn Fn(&Counters) -> f64| [0, 1].map(|i| (f(&after[i]) - f(&before[i])) / n);
    let switches = per(&|c| c.switches as f64);
    let rw_syscalls = per(&|c| (c.syscr + c.syscw) as f64);
    let cpu_us = per(&|c| c.cpu.as_secs_f64() * 1e6);
    let syscalls = strace.then(|| traced(&pids, &mut c, o.requests));
    let allocations = allocs.then(|| counted_allocations(&pids, &mut c, o.requests));
    drop(c);

    eprintln!("{name}: opening {} keep-alive connections", o.conns);
    let mut conns: Vec<HttpConn> = (0..o.conns)
        .map(|_| {
            let mut c = HttpConn::open(pair.entry);
            c.get().expect("GET on a new connection");
            c
        })
        .collect();
    std::thread::sleep(SETTLE);
    let with_conns = read();

    eprintln!("{name}: a request in flight on each");
    let mut burst_failed = 0;
    for c in &mut conns {
        if c.send_get().is_err() {
            burst_failed += 1;
        }
    }
    for c in &mut conns {
        if !matches!(c.read_status(), Ok(200)) {
            burst_failed += 1;
        }
    }
    std::thread::sleep(SETTLE);
    let after_burst = read();
    drop(conns);
    std::thread::sleep(SETTLE);
    let closed = read();
    Measured {
        name: name.to_string(),
        idle,
        with_conns,
        after_burst,
        closed,
        burst_failed,
        switches,
        rw_syscalls,
        cpu_us,
        syscalls,
        allocations,
    }
}

/// The libc uprobes `perf stat` counts allocations with.
const ALLOC_EVENTS: [&str; 3] = [
    "probe_libc:malloc",
    "probe_libc:calloc",
    "probe_libc:realloc",
];

/// Sets the libc allocation probes (kept if already there); false when
/// perf or uprobes are missing.
fn alloc_probes() -> bool {
    let libc = ["/lib/x86_64-linux-gnu/libc.so.6", "/lib64/libc.so.6"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    let Some(libc) = libc else {
        return false;
    };
    let listed = Command::new("perf")
        .args(["probe", "-l"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for (event, func) in ALLOC_EVENTS.iter().zip(["malloc", "calloc", "realloc"]) {
        if listed.contains(event) {
            continue;
        }
        let added = Command::new("perf")
            .args(["probe", "-q", "-x", libc, func])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !added {
            return false;
        }
    }
    true
}

/// Heap allocations per request on each side, counted by `perf stat`
/// attached to both sides while `requests` more are sent.
fn counted_allocations(pids: &[u32], c: &mut HttpConn, requests: u64) -> [f64; 2] {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut counters: Vec<(std::process::Child, PathBuf)> = pids
        .iter()
        .map(|pid| {
            let out = dir.path().join(format!("perf-{pid}"));
            let child = Command::new("perf")
                .args(["stat", "-x", ",", "-e", &ALLOC_EVENTS.join(","), "-o"])
                .arg(&out)
                .arg("-p")
                .arg(pid.to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn perf stat");
            (child, out)
        })
        .collect();
    // perf attaches in well under this; requests sent before it has are
    // not counted, which only lowers the figure a little.
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..requests {
        c.get().expect("GET under perf stat");
    }
    counters
        .iter_mut()
        .map(|(child, out)| {
            if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::INT);
            }
            let _ = child.wait();
            let text = std::fs::read_to_string(&*out).unwrap_or_default();
            // CSV: count,unit,event,...
            let total: f64 = text
                .lines()
                .filter_map(|l| l.split(',').next()?.trim().parse::<f64>().ok())
                .sum();
            total / requests as f64
        })
        .collect::<Vec<_>>()
        .try_into()
        .unwrap_or_else(|_| unreachable!("one counter per side"))
}

fn strace_available() -> bool {
    Command::new("strace")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `requests` GETs on `c` with strace counting every system call of both
/// sides (all threads); per request.
fn traced(pids: &[u32], c: &mut HttpConn, requests: u64) -> [Syscalls; 2] {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut tracers: Vec<(std::process::Child, PathBuf)> = pids
        .iter()
        .map(|pid| {
            let out = dir.path().join(format!("strace-{pid}"));
            let child = Command::new("strace")
                .args(["-f", "-c", "-qq", "-o"])
                .arg(&out)
                .arg("-p")
                .arg(pid.to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn strace");
            (child, out)
        })
        .collect();
    // Attached once every thread of both sides has a tracer.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !pids.iter().all(|p| all_traced(*p)) {
        assert!(
            std::time::Instant::now() < deadline,
            "strace did not attach"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for _ in 0..requests {
        c.get().expect("GET under strace");
    }
    tracers
        .iter_mut()
        .map(|(child, out)| {
            if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::INT);
            }
            let _ = child.wait();
            let text = std::fs::read_to_string(&*out).unwrap_or_default();
            summary(&text, requests as f64)
        })
        .collect::<Vec<_>>()
        .try_into()
        .unwrap_or_else(|_| unreachable!("one tracer per side"))
}

/// Whether every thread of `pid` has a tracer.
fn all_traced(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("TracerPid:"))
            .is_some_and(|v| v.trim() != "0")
    })
}

/// Parses `strace -c` output: total calls and the five most frequent, per
/// request.
fn summary(text: &str, requests: f64) -> Syscalls {
    let mut out = Syscalls::default();
    let mut calls: Vec<(String, f64)> = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 4 || f[0].parse::<f64>().is_err() {
            continue;
        }
        // % time, seconds, usecs/call, calls, [errors], syscall.
        let (name, Ok(n)) = (f[f.len() - 1], f[3].parse::<f64>()) else {
            continue;
        };
        if name == "total" {
            out.total = n / requests;
        } else {
            calls.push((name.to_string(), n / requests));
        }
    }
    calls.sort_by(|a, b| b.1.total_cmp(&a.1));
    calls.truncate(5);
    out.top = calls;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strace_summaries_are_read_per_request() {
        let text = "\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 50.00    0.000500           2       200           write
 30.00    0.000300           1       300        20 read
 20.00    0.000200           1       100           epoll_wait
------ ----------- ----------- --------- --------- ----------------
100.00    0.001000           1       600        20 total
";
        let s = summary(text, 100.0);
        assert_eq!(s.total, 6.0);
        assert_eq!(
            s.top,
            vec![
                ("read".to_string(), 3.0),
                ("write".to_string(), 2.0),
                ("epoll_wait".to_string(), 1.0)
            ]
        );
    }
}
