//! The route stage (outbound only): decides, from the original destination,
//! whether a connection leaves the mesh as plaintext (passthrough), goes
//! to a service discovery knows (balanced over its endpoints, each held to
//! its own SPIFFE ID), to a pod address discovery knows (held to that
//! pod's ID), rides mTLS to the original destination with the identity a
//! server rule expects, or is refused: no rule says which identity to
//! expect, or discovery attributes the address to a pod whose identity
//! cannot be derived.
//!
//! Order: passthrough ports and addresses first (outside the mesh, by the
//! operator's word), then discovery, then `mesh_cidrs` and the server
//! rules. A destination no discovery source knows keeps the rules'
//! behaviour exactly.

use std::net::SocketAddr;
use std::sync::Arc;

use rampart_discovery::balance::Balancer;
use rampart_discovery::model::{Destination, Endpoint};
use rampart_discovery::{Registry, Resolved};

use crate::config::{ClientConfigId, OutboundConfig, UnknownServer};

/// Where an outbound connection goes.
#[derive(Debug, Clone)]
pub enum OutboundRoute {
    /// Outside the mesh: plaintext.
    Passthrough,
    /// In the mesh: mTLS to the original destination with this client
    /// configuration.
    Mesh(ClientConfigId),
    /// In the mesh, but no rule says which identity to expect.
    NoServerRule,
    /// A service discovery knows: each request (HTTP) or connection
    /// (opaque) goes to one of its endpoints, verified against that
    /// endpoint's own SPIFFE ID.
    Service(Arc<Balancer>),
    /// A pod address discovery knows, with the identity it must present.
    Endpoint(Endpoint),
    /// A pod address whose identity discovery cannot derive: refused
    /// (fail closed).
    Unverifiable(Endpoint),
    /// A name (an explicit listener's target) no discovery source knows,
    /// or not yet (the source did not answer in time): refused.
    UnknownName(Destination),
}

/// Routes an outbound destination by the rules alone: passthrough ports
/// and addresses first, then the mesh addresses, then the server rules in
/// order (first match).
pub fn route(o: &OutboundConfig, dst: SocketAddr) -> OutboundRoute {
    if passthrough(o, dst) {
        return OutboundRoute::Passthrough;
    }
    by_rules(o, dst)
}

/// Routes an outbound destination: passthrough rules, then what
/// `discovery` knows (asking a demand-driven source the first time an
/// address is seen), then the rules.
pub async fn resolve(
    o: &OutboundConfig,
    discovery: Option<&Registry>,
    dst: SocketAddr,
) -> OutboundRoute {
    if passthrough(o, dst) {
        return OutboundRoute::Passthrough;
    }
    if let Some(d) = discovery {
        match d.resolve(dst).await {
            Resolved::Service(b) => return OutboundRoute::Service(b),
            Resolved::Pod(e) => return OutboundRoute::Endpoint(e),
            Resolved::Unverifiable(e) => return OutboundRoute::Unverifiable(e),
            Resolved::Unknown => {}
        }
    }
    by_rules(o, dst)
}

/// Routes the name an explicit listener targets: only discovery knows
/// where it leads (the rules match addresses); a Service that does not
/// exist is a service without endpoints whose 503 says why.
pub async fn resolve_name(discovery: Option<&Registry>, name: &Destination) -> OutboundRoute {
    let Some(d) = discovery else {
        return OutboundRoute::UnknownName(name.clone());
    };
    match d.resolve_dest(name).await {
        Resolved::Service(b) => OutboundRoute::Service(b),
        Resolved::Pod(e) => OutboundRoute::Endpoint(e),
        Resolved::Unverifiable(e) => OutboundRoute::Unverifiable(e),
        Resolved::Unknown => OutboundRoute::UnknownName(name.clone()),
    }
}

fn passthrough(o: &OutboundConfig, dst: SocketAddr) -> bool {
    o.passthrough_ports.contains(&dst.port())
        || o.passthrough_cidrs.iter().any(|c| c.contains(&dst.ip()))
}

