//! JWT request authentication, as Istio's RequestAuthentication configures
//! Envoy's `jwt_authn` filter: tokens are taken from the rules' locations
//! (default `Authorization: Bearer` and the `access_token` query
//! parameter), each token found must verify against the rule of its issuer
//! (signature by a JWKS key, `exp`/`nbf` with 60 s of clock skew, audience
//! when the rule lists some), and a request without a token passes
//! unauthenticated (policies then decide, as in Istio). A verified token
//! becomes `request.auth.principal` (`iss/sub`) and `request.auth.claims`.
//!
//! No I/O here: keys come from the resource (`jwks`), a file read at load,
//! or a [`JwksCache`] entry that the proxy's fetcher refreshes off the
//! request path (the last good key set is kept when a fetch fails).

use std::collections::BTreeMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;

use crate::jose::{self, Alg, Key, KeyError};

/// Envoy's default clock skew for `exp` and `nbf`.
pub const CLOCK_SKEW_SECONDS: u64 = 60;

/// A parsed JSON Web Key Set: the keys Rampart can verify with
/// ([`crate::jose`] parses them and checks the signatures), and the tokens
/// whose signatures they verified.
#[derive(Debug, Clone, Default)]
pub struct Jwks {
    keys: Vec<Key>,
    verified: Verified,
}

/// Tokens whose signature this key set verified, so that a client sending
/// the same token on every request pays the signature check once (as
/// Envoy's `jwt_cache_config`): a signature check is most of a JWT
/// decision (tens of microseconds for ES256 or RS256), while the claims
/// (`exp`, `nbf`, audience) are still checked on every request. Only
/// tokens that verified are kept, whole, and compared whole, so a client
/// cannot place an entry it did not get signed, and a hash collision only
/// costs a check. A refreshed key set is a new [`Jwks`], with an empty
/// cache. Direct-mapped and bounded: a new token takes its slot.
#[derive(Debug)]
struct Verified {
    slots: Mutex<Vec<Option<Box<str>>>>,
    hasher: std::hash::RandomState,
}

/// Slots of a key set's [`Verified`] tokens.
const VERIFIED_SLOTS: usize = 256;

impl Default for Verified {
    fn default() -> Self {
        Verified {
            slots: Mutex::new(Vec::new()),
            hasher: std::hash::RandomState::new(),
        }
    }
}

impl Clone for Verified {
    /// A copy of a key set starts with no verified token.
    fn clone(&self) -> Self {
        Verified::default()
    }
}

impl Verified {
    fn slot(&self, token: &str) -> usize {
        // Invariant: the modulus keeps the index in range on every target.
        (self.hasher.hash_one(token) % VERIFIED_SLOTS as u64) as usize
    }

    fn contains(&self, token: &str) -> bool {
        let slots = match self.slots.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        slots
            .get(self.slot(token))
            .is_some_and(|s| s.as_deref() == Some(token))
    }

    fn insert(&self, token: &str) {
        let i = self.slot(token);
        let mut slots = match self.slots.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        if slots.is_empty() {
            slots.resize(VERIFIED_SLOTS, None);
        }
        slots[i] = Some(token.into());
    }
}

impl Jwks {
    /// Parses a JWKS document. Keys Rampart cannot verify with (`oct`,
    /// P-521, other key types and curves) are skipped; a malformed key, or
    /// a set with no usable key, is an error.
    pub fn parse(json: &str) -> Result<Jwks, String> {
        let mut keys = Vec::new();
        for key in jose::jwk_set(json).map_err(|e| format!("JWKS: {e}"))? {
            match key {
                Ok(k) if k.kind.verifiable() => keys.push(k),
                Ok(_) | Err(KeyError::Unsupported(_)) => {}
                Err(e) => return Err(format!("JWKS: {e}")),
            }
        }
        if keys.is_empty() {
            return Err("JWKS has no RSA, EC (P-256, P-384) or Ed25519 key".into());
        }
        Ok(Jwks {
            keys,
            verified: Verified::default(),
        })
    }

    /// As Envoy's `jwt_verify_lib` picks keys: a key with a `kid` must
    /// match the token's (when it has one), a key with an `alg` must match
    /// the token's; any of the rest may verify.
    fn verify(&self, alg: &str, kid: Option<&str>, message: &[u8], signature: &[u8]) -> bool {
        let Some(a) = Alg::from_name(alg) else {
            return false;
        };
        self.keys
            .iter()
            .filter(|k| kid.is_none() || k.kid.is_empty() || Some(k.kid.as_str()) == kid)
            .filter(|k| k.alg.is_empty() || k.alg == alg)
            .any(|k| k.verify(a, message, signature))
    }
}

