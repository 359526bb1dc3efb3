//! X.509-SVIDs: a certificate chain whose leaf carries a SPIFFE ID, and its
//! private key. Leaf checks follow spiffe/spiffe `standards/X509-SVID.md`.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::id::{SpiffeId, SpiffeIdError};

/// Why a certificate is not a valid X.509-SVID leaf; each variant names the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidError {
    /// The DER does not parse as an X.509 certificate.
    #[error("certificate is not valid DER X.509")]
    Malformed,
    /// The chain is empty.
    #[error("certificate chain is empty")]
    EmptyChain,
    /// "An X.509 SVID MUST contain exactly one URI SAN" (X509-SVID §2).
    #[error("leaf has {0} URI SANs; an X.509-SVID must have exactly one")]
    UriSanCount(usize),
    /// The URI SAN is not a valid SPIFFE ID.
    #[error("leaf URI SAN is not a valid SPIFFE ID: {0}")]
    BadSpiffeId(#[from] SpiffeIdError),
    /// "Leaf certificates MUST NOT have a root path" (X509-SVID §3).
    #[error("leaf SPIFFE ID has no path (it names a trust domain, not a workload)")]
    NoPath,
    /// "The basic constraints extension ... cA field MUST be set to false" (X509-SVID §4.1).
    #[error("leaf is a CA certificate (basicConstraints cA=true)")]
    LeafIsCa,
    /// "Leaf SVIDs MUST set digitalSignature" (X509-SVID §4.3).
    #[error("leaf keyUsage is missing or does not set digitalSignature")]
    NoDigitalSignature,
    /// "[Leaf SVIDs] MUST NOT set keyCertSign or cRLSign" (X509-SVID §4.3).
    #[error("leaf keyUsage sets keyCertSign or cRLSign")]
    LeafCanSign,
    /// The private key could not be read.
    #[error("private key is missing or not PKCS#8/SEC1/PKCS#1 PEM")]
    BadKey,
    /// A PEM file could not be parsed.
    #[error("PEM data could not be parsed")]
    BadPem,
    /// A DNS-SAN client certificate (no URI SAN) names no DNS SAN.
    #[error("leaf has neither a URI SAN nor a DNS SAN")]
    NoDnsSan,
    /// A DNS SAN of a DNS-SAN client certificate is not a host name
    /// (letters, digits and '-' in dot-separated labels); such a name could
    /// not be matched by a policy and could break the XFCC header apart.
    #[error("leaf DNS SAN {0:?} is not a host name")]
    BadDnsSan(String),
}

/// Facts about a validated SVID leaf, extracted once.
#[derive(Debug, Clone)]
pub struct LeafInfo {
    /// The SPIFFE ID from the single URI SAN.
    pub id: SpiffeId,
    /// DNS SANs, if any.
    pub dns_names: Vec<String>,
    /// Serial number, hex.
    pub serial: String,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

/// Validates an SVID leaf certificate and extracts its SPIFFE ID.
pub fn validate_leaf(der: &[u8]) -> Result<LeafInfo, SvidError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|_| SvidError::Malformed)?;
    let mut uris = Vec::new();
    let mut dns_names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(u) => uris.push(*u),
                GeneralName::DNSName(d) => dns_names.push((*d).to_owned()),
                _ => {}
            }
        }
    }
    if uris.len() != 1 {
        return Err(SvidError::UriSanCount(uris.len()));
    }
    let id = SpiffeId::parse(uris[0])?;
    if id.is_trust_domain_id() {
        return Err(SvidError::NoPath);
    }
    if cert.is_ca() {
        return Err(SvidError::LeafIsCa);
    }
    match cert.key_usage() {
        Ok(Some(ku)) => {
            if !ku.value.digital_signature() {
                return Err(SvidError::NoDigitalSignature);
            }
            if ku.value.key_cert_sign() || ku.value.crl_sign() {
                return Err(SvidError::LeafCanSign);
            }
        }
        _ => return Err(SvidError::NoDigitalSignature),
    }
    let validity = cert.validity();
    Ok(LeafInfo {
        id,
        dns_names,
        serial: cert.raw_serial_as_string(),
        not_before: asn1_to_system(validity.not_before.timestamp()),
        not_after: asn1_to_system(validity.not_after.timestamp()),
    })
}

