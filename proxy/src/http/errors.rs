//! Every answer the sidecar gives an HTTP request itself, inbound and
//! outbound, and [`LocalError::wire`], the one function that maps each to
//! its wire form (HTTP status, gRPC status for gRPC callers) and its metric
//! label, as rustls maps its errors to alerts. gRPC callers get a
//! trailers-only response with `grpc-status`, whichever side refused.

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::{Either, Full};
use rampart_authz::{Denial, PathError};
use rampart_identity::SpiffeId;

use super::ProxyBody;
use super::tunnel::TunnelError;
use crate::forward::ConnectError;
use crate::metrics::LocalReason;
use crate::tls::HandshakeError;

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
    /// The request's JWT does not verify (RequestAuthentication).
    #[error("Jwt verification fails: {0}")]
    Unauthenticated(rampart_authz::jwt::JwtError),
    /// The app refused, reset or broke the exchange.
    #[error("app unreachable: {0}")]
    AppUnreachable(Box<dyn std::error::Error + Send + Sync>),
    /// The app did not answer in time.
    #[error("app did not answer in time")]
    AppTimeout,
    /// The client's request body stopped moving (the client's fault).
    #[error("request body stalled")]
    UploadStalled,
    /// A Rego policy reads the body (`with_request_body`) and it is longer
    /// than `max_request_bytes`, without `allow_partial_message` (Envoy's
    /// 413).
    #[error("Payload Too Large: the request body is over {0} bytes")]
    BodyTooLarge(u32),
    /// A request whose head is ambiguous (the client's fault).
    #[error("bad request: {0}")]
    BadRequest(BadRequest),
    /// The client's request body broke its own framing (malformed chunked
    /// encoding) while it was sent on: the client's fault, not the app's.
    #[error("bad request: malformed body framing")]
    MalformedBody,
    /// A `CONNECT` or `Upgrade` request that the policies allow only by a
    /// rule that does not name its method (see `docs/policy.md`).
    #[error("{0} is refused unless an ALLOW rule names its method")]
    TunnelNotAllowed(&'static str),
    /// The app could not be reached for a tunnel.
    #[error("app unreachable: {0}")]
    AppConnect(ConnectError),
    /// A tunnel request to the app failed or timed out.
    #[error("{0}")]
    Tunnel(TunnelError),
    /// A tunnel request for a port declared `http2` or `grpc`.
    #[error("upgrade and CONNECT need an HTTP/1.1 app")]
    TunnelToHttp2App,
    /// hyper offered no upgrade for a tunnel request (a bug).
    #[error("connection cannot be upgraded")]
    NotUpgradable,
    /// Outbound: the sidecar has no identity (yet, or any more).
    #[error("no identity: no upstream connection available")]
    NoIdentity,
    /// Outbound: every pooled connection is in use and none closed within
    /// the connect timeout.
    #[error("pooled connection limit ({0}) reached: no upstream connection available")]
    PoolFull(usize),
    /// Outbound: the peer sidecar could not be reached.
    #[error("upstream sidecar unreachable: {0}")]
    PeerConnect(ConnectError),
    /// Outbound: the handshake with the peer sidecar failed (for example,
    /// it is not the identity expected at this destination).
    #[error("upstream sidecar refused: {0}")]
    PeerHandshake(HandshakeError),
    /// Outbound: the exchange with the peer sidecar failed.
    #[error("upstream sidecar unreachable: {0}")]
    PeerExchange(crate::http::pool::SendError),
    /// Outbound: a tunnel request to the peer sidecar failed or timed out.
    #[error("upstream sidecar: {0}")]
    PeerTunnel(TunnelError),
    /// Outbound: the peer sidecar did not answer in time.
    #[error("upstream sidecar did not answer in time")]
    PeerTimeout,
    /// Outbound: discovery knows the destination's service, and it has no
    /// endpoint to send to (none, none with an identity, or none left to
    /// retry on).
    #[error("no endpoint available: {0}")]
    NoEndpoint(rampart_discovery::balance::NoEndpoint),
    /// Outbound: the request cannot be addressed to the destination (a bug).
    #[error("request cannot be addressed to its destination")]
    Unroutable,
}

/// What makes a request head ambiguous, so that the sidecar and the app
/// might read it differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadRequest {
    /// Two `Host` fields (RFC 9112 §3.2: 400).
    #[error("more than one Host field")]
    DuplicateHost,
    /// `Host` disagrees with an absolute-form target (RFC 9112 §3.2.2:
    /// the target's authority wins, so the policy and the app must not
    /// see different ones).
    #[error("Host disagrees with the request target")]
    HostMismatch,
}

