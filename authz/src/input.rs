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

use base64::Engine as _;
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

/// Envoy's `set_current_client_cert_details` (`inbound.set_current_client_cert_details`):
/// which fields of the peer certificate the XFCC element carries after
/// `By` and `Hash`, which it always has. The default is the seed's Envoy:
/// `uri` only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct XfccDetails {
    /// `Subject="<RFC 2253 subject>"` (present even when empty).
    pub subject: bool,
    /// `URI=<URI SAN>`, one per URI SAN; `URI=` for a peer with none.
    pub uri: bool,
    /// `DNS=<DNS SAN>`, one per DNS SAN.
    pub dns: bool,
    /// `Cert="<URL-encoded PEM of the leaf>"`.
    pub cert: bool,
    /// `Chain="<URL-encoded PEM of the chain, leaf first>"`.
    pub chain: bool,
}

impl Default for XfccDetails {
    fn default() -> Self {
        XfccDetails {
            subject: false,
            uri: true,
            dns: false,
            cert: false,
            chain: false,
        }
    }
}

/// The XFCC element the inbound sidecar sets for an authenticated peer,
/// with the default [`XfccDetails`]: `By=<own ID>;Hash=<cert sha256>;URI=<peer
/// ID>` (see [`xfcc_element_with`]). `None` for an unauthenticated peer.
pub fn xfcc_element(
    conn: &ConnectionInfo<'_>,
    local: Option<&SpiffeId>,
    peer_cert_sha256: Option<&str>,
) -> Option<String> {
    xfcc_element_with(
        conn,
        local,
        peer_cert_sha256,
        XfccDetails::default(),
        &[] as &[&[u8]],
    )
}

/// The XFCC element in Envoy's format and order
/// (`ConnectionManagerUtility::mutateXfccRequestHeader`, `SPECS.md` §5):
/// `By` when this sidecar has a SPIFFE ID, `Hash` always, then as
/// `details` asks `Cert`, `Chain`, `Subject`, `URI` (`URI=` when the peer
/// has no URI SAN, as Envoy writes it) and `DNS` (one per SAN). `Cert`,
/// `Chain` and `Subject` are always double-quoted, as Envoy writes them;
/// other values only when they hold `,` `;` `=` `"` or `\`. `chain` is the
/// peer's certificates in DER, leaf first (for `Cert`, `Chain`, `Subject`).
pub fn xfcc_element_with(
    conn: &ConnectionInfo<'_>,
    local: Option<&SpiffeId>,
    peer_cert_sha256: Option<&str>,
    details: XfccDetails,
    chain: &[impl AsRef<[u8]>],
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
    if details.cert
        && let Some(leaf) = chain.first()
    {
        parts.push(format!("Cert=\"{}\"", url_encoded_pem(&[leaf])));
    }
    if details.chain && !chain.is_empty() {
        parts.push(format!("Chain=\"{}\"", url_encoded_pem(chain)));
    }
    if details.subject {
        let subject = chain
            .first()
            .and_then(|leaf| subject_rfc2253(leaf.as_ref()))
            .unwrap_or_default();
        parts.push(format!("Subject=\"{subject}\""));
    }
    if details.uri {
        match conn.peer {
            Some(uri) => parts.push(format!("URI={}", xfcc_value(uri.as_str()))),
            None => parts.push("URI=".to_owned()),
        }
    }
    if details.dns {
        for dns in conn.peer_dns {
            parts.push(format!("DNS={}", xfcc_value(dns)));
        }
    }
    Some(parts.join(";"))
}

