//! Outbound HTTP: serves an app's HTTP/1.1 connection (after `detect`) and
//! carries each request as it is, HTTP/1.1 with its hop-by-hop fields
//! removed, to the peer sidecar on a pooled mTLS connection of
//! `http::pool` (one exchange at a time per connection, as nginx and
//! HAProxy do), so no request waits for another's, and nothing is
//! translated (the peer parses and authorizes each request, as from any
//! HTTP/1.1 client).
//! `Upgrade` and `CONNECT` requests do not use the pool: each gets its own
//! HTTP/1.1 connection over mTLS (see `tunnel` for why). Every answer the sidecar gives itself comes
//! from `http::errors`, as a gRPC status for gRPC callers.
//!
//! A destination discovery knows as a service is balanced per request
//! ([`PeerTarget::Service`]): each request goes to the endpoint the
//! balancer picks, on that endpoint's pool, the handshake holding it to
//! the endpoint's own SPIFFE ID. A request that could not be sent at all
//! (connect or handshake failure) is sent once more to another endpoint
//! when it has no body to replay (it never reached an app); nothing that
//! may have reached an app is retried.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::uri::Authority;
use http::{Request, Response, Uri, Version};
use http_body_util::Either;
use hyper::body::Body as _;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rampart_discovery::balance::{Balancer, Outcome, Pick, Refusal};
use rampart_identity::SpiffeId;

use super::ProxyBody;
use super::body::{Counted, StreamCount};
use super::errors::LocalError;
use super::headers::strip_hop_by_hop;
use super::pool::UpstreamBody;
use super::pool::{Endpoint, Expect};
use super::tunnel::{Tunnel, TunnelTask};
use crate::access::Pending;
use crate::config::Direction;
use crate::drain::{Watch, serve_gracefully};
use crate::metrics;
use crate::server::Shared;
use crate::tls::Io;

/// Where an app connection's requests go.
#[derive(Debug, Clone)]
pub enum PeerTarget {
    /// The original destination, whose server must match client
    /// configuration `i` (a server rule).
    Rule(usize),
    /// The endpoints of a discovered service, one picked per request.
    Service(Arc<Balancer>),
    /// One discovered endpoint (a pod address) and its SPIFFE ID.
    Endpoint(SocketAddr, SpiffeId),
}

/// Serves an app's HTTP/1.1 connection from `source` to `dst`, whose
/// requests go to `target`.
pub async fn serve<S: Io>(
    stream: S,
    source: SocketAddr,
    dst: SocketAddr,
    target: PeerTarget,
    shared: Arc<Shared>,
    mut watch: Watch,
) {
    let Ok(authority) = Authority::try_from(dst.to_string()) else {
        // Invariant: a socket address is a valid authority.
        return;
    };
    let local_id = shared.identity().map(|c| c.svid.id.clone());
    // The destination label is the service, once discovery knows it.
    let dst_label = match &target {
        PeerTarget::Service(b) => b.name().to_owned(),
        PeerTarget::Rule(_) | PeerTarget::Endpoint(..) => dst.to_string(),
    };
    let series = metrics::PerDestination::new(
        Direction::Outbound,
        local_id.as_ref().map(|id| id.as_str()),
        &dst_label,
    );
    let app = Arc::new(AppConn {
        shared: shared.clone(),
        metrics: series,
        ends: Ends {
            source,
            destination: dst,
        },
        target,
        authority,
        tunnel: TunnelTask::default(),
    });
    // An app's keep-alive connection is closed after `http_idle_timeout`
    // without a request in flight, not at the header read timeout (which
    // the guard keeps from the first byte of a head).
    let limits = &shared.config.limits;
    let streams = StreamCount::new(limits.http_idle_timeout);
    let a = app.clone();
    let counts = streams.clone();
    let service = hyper::service::service_fn(move |req| {
        let a = a.clone();
        let stream = Some(counts.open());
        let connect = req.method() == http::Method::CONNECT;
        async move {
            let mut resp = send(&a, req).await;
            super::headers::close_when_draining(&mut resp, a.shared.is_draining(), connect);
            Ok::<_, Infallible>(resp.map(|b| Counted::new(b, stream)))
        }
    });
    let conn = shared
        .outbound_http
        .server
        .serve_connection(
            TokioIo::new(
                crate::smuggling::SmugglingGuard::new(stream, limits.http_max_header_bytes)
                    .with_head_timeout(limits.http_header_read_timeout),
            ),
            service,
        )
        .with_upgrades();
    let grace = limits.http1_drain_grace.min(limits.drain_timeout);
    let result = serve_gracefully!(conn, watch, streams.idle_expired(), grace);
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
    metrics: metrics::PerDestination,
    ends: Ends,
    /// Where requests go (and the server identity to expect).
    target: PeerTarget,
    authority: Authority,
    tunnel: TunnelTask,
}