/// What goes on the wire, and in the metric, for a [`LocalError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wire {
    /// The HTTP status.
    pub status: StatusCode,
    /// The gRPC status code for gRPC callers
    /// (grpc/doc/http-grpc-status-mapping.md, with PERMISSION_DENIED for
    /// policy refusals).
    pub grpc: u8,
    /// The `reason` label of `rampart_http_local_responses_total`.
    pub reason: LocalReason,
}

/// What Envoy maps an HTTP status without a gRPC meaning to (413).
const GRPC_UNKNOWN: u8 = 2;
const GRPC_DEADLINE_EXCEEDED: u8 = 4;
const GRPC_PERMISSION_DENIED: u8 = 7;
const GRPC_UNIMPLEMENTED: u8 = 12;
const GRPC_INTERNAL: u8 = 13;
const GRPC_UNAVAILABLE: u8 = 14;
const GRPC_UNAUTHENTICATED: u8 = 16;

impl LocalError {
    /// The wire form and metric label: the one place they are decided.
    pub fn wire(&self) -> Wire {
        let (status, grpc, reason) = match self {
            LocalError::NoPath => (StatusCode::BAD_REQUEST, GRPC_INTERNAL, LocalReason::NoPath),
            LocalError::BadPath(e) => (e.http_status(), GRPC_INTERNAL, LocalReason::BadPath),
            LocalError::Denied(d) => (d.http_status(), GRPC_PERMISSION_DENIED, LocalReason::Denied),
            LocalError::Unauthenticated(_) => (
                StatusCode::UNAUTHORIZED,
                GRPC_UNAUTHENTICATED,
                LocalReason::JwtInvalid,
            ),
            LocalError::AppUnreachable(_) | LocalError::AppConnect(_) => (
                StatusCode::BAD_GATEWAY,
                GRPC_UNAVAILABLE,
                LocalReason::AppUnreachable,
            ),
            LocalError::AppTimeout => (
                StatusCode::GATEWAY_TIMEOUT,
                GRPC_DEADLINE_EXCEEDED,
                LocalReason::AppTimeout,
            ),
            LocalError::UploadStalled => (
                StatusCode::REQUEST_TIMEOUT,
                GRPC_DEADLINE_EXCEEDED,
                LocalReason::UploadStalled,
            ),
            LocalError::BodyTooLarge(_) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                GRPC_UNKNOWN,
                LocalReason::BodyTooLarge,
            ),
            LocalError::BadRequest(_) | LocalError::MalformedBody => (
                StatusCode::BAD_REQUEST,
                GRPC_INTERNAL,
                LocalReason::BadRequest,
            ),
            LocalError::TunnelNotAllowed(_) => (
                StatusCode::FORBIDDEN,
                GRPC_PERMISSION_DENIED,
                LocalReason::TunnelNotAllowed,
            ),
            LocalError::Tunnel(TunnelError::Exchange(_)) => (
                StatusCode::BAD_GATEWAY,
                GRPC_UNAVAILABLE,
                LocalReason::AppUnreachable,
            ),
            LocalError::Tunnel(TunnelError::Timeout) => (
                StatusCode::GATEWAY_TIMEOUT,
                GRPC_DEADLINE_EXCEEDED,
                LocalReason::AppTimeout,
            ),
            LocalError::TunnelToHttp2App => (
                StatusCode::NOT_IMPLEMENTED,
                GRPC_UNIMPLEMENTED,
                LocalReason::TunnelUnsupported,
            ),
            LocalError::NotUpgradable => (
                StatusCode::INTERNAL_SERVER_ERROR,
                GRPC_INTERNAL,
                LocalReason::NotUpgradable,
            ),
            LocalError::NoIdentity => (
                StatusCode::SERVICE_UNAVAILABLE,
                GRPC_UNAVAILABLE,
                LocalReason::NoIdentity,
            ),
            LocalError::PoolFull(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                GRPC_UNAVAILABLE,
                LocalReason::PoolFull,
            ),
            LocalError::NoEndpoint(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                GRPC_UNAVAILABLE,
                LocalReason::NoEndpoint,
            ),
            LocalError::PeerConnect(_)
            | LocalError::PeerExchange(_)
            | LocalError::PeerTunnel(TunnelError::Exchange(_)) => (
                StatusCode::BAD_GATEWAY,
                GRPC_UNAVAILABLE,
                LocalReason::PeerUnreachable,
            ),
            LocalError::PeerHandshake(e) => (
                StatusCode::BAD_GATEWAY,
                GRPC_UNAVAILABLE,
                match e {
                    HandshakeError::IdNotAllowed(_) => LocalReason::PeerNotAllowed,
                    HandshakeError::NoClientCert
                    | HandshakeError::UnknownCa(_)
                    | HandshakeError::Expired
                    | HandshakeError::InvalidSvid(_)
                    | HandshakeError::Protocol(_)
                    | HandshakeError::Timeout
                    | HandshakeError::NoPeerId => LocalReason::PeerHandshakeFailed,
                },
            ),
            LocalError::PeerTimeout | LocalError::PeerTunnel(TunnelError::Timeout) => (
                StatusCode::GATEWAY_TIMEOUT,
                GRPC_DEADLINE_EXCEEDED,
                LocalReason::PeerTimeout,
            ),
            LocalError::Unroutable => (
                StatusCode::INTERNAL_SERVER_ERROR,
                GRPC_INTERNAL,
                LocalReason::Internal,
            ),
        };
        Wire {
            status,
            grpc,
            reason,
        }
    }

    /// The response sent to the client: trailers-only with `grpc-status`
    /// for a gRPC caller, a short text otherwise. A denial's body names the
    /// workload whose policy refused (`local_id`).
    pub fn into_response(self, grpc: bool, local_id: Option<&SpiffeId>) -> Response<ProxyBody> {
        let wire = self.wire();
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
            h.insert("grpc-status", HeaderValue::from(u16::from(wire.grpc)));
            if let Ok(v) = HeaderValue::try_from(grpc_message(body.trim_end())) {
                h.insert("grpc-message", v);
            }
            r
        } else {
            let mut r = Response::new(Either::Right(Full::new(Bytes::from(body))));
            *r.status_mut() = wire.status;
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
    fn grpc_messages_are_percent_encoded() {
        assert_eq!(grpc_message("a b%\u{e9}"), "a b%25%C3%A9");
    }

    #[test]
    fn local_errors_map_to_statuses() {
        let cases = [
            (LocalError::NoPath, 400, 13, "no_path"),
            (LocalError::AppTimeout, 504, 4, "app_timeout"),
            (LocalError::TunnelToHttp2App, 501, 12, "tunnel_unsupported"),
            (LocalError::UploadStalled, 408, 4, "upload_stalled"),
            (LocalError::BodyTooLarge(10), 413, 2, "body_too_large"),
            (
                LocalError::BadRequest(BadRequest::DuplicateHost),
                400,
                13,
                "bad_request",
            ),
            (LocalError::MalformedBody, 400, 13, "bad_request"),
            (
                LocalError::TunnelNotAllowed("CONNECT"),
                403,
                7,
                "tunnel_not_allowed",
            ),
            (
                LocalError::Tunnel(TunnelError::Timeout),
                504,
                4,
                "app_timeout",
            ),
            (LocalError::NoIdentity, 503, 14, "no_identity"),
            (LocalError::PoolFull(3), 503, 14, "pool_full"),
            (
                LocalError::NoEndpoint(rampart_discovery::balance::NoEndpoint::Empty("s".into())),
                503,
                14,
                "no_endpoint",
            ),
            (LocalError::PeerTimeout, 504, 4, "peer_timeout"),
            (
                LocalError::PeerHandshake(HandshakeError::IdNotAllowed("x".into())),
                502,
                14,
                "peer_not_allowed",
            ),
            (
                LocalError::PeerHandshake(HandshakeError::Timeout),
                502,
                14,
                "peer_handshake_failed",
            ),
        ];
        for (e, http, grpc, label) in cases {
            let w = e.wire();
            assert_eq!(w.status.as_u16(), http, "{e}");
            assert_eq!(w.grpc, grpc, "{e}");
            assert_eq!(w.reason.as_str(), label, "{e}");
        }
    }

    #[test]
    fn grpc_callers_get_a_grpc_status_from_either_side() {
        let r = LocalError::PoolFull(1).into_response(true, None);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "14");
        assert_eq!(r.headers()["content-type"], "application/grpc");
        let r = LocalError::PoolFull(1).into_response(false, None);
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}
