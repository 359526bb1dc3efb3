//! Istio's security resources read from the Kubernetes API
//! (`inbound.istio.kubernetes`): `AuthorizationPolicy`,
//! `PeerAuthentication` and `RequestAuthentication` of
//! `security.istio.io` (`v1`, else `v1beta1` where a cluster serves only
//! that) in the workload's namespace and in Istio's root namespace.
//!
//! One list+watch per kind and namespace (six at most): list, watch from
//! the list's resource version, list again on 410 Gone, after an error
//! (with backoff) and every `resync`. Once every watch has listed, and
//! after every change, the objects are compiled together with the
//! `inbound.istio.files` (and `inbound.policies`, polled here rather than
//! by the file watcher, so that one worker orders every version) by the
//! same loader a file reload uses ([`Config::authorizer`], which reads
//! [`ApiObjects`]), off the runtime and within `inbound.policy_budget`,
//! and the result replaces the
//! policies in force ([`PolicyCell::replace`]); live connections are then
//! decided again, as after a file reload.
//!
//! A resource that does not load is refused by name (logged, counted in
//! `rampart_istio_resources_refused_total`), and the set it belongs to is
//! not put in force: the last good set stays, whole, so that a broken
//! resource can neither widen nor narrow what is allowed (nor can the
//! rest of an edit made together with it). A refused resource that cannot
//! attach to this workload (a readable selector that does not match its
//! labels, or `targetRefs`) is left out instead, since without it the
//! workload's decisions are the same. Until a first set loads nothing is
//! in force: every request and connection is denied and the sidecar is
//! not ready (docs/policy.md, "Istio resources from the Kubernetes API").

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::StreamExt;
use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, ListParams, WatchEvent, WatchParams};
use rampart_proxy::policy::{LoadRefused, PolicyCell};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::config::{Config, IstioConfig};

/// `inbound.istio.kubernetes`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IstioKubernetes {
    /// A kubeconfig file; none: the pod's service account (in-cluster:
    /// `KUBERNETES_SERVICE_HOST`/`_PORT` and the mounted token and CA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<PathBuf>,
    /// How often every watch lists again from scratch (`5m`).
    #[serde(default = "d_resync", with = "rampart_proxy::config::duration")]
    pub resync: Duration,
}

impl Default for IstioKubernetes {
    fn default() -> Self {
        IstioKubernetes {
            kubeconfig: None,
            resync: d_resync(),
        }
    }
}

fn d_resync() -> Duration {
    Duration::from_secs(300)
}

impl IstioKubernetes {
    /// Every problem, as (field path, reason).
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        if self.resync < Duration::from_secs(1) {
            p.push((
                "inbound.istio.kubernetes.resync".into(),
                "must be at least 1s".into(),
            ));
        }
        if let Some(path) = &self.kubeconfig
            && let Err(e) = rampart_discovery::kubernetes::check_kubeconfig(path)
        {
            p.push((
                "inbound.istio.kubernetes.kubeconfig".into(),
                format!("{}: {e}", path.display()),
            ));
        }
        p
    }
}

/// The resources read from the API that the loader compiles with the
/// files: `(origin, YAML)`, the origin naming the resource in errors.
#[derive(Debug, Default)]
pub struct ApiObjects {
    objects: ArcSwap<Vec<(String, String)>>,
    synced: AtomicBool,
}

impl ApiObjects {
    /// The objects of the set in force (empty before the first).
    pub fn current(&self) -> Arc<Vec<(String, String)>> {
        self.objects.load_full()
    }

    /// Whether a set from the API has been put in force.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::SeqCst)
    }

    fn holding(objects: Vec<(String, String)>) -> ApiObjects {
        ApiObjects {
            objects: ArcSwap::from_pointee(objects),
            synced: AtomicBool::new(true),
        }
    }

    fn put_in_force(&self, objects: Vec<(String, String)>) {
        self.objects.store(Arc::new(objects));
        self.synced.store(true, Ordering::SeqCst);
    }
}

