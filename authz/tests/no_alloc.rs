//! A native decision does no heap allocation: counted with a global
//! allocator, in its own test binary so it does not slow other tests, and
//! per thread, so that what the test harness allocates on another thread
//! at the same moment is never counted.

#![allow(
    unsafe_code,
    reason = "a counting global allocator wraps the system one (GlobalAlloc is unsafe)"
)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use rampart_authz::external::Evaluation;
use rampart_authz::{ConnectionInfo, Decision, HttpProtocol, RequestInfo, normalize_path};
use rampart_identity::SpiffeId;

struct Counting;

thread_local! {
    // `const`-initialized and without a destructor: reading it never
    // allocates, so the allocator may use it.
    static ALLOCS: Cell<usize> = const { Cell::new(0) };
}

/// Counts one allocation of the current thread (none once its
/// thread-locals are gone, at thread exit).
fn count() {
    let _ = ALLOCS.try_with(|n| n.set(n.get() + 1));
}

fn allocated() -> usize {
    ALLOCS.with(Cell::get)
}

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const POLICY: &str = r#"
policies:
  - name: audit-admin
    action: AUDIT
    rules:
      - to: { paths: ["/admin/*"] }
  - name: deny-debug
    action: DENY
    rules:
      - from: { unauthenticated: true }
        to: { paths: ["/debug/{**}"] }
  - name: api
    action: ALLOW
    ports: [8080]
    rules:
      - name: other-0
        from: { principals: ["spiffe://example.org/other"] }
      - name: web-items
        from: { principals: ["spiffe://example.org/ns/prod/*"], not_source_cidrs: [192.168.0.0/16] }
        to:
          hosts: ["api.example.org"]
          methods: [GET, HEAD]
          paths: ["/api/{*}/items", "/data"]
        when:
          - header: x-tenant
            regex: "t-[0-9]+"
          - header: x-debug
            absent: true
          - query: page
            present: true
  - name: central
    action: CUSTOM
    provider: opa
    rules:
      - to: { paths: ["/custom/{**}"] }
"#;

#[test]
fn native_decision_does_not_allocate() {
    let a = rampart_authz::Authorizer::from_yaml(
        "test.yaml",
        POLICY,
        std::path::Path::new("."),
        &rampart_authz::Options::default(),
    )
    .unwrap_or_else(|e| panic!("policy failed to load:\n{e}"));
    let peer = SpiffeId::parse("spiffe://example.org/ns/prod/web").unwrap();
    let mut headers = http::HeaderMap::new();
    headers.insert("x-tenant", http::HeaderValue::from_static("t-42"));
    let target = "/api/v1/items?page=2";
    let method = http::Method::GET;
    let local = SpiffeId::parse("spiffe://example.org/api").unwrap();
    let opts = *a.normalize_options();

    let run = || {
        let n = normalize_path(target, &opts).unwrap();
        let conn = ConnectionInfo::new(Some(&peer), "10.1.2.3".parse().unwrap(), 8080);
        let req = RequestInfo {
            method: &method,
            authority: "API.example.org:8080",
            path: &n.path,
            raw_path_and_query: target,
            query: n.query,
            headers: &headers,
            protocol: HttpProtocol::Http2,
            scheme: "https",
            grpc_method: None,
            source: "10.1.2.3:5000".parse().unwrap(),
            destination: "10.1.2.4:8080".parse().unwrap(),
            local_identity: Some(&local),
            peer_cert_sha256: None,
        };
        // What the proxy calls: a CUSTOM policy that does not match costs
        // nothing more than the native decision.
        match a.evaluate_request(&conn, &req) {
            Evaluation::Decided(d) => d,
            Evaluation::Consult(c) => panic!("consulted {}", c.provider()),
        }
    };
    // Warm up once (lazy statics in the regex engine's caches).
    let first = run();
    match &first {
        Decision::Allow(p) => assert_eq!((p.policy(), p.rule()), ("api", "web-items")),
        Decision::Deny(d) => panic!("denied: {}", d.explain()),
    }
    drop(first);
    let before = allocated();
    for _ in 0..100 {
        let d = run();
        assert!(d.is_allowed());
    }
    let after = allocated();
    assert_eq!(after - before, 0, "a native decision allocated");
}
