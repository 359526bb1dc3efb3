//! The SPIFFE ID of a pod, from the pod: an ordered list of rules, each a
//! template with an optional pod selector; the first rule whose selector
//! matches the pod's labels gives the ID. The templates are written as
//! SPIRE's controller manager writes `ClusterSPIFFEID.spec.spiffeIDTemplate`
//! (a subset of Go's text/template: `{{ .TrustDomain }}`,
//! `{{ .PodMeta.Namespace }}`, `{{ index .PodMeta.Labels "app" }}`, ...),
//! so a rule is the same text as the ClusterSPIFFEID that issues the SVID,
//! and tests/deploy.rs checks that deploy/ keeps them equal.
//!
//! A pod no rule selects, a template that needs a label or field the pod
//! lacks, or a result that is not a SPIFFE ID gives no identity
//! ([`EndpointIdentity::Underivable`], with the reason): nothing is sent
//! to such a pod.

use std::collections::BTreeMap;

use rampart_identity::{SpiffeId, TrustDomain};
use serde::{Deserialize, Serialize};

use crate::model::EndpointIdentity;

/// SPIRE's default shape (and Istio's, Linkerd's): the pod's namespace and
/// service account.
pub const DEFAULT_TEMPLATE: &str =
    "spiffe://{{ .TrustDomain }}/ns/{{ .PodMeta.Namespace }}/sa/{{ .PodSpec.ServiceAccountName }}";

/// One rule of `discovery.kubernetes.identities`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityRule {
    /// The SPIFFE ID template, in ClusterSPIFFEID syntax.
    pub template: String,
    /// Which pods the rule is for (by label, as `ClusterSPIFFEID.spec.podSelector`);
    /// none: every pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
}

/// A Kubernetes label selector (`matchLabels` and `matchExpressions`,
/// ANDed).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LabelSelector {
    /// Labels that must have exactly these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    /// Requirements on labels.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelRequirement>,
}

/// One `matchExpressions` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LabelRequirement {
    /// The label.
    pub key: String,
    /// How it is compared.
    pub operator: LabelOperator,
    /// The values (`In`, `NotIn`); empty for `Exists`, `DoesNotExist`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

/// A label selector operator, as Kubernetes spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum LabelOperator {
    /// The label is set to one of the values.
    In,
    /// The label is unset or set to none of the values.
    NotIn,
    /// The label is set.
    Exists,
    /// The label is unset.
    DoesNotExist,
}

impl IdentityRule {
    /// A rule for every pod: `template` in ClusterSPIFFEID syntax (checked
    /// with the rest of the configuration, [`validate`]).
    pub fn new(template: impl Into<String>) -> IdentityRule {
        IdentityRule {
            template: template.into(),
            pod_selector: None,
        }
    }

    /// This rule for the pods `selector` selects only.
    pub fn for_pods(self, selector: LabelSelector) -> IdentityRule {
        IdentityRule {
            pod_selector: Some(selector),
            ..self
        }
    }
}

impl LabelSelector {
    /// Also requires label `key` to be `value` (`matchLabels`).
    pub fn with_label(mut self, key: &str, value: &str) -> LabelSelector {
        self.match_labels.insert(key.to_owned(), value.to_owned());
        self
    }

    /// Also requires `key` `operator` `values` (`matchExpressions`;
    /// `values` empty for `Exists` and `DoesNotExist`).
    pub fn with_expression(
        mut self,
        key: &str,
        operator: LabelOperator,
        values: &[&str],
    ) -> LabelSelector {
        self.match_expressions.push(LabelRequirement {
            key: key.to_owned(),
            operator,
            values: values.iter().map(|v| (*v).to_owned()).collect(),
        });
        self
    }

    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| {
                let got = labels.get(&r.key);
                match r.operator {
                    LabelOperator::In => got.is_some_and(|v| r.values.contains(v)),
                    LabelOperator::NotIn => !got.is_some_and(|v| r.values.contains(v)),
                    LabelOperator::Exists => got.is_some(),
                    LabelOperator::DoesNotExist => got.is_none(),
                }
            })
    }

    fn validate(&self, field: &str) -> Vec<(String, String)> {
        let mut p = Vec::new();
        for (i, r) in self.match_expressions.iter().enumerate() {
            let needs_values = matches!(r.operator, LabelOperator::In | LabelOperator::NotIn);
            if needs_values == r.values.is_empty() {
                p.push((
                    format!("{field}.match_expressions[{i}].values"),
                    if needs_values {
                        format!("{:?} needs at least one value", r.operator)
                    } else {
                        format!("{:?} takes no values", r.operator)
                    },
                ));
            }
        }
        p
    }
}

