//! The `rampart` binary: the command line. Every command is carried out by
//! a library: `rampart_app` (run, demo, init, inject, webhook),
//! `rampart_identity` (agent, ca) and `rampart_authz` (policy).

mod agent;
mod ca_cmd;
mod inject_cmd;
mod memory;
mod policy_cmd;
mod run;

use rampart_app::{demo, init, webhook};

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
    /// Run the sidecar.
    Run(run::RunArgs),
    /// Run scenario 1 (the ec and news sites) locally and check every decision.
    Demo(demo::DemoArgs),
    /// One of the demo's apps as a process (used by `demo --transparent`).
    #[command(hide = true)]
    DemoApp(demo::DemoAppArgs),
    /// Install the iptables rules that capture a pod's traffic (init container).
    Init(init::InitArgs),
    /// Development Workload API server backed by a development CA.
    Agent(agent::AgentArgs),
    /// Development CA: create one, issue SVIDs.
    #[command(subcommand)]
    Ca(ca_cmd::CaCommand),
    /// Add the sidecar to the pod templates of Kubernetes YAML (or remove it).
    Inject(inject_cmd::InjectArgs),
    /// Serve the mutating admission webhook that injects pods.
    Webhook(webhook::WebhookArgs),
    /// Check policy files, or explain a decision for one request.
    Policy(policy_cmd::PolicyArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Agent(args) => agent::run(args).map(|()| std::process::ExitCode::SUCCESS),
        Command::Demo(args) => demo::run(args).map_err(anyhow::Error::from),
        Command::DemoApp(args) => demo::run_app(args).map_err(anyhow::Error::from),
        Command::Init(args) => init::run(args)
            .map(|()| std::process::ExitCode::SUCCESS)
            .map_err(anyhow::Error::from),
        Command::Ca(cmd) => ca_cmd::run(cmd).map(|()| std::process::ExitCode::SUCCESS),
        Command::Inject(args) => inject_cmd::run(args).map(|()| std::process::ExitCode::SUCCESS),
        Command::Webhook(args) => webhook::run(args)
            .map(|()| std::process::ExitCode::SUCCESS)
            .map_err(anyhow::Error::from),
        Command::Policy(args) => policy_cmd::run(args).map(|()| std::process::ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("rampart: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
