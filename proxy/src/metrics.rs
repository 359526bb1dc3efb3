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

/// HTTP requests answered, by source and destination workload, destination
/// service and status code.
pub const HTTP_REQUESTS: &str = "rampart_http_requests_total";
/// Time to response head, per request, in milliseconds (the unit of
/// Istio's `istio_request_duration_milliseconds` and Linkerd's
/// `response_latency_ms`, so their dashboards' bucket queries carry over).
pub const HTTP_DURATION: &str = "rampart_http_request_duration_milliseconds";
/// The histogram buckets of [`HTTP_DURATION`], in milliseconds.
pub const HTTP_DURATION_BUCKETS_MS: [f64; 17] = [
    0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
    30000.0, 60000.0, 300000.0,
];
/// Requests answered by the sidecar itself, by reason.
pub const HTTP_LOCAL_ERRORS: &str = "rampart_http_local_responses_total";
/// Connections by detected protocol.
pub const DETECTED: &str = "rampart_detected_protocol_total";
/// Policy reloads by result.
pub const POLICY_RELOADS: &str = "rampart_policy_reloads_total";
/// Connections whose first bytes did not arrive within the detect timeout.
pub const DETECT_TIMEOUTS: &str = "rampart_detect_timeouts_total";
/// Live connections closed because a reloaded policy refuses them.
pub const CONNECTIONS_REVOKED: &str = "rampart_authz_connections_revoked_total";
/// Access events dropped because the writer fell behind.
pub const ACCESS_LOG_DROPPED: &str = "rampart_access_log_dropped_total";
/// Admin API requests refused because a loopback-only path was asked from
/// outside the pod.
pub const ADMIN_REFUSED: &str = "rampart_admin_requests_refused_total";
/// Times a listener had no free connection slot (`limits.max_connections`).
pub const LISTENER_FULL: &str = "rampart_tcp_listener_full_total";
/// Connections closed at accept because their source had
/// `limits.max_pending_per_source` connections in handshake or detection.
pub const SOURCE_PENDING_REFUSED: &str = "rampart_tcp_source_pending_refused_total";

/// How many distinct workload identities get a label value of their own
/// (in `source_id` and `destination_id` together); later ones share
/// `other`. Identities are ones the mesh CA issued, and the cap keeps a
/// compromised or misconfigured CA from growing the series without bound.
pub const MAX_PEER_LABELS: usize = 64;
/// How many distinct `destination_service` values there are, at most, per
/// direction; later ones share `other`.
pub const MAX_SERVICE_LABELS: usize = 64;
/// How many status codes outside the common ones get a `status_code` of
/// their own per series; later ones are `other`.
const MAX_RARE_CODES: usize = 16;
/// The identity label of a side without a verified identity (a plaintext
/// client, an outbound request that reached no peer sidecar).
pub const PEER_NONE: &str = "none";
/// The label value past a cap.
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
        Unit::Milliseconds,
        "Time from request head to response head, in milliseconds"
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
        "Live connections closed because a reloaded policy no longer allows them (protocol: opaque, or http when it allows the peer no request)"
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
    /// Request series per direction (inbound first).
    requests: Mutex<[RequestSeriesMap; 2]>,
}

/// One direction's request series and the label values given out so far.
#[derive(Default)]
struct RequestSeriesMap {
    series: HashMap<SeriesKey, Arc<RequestMetrics>>,
    identities: Vec<String>,
    services: Vec<String>,
}

