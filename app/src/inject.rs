//! `rampart inject`: adds Rampart to the pod templates of Kubernetes objects,
//! and `--uninject` takes it away again.
//!
//! This is the one mutation behind both `rampart inject` (files and stdin)
//! and `rampart webhook` (pods at admission): [`inject_pod`] and
//! [`uninject_pod`] work on a pod or pod template, [`mutate_object`] finds
//! the templates inside workload objects, [`mutate_documents`] handles
//! multi-document YAML. `docs/kubernetes.md` describes what is added and the
//! annotations that steer it.
//!
//! Injection first removes whatever an earlier injection added, so injecting
//! twice gives the same object, and changing an annotation then re-injecting
//! updates the pod. What injection changed in the user's own fields (a
//! created `initContainers` list, a raised grace period) is recorded in the
//! `rampart.io/status` annotation, so that `--uninject` restores the object
//! exactly. Keys keep their order (`serde_yaml::Mapping` is ordered); YAML
//! comments and formatting are not kept.

use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};
use serde_yaml::{Mapping, Value};

/// `enabled` (default for `rampart inject`) or `disabled`.
pub const ANN_INJECT: &str = "rampart.io/inject";
/// ConfigMap holding the sidecar's `config.yaml`.
pub const ANN_CONFIG: &str = "rampart.io/config";
/// The app ports the sidecar serves; other declared container ports bypass it.
pub const ANN_INBOUND_PORTS: &str = "rampart.io/inbound-ports";
/// Inbound ports that bypass the sidecar.
pub const ANN_EXCLUDE_INBOUND_PORTS: &str = "rampart.io/exclude-inbound-ports";
/// Outbound ports that bypass the sidecar.
pub const ANN_EXCLUDE_OUTBOUND_PORTS: &str = "rampart.io/exclude-outbound-ports";
/// Outbound networks that bypass the sidecar.
pub const ANN_EXCLUDE_OUTBOUND_CIDRS: &str = "rampart.io/exclude-outbound-cidrs";
/// Ports whose traffic is opaque TCP (no protocol detection).
pub const ANN_OPAQUE_PORTS: &str = "rampart.io/opaque-ports";
/// The inbound policy: `configmap:NAME`, or the policy file's YAML itself.
pub const ANN_POLICY: &str = "rampart.io/policy";
/// Written by injection: what it changed, for `--uninject`.
pub const ANN_STATUS: &str = "rampart.io/status";
/// The default sidecar configuration, written by the injector into pods
/// that name no ConfigMap, and mounted from there (downward API).
pub const ANN_SIDECAR_CONFIG: &str = "rampart.io/sidecar-config";

/// Name of the init container that installs the iptables rules.
pub const INIT_CONTAINER: &str = "rampart-init";
/// Name of the sidecar container.
pub const PROXY_CONTAINER: &str = "rampart-proxy";
/// Every volume injection adds starts with this.
const VOLUME_PREFIX: &str = "rampart-";

/// Where the sidecar finds its configuration file.
pub const CONFIG_PATH: &str = "/etc/rampart/config/config.yaml";
/// Where the policy is mounted: `inbound.policies` names `policy.yaml` in it.
pub const POLICY_DIR: &str = "/etc/rampart/policy";
/// Where the SPIRE agent's socket directory is mounted.
pub const SOCKET_DIR: &str = "/run/spire/sockets";

/// Added to injected pods unless present: the annotations Prometheus's
/// `kubernetes_sd_configs` examples (and most charts) scrape by.
const SCRAPE_ANNOTATIONS: [(&str, &str); 3] = [
    ("prometheus.io/scrape", "true"),
    ("prometheus.io/port", "15000"),
    ("prometheus.io/path", "/metrics"),
];

// The sidecar's ports, as `rampart init` and docs/config.md default them.
const OUTBOUND_PORT: u16 = 15001;
const INBOUND_PORT: u16 = 15006;
const ADMIN_PORT: u16 = 15000;

/// Kinds whose pod template is at `spec.template`.
const TEMPLATE_KINDS: [&str; 6] = [
    "Deployment",
    "StatefulSet",
    "DaemonSet",
    "ReplicaSet",
    "ReplicationController",
    "Job",
];

/// How the SPIRE agent's Workload API socket reaches the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SocketSource {
    /// The SPIFFE CSI driver (`csi.spiffe.io`): no hostPath volume in the
    /// application's pods.
    Csi,
    /// A hostPath volume of the agent's socket directory.
    HostPath,
}

/// What injection adds; shared by `rampart inject` and `rampart webhook`.
#[derive(Debug, Clone, Args)]
pub struct InjectOptions {
    /// Image of the init container and the sidecar.
    #[arg(long, default_value = concat!("rampart:", env!("CARGO_PKG_VERSION")))]
    pub image: String,
    /// ConfigMap holding the sidecar's `config.yaml` for pods without the
    /// `rampart.io/config` annotation. Without it, such pods get the
    /// built-in default configuration (see `--mesh-cidrs`).
    #[arg(long)]
    pub config_map: Option<String>,
    /// With the default configuration: the destinations in the mesh (the
    /// cluster's pod and service networks), comma-separated; others are
    /// passed through in plaintext. Empty: every destination is in the mesh.
    #[arg(long, value_name = "CIDRS", default_value = "", value_parser = checked_cidrs)]
    pub mesh_cidrs: String,
    /// With the default configuration: destinations inside the mesh CIDRs
    /// that are not meshed (the API server's service address, ...).
    #[arg(long, value_name = "CIDRS", default_value = "", value_parser = checked_cidrs)]
    pub passthrough_cidrs: String,
    /// How the SPIRE agent socket is mounted.
    #[arg(long, value_enum, default_value = "csi")]
    pub spire_socket: SocketSource,
    /// Host directory of the agent socket, with `--spire-socket host-path`.
    #[arg(long, default_value = SOCKET_DIR)]
    pub spire_socket_host_dir: String,
    /// The sidecar's UID (never captured by the iptables rules).
    #[arg(long, default_value_t = 2102)]
    pub proxy_uid: u32,
    /// Lowest terminationGracePeriodSeconds of an injected pod: time for the
    /// app to stop and then for the sidecar to drain (`limits.drain_timeout`).
    #[arg(long, default_value_t = 45)]
    pub grace_period: u32,
}

