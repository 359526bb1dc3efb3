//! Policy bundles in OPA's format: a gzipped tar of Rego modules
//! (`*.rego`), data documents (`data.json` or `data.yaml`, placed in the
//! data tree at their directory: `a/b/data.json` is `data.a.b`), an optional
//! `.manifest` (`revision`, `rego_version`, per-file `file_rego_versions`,
//! and `roots`, which every package and data document must lie under, as
//! OPA enforces) and an optional `.signatures.json`. A bundle
//! may also carry Rampart policy files (`*.policy.yaml`, the format of
//! `docs/policy.md`), whose `modules` and `data_files` name files of the
//! bundle relative to the policy file.
//!
//! With policy files, the bundle's policies are exactly those files. Without
//! any, the bundle is one Rego policy named `bundle` over all its modules and
//! its whole data tree, evaluated with [`BundleOptions::query`] (OPA-Envoy's
//! `data.envoy.authz.allow` by default), which is how an OPA sidecar would
//! run the same bundle.
//!
//! Loading is all-or-nothing, like policy files: a bundle that is corrupt,
//! unsigned when a key is configured, badly signed or fails to compile is
//! refused whole, and the caller keeps the previous one.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::PathBuf;

use serde::Deserialize;

use super::signature::{self, SIGNATURES_FILE, SignatureError, Verification};
use crate::model::RegoVersion;
use crate::{Authorizer, LoadErrors, Options};

/// How bundles are unpacked, checked and compiled.
#[derive(Debug, Clone)]
pub struct BundleOptions {
    /// How the compiled policies are applied (default action, path
    /// normalization, Rego timeout).
    pub authz: Options,
    /// Signature requirements; `None` accepts unsigned bundles (and ignores
    /// a `.signatures.json`).
    pub verification: Option<Verification>,
    /// The Rego query of a bundle without policy files.
    pub query: String,
    /// Limits against a hostile or broken archive.
    pub limits: Limits,
}

impl Default for BundleOptions {
    fn default() -> Self {
        BundleOptions {
            authz: Options::default(),
            verification: None,
            query: crate::model::DEFAULT_REGO_QUERY.to_owned(),
            limits: Limits::default(),
        }
    }
}

/// Size limits of one bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Total bytes after decompression.
    pub max_unpacked_bytes: u64,
    /// Number of files.
    pub max_files: usize,
}

impl Default for Limits {
    fn default() -> Self {
        // Far above real policy bundles, far below what would hurt a sidecar.
        Limits {
            max_unpacked_bytes: 32 << 20,
            max_files: 10_000,
        }
    }
}

/// A bundle, compiled and ready to publish.
#[derive(Debug, Clone)]
pub struct LoadedBundle {
    /// The compiled policies.
    pub authorizer: Authorizer,
    /// The manifest's `revision`, empty when it has none.
    pub revision: String,
    /// Whether a signature was verified.
    pub verified: bool,
}

/// Why a bundle was refused.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// Not a gzipped tar, or a damaged one. The server (or the path to it)
    /// is at fault.
    #[error("corrupt bundle archive: {0}")]
    Corrupt(String),
    /// Past [`Limits`].
    #[error("bundle exceeds the limit of {0}")]
    TooLarge(&'static str),
    /// A file path that is absolute after normalization, climbs out of the
    /// bundle or is not UTF-8.
    #[error("bundle file path {0:?} is not allowed")]
    BadPath(String),
    /// `.manifest` or a `data.json` is not valid JSON of the right shape.
    #[error("bundle file {file}: {message}")]
    BadFile {
        /// The file.
        file: String,
        /// What is wrong.
        message: String,
    },
    /// The signature check failed.
    #[error("bundle signature refused: {0}")]
    Signature(#[from] SignatureError),
    /// Neither policy files nor Rego modules.
    #[error("the bundle has no policy files and no Rego modules")]
    Empty,
    /// The policies do not compile (Rego syntax error, invalid policy).
    #[error("bundle policies do not compile:\n{0}")]
    Policy(LoadErrors),
}

impl BundleError {
    /// A fixed label for the `result` of `rampart_policy_bundle_loads_total`.
    pub fn as_str(&self) -> &'static str {
        match self {
            BundleError::Corrupt(_) | BundleError::TooLarge(_) | BundleError::BadPath(_) => {
                "corrupt"
            }
            BundleError::BadFile { .. } | BundleError::Empty => "invalid",
            BundleError::Signature(_) => "bad_signature",
            BundleError::Policy(_) => "compile_error",
        }
    }
}

