//! Istio's security resources as published (`security.istio.io/v1` and
//! `v1beta1`): `AuthorizationPolicy`, `PeerAuthentication` and
//! `RequestAuthentication`, read from multi-document YAML (or a `kind: List`).
//! Field names are Istio's; an unknown field in a `spec` is an error, so
//! that nothing the author wrote is silently ignored. Metadata keeps only
//! what decides attachment (name, namespace, annotations).

use std::collections::BTreeMap;

use serde::Deserialize;

/// One resource, by kind.
#[derive(Debug, Clone)]
pub enum Resource {
    /// `AuthorizationPolicy`.
    Authorization(Meta, AuthorizationPolicySpec),
    /// `PeerAuthentication`.
    Peer(Meta, PeerAuthenticationSpec),
    /// `RequestAuthentication`.
    Request(Meta, RequestAuthenticationSpec),
}

/// The part of `metadata` that matters here; other metadata fields
/// (`uid`, `labels`, `creationTimestamp`, ...) are accepted and ignored.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Meta {
    /// `metadata.name`.
    #[serde(default)]
    pub name: String,
    /// `metadata.namespace`; absent means the workload's namespace (as if
    /// applied with `kubectl apply -n <workload namespace>`).
    #[serde(default)]
    pub namespace: Option<String>,
    /// `metadata.annotations` (`istio.io/dry-run`).
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// `AuthorizationPolicy.spec`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// Workloads it applies to, by label.
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    /// Deprecated single target reference.
    #[serde(default)]
    pub target_ref: Option<TargetRef>,
    /// Gateways, services, ... it is attached to (never a sidecar).
    #[serde(default)]
    pub target_refs: Vec<TargetRef>,
    /// The rules; absent or empty matches nothing.
    #[serde(default)]
    pub rules: Vec<Option<RuleSpec>>,
    /// `ALLOW` (default), `DENY`, `AUDIT` or `CUSTOM`.
    #[serde(default)]
    pub action: Option<String>,
    /// The external authorizer of a CUSTOM policy.
    #[serde(default)]
    pub provider: Option<ProviderSpec>,
}

/// `selector`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadSelector {
    /// Labels a workload must all carry.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// `targetRef` / `targetRefs[]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetRef {
    /// API group.
    #[serde(default)]
    pub group: String,
    /// Kind (`Gateway`, `Service`, `ServiceEntry`, `GatewayClass`).
    #[serde(default)]
    pub kind: String,
    /// Name.
    #[serde(default)]
    pub name: String,
    /// Namespace.
    #[serde(default)]
    pub namespace: String,
}

/// `provider`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderSpec {
    /// The extension provider's name (mesh config); Rampart looks it up
    /// among `ext_authz.providers`.
    #[serde(default)]
    pub name: String,
}

/// One rule.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Sources; any may match. Absent: any source.
    #[serde(default)]
    pub from: Vec<FromSpec>,
    /// Operations; any may match. Absent: any operation.
    #[serde(default)]
    pub to: Vec<ToSpec>,
    /// Conditions; all must hold.
    #[serde(default)]
    pub when: Vec<ConditionSpec>,
}

/// `from[]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FromSpec {
    /// The source; absent matches any source.
    #[serde(default)]
    pub source: Option<SourceSpec>,
}

/// `to[]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToSpec {
    /// The operation; absent matches any operation.
    #[serde(default)]
    pub operation: Option<OperationSpec>,
}

/// `source`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(missing_docs)]
pub struct SourceSpec {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub request_principals: Vec<String>,
    #[serde(default)]
    pub not_request_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    #[serde(default)]
    pub service_accounts: Vec<String>,
    #[serde(default)]
    pub not_service_accounts: Vec<String>,
    #[serde(default)]
    pub trust_domains: Vec<String>,
    #[serde(default)]
    pub not_trust_domains: Vec<String>,
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
    #[serde(default)]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<String>,
}

/// `operation`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(missing_docs)]
pub struct OperationSpec {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub not_hosts: Vec<String>,
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default)]
    pub not_ports: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub not_methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub not_paths: Vec<String>,
}

/// `when[]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConditionSpec {
    /// The attribute (`request.headers[x]`, `source.ip`, ...).
    pub key: String,
    /// Any may match.
    #[serde(default)]
    pub values: Vec<String>,
    /// None may match.
    #[serde(default)]
    pub not_values: Vec<String>,
}

/// `PeerAuthentication.spec`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    /// Workloads it applies to; absent: the whole namespace (or mesh, in
    /// the root namespace).
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    /// The workload-level mode.
    #[serde(default)]
    pub mtls: Option<MtlsSpec>,
    /// Per-port modes (workload-selector policies only, as in Istio).
    #[serde(default)]
    pub port_level_mtls: BTreeMap<String, MtlsSpec>,
}

/// `mtls`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MtlsSpec {
    /// `UNSET`, `DISABLE`, `PERMISSIVE` or `STRICT`.
    #[serde(default)]
    pub mode: Option<String>,
}

/// `RequestAuthentication.spec`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RequestAuthenticationSpec {
    /// Workloads it applies to.
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    /// Gateways/services it is attached to (never a sidecar).
    #[serde(default)]
    pub target_ref: Option<TargetRef>,
    /// Gateways/services it is attached to (never a sidecar).
    #[serde(default)]
    pub target_refs: Vec<TargetRef>,
    /// The accepted token issuers.
    #[serde(default)]
    pub jwt_rules: Vec<JwtRuleSpec>,
}

