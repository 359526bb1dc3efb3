//! Bundle signatures in OPA's `.signatures.json` scheme, so a compromised
//! file server cannot push an allow-all policy: the file holds
//! `{"signatures": ["<JWT>"]}`, and the JWT's payload lists every file of
//! the bundle with its digest (`{"files": [{"name", "hash", "algorithm"}],
//! "keyid", "scope"}`). A bundle verifies when the JWT's signature checks
//! against a configured key and the listed files are exactly the bundle's
//! files, each with a matching digest.
//!
//! Digests follow OPA (`bundle/hash.go`): plain files are hashed as bytes;
//! JSON files (`*.json`, `.manifest`) are hashed in a canonical form, keys
//! sorted, no white space, so re-encoding a data file does not break its
//! signature. Numbers are written as Go writes a `float64` (integral values
//! without a fraction), which covers what `opa sign` produces for ordinary
//! data.
//!
//! Algorithms: RS256 (RSA PKCS#1 v1.5, 2048 to 8192 bits), ES256 (P-256)
//! and HS256 (a shared secret), all through `ring`. The JWT's `alg` must be
//! the configured key's algorithm, so a public key is never used as an HMAC
//! secret.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// The name of the signatures file at the root of a bundle.
pub const SIGNATURES_FILE: &str = ".signatures.json";

/// A JWT signing algorithm Rampart verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum SigningAlgorithm {
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    #[serde(rename = "RS256")]
    Rs256,
    /// ECDSA on P-256 with SHA-256.
    #[serde(rename = "ES256")]
    Es256,
    /// HMAC with SHA-256 (a shared secret).
    #[serde(rename = "HS256")]
    Hs256,
}

impl SigningAlgorithm {
    /// The JWT spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SigningAlgorithm::Rs256 => "RS256",
            SigningAlgorithm::Es256 => "ES256",
            SigningAlgorithm::Hs256 => "HS256",
        }
    }
}

/// A key that bundle signatures are checked against.
#[derive(Clone)]
pub struct VerificationKey {
    id: String,
    algorithm: SigningAlgorithm,
    material: Material,
}

/// What verifies a signature ([`crate::jose`] checks it).
#[derive(Clone)]
enum Material {
    /// RS256, ES256.
    Public(crate::jose::Key),
    /// HS256.
    Secret(Vec<u8>),
}

impl std::fmt::Debug for VerificationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The material of an HS256 key is a secret: never print it.
        f.debug_struct("VerificationKey")
            .field("id", &self.id)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

/// A verification key the operator must fix. The configuration is at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not a PEM `PUBLIC KEY` block.
    #[error("expected a PEM \"PUBLIC KEY\" (SubjectPublicKeyInfo) block")]
    NotPem,
    /// The DER inside does not have the expected shape.
    #[error("malformed SubjectPublicKeyInfo")]
    Malformed,
    /// The key type does not fit the algorithm.
    #[error("the key is not a {0} key")]
    WrongKeyType(&'static str),
    /// HS256 needs a secret, not a public key, and the reverse.
    #[error("{0} keys are given as {1}")]
    WrongMaterial(&'static str, &'static str),
    /// An empty HS256 secret.
    #[error("the HS256 secret is empty")]
    EmptySecret,
}

impl VerificationKey {
    /// An RS256 or ES256 key from a PEM `PUBLIC KEY` block (what
    /// `openssl pkey -pubout` writes).
    pub fn from_public_pem(
        id: impl Into<String>,
        algorithm: SigningAlgorithm,
        pem: &str,
    ) -> Result<Self, KeyError> {
        let want = match algorithm {
            SigningAlgorithm::Rs256 => crate::jose::KeyType::Rsa,
            SigningAlgorithm::Es256 => crate::jose::KeyType::P256,
            SigningAlgorithm::Hs256 => {
                return Err(KeyError::WrongMaterial("HS256", "a shared secret"));
            }
        };
        let der = match crate::jose::pem_block(pem) {
            Some((label, der)) if label == "PUBLIC KEY" => der,
            _ => return Err(KeyError::NotPem),
        };
        let key = crate::jose::Key::from_spki(&der).map_err(|_| KeyError::Malformed)?;
        if key.kind != want {
            return Err(KeyError::WrongKeyType(algorithm.as_str()));
        }
        Ok(VerificationKey {
            id: id.into(),
            algorithm,
            material: Material::Public(key),
        })
    }

