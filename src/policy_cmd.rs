//! `rampart policy`: check policy files, and explain what a set of policies
//! decides for one request, without running a proxy.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use rampart_authz::offline::OfflineRequest;
use rampart_authz::{Authorizer, DefaultAction, Options};
use rampart_identity::SpiffeId;

/// Arguments of `rampart policy`.
#[derive(Debug, Args)]
pub struct PolicyArgs {
    #[command(subcommand)]
    command: PolicyCommand,
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Validate policy files and list the policies they define.
    Check(CheckArgs),
    /// Decide one request and explain every rule on its port.
    Explain(Box<ExplainArgs>),
    /// Turn Istio, SMI, OSM or App Mesh resources into native policies and
    /// sidecar configuration, with a report of what could not be expressed.
    Import(ImportArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ImportFrom {
    /// security.istio.io AuthorizationPolicy, PeerAuthentication,
    /// RequestAuthentication (checked, then kept as they are).
    Istio,
    /// SMI TrafficTarget, HTTPRouteGroup, TCPRoute (the SMI specification).
    Smi,
    /// OSM: SMI as OSM implements it, and IngressBackend.
    Osm,
    /// App Mesh VirtualNode (appmesh.k8s.aws/v1beta2).
    Appmesh,
}

#[derive(Debug, Args)]
struct ImportArgs {
    /// The source format.
    #[arg(long = "from", value_enum)]
    from: ImportFrom,
    /// YAML files (multi-document, or `kind: List`).
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Trust domain of the SPIFFE IDs service accounts become
    /// (`spiffe://TD/ns/NS/sa/SA`).
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Accept this DNS SAN as a peer identity (repeat for several); a
    /// source naming another DNS SAN is not imported.
    #[arg(long = "allow-dns-san", value_name = "NAME")]
    allow_dns_san: Vec<String>,
    /// Addresses of an object the sources name (an OSM source Service, an
    /// App Mesh virtual service): `NAMESPACE/NAME=CIDR[,CIDR...]`.
    #[arg(long = "address", value_name = "NS/NAME=CIDRS")]
    addresses: Vec<String>,
    /// Istio: the workload's namespace.
    #[arg(long)]
    namespace: Option<String>,
    /// Istio: a workload label `KEY=VALUE` (repeat for several).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// Write `<workload>.policy.yaml` and `<workload>.config.yaml` files
    /// here instead of printing them.
    #[arg(long)]
    out_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct CheckArgs {
    /// Policy files (YAML), or bare Rego modules (`.rego`) with JSON data
    /// files, loaded as one Rego policy.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    #[command(flatten)]
    rego: RegoArgs,
}

/// How bare `.rego` files are read.
#[derive(Debug, Args)]
struct RegoArgs {
    /// Rego syntax of bare `.rego` files.
    #[arg(long, value_enum, default_value = "v1")]
    rego_version: RegoVersionArg,
    /// Decision path of bare `.rego` files.
    #[arg(long, default_value = rampart_authz::model::DEFAULT_REGO_QUERY)]
    query: String,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum RegoVersionArg {
    V0,
    V1,
}

/// Loads policy files, or bare Rego files as one policy.
fn load(files: &[PathBuf], rego: &RegoArgs, options: &Options) -> anyhow::Result<Authorizer> {
    let bare = files
        .iter()
        .all(|f| f.extension().is_some_and(|e| e == "rego" || e == "json"));
    let loaded = if bare {
        let version = match rego.rego_version {
            RegoVersionArg::V0 => rampart_authz::model::RegoVersion::V0,
            RegoVersionArg::V1 => rampart_authz::model::RegoVersion::V1,
        };
        let yaml = rampart_authz::offline::rego_files_policy(files, version, &rego.query);
        Authorizer::from_yaml("rego files", &yaml, std::path::Path::new("/"), options)
    } else {
        Authorizer::load(files, options)
    };
    loaded
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("policy files are invalid")
}

/// The default action on ports no ALLOW or Rego policy covers.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum DefaultArg {
    /// Refuse.
    Deny,
    /// Allow any authenticated peer.
    AllowAnyAuthenticated,
}

#[derive(Debug, Args)]
struct ExplainArgs {
    /// Policy file, or bare `.rego` / `.json` file (repeat for several).
    #[arg(long = "policy", required = true)]
    policies: Vec<PathBuf>,
    #[command(flatten)]
    rego: RegoArgs,
    /// An OPA-Envoy input document (for example a decision log's `input`):
    /// the request is read back from it instead of the options below.
    #[arg(long, value_name = "FILE.json")]
    input: Option<PathBuf>,
    /// This sidecar's own SPIFFE ID (XFCC `By`, the destination principal);
    /// default: `<peer's trust domain>/local` for an authenticated peer.
    #[arg(long)]
    local_id: Option<String>,
    /// SHA-256 (hex) of the peer's certificate (XFCC `Hash`).
    #[arg(long)]
    peer_cert_sha256: Option<String>,
    /// Peer principal: a SPIFFE ID, or `dns:NAME` for a DNS-SAN certificate;
    /// omit for an unauthenticated source.
    #[arg(long)]
    principal: Option<String>,
    /// HTTP method.
    #[arg(long, default_value = "GET")]
    method: String,
    /// Request target (path and query), as sent.
    #[arg(long, default_value = "/")]
    path: String,
    /// `Host` / `:authority`.
    #[arg(long, default_value = "localhost")]
    host: String,
    /// Request header `name:value` (repeat for several).
    #[arg(long = "header", value_name = "NAME:VALUE")]
    headers: Vec<String>,
    /// Source address.
    #[arg(long, default_value = "127.0.0.1")]
    source_ip: IpAddr,
    /// Destination port.
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Default action.
    #[arg(long, value_enum, default_value = "deny")]
    default_action: DefaultArg,
}

/// Runs `rampart policy ...`.
pub fn run(args: PolicyArgs) -> anyhow::Result<()> {
    match args.command {
        PolicyCommand::Check(a) => check(a),
        PolicyCommand::Explain(a) => explain(*a),
        PolicyCommand::Import(a) => import(a),
    }
}

fn import(args: ImportArgs) -> anyhow::Result<()> {
    use rampart_authz::import::{ImportOptions, Source};
    let mut options = ImportOptions {
        trust_domain: args.trust_domain.clone(),
        dns_san_identities: args.allow_dns_san.clone(),
        istio_namespace: args.namespace.clone(),
        ..ImportOptions::default()
    };
    rampart_identity::TrustDomain::parse(&args.trust_domain)
        .with_context(|| format!("--trust-domain {:?}", args.trust_domain))?;
    for a in &args.addresses {
        let Some((key, cidrs)) = a.split_once('=') else {
            bail!("--address {a:?}: expected NAMESPACE/NAME=CIDR[,CIDR...]");
        };
        if key.split('/').count() != 2 && !key.starts_with("arn:") {
            bail!("--address {a:?}: name the object as NAMESPACE/NAME");
        }
        let mut nets = Vec::new();
        for c in cidrs.split(',') {
            let c = c.trim();
            let net = match c.parse::<ipnet::IpNet>() {
                Ok(n) => n,
                Err(_) => ipnet::IpNet::from(c.parse::<IpAddr>().with_context(|| {
                    format!("--address {a:?}: {c:?} is not an address or CIDR")
                })?),
            };
            nets.push(net);
        }
        options
            .addresses
            .entry(key.to_owned())
            .or_default()
            .extend(nets);
    }
    for l in &args.labels {
        let Some((k, v)) = l.split_once('=') else {
            bail!("--label {l:?}: expected KEY=VALUE");
        };
        options.istio_labels.insert(k.to_owned(), v.to_owned());
    }
    let source = match args.from {
        ImportFrom::Istio => Source::Istio,
        ImportFrom::Smi => Source::Smi,
        ImportFrom::Osm => Source::Osm,
        ImportFrom::Appmesh => Source::AppMesh,
    };
    let imported = rampart_authz::import::import(source, &args.files, &options)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("import failed")?;
    let mut stdout = String::new();
    for t in &imported.targets {
        check_config_fragment(&t.config).with_context(|| {
            format!(
                "the configuration for {} does not validate (an importer bug)",
                t.workload
            )
        })?;
        let has_policies = t.policies["policies"]
            .as_array()
            .is_some_and(|p| !p.is_empty());
        let policies = serde_yaml::to_string(&t.policies)?;
        let config = serde_yaml::to_string(&t.config)?;
        match &args.out_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
                if has_policies {
                    let f = dir.join(format!("{}.policy.yaml", t.file_stem));
                    std::fs::write(&f, &policies).with_context(|| format!("{}", f.display()))?;
                    eprintln!("{}: wrote {}", t.workload, f.display());
                }
                if !t.config.is_empty() {
                    let f = dir.join(format!("{}.config.yaml", t.file_stem));
                    std::fs::write(&f, &config).with_context(|| format!("{}", f.display()))?;
                    eprintln!("{}: wrote {}", t.workload, f.display());
                }
            }
            None => {
                stdout.push_str(&format!("# ---- for the sidecar of {}\n", t.workload));
                if has_policies {
                    stdout.push_str("# policy file (list it under inbound.policies):\n---\n");
                    stdout.push_str(&policies);
                }
                if !t.config.is_empty() {
                    stdout.push_str("# merge into its `rampart run` configuration:\n---\n");
                    stdout.push_str(&config);
                }
            }
        }
    }
    print!("{stdout}");
    for n in &imported.report {
        eprintln!("{n}");
    }
    if imported.incomplete() {
        eprintln!(
            "some parts were not imported (listed above): the policies printed admit less than the source"
        );
    }
    Ok(())
}

/// The sidecar configuration an importer prints must be what `rampart run`
/// accepts: each section is read with the configuration's own types.
fn check_config_fragment(
    config: &serde_json::Map<String, serde_json::Value>,
) -> anyhow::Result<()> {
    let yaml = serde_yaml::to_value(config)?;
    if let Some(ports) = yaml.get("inbound").and_then(|i| i.get("ports")) {
        let _: Vec<rampart_app::config::PortConfig> =
            serde_yaml::from_value(ports.clone()).context("inbound.ports")?;
    }
    if let Some(istio) = yaml.get("inbound").and_then(|i| i.get("istio")) {
        let _: rampart_app::config::IstioConfig =
            serde_yaml::from_value(istio.clone()).context("inbound.istio")?;
    }
    if let Some(servers) = yaml.get("outbound").and_then(|o| o.get("servers")) {
        let _: Vec<rampart_proxy::config::ServerRule> =
            serde_yaml::from_value(servers.clone()).context("outbound.servers")?;
    }
    Ok(())
}

fn check(args: CheckArgs) -> anyhow::Result<()> {
    let authz = load(&args.files, &args.rego, &Options::default())?;
    for p in authz.policies() {
        let action = p.action.map(|a| a.as_str()).unwrap_or("REGO");
        let ports = if p.ports.is_empty() {
            "all ports".to_owned()
        } else {
            format!("ports {:?}", p.ports)
        };
        let dry = if p.dry_run { " (dry run)" } else { "" };
        println!(
            "{}: {} {action}, {} rules, {ports}{dry}, sha256 {}",
            p.file.display(),
            p.name,
            p.rules,
            p.content_hash
        );
    }
    println!("{} policies OK", authz.policies().len());
    Ok(())
}

fn explain(args: ExplainArgs) -> anyhow::Result<()> {
    let options = Options {
        default_action: match args.default_action {
            DefaultArg::Deny => DefaultAction::Deny,
            DefaultArg::AllowAnyAuthenticated => DefaultAction::AllowAnyAuthenticated,
        },
        ..Options::default()
    };
    let authz = load(&args.policies, &args.rego, &options)?;
    let request = match &args.input {
        Some(file) => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("--input {}", file.display()))?;
            OfflineRequest::from_input_text(&text)
                .with_context(|| format!("--input {}", file.display()))?
        }
        None => request_of_args(&args)?,
    };
    let explained = request.with_info(&authz, |conn, req| authz.explain(conn, Some(req)));
    match explained {
        Ok(e) => print!("{e}"),
        Err(e) => println!("refused with {}: {e} (before any policy)", e.http_status()),
    }
    Ok(())
}

