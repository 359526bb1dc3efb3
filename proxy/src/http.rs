//! Inbound HTTP: serves a detected HTTP connection (after `tls`) with hyper,
//! authorizes every request on its normalized path (asking the external
//! authorizer when a CUSTOM policy matches), and forwards permitted
//! requests to the app over a pool of plaintext connections.
//!
//! Bodies and trailers stream through untouched in both directions (hyper's
//! bounded buffers and HTTP/2 flow control apply); only heads are rewritten:
//! normalized path, hop-by-hop fields removed (RFC 9110 §7.6.1),
//! `x-forwarded-client-cert` set (SPECS §5), policy effects applied.
//! Local answers (400, 403, 502, 504, ...) come from [`LocalError`], which
//! maps each failure to a status, a gRPC status and a metric label.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rampart_authz::external::{
    CheckAttributes, Consult, Evaluation, ProviderFailure, ProviderVerdict,
};
use rampart_authz::input::XFCC;
use rampart_authz::{
    ConnectionInfo, Decision, Denial, HttpProtocol, PathError, Permit, RequestInfo, grpc_method_of,
    normalize_path,
};
use rampart_identity::{PeerIdentity, SpiffeId};

use crate::body::{Counted, RequestBody, StreamCount, Waited, response_within};
use crate::config::{Direction, Limits, XfccMode};
use crate::drain::{Watch, serve_gracefully};
use crate::server::Shared;
use crate::tls::BoxedIo;
use crate::tunnel::{Tunnel, TunnelTask};

/// Response bodies: the app's, streamed, or a short local one.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;

/// Which HTTP versions the server side accepts on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServeVersion {
    /// HTTP/1.x only (detected request line).
    Http1,
    /// HTTP/2 only (detected preface, ALPN `h2`, or a declared h2/gRPC port).
    Http2,
    /// Either, told apart by hyper (declared `http` ports).
    Auto,
}

/// Which HTTP version requests are sent to the app with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppVersion {
    /// The version the request arrived with.
    AsReceived,
    /// Always HTTP/2 (declared `http2` and `grpc` ports).
    Http2,
}

/// Built once per sidecar: the server builder and the app connection pools.
pub struct InboundHttp {
    server: auto::Builder<TokioExecutor>,
    // hyper's own HTTP/1 builder: auto's upgrade-capable connection would
    // first read the bytes that tell HTTP/2 apart, a detection already done.
    server_h1: hyper::server::conn::http1::Builder,
    server_h2: auto::Builder<TokioExecutor>,
    h1: Client<HttpConnector, RequestBody>,
    h2: Client<HttpConnector, RequestBody>,
}

impl std::fmt::Debug for InboundHttp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboundHttp").finish_non_exhaustive()
    }
}

