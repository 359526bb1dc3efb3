//! `rampart agent`: a development SPIFFE Workload API server on a Unix
//! socket, backed by a development CA, attesting callers by Unix UID. For
//! laptops and tests where SPIRE is not installed; not for production.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use rampart_identity::SpiffeId;
use rampart_identity::agent::{Agent, Registrations};
use rampart_identity::ca::DevCa;
use serde::Deserialize;

/// Arguments of `rampart agent`.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Path of the Unix socket to serve on (replaced if it exists).
    #[arg(long)]
    pub socket: PathBuf,
    /// Directory of the development CA (`rampart ca init`).
    #[arg(long)]
    pub ca_dir: PathBuf,
    /// YAML file mapping Unix UIDs to SPIFFE IDs.
    #[arg(long)]
    pub registrations: PathBuf,
    /// Lifetime of each SVID; open streams get a new one at half-life.
    #[arg(long, default_value = "30s", value_parser = rampart_app::config::duration::parse)]
    pub ttl: Duration,
    /// Log filter, e.g. `info` or `rampart_identity=debug`.
    #[arg(long, default_value = "info")]
    pub log_level: String,
}

/// The registration file.
///
/// ```yaml
/// registrations:
///   - uid: 1000
///     spiffe_id: spiffe://example.org/web
/// ```
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistrationFile {
    registrations: Vec<Registration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Registration {
    uid: u32,
    spiffe_id: SpiffeId,
}

fn load_registrations(path: &Path) -> anyhow::Result<Registrations> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let de = serde_yaml::Deserializer::from_str(&text);
    let file: RegistrationFile = serde_path_to_error::deserialize(de)
        .with_context(|| format!("{}: invalid registrations", path.display()))?;
    let mut regs = Registrations::new();
    for r in file.registrations {
        regs.add(r.uid, r.spiffe_id);
    }
    Ok(regs)
}

/// Runs the agent until SIGTERM or SIGINT.
pub fn run(args: AgentArgs) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level)
        .with_context(|| format!("invalid --log-level {:?}", args.log_level))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    if args.ttl < Duration::from_secs(2) {
        anyhow::bail!("--ttl must be at least 2s");
    }
    let ca = DevCa::load(&args.ca_dir).context("loading the development CA")?;
    let regs = load_registrations(&args.registrations)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match std::fs::remove_file(&args.socket) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).context(format!("removing {}", args.socket.display())),
        }
        let listener = tokio::net::UnixListener::bind(&args.socket)
            .with_context(|| format!("binding {}", args.socket.display()))?;
        // Any local process may ask; the answer depends on its UID.
        std::fs::set_permissions(&args.socket, std::fs::Permissions::from_mode(0o777))
            .with_context(|| format!("chmod {}", args.socket.display()))?;
        tracing::info!(
            socket = %args.socket.display(),
            trust_domain = %ca.trust_domain(),
            svid.ttl_ms = args.ttl.as_millis() as u64,
            "agent listening"
        );
        let agent = Agent::new(Arc::new(ca), regs, args.ttl);
        agent
            .serve(listener, rampart_app::run::shutdown_signal())
            .await?;
        let _ = std::fs::remove_file(&args.socket);
        Ok(())
    })
}
