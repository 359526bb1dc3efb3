//! Request and response heads between hops: hop-by-hop fields removed
//! (RFC 9110 §7.6.1), `x-forwarded-client-cert` set (SPECS §5), request IDs,
//! and the marker by which an outbound sidecar tells the inbound one what
//! the calling app spoke.

use http::HeaderMap;
use http::header::{self, HeaderName, HeaderValue};
use rampart_authz::Permit;
use rampart_authz::input::XFCC;
use rampart_identity::{PeerIdentity, SpiffeId};

use crate::config::XfccMode;

/// `x-forwarded-client-cert` as a `HeaderName` constant: inserting by
/// `&str` would copy the name into a new allocation per request.
const XFCC_NAME: HeaderName = HeaderName::from_static(XFCC);

/// Set by the outbound sidecar on requests that were HTTP/1.1 at the app,
/// so the inbound sidecar sends them to its app as HTTP/1.1 again.
pub const ORIG_PROTO: HeaderName = HeaderName::from_static("rampart-orig-proto");

/// Removes hop-by-hop fields (RFC 9110 §7.6.1): `Connection` and every
/// field it names, plus the fields that are hop-by-hop by definition. `TE`
/// survives only as `trailers`, which gRPC requires.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Allocation-free: each `Connection` value is cloned (a reference
    // count, not a copy) so that the fields it names can be removed while
    // it is read, and names are looked up as `&str` (no `HeaderName` made).
    let values = h.get_all(header::CONNECTION).iter().count();
    for i in 0..values {
        let Some(v) = h.get_all(header::CONNECTION).iter().nth(i).cloned() else {
            break;
        };
        for token in v.as_bytes().split(|b| *b == b',') {
            if let Ok(name) = std::str::from_utf8(token.trim_ascii())
                && !name.is_empty()
                && !name.eq_ignore_ascii_case("connection")
            {
                h.remove(name);
            }
        }
    }
    h.remove(header::CONNECTION);
    for name in [
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
    ] {
        h.remove(name);
    }
    h.remove("keep-alive");
    h.remove("proxy-connection");
    if h.get(header::TE)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        h.remove(header::TE);
    }
}

/// Removes the fields a request's `Connection` names (RFC 9110 §7.6.1)
/// before the sidecar adds its own, so that `Connection: close,
/// x-request-id` cannot strip a field the sidecar sets (request ID, trace
/// context, XFCC, a policy's headers) on its way to the app. The tokens
/// that ask for this hop (`close`, `keep-alive`, `upgrade`) stay, for the
/// connection and tunnel logic; the `Connection` field then names only
/// them, and [`strip_hop_by_hop`] removes it later. Allocation-free unless
/// `Connection` names some other field.
pub fn remove_connection_named(h: &mut HeaderMap) {
    let own = |t: &[u8]| {
        t.is_empty()
            || t.eq_ignore_ascii_case(b"close")
            || t.eq_ignore_ascii_case(b"keep-alive")
            || t.eq_ignore_ascii_case(b"upgrade")
    };
    let names_others = h.get_all(header::CONNECTION).iter().any(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|t| !own(t.trim_ascii()))
    });
    if !names_others {
        return;
    }
    // Rare: a client naming its own hop-by-hop fields.
    let values: Vec<HeaderValue> = h.get_all(header::CONNECTION).iter().cloned().collect();
    let mut kept = Vec::new();
    for v in &values {
        for t in v.as_bytes().split(|b| *b == b',').map(<[u8]>::trim_ascii) {
            if own(t) {
                if !t.is_empty() {
                    kept.push(t);
                }
            } else if let Ok(name) = HeaderName::from_bytes(t) {
                h.remove(name);
            }
        }
    }
    h.remove(header::CONNECTION);
    if let Ok(v) = HeaderValue::from_bytes(&kept.join(&b", "[..]))
        && !v.is_empty()
    {
        h.insert(header::CONNECTION, v);
    }
}

