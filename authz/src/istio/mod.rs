//! Istio's security resources, read as they are and decided with Istio's
//! semantics (not through the native format's defaults, which differ on
//! purpose: see docs/policy.md, "Native and Istio semantics").
//!
//! [`IstioPolicies::load`] reads `AuthorizationPolicy`, `PeerAuthentication`
//! and `RequestAuthentication` (`security.istio.io/v1`, `v1beta1`) from
//! multi-document YAML, keeps those that attach to this [`Workload`]
//! (its namespace, the root namespace, its labels; `targetRefs` never
//! attach to a sidecar, as in Istio) and compiles them. A decision follows
//! Istio's order: CUSTOM, DENY, ALLOW (AUDIT and dry-run only noted); with
//! no ALLOW policy the request is allowed. The CUSTOM step is taken last
//! here, which gives the same outcome since its verdict can only narrow.
//!
//! It sits in `authz` beside the native policies: [`crate::Authorizer`]
//! asks it first when a sidecar is configured with Istio files.

mod compile;
mod matcher;
mod peer;
pub mod resource;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use peer::{PeerMode, PeerModes};

use crate::external::{Consult, Evaluation};
use crate::load::{LoadError, LoadErrors};
use crate::{ConnectionInfo, Decision, Denial, DenyReason, Notes, Permit, RequestInfo, RuleRef};
use compile::IPolicy;
use matcher::Attrs;
use resource::{Meta, Resource};

/// The annotation that makes a policy dry-run.
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// Who this sidecar is, for attaching policies.
#[derive(Debug, Clone)]
pub struct Workload {
    /// The workload's namespace.
    pub namespace: String,
    /// The workload's labels (`selector.matchLabels` must be a subset).
    pub labels: BTreeMap<String, String>,
    /// Istio's root namespace (mesh-wide policies), `istio-system` by
    /// default.
    pub root_namespace: String,
    /// The mesh's trust domain (the sidecar's own).
    pub trust_domain: String,
    /// Trust domain aliases (mesh config `trustDomainAliases`).
    pub trust_domain_aliases: Vec<String>,
    /// The inbound ports that may carry opaque TCP (declared `detect` or
    /// `opaque`); `None` when unknown (every port may). Rampart sends only
    /// HTTP requests to an external authorizer, so a CUSTOM rule that can
    /// reach one of these ports is refused at load.
    pub tcp_ports: Option<Vec<u16>>,
    /// Where fetched JWKS are kept; shared by successive loads (reloads) so
    /// that the fetcher's keys stay in use.
    pub jwks_cache: Arc<crate::jwt::JwksCache>,
}

impl Workload {
    pub(crate) fn trust_domain_bundle(&self) -> Vec<String> {
        let mut v = vec![self.trust_domain.clone()];
        v.extend(self.trust_domain_aliases.iter().cloned());
        v
    }

    fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        labels.iter().all(|(k, v)| self.labels.get(k) == Some(v))
    }
}

/// An AuthorizationPolicy action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IstioAction {
    /// Allow when a rule matches (and no DENY did).
    Allow,
    /// Refuse when a rule matches.
    Deny,
    /// Note when a rule matches.
    Audit,
    /// Ask the external authorizer when a rule matches.
    Custom,
}

impl IstioAction {
    /// Istio's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            IstioAction::Allow => "ALLOW",
            IstioAction::Deny => "DENY",
            IstioAction::Audit => "AUDIT",
            IstioAction::Custom => "CUSTOM",
        }
    }
}

/// One resource that was read, attached or not, for `rampart policy check`
/// and the start-up log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceInfo {
    /// `AuthorizationPolicy`, `PeerAuthentication`, `RequestAuthentication`.
    pub kind: &'static str,
    /// `<namespace>/<name>`.
    pub name: String,
    /// The file it came from.
    pub file: PathBuf,
    /// `None` when it applies to this workload, else why not.
    pub not_attached: Option<String>,
    /// AuthorizationPolicy: its action.
    pub action: Option<IstioAction>,
    /// AuthorizationPolicy: dry-run.
    pub dry_run: bool,
    /// AuthorizationPolicy: number of rules.
    pub rules: usize,
}

/// The Istio resources that apply to this workload, compiled.
#[derive(Debug, Default)]
pub struct IstioPolicies {
    policies: Vec<IPolicy>,
    peer: PeerModes,
    resources: Vec<ResourceInfo>,
    authn: crate::jwt::RequestAuthn,
    jwks: Arc<crate::jwt::JwksCache>,
    jwks_uris: Vec<String>,
}

