//! Decision logs: one entry per decision, in OPA's decision-log shape
//! (`decision_id`, `labels`, `path`, `input`, `result`, `timestamp`,
//! `bundles`, `erased`), queued in memory for a shipper to send in batches.
//!
//! The queue is bounded and never makes the request path wait: pushing into
//! a full queue drops the oldest entry and counts it, so memory stays
//! bounded when the collector is slow or down, and what is kept is the most
//! recent history.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::{ConnectionInfo, Decision, RequestInfo};

/// A bounded, drop-oldest queue of decision-log entries.
#[derive(Debug)]
pub struct DecisionLogQueue {
    entries: Mutex<VecDeque<Value>>,
    capacity: usize,
    dropped: AtomicU64,
}

/// What [`DecisionLogQueue::try_push`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// The entry is queued.
    Queued,
    /// The entry is queued and the oldest one was dropped to make room.
    DroppedOldest,
}

impl DecisionLogQueue {
    /// A queue holding at most `capacity` entries (at least one).
    pub fn new(capacity: usize) -> Self {
        DecisionLogQueue {
            entries: Mutex::new(VecDeque::with_capacity(capacity.clamp(1, 4096))),
            capacity: capacity.max(1),
            dropped: AtomicU64::new(0),
        }
    }

    /// Queues an entry without waiting for the shipper; under back-pressure
    /// the oldest entry makes room.
    pub fn try_push(&self, entry: Value) -> Pushed {
        let mut q = self.lock();
        let pushed = if q.len() >= self.capacity {
            q.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
            Pushed::DroppedOldest
        } else {
            Pushed::Queued
        };
        q.push_back(entry);
        pushed
    }

    /// Takes up to `max` of the oldest entries, for one batch.
    pub fn take_batch(&self, max: usize) -> Vec<Value> {
        let mut q = self.lock();
        let n = max.min(q.len());
        q.drain(..n).collect()
    }

    /// Puts a batch that could not be sent back at the front, as far as room
    /// allows; the rest (the oldest) is dropped and counted.
    pub fn requeue(&self, batch: Vec<Value>) {
        let mut q = self.lock();
        let room = self.capacity.saturating_sub(q.len());
        let skip = batch.len().saturating_sub(room);
        self.dropped.fetch_add(skip as u64, Ordering::Relaxed);
        for e in batch.into_iter().skip(skip).rev() {
            q.push_front(e);
        }
    }

    /// Entries waiting.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The capacity.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Entries dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Value>> {
        // A panic while holding the lock leaves a valid deque: keep going.
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Where the request path hands each decision when decision logs are on.
/// Implemented by the `rampart-central` shipper; the proxy holds one as a
/// trait object. `log` must never wait (push into a bounded queue).
pub trait DecisionSink: Send + Sync {
    /// Records one HTTP request's decision.
    fn log(&self, conn: &ConnectionInfo<'_>, req: &RequestInfo<'_>, decision: &Decision);
}

/// What goes into every entry besides the decision.
#[derive(Debug, Clone, Default)]
pub struct EntryContext {
    /// `labels`: identify the sidecar (OPA sets `id` and `version`).
    pub labels: serde_json::Map<String, Value>,
    /// JSON pointers into the entry to remove before it is queued, such as
    /// `/input/attributes/request/http/headers/authorization` (OPA's mask
    /// paths). Removed paths are listed in `erased`.
    pub redact: Vec<String>,
}

/// One decision-log entry for an HTTP request, decided by the policies of
/// bundle revision `bundle_revision` (when they came from a bundle).
pub fn entry(
    ctx: &EntryContext,
    bundle_revision: Option<&str>,
    conn: &ConnectionInfo<'_>,
    req: &RequestInfo<'_>,
    decision: &Decision,
) -> Value {
    let mut result = match decision {
        Decision::Allow(p) => json!({
            "allowed": true,
            "policy": p.policy(),
            "rule": p.rule(),
            "provider": p.consulted().map(|p| p.as_str()),
        }),
        Decision::Deny(d) => json!({
            "allowed": false,
            "http_status": d.http_status().as_u16(),
            "reason": d.reason.as_str(),
            "policy": d.policy.as_deref(),
            "rule": d.rule.as_deref(),
        }),
    };
    // OPA-Envoy's `dynamic_metadata` goes where Envoy would put it: beside
    // the decision, for the logs.
    if let Some(m) = decision.dynamic_metadata() {
        result["dynamic_metadata"] = m.clone();
    }
    let mut e = json!({
        "decision_id": decision_id(),
        "labels": ctx.labels,
        "path": "rampart/authz",
        "input": crate::input::build(conn, req),
        "result": result,
        "timestamp": rfc3339(SystemTime::now()),
    });
    if let Some(rev) = bundle_revision {
        e["bundles"] = json!({"rampart": {"revision": rev}});
    }
    let mut erased = Vec::new();
    for pointer in &ctx.redact {
        if remove_pointer(&mut e, pointer) {
            erased.push(Value::String(pointer.clone()));
        }
    }
    if !erased.is_empty() {
        e["erased"] = Value::Array(erased);
    }
    e
}

fn remove_pointer(v: &mut Value, pointer: &str) -> bool {
    let Some((parent, last)) = pointer.rsplit_once('/') else {
        return false;
    };
    let last = last.replace("~1", "/").replace("~0", "~");
    match v.pointer_mut(parent) {
        Some(Value::Object(m)) => m.remove(&last).is_some(),
        Some(_) | None => false,
    }
}

fn decision_id() -> String {
    use ring::rand::SecureRandom as _;
    let mut b = [0u8; 16];
    // A failing system RNG leaves zeros: an id is for correlation only.
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// `2006-01-02T15:04:05.000000Z`, UTC.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's days-to-civil conversion.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_micros()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_drops_the_oldest_and_counts() {
        let q = DecisionLogQueue::new(3);
        for i in 0..5 {
            q.try_push(json!(i));
        }
        assert_eq!(q.len(), 3);
        assert_eq!(q.dropped(), 2);
        assert_eq!(q.take_batch(2), vec![json!(2), json!(3)]);
        q.try_push(json!(5));
        q.try_push(json!(6));
        // A failed batch goes back in front, and what does not fit is dropped.
        q.requeue(vec![json!(2), json!(3)]);
        assert_eq!(q.len(), 3);
        assert_eq!(q.dropped(), 4);
        assert_eq!(q.take_batch(10), vec![json!(4), json!(5), json!(6)]);
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let t = UNIX_EPOCH + std::time::Duration::from_micros(951_827_696_123_456);
        assert_eq!(rfc3339(t), "2000-02-29T12:34:56.123456Z");
    }

    #[test]
    fn redaction_removes_and_lists_paths() {
        let mut e = json!({"input": {"h": {"authorization": "x", "a/b": 1}}});
        assert!(remove_pointer(&mut e, "/input/h/authorization"));
        assert!(remove_pointer(&mut e, "/input/h/a~1b"));
        assert!(!remove_pointer(&mut e, "/input/nope/x"));
        assert_eq!(e, json!({"input": {"h": {}}}));
    }
}
