//! The differential test against a real OPA (`tests/peers/peer-opa.sh`,
//! v1.22.4): every Rego policy of the repository and of the OPA-Envoy
//! corpus (`fixtures/opa-envoy/`), on generated requests whose input
//! documents are built by the same code the sidecar uses
//! (`rampart_authz::input::build`), is evaluated by `opa run --server` and
//! by Rampart. The whole document at the decision path must be equal, and
//! so must the decision the sidecar takes from it (allowed, status, headers)
//! against the one OPA-Envoy would take from OPA's document. Policies that
//! call a builtin Rampart lacks must be refused at load, naming it (OPA
//! loads them).
//!
//! Without the OPA binary the test fails under `RAMPART_REQUIRE_E2E=1` and
//! is skipped (saying so) otherwise.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{self, Req, get};
use base64::Engine as _;
use rampart_authz::model::ResultForm;
use rampart_authz::rego::{RegoEngine, RegoModule};
use rampart_authz::{Authorizer, Decision, model::RegoVersion};
use serde_json::{Value, json};

const OPA_VERSION: &str = "v1.22.4";

/// The `opa` binary built by `tests/peers/peer-opa.sh`.
fn opa_binary() -> Option<PathBuf> {
    let dir = std::env::var_os("RAMPART_PEERS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/rampart-peers"));
    let bin = dir.join(format!("opa-{OPA_VERSION}/bin/opa"));
    bin.is_file().then_some(bin)
}

/// A running `opa run --server`, killed on drop.
struct Opa {
    child: Child,
    addr: SocketAddr,
    policies: Vec<String>,
}

