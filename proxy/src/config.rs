//! The proxy's runtime plan: typed settings handed over by the application
//! (`rampart-app`) after it has loaded and validated the YAML configuration.
//!
//! The sections of the configuration file that the data plane consumes as
//! they are (`transparent`, `listeners`, `outbound`, `limits`, and the
//! enums of `inbound.ports` and `inbound.xfcc`) are defined once, here: they
//! derive serde's traits with their defaults, and `rampart-app` embeds them
//! in its `Config`. The application checks them as a whole; this module
//! only assumes that they were checked.

pub mod duration;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use rampart_identity::store::{ConfigSpec, TlsConfigs};
use rampart_identity::tls::ServerSpec;
use rampart_identity::{IdMatcher, SpiffeId, TrustDomain};
use serde::{Deserialize, Serialize};

/// Everything the data plane needs to run.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// The sidecar's own trust domain.
    pub trust_domain: TrustDomain,
    /// Admin listener address.
    pub admin: SocketAddr,
    /// Transparent (iptables) listeners, when enabled.
    pub transparent: Option<TransparentConfig>,
    /// Explicit listeners.
    pub listeners: Vec<ListenerConfig>,
    /// Outbound routing and server verification.
    pub outbound: OutboundConfig,
    /// Inbound authorization: the policies in force, swapped on reload.
    pub authorizer: Arc<crate::policy::PolicyCell>,
    /// Inbound ports: declared protocol and mTLS mode; XFCC handling.
    pub inbound: InboundServing,
    /// Timeouts and limits.
    pub limits: Limits,
    /// Access logs and request IDs.
    pub observe: ObserveConfig,
    /// Central management: external authorizers, decision logs, and the
    /// TLS client identities of the central servers.
    pub central: CentralConfig,
    /// What discovery knows (services, endpoints and their identities);
    /// `None` routes by `outbound` rules only.
    pub discovery: Option<Arc<rampart_discovery::Registry>>,
}

/// What the request path uses of central management. Both hooks are
/// implemented by `rampart-central` and installed by the binary; `None`
/// costs one branch per request.
#[derive(Clone, Default)]
pub struct CentralConfig {
    /// Answers CUSTOM policies. Without it a CUSTOM match is refused
    /// (`provider_failed`, fail closed).
    pub external: Option<Arc<dyn rampart_authz::external::ExternalAuthorizer>>,
    /// Receives every HTTP decision, without waiting.
    pub decision_log: Option<Arc<dyn rampart_authz::central::decision_log::DecisionSink>>,
    /// Server identities of the bundle server and the decision-log
    /// collector over `https`, one TLS client configuration each (see
    /// [`ProxyConfig::central_client`]).
    pub tls_clients: Vec<IdMatcher>,
}

impl std::fmt::Debug for CentralConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CentralConfig")
            .field("external", &self.external.is_some())
            .field("decision_log", &self.decision_log.is_some())
            .field("tls_clients", &self.tls_clients)
            .finish()
    }
}

/// Access logs and request IDs.
#[derive(Debug, Clone)]
pub struct ObserveConfig {
    /// One access event per request or connection on stdout.
    pub access_log: bool,
    /// With access logs off, at most this many denials are logged a second.
    pub denials_per_second: u32,
    /// Set on requests to the app that do not carry it (`None`: never).
    pub request_id_header: Option<http::HeaderName>,
    /// Request headers whose values access events carry.
    pub access_headers: Vec<http::HeaderName>,
    /// Trace spans (`None`: tracing off, which costs one check per request).
    pub tracing: Option<Arc<crate::trace::Tracing>>,
}

impl Default for ObserveConfig {
    fn default() -> Self {
        ObserveConfig {
            access_log: false,
            denials_per_second: 10,
            request_id_header: Some(http::HeaderName::from_static("x-request-id")),
            access_headers: Vec::new(),
            tracing: None,
        }
    }
}

/// The two capture listeners of a pod (`transparent:`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TransparentConfig {
    /// Where redirected outbound connections arrive.
    #[serde(default = "default_outbound")]
    pub outbound: SocketAddr,
    /// Where redirected inbound connections arrive.
    #[serde(default = "default_inbound")]
    pub inbound: SocketAddr,
    /// Address the app listens on; inbound traffic goes to `app_host:<original port>`.
    #[serde(default = "default_app_host")]
    pub app_host: IpAddr,
}

