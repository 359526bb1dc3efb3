//! Loading: policy files become one compiled set, or a list of every error
//! found. An invalid entry rejects the whole set (never drop a rule: that
//! would widen what a policy admits). Errors name the file, the line and
//! column when the YAML parser knows them, and the field's path.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::DefaultAction;
use crate::compile::{CKind, CNative, CPolicy, Compiled};
use crate::model::{Action, Policy, PolicyBody, PolicyFile, PolicyKind};
use crate::normalize::NormalizeOptions;
use crate::rego::{RegoEngine, RegoModule};

/// How policies are loaded and applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// What happens on a port that no ALLOW or Rego policy covers.
    pub default_action: DefaultAction,
    /// How request paths are normalized before matching and forwarding.
    pub normalize: NormalizeOptions,
    /// Time limit of one Rego evaluation; past it the request is denied.
    pub rego_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            default_action: DefaultAction::Deny,
            normalize: NormalizeOptions::default(),
            rego_timeout: crate::rego::DEFAULT_TIMEOUT,
        }
    }
}

/// One loaded policy, for the admin API and `rampart policy check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyInfo {
    /// The policy's name.
    pub name: String,
    /// The file it came from.
    pub file: PathBuf,
    /// Native or Rego.
    pub kind: PolicyKind,
    /// The action of a native policy.
    pub action: Option<Action>,
    /// Ports it applies to (empty: all).
    pub ports: Vec<u16>,
    /// Whether it is dry-run.
    pub dry_run: bool,
    /// Number of native rules (Rego: 0).
    pub rules: usize,
    /// SHA-256 (hex) of the policy entry plus its Rego modules and data
    /// files: changes exactly when what the policy means may have changed.
    pub content_hash: String,
    /// The other files it was compiled from (Rego modules and data files),
    /// so that a watcher reloads when one of them changes. Inside a bundle
    /// these are paths within the bundle.
    pub inputs: Vec<PathBuf>,
}

/// A policy file the operator must fix. The configuration is at fault.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("{}: cannot read: {source}", file.display())]
    Io {
        /// The file.
        file: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid YAML or an entry is invalid.
    #[error("{}{}: {field}: {message}", file.display(), location(*line, *column))]
    Invalid {
        /// The file.
        file: PathBuf,
        /// 1-based line, when known.
        line: Option<usize>,
        /// 1-based column, when known.
        column: Option<usize>,
        /// Path of the field, such as `policies[0].rules[1].to.methods[0]`.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// Two policies have the same name.
    #[error("{}: policy {name:?} is already defined in {}", file.display(), first.display())]
    DuplicatePolicy {
        /// The name.
        name: String,
        /// Where it was first defined.
        first: PathBuf,
        /// Where it was defined again.
        file: PathBuf,
    },
    /// A Rego policy's modules or data failed to load or compile.
    #[error("{}: policy {policy:?}: {message}", file.display())]
    Rego {
        /// The policy file.
        file: PathBuf,
        /// The policy.
        policy: String,
        /// What is wrong.
        message: String,
    },
}

fn location(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(":{l}:{c}"),
        (Some(l), None) => format!(":{l}"),
        (None, Some(_)) | (None, None) => String::new(),
    }
}

/// Every error found while loading; never empty.
#[derive(Debug)]
pub struct LoadErrors(pub Vec<LoadError>);

impl fmt::Display for LoadErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for LoadErrors {}

pub(crate) fn load<P: AsRef<Path>>(paths: &[P], options: &Options) -> Result<Compiled, LoadErrors> {
    let mut errors = Vec::new();
    let mut texts = Vec::new();
    for p in paths {
        let p = p.as_ref();
        match std::fs::read_to_string(p) {
            Ok(t) => texts.push((p.to_path_buf(), t)),
            Err(source) => errors.push(LoadError::Io {
                file: p.to_path_buf(),
                source,
            }),
        }
    }
    compile_all(&texts, None, &Files::Disk, options, errors)
}

