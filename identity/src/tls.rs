//! Ready-made rustls configurations for the sidecar, built once per SVID or
//! bundle change and shared by every connection (never built per accept).

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, ServerConfig};

use crate::bundle::BundleSet;
use crate::svid::Svid;
use crate::verify::{IdMatcher, SpiffeClientVerifier, SpiffeServerVerifier};

/// A TLS configuration could not be built (bad key or bundle).
#[derive(Debug, thiserror::Error)]
#[error("building TLS configuration: {0}")]
pub struct TlsConfigError(#[from] rustls::Error);

/// The crypto provider used everywhere (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What one server configuration accepts from clients.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerSpec {
    /// Client SPIFFE IDs pinned in the handshake, if any.
    pub allowed_clients: Option<IdMatcher>,
    /// Also accept DNS-SAN client certificates (no URI SAN) issued by the
    /// CA of the sidecar's own trust domain; see
    /// [`SpiffeClientVerifier::allow_dns_san_clients`].
    pub allow_dns_san_clients: bool,
}

/// Server side of mTLS: presents `svid`, requires and verifies a client SVID.
pub fn server_config(
    svid: &Svid,
    bundles: &BundleSet,
    allowed_clients: Option<IdMatcher>,
    alpn: &[Vec<u8>],
) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let spec = ServerSpec {
        allowed_clients,
        allow_dns_san_clients: false,
    };
    server_config_for(svid, bundles, &spec, alpn)
}

/// Server side of mTLS as `spec` says. DNS-SAN clients, when allowed, must
/// chain to the bundle of `svid`'s own trust domain.
pub fn server_config_for(
    svid: &Svid,
    bundles: &BundleSet,
    spec: &ServerSpec,
    alpn: &[Vec<u8>],
) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let provider = provider();
    let mut verifier =
        SpiffeClientVerifier::new(bundles, spec.allowed_clients.clone(), provider.clone())?;
    if spec.allow_dns_san_clients {
        verifier = verifier.allow_dns_san_clients(svid.id().trust_domain().clone());
    }
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(svid.chain().to_vec(), svid.key())?;
    cfg.alpn_protocols = alpn.to_vec();
    Ok(Arc::new(cfg))
}

/// Client side of mTLS: presents `svid`, verifies the server against `expected`.
pub fn client_config(
    svid: &Svid,
    bundles: &BundleSet,
    expected: IdMatcher,
    alpn: &[Vec<u8>],
) -> Result<Arc<ClientConfig>, TlsConfigError> {
    let provider = provider();
    let verifier = SpiffeServerVerifier::new(bundles.clone(), expected, &provider)
        .with_own_trust_domain(svid.id().trust_domain().clone());
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous() // Not a weakening: the SPIFFE verifier replaces hostname checks.
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(svid.chain().to_vec(), svid.key())?;
    cfg.alpn_protocols = alpn.to_vec();
    Ok(Arc::new(cfg))
}
