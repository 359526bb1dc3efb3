//! The proxy's metrics: names, units and descriptions in one place, label
//! values from closed enums only (no peer-chosen strings).
//!
//! The per-connection and per-request series (connections, bytes, detected
//! protocols, requests and their latency) are registered once and kept as
//! handles, so the hot path increments an atomic instead of hashing a key
//! and looking its series up. Handles are taken from the recorder installed
//! when they are first used: `rampart run` installs it before anything else,
//! and without one (metrics turned off) every handle is a no-op.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use metrics::{
    Counter, Gauge, Histogram, Unit, counter, describe_counter, describe_gauge, describe_histogram,
    gauge, histogram,
};

use crate::config::Direction;
use crate::detect::Protocol;

/// Connections accepted.
pub const CONNECTIONS_OPENED: &str = "rampart_tcp_connections_opened_total";
/// Connections closed.
pub const CONNECTIONS_CLOSED: &str = "rampart_tcp_connections_closed_total";
/// Connections open now.
pub const CONNECTIONS_ACTIVE: &str = "rampart_tcp_connections_active";
/// Bytes proxied.
pub const BYTES: &str = "rampart_tcp_bytes_total";
/// TLS handshakes by outcome.
pub const TLS_HANDSHAKES: &str = "rampart_tls_handshakes_total";
/// Authorization decisions.
pub const AUTHZ_DECISIONS: &str = "rampart_authz_decisions_total";
/// Connections that failed before or while forwarding.
pub const FORWARD_ERRORS: &str = "rampart_forward_errors_total";

/// HTTP requests answered, by status class.
pub const HTTP_REQUESTS: &str = "rampart_http_requests_total";
/// Time to response head, per request.
pub const HTTP_DURATION: &str = "rampart_http_request_duration_seconds";
/// Requests answered by the sidecar itself, by reason.
pub const HTTP_LOCAL_ERRORS: &str = "rampart_http_local_responses_total";
/// Connections by detected protocol.
pub const DETECTED: &str = "rampart_detected_protocol_total";
/// Policy reloads by result.
pub const POLICY_RELOADS: &str = "rampart_policy_reloads_total";
/// Connections whose first bytes did not arrive within the detect timeout.
pub const DETECT_TIMEOUTS: &str = "rampart_detect_timeouts_total";
/// Live opaque connections closed because a reloaded policy refuses them.
pub const CONNECTIONS_REVOKED: &str = "rampart_authz_connections_revoked_total";
/// Access events dropped because the writer fell behind.
pub const ACCESS_LOG_DROPPED: &str = "rampart_access_log_dropped_total";

/// How many distinct authenticated peers get a `peer_id` label of their own
/// on request metrics; later ones share `other`. Peers are identities the
/// mesh CA issued, and the cap keeps a compromised or misconfigured CA from
/// growing the series without bound.
pub const MAX_PEER_LABELS: usize = 64;
/// The `peer_id` of requests without a verified peer (plaintext), and of
/// outbound requests (the pooled connection's server identity is checked
/// during its handshake, not per request).
pub const PEER_NONE: &str = "none";
/// The `peer_id` of peers past [`MAX_PEER_LABELS`].
pub const PEER_OTHER: &str = "other";

