//! Trust bundles: the CA certificates of one trust domain, and the set of
//! bundles a sidecar trusts. Bundles of different trust domains are never
//! merged ("MUST NOT merge bundles of different trust domains", SPIFFE
//! Federation §4): a peer is verified only against its own domain's bundle.

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine;
use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;

use crate::id::TrustDomain;

/// Why a bundle could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// A certificate in the bundle is not a usable trust anchor.
    #[error("bundle for {td}: certificate {index} is not a usable CA certificate: {reason}")]
    BadAnchor {
        /// The trust domain.
        td: TrustDomain,
        /// Index of the certificate in the bundle.
        index: usize,
        /// What webpki said.
        reason: String,
    },
    /// The bundle has no certificates.
    #[error("bundle for {0} has no certificates")]
    Empty(TrustDomain),
    /// The bundle is JSON but not a SPIFFE bundle (a JWK Set).
    #[error("bundle for {td} is not a valid SPIFFE bundle (JWK Set): {reason}")]
    BadJwks {
        /// The trust domain.
        td: TrustDomain,
        /// What is wrong.
        reason: String,
    },
    /// The bundle is neither JSON nor PEM with CERTIFICATE blocks.
    #[error("bundle for {0} is neither a JWK Set nor PEM certificates")]
    BadPem(TrustDomain),
}

/// The X.509 authorities of one trust domain.
#[derive(Debug, Clone)]
pub struct TrustBundle {
    td: TrustDomain,
    certs: Vec<CertificateDer<'static>>,
    roots: Arc<RootCertStore>,
}

impl TrustBundle {
    /// Builds a bundle from DER CA certificates.
    pub fn new(td: TrustDomain, certs: Vec<CertificateDer<'static>>) -> Result<Self, BundleError> {
        if certs.is_empty() {
            return Err(BundleError::Empty(td));
        }
        let mut roots = RootCertStore::empty();
        for (index, c) in certs.iter().enumerate() {
            roots.add(c.clone()).map_err(|e| BundleError::BadAnchor {
                td: td.clone(),
                index,
                reason: e.to_string(),
            })?;
        }
        Ok(TrustBundle {
            td,
            certs,
            roots: Arc::new(roots),
        })
    }

    /// Parses a bundle file's contents: a SPIFFE bundle (JWK Set, detected by
    /// its leading `{`) or PEM CA certificates.
    pub fn parse(td: TrustDomain, data: &[u8]) -> Result<Self, BundleError> {
        let first = data.iter().find(|b| !b.is_ascii_whitespace());
        if first == Some(&b'{') {
            let certs = x509_authorities_from_jwks(&td, data)?;
            return Self::new(td, certs);
        }
        let certs: Result<Vec<_>, _> = rustls_pemfile::certs(&mut &data[..]).collect();
        match certs {
            Ok(certs) if !certs.is_empty() => Self::new(td, certs),
            _ => Err(BundleError::BadPem(td)),
        }
    }

    /// The trust domain this bundle belongs to.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.td
    }

    /// The CA certificates.
    pub fn certs(&self) -> &[CertificateDer<'static>] {
        &self.certs
    }

    /// The certificates as a rustls root store.
    pub fn roots(&self) -> &Arc<RootCertStore> {
        &self.roots
    }
}

/// The X.509 authorities of a SPIFFE bundle (SPIFFE Trust Domain and Bundle
/// §4): every JWK with `"use": "x509-svid"` contributes the first value of its
/// `x5c`; entries of other uses, and entries without `x5c`, are ignored.
fn x509_authorities_from_jwks(
    td: &TrustDomain,
    data: &[u8],
) -> Result<Vec<CertificateDer<'static>>, BundleError> {
    let bad = |reason: String| BundleError::BadJwks {
        td: td.clone(),
        reason,
    };
    let doc: serde_json::Value = serde_json::from_slice(data).map_err(|e| bad(e.to_string()))?;
    // "keys: MUST be present" (§4.1.3); an empty array revokes every key.
    let keys = doc
        .get("keys")
        .and_then(|k| k.as_array())
        .ok_or_else(|| bad("no `keys` array".into()))?;
    let mut certs = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        if key.get("use").and_then(|u| u.as_str()) != Some("x509-svid") {
            continue;
        }
        // "kid: MUST NOT be set" for X.509-SVID keys (§4.2.2) is the
        // publisher's rule; consumers only need `x5c`.
        let Some(first) = key
            .get("x5c")
            .and_then(|x| x.as_array())
            .and_then(|a| a.first())
        else {
            continue;
        };
        let b64 = first
            .as_str()
            .ok_or_else(|| bad(format!("keys[{i}].x5c[0] is not a string")))?;
        let der = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| bad(format!("keys[{i}].x5c[0]: {e}")))?;
        certs.push(CertificateDer::from(der));
    }
    Ok(certs)
}

/// The bundles a sidecar trusts, one per trust domain.
#[derive(Debug, Clone, Default)]
pub struct BundleSet {
    bundles: HashMap<TrustDomain, TrustBundle>,
}

impl BundleSet {
    /// An empty set (trusts nobody).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces the bundle of a trust domain.
    pub fn insert(&mut self, bundle: TrustBundle) {
        self.bundles.insert(bundle.td.clone(), bundle);
    }

    /// The bundle of a trust domain, if trusted.
    pub fn get(&self, td: &TrustDomain) -> Option<&TrustBundle> {
        self.bundles.get(td)
    }

    /// All trust domains with a bundle.
    pub fn trust_domains(&self) -> impl Iterator<Item = &TrustDomain> {
        self.bundles.keys()
    }

    /// Number of bundles.
    pub fn len(&self) -> usize {
        self.bundles.len()
    }

    /// True when both sets hold the same certificates for the same trust domains.
    pub fn same_as(&self, other: &BundleSet) -> bool {
        self.bundles.len() == other.bundles.len()
            && self
                .bundles
                .iter()
                .all(|(td, b)| other.get(td).is_some_and(|o| o.certs == b.certs))
    }

    /// True when no bundle is present.
    pub fn is_empty(&self) -> bool {
        self.bundles.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::parse("example.org").unwrap()
    }

    proptest::proptest! {
        // The bundle parser reads operator files and Workload API data: it
        // may refuse anything, but never panics.
        #[test]
        fn parser_never_panics(data in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = TrustBundle::parse(td(), &data);
        }

        #[test]
        fn jwks_parser_never_panics(
            uses in proptest::collection::vec("(x509-svid|jwt-svid|[a-z]{0,5})", 0..4),
            x5c in "[A-Za-z0-9+/=]{0,64}",
        ) {
            let keys: Vec<String> = uses
                .iter()
                .map(|u| format!(r#"{{"kty":"EC","use":"{u}","x5c":["{x5c}"]}}"#))
                .collect();
            let doc = format!(r#"{{"keys":[{}]}}"#, keys.join(","));
            let _ = TrustBundle::parse(td(), doc.as_bytes());
        }
    }

    #[test]
    fn only_x509_svid_keys_count_and_only_their_first_x5c() {
        let doc = br#"{"keys":[{"kty":"EC","use":"jwt-svid","x5c":["AAAA"]}]}"#;
        // No X.509 authority left: not a usable bundle.
        assert!(matches!(
            TrustBundle::parse(td(), doc),
            Err(BundleError::Empty(_))
        ));
        let doc = br#"{"keys":[{"kty":"EC","use":"x509-svid","x5c":["not base64!"]}]}"#;
        assert!(matches!(
            TrustBundle::parse(td(), doc),
            Err(BundleError::BadJwks { .. })
        ));
    }
}
