//! The real test peers that `tests/peers/peer-<name>.sh` builds from their
//! Go modules (SPIRE, go-spiffe, ...), found under
//! `$RAMPART_PEERS_DIR/<name>-<version>/bin` (default
//! `/var/tmp/rampart-peers`, as `tests/peers/build-all.sh`).

use std::path::PathBuf;

/// Where the peers are installed.
pub fn dir() -> PathBuf {
    std::env::var_os("RAMPART_PEERS_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/rampart-peers"))
}

/// The binary `bin` of peer `name` at `version`; panics, saying how to
/// build it, when it is not there (tests that need a peer are
/// `#[ignore]`d, so this runs only when asked for, as CI does).
pub fn require(name: &str, version: &str, bin: &str) -> PathBuf {
    let path = dir()
        .join(format!("{name}-{version}"))
        .join("bin")
        .join(bin);
    assert!(
        path.is_file(),
        "{} is not built: run tests/peers/peer-{name}.sh (tests/peers/build-all.sh builds every peer)",
        path.display()
    );
    path
}