/// The three kinds read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IstioKind {
    /// `AuthorizationPolicy`.
    AuthorizationPolicy,
    /// `PeerAuthentication`.
    PeerAuthentication,
    /// `RequestAuthentication`.
    RequestAuthentication,
}

impl IstioKind {
    /// Every kind.
    pub const ALL: [IstioKind; 3] = [
        IstioKind::AuthorizationPolicy,
        IstioKind::PeerAuthentication,
        IstioKind::RequestAuthentication,
    ];

    /// Its `kind`, also the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            IstioKind::AuthorizationPolicy => "AuthorizationPolicy",
            IstioKind::PeerAuthentication => "PeerAuthentication",
            IstioKind::RequestAuthentication => "RequestAuthentication",
        }
    }

    /// Its resource name in the API.
    pub fn plural(self) -> &'static str {
        match self {
            IstioKind::AuthorizationPolicy => "authorizationpolicies",
            IstioKind::PeerAuthentication => "peerauthentications",
            IstioKind::RequestAuthentication => "requestauthentications",
        }
    }

    fn resource(self, version: &str) -> ApiResource {
        ApiResource {
            group: GROUP.into(),
            version: version.into(),
            api_version: format!("{GROUP}/{version}"),
            kind: self.as_str().into(),
            plural: self.plural().into(),
        }
    }

    fn of_origin(origin: &str) -> Option<IstioKind> {
        let kind = origin.split(' ').next()?;
        IstioKind::ALL.into_iter().find(|k| k.as_str() == kind)
    }
}

/// Istio's security API group.
pub const GROUP: &str = "security.istio.io";
/// The versions read, preferred first.
pub const VERSIONS: [&str; 2] = ["v1", "v1beta1"];

/// Starts the worker for `cfg` (which has `inbound.istio.kubernetes`): it
/// follows the resources and replaces the policies in `cell` until the
/// runtime stops.
pub fn spawn(cfg: Config, cell: Arc<PolicyCell>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run(cfg, cell))
}

/// How often a client that could not be built is tried again.
const CLIENT_RETRY: Duration = Duration::from_secs(5);
/// The longest a single watch request stays open.
const WATCH_TIMEOUT_S: u32 = 290;
/// The first wait after a failed list or watch; doubles up to [`BACKOFF_MAX`].
const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// The longest wait between two attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Watch events waiting for the worker, at most.
const EVENT_QUEUE: usize = 64;

/// One watch: a kind in a namespace.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct WatchKey {
    kind: IstioKind,
    ns: String,
}

/// What a watch reports.
enum Event {
    /// The whole state of a watch (a list), by object name.
    Listed(WatchKey, BTreeMap<String, String>),
    /// An object added or changed.
    Applied(WatchKey, String, String),
    /// An object deleted.
    Deleted(WatchKey, String),
}

async fn run(cfg: Config, cell: Arc<PolicyCell>) {
    let Some(istio) = cfg.inbound.istio.clone() else {
        return;
    };
    let Some(k) = istio.kubernetes.clone() else {
        return;
    };
    let client = loop {
        match client(&k) {
            Ok(c) => break c,
            Err(e) => {
                tracing::warn!(error = %e, retry = ?CLIENT_RETRY, "no Kubernetes client for the Istio resources; nothing is in force meanwhile");
                tokio::time::sleep(CLIENT_RETRY).await;
            }
        }
    };
    let mut namespaces = vec![istio.namespace.clone()];
    if istio.root_namespace != istio.namespace {
        namespaces.push(istio.root_namespace.clone());
    }
    // Bounded: a burst of events waits in the watches (the API server
    // holds them) while a set compiles.
    let (tx, mut rx) = mpsc::channel(EVENT_QUEUE);
    let mut keys = BTreeSet::new();
    for ns in &namespaces {
        for kind in IstioKind::ALL {
            let key = WatchKey {
                kind,
                ns: ns.clone(),
            };
            keys.insert(key.clone());
            tokio::spawn(follow(client.clone(), key, k.resync, tx.clone()));
        }
    }
    drop(tx);
    let mut worker = Worker {
        cfg,
        istio,
        cell,
        state: BTreeMap::new(),
        listed: BTreeSet::new(),
        last_attempt: None,
        reported: BTreeMap::new(),
        jwks_fetched: HashSet::new(),
    };
    // The files are polled here too (not by the file watcher), so that
    // one worker puts every set in force, in order.
    let mut tick = tokio::time::interval(rampart_proxy::policy::DEFAULT_POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            ev = rx.recv() => match ev {
                Some(ev) => {
                    worker.event(ev);
                    while let Ok(ev) = rx.try_recv() {
                        worker.event(ev);
                    }
                }
                None => return,
            },
            _ = tick.tick() => {}
        }
        if worker.listed.len() == keys.len() {
            worker.settle().await;
        }
    }
}

