//! AuthorizationPolicy resources become rules of attribute tests, the way
//! pilot's `authz/model.New` and its generators turn them into Envoy RBAC:
//! a rule is (any `from`) and (any `to`) and (every `when`); an absent
//! `from` or `to` matches anything, plaintext included. What Istio's
//! validation webhook would refuse, or Rampart cannot evaluate, is an
//! error naming the field: never a rule dropped, never a wider policy.

use std::sync::Arc;

use super::matcher::{Cond, HeaderMatch, IpAttr, PathMatch, StrMatch, Test, parse_cidr};
use super::resource::{AuthorizationPolicySpec, ConditionSpec, OperationSpec, SourceSpec};
use super::{IstioAction, Workload};
use crate::model::ProviderName;

/// A compiled AuthorizationPolicy attached to this workload.
#[derive(Debug)]
pub(crate) struct IPolicy {
    /// `<namespace>/<name>`.
    pub name: Arc<str>,
    pub action: IstioAction,
    /// `istio.io/dry-run: "true"`: evaluated and reported, never enforced.
    pub dry_run: bool,
    /// CUSTOM: the provider to consult.
    pub provider: Option<ProviderName>,
    /// No rules: the policy matches nothing (an ALLOW without rules still
    /// counts as an ALLOW policy, so it denies everything).
    pub rules: Vec<IRule>,
}

/// One rule.
#[derive(Debug)]
pub(crate) struct IRule {
    /// `rule-<index>` (Istio's `ns[..]-policy[..]-rule[i]`).
    pub name: Arc<str>,
    /// Each entry is one `from.source` (its keys ANDed); empty: any source.
    pub from: Vec<Vec<Cond>>,
    /// Each entry is one `to.operation`; empty: any operation.
    pub to: Vec<Vec<Cond>>,
    /// The `when` conditions, all of which must hold.
    pub when: Vec<Cond>,
    /// Whether any key is HTTP-only (then an ALLOW rule never matches a
    /// TCP connection).
    pub http_only: bool,
    /// The destination ports it can match (`to.ports`, `destination.port`);
    /// `None`: any port.
    pub ports: Option<std::collections::BTreeSet<u16>>,
}

impl IRule {
    /// Istio's TCP filter chain: an ALLOW rule with an HTTP-only key is
    /// skipped (it never allows); in DENY, AUDIT and CUSTOM rules the
    /// HTTP-only keys are dropped (the rule matches more, so it refuses
    /// more).
    pub fn matches(&self, a: &super::matcher::Attrs<'_>, action: IstioAction) -> bool {
        let tcp = a.req.is_none();
        if tcp && self.http_only && action == IstioAction::Allow {
            return false;
        }
        let all = |conds: &[Cond]| conds.iter().all(|c| (tcp && c.http_only()) || c.matches(a));
        (self.from.is_empty() || self.from.iter().any(|f| all(f)))
            && (self.to.is_empty() || self.to.iter().any(|t| all(t)))
            && all(&self.when)
    }
}

/// Errors as (field path, message).
pub(crate) type FieldErrors = Vec<(String, String)>;

