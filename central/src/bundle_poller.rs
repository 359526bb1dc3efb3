//! The bundle poller: one task per sidecar that keeps the policy bundle in
//! force up to date. Every poll sends `If-None-Match` with the last ETag, so
//! an unchanged bundle costs one 304; a new one is verified and compiled on
//! a blocking thread (never on the runtime's workers, never on the request
//! path) and published as an `Arc<Authorizer>` on a `watch` channel.
//!
//! A bundle that fails to download, verify or compile leaves the last good
//! one in force: the failure is logged and counted, and the poller tries
//! again at the next interval. The ETag of a refused bundle is remembered,
//! so the same bad bundle is not downloaded and logged every interval; a
//! fixed one has a new ETag.
//!
//! Intervals are jittered (±20%) so that a fleet of sidecars does not poll
//! in lockstep.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rampart_authz::Authorizer;
use rampart_authz::central::bundle::{self, BundleOptions};
use tokio::sync::watch;

use crate::http_fetch::{self, ClientTlsProvider};
use crate::metrics::BundleLoad;

/// Where and how often to fetch the bundle.
#[derive(Debug, Clone)]
pub struct BundleSource {
    /// `http://` or `https://` URL of the `.tar.gz`.
    pub url: http::Uri,
    /// Mean time between polls.
    pub poll_interval: Duration,
    /// Time limit of one download.
    pub timeout: Duration,
    /// Largest compressed bundle accepted.
    pub max_download_bytes: usize,
    /// Longest compile of one bundle (on a thread of its own); a bundle
    /// over it is refused (`over_budget`) and the last good one stays.
    pub compile_timeout: Duration,
}

impl BundleSource {
    /// A source with Rampart's defaults: every 30 s, 10 s timeout, 8 MiB,
    /// 5 s to compile.
    pub fn new(url: http::Uri) -> Self {
        BundleSource {
            url,
            poll_interval: Duration::from_secs(30),
            timeout: Duration::from_secs(10),
            max_download_bytes: 8 << 20,
            compile_timeout: Duration::from_secs(5),
        }
    }
}

/// The policies in force, for the proxy, the readiness probe and the
/// admin API. Cheap to clone.
#[derive(Debug, Clone)]
pub struct PolicyHandle {
    rx: watch::Receiver<Option<Arc<Authorizer>>>,
    status: Arc<Mutex<BundleStatus>>,
}

/// What the admin API shows about the bundle.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BundleStatus {
    /// Revision of the bundle in force (`.manifest`), `None` before the
    /// first one (or when running on the fallback).
    pub revision: Option<String>,
    /// Whether the bundle in force had a verified signature.
    pub verified: bool,
    /// Why the last poll failed, if it did.
    pub last_error: Option<String>,
}

impl PolicyHandle {
    /// The policies in force: the last good bundle, else the local fallback,
    /// else `None` (deny everything: the sidecar is not ready).
    pub fn current(&self) -> Option<Arc<Authorizer>> {
        self.rx.borrow().clone()
    }

    /// Whether any policy is in force (readiness).
    pub fn has_policy(&self) -> bool {
        self.rx.borrow().is_some()
    }

