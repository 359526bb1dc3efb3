//! The YAML configuration: one set of typed structs with defaults, parsed
//! straight from the file (serde) and validated as a whole before any
//! socket is opened. Every problem is reported, each with the file, line,
//! column and field path, the position taken from the YAML parser
//! ([`positions`]). Every field is documented in docs/config.md.
//!
//! The sections the data plane uses as they are (`transparent`,
//! `listeners`, `outbound`, `limits`, the enums of `inbound`) are the
//! proxy's own runtime types ([`rampart_proxy::config`]), so each setting
//! is defined once; this module adds the sections that only the
//! application reads (identity, admin, policies, central management, logs,
//! runtime), checks everything, and builds the proxy's plan ([`plan`]).
//! Key files and policy files are read by [`keys`] and [`policies`].

mod keys;
pub mod plan;
pub mod policies;
pub mod positions;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rampart_identity::{SpiffeId, TrustDomain};
use rampart_proxy::config::{
    DeclaredProtocol, Direction, Limits, ListenerConfig, OutboundConfig, TlsMode,
    TransparentConfig, XfccMode,
};
use serde::{Deserialize, Serialize};

pub use plan::central_url;
pub use rampart_proxy::config::duration;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the sidecar's SVID and trust bundles come from.
    pub identity: IdentityConfig,
    /// The admin listener.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Transparent capture listeners (iptables REDIRECT); absent means off.
    #[serde(default)]
    pub transparent: Option<TransparentConfig>,
    /// Explicit listeners.
    #[serde(default)]
    pub listeners: Vec<ListenerConfig>,
    /// Outbound routing and server identities.
    #[serde(default)]
    pub outbound: OutboundConfig,
    /// Inbound authorization.
    #[serde(default)]
    pub inbound: InboundConfig,
    /// Timeouts and limits.
    #[serde(default)]
    pub limits: Limits,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// The async runtime.
    #[serde(default)]
    pub runtime: RuntimeConfig,
    /// External authorizers for CUSTOM policies (Envoy's ext_authz gRPC).
    #[serde(default)]
    pub ext_authz: ExtAuthzConfig,
    /// Decision logs shipped to a central collector; absent means off.
    #[serde(default)]
    pub decision_logs: Option<DecisionLogsConfig>,
    /// Trace spans exported over OTLP; absent means off.
    #[serde(default)]
    pub tracing: Option<TracingSection>,
    /// Service discovery: endpoints and their identities (docs/discovery.md).
    #[serde(default)]
    pub discovery: rampart_discovery::DiscoveryConfig,
}

/// `tracing`: one span per proxied HTTP request, exported over OTLP/HTTP.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TracingSection {
    /// The OTLP/HTTP traces endpoint (`http://HOST:4318/v1/traces`).
    pub otlp_endpoint: String,
    /// `service.name` of the spans (default `rampart`).
    #[serde(default = "d_tracing_service")]
    pub service_name: String,
    /// The ratio of new traces recorded, 0 to 1 (a caller's decision wins).
    #[serde(default = "d_tracing_sampling")]
    pub sampling: f64,
    /// How often batched spans are sent.
    #[serde(default = "d_tracing_flush", with = "duration")]
    pub flush_interval: Duration,
}

fn d_tracing_service() -> String {
    "rampart".into()
}

fn d_tracing_sampling() -> f64 {
    1.0
}

fn d_tracing_flush() -> Duration {
    Duration::from_secs(5)
}

impl TracingSection {
    /// The proxy's tracing settings; `None` with the reason when invalid.
    pub fn to_proxy(&self) -> Result<rampart_proxy::trace::TracingConfig, String> {
        let uri: http::Uri = self
            .otlp_endpoint
            .parse()
            .map_err(|e| format!("not a URL: {e}"))?;
        if uri.scheme_str() != Some("http") || uri.host().is_none() {
            return Err("must be an http:// URL with a host".into());
        }
        Ok(rampart_proxy::trace::TracingConfig {
            otlp_endpoint: uri,
            service_name: self.service_name.clone(),
            sampling: self.sampling,
            flush_interval: self.flush_interval,
        })
    }
}

/// Identity source: exactly one of `files` or `dev_ca`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// SVID and bundle from PEM files.
    #[serde(default)]
    pub files: Option<FilesIdentity>,
    /// SVIDs issued in-process by a development CA on disk.
    #[serde(default)]
    pub dev_ca: Option<DevCaIdentity>,
    /// SVIDs streamed from a SPIFFE Workload API (SPIRE agent, `rampart agent`).
    #[serde(default)]
    pub workload_api: Option<crate::identity::WorkloadApiIdentity>,
}

/// PEM files of an SVID and its trust bundle.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FilesIdentity {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// Private key (PKCS#8, SEC1 or PKCS#1 PEM).
    pub key: PathBuf,
    /// CA certificates of the SVID's own trust domain.
    pub bundle: PathBuf,
    /// Bundles of federated trust domains.
    #[serde(default)]
    pub federated: Vec<FederatedBundle>,
    /// How often the files are checked for changes.
    #[serde(default = "default_poll_interval", with = "duration")]
    pub poll_interval: Duration,
}

fn default_poll_interval() -> Duration {
    rampart_identity::files::DEFAULT_POLL_INTERVAL
}

/// A federated trust domain's bundle file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FederatedBundle {
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// Its CA certificates (PEM).
    pub bundle: PathBuf,
}

/// An in-process development CA.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DevCaIdentity {
    /// Directory written by `rampart ca init`.
    pub dir: PathBuf,
    /// The SPIFFE ID to issue to this sidecar.
    pub spiffe_id: SpiffeId,
    /// Lifetime of each SVID; renewed at half-life.
    #[serde(default = "default_svid_ttl", with = "duration")]
    pub ttl: Duration,
}

fn default_svid_ttl() -> Duration {
    Duration::from_secs(3600)
}

/// The admin listener.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address to bind.
    #[serde(default = "default_admin")]
    pub address: SocketAddr,
    /// Whether metrics are recorded and served on `/metrics`.
    #[serde(default = "default_true")]
    pub metrics: bool,
}

fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 15000))
}

fn default_true() -> bool {
    true
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            address: default_admin(),
            metrics: true,
        }
    }
}

