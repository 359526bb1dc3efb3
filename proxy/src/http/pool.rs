//! HTTP/1.1 connection pools without translation, as nginx and HAProxy
//! keep them: the outbound hop to peer sidecars (mTLS, keyed by
//! [`Endpoint`]), and the inbound sidecar's connections to its app.
//!
//! A pooled connection ([`Link`]) carries one exchange at a time: a
//! request takes the most recently used idle one (or dials), and the link
//! travels with the response body, back to the pool when the body is
//! dropped. So connections on the hop number the requests in flight, not
//! the client connections open (1,000 idle keep-alive clients hold no hop
//! connection), and nothing is spawned per request. A link has no task of
//! its own: hyper's connection future is polled by the request that holds
//! it (while waiting for the response head, then by the response body as
//! the far end's server writes it), so an exchange wakes one task, not two
//! that hand the request and the response to each other. Between
//! exchanges a link waits unpolled in its pool; a far end that closed it
//! meanwhile is noticed by the next request before it writes anything
//! (and that request goes on another connection). The pool's sweeper
//! closes idle links after the idle timeout and when the certificates they
//! were made with expire (issue 19 R5: no request is sent on a connection
//! past its SVID's or its peer's `notAfter`; one in flight then finishes
//! first; requests move to a new connection made with the current SVID,
//! or fail closed without one).
//!
//! The outbound pool ([`OutboundHttp`]) dials with `forward::dial_peer`
//! and the identity store's current configuration (nothing is built per
//! connection); at most `limits.http_pool_max_connections` hop connections
//! are open over all endpoints.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
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

/// hyper's HTTP/1.1 client connection of a link: the future that does its
/// reads and writes, polled by whoever holds the link (the request's own
/// task while an exchange is on it), so nothing crosses tasks per request.
type Driver = Pin<Box<dyn Future<Output = hyper::Result<()>> + Send>>;

