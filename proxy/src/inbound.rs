//! The inbound pipeline: accept -> orig_dst -> detect (PERMISSIVE ports:
//! TLS or plaintext) -> tls (terminate, authenticate) -> detect (HTTP or
//! opaque) -> authz per connection and forward (opaque), or `http` (authz
//! per request).

use std::net::SocketAddr;
use std::sync::Arc;

use tracing::{Instrument, field};

use crate::accept::{Accepted, Listener};
use crate::access::Pending;
use crate::config::{DeclaredProtocol, Direction, ProxyConfig, TlsMode};
use crate::detect::{self, Protocol, Sniffed};
use crate::drain::Watch;
use crate::http::{self, AppVersion, ServeVersion};
use crate::metrics::HandshakeResult;
use crate::server::Shared;
use crate::tls::Authenticated;
use crate::{authz, forward, metrics, tls};

/// Where inbound connections go after authorization.
#[derive(Debug, Clone, Copy)]
pub enum AppTarget {
    /// Captured traffic: the app on `host`, at the port the client asked for.
    OriginalPort {
        /// The app's address, usually loopback.
        host: std::net::IpAddr,
    },
    /// Explicit listener: a fixed target; `port` is what policies see.
    Fixed {
        /// The app.
        target: SocketAddr,
        /// The port policies see.
        port: u16,
    },
}

impl AppTarget {
    fn resolve(self, orig_dst: SocketAddr) -> (SocketAddr, u16) {
        match self {
            AppTarget::OriginalPort { host } => {
                (SocketAddr::new(host, orig_dst.port()), orig_dst.port())
            }
            AppTarget::Fixed { target, port } => (target, port),
        }
    }
}

/// Serves an inbound listener until the drain starts.
pub async fn serve(listener: Listener, target: AppTarget, shared: Arc<Shared>, mut watch: Watch) {
    loop {
        let accepted = tokio::select! {
            _ = watch.signaled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok(Ok(a)) => {
                let shared = shared.clone();
                let w = watch.clone();
                tokio::spawn(handle(a, target, shared, w));
            }
            Ok(Err((e, client))) => {
                tracing::info!(src.addr = %client.0, error = %e, "inbound connection refused");
                metrics::forward_error(Direction::Inbound, e.reason());
            }
            Err(e) => crate::server::accept_backoff(Direction::Inbound, e).await,
        }
    }
}

/// Refusals during an identity outage: one line per 10 s, with a count.
static NO_IDENTITY_LOG: crate::log_limit::RateLimited =
    crate::log_limit::RateLimited::new(crate::log_limit::EVERY);

