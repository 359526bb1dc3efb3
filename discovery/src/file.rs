//! The static file source (VMs, tests): services with their destinations
//! and endpoints, each endpoint with the SPIFFE ID its server must present.
//! The file is polled; a new version that loads replaces the old one, a
//! broken one keeps the last good version (logged with the file, line,
//! column and field, counted), so a typo never empties a service.
//!
//! ```yaml
//! services:
//!   - name: backend
//!     destinations: ["10.96.0.10:80", "backend.example:80"]
//!     identity: spiffe://example.org/backend   # default of its endpoints
//!     endpoints:
//!       - address: 10.0.1.5:8080
//!       - address: 10.0.1.6:8080
//!         identity: spiffe://example.org/backend-canary
//! ```

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rampart_identity::SpiffeId;
use serde::Deserialize;

use crate::model::{
    Destination, Endpoint, EndpointIdentity, PodAddr, Service, SourceKind, SourceState,
};
use crate::registry::Publisher;

/// How often the file is read again.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    #[serde(default)]
    services: Vec<FileService>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileService {
    name: String,
    destinations: Vec<DestinationField>,
    #[serde(default)]
    identity: Option<SpiffeId>,
    #[serde(default)]
    endpoints: Vec<FileEndpoint>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEndpoint {
    address: SocketAddr,
    #[serde(default)]
    identity: Option<SpiffeId>,
}

#[derive(Debug)]
struct DestinationField(Destination);

impl<'de> Deserialize<'de> for DestinationField {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map(DestinationField)
            .map_err(serde::de::Error::custom)
    }
}

/// A file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// It could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// It is not a valid endpoints file.
    #[error("{path}:{line}:{column}: field `{field}`: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// 1-based line (0 when unknown).
        line: usize,
        /// 1-based column (0 when unknown).
        column: usize,
        /// The field path (`services[0].endpoints[1].identity`).
        field: String,
        /// What is wrong.
        reason: String,
    },
}

