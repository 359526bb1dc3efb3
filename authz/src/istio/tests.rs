//! Unit tests of the Istio loader: attachment, validation, PeerAuthentication
//! composition. Decision semantics are covered by the table in
//! `tests/policies/istio_table.rs`, built from Istio's own examples.

use super::*;

fn workload() -> Workload {
    Workload {
        namespace: "foo".into(),
        labels: [("app".to_owned(), "httpbin".to_owned())].into(),
        root_namespace: "istio-system".into(),
        trust_domain: "cluster.local".into(),
        trust_domain_aliases: Vec::new(),
        tcp_ports: None,
        jwks_cache: Default::default(),
    }
}

fn load(yaml: &str) -> Result<IstioPolicies, String> {
    IstioPolicies::from_yaml("test.yaml", yaml, &workload()).map_err(|e| e.to_string())
}

#[test]
fn unknown_spec_fields_and_bad_values_are_refused_by_name() {
    let cases = [
        (
            "spec:\n  rules:\n  - to:\n    - operation:\n        verbs: [GET]\n",
            "verbs",
        ),
        ("spec:\n  action: REJECT\n", "spec.action"),
        (
            "spec:\n  rules:\n  - to:\n    - operation:\n        ports: [\"http\"]\n",
            "ports[0]",
        ),
        (
            "spec:\n  rules:\n  - from:\n    - source:\n        ipBlocks: [\"10.0.0.300\"]\n",
            "ipBlocks[0]",
        ),
        (
            "spec:\n  rules:\n  - when:\n    - key: request.time\n      values: [x]\n",
            "unknown attribute",
        ),
        (
            "spec:\n  rules:\n  - when:\n    - key: source.ip\n",
            "needs values or notValues",
        ),
        (
            "spec:\n  rules:\n  - from:\n    - source: {}\n",
            "at least one field",
        ),
        (
            "spec:\n  rules:\n  - to:\n    - operation:\n        paths: [\"/{**}/a/{*}\"]\n",
            "not the last operator",
        ),
        ("spec:\n  action: CUSTOM\n", "needs a provider"),
        (
            "spec:\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/*/sa/x\"]\n",
            "start or the end",
        ),
        (
            "spec:\n  rules:\n  - from:\n    - source:\n        serviceAccounts: [\"a/b/c\"]\n",
            "serviceAccount",
        ),
    ];
    for (spec, want) in cases {
        let yaml = format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: p\n  namespace: foo\n{spec}"
        );
        match load(&yaml) {
            Ok(_) => panic!("loaded: {spec}"),
            Err(e) => assert!(e.contains(want), "{spec}: {e}"),
        }
    }
}

#[test]
fn other_kinds_and_versions_are_refused() {
    for (doc, want) in [
        (
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n",
            "apiVersion",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: Sidecar\nmetadata: {name: d}\n",
            "kind",
        ),
        (
            "apiVersion: security.istio.io/v1alpha1\nkind: Policy\nmetadata: {name: d}\n",
            "apiVersion",
        ),
    ] {
        let e = load(doc).err().unwrap_or_default();
        assert!(e.contains(want), "{doc}: {e}");
    }
}

#[test]
fn errors_carry_the_line_of_the_document() {
    let yaml = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a}\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: b}\nspec:\n  action: NOPE\n";
    let e = load(yaml).err().unwrap_or_default();
    assert!(e.starts_with("test.yaml:5:"), "{e}");
}

#[test]
fn attachment_follows_namespace_root_namespace_and_selector() {
    let yaml = r#"
apiVersion: security.istio.io/v1beta1
kind: List
items:
- apiVersion: security.istio.io/v1beta1
  kind: AuthorizationPolicy
  metadata: {name: mine, namespace: foo}
  spec: {selector: {matchLabels: {app: httpbin}}}
- apiVersion: security.istio.io/v1beta1
  kind: AuthorizationPolicy
  metadata: {name: mesh, namespace: istio-system}
- apiVersion: security.istio.io/v1beta1
  kind: AuthorizationPolicy
  metadata: {name: other-ns, namespace: bar}
- apiVersion: security.istio.io/v1beta1
  kind: AuthorizationPolicy
  metadata: {name: other-app, namespace: foo}
  spec: {selector: {matchLabels: {app: web}}}
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: waypoint, namespace: foo}
  spec: {targetRefs: [{kind: Service, name: httpbin}]}
"#;
    let p = load(yaml).unwrap();
    let attached: Vec<_> = p
        .resources()
        .iter()
        .map(|r| (r.name.as_str(), r.not_attached.is_none()))
        .collect();
    assert_eq!(
        attached,
        [
            ("foo/mine", true),
            ("istio-system/mesh", true),
            ("bar/other-ns", false),
            ("foo/other-app", false),
            ("foo/waypoint", false)
        ]
    );
    assert_eq!(p.policies.len(), 2);
}

