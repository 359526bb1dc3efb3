//! Access events: one JSON line on stdout per HTTP request or TCP
//! connection, when it completes (`log.access: true`). Denials are written
//! even when access logs are off, at most `denials_per_second` a second,
//! with one line counting those suppressed.
//!
//! An event holds addresses, the peer's SPIFFE ID (verified), method,
//! normalized path, status, decision, timing and sizes: never bodies,
//! query strings or header values.
//!
//! Lines are written by one thread of their own, fed through a bounded
//! queue: a slow or blocked stdout (a full pipe to a log collector) never
//! stalls a request. When the queue is full the event is dropped and
//! counted (`rampart_access_log_dropped_total`).

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::config::Direction;

/// The authorization outcome of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict<'a> {
    /// Allowed by `policy`'s `rule`.
    Allow {
        /// The policy.
        policy: &'a str,
        /// The rule.
        rule: &'a str,
    },
    /// Denied, for `reason`, by `policy` and `rule` when one decided.
    Deny {
        /// Why (a closed set of labels).
        reason: &'static str,
        /// The deciding policy, if any.
        policy: Option<&'a str>,
        /// The deciding rule, if any.
        rule: Option<&'a str>,
    },
    /// Not authorized here (outbound traffic, or refused before authz).
    NotApplicable,
}

/// One completed request or connection.
#[derive(Debug, Clone)]
pub struct Event<'a> {
    /// Inbound or outbound.
    pub direction: Direction,
    /// The verified peer, if any.
    pub peer: Option<&'a str>,
    /// Source address.
    pub source: SocketAddr,
    /// Destination address (original destination).
    pub destination: SocketAddr,
    /// HTTP method (`None` for TCP).
    pub method: Option<&'a str>,
    /// Normalized path without the query (`None` for TCP).
    pub path: Option<&'a str>,
    /// HTTP status (`None` for TCP).
    pub status: Option<u16>,
    /// The decision.
    pub verdict: Verdict<'a>,
    /// Time to completion (HTTP: to the response head).
    pub duration: Duration,
    /// Bytes from the client (HTTP: declared `content-length`, if any).
    pub bytes_in: Option<u64>,
    /// Bytes to the client (HTTP: declared `content-length`, if any).
    pub bytes_out: Option<u64>,
    /// Values of the request headers the operator chose to log
    /// (`log.access_headers`), as received.
    pub headers: &'a [(http::HeaderName, String)],
    /// The `dynamic_metadata` a Rego (OPA-Envoy) result set, written as
    /// Envoy's ext_authz filter leaves it (`envoy.filters.http.ext_authz`).
    pub dynamic_metadata: Option<&'a serde_json::Value>,
}

