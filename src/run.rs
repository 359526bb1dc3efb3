//! `rampart run`: the sidecar, assembled by `rampart_app::run`.

use std::path::PathBuf;

use clap::Args;

/// Arguments of `rampart run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Configuration file (YAML).
    #[arg(long, short, env = "RAMPART_CONFIG")]
    pub config: PathBuf,
}

/// Runs the sidecar. Returns the process exit code (64 for a bad configuration).
pub fn run(args: RunArgs) -> anyhow::Result<std::process::ExitCode> {
    Ok(rampart_app::run::run(&args.config)?)
}
