//! The development CA: a self-signed root for one trust domain that issues
//! X.509-SVIDs valid under the SPIFFE rules (ECDSA P-256, one URI SAN, CA
//! false, digitalSignature, server and client auth). For laptops, demos,
//! tests and benchmarks, where SPIRE is not installed.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
    SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use crate::bundle::{BundleError, TrustBundle};
use crate::id::{SpiffeId, TrustDomain};
use crate::svid::{Svid, SvidError};

/// File name of the CA certificate inside a CA directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key inside a CA directory.
pub const CA_KEY_FILE: &str = "ca.key";

/// id-ce-basicConstraints (RFC 5280 §4.2.1.9).
const BASIC_CONSTRAINTS_OID: &[u64] = &[2, 5, 29, 19];

/// Errors of the development CA.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// Certificate generation failed (a bug or an invalid name).
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A CA file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The CA certificate on disk has no SPIFFE trust domain URI SAN.
    #[error("{0}: CA certificate has no spiffe:// URI SAN naming its trust domain")]
    NoTrustDomain(PathBuf),
    /// The issued SVID did not pass our own validation (a bug).
    #[error("issued SVID is invalid: {0}")]
    Svid(#[from] SvidError),
    /// The CA certificate is not a usable trust anchor.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// The TTL is not representable.
    #[error("validity period out of range")]
    BadValidity,
}

/// A development certificate authority for one trust domain.
pub struct DevCa {
    td: TrustDomain,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// An SVID freshly issued by the development CA, with its PEM forms.
pub struct IssuedSvid {
    /// The SVID (chain and key in memory).
    pub svid: Svid,
    /// The certificate chain as PEM (leaf first).
    pub chain_pem: String,
    /// The private key as PKCS#8 PEM.
    pub key_pem: String,
}

/// A DNS-SAN client certificate issued by the development CA.
pub struct IssuedCert {
    /// The certificate, DER.
    pub cert_der: CertificateDer<'static>,
    /// The certificate as PEM.
    pub chain_pem: String,
    /// The private key as PKCS#8 PEM.
    pub key_pem: String,
}

struct SignedLeaf {
    cert_der: CertificateDer<'static>,
    chain_pem: String,
    key_pem: String,
    key_der: PrivateKeyDer<'static>,
}

impl DevCa {
    /// Generates a new root CA for `td`, valid for `ttl`.
    pub fn generate(td: &TrustDomain, ttl: Duration) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Rampart development CA");
        dn.push(DnType::CommonName, td.as_str());
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        // "The SPIFFE ID of a signing certificate ... MUST NOT have a path" (X509-SVID §3).
        params.subject_alt_names = vec![SanType::URI(td.id_string().try_into()?)];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + to_time(ttl)?;
        let cert = params.self_signed(&key)?;
        let cert_der = cert.der().clone();
        let cert_pem = cert.pem();
        Ok(DevCa {
            td: td.clone(),
            cert_der,
            cert_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA from `dir` (`ca.pem`, `ca.key`), as written by [`DevCa::save`].
    pub fn load(dir: &Path) -> Result<Self, CaError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let cert_pem = read(&cert_path)?;
        let key_pem = read(&key_path)?;
        let key = KeyPair::from_pem(&key_pem)?;
        let certs = crate::svid::parse_certs_pem(cert_pem.as_bytes())?;
        let cert_der = certs[0].clone();
        let td = ca_trust_domain(&cert_der).ok_or(CaError::NoTrustDomain(cert_path))?;
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)?;
        Ok(DevCa {
            td,
            cert_der,
            cert_pem,
            issuer,
        })
    }

    /// Writes `ca.pem` (0644) and `ca.key` (0600) into `dir`, creating it.
    pub fn save(&self, dir: &Path) -> Result<(), CaError> {
        std::fs::create_dir_all(dir).map_err(|source| CaError::Io {
            path: dir.to_owned(),
            source,
        })?;
        write_with_mode(&dir.join(CA_CERT_FILE), &self.cert_pem, 0o644)?;
        write_with_mode(&dir.join(CA_KEY_FILE), &self.issuer_key_pem(), 0o600)?;
        Ok(())
    }

    fn issuer_key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.td
    }

    /// The CA certificate as PEM (the trust bundle to hand out).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate as a one-certificate trust bundle.
    pub fn bundle(&self) -> Result<TrustBundle, CaError> {
        Ok(TrustBundle::new(
            self.td.clone(),
            vec![self.cert_der.clone()],
        )?)
    }

