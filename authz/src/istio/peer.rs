//! PeerAuthentication: which inbound ports accept plaintext. Resolved once
//! for this workload the way pilot composes them: the mesh-wide policy (root
//! namespace, no selector), then the namespace's (no selector), then the
//! workload's (selector), each level overriding the one above unless its
//! mode is `UNSET`; per-port modes come from the workload policy only, and
//! an `UNSET` port inherits the workload's mode. With no PeerAuthentication
//! at all, Istio's default is PERMISSIVE; Rampart then keeps each port's
//! configured mode (strict unless the sidecar config says otherwise).

use std::collections::BTreeMap;

use super::resource::{MtlsSpec, PeerAuthenticationSpec};

/// An Istio mTLS mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerMode {
    /// mTLS only.
    Strict,
    /// mTLS or plaintext.
    Permissive,
    /// Plaintext. Rampart accepts mTLS as well on such a port (its peers
    /// always dial with mTLS), so it is served like PERMISSIVE.
    Disable,
}

impl PeerMode {
    /// Istio's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            PeerMode::Strict => "STRICT",
            PeerMode::Permissive => "PERMISSIVE",
            PeerMode::Disable => "DISABLE",
        }
    }

    /// Whether a plaintext connection is accepted.
    pub fn allows_plaintext(self) -> bool {
        match self {
            PeerMode::Strict => false,
            PeerMode::Permissive | PeerMode::Disable => true,
        }
    }
}

/// The composed result for this workload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerModes {
    /// The workload-level mode, when any PeerAuthentication applies.
    pub workload: Option<PeerMode>,
    /// Per-port overrides from the workload's own policy.
    pub ports: BTreeMap<u16, PeerMode>,
    /// The policies that were composed, outermost first (`ns/name`).
    pub from: Vec<String>,
}

impl PeerModes {
    /// The mode of `port`, or `None` when no PeerAuthentication applies.
    pub fn mode(&self, port: u16) -> Option<PeerMode> {
        self.ports.get(&port).copied().or(self.workload)
    }
}

/// A level's policy: mesh, namespace or workload.
pub(crate) struct Level<'a> {
    pub name: String,
    pub spec: &'a PeerAuthenticationSpec,
}

pub(crate) fn parse_mode(m: &Option<MtlsSpec>) -> Result<Option<PeerMode>, String> {
    let mode = m.as_ref().and_then(|m| m.mode.as_deref());
    match mode {
        None | Some("UNSET") => Ok(None),
        Some("STRICT") => Ok(Some(PeerMode::Strict)),
        Some("PERMISSIVE") => Ok(Some(PeerMode::Permissive)),
        Some("DISABLE") => Ok(Some(PeerMode::Disable)),
        Some(other) => Err(format!(
            "{other:?} is not UNSET, DISABLE, PERMISSIVE or STRICT"
        )),
    }
}

/// Composes mesh, namespace and workload policies (each optional).
pub(crate) fn compose(
    mesh: Option<Level<'_>>,
    namespace: Option<Level<'_>>,
    workload: Option<Level<'_>>,
) -> PeerModes {
    let mut out = PeerModes::default();
    if mesh.is_none() && namespace.is_none() && workload.is_none() {
        return out;
    }
    // Istio's mesh default when nothing sets a mode.
    let mut mode = PeerMode::Permissive;
    for level in [&mesh, &namespace, &workload].into_iter().flatten() {
        out.from.push(level.name.clone());
        // Invariant: modes were validated when the policies were read.
        if let Ok(Some(m)) = parse_mode(&level.spec.mtls) {
            mode = m;
        }
    }
    out.workload = Some(mode);
    if let Some(w) = &workload
        && w.spec.selector.is_some()
    {
        for (port, m) in &w.spec.port_level_mtls {
            let (Ok(port), Ok(m)) = (port.parse::<u16>(), parse_mode(&Some(m.clone()))) else {
                continue;
            };
            out.ports.insert(port, m.unwrap_or(mode));
        }
    }
    out
}
