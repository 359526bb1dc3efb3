//! Outbound HTTP: serves an app's HTTP/1.1 connection (after `detect`) and
//! carries its requests over HTTP/2 to the peer sidecar, on one pooled mTLS
//! connection per (destination, expected server identity) shared by every
//! app connection. The peer sidecar turns them back into HTTP/1.1 for its
//! app (`ORIG_PROTO`).
//!
//! The pool is hyper-util's client: HTTP/2 only, keep-alive pings, idle
//! connections closed after `limits.http_pool_idle_timeout`, at most
//! `limits.http_pool_max_connections` of them over all destinations. Its
//! connector dials and originates mTLS with the identity store's current
//! configuration; nothing is built per connection. `Upgrade` and `CONNECT`
//! requests do not use the pool: each gets its own HTTP/1.1 connection over
//! mTLS (see `tunnel` for why).

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
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::body::{RequestBody, Waited, response_within};
use crate::config::{Direction, Limits};
use crate::drain::{Watch, serve_gracefully};
use crate::http::{ProxyBody, strip_hop_by_hop};
use crate::server::Shared;
use crate::tls::ClientTls;
use crate::tunnel::{Tunnel, TunnelTask};
use crate::{forward, metrics, tls};

/// Set by the outbound sidecar on requests that were HTTP/1.1 at the app,
/// so the inbound sidecar sends them to its app as HTTP/1.1 again.
pub const ORIG_PROTO: HeaderName = HeaderName::from_static("rampart-orig-proto");

/// The h2 pools, one per client configuration index (expected identity),
/// keyed inside by destination.
pub struct OutboundHttp {
    server: hyper::server::conn::http1::Builder,
    clients: Vec<Client<MeshConnector, RequestBody>>,
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
        let mut server = hyper::server::conn::http1::Builder::new();
        server
            .timer(TokioTimer::new())
            .header_read_timeout(l.header_read_timeout)
            .max_buf_size(l.max_header_bytes.max(8192))
            .max_headers(l.max_headers);
        // One cap over every pool: a connection holds a permit until it closes.
        let slots = Arc::new(Semaphore::new(l.pool_max_connections));
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
                        slots: slots.clone(),
                        max_pooled: l.pool_max_connections,
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
    let app = Arc::new(AppConn {
        shared: shared.clone(),
        metrics: metrics::RequestMetrics::for_peer(Direction::Outbound, None),
        ends: Ends {
            source: stream.peer_addr().unwrap_or(dst),
            destination: dst,
        },
        index,
        authority,
        tunnel: TunnelTask::default(),
    });
    let a = app.clone();
    let service = hyper::service::service_fn(move |req| {
        let a = a.clone();
        async move { Ok::<_, Infallible>(send(&a, req).await) }
    });
    let conn = shared
        .outbound_http
        .server
        .serve_connection(
            TokioIo::new(crate::smuggling::SmugglingGuard::new(
                stream,
                shared.config.limits.http.max_header_bytes,
            )),
            service,
        )
        .with_upgrades();
    let result = serve_gracefully!(conn, watch, std::future::pending::<()>());
    if let Err(e) = result {
        tracing::debug!(error = %e, "app http connection ended with an error");
    }
    // A connection that became a tunnel keeps its listener slot (and the
    // drain waiting) until the tunnel closes.
    app.tunnel.finished().await;
}

/// The app's address and where it was going, for access events.
#[derive(Debug, Clone, Copy)]
struct Ends {
    source: SocketAddr,
    destination: SocketAddr,
}

/// One app connection to a meshed destination.
struct AppConn {
    shared: Arc<Shared>,
    metrics: Arc<metrics::RequestMetrics>,
    ends: Ends,
    /// The client configuration (expected server identity).
    index: usize,
    authority: Authority,
    tunnel: TunnelTask,
}

