//! The inbound pipeline: accept -> orig_dst -> tls (terminate, authenticate)
//! -> authz -> forward to the app over loopback.

use std::net::SocketAddr;
use std::sync::Arc;

use tracing::{Instrument, field};

use crate::accept::{Accepted, Listener};
use crate::config::Direction;
use crate::drain::Watch;
use crate::server::Shared;
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
                tokio::spawn(async move {
                    handle(a, target, shared).await;
                    drop(w);
                });
            }
            Ok(Err((e, client))) => {
                tracing::info!(src.addr = %client.0, error = %e, "inbound connection refused");
                metrics::forward_error(Direction::Inbound, "no_original_dst");
            }
            Err(e) => crate::server::accept_backoff(Direction::Inbound, e).await,
        }
    }
}

async fn handle(accepted: Accepted, target: AppTarget, shared: Arc<Shared>) {
    let _gauge = metrics::ConnectionGauge::open(Direction::Inbound);
    let span = tracing::info_span!(
        "conn",
        direction = "inbound",
        src.addr = %accepted.client.0,
        dst.addr = %accepted.orig_dst.0,
        peer.id = field::Empty,
    );
    async move {
        let Some(configs) = shared.identity() else {
            // No identity yet (or it expired): refuse rather than present nothing.
            tracing::info!("connection refused: no identity");
            metrics::handshake(Direction::Inbound, "no_identity");
            return;
        };
        let server_cfg = configs.server[0].clone();
        drop(configs);
        let authn = match tls::terminate(
            accepted,
            server_cfg,
            shared.config.limits.handshake_timeout,
        )
        .await
        {
            Ok(a) => a,
            Err(e) => {
                tracing::info!(reason = e.label(), error = %e, "handshake failed");
                metrics::handshake(Direction::Inbound, e.label());
                return;
            }
        };
        metrics::handshake(Direction::Inbound, "ok");
        tracing::Span::current().record("peer.id", field::display(&authn.peer.id));
        let (app, port) = target.resolve(authn.orig_dst.0);
        let permitted = match authz::authorize(authn, port, &shared.config.authorizer) {
            Ok(p) => p,
            Err(denied) => {
                let (conn, denial) = *denied;
                tracing::info!(
                    peer.id = %conn.peer.id,
                    dst.port = port,
                    reason = denial.reason.as_str(),
                    authz.policy = denial.policy.as_deref().unwrap_or("-"),
                    "connection denied"
                );
                let mut stream = conn.stream;
                // Best effort: tell the peer we are closing (close_notify).
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut stream).await;
                return;
            }
        };
        match forward::forward_inbound(permitted, app, shared.config.limits.connect_timeout).await {
            Ok(t) => {
                metrics::bytes(Direction::Inbound, t.to_target, t.to_client);
                tracing::debug!(
                    bytes.to_app = t.to_target,
                    bytes.to_peer = t.to_client,
                    "connection closed"
                );
            }
            Err(forward::ForwardError::Connect(e)) => {
                tracing::info!(error = %e, "app unreachable");
                metrics::forward_error(Direction::Inbound, e.label());
            }
            Err(forward::ForwardError::Io(e)) => {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        }
    }
    .instrument(span)
    .await
}
