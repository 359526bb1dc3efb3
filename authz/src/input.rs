//! The Rego input document, shaped like the one OPA's Envoy plugin builds
//! (`SPECS.md` §6-7: `protojson` of Envoy's v3 `CheckRequest`, lowerCamelCase,
//! plus the plugin's snake_case `parsed_path`, `parsed_query`, `version`), so
//! existing OPA-for-Envoy policies run unmodified. Two Rampart extensions
//! serve SPIRE-style policies: `caller` (the peer principal) and
//! `full_method` (gRPC only).
//!
//! The `x-forwarded-client-cert` header in the input is the one the inbound
//! sidecar sends upstream (`SANITIZE_SET`, §5): whatever the client sent is
//! replaced, and it is absent for unauthenticated peers.

use serde_json::{Map, Value, json};

use crate::eval::decode_component;
use crate::{ConnectionInfo, RequestInfo};

/// The XFCC header name.
pub const XFCC: &str = "x-forwarded-client-cert";

/// The XFCC element the inbound sidecar sets for an authenticated peer, in
/// Envoy's format: `By=<own ID>;Hash=<cert sha256>;URI=<peer ID>` plus one
/// `DNS=<san>` per DNS SAN. `None` for an unauthenticated peer.
pub fn xfcc_element(conn: &ConnectionInfo<'_>, req: &RequestInfo<'_>) -> Option<String> {
    if !conn.is_authenticated() {
        return None;
    }
    let mut parts = Vec::new();
    if let Some(by) = req.local_identity {
        parts.push(format!("By={}", xfcc_value(by.as_str())));
    }
    if let Some(hash) = req.peer_cert_sha256 {
        parts.push(format!("Hash={}", xfcc_value(hash)));
    }
    if let Some(uri) = conn.peer {
        parts.push(format!("URI={}", xfcc_value(uri.as_str())));
    }
    for dns in conn.peer_dns {
        parts.push(format!("DNS={}", xfcc_value(dns)));
    }
    Some(parts.join(";"))
}

/// "Values containing `,` `;` `=` must be double-quoted; `"` inside escaped
/// as `\"`" (Envoy XFCC). A backslash inside a quoted value is escaped too,
/// so that [`parse_xfcc`] reads back exactly what was written. (Verified
/// SPIFFE IDs, host names and hashes never need quoting.)
fn xfcc_value(v: &str) -> String {
    if v.contains([',', ';', '=', '"', '\\']) {
        format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        v.to_owned()
    }
}

/// One XFCC element: its `key=value` pairs in order, values unquoted.
pub type XfccElement = Vec<(String, String)>;

/// Why an XFCC header could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XfccError {
    /// A pair has no `=`.
    #[error("XFCC pair {0:?} has no '='")]
    NoEquals(String),
    /// A quoted value is not closed.
    #[error("XFCC value has an unterminated quote")]
    UnterminatedQuote,
    /// Text follows a closing quote before the next `;` or `,`.
    #[error("XFCC value has text after its closing quote")]
    TextAfterQuote,
}

/// Reads an `x-forwarded-client-cert` header in Envoy's format: elements
/// separated by `,`, pairs by `;`, `key=value` with optionally quoted values
/// (`\"` and `\\` escaped inside quotes). The inverse of the element the
/// inbound sidecar sets, for apps and tests that read it.
pub fn parse_xfcc(header: &str) -> Result<Vec<XfccElement>, XfccError> {
    let mut elements = Vec::new();
    let mut element = Vec::new();
    let mut chars = header.chars().peekable();
    loop {
        // One pair: key up to '=', then a plain or quoted value.
        let mut key = String::new();
        loop {
            match chars.peek() {
                Some('=') => break,
                Some(',' | ';') | None => return Err(XfccError::NoEquals(key)),
                Some(&c) => {
                    key.push(c);
                    chars.next();
                }
            }
        }
        chars.next(); // the '='
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err(XfccError::UnterminatedQuote),
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => return Err(XfccError::UnterminatedQuote),
                    },
                    Some(c) => value.push(c),
                }
            }
            if !matches!(chars.peek(), Some(',' | ';') | None) {
                return Err(XfccError::TextAfterQuote);
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' || c == ';' {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        element.push((key.trim().to_owned(), value));
        match chars.next() {
            Some(';') => {}
            Some(',') => elements.push(std::mem::take(&mut element)),
            // Invariant: the value loops stop only at ',', ';' or the end.
            Some(_) | None => {
                elements.push(element);
                return Ok(elements);
            }
        }
    }
}

