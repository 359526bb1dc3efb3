//! The forward stage, for every protocol: the one place that talks to the
//! app or the peer sidecar, per connection and per request.
//!
//! Per connection: [`connection`] (inbound opaque TCP, from a
//! [`Permitted`]), [`passthrough`] (outbound, outside the mesh), [`to_peer`]
//! over a connection from [`dial_peer`] (outbound, mTLS). Per request:
//! [`request`] (inbound, from a [`PermittedRequest`], on the app
//! connection pool of `http::pool` or hyper's HTTP/2 pool),
//! [`peer_request`] (outbound, on the hop pool), and the tunnels [`app_tunnel`] and
//! [`peer_tunnel`]. The raw building blocks, `connect` and `splice`, are
//! private to this module: nothing else opens a socket to a target or
//! moves bytes between two streams.
//!
//! Splices copy both ways until both directions have closed, propagating
//! half-close (a FIN or TLS close_notify in one direction shuts down only
//! that direction).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use rampart_authz::Permit;
use rampart_identity::PeerIdentity;
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::authz::{Permitted, PermittedRequest};
use crate::config::Direction;
use crate::http::ProxyBody;
use crate::http::body::{RequestBody, Waited, response_within};
use crate::http::errors::LocalError;
use crate::http::pool::{
    Endpoint, IdleLinks, Link, OutboundHttp, PoolConnectError, SendError, UpstreamBody,
};
use crate::http::tunnel::{self, Tunnel};
use crate::metrics::{self, ForwardFailure, HandshakeResult};
use crate::tls::{self, ClientTls, HandshakeError};

/// Opens [`Permitted`] and [`PermittedRequest`] values. Its field is
/// private to this module, so only `forward` can unpack a permit from what
/// it was issued for.
#[derive(Debug)]
pub struct ForwardKey(());

/// Why a target could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The target refused or reset the connection.
    #[error("connecting to {0}: {1}")]
    Refused(SocketAddr, std::io::Error),
    /// The target did not answer in time.
    #[error("connecting to {0}: timed out")]
    Timeout(SocketAddr),
}

impl ConnectError {
    /// The metric label.
    pub fn reason(&self) -> ForwardFailure {
        match self {
            ConnectError::Refused(..) => ForwardFailure::ConnectRefused,
            ConnectError::Timeout(_) => ForwardFailure::ConnectTimeout,
        }
    }
}

/// Bytes moved by a splice.
#[derive(Debug, Clone, Copy, Default)]
pub struct Transferred {
    /// Client to target.
    pub to_target: u64,
    /// Target to client.
    pub to_client: u64,
}

/// A failure while forwarding a connection.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The target could not be reached.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The splice ended with an I/O error (a reset, usually).
    #[error("stream error: {0}")]
    Io(std::io::Error),
    /// A policy reload refused the connection; it was closed.
    #[error("closed: the reloaded policies refuse this connection")]
    Revoked,
}

/// Forwards a permitted inbound connection to the app at `target`, until
/// both sides close or a policy reload refuses it. Taking [`Permitted`]
/// makes forwarding without authorization a type error.
pub async fn connection(
    permitted: Permitted,
    target: SocketAddr,
    connect_timeout: Duration,
) -> Result<Transferred, ForwardError> {
    let app = connect(target, connect_timeout).await?;
    let (stream, mut standing, _permit) = permitted.into_parts(ForwardKey(()));
    tokio::select! {
        t = splice(stream, app) => t.map_err(ForwardError::Io),
        // Dropping the splice closes both sockets.
        () = standing.revoked() => Err(ForwardError::Revoked),
    }
}

/// Forwards an outbound connection outside the mesh as plaintext.
pub async fn passthrough<S>(
    stream: S,
    dst: SocketAddr,
    connect_timeout: Duration,
) -> Result<Transferred, ForwardError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let upstream = connect(dst, connect_timeout).await?;
    splice(stream, upstream).await.map_err(ForwardError::Io)
}

/// Why a peer sidecar could not be dialed.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// It could not be reached.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The handshake failed (the identity is not the expected one, ...).
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
}

/// Dials the peer sidecar at `dst` and originates mTLS, the server's
/// identity checked by `config` during the handshake (counted in
/// `rampart_tls_handshakes_total`).
pub async fn dial_peer(
    dst: SocketAddr,
    config: Arc<ClientConfig>,
    connect_timeout: Duration,
    handshake_timeout: Duration,
) -> Result<(ClientTls, PeerIdentity), PeerError> {
    let tcp = connect(dst, connect_timeout).await?;
    match tls::originate(tcp, dst, config, handshake_timeout).await {
        Ok(x) => {
            metrics::handshake(Direction::Outbound, HandshakeResult::Ok);
            Ok(x)
        }
        Err(e) => {
            metrics::handshake(Direction::Outbound, e.result());
            Err(e.into())
        }
    }
}