/// Where a policy's Rego modules and data files are read from.
pub(crate) enum Files<'a> {
    /// The filesystem, relative to the policy file (or the base directory).
    Disk,
    /// An in-memory tree (a policy bundle), keyed by normalized relative
    /// path (`a/b.rego`); nothing touches the filesystem.
    Memory {
        /// The files.
        tree: &'a std::collections::BTreeMap<String, Vec<u8>>,
        /// Per-file Rego versions.
        versions: &'a std::collections::BTreeMap<String, crate::model::RegoVersion>,
    },
}

impl Files<'_> {
    /// A per-file Rego version that overrides the policy's (a bundle
    /// manifest's `file_rego_versions`).
    fn rego_version_of(&self, path: &Path) -> Option<crate::model::RegoVersion> {
        match self {
            Files::Disk => None,
            Files::Memory { versions, .. } => versions.get(&normalize_relative(path)?).copied(),
        }
    }

    fn read(&self, path: &Path) -> Result<String, String> {
        match self {
            Files::Disk => std::fs::read_to_string(path).map_err(|e| e.to_string()),
            Files::Memory { tree, .. } => {
                let key = normalize_relative(path).ok_or("path leaves the bundle")?;
                let bytes = tree.get(&key).ok_or("no such file in the bundle")?;
                String::from_utf8(bytes.clone()).map_err(|_| "not UTF-8".to_owned())
            }
        }
    }
}

/// `a/./b/../c.rego` as `a/c.rego`; `None` when it climbs above the root.
pub(crate) fn normalize_relative(path: &Path) -> Option<String> {
    let mut parts: Vec<String> = Vec::new();
    for c in path.components() {
        match c {
            std::path::Component::Normal(s) => parts.push(s.to_str()?.to_owned()),
            std::path::Component::CurDir | std::path::Component::RootDir => {}
            std::path::Component::ParentDir => {
                parts.pop()?;
            }
            std::path::Component::Prefix(_) => return None,
        }
    }
    Some(parts.join("/"))
}

/// Compiles policy files held in memory; module and data paths resolve
/// against each policy file's directory within `tree`.
pub(crate) fn load_memory(
    texts: &[(PathBuf, String)],
    tree: &std::collections::BTreeMap<String, Vec<u8>>,
    versions: &std::collections::BTreeMap<String, crate::model::RegoVersion>,
    options: &Options,
) -> Result<Compiled, LoadErrors> {
    compile_all(
        texts,
        None,
        &Files::Memory { tree, versions },
        options,
        Vec::new(),
    )
}

pub(crate) fn load_texts(
    texts: &[(String, String)],
    base_dir: &Path,
    options: &Options,
) -> Result<Compiled, LoadErrors> {
    let texts: Vec<(PathBuf, String)> = texts
        .iter()
        .map(|(o, t)| (PathBuf::from(o), t.clone()))
        .collect();
    compile_all(&texts, Some(base_dir), &Files::Disk, options, Vec::new())
}

fn compile_all(
    texts: &[(PathBuf, String)],
    base_dir: Option<&Path>,
    files: &Files<'_>,
    options: &Options,
    mut errors: Vec<LoadError>,
) -> Result<Compiled, LoadErrors> {
    let mut compiled = Compiled {
        default: options.default_action,
        normalize: options.normalize,
        ..Compiled::default()
    };
    let mut seen: std::collections::HashMap<String, PathBuf> = std::collections::HashMap::new();
    for (file, text) in texts {
        let dir = match base_dir {
            Some(d) => d.to_path_buf(),
            None => file.parent().map(Path::to_path_buf).unwrap_or_default(),
        };
        let parsed = match parse_file(file, text) {
            Ok(p) => p,
            Err(mut e) => {
                errors.append(&mut e);
                continue;
            }
        };
        let raw_entries = raw_entries(text);
        for (i, policy) in parsed.policies.into_iter().enumerate() {
            if let Some(first) = seen.get(&policy.name) {
                errors.push(LoadError::DuplicatePolicy {
                    name: policy.name.clone(),
                    first: first.clone(),
                    file: file.clone(),
                });
                continue;
            }
            seen.insert(policy.name.clone(), file.clone());
            let mut hasher = Sha256::new();
            hasher.update(
                raw_entries
                    .get(i)
                    .map(String::as_str)
                    .unwrap_or("")
                    .as_bytes(),
            );
            match compile_policy(&policy, &dir, files, options, &mut hasher) {
                Ok(kind) => {
                    compiled.infos.push(info(&policy, file, &dir, hasher));
                    compiled.policies.push(CPolicy {
                        name: Arc::from(policy.name.as_str()),
                        ports: policy.ports.clone(),
                        dry_run: policy.dry_run,
                        kind,
                    });
                }
                Err(message) => errors.push(LoadError::Rego {
                    file: file.clone(),
                    policy: policy.name.clone(),
                    message,
                }),
            }
        }
    }
    errors.extend(request_body_conflict(&compiled));
    if !errors.is_empty() {
        return Err(LoadErrors(errors));
    }
    compiled.index();
    Ok(compiled)
}