/// The contents of the files the policies in force were compiled from
/// (`None`: unreadable), to see a change.
type FileContents = Vec<(PathBuf, Option<Vec<u8>>)>;

async fn read_sources(cfg: &Config, cell: &PolicyCell) -> FileContents {
    let files = rampart_proxy::policy::sources(&cfg.policy_files(), &cell.current().authorizer);
    tokio::task::spawn_blocking(move || {
        files
            .into_iter()
            .map(|f| {
                let bytes = std::fs::read(&f).ok();
                (f, bytes)
            })
            .collect()
    })
    .await
    .unwrap_or_default()
}

struct Worker {
    cfg: Config,
    istio: IstioConfig,
    cell: Arc<PolicyCell>,
    /// Every object, by watch and name: its origin and YAML.
    state: BTreeMap<WatchKey, BTreeMap<String, String>>,
    listed: BTreeSet<WatchKey>,
    /// The objects and files last compiled (the same again is not
    /// recompiled).
    last_attempt: Option<(Vec<(String, String)>, FileContents)>,
    /// The refused version of each resource already reported.
    reported: BTreeMap<String, String>,
    jwks_fetched: HashSet<String>,
}

/// What one compile of the objects gave.
struct Outcome {
    /// The set put in force, with the objects it holds.
    applied: Option<(rampart_authz::Authorizer, Vec<(String, String)>)>,
    /// The resources that do not load, one by one.
    refused: Vec<Refusal>,
    /// Why the set was not put in force.
    error: Option<String>,
}

struct Refusal {
    origin: String,
    text: String,
    message: String,
    attaches: bool,
}

impl Worker {
    fn event(&mut self, ev: Event) {
        match ev {
            Event::Listed(key, objects) => {
                self.listed.insert(key.clone());
                self.state.insert(key, objects);
            }
            Event::Applied(key, name, text) => {
                self.state.entry(key).or_default().insert(name, text);
            }
            Event::Deleted(key, name) => {
                if let Some(m) = self.state.get_mut(&key) {
                    m.remove(&name);
                }
            }
        }
    }

