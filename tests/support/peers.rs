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

/// The binary `bin` of peer `name` at `version`. When it is not built,
/// prints how to build it and returns None so that the test returns early;
/// under `RAMPART_REQUIRE_E2E=1` (CI) it panics instead, since a skip would
/// hide a broken setup.
pub fn find(name: &str, version: &str, bin: &str) -> Option<PathBuf> {
    let path = dir()
        .join(format!("{name}-{version}"))
        .join("bin")
        .join(bin);
    if path.is_file() {
        return Some(path);
    }
    let reason = format!(
        "{} is not built (run tests/peers/peer-{name}.sh)",
        path.display()
    );
    if std::env::var_os("RAMPART_REQUIRE_E2E").is_some_and(|v| v == "1") {
        panic!("{reason} and RAMPART_REQUIRE_E2E=1");
    }
    eprintln!("skipping: {reason}; set RAMPART_REQUIRE_E2E=1 to fail instead");
    None
}