impl RequestSeriesMap {
    /// The series for `labels`, registered on first use; values past the
    /// caps become `other`.
    fn series_for(
        &mut self,
        direction: Direction,
        labels: RequestLabels<'_>,
    ) -> Arc<RequestMetrics> {
        let source = capped(&mut self.identities, labels.source_id, MAX_PEER_LABELS);
        let destination = capped(&mut self.identities, labels.destination_id, MAX_PEER_LABELS);
        let service = capped(
            &mut self.services,
            labels.destination_service,
            MAX_SERVICE_LABELS,
        );
        let key = SeriesKey {
            source,
            destination,
            service,
        };
        if let Some(m) = self.series.get(&key) {
            return m.clone();
        }
        let d = direction.as_str();
        let m = Arc::new(RequestMetrics {
            direction: d,
            duration: histogram!(HTTP_DURATION, "direction" => d,
                "source_id" => key.source.clone(), "destination_id" => key.destination.clone(),
                "destination_service" => key.service.clone()),
            source: key.source.clone(),
            destination: key.destination.clone(),
            service: key.service.clone(),
            common: std::array::from_fn(|_| OnceLock::new()),
            rare: Mutex::new(Vec::new()),
        });
        self.series.insert(key, m.clone());
        m
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct SeriesKey {
    source: String,
    destination: String,
    service: String,
}

fn handles() -> &'static Handles {
    static HANDLES: OnceLock<Handles> = OnceLock::new();
    HANDLES.get_or_init(|| Handles {
        inbound: DirectionHandles::register(Direction::Inbound),
        outbound: DirectionHandles::register(Direction::Outbound),
        requests: Mutex::new([RequestSeriesMap::default(), RequestSeriesMap::default()]),
    })
}

fn of(direction: Direction) -> &'static DirectionHandles {
    match direction {
        Direction::Inbound => &handles().inbound,
        Direction::Outbound => &handles().outbound,
    }
}

/// Who a request went from and to: the labels of its series.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestLabels<'a> {
    /// The client workload's verified SPIFFE ID (inbound: the peer;
    /// outbound: this sidecar's own).
    pub source_id: Option<&'a str>,
    /// The server workload's verified SPIFFE ID (inbound: this sidecar's
    /// own; outbound: the peer sidecar's, from its handshake).
    pub destination_id: Option<&'a str>,
    /// The destination service: the address the request was sent to
    /// (outbound: the app's original destination; inbound: the address the
    /// client dialed). Service discovery will put the Service name here.
    pub destination_service: Option<&'a str>,
}

/// Status codes that get a pre-sized slot (the codes apps and proxies
/// answer most); others are looked up under a lock.
const COMMON_CODES: [u16; 18] = [
    200, 201, 202, 204, 206, 301, 302, 304, 400, 401, 403, 404, 409, 429, 500, 502, 503, 504,
];

/// The request series of one direction and source, destination and
/// service: looked up once per connection (or per peer change), then used
/// for every request on it.
#[derive(Debug)]
pub struct RequestMetrics {
    direction: &'static str,
    source: String,
    destination: String,
    service: String,
    /// Indexed like [`COMMON_CODES`]; registered on first use.
    common: [OnceLock<Counter>; COMMON_CODES.len()],
    /// Other codes, at most [`MAX_RARE_CODES`], then `other`.
    rare: Mutex<Vec<(u16, Counter)>>,
    duration: Histogram,
}

impl RequestMetrics {
    /// The series for requests in `direction` from `peer` to this sidecar
    /// (inbound) or from this sidecar (outbound), without a destination.
    pub fn for_peer(direction: Direction, peer: Option<&str>) -> Arc<RequestMetrics> {
        RequestMetrics::for_request(
            direction,
            RequestLabels {
                source_id: peer,
                ..RequestLabels::default()
            },
        )
    }

    /// The series for requests with these labels; values past the caps
    /// become `other`.
    pub fn for_request(direction: Direction, labels: RequestLabels<'_>) -> Arc<RequestMetrics> {
        let h = handles();
        // A poisoned lock only means a panic while inserting; the maps are
        // still valid caches.
        let mut maps = h.requests.lock().unwrap_or_else(|e| e.into_inner());
        let map = match direction {
            Direction::Inbound => &mut maps[0],
            Direction::Outbound => &mut maps[1],
        };
        map.series_for(direction, labels)
    }

    /// Counts an answered request and its latency.
    pub fn record(&self, status: http::StatusCode, elapsed: Duration) {
        let code = status.as_u16();
        match COMMON_CODES.iter().position(|c| *c == code) {
            Some(i) => self.common[i]
                .get_or_init(|| self.counter(status, code_label(code)))
                .increment(1),
            None => self.rare_counter(status).increment(1),
        }
        self.duration.record(elapsed.as_secs_f64() * 1000.0);
    }