impl Default for TransparentConfig {
    fn default() -> Self {
        TransparentConfig {
            outbound: default_outbound(),
            inbound: default_inbound(),
            app_host: default_app_host(),
        }
    }
}

// The ports `rampart init` redirects to by default.
fn default_outbound() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 15001))
}
fn default_inbound() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 15006))
}
fn default_app_host() -> IpAddr {
    IpAddr::from([127, 0, 0, 1])
}

/// Direction of an explicit listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Accepts plaintext from the local app, originates mTLS to a peer sidecar.
    Outbound,
    /// Terminates mTLS from peer sidecars, forwards plaintext to the local app.
    Inbound,
}

impl Direction {
    /// Label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// A listener bound to a configured address that forwards to a configured
/// target (an entry of `listeners:`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Name for logs.
    pub name: String,
    /// Direction.
    pub direction: Direction,
    /// Address to bind.
    pub listen: SocketAddr,
    /// Where to forward (the peer sidecar for outbound, the app for inbound).
    pub target: SocketAddr,
    /// Inbound only: the port policies see (default: the target's port,
    /// [`ListenerConfig::policy_port`]).
    #[serde(default)]
    pub port: Option<u16>,
    /// Outbound only: identities the target must present; when `None` the
    /// outbound server rules decide, as for a captured connection.
    #[serde(default)]
    pub server_identities: Option<Vec<SpiffeId>>,
}

impl ListenerConfig {
    /// The port inbound policies see for this listener's connections.
    pub fn policy_port(&self) -> u16 {
        self.port.unwrap_or(self.target.port())
    }
}

/// How outbound connections are routed and which servers are accepted
/// (`outbound:`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutboundConfig {
    /// Destinations outside the mesh by address: forwarded as plaintext.
    #[serde(default)]
    pub passthrough_cidrs: Vec<IpNet>,
    /// Destinations outside the mesh by port: forwarded as plaintext.
    #[serde(default)]
    pub passthrough_ports: Vec<u16>,
    /// Meshed destination ports carried as opaque TCP without waiting to
    /// detect HTTP (server-speaks-first protocols).
    #[serde(default)]
    pub opaque_ports: Vec<u16>,
    /// When set, only these destinations are in the mesh; others pass through.
    #[serde(default)]
    pub mesh_cidrs: Option<Vec<IpNet>>,
    /// Which identity each meshed destination must present; first match wins.
    #[serde(default)]
    pub servers: Vec<ServerRule>,
    /// What to do for a meshed destination no rule matches.
    #[serde(default)]
    pub unknown_server: UnknownServer,
}

/// Identities expected of the servers at some destinations (an entry of
/// `outbound.servers`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerRule {
    /// Destination addresses (empty: any).
    #[serde(default)]
    pub cidrs: Vec<IpNet>,
    /// Destination ports (empty: any).
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Accepted server SPIFFE IDs.
    #[serde(default)]
    pub identities: Vec<SpiffeId>,
    /// Accepted server trust domains (any ID in them).
    #[serde(default)]
    pub trust_domains: Vec<TrustDomain>,
    /// Accepted servers whose certificate has no SPIFFE ID, only DNS SANs
    /// (ACM PCA or file certificates, App Mesh's SAN pinning): one of these
    /// names must be among its DNS SANs (exact, case-insensitive) and its
    /// chain must lead to the bundle of the sidecar's own trust domain.
    /// Checked in the handshake. A name is weaker than a SPIFFE ID, hence
    /// the opt-in by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_dns_san_servers: Vec<String>,
}

impl ServerRule {
    /// Whether `dst` is one of the destinations this rule covers.
    pub fn matches(&self, dst: SocketAddr) -> bool {
        (self.cidrs.is_empty() || self.cidrs.iter().any(|c| c.contains(&dst.ip())))
            && (self.ports.is_empty() || self.ports.contains(&dst.port()))
    }

    /// The server identities it accepts.
    pub fn expect(&self) -> IdMatcher {
        IdMatcher::ids(self.identities.iter().cloned())
            .union(&IdMatcher::trust_domains(
                self.trust_domains.iter().cloned(),
            ))
            .union(&IdMatcher::dns_names(
                self.allow_dns_san_servers.iter().cloned(),
            ))
    }
}

