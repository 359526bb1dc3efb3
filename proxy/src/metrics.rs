//! The proxy's metrics: names, units and descriptions in one place, label
//! values from closed enums only (no peer-chosen strings).

use std::time::Duration;

use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};

use crate::config::Direction;

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
}

/// Counts a connection for as long as it lives.
pub struct ConnectionGauge {
    direction: Direction,
}

impl ConnectionGauge {
    /// Counts a newly accepted connection.
    pub fn open(direction: Direction) -> Self {
        counter!(CONNECTIONS_OPENED, "direction" => direction.as_str()).increment(1);
        gauge!(CONNECTIONS_ACTIVE, "direction" => direction.as_str()).increment(1.0);
        ConnectionGauge { direction }
    }
}

impl Drop for ConnectionGauge {
    fn drop(&mut self) {
        let d = self.direction.as_str();
        counter!(CONNECTIONS_CLOSED, "direction" => d).increment(1);
        gauge!(CONNECTIONS_ACTIVE, "direction" => d).decrement(1.0);
    }
}

/// Counts proxied bytes: `from_client` flowed client -> target.
pub fn bytes(direction: Direction, from_client: u64, to_client: u64) {
    let d = direction.as_str();
    counter!(BYTES, "direction" => d, "flow" => "to_target").increment(from_client);
    counter!(BYTES, "direction" => d, "flow" => "to_client").increment(to_client);
}

/// Counts a handshake outcome (`"ok"` or a failure reason label).
pub fn handshake(direction: Direction, result: &'static str) {
    counter!(TLS_HANDSHAKES, "direction" => direction.as_str(), "result" => result).increment(1);
}

/// Counts an authorization decision. `policy` and `rule` name what decided
/// (`-` when nothing did); they come from the operator's policy files, never
/// from a peer, so the series are bounded by the configuration.
pub fn decision(action: &'static str, reason: &'static str, policy: &str, rule: &str) {
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

/// Counts a forwarding failure.
pub fn forward_error(direction: Direction, reason: &'static str) {
    counter!(FORWARD_ERRORS, "direction" => direction.as_str(), "reason" => reason).increment(1);
}

/// Counts an answered HTTP request and its latency.
pub fn http_request(direction: Direction, status: http::StatusCode, elapsed: Duration) {
    let class = match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    let d = direction.as_str();
    counter!(HTTP_REQUESTS, "direction" => d, "status_class" => class).increment(1);
    histogram!(HTTP_DURATION, "direction" => d).record(elapsed.as_secs_f64());
}

/// Counts a request the sidecar answered itself.
pub fn http_local_error(direction: Direction, reason: &'static str) {
    counter!(HTTP_LOCAL_ERRORS, "direction" => direction.as_str(), "reason" => reason).increment(1);
}

/// Counts a connection's detected protocol.
pub fn detected(direction: Direction, protocol: crate::detect::Protocol) {
    counter!(DETECTED, "direction" => direction.as_str(), "protocol" => protocol.as_str())
        .increment(1);
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
