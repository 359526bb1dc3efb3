//! The proxy's runtime plan: typed, validated settings handed over by the
//! binary after it has loaded and checked the YAML configuration.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use rampart_identity::store::ConfigSpec;
use rampart_identity::tls::ServerSpec;
use rampart_identity::{IdMatcher, TrustDomain};

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
    pub inbound: InboundConfig,
    /// Timeouts and limits.
    pub limits: Limits,
    /// Access logs and request IDs.
    pub observe: ObserveConfig,
    /// Central management: external authorizers, decision logs, and the
    /// TLS client identities of the central servers.
    pub central: CentralConfig,
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
    /// [`ProxyConfig::central_client_index`]).
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
}

impl Default for ObserveConfig {
    fn default() -> Self {
        ObserveConfig {
            access_log: false,
            denials_per_second: 10,
            request_id_header: Some(http::HeaderName::from_static("x-request-id")),
            access_headers: Vec::new(),
        }
    }
}

/// The two capture listeners of a pod.
#[derive(Debug, Clone)]
pub struct TransparentConfig {
    /// Where redirected outbound connections arrive.
    pub outbound: SocketAddr,
    /// Where redirected inbound connections arrive.
    pub inbound: SocketAddr,
    /// Address the app listens on; inbound traffic goes to `app_host:<original port>`.
    pub app_host: IpAddr,
}

/// Direction of an explicit listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// A listener bound to a configured address that forwards to a configured target.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// Name for logs.
    pub name: String,
    /// Direction.
    pub direction: Direction,
    /// Address to bind.
    pub listen: SocketAddr,
    /// Where to forward (the peer sidecar for outbound, the app for inbound).
    pub target: SocketAddr,
    /// Inbound only: the port policies see (default: the target's port).
    pub port: u16,
    /// Outbound only: identities the target must present; when `None` the
    /// outbound server rules decide, as for a captured connection.
    pub server_identities: Option<IdMatcher>,
}

/// How outbound connections are routed and which servers are accepted.
#[derive(Debug, Clone, Default)]
pub struct OutboundConfig {
    /// Destinations outside the mesh by address: forwarded as plaintext.
    pub passthrough_cidrs: Vec<IpNet>,
    /// Destinations outside the mesh by port: forwarded as plaintext.
    pub passthrough_ports: Vec<u16>,
    /// Meshed destination ports carried as opaque TCP without waiting to
    /// detect HTTP (server-speaks-first protocols).
    pub opaque_ports: Vec<u16>,
    /// When set, only these destinations are in the mesh; others pass through.
    pub mesh_cidrs: Option<Vec<IpNet>>,
    /// Which identity each meshed destination must present; first match wins.
    pub servers: Vec<ServerRule>,
    /// What to do for a meshed destination no rule matches.
    pub unknown_server: UnknownServer,
}

/// Identities expected of the servers at some destinations.
#[derive(Debug, Clone)]
pub struct ServerRule {
    /// Destination addresses (empty: any).
    pub cidrs: Vec<IpNet>,
    /// Destination ports (empty: any).
    pub ports: Vec<u16>,
    /// Accepted server identities.
    pub expect: IdMatcher,
}

impl ServerRule {
    /// Whether `dst` is one of the destinations this rule covers.
    pub fn matches(&self, dst: SocketAddr) -> bool {
        (self.cidrs.is_empty() || self.cidrs.iter().any(|c| c.contains(&dst.ip())))
            && (self.ports.is_empty() || self.ports.contains(&dst.port()))
    }
}

/// Policy for meshed destinations without a server rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnknownServer {
    /// Refuse the connection (fail closed).
    #[default]
    Deny,
    /// Accept any server of the sidecar's own trust domain.
    AnyInTrustDomain,
}

/// Timeouts and limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connecting to a target.
    pub connect_timeout: Duration,
    /// Completing a TLS handshake.
    pub handshake_timeout: Duration,
    /// How long a drain waits for connections to finish.
    pub drain_timeout: Duration,
    /// Open connections per listener.
    pub max_connections: usize,
    /// HTTP timeouts and limits.
    pub http: HttpLimits,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connect_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(15),
            max_connections: 10_000,
            http: HttpLimits::default(),
        }
    }
}

/// Inbound settings other than authorization.
#[derive(Debug, Clone, Default)]
pub struct InboundConfig {
    /// Ports with declared settings; others get [`InboundPort::default`].
    pub ports: Vec<InboundPort>,
    /// What the inbound sidecar does with `x-forwarded-client-cert`.
    pub xfcc: XfccMode,
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

/// A port's declared protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
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

/// Whether a port requires mTLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// mTLS only.
    #[default]
    Strict,
    /// mTLS and plaintext on the same port, told apart by detection;
    /// plaintext carries no peer identity. For migrations.
    PermissiveAllowPlaintext,
}