/// Policy for meshed destinations without a server rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownServer {
    /// Refuse the connection (fail closed).
    #[default]
    Deny,
    /// Accept any server of the sidecar's own trust domain.
    AnyInTrustDomain,
}

/// Timeouts and limits (`limits:`). Durations are written with a unit
/// ([`duration`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Connecting to a target.
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    /// Completing a TLS handshake.
    #[serde(with = "duration")]
    pub handshake_timeout: Duration,
    /// How long a drain waits for connections to finish.
    #[serde(with = "duration")]
    pub drain_timeout: Duration,
    /// How long an HTTP/1 keep-alive connection is still served once a
    /// drain starts (at most `drain_timeout`): its next response carries
    /// `Connection: close`, and an idle one is closed when the grace ends.
    /// Closing an idle keep-alive connection at once races the peer's next
    /// request on it, which then fails (RFC 9112 section 9.6).
    #[serde(with = "duration")]
    pub http1_drain_grace: Duration,
    /// Open connections per listener.
    pub max_connections: usize,
    /// Connections per source address (per /64 for IPv6) still in their
    /// TLS handshake or protocol detection, per inbound listener; more are
    /// closed at accept, so that one client cannot fill `max_connections`.
    pub max_pending_per_source: usize,
    /// Looking at the first bytes of a connection of undeclared protocol.
    #[serde(with = "duration")]
    pub detect_timeout: Duration,
    /// Receiving a complete HTTP/1 request head (cuts off slowloris).
    #[serde(with = "duration")]
    pub http_header_read_timeout: Duration,
    /// Waiting for the app's response head, from the end of the request body.
    #[serde(with = "duration")]
    pub http_response_timeout: Duration,
    /// Largest request head, in bytes; beyond it 431.
    pub http_max_header_bytes: usize,
    /// Most request header fields; beyond them 431.
    pub http_max_headers: usize,
    /// Concurrent HTTP/2 streams per connection.
    pub http_max_concurrent_streams: u32,
    /// Idle pooled connections to the app are closed after this.
    #[serde(with = "duration")]
    pub http_pool_idle_timeout: Duration,
    /// Pooled outbound (sidecar-to-sidecar) connections at most, over all
    /// destinations; a request needing another waits up to the connect
    /// timeout for one to close, then gets 503.
    pub http_pool_max_connections: usize,
    /// Inbound HTTP/2 connections without an open stream for this long are
    /// closed (GOAWAY).
    #[serde(with = "duration")]
    pub http_idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connect_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(15),
            // Long enough for a busy pooled connection's next request,
            // short enough not to hold an idle sidecar's exit for long.
            http1_drain_grace: Duration::from_secs(2),
            max_connections: 10_000,
            // Far above what a peer sidecar opens at once (its HTTP is
            // pooled), far below `max_connections`.
            max_pending_per_source: 128,
            // Long enough for a slow first segment, short enough that a
            // server-speaks-first app on an undeclared port only sees a
            // one-second delay before its greeting.
            detect_timeout: Duration::from_secs(1),
            http_header_read_timeout: Duration::from_secs(10),
            http_response_timeout: Duration::from_secs(15),
            http_max_header_bytes: 64 * 1024,
            http_max_headers: 100,
            http_max_concurrent_streams: 256,
            http_pool_idle_timeout: Duration::from_secs(60),
            // Envoy's default circuit-breaker `max_connections`.
            http_pool_max_connections: 1024,
            // Longer than the peers' pool idle timeout (60 s), so that the
            // client side, not a GOAWAY racing a new request, normally ends
            // an idle pooled connection.
            http_idle_timeout: Duration::from_secs(300),
        }
    }
}

/// Inbound settings other than authorization.
#[derive(Debug, Clone, Default)]
pub struct InboundServing {
    /// Ports with declared settings; others get [`InboundPort::default`]
    /// with `default_mode`.
    pub ports: Vec<InboundPort>,
    /// The mTLS mode of undeclared ports (strict unless an Istio
    /// PeerAuthentication says otherwise).
    pub default_mode: TlsMode,
    /// What the inbound sidecar does with `x-forwarded-client-cert`.
    pub xfcc: XfccMode,
    /// Which peer certificate fields our XFCC element carries (Envoy's
    /// `set_current_client_cert_details`).
    pub xfcc_details: rampart_authz::input::XfccDetails,
}

