//! Authorization micro-benchmarks: native decisions at 10 to 10,000 rules
//! (a realistic mix: mostly one caller per rule, some prefixes and header
//! conditions), the same decisions in Rego, and path normalization.

use std::fmt::Write as _;
use std::hint::black_box;
use std::path::Path;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use rampart_authz::{
    Authorizer, ConnectionInfo, HttpProtocol, NormalizeOptions, Options, RequestInfo,
    normalize_path,
};
use rampart_identity::SpiffeId;

const SIZES: [usize; 4] = [10, 100, 1_000, 10_000];

fn caller(i: usize) -> String {
    format!("spiffe://example.org/ns/ns{}/sa/svc{i}", i % 50)
}

/// N rules: 90% one exact caller + method + path, 5% a namespace prefix with
/// a path template, 5% a header condition; plus a DENY policy.
fn native_yaml(n: usize) -> String {
    let mut y = String::from(
        "policies:\n  - name: deny-admin\n    action: DENY\n    rules:\n      - from: {unauthenticated: true}\n        to: {paths: [/admin, /admin/*]}\n  - name: api\n    action: ALLOW\n    rules:\n",
    );
    for i in 0..n {
        match i % 20 {
            0 => writeln!(
                y,
                "      - from: {{principals: [\"spiffe://example.org/ns/ns{}/*\"]}}\n        to: {{methods: [GET], paths: [\"/api/{{*}}/items{i}\"]}}",
                i % 50
            ),
            1 => writeln!(
                y,
                "      - from: {{principals: [\"{}\"]}}\n        to: {{methods: [POST]}}\n        when: [{{header: x-tenant, exact: t{i}}}]",
                caller(i)
            ),
            _ => writeln!(
                y,
                "      - from: {{principals: [\"{}\"]}}\n        to: {{methods: [GET, HEAD], paths: [/data{i}, /v1/{i}/*]}}",
                caller(i)
            ),
        }
        .unwrap();
    }
    y
}

/// The same exact-caller rules as data, with an OPA-Envoy style policy.
fn rego_yaml(n: usize) -> String {
    let mut rules = Vec::new();
    for i in 0..n {
        rules.push(serde_json::json!({"principal": caller(i), "method": "GET", "path": format!("/data{i}")}));
    }
    let data = serde_json::json!({"rules": rules});
    format!(
        r#"policies:
  - name: api
    kind: rego
    data: {data}
    rego: |
      package envoy.authz
      import rego.v1
      default allow := false
      allow if {{
        some r in data.rules
        r.principal == input.attributes.source.principal
        r.method == input.attributes.request.http.method
        r.path == input.attributes.request.http.path
      }}
"#
    )
}

fn load(yaml: &str) -> Authorizer {
    Authorizer::from_yaml("bench.yaml", yaml, Path::new("."), &Options::default())
        .unwrap_or_else(|e| panic!("bench policy invalid:\n{e}"))
}

struct Fixture {
    peer: SpiffeId,
    path: String,
    headers: http::HeaderMap,
    local: SpiffeId,
}

impl Fixture {
    fn new(n: usize) -> Self {
        // A caller in the middle of the table, allowed by its own rule.
        let i = (n / 2) | 2;
        Fixture {
            peer: SpiffeId::parse(&caller(i)).unwrap(),
            path: format!("/data{i}"),
            headers: http::HeaderMap::new(),
            local: SpiffeId::parse("spiffe://example.org/api").unwrap(),
        }
    }

    fn check(&self, a: &Authorizer) -> bool {
        let conn = ConnectionInfo::new(Some(&self.peer), "10.0.0.1".parse().unwrap(), 8080);
        let req = RequestInfo {
            method: &http::Method::GET,
            authority: "api.example.org",
            path: &self.path,
            raw_path_and_query: &self.path,
            query: None,
            headers: &self.headers,
            protocol: HttpProtocol::Http2,
            scheme: "https",
            grpc_method: None,
            source: "10.0.0.1:40000".parse().unwrap(),
            destination: "10.0.0.2:8080".parse().unwrap(),
            local_identity: Some(&self.local),
            peer_cert_sha256: Some("ab"),
        };
        a.check_request(&conn, &req).is_allowed()
    }
}

