//! JWS signature verification on ring: the one place Rampart parses
//! verification keys (PEM certificates and public keys, JWKs, JWK sets)
//! and checks signatures. Three callers share it, each keeping only its
//! own rules for choosing a key:
//!
//! - [`crate::jwt`], Istio's RequestAuthentication (Envoy's `jwt_authn`);
//! - [`crate::rego`]'s `io.jwt.*` builtins (OPA's `topdown/tokens.go`);
//! - [`crate::central`]'s bundle signatures (OPA's `.signatures.json`).
//!
//! What ring verifies: RS256/384/512 and PS256/384/512 with keys of 2048
//! to 8192 bits, ES256 and ES384, EdDSA (Ed25519), HS256/384/512. ES512
//! and smaller RSA keys verify nothing here (a documented exception).

use base64::Engine as _;
use ring::signature as sig;
use x509_parser::prelude::FromDer as _;

/// A JWS `alg` ring verifies with a public key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    Rs256,
    /// RSASSA-PKCS1-v1_5 with SHA-384.
    Rs384,
    /// RSASSA-PKCS1-v1_5 with SHA-512.
    Rs512,
    /// RSASSA-PSS with SHA-256.
    Ps256,
    /// RSASSA-PSS with SHA-384.
    Ps384,
    /// RSASSA-PSS with SHA-512.
    Ps512,
    /// ECDSA on P-256 with SHA-256.
    Es256,
    /// ECDSA on P-384 with SHA-384.
    Es384,
    /// Ed25519.
    EdDsa,
}

impl Alg {
    /// The algorithm a JOSE header's `alg` names, when ring verifies it.
    pub fn from_name(alg: &str) -> Option<Alg> {
        Some(match alg {
            "RS256" => Alg::Rs256,
            "RS384" => Alg::Rs384,
            "RS512" => Alg::Rs512,
            "PS256" => Alg::Ps256,
            "PS384" => Alg::Ps384,
            "PS512" => Alg::Ps512,
            "ES256" => Alg::Es256,
            "ES384" => Alg::Es384,
            "EdDSA" => Alg::EdDsa,
            _ => return None,
        })
    }

    /// The `alg` name.
    pub fn name(self) -> &'static str {
        match self {
            Alg::Rs256 => "RS256",
            Alg::Rs384 => "RS384",
            Alg::Rs512 => "RS512",
            Alg::Ps256 => "PS256",
            Alg::Ps384 => "PS384",
            Alg::Ps512 => "PS512",
            Alg::Es256 => "ES256",
            Alg::Es384 => "ES384",
            Alg::EdDsa => "EdDSA",
        }
    }

    fn ring(self) -> &'static dyn sig::VerificationAlgorithm {
        match self {
            Alg::Rs256 => &sig::RSA_PKCS1_2048_8192_SHA256,
            Alg::Rs384 => &sig::RSA_PKCS1_2048_8192_SHA384,
            Alg::Rs512 => &sig::RSA_PKCS1_2048_8192_SHA512,
            Alg::Ps256 => &sig::RSA_PSS_2048_8192_SHA256,
            Alg::Ps384 => &sig::RSA_PSS_2048_8192_SHA384,
            Alg::Ps512 => &sig::RSA_PSS_2048_8192_SHA512,
            Alg::Es256 => &sig::ECDSA_P256_SHA256_FIXED,
            Alg::Es384 => &sig::ECDSA_P384_SHA384_FIXED,
            Alg::EdDsa => &sig::ED25519,
        }
    }

    /// The kind of key that verifies this algorithm.
    pub fn key_type(self) -> KeyType {
        match self {
            Alg::Rs256 | Alg::Rs384 | Alg::Rs512 | Alg::Ps256 | Alg::Ps384 | Alg::Ps512 => {
                KeyType::Rsa
            }
            Alg::Es256 => KeyType::P256,
            Alg::Es384 => KeyType::P384,
            Alg::EdDsa => KeyType::Ed25519,
        }
    }
}

