//! Istio `security.istio.io` resources are not translated: the native
//! format's defaults differ from Istio's on purpose (docs/policy.md, "Native
//! and Istio semantics"), and a translation would inherit them. The
//! importer checks the files exactly as the sidecar will load them for the
//! given workload and prints the `inbound.istio` section that makes the
//! sidecar decide them as they are, with a line per resource saying whether
//! it attaches.

use std::path::PathBuf;

use serde_json::json;

use super::{ImportError, ImportOptions, Imported, Note, NoteKind, Object, Target};

pub(crate) fn import(
    files: &[PathBuf],
    objects: &[Object],
    options: &ImportOptions,
) -> Result<Imported, ImportError> {
    let Some(namespace) = options.istio_namespace.clone() else {
        return Err(ImportError {
            at: "--namespace".into(),
            message: "Istio resources attach by the workload's namespace (and labels): pass --namespace NS [--label k=v ...]".into(),
        });
    };
    let workload = crate::istio::Workload {
        namespace: namespace.clone(),
        labels: options.istio_labels.clone(),
        root_namespace: "istio-system".into(),
        trust_domain: options.trust_domain.clone(),
        trust_domain_aliases: Vec::new(),
        tcp_ports: None,
        jwks_cache: Default::default(),
    };
    let loaded = crate::istio::IstioPolicies::load(files, &workload).map_err(|e| ImportError {
        at: "Istio resources".into(),
        message: e.to_string(),
    })?;
    let mut out = Imported::default();
    for r in loaded.resources() {
        let at = format!("{}: {} {}", r.file.display(), r.kind, r.name);
        out.report.push(match &r.not_attached {
            None => Note {
                at,
                kind: NoteKind::Mapped,
                text: "decided as Istio decides it (inbound.istio)".into(),
            },
            Some(why) => Note {
                at,
                kind: NoteKind::NotImported,
                text: format!("does not apply to this workload: {why}"),
            },
        });
    }
    for o in objects.iter().filter(|o| {
        !matches!(
            o.kind.as_str(),
            "AuthorizationPolicy" | "PeerAuthentication" | "RequestAuthentication"
        )
    }) {
        out.report.push(Note {
            at: o.at(),
            kind: NoteKind::NotImported,
            text: format!("{} is not a security.istio.io resource", o.kind),
        });
    }
    let mut config = serde_json::Map::new();
    let mut istio = json!({"files": files, "namespace": namespace});
    if !options.istio_labels.is_empty() {
        istio["labels"] = json!(options.istio_labels);
    }
    if options.trust_domain != "cluster.local" {
        istio["trust_domain"] = json!(options.trust_domain);
    }
    config.insert("inbound".into(), json!({"istio": istio}));
    out.targets.push(Target {
        workload: format!("namespace {namespace}"),
        file_stem: super::policy_name(&[&namespace, "istio"]),
        policies: json!({"policies": []}),
        config,
    });
    Ok(out)
}
