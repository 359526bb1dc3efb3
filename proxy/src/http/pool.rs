//! HTTP/1.1 connection pools without translation, as nginx and HAProxy
//! keep them: the outbound hop to peer sidecars (mTLS, keyed by
//! [`Endpoint`]), and the inbound sidecar's connections to its app.
//!
//! A pooled connection ([`Link`]) is leased by one client connection at a
//! time ([`LinkSlot`]): every request of that client connection goes on
//! it, with no pool operation per request, and it goes back to the pool
//! when the client connection ends (or moves to another endpoint). Each
//! link's hyper connection runs in a task of its own (`drive`), which also
//! closes it when idle for the idle timeout or, once its in-flight request
//! has finished, when the certificates it was made with expire (issue 19
//! R5: no request is sent on a connection past its SVID's or its peer's
//! `notAfter`; requests move to a new connection made with the current
//! SVID, or fail closed without one).
//!
//! The outbound pool ([`OutboundHttp`]) dials with `forward::dial_peer`
//! and the identity store's current configuration (nothing is built per
//! connection); at most `limits.http_pool_max_connections` hop connections
//! are open over all endpoints.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::body::RequestBody;
use crate::config::Limits;
use crate::forward::{self, PeerError};
use crate::metrics;

/// Where a hop connection goes: the peer sidecar's socket address and the
/// server identity it must prove during the handshake. The routing stage
/// chooses it per request; connections are pooled under it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// The peer sidecar.
    pub addr: SocketAddr,
    /// The server identity to expect.
    pub expect: Expect,
}

/// Which server identity a hop connection expects.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Expect {
    /// Client configuration `i` of the identity store (an outbound rule's
    /// `server_identities`, or an explicit listener's).
    Rule(usize),
}

