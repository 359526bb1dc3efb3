//! SPIFFE IDs and trust domains, parsed and validated to the letter of the
//! SPIFFE-ID specification (spiffe/spiffe `standards/SPIFFE-ID.md`).
//!
//! Every other crate receives identities as [`SpiffeId`] values, never as bare
//! strings, so an unvalidated name cannot reach an authorization decision.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// "Implementations MUST support SPIFFE IDs up to 2048 bytes" (SPIFFE-ID §2.3).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
/// "Trust domain names ... MUST NOT exceed 255 characters" (SPIFFE-ID §2.1).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

const SCHEME: &str = "spiffe://";

/// Why a string is not a valid SPIFFE ID; each variant names the spec rule it breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    /// The string is empty.
    #[error("SPIFFE ID is empty")]
    Empty,
    /// The scheme is not `spiffe://`.
    #[error("SPIFFE ID must start with the scheme \"spiffe://\"")]
    WrongScheme,
    /// Nothing between `spiffe://` and the path.
    #[error("SPIFFE ID has an empty trust domain")]
    EmptyTrustDomain,
    /// The trust domain has a character outside `[a-z0-9.-_]`.
    #[error(
        "trust domain contains {0:?}: only lower-case letters, digits, '.', '-' and '_' are allowed"
    )]
    BadTrustDomainChar(char),
    /// `user@host` form.
    #[error("SPIFFE ID must not contain userinfo")]
    UserInfo,
    /// `host:port` form.
    #[error("SPIFFE ID must not contain a port")]
    Port,
    /// More than 255 bytes of trust domain.
    #[error("trust domain is longer than {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong,
    /// More than 2048 bytes in all.
    #[error("SPIFFE ID is longer than {MAX_SPIFFE_ID_LEN} bytes")]
    TooLong,
    /// `?` present.
    #[error("SPIFFE ID must not contain a query")]
    Query,
    /// `#` present.
    #[error("SPIFFE ID must not contain a fragment")]
    Fragment,
    /// `%` present anywhere.
    #[error("SPIFFE ID must not contain percent-encoded characters")]
    PercentEncoded,
    /// `//` in the path.
    #[error("SPIFFE ID path must not contain empty segments")]
    EmptySegment,
    /// `/./` or `/../` in the path.
    #[error("SPIFFE ID path must not contain '.' or '..' segments")]
    DotSegment,
    /// Path ends with `/`.
    #[error("SPIFFE ID path must not end with '/'")]
    TrailingSlash,
    /// A path character outside `[a-zA-Z0-9.-_]`.
    #[error(
        "SPIFFE ID path contains {0:?}: only letters, digits, '.', '-' and '_' are allowed in segments"
    )]
    BadPathChar(char),
}

/// A validated trust domain name such as `example.org` (always lower case).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(Arc<str>);

impl TrustDomain {
    /// Parses a bare trust domain name (`example.org`) or a trust domain's
    /// SPIFFE ID (`spiffe://example.org`).
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.starts_with(SCHEME) || s.contains("://") {
            let id = SpiffeId::parse(s)?;
            return Ok(id.trust_domain().clone());
        }
        validate_trust_domain(s)?;
        Ok(TrustDomain(Arc::from(s)))
    }

    /// The name, for example `example.org`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain's own SPIFFE ID, `spiffe://<name>`, as used for bundle map keys.
    pub fn id_string(&self) -> String {
        format!("{SCHEME}{}", self.0)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A validated SPIFFE ID, `spiffe://<trust domain>[/<path>]`.
///
/// Cheap to clone (reference counted). Equality is byte equality of the
/// canonical form: the trust domain is lower case by construction and the
/// path is case-sensitive (SPIFFE-ID §2.4).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    full: Arc<str>,
    td: TrustDomain,
}

impl SpiffeId {
    /// Parses and validates a SPIFFE ID.
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        // The scheme is case-insensitive in RFC 3986, but the SPIFFE spec's
        // canonical form is lower case; accept only that so IDs compare bytewise.
        let rest = s.strip_prefix(SCHEME).ok_or(SpiffeIdError::WrongScheme)?;
        if s.contains('#') {
            return Err(SpiffeIdError::Fragment);
        }
        if s.contains('?') {
            return Err(SpiffeIdError::Query);
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        validate_trust_domain(authority)?;
        validate_path(path)?;
        Ok(SpiffeId {
            full: Arc::from(s),
            td: TrustDomain(Arc::from(authority)),
        })
    }

    /// Builds `spiffe://<td><path>` from parts; `path` must be empty or start with `/`.
    pub fn from_parts(td: &TrustDomain, path: &str) -> Result<Self, SpiffeIdError> {
        Self::parse(&format!("{SCHEME}{}{path}", td.as_str()))
    }

    /// The trust domain part.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.td
    }

    /// The path, empty or starting with `/`.
    pub fn path(&self) -> &str {
        &self.full[SCHEME.len() + self.td.as_str().len()..]
    }

    /// The whole ID as a string.
    pub fn as_str(&self) -> &str {
        &self.full
    }

    /// True when the path is empty (the ID names a trust domain, not a workload).
    pub fn is_trust_domain_id(&self) -> bool {
        self.path().is_empty()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.full)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        SpiffeId::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for TrustDomain {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for TrustDomain {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        TrustDomain::parse(&s).map_err(serde::de::Error::custom)
    }
}

fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::EmptyTrustDomain);
    }
    if td.contains('@') {
        return Err(SpiffeIdError::UserInfo);
    }
    if td.contains(':') {
        return Err(SpiffeIdError::Port);
    }
    if td.contains('%') {
        return Err(SpiffeIdError::PercentEncoded);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong);
    }
    if let Some(c) = td
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
    {
        return Err(SpiffeIdError::BadTrustDomainChar(c));
    }
    Ok(())
}

fn validate_path(path: &str) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Ok(());
    }
    if path.contains('%') {
        return Err(SpiffeIdError::PercentEncoded);
    }
    if path.ends_with('/') {
        // "/" alone is an empty segment followed by nothing: report it as a trailing slash.
        return Err(SpiffeIdError::TrailingSlash);
    }
    // `path` starts with '/', so the first split element is the empty prefix.
    for seg in path.split('/').skip(1) {
        if seg.is_empty() {
            return Err(SpiffeIdError::EmptySegment);
        }
        if seg == "." || seg == ".." {
            return Err(SpiffeIdError::DotSegment);
        }
        if let Some(c) = seg
            .chars()
            .find(|c| !matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_'))
        {
            return Err(SpiffeIdError::BadPathChar(c));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ids() {
        for s in [
            "spiffe://example.org",
            "spiffe://example.org/ec-web",
            "spiffe://example.org/ns/prod/sa/default",
            "spiffe://a_b-c.d/x.y_z-W/V",
            "spiffe://10.0.0.1/workload",
        ] {
            let id = SpiffeId::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(id.as_str(), s);
        }
        let id = SpiffeId::parse("spiffe://example.org/ns/prod").unwrap();
        assert_eq!(id.trust_domain().as_str(), "example.org");
        assert_eq!(id.path(), "/ns/prod");
    }

    #[test]
    fn each_rule_is_enforced() {
        use SpiffeIdError::*;
        let long_td = format!("spiffe://{}/a", "a".repeat(256));
        let long_id = format!("spiffe://example.org/{}", "a".repeat(2048));
        let cases: &[(&str, SpiffeIdError)] = &[
            ("", Empty),
            ("http://example.org/a", WrongScheme),
            ("SPIFFE://example.org/a", WrongScheme),
            ("spiffe:///a", EmptyTrustDomain),
            ("spiffe://Example.org/a", BadTrustDomainChar('E')),
            ("spiffe://user@example.org/a", UserInfo),
            ("spiffe://example.org:8080/a", Port),
            (&long_td, TrustDomainTooLong),
            (&long_id, TooLong),
            ("spiffe://example.org/a?x=1", Query),
            ("spiffe://example.org/a#frag", Fragment),
            ("spiffe://example.org/a%20b", PercentEncoded),
            ("spiffe://ex%41mple.org/a", PercentEncoded),
            ("spiffe://example.org/a//b", EmptySegment),
            ("spiffe://example.org/a/./b", DotSegment),
            ("spiffe://example.org/a/../b", DotSegment),
            ("spiffe://example.org/a/", TrailingSlash),
            ("spiffe://example.org/", TrailingSlash),
            ("spiffe://example.org/a b", BadPathChar(' ')),
            ("spiffe://example.org/a*", BadPathChar('*')),
        ];
        for (input, want) in cases {
            assert_eq!(SpiffeId::parse(input).as_ref(), Err(want), "{input}");
        }
    }

    #[test]
    fn trust_domain_forms() {
        assert_eq!(
            TrustDomain::parse("example.org").unwrap(),
            TrustDomain::parse("spiffe://example.org").unwrap()
        );
        assert!(TrustDomain::parse("Example.org").is_err());
        assert_eq!(
            TrustDomain::parse("example.org").unwrap().id_string(),
            "spiffe://example.org"
        );
    }

    proptest::proptest! {
        #[test]
        fn parser_never_panics(s in ".{0,300}") {
            let _ = SpiffeId::parse(&s);
        }

        #[test]
        fn well_formed_ids_round_trip(
            td in "[a-z0-9][a-z0-9._-]{0,40}",
            segs in proptest::collection::vec("[a-zA-Z0-9_-][a-zA-Z0-9._-]{0,10}", 0..6),
        ) {
            let segs: Vec<_> = segs.into_iter().filter(|s| s != "." && s != "..").collect();
            let path: String = segs.iter().map(|s| format!("/{s}")).collect();
            let s = format!("spiffe://{td}{path}");
            let id = SpiffeId::parse(&s).unwrap();
            proptest::prop_assert_eq!(id.as_str(), s.as_str());
            proptest::prop_assert_eq!(id.trust_domain().as_str(), td.as_str());
            proptest::prop_assert_eq!(id.path(), path.as_str());
        }

        #[test]
        fn any_accepted_id_is_canonical(s in "spiffe://[a-zA-Z0-9._:@%/-]{0,30}(/[a-zA-Z0-9._%?#/-]{0,20})?") {
            if let Ok(id) = SpiffeId::parse(&s) {
                let td = id.trust_domain().as_str();
                proptest::prop_assert!(!td.is_empty());
                proptest::prop_assert!(td.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)));
                proptest::prop_assert!(!id.path().ends_with('/'));
                proptest::prop_assert!(!id.path().contains("//"));
            }
        }
    }
}
