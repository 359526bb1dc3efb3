//! OPA-Envoy's inputs that Envoy's options turn on, through real sidecars
//! on loopback: the request body (`with_request_body`: read once and
//! bounded, 413 over the limit, partial bodies, then forwarded unchanged),
//! the peer certificate (`include_peer_certificate`) and the XFCC fields
//! of `set_current_client_cert_details`, asserted where the app sees them.

use crate::support;

use std::net::SocketAddr;

use rampart_authz::input::{XfccDetails, parse_xfcc};
use support::apps;
use support::curl::curl;
use support::sidecar::{
    LocalProc, Loopback, Sidecar, free_addr, inbound_listener, outbound_listener, wait_listening,
};

/// Allows an admin's JSON order of at most 100, a partial body (the
/// second sidecar's), and GET; tells the app what it saw in `x-tag`.
const POLICY: &str = r#"package envoy.authz

http := input.attributes.request.http

cert := urlquery.decode(object.get(input.attributes.source, "certificate", ""))

seen := sprintf("cert=%v;partial=%v;truncated=%v;raw=%v", [
	startswith(cert, "-----BEGIN CERTIFICATE-----\n"),
	object.get(http.headers, "x-envoy-auth-partial-body", "absent"),
	input.truncated_body,
	base64.decode(object.get(http, "rawBody", "")),
])

default allowed := false

allowed if http.method == "GET"

allowed if {
	input.parsed_body.role == "admin"
	input.parsed_body.amount <= 100
}

allowed if input.truncated_body

result := {"allowed": allowed, "headers": {"x-tag": seen}}
"#;

fn policy_file(pki: &Loopback, name: &str, body: &str, cert: bool) -> std::path::PathBuf {
    std::fs::write(pki.dir.path().join(format!("{name}.rego")), POLICY).unwrap();
    let file = pki.dir.path().join(format!("{name}.policy.yaml"));
    std::fs::write(
        &file,
        format!(
            "policies:\n  - name: {name}\n    kind: rego\n    modules: [{name}.rego]\n    \
             query: data.envoy.authz.result\n    include_peer_certificate: {cert}\n    \
             with_request_body: {body}\n"
        ),
    )
    .unwrap();
    file
}

/// SHA-256 of `b`, lower-case hex, as `sha256sum` computes it.
fn sha256_hex(b: &[u8]) -> String {
    use std::io::Write as _;
    let mut child = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sha256sum");
    child.stdin.take().unwrap().write_all(b).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    text.split_whitespace().next().unwrap().to_owned()
}

struct Pair {
    pki: Loopback,
    app: LocalProc,
    strict: Sidecar,
    partial: Sidecar,
    _client: Sidecar,
    /// The client sidecar's listeners to `strict` and `partial`.
    outs: Vec<SocketAddr>,
}

fn pair() -> Pair {
    let pki = Loopback::new();
    let app_addr = free_addr();
    let app = LocalProc::spawn(
        &apps::http_app(app_addr.port(), "orders"),
        pki.dir.path(),
        "orders",
    );
    wait_listening(app_addr);
    let (a, b) = (free_addr(), free_addr());
    let strict_policy = policy_file(&pki, "strict", "{max_request_bytes: 64}", true);
    let partial_policy = policy_file(
        &pki,
        "partial",
        "{max_request_bytes: 16, allow_partial_message: true, pack_as_bytes: true}",
        false,
    );
    let strict = pki.sidecar_with("spiffe://example.org/orders", |c| {
        c.listeners.push(inbound_listener("in", a, app_addr));
        c.inbound.policies = vec![strict_policy];
        c.inbound.set_current_client_cert_details = XfccDetails {
            subject: true,
            uri: true,
            dns: true,
            cert: true,
            chain: false,
        };
    });
    let partial = pki.sidecar_with("spiffe://example.org/orders2", |c| {
        c.listeners.push(inbound_listener("in", b, app_addr));
        c.inbound.policies = vec![partial_policy];
    });
    let to_partial = free_addr();
    let (client, mut outs) = pki.outbound_sidecar_with(
        "spiffe://example.org/ec-web",
        &[a],
        "spiffe://example.org/orders",
        |c| {
            c.listeners.push(outbound_listener(
                "to-partial",
                to_partial,
                b,
                "spiffe://example.org/orders2",
            ))
        },
    );
    outs.push(to_partial);
    Pair {
        pki,
        app,
        strict,
        partial,
        _client: client,
        outs,
    }
}

