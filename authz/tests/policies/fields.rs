//! Table-driven tests: every field matched and not matched, empty policies,
//! DENY over ALLOW, AUDIT, dry run, default action, load errors.

use crate::support;

use rampart_authz::{Authorizer, Decision, DefaultAction, DenyReason, Options};
use support::{Req, from_yaml, get};

const WEB: &str = "spiffe://example.org/ns/prod/web";

/// One ALLOW rule with `rule` as its body; each case says whether it matches.
fn allow_rule(rule: &str) -> Authorizer {
    from_yaml(&format!(
        "policies:\n  - name: p\n    action: ALLOW\n    rules:\n      - {rule}\n"
    ))
}

#[test]
fn every_field_matched_and_not_matched() {
    let cases: Vec<(&str, &str, Req, bool)> = vec![
        (
            "empty rule admits authenticated",
            "{}",
            get("/").from(WEB),
            true,
        ),
        ("empty rule refuses unauthenticated", "{}", get("/"), false),
        (
            "principal exact",
            r#"from: {principals: ["spiffe://example.org/ns/prod/web"]}"#,
            get("/").from(WEB),
            true,
        ),
        (
            "principal exact miss",
            r#"from: {principals: ["spiffe://example.org/ns/prod/api"]}"#,
            get("/").from(WEB),
            false,
        ),
        (
            "principal prefix",
            r#"from: {principals: ["spiffe://example.org/ns/prod/*"]}"#,
            get("/").from(WEB),
            true,
        ),
        (
            "principal prefix is segment-aware",
            r#"from: {principals: ["spiffe://example.org/ns/pro/*"]}"#,
            get("/").from(WEB),
            false,
        ),
        (
            "principal prefix excludes itself",
            r#"from: {principals: ["spiffe://example.org/ns/prod/web/*"]}"#,
            get("/").from(WEB),
            false,
        ),
        (
            "trust domain",
            r#"from: {principals: ["spiffe://example.org"]}"#,
            get("/").from(WEB),
            true,
        ),
        (
            "trust domain /*",
            r#"from: {principals: ["spiffe://example.org/*"]}"#,
            get("/").from(WEB),
            true,
        ),
        (
            "other trust domain",
            r#"from: {principals: ["spiffe://example.com/*"]}"#,
            get("/").from(WEB),
            false,
        ),
        (
            "any principal",
            r#"from: {principals: ["*"]}"#,
            get("/").from(WEB),
            true,
        ),
        (
            "any principal, unauthenticated",
            r#"from: {principals: ["*"]}"#,
            get("/"),
            false,
        ),
        (
            "dns",
            r#"from: {principals: ["dns:in.example.org"]}"#,
            get("/").with_dns_san("in.example.org"),
            true,
        ),
        (
            "dns suffix",
            r#"from: {principals: ["dns:*.example.org"]}"#,
            get("/").with_dns_san("in.example.org"),
            true,
        ),
        (
            "DNS-only peer: any principal does not admit it",
            r#"from: {principals: ["*"]}"#,
            get("/").with_dns_san("in.example.org"),
            false,
        ),
        (
            "DNS-only peer: a rule without principals does not admit it",
            "to: {methods: [GET]}",
            get("/").with_dns_san("in.example.org"),
            false,
        ),
        (
            "DNS-only peer: trust domain does not admit it",
            r#"from: {principals: ["spiffe://example.org"]}"#,
            get("/").with_dns_san("in.example.org"),
            false,
        ),
        (
            "DNS-only peer: spiffe ID equal to the name does not admit it",
            r#"from: {principals: ["spiffe://in.example.org/x"]}"#,
            get("/").with_dns_san("in.example.org"),
            false,
        ),
        (
            "DNS-only peer: unauthenticated rule does not admit it",
            "from: {unauthenticated: true, source_cidrs: [10.0.0.0/8]}",
            get("/").with_dns_san("in.example.org"),
            false,
        ),
        (
            "DNS-only peer: not_principals on SPIFFE IDs alone does not admit it",
            r#"from: {not_principals: ["spiffe://example.org/ns/prod/*"]}"#,
            get("/").with_dns_san("in.example.org"),
            false,
        ),
        (
            "dns suffix miss",
            r#"from: {principals: ["dns:*.example.org"]}"#,
            get("/").with_dns_san("example.org"),
            false,
        ),
        (
            "not_principals",
            r#"from: {not_principals: ["spiffe://example.org/ns/prod/*"]}"#,
            get("/").from(WEB),
            false,
        ),
        (
            "not_principals other",
            r#"from: {not_principals: ["spiffe://example.org/ns/dev/*"]}"#,
            get("/").from(WEB),
            true,
        ),
        (
            "unauthenticated",
            "from: {unauthenticated: true}",
            get("/"),
            true,
        ),
        (
            "unauthenticated also admits peers",
            "from: {unauthenticated: true}",
            get("/").from(WEB),
            true,
        ),
        (
            "principals + unauthenticated",
            r#"from: {unauthenticated: true, principals: ["spiffe://example.org/x"]}"#,
            get("/").from(WEB),
            false,
        ),
        (
            "source cidr",
            "from: {unauthenticated: true, source_cidrs: [10.0.0.0/8]}",
            get("/"),
            true,
        ),
        (
            "source cidr miss",
            "from: {unauthenticated: true, source_cidrs: [10.1.0.0/16]}",
            get("/"),
            false,
        ),
        (
            "source cidr v6",
            "from: {unauthenticated: true, source_cidrs: ['fd00::/8']}",
            get("/").source("fd00::1"),
            true,
        ),
        (
            "not source cidr",
            "from: {unauthenticated: true, not_source_cidrs: [10.0.0.1/32]}",
            get("/"),
            false,
        ),
        ("port", "to: {ports: [8080]}", get("/").from(WEB), true),
        (
            "port miss",
            "to: {ports: [9090]}",
            get("/").from(WEB),
            false,
        ),
        (
            "not port",
            "to: {not_ports: [8080]}",
            get("/").from(WEB),
            false,
        ),
        (
            "host",
            "to: {hosts: [backend.example.org]}",
            get("/").from(WEB),
            true,
        ),
        (
            "host case-insensitive",
            "to: {hosts: [backend.example.org]}",
            get("/").from(WEB).host("Backend.Example.ORG"),
            true,
        ),
        (
            "host with port",
            "to: {hosts: [backend.example.org]}",
            get("/").from(WEB).host("backend.example.org:8080"),
            true,
        ),
        (
            "host:*",
            "to: {hosts: ['backend.example.org:*']}",
            get("/").from(WEB).host("backend.example.org:1"),
            true,
        ),
        (
            "host:port",
            "to: {hosts: ['backend.example.org:8443']}",
            get("/").from(WEB).host("backend.example.org:8080"),
            false,
        ),
        (
            "host trailing dot",
            "to: {hosts: [backend.example.org]}",
            get("/").from(WEB).host("backend.example.org."),
            true,
        ),
        (
            "host suffix",
            "to: {hosts: ['*.example.org']}",
            get("/").from(WEB),
            true,
        ),
        (
            "host miss",
            "to: {hosts: [other.example.org]}",
            get("/").from(WEB),
            false,
        ),
        (
            "not host",
            "to: {not_hosts: [backend.example.org]}",
            get("/").from(WEB).host("BACKEND.example.org:80"),
            false,
        ),
        ("method", "to: {methods: [GET]}", get("/").from(WEB), true),
        (
            "method miss",
            "to: {methods: [POST]}",
            get("/").from(WEB),
            false,
        ),
        (
            "extension method",
            "to: {methods: [PURGE]}",
            get("/").from(WEB).method("PURGE"),
            true,
        ),
        (
            "not method",
            "to: {not_methods: [GET]}",
            get("/").from(WEB),
            false,
        ),
        (
            "path exact",
            "to: {paths: [/data]}",
            get("/data").from(WEB),
            true,
        ),
        (
            "path exact miss",
            "to: {paths: [/data]}",
            get("/data2").from(WEB),
            false,
        ),
        (
            "path prefix",
            "to: {paths: [/api/*]}",
            get("/api/x/y").from(WEB),
            true,
        ),
        (
            "path prefix is not the dir",
            "to: {paths: [/api/*]}",
            get("/api").from(WEB),
            false,
        ),
        (
            "path template one",
            "to: {paths: ['/api/{*}/items']}",
            get("/api/v1/items").from(WEB),
            true,
        ),
        (
            "path template one miss",
            "to: {paths: ['/api/{*}/items']}",
            get("/api/v1/v2/items").from(WEB),
            false,
        ),
        (
            "path template many",
            "to: {paths: ['/api/{**}/items']}",
            get("/api/v1/v2/items").from(WEB),
            true,
        ),
        (
            "path template many zero",
            "to: {paths: ['/static/{**}']}",
            get("/static").from(WEB),
            true,
        ),
        (
            "path any",
            "to: {paths: ['*']}",
            get("/x/y").from(WEB),
            true,
        ),
        (
            "path case-sensitive",
            "to: {paths: [/admin]}",
            get("/Admin").from(WEB),
            false,
        ),
        (
            "path ignore_case exact",
            "to: {paths: [{path: /admin, ignore_case: true}]}",
            get("/Admin").from(WEB),
            true,
        ),
        (
            "path ignore_case exact miss",
            "to: {paths: [{path: /admin, ignore_case: true}]}",
            get("/Admin2").from(WEB),
            false,
        ),
        (
            "path ignore_case false is the default",
            "to: {paths: [{path: /admin}]}",
            get("/ADMIN").from(WEB),
            false,
        ),
        (
            "path ignore_case prefix",
            "to: {paths: [{path: /admin/*, ignore_case: true}]}",
            get("/ADMIN/users").from(WEB),
            true,
        ),
        (
            "path ignore_case prefix miss",
            "to: {paths: [{path: /admin/*, ignore_case: true}]}",
            get("/administrator").from(WEB),
            false,
        ),
        (
            "path ignore_case template",
            "to: {paths: [{path: '/api/{*}/Items', ignore_case: true}]}",
            get("/API/7/items").from(WEB),
            true,
        ),
        (
            "path ignore_case template miss",
            "to: {paths: [{path: '/api/{*}/items', ignore_case: true}]}",
            get("/api/7/itemz").from(WEB),
            false,
        ),
        (
            "path ignore_case after decoding",
            "to: {paths: [{path: /admin, ignore_case: true}]}",
            get("/%41dmin").from(WEB),
            true,
        ),
        (
            "not path ignore_case",
            "to: {not_paths: [{path: /admin/*, ignore_case: true}]}",
            get("/Admin/x").from(WEB),
            false,
        ),
        (
            "not path case-sensitive lets /Admin through",
            "to: {not_paths: [/admin/*]}",
            get("/Admin/x").from(WEB),
            true,
        ),
        (
            "not path",
            "to: {not_paths: [/admin/*]}",
            get("/admin/x").from(WEB),
            false,
        ),
        (
            "path regex is anchored on the whole path",
            "to: {paths: [{regex: '/api/v[0-9]+/items'}]}",
            get("/api/v12/items").from(WEB),
            true,
        ),
        (
            "path regex miss (no partial match)",
            "to: {paths: [{regex: '/api/v[0-9]+'}]}",
            get("/api/v1/items").from(WEB),
            false,
        ),
        (
            "path regex sees the normalized path, not the query",
            "to: {paths: [{regex: '/a/b'}]}",
            get("/a/./b?x=1").from(WEB),
            true,
        ),
        (
            "path regex ignore_case",
            "to: {paths: [{regex: '/admin.*', ignore_case: true}]}",
            get("/ADMIN/x").from(WEB),
            true,
        ),
        (
            "not path regex",
            "to: {not_paths: [{regex: '/admin.*'}]}",
            get("/admin/x").from(WEB),
            false,
        ),
        (
            "auth principal",
            "when: [{auth: principal, exact: 'https://issuer.example/alice'}]",
            get("/")
                .from(WEB)
                .claims(serde_json::json!({"iss": "https://issuer.example", "sub": "alice"})),
            true,
        ),
        (
            "auth principal miss",
            "when: [{auth: principal, exact: 'https://issuer.example/alice'}]",
            get("/")
                .from(WEB)
                .claims(serde_json::json!({"iss": "https://issuer.example", "sub": "bob"})),
            false,
        ),
        (
            "auth without a token has no value",
            "when: [{auth: principal, present: true}]",
            get("/").from(WEB),
            false,
        ),
        (
            "auth absent without a token",
            "when: [{auth: principal, absent: true}]",
            get("/").from(WEB),
            true,
        ),
        (
            "auth list claim: one element",
            "when: [{auth: 'claims[groups]', exact: admin}]",
            get("/")
                .from(WEB)
                .claims(serde_json::json!({"iss": "i", "groups": ["dev", "admin"]})),
            true,
        ),
        (
            "auth nested claim",
            "when: [{auth: 'claims[realm][role]', prefix: ops}]",
            get("/")
                .from(WEB)
                .claims(serde_json::json!({"iss": "i", "realm": {"role": "ops-lead"}})),
            true,
        ),
        (
            "auth non-string claim never matches",
            "when: [{auth: 'claims[level]', present: true}]",
            get("/")
                .from(WEB)
                .claims(serde_json::json!({"iss": "i", "level": 3})),
            false,
        ),
        (
            "auth audiences and presenter",
            "when: [{auth: audiences, exact: api}, {auth: presenter, exact: web}]",
            get("/")
                .from(WEB)
                .claims(serde_json::json!({"iss": "i", "aud": ["x", "api"], "azp": "web"})),
            true,
        ),
        (
            "not auth claim",
            "when: [{auth: 'claims[groups]', exact: banned, not: true}]",
            get("/")
                .from(WEB)
                .claims(serde_json::json!({"iss": "i", "groups": ["banned"]})),
            false,
        ),
        (
            "grpc service",
            "to: {grpc_services: [pkg.Svc]}",
            get("/pkg.Svc/M").grpc().from(WEB),
            true,
        ),
        (
            "grpc service miss",
            "to: {grpc_services: [pkg.Other]}",
            get("/pkg.Svc/M").grpc().from(WEB),
            false,
        ),
        (
            "grpc needs grpc",
            "to: {grpc_services: [pkg.Svc]}",
            get("/pkg.Svc/M").from(WEB),
            false,
        ),
        (
            "grpc method",
            "to: {grpc_methods: [/pkg.Svc/M]}",
            get("/pkg.Svc/M").grpc().from(WEB),
            true,
        ),
        (
            "grpc method no slash",
            "to: {grpc_methods: [pkg.Svc/M]}",
            get("/pkg.Svc/M").grpc().from(WEB),
            true,
        ),
        (
            "grpc method miss",
            "to: {grpc_methods: [/pkg.Svc/N]}",
            get("/pkg.Svc/M").grpc().from(WEB),
            false,
        ),
        (
            "header exact",
            "when: [{header: X-A, exact: v}]",
            get("/").from(WEB).header("x-a", "v"),
            true,
        ),
        (
            "header exact miss",
            "when: [{header: x-a, exact: v}]",
            get("/").from(WEB).header("x-a", "V"),
            false,
        ),
        (
            "header any value",
            "when: [{header: x-a, exact: v}]",
            get("/").from(WEB).header("x-a", "w").header("x-a", "v"),
            true,
        ),
        (
            "header prefix",
            "when: [{header: x-a, prefix: Bearer }]",
            get("/").from(WEB).header("x-a", "Bearer t"),
            true,
        ),
        (
            "header suffix",
            "when: [{header: x-a, suffix: .org}]",
            get("/").from(WEB).header("x-a", "a.org"),
            true,
        ),
        (
            "header regex",
            "when: [{header: x-a, regex: 't-[0-9]+'}]",
            get("/").from(WEB).header("x-a", "t-12"),
            true,
        ),
        (
            "header regex anchored",
            "when: [{header: x-a, regex: 't-[0-9]+'}]",
            get("/").from(WEB).header("x-a", "xt-12"),
            false,
        ),
        (
            "header present",
            "when: [{header: x-a, present: true}]",
            get("/").from(WEB).header("x-a", ""),
            true,
        ),
        (
            "header present miss",
            "when: [{header: x-a, present: true}]",
            get("/").from(WEB),
            false,
        ),
        (
            "header absent",
            "when: [{header: x-a, absent: true}]",
            get("/").from(WEB),
            true,
        ),
        (
            "header absent miss",
            "when: [{header: x-a, absent: true}]",
            get("/").from(WEB).header("x-a", "v"),
            false,
        ),
        (
            "header not",
            "when: [{header: x-a, exact: v, not: true}]",
            get("/").from(WEB).header("x-a", "v"),
            false,
        ),
        (
            "query exact",
            "when: [{query: page, exact: '2'}]",
            get("/?page=2").from(WEB),
            true,
        ),
        (
            "query decoded",
            "when: [{query: q, exact: 'a b'}]",
            get("/?q=a%20b").from(WEB),
            true,
        ),
        (
            "query miss",
            "when: [{query: page, exact: '2'}]",
            get("/?page=3").from(WEB),
            false,
        ),
        (
            "query absent",
            "when: [{query: debug, absent: true}]",
            get("/?page=1").from(WEB),
            true,
        ),
        (
            "query present",
            "when: [{query: debug, present: true}]",
            get("/?debug").from(WEB),
            true,
        ),
    ];
    for (name, rule, req, want) in cases {
        let a = allow_rule(rule);
        assert_eq!(req.allowed(&a), want, "{name}: {rule}");
    }
}

