//! Per-service metrics (documented in docs/metrics.md). The `service`
//! label is the service's name as discovery knows it; at most
//! [`MAX_SERVICES`] distinct names get a series of their own in a process,
//! later ones share `service="other"`, so a big cluster cannot grow the
//! scrape without bound. Handles are made once per service (per balancer),
//! never per request.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram};

use crate::balance::Refusal;

/// Endpoints of a service by state (`state`: `usable`, `no_identity`).
pub const ENDPOINTS: &str = "rampart_discovery_endpoints";
/// Refusals by an endpoint, each an ejection (`reason`: `connect`, `handshake`).
pub const EJECTIONS: &str = "rampart_discovery_ejections_total";
/// Requests (HTTP) or connections (opaque) sent to a service's endpoints,
/// by `result` (`answered`, `failed`, `no_endpoint`, `retried`).
pub const REQUESTS: &str = "rampart_discovery_requests_total";
/// Time to the response head (HTTP) or to the established mTLS connection
/// (opaque), per service.
pub const LATENCY: &str = "rampart_discovery_request_duration_seconds";
/// Destinations dialled whose address a source attributes to a pod whose
/// identity cannot be derived: refused.
pub const UNVERIFIABLE: &str = "rampart_discovery_unverifiable_total";
/// Source updates, by `source` and `result` (`applied`, `rejected`).
pub const SOURCE_UPDATES: &str = "rampart_discovery_source_updates_total";

/// Open list+watch requests of a source to its API server (`source`:
/// `kubernetes`): three per Service in use, one per pod address dialled
/// directly.
pub const WATCHES: &str = "rampart_discovery_watches";

/// Distinct `service` label values per process.
pub const MAX_SERVICES: usize = 256;

/// Describes the series (for the exporter's HELP lines).
pub fn describe() {
    metrics::describe_gauge!(ENDPOINTS, "Endpoints of a destination service, by state");
    metrics::describe_counter!(
        EJECTIONS,
        "Endpoints ejected after refusing a connection or failing the handshake"
    );
    metrics::describe_counter!(
        REQUESTS,
        "Requests (HTTP) or connections (opaque TCP) balanced over a service's endpoints"
    );
    metrics::describe_histogram!(
        LATENCY,
        metrics::Unit::Seconds,
        "Time to the response head (HTTP) or established connection (TCP), per service"
    );
    metrics::describe_counter!(
        UNVERIFIABLE,
        "Connections refused: the address belongs to a pod whose identity cannot be derived"
    );
    metrics::describe_counter!(SOURCE_UPDATES, "Discovery source updates, by result");
    metrics::describe_gauge!(
        WATCHES,
        "Watches a discovery source keeps open on its API server"
    );
}

/// The label for `name`, capped.
fn label(name: &str) -> String {
    static SEEN: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    let seen = SEEN.get_or_init(|| Mutex::new(HashSet::new()));
    let Ok(mut seen) = seen.lock() else {
        return "other".into();
    };
    if seen.contains(name) {
        return name.to_owned();
    }
    if seen.len() >= MAX_SERVICES {
        return "other".into();
    }
    seen.insert(name.to_owned());
    name.to_owned()
}

/// The handles of one service.
#[derive(Clone)]
pub struct ServiceMetrics(Arc<Handles>);

struct Handles {
    usable: Gauge,
    no_identity: Gauge,
    ejected_connect: Counter,
    ejected_handshake: Counter,
    answered: Counter,
    failed: Counter,
    no_endpoint: Counter,
    retried: Counter,
    latency: Histogram,
}

impl std::fmt::Debug for ServiceMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServiceMetrics")
    }
}

impl ServiceMetrics {
    /// Handles for service `name`.
    pub fn new(name: &str) -> Self {
        let s = label(name);
        let g = |state: &'static str| metrics::gauge!(ENDPOINTS, "service" => s.clone(), "state" => state);
        let e = |reason: &'static str| metrics::counter!(EJECTIONS, "service" => s.clone(), "reason" => reason);
        let r = |result: &'static str| metrics::counter!(REQUESTS, "service" => s.clone(), "result" => result);
        ServiceMetrics(Arc::new(Handles {
            usable: g("usable"),
            no_identity: g("no_identity"),
            ejected_connect: e("connect"),
            ejected_handshake: e("handshake"),
            answered: r("answered"),
            failed: r("failed"),
            no_endpoint: r("no_endpoint"),
            retried: r("retried"),
            latency: metrics::histogram!(LATENCY, "service" => s.clone()),
        }))
    }

    pub(crate) fn endpoints(&self, usable: usize, no_identity: usize) {
        self.0.usable.set(usable as f64);
        self.0.no_identity.set(no_identity as f64);
    }

    pub(crate) fn refused(&self, why: Refusal) {
        match why {
            Refusal::Connect => self.0.ejected_connect.increment(1),
            Refusal::Handshake => self.0.ejected_handshake.increment(1),
        }
    }

    /// A request (or connection) was answered after `took`.
    pub fn answered(&self, took: Duration) {
        self.0.answered.increment(1);
        self.0.latency.record(took.as_secs_f64());
    }

    /// A request failed after it was sent.
    pub fn failed(&self) {
        self.0.failed.increment(1);
    }

    /// A request found no endpoint (503).
    pub fn no_endpoint(&self) {
        self.0.no_endpoint.increment(1);
    }

    /// A request was retried on another endpoint (it could not be sent).
    pub fn retried(&self) {
        self.0.retried.increment(1);
    }
}

/// A connection to a pod address with no derivable identity was refused.
pub fn unverifiable() {
    metrics::counter!(UNVERIFIABLE).increment(1);
}

/// A source update was applied or rejected.
pub fn source_update(source: crate::model::SourceKind, applied: bool) {
    let result = if applied { "applied" } else { "rejected" };
    metrics::counter!(SOURCE_UPDATES, "source" => source.as_str(), "result" => result).increment(1);
}

/// A source now keeps `n` watches open.
pub fn watches(source: crate::model::SourceKind, n: usize) {
    metrics::gauge!(WATCHES, "source" => source.as_str()).set(n as f64);
}