/// What a template can read of a pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodFacts {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.uid`.
    pub uid: String,
    /// `spec.serviceAccountName`.
    pub service_account: String,
    /// `spec.nodeName`.
    pub node_name: String,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
    /// `metadata.annotations`.
    pub annotations: BTreeMap<String, String>,
}

/// A field a template reads.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Field {
    TrustDomain,
    ClusterName,
    PodName,
    Namespace,
    Uid,
    ServiceAccount,
    NodeName,
    Label(String),
    Annotation(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Field(Field),
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

impl Template {
    /// Parses ClusterSPIFFEID template text.
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("{{") {
            if start > 0 {
                parts.push(Part::Text(rest[..start].to_owned()));
            }
            let after = &rest[start + 2..];
            let end = after
                .find("}}")
                .ok_or_else(|| format!("unclosed `{{{{` in `{text}`"))?;
            parts.push(Part::Field(field(after[..end].trim())?));
            rest = &after[end + 2..];
        }
        if rest.contains("}}") {
            return Err(format!("`}}}}` without `{{{{` in `{text}`"));
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        if !parts.iter().any(|p| matches!(p, Part::Field(_))) && SpiffeId::parse(text).is_err() {
            return Err(format!("`{text}` is neither a template nor a SPIFFE ID"));
        }
        Ok(Template { parts })
    }

    /// The ID for `pod`, or why there is none.
    pub fn render(
        &self,
        pod: &PodFacts,
        trust_domain: &TrustDomain,
        cluster_name: &str,
    ) -> Result<SpiffeId, String> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Field(f) => {
                    let (v, what) = match f {
                        Field::TrustDomain => (trust_domain.as_str(), "trust domain".to_owned()),
                        Field::ClusterName => (cluster_name, "cluster name".to_owned()),
                        Field::PodName => (pod.name.as_str(), "name".to_owned()),
                        Field::Namespace => (pod.namespace.as_str(), "namespace".to_owned()),
                        Field::Uid => (pod.uid.as_str(), "uid".to_owned()),
                        Field::ServiceAccount => {
                            (pod.service_account.as_str(), "service account".to_owned())
                        }
                        Field::NodeName => (pod.node_name.as_str(), "node name".to_owned()),
                        Field::Label(k) => (
                            pod.labels.get(k).map(String::as_str).unwrap_or(""),
                            format!("label `{k}`"),
                        ),
                        Field::Annotation(k) => (
                            pod.annotations.get(k).map(String::as_str).unwrap_or(""),
                            format!("annotation `{k}`"),
                        ),
                    };
                    if v.is_empty() {
                        return Err(format!("pod {}/{} has no {what}", pod.namespace, pod.name));
                    }
                    out.push_str(v);
                }
            }
        }
        SpiffeId::parse(&out).map_err(|e| format!("the template gives `{out}`: {e}"))
    }
}

fn field(expr: &str) -> Result<Field, String> {
    let simple = match expr {
        ".TrustDomain" => Some(Field::TrustDomain),
        ".ClusterName" => Some(Field::ClusterName),
        ".PodMeta.Name" => Some(Field::PodName),
        ".PodMeta.Namespace" => Some(Field::Namespace),
        ".PodMeta.UID" => Some(Field::Uid),
        ".PodSpec.ServiceAccountName" => Some(Field::ServiceAccount),
        ".PodSpec.NodeName" => Some(Field::NodeName),
        _ => None,
    };
    if let Some(f) = simple {
        return Ok(f);
    }
    let words: Vec<&str> = expr.split_whitespace().collect();
    if let ["index", map, key] = words[..]
        && key.len() >= 2
        && key.starts_with('"')
        && key.ends_with('"')
    {
        let key = key[1..key.len() - 1].to_owned();
        match map {
            ".PodMeta.Labels" => return Ok(Field::Label(key)),
            ".PodMeta.Annotations" => return Ok(Field::Annotation(key)),
            _ => {}
        }
    }
    Err(format!(
        "`{{{{ {expr} }}}}` is not supported: use .TrustDomain, .ClusterName, .PodMeta.Name, .PodMeta.Namespace, .PodMeta.UID, .PodSpec.ServiceAccountName, .PodSpec.NodeName, or index .PodMeta.Labels / .PodMeta.Annotations \"KEY\""
    ))
}