#[test]
fn rego_sees_the_body_and_the_app_gets_it_unchanged() {
    let p = pair();
    let strict = format!("http://{}/orders", p.outs[0]);
    let admin = r#"{"role":"admin","amount":50}"#;
    // A JSON body the policy parses; the app gets the very same bytes.
    for extra in [&[][..], &["-H", "transfer-encoding: chunked"][..]] {
        let mut args = vec![
            "-H",
            "content-type: application/json",
            "--data-binary",
            admin,
        ];
        args.extend_from_slice(extra);
        let r = curl(&strict, &args);
        assert_eq!(r.status, 200, "{extra:?} {r:?}\n{}", p.strict.logs());
        assert_eq!(
            r.body,
            format!("{} {}", admin.len(), sha256_hex(admin.as_bytes())),
            "{extra:?}"
        );
        assert_eq!(
            r.header("x-app-x-tag"),
            Some("cert=true;partial=false;truncated=false;raw="),
            "{extra:?}"
        );
    }
    // The policy decides on the body.
    let r = curl(
        &strict,
        &[
            "-H",
            "content-type: application/json",
            "--data-binary",
            r#"{"role":"admin","amount":500}"#,
        ],
    );
    assert_eq!(r.status, 403, "{r:?}");
    // A body that does not parse is OPA-Envoy's 400.
    let r = curl(
        &strict,
        &["-H", "content-type: application/json", "--data-binary", "{"],
    );
    assert_eq!(r.status, 400, "{r:?}");
    // Over max_request_bytes without allow_partial_message: 413, declared
    // (Content-Length) or not (chunked), and nothing reaches the app.
    let big = format!(
        r#"{{"role":"admin","amount":1,"pad":"{}"}}"#,
        "x".repeat(80)
    );
    for extra in [&[][..], &["-H", "transfer-encoding: chunked"][..]] {
        let mut args = vec![
            "-H",
            "content-type: application/json",
            "--data-binary",
            &big,
        ];
        args.extend_from_slice(extra);
        let r = curl(&strict, &args);
        assert_eq!(r.status, 413, "{extra:?} {r:?}");
    }
    // With allow_partial_message the policy sees the first 16 bytes (as
    // bytes) and that there was more; the app still gets all of it.
    let partial = format!("http://{}/orders", p.outs[1]);
    let r = curl(
        &partial,
        &["-H", "content-type: text/plain", "--data-binary", &big],
    );
    assert_eq!(r.status, 200, "{r:?}\n{}", p.partial.logs());
    assert_eq!(
        r.body,
        format!("{} {}", big.len(), sha256_hex(big.as_bytes()))
    );
    assert_eq!(
        r.header("x-app-x-tag"),
        Some(format!("cert=false;partial=true;truncated=true;raw={}", &big[..16]).as_str()),
    );
    // A bodyless request reads nothing and has no partial-body header.
    let r = curl(&strict, &[]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.header("x-app-x-tag"),
        Some("cert=true;partial=absent;truncated=false;raw=")
    );
    let seen = p.app.stdout();
    assert_eq!(seen.matches("POST").count(), 3, "{seen}");
    drop(p.pki);
}

#[test]
fn xfcc_carries_the_configured_fields_in_envoys_order() {
    let p = pair();
    let r = curl(&format!("http://{}/data", p.outs[0]), &[]);
    assert_eq!(r.status, 200, "{r:?}\n{}", p.strict.logs());
    let xfcc = r.header("x-app-xfcc").unwrap();
    let elements = parse_xfcc(xfcc).unwrap_or_else(|e| panic!("{xfcc}: {e}"));
    assert_eq!(elements.len(), 1, "{xfcc}");
    let keys: Vec<&str> = elements[0].iter().map(|(k, _)| k.as_str()).collect();
    // `dns: true` adds nothing for an SVID without DNS SANs.
    assert_eq!(keys, ["By", "Hash", "Cert", "Subject", "URI"], "{xfcc}");
    let field = |k: &str| &elements[0].iter().find(|(key, _)| key == k).unwrap().1;
    assert_eq!(field("By"), "spiffe://example.org/orders");
    assert_eq!(field("URI"), "spiffe://example.org/ec-web");
    assert!(
        field("Cert").starts_with("-----BEGIN%20CERTIFICATE-----%0A"),
        "{xfcc}"
    );
    // Cert and Subject are double-quoted, as Envoy writes them.
    assert!(xfcc.contains(";Cert=\"-----BEGIN"), "{xfcc}");
    assert!(xfcc.contains(";Subject=\""), "{xfcc}");
    // The other sidecar has the default: By, Hash, URI.
    let r = curl(&format!("http://{}/data", p.outs[1]), &[]);
    let xfcc = r.header("x-app-xfcc").unwrap();
    let keys: Vec<String> = parse_xfcc(xfcc).unwrap()[0]
        .iter()
        .map(|(k, _)| k.clone())
        .collect();
    assert_eq!(keys, ["By", "Hash", "URI"], "{xfcc}");
}
