//! Whether a live HTTP connection's peer could still be allowed any
//! request: asked of every such connection when the policies are reloaded,
//! so that one whose peer the new policies refuse whatever it asks is
//! closed (as linkerd2-proxy closes a connection whose authorization no
//! longer permits it), instead of lingering until its idle timeout.
//!
//! The answer errs one way only. [`RequestReach::None`] is exact: no
//! request the peer could send on that port would be allowed (no ALLOW
//! rule's source and port conditions admit it, a DENY rule without HTTP
//! conditions refuses it, or no policy covers the port and the default
//! refuses). Whatever depends on the request (HTTP conditions, `from_data`
//! tables keyed by a request attribute, Rego modules, CUSTOM providers) is
//! taken as possibly allowing, so a connection that a later request could
//! legitimately use is never closed. That is safe because closing is not
//! what enforces the policies: every request on a connection that stays is
//! decided with the policies in force when it arrives.
//!
//! Istio resources are not analysed here (their matchers read request
//! attributes such as `remoteIpBlocks` through `X-Forwarded-For`): with
//! Istio resources alone the answer is [`RequestReach::Possible`]; with
//! native policies too, the native half can still refuse every request.

use crate::compile::{CKind, CPolicy, Compiled};
use crate::{ConnectionInfo, DefaultAction, Denial, DenyReason};

/// What the policies say about the requests a connection could carry.
#[derive(Debug, Clone)]
pub enum RequestReach {
    /// Some request could be allowed (or it depends on the request).
    Possible,
    /// Every request on the connection would be refused, for this reason.
    None(Denial),
}

impl RequestReach {
    /// Whether some request could be allowed.
    pub fn is_possible(&self) -> bool {
        matches!(self, RequestReach::Possible)
    }
}

/// The native half of [`crate::Authorizer::request_reach`], in the order of
/// `decide`: DENY, then ALLOW (when an ALLOW policy covers the port), then
/// an allowing Rego policy, then the default action.
pub(crate) fn reach(c: &Compiled, conn: &ConnectionInfo<'_>) -> RequestReach {
    let idx = c.port(conn.dest_port);
    for &i in &idx.deny {
        let p = &c.policies[i as usize];
        if let Some(rule) = native_rules(p).find(|r| r.matches_every_request(conn)) {
            let mut d = Denial::new(DenyReason::DeniedByRule, Some(p.name.clone()));
            d.rule = Some(rule.name.clone());
            return RequestReach::None(d);
        }
    }
    // Rego policies and CUSTOM providers only refuse further, per request.
    if let Some(&first) = idx.allow.first() {
        let admitted = idx.allow.iter().any(|&i| {
            native_rules(&c.policies[i as usize]).any(|r| r.may_match_some_request(conn))
        });
        if admitted {
            return RequestReach::Possible;
        }
        let reason = if conn.is_authenticated() {
            DenyReason::NotAllowed
        } else {
            DenyReason::Unauthenticated
        };
        return RequestReach::None(Denial::new(
            reason,
            Some(c.policies[first as usize].name.clone()),
        ));
    }
    if !idx.rego.is_empty() {
        // With no ALLOW policy on the port, an allowing Rego policy allows.
        return RequestReach::Possible;
    }
    match (c.default, conn.peer.is_some()) {
        (DefaultAction::AllowAnyAuthenticated, true) => RequestReach::Possible,
        (DefaultAction::AllowAnyAuthenticated, false) => {
            RequestReach::None(Denial::new(DenyReason::Unauthenticated, None))
        }
        (DefaultAction::Deny, _) => RequestReach::None(Denial::new(DenyReason::NoPolicy, None)),
    }
}

fn native_rules(p: &CPolicy) -> impl Iterator<Item = &crate::compile::CRule> {
    let rules: &[crate::compile::CRule] = match &p.kind {
        CKind::Native(n) => &n.rules,
        // Invariant: Compiled::index keeps Rego policies out of the native lists.
        CKind::Rego(_) => unreachable!("Rego policy in a native index"),
    };
    rules.iter()
}

#[cfg(test)]
mod tests {
    use crate::{Authorizer, ConnectionInfo, DenyReason, HttpProtocol, Options, RequestInfo};
    use rampart_identity::SpiffeId;

    fn id(s: &str) -> SpiffeId {
        // Invariant: test IDs are written valid.
        SpiffeId::parse(s).unwrap()
    }