async fn send(app: &AppConn, req: Request<Incoming>) -> Response<ProxyBody> {
    let start = Instant::now();
    let shared = &*app.shared;
    // Only built when access logs are on: the request path allocates
    // nothing for them otherwise.
    let logged = shared.access.is_enabled().then(|| {
        (
            req.method().clone(),
            req.uri().path().to_owned(),
            crate::http::content_length(req.headers()),
            crate::access::pick_headers(&shared.config.observe.access_headers, req.headers()),
        )
    });
    let span = tracing::debug_span!(
        "request",
        direction = "outbound",
        http.method = %req.method(),
        http.path = req.uri().path(),
    );
    let may_switch = crate::tunnel::may_switch(req.method(), req.version(), req.headers());
    let connect = req.method() == http::Method::CONNECT;
    let result = match Tunnel::of(req.method(), req.version(), req.headers()) {
        None => {
            let sent = forward(shared, app.index, app.authority.clone(), req);
            tracing::Instrument::instrument(sent, span).await
        }
        Some(t) => tracing::Instrument::instrument(tunnel(app, req, t), span).await,
    };
    let mut resp = match result {
        Ok(r) => r,
        Err(status) => {
            let mut r = Response::new(Either::Right(Full::new(Bytes::from_static(match status {
                StatusCode::SERVICE_UNAVAILABLE => b"rampart: no upstream connection available\n",
                StatusCode::REQUEST_TIMEOUT => b"rampart: request body stalled\n",
                _ => b"rampart: upstream sidecar unreachable\n",
            }))));
            *r.status_mut() = status;
            r
        }
    };
    if may_switch {
        crate::tunnel::close_unless_switched(connect, &mut resp);
    }
    let elapsed = start.elapsed();
    app.metrics.record(resp.status(), elapsed);
    if let Some((method, path, bytes_in, headers)) = logged {
        shared.access.record(&crate::access::Event {
            direction: Direction::Outbound,
            peer: None,
            source: app.ends.source,
            destination: app.ends.destination,
            method: Some(method.as_str()),
            path: Some(&path),
            status: Some(resp.status().as_u16()),
            verdict: crate::access::Verdict::NotApplicable,
            duration: elapsed,
            bytes_in,
            bytes_out: crate::http::content_length(resp.headers()),
            headers: &headers,
        });
    }
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
    // A pooled connection outlives the identity it was made with: without
    // one now, send nothing on it (fail closed).
    if shared.identity().is_none() {
        tracing::info!("request refused: no identity");
        metrics::http_local_error(Direction::Outbound, "no_identity");
        return Err(StatusCode::SERVICE_UNAVAILABLE);
    }
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
    let (body, ended) = RequestBody::new(body);
    let sent = client.request(Request::from_parts(parts, body));
    let resp = match response_within(timeout, ended, sent).await {
        Err(Waited::NoResponse) => return Err(StatusCode::GATEWAY_TIMEOUT),
        Err(Waited::UploadStalled) => {
            metrics::http_local_error(Direction::Outbound, "upload_stalled");
            return Err(StatusCode::REQUEST_TIMEOUT);
        }
        Ok(Err(e)) => match pool_failure(&e) {
            Some(PoolConnectError::NoIdentity) => {
                tracing::info!("request refused: no identity");
                metrics::http_local_error(Direction::Outbound, "no_identity");
                return Err(StatusCode::SERVICE_UNAVAILABLE);
            }
            Some(PoolConnectError::PoolFull(max)) => {
                tracing::warn!(
                    limit = max,
                    "request refused: pooled connection limit reached (limits.http_pool_max_connections)"
                );
                metrics::http_local_error(Direction::Outbound, "pool_full");
                return Err(StatusCode::SERVICE_UNAVAILABLE);
            }
            _ => {
                tracing::info!(error = %e, "request to peer sidecar failed");
                metrics::http_local_error(Direction::Outbound, "peer_unreachable");
                return Err(StatusCode::BAD_GATEWAY);
            }
        },
        Ok(Ok(r)) => r,
    };
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.version = Version::HTTP_11;
    Ok(Response::from_parts(parts, Either::Left(body)))
}

