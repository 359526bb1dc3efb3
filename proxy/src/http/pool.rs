//! The outbound HTTP pool: one pooled HTTP/2 mTLS connection per
//! (destination, expected server identity), shared by every app
//! connection. A destination is the original destination with a server
//! rule's identities, or an endpoint discovery found (pod IP:port) with
//! that endpoint's own SPIFFE ID ([`OutboundHttp::endpoint_client`]). It is hyper-util's client: HTTP/2 only, keep-alive pings,
//! idle connections closed after `limits.http_pool_idle_timeout`, at most
//! `limits.http_pool_max_connections` of them over all destinations. Its
//! connector dials with `forward::dial_peer`, with the identity store's
//! current configuration; nothing is built per connection.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use http::uri::Authority;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rampart_identity::SpiffeId;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::body::RequestBody;
use crate::config::Limits;
use crate::forward::{self, PeerError};
use crate::metrics;
use crate::tls::ClientTls;

/// The h2 pools, one per client configuration index (expected identity),
/// keyed inside by destination.
pub struct OutboundHttp {
    pub(super) server: hyper::server::conn::http1::Builder,
    pub(super) clients: Vec<Client<MeshConnector, RequestBody>>,
    /// Pools expecting one exact server ID each (discovered endpoints),
    /// keyed inside by the endpoint's address; made on first use.
    endpoints: Mutex<HashMap<SpiffeId, Client<MeshConnector, RequestBody>>>,
    /// Makes the pools of `endpoints`.
    builder: hyper_util::client::legacy::Builder,
    /// The connector settings the endpoint pools share with the others.
    connector: MeshConnector,
}

/// How many endpoint identities get a pool of their own before the
/// table starts over (idle connections of dropped pools close).
const MAX_ENDPOINT_POOLS: usize = 1024;

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
        let l = limits;
        let mut server = hyper::server::conn::http1::Builder::new();
        server
            .timer(TokioTimer::new())
            // The smuggling guard keeps the header read timeout, from the
            // first byte of each head; hyper's would also close idle
            // keep-alive connections (`http::outbound` keeps their idle
            // timeout).
            .header_read_timeout(None)
            .max_buf_size(l.http_max_header_bytes.max(8192))
            .max_headers(l.http_max_headers);
        // One cap over every pool: a connection holds a permit until it closes.
        let slots = Arc::new(Semaphore::new(l.http_pool_max_connections));
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(l.http_pool_idle_timeout)
            .http2_only(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .http2_keep_alive_timeout(Duration::from_secs(10))
            .http2_max_concurrent_reset_streams(l.http_max_concurrent_streams as usize);
        let connector = MeshConnector {
            expect: Expect::Rule(0),
            identity: identity.clone(),
            connect_timeout: limits.connect_timeout,
            handshake_timeout: limits.handshake_timeout,
            slots: slots.clone(),
            max_pooled: l.http_pool_max_connections,
        };
        let clients = (0..client_configs)
            .map(|index| {
                builder.build(MeshConnector {
                    expect: Expect::Rule(index),
                    ..connector.clone()
                })
            })
            .collect();
        OutboundHttp {
            server,
            clients,
            endpoints: Mutex::new(HashMap::new()),
            builder,
            connector,
        }
    }

    /// The pool for endpoints whose server must present `id` (requests
    /// name the endpoint's address as their authority).
    pub fn endpoint_client(&self, id: &SpiffeId) -> Client<MeshConnector, RequestBody> {
        // Poisoning needs a panic while holding the lock, which only
        // clones and inserts.
        let mut pools = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = pools.get(id) {
            return c.clone();
        }
        if pools.len() >= MAX_ENDPOINT_POOLS {
            pools.clear();
        }
        let c = self.builder.build(MeshConnector {
            expect: Expect::Id(id.clone()),
            ..self.connector.clone()
        });
        pools.insert(id.clone(), c.clone());
        c
    }
}

/// The connector's error behind a pool failure, if it was one (no
/// identity or pool full: 503, not 502).
pub(crate) fn pool_failure(e: &hyper_util::client::legacy::Error) -> Option<&PoolConnectError> {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(p) = s.downcast_ref::<PoolConnectError>() {
            return Some(p);
        }
        source = s.source();
    }
    None
}

/// Which server identity a pool's connections expect.
#[derive(Debug, Clone)]
enum Expect {
    /// Client configuration `i` of the plan (a server rule's identities).
    Rule(usize),
    /// Exactly this SPIFFE ID (a discovered endpoint).
    Id(SpiffeId),
}

/// Dials a peer sidecar and originates mTLS for the pool.
#[derive(Clone)]
pub struct MeshConnector {
    expect: Expect,
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
    /// The peer could not be reached, or its handshake failed.
    #[error(transparent)]
    Peer(#[from] PeerError),
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
                match &this.expect {
                    Expect::Rule(i) => configs.client.get(*i).cloned(),
                    Expect::Id(id) => configs.endpoints.for_id(id),
                }
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
            let (tls, peer) =
                forward::dial_peer(dst, cfg, this.connect_timeout, this.handshake_timeout).await?;
            tracing::debug!(dst.addr = %dst, peer.id = %peer.principal(), "pooled connection opened");
            let peer = metrics::DestinationId(peer.principal().into());
            Ok(TokioIo::new(MeshStream {
                tls,
                peer,
                _slot: slot,
            }))
        })
    }
}

/// A pooled mTLS stream, holding its slot under the pool cap.
pub struct MeshStream {
    tls: ClientTls,
    /// The peer sidecar's verified identity, for the request metrics.
    peer: metrics::DestinationId,
    _slot: OwnedSemaphorePermit,
}

impl Connection for MeshStream {
    fn connected(&self) -> Connected {
        Connected::new().negotiated_h2().extra(self.peer.clone())
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