fn native(c: &mut Criterion) {
    let mut g = c.benchmark_group("authz/native");
    for n in SIZES {
        let a = load(&native_yaml(n));
        let f = Fixture::new(n);
        assert!(f.check(&a), "fixture must be allowed");
        g.bench_with_input(BenchmarkId::new("allow", n), &n, |b, _| {
            b.iter(|| black_box(f.check(black_box(&a))))
        });
        let mut miss = Fixture::new(n);
        miss.peer = SpiffeId::parse("spiffe://example.org/ns/none/sa/nobody").unwrap();
        assert!(!miss.check(&a));
        g.bench_with_input(BenchmarkId::new("deny_unknown_caller", n), &n, |b, _| {
            b.iter(|| black_box(miss.check(black_box(&a))))
        });
    }
    g.finish();
}

fn rego(c: &mut Criterion) {
    let mut g = c.benchmark_group("authz/rego");
    for n in SIZES {
        let a = load(&rego_yaml(n));
        let f = Fixture::new(n);
        assert!(f.check(&a), "fixture must be allowed");
        g.bench_with_input(BenchmarkId::new("allow", n), &n, |b, _| {
            b.iter(|| black_box(f.check(black_box(&a))))
        });
    }
    g.finish();
}

/// Scenario 1's ec-backend, native and in Rego (the seed's OPA-Envoy
/// policy, unmodified: XFCC split, `http_request` import), on the request
/// it allows (ec-web `GET /data`) and one it refuses (`GET /admin`). The
/// ratio of the two `allow` lines is the cost of Rego over native.
fn scenario(c: &mut Criterion) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../app/src/demo/policies");
    let load_file = |f: &str| {
        Authorizer::load(&[dir.join(f)], &Options::default())
            .unwrap_or_else(|e| panic!("{f}:\n{e}"))
    };
    let native = load_file("ec-backend.native.yaml");
    let rego = load_file("ec-backend.rego.yaml");
    let allow = Fixture {
        peer: SpiffeId::parse("spiffe://example.org/ec-web").unwrap(),
        path: "/data".into(),
        headers: http::HeaderMap::new(),
        local: SpiffeId::parse("spiffe://example.org/ec-backend").unwrap(),
    };
    let deny = Fixture {
        peer: allow.peer.clone(),
        path: "/admin".into(),
        headers: http::HeaderMap::new(),
        local: allow.local.clone(),
    };
    for (name, a) in [("native", &native), ("rego", &rego)] {
        assert!(allow.check(a), "{name}: ec-web GET /data must be allowed");
        assert!(!deny.check(a), "{name}: GET /admin must be refused");
    }
    let mut g = c.benchmark_group("authz/scenario1");
    for (name, a) in [("native", &native), ("rego", &rego)] {
        g.bench_function(format!("{name}/allow"), |b| {
            b.iter(|| black_box(allow.check(black_box(a))))
        });
        g.bench_function(format!("{name}/deny_admin"), |b| {
            b.iter(|| black_box(deny.check(black_box(a))))
        });
    }
    g.finish();
}

fn normalize(c: &mut Criterion) {
    let mut g = c.benchmark_group("authz/normalize");
    let opts = NormalizeOptions::default();
    for (name, p) in [
        ("already_normal", "/api/v1/items/42?page=2"),
        ("rewritten", "/api//v1/./x/../items/%34%32?page=2"),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| black_box(normalize_path(black_box(p), &opts).is_ok()))
        });
    }
    g.finish();
}

