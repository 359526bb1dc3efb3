//! The authz stage, for every protocol: the one place where a decision of
//! `rampart_authz` becomes a permit, a metric and a log line, per
//! connection ([`connection`], opaque TCP) and per request ([`request`],
//! HTTP, after `http::authorize` has built the request's input).
//!
//! A permit is bound to what it was issued for: [`Permitted`] holds the
//! connection and [`PermittedRequest`] the request, with private fields,
//! and only `forward` can open them (it alone can make the
//! [`crate::forward::ForwardKey`] that `into_parts` asks for). So forwarding
//! a connection or request that skipped this stage does not compile:
//!
//! ```compile_fail,E0451
//! // A `Permitted` cannot be built outside `authz`...
//! fn forge(
//!     conn: rampart_proxy::tls::Authenticated,
//!     permit: rampart_authz::Permit,
//! ) -> rampart_proxy::authz::Permitted {
//!     rampart_proxy::authz::Permitted { conn, permit, port: 80 }
//! }
//! ```
//!
//! ```compile_fail,E0423
//! // ...nor opened outside `forward`: only it can make the key...
//! fn open() -> rampart_proxy::forward::ForwardKey {
//!     rampart_proxy::forward::ForwardKey(())
//! }
//! ```
//!
//! ```compile_fail,E0308
//! // ...and `forward` takes nothing less than a `Permitted`.
//! async fn skip(conn: rampart_proxy::tls::Authenticated) {
//!     let _ = rampart_proxy::forward::connection(
//!         conn,
//!         "127.0.0.1:80".parse().unwrap(),
//!         std::time::Duration::from_secs(1),
//!     )
//!     .await;
//! }
//! ```
//!
//! The same call with a `Permitted` compiles (so the three refusals above
//! are about the permit, not about paths or arguments):
//!
//! ```no_run
//! async fn forward(
//!     permitted: rampart_proxy::authz::Permitted,
//!     _permit: &rampart_authz::Permit,
//!     _conn: &rampart_proxy::tls::Authenticated,
//! ) {
//!     let _ = rampart_proxy::forward::connection(
//!         permitted,
//!         "127.0.0.1:80".parse().unwrap(),
//!         std::time::Duration::from_secs(1),
//!     )
//!     .await;
//! }
//! ```
//!
//! A live connection stays bound to the policies: when they are reloaded,
//! an opaque one is decided again ([`Standing::revoked`]) and an HTTP one
//! is asked whether its peer could still be allowed any request on its
//! port ([`HttpStanding::revoked`]); a connection the new policies refuse
//! is closed (an HTTP one after its in-flight requests), counted in
//! `rampart_authz_connections_revoked_total` by protocol, and logged. The
//! HTTP question errs towards keeping a connection: closing it is tidiness
//! and prompt notice to the peer, not enforcement, since every request on
//! it is decided with the policies in force when it arrives.

use std::net::IpAddr;
use std::sync::Arc;

use hyper::body::Incoming;
use rampart_authz::{Decision, Denial, Permit};
use rampart_identity::PeerIdentity;

use crate::access::Pending;
use crate::policy::PolicyCell;
use crate::tls::{Authenticated, BoxedIo};

/// An inbound connection that may proceed: the connection and the permit
/// issued for it, inseparable until `forward` opens them.
#[derive(Debug)]
pub struct Permitted {
    conn: Authenticated,
    permit: Permit,
    port: u16,
    /// The policies it was decided with, and their replacements since.
    cell: Arc<PolicyCell>,
    changes: tokio::sync::watch::Receiver<u64>,
}

impl Permitted {
    /// The permit.
    pub fn permit(&self) -> &Permit {
        &self.permit
    }

    /// The connection's verified peer.
    pub fn peer(&self) -> Option<&PeerIdentity> {
        self.conn.peer.as_ref()
    }

