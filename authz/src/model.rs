//! The policy file format, as written by operators (YAML, see
//! `docs/policy.md`). Every leaf value validates itself while it is
//! deserialized, so an error carries the file's line and the field's path;
//! cross-field checks run when a policy entry is converted from its raw form,
//! still inside deserialization. A value of these types is therefore valid.

use std::collections::HashSet;
use std::fmt;

use ipnet::IpNet;
use serde::Deserialize;

use crate::normalize::{NormalizeOptions, normalize_path};

/// A policy file: one or more policies.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// The policies, in the order they were written.
    pub policies: Vec<Policy>,
}

/// What a native policy does when one of its rules matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Action {
    /// The request is allowed (unless a DENY policy matches). Once any ALLOW
    /// policy applies to a port, a request on that port must match one.
    #[serde(rename = "ALLOW")]
    Allow,
    /// The request is refused; DENY wins over ALLOW.
    #[serde(rename = "DENY")]
    Deny,
    /// The match is reported with the decision (for logs) and changes nothing.
    #[serde(rename = "AUDIT")]
    Audit,
    /// A match sends the request to an external authorizer (the policy's
    /// `provider`), which has the last word unless the in-process policies
    /// already refuse (Istio's CUSTOM action).
    #[serde(rename = "CUSTOM")]
    Custom,
}

impl Action {
    /// The spelling used in policy files.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Audit => "AUDIT",
            Action::Custom => "CUSTOM",
        }
    }
}

/// Which engine evaluates a policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyKind {
    /// Rules in this file format, compiled to native matchers.
    #[default]
    Native,
    /// Rego modules evaluated in-process, with OPA-Envoy's input and result.
    Rego,
}

/// Rego syntax version of a policy's modules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RegoVersion {
    /// Rego v1 (OPA 1.0 and later; `if` and `contains` required).
    #[default]
    V1,
    /// Rego v0 (OPA before 1.0; most published OPA-Envoy examples).
    V0,
}

/// How a Rego query's value becomes a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResultForm {
    /// OPA-Envoy: a boolean, or an object with a required boolean `allowed`
    /// plus `headers`, `response_headers_to_add`, `request_headers_to_remove`,
    /// `http_status` and `body`.
    #[default]
    Envoy,
    /// SPIRE's form: an object of booleans, allowed when any is true.
    AnyTrue,
}

/// One policy, validated.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RawPolicy")]
pub struct Policy {
    /// Unique name, reported in decisions, logs and the 403 body.
    pub name: String,
    /// The destination ports it applies to; empty means every port.
    pub ports: Vec<u16>,
    /// Evaluate and report, but never change a decision.
    pub dry_run: bool,
    /// What it is made of.
    pub body: PolicyBody,
}

impl Policy {
    /// An ALLOW policy `port-<port>` admitting exactly `ids` on `port`, with
    /// one rule `allowed_peers` (no rule at all when `ids` is empty, so that
    /// it admits no one).
    pub fn port_allowlist(port: u16, ids: &[rampart_identity::SpiffeId]) -> Policy {
        let patterns: Vec<PrincipalPattern> = ids
            .iter()
            .map(|id| PrincipalPattern::Exact(id.as_str().to_owned()))
            .collect();
        let rules = match NonEmpty::try_from(patterns) {
            Ok(principals) => vec![Rule {
                name: Some("allowed_peers".into()),
                from: From {
                    principals: Some(principals),
                    ..Default::default()
                },
                ..Default::default()
            }],
            Err(_) => Vec::new(),
        };
        Policy {
            name: format!("port-{port}"),
            ports: vec![port],
            dry_run: false,
            body: PolicyBody::Native(NativePolicy {
                action: Action::Allow,
                rules,
                data: None,
                provider: None,
            }),
        }
    }
}

/// The engine-specific part of a policy.
#[derive(Debug, Clone)]
pub enum PolicyBody {
    /// Native rules.
    Native(NativePolicy),
    /// Rego modules.
    Rego(RegoPolicySpec),
}

/// A native policy: an action and rules (any rule matching is a match).
#[derive(Debug, Clone)]
pub struct NativePolicy {
    /// What a match does.
    pub action: Action,
    /// The rules; none means the policy matches nothing.
    pub rules: Vec<Rule>,
    /// The data document rules may refer to (`principals_from_data`).
    pub data: Option<serde_json::Value>,
    /// The external authorizer a CUSTOM policy consults; set exactly when
    /// the action is CUSTOM.
    pub provider: Option<ProviderName>,
}

/// The name of an external authorizer (an ext_authz provider) in the
/// sidecar's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProviderName(pub std::sync::Arc<str>);

