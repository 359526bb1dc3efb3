//! The authorization stage: turns an [`Authenticated`] connection into a
//! [`Permitted`] one, or refuses it. Only `rampart_authz` can make the
//! [`Permit`] that forwarding requires.

use rampart_authz::{Decision, Denial, Permit};

use crate::tls::Authenticated;

/// An inbound connection that may proceed.
#[derive(Debug)]
pub struct Permitted {
    /// The authenticated connection.
    pub conn: Authenticated,
    /// The proof.
    pub permit: Permit,
}

/// Decides whether an authenticated connection may reach the app on `port`.
pub fn authorize(
    conn: Authenticated,
    port: u16,
    authorizer: &rampart_authz::Authorizer,
) -> Result<Permitted, Box<(Authenticated, Denial)>> {
    let info = crate::tls::connection_info(conn.peer.as_ref(), conn.client.0.ip(), port)
        .with_dest_ip(conn.orig_dst.0.ip())
        .with_sni(conn.sni.as_deref());
    match authorizer.check_connection(&info) {
        Decision::Allow(permit) => {
            crate::metrics::decision("allow", "matched", permit.policy(), permit.rule());
            Ok(Permitted { conn, permit })
        }
        Decision::Deny(d) => {
            crate::metrics::decision(
                "deny",
                d.reason.as_str(),
                d.policy.as_deref().unwrap_or("-"),
                d.rule.as_deref().unwrap_or("-"),
            );
            Err(Box::new((conn, d)))
        }
    }
}
