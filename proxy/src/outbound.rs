//! The outbound pipeline: accept -> orig_dst -> route (passthrough, a rule's
//! identity, or what discovery knows) -> detect (HTTP/1.1 goes to
//! `http::outbound`, balanced per request) -> tls (originate in
//! `forward::dial_peer`, verifying the server's SPIFFE ID during the
//! handshake) -> forward. Opaque connections to a discovered service are
//! balanced per connection: the endpoint is picked before dialling, held
//! to its own SPIFFE ID, and a connection that cannot be opened or whose
//! handshake fails is tried once on another endpoint (nothing of the
//! app's has been sent yet).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rampart_discovery::balance::{Balancer, Outcome, Pick, Refusal};
use rampart_discovery::model::Destination;
use rampart_identity::store::TlsConfigs;
use rustls::ClientConfig;

use tracing::{Instrument, field};

use crate::accept::{Accepted, Listener};
use crate::access::Pending;
use crate::config::{ClientConfigId, Direction};
use crate::detect::{self, Protocol, Sniffed};
use crate::drain::Watch;
use crate::forward::PeerError;
use crate::http::outbound::PeerTarget;
use crate::metrics::{ForwardFailure, HandshakeResult};
use crate::route::{self, OutboundRoute};
use crate::server::Shared;
use crate::{forward, metrics};