impl ProviderName {
    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ProviderName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for ProviderName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let ok = !s.is_empty()
            && s.len() <= 128
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !ok {
            return Err(format!(
                "provider name {s:?} must be 1-128 letters, digits, '-', '_' or '.'"
            ));
        }
        Ok(ProviderName(std::sync::Arc::from(s)))
    }
}

impl<'de> Deserialize<'de> for ProviderName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ProviderName::try_from(s).map_err(serde::de::Error::custom)
    }
}

/// A Rego policy, before its files are read.
#[derive(Debug, Clone)]
pub struct RegoPolicySpec {
    /// Module files, relative to the policy file.
    pub modules: Vec<String>,
    /// Inline module source.
    pub inline: Option<String>,
    /// JSON data files, relative to the policy file, merged in order.
    pub data_files: Vec<String>,
    /// Inline data document.
    pub data: Option<serde_json::Value>,
    /// The rule to evaluate, default `data.envoy.authz.allow`.
    pub query: String,
    /// Module syntax version.
    pub rego_version: RegoVersion,
    /// How the query's value is read.
    pub result: ResultForm,
    /// Whether, and how much of, the request body the policy sees.
    pub with_request_body: Option<WithRequestBody>,
    /// Envoy's ext_authz `include_peer_certificate`: the peer's leaf as
    /// `input.attributes.source.certificate` (URL-encoded PEM).
    pub include_peer_certificate: bool,
}

/// Envoy's ext_authz `with_request_body`: the request body is read (once,
/// at most `max_request_bytes` of it) before the decision, shown to Rego
/// as `input.attributes.request.http.body` (or `rawBody`) and
/// `input.parsed_body`, then forwarded to the app unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WithRequestBody {
    /// The most bytes read before deciding (more than 0). A longer body
    /// is refused with 413, unless `allow_partial_message`.
    pub max_request_bytes: u32,
    /// Decide on the first `max_request_bytes` of a longer body (the input
    /// then has `x-envoy-auth-partial-body: true`) instead of refusing it.
    #[serde(default)]
    pub allow_partial_message: bool,
    /// The body as bytes (`rawBody`, base64 in the input) rather than as a
    /// string (`body`).
    #[serde(default)]
    pub pack_as_bytes: bool,
}

/// The default Rego query, OPA-Envoy's default decision path.
pub const DEFAULT_REGO_QUERY: &str = "data.envoy.authz.allow";

/// One rule: `from`, `to` and every `when` condition must all match.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Name reported when this rule decides; default `rule-<index>`.
    #[serde(default)]
    pub name: Option<String>,
    /// Who is calling.
    #[serde(default)]
    pub from: From,
    /// What is called.
    #[serde(default)]
    pub to: To,
    /// Conditions on request headers and query parameters.
    #[serde(default)]
    pub when: Vec<Condition>,
}

/// The source side of a rule. With neither `principals` nor
/// `unauthenticated`, any authenticated peer matches.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct From {
    /// The peer must match one of these.
    #[serde(default)]
    pub principals: Option<NonEmpty<PrincipalPattern>>,
    /// The peer must match none of these.
    #[serde(default)]
    pub not_principals: Vec<PrincipalPattern>,
    /// The peer must be in one of the lists this data lookup yields.
    #[serde(default)]
    pub principals_from_data: Option<DataRef>,
    /// Also admit sources without an authenticated peer (plaintext, or TLS
    /// without a client certificate). Combine with `source_cidrs`.
    #[serde(default)]
    pub unauthenticated: bool,
    /// The source address must be in one of these networks.
    #[serde(default)]
    pub source_cidrs: Option<NonEmpty<IpNet>>,
    /// The source address must be in none of these networks.
    #[serde(default)]
    pub not_source_cidrs: Vec<IpNet>,
}

/// The destination side of a rule.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct To {
    /// Destination port must be one of these.
    #[serde(default)]
    pub ports: Option<NonEmpty<u16>>,
    /// Destination port must be none of these.
    #[serde(default)]
    pub not_ports: Vec<u16>,
    /// Host (`Host` / `:authority`) must match one of these.
    #[serde(default)]
    pub hosts: Option<NonEmpty<HostPattern>>,
    /// Host must match none of these.
    #[serde(default)]
    pub not_hosts: Vec<HostPattern>,
    /// Method must be one of these.
    #[serde(default)]
    pub methods: Option<NonEmpty<MethodName>>,
    /// Method must be none of these.
    #[serde(default)]
    pub not_methods: Vec<MethodName>,
    /// Normalized path must match one of these.
    #[serde(default)]
    pub paths: Option<NonEmpty<PathMatcher>>,
    /// Normalized path must match none of these.
    #[serde(default)]
    pub not_paths: Vec<PathMatcher>,
    /// The request must be gRPC, to one of these services.
    #[serde(default)]
    pub grpc_services: Option<NonEmpty<GrpcService>>,
    /// The request must be gRPC, to one of these full methods.
    #[serde(default)]
    pub grpc_methods: Option<NonEmpty<GrpcMethod>>,
}

