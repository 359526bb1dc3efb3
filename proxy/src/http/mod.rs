//! HTTP through the pipeline, inbound and outbound side by side; neither
//! imports the other.
//!
//! Inbound (a detected HTTP connection after `tls`): [`server`] serves it
//! with hyper and opens each request's access event, [`authorize`] builds
//! the request's authorization input (normalized path, CUSTOM consults)
//! and hands the decision to the `authz` stage, [`forward`] rewrites the
//! permitted request's head for the app and hands it to the `forward`
//! stage. Outbound (the app's HTTP/1.1 after `detect`): [`outbound`] serves
//! the app's connection and carries each request as it is, HTTP/1.1, over a
//! pooled mTLS connection ([`pool`]) to the peer sidecar.
//!
//! Shared by both: [`headers`] (hop-by-hop fields, XFCC, request IDs, the
//! original-protocol marker), [`errors`] (every answer the sidecar makes
//! itself, with its wire form and metric label), [`tunnel`] (`Upgrade` and
//! `CONNECT`) and [`body`] (request bodies that must keep moving).
//!
//! Bodies and trailers stream through untouched in both directions (hyper's
//! bounded buffers and HTTP/2 flow control apply); only heads are rewritten.

pub mod authorize;
pub mod body;
pub mod errors;
pub mod forward;
pub mod headers;
pub mod outbound;
pub mod pool;
pub mod server;
pub mod tunnel;

use bytes::Bytes;
use http::HeaderMap;
use http::header;
use http_body_util::{Either, Full};

/// Response bodies: the far end's, streamed, or a short local one.
pub type ProxyBody = Either<pool::UpstreamBody, Full<Bytes>>;

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
    /// Undeclared ports: HTTP/1.1, since an app is taken to speak HTTP/1.1
    /// unless its port is declared `http2` or `grpc` (an HTTP/1.1-only app
    /// must never get HTTP/2 because a client chose it); except gRPC
    /// requests that arrived as HTTP/2, which only HTTP/2 can carry.
    Http1ExceptGrpc,
    /// Always HTTP/2 (declared `http2` and `grpc` ports).
    Http2,
    /// Always HTTP/1.1 (declared `http` ports: the app speaks HTTP/1.1,
    /// whatever an ingress negotiated with the sidecar).
    Http1,
}

/// The declared `content-length`, if any and valid.
pub(crate) fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// Whether a request is gRPC (its local errors are then gRPC statuses).
pub(crate) fn is_grpc(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}
