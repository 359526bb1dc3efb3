//! Requests decided without a proxy, for `rampart policy explain` and
//! `check`: built from command-line facts or read back from an OPA-Envoy
//! input document (a decision log's `input`), so that the policies see
//! exactly the input the sidecar would build (XFCC included), and bare Rego
//! files loaded as one policy, as `opa eval -d` loads them.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use rampart_identity::SpiffeId;
use serde_json::Value;

use crate::input::{XFCC, parse_xfcc};
use crate::model::RegoVersion;
use crate::{Authorizer, ConnectionInfo, HttpProtocol, RequestInfo, grpc_method_of};

/// A policy file over bare `.rego` modules and `.json`/`.yaml` data files:
/// one Rego policy named `rego`, as `opa eval -d FILE...` would load them.
pub fn rego_files_policy(files: &[PathBuf], version: RegoVersion, query: &str) -> String {
    let path = |p: &PathBuf| {
        std::path::absolute(p)
            .unwrap_or_else(|_| p.clone())
            .display()
            .to_string()
    };
    let modules: Vec<String> = files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "rego"))
        .map(path)
        .collect();
    let data: Vec<String> = files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "json"))
        .map(path)
        .collect();
    let policy = serde_json::json!({"policies": [{
        "name": "rego",
        "kind": "rego",
        "modules": modules,
        "data_files": data,
        "query": query,
        "rego_version": match version { RegoVersion::V0 => "v0", RegoVersion::V1 => "v1" },
    }]});
    // Invariant: strings and arrays always serialize.
    serde_yaml::to_string(&policy).expect("serializable policy")
}

/// One request, owning what a [`RequestInfo`] borrows.
#[derive(Debug, Clone)]
pub struct OfflineRequest {
    /// The peer's SPIFFE ID, when it has one.
    pub peer: Option<SpiffeId>,
    /// The peer certificate's DNS SANs (a DNS-only peer).
    pub peer_dns: Vec<String>,
    /// SHA-256 (hex) of the peer's certificate, for XFCC `Hash`.
    pub peer_cert_sha256: Option<String>,
    /// This sidecar's own ID, for XFCC `By` and the destination principal.
    pub local: Option<SpiffeId>,
    /// Method.
    pub method: http::Method,
    /// Request target as sent (path and query).
    pub target: String,
    /// Host / `:authority`.
    pub host: String,
    /// Request headers (an XFCC among them is replaced, as the sidecar does).
    pub headers: http::HeaderMap,
    /// Source address.
    pub source: SocketAddr,
    /// Destination address (its port selects the policies).
    pub destination: SocketAddr,
}

/// Why an input document cannot be read back into a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("input document: {0}")]
pub struct InputDocumentError(String);

impl OfflineRequest {
    /// Parses an OPA-Envoy input document, or a decision-log entry (whose
    /// `input` it reads), and reads the request back from it.
    pub fn from_input_text(text: &str) -> Result<OfflineRequest, InputDocumentError> {
        let doc: Value =
            serde_json::from_str(text).map_err(|e| InputDocumentError(format!("not JSON: {e}")))?;
        match doc.get("input") {
            Some(input) => OfflineRequest::from_input(input),
            None => OfflineRequest::from_input(&doc),
        }
    }

