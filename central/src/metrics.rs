//! The metrics of central management: names, descriptions and label values
//! from closed enums.

/// `rampart_policy_bundle_loads_total{result}`: bundle poll outcomes.
pub const BUNDLE_LOADS: &str = "rampart_policy_bundle_loads_total";
/// `rampart_policy_bundle_activation_timestamp_seconds`: Unix time the
/// bundle in force was activated (0 before the first).
pub const BUNDLE_ACTIVATION: &str = "rampart_policy_bundle_activation_timestamp_seconds";
// No metric carries the bundle revision: it is text chosen by the bundle's
// author, not a closed label set, so the admin API serves it instead.

/// `rampart_ext_authz_checks_total{result}`: external authorization calls.
pub const EXT_AUTHZ_CHECKS: &str = "rampart_ext_authz_checks_total";
/// `rampart_ext_authz_check_duration_seconds`: their latency.
pub const EXT_AUTHZ_DURATION: &str = "rampart_ext_authz_check_duration_seconds";
/// `rampart_decision_logs_dropped_total`: entries dropped under back-pressure.
pub const DECISION_LOGS_DROPPED: &str = "rampart_decision_logs_dropped_total";
/// `rampart_decision_logs_queued`: entries waiting, sampled by the shipper
/// at every flush.
pub const DECISION_LOGS_QUEUED: &str = "rampart_decision_logs_queued";
/// `rampart_decision_logs_sent_total`: entries delivered.
pub const DECISION_LOGS_SENT: &str = "rampart_decision_logs_sent_total";
/// `rampart_decision_logs_upload_failures_total`: batches that failed.
pub const DECISION_LOGS_FAILURES: &str = "rampart_decision_logs_upload_failures_total";

/// Describes every metric of this crate (call once at start).
pub fn describe() {
    metrics::describe_counter!(BUNDLE_LOADS, "Policy bundle polls, by result");
    metrics::describe_gauge!(
        BUNDLE_ACTIVATION,
        metrics::Unit::Seconds,
        "Unix time the policy bundle in force was activated"
    );
    metrics::describe_gauge!(
        DECISION_LOGS_QUEUED,
        "Decision-log entries waiting for upload (sampled at every flush)"
    );
    metrics::describe_counter!(EXT_AUTHZ_CHECKS, "External authorization checks, by result");
    metrics::describe_histogram!(
        EXT_AUTHZ_DURATION,
        metrics::Unit::Seconds,
        "External authorization check latency"
    );
    metrics::describe_counter!(
        DECISION_LOGS_DROPPED,
        "Decision-log entries dropped because the queue was full"
    );
    metrics::describe_counter!(DECISION_LOGS_SENT, "Decision-log entries delivered");
    metrics::describe_counter!(
        DECISION_LOGS_FAILURES,
        "Decision-log batches that failed to upload"
    );
}

/// The `result` of one bundle poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BundleLoad {
    /// A new bundle is in force.
    Success,
    /// The server said 304: nothing changed.
    NotModified,
    /// The download failed (connection, TLS, HTTP status, timeout).
    DownloadError,
    /// The bundle was refused (its `BundleError::as_str()`).
    Refused(&'static str),
}

impl BundleLoad {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            BundleLoad::Success => "success",
            BundleLoad::NotModified => "not_modified",
            BundleLoad::DownloadError => "download_error",
            BundleLoad::Refused(r) => r,
        }
    }
}

pub(crate) fn bundle_load(r: BundleLoad) {
    metrics::counter!(BUNDLE_LOADS, "result" => r.as_str()).increment(1);
    if r == BundleLoad::Success {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        metrics::gauge!(BUNDLE_ACTIVATION).set(now);
    }
}

/// The `result` of one ext_authz check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckResult {
    /// OK.
    Allowed,
    /// Denied by the provider.
    Denied,
    /// Failed and refused.
    Error,
    /// Timed out and refused.
    Timeout,
    /// Failed, and allowed because the provider is configured to fail open.
    FailedOpen,
}

impl CheckResult {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            CheckResult::Allowed => "allowed",
            CheckResult::Denied => "denied",
            CheckResult::Error => "error",
            CheckResult::Timeout => "timeout",
            CheckResult::FailedOpen => "failed_open",
        }
    }
}

pub(crate) fn ext_authz_check(r: CheckResult, seconds: f64) {
    metrics::counter!(EXT_AUTHZ_CHECKS, "result" => r.as_str()).increment(1);
    metrics::histogram!(EXT_AUTHZ_DURATION).record(seconds);
}
