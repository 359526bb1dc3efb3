//! `with_request_body`, `include_peer_certificate` and `proto_descriptor`
//! on Rego policies: what loads, what is refused (by name), and what the
//! authorizer tells the proxy per port.

use std::path::Path;

use rampart_authz::model::WithRequestBody;
use rampart_authz::{Authorizer, Options};

fn load(yaml: &str) -> Result<Authorizer, String> {
    Authorizer::from_yaml("p.yaml", yaml, Path::new("."), &Options::default())
        .map_err(|e| e.to_string())
}

const REGO: &str = "kind: rego\n    rego: |\n      package envoy.authz\n      allow := true\n";

#[test]
fn the_body_and_the_certificate_are_asked_for_per_port() {
    let a = load(&format!(
        "policies:\n  - name: a\n    ports: [8080]\n    with_request_body: {{max_request_bytes: 1024, allow_partial_message: true}}\n    include_peer_certificate: true\n    {REGO}  - name: b\n    ports: [9090]\n    {REGO}"
    ))
    .unwrap();
    assert_eq!(
        a.request_body(8080),
        Some(WithRequestBody {
            max_request_bytes: 1024,
            allow_partial_message: true,
            pack_as_bytes: false,
        })
    );
    assert!(a.include_peer_certificate(8080));
    // Nothing is read, and no certificate is made, where no policy asks.
    assert_eq!(a.request_body(9090), None);
    assert!(!a.include_peer_certificate(9090));
    assert_eq!(a.request_body(7000), None);
}

#[test]
fn rego_policies_must_agree_on_the_body_and_descriptor_sets_are_refused() {
    let e = load(&format!(
        "policies:\n  - name: a\n    with_request_body: {{max_request_bytes: 10}}\n    {REGO}  - name: b\n    with_request_body: {{max_request_bytes: 20}}\n    {REGO}"
    ))
    .unwrap_err();
    assert!(e.contains("policy \"b\": with_request_body differs"), "{e}");
    // The same setting twice is one body.
    load(&format!(
        "policies:\n  - name: a\n    with_request_body: {{max_request_bytes: 10}}\n    {REGO}  - name: b\n    with_request_body: {{max_request_bytes: 10}}\n    {REGO}"
    ))
    .unwrap();
    let e = load(&format!(
        "policies:\n  - name: a\n    with_request_body: {{max_request_bytes: 0}}\n    {REGO}"
    ))
    .unwrap_err();
    assert!(e.contains("max_request_bytes must be more than 0"), "{e}");
    let e = load(&format!(
        "policies:\n  - name: a\n    proto_descriptor: /etc/protoset.pb\n    {REGO}"
    ))
    .unwrap_err();
    assert!(e.contains("`proto_descriptor` is not supported"), "{e}");
    let e = load(
        "policies:\n  - name: a\n    action: ALLOW\n    with_request_body: {max_request_bytes: 10}\n    rules: []\n",
    )
    .unwrap_err();
    assert!(
        e.contains("`with_request_body` is only valid with `kind: rego`"),
        "{e}"
    );
    let e = load(&format!(
        "policies:\n  - name: a\n    with_request_body: {{max_request_bytes: 10, max_bytes: 3}}\n    {REGO}"
    ))
    .unwrap_err();
    assert!(e.contains("max_bytes"), "{e}");
}
