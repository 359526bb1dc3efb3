//! SMI `access.smi-spec.io` TrafficTarget with `specs.smi-spec.io`
//! HTTPRouteGroup and TCPRoute (v1alpha2 to v1alpha4), as the SMI
//! specification reads them, or as OSM implements them.
//!
//! One TrafficTarget becomes one native ALLOW policy for the sidecar of its
//! destination service account; each selected HTTP match becomes a rule
//! (sources as principals, `methods`, `pathRegex` as a native regex path
//! matcher, `headers` as regex conditions), a TCPRoute-only target a rule
//! on its ports. Access in SMI is additive (deny by default), which is the
//! native default too.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::json;

use super::{ImportError, ImportOptions, Imported, Note, NoteKind, Object, Target};

/// How `pathRegex` is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reading {
    /// The SMI specification: "anchored (`^`) to the beginning of the URI",
    /// so the regex must match a prefix of the path.
    Spec,
    /// OSM's implementation: Envoy's `safe_regex`, the whole path; the
    /// narrower reading.
    Osm,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TargetSpec {
    destination: Subject,
    #[serde(default)]
    rules: Vec<RuleRef>,
    #[serde(default)]
    sources: Vec<Subject>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Subject {
    kind: String,
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    port: Option<PortNumber>,
}

/// A port written as a number or a string (`port: "80"` in old examples).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PortNumber {
    Number(u16),
    Text(String),
}