impl InboundHttp {
    /// Applies the configured limits.
    pub fn new(limits: &Limits) -> Self {
        let l = &limits.http;
        let mut server = auto::Builder::new(TokioExecutor::new());
        server
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(l.header_read_timeout)
            // hyper answers 431 past either limit. Its buffer minimum is 8 KiB.
            .max_buf_size(l.max_header_bytes.max(8192))
            .max_headers(l.max_headers);
        server
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(l.max_concurrent_streams)
            // Pings find peers that vanished without a FIN (the pooled
            // sidecar-to-sidecar connections are long-lived).
            .keep_alive_interval(std::time::Duration::from_secs(30))
            .keep_alive_timeout(std::time::Duration::from_secs(10))
            .max_header_list_size(u32::try_from(l.max_header_bytes).unwrap_or(u32::MAX));
        let mut server_h1 = hyper::server::conn::http1::Builder::new();
        server_h1
            .timer(TokioTimer::new())
            .header_read_timeout(l.header_read_timeout)
            .max_buf_size(l.max_header_bytes.max(8192))
            .max_headers(l.max_headers);
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(limits.connect_timeout));
        let client = |h2: bool| {
            Client::builder(TokioExecutor::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(l.pool_idle_timeout)
                .http2_only(h2)
                .build(connector.clone())
        };
        InboundHttp {
            server_h1,
            server_h2: server.clone().http2_only(),
            server,
            h1: client(false),
            h2: client(true),
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
}

/// Serves HTTP on `stream` until the peer closes or the drain completes it.
pub async fn serve(stream: BoxedIo, conn: InboundConn, shared: Arc<Shared>, mut watch: Watch) {
    let local_id = shared.identity().map(|c| c.svid.id.clone());
    let Ok(app_authority) = Authority::try_from(conn.app.to_string()) else {
        // Invariant: a socket address is a valid authority.
        tracing::error!(app = %conn.app, "app address is not an authority");
        return;
    };
    let xfcc = xfcc_value(&conn, local_id.as_ref());
    let metrics = crate::metrics::RequestMetrics::for_peer(
        Direction::Inbound,
        conn.peer.as_ref().map(|p| p.principal()),
    );
    let handler = Arc::new(Handler {
        shared: shared.clone(),
        local_id,
        xfcc,
        metrics,
        app_authority,
        conn,
        tunnel: TunnelTask::default(),
    });
    let serve_version = handler.conn.serve;
    // HTTP/2 connections close after `http_idle_timeout` without a stream:
    // keep-alive pings keep a silent peer's connection open forever, and
    // hyper has no idle timeout of its own. (HTTP/1 keep-alive connections
    // are closed by the header read timeout.)
    let streams = match serve_version {
        ServeVersion::Http1 => None,
        ServeVersion::Http2 | ServeVersion::Auto => {
            Some(StreamCount::new(shared.config.limits.http.idle_timeout))
        }
    };
    let h = handler.clone();
    let counts = streams.clone();
    let service = hyper::service::service_fn(move |req| {
        let h = h.clone();
        let stream = counts.as_ref().map(StreamCount::open);
        async move { Ok::<_, Infallible>(h.handle(req).await.map(|b| Counted::new(b, stream))) }
    });
    let tls = handler.conn.tls;
    let idle = async {
        let expired = async {
            match &streams {
                Some(s) => s.idle_expired().await,
                None => std::future::pending().await,
            }
        };
        // An mTLS connection also ends (gracefully) when our identity is
        // withdrawn: its peer then reconnects, and is refused.
        if tls {
            tokio::select! {
                () = expired => {}
                () = shared.identity_withdrawn() => {
                    tracing::info!("identity withdrawn: closing the mTLS connection");
                }
            }
        } else {
            expired.await;
        }
    };
    // On drain: GOAWAY on HTTP/2; on HTTP/1 keep-alive is disabled, so the
    // in-flight response carries `connection: close`.
    let result: Result<(), Box<dyn std::error::Error + Send + Sync>> = match serve_version {
        ServeVersion::Http1 => {
            let io = crate::smuggling::SmugglingGuard::new(
                stream,
                shared.config.limits.http.max_header_bytes,
            );
            let conn = shared
                .http
                .server_h1
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades();
            serve_gracefully!(conn, watch, idle).map_err(Into::into)
        }
        ServeVersion::Http2 => {
            let conn = shared
                .http
                .server_h2
                .serve_connection(TokioIo::new(stream), service);
            serve_gracefully!(conn, watch, idle)
        }
        ServeVersion::Auto => {
            let conn = shared
                .http
                .server
                .serve_connection_with_upgrades(TokioIo::new(stream), service);
            serve_gracefully!(conn, watch, idle)
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "http connection ended with an error");
    }
    // A connection that became a tunnel keeps its slot (and the drain
    // waiting) until the tunnel closes.
    handler.tunnel.finished().await;
}

/// What a request's access event needs from the authorization stage.
#[derive(Default)]
struct Outcome {
    /// The normalized path (set when access logs are on, or on denial).
    path: Option<String>,
    decided: Option<Decided>,
}

enum Decided {
    Allow {
        policy: Arc<str>,
        rule: Arc<str>,
    },
    Deny {
        reason: &'static str,
        policy: Option<Arc<str>>,
        rule: Option<Arc<str>>,
    },
}

impl Outcome {
    fn is_denied(&self) -> bool {
        matches!(self.decided, Some(Decided::Deny { .. }))
    }
}

/// The declared `content-length`, if any and valid.
pub(crate) fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// A fresh request ID: 128 bits as 32 hex digits. Unique per process run
/// (a random key hashes a counter); a correlation handle, not a secret.
fn request_id() -> HeaderValue {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static KEYS: OnceLock<(
        std::collections::hash_map::RandomState,
        std::collections::hash_map::RandomState,
    )> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let (a, b) = KEYS.get_or_init(|| (Default::default(), Default::default()));
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut ha = a.build_hasher();
    ha.write_u64(n);
    let mut hb = b.build_hasher();
    hb.write_u64(n);
    let s = format!("{:016x}{:016x}", ha.finish(), hb.finish());
    // Invariant: hex digits are valid header bytes.
    HeaderValue::from_str(&s).expect("hex is a valid header value")
}

struct Handler {
    shared: Arc<Shared>,
    local_id: Option<SpiffeId>,
    /// Our XFCC element for this connection, computed once.
    xfcc: Option<HeaderValue>,
    /// The request series of this connection's peer.
    metrics: Arc<crate::metrics::RequestMetrics>,
    app_authority: Authority,
    conn: InboundConn,
    /// The tunnel this connection became, if it did (HTTP/1.1 only).
    tunnel: TunnelTask,
}

impl Handler {
    async fn handle(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let start = Instant::now();
        let grpc = self.conn.grpc_port || is_grpc(req.headers());
        let method = req.method().clone();
        let bytes_in = content_length(req.headers());
        let may_switch = crate::tunnel::may_switch(&method, req.version(), req.headers());
        let names = &self.shared.config.observe.access_headers;
        // Only when access logs are on and headers were asked for.
        let logged_headers = if self.shared.access.is_enabled() && !names.is_empty() {
            crate::access::pick_headers(names, req.headers())
        } else {
            Vec::new()
        };
        let mut outcome = Outcome::default();
        // One span per request, inside the connection's span; `debug`, so
        // at the default level it costs a cached callsite check.
        let span = tracing::debug_span!(
            "request",
            http.method = %method,
            http.path = req.uri().path(),
            http.version = ?req.version(),
        );
        let mut resp =
            match tracing::Instrument::instrument(self.route(req, &mut outcome), span).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::info!(reason = e.label(), error = %e, "request refused");
                    crate::metrics::http_local_error(Direction::Inbound, e.label());
                    e.into_response(grpc, self.local_id.as_ref())
                }
            };
        if may_switch {
            crate::tunnel::close_unless_switched(method == http::Method::CONNECT, &mut resp);
        }
        let elapsed = start.elapsed();
        self.metrics.record(resp.status(), elapsed);
        if self.shared.access.is_enabled() || outcome.is_denied() {
            let verdict = match &outcome.decided {
                Some(Decided::Allow { policy, rule }) => {
                    crate::access::Verdict::Allow { policy, rule }
                }
                Some(Decided::Deny {
                    reason,
                    policy,
                    rule,
                }) => crate::access::Verdict::Deny {
                    reason,
                    policy: policy.as_deref(),
                    rule: rule.as_deref(),
                },
                None => crate::access::Verdict::NotApplicable,
            };
            self.shared.access.record(&crate::access::Event {
                direction: Direction::Inbound,
                peer: self.conn.peer.as_ref().map(|p| p.principal()),
                source: self.conn.source,
                destination: self.conn.destination,
                method: Some(method.as_str()),
                path: outcome.path.as_deref(),
                status: Some(resp.status().as_u16()),
                verdict,
                duration: elapsed,
                bytes_in,
                bytes_out: content_length(resp.headers()),
                headers: &logged_headers,
            });
        }
        resp
    }