/// The values of `names` in `headers`, for an access event (lossy UTF-8;
/// absent headers are left out).
pub fn pick_headers(
    names: &[http::HeaderName],
    headers: &http::HeaderMap,
) -> Vec<(http::HeaderName, String)> {
    names
        .iter()
        .filter_map(|n| {
            let v = headers.get(n)?;
            Some((
                n.clone(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            ))
        })
        .collect()
}

/// Writes access events.
#[derive(Debug)]
pub struct AccessLog {
    enabled: bool,
    denials_per_second: u32,
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    start: Instant,
    written: u32,
    suppressed: u64,
}

impl AccessLog {
    /// Every event when `enabled`; otherwise denials only, rate-limited.
    pub fn new(enabled: bool, denials_per_second: u32) -> Self {
        AccessLog {
            enabled,
            denials_per_second,
            window: Mutex::new(Window {
                start: Instant::now(),
                written: 0,
                suppressed: 0,
            }),
        }
    }

    /// Whether every event is written (callers may skip building events).
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// Writes `event` if the settings say so.
    pub fn record(&self, event: &Event<'_>) {
        if self.enabled {
            write_line(&render(event));
            return;
        }
        match event.verdict {
            Verdict::Deny { .. } => {}
            Verdict::Allow { .. } | Verdict::NotApplicable => return,
        }
        let mut suppressed_line = None;
        {
            // Only denials, while access logs are off, take this lock.
            let Ok(mut w) = self.window.lock() else {
                return;
            };
            if w.start.elapsed() >= Duration::from_secs(1) {
                if w.suppressed > 0 {
                    suppressed_line = Some(w.suppressed);
                }
                *w = Window {
                    start: Instant::now(),
                    written: 0,
                    suppressed: 0,
                };
            }
            if w.written >= self.denials_per_second {
                w.suppressed += 1;
                return;
            }
            w.written += 1;
        }
        if let Some(n) = suppressed_line {
            write_line(&serde_json::json!({
                "time": now_rfc3339ish(),
                "event": "denials_suppressed",
                "count": n,
            }));
        }
        write_line(&render(event));
    }
}

/// An access event in the making: opened when a connection reaches the
/// authz stage or a request arrives, filled in by the stages it passes,
/// and recorded exactly once, when it is dropped (the connection or the
/// request ended, whichever way). Nothing is copied for it unless the
/// event will be written (access logs on, or a denial).
#[derive(Debug)]
pub struct Pending<'a> {
    log: &'a AccessLog,
    started: Instant,
    direction: Direction,
    source: SocketAddr,
    destination: SocketAddr,
    peer: Option<std::borrow::Cow<'a, str>>,
    method: Option<http::Method>,
    path: Option<String>,
    status: Option<u16>,
    verdict: OwnedVerdict,
    bytes_in: Option<u64>,
    bytes_out: Option<u64>,
    headers: Vec<(http::HeaderName, String)>,
    dynamic_metadata: Option<serde_json::Value>,
}

/// [`Verdict`] with owned names.
#[derive(Debug)]
enum OwnedVerdict {
    NotApplicable,
    Allow {
        policy: std::sync::Arc<str>,
        rule: std::sync::Arc<str>,
    },
    Deny {
        reason: &'static str,
        policy: Option<std::sync::Arc<str>>,
        rule: Option<std::sync::Arc<str>>,
    },
}

impl<'a> Pending<'a> {
    /// Opens the event of a connection or request from `source` to
    /// `destination`, starting its clock now.
    pub fn open(
        log: &'a AccessLog,
        direction: Direction,
        source: SocketAddr,
        destination: SocketAddr,
    ) -> Self {
        Pending {
            log,
            started: Instant::now(),
            direction,
            source,
            destination,
            peer: None,
            method: None,
            path: None,
            status: None,
            verdict: OwnedVerdict::NotApplicable,
            bytes_in: None,
            bytes_out: None,
            headers: Vec::new(),
            dynamic_metadata: None,
        }
    }

    /// Whether this event will be written: access logs are on, or it is a
    /// denial. Callers copy request details only when it is.
    pub fn is_recorded(&self) -> bool {
        self.log.enabled || matches!(self.verdict, OwnedVerdict::Deny { .. })
    }

    /// Whether every event is written (details worth copying up front).
    pub fn log_enabled(&self) -> bool {
        self.log.enabled
    }

    /// The verified peer, borrowed from the connection.
    pub fn peer(&mut self, peer: Option<&'a str>) {
        self.peer = peer.map(std::borrow::Cow::Borrowed);
    }

    /// The verified peer, copied (the connection moves on); only when the
    /// event will be written.
    pub fn peer_copied(&mut self, peer: Option<&str>) {
        if self.is_recorded() {
            self.peer = peer.map(|p| std::borrow::Cow::Owned(p.to_owned()));
        }
    }

    /// The request's method and the operator-chosen headers
    /// (`log.access_headers`).
    pub fn request(
        &mut self,
        method: &http::Method,
        headers: &http::HeaderMap,
        names: &[http::HeaderName],
    ) {
        self.method = Some(method.clone());
        self.bytes_in = crate::http::content_length(headers);
        if self.log.enabled && !names.is_empty() {
            self.headers = pick_headers(names, headers);
        }
    }