/// How an outbound listener picks the server identity to expect.
#[derive(Debug, Clone)]
pub enum ServerChoice {
    /// By the outbound routing rules, from the destination.
    ByRoute,
    /// A fixed client configuration (explicit listener with its own identities).
    Fixed(ClientConfigId),
    /// By discovery, from the name an explicit listener targets: its
    /// service's endpoints, each with its own identity; a name discovery
    /// does not know is refused.
    ByName(Destination),
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
                tokio::spawn(handle(a, choice.clone(), shared, w));
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
            ServerChoice::ByName(name) => {
                route::resolve_name(shared.config.discovery.as_deref(), &name).await
            }
            ServerChoice::ByRoute => {
                route::resolve(
                    &shared.config.outbound,
                    shared.config.discovery.as_deref(),
                    dst,
                )
                .await
            }
        };
        let target = match route {
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
            OutboundRoute::UnknownName(name) => {
                tracing::warn!(destination = %name, "connection refused: no discovery source knows this name");
                metrics::forward_error(Direction::Outbound, ForwardFailure::NoEndpoint);
                return;
            }
            OutboundRoute::Unverifiable(e) => {
                tracing::warn!(
                    pod = e.owner.as_deref().unwrap_or("?"),
                    reason = ?e.identity,
                    "connection refused: discovery cannot derive the identity of the pod at this address"
                );
                rampart_discovery::metrics::unverifiable();
                metrics::forward_error(Direction::Outbound, ForwardFailure::UnverifiableEndpoint);
                return;
            }
            OutboundRoute::Mesh(i) => PeerTarget::Rule(i.index()),
            OutboundRoute::Service(b) => PeerTarget::Service(b),
            OutboundRoute::Endpoint(e) => match e.identity.id() {
                Some(id) => PeerTarget::Endpoint(e.addr, id.clone()),
                // Invariant: the route stage only says Endpoint with an ID.
                None => return,
            },
        };
        let Some(configs) = shared.identity() else {
            if let Some(suppressed) = NO_IDENTITY_LOG.hit() {
                tracing::info!(suppressed, "connection refused: no identity");
            }
            metrics::handshake(Direction::Outbound, HandshakeResult::NoIdentity);
            return;
        };
        // The SVID connections are made with: they end when it expires.
        let own_expiry = configs.svid.not_after;
        // Stage: detect. HTTP/1.1 from the app rides pooled HTTP/1.1 mTLS
        // connections to the peer sidecar; everything else is tunneled.
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
                    drop(configs);
                    crate::http::outbound::serve(
                        stream,
                        client.0,
                        dst,
                        target,
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
        let (tls_stream, peer, _pick) = match &target {
            PeerTarget::Service(b) => {
                match dial_service(b, &configs, limits.connect_timeout, limits.handshake_timeout)
                    .await
                {
                    Some((tls, peer, pick)) => (tls, peer, Some(pick)),
                    None => return,
                }
            }
            PeerTarget::Rule(_) | PeerTarget::Endpoint(..) => {
                let (addr, cfg) = match &target {
                    PeerTarget::Endpoint(addr, id) => (*addr, configs.endpoints.for_id(id)),
                    PeerTarget::Rule(i) => (dst, configs.client.get(*i).cloned()),
                    PeerTarget::Service(_) => (dst, None),
                };
                let Some(cfg) = cfg else {
                    tracing::info!("connection refused: no identity");
                    metrics::handshake(Direction::Outbound, HandshakeResult::NoIdentity);
                    return;
                };
                match dial(addr, cfg, limits.connect_timeout, limits.handshake_timeout).await {
                    Ok((tls, peer)) => (tls, peer, None),
                    Err(_) => return,
                }
            }
        };
        drop(configs);
        tracing::Span::current().record("peer.id", field::display(peer.principal()));
        // The connection ends with the SVID it was made with, or the peer's.
        let expires = crate::tls::earlier(
            crate::tls::peer_expiry(tls_stream.get_ref().1.peer_certificates()),
            Some(own_expiry),
        );
        let mut event = Pending::open(&shared.access, Direction::Outbound, accepted.client.0, dst);
        event.peer_copied(Some(peer.principal()));
        let spliced = tokio::select! {
            r = forward::to_peer(accepted.stream, tls_stream) => r,
            () = shared.mtls_ends(expires) => {
                tracing::info!("identity withdrawn or certificates expired: mTLS connection closed");
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

/// Dials `addr` and originates mTLS with `cfg`; failures are logged and
/// counted, and their kind returned for the balancer.
async fn dial(
    addr: SocketAddr,
    cfg: Arc<ClientConfig>,
    connect_timeout: Duration,
    handshake_timeout: Duration,
) -> Result<(crate::tls::ClientTls, rampart_identity::PeerIdentity), Refusal> {
    match forward::dial_peer(addr, cfg, connect_timeout, handshake_timeout).await {
        Ok(x) => Ok(x),
        Err(PeerError::Connect(e)) => {
            tracing::info!(endpoint = %addr, error = %e, "destination unreachable");
            metrics::forward_error(Direction::Outbound, e.reason());
            Err(Refusal::Connect)
        }
        Err(PeerError::Handshake(e)) => {
            tracing::info!(endpoint = %addr, reason = e.result().as_str(), error = %e, "handshake failed");
            Err(Refusal::Handshake)
        }
    }
}

/// Opens an opaque connection to an endpoint of `b`'s service: picked by
/// the balancer, held to its own SPIFFE ID; one that refuses is ejected
/// and another is tried once. The pick stays in flight (the endpoint's
/// load) for as long as the connection lives.
async fn dial_service(
    b: &Balancer,
    configs: &TlsConfigs,
    connect_timeout: Duration,
    handshake_timeout: Duration,
) -> Option<(crate::tls::ClientTls, rampart_identity::PeerIdentity, Pick)> {
    let mut refused: Option<Pick> = None;
    for attempt in 0..2 {
        let exclude: Vec<_> = refused.iter().map(|p| p.state()).collect();
        let mut pick = match b.pick(&exclude) {
            Ok(p) => p,
            Err(e) => {
                if attempt == 0 {
                    b.metrics().no_endpoint();
                    metrics::forward_error(Direction::Outbound, ForwardFailure::NoEndpoint);
                    tracing::info!(error = %e, "connection refused: no endpoint");
                } else {
                    b.metrics().failed();
                }
                return None;
            }
        };
        if attempt > 0 {
            b.metrics().retried();
        }
        let Some(cfg) = configs.endpoints.for_id(pick.id()) else {
            tracing::info!("connection refused: no identity");
            metrics::handshake(Direction::Outbound, HandshakeResult::NoIdentity);
            return None;
        };
        let started = tokio::time::Instant::now();
        match dial(
            pick.endpoint().addr,
            cfg,
            connect_timeout,
            handshake_timeout,
        )
        .await
        {
            Ok((tls, peer)) => {
                pick.finish(Outcome::Answered);
                b.metrics().answered(started.elapsed());
                return Some((tls, peer, pick));
            }
            Err(why) => {
                pick.finish(Outcome::Refused(why));
                refused = Some(pick);
            }
        }
    }
    b.metrics().failed();
    None
}
