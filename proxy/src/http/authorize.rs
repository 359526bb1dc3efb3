//! Inbound HTTP, the authorization input: builds what `rampart_authz` is
//! told about one request (normalized path, authority, protocol, scheme,
//! gRPC method, the connection's peer), asks the external authorizer when a
//! CUSTOM policy matches, feeds the decision log, and hands the decision to
//! the `authz` stage, which turns it into a permit bound to the request.

use http::header;
use http::uri::{Authority, PathAndQuery};
use http::{Request, Version};
use hyper::body::{Body as _, Incoming};
use rampart_authz::external::{
    CheckAttributes, Consult, Evaluation, ProviderFailure, ProviderVerdict,
};
use rampart_authz::{
    BufferedBody, ConnectionInfo, Decision, HttpProtocol, PathError, RequestInfo, grpc_method_of,
    normalize_path,
};

use super::body::{ReadError, read_for_policies};
use super::errors::{BadRequest, LocalError};
use super::server::Handler;
use crate::access::Pending;
use crate::authz::PermittedRequest;

impl Handler {
    /// The authorization stage for one request: the permitted request and
    /// the path to send to the app (the normalized one when normalization
    /// rewrote it), or the local error that answers it.
    pub(super) async fn authorize(
        &self,
        mut req: Request<Incoming>,
        event: &mut Pending<'_>,
    ) -> Result<(PermittedRequest, Option<PathAndQuery>), LocalError> {
        // The request ID is set before authorization, as Envoy sets it
        // before its filters: Rego, ext_authz providers and decision logs
        // see the same ID the app and the access log will.
        if let Some(name) = &self.shared.config.observe.request_id_header
            && !req.headers().contains_key(name)
        {
            req.headers_mut()
                .insert(name.clone(), super::headers::request_id());
        }
        // CONNECT names an authority, not a path: policies see its target
        // as the host and an empty path (as Envoy's ext_authz does), so a
        // rule with `paths` never matches it.
        let connect = req.method() == http::Method::CONNECT && req.version() == Version::HTTP_11;
        check_host(&req, connect)?;
        // One atomic load: a reload mid-request does not change this one.
        let policies = self.shared.config.authorizer.current();
        let authorizer = &policies.authorizer;
        // A Rego policy's `with_request_body`: the body is read now, once
        // and bounded, and sent on to the app after the decision. Nothing
        // is read when no policy asks, when there is no body, or for a
        // tunnel, whose bytes are not a body (Envoy skips upgrades too).
        let read_ahead = match authorizer.request_body(self.conn.port) {
            Some(spec)
                if !req.body().is_end_stream()
                    && !connect
                    && super::tunnel::Tunnel::of(req.method(), req.version(), req.headers())
                        .is_none() =>
            {
                let declared = req
                    .headers()
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok()?.parse().ok());
                let timeout = self.shared.config.limits.http_response_timeout;
                let ahead = read_for_policies(req.body_mut(), declared, spec, timeout)
                    .await
                    .map_err(|e| match e {
                        ReadError::TooLarge => LocalError::BodyTooLarge(spec.max_request_bytes),
                        ReadError::Stalled => LocalError::UploadStalled,
                        ReadError::Malformed => LocalError::MalformedBody,
                    })?;
                Some((ahead, spec))
            }
            _ => None,
        };
        // Request smuggling (Content-Length with Transfer-Encoding) is
        // settled by hyper before we see the request, as RFC 9112 §6.3
        // allows: chunked wins, Content-Length is dropped and the
        // connection closes after this exchange.
        let headers = req.headers();
        let raw = match req.uri().path_and_query() {
            Some(p) => p.as_str(),
            None if connect => "",
            None => return Err(LocalError::NoPath),
        };
        let norm = if connect {
            rampart_authz::NormalizedPath {
                path: "".into(),
                query: None,
            }
        } else {
            normalize_path(raw, authorizer.normalize_options())?
        };
        let authority = match (connect, headers.get(header::HOST)) {
            (false, Some(h)) => h.to_str().unwrap_or(""),
            _ => req.uri().authority().map(Authority::as_str).unwrap_or(""),
        };
        let protocol = match req.version() {
            Version::HTTP_10 | Version::HTTP_09 => HttpProtocol::Http10,
            Version::HTTP_2 | Version::HTTP_3 => HttpProtocol::Http2,
            _ => HttpProtocol::Http11,
        };
        // RequestAuthentication: a token present must verify (else 401);
        // its claims are what `request.auth.*` reads.
        let jwt = authorizer
            .authenticate_request(headers, norm.query)
            .map_err(LocalError::Unauthenticated)?;
        let conn_info = crate::authz::connection_info(
            self.conn.peer.as_ref(),
            self.conn.source.ip(),
            self.conn.port,
        )
        .with_jwt(jwt.as_ref().map(|j| &j.claims))
        .with_sni(self.conn.sni.as_deref())
        .with_request_body(read_ahead.as_ref().and_then(|(a, spec)| {
            // Envoy shows at most `max_request_bytes`, and says whether
            // there was more; a body with no byte shows nothing.
            let max = usize::try_from(spec.max_request_bytes).unwrap_or(usize::MAX);
            let data = a.data();
            (!data.is_empty()).then(|| BufferedBody {
                bytes: &data[..data.len().min(max)],
                partial: data.len() > max,
                pack_as_bytes: spec.pack_as_bytes,
            })
        }))
        .with_peer_certificate(
            authorizer
                .include_peer_certificate(self.conn.port)
                .then(|| self.peer_pem())
                .flatten(),
        )
        .with_xfcc(self.xfcc.as_ref().and_then(|v| v.to_str().ok()));
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
        // A tunnel is one request and then bytes no policy sees: it must be
        // allowed by a rule that names its method, not by one that allows
        // any method (Envoy refuses CONNECT and upgrades unless a route
        // asks for them). Asked as: would the same request with a method
        // no policy names be allowed too? Then the method did not matter.
        let tunnel = if connect {
            Some("CONNECT")
        } else {
            super::tunnel::Tunnel::of(req.method(), req.version(), headers).map(|_| "Upgrade")
        };
        if let Some(kind) = tunnel
            && decision.is_allowed()
        {
            // Invariant: a constant token is a valid extension method.
            let unnamed = http::Method::from_bytes(UNNAMED_METHOD).expect("a valid method token");
            let probe = RequestInfo {
                method: &unnamed,
                ..info
            };
            let method_mattered = match authorizer.evaluate_request(&conn_info, &probe) {
                Evaluation::Decided(d) => !d.is_allowed(),
                // A CUSTOM rule would be asked: it did not name the method.
                Evaluation::Consult(_) => false,
            };
            if !method_mattered {
                return Err(LocalError::TunnelNotAllowed(kind));
            }
        }
        if let Some(sink) = &self.shared.config.central.decision_log {
            sink.log(&conn_info, &info, &decision);
        }
        if event.log_enabled() || !decision.is_allowed() {
            event.path(&norm.path);
        }
        // The path the app gets: decided now, while `norm` borrows the
        // request; used only once the request is permitted.
        let rewritten = (!connect && norm.is_rewritten())
            .then(|| PathAndQuery::try_from(&*norm.path_and_query()));
        // The token header and the payload header, for the app.
        if let (Some(j), true) = (&jwt, decision.is_allowed()) {
            j.rewrite.apply(req.headers_mut());
        }
        if let Some((ahead, _)) = read_ahead {
            req.extensions_mut().insert(ahead);
        }
        let permitted = crate::authz::request(req, decision, event).map_err(LocalError::Denied)?;
        let path = match rewritten {
            None => None,
            Some(Ok(p)) => Some(p),
            Some(Err(_)) => return Err(LocalError::BadPath(PathError::Empty)),
        };
        Ok((permitted, path))
    }
}

