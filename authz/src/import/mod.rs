//! `rampart policy import --from istio|smi|osm|appmesh FILE...`: other
//! meshes' resources turned into native policies (and the sidecar
//! configuration they need), with a report of how each object was read and
//! of everything that could not be expressed.
//!
//! The rule every importer keeps: **never print a policy wider than the
//! source.** What cannot be expressed is dropped from an ALLOW (which only
//! narrows it) and reported as `not imported`; where two readings of the
//! source exist, the narrower one is taken and the report says so. Every
//! policy file printed is loaded back with [`crate::Authorizer`] before it
//! is returned, so an importer bug is an error here, not a broken sidecar.
//!
//! Nothing here does I/O beyond reading the given files: a source that
//! names other objects by name (an OSM `kind: Service`, an App Mesh
//! virtual service) is resolved through [`ImportOptions::addresses`], given
//! on the command line; without it, the part that needs it is not imported
//! and the report says what to pass.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ipnet::IpNet;

mod appmesh;
mod istio;
mod osm;
mod smi;

/// The source format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Istio `security.istio.io` resources.
    Istio,
    /// SMI `TrafficTarget`, `HTTPRouteGroup`, `TCPRoute`.
    Smi,
    /// OSM: SMI as OSM implements it, plus `IngressBackend`.
    Osm,
    /// App Mesh `VirtualNode` (`appmesh.k8s.aws`).
    AppMesh,
}

/// What the command line adds to the files.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// The trust domain of the SPIFFE IDs a Kubernetes service account
    /// becomes (`spiffe://<td>/ns/<ns>/sa/<sa>`).
    pub trust_domain: String,
    /// DNS SANs the user accepts as peer identities, by name: a source
    /// naming a DNS SAN not listed here is not imported.
    pub dns_san_identities: Vec<String>,
    /// Addresses of objects named in the sources, keyed `<namespace>/<name>`
    /// (an OSM source `Service`, an App Mesh virtual service).
    pub addresses: BTreeMap<String, Vec<IpNet>>,
    /// Istio only: the workload's namespace and labels.
    pub istio_namespace: Option<String>,
    /// Istio only: the workload's labels.
    pub istio_labels: BTreeMap<String, String>,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            trust_domain: "cluster.local".into(),
            dns_san_identities: Vec::new(),
            addresses: BTreeMap::new(),
            istio_namespace: None,
            istio_labels: BTreeMap::new(),
        }
    }
}

/// The result: one entry per sidecar the sources configure, and the report.
#[derive(Debug, Default)]
pub struct Imported {
    /// One per workload.
    pub targets: Vec<Target>,
    /// How each object was read, and what was not imported.
    pub report: Vec<Note>,
}

impl Imported {
    /// Whether anything in the sources was left out.
    pub fn incomplete(&self) -> bool {
        self.report.iter().any(|n| n.kind == NoteKind::NotImported)
    }
}

/// What one sidecar gets.
#[derive(Debug, Clone)]
pub struct Target {
    /// Which workload's sidecar, in the source's terms
    /// (`ServiceAccount default/api`, `Service ns/name`, `VirtualNode ns/name`).
    pub workload: String,
    /// A file name for it (`<namespace>.<name>`), without extension.
    pub file_stem: String,
    /// The policy file (`{policies: [...]}`), checked to load.
    pub policies: serde_json::Value,
    /// Sidecar configuration to merge into its `rampart run` file
    /// (`inbound.ports`, `outbound.servers`, `inbound.istio`), when needed.
    pub config: serde_json::Map<String, serde_json::Value>,
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// `file: Kind namespace/name` (and the field, when one is meant).
    pub at: String,
    /// Mapped, or not imported.
    pub kind: NoteKind,
    /// What happened.
    pub text: String,
}

/// Kinds of report lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoteKind {
    /// How a part was mapped (which native form, which reading).
    Mapped,
    /// A part left out (the policy is narrower than the source there).
    NotImported,
}

impl std::fmt::Display for Note {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let k = match self.kind {
            NoteKind::Mapped => "mapped",
            NoteKind::NotImported => "not imported",
        };
        write!(f, "{}: {k}: {}", self.at, self.text)
    }
}

/// Why an import failed as a whole (a file that does not read, an object
/// that does not parse). Per-part problems are report lines instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{at}: {message}")]
pub struct ImportError {
    /// `file` or `file: document N` or `file: Kind ns/name: field`.
    pub at: String,
    /// What is wrong.
    pub message: String,
}

/// One Kubernetes object read from a file.
#[derive(Debug, Clone)]
pub(crate) struct Object {
    pub file: PathBuf,
    pub api_version: String,
    pub kind: String,
    pub name: String,
    pub namespace: Option<String>,
    pub value: serde_yaml::Value,
}

impl Object {
    /// `file: Kind ns/name`.
    pub fn at(&self) -> String {
        format!(
            "{}: {} {}/{}",
            self.file.display(),
            self.kind,
            self.namespace.as_deref().unwrap_or("default"),
            self.name
        )
    }

    /// The namespace, `default` when unset (as `kubectl apply` without `-n`).
    pub fn ns(&self) -> &str {
        self.namespace.as_deref().unwrap_or("default")
    }

