//! What the proxy tells authz about one HTTP request. Everything is borrowed
//! from the proxy's own request, so building a [`RequestInfo`] is free.

use std::net::SocketAddr;

use rampart_identity::SpiffeId;

/// The HTTP version a request arrived with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpProtocol {
    /// HTTP/1.0.
    Http10,
    /// HTTP/1.1.
    Http11,
    /// HTTP/2.
    Http2,
}

impl HttpProtocol {
    /// Envoy's spelling (`HTTP/1.0`, `HTTP/1.1`, `HTTP/2`).
    pub fn as_str(self) -> &'static str {
        match self {
            HttpProtocol::Http10 => "HTTP/1.0",
            HttpProtocol::Http11 => "HTTP/1.1",
            HttpProtocol::Http2 => "HTTP/2",
        }
    }
}

/// One inbound HTTP request, as authz sees it.
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo<'a> {
    /// Request method.
    pub method: &'a http::Method,
    /// `Host` header or `:authority` (may carry a port).
    pub authority: &'a str,
    /// The normalized path ([`crate::normalize_path`]), which is also the
    /// path the proxy forwards.
    pub path: &'a str,
    /// The request target as received (path and query, not decoded).
    pub raw_path_and_query: &'a str,
    /// The query string without `?`, if any.
    pub query: Option<&'a str>,
    /// Request headers.
    pub headers: &'a http::HeaderMap,
    /// HTTP version.
    pub protocol: HttpProtocol,
    /// `https` when the request came over TLS, else `http`.
    pub scheme: &'a str,
    /// `/pkg.Service/Method` when the request is gRPC (see [`grpc_method_of`]).
    pub grpc_method: Option<&'a str>,
    /// Where the request came from.
    pub source: SocketAddr,
    /// Where it was going (the original destination).
    pub destination: SocketAddr,
    /// The inbound sidecar's own SPIFFE ID (XFCC `By`, Envoy's destination
    /// principal).
    pub local_identity: Option<&'a SpiffeId>,
    /// SHA-256 of the peer's DER certificate, lower-case hex (XFCC `Hash`).
    pub peer_cert_sha256: Option<&'a str>,
}

/// The gRPC full method of a request: its normalized path when the
/// content-type is `application/grpc` (or `application/grpc+...`) and the path
/// has the shape `/pkg.Service/Method`.
pub fn grpc_method_of<'p>(path: &'p str, headers: &http::HeaderMap) -> Option<&'p str> {
    let ct = headers.get(http::header::CONTENT_TYPE)?.as_bytes();
    let is_grpc = ct == b"application/grpc"
        || ct.starts_with(b"application/grpc+")
        || ct.starts_with(b"application/grpc;");
    if !is_grpc {
        return None;
    }
    let (svc, method) = path.strip_prefix('/')?.split_once('/')?;
    if svc.is_empty() || method.is_empty() || method.contains('/') {
        return None;
    }
    Some(path)
}

/// The service part of a gRPC full method.
pub(crate) fn grpc_service(full_method: &str) -> &str {
    let bare = full_method.strip_prefix('/').unwrap_or(full_method);
    match bare.split_once('/') {
        Some((svc, _)) => svc,
        None => bare,
    }
}