/// The peer principal as Envoy reports it: URI SAN, else the first DNS SAN.
pub fn principal<'a>(conn: &ConnectionInfo<'a>) -> Option<&'a str> {
    match conn.peer {
        Some(id) => Some(id.as_str()),
        None => conn.peer_dns.first().map(String::as_str),
    }
}

/// Builds the input document for one request.
pub fn build(conn: &ConnectionInfo<'_>, req: &RequestInfo<'_>) -> Value {
    let mut headers = Map::new();
    for name in req.headers.keys() {
        if name.as_str() == XFCC {
            continue;
        }
        // "repeated headers merged" with ',' as Envoy does; non-UTF-8 bytes
        // are replaced rather than dropped so a policy still sees the header.
        let joined = req
            .headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect::<Vec<_>>()
            .join(",");
        headers.insert(name.as_str().to_owned(), Value::String(joined));
    }
    if let Some(x) = xfcc_element(conn, req) {
        headers.insert(XFCC.to_owned(), Value::String(x));
    }
    if !req.authority.is_empty() {
        headers
            .entry(":authority")
            .or_insert_with(|| Value::String(req.authority.to_owned()));
    }
    headers.insert(
        ":method".into(),
        Value::String(req.method.as_str().to_owned()),
    );
    headers.insert(":path".into(), Value::String(forwarded_path(req)));
    let id = req
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");

    let parsed_path: Vec<Value> = req
        .path
        .split('/')
        .skip(1)
        .map(|s| Value::String(decode_path_segment(s)))
        .collect();
    let mut parsed_query = Map::new();
    for pair in req.query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let entry = parsed_query
            .entry(decode_component(k).into_owned())
            .or_insert_with(|| Value::Array(Vec::new()));
        if let Value::Array(a) = entry {
            a.push(Value::String(decode_component(v).into_owned()));
        }
    }

    let mut source = json!({
        "address": {"socketAddress": {
            "address": req.source.ip().to_string(),
            "portValue": req.source.port(),
        }},
    });
    if let Some(p) = principal(conn) {
        source["principal"] = Value::String(p.to_owned());
    }
    let mut destination = json!({
        "address": {"socketAddress": {
            "address": req.destination.ip().to_string(),
            "portValue": req.destination.port(),
        }},
    });
    if let Some(own) = req.local_identity {
        destination["principal"] = Value::String(own.as_str().to_owned());
    }

    let mut input = json!({
        "attributes": {
            "source": source,
            "destination": destination,
            "request": {"http": {
                "id": id,
                "method": req.method.as_str(),
                "headers": headers,
                "path": forwarded_path(req),
                "host": req.authority,
                "scheme": req.scheme,
                "protocol": req.protocol.as_str(),
                "size": -1,
            }},
        },
        "parsed_path": parsed_path,
        "parsed_query": parsed_query,
        "parsed_body": Value::Null,
        "truncated_body": false,
        "version": {"ext_authz": "v3", "encoding": "protojson"},
    });
    if let Some(p) = principal(conn) {
        input["caller"] = Value::String(p.to_owned());
    }
    if let Some(m) = req.grpc_method {
        input["full_method"] = Value::String(m.to_owned());
    }
    input
}

/// Percent-decodes one segment of the normalized path (OPA's `parsed_path`
/// comes "from the decoded URL path").
fn decode_path_segment(s: &str) -> String {
    if !s.contains('%') {
        return s.to_owned();
    }
    // A path segment has no '+' convention; protect it from form decoding.
    decode_component(&s.replace('+', "%2B")).into_owned()
}