    /// Opens the value; only `forward` can make the key.
    pub(crate) fn into_parts(
        self,
        _key: crate::forward::ForwardKey,
    ) -> (BoxedIo, Standing, Permit) {
        let Permitted {
            conn,
            permit,
            port,
            cell,
            changes,
        } = self;
        let Authenticated {
            client,
            peer,
            stream,
            slot,
            ..
        } = conn;
        let standing = Standing {
            peer,
            source: client.0.ip(),
            port,
            changes,
            cell,
            _slot: slot,
        };
        (stream, standing, permit)
    }
}

/// A refused connection, handed back so the caller can close it politely.
#[derive(Debug)]
pub struct Refused {
    /// The connection.
    pub conn: Authenticated,
    /// Why.
    pub denial: Denial,
}

/// Decides whether an authenticated opaque connection may reach the app on
/// `port`, with the policies in force now: counts the decision, logs a
/// refusal and records it in the connection's access event.
pub fn connection(
    conn: Authenticated,
    port: u16,
    cell: &Arc<PolicyCell>,
    event: &mut Pending<'_>,
) -> Result<Permitted, Box<Refused>> {
    // Subscribed before the policies are read: a reload from now on is
    // seen by the connection's `Standing`.
    let changes = cell.subscribe();
    let policies = cell.current();
    let info = connection_info(conn.peer.as_ref(), conn.client.0.ip(), port)
        .with_dest_ip(conn.orig_dst.0.ip())
        .with_sni(conn.sni.as_deref());
    let decision = policies.authorizer.check_connection(&info);
    crate::metrics::decision(&decision);
    event.decided(&decision);
    match decision {
        Decision::Allow(permit) => {
            tracing::debug!(
                authz.policy = permit.policy(),
                authz.rule = permit.rule(),
                "connection permitted"
            );
            Ok(Permitted {
                conn,
                permit,
                port,
                cell: cell.clone(),
                changes,
            })
        }
        Decision::Deny(denial) => {
            tracing::info!(
                peer.id = conn.peer.as_ref().map(|p| p.principal()).unwrap_or("-"),
                dst.port = port,
                reason = denial.reason.as_str(),
                authz.policy = denial.policy.as_deref().unwrap_or("-"),
                "connection denied"
            );
            Err(Box::new(Refused { conn, denial }))
        }
    }
}

/// Whether the policies in force would admit `conn` to `port` as an opaque
/// connection, without deciding it (no permit, no count, no log): the
/// inbound stage asks it of a silent client, which it waits on as HTTP
/// instead of refusing it when the answer is no.
pub fn admits_connection(conn: &Authenticated, port: u16, cell: &Arc<PolicyCell>) -> bool {
    let info = connection_info(conn.peer.as_ref(), conn.client.0.ip(), port)
        .with_dest_ip(conn.orig_dst.0.ip())
        .with_sni(conn.sni.as_deref());
    cell.current()
        .authorizer
        .check_connection(&info)
        .is_allowed()
}

/// An HTTP request that may proceed: the request and the permit issued for
/// it, inseparable until `forward` opens them. Its head may still be
/// rewritten (hop-by-hop fields, XFCC, the permit's header effects), not
/// replaced.
#[derive(Debug)]
pub struct PermittedRequest {
    parts: http::request::Parts,
    body: Incoming,
    permit: Permit,
}

impl PermittedRequest {
    /// The permit.
    pub fn permit(&self) -> &Permit {
        &self.permit
    }

    /// The request head.
    pub fn head(&self) -> &http::request::Parts {
        &self.parts
    }

    /// The request head, to rewrite before forwarding, and the permit whose
    /// header effects apply to it.
    pub fn head_mut(&mut self) -> (&mut http::request::Parts, &Permit) {
        (&mut self.parts, &self.permit)
    }

    /// Opens the value; only `forward` can make the key.
    pub(crate) fn into_parts(
        self,
        _key: crate::forward::ForwardKey,
    ) -> (http::request::Parts, Incoming, Permit) {
        (self.parts, self.body, self.permit)
    }
}

