//! Inbound policies that change while the sidecar runs: a cell the request
//! path reads with one atomic load, and a worker that polls the policy files
//! and swaps in each new version that loads, compiles and validates.
//!
//! A broken file never widens or narrows what is allowed: the last good
//! version stays in force, the failure is logged and counted. (At start a
//! broken file is a configuration error and the sidecar exits: fail closed.)
//!
//! A hostile file must not hurt the data plane either (issue 19, R1): every
//! version is compiled on a thread of its own, never on the request
//! runtime, within a [`CompileBudget`] of time and source bytes
//! ([`compile_within`]). A version over budget is refused like a broken
//! one. A compile cannot be cancelled, so one over time is abandoned on its
//! thread; at most [`MAX_ABANDONED`] may run at once, after which reloads
//! are refused until one ends. (Rego modules are also checked for bracket
//! nesting before regorus parses them: `rampart_authz::rego::check_nesting`.)
//!
//! With central management the policies come from a bundle poller instead
//! (the binary wires its `watch` channel to [`PolicyCell::replace_from`]).
//! Until the first bundle arrives the cell holds the local fallback, or
//! nothing: [`PolicyOrigin::Waiting`] denies every request and connection
//! and keeps the sidecar not ready.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rampart_authz::Authorizer;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::duration;
use crate::metrics;

/// How long, and over how many source bytes, one version of the policies
/// may compile (`inbound.policy_budget`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompileBudget {
    /// Wall-clock time to load and compile every policy file, Rego module
    /// and data file of one version.
    #[serde(with = "duration")]
    pub time: Duration,
    /// Their total size, in bytes.
    pub max_bytes: u64,
}

impl Default for CompileBudget {
    fn default() -> Self {
        CompileBudget {
            // Real policy sets compile in milliseconds; the budget only has
            // to stop a file that would never finish.
            time: Duration::from_secs(5),
            max_bytes: 8 * 1024 * 1024,
        }
    }
}

pub use rampart_authz::budget::MAX_ABANDONED;

/// Why a version of the policies was not put in force.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadRefused {
    /// The files do not load (the configuration is at fault): the error
    /// names file, line and field.
    #[error("{0}")]
    Invalid(String),
    /// Compiling took longer than the budget.
    #[error(
        "compiling the policies took longer than the {budget:?} budget (inbound.policy_budget.time); files: {files}"
    )]
    OverTime {
        /// The budget.
        budget: Duration,
        /// The files compiled.
        files: String,
    },
    /// The sources are larger than the budget.
    #[error(
        "the policy sources are {bytes} bytes, over the {limit}-byte budget (inbound.policy_budget.max_bytes); files: {files}"
    )]
    OverSize {
        /// Their size.
        bytes: u64,
        /// The budget.
        limit: u64,
        /// The files.
        files: String,
    },
    /// Too many compiles over time are still running.
    #[error(
        "{MAX_ABANDONED} earlier policy compiles over budget are still running; not starting another"
    )]
    Busy,
}

impl LoadRefused {
    /// The metric label of the refusal.
    pub fn result(&self) -> metrics::ReloadResult {
        match self {
            LoadRefused::Invalid(_) => metrics::ReloadResult::Error,
            LoadRefused::OverTime { .. } | LoadRefused::OverSize { .. } | LoadRefused::Busy => {
                metrics::ReloadResult::OverBudget
            }
        }
    }
}

/// Runs `compile` on a thread of its own and waits for it at most
/// `budget.time` (blocking the caller: call it at start, or from a
/// blocking task). `files` name the sources in errors. A compile over time
/// is left to finish on its thread and its result dropped.
pub fn compile_within<T: Send + 'static>(
    budget: &CompileBudget,
    files: &[PathBuf],
    compile: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, LoadRefused> {
    use rampart_authz::budget::{BudgetExceeded, run_within};
    match run_within(budget.time, compile) {
        Ok(r) => r.map_err(LoadRefused::Invalid),
        Err(BudgetExceeded::OverTime(_)) => Err(LoadRefused::OverTime {
            budget: budget.time,
            files: names(files),
        }),
        Err(BudgetExceeded::Busy) => Err(LoadRefused::Busy),
        Err(e @ BudgetExceeded::NoThread) => Err(LoadRefused::Invalid(e.to_string())),
    }
}

/// Refuses sources larger than `budget.max_bytes` in total (by their size
/// on disk; unreadable files count as empty, and the loader reports them).
pub fn check_size(budget: &CompileBudget, files: &[PathBuf]) -> Result<(), LoadRefused> {
    let bytes: u64 = files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    if bytes > budget.max_bytes {
        return Err(LoadRefused::OverSize {
            bytes,
            limit: budget.max_bytes,
            files: names(files),
        });
    }
    Ok(())
}

