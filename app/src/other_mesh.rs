//! Another service mesh in the pod: Istio's or Linkerd's sidecar, or their
//! injection asked for. Two sidecars would both install capture rules and
//! both terminate mTLS, so the app's traffic would go through the one whose
//! rules ran last and the other's policies would silently not apply.
//! Injection refuses such a pod (the webhook with the reason as its
//! admission message) rather than guess which mesh the operator meant.

use serde_yaml::{Mapping, Value};

/// What shows that another mesh is (or will be) in a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtherMesh {
    /// `Istio` or `Linkerd`.
    pub mesh: &'static str,
    /// The container or annotation that says so, e.g. `container istio-proxy`.
    pub evidence: String,
}

/// Containers that the other meshes' injectors add.
const CONTAINERS: [(&str, &str); 5] = [
    ("istio-proxy", "Istio"),
    ("istio-init", "Istio"),
    ("istio-validation", "Istio"),
    ("linkerd-proxy", "Linkerd"),
    ("linkerd-init", "Linkerd"),
];

/// Annotations (and labels) that ask for, or record, another mesh's
/// injection; `None` as the value means any value.
const MARKERS: [(&str, Option<&[&str]>, &str); 6] = [
    ("sidecar.istio.io/status", None, "Istio"),
    (
        "sidecar.istio.io/inject",
        Some(&["true", "enabled"]),
        "Istio",
    ),
    ("istio.io/dataplane-mode", Some(&["ambient"]), "Istio"),
    ("linkerd.io/proxy-version", None, "Linkerd"),
    (
        "linkerd.io/inject",
        Some(&["enabled", "ingress"]),
        "Linkerd",
    ),
    ("linkerd.io/created-by", None, "Linkerd"),
];

/// The first sign of another mesh in `pod` (a pod or pod template).
pub fn find(pod: &Mapping) -> Option<OtherMesh> {
    let spec = pod.get("spec");
    for list in ["initContainers", "containers"] {
        let containers = spec.and_then(|s| s.get(list)).and_then(Value::as_sequence);
        for container in containers.into_iter().flatten() {
            let name = container.get("name").and_then(Value::as_str).unwrap_or("");
            if let Some((_, mesh)) = CONTAINERS.iter().find(|(c, _)| *c == name) {
                return Some(OtherMesh {
                    mesh,
                    evidence: format!("container {name}"),
                });
            }
        }
    }
    let metadata = pod.get("metadata");
    for field in ["annotations", "labels"] {
        let Some(entries) = metadata
            .and_then(|m| m.get(field))
            .and_then(Value::as_mapping)
        else {
            continue;
        };
        for (key, values, mesh) in MARKERS {
            let Some(value) = entries.get(key).and_then(Value::as_str) else {
                continue;
            };
            if values.is_none_or(|vs| vs.contains(&value.trim())) {
                let kind = if field == "labels" {
                    "label"
                } else {
                    "annotation"
                };
                return Some(OtherMesh {
                    mesh,
                    evidence: format!("{kind} {key}: {value}"),
                });
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(yaml: &str) -> Mapping {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn sidecars_and_injection_markers_are_found() {
        let cases = [
            (
                "spec: {containers: [{name: app}, {name: istio-proxy}]}",
                Some(("Istio", "container istio-proxy")),
            ),
            (
                "spec: {initContainers: [{name: linkerd-init}]}",
                Some(("Linkerd", "container linkerd-init")),
            ),
            (
                "metadata: {annotations: {linkerd.io/inject: enabled}}",
                Some(("Linkerd", "annotation linkerd.io/inject: enabled")),
            ),
            (
                "metadata: {labels: {sidecar.istio.io/inject: 'true'}}",
                Some(("Istio", "label sidecar.istio.io/inject: true")),
            ),
            (
                "metadata: {annotations: {sidecar.istio.io/status: '{}'}}",
                Some(("Istio", "annotation sidecar.istio.io/status: {}")),
            ),
            // Opting out of the other mesh is what a Rampart pod should do.
            (
                "metadata: {annotations: {sidecar.istio.io/inject: 'false', linkerd.io/inject: disabled}}",
                None,
            ),
            ("spec: {containers: [{name: app}]}", None),
        ];
        for (yaml, expected) in cases {
            let found = find(&pod(yaml));
            let found = found.as_ref().map(|f| (f.mesh, f.evidence.as_str()));
            assert_eq!(found, expected, "{yaml}");
        }
    }
}