    /// The authorization stage for one request, then forwarding.
    async fn route(
        &self,
        mut req: Request<Incoming>,
        outcome: &mut Outcome,
    ) -> Result<Response<ProxyBody>, LocalError> {
        // The request ID is set before authorization, as Envoy sets it
        // before its filters: Rego, ext_authz providers and decision logs
        // see the same ID the app and the access log will.
        if let Some(name) = &self.shared.config.observe.request_id_header
            && !req.headers().contains_key(name)
        {
            req.headers_mut().insert(name.clone(), request_id());
        }
        // Request smuggling (Content-Length with Transfer-Encoding) is
        // settled by hyper before we see the request, as RFC 9112 §6.3
        // allows: chunked wins, Content-Length is dropped and the
        // connection closes after this exchange.
        let headers = req.headers();
        // CONNECT names an authority, not a path: policies see its target
        // as the host and an empty path (as Envoy's ext_authz does), so a
        // rule with `paths` never matches it.
        let connect = req.method() == http::Method::CONNECT && req.version() == Version::HTTP_11;
        let raw = match req.uri().path_and_query() {
            Some(p) => p.as_str(),
            None if connect => "",
            None => return Err(LocalError::NoPath),
        };
        // One atomic load: a reload mid-request does not change this one.
        let policies = self.shared.config.authorizer.current();
        let authorizer = &policies.authorizer;
        let norm = if connect {
            rampart_authz::NormalizedPath {
                path: "".into(),
                query: None,
            }
        } else {
            normalize_path(raw, authorizer.normalize_options())?
        };
        let logged = self.shared.access.is_enabled();
        if logged {
            outcome.path = Some(norm.path.to_string());
        }
        let authority = match (connect, headers.get(header::HOST)) {
            (false, Some(h)) => h.to_str().unwrap_or(""),
            _ => req.uri().authority().map(Authority::as_str).unwrap_or(""),
        };
        let protocol = match req.version() {
            Version::HTTP_10 | Version::HTTP_09 => HttpProtocol::Http10,
            Version::HTTP_2 | Version::HTTP_3 => HttpProtocol::Http2,
            _ => HttpProtocol::Http11,
        };
        let conn_info = crate::tls::connection_info(
            self.conn.peer.as_ref(),
            self.conn.source.ip(),
            self.conn.port,
        );
        let info = RequestInfo {
            method: req.method(),
            authority,
            path: &norm.path,
            raw_path_and_query: raw,
            query: norm.query,
            headers,
            protocol,
            scheme: if self.conn.tls { "https" } else { "http" },
            grpc_method: grpc_method_of(&norm.path, headers),
            source: self.conn.source,
            destination: self.conn.destination,
            local_identity: self.local_id.as_ref(),
            peer_cert_sha256: self.conn.peer.as_ref().map(|p| p.cert_sha256.as_str()),
        };
        // Only a request that a CUSTOM rule sends to an external authorizer
        // pays for more than the in-process decision.
        let decision = match authorizer.evaluate_request(&conn_info, &info) {
            Evaluation::Decided(d) => d,
            Evaluation::Consult(c) => self.consult(c, &conn_info, &info).await,
        };
        if let Some(sink) = &self.shared.config.central.decision_log {
            sink.log(&conn_info, &info, &decision);
        }
        let permit = match decision {
            Decision::Allow(p) => {
                crate::metrics::decision("allow", "matched", p.policy(), p.rule());
                if logged {
                    outcome.decided = Some(Decided::Allow {
                        policy: p.policy().into(),
                        rule: p.rule().into(),
                    });
                }
                p
            }
            Decision::Deny(d) => {
                crate::metrics::decision(
                    "deny",
                    d.reason.as_str(),
                    d.policy.as_deref().unwrap_or("-"),
                    d.rule.as_deref().unwrap_or("-"),
                );
                outcome.path.get_or_insert_with(|| norm.path.to_string());
                outcome.decided = Some(Decided::Deny {
                    reason: d.reason.as_str(),
                    policy: d.policy.clone(),
                    rule: d.rule.clone(),
                });
                return Err(LocalError::Denied(Box::new(d)));
            }
        };
        if connect {
            return self.forward_tunnel(permit, req, Tunnel::Connect).await;
        }
        let path = if norm.is_rewritten() {
            PathAndQuery::try_from(&*norm.path_and_query())
                .map_err(|_| LocalError::BadPath(PathError::Empty))?
        } else {
            // Invariant: `raw` came from this path_and_query.
            req.uri()
                .path_and_query()
                .cloned()
                .ok_or(LocalError::NoPath)?
        };
        self.forward(permit, req, path).await
    }

