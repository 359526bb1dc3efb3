//! The `rampart` binary: command line, configuration and wiring.

mod init;

use clap::{Parser, Subcommand};

/// Rampart: a SPIFFE-native sidecar proxy with in-process authorization.
#[derive(Debug, Parser)]
#[command(name = "rampart", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install the iptables rules that capture a pod's traffic (init container).
    Init(init::InitArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Init(args) => init::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rampart: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
