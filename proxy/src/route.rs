//! The route stage (outbound only): decides, from the original destination
//! alone, whether a connection leaves the mesh as plaintext (passthrough),
//! rides mTLS to a peer sidecar with a given expected server identity, or
//! is refused because no rule says which identity to expect.

use std::net::SocketAddr;

use crate::config::{ClientConfigId, OutboundConfig, UnknownServer};

/// Where an outbound connection goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboundRoute {
    /// Outside the mesh: plaintext.
    Passthrough,
    /// In the mesh: mTLS with this client configuration.
    Mesh(ClientConfigId),
    /// In the mesh, but no rule says which identity to expect.
    NoServerRule,
}

/// Routes an outbound destination: passthrough ports and addresses first,
/// then the mesh addresses, then the server rules in order (first match).
pub fn route(o: &OutboundConfig, dst: SocketAddr) -> OutboundRoute {
    if o.passthrough_ports.contains(&dst.port())
        || o.passthrough_cidrs.iter().any(|c| c.contains(&dst.ip()))
    {
        return OutboundRoute::Passthrough;
    }
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
                }],
                unknown_server: UnknownServer::Deny,
            },
            authorizer: Arc::new(crate::policy::PolicyCell::default()),
            inbound: InboundServing::default(),
            limits: Limits::default(),
            observe: ObserveConfig::default(),
            central: CentralConfig::default(),
        }
    }

    #[test]
    fn routes() {
        let mut c = cfg();
        let r = |c: &ProxyConfig, s: &str| route(&c.outbound, s.parse().unwrap());
        let mesh = |i| OutboundRoute::Mesh(ClientConfigId::of_server_rule(i));
        assert_eq!(r(&c, "10.1.2.3:8080"), mesh(0));
        assert_eq!(r(&c, "10.1.2.3:9090"), OutboundRoute::NoServerRule);
        assert_eq!(r(&c, "10.2.2.3:8080"), OutboundRoute::NoServerRule);
        assert_eq!(r(&c, "10.1.2.3:5432"), OutboundRoute::Passthrough);
        assert_eq!(r(&c, "192.168.1.1:8080"), OutboundRoute::Passthrough);
        assert_eq!(r(&c, "172.16.0.1:8080"), OutboundRoute::Passthrough);
        c.outbound.unknown_server = UnknownServer::AnyInTrustDomain;
        assert_eq!(
            r(&c, "10.2.2.3:8080"),
            OutboundRoute::Mesh(c.trust_domain_client())
        );
        assert_eq!(r(&c, "10.2.2.3:8080"), mesh(1));
        assert_eq!(c.tls_spec().client.len(), 2);
        assert_eq!(c.client_config_count(), 2);
        assert_eq!(c.central_client(0), None);
    }
}