/// Turns a request's decision into a permit (or a refusal), with its metric,
/// its log line and its access-event verdict: the per-request half of this
/// stage. `http::authorize` built the decision's input.
pub fn request(
    req: http::Request<Incoming>,
    decision: Decision,
    event: &mut Pending<'_>,
) -> Result<PermittedRequest, Box<Denial>> {
    crate::metrics::decision(&decision);
    event.decided(&decision);
    match decision {
        Decision::Allow(permit) => {
            let (parts, body) = req.into_parts();
            Ok(PermittedRequest {
                parts,
                body,
                permit,
            })
        }
        Decision::Deny(denial) => {
            tracing::info!(
                reason = denial.reason.as_str(),
                authz.policy = denial.policy.as_deref().unwrap_or("-"),
                error = %denial.explain(),
                "request denied"
            );
            Err(Box::new(denial))
        }
    }
}

/// A forwarded opaque connection's standing with the policies: what it was
/// authorized as, to decide it again when the policies change.
#[derive(Debug)]
pub struct Standing {
    peer: Option<PeerIdentity>,
    source: IpAddr,
    port: u16,
    cell: Arc<PolicyCell>,
    changes: tokio::sync::watch::Receiver<u64>,
    /// The listener slot, held while the connection lives.
    _slot: crate::listen::Slot,
}

impl Standing {
    /// Resolves when a policy reload refuses this connection (counted and
    /// logged here); pending for as long as the policies in force allow it.
    pub async fn revoked(&mut self) {
        let (peer, source, port) = (self.peer.as_ref(), self.source, self.port);
        let watched = (&mut self.changes, &*self.cell, peer, port);
        until_refused(watched, Carried::Opaque, |authorizer| {
            match authorizer.check_connection(&connection_info(peer, source, port)) {
                Decision::Allow(_) => None,
                Decision::Deny(denial) => Some(denial),
            }
        })
        .await;
    }
}

/// A live HTTP connection's standing with the policies: its requests are
/// each decided with the policies in force when they arrive; this only
/// watches for a reload after which none of them could be allowed.
#[derive(Debug)]
pub struct HttpStanding {
    cell: Arc<PolicyCell>,
    changes: tokio::sync::watch::Receiver<u64>,
}

impl HttpStanding {
    /// Starts watching the policies in `cell` for one HTTP connection.
    pub fn new(cell: &Arc<PolicyCell>) -> Self {
        HttpStanding {
            changes: cell.subscribe(),
            cell: cell.clone(),
        }
    }

    /// Resolves when a policy reload leaves the connection's peer (`peer`
    /// from `source`, on `port`) no request it could be allowed
    /// (`Authorizer::request_reach`: exact when it refuses, so a connection
    /// a later request could use stays open); counted and logged here, and
    /// the caller closes the connection after its in-flight requests.
    pub async fn revoked(&mut self, peer: Option<&PeerIdentity>, source: IpAddr, port: u16) {
        let watched = (&mut self.changes, &*self.cell, peer, port);
        until_refused(watched, Carried::Http, |authorizer| {
            match authorizer.request_reach(&connection_info(peer, source, port)) {
                rampart_authz::RequestReach::Possible => None,
                rampart_authz::RequestReach::None(denial) => Some(denial),
            }
        })
        .await;
    }
}

/// What a revoked connection carried, for its log line and metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carried {
    /// Opaque TCP, authorized once for the connection.
    Opaque,
    /// HTTP, authorized per request.
    Http,
}

impl Carried {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Carried::Opaque => "opaque",
            Carried::Http => "http",
        }
    }
}