/// The kind of a key, which decides the algorithms it can verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    /// RSA.
    Rsa,
    /// EC on P-256.
    P256,
    /// EC on P-384.
    P384,
    /// EC on P-521 (ES512: ring does not verify it).
    P521,
    /// Ed25519.
    Ed25519,
    /// A JWK `oct` or another key type: verifies no public-key signature.
    Other,
}

impl KeyType {
    /// Whether ring verifies any algorithm with a key of this kind.
    pub fn verifiable(self) -> bool {
        matches!(
            self,
            KeyType::Rsa | KeyType::P256 | KeyType::P384 | KeyType::Ed25519
        )
    }
}

/// One verification key.
#[derive(Clone)]
pub struct Key {
    /// The JWK's `kid` (empty when it has none, or for a PEM key).
    pub kid: String,
    /// The JWK's `alg` (empty when it has none, or for a PEM key).
    pub alg: String,
    /// Its kind.
    pub kind: KeyType,
    /// RSA: the DER `RSAPublicKey`; EC: the uncompressed point; Ed25519:
    /// the 32 bytes; `oct`: the secret.
    bytes: Vec<u8>,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // An `oct` key is a secret: never print the material.
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl Key {
    /// Whether `signature` over `msg` verifies with this key and `alg`; a
    /// key of another kind verifies nothing.
    pub fn verify(&self, alg: Alg, msg: &[u8], signature: &[u8]) -> bool {
        if self.kind != alg.key_type() {
            return false;
        }
        sig::UnparsedPublicKey::new(alg.ring(), &self.bytes)
            .verify(msg, signature)
            .is_ok()
    }

    /// A key from a DER SubjectPublicKeyInfo.
    pub fn from_spki(der: &[u8]) -> Result<Key, KeyError> {
        let (_, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(der)
            .map_err(|_| KeyError::Malformed("SubjectPublicKeyInfo"))?;
        let bytes = spki.subject_public_key.data.to_vec();
        let kind = match spki.algorithm.algorithm.to_id_string().as_str() {
            OID_RSA => KeyType::Rsa,
            OID_ED25519 => KeyType::Ed25519,
            OID_EC => {
                let curve = spki
                    .algorithm
                    .parameters
                    .as_ref()
                    .and_then(|p| p.as_oid().ok())
                    .map(|o| o.to_id_string())
                    .ok_or(KeyError::Malformed("EC parameters"))?;
                match curve.as_str() {
                    OID_P256 => KeyType::P256,
                    OID_P384 => KeyType::P384,
                    OID_P521 => KeyType::P521,
                    _ => return Err(KeyError::Unsupported("EC curve")),
                }
            }
            _ => KeyType::Other,
        };
        Ok(Key {
            kid: String::new(),
            alg: String::new(),
            kind,
            bytes,
        })
    }

    /// A key from one PEM block: a `CERTIFICATE` (its public key) or a
    /// `PUBLIC KEY`, with nothing but white space after it.
    pub fn from_pem(text: &str) -> Result<Key, KeyError> {
        let (label, der) = pem_block(text).ok_or(KeyError::NotPem)?;
        Key::from_pem_block(&label, &der)
    }

    fn from_pem_block(label: &str, der: &[u8]) -> Result<Key, KeyError> {
        match label {
            "CERTIFICATE" => {
                let (_, cert) = x509_parser::parse_x509_certificate(der)
                    .map_err(|_| KeyError::Malformed("certificate"))?;
                Key::from_spki(cert.tbs_certificate.subject_pki.raw)
            }
            "PUBLIC KEY" => Key::from_spki(der),
            _ => Err(KeyError::NotPem),
        }
    }

    /// A key from a JWK (RFC 7517/7518). An EC point must lie on its curve.
    pub fn from_jwk(jwk: &serde_json::Value) -> Result<Key, KeyError> {
        let field = |name: &'static str| jwk.get(name).and_then(|v| v.as_str());
        let b64 = |name: &'static str| {
            let s = field(name).ok_or(KeyError::Missing(name))?;
            b64url_nopad(s).ok_or(KeyError::Malformed(name))
        };
        let (kind, bytes) = match field("kty").ok_or(KeyError::Missing("kty"))? {
            "RSA" => (KeyType::Rsa, rsa_public_key_der(&b64("n")?, &b64("e")?)),
            "EC" => {
                let kind = match field("crv").ok_or(KeyError::Missing("crv"))? {
                    "P-256" => KeyType::P256,
                    "P-384" => KeyType::P384,
                    "P-521" => KeyType::P521,
                    _ => return Err(KeyError::Unsupported("EC curve")),
                };
                let mut point = vec![4u8];
                point.extend(b64("x")?);
                point.extend(b64("y")?);
                if !on_curve(kind, &point) {
                    return Err(KeyError::Malformed("EC point (not on its curve)"));
                }
                (kind, point)
            }
            "OKP" => match field("crv").ok_or(KeyError::Missing("crv"))? {
                "Ed25519" => (KeyType::Ed25519, b64("x")?),
                _ => return Err(KeyError::Unsupported("OKP curve")),
            },
            "oct" => (KeyType::Other, b64("k")?),
            _ => return Err(KeyError::Unsupported("kty")),
        };
        Ok(Key {
            kid: field("kid").unwrap_or("").to_owned(),
            alg: field("alg").unwrap_or("").to_owned(),
            kind,
            bytes,
        })
    }
}

/// Why a key did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not one PEM `CERTIFICATE` or `PUBLIC KEY` block.
    #[error("expected one PEM \"CERTIFICATE\" or \"PUBLIC KEY\" block")]
    NotPem,
    /// A member or structure does not have the expected shape.
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// A required JWK member is absent.
    #[error("a JWK lacks `{0}`")]
    Missing(&'static str),
    /// A key type or curve Rampart does not know.
    #[error("unsupported {0}")]
    Unsupported(&'static str),
    /// Not JSON, or a JWKS without a `keys` list.
    #[error("{0}")]
    Document(String),
}

/// The members of a JWKS's `keys` list, each parsed (a failure per key).
pub fn jwk_set(json: &str) -> Result<Vec<Result<Key, KeyError>>, KeyError> {
    let doc: serde_json::Value =
        serde_json::from_str(json).map_err(|e| KeyError::Document(format!("not JSON: {e}")))?;
    let keys = doc
        .get("keys")
        .and_then(serde_json::Value::as_array)
        .ok_or_else(|| KeyError::Document("no `keys` list".into()))?;
    Ok(keys.iter().map(Key::from_jwk).collect())
}

/// OPA's `parseKeysFromCertOrJWK`: one PEM block (a certificate or a
/// public key), else a JWK or a JWK set. Any key that does not parse fails
/// the whole text.
pub fn keys_from_cert_or_jwk(text: &str) -> Result<Vec<Key>, KeyError> {
    if let Some((label, der)) = pem_block(text) {
        return Key::from_pem_block(&label, &der).map(|k| vec![k]);
    }
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| KeyError::Document(format!("not JSON: {e}")))?;
    match v.get("keys") {
        Some(serde_json::Value::Array(keys)) => keys.iter().map(Key::from_jwk).collect(),
        Some(_) => Err(KeyError::Document("`keys` is not a list".into())),
        None => Key::from_jwk(&v).map(|k| vec![k]),
    }
}

/// An HMAC `alg` (HS256/384/512).
pub fn hmac_alg(alg: &str) -> Option<ring::hmac::Algorithm> {
    Some(match alg {
        "HS256" => ring::hmac::HMAC_SHA256,
        "HS384" => ring::hmac::HMAC_SHA384,
        "HS512" => ring::hmac::HMAC_SHA512,
        _ => return None,
    })
}

/// Whether an HMAC signature over `msg` verifies with `secret`
/// (constant time, in ring).
pub fn verify_hmac(
    alg: ring::hmac::Algorithm,
    secret: &[u8],
    msg: &[u8],
    signature: &[u8],
) -> bool {
    let key = ring::hmac::Key::new(alg, secret);
    ring::hmac::verify(&key, msg, signature).is_ok()
}

/// A JWS in compact form, split but not decoded.
#[derive(Debug, Clone, Copy)]
pub struct Compact<'a> {
    /// The base64url header.
    pub header: &'a str,
    /// The base64url payload.
    pub payload: &'a str,
    /// The base64url signature.
    pub signature: &'a str,
    /// `header.payload`, the signed bytes.
    pub signing_input: &'a str,
}