/// JWKS fetched from URLs, shared with the fetcher that refreshes them. A
/// failed refresh leaves the last good set in place.
#[derive(Debug, Default)]
pub struct JwksCache {
    sets: RwLock<BTreeMap<String, Arc<Jwks>>>,
}

impl JwksCache {
    /// Stores the key set fetched from `uri`.
    pub fn store(&self, uri: &str, jwks: Jwks) {
        let mut sets = match self.sets.write() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        sets.insert(uri.to_owned(), Arc::new(jwks));
    }

    /// The key set last fetched from `uri`, if any.
    pub fn get(&self, uri: &str) -> Option<Arc<Jwks>> {
        let sets = match self.sets.read() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        sets.get(uri).cloned()
    }
}

/// Where a rule's keys come from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// Inline `jwks`, or a `file://` URI read at load.
    Static(Arc<Jwks>),
    /// An `http://` URI, refreshed by the fetcher into the cache.
    Fetched {
        /// The URI.
        uri: String,
        /// The shared cache.
        cache: Arc<JwksCache>,
    },
}

/// One token location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A header, with the prefix before the token (`Bearer `).
    Header {
        name: http::HeaderName,
        prefix: String,
    },
    /// A query parameter.
    Param(String),
}

/// One `jwtRules` entry.
#[derive(Debug, Clone)]
pub struct JwtRule {
    /// `iss` must equal this.
    pub issuer: String,
    /// When not empty, `aud` must contain one of these.
    pub audiences: Vec<String>,
    /// The verification keys.
    pub keys: KeySource,
    /// Where tokens are looked for.
    pub locations: Vec<Location>,
    /// Keep the token in the request sent to the app (default: removed).
    pub forward_original_token: bool,
    /// Send the verified payload (base64url JSON) to the app in this header.
    pub output_payload_to_header: Option<http::HeaderName>,
}

impl JwtRule {
    /// Istio's default locations: `Authorization: Bearer <token>` and the
    /// `access_token` query parameter.
    pub fn default_locations() -> Vec<Location> {
        vec![
            Location::Header {
                name: http::header::AUTHORIZATION,
                prefix: "Bearer ".into(),
            },
            Location::Param("access_token".into()),
        ]
    }
}

/// A verified token.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedJwt {
    /// The payload (claims).
    pub claims: serde_json::Value,
    /// `iss/sub`, Istio's `request.auth.principal`.
    pub principal: String,
    /// The header changes for the request sent to the app.
    pub rewrite: HeaderRewrite,
}

/// What to change in the request before it goes to the app.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderRewrite {
    /// Headers that carried a token and are not forwarded.
    pub remove: Vec<http::HeaderName>,
    /// Headers to set (`outputPayloadToHeader`).
    pub set: Vec<(http::HeaderName, http::HeaderValue)>,
}

impl HeaderRewrite {
    /// Applies the changes to the request headers.
    pub fn apply(&self, headers: &mut http::HeaderMap) {
        for h in &self.remove {
            headers.remove(h);
        }
        for (k, v) in &self.set {
            headers.insert(k.clone(), v.clone());
        }
    }
}

/// Why a token was refused (the client is at fault): the request gets 401.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// Not three base64url parts of JSON.
    #[error("malformed token")]
    Malformed,
    /// No rule accepts tokens of this issuer at this location.
    #[error("token issuer is not accepted")]
    UnknownIssuer,
    /// The signature does not verify with any key of the issuer.
    #[error("token signature does not verify")]
    BadSignature,
    /// `exp` is past.
    #[error("token has expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("token is not valid yet")]
    NotYetValid,
    /// `aud` lists none of the rule's audiences.
    #[error("token audience is not accepted")]
    AudienceNotAllowed,
    /// The issuer's keys have not been fetched yet.
    #[error("the issuer's keys are not available yet")]
    KeysUnavailable,
}

impl JwtError {
    /// A fixed label for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            JwtError::Malformed => "jwt_malformed",
            JwtError::UnknownIssuer => "jwt_unknown_issuer",
            JwtError::BadSignature => "jwt_bad_signature",
            JwtError::Expired => "jwt_expired",
            JwtError::NotYetValid => "jwt_not_yet_valid",
            JwtError::AudienceNotAllowed => "jwt_audience_not_allowed",
            JwtError::KeysUnavailable => "jwt_keys_unavailable",
        }
    }
}

/// The RequestAuthentication rules that apply to a workload.
#[derive(Debug, Clone, Default)]
pub struct RequestAuthn {
    /// All rules of all attached RequestAuthentications.
    pub rules: Vec<JwtRule>,
}

