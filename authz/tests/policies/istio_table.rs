//! Istio's own examples, decided by Rampart as Istio decides them. Each
//! example in `tests/istio/*.yaml` is a policy set as published (Istio's
//! documentation tasks and reference, and pilot's builder test data), a
//! workload, and requests with the result Istio documents (or, for the
//! builder data, the result of the Envoy RBAC configuration the builder
//! generates, read from its `-out.yaml`). An example may instead say that
//! Rampart refuses it at load, naming the field it cannot honour.
//!
//! Counts per source file are printed; any case that decides differently
//! fails the test.

use crate::support;

use std::collections::BTreeMap;
use std::path::Path;

use rampart_authz::istio::{IstioPolicies, Workload};
use rampart_authz::{Authorizer, ConnectionInfo, Decision, external::Evaluation};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Example {
    /// Where the policy and the expected results are published.
    source: String,
    #[serde(default)]
    workload: Option<WorkloadSpec>,
    /// The resources, exactly as published.
    policies: String,
    /// Rampart refuses the set at load; the error must contain this.
    #[serde(default)]
    refused: Option<String>,
    cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkloadSpec {
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    trust_domain: Option<String>,
    #[serde(default)]
    trust_domain_aliases: Vec<String>,
    #[serde(default)]
    tcp_ports: Option<Vec<u16>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    /// The peer's SPIFFE ID; absent: plaintext.
    #[serde(default)]
    from: Option<String>,
    #[serde(default)]
    source_ip: Option<String>,
    #[serde(default)]
    dest_ip: Option<String>,
    #[serde(default)]
    port: Option<u16>,
    /// An opaque TCP connection instead of an HTTP request.
    #[serde(default)]
    tcp: bool,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    sni: Option<String>,
    /// `allow`, `deny`, or `custom:<provider>` (the external authorizer
    /// is asked).
    expect: String,
}

#[derive(Debug, Default)]
struct Counts {
    cases: usize,
    equal: usize,
    refused: usize,
    different: Vec<String>,
}

fn workload(w: &Option<WorkloadSpec>) -> Workload {
    let w = w.as_ref();
    Workload {
        namespace: w
            .and_then(|w| w.namespace.clone())
            .unwrap_or_else(|| "foo".into()),
        labels: w.and_then(|w| w.labels.clone()).unwrap_or_else(|| {
            [("app", "httpbin"), ("version", "v1")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect()
        }),
        root_namespace: "istio-system".into(),
        trust_domain: w
            .and_then(|w| w.trust_domain.clone())
            .unwrap_or_else(|| "cluster.local".into()),
        trust_domain_aliases: w
            .map(|w| w.trust_domain_aliases.clone())
            .unwrap_or_default(),
        tcp_ports: w.and_then(|w| w.tcp_ports.clone()),
        jwks_cache: Default::default(),
    }
}

fn outcome(a: &Authorizer, c: &Case) -> String {
    let mut r = support::get(c.path.as_deref().unwrap_or("/"));
    if let Some(id) = &c.from {
        r = r.from(id);
    }
    if let Some(ip) = &c.source_ip {
        r = r.source(ip);
    }
    if let Some(ip) = &c.dest_ip {
        r.dest.set_ip(ip.parse().expect("dest_ip"));
    }
    r = r.port(c.port.unwrap_or(8080));
    if let Some(m) = &c.method {
        r = r.method(m);
    }
    if let Some(h) = &c.host {
        r = r.host(h);
    }
    for (k, v) in &c.headers {
        r = r.header(k, v);
    }
    let describe = |e: Evaluation| match e {
        Evaluation::Decided(Decision::Allow(_)) => "allow".to_owned(),
        Evaluation::Decided(Decision::Deny(_)) => "deny".to_owned(),
        Evaluation::Consult(c) => format!("custom:{}", c.provider()),
    };
    if c.tcp {
        let conn = ConnectionInfo::new(r.peer.as_ref(), r.source.ip(), r.dest.port())
            .with_dest_ip(r.dest.ip())
            .with_sni(c.sni.as_deref());
        return match a.check_connection(&conn) {
            Decision::Allow(_) => "allow".into(),
            Decision::Deny(_) => "deny".into(),
        };
    }
    let sni = c.sni.clone();
    r.with_info(a, |conn, req| {
        // RequestAuthentication first, as the sidecar does: a token that
        // does not verify is answered 401 before any policy.
        let verified = match a.authenticate_request(req.headers, req.query) {
            Ok(v) => v,
            Err(_) => return "deny".to_owned(),
        };
        let conn = conn
            .with_sni(sni.as_deref())
            .with_jwt(verified.as_ref().map(|v| &v.claims));
        describe(a.evaluate_request(&conn, req))
    })
    .unwrap_or_else(|| "bad_request".into())
}

fn run(file: &str) -> Counts {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/istio")
        .join(file);
    let text = std::fs::read_to_string(&path).expect("case file");
    let examples: Vec<Example> = match serde_yaml::from_str(&text) {
        Ok(e) => e,
        Err(e) => panic!("{file}: {e}"),
    };
    let mut counts = Counts::default();
    for ex in &examples {
        let w = workload(&ex.workload);
        let loaded = IstioPolicies::from_yaml(&ex.source, &ex.policies, &w);
        match (&ex.refused, loaded) {
            (Some(why), Err(e)) => {
                let msg = e.to_string();
                assert!(
                    msg.contains(why.as_str()),
                    "{}: refused, but not for {why:?}:\n{msg}",
                    ex.source
                );
                counts.cases += ex.cases.len();
                counts.refused += ex.cases.len();
            }
            (Some(why), Ok(_)) => panic!("{}: loaded, expected a refusal for {why:?}", ex.source),
            (None, Err(e)) => panic!("{}: failed to load:\n{e}", ex.source),
            (None, Ok(istio)) => {
                let a = Authorizer::default()
                    .with_istio(istio)
                    .expect("no native CUSTOM policy");
                for c in &ex.cases {
                    counts.cases += 1;
                    let got = outcome(&a, c);
                    if got == c.expect {
                        counts.equal += 1;
                    } else {
                        counts.different.push(format!(
                            "{} / {}: Istio {}, Rampart {got}",
                            ex.source, c.name, c.expect
                        ));
                    }
                }
            }
        }
    }
    println!(
        "{file}: {} examples, {} cases, {} equal, {} refused at load, {} different",
        examples.len(),
        counts.cases,
        counts.equal,
        counts.refused,
        counts.different.len()
    );
    counts
}

#[test]
fn istio_documented_examples_decide_as_istio() {
    let c = run("docs.yaml");
    assert!(c.different.is_empty(), "{:#?}", c.different);
    assert!(c.cases >= 40, "{} cases", c.cases);
}

#[test]
fn istio_builder_testdata_decides_as_istio() {
    let c = run("builder.yaml");
    assert!(c.different.is_empty(), "{:#?}", c.different);
    assert!(c.cases >= 30, "{} cases", c.cases);
}
