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

use std::collections::BTreeMap;
use std::sync::OnceLock;

use rampart_identity::SpiffeId;
use regorus::Value as RValue;
use serde_json::Value;

use crate::{ConnectionInfo, RequestInfo};

/// The XFCC header name.
pub const XFCC: &str = "x-forwarded-client-cert";

/// Headers Rampart's sidecars add between themselves (the outbound sidecar
/// telling the inbound one what the app spoke): Envoy has no such header,
/// so the input document never shows it.
pub const INTERNAL_HEADERS: &[&str] = &["rampart-orig-proto"];

/// The XFCC element the inbound sidecar sets for an authenticated peer, in
/// Envoy's format and order with its default `set_current_client_cert_details`
/// (`SPECS.md` §5: `By` when this sidecar has a URI SAN, `Hash` always, then
/// `URI` for a peer with a URI SAN): `By=<own ID>;Hash=<cert sha256>;URI=<peer
/// ID>`. Envoy adds `DNS=` only when asked to (`dns: true`), so a DNS-only
/// peer gets `By` and `Hash` alone. `None` for an unauthenticated peer.
/// `local` is this sidecar's ID, `peer_cert_sha256` the hex digest of the
/// peer's leaf.
pub fn xfcc_element(
    conn: &ConnectionInfo<'_>,
    local: Option<&SpiffeId>,
    peer_cert_sha256: Option<&str>,
) -> Option<String> {
    if !conn.is_authenticated() {
        return None;
    }
    let mut parts = Vec::new();
    if let Some(by) = local {
        parts.push(format!("By={}", xfcc_value(by.as_str())));
    }
    if let Some(hash) = peer_cert_sha256 {
        parts.push(format!("Hash={}", xfcc_value(hash)));
    }
    if let Some(uri) = conn.peer {
        parts.push(format!("URI={}", xfcc_value(uri.as_str())));
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

/// Why OPA-Envoy cannot build the input document of a request; it answers
/// 400 Bad Request without evaluating the policy (`envoyauth/request.go`:
/// `url.PathUnescape` of the path, `url.ParseQuery` of the query).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    /// A `%` in the path not followed by two hex digits.
    #[error("invalid URL escape {0:?} in the path")]
    PathEscape(String),
    /// A `%` in the query not followed by two hex digits.
    #[error("invalid URL escape {0:?} in the query")]
    QueryEscape(String),
    /// A `;` in a query pair (Go 1.17 and later refuse it).
    #[error("invalid semicolon separator in query")]
    QuerySemicolon,
}

/// Builds the input document for one request, as JSON (decision logs,
/// external authorizers). The same document as [`build_rego`]; `null` for a
/// request OPA-Envoy refuses with 400 before any policy runs.
pub fn build(conn: &ConnectionInfo<'_>, req: &RequestInfo<'_>) -> Value {
    match build_rego(conn, req) {
        // Serializing a regorus value cannot fail: keys are strings.
        Ok(v) => serde_json::to_value(v).unwrap_or(Value::Null),
        Err(_) => Value::Null,
    }
}

/// Builds the input document for one request directly as a regorus value,
/// with no JSON in between: this is on the path of every Rego decision.
pub fn build_rego(conn: &ConnectionInfo<'_>, req: &RequestInfo<'_>) -> Result<RValue, InputError> {
    let k = keys();
    let mut headers = BTreeMap::new();
    for name in req.headers.keys() {
        if name.as_str() == XFCC || INTERNAL_HEADERS.contains(&name.as_str()) {
            continue;
        }
        // "repeated headers merged" with ',' as Envoy does; non-UTF-8 bytes
        // are replaced rather than dropped so a policy still sees the header.
        let mut values = req.headers.get_all(name).iter();
        let joined: RValue = match (values.next(), values.next()) {
            (Some(v), None) => String::from_utf8_lossy(v.as_bytes()).as_ref().into(),
            _ => {
                let all: Vec<_> = req
                    .headers
                    .get_all(name)
                    .iter()
                    .map(|v| String::from_utf8_lossy(v.as_bytes()))
                    .collect();
                all.join(",").into()
            }
        };
        headers.insert(RValue::from(name.as_str()), joined);
    }
    if let Some(x) = xfcc_element(conn, req.local_identity, req.peer_cert_sha256) {
        headers.insert(k.xfcc.clone(), x.into());
    }
    if !req.authority.is_empty() {
        headers
            .entry(k.h_authority.clone())
            .or_insert_with(|| req.authority.into());
    }
    let method: RValue = req.method.as_str().into();
    let path: RValue = forwarded_path(req).into();
    headers.insert(k.h_method.clone(), method.clone());
    headers.insert(k.h_path.clone(), path.clone());
    let id = req
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");

    // OPA-Envoy: `strings.Split(strings.TrimLeft(url.PathUnescape(path), "/"), "/")`.
    let decoded = go_unescape(req.path, false).map_err(InputError::PathEscape)?;
    let parsed_path: Vec<RValue> = decoded
        .trim_start_matches('/')
        .split('/')
        .map(RValue::from)
        .collect();
    let parsed_query: BTreeMap<RValue, RValue> = go_parse_query(req.query.unwrap_or(""))?
        .into_iter()
        .map(|(name, vs)| {
            let vs: Vec<RValue> = vs.into_iter().map(RValue::from).collect();
            (RValue::from(name), RValue::from(vs))
        })
        .collect();

    let socket = |addr: &std::net::SocketAddr| {
        object([(
            &k.socket_address,
            object([
                (&k.address, RValue::from(addr.ip().to_string())),
                (&k.port_value, RValue::from(u64::from(addr.port()))),
            ]),
        )])
    };
    let principal = principal(conn).map(RValue::from);
    let mut source = BTreeMap::from([(k.address.clone(), socket(&req.source))]);
    if let Some(p) = &principal {
        source.insert(k.principal.clone(), p.clone());
    }
    let mut destination = BTreeMap::from([(k.address.clone(), socket(&req.destination))]);
    if let Some(own) = req.local_identity {
        destination.insert(k.principal.clone(), own.as_str().into());
    }
    let http = object([
        (&k.id, RValue::from(id)),
        (&k.method, method),
        (&k.headers, RValue::from(headers)),
        (&k.path, path),
        (&k.host, RValue::from(req.authority)),
        (&k.scheme, RValue::from(req.scheme)),
        (&k.protocol, RValue::from(req.protocol.as_str())),
        (&k.size, RValue::from(-1i64)),
    ]);
    let mut attributes = BTreeMap::from([
        (k.source.clone(), RValue::from(source)),
        (k.destination.clone(), RValue::from(destination)),
        (k.request.clone(), object([(&k.http, http)])),
    ]);
    if let Some(md) = jwt_metadata(conn) {
        attributes.insert("metadataContext".into(), md);
    }
    let attributes = RValue::from(attributes);
    let mut input = BTreeMap::from([
        (k.attributes.clone(), attributes),
        (k.parsed_path.clone(), RValue::from(parsed_path)),
        (k.parsed_query.clone(), RValue::from(parsed_query)),
        (k.parsed_body.clone(), RValue::Null),
        (k.truncated_body.clone(), RValue::from(false)),
        (k.version.clone(), k.version_value.clone()),
    ]);
    if let Some(p) = principal {
        input.insert(k.caller.clone(), p);
    }
    if let Some(m) = req.grpc_method {
        input.insert(k.full_method.clone(), m.into());
    }
    Ok(RValue::from(input))
}

/// Go's `url.PathUnescape` (`query: false`) or `url.QueryUnescape`
/// (`query: true`, where `+` is a space): every `%` must start two hex
/// digits. The error carries the bad escape.
fn go_unescape(s: &str, query: bool) -> Result<String, String> {
    if !(s.contains('%') || query && s.contains('+')) {
        return Ok(s.to_owned());
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (
                    b.get(i + 1).and_then(|&c| hex(c)),
                    b.get(i + 2).and_then(|&c| hex(c)),
                ) {
                    (Some(h), Some(l)) => {
                        // Two hex digits make a byte.
                        out.push((h * 16 + l) as u8);
                        i += 3;
                    }
                    _ => {
                        let end = (i + 3).min(b.len());
                        return Err(String::from_utf8_lossy(&b[i..end]).into_owned());
                    }
                }
            }
            b'+' if query => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Go's `url.ParseQuery`: pairs split on `&`, a pair with `;` refused,
/// empty pairs skipped, names and values query-unescaped. Like Go, it reads
/// every pair and reports the first error.
fn go_parse_query(q: &str) -> Result<BTreeMap<String, Vec<String>>, InputError> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut first_error = None;
    for pair in q.split('&') {
        if pair.contains(';') {
            first_error.get_or_insert(InputError::QuerySemicolon);
            continue;
        }
        if pair.is_empty() {
            continue;
        }
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match (go_unescape(name, true), go_unescape(value, true)) {
            (Ok(n), Ok(v)) => out.entry(n).or_default().push(v),
            (Err(e), _) | (_, Err(e)) => {
                first_error.get_or_insert(InputError::QueryEscape(e));
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// A verified JWT (RequestAuthentication) as Envoy's jwt_authn filter
/// leaves it for ext_authz and OPA: `metadataContext.filterMetadata
/// ["envoy.filters.http.jwt_authn"][<issuer>]` holds the claims (Istio sets
/// `payload_in_metadata` to the issuer).
fn jwt_metadata(conn: &ConnectionInfo<'_>) -> Option<RValue> {
    let claims = conn.jwt?;
    let iss = claims.get("iss")?.as_str()?;
    let value = RValue::from_json_str(&claims.to_string()).ok()?;
    let by_issuer = BTreeMap::from([(RValue::from(iss), value)]);
    let filters = BTreeMap::from([(
        RValue::from("envoy.filters.http.jwt_authn"),
        RValue::from(by_issuer),
    )]);
    Some(RValue::from(BTreeMap::from([(
        RValue::from("filterMetadata"),
        RValue::from(filters),
    )])))
}

/// An object from fixed keys.
fn object<const N: usize>(entries: [(&RValue, RValue); N]) -> RValue {
    RValue::from(
        entries
            .into_iter()
            .map(|(key, v)| (key.clone(), v))
            .collect::<BTreeMap<_, _>>(),
    )
}

/// The input's fixed keys, made once: a key costs a reference count, not
/// an allocation, per decision.
struct Keys {
    attributes: RValue,
    source: RValue,
    destination: RValue,
    address: RValue,
    socket_address: RValue,
    port_value: RValue,
    principal: RValue,
    request: RValue,
    http: RValue,
    id: RValue,
    method: RValue,
    headers: RValue,
    path: RValue,
    host: RValue,
    scheme: RValue,
    protocol: RValue,
    size: RValue,
    parsed_path: RValue,
    parsed_query: RValue,
    parsed_body: RValue,
    truncated_body: RValue,
    version: RValue,
    version_value: RValue,
    caller: RValue,
    full_method: RValue,
    xfcc: RValue,
    h_authority: RValue,
    h_method: RValue,
    h_path: RValue,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| Keys {
        attributes: "attributes".into(),
        source: "source".into(),
        destination: "destination".into(),
        address: "address".into(),
        socket_address: "socketAddress".into(),
        port_value: "portValue".into(),
        principal: "principal".into(),
        request: "request".into(),
        http: "http".into(),
        id: "id".into(),
        method: "method".into(),
        headers: "headers".into(),
        path: "path".into(),
        host: "host".into(),
        scheme: "scheme".into(),
        protocol: "protocol".into(),
        size: "size".into(),
        parsed_path: "parsed_path".into(),
        parsed_query: "parsed_query".into(),
        parsed_body: "parsed_body".into(),
        truncated_body: "truncated_body".into(),
        version: "version".into(),
        version_value: RValue::from(BTreeMap::from([
            (RValue::from("ext_authz"), RValue::from("v3")),
            (RValue::from("encoding"), RValue::from("protojson")),
        ])),
        caller: "caller".into(),
        full_method: "full_method".into(),
        xfcc: XFCC.into(),
        h_authority: ":authority".into(),
        h_method: ":method".into(),
        h_path: ":path".into(),
    })
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
    fn xfcc_of_a_dns_only_peer_has_by_and_hash_only() {
        let local = SpiffeId::parse("spiffe://example.org/app2").unwrap();
        let dns = vec!["ingress-nginx.ext.cluster.local".to_string()];
        let conn = ConnectionInfo::new(None, "10.0.0.1".parse().unwrap(), 8080).with_peer_dns(&dns);
        let x = xfcc_element(&conn, Some(&local), Some("ab12")).unwrap();
        // Envoy's default `set_current_client_cert_details` has no `dns`.
        assert_eq!(x, "By=spiffe://example.org/app2;Hash=ab12");
        assert_eq!(principal(&conn), Some("ingress-nginx.ext.cluster.local"));
        // Unauthenticated: no element at all.
        let plain = ConnectionInfo::new(None, "10.0.0.1".parse().unwrap(), 8080);
        assert_eq!(xfcc_element(&plain, Some(&local), Some("ab12")), None);
    }

    #[test]
    fn input_document_has_opa_envoy_shape() {
        let mut h = http::HeaderMap::new();
        h.append("x-a", http::HeaderValue::from_static("1"));
        h.append("x-a", http::HeaderValue::from_static("2"));
        h.insert("x-request-id", http::HeaderValue::from_static("rid"));
        h.insert(XFCC, http::HeaderValue::from_static("forged"));
        let local = SpiffeId::parse("spiffe://example.org/app2").unwrap();
        let peer = SpiffeId::parse("spiffe://example.org/app1").unwrap();
        let conn = ConnectionInfo::new(Some(&peer), "10.0.0.1".parse().unwrap(), 8080);
        let mut r = req(&h, &local);
        r.path = "/a/b%20c";
        r.query = Some("q=1&q=2&x");
        r.grpc_method = Some("/pkg.S/M");
        let doc = build(&conn, &r);
        let want = serde_json::json!({
            "attributes": {
                "source": {
                    "address": {"socketAddress": {"address": "10.0.0.1", "portValue": 4000}},
                    "principal": "spiffe://example.org/app1",
                },
                "destination": {
                    "address": {"socketAddress": {"address": "10.0.0.2", "portValue": 8080}},
                    "principal": "spiffe://example.org/app2",
                },
                "request": {"http": {
                    "id": "rid",
                    "method": "GET",
                    "headers": {
                        "x-a": "1,2",
                        "x-request-id": "rid",
                        XFCC: "By=spiffe://example.org/app2;Hash=ab12;URI=spiffe://example.org/app1",
                        ":authority": "app2",
                        ":method": "GET",
                        ":path": "/a/b%20c?q=1&q=2&x",
                    },
                    "path": "/a/b%20c?q=1&q=2&x",
                    "host": "app2",
                    "scheme": "https",
                    "protocol": "HTTP/1.1",
                    "size": -1,
                }},
            },
            "parsed_path": ["a", "b c"],
            "parsed_query": {"q": ["1", "2"], "x": [""]},
            "parsed_body": null,
            "truncated_body": false,
            "version": {"ext_authz": "v3", "encoding": "protojson"},
            "caller": "spiffe://example.org/app1",
            "full_method": "/pkg.S/M",
        });
        assert_eq!(doc, want);
    }

    #[test]
    fn xfcc_values_that_need_quoting_read_back_unchanged() {
        let values = ["a;URI=spiffe://example.org/admin", "b,\"c\\", "plain"];
        let x: Vec<String> = values
            .iter()
            .map(|v| format!("DNS={}", xfcc_value(v)))
            .collect();
        let x = x.join(";");
        let parsed = parse_xfcc(&x).unwrap();
        assert_eq!(parsed.len(), 1, "{x}");
        let read: Vec<&str> = parsed[0].iter().map(|(_, v)| v.as_str()).collect();
        assert_eq!(read, values);
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