#[test]
fn policy_semantics() {
    let deny_admin = "  - name: no-admin\n    action: DENY\n    rules:\n      - {from: {unauthenticated: true}, to: {paths: [/admin]}}\n";
    let allow_all = "  - name: all\n    action: ALLOW\n    rules:\n      - {}\n";
    let audit = "  - name: watch\n    action: AUDIT\n    rules:\n      - {name: data, to: {paths: [/data]}}\n";
    let dry = "  - name: future\n    action: DENY\n    dry_run: true\n    rules:\n      - {name: no-data, to: {paths: [/data]}}\n";
    let empty_allow = "  - name: nothing\n    action: ALLOW\n    ports: [9090]\n";

    let a = from_yaml(&format!(
        "policies:\n{deny_admin}{allow_all}{audit}{dry}{empty_allow}"
    ));
    // DENY wins over ALLOW.
    match get("/admin").from(WEB).check(&a) {
        Some(Decision::Deny(d)) => {
            assert_eq!(d.reason, DenyReason::DeniedByRule);
            assert_eq!(d.policy.as_deref(), Some("no-admin"));
            assert_eq!(d.rule.as_deref(), Some("rule-0"));
        }
        other => panic!("{other:?}"),
    }
    // AUDIT and dry run are noted, not enforced.
    match get("/data").from(WEB).check(&a) {
        Some(Decision::Allow(p)) => {
            assert_eq!(p.policy(), "all");
            let n = p.notes();
            let audit = n.audit.as_ref().expect("audited");
            assert_eq!((&*audit.policy, &*audit.rule), ("watch", "data"));
            let dry = n.dry_run_denied_by.as_ref().expect("dry run noted");
            assert_eq!((&*dry.policy, &*dry.rule), ("future", "no-data"));
        }
        other => panic!("{other:?}"),
    }
    // An ALLOW policy without rules admits nothing on its port.
    let a = from_yaml(&format!("policies:\n{empty_allow}"));
    match get("/").from(WEB).port(9090).check(&a) {
        Some(Decision::Deny(d)) => {
            assert_eq!(d.reason, DenyReason::NotAllowed);
            assert_eq!(d.policy.as_deref(), Some("nothing"));
        }
        other => panic!("{other:?}"),
    }
    assert!(!get("/").port(9090).allowed(&a));
}