pub(crate) fn compile_policy(
    name: Arc<str>,
    namespace: &str,
    spec: &AuthorizationPolicySpec,
    dry_run: bool,
    w: &Workload,
    errs: &mut FieldErrors,
) -> Option<IPolicy> {
    let before = errs.len();
    let action = match spec.action.as_deref() {
        None | Some("ALLOW") => IstioAction::Allow,
        Some("DENY") => IstioAction::Deny,
        Some("AUDIT") => IstioAction::Audit,
        Some("CUSTOM") => IstioAction::Custom,
        Some(other) => {
            errs.push((
                "spec.action".into(),
                format!("{other:?} is not ALLOW, DENY, AUDIT or CUSTOM"),
            ));
            IstioAction::Allow
        }
    };
    let provider = match (&spec.provider, action) {
        (Some(p), IstioAction::Custom) => match ProviderName::try_from(p.name.clone()) {
            Ok(n) => Some(n),
            Err(m) => {
                errs.push(("spec.provider.name".into(), m.to_string()));
                None
            }
        },
        (None, IstioAction::Custom) => {
            errs.push((
                "spec.provider".into(),
                "a CUSTOM policy needs a provider".into(),
            ));
            None
        }
        (Some(_), _) => {
            errs.push((
                "spec.provider".into(),
                "only a CUSTOM policy has a provider".into(),
            ));
            None
        }
        (None, _) => None,
    };
    if dry_run && action == IstioAction::Custom {
        // Rampart's external authorizer has no shadow mode.
        errs.push((
            "metadata.annotations[istio.io/dry-run]".into(),
            "dry-run CUSTOM policies are not supported".into(),
        ));
    }
    let mut rules = Vec::new();
    for (i, rule) in spec.rules.iter().enumerate() {
        // Istio skips a null rule ("skipped nil rule").
        let Some(rule) = rule else { continue };
        let at = format!("spec.rules[{i}]");
        let mut from = Vec::new();
        for (j, f) in rule.from.iter().enumerate() {
            let field = format!("{at}.from[{j}].source");
            match &f.source {
                Some(s) => from.push(source(s, namespace, w, &field, errs)),
                None => errs.push((field, "a `from` entry needs a source".into())),
            }
        }
        let mut to = Vec::new();
        for (j, t) in rule.to.iter().enumerate() {
            let field = format!("{at}.to[{j}].operation");
            match &t.operation {
                Some(o) => to.push(operation(o, &field, errs)),
                None => errs.push((field, "a `to` entry needs an operation".into())),
            }
        }
        let when = rule
            .when
            .iter()
            .enumerate()
            .filter_map(|(j, c)| condition(c, namespace, w, &format!("{at}.when[{j}]"), errs))
            .collect::<Vec<_>>();
        let http_only = from
            .iter()
            .chain(&to)
            .flatten()
            .chain(&when)
            .any(Cond::http_only);
        rules.push(IRule {
            name: Arc::from(format!("rule-{i}")),
            from,
            to,
            when,
            http_only,
            ports: rule_ports(rule),
        });
    }
    (errs.len() == before).then_some(IPolicy {
        name,
        action,
        dry_run,
        provider,
        rules,
    })
}

/// The ports a rule can match: every `to` entry must name ports, and a
/// `destination.port` condition narrows them further.
fn rule_ports(rule: &super::resource::RuleSpec) -> Option<std::collections::BTreeSet<u16>> {
    use std::collections::BTreeSet;
    let parse = |v: &[String]| {
        v.iter()
            .filter_map(|p| p.parse().ok())
            .collect::<BTreeSet<u16>>()
    };
    let mut ports: Option<BTreeSet<u16>> = None;
    if !rule.to.is_empty() {
        let mut union = BTreeSet::new();
        for t in &rule.to {
            match t.operation.as_ref().map(|o| &o.ports) {
                Some(p) if !p.is_empty() => union.extend(parse(p)),
                Some(_) | None => return rule_when_ports(rule, None),
            }
        }
        ports = Some(union);
    }
    rule_when_ports(rule, ports)
}

fn rule_when_ports(
    rule: &super::resource::RuleSpec,
    mut ports: Option<std::collections::BTreeSet<u16>>,
) -> Option<std::collections::BTreeSet<u16>> {
    for c in rule.when.iter().filter(|c| c.key == "destination.port") {
        if c.values.is_empty() {
            continue;
        }
        let these = c.values.iter().filter_map(|p| p.parse().ok()).collect();
        ports = Some(match ports {
            Some(p) => p.intersection(&these).copied().collect(),
            None => these,
        });
    }
    ports
}