/// The end of validity of a DER certificate (`None` if it does not
/// parse). Connections made with a certificate are closed when it expires.
pub fn leaf_not_after(der: &[u8]) -> Option<SystemTime> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    Some(asn1_to_system(cert.validity().not_after.timestamp()))
}

/// Validates the leaf of a DNS-SAN client certificate (an ingress that is
/// not a SPIFFE workload, `SCENARIOS.md` §3.2): no URI SAN at all, at least
/// one DNS SAN, not a CA, and, when keyUsage is present, digitalSignature
/// set (TLS 1.3 CertificateVerify signs with it). Returns the DNS SANs.
/// A certificate with a URI SAN is an SVID and must pass [`validate_leaf`]:
/// a broken SVID never falls back to being a DNS identity.
pub fn validate_dns_client_leaf(der: &[u8]) -> Result<Vec<String>, SvidError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|_| SvidError::Malformed)?;
    let mut uris = 0;
    let mut dns_names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(_) => uris += 1,
                GeneralName::DNSName(d) => dns_names.push((*d).to_owned()),
                _ => {}
            }
        }
    }
    if uris != 0 {
        return Err(SvidError::UriSanCount(uris));
    }
    if dns_names.is_empty() {
        return Err(SvidError::NoDnsSan);
    }
    if let Some(bad) = dns_names.iter().find(|d| !is_host_name(d)) {
        return Err(SvidError::BadDnsSan(bad.clone()));
    }
    if cert.is_ca() {
        return Err(SvidError::LeafIsCa);
    }
    match cert.key_usage() {
        Ok(Some(ku)) if !ku.value.digital_signature() => Err(SvidError::NoDigitalSignature),
        Ok(_) => Ok(dns_names),
        Err(_) => Err(SvidError::Malformed),
    }
}

/// RFC 1123 host name: 1-253 bytes, dot-separated labels of 1-63 letters,
/// digits and '-', not starting or ending with '-'. A trailing dot is allowed.
pub fn is_host_name(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn asn1_to_system(ts: i64) -> SystemTime {
    if ts >= 0 {
        UNIX_EPOCH + Duration::from_secs(ts as u64)
    } else {
        UNIX_EPOCH
    }
}

/// An X.509-SVID: chain (leaf first, intermediates after) and private key.
/// The key lives in memory only and is never printed.
pub struct Svid {
    info: LeafInfo,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Svid {
    /// Builds an SVID from a DER chain (leaf first) and a private key, validating the leaf.
    pub fn from_der(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, SvidError> {
        let leaf = chain.first().ok_or(SvidError::EmptyChain)?;
        let info = validate_leaf(leaf)?;
        Ok(Svid { info, chain, key })
    }

    /// Builds an SVID from PEM text: a certificate chain and a private key.
    pub fn from_pem(chain_pem: &[u8], key_pem: &[u8]) -> Result<Self, SvidError> {
        let chain = parse_certs_pem(chain_pem)?;
        let key = rustls_pemfile::private_key(&mut &key_pem[..])
            .map_err(|_| SvidError::BadKey)?
            .ok_or(SvidError::BadKey)?;
        Self::from_der(chain, key)
    }

    /// The SVID's SPIFFE ID.
    pub fn id(&self) -> &SpiffeId {
        &self.info.id
    }

    /// Facts about the leaf.
    pub fn info(&self) -> &LeafInfo {
        &self.info
    }

    /// The chain, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// A copy of the private key, for building a TLS configuration.
    pub fn key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }

    /// True when the leaf is outside its validity period at `now`.
    pub fn is_expired_at(&self, now: SystemTime) -> bool {
        now >= self.info.not_after || now < self.info.not_before
    }
}

impl Clone for Svid {
    fn clone(&self) -> Self {
        Svid {
            info: self.info.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl fmt::Debug for Svid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key is deliberately absent: secrets never reach logs.
        f.debug_struct("Svid")
            .field("id", &self.info.id)
            .field("serial", &self.info.serial)
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

/// Parses every CERTIFICATE block of a PEM text.
pub fn parse_certs_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, SvidError> {
    let certs: Result<Vec<_>, _> = rustls_pemfile::certs(&mut &pem[..]).collect();
    let certs = certs.map_err(|_| SvidError::BadPem)?;
    if certs.is_empty() {
        return Err(SvidError::EmptyChain);
    }
    Ok(certs)
}