/// Why a pooled connection could not be had.
#[derive(Debug, thiserror::Error)]
pub enum PoolConnectError {
    /// The sidecar has no identity (yet, or any more).
    #[error("no identity")]
    NoIdentity,
    /// Every one of the pools' connections is in use, and none closed
    /// within the connect timeout.
    #[error("pooled connection limit ({0}) reached")]
    PoolFull(usize),
    /// The peer could not be reached, or its handshake failed.
    #[error(transparent)]
    Peer(#[from] PeerError),
    /// The app could not be reached (inbound pool).
    #[error(transparent)]
    App(#[from] forward::ConnectError),
    /// The HTTP/1.1 client handshake failed (local, no bytes exchanged:
    /// a bug or a closed socket).
    #[error("http/1.1 client: {0}")]
    Http(#[from] hyper::Error),
}

/// Why a request on a pooled connection failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be had.
    #[error(transparent)]
    Connect(#[from] PoolConnectError),
    /// The exchange failed after the request was handed to a connection.
    #[error(transparent)]
    Exchange(hyper::Error),
    /// A new connection closed before the request could be written.
    #[error("the connection closed before the request was sent")]
    Closed,
}

/// A link's shared state, between the lessee and the connection task.
#[derive(Debug)]
struct LinkState {
    /// A request is on the link (until its response body is dropped).
    in_flight: AtomicBool,
    /// The connection task decided to close: send nothing more on it.
    closing: AtomicBool,
    /// Milliseconds after `epoch` of the end of the last exchange.
    last_used_ms: AtomicU64,
    epoch: Instant,
    /// Signalled when an exchange ends while `closing`.
    idle: Notify,
}

impl LinkState {
    fn new() -> Arc<Self> {
        Arc::new(LinkState {
            in_flight: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            last_used_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            idle: Notify::new(),
        })
    }

    /// Claims the link for one exchange; false if it is closing. The
    /// connection task sets `closing` before it reads `in_flight`, and this
    /// sets `in_flight` before it reads `closing`: one of them sees the other.
    fn begin(&self) -> bool {
        self.in_flight.store(true, Ordering::SeqCst);
        if self.closing.load(Ordering::SeqCst) {
            self.end();
            return false;
        }
        true
    }

    fn end(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_used_ms.store(ms, Ordering::Relaxed);
        self.in_flight.store(false, Ordering::SeqCst);
        if self.closing.load(Ordering::SeqCst) {
            self.idle.notify_one();
        }
    }

    fn last_used(&self) -> Instant {
        self.epoch + Duration::from_millis(self.last_used_ms.load(Ordering::Relaxed))
    }
}

/// Ends a link's exchange when dropped (with the response body).
#[derive(Debug)]
struct InFlight(Arc<LinkState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// A response body from upstream (the peer sidecar or the app). From a
/// pooled connection, that connection counts as busy until it is dropped.
#[derive(Debug)]
pub struct UpstreamBody {
    inner: Incoming,
    _in_flight: Option<InFlight>,
}

impl From<Incoming> for UpstreamBody {
    fn from(inner: Incoming) -> Self {
        UpstreamBody {
            inner,
            _in_flight: None,
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// How long before its certificates expire a pooled connection stops
/// taking new requests (the far end closes it at expiry).
const REUSE_MARGIN: Duration = Duration::from_secs(1);

/// One pooled HTTP/1.1 connection, leased by one client connection at a time.
pub struct Link {
    sender: SendRequest<RequestBody>,
    state: Arc<LinkState>,
    /// When the certificates it was made with expire (`None`: plaintext).
    expires: Option<Instant>,
    /// Whether it already carried a request (a fresh connection that
    /// fails is not retried).
    reused: bool,
    /// The verified peer, for the request metrics.
    peer: Option<metrics::DestinationId>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("peer", &self.peer)
            .field("expires", &self.expires)
            .finish_non_exhaustive()
    }
}

impl Link {
    /// Whether a new request may go on it: open, not closing, certificates
    /// not expired.
    fn usable(&self) -> bool {
        // A connection already used stops taking requests a little before
        // its certificates expire, so that none races the far end's close.
        let margin = if self.reused {
            REUSE_MARGIN
        } else {
            Duration::ZERO
        };
        !self.sender.is_closed()
            && !self.state.closing.load(Ordering::Relaxed)
            && self.expires.is_none_or(|e| Instant::now() + margin < e)
    }

    /// Whether it can wait in the pool: usable and idle.
    fn idle(&self) -> bool {
        self.usable() && !self.state.in_flight.load(Ordering::SeqCst) && self.sender.is_ready()
    }

    /// The verified peer of a mesh connection.
    pub fn peer(&self) -> Option<&metrics::DestinationId> {
        self.peer.as_ref()
    }

    /// Runs HTTP/1.1 over `io` in a task of its own, closed when idle for
    /// `idle_timeout` or (after its in-flight request) at `expires`.
    /// `slot` is held until the connection closes.
    pub async fn establish<S>(
        io: S,
        expires: Option<SystemTime>,
        idle_timeout: Duration,
        peer: Option<metrics::DestinationId>,
        slot: Option<OwnedSemaphorePermit>,
    ) -> Result<Link, hyper::Error>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
        let state = LinkState::new();
        let expires = expires.map(instant_of);
        tokio::spawn(drive(conn, state.clone(), expires, idle_timeout, slot));
        Ok(Link {
            sender,
            state,
            expires,
            reused: false,
            peer,
        })
    }

    /// Sends `req` and waits for the response head (the caller bounds the
    /// wait).
    async fn send(&mut self, req: Request<RequestBody>) -> Result<Response<UpstreamBody>, Attempt> {
        if self.sender.ready().await.is_err() || !self.state.begin() {
            // Closed or closing before anything was written.
            return Err(Attempt::Retry(req));
        }
        let in_flight = InFlight(self.state.clone());
        self.reused = true;
        match self.sender.try_send_request(req).await {
            Ok(resp) => Ok(resp.map(|inner| UpstreamBody {
                inner,
                _in_flight: Some(in_flight),
            })),
            Err(mut e) => match e.take_message() {
                // hyper gave it back: the connection closed before writing it.
                Some(req) => Err(Attempt::Retry(req)),
                None => Err(Attempt::Failed(e.into_error())),
            },
        }
    }
}

/// How a request on a link failed.
enum Attempt {
    /// Nothing was written: the request can go on another connection.
    Retry(Request<RequestBody>),
    /// The exchange failed after the request was handed over.
    Failed(hyper::Error),
}

/// The connection task of a link.
async fn drive<S>(
    conn: hyper::client::conn::http1::Connection<TokioIo<S>, RequestBody>,
    state: Arc<LinkState>,
    expires: Option<Instant>,
    idle_timeout: Duration,
    _slot: Option<OwnedSemaphorePermit>,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    tokio::pin!(conn);
    loop {
        // An exchange in progress counts as use.
        let idle_at = match state.in_flight.load(Ordering::SeqCst) {
            true => Instant::now() + idle_timeout,
            false => state.last_used() + idle_timeout,
        };
        let wake = expires.map_or(idle_at, |e| e.min(idle_at));
        tokio::select! {
            r = &mut conn => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "pooled connection ended with an error");
                }
                return;
            }
            () = tokio::time::sleep_until(wake) => {}
        }
        let now = Instant::now();
        let expired = expires.is_some_and(|e| now >= e);
        if !expired && state.last_used() + idle_timeout > now {
            continue;
        }
        state.closing.store(true, Ordering::SeqCst);
        if !state.in_flight.load(Ordering::SeqCst) {
            tracing::debug!(expired, "pooled connection closed (idle or certificates expired)");
            return;
        }
        if !expired {
            // Busy after all: not idle.
            state.closing.store(false, Ordering::SeqCst);
            continue;
        }
        // Expired with a request in flight: let it finish, then close.
        loop {
            let notified = state.idle.notified();
            if !state.in_flight.load(Ordering::SeqCst) {
                break;
            }
            tokio::select! {
                r = &mut conn => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "pooled connection ended with an error");
                    }
                    return;
                }
                () = notified => {}
            }
        }
        tracing::debug!("pooled connection closed: its certificates expired");
        return;
    }
}