impl Default for InjectOptions {
    fn default() -> Self {
        InjectOptions {
            image: concat!("rampart:", env!("CARGO_PKG_VERSION")).to_string(),
            config_map: None,
            mesh_cidrs: String::new(),
            passthrough_cidrs: String::new(),
            spire_socket: SocketSource::Csi,
            spire_socket_host_dir: SOCKET_DIR.to_string(),
            proxy_uid: 2102,
            grace_period: 45,
        }
    }
}

/// A comma-separated CIDR list from the command line, checked.
fn checked_cidrs(text: &str) -> Result<String, String> {
    crate::init::parse_cidrs(text).map(|c| {
        c.0.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    })
}

/// Inject, or take an injection away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Add (or refresh) Rampart.
    Inject,
    /// Remove what an injection added and restore what it changed.
    Uninject,
}

/// Why an object could not be mutated. The input is at fault.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    /// The input is not YAML.
    #[error("not valid YAML: {0}")]
    Yaml(#[from] serde_yaml::Error),
    /// An annotation has a value we cannot use.
    #[error("{object}: annotation {annotation}: {reason}")]
    BadAnnotation {
        /// `Kind/name` of the object.
        object: String,
        /// The annotation.
        annotation: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The pod already has (or asks for) another mesh's sidecar.
    #[error(
        "{object}: already meshed by {} ({}); a pod runs one mesh's sidecar: remove {}'s, or annotate the pod `rampart.io/inject: disabled`",
        found.mesh, found.evidence, found.mesh
    )]
    OtherMesh {
        /// `Kind/name` of the object.
        object: String,
        /// What shows the other mesh.
        found: crate::other_mesh::OtherMesh,
    },
    /// A field has the wrong type (e.g. `containers` is not a list).
    #[error("{object}: field `{field}` is not {expected}")]
    BadField {
        /// `Kind/name` of the object.
        object: String,
        /// The field's path.
        field: String,
        /// What it should be.
        expected: &'static str,
    },
}

/// Mutates every document of a multi-document YAML stream; documents that
/// are not workloads pass through unchanged.
pub fn mutate_documents(
    input: &str,
    opts: &InjectOptions,
    mode: Mode,
) -> Result<String, InjectError> {
    let mut out = String::new();
    for document in serde_yaml::Deserializer::from_str(input) {
        let mut value = Value::deserialize(document)?;
        if value.is_null() {
            continue; // An empty document (`---` at the start or end).
        }
        mutate_object(&mut value, opts, mode)?;
        if !out.is_empty() {
            out.push_str("---\n");
        }
        out.push_str(&quote_yaml11_scalars(&serde_yaml::to_string(&value)?));
    }
    Ok(out)
}

/// Quotes the plain scalars that YAML 1.2 (serde_yaml) reads as strings but
/// YAML 1.1 readers (kubectl's go-yaml, PyYAML) read as something else:
/// `off` or `yes` would become booleans, `1_000` a number. serde_yaml only
/// writes them unquoted when they are strings, so quoting them keeps the
/// value. The text is serde_yaml's own output: block scalars (`|`) are
/// copied as they are; keys and values are otherwise `key: value`,
/// `- value` or `- key: value` on one line.
pub fn quote_yaml11_scalars(yaml: &str) -> String {
    let mut out = String::with_capacity(yaml.len());
    // Inside a block scalar, the column its content must be indented past.
    let mut block_parent: Option<usize> = None;
    for line in yaml.split_inclusive('\n') {
        let body = line.trim_end_matches('\n');
        let indent = body.len() - body.trim_start().len();
        if let Some(parent) = block_parent {
            if body.trim().is_empty() || indent > parent {
                out.push_str(line);
                continue;
            }
            block_parent = None;
        }
        let mut col = indent;
        while body[col..].starts_with("- ") {
            col += 2;
        }
        let rest = &body[col..];
        let (key, value) = split_key(rest);
        let value_is_block = value.starts_with(['|', '>'])
            && value[1..]
                .bytes()
                .all(|b| b.is_ascii_digit() || b == b'-' || b == b'+');
        if value_is_block {
            // The content of `- |` is indented past the dash; of `key: |`, past the key.
            block_parent = Some(if key.is_some() {
                col
            } else {
                col.saturating_sub(2)
            });
        }
        out.push_str(&body[..col]);
        if let Some(key) = key {
            out.push_str(&quote_if_ambiguous(key));
            out.push(':');
            if !value.is_empty() {
                out.push(' ');
            }
        }
        out.push_str(&quote_if_ambiguous(value));
        out.push_str(&line[body.len()..]);
    }
    out
}

/// Splits `key: value`, `key:` or `value`, where the key may be quoted
/// (`'it''s'`, `"a\"b"`); a quoted key is returned with its quotes.
fn split_key(rest: &str) -> (Option<&str>, &str) {
    let key_end = match rest.as_bytes().first() {
        Some(b'\'') => {
            let mut i = 1;
            loop {
                match rest.as_bytes().get(i) {
                    None => return (None, rest),
                    Some(b'\'') if rest.as_bytes().get(i + 1) == Some(&b'\'') => i += 2,
                    Some(b'\'') => break i + 1,
                    Some(_) => i += 1,
                }
            }
        }
        Some(b'"') => {
            let mut i = 1;
            loop {
                match rest.as_bytes().get(i) {
                    None => return (None, rest),
                    Some(b'\\') => i += 2,
                    Some(b'"') => break i + 1,
                    Some(_) => i += 1,
                }
            }
        }
        // serde_yaml quotes plain scalars that hold ": " or end with ':'.
        _ => match rest.find(": ") {
            Some(at) => at,
            None if rest.ends_with(':') => rest.len() - 1,
            None => return (None, rest),
        },
    };
    match rest.get(key_end..) {
        Some(":") => (Some(&rest[..key_end]), ""),
        Some(after) if after.starts_with(": ") => (Some(&rest[..key_end]), &rest[key_end + 2..]),
        _ => (None, rest),
    }
}

