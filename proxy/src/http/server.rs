//! Inbound HTTP, the server half: serves a detected HTTP connection (after
//! `tls`) with hyper and passes each request through `http::authorize`
//! (which hands the decision to the `authz` stage) and `http::forward`
//! (which hands the permitted request to the `forward` stage). Each
//! request's access event is opened here and recorded when it is
//! answered; local answers come from `http::errors`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::header::HeaderValue;
use http::uri::Authority;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rampart_identity::{PeerIdentity, SpiffeId};

use super::body::{Counted, RequestBody, StreamCount};
use super::errors::LocalError;
use super::tunnel::TunnelTask;
use super::{AppVersion, ProxyBody, ServeVersion};
use crate::access::Pending;
use crate::config::{Direction, Limits};
use crate::detect::Protocol;
use crate::drain::{Watch, serve_gracefully};
use crate::server::Shared;
use crate::tls::BoxedIo;

/// Built once per sidecar: the server builders and the app connection pools.
pub struct InboundHttp {
    // hyper's own HTTP/1 builder, behind the smuggling guard (which keeps
    // the header read timeout); HTTP/2 and HTTP/1 are told apart before
    // (`detect`), so that every HTTP/1 connection has the guard.
    server_h1: hyper::server::conn::http1::Builder,
    server_h2: auto::Builder<TokioExecutor>,
    /// HTTP/1.1 app connections, one exchange at a time each.
    pub(super) app_links: Arc<super::pool::IdleLinks<SocketAddr>>,
    pub(super) h2: Client<HttpConnector, RequestBody>,
}

impl std::fmt::Debug for InboundHttp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboundHttp").finish_non_exhaustive()
    }
}

impl InboundHttp {
    /// Applies the configured limits.
    pub fn new(limits: &Limits) -> Self {
        let l = limits;
        let mut server = auto::Builder::new(TokioExecutor::new());
        server
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(l.http_max_concurrent_streams)
            // Pings find peers that vanished without a FIN (the pooled
            // sidecar-to-sidecar connections are long-lived).
            .keep_alive_interval(std::time::Duration::from_secs(30))
            .keep_alive_timeout(std::time::Duration::from_secs(10))
            .max_header_list_size(u32::try_from(l.http_max_header_bytes).unwrap_or(u32::MAX));
        let mut server_h1 = hyper::server::conn::http1::Builder::new();
        server_h1
            .timer(TokioTimer::new())
            // hyper's timer would also run while a keep-alive connection
            // waits for its next request: the guard keeps this one, from
            // the first byte of each head.
            .header_read_timeout(None)
            // hyper answers 431 past either limit. Its buffer minimum is 8 KiB.
            .max_buf_size(l.http_max_header_bytes.max(8192))
            .max_headers(l.http_max_headers);
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(limits.connect_timeout));
        InboundHttp {
            server_h1,
            server_h2: server.http2_only(),
            app_links: Arc::default(),
            h2: Client::builder(TokioExecutor::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(l.http_pool_idle_timeout)
                .http2_only(true)
                .build(connector),
        }
    }
}

/// What the HTTP stage knows about one inbound connection.
#[derive(Debug)]
pub struct InboundConn {
    /// The verified peer, `None` for plaintext.
    pub peer: Option<PeerIdentity>,
    /// Where the connection came from.
    pub source: SocketAddr,
    /// Where it was going.
    pub destination: SocketAddr,
    /// The port policies see.
    pub port: u16,
    /// The app.
    pub app: SocketAddr,
    /// Whether the connection was mTLS (the request scheme policies see).
    pub tls: bool,
    /// Server-side HTTP versions.
    pub serve: ServeVersion,
    /// App-side HTTP version.
    pub app_version: AppVersion,
    /// Whether the port is declared gRPC (local errors as gRPC statuses).
    pub grpc_port: bool,
    /// The TLS server name the client sent (Istio's `connection.sni`).
    pub sni: Option<Arc<str>>,
    /// When the mTLS connection must end (its certificates expire).
    pub expires: Option<std::time::SystemTime>,
}