/// Every source of `authorizer`: the policy files (and Istio files) given,
/// and the Rego modules and data files its policies were compiled from.
pub fn sources(files: &[PathBuf], authorizer: &Authorizer) -> Vec<PathBuf> {
    let mut all = files.to_vec();
    for p in authorizer.policies() {
        all.extend(p.inputs.iter().cloned());
    }
    all.sort();
    all.dedup();
    all
}

/// Loads one version within `budget`: the size of `files` first, then the
/// compile on its own thread, then the size of every source it read.
pub fn load_within(
    budget: &CompileBudget,
    files: &[PathBuf],
    load: &PolicyLoader,
) -> Result<Authorizer, LoadRefused> {
    check_size(budget, files)?;
    let loader = load.clone();
    let authorizer = compile_within(budget, files, move || loader())?;
    check_size(budget, &sources(files, &authorizer))?;
    Ok(authorizer)
}

fn names(files: &[PathBuf]) -> String {
    let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    names.join(", ")
}

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
    /// The policy files together with Istio resources read from the
    /// Kubernetes API (`inbound.istio.kubernetes`).
    Kubernetes,
    /// No policy yet (a bundle is configured, none has arrived, and there
    /// is no fallback): everything is denied and the sidecar is not ready.
    Waiting,
    /// No policy yet: Istio resources are read from the Kubernetes API and
    /// their first lists have not loaded. Everything is denied and the
    /// sidecar is not ready.
    WaitingForKubernetes,
}

impl PolicyOrigin {
    /// A fixed label for the admin API.
    pub fn as_str(&self) -> &'static str {
        match self {
            PolicyOrigin::Files => "files",
            PolicyOrigin::Fallback => "fallback",
            PolicyOrigin::Bundle { .. } => "bundle",
            PolicyOrigin::Kubernetes => "kubernetes",
            PolicyOrigin::Waiting => "waiting_for_bundle",
            PolicyOrigin::WaitingForKubernetes => "waiting_for_kubernetes",
        }
    }

    /// True while nothing is in force yet (everything is denied).
    pub fn is_waiting(&self) -> bool {
        matches!(
            self,
            PolicyOrigin::Waiting | PolicyOrigin::WaitingForKubernetes
        )
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
        PolicyCell::waiting_for(PolicyOrigin::Waiting)
    }

    /// As [`PolicyCell::waiting`], saying what it waits for (`origin` is
    /// one of the waiting origins).
    pub fn waiting_for(origin: PolicyOrigin) -> Self {
        debug_assert!(origin.is_waiting());
        PolicyCell::with_origin(Authorizer::default(), origin)
    }

    /// Whether a policy is in force (readiness).
    pub fn is_in_force(&self) -> bool {
        !self.inner.load().origin.is_waiting()
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
/// Called on a compile thread of its own ([`compile_within`]).
pub type PolicyLoader = Arc<dyn Fn() -> Result<Authorizer, String> + Send + Sync>;

/// Polls `files` every `interval` and reloads the policies through `load`
/// when their contents change, each version within `budget`. Runs until
/// the task is dropped. Reading and compiling happen off the runtime's
/// threads, so neither traffic nor the admin API waits for a reload.
pub async fn watch(
    files: Vec<PathBuf>,
    interval: Duration,
    budget: CompileBudget,
    load: PolicyLoader,
    cell: Arc<PolicyCell>,
) {
    // The policy files and every Rego module and data file the policies in
    // force were compiled from (a reload may add or drop some).
    let watched = |cell: &PolicyCell| sources(&files, &cell.current().authorizer);
    let digest_of = |paths: Vec<PathBuf>| async move {
        tokio::task::spawn_blocking(move || digest(&paths, budget.max_bytes))
            .await
            .unwrap_or_default()
    };
    let mut seen = digest_of(watched(&cell)).await;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let now = digest_of(watched(&cell)).await;
        if now == seen {
            continue;
        }
        seen = now;
        let (for_load, loader) = (watched(&cell), load.clone());
        let loaded = tokio::task::spawn_blocking(move || load_within(&budget, &for_load, &loader))
            .await
            .unwrap_or_else(|e| {
                Err(LoadRefused::Invalid(format!(
                    "the policy compile failed: {e}"
                )))
            });
        match loaded {
            Ok(a) => {
                let names: Vec<&str> = a.policies().iter().map(|p| p.name.as_str()).collect();
                tracing::info!(policies = ?names, "policies reloaded");
                cell.replace(a);
                // The new version may read other modules: watch those.
                seen = digest_of(watched(&cell)).await;
                metrics::policy_reload(metrics::ReloadResult::Ok);
            }
            Err(e) => {
                tracing::warn!(error = %e, files = %names(&watched(&cell)), "policy reload failed; keeping the last good version");
                metrics::policy_reload(e.result());
            }
        }
    }
}

/// The size and modification time of `f` when it is larger than
/// `max_bytes`.
fn oversized(f: &Path, max_bytes: u64) -> Option<(u64, Option<SystemTime>)> {
    let m = std::fs::metadata(f).ok()?;
    (m.len() > max_bytes).then(|| (m.len(), m.modified().ok()))
}