/// How one inbound (app) port is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct InboundPort {
    /// The app port.
    pub port: u16,
    /// What the port speaks, or whether to detect it.
    pub protocol: DeclaredProtocol,
    /// Whether plaintext is accepted beside mTLS.
    pub mode: TlsMode,
    /// Whether mTLS clients whose certificate has no SPIFFE ID but a DNS SAN,
    /// issued by the CA of the sidecar's own trust domain, are accepted (an
    /// ingress outside the mesh). Widens the handshake; only `dns:`
    /// principal rules can then admit such a peer.
    pub allow_dns_san_clients: bool,
}

/// A port's declared protocol (`inbound.ports[].protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeclaredProtocol {
    /// Look at the first bytes (with the detect timeout).
    #[default]
    Detect,
    /// Opaque TCP: never wait for client bytes (server-speaks-first protocols).
    Opaque,
    /// HTTP/1.1 or HTTP/2 (told apart by the connection preface).
    Http,
    /// HTTP/2 only, to the app as well.
    Http2,
    /// gRPC (HTTP/2 to the app, gRPC status codes on local errors).
    Grpc,
}

/// Whether a port requires mTLS (`inbound.ports[].mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsMode {
    /// mTLS only.
    #[default]
    Strict,
    /// mTLS and plaintext on the same port, told apart by detection;
    /// plaintext carries no peer identity. For migrations.
    #[serde(rename = "permissive")]
    PermissiveAllowPlaintext,
}

impl TlsMode {
    /// How an Istio PeerAuthentication mode is served: STRICT is strict;
    /// PERMISSIVE and DISABLE accept plaintext (a DISABLE port still
    /// accepts mTLS, since Rampart's peers always dial with it).
    pub fn of_peer_mode(mode: rampart_authz::istio::PeerMode) -> TlsMode {
        match mode.allows_plaintext() {
            true => TlsMode::PermissiveAllowPlaintext,
            false => TlsMode::Strict,
        }
    }
}

/// Handling of `x-forwarded-client-cert` on requests sent to the app
/// (`inbound.xfcc`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum XfccMode {
    /// Remove any client-sent copy, then set ours for an authenticated peer
    /// (Envoy's `SANITIZE_SET`).
    #[default]
    SanitizeSet,
    /// Keep the client's header and append ours for an authenticated peer
    /// (Envoy's `APPEND_FORWARD`): the app must trust the caller's chain.
    AppendForward,
    /// Remove any client-sent copy and add nothing (Envoy's `SANITIZE`).
    Sanitize,
}

/// One of the TLS client configurations of [`ProxyConfig::tls_spec`]: each
/// verifies one set of server identities. Only the plan hands them out, so
/// a handle always names a configuration the identity store built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientConfigId(usize);

impl ClientConfigId {
    /// The configuration of server rule `i` (`i == servers.len()`: the
    /// trust-domain fallback), for the route stage.
    pub(crate) fn of_server_rule(i: usize) -> ClientConfigId {
        ClientConfigId(i)
    }

    /// Its configuration among `configs`, which the identity store built
    /// from this plan's [`ProxyConfig::tls_spec`].
    pub fn of(self, configs: &TlsConfigs) -> &Arc<rustls::ClientConfig> {
        // The store builds one client configuration per entry of the spec,
        // and the plan only mints handles below the spec's length.
        &configs.client[self.0]
    }

    /// Its position in the spec, for tables sized by
    /// [`ProxyConfig::client_config_count`] (one HTTP/2 pool per configuration).
    pub fn index(self) -> usize {
        self.0
    }
}

/// One of the TLS server configurations of [`ProxyConfig::tls_spec`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServerConfigId {
    /// Peers must present a SPIFFE ID.
    SpiffeOnly,
    /// Also clients with only a DNS SAN from our trust domain's CA.
    WithDnsSanClients,
}