/// Unpacks, verifies and compiles a `.tar.gz` bundle.
pub fn load(targz: &[u8], options: &BundleOptions) -> Result<LoadedBundle, BundleError> {
    let files = unpack(targz, &options.limits)?;
    compile(files, options)
}

/// Verifies and compiles a bundle given as files (normalized relative path
/// to contents), as [`load`] does after unpacking.
pub fn compile(
    files: BTreeMap<String, Vec<u8>>,
    options: &BundleOptions,
) -> Result<LoadedBundle, BundleError> {
    let verified = match &options.verification {
        Some(v) => {
            signature::verify(&files, v)?;
            true
        }
        None => false,
    };
    let manifest: Manifest = match files.get(".manifest") {
        Some(bytes) => serde_json::from_slice(bytes).map_err(|e| BundleError::BadFile {
            file: ".manifest".into(),
            message: e.to_string(),
        })?,
        None => Manifest::default(),
    };
    let policy_files: Vec<(PathBuf, String)> = files
        .iter()
        .filter(|(name, _)| name.ends_with(".policy.yaml") || name.ends_with(".policy.yml"))
        .map(|(name, bytes)| {
            let text = String::from_utf8(bytes.clone()).map_err(|_| BundleError::BadFile {
                file: name.clone(),
                message: "not UTF-8".into(),
            })?;
            Ok((PathBuf::from(name), text))
        })
        .collect::<Result<_, BundleError>>()?;
    let mut tree = files;
    tree.remove(SIGNATURES_FILE);
    let versions = manifest.file_versions()?;
    check_roots(&tree, &manifest, &versions)?;
    let compiled = if policy_files.is_empty() {
        let (texts, data_name, data) = implicit_policy(&tree, &manifest, &options.query)?;
        tree.insert(data_name, data);
        crate::load::load_memory(&texts, &tree, &versions, &options.authz)
    } else {
        crate::load::load_memory(&policy_files, &tree, &versions, &options.authz)
    }
    .map_err(BundleError::Policy)?;
    Ok(LoadedBundle {
        authorizer: Authorizer::from_compiled(compiled),
        revision: manifest.revision.unwrap_or_default(),
        verified,
    })
}

/// Reads a gzipped tar into memory, within `limits`. Directories and other
/// non-file entries are skipped; paths are normalized (`./a` and `/a` are
/// `a`).
pub fn unpack(targz: &[u8], limits: &Limits) -> Result<BTreeMap<String, Vec<u8>>, BundleError> {
    let corrupt = |e: std::io::Error| BundleError::Corrupt(e.to_string());
    let gz = flate2::read::GzDecoder::new(targz);
    let mut archive = tar::Archive::new(gz);
    let mut files = BTreeMap::new();
    let mut total: u64 = 0;
    for entry in archive.entries().map_err(corrupt)? {
        let entry = entry.map_err(corrupt)?;
        let kind = entry.header().entry_type();
        if kind.is_dir() || kind.is_pax_global_extensions() || kind.is_pax_local_extensions() {
            continue;
        }
        let raw = entry.path_bytes().into_owned();
        let display = String::from_utf8_lossy(&raw).into_owned();
        if !kind.is_file() {
            // Links could point outside the bundle's meaning; refuse them.
            return Err(BundleError::BadPath(display));
        }
        let name = std::str::from_utf8(&raw)
            .ok()
            .map(signature::normalize_name)
            .filter(|n| {
                !n.is_empty() && n.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
            })
            .ok_or_else(|| BundleError::BadPath(display.clone()))?;
        if files.len() >= limits.max_files {
            return Err(BundleError::TooLarge("files"));
        }
        // Checked against the declared size before reading, so a bomb is
        // refused before it is inflated.
        let size = entry.header().size().map_err(corrupt)?;
        total = total.saturating_add(size);
        if total > limits.max_unpacked_bytes {
            return Err(BundleError::TooLarge("unpacked bytes"));
        }
        let mut bytes = Vec::new();
        entry.take(size).read_to_end(&mut bytes).map_err(corrupt)?;
        if files.insert(name, bytes).is_some() {
            return Err(BundleError::BadPath(display));
        }
    }
    Ok(files)
}