/// Serves HTTP on `stream` until the peer closes or the drain completes it.
pub async fn serve(stream: BoxedIo, conn: InboundConn, shared: Arc<Shared>, mut watch: Watch) {
    let limits = &shared.config.limits;
    // Subscribed before the first request is decided: every reload from
    // now on is seen (`idle` below).
    let mut standing = crate::authz::HttpStanding::new(&shared.config.authorizer);
    // A declared HTTP port: the first bytes tell HTTP/2 from HTTP/1, as
    // late as the idle timeout allows (a client's pool may open the
    // connection long before its first request).
    let (stream, serve_version) = match conn.serve {
        ServeVersion::Auto => {
            let sniffed = tokio::select! {
                r = tokio::time::timeout(
                    limits.http_idle_timeout,
                    crate::detect::http_version(stream, limits.http_header_read_timeout),
                ) => r,
                () = watch.signaled() => return,
            };
            match sniffed {
                Ok(Ok((Protocol::Http2, s))) => (Box::new(s) as BoxedIo, ServeVersion::Http2),
                Ok(Ok((_, s))) => (Box::new(s) as BoxedIo, ServeVersion::Http1),
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "http connection ended before its first request");
                    return;
                }
                Err(_) => {
                    tracing::debug!("idle connection closed");
                    return;
                }
            }
        }
        v => (stream, v),
    };
    let local_id = shared.identity().map(|c| c.svid.id.clone());
    let Ok(app_authority) = Authority::try_from(conn.app.to_string()) else {
        // Invariant: a socket address is a valid authority.
        tracing::error!(app = %conn.app, "app address is not an authority");
        return;
    };
    let xfcc = super::headers::xfcc_value(
        conn.peer.as_ref(),
        conn.source.ip(),
        conn.port,
        local_id.as_ref(),
        shared.config.inbound.xfcc_details,
    );
    let service = conn.destination.to_string();
    let metrics = crate::metrics::RequestMetrics::for_request(
        Direction::Inbound,
        crate::metrics::RequestLabels {
            source_id: conn.peer.as_ref().map(|p| p.principal()),
            destination_id: local_id.as_ref().map(|id| id.as_str()),
            destination_service: Some(&service),
        },
    );
    let handler = Arc::new(Handler {
        shared: shared.clone(),
        local_id,
        xfcc,
        peer_pem: std::sync::OnceLock::new(),
        metrics,
        app_authority,
        conn,
        tunnel: TunnelTask::default(),
    });
    // Connections close after `http_idle_timeout` without a request in
    // flight (HTTP/1 keep-alive between requests, HTTP/2 without a
    // stream): hyper has no idle timeout of its own, and HTTP/2 pings
    // would keep a silent peer's connection open forever. A request head
    // once started has the header read timeout instead (the guard).
    let streams = StreamCount::new(limits.http_idle_timeout);
    let h = handler.clone();
    let counts = streams.clone();
    let h1 = !matches!(serve_version, ServeVersion::Http2);
    let service = hyper::service::service_fn(move |req| {
        let h = h.clone();
        let stream = Some(counts.open());
        let connect = req.method() == http::Method::CONNECT;
        async move {
            let mut resp = h.handle(req).await;
            if h1 {
                super::headers::close_when_draining(&mut resp, h.shared.is_draining(), connect);
            }
            Ok::<_, Infallible>(resp.map(|b| Counted::new(b, stream)))
        }
    });
    let tls = handler.conn.tls;
    let idle = async {
        let expired = streams.idle_expired();
        // A reload after which the peer could be allowed no request here
        // ends the connection too, gracefully (logged and counted there).
        let c = &handler.conn;
        let revoked = standing.revoked(c.peer.as_ref(), c.source.ip(), c.port);
        // An mTLS connection also ends (gracefully: in-flight requests
        // finish) when our identity is withdrawn, or when the SVID it was
        // made with or the peer's expires: its peer then reconnects with
        // current certificates, or is refused.
        if tls {
            tokio::select! {
                () = expired => {}
                () = revoked => {}
                () = shared.mtls_ends(handler.conn.expires) => {
                    tracing::info!("identity withdrawn or certificates expired: closing the mTLS connection");
                }
            }
        } else {
            tokio::select! {
                () = expired => {}
                () = revoked => {}
            }
        }
    };
    // On drain: GOAWAY on HTTP/2; on HTTP/1 keep-alive is disabled, so the
    // in-flight response carries `connection: close`.
    let result: Result<(), Box<dyn std::error::Error + Send + Sync>> = match serve_version {
        ServeVersion::Http1 | ServeVersion::Auto => {
            let io = crate::smuggling::SmugglingGuard::new(stream, limits.http_max_header_bytes)
                .with_head_timeout(limits.http_header_read_timeout);
            let conn = shared
                .http
                .server_h1
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades();
            let grace = limits.http1_drain_grace.min(limits.drain_timeout);
            serve_gracefully!(conn, watch, idle, grace).map_err(Into::into)
        }
        ServeVersion::Http2 => {
            let conn = shared
                .http
                .server_h2
                .serve_connection(TokioIo::new(stream), service);
            serve_gracefully!(conn, watch, idle, std::time::Duration::ZERO)
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "http connection ended with an error");
    }
    // A connection that became a tunnel keeps its slot (and the drain
    // waiting) until the tunnel closes, or until a reload allows its peer
    // no request here (a tunnel is bytes no policy sees after its opening
    // request; one the reloaded policies would still allow some request
    // stays, whether or not they would allow its opening request).
    let c = &handler.conn;
    let revoked = standing.revoked(c.peer.as_ref(), c.source.ip(), c.port);
    handler.tunnel.finished_unless(revoked).await;
}