/// `t` on tokio's clock (a time already past is now).
fn instant_of(t: SystemTime) -> Instant {
    let now = Instant::now();
    match t.duration_since(SystemTime::now()) {
        Ok(d) => now + d,
        Err(_) => now,
    }
}

/// The idle connections of a pool, by key.
#[derive(Debug)]
pub struct IdleLinks<K> {
    links: Mutex<HashMap<K, Vec<Link>>>,
}

impl<K> Default for IdleLinks<K> {
    fn default() -> Self {
        IdleLinks {
            links: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: std::hash::Hash + Eq + Clone> IdleLinks<K> {
    /// The most recently used idle connection to `key` that can take a
    /// request (closed ones are dropped on the way).
    fn take(&self, key: &K) -> Option<Link> {
        // Poisoning needs a panic while moving a Vec element.
        let mut map = self.links.lock().unwrap_or_else(|e| e.into_inner());
        let v = map.get_mut(key)?;
        let found = std::iter::from_fn(|| v.pop()).find(Link::idle);
        if v.is_empty() {
            map.remove(key);
        }
        found
    }

    /// Puts a connection back if it can still take requests (it is
    /// closed otherwise, as it drops).
    fn put(&self, key: K, link: Link) {
        if !link.idle() {
            return;
        }
        let mut map = self.links.lock().unwrap_or_else(|e| e.into_inner());
        let v = map.entry(key).or_default();
        // Connections that closed while idle go now, not at the next take.
        v.retain(Link::idle);
        v.push(link);
    }

    /// Idle connections open now.
    pub fn len(&self) -> usize {
        let map = self.links.lock().unwrap_or_else(|e| e.into_inner());
        map.values().map(Vec::len).sum()
    }

    /// Whether no idle connection is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The pooled connection a client connection holds (at most one), back to
/// its pool when the client connection ends.
pub struct LinkSlot<K: std::hash::Hash + Eq + Clone> {
    held: Mutex<Option<(K, Link)>>,
    pool: Arc<IdleLinks<K>>,
}

impl<K: std::hash::Hash + Eq + Clone> std::fmt::Debug for LinkSlot<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkSlot").finish_non_exhaustive()
    }
}

impl<K: std::hash::Hash + Eq + Clone> LinkSlot<K> {
    /// An empty slot over `pool`.
    pub fn new(pool: Arc<IdleLinks<K>>) -> Self {
        LinkSlot {
            held: Mutex::new(None),
            pool,
        }
    }

    /// The held connection (with its key) if it goes to `key`; one to
    /// another key goes back to the pool.
    fn take(&self, key: &K) -> Option<(K, Link)> {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner()).take();
        match held {
            Some((k, link)) if k == *key => Some((k, link)),
            Some((k, link)) => {
                self.pool.put(k, link);
                None
            }
            None => None,
        }
    }

    fn hold(&self, key: K, link: Link) {
        let old = self
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace((key, link));
        if let Some((k, l)) = old {
            self.pool.put(k, l);
        }
    }

    /// Sends `req` to `key` on the held connection, an idle one of the
    /// pool, or a new one from `dial`. A request that a reused connection
    /// closed before writing goes on another one; a new connection that
    /// closes at once is an error. Returns the response and the verified
    /// peer of the connection. [`SendError::Connect`] and
    /// [`SendError::Closed`] mean the request never reached the far end.
    pub async fn send<D, F>(
        &self,
        key: &K,
        mut req: Request<RequestBody>,
        dial: D,
    ) -> Result<(Response<UpstreamBody>, Option<metrics::DestinationId>), SendError>
    where
        D: Fn() -> F,
        F: Future<Output = Result<Link, PoolConnectError>>,
    {
        let mut held = self.take(key);
        // Reused connections that closed under the request: a few, then a
        // new one, whose failure is final.
        for _ in 0..4 {
            let (k, mut link) = match held.take() {
                Some((k, l)) if l.usable() => (k, l),
                _ => match self.pool.take(key) {
                    Some(l) => (key.clone(), l),
                    None => (key.clone(), dial().await?),
                },
            };
            let fresh = !link.reused;
            match link.send(req).await {
                Ok(resp) => {
                    let peer = link.peer.clone();
                    self.hold(k, link);
                    return Ok((resp, peer));
                }
                Err(Attempt::Retry(_)) if fresh => return Err(SendError::Closed),
                Err(Attempt::Retry(r)) => req = r,
                Err(Attempt::Failed(e)) => return Err(SendError::Exchange(e)),
            }
        }
        Err(SendError::Closed)
    }
}

impl<K: std::hash::Hash + Eq + Clone> Drop for LinkSlot<K> {
    fn drop(&mut self) {
        let held = self.held.get_mut().unwrap_or_else(|e| e.into_inner()).take();
        if let Some((k, link)) = held {
            self.pool.put(k, link);
        }
    }
}

/// The outbound hop: HTTP/1.1 to peer sidecars over pooled mTLS
/// connections, and the server side for the app's connections.
pub struct OutboundHttp {
    pub(super) server: hyper::server::conn::http1::Builder,
    pub(super) hop: Arc<IdleLinks<Endpoint>>,
    identity: tokio::sync::watch::Receiver<Option<Arc<rampart_identity::store::TlsConfigs>>>,
    /// `limits.http_pool_max_connections` permits, one per open hop connection.
    slots: Arc<Semaphore>,
    max_pooled: usize,
    connect_timeout: Duration,
    handshake_timeout: Duration,
    idle_timeout: Duration,
}

impl std::fmt::Debug for OutboundHttp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboundHttp").finish_non_exhaustive()
    }
}

