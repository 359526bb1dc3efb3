//! Authorization for Rampart: decides whether a connection (and, later, a
//! request) may proceed. A library with no knowledge of sockets or tokio.
//!
//! The proxy can only forward a connection when it holds a [`Permit`], and
//! only this crate can make one, so a skipped check is a compile error.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use rampart_identity::SpiffeId;

/// What is known about an inbound connection when it is authorized.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionInfo<'a> {
    /// The authenticated peer, `None` for plaintext sources.
    pub peer: Option<&'a SpiffeId>,
    /// The source address of the connection.
    pub source: IpAddr,
    /// The port the client asked for (the original destination port).
    pub dest_port: u16,
}

/// Proof that a connection or request was allowed, naming what allowed it.
#[derive(Debug, Clone)]
pub struct Permit {
    policy: Arc<str>,
    rule: Arc<str>,
}

impl Permit {
    /// The policy that allowed it.
    pub fn policy(&self) -> &str {
        &self.policy
    }
    /// The rule within the policy that allowed it.
    pub fn rule(&self) -> &str {
        &self.rule
    }
}

/// Why something was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    /// No policy covers the port and the default is deny.
    NoPolicy,
    /// A policy covers the port but no rule matched the peer.
    NotAllowed,
    /// The connection has no authenticated peer, and the port requires one.
    Unauthenticated,
}

impl DenyReason {
    /// A short, fixed label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::NoPolicy => "no_policy",
            DenyReason::NotAllowed => "not_allowed",
            DenyReason::Unauthenticated => "unauthenticated",
        }
    }
}

/// A refusal, naming the reason and the policy that refused (if any).
#[derive(Debug, Clone)]
pub struct Denial {
    /// Why.
    pub reason: DenyReason,
    /// The policy that refused, when one applied.
    pub policy: Option<Arc<str>>,
}

/// The outcome of an authorization check.
#[derive(Debug, Clone)]
pub enum Decision {
    /// Go ahead, with proof.
    Allow(Permit),
    /// Refuse.
    Deny(Denial),
}

/// What to do on a port that no policy covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DefaultAction {
    /// Refuse (the secure default).
    #[default]
    Deny,
    /// Allow any authenticated peer. The name says what it weakens.
    AllowAnyAuthenticated,
}

/// A compiled set of connection-level policies.
#[derive(Debug, Clone, Default)]
pub struct Authorizer {
    ports: HashMap<u16, PortRule>,
    default: DefaultAction,
}

#[derive(Debug, Clone)]
struct PortRule {
    policy: Arc<str>,
    peers: HashSet<SpiffeId>,
}

impl Authorizer {
    /// Builds an authorizer from a per-port list of allowed peer SPIFFE IDs.
    pub fn from_port_allowlist(
        ports: impl IntoIterator<Item = (u16, Vec<SpiffeId>)>,
        default: DefaultAction,
    ) -> Self {
        let ports = ports
            .into_iter()
            .map(|(port, ids)| {
                let rule = PortRule {
                    policy: Arc::from(format!("port-{port}")),
                    peers: ids.into_iter().collect(),
                };
                (port, rule)
            })
            .collect();
        Authorizer { ports, default }
    }

    /// Decides whether a connection may proceed.
    pub fn check_connection(&self, conn: &ConnectionInfo<'_>) -> Decision {
        match self.ports.get(&conn.dest_port) {
            Some(rule) => match conn.peer {
                None => Decision::Deny(Denial {
                    reason: DenyReason::Unauthenticated,
                    policy: Some(rule.policy.clone()),
                }),
                Some(peer) if rule.peers.contains(peer) => Decision::Allow(Permit {
                    policy: rule.policy.clone(),
                    rule: Arc::from("allowed_peers"),
                }),
                Some(_) => Decision::Deny(Denial {
                    reason: DenyReason::NotAllowed,
                    policy: Some(rule.policy.clone()),
                }),
            },
            None => match (self.default, conn.peer) {
                (DefaultAction::AllowAnyAuthenticated, Some(_)) => Decision::Allow(Permit {
                    policy: Arc::from("default"),
                    rule: Arc::from("allow_any_authenticated"),
                }),
                (DefaultAction::AllowAnyAuthenticated, None) => Decision::Deny(Denial {
                    reason: DenyReason::Unauthenticated,
                    policy: None,
                }),
                (DefaultAction::Deny, _) => Decision::Deny(Denial {
                    reason: DenyReason::NoPolicy,
                    policy: None,
                }),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    #[test]
    fn port_allowlist() {
        let a = Authorizer::from_port_allowlist(
            [(8080, vec![id("spiffe://example.org/client")])],
            DefaultAction::Deny,
        );
        let client = id("spiffe://example.org/client");
        let other = id("spiffe://example.org/other");
        let src = "10.0.0.1".parse().unwrap();
        let conn = |peer, port| ConnectionInfo {
            peer,
            source: src,
            dest_port: port,
        };
        assert!(matches!(
            a.check_connection(&conn(Some(&client), 8080)),
            Decision::Allow(_)
        ));
        let cases = [
            (Some(&other), 8080, DenyReason::NotAllowed),
            (None, 8080, DenyReason::Unauthenticated),
            (Some(&client), 9090, DenyReason::NoPolicy),
        ];
        for (peer, port, want) in cases {
            match a.check_connection(&conn(peer, port)) {
                Decision::Deny(d) => assert_eq!(d.reason, want),
                Decision::Allow(p) => panic!("allowed by {}", p.policy()),
            }
        }
    }
}