async fn send(app: &AppConn, mut req: Request<Incoming>) -> Response<ProxyBody> {
    let shared = &*app.shared;
    let trace = shared.config.observe.tracing.as_ref().map(|t| {
        let span = t.request(
            Direction::Outbound,
            req.headers(),
            req.method(),
            req.uri().path(),
        );
        span.inject(req.headers_mut());
        span
    });
    let grpc = super::is_grpc(req.headers());
    let mut event = Pending::open(
        &shared.access,
        Direction::Outbound,
        app.ends.source,
        app.ends.destination,
    );
    if event.log_enabled() {
        event.request(
            req.method(),
            req.headers(),
            &shared.config.observe.access_headers,
        );
        event.path(req.uri().path());
    }
    let span = tracing::debug_span!(
        "request",
        direction = "outbound",
        http.method = %req.method(),
        http.path = req.uri().path(),
    );
    let may_switch = super::tunnel::may_switch(req.method(), req.version(), req.headers());
    let connect = req.method() == http::Method::CONNECT;
    let result = match Tunnel::of(req.method(), req.version(), req.headers()) {
        None => tracing::Instrument::instrument(to_peer(app, req), span).await,
        // Boxed: a tunnel dials and handshakes in place, and hyper
        // allocates room for this future once per app connection.
        Some(t) => tracing::Instrument::instrument(Box::pin(tunnel(app, req, t)), span).await,
    };
    let (mut resp, destination) = match result {
        Ok(r) => r,
        Err(e) => {
            let wire = e.wire();
            match &e {
                LocalError::PoolFull(limit) => tracing::warn!(
                    limit,
                    "request refused: pooled connection limit reached (limits.http_pool_max_connections)"
                ),
                _ => tracing::info!(
                    reason = wire.reason.as_str(),
                    error = %e,
                    "request to peer sidecar failed"
                ),
            }
            metrics::http_local_error(Direction::Outbound, wire.reason);
            (e.into_response(grpc, None), None)
        }
    };
    if may_switch {
        super::tunnel::close_unless_switched(connect, &mut resp);
    }
    let destination = destination.as_ref();
    app.metrics
        .get(destination)
        .record(resp.status(), event.elapsed());
    if let Some(span) = trace {
        span.finish(resp.status(), destination.map(|d| &*d.0));
    }
    event.response(resp.status(), resp.headers());
    resp
}

/// Readies an app's request for the peer sidecar (HTTP/1.1, origin form,
/// `Host` kept or set, hop-by-hop fields removed) and sends it on the pool
/// through the forward stage.
async fn to_peer(
    app: &AppConn,
    req: Request<Incoming>,
) -> Result<(Response<ProxyBody>, Option<metrics::DestinationId>), LocalError> {
    let shared = &*app.shared;
    // A pooled connection outlives the identity it was made with: without
    // one now, send nothing on it (fail closed).
    if shared.identity().is_none() {
        return Err(LocalError::NoIdentity);
    }
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if !parts.headers.contains_key(header::HOST) {
        // HTTP/1.0 without Host: name the destination the app dialed.
        let host = HeaderValue::from_str(app.authority.as_str()).map_err(|_| LocalError::NoPath)?;
        parts.headers.insert(header::HOST, host);
    }
    if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
        // Absolute form (a proxy-style client): the peer gets origin form.
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .ok_or(LocalError::NoPath)?;
        parts.uri = Uri::from(path);
    }
    parts.version = Version::HTTP_11;
    let timeout = shared.config.limits.http_response_timeout;
    let hop = &shared.outbound_http;
    let (resp, peer) = match &app.target {
        PeerTarget::Rule(index) => {
            let endpoint = Endpoint {
                addr: app.ends.destination,
                expect: Expect::Rule(*index),
            };
            let req = Request::from_parts(parts, body);
            crate::forward::peer_request(hop, &endpoint, req, timeout).await?
        }
        PeerTarget::Endpoint(addr, id) => {
            let endpoint = Endpoint {
                addr: *addr,
                expect: Expect::Id(id.clone()),
            };
            let req = Request::from_parts(parts, body);
            crate::forward::peer_request(hop, &endpoint, req, timeout).await?
        }
        PeerTarget::Service(b) => balanced(shared, b, parts, body).await?,
    };
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Ok((Response::from_parts(parts, Either::Left(body)), peer))
}