/// Compiles policies built in code rather than read from a file (the
/// per-port allowlists of the configuration): the same validation,
/// compilation and admin-API description as loaded ones. `origin` stands
/// in for the file name; the content hash covers the policy's value.
pub(crate) fn compile_built(
    policies: &[Policy],
    origin: &Path,
    options: &Options,
) -> Result<Compiled, LoadErrors> {
    let mut compiled = Compiled {
        default: options.default_action,
        normalize: options.normalize,
        ..Compiled::default()
    };
    let mut errors = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let dir = PathBuf::new();
    for policy in policies {
        if !seen.insert(policy.name.as_str()) {
            errors.push(LoadError::DuplicatePolicy {
                name: policy.name.clone(),
                first: origin.to_path_buf(),
                file: origin.to_path_buf(),
            });
            continue;
        }
        let mut hasher = Sha256::new();
        hasher.update(format!("{policy:?}").as_bytes());
        match compile_policy(policy, &dir, &Files::Disk, options, &mut hasher) {
            Ok(kind) => {
                compiled.infos.push(info(policy, origin, &dir, hasher));
                compiled.policies.push(CPolicy {
                    name: Arc::from(policy.name.as_str()),
                    ports: policy.ports.clone(),
                    dry_run: policy.dry_run,
                    kind,
                });
            }
            Err(message) => errors.push(LoadError::Rego {
                file: origin.to_path_buf(),
                policy: policy.name.clone(),
                message,
            }),
        }
    }
    errors.extend(request_body_conflict(&compiled));
    if !errors.is_empty() {
        return Err(LoadErrors(errors));
    }
    compiled.index();
    Ok(compiled)
}

/// One sidecar reads one request body, as Envoy has one ext_authz filter:
/// the Rego policies that set `with_request_body` must set the same.
fn request_body_conflict(compiled: &Compiled) -> Option<LoadError> {
    let mut first: Option<(&str, crate::model::WithRequestBody)> = None;
    for (p, info) in compiled.policies.iter().zip(&compiled.infos) {
        let CKind::Rego(engine) = &p.kind else {
            continue;
        };
        let Some(body) = engine.request_body() else {
            continue;
        };
        match first {
            None => first = Some((&p.name, body)),
            Some((_, b)) if b == body => {}
            Some((name, _)) => {
                return Some(LoadError::Rego {
                    file: info.file.clone(),
                    policy: p.name.to_string(),
                    message: format!(
                        "with_request_body differs from policy {name:?}'s: the sidecar reads \
                         one request body for all Rego policies (one ext_authz filter)"
                    ),
                });
            }
        }
    }
    None
}

fn info(policy: &Policy, file: &Path, dir: &Path, hasher: Sha256) -> PolicyInfo {
    let (kind, action, rules, inputs) = match &policy.body {
        PolicyBody::Native(n) => (
            PolicyKind::Native,
            Some(n.action),
            n.rules.len(),
            Vec::new(),
        ),
        PolicyBody::Rego(spec) => {
            let inputs = spec
                .modules
                .iter()
                .chain(&spec.data_files)
                .map(|f| dir.join(f))
                .collect();
            (PolicyKind::Rego, None, 0, inputs)
        }
    };
    let content_hash = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    PolicyInfo {
        name: policy.name.clone(),
        file: file.to_path_buf(),
        kind,
        action,
        ports: policy.ports.clone(),
        dry_run: policy.dry_run,
        rules,
        content_hash,
        inputs,
    }
}

