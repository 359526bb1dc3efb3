//! `rampart ca`: the development CA on the command line.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use rampart_identity::ca::DevCa;
use rampart_identity::{SpiffeId, TrustDomain};

/// `rampart ca` subcommands.
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a development CA for a trust domain.
    Init(InitArgs),
    /// Issue an X.509-SVID from a development CA, or with `--dns` and no
    /// `--spiffe-id` a DNS-SAN client certificate (an ingress outside the mesh).
    Issue(IssueArgs),
}

/// Arguments of `rampart ca init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// Directory to write `ca.pem` and `ca.key` into.
    #[arg(long, default_value = "rampart-ca")]
    pub dir: PathBuf,
    /// The trust domain, e.g. `example.org`.
    #[arg(long, default_value = "example.org")]
    pub trust_domain: TrustDomain,
    /// Validity of the CA certificate, e.g. `8760h`.
    #[arg(long, default_value = "8760h", value_parser = rampart_app::config::duration::parse)]
    pub ttl: Duration,
}

/// Arguments of `rampart ca issue`.
#[derive(Debug, Args)]
pub struct IssueArgs {
    /// Directory of the CA.
    #[arg(long, default_value = "rampart-ca")]
    pub dir: PathBuf,
    /// The SPIFFE ID to issue. Without it, `--dns` names the only SANs of
    /// a client certificate that is not an SVID.
    #[arg(long, required_unless_present = "dns")]
    pub spiffe_id: Option<SpiffeId>,
    /// DNS SANs: extra SANs of the SVID, or, without `--spiffe-id`, the
    /// only SANs of a client certificate (for example an ingress's).
    #[arg(long)]
    pub dns: Vec<String>,
    /// Validity, e.g. `24h`.
    #[arg(long, default_value = "24h", value_parser = rampart_app::config::duration::parse)]
    pub ttl: Duration,
    /// Directory to write `svid.pem`, `svid.key` and `bundle.pem` into
    /// (`cert.pem`, `cert.key` and `bundle.pem` for a DNS-SAN certificate).
    #[arg(long)]
    pub out: PathBuf,
}

/// Runs a `rampart ca` subcommand.
pub fn run(cmd: CaCommand) -> anyhow::Result<()> {
    match cmd {
        CaCommand::Init(a) => {
            if a.dir.join(rampart_identity::ca::CA_KEY_FILE).exists() {
                anyhow::bail!(
                    "{} already holds a CA; refusing to overwrite it",
                    a.dir.display()
                );
            }
            let ca = DevCa::generate(&a.trust_domain, a.ttl)?;
            ca.save(&a.dir)?;
            println!(
                "created CA for trust domain {} in {}",
                a.trust_domain,
                a.dir.display()
            );
        }
        CaCommand::Issue(a) => {
            let ca = DevCa::load(&a.dir)?;
            std::fs::create_dir_all(&a.out)
                .with_context(|| format!("creating {}", a.out.display()))?;
            let Some(id) = &a.spiffe_id else {
                let issued = ca.issue_dns_client(&a.dns, a.ttl)?;
                write(&a.out.join("cert.pem"), &issued.chain_pem, 0o644)?;
                write(&a.out.join("cert.key"), &issued.key_pem, 0o600)?;
                write(&a.out.join("bundle.pem"), ca.cert_pem(), 0o644)?;
                println!(
                    "issued a DNS-SAN client certificate for {} into {}",
                    a.dns.join(", "),
                    a.out.display()
                );
                return Ok(());
            };
            if id.trust_domain() != ca.trust_domain() {
                anyhow::bail!("{id} is not in the CA's trust domain {}", ca.trust_domain());
            }
            let issued = ca.issue_with(id, a.ttl, &a.dns)?;
            write(&a.out.join("svid.pem"), &issued.chain_pem, 0o644)?;
            write(&a.out.join("svid.key"), &issued.key_pem, 0o600)?;
            write(&a.out.join("bundle.pem"), ca.cert_pem(), 0o644)?;
            println!("issued {id} into {}", a.out.display());
        }
    }
    Ok(())
}

fn write(path: &std::path::Path, contents: &str, mode: u32) -> anyhow::Result<()> {
    rampart_identity::ca::write_with_mode(path, contents, mode)
        .with_context(|| format!("writing {}", path.display()))
}