/// Registers descriptions with the installed recorder.
pub fn describe() {
    describe_counter!(CONNECTIONS_OPENED, Unit::Count, "TCP connections accepted");
    describe_counter!(CONNECTIONS_CLOSED, Unit::Count, "TCP connections closed");
    describe_gauge!(CONNECTIONS_ACTIVE, Unit::Count, "TCP connections open now");
    describe_counter!(BYTES, Unit::Bytes, "Bytes proxied, by direction and flow");
    describe_counter!(TLS_HANDSHAKES, Unit::Count, "TLS handshakes by result");
    describe_counter!(AUTHZ_DECISIONS, Unit::Count, "Authorization decisions");
    describe_counter!(FORWARD_ERRORS, Unit::Count, "Failures to reach a target");
    describe_counter!(HTTP_REQUESTS, Unit::Count, "HTTP requests answered");
    describe_histogram!(
        HTTP_DURATION,
        Unit::Seconds,
        "Time from request head to response head"
    );
    describe_counter!(
        HTTP_LOCAL_ERRORS,
        Unit::Count,
        "HTTP requests answered by the sidecar (refusals, app failures)"
    );
    describe_counter!(DETECTED, Unit::Count, "Connections by detected protocol");
    describe_counter!(
        POLICY_RELOADS,
        Unit::Count,
        "Policy file reloads by result (error: the last good version stayed)"
    );
    describe_counter!(
        DETECT_TIMEOUTS,
        Unit::Count,
        "Connections that sent nothing decisive within the detect timeout (treated as opaque)"
    );
    describe_counter!(
        CONNECTIONS_REVOKED,
        Unit::Count,
        "Live opaque connections closed because a reloaded policy no longer allows them"
    );
    describe_counter!(
        ACCESS_LOG_DROPPED,
        Unit::Count,
        "Access events dropped because stdout could not keep up"
    );
}

/// The handles of one direction's per-connection series.
struct DirectionHandles {
    opened: Counter,
    closed: Counter,
    active: Gauge,
    to_target: Counter,
    to_client: Counter,
    detect_timeouts: Counter,
    /// Indexed by [`protocol_index`].
    detected: [Counter; 4],
}

impl DirectionHandles {
    fn register(direction: Direction) -> Self {
        let d = direction.as_str();
        let detected = |p: Protocol| counter!(DETECTED, "direction" => d, "protocol" => p.as_str());
        DirectionHandles {
            opened: counter!(CONNECTIONS_OPENED, "direction" => d),
            closed: counter!(CONNECTIONS_CLOSED, "direction" => d),
            active: gauge!(CONNECTIONS_ACTIVE, "direction" => d),
            to_target: counter!(BYTES, "direction" => d, "flow" => "to_target"),
            to_client: counter!(BYTES, "direction" => d, "flow" => "to_client"),
            detect_timeouts: counter!(DETECT_TIMEOUTS, "direction" => d),
            detected: [
                detected(Protocol::Tls),
                detected(Protocol::Http1),
                detected(Protocol::Http2),
                detected(Protocol::Opaque),
            ],
        }
    }
}

fn protocol_index(p: Protocol) -> usize {
    match p {
        Protocol::Tls => 0,
        Protocol::Http1 => 1,
        Protocol::Http2 => 2,
        Protocol::Opaque => 3,
    }
}

struct Handles {
    inbound: DirectionHandles,
    outbound: DirectionHandles,
    /// Request series by peer label, per direction (inbound first); at most
    /// [`MAX_PEER_LABELS`] + 2 entries each.
    requests: Mutex<[HashMap<String, Arc<RequestMetrics>>; 2]>,
}

fn handles() -> &'static Handles {
    static HANDLES: OnceLock<Handles> = OnceLock::new();
    HANDLES.get_or_init(|| Handles {
        inbound: DirectionHandles::register(Direction::Inbound),
        outbound: DirectionHandles::register(Direction::Outbound),
        requests: Mutex::new([HashMap::new(), HashMap::new()]),
    })
}

fn of(direction: Direction) -> &'static DirectionHandles {
    match direction {
        Direction::Inbound => &handles().inbound,
        Direction::Outbound => &handles().outbound,
    }
}

/// The request series of one direction and peer: looked up once per
/// connection, then used for every request on it.
#[derive(Debug)]
pub struct RequestMetrics {
    /// Indexed by status class: 1xx .. 5xx.
    by_class: [Counter; 5],
    duration: Histogram,
}

