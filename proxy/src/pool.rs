//! Outbound HTTP: serves an app's HTTP/1.1 connection (after `detect`) and
//! carries its requests over HTTP/2 to the peer sidecar, on one pooled mTLS
//! connection per (destination, expected server identity) shared by every
//! app connection. The peer sidecar turns them back into HTTP/1.1 for its
//! app (`ORIG_PROTO`).
//!
//! The pool is hyper-util's client: HTTP/2 only, keep-alive pings, idle
//! connections closed after `limits.http_pool_idle_timeout`. Its connector
//! dials and originates mTLS with the identity store's current
//! configuration; nothing is built per connection.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::uri::{Authority, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::config::{Direction, Limits};
use crate::drain::Watch;
use crate::http::{ProxyBody, strip_hop_by_hop};
use crate::server::Shared;
use crate::tls::ClientTls;
use crate::{forward, metrics, tls};

/// Set by the outbound sidecar on requests that were HTTP/1.1 at the app,
/// so the inbound sidecar sends them to its app as HTTP/1.1 again.
pub const ORIG_PROTO: HeaderName = HeaderName::from_static("rampart-orig-proto");

/// The h2 pools, one per client configuration index (expected identity),
/// keyed inside by destination.
pub struct OutboundHttp {
    server: auto::Builder<TokioExecutor>,
    clients: Vec<Client<MeshConnector, Incoming>>,
}

impl std::fmt::Debug for OutboundHttp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboundHttp").finish_non_exhaustive()
    }
}

impl OutboundHttp {
    /// Pools for `client_configs` client configurations; the connectors
    /// read the identity from `identity`.
    pub fn new(
        limits: &Limits,
        client_configs: usize,
        identity: tokio::sync::watch::Receiver<Option<Arc<rampart_identity::store::TlsConfigs>>>,
    ) -> Self {
        let l = &limits.http;
        let mut server = auto::Builder::new(TokioExecutor::new());
        server
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(l.header_read_timeout)
            .max_buf_size(l.max_header_bytes.max(8192))
            .max_headers(l.max_headers);
        let server = server.http1_only();
        let clients = (0..client_configs)
            .map(|index| {
                Client::builder(TokioExecutor::new())
                    .pool_timer(TokioTimer::new())
                    .timer(TokioTimer::new())
                    .pool_idle_timeout(l.pool_idle_timeout)
                    .http2_only(true)
                    .http2_keep_alive_interval(Duration::from_secs(30))
                    .http2_keep_alive_timeout(Duration::from_secs(10))
                    .http2_max_concurrent_reset_streams(l.max_concurrent_streams as usize)
                    .build(MeshConnector {
                        index,
                        identity: identity.clone(),
                        connect_timeout: limits.connect_timeout,
                        handshake_timeout: limits.handshake_timeout,
                    })
            })
            .collect();
        OutboundHttp { server, clients }
    }
}

/// Serves an app's HTTP/1.1 connection to `dst`, whose server must match
/// client configuration `index`.
pub async fn serve(
    stream: tokio::net::TcpStream,
    dst: SocketAddr,
    index: usize,
    shared: Arc<Shared>,
    mut watch: Watch,
) {
    let Ok(authority) = Authority::try_from(dst.to_string()) else {
        // Invariant: a socket address is a valid authority.
        return;
    };
    let s = shared.clone();
    let service = hyper::service::service_fn(move |req| {
        let s = s.clone();
        let authority = authority.clone();
        async move { Ok::<_, Infallible>(send(&s, index, authority, req).await) }
    });
    let conn = shared.outbound_http.server.serve_connection(
        TokioIo::new(crate::smuggling::SmugglingGuard::new(
            stream,
            shared.config.limits.http.max_header_bytes,
        )),
        service,
    );
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = watch.signaled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "app http connection ended with an error");
    }
}

async fn send(
    shared: &Shared,
    index: usize,
    authority: Authority,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let start = Instant::now();
    let resp = match forward(shared, index, authority, req).await {
        Ok(r) => r,
        Err(status) => {
            let mut r = Response::new(Either::Right(Full::new(Bytes::from_static(
                b"rampart: upstream sidecar unreachable\n",
            ))));
            *r.status_mut() = status;
            r
        }
    };
    metrics::http_request(Direction::Outbound, resp.status(), start.elapsed());
    resp
}

