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

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::uri::Authority;
use http::{Request, Response, Uri, Version};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::ProxyBody;
use super::errors::LocalError;
use super::headers::strip_hop_by_hop;
use super::pool::{Endpoint, Expect};
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
                shared.config.limits.http_max_header_bytes,
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
    let endpoint = Endpoint {
        addr: app.ends.destination,
        expect: Expect::Rule(app.index),
    };
    let timeout = shared.config.limits.http_response_timeout;
    let (resp, peer) = crate::forward::peer_request(
        &shared.outbound_http,
        &endpoint,
        Request::from_parts(parts, body),
        timeout,
    )
    .await?;
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Ok((Response::from_parts(parts, Either::Left(body)), peer))
}

/// Carries a tunnel request (upgrade or CONNECT) to the peer sidecar on a
/// dedicated HTTP/1.1 connection over mTLS, verified like any other.
async fn tunnel(
    app: &AppConn,
    req: Request<Incoming>,
    tunnel: Tunnel,
) -> Result<(Response<ProxyBody>, Option<metrics::DestinationId>), LocalError> {
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
    let (mut resp, task) = crate::forward::peer_tunnel(
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
