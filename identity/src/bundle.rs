//! Trust bundles: the CA certificates of one trust domain, and the set of
//! bundles a sidecar trusts. Bundles of different trust domains are never
//! merged ("MUST NOT merge bundles of different trust domains", SPIFFE
//! Federation §4): a peer is verified only against its own domain's bundle.

use std::collections::HashMap;
use std::sync::Arc;

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

    /// True when no bundle is present.
    pub fn is_empty(&self) -> bool {
        self.bundles.is_empty()
    }
}