/// The compiled rules.
#[derive(Debug, Clone)]
pub struct IdentityRules {
    rules: Vec<(Template, Option<LabelSelector>)>,
    trust_domain: TrustDomain,
    cluster_name: String,
}

impl IdentityRules {
    /// Compiles `rules` (validated with the configuration; a template that
    /// does not parse is an error here too).
    pub fn new(
        rules: &[IdentityRule],
        trust_domain: TrustDomain,
        cluster_name: String,
    ) -> Result<IdentityRules, String> {
        let rules = rules
            .iter()
            .map(|r| Ok((Template::parse(&r.template)?, r.pod_selector.clone())))
            .collect::<Result<_, String>>()?;
        Ok(IdentityRules {
            rules,
            trust_domain,
            cluster_name,
        })
    }

    /// The identity of `pod`: the first rule that selects it.
    pub fn identity(&self, pod: &PodFacts) -> EndpointIdentity {
        let Some((t, _)) = self
            .rules
            .iter()
            .find(|(_, sel)| sel.as_ref().is_none_or(|s| s.matches(&pod.labels)))
        else {
            return EndpointIdentity::Underivable(format!(
                "no identity rule selects pod {}/{}",
                pod.namespace, pod.name
            ));
        };
        match t.render(pod, &self.trust_domain, &self.cluster_name) {
            Ok(id) => EndpointIdentity::Id(id),
            Err(why) => EndpointIdentity::Underivable(why),
        }
    }
}

/// Every problem of `rules` (field path `discovery.kubernetes.identities`).
pub fn validate(rules: &[IdentityRule]) -> Vec<(String, String)> {
    let mut p = Vec::new();
    if rules.is_empty() {
        p.push((
            "discovery.kubernetes.identities".into(),
            "names no rule: no endpoint could have an identity".into(),
        ));
    }
    for (i, r) in rules.iter().enumerate() {
        let field = format!("discovery.kubernetes.identities[{i}]");
        if let Err(e) = Template::parse(&r.template) {
            p.push((format!("{field}.template"), e));
        }
        if let Some(s) = &r.pod_selector {
            p.extend(s.validate(&format!("{field}.pod_selector")));
        }
    }
    p
}