fn source(
    s: &SourceSpec,
    namespace: &str,
    w: &Workload,
    at: &str,
    errs: &mut FieldErrors,
) -> Vec<Cond> {
    let mut out = Vec::new();
    let mut key = |name: &str,
                   values: &[String],
                   not: &[String],
                   f: &dyn Fn(&str) -> Result<Vec<Test>, String>| {
        if let Some(c) = cond(values, not, &format!("{at}.{name}"), f, errs) {
            out.push(c);
        }
    };
    key("principals", &s.principals, &s.not_principals, &|v| {
        principal_tests(v, w)
    });
    key(
        "requestPrincipals",
        &s.request_principals,
        &s.not_request_principals,
        &|v| Ok(vec![request_principal(v)]),
    );
    key("namespaces", &s.namespaces, &s.not_namespaces, &|v| {
        namespace_test(v).map(|t| vec![t])
    });
    key(
        "serviceAccounts",
        &s.service_accounts,
        &s.not_service_accounts,
        &|v| service_account_test(v, namespace).map(|t| vec![t]),
    );
    key(
        "trustDomains",
        &s.trust_domains,
        &s.not_trust_domains,
        &|v| trust_domain_tests(v, w),
    );
    key("ipBlocks", &s.ip_blocks, &s.not_ip_blocks, &|v| {
        parse_cidr(v).map(|n| vec![Test::Ip(IpAttr::Source, n)])
    });
    key(
        "remoteIpBlocks",
        &s.remote_ip_blocks,
        &s.not_remote_ip_blocks,
        &|v| parse_cidr(v).map(|n| vec![Test::Ip(IpAttr::Remote, n)]),
    );
    if out.is_empty() && errs_for(errs, at) == 0 {
        // Istio's validation: "From.Source must not be empty".
        errs.push((at.to_owned(), "a source must set at least one field".into()));
    }
    out
}

fn operation(o: &OperationSpec, at: &str, errs: &mut FieldErrors) -> Vec<Cond> {
    let mut out = Vec::new();
    let mut key = |name: &str,
                   values: &[String],
                   not: &[String],
                   f: &dyn Fn(&str) -> Result<Vec<Test>, String>| {
        if let Some(c) = cond(values, not, &format!("{at}.{name}"), f, errs) {
            out.push(c);
        }
    };
    key("hosts", &o.hosts, &o.not_hosts, &|v| Ok(vec![host_test(v)]));
    key("ports", &o.ports, &o.not_ports, &|v| {
        port(v).map(|p| vec![Test::DestPort(p)])
    });
    key("methods", &o.methods, &o.not_methods, &|v| {
        Ok(vec![Test::Method(HeaderMatch::istio(v))])
    });
    key("paths", &o.paths, &o.not_paths, &|v| {
        PathMatch::istio(v).map(|m| vec![Test::Path(m)])
    });
    if out.is_empty() && errs_for(errs, at) == 0 {
        errs.push((
            at.to_owned(),
            "an operation must set at least one field".into(),
        ));
    }
    out
}