/// Whether a failed exchange never reached the endpoint's app: the
/// connection could not be opened or its handshake failed. Such a request
/// may go to another endpoint.
fn refusal(e: &LocalError) -> Option<Refusal> {
    match e {
        LocalError::PeerHandshake(_) => Some(Refusal::Handshake),
        LocalError::PeerConnect(_) => Some(Refusal::Connect),
        LocalError::PeerExchange(e) if e.is_connect() => Some(Refusal::Connect),
        _ => None,
    }
}

/// Sends a request to an endpoint of `balancer`'s service, picked per
/// request; once more to another endpoint when the first could not be
/// sent to and the request has no body (nothing reached an app, and the
/// head can be rebuilt).
async fn balanced(
    shared: &Shared,
    balancer: &Balancer,
    parts: http::request::Parts,
    body: Incoming,
) -> Result<(Response<UpstreamBody>, Option<metrics::DestinationId>), LocalError> {
    let timeout = shared.config.limits.http_response_timeout;
    let hop = &shared.outbound_http;
    let endpoint = |p: &Pick| Endpoint {
        addr: p.endpoint().addr,
        expect: Expect::Id(p.id().clone()),
    };
    let replayable = body.is_end_stream();
    let mut first = match balancer.pick(&[]) {
        Ok(p) => p,
        Err(e) => {
            balancer.metrics().no_endpoint();
            return Err(LocalError::NoEndpoint(e));
        }
    };
    // What a second attempt needs of the head (extensions are dropped:
    // a request without a body carries none the peer needs).
    let again = replayable.then(|| {
        (
            parts.method.clone(),
            parts.uri.clone(),
            parts.headers.clone(),
        )
    });
    let started = tokio::time::Instant::now();
    let req = Request::from_parts(parts, body);
    let sent = crate::forward::peer_request(hop, &endpoint(&first), req, timeout).await;
    let e = match sent {
        Ok(r) => {
            first.finish(Outcome::Answered);
            balancer.metrics().answered(started.elapsed());
            return Ok(r);
        }
        Err(e) => e,
    };
    let Some(why) = refusal(&e) else {
        if !matches!(e, LocalError::PoolFull(_) | LocalError::NoIdentity) {
            first.finish(Outcome::Failed);
            balancer.metrics().failed();
        }
        return Err(e);
    };
    first.finish(Outcome::Refused(why));
    tracing::info!(
        endpoint = %first.endpoint().addr,
        expected.id = %first.id(),
        error = %e,
        "endpoint refused"
    );
    let Some((method, uri, headers)) = again else {
        balancer.metrics().failed();
        return Err(e);
    };
    let mut second = match balancer.pick(&[first.state()]) {
        Ok(p) => p,
        Err(_) => {
            balancer.metrics().failed();
            return Err(e);
        }
    };
    drop(first);
    balancer.metrics().retried();
    let mut req = Request::new(());
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    *req.version_mut() = Version::HTTP_11;
    let started = tokio::time::Instant::now();
    match crate::forward::peer_request_empty(hop, &endpoint(&second), req, timeout).await {
        Ok(r) => {
            second.finish(Outcome::Answered);
            balancer.metrics().answered(started.elapsed());
            Ok(r)
        }
        Err(e) => {
            match refusal(&e) {
                Some(why) => second.finish(Outcome::Refused(why)),
                None => second.finish(Outcome::Failed),
            }
            balancer.metrics().failed();
            Err(e)
        }
    }
}

