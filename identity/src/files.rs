//! The file identity source: an SVID chain, its key and trust bundles read
//! from files (for example a Kubernetes Secret volume), and reloaded when
//! they change. Bundles are PEM certificates or SPIFFE bundles (JWK Sets).
//!
//! Change detection compares the *contents* of the files, read through any
//! symlinks, once per poll interval. That is what survives a Kubernetes
//! Secret update, which swaps the `..data` symlink atomically: the watched
//! paths never change, their targets do, so mtimes and inodes of the paths
//! themselves say nothing. The files are small, so reading them every second
//! costs less than an inotify watch on every directory in each chain.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::metrics::{self as m, SourceKind};
use crate::rotation::{Identity, Update};

use crate::bundle::{BundleError, BundleSet, TrustBundle};
use crate::id::TrustDomain;
use crate::svid::{Svid, SvidError};

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

fn bundle(td: TrustDomain, path: &Path, data: &[u8]) -> Result<TrustBundle, FileSourceError> {
    TrustBundle::parse(td, data).map_err(|source| FileSourceError::Bundle {
        path: path.to_owned(),
        source,
    })
}

/// Loads the SVID and bundles.
pub fn load(paths: &FilePaths) -> Result<(Svid, BundleSet), FileSourceError> {
    parse(paths, &Contents::read(paths)?)
}

/// The raw bytes of every file, in the order of [`FilePaths`].
#[derive(PartialEq, Eq)]
struct Contents {
    cert: Vec<u8>,
    key: Vec<u8>,
    bundle: Vec<u8>,
    federated: Vec<Vec<u8>>,
}

impl Contents {
    fn read(paths: &FilePaths) -> Result<Self, FileSourceError> {
        Ok(Contents {
            cert: read(&paths.cert)?,
            key: read(&paths.key)?,
            bundle: read(&paths.bundle)?,
            federated: paths
                .federated
                .iter()
                .map(|(_, p)| read(p))
                .collect::<Result<_, _>>()?,
        })
    }

    /// A digest, so that the key's bytes are not kept twice in memory.
    fn digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        for part in [&self.cert, &self.key, &self.bundle]
            .into_iter()
            .chain(&self.federated)
        {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
        h.finalize().into()
    }
}

fn parse(paths: &FilePaths, c: &Contents) -> Result<(Svid, BundleSet), FileSourceError> {
    let svid = Svid::from_pem(&c.cert, &c.key).map_err(|source| FileSourceError::Invalid {
        path: if matches!(source, SvidError::BadKey) {
            paths.key.clone()
        } else {
            paths.cert.clone()
        },
        source,
    })?;
    let mut set = BundleSet::new();
    set.insert(bundle(
        svid.id().trust_domain().clone(),
        &paths.bundle,
        &c.bundle,
    )?);
    for ((td, path), data) in paths.federated.iter().zip(&c.federated) {
        set.insert(bundle(td.clone(), path, data)?);
    }
    Ok((svid, set))
}

/// How often the file source looks for changes, unless configured.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// The file source as a worker: loads the files, then reloads them whenever
/// their contents change. A file that fails to load is logged and counted,
/// and the last good identity stays in service.
#[derive(Debug, Clone)]
pub struct FileSource {
    paths: FilePaths,
    interval: Duration,
}

impl FileSource {
    /// A source for `paths`, polled every `interval`.
    pub fn new(paths: FilePaths, interval: Duration) -> Self {
        FileSource { paths, interval }
    }

    /// Sends the identity whenever it changes; returns when `tx` closes.
    pub async fn run(self, tx: mpsc::Sender<Update>) {
        let mut seen: Option<[u8; 32]> = None;
        let mut ok = false;
        loop {
            match Contents::read(&self.paths) {
                Ok(c) => {
                    let digest = c.digest();
                    if seen != Some(digest) {
                        seen = Some(digest);
                        match parse(&self.paths, &c) {
                            Ok((svid, bundles)) => {
                                tracing::info!(spiffe.id = %svid.id(), "identity files loaded");
                                ok = true;
                                let update = Update::Identity(Box::new(Identity { svid, bundles }));
                                if tx.send(update).await.is_err() {
                                    return;
                                }
                            }
                            Err(e) => {
                                ok = false;
                                tracing::warn!(error = %e, "identity files invalid; keeping the last good identity");
                                m::source_error(SourceKind::Files);
                            }
                        }
                    }
                }
                Err(e) => {
                    // A missing file mid-update is common (Secret swaps); only
                    // count it, and try again next poll.
                    if seen.take().is_some() || ok {
                        tracing::warn!(error = %e, "identity files unreadable; keeping the last good identity");
                    }
                    ok = false;
                    m::source_error(SourceKind::Files);
                }
            }
            m::source_connected(SourceKind::Files, ok);
            tokio::select! {
                () = tokio::time::sleep(self.interval) => {}
                () = tx.closed() => return,
            }
        }
    }
}
