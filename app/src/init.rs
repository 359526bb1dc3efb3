//! `rampart init`: installs the iptables rules that redirect a pod's TCP
//! traffic to the sidecar.
//!
//! This runs once per pod, before the pipeline exists: it is what makes the
//! transparent listeners (`listen` -> `orig_dst`) see the pod's connections.
//! The rules live in the `nat` table, in chains of our own (see [`CHAINS`]),
//! reached by one jump from `PREROUTING` and one from `OUTPUT`, so that
//! installing twice, or cleaning, never touches anybody else's rules.
//!
//! The rule text is a pure function of the configuration ([`rules`]); the
//! executor only reads the current table, removes our own jumps, and feeds
//! everything to `iptables-restore --noflush` in one transaction.
//! `docs/init.md` describes the rules and the flags.

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};

use clap::Args;
use ipnet::IpNet;

/// Chain that `PREROUTING` jumps to: decides which inbound TCP is captured.
const INBOUND: &str = "RAMPART_INBOUND";
/// Chain that redirects inbound TCP to the inbound listener.
const IN_REDIRECT: &str = "RAMPART_IN_REDIRECT";
/// Chain that `OUTPUT` jumps to: decides which outbound TCP is captured.
const OUTBOUND: &str = "RAMPART_OUTPUT";
/// Chain that redirects outbound TCP to the outbound listener.
const OUT_REDIRECT: &str = "RAMPART_OUT_REDIRECT";

/// Every chain `rampart init` owns, in the order they are declared.
pub const CHAINS: [&str; 4] = [INBOUND, IN_REDIRECT, OUTBOUND, OUT_REDIRECT];

/// Arguments of `rampart init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// Port of the outbound (capture) listener.
    #[arg(long, default_value = "15001", value_parser = parse_port)]
    pub outbound_port: u16,
    /// Port of the inbound (capture) listener.
    #[arg(long, default_value = "15006", value_parser = parse_port)]
    pub inbound_port: u16,
    /// Port of the admin server; never redirected, in either direction.
    #[arg(long, default_value = "15000", value_parser = parse_port)]
    pub admin_port: u16,
    /// UID the sidecar runs as; its own traffic is never redirected.
    #[arg(long, default_value_t = 2102)]
    pub proxy_uid: u32,
    /// Inbound destination ports that reach the application directly
    /// (comma-separated, e.g. `22,8081`).
    #[arg(long, value_name = "PORTS", default_value = "", value_parser = parse_ports)]
    pub exclude_inbound_ports: Ports,
    /// Outbound destination ports that are never redirected (comma-separated).
    #[arg(long, value_name = "PORTS", default_value = "", value_parser = parse_ports)]
    pub exclude_outbound_ports: Ports,
    /// Outbound destination networks that are never redirected
    /// (comma-separated CIDRs, IPv4 or IPv6; a bare address is one host).
    #[arg(long, value_name = "CIDRS", default_value = "", value_parser = parse_cidrs)]
    pub exclude_outbound_cidrs: Cidrs,
    /// When given, only outbound traffic to these networks is redirected
    /// (comma-separated CIDRs). Exclusions still apply.
    #[arg(long, value_name = "CIDRS", default_value = "", value_parser = parse_cidrs)]
    pub include_outbound_cidrs: Cidrs,
    /// Print the iptables-restore input and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Remove Rampart's chains and jumps, and nothing else.
    #[arg(long)]
    pub clean: bool,
}

/// A comma-separated list of TCP ports from the command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ports(pub Vec<u16>);

/// A comma-separated list of networks from the command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cidrs(pub Vec<IpNet>);

/// What to capture, validated as a whole; the input of [`rules`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitConfig {
    /// Port of the outbound listener.
    pub outbound_port: u16,
    /// Port of the inbound listener.
    pub inbound_port: u16,
    /// Port of the admin server.
    pub admin_port: u16,
    /// UID whose sockets are never redirected (the sidecar's own).
    pub proxy_uid: u32,
    /// Inbound destination ports not redirected.
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound destination ports not redirected.
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound destination networks not redirected.
    pub exclude_outbound_cidrs: Vec<IpNet>,
    /// When not empty, the only outbound destination networks redirected.
    pub include_outbound_cidrs: Vec<IpNet>,
}

