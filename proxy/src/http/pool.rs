//! HTTP/1.1 connection pools without translation, as nginx and HAProxy
//! keep them: the outbound hop to peer sidecars (mTLS, keyed by
//! [`Endpoint`]), and the inbound sidecar's connections to its app.
//!
//! A pooled connection ([`Link`]) carries one exchange at a time: a
//! request takes the most recently used idle one (or dials), and the link
//! travels with the response body, back to the pool when the body is
//! dropped. So connections on the hop number the requests in flight, not
//! the client connections open (1,000 idle keep-alive clients hold no hop
//! connection), and nothing is spawned per request. Each link's hyper
//! connection runs in a task of its own (`drive`), which also closes it
//! when idle for the idle timeout or, once its in-flight request has
//! finished, when the certificates it was made with expire (issue 19 R5:
//! no request is sent on a connection past its SVID's or its peer's
//! `notAfter`; requests move to a new connection made with the current
//! SVID, or fail closed without one).
//!
//! The outbound pool ([`OutboundHttp`]) dials with `forward::dial_peer`
//! and the identity store's current configuration (nothing is built per
//! connection); at most `limits.http_pool_max_connections` hop connections
//! are open over all endpoints.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::{TokioIo, TokioTimer};
use rampart_identity::SpiffeId;
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
    /// Exactly this SPIFFE ID (an endpoint discovery found).
    Id(SpiffeId),
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
    /// `max_dials` connections to the same key were being opened for the
    /// whole wait, and none came back to the pool.
    #[error("{0} connections to the destination were being opened for the whole wait")]
    DialBacklog(usize),
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

impl SendError {
    /// Whether the request never reached the far end (it may go to
    /// another endpoint): no connection, or one that closed before it.
    pub fn is_connect(&self) -> bool {
        matches!(self, SendError::Connect(_) | SendError::Closed)
    }
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

/// A link during one exchange, carried by its response body: when the
/// body is dropped (read to its end, usually), the exchange ends and the
/// link goes back to its pool.
#[derive(Debug)]
struct InFlight(Option<Link>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(link) = self.0.take() {
            link.state.end();
            if let Some(home) = link.home.clone() {
                home(link);
            }
        }
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

/// Where a link goes back after an exchange (its pool, under its key).
type Home = Arc<dyn Fn(Link) + Send + Sync>;

/// One pooled HTTP/1.1 connection: one exchange at a time, back to its
/// pool between exchanges.
pub struct Link {
    sender: SendRequest<RequestBody>,
    /// Set by the pool that first sends on it.
    home: Option<Home>,
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
            home: None,
            state,
            expires,
            reused: false,
            peer,
        })
    }

    /// Sends `req` and waits for the response head (the caller bounds the
    /// wait). The link travels with the response body, back to its pool
    /// when the body is dropped.
    async fn send(mut self, req: Request<RequestBody>) -> Result<Response<UpstreamBody>, Attempt> {
        if self.sender.ready().await.is_err() || !self.state.begin() {
            // Closed or closing before anything was written.
            return Err(Attempt::Retry(Box::new(req)));
        }
        self.reused = true;
        let sent = self.sender.try_send_request(req);
        // The exchange ends (and the link goes home) with the body, or
        // here on failure.
        let mut in_flight = InFlight(None);
        match sent.await {
            Ok(resp) => {
                in_flight.0 = Some(self);
                Ok(resp.map(|inner| UpstreamBody {
                    inner,
                    _in_flight: Some(in_flight),
                }))
            }
            Err(mut e) => {
                self.state.end();
                match e.take_message() {
                    // hyper gave it back: the connection closed before writing it.
                    Some(req) => Err(Attempt::Retry(Box::new(req))),
                    None => Err(Attempt::Failed(e.into_error())),
                }
            }
        }
    }
}

/// How a request on a link failed.
enum Attempt {
    /// Nothing was written: the request can go on another connection
    /// (boxed: the rare path, and it keeps the hot `Result` small).
    Retry(Box<Request<RequestBody>>),
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
            tracing::debug!(
                expired,
                "pooled connection closed (idle or certificates expired)"
            );
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
    links: Mutex<HashMap<K, Idle>>,
    /// Signalled when a connection comes back or a dial ends, while
    /// `waiting` requests wait for that.
    changed: Notify,
    waiting: AtomicUsize,
    /// At most this many connections are being opened per key at once.
    max_dials: usize,
    /// How long a request waits for a connection to come back or a dial
    /// to end when `max_dials` are under way.
    dial_wait: Duration,
}

