//! CUSTOM policies (external authorization): which requests pay for the
//! hop, and how a provider's verdict becomes the final decision.

use crate::support;

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;

use rampart_authz::external::{
    CheckAttributes, Evaluation, ExternalAuthorizer, ProviderFailure, ProviderVerdict,
};
use rampart_authz::model::ProviderName;
use rampart_authz::{Authorizer, Decision, DenyReason, DenyResponse, HttpEffects, Options};
use support::{from_yaml, get};

const POLICY: &str = r#"
policies:
  - name: mesh
    action: ALLOW
    rules:
      - name: web
        from: { principals: ["spiffe://example.org/ec-web"] }
  - name: central
    action: CUSTOM
    provider: opa
    rules:
      - name: admin
        to: { paths: ["/admin/*"] }
"#;

const WEB: &str = "spiffe://example.org/ec-web";

#[test]
fn only_allowed_requests_matching_a_custom_rule_are_sent_to_the_provider() {
    let a = from_yaml(POLICY);
    struct Case {
        name: &'static str,
        path: &'static str,
        peer: Option<&'static str>,
        want: Want,
    }
    enum Want {
        Consult,
        Allow,
        Deny(DenyReason),
    }
    let cases = [
        Case {
            name: "custom rule matches",
            path: "/admin/x",
            peer: Some(WEB),
            want: Want::Consult,
        },
        Case {
            name: "custom rule misses",
            path: "/data",
            peer: Some(WEB),
            want: Want::Allow,
        },
        Case {
            name: "refused in-process: no hop",
            path: "/admin/x",
            peer: Some("spiffe://example.org/news-web"),
            want: Want::Deny(DenyReason::NotAllowed),
        },
        Case {
            name: "unauthenticated: no hop",
            path: "/admin/x",
            peer: None,
            want: Want::Deny(DenyReason::Unauthenticated),
        },
    ];
    for c in cases {
        let mut r = get(c.path);
        if let Some(p) = c.peer {
            r = r.from(p);
        }
        let got = r.evaluate(&a).expect("path normalizes");
        match (c.want, got) {
            (Want::Consult, Evaluation::Consult(k)) => {
                assert_eq!(k.provider().as_str(), "opa", "{}", c.name);
                assert_eq!((k.policy(), k.rule()), ("central", "admin"), "{}", c.name);
            }
            (Want::Allow, Evaluation::Decided(Decision::Allow(p))) => {
                assert_eq!(p.policy(), "mesh", "{}", c.name);
                assert!(p.consulted().is_none(), "{}", c.name);
            }
            (Want::Deny(reason), Evaluation::Decided(Decision::Deny(d))) => {
                assert_eq!(d.reason, reason, "{}", c.name)
            }
            (_, got) => panic!("{}: unexpected {got:?}", c.name),
        }
    }
}