/// An IP family: each has its own tables and its own iptables binaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `iptables`.
    V4,
    /// `ip6tables`.
    V6,
}

/// Why `rampart init` could not do its job.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// The configuration is contradictory (the operator's fault).
    #[error("invalid init configuration: {}", .0.join("; "))]
    InvalidConfig(Vec<String>),
    /// The process may not change the network configuration.
    #[error(
        "rampart init needs CAP_NET_ADMIN (run it as root, or give the init container \
         the NET_ADMIN and NET_RAW capabilities)"
    )]
    NoNetAdmin,
    /// An iptables tool is not installed.
    #[error("`{tool}` was not found in PATH; the init image must include iptables")]
    ToolMissing {
        /// The missing program.
        tool: &'static str,
    },
    /// IPv6 is on but ip6tables is missing: IPv6 traffic would bypass the sidecar.
    #[error(
        "IPv6 is enabled in this network namespace but `{tool}` was not found; \
         without it IPv6 traffic would bypass the sidecar"
    )]
    Ip6tablesMissing {
        /// The missing program.
        tool: &'static str,
    },
    /// An iptables tool ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    CommandFailed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it said.
        stderr: String,
    },
    /// An iptables tool could not be started.
    #[error("could not run `{tool}`: {source}")]
    Spawn {
        /// The program.
        tool: &'static str,
        /// The operating system's error.
        source: std::io::Error,
    },
}

/// Runs `rampart init`.
pub fn run(args: InitArgs) -> Result<(), InitError> {
    let config = InitConfig::try_from(&args)?;
    let families = enabled_families();
    if args.dry_run {
        print!("{}", dry_run_text(&config, &families, args.clean));
        return Ok(());
    }
    if !has_net_admin() {
        return Err(InitError::NoNetAdmin);
    }
    for family in families {
        let tables = Tables::find(family)?;
        if args.clean {
            match tables.clean()? {
                Cleaned::Removed => {
                    eprintln!("rampart init: removed Rampart's {family} chains and jumps")
                }
                Cleaned::NothingThere => {
                    eprintln!("rampart init: no Rampart {family} rules to remove")
                }
            }
        } else {
            tables.install(&config)?;
            eprintln!("rampart init: installed {family} capture rules");
        }
    }
    Ok(())
}

/// The `iptables-restore --noflush` input that installs the rules for
/// `family` on a table that has none of our jumps yet.
///
/// Declaring a chain in `iptables-restore --noflush` input creates it, or
/// flushes it when it exists, so this input is also the whole update of our
/// chains; only the jumps from `PREROUTING` and `OUTPUT` must be removed
/// first (see [`Tables::install`]).
pub fn rules(config: &InitConfig, family: Family) -> String {
    restore_input(config, family, &[])
}

impl TryFrom<&InitArgs> for InitConfig {
    type Error = InitError;

    /// Checks the arguments as a whole and reports every problem at once.
    fn try_from(args: &InitArgs) -> Result<Self, InitError> {
        let mut problems = Vec::new();
        let listeners = [
            ("--outbound-port", args.outbound_port),
            ("--inbound-port", args.inbound_port),
            ("--admin-port", args.admin_port),
        ];
        for (i, (flag, port)) in listeners.iter().enumerate() {
            for (other, other_port) in &listeners[i + 1..] {
                if port == other_port {
                    problems.push(format!("{flag} and {other} are both {port}"));
                }
            }
        }
        if args.proxy_uid == 0 {
            // Every root process would then bypass the sidecar.
            problems
                .push("--proxy-uid must not be 0 (root's traffic would bypass the sidecar)".into());
        }
        if !problems.is_empty() {
            return Err(InitError::InvalidConfig(problems));
        }
        Ok(InitConfig {
            outbound_port: args.outbound_port,
            inbound_port: args.inbound_port,
            admin_port: args.admin_port,
            proxy_uid: args.proxy_uid,
            exclude_inbound_ports: args.exclude_inbound_ports.0.clone(),
            exclude_outbound_ports: args.exclude_outbound_ports.0.clone(),
            exclude_outbound_cidrs: args.exclude_outbound_cidrs.0.clone(),
            include_outbound_cidrs: args.include_outbound_cidrs.0.clone(),
        })
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

impl Family {
    fn save(self) -> &'static str {
        match self {
            Family::V4 => "iptables-save",
            Family::V6 => "ip6tables-save",
        }
    }

    fn restore(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }

    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.0/8",
            Family::V6 => "::1/128",
        }
    }

    fn contains(self, net: &IpNet) -> bool {
        match (self, net) {
            (Family::V4, IpNet::V4(_)) | (Family::V6, IpNet::V6(_)) => true,
            (Family::V4, IpNet::V6(_)) | (Family::V6, IpNet::V4(_)) => false,
        }
    }
}