/// `jwtRules[]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(missing_docs)]
pub struct JwtRuleSpec {
    #[serde(default)]
    pub issuer: String,
    #[serde(default)]
    pub audiences: Vec<String>,
    #[serde(default)]
    pub jwks_uri: Option<String>,
    #[serde(default)]
    pub jwks: Option<String>,
    #[serde(default)]
    pub from_headers: Vec<JwtHeaderSpec>,
    #[serde(default)]
    pub from_params: Vec<String>,
    #[serde(default)]
    pub from_cookies: Vec<String>,
    #[serde(default)]
    pub output_payload_to_header: Option<String>,
    #[serde(default)]
    pub output_claim_to_headers: Vec<serde_yaml::Value>,
    #[serde(default)]
    pub forward_original_token: bool,
    #[serde(default)]
    pub timeout: Option<String>,
}

/// `fromHeaders[]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtHeaderSpec {
    /// Header name.
    pub name: String,
    /// Prefix before the token (`Bearer `).
    #[serde(default)]
    pub prefix: String,
}

/// A document's envelope, before its kind is known.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Envelope {
    api_version: Option<String>,
    kind: Option<String>,
    #[serde(default)]
    metadata: Meta,
    #[serde(default)]
    spec: Option<serde_yaml::Value>,
    #[serde(default)]
    items: Option<Vec<serde_yaml::Value>>,
    /// Written by the control plane; ignored.
    #[serde(default)]
    #[allow(dead_code)]
    status: Option<serde_yaml::Value>,
}

/// Why a document could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// 1-based line in the file, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    /// Field path within the document (`spec.rules[0].from[0]...`).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

/// A resource with where it starts in its file.
#[derive(Debug, Clone)]
pub struct Located {
    /// 1-based line where its document starts.
    pub line: usize,
    /// The resource.
    pub resource: Resource,
}

/// Reads every document of a multi-document YAML text. Empty documents
/// are skipped; every bad document is reported.
pub fn parse_documents(text: &str) -> (Vec<Located>, Vec<ParseError>) {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (start, doc) in split_documents(text) {
        if doc.trim().is_empty()
            || doc
                .lines()
                .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
        {
            continue;
        }
        let de = serde_yaml::Deserializer::from_str(&doc);
        let env: Envelope = match serde_path_to_error::deserialize(de) {
            Ok(e) => e,
            Err(e) => {
                let loc = e.inner().location();
                errors.push(ParseError {
                    line: loc.as_ref().map(|l| l.line() + start - 1),
                    column: loc.as_ref().map(|l| l.column()),
                    field: e.path().to_string(),
                    message: strip_location(&e.inner().to_string()),
                });
                continue;
            }
        };
        envelope(env, start, String::new(), &mut out, &mut errors);
    }
    (out, errors)
}

fn envelope(
    env: Envelope,
    line: usize,
    prefix: String,
    out: &mut Vec<Located>,
    errors: &mut Vec<ParseError>,
) {
    let err = |field: &str, message: String| ParseError {
        line: Some(line),
        column: None,
        field: format!("{prefix}{field}"),
        message,
    };
    let kind = env.kind.clone().unwrap_or_default();
    if kind == "List" {
        for (i, item) in env.items.unwrap_or_default().into_iter().enumerate() {
            match serde_path_to_error::deserialize::<_, Envelope>(item) {
                Ok(e) => envelope(e, line, format!("{prefix}items[{i}]."), out, errors),
                Err(e) => errors.push(err(
                    &format!("items[{i}].{}", e.path()),
                    strip_location(&e.inner().to_string()),
                )),
            }
        }
        return;
    }
    let api = env.api_version.clone().unwrap_or_default();
    let version_ok = matches!(
        api.as_str(),
        "security.istio.io/v1" | "security.istio.io/v1beta1"
    );
    if !version_ok {
        errors.push(err(
            "apiVersion",
            format!(
                "{api:?} is not read (only security.istio.io/v1 and v1beta1 resources; kind {kind:?})"
            ),
        ));
        return;
    }
    let spec = env
        .spec
        .unwrap_or(serde_yaml::Value::Mapping(Default::default()));
    let spec = match spec {
        serde_yaml::Value::Null => serde_yaml::Value::Mapping(Default::default()),
        s => s,
    };
    macro_rules! typed {
        ($t:ty, $variant:ident) => {
            match serde_path_to_error::deserialize::<_, $t>(spec) {
                Ok(s) => out.push(Located {
                    line,
                    resource: Resource::$variant(env.metadata, s),
                }),
                Err(e) => errors.push(err(
                    &format!("spec.{}", e.path()),
                    strip_location(&e.inner().to_string()),
                )),
            }
        };
    }
    match kind.as_str() {
        "AuthorizationPolicy" => typed!(AuthorizationPolicySpec, Authorization),
        "PeerAuthentication" => typed!(PeerAuthenticationSpec, Peer),
        "RequestAuthentication" => typed!(RequestAuthenticationSpec, Request),
        other => errors.push(err(
            "kind",
            format!(
                "{other:?} is not an Istio security resource (AuthorizationPolicy, PeerAuthentication, RequestAuthentication)"
            ),
        )),
    }
}

/// Splits a YAML stream at `---` lines, with the 1-based line on which each
/// document's content starts.
fn split_documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = Vec::new();
    let mut start = 1;
    let mut cur = String::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim_end();
        if t == "---" || t.starts_with("--- ") {
            docs.push((start, std::mem::take(&mut cur)));
            start = i + 2;
            continue;
        }
        if t == "..." {
            continue;
        }
        cur.push_str(line);
        cur.push('\n');
    }
    docs.push((start, cur));
    docs
}

/// serde_yaml appends " at line L column C" to its messages; the line is
/// reported separately (and relative to the file, not the document).
fn strip_location(msg: &str) -> String {
    match msg.find(" at line ") {
        Some(i) => msg[..i].to_owned(),
        None => msg.to_owned(),
    }
}