    /// Asks the CUSTOM policy's external authorizer; without one configured
    /// the request is refused (fail closed).
    async fn consult(
        &self,
        consult: Consult,
        conn: &ConnectionInfo<'_>,
        req: &RequestInfo<'_>,
    ) -> Decision {
        let verdict = match &self.shared.config.central.external {
            Some(ext) => {
                ext.check(consult.provider(), CheckAttributes::new(conn, req))
                    .await
            }
            None => ProviderVerdict::Failed(ProviderFailure::UnknownProvider),
        };
        consult.finish(verdict)
    }

    /// Sends a permitted request to the app. Taking the [`Permit`] makes
    /// forwarding an unauthorized request a type error.
    async fn forward(
        &self,
        permit: Permit,
        req: Request<Incoming>,
        path: PathAndQuery,
    ) -> Result<Response<ProxyBody>, LocalError> {
        if let Some(t) = Tunnel::of(req.method(), req.version(), req.headers()) {
            let (mut parts, body) = req.into_parts();
            parts.uri = Uri::from(path);
            return self
                .forward_tunnel(permit, Request::from_parts(parts, body), t)
                .await;
        }
        let (mut parts, body) = req.into_parts();
        let h = &mut parts.headers;
        strip_hop_by_hop(h);
        // An HTTP/2 request names its authority in the URI only; HTTP/1
        // needs it as Host.
        if !h.contains_key(header::HOST)
            && let Some(a) = parts.uri.authority()
            && let Ok(v) = HeaderValue::from_str(a.as_str())
        {
            h.insert(header::HOST, v);
        }
        self.app_request_headers(&permit, h);
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(Scheme::HTTP);
        uri.authority = Some(self.app_authority.clone());
        uri.path_and_query = Some(path);
        parts.uri = Uri::from_parts(uri).map_err(|_| LocalError::NoPath)?;
        // Requests an outbound sidecar carried over HTTP/2 say what the
        // calling app spoke.
        let was_h1 = parts
            .headers
            .remove(crate::pool::ORIG_PROTO)
            .is_some_and(|v| v.as_bytes() == b"HTTP/1.1");
        let h2 = match self.conn.app_version {
            AppVersion::Http2 => true,
            AppVersion::AsReceived => parts.version == Version::HTTP_2 && !was_h1,
        };
        let client = if h2 {
            parts.version = Version::HTTP_2;
            // HTTP/2 carries the authority in the URI; a Host beside it
            // would disagree with it.
            parts.headers.remove(header::HOST);
            &self.shared.http.h2
        } else {
            parts.version = Version::HTTP_11;
            &self.shared.http.h1
        };
        let timeout = self.shared.config.limits.http.response_timeout;
        let (body, ended) = RequestBody::new(body);
        let sent = client.request(Request::from_parts(parts, body));
        let resp = match response_within(timeout, ended, sent).await {
            Err(Waited::NoResponse) => return Err(LocalError::AppTimeout),
            Err(Waited::UploadStalled) => return Err(LocalError::UploadStalled),
            Ok(Err(e)) => return Err(LocalError::AppUnreachable(e)),
            Ok(Ok(r)) => r,
        };
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        if let Some(effects) = permit.effects() {
            for (name, value) in &effects.response_headers_to_add {
                parts.headers.append(name.clone(), value.clone());
            }
        }
        tracing::debug!(
            authz.policy = permit.policy(),
            authz.rule = permit.rule(),
            status = parts.status.as_u16(),
            "request forwarded"
        );
        Ok(Response::from_parts(parts, Either::Left(body)))
    }