async fn handle(accepted: Accepted, target: AppTarget, shared: Arc<Shared>, watch: Watch) {
    let _gauge = metrics::ConnectionGauge::open(Direction::Inbound);
    let span = tracing::info_span!(
        "conn",
        direction = "inbound",
        src.addr = %accepted.client.0,
        dst.addr = %accepted.orig_dst.0,
        peer.id = field::Empty,
        protocol = field::Empty,
    );
    async move {
        let (app, port) = target.resolve(accepted.orig_dst.0);
        let settings = shared.config.inbound_port(port);
        let limits = &shared.config.limits;
        // Stage: detect on the socket, only where plaintext is allowed.
        // `known`: what the socket already told about a plaintext stream.
        let mut silent_socket = false;
        let (is_tls, known) = match settings.mode {
            TlsMode::Strict => (true, None),
            TlsMode::PermissiveAllowPlaintext => {
                match detect::detect_socket(
                    &accepted.stream,
                    limits.detect_timeout,
                    Direction::Inbound,
                )
                .await
                {
                    Ok(Sniffed::Decided(Protocol::Tls)) => (true, None),
                    Ok(Sniffed::Decided(p)) => (false, Some(p)),
                    Ok(Sniffed::TimedOut) => {
                        silent_socket = true;
                        (false, Some(Protocol::Opaque))
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "connection failed before detection");
                        return;
                    }
                }
            }
        };
        let authn = if is_tls {
            let Some(configs) = shared.identity() else {
                // No identity yet (or it expired): refuse rather than present nothing.
                if let Some(suppressed) = NO_IDENTITY_LOG.hit() {
                    tracing::info!(suppressed, "connection refused: no identity");
                }
                metrics::handshake(Direction::Inbound, HandshakeResult::NoIdentity);
                return;
            };
            let server_cfg = ProxyConfig::server_config(&settings).of(&configs).clone();
            let own_expiry = configs.svid.not_after;
            drop(configs);
            match tls::terminate(accepted, server_cfg, limits.handshake_timeout).await {
                Ok(mut a) => {
                    metrics::handshake(Direction::Inbound, HandshakeResult::Ok);
                    // The connection ends with the SVID it was made with.
                    a.expires = tls::earlier(a.expires, Some(own_expiry));
                    a
                }
                Err(e) => {
                    tracing::info!(reason = e.result().as_str(), error = %e, "handshake failed");
                    metrics::handshake(Direction::Inbound, e.result());
                    return;
                }
            }
        } else {
            tls::allow_plaintext(accepted)
        };
        if let Some(p) = &authn.peer {
            tracing::Span::current().record("peer.id", field::display(p.principal()));
        }
        // Stage: detect inside TLS (or on the plaintext stream).
        let (protocol, mut authn) =
            match detect_inner(authn, settings.protocol, known, silent_socket, limits).await {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, "connection failed before detection");
                    return;
                }
            };
        // Handshake and detection done: no longer pending for its source.
        authn.slot.established();
        metrics::detected(Direction::Inbound, protocol.as_str_protocol());
        tracing::Span::current().record("protocol", protocol.as_str());
        let (protocol, authn) = if protocol == Inner::Silent
            && !authz::admits_connection(&authn, port, &shared.config.authorizer)
        {
            // Silent, and no policy admits an opaque connection here (they
            // ask for HTTP): a client that opened its connection ahead of
            // its first request. Its request is served whenever it comes,
            // within the idle timeout.
            match detect::detect_stream(authn.stream, limits.http_idle_timeout, Direction::Inbound)
                .await
            {
                Ok((p, rewound)) => {
                    let authn = Authenticated {
                        stream: Box::new(rewound),
                        ..authn
                    };
                    match p {
                        Protocol::Http1 => (Inner::Http(ServeVersion::Http1), authn),
                        Protocol::Http2 => (Inner::Http(ServeVersion::Http2), authn),
                        Protocol::Tls | Protocol::Opaque => (Inner::Opaque, authn),
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "connection failed before detection");
                    return;
                }
            }
        } else {
            (protocol, authn)
        };
        if let Some(serve) = protocol.serve_version() {
            let conn = inbound_conn(
                (authn.client.0, authn.orig_dst.0),
                authn.peer,
                authn.sni.clone(),
                (port, app, serve),
                settings.protocol,
                authn.expires,
            );
            let slot = authn.slot;
            http::server::serve(authn.stream, conn, shared.clone(), watch).await;
            drop(slot);
            return;
        }
        // A silent client on a detect port that a policy admits as opaque:
        // spliced, but if it, not the app, speaks first and may speak HTTP,
        // it is served as HTTP instead (`detect::LateWatch`).
        let (authn, late) = if protocol == Inner::Silent {
            let ends = (authn.client.0, authn.orig_dst.0);
            let (peer, sni, expires) = (authn.peer.clone(), authn.sni.clone(), authn.expires);
            let (watched, handle) = detect::LateWatch::new(authn.stream);
            let authn = Authenticated {
                stream: Box::new(watched),
                ..authn
            };
            (authn, Some((handle, ends, peer, sni, expires)))
        } else {
            (authn, None)
        };
        // Stage: authz, once for the connection, then forward.
        let expires = authn.expires;
        let mut event = Pending::open(
            &shared.access,
            Direction::Inbound,
            authn.client.0,
            authn.orig_dst.0,
        );
        let cell = &shared.config.authorizer;
        let permitted = match authz::connection(authn, port, cell, &mut event) {
            Ok(p) => p,
            Err(refused) => {
                event.peer_copied(refused.conn.peer.as_ref().map(|p| p.principal()));
                let mut stream = refused.conn.stream;
                // Best effort: tell the peer we are closing (close_notify).
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut stream).await;
                return;
            }
        };
        event.peer_copied(permitted.peer().map(|p| p.principal()));
        let tls = permitted.peer().is_some();
        let forwarded = forward::connection(permitted, app, limits.connect_timeout);
        let forwarded = if tls {
            tokio::select! {
                r = forwarded => r,
                () = shared.mtls_ends(expires) => {
                    tracing::info!("identity withdrawn or certificates expired: mTLS connection closed");
                    return;
                }
            }
        } else {
            forwarded.await
        };
        match forwarded {
            Ok(t) => {
                metrics::bytes(Direction::Inbound, t.to_target, t.to_client);
                event.bytes(t.to_target, t.to_client);
                tracing::debug!(
                    bytes.to_app = t.to_target,
                    bytes.to_peer = t.to_client,
                    "connection closed"
                );
            }
            Err(forward::ForwardError::Connect(e)) => {
                tracing::info!(error = %e, "app unreachable");
                metrics::forward_error(Direction::Inbound, e.reason());
            }
            Err(forward::ForwardError::Io(e)) => {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            // Logged and counted by the authz stage.
            Err(forward::ForwardError::Revoked) => {}
        }
        if let Some((handle, ends, peer, sni, expires)) = late
            && let Some(stream) = handle.take_http()
        {
            tracing::debug!("a silent client spoke HTTP first: served as HTTP");
            metrics::detected(Direction::Inbound, Protocol::Http1);
            let conn = inbound_conn(
                ends,
                peer,
                sni,
                (port, app, ServeVersion::Auto),
                settings.protocol,
                expires,
            );
            http::server::serve(Box::new(stream), conn, shared.clone(), watch).await;
        }
    }
    .instrument(span)
    .await
}

