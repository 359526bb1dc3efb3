//! The acceptance scenarios of SCENARIOS.md, at the library level: native
//! and Rego policies must give the same decisions.

use crate::support;

use rampart_authz::{Decision, DenyReason};
use support::{Req, get, load};

const EC_WEB: &str = "spiffe://example.org/ec-web";
const NEWS_WEB: &str = "spiffe://example.org/news-web";

fn ec_web_cases() -> Vec<(&'static str, Req, bool)> {
    vec![
        (
            "noproxy with secret",
            get("/noproxy").header("x-opa-secret", "ec-web-secret"),
            true,
        ),
        (
            "data with secret",
            get("/data").header("x-opa-secret", "ec-web-secret"),
            true,
        ),
        ("no secret", get("/noproxy"), false),
        (
            "wrong secret",
            get("/noproxy").header("x-opa-secret", "news-web-secret"),
            false,
        ),
        (
            "POST with secret",
            get("/noproxy")
                .method("POST")
                .header("x-opa-secret", "ec-web-secret"),
            false,
        ),
    ]
}

fn ec_backend_cases() -> Vec<(&'static str, Req, bool)> {
    let mut cases = vec![
        ("ec-web GET /data", get("/data").from(EC_WEB), true),
        ("ec-web GET /admin", get("/admin").from(EC_WEB), false),
        ("news-web GET /data", get("/data").from(NEWS_WEB), false),
        ("unauthenticated GET /data", get("/data"), false),
        (
            "ec-web POST /data",
            get("/data").method("POST").from(EC_WEB),
            false,
        ),
        ("ec-web GET /data/", get("/data/").from(EC_WEB), false),
    ];
    // The bypass corpus: each must be refused (by normalization or policy).
    for target in BYPASSES {
        cases.push((target, get(target).from(EC_WEB), false));
    }
    cases
}

/// Paths that try to reach /admin, or anything but /data, past a policy that
/// allows only `GET /data` and denies `/admin`.
const BYPASSES: &[&str] = &[
    "/data/../admin",
    "/data/%2e%2e/admin",
    "/data/%2E%2E/admin",
    "/data/.%2e/admin",
    "//admin",
    "///admin",
    "/%61dmin",
    "/%61%64%6d%69%6e",
    "/admin%2f",
    "/admin%2F",
    "/data;/../admin",
    "/data;x",
    "/admin;/data",
    "/Admin",
    "/ADMIN",
    "/data#/../admin",
    "/admin#",
    "/data/..%2fadmin",
    "/data/..%2Fadmin",
    "/data/..%5cadmin",
    "/data\\..\\admin",
    "/admin%00",
    "/data%00",
    "/%c0%ae%c0%ae/admin",
    "/data/%c0%ae%c0%ae/admin",
    "/%e0%80%ae%e0%80%ae/admin",
    "/../admin",
    "/data/../../admin",
    "/./admin",
    "/data/./../admin",
    "http://backend/admin",
    "http://backend/data",
    "*",
    "admin",
    "/data%",
    "/data%2",
    "/data%zz",
    "/data ",
    "/data\t",
    "/dat%61/../admin",
    "/data/",
    "/data/.",
    "/data/x/..",
    "/%2fadmin",
    "/%2Fadmin",
    "/data%3f/../admin",
    "/data%23/../admin",
];

#[test]
fn scenario1_ec_web_native_and_rego_agree() {
    let native = load(&["scenario1/ec-web.native.yaml"]);
    let rego = load(&["scenario1/ec-web.rego.yaml"]);
    for (name, req, want) in ec_web_cases() {
        assert_eq!(req.allowed(&native), want, "native: {name}");
        assert_eq!(req.allowed(&rego), want, "rego: {name}");
    }
}

#[test]
fn scenario1_ec_backend_native_and_rego_agree() {
    let native = load(&["scenario1/ec-backend.native.yaml"]);
    let rego = load(&["scenario1/ec-backend.rego.yaml"]);
    for (name, req, want) in ec_backend_cases() {
        assert_eq!(req.allowed(&native), want, "native: {name}");
        assert_eq!(req.allowed(&rego), want, "rego: {name}");
    }
}

