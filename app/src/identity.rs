//! Wiring of the identity source chosen in the configuration: `files`,
//! `dev_ca` or `workload_api`. Each runs as a worker feeding the rotation
//! worker, which publishes into the [`IdentityStore`] the proxy reads.

use std::sync::Arc;
use std::time::Duration;

use rampart_identity::ca::{DevCa, DevCaSource};
use rampart_identity::files::{self, FilePaths, FileSource};
use rampart_identity::metrics::SourceKind;
use rampart_identity::rotation::{self, Rotation, UPDATE_CHANNEL, Update};
use rampart_identity::store::IdentityStore;
use rampart_identity::workload_api::{SvidSelector, WorkloadApiConfig, WorkloadApiSource};
use rampart_identity::{SpiffeId, TrustDomain};
use rampart_proxy::config::ProxyConfig;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::config::{Config, Problem, duration};

/// The environment variable SPIFFE clients "MUST fall back to" for the
/// Workload API endpoint (SPIFFE Workload Endpoint §4).
pub const ENDPOINT_ENV: &str = "SPIFFE_ENDPOINT_SOCKET";

/// `identity.workload_api`: SVIDs streamed from a SPIFFE Workload API.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadApiIdentity {
    /// Endpoint URI, `unix:///run/spire/sockets/agent.sock` or `tcp://IP:port`;
    /// when absent, the value of `SPIFFE_ENDPOINT_SOCKET` at start.
    #[serde(default)]
    pub socket: Option<String>,
    /// Use the SVID with this SPIFFE ID (default: the first one).
    #[serde(default)]
    pub spiffe_id: Option<SpiffeId>,
    /// Use the SVID with this hint (default: the first one).
    #[serde(default)]
    pub hint: Option<String>,
    /// The sidecar's trust domain. When neither this nor `spiffe_id` is set,
    /// listeners are bound only after the first SVID arrives.
    #[serde(default)]
    pub trust_domain: Option<TrustDomain>,
    /// First delay before reconnecting to the endpoint.
    #[serde(default = "d_backoff_initial", with = "duration")]
    pub backoff_initial: Duration,
    /// Longest delay before reconnecting (1 s: a returned agent is used
    /// within a second).
    #[serde(default = "d_backoff_max", with = "duration")]
    pub backoff_max: Duration,
}

impl Default for WorkloadApiIdentity {
    /// The endpoint from `SPIFFE_ENDPOINT_SOCKET`, the first SVID.
    fn default() -> Self {
        WorkloadApiIdentity {
            socket: None,
            spiffe_id: None,
            hint: None,
            trust_domain: None,
            backoff_initial: d_backoff_initial(),
            backoff_max: d_backoff_max(),
        }
    }
}

fn d_backoff_initial() -> Duration {
    Duration::from_millis(200)
}
/// A returned agent is used within a second (issue 19, item 12): the agent
/// is local (a Unix socket), so a retry a second costs nothing, and every
/// second without it is a second of refused connections once the SVID has
/// expired.
fn d_backoff_max() -> Duration {
    Duration::from_secs(1)
}

impl WorkloadApiIdentity {
    /// Fills `socket` from `SPIFFE_ENDPOINT_SOCKET` when the file leaves it
    /// out: the only environment read of the configuration, and logged with
    /// it. A problem when neither gives one; [`Self::validate`] checks the value.
    pub(crate) fn resolve_endpoint(&mut self) -> Option<Problem> {
        if self.socket.is_none() {
            self.socket = std::env::var(ENDPOINT_ENV).ok().filter(|s| !s.is_empty());
        }
        self.socket.is_none().then(|| {
            (
                "identity.workload_api.socket".to_owned(),
                format!("not set, and {ENDPOINT_ENV} is not set either"),
            )
        })
    }