    /// Compiles the objects and files if they changed, and puts the set
    /// in force when it loads.
    async fn settle(&mut self) {
        let objects: Vec<(String, String)> = self
            .state
            .iter()
            .flat_map(|(key, m)| {
                m.iter()
                    .map(move |(name, text)| (origin(key, name), text.clone()))
            })
            .collect();
        let contents = read_sources(&self.cfg, &self.cell).await;
        let attempt = (objects, contents);
        if self.last_attempt.as_ref() == Some(&attempt) {
            return;
        }
        self.last_attempt = Some(attempt.clone());
        let (objects, contents) = attempt;
        let budget = self.cfg.inbound.policy_budget;
        let bytes: u64 = objects.iter().map(|(_, t)| t.len() as u64).sum::<u64>()
            + contents
                .iter()
                .map(|(_, c)| c.as_ref().map_or(0, |c| c.len() as u64))
                .sum::<u64>();
        let outcome = if bytes > budget.max_bytes {
            Err(LoadRefused::OverSize {
                bytes,
                limit: budget.max_bytes,
                files: "Istio resources from the Kubernetes API, with the policy files".into(),
            })
        } else {
            let cfg = self.cfg.clone();
            let files = self.cfg.policy_files();
            tokio::task::spawn_blocking(move || {
                rampart_proxy::policy::compile_within(&budget, &files, move || {
                    Ok(decide(&cfg, objects))
                })
            })
            .await
            .unwrap_or_else(|e| Err(LoadRefused::Invalid(format!("the compile failed: {e}"))))
        };
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(error = %e, in_force = self.in_force(), "Istio resources from the Kubernetes API not put in force; keeping the last good set");
                rampart_proxy::metrics::policy_reload(e.result());
                return;
            }
        };
        // Forget what is no longer refused, so that breaking it again is
        // reported again.
        self.reported
            .retain(|o, _| outcome.refused.iter().any(|r| &r.origin == o));
        for r in &outcome.refused {
            if self.reported.get(&r.origin) == Some(&r.text) {
                continue;
            }
            self.reported.insert(r.origin.clone(), r.text.clone());
            tracing::warn!(resource = %r.origin, attaches = r.attaches, error = %r.message, "Istio resource refused");
            if let Some(kind) = IstioKind::of_origin(&r.origin) {
                crate::metrics::istio_resource_refused(kind);
            }
        }
        match outcome.applied {
            Some((authorizer, objects)) => {
                let uris: Vec<String> = authorizer
                    .istio()
                    .map(|i| i.jwks_uris().to_vec())
                    .unwrap_or_default();
                let names: Vec<&str> = objects.iter().map(|(o, _)| o.as_str()).collect();
                tracing::info!(resources = ?names, "Istio resources from the Kubernetes API in force");
                self.istio.api_objects.put_in_force(objects);
                self.cell
                    .replace_from(authorizer, rampart_proxy::policy::PolicyOrigin::Kubernetes);
                rampart_proxy::metrics::policy_reload(rampart_proxy::metrics::ReloadResult::Ok);
                self.fetch_jwks(uris);
            }
            None => {
                let error = outcome.error.unwrap_or_default();
                if self.in_force() {
                    tracing::warn!(error = %error, "Istio resources from the Kubernetes API (with the policy files) refused; keeping the last good set");
                } else {
                    tracing::warn!(error = %error, "Istio resources from the Kubernetes API (with the policy files) refused; no set is in force yet: every request is denied and the sidecar is not ready");
                }
                rampart_proxy::metrics::policy_reload(rampart_proxy::metrics::ReloadResult::Error);
            }
        }
    }

    fn in_force(&self) -> bool {
        self.istio.api_objects.is_synced()
    }

    /// Starts fetching the `http(s)://` JWKS of newly attached
    /// RequestAuthentications.
    fn fetch_jwks(&mut self, uris: Vec<String>) {
        let new: Vec<String> = uris
            .into_iter()
            .filter(|u| self.jwks_fetched.insert(u.clone()))
            .collect();
        if new.is_empty() {
            return;
        }
        match crate::run::jwks_tls(&self.cfg, &new) {
            Ok(tls) => {
                rampart_central::jwks::spawn(
                    new,
                    self.istio.jwks_cache.clone(),
                    rampart_central::jwks::DEFAULT_REFRESH,
                    tls,
                );
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot fetch the JWKS of a RequestAuthentication; its tokens are refused");
            }
        }
    }
}