    fn rare_counter(&self, status: http::StatusCode) -> Counter {
        let code = status.as_u16();
        // Poisoning needs a panic while pushing; the list stays usable.
        let mut rare = self.rare.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, c)) = rare.iter().find(|(c, _)| *c == code) {
            return c.clone();
        }
        let label = if rare.len() < MAX_RARE_CODES {
            code_label(code)
        } else {
            PEER_OTHER.into()
        };
        let counter = self.counter(status, label);
        if rare.len() < MAX_RARE_CODES {
            rare.push((code, counter.clone()));
        }
        counter
    }

    fn counter(&self, status: http::StatusCode, code: std::borrow::Cow<'static, str>) -> Counter {
        let class = match status.as_u16() {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        counter!(HTTP_REQUESTS, "direction" => self.direction,
            "source_id" => self.source.clone(), "destination_id" => self.destination.clone(),
            "destination_service" => self.service.clone(),
            "status_code" => code, "status_class" => class)
    }
}

/// The verified identity of the peer sidecar at the other end of a pooled
/// connection; the pool puts it in every response's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestinationId(pub Arc<str>);

/// The request series of one app connection whose destination identity is
/// known per response (outbound: the pooled connection that carried it):
/// the last one used is kept, so a lookup happens only when it changes.
#[derive(Debug)]
pub struct PerDestination {
    direction: Direction,
    source: Option<String>,
    service: String,
    /// The last destination's series: read without a lock on every
    /// request (an atomic load), replaced when the destination changes.
    last: arc_swap::ArcSwapOption<(Arc<str>, Arc<RequestMetrics>)>,
    unknown: OnceLock<Arc<RequestMetrics>>,
}

impl PerDestination {
    /// Series for requests from `source` to `service`.
    pub fn new(direction: Direction, source: Option<&str>, service: &str) -> Self {
        PerDestination {
            direction,
            source: source.map(str::to_owned),
            service: service.to_owned(),
            last: arc_swap::ArcSwapOption::empty(),
            unknown: OnceLock::new(),
        }
    }

    /// The series for a response from `destination` (`None`: no peer
    /// answered, e.g. the sidecar's own 502).
    pub fn get(&self, destination: Option<&DestinationId>) -> Arc<RequestMetrics> {
        let Some(DestinationId(dst)) = destination else {
            return self
                .unknown
                .get_or_init(|| RequestMetrics::for_request(self.direction, self.labels(None)))
                .clone();
        };
        if let Some(last) = self.last.load().as_deref()
            && (Arc::ptr_eq(&last.0, dst) || *last.0 == **dst)
        {
            return last.1.clone();
        }
        let m = RequestMetrics::for_request(self.direction, self.labels(Some(dst)));
        self.last.store(Some(Arc::new((dst.clone(), m.clone()))));
        m
    }

    fn labels<'a>(&'a self, destination_id: Option<&'a str>) -> RequestLabels<'a> {
        RequestLabels {
            source_id: self.source.as_deref(),
            destination_id,
            destination_service: Some(&self.service),
        }
    }
}

fn code_label(code: u16) -> std::borrow::Cow<'static, str> {
    std::borrow::Cow::Owned(code.to_string())
}

/// `value`, or `none` when absent, or `other` once `given` holds `cap`
/// other values.
fn capped(given: &mut Vec<String>, value: Option<&str>, cap: usize) -> String {
    let Some(value) = value else {
        return PEER_NONE.to_owned();
    };
    if given.iter().any(|g| g == value) {
        return value.to_owned();
    }
    if given.len() >= cap {
        return PEER_OTHER.to_owned();
    }
    given.push(value.to_owned());
    value.to_owned()
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
    /// Discovery attributes the destination to a pod whose identity
    /// cannot be derived (fail closed).
    UnverifiableEndpoint,
    /// A discovered service had no endpoint to open the connection to.
    NoEndpoint,
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
            ForwardFailure::UnverifiableEndpoint => "unverifiable_endpoint",
            ForwardFailure::NoEndpoint => "no_endpoint",
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
    /// A JWT that does not verify (RequestAuthentication): 401.
    JwtInvalid,
    /// The app refused, reset or broke the exchange.
    AppUnreachable,
    /// The app did not answer in time.
    AppTimeout,
    /// The client's request body stopped moving.
    UploadStalled,
    /// A body over a Rego policy's `with_request_body.max_request_bytes`: 413.
    BodyTooLarge,
    /// A request head or body whose framing or fields are ambiguous
    /// (duplicate `Host`, `Host` beside another authority, malformed
    /// chunked framing): 400.
    BadRequest,
    /// A tunnel (`CONNECT`, `Upgrade`) that no ALLOW rule names explicitly.
    TunnelNotAllowed,
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
    /// Outbound: the destination's service has no endpoint to send to.
    NoEndpoint,
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
            LocalReason::JwtInvalid => "jwt_invalid",
            LocalReason::AppUnreachable => "app_unreachable",
            LocalReason::AppTimeout => "app_timeout",
            LocalReason::UploadStalled => "upload_stalled",
            LocalReason::BodyTooLarge => "body_too_large",
            LocalReason::BadRequest => "bad_request",
            LocalReason::TunnelNotAllowed => "tunnel_not_allowed",
            LocalReason::TunnelUnsupported => "tunnel_unsupported",
            LocalReason::NotUpgradable => "not_upgradable",
            LocalReason::NoIdentity => "no_identity",
            LocalReason::PeerUnreachable => "peer_unreachable",
            LocalReason::PeerNotAllowed => "peer_not_allowed",
            LocalReason::PeerHandshakeFailed => "peer_handshake_failed",
            LocalReason::PeerTimeout => "peer_timeout",
            LocalReason::PoolFull => "pool_full",
            LocalReason::NoEndpoint => "no_endpoint",
            LocalReason::Internal => "internal",
        }
    }
}