/// Inbound authorization and serving.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InboundConfig {
    /// Per-port settings and allowed peers.
    #[serde(default)]
    pub ports: Vec<PortConfig>,
    /// Ports no policy (or allowlist) covers.
    #[serde(default)]
    pub default_action: DefaultPortAction,
    /// Policy files (native YAML or Rego wrappers); they replace
    /// `allowed_peers`, which may then not be used.
    #[serde(default)]
    pub policies: Vec<PathBuf>,
    /// `x-forwarded-client-cert` handling.
    #[serde(default)]
    pub xfcc: XfccMode,
    /// The peer certificate fields of the XFCC element the sidecar sets
    /// (Envoy's `set_current_client_cert_details`: `subject`, `uri`, `dns`,
    /// `cert`, `chain`; default `uri` only).
    #[serde(default)]
    pub set_current_client_cert_details: rampart_authz::input::XfccDetails,
    /// A policy bundle polled from a central server. `policies` are then
    /// the local fallback, in force until the first bundle arrives.
    #[serde(default)]
    pub bundle: Option<BundleConfig>,
    /// Istio security resources, read as they are and decided with Istio's
    /// semantics (docs/policy.md#istio-resources).
    #[serde(default)]
    pub istio: Option<IstioConfig>,
    /// How long, and over how many source bytes, one version of the
    /// policies (files, Rego modules, data, Istio files, bundles) may
    /// compile, at start and on reload.
    #[serde(default)]
    pub policy_budget: rampart_proxy::policy::CompileBudget,
}

/// Istio resources for this workload: where they are and who it is.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IstioConfig {
    /// YAML files of AuthorizationPolicy, PeerAuthentication and
    /// RequestAuthentication resources (multi-document, or `kind: List`).
    #[serde(default)]
    pub files: Vec<PathBuf>,
    /// The same resources read from the Kubernetes API: the workload's
    /// namespace and the root namespace, watched (docs/policy.md,
    /// "Istio resources from the Kubernetes API").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<crate::istio_kube::IstioKubernetes>,
    /// The workload's namespace.
    pub namespace: String,
    /// The workload's labels, matched by `selector.matchLabels`.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Istio's root namespace (mesh-wide policies).
    #[serde(default = "d_istio_root")]
    pub root_namespace: String,
    /// The mesh's trust domain (mesh config `trustDomain`).
    #[serde(default = "d_istio_td")]
    pub trust_domain: String,
    /// Mesh config `trustDomainAliases`.
    #[serde(default)]
    pub trust_domain_aliases: Vec<String>,
    /// CA certificates (PEM) that `https://` `jwksUri` servers are verified
    /// against; default: the system bundle
    /// (`/etc/ssl/certs/ca-certificates.crt`).
    #[serde(default)]
    pub jwks_ca_file: Option<PathBuf>,
    /// JWKS fetched for RequestAuthentication, shared by every (re)load.
    #[serde(skip)]
    pub jwks_cache: std::sync::Arc<rampart_authz::jwt::JwksCache>,
    /// The resources read from the Kubernetes API that every (re)load
    /// compiles with the files (empty without `kubernetes`).
    #[serde(skip)]
    pub api_objects: std::sync::Arc<crate::istio_kube::ApiObjects>,
}

impl IstioConfig {
    /// The resources in `files` for a workload of `namespace`, with every
    /// other setting at its default (no labels, root namespace
    /// `istio-system`, trust domain `cluster.local`).
    pub fn new(files: Vec<PathBuf>, namespace: &str) -> IstioConfig {
        IstioConfig {
            files,
            kubernetes: None,
            namespace: namespace.to_owned(),
            labels: Default::default(),
            root_namespace: d_istio_root(),
            trust_domain: d_istio_td(),
            trust_domain_aliases: Vec::new(),
            jwks_ca_file: None,
            jwks_cache: Default::default(),
            api_objects: Default::default(),
        }
    }

    /// Who this sidecar is, for attaching the resources.
    pub fn workload(&self, cfg: &Config) -> rampart_authz::istio::Workload {
        rampart_authz::istio::Workload {
            namespace: self.namespace.clone(),
            labels: self.labels.clone(),
            root_namespace: self.root_namespace.clone(),
            trust_domain: self.trust_domain.clone(),
            trust_domain_aliases: self.trust_domain_aliases.clone(),
            tcp_ports: cfg.istio_tcp_ports(),
            jwks_cache: self.jwks_cache.clone(),
        }
    }

    fn validate(&self, cfg: &Config) -> Vec<(String, String)> {
        let mut p = Vec::new();
        match &self.kubernetes {
            None if self.files.is_empty() => p.push((
                "inbound.istio.files".into(),
                "list at least one file (or read the resources from `kubernetes`)".into(),
            )),
            None => {}
            Some(k) => p.extend(k.validate()),
        }
        if self.namespace.is_empty() {
            p.push(("inbound.istio.namespace".into(), "required".into()));
        }
        if cfg.inbound.bundle.is_some() {
            p.push((
                "inbound.istio".into(),
                "Istio resources and `inbound.bundle` do not combine".into(),
            ));
        }
        for (i, port) in cfg.inbound.ports.iter().enumerate() {
            if port.allowed_peers.is_some() {
                p.push((
                    format!("inbound.ports[{i}].allowed_peers"),
                    "with `inbound.istio`, say who may connect in an AuthorizationPolicy".into(),
                ));
            }
        }
        p
    }
}

fn d_istio_root() -> String {
    "istio-system".into()
}

fn d_istio_td() -> String {
    "cluster.local".into()
}

/// Where the policy bundle comes from and how it is checked.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BundleConfig {
    /// `http://` or `https://` URL of the `.tar.gz` (https: mTLS with the
    /// sidecar's SVID).
    pub url: String,
    /// Mean time between polls; each interval is jittered by ±20%.
    #[serde(default = "d_bundle_poll", with = "duration")]
    pub poll_interval: Duration,
    /// Time limit of one download.
    #[serde(default = "d_central_timeout", with = "duration")]
    pub timeout: Duration,
    /// Largest compressed bundle accepted, in bytes.
    #[serde(default = "d_bundle_max_bytes")]
    pub max_download_bytes: usize,
    /// Rego query of a bundle without Rampart policy files.
    #[serde(default = "d_bundle_query")]
    pub query: String,
    /// Signature verification; absent accepts unsigned bundles.
    #[serde(default)]
    pub verification: Option<VerificationConfig>,
    /// https: SPIFFE IDs the bundle server may present (default: any ID
    /// of the sidecar's trust domain).
    #[serde(default)]
    pub server_identities: Option<Vec<SpiffeId>>,
}