/// Compiles `objects` as one set with the files; when that fails, finds
/// the resources that do not load alone and, if none of them can attach
/// to this workload, the set without them.
fn decide(cfg: &Config, objects: Vec<(String, String)>) -> Outcome {
    let attempt = |objs: Vec<(String, String)>| {
        let mut c = cfg.clone();
        if let Some(i) = c.inbound.istio.as_mut() {
            i.api_objects = Arc::new(ApiObjects::holding(objs.clone()));
        }
        c.authorizer().map(|a| (a, objs)).map_err(|e| e.to_string())
    };
    let set_error = match attempt(objects.clone()) {
        Ok(applied) => {
            return Outcome {
                applied: Some(applied),
                refused: Vec::new(),
                error: None,
            };
        }
        Err(e) => e,
    };
    let Some(istio) = cfg.inbound.istio.as_ref() else {
        return Outcome {
            applied: None,
            refused: Vec::new(),
            error: Some(set_error),
        };
    };
    let workload = istio.workload(cfg);
    let refused: Vec<Refusal> = objects
        .iter()
        .filter_map(|(origin, text)| {
            let e = cfg
                .istio_set(istio, &[], &[(origin.clone(), text.clone())])
                .err()?;
            Some(Refusal {
                origin: origin.clone(),
                text: text.clone(),
                message: e.to_string().replace('\n', "; "),
                attaches: may_attach(text, &workload.labels),
            })
        })
        .collect();
    if refused.is_empty() || refused.iter().any(|r| r.attaches) {
        return Outcome {
            applied: None,
            refused,
            error: Some(set_error),
        };
    }
    let rest: Vec<(String, String)> = objects
        .into_iter()
        .filter(|(o, _)| !refused.iter().any(|r| &r.origin == o))
        .collect();
    match attempt(rest) {
        Ok(applied) => Outcome {
            applied: Some(applied),
            refused,
            error: None,
        },
        Err(e) => Outcome {
            applied: None,
            refused,
            error: Some(e),
        },
    }
}

/// Whether a resource may attach to a workload with `labels`: `false` only
/// when it certainly cannot (`targetRefs`, or a readable
/// `selector.matchLabels` that the labels do not satisfy). The namespace
/// always fits: only the workload's and the root namespace are read.
fn may_attach(text: &str, labels: &BTreeMap<String, String>) -> bool {
    let Ok(doc) = serde_yaml::from_str::<serde_yaml::Value>(text) else {
        return true;
    };
    let spec = &doc["spec"];
    let has_targets = !spec["targetRef"].is_null()
        || spec["targetRefs"]
            .as_sequence()
            .is_some_and(|s| !s.is_empty());
    if has_targets {
        return false;
    }
    let selector = &spec["selector"];
    if selector.is_null() {
        return true;
    }
    let Some(wanted) = selector["matchLabels"].as_mapping() else {
        return true;
    };
    let mut all_match = true;
    for (k, v) in wanted {
        let (Some(k), Some(v)) = (k.as_str(), v.as_str()) else {
            return true;
        };
        all_match &= labels.get(k).map(String::as_str) == Some(v);
    }
    all_match
}

/// How a resource is named in logs and errors.
fn origin(key: &WatchKey, name: &str) -> String {
    format!("{} {}/{name} (Kubernetes API)", key.kind.as_str(), key.ns)
}

/// The client the configuration says to build.
fn client(k: &IstioKubernetes) -> Result<Client, String> {
    let config = match &k.kubeconfig {
        Some(path) => {
            let bad = |e: String| format!("kubeconfig {}: {e}", path.display());
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| bad(e.to_string()))?;
            kube::Config::try_from(kc).map_err(|e| bad(e.to_string()))?
        }
        None => kube::Config::incluster().map_err(|e| {
            format!(
                "in-cluster configuration: {e} (give inbound.istio.kubernetes.kubeconfig outside a pod)"
            )
        })?,
    };
    Client::try_from(config).map_err(|e| e.to_string())
}

/// What the loader reads of an object: its type, name, namespace,
/// annotations and spec (not its status, resource version or managed
/// fields, so that only a real change is compiled again).
fn text_of(kind: IstioKind, version: &str, obj: &DynamicObject) -> (String, String) {
    let name = obj.metadata.name.clone().unwrap_or_default();
    let mut meta = serde_json::Map::new();
    meta.insert("name".into(), name.clone().into());
    if let Some(ns) = &obj.metadata.namespace {
        meta.insert("namespace".into(), ns.clone().into());
    }
    if let Some(a) = &obj.metadata.annotations {
        meta.insert(
            "annotations".into(),
            serde_json::to_value(a).unwrap_or_default(),
        );
    }
    let mut doc = serde_json::Map::new();
    doc.insert("apiVersion".into(), format!("{GROUP}/{version}").into());
    doc.insert("kind".into(), kind.as_str().into());
    doc.insert("metadata".into(), meta.into());
    if let Some(spec) = obj.data.get("spec") {
        doc.insert("spec".into(), spec.clone());
    }
    let text = serde_yaml::to_string(&serde_json::Value::Object(doc)).unwrap_or_default();
    (name, text)
}