/// Counts a request the sidecar answered itself.
pub fn http_local_error(direction: Direction, reason: LocalReason) {
    counter!(HTTP_LOCAL_ERRORS, "direction" => direction.as_str(), "reason" => reason.as_str())
        .increment(1);
}

/// Counts a live connection closed because a reloaded policy no longer
/// allows it (opaque) or allows its peer no request (HTTP).
pub fn connection_revoked(carried: crate::authz::Carried) {
    counter!(CONNECTIONS_REVOKED, "protocol" => carried.as_str()).increment(1);
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
    /// The new version was over the compile budget (time, size or Rego
    /// nesting depth); the last good one stays.
    OverBudget,
}

/// Counts a policy reload.
pub fn policy_reload(result: ReloadResult) {
    let r = match result {
        ReloadResult::Ok => "ok",
        ReloadResult::Error => "error",
        ReloadResult::OverBudget => "over_budget",
    };
    counter!(POLICY_RELOADS, "result" => r).increment(1);
}

/// Counts a listener found full.
pub fn listener_full() {
    counter!(LISTENER_FULL).increment(1);
}

/// Counts a connection closed over its source's pending limit.
pub fn source_pending_refused() {
    counter!(SOURCE_PENDING_REFUSED).increment(1);
}

/// Counts an admin request refused to a client outside the pod.
pub fn admin_refused() {
    counter!(ADMIN_REFUSED).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_and_service_labels_are_capped() {
        fn labels(src: &str) -> RequestLabels<'_> {
            RequestLabels {
                source_id: Some(src),
                destination_id: Some("spiffe://t/me"),
                destination_service: Some("10.0.0.1:80"),
            }
        }
        // A map of its own: other tests record series in the global one.
        let mut map = RequestSeriesMap::default();
        let a = map.series_for(Direction::Inbound, labels("spiffe://t/a"));
        let again = map.series_for(Direction::Inbound, labels("spiffe://t/a"));
        assert!(Arc::ptr_eq(&a, &again), "one series per label set");
        for i in 0..(MAX_PEER_LABELS + 10) {
            map.series_for(Direction::Inbound, labels(&format!("spiffe://t/{i}")));
        }
        let late = map.series_for(Direction::Inbound, labels("spiffe://t/late"));
        assert_eq!(late.source, PEER_OTHER);
        assert_eq!(
            late.destination, "spiffe://t/me",
            "given out before the cap"
        );
        let none = map.series_for(Direction::Inbound, RequestLabels::default());
        assert_eq!(
            (none.source.as_str(), none.destination.as_str()),
            (PEER_NONE, PEER_NONE)
        );
        assert_eq!(map.identities.len(), MAX_PEER_LABELS);
        // MAX_PEER_LABELS - 1 sources beside `me`, `other`, and the unlabelled one.
        assert_eq!(map.series.len(), MAX_PEER_LABELS + 1);
    }

    #[test]
    fn rare_status_codes_are_capped() {
        let m = RequestMetrics::for_request(Direction::Outbound, RequestLabels::default());
        for code in 520..(520 + MAX_RARE_CODES as u16 + 5) {
            m.record(http::StatusCode::from_u16(code).unwrap(), Duration::ZERO);
        }
        assert_eq!(m.rare.lock().unwrap().len(), MAX_RARE_CODES);
    }
}