/// One key's idle connections and dials under way.
#[derive(Debug, Default)]
struct Idle {
    links: Vec<Link>,
    dialing: usize,
}

impl<K> Default for IdleLinks<K> {
    /// A pool that opens as many connections at once as requests need.
    fn default() -> Self {
        Self::with_dial_limit(usize::MAX, Duration::ZERO)
    }
}

impl<K> IdleLinks<K> {
    /// A pool that opens at most `max_dials` connections per key at once:
    /// further requests wait, up to `dial_wait`, for one to come back or a
    /// dial to end ([`PoolConnectError::PoolFull`] after that).
    pub fn with_dial_limit(max_dials: usize, dial_wait: Duration) -> Self {
        IdleLinks {
            links: Mutex::new(HashMap::new()),
            changed: Notify::new(),
            waiting: AtomicUsize::new(0),
            max_dials: max_dials.max(1),
            dial_wait,
        }
    }
}

/// What a request gets from the pool.
enum Lease<'a, K: std::hash::Hash + Eq + Clone> {
    /// An idle connection.
    Idle(Link),
    /// Leave to open a new one (counted until dropped).
    Dial(DialGuard<'a, K>),
    /// Wait: `max_dials` are under way.
    Wait,
}

/// A dial under way, counted against `max_dials` until dropped.
struct DialGuard<'a, K: std::hash::Hash + Eq + Clone> {
    pool: &'a IdleLinks<K>,
    key: &'a K,
}

impl<K: std::hash::Hash + Eq + Clone> Drop for DialGuard<'_, K> {
    fn drop(&mut self) {
        let mut map = self.pool.links.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(idle) = map.get_mut(self.key) {
            idle.dialing = idle.dialing.saturating_sub(1);
            if idle.links.is_empty() && idle.dialing == 0 {
                map.remove(self.key);
            }
        }
        drop(map);
        self.pool.signal();
    }
}

impl<K: std::hash::Hash + Eq + Clone> IdleLinks<K> {
    /// The most recently used idle connection to `key` that can take a
    /// request (closed ones are dropped on the way), else leave to dial
    /// unless `max_dials` are under way.
    fn lease<'a>(&'a self, key: &'a K) -> Lease<'a, K> {
        // Poisoning needs a panic while moving a Vec element.
        let mut map = self.links.lock().unwrap_or_else(|e| e.into_inner());
        let Some(idle) = map.get_mut(key) else {
            map.insert(
                key.clone(),
                Idle {
                    links: Vec::new(),
                    dialing: 1,
                },
            );
            return Lease::Dial(DialGuard { pool: self, key });
        };
        if let Some(link) = std::iter::from_fn(|| idle.links.pop()).find(Link::usable) {
            if idle.links.is_empty() && idle.dialing == 0 {
                map.remove(key);
            }
            return Lease::Idle(link);
        }
        if idle.dialing >= self.max_dials {
            return Lease::Wait;
        }
        idle.dialing += 1;
        Lease::Dial(DialGuard { pool: self, key })
    }

    /// Puts a connection back if it can still take requests (it is
    /// closed otherwise, as it drops). hyper may not have seen the end of
    /// the last response yet; the next exchange waits for it.
    fn put(&self, key: K, link: Link) {
        if !link.usable() {
            return;
        }
        let mut map = self.links.lock().unwrap_or_else(|e| e.into_inner());
        let v = &mut map.entry(key).or_default().links;
        // Connections that closed while idle go now, not at the next take.
        v.retain(Link::usable);
        v.push(link);
        drop(map);
        self.signal();
    }