    /// Issues an X.509-SVID for `id`, valid from a minute ago for `ttl`.
    pub fn issue(&self, id: &SpiffeId, ttl: Duration) -> Result<IssuedSvid, CaError> {
        self.issue_with(id, ttl, &[])
    }

    /// Issues an X.509-SVID for `id` with extra DNS SANs.
    pub fn issue_with(
        &self,
        id: &SpiffeId,
        ttl: Duration,
        dns_names: &[String],
    ) -> Result<IssuedSvid, CaError> {
        self.issue_at(id, SystemTime::now(), ttl, dns_names)
    }

    /// Issues an X.509-SVID for `id` valid from a minute before `now` until
    /// `now + ttl`; `now` is injected so that tests can run on paused time.
    pub fn issue_at(
        &self,
        id: &SpiffeId,
        now: SystemTime,
        ttl: Duration,
        dns_names: &[String],
    ) -> Result<IssuedSvid, CaError> {
        let mut sans = vec![SanType::URI(id.as_str().try_into()?)];
        for d in dns_names {
            sans.push(SanType::DnsName(d.as_str().try_into()?));
        }
        let eku = [
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let leaf = self.sign_leaf(sans, &eku, now, ttl)?;
        let svid = Svid::from_der(vec![leaf.cert_der.clone()], leaf.key_der)?;
        Ok(IssuedSvid {
            svid,
            chain_pem: leaf.chain_pem,
            key_pem: leaf.key_pem,
        })
    }

    /// Issues a client certificate whose only SANs are `dns_names` (no
    /// SPIFFE ID): what an ingress outside the mesh presents to a port with
    /// `allow_dns_san_clients` (`SCENARIOS.md` §3.2). Client auth only.
    pub fn issue_dns_client(
        &self,
        dns_names: &[String],
        ttl: Duration,
    ) -> Result<IssuedCert, CaError> {
        self.issue_dns(dns_names, &[ExtendedKeyUsagePurpose::ClientAuth], ttl)
    }

    /// Issues a server certificate whose only SANs are `dns_names` (no
    /// SPIFFE ID), for server and client auth: what a server with an ACM
    /// PCA or file certificate presents to an outbound rule that names it
    /// (`allow_dns_san_servers`).
    pub fn issue_dns_server(
        &self,
        dns_names: &[String],
        ttl: Duration,
    ) -> Result<IssuedCert, CaError> {
        self.issue_dns(
            dns_names,
            &[
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            ttl,
        )
    }

    /// A certificate whose only SANs are `dns_names`, for `eku`.
    fn issue_dns(
        &self,
        dns_names: &[String],
        eku: &[ExtendedKeyUsagePurpose],
        ttl: Duration,
    ) -> Result<IssuedCert, CaError> {
        if dns_names.is_empty() {
            return Err(CaError::Svid(SvidError::NoDnsSan));
        }
        let sans = dns_names
            .iter()
            .map(|d| Ok(SanType::DnsName(d.as_str().try_into()?)))
            .collect::<Result<Vec<_>, rcgen::Error>>()?;
        let leaf = self.sign_leaf(sans, eku, SystemTime::now(), ttl)?;
        // Our own check, as for SVIDs: what we issue must be what we accept.
        crate::svid::validate_dns_client_leaf(&leaf.cert_der)?;
        Ok(IssuedCert {
            cert_der: leaf.cert_der,
            chain_pem: leaf.chain_pem,
            key_pem: leaf.key_pem,
        })
    }

    /// Signs a leaf (ECDSA P-256, CA false, digitalSignature) with `sans`.
    fn sign_leaf(
        &self,
        sans: Vec<SanType>,
        eku: &[ExtendedKeyUsagePurpose],
        now: SystemTime,
        ttl: Duration,
    ) -> Result<SignedLeaf, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CountryName, "US");
        dn.push(DnType::OrganizationName, "SPIFFE");
        params.distinguished_name = dn;
        // basicConstraints with cA left at its DEFAULT (false), which DER
        // encodes as an empty SEQUENCE. rcgen's `ExplicitNoCa` writes
        // `cA FALSE` explicitly, which strict DER parsers (py-spiffe's
        // `cryptography`) reject, so the extension is written by hand.
        params.is_ca = IsCa::NoCa;
        let mut bc = CustomExtension::from_oid_content(BASIC_CONSTRAINTS_OID, vec![0x30, 0x00]);
        bc.set_criticality(true);
        params.custom_extensions.push(bc);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
            KeyUsagePurpose::KeyAgreement,
        ];
        params.extended_key_usages = eku.to_vec();
        params.subject_alt_names = sans;
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::from(now);
        // Backdate a little so peers with a slightly slow clock accept it.
        params.not_before = now - time::Duration::seconds(60);
        params.not_after = now + to_time(ttl)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(SignedLeaf {
            cert_der: cert.der().clone(),
            chain_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            key_der: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        })
    }

    /// Expiry of the CA certificate.
    pub fn not_after(&self) -> SystemTime {
        use x509_parser::prelude::{FromDer, X509Certificate};
        X509Certificate::from_der(&self.cert_der)
            .map(|(_, c)| {
                SystemTime::UNIX_EPOCH
                    + Duration::from_secs(c.validity().not_after.timestamp().max(0) as u64)
            })
            .unwrap_or(SystemTime::UNIX_EPOCH)
    }
}