    /// What every request to the app gets: XFCC and the permit's header
    /// effects (the request ID was set before authorization).
    fn app_request_headers(&self, permit: &Permit, h: &mut HeaderMap) {
        self.set_xfcc(h);
        if let Some(effects) = permit.effects() {
            for name in &effects.request_headers_to_remove {
                h.remove(name);
            }
            for (name, value) in &effects.headers {
                h.insert(name.clone(), value.clone());
            }
            for (name, value) in &effects.request_headers_to_append {
                h.append(name.clone(), value.clone());
            }
        }
    }

    /// Sends a permitted tunnel request (upgrade or CONNECT; its URI
    /// already in origin or authority form) to the app on a connection of
    /// its own, and splices the two once the app switches.
    async fn forward_tunnel(
        &self,
        permit: Permit,
        req: Request<Incoming>,
        tunnel: Tunnel,
    ) -> Result<Response<ProxyBody>, LocalError> {
        if self.conn.app_version == AppVersion::Http2 {
            // An HTTP/2 app cannot take an HTTP/1.1 upgrade.
            return Err(LocalError::TunnelToHttp2App);
        }
        let (mut parts, body) = req.into_parts();
        let downstream = parts
            .extensions
            .remove::<hyper::upgrade::OnUpgrade>()
            .ok_or(LocalError::NotUpgradable)?;
        tunnel.prepare_request(&mut parts.headers);
        self.app_request_headers(&permit, &mut parts.headers);
        let limits = &self.shared.config.limits;
        let app = crate::forward::connect(self.conn.app, limits.connect_timeout)
            .await
            .map_err(LocalError::AppConnect)?;
        let (resp, task) = crate::tunnel::open(
            app,
            Request::from_parts(parts, body),
            &tunnel,
            downstream,
            limits.http.response_timeout,
            Direction::Inbound,
        )
        .await
        .map_err(LocalError::Tunnel)?;
        tracing::debug!(
            tunnel = tunnel.label(),
            authz.policy = permit.policy(),
            status = resp.status().as_u16(),
            "tunnel request forwarded"
        );
        if let Some(task) = task {
            self.tunnel.set(task);
        }
        Ok(resp)
    }