impl To {
    /// Whether this needs an HTTP request to be evaluated.
    pub fn needs_http(&self) -> bool {
        self.hosts.is_some()
            || !self.not_hosts.is_empty()
            || self.methods.is_some()
            || !self.not_methods.is_empty()
            || self.paths.is_some()
            || !self.not_paths.is_empty()
            || self.grpc_services.is_some()
            || self.grpc_methods.is_some()
    }
}

/// A list that must not be empty: an empty list would match nothing, which
/// is never what a writer of `methods: []` meant.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "Vec<T>")]
pub struct NonEmpty<T>(pub Vec<T>);

impl<T> TryFrom<Vec<T>> for NonEmpty<T> {
    type Error = String;
    fn try_from(v: Vec<T>) -> Result<Self, String> {
        if v.is_empty() {
            Err("empty list matches nothing; omit the field instead".into())
        } else {
            Ok(NonEmpty(v))
        }
    }
}

/// A peer principal pattern.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum PrincipalPattern {
    /// `*`: any peer with a SPIFFE ID (not a DNS-SAN-only client).
    Any,
    /// `spiffe://td/a/b`: exactly this SPIFFE ID.
    Exact(String),
    /// `spiffe://td/a/*`: any ID below `spiffe://td/a/` (segment-aware);
    /// stored with its trailing `/`.
    Prefix(String),
    /// `spiffe://td` or `spiffe://td/*`: any ID in the trust domain.
    TrustDomain(String),
    /// `dns:name`: a certificate with this DNS SAN (case-insensitive).
    Dns(String),
    /// `dns:*.suffix`: a DNS SAN ending in `.suffix`; stored with its dot.
    DnsSuffix(String),
}

impl TryFrom<String> for PrincipalPattern {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        use rampart_identity::{SpiffeId, TrustDomain};
        if s == "*" {
            return Ok(PrincipalPattern::Any);
        }
        if let Some(dns) = s.strip_prefix("dns:") {
            let (suffix, name) = match dns.strip_prefix("*.") {
                Some(rest) => (true, rest),
                None => (false, dns),
            };
            let valid = !name.is_empty()
                && name.len() <= 253
                && name.split('.').all(|l| {
                    !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                });
            if !valid {
                return Err(format!(
                    "{s:?} is not a valid DNS principal (dns:NAME or dns:*.SUFFIX)"
                ));
            }
            let name = name.to_ascii_lowercase();
            return Ok(if suffix {
                PrincipalPattern::DnsSuffix(format!(".{name}"))
            } else {
                PrincipalPattern::Dns(name)
            });
        }
        if !s.starts_with("spiffe://") {
            return Err(format!(
                "{s:?} is not a principal: use a SPIFFE ID, a prefix ending in /*, \"dns:NAME\" or \"*\""
            ));
        }
        if let Some(base) = s.strip_suffix("/*") {
            let id = SpiffeId::parse(base).map_err(|e| format!("{s:?}: {e}"))?;
            return Ok(if id.is_trust_domain_id() {
                PrincipalPattern::TrustDomain(id.trust_domain().as_str().to_owned())
            } else {
                PrincipalPattern::Prefix(format!("{}/", id.as_str()))
            });
        }
        if s.contains('*') {
            return Err(format!(
                "{s:?}: '*' is only allowed as a whole last segment (/*)"
            ));
        }
        let id = SpiffeId::parse(&s).map_err(|e| format!("{s:?}: {e}"))?;
        if id.is_trust_domain_id() {
            // Accept the bare trust domain too; parse validates it the same way.
            let td = TrustDomain::parse(id.trust_domain().as_str()).map_err(|e| e.to_string())?;
            return Ok(PrincipalPattern::TrustDomain(td.as_str().to_owned()));
        }
        Ok(PrincipalPattern::Exact(id.as_str().to_owned()))
    }
}

/// A host pattern, compared case-insensitively with the request's host.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct HostPattern {
    /// Lower-cased name without a trailing dot; empty for `*`.
    pub name: String,
    /// `*.example.com`: `name` holds `.example.com`.
    pub suffix: bool,
    /// `host:8080`; `None` for `host` and `host:*` (any port, or none).
    pub port: Option<u16>,
}