/// What the HTTP stage is told about a connection: its ends, peer and SNI,
/// and (port, app, server-side versions).
fn inbound_conn(
    (source, destination): (SocketAddr, SocketAddr),
    peer: Option<rampart_identity::PeerIdentity>,
    sni: Option<Arc<str>>,
    (port, app, serve): (u16, SocketAddr, ServeVersion),
    declared: DeclaredProtocol,
    expires: Option<std::time::SystemTime>,
) -> http::server::InboundConn {
    http::server::InboundConn {
        source,
        destination,
        tls: peer.is_some(),
        peer,
        port,
        app,
        serve,
        app_version: match declared {
            DeclaredProtocol::Http2 | DeclaredProtocol::Grpc => AppVersion::Http2,
            DeclaredProtocol::Http => AppVersion::Http1,
            DeclaredProtocol::Detect | DeclaredProtocol::Opaque => AppVersion::Http1ExceptGrpc,
        },
        grpc_port: declared == DeclaredProtocol::Grpc,
        sni,
        expires,
    }
}

/// What the decrypted stream carries, after declarations and detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inner {
    /// Declared or detected HTTP, served with these versions.
    Http(ServeVersion),
    /// Opaque TCP.
    Opaque,
    /// Undeclared, and the client sent nothing within the detect timeout:
    /// opaque if a policy admits the connection so (a server may speak
    /// first), else waited on for a late first request.
    Silent,
}

impl Inner {
    fn serve_version(self) -> Option<ServeVersion> {
        match self {
            Inner::Http(v) => Some(v),
            Inner::Opaque | Inner::Silent => None,
        }
    }

    fn as_str(self) -> &'static str {
        self.as_str_protocol().as_str()
    }

    fn as_str_protocol(self) -> Protocol {
        match self {
            Inner::Http(ServeVersion::Http2) => Protocol::Http2,
            Inner::Http(ServeVersion::Http1 | ServeVersion::Auto) => Protocol::Http1,
            Inner::Opaque | Inner::Silent => Protocol::Opaque,
        }
    }
}

/// Declared protocols skip detection; otherwise the first decrypted bytes
/// decide, replayed afterwards (leaning towards HTTP: `detect::classify`).
/// ALPN `h2` only says the peer is a sidecar that can speak HTTP/2: it
/// also tunnels other bytes on such connections.
async fn detect_inner(
    mut authn: Authenticated,
    declared: DeclaredProtocol,
    known: Option<Protocol>,
    silent_socket: bool,
    limits: &crate::config::Limits,
) -> std::io::Result<(Inner, Authenticated)> {
    let inner = match declared {
        DeclaredProtocol::Opaque => Inner::Opaque,
        // ALPN said HTTP/1.1 (an ingress that offered only it): serve it.
        DeclaredProtocol::Http | DeclaredProtocol::Http2 | DeclaredProtocol::Grpc
            if authn.alpn_http1 =>
        {
            Inner::Http(http::ServeVersion::Http1)
        }
        // A peer sidecar (ALPN `h2`) speaks HTTP/1.1 on its pooled
        // connections and tunnels, and HTTP/2 when its app does, whatever
        // the port declares: the first bytes tell which, however late they
        // come (`http::server`). An ingress either.
        DeclaredProtocol::Http2 | DeclaredProtocol::Grpc if authn.alpn_h2 => {
            Inner::Http(ServeVersion::Auto)
        }
        DeclaredProtocol::Http => Inner::Http(ServeVersion::Auto),
        DeclaredProtocol::Http2 | DeclaredProtocol::Grpc => Inner::Http(ServeVersion::Http2),
        DeclaredProtocol::Detect => {
            let (p, silent) = match known {
                Some(p) => (p, silent_socket),
                None => {
                    let (p, rewound) = detect::detect_stream(
                        authn.stream,
                        limits.detect_timeout,
                        Direction::Inbound,
                    )
                    .await?;
                    let silent = rewound.replays_nothing();
                    authn.stream = Box::new(rewound);
                    (p, silent)
                }
            };
            match p {
                Protocol::Http1 => Inner::Http(ServeVersion::Http1),
                Protocol::Http2 => Inner::Http(ServeVersion::Http2),
                Protocol::Opaque if silent => Inner::Silent,
                // TLS inside TLS is the app's own: opaque to us.
                Protocol::Tls | Protocol::Opaque => Inner::Opaque,
            }
        }
    };
    Ok((inner, authn))
}