#[test]
fn scenario1_admin_denial_names_the_policy() {
    let native = load(&["scenario1/ec-backend.native.yaml"]);
    match get("/admin").from(EC_WEB).check(&native) {
        Some(Decision::Deny(d)) => {
            assert_eq!(d.reason, DenyReason::DeniedByRule);
            assert_eq!(d.policy.as_deref(), Some("ec-backend-no-admin"));
            assert_eq!(d.rule.as_deref(), Some("admin-never"));
            assert_eq!(d.http_status(), http::StatusCode::FORBIDDEN);
        }
        other => panic!("expected a denial, got {other:?}"),
    }
    let rego = load(&["scenario1/ec-backend.rego.yaml"]);
    match get("/admin").from(EC_WEB).check(&rego) {
        Some(Decision::Deny(d)) => {
            assert_eq!(d.reason, DenyReason::RegoDenied);
            assert_eq!(d.policy.as_deref(), Some("ec-backend"));
            assert_eq!(d.rule.as_deref(), Some("data.envoy.authz.allow"));
        }
        other => panic!("expected a denial, got {other:?}"),
    }
    match get("/data").from(EC_WEB).check(&native) {
        Some(Decision::Allow(p)) => {
            assert_eq!(p.policy(), "ec-backend");
            assert_eq!(p.rule(), "ec-web-reads-data");
        }
        other => panic!("expected a permit, got {other:?}"),
    }
}

#[test]
fn scenario3_ingress_by_cidr_and_by_dns_principal() {
    let a = load(&["scenario3/app2.yaml"]);
    let app1 = "spiffe://cluster.local/ns/app1/sa/app1";
    let cases = [
        ("app1 GET", get("/any/path").from(app1), true),
        ("app1 POST", get("/x").method("POST").from(app1), false),
        (
            "other identity",
            get("/x").from("spiffe://cluster.local/ns/app3/sa/app3"),
            false,
        ),
        (
            "ingress pod plaintext",
            get("/x").source("10.244.5.17"),
            true,
        ),
        (
            "other pod plaintext",
            get("/x").source("10.244.6.17"),
            false,
        ),
        (
            "ingress mTLS DNS SAN",
            get("/x")
                .source("10.9.9.9")
                .with_dns_san("ingress-nginx.ext.cluster.local"),
            true,
        ),
        (
            "ingress mTLS DNS SAN upper-case",
            get("/x")
                .source("10.9.9.9")
                .with_dns_san("Ingress-Nginx.ext.cluster.local"),
            true,
        ),
        (
            "other DNS SAN",
            get("/x")
                .source("10.9.9.9")
                .with_dns_san("evil.ext.cluster.local"),
            false,
        ),
        ("other port", get("/x").from(app1).port(9090), false),
    ];
    for (name, req, want) in cases {
        assert_eq!(req.allowed(&a), want, "{name}");
    }
}

#[test]
fn scenario4_grpc_methods_from_data_native_and_rego() {
    let native = load(&["scenario4/server-api.native.yaml"]);
    let rego = load(&["scenario4/server-api.rego.yaml"]);
    let create = "/spire.api.server.entry.v1.Entry/BatchCreateEntry";
    let bundle = "/spire.api.server.bundle.v1.Bundle/GetBundle";
    let cases = [
        (
            "admin creates",
            get(create).grpc().from("spiffe://example.org/admin"),
            true,
        ),
        (
            "agent creates",
            get(create).grpc().from("spiffe://example.org/agent"),
            false,
        ),
        (
            "agent gets bundle",
            get(bundle).grpc().from("spiffe://example.org/agent"),
            true,
        ),
        (
            "unknown method",
            get("/spire.api.server.svid.v1.SVID/MintX509SVID")
                .grpc()
                .from("spiffe://example.org/admin"),
            false,
        ),
        (
            "not gRPC",
            get(create)
                .method("POST")
                .from("spiffe://example.org/admin"),
            false,
        ),
        ("unauthenticated", get(create).grpc(), false),
        (
            "other trust domain",
            get(bundle).grpc().from("spiffe://evil.org/agent"),
            false,
        ),
    ];
    for (name, req, want) in cases {
        assert_eq!(req.allowed(&native), want, "native: {name}");
        assert_eq!(req.allowed(&rego), want, "rego: {name}");
    }
}