fn quote_if_ambiguous(scalar: &str) -> std::borrow::Cow<'_, str> {
    // `true` and `false` are not here: serde_yaml quotes those strings itself.
    const BOOLEANS_1_1: [&str; 16] = [
        "y", "Y", "yes", "Yes", "YES", "n", "N", "no", "No", "NO", "on", "On", "ON", "off", "Off",
        "OFF",
    ];
    // YAML 1.1 integers and floats may hold `_`, and base-60 ones `:`.
    let number_1_1 = scalar.starts_with(|c: char| c.is_ascii_digit() || c == '-' || c == '+')
        && scalar.contains(['_', ':'])
        && scalar
            .bytes()
            .all(|b| b.is_ascii_digit() || b"_:.+-".contains(&b));
    if BOOLEANS_1_1.contains(&scalar) || scalar == "=" || number_1_1 || timestamp_1_1(scalar) {
        std::borrow::Cow::Owned(format!("'{scalar}'"))
    } else {
        std::borrow::Cow::Borrowed(scalar)
    }
}

/// Whether a YAML 1.1 reader (go-yaml, which kubectl uses) would read the
/// plain scalar as a timestamp (yaml.org/type/timestamp: `2001-12-14`,
/// `2001-12-14t21:59:43.10-05:00`, ...); `2024-01-01` would come back as
/// `2024-01-01T00:00:00Z`. Anything that starts like one is quoted: quoting
/// a string never changes it.
fn timestamp_1_1(scalar: &str) -> bool {
    let b = scalar.as_bytes();
    b.len() >= 8
        && b[..4].iter().all(u8::is_ascii_digit)
        && b[4] == b'-'
        && b[5].is_ascii_digit()
        && b[5..]
            .iter()
            .all(|c| c.is_ascii_digit() || b"-:.tTzZ +".contains(c))
}

/// Mutates one Kubernetes object: a Pod, a workload with a pod template, or
/// a `List` of them. Returns whether the object holds a pod template.
pub fn mutate_object(
    object: &mut Value,
    opts: &InjectOptions,
    mode: Mode,
) -> Result<bool, InjectError> {
    let kind = object
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let name = object_name(object, &kind);
    if kind == "List" || kind.ends_with("List") {
        let mut found = false;
        if let Some(Value::Sequence(items)) = object.get_mut("items") {
            for item in items {
                found |= mutate_object(item, opts, mode)?;
            }
        }
        return Ok(found);
    }
    let template = if kind == "Pod" {
        Some(object)
    } else if TEMPLATE_KINDS.contains(&kind.as_str()) {
        object.get_mut("spec").and_then(|s| s.get_mut("template"))
    } else if kind == "CronJob" {
        object
            .get_mut("spec")
            .and_then(|s| s.get_mut("jobTemplate"))
            .and_then(|j| j.get_mut("spec"))
            .and_then(|s| s.get_mut("template"))
    } else {
        None
    };
    let Some(template) = template else {
        return Ok(false);
    };
    let Value::Mapping(template) = template else {
        return Err(bad_field(&name, "pod template", "a mapping"));
    };
    match mode {
        Mode::Inject => inject_pod(template, opts, &name)?,
        Mode::Uninject => uninject_pod(template, &name)?,
    }
    Ok(true)
}

/// Adds Rampart to a pod or pod template (a mapping with `metadata` and
/// `spec`), after removing an earlier injection. A pod annotated
/// `rampart.io/inject: disabled`, or on the host's network, is only
/// uninjected.
pub fn inject_pod(
    pod: &mut Mapping,
    opts: &InjectOptions,
    object: &str,
) -> Result<(), InjectError> {
    uninject_pod(pod, object)?;
    let settings = Settings::from_pod(pod, opts, object)?;
    // A hostNetwork pod shares the node's network namespace: the init
    // container's rules would capture the whole node's traffic.
    let host_network = pod
        .get("spec")
        .and_then(|s| s.get("hostNetwork"))
        .and_then(Value::as_bool);
    if !settings.enabled || host_network == Some(true) {
        return Ok(());
    }
    if let Some(found) = crate::other_mesh::find(pod) {
        return Err(InjectError::OtherMesh {
            object: object.to_string(),
            found,
        });
    }
    let mut status = Status::default();

    let metadata = child_mapping(pod, "metadata", object, &mut status.created)?;
    let annotations = child_mapping(metadata, "annotations", object, &mut status.created)?;
    // Filled in below, once everything it records is known; inserting it now
    // keeps the annotation in a stable place.
    annotations.insert(s(ANN_STATUS), s(""));
    if settings.config_map.is_none() {
        annotations.insert(s(ANN_SIDECAR_CONFIG), s(&settings.default_config(opts)));
    }
    // Prometheus's usual pod annotations, pointing at the sidecar's
    // metrics; an app's own (for its metrics) are left as they are.
    for (key, value) in SCRAPE_ANNOTATIONS {
        if !annotations.contains_key(key) {
            annotations.insert(s(key), s(value));
            status.annotations.push(key.to_string());
        }
    }

    let spec = child_mapping(pod, "spec", object, &mut status.created)?;
    let app_probes =
        crate::probes::rewrite(spec, ADMIN_PORT, &settings.exclude_inbound_ports, object)?;
    // Our init container runs first, so that every later container's traffic
    // is captured, and the sidecar (a native sidecar: an init container with
    // `restartPolicy: Always`) starts before later init containers and the
    // app, and stops after them, which lets its drain finish.
    let token = service_account_mount(spec);
    let init = child_sequence(spec, "initContainers", object, &mut status.created)?;
    init.insert(0, settings.proxy_container(opts, app_probes, token));
    init.insert(0, settings.init_container(opts));
    let volumes = child_sequence(spec, "volumes", object, &mut status.created)?;
    volumes.extend(settings.volumes(opts));

    let grace_key = s("terminationGracePeriodSeconds");
    match spec.get(&grace_key).and_then(Value::as_u64) {
        None => {
            spec.insert(grace_key, Value::from(opts.grace_period));
            status
                .created
                .push("terminationGracePeriodSeconds".to_string());
        }
        Some(old) if old < u64::from(opts.grace_period) => {
            spec.insert(grace_key, Value::from(opts.grace_period));
            status.termination_grace_period_seconds = Some(old);
        }
        Some(_) => {}
    }

    let status =
        serde_json::to_string(&status).expect("a struct of strings and numbers serializes");
    let metadata = pod.get_mut("metadata").and_then(Value::as_mapping_mut);
    let annotations = metadata
        .and_then(|m| m.get_mut("annotations"))
        .and_then(Value::as_mapping_mut);
    // Both were created or checked above.
    if let Some(annotations) = annotations {
        annotations.insert(s(ANN_STATUS), s(&status));
    }
    Ok(())
}