/// Handling of `x-forwarded-client-cert` on requests sent to the app.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
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

/// HTTP timeouts and limits.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// Looking at the first bytes of a connection of undeclared protocol.
    pub detect_timeout: Duration,
    /// Receiving a complete HTTP/1 request head (cuts off slowloris).
    pub header_read_timeout: Duration,
    /// Waiting for the app's response head, from the end of the request body.
    pub response_timeout: Duration,
    /// Largest request head, in bytes; beyond it 431.
    pub max_header_bytes: usize,
    /// Most request header fields; beyond them 431.
    pub max_headers: usize,
    /// Concurrent HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// Idle pooled connections to the app are closed after this.
    pub pool_idle_timeout: Duration,
    /// Pooled outbound (sidecar-to-sidecar) connections at most, over all
    /// destinations; a request needing another waits up to the connect
    /// timeout for one to close, then gets 503.
    pub pool_max_connections: usize,
    /// Inbound HTTP/2 connections without an open stream for this long are
    /// closed (GOAWAY).
    pub idle_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            // Long enough for a slow first segment, short enough that a
            // server-speaks-first app on an undeclared port only sees a
            // one-second delay before its greeting.
            detect_timeout: Duration::from_secs(1),
            header_read_timeout: Duration::from_secs(10),
            response_timeout: Duration::from_secs(15),
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            max_concurrent_streams: 256,
            pool_idle_timeout: Duration::from_secs(60),
            // Envoy's default circuit-breaker `max_connections`.
            pool_max_connections: 1024,
            // Longer than the peers' pool idle timeout (60 s), so that the
            // client side, not a GOAWAY racing a new request, normally ends
            // an idle pooled connection.
            idle_timeout: Duration::from_secs(300),
        }
    }
}

impl ProxyConfig {
    /// The TLS configurations the identity store must build for this plan.
    /// Client indices: one per server rule, then the trust-domain fallback,
    /// then one per explicit outbound listener with its own identities,
    /// then one per central TLS client.
    pub fn tls_spec(&self) -> ConfigSpec {
        let mut client: Vec<IdMatcher> = self
            .outbound
            .servers
            .iter()
            .map(|r| r.expect.clone())
            .collect();
        client.push(IdMatcher::trust_domains([self.trust_domain.clone()]));
        for l in &self.listeners {
            if let Some(ids) = &l.server_identities {
                client.push(ids.clone());
            }
        }
        client.extend(self.central.tls_clients.iter().cloned());
        let spiffe_only = ServerSpec::default();
        let with_dns = ServerSpec {
            allow_dns_san_clients: true,
            ..ServerSpec::default()
        };
        ConfigSpec {
            // Indexed by [`ProxyConfig::server_index`].
            server: vec![spiffe_only, with_dns],
            client,
            // Every sidecar speaks HTTP/2 to its peers. Tunneled app bytes
            // are told apart by detection, not by ALPN.
            alpn: vec![b"h2".to_vec()],
        }
    }

    /// Index of the server configuration (in [`ProxyConfig::tls_spec`]) for
    /// an inbound port.
    pub fn server_index(port: &InboundPort) -> usize {
        usize::from(port.allow_dns_san_clients)
    }

    /// How inbound app port `port` is served.
    pub fn inbound_port(&self, port: u16) -> InboundPort {
        self.inbound
            .ports
            .iter()
            .find(|p| p.port == port)
            .copied()
            .unwrap_or(InboundPort {
                port,
                ..InboundPort::default()
            })
    }

    /// Index of the client configuration of explicit listener `listener_index`.
    pub fn listener_client_index(&self, listener_index: usize) -> Option<usize> {
        let base = self.outbound.servers.len() + 1;
        let mut n = 0;
        for (i, l) in self.listeners.iter().enumerate() {
            if l.server_identities.is_some() {
                if i == listener_index {
                    return Some(base + n);
                }
                n += 1;
            }
        }
        None
    }

    /// Index of the client configuration that trusts any server of the
    /// sidecar's own trust domain.
    pub fn trust_domain_client_index(&self) -> usize {
        self.outbound.servers.len()
    }

    /// Index of the client configuration of central TLS client `i`.
    pub fn central_client_index(&self, i: usize) -> usize {
        let listeners = self
            .listeners
            .iter()
            .filter(|l| l.server_identities.is_some())
            .count();
        self.outbound.servers.len() + 1 + listeners + i
    }
}
