//! A small DSL for authz tests: a request reads like its scenario.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;

use rampart_authz::{
    Authorizer, ConnectionInfo, Decision, HttpProtocol, Options, RequestInfo, grpc_method_of,
    normalize_path,
};
use rampart_identity::SpiffeId;

/// Loads fixture files (relative to tests/fixtures).
pub fn load(files: &[&str]) -> Authorizer {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let paths: Vec<_> = files.iter().map(|f| dir.join(f)).collect();
    match Authorizer::load(&paths, &Options::default()) {
        Ok(a) => a,
        Err(e) => panic!("fixtures failed to load:\n{e}"),
    }
}

/// Compiles policies from YAML text.
pub fn from_yaml(yaml: &str) -> Authorizer {
    match Authorizer::from_yaml("test.yaml", yaml, Path::new("."), &Options::default()) {
        Ok(a) => a,
        Err(e) => panic!("policy failed to load:\n{e}"),
    }
}

/// One request, owning everything a [`RequestInfo`] borrows.
#[derive(Debug, Clone)]
pub struct Req {
    pub peer: Option<SpiffeId>,
    pub peer_dns: Vec<String>,
    pub source: SocketAddr,
    pub dest: SocketAddr,
    pub method: http::Method,
    pub authority: String,
    pub target: String,
    pub headers: http::HeaderMap,
    pub local: Option<SpiffeId>,
    /// Verified JWT claims (as a RequestAuthentication leaves them).
    pub jwt: Option<serde_json::Value>,
    /// The body read for the policies: bytes, partial, packed as bytes.
    pub body: Option<(Vec<u8>, bool, bool)>,
    /// The peer certificate as the input shows it (URL-encoded PEM).
    pub peer_certificate: Option<String>,
}

/// `GET target` on port 8080 from 10.0.0.1, unauthenticated.
pub fn get(target: &str) -> Req {
    Req {
        peer: None,
        peer_dns: Vec::new(),
        source: "10.0.0.1:40000".parse().unwrap(),
        dest: "10.0.0.2:8080".parse().unwrap(),
        method: http::Method::GET,
        authority: "backend.example.org".into(),
        target: target.into(),
        headers: http::HeaderMap::new(),
        local: Some(SpiffeId::parse("spiffe://example.org/self").unwrap()),
        jwt: None,
        body: None,
        peer_certificate: None,
    }
}

impl Req {
    pub fn method(mut self, m: &str) -> Self {
        self.method = http::Method::from_bytes(m.as_bytes()).unwrap();
        self
    }
    pub fn from(mut self, id: &str) -> Self {
        self.peer = Some(SpiffeId::parse(id).unwrap());
        self
    }
    pub fn with_dns_san(mut self, name: &str) -> Self {
        self.peer_dns.push(name.into());
        self
    }
    pub fn source(mut self, ip: &str) -> Self {
        self.source = SocketAddr::new(ip.parse().unwrap(), 40000);
        self
    }
    pub fn port(mut self, port: u16) -> Self {
        self.dest.set_port(port);
        self
    }
    pub fn host(mut self, h: &str) -> Self {
        self.authority = h.into();
        self
    }
    pub fn header(mut self, k: &str, v: &str) -> Self {
        self.headers.append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            http::HeaderValue::from_str(v).unwrap(),
        );
        self
    }
    pub fn claims(mut self, claims: serde_json::Value) -> Self {
        self.jwt = Some(claims);
        self
    }
    /// The body as `with_request_body` read it (`partial`: there was more;
    /// `packed`: `pack_as_bytes`).
    pub fn body(mut self, bytes: &[u8], partial: bool, packed: bool) -> Self {
        self.body = Some((bytes.to_vec(), partial, packed));
        self
    }
    pub fn peer_certificate(mut self, pem: &str) -> Self {
        self.peer_certificate = Some(pem.into());
        self
    }
    pub fn grpc(self) -> Self {
        self.method("POST")
            .header("content-type", "application/grpc")
    }

    /// Normalizes the target and asks the authorizer; `None` when the
    /// target is refused with 400 before any policy runs.
    pub fn check(&self, a: &Authorizer) -> Option<Decision> {
        self.with_info(a, |conn, req| a.check_request(conn, req))
    }

    /// Like [`Req::check`], but a CUSTOM policy yields a consult.
    pub fn evaluate(&self, a: &Authorizer) -> Option<rampart_authz::external::Evaluation> {
        self.with_info(a, |conn, req| a.evaluate_request(conn, req))
    }

    /// The request's check attributes, as an ext_authz client sends them.
    pub fn attributes(&self, a: &Authorizer) -> Option<rampart_authz::external::CheckAttributes> {
        self.with_info(a, rampart_authz::external::CheckAttributes::new)
    }

    /// Normalizes the target and hands the borrowed views to `f`.
    pub fn with_info<T>(
        &self,
        a: &Authorizer,
        f: impl FnOnce(&ConnectionInfo<'_>, &RequestInfo<'_>) -> T,
    ) -> Option<T> {
        let n = normalize_path(&self.target, a.normalize_options()).ok()?;
        let conn = ConnectionInfo::new(self.peer.as_ref(), self.source.ip(), self.dest.port())
            .with_peer_dns(&self.peer_dns)
            .with_jwt(self.jwt.as_ref())
            .with_request_body(self.body.as_ref().map(|(bytes, partial, packed)| {
                rampart_authz::BufferedBody {
                    bytes,
                    partial: *partial,
                    pack_as_bytes: *packed,
                }
            }))
            .with_peer_certificate(self.peer_certificate.as_deref());
        let req = RequestInfo {
            method: &self.method,
            authority: &self.authority,
            path: &n.path,
            raw_path_and_query: &self.target,
            query: n.query,
            headers: &self.headers,
            protocol: HttpProtocol::Http11,
            scheme: "https",
            grpc_method: grpc_method_of(&n.path, &self.headers),
            source: self.source,
            destination: self.dest,
            local_identity: self.local.as_ref(),
            peer_cert_sha256: self.peer.as_ref().map(|_| "a1b2c3"),
        };
        Some(f(&conn, &req))
    }

    /// Whether the request gets through (normalized, then allowed).
    pub fn allowed(&self, a: &Authorizer) -> bool {
        matches!(self.check(a), Some(Decision::Allow(_)))
    }
}