impl IstioPolicies {
    /// Reads and compiles Istio resource files for `workload`. Every error
    /// in every file is reported; a field Rampart cannot honour is an
    /// error naming it.
    pub fn load<P: AsRef<Path>>(paths: &[P], workload: &Workload) -> Result<Self, LoadErrors> {
        Self::load_with(paths, &[], workload)
    }

    /// Reads and compiles the resource files in `paths` and the resources
    /// in `objects` (`(origin, YAML)`: an object from the Kubernetes API,
    /// say, its origin naming it in errors) together, as one set.
    pub fn load_with<P: AsRef<Path>>(
        paths: &[P],
        objects: &[(String, String)],
        workload: &Workload,
    ) -> Result<Self, LoadErrors> {
        let mut texts = Vec::new();
        let mut errors = Vec::new();
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
        texts.extend(
            objects
                .iter()
                .map(|(origin, yaml)| (PathBuf::from(origin), yaml.clone())),
        );
        Self::from_texts(&texts, workload, errors)
    }

    /// Compiles Istio resources from YAML text (`origin` names it in errors).
    pub fn from_yaml(origin: &str, yaml: &str, workload: &Workload) -> Result<Self, LoadErrors> {
        Self::from_texts(
            &[(PathBuf::from(origin), yaml.to_owned())],
            workload,
            Vec::new(),
        )
    }

