//! Rampart's test kit, shared by the end-to-end tests (`tests/`), the
//! crates' integration tests, the benches and the demo's checks:
//!
//! - [`pki`]: one PKI (a development CA in process) that issues SVIDs in
//!   memory or as the PEM files a sidecar reads;
//! - [`sidecar`]: sidecars from a typed [`rampart_app::Config`] (never YAML
//!   text), as `rampart run` processes or in process, and local apps;
//! - the network-namespace DSL: pods as namespaces on a private switch
//!   ([`Net`], [`Pod`]), processes inside them ([`Proc`]), packet captures
//!   ([`Capture`]);
//! - [`apps`], [`curl`], [`nginx`], [`ext_authz`]: the small apps and the
//!   real clients and servers the scenarios talk to; [`kube`]: a real
//!   Kubernetes control plane (kube-apiserver and etcd, Go-built peers);
//!   [`spire`]: the real SPIRE (server and agent, Go-built peers), found
//!   like every peer through [`peers`];
//! - [`wait`]: polling with a deadline, never sleep-and-hope.
//!
//! ```text
//! #[test]
//! #[ignore = "needs root and network namespaces (cargo test -- --include-ignored)"]
//! fn capture() {
//!     support::require_root();
//!     let net = Net::new("capture");
//!     let (client, server) = (net.pod("client"), net.pod("server"));
//!     let _echo = server.spawn(apps::echo_server(8080));
//!     server.wait_tcp_listening(8080, Duration::from_secs(5));
//!     let reply = client.exec(apps::client(server.addr(8080), "hello"));
//!     assert_eq!(reply.stdout, b"hello");
//! }
//! ```
//!
//! Everything a test creates is owned by a guard (`Net`, `Pod`, `Proc`,
//! `Capture`, `Sidecar`) that removes it on drop, also when the test
//! panics. Every namespace is named `rampart-e2e-<pid>-<seq>-<name>`, so
//! leftovers of a crashed run (whose pid is gone) are swept when the next
//! run starts. All addresses come from 10.213.0.0/16 (see tests/README.md).
//!
//! A test whose prerequisite may be missing (root, a tool, a Python
//! package, a real peer) is `#[ignore = "reason"]`, and its `require_*`
//! call panics when the prerequisite is missing: `cargo test` never
//! reports a skipped test as passed, and `cargo test -- --include-ignored`
//! (what CI runs) fails on a missing prerequisite.

// Each test binary uses its own part of the kit.
#![allow(dead_code, unused_imports)]

pub mod apps;
mod capture;
pub mod curl;
pub mod ext_authz;
pub mod kube;
mod net;
pub mod nginx;
pub mod peers;
pub mod pki;
mod process;
pub mod sidecar;
pub mod spire;
mod tmp;
pub mod wait;

pub use capture::{Capture, Direction, FirstPayloads, Segment, looks_like_tls};
pub use net::{Net, Pod, enter_netns};
pub use pki::Pki;
pub use process::Proc;
pub use rampart_app::netns::is_root;
pub use tmp::TempDir;

/// The UID the sidecar runs as (the default of `--proxy-uid`).
pub const PROXY_UID: u32 = 2102;

/// The private subnet every test address comes from; each `Net` gets one
/// /24 of it.
pub const TEST_SUBNET: &str = "10.213.0.0/16";

/// The `rampart` binary under test: `$RAMPART_BIN` when set, else the one
/// cargo built beside the running test or bench executable
/// (`target/<profile>/rampart`, the parent of `deps/`).
pub fn rampart_bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("RAMPART_BIN") {
            return bin.to_string_lossy().into_owned();
        }
        let exe = std::env::current_exe().expect("the test executable's path");
        let mut dir = exe.parent().expect("the test executable's directory");
        if dir.ends_with("deps") {
            dir = dir.parent().expect("the profile directory above deps/");
        }
        let bin = dir.join("rampart");
        assert!(
            bin.is_file(),
            "{} is missing: build it (`cargo build`; cargo test builds it for the root package's tests) or set RAMPART_BIN",
            bin.display()
        );
        bin.to_string_lossy().into_owned()
    })
}

/// Panics unless the end-to-end tests can run here: root, with `ip`,
/// `iptables`, `setpriv` and python3. Tests that call it are
/// `#[ignore = "..."]`, so they only run when asked to
/// (`--include-ignored`), and then a missing prerequisite is a failure.
pub fn require_root() {
    let root = rampart_app::netns::is_root();
    let missing: Vec<&str> = ["ip", "iptables", "iptables-save", "setpriv"]
        .into_iter()
        .filter(|tool| !on_path(tool))
        .collect();
    if !root {
        panic!("this end-to-end test needs root (network namespaces, iptables)");
    }
    if !missing.is_empty() {
        panic!(
            "this end-to-end test needs {} (apt-get install iproute2 iptables util-linux)",
            missing.join(", ")
        );
    }
    if apps::python().is_none() {
        panic!("this end-to-end test needs python3");
    }
}

/// Whether `tool` is an executable file in a `PATH` directory.
pub fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
}

/// Panics unless `tool` is on `PATH`; `install` says how to get it.
pub fn require_tool(tool: &str, install: &str) {
    assert!(on_path(tool), "this test needs `{tool}` ({install})");
}
