//! The identity store: holds the current SVID and bundles and publishes the
//! TLS configurations built from them over a `watch` channel, so that a
//! rotation swaps every listener's configuration atomically while in-flight
//! connections keep the configuration they started with.

use std::sync::Arc;

use rustls::{ClientConfig, ServerConfig};
use tokio::sync::watch;

use crate::bundle::BundleSet;
use crate::id::TrustDomain;
use crate::svid::{LeafInfo, Svid};
use crate::tls::{self, ServerSpec, TlsConfigError};
use crate::verify::IdMatcher;

/// What TLS configurations the proxy needs; fixed at start from its config.
#[derive(Debug, Clone, Default)]
pub struct ConfigSpec {
    /// One server configuration per entry.
    pub server: Vec<ServerSpec>,
    /// One client configuration per entry: the server IDs it accepts.
    pub client: Vec<IdMatcher>,
    /// ALPN protocols offered by the client side.
    pub alpn: Vec<Vec<u8>>,
    /// ALPN protocols the server side accepts, most preferred first
    /// (empty: the same as `alpn`).
    pub server_alpn: Vec<Vec<u8>>,
}

/// The configurations built from one SVID and bundle set.
#[derive(Debug)]
pub struct TlsConfigs {
    /// Facts about the SVID in use (no key material).
    pub svid: LeafInfo,
    /// Trust domains with a bundle.
    pub trust_domains: Vec<TrustDomain>,
    /// Server configurations, indexed like [`ConfigSpec::server`].
    pub server: Vec<Arc<ServerConfig>>,
    /// Client configurations, indexed like [`ConfigSpec::client`].
    pub client: Vec<Arc<ClientConfig>>,
}

/// Publishes the current TLS configurations.
#[derive(Debug)]
pub struct IdentityStore {
    spec: ConfigSpec,
    tx: watch::Sender<Option<Arc<TlsConfigs>>>,
}

impl ConfigSpec {
    fn server_alpn(&self) -> &[Vec<u8>] {
        match self.server_alpn.is_empty() {
            true => &self.alpn,
            false => &self.server_alpn,
        }
    }
}

impl IdentityStore {
    /// A store with no identity yet (the sidecar is not ready until one arrives).
    pub fn new(spec: ConfigSpec) -> Self {
        let (tx, _) = watch::channel(None);
        IdentityStore { spec, tx }
    }

    /// Builds configurations for `svid` and `bundles` and publishes them.
    pub fn publish(&self, svid: &Svid, bundles: &BundleSet) -> Result<(), TlsConfigError> {
        let server = self
            .spec
            .server
            .iter()
            .map(|m| tls::server_config_for(svid, bundles, m, self.spec.server_alpn()))
            .collect::<Result<Vec<_>, _>>()?;
        let client = self
            .spec
            .client
            .iter()
            .map(|m| tls::client_config(svid, bundles, m.clone(), &self.spec.alpn))
            .collect::<Result<Vec<_>, _>>()?;
        let mut trust_domains: Vec<_> = bundles.trust_domains().cloned().collect();
        trust_domains.sort();
        let configs = TlsConfigs {
            svid: svid.info().clone(),
            trust_domains,
            server,
            client,
        };
        tracing::info!(
            spiffe.id = %svid.id(),
            svid.serial = %svid.info().serial,
            "identity published"
        );
        self.tx.send_replace(Some(Arc::new(configs)));
        Ok(())
    }

    /// Withdraws the identity (for example after the SVID expired with no replacement).
    pub fn withdraw(&self) {
        self.tx.send_replace(None);
    }

    /// A receiver of the current configurations.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<TlsConfigs>>> {
        self.tx.subscribe()
    }

    /// The current configurations, if an identity is present.
    pub fn current(&self) -> Option<Arc<TlsConfigs>> {
        self.tx.borrow().clone()
    }
}