    fn from_texts(
        texts: &[(PathBuf, String)],
        w: &Workload,
        mut errors: Vec<LoadError>,
    ) -> Result<Self, LoadErrors> {
        let mut out = IstioPolicies {
            jwks: w.jwks_cache.clone(),
            ..IstioPolicies::default()
        };
        let mut mesh_pa = None;
        let mut ns_pa = None;
        let mut wl_pa = None;
        let mut seen = BTreeMap::new();
        for (file, text) in texts {
            let (docs, parse_errors) = resource::parse_documents(text);
            for e in parse_errors {
                errors.push(LoadError::Invalid {
                    file: file.clone(),
                    line: e.line,
                    column: e.column,
                    field: e.field,
                    message: e.message,
                });
            }
            for doc in docs {
                let invalid = |field: String, message: String| LoadError::Invalid {
                    file: file.clone(),
                    line: Some(doc.line),
                    column: None,
                    field,
                    message,
                };
                let (kind, meta) = match &doc.resource {
                    Resource::Authorization(m, _) => ("AuthorizationPolicy", m),
                    Resource::Peer(m, _) => ("PeerAuthentication", m),
                    Resource::Request(m, _) => ("RequestAuthentication", m),
                };
                if meta.name.is_empty() {
                    errors.push(invalid("metadata.name".into(), "required".into()));
                    continue;
                }
                let ns = meta
                    .namespace
                    .clone()
                    .unwrap_or_else(|| w.namespace.clone());
                let name = format!("{ns}/{}", meta.name);
                if let Some(first) = seen.insert((kind, name.clone()), file.clone()) {
                    errors.push(invalid(
                        "metadata.name".into(),
                        format!("{kind} {name} is already defined in {}", first.display()),
                    ));
                    continue;
                }
                let mut info = ResourceInfo {
                    kind,
                    name: name.clone(),
                    file: file.clone(),
                    not_attached: None,
                    action: None,
                    dry_run: false,
                    rules: 0,
                };
                match &doc.resource {
                    Resource::Authorization(meta, spec) => {
                        let mut errs = Vec::new();
                        let dry_run = dry_run(meta, &mut errs);
                        if spec.selector.is_some()
                            && (spec.target_ref.is_some() || !spec.target_refs.is_empty())
                        {
                            errs.push((
                                "spec.selector".into(),
                                "selector and targetRefs are exclusive".into(),
                            ));
                        }
                        let selector = spec.selector.as_ref().map(|s| &s.match_labels);
                        let has_targets = spec.target_ref.is_some() || !spec.target_refs.is_empty();
                        info.not_attached = attachment(w, &ns, selector, has_targets);
                        let compiled = compile::compile_policy(
                            Arc::from(name),
                            &ns,
                            spec,
                            dry_run,
                            w,
                            &mut errs,
                        );
                        errors.extend(errs.into_iter().map(|(f, m)| invalid(f, m)));
                        if let Some(p) = compiled {
                            info.action = Some(p.action);
                            info.dry_run = p.dry_run;
                            info.rules = p.rules.len();
                            if info.not_attached.is_none() {
                                out.policies.push(p);
                            }
                        }
                    }
                    Resource::Peer(_, spec) => {
                        if let Err(m) = peer::parse_mode(&spec.mtls) {
                            errors.push(invalid("spec.mtls.mode".into(), m));
                        }
                        for (port, m) in &spec.port_level_mtls {
                            if port.parse::<u16>().is_err() {
                                errors.push(invalid(
                                    format!("spec.portLevelMtls[{port}]"),
                                    format!("{port:?} is not a port"),
                                ));
                            }
                            if let Err(msg) = peer::parse_mode(&Some(m.clone())) {
                                errors
                                    .push(invalid(format!("spec.portLevelMtls[{port}].mode"), msg));
                            }
                        }
                        // pilot: an empty matchLabels is no selector.
                        let selector = spec
                            .selector
                            .as_ref()
                            .map(|s| &s.match_labels)
                            .filter(|l| !l.is_empty());
                        if selector.is_none() && !spec.port_level_mtls.is_empty() {
                            // Istio's validation refuses this.
                            errors.push(invalid(
                                "spec.portLevelMtls".into(),
                                "port-level modes need a workload selector".into(),
                            ));
                        }
                        info.not_attached = attachment(w, &ns, selector, false);
                        if info.not_attached.is_none()
                            && selector.is_some()
                            && ns == w.root_namespace
                        {
                            // pilot's ComposePeerAuthentication ignores them.
                            info.not_attached =
                                Some("a root-namespace policy with a selector is ignored".into());
                        }
                        if info.not_attached.is_none() {
                            // The first one at a level wins (Istio: the
                            // oldest); later ones are reported.
                            let slot = match (selector.is_some(), ns == w.root_namespace) {
                                (false, true) => &mut mesh_pa,
                                (false, false) => &mut ns_pa,
                                (true, _) => &mut wl_pa,
                            };
                            match slot {
                                None => *slot = Some((name.clone(), spec.clone())),
                                Some((first, _)) => {
                                    info.not_attached =
                                        Some(format!("{first} applies at the same level"))
                                }
                            }
                        }
                    }
                    Resource::Request(_, spec) => {
                        let selector = spec.selector.as_ref().map(|s| &s.match_labels);
                        let has_targets = spec.target_ref.is_some() || !spec.target_refs.is_empty();
                        info.not_attached = attachment(w, &ns, selector, has_targets);
                        let base = file.parent().map(Path::to_path_buf).unwrap_or_default();
                        let mut errs = Vec::new();
                        let rules = jwt_rules(spec, &base, &out.jwks, &mut errs);
                        errors.extend(errs.into_iter().map(|(f, m)| invalid(f, m)));
                        info.rules = rules.len();
                        if info.not_attached.is_none() {
                            for r in &rules {
                                if let crate::jwt::KeySource::Fetched { uri, .. } = &r.keys
                                    && !out.jwks_uris.contains(uri)
                                {
                                    out.jwks_uris.push(uri.clone());
                                }
                            }
                            out.authn.rules.extend(rules);
                        }
                    }
                }
                out.resources.push(info);
            }
        }
        if errors.is_empty() {
            errors.extend(out.custom_checks(w));
        }
        if !errors.is_empty() {
            return Err(LoadErrors(errors));
        }
        let level = |s: &Option<(String, resource::PeerAuthenticationSpec)>| {
            s.as_ref().map(|(name, spec)| (name.clone(), spec.clone()))
        };
        let (m, n, wl) = (level(&mesh_pa), level(&ns_pa), level(&wl_pa));
        out.peer = peer::compose(
            m.as_ref().map(|(name, spec)| peer::Level {
                name: name.clone(),
                spec,
            }),
            n.as_ref().map(|(name, spec)| peer::Level {
                name: name.clone(),
                spec,
            }),
            wl.as_ref().map(|(name, spec)| peer::Level {
                name: name.clone(),
                spec,
            }),
        );
        Ok(out)
    }

