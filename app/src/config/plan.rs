//! From a validated [`Config`] to the data plane's plan
//! ([`rampart_proxy::config::ProxyConfig`]): the sections the proxy defines
//! itself are handed over as they are; the rest is derived here.

use std::sync::Arc;

use rampart_authz::Authorizer;
use rampart_identity::{IdMatcher, TrustDomain};
use rampart_proxy::config as pc;

use super::Config;

impl Config {
    /// The server identities of the central servers reached over https
    /// with their own list, in the order of [`pc::CentralConfig::tls_clients`]:
    /// the bundle server's, then the decision-log collector's.
    pub(crate) fn central_tls_clients(&self) -> Vec<IdMatcher> {
        let bundle = self
            .inbound
            .bundle
            .as_ref()
            .and_then(|b| b.server_identities.as_ref());
        let logs = self
            .decision_logs
            .as_ref()
            .and_then(|d| d.server_identities.as_ref());
        [bundle, logs]
            .into_iter()
            .flatten()
            .map(|ids| IdMatcher::ids(ids.iter().cloned()))
            .collect()
    }

    /// Builds the data plane's plan; `td` is the sidecar's trust domain and
    /// `authorizer` the policies in force at start ([`Config::initial_policies`]).
    pub fn proxy_config(&self, td: TrustDomain, authorizer: Option<Authorizer>) -> pc::ProxyConfig {
        use rampart_proxy::policy::{PolicyCell, PolicyOrigin};
        // An Istio PeerAuthentication's modes are not baked in here: the
        // proxy reads them from the policies in force for each connection
        // (`ProxyConfig::inbound_port`), so a reload applies them.
        let from_kubernetes = self
            .inbound
            .istio
            .as_ref()
            .is_some_and(|i| i.kubernetes.is_some());
        let cell = match (authorizer, self.inbound.bundle.is_some()) {
            (Some(a), false) => PolicyCell::new(a),
            (Some(a), true) => PolicyCell::with_origin(a, PolicyOrigin::Fallback),
            (None, _) if from_kubernetes => {
                PolicyCell::waiting_for(PolicyOrigin::WaitingForKubernetes)
            }
            (None, _) => PolicyCell::waiting(),
        };
        pc::ProxyConfig {
            trust_domain: td,
            admin: self.admin.address,
            transparent: self.transparent.clone(),
            listeners: self.listeners.clone(),
            outbound: self.outbound.clone(),
            authorizer: Arc::new(cell),
            inbound: pc::InboundServing {
                ports: self
                    .inbound
                    .ports
                    .iter()
                    .map(|p| pc::InboundPort {
                        port: p.port,
                        protocol: p.protocol,
                        mode: p.mode,
                        allow_dns_san_clients: p.allow_dns_san_clients,
                    })
                    .collect(),
                default_mode: pc::TlsMode::Strict,
                xfcc: self.inbound.xfcc,
                xfcc_details: self.inbound.set_current_client_cert_details,
            },
            limits: self.limits.clone(),
            observe: pc::ObserveConfig {
                access_log: self.log.access,
                denials_per_second: self.log.denials_per_second,
                // Validated above; lowercase, as header names are.
                request_id_header: http::HeaderName::from_bytes(
                    self.log.request_id_header.to_ascii_lowercase().as_bytes(),
                )
                .ok(),
                // Validated above.
                access_headers: self
                    .log
                    .access_headers
                    .iter()
                    .filter_map(|h| {
                        http::HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).ok()
                    })
                    .collect(),
                // Started by `run` inside its runtime.
                tracing: None,
            },
            // Started by `run` inside its runtime.
            discovery: None,
            central: pc::CentralConfig {
                tls_clients: self.central_tls_clients(),
                ..pc::CentralConfig::default()
            },
        }
    }
}

/// An `http://` or `https://` URL with a host, for the central servers.
pub fn central_url(s: &str) -> Result<http::Uri, String> {
    let u: http::Uri = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    match (u.scheme_str(), u.host()) {
        (Some("http" | "https"), Some(h)) if !h.is_empty() => Ok(u),
        _ => Err(format!(
            "{s:?}: expected an http:// or https:// URL with a host"
        )),
    }
}