impl<'a> Compact<'a> {
    /// Splits `token` into its three parts; anything else is `None`.
    pub fn split(token: &'a str) -> Option<Compact<'a>> {
        let mut parts = token.split('.');
        let (header, payload, signature) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        Some(Compact {
            header,
            payload,
            signature,
            signing_input: &token[..header.len() + 1 + payload.len()],
        })
    }
}

/// Strict unpadded base64url (JWS, RFC 7515 §2), trailing `=` tolerated.
pub fn b64url_nopad(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('=').as_bytes())
        .ok()
}

/// OPA's `base64url.decode`: padding added when missing (RFC 7515
/// appendix C), then strict URL-safe base64.
pub fn b64url_opa(s: &str) -> Option<Vec<u8>> {
    let mut s = s.to_owned();
    if !s.ends_with('=') {
        match s.len() % 4 {
            0 => {}
            2 => s.push_str("=="),
            3 => s.push('='),
            _ => return None,
        }
    }
    base64::engine::general_purpose::URL_SAFE
        .decode(s.as_bytes())
        .ok()
}

/// The first PEM block of `text`, when it has one and nothing but white
/// space after it: its label and DER.
pub fn pem_block(text: &str) -> Option<(String, Vec<u8>)> {
    let begin = text.find("-----BEGIN ")?;
    let rest = &text[begin + 11..];
    let label_end = rest.find("-----")?;
    let label = rest[..label_end].to_owned();
    let body_start = &rest[label_end + 5..];
    let end_marker = format!("-----END {label}-----");
    let end = body_start.find(&end_marker)?;
    let after = &body_start[end + end_marker.len()..];
    if !after.trim().is_empty() {
        return None;
    }
    let b64: String = body_start[..end]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(b64.as_bytes())
        .ok()?;
    Some((label, der))
}