/// One inbound HTTP connection's state, shared by its requests.
pub(super) struct Handler {
    pub(super) shared: Arc<Shared>,
    pub(super) local_id: Option<SpiffeId>,
    /// Our XFCC element for this connection, computed once.
    pub(super) xfcc: Option<HeaderValue>,
    /// The peer's leaf as URL-encoded PEM, made on the first request whose
    /// policy asks for it (`include_peer_certificate`).
    pub(super) peer_pem: std::sync::OnceLock<Option<String>>,
    /// The request series of this connection's peer.
    pub(super) metrics: Arc<crate::metrics::RequestMetrics>,
    pub(super) app_authority: Authority,
    pub(super) conn: InboundConn,
    /// The tunnel this connection became, if it did (HTTP/1.1 only).
    pub(super) tunnel: TunnelTask,
}

impl Handler {
    async fn handle(&self, mut req: Request<Incoming>) -> Response<ProxyBody> {
        // Before the sidecar adds anything: `Connection` may not name what
        // it sets (request ID, trace context, XFCC).
        super::headers::remove_connection_named(req.headers_mut());
        let trace = self.shared.config.observe.tracing.as_ref().map(|t| {
            let span = t.request(
                Direction::Inbound,
                req.headers(),
                req.method(),
                req.uri().path(),
            );
            span.inject(req.headers_mut());
            span
        });
        let grpc = self.conn.grpc_port || super::is_grpc(req.headers());
        let method = req.method().clone();
        let may_switch = super::tunnel::may_switch(&method, req.version(), req.headers());
        let mut event = Pending::open(
            &self.shared.access,
            Direction::Inbound,
            self.conn.source,
            self.conn.destination,
        );
        event.peer(self.conn.peer.as_ref().map(|p| p.principal()));
        event.request(
            &method,
            req.headers(),
            &self.shared.config.observe.access_headers,
        );
        // One span per request, inside the connection's span; `debug`, so
        // at the default level it costs a cached callsite check.
        let span = tracing::debug_span!(
            "request",
            http.method = %method,
            http.path = req.uri().path(),
            http.version = ?req.version(),
        );
        let answered = tracing::Instrument::instrument(self.route(req, &mut event), span).await;
        let mut resp = match answered {
            Ok(r) => r,
            Err(e) => {
                let wire = e.wire();
                // The authz stage logged its denials.
                if !matches!(e, LocalError::Denied(_)) {
                    tracing::info!(reason = wire.reason.as_str(), error = %e, "request refused");
                }
                crate::metrics::http_local_error(Direction::Inbound, wire.reason);
                e.into_response(grpc, self.local_id.as_ref())
            }
        };
        if may_switch {
            super::tunnel::close_unless_switched(method == http::Method::CONNECT, &mut resp);
        }
        self.metrics.record(resp.status(), event.elapsed());
        if let Some(span) = trace {
            span.finish(
                resp.status(),
                self.conn.peer.as_ref().map(|p| p.principal()),
            );
        }
        event.response(resp.status(), resp.headers());
        resp
    }