impl RequestMetrics {
    /// The series for requests in `direction` from `peer` (a verified
    /// identity; `None` for plaintext and outbound requests).
    pub fn for_peer(direction: Direction, peer: Option<&str>) -> Arc<RequestMetrics> {
        let h = handles();
        // A poisoned lock only means a panic while inserting; the maps are
        // still valid caches.
        let mut maps = h.requests.lock().unwrap_or_else(|e| e.into_inner());
        let map = match direction {
            Direction::Inbound => &mut maps[0],
            Direction::Outbound => &mut maps[1],
        };
        let label = match peer {
            None => PEER_NONE,
            Some(p) if map.contains_key(p) => p,
            Some(p) => {
                let distinct = map
                    .keys()
                    .filter(|l| l.as_str() != PEER_NONE && l.as_str() != PEER_OTHER)
                    .count();
                if distinct >= MAX_PEER_LABELS {
                    PEER_OTHER
                } else {
                    p
                }
            }
        };
        if let Some(m) = map.get(label) {
            return m.clone();
        }
        let m = Arc::new(RequestMetrics::register(direction, label));
        map.insert(label.to_owned(), m.clone());
        m
    }

    fn register(direction: Direction, peer: &str) -> Self {
        let d = direction.as_str();
        let class = |c: &'static str| counter!(HTTP_REQUESTS, "direction" => d, "status_class" => c, "peer_id" => peer.to_owned());
        RequestMetrics {
            by_class: [
                class("1xx"),
                class("2xx"),
                class("3xx"),
                class("4xx"),
                class("5xx"),
            ],
            duration: histogram!(HTTP_DURATION, "direction" => d, "peer_id" => peer.to_owned()),
        }
    }

    /// Counts an answered request and its latency.
    pub fn record(&self, status: http::StatusCode, elapsed: Duration) {
        let i = match status.as_u16() {
            100..=199 => 0,
            200..=299 => 1,
            300..=399 => 2,
            400..=499 => 3,
            _ => 4,
        };
        self.by_class[i].increment(1);
        self.duration.record(elapsed.as_secs_f64());
    }
}

/// Counts a connection for as long as it lives.
pub struct ConnectionGauge {
    direction: Direction,
}

impl ConnectionGauge {
    /// Counts a newly accepted connection.
    pub fn open(direction: Direction) -> Self {
        let h = of(direction);
        h.opened.increment(1);
        h.active.increment(1.0);
        ConnectionGauge { direction }
    }
}

impl Drop for ConnectionGauge {
    fn drop(&mut self) {
        let h = of(self.direction);
        h.closed.increment(1);
        h.active.decrement(1.0);
    }
}

/// Counts proxied bytes: `from_client` flowed client -> target.
pub fn bytes(direction: Direction, from_client: u64, to_client: u64) {
    let h = of(direction);
    h.to_target.increment(from_client);
    h.to_client.increment(to_client);
}

/// Counts a connection that sent nothing decisive before the detect timeout.
pub fn detect_timeout(direction: Direction) {
    of(direction).detect_timeouts.increment(1);
}

/// Counts an access event dropped because the writer fell behind.
pub fn access_log_dropped() {
    counter!(ACCESS_LOG_DROPPED).increment(1);
}

/// A TLS handshake's outcome: the `result` label of
/// `rampart_tls_handshakes_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeResult {
    /// Completed, peer verified.
    Ok,
    /// Refused before starting: the sidecar has no identity.
    NoIdentity,
    /// Failed, for this reason.
    Failed(HandshakeFailure),
}

/// Why a handshake failed (see `tls::HandshakeError`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// The client sent no certificate.
    NoClientCert,
    /// The peer's chain does not lead to a trusted root of its trust domain.
    UnknownCa,
    /// The peer's identity is not accepted here.
    IdNotAllowed,
    /// The peer's certificate is expired or not yet valid.
    Expired,
    /// The peer's leaf breaks an X.509-SVID rule.
    InvalidSvid,
    /// Anything else the peer got wrong.
    ProtocolError,
    /// The handshake did not finish in time.
    Timeout,
    /// No peer identity after a completed handshake (a bug).
    NoPeerId,
}

