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

/// Set by the outbound sidecar on requests that were HTTP/1.1 at the app,
/// so the inbound sidecar sends them to its app as HTTP/1.1 again.
pub const ORIG_PROTO: HeaderName = HeaderName::from_static("rampart-orig-proto");

/// Removes hop-by-hop fields (RFC 9110 §7.6.1): `Connection` and every
/// field it names, plus the fields that are hop-by-hop by definition. `TE`
/// survives only as `trailers`, which gRPC requires.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    if h.contains_key(header::CONNECTION) {
        // Rare on the hot path (HTTP/2 forbids it): allocation is fine here.
        let named: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
        for n in named {
            h.remove(n);
        }
        h.remove(header::CONNECTION);
    }
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
) -> Option<HeaderValue> {
    let peer = peer?;
    let info = crate::authz::connection_info(Some(peer), source, port);
    let element = rampart_authz::input::xfcc_element(&info, local_id, Some(&peer.cert_sha256))?;
    HeaderValue::try_from(element).ok()
}

/// Applies the XFCC mode to a request for the app.
pub fn set_xfcc(mode: XfccMode, ours: Option<&HeaderValue>, h: &mut HeaderMap) {
    match mode {
        XfccMode::SanitizeSet => {
            h.remove(XFCC);
            if let Some(v) = ours {
                h.insert(XFCC, v.clone());
            }
        }
        XfccMode::AppendForward => {
            if let Some(v) = ours {
                h.append(XFCC, v.clone());
            }
        }
        XfccMode::Sanitize => {
            h.remove(XFCC);
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