/// Removes what [`inject_pod`] added and restores what it changed. A pod
/// that was never injected is left as it is.
pub fn uninject_pod(pod: &mut Mapping, object: &str) -> Result<(), InjectError> {
    let status_text = pod
        .get("metadata")
        .and_then(|m| m.get("annotations"))
        .and_then(|a| a.get(ANN_STATUS))
        .and_then(Value::as_str);
    let status: Status = match status_text {
        Some(text) => serde_json::from_str(text).map_err(|e| InjectError::BadAnnotation {
            object: object.to_string(),
            annotation: ANN_STATUS,
            reason: format!("cannot read what an earlier injection changed: {e}"),
        })?,
        None => Status::default(),
    };
    let created = |key: &str| status.created.iter().any(|c| c == key);

    if let Some(Value::Mapping(spec)) = pod.get_mut("spec") {
        if let Some(probes) = app_probes_of(spec) {
            crate::probes::restore(spec, &probes, object)?;
        }
        for list in ["initContainers", "containers"] {
            if let Some(Value::Sequence(containers)) = spec.get_mut(list) {
                containers
                    .retain(|c| !matches!(name_of(c), Some(INIT_CONTAINER | PROXY_CONTAINER)));
            }
        }
        if let Some(Value::Sequence(volumes)) = spec.get_mut("volumes") {
            volumes.retain(|v| !name_of(v).is_some_and(|n| n.starts_with(VOLUME_PREFIX)));
        }
        for list in ["initContainers", "volumes"] {
            let empty = matches!(spec.get(list), Some(Value::Sequence(seq)) if seq.is_empty());
            if created(list) && empty {
                spec.shift_remove(list);
            }
        }
        if created("terminationGracePeriodSeconds") {
            spec.shift_remove("terminationGracePeriodSeconds");
        } else if let Some(old) = status.termination_grace_period_seconds {
            spec.insert(s("terminationGracePeriodSeconds"), Value::from(old));
        }
    }
    if let Some(Value::Mapping(metadata)) = pod.get_mut("metadata") {
        if let Some(Value::Mapping(annotations)) = metadata.get_mut("annotations") {
            annotations.shift_remove(ANN_STATUS);
            annotations.shift_remove(ANN_SIDECAR_CONFIG);
            for key in &status.annotations {
                annotations.shift_remove(key.as_str());
            }
            if created("annotations") && annotations.is_empty() {
                metadata.shift_remove("annotations");
            }
        }
        if created("metadata") && metadata.is_empty() {
            pod.shift_remove("metadata");
        }
    }
    if created("spec") && matches!(pod.get("spec"), Some(Value::Mapping(m)) if m.is_empty()) {
        pod.shift_remove("spec");
    }
    Ok(())
}

/// The `RAMPART_APP_PROBES` value of an injected sidecar, if any.
fn app_probes_of(spec: &Mapping) -> Option<String> {
    let init = spec.get("initContainers").and_then(Value::as_sequence)?;
    let proxy = init.iter().find(|c| name_of(c) == Some(PROXY_CONTAINER))?;
    let env = proxy.get("env").and_then(Value::as_sequence)?;
    env.iter()
        .find(|e| name_of(e) == Some(crate::probes::ENV_APP_PROBES))
        .and_then(|e| e.get("value"))
        .and_then(Value::as_str)
        .map(str::to_string)
}

/// What an injection changed in the user's fields; the `rampart.io/status`
/// annotation, as JSON.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Status {
    /// Fields that did not exist before injection.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    created: Vec<String>,
    /// The grace period before injection raised it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    termination_grace_period_seconds: Option<u64>,
    /// Annotations injection added.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    annotations: Vec<String>,
}

/// Where the policy comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PolicySource {
    /// A ConfigMap with a `policy.yaml` key.
    ConfigMap(String),
    /// The `rampart.io/policy` annotation itself, through the downward API.
    Annotation,
}

/// One pod's injection settings: the options plus its annotations.
#[derive(Debug)]
struct Settings {
    enabled: bool,
    /// The ConfigMap with the sidecar's configuration; None: the default.
    config_map: Option<String>,
    exclude_inbound_ports: Vec<u16>,
    exclude_outbound_ports: Vec<u16>,
    exclude_outbound_cidrs: Vec<String>,
    policy: Option<PolicySource>,
}

