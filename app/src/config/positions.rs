//! Where a field of a configuration file is, from the YAML parser's own
//! marks: the text is deserialized once more with a probe that walks the
//! field path and fails on its key (or, for a list index, on the element),
//! and `serde_yaml` attaches the line and column of the event it was
//! reading to that failure. Used only on the error path, for problems found
//! after deserialization (cross-field checks, files named by the
//! configuration); errors found while deserializing carry their own marks.

use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// A position in a file: 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// Line, from 1.
    pub line: usize,
    /// Column, from 1.
    pub column: usize,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// One step of a field path such as `inbound.ports[0].allowed_peers`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Key(String),
    Index(usize),
}

/// The position of `field` (`a.b[2].c`) in `text`: of its key, or of the
/// element for a trailing index. A field the text does not contain (a
/// missing section, a default) gets the position of its nearest ancestor
/// that it does contain; `None` only for an empty document.
pub fn locate(text: &str, field: &str) -> Option<Position> {
    let steps = parse_path(field);
    (0..=steps.len())
        .rev()
        .find_map(|n| probe(text, &steps[..n]))
}

fn parse_path(field: &str) -> Vec<Step> {
    let mut steps = Vec::new();
    for part in field.split('.').filter(|p| !p.is_empty()) {
        let mut rest = part;
        if let Some(i) = rest.find('[') {
            let key = &rest[..i];
            if !key.is_empty() {
                steps.push(Step::Key(key.to_owned()));
            }
            rest = &rest[i..];
            while let Some(body) = rest.strip_prefix('[') {
                let Some(end) = body.find(']') else { break };
                if let Ok(n) = body[..end].parse() {
                    steps.push(Step::Index(n));
                }
                rest = &body[end + 1..];
            }
        } else {
            steps.push(Step::Key(rest.to_owned()));
        }
    }
    steps
}

/// Runs the probe for `steps`; the position where it stopped, if the text
/// has that field (the empty path is the document itself).
fn probe(text: &str, steps: &[Step]) -> Option<Position> {
    let de = serde_yaml::Deserializer::from_str(text);
    let probe = Probe { steps };
    match probe.deserialize(de) {
        Ok(Found::No) => None,
        Err(e) => e.location().map(|l| Position {
            line: l.line(),
            column: l.column(),
        }),
    }
}

/// What a probe that did not fail saw: the field is not there (a found
/// field ends the probe with an error, which carries its position).
enum Found {
    No,
}

/// The message of the probe's own failure; any error means "stopped here".
const HERE: &str = "(field position)";

struct Probe<'a> {
    steps: &'a [Step],
}

impl<'de> DeserializeSeed<'de> for Probe<'_> {
    type Value = Found;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Found, D::Error> {
        if self.steps.is_empty() {
            // The target itself (a list element, or the document): fail on
            // its first event, which carries its mark.
            return d.deserialize_any(Here).map(|()| Found::No);
        }
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Probe<'_> {
    type Value = Found;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Found, A::Error> {
        let (Step::Key(want), rest) = (&self.steps[0], &self.steps[1..]) else {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            return Ok(Found::No);
        };
        while let Some(hit) = map.next_key_seed(Key {
            want,
            last: rest.is_empty(),
        })? {
            if hit {
                let found = map.next_value_seed(Probe { steps: rest })?;
                // The rest must be read too: serde_yaml counts the entries.
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                return Ok(found);
            }
            map.next_value::<IgnoredAny>()?;
        }
        Ok(Found::No)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Found, A::Error> {
        let (Step::Index(want), rest) = (&self.steps[0], &self.steps[1..]) else {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            return Ok(Found::No);
        };
        let mut i = 0;
        loop {
            if i == *want {
                let found = seq
                    .next_element_seed(Probe { steps: rest })?
                    .unwrap_or(Found::No);
                // The rest must be read too: serde_yaml counts the elements.
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                return Ok(found);
            }
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Ok(Found::No);
            }
            i += 1;
        }
    }

    // Scalars have no fields.
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Found, E> {
        Ok(Found::No)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Found, E> {
        Ok(Found::No)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Found, E> {
        Ok(Found::No)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Found, E> {
        Ok(Found::No)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Found, E> {
        Ok(Found::No)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Found, E> {
        Ok(Found::No)
    }
    fn visit_none<E: de::Error>(self) -> Result<Found, E> {
        Ok(Found::No)
    }
}

/// A mapping key: whether it is the wanted one; the last step of the path
/// fails on it, so that the position is the key's.
struct Key<'a> {
    want: &'a str,
    last: bool,
}

impl<'de> DeserializeSeed<'de> for Key<'_> {
    type Value = bool;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Key<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<bool, E> {
        if key != self.want {
            return Ok(false);
        }
        if self.last {
            return Err(E::custom(HERE));
        }
        Ok(true)
    }

    // Keys that are not strings are never a field name.
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(false)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(false)
    }
}

/// Fails on whatever value it is given.
struct Here;

impl<'de> Visitor<'de> for Here {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(HERE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
identity:
  files: {cert: a, key: b, bundle: c}
listeners:
  - {name: a, direction: outbound}
  - name: b
    port: 3
inbound:
  ports:
    - port: 8080
      allowed_peers: [\"spiffe://example.org/x\", \"spiffe://example.org/y\"]
";

    fn at(field: &str) -> (usize, usize) {
        let p = locate(TEXT, field).unwrap();
        (p.line, p.column)
    }

    #[test]
    fn keys_indices_and_nesting() {
        assert_eq!(at("identity"), (1, 1));
        assert_eq!(at("identity.files"), (2, 3));
        assert_eq!(at("identity.files.bundle"), (2, 28));
        assert_eq!(at("listeners[0]"), (4, 5));
        assert_eq!(at("listeners[0].name"), (4, 6));
        assert_eq!(at("listeners[1].port"), (6, 5));
        assert_eq!(at("inbound.ports[0].allowed_peers"), (10, 7));
        assert_eq!(at("inbound.ports[0].allowed_peers[1]"), (10, 49));
    }

    #[test]
    fn a_missing_field_gets_its_nearest_ancestor() {
        assert_eq!(at("listeners[1].server_identities"), (5, 5));
        assert_eq!(at("listeners[7].name"), (3, 1));
        assert_eq!(at("outbound.servers[0]"), (1, 1));
        // An empty document is one null scalar, at its start.
        assert_eq!(
            locate("", "identity"),
            Some(Position { line: 1, column: 1 })
        );
    }

    #[test]
    fn paths() {
        assert_eq!(
            parse_path("a.b[2][3].c"),
            [
                Step::Key("a".into()),
                Step::Key("b".into()),
                Step::Index(2),
                Step::Index(3),
                Step::Key("c".into())
            ]
        );
    }
}