fn condition(
    c: &ConditionSpec,
    namespace: &str,
    w: &Workload,
    at: &str,
    errs: &mut FieldErrors,
) -> Option<Cond> {
    let k = c.key.as_str();
    let field = format!("{at}[{k}]");
    type Gen<'g> = Box<dyn Fn(&str) -> Result<Vec<Test>, String> + 'g>;
    let single = |t: Test| Ok(vec![t]);
    let g: Gen<'_> = match k {
        "source.ip" => Box::new(|v| parse_cidr(v).map(|n| vec![Test::Ip(IpAttr::Source, n)])),
        "remote.ip" => Box::new(|v| parse_cidr(v).map(|n| vec![Test::Ip(IpAttr::Remote, n)])),
        "destination.ip" => {
            Box::new(|v| parse_cidr(v).map(|n| vec![Test::Ip(IpAttr::Destination, n)]))
        }
        "destination.port" => Box::new(|v| port(v).map(|p| vec![Test::DestPort(p)])),
        "connection.sni" => Box::new(move |v| single(Test::Sni(StrMatch::istio(v, "")?))),
        "source.namespace" => Box::new(|v| namespace_test(v).map(|t| vec![t])),
        "source.principal" => Box::new(|v| principal_tests(v, w)),
        "source.serviceAccount" => {
            Box::new(move |v| service_account_test(v, namespace).map(|t| vec![t]))
        }
        "source.trustDomain" => Box::new(|v| trust_domain_tests(v, w)),
        "request.auth.principal" => Box::new(|v| Ok(vec![request_principal(v)])),
        "request.auth.audiences" => Box::new(|v| claim_test(&["aud"], v)),
        "request.auth.presenter" => Box::new(|v| claim_test(&["azp"], v)),
        _ if k.starts_with("experimental.") => {
            errs.push((
                field,
                format!(
                    "{k:?}: experimental attributes read Envoy filter metadata, which Rampart does not have"
                ),
            ));
            return None;
        }
        _ if k.starts_with("request.headers") => {
            let name = match bracketed(&k["request.headers".len()..]) {
                Some(n) => n,
                None => {
                    errs.push((field, format!("{k:?}: expected request.headers[<name>]")));
                    return None;
                }
            };
            let name = name.to_ascii_lowercase();
            let pseudo = matches!(
                name.as_str(),
                ":method" | ":authority" | ":path" | ":scheme"
            );
            if !pseudo && http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                errs.push((field, format!("{name:?} is not a header name")));
                return None;
            }
            let name: Box<str> = name.into();
            Box::new(move |v| single(Test::Header(name.clone(), HeaderMatch::istio(v))))
        }
        _ if k.starts_with("request.auth.claims") => {
            let path = match nested_claims(&k["request.auth.claims".len()..]) {
                Some(p) => p,
                None => {
                    errs.push((
                        field,
                        format!("{k:?}: expected request.auth.claims[<name>]([<name>]...)"),
                    ));
                    return None;
                }
            };
            Box::new(move |v| {
                let refs: Vec<&str> = path.iter().map(String::as_str).collect();
                claim_test(&refs, v)
            })
        }
        _ => {
            errs.push((field, format!("unknown attribute {k:?}")));
            return None;
        }
    };
    if c.values.is_empty() && c.not_values.is_empty() {
        errs.push((field, "a condition needs values or notValues".into()));
        return None;
    }
    cond(&c.values, &c.not_values, &field, &*g, errs)
}

fn cond(
    values: &[String],
    not: &[String],
    field: &str,
    f: &dyn Fn(&str) -> Result<Vec<Test>, String>,
    errs: &mut FieldErrors,
) -> Option<Cond> {
    if values.is_empty() && not.is_empty() {
        return None;
    }
    let mut c = Cond::default();
    for (list, out, name) in [(values, &mut c.values, ""), (not, &mut c.not_values, "not")] {
        for (i, v) in list.iter().enumerate() {
            let at = if name.is_empty() {
                format!("{field}[{i}]")
            } else {
                format!("{field}(not)[{i}]")
            };
            if v.is_empty() {
                errs.push((at, "empty value".into()));
                continue;
            }
            if let Some(inner) = v.get(1..v.len().saturating_sub(1))
                && inner.contains('*')
                && !field.ends_with("paths")
                && !field.contains("request.auth.claims")
                && !field.contains("request.headers")
            {
                // Istio's validation allows `*` only at the start or end.
                errs.push((
                    at,
                    format!("{v:?}: `*` is only allowed at the start or the end"),
                ));
                continue;
            }
            match f(v) {
                Ok(tests) => out.extend(tests),
                Err(m) => errs.push((at, m)),
            }
        }
    }
    Some(c)
}

fn errs_for(errs: &FieldErrors, at: &str) -> usize {
    errs.iter().filter(|(f, _)| f.starts_with(at)).count()
}