    /// An HS256 key from a shared secret.
    pub fn hmac_secret(id: impl Into<String>, secret: &[u8]) -> Result<Self, KeyError> {
        if secret.is_empty() {
            return Err(KeyError::EmptySecret);
        }
        Ok(VerificationKey {
            id: id.into(),
            algorithm: SigningAlgorithm::Hs256,
            material: Material::Secret(secret.to_vec()),
        })
    }

    /// The key's id (JWT `kid` or payload `keyid`).
    pub fn id(&self) -> &str {
        &self.id
    }

    fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        use crate::jose::{Alg, verify_hmac};
        match (&self.material, self.algorithm) {
            (Material::Public(k), SigningAlgorithm::Rs256) => {
                k.verify(Alg::Rs256, message, signature)
            }
            (Material::Public(k), SigningAlgorithm::Es256) => {
                k.verify(Alg::Es256, message, signature)
            }
            (Material::Secret(secret), SigningAlgorithm::Hs256) => {
                verify_hmac(ring::hmac::HMAC_SHA256, secret, message, signature)
            }
            // Made only by the constructors above, which pair them.
            (Material::Public(_), SigningAlgorithm::Hs256)
            | (Material::Secret(_), SigningAlgorithm::Rs256 | SigningAlgorithm::Es256) => false,
        }
    }
}

/// What a bundle's signature must satisfy.
#[derive(Debug, Clone)]
pub struct Verification {
    /// Accepted keys. A JWT naming a key id must name one of these; one
    /// naming none is checked against the only key, when there is one.
    pub keys: Vec<VerificationKey>,
    /// When set, the JWT's `scope` must equal it.
    pub scope: Option<String>,
}

/// Why a bundle's signature was refused. The bundle (its publisher, or
/// whoever tampered with it) is at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// Verification is configured and the bundle has no `.signatures.json`.
    #[error("the bundle is not signed")]
    Unsigned,
    /// `.signatures.json` or its JWT cannot be read.
    #[error("malformed signature: {0}")]
    Malformed(String),
    /// Exactly one signature is expected (as OPA does).
    #[error("expected exactly one signature, found {0}")]
    SignatureCount(usize),
    /// The JWT names a key that is not configured, or names none while
    /// several are.
    #[error("no configured key for key id {0:?}")]
    UnknownKey(Option<String>),
    /// The JWT's `alg` is not the key's algorithm.
    #[error("the signature uses {got}, the key is {want}")]
    AlgorithmMismatch {
        /// The JWT's `alg`.
        got: String,
        /// The key's algorithm.
        want: &'static str,
    },
    /// The signature does not verify.
    #[error("the signature does not verify")]
    BadSignature,
    /// The JWT's scope is not the configured one.
    #[error("the signature's scope {0:?} is not the configured scope")]
    WrongScope(Option<String>),
    /// A file of the bundle is not listed in the signature.
    #[error("file {0:?} is not covered by the signature")]
    UnsignedFile(String),
    /// A file listed in the signature is not in the bundle.
    #[error("signed file {0:?} is missing from the bundle")]
    MissingFile(String),
    /// A file's digest differs from the signed one.
    #[error("file {0:?} does not match its signed digest")]
    DigestMismatch(String),
    /// The signature uses a digest algorithm Rampart does not accept.
    #[error("unsupported digest algorithm {0:?}")]
    UnsupportedDigest(String),
}

#[derive(Deserialize)]
struct SignaturesFile {
    signatures: Vec<String>,
}