impl HandshakeResult {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeResult::Ok => "ok",
            HandshakeResult::NoIdentity => "no_identity",
            HandshakeResult::Failed(f) => match f {
                HandshakeFailure::NoClientCert => "no_client_cert",
                HandshakeFailure::UnknownCa => "unknown_ca",
                HandshakeFailure::IdNotAllowed => "id_not_allowed",
                HandshakeFailure::Expired => "expired",
                HandshakeFailure::InvalidSvid => "invalid_svid",
                HandshakeFailure::ProtocolError => "protocol_error",
                HandshakeFailure::Timeout => "timeout",
                HandshakeFailure::NoPeerId => "no_peer_id",
            },
        }
    }
}

/// Counts a handshake outcome.
pub fn handshake(direction: Direction, result: HandshakeResult) {
    counter!(TLS_HANDSHAKES, "direction" => direction.as_str(), "result" => result.as_str())
        .increment(1);
}

/// Counts an authorization decision. `policy` and `rule` name what decided
/// (`-` when nothing did); they come from the operator's policy files, never
/// from a peer, so the series are bounded by the configuration.
pub fn decision(decision: &rampart_authz::Decision) {
    let (action, reason, policy, rule) = match decision {
        rampart_authz::Decision::Allow(p) => ("allow", "matched", p.policy(), p.rule()),
        rampart_authz::Decision::Deny(d) => (
            "deny",
            d.reason.as_str(),
            d.policy.as_deref().unwrap_or("-"),
            d.rule.as_deref().unwrap_or("-"),
        ),
    };
    // Policy and rule names come from the loaded policy files, so the set is
    // bounded; cache one counter handle per combination so the request path
    // neither builds label strings nor looks the series up by name.
    DECISION_COUNTERS.with(|cache| {
        let mut cache = cache.borrow_mut();
        let hit = cache.iter().find(|e| {
            e.action == action && e.reason == reason && e.policy == policy && e.rule == rule
        });
        if let Some(e) = hit {
            e.counter.increment(1);
            return;
        }
        let counter = counter!(
            AUTHZ_DECISIONS,
            "action" => action,
            "reason" => reason,
            "policy" => policy.to_owned(),
            "rule" => rule.to_owned()
        );
        counter.increment(1);
        // Reloads can rename policies; start over rather than grow without bound.
        if cache.len() >= MAX_CACHED_DECISION_SERIES {
            cache.clear();
        }
        cache.push(DecisionCounter {
            action,
            reason,
            policy: policy.to_owned(),
            rule: rule.to_owned(),
            counter,
        });
    });
}

const MAX_CACHED_DECISION_SERIES: usize = 256;

struct DecisionCounter {
    action: &'static str,
    reason: &'static str,
    policy: String,
    rule: String,
    counter: metrics::Counter,
}

thread_local! {
    static DECISION_COUNTERS: std::cell::RefCell<Vec<DecisionCounter>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Why a connection failed before or while forwarding: the `reason` label
/// of `rampart_forward_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardFailure {
    /// A captured connection without an original destination.
    NoOriginalDst,
    /// A captured connection whose original destination is the listener
    /// itself (forwarding would loop).
    OriginalDstLoop,
    /// An outbound destination in the mesh that no server rule covers.
    NoServerRule,
    /// The target refused or reset the connection.
    ConnectRefused,
    /// The target did not answer in time.
    ConnectTimeout,
}

impl ForwardFailure {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ForwardFailure::NoOriginalDst => "no_original_dst",
            ForwardFailure::OriginalDstLoop => "original_dst_loop",
            ForwardFailure::NoServerRule => "no_server_rule",
            ForwardFailure::ConnectRefused => "connect_refused",
            ForwardFailure::ConnectTimeout => "connect_timeout",
        }
    }
}

/// Counts a forwarding failure.
pub fn forward_error(direction: Direction, reason: ForwardFailure) {
    counter!(FORWARD_ERRORS, "direction" => direction.as_str(), "reason" => reason.as_str())
        .increment(1);
}