/// The request the options describe, with the facts the sidecar would
/// have (its own ID, the peer certificate's hash) so that the policies see
/// the XFCC header the sidecar would send.
fn request_of_args(args: &ExplainArgs) -> anyhow::Result<OfflineRequest> {
    let (peer, dns) = match args.principal.as_deref() {
        None => (None, Vec::new()),
        Some(p) => match p.strip_prefix("dns:") {
            Some(name) => (None, vec![name.to_owned()]),
            None => (
                Some(SpiffeId::parse(p).with_context(|| format!("--principal {p:?}"))?),
                Vec::new(),
            ),
        },
    };
    let method = http::Method::from_bytes(args.method.as_bytes())
        .with_context(|| format!("--method {:?}", args.method))?;
    let mut headers = http::HeaderMap::new();
    for h in &args.headers {
        let Some((k, v)) = h.split_once(':') else {
            bail!("--header {h:?}: expected NAME:VALUE");
        };
        let name = http::HeaderName::from_bytes(k.trim().as_bytes())
            .with_context(|| format!("--header {h:?}: bad name"))?;
        let value = http::HeaderValue::from_str(v.trim())
            .with_context(|| format!("--header {h:?}: bad value"))?;
        headers.append(name, value);
    }
    let authenticated = peer.is_some() || !dns.is_empty();
    let local = match &args.local_id {
        Some(id) => Some(SpiffeId::parse(id).with_context(|| format!("--local-id {id:?}"))?),
        None => None,
    };
    let mut r = OfflineRequest {
        peer,
        peer_dns: dns,
        peer_cert_sha256: args.peer_cert_sha256.clone(),
        local,
        method,
        target: args.path.clone(),
        host: args.host.clone(),
        headers,
        source: SocketAddr::new(args.source_ip, 40000),
        destination: SocketAddr::new(IpAddr::from([127, 0, 0, 1]), args.port),
    };
    // An XFCC given with --header supplies By and Hash (and URI).
    r.adopt_xfcc_header()?;
    if authenticated || r.peer.is_some() {
        if r.local.is_none() {
            let td = r
                .peer
                .as_ref()
                .map(|p| p.trust_domain().to_string())
                .unwrap_or_else(|| "cluster.local".to_owned());
            let id = format!("spiffe://{td}/local");
            println!("assuming this sidecar's ID is {id} (--local-id)");
            r.local = Some(SpiffeId::parse(&id).context("default --local-id")?);
        }
        if r.peer_cert_sha256.is_none() {
            println!("assuming the peer certificate's SHA-256 is 0…0 (--peer-cert-sha256)");
            r.peer_cert_sha256 = Some("0".repeat(64));
        }
    }
    Ok(r)
}