    fn set_xfcc(&self, h: &mut HeaderMap) {
        match self.shared.config.inbound.xfcc {
            XfccMode::SanitizeSet => {
                h.remove(XFCC);
                if let Some(v) = &self.xfcc {
                    h.insert(XFCC, v.clone());
                }
            }
            XfccMode::AppendForward => {
                if let Some(v) = &self.xfcc {
                    h.append(XFCC, v.clone());
                }
            }
            XfccMode::Sanitize => {
                h.remove(XFCC);
            }
        }
    }
}

/// Our XFCC element for an authenticated peer, computed once per connection
/// with authz's own formatter, so the header the app sees is the one Rego
/// policies see.
fn xfcc_value(conn: &InboundConn, local_id: Option<&SpiffeId>) -> Option<HeaderValue> {
    let peer = conn.peer.as_ref()?;
    let info = crate::tls::connection_info(Some(peer), conn.source.ip(), conn.port);
    let element = rampart_authz::input::xfcc_element(&info, local_id, Some(&peer.cert_sha256))?;
    HeaderValue::try_from(element).ok()
}

fn is_grpc(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Removes hop-by-hop fields (RFC 9110 §7.6.1): `Connection` and every
/// field it names, plus the fields that are hop-by-hop by definition. `TE`
/// survives only as `trailers`, which gRPC requires.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    if h.contains_key(header::CONNECTION) {
        // Rare on the hot path (HTTP/2 forbids it): allocation is fine here.
        let named: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
        for n in named {
            h.remove(n);
        }
        h.remove(header::CONNECTION);
    }
    for name in [
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
    ] {
        h.remove(name);
    }
    h.remove("keep-alive");
    h.remove("proxy-connection");
    if h.get(header::TE)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        h.remove(header::TE);
    }
}

/// Why a request was answered by the sidecar itself.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// The request has no origin-form target (authority-form, `*`).
    #[error("request has no path")]
    NoPath,
    /// The path cannot be normalized safely (the client's fault).
    #[error("bad request path: {}", .0.as_str())]
    BadPath(#[from] PathError),
    /// Policy refused.
    #[error("denied: {}", .0.explain())]
    Denied(Box<Denial>),
    /// The app refused, reset or broke the exchange.
    #[error("app unreachable: {0}")]
    AppUnreachable(hyper_util::client::legacy::Error),
    /// The app did not answer in time.
    #[error("app did not answer in time")]
    AppTimeout,
    /// The client's request body stopped moving (the client's fault).
    #[error("request body stalled")]
    UploadStalled,
    /// The app could not be reached for a tunnel.
    #[error("app unreachable: {0}")]
    AppConnect(crate::forward::ConnectError),
    /// A tunnel request to the app failed or timed out.
    #[error("{0}")]
    Tunnel(crate::tunnel::TunnelError),
    /// A tunnel request for a port declared `http2` or `grpc`.
    #[error("upgrade and CONNECT need an HTTP/1.1 app")]
    TunnelToHttp2App,
    /// hyper offered no upgrade for a tunnel request (a bug).
    #[error("connection cannot be upgraded")]
    NotUpgradable,
}

