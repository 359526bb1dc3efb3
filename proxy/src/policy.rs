//! Inbound policies that change while the sidecar runs: a cell the request
//! path reads with one atomic load, and a worker that polls the policy files
//! and swaps in each new version that loads, compiles and validates.
//!
//! A broken file never widens or narrows what is allowed: the last good
//! version stays in force, the failure is logged and counted. (At start a
//! broken file is a configuration error and the sidecar exits: fail closed.)
//!
//! With central management the policies come from a bundle poller instead
//! (the binary wires its `watch` channel to [`PolicyCell::replace_from`]).
//! Until the first bundle arrives the cell holds the local fallback, or
//! nothing: [`PolicyOrigin::Waiting`] denies every request and connection
//! and keeps the sidecar not ready.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rampart_authz::Authorizer;
use sha2::{Digest, Sha256};

use crate::metrics;

/// How often policy files are read for changes. Contents are compared, as
/// for identity files, so that a Kubernetes ConfigMap's `..data` symlink
/// swap is seen.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// One loaded version of the policies.
#[derive(Debug)]
pub struct LoadedPolicies {
    /// The compiled policies.
    pub authorizer: Authorizer,
    /// When this version was loaded.
    pub loaded_at: SystemTime,
    /// Where they came from.
    pub origin: PolicyOrigin,
}

/// Where the policies in force came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyOrigin {
    /// The configured policy files (or per-port allowlists).
    Files,
    /// The local fallback policy files, in force until the first bundle.
    Fallback,
    /// A policy bundle from the central server.
    Bundle {
        /// The bundle's `.manifest` revision (empty when it has none).
        revision: String,
        /// Whether its signature was verified.
        verified: bool,
    },
    /// No policy yet (a bundle is configured, none has arrived, and there
    /// is no fallback): everything is denied and the sidecar is not ready.
    Waiting,
}

impl PolicyOrigin {
    /// A fixed label for the admin API.
    pub fn as_str(&self) -> &'static str {
        match self {
            PolicyOrigin::Files => "files",
            PolicyOrigin::Fallback => "fallback",
            PolicyOrigin::Bundle { .. } => "bundle",
            PolicyOrigin::Waiting => "waiting_for_bundle",
        }
    }
}

/// The policies in force. Readers never block: `current` is an atomic load.
/// Live opaque connections [`subscribe`](PolicyCell::subscribe) to hear of
/// each replacement, and are decided again then (`authz::Standing`).
#[derive(Debug)]
pub struct PolicyCell {
    inner: ArcSwap<LoadedPolicies>,
    /// Counts replacements.
    generation: tokio::sync::watch::Sender<u64>,
}

impl PolicyCell {
    /// A cell holding `authorizer` from the policy files, loaded now.
    pub fn new(authorizer: Authorizer) -> Self {
        PolicyCell::with_origin(authorizer, PolicyOrigin::Files)
    }

    /// A cell holding `authorizer` from `origin`, loaded now.
    pub fn with_origin(authorizer: Authorizer, origin: PolicyOrigin) -> Self {
        PolicyCell {
            inner: ArcSwap::from_pointee(LoadedPolicies {
                authorizer,
                loaded_at: SystemTime::now(),
                origin,
            }),
            generation: tokio::sync::watch::Sender::new(0),
        }
    }

    /// A cell with no policy yet: it denies everything (an empty policy
    /// set with the deny default) until [`PolicyCell::replace_from`].
    pub fn waiting() -> Self {
        PolicyCell::with_origin(Authorizer::default(), PolicyOrigin::Waiting)
    }

    /// Whether a policy is in force (readiness).
    pub fn is_in_force(&self) -> bool {
        self.inner.load().origin != PolicyOrigin::Waiting
    }

    /// The policies in force now.
    pub fn current(&self) -> Arc<LoadedPolicies> {
        self.inner.load_full()
    }