/// Splices an app's outbound connection with its mTLS connection to the
/// peer sidecar.
pub async fn to_peer<S, P>(stream: S, peer: P) -> std::io::Result<Transferred>
where
    S: AsyncRead + AsyncWrite + Unpin,
    P: AsyncRead + AsyncWrite + Unpin,
{
    splice(stream, peer).await
}

/// How a permitted request goes to the app.
pub enum AppRoute<'a> {
    /// HTTP/1.1 at `app` on an idle pooled app connection or a new one.
    Http1 {
        /// The app connection pool.
        pool: &'a Arc<IdleLinks<SocketAddr>>,
        /// The app.
        app: SocketAddr,
        /// Bounds a new connection.
        connect_timeout: Duration,
        /// How long an app connection may stay idle in the pool.
        idle_timeout: Duration,
    },
    /// HTTP/2 on hyper's pool (ports declared `http2` or `grpc`, or
    /// HTTP/2 callers).
    Http2(&'a Client<HttpConnector, RequestBody>),
}

/// Sends a permitted request to the app and waits (up to `timeout` after
/// the body ended) for its response head. Taking [`PermittedRequest`]
/// makes forwarding an unauthorized request a type error. The permit
/// comes back for the response's header effects.
pub async fn request(
    route: AppRoute<'_>,
    permitted: PermittedRequest,
    timeout: Duration,
) -> Result<(Response<UpstreamBody>, Permit), LocalError> {
    let (mut parts, body, permit) = permitted.into_parts(ForwardKey(()));
    // The start of the body, read for the policies (`with_request_body`).
    let ahead = parts.extensions.remove::<crate::http::body::ReadAhead>();
    let (body, ended) = RequestBody::new(body);
    let req = Request::from_parts(parts, body.after(ahead));
    let progress = ended.clone();
    // The client's chunked framing broke mid-body: 400, not 502.
    let malformed = || progress.as_ref().is_some_and(|p| p.client_failed());
    match route {
        AppRoute::Http1 {
            pool,
            app,
            connect_timeout,
            idle_timeout,
        } => {
            let dial = || async move {
                let tcp = connect(app, connect_timeout).await?;
                Ok(Link::establish(tcp, None, idle_timeout, None, None).await?)
            };
            match response_within(timeout, ended, pool.send(&app, req, dial)).await {
                Err(Waited::NoResponse) => Err(LocalError::AppTimeout),
                Err(Waited::UploadStalled) => Err(LocalError::UploadStalled),
                Ok(Err(_)) if malformed() => Err(LocalError::MalformedBody),
                Ok(Err(SendError::Connect(PoolConnectError::App(c)))) => {
                    Err(LocalError::AppConnect(c))
                }
                Ok(Err(e)) => Err(LocalError::AppUnreachable(Box::new(e))),
                Ok(Ok((r, _))) => Ok((r, permit)),
            }
        }
        AppRoute::Http2(client) => match response_within(timeout, ended, client.request(req)).await
        {
            Err(Waited::NoResponse) => Err(LocalError::AppTimeout),
            Err(Waited::UploadStalled) => Err(LocalError::UploadStalled),
            Ok(Err(_)) if malformed() => Err(LocalError::MalformedBody),
            Ok(Err(e)) => Err(LocalError::AppUnreachable(Box::new(e))),
            Ok(Ok(r)) => Ok((r.map(UpstreamBody::from), permit)),
        },
    }
}

/// Sends an app's request to the peer sidecar at `endpoint` as HTTP/1.1,
/// on an idle pooled mTLS connection or a new one from [`dial_peer`];
/// waits (up to `timeout` after the body ended) for the response head.
/// Returns it with the verified peer.
pub async fn peer_request(
    hop: &OutboundHttp,
    endpoint: &Endpoint,
    req: Request<Incoming>,
    timeout: Duration,
) -> Result<(Response<UpstreamBody>, Option<metrics::DestinationId>), LocalError> {
    let (parts, body) = req.into_parts();
    let (body, ended) = RequestBody::new(body);
    send_to_peer(
        hop,
        endpoint,
        Request::from_parts(parts, body),
        ended,
        timeout,
    )
    .await
}

/// Sends a request without a body (one rebuilt to go to another endpoint
/// after the first could not be reached) like [`peer_request`].
pub async fn peer_request_empty<B>(
    hop: &OutboundHttp,
    endpoint: &Endpoint,
    req: Request<B>,
    timeout: Duration,
) -> Result<(Response<UpstreamBody>, Option<metrics::DestinationId>), LocalError> {
    let (parts, _) = req.into_parts();
    send_to_peer(
        hop,
        endpoint,
        Request::from_parts(parts, RequestBody::empty()),
        None,
        timeout,
    )
    .await
}