/// The restore input: first the deletion of `stale_jumps` (lines of
/// `iptables-save` that jump to our chains), then our chains and jumps.
fn restore_input(config: &InitConfig, family: Family, stale_jumps: &[String]) -> String {
    let mut out = String::from("*nat\n");
    for jump in stale_jumps {
        out.push_str(&delete_line(jump));
    }
    for chain in CHAINS {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    // The proxy's own listeners are never redirected, so a connection
    // addressed to one of them reaches it and a redirect can never loop.
    let mut untouched = [config.admin_port, config.outbound_port, config.inbound_port];
    untouched.sort_unstable();

    // Inbound: everything except excluded ports goes to the inbound listener.
    let _ = writeln!(
        out,
        "-A {IN_REDIRECT} -p tcp -j REDIRECT --to-ports {}",
        config.inbound_port
    );
    for port in dedup(untouched.iter().chain(&config.exclude_inbound_ports)) {
        let _ = writeln!(out, "-A {INBOUND} -p tcp --dport {port} -j RETURN");
    }
    let _ = writeln!(out, "-A {INBOUND} -p tcp -j {IN_REDIRECT}");

    // Outbound: the order matters, the first matching RETURN wins.
    let _ = writeln!(
        out,
        "-A {OUT_REDIRECT} -p tcp -j REDIRECT --to-ports {}",
        config.outbound_port
    );
    // The sidecar's own connections must leave as they are, or they would
    // come back to it forever.
    let _ = writeln!(
        out,
        "-A {OUTBOUND} -m owner --uid-owner {} -j RETURN",
        config.proxy_uid
    );
    // Traffic that stays in the pod: to localhost, and also to the pod's own
    // IP, which the kernel routes through `lo` too.
    let _ = writeln!(out, "-A {OUTBOUND} -o lo -j RETURN");
    let _ = writeln!(out, "-A {OUTBOUND} -d {} -j RETURN", family.loopback());
    for net in config
        .exclude_outbound_cidrs
        .iter()
        .filter(|n| family.contains(n))
    {
        let _ = writeln!(out, "-A {OUTBOUND} -d {} -j RETURN", net.trunc());
    }
    for port in dedup(untouched.iter().chain(&config.exclude_outbound_ports)) {
        let _ = writeln!(out, "-A {OUTBOUND} -p tcp --dport {port} -j RETURN");
    }
    if config.include_outbound_cidrs.is_empty() {
        let _ = writeln!(out, "-A {OUTBOUND} -p tcp -j {OUT_REDIRECT}");
    } else {
        // Only the listed networks; when none is of this family, nothing of
        // this family is captured.
        for net in config
            .include_outbound_cidrs
            .iter()
            .filter(|n| family.contains(n))
        {
            let _ = writeln!(
                out,
                "-A {OUTBOUND} -p tcp -d {} -j {OUT_REDIRECT}",
                net.trunc()
            );
        }
    }

    let _ = writeln!(out, "-A PREROUTING -p tcp -j {INBOUND}");
    let _ = writeln!(out, "-A OUTPUT -p tcp -j {OUTBOUND}");
    out.push_str("COMMIT\n");
    out
}

/// The restore input that removes `stale_jumps` and then the chains in
/// `existing` (ours that exist), leaving every other rule alone.
fn clean_input(stale_jumps: &[String], existing: &[&str]) -> String {
    let mut out = String::from("*nat\n");
    for jump in stale_jumps {
        out.push_str(&delete_line(jump));
    }
    // Declaring flushes, so no chain is still referenced when it is deleted.
    for chain in existing {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    for chain in existing {
        let _ = writeln!(out, "-X {chain}");
    }
    out.push_str("COMMIT\n");
    out
}

/// What `--dry-run` prints: one restore input per enabled family, each
/// preceded by a comment line (which iptables-restore ignores).
fn dry_run_text(config: &InitConfig, families: &[Family], clean: bool) -> String {
    let mut out = String::new();
    for family in families {
        if clean {
            let _ = writeln!(
                out,
                "# {}: would delete the jumps to, and the chains {}",
                family.restore(),
                CHAINS.join(", ")
            );
        } else {
            let _ = writeln!(out, "# {} --noflush", family.restore());
            out.push_str(&rules(config, *family));
        }
    }
    out
}

/// Turns an `iptables-save` line `-A CHAIN spec` into `-D CHAIN spec`.
fn delete_line(append: &str) -> String {
    let spec = append.strip_prefix("-A ").unwrap_or(append);
    format!("-D {spec}\n")
}

/// The `-A` lines of `iptables-save` output that jump (or go) from a chain
/// that is not ours to one of ours.
fn our_jumps(save: &str) -> Vec<String> {
    save.lines()
        .filter(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let from_other = words.len() > 1 && words[0] == "-A" && !CHAINS.contains(&words[1]);
            let to_ours = words
                .windows(2)
                .any(|w| (w[0] == "-j" || w[0] == "-g") && CHAINS.contains(&w[1]));
            from_other && to_ours
        })
        .map(str::to_owned)
        .collect()
}

/// Our chains that the `iptables-save` output declares.
fn our_chains(save: &str) -> Vec<&'static str> {
    CHAINS
        .into_iter()
        .filter(|chain| {
            save.lines().any(|line| {
                line.strip_prefix(':')
                    .and_then(|l| l.split_whitespace().next())
                    == Some(*chain)
            })
        })
        .collect()
}

