//! `rampart inject` on the command line: files or stdin in, stdout out.

use std::io::Read as _;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;

use rampart_app::inject::{InjectOptions, Mode, mutate_documents};

/// Arguments of `rampart inject`.
#[derive(Debug, Args)]
pub struct InjectArgs {
    /// Kubernetes YAML files (multi-document files and `List`s are fine);
    /// none, or `-`, reads stdin.
    pub files: Vec<PathBuf>,
    /// Remove Rampart instead, restoring what injection changed.
    #[arg(long)]
    pub uninject: bool,
    #[command(flatten)]
    pub options: InjectOptions,
}

/// Runs `rampart inject`: writes the mutated documents to stdout.
pub fn run(args: InjectArgs) -> anyhow::Result<()> {
    let mode = if args.uninject {
        Mode::Uninject
    } else {
        Mode::Inject
    };
    let stdin = [PathBuf::from("-")];
    let files = if args.files.is_empty() {
        &stdin[..]
    } else {
        &args.files[..]
    };
    let mut out = String::new();
    for file in files {
        let mut text = String::new();
        if file.as_os_str() == "-" {
            std::io::stdin()
                .read_to_string(&mut text)
                .context("cannot read stdin")?;
        } else {
            text = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read {}", file.display()))?;
        }
        let mutated = mutate_documents(&text, &args.options, mode)
            .with_context(|| format!("{}", file.display()))?;
        if !out.is_empty() && !mutated.is_empty() {
            out.push_str("---\n");
        }
        out.push_str(&mutated);
    }
    print!("{out}");
    Ok(())
}