    /// Puts `authorizer` (from the policy files) in force for every later
    /// decision.
    pub fn replace(&self, authorizer: Authorizer) {
        self.replace_from(authorizer, PolicyOrigin::Files);
    }

    /// Puts `authorizer` from `origin` in force for every later decision.
    pub fn replace_from(&self, authorizer: Authorizer, origin: PolicyOrigin) {
        self.inner.store(Arc::new(LoadedPolicies {
            authorizer,
            loaded_at: SystemTime::now(),
            origin,
        }));
        self.generation.send_modify(|g| *g += 1);
    }

    /// A receiver that sees every later replacement.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }
}

impl Default for PolicyCell {
    fn default() -> Self {
        PolicyCell::new(Authorizer::default())
    }
}

/// Loads the policies from their files; an error names file, line and field.
pub type PolicyLoader = Box<dyn Fn() -> Result<Authorizer, String> + Send + Sync>;

/// Polls `files` every `interval` and reloads the policies through `load`
/// when their contents change. Runs until the task is dropped.
pub async fn watch(
    files: Vec<PathBuf>,
    interval: Duration,
    load: PolicyLoader,
    cell: Arc<PolicyCell>,
) {
    // The policy files and every Rego module and data file the policies in
    // force were compiled from (a reload may add or drop some).
    let watched = |cell: &PolicyCell| {
        let mut all = files.clone();
        for p in cell.current().authorizer.policies() {
            all.extend(p.inputs.iter().cloned());
        }
        all
    };
    let mut seen = digest(&watched(&cell));
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let now = digest(&watched(&cell));
        if now == seen {
            continue;
        }
        seen = now;
        match load() {
            Ok(a) => {
                let names: Vec<&str> = a.policies().iter().map(|p| p.name.as_str()).collect();
                tracing::info!(policies = ?names, "policies reloaded");
                cell.replace(a);
                // The new version may read other modules: watch those.
                seen = digest(&watched(&cell));
                metrics::policy_reload(metrics::ReloadResult::Ok);
            }
            Err(e) => {
                tracing::warn!(error = %e, "policy reload failed; keeping the last good version");
                metrics::policy_reload(metrics::ReloadResult::Error);
            }
        }
    }
}

/// A digest of the files' contents; unreadable files count as a distinct
/// state, so that a file coming back is reloaded.
fn digest(files: &[PathBuf]) -> [u8; 32] {
    let mut h = Sha256::new();
    for f in files {
        match std::fs::read(f) {
            Ok(b) => {
                h.update([1]);
                h.update((b.len() as u64).to_be_bytes());
                h.update(&b);
            }
            Err(e) => {
                h.update([0]);
                h.update(e.kind().to_string().as_bytes());
            }
        }
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(start_paused = true)]
    async fn reloads_on_change_and_keeps_last_good_on_error() {
        let dir = std::env::temp_dir().join(format!("rampart-policy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("p.yaml");
        std::fs::write(&file, "v1").unwrap();
        let loads = Arc::new(AtomicUsize::new(0));
        let l = loads.clone();
        let f = file.clone();
        let loader: PolicyLoader = Box::new(move || {
            l.fetch_add(1, Ordering::SeqCst);
            match std::fs::read_to_string(&f).unwrap().as_str() {
                "broken" => Err("p.yaml:1: broken".into()),
                _ => Ok(Authorizer::default()),
            }
        });
        let cell = Arc::new(PolicyCell::default());
        let first = cell.current().loaded_at;
        tokio::spawn(watch(
            vec![file.clone()],
            Duration::from_secs(1),
            loader,
            cell.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(
            loads.load(Ordering::SeqCst),
            0,
            "unchanged files are not reloaded"
        );

        std::fs::write(&file, "broken").unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        assert_eq!(
            cell.current().loaded_at,
            first,
            "broken file kept the last good"
        );

        std::fs::write(&file, "v2").unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(loads.load(Ordering::SeqCst), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
