//! `rampart policy`: check policy files, and explain what a set of policies
//! decides for one request, without running a proxy.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use rampart_authz::{
    Authorizer, ConnectionInfo, DefaultAction, HttpProtocol, Options, RequestInfo, grpc_method_of,
    normalize_path,
};
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
    Explain(ExplainArgs),
}

#[derive(Debug, Args)]
struct CheckArgs {
    /// Policy files (YAML).
    #[arg(required = true)]
    files: Vec<PathBuf>,
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
    /// Policy file (repeat for several).
    #[arg(long = "policy", required = true)]
    policies: Vec<PathBuf>,
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
        PolicyCommand::Explain(a) => explain(a),
    }
}

fn check(args: CheckArgs) -> anyhow::Result<()> {
    let authz = Authorizer::load(&args.files, &Options::default())
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("policy files are invalid")?;
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
    let authz = Authorizer::load(&args.policies, &options)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("policy files are invalid")?;
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
    let normalized = match normalize_path(&args.path, authz.normalize_options()) {
        Ok(n) => n,
        Err(e) => {
            println!("refused with {}: {e} (before any policy)", e.http_status());
            return Ok(());
        }
    };
    if normalized.is_rewritten() {
        println!("path normalized to {}", normalized.path);
    }
    let conn = ConnectionInfo::new(peer.as_ref(), args.source_ip, args.port).with_peer_dns(&dns);
    let req = RequestInfo {
        method: &method,
        authority: &args.host,
        path: &normalized.path,
        raw_path_and_query: &args.path,
        query: normalized.query,
        headers: &headers,
        protocol: HttpProtocol::Http11,
        scheme: if conn.is_authenticated() {
            "https"
        } else {
            "http"
        },
        grpc_method: grpc_method_of(&normalized.path, &headers),
        source: SocketAddr::new(args.source_ip, 40000),
        destination: SocketAddr::new(IpAddr::from([127, 0, 0, 1]), args.port),
        local_identity: None,
        peer_cert_sha256: None,
    };
    print!("{}", authz.explain(&conn, Some(&req)));
    Ok(())
}
