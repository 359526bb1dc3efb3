//! rustls verifiers for SPIFFE peers. Each wraps the WebPKI path validation
//! and adds one SPIFFE step: the peer is validated against the bundle of the
//! trust domain named in its own SVID, and its SPIFFE ID must match what the
//! caller expects. Hostname checks do not apply: SVIDs name workloads, not hosts.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};

use crate::bundle::BundleSet;
use crate::id::{SpiffeId, TrustDomain};
use crate::svid::{SvidError, is_host_name, validate_dns_client_leaf, validate_leaf};

/// Which peer SPIFFE IDs are acceptable, and, for servers only, which DNS
/// names a certificate without a SPIFFE ID may carry instead.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdMatcher {
    ids: HashSet<SpiffeId>,
    trust_domains: HashSet<TrustDomain>,
    /// Lowercase, without a trailing dot.
    dns_names: HashSet<String>,
}

impl IdMatcher {
    /// Matches exactly these IDs.
    pub fn ids(ids: impl IntoIterator<Item = SpiffeId>) -> Self {
        IdMatcher {
            ids: ids.into_iter().collect(),
            ..IdMatcher::default()
        }
    }

    /// Matches any ID of these trust domains.
    pub fn trust_domains(tds: impl IntoIterator<Item = TrustDomain>) -> Self {
        IdMatcher {
            trust_domains: tds.into_iter().collect(),
            ..IdMatcher::default()
        }
    }

    /// Matches servers whose certificate has no URI SAN and carries one of
    /// these DNS names as a DNS SAN (an ACM PCA or file certificate, App
    /// Mesh's SAN pinning), compared exactly, case-insensitively. Such a
    /// server must chain to the bundle of the client's own trust domain
    /// ([`SpiffeServerVerifier::with_own_trust_domain`]). A name is a
    /// weaker identity than a SPIFFE ID, so only a configuration that names
    /// it accepts one (`allow_dns_san_servers`); client verifiers ignore it.
    pub fn dns_names(names: impl IntoIterator<Item = String>) -> Self {
        IdMatcher {
            dns_names: names.into_iter().map(|n| normalize_dns(&n)).collect(),
            ..IdMatcher::default()
        }
    }

    /// Adds the IDs and trust domains of `other`.
    pub fn union(mut self, other: &IdMatcher) -> Self {
        self.ids.extend(other.ids.iter().cloned());
        self.trust_domains
            .extend(other.trust_domains.iter().cloned());
        self.dns_names.extend(other.dns_names.iter().cloned());
        self
    }

    /// True when `id` is acceptable.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        self.ids.contains(id) || self.trust_domains.contains(id.trust_domain())
    }

    /// True when one of a DNS-SAN certificate's `names` is acceptable.
    pub fn matches_dns(&self, names: &[String]) -> bool {
        names
            .iter()
            .any(|n| self.dns_names.contains(&normalize_dns(n)))
    }

    /// True when some DNS-SAN server certificates are acceptable.
    pub fn accepts_dns_names(&self) -> bool {
        !self.dns_names.is_empty()
    }

    /// True when nothing is acceptable.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty() && self.trust_domains.is_empty() && self.dns_names.is_empty()
    }
}

/// DNS names compare case-insensitively (RFC 4343), a trailing dot aside.
fn normalize_dns(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

/// A peer's SPIFFE ID was valid but not one the caller accepts.
#[derive(Debug, thiserror::Error)]
#[error("peer {0} is not an accepted identity")]
pub struct PeerNotAllowed(pub SpiffeId);

/// The peer's trust domain has no bundle ("the peer is untrusted", Workload API §4.6).
#[derive(Debug, thiserror::Error)]
#[error("no trust bundle for the peer's trust domain {0}")]
pub struct UnknownTrustDomain(pub TrustDomain);

/// Why a peer's certificate was refused, by what the peer got wrong: the
/// decoding of the errors the verifiers of this module return to rustls
/// (encoded just below, by `other` and `leaf_error`), so that callers
/// classify handshake failures without downcasting through
/// `rustls::OtherError` themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRejection {
    /// The peer sent no certificate.
    NoCertificate,
    /// The chain does not lead to a trusted root (unknown issuer, bad
    /// signature).
    UnknownCa,
    /// The peer's trust domain has no bundle here.
    UnknownTrustDomain,
    /// The certificate is valid, but its identity is not accepted here.
    NotAllowed,
    /// The certificate is expired or not yet valid.
    Expired,
    /// The leaf breaks a rule of the X.509-SVID specification (URI SANs,
    /// basic constraints, key usage, encoding).
    InvalidSvid,
}

