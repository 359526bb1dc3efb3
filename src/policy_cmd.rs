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
    }
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