#[test]
fn dry_run_annotation_must_be_a_boolean() {
    let yaml = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: a\n  annotations: {istio.io/dry-run: \"yes\"}\n";
    assert!(load(yaml).err().unwrap_or_default().contains("dry-run"));
}

#[test]
fn peer_authentication_composes_mesh_namespace_workload_and_ports() {
    let pa = |name: &str, ns: &str, extra: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{extra}---\n"
        )
    };
    let none = load("").unwrap();
    assert_eq!(
        none.peer_modes().mode(8080),
        None,
        "no PeerAuthentication: config decides"
    );
    let mesh = load(&pa("default", "istio-system", "  mtls: {mode: STRICT}\n")).unwrap();
    assert_eq!(mesh.peer_modes().mode(8080), Some(PeerMode::Strict));
    let unset = load(&pa("default", "foo", "  mtls: {mode: UNSET}\n")).unwrap();
    assert_eq!(
        unset.peer_modes().mode(8080),
        Some(PeerMode::Permissive),
        "Istio's default"
    );
    let all = [
        pa("default", "istio-system", "  mtls: {mode: STRICT}\n"),
        pa("ns", "foo", "  mtls: {mode: PERMISSIVE}\n"),
        pa(
            "wl",
            "foo",
            "  selector: {matchLabels: {app: httpbin}}\n  mtls: {mode: STRICT}\n  portLevelMtls:\n    \"8080\": {mode: DISABLE}\n    \"9090\": {mode: UNSET}\n",
        ),
        pa(
            "ignored",
            "istio-system",
            "  selector: {matchLabels: {app: httpbin}}\n  mtls: {mode: DISABLE}\n",
        ),
    ]
    .concat();
    let p = load(&all).unwrap();
    let m = p.peer_modes();
    assert_eq!(m.mode(8080), Some(PeerMode::Disable));
    assert_eq!(m.mode(9090), Some(PeerMode::Strict), "UNSET port inherits");
    assert_eq!(m.mode(7070), Some(PeerMode::Strict));
    assert_eq!(m.from, ["istio-system/default", "foo/ns", "foo/wl"]);
    let bad = pa("x", "foo", "  mtls: {mode: OPTIONAL}\n");
    assert!(
        load(&bad)
            .err()
            .unwrap_or_default()
            .contains("spec.mtls.mode")
    );
    let ports_without_selector = pa("x", "foo", "  portLevelMtls:\n    \"80\": {mode: STRICT}\n");
    assert!(
        load(&ports_without_selector)
            .err()
            .unwrap_or_default()
            .contains("workload selector")
    );
}

/// A plaintext connection can only meet a STRICT port when a reload made
/// it STRICT after accepting it: refused, naming the PeerAuthentication.
#[test]
fn plaintext_on_a_strict_port_is_refused_naming_the_peer_authentication() {
    let p = load(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: wl, namespace: foo}\nspec:\n  selector: {matchLabels: {app: httpbin}}\n  mtls: {mode: STRICT}\n  portLevelMtls:\n    \"8081\": {mode: PERMISSIVE}\n",
    )
    .unwrap();
    let id = rampart_identity::SpiffeId::parse("spiffe://cluster.local/ns/foo/sa/sleep").unwrap();
    let dns = vec!["ingress.example".to_owned()];
    let src = "10.0.0.1".parse().unwrap();
    let decide = |c: ConnectionInfo<'_>| match p.evaluate(&c, None, None) {
        Evaluation::Decided(Decision::Allow(_)) => Ok(()),
        Evaluation::Decided(Decision::Deny(d)) => Err((d.reason, d.policy)),
        Evaluation::Consult(_) => panic!("no CUSTOM policy here"),
    };
    assert_eq!(
        decide(ConnectionInfo::new(None, src, 8080)),
        Err((DenyReason::Unauthenticated, Some(Arc::from("foo/wl"))))
    );
    assert_eq!(
        decide(ConnectionInfo::new(None, src, 8081)),
        Ok(()),
        "PERMISSIVE"
    );
    assert_eq!(
        decide(ConnectionInfo::new(Some(&id), src, 8080)),
        Ok(()),
        "mTLS"
    );
    let dns_peer = ConnectionInfo {
        peer_dns: &dns,
        ..ConnectionInfo::new(None, src, 8080)
    };
    assert_eq!(decide(dns_peer), Ok(()), "a DNS-SAN peer is authenticated");
    // Without PeerAuthentication the configured mode decides, not Istio.
    let none = load("").unwrap();
    assert!(matches!(
        none.evaluate(&ConnectionInfo::new(None, src, 8080), None, None),
        Evaluation::Decided(Decision::Allow(_))
    ));
}

#[test]
fn request_authentication_rules_load_or_are_refused_by_name() {
    let ra = |ns: &str, rule: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: {ns}}}\nspec:\n  jwtRules:\n  - {rule}\n"
        )
    };
    let jwks = r#"{"keys":[{"kty":"RSA","n":"AQAB","e":"AQAB"}]}"#;
    let ok = load(&ra("foo", &format!("{{issuer: a, jwks: '{jwks}'}}"))).unwrap();
    assert_eq!(ok.request_authn().rules.len(), 1);
    let fetched = load(&ra("foo", "{issuer: a, jwksUri: \"http://keys/jwks\"}")).unwrap();
    assert_eq!(fetched.jwks_uris(), ["http://keys/jwks"]);
    let https = load(&ra("foo", "{issuer: a, jwksUri: \"https://keys/jwks\"}")).unwrap();
    assert_eq!(https.jwks_uris(), ["https://keys/jwks"]);
    for (rule, want) in [
        ("{issuer: a}", "jwksUri"),
        ("{issuer: a, jwksUri: \"ftp://keys/jwks\"}", "https://"),
        (
            "{issuer: a, jwksUri: \"file:///nonexistent\"}",
            "nonexistent",
        ),
        (
            "{issuer: a, jwksUri: \"http://k\", fromCookies: [c]}",
            "fromCookies",
        ),
        ("{jwksUri: \"http://k\"}", "issuer"),
    ] {
        let e = load(&ra("foo", rule)).err().unwrap_or_default();
        assert!(e.contains(want), "{rule}: {e}");
    }
    // Not attached: read, not applied.
    let other = load(&ra("bar", "{issuer: a, jwksUri: \"http://k\"}")).unwrap();
    assert!(other.request_authn().rules.is_empty());
}