    /// Refusals for attached CUSTOM policies that Rampart cannot decide as
    /// Istio does.
    fn custom_checks(&self, w: &Workload) -> Vec<LoadError> {
        let mut errors = Vec::new();
        let custom: Vec<&IPolicy> = self.enforced(IstioAction::Custom).collect();
        let err = |policy: &IPolicy, field: String, message: String| {
            let file = self
                .resources
                .iter()
                .find(|r| r.name == *policy.name)
                .map(|r| r.file.clone())
                .unwrap_or_default();
            LoadError::Invalid {
                file,
                line: None,
                column: None,
                field: format!("{}: {field}", policy.name),
                message,
            }
        };
        let mut providers: Vec<&str> = custom
            .iter()
            .filter_map(|p| p.provider.as_ref().map(|n| n.as_str()))
            .collect();
        providers.sort_unstable();
        providers.dedup();
        if providers.len() > 1
            && let Some(p) = custom.first()
        {
            errors.push(err(
                p,
                "spec.provider.name".into(),
                format!(
                    "CUSTOM policies on this workload name {} providers ({}); Istio refuses the \
                     requests they match unless PILOT_ENABLE_MULTIPLE_CUSTOM_AUTHZ_PROVIDERS is set: \
                     use one provider",
                    providers.len(),
                    providers.join(", ")
                ),
            ));
        }
        for p in &custom {
            for r in &p.rules {
                let reaches_tcp = match (&w.tcp_ports, &r.ports) {
                    (Some(tcp), Some(ports)) => tcp.iter().any(|t| ports.contains(t)),
                    (Some(tcp), None) => !tcp.is_empty(),
                    (None, _) => true,
                };
                if reaches_tcp {
                    errors.push(err(
                        p,
                        format!("spec.rules[{}]", r.name.trim_start_matches("rule-")),
                        "this CUSTOM rule can match connections on ports that may carry opaque TCP, \
                         which Istio sends to a gRPC ext_authz provider and Rampart cannot: restrict \
                         it with `to.ports` to ports declared http, http2 or grpc"
                            .into(),
                    ));
                }
            }
        }
        errors
    }

    /// The JWT rules of the attached RequestAuthentications.
    pub fn request_authn(&self) -> &crate::jwt::RequestAuthn {
        &self.authn
    }

    /// The `http://` JWKS URIs to fetch into [`IstioPolicies::jwks_cache`].
    pub fn jwks_uris(&self) -> &[String] {
        &self.jwks_uris
    }

    /// The cache the JWKS fetcher fills.
    pub fn jwks_cache(&self) -> &Arc<crate::jwt::JwksCache> {
        &self.jwks
    }

    /// Every resource read, attached or not.
    pub fn resources(&self) -> &[ResourceInfo] {
        &self.resources
    }

    /// The composed PeerAuthentication modes.
    pub fn peer_modes(&self) -> &PeerModes {
        &self.peer
    }

    /// The providers that attached CUSTOM policies name.
    pub fn custom_providers(&self) -> Vec<crate::model::ProviderName> {
        let mut v: Vec<_> = self
            .policies
            .iter()
            .filter_map(|p| p.provider.clone())
            .collect();
        v.dedup();
        v
    }