    /// Reads an OPA-Envoy input document back: method, path, host, headers,
    /// addresses, the source principal (peer), the destination principal
    /// (this sidecar) and the XFCC `Hash`.
    pub fn from_input(doc: &Value) -> Result<OfflineRequest, InputDocumentError> {
        let bad = |m: &str| InputDocumentError(m.to_owned());
        let attrs = doc
            .get("attributes")
            .ok_or_else(|| bad("no `attributes`"))?;
        let http_req = attrs
            .pointer("/request/http")
            .ok_or_else(|| bad("no `attributes.request.http`"))?;
        let text = |v: &Value, field: &str| -> Result<String, InputDocumentError> {
            match v.get(field) {
                None | Some(Value::Null) => Ok(String::new()),
                Some(Value::String(s)) => Ok(s.clone()),
                Some(_) => Err(bad(&format!("`{field}` is not a string"))),
            }
        };
        let method_text = text(http_req, "method")?;
        let method = http::Method::from_bytes(method_text.as_bytes())
            .map_err(|_| bad(&format!("method {method_text:?}")))?;
        let target = text(http_req, "path")?;
        if !target.starts_with('/') {
            return Err(bad("`attributes.request.http.path` must start with '/'"));
        }
        let mut headers = http::HeaderMap::new();
        let mut peer_cert_sha256 = None;
        if let Some(Value::Object(h)) = http_req.get("headers") {
            for (k, v) in h {
                let Some(v) = v.as_str() else {
                    return Err(bad(&format!("header {k:?} is not a string")));
                };
                if k.starts_with(':') {
                    continue;
                }
                if k == XFCC {
                    // The sidecar sets XFCC itself; only its Hash is a fact
                    // the document alone carries.
                    peer_cert_sha256 = xfcc_field(v, "Hash");
                    continue;
                }
                let name = http::HeaderName::from_bytes(k.as_bytes())
                    .map_err(|_| bad(&format!("header name {k:?}")))?;
                let value = http::HeaderValue::from_str(v)
                    .map_err(|_| bad(&format!("header {k:?}: value")))?;
                headers.append(name, value);
            }
        }
        let addr = |side: &str| -> Result<SocketAddr, InputDocumentError> {
            let sa = attrs.pointer(&format!("/{side}/address/socketAddress"));
            let ip: IpAddr = sa
                .and_then(|s| s.get("address"))
                .and_then(Value::as_str)
                .unwrap_or("127.0.0.1")
                .parse()
                .map_err(|_| bad(&format!("{side} address")))?;
            let port = sa
                .and_then(|s| s.get("portValue"))
                .and_then(Value::as_u64)
                .and_then(|p| u16::try_from(p).ok())
                .unwrap_or(0);
            Ok(SocketAddr::new(ip, port))
        };
        let principal = |side: &str| {
            attrs
                .pointer(&format!("/{side}/principal"))
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        let (peer, peer_dns) = match principal("source") {
            None => (None, Vec::new()),
            Some(p) if p.starts_with("spiffe://") => (
                Some(SpiffeId::parse(&p).map_err(|e| bad(&format!("source principal: {e}")))?),
                Vec::new(),
            ),
            Some(p) => (None, vec![p]),
        };
        let local = match principal("destination") {
            Some(p) => {
                Some(SpiffeId::parse(&p).map_err(|e| bad(&format!("destination principal: {e}")))?)
            }
            None => None,
        };
        Ok(OfflineRequest {
            peer_cert_sha256: peer_cert_sha256
                .or_else(|| (peer.is_some() || !peer_dns.is_empty()).then(|| "0".repeat(64))),
            peer,
            peer_dns,
            local,
            method,
            target,
            host: text(http_req, "host")?,
            headers,
            source: addr("source")?,
            destination: addr("destination")?,
        })
    }

    /// Takes `By` (this sidecar) and `Hash` from an `x-forwarded-client-cert`
    /// header given on the command line, as the facts the sidecar would
    /// have; the header itself is then rebuilt from them, as the sidecar
    /// rebuilds it.
    pub fn adopt_xfcc_header(&mut self) -> Result<(), InputDocumentError> {
        let Some(v) = self.headers.remove(XFCC) else {
            return Ok(());
        };
        let v = v
            .to_str()
            .map_err(|_| InputDocumentError("x-forwarded-client-cert is not text".into()))?;
        if let Some(by) = xfcc_field(v, "By") {
            self.local = Some(
                SpiffeId::parse(&by)
                    .map_err(|e| InputDocumentError(format!("XFCC By {by:?}: {e}")))?,
            );
        }
        if let Some(hash) = xfcc_field(v, "Hash") {
            self.peer_cert_sha256 = Some(hash);
        }
        if self.peer.is_none()
            && let Some(uri) = xfcc_field(v, "URI")
        {
            self.peer = Some(
                SpiffeId::parse(&uri)
                    .map_err(|e| InputDocumentError(format!("XFCC URI {uri:?}: {e}")))?,
            );
        }
        Ok(())
    }

    /// Normalizes the target and hands the borrowed views to `f`, exactly
    /// as the sidecar builds them; `Err` when normalization refuses the
    /// path (the status and reason, before any policy).
    pub fn with_info<T>(
        &self,
        authz: &Authorizer,
        f: impl FnOnce(&ConnectionInfo<'_>, &RequestInfo<'_>) -> T,
    ) -> Result<T, crate::PathError> {
        let n = crate::normalize_path(&self.target, authz.normalize_options())?;
        let conn = ConnectionInfo::new(
            self.peer.as_ref(),
            self.source.ip(),
            self.destination.port(),
        )
        .with_peer_dns(&self.peer_dns);
        let req = RequestInfo {
            method: &self.method,
            authority: &self.host,
            path: &n.path,
            raw_path_and_query: &self.target,
            query: n.query,
            headers: &self.headers,
            protocol: HttpProtocol::Http11,
            scheme: if conn.is_authenticated() {
                "https"
            } else {
                "http"
            },
            grpc_method: grpc_method_of(&n.path, &self.headers),
            source: self.source,
            destination: self.destination,
            local_identity: self.local.as_ref(),
            peer_cert_sha256: self.peer_cert_sha256.as_deref(),
        };
        Ok(f(&conn, &req))
    }
}

/// The first value of `key` in the first element of an XFCC header.
fn xfcc_field(header: &str, key: &str) -> Option<String> {
    let elements = parse_xfcc(header).ok()?;
    elements
        .first()?
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| v.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_policy_sees_the_sidecars_xfcc_from_a_cli_header() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/scenario1");
        let authz = Authorizer::load(
            &[dir.join("ec-backend.rego.yaml")],
            &crate::Options::default(),
        )
        .unwrap();
        let mut headers = http::HeaderMap::new();
        headers.insert(
            XFCC,
            http::HeaderValue::from_static(
                "By=spiffe://example.org/ec-backend;Hash=ab;URI=spiffe://example.org/ec-web",
            ),
        );
        let mut r = OfflineRequest {
            peer: None,
            peer_dns: Vec::new(),
            peer_cert_sha256: None,
            local: None,
            method: http::Method::GET,
            target: "/data".into(),
            host: "ec-backend".into(),
            headers,
            source: "10.0.0.1:4000".parse().unwrap(),
            destination: "10.0.0.2:8080".parse().unwrap(),
        };
        r.adopt_xfcc_header().unwrap();
        assert_eq!(
            r.local.as_ref().map(SpiffeId::as_str),
            Some("spiffe://example.org/ec-backend")
        );
        assert_eq!(
            r.peer.as_ref().map(SpiffeId::as_str),
            Some("spiffe://example.org/ec-web")
        );
        let e = r
            .with_info(&authz, |c, q| authz.explain(c, Some(q)))
            .unwrap();
        assert!(e.decision.is_allowed(), "{e}");
    }

    #[test]
    fn an_input_document_reads_back_into_the_same_input() {
        let authz = Authorizer::from_yaml(
            "p.yaml",
            "policies:\n  - name: p\n    kind: rego\n    rego: |\n      package envoy.authz\n      allow := true\n",
            std::path::Path::new("."),
            &crate::Options::default(),
        )
        .unwrap();
        let mut headers = http::HeaderMap::new();
        headers.insert("x-a", http::HeaderValue::from_static("1"));
        let original = OfflineRequest {
            peer: Some(SpiffeId::parse("spiffe://example.org/ec-web").unwrap()),
            peer_dns: Vec::new(),
            peer_cert_sha256: Some("ab".repeat(32)),
            local: Some(SpiffeId::parse("spiffe://example.org/ec-backend").unwrap()),
            method: http::Method::POST,
            target: "/data?q=1".into(),
            host: "ec-backend".into(),
            headers,
            source: "10.0.0.1:4000".parse().unwrap(),
            destination: "10.0.0.2:8080".parse().unwrap(),
        };
        let doc = original.with_info(&authz, crate::input::build).unwrap();
        let back = OfflineRequest::from_input(&doc).unwrap();
        assert_eq!(back.with_info(&authz, crate::input::build).unwrap(), doc);
    }
}