#[derive(Deserialize)]
struct JwtHeader {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

#[derive(Deserialize)]
struct JwtPayload {
    files: Vec<SignedFile>,
    #[serde(default)]
    keyid: Option<String>,
    #[serde(default)]
    scope: Option<String>,
}

#[derive(Deserialize)]
struct SignedFile {
    name: String,
    hash: String,
    algorithm: String,
}

/// Verifies the bundle `files` (normalized relative paths, including
/// `.signatures.json` when present) against `v`.
pub(crate) fn verify(
    files: &BTreeMap<String, Vec<u8>>,
    v: &Verification,
) -> Result<(), SignatureError> {
    let raw = files.get(SIGNATURES_FILE).ok_or(SignatureError::Unsigned)?;
    let sigs: SignaturesFile =
        serde_json::from_slice(raw).map_err(|e| SignatureError::Malformed(e.to_string()))?;
    let [jwt] = sigs.signatures.as_slice() else {
        return Err(SignatureError::SignatureCount(sigs.signatures.len()));
    };
    let payload = verify_jwt(jwt, v)?;
    let mut listed: BTreeMap<String, &SignedFile> = BTreeMap::new();
    for f in &payload.files {
        listed.insert(normalize_name(&f.name), f);
    }
    for (name, bytes) in files {
        if name == SIGNATURES_FILE {
            continue;
        }
        let signed = listed
            .remove(name)
            .ok_or_else(|| SignatureError::UnsignedFile(name.clone()))?;
        let got = file_digest(name, bytes, &signed.algorithm)?;
        if !got.eq_ignore_ascii_case(&signed.hash) {
            return Err(SignatureError::DigestMismatch(name.clone()));
        }
    }
    if let Some(name) = listed.into_keys().next() {
        return Err(SignatureError::MissingFile(name));
    }
    Ok(())
}

fn verify_jwt(jwt: &str, v: &Verification) -> Result<JwtPayload, SignatureError> {
    let malformed = |m: &str| SignatureError::Malformed(m.to_owned());
    let Some(compact) = crate::jose::Compact::split(jwt) else {
        return Err(malformed("a JWT has three parts"));
    };
    let (h, p, s) = (compact.header, compact.payload, compact.signature);
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header: JwtHeader = b64
        .decode(h)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| malformed("JWT header"))?;
    let payload_bytes = b64.decode(p).map_err(|_| malformed("JWT payload"))?;
    let signature = b64.decode(s).map_err(|_| malformed("JWT signature"))?;
    // The key id may sit in the header (`kid`) or the payload (`keyid`);
    // it is only trusted after the signature checks with that key.
    let payload_keyid = serde_json::from_slice::<JwtPayload>(&payload_bytes)
        .ok()
        .and_then(|p| p.keyid);
    let kid = header.kid.clone().or(payload_keyid);
    let key = match &kid {
        Some(id) => v.keys.iter().find(|k| &k.id == id),
        None => match v.keys.as_slice() {
            [only] => Some(only),
            _ => None,
        },
    }
    .ok_or(SignatureError::UnknownKey(kid.clone()))?;
    if header.alg != key.algorithm.as_str() {
        return Err(SignatureError::AlgorithmMismatch {
            got: header.alg,
            want: key.algorithm.as_str(),
        });
    }
    if !key.verify(compact.signing_input.as_bytes(), &signature) {
        return Err(SignatureError::BadSignature);
    }
    let payload: JwtPayload = serde_json::from_slice(&payload_bytes)
        .map_err(|e| SignatureError::Malformed(format!("JWT payload: {e}")))?;
    if let Some(want) = &v.scope
        && payload.scope.as_ref() != Some(want)
    {
        return Err(SignatureError::WrongScope(payload.scope));
    }
    Ok(payload)
}

/// The digest of one bundle file as OPA computes it, lower-case hex.
pub fn file_digest(name: &str, bytes: &[u8], algorithm: &str) -> Result<String, SignatureError> {
    let alg = match algorithm {
        "SHA-256" => &ring::digest::SHA256,
        "SHA-384" => &ring::digest::SHA384,
        "SHA-512" => &ring::digest::SHA512,
        other => return Err(SignatureError::UnsupportedDigest(other.to_owned())),
    };
    let mut ctx = ring::digest::Context::new(alg);
    if is_json(name) {
        let value: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|e| SignatureError::Malformed(format!("{name}: {e}")))?;
        let mut canonical = String::new();
        canonical_json(&value, &mut canonical);
        ctx.update(canonical.as_bytes());
    } else {
        ctx.update(bytes);
    }
    let mut hex = String::new();
    for b in ctx.finish().as_ref() {
        let _ = write!(hex, "{b:02x}");
    }
    Ok(hex)
}

fn is_json(name: &str) -> bool {
    name.ends_with(".json") || name == ".manifest" || name.ends_with("/.manifest")
}