/// The request target as forwarded: the normalized path and the query as
/// sent. Policies see what the application will see (Envoy with
/// `normalize_path`), never a raw form that could disagree with it.
fn forwarded_path(req: &RequestInfo<'_>) -> String {
    match req.query {
        Some(q) => format!("{}?{q}", req.path),
        None => req.path.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rampart_identity::SpiffeId;

    fn req<'a>(headers: &'a http::HeaderMap, local: &'a SpiffeId) -> RequestInfo<'a> {
        RequestInfo {
            method: &http::Method::GET,
            authority: "app2",
            path: "/",
            raw_path_and_query: "/",
            query: None,
            headers,
            protocol: crate::HttpProtocol::Http11,
            scheme: "https",
            grpc_method: None,
            source: "10.0.0.1:4000".parse().unwrap(),
            destination: "10.0.0.2:8080".parse().unwrap(),
            local_identity: Some(local),
            peer_cert_sha256: Some("ab12"),
        }
    }

    #[test]
    fn xfcc_of_a_dns_only_peer_has_dns_and_no_uri() {
        let h = http::HeaderMap::new();
        let local = SpiffeId::parse("spiffe://example.org/app2").unwrap();
        let dns = vec!["ingress-nginx.ext.cluster.local".to_string()];
        let conn = ConnectionInfo::new(None, "10.0.0.1".parse().unwrap(), 8080).with_peer_dns(&dns);
        let x = xfcc_element(&conn, &req(&h, &local)).unwrap();
        assert_eq!(
            x,
            "By=spiffe://example.org/app2;Hash=ab12;DNS=ingress-nginx.ext.cluster.local"
        );
        assert_eq!(principal(&conn), Some("ingress-nginx.ext.cluster.local"));
        // Unauthenticated: no element at all.
        let plain = ConnectionInfo::new(None, "10.0.0.1".parse().unwrap(), 8080);
        assert_eq!(xfcc_element(&plain, &req(&h, &local)), None);
    }

    #[test]
    fn xfcc_values_that_need_quoting_read_back_unchanged() {
        let h = http::HeaderMap::new();
        let local = SpiffeId::parse("spiffe://example.org/app2").unwrap();
        let dns = vec![
            "a;URI=spiffe://example.org/admin".to_string(),
            "b,\"c\\".to_string(),
        ];
        let conn = ConnectionInfo::new(None, "10.0.0.1".parse().unwrap(), 8080).with_peer_dns(&dns);
        let x = xfcc_element(&conn, &req(&h, &local)).unwrap();
        let parsed = parse_xfcc(&x).unwrap();
        assert_eq!(parsed.len(), 1, "{x}");
        let kv: Vec<(&str, &str)> = parsed[0]
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            kv,
            [
                ("By", "spiffe://example.org/app2"),
                ("Hash", "ab12"),
                ("DNS", "a;URI=spiffe://example.org/admin"),
                ("DNS", "b,\"c\\"),
            ]
        );
    }

    #[test]
    fn xfcc_parser_reads_envoy_headers_and_refuses_broken_ones() {
        let two = parse_xfcc(
            "By=spiffe://a/x;Hash=01;URI=spiffe://a/y,By=spiffe://a/z;Subject=\"CN=x,O=y\"",
        )
        .unwrap();
        assert_eq!(two.len(), 2);
        assert_eq!(two[1][1], ("Subject".into(), "CN=x,O=y".into()));
        assert_eq!(parse_xfcc("By"), Err(XfccError::NoEquals("By".into())));
        assert_eq!(parse_xfcc("By=\"x"), Err(XfccError::UnterminatedQuote));
        assert_eq!(parse_xfcc("By=\"x\"y"), Err(XfccError::TextAfterQuote));
        assert_eq!(parse_xfcc("By=x;"), Err(XfccError::NoEquals(String::new())));
    }
}
