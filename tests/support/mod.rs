//! The end-to-end test DSL: pods as network namespaces on a private switch,
//! real processes inside them, packet captures, and the small apps the
//! scenarios need.
//!
//! ```ignore
//! if !support::require_root() { return; }
//! let net = Net::new("capture");
//! let (client, server) = (net.pod("client"), net.pod("server"));
//! let _echo = server.spawn(apps::echo_server(8080));
//! server.wait_tcp_listening(8080, Duration::from_secs(5));
//! let reply = client.exec(apps::client(server.addr(8080), "hello"));
//! assert_eq!(reply.stdout, b"hello");
//! ```
//!
//! Everything a test creates is owned by a guard (`Net`, `Pod`, `Proc`,
//! `Capture`) that removes it on drop, also when the test panics. Every
//! namespace is named `rampart-e2e-<pid>-<seq>-<name>`, so leftovers of a
//! crashed run (whose pid is gone) are swept when the next run starts.
//! All addresses come from 10.213.0.0/16 (see tests/README.md).

// Each test binary uses its own part of the DSL.
#![allow(dead_code, unused_imports)]

pub mod apps;
mod capture;
pub mod curl;
pub mod ext_authz;
pub mod kube;
mod net;
pub mod nginx;
pub mod peers;
mod process;
pub mod sidecar;
pub mod spire;
mod tmp;

pub use capture::{Capture, Direction, FirstPayloads, Segment, looks_like_tls};
pub use net::{Net, Pod};
pub use process::Proc;
pub use tmp::TempDir;

/// The UID the sidecar runs as (the default of `--proxy-uid`).
pub const PROXY_UID: u32 = 2102;

/// The private subnet every test address comes from; each `Net` gets one
/// /24 of it.
pub const TEST_SUBNET: &str = "10.213.0.0/16";

/// The binary under test.
pub fn rampart_bin() -> &'static str {
    env!("CARGO_BIN_EXE_rampart")
}

/// Whether the end-to-end tests can run here (root, with `ip`, `iptables`,
/// `setpriv` and python3). When they cannot, prints why and returns false
/// so the test returns early; but when `RAMPART_REQUIRE_E2E=1` (CI sets it)
/// a skip would hide a broken setup, so it panics instead.
pub fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    let missing: Vec<&str> = ["ip", "iptables", "iptables-save", "setpriv"]
        .into_iter()
        .filter(|tool| !on_path(tool))
        .collect();
    let reason = if euid != 0 {
        Some("not running as root".to_owned())
    } else if !missing.is_empty() {
        Some(format!("missing tools: {}", missing.join(", ")))
    } else if apps::python().is_none() {
        Some("python3 is not installed".to_owned())
    } else {
        None
    };
    let Some(reason) = reason else {
        return true;
    };
    if std::env::var_os("RAMPART_REQUIRE_E2E").is_some_and(|v| v == "1") {
        panic!("end-to-end test cannot run ({reason}) and RAMPART_REQUIRE_E2E=1");
    }
    eprintln!("skipping end-to-end test: {reason} (set RAMPART_REQUIRE_E2E=1 to fail instead)");
    false
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
}