/// The default rules: one, SPIRE's service-account shape.
pub fn default_rules() -> Vec<IdentityRule> {
    vec![IdentityRule::new(DEFAULT_TEMPLATE)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(sa: &str, labels: &[(&str, &str)]) -> PodFacts {
        PodFacts {
            name: "web-1".into(),
            namespace: "shop".into(),
            uid: "u-1".into(),
            service_account: sa.into(),
            node_name: "n1".into(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            annotations: [("team".to_owned(), "blue".to_owned())].into(),
        }
    }

    fn rules(yaml: &str) -> IdentityRules {
        let r: Vec<IdentityRule> = serde_yaml::from_str(yaml).unwrap();
        assert!(validate(&r).is_empty(), "{:?}", validate(&r));
        IdentityRules::new(&r, TrustDomain::parse("example.org").unwrap(), "c1".into()).unwrap()
    }

    fn id(e: EndpointIdentity) -> String {
        match e {
            EndpointIdentity::Id(id) => id.as_str().to_owned(),
            EndpointIdentity::Underivable(why) => format!("none: {why}"),
        }
    }

    #[test]
    fn the_default_is_spire_s_service_account_shape() {
        let r = IdentityRules::new(
            &default_rules(),
            TrustDomain::parse("example.org").unwrap(),
            String::new(),
        )
        .unwrap();
        assert_eq!(
            id(r.identity(&pod("cart", &[]))),
            "spiffe://example.org/ns/shop/sa/cart"
        );
        assert_eq!(
            id(r.identity(&pod("", &[]))),
            "none: pod shop/web-1 has no service account"
        );
    }

    /// The two ClusterSPIFFEIDs of deploy/spire/registration/registration.yaml.
    const REGISTRATION: &str = r#"
- template: 'spiffe://{{ .TrustDomain }}/{{ index .PodMeta.Labels "app" }}'
  pod_selector:
    match_expressions:
      - {key: rampart.io/spiffe-id, operator: In, values: [app]}
      - {key: app, operator: Exists}
- template: "spiffe://{{ .TrustDomain }}/ns/{{ .PodMeta.Namespace }}/sa/{{ .PodSpec.ServiceAccountName }}"
  pod_selector:
    match_expressions:
      - {key: rampart.io/spiffe-id, operator: NotIn, values: [app]}
"#;

    #[test]
    fn the_label_shape_and_the_first_matching_rule() {
        let r = rules(REGISTRATION);
        assert_eq!(
            id(r.identity(&pod(
                "default",
                &[("rampart.io/spiffe-id", "app"), ("app", "ec-web")]
            ))),
            "spiffe://example.org/ec-web"
        );
        assert_eq!(
            id(r.identity(&pod("cart", &[("app", "ec-web")]))),
            "spiffe://example.org/ns/shop/sa/cart"
        );
        // Asks for the label shape but has no `app` label: no rule.
        assert_eq!(
            id(r.identity(&pod("cart", &[("rampart.io/spiffe-id", "app")]))),
            "none: no identity rule selects pod shop/web-1"
        );
    }

    #[test]
    fn typed_rules_are_the_rules_the_yaml_gives() {
        use LabelOperator::{Exists, In, NotIn};
        let typed = vec![
            IdentityRule::new(r#"spiffe://{{ .TrustDomain }}/{{ index .PodMeta.Labels "app" }}"#)
                .for_pods(
                    LabelSelector::default()
                        .with_expression("rampart.io/spiffe-id", In, &["app"])
                        .with_expression("app", Exists, &[]),
                ),
            IdentityRule::new(DEFAULT_TEMPLATE).for_pods(LabelSelector::default().with_expression(
                "rampart.io/spiffe-id",
                NotIn,
                &["app"],
            )),
        ];
        let parsed: Vec<IdentityRule> = serde_yaml::from_str(REGISTRATION).unwrap();
        assert_eq!(typed, parsed);
        let labels = LabelSelector::default().with_label("tier", "a");
        assert_eq!(labels.match_labels["tier"], "a");
        assert_eq!(default_rules(), vec![IdentityRule::new(DEFAULT_TEMPLATE)]);
    }

    #[test]
    fn every_field_renders_and_bad_results_give_no_identity() {
        let r = rules(
            r#"
- template: 'spiffe://{{.TrustDomain}}/{{ .ClusterName }}/{{ .PodMeta.Name }}/{{ .PodMeta.UID }}/{{ .PodSpec.NodeName }}/{{ index .PodMeta.Annotations "team" }}'

  pod_selector: {match_labels: {tier: a}}
- template: 'spiffe://{{ .TrustDomain }}/x/{{ index .PodMeta.Labels "v" }}'
  pod_selector: {match_expressions: [{key: tier, operator: DoesNotExist}]}
"#,
        );
        assert_eq!(
            id(r.identity(&pod("sa", &[("tier", "a")]))),
            "spiffe://example.org/c1/web-1/u-1/n1/blue"
        );
        let bad = id(r.identity(&pod("sa", &[("v", "a b")])));
        assert!(
            bad.starts_with("none: the template gives `spiffe://example.org/x/a b`: "),
            "{bad}"
        );
        assert_eq!(
            id(r.identity(&pod("sa", &[("tier", "b")]))),
            "none: no identity rule selects pod shop/web-1"
        );
    }

    #[test]
    fn templates_and_selectors_are_checked() {
        let r: Vec<IdentityRule> = serde_yaml::from_str(
            r#"
- template: "spiffe://{{ .TrustDomain }}/{{ .PodSpec.Containers }}"
- template: "spiffe://{{ .TrustDomain }}/{{ index .PodMeta.Labels app }}"
- template: "spiffe://{{ .TrustDomain "
- template: "not an id"
- template: "spiffe://example.org/fixed"
  pod_selector:
    match_expressions:
      - {key: a, operator: In}
      - {key: b, operator: Exists, values: [x]}
"#,
        )
        .unwrap();
        let p = validate(&r);
        let fields: Vec<&str> = p.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            [
                "discovery.kubernetes.identities[0].template",
                "discovery.kubernetes.identities[1].template",
                "discovery.kubernetes.identities[2].template",
                "discovery.kubernetes.identities[3].template",
                "discovery.kubernetes.identities[4].pod_selector.match_expressions[0].values",
                "discovery.kubernetes.identities[4].pod_selector.match_expressions[1].values",
            ],
            "{p:?}"
        );
        assert!(p[0].1.contains(".PodSpec.Containers"), "{}", p[0].1);
        assert!(validate(&[]).len() == 1);
    }
}
