//! Load generation over HTTP/2 (h2c, prior knowledge): `GET /bench`, or
//! unary gRPC calls to [`GRPC_PATH`] (length-prefixed message, `te:
//! trailers`, success only with `grpc-status: 0` in the trailers).
//!
//! Open loop: a pacing thread sleeps to each request's intended send time
//! (nanosecond sleeps; tokio's timer has millisecond ticks, which would add
//! up to a millisecond to every latency) and hands the time to the
//! connection's task, which sends the request on a new stream without
//! waiting for earlier ones. Latency counts from the intended time, so a
//! stall is not hidden (no coordinated omission). Saturation is closed loop
//! with [`SATURATION_STREAMS`] streams per connection. The client runs on one
//! current-thread runtime.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::{Semaphore, mpsc};

use crate::apps::{GRPC_PATH, grpc_frame, grpc_message};
use crate::load::{Load, Run, new_hist};

/// What each request is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    /// `GET /bench`, 2-byte answer.
    Get,
    /// A unary gRPC call, `google.protobuf.BytesValue` "ping" both ways.
    Grpc,
}

/// Concurrent streams per connection at saturation.
pub const SATURATION_STREAMS: usize = 4;

/// Streams a connection may have open at once at a fixed rate; past this
/// the connection's task waits (and the wait counts in the latencies).
const MAX_IN_FLIGHT: usize = 256;

/// `BytesValue { value: "ping" }`: field 1, length-delimited, 4 bytes.
const PING: &[u8] = b"\x0a\x04ping";

/// Runs `load` against `addr` over `conns` HTTP/2 connections for `dur`,
/// after a closed-loop warm-up of 10 calls per connection; with `netns`,
/// from inside that network namespace.
pub fn run(
    addr: SocketAddr,
    call: Call,
    load: Load,
    conns: usize,
    dur: Duration,
    netns: Option<&Path>,
) -> Run {
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                if let Some(ns) = netns {
                    crate::netns::enter(ns);
                }
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("the load client's runtime");
                rt.block_on(run_async(addr, call, load, conns, dur))
            })
            .join()
            .expect("h2 load thread")
    })
}

/// What the tasks of one run share (one thread: the lock is uncontended).
struct Tally {
    hist: hdrhistogram::Histogram<u64>,
    completed: u64,
    errors: u64,
    last: Instant,
}

impl Tally {
    fn record(&mut self, from: Instant, ok: bool) {
        if ok {
            let _ = self
                .hist
                .record(from.elapsed().as_nanos().max(1_000) as u64);
            self.completed += 1;
        } else {
            self.errors += 1;
        }
        self.last = Instant::now();
    }
}

async fn run_async(addr: SocketAddr, call: Call, load: Load, conns: usize, dur: Duration) -> Run {
    let mut senders = Vec::new();
    let mut failed_conns = 0;
    for _ in 0..conns {
        match connect(addr).await {
            Ok(mut s) => {
                let mut warm = true;
                for _ in 0..10 {
                    warm &= once(&mut s, call).await;
                }
                if warm {
                    senders.push(s);
                } else {
                    failed_conns += 1;
                }
            }
            Err(_) => failed_conns += 1,
        }
    }
    let t0 = Instant::now() + Duration::from_millis(5);
    let end = t0 + dur;
    let tally = Arc::new(Mutex::new(Tally {
        hist: new_hist(),
        completed: 0,
        errors: failed_conns,
        last: t0,
    }));
    if senders.is_empty() {
        return finish(&tally, t0);
    }
    match load {
        Load::Rate(rate) => {
            let mut txs = Vec::new();
            let mut tasks = Vec::new();
            for s in senders {
                let (tx, rx) = mpsc::channel::<Instant>(4096);
                txs.push(tx);
                tasks.push(tokio::spawn(paced(s, call, rx, tally.clone())));
            }
            let pacer = std::thread::spawn(move || pace(t0, end, rate, txs));
            for t in tasks {
                let _ = t.await;
            }
            pacer.join().expect("pacing thread");
        }
        Load::Saturate => {
            tokio::time::sleep_until(t0.into()).await;
            let mut tasks = Vec::new();
            for s in senders {
                for _ in 0..SATURATION_STREAMS {
                    let (mut s, tally) = (s.clone(), tally.clone());
                    tasks.push(tokio::spawn(async move {
                        // At least one call each, even when started late.
                        loop {
                            let t = Instant::now();
                            let ok = once(&mut s, call).await;
                            tally.lock().expect("tally").record(t, ok);
                            if Instant::now() >= end {
                                break;
                            }
                        }
                    }));
                }
            }
            for t in tasks {
                let _ = t.await;
            }
        }
    }
    finish(&tally, t0)
}

fn finish(tally: &Mutex<Tally>, t0: Instant) -> Run {
    let mut t = tally.lock().expect("tally");
    Run {
        hist: std::mem::replace(&mut t.hist, new_hist()),
        completed: t.completed,
        errors: t.errors,
        elapsed: t.last.saturating_duration_since(t0),
    }
}

/// Hands out intended send times round-robin over the connections.
fn pace(t0: Instant, end: Instant, rate: u64, txs: Vec<mpsc::Sender<Instant>>) {
    let step = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    for k in 0u32.. {
        let intended = t0 + step * k;
        if intended >= end {
            break;
        }
        if let Some(wait) = intended.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        // A full channel blocks the pacer: the delay still counts, since
        // latency is measured from `intended`.
        let _ = txs[k as usize % txs.len()].blocking_send(intended);
    }
}

/// One connection's open-loop task: a new stream per intended time.
async fn paced(
    s: SendRequest<Full<Bytes>>,
    call: Call,
    mut rx: mpsc::Receiver<Instant>,
    tally: Arc<Mutex<Tally>>,
) {
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    while let Some(intended) = rx.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let (mut s, tally) = (s.clone(), tally.clone());
        tokio::spawn(async move {
            let ok = once(&mut s, call).await;
            tally.lock().expect("tally").record(intended, ok);
            drop(slot);
        });
    }
    // Wait for the last streams.
    let _ = slots.acquire_many(MAX_IN_FLIGHT as u32).await;
}

/// Opens an h2c connection (prior knowledge).
pub async fn connect(addr: SocketAddr) -> std::io::Result<SendRequest<Full<Bytes>>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(tcp))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    Ok(sender)
}

/// Sends one request and reads the whole answer; whether it succeeded.
pub async fn once(s: &mut SendRequest<Full<Bytes>>, call: Call) -> bool {
    check(s, call).await.is_ok()
}

/// Sends one request and reads the whole answer, or says what was wrong.
pub async fn check(s: &mut SendRequest<Full<Bytes>>, call: Call) -> Result<(), String> {
    let req = match call {
        Call::Get => Request::get("http://bench/bench").body(Full::new(Bytes::new())),
        Call::Grpc => Request::post(format!("http://bench{GRPC_PATH}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(grpc_frame(PING))),
    }
    .map_err(|e| e.to_string())?;
    s.ready().await.map_err(|e| e.to_string())?;
    let resp = s.send_request(req).await.map_err(|e| e.to_string())?;
    if resp.status() != StatusCode::OK {
        return Err(format!("status {}", resp.status()));
    }
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    if call == Call::Get {
        return Ok(());
    }
    let status = body
        .trailers()
        .and_then(|t| t.get("grpc-status"))
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    if status.as_deref() != Some("0") {
        return Err(format!("grpc-status {status:?}"));
    }
    match grpc_message(body.to_bytes()) {
        Some(m) if m == PING => Ok(()),
        other => Err(format!("unexpected gRPC reply {other:?}")),
    }
}