fn compile_policy(
    policy: &Policy,
    dir: &Path,
    files: &Files<'_>,
    options: &Options,
    hasher: &mut Sha256,
) -> Result<CKind, String> {
    match &policy.body {
        PolicyBody::Native(n) => Ok(CKind::Native(CNative::compile(n)?)),
        PolicyBody::Rego(spec) => {
            let mut modules = Vec::new();
            for m in &spec.modules {
                let path = dir.join(m);
                let src = files
                    .read(&path)
                    .map_err(|e| format!("module {}: {e}", path.display()))?;
                hasher.update(src.as_bytes());
                modules.push(RegoModule {
                    name: path.display().to_string(),
                    source: src,
                    version: files.rego_version_of(&path).unwrap_or(spec.rego_version),
                });
            }
            if let Some(src) = &spec.inline {
                modules.push(RegoModule {
                    name: format!("{}.rego", policy.name),
                    source: src.clone(),
                    version: spec.rego_version,
                });
            }
            let mut data = Vec::new();
            for d in &spec.data_files {
                let path = dir.join(d);
                let text = files
                    .read(&path)
                    .map_err(|e| format!("data file {}: {e}", path.display()))?;
                hasher.update(text.as_bytes());
                let v: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| format!("data file {}: {e}", path.display()))?;
                data.push(v);
            }
            if let Some(d) = &spec.data {
                data.push(d.clone());
            }
            let engine = RegoEngine::new(
                &modules,
                &data,
                &spec.query,
                spec.result,
                options.rego_timeout,
            )?
            .with_request_body(spec.with_request_body)
            .with_peer_certificate(spec.include_peer_certificate);
            Ok(CKind::Rego(Arc::new(engine)))
        }
    }
}

/// Parses one file; on failure reports the first error with its location,
/// then one error for every other invalid policy entry.
fn parse_file(file: &Path, text: &str) -> Result<PolicyFile, Vec<LoadError>> {
    let de = serde_yaml::Deserializer::from_str(text);
    let first = match serde_path_to_error::deserialize::<_, PolicyFile>(de) {
        Ok(p) => return Ok(p),
        Err(e) => e,
    };
    let first_path = first.path().to_string();
    let loc = first.inner().location();
    let mut errors = vec![LoadError::Invalid {
        file: file.to_path_buf(),
        line: loc.as_ref().map(|l| l.line()),
        column: loc.as_ref().map(|l| l.column()),
        field: first_path.clone(),
        message: strip_location(&first.inner().to_string()),
    }];
    // The rest of the file, entry by entry, to report every bad policy.
    let Ok(value) = serde_yaml::from_str::<serde_yaml::Value>(text) else {
        return Err(errors);
    };
    let Some(entries) = value.get("policies").and_then(|p| p.as_sequence()) else {
        return Err(errors);
    };
    for (i, entry) in entries.iter().enumerate() {
        let prefix = format!("policies[{i}]");
        if first_path == prefix || first_path.starts_with(&format!("{prefix}.")) {
            continue;
        }
        if let Err(e) = serde_path_to_error::deserialize::<_, Policy>(entry.clone()) {
            let inner = e.path().to_string();
            let field = if inner == "." {
                prefix
            } else {
                format!("{prefix}.{inner}")
            };
            errors.push(LoadError::Invalid {
                file: file.to_path_buf(),
                line: None,
                column: None,
                field,
                message: strip_location(&e.inner().to_string()),
            });
        }
    }
    Err(errors)
}

/// serde_yaml appends " at line L column C"; we report the location apart.
fn strip_location(msg: &str) -> String {
    match msg.find(" at line ") {
        Some(i) => msg[..i].to_owned(),
        None => msg.to_owned(),
    }
}

/// Each policy entry re-serialized, for content hashes that ignore comments
/// and formatting.
fn raw_entries(text: &str) -> Vec<String> {
    let Ok(value) = serde_yaml::from_str::<serde_yaml::Value>(text) else {
        return Vec::new();
    };
    value
        .get("policies")
        .and_then(|p| p.as_sequence())
        .map(|s| {
            s.iter()
                .map(|e| serde_yaml::to_string(e).unwrap_or_default())
                .collect()
        })
        .unwrap_or_default()
}