impl TryFrom<String> for HostPattern {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let lower = s.to_ascii_lowercase();
        if lower == "*" {
            return Ok(HostPattern {
                name: String::new(),
                suffix: true,
                port: None,
            });
        }
        let (host, port) = split_host_port(&lower);
        let port = match port {
            None | Some("*") => None,
            Some(p) => Some(
                p.parse::<u16>()
                    .map_err(|_| format!("{s:?}: port must be a number or '*'"))?,
            ),
        };
        let host = host.strip_suffix('.').unwrap_or(host);
        let (suffix, name) = match host.strip_prefix("*.") {
            Some(rest) => (true, format!(".{rest}")),
            None => (false, host.to_owned()),
        };
        let valid = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.:[]_".contains(&b))
            && !name.contains('*');
        if !valid {
            return Err(format!(
                "{s:?} is not a host pattern (host, host:*, host:PORT, *.suffix, *)"
            ));
        }
        Ok(HostPattern { name, suffix, port })
    }
}

/// Splits `host:port` (or `[v6]:port`); the port part is returned raw.
pub(crate) fn split_host_port(authority: &str) -> (&str, Option<&str>) {
    if authority.starts_with('[') {
        return match authority.find(']') {
            Some(end) => {
                let rest = &authority[end + 1..];
                (&authority[..=end], rest.strip_prefix(':'))
            }
            None => (authority, None),
        };
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h, Some(p)),
        Some(_) | None => (authority, None),
    }
}

/// An HTTP method name (case-sensitive, as HTTP defines it).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct MethodName(pub http::Method);

impl TryFrom<String> for MethodName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if s.is_empty()
            || !s
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_')
        {
            return Err(format!(
                "{s:?} is not a method (upper-case token such as GET)"
            ));
        }
        http::Method::from_bytes(s.as_bytes())
            .map(MethodName)
            .map_err(|e| format!("{s:?}: {e}"))
    }
}

/// One entry of `paths` / `not_paths`: a pattern, and whether it ignores
/// ASCII case. Written as the pattern alone (case-sensitive, the default)
/// or as `{path: PATTERN, ignore_case: true}`, like the `ignore_case` of
/// Envoy's `StringMatcher`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathMatcher {
    /// The pattern.
    pub pattern: PathPattern,
    /// Compare ASCII letters case-insensitively (`/Admin` matches `/admin`).
    pub ignore_case: bool,
}

impl<'de> Deserialize<'de> for PathMatcher {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = PathMatcher;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a path pattern, or {path: PATTERN, ignore_case: BOOL}")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<PathMatcher, E> {
                let pattern = PathPattern::try_from(v.to_owned()).map_err(E::custom)?;
                Ok(PathMatcher {
                    pattern,
                    ignore_case: false,
                })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<PathMatcher, A::Error> {
                use serde::de::Error;
                let mut pattern = None;
                let mut regex: Option<String> = None;
                let mut ignore_case = None;
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "path" if pattern.is_none() => pattern = Some(map.next_value()?),
                        "regex" if regex.is_none() => regex = Some(map.next_value()?),
                        "ignore_case" if ignore_case.is_none() => {
                            ignore_case = Some(map.next_value()?)
                        }
                        "path" | "regex" | "ignore_case" => {
                            return Err(A::Error::custom(format!("duplicate field `{key}`")));
                        }
                        other => {
                            return Err(A::Error::unknown_field(
                                other,
                                &["path", "regex", "ignore_case"],
                            ));
                        }
                    }
                }
                let ignore_case = ignore_case.unwrap_or(false);
                let pattern = match (pattern, regex) {
                    (Some(p), None) => p,
                    (None, Some(r)) => PathPattern::Regex(
                        RegexPattern::path(&r, ignore_case).map_err(A::Error::custom)?,
                    ),
                    (Some(_), Some(_)) => {
                        return Err(A::Error::custom("give `path` or `regex`, not both"));
                    }
                    (None, None) => return Err(A::Error::missing_field("path")),
                };
                Ok(PathMatcher {
                    pattern,
                    ignore_case,
                })
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// A path pattern, matched against the normalized path (case-sensitive
/// unless its [`PathMatcher`] says `ignore_case`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum PathPattern {
    /// `*`: any path.
    Any,
    /// `/data`: exactly this path.
    Exact(String),
    /// `/api/*`: this prefix, stored with its trailing `/`.
    Prefix(String),
    /// `/api/{*}/items`, `/static/{**}`: segments, where `{*}` is one
    /// segment and `{**}` any number (including none).
    Template(Vec<TemplateSegment>),
    /// `{regex: RE}`: the whole normalized path (without the query)
    /// matches the regular expression (Rust `regex` syntax, linear time;
    /// Envoy's `safe_regex` path match, SMI's `pathRegex`).
    Regex(RegexPattern),
}