/// How long a pooled HTTP/1.1 connection may sit idle: the configured
/// pool idle timeout, but under the far end's keep-alive idle close (the
/// header read timeout, on a peer sidecar with the same limits), so that
/// the far end does not close it while a request is on its way.
pub(crate) fn link_idle_timeout(l: &Limits) -> Duration {
    l.http_pool_idle_timeout.min(l.http_header_read_timeout / 2)
}

impl OutboundHttp {
    /// The hop pool; connections read the identity from `identity`.
    pub fn new(
        limits: &Limits,
        identity: tokio::sync::watch::Receiver<Option<Arc<rampart_identity::store::TlsConfigs>>>,
    ) -> Self {
        let l = limits;
        let mut server = hyper::server::conn::http1::Builder::new();
        server
            .timer(TokioTimer::new())
            .header_read_timeout(l.http_header_read_timeout)
            .max_buf_size(l.http_max_header_bytes.max(8192))
            .max_headers(l.http_max_headers);
        OutboundHttp {
            server,
            hop: Arc::default(),
            identity,
            slots: Arc::new(Semaphore::new(l.http_pool_max_connections)),
            max_pooled: l.http_pool_max_connections,
            connect_timeout: l.connect_timeout,
            handshake_timeout: l.handshake_timeout,
            idle_timeout: link_idle_timeout(l),
        }
    }

    /// A slot for one app connection.
    pub fn slot(&self) -> LinkSlot<Endpoint> {
        LinkSlot::new(self.hop.clone())
    }

    /// Open hop connections (idle or leased).
    pub fn open_connections(&self) -> usize {
        self.max_pooled - self.slots.available_permits()
    }

    /// Opens a hop connection to `endpoint` with the current SVID: mTLS,
    /// the server's SPIFFE ID checked during the handshake. It is closed
    /// when its SVID or the peer's expires.
    pub(crate) async fn dial(&self, endpoint: &Endpoint) -> Result<Link, PoolConnectError> {
        let (cfg, own_expiry) = {
            let current = self.identity.borrow();
            let configs = current.as_ref().ok_or(PoolConnectError::NoIdentity)?;
            let cfg = match &endpoint.expect {
                Expect::Rule(i) => configs.client.get(*i).cloned(),
            };
            (cfg.ok_or(PoolConnectError::NoIdentity)?, configs.svid.not_after)
        };
        // Wait (bounded) for a pooled connection to close rather than
        // fail at once: idle ones expire, busy ones end.
        let max = self.max_pooled;
        let slot = tokio::time::timeout(self.connect_timeout, self.slots.clone().acquire_owned())
            .await
            .map_err(|_| PoolConnectError::PoolFull(max))?
            // Invariant: the semaphore is never closed.
            .map_err(|_| PoolConnectError::PoolFull(max))?;
        let (tls, peer) = forward::dial_peer(
            endpoint.addr,
            cfg,
            self.connect_timeout,
            self.handshake_timeout,
        )
        .await?;
        let peer_expiry = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|leaf| rampart_identity::svid::leaf_not_after(leaf));
        // A peer certificate without a readable expiry was refused by the
        // verifier; never keep a connection longer than our own SVID.
        let expires = match peer_expiry {
            Some(p) => p.min(own_expiry),
            None => own_expiry,
        };
        tracing::debug!(dst.addr = %endpoint.addr, peer.id = %peer.principal(), "pooled connection opened");
        let peer = metrics::DestinationId(peer.principal().into());
        Ok(Link::establish(tls, Some(expires), self.idle_timeout, Some(peer), Some(slot)).await?)
    }
}
