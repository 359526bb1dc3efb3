//! Compilation: validated policies become matchers built once per load, so a
//! native decision does no heap allocation. Principals go into hash sets
//! (exact IDs, trust domains, DNS names) and short prefix lists; each policy
//! indexes its rules by exact principal so that a decision looks at the
//! rules that can match the peer, not at every rule; methods are a bitset.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use ipnet::IpNet;

use crate::model::{
    Action, Condition, DataKey, DataRef, HostPattern, NativePolicy, PathMatcher, PathPattern,
    PrincipalPattern, Rule, TemplateSegment,
};
use crate::normalize::NormalizeOptions;
use crate::rego::RegoEngine;
use crate::{DefaultAction, PolicyInfo};

/// Everything a decision needs, built once.
#[derive(Debug, Default)]
pub(crate) struct Compiled {
    pub policies: Vec<CPolicy>,
    /// Policies per explicitly named port (including every-port policies).
    pub by_port: HashMap<u16, PortIndex>,
    /// Policies for every other port (those without a `ports` selector).
    pub any_port: PortIndex,
    pub default: DefaultAction,
    pub normalize: NormalizeOptions,
    pub infos: Vec<PolicyInfo>,
}

/// Indices into [`Compiled::policies`], by role, in file order.
#[derive(Debug, Default, Clone)]
pub(crate) struct PortIndex {
    pub deny: Vec<u32>,
    pub rego: Vec<u32>,
    pub allow: Vec<u32>,
    pub audit: Vec<u32>,
    pub custom: Vec<u32>,
    /// Dry-run policies of any kind.
    pub dry_run: Vec<u32>,
    /// The `with_request_body` of a Rego policy on this port, if any asks
    /// (they all ask the same: `load` refuses a mix).
    pub request_body: Option<crate::model::WithRequestBody>,
    /// Whether a Rego policy on this port asks for the peer certificate.
    pub peer_certificate: bool,
}

#[derive(Debug)]
pub(crate) struct CPolicy {
    pub name: Arc<str>,
    pub ports: Vec<u16>,
    pub dry_run: bool,
    pub kind: CKind,
}

#[derive(Debug)]
pub(crate) enum CKind {
    Native(CNative),
    Rego(Arc<RegoEngine>),
}

#[derive(Debug)]
pub(crate) struct CNative {
    pub action: Action,
    /// The provider of a CUSTOM policy.
    pub provider: Option<crate::model::ProviderName>,
    pub rules: Vec<CRule>,
    /// Rules that name this exact SPIFFE ID and nothing else in `principals`.
    pub by_principal: HashMap<Box<str>, Vec<u32>>,
    /// Every other rule.
    pub other: Vec<u32>,
}

#[derive(Debug)]
pub(crate) struct CRule {
    pub name: Arc<str>,
    pub needs_http: bool,
    pub principals: Option<PrincipalSet>,
    pub not_principals: Option<PrincipalSet>,
    pub from_data: Option<DataTable>,
    pub unauthenticated: bool,
    pub source_cidrs: Option<Vec<IpNet>>,
    pub not_source_cidrs: Vec<IpNet>,
    pub ports: Option<Vec<u16>>,
    pub not_ports: Vec<u16>,
    pub hosts: Option<Vec<HostPattern>>,
    pub not_hosts: Vec<HostPattern>,
    pub methods: Option<MethodSet>,
    pub not_methods: Option<MethodSet>,
    pub paths: Option<PathSet>,
    pub not_paths: Option<PathSet>,
    pub grpc_services: Option<HashSet<Box<str>>>,
    pub grpc_methods: Option<HashSet<Box<str>>>,
    pub when: Vec<Condition>,
}

/// A set of principal patterns.
#[derive(Debug, Default)]
pub(crate) struct PrincipalSet {
    pub any: bool,
    pub exact: HashSet<Box<str>>,
    pub prefixes: Vec<Box<str>>,
    pub trust_domains: HashSet<Box<str>>,
    pub dns: HashSet<Box<str>>,
    pub dns_suffixes: Vec<Box<str>>,
}

impl PrincipalSet {
    pub fn new<'p>(patterns: impl IntoIterator<Item = &'p PrincipalPattern>) -> Self {
        let mut set = PrincipalSet::default();
        for p in patterns {
            match p {
                PrincipalPattern::Any => set.any = true,
                PrincipalPattern::Exact(s) => {
                    set.exact.insert(s.as_str().into());
                }
                PrincipalPattern::Prefix(s) => set.prefixes.push(s.as_str().into()),
                PrincipalPattern::TrustDomain(s) => {
                    set.trust_domains.insert(s.as_str().into());
                }
                PrincipalPattern::Dns(s) => {
                    set.dns.insert(s.as_str().into());
                }
                PrincipalPattern::DnsSuffix(s) => set.dns_suffixes.push(s.as_str().into()),
            }
        }
        set
    }
}

/// A set of methods: a bit per standard method plus a list of others.
#[derive(Debug, Default)]
pub(crate) struct MethodSet {
    pub bits: u16,
    pub extension: Vec<http::Method>,
}