/// A response body from upstream (the peer sidecar or the app). From a
/// pooled connection, it carries that connection (and drives it: the body
/// is read by the connection's reads) until it is dropped; a connection
/// whose response was read to its end then goes back to its pool.
pub struct UpstreamBody {
    inner: Incoming,
    link: Option<Link>,
    /// The last frame was read.
    ended: bool,
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("pooled", &self.link.is_some())
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl From<Incoming> for UpstreamBody {
    fn from(inner: Incoming) -> Self {
        UpstreamBody {
            inner,
            link: None,
            ended: false,
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let Some(link) = this.link.as_mut() else {
            return Pin::new(&mut this.inner).poll_frame(cx);
        };
        // The body's frames come only from the connection, which this
        // polls itself: its channel needs no wake-up (one would be a
        // spurious poll of this whole task).
        let mut quiet = Context::from_waker(std::task::Waker::noop());
        let mut polled = Pin::new(&mut this.inner).poll_frame(&mut quiet);
        // Nothing read yet: the connection reads it (it already has, in
        // the poll that read the head, for a short response).
        if polled.is_pending() {
            link.poll_conn(cx);
            polled = Pin::new(&mut this.inner).poll_frame(&mut quiet);
        }
        match &polled {
            Poll::Ready(None) => this.ended = true,
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.ended = true,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        let Some(link) = self.link.take() else {
            return;
        };
        // Dropped before its end (the client went away, or the exchange
        // broke): the connection cannot carry another exchange; it closes
        // as it drops.
        if self.ended || self.inner.is_end_stream() {
            link.exchange_done();
        }
    }
}

/// How long before its certificates expire a pooled connection stops
/// taking new requests (the far end closes it at expiry).
const REUSE_MARGIN: Duration = Duration::from_secs(1);

/// Where a link goes back after an exchange (its pool, under its key).
type Home = Arc<dyn Fn(Link) + Send + Sync>;

/// One pooled HTTP/1.1 connection: one exchange at a time, back to its
/// pool between exchanges, where it waits unpolled until the next one
/// (or until its pool's sweeper closes it).
pub struct Link {
    sender: SendRequest<RequestBody>,
    /// `None` once the connection has closed.
    conn: Option<Driver>,
    /// Set by the pool that first sends on it.
    home: Option<Home>,
    /// When the certificates it was made with expire (`None`: plaintext).
    expires: Option<Instant>,
    /// Closed when idle this long.
    idle_timeout: Duration,
    /// When its last exchange ended (or it opened).
    last_used: Instant,
    /// Whether it already carried a request (a fresh connection that
    /// fails is not retried).
    reused: bool,
    /// The verified peer, for the request metrics.
    peer: Option<metrics::DestinationId>,
    /// A permit of the pools' connection limit, held while it is open.
    _slot: Option<OwnedSemaphorePermit>,
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
    /// Whether a new request may go on it: open, not idle past its
    /// timeout, certificates not expired.
    fn usable(&self, now: Instant) -> bool {
        // A connection already used stops taking requests a little before
        // its certificates expire, so that none races the far end's close.
        let margin = if self.reused {
            REUSE_MARGIN
        } else {
            Duration::ZERO
        };
        self.conn.is_some()
            && !self.sender.is_closed()
            && now < self.last_used + self.idle_timeout
            && self.expires.is_none_or(|e| now + margin < e)
    }

    /// When it must close if it stays idle: its idle timeout, or the
    /// expiry of its certificates.
    fn deadline(&self) -> Instant {
        let idle = self.last_used + self.idle_timeout;
        self.expires.map_or(idle, |e| e.min(idle))
    }

    /// The verified peer of a mesh connection.
    pub fn peer(&self) -> Option<&metrics::DestinationId> {
        self.peer.as_ref()
    }

    /// Runs hyper's connection future once (reads and writes what it
    /// can); drops it once it has finished, which hands any request still
    /// queued on it back to its sender.
    fn poll_conn(&mut self, cx: &mut Context<'_>) {
        if let Some(conn) = self.conn.as_mut()
            && let Poll::Ready(r) = conn.as_mut().poll(cx)
        {
            self.conn = None;
            match r {
                Ok(()) => tracing::debug!("pooled connection closed by the far end"),
                Err(e) => tracing::debug!(error = %e, "pooled connection ended with an error"),
            }
        }
    }

    /// HTTP/1.1 over `io`, driven by the holder of the link; it closes
    /// when idle for `idle_timeout`, or (after its in-flight request) at
    /// `expires`. `slot` is held until the connection closes.
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
        Ok(Link {
            sender,
            conn: Some(Box::pin(conn)),
            home: None,
            expires: expires.map(instant_of),
            idle_timeout,
            last_used: Instant::now(),
            reused: false,
            peer,
            _slot: slot,
        })
    }

    /// Sends `req` and waits for the response head (the caller bounds the
    /// wait), driving the connection meanwhile. The link travels with the
    /// response body, back to its pool when the body is dropped.
    async fn send(mut self, req: Request<RequestBody>) -> Result<Response<UpstreamBody>, Attempt> {
        // An idle link is ready at once; a fresh one once hyper has
        // polled its queue. A connection the far end closed while it sat in
        // the pool finds out in the poll below, before it writes anything
        // (hyper reads before it writes, and hands the request back).
        if !self.sender.is_ready() {
            let ready = std::future::poll_fn(|cx| {
                self.poll_conn(cx);
                if self.conn.is_none() {
                    return Poll::Ready(false);
                }
                self.sender.poll_ready(cx).map(|r| r.is_ok())
            })
            .await;
            if !ready {
                return Err(Attempt::Retry(Box::new(req)));
            }
        }
        self.reused = true;
        let sent = self.sender.try_send_request(req);
        tokio::pin!(sent);
        // The response comes only from the connection, polled here: its
        // channel needs no wake-up of this task (which would poll it once
        // more for nothing).
        let got = std::future::poll_fn(|cx| {
            self.poll_conn(cx);
            sent.as_mut()
                .poll(&mut Context::from_waker(std::task::Waker::noop()))
        })
        .await;
        match got {
            Ok(resp) => Ok(resp.map(|inner| UpstreamBody {
                inner,
                link: Some(self),
                ended: false,
            })),
            Err(mut e) => match e.take_message() {
                // hyper gave it back: the connection closed before writing it.
                Some(req) => Err(Attempt::Retry(Box::new(req))),
                None => Err(Attempt::Failed(e.into_error())),
            },
        }
    }

    /// Its response was read to the end: back to the pool if hyper is
    /// ready for the next request (it is, in the poll that read the end,
    /// unless the request body is still being sent); else a task drives
    /// it there first.
    fn exchange_done(mut self) {
        self.last_used = Instant::now();
        // Once more without a waker: whatever is left that needs none, and
        // hyper forgets this task's waker, which the next request's send
        // would otherwise wake (an idle link is polled by whoever takes it).
        self.poll_conn(&mut Context::from_waker(std::task::Waker::noop()));
        if self.sender.is_ready() {
            self.go_home();
        } else if self.conn.is_some()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(self.settle());
        }
    }

    /// Drives a link whose last exchange is not quite over (an upload the
    /// app answered early) until it can take a request, then sends it home;
    /// one that closes, or stays busy past its deadline, is dropped.
    async fn settle(mut self) {
        let deadline = self.deadline();
        let ready = std::future::poll_fn(|cx| {
            self.poll_conn(cx);
            if self.conn.is_none() {
                return Poll::Ready(false);
            }
            self.sender.poll_ready(cx).map(|r| r.is_ok())
        });
        if let Ok(true) = tokio::time::timeout_at(deadline, ready).await {
            self.last_used = Instant::now();
            self.go_home();
        }
    }

    fn go_home(self) {
        if let Some(home) = self.home.clone() {
            home(self);
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

/// `t` on tokio's clock (a time already past is now).
fn instant_of(t: SystemTime) -> Instant {
    let now = Instant::now();
    match t.duration_since(SystemTime::now()) {
        Ok(d) => now + d,
        Err(_) => now,
    }
}

/// The idle connections of a pool, by key. They wait unpolled; one task
/// per pool (the sweeper, running only while some are idle) closes those
/// idle past their timeout or whose certificates expire.
#[derive(Debug)]
pub struct IdleLinks<K> {
    links: Mutex<Parked<K>>,
    /// Signalled when a connection comes back with an earlier deadline
    /// than the sweeper sleeps until.
    sweep: Notify,
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

/// The idle connections, and when the sweeper wakes next (`None`: no
/// sweeper is running).
#[derive(Debug)]
struct Parked<K> {
    by_key: HashMap<K, Idle>,
    sweep_at: Option<Instant>,
}

/// One key's idle connections and dials under way. An entry stays while
/// connections come and go (its `Vec` is reused); the sweeper removes
/// empty ones.
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
            links: Mutex::new(Parked {
                by_key: HashMap::new(),
                sweep_at: None,
            }),
            sweep: Notify::new(),
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
        if let Some(idle) = map.by_key.get_mut(self.key) {
            idle.dialing = idle.dialing.saturating_sub(1);
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
        let Some(idle) = map.by_key.get_mut(key) else {
            map.by_key.insert(
                key.clone(),
                Idle {
                    links: Vec::new(),
                    dialing: 1,
                },
            );
            return Lease::Dial(DialGuard { pool: self, key });
        };
        let now = Instant::now();
        // Unusable ones close as they drop.
        if let Some(link) = std::iter::from_fn(|| idle.links.pop()).find(|l| l.usable(now)) {
            return Lease::Idle(link);
        }
        if idle.dialing >= self.max_dials {
            return Lease::Wait;
        }
        idle.dialing += 1;
        Lease::Dial(DialGuard { pool: self, key })
    }

    /// Idle connections open now.
    pub fn len(&self) -> usize {
        let map = self.links.lock().unwrap_or_else(|e| e.into_inner());
        map.by_key.values().map(|i| i.links.len()).sum()
    }

    /// Whether no idle connection is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
        // The common case first, without registering as a waiter: an
        // idle connection, or leave to dial.
        match self.lease(key) {
            Lease::Idle(link) => return Ok(link),
            Lease::Dial(guard) => return Self::dialed(guard, dial).await,
            Lease::Wait => {}
        }
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
                Lease::Dial(guard) => return Self::dialed(guard, dial).await,
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

    /// A new connection from `dial`, counted against `max_dials` until it
    /// is open (or failed).
    async fn dialed<D, F>(guard: DialGuard<'_, K>, dial: &D) -> Result<Link, PoolConnectError>
    where
        D: Fn() -> F,
        F: Future<Output = Result<Link, PoolConnectError>>,
    {
        // Boxed: the handshake's state is large and only a new connection
        // needs it, so the request's future (which hyper allocates per
        // connection) stays small.
        let link = Box::pin(dial()).await;
        drop(guard);
        link
    }
}

impl<K: std::hash::Hash + Eq + Clone + Send + Sync + 'static> IdleLinks<K> {
    /// Puts a connection back if it can still take requests (it is
    /// closed otherwise, as it drops), and has the sweeper close it at its
    /// deadline if no request takes it first.
    fn put(self: &Arc<Self>, key: &K, link: Link) {
        let now = Instant::now();
        if !link.usable(now) {
            return;
        }
        let deadline = link.deadline();
        let mut map = self.links.lock().unwrap_or_else(|e| e.into_inner());
        match map.by_key.get_mut(key) {
            Some(idle) => idle.links.push(link),
            None => {
                map.by_key.insert(
                    key.clone(),
                    Idle {
                        links: vec![link],
                        dialing: 0,
                    },
                );
            }
        }
        let sweeper = match map.sweep_at {
            None => Some(true),
            Some(at) if deadline < at => Some(false),
            Some(_) => None,
        };
        if sweeper.is_some() {
            map.sweep_at = Some(deadline);
        }
        drop(map);
        match sweeper {
            Some(true) => match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(Self::sweeper(Arc::downgrade(self)));
                }
                // No runtime (shutting down): nothing would close it.
                Err(_) => {
                    let mut map = self.links.lock().unwrap_or_else(|e| e.into_inner());
                    map.by_key.clear();
                    map.sweep_at = None;
                }
            },
            Some(false) => self.sweep.notify_one(),
            None => {}
        }
        self.signal();
    }

    /// Closes idle connections at their deadlines; ends when none is
    /// left (the next `put` starts another).
    async fn sweeper(pool: std::sync::Weak<Self>) {
        loop {
            let Some(p) = pool.upgrade() else {
                return;
            };
            let next = {
                let mut map = p.links.lock().unwrap_or_else(|e| e.into_inner());
                let now = Instant::now();
                let mut next: Option<Instant> = None;
                map.by_key.retain(|_, idle| {
                    // Closed as they drop.
                    idle.links.retain(|l| l.usable(now));
                    for l in &idle.links {
                        let d = l.deadline();
                        next = Some(next.map_or(d, |n| n.min(d)));
                    }
                    !idle.links.is_empty() || idle.dialing > 0
                });
                map.sweep_at = next;
                next
            };
            let Some(next) = next else {
                return;
            };
            let woken = p.sweep.notified();
            tokio::select! {
                () = tokio::time::sleep_until(next) => {}
                () = woken => {}
            }
        }
    }

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
                        pool.put(&k, l);
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