    /// The normalized path (copied: callers call this only when the event
    /// will be written, that is with access logs on or for a denial).
    pub fn path(&mut self, path: &str) {
        self.path = Some(path.to_owned());
    }

    /// The authorization decision (copied only when the event will be
    /// written; a denial always is).
    pub fn decided(&mut self, decision: &rampart_authz::Decision) {
        let recorded = self.log.enabled || matches!(decision, rampart_authz::Decision::Deny(_));
        if recorded {
            self.dynamic_metadata = decision.dynamic_metadata().cloned();
        }
        match decision {
            rampart_authz::Decision::Allow(p) if self.log.enabled => {
                self.verdict = OwnedVerdict::Allow {
                    policy: p.policy().into(),
                    rule: p.rule().into(),
                };
            }
            rampart_authz::Decision::Allow(_) => {}
            rampart_authz::Decision::Deny(d) => {
                self.verdict = OwnedVerdict::Deny {
                    reason: d.reason.as_str(),
                    policy: d.policy.clone(),
                    rule: d.rule.clone(),
                };
            }
        }
    }

    /// The response head sent to the client.
    pub fn response(&mut self, status: http::StatusCode, headers: &http::HeaderMap) {
        self.status = Some(status.as_u16());
        self.bytes_out = crate::http::content_length(headers);
    }

    /// Time since the event was opened.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Bytes moved by a spliced connection.
    pub fn bytes(&mut self, from_client: u64, to_client: u64) {
        self.bytes_in = Some(from_client);
        self.bytes_out = Some(to_client);
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.is_recorded() {
            return;
        }
        let verdict = match &self.verdict {
            OwnedVerdict::NotApplicable => Verdict::NotApplicable,
            OwnedVerdict::Allow { policy, rule } => Verdict::Allow { policy, rule },
            OwnedVerdict::Deny {
                reason,
                policy,
                rule,
            } => Verdict::Deny {
                reason,
                policy: policy.as_deref(),
                rule: rule.as_deref(),
            },
        };
        self.log.record(&Event {
            direction: self.direction,
            peer: self.peer.as_deref(),
            source: self.source,
            destination: self.destination,
            method: self.method.as_ref().map(http::Method::as_str),
            path: self.path.as_deref(),
            status: self.status,
            verdict,
            duration: self.started.elapsed(),
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            headers: &self.headers,
            dynamic_metadata: self.dynamic_metadata.as_ref(),
        });
    }
}

/// Lines queued for the writer thread at most; past that, events are dropped.
const QUEUE_LINES: usize = 4096;

/// Lines queued and not yet written (for [`flush`]).
static PENDING: AtomicUsize = AtomicUsize::new(0);

/// The queue to the writer thread, started with the first line.
fn writer() -> &'static SyncSender<String> {
    static WRITER: OnceLock<SyncSender<String>> = OnceLock::new();
    WRITER.get_or_init(|| {
        let (queue, lines) = std::sync::mpsc::sync_channel(QUEUE_LINES);
        let spawned = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(lines));
        if let Err(e) = spawned {
            // Without the thread the queue fills and events are counted as
            // dropped; requests are unaffected.
            tracing::error!(error = %e, "cannot start the access log writer");
        }
        queue
    })
}

/// The writer thread: writes each line, flushing whenever the queue is
/// empty, so lines appear promptly but bursts cost one write per batch.
fn write_lines(lines: Receiver<String>) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout());
    while let Ok(line) = lines.recv() {
        // stdout gone (closed pipe) is not worth failing anything over.
        let _ = out.write_all(line.as_bytes());
        let mut written = 1;
        while let Ok(line) = lines.try_recv() {
            let _ = out.write_all(line.as_bytes());
            written += 1;
        }
        let _ = out.flush();
        PENDING.fetch_sub(written, Ordering::AcqRel);
    }
}