fn ca_trust_domain(der: &[u8]) -> Option<TrustDomain> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        GeneralName::URI(u) => TrustDomain::parse(u).ok(),
        _ => None,
    })
}

fn to_time(d: Duration) -> Result<time::Duration, CaError> {
    time::Duration::try_from(d).map_err(|_| CaError::BadValidity)
}

fn read(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|source| CaError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Writes `contents` to `path` with Unix permissions `mode` (0600 for keys),
/// so a private key is never readable by others, not even briefly.
pub fn write_with_mode(path: &Path, contents: &str, mode: u32) -> Result<(), CaError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| CaError::Io {
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    f.write_all(contents.as_bytes()).map_err(io)
}

/// The development CA as an identity source: issues the sidecar's SVID at
/// start and renews it at half-life, as SPIRE agents do, so that a renewal
/// failure leaves half the lifetime to recover before the SVID expires.
pub struct DevCaSource {
    ca: std::sync::Arc<DevCa>,
    id: SpiffeId,
    ttl: Duration,
}

impl DevCaSource {
    /// Issues SVIDs for `id` with lifetime `ttl` from `ca`.
    pub fn new(ca: std::sync::Arc<DevCa>, id: SpiffeId, ttl: Duration) -> Self {
        DevCaSource { ca, id, ttl }
    }

    /// Sends a fresh identity at start and every half-life; returns when `tx` closes.
    pub async fn run(self, tx: tokio::sync::mpsc::Sender<crate::rotation::Update>) {
        use crate::metrics::{self as m, SourceKind};
        use crate::rotation::Update;
        loop {
            let next = match self.issue() {
                Ok(identity) => {
                    m::source_connected(SourceKind::DevCa, true);
                    if tx.send(Update::Identity(Box::new(identity))).await.is_err() {
                        return;
                    }
                    self.ttl / 2
                }
                Err(e) => {
                    tracing::error!(error = %e, "development CA could not issue an SVID");
                    m::source_error(SourceKind::DevCa);
                    m::source_connected(SourceKind::DevCa, false);
                    Duration::from_secs(1).min(self.ttl / 4)
                }
            };
            tokio::select! {
                () = tokio::time::sleep(next) => {}
                () = tx.closed() => return,
            }
        }
    }

    fn issue(&self) -> Result<crate::rotation::Identity, CaError> {
        let issued = self.ca.issue(&self.id, self.ttl)?;
        let mut bundles = crate::bundle::BundleSet::new();
        bundles.insert(self.ca.bundle()?);
        Ok(crate::rotation::Identity {
            svid: issued.svid,
            bundles,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rotation::Update;

    #[tokio::test(start_paused = true)]
    async fn dev_ca_source_renews_at_half_life() {
        let td = TrustDomain::parse("example.org").unwrap();
        let ca = std::sync::Arc::new(DevCa::generate(&td, Duration::from_secs(3600)).unwrap());
        let id = SpiffeId::parse("spiffe://example.org/web").unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(DevCaSource::new(ca, id.clone(), Duration::from_secs(60)).run(tx));
        let start = tokio::time::Instant::now();
        let mut serials = Vec::new();
        for _ in 0..3 {
            match rx.recv().await {
                Some(Update::Identity(i)) => {
                    assert_eq!(i.svid.id(), &id);
                    serials.push(i.svid.info().serial.clone());
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(60),
            "two renewals at 30s each"
        );
        serials.dedup();
        assert_eq!(serials.len(), 3);
    }
}
