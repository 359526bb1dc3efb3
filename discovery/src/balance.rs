//! The balancer of one service: power of two choices over peak-EWMA, as
//! in Finagle and linkerd2-proxy. Each endpoint keeps an estimate of its
//! latency that jumps to any slower sample at once (the peak) and decays
//! towards faster ones, and towards zero while it gets no traffic (so an
//! endpoint that was slow once is tried again); its cost is that estimate
//! times one more than its requests (or connections) in flight. A pick
//! draws two distinct endpoints at random and takes the cheaper. HTTP picks
//! per request, opaque TCP per connection.
//!
//! An endpoint that refuses (connect failure, a handshake that fails, as
//! with a server presenting another workload's identity) is ejected for a
//! backoff that doubles on every refusal in a row (1 s up to 30 s) and
//! resets on success. If every endpoint is ejected, all of them are
//! candidates again: a service whose endpoints all failed once is not
//! refused outright for the whole backoff. Endpoints whose identity cannot
//! be derived are never candidates.

use std::cell::Cell;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use rampart_identity::SpiffeId;
use tokio::time::Instant;

use crate::metrics::ServiceMetrics;
use crate::model::{Endpoint, Service};

/// How fast the estimate forgets: the weight of the old estimate after
/// `t` is `exp(-t / DECAY)`. linkerd2-proxy uses 10 s, which suits many
/// concurrent requests, where the pending count does most of the
/// balancing. With few requests in flight (one app connection sending one
/// request at a time) the estimate alone decides, and a 10 s memory lets
/// one slow sample (the first request, which pays for the handshake)
/// starve an endpoint for tens of seconds; 100 ms forgets such a peak
/// within a few hundred milliseconds, so equal endpoints take turns often
/// (at 250 ms, 3,000 sequential requests still split 36/37/27 %), while a
/// backend that is slow on every request (each of its samples sets the
/// peak again) gets only the occasional probe.
pub const DECAY: Duration = Duration::from_millis(100);
/// The first ejection of an endpoint in a row.
pub const EJECT_BASE: Duration = Duration::from_secs(1);
/// The longest ejection.
pub const EJECT_MAX: Duration = Duration::from_secs(30);

/// A service's endpoints and their load, shared by every connection that
/// goes to it; the registry swaps the endpoint list on each change while
/// picks in flight keep theirs.
#[derive(Debug)]
pub struct Balancer {
    name: String,
    endpoints: ArcSwap<Vec<Arc<EndpointState>>>,
    /// Why the service does not exist, when its source says so.
    missing: ArcSwapOption<String>,
    metrics: ServiceMetrics,
}

/// One endpoint and what the balancer has learnt of it.
#[derive(Debug)]
pub struct EndpointState {
    /// The endpoint.
    pub endpoint: Endpoint,
    pending: AtomicU32,
    rtt: Mutex<Rtt>,
    ejection: Mutex<Ejection>,
    requests: AtomicU64,
    failures: AtomicU64,
}

#[derive(Debug)]
struct Rtt {
    /// Seconds.
    estimate: f64,
    at: Instant,
}

#[derive(Debug, Default)]
struct Ejection {
    until: Option<Instant>,
    in_a_row: u32,
}

/// Why no endpoint could be picked: the 503's reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoEndpoint {
    /// The service has no endpoints at all.
    #[error("service {0} has no endpoints")]
    Empty(String),
    /// The service does not exist (the source follows it, by name, and
    /// says why: `no Service demo/web in the cluster`).
    #[error("{0}")]
    Missing(String),
    /// Its endpoints exist but none has an identity that could be derived.
    #[error("no endpoint of service {0} has a derivable identity")]
    NoIdentity(String),
    /// The only endpoints left were already tried for this request.
    #[error("no other endpoint of service {0} to try")]
    Exhausted(String),
}

/// How a pick ended, for the estimate and the ejections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The endpoint answered (any status): a latency sample.
    Answered,
    /// The endpoint could not be reached or its handshake failed (nothing
    /// was sent): ejected with backoff.
    Refused(Refusal),
    /// It failed after the request may have been sent (a reset, a
    /// timeout): counted, no sample, no ejection.
    Failed,
}

/// Why an endpoint refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// TCP connect failed or timed out.
    Connect,
    /// The mTLS handshake failed (the server's identity was not the
    /// endpoint's, its certificate did not verify, ...).
    Handshake,
}

impl Refusal {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Connect => "connect",
            Refusal::Handshake => "handshake",
        }
    }
}

/// A picked endpoint: counted in flight until finished or dropped.
#[derive(Debug)]
pub struct Pick {
    state: Arc<EndpointState>,
    started: Instant,
    balancer_metrics: ServiceMetrics,
    done: bool,
}

