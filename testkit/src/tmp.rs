//! Temporary directories the sidecar can read when it runs as its own UID.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// A temporary directory (removed on drop) that every UID can read:
/// `tempfile` makes directories 0700, which the proxy UID (2102) could not
/// enter to read its configuration and certificates.
pub struct TempDir {
    dir: tempfile::TempDir,
}

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl TempDir {
    /// Creates the directory, mode 0755.
    pub fn new() -> TempDir {
        let dir = tempfile::Builder::new()
            .prefix("rampart-e2e-")
            .tempdir()
            .expect("create a temporary directory");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod temporary directory");
        TempDir { dir }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `contents` to `name` in the directory, mode 0644; returns its path.
    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))
            .expect("chmod temporary file");
        path
    }
}