    /// Field problems, as (field path, reason) pairs.
    pub(crate) fn validate(&self) -> Vec<Problem> {
        let mut p = Vec::new();
        if self.spiffe_id.is_some() && self.hint.is_some() {
            p.push((
                "identity.workload_api.hint".into(),
                "give `spiffe_id` or `hint`, not both".into(),
            ));
        }
        if let Some(s) = &self.socket
            && let Err(e) = check_endpoint(s)
        {
            p.push(("identity.workload_api.socket".into(), e));
        }
        if self.backoff_initial.is_zero() || self.backoff_max < self.backoff_initial {
            p.push((
                "identity.workload_api.backoff_max".into(),
                "backoff delays must be positive, max at least initial".into(),
            ));
        }
        p
    }
}

/// "unix:///absolute/path" or "tcp://IP:port" (SPIFFE Workload Endpoint §4).
fn check_endpoint(s: &str) -> Result<(), String> {
    if let Some(path) = s.strip_prefix("unix://") {
        if path.starts_with('/') && path.len() > 1 {
            return Ok(());
        }
        return Err(format!("{s:?}: a unix endpoint is unix:///absolute/path"));
    }
    if let Some(addr) = s.strip_prefix("tcp://") {
        if addr.parse::<std::net::SocketAddr>().is_ok() {
            return Ok(());
        }
        return Err(format!("{s:?}: a tcp endpoint is tcp://IP:port"));
    }
    Err(format!("{s:?}: expected unix:///path or tcp://IP:port"))
}