/// Reads and checks the file at `path`.
pub fn load(path: &Path) -> Result<SourceState, FileError> {
    let text = std::fs::read_to_string(path).map_err(|source| FileError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(path, &text)
}

/// Checks an endpoints file's text (`path` names it in errors).
pub fn parse(path: &Path, text: &str) -> Result<SourceState, FileError> {
    let invalid = |line: usize, column: usize, field: String, reason: String| FileError::Invalid {
        path: path.to_owned(),
        line,
        column,
        field,
        reason,
    };
    let de = serde_yaml::Deserializer::from_str(text);
    let doc: FileDoc = match serde_path_to_error::deserialize(de) {
        Ok(d) => d,
        Err(e) => {
            let field = e.path().to_string();
            let inner = e.into_inner();
            let (line, column) = inner
                .location()
                .map(|l| (l.line(), l.column()))
                .unwrap_or((0, 0));
            // serde_yaml appends "at line N column M"; the prefix says it.
            let reason = inner.to_string();
            let mut reason = match reason.find(" at line ") {
                Some(i) => reason[..i].to_owned(),
                None => reason,
            };
            // ... and may start with the entry's path, which `field` says.
            if let Some((head, rest)) = reason.split_once(": ")
                && !head.contains(' ')
                && head.starts_with("services")
            {
                reason = rest.to_owned();
            }
            return Err(invalid(line, column, field, reason));
        }
    };
    // Cross-entry rules have no parser position of their own; the field
    // path names the entry.
    let mut names = HashSet::new();
    let mut dests = HashSet::new();
    let mut state = SourceState::default();
    for (i, svc) in doc.services.into_iter().enumerate() {
        if svc.name.is_empty() {
            return Err(invalid(
                0,
                0,
                format!("services[{i}].name"),
                "is empty".into(),
            ));
        }
        if !names.insert(svc.name.clone()) {
            return Err(invalid(
                0,
                0,
                format!("services[{i}].name"),
                format!("service `{}` is listed twice", svc.name),
            ));
        }
        if svc.destinations.is_empty() {
            return Err(invalid(
                0,
                0,
                format!("services[{i}].destinations"),
                "names no destination".into(),
            ));
        }
        for (j, d) in svc.destinations.iter().enumerate() {
            if !dests.insert(d.0.clone()) {
                return Err(invalid(
                    0,
                    0,
                    format!("services[{i}].destinations[{j}]"),
                    format!("destination {} belongs to another service already", d.0),
                ));
            }
        }
        let mut endpoints = Vec::with_capacity(svc.endpoints.len());
        for (j, e) in svc.endpoints.into_iter().enumerate() {
            let Some(id) = e.identity.or_else(|| svc.identity.clone()) else {
                return Err(invalid(
                    0,
                    0,
                    format!("services[{i}].endpoints[{j}].identity"),
                    "missing (and the service has no `identity`): every endpoint needs the SPIFFE ID its server must present".into(),
                ));
            };
            if endpoints.iter().any(|x: &Endpoint| x.addr == e.address) {
                return Err(invalid(
                    0,
                    0,
                    format!("services[{i}].endpoints[{j}].address"),
                    format!("{} is listed twice", e.address),
                ));
            }
            state.pods.push((
                e.address.ip(),
                PodAddr {
                    identity: EndpointIdentity::Id(id.clone()),
                    owner: svc.name.clone(),
                },
            ));
            endpoints.push(Endpoint {
                addr: e.address,
                identity: EndpointIdentity::Id(id),
                owner: None,
            });
        }
        state.services.push((
            svc.destinations.into_iter().map(|d| d.0).collect(),
            Service {
                name: svc.name,
                source: SourceKind::File,
                endpoints,
                missing: None,
            },
        ));
    }
    Ok(state)
}

/// Reads the file at `path`, publishes it (an unusable file is an error:
/// at start there is no last good version to keep), and returns the
/// worker that polls it every `interval` and publishes each new version
/// that loads.
pub fn start(
    path: PathBuf,
    publisher: Publisher,
    interval: Duration,
) -> Result<impl std::future::Future<Output = ()>, FileError> {
    let bytes = std::fs::read(&path).map_err(|source| FileError::Read {
        path: path.clone(),
        source,
    })?;
    let state = parse(&path, &String::from_utf8_lossy(&bytes))?;
    publisher.publish(state);
    crate::metrics::source_update(SourceKind::File, true);
    Ok(watch(path, bytes, publisher, interval))
}

async fn watch(path: PathBuf, last: Vec<u8>, publisher: Publisher, interval: Duration) {
    let mut last = Some(last);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let now = match tokio::fs::read(&path).await {
            Ok(b) => b,
            Err(e) => {
                if last.is_some() {
                    tracing::warn!(file = %path.display(), error = %e, "endpoints file unreadable; keeping the last good version");
                    crate::metrics::source_update(SourceKind::File, false);
                    last = None;
                }
                continue;
            }
        };
        if last.as_deref() == Some(&now[..]) {
            continue;
        }
        last = Some(now.clone());
        let text = String::from_utf8_lossy(&now);
        match parse(&path, &text) {
            Ok(state) => {
                tracing::info!(file = %path.display(), services = state.services.len(), "endpoints file reloaded");
                crate::metrics::source_update(SourceKind::File, true);
                publisher.publish(state);
            }
            Err(e) => {
                tracing::warn!(error = %e, "endpoints file rejected; keeping the last good version");
                crate::metrics::source_update(SourceKind::File, false);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Lookup;
    use crate::registry::{Registry, Resolved};

    const GOOD: &str = "services:
  - name: backend
    destinations: [\"10.96.0.10:80\", \"backend.example:80\"]
    identity: spiffe://example.org/backend
    endpoints:
      - address: 10.0.1.5:8080
      - address: 10.0.1.6:8080
        identity: spiffe://example.org/canary
";

    fn err(text: &str) -> String {
        parse(Path::new("eps.yaml"), text).unwrap_err().to_string()
    }

    #[test]
    fn a_good_file_gives_services_destinations_and_pods() {
        let s = parse(Path::new("eps.yaml"), GOOD).unwrap();
        let snap = crate::model::Snapshot::merge([&s], 1);
        let Lookup::Service(svc) = snap.lookup("10.96.0.10:80".parse().unwrap()) else {
            panic!()
        };
        assert_eq!(svc.endpoints.len(), 2);
        assert_eq!(
            svc.endpoints[1].identity.id().unwrap().as_str(),
            "spiffe://example.org/canary"
        );
        assert!(matches!(
            snap.lookup_dest(&"backend.example:80".parse().unwrap(), None),
            Lookup::Service(_)
        ));
        let Lookup::Pod(p) = snap.lookup("10.0.1.5:8080".parse().unwrap()) else {
            panic!()
        };
        assert_eq!(
            p.identity.id().unwrap().as_str(),
            "spiffe://example.org/backend"
        );
    }

    #[test]
    fn errors_name_the_file_line_column_and_field() {
        let bad_id = GOOD.replace("spiffe://example.org/canary", "http://nope");
        let e = err(&bad_id);
        assert!(
            e.starts_with(
                "eps.yaml:7:9: field `services[0].endpoints[1].identity`: SPIFFE ID must start"
            ),
            "{e}"
        );
        let e = err(&GOOD.replace("10.0.1.6:8080", "10.0.1.6"));
        assert!(
            e.starts_with("eps.yaml:7:18: field `services[0].endpoints[1].address`: invalid"),
            "{e}"
        );
        let e = err(&GOOD.replace("    identity: spiffe://example.org/backend\n", ""));
        assert!(
            e.contains("field `services[0].endpoints[0].identity`: missing"),
            "{e}"
        );
        let e = err(&GOOD.replace("destinations:", "destination:"));
        assert!(e.contains("unknown field `destination`"), "{e}");
        let twice = format!("{GOOD}{}", &GOOD["services:\n".len()..]);
        assert!(
            err(&twice).contains("`backend` is listed twice"),
            "{}",
            err(&twice)
        );
        let e = err(&GOOD.replace("backend.example:80", "10.96.0.10:80"));
        assert!(e.contains("destinations[1]"), "{e}");
    }

    #[tokio::test]
    async fn reloads_on_change_and_keeps_the_last_good_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("eps.yaml");
        std::fs::write(&path, GOOD).unwrap();
        let registry = Registry::new(Duration::from_millis(1));
        let p = registry.source(SourceKind::File);
        let mut rx = registry.subscribe();
        tokio::spawn(start(path.clone(), p, Duration::from_millis(20)).unwrap());
        let vip = "10.96.0.10:80".parse().unwrap();
        let Resolved::Service(b) = registry.lookup(vip) else {
            panic!()
        };
        assert_eq!(b.endpoints().len(), 2);
        // A broken version is refused; the service keeps its endpoints.
        std::fs::write(&path, GOOD.replace("10.0.1.6:8080", "nope")).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(b.endpoints().len(), 2);
        // A good one replaces it.
        std::fs::write(&path, GOOD.replace("      - address: 10.0.1.5:8080\n", "")).unwrap();
        tokio::time::timeout(Duration::from_secs(5), async {
            while b.endpoints().len() != 1 {
                rx.changed().await.unwrap();
            }
        })
        .await
        .unwrap();
    }
}
