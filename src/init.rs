//! `rampart init`: installs the iptables rules that redirect a pod's TCP
//! traffic to the sidecar.

use clap::Args;

/// Arguments of `rampart init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// Port of the outbound (capture) listener.
    #[arg(long, default_value_t = 15001)]
    pub outbound_port: u16,
    /// Port of the inbound (capture) listener.
    #[arg(long, default_value_t = 15006)]
    pub inbound_port: u16,
    /// UID the sidecar runs as; its own traffic is never redirected.
    #[arg(long, default_value_t = 2102)]
    pub proxy_uid: u32,
    /// Print the iptables-restore input and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Remove Rampart's chains and jumps, and nothing else.
    #[arg(long)]
    pub clean: bool,
}

/// Runs `rampart init`.
pub fn run(args: InitArgs) -> anyhow::Result<()> {
    anyhow::bail!("rampart init is not available in this build: {args:?}")
}