    fn load(yaml: &str) -> Authorizer {
        Authorizer::from_yaml(
            "reach.yaml",
            yaml,
            std::path::Path::new("."),
            &Options::default(),
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Every row: a policy file, a peer (`None`: plaintext), a port, and
    /// the expected answer (`None`: possible; `Some(reason)`: every request
    /// refused). Each row also checks the claim itself: when the answer is
    /// "none", no request of a sample set is allowed; when a sample request
    /// is allowed, the answer is "possible".
    #[test]
    fn reach_is_exact_when_it_refuses_and_possible_whenever_a_request_could_pass() {
        let web = "spiffe://example.org/web";
        let other = "spiffe://example.org/other";
        let allow_web_get = r#"
policies:
  - name: web-get
    action: ALLOW
    ports: [8080]
    rules:
      - name: get-data
        from: { principals: ["spiffe://example.org/web"] }
        to: { methods: [GET], paths: ["/data"] }
"#;
        let allow_web_only = r#"
policies:
  - name: web
    action: ALLOW
    ports: [8080]
    rules:
      - name: any
        from: { principals: ["spiffe://example.org/web"] }
"#;
        let deny_web = r#"
policies:
  - name: no-web
    action: DENY
    ports: [8080]
    rules:
      - name: web
        from: { principals: ["spiffe://example.org/web"] }
  - name: all
    action: ALLOW
    ports: [8080]
    rules:
      - name: anyone
        from: { principals: ["*"] }
"#;
        let deny_web_admin = r#"
policies:
  - name: no-web-admin
    action: DENY
    ports: [8080]
    rules:
      - name: web-admin
        from: { principals: ["spiffe://example.org/web"] }
        to: { paths: ["/admin"] }
  - name: all
    action: ALLOW
    ports: [8080]
    rules:
      - name: anyone
        from: { principals: ["*"] }
"#;
        let from_cidr = r#"
policies:
  - name: local
    action: ALLOW
    ports: [8080]
    rules:
      - name: loopback
        from: { unauthenticated: true, source_cidrs: ["127.0.0.0/8"] }
"#;
        // (name, policy file, peer, port, the reason every request is refused)
        type Row<'a> = (&'a str, &'a str, Option<&'a str>, u16, Option<DenyReason>);
        let rows: &[Row] = &[
            ("allow: peer named", allow_web_get, Some(web), 8080, None),
            (
                "allow: peer not named",
                allow_web_get,
                Some(other),
                8080,
                Some(DenyReason::NotAllowed),
            ),
            (
                "allow: plaintext",
                allow_web_get,
                None,
                8080,
                Some(DenyReason::Unauthenticated),
            ),
            (
                "no policy on the port",
                allow_web_get,
                Some(web),
                9090,
                Some(DenyReason::NoPolicy),
            ),
            ("allow without HTTP", allow_web_only, Some(web), 8080, None),
            (
                "deny without HTTP conditions",
                deny_web,
                Some(web),
                8080,
                Some(DenyReason::DeniedByRule),
            ),
            ("deny: another peer", deny_web, Some(other), 8080, None),
            (
                "deny with a path: other paths pass",
                deny_web_admin,
                Some(web),
                8080,
                None,
            ),
            ("source CIDR matches", from_cidr, None, 8080, None),
        ];
        let samples = ["/data", "/admin", "/"];
        for (name, yaml, peer, port, want) in rows {
            let a = load(yaml);
            let peer = peer.map(id);
            let src = "127.0.0.1".parse().unwrap();
            let conn = ConnectionInfo::new(peer.as_ref(), src, *port);
            let got = a.request_reach(&conn);
            match (want, &got) {
                (None, super::RequestReach::Possible) => {}
                (Some(r), super::RequestReach::None(d)) => assert_eq!(d.reason, *r, "{name}"),
                _ => panic!("{name}: want {want:?}, got {got:?}"),
            }
            let any_allowed = samples.iter().any(|path| request_allowed(&a, &conn, path));
            if any_allowed {
                assert!(got.is_possible(), "{name}: a sample request was allowed");
            }
        }
    }

    #[test]
    fn a_data_table_keyed_by_the_request_is_possible_when_an_entry_names_the_peer() {
        let a = load(
            r#"
policies:
  - name: by-path
    action: ALLOW
    ports: [8080]
    data: { routes: { "/data": ["spiffe://example.org/web"] } }
    rules:
      - name: table
        from: { principals_from_data: "routes.{path}" }
"#,
        );
        let src = "127.0.0.1".parse().unwrap();
        let web = id("spiffe://example.org/web");
        let other = id("spiffe://example.org/other");
        let conn = ConnectionInfo::new(Some(&web), src, 8080);
        assert!(a.request_reach(&conn).is_possible());
        assert!(request_allowed(&a, &conn, "/data"), "the table admits it");
        let conn = ConnectionInfo::new(Some(&other), src, 8080);
        assert!(
            !a.request_reach(&conn).is_possible(),
            "no entry of the table names the peer"
        );
    }

    /// Whether `GET path` from `conn` is allowed.
    fn request_allowed(a: &Authorizer, conn: &ConnectionInfo<'_>, path: &str) -> bool {
        let headers = http::HeaderMap::new();
        let req = RequestInfo {
            method: &http::Method::GET,
            authority: "app",
            path,
            raw_path_and_query: path,
            query: None,
            headers: &headers,
            protocol: HttpProtocol::Http11,
            scheme: "https",
            grpc_method: None,
            source: std::net::SocketAddr::new(conn.source, 4000),
            destination: "10.0.0.2:8080".parse().unwrap(),
            local_identity: None,
            peer_cert_sha256: None,
        };
        a.check_request(conn, &req).is_allowed()
    }
}
