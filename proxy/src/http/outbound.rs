//! Outbound HTTP: serves an app's HTTP/1.1 connection (after `detect`) and
//! carries each request over HTTP/2 to the peer sidecar, on the pooled mTLS
//! connection of `http::pool`. The peer sidecar turns them back into
//! HTTP/1.1 for its app (`headers::ORIG_PROTO`). `Upgrade` and `CONNECT`
//! requests do not use the pool: each gets its own HTTP/1.1 connection over
//! mTLS (see `tunnel` for why). Every answer the sidecar gives itself comes
//! from `http::errors`, as a gRPC status for gRPC callers.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::header::HeaderValue;
use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri, Version};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::ProxyBody;
use super::body::{Counted, StreamCount};
use super::errors::LocalError;
use super::headers::{ORIG_PROTO, strip_hop_by_hop};
use super::tunnel::{Tunnel, TunnelTask};
use crate::access::Pending;
use crate::config::Direction;
use crate::drain::{Watch, serve_gracefully};
use crate::metrics;
use crate::server::Shared;
use crate::tls::Io;

/// Serves an app's HTTP/1.1 connection from `source` to `dst`, whose
/// server must match client configuration `index`.
pub async fn serve<S: Io>(
    stream: S,
    source: SocketAddr,
    dst: SocketAddr,
    index: usize,
    shared: Arc<Shared>,
    mut watch: Watch,
) {
    let Ok(authority) = Authority::try_from(dst.to_string()) else {
        // Invariant: a socket address is a valid authority.
        return;
    };
    let local_id = shared.identity().map(|c| c.svid.id.clone());
    let series = metrics::PerDestination::new(
        Direction::Outbound,
        local_id.as_ref().map(|id| id.as_str()),
        &dst.to_string(),
    );
    let app = Arc::new(AppConn {
        shared: shared.clone(),
        metrics: series,
        ends: Ends {
            source,
            destination: dst,
        },
        index,
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
        async move { Ok::<_, Infallible>(send(&a, req).await.map(|b| Counted::new(b, stream))) }
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
    let result = serve_gracefully!(conn, watch, streams.idle_expired());
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
    /// The client configuration (expected server identity).
    index: usize,
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
        Some(t) => tracing::Instrument::instrument(tunnel(app, req, t), span).await,
    };
    let mut resp = match result {
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
            e.into_response(grpc, None)
        }
    };
    if may_switch {
        super::tunnel::close_unless_switched(connect, &mut resp);
    }
    let destination = resp.extensions().get::<metrics::DestinationId>();
    app.metrics
        .get(destination)
        .record(resp.status(), event.elapsed());
    if let Some(span) = trace {
        span.finish(resp.status(), destination.map(|d| &*d.0));
    }
    event.response(resp.status(), resp.headers());
    resp
}

/// Rewrites an app's request for the peer sidecar (HTTP/2, absolute URI,
/// hop-by-hop fields removed, the original protocol marked) and sends it
/// on the pool through the forward stage.
async fn to_peer(app: &AppConn, req: Request<Incoming>) -> Result<Response<ProxyBody>, LocalError> {
    let shared = &*app.shared;
    let Some(client) = shared.outbound_http.clients.get(app.index) else {
        tracing::error!(index = app.index, "no pool for this client configuration");
        return Err(LocalError::Unroutable);
    };
    // A pooled connection outlives the identity it was made with: without
    // one now, send nothing on it (fail closed).
    if shared.identity().is_none() {
        return Err(LocalError::NoIdentity);
    }
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts
        .headers
        .insert(ORIG_PROTO, HeaderValue::from_static("HTTP/1.1"));
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(Scheme::HTTP);
    uri.authority = Some(app.authority.clone());
    uri.path_and_query = parts.uri.path_and_query().cloned();
    parts.uri = Uri::from_parts(uri).map_err(|_| LocalError::NoPath)?;
    parts.version = Version::HTTP_2;
    let timeout = shared.config.limits.http_response_timeout;
    let resp =
        crate::forward::peer_request(client, Request::from_parts(parts, body), timeout).await?;
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
) -> Result<Response<ProxyBody>, LocalError> {
    let shared = &*app.shared;
    let Some(cfg) = shared
        .identity()
        .and_then(|c| c.client.get(app.index).cloned())
    else {
        return Err(LocalError::NoIdentity);
    };
    let (mut parts, body) = req.into_parts();
    let Some(downstream) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() else {
        tracing::error!("no upgrade handle on a tunnel request");
        return Err(LocalError::NotUpgradable);
    };
    tunnel.prepare_request(&mut parts.headers);
    let (resp, task) = crate::forward::peer_tunnel(
        Request::from_parts(parts, body),
        app.ends.destination,
        cfg,
        &tunnel,
        downstream,
        &shared.config.limits,
    )
    .await?;
    if let Some(task) = task {
        app.tunnel.set(task);
    }
    Ok(resp)
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
                    0,
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