impl MethodSet {
    pub fn new<'m>(methods: impl IntoIterator<Item = &'m http::Method>) -> Self {
        let mut set = MethodSet::default();
        for m in methods {
            match method_bit(m) {
                Some(bit) => set.bits |= bit,
                None => set.extension.push(m.clone()),
            }
        }
        set
    }
}

pub(crate) fn method_bit(m: &http::Method) -> Option<u16> {
    const STANDARD: [http::Method; 9] = [
        http::Method::GET,
        http::Method::HEAD,
        http::Method::POST,
        http::Method::PUT,
        http::Method::DELETE,
        http::Method::CONNECT,
        http::Method::OPTIONS,
        http::Method::TRACE,
        http::Method::PATCH,
    ];
    STANDARD.iter().position(|s| s == m).map(|i| 1 << i)
}

/// Path patterns by kind. Case-insensitive entries are rare, so they are
/// scanned rather than hashed.
#[derive(Debug, Default)]
pub(crate) struct PathSet {
    pub any: bool,
    pub exact: HashSet<Box<str>>,
    pub exact_ignore_case: Vec<Box<str>>,
    /// Prefix, and whether it ignores case.
    pub prefixes: Vec<(Box<str>, bool)>,
    /// Template, and whether it ignores case.
    pub templates: Vec<(Vec<TemplateSegment>, bool)>,
    /// Anchored regular expressions (case folding compiled in).
    pub regexes: Vec<regex::bytes::Regex>,
}

impl PathSet {
    pub fn new<'p>(matchers: impl IntoIterator<Item = &'p PathMatcher>) -> Self {
        let mut set = PathSet::default();
        for m in matchers {
            let ic = m.ignore_case;
            match &m.pattern {
                PathPattern::Any => set.any = true,
                PathPattern::Exact(s) if ic => set.exact_ignore_case.push(s.as_str().into()),
                PathPattern::Exact(s) => {
                    set.exact.insert(s.as_str().into());
                }
                PathPattern::Prefix(s) => set.prefixes.push((s.as_str().into(), ic)),
                PathPattern::Template(t) => set.templates.push((t.clone(), ic)),
                PathPattern::Regex(r) => set.regexes.push(r.regex.clone()),
            }
        }
        set
    }
}

/// A compiled `principals_from_data` lookup.
#[derive(Debug)]
pub(crate) struct DataTable {
    pub key: Option<DataKey>,
    /// Keyed by the request attribute (`""` when there is no placeholder).
    pub table: HashMap<Box<str>, PrincipalSet>,
}

impl DataTable {
    /// Walks the data document along `r`; the values found must be lists of
    /// principal patterns.
    pub fn build(data: &serde_json::Value, r: &DataRef) -> Result<DataTable, String> {
        let mut at = data;
        for k in &r.before {
            at = at
                .get(k.as_str())
                .ok_or_else(|| format!("data has no key {k:?} (in {:?})", r.text))?;
        }
        let mut table = HashMap::new();
        match r.key {
            None => {
                table.insert("".into(), principal_list(at, &r.text)?);
            }
            Some(key) => {
                let obj = at.as_object().ok_or_else(|| {
                    format!(
                        "{:?}: the value at {} must be an object",
                        r.text,
                        key.as_str()
                    )
                })?;
                for (k, mut v) in obj {
                    for a in &r.after {
                        v = v
                            .get(a.as_str())
                            .ok_or_else(|| format!("data entry {k:?} has no key {a:?}"))?;
                    }
                    let set = principal_list(v, &format!("{} for {k:?}", r.text))?;
                    table.insert(k.as_str().into(), set);
                }
            }
        }
        Ok(DataTable { key: r.key, table })
    }
}

fn principal_list(v: &serde_json::Value, what: &str) -> Result<PrincipalSet, String> {
    let arr = v
        .as_array()
        .ok_or_else(|| format!("{what}: expected a list of principals"))?;
    let mut patterns = Vec::with_capacity(arr.len());
    for item in arr {
        let s = item
            .as_str()
            .ok_or_else(|| format!("{what}: principals must be strings"))?;
        patterns
            .push(PrincipalPattern::try_from(s.to_owned()).map_err(|e| format!("{what}: {e}"))?);
    }
    Ok(PrincipalSet::new(&patterns))
}

impl CNative {
    pub fn compile(p: &NativePolicy) -> Result<CNative, String> {
        let mut rules = Vec::with_capacity(p.rules.len());
        let mut by_principal: HashMap<Box<str>, Vec<u32>> = HashMap::new();
        let mut other = Vec::new();
        for (i, rule) in p.rules.iter().enumerate() {
            let idx = u32::try_from(i).map_err(|_| "too many rules".to_owned())?;
            let compiled = compile_rule(rule, i, p.data.as_ref())?;
            match exact_only(rule) {
                Some(ids) => {
                    for id in ids {
                        let list = by_principal.entry(id.into()).or_default();
                        // A rule may list the same ID twice; index it once.
                        if list.last() != Some(&idx) {
                            list.push(idx);
                        }
                    }
                }
                None => other.push(idx),
            }
            rules.push(compiled);
        }
        Ok(CNative {
            action: p.action,
            provider: p.provider.clone(),
            rules,
            by_principal,
            other,
        })
    }
}