impl BundleConfig {
    /// The bundle at `url`, unsigned, with every other setting at its default.
    pub fn new(url: impl Into<String>) -> BundleConfig {
        BundleConfig {
            url: url.into(),
            poll_interval: d_bundle_poll(),
            timeout: d_central_timeout(),
            max_download_bytes: d_bundle_max_bytes(),
            query: d_bundle_query(),
            verification: None,
            server_identities: None,
        }
    }
}

fn d_bundle_poll() -> Duration {
    Duration::from_secs(30)
}
fn d_central_timeout() -> Duration {
    Duration::from_secs(10)
}
fn d_bundle_max_bytes() -> usize {
    8 << 20
}
fn d_bundle_query() -> String {
    rampart_authz::model::DEFAULT_REGO_QUERY.to_owned()
}

/// Keys a bundle's `.signatures.json` must verify against.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VerificationConfig {
    /// Accepted keys (several during a rotation).
    pub keys: Vec<VerificationKeyConfig>,
    /// When set, the signature's `scope` must equal it.
    #[serde(default)]
    pub scope: Option<String>,
}

/// One bundle verification key.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VerificationKeyConfig {
    /// The key id (the JWT's `kid` or the payload's `keyid`).
    pub key_id: String,
    /// `RS256`, `ES256` or `HS256`.
    pub algorithm: rampart_authz::central::signature::SigningAlgorithm,
    /// RS256, ES256: PEM `PUBLIC KEY` file.
    #[serde(default)]
    pub public_key_file: Option<PathBuf>,
    /// HS256: file holding the shared secret.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
}

/// External authorizers.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExtAuthzConfig {
    /// The providers CUSTOM policies name.
    #[serde(default)]
    pub providers: Vec<ExtAuthzProviderConfig>,
}

/// One ext_authz gRPC server.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExtAuthzProviderConfig {
    /// The name CUSTOM policies use in `provider:`.
    pub name: String,
    /// `http://host:port` of the gRPC server (h2c).
    pub endpoint: String,
    /// Time limit of one check (Envoy's default: 200ms).
    #[serde(default = "d_ext_authz_timeout", with = "duration")]
    pub timeout: Duration,
    /// Allow requests when the provider fails or times out (Envoy's
    /// `failure_mode_allow`). Weakens security.
    #[serde(default)]
    pub failure_mode_allow_i_understand_the_risk: bool,
}

impl ExtAuthzProviderConfig {
    /// The provider `name` at `endpoint`, with Envoy's default timeout,
    /// failing closed.
    pub fn new(name: &str, endpoint: impl Into<String>) -> ExtAuthzProviderConfig {
        ExtAuthzProviderConfig {
            name: name.to_owned(),
            endpoint: endpoint.into(),
            timeout: d_ext_authz_timeout(),
            failure_mode_allow_i_understand_the_risk: false,
        }
    }
}

fn d_ext_authz_timeout() -> Duration {
    Duration::from_millis(200)
}

/// Decision logs.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionLogsConfig {
    /// The collector's URL (`POST`, gzipped JSON arrays).
    pub url: String,
    /// Entries held at most; past it the oldest are dropped (and counted).
    #[serde(default = "d_dl_max_queued")]
    pub max_queued: usize,
    /// Entries per upload at most.
    #[serde(default = "d_dl_max_batch")]
    pub max_batch: usize,
    /// Time between uploads.
    #[serde(default = "d_dl_flush", with = "duration")]
    pub flush_interval: Duration,
    /// Time limit of one upload.
    #[serde(default = "d_central_timeout", with = "duration")]
    pub timeout: Duration,
    /// `labels` of every entry (besides `id` and `version`).
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// JSON pointers removed from every entry before it is queued.
    #[serde(default)]
    pub redact: Vec<String>,
    /// https: SPIFFE IDs the collector may present (default: any ID of the
    /// sidecar's trust domain).
    #[serde(default)]
    pub server_identities: Option<Vec<SpiffeId>>,
}

impl DecisionLogsConfig {
    /// Decision logs to `url`, with every other setting at its default.
    pub fn new(url: impl Into<String>) -> DecisionLogsConfig {
        DecisionLogsConfig {
            url: url.into(),
            max_queued: d_dl_max_queued(),
            max_batch: d_dl_max_batch(),
            flush_interval: d_dl_flush(),
            timeout: d_central_timeout(),
            labels: Default::default(),
            redact: Vec::new(),
            server_identities: None,
        }
    }
}

fn d_dl_max_queued() -> usize {
    10_000
}
fn d_dl_max_batch() -> usize {
    500
}
fn d_dl_flush() -> Duration {
    Duration::from_secs(5)
}

impl IdentityConfig {
    /// SVIDs from the Workload API at `socket` (`unix:///path`), the one
    /// with `spiffe_id`.
    pub fn workload_api(socket: String, spiffe_id: SpiffeId) -> IdentityConfig {
        IdentityConfig {
            workload_api: Some(crate::identity::WorkloadApiIdentity {
                socket: Some(socket),
                spiffe_id: Some(spiffe_id),
                ..crate::identity::WorkloadApiIdentity::default()
            }),
            ..IdentityConfig::default()
        }
    }

    /// An SVID and its bundle from the PEM files `svid.pem`, `svid.key`
    /// and `bundle.pem` in `dir` (as `rampart ca issue` writes them).
    pub fn files_in(dir: &Path) -> IdentityConfig {
        IdentityConfig {
            files: Some(FilesIdentity {
                cert: dir.join("svid.pem"),
                key: dir.join("svid.key"),
                bundle: dir.join("bundle.pem"),
                federated: Vec::new(),
                poll_interval: default_poll_interval(),
            }),
            ..IdentityConfig::default()
        }
    }
}

impl PortConfig {
    /// Port `port` with every setting at its default (detect, strict mTLS).
    pub fn new(port: u16) -> PortConfig {
        PortConfig {
            port,
            allowed_peers: None,
            protocol: DeclaredProtocol::default(),
            mode: TlsMode::default(),
            allow_dns_san_clients: false,
        }
    }
}

