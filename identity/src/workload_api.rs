//! The Workload API identity source: streams `FetchX509SVID` from a SPIFFE
//! Workload API endpoint (a SPIRE agent, or `rampart agent`) and turns each
//! full-state message into an [`Update`] for the rotation worker.
//!
//! The gRPC client is the maintained `spiffe` crate: it sends the mandatory
//! `workload.spiffe.io: true` header, parses the SVIDs (chain and PKCS#8 key
//! as raw DER) and the bundle set including `federated_bundles`. What it does
//! not decide is policy, and that lives here: which SVID is ours, what to do
//! with each error code (Workload API §6), and reconnection with backoff.

use std::time::Duration;

use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use spiffe::{WorkloadApiClient, WorkloadApiError, X509Context};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

use crate::bundle::{BundleError, BundleSet, TrustBundle};
use crate::id::{SpiffeId, SpiffeIdError, TrustDomain};
use crate::metrics::{self as m, SourceKind};
use crate::rotation::{Backoff, Identity, Update};
use crate::svid::{Svid, SvidError};

/// Which of the SVIDs in a response is the sidecar's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SvidSelector {
    /// The first one: "the default identity" (Workload API §5.2).
    First,
    /// The one with this SPIFFE ID.
    Id(SpiffeId),
    /// The one with this operator-chosen hint.
    Hint(String),
}

/// Settings of the Workload API source.
#[derive(Debug, Clone)]
pub struct WorkloadApiConfig {
    /// The endpoint, `unix:///path/to/agent.sock` (or `tcp://IP:port`).
    pub endpoint: String,
    /// Which SVID to use.
    pub select: SvidSelector,
    /// First delay before reconnecting.
    pub backoff_initial: Duration,
    /// Longest delay before reconnecting.
    pub backoff_max: Duration,
}

