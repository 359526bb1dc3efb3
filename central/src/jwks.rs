//! Fetches the JWKS of RequestAuthentication rules (`jwksUri: http://...`
//! or `https://...`, the server verified against the configured CA
//! certificates, by default the system's) off the request path: at start, then every `interval`, into the
//! [`JwksCache`] the JWT check reads. A failed fetch or a document without
//! usable keys keeps the last good set (logged); a request whose issuer has
//! no keys yet is refused with 401 (fail closed).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rampart_authz::jwt::{Jwks, JwksCache};

use crate::http_fetch;

/// Istio's default JWKS refresh interval (pilot `PILOT_JWT_PUB_KEY_REFRESH_INTERVAL`).
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(20 * 60);
/// Time limit of one fetch.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest JWKS document accepted.
pub const MAX_JWKS_BYTES: usize = 1 << 20;

/// Where the CA certificates for `https://` JWKS servers are read from when
/// none are configured: the system bundle (Debian, Ubuntu, Alpine,
/// distroless).
pub const SYSTEM_CA_FILE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The TLS client for `https://` JWKS servers: server certificates are
/// verified (WebPKI, host name) against the CA certificates in `ca_file`
/// (PEM, every `CERTIFICATE` block); no client certificate is sent. A file
/// without a usable certificate is an error (the configuration is at fault).
pub fn https_client(ca_file: &Path) -> Result<http_fetch::ClientTlsProvider, String> {
    use rustls_pki_types::pem::PemObject as _;
    let at = |e: &dyn std::fmt::Display| format!("{}: {e}", ca_file.display());
    let pem = std::fs::read(ca_file).map_err(|e| at(&e))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| at(&e))?;
        // A certificate webpki cannot use as an anchor is skipped, as the
        // system bundles carry a few.
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(at(&"no CA certificate in the file"));
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| at(&e))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let config = Arc::new(config);
    Ok(Arc::new(move || Some(config.clone())))
}

/// Fetches `uri` once into `cache`; the error says why the last good set
/// (if any) stays in force. `tls` serves `https://` URIs.
pub async fn refresh_once(
    uri: &str,
    cache: &JwksCache,
    tls: Option<&http_fetch::ClientTlsProvider>,
) -> Result<(), String> {
    let req = http::Request::get(uri)
        .body(Bytes::new())
        .map_err(|e| e.to_string())?;
    let resp = http_fetch::send(req, tls, FETCH_TIMEOUT, MAX_JWKS_BYTES)
        .await
        .map_err(|e| e.to_string())?;
    if !resp.status.is_success() {
        return Err(format!("status {}", resp.status));
    }
    let text = std::str::from_utf8(&resp.body).map_err(|_| "body is not UTF-8".to_owned())?;
    cache.store(uri, Jwks::parse(text)?);
    Ok(())
}

/// Refreshes every URI in `uris` now and then every `interval`. Until the
/// first success of a URI, it is retried every second.
pub fn spawn(
    uris: Vec<String>,
    cache: Arc<JwksCache>,
    interval: Duration,
    tls: Option<http_fetch::ClientTlsProvider>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for uri in uris {
            let cache = cache.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                loop {
                    let wait = match refresh_once(&uri, &cache, tls.as_ref()).await {
                        Ok(()) => {
                            tracing::info!(jwks.uri = %uri, "JWKS fetched");
                            interval
                        }
                        Err(e) => {
                            let have = cache.get(&uri).is_some();
                            tracing::warn!(jwks.uri = %uri, error = %e, last_good_kept = have, "JWKS fetch failed");
                            if have {
                                interval
                            } else {
                                Duration::from_secs(1)
                            }
                        }
                    };
                    tokio::time::sleep(wait).await;
                }
            });
        }
    })
}