/// Whether `name` is `x-forwarded-client-cert` in any spelling that some
/// server reads as it: header names are lower case already, and CGI, WSGI
/// and many frameworks map `_` onto `-` (`HTTP_X_FORWARDED_CLIENT_CERT`).
/// Compares bytes in place: no allocation.
pub fn is_identity_header(name: &HeaderName) -> bool {
    let n = name.as_str().as_bytes();
    n.len() == XFCC.len()
        && n.iter()
            .zip(XFCC.as_bytes())
            .all(|(a, b)| a == b || (*a == b'_' && *b == b'-'))
}

/// Removes every spelling of the identity header ([`is_identity_header`])
/// but the canonical one, and that one too unless `keep_canonical`. The
/// common case (no odd spelling) is one pass over the names.
pub fn remove_identity_headers(h: &mut HeaderMap, keep_canonical: bool) {
    if !keep_canonical {
        h.remove(XFCC);
    }
    // Rare: a client's `x_forwarded_client_cert`, removed one name at a time.
    while let Some(name) = h
        .keys()
        .find(|k| k.as_str() != XFCC && is_identity_header(k))
        .cloned()
    {
        h.remove(name);
    }
}

/// A fresh request ID: 128 bits as 32 hex digits. Unique per process run
/// (a random key hashes a counter); a correlation handle, not a secret.
pub fn request_id() -> HeaderValue {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static KEYS: OnceLock<(
        std::collections::hash_map::RandomState,
        std::collections::hash_map::RandomState,
    )> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let (a, b) = KEYS.get_or_init(|| (Default::default(), Default::default()));
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut ha = a.build_hasher();
    ha.write_u64(n);
    let mut hb = b.build_hasher();
    hb.write_u64(n);
    let s = format!("{:016x}{:016x}", ha.finish(), hb.finish());
    // Invariant: hex digits are valid header bytes.
    HeaderValue::from_str(&s).expect("hex is a valid header value")
}

/// Our XFCC element for an authenticated peer, computed once per connection
/// with authz's own formatter, so the header the app sees is the one Rego
/// policies see.
pub fn xfcc_value(
    peer: Option<&PeerIdentity>,
    source: std::net::IpAddr,
    port: u16,
    local_id: Option<&SpiffeId>,
    details: rampart_authz::input::XfccDetails,
) -> Option<HeaderValue> {
    let peer = peer?;
    let info = crate::authz::connection_info(Some(peer), source, port);
    let element = rampart_authz::input::xfcc_element_with(
        &info,
        local_id,
        Some(&peer.cert_sha256),
        details,
        &peer.chain[..],
    )?;
    HeaderValue::try_from(element).ok()
}

/// Applies the XFCC mode to a request for the app. Every other spelling
/// of the header is removed whatever the mode ([`is_identity_header`]).
pub fn set_xfcc(mode: XfccMode, ours: Option<&HeaderValue>, h: &mut HeaderMap) {
    match mode {
        XfccMode::SanitizeSet => {
            remove_identity_headers(h, false);
            if let Some(v) = ours {
                h.insert(XFCC_NAME, v.clone());
            }
        }
        // The client's chain is kept under its canonical name only: no
        // other spelling is ever one the sidecar vouches for.
        XfccMode::AppendForward => {
            remove_identity_headers(h, true);
            if let Some(v) = ours {
                h.append(XFCC_NAME, v.clone());
            }
        }
        XfccMode::Sanitize => {
            remove_identity_headers(h, false);
        }
    }
}

/// The permit's request header effects (Rego results, ext_authz answers).
pub fn apply_request_effects(permit: &Permit, h: &mut HeaderMap) {
    if let Some(effects) = permit.effects() {
        for name in &effects.request_headers_to_remove {
            h.remove(name);
        }
        for (name, value) in &effects.headers {
            h.insert(name.clone(), value.clone());
        }
        for (name, value) in &effects.request_headers_to_append {
            h.append(name.clone(), value.clone());
        }
    }
}

