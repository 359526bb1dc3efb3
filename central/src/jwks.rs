//! Fetches the JWKS of RequestAuthentication rules (`jwksUri: http://...`)
//! off the request path: at start, then every `interval`, into the
//! [`JwksCache`] the JWT check reads. A failed fetch or a document without
//! usable keys keeps the last good set (logged); a request whose issuer has
//! no keys yet is refused with 401 (fail closed).

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

/// Fetches `uri` once into `cache`; the error says why the last good set
/// (if any) stays in force.
pub async fn refresh_once(uri: &str, cache: &JwksCache) -> Result<(), String> {
    let req = http::Request::get(uri)
        .body(Bytes::new())
        .map_err(|e| e.to_string())?;
    let resp = http_fetch::send(req, None, FETCH_TIMEOUT, MAX_JWKS_BYTES)
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
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for uri in uris {
            let cache = cache.clone();
            tokio::spawn(async move {
                loop {
                    let wait = match refresh_once(&uri, &cache).await {
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