#[test]
fn default_action_and_empty_sets() {
    let empty = from_yaml("policies: []\n");
    match get("/").from(WEB).check(&empty) {
        Some(Decision::Deny(d)) => assert_eq!(d.reason, DenyReason::NoPolicy),
        other => panic!("{other:?}"),
    }
    let opts = Options {
        default_action: DefaultAction::AllowAnyAuthenticated,
        ..Options::default()
    };
    let open = Authorizer::from_yaml("t.yaml", "policies: []\n", std::path::Path::new("."), &opts)
        .unwrap();
    assert!(get("/").from(WEB).allowed(&open));
    assert!(!get("/").allowed(&open));
    // Only a DENY policy: the default decides the rest.
    let deny_only = Authorizer::from_yaml(
        "t.yaml",
        "policies:\n  - name: d\n    action: DENY\n    rules: [{to: {paths: [/x]}}]\n",
        std::path::Path::new("."),
        &opts,
    )
    .unwrap();
    assert!(get("/y").from(WEB).allowed(&deny_only));
    assert!(!get("/x").from(WEB).allowed(&deny_only));
}

#[test]
fn dns_only_peers_are_admitted_by_dns_rules_only() {
    let opts = Options {
        default_action: DefaultAction::AllowAnyAuthenticated,
        ..Options::default()
    };
    // The default for uncovered ports admits workloads, not DNS peers.
    let open = Authorizer::from_yaml("t.yaml", "policies: []\n", std::path::Path::new("."), &opts)
        .unwrap();
    let ingress = || get("/").with_dns_san("ingress-nginx.ext.cluster.local");
    match ingress().check(&open) {
        Some(Decision::Deny(d)) => assert_eq!(d.reason, DenyReason::Unauthenticated),
        other => panic!("{other:?}"),
    }
    // DENY rules without principals still apply to it.
    let a = from_yaml(
        "policies:
  - name: no-admin
    action: DENY
    rules: [{to: {paths: [/admin]}}]
  - name: ingress
    action: ALLOW
    rules:
      - from: {principals: [\"dns:ingress-nginx.ext.cluster.local\"]}
",
    );
    assert!(ingress().allowed(&a));
    match get("/admin")
        .with_dns_san("ingress-nginx.ext.cluster.local")
        .check(&a)
    {
        Some(Decision::Deny(d)) => assert_eq!(d.reason, DenyReason::DeniedByRule),
        other => panic!("{other:?}"),
    }
    // A DENY on "not any workload" refuses it too.
    let a = from_yaml(
        "policies:
  - name: workloads-only
    action: DENY
    rules: [{from: {not_principals: [\"*\"]}}]
  - name: ingress
    action: ALLOW
    rules:
      - from: {principals: [\"dns:ingress-nginx.ext.cluster.local\"]}
",
    );
    assert!(!ingress().allowed(&a));
}

#[test]
fn path_matcher_entries_are_validated() {
    for (rule, want) in [
        ("to: {paths: [{ignore_case: true}]}", "missing field `path`"),
        (
            "to: {paths: [{path: /a, ignore: true}]}",
            "unknown field `ignore`",
        ),
        (
            "to: {paths: [{path: /a/../b, ignore_case: true}]}",
            "not a normalized path",
        ),
        ("to: {paths: [{path: /a, ignore_case: yes}]}", "ignore_case"),
        ("to: {paths: [7]}", "a path pattern"),
    ] {
        let yaml =
            format!("policies:\n  - name: p\n    action: ALLOW\n    rules:\n      - {rule}\n");
        let err = Authorizer::from_yaml(
            "p.yaml",
            &yaml,
            std::path::Path::new("."),
            &Options::default(),
        )
        .expect_err(rule)
        .to_string();
        assert!(err.contains(want), "{rule}: {err}");
        assert!(err.contains("p.yaml:"), "{rule}: {err}");
    }
}

#[test]
fn invalid_files_are_rejected_whole_with_locations() {
    let bad = [
        (
            "unknown field",
            "policies:\n  - name: p\n    action: ALLOW\n    rules:\n      - {to: {metods: [GET]}}\n",
            "metods",
        ),
        (
            "bad method",
            "policies:\n  - name: p\n    action: ALLOW\n    rules:\n      - {to: {methods: [get]}}\n",
            "not a method",
        ),
        (
            "empty list",
            "policies:\n  - name: p\n    action: ALLOW\n    rules:\n      - {to: {methods: []}}\n",
            "empty list",
        ),
        (
            "bad principal",
            "policies:\n  - name: p\n    action: ALLOW\n    rules:\n      - {from: {principals: [web]}}\n",
            "not a principal",
        ),
        (
            "bad path",
            "policies:\n  - name: p\n    action: ALLOW\n    rules:\n      - {to: {paths: [/a/../b]}}\n",
            "not a normalized path",
        ),
        (
            "bad glob",
            "policies:\n  - name: p\n    action: ALLOW\n    rules:\n      - {to: {paths: [/data*]}}\n",
            "only allowed",
        ),
        (
            "bad regex",
            "policies:\n  - name: p\n    action: ALLOW\n    rules:\n      - {when: [{header: a, regex: '('}]}\n",
            "invalid regex",
        ),
        (
            "bad path regex",
            "policies:\n  - name: p\n    action: ALLOW\n    rules:\n      - {to: {paths: [{regex: '/a('}]}}\n",
            "invalid path regex",
        ),
        (
            "path and regex",
            "policies:\n  - name: p\n    action: ALLOW\n    rules:\n      - {to: {paths: [{regex: /a, path: /a}]}}\n",
            "not both",
        ),
        (
            "bad auth key",
            "policies:\n  - name: p\n    action: ALLOW\n    rules:\n      - {when: [{auth: 'claims[]', present: true}]}\n",
            "claims[NAME]",
        ),
        (
            "auth and header",
            "policies:\n  - name: p\n    action: ALLOW\n    rules:\n      - {when: [{auth: principal, header: a, present: true}]}\n",
            "exactly one of `header`, `query` or `auth`",
        ),
        (
            "two matchers",
            "policies:\n  - name: p\n    action: ALLOW\n    rules:\n      - {when: [{header: a, exact: x, prefix: y}]}\n",
            "exactly one",
        ),
        (
            "no action",
            "policies:\n  - name: p\n    rules: []\n",
            "missing `action`",
        ),
        (
            "bad action",
            "policies:\n  - name: p\n    action: allow\n",
            "unknown variant",
        ),
        (
            "bad cidr",
            "policies:\n  - name: p\n    action: ALLOW\n    rules:\n      - {from: {source_cidrs: [10.0.0.0/33]}}\n",
            "source_cidrs",
        ),
        (
            "data missing",
            "policies:\n  - name: p\n    action: ALLOW\n    rules:\n      - {from: {principals_from_data: 'a.{grpc_method}.b'}}\n",
            "no `data`",
        ),
        (
            "bad rego",
            "policies:\n  - name: p\n    kind: rego\n    rego: 'package x\nallow if {'\n",
            "p",
        ),
        (
            "bad query",
            "policies:\n  - name: p\n    kind: rego\n    rego: \"package x\\nallow := true\\n\"\n    query: data.envoy.authz.allow\n",
            "query",
        ),
        (
            "duplicate",
            "policies:\n  - {name: p, action: ALLOW}\n  - {name: p, action: DENY}\n",
            "already defined",
        ),
    ];
    for (name, yaml, want) in bad {
        match Authorizer::from_yaml(
            "bad.yaml",
            yaml,
            std::path::Path::new("."),
            &Options::default(),
        ) {
            Ok(_) => panic!("{name}: accepted"),
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.contains(want), "{name}: {msg}");
                assert!(msg.starts_with("bad.yaml"), "{name}: {msg}");
            }
        }
    }
    // Every bad policy is reported, the first one with its line.
    let two = "policies:\n  - name: a\n    action: ALLOW\n    rules: [{to: {methods: [get]}}]\n  - name: b\n    action: ALLOW\n    rules: [{to: {paths: [x]}}]\n";
    let e = Authorizer::from_yaml(
        "two.yaml",
        two,
        std::path::Path::new("."),
        &Options::default(),
    )
    .expect_err("rejected");
    assert_eq!(e.0.len(), 2, "{e}");
    let msg = e.to_string();
    assert!(msg.contains("two.yaml:4:"), "{msg}");
    assert!(msg.contains("policies[0].rules[0].to.methods[0]"), "{msg}");
    assert!(msg.contains("policies[1]"), "{msg}");
}

#[test]
fn rego_results_and_failures() {
    let rego = |body: &str| {
        from_yaml(&format!(
            "policies:\n  - name: r\n    kind: rego\n    rego: |\n      package envoy.authz\n      import rego.v1\n{}",
            body.lines()
                .map(|l| format!("      {l}\n"))
                .collect::<String>()
        ))
    };
    let obj = rego(
        "allow := {\"allowed\": false, \"http_status\": 429, \"body\": \"no\", \"headers\": {\"x-why\": \"teapot\"}}",
    );
    // 418 is not in Envoy's `StatusCode` enum: OPA-Envoy fails the check.
    let teapot = rego("allow := {\"allowed\": false, \"http_status\": 418}");
    match get("/").check(&teapot) {
        Some(Decision::Deny(d)) => assert_eq!(d.reason, DenyReason::RegoError),
        other => panic!("{other:?}"),
    }
    match get("/").check(&obj) {
        Some(Decision::Deny(d)) => {
            assert_eq!(d.reason, DenyReason::RegoDenied);
            assert_eq!(d.http_status().as_u16(), 429);
            let r = d.response.expect("response");
            assert_eq!(r.body, "no");
            assert_eq!(r.headers[0].0, "x-why");
        }
        other => panic!("{other:?}"),
    }
    let ok = rego(
        "allow := {\"allowed\": true, \"headers\": {\"x-user\": \"alice\"}, \"request_headers_to_remove\": [\"x-secret\"]}",
    );
    match get("/").check(&ok) {
        Some(Decision::Allow(p)) => {
            let e = p.effects().expect("effects");
            assert_eq!(e.headers[0].1, "alice");
            assert_eq!(e.request_headers_to_remove[0], "x-secret");
        }
        other => panic!("{other:?}"),
    }
    let missing_allowed = rego("allow := {\"headers\": {}}");
    match get("/").check(&missing_allowed) {
        Some(Decision::Deny(d)) => assert_eq!(d.reason, DenyReason::RegoError),
        other => panic!("{other:?}"),
    }
    let undefined = rego("allow if input.nope == 1");
    match get("/").check(&undefined) {
        Some(Decision::Deny(d)) => assert_eq!(d.reason, DenyReason::RegoError),
        other => panic!("{other:?}"),
    }
    let parsed = rego(
        "allow if {\n  input.parsed_path == [\"a\", \"b c\"]\n  input.parsed_query.x == [\"1\", \"2\"]\n}",
    );
    assert!(get("/a/b%20c?x=1&x=2").allowed(&parsed));
}