/// Why a watch stopped.
enum Stop {
    /// List again (resync, 410 Gone, an error).
    Relist,
    /// The worker is gone.
    Closed,
}

/// Lists and watches one kind in one namespace until the worker is gone.
async fn follow(client: Client, key: WatchKey, resync: Duration, tx: mpsc::Sender<Event>) {
    let mut backoff = BACKOFF_BASE;
    loop {
        let mut found = None;
        let mut failed = None;
        for version in VERSIONS {
            let api: Api<DynamicObject> =
                Api::namespaced_with(client.clone(), &key.ns, &key.kind.resource(version));
            match api.list(&ListParams::default()).await {
                Ok(list) => {
                    found = Some((version, api, list));
                    break;
                }
                // This version is not served (or no Istio CRDs at all).
                Err(kube::Error::Api(s)) if s.code == 404 => continue,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = failed {
            tracing::warn!(kind = key.kind.as_str(), namespace = %key.ns, error = %e, backoff = ?backoff, "listing Istio resources failed; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
            continue;
        }
        backoff = BACKOFF_BASE;
        let Some((version, api, list)) = found else {
            // Neither version is served: there are none of this kind. Look
            // again at the next resync (the CRDs may be installed later).
            tracing::info!(kind = key.kind.as_str(), namespace = %key.ns, "security.istio.io serves no such resource; none of this kind");
            if tx
                .send(Event::Listed(key.clone(), BTreeMap::new()))
                .await
                .is_err()
            {
                return;
            }
            tokio::time::sleep(resync).await;
            continue;
        };
        let mut rv = list.metadata.resource_version.clone().unwrap_or_default();
        let objects = list
            .items
            .iter()
            .map(|o| text_of(key.kind, version, o))
            .collect();
        if tx.send(Event::Listed(key.clone(), objects)).await.is_err() {
            return;
        }
        let until = tokio::time::Instant::now() + resync;
        match watch(&api, &key, version, &mut rv, until, &tx).await {
            Stop::Closed => return,
            Stop::Relist => {}
        }
    }
}

/// Watches from `rv` until `until`, reconnecting when a watch request
/// ends.
async fn watch(
    api: &Api<DynamicObject>,
    key: &WatchKey,
    version: &str,
    rv: &mut String,
    until: tokio::time::Instant,
    tx: &mpsc::Sender<Event>,
) -> Stop {
    loop {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return Stop::Relist;
        }
        let wp = WatchParams {
            timeout: Some((left.as_secs() as u32).clamp(1, WATCH_TIMEOUT_S)),
            bookmarks: true,
            ..WatchParams::default()
        };
        let mut stream = match api.watch(&wp, rv).await {
            Ok(s) => s.boxed(),
            Err(kube::Error::Api(s)) if s.code == 410 => return Stop::Relist,
            Err(e) => {
                tracing::warn!(kind = key.kind.as_str(), namespace = %key.ns, error = %e, "watching Istio resources failed; listing again");
                tokio::time::sleep(BACKOFF_BASE).await;
                return Stop::Relist;
            }
        };
        loop {
            let ev = tokio::select! {
                ev = stream.next() => ev,
                _ = tokio::time::sleep_until(until) => return Stop::Relist,
            };
            let sent = match ev {
                None => break,
                Some(Ok(WatchEvent::Added(o) | WatchEvent::Modified(o))) => {
                    if let Some(v) = &o.metadata.resource_version {
                        rv.clone_from(v);
                    }
                    let (name, text) = text_of(key.kind, version, &o);
                    tx.send(Event::Applied(key.clone(), name, text)).await
                }
                Some(Ok(WatchEvent::Deleted(o))) => {
                    if let Some(v) = &o.metadata.resource_version {
                        rv.clone_from(v);
                    }
                    let name = o.metadata.name.clone().unwrap_or_default();
                    tx.send(Event::Deleted(key.clone(), name)).await
                }
                Some(Ok(WatchEvent::Bookmark(b))) => {
                    rv.clone_from(&b.metadata.resource_version);
                    Ok(())
                }
                Some(Ok(WatchEvent::Error(s))) if s.code == 410 => return Stop::Relist,
                Some(Ok(WatchEvent::Error(s))) => {
                    tracing::warn!(kind = key.kind.as_str(), namespace = %key.ns, error = %s.message, "Istio resource watch error; listing again");
                    return Stop::Relist;
                }
                Some(Err(e)) => {
                    tracing::warn!(kind = key.kind.as_str(), namespace = %key.ns, error = %e, "Istio resource watch failed; listing again");
                    return Stop::Relist;
                }
            };
            if sent.is_err() {
                return Stop::Closed;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> BTreeMap<String, String> {
        [("app".to_owned(), "httpbin".to_owned())].into()
    }

    #[test]
    fn a_resource_attaches_unless_its_selector_or_targets_say_it_cannot() {
        let cases = [
            ("spec: {}", true),
            ("spec: {selector: {matchLabels: {app: httpbin}}}", true),
            ("spec: {selector: {matchLabels: {app: other}}}", false),
            (
                "spec: {selector: {matchLabels: {app: [not, a, string]}}}",
                true,
            ),
            ("spec: {selector: 3}", true),
            ("spec: {targetRefs: [{kind: Gateway, name: gw}]}", false),
            ("spec: {targetRef: {kind: Gateway, name: gw}}", false),
            ("spec: [", true),
        ];
        for (text, want) in cases {
            assert_eq!(may_attach(text, &labels()), want, "{text}");
        }
    }

    #[test]
    fn the_kubernetes_section_is_validated() {
        let k = IstioKubernetes {
            kubeconfig: Some("/nonexistent/kubeconfig".into()),
            resync: Duration::from_millis(10),
        };
        let fields: Vec<String> = k.validate().into_iter().map(|(f, _)| f).collect();
        assert_eq!(
            fields,
            [
                "inbound.istio.kubernetes.resync",
                "inbound.istio.kubernetes.kubeconfig"
            ]
        );
    }

    #[test]
    fn a_refused_resource_is_named_and_one_that_cannot_attach_is_left_out() {
        let mut cfg = Config::new(crate::config::IdentityConfig::default());
        let mut istio = IstioConfig::new(Vec::new(), "foo");
        istio.labels = labels();
        istio.kubernetes = Some(IstioKubernetes::default());
        cfg.inbound.istio = Some(istio);
        let key = WatchKey {
            kind: IstioKind::AuthorizationPolicy,
            ns: "foo".into(),
        };
        let ap = |name: &str, spec: &str| {
            (
                origin(&key, name),
                format!(
                    "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: foo}}\nspec: {spec}\n"
                ),
            )
        };
        let good = ap(
            "get-only",
            "{rules: [{to: [{operation: {methods: [GET]}}]}]}",
        );
        let broken = |sel: &str| {
            ap(
                "bad",
                &format!(
                    "{{selector: {{matchLabels: {{app: {sel}}}}}, rules: [{{when: [{{key: experimental.x, values: [a]}}]}}]}}"
                ),
            )
        };
        // Broken and attached: the set is refused, naming the resource.
        let o = decide(&cfg, vec![good.clone(), broken("httpbin")]);
        assert!(o.applied.is_none());
        assert_eq!(o.refused.len(), 1);
        assert_eq!(
            o.refused[0].origin,
            "AuthorizationPolicy foo/bad (Kubernetes API)"
        );
        assert!(o.refused[0].attaches);
        assert!(
            o.refused[0].message.contains("experimental"),
            "{}",
            o.refused[0].message
        );
        // Broken for another workload: left out, the rest applies.
        let o = decide(&cfg, vec![good.clone(), broken("other")]);
        let (_, objects) = o
            .applied
            .expect("applied without the other workload's policy");
        assert_eq!(objects, vec![good.clone()]);
        assert_eq!(o.refused.len(), 1);
        // All good: applied as is.
        let o = decide(&cfg, vec![good.clone()]);
        assert!(o.refused.is_empty() && o.applied.is_some());
    }
}
