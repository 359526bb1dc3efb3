//! The `rampart` binary: command line, configuration and wiring.

mod init;
mod policy_cmd;

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
    /// Check policy files, or explain a decision for one request.
    Policy(policy_cmd::PolicyArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Init(args) => init::run(args),
        Command::Policy(args) => policy_cmd::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rampart: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
