//! Load generation over HTTP/1.1: open-loop at a constant rate (latency
//! counted from each request's intended send time, so a stall shows up in
//! every request it delays instead of being hidden by the client waiting:
//! no coordinated omission), or closed-loop saturation; over keep-alive
//! connections or with a fresh connection per request. One thread per
//! connection (blocking sockets, nanosecond sleeps). HTTP/2 and gRPC are in
//! `h2load`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::{Barrier, OnceLock};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// How requests are offered.
#[derive(Clone, Copy, Debug)]
pub enum Load {
    /// Requests per second in total, spread evenly over the connections.
    Rate(u64),
    /// Each connection sends its next request as soon as the last is answered.
    Saturate,
}

/// What one run measured.
pub struct Run {
    /// Latencies in nanoseconds.
    pub hist: Histogram<u64>,
    /// Requests answered.
    pub completed: u64,
    /// Connections (HTTP/1.1) or calls (HTTP/2) that failed; a failed
    /// HTTP/1.1 connection stops sending.
    pub errors: u64,
    /// From the first intended send to the last response.
    pub elapsed: Duration,
}

/// A latency histogram from 1 µs to 60 s, in nanoseconds.
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1_000, 60_000_000_000, 3).expect("constant bounds are valid")
}

/// How the HTTP/1.1 client uses connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reuse {
    /// Each connection carries every request of its thread.
    KeepAlive,
    /// A fresh TCP connection per request, closed after the response.
    Fresh,
}

/// Runs `load` against `addr` from `conns` client threads for `dur`, after
/// a closed-loop warm-up (up to 20 requests per connection, fewer when
/// there are many connections). With `netns`, every client thread first
/// joins that network namespace.
pub fn run(
    addr: SocketAddr,
    load: Load,
    conns: usize,
    dur: Duration,
    reuse: Reuse,
    netns: Option<&Path>,
) -> Run {
    let barrier = Barrier::new(conns);
    let start: OnceLock<Instant> = OnceLock::new();
    let warm_up = (400 / conns).clamp(1, 20);
    let per_conn: Vec<(Histogram<u64>, u64, bool, Instant)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..conns)
            .map(|i| {
                let (barrier, start) = (&barrier, &start);
                std::thread::Builder::new()
                    // 1,000 connections means 1,000 threads: keep them small.
                    .stack_size(256 * 1024)
                    .spawn_scoped(scope, move || {
                        if let Some(ns) = netns {
                            crate::netns::enter(ns);
                        }
                        let mut h = new_hist();
                        let mut n = 0u64;
                        let conn = HttpConn::try_open(addr).and_then(|mut c| {
                            (0..warm_up).try_for_each(|_| c.get().map(drop))?;
                            Ok(c)
                        });
                        barrier.wait();
                        let t0 = *start.get_or_init(|| Instant::now() + Duration::from_millis(5));
                        let Ok(mut c) = conn else {
                            return (h, 0, true, t0);
                        };
                        let end = t0 + dur;
                        let failed = match load {
                            Load::Rate(rate) => {
                                let step = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
                                let mut k = i as u32;
                                loop {
                                    let intended = t0 + step * k;
                                    if intended >= end {
                                        break false;
                                    }
                                    if let Some(wait) =
                                        intended.checked_duration_since(Instant::now())
                                    {
                                        std::thread::sleep(wait);
                                    }
                                    if c.request(reuse).is_err() {
                                        break true;
                                    }
                                    let _ =
                                        h.record(intended.elapsed().as_nanos().max(1_000) as u64);
                                    n += 1;
                                    k += conns as u32;
                                }
                            }
                            Load::Saturate => {
                                if let Some(wait) = t0.checked_duration_since(Instant::now()) {
                                    std::thread::sleep(wait);
                                }
                                // At least one request, even if this thread
                                // was scheduled after the end (tiny runs).
                                loop {
                                    let t = Instant::now();
                                    if c.request(reuse).is_err() {
                                        break true;
                                    }
                                    let _ = h.record(t.elapsed().as_nanos().max(1_000) as u64);
                                    n += 1;
                                    if Instant::now() >= end {
                                        break false;
                                    }
                                }
                            }
                        };
                        (h, n, failed, Instant::now())
                    })
                    .expect("spawn a load thread")
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("load thread"))
            .collect()
    });
    let t0 = *start
        .get()
        .expect("set by the first thread past the barrier");
    let mut hist = new_hist();
    let (mut completed, mut errors, mut last) = (0, 0, t0);
    for (h, n, failed, done) in per_conn {
        hist.add(h).expect("same bounds");
        completed += n;
        errors += u64::from(failed);
        last = last.max(done);
    }
    Run {
        hist,
        completed,
        errors,
        elapsed: last.duration_since(t0),
    }
}

/// One HTTP/1.1 keep-alive client connection.
pub struct HttpConn {
    s: TcpStream,
    buf: Vec<u8>,
    addr: SocketAddr,
}

impl HttpConn {
    /// Connects, or panics (for the closed-loop profiles).
    pub fn open(addr: SocketAddr) -> Self {
        Self::try_open(addr).expect("connect")
    }

    /// Connects.
    pub fn try_open(addr: SocketAddr) -> std::io::Result<Self> {
        let s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(HttpConn {
            s,
            buf: Vec::with_capacity(4096),
            addr,
        })
    }

    /// One `GET /bench` on this connection, or on a fresh one to the same
    /// address that is closed after the response.
    pub fn request(&mut self, reuse: Reuse) -> std::io::Result<()> {
        match reuse {
            Reuse::KeepAlive => self.get(),
            Reuse::Fresh => Self::try_open(self.addr)?.get(),
        }
    }

    /// Sends one `GET /bench` and reads its whole response (content-length
    /// framed); an error unless the status is 200.
    pub fn get(&mut self) -> std::io::Result<()> {
        match self.get_status()? {
            200 => Ok(()),
            s => Err(std::io::Error::other(format!("status {s}"))),
        }
    }

    /// Sends one `GET /bench` and returns the response's status.
    pub fn get_status(&mut self) -> std::io::Result<u16> {
        self.send_get()?;
        self.read_status()
    }

    /// Writes one `GET /bench` without waiting for its response (several
    /// connections can then have a request in flight at once).
    pub fn send_get(&mut self) -> std::io::Result<()> {
        self.s
            .write_all(b"GET /bench HTTP/1.1\r\nHost: bench\r\n\r\n")
    }

    /// Reads the whole response to a request sent before and returns its
    /// status.
    pub fn read_status(&mut self) -> std::io::Result<u16> {
        use std::io::{Error, ErrorKind};
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = crate::apps::find_head_end(&self.buf) {
                let head = String::from_utf8_lossy(&self.buf[..end]).to_ascii_lowercase();
                let bad = || Error::new(ErrorKind::InvalidData, head.clone());
                let status: u16 = head
                    .strip_prefix("http/1.1 ")
                    .and_then(|r| r.get(..3))
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(bad)?;
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .ok_or_else(bad)?;
                if self.buf.len() >= end + len {
                    self.buf.drain(..end + len);
                    return Ok(status);
                }
            }
            let n = self.s.read(&mut chunk)?;
            if n == 0 {
                return Err(ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}
