//! Decision logs: the request path pushes one entry per decision into a
//! bounded queue without waiting ([`DecisionLogger::log`]); a shipper task
//! sends batches as gzipped JSON arrays (OPA's decision-log upload format)
//! to a collector. When the collector is slow or down the queue fills, the
//! oldest entries are dropped and counted
//! (`rampart_decision_logs_dropped_total`), and memory stays bounded.

use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rampart_authz::central::decision_log::{self, DecisionLogQueue, EntryContext, Pushed};
use rampart_authz::{ConnectionInfo, Decision, RequestInfo};

use crate::bundle_poller::PolicyHandle;
use crate::http_fetch::{self, ClientTlsProvider};

/// Where and how decision logs are shipped.
#[derive(Debug, Clone)]
pub struct DecisionLogConfig {
    /// The collector's URL (`POST`).
    pub url: http::Uri,
    /// Entries held at most; past it the oldest are dropped.
    pub max_queued: usize,
    /// Entries per upload at most.
    pub max_batch: usize,
    /// Time between uploads when the queue does not fill a batch first.
    pub flush_interval: Duration,
    /// Time limit of one upload.
    pub timeout: Duration,
}

impl DecisionLogConfig {
    /// Defaults: 10 000 entries, batches of 500, every 5 s, 10 s timeout.
    pub fn new(url: http::Uri) -> Self {
        DecisionLogConfig {
            url,
            max_queued: 10_000,
            max_batch: 500,
            flush_interval: Duration::from_secs(5),
            timeout: Duration::from_secs(10),
        }
    }
}

/// What the request path holds: builds entries and queues them.
#[derive(Debug, Clone)]
pub struct DecisionLogger {
    queue: Arc<DecisionLogQueue>,
    context: Arc<EntryContext>,
    policies: Option<PolicyHandle>,
}

impl DecisionLogger {
    /// Names the bundle revision in force in every entry from now on.
    pub fn follow_bundle(mut self, policies: PolicyHandle) -> Self {
        self.policies = Some(policies);
        self
    }

    /// Logs one request's decision; never waits for the shipper.
    pub fn log(&self, conn: &ConnectionInfo<'_>, req: &RequestInfo<'_>, decision: &Decision) {
        let revision = self.policies.as_ref().and_then(PolicyHandle::revision);
        let entry = decision_log::entry(&self.context, revision.as_deref(), conn, req, decision);
        if self.queue.try_push(entry) == Pushed::DroppedOldest {
            metrics::counter!(crate::metrics::DECISION_LOGS_DROPPED).increment(1);
        }
    }

    /// The queue (for the admin API and tests).
    pub fn queue(&self) -> &Arc<DecisionLogQueue> {
        &self.queue
    }
}

impl rampart_authz::central::decision_log::DecisionSink for DecisionLogger {
    fn log(&self, conn: &ConnectionInfo<'_>, req: &RequestInfo<'_>, decision: &Decision) {
        DecisionLogger::log(self, conn, req, decision);
    }
}

/// Starts shipping; returns the logger for the request path. Must run
/// inside a tokio runtime.
pub fn spawn(
    config: DecisionLogConfig,
    context: EntryContext,
    tls: Option<ClientTlsProvider>,
) -> (DecisionLogger, tokio::task::JoinHandle<()>) {
    let queue = Arc::new(DecisionLogQueue::new(config.max_queued));
    let logger = DecisionLogger {
        queue: queue.clone(),
        context: Arc::new(context),
        policies: None,
    };
    (logger, tokio::spawn(ship(config, queue, tls)))
}

async fn ship(
    config: DecisionLogConfig,
    queue: Arc<DecisionLogQueue>,
    tls: Option<ClientTlsProvider>,
) {
    let mut backoff = config.flush_interval;
    loop {
        tokio::time::sleep(backoff).await;
        backoff = config.flush_interval;
        metrics::gauge!(crate::metrics::DECISION_LOGS_QUEUED).set(queue.len() as f64);
        while !queue.is_empty() {
            let batch = queue.take_batch(config.max_batch);
            let n = batch.len();
            match upload(&config, &batch, tls.as_ref()).await {
                Ok(()) => {
                    metrics::counter!(crate::metrics::DECISION_LOGS_SENT).increment(n as u64);
                }
                Err(e) => {
                    metrics::counter!(crate::metrics::DECISION_LOGS_FAILURES).increment(1);
                    tracing::warn!(decision_logs.url = %config.url, error = %e, entries = n, "decision log upload failed");
                    let before = queue.dropped();
                    queue.requeue(batch);
                    let lost = queue.dropped() - before;
                    if lost > 0 {
                        metrics::counter!(crate::metrics::DECISION_LOGS_DROPPED).increment(lost);
                    }
                    // Back off up to a minute while the collector is down.
                    backoff = (config.flush_interval * 2).min(Duration::from_secs(60));
                    break;
                }
            }
        }
    }
}

async fn upload(
    config: &DecisionLogConfig,
    batch: &[serde_json::Value],
    tls: Option<&ClientTlsProvider>,
) -> Result<(), String> {
    let json = serde_json::to_vec(batch).map_err(|e| e.to_string())?;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&json).map_err(|e| e.to_string())?;
    let body = gz.finish().map_err(|e| e.to_string())?;
    let req = http::Request::post(config.url.clone())
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::CONTENT_ENCODING, "gzip")
        .body(Bytes::from(body))
        .map_err(|e| e.to_string())?;
    let resp = http_fetch::send(req, tls, config.timeout, 64 << 10)
        .await
        .map_err(|e| e.to_string())?;
    if !resp.status.is_success() {
        return Err(format!("HTTP status {}", resp.status));
    }
    Ok(())
}