impl Pick {
    /// The endpoint.
    pub fn endpoint(&self) -> &Endpoint {
        &self.state.endpoint
    }

    /// The identity its server must present (picks only go to endpoints
    /// that have one).
    pub fn id(&self) -> &SpiffeId {
        // Invariant: `Balancer::pick` skips endpoints without an ID.
        match self.state.endpoint.identity.id() {
            Some(id) => id,
            None => unreachable!("picked an endpoint without an identity"),
        }
    }

    /// The endpoint's state (to exclude it from a retry).
    pub fn state(&self) -> &Arc<EndpointState> {
        &self.state
    }

    /// Records how the request (or connection set-up) went; the endpoint
    /// stays in flight for opaque connections until the pick is dropped.
    pub fn finish(&mut self, outcome: Outcome) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let now = Instant::now();
        let s = &self.state;
        s.requests.fetch_add(1, Ordering::Relaxed);
        match outcome {
            Outcome::Answered => {
                let sample = now.saturating_duration_since(self.started).as_secs_f64();
                if let Ok(mut rtt) = s.rtt.lock() {
                    rtt.observe(sample, now);
                }
                if let Ok(mut e) = s.ejection.lock() {
                    *e = Ejection::default();
                }
            }
            Outcome::Refused(why) => {
                s.failures.fetch_add(1, Ordering::Relaxed);
                let backoff = match s.ejection.lock() {
                    Ok(mut e) => {
                        let shift = e.in_a_row.min(5);
                        e.in_a_row = e.in_a_row.saturating_add(1);
                        let b = (EJECT_BASE * (1 << shift)).min(EJECT_MAX);
                        e.until = Some(now + b);
                        b
                    }
                    Err(_) => EJECT_BASE,
                };
                self.balancer_metrics.refused(why);
                tracing::info!(
                    endpoint = %s.endpoint.addr,
                    reason = why.as_str(),
                    backoff = ?backoff,
                    "endpoint ejected"
                );
            }
            Outcome::Failed => {
                s.failures.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl Drop for Pick {
    fn drop(&mut self) {
        self.state.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Rtt {
    /// Decays the estimate towards `sample` (or jumps to it when slower).
    fn observe(&mut self, sample: f64, now: Instant) {
        if sample > self.estimate {
            self.estimate = sample;
        } else {
            let w = self.weight(now);
            self.estimate = self.estimate * w + sample * (1.0 - w);
        }
        self.at = now;
    }

    /// The estimate now, decayed towards zero since the last sample.
    fn now(&self, now: Instant) -> f64 {
        self.estimate * self.weight(now)
    }

    fn weight(&self, now: Instant) -> f64 {
        let t = now.saturating_duration_since(self.at).as_secs_f64();
        (-t / DECAY.as_secs_f64()).exp()
    }
}

impl EndpointState {
    fn new(endpoint: Endpoint) -> Self {
        EndpointState {
            endpoint,
            pending: AtomicU32::new(0),
            // No sample yet: cheapest, so a new endpoint is tried at once.
            rtt: Mutex::new(Rtt {
                estimate: 0.0,
                at: Instant::now(),
            }),
            ejection: Mutex::new(Ejection::default()),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        }
    }

    fn cost(&self, now: Instant) -> f64 {
        let rtt = self.rtt.lock().map(|r| r.now(now)).unwrap_or(0.0);
        let pending = f64::from(self.pending.load(Ordering::Relaxed));
        // A floor of 1 µs so that pending requests count between endpoints
        // with no estimate yet.
        (rtt + 1e-6) * (pending + 1.0)
    }

    fn ejected(&self, now: Instant) -> bool {
        self.ejection
            .lock()
            .map(|e| e.until.is_some_and(|u| u > now))
            .unwrap_or(false)
    }

    /// What the admin listing shows of it.
    pub fn view(&self) -> EndpointView {
        let now = Instant::now();
        let (ejected_for, refusals_in_a_row) = self
            .ejection
            .lock()
            .map(|e| {
                (
                    e.until.map(|u| u.saturating_duration_since(now)),
                    e.in_a_row,
                )
            })
            .unwrap_or((None, 0));
        EndpointView {
            pending: self.pending.load(Ordering::Relaxed),
            rtt_ewma: Duration::from_secs_f64(
                self.rtt.lock().map(|r| r.now(now)).unwrap_or(0.0).max(0.0),
            ),
            ejected_for: ejected_for.filter(|d| !d.is_zero()),
            refusals_in_a_row,
            requests: self.requests.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
        }
    }
}

/// The balancer's view of one endpoint, for `/discovery`.
#[derive(Debug, Clone, Copy)]
pub struct EndpointView {
    /// Requests or connections in flight.
    pub pending: u32,
    /// The peak-EWMA latency estimate now.
    pub rtt_ewma: Duration,
    /// How much longer it is ejected, if it is.
    pub ejected_for: Option<Duration>,
    /// Refusals in a row.
    pub refusals_in_a_row: u32,
    /// Picks finished.
    pub requests: u64,
    /// Picks that failed.
    pub failures: u64,
}

impl Balancer {
    /// A balancer over `service`'s endpoints.
    pub fn new(service: &Service) -> Self {
        let metrics = ServiceMetrics::new(&service.name);
        let b = Balancer {
            name: service.name.clone(),
            endpoints: ArcSwap::from_pointee(Vec::new()),
            missing: ArcSwapOption::empty(),
            metrics,
        };
        b.update(service);
        b
    }

    /// The service's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The per-service metric handles.
    pub fn metrics(&self) -> &ServiceMetrics {
        &self.metrics
    }

    /// Replaces the endpoint list, keeping what was learnt of endpoints
    /// that stay (same address and identity). Picks in flight are not
    /// affected.
    pub fn update(&self, service: &Service) {
        let old = self.endpoints.load();
        let next: Vec<Arc<EndpointState>> = service
            .endpoints
            .iter()
            .map(|e| {
                old.iter()
                    .find(|s| s.endpoint.addr == e.addr && s.endpoint.identity == e.identity)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(EndpointState::new(e.clone())))
            })
            .collect();
        let usable = next
            .iter()
            .filter(|s| s.endpoint.identity.id().is_some())
            .count();
        self.metrics.endpoints(usable, next.len() - usable);
        self.missing.store(service.missing.clone().map(Arc::new));
        self.endpoints.store(Arc::new(next));
    }

    /// The endpoints now.
    pub fn endpoints(&self) -> Arc<Vec<Arc<EndpointState>>> {
        self.endpoints.load_full()
    }

    /// Picks an endpoint (never one of `exclude`).
    pub fn pick(&self, exclude: &[&Arc<EndpointState>]) -> Result<Pick, NoEndpoint> {
        let all = self.endpoints.load();
        let now = Instant::now();
        if all.is_empty() {
            if let Some(why) = self.missing.load_full() {
                return Err(NoEndpoint::Missing(why.to_string()));
            }
            return Err(NoEndpoint::Empty(self.name.clone()));
        }
        let with_id: Vec<&Arc<EndpointState>> = all
            .iter()
            .filter(|s| s.endpoint.identity.id().is_some())
            .collect();
        if with_id.is_empty() {
            return Err(NoEndpoint::NoIdentity(self.name.clone()));
        }
        let candidates: Vec<&Arc<EndpointState>> = with_id
            .into_iter()
            .filter(|s| !exclude.iter().any(|x| Arc::ptr_eq(x, s)))
            .collect();
        if candidates.is_empty() {
            return Err(NoEndpoint::Exhausted(self.name.clone()));
        }
        let healthy: Vec<&Arc<EndpointState>> = candidates
            .iter()
            .copied()
            .filter(|s| !s.ejected(now))
            .collect();
        let pool = if healthy.is_empty() {
            &candidates
        } else {
            &healthy
        };
        let chosen = match pool.len() {
            1 => pool[0],
            n => {
                let a = random_below(n);
                let mut b = random_below(n - 1);
                if b >= a {
                    b += 1;
                }
                let (ca, cb) = (pool[a].cost(now), pool[b].cost(now));
                if ca < cb || (ca == cb && random_below(2) == 0) {
                    pool[a]
                } else {
                    pool[b]
                }
            }
        };
        chosen.pending.fetch_add(1, Ordering::Relaxed);
        Ok(Pick {
            state: chosen.clone(),
            started: now,
            balancer_metrics: self.metrics.clone(),
            done: false,
        })
    }
}

thread_local! {
    static RNG: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS per process and differs per thread.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0x9e37_79b9_7f4a_7c15);
    h.finish() | 1
}

/// A uniform draw below `n` (xorshift64*; balancing needs no more).
fn random_below(n: usize) -> usize {
    RNG.with(|r| {
        let mut x = r.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        r.set(x);
        let v = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
        // `n` is small: the modulo bias is negligible.
        (v % n as u64) as usize
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{EndpointIdentity, SourceKind};

    fn service(n: usize) -> Service {
        Service {
            name: "ns/svc:80".into(),
            source: SourceKind::File,
            endpoints: (0..n)
                .map(|i| Endpoint {
                    addr: format!("10.0.0.{}:8080", i + 1).parse().unwrap(),
                    identity: EndpointIdentity::Id(
                        SpiffeId::parse(&format!("spiffe://td/e{i}")).unwrap(),
                    ),
                    owner: None,
                })
                .collect(),
            missing: None,
        }
    }

    /// Sends `n` sequential requests, endpoint `i` answering in
    /// `latency(i)`; returns the count per endpoint.
    async fn run(b: &Balancer, n: usize, latency: impl Fn(usize) -> Duration) -> Vec<usize> {
        let mut counts = vec![0; b.endpoints().len()];
        for _ in 0..n {
            let mut p = b.pick(&[]).unwrap();
            let i = b
                .endpoints()
                .iter()
                .position(|s| Arc::ptr_eq(s, p.state()))
                .unwrap();
            counts[i] += 1;
            tokio::time::sleep(latency(i)).await;
            p.finish(Outcome::Answered);
        }
        counts
    }

    #[tokio::test(start_paused = true)]
    async fn equal_endpoints_share_sequential_requests() {
        let b = Balancer::new(&service(3));
        // Jitter: each request takes 1 to 1.3 ms.
        let seq = std::cell::Cell::new(0u64);
        let counts = run(&b, 3000, |_| {
            seq.set(seq.get().wrapping_mul(6364136223846793005).wrapping_add(1));
            Duration::from_micros(1000 + (seq.get() >> 33) % 300)
        })
        .await;
        for c in &counts {
            assert!((840..=1140).contains(c), "{counts:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_endpoint_gets_little() {
        let b = Balancer::new(&service(3));
        run(&b, 300, |_| Duration::from_millis(1)).await;
        let counts = run(&b, 3000, |i| {
            Duration::from_millis(if i == 0 { 21 } else { 1 })
        })
        .await;
        assert!(counts[0] < 450, "{counts:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn pending_requests_spread_concurrent_load() {
        let b = Balancer::new(&service(2));
        let picks: Vec<Pick> = (0..10).map(|_| b.pick(&[]).unwrap()).collect();
        let on_first = picks
            .iter()
            .filter(|p| Arc::ptr_eq(p.state(), &b.endpoints()[0]))
            .count();
        assert!((4..=6).contains(&on_first), "{on_first}");
    }

    #[tokio::test(start_paused = true)]
    async fn refusing_endpoints_are_ejected_with_backoff_and_come_back() {
        let b = Balancer::new(&service(2));
        let bad = b.endpoints()[0].clone();
        let mut p = loop {
            let p = b.pick(&[]).unwrap();
            if Arc::ptr_eq(p.state(), &bad) {
                break p;
            }
        };
        p.finish(Outcome::Refused(Refusal::Handshake));
        drop(p);
        for _ in 0..50 {
            let p = b.pick(&[]).unwrap();
            assert!(!Arc::ptr_eq(p.state(), &bad));
        }
        assert_eq!(bad.view().refusals_in_a_row, 1);
        tokio::time::advance(EJECT_BASE + Duration::from_millis(1)).await;
        // Back among the candidates, and with no estimate it is cheap.
        let back = (0..50).any(|_| Arc::ptr_eq(b.pick(&[]).unwrap().state(), &bad));
        assert!(back);
        // A retry excludes what was tried; with nothing left it says so.
        let first = b.pick(&[]).unwrap();
        let second = b.pick(&[first.state()]).unwrap();
        assert!(!Arc::ptr_eq(first.state(), second.state()));
        assert_eq!(
            b.pick(&[first.state(), second.state()]).unwrap_err(),
            NoEndpoint::Exhausted("ns/svc:80".into())
        );
    }

    #[tokio::test(start_paused = true)]
    async fn every_endpoint_ejected_means_every_endpoint_is_a_candidate() {
        let b = Balancer::new(&service(1));
        let mut p = b.pick(&[]).unwrap();
        p.finish(Outcome::Refused(Refusal::Connect));
        drop(p);
        assert!(b.pick(&[]).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn empty_and_identityless_services_say_why() {
        let mut s = service(0);
        let b = Balancer::new(&s);
        assert_eq!(b.pick(&[]).unwrap_err(), NoEndpoint::Empty(s.name.clone()));
        s.endpoints.push(Endpoint {
            addr: "10.0.0.9:80".parse().unwrap(),
            identity: EndpointIdentity::Underivable("no service account".into()),
            owner: None,
        });
        b.update(&s);
        assert_eq!(
            b.pick(&[]).unwrap_err(),
            NoEndpoint::NoIdentity(s.name.clone())
        );
    }

    #[tokio::test(start_paused = true)]
    async fn updates_keep_what_was_learnt_of_endpoints_that_stay() {
        let mut s = service(2);
        let b = Balancer::new(&s);
        let kept = b.endpoints()[1].clone();
        s.endpoints.remove(0);
        s.endpoints.extend(service(3).endpoints.into_iter().skip(2));
        b.update(&s);
        let now = b.endpoints();
        assert_eq!(now.len(), 2);
        assert!(Arc::ptr_eq(&now[0], &kept));
    }
}