impl ServerConfigId {
    /// Its configuration among `configs` (built from [`ProxyConfig::tls_spec`]).
    pub fn of(self, configs: &TlsConfigs) -> &Arc<rustls::ServerConfig> {
        // tls_spec lists exactly these two, in this order.
        &configs.server[self as usize]
    }
}

impl ProxyConfig {
    /// The TLS configurations the identity store must build for this plan.
    /// Client configurations: one per server rule, then the trust-domain
    /// fallback, then one per explicit outbound listener with its own
    /// identities, then one per central TLS client; the handles of
    /// [`crate::route::route`], [`ProxyConfig::listener_client`],
    /// [`ProxyConfig::trust_domain_client`] and
    /// [`ProxyConfig::central_client`] name them.
    pub fn tls_spec(&self) -> ConfigSpec {
        let mut client: Vec<IdMatcher> = self
            .outbound
            .servers
            .iter()
            .map(ServerRule::expect)
            .collect();
        client.push(IdMatcher::trust_domains([self.trust_domain.clone()]));
        for l in &self.listeners {
            if let Some(ids) = &l.server_identities {
                client.push(IdMatcher::ids(ids.iter().cloned()));
            }
        }
        client.extend(self.central.tls_clients.iter().cloned());
        let spiffe_only = ServerSpec::default();
        let with_dns = ServerSpec {
            allow_dns_san_clients: true,
            ..ServerSpec::default()
        };
        ConfigSpec {
            // In the order of [`ServerConfigId`].
            server: vec![spiffe_only, with_dns],
            client,
            // Every sidecar speaks HTTP/2 to its peers. Tunneled app bytes
            // are told apart by detection, not by ALPN.
            alpn: vec![b"h2".to_vec()],
            // Ingresses outside the mesh may speak HTTP/1.1 only (an ALPN
            // of just `http/1.1` must not fail the handshake); h2 first, so
            // that sidecars and h2 ingresses get it.
            server_alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        }
    }

    /// How many client configurations [`ProxyConfig::tls_spec`] lists.
    pub fn client_config_count(&self) -> usize {
        self.central_client_base() + self.central.tls_clients.len()
    }

    /// The server configuration for an inbound port.
    pub fn server_config(port: &InboundPort) -> ServerConfigId {
        if port.allow_dns_san_clients {
            ServerConfigId::WithDnsSanClients
        } else {
            ServerConfigId::SpiffeOnly
        }
    }

    /// How inbound app port `port` is served. The mTLS mode is the one the
    /// Istio PeerAuthentication of the policies in force gives the port,
    /// if any (read per connection, so a policy reload changes it for
    /// every later connection), else the configured one.
    pub fn inbound_port(&self, port: u16) -> InboundPort {
        let mut settings = self
            .inbound
            .ports
            .iter()
            .find(|p| p.port == port)
            .copied()
            .unwrap_or(InboundPort {
                port,
                mode: self.inbound.default_mode,
                ..InboundPort::default()
            });
        if let Some(mode) = self.authorizer.current().authorizer.peer_mode(port) {
            settings.mode = TlsMode::of_peer_mode(mode);
        }
        settings
    }

    /// The client configuration of explicit listener `listener_index`, if
    /// it has server identities of its own.
    pub fn listener_client(&self, listener_index: usize) -> Option<ClientConfigId> {
        let base = self.outbound.servers.len() + 1;
        let mut n = 0;
        for (i, l) in self.listeners.iter().enumerate() {
            if l.server_identities.is_some() {
                if i == listener_index {
                    return Some(ClientConfigId(base + n));
                }
                n += 1;
            }
        }
        None
    }

    /// The client configuration that trusts any server of the sidecar's
    /// own trust domain.
    pub fn trust_domain_client(&self) -> ClientConfigId {
        ClientConfigId(self.outbound.servers.len())
    }

    /// The client configuration of central TLS client `i`
    /// ([`CentralConfig::tls_clients`]), if there is one.
    pub fn central_client(&self, i: usize) -> Option<ClientConfigId> {
        (i < self.central.tls_clients.len()).then(|| ClientConfigId(self.central_client_base() + i))
    }

    fn central_client_base(&self) -> usize {
        let listeners = self
            .listeners
            .iter()
            .filter(|l| l.server_identities.is_some())
            .count();
        self.outbound.servers.len() + 1 + listeners
    }
}