    /// Decides a connection or request. `jwt` is the verified token
    /// payload, when one was accepted.
    pub(crate) fn evaluate(
        &self,
        conn: &ConnectionInfo<'_>,
        req: Option<&RequestInfo<'_>>,
        jwt: Option<&serde_json::Value>,
    ) -> Evaluation {
        let a = Attrs { conn, req, jwt };
        if conn.peer.is_none()
            && conn.peer_dns.is_empty()
            && self.peer.mode(conn.dest_port) == Some(PeerMode::Strict)
        {
            // Plaintext on a STRICT port: only a connection accepted while
            // the port was PERMISSIVE, before a reload made it STRICT (new
            // ones fail the handshake). Its requests are refused, and a
            // re-decided opaque connection closed, as Envoy drains them.
            let name = self.peer.from.last().map(|n| Arc::from(n.as_str()));
            return Evaluation::Decided(Decision::Deny(Denial::new(
                DenyReason::Unauthenticated,
                name,
            )));
        }
        let mut notes = Notes::default();
        self.dry_run(&a, &mut notes);
        for p in self.enforced(IstioAction::Audit) {
            if let Some(rule) = first_match(p, &a) {
                notes.audit = Some(rule_ref(p, rule));
                break;
            }
        }
        for p in self.enforced(IstioAction::Deny) {
            if let Some(rule) = first_match(p, &a) {
                let mut d = Denial::new(DenyReason::DeniedByRule, Some(p.name.clone()));
                d.rule = Some(rule);
                d.notes = notes;
                return Evaluation::Decided(Decision::Deny(d));
            }
        }
        let mut allows = self.enforced(IstioAction::Allow).peekable();
        let permit = match allows.peek() {
            // Istio: with no ALLOW policy on the workload, allow.
            None => Permit {
                policy: Arc::from("istio"),
                rule: Arc::from("no_allow_policy"),
                effects: None,
                notes,
                consulted: None,
            },
            Some(first) => {
                let first = first.name.clone();
                let matched = allows.find_map(|p| first_match(p, &a).map(|r| (p, r)));
                match matched {
                    Some((p, rule)) => Permit {
                        policy: p.name.clone(),
                        rule,
                        effects: None,
                        notes,
                        consulted: None,
                    },
                    None => {
                        let mut d = Denial::new(DenyReason::NotAllowed, Some(first));
                        d.notes = notes;
                        return Evaluation::Decided(Decision::Deny(d));
                    }
                }
            }
        };
        for p in self.enforced(IstioAction::Custom) {
            let Some(rule) = first_match(p, &a) else {
                continue;
            };
            // Invariant: compile_policy requires a provider on CUSTOM.
            let Some(provider) = p.provider.clone() else {
                unreachable!("CUSTOM policy without a provider")
            };
            if req.is_none() {
                // Rampart speaks ext_authz for HTTP only: fail closed.
                let mut d = Denial::new(DenyReason::RequiresHttp, Some(p.name.clone()));
                d.rule = Some(rule);
                d.notes = permit.notes;
                return Evaluation::Decided(Decision::Deny(d));
            }
            return Evaluation::Consult(Consult {
                provider,
                policy: p.name.clone(),
                rule,
                permit,
            });
        }
        Evaluation::Decided(Decision::Allow(permit))
    }

    fn enforced(&self, action: IstioAction) -> impl Iterator<Item = &IPolicy> {
        self.policies
            .iter()
            .filter(move |p| p.action == action && !p.dry_run)
    }

    /// Istio's shadow rules: a dry-run DENY that matches, or dry-run ALLOW
    /// policies none of which matches, would have refused.
    fn dry_run(&self, a: &Attrs<'_>, notes: &mut Notes) {
        for p in self.policies.iter().filter(|p| p.dry_run) {
            if p.action == IstioAction::Deny
                && let Some(rule) = first_match(p, a)
            {
                notes.dry_run_denied_by = Some(rule_ref(p, rule));
                return;
            }
        }
        let mut allows = self
            .policies
            .iter()
            .filter(|p| p.dry_run && p.action == IstioAction::Allow)
            .peekable();
        if let Some(first) = allows.peek() {
            let first = first.name.clone();
            if !allows.any(|p| first_match(p, a).is_some()) {
                notes.dry_run_denied_by = Some(RuleRef {
                    policy: first,
                    rule: Arc::from("no_rule_matched"),
                });
            }
        }
    }
}