    /// A request through the authz stage (`http::authorize`), then the
    /// forward stage (`http::forward`).
    async fn route(
        &self,
        req: Request<Incoming>,
        event: &mut Pending<'_>,
    ) -> Result<Response<ProxyBody>, LocalError> {
        let (permitted, path) = self.authorize(req, event).await?;
        self.forward(permitted, path).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{self, Pki, id};
    use http_body_util::Empty;
    use rampart_authz::{Authorizer, DefaultAction};

    async fn serve_one(
        pki: &Pki,
        shared: &Arc<Shared>,
        port: u16,
        app: SocketAddr,
        req: Request<Empty<bytes::Bytes>>,
    ) -> (http::response::Parts, bytes::Bytes) {
        let dst: SocketAddr = format!("10.0.0.2:{port}").parse().unwrap();
        let (authn, peer_tls) = testing::authenticated(pki, "server", "client", dst).await;
        let conn = InboundConn {
            source: authn.client.0,
            destination: dst,
            tls: true,
            peer: authn.peer,
            port,
            app,
            serve: ServeVersion::Http1,
            app_version: AppVersion::Http1ExceptGrpc,
            grpc_port: false,
            sni: None,
            expires: authn.expires,
        };
        let drain = crate::drain::Drain::new();
        tokio::spawn(serve(authn.stream, conn, shared.clone(), drain.watch()));
        testing::http1_exchange(peer_tls, req).await
    }

    #[tokio::test]
    async fn a_keep_alive_connection_lives_until_a_reload_allows_its_peer_nothing() {
        let pki = Pki::new();
        let app = testing::http_app().await;
        let allow = |peers: &[&str]| {
            Authorizer::from_port_allowlist(
                [(8080, peers.iter().map(|p| id(p)).collect())],
                DefaultAction::Deny,
            )
        };
        let (_tx, identity) = tokio::sync::watch::channel(Some(testing::identity("server")));
        let shared = Shared::for_tests(testing::config(allow(&["client"])), identity);
        let dst: SocketAddr = "10.0.0.2:8080".parse().unwrap();
        let (authn, peer_tls) = testing::authenticated(&pki, "server", "client", dst).await;
        let conn = InboundConn {
            source: authn.client.0,
            destination: dst,
            tls: true,
            peer: authn.peer,
            port: 8080,
            app,
            serve: ServeVersion::Http1,
            app_version: AppVersion::Http1ExceptGrpc,
            grpc_port: false,
            sni: None,
            expires: authn.expires,
        };
        let drain = crate::drain::Drain::new();
        let served = tokio::spawn(serve(authn.stream, conn, shared.clone(), drain.watch()));
        let (mut send, client_conn) = hyper::client::conn::http1::handshake(TokioIo::new(peer_tls))
            .await
            .unwrap();
        let client_conn = tokio::spawn(client_conn);
        let get = || {
            Request::get("/data")
                .header("host", "backend")
                .body(Empty::<bytes::Bytes>::new())
                .unwrap()
        };
        assert_eq!(send.send_request(get()).await.unwrap().status(), 200);
        // A reload that still allows the peer keeps the connection.
        shared
            .config
            .authorizer
            .replace(allow(&["client", "other"]));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(send.send_request(get()).await.unwrap().status(), 200);
        // One that allows it nothing on this port closes it.
        shared.config.authorizer.replace(allow(&["other"]));
        tokio::time::timeout(std::time::Duration::from_secs(5), served)
            .await
            .expect("the server side ended")
            .unwrap();
        // Closed under it (TLS without close_notify reads as an error).
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), client_conn)
            .await
            .expect("the client saw the close")
            .unwrap();
    }

    #[tokio::test]
    async fn requests_are_authorized_then_forwarded_or_refused_in_the_callers_form() {
        let pki = Pki::new();
        let app = testing::http_app().await;
        let policies =
            Authorizer::from_port_allowlist([(8080, vec![id("client")])], DefaultAction::Deny);
        // The sidecar holds an identity: without one its mTLS connections
        // end at once (fail closed), which another test covers.
        let (_tx, identity) = tokio::sync::watch::channel(Some(testing::identity("server")));
        let shared = Shared::for_tests(testing::config(policies), identity);
        let get = |path: &str| {
            Request::get(path)
                .header("host", "backend")
                .body(Empty::new())
                .unwrap()
        };

        // Permitted (port 8080 admits `client`): the app answers.
        let (head, body) = serve_one(&pki, &shared, 8080, app, get("/data")).await;
        assert_eq!(head.status, 200);
        assert_eq!(&body[..], b"ok");

        // No policy covers port 9090: 403 naming the workload that refused.
        let (head, body) = serve_one(&pki, &shared, 9090, app, get("/data")).await;
        assert_eq!(head.status, 403);
        assert!(
            String::from_utf8_lossy(&body)
                .starts_with("RBAC: access denied by spiffe://example.org/server"),
            "{body:?}"
        );

        // A gRPC caller gets PERMISSION_DENIED as a gRPC status.
        let mut grpc = get("/pkg.Svc/Method");
        grpc.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        let (head, _) = serve_one(&pki, &shared, 9090, app, grpc).await;
        assert_eq!(head.status, 200);
        assert_eq!(head.headers["grpc-status"], "7");
    }
}