/// One segment of a [`PathPattern::Template`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateSegment {
    /// Literal text.
    Literal(String),
    /// `{*}`: exactly one non-empty segment.
    One,
    /// `{**}`: zero or more segments.
    Many,
}

impl TryFrom<String> for PathPattern {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if s == "*" {
            return Ok(PathPattern::Any);
        }
        let (base, prefix) = match s.strip_suffix("/*") {
            Some(b) => (format!("{b}/"), true),
            None => (s.clone(), false),
        };
        if base.contains('*') && !base.contains('{') {
            return Err(format!(
                "{s:?}: '*' is only allowed as a whole last segment (/*) or in {{*}} / {{**}}"
            ));
        }
        // Patterns must themselves be normal, or they could never match a
        // normalized request path (a silent no-op rule).
        let probe = base.replace("{**}", "x").replace("{*}", "x");
        let normal = normalize_path(&probe, &NormalizeOptions::default())
            .map_err(|e| format!("{s:?}: {e}"))?;
        if normal.query.is_some() || normal.path != probe {
            return Err(format!(
                "{s:?} is not a normalized path (it would be requested as {:?})",
                normal.path
            ));
        }
        if !base.contains('{') {
            return Ok(if prefix {
                PathPattern::Prefix(base)
            } else {
                PathPattern::Exact(base)
            });
        }
        if prefix {
            return Err(format!("{s:?}: end a template with /{{**}}, not /*"));
        }
        let mut segs = Vec::new();
        for seg in base[1..].split('/') {
            segs.push(match seg {
                "{*}" => TemplateSegment::One,
                "{**}" => TemplateSegment::Many,
                lit if lit.contains(['{', '}']) => {
                    return Err(format!(
                        "{s:?}: {{*}} and {{**}} must be whole segments, found {lit:?}"
                    ));
                }
                lit => TemplateSegment::Literal(lit.to_owned()),
            });
        }
        // One `{**}` keeps matching linear (no nested backtracking).
        if segs.iter().filter(|s| **s == TemplateSegment::Many).count() > 1 {
            return Err(format!("{s:?}: at most one {{**}} per pattern"));
        }
        Ok(PathPattern::Template(segs))
    }
}

/// A gRPC service name such as `spire.api.server.entry.v1.Entry`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct GrpcService(pub String);

impl TryFrom<String> for GrpcService {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if is_grpc_name(&s) {
            Ok(GrpcService(s))
        } else {
            Err(format!("{s:?} is not a gRPC service name (pkg.Service)"))
        }
    }
}

/// A gRPC full method, stored as `/pkg.Service/Method`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct GrpcMethod(pub String);

impl TryFrom<String> for GrpcMethod {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let bare = s.strip_prefix('/').unwrap_or(&s);
        match bare.split_once('/') {
            Some((svc, m)) if is_grpc_name(svc) && is_grpc_name(m) && !m.contains('.') => {
                Ok(GrpcMethod(format!("/{bare}")))
            }
            Some(_) | None => Err(format!(
                "{s:?} is not a gRPC full method (/pkg.Service/Method)"
            )),
        }
    }
}

fn is_grpc_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('.')
        && !s.ends_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
}

/// A request attribute a data lookup can be keyed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataKey {
    /// `{grpc_method}`: `/pkg.Service/Method` (gRPC requests only).
    GrpcMethod,
    /// `{grpc_service}`: `pkg.Service` (gRPC requests only).
    GrpcService,
    /// `{path}`: the normalized path.
    Path,
    /// `{method}`: the HTTP method.
    Method,
}

impl DataKey {
    /// The placeholder's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            DataKey::GrpcMethod => "{grpc_method}",
            DataKey::GrpcService => "{grpc_service}",
            DataKey::Path => "{path}",
            DataKey::Method => "{method}",
        }
    }
}

/// A lookup in the policy's data document, such as
/// `methods.{grpc_method}.callers`: dot-separated object keys, at most one
/// of which is a placeholder replaced by a request attribute. The value
/// found must be a list of principal patterns.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct DataRef {
    /// The text as written.
    pub text: String,
    /// Object keys before the placeholder (all of them when there is none).
    pub before: Vec<String>,
    /// The placeholder, if any.
    pub key: Option<DataKey>,
    /// Object keys after the placeholder.
    pub after: Vec<String>,
}