/// Waits for policy replacements until `refuses` finds a reason in the new
/// policies; then logs and counts the revocation. Pending forever once the
/// cell is gone (shutdown: nothing will change any more).
async fn until_refused(
    (changes, cell, peer, port): (
        &mut tokio::sync::watch::Receiver<u64>,
        &PolicyCell,
        Option<&PeerIdentity>,
        u16,
    ),
    carried: Carried,
    refuses: impl Fn(&rampart_authz::Authorizer) -> Option<Denial>,
) {
    loop {
        if changes.changed().await.is_err() {
            return std::future::pending().await;
        }
        let policies = cell.current();
        if let Some(denial) = refuses(&policies.authorizer) {
            tracing::info!(
                peer.id = peer.map(|p| p.principal()).unwrap_or("-"),
                dst.port = port,
                protocol = carried.as_str(),
                reason = denial.reason.as_str(),
                authz.policy = denial.policy.as_deref().unwrap_or("-"),
                "connection revoked by a policy reload"
            );
            crate::metrics::connection_revoked(carried);
            return;
        }
    }
}

/// What authz is told about a connection's peer: its SPIFFE ID (absent for
/// plaintext and for DNS-SAN clients) and its certificate's DNS SANs.
pub fn connection_info(
    peer: Option<&PeerIdentity>,
    source: IpAddr,
    port: u16,
) -> rampart_authz::ConnectionInfo<'_> {
    match peer {
        Some(p) => rampart_authz::ConnectionInfo::new(p.id.as_ref(), source, port)
            .with_peer_dns(&p.dns_names),
        None => rampart_authz::ConnectionInfo::new(None, source, port),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::AccessLog;
    use crate::config::Direction;
    use crate::testing::{self, Pki, id};
    use rampart_authz::{Authorizer, DefaultAction, DenyReason};

    const DST: &str = "10.0.0.2:8080";

    fn allow(peers: &[&str]) -> Authorizer {
        Authorizer::from_port_allowlist(
            [(8080, peers.iter().map(|p| id(p)).collect())],
            DefaultAction::Deny,
        )
    }

    #[tokio::test]
    async fn a_connection_is_permitted_or_refused_by_the_policies_in_force() {
        let pki = Pki::new();
        let log = AccessLog::new(false, 10);
        let cell = Arc::new(PolicyCell::new(allow(&["client"])));
        let (authn, _peer) =
            testing::authenticated(&pki, "server", "client", DST.parse().unwrap()).await;
        let mut event = Pending::open(&log, Direction::Inbound, authn.client.0, authn.orig_dst.0);
        let permitted = connection(authn, 8080, &cell, &mut event).expect("permitted");
        assert_eq!(permitted.permit().policy(), "port-8080");
        assert_eq!(permitted.permit().rule(), "allowed_peers");
        assert_eq!(permitted.peer().unwrap().id, Some(id("client")));
        assert!(
            !event.is_recorded(),
            "an allowed event waits for access logs"
        );

        let (authn, _peer) =
            testing::authenticated(&pki, "server", "other", DST.parse().unwrap()).await;
        let mut event = Pending::open(&log, Direction::Inbound, authn.client.0, authn.orig_dst.0);
        let refused = connection(authn, 8080, &cell, &mut event).expect_err("refused");
        assert_eq!(refused.denial.reason, DenyReason::NotAllowed);
        assert!(event.is_recorded(), "a denial is always recorded");
    }

    #[tokio::test]
    async fn a_plaintext_connection_has_no_peer_to_admit() {
        let log = AccessLog::new(false, 10);
        let cell = Arc::new(PolicyCell::new(allow(&["client"])));
        let (accepted, _far) = testing::accepted(DST.parse().unwrap());
        let authn = crate::tls::allow_plaintext(accepted);
        let mut event = Pending::open(&log, Direction::Inbound, authn.client.0, authn.orig_dst.0);
        let refused = connection(authn, 8080, &cell, &mut event).expect_err("refused");
        assert_eq!(refused.denial.reason, DenyReason::Unauthenticated);
    }
}