async fn send_to_peer(
    hop: &OutboundHttp,
    endpoint: &Endpoint,
    req: Request<RequestBody>,
    ended: Option<Arc<crate::http::body::Progress>>,
    timeout: Duration,
) -> Result<(Response<UpstreamBody>, Option<metrics::DestinationId>), LocalError> {
    let progress = ended.clone();
    let sent = hop.send(endpoint, req);
    match response_within(timeout, ended, sent).await {
        Err(Waited::NoResponse) => Err(LocalError::PeerTimeout),
        Err(Waited::UploadStalled) => Err(LocalError::UploadStalled),
        Ok(Err(_)) if progress.is_some_and(|p| p.client_failed()) => Err(LocalError::MalformedBody),
        Ok(Ok(r)) => Ok(r),
        // The pool says why it could not connect.
        Ok(Err(SendError::Connect(c))) => Err(match c {
            PoolConnectError::NoIdentity => LocalError::NoIdentity,
            PoolConnectError::PoolFull(max) => LocalError::PoolFull(max),
            // Waited a connect timeout for a connection to be opened.
            PoolConnectError::DialBacklog(_) => LocalError::PeerTimeout,
            PoolConnectError::Peer(PeerError::Handshake(h)) => LocalError::PeerHandshake(h),
            PoolConnectError::Peer(PeerError::Connect(c)) | PoolConnectError::App(c) => {
                LocalError::PeerConnect(c)
            }
            e @ PoolConnectError::Http(_) => LocalError::PeerExchange(SendError::Connect(e)),
        }),
        Ok(Err(e)) => Err(LocalError::PeerExchange(e)),
    }
}

/// Opens a permitted tunnel (upgrade or CONNECT) to the app at `app` on a
/// connection of its own; see [`tunnel::open`].
pub async fn app_tunnel(
    permitted: PermittedRequest,
    app: SocketAddr,
    tunnel: &Tunnel,
    downstream: OnUpgrade,
    connect_timeout: Duration,
    response_timeout: Duration,
) -> Result<(Response<ProxyBody>, Option<JoinHandle<()>>), LocalError> {
    let (parts, body, _permit) = permitted.into_parts(ForwardKey(()));
    let io = connect(app, connect_timeout)
        .await
        .map_err(LocalError::AppConnect)?;
    tunnel::open(
        io,
        Request::from_parts(parts, body),
        tunnel,
        downstream,
        response_timeout,
        Direction::Inbound,
    )
    .await
    .map_err(LocalError::Tunnel)
}

/// Carries an app's tunnel request to the peer sidecar at `dst` on a
/// dedicated HTTP/1.1 connection over mTLS, verified like any other.
pub async fn peer_tunnel(
    req: Request<Incoming>,
    dst: SocketAddr,
    config: Arc<ClientConfig>,
    tunnel: &Tunnel,
    downstream: OnUpgrade,
    limits: &crate::config::Limits,
) -> Result<(Response<ProxyBody>, Option<JoinHandle<()>>), LocalError> {
    let (tls, peer) = dial_peer(
        dst,
        config,
        limits.connect_timeout,
        limits.handshake_timeout,
    )
    .await
    .map_err(|e| match e {
        PeerError::Connect(c) => LocalError::PeerConnect(c),
        PeerError::Handshake(h) => LocalError::PeerHandshake(h),
    })?;
    tracing::debug!(peer.id = %peer.principal(), tunnel = tunnel.label(), "tunnel connection opened");
    let (mut resp, task) = tunnel::open(
        tls,
        req,
        tunnel,
        downstream,
        limits.http_response_timeout,
        Direction::Outbound,
    )
    .await
    .map_err(LocalError::PeerTunnel)?;
    // The verified peer, for the request metrics.
    resp.extensions_mut()
        .insert(metrics::DestinationId(peer.principal().into()));
    Ok((resp, task))
}

/// Splices the two upgraded halves of an established tunnel (both ends
/// were authorized or verified when the tunnel was asked for).
pub(crate) async fn tunnel_bytes<A, B>(down: A, up: B, direction: Direction, label: &'static str)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    match splice(down, up).await {
        Ok(t) => {
            metrics::bytes(direction, t.to_target, t.to_client);
            tracing::debug!(
                tunnel = label,
                bytes.to_target = t.to_target,
                bytes.to_client = t.to_client,
                "tunnel closed"
            );
        }
        Err(e) => tracing::debug!(tunnel = label, error = %e, "tunnel ended with an error"),
    }
}

