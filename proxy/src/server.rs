//! Wiring of the data plane: binds every listener, serves them, and drains
//! them on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rampart_identity::store::TlsConfigs;
use tokio::sync::watch;

use crate::admin::{self, AdminHooks};
use crate::config::{Direction, ProxyConfig};
use crate::drain::Drain;
use crate::inbound::{self, AppTarget};
use crate::listen::{self, DstSource, Listener};
use crate::outbound::{self, ServerChoice};

/// State shared by every connection.
#[derive(Debug)]
pub struct Shared {
    /// The plan.
    pub config: ProxyConfig,
    /// The inbound HTTP server settings and app connection pools.
    pub http: crate::http::server::InboundHttp,
    /// The outbound HTTP server settings and sidecar-to-sidecar HTTP/2 pools.
    pub outbound_http: crate::http::pool::OutboundHttp,
    /// Access events.
    pub access: crate::access::AccessLog,
    identity: watch::Receiver<Option<Arc<TlsConfigs>>>,
    listening: AtomicBool,
    draining: AtomicBool,
    drain_requested: tokio::sync::Notify,
}

impl Shared {
    /// The current TLS configurations, if the sidecar has an identity.
    pub fn identity(&self) -> Option<Arc<TlsConfigs>> {
        self.identity.borrow().clone()
    }

    /// Resolves once the sidecar has no identity (its SVID expired, or its
    /// source revoked it): mTLS connections made under that identity then
    /// end, so that a sidecar without an identity serves no peer on an old
    /// connection either (fail closed). Resolves at once without one.
    pub async fn identity_withdrawn(&self) {
        let mut identity = self.identity.clone();
        // An error means the store is gone (shutdown): nothing to serve with.
        let _ = identity.wait_for(Option::is_none).await;
    }