/// Why a message from the Workload API could not be used; the stream stays
/// open and the message is discarded ("mandatory field missing ⇒ client
/// discards message").
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    /// The selected SVID is not in the message.
    #[error("no SVID matches {0:?}")]
    NoMatchingSvid(SvidSelector),
    /// The SVID fails X.509-SVID validation.
    #[error("SVID rejected: {0}")]
    Svid(#[from] SvidError),
    /// A bundle's trust domain name is invalid.
    #[error("bundle trust domain: {0}")]
    TrustDomain(#[from] SpiffeIdError),
    /// A bundle is unusable.
    #[error(transparent)]
    Bundle(#[from] BundleError),
}

/// The Workload API source as a worker.
#[derive(Debug, Clone)]
pub struct WorkloadApiSource {
    cfg: WorkloadApiConfig,
}

/// How one connection ended.
enum Ended {
    /// The server closed the stream or the connection failed: retry.
    Retry {
        /// What happened.
        reason: String,
        /// Whether a message arrived on this connection before it ended.
        received: bool,
    },
    /// `InvalidArgument`: retrying the same request cannot help (§6).
    Fatal(String),
    /// Nobody listens to our updates any more.
    Stopped,
}

impl WorkloadApiSource {
    /// A source for `cfg`.
    pub fn new(cfg: WorkloadApiConfig) -> Self {
        WorkloadApiSource { cfg }
    }

    /// Streams identities into `tx`, reconnecting with backoff, until `tx`
    /// closes or the endpoint answers `InvalidArgument`.
    pub async fn run(self, tx: mpsc::Sender<Update>) {
        let mut backoff = Backoff::new(self.cfg.backoff_initial, self.cfg.backoff_max);
        m::source_connected(SourceKind::WorkloadApi, false);
        // Failed attempts in a row: the first is a warning, the rest debug,
        // so an outage is one log line per state change, not one per retry.
        let mut failures = 0u32;
        loop {
            let ended = tokio::select! {
                e = self.stream_once(&tx, &mut backoff) => e,
                () = tx.closed() => Ended::Stopped,
            };
            m::source_connected(SourceKind::WorkloadApi, false);
            match ended {
                Ended::Stopped => return,
                Ended::Fatal(reason) => {
                    tracing::error!(
                        endpoint = %self.cfg.endpoint,
                        error = %reason,
                        "Workload API refused the request as invalid; not retrying"
                    );
                    m::source_error(SourceKind::WorkloadApi);
                    return;
                }
                Ended::Retry { reason, received } => {
                    m::source_error(SourceKind::WorkloadApi);
                    failures = if received { 1 } else { failures + 1 };
                    let delay = backoff.next_delay();
                    if failures == 1 {
                        tracing::warn!(
                            endpoint = %self.cfg.endpoint,
                            error = %reason,
                            retry.after_ms = delay.as_millis() as u64,
                            "Workload API unavailable; keeping the current identity"
                        );
                    } else {
                        tracing::debug!(
                            endpoint = %self.cfg.endpoint,
                            error = %reason,
                            attempt = failures,
                            retry.after_ms = delay.as_millis() as u64,
                            "Workload API still unavailable"
                        );
                    }
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = tx.closed() => return,
                    }
                }
            }
        }
    }

    async fn stream_once(&self, tx: &mpsc::Sender<Update>, backoff: &mut Backoff) -> Ended {
        let client = match WorkloadApiClient::connect_to(&self.cfg.endpoint).await {
            Ok(c) => c,
            Err(e) => return retry(e, false),
        };
        let mut stream = match client.stream_x509_contexts().await {
            Ok(s) => s,
            Err(e) if e.is_invalid_argument() => return Ended::Fatal(e.to_string()),
            Err(e) if grants_no_identity(&e) => return revoked(tx, e, false).await,
            Err(e) => return retry(e, false),
        };
        let mut received = false;
        while let Some(msg) = stream.next().await {
            let ctx = match msg {
                Ok(ctx) => ctx,
                Err(e) if e.is_invalid_argument() => return Ended::Fatal(e.to_string()),
                Err(e) if grants_no_identity(&e) => return revoked(tx, e, received).await,
                // A status ends the stream; a parse error only loses this
                // message. Either way, the next item (or None) tells.
                Err(e) => {
                    tracing::warn!(error = %e, "Workload API message discarded");
                    m::source_error(SourceKind::WorkloadApi);
                    continue;
                }
            };
            if !received {
                tracing::info!(endpoint = %self.cfg.endpoint, "Workload API connected");
                received = true;
            }
            m::source_connected(SourceKind::WorkloadApi, true);
            backoff.reset();
            let update = match identity_from(&ctx, &self.cfg.select) {
                Ok(identity) => Update::Identity(Box::new(identity)),
                Err(MessageError::NoMatchingSvid(sel)) => {
                    // Full state without our SVID: the identity was taken away.
                    tracing::warn!(selector = ?sel, "Workload API no longer grants the selected SVID");
                    Update::Revoked
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Workload API message discarded");
                    m::source_error(SourceKind::WorkloadApi);
                    continue;
                }
            };
            if tx.send(update).await.is_err() {
                return Ended::Stopped;
            }
        }
        Ended::Retry {
            reason: "stream closed by the server".into(),
            received,
        }
    }
}

/// Whether the endpoint says this workload is entitled to no identity:
/// `PermissionDenied` (Workload API §6), which SPIRE's agent answers, and
/// ends an open stream with, when the workload's registration entry is gone.
fn grants_no_identity(e: &WorkloadApiError) -> bool {
    matches!(
        e,
        WorkloadApiError::NoIdentityIssued | WorkloadApiError::PermissionDenied(_)
    )
}

/// The identity was taken away: withdraw it now (not at its expiry, which
/// may be an hour away), then keep asking, since an entry can come back.
async fn revoked(tx: &mpsc::Sender<Update>, e: WorkloadApiError, received: bool) -> Ended {
    tracing::warn!(error = %e, "Workload API grants no identity to this workload");
    if tx.send(Update::Revoked).await.is_err() {
        return Ended::Stopped;
    }
    retry(e, received)
}

fn retry(e: impl std::fmt::Display, received: bool) -> Ended {
    Ended::Retry {
        reason: e.to_string(),
        received,
    }
}

/// Our identity from one `FetchX509SVID` message: the selected SVID and the
/// bundle of every trust domain in it (own and federated, never merged).
pub fn identity_from(ctx: &X509Context, select: &SvidSelector) -> Result<Identity, MessageError> {
    let svid = ctx
        .svids()
        .iter()
        .find(|s| match select {
            SvidSelector::First => true,
            SvidSelector::Id(id) => s.spiffe_id().to_string() == id.as_str(),
            SvidSelector::Hint(h) => s.hint() == Some(h.as_str()),
        })
        .ok_or_else(|| MessageError::NoMatchingSvid(select.clone()))?;
    let chain = svid
        .cert_chain()
        .iter()
        .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
        .collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        svid.private_key().as_bytes().to_vec(),
    ));
    let svid = Svid::from_der(chain, key)?;
    let mut bundles = BundleSet::new();
    for (td, bundle) in ctx.bundle_set().iter() {
        let td = TrustDomain::parse(td.as_str())?;
        let certs = bundle
            .authorities()
            .iter()
            .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
            .collect();
        bundles.insert(TrustBundle::new(td, certs)?);
    }
    Ok(Identity { svid, bundles })
}