impl PeerRejection {
    /// Decodes a handshake error raised while verifying the peer's
    /// certificate; `None` for every other TLS error (protocol faults,
    /// alerts, I/O).
    pub fn of(e: &Error) -> Option<PeerRejection> {
        let ce = match e {
            Error::NoCertificatesPresented => return Some(PeerRejection::NoCertificate),
            Error::InvalidCertificate(ce) => ce,
            _ => return None,
        };
        Some(match ce {
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. } => PeerRejection::Expired,
            CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                PeerRejection::UnknownCa
            }
            // A wrong extended key usage (a client-only certificate as a
            // server) breaks the leaf rules as well.
            CertificateError::BadEncoding
            | CertificateError::InvalidPurpose
            | CertificateError::InvalidPurposeContext { .. } => PeerRejection::InvalidSvid,
            CertificateError::Other(o) => {
                let inner = &*o.0;
                if inner.downcast_ref::<PeerNotAllowed>().is_some()
                    || inner.downcast_ref::<DnsPeerNotAllowed>().is_some()
                    || inner.downcast_ref::<DnsServerNotAllowed>().is_some()
                {
                    PeerRejection::NotAllowed
                } else if inner.downcast_ref::<UnknownTrustDomain>().is_some() {
                    PeerRejection::UnknownTrustDomain
                } else if inner.downcast_ref::<SvidError>().is_some() {
                    PeerRejection::InvalidSvid
                } else {
                    return None;
                }
            }
            _ => return None,
        })
    }
}

fn other(e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(e))))
}

fn leaf_error(e: SvidError) -> Error {
    match e {
        SvidError::Malformed => Error::InvalidCertificate(CertificateError::BadEncoding),
        e => other(e),
    }
}

/// Verifies servers (used by the outbound side): chain to the bundle of the
/// server's trust domain, then the server's ID against `expected`.
///
/// When `expected` names DNS names ([`IdMatcher::dns_names`]), a server
/// certificate without a URI SAN is accepted too if one of its DNS SANs is
/// among them and its chain leads to the bundle of the client's own trust
/// domain (the mesh CA): the check happens in the handshake, as for SPIFFE
/// IDs. An SVID is always judged by its SPIFFE ID, never by its DNS SANs.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    bundles: BundleSet,
    expected: IdMatcher,
    own_trust_domain: Option<TrustDomain>,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    /// A verifier trusting `bundles` and accepting servers matching `expected`.
    pub fn new(bundles: BundleSet, expected: IdMatcher, provider: &CryptoProvider) -> Self {
        SpiffeServerVerifier {
            bundles,
            expected,
            own_trust_domain: None,
            algs: provider.signature_verification_algorithms,
        }
    }

    /// The client's own trust domain, whose bundle DNS-SAN servers must
    /// chain to. Without it no DNS-SAN server is accepted.
    pub fn with_own_trust_domain(mut self, td: TrustDomain) -> Self {
        self.own_trust_domain = Some(td);
        self
    }

    fn verify_dns_server(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        // The leaf rules of a DNS-SAN client hold for a server as well.
        let names = validate_dns_client_leaf(end_entity).map_err(leaf_error)?;
        let Some(td) = &self.own_trust_domain else {
            return Err(other(DnsServerNotAllowed(names.join(","))));
        };
        self.verify_chain(td, end_entity, intermediates, now)?;
        if !self.expected.matches_dns(&names) {
            return Err(other(DnsServerNotAllowed(names.join(","))));
        }
        Ok(ServerCertVerified::assertion())
    }

    /// The chain of `end_entity` up to the bundle of `td` (WebPKI also
    /// checks the serverAuth extended key usage).
    fn verify_chain(
        &self,
        td: &TrustDomain,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), Error> {
        let bundle = self
            .bundles
            .get(td)
            .ok_or_else(|| other(UnknownTrustDomain(td.clone())))?;
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            bundle.roots(),
            intermediates,
            now,
            self.algs.all,
        )
    }
}