async fn forward(
    shared: &Shared,
    index: usize,
    authority: Authority,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, StatusCode> {
    let Some(client) = shared.outbound_http.clients.get(index) else {
        tracing::error!(index, "no pool for this client configuration");
        return Err(StatusCode::INTERNAL_SERVER_ERROR);
    };
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts
        .headers
        .insert(ORIG_PROTO, HeaderValue::from_static("HTTP/1.1"));
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(Scheme::HTTP);
    uri.authority = Some(authority);
    uri.path_and_query = parts.uri.path_and_query().cloned();
    parts.uri = Uri::from_parts(uri).map_err(|_| StatusCode::BAD_REQUEST)?;
    parts.version = Version::HTTP_2;
    let timeout = shared.config.limits.http.response_timeout;
    let sent = client.request(Request::from_parts(parts, body));
    let resp = match tokio::time::timeout(timeout, sent).await {
        Err(_) => return Err(StatusCode::GATEWAY_TIMEOUT),
        Ok(Err(e)) if is_no_identity(&e) => {
            tracing::info!("request refused: no identity");
            metrics::http_local_error(Direction::Outbound, "no_identity");
            return Err(StatusCode::SERVICE_UNAVAILABLE);
        }
        Ok(Err(e)) => {
            tracing::info!(error = %e, "request to peer sidecar failed");
            metrics::http_local_error(Direction::Outbound, "peer_unreachable");
            return Err(StatusCode::BAD_GATEWAY);
        }
        Ok(Ok(r)) => r,
    };
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.version = Version::HTTP_11;
    Ok(Response::from_parts(parts, Either::Left(body)))
}

/// Whether the pool failed because the sidecar has no identity (503, not 502).
fn is_no_identity(e: &hyper_util::client::legacy::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(PoolConnectError::NoIdentity) = s.downcast_ref::<PoolConnectError>() {
            return true;
        }
        source = s.source();
    }
    false
}

/// Dials a peer sidecar and originates mTLS for the pool.
#[derive(Clone)]
pub struct MeshConnector {
    index: usize,
    identity: tokio::sync::watch::Receiver<Option<Arc<rampart_identity::store::TlsConfigs>>>,
    connect_timeout: Duration,
    handshake_timeout: Duration,
}

/// Why the pool could not open a connection.
#[derive(Debug, thiserror::Error)]
pub enum PoolConnectError {
    /// The sidecar has no identity (yet, or any more).
    #[error("no identity")]
    NoIdentity,
    /// The pool key was not a socket address (a bug).
    #[error("pool destination {0} is not an address")]
    BadDestination(String),
    /// The peer could not be reached.
    #[error(transparent)]
    Connect(#[from] forward::ConnectError),
    /// The handshake failed (the peer's identity is not the expected one, ...).
    #[error(transparent)]
    Handshake(#[from] tls::HandshakeError),
}

impl tower_service::Service<Uri> for MeshConnector {
    type Response = TokioIo<MeshStream>;
    type Error = PoolConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let authority = uri.authority().map(Authority::as_str).unwrap_or("");
            let dst: SocketAddr = authority
                .parse()
                .map_err(|_| PoolConnectError::BadDestination(authority.to_owned()))?;
            let cfg = {
                let current = this.identity.borrow();
                let configs = current.as_ref().ok_or(PoolConnectError::NoIdentity)?;
                configs
                    .client
                    .get(this.index)
                    .cloned()
                    .ok_or(PoolConnectError::NoIdentity)?
            };
            let tcp = forward::connect(dst, this.connect_timeout).await?;
            let (tls, peer) = tls::originate(tcp, dst, cfg, this.handshake_timeout)
                .await
                .inspect_err(|e| metrics::handshake(Direction::Outbound, e.label()))?;
            metrics::handshake(Direction::Outbound, "ok");
            tracing::debug!(dst.addr = %dst, peer.id = %peer.principal(), "pooled connection opened");
            Ok(TokioIo::new(MeshStream(tls)))
        })
    }
}

/// A pooled mTLS stream.
pub struct MeshStream(ClientTls);

impl Connection for MeshStream {
    fn connected(&self) -> Connected {
        Connected::new().negotiated_h2()
    }
}

impl AsyncRead for MeshStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for MeshStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}