impl PortNumber {
    fn get(&self) -> Result<u16, String> {
        match self {
            PortNumber::Number(n) => Ok(*n),
            PortNumber::Text(s) => s.parse().map_err(|_| format!("{s:?} is not a port")),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RuleRef {
    kind: String,
    name: String,
    #[serde(default)]
    matches: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HttpMatch {
    name: String,
    #[serde(default)]
    path_regex: Option<String>,
    #[serde(default)]
    methods: Option<Vec<String>>,
    #[serde(default)]
    headers: Option<Headers>,
}

/// `headers`: a map of name to regex (v1alpha3+), or a list of such maps.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Headers {
    Map(BTreeMap<String, String>),
    List(Vec<BTreeMap<String, String>>),
}

impl Headers {
    fn pairs(&self) -> Vec<(&str, &str)> {
        match self {
            Headers::Map(m) => m.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect(),
            Headers::List(l) => l
                .iter()
                .flat_map(|m| m.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .collect(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TcpMatches {
    #[serde(default)]
    ports: Vec<u16>,
}

/// HTTPRouteGroup matches by `namespace/name`.
type Groups = BTreeMap<String, Vec<HttpMatch>>;
/// TCPRoute ports by `namespace/name` (empty: every port).
type TcpRoutes = BTreeMap<String, Vec<u16>>;

fn spec_of(o: &Object) -> serde_yaml::Value {
    o.value
        .get("spec")
        .cloned()
        .unwrap_or(serde_yaml::Value::Null)
}

pub(crate) fn import(
    objects: &[Object],
    options: &ImportOptions,
    reading: Reading,
) -> Result<Imported, ImportError> {
    let mut out = Imported::default();
    let mut groups = Groups::new();
    let mut tcp = TcpRoutes::new();
    for o in objects {
        let key = format!("{}/{}", o.ns(), o.name);
        match o.kind.as_str() {
            "HTTPRouteGroup" => {
                // v1alpha1/2 keep `matches` at the top, later versions in `spec`.
                let m = spec_of(o)
                    .get("matches")
                    .or_else(|| o.value.get("matches"))
                    .cloned()
                    .unwrap_or(serde_yaml::Value::Sequence(Vec::new()));
                groups.insert(key, o.parse(&m)?);
            }
            "TCPRoute" => {
                let m = spec_of(o)
                    .get("matches")
                    .cloned()
                    .unwrap_or(serde_yaml::Value::Null);
                let m: Option<TcpMatches> = o.parse(&m)?;
                tcp.insert(key, m.unwrap_or_default().ports);
            }
            _ => {}
        }
    }
    let mut by_destination: BTreeMap<String, Target> = BTreeMap::new();
    for o in objects {
        match o.kind.as_str() {
            "TrafficTarget" => {
                if o.api_version == "access.smi-spec.io/v1alpha1" {
                    return Err(ImportError {
                        at: o.at(),
                        message: "access.smi-spec.io/v1alpha1 is not supported: write it as v1alpha2 or later (`spec:` with `destination`, `rules`, `sources`)".into(),
                    });
                }
                let spec: TargetSpec = o.parse(&spec_of(o))?;
                traffic_target(
                    o,
                    &spec,
                    &groups,
                    &tcp,
                    options,
                    reading,
                    &mut out,
                    &mut by_destination,
                )?;
            }
            "HTTPRouteGroup" | "TCPRoute" => {}
            "UDPRoute" => out.report.push(Note {
                at: o.at(),
                kind: NoteKind::NotImported,
                text: "Rampart carries TCP only: UDP traffic is not proxied or admitted".into(),
            }),
            "IngressBackend" if reading == Reading::Osm => {}
            "TrafficSplit" => out.report.push(Note {
                at: o.at(),
                kind: NoteKind::NotImported,
                text: "traffic splitting is routing, not authorization: not imported".into(),
            }),
            other => out.report.push(Note {
                at: o.at(),
                kind: NoteKind::NotImported,
                text: format!("{other} is not an SMI access or traffic-spec resource"),
            }),
        }
    }
    out.targets.extend(by_destination.into_values());
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn traffic_target(
    o: &Object,
    spec: &TargetSpec,
    groups: &Groups,
    tcp: &TcpRoutes,
    options: &ImportOptions,
    reading: Reading,
    out: &mut Imported,
    by_destination: &mut BTreeMap<String, Target>,
) -> Result<(), ImportError> {
    let bad = |field: &str, message: String| ImportError {
        at: format!("{}: spec.{field}", o.at()),
        message,
    };
    let d = &spec.destination;
    if d.kind != "ServiceAccount" {
        return Err(bad(
            "destination.kind",
            format!(
                "{:?}: only ServiceAccount destinations exist in SMI",
                d.kind
            ),
        ));
    }
    let d_ns = d.namespace.as_deref().unwrap_or(o.ns());
    let mut principals = Vec::new();
    for (i, s) in spec.sources.iter().enumerate() {
        if s.kind != "ServiceAccount" {
            out.report.push(Note {
                at: format!("{}: spec.sources[{i}]", o.at()),
                kind: NoteKind::NotImported,
                text: format!(
                    "source kind {:?} (only ServiceAccount sources are identities)",
                    s.kind
                ),
            });
            continue;
        }
        let ns = s.namespace.as_deref().unwrap_or(o.ns());
        principals.push(super::sa_id(options, ns, &s.name));
    }
    let name = super::policy_name(&["smi", o.ns(), &o.name]);
    let mut rules = Vec::new();
    // Ports of the TCPRoutes this target names: they bound its HTTP rules too.
    let mut tcp_ports: Option<Vec<u16>> = None;
    let mut tcp_names = Vec::new();
    let mut tcp_all_ports = false;
    for r in spec.rules.iter().filter(|r| r.kind == "TCPRoute") {
        let key = format!("{}/{}", o.ns(), r.name);
        match tcp.get(&key) {
            Some(ports) if ports.is_empty() => tcp_all_ports = true,
            Some(ports) => tcp_ports.get_or_insert_with(Vec::new).extend(ports),
            None => {
                out.report.push(Note {
                    at: o.at(),
                    kind: NoteKind::NotImported,
                    text: format!("TCPRoute {key} is not in the files: its rule is left out"),
                });
                continue;
            }
        }
        tcp_names.push(r.name.clone());
    }
    if tcp_all_ports {
        tcp_ports = None;
    }
    let mut http_rules = 0;
    for (ri, r) in spec.rules.iter().enumerate() {
        match r.kind.as_str() {
            "TCPRoute" => {}
            "HTTPRouteGroup" => {
                let key = format!("{}/{}", o.ns(), r.name);
                let Some(matches) = groups.get(&key) else {
                    out.report.push(Note {
                        at: o.at(),
                        kind: NoteKind::NotImported,
                        text: format!(
                            "HTTPRouteGroup {key} is not in the files: its rule is left out"
                        ),
                    });
                    continue;
                };
                let selected: Vec<&HttpMatch> = match &r.matches {
                    None => matches.iter().collect(),
                    Some(names) => {
                        let mut v = Vec::new();
                        for n in names {
                            match matches.iter().find(|m| &m.name == n) {
                                Some(m) => v.push(m),
                                None => out.report.push(Note {
                                    at: format!("{}: spec.rules[{ri}].matches", o.at()),
                                    kind: NoteKind::NotImported,
                                    text: format!("HTTPRouteGroup {key} has no match {n:?}"),
                                }),
                            }
                        }
                        v
                    }
                };
                for m in selected {
                    let rule =
                        http_rule(o, &r.name, m, &principals, tcp_ports.as_deref(), reading)?;
                    rules.push(rule);
                    http_rules += 1;
                }
            }
            other => out.report.push(Note {
                at: format!("{}: spec.rules[{ri}]", o.at()),
                kind: NoteKind::NotImported,
                text: format!("rule kind {other:?} (UDP is not carried; other kinds are unknown)"),
            }),
        }
    }
    if http_rules == 0 && !tcp_names.is_empty() {
        let mut to = serde_json::Map::new();
        if let Some(p) = &tcp_ports {
            to.insert("ports".into(), json!(p));
        }
        rules.push(json!({
            "name": super::policy_name(&tcp_names.iter().map(String::as_str).collect::<Vec<_>>()),
            "from": {"principals": principals},
            "to": to,
        }));
    }
    if principals.is_empty() {
        rules.clear();
        out.report.push(Note {
            at: o.at(),
            kind: NoteKind::NotImported,
            text: "no source is an identity Rampart can check: the policy admits nothing".into(),
        });
    }
    let mut policy = json!({"name": name, "action": "ALLOW", "rules": rules});
    if let Some(p) = &d.port {
        let port = p.get().map_err(|e| bad("destination.port", e))?;
        policy["ports"] = json!([port]);
    }
    let mut how = format!(
        "policy {name} (ALLOW, {} rules) for the sidecar of ServiceAccount {d_ns}/{}; sources as SPIFFE IDs spiffe://{}/ns/<ns>/sa/<sa>",
        policy["rules"].as_array().map_or(0, Vec::len),
        d.name,
        options.trust_domain
    );
    if http_rules > 0 {
        how.push_str(match reading {
            Reading::Spec => "; pathRegex as a native regex path matcher anchored at the start of the path (the SMI specification's reading)",
            Reading::Osm => "; pathRegex as a native regex path matcher on the whole path (OSM's Envoy safe_regex, the narrower reading)",
        });
        if tcp_ports.is_some() {
            how.push_str("; the TCPRoute ports bound the HTTP rules (a route on other ports is not admitted)");
        }
    }
    out.report.push(Note {
        at: o.at(),
        kind: NoteKind::Mapped,
        text: how,
    });
    let key = format!("{d_ns}/{}", d.name);
    let t = by_destination.entry(key.clone()).or_insert_with(|| Target {
        workload: format!("ServiceAccount {key}"),
        file_stem: super::policy_name(&[d_ns, &d.name]),
        policies: json!({"policies": []}),
        config: serde_json::Map::new(),
    });
    if let Some(list) = t.policies["policies"].as_array_mut() {
        list.push(policy);
    }
    Ok(())
}

fn http_rule(
    o: &Object,
    group: &str,
    m: &HttpMatch,
    principals: &[String],
    ports: Option<&[u16]>,
    reading: Reading,
) -> Result<serde_json::Value, ImportError> {
    let at = |f: &str| {
        format!(
            "{}: HTTPRouteGroup {}/{group}: match {:?}: {f}",
            o.file.display(),
            o.ns(),
            m.name
        )
    };
    let mut to = serde_json::Map::new();
    if let Some(methods) = &m.methods
        && !methods.iter().any(|x| x == "*")
    {
        for x in methods {
            if http::Method::from_bytes(x.as_bytes()).is_err()
                || x.chars().any(|c| c.is_ascii_lowercase())
            {
                return Err(ImportError {
                    at: at("methods"),
                    message: format!("{x:?} is not a method"),
                });
            }
        }
        to.insert("methods".into(), json!(methods));
    }
    // Always a path condition: an HTTP match never admits a bare TCP
    // connection (a native rule without HTTP fields would).
    let path = match m.path_regex.as_deref() {
        None | Some("") => json!("*"),
        Some(re) => {
            let re = match reading {
                Reading::Spec => format!("(?:{}).*", re.strip_prefix('^').unwrap_or(re)),
                Reading::Osm => re.to_owned(),
            };
            crate::model::RegexPattern::path(&re, false).map_err(|e| ImportError {
                at: at("pathRegex"),
                message: e,
            })?;
            json!({"regex": re})
        }
    };
    to.insert("paths".into(), json!([path]));
    if let Some(p) = ports {
        to.insert("ports".into(), json!(p));
    }
    let mut when = Vec::new();
    if let Some(h) = &m.headers {
        for (name, re) in h.pairs() {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(ImportError {
                    at: at("headers"),
                    message: format!("{name:?} is not a header name"),
                });
            }
            when.push(json!({"header": name.to_ascii_lowercase(), "regex": re}));
        }
    }
    let mut rule = json!({
        "name": super::policy_name(&[group, &m.name]),
        "from": {"principals": principals},
        "to": to,
    });
    if !when.is_empty() {
        rule["when"] = json!(when);
    }
    Ok(rule)
}