#[test]
fn check_request_without_a_provider_fails_closed() {
    let a = from_yaml(POLICY);
    match get("/admin/x").from(WEB).check(&a) {
        Some(Decision::Deny(d)) => {
            assert_eq!(d.reason, DenyReason::ProviderFailed);
            assert_eq!(d.policy.as_deref(), Some("central"));
            assert_eq!(d.http_status(), http::StatusCode::FORBIDDEN);
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn a_bare_connection_matching_a_custom_rule_is_refused() {
    // The CUSTOM rule has an HTTP condition: read conservatively, as a DENY.
    let a = from_yaml(POLICY);
    let id = rampart_identity::SpiffeId::parse(WEB).unwrap();
    let conn = rampart_authz::ConnectionInfo::new(Some(&id), "10.0.0.1".parse().unwrap(), 8080);
    match a.check_connection(&conn) {
        Decision::Deny(d) => assert_eq!(d.reason, DenyReason::RequiresHttp),
        Decision::Allow(p) => panic!("allowed by {}", p.policy()),
    }
}

fn consult() -> rampart_authz::external::Consult {
    match get("/admin/x").from(WEB).evaluate(&from_yaml(POLICY)) {
        Some(Evaluation::Consult(c)) => c,
        other => panic!("expected a consult, got {other:?}"),
    }
}

fn header(n: &str, v: &str) -> (http::HeaderName, http::HeaderValue) {
    (
        http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
        http::HeaderValue::from_str(v).unwrap(),
    )
}

#[test]
fn the_providers_verdict_becomes_the_decision() {
    let effects = HttpEffects {
        headers: vec![header("x-user", "alice")],
        request_headers_to_append: vec![header("x-tag", "b")],
        response_headers_to_add: vec![header("x-checked", "yes")],
        request_headers_to_remove: vec![http::HeaderName::from_static("authorization")],
        ..HttpEffects::default()
    };
    match consult().finish(ProviderVerdict::Allowed(effects.clone())) {
        Decision::Allow(p) => {
            assert_eq!(p.effects(), Some(&effects));
            assert_eq!(p.consulted().map(ProviderName::as_str), Some("opa"));
            assert_eq!(p.policy(), "mesh");
        }
        Decision::Deny(d) => panic!("denied: {}", d.explain()),
    }
    let refusal = DenyResponse {
        status: http::StatusCode::IM_A_TEAPOT,
        body: "no tea for you".into(),
        headers: vec![header("x-why", "policy")],
        dynamic_metadata: None,
    };
    match consult().finish(ProviderVerdict::Denied(refusal.clone())) {
        Decision::Deny(d) => {
            assert_eq!(d.reason, DenyReason::ProviderDenied);
            assert_eq!(d.http_status(), http::StatusCode::IM_A_TEAPOT);
            assert_eq!(d.response.as_deref(), Some(&refusal));
            assert_eq!(
                (d.policy.as_deref(), d.rule.as_deref()),
                (Some("central"), Some("admin"))
            );
        }
        Decision::Allow(p) => panic!("allowed by {}", p.policy()),
    }
    let failures = [
        (ProviderFailure::Timeout, DenyReason::ProviderTimeout),
        (
            ProviderFailure::Unavailable("refused".into()),
            DenyReason::ProviderFailed,
        ),
        (
            ProviderFailure::Malformed("no status".into()),
            DenyReason::ProviderFailed,
        ),
        (ProviderFailure::UnknownProvider, DenyReason::ProviderFailed),
    ];
    for (failure, reason) in failures {
        match consult().finish(ProviderVerdict::Failed(failure.clone())) {
            Decision::Deny(d) => {
                assert_eq!(d.reason, reason, "{failure}");
                assert_eq!(d.http_status(), http::StatusCode::FORBIDDEN, "{failure}");
            }
            Decision::Allow(_) => panic!("{failure}: allowed"),
        }
    }
}

/// A provider that answers at once and records what it was asked.
struct Recorder {
    asked: Mutex<Vec<(String, CheckAttributes)>>,
    verdict: ProviderVerdict,
}

impl ExternalAuthorizer for Recorder {
    fn check(
        &self,
        provider: &ProviderName,
        attributes: CheckAttributes,
    ) -> Pin<Box<dyn Future<Output = ProviderVerdict> + Send + 'static>> {
        self.asked
            .lock()
            .unwrap()
            .push((provider.to_string(), attributes));
        let v = self.verdict.clone();
        Box::pin(async move { v })
    }
}

/// Polls a future that never waits.
fn now<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => panic!("the future waited"),
    }
}

#[test]
fn authorize_request_sends_envoys_attributes_only_when_needed() {
    let a = from_yaml(POLICY);
    let rec = Recorder {
        asked: Mutex::new(Vec::new()),
        verdict: ProviderVerdict::Allowed(HttpEffects::default()),
    };
    let r = get("/admin/x?q=1")
        .from(WEB)
        .header("x-request-id", "r-1")
        .header("accept", "a")
        .header("accept", "b");
    let d = r
        .with_info(&a, |c, q| now(a.authorize_request(c, q, &rec)))
        .unwrap();
    assert!(d.is_allowed(), "{}", d.explain());
    let d = get("/data")
        .from(WEB)
        .with_info(&a, |c, q| now(a.authorize_request(c, q, &rec)))
        .unwrap();
    assert!(d.is_allowed());
    let asked = rec.asked.lock().unwrap();
    assert_eq!(asked.len(), 1, "only /admin pays for the hop");
    let (provider, at) = &asked[0];
    assert_eq!(provider, "opa");
    assert_eq!(at.source_principal.as_deref(), Some(WEB));
    assert_eq!(
        at.destination_principal.as_deref(),
        Some("spiffe://example.org/self")
    );
    assert_eq!(
        (at.method.as_str(), at.path.as_str()),
        ("GET", "/admin/x?q=1")
    );
    assert_eq!(at.host, "backend.example.org");
    assert_eq!(at.protocol, "HTTP/1.1");
    assert_eq!(at.id, "r-1");
    let h = |n: &str| {
        at.headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(h("accept"), Some("a,b"));
    assert_eq!(h(":path"), Some("/admin/x?q=1"));
    assert!(
        h("x-forwarded-client-cert").is_some_and(|x| x.contains("URI=spiffe://example.org/ec-web"))
    );
}

#[test]
fn custom_policies_are_validated() {
    let cases = [
        ("action: CUSTOM", "needs `provider`"),
        (
            "action: ALLOW\n    provider: opa",
            "only valid with action CUSTOM",
        ),
        (
            "action: CUSTOM\n    provider: opa\n    dry_run: true",
            "not supported",
        ),
        ("action: CUSTOM\n    provider: 'o p a'", "provider name"),
        (
            "kind: rego\n    rego: 'package x'\n    provider: opa",
            "only valid with action CUSTOM",
        ),
    ];
    for (body, want) in cases {
        let yaml = format!("policies:\n  - name: p\n    {body}\n");
        match Authorizer::from_yaml(
            "t.yaml",
            &yaml,
            std::path::Path::new("."),
            &Options::default(),
        ) {
            Ok(_) => panic!("{body:?}: accepted"),
            Err(e) => assert!(e.to_string().contains(want), "{body:?}: {e}"),
        }
    }
}
