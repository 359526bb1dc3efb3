//! The file identity source: an SVID chain, its key and trust bundles read
//! from PEM files (for example a Kubernetes Secret volume).

use std::path::{Path, PathBuf};

use crate::bundle::{BundleError, BundleSet, TrustBundle};
use crate::id::TrustDomain;
use crate::svid::{Svid, SvidError, parse_certs_pem};

/// Why the file source could not load.
#[derive(Debug, thiserror::Error)]
pub enum FileSourceError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file's contents are not a valid SVID, key or bundle.
    #[error("{path}: {source}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: SvidError,
    },
    /// A bundle is unusable.
    #[error("{path}: {source}")]
    Bundle {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: BundleError,
    },
}

/// Paths of a file-based identity.
#[derive(Debug, Clone)]
pub struct FilePaths {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM CA certificates of the SVID's own trust domain.
    pub bundle: PathBuf,
    /// Bundles of federated trust domains.
    pub federated: Vec<(TrustDomain, PathBuf)>,
}

fn read(path: &Path) -> Result<Vec<u8>, FileSourceError> {
    std::fs::read(path).map_err(|source| FileSourceError::Read {
        path: path.to_owned(),
        source,
    })
}

fn bundle(td: TrustDomain, path: &Path) -> Result<TrustBundle, FileSourceError> {
    let certs = parse_certs_pem(&read(path)?).map_err(|source| FileSourceError::Invalid {
        path: path.to_owned(),
        source,
    })?;
    TrustBundle::new(td, certs).map_err(|source| FileSourceError::Bundle {
        path: path.to_owned(),
        source,
    })
}

/// Loads the SVID and bundles.
pub fn load(paths: &FilePaths) -> Result<(Svid, BundleSet), FileSourceError> {
    let cert = read(&paths.cert)?;
    let key = read(&paths.key)?;
    let svid = Svid::from_pem(&cert, &key).map_err(|source| FileSourceError::Invalid {
        path: if matches!(source, SvidError::BadKey) {
            paths.key.clone()
        } else {
            paths.cert.clone()
        },
        source,
    })?;
    let mut set = BundleSet::new();
    set.insert(bundle(svid.id().trust_domain().clone(), &paths.bundle)?);
    for (td, path) in &paths.federated {
        set.insert(bundle(td.clone(), path)?);
    }
    Ok((svid, set))
}