impl Handler {
    /// The peer's leaf certificate as the input shows it, made once per
    /// connection.
    fn peer_pem(&self) -> Option<&str> {
        self.peer_pem
            .get_or_init(|| {
                let leaf = self.conn.peer.as_ref()?.chain.first()?;
                Some(rampart_authz::input::url_encoded_pem(&[leaf]))
            })
            .as_deref()
    }
}

/// A method no policy names (an extension token, inline in `http::Method`:
/// no allocation), to ask whether a tunnel's own method mattered.
const UNNAMED_METHOD: &[u8] = b"RAMPART-UNNAMED";

/// RFC 9112 §3.2: a request with more than one `Host` is refused, and so
/// is an absolute-form target whose authority disagrees with `Host` (the
/// target wins there, so the policy and the app could read different
/// hosts). Both 400.
fn check_host(req: &Request<Incoming>, connect: bool) -> Result<(), LocalError> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(LocalError::BadRequest(BadRequest::DuplicateHost));
    }
    // HTTP/2 carries `:authority` in the URI always; HTTP/1 only in the
    // absolute form.
    let absolute = req.version() < Version::HTTP_2 && !connect;
    if absolute
        && let (Some(h), Some(a)) = (host, req.uri().authority())
        && !h.as_bytes().eq_ignore_ascii_case(a.as_str().as_bytes())
    {
        return Err(LocalError::BadRequest(BadRequest::HostMismatch));
    }
    Ok(())
}

impl Handler {
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
}
