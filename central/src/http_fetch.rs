//! A small HTTP/1.1 client for the bundle server and the decision-log
//! collector: one request per connection (both are infrequent), plain TCP
//! for `http`, rustls for `https` with the client configuration the caller
//! provides (the sidecar's SVID, for mTLS to a mesh-internal server).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::rt::TokioIo;

/// Supplies the TLS client configuration for `https` URLs, called once per
/// connection so that rotated SVIDs are picked up; `None` when no
/// configuration is ready yet (the request then fails and is retried).
pub type ClientTlsProvider = Arc<dyn Fn() -> Option<Arc<rustls::ClientConfig>> + Send + Sync>;

/// Why a request failed. The server, the network or the configuration is
/// at fault; each case names which.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The URL is not `http` or `https` with a host (configuration).
    #[error("unsupported URL {0:?}: expected http:// or https:// with a host")]
    BadUrl(String),
    /// An `https` URL and no TLS configuration (configuration or not ready).
    #[error("no TLS client configuration is available for an https URL")]
    NoTlsConfig,
    /// Connecting, the TLS handshake or the exchange failed (network, server).
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The HTTP exchange failed (server).
    #[error("HTTP: {0}")]
    Http(String),
    /// The response body is larger than allowed (server).
    #[error("response body exceeds {0} bytes")]
    TooLarge(usize),
    /// No complete answer in time.
    #[error("timed out")]
    Timeout,
}

/// A response: status, headers, body.
#[derive(Debug)]
pub struct Response {
    /// Status.
    pub status: http::StatusCode,
    /// Headers.
    pub headers: http::HeaderMap,
    /// Body, complete.
    pub body: Bytes,
}

/// Sends `req` (whose URI is absolute) and reads the whole response, within
/// `timeout` and `max_body` bytes.
pub async fn send(
    req: http::Request<Bytes>,
    tls: Option<&ClientTlsProvider>,
    timeout: Duration,
    max_body: usize,
) -> Result<Response, FetchError> {
    match tokio::time::timeout(timeout, send_inner(req, tls, max_body)).await {
        Ok(r) => r,
        Err(_) => Err(FetchError::Timeout),
    }
}

async fn send_inner(
    mut req: http::Request<Bytes>,
    tls: Option<&ClientTlsProvider>,
    max_body: usize,
) -> Result<Response, FetchError> {
    let uri = req.uri().clone();
    let bad = || FetchError::BadUrl(uri.to_string());
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        Some(_) | None => return Err(bad()),
    };
    let host = uri.host().ok_or_else(bad)?.to_owned();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let authority = uri.authority().ok_or_else(bad)?.as_str().to_owned();
    let path = uri
        .path_and_query()
        .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
    *req.uri_mut() = path.parse().map_err(|_| bad())?;
    let host_value = http::HeaderValue::from_str(&authority).map_err(|_| bad())?;
    req.headers_mut().insert(http::header::HOST, host_value);
    let bare_host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let tcp = tokio::net::TcpStream::connect((bare_host.as_str(), port)).await?;
    tcp.set_nodelay(true)?;
    if https {
        let config = tls.and_then(|p| p()).ok_or(FetchError::NoTlsConfig)?;
        let name = rustls_pki_types::ServerName::try_from(bare_host).map_err(|_| bad())?;
        let stream = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await?;
        exchange(TokioIo::new(stream), req, max_body).await
    } else {
        exchange(TokioIo::new(tcp), req, max_body).await
    }
}

async fn exchange<T>(
    io: T,
    req: http::Request<Bytes>,
    max_body: usize,
) -> Result<Response, FetchError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let http_err = |e: hyper::Error| FetchError::Http(e.to_string());
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(http_err)?;
    // The connection task ends when the exchange does (one request).
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::trace!(error = %e, "central connection ended");
        }
    });
    let (parts, body) = req.into_parts();
    let resp = sender
        .send_request(http::Request::from_parts(parts, Full::new(body)))
        .await
        .map_err(http_err)?;
    let (parts, body) = resp.into_parts();
    let body = Limited::new(body, max_body)
        .collect()
        .await
        .map_err(|e| match e.downcast::<http_body_util::LengthLimitError>() {
            Ok(_) => FetchError::TooLarge(max_body),
            Err(e) => FetchError::Http(e.to_string()),
        })?
        .to_bytes();
    Ok(Response {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}