    /// A receiver that sees every new policy set.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Authorizer>>> {
        self.rx.clone()
    }

    /// Revision of the bundle in force.
    pub fn revision(&self) -> Option<String> {
        self.status().revision
    }

    /// Revision, signature state and last error.
    pub fn status(&self) -> BundleStatus {
        self.status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// Starts polling. `fallback` is in force until the first bundle arrives
/// (and makes the sidecar ready meanwhile); `tls` supplies the client
/// configuration for `https` URLs. Must run inside a tokio runtime; the task
/// runs until the returned handle is aborted or the runtime stops.
pub fn spawn(
    source: BundleSource,
    options: BundleOptions,
    tls: Option<ClientTlsProvider>,
    fallback: Option<Authorizer>,
) -> (PolicyHandle, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(fallback.map(Arc::new));
    let status = Arc::new(Mutex::new(BundleStatus::default()));
    let handle = PolicyHandle {
        rx,
        status: status.clone(),
    };
    let poller = Poller {
        source,
        options: Arc::new(options),
        tls,
        tx,
        status,
        etag: None,
        last_digest: None,
    };
    (handle, tokio::spawn(poller.run()))
}

struct Poller {
    source: BundleSource,
    options: Arc<BundleOptions>,
    tls: Option<ClientTlsProvider>,
    tx: watch::Sender<Option<Arc<Authorizer>>>,
    status: Arc<Mutex<BundleStatus>>,
    etag: Option<http::HeaderValue>,
    /// SHA-256 of the last bundle body, for servers without ETags.
    last_digest: Option<Vec<u8>>,
}

impl Poller {
    async fn run(mut self) {
        loop {
            let result = self.poll_once().await;
            crate::metrics::bundle_load(result);
            tokio::time::sleep(jittered(self.source.poll_interval)).await;
        }
    }

    async fn poll_once(&mut self) -> BundleLoad {
        let url = self.source.url.to_string();
        let resp = match self.fetch().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(bundle.url = %url, error = %e, "policy bundle download failed; previous policies stay in force");
                self.set_error(e.to_string());
                return BundleLoad::DownloadError;
            }
        };
        if resp.status == http::StatusCode::NOT_MODIFIED {
            tracing::trace!(bundle.url = %url, "policy bundle not modified");
            return BundleLoad::NotModified;
        }
        if resp.status != http::StatusCode::OK {
            tracing::warn!(bundle.url = %url, status = resp.status.as_u16(), "policy bundle download failed; previous policies stay in force");
            self.set_error(format!("HTTP status {}", resp.status));
            return BundleLoad::DownloadError;
        }
        let etag = resp.headers.get(http::header::ETAG).cloned();
        let digest = ring::digest::digest(&ring::digest::SHA256, &resp.body)
            .as_ref()
            .to_vec();
        if self.last_digest.as_ref() == Some(&digest) {
            // The same bytes as last time (a server without ETags).
            self.etag = etag;
            return BundleLoad::NotModified;
        }
        self.last_digest = Some(digest);
        let options = self.options.clone();
        let body: Bytes = resp.body;
        let budget = self.source.compile_timeout;
        let loaded = tokio::task::spawn_blocking(move || {
            rampart_authz::budget::run_within(budget, move || bundle::load(&body, &options))
        })
        .await;
        // A new ETag, good or bad, is not fetched again until it changes.
        self.etag = etag;
        match loaded {
            Ok(Err(over)) => {
                tracing::warn!(bundle.url = %url, error = %over, "policy bundle refused; previous policies stay in force");
                self.set_error(over.to_string());
                BundleLoad::Refused("over_budget")
            }
            Ok(Ok(Ok(b))) => {
                tracing::info!(bundle.url = %url, bundle.revision = %b.revision, bundle.verified = b.verified, policies = b.authorizer.policies().len(), "policy bundle activated");
                {
                    let mut s = self.lock_status();
                    s.revision = Some(b.revision);
                    s.verified = b.verified;
                    s.last_error = None;
                }
                self.tx.send_replace(Some(Arc::new(b.authorizer)));
                BundleLoad::Success
            }
            Ok(Ok(Err(e))) => {
                tracing::warn!(bundle.url = %url, error = %e, "policy bundle refused; previous policies stay in force");
                self.set_error(e.to_string());
                BundleLoad::Refused(e.as_str())
            }
            Err(join) => {
                // A panic while compiling is our bug; keep serving.
                tracing::error!(bundle.url = %url, error = %join, "policy bundle compilation panicked");
                self.set_error("compilation panicked".into());
                BundleLoad::Refused("compile_error")
            }
        }
    }

    async fn fetch(&self) -> Result<http_fetch::Response, http_fetch::FetchError> {
        let mut req = http::Request::get(self.source.url.clone())
            .body(Bytes::new())
            .map_err(|e| http_fetch::FetchError::BadUrl(e.to_string()))?;
        if let Some(tag) = &self.etag {
            req.headers_mut()
                .insert(http::header::IF_NONE_MATCH, tag.clone());
        }
        http_fetch::send(
            req,
            self.tls.as_ref(),
            self.source.timeout,
            self.source.max_download_bytes,
        )
        .await
    }

    fn set_error(&self, e: String) {
        self.lock_status().last_error = Some(e);
    }

    fn lock_status(&self) -> std::sync::MutexGuard<'_, BundleStatus> {
        self.status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// `d` scaled by a random factor in [0.8, 1.2).
pub(crate) fn jittered(d: Duration) -> Duration {
    use ring::rand::SecureRandom as _;
    let mut b = [0u8; 2];
    // Without randomness the interval is simply not jittered.
    let r = match ring::rand::SystemRandom::new().fill(&mut b) {
        Ok(()) => f64::from(u16::from_le_bytes(b)) / 65536.0,
        Err(_) => 0.5,
    };
    d.mul_f64(0.8 + 0.4 * r)
}