fn dedup<'a>(ports: impl Iterator<Item = &'a u16>) -> Vec<u16> {
    let mut seen = Vec::new();
    for port in ports {
        if !seen.contains(port) {
            seen.push(*port);
        }
    }
    seen
}

/// IPv4 always; IPv6 when this network namespace has it (`/proc/net` is
/// the calling thread's namespace).
fn enabled_families() -> Vec<Family> {
    let mut families = vec![Family::V4];
    if std::path::Path::new("/proc/net/if_inet6").exists() {
        families.push(Family::V6);
    }
    families
}

/// Whether the effective capabilities include CAP_NET_ADMIN (bit 12).
fn has_net_admin() -> bool {
    const CAP_NET_ADMIN: u32 = 12;
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        // Without /proc we cannot tell; let iptables be the judge.
        return true;
    };
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_none_or(|caps| caps & (1 << CAP_NET_ADMIN) != 0)
}

/// What `--clean` found.
enum Cleaned {
    Removed,
    NothingThere,
}

/// The iptables tools of one family, found in PATH.
struct Tables {
    family: Family,
}

impl Tables {
    /// Checks that the tools exist; a missing ip6tables is fatal because
    /// IPv6 traffic would otherwise bypass the sidecar.
    fn find(family: Family) -> Result<Self, InitError> {
        for tool in [family.save(), family.restore()] {
            if which(tool).is_none() {
                return Err(match family {
                    Family::V4 => InitError::ToolMissing { tool },
                    Family::V6 => InitError::Ip6tablesMissing { tool },
                });
            }
        }
        Ok(Tables { family })
    }

    /// Replaces our chains and jumps with the ones `config` asks for.
    fn install(&self, config: &InitConfig) -> Result<(), InitError> {
        let save = self.save()?;
        self.restore(&restore_input(config, self.family, &our_jumps(&save)))
    }