/// How one app port is served, and who may connect to it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PortConfig {
    /// The app port.
    pub port: u16,
    /// SPIFFE IDs allowed to connect (without `inbound.policies`).
    #[serde(default)]
    pub allowed_peers: Option<Vec<SpiffeId>>,
    /// What the port speaks.
    #[serde(default)]
    pub protocol: DeclaredProtocol,
    /// Whether plaintext is accepted beside mTLS.
    #[serde(default)]
    pub mode: TlsMode,
    /// Also accept mTLS clients whose certificate has no SPIFFE ID but a
    /// DNS SAN (an ingress), when it chains to the CA of our trust domain.
    /// Widens the handshake; only `dns:` principal rules admit such a peer.
    #[serde(default)]
    pub allow_dns_san_clients: bool,
}

/// Default for ports without an entry.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DefaultPortAction {
    /// Refuse.
    #[default]
    Deny,
    /// Allow any authenticated peer of a trusted domain.
    AllowAnyAuthenticated,
}

/// Logging.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter, e.g. `info` or `info,rampart_proxy=debug`.
    #[serde(default = "d_level")]
    pub level: String,
    /// `text` or `json`.
    #[serde(default)]
    pub format: LogFormat,
    /// One JSON access event per request or connection on stdout.
    #[serde(default)]
    pub access: bool,
    /// With `access` off, denials are still logged, at most this many a second.
    #[serde(default = "d_denials_per_second")]
    pub denials_per_second: u32,
    /// Header set to a fresh ID on inbound requests that lack it; `""` turns
    /// it off.
    #[serde(default = "d_request_id_header")]
    pub request_id_header: String,
    /// Request headers whose values access events carry (none by default).
    #[serde(default)]
    pub access_headers: Vec<String>,
}

/// Headers that carry credentials or identities: never written to logs.
const SECRET_HEADERS: [&str; 5] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-forwarded-client-cert",
];

fn d_denials_per_second() -> u32 {
    10
}

fn d_request_id_header() -> String {
    "x-request-id".into()
}

fn d_level() -> String {
    "info".into()
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: d_level(),
            format: LogFormat::Text,
            access: false,
            denials_per_second: d_denials_per_second(),
            request_id_header: d_request_id_header(),
            access_headers: Vec::new(),
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The async runtime.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Worker threads; 1 runs everything on one thread, as a sidecar usually should.
    #[serde(default = "d_workers")]
    pub workers: usize,
}

fn d_workers() -> usize {
    1
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            workers: d_workers(),
        }
    }
}

/// A configuration that could not be loaded: one line per problem, each
/// `FILE:LINE:COLUMN: field `PATH`: REASON`.
#[derive(Debug, thiserror::Error)]
#[error("{}", .problems.join("\n"))]
pub struct ConfigError {
    /// One line per problem.
    pub problems: Vec<String>,
}

/// A problem found after parsing: the field path and the reason.
pub(crate) type Problem = (String, String);

impl Config {
    /// A configuration with `identity` and every other section at its
    /// default (no listeners: add `transparent` or `listeners`). For
    /// callers that build a sidecar from typed values (tests, the demo);
    /// [`Config::check`] validates it as a file would be.
    pub fn new(identity: IdentityConfig) -> Config {
        Config {
            identity,
            admin: AdminConfig::default(),
            transparent: None,
            listeners: Vec::new(),
            outbound: OutboundConfig::default(),
            inbound: InboundConfig::default(),
            limits: Limits::default(),
            log: LogConfig::default(),
            runtime: RuntimeConfig::default(),
            ext_authz: ExtAuthzConfig::default(),
            decision_logs: None,
            tracing: None,
            discovery: rampart_discovery::DiscoveryConfig::default(),
        }
    }

    /// The configuration as a YAML file that [`Config::load`] reads back
    /// to the same values (durations in milliseconds, defaults written out).
    pub fn to_yaml(&self) -> String {
        // Every field serializes to a YAML scalar, sequence or string-keyed
        // mapping, which serde_yaml always accepts.
        serde_yaml::to_string(self).expect("a Config serializes to YAML")
    }

    /// Validates a configuration built in code, as [`Config::parse`] would
    /// validate its file; problems are named `name` with no position.
    pub fn check(self, name: &str) -> Result<Config, ConfigError> {
        let problems = self.validate();
        self.accept(name, None, problems)
    }

