//! The identity crate's metrics: names, units and descriptions in one place.
//! Label values come from the closed enum [`SourceKind`].

use metrics::{Unit, describe_counter, describe_gauge};

/// Unix time (seconds) at which the current SVID expires; 0 without one.
pub const SVID_EXPIRY: &str = "rampart_identity_svid_expiry_timestamp_seconds";
/// SVIDs put into service after the first (a new serial number).
pub const ROTATIONS: &str = "rampart_identity_rotations_total";
/// Changes of the trust bundle set put into service.
pub const BUNDLE_UPDATES: &str = "rampart_identity_bundle_updates_total";
/// Failures of an identity source (connection, stream, unusable data).
pub const SOURCE_ERRORS: &str = "rampart_identity_source_errors_total";
/// 1 while the identity source is connected (or loaded), 0 otherwise.
pub const SOURCE_CONNECTED: &str = "rampart_identity_source_connected";

/// Which identity source a metric is about; the `source` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    /// The SPIFFE Workload API.
    WorkloadApi,
    /// PEM or JWKS files.
    Files,
    /// The in-process development CA.
    DevCa,
}

impl SourceKind {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::WorkloadApi => "workload_api",
            SourceKind::Files => "files",
            SourceKind::DevCa => "dev_ca",
        }
    }
}

/// Registers descriptions with the installed recorder; call once at start.
pub fn describe() {
    describe_gauge!(
        SVID_EXPIRY,
        Unit::Seconds,
        "Unix time at which the current X.509-SVID expires (0 when there is none)"
    );
    describe_counter!(
        ROTATIONS,
        "X.509-SVIDs swapped into the TLS configuration after the first"
    );
    describe_counter!(
        BUNDLE_UPDATES,
        "Trust bundle set changes swapped into the TLS configuration"
    );
    describe_counter!(SOURCE_ERRORS, "Identity source failures, by source");
    describe_gauge!(
        SOURCE_CONNECTED,
        "1 while the identity source is connected, by source"
    );
    // Counters exist from the start, so that rate() sees their first increment.
    metrics::counter!(ROTATIONS).absolute(0);
    metrics::counter!(BUNDLE_UPDATES).absolute(0);
}

pub(crate) fn source_error(kind: SourceKind) {
    metrics::counter!(SOURCE_ERRORS, "source" => kind.as_str()).increment(1);
}

pub(crate) fn source_connected(kind: SourceKind, up: bool) {
    metrics::gauge!(SOURCE_CONNECTED, "source" => kind.as_str()).set(if up { 1.0 } else { 0.0 });
}
