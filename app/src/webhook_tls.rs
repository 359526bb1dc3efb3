//! The webhook's serving certificate, reloaded when its files change.
//!
//! cert-manager (or any rotation) rewrites the Secret that the webhook's pod
//! mounts; the kubelet swaps the mounted files atomically (a symlink flip).
//! A certificate read once at start would expire under the running server,
//! and every pod creation would then fail (`failurePolicy: Fail`). So the
//! server's rustls configuration resolves its certificate through
//! [`ReloadingCert`], whose [`ReloadingCert::watch`] task re-reads both
//! files every interval and swaps in the new pair once it parses and the key
//! matches the certificate. A half-written or mismatched pair (the two files
//! are not replaced at the same instant) keeps the previous certificate and
//! is retried at the next tick; connections already open keep theirs.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// Why a certificate and key could not be used. The files are at fault.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The certificate file holds no PEM certificate.
    #[error("{0}: no PEM certificate")]
    NoCertificate(PathBuf),
    /// The key file holds no PEM private key.
    #[error("{0}: no PEM private key")]
    NoKey(PathBuf),
    /// The key is unusable or is not the certificate's.
    #[error("{cert} and {key}: {reason}")]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What rustls said.
        reason: String,
    },
}

/// The files of the serving certificate.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key of the leaf.
    pub key: PathBuf,
}

/// A rustls certificate resolver that always answers with the newest good
/// certificate read from [`CertFiles`].
#[derive(Debug)]
pub struct ReloadingCert {
    files: CertFiles,
    current: ArcSwap<CertifiedKey>,
    /// The bytes the current certificate was made from, to notice changes.
    loaded: Mutex<(Vec<u8>, Vec<u8>)>,
}

impl ReloadingCert {
    /// Reads the files; fails when they do not make a usable certificate.
    pub fn load(files: CertFiles) -> Result<ReloadingCert, CertError> {
        let (cert_pem, key_pem) = read_pair(&files)?;
        let key = certified_key(&files, &cert_pem, &key_pem)?;
        Ok(ReloadingCert {
            files,
            current: ArcSwap::from_pointee(key),
            loaded: Mutex::new((cert_pem, key_pem)),
        })
    }

    /// Re-reads the files; swaps the certificate when they changed and make
    /// a good pair. Returns whether it swapped.
    pub fn reload(&self) -> Result<bool, CertError> {
        let (cert_pem, key_pem) = read_pair(&self.files)?;
        // A poisoned lock only means a panic while comparing bytes.
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if loaded.0 == cert_pem && loaded.1 == key_pem {
            return Ok(false);
        }
        let key = certified_key(&self.files, &cert_pem, &key_pem)?;
        self.current.store(Arc::new(key));
        *loaded = (cert_pem, key_pem);
        Ok(true)
    }

    /// Checks the files every `interval`, forever.
    pub async fn watch(self: Arc<Self>, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tick.tick().await;
            match self.reload() {
                Ok(true) => {
                    failing = false;
                    tracing::info!(
                        tls.cert = %self.files.cert.display(),
                        "serving certificate reloaded"
                    );
                }
                Ok(false) => failing = false,
                // Once per failing streak: a rotation in progress shows a
                // mismatched pair for a moment; a broken Secret needs an operator.
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "serving certificate not reloaded; the previous one stays");
                }
                Err(_) => {}
            }
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn read_pair(files: &CertFiles) -> Result<(Vec<u8>, Vec<u8>), CertError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| CertError::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    Ok((read(&files.cert)?, read(&files.key)?))
}

fn certified_key(
    files: &CertFiles,
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<CertifiedKey, CertError> {
    let certs = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| CertError::NoCertificate(files.cert.clone()))?;
    if certs.is_empty() {
        return Err(CertError::NoCertificate(files.cert.clone()));
    }
    let key = rustls_pemfile::private_key(&mut &key_pem[..])
        .ok()
        .flatten()
        .ok_or_else(|| CertError::NoKey(files.key.clone()))?;
    let provider = rustls::crypto::ring::default_provider();
    let key = CertifiedKey::from_der(certs, key, &provider).map_err(|e| CertError::Mismatch {
        cert: files.cert.clone(),
        key: files.key.clone(),
        reason: e.to_string(),
    })?;
    // `from_der` lets an unknown consistency pass; the webhook wants to know.
    key.keys_match().map_err(|e| CertError::Mismatch {
        cert: files.cert.clone(),
        key: files.key.clone(),
        reason: e.to_string(),
    })?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(name: &str) -> (String, String) {
        let key = rcgen_key();
        let params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn rcgen_key() -> rcgen::KeyPair {
        rcgen::KeyPair::generate().unwrap()
    }

    #[test]
    fn a_new_pair_is_swapped_in_and_a_bad_one_keeps_the_old() {
        let dir = tempfile::tempdir().unwrap();
        let files = CertFiles {
            cert: dir.path().join("tls.crt"),
            key: dir.path().join("tls.key"),
        };
        let (c1, k1) = pair("one.example");
        std::fs::write(&files.cert, &c1).unwrap();
        std::fs::write(&files.key, &k1).unwrap();
        let reloading = ReloadingCert::load(files.clone()).unwrap();
        let first = reloading.current.load_full();
        assert!(!reloading.reload().unwrap(), "unchanged files: no swap");

        // Mid-rotation: the new certificate with the old key.
        let (c2, k2) = pair("two.example");
        std::fs::write(&files.cert, &c2).unwrap();
        let err = reloading.reload().unwrap_err();
        assert!(matches!(err, CertError::Mismatch { .. }), "{err}");
        assert!(Arc::ptr_eq(&first, &reloading.current.load_full()));

        std::fs::write(&files.key, &k2).unwrap();
        assert!(reloading.reload().unwrap());
        assert_ne!(first.cert, reloading.current.load_full().cert);

        std::fs::write(&files.key, "not a key").unwrap();
        assert!(matches!(reloading.reload(), Err(CertError::NoKey(_))));
    }
}