/// Connects to `target` with a timeout.
async fn connect(target: SocketAddr, timeout: Duration) -> Result<TcpStream, ConnectError> {
    let s = tokio::time::timeout(timeout, TcpStream::connect(target))
        .await
        .map_err(|_| ConnectError::Timeout(target))?
        .map_err(|e| ConnectError::Refused(target, e))?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// Copies bytes both ways until both directions have closed.
async fn splice<A, B>(mut client: A, mut target: B) -> std::io::Result<Transferred>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    // 16 KiB per direction: one TLS record's worth, bounded per connection.
    let (to_target, to_client) =
        tokio::io::copy_bidirectional_with_sizes(&mut client, &mut target, 16 * 1024, 16 * 1024)
            .await?;
    Ok(Transferred {
        to_target,
        to_client,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::{AccessLog, Pending};
    use crate::policy::PolicyCell;
    use crate::testing::{self, Pki, id};
    use rampart_authz::{Authorizer, DefaultAction};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn allow(peers: &[&str]) -> Authorizer {
        Authorizer::from_port_allowlist(
            [(8080, peers.iter().map(|p| id(p)).collect())],
            DefaultAction::Deny,
        )
    }

    /// An app that echoes every byte back.
    async fn echo_app() -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn round_trip<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, msg: &[u8]) {
        s.write_all(msg).await.unwrap();
        s.flush().await.unwrap();
        let mut buf = vec![0; msg.len()];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(buf, msg);
    }

    #[tokio::test]
    async fn a_permitted_connection_lives_until_a_reload_refuses_it() {
        let pki = Pki::new();
        let app = echo_app().await;
        let log = AccessLog::new(false, 10);
        let cell = Arc::new(PolicyCell::new(allow(&["client"])));
        let (authn, mut peer) =
            testing::authenticated(&pki, "server", "client", "10.0.0.2:8080".parse().unwrap())
                .await;
        let mut event = Pending::open(&log, Direction::Inbound, authn.client.0, authn.orig_dst.0);
        let permitted = crate::authz::connection(authn, 8080, &cell, &mut event).unwrap();
        let forwarded =
            tokio::spawn(async move { connection(permitted, app, Duration::from_secs(5)).await });
        round_trip(&mut peer, b"before").await;
        // A reload that still allows the peer changes nothing.
        cell.replace(allow(&["client", "other"]));
        round_trip(&mut peer, b"still allowed").await;
        // One that no longer does closes the connection.
        cell.replace(allow(&["other"]));
        let result = tokio::time::timeout(Duration::from_secs(5), forwarded)
            .await
            .expect("closed in time")
            .unwrap();
        assert!(matches!(result, Err(ForwardError::Revoked)), "{result:?}");
        let mut buf = [0; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), peer.read(&mut buf))
            .await
            .expect("the peer sees the close");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }

    #[tokio::test]
    async fn an_unreachable_app_is_a_connect_error() {
        let pki = Pki::new();
        let log = AccessLog::new(false, 10);
        let cell = Arc::new(PolicyCell::new(allow(&["client"])));
        let (authn, _peer) =
            testing::authenticated(&pki, "server", "client", "10.0.0.2:8080".parse().unwrap())
                .await;
        let mut event = Pending::open(&log, Direction::Inbound, authn.client.0, authn.orig_dst.0);
        let permitted = crate::authz::connection(authn, 8080, &cell, &mut event).unwrap();
        // A port nothing listens on.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let e = connection(permitted, closed, Duration::from_secs(5))
            .await
            .expect_err("refused");
        match e {
            ForwardError::Connect(c) => assert_eq!(c.reason(), ForwardFailure::ConnectRefused),
            other => panic!("{other}"),
        }
    }

    #[tokio::test]
    async fn passthrough_and_to_peer_splice_both_ways() {
        let app = echo_app().await;
        let (mut near, far) = tokio::io::duplex(1024);
        let t = tokio::spawn(passthrough(far, app, Duration::from_secs(5)));
        round_trip(&mut near, b"outside the mesh").await;
        near.shutdown().await.unwrap();
        let moved = t.await.unwrap().unwrap();
        assert_eq!((moved.to_target, moved.to_client), (16, 16));

        let (mut app_side, sidecar_in) = tokio::io::duplex(1024);
        let (sidecar_out, mut peer_side) = tokio::io::duplex(1024);
        let t = tokio::spawn(to_peer(sidecar_in, sidecar_out));
        app_side.write_all(b"to the peer").await.unwrap();
        let mut buf = [0; 11];
        peer_side.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"to the peer");
        drop(app_side);
        drop(peer_side);
        let moved = t.await.unwrap().unwrap();
        assert_eq!(moved.to_target, 11);
    }
}
