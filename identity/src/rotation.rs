//! The rotation worker: the one place where identity updates from a source
//! become TLS configurations. It publishes each new SVID or bundle set into
//! the [`IdentityStore`] (an atomic swap: in-flight connections keep the
//! configuration they started with, new handshakes get the new one), and it
//! withdraws the identity when the current SVID expires with no replacement,
//! so that the sidecar fails closed and recovers by itself when a fresh SVID
//! arrives.
//!
//! Sources (Workload API, files, development CA) only produce [`Update`]s;
//! they never touch the store. Time comes from an injected [`Clock`] so the
//! worker is tested with `tokio::time::pause`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::bundle::BundleSet;
use crate::metrics::{self as m, SourceKind};
use crate::store::IdentityStore;
use crate::svid::Svid;

/// An SVID and the bundles to verify peers with: everything a source delivers.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The sidecar's own X.509-SVID.
    pub svid: Svid,
    /// Trust bundles, own trust domain and federated ones.
    pub bundles: BundleSet,
}

/// What a source reports to the rotation worker.
#[derive(Debug)]
pub enum Update {
    /// The current identity (full state: it replaces the previous one).
    Identity(Box<Identity>),
    /// The source no longer grants the identity ("absent SVID ⇒ unload it",
    /// Workload API §5.2): withdraw it now rather than at expiry.
    Revoked,
}

/// Wall-clock time as seen by the worker.
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(SystemTime::now)
}

/// A clock that follows tokio's (possibly paused) time from `start`, for
/// tests with `#[tokio::test(start_paused = true)]`.
pub fn tokio_clock(start: SystemTime) -> Clock {
    let origin = Instant::now();
    Arc::new(move || start + origin.elapsed())
}

/// The channel capacity sources should use; updates are rare and each one
/// carries full state, so a small buffer is enough.
pub const UPDATE_CHANNEL: usize = 4;

/// The worker that turns [`Update`]s into published TLS configurations.
pub struct Rotation {
    store: Arc<IdentityStore>,
    clock: Clock,
    source: SourceKind,
}

/// What the worker keeps about the identity in service.
struct InService {
    serial: String,
    not_after: SystemTime,
    bundles: BundleSet,
}

impl Rotation {
    /// A worker publishing into `store`, for updates of `source`.
    pub fn new(store: Arc<IdentityStore>, source: SourceKind, clock: Clock) -> Self {
        Rotation {
            store,
            clock,
            source,
        }
    }

    /// Runs until the update channel closes and the last SVID has expired
    /// (or immediately after the channel closes if nothing is in service).
    pub async fn run(self, updates: mpsc::Receiver<Update>) {
        self.run_after(None, updates).await;
    }

    /// Like [`Rotation::run`], applying `first` before reading `updates`
    /// (for callers that had to look at the first update themselves, for
    /// example to learn the trust domain).
    pub async fn run_after(self, first: Option<Update>, mut updates: mpsc::Receiver<Update>) {
        let mut current: Option<InService> = None;
        // The last serial and bundles ever published, so that recovery after
        // an expiry counts as a rotation and an unchanged resend does not.
        let mut last: Option<(String, BundleSet)> = None;
        if let Some(Update::Identity(id)) = first {
            self.apply(*id, &mut current, &mut last);
        }
        let mut open = true;
        loop {
            let expiry = current.as_ref().map(|c| self.instant_of(c.not_after));
            if !open && expiry.is_none() {
                return;
            }
            tokio::select! {
                u = updates.recv(), if open => match u {
                    None => {
                        tracing::debug!(source = self.source.as_str(), "identity source stopped");
                        open = false;
                    }
                    Some(Update::Identity(id)) => self.apply(*id, &mut current, &mut last),
                    Some(Update::Revoked) => {
                        if current.take().is_some() {
                            tracing::warn!(source = self.source.as_str(), "identity revoked by its source");
                            self.withdraw();
                        }
                    }
                },
                () = sleep_until(expiry) => {
                    current = None;
                    tracing::warn!(
                        source = self.source.as_str(),
                        "SVID expired with no replacement; identity withdrawn"
                    );
                    self.withdraw();
                }
            }
        }
    }

    fn apply(
        &self,
        id: Identity,
        current: &mut Option<InService>,
        last: &mut Option<(String, BundleSet)>,
    ) {
        let info = id.svid.info();
        if id.svid.is_expired_at((self.clock)()) {
            tracing::warn!(
                source = self.source.as_str(),
                spiffe.id = %info.id,
                svid.serial = %info.serial,
                "ignored an SVID outside its validity period"
            );
            m::source_error(self.source);
            return;
        }
        let same_svid = current.as_ref().is_some_and(|c| c.serial == info.serial);
        let same_bundles = current
            .as_ref()
            .is_some_and(|c| c.bundles.same_as(&id.bundles));
        if same_svid && same_bundles {
            tracing::trace!("identity unchanged");
            return;
        }
        if let Err(e) = self.store.publish(&id.svid, &id.bundles) {
            tracing::warn!(source = self.source.as_str(), error = %e, "identity update rejected");
            m::source_error(self.source);
            return;
        }
        if let Some((serial, bundles)) = last.as_ref() {
            if *serial != info.serial {
                metrics::counter!(m::ROTATIONS).increment(1);
            }
            if !bundles.same_as(&id.bundles) {
                metrics::counter!(m::BUNDLE_UPDATES).increment(1);
            }
        }
        metrics::gauge!(m::SVID_EXPIRY).set(unix_seconds(info.not_after));
        *last = Some((info.serial.clone(), id.bundles.clone()));
        *current = Some(InService {
            serial: info.serial.clone(),
            not_after: info.not_after,
            bundles: id.bundles,
        });
    }

    fn withdraw(&self) {
        self.store.withdraw();
        metrics::gauge!(m::SVID_EXPIRY).set(0.0);
    }

    /// The tokio instant at which wall-clock time `t` is reached.
    fn instant_of(&self, t: SystemTime) -> Instant {
        let left = t.duration_since((self.clock)()).unwrap_or(Duration::ZERO);
        Instant::now() + left
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Delays between reconnection attempts: exponential, capped, with jitter
/// ("equal jitter": half fixed, half random) so that many sidecars restarted
/// together do not reconnect in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Starts at `initial` and doubles up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            next: initial,
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let half = base / 2;
        half + half.mul_f64(random_unit())
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

/// A number in [0, 1) from the standard library's randomly keyed hasher;
/// jitter needs spread, not cryptographic quality.
fn random_unit() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests;