impl LocalError {
    /// Fixed metric label.
    pub fn label(&self) -> &'static str {
        match self {
            LocalError::NoPath => "no_path",
            LocalError::BadPath(_) => "bad_path",
            LocalError::Denied(_) => "denied",
            LocalError::AppUnreachable(_) => "app_unreachable",
            LocalError::AppTimeout => "app_timeout",
            LocalError::UploadStalled => "upload_stalled",
            LocalError::AppConnect(_) => "app_unreachable",
            LocalError::Tunnel(crate::tunnel::TunnelError::Exchange(_)) => "app_unreachable",
            LocalError::Tunnel(crate::tunnel::TunnelError::Timeout) => "app_timeout",
            LocalError::TunnelToHttp2App => "tunnel_unsupported",
            LocalError::NotUpgradable => "not_upgradable",
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            LocalError::NoPath => StatusCode::BAD_REQUEST,
            LocalError::BadPath(e) => e.http_status(),
            LocalError::Denied(d) => d.http_status(),
            LocalError::AppUnreachable(_) => StatusCode::BAD_GATEWAY,
            LocalError::AppTimeout => StatusCode::GATEWAY_TIMEOUT,
            LocalError::UploadStalled => StatusCode::REQUEST_TIMEOUT,
            LocalError::AppConnect(_) => StatusCode::BAD_GATEWAY,
            LocalError::Tunnel(crate::tunnel::TunnelError::Exchange(_)) => StatusCode::BAD_GATEWAY,
            LocalError::Tunnel(crate::tunnel::TunnelError::Timeout) => StatusCode::GATEWAY_TIMEOUT,
            LocalError::TunnelToHttp2App => StatusCode::NOT_IMPLEMENTED,
            LocalError::NotUpgradable => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The gRPC status code (grpc/doc/http-grpc-status-mapping.md, with
    /// PERMISSION_DENIED for policy refusals).
    pub fn grpc_status(&self) -> u8 {
        match self {
            LocalError::NoPath | LocalError::BadPath(_) => 13,
            LocalError::Denied(_) => 7,
            LocalError::AppUnreachable(_) | LocalError::AppConnect(_) => 14,
            LocalError::Tunnel(crate::tunnel::TunnelError::Exchange(_)) => 14,
            LocalError::AppTimeout
            | LocalError::UploadStalled
            | LocalError::Tunnel(crate::tunnel::TunnelError::Timeout) => 4,
            LocalError::TunnelToHttp2App => 12,
            LocalError::NotUpgradable => 13,
        }
    }

    /// The response sent to the client.
    pub fn into_response(self, grpc: bool, local_id: Option<&SpiffeId>) -> Response<ProxyBody> {
        let status = self.status();
        let mut extra: Vec<(HeaderName, HeaderValue)> = Vec::new();
        let body = match &self {
            LocalError::Denied(d) => {
                if let Some(r) = &d.response {
                    extra.extend(r.headers.iter().cloned());
                }
                match d.response.as_deref() {
                    Some(r) if !r.body.is_empty() => r.body.clone(),
                    _ => denial_body(d, local_id),
                }
            }
            other => format!("{other}\n"),
        };
        let mut resp = if grpc {
            // Trailers-only: one HEADERS frame with END_STREAM (an empty body).
            let mut r = Response::new(Either::Right(Full::new(Bytes::new())));
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            h.insert(
                "grpc-status",
                HeaderValue::from(u16::from(self.grpc_status())),
            );
            if let Ok(v) = HeaderValue::try_from(grpc_message(body.trim_end())) {
                h.insert("grpc-message", v);
            }
            r
        } else {
            let mut r = Response::new(Either::Right(Full::new(Bytes::from(body))));
            *r.status_mut() = status;
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            r
        };
        for (n, v) in extra {
            resp.headers_mut().append(n, v);
        }
        resp
    }
}

/// `RBAC: access denied by <our ID> policy <name>`: which workload's policy
/// refused, for the caller's operator (scenario 1, case 4).
fn denial_body(d: &Denial, local_id: Option<&SpiffeId>) -> String {
    let who = local_id.map(SpiffeId::as_str).unwrap_or("this workload");
    match &d.policy {
        Some(p) => format!("RBAC: access denied by {who} policy {p}\n"),
        None => format!("RBAC: access denied by {who}: {}\n", d.reason.describe()),
    }
}

/// Percent-encodes a grpc-message value (gRPC over HTTP/2 spec).
fn grpc_message(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_fields_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["te", "x-kept"]);
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h);
        assert!(!h.contains_key(header::TE));
    }

    #[test]
    fn grpc_messages_are_percent_encoded() {
        assert_eq!(grpc_message("a b%\u{e9}"), "a b%25%C3%A9");
    }

    #[test]
    fn local_errors_map_to_statuses() {
        let cases = [
            (LocalError::NoPath, 400, 13),
            (LocalError::AppTimeout, 504, 4),
            (LocalError::TunnelToHttp2App, 501, 12),
            (LocalError::UploadStalled, 408, 4),
            (
                LocalError::Tunnel(crate::tunnel::TunnelError::Timeout),
                504,
                4,
            ),
        ];
        for (e, http, grpc) in cases {
            assert_eq!(e.status().as_u16(), http, "{e}");
            assert_eq!(e.grpc_status(), grpc, "{e}");
        }
    }
}