/// A digest of the files' contents; unreadable files count as a distinct
/// state, so that a file coming back is reloaded. A file larger than
/// `max_bytes` is not read: its size and modification time stand for it
/// (the load then refuses it as over budget).
fn digest(files: &[PathBuf], max_bytes: u64) -> [u8; 32] {
    let mut h = Sha256::new();
    for f in files {
        if let Some((len, modified)) = oversized(f, max_bytes) {
            h.update([2]);
            h.update(len.to_be_bytes());
            h.update(format!("{modified:?}").as_bytes());
            continue;
        }
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
        let loader: PolicyLoader = Arc::new(move || {
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
            CompileBudget::default(),
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

    /// A fresh directory of this test process.
    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("rampart-policy-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_compile_over_time_is_refused_at_its_budget_and_released_when_it_ends() {
        let budget = CompileBudget {
            time: Duration::from_millis(100),
            ..CompileBudget::default()
        };
        let started = std::time::Instant::now();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let r = compile_within(&budget, &[PathBuf::from("slow.rego")], move || {
            std::thread::sleep(Duration::from_millis(600));
            let _ = done_tx.send(());
            Ok(())
        });
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "the caller waited past the budget"
        );
        let Err(e) = r else {
            panic!("over time but accepted")
        };
        assert_eq!(e.result(), metrics::ReloadResult::OverBudget);
        assert!(e.to_string().contains("slow.rego"), "{e}");
        // The abandoned compile ends by itself and frees its slot.
        done_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while rampart_authz::budget::abandoned() != 0 {
            assert!(std::time::Instant::now() < deadline, "slot never released");
            std::thread::sleep(Duration::from_millis(10));
        }
        // A quick compile passes its result and its error through.
        assert_eq!(compile_within(&budget, &[], || Ok(7)), Ok(7));
        assert_eq!(
            compile_within::<()>(&budget, &[], || Err("p.yaml:1: bad".into())),
            Err(LoadRefused::Invalid("p.yaml:1: bad".into()))
        );
    }

    #[test]
    fn sources_over_the_size_budget_are_refused_before_compiling() {
        let dir = scratch("size");
        let file = dir.join("big.yaml");
        std::fs::write(&file, vec![b'#'; 2048]).unwrap();
        let budget = CompileBudget {
            max_bytes: 1024,
            ..CompileBudget::default()
        };
        let loader: PolicyLoader = Arc::new(|| panic!("compiled despite the size budget"));
        let e = load_within(&budget, std::slice::from_ref(&file), &loader).unwrap_err();
        assert!(
            matches!(
                e,
                LoadRefused::OverSize {
                    bytes: 2048,
                    limit: 1024,
                    ..
                }
            ),
            "{e}"
        );
        // The watcher does not read it either: its size stands for it.
        assert_ne!(digest(std::slice::from_ref(&file), 1024), [0; 32]);
    }

    /// A reload that never finishes compiling (R1: regorus on deeply nested
    /// brackets) leaves the runtime serving and the last good version in
    /// force; a later good edit is applied.
    #[tokio::test(flavor = "current_thread")]
    async fn a_reload_over_time_keeps_the_last_good_version_and_the_runtime_free() {
        let dir = scratch("over-time");
        let file = dir.join("p.yaml");
        std::fs::write(&file, "v1").unwrap();
        let f = file.clone();
        let loader: PolicyLoader = Arc::new(move || {
            match std::fs::read_to_string(&f).unwrap_or_default().as_str() {
                // Burns its thread well past the budget.
                "hostile" => {
                    std::thread::sleep(Duration::from_secs(3));
                    Ok(Authorizer::default())
                }
                _ => Ok(Authorizer::default()),
            }
        });
        let cell = Arc::new(PolicyCell::default());
        let mut generation = cell.subscribe();
        let budget = CompileBudget {
            time: Duration::from_millis(300),
            ..CompileBudget::default()
        };
        tokio::spawn(watch(
            vec![file.clone()],
            Duration::from_millis(50),
            budget,
            loader,
            cell.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(200)).await;
        std::fs::write(&file, "hostile").unwrap();
        // The runtime's only thread keeps ticking while the compile runs.
        let started = std::time::Instant::now();
        let mut ticks = 0;
        while started.elapsed() < Duration::from_millis(1000) {
            let before = std::time::Instant::now();
            tokio::time::sleep(Duration::from_millis(10)).await;
            assert!(
                before.elapsed() < Duration::from_millis(250),
                "the runtime stalled for {:?}",
                before.elapsed()
            );
            ticks += 1;
        }
        assert!(ticks > 20, "{ticks} ticks");
        assert_eq!(
            *generation.borrow_and_update(),
            0,
            "the hostile version was put in force"
        );
        std::fs::write(&file, "v2").unwrap();
        tokio::time::timeout(Duration::from_secs(5), generation.changed())
            .await
            .expect("the later good edit was applied")
            .unwrap();
    }
}