/// A server certificate with DNS SANs only was verified, but none of its
/// names is an accepted one (`allow_dns_san_servers`).
#[derive(Debug, thiserror::Error)]
#[error("server with DNS SANs {0} is not an accepted identity")]
pub struct DnsServerNotAllowed(pub String);

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let leaf = match validate_leaf(end_entity) {
            Ok(leaf) => leaf,
            // No URI SAN at all: a DNS-SAN server, if the caller names some.
            Err(SvidError::UriSanCount(0)) if self.expected.accepts_dns_names() => {
                return self.verify_dns_server(end_entity, intermediates, now);
            }
            Err(e) => return Err(leaf_error(e)),
        };
        self.verify_chain(leaf.id.trust_domain(), end_entity, intermediates, now)?;
        if !self.expected.matches(&leaf.id) {
            return Err(other(PeerNotAllowed(leaf.id)));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Verifies clients (used by the inbound side): a client certificate is
/// required, it must chain to the bundle of the client's trust domain, and,
/// when `allowed` is set, the client's ID must match it (the equivalent of
/// Envoy's `verify_subject_alt_name`).
///
/// With [`SpiffeClientVerifier::allow_dns_san_clients`], a certificate with
/// no URI SAN and a DNS SAN (an ingress outside the mesh) is accepted too,
/// once its chain verifies against the bundle of one named trust domain.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    per_domain: HashMap<TrustDomain, Arc<dyn ClientCertVerifier>>,
    allowed: Option<IdMatcher>,
    dns_san_clients: Option<TrustDomain>,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeClientVerifier {
    /// A verifier trusting `bundles`, optionally pinning client IDs to `allowed`.
    pub fn new(
        bundles: &BundleSet,
        allowed: Option<IdMatcher>,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, Error> {
        let mut per_domain = HashMap::new();
        for td in bundles.trust_domains() {
            // Invariant: `td` comes from the set's own keys.
            let bundle = bundles.get(td).expect("bundle present for listed domain");
            let v = WebPkiClientVerifier::builder_with_provider(
                bundle.roots().clone(),
                provider.clone(),
            )
            .build()
            .map_err(|e| Error::General(format!("client verifier for {td}: {e}")))?;
            per_domain.insert(td.clone(), v);
        }
        Ok(SpiffeClientVerifier {
            per_domain,
            allowed,
            dns_san_clients: None,
            algs: provider.signature_verification_algorithms,
        })
    }

    /// Also accepts clients whose certificate has no URI SAN but a DNS SAN,
    /// when the chain verifies against the bundle of `td` (the mesh CA).
    /// This widens what the handshake accepts, hence the name. Such a
    /// client has no SPIFFE ID, so an ID pin (`allowed`) refuses it.
    pub fn allow_dns_san_clients(mut self, td: TrustDomain) -> Self {
        self.dns_san_clients = Some(td);
        self
    }

    fn verify_dns_client(
        &self,
        td: &TrustDomain,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let names = validate_dns_client_leaf(end_entity).map_err(leaf_error)?;
        let v = self
            .per_domain
            .get(td)
            .ok_or_else(|| other(UnknownTrustDomain(td.clone())))?;
        v.verify_client_cert(end_entity, intermediates, now)?;
        if self.allowed.is_some() {
            return Err(other(DnsPeerNotAllowed(names.join(","))));
        }
        Ok(ClientCertVerified::assertion())
    }
}

/// A DNS-SAN client was verified but the port pins SPIFFE IDs.
#[derive(Debug, thiserror::Error)]
#[error("peer with DNS SANs {0} has no SPIFFE ID and this port pins SPIFFE IDs")]
pub struct DnsPeerNotAllowed(pub String);

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Advertising CA names would only leak the mesh's PKI layout.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let leaf = match (validate_leaf(end_entity), &self.dns_san_clients) {
            (Ok(leaf), _) => leaf,
            // No URI SAN at all: not an SVID, maybe an ingress certificate.
            (Err(SvidError::UriSanCount(0)), Some(td)) => {
                return self.verify_dns_client(td, end_entity, intermediates, now);
            }
            (Err(e), _) => return Err(leaf_error(e)),
        };
        let td = leaf.id.trust_domain();
        let v = self
            .per_domain
            .get(td)
            .ok_or_else(|| other(UnknownTrustDomain(td.clone())))?;
        v.verify_client_cert(end_entity, intermediates, now)?;
        if let Some(allowed) = &self.allowed
            && !allowed.matches(&leaf.id)
        {
            return Err(other(PeerNotAllowed(leaf.id)));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// The verified identity of a TLS peer, extracted after the handshake.
#[derive(Debug, Clone)]
pub struct PeerIdentity {
    /// The peer's SPIFFE ID; `None` for a DNS-SAN client certificate
    /// accepted on a port with `allow_dns_san_clients` (the peer is then
    /// known by its DNS SANs only).
    pub id: Option<SpiffeId>,
    /// DNS SANs of the peer certificate.
    pub dns_names: Vec<String>,
    /// SHA-256 of the peer's leaf certificate, lower-case hex (XFCC `Hash`).
    pub cert_sha256: String,
    /// The certificates the peer presented, leaf first (XFCC `Cert` and
    /// `Chain`, Envoy's `include_peer_certificate`).
    pub chain: std::sync::Arc<[CertificateDer<'static>]>,
}

impl PeerIdentity {
    /// The principal as Envoy reports it (and logs show it): the SPIFFE
    /// ID, else the first DNS SAN.
    pub fn principal(&self) -> &str {
        match (&self.id, self.dns_names.first()) {
            (Some(id), _) => id.as_str(),
            (None, Some(dns)) => dns,
            // Unreachable for a verified peer: it has one or the other.
            (None, None) => "-",
        }
    }
}

/// Extracts the peer identity from the certificates of a completed handshake.
/// Only call this on a connection whose verifier accepted the chain: a leaf
/// without a URI SAN is read as a DNS-SAN client, which only a verifier
/// built with [`SpiffeClientVerifier::allow_dns_san_clients`] accepts.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Option<PeerIdentity> {
    let certs = certs?;
    let leaf = certs.first()?;
    let (id, dns_names) = match validate_leaf(leaf) {
        // An SVID's extra DNS SANs are not checked by the verifier; keep
        // only host names, the only ones a `dns:` rule or XFCC can carry.
        Ok(info) => {
            let dns = info.dns_names.into_iter().filter(|d| is_host_name(d));
            (Some(info.id), dns.collect())
        }
        Err(SvidError::UriSanCount(0)) => (None, validate_dns_client_leaf(leaf).ok()?),
        Err(_) => return None,
    };
    let digest = Sha256::digest(leaf.as_ref());
    let mut hex = String::with_capacity(64);
    for b in digest {
        use std::fmt::Write;
        // Writing to a String cannot fail.
        let _ = write!(hex, "{b:02x}");
    }
    Some(PeerIdentity {
        id,
        dns_names,
        cert_sha256: hex,
        chain: certs.iter().map(|c| c.clone().into_owned()).collect(),
    })
}