/// OPA's structured encoding: keys sorted, no white space, integral numbers
/// without a fraction.
fn canonical_json(v: &serde_json::Value, out: &mut String) {
    use serde_json::Value;
    match v {
        Value::Object(m) => {
            out.push('{');
            // serde_json's map is ordered by key (no `preserve_order`), but
            // sort explicitly so the digest never depends on that feature.
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::Value::String(k.clone()).to_string());
                out.push(':');
                canonical_json(&m[k], out);
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, e) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical_json(e, out);
            }
            out.push(']');
        }
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() < 1e21 => {
                let _ = write!(out, "{f:.0}");
            }
            Some(_) | None => out.push_str(&n.to_string()),
        },
        Value::Null | Value::Bool(_) | Value::String(_) => out.push_str(&v.to_string()),
    }
}

/// A key that signs bundles (for `rampart` tooling and tests; production
/// bundles are usually signed with `opa sign`).
pub enum SigningKey {
    /// ES256 with a PKCS#8 P-256 key pair.
    Es256(Box<ring::signature::EcdsaKeyPair>),
    /// HS256 with a shared secret.
    Hs256(Vec<u8>),
}

impl SigningKey {
    /// An ES256 key from PKCS#8 DER.
    pub fn es256_pkcs8(der: &[u8]) -> Result<Self, KeyError> {
        let rng = ring::rand::SystemRandom::new();
        ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            der,
            &rng,
        )
        .map(|k| SigningKey::Es256(Box::new(k)))
        .map_err(|_| KeyError::Malformed)
    }

    /// The PEM `PUBLIC KEY` of an ES256 key, for [`VerificationKey::from_public_pem`].
    pub fn public_pem(&self) -> Option<String> {
        use ring::signature::KeyPair as _;
        let SigningKey::Es256(k) = self else {
            return None;
        };
        // SubjectPublicKeyInfo of a P-256 key: a fixed header, then the point.
        let mut der = vec![
            0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06,
            0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
        ];
        der.extend_from_slice(k.public_key().as_ref());
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        Some(format!(
            "-----BEGIN PUBLIC KEY-----\n{b64}\n-----END PUBLIC KEY-----\n"
        ))
    }
}

/// The `.signatures.json` for `files` (every file but a signatures file),
/// with SHA-256 digests, signed by `key` under `key_id`.
pub fn sign(
    files: &BTreeMap<String, Vec<u8>>,
    key: &SigningKey,
    key_id: &str,
    scope: Option<&str>,
) -> Result<Vec<u8>, SignatureError> {
    let mut listed = Vec::new();
    for (name, bytes) in files {
        if name == SIGNATURES_FILE {
            continue;
        }
        let hash = file_digest(name, bytes, "SHA-256")?;
        listed.push(serde_json::json!({"name": name, "hash": hash, "algorithm": "SHA-256"}));
    }
    let (alg, sig_len_hint) = match key {
        SigningKey::Es256(_) => ("ES256", 64),
        SigningKey::Hs256(_) => ("HS256", 32),
    };
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = b64.encode(serde_json::json!({"alg": alg, "kid": key_id}).to_string());
    let mut payload = serde_json::json!({"files": listed, "keyid": key_id});
    if let Some(s) = scope {
        payload["scope"] = serde_json::Value::String(s.to_owned());
    }
    let payload = b64.encode(payload.to_string());
    let input = format!("{header}.{payload}");
    let mut sig = Vec::with_capacity(sig_len_hint);
    match key {
        SigningKey::Es256(k) => {
            let rng = ring::rand::SystemRandom::new();
            let s = k
                .sign(&rng, input.as_bytes())
                .map_err(|_| SignatureError::BadSignature)?;
            sig.extend_from_slice(s.as_ref());
        }
        SigningKey::Hs256(secret) => {
            let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
            sig.extend_from_slice(ring::hmac::sign(&k, input.as_bytes()).as_ref());
        }
    }
    let jwt = format!("{input}.{}", b64.encode(sig));
    Ok(serde_json::json!({"signatures": [jwt]})
        .to_string()
        .into_bytes())
}

/// A bundle path as stored: no leading `/` or `./`.
pub(crate) fn normalize_name(name: &str) -> String {
    let mut n = name;
    loop {
        if let Some(rest) = n.strip_prefix("./") {
            n = rest;
        } else if let Some(rest) = n.strip_prefix('/') {
            n = rest;
        } else {
            return n.to_owned();
        }
    }
}