    /// Reads, parses and validates a configuration file: relative paths in
    /// it are resolved against the file's directory, an unset Workload API
    /// socket is taken from `SPIFFE_ENDPOINT_SOCKET`, and the key files are
    /// read; every problem is reported.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            problems: vec![format!("{name}: cannot read: {e}")],
        })?;
        let mut cfg = Self::deserialize(&name, &text)?;
        if let Some(dir) = path.parent() {
            cfg.resolve_paths(dir);
        }
        let mut problems = Vec::new();
        if let Some(w) = &mut cfg.identity.workload_api {
            problems.extend(w.resolve_endpoint());
        }
        problems.extend(cfg.validate());
        if let Err(p) = cfg.bundle_verification() {
            problems.push(p);
        }
        // The endpoints file must load at start (there is no last good
        // version to keep yet); its error names its own file and line.
        if let Some(f) = &cfg.discovery.file
            && let Err(e) = rampart_discovery::file::load(f)
        {
            problems.push(("discovery.file".into(), e.to_string()));
        }
        if let Some(k) = cfg.discovery.kubernetes.as_ref()
            && let Some(path) = &k.kubeconfig
            && let Err(e) = rampart_discovery::kubernetes::check_kubeconfig(path)
        {
            problems.push((
                "discovery.kubernetes.kubeconfig".into(),
                format!("{}: {e}", path.display()),
            ));
        }
        cfg.accept(&name, Some(&text), problems)
    }

    /// Parses and validates configuration text; `name` is used in errors.
    /// Paths stay as written and the environment is not read.
    pub fn parse(name: &str, text: &str) -> Result<Config, ConfigError> {
        let cfg = Self::deserialize(name, text)?;
        let problems = cfg.validate();
        cfg.accept(name, Some(text), problems)
    }

    /// The typed fields, or the first error of the deserializer (its
    /// position and field path are the parser's).
    fn deserialize(name: &str, text: &str) -> Result<Config, ConfigError> {
        let de = serde_yaml::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            let inner = e.inner();
            let mut msg = inner.to_string();
            // serde_yaml appends " at line L column C"; we print the location up front.
            if let Some(i) = msg.find(" at line ") {
                msg.truncate(i);
            }
            let loc = inner
                .location()
                .map(|l| format!("{}:{}", l.line(), l.column()))
                .unwrap_or_else(|| "?".into());
            let field = if field == "." {
                "(top level)".into()
            } else {
                field
            };
            ConfigError {
                problems: vec![format!("{name}:{loc}: field `{field}`: {msg}")],
            }
        })
    }

    /// `self` when there are no problems; otherwise each problem placed in
    /// the file's `text` by the parser ([`positions::locate`]).
    fn accept(
        self,
        name: &str,
        text: Option<&str>,
        problems: Vec<Problem>,
    ) -> Result<Config, ConfigError> {
        if problems.is_empty() {
            return Ok(self);
        }
        Err(ConfigError {
            problems: problems
                .into_iter()
                .map(|(field, msg)| match text {
                    Some(text) => {
                        let at = positions::locate(text, &field)
                            .map(|p| p.to_string())
                            .unwrap_or_else(|| "?".into());
                        format!("{name}:{at}: field `{field}`: {msg}")
                    }
                    None => format!("{name}: field `{field}`: {msg}"),
                })
                .collect(),
        })
    }

    fn resolve_paths(&mut self, dir: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        };
        if let Some(f) = &mut self.identity.files {
            fix(&mut f.cert);
            fix(&mut f.key);
            fix(&mut f.bundle);
            for b in &mut f.federated {
                fix(&mut b.bundle);
            }
        }
        if let Some(d) = &mut self.identity.dev_ca {
            fix(&mut d.dir);
        }
        if let Some(f) = &mut self.discovery.file {
            fix(f);
        }
        if let Some(k) = self
            .discovery
            .kubernetes
            .as_mut()
            .and_then(|k| k.kubeconfig.as_mut())
        {
            fix(k);
        }
        for p in &mut self.inbound.policies {
            fix(p);
        }
        for p in self
            .inbound
            .istio
            .iter_mut()
            .flat_map(|i| i.files.iter_mut())
        {
            fix(p);
        }
        if let Some(v) = self
            .inbound
            .bundle
            .as_mut()
            .and_then(|b| b.verification.as_mut())
        {
            for k in &mut v.keys {
                k.public_key_file.iter_mut().for_each(fix);
                k.secret_file.iter_mut().for_each(fix);
            }
        }
    }

    /// Every check of the typed fields (each alone and together).
    fn validate(&self) -> Vec<Problem> {
        let mut p = Vec::new();
        let sources = [
            self.identity.files.is_some(),
            self.identity.dev_ca.is_some(),
            self.identity.workload_api.is_some(),
        ];
        match sources.iter().filter(|s| **s).count() {
            0 => p.push((
                "identity".into(),
                "one identity source is required: `files`, `dev_ca` or `workload_api`".into(),
            )),
            1 => {}
            _ => p.push((
                "identity".into(),
                "give only one identity source: `files`, `dev_ca` or `workload_api`".into(),
            )),
        }
        if let Some(w) = &self.identity.workload_api {
            p.extend(w.validate());
        }
        p.extend(self.discovery.validate());
        if let Some(f) = &self.identity.files
            && f.poll_interval < Duration::from_millis(10)
        {
            p.push((
                "identity.files.poll_interval".into(),
                "must be at least 10ms".into(),
            ));
        }
        if let Some(d) = &self.identity.dev_ca
            && d.ttl < Duration::from_secs(2)
        {
            p.push(("identity.dev_ca.ttl".into(), "must be at least 2s".into()));
        }
        if self.transparent.is_none() && self.listeners.is_empty() {
            p.push((
                "listeners".into(),
                "no listeners: configure `transparent` and/or `listeners`".into(),
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (i, l) in self.listeners.iter().enumerate() {
            if !names.insert(l.name.as_str()) {
                p.push((
                    format!("listeners[{i}].name"),
                    format!("duplicate listener name {:?}", l.name),
                ));
            }
            if l.direction == Direction::Outbound && l.port.is_some() {
                p.push((
                    format!("listeners[{i}].port"),
                    "only inbound listeners have a policy port".into(),
                ));
            }
            if l.direction == Direction::Inbound && l.server_identities.is_some() {
                p.push((
                    format!("listeners[{i}].server_identities"),
                    "only outbound listeners verify server identities".into(),
                ));
            }
            if let Some(ids) = &l.server_identities
                && ids.is_empty()
            {
                p.push((
                    format!("listeners[{i}].server_identities"),
                    "must list at least one SPIFFE ID".into(),
                ));
            }
        }
        let mut ports = std::collections::HashSet::new();
        for (i, port) in self.inbound.ports.iter().enumerate() {
            if !ports.insert(port.port) {
                p.push((
                    format!("inbound.ports[{i}].port"),
                    format!("duplicate port {}", port.port),
                ));
            }
        }
        for (i, port) in self.inbound.ports.iter().enumerate() {
            if port.allow_dns_san_clients && port.allowed_peers.is_some() {
                p.push((
                    format!("inbound.ports[{i}].allow_dns_san_clients"),
                    "`allowed_peers` lists SPIFFE IDs, which a DNS-SAN client never has; \
                     admit it with a `dns:` principal in `inbound.policies`"
                        .into(),
                ));
            }
        }
        if let Some(istio) = &self.inbound.istio {
            p.extend(istio.validate(self));
        }
        if !self.inbound.policies.is_empty() {
            for (i, port) in self.inbound.ports.iter().enumerate() {
                if port.allowed_peers.is_some() {
                    p.push((
                        format!("inbound.ports[{i}].allowed_peers"),
                        "with `inbound.policies`, write the allowlist as a policy".into(),
                    ));
                }
            }
        }
        p.extend(self.validate_central());
        if self.limits.http_max_header_bytes < 8192 {
            p.push((
                "limits.http_max_header_bytes".into(),
                "must be at least 8192".into(),
            ));
        }
        if self.limits.http_pool_max_connections == 0 {
            p.push((
                "limits.http_pool_max_connections".into(),
                "must be at least 1".into(),
            ));
        }
        if self.limits.http_idle_timeout.is_zero() {
            p.push((
                "limits.http_idle_timeout".into(),
                "must be longer than 0s".into(),
            ));
        }
        if self.limits.http_max_concurrent_streams == 0 {
            p.push((
                "limits.http_max_concurrent_streams".into(),
                "must be at least 1".into(),
            ));
        }
        for (i, s) in self.outbound.servers.iter().enumerate() {
            if s.identities.is_empty()
                && s.trust_domains.is_empty()
                && s.allow_dns_san_servers.is_empty()
            {
                p.push((
                    format!("outbound.servers[{i}]"),
                    "must list `identities`, `trust_domains` or `allow_dns_san_servers`".into(),
                ));
            }
            for (j, name) in s.allow_dns_san_servers.iter().enumerate() {
                if !rampart_identity::svid::is_host_name(name) {
                    p.push((
                        format!("outbound.servers[{i}].allow_dns_san_servers[{j}]"),
                        format!("{name:?} is not a DNS host name"),
                    ));
                }
            }
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            p.push(("log.level".into(), format!("invalid filter: {e}")));
        }
        if !self.log.request_id_header.is_empty()
            && http::HeaderName::from_bytes(self.log.request_id_header.as_bytes()).is_err()
        {
            p.push((
                "log.request_id_header".into(),
                "not a valid header name".into(),
            ));
        }
        for (i, name) in self.log.access_headers.iter().enumerate() {
            let field = format!("log.access_headers[{i}]");
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                p.push((field, "not a valid header name".into()));
            } else if SECRET_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
                p.push((
                    field,
                    format!("`{name}` carries credentials or identities and is never logged"),
                ));
            }
        }
        if self.runtime.workers == 0 {
            p.push(("runtime.workers".into(), "must be at least 1".into()));
        }
        if self.limits.max_connections == 0 {
            p.push(("limits.max_connections".into(), "must be at least 1".into()));
        }
        p
    }

    /// Checks of `inbound.bundle`, `ext_authz` and `decision_logs`.
    fn validate_central(&self) -> Vec<Problem> {
        let mut p = Vec::new();
        if let Some(b) = &self.inbound.bundle {
            if let Err(e) = central_url(&b.url) {
                p.push(("inbound.bundle.url".into(), e));
            }
            if b.poll_interval < Duration::from_millis(100) {
                p.push((
                    "inbound.bundle.poll_interval".into(),
                    "must be at least 100ms".into(),
                ));
            }
            if b.timeout.is_zero() {
                p.push(("inbound.bundle.timeout".into(), "must be positive".into()));
            }
            if b.max_download_bytes == 0 {
                p.push((
                    "inbound.bundle.max_download_bytes".into(),
                    "must be at least 1".into(),
                ));
            }
            if !b.query.starts_with("data.") {
                p.push((
                    "inbound.bundle.query".into(),
                    format!("{:?} must be a rule path under data.", b.query),
                ));
            }
            if let Some(v) = &b.verification
                && v.keys.is_empty()
            {
                p.push((
                    "inbound.bundle.verification.keys".into(),
                    "must list at least one key".into(),
                ));
            }
            if b.server_identities.is_some() && !b.url.starts_with("https://") {
                p.push((
                    "inbound.bundle.server_identities".into(),
                    "only an https URL has a server identity".into(),
                ));
            }
            for (i, port) in self.inbound.ports.iter().enumerate() {
                if port.allowed_peers.is_some() {
                    p.push((
                        format!("inbound.ports[{i}].allowed_peers"),
                        "with `inbound.bundle`, policies come from the bundle (a local fallback goes in `inbound.policies`)".into(),
                    ));
                }
            }
        }
        let mut names = std::collections::HashSet::new();
        for (i, e) in self.ext_authz.providers.iter().enumerate() {
            let field = |f: &str| format!("ext_authz.providers[{i}].{f}");
            if let Err(m) = rampart_authz::model::ProviderName::try_from(e.name.clone()) {
                p.push((field("name"), m));
            }
            if !names.insert(e.name.as_str()) {
                p.push((field("name"), format!("duplicate provider {:?}", e.name)));
            }
            match e.endpoint.parse::<http::Uri>() {
                Ok(u)
                    if u.scheme_str() == Some("http")
                        && u.port_u16().is_some()
                        && u.path() == "/" => {}
                _ => p.push((
                    field("endpoint"),
                    format!(
                        "{:?}: expected http://host:port (gRPC over h2c)",
                        e.endpoint
                    ),
                )),
            }
            if e.timeout.is_zero() {
                p.push((field("timeout"), "must be positive".into()));
            }
        }
        if let Some(t) = &self.tracing {
            if let Err(e) = t.to_proxy() {
                p.push(("tracing.otlp_endpoint".into(), e));
            }
            if !(0.0..=1.0).contains(&t.sampling) {
                p.push(("tracing.sampling".into(), "must be between 0 and 1".into()));
            }
            if t.flush_interval.is_zero() {
                p.push(("tracing.flush_interval".into(), "must be positive".into()));
            }
        }
        if let Some(d) = &self.decision_logs {
            if let Err(e) = central_url(&d.url) {
                p.push(("decision_logs.url".into(), e));
            }
            if d.max_queued == 0 {
                p.push((
                    "decision_logs.max_queued".into(),
                    "must be at least 1".into(),
                ));
            }
            if d.max_batch == 0 {
                p.push((
                    "decision_logs.max_batch".into(),
                    "must be at least 1".into(),
                ));
            }
            if d.flush_interval < Duration::from_millis(10) {
                p.push((
                    "decision_logs.flush_interval".into(),
                    "must be at least 10ms".into(),
                ));
            }
            if d.timeout.is_zero() {
                p.push(("decision_logs.timeout".into(), "must be positive".into()));
            }
            for (i, r) in d.redact.iter().enumerate() {
                if !r.starts_with('/') || r.len() < 2 {
                    p.push((
                        format!("decision_logs.redact[{i}]"),
                        format!("{r:?} is not a JSON pointer such as /input/attributes/request/http/headers/authorization"),
                    ));
                }
            }
            if d.server_identities.is_some() && !d.url.starts_with("https://") {
                p.push((
                    "decision_logs.server_identities".into(),
                    "only an https URL has a server identity".into(),
                ));
            }
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "
identity:
  files: {cert: svid.pem, key: svid.key, bundle: bundle.pem}
transparent: {}
";

    /// Whether `e` has a line `FILE:LINE:COLUMN: field `FIELD`...`.
    fn at(e: &str, file: &str, line: usize, field: &str) -> bool {
        e.lines().any(|l| {
            l.strip_prefix(&format!("{file}:{line}:"))
                .and_then(|rest| rest.split_once(':'))
                .is_some_and(|(col, rest)| {
                    col.parse::<usize>().is_ok_and(|c| c > 0)
                        && rest.starts_with(&format!(" field `{field}`"))
                })
        })
    }

    #[test]
    fn typed_configs_round_trip_through_yaml() {
        let text = "
identity:
  workload_api: {socket: unix:///run/agent.sock, spiffe_id: spiffe://example.org/web}
admin: {address: 127.0.0.1:16000, metrics: false}
transparent: {inbound: 0.0.0.0:16006}
listeners:
  - {name: out, direction: outbound, listen: 127.0.0.1:4140, target: 127.0.0.1:4143, server_identities: [spiffe://example.org/db]}
outbound:
  servers: [{cidrs: [10.0.0.0/8], ports: [80], trust_domains: [example.org]}]
  unknown_server: any_in_trust_domain
inbound:
  ports: [{port: 8080, mode: permissive, protocol: grpc}]
  xfcc: append_forward
limits: {http_idle_timeout: 90s, max_connections: 7}
";
        let c = Config::parse("t.yaml", text).unwrap();
        let again = Config::parse("again.yaml", &c.to_yaml()).unwrap();
        assert_eq!(again.to_yaml(), c.to_yaml());
        assert_eq!(again.limits.http_idle_timeout, Duration::from_secs(90));
        assert_eq!(
            again.inbound.ports[0].mode,
            TlsMode::PermissiveAllowPlaintext
        );
        assert_eq!(again.transparent.unwrap().outbound.port(), 15001);
        // Built in code, checked as a file would be.
        let mut built = Config::new(IdentityConfig::default());
        built.listeners = c.listeners.clone();
        let e = built.check("built").unwrap_err().to_string();
        assert!(e.starts_with("built: field `identity`"), "{e}");
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse("t.yaml", MINIMAL).unwrap();
        let t = c.transparent.unwrap();
        assert_eq!(t.outbound.port(), 15001);
        assert_eq!(t.inbound.port(), 15006);
        assert_eq!(c.admin.address.to_string(), "127.0.0.1:15000");
        assert_eq!(c.limits.connect_timeout, Duration::from_secs(5));
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let text = "
identity:
  files: {cert: a, key: b, bundle: c}
transparent: {}
inbound:
  ports:
    - port: 8080
      allowed_peers: [\"spiffe://Example.org/x\"]
";
        let e = Config::parse("pod.yaml", text).unwrap_err().to_string();
        assert!(e.starts_with("pod.yaml:8:"), "{e}");
        assert!(e.contains("inbound.ports[0].allowed_peers[0]"), "{e}");
        assert!(e.contains("trust domain"), "{e}");

        let e = Config::parse("pod.yaml", "identity: {}\ntransparent: {}\nbogus: 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("pod.yaml:3:"), "{e}");
        assert!(e.contains("bogus"), "{e}");

        let e = Config::parse("pod.yaml", "identity: {}\nlimits:\n  connect_timeout: 5\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("limits.connect_timeout"), "{e}");
    }

    #[test]
    fn cross_field_problems_are_all_reported() {
        let text = "
identity: {}
listeners:
  - {name: a, direction: outbound, listen: 127.0.0.1:1, target: 127.0.0.1:2, port: 3}
  - {name: a, direction: inbound, listen: 127.0.0.1:4, target: 127.0.0.1:5}
";
        let e = Config::parse("x.yaml", text).unwrap_err();
        assert_eq!(e.problems.len(), 3, "{:?}", e.problems);
        assert!(
            e.problems[0].contains("x.yaml:2:1: field `identity`"),
            "{e}"
        );
        assert!(
            e.problems[1].starts_with("x.yaml:4:78: field `listeners[0].port`"),
            "{e}"
        );
        assert!(
            e.problems[2].starts_with("x.yaml:5:6: field `listeners[1].name`"),
            "{e}"
        );
    }

    #[test]
    fn pool_cap_and_idle_timeout_must_be_positive() {
        let text = "
identity:
  files: {cert: a, key: b, bundle: c}
transparent: {}
limits: {http_pool_max_connections: 0, http_idle_timeout: 0s}
";
        let e = Config::parse("x.yaml", text).unwrap_err();
        let all = e.problems.join("\n");
        assert!(all.contains("limits.http_pool_max_connections"), "{all}");
        assert!(all.contains("limits.http_idle_timeout"), "{all}");
        let c = Config::parse("x.yaml", MINIMAL).unwrap();
        assert_eq!(c.limits.http_pool_max_connections, 1024);
        assert_eq!(c.limits.http_idle_timeout, Duration::from_secs(300));
    }

    #[test]
    fn dns_san_clients_are_a_per_port_opt_in() {
        let text = "
identity:
  files: {cert: a, key: b, bundle: c}
transparent: {}
inbound:
  ports:
    - {port: 8080, allow_dns_san_clients: true}
    - {port: 8081}
";
        let c = Config::parse("pod.yaml", text).unwrap();
        assert!(c.inbound.ports[0].allow_dns_san_clients);
        assert!(!c.inbound.ports[1].allow_dns_san_clients, "off by default");
        let pinned = "
identity:
  files: {cert: a, key: b, bundle: c}
transparent: {}
inbound:
  ports:
    - {port: 8080, allow_dns_san_clients: true, allowed_peers: [\"spiffe://example.org/x\"]}
";
        let e = Config::parse("pod.yaml", pinned).unwrap_err().to_string();
        assert!(e.contains("inbound.ports[0].allow_dns_san_clients"), "{e}");
        assert!(e.contains("dns:"), "{e}");
    }

    #[test]
    fn central_management_fields_and_their_problems() {
        let base = "identity:\n  files: {cert: a, key: b, bundle: c}\ntransparent: {}\n";
        let ok = format!(
            "{base}inbound:\n  bundle:\n    url: https://policy.example/b.tar.gz\n    server_identities: [\"spiffe://example.org/policy\"]\next_authz:\n  providers:\n    - {{name: opa, endpoint: \"http://127.0.0.1:9191\"}}\ndecision_logs:\n  url: http://127.0.0.1:9000/logs\n"
        );
        let c = Config::parse("c.yaml", &ok).unwrap();
        let b = c.inbound.bundle.as_ref().unwrap();
        assert_eq!(b.poll_interval, Duration::from_secs(30));
        assert_eq!(b.query, "data.envoy.authz.allow");
        assert_eq!(c.ext_authz.providers[0].timeout, Duration::from_millis(200));
        assert!(!c.ext_authz.providers[0].failure_mode_allow_i_understand_the_risk);
        assert_eq!(c.decision_logs.as_ref().unwrap().max_queued, 10_000);
        assert!(c.initial_policies().unwrap().is_none(), "no fallback");
        assert_eq!(c.central_tls_clients().len(), 1);

        for (yaml, field, line) in [
            (
                "inbound:\n  bundle: {url: ftp://x/b}\n",
                "inbound.bundle.url",
                5,
            ),
            (
                "inbound:\n  bundle:\n    url: http://x/b\n    poll_interval: 1ms\n",
                "inbound.bundle.poll_interval",
                7,
            ),
            (
                "inbound:\n  bundle:\n    url: http://x/b\n    server_identities: [\"spiffe://e.org/p\"]\n",
                "inbound.bundle.server_identities",
                7,
            ),
            (
                "inbound:\n  bundle:\n    url: http://x/b\n    verification: {keys: []}\n",
                "inbound.bundle.verification.keys",
                7,
            ),
            (
                "inbound:\n  ports: [{port: 80, allowed_peers: []}]\n  bundle: {url: http://x/b}\n",
                "inbound.ports[0].allowed_peers",
                5,
            ),
            (
                "ext_authz:\n  providers:\n    - name: \"a b\"\n      endpoint: \"http://h:1\"\n",
                "ext_authz.providers[0].name",
                6,
            ),
            (
                "ext_authz:\n  providers:\n    - name: a\n      endpoint: \"https://h:1\"\n",
                "ext_authz.providers[0].endpoint",
                7,
            ),
            (
                "decision_logs:\n  url: http://x/l\n  max_queued: 0\n",
                "decision_logs.max_queued",
                6,
            ),
            (
                "decision_logs:\n  url: http://x/l\n  redact: [input]\n",
                "decision_logs.redact[0]",
                6,
            ),
        ] {
            let e = Config::parse("c.yaml", &format!("{base}{yaml}"))
                .unwrap_err()
                .to_string();
            assert!(at(&e, "c.yaml", line, field), "{field}: {e}");
        }
        let dup = "ext_authz:\n  providers:\n    - {name: a, endpoint: \"http://h:1\"}\n    - {name: a, endpoint: \"http://h:2\"}\n";
        let e = Config::parse("c.yaml", &format!("{base}{dup}"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("field `ext_authz.providers[1].name`: duplicate provider"),
            "{e}"
        );
    }

    #[test]
    fn bundle_keys_are_read_at_load_and_a_bad_one_names_its_field() {
        let dir = tempfile::tempdir().unwrap();
        let pem = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA==\n-----END PUBLIC KEY-----\n";
        std::fs::write(dir.path().join("central.pub"), pem).unwrap();
        std::fs::write(dir.path().join("secret"), "s3cret\n").unwrap();
        let write = |keys: &str| {
            let p = dir.path().join("c.yaml");
            std::fs::write(
                &p,
                format!("identity:\n  files: {{cert: a, key: b, bundle: c}}\ntransparent: {{}}\ninbound:\n  bundle:\n    url: http://x/b\n    verification:\n      keys:\n{keys}"),
            )
            .unwrap();
            p
        };
        let c = Config::load(&write(
            "        - {key_id: central, algorithm: ES256, public_key_file: central.pub}\n        - {key_id: next, algorithm: HS256, secret_file: secret}\n",
        ))
        .unwrap();
        let v = c.bundle_verification().unwrap().unwrap();
        let ids: Vec<&str> = v.keys.iter().map(|k| k.id()).collect();
        assert_eq!(ids, ["central", "next"]);

        for (keys, field) in [
            (
                "        - {key_id: k, algorithm: ES256, public_key_file: missing.pub}\n",
                "keys[0].public_key_file",
            ),
            (
                "        - {key_id: k, algorithm: RS256, public_key_file: central.pub}\n",
                "keys[0].public_key_file",
            ),
            (
                "        - {key_id: k, algorithm: HS256, public_key_file: central.pub}\n",
                "keys[0].secret_file",
            ),
        ] {
            let e = Config::load(&write(keys)).unwrap_err().to_string();
            assert!(
                e.contains(&format!("field `inbound.bundle.verification.{field}`")),
                "{keys}: {e}"
            );
        }
    }

    #[test]
    fn kubernetes_discovery_problems_name_their_line_and_field() {
        let text = format!(
            "{MINIMAL}discovery:\n  kubernetes:\n    resync_ms: 10\n    identities:\n      - template: 'spiffe://{{{{ .TrustDomain }}}}/{{{{ .PodSpec.Containers }}}}'\n      - template: 'spiffe://{{{{ .TrustDomain }}}}/x'\n        pod_selector:\n          match_expressions: [{{key: a, operator: In}}]\n"
        );
        let e = Config::parse("pod.yaml", &text).unwrap_err().to_string();
        assert!(
            at(&e, "pod.yaml", 7, "discovery.kubernetes.resync_ms"),
            "{e}"
        );
        assert!(
            at(
                &e,
                "pod.yaml",
                9,
                "discovery.kubernetes.identities[0].template"
            ),
            "{e}"
        );
        assert!(e.contains(".PodSpec.Containers"), "{e}");
        assert!(
            e.contains(
                "discovery.kubernetes.identities[1].pod_selector.match_expressions[0].values"
            ),
            "{e}"
        );
        // The defaults: in-cluster, the service-account rule.
        let c = Config::parse(
            "pod.yaml",
            &format!("{MINIMAL}discovery:\n  kubernetes: {{}}\n"),
        )
        .unwrap();
        let k = c.discovery.kubernetes.unwrap();
        assert!(k.kubeconfig.is_none());
        assert_eq!(k.identities.len(), 1);
    }
}