/// Why the sidecar answered an HTTP request itself: the `reason` label of
/// `rampart_http_local_responses_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalReason {
    /// No origin-form target.
    NoPath,
    /// A path that cannot be normalized safely.
    BadPath,
    /// Refused by policy.
    Denied,
    /// The app refused, reset or broke the exchange.
    AppUnreachable,
    /// The app did not answer in time.
    AppTimeout,
    /// The client's request body stopped moving.
    UploadStalled,
    /// A tunnel to an app declared `http2` or `grpc`.
    TunnelUnsupported,
    /// No upgrade handle on a tunnel request (a bug).
    NotUpgradable,
    /// Outbound: the sidecar has no identity.
    NoIdentity,
    /// Outbound: the peer sidecar could not be reached or broke the exchange.
    PeerUnreachable,
    /// Outbound: the peer sidecar's identity is not the expected one.
    PeerNotAllowed,
    /// Outbound: the handshake with the peer sidecar failed otherwise.
    PeerHandshakeFailed,
    /// Outbound: the peer sidecar did not answer in time.
    PeerTimeout,
    /// Outbound: the pooled connection limit was reached.
    PoolFull,
    /// Outbound: a request the sidecar cannot address to the peer (a bug).
    Internal,
}

impl LocalReason {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            LocalReason::NoPath => "no_path",
            LocalReason::BadPath => "bad_path",
            LocalReason::Denied => "denied",
            LocalReason::AppUnreachable => "app_unreachable",
            LocalReason::AppTimeout => "app_timeout",
            LocalReason::UploadStalled => "upload_stalled",
            LocalReason::TunnelUnsupported => "tunnel_unsupported",
            LocalReason::NotUpgradable => "not_upgradable",
            LocalReason::NoIdentity => "no_identity",
            LocalReason::PeerUnreachable => "peer_unreachable",
            LocalReason::PeerNotAllowed => "peer_not_allowed",
            LocalReason::PeerHandshakeFailed => "peer_handshake_failed",
            LocalReason::PeerTimeout => "peer_timeout",
            LocalReason::PoolFull => "pool_full",
            LocalReason::Internal => "internal",
        }
    }
}

/// Counts a request the sidecar answered itself.
pub fn http_local_error(direction: Direction, reason: LocalReason) {
    counter!(HTTP_LOCAL_ERRORS, "direction" => direction.as_str(), "reason" => reason.as_str())
        .increment(1);
}

/// Counts an opaque connection closed because a reloaded policy no longer
/// allows it.
pub fn connection_revoked() {
    counter!(CONNECTIONS_REVOKED).increment(1);
}

/// Counts a connection's detected protocol.
pub fn detected(direction: Direction, protocol: Protocol) {
    of(direction).detected[protocol_index(protocol)].increment(1);
}

/// Outcome of a policy reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadResult {
    /// The new version is in force.
    Ok,
    /// The new version was refused; the last good one stays.
    Error,
}

/// Counts a policy reload.
pub fn policy_reload(result: ReloadResult) {
    let r = match result {
        ReloadResult::Ok => "ok",
        ReloadResult::Error => "error",
    };
    counter!(POLICY_RELOADS, "result" => r).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_labels_are_capped() {
        let label_count = || {
            let maps = handles().requests.lock().unwrap();
            maps[0].len()
        };
        let a = RequestMetrics::for_peer(Direction::Inbound, Some("spiffe://t/a"));
        let again = RequestMetrics::for_peer(Direction::Inbound, Some("spiffe://t/a"));
        assert!(Arc::ptr_eq(&a, &again), "one series per peer");
        for i in 0..(MAX_PEER_LABELS + 10) {
            RequestMetrics::for_peer(Direction::Inbound, Some(&format!("spiffe://t/{i}")));
        }
        RequestMetrics::for_peer(Direction::Inbound, None);
        // MAX_PEER_LABELS peers, `other` and `none`.
        assert_eq!(label_count(), MAX_PEER_LABELS + 2);
        let maps = handles().requests.lock().unwrap();
        assert!(maps[0].contains_key(PEER_OTHER) && maps[0].contains_key(PEER_NONE));
        assert!(maps[1].is_empty(), "outbound untouched");
    }
}
