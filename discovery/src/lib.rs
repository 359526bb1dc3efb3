//! Service discovery for Rampart: what an app dials (a ClusterIP, a virtual
//! IP, a name) leads to a service, a service to its endpoints, and every
//! endpoint carries the SPIFFE ID its server must present in the handshake.
//!
//! - [`model`]: destinations, services, endpoints, pod addresses, the
//!   merged [`model::Snapshot`];
//! - [`registry`]: the one writer; sources publish into it, the proxy's
//!   route stage reads from it ([`registry::Registry::resolve`]);
//! - sources, each a worker that only publishes: [`file`] (static file,
//!   reloaded on change), [`kubernetes`] (Services, EndpointSlices and
//!   Pods, followed from the first dial), [`dns`] (A/AAAA, refreshed by
//!   TTL);
//! - [`balance`]: power of two choices over peak-EWMA, ejection with
//!   backoff;
//! - [`metrics`]: the per-service series.
#![forbid(unsafe_code)]

pub mod balance;
pub mod config;
pub mod dns;
pub mod file;
pub mod kubernetes;
pub mod metrics;
pub mod model;
pub mod registry;

use std::sync::Arc;

pub use config::DiscoveryConfig;
pub use registry::{Registry, Resolved};

/// A source could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The endpoints file is unusable at start.
    #[error(transparent)]
    File(#[from] file::FileError),
    /// The DNS resolver could not be built.
    #[error(transparent)]
    Dns(#[from] dns::DnsStartError),
    /// The Kubernetes client could not be built.
    #[error(transparent)]
    Kubernetes(#[from] kubernetes::KubeStartError),
}

/// Starts the configured sources on the current runtime; `None` when no
/// source is configured (routing by `outbound` rules only). `trust_domain`
/// is the sidecar's (`{{ .TrustDomain }}` in Kubernetes identity templates).
pub fn start(
    cfg: &DiscoveryConfig,
    trust_domain: &rampart_identity::TrustDomain,
) -> Result<Option<Arc<Registry>>, StartError> {
    if !cfg.any() {
        return Ok(None);
    }
    let registry = Registry::new(cfg.demand_wait_ms);
    if let Some(path) = &cfg.file {
        let publisher = registry.source(model::SourceKind::File);
        tokio::spawn(file::start(path.clone(), publisher, file::POLL_INTERVAL)?);
    }
    if let Some(k) = &cfg.kubernetes {
        let (publisher, demands) = registry.demand_source(model::SourceKind::Kubernetes);
        tokio::spawn(kubernetes::start(
            k.clone(),
            trust_domain.clone(),
            publisher,
            demands,
        )?);
    }
    if let Some(dns) = &cfg.dns {
        let publisher = registry.source(model::SourceKind::Dns);
        tokio::spawn(dns::start(dns.clone(), publisher)?);
    }
    Ok(Some(registry))
}
