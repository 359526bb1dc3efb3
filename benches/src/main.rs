//! The latency harness: starts each topology on loopback with real
//! processes and measures what the sidecars add, interleaving repetitions
//! (A B A B ...) because the machine is shared and noisy.
//!
//! `cargo build --release && cargo run --release -p rampart-bench -- tcp-rtt`

mod topology;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

fn usage() -> ! {
    eprintln!(
        "usage: rampart-bench tcp-rtt [--requests N] [--reps N] [--size BYTES]\n\n\
         tcp-rtt: round trips of a small request/response on one TCP connection,\n\
         direct to an echo app versus through two Rampart sidecars (mTLS)."
    );
    std::process::exit(2)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(profile) = args.next() else { usage() };
    let mut requests = 20_000u64;
    let mut reps = 3u32;
    let mut size = 64usize;
    while let Some(a) = args.next() {
        let v = args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--requests" => requests = v.parse().unwrap_or_else(|_| usage()),
            "--reps" => reps = v.parse().unwrap_or_else(|_| usage()),
            "--size" => size = v.parse().unwrap_or_else(|_| usage()),
            _ => usage(),
        }
    }
    match profile.as_str() {
        "tcp-rtt" => tcp_rtt(requests, reps, size),
        _ => usage(),
    }
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
    println!("| topology | p50 µs | p99 µs | p50 / direct | p99 / direct | added p50 µs |");
    println!("|---|---|---|---|---|---|");
    let med = |hs: &[Histogram<u64>], q: f64| -> f64 {
        let mut v: Vec<f64> = hs
            .iter()
            .map(|h| h.value_at_quantile(q) as f64 / 1000.0)
            .collect();
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let d50 = med(&results[0].1, 0.5);
    let d99 = med(&results[0].1, 0.99);
    for (name, hs) in &results {
        let p50 = med(hs, 0.5);
        let p99 = med(hs, 0.99);
        println!(
            "| {name} | {p50:.1} | {p99:.1} | {:.2} | {:.2} | {:.1} |",
            p50 / d50,
            p99 / d99,
            p50 - d50
        );
    }
    drop(mesh);
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