impl RequestAuthn {
    /// Authenticates a request: `Ok(None)` without a token, `Ok(Some)`
    /// with a verified one, `Err` when a token is present and invalid.
    pub fn authenticate(
        &self,
        headers: &http::HeaderMap,
        query: Option<&str>,
        now: SystemTime,
    ) -> Result<Option<VerifiedJwt>, JwtError> {
        let now = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut verified: Option<VerifiedJwt> = None;
        let mut rewrite = HeaderRewrite::default();
        // Every location of every rule; a token found there must verify
        // against a rule that looks there and names its issuer.
        let mut locations: Vec<&Location> = Vec::new();
        for r in &self.rules {
            for l in &r.locations {
                if !locations.contains(&l) {
                    locations.push(l);
                }
            }
        }
        for loc in locations {
            let Some(token) = extract(loc, headers, query) else {
                continue;
            };
            let (header, claims) = decode(&token)?;
            let iss = claims.get("iss").and_then(serde_json::Value::as_str);
            let rule = self
                .rules
                .iter()
                .find(|r| Some(r.issuer.as_str()) == iss && r.locations.contains(loc))
                .ok_or(JwtError::UnknownIssuer)?;
            check(rule, &token, &header, &claims, now)?;
            if let Location::Header { name, .. } = loc
                && !rule.forward_original_token
            {
                rewrite.remove.push(name.clone());
            }
            if let Some(h) = &rule.output_payload_to_header {
                let payload = token.split('.').nth(1).unwrap_or("");
                if let Ok(v) = http::HeaderValue::from_str(payload) {
                    rewrite.set.push((h.clone(), v));
                }
            }
            if verified.is_none() {
                let sub = claims
                    .get("sub")
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or("");
                verified = Some(VerifiedJwt {
                    principal: format!("{}/{sub}", rule.issuer),
                    claims,
                    rewrite: HeaderRewrite::default(),
                });
            }
        }
        Ok(verified.map(|mut v| {
            v.rewrite = rewrite;
            v
        }))
    }
}

fn extract(loc: &Location, headers: &http::HeaderMap, query: Option<&str>) -> Option<String> {
    match loc {
        Location::Header { name, prefix } => {
            let v = headers.get(name)?.to_str().ok()?;
            let t = if prefix.is_empty() {
                v
            } else if v.len() >= prefix.len() && v[..prefix.len()].eq_ignore_ascii_case(prefix) {
                &v[prefix.len()..]
            } else {
                return None;
            };
            let t = t.trim();
            (!t.is_empty()).then(|| t.to_owned())
        }
        Location::Param(p) => query?.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k == p && !v.is_empty()).then(|| v.to_owned())
        }),
    }
}

fn decode(token: &str) -> Result<(serde_json::Value, serde_json::Value), JwtError> {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let t = jose::Compact::split(token).ok_or(JwtError::Malformed)?;
    let json = |s: &str| -> Result<serde_json::Value, JwtError> {
        let bytes = b64.decode(s).map_err(|_| JwtError::Malformed)?;
        let v: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|_| JwtError::Malformed)?;
        if v.is_object() {
            Ok(v)
        } else {
            Err(JwtError::Malformed)
        }
    };
    Ok((json(t.header)?, json(t.payload)?))
}

fn check(
    rule: &JwtRule,
    token: &str,
    header: &serde_json::Value,
    claims: &serde_json::Value,
    now: u64,
) -> Result<(), JwtError> {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let alg = header
        .get("alg")
        .and_then(serde_json::Value::as_str)
        .ok_or(JwtError::Malformed)?;
    let kid = header.get("kid").and_then(serde_json::Value::as_str);
    let t = jose::Compact::split(token).ok_or(JwtError::Malformed)?;
    let (message, signature) = (t.signing_input, t.signature);
    let keys = match &rule.keys {
        KeySource::Static(k) => k.clone(),
        KeySource::Fetched { uri, cache } => cache.get(uri).ok_or(JwtError::KeysUnavailable)?,
    };
    if !keys.verified.contains(token) {
        let signature = b64.decode(signature).map_err(|_| JwtError::Malformed)?;
        if !keys.verify(alg, kid, message.as_bytes(), &signature) {
            return Err(JwtError::BadSignature);
        }
        keys.verified.insert(token);
    }
    let time = |k: &str| claims.get(k).and_then(serde_json::Value::as_u64);
    if let Some(exp) = time("exp")
        && now > exp.saturating_add(CLOCK_SKEW_SECONDS)
    {
        return Err(JwtError::Expired);
    }
    if let Some(nbf) = time("nbf")
        && now.saturating_add(CLOCK_SKEW_SECONDS) < nbf
    {
        return Err(JwtError::NotYetValid);
    }
    if !rule.audiences.is_empty() {
        let ok = match claims.get("aud") {
            Some(serde_json::Value::String(a)) => rule.audiences.contains(a),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .filter_map(serde_json::Value::as_str)
                .any(|a| rule.audiences.iter().any(|r| r == a)),
            _ => false,
        };
        if !ok {
            return Err(JwtError::AudienceNotAllowed);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
