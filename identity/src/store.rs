//! The identity store: holds the current SVID and bundles and publishes the
//! TLS configurations built from them over a `watch` channel, so that a
//! rotation swaps every listener's configuration atomically while in-flight
//! connections keep the configuration they started with.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rustls::{ClientConfig, ServerConfig};
use tokio::sync::watch;

use crate::bundle::BundleSet;
use crate::id::{SpiffeId, TrustDomain};
use crate::svid::{LeafInfo, Svid};
use crate::tls::{self, ServerSpec, TlsConfigError};
use crate::verify::{IdMatcher, SpiffeServerVerifier};

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
    /// Client configurations expecting one exact server ID each (the
    /// endpoints discovery finds), made on first use.
    pub endpoints: EndpointClients,
}

/// Client configurations that accept exactly one server SPIFFE ID, made
/// on first use from the SVID and bundles they were published with, and
/// kept until the next publication (at most [`EndpointClients::MAX`]
/// identities; the cache starts over beyond that). Each has its own
/// session-resumption store: a TLS 1.3 resumption skips the server's
/// certificate, so a session the server of one identity issued must never
/// be offered where another identity is expected.
pub struct EndpointClients {
    template: Option<Arc<ClientConfig>>,
    bundles: BundleSet,
    cache: Mutex<HashMap<SpiffeId, Arc<ClientConfig>>>,
}

impl std::fmt::Debug for EndpointClients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.cache.lock().map(|c| c.len()).unwrap_or(0);
        f.debug_struct("EndpointClients")
            .field("cached", &n)
            .finish_non_exhaustive()
    }
}

impl EndpointClients {
    /// How many identities are cached before the cache starts over.
    pub const MAX: usize = 1024;

    /// Configurations cloned from `template` (the SVID, ALPN and TLS
    /// settings), verifying servers against `bundles`.
    pub fn new(template: Arc<ClientConfig>, bundles: BundleSet) -> Self {
        EndpointClients {
            template: Some(template),
            bundles,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// None at all (stage tests that bring their own configurations).
    pub fn none() -> Self {
        EndpointClients {
            template: None,
            bundles: BundleSet::new(),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The configuration that accepts only a server presenting `id`.
    pub fn for_id(&self, id: &SpiffeId) -> Option<Arc<ClientConfig>> {
        let template = self.template.as_ref()?;
        // Poisoning needs a panic while holding the lock, which only
        // clones and inserts.
        let mut cache = self.cache.lock().ok()?;
        if let Some(c) = cache.get(id) {
            return Some(c.clone());
        }
        if cache.len() >= Self::MAX {
            cache.clear();
        }
        let mut cfg = (**template).clone();
        let verifier = SpiffeServerVerifier::new(
            self.bundles.clone(),
            IdMatcher::ids([id.clone()]),
            &tls::provider(),
        );
        cfg.dangerous().set_certificate_verifier(Arc::new(verifier));
        cfg.resumption = rustls::client::Resumption::default();
        let cfg = Arc::new(cfg);
        cache.insert(id.clone(), cfg.clone());
        Some(cfg)
    }
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
        let template = tls::client_config(svid, bundles, IdMatcher::ids([]), &self.spec.alpn)?;
        let mut trust_domains: Vec<_> = bundles.trust_domains().cloned().collect();
        trust_domains.sort();
        let configs = TlsConfigs {
            svid: svid.info().clone(),
            trust_domains,
            server,
            client,
            endpoints: EndpointClients::new(template, bundles.clone()),
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