/// Certificates as Envoy's `urlEncodedPemEncodedPeerCertificate(Chain)`
/// writes them: PEM (64-column base64, `\n` line ends), then every byte
/// but `A-Z a-z 0-9 - . _ ~` percent-encoded. The value of XFCC `Cert` and
/// `Chain` and of the input's `attributes.source.certificate`.
pub fn url_encoded_pem(ders: &[impl AsRef<[u8]>]) -> String {
    let mut pem = String::new();
    for der in ders {
        pem.push_str("-----BEGIN CERTIFICATE-----\n");
        let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
        for line in b64.as_bytes().chunks(64) {
            // base64 is ASCII.
            pem.push_str(&String::from_utf8_lossy(line));
            pem.push('\n');
        }
        pem.push_str("-----END CERTIFICATE-----\n");
    }
    let mut out = String::with_capacity(pem.len() + pem.len() / 8);
    for b in pem.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A certificate's subject as Envoy prints it (OpenSSL's
/// `X509_NAME_print_ex` with `XN_FLAG_RFC2253`): attributes last to first,
/// `,` between RDNs and `+` inside one, short names (`CN`, `O`, ...) or the
/// dotted OID, and RFC 2253 escapes (`,+"\<>;`, a leading `#` or space, a
/// trailing space, control and non-ASCII bytes as `\XX`). `None` when the
/// certificate does not parse.
pub fn subject_rfc2253(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let mut attrs = Vec::new();
    for (i, rdn) in cert.subject().iter().enumerate() {
        for a in rdn.iter() {
            attrs.push((i, a));
        }
    }
    let mut out = String::new();
    let mut last_rdn = None;
    for (rdn, a) in attrs.into_iter().rev() {
        if let Some(prev) = last_rdn {
            out.push(if prev == rdn { '+' } else { ',' });
        }
        last_rdn = Some(rdn);
        let oid = a.attr_type().to_id_string();
        let short = match oid.as_str() {
            "2.5.4.3" => Some("CN"),
            "2.5.4.4" => Some("SN"),
            "2.5.4.5" => Some("serialNumber"),
            "2.5.4.6" => Some("C"),
            "2.5.4.7" => Some("L"),
            "2.5.4.8" => Some("ST"),
            "2.5.4.9" => Some("street"),
            "2.5.4.10" => Some("O"),
            "2.5.4.11" => Some("OU"),
            "2.5.4.12" => Some("title"),
            "2.5.4.42" => Some("GN"),
            "0.9.2342.19200300.100.1.1" => Some("UID"),
            "0.9.2342.19200300.100.1.25" => Some("DC"),
            "1.2.840.113549.1.9.1" => Some("emailAddress"),
            _ => None,
        };
        match (short, a.as_str()) {
            (Some(name), Ok(v)) => {
                out.push_str(name);
                out.push('=');
                rfc2253_escape(v, &mut out);
            }
            // Unknown attributes and values that are not strings: the
            // DER of the value in hex, after `#`.
            (name, _) => {
                out.push_str(name.unwrap_or(&oid));
                out.push_str("=#");
                use x509_parser::asn1_rs::ToDer as _;
                for b in a.attr_value().to_der_vec().ok()? {
                    out.push_str(&format!("{b:02X}"));
                }
            }
        }
    }
    Some(out)
}

fn rfc2253_escape(v: &str, out: &mut String) {
    let bytes = v.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        let edge = (i == 0 && (b == b'#' || b == b' ')) || (i + 1 == bytes.len() && b == b' ');
        if edge || b",+\"\\<>;".contains(&b) {
            out.push('\\');
            out.push(char::from(b));
        } else if !(0x20..0x7f).contains(&b) {
            out.push_str(&format!("\\{b:02X}"));
        } else {
            out.push(char::from(b));
        }
    }
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
    /// A body whose content type OPA-Envoy parses did not parse (JSON,
    /// form, multipart), or a `content-length` that is not a number.
    #[error("request body: {0}")]
    Body(String),
}

