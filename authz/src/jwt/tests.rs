//! Tokens signed here with ring (ES256), verified as a request would be.

use super::*;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};

pub(crate) struct Signer {
    key: EcdsaKeyPair,
    rng: SystemRandom,
}

impl Signer {
    pub fn new() -> Self {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        Signer { key, rng }
    }

    pub fn jwks(&self) -> String {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let p = self.key.public_key().as_ref();
        format!(
            r#"{{"keys":[{{"kty":"EC","crv":"P-256","kid":"k1","x":"{}","y":"{}"}}]}}"#,
            b64.encode(&p[1..33]),
            b64.encode(&p[33..65])
        )
    }

    pub fn token(&self, claims: serde_json::Value) -> String {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let head = b64.encode(br#"{"alg":"ES256","kid":"k1","typ":"JWT"}"#);
        let body = b64.encode(claims.to_string());
        let msg = format!("{head}.{body}");
        let s = self.key.sign(&self.rng, msg.as_bytes()).unwrap();
        format!("{msg}.{}", b64.encode(s.as_ref()))
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn authn(signer: &Signer) -> RequestAuthn {
    RequestAuthn {
        rules: vec![JwtRule {
            issuer: "https://issuer.example".into(),
            audiences: vec!["httpbin".into()],
            keys: KeySource::Static(Arc::new(Jwks::parse(&signer.jwks()).unwrap())),
            locations: JwtRule::default_locations(),
            forward_original_token: false,
            output_payload_to_header: Some(http::HeaderName::from_static("x-jwt-payload")),
        }],
    }
}

fn bearer(t: &str) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    h.insert(
        http::header::AUTHORIZATION,
        http::HeaderValue::from_str(&format!("Bearer {t}")).unwrap(),
    );
    h
}

#[test]
fn valid_expired_wrong_issuer_wrong_audience_missing_and_forged() {
    let s = Signer::new();
    let a = authn(&s);
    let claims = |iss: &str, aud: &str, exp: u64| serde_json::json!({"iss": iss, "sub": "alice", "aud": aud, "exp": exp, "groups": ["g1"]});
    let good = s.token(claims("https://issuer.example", "httpbin", now() + 600));
    let v = a
        .authenticate(&bearer(&good), None, SystemTime::now())
        .unwrap()
        .unwrap();
    assert_eq!(v.principal, "https://issuer.example/alice");
    assert_eq!(v.rewrite.remove, [http::header::AUTHORIZATION]);
    assert_eq!(v.rewrite.set[0].0, "x-jwt-payload");
    let by_param = a
        .authenticate(
            &http::HeaderMap::new(),
            Some(&format!("a=1&access_token={good}")),
            SystemTime::now(),
        )
        .unwrap();
    assert!(by_param.is_some());
    let cases = [
        (
            s.token(claims("https://issuer.example", "httpbin", now() - 120)),
            JwtError::Expired,
        ),
        (
            s.token(claims("https://other.example", "httpbin", now() + 600)),
            JwtError::UnknownIssuer,
        ),
        (
            s.token(claims("https://issuer.example", "other", now() + 600)),
            JwtError::AudienceNotAllowed,
        ),
        (
            Signer::new().token(claims("https://issuer.example", "httpbin", now() + 600)),
            JwtError::BadSignature,
        ),
        ("not.a.jwt".to_owned(), JwtError::Malformed),
    ];
    for (token, want) in cases {
        assert_eq!(
            a.authenticate(&bearer(&token), None, SystemTime::now()),
            Err(want.clone()),
            "{want}"
        );
    }
    assert_eq!(
        a.authenticate(&http::HeaderMap::new(), None, SystemTime::now()),
        Ok(None)
    );
    // Within the clock skew an expired token still verifies.
    let skew = s.token(claims("https://issuer.example", "httpbin", now() - 30));
    assert!(
        a.authenticate(&bearer(&skew), None, SystemTime::now())
            .is_ok()
    );
}

#[test]
fn fetched_keys_are_used_once_the_cache_has_them() {
    let s = Signer::new();
    let cache = Arc::new(JwksCache::default());
    let mut a = authn(&s);
    a.rules[0].keys = KeySource::Fetched {
        uri: "http://keys.example/jwks".into(),
        cache: cache.clone(),
    };
    let t =
        s.token(serde_json::json!({"iss": "https://issuer.example", "sub": "a", "aud": "httpbin"}));
    assert_eq!(
        a.authenticate(&bearer(&t), None, SystemTime::now()),
        Err(JwtError::KeysUnavailable)
    );
    cache.store("http://keys.example/jwks", Jwks::parse(&s.jwks()).unwrap());
    assert!(
        a.authenticate(&bearer(&t), None, SystemTime::now())
            .unwrap()
            .is_some()
    );
}

#[test]
fn jwks_without_usable_keys_is_refused() {
    assert!(Jwks::parse(r#"{"keys":[{"kty":"oct","k":"AAAA"}]}"#).is_err());
    assert!(Jwks::parse("[]").is_err());
}

#[test]
fn verified_claims_reach_the_rego_input_as_envoy_jwt_authn_metadata() {
    let claims =
        serde_json::json!({"iss": "https://issuer.example", "sub": "alice", "groups": ["g1"]});
    let headers = http::HeaderMap::new();
    let req = crate::RequestInfo {
        method: &http::Method::GET,
        authority: "api",
        path: "/",
        raw_path_and_query: "/",
        query: None,
        headers: &headers,
        protocol: crate::HttpProtocol::Http11,
        scheme: "http",
        grpc_method: None,
        source: "10.0.0.1:1".parse().unwrap(),
        destination: "10.0.0.2:80".parse().unwrap(),
        local_identity: None,
        peer_cert_sha256: None,
    };
    let conn = crate::ConnectionInfo::new(None, "10.0.0.1".parse().unwrap(), 80);
    let without = crate::input::build(&conn, &req);
    assert!(without["attributes"].get("metadataContext").is_none());
    let input = crate::input::build(&conn.with_jwt(Some(&claims)), &req);
    let md =
        &input["attributes"]["metadataContext"]["filterMetadata"]["envoy.filters.http.jwt_authn"];
    assert_eq!(md["https://issuer.example"], claims);
}

#[test]
fn eddsa_tokens_verify_and_a_key_of_another_alg_is_not_tried() {
    use ring::signature::Ed25519KeyPair;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let rng = SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    let x = b64.encode(key.public_key().as_ref());
    let token = {
        let head = b64.encode(br#"{"alg":"EdDSA","typ":"JWT"}"#);
        let body = b64.encode(r#"{"iss":"https://issuer.example","sub":"bob","aud":"httpbin"}"#);
        let msg = format!("{head}.{body}");
        format!("{msg}.{}", b64.encode(key.sign(msg.as_bytes()).as_ref()))
    };
    let with = |alg: &str| {
        let jwks =
            format!(r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","alg":"{alg}","x":"{x}"}}]}}"#);
        let mut a = authn(&Signer::new());
        a.rules[0].keys = KeySource::Static(Arc::new(Jwks::parse(&jwks).unwrap()));
        a.authenticate(&bearer(&token), None, SystemTime::now())
    };
    assert_eq!(
        with("EdDSA").unwrap().unwrap().principal,
        "https://issuer.example/bob"
    );
    // Envoy's jwt_verify_lib skips a key whose `alg` is not the token's.
    assert_eq!(with("ES256"), Err(JwtError::BadSignature));
}

/// The verified-signature cache saves only the signature check: a token
/// verified once is still refused once it expires, a forgery of it (the
/// same claims, another signature) still fails, and a token of keys that
/// were rotated out is refused with the new set.
#[test]
fn a_token_verified_before_is_still_checked_for_time_forgery_and_rotation() {
    let s = Signer::new();
    let cache = Arc::new(JwksCache::default());
    let mut a = authn(&s);
    let uri = "http://keys.example/jwks";
    a.rules[0].keys = KeySource::Fetched {
        uri: uri.into(),
        cache: cache.clone(),
    };
    cache.store(uri, Jwks::parse(&s.jwks()).unwrap());
    let exp = now() + 600;
    let t = s.token(serde_json::json!({"iss": "https://issuer.example", "sub": "a", "aud": "httpbin", "exp": exp}));
    for _ in 0..3 {
        assert!(
            a.authenticate(&bearer(&t), None, SystemTime::now())
                .unwrap()
                .is_some()
        );
    }
    // The same token, after its expiry (and the skew).
    let later = UNIX_EPOCH + std::time::Duration::from_secs(exp + CLOCK_SKEW_SECONDS + 1);
    assert_eq!(
        a.authenticate(&bearer(&t), None, later),
        Err(JwtError::Expired)
    );
    // The same header and claims with another signature.
    let (signed, _) = t.rsplit_once('.').unwrap();
    let other = Signer::new().token(serde_json::json!({"x": 1}));
    let forged = format!("{signed}.{}", other.rsplit_once('.').unwrap().1);
    assert_eq!(
        a.authenticate(&bearer(&forged), None, SystemTime::now()),
        Err(JwtError::BadSignature)
    );
    // The issuer rotates to a new key: the old key's token no longer verifies.
    cache.store(uri, Jwks::parse(&Signer::new().jwks()).unwrap());
    assert_eq!(
        a.authenticate(&bearer(&t), None, SystemTime::now()),
        Err(JwtError::BadSignature)
    );
}

/// Many distinct tokens keep the cache bounded, and each still verifies.
#[test]
fn the_verified_token_cache_is_bounded() {
    let s = Signer::new();
    let a = authn(&s);
    for i in 0..(2 * VERIFIED_SLOTS) {
        let t = s.token(serde_json::json!({"iss": "https://issuer.example", "sub": format!("u{i}"), "aud": "httpbin"}));
        assert!(
            a.authenticate(&bearer(&t), None, SystemTime::now())
                .unwrap()
                .is_some()
        );
    }
    let KeySource::Static(keys) = &a.rules[0].keys else {
        unreachable!()
    };
    let slots = keys.verified.slots.lock().unwrap();
    assert_eq!(slots.len(), VERIFIED_SLOTS);
}