/// Istio's principal forms (`cluster.local/ns/x/sa/y`, `*/ns/x/sa/y`,
/// `prefix*`, `*`), with trust-domain aliases applied as pilot's
/// `ReplaceTrustDomainAliases` does: a five-part principal whose trust
/// domain is ours, an alias, or `cluster.local` stands for every one of
/// ours and the aliases.
fn principal_tests(v: &str, w: &Workload) -> Result<Vec<Test>, String> {
    let mut out = Vec::new();
    for p in expand_principal(v, w) {
        out.push(Test::Principal(StrMatch::istio(&p, "spiffe://")?));
    }
    Ok(out)
}

fn expand_principal(v: &str, w: &Workload) -> Vec<String> {
    let parts: Vec<&str> = v.split('/').collect();
    if parts.len() != 5 || parts[0] == "*" {
        return vec![v.to_owned()];
    }
    let td = parts[0];
    let bundle = w.trust_domain_bundle();
    if !(bundle.iter().any(|t| td_match(td, t)) || td == "cluster.local") {
        return vec![v.to_owned()];
    }
    let mut out: Vec<String> = Vec::new();
    for t in &bundle {
        // pilot's replaceTrustDomains: a trust domain the principal's own
        // (wildcard) domain already covers keeps the principal as written.
        let p = if suffix_match(t, td) {
            v.to_owned()
        } else {
            format!("{t}/{}", parts[1..].join("/"))
        };
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

/// pilot's trustdomain `stringMatch` for one entry: equal, `*`, or a
/// prefix/suffix wildcard on either side.
fn td_match(a: &str, s: &str) -> bool {
    a == s
        || s == "*"
        || prefix_match(a, s)
        || prefix_match(s, a)
        || suffix_match(a, s)
        || suffix_match(s, a)
}

fn prefix_match(a: &str, pattern: &str) -> bool {
    pattern.strip_suffix('*').is_some_and(|p| a.starts_with(p))
}

fn suffix_match(a: &str, pattern: &str) -> bool {
    pattern.strip_prefix('*').is_some_and(|p| a.ends_with(p))
}

/// pilot's `srcNamespaceGenerator`: the regex `.*/ns/<ns>/.*` on the
/// peer's principal, `*` standing for `.*`.
fn namespace_test(v: &str) -> Result<Test, String> {
    let ns = v
        .split('*')
        .map(regex::escape)
        .collect::<Vec<_>>()
        .join(".*");
    StrMatch::regex(&format!(".*/ns/{ns}/.*")).map(Test::Principal)
}

/// pilot's `serviceAccountRegex`: `<sa>` (in the policy's namespace) or
/// `<ns>/<sa>`.
fn service_account_test(v: &str, policy_ns: &str) -> Result<Test, String> {
    // Istio's CheckServiceAccount.
    if v.contains('*') {
        return Err(format!(
            "{v:?}: a wildcard is not allowed in a service account"
        ));
    }
    let (ns, sa) = v.split_once('/').unwrap_or((policy_ns, v));
    if ns.is_empty() || sa.is_empty() || sa.contains('/') {
        return Err(format!(
            "{v:?}: expected 'serviceAccount' or 'namespace/serviceAccount'"
        ));
    }
    StrMatch::regex(&format!(
        "spiffe://.+/ns/{}/(.+/|)sa/{}(/.+)?",
        regex::escape(ns),
        regex::escape(sa)
    ))
    .map(Test::Principal)
}

/// pilot's `srcTrustDomainGenerator`, after `ExpandTrustDomainAliases`.
fn trust_domain_tests(v: &str, w: &Workload) -> Result<Vec<Test>, String> {
    let bundle = w.trust_domain_bundle();
    let values: Vec<String> = if bundle.iter().any(|t| t == v) {
        bundle
    } else {
        vec![v.to_owned()]
    };
    values
        .iter()
        .map(|v| {
            let m = if v == "*" {
                StrMatch::Prefix("spiffe://".into())
            } else if !v.contains('*') {
                StrMatch::Prefix(format!("spiffe://{v}/").into())
            } else {
                let (a, b) = v.split_once('*').unwrap_or((v, ""));
                StrMatch::regex(&format!(
                    "spiffe://{}[^/]*{}/.*",
                    regex::escape(a),
                    regex::escape(b)
                ))?
            };
            Ok(Test::Principal(m))
        })
        .collect()
}

/// pilot's `requestPrincipalGenerator`: `iss/sub` split at the last `/`
/// (issuers are URLs), with `*` forms on either side.
fn request_principal(v: &str) -> Test {
    let idx = v.rfind('/');
    let (iss, sub) = match idx {
        Some(i) => (&v[..i], &v[i + 1..]),
        None => (v, ""),
    };
    let (iss, sub) = if v == "*" {
        (StrMatch::NonEmpty, StrMatch::NonEmpty)
    } else if let Some(rest) = v.strip_prefix('*') {
        match idx {
            Some(_) if iss == "*" => (StrMatch::NonEmpty, StrMatch::Exact(sub.into())),
            Some(_) => (
                StrMatch::Suffix(iss.trim_start_matches('*').into()),
                StrMatch::Exact(sub.into()),
            ),
            None => (StrMatch::NonEmpty, StrMatch::Suffix(rest.into())),
        }
    } else if v.ends_with('*') {
        match idx {
            Some(_) if sub == "*" => (StrMatch::Exact(iss.into()), StrMatch::NonEmpty),
            Some(_) => (
                StrMatch::Exact(iss.into()),
                StrMatch::Prefix(sub.trim_end_matches('*').into()),
            ),
            None => (
                StrMatch::Prefix(v.trim_end_matches('*').into()),
                StrMatch::NonEmpty,
            ),
        }
    } else {
        (StrMatch::Exact(iss.into()), StrMatch::Exact(sub.into()))
    };
    Test::RequestPrincipal { iss, sub }
}

fn claim_test(path: &[&str], v: &str) -> Result<Vec<Test>, String> {
    Ok(vec![Test::Claim(
        path.iter().map(|s| Box::from(*s)).collect(),
        StrMatch::istio(v, "")?,
    )])
}

/// pilot's `HostMatcher`: case-insensitive on the whole authority.
fn host_test(v: &str) -> Test {
    let m = if v == "*" {
        // A presence match: every HTTP request has an authority.
        StrMatch::Prefix("".into())
    } else if let Some(rest) = v.strip_prefix('*') {
        StrMatch::Suffix(rest.into())
    } else if let Some(rest) = v.strip_suffix('*') {
        StrMatch::Prefix(rest.into())
    } else {
        StrMatch::Exact(v.into())
    };
    Test::Host(m)
}

/// pilot's `convertToPort`.
fn port(v: &str) -> Result<u16, String> {
    v.parse::<u16>()
        .map_err(|_| format!("{v:?} is not a port (0-65535)"))
}

fn bracketed(s: &str) -> Option<&str> {
    let inner = s.strip_prefix('[')?.strip_suffix(']')?;
    (!inner.is_empty()).then_some(inner)
}

/// pilot's `extractNameInNestedBrackets`: `[a][b]` is the path a.b; a
/// bracket inside a name makes the whole `[...]` one name.
fn nested_claims(s: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        let Some(inner) = rest.strip_prefix('[') else {
            return bracketed(s).map(|n| vec![n.to_owned()]);
        };
        match inner.find(['[', ']']) {
            Some(i) if inner.as_bytes()[i] == b']' => {
                out.push(inner[..i].to_owned());
                rest = &inner[i + 1..];
            }
            _ => return bracketed(s).map(|n| vec![n.to_owned()]),
        }
    }
    (!out.is_empty()).then_some(out)
}