/// Packs files into a `.tar.gz` bundle (for `rampart` tooling and tests).
pub fn pack(files: &BTreeMap<String, Vec<u8>>) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    for (name, bytes) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        // Invariant: writing into memory cannot fail, and names come from
        // our own map (a name tar cannot encode is a caller's bug).
        tar.append_data(&mut h, name, bytes.as_slice())
            .expect("in-memory tar entry");
    }
    let gz = tar.into_inner().expect("in-memory tar");
    gz.finish().expect("in-memory gzip")
}

/// `.manifest`: the fields Rampart reads; others (`metadata`, `wasm`) do
/// not change what the bundle decides.
#[derive(Debug, Default, Deserialize)]
struct Manifest {
    #[serde(default)]
    revision: Option<String>,
    /// OPA writes 0 or 1.
    #[serde(default)]
    rego_version: Option<u8>,
    /// Per-file Rego versions, by bundle path (`/a/b.rego` or `a/b.rego`).
    #[serde(default)]
    file_rego_versions: BTreeMap<String, u8>,
    /// The data and package paths the bundle owns; absent means all.
    #[serde(default)]
    roots: Option<Vec<String>>,
}

impl Manifest {
    fn version(&self) -> RegoVersion {
        match self.rego_version {
            Some(0) => RegoVersion::V0,
            Some(_) | None => RegoVersion::V1,
        }
    }

    /// `file_rego_versions` keyed by normalized bundle path. OPA also takes
    /// glob patterns there; Rampart refuses them rather than guess.
    fn file_versions(&self) -> Result<BTreeMap<String, RegoVersion>, BundleError> {
        let mut out = BTreeMap::new();
        for (path, v) in &self.file_rego_versions {
            if path.contains(['*', '?', '[', '{']) {
                return Err(BundleError::BadFile {
                    file: ".manifest".into(),
                    message: format!(
                        "file_rego_versions: glob pattern {path:?} is not supported; name the files"
                    ),
                });
            }
            let version = match v {
                0 => RegoVersion::V0,
                1 => RegoVersion::V1,
                other => {
                    return Err(BundleError::BadFile {
                        file: ".manifest".into(),
                        message: format!(
                            "file_rego_versions {path:?}: version {other} is not 0 or 1"
                        ),
                    });
                }
            };
            out.insert(signature::normalize_name(path), version);
        }
        Ok(out)
    }

    /// The roots as slash-separated paths; `[""]` (everything) when absent.
    fn roots(&self) -> Vec<String> {
        match &self.roots {
            None => vec![String::new()],
            Some(r) => r.iter().map(|r| r.trim_matches('/').to_owned()).collect(),
        }
    }
}

/// Whether the slash-separated `path` lies under one of `roots`.
fn under_roots(path: &str, roots: &[String]) -> bool {
    roots
        .iter()
        .any(|r| r.is_empty() || path == r || path.starts_with(&format!("{r}/")))
}

/// OPA's rule for `.manifest` `roots`: every module's package and every
/// data document must lie under a root.
fn check_roots(
    tree: &BTreeMap<String, Vec<u8>>,
    manifest: &Manifest,
    versions: &BTreeMap<String, RegoVersion>,
) -> Result<(), BundleError> {
    let roots = manifest.roots();
    if roots.iter().any(String::is_empty) {
        return Ok(());
    }
    for (name, bytes) in tree {
        if name.ends_with(".rego") {
            let src = String::from_utf8_lossy(bytes);
            let version = versions.get(name).copied().unwrap_or(manifest.version());
            // A module that does not parse is reported by the compiler.
            let Some(package) = crate::rego::package_of(name, &src, version) else {
                continue;
            };
            let path = package.replace('.', "/");
            if !under_roots(&path, &roots) {
                return Err(BundleError::BadFile {
                    file: name.clone(),
                    message: format!(
                        "package {package} is outside the manifest's roots {:?}",
                        manifest.roots.clone().unwrap_or_default()
                    ),
                });
            }
        } else if let Some(dir) = data_dir(name) {
            let doc = data_document(name, bytes)?;
            check_data_roots(name, dir, &doc, &roots, manifest)?;
        }
    }
    Ok(())
}

fn check_data_roots(
    file: &str,
    path: &str,
    doc: &serde_json::Value,
    roots: &[String],
    manifest: &Manifest,
) -> Result<(), BundleError> {
    if under_roots(path, roots) {
        return Ok(());
    }
    // Above every root: only an object whose members lie under roots.
    let is_prefix = roots
        .iter()
        .any(|r| path.is_empty() || r.starts_with(&format!("{path}/")));
    match doc {
        serde_json::Value::Object(m) if is_prefix => {
            for (k, v) in m {
                let child = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}/{k}")
                };
                check_data_roots(file, &child, v, roots, manifest)?;
            }
            Ok(())
        }
        _ => Err(BundleError::BadFile {
            file: file.to_owned(),
            message: format!(
                "data at {:?} is outside the manifest's roots {:?}",
                path,
                manifest.roots.clone().unwrap_or_default()
            ),
        }),
    }
}