impl Settings {
    fn from_pod(
        pod: &Mapping,
        opts: &InjectOptions,
        object: &str,
    ) -> Result<Settings, InjectError> {
        let annotations = pod
            .get("metadata")
            .and_then(|m| m.get("annotations"))
            .and_then(Value::as_mapping);
        let get = |key: &str| annotations.and_then(|a| a.get(key)).and_then(Value::as_str);
        let bad = |annotation: &'static str, reason: String| InjectError::BadAnnotation {
            object: object.to_string(),
            annotation,
            reason,
        };
        let ports = |annotation: &'static str| -> Result<Vec<u16>, InjectError> {
            crate::init::parse_ports(get(annotation).unwrap_or(""))
                .map(|p| p.0)
                .map_err(|reason| bad(annotation, reason))
        };

        let enabled = match get(ANN_INJECT).map(str::trim) {
            None | Some("enabled" | "true") => true,
            Some("disabled" | "false") => false,
            Some(other) => {
                return Err(bad(
                    ANN_INJECT,
                    format!("'{other}' is neither 'enabled' nor 'disabled'"),
                ));
            }
        };
        let config_map = match get(ANN_CONFIG).map(str::trim) {
            None => opts.config_map.clone(),
            Some(name) if is_dns_label(name) => Some(name.to_string()),
            Some(name) => return Err(bad(ANN_CONFIG, format!("'{name}' is not a ConfigMap name"))),
        };

        let mut exclude_inbound_ports = ports(ANN_EXCLUDE_INBOUND_PORTS)?;
        if let Some(text) = get(ANN_INBOUND_PORTS) {
            // iptables captures every inbound port but the excluded ones, so
            // "only these ports" becomes "exclude the other declared ports".
            let served = ports(ANN_INBOUND_PORTS)?;
            if text.trim().is_empty() {
                return Err(bad(
                    ANN_INBOUND_PORTS,
                    "empty: list at least one port".to_string(),
                ));
            }
            for port in declared_ports(pod) {
                if !served.contains(&port) && !exclude_inbound_ports.contains(&port) {
                    exclude_inbound_ports.push(port);
                }
            }
        }
        let cidr_text = get(ANN_EXCLUDE_OUTBOUND_CIDRS).unwrap_or("");
        let exclude_outbound_cidrs = crate::init::parse_cidrs(cidr_text)
            .map_err(|reason| bad(ANN_EXCLUDE_OUTBOUND_CIDRS, reason))?
            .0
            .iter()
            .map(ToString::to_string)
            .collect();
        // The sidecar reads opaque ports from the pod's annotations (mounted
        // at /etc/rampart/podinfo); a typo must still fail here.
        ports(ANN_OPAQUE_PORTS)?;
        let policy = match get(ANN_POLICY) {
            None => None,
            Some(text) => match text.trim().strip_prefix("configmap:") {
                Some(name) if is_dns_label(name.trim()) => {
                    Some(PolicySource::ConfigMap(name.trim().to_string()))
                }
                Some(name) => {
                    return Err(bad(ANN_POLICY, format!("'{name}' is not a ConfigMap name")));
                }
                None => {
                    // Checked here so that a typo fails at deploy time, not
                    // as a sidecar that never becomes ready.
                    let parsed: Value = serde_yaml::from_str(text)
                        .map_err(|e| bad(ANN_POLICY, format!("not YAML: {e}")))?;
                    if parsed.get("policies").is_none() {
                        let reason =
                            "neither `configmap:NAME` nor a policy file (`policies: [...]`)";
                        return Err(bad(ANN_POLICY, reason.to_string()));
                    }
                    Some(PolicySource::Annotation)
                }
            },
        };
        Ok(Settings {
            enabled,
            config_map,
            exclude_inbound_ports,
            exclude_outbound_ports: ports(ANN_EXCLUDE_OUTBOUND_PORTS)?,
            exclude_outbound_cidrs,
            policy,
        })
    }

    /// The sidecar configuration of a pod that names no ConfigMap: its SVID
    /// from the SPIRE agent (whose entry names it after its service
    /// account), every captured inbound port mTLS-only, open to any peer of
    /// the trust domain unless a `rampart.io/policy` says otherwise, and
    /// outbound mTLS to any server of the trust domain, as Istio's and
    /// Linkerd's defaults.
    fn default_config(&self, opts: &InjectOptions) -> String {
        let list = |cidrs: &str| {
            cidrs
                .split(',')
                .filter(|c| !c.is_empty())
                .map(|c| format!("\"{c}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut text = format!(
            "# Written by the Rampart injector: the default configuration of a pod\n\
             # without the {ANN_CONFIG} annotation (docs/kubernetes.md).\n\
             identity:\n  workload_api:\n    socket: \"unix://{SOCKET_DIR}/agent.sock\"\n\
             admin:\n  address: \"0.0.0.0:{ADMIN_PORT}\"\n\
             transparent: {{}}\n\
             inbound:\n  default_action: allow_any_authenticated\n"
        );
        if self.policy.is_some() {
            text += &format!("  policies: [\"{POLICY_DIR}/policy.yaml\"]\n");
        }
        text += "outbound:\n  unknown_server: any_in_trust_domain\n  passthrough_ports: [53]\n";
        if !opts.mesh_cidrs.is_empty() {
            text += &format!("  mesh_cidrs: [{}]\n", list(&opts.mesh_cidrs));
        }
        if !opts.passthrough_cidrs.is_empty() {
            text += &format!("  passthrough_cidrs: [{}]\n", list(&opts.passthrough_cidrs));
        }
        text
    }

    fn init_container(&self, opts: &InjectOptions) -> Value {
        let mut args = vec![
            s("init"),
            s(&format!("--inbound-port={INBOUND_PORT}")),
            s(&format!("--outbound-port={OUTBOUND_PORT}")),
            s(&format!("--admin-port={ADMIN_PORT}")),
            s(&format!("--proxy-uid={}", opts.proxy_uid)),
        ];
        let lists = [
            ("--exclude-inbound-ports", join(&self.exclude_inbound_ports)),
            (
                "--exclude-outbound-ports",
                join(&self.exclude_outbound_ports),
            ),
            (
                "--exclude-outbound-cidrs",
                self.exclude_outbound_cidrs.join(","),
            ),
        ];
        for (flag, value) in lists {
            if !value.is_empty() {
                args.push(s(&format!("{flag}={value}")));
            }
        }
        map([
            ("name", s(INIT_CONTAINER)),
            ("image", s(&opts.image)),
            ("imagePullPolicy", s("IfNotPresent")),
            ("args", Value::Sequence(args)),
            ("resources", resources("10m", "16Mi", "64Mi")),
            (
                "securityContext",
                map([
                    ("runAsUser", Value::from(0)),
                    ("runAsGroup", Value::from(0)),
                    ("runAsNonRoot", Value::from(false)),
                    ("allowPrivilegeEscalation", Value::from(false)),
                    // Checked by tests/pods/container.rs: iptables-restore needs no writable root.
                    ("readOnlyRootFilesystem", Value::from(true)),
                    (
                        "capabilities",
                        map([
                            ("add", Value::Sequence(vec![s("NET_ADMIN"), s("NET_RAW")])),
                            ("drop", Value::Sequence(vec![s("ALL")])),
                        ]),
                    ),
                ]),
            ),
        ])
    }

    fn proxy_container(
        &self,
        opts: &InjectOptions,
        app_probes: Option<String>,
        token: Option<Value>,
    ) -> Value {
        let probe = |path: &str, period: u64, failures: u64| {
            map([
                (
                    "httpGet",
                    map([("path", s(path)), ("port", Value::from(ADMIN_PORT))]),
                ),
                ("periodSeconds", Value::from(period)),
                ("failureThreshold", Value::from(failures)),
            ])
        };
        let mount = |name: &str, path: &str| {
            map([
                ("name", s(name)),
                ("mountPath", s(path)),
                ("readOnly", Value::from(true)),
            ])
        };
        let mut mounts = vec![
            mount("rampart-config", "/etc/rampart/config"),
            mount("rampart-spire-agent-socket", SOCKET_DIR),
            mount("rampart-podinfo", "/etc/rampart/podinfo"),
        ];
        if self.policy.is_some() {
            mounts.push(mount("rampart-policy", POLICY_DIR));
        }
        // The Kubernetes discovery source's in-cluster credentials.
        mounts.extend(token);
        let mut container = map([
            ("name", s(PROXY_CONTAINER)),
            ("image", s(&opts.image)),
            ("imagePullPolicy", s("IfNotPresent")),
            (
                "args",
                Value::Sequence(vec![s("run"), s("--config"), s(CONFIG_PATH)]),
            ),
            // A native sidecar (Kubernetes 1.29 and later).
            ("restartPolicy", s("Always")),
            (
                "ports",
                Value::Sequence(vec![map([
                    ("name", s("rampart-admin")),
                    ("containerPort", Value::from(ADMIN_PORT)),
                    ("protocol", s("TCP")),
                ])]),
            ),
            // The app starts only once the sidecar has its SVID and listens.
            ("startupProbe", probe("/ready", 1, 120)),
            ("readinessProbe", probe("/ready", 5, 3)),
            ("livenessProbe", probe("/live", 10, 3)),
            ("resources", resources("50m", "32Mi", "256Mi")),
            (
                "securityContext",
                map([
                    ("runAsUser", Value::from(opts.proxy_uid)),
                    ("runAsGroup", Value::from(opts.proxy_uid)),
                    ("runAsNonRoot", Value::from(true)),
                    ("allowPrivilegeEscalation", Value::from(false)),
                    ("readOnlyRootFilesystem", Value::from(true)),
                    (
                        "capabilities",
                        map([("drop", Value::Sequence(vec![s("ALL")]))]),
                    ),
                    ("seccompProfile", map([("type", s("RuntimeDefault"))])),
                ]),
            ),
            ("volumeMounts", Value::Sequence(mounts)),
        ]);
        if let (Some(probes), Value::Mapping(c)) = (app_probes, &mut container) {
            // The app's original probes, which the admin server runs.
            let env = map([
                ("name", s(crate::probes::ENV_APP_PROBES)),
                ("value", s(&probes)),
            ]);
            c.insert(s("env"), Value::Sequence(vec![env]));
        }
        container
    }

    fn volumes(&self, opts: &InjectOptions) -> Vec<Value> {
        let socket = match opts.spire_socket {
            SocketSource::Csi => (
                "csi",
                map([
                    ("driver", s("csi.spiffe.io")),
                    ("readOnly", Value::from(true)),
                ]),
            ),
            SocketSource::HostPath => (
                "hostPath",
                map([
                    ("path", s(&opts.spire_socket_host_dir)),
                    ("type", s("Directory")),
                ]),
            ),
        };
        let field = |path: &str, field_path: &str| {
            map([
                ("path", s(path)),
                ("fieldRef", map([("fieldPath", s(field_path))])),
            ])
        };
        let config = match &self.config_map {
            Some(name) => ("configMap", map([("name", s(name))])),
            None => (
                "downwardAPI",
                map([(
                    "items",
                    Value::Sequence(vec![field(
                        "config.yaml",
                        &format!("metadata.annotations['{ANN_SIDECAR_CONFIG}']"),
                    )]),
                )]),
            ),
        };
        let mut volumes = vec![
            map([("name", s("rampart-config")), config]),
            map([("name", s("rampart-spire-agent-socket")), socket]),
            map([
                ("name", s("rampart-podinfo")),
                (
                    "downwardAPI",
                    map([(
                        "items",
                        Value::Sequence(vec![
                            field("labels", "metadata.labels"),
                            field("annotations", "metadata.annotations"),
                        ]),
                    )]),
                ),
            ]),
        ];
        match &self.policy {
            None => {}
            Some(PolicySource::ConfigMap(name)) => volumes.push(map([
                ("name", s("rampart-policy")),
                ("configMap", map([("name", s(name))])),
            ])),
            Some(PolicySource::Annotation) => volumes.push(map([
                ("name", s("rampart-policy")),
                (
                    "downwardAPI",
                    map([(
                        "items",
                        Value::Sequence(vec![field(
                            "policy.yaml",
                            "metadata.annotations['rampart.io/policy']",
                        )]),
                    )]),
                ),
            ])),
        }
        volumes
    }
}

/// Where the ServiceAccount admission plugin mounts a pod's API token.
pub const SERVICE_ACCOUNT_DIR: &str = rampart_discovery::kubernetes::SERVICE_ACCOUNT_DIR;

/// The app containers' mount of the pod's service-account token, for the
/// sidecar. At admission the ServiceAccount plugin runs before the
/// webhooks: it has added the projected `kube-api-access-*` volume and
/// mounted it into every container present then, but not into the sidecar
/// the webhook adds (only a reinvocation of the plugin would). Without
/// such a mount (a template from `rampart inject`, where the plugin runs
/// later and mounts it into every container, the sidecar too; or
/// `automountServiceAccountToken: false`, where nothing is mounted and the
/// sidecar's in-cluster discovery fails at start with the reason) there is
/// nothing to copy.
fn service_account_mount(spec: &Mapping) -> Option<Value> {
    spec.get("containers")?
        .as_sequence()?
        .iter()
        .filter_map(|c| c.get("volumeMounts")?.as_sequence())
        .flatten()
        .find(|m| {
            m.get("mountPath")
                .and_then(Value::as_str)
                .is_some_and(|p| p.trim_end_matches('/') == SERVICE_ACCOUNT_DIR)
        })
        .map(|m| {
            let mut m = m.clone();
            if let Value::Mapping(fields) = &mut m {
                // The sidecar reads it only.
                fields.insert(s("readOnly"), Value::from(true));
            }
            m
        })
}

/// `Kind/name` for messages (`Pod/<generateName>` for pods not yet named).
fn object_name(object: &Value, kind: &str) -> String {
    let metadata = object.get("metadata");
    let name = metadata
        .and_then(|m| m.get("name"))
        .or_else(|| metadata.and_then(|m| m.get("generateName")))
        .and_then(Value::as_str)
        .unwrap_or("<unnamed>");
    format!(
        "{}/{name}",
        if kind.is_empty() { "<no kind>" } else { kind }
    )
}

/// The container ports the pod's own containers declare.
fn declared_ports(pod: &Mapping) -> Vec<u16> {
    let mut ports = vec![];
    let containers = pod
        .get("spec")
        .and_then(|s| s.get("containers"))
        .and_then(Value::as_sequence);
    for container in containers.into_iter().flatten() {
        let declared = container.get("ports").and_then(Value::as_sequence);
        for port in declared.into_iter().flatten() {
            let number = port.get("containerPort").and_then(Value::as_u64);
            if let Some(number) = number.and_then(|n| u16::try_from(n).ok()) {
                if !ports.contains(&number) {
                    ports.push(number);
                }
            }
        }
    }
    ports
}

/// The mapping at `key`, created (and recorded in `created`) when absent.
fn child_mapping<'a>(
    parent: &'a mut Mapping,
    key: &str,
    object: &str,
    created: &mut Vec<String>,
) -> Result<&'a mut Mapping, InjectError> {
    let absent = matches!(parent.get(key), None | Some(Value::Null));
    if absent {
        parent.insert(s(key), Value::Mapping(Mapping::new()));
        created.push(key.to_string());
    }
    match parent.get_mut(key) {
        Some(Value::Mapping(m)) => Ok(m),
        _ => Err(bad_field(object, key, "a mapping")),
    }
}