    /// Wakes the requests waiting for a connection, if any (the common
    /// case, none, costs a load).
    fn signal(&self) {
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.changed.notify_waiters();
        }
    }

    /// An idle connection to `key`, or a new one from `dial`, waiting (up
    /// to `dial_wait`) while `max_dials` are under way.
    async fn link<D, F>(&self, key: &K, dial: &D) -> Result<Link, PoolConnectError>
    where
        D: Fn() -> F,
        F: Future<Output = Result<Link, PoolConnectError>>,
    {
        let deadline = Instant::now() + self.dial_wait;
        loop {
            // Registered, and counted as waiting, before looking: a
            // connection put back or a dial ended after this look signals
            // `changed` (`put` and `DialGuard` read `waiting` after their
            // change, under the same lock `lease` takes).
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            self.waiting.fetch_add(1, Ordering::SeqCst);
            let lease = self.lease(key);
            if !matches!(lease, Lease::Wait) {
                self.waiting.fetch_sub(1, Ordering::SeqCst);
            }
            match lease {
                Lease::Idle(link) => return Ok(link),
                Lease::Dial(guard) => {
                    // Boxed: the handshake's state is large and only a
                    // new connection needs it, so the request's future
                    // (which hyper allocates per connection) stays small.
                    let link = Box::pin(dial()).await;
                    drop(guard);
                    return link;
                }
                Lease::Wait => {
                    let waited = tokio::time::timeout_at(deadline, changed).await;
                    self.waiting.fetch_sub(1, Ordering::SeqCst);
                    if waited.is_err() {
                        return Err(PoolConnectError::DialBacklog(self.max_dials));
                    }
                }
            }
        }
    }

    /// Idle connections open now.
    pub fn len(&self) -> usize {
        let map = self.links.lock().unwrap_or_else(|e| e.into_inner());
        map.values().map(|i| i.links.len()).sum()
    }

    /// Whether no idle connection is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<K: std::hash::Hash + Eq + Clone + Send + Sync + 'static> IdleLinks<K> {
    /// Sends `req` to `key` on an idle connection of the pool or a new one
    /// from `dial`; the connection comes back to the pool when the
    /// response body is dropped. A request that a reused connection closed
    /// before writing goes on another one; a new connection that closes at
    /// once is an error. Returns the response and the verified peer of the
    /// connection. [`SendError::Connect`] and [`SendError::Closed`] mean
    /// the request never reached the far end.
    pub async fn send<D, F>(
        self: &Arc<Self>,
        key: &K,
        mut req: Request<RequestBody>,
        dial: D,
    ) -> Result<(Response<UpstreamBody>, Option<metrics::DestinationId>), SendError>
    where
        D: Fn() -> F,
        F: Future<Output = Result<Link, PoolConnectError>>,
    {
        // Reused connections that closed under the request: a few, then a
        // new one, whose failure is final.
        for _ in 0..4 {
            let mut link = self.link(key, &dial).await?;
            if link.home.is_none() {
                let (pool, k) = (Arc::downgrade(self), key.clone());
                link.home = Some(Arc::new(move |l| {
                    if let Some(pool) = pool.upgrade() {
                        pool.put(k.clone(), l);
                    }
                }));
            }
            let fresh = !link.reused;
            let peer = link.peer.clone();
            match link.send(req).await {
                Ok(resp) => return Ok((resp, peer)),
                Err(Attempt::Retry(_)) if fresh => return Err(SendError::Closed),
                Err(Attempt::Retry(r)) => req = *r,
                Err(Attempt::Failed(e)) => return Err(SendError::Exchange(e)),
            }
        }
        Err(SendError::Closed)
    }
}

