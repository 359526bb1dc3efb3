//! `rampart run`: the sidecar, assembled by `rampart_app::run`.

use std::path::PathBuf;

use clap::Args;

/// Arguments of `rampart run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Configuration file (YAML).
    #[arg(long, short, env = "RAMPART_CONFIG")]
    pub config: PathBuf,
    /// The app's probes that the admin server runs for the kubelet, as
    /// injection writes them (JSON; see docs/kubernetes.md, "Probes").
    #[arg(
        long,
        env = "RAMPART_APP_PROBES",
        default_value = "",
        hide_default_value = true
    )]
    pub app_probes: String,
}

/// Runs the sidecar. Returns the process exit code (64 for a bad configuration).
pub fn run(args: RunArgs) -> anyhow::Result<std::process::ExitCode> {
    crate::memory::configure();
    Ok(rampart_app::run::run(&args.config, &args.app_probes)?)
}