impl Drop for Opa {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Opa {
    fn start(bin: &Path, v0: bool) -> Opa {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut cmd = Command::new(bin);
        cmd.args(["run", "--server", "--log-level", "error", "--addr"])
            .arg(addr.to_string());
        if v0 {
            cmd.arg("--v0-compatible");
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start opa");
        let opa = Opa {
            child,
            addr,
            policies: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = opa.request("GET", "/health", None) {
                return opa;
            }
            assert!(Instant::now() < deadline, "opa did not become healthy");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// One HTTP/1.0 exchange (no chunking, the server closes).
    fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> std::io::Result<(u16, String)> {
        let mut s = TcpStream::connect(self.addr)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let body = body.unwrap_or("");
        write!(
            s,
            "{method} {path} HTTP/1.0\r\nHost: opa\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        let mut out = Vec::new();
        s.read_to_end(&mut out)?;
        let text = String::from_utf8_lossy(&out).into_owned();
        let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        Ok((status, rest.to_owned()))
    }

    /// Replaces every module and the data document.
    fn load(&mut self, modules: &[(String, String)], data: &Value) {
        for id in std::mem::take(&mut self.policies) {
            let (status, body) = self
                .request("DELETE", &format!("/v1/policies/{id}"), None)
                .unwrap();
            assert_eq!(status, 200, "delete policy {id}: {body}");
        }
        let (status, body) = self
            .request("PUT", "/v1/data", Some(&data.to_string()))
            .unwrap();
        assert!(status == 204 || status == 200, "put data: {status} {body}");
        for (i, (name, src)) in modules.iter().enumerate() {
            let id = format!("m{i}");
            let (status, body) = self
                .request("PUT", &format!("/v1/policies/{id}"), Some(src))
                .unwrap();
            assert_eq!(status, 200, "OPA refused {name}: {body}");
            self.policies.push(id);
        }
    }

    /// The document at `query` (`data.a.b`) for `input`; `None` when
    /// undefined; `Err` for an evaluation error.
    fn eval(&self, query: &str, input: &Value) -> Result<Option<Value>, String> {
        let path = query.trim_start_matches("data").replace('.', "/");
        let body = json!({ "input": input }).to_string();
        let (status, text) = self
            .request("POST", &format!("/v1/data{path}"), Some(&body))
            .map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_str(&text).map_err(|e| format!("{status} {text}: {e}"))?;
        if status != 200 {
            return Err(format!("{status}: {text}"));
        }
        Ok(v.get("result").cloned())
    }
}

/// A policy of the corpus: its modules, data, decision path and form.
#[derive(Debug, Clone)]
struct Case {
    name: String,
    modules: Vec<(String, String)>,
    version: RegoVersion,
    data: Value,
    query: String,
    form: ResultForm,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A `# query: ...` (or `# refused: ...`) first line.
fn header_field(src: &str, field: &str) -> Option<String> {
    let first = src.lines().next()?;
    first
        .strip_prefix(&format!("# {field}: "))
        .map(|s| s.trim().to_owned())
}

fn version_of_name(name: &str) -> RegoVersion {
    if name.contains(".v0.") {
        RegoVersion::V0
    } else {
        RegoVersion::V1
    }
}

/// The OPA-Envoy corpus and every Rego policy file of the repository.
fn corpus(jwt_data: &Value) -> Vec<Case> {
    let mut cases = Vec::new();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/opa-envoy");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "rego"))
        .collect();
    files.sort();
    for f in files {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        let src = read(&f);
        let stem = name.split('.').next().unwrap();
        let mut data = jwt_data.clone();
        let data_file = dir.join(format!("{stem}.data.json"));
        if data_file.is_file() {
            let d: Value = serde_json::from_str(&read(&data_file)).unwrap();
            merge(&mut data, d);
        }
        cases.push(Case {
            name: format!("opa-envoy/{name}"),
            query: header_field(&src, "query").unwrap_or_else(|| "data.envoy.authz.allow".into()),
            version: version_of_name(&name),
            modules: vec![(name, src)],
            data,
            form: ResultForm::Envoy,
        });
    }
    // The repository's own Rego policies, with the policy files that use
    // them (their query, data and version).
    let root = repo_root();
    for (yaml, name) in [
        ("app/src/demo/policies/ec-web.rego.yaml", "demo/ec-web"),
        (
            "app/src/demo/policies/ec-backend.rego.yaml",
            "demo/ec-backend",
        ),
        ("app/src/demo/policies/news-web.rego.yaml", "demo/news-web"),
        (
            "app/src/demo/policies/news-backend.rego.yaml",
            "demo/news-backend",
        ),
        (
            "authz/tests/fixtures/scenario1/ec-web.rego.yaml",
            "fixtures/scenario1/ec-web",
        ),
        (
            "authz/tests/fixtures/scenario1/ec-backend.rego.yaml",
            "fixtures/scenario1/ec-backend",
        ),
        (
            "authz/tests/fixtures/scenario4/server-api.rego.yaml",
            "fixtures/scenario4/server-api",
        ),
        (
            "fuzz/seeds/policy_file/inline_rego.yaml",
            "fuzz/inline_rego",
        ),
    ] {
        cases.extend(cases_of_policy_file(&root.join(yaml), name));
    }
    cases
}

/// The Rego policies of one policy file.
fn cases_of_policy_file(file: &Path, name: &str) -> Vec<Case> {
    let doc: serde_yaml::Value = serde_yaml::from_str(&read(file)).unwrap();
    let dir = file.parent().unwrap();
    let mut out = Vec::new();
    for p in doc["policies"].as_sequence().unwrap() {
        if p["kind"].as_str() != Some("rego") {
            continue;
        }
        let version = match p["rego_version"].as_str() {
            Some("v0") => RegoVersion::V0,
            _ => RegoVersion::V1,
        };
        let mut modules = Vec::new();
        for m in p["modules"].as_sequence().into_iter().flatten() {
            let m = m.as_str().unwrap();
            modules.push((m.to_owned(), read(&dir.join(m))));
        }
        if let Some(src) = p["rego"].as_str() {
            modules.push((format!("{name}.rego"), src.to_owned()));
        }
        let mut data = json!({});
        for d in p["data_files"].as_sequence().into_iter().flatten() {
            merge(
                &mut data,
                serde_json::from_str(&read(&dir.join(d.as_str().unwrap()))).unwrap(),
            );
        }
        if !p["data"].is_null() {
            merge(&mut data, serde_json::to_value(&p["data"]).unwrap());
        }
        let form = match p["result"].as_str() {
            Some("any_true") => ResultForm::AnyTrue,
            _ => ResultForm::Envoy,
        };
        out.push(Case {
            name: name.to_owned(),
            modules,
            version,
            data,
            query: p["query"]
                .as_str()
                .unwrap_or("data.envoy.authz.allow")
                .to_owned(),
            form,
        });
    }
    out
}

fn merge(into: &mut Value, doc: Value) {
    match (into, doc) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                match a.get_mut(&k) {
                    Some(existing) => merge(existing, v),
                    None => {
                        a.insert(k, v);
                    }
                }
            }
        }
        (slot, doc) => *slot = doc,
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Keys and tokens for the JWT policies.
struct Jwt {
    es256: ring::signature::EcdsaKeyPair,
    data: Value,
}

impl Jwt {
    fn new() -> Jwt {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["jwt.example.org".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let raw = key.public_key_raw();
        assert_eq!(raw.len(), 65, "an uncompressed P-256 point");
        let jwks = json!({"keys": [
            {"kty": "EC", "crv": "P-256", "kid": "other", "alg": "ES256",
             "x": b64(&[7u8; 32]), "y": b64(&[9u8; 32])},
            {"kty": "EC", "crv": "P-256", "kid": "k1", "alg": "ES256",
             "x": b64(&raw[1..33]), "y": b64(&raw[33..])},
        ]});
        let es256 = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &key.serialize_der(),
            &ring::rand::SystemRandom::new(),
        )
        .unwrap();
        Jwt {
            es256,
            data: json!({"jwks_cert": cert.pem(), "jwks": jwks.to_string()}),
        }
    }

    fn hs256(header: &Value, claims: &Value, secret: &str) -> String {
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
        let tag = ring::hmac::sign(&key, input.as_bytes());
        format!("{input}.{}", b64(tag.as_ref()))
    }

    fn es256(&self, header: &Value, claims: &Value) -> String {
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let sig = self
            .es256
            .sign(&ring::rand::SystemRandom::new(), input.as_bytes())
            .unwrap();
        format!("{input}.{}", b64(sig.as_ref()))
    }

    /// Bearer tokens: valid, expired, wrong audience, wrong secret,
    /// malformed, and ES256 with and without `kid`.
    fn tokens(&self) -> Vec<(&'static str, String)> {
        let hs = json!({"alg": "HS256", "typ": "JWT"});
        let far = 4_000_000_000u64;
        let claims = |role: &str, sub: &str| json!({"role": role, "sub": b64(sub.as_bytes()), "aud": "rampart", "nbf": 1_500_000_000, "exp": far});
        vec![
            (
                "guest",
                Jwt::hs256(&hs, &claims("guest", "alice"), "opa-envoy-secret"),
            ),
            (
                "admin",
                Jwt::hs256(&hs, &claims("admin", "bob"), "opa-envoy-secret"),
            ),
            (
                "expired",
                Jwt::hs256(
                    &hs,
                    &json!({"role": "admin", "aud": "rampart", "nbf": 1, "exp": 2}),
                    "opa-envoy-secret",
                ),
            ),
            (
                "wrong-aud",
                Jwt::hs256(
                    &hs,
                    &json!({"role": "admin", "aud": "other", "nbf": 1, "exp": far}),
                    "opa-envoy-secret",
                ),
            ),
            (
                "wrong-secret",
                Jwt::hs256(&hs, &claims("admin", "bob"), "guess"),
            ),
            ("malformed", "not.a-token".to_owned()),
            (
                "es256-kid",
                self.es256(
                    &json!({"alg": "ES256", "kid": "k1"}),
                    &json!({"sub": "carol", "role": "admin"}),
                ),
            ),
            (
                "es256-nokid",
                self.es256(
                    &json!({"alg": "ES256"}),
                    &json!({"sub": "dave", "role": "guest"}),
                ),
            ),
            (
                "es256-wrong-kid",
                self.es256(
                    &json!({"alg": "ES256", "kid": "other"}),
                    &json!({"sub": "eve"}),
                ),
            ),
        ]
    }
}

/// Generated requests: methods, odd paths and queries, repeated headers,
/// bodies' headers, JWTs, and peers with and without certificates.
fn requests(jwt: &Jwt) -> Vec<(String, Req)> {
    let mut out: Vec<(String, Req)> = Vec::new();
    let peers: [(&str, Option<&str>, Option<&str>); 5] = [
        ("ec-web", Some("spiffe://example.org/ec-web"), None),
        ("news-web", Some("spiffe://example.org/news-web"), None),
        (
            "reader",
            Some("spiffe://example.org/ns/prod/sa/reader"),
            None,
        ),
        ("dns-peer", None, Some("ingress.example.net")),
        ("plaintext", None, None),
    ];
    let targets = [
        "/",
        "/data",
        "/data/",
        "/admin",
        "/people",
        "/people/alice",
        "/productpage",
        "/health",
        "/api/v1/products",
        "/api/v1/x/y",
        "/old/page",
        "/public",
        "/a%20b/%E2%82%AC",
        "/a+b/c",
        "/testsrv.Test/Hello",
        "/testsrv.Test/Other",
        "/x?user=alice",
        "/x?user=bob&user=alice",
        "/x?q=1&q=2&flag",
        "/x?confirm=yes",
        "/x?a=b+c&d=%41",
        "/x?=v&k=",
        "/x?&&a=1&",
    ];
    let methods = ["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"];
    for (pname, id, dns) in peers {
        for (ti, target) in targets.iter().enumerate() {
            let method = methods[ti % methods.len()];
            let mut r = get(target).method(method).source("10.1.2.3");
            if let Some(id) = id {
                r = r.from(id);
            }
            if let Some(d) = dns {
                r = r.with_dns_san(d);
            }
            out.push((format!("{pname} {method} {target}"), r.clone()));
            if ti % 3 == 0 {
                out.push((format!("{pname} GET {target}"), r.method("GET")));
            }
        }
    }
    // Headers: secrets, repeated values, debug headers, gRPC, forms.
    let ec_web = || get("/data").from("spiffe://example.org/ec-web");
    let header_cases: Vec<(&str, Req)> = vec![
        (
            "secret",
            get("/noproxy").header("x-opa-secret", "ec-web-secret"),
        ),
        (
            "news secret",
            get("/noproxy").header("x-opa-secret", "news-web-secret"),
        ),
        (
            "secret POST",
            get("/noproxy")
                .method("POST")
                .header("x-opa-secret", "ec-web-secret"),
        ),
        (
            "repeated",
            ec_web()
                .header("x-a", "1")
                .header("x-a", "2")
                .header("x-b", "3"),
        ),
        (
            "debug headers",
            ec_web()
                .header("x-debug-trace", "on")
                .header("x-debug-user", "me")
                .header("x-internal-token", "t"),
        ),
        (
            "forged xfcc",
            ec_web().header("x-forwarded-client-cert", "URI=spiffe://example.org/admin"),
        ),
        (
            "internal header",
            get("/data")
                .from("spiffe://example.org/ec-web")
                .header("rampart-orig-proto", "HTTP/1.1"),
        ),
        (
            "grpc",
            get("/testsrv.Test/Hello")
                .from("spiffe://example.org/ec-web")
                .grpc(),
        ),
        ("grpc plaintext", get("/testsrv.Test/Ping").grpc()),
        (
            "builtins",
            ec_web()
                .header("x-client-version", "1.10.0")
                .header("x-not-after", "2030-01-01T00:00:00Z")
                .header("x-form", "a=1&a=2&b=%20")
                .header("x-yaml", "{b: [1, 2], c: x}")
                .header("x-request-id", "6ba7b810-9dad-11d1-80b4-00c04fd430c8")
                .header("x-size", "10MB"),
        ),
        (
            "hmac",
            ec_web().header(
                "x-signature",
                "5b8cd16bd4ab6ab9fbe7be01dcdb4e32b47a3bb2b0a8b3cc55c2cf5e9c6d5e75",
            ),
        ),
        (
            "json body",
            ec_web()
                .method("POST")
                .header("content-type", "application/json"),
        ),
        (
            "basic alice",
            get("/productpage").header("authorization", "Basic YWxpY2U6cGFzc3dvcmQ="),
        ),
        (
            "basic bob",
            get("/api/v1/products")
                .method("POST")
                .header("authorization", "Basic Ym9iOnNlY3JldA=="),
        ),
        (
            "basic garbage",
            get("/productpage").header("authorization", "Basic !!!"),
        ),
    ];
    for (name, r) in header_cases {
        out.push((name.to_owned(), r));
    }
    out.extend(body_requests());
    for (name, token) in jwt.tokens() {
        for target in ["/people", "/people/x", "/other"] {
            for method in ["GET", "POST"] {
                let r = get(target)
                    .method(method)
                    .header("authorization", &format!("Bearer {token}"))
                    .header("x-jwt", &token);
                out.push((format!("jwt {name} {method} {target}"), r));
            }
        }
    }
    out
}

/// Requests with bodies as `with_request_body` reads them (JSON, forms,
/// multipart, bytes, partial, truncated by `content-length`, odd and
/// broken ones), from peers with and without a certificate in the input.
fn body_requests() -> Vec<(String, Req)> {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["app1.example.org".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let pem = rampart_authz::input::url_encoded_pem(&[cert.der().as_ref()]);
    let mp = |parts: &[(&str, Option<&str>, &str)]| {
        let mut s = String::from("preamble\r\n");
        for (name, ct, v) in parts {
            s.push_str("--B0und\r\n");
            s.push_str(&format!(
                "Content-Disposition: form-data; name=\"{name}\"\r\n"
            ));
            if let Some(ct) = ct {
                s.push_str(&format!("Content-Type: {ct}\r\n"));
            }
            s.push_str(&format!("\r\n{v}\r\n"));
        }
        s.push_str("--B0und--\r\n");
        s
    };
    let bodies: Vec<(&str, &str, String, bool, bool)> = vec![
        (
            "json admin",
            "application/json",
            r#"{"role":"admin","amount":50}"#.into(),
            false,
            false,
        ),
        (
            "json admin big",
            "application/json",
            r#"{"role":"admin","amount":500}"#.into(),
            false,
            false,
        ),
        (
            "json guest",
            "application/json; charset=utf-8",
            r#" {"role":"guest","tags":["a",1,2.5,null,true],"n":{"deep":{"x":[]}}} "#.into(),
            false,
            false,
        ),
        (
            "json dup keys",
            "application/json",
            r#"{"role":"guest","role":"admin","amount":1}"#.into(),
            false,
            false,
        ),
        (
            "json unicode",
            "application/json",
            r#"{"role":"\u00e9t\u00e9","s":"€ \" \\"}"#.into(),
            false,
            false,
        ),
        (
            "json number",
            "application/json",
            "1e3".into(),
            false,
            false,
        ),
        (
            "json array",
            "application/json",
            "[1,2,3]".into(),
            false,
            false,
        ),
        (
            "json packed",
            "application/json",
            r#"{"role":"admin","amount":5}"#.into(),
            false,
            true,
        ),
        (
            "json partial",
            "application/json",
            r#"{"role":"adm"#.into(),
            true,
            false,
        ),
        (
            "form alice",
            "application/x-www-form-urlencoded",
            "user=bob&user=alice&x=%41+b".into(),
            false,
            false,
        ),
        (
            "form empty pairs",
            "application/x-www-form-urlencoded",
            "&&user=&=v&k".into(),
            false,
            false,
        ),
        (
            "form packed",
            "application/x-www-form-urlencoded",
            "user=alice".into(),
            false,
            true,
        ),
        (
            "multipart",
            "multipart/form-data; boundary=B0und",
            mp(&[
                ("file", None, "hello, world"),
                ("meta", Some("application/json"), r#"{"public":true}"#),
                ("file", None, "again"),
            ]),
            false,
            false,
        ),
        (
            "multipart quoted boundary",
            "multipart/form-data; boundary=\"B0und\"",
            mp(&[("meta", Some("application/json"), r#"{"public":false}"#)]),
            false,
            false,
        ),
        (
            "multipart no boundary",
            "multipart/form-data",
            "x".into(),
            false,
            false,
        ),
        ("text", "text/plain", "hello".into(), false, false),
        (
            "bytes hello",
            "application/octet-stream",
            "hello".into(),
            false,
            true,
        ),
        (
            "grpc",
            "application/grpc",
            "\0\0\0\0\x02\x08\x01".into(),
            false,
            true,
        ),
        (
            "no type",
            "",
            r#"{"role":"admin","amount":1}"#.into(),
            false,
            false,
        ),
    ];
    let mut out = Vec::new();
    for (name, ct, body, partial, packed) in bodies {
        for with_cert in [false, true] {
            let mut r = get("/orders")
                .method("POST")
                .from("spiffe://example.org/ec-web")
                .body(body.as_bytes(), partial, packed);
            if !ct.is_empty() {
                r = r.header("content-type", ct);
            }
            if with_cert {
                r = r.peer_certificate(&pem);
            }
            let label = if with_cert { " cert" } else { "" };
            out.push((format!("body {name}{label}"), r.clone()));
            // A declared length above what was read: truncated.
            if !partial && !with_cert {
                let r = r.header("content-length", &(body.len() + 10).to_string());
                out.push((format!("body {name} truncated"), r));
            }
        }
    }
    // A client-sent partial-body header without a body read: Envoy passes
    // it on, and the plugin believes it.
    out.push((
        "body forged partial header".into(),
        get("/orders")
            .method("POST")
            .header("content-type", "application/json")
            .header("x-envoy-auth-partial-body", "true"),
    ));
    out
}

/// The decision OPA-Envoy takes from a result document
/// (`envoyauth/response.go`): allowed, the status of a denial, and the
/// headers it sets. `None` for a document the plugin rejects (an error,
/// which Envoy answers with 403).
fn opa_envoy_decision(doc: &Option<Value>) -> (bool, u16, Vec<(String, String)>) {
    let deny = (false, 403, Vec::new());
    let Some(doc) = doc else { return deny };
    match doc {
        Value::Bool(b) => (*b, if *b { 200 } else { 403 }, Vec::new()),
        Value::Object(o) => {
            let Some(Value::Bool(allowed)) = o.get("allowed") else {
                return deny;
            };
            let mut headers = Vec::new();
            let objects: Vec<&serde_json::Map<String, Value>> = match o.get("headers") {
                None => Vec::new(),
                Some(Value::Object(h)) => vec![h],
                Some(Value::Array(a)) => {
                    match a.iter().map(|x| x.as_object()).collect::<Option<_>>() {
                        Some(v) => v,
                        None => return deny,
                    }
                }
                Some(_) => return deny,
            };
            for h in objects {
                for (k, v) in h {
                    match v {
                        Value::String(s) => headers.push((k.to_lowercase(), s.clone())),
                        Value::Array(a) => {
                            for x in a {
                                match x.as_str() {
                                    Some(s) => headers.push((k.to_lowercase(), s.to_owned())),
                                    None => return deny,
                                }
                            }
                        }
                        _ => return deny,
                    }
                }
            }
            headers.sort();
            if *allowed {
                return (true, 200, headers);
            }
            // `envoy.type.v3.StatusCode`: the codes Envoy can send.
            const ENVOY: &[u64] = &[
                100, 200, 201, 202, 203, 204, 205, 206, 207, 208, 226, 300, 301, 302, 303, 304,
                305, 307, 308, 400, 401, 402, 403, 404, 405, 406, 407, 408, 409, 410, 411, 412,
                413, 414, 415, 416, 417, 421, 422, 423, 424, 426, 428, 429, 431, 500, 501, 502,
                503, 504, 505, 506, 507, 508, 510, 511,
            ];
            let status = match o.get("http_status") {
                None => 403,
                Some(s) => match s.as_u64() {
                    Some(n) if ENVOY.contains(&n) => n as u16,
                    _ => return deny,
                },
            };
            (false, status, headers)
        }
        _ => deny,
    }
}

/// The sidecar's decision in the same terms.
fn rampart_decision(d: &Decision) -> (bool, u16, Vec<(String, String)>) {
    let pairs = |h: &[(http::HeaderName, http::HeaderValue)]| {
        let mut v: Vec<(String, String)> = h
            .iter()
            .map(|(k, v)| {
                let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
                (k.as_str().to_owned(), v)
            })
            .collect();
        v.sort();
        v
    };
    match d {
        Decision::Allow(p) => (
            true,
            200,
            p.effects().map(|e| pairs(&e.headers)).unwrap_or_default(),
        ),
        Decision::Deny(d) => (
            false,
            d.http_status().as_u16(),
            d.response
                .as_ref()
                .map(|r| pairs(&r.headers))
                .unwrap_or_default(),
        ),
    }
}

/// JSON equality where 1 and 1.0 are the same number (Go and Rust print
/// them differently; OPA's numbers are arbitrary-precision decimals).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x == y || x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

fn authorizer_of(case: &Case, dir: &Path) -> Authorizer {
    let mut names = Vec::new();
    for (i, (_, src)) in case.modules.iter().enumerate() {
        let f = format!("m{i}.rego");
        std::fs::write(dir.join(&f), src).unwrap();
        names.push(f);
    }
    let policy = json!({"policies": [{
        "name": "p",
        "kind": "rego",
        "modules": names,
        "data": case.data,
        "query": case.query,
        "rego_version": match case.version { RegoVersion::V0 => "v0", RegoVersion::V1 => "v1" },
        "result": match case.form { ResultForm::Envoy => "envoy", ResultForm::AnyTrue => "any_true" },
    }]});
    let yaml = serde_yaml::to_string(&policy).unwrap();
    Authorizer::from_yaml("p.yaml", &yaml, dir, &rampart_authz::Options::default())
        .unwrap_or_else(|e| panic!("{}: Rampart refused the policy:\n{e}", case.name))
}

#[test]
fn rampart_decides_exactly_as_opa_on_the_corpus() {
    let Some(bin) = opa_binary() else {
        assert!(
            std::env::var_os("RAMPART_REQUIRE_E2E").is_none_or(|v| v != "1"),
            "opa {OPA_VERSION} is required (tests/peers/peer-opa.sh) and RAMPART_REQUIRE_E2E=1"
        );
        eprintln!("skipped: opa {OPA_VERSION} is not built (run tests/peers/peer-opa.sh)");
        return;
    };
    let jwt = Jwt::new();
    let cases = corpus(&jwt.data);
    let reqs = requests(&jwt);
    let mut v0 = Opa::start(&bin, true);
    let mut v1 = Opa::start(&bin, false);
    let tmp = std::env::temp_dir().join(format!("rampart-opa-diff-{}", std::process::id()));
    let mut failures = Vec::new();
    let (mut run, mut matched) = (0usize, 0usize);
    for case in &cases {
        let opa = match case.version {
            RegoVersion::V0 => &mut v0,
            RegoVersion::V1 => &mut v1,
        };
        opa.load(&case.modules, &case.data);
        let dir = tmp.join(case.name.replace('/', "_"));
        std::fs::create_dir_all(&dir).unwrap();
        let authz = authorizer_of(case, &dir);
        let modules: Vec<RegoModule> = case
            .modules
            .iter()
            .map(|(name, src)| RegoModule {
                name: name.clone(),
                source: src.clone(),
                version: case.version,
            })
            .collect();
        let engine = RegoEngine::new(
            &modules,
            std::slice::from_ref(&case.data),
            &case.query,
            case.form,
            Duration::from_secs(5),
        )
        .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        for (rname, req) in &reqs {
            let Some(input) = req.with_info(&authz, rampart_authz::input::build) else {
                continue; // refused by path normalization before any policy
            };
            if input.is_null() {
                continue; // OPA-Envoy's 400 (checked by its own test below)
            }
            run += 1;
            let ours = engine.evaluate_document(&input);
            let theirs = opa.eval(&case.query, &input);
            let docs_agree = match (&ours, &theirs) {
                (Ok(Some(a)), Ok(Some(b))) => same(a, b),
                (Ok(None), Ok(None)) => true,
                (Err(_), Err(_)) => true,
                _ => false,
            };
            let decision = req.check(&authz).expect("normalized above");
            let d_ours = rampart_decision(&decision);
            let d_theirs = match (&case.form, &theirs) {
                (ResultForm::Envoy, Ok(doc)) => opa_envoy_decision(doc),
                (ResultForm::Envoy, Err(_)) => (false, 403, Vec::new()),
                // SPIRE's form: allowed when any boolean is true.
                (ResultForm::AnyTrue, Ok(Some(Value::Object(o)))) => {
                    let any = o.values().any(|v| v == &Value::Bool(true));
                    (any, if any { 200 } else { 403 }, Vec::new())
                }
                (ResultForm::AnyTrue, _) => (false, 403, Vec::new()),
            };
            if docs_agree && d_ours == d_theirs {
                matched += 1;
            } else {
                failures.push(format!(
                    "{} / {rname}:\n  rampart: {ours:?} -> {d_ours:?}\n  opa:     {theirs:?} -> {d_theirs:?}\n  input: {input}",
                    case.name
                ));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    eprintln!(
        "opa differential: {} policies, {run} cases run, {matched} matched, {} differ",
        cases.len(),
        failures.len()
    );
    // The first three differences of each policy, and how many it has.
    let mut by_policy: BTreeMap<&str, Vec<&String>> = BTreeMap::new();
    for f in &failures {
        let policy = f.split(" / ").next().unwrap_or("");
        by_policy.entry(policy).or_default().push(f);
    }
    let report: Vec<String> = by_policy
        .iter()
        .map(|(p, fs)| {
            let first: Vec<&str> = fs.iter().take(3).map(|s| s.as_str()).collect();
            format!("== {p}: {} differ\n{}", fs.len(), first.join("\n"))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {run} cases differ from OPA:\n{}",
        failures.len(),
        report.join("\n")
    );
    assert!(run > 1000, "the corpus ran only {run} cases");
}

/// Go's `url.ParseQuery` (which OPA-Envoy applies to the query, answering
/// 400 when it fails) is also OPA's `urlquery.decode_object`: Rampart's
/// `parsed_query` must equal it, and Rampart must refuse exactly the
/// queries it refuses.
#[test]
fn query_parsing_and_its_400_match_go() {
    let Some(bin) = opa_binary() else {
        assert!(
            std::env::var_os("RAMPART_REQUIRE_E2E").is_none_or(|v| v != "1"),
            "opa {OPA_VERSION} is required (tests/peers/peer-opa.sh) and RAMPART_REQUIRE_E2E=1"
        );
        eprintln!("skipped: opa {OPA_VERSION} is not built (run tests/peers/peer-opa.sh)");
        return;
    };
    let mut opa = Opa::start(&bin, false);
    opa.load(
        &[(
            "probe.rego".into(),
            "package probe\n\nq := urlquery.decode_object(input.q)\n".into(),
        )],
        &json!({}),
    );
    let authz = support::from_yaml(
        "policies:\n  - name: p\n    kind: rego\n    rego: |\n      package envoy.authz\n      allow := true\n",
    );
    let queries = [
        "a=1",
        "a=1&a=2",
        "a",
        "a=",
        "=b",
        "&&",
        "a=b+c",
        "a%20b=c%2Bd",
        "a=%zz",
        "a=%4",
        "%=1",
        "a;b=1",
        "a=1;b=2",
        "a=1&b=%",
        "x=%E2%82%AC",
        "x=%ff",
        "k=v&k&k=",
        "a=b=c",
        "+=+",
        "a=1&&b=2&",
    ];
    let mut differ = Vec::new();
    for q in queries {
        let target = format!("/p?{q}");
        let input = get(&target)
            .with_info(&authz, rampart_authz::input::build)
            .expect("normalizes");
        let ours = if input.is_null() {
            None
        } else {
            Some(input["parsed_query"].clone())
        };
        let theirs = opa.eval("data.probe.q", &json!({"q": q})).unwrap();
        let agree = match (&ours, &theirs) {
            (Some(a), Some(b)) => same(a, b),
            (None, None) => true,
            _ => false,
        };
        if !agree {
            differ.push(format!("{q:?}: rampart {ours:?}, go {theirs:?}"));
        }
        // A refused query is a 400 from a Rego policy, before it runs.
        let status = match get(&target).check(&authz).expect("normalizes") {
            Decision::Allow(_) => 200,
            Decision::Deny(d) => d.http_status().as_u16(),
        };
        assert_eq!(status, if ours.is_some() { 200 } else { 400 }, "{q:?}");
    }
    assert!(
        differ.is_empty(),
        "query parsing differs from Go:\n{}",
        differ.join("\n")
    );
}

/// Policies calling a builtin Rampart lacks or refuses load in OPA and are
/// refused by Rampart at load, naming the builtin and where it is called.
#[test]
fn policies_calling_missing_builtins_are_refused_at_load() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/opa-envoy/refused");
    let opa_bin = opa_binary();
    let mut opa = opa_bin
        .as_ref()
        .map(|b| (Opa::start(b, false), Opa::start(b, true)));
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 5);
    for f in files {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        let src = read(&f);
        let builtin = header_field(&src, "refused").expect("a # refused: line");
        let version = version_of_name(&name);
        let err = RegoEngine::new(
            &[RegoModule {
                name: name.clone(),
                source: src.clone(),
                version,
            }],
            &[json!({})],
            "data.envoy.authz.allow",
            ResultForm::Envoy,
            Duration::from_secs(1),
        )
        .expect_err(&name);
        assert!(err.contains(&builtin), "{name}: {err}");
        assert!(
            err.starts_with(&format!("{name}:")),
            "{name}: names the file: {err}"
        );
        let line = src
            .lines()
            .position(|l| l.contains(&format!("{builtin}(")))
            .unwrap()
            + 1;
        assert!(
            err.contains(&format!(":{line}:")),
            "{name}: names line {line}: {err}"
        );
        if let Some((v1, v0)) = &mut opa {
            let opa = match version {
                RegoVersion::V0 => v0,
                RegoVersion::V1 => v1,
            };
            // OPA itself compiles it: the refusal is Rampart's, and named.
            opa.load(&[(name.clone(), src.clone())], &json!({}));
        }
    }
    if opa_bin.is_none() {
        assert!(
            std::env::var_os("RAMPART_REQUIRE_E2E").is_none_or(|v| v != "1"),
            "opa {OPA_VERSION} is required (tests/peers/peer-opa.sh) and RAMPART_REQUIRE_E2E=1"
        );
    }
}