impl TryFrom<String> for DataRef {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let mut before = Vec::new();
        let mut after = Vec::new();
        let mut key = None;
        for seg in s.split('.') {
            let k = match seg {
                "{grpc_method}" => Some(DataKey::GrpcMethod),
                "{grpc_service}" => Some(DataKey::GrpcService),
                "{path}" => Some(DataKey::Path),
                "{method}" => Some(DataKey::Method),
                "" => return Err(format!("{s:?}: empty key")),
                lit if lit.contains(['{', '}']) => {
                    return Err(format!(
                        "{s:?}: unknown placeholder {lit:?} (use {{grpc_method}}, {{grpc_service}}, {{path}} or {{method}})"
                    ));
                }
                _ => None,
            };
            match (k, key) {
                (Some(_), Some(_)) => return Err(format!("{s:?}: at most one placeholder")),
                (Some(k), None) => key = Some(k),
                (None, None) => before.push(seg.to_owned()),
                (None, Some(_)) => after.push(seg.to_owned()),
            }
        }
        Ok(DataRef {
            text: s,
            before,
            key,
            after,
        })
    }
}

/// A condition on a request header or query parameter.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RawCondition")]
pub struct Condition {
    /// What is inspected.
    pub subject: ConditionSubject,
    /// How its value is matched.
    pub matcher: ValueMatcher,
    /// Negate the result (`not: true`).
    pub invert: bool,
}

/// What a [`Condition`] inspects.
#[derive(Debug, Clone)]
pub enum ConditionSubject {
    /// A request header (name lower-cased).
    Header(http::HeaderName),
    /// A query parameter (name as sent, compared after percent-decoding).
    Query(String),
    /// An attribute of the request's verified JWT (a RequestAuthentication
    /// verified it); without one it has no value.
    Auth(AuthKey),
}

/// Istio's `request.auth.*` attributes, in native `when` conditions
/// (`auth: principal`, `auth: "claims[groups]"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthKey {
    /// `iss/sub`.
    Principal,
    /// `aud` (a string or each element of a list).
    Audiences,
    /// `azp`.
    Presenter,
    /// `claims[a][b]`: a nested claim; a string, or each string of a list.
    Claim(Vec<String>),
}

impl AuthKey {
    /// Parses `principal`, `audiences`, `presenter` or `claims[a][b]...`.
    pub fn parse(s: &str) -> Result<AuthKey, String> {
        match s {
            "principal" => return Ok(AuthKey::Principal),
            "audiences" => return Ok(AuthKey::Audiences),
            "presenter" => return Ok(AuthKey::Presenter),
            _ => {}
        }
        let bad = || {
            format!(
                "{s:?}: expected principal, audiences, presenter or claims[NAME] (nested claims[a][b])"
            )
        };
        let mut rest = s.strip_prefix("claims").ok_or_else(bad)?;
        let mut path = Vec::new();
        while !rest.is_empty() {
            let inner = rest.strip_prefix('[').ok_or_else(bad)?;
            let end = inner.find(']').ok_or_else(bad)?;
            if end == 0 {
                return Err(bad());
            }
            path.push(inner[..end].to_owned());
            rest = &inner[end + 1..];
        }
        if path.is_empty() {
            return Err(bad());
        }
        Ok(AuthKey::Claim(path))
    }
}

/// How a value is matched. With several values (repeated header or
/// parameter), the condition holds when any value matches.
#[derive(Debug, Clone)]
pub enum ValueMatcher {
    /// Equal to.
    Exact(String),
    /// Starts with.
    Prefix(String),
    /// Ends with.
    Suffix(String),
    /// Whole value matches the regular expression (anchored).
    Regex(RegexPattern),
    /// Present, with any value.
    Present,
    /// Not present.
    Absent,
}

/// A compiled, anchored regular expression.
#[derive(Clone)]
pub struct RegexPattern {
    /// As written.
    pub source: String,
    /// Compiled as `^(?:source)$` over bytes.
    pub regex: regex::bytes::Regex,
}

impl RegexPattern {
    /// Largest compiled program of one pattern: a path pattern is data an
    /// importer may copy from a file, so it is bounded.
    const SIZE_LIMIT: usize = 1 << 20;