/// At most this many hop connections to one peer sidecar are opened at
/// once (`OutboundHttp::new`).
const MAX_HOP_DIALS: usize = 32;

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
/// pool idle timeout, but under the far end's keep-alive idle close
/// (`http_idle_timeout`, on a peer sidecar with the same limits), so that
/// the far end does not close it while a request is on its way.
pub(crate) fn link_idle_timeout(l: &Limits) -> Duration {
    l.http_pool_idle_timeout.min(l.http_idle_timeout / 2)
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
            // The smuggling guard keeps the header read timeout, from the
            // first byte of each head; hyper's would also close idle
            // keep-alive connections (`http::outbound` keeps their idle
            // timeout).
            .header_read_timeout(None)
            .max_buf_size(l.http_max_header_bytes.max(8192))
            .max_headers(l.http_max_headers);
        OutboundHttp {
            server,
            // A burst of requests with no idle connection would otherwise
            // open one connection each at the same moment: the peer closes
            // those past its `max_pending_per_source` still in their
            // handshake (128 by default, assumed the same as ours), and
            // every one opened stays in both pools after the burst.
            // Waiting requests take a connection that comes back first.
            hop: Arc::new(IdleLinks::with_dial_limit(
                (l.max_pending_per_source / 4).clamp(1, MAX_HOP_DIALS),
                l.connect_timeout,
            )),
            identity,
            slots: Arc::new(Semaphore::new(l.http_pool_max_connections)),
            max_pooled: l.http_pool_max_connections,
            connect_timeout: l.connect_timeout,
            handshake_timeout: l.handshake_timeout,
            idle_timeout: link_idle_timeout(l),
        }
    }

    /// Sends `req` to `endpoint` on a pooled hop connection or a new one.
    pub async fn send(
        &self,
        endpoint: &Endpoint,
        req: Request<RequestBody>,
    ) -> Result<(Response<UpstreamBody>, Option<metrics::DestinationId>), SendError> {
        self.hop.send(endpoint, req, || self.dial(endpoint)).await
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
                Expect::Id(id) => configs.endpoints.for_id(id),
            };
            (
                cfg.ok_or(PoolConnectError::NoIdentity)?,
                configs.svid.not_after,
            )
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
        Ok(Link::establish(
            tls,
            Some(expires),
            self.idle_timeout,
            Some(peer),
            Some(slot),
        )
        .await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::atomic::AtomicUsize;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An HTTP/1.1 app on loopback that answers each request with the
    /// number of the connection it came on (after `delay`), and closes
    /// after `per_conn` requests without saying so. Counts closed
    /// connections.
    struct App {
        addr: SocketAddr,
        closed: Arc<AtomicUsize>,
    }

    async fn app(delay: Duration, per_conn: usize) -> App {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let closed = Arc::new(AtomicUsize::new(0));
        let c = closed.clone();
        tokio::spawn(async move {
            let mut n = 0;
            while let Ok((mut s, _)) = l.accept().await {
                n += 1;
                let (id, closed) = (n, c.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut served = 0;
                    'conn: while served < per_conn {
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            let mut chunk = [0; 1024];
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => break 'conn,
                                Ok(k) => buf.extend_from_slice(&chunk[..k]),
                            }
                        }
                        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                        buf.drain(..end);
                        tokio::time::sleep(delay).await;
                        let body = id.to_string();
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if s.write_all(resp.as_bytes()).await.is_err() {
                            break;
                        }
                        served += 1;
                    }
                    if served < per_conn {
                        // The client closed it.
                        closed.fetch_add(1, Ordering::SeqCst);
                    }
                });
            }
        });
        App { addr, closed }
    }

    /// Connections made with certificates that expire `ttl` after dialing.
    fn dialer(
        addr: SocketAddr,
        ttl: Duration,
    ) -> impl Fn() -> std::pin::Pin<Box<dyn Future<Output = Result<Link, PoolConnectError>>>> {
        move || {
            Box::pin(async move {
                let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
                let expires = SystemTime::now() + ttl;
                Ok(
                    Link::establish(tcp, Some(expires), Duration::from_secs(30), None, None)
                        .await?,
                )
            })
        }
    }

    /// An empty request body as hyper hands it over (hyper makes no
    /// `Incoming` otherwise): from a request served over a duplex.
    async fn empty_body() -> Incoming {
        let (mut near, far) = tokio::io::duplex(4096);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let tx = Mutex::new(Some(tx));
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            if let Some(tx) = tx.lock().unwrap().take() {
                let _ = tx.send(req.into_body());
            }
            async {
                Ok::<_, std::convert::Infallible>(Response::new(
                    http_body_util::Empty::<Bytes>::new(),
                ))
            }
        });
        tokio::spawn(
            hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(far), service),
        );
        near.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let body = rx.await.unwrap();
        tokio::spawn(async move {
            let mut sink = [0; 256];
            while near.read(&mut sink).await.is_ok_and(|n| n > 0) {}
        });
        body
    }

    async fn get(slot: &Arc<IdleLinks<SocketAddr>>, addr: SocketAddr, ttl: Duration) -> String {
        let (body, _) = RequestBody::new(empty_body().await);
        let req = Request::get("/").header("host", "app").body(body).unwrap();
        let (resp, _) = slot.send(&addr, req, dialer(addr, ttl)).await.unwrap();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn connections_go_back_to_the_pool_with_their_response_bodies() {
        let app = app(Duration::ZERO, usize::MAX).await;
        let pool = Arc::new(IdleLinks::default());
        let ttl = Duration::from_secs(600);
        assert_eq!(get(&pool, app.addr, ttl).await, "1");
        assert_eq!(get(&pool, app.addr, ttl).await, "1");
        assert_eq!(pool.len(), 1);
        // Two exchanges at once need two connections; both come back.
        let (a, b) = tokio::join!(get(&pool, app.addr, ttl), get(&pool, app.addr, ttl));
        let mut got = [a, b];
        got.sort();
        assert_eq!(got, ["1".to_string(), "2".to_string()]);
        assert_eq!(pool.len(), 2);
        assert_eq!(app.closed.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_burst_opens_at_most_max_dials_connections_at_once_and_reuses_those() {
        let app = app(Duration::from_millis(50), usize::MAX).await;
        let opened = Arc::new(AtomicUsize::new(0));
        let (dialing, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let pool = Arc::new(IdleLinks::with_dial_limit(2, Duration::from_secs(5)));
        let ttl = Duration::from_secs(600);
        // A dial that takes a while (as a TLS handshake does) and counts.
        let dial = || {
            let (opened, dialing, most) = (opened.clone(), dialing.clone(), most.clone());
            let inner = dialer(app.addr, ttl);
            async move {
                opened.fetch_add(1, Ordering::SeqCst);
                let now = dialing.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
                dialing.fetch_sub(1, Ordering::SeqCst);
                inner().await
            }
        };
        let one = || async {
            let (body, _) = RequestBody::new(empty_body().await);
            let req = Request::get("/").header("host", "app").body(body).unwrap();
            let (resp, _) = pool.send(&app.addr, req, dial).await.unwrap();
            resp.into_body().collect().await.unwrap().to_bytes()
        };
        let answers = futures_join_all((0..12).map(|_| one()).collect::<Vec<_>>()).await;
        assert_eq!(answers.len(), 12);
        // Never more than two dials at once, and the waiting requests took
        // connections that came back instead of opening one each.
        assert_eq!(most.load(Ordering::SeqCst), 2);
        let opened = opened.load(Ordering::SeqCst);
        assert!((2..12).contains(&opened), "{opened} connections opened");
        assert_eq!(pool.len(), opened);
    }

    /// Polls every future to its end, concurrently (no `futures` crate here).
    async fn futures_join_all<F: Future>(futs: Vec<F>) -> Vec<F::Output> {
        let mut futs: Vec<Pin<Box<F>>> = futs.into_iter().map(Box::pin).collect();
        let mut out: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
        std::future::poll_fn(|cx| {
            let mut pending = false;
            for (f, o) in futs.iter_mut().zip(out.iter_mut()) {
                if o.is_none() {
                    match f.as_mut().poll(cx) {
                        Poll::Ready(v) => *o = Some(v),
                        Poll::Pending => pending = true,
                    }
                }
            }
            if pending {
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await;
        out.into_iter()
            .map(|o| o.expect("polled to its end"))
            .collect()
    }

    #[tokio::test]
    async fn requests_move_to_a_new_connection_before_the_certificates_expire() {
        let app = app(Duration::ZERO, usize::MAX).await;
        let slot = Arc::new(IdleLinks::default());
        // 1.5 s certificates: reuse stops a second before they expire.
        let ttl = Duration::from_millis(1_500);
        assert_eq!(get(&slot, app.addr, ttl).await, "1");
        assert_eq!(get(&slot, app.addr, ttl).await, "1");
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(get(&slot, app.addr, ttl).await, "2");
        // The first is closed at its expiry, though nothing was sent on it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while app.closed.load(Ordering::SeqCst) == 0 {
            assert!(
                Instant::now() < deadline,
                "the expired connection stayed open"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(get(&slot, app.addr, ttl).await, "2");
    }

    #[tokio::test]
    async fn a_request_in_flight_at_expiry_finishes_then_the_connection_closes() {
        let app = app(Duration::from_millis(800), usize::MAX).await;
        let slot = Arc::new(IdleLinks::default());
        // Expires 300 ms in, while the app takes 800 ms to answer.
        assert_eq!(get(&slot, app.addr, Duration::from_millis(300)).await, "1");
        let deadline = Instant::now() + Duration::from_secs(5);
        while app.closed.load(Ordering::SeqCst) == 0 {
            assert!(
                Instant::now() < deadline,
                "the expired connection stayed open"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_request_on_a_connection_the_far_end_closed_goes_on_a_new_one() {
        // The app closes every connection after one response, unannounced.
        let app = app(Duration::ZERO, 1).await;
        let slot = Arc::new(IdleLinks::default());
        let ttl = Duration::from_secs(600);
        assert_eq!(get(&slot, app.addr, ttl).await, "1");
        // Let the close arrive.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(get(&slot, app.addr, ttl).await, "2");
    }
}