fn write_line(v: &serde_json::Value) {
    PENDING.fetch_add(1, Ordering::AcqRel);
    match writer().try_send(format!("{v}\n")) {
        Ok(()) => {}
        Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
            PENDING.fetch_sub(1, Ordering::AcqRel);
            crate::metrics::access_log_dropped();
        }
    }
}

/// Waits (blocking, up to `within`) until every queued access line is
/// written: called once at shutdown so the last events are not lost.
pub fn flush(within: Duration) {
    let deadline = Instant::now() + within;
    while PENDING.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Seconds since the epoch with milliseconds, e.g. `1732400000.123`.
fn now_rfc3339ish() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}.{:03}", d.as_secs(), d.subsec_millis())
}

fn render(e: &Event<'_>) -> serde_json::Value {
    let (decision, policy, rule, reason) = match e.verdict {
        Verdict::Allow { policy, rule } => ("allow", Some(policy), Some(rule), None),
        Verdict::Deny {
            reason,
            policy,
            rule,
        } => ("deny", policy, rule, Some(reason)),
        Verdict::NotApplicable => ("none", None, None, None),
    };
    let mut v = serde_json::json!({
        "time": now_rfc3339ish(),
        "event": if e.method.is_some() { "http" } else { "tcp" },
        "direction": e.direction.as_str(),
        "peer.id": e.peer,
        "src.addr": e.source.to_string(),
        "dst.addr": e.destination.to_string(),
        "method": e.method,
        "path": e.path,
        "status": e.status,
        "authz.decision": decision,
        "authz.policy": policy,
        "authz.rule": rule,
        "authz.reason": reason,
        "duration_ms": e.duration.as_secs_f64() * 1000.0,
        "bytes.in": e.bytes_in,
        "bytes.out": e.bytes_out,
    });
    if !e.headers.is_empty() {
        let headers: serde_json::Map<String, serde_json::Value> = e
            .headers
            .iter()
            .map(|(n, val)| (n.as_str().to_owned(), val.clone().into()))
            .collect();
        v["headers"] = headers.into();
    }
    if let Some(m) = e.dynamic_metadata {
        v["dynamic_metadata"] = serde_json::json!({"envoy.filters.http.ext_authz": m});
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_carry_no_query() {
        let md = serde_json::json!({"decision_id": "d1", "tenant": "a"});
        let e = Event {
            direction: Direction::Inbound,
            peer: Some("spiffe://example.org/a"),
            source: "127.0.0.1:1".parse().unwrap(),
            destination: "127.0.0.1:2".parse().unwrap(),
            method: Some("GET"),
            path: Some("/data"),
            status: Some(200),
            verdict: Verdict::Allow {
                policy: "p",
                rule: "r",
            },
            duration: Duration::from_micros(1500),
            bytes_in: None,
            bytes_out: Some(3),
            headers: &[],
            dynamic_metadata: Some(&md),
        };
        let v = render(&e);
        assert_eq!(v["authz.policy"], "p");
        assert_eq!(v["path"], "/data");
        assert_eq!(v["event"], "http");
        // A Rego result's dynamic_metadata, where Envoy's ext_authz puts it.
        assert_eq!(v["dynamic_metadata"]["envoy.filters.http.ext_authz"], md);
    }

    #[test]
    fn denials_are_rate_limited_when_access_logs_are_off() {
        let log = AccessLog::new(false, 2);
        let deny = Verdict::Deny {
            reason: "not_allowed",
            policy: None,
            rule: None,
        };
        let e = Event {
            direction: Direction::Inbound,
            peer: None,
            source: "127.0.0.1:1".parse().unwrap(),
            destination: "127.0.0.1:2".parse().unwrap(),
            method: None,
            path: None,
            status: None,
            verdict: deny,
            duration: Duration::ZERO,
            bytes_in: None,
            bytes_out: None,
            headers: &[],
            dynamic_metadata: None,
        };
        assert!(render(&e).get("dynamic_metadata").is_none());
        for _ in 0..5 {
            log.record(&e);
        }
        let w = log.window.lock().unwrap();
        assert_eq!((w.written, w.suppressed), (2, 3));
    }
}