/// The list at `key`, created (and recorded in `created`) when absent.
fn child_sequence<'a>(
    parent: &'a mut Mapping,
    key: &str,
    object: &str,
    created: &mut Vec<String>,
) -> Result<&'a mut Vec<Value>, InjectError> {
    let absent = matches!(parent.get(key), None | Some(Value::Null));
    if absent {
        parent.insert(s(key), Value::Sequence(vec![]));
        created.push(key.to_string());
    }
    match parent.get_mut(key) {
        Some(Value::Sequence(seq)) => Ok(seq),
        _ => Err(bad_field(object, key, "a list")),
    }
}

fn bad_field(object: &str, field: &str, expected: &'static str) -> InjectError {
    InjectError::BadField {
        object: object.to_string(),
        field: field.to_string(),
        expected,
    }
}

fn name_of(item: &Value) -> Option<&str> {
    item.get("name").and_then(Value::as_str)
}

/// An RFC 1123 label, as ConfigMap names in a volume must be (close enough:
/// the API server has the final word).
fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

fn resources(cpu: &str, memory: &str, memory_limit: &str) -> Value {
    map([
        ("requests", map([("cpu", s(cpu)), ("memory", s(memory))])),
        ("limits", map([("memory", s(memory_limit))])),
    ])
}

fn join(ports: &[u16]) -> String {
    ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn s(text: &str) -> Value {
    Value::String(text.to_string())
}

fn map<const N: usize>(pairs: [(&str, Value); N]) -> Value {
    Value::Mapping(pairs.into_iter().map(|(k, v)| (s(k), v)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inject(yaml: &str) -> Result<String, InjectError> {
        mutate_documents(yaml, &InjectOptions::default(), Mode::Inject)
    }

    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\nspec:\n  containers:\n  - name: app\n    image: nginx\n    ports:\n    - containerPort: 8080\n    - containerPort: 9090\n";

    /// The sidecar configuration an injected pod carries in its annotation.
    fn default_config_of(injected: &str) -> String {
        let pod: Value = serde_yaml::from_str(injected).unwrap();
        pod["metadata"]["annotations"][ANN_SIDECAR_CONFIG]
            .as_str()
            .expect("the default configuration annotation")
            .to_owned()
    }

    #[test]
    fn a_pod_without_annotations_gets_a_default_configuration_the_sidecar_accepts() {
        let injected = inject(POD).unwrap();
        let pod: Value = serde_yaml::from_str(&injected).unwrap();
        let volumes = pod["spec"]["volumes"].as_sequence().unwrap();
        let config = volumes
            .iter()
            .find(|v| name_of(v) == Some("rampart-config"))
            .unwrap();
        // Mounted from the pod's own annotation: no ConfigMap to create.
        assert!(config.get("configMap").is_none(), "{config:?}");
        assert_eq!(
            config["downwardAPI"]["items"][0]["fieldRef"]["fieldPath"],
            "metadata.annotations['rampart.io/sidecar-config']"
        );
        let text = default_config_of(&injected);
        let cfg = crate::config::Config::parse("default", &text).unwrap();
        assert!(cfg.identity.workload_api.is_some());
        // The policy annotation adds the policy file; the CIDR flags land in
        // `outbound`.
        let opts = InjectOptions {
            mesh_cidrs: checked_cidrs("10.244.0.0/16,10.96.0.0/12").unwrap(),
            passthrough_cidrs: checked_cidrs("10.96.0.1").unwrap(),
            ..InjectOptions::default()
        };
        let with_policy = POD.replace(
            "  name: web\n",
            "  name: web\n  annotations:\n    rampart.io/policy: configmap:web-policy\n",
        );
        let text = default_config_of(&mutate_documents(&with_policy, &opts, Mode::Inject).unwrap());
        assert!(
            text.contains("policies: [\"/etc/rampart/policy/policy.yaml\"]"),
            "{text}"
        );
        assert!(
            text.contains("mesh_cidrs: [\"10.244.0.0/16\", \"10.96.0.0/12\"]"),
            "{text}"
        );
        assert!(
            text.contains("passthrough_cidrs: [\"10.96.0.1/32\"]"),
            "{text}"
        );
        let policy_dir = tempfile::tempdir().unwrap();
        let text = text.replace("/etc/rampart/policy", policy_dir.path().to_str().unwrap());
        std::fs::write(policy_dir.path().join("policy.yaml"), "policies: []\n").unwrap();
        crate::config::Config::parse("default", &text).unwrap();
        // Uninjection takes the annotation away again.
        let back = mutate_documents(&injected, &InjectOptions::default(), Mode::Uninject).unwrap();
        assert!(!back.contains(ANN_SIDECAR_CONFIG), "{back}");
    }

    #[test]
    fn a_config_map_named_by_flag_or_annotation_replaces_the_default() {
        let opts = InjectOptions {
            config_map: Some("mesh-defaults".into()),
            ..InjectOptions::default()
        };
        let injected = mutate_documents(POD, &opts, Mode::Inject).unwrap();
        assert!(!injected.contains(ANN_SIDECAR_CONFIG), "{injected}");
        assert!(injected.contains("name: mesh-defaults"), "{injected}");
        let annotated = POD.replace(
            "  name: web\n",
            "  name: web\n  annotations:\n    rampart.io/config: web-sidecar\n",
        );
        let injected = inject(&annotated).unwrap();
        assert!(!injected.contains(ANN_SIDECAR_CONFIG), "{injected}");
        assert!(injected.contains("name: web-sidecar"), "{injected}");
    }

    #[test]
    fn bad_annotations_are_refused_with_their_name() {
        let cases = [
            (ANN_INJECT, "maybe", "neither 'enabled' nor 'disabled'"),
            (ANN_EXCLUDE_OUTBOUND_PORTS, "http", "is not a TCP port"),
            (ANN_EXCLUDE_OUTBOUND_CIDRS, "10.0.0.0/33", "is not a CIDR"),
            (ANN_POLICY, "configmap:Bad_Name", "is not a ConfigMap name"),
            (ANN_POLICY, "just: text", "neither `configmap:NAME`"),
            (ANN_INBOUND_PORTS, "", "empty"),
        ];
        for (annotation, value, reason) in cases {
            let yaml = POD.replace(
                "  name: web\n",
                &format!("  name: web\n  annotations:\n    {annotation}: '{value}'\n"),
            );
            let err = inject(&yaml).expect_err(annotation).to_string();
            assert!(
                err.starts_with(&format!("Pod/web: annotation {annotation}: ")),
                "{err}"
            );
            assert!(err.contains(reason), "{annotation}: {err}");
        }
    }

    #[test]
    fn inbound_ports_exclude_the_other_declared_ports() {
        let yaml = POD.replace(
            "  name: web\n",
            "  name: web\n  annotations:\n    rampart.io/inbound-ports: '8080'\n",
        );
        let out = inject(&yaml).unwrap();
        assert!(out.contains("--exclude-inbound-ports=9090"), "{out}");
    }

    #[test]
    fn the_sidecar_gets_the_service_account_token_mount_the_app_has() {
        let proxy_mounts = |injected: &str| -> Vec<Value> {
            let pod: Value = serde_yaml::from_str(injected).unwrap();
            let init = pod["spec"]["initContainers"].as_sequence().unwrap();
            let proxy = init
                .iter()
                .find(|c| name_of(c) == Some(PROXY_CONTAINER))
                .unwrap();
            proxy["volumeMounts"].as_sequence().unwrap().clone()
        };
        let token = |mounts: &[Value]| {
            mounts
                .iter()
                .find(|m| m["mountPath"] == SERVICE_ACCOUNT_DIR)
                .cloned()
        };
        // As the webhook sees a pod: the ServiceAccount plugin has mounted
        // the projected token into the app.
        let admitted = POD.replace(
            "    image: nginx\n",
            "    image: nginx\n    volumeMounts:\n    - name: kube-api-access-x7k2p\n      mountPath: /var/run/secrets/kubernetes.io/serviceaccount\n      readOnly: true\n",
        );
        let injected = inject(&admitted).unwrap();
        let mount = token(&proxy_mounts(&injected)).expect("the token mount");
        assert_eq!(mount["name"], "kube-api-access-x7k2p");
        assert_eq!(mount["readOnly"], true);
        // Uninjection takes it away with the sidecar; the app keeps its own.
        let back = mutate_documents(&injected, &InjectOptions::default(), Mode::Uninject).unwrap();
        assert_eq!(back, admitted);
        // A template (no mount yet: the plugin mounts it into every
        // container at creation) and an opted-out pod get none.
        assert_eq!(token(&proxy_mounts(&inject(POD).unwrap())), None);
        let opted_out = POD.replace("spec:\n", "spec:\n  automountServiceAccountToken: false\n");
        assert_eq!(token(&proxy_mounts(&inject(&opted_out).unwrap())), None);
    }

    #[test]
    fn disabled_and_host_network_pods_are_left_alone() {
        let disabled = POD.replace(
            "  name: web\n",
            "  name: web\n  annotations:\n    rampart.io/inject: disabled\n",
        );
        assert_eq!(inject(&disabled).unwrap(), disabled);
        let host_network = POD.replace("spec:\n", "spec:\n  hostNetwork: true\n");
        assert_eq!(inject(&host_network).unwrap(), host_network);
    }

    #[test]
    fn strings_that_yaml_1_1_reads_otherwise_are_quoted() {
        let input = "a: 'off'\nb: 'yes'\n'on': 'N'\nc: ['y', 'x', '1_000', '=', '1:20']\nd: |\n  off\n  - on\ne:\n- \"no\\noff\"\n- 'no'\nf: 'true'\ng: true\nh: 2\ni: \"2024-01-01\"\nj: ['2001-12-14t21:59:43.10-05:00', 2024-1-1x]\n";
        let out = inject(input).unwrap();
        let expected = "a: 'off'\nb: 'yes'\n'on': 'N'\nc:\n- 'y'\n- x\n- '1_000'\n- '='\n- '1:20'\nd: |\n  off\n  - on\ne:\n- |-\n  no\n  off\n- 'no'\nf: 'true'\ng: true\nh: 2\ni: '2024-01-01'\nj:\n- '2001-12-14t21:59:43.10-05:00'\n- 2024-1-1x\n";
        assert_eq!(out, expected);
        let back: Value = serde_yaml::from_str(&out).unwrap();
        assert_eq!(back, serde_yaml::from_str::<Value>(input).unwrap());
    }

    proptest::proptest! {
        /// Whatever the strings, quoting keeps every value as it was.
        #[test]
        fn quoting_never_changes_a_value(
            pairs in proptest::collection::vec(
                (r#"(off|on|yes|no|y|N|=|1_0|1:2|\||- a|a: b|true|~|[a-z|:#'"\\ -]{0,6})"#, "(off|Yes|1_000|[a-z|:#'\"\\\\\n -]{0,8})"),
                0..6,
            ),
            nested in proptest::bool::ANY,
        ) {
            let mut map = Mapping::new();
            for (k, v) in &pairs {
                let value = if nested { Value::Sequence(vec![s(v), s(k)]) } else { s(v) };
                map.insert(s(k), value);
            }
            let value = Value::Mapping(map);
            let text = quote_yaml11_scalars(&serde_yaml::to_string(&value).unwrap());
            let back: Value = serde_yaml::from_str(&text).unwrap();
            proptest::prop_assert_eq!(back, value, "{}", text);
        }
    }

    #[test]
    fn a_wrongly_typed_field_is_an_error_not_a_panic() {
        let yaml = POD.replace("spec:\n", "spec:\n  volumes: 3\n");
        let err = inject(&yaml).unwrap_err().to_string();
        assert_eq!(err, "Pod/web: field `volumes` is not a list");
    }
}