fn by_rules(o: &OutboundConfig, dst: SocketAddr) -> OutboundRoute {
    if let Some(mesh) = &o.mesh_cidrs
        && !mesh.iter().any(|c| c.contains(&dst.ip()))
    {
        return OutboundRoute::Passthrough;
    }
    if let Some(i) = o.servers.iter().position(|r| r.matches(dst)) {
        return OutboundRoute::Mesh(ClientConfigId::of_server_rule(i));
    }
    match o.unknown_server {
        UnknownServer::Deny => OutboundRoute::NoServerRule,
        // The fallback's configuration follows the rules' (ProxyConfig::tls_spec).
        UnknownServer::AnyInTrustDomain => {
            OutboundRoute::Mesh(ClientConfigId::of_server_rule(o.servers.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::*;
    use rampart_identity::{SpiffeId, TrustDomain};
    use std::sync::Arc;

    fn cfg() -> ProxyConfig {
        ProxyConfig {
            trust_domain: TrustDomain::parse("example.org").unwrap(),
            admin: "127.0.0.1:15000".parse().unwrap(),
            transparent: None,
            listeners: vec![],
            outbound: OutboundConfig {
                passthrough_cidrs: vec!["192.168.0.0/16".parse().unwrap()],
                passthrough_ports: vec![5432],
                opaque_ports: vec![],
                mesh_cidrs: Some(vec!["10.0.0.0/8".parse().unwrap()]),
                servers: vec![ServerRule {
                    cidrs: vec!["10.1.0.0/16".parse().unwrap()],
                    ports: vec![8080],
                    identities: vec![SpiffeId::parse("spiffe://example.org/s").unwrap()],
                    trust_domains: vec![],
                    allow_dns_san_servers: Vec::new(),
                }],
                unknown_server: UnknownServer::Deny,
            },
            authorizer: Arc::new(crate::policy::PolicyCell::default()),
            inbound: InboundServing::default(),
            limits: Limits::default(),
            observe: ObserveConfig::default(),
            central: CentralConfig::default(),
            discovery: None,
        }
    }

    /// A route's kind, comparable.
    #[derive(Debug, PartialEq, Eq)]
    enum Shape {
        Passthrough,
        Mesh(ClientConfigId),
        NoServerRule,
        Service(String),
        Endpoint(String),
        Unverifiable(String),
        UnknownName(String),
    }

    impl Shape {
        fn of(r: OutboundRoute) -> Shape {
            match r {
                OutboundRoute::Passthrough => Shape::Passthrough,
                OutboundRoute::Mesh(i) => Shape::Mesh(i),
                OutboundRoute::NoServerRule => Shape::NoServerRule,
                OutboundRoute::Service(b) => Shape::Service(b.name().to_owned()),
                OutboundRoute::Endpoint(e) => Shape::Endpoint(e.addr.to_string()),
                OutboundRoute::Unverifiable(e) => Shape::Unverifiable(e.addr.to_string()),
                OutboundRoute::UnknownName(n) => Shape::UnknownName(n.to_string()),
            }
        }
    }

    #[tokio::test]
    async fn discovery_comes_after_passthrough_and_before_the_rules() {
        use rampart_discovery::model::*;
        let c = cfg();
        let registry = Registry::new(std::time::Duration::from_millis(1));
        let p = registry.source(SourceKind::File);
        let id = |s: &str| EndpointIdentity::Id(SpiffeId::parse(s).unwrap());
        p.publish(SourceState {
            services: vec![(
                vec![
                    Destination::Addr("10.1.2.3:8080".parse().unwrap()),
                    Destination::Addr("10.1.2.3:5432".parse().unwrap()),
                    Destination::Name("svc.example".into(), 80),
                ],
                Service {
                    name: "svc".into(),
                    source: SourceKind::File,
                    endpoints: vec![],
                    missing: None,
                },
            )],
            pods: vec![
                (
                    "10.5.0.1".parse().unwrap(),
                    PodAddr {
                        identity: id("spiffe://example.org/p"),
                        owner: "ns/p".into(),
                    },
                ),
                (
                    "10.5.0.2".parse().unwrap(),
                    PodAddr {
                        identity: EndpointIdentity::Underivable("no service account".into()),
                        owner: "ns/q".into(),
                    },
                ),
            ],
        });
        let r = |s: &'static str| {
            let registry = registry.clone();
            let o = c.outbound.clone();
            async move { Shape::of(resolve(&o, Some(&registry), s.parse().unwrap()).await) }
        };
        assert_eq!(r("10.1.2.3:8080").await, Shape::Service("svc".into()));
        assert_eq!(r("10.1.2.3:5432").await, Shape::Passthrough);
        assert_eq!(
            r("10.5.0.1:80").await,
            Shape::Endpoint("10.5.0.1:80".into())
        );
        assert_eq!(
            r("10.5.0.2:80").await,
            Shape::Unverifiable("10.5.0.2:80".into())
        );
        // Unknown to discovery: the rules, as without it.
        assert_eq!(
            r("10.1.2.4:8080").await,
            Shape::of(route(&c.outbound, "10.1.2.4:8080".parse().unwrap()))
        );
        assert_eq!(r("10.2.2.3:8080").await, Shape::NoServerRule);
        // A name (an explicit listener's target): discovery alone.
        let name = |s: &str| s.parse::<Destination>().unwrap();
        assert_eq!(
            Shape::of(resolve_name(Some(&registry), &name("svc.example:80")).await),
            Shape::Service("svc".into())
        );
        assert_eq!(
            Shape::of(resolve_name(Some(&registry), &name("other.example:80")).await),
            Shape::UnknownName("other.example:80".into())
        );
        assert_eq!(
            Shape::of(resolve_name(None, &name("svc.example:80")).await),
            Shape::UnknownName("svc.example:80".into())
        );
    }

    #[test]
    fn routes() {
        let mut c = cfg();
        let r = |c: &ProxyConfig, s: &str| Shape::of(route(&c.outbound, s.parse().unwrap()));
        let mesh = |i| Shape::Mesh(ClientConfigId::of_server_rule(i));
        assert_eq!(r(&c, "10.1.2.3:8080"), mesh(0));
        assert_eq!(r(&c, "10.1.2.3:9090"), Shape::NoServerRule);
        assert_eq!(r(&c, "10.2.2.3:8080"), Shape::NoServerRule);
        assert_eq!(r(&c, "10.1.2.3:5432"), Shape::Passthrough);
        assert_eq!(r(&c, "192.168.1.1:8080"), Shape::Passthrough);
        assert_eq!(r(&c, "172.16.0.1:8080"), Shape::Passthrough);
        c.outbound.unknown_server = UnknownServer::AnyInTrustDomain;
        assert_eq!(r(&c, "10.2.2.3:8080"), Shape::Mesh(c.trust_domain_client()));
        assert_eq!(r(&c, "10.2.2.3:8080"), mesh(1));
        assert_eq!(c.tls_spec().client.len(), 2);
        assert_eq!(c.client_config_count(), 2);
        assert_eq!(c.central_client(0), None);
    }
}
