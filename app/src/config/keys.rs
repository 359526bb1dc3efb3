//! The key files `inbound.bundle.verification` names: read when the
//! configuration is loaded (so a missing or malformed key is a
//! configuration error, exit 64), and again when central management starts.

use std::path::Path;

use rampart_authz::central::signature::{SigningAlgorithm, Verification, VerificationKey};

use super::Config;

impl Config {
    /// Reads the bundle verification keys; a problem names its field.
    pub fn bundle_verification(&self) -> Result<Option<Verification>, (String, String)> {
        let Some(v) = self
            .inbound
            .bundle
            .as_ref()
            .and_then(|b| b.verification.as_ref())
        else {
            return Ok(None);
        };
        let mut keys = Vec::new();
        for (i, k) in v.keys.iter().enumerate() {
            let field = |f: &str| format!("inbound.bundle.verification.keys[{i}].{f}");
            let read = |f: &str, p: &Path| {
                std::fs::read(p)
                    .map_err(|e| (field(f), format!("cannot read {}: {e}", p.display())))
            };
            let key = match (k.algorithm, &k.public_key_file, &k.secret_file) {
                (SigningAlgorithm::Hs256, None, Some(p)) => {
                    let secret = read("secret_file", p)?;
                    // A trailing newline from `echo` or an editor is not part of the secret.
                    let secret = secret.trim_ascii_end();
                    VerificationKey::hmac_secret(k.key_id.clone(), secret)
                        .map_err(|e| (field("secret_file"), e.to_string()))?
                }
                (SigningAlgorithm::Hs256, _, _) => {
                    return Err((
                        field("secret_file"),
                        "HS256 takes `secret_file` only".into(),
                    ));
                }
                (alg @ (SigningAlgorithm::Rs256 | SigningAlgorithm::Es256), Some(p), None) => {
                    let pem = read("public_key_file", p)?;
                    VerificationKey::from_public_pem(
                        k.key_id.clone(),
                        alg,
                        &String::from_utf8_lossy(&pem),
                    )
                    .map_err(|e| (field("public_key_file"), e.to_string()))?
                }
                (SigningAlgorithm::Rs256 | SigningAlgorithm::Es256, _, _) => {
                    return Err((
                        field("public_key_file"),
                        "RS256 and ES256 take `public_key_file` only".into(),
                    ));
                }
            };
            keys.push(key);
        }
        Ok(Some(Verification {
            keys,
            scope: v.scope.clone().filter(|s| !s.is_empty()),
        }))
    }
}