const OID_RSA: &str = "1.2.840.113549.1.1.1";
const OID_EC: &str = "1.2.840.10045.2.1";
const OID_ED25519: &str = "1.3.101.112";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_P384: &str = "1.3.132.0.34";
const OID_P521: &str = "1.3.132.0.35";

/// Whether an uncompressed point lies on the curve: ring validates the
/// peer's point when it agrees a key with it, and refuses one that is not.
fn on_curve(kind: KeyType, point: &[u8]) -> bool {
    let alg = match kind {
        KeyType::P256 => &ring::agreement::ECDH_P256,
        KeyType::P384 => &ring::agreement::ECDH_P384,
        // Not verified by ring at all (ES512): nothing to check against.
        KeyType::P521 | KeyType::Rsa | KeyType::Ed25519 | KeyType::Other => return true,
    };
    let rng = ring::rand::SystemRandom::new();
    let Ok(mine) = ring::agreement::EphemeralPrivateKey::generate(alg, &rng) else {
        return false;
    };
    let theirs = ring::agreement::UnparsedPublicKey::new(alg, point);
    ring::agreement::agree_ephemeral(mine, &theirs, |_| ()).is_ok()
}

/// The DER `RSAPublicKey ::= SEQUENCE { modulus INTEGER, publicExponent
/// INTEGER }` ring takes, from the big-endian components.
fn rsa_public_key_der(n: &[u8], e: &[u8]) -> Vec<u8> {
    fn integer(bytes: &[u8]) -> Vec<u8> {
        let first = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
        let trimmed = &bytes[first..];
        let mut content = Vec::with_capacity(trimmed.len() + 1);
        if trimmed.first().is_none_or(|&b| b & 0x80 != 0) {
            content.push(0);
        }
        content.extend_from_slice(trimmed);
        tlv(0x02, &content)
    }
    let mut body = integer(n);
    body.extend(integer(e));
    tlv(0x30, &body)
}

fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .iter()
            .copied()
            .skip_while(|&b| b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(content);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};

    #[test]
    fn rsa_components_encode_as_der() {
        // n = 0x80 (high bit set: a leading zero), e = 65537.
        assert_eq!(
            rsa_public_key_der(&[0x80], &[1, 0, 1]),
            vec![0x30, 0x09, 0x02, 0x02, 0x00, 0x80, 0x02, 0x03, 1, 0, 1]
        );
    }

    fn p256() -> (EcdsaKeyPair, SystemRandom) {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        (key, rng)
    }

    fn jwk_of(key: &EcdsaKeyPair) -> serde_json::Value {
        let p = key.public_key().as_ref();
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        serde_json::json!({"kty": "EC", "crv": "P-256", "kid": "k1",
            "x": b64.encode(&p[1..33]), "y": b64.encode(&p[33..65])})
    }

    #[test]
    fn one_jwk_verifies_its_own_signatures_only_for_its_algorithm() {
        let (key, rng) = p256();
        let k = Key::from_jwk(&jwk_of(&key)).unwrap();
        assert_eq!((k.kid.as_str(), k.kind), ("k1", KeyType::P256));
        let s = key.sign(&rng, b"msg").unwrap();
        assert!(k.verify(Alg::Es256, b"msg", s.as_ref()));
        assert!(!k.verify(Alg::Es256, b"other", s.as_ref()));
        assert!(!k.verify(Alg::Es384, b"msg", s.as_ref()));
        assert!(!k.verify(Alg::Rs256, b"msg", s.as_ref()));
    }

    #[test]
    fn bad_keys_are_named_errors() {
        let (key, _) = p256();
        let mut off_curve = jwk_of(&key);
        off_curve["y"] = serde_json::Value::String(
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([7u8; 32]),
        );
        assert!(matches!(
            Key::from_jwk(&off_curve),
            Err(KeyError::Malformed(_))
        ));
        assert_eq!(
            Key::from_jwk(&serde_json::json!({"kty": "RSA", "e": "AQAB"})).unwrap_err(),
            KeyError::Missing("n")
        );
        assert_eq!(
            Key::from_jwk(&serde_json::json!({"kty": "XYZ"})).unwrap_err(),
            KeyError::Unsupported("kty")
        );
        assert!(keys_from_cert_or_jwk("-----BEGIN FOO-----\nAA==\n-----END FOO-----").is_err());
        assert!(jwk_set(r#"{"nokeys": []}"#).is_err());
    }

    #[test]
    fn compact_form_has_exactly_three_parts() {
        let c = Compact::split("a.b.c").unwrap();
        assert_eq!(
            (c.header, c.payload, c.signature, c.signing_input),
            ("a", "b", "c", "a.b")
        );
        assert!(Compact::split("a.b").is_none());
        assert!(Compact::split("a.b.c.d").is_none());
        assert_eq!(b64url_opa("YQ").unwrap(), b"a");
        assert_eq!(b64url_nopad("YQ==").unwrap(), b"a");
        assert!(b64url_opa("Y").is_none());
    }

    #[test]
    fn hmac_verifies_with_the_secret_only() {
        let alg = hmac_alg("HS256").unwrap();
        let tag = ring::hmac::sign(&ring::hmac::Key::new(alg, b"s"), b"m");
        assert!(verify_hmac(alg, b"s", b"m", tag.as_ref()));
        assert!(!verify_hmac(alg, b"t", b"m", tag.as_ref()));
        assert!(hmac_alg("HS1").is_none());
    }
}