/// The header Envoy's ext_authz adds to the check request when it read the
/// body: `true` when the body is longer than what the policy sees.
pub const PARTIAL_BODY_HEADER: &str = "x-envoy-auth-partial-body";

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
    match conn.xfcc {
        Some(x) => {
            headers.insert(k.xfcc.clone(), x.into());
        }
        None => {
            if let Some(x) = xfcc_element(conn, req.local_identity, req.peer_cert_sha256) {
                headers.insert(k.xfcc.clone(), x.into());
            }
        }
    }
    if let Some(b) = &conn.request_body {
        let partial = if b.partial { "true" } else { "false" };
        headers.insert(k.partial_body.clone(), partial.into());
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
    if let Some(pem) = conn.peer_certificate.filter(|c| !c.is_empty()) {
        source.insert(k.certificate.clone(), pem.into());
    }
    let (parsed_body, truncated_body) = match &conn.request_body {
        Some(b) => parse_body(&headers, b.bytes)?,
        None => parse_body(&headers, &[])?,
    };
    let mut destination = BTreeMap::from([(k.address.clone(), socket(&req.destination))]);
    if let Some(own) = req.local_identity {
        destination.insert(k.principal.clone(), own.as_str().into());
    }
    let mut http = BTreeMap::from([
        (k.id.clone(), RValue::from(id)),
        (k.method.clone(), method),
        (k.headers.clone(), RValue::from(headers)),
        (k.path.clone(), path),
        (k.host.clone(), RValue::from(req.authority)),
        (k.scheme.clone(), RValue::from(req.scheme)),
        (k.protocol.clone(), RValue::from(req.protocol.as_str())),
        (k.size.clone(), RValue::from(-1i64)),
    ]);
    // protojson leaves out empty fields: no body, no `body` key.
    if let Some(b) = conn.request_body.filter(|b| !b.bytes.is_empty()) {
        if b.pack_as_bytes {
            let raw = base64::engine::general_purpose::STANDARD.encode(b.bytes);
            http.insert(k.raw_body.clone(), raw.into());
        } else {
            http.insert(
                k.body.clone(),
                String::from_utf8_lossy(b.bytes).as_ref().into(),
            );
        }
    }
    let http = RValue::from(http);
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
        (k.parsed_body.clone(), parsed_body),
        (k.truncated_body.clone(), RValue::from(truncated_body)),
        (k.version.clone(), k.version_value.clone()),
    ]);
    if let Some(p) = principal {
        // The plugin's shortcut to `attributes.source.principal`.
        input.insert(k.source_principal.clone(), p.clone());
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

/// `input.parsed_body` and `input.truncated_body` as OPA-Envoy computes
/// them (`envoyauth/request.go`, `getParsedBody`) from the input's headers
/// and the body: nothing when Envoy marked the body partial (truncated);
/// then by `content-type`, tested in the plugin's order with its
/// substring match: JSON (the whole body one JSON value), gRPC (null:
/// Rampart has no descriptor set, as the plugin without one), URL-encoded
/// forms (Go's `url.ParseQuery`) and `multipart/form-data`. For the text
/// forms a `content-length` above the body's length means truncated. A
/// body that does not parse is OPA-Envoy's 400.
fn parse_body(
    headers: &BTreeMap<RValue, RValue>,
    body: &[u8],
) -> Result<(RValue, bool), InputError> {
    let k = keys();
    let header = |name: &RValue| headers.get(name).and_then(|v| v.as_string().ok().cloned());
    if header(&k.partial_body).as_deref() == Some("true") {
        return Ok((RValue::Null, true));
    }
    // Every content type gives null and not truncated without a body: the
    // common case looks up nothing more.
    if body.is_empty() {
        return Ok((RValue::Null, false));
    }
    let Some(ct) = header(&k.content_type) else {
        return Ok((RValue::Null, false));
    };
    enum Kind {
        Json,
        Form,
        Multipart,
    }
    let kind = if ct.contains("application/json") {
        Kind::Json
    } else if ct.contains("application/grpc") {
        return Ok((RValue::Null, false));
    } else if ct.contains("application/x-www-form-urlencoded") {
        Kind::Form
    } else if ct.contains("multipart/form-data") {
        Kind::Multipart
    } else {
        return Ok((RValue::Null, false));
    };
    if let Some(cl) = header(&k.content_length) {
        let cl: i64 = cl
            .parse()
            .map_err(|_| InputError::Body(format!("content-length {cl:?} is not a number")))?;
        let len = i64::try_from(body.len()).unwrap_or(i64::MAX);
        if cl != -1 && cl > len {
            return Ok((RValue::Null, true));
        }
    }
    let text = String::from_utf8_lossy(body);
    let parsed = match kind {
        Kind::Json => json_value(text.as_bytes())?,
        Kind::Form => {
            let form = go_parse_query(&text).map_err(|e| InputError::Body(e.to_string()))?;
            RValue::from(
                form.into_iter()
                    .map(|(name, vs)| {
                        let vs: Vec<RValue> = vs.into_iter().map(RValue::from).collect();
                        (RValue::from(name), RValue::from(vs))
                    })
                    .collect::<BTreeMap<_, _>>(),
            )
        }
        Kind::Multipart => match multipart_boundary(&ct)? {
            None => return Ok((RValue::Null, false)),
            Some(boundary) => multipart_form(body, &boundary)?,
        },
    };
    Ok((parsed, false))
}

/// One JSON document (OPA's `util.UnmarshalJSON`: exactly one value,
/// whitespace around it).
fn json_value(bytes: &[u8]) -> Result<RValue, InputError> {
    let text = std::str::from_utf8(bytes).map_err(|e| InputError::Body(e.to_string()))?;
    RValue::from_json_str(text).map_err(|e| InputError::Body(e.to_string()))
}

/// The `boundary` parameter of a `multipart/form-data` content type
/// (Go's `mime.ParseMediaType`, for the parameters a form can carry): `None`
/// without one; a malformed parameter list is an error.
fn multipart_boundary(ct: &str) -> Result<Option<String>, InputError> {
    let bad = || InputError::Body(format!("content-type {ct:?}: malformed parameters"));
    let mut params = ct.split(';');
    let media = params.next().unwrap_or("").trim();
    if media.is_empty() {
        return Err(InputError::Body("content-type: no media type".into()));
    }
    let mut boundary = None;
    for p in params {
        let p = p.trim();
        if p.is_empty() {
            continue;
        }
        let (name, value) = p.split_once('=').ok_or_else(bad)?;
        let name = name.trim().to_ascii_lowercase();
        let value = value.trim();
        let value = match value.strip_prefix('"') {
            Some(rest) => rest
                .strip_suffix('"')
                .ok_or_else(bad)?
                .replace("\\\"", "\""),
            None => value.to_owned(),
        };
        if name == "boundary" {
            boundary = Some(value);
        }
    }
    Ok(boundary.filter(|b| !b.is_empty()))
}

/// The parts of a `multipart/form-data` body by form name, as OPA-Envoy
/// collects them: each part with a `name` in its `Content-Disposition`,
/// its value JSON when the part says `application/json`, else its text;
/// repeated names keep every value, in order.
fn multipart_form(body: &[u8], boundary: &str) -> Result<RValue, InputError> {
    let bad = |m: &str| InputError::Body(format!("multipart: {m}"));
    let text = String::from_utf8_lossy(body);
    let delimiter = format!("--{boundary}");
    let mut values: BTreeMap<RValue, Vec<RValue>> = BTreeMap::new();
    // Everything before the first delimiter is a preamble.
    let mut rest = match text.find(&delimiter) {
        Some(i) => &text[i + delimiter.len()..],
        None => return Err(bad("no opening boundary")),
    };
    loop {
        if rest.starts_with("--") {
            break; // the closing delimiter
        }
        // The delimiter line ends here (transport padding allowed).
        let line_end = rest
            .find('\n')
            .ok_or_else(|| bad("unterminated boundary line"))?;
        if !rest[..line_end].trim_end_matches('\r').trim().is_empty() {
            return Err(bad("text after a boundary"));
        }
        rest = &rest[line_end + 1..];
        let next = rest
            .find(&format!("\n{delimiter}"))
            .ok_or_else(|| bad("part without a closing boundary"))?;
        let part = rest[..next].strip_suffix('\r').unwrap_or(&rest[..next]);
        rest = &rest[next + 1 + delimiter.len()..];
        let (head, value) = match part.find("\r\n\r\n") {
            Some(i) => (&part[..i], &part[i + 4..]),
            None => match part.find("\n\n") {
                Some(i) => (&part[..i], &part[i + 2..]),
                None if part.trim().is_empty() => ("", ""),
                None => return Err(bad("part headers do not end")),
            },
        };
        let mut name = None;
        let mut json = false;
        for line in head.lines() {
            let Some((field, v)) = line.split_once(':') else {
                return Err(bad("malformed part header"));
            };
            match field.trim().to_ascii_lowercase().as_str() {
                "content-disposition" => name = disposition_name(v),
                "content-type" => json = v.contains("application/json"),
                _ => {}
            }
        }
        let Some(name) = name.filter(|n| !n.is_empty()) else {
            continue;
        };
        let v = if json {
            json_value(value.as_bytes())?
        } else {
            RValue::from(value)
        };
        values.entry(RValue::from(name)).or_default().push(v);
    }
    Ok(RValue::from(
        values
            .into_iter()
            .map(|(k, vs)| (k, RValue::from(vs)))
            .collect::<BTreeMap<_, _>>(),
    ))
}

/// The `name` of a `form-data` content disposition (Go's `FormName`).
fn disposition_name(v: &str) -> Option<String> {
    let mut params = v.split(';');
    if !params.next()?.trim().eq_ignore_ascii_case("form-data") {
        return None;
    }
    params.find_map(|p| {
        let (k, v) = p.trim().split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("name")
            .then(|| v.trim().trim_matches('"').to_owned())
    })
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
    partial_body: RValue,
    content_type: RValue,
    content_length: RValue,
    source_principal: RValue,
    certificate: RValue,
    body: RValue,
    raw_body: RValue,
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
        partial_body: PARTIAL_BODY_HEADER.into(),
        content_type: "content-type".into(),
        content_length: "content-length".into(),
        source_principal: "source_principal".into(),
        certificate: "certificate".into(),
        body: "body".into(),
        raw_body: "rawBody".into(),
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
    fn xfcc_of_a_dns_only_peer_has_an_empty_uri() {
        let local = SpiffeId::parse("spiffe://example.org/app2").unwrap();
        let dns = vec!["ingress-nginx.ext.cluster.local".to_string()];
        let conn = ConnectionInfo::new(None, "10.0.0.1".parse().unwrap(), 8080).with_peer_dns(&dns);
        let x = xfcc_element(&conn, Some(&local), Some("ab12")).unwrap();
        // Envoy with `uri: true` writes `URI=` when the peer has no URI
        // SAN, and `DNS` only with `dns: true`.
        assert_eq!(x, "By=spiffe://example.org/app2;Hash=ab12;URI=");
        assert_eq!(principal(&conn), Some("ingress-nginx.ext.cluster.local"));
        let none = XfccDetails {
            uri: false,
            ..XfccDetails::default()
        };
        let x = xfcc_element_with(&conn, Some(&local), Some("ab12"), none, &[] as &[&[u8]]);
        assert_eq!(x.as_deref(), Some("By=spiffe://example.org/app2;Hash=ab12"));
        // Unauthenticated: no element at all.
        let plain = ConnectionInfo::new(None, "10.0.0.1".parse().unwrap(), 8080);
        assert_eq!(xfcc_element(&plain, Some(&local), Some("ab12")), None);
    }

    #[test]
    fn xfcc_fields_come_in_envoys_order_and_quoting() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(vec!["a.example.org".into(), "b.example.org".into()])
                .unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Acme, Inc.");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "app1");
        params.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://example.org/app1".try_into().unwrap(),
        ));
        let cert = params.self_signed(&key).unwrap();
        let der = cert.der().to_vec();
        let local = SpiffeId::parse("spiffe://example.org/app2").unwrap();
        let peer = SpiffeId::parse("spiffe://example.org/app1").unwrap();
        let dns = vec!["a.example.org".to_string(), "b.example.org".to_string()];
        let conn =
            ConnectionInfo::new(Some(&peer), "10.0.0.1".parse().unwrap(), 8080).with_peer_dns(&dns);
        let all = XfccDetails {
            subject: true,
            uri: true,
            dns: true,
            cert: true,
            chain: true,
        };
        let x = xfcc_element_with(&conn, Some(&local), Some("ab12"), all, &[&der]).unwrap();
        let pem = url_encoded_pem(&[&der]);
        assert!(pem.starts_with("-----BEGIN%20CERTIFICATE-----%0A"), "{pem}");
        assert!(pem.ends_with("-----END%20CERTIFICATE-----%0A"), "{pem}");
        assert!(!pem.contains(['+', '/', '=', ' ', '\n']), "{pem}");
        assert_eq!(
            x,
            format!(
                "By=spiffe://example.org/app2;Hash=ab12;Cert=\"{pem}\";Chain=\"{pem}\";\
                 Subject=\"CN=app1,O=Acme\\, Inc.\";URI=spiffe://example.org/app1;\
                 DNS=a.example.org;DNS=b.example.org"
            )
        );
        // The PEM decodes back to the certificate.
        let decoded: String = {
            let mut out = Vec::new();
            let b = pem.as_bytes();
            let mut i = 0;
            while i < b.len() {
                if b[i] == b'%' {
                    let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap();
                    out.push(u8::from_str_radix(hex, 16).unwrap());
                    i += 3;
                } else {
                    out.push(b[i]);
                    i += 1;
                }
            }
            String::from_utf8(out).unwrap()
        };
        let body: String = decoded
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        let back = base64::engine::general_purpose::STANDARD
            .decode(body)
            .unwrap();
        assert_eq!(back, der);
    }

    fn body_input(
        content_type: Option<&str>,
        content_length: Option<&str>,
        body: &[u8],
        partial: bool,
        pack_as_bytes: bool,
    ) -> Result<RValue, InputError> {
        let mut h = http::HeaderMap::new();
        if let Some(ct) = content_type {
            h.insert("content-type", http::HeaderValue::from_str(ct).unwrap());
        }
        if let Some(cl) = content_length {
            h.insert("content-length", http::HeaderValue::from_str(cl).unwrap());
        }
        let local = SpiffeId::parse("spiffe://example.org/app2").unwrap();
        let conn = ConnectionInfo::new(None, "10.0.0.1".parse().unwrap(), 8080).with_request_body(
            Some(crate::BufferedBody {
                bytes: body,
                partial,
                pack_as_bytes,
            }),
        );
        build_rego(&conn, &req(&h, &local))
    }

    fn json_of(v: &RValue) -> Value {
        serde_json::to_value(v).unwrap()
    }

    #[test]
    fn bodies_are_parsed_as_opa_envoy_parses_them() {
        let json = |ct, cl, body: &str| {
            json_of(&body_input(ct, cl, body.as_bytes(), false, false).unwrap())
        };
        let doc = json(
            Some("application/json; charset=utf-8"),
            Some("13"),
            r#"{"a":[1,"x"]}"#,
        );
        assert_eq!(doc["parsed_body"], serde_json::json!({"a": [1, "x"]}));
        assert_eq!(doc["truncated_body"], false);
        assert_eq!(
            doc["attributes"]["request"]["http"]["body"],
            r#"{"a":[1,"x"]}"#
        );
        assert_eq!(
            doc["attributes"]["request"]["http"]["headers"][PARTIAL_BODY_HEADER],
            "false"
        );
        // A content-length above the body: truncated, not parsed.
        let doc = json(Some("application/json"), Some("99"), r#"{"a":1}"#);
        assert_eq!(doc["parsed_body"], Value::Null);
        assert_eq!(doc["truncated_body"], true);
        // Forms, repeated keys in order.
        let doc = json(
            Some("application/x-www-form-urlencoded"),
            None,
            "a=1&b=x+y&a=%32",
        );
        assert_eq!(
            doc["parsed_body"],
            serde_json::json!({"a": ["1", "2"], "b": ["x y"]})
        );
        // Multipart: text and JSON parts by form name.
        let mp = "--XyZ\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\none\r\n\
                  --XyZ\r\nContent-Disposition: form-data; name=\"j\"\r\nContent-Type: application/json\r\n\r\n{\"k\":true}\r\n\
                  --XyZ\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\ntwo\r\n--XyZ--\r\n";
        let doc = json(Some("multipart/form-data; boundary=XyZ"), None, mp);
        assert_eq!(
            doc["parsed_body"],
            serde_json::json!({"a": ["one", "two"], "j": [{"k": true}]})
        );
        // No parsing for other types, gRPC (no descriptor set) or no type.
        for ct in [Some("text/plain"), Some("application/grpc"), None] {
            let doc = json(ct, None, r#"{"a":1}"#);
            assert_eq!(doc["parsed_body"], Value::Null, "{ct:?}");
            assert_eq!(doc["truncated_body"], false, "{ct:?}");
        }
        // Bytes: `rawBody` in base64, parsed the same.
        let doc =
            json_of(&body_input(Some("application/json"), None, b"[1]", false, true).unwrap());
        assert_eq!(doc["attributes"]["request"]["http"]["rawBody"], "WzFd");
        assert!(doc["attributes"]["request"]["http"].get("body").is_none());
        assert_eq!(doc["parsed_body"], serde_json::json!([1]));
        // A partial body: truncated, whatever it holds.
        let doc =
            json_of(&body_input(Some("application/json"), None, b"[1]", true, false).unwrap());
        assert_eq!(doc["truncated_body"], true);
        assert_eq!(doc["parsed_body"], Value::Null);
        // What does not parse is OPA-Envoy's 400.
        for (ct, body) in [
            ("application/json", "{"),
            ("application/json", "1 2"),
            ("application/x-www-form-urlencoded", "a=%zz"),
            ("application/x-www-form-urlencoded", "a=1;b=2"),
        ] {
            let r = body_input(Some(ct), None, body.as_bytes(), false, false);
            assert!(
                matches!(r, Err(InputError::Body(_))),
                "{ct} {body:?}: {r:?}"
            );
        }
        assert!(matches!(
            body_input(Some("application/json"), Some("x"), b"1", false, false),
            Err(InputError::Body(_))
        ));
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
            "source_principal": "spiffe://example.org/app1",
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