    /// Resolves when an mTLS connection must end: the sidecar's identity
    /// is withdrawn, or `expires` (the earlier of the SVID it was made
    /// with and the peer's certificate) has passed (issue 19 R5). The
    /// caller lets in-flight requests finish where it can.
    pub async fn mtls_ends(&self, expires: Option<std::time::SystemTime>) {
        let expired = async {
            match expires {
                Some(t) => {
                    let left = t
                        .duration_since(std::time::SystemTime::now())
                        .unwrap_or_default();
                    tokio::time::sleep(left).await;
                    tracing::info!("certificates of this mTLS connection expired: closing it");
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = self.identity_withdrawn() => {}
            () = expired => {}
        }
    }

    /// True once a drain has started: HTTP/1 responses then carry
    /// `Connection: close` ([`crate::drain::serve_gracefully`]).
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Starts a graceful drain, as SIGTERM does (the admin API's `/drain`).
    pub fn request_drain(&self) {
        // notify_one stores a permit, so a request before `run` waits is kept.
        self.drain_requested.notify_one();
    }

    /// Ready: has an identity and a policy in force, its listeners are
    /// up, and it is not draining.
    pub fn is_ready(&self) -> bool {
        self.listening.load(Ordering::Acquire)
            && !self.draining.load(Ordering::Acquire)
            && self.identity.borrow().is_some()
            && self.config.authorizer.is_in_force()
    }
}

#[cfg(test)]
impl Shared {
    /// The state of a sidecar built from `config` without binding anything,
    /// for stage tests.
    pub(crate) fn for_tests(
        config: ProxyConfig,
        identity: watch::Receiver<Option<Arc<TlsConfigs>>>,
    ) -> Arc<Shared> {
        Arc::new(Shared {
            http: crate::http::server::InboundHttp::new(&config.limits),
            outbound_http: crate::http::pool::OutboundHttp::new(&config.limits, identity.clone()),
            access: crate::access::AccessLog::new(false, 10),
            config,
            identity,
            listening: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            drain_requested: tokio::sync::Notify::new(),
        })
    }
}

enum Role {
    Inbound(AppTarget),
    Outbound(ServerChoice),
}

/// A proxy whose sockets are bound but not yet served.
pub struct BoundProxy {
    shared: Arc<Shared>,
    listeners: Vec<(Listener, Role)>,
    admin: tokio::net::TcpListener,
    hooks: AdminHooks,
}

/// A listener could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("binding {what} listener on {addr}: {source}")]
pub struct BindError {
    what: String,
    addr: SocketAddr,
    source: std::io::Error,
}

/// Binds the admin listener and every proxy listener of `config`.
pub fn bind(
    config: ProxyConfig,
    identity: watch::Receiver<Option<Arc<TlsConfigs>>>,
    hooks: AdminHooks,
) -> Result<BoundProxy, BindError> {
    let max = config.limits.max_connections;
    let mk = |what: &str, addr: SocketAddr, dst: DstSource| -> Result<Listener, BindError> {
        let err = |source| BindError {
            what: what.to_owned(),
            addr,
            source,
        };
        let l = listen::bind(addr).map_err(err)?;
        Listener::new(l, dst, max).map_err(err)
    };
    let mut listeners = Vec::new();
    if let Some(t) = &config.transparent {
        listeners.push((
            mk("transparent outbound", t.outbound, DstSource::OriginalDst)?,
            Role::Outbound(ServerChoice::ByRoute),
        ));
        listeners.push((
            mk("transparent inbound", t.inbound, DstSource::OriginalDst)?
                .with_pending_limit(config.limits.max_pending_per_source),
            Role::Inbound(AppTarget::OriginalPort { host: t.app_host }),
        ));
    }
    for (i, l) in config.listeners.iter().enumerate() {
        let mut bound = mk(&l.name, l.listen, DstSource::Fixed(l.target))?;
        if matches!(l.direction, Direction::Inbound) {
            bound = bound.with_pending_limit(config.limits.max_pending_per_source);
        }
        let role = match l.direction {
            Direction::Inbound => Role::Inbound(AppTarget::Fixed {
                target: l.target,
                port: l.policy_port(),
            }),
            Direction::Outbound => Role::Outbound(match config.listener_client(i) {
                Some(idx) => ServerChoice::Fixed(idx),
                None => ServerChoice::ByRoute,
            }),
        };
        listeners.push((bound, role));
    }
    let admin = listen::bind(config.admin).map_err(|source| BindError {
        what: "admin".into(),
        addr: config.admin,
        source,
    })?;
    Ok(BoundProxy {
        shared: Arc::new(Shared {
            http: crate::http::server::InboundHttp::new(&config.limits),
            outbound_http: crate::http::pool::OutboundHttp::new(&config.limits, identity.clone()),
            access: crate::access::AccessLog::new(
                config.observe.access_log,
                config.observe.denials_per_second,
            ),
            config,
            identity,
            listening: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            drain_requested: tokio::sync::Notify::new(),
        }),
        listeners,
        admin,
        hooks,
    })
}

impl BoundProxy {
    /// Addresses of the bound proxy listeners, in configuration order.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().map(|(l, _)| l.local_addr()).collect()
    }

    /// Serves until `shutdown` resolves or the admin API asks, then drains: stops accepting, turns
    /// not-ready, and waits for open connections up to the drain timeout.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        let drain = Drain::new();
        let (admin_stop_tx, admin_stop) = watch::channel(false);
        let admin_task = tokio::spawn(admin::serve(
            self.admin,
            self.shared.clone(),
            self.hooks,
            admin_stop,
        ));
        for (listener, role) in self.listeners {
            tracing::info!(addr = %listener.local_addr(), "listening");
            let shared = self.shared.clone();
            let w = drain.watch();
            match role {
                Role::Inbound(t) => tokio::spawn(inbound::serve(listener, t, shared, w)),
                Role::Outbound(c) => tokio::spawn(outbound::serve(listener, c, shared, w)),
            };
        }
        self.shared.listening.store(true, Ordering::Release);
        tokio::select! {
            _ = shutdown => {}
            _ = self.shared.drain_requested.notified() => {}
        }
        tracing::info!("draining");
        self.shared.draining.store(true, Ordering::Release);
        let deadline = self.shared.config.limits.drain_timeout;
        if drain.drain(deadline).await {
            tracing::info!("drained");
        } else {
            tracing::warn!(timeout = ?deadline, "drain deadline passed; closing open connections");
        }
        let _ = admin_stop_tx.send(true);
        let _ = admin_task.await;
        // The last access events of the drained connections.
        let _ = tokio::task::spawn_blocking(|| crate::access::flush(Duration::from_secs(1))).await;
    }
}

/// Backs off after an accept error (for example EMFILE) instead of spinning.
pub(crate) async fn accept_backoff(direction: Direction, e: std::io::Error) {
    tracing::error!(direction = direction.as_str(), error = %e, "accept failed");
    tokio::time::sleep(Duration::from_millis(50)).await;
}