/// The cost of JWT authentication (Istio RequestAuthentication, ES256)
/// beside a native decision, in one run: `native` is a one-rule native
/// ALLOW on the peer and path; `istio` the same as an Istio
/// AuthorizationPolicy; `istio_jwt` an AuthorizationPolicy requiring a
/// request principal, a client sending the same token on every request
/// (its signature checked once, its claims on every request);
/// `istio_jwt_new_token` the same with 1,024 tokens in turn, each signature
/// checked (the verified-token cache holds 256).
fn jwt(c: &mut Criterion) {
    use base64::Engine as _;
    use rampart_authz::istio::{IstioPolicies, Workload};
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let key =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let p = key.public_key().as_ref();
    let jwks = format!(
        r#"{{"keys":[{{"kty":"EC","crv":"P-256","kid":"k","x":"{}","y":"{}"}}]}}"#,
        b64.encode(&p[1..33]),
        b64.encode(&p[33..65])
    );
    let sign = |sub: &str| {
        let msg = format!(
            "{}.{}",
            b64.encode(r#"{"alg":"ES256","kid":"k"}"#),
            b64.encode(format!(
                r#"{{"iss":"https://issuer.example","sub":"{sub}","aud":"api","exp":4102444800}}"#
            ))
        );
        let token = format!(
            "{msg}.{}",
            b64.encode(key.sign(&rng, msg.as_bytes()).unwrap())
        );
        http::HeaderValue::from_str(&format!("Bearer {token}")).unwrap()
    };
    let workload = Workload {
        namespace: "foo".into(),
        labels: Default::default(),
        root_namespace: "istio-system".into(),
        trust_domain: "example.org".into(),
        trust_domain_aliases: Vec::new(),
        tcp_ports: None,
        jwks_cache: Default::default(),
    };
    let istio = |yaml: &str| {
        Authorizer::default()
            .with_istio(IstioPolicies::from_yaml("bench.yaml", yaml, &workload).unwrap())
            .unwrap()
    };
    let ap = |from: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: api, namespace: foo}}\nspec:\n  rules:\n  - from: [{{source: {{{from}}}}}]\n    to: [{{operation: {{paths: [/data2]}}}}]\n"
        )
    };
    let native = load(
        "policies:\n  - name: api\n    action: ALLOW\n    rules:\n      - from: {principals: [\"spiffe://example.org/ns/ns2/sa/svc2\"]}\n        to: {paths: [/data2]}\n",
    );
    let plain = istio(&ap("principals: [example.org/ns/ns2/sa/svc2]"));
    let with_jwt = istio(&format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: foo}}\nspec:\n  jwtRules:\n  - issuer: https://issuer.example\n    audiences: [api]\n    jwks: '{jwks}'\n---\n{}",
        ap("requestPrincipals: [\"https://issuer.example/*\"]")
    ));
    // The caller and path the policies above name.
    let mut f = Fixture::new(2);
    f.peer = SpiffeId::parse("spiffe://example.org/ns/ns2/sa/svc2").unwrap();
    f.path = "/data2".into();
    f.headers.insert(http::header::AUTHORIZATION, sign("alice"));
    let many: Vec<http::HeaderMap> = (0..1024)
        .map(|i| {
            let mut h = f.headers.clone();
            h.insert(http::header::AUTHORIZATION, sign(&format!("user{i}")));
            h
        })
        .collect();
    let decide = |a: &Authorizer, f: &Fixture, headers: &http::HeaderMap| -> bool {
        let jwt = match a.authenticate_request(headers, None) {
            Ok(j) => j,
            Err(_) => return false,
        };
        let conn = ConnectionInfo::new(Some(&f.peer), "10.0.0.1".parse().unwrap(), 8080)
            .with_jwt(jwt.as_ref().map(|j| &j.claims));
        let req = RequestInfo {
            method: &http::Method::GET,
            authority: "api.example.org",
            path: &f.path,
            raw_path_and_query: &f.path,
            query: None,
            headers,
            protocol: HttpProtocol::Http2,
            scheme: "https",
            grpc_method: None,
            source: "10.0.0.1:40000".parse().unwrap(),
            destination: "10.0.0.2:8080".parse().unwrap(),
            local_identity: Some(&f.local),
            peer_cert_sha256: Some("ab"),
        };
        a.check_request(&conn, &req).is_allowed()
    };
    let mut g = c.benchmark_group("authz/jwt");
    for (name, a) in [
        ("native", &native),
        ("istio", &plain),
        ("istio_jwt", &with_jwt),
    ] {
        assert!(decide(a, &f, &f.headers), "{name}: fixture must be allowed");
        g.bench_function(name, |b| {
            b.iter(|| black_box(decide(black_box(a), &f, &f.headers)))
        });
    }
    assert!(many.iter().all(|h| decide(&with_jwt, &f, h)));
    let mut next = 0;
    g.bench_function("istio_jwt_new_token", |b| {
        b.iter(|| {
            next = (next + 1) % many.len();
            black_box(decide(black_box(&with_jwt), &f, &many[next]))
        })
    });
    g.finish();
}

criterion_group!(benches, native, rego, scenario, normalize, jwt);
criterion_main!(benches);