/// The `jwtRules` of a RequestAuthentication. Keys: inline `jwks`, a
/// `file://` URI (read now, relative to the resource file) or an `http://`
/// URI (fetched by the sidecar, cached). What Rampart cannot honour is an
/// error naming it.
fn jwt_rules(
    spec: &resource::RequestAuthenticationSpec,
    base: &Path,
    cache: &Arc<crate::jwt::JwksCache>,
    errs: &mut compile::FieldErrors,
) -> Vec<crate::jwt::JwtRule> {
    use crate::jwt::{Jwks, JwtRule, KeySource, Location};
    let mut out = Vec::new();
    for (i, r) in spec.jwt_rules.iter().enumerate() {
        let at = |f: &str| format!("spec.jwtRules[{i}].{f}");
        let before = errs.len();
        if r.issuer.is_empty() {
            errs.push((at("issuer"), "required".into()));
        }
        for (f, unsupported) in [
            ("fromCookies", !r.from_cookies.is_empty()),
            (
                "outputClaimToHeaders",
                !r.output_claim_to_headers.is_empty(),
            ),
            ("timeout", r.timeout.is_some()),
        ] {
            if unsupported {
                errs.push((at(f), "not supported by Rampart".into()));
            }
        }
        let keys = match (&r.jwks, &r.jwks_uri) {
            (Some(inline), None) => Jwks::parse(inline)
                .map(|k| KeySource::Static(Arc::new(k)))
                .map_err(|m| errs.push((at("jwks"), m)))
                .ok(),
            (None, Some(uri)) if uri.starts_with("file://") => {
                let path = base.join(&uri["file://".len()..]);
                std::fs::read_to_string(&path)
                    .map_err(|e| format!("{}: {e}", path.display()))
                    .and_then(|t| Jwks::parse(&t))
                    .map(|k| KeySource::Static(Arc::new(k)))
                    .map_err(|m| errs.push((at("jwksUri"), m)))
                    .ok()
            }
            (None, Some(uri)) if uri.starts_with("http://") || uri.starts_with("https://") => {
                Some(KeySource::Fetched {
                    uri: uri.clone(),
                    cache: cache.clone(),
                })
            }
            (None, Some(uri)) => {
                errs.push((
                    at("jwksUri"),
                    format!(
                        "{uri:?}: Rampart fetches JWKS over http:// or https://, or reads file:// \
                         (a mounted copy)"
                    ),
                ));
                None
            }
            (Some(_), Some(_)) => {
                errs.push((at("jwks"), "give jwks or jwksUri, not both".into()));
                None
            }
            (None, None) => {
                // Istio would discover the issuer's OpenID configuration.
                errs.push((
                    at("jwksUri"),
                    "required: Rampart does not discover keys by OpenID configuration".into(),
                ));
                None
            }
        };
        let mut locations = Vec::new();
        for (j, h) in r.from_headers.iter().enumerate() {
            match http::HeaderName::from_bytes(h.name.to_ascii_lowercase().as_bytes()) {
                Ok(name) => locations.push(Location::Header {
                    name,
                    prefix: h.prefix.clone(),
                }),
                Err(_) => errs.push((
                    at(&format!("fromHeaders[{j}].name")),
                    format!("{:?} is not a header name", h.name),
                )),
            }
        }
        locations.extend(r.from_params.iter().cloned().map(Location::Param));
        if locations.is_empty() {
            locations = JwtRule::default_locations();
        }
        let output = match &r.output_payload_to_header {
            Some(h) => match http::HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()) {
                Ok(n) => Some(n),
                Err(_) => {
                    errs.push((
                        at("outputPayloadToHeader"),
                        format!("{h:?} is not a header name"),
                    ));
                    None
                }
            },
            None => None,
        };
        if let (Some(keys), true) = (keys, errs.len() == before) {
            out.push(JwtRule {
                issuer: r.issuer.clone(),
                audiences: r.audiences.clone(),
                keys,
                locations,
                forward_original_token: r.forward_original_token,
                output_payload_to_header: output,
            });
        }
    }
    out
}

fn first_match(p: &IPolicy, a: &Attrs<'_>) -> Option<Arc<str>> {
    p.rules
        .iter()
        .find(|r| r.matches(a, p.action))
        .map(|r| r.name.clone())
}

fn rule_ref(p: &IPolicy, rule: Arc<str>) -> RuleRef {
    RuleRef {
        policy: p.name.clone(),
        rule,
    }
}

/// Whether a policy in `ns` with this selector attaches to the workload
/// (pilot's `ShouldAttachPolicy` for a sidecar): `None` when it does.
fn attachment(
    w: &Workload,
    ns: &str,
    selector: Option<&BTreeMap<String, String>>,
    has_targets: bool,
) -> Option<String> {
    if has_targets {
        return Some("targetRefs attach to gateways and waypoints, never to a sidecar".into());
    }
    if ns != w.namespace && ns != w.root_namespace {
        return Some(format!(
            "namespace {ns} is neither the workload's ({}) nor the root namespace ({})",
            w.namespace, w.root_namespace
        ));
    }
    match selector {
        Some(labels) if !w.selects(labels) => {
            Some("its selector does not match the workload's labels".into())
        }
        Some(_) | None => None,
    }
}

/// `istio.io/dry-run`, parsed like Go's `strconv.ParseBool`; a bad value
/// is an error (Istio would log it and enforce the policy).
fn dry_run(meta: &Meta, errs: &mut compile::FieldErrors) -> bool {
    match meta.annotations.get(DRY_RUN_ANNOTATION).map(String::as_str) {
        None => false,
        Some("1" | "t" | "T" | "TRUE" | "true" | "True") => true,
        Some("0" | "f" | "F" | "FALSE" | "false" | "False") => false,
        Some(other) => {
            errs.push((
                format!("metadata.annotations[{DRY_RUN_ANNOTATION}]"),
                format!("{other:?} is not a boolean"),
            ));
            false
        }
    }
}