/// The exact SPIFFE IDs of a rule whose `from` admits only those (so it can
/// be indexed), or `None`.
fn exact_only(rule: &Rule) -> Option<Vec<&str>> {
    if rule.from.unauthenticated || rule.from.principals_from_data.is_some() {
        return None;
    }
    let principals = rule.from.principals.as_ref()?;
    principals
        .0
        .iter()
        .map(|p| match p {
            PrincipalPattern::Exact(s) => Some(s.as_str()),
            PrincipalPattern::Any
            | PrincipalPattern::Prefix(_)
            | PrincipalPattern::TrustDomain(_)
            | PrincipalPattern::Dns(_)
            | PrincipalPattern::DnsSuffix(_) => None,
        })
        .collect()
}

fn compile_rule(
    rule: &Rule,
    index: usize,
    data: Option<&serde_json::Value>,
) -> Result<CRule, String> {
    let from_data = match (&rule.from.principals_from_data, data) {
        (Some(r), Some(d)) => Some(DataTable::build(d, r)?),
        (Some(_), None) => return Err("principals_from_data needs the policy's `data`".into()),
        (None, _) => None,
    };
    let to = &rule.to;
    let opt_set = |v: &[crate::model::MethodName]| {
        (!v.is_empty()).then(|| MethodSet::new(v.iter().map(|m| &m.0)))
    };
    Ok(CRule {
        name: Arc::from(crate::model::rule_name(rule, index)),
        needs_http: to.needs_http() || !rule.when.is_empty(),
        principals: rule
            .from
            .principals
            .as_ref()
            .map(|p| PrincipalSet::new(&p.0)),
        not_principals: (!rule.from.not_principals.is_empty())
            .then(|| PrincipalSet::new(&rule.from.not_principals)),
        from_data,
        unauthenticated: rule.from.unauthenticated,
        source_cidrs: rule.from.source_cidrs.as_ref().map(|c| c.0.clone()),
        not_source_cidrs: rule.from.not_source_cidrs.clone(),
        ports: to.ports.as_ref().map(|p| p.0.clone()),
        not_ports: to.not_ports.clone(),
        hosts: to.hosts.as_ref().map(|h| h.0.clone()),
        not_hosts: to.not_hosts.clone(),
        methods: to
            .methods
            .as_ref()
            .map(|m| MethodSet::new(m.0.iter().map(|m| &m.0))),
        not_methods: opt_set(&to.not_methods),
        paths: to.paths.as_ref().map(|p| PathSet::new(&p.0)),
        not_paths: (!to.not_paths.is_empty()).then(|| PathSet::new(&to.not_paths)),
        grpc_services: to
            .grpc_services
            .as_ref()
            .map(|s| s.0.iter().map(|s| s.0.as_str().into()).collect()),
        grpc_methods: to
            .grpc_methods
            .as_ref()
            .map(|s| s.0.iter().map(|s| s.0.as_str().into()).collect()),
        when: rule.when.clone(),
    })
}

impl Compiled {
    /// Builds the port index once every policy is compiled.
    pub fn index(&mut self) {
        let mut by_port: HashMap<u16, PortIndex> = HashMap::new();
        for p in &self.policies {
            for port in &p.ports {
                by_port.entry(*port).or_default();
            }
        }
        let mut any_port = PortIndex::default();
        for (i, p) in self.policies.iter().enumerate() {
            // Invariant: load refuses more than u32::MAX policies long before.
            let i = u32::try_from(i).expect("policy count fits u32");
            let targets: Vec<&mut PortIndex> = if p.ports.is_empty() {
                let mut all: Vec<&mut PortIndex> = by_port.values_mut().collect();
                all.push(&mut any_port);
                all
            } else {
                by_port
                    .iter_mut()
                    .filter(|(port, _)| p.ports.contains(port))
                    .map(|(_, idx)| idx)
                    .collect()
            };
            for t in targets {
                if let CKind::Rego(engine) = &p.kind
                    && let Some(body) = engine.request_body()
                {
                    t.request_body = Some(body);
                }
                if let CKind::Rego(engine) = &p.kind {
                    t.peer_certificate |= engine.includes_peer_certificate();
                }
                let list = match (&p.kind, p.dry_run) {
                    (_, true) => &mut t.dry_run,
                    (CKind::Rego(_), false) => &mut t.rego,
                    (CKind::Native(n), false) => match n.action {
                        Action::Allow => &mut t.allow,
                        Action::Deny => &mut t.deny,
                        Action::Audit => &mut t.audit,
                        Action::Custom => &mut t.custom,
                    },
                };
                list.push(i);
            }
        }
        self.by_port = by_port;
        self.any_port = any_port;
    }

    /// The policies that apply to a port.
    pub fn port(&self, port: u16) -> &PortIndex {
        self.by_port.get(&port).unwrap_or(&self.any_port)
    }
}
