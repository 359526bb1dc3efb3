//! Table-driven tests of native policies (see also `tests/` for scenarios).

use super::*;

fn id(s: &str) -> SpiffeId {
    // Invariant: test IDs are written valid.
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
    let conn = |peer, port| ConnectionInfo::new(peer, src, port);
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