/// Carries a tunnel request (upgrade or CONNECT) to the peer sidecar on a
/// dedicated HTTP/1.1 connection over mTLS, verified like any other.
async fn tunnel(
    app: &AppConn,
    req: Request<Incoming>,
    tunnel: Tunnel,
) -> Result<Response<ProxyBody>, StatusCode> {
    let shared = &*app.shared;
    let limits = &shared.config.limits;
    let Some(cfg) = shared
        .identity()
        .and_then(|c| c.client.get(app.index).cloned())
    else {
        tracing::info!("tunnel refused: no identity");
        metrics::http_local_error(Direction::Outbound, "no_identity");
        return Err(StatusCode::SERVICE_UNAVAILABLE);
    };
    let (mut parts, body) = req.into_parts();
    let Some(downstream) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() else {
        tracing::error!("no upgrade handle on a tunnel request");
        return Err(StatusCode::INTERNAL_SERVER_ERROR);
    };
    tunnel.prepare_request(&mut parts.headers);
    let peer_failed = |e: &dyn std::fmt::Display, label| {
        tracing::info!(error = %e, tunnel = tunnel.label(), "tunnel to peer sidecar failed");
        metrics::http_local_error(Direction::Outbound, label);
        StatusCode::BAD_GATEWAY
    };
    let tcp = forward::connect(app.ends.destination, limits.connect_timeout)
        .await
        .map_err(|e| peer_failed(&e, "peer_unreachable"))?;
    let (tls, peer) = tls::originate(tcp, app.ends.destination, cfg, limits.handshake_timeout)
        .await
        .inspect_err(|e| metrics::handshake(Direction::Outbound, e.label()))
        .map_err(|e| peer_failed(&e, "peer_unreachable"))?;
    metrics::handshake(Direction::Outbound, "ok");
    tracing::debug!(peer.id = %peer.principal(), tunnel = tunnel.label(), "tunnel connection opened");
    let opened = crate::tunnel::open(
        tls,
        Request::from_parts(parts, body),
        &tunnel,
        downstream,
        limits.http.response_timeout,
        Direction::Outbound,
    )
    .await;
    match opened {
        Ok((resp, task)) => {
            if let Some(task) = task {
                app.tunnel.set(task);
            }
            Ok(resp)
        }
        Err(crate::tunnel::TunnelError::Timeout) => Err(StatusCode::GATEWAY_TIMEOUT),
        Err(e) => Err(peer_failed(&e, "peer_unreachable")),
    }
}

/// The connector's error behind a pool failure, if it was one (no
/// identity or pool full: 503, not 502).
fn pool_failure(e: &hyper_util::client::legacy::Error) -> Option<&PoolConnectError> {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(p) = s.downcast_ref::<PoolConnectError>() {
            return Some(p);
        }
        source = s.source();
    }
    None
}

/// Dials a peer sidecar and originates mTLS for the pool.
#[derive(Clone)]
pub struct MeshConnector {
    index: usize,
    identity: tokio::sync::watch::Receiver<Option<Arc<rampart_identity::store::TlsConfigs>>>,
    connect_timeout: Duration,
    handshake_timeout: Duration,
    /// `limits.http_pool_max_connections` permits, shared by every pool.
    slots: Arc<Semaphore>,
    max_pooled: usize,
}

/// Why the pool could not open a connection.
#[derive(Debug, thiserror::Error)]
pub enum PoolConnectError {
    /// The sidecar has no identity (yet, or any more).
    #[error("no identity")]
    NoIdentity,
    /// Every one of the pools' connections is in use, and none closed
    /// within the connect timeout.
    #[error("pooled connection limit ({0}) reached")]
    PoolFull(usize),
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
            // Wait (bounded) for a pooled connection to close rather than
            // fail at once: idle ones expire, busy ones end.
            let max = this.max_pooled;
            let slot =
                tokio::time::timeout(this.connect_timeout, this.slots.clone().acquire_owned())
                    .await
                    .map_err(|_| PoolConnectError::PoolFull(max))?
                    // Invariant: the semaphore is never closed.
                    .map_err(|_| PoolConnectError::PoolFull(max))?;
            let tcp = forward::connect(dst, this.connect_timeout).await?;
            let (tls, peer) = tls::originate(tcp, dst, cfg, this.handshake_timeout)
                .await
                .inspect_err(|e| metrics::handshake(Direction::Outbound, e.label()))?;
            metrics::handshake(Direction::Outbound, "ok");
            tracing::debug!(dst.addr = %dst, peer.id = %peer.principal(), "pooled connection opened");
            Ok(TokioIo::new(MeshStream { tls, _slot: slot }))
        })
    }
}

/// A pooled mTLS stream, holding its slot under the pool cap.
pub struct MeshStream {
    tls: ClientTls,
    _slot: OwnedSemaphorePermit,
}

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
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for MeshStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }
}