/// The permit's response header effects.
pub fn apply_response_effects(permit: &Permit, h: &mut HeaderMap) {
    if let Some(effects) = permit.effects() {
        for (name, value) in &effects.response_headers_to_add {
            h.append(name.clone(), value.clone());
        }
    }
}

/// Marks an HTTP/1 response `Connection: close` once the sidecar drains,
/// so that the client retires its keep-alive connection after it rather
/// than send its next request on a connection about to close. Responses
/// that turn the connection into a tunnel (101, a CONNECT's 2xx) are left
/// as they are.
pub(crate) fn close_when_draining<B>(resp: &mut http::Response<B>, draining: bool, connect: bool) {
    if draining && !connect && resp.status() != http::StatusCode::SWITCHING_PROTOCOLS {
        resp.headers_mut()
            .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_fields_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["te", "x-kept"]);
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h);
        assert!(!h.contains_key(header::TE));
    }

    #[test]
    fn connection_cannot_name_what_the_sidecar_sets() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-request-id, X-Other"),
        );
        h.insert("x-request-id", HeaderValue::from_static("theirs"));
        h.insert("x-other", HeaderValue::from_static("1"));
        remove_connection_named(&mut h);
        assert_eq!(h[header::CONNECTION], "close");
        assert!(!h.contains_key("x-request-id") && !h.contains_key("x-other"));
        // What the sidecar sets afterwards survives the hop-by-hop strip.
        h.insert("x-request-id", HeaderValue::from_static("ours"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h["x-request-id"], "ours");
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        remove_connection_named(&mut h);
        assert_eq!(h[header::CONNECTION], "keep-alive");
    }

    #[test]
    fn identity_headers_in_any_spelling_are_removed() {
        for (name, is) in [
            ("x-forwarded-client-cert", true),
            ("x_forwarded_client_cert", true),
            ("x-forwarded_client-cert", true),
            ("x-forwarded-client-certs", false),
            ("x-forwarded-client", false),
            ("x.forwarded.client.cert", false),
        ] {
            assert_eq!(
                is_identity_header(&HeaderName::from_static(name)),
                is,
                "{name}"
            );
        }
        for mode in [
            XfccMode::SanitizeSet,
            XfccMode::Sanitize,
            XfccMode::AppendForward,
        ] {
            let mut h = HeaderMap::new();
            h.insert(
                "x_forwarded_client_cert",
                HeaderValue::from_static("forged"),
            );
            h.insert(
                "x-forwarded_client-cert",
                HeaderValue::from_static("forged"),
            );
            h.insert("x-kept", HeaderValue::from_static("1"));
            set_xfcc(mode, None, &mut h);
            let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
            assert_eq!(names, ["x-kept"], "{mode:?}");
        }
    }

    #[test]
    fn request_ids_are_distinct_hex() {
        let (a, b) = (request_id(), request_id());
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(a.as_bytes().iter().all(u8::is_ascii_hexdigit));
    }

    #[test]
    fn xfcc_modes() {
        let ours = HeaderValue::from_static("By=a;URI=b");
        let theirs = HeaderValue::from_static("By=x;URI=y");
        let cases = [
            (XfccMode::SanitizeSet, vec!["By=a;URI=b"]),
            (XfccMode::AppendForward, vec!["By=x;URI=y", "By=a;URI=b"]),
            (XfccMode::Sanitize, vec![]),
        ];
        for (mode, want) in cases {
            let mut h = HeaderMap::new();
            h.insert(XFCC, theirs.clone());
            set_xfcc(mode, Some(&ours), &mut h);
            let got: Vec<_> = h
                .get_all(XFCC)
                .iter()
                .map(|v| v.to_str().unwrap())
                .collect();
            assert_eq!(got, want, "{mode:?}");
        }
    }
}
