//! The outbound pipeline: accept -> orig_dst -> route (mesh or passthrough)
//! -> detect (HTTP/1.1 goes to `http::outbound`) -> tls (originate in
//! `forward::dial_peer`, verifying the server's SPIFFE ID during the
//! handshake) -> forward.

use std::sync::Arc;

use tracing::{Instrument, field};

use crate::accept::{Accepted, Listener};
use crate::access::Pending;
use crate::config::{ClientConfigId, Direction};
use crate::detect::{self, Protocol, Sniffed};
use crate::drain::Watch;
use crate::forward::PeerError;
use crate::metrics::{ForwardFailure, HandshakeResult};
use crate::route::{self, OutboundRoute};
use crate::server::Shared;
use crate::{forward, metrics};

/// How an outbound listener picks the server identity to expect.
#[derive(Debug, Clone, Copy)]
pub enum ServerChoice {
    /// By the outbound routing rules, from the destination.
    ByRoute,
    /// A fixed client configuration (explicit listener with its own identities).
    Fixed(ClientConfigId),
}

/// Serves an outbound listener until the drain starts.
pub async fn serve(
    listener: Listener,
    choice: ServerChoice,
    shared: Arc<Shared>,
    mut watch: Watch,
) {
    loop {
        let accepted = tokio::select! {
            _ = watch.signaled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok(Ok(a)) => {
                let shared = shared.clone();
                let w = watch.clone();
                tokio::spawn(handle(a, choice, shared, w));
            }
            Ok(Err((e, client))) => {
                tracing::info!(src.addr = %client.0, error = %e, "outbound connection refused");
                metrics::forward_error(Direction::Outbound, e.reason());
            }
            Err(e) => crate::server::accept_backoff(Direction::Outbound, e).await,
        }
    }
}

/// Refusals during an identity outage: one line per 10 s, with a count.
static NO_IDENTITY_LOG: crate::log_limit::RateLimited =
    crate::log_limit::RateLimited::new(crate::log_limit::EVERY);

async fn handle(accepted: Accepted, choice: ServerChoice, shared: Arc<Shared>, watch: Watch) {
    let _gauge = metrics::ConnectionGauge::open(Direction::Outbound);
    let dst = accepted.orig_dst.0;
    let span = tracing::info_span!(
        "conn",
        direction = "outbound",
        src.addr = %accepted.client.0,
        dst.addr = %dst,
        peer.id = field::Empty,
    );
    async move {
        let limits = &shared.config.limits;
        let route = match choice {
            ServerChoice::Fixed(i) => OutboundRoute::Mesh(i),
            ServerChoice::ByRoute => route::route(&shared.config.outbound, dst),
        };
        let index = match route {
            OutboundRoute::Passthrough => {
                tracing::debug!("passthrough (outside the mesh)");
                match forward::passthrough(accepted.stream, dst, limits.connect_timeout).await {
                    Ok(t) => metrics::bytes(Direction::Outbound, t.to_target, t.to_client),
                    Err(forward::ForwardError::Connect(e)) => {
                        tracing::info!(error = %e, "destination unreachable");
                        metrics::forward_error(Direction::Outbound, e.reason());
                    }
                    Err(e) => tracing::debug!(error = %e, "connection ended with an error"),
                }
                return;
            }
            OutboundRoute::NoServerRule => {
                tracing::warn!(
                    "connection refused: no server identity configured for this destination"
                );
                metrics::forward_error(Direction::Outbound, ForwardFailure::NoServerRule);
                return;
            }
            OutboundRoute::Mesh(i) => i,
        };
        let Some(configs) = shared.identity() else {
            if let Some(suppressed) = NO_IDENTITY_LOG.hit() {
                tracing::info!(suppressed, "connection refused: no identity");
            }
            metrics::handshake(Direction::Outbound, HandshakeResult::NoIdentity);
            return;
        };
        let client_cfg = index.of(&configs).clone();
        drop(configs);
        // Stage: detect. HTTP/1.1 from the app rides the pooled HTTP/2
        // connection to the peer sidecar; everything else is tunneled.
        if !shared.config.outbound.opaque_ports.contains(&dst.port()) {
            match detect::detect_socket(
                &accepted.stream,
                limits.detect_timeout,
                Direction::Outbound,
            )
            .await
            {
                Ok(Sniffed::Decided(Protocol::Http1)) => {
                    metrics::detected(Direction::Outbound, Protocol::Http1);
                    let Accepted {
                        stream,
                        slot,
                        client,
                        ..
                    } = accepted;
                    crate::http::outbound::serve(
                        stream,
                        client.0,
                        dst,
                        index.index(),
                        shared.clone(),
                        watch,
                    )
                    .await;
                    drop(slot);
                    return;
                }
                Ok(Sniffed::Decided(p @ (Protocol::Http2 | Protocol::Tls | Protocol::Opaque))) => {
                    metrics::detected(Direction::Outbound, p);
                }
                Ok(Sniffed::TimedOut) => metrics::detected(Direction::Outbound, Protocol::Opaque),
                Err(e) => {
                    tracing::debug!(error = %e, "connection failed before detection");
                    return;
                }
            }
        }
        let dialed = forward::dial_peer(
            dst,
            client_cfg,
            limits.connect_timeout,
            limits.handshake_timeout,
        )
        .await;
        let (tls_stream, peer) = match dialed {
            Ok(x) => x,
            Err(PeerError::Connect(e)) => {
                tracing::info!(error = %e, "destination unreachable");
                metrics::forward_error(Direction::Outbound, e.reason());
                return;
            }
            Err(PeerError::Handshake(e)) => {
                tracing::info!(reason = e.result().as_str(), error = %e, "handshake failed");
                return;
            }
        };
        tracing::Span::current().record("peer.id", field::display(peer.principal()));
        let mut event = Pending::open(&shared.access, Direction::Outbound, accepted.client.0, dst);
        event.peer_copied(Some(peer.principal()));
        let spliced = tokio::select! {
            r = forward::to_peer(accepted.stream, tls_stream) => r,
            () = shared.identity_withdrawn() => {
                tracing::info!("identity withdrawn: mTLS connection closed");
                return;
            }
        };
        match spliced {
            Ok(t) => {
                metrics::bytes(Direction::Outbound, t.to_target, t.to_client);
                event.bytes(t.to_target, t.to_client);
                tracing::debug!(
                    bytes.to_peer = t.to_target,
                    bytes.to_app = t.to_client,
                    "connection closed"
                );
            }
            Err(e) => tracing::debug!(error = %e, "connection ended with an error"),
        }
    }
    .instrument(span)
    .await
}