    /// Removes our jumps and chains.
    fn clean(&self) -> Result<Cleaned, InitError> {
        let save = self.save()?;
        let jumps = our_jumps(&save);
        let chains = our_chains(&save);
        if jumps.is_empty() && chains.is_empty() {
            return Ok(Cleaned::NothingThere);
        }
        self.restore(&clean_input(&jumps, &chains))?;
        Ok(Cleaned::Removed)
    }

    fn save(&self) -> Result<String, InitError> {
        let tool = self.family.save();
        let output = run_tool(tool, &["-t", "nat"], None)?;
        Ok(output)
    }

    fn restore(&self, input: &str) -> Result<(), InitError> {
        // `-w`: the legacy backend shares one lock between all namespaces.
        run_tool(self.family.restore(), &["-w", "--noflush"], Some(input))?;
        Ok(())
    }
}

/// Runs `tool args`, feeding `stdin`, and returns its standard output.
fn run_tool(tool: &'static str, args: &[&str], stdin: Option<&str>) -> Result<String, InitError> {
    let mut child = Command::new(tool)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => InitError::ToolMissing { tool },
            _ => InitError::Spawn { tool, source },
        })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A write error shows up as the tool's failure below.
        let _ = pipe.write_all(input.as_bytes());
    }
    let output = child
        .wait_with_output()
        .map_err(|source| InitError::Spawn { tool, source })?;
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    if !output.status.success() {
        if stderr.contains("Permission denied") || stderr.contains("Operation not permitted") {
            return Err(InitError::NoNetAdmin);
        }
        return Err(InitError::CommandFailed {
            command: format!("{tool} {}", args.join(" ")),
            status: output.status,
            stderr,
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn which(tool: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|candidate| candidate.is_file())
}

fn parse_port(text: &str) -> Result<u16, String> {
    match text.trim().parse::<u16>() {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(format!("'{text}' is not a TCP port (1-65535)")),
    }
}

pub(crate) fn parse_ports(text: &str) -> Result<Ports, String> {
    split_list(text)
        .map(parse_port)
        .collect::<Result<_, _>>()
        .map(Ports)
}

pub(crate) fn parse_cidrs(text: &str) -> Result<Cidrs, String> {
    split_list(text)
        .map(|item| {
            item.parse::<IpNet>()
                .or_else(|_| item.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| format!("'{item}' is not a CIDR (e.g. 10.0.0.0/8 or fd00::/8)"))
        })
        .collect::<Result<_, _>>()
        .map(Cidrs)
}

/// The non-empty items of a comma-separated list (an empty list is allowed,
/// as orchestrators often pass an empty annotation).
fn split_list(text: &str) -> impl Iterator<Item = &str> {
    text.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        init: InitArgs,
    }

    fn config(args: &[&str]) -> InitConfig {
        let cli = Cli::try_parse_from(std::iter::once("init").chain(args.iter().copied()))
            .expect("test arguments parse");
        InitConfig::try_from(&cli.init).expect("test arguments are valid")
    }

    fn parse_error(args: &[&str]) -> String {
        match Cli::try_parse_from(std::iter::once("init").chain(args.iter().copied())) {
            Ok(cli) => match InitConfig::try_from(&cli.init) {
                Ok(config) => panic!("{args:?} was accepted: {config:?}"),
                Err(e) => e.to_string(),
            },
            Err(e) => e.to_string(),
        }
    }

    const DEFAULT_V4: &str = "\
*nat
:RAMPART_INBOUND - [0:0]
:RAMPART_IN_REDIRECT - [0:0]
:RAMPART_OUTPUT - [0:0]
:RAMPART_OUT_REDIRECT - [0:0]
-A RAMPART_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A RAMPART_INBOUND -p tcp --dport 15000 -j RETURN
-A RAMPART_INBOUND -p tcp --dport 15001 -j RETURN
-A RAMPART_INBOUND -p tcp --dport 15006 -j RETURN
-A RAMPART_INBOUND -p tcp -j RAMPART_IN_REDIRECT
-A RAMPART_OUT_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A RAMPART_OUTPUT -m owner --uid-owner 2102 -j RETURN
-A RAMPART_OUTPUT -o lo -j RETURN
-A RAMPART_OUTPUT -d 127.0.0.0/8 -j RETURN
-A RAMPART_OUTPUT -p tcp --dport 15000 -j RETURN
-A RAMPART_OUTPUT -p tcp --dport 15001 -j RETURN
-A RAMPART_OUTPUT -p tcp --dport 15006 -j RETURN
-A RAMPART_OUTPUT -p tcp -j RAMPART_OUT_REDIRECT
-A PREROUTING -p tcp -j RAMPART_INBOUND
-A OUTPUT -p tcp -j RAMPART_OUTPUT
COMMIT
";

    #[test]
    fn default_ipv4_rules() {
        assert_eq!(rules(&config(&[]), Family::V4), DEFAULT_V4);
    }

    #[test]
    fn default_ipv6_rules_differ_only_in_loopback() {
        let expected = DEFAULT_V4.replace("127.0.0.0/8", "::1/128");
        assert_eq!(rules(&config(&[]), Family::V6), expected);
    }

    #[test]
    fn exclusions_and_inclusions_split_by_family() {
        let config = config(&[
            "--outbound-port=7001",
            "--inbound-port=7006",
            "--admin-port=7000",
            "--proxy-uid=999",
            "--exclude-inbound-ports=22, 7000",
            "--exclude-outbound-ports=5432",
            "--exclude-outbound-cidrs=10.1.2.3/8,fd00::/8,192.168.0.7",
            "--include-outbound-cidrs=10.0.0.0/8,fd00:1::/32",
        ]);
        let v4 = "\
*nat
:RAMPART_INBOUND - [0:0]
:RAMPART_IN_REDIRECT - [0:0]
:RAMPART_OUTPUT - [0:0]
:RAMPART_OUT_REDIRECT - [0:0]
-A RAMPART_IN_REDIRECT -p tcp -j REDIRECT --to-ports 7006
-A RAMPART_INBOUND -p tcp --dport 7000 -j RETURN
-A RAMPART_INBOUND -p tcp --dport 7001 -j RETURN
-A RAMPART_INBOUND -p tcp --dport 7006 -j RETURN
-A RAMPART_INBOUND -p tcp --dport 22 -j RETURN
-A RAMPART_INBOUND -p tcp -j RAMPART_IN_REDIRECT
-A RAMPART_OUT_REDIRECT -p tcp -j REDIRECT --to-ports 7001
-A RAMPART_OUTPUT -m owner --uid-owner 999 -j RETURN
-A RAMPART_OUTPUT -o lo -j RETURN
-A RAMPART_OUTPUT -d 127.0.0.0/8 -j RETURN
-A RAMPART_OUTPUT -d 10.0.0.0/8 -j RETURN
-A RAMPART_OUTPUT -d 192.168.0.7/32 -j RETURN
-A RAMPART_OUTPUT -p tcp --dport 7000 -j RETURN
-A RAMPART_OUTPUT -p tcp --dport 7001 -j RETURN
-A RAMPART_OUTPUT -p tcp --dport 7006 -j RETURN
-A RAMPART_OUTPUT -p tcp --dport 5432 -j RETURN
-A RAMPART_OUTPUT -p tcp -d 10.0.0.0/8 -j RAMPART_OUT_REDIRECT
-A PREROUTING -p tcp -j RAMPART_INBOUND
-A OUTPUT -p tcp -j RAMPART_OUTPUT
COMMIT
";
        assert_eq!(rules(&config, Family::V4), v4);
        let v6 = rules(&config, Family::V6);
        assert!(
            v6.contains("-A RAMPART_OUTPUT -d fd00::/8 -j RETURN\n"),
            "{v6}"
        );
        assert!(
            v6.contains("-A RAMPART_OUTPUT -p tcp -d fd00:1::/32 -j RAMPART_OUT_REDIRECT\n"),
            "{v6}"
        );
        assert!(
            !v6.contains("10.0.0.0/8") && !v6.contains("192.168"),
            "{v6}"
        );
    }

    #[test]
    fn include_list_without_this_family_captures_nothing_of_it() {
        let v6 = rules(
            &config(&["--include-outbound-cidrs=10.0.0.0/8"]),
            Family::V6,
        );
        assert!(!v6.contains("-j RAMPART_OUT_REDIRECT"), "{v6}");
        // Inbound capture does not depend on the include list.
        assert!(
            v6.contains("-A RAMPART_INBOUND -p tcp -j RAMPART_IN_REDIRECT"),
            "{v6}"
        );
    }

    #[test]
    fn empty_lists_are_allowed() {
        let config = config(&["--exclude-inbound-ports=", "--include-outbound-cidrs", ""]);
        assert_eq!(rules(&config, Family::V4), DEFAULT_V4);
    }

    #[test]
    fn bad_arguments_name_the_flag() {
        let cases: &[(&[&str], &[&str])] = &[
            (
                &["--exclude-inbound-ports=22,abc"],
                &["--exclude-inbound-ports", "'abc'"],
            ),
            (
                &["--exclude-outbound-ports=0"],
                &["--exclude-outbound-ports", "'0'"],
            ),
            (
                &["--exclude-outbound-cidrs=10.0.0.0/33"],
                &["--exclude-outbound-cidrs", "10.0.0.0/33"],
            ),
            (
                &["--include-outbound-cidrs=nope"],
                &["--include-outbound-cidrs", "'nope'"],
            ),
            (&["--inbound-port=70000"], &["--inbound-port", "70000"]),
            (
                &["--admin-port=15001"],
                &["--outbound-port and --admin-port are both 15001"],
            ),
            (&["--proxy-uid=0"], &["--proxy-uid must not be 0"]),
        ];
        for (args, needles) in cases {
            let message = parse_error(args);
            for needle in *needles {
                assert!(
                    message.contains(needle),
                    "{args:?}: {needle:?} not in {message:?}"
                );
            }
        }
    }

    #[test]
    fn finds_only_jumps_into_our_chains() {
        let save = "\
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:RAMPART_INBOUND - [0:0]
:RAMPART_OUTPUT - [0:0]
:USER - [0:0]
-A PREROUTING -p tcp -j RAMPART_INBOUND
-A PREROUTING -p tcp -j USER
-A OUTPUT -p tcp -j RAMPART_OUTPUT
-A USER -d 10.0.0.0/8 -g RAMPART_OUTPUT
-A RAMPART_INBOUND -p tcp -j RAMPART_IN_REDIRECT
COMMIT
";
        assert_eq!(
            our_jumps(save),
            [
                "-A PREROUTING -p tcp -j RAMPART_INBOUND",
                "-A OUTPUT -p tcp -j RAMPART_OUTPUT",
                "-A USER -d 10.0.0.0/8 -g RAMPART_OUTPUT",
            ]
        );
        assert_eq!(our_chains(save), [INBOUND, OUTBOUND]);
        assert_eq!(
            clean_input(&our_jumps(save), &our_chains(save)),
            "\
*nat
-D PREROUTING -p tcp -j RAMPART_INBOUND
-D OUTPUT -p tcp -j RAMPART_OUTPUT
-D USER -d 10.0.0.0/8 -g RAMPART_OUTPUT
:RAMPART_INBOUND - [0:0]
:RAMPART_OUTPUT - [0:0]
-X RAMPART_INBOUND
-X RAMPART_OUTPUT
COMMIT
"
        );
    }

    #[test]
    fn reinstall_deletes_old_jumps_first() {
        let input = restore_input(
            &config(&[]),
            Family::V4,
            &["-A OUTPUT -p tcp -j RAMPART_OUTPUT".into()],
        );
        assert!(
            input.starts_with("*nat\n-D OUTPUT -p tcp -j RAMPART_OUTPUT\n:RAMPART_INBOUND"),
            "{input}"
        );
    }

    #[test]
    fn dry_run_prints_one_section_per_family() {
        let text = dry_run_text(&config(&[]), &[Family::V4, Family::V6], false);
        assert!(
            text.starts_with("# iptables-restore --noflush\n*nat\n"),
            "{text}"
        );
        assert!(
            text.contains("# ip6tables-restore --noflush\n*nat\n"),
            "{text}"
        );
        assert_eq!(text.matches("COMMIT").count(), 2);
    }
}