/// Carries a tunnel request (upgrade or CONNECT) to the peer sidecar on a
/// dedicated HTTP/1.1 connection over mTLS, verified like any other.
async fn tunnel(
    app: &AppConn,
    req: Request<Incoming>,
    tunnel: Tunnel,
) -> Result<(Response<ProxyBody>, Option<metrics::DestinationId>), LocalError> {
    let shared = &*app.shared;
    let Some(configs) = shared.identity() else {
        return Err(LocalError::NoIdentity);
    };
    // A tunnel is one connection: its endpoint is picked once, held in
    // flight while the tunnel is being opened.
    let mut pick = None;
    let (dst, cfg) = match &app.target {
        PeerTarget::Rule(i) => (app.ends.destination, configs.client.get(*i).cloned()),
        PeerTarget::Endpoint(addr, id) => (*addr, configs.endpoints.for_id(id)),
        PeerTarget::Service(b) => {
            let p = b.pick(&[]).map_err(|e| {
                b.metrics().no_endpoint();
                LocalError::NoEndpoint(e)
            })?;
            let target = (p.endpoint().addr, configs.endpoints.for_id(p.id()));
            pick = Some(p);
            target
        }
    };
    drop(configs);
    let Some(cfg) = cfg else {
        return Err(LocalError::NoIdentity);
    };
    let (mut parts, body) = req.into_parts();
    let Some(downstream) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() else {
        tracing::error!("no upgrade handle on a tunnel request");
        return Err(LocalError::NotUpgradable);
    };
    tunnel.prepare_request(&mut parts.headers);
    let opened = crate::forward::peer_tunnel(
        Request::from_parts(parts, body),
        dst,
        cfg,
        &tunnel,
        downstream,
        &shared.config.limits,
    )
    .await;
    if let Some(p) = pick.as_mut() {
        p.finish(match &opened {
            Ok(_) => Outcome::Answered,
            Err(e) => refusal(e).map_or(Outcome::Failed, Outcome::Refused),
        });
    }
    let (mut resp, task) = opened?;
    if let Some(task) = task {
        app.tunnel.set(task);
    }
    let peer = resp.extensions_mut().remove::<metrics::DestinationId>();
    Ok((resp, peer))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;
    use http_body_util::Empty;
    use rampart_authz::Authorizer;

    #[tokio::test]
    async fn without_an_identity_callers_get_503_or_grpc_unavailable() {
        let (_tx, identity) = tokio::sync::watch::channel(None);
        let shared = Shared::for_tests(testing::config(Authorizer::default()), identity);
        let dst: SocketAddr = "10.0.0.2:8080".parse().unwrap();
        let exchange = |grpc: bool| {
            let shared = shared.clone();
            async move {
                let (near, far) = tokio::io::duplex(64 * 1024);
                let drain = crate::drain::Drain::new();
                tokio::spawn(serve(
                    near,
                    testing::client_addr(),
                    dst,
                    PeerTarget::Rule(0),
                    shared,
                    drain.watch(),
                ));
                let mut req = Request::get("/data")
                    .header("host", "backend")
                    .body(Empty::new())
                    .unwrap();
                if grpc {
                    req.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        HeaderValue::from_static("application/grpc"),
                    );
                }
                testing::http1_exchange(far, req).await
            }
        };
        let (head, body) = exchange(false).await;
        assert_eq!(head.status, 503);
        assert!(
            String::from_utf8_lossy(&body).contains("no identity"),
            "{body:?}"
        );
        // gRPC callers of the outbound sidecar get a gRPC status, not text.
        let (head, body) = exchange(true).await;
        assert_eq!(head.status, 200);
        assert_eq!(head.headers["grpc-status"], "14");
        assert_eq!(head.headers["content-type"], "application/grpc");
        assert!(body.is_empty());
    }
}