/// The directory of a data file (`a/b/data.json` -> `a/b`), `None` for
/// other files. OPA reads `data.json` and `data.yaml` (or `.yml`).
fn data_dir(name: &str) -> Option<&str> {
    for file in ["data.json", "data.yaml", "data.yml"] {
        if name == file {
            return Some("");
        }
        if let Some(dir) = name.strip_suffix(&format!("/{file}")) {
            return Some(dir);
        }
    }
    None
}

/// A data file's document, JSON or YAML by its name.
fn data_document(name: &str, bytes: &[u8]) -> Result<serde_json::Value, BundleError> {
    let bad = |message: String| BundleError::BadFile {
        file: name.to_owned(),
        message,
    };
    if name.ends_with(".json") {
        serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))
    } else {
        let v: serde_yaml::Value = serde_yaml::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        serde_json::to_value(v).map_err(|e| bad(e.to_string()))
    }
}

/// The synthetic data file of an implicit policy; a bundle that has a file
/// of this name is refused rather than have it replaced.
const IMPLICIT_DATA: &str = ".rampart/bundle-data.json";

/// The policy file of a bundle without policy files, and its merged data
/// tree (as a file to add to the tree).
#[allow(clippy::type_complexity)]
fn implicit_policy(
    tree: &BTreeMap<String, Vec<u8>>,
    manifest: &Manifest,
    query: &str,
) -> Result<(Vec<(PathBuf, String)>, String, Vec<u8>), BundleError> {
    let modules: Vec<&String> = tree.keys().filter(|n| n.ends_with(".rego")).collect();
    if modules.is_empty() {
        return Err(BundleError::Empty);
    }
    if tree.contains_key(IMPLICIT_DATA) {
        return Err(BundleError::BadPath(IMPLICIT_DATA.to_owned()));
    }
    let mut data = serde_json::Value::Object(serde_json::Map::new());
    for (name, bytes) in tree {
        let Some(dir) = data_dir(name) else {
            continue;
        };
        let doc = data_document(name, bytes)?;
        merge_at(&mut data, dir, doc).map_err(|message| BundleError::BadFile {
            file: name.clone(),
            message,
        })?;
    }
    let rego_version = match manifest.version() {
        RegoVersion::V0 => "v0",
        RegoVersion::V1 => "v1",
    };
    let policy = serde_json::json!({
        "policies": [{
            "name": "bundle",
            "kind": "rego",
            "modules": modules,
            "data_files": [IMPLICIT_DATA],
            "query": query,
            "rego_version": rego_version,
        }]
    });
    // Invariant: a JSON value of strings and arrays always serializes.
    let yaml = serde_yaml::to_string(&policy).expect("serializable policy");
    let data = serde_json::to_vec(&data).expect("serializable data");
    Ok((
        vec![(PathBuf::from("bundle.policy.yaml"), yaml)],
        IMPLICIT_DATA.to_owned(),
        data,
    ))
}

/// Merges `doc` into `root` at the slash-separated `path`. Two documents
/// that set the same leaf are an error (OPA refuses overlapping roots too).
fn merge_at(
    root: &mut serde_json::Value,
    path: &str,
    doc: serde_json::Value,
) -> Result<(), String> {
    let mut node = root;
    for seg in path.split('/').filter(|s| !s.is_empty()) {
        let map = node
            .as_object_mut()
            .ok_or_else(|| format!("data at {path:?} overlaps a non-object document"))?;
        node = map
            .entry(seg.to_owned())
            .or_insert_with(|| serde_json::Value::Object(serde_json::Map::new()));
    }
    merge(node, doc, path)
}

fn merge(into: &mut serde_json::Value, doc: serde_json::Value, path: &str) -> Result<(), String> {
    match (into, doc) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, v) in b {
                match a.get_mut(&k) {
                    Some(existing) => merge(existing, v, &format!("{path}/{k}"))?,
                    None => {
                        a.insert(k, v);
                    }
                }
            }
            Ok(())
        }
        (_, _) => Err(format!("two data documents set {path:?}")),
    }
}