    /// Deserializes the object (or a part of it) into `T`, naming the
    /// field that does not fit.
    pub fn parse<T: serde::de::DeserializeOwned>(
        &self,
        v: &serde_yaml::Value,
    ) -> Result<T, ImportError> {
        serde_path_to_error::deserialize(v.clone()).map_err(|e| ImportError {
            at: format!("{}: {}", self.at(), e.path()),
            message: e.inner().to_string(),
        })
    }
}

/// Reads every object of `files` (multi-document YAML, or `kind: List`).
pub(crate) fn read_objects(files: &[PathBuf]) -> Result<Vec<Object>, ImportError> {
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file).map_err(|e| ImportError {
            at: file.display().to_string(),
            message: e.to_string(),
        })?;
        for (i, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let at = || format!("{}: document {}", file.display(), i + 1);
            let v = <serde_yaml::Value as serde::Deserialize>::deserialize(doc).map_err(|e| {
                ImportError {
                    at: at(),
                    message: e.to_string(),
                }
            })?;
            if v.is_null() {
                continue;
            }
            push_object(file, v, &at(), &mut out)?;
        }
    }
    Ok(out)
}

fn push_object(
    file: &Path,
    v: serde_yaml::Value,
    at: &str,
    out: &mut Vec<Object>,
) -> Result<(), ImportError> {
    let err = |m: &str| ImportError {
        at: at.to_owned(),
        message: m.to_owned(),
    };
    let s = |v: &serde_yaml::Value, k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_owned);
    let kind = s(&v, "kind").ok_or_else(|| err("no `kind`"))?;
    if kind == "List" {
        let items = v
            .get("items")
            .and_then(|i| i.as_sequence())
            .ok_or_else(|| err("a List without `items`"))?;
        for item in items {
            push_object(file, item.clone(), at, out)?;
        }
        return Ok(());
    }
    let meta = v
        .get("metadata")
        .ok_or_else(|| err(&format!("{kind} without `metadata`")))?;
    let name = s(meta, "name").ok_or_else(|| err(&format!("{kind} without `metadata.name`")))?;
    out.push(Object {
        file: file.to_owned(),
        api_version: s(&v, "apiVersion").unwrap_or_default(),
        kind,
        name,
        namespace: s(meta, "namespace"),
        value: v,
    });
    Ok(())
}

/// Imports `files` as `source` describes them.
pub fn import(
    source: Source,
    files: &[PathBuf],
    options: &ImportOptions,
) -> Result<Imported, ImportError> {
    let objects = read_objects(files)?;
    let mut out = match source {
        Source::Istio => istio::import(files, &objects, options)?,
        Source::Smi => smi::import(&objects, options, smi::Reading::Spec)?,
        Source::Osm => {
            let mut out = smi::import(&objects, options, smi::Reading::Osm)?;
            osm::import(&objects, options, &mut out)?;
            out
        }
        Source::AppMesh => appmesh::import(&objects, options)?,
    };
    for t in &out.targets {
        check_loads(t)?;
    }
    out.targets.sort_by(|a, b| a.file_stem.cmp(&b.file_stem));
    Ok(out)
}

/// Loads a target's policy file back: what is printed must load.
fn check_loads(t: &Target) -> Result<(), ImportError> {
    let yaml = serde_yaml::to_string(&t.policies).map_err(|e| ImportError {
        at: t.workload.clone(),
        message: e.to_string(),
    })?;
    crate::Authorizer::from_yaml(
        &t.workload,
        &yaml,
        Path::new("/"),
        &crate::Options::default(),
    )
    .map(|_| ())
    .map_err(|e| ImportError {
        at: t.workload.clone(),
        message: format!("the imported policy does not load (an importer bug): {e}"),
    })
}

/// A policy name from parts: `[A-Za-z0-9._-]`, at most 128 characters.
pub(crate) fn policy_name(parts: &[&str]) -> String {
    let mut s: String = parts
        .join(".")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    s.truncate(128);
    s
}

/// The SPIFFE ID of a Kubernetes service account.
pub(crate) fn sa_id(options: &ImportOptions, ns: &str, sa: &str) -> String {
    format!("spiffe://{}/ns/{ns}/sa/{sa}", options.trust_domain)
}

/// A principal from a certificate name: a SPIFFE ID as is, a DNS SAN only
/// when the user listed it ([`ImportOptions::dns_san_identities`]).
pub(crate) fn principal_of_san(options: &ImportOptions, san: &str) -> Result<String, String> {
    if san.starts_with("spiffe://") {
        rampart_identity::SpiffeId::parse(san).map_err(|e| format!("{san:?}: {e}"))?;
        return Ok(san.to_owned());
    }
    if options
        .dns_san_identities
        .iter()
        .any(|d| d.eq_ignore_ascii_case(san))
    {
        return Ok(format!("dns:{san}"));
    }
    Err(format!(
        "{san:?} is a DNS name, not a SPIFFE ID: accept it as an identity with `--allow-dns-san {san}` (a listener then takes DNS-SAN client certificates; a backend, DNS-SAN server certificates)"
    ))
}