/// The identity source could not start.
#[derive(Debug, thiserror::Error)]
pub enum IdentityStartError {
    /// `identity.files` names files that do not hold a valid SVID and bundle.
    #[error("loading the identity files")]
    Files(#[source] rampart_identity::files::FileSourceError),
    /// `identity.dev_ca.dir` does not hold a development CA.
    #[error("loading the development CA")]
    DevCa(#[source] rampart_identity::ca::CaError),
    /// `identity.workload_api.socket` is unset and was not filled in from
    /// the environment ([`Config::load`] does that).
    #[error("no Workload API endpoint (identity.workload_api.socket)")]
    NoEndpoint,
    /// The Workload API source ended before the first SVID.
    #[error("the Workload API source stopped before the first SVID")]
    SourceStopped,
    /// The configuration names no identity source.
    #[error("no identity source configured")]
    NoSource,
}

/// Starts the configured identity source and its rotation worker; returns the
/// data plane's plan and the store it reads identities from. Files and the
/// development CA are loaded once here, so a broken file or CA fails the start.
pub async fn start(
    cfg: &Config,
    authorizer: Option<rampart_authz::Authorizer>,
) -> Result<(ProxyConfig, Arc<IdentityStore>), IdentityStartError> {
    let (tx, mut rx) = mpsc::channel(UPDATE_CHANNEL);
    let (kind, td, first) = if let Some(f) = &cfg.identity.files {
        let paths = FilePaths {
            cert: f.cert.clone(),
            key: f.key.clone(),
            bundle: f.bundle.clone(),
            federated: f
                .federated
                .iter()
                .map(|b| (b.trust_domain.clone(), b.bundle.clone()))
                .collect(),
        };
        let (svid, _) = files::load(&paths).map_err(IdentityStartError::Files)?;
        tokio::spawn(FileSource::new(paths, f.poll_interval).run(tx));
        (SourceKind::Files, svid.id().trust_domain().clone(), None)
    } else if let Some(d) = &cfg.identity.dev_ca {
        let ca = DevCa::load(&d.dir).map_err(IdentityStartError::DevCa)?;
        tokio::spawn(DevCaSource::new(Arc::new(ca), d.spiffe_id.clone(), d.ttl).run(tx));
        (SourceKind::DevCa, d.spiffe_id.trust_domain().clone(), None)
    } else if let Some(w) = &cfg.identity.workload_api {
        let select = match (&w.spiffe_id, &w.hint) {
            (Some(id), _) => SvidSelector::Id(id.clone()),
            (None, Some(h)) => SvidSelector::Hint(h.clone()),
            (None, None) => SvidSelector::First,
        };
        let source = WorkloadApiSource::new(WorkloadApiConfig {
            // Config::load filled it in or refused the file.
            endpoint: w.socket.clone().ok_or(IdentityStartError::NoEndpoint)?,
            select,
            backoff_initial: w.backoff_initial,
            backoff_max: w.backoff_max,
        });
        tokio::spawn(source.run(tx));
        let known = w
            .trust_domain
            .clone()
            .or_else(|| w.spiffe_id.as_ref().map(|id| id.trust_domain().clone()));
        match known {
            Some(td) => (SourceKind::WorkloadApi, td, None),
            None => {
                tracing::info!("waiting for the first SVID to learn the trust domain");
                let first = loop {
                    match rx.recv().await {
                        Some(Update::Identity(id)) => break id,
                        Some(Update::Revoked) => continue,
                        None => return Err(IdentityStartError::SourceStopped),
                    }
                };
                let td = first.svid.id().trust_domain().clone();
                (SourceKind::WorkloadApi, td, Some(Update::Identity(first)))
            }
        }
    } else {
        return Err(IdentityStartError::NoSource);
    };
    let plan = cfg.proxy_config(td, authorizer);
    let store = Arc::new(IdentityStore::new(plan.tls_spec()));
    let worker = Rotation::new(store.clone(), kind, rotation::system_clock());
    tokio::spawn(worker.run_after(first, rx));
    Ok((plan, store))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTENERS: &str = "listeners:\n  - {name: in, direction: inbound, listen: 127.0.0.1:1, target: 127.0.0.1:2}\n";

    fn parse(identity: &str) -> Result<Config, crate::config::ConfigError> {
        Config::parse("t.yaml", &format!("identity:\n{identity}{LISTENERS}"))
    }

    /// Item 12: with the defaults, no reconnection waits more than 1 s,
    /// however long the agent was away.
    #[test]
    fn a_returned_agent_is_retried_within_a_second_by_default() {
        let w = WorkloadApiIdentity::default();
        let mut b = rampart_identity::rotation::Backoff::new(w.backoff_initial, w.backoff_max);
        for _ in 0..64 {
            assert!(b.next_delay() <= Duration::from_secs(1));
        }
    }

    #[test]
    fn workload_api_fields_and_defaults() {
        let c = parse(
            "  workload_api:\n    socket: unix:///run/spire/sockets/agent.sock\n    spiffe_id: spiffe://example.org/web\n",
        )
        .unwrap();
        let w = c.identity.workload_api.unwrap();
        assert_eq!(
            w.socket.as_deref(),
            Some("unix:///run/spire/sockets/agent.sock")
        );
        assert_eq!(w.spiffe_id.unwrap().as_str(), "spiffe://example.org/web");
        assert_eq!(w.backoff_initial, Duration::from_millis(200));
        assert_eq!(w.backoff_max, Duration::from_secs(1));
    }

    #[test]
    fn workload_api_problems_name_their_field() {
        for (identity, field) in [
            (
                "  workload_api: {socket: unix:///s, spiffe_id: spiffe://e.org/a, hint: x}\n",
                "identity.workload_api.hint",
            ),
            (
                "  workload_api: {socket: unix://relative}\n",
                "identity.workload_api.socket",
            ),
            (
                "  workload_api: {socket: tcp://localhost:80}\n",
                "identity.workload_api.socket",
            ),
            (
                "  workload_api: {socket: unix:///s, backoff_initial: 2s, backoff_max: 1s}\n",
                "identity.workload_api.backoff_max",
            ),
            (
                "  workload_api: {socket: unix:///s}\n  dev_ca: {dir: d, spiffe_id: spiffe://e.org/a}\n",
                "identity",
            ),
        ] {
            let e = parse(identity).unwrap_err().to_string();
            assert!(e.contains(&format!("field `{field}`")), "{identity}: {e}");
        }
    }

    #[test]
    fn endpoints() {
        assert!(check_endpoint("unix:///run/spire/sockets/agent.sock").is_ok());
        assert!(check_endpoint("tcp://127.0.0.1:8000").is_ok());
        // "tcp://127.0.0.1:8000/foo" is invalid (SPIFFE Workload Endpoint §4).
        assert!(check_endpoint("tcp://127.0.0.1:8000/foo").is_err());
        assert!(check_endpoint("unix:/x").is_err());
        assert!(check_endpoint("/run/agent.sock").is_err());
    }
}