    /// An anchored path pattern (`^(?:RE)$`), case-insensitive on request.
    pub fn path(source: &str, ignore_case: bool) -> Result<RegexPattern, String> {
        if source.is_empty() {
            return Err("an empty path regex matches no path".into());
        }
        let regex = regex::bytes::RegexBuilder::new(&format!("^(?:{source})$"))
            .case_insensitive(ignore_case)
            .size_limit(Self::SIZE_LIMIT)
            .build()
            .map_err(|e| format!("invalid path regex {source:?}: {e}"))?;
        Ok(RegexPattern {
            source: source.to_owned(),
            regex,
        })
    }
}

impl PartialEq for RegexPattern {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Eq for RegexPattern {}

impl fmt::Debug for RegexPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "/{}/", self.source)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCondition {
    #[serde(default)]
    header: Option<String>,
    #[serde(default)]
    query: Option<String>,
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    exact: Option<String>,
    #[serde(default)]
    prefix: Option<String>,
    #[serde(default)]
    suffix: Option<String>,
    #[serde(default)]
    regex: Option<String>,
    #[serde(default)]
    present: Option<bool>,
    #[serde(default)]
    absent: Option<bool>,
    #[serde(default)]
    not: bool,
}

impl TryFrom<RawCondition> for Condition {
    type Error = String;
    fn try_from(r: RawCondition) -> Result<Self, String> {
        let subject = match (r.header, r.query, r.auth) {
            (Some(h), None, None) => ConditionSubject::Header(
                http::HeaderName::from_bytes(h.as_bytes())
                    .map_err(|_| format!("{h:?} is not a header name"))?,
            ),
            (None, Some(q), None) if !q.is_empty() => ConditionSubject::Query(q),
            (None, Some(_), None) => return Err("query parameter name is empty".into()),
            (None, None, Some(a)) => ConditionSubject::Auth(AuthKey::parse(&a)?),
            _ => {
                return Err("a condition needs exactly one of `header`, `query` or `auth`".into());
            }
        };
        let mut matchers = Vec::new();
        if let Some(v) = r.exact {
            matchers.push(ValueMatcher::Exact(v));
        }
        if let Some(v) = r.prefix {
            matchers.push(ValueMatcher::Prefix(v));
        }
        if let Some(v) = r.suffix {
            matchers.push(ValueMatcher::Suffix(v));
        }
        if let Some(v) = r.regex {
            let regex = regex::bytes::Regex::new(&format!("^(?:{v})$"))
                .map_err(|e| format!("invalid regex {v:?}: {e}"))?;
            matchers.push(ValueMatcher::Regex(RegexPattern { source: v, regex }));
        }
        match r.present {
            Some(true) => matchers.push(ValueMatcher::Present),
            Some(false) => return Err("`present: false` is ambiguous; use `absent: true`".into()),
            None => {}
        }
        match r.absent {
            Some(true) => matchers.push(ValueMatcher::Absent),
            Some(false) => return Err("`absent: false` is ambiguous; use `present: true`".into()),
            None => {}
        }
        if matchers.len() != 1 {
            return Err(
                "a condition needs exactly one of exact, prefix, suffix, regex, present, absent"
                    .into(),
            );
        }
        // Invariant: the length is exactly 1, checked just above.
        let matcher = matchers.pop().expect("one matcher");
        Ok(Condition {
            subject,
            matcher,
            invert: r.not,
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    name: String,
    #[serde(default)]
    kind: PolicyKind,
    #[serde(default)]
    action: Option<Action>,
    #[serde(default)]
    ports: Vec<u16>,
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    rules: Option<Vec<Rule>>,
    #[serde(default)]
    data: Option<serde_json::Value>,
    #[serde(default)]
    modules: Vec<String>,
    #[serde(default)]
    rego: Option<String>,
    #[serde(default)]
    data_files: Vec<String>,
    #[serde(default)]
    query: Option<String>,
    #[serde(default)]
    rego_version: Option<RegoVersion>,
    #[serde(default)]
    result: Option<ResultForm>,
    #[serde(default)]
    with_request_body: Option<WithRequestBody>,
    #[serde(default)]
    include_peer_certificate: Option<bool>,
    /// OPA-Envoy's protobuf descriptor set for gRPC `parsed_body`: refused
    /// by name (Rampart does not decode gRPC messages).
    #[serde(default)]
    proto_descriptor: Option<serde_yaml::Value>,
    #[serde(default)]
    provider: Option<ProviderName>,
}

impl TryFrom<RawPolicy> for Policy {
    type Error = String;
    fn try_from(r: RawPolicy) -> Result<Self, String> {
        let name_ok = !r.name.is_empty()
            && r.name.len() <= 128
            && r.name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !name_ok {
            return Err(format!(
                "policy name {:?} must be 1-128 letters, digits, '-', '_' or '.'",
                r.name
            ));
        }
        let body = match r.kind {
            PolicyKind::Native => {
                let rego_only = [
                    (!r.modules.is_empty(), "modules"),
                    (r.rego.is_some(), "rego"),
                    (!r.data_files.is_empty(), "data_files"),
                    (r.query.is_some(), "query"),
                    (r.rego_version.is_some(), "rego_version"),
                    (r.result.is_some(), "result"),
                    (r.with_request_body.is_some(), "with_request_body"),
                    (
                        r.include_peer_certificate.is_some(),
                        "include_peer_certificate",
                    ),
                    (r.proto_descriptor.is_some(), "proto_descriptor"),
                ];
                if let Some((_, field)) = rego_only.iter().find(|(set, _)| *set) {
                    return Err(format!("`{field}` is only valid with `kind: rego`"));
                }
                let action = r
                    .action
                    .ok_or_else(|| "missing `action` (ALLOW, DENY, AUDIT or CUSTOM)".to_owned())?;
                match (action, &r.provider) {
                    (Action::Custom, None) => {
                        return Err("a CUSTOM policy needs `provider`".into());
                    }
                    (Action::Custom, Some(_)) if r.dry_run => {
                        // A dry-run CUSTOM policy would have to call the
                        // provider only to log; refuse rather than guess.
                        return Err("`dry_run` is not supported with action CUSTOM".into());
                    }
                    (Action::Allow | Action::Deny | Action::Audit, Some(_)) => {
                        return Err("`provider` is only valid with action CUSTOM".into());
                    }
                    (Action::Custom, Some(_))
                    | (Action::Allow | Action::Deny | Action::Audit, None) => {}
                }
                let rules = r.rules.unwrap_or_default();
                check_rules(&rules, r.data.as_ref())?;
                PolicyBody::Native(NativePolicy {
                    action,
                    rules,
                    data: r.data,
                    provider: r.provider,
                })
            }
            PolicyKind::Rego => {
                if r.rules.is_some() {
                    return Err("`rules` is only valid for native policies".into());
                }
                if r.action.is_some() {
                    return Err(
                        "`action` is not used by Rego policies: the Rego result decides".into(),
                    );
                }
                if r.provider.is_some() {
                    return Err("`provider` is only valid with action CUSTOM".into());
                }
                if r.modules.is_empty() && r.rego.is_none() {
                    return Err("a Rego policy needs `modules` or inline `rego`".into());
                }
                if r.proto_descriptor.is_some() {
                    return Err(
                        "`proto_descriptor` is not supported: Rampart does not decode \
                                gRPC messages, so `parsed_body` of a gRPC request is null"
                            .into(),
                    );
                }
                if r.with_request_body
                    .is_some_and(|b| b.max_request_bytes == 0)
                {
                    return Err("with_request_body.max_request_bytes must be more than 0".into());
                }
                let query = r.query.unwrap_or_else(|| DEFAULT_REGO_QUERY.to_owned());
                if !query.starts_with("data.") {
                    return Err(format!("query {query:?} must be a rule path under data."));
                }
                PolicyBody::Rego(RegoPolicySpec {
                    modules: r.modules,
                    inline: r.rego,
                    data_files: r.data_files,
                    data: r.data,
                    query,
                    rego_version: r.rego_version.unwrap_or_default(),
                    result: r.result.unwrap_or_default(),
                    with_request_body: r.with_request_body,
                    include_peer_certificate: r.include_peer_certificate.unwrap_or(false),
                })
            }
        };
        Ok(Policy {
            name: r.name,
            ports: r.ports,
            dry_run: r.dry_run,
            body,
        })
    }
}

fn check_rules(rules: &[Rule], data: Option<&serde_json::Value>) -> Result<(), String> {
    let mut names = HashSet::new();
    for (i, rule) in rules.iter().enumerate() {
        let name = rule_name(rule, i);
        if !names.insert(name.clone()) {
            return Err(format!("rules[{i}]: duplicate rule name {name:?}"));
        }
        if let Some(r) = &rule.from.principals_from_data {
            let data = data.ok_or_else(|| {
                format!("rules[{i}].from.principals_from_data: the policy has no `data`")
            })?;
            crate::compile::DataTable::build(data, r)
                .map_err(|e| format!("rules[{i}].from.principals_from_data: {e}"))?;
        }
    }
    Ok(())
}

/// The name a rule is reported under.
pub(crate) fn rule_name(rule: &Rule, index: usize) -> String {
    match &rule.name {
        Some(n) => n.clone(),
        None => format!("rule-{index}"),
    }
}
