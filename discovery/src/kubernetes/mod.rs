//! The Kubernetes source: Services, EndpointSlices and Pods through the
//! API server (kube's client; in-cluster service account or a kubeconfig).
//!
//! It is demand-driven, so a sidecar's memory and its load on the API
//! server follow what its app uses, not the cluster's size. Nothing is
//! watched at start. The first time the app dials an address no source
//! knows, the registry asks ([`crate::registry::Demand`]); the source lists
//! the Services whose `spec.clusterIP` is that address, then (if none) the
//! pods whose `status.podIP` is, and from then on follows what it found:
//!
//! - a Service in use: three watches, its Service object (by name), its
//!   EndpointSlices (by the `kubernetes.io/service-name` label) and the
//!   pods its selector selects (a selector-less Service: each pod its
//!   slices name), each endpoint held to the SPIFFE ID its pod's identity
//!   rules give ([`identity`]);
//! - a pod address dialled directly: one watch of the pod at that address.
//!
//! The registry waits (up to `discovery.demand_wait_ms`) until those
//! watches have listed once, so the first request already finds its
//! endpoints. Each watch lists, watches from the list's version, and lists
//! again on 410 Gone, on errors (with backoff) and every `resync_ms`
//! ([`watch`]). A Service that is deleted stops being followed.

pub mod identity;
pub mod state;
mod watch;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::networking::v1::IPAddress;
use kube::Client;
use kube::api::{Api, ListParams};
use rampart_identity::TrustDomain;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::model::Destination;
use crate::model::SourceKind;
use crate::registry::{Demand, Publisher};
use identity::{IdentityRule, IdentityRules};
use state::{Change, State, WatchKey};

/// `discovery.kubernetes`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    /// A kubeconfig file; none: the pod's service account (in-cluster:
    /// `KUBERNETES_SERVICE_HOST`/`_PORT` and the mounted token and CA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<PathBuf>,
    /// The cluster's DNS domain: a Service is also the destination
    /// `NAME.NAMESPACE.svc.DOMAIN:PORT` (and `NAME.NAMESPACE.svc:PORT`).
    #[serde(default = "d_cluster_domain")]
    pub cluster_domain: String,
    /// `{{ .ClusterName }}` in identity templates.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cluster_name: String,
    /// How a pod's SPIFFE ID is derived: the first rule whose selector
    /// matches the pod.
    #[serde(default = "identity::default_rules")]
    pub identities: Vec<IdentityRule>,
    /// How often every watch lists again from scratch.
    #[serde(default = "d_resync", with = "crate::config::duration_ms")]
    pub resync_ms: Duration,
    /// The most Services followed at once; further ones are routed by the
    /// `outbound` rules (logged, counted), so a misbehaving app cannot make
    /// the sidecar follow the whole cluster.
    #[serde(default = "d_max_services")]
    pub max_services: usize,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        KubernetesConfig {
            kubeconfig: None,
            cluster_domain: d_cluster_domain(),
            cluster_name: String::new(),
            identities: identity::default_rules(),
            resync_ms: d_resync(),
            max_services: d_max_services(),
        }
    }
}

fn d_cluster_domain() -> String {
    "cluster.local".into()
}

fn d_resync() -> Duration {
    Duration::from_secs(300)
}

fn d_max_services() -> usize {
    256
}

impl KubernetesConfig {
    /// Every problem, as (field path, reason).
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut p = identity::validate(&self.identities);
        if self.cluster_domain.is_empty()
            || format!("x.{}:1", self.cluster_domain)
                .parse::<crate::model::Destination>()
                .is_err()
        {
            p.push((
                "discovery.kubernetes.cluster_domain".into(),
                format!("`{}` is not a DNS domain", self.cluster_domain),
            ));
        }
        if self.resync_ms < Duration::from_secs(1) {
            p.push((
                "discovery.kubernetes.resync_ms".into(),
                "must be at least 1000".into(),
            ));
        }
        if self.max_services == 0 {
            p.push((
                "discovery.kubernetes.max_services".into(),
                "must be at least 1".into(),
            ));
        }
        p
    }
}

/// Reads the kubeconfig at `path` as the source will at start (a
/// configuration check: the file must exist and be a usable kubeconfig).
pub fn check_kubeconfig(path: &std::path::Path) -> Result<(), String> {
    let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| e.to_string())?;
    kube::Config::try_from(kc).map_err(|e| e.to_string())?;
    Ok(())
}

/// Why the source could not start.
#[derive(Debug, thiserror::Error)]
pub enum KubeStartError {
    /// The kubeconfig could not be read or used.
    #[error("kubeconfig {path}: {reason}")]
    Kubeconfig {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Not in a pod with a service account (and no kubeconfig given).
    #[error("in-cluster configuration: {0} (give discovery.kubernetes.kubeconfig outside a pod)")]
    InCluster(String),
    /// In a pod, but no service-account token is mounted into this
    /// container: the pod (or its ServiceAccount) says
    /// `automountServiceAccountToken: false`, or the sidecar was added
    /// without the app's token mount (docs/kubernetes.md).
    #[error(
        "in-cluster configuration: no service-account token at {}: this container mounts none \
         (automountServiceAccountToken: false on the pod or its ServiceAccount?); mount a token \
         at {SERVICE_ACCOUNT_DIR} or give discovery.kubernetes.kubeconfig",
        .0.display()
    )]
    NoServiceAccountToken(PathBuf),
    /// The client could not be built.
    #[error("Kubernetes client: {0}")]
    Client(String),
    /// The identity rules do not compile.
    #[error("discovery.kubernetes.identities: {0}")]
    Identities(String),
}

/// Where the kubelet mounts a pod's service-account token, CA and
/// namespace (the projected `kube-api-access-*` volume the ServiceAccount
/// admission plugin adds), and where in-cluster configuration reads them.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Without a kubeconfig, the source needs the in-cluster environment: the
/// API server's address (`KUBERNETES_SERVICE_HOST`) and a mounted token.
/// Checked at start: the kubelet mounts volumes before a container starts,
/// so a token missing then never comes, and a sidecar that would only warn
/// would run without discovery (routing every Service by the rules).
fn check_in_cluster(cfg: &KubernetesConfig) -> Result<(), KubeStartError> {
    if cfg.kubeconfig.is_some() {
        return Ok(());
    }
    if std::env::var_os("KUBERNETES_SERVICE_HOST").is_none() {
        return Err(KubeStartError::InCluster(
            "KUBERNETES_SERVICE_HOST is not set: not in a pod".into(),
        ));
    }
    let token = std::path::Path::new(SERVICE_ACCOUNT_DIR).join("token");
    if !token.is_file() {
        return Err(KubeStartError::NoServiceAccountToken(token));
    }
    Ok(())
}

/// How often a client that could not be built is tried again.
const CLIENT_RETRY: Duration = Duration::from_secs(5);

/// Returns the worker that answers `demands` and follows what they found,
/// publishing through `publisher`. Without a kubeconfig, the in-cluster
/// environment and token must be there at start
/// ([`KubeStartError::NoServiceAccountToken`]). The client is built by the
/// worker, and built again every few seconds while it cannot be: until then
/// every address is routed by the `outbound` rules, and the sidecar serves.
pub fn start(
    cfg: KubernetesConfig,
    trust_domain: TrustDomain,
    publisher: Publisher,
    demands: mpsc::UnboundedReceiver<Demand>,
) -> Result<impl std::future::Future<Output = ()>, KubeStartError> {
    let rules = IdentityRules::new(&cfg.identities, trust_domain, cfg.cluster_name.clone())
        .map_err(KubeStartError::Identities)?;
    check_in_cluster(&cfg)?;
    let (tx, rx) = mpsc::unbounded_channel();
    let worker = Worker {
        client: None,
        cfg,
        rules: Arc::new(rules),
        publisher,
        state: State::default(),
        watches: HashMap::new(),
        next_gen: 0,
        tx,
        pending: Vec::new(),
    };
    Ok(worker.run(demands, rx))
}

/// The client `cfg` says to build.
fn client(cfg: &KubernetesConfig) -> Result<Client, KubeStartError> {
    let config = match &cfg.kubeconfig {
        Some(path) => {
            let bad = |reason: String| KubeStartError::Kubeconfig {
                path: path.clone(),
                reason,
            };
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| bad(e.to_string()))?;
            kube::Config::try_from(kc).map_err(|e| bad(e.to_string()))?
        }
        None => kube::Config::incluster().map_err(|e| KubeStartError::InCluster(e.to_string()))?,
    };
    Client::try_from(config).map_err(|e| KubeStartError::Client(e.to_string()))
}

/// What reaches the worker.
pub(crate) enum Event {
    /// A watch reported a change.
    Watch {
        key: WatchKey,
        generation: u64,
        change: Change,
    },
    /// A first lookup finished.
    Found { demand: Demand, found: Found },
}

/// What a first lookup of an address found.
pub(crate) enum Found {
    Service {
        ns: String,
        name: String,
    },
    /// A name an explicit listener targets: the Service it names, at a port
    /// (followed whether it exists or not).
    Named {
        ns: String,
        name: String,
        port: u16,
    },
    Pod(IpAddr),
    Nothing,
    Failed(String),
}

/// A demand waiting for its watches' first lists.
enum Waiting {
    Service {
        ns: String,
        name: String,
        demand: Demand,
    },
    Pod {
        ip: IpAddr,
        demand: Demand,
    },
}

struct Worker {
    client: Option<Client>,
    cfg: KubernetesConfig,
    rules: Arc<IdentityRules>,
    publisher: Publisher,
    state: State,
    watches: HashMap<WatchKey, (u64, tokio::task::AbortHandle)>,
    next_gen: u64,
    tx: mpsc::UnboundedSender<Event>,
    pending: Vec<Waiting>,
}

impl Worker {
    async fn run(
        mut self,
        mut demands: mpsc::UnboundedReceiver<Demand>,
        mut events: mpsc::UnboundedReceiver<Event>,
    ) {
        // Known (and empty) at once.
        self.publisher
            .publish(self.state.source_state(&self.cfg.cluster_domain));
        let mut retry = tokio::time::interval(CLIENT_RETRY);
        loop {
            tokio::select! {
                _ = retry.tick(), if self.client.is_none() => match client(&self.cfg) {
                    Ok(c) => {
                        tracing::info!(kubeconfig = ?self.cfg.kubeconfig, "Kubernetes client ready");
                        self.client = Some(c);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry = ?CLIENT_RETRY, "Kubernetes source has no client; routing by the outbound rules meanwhile");
                        crate::metrics::source_update(SourceKind::Kubernetes, false);
                    }
                },
                d = demands.recv() => match d {
                    Some(d) => self.demand(d),
                    None => break,
                },
                Some(ev) = events.recv() => {
                    self.event(ev);
                    // Apply everything already queued before publishing once.
                    while let Ok(ev) = events.try_recv() {
                        self.event(ev);
                    }
                    self.settle();
                }
            }
        }
        for (_, (_, task)) in self.watches.drain() {
            task.abort();
        }
    }

    fn demand(&mut self, demand: Demand) {
        let Some(client) = self.client.clone() else {
            demand.done.send_replace(true);
            return;
        };
        let tx = self.tx.clone();
        let ip = match &demand.dest {
            Destination::Addr(a) => a.ip(),
            Destination::Name(host, port) => {
                // No lookup: the Service watch (by name) finds it, or that
                // it does not exist.
                let found = match state::service_of_name(host, &self.cfg.cluster_domain) {
                    Some((ns, name)) => Found::Named {
                        ns,
                        name,
                        port: *port,
                    },
                    None => Found::Nothing,
                };
                let _ = tx.send(Event::Found { demand, found });
                return;
            }
        };
        tokio::spawn(async move {
            let found = lookup(client, ip).await;
            let _ = tx.send(Event::Found { demand, found });
        });
    }

    fn event(&mut self, ev: Event) {
        match ev {
            Event::Watch {
                key,
                generation,
                change,
            } => {
                if self.watches.get(&key).map(|w| w.0) == Some(generation) {
                    self.state.apply(&key, change);
                }
            }
            Event::Found { demand, found } => match found {
                Found::Service { ns, name } => {
                    if self.state.services_in_use() >= self.cfg.max_services {
                        tracing::warn!(service = %format!("{ns}/{name}"), max = self.cfg.max_services, "too many Services in use; this one is routed by the outbound rules");
                        crate::metrics::source_update(SourceKind::Kubernetes, false);
                        demand.done.send_replace(true);
                        return;
                    }
                    tracing::info!(destination = %demand.dest, service = %format!("{ns}/{name}"), "following Kubernetes Service");
                    self.state.use_service(&ns, &name);
                    self.pending.push(Waiting::Service { ns, name, demand });
                }
                Found::Named { ns, name, port } => {
                    let service = format!("{ns}/{name}");
                    if !self.state.uses_service(&ns, &name)
                        && self.state.services_in_use() >= self.cfg.max_services
                    {
                        tracing::warn!(%service, max = self.cfg.max_services, "too many Services in use; this name is not followed");
                        crate::metrics::source_update(SourceKind::Kubernetes, false);
                        demand.done.send_replace(true);
                        return;
                    }
                    tracing::info!(destination = %demand.dest, %service, "following Kubernetes Service by name");
                    self.state.use_service_by_name(&ns, &name, port);
                    self.pending.push(Waiting::Service { ns, name, demand });
                }
                Found::Pod(ip) => {
                    tracing::info!(destination = %demand.dest, "following the Kubernetes pod at this address");
                    self.state.use_pod_ip(ip);
                    self.pending.push(Waiting::Pod { ip, demand });
                }
                Found::Nothing => {
                    tracing::debug!(destination = %demand.dest, "no Kubernetes Service or pod has this address");
                    demand.done.send_replace(true);
                }
                Found::Failed(e) => {
                    tracing::warn!(destination = %demand.dest, error = %e, "Kubernetes lookup failed; routing by the outbound rules for now");
                    crate::metrics::source_update(SourceKind::Kubernetes, false);
                    demand.done.send_replace(true);
                }
            },
        }
    }

    /// Drops deleted Services, starts and stops watches to match what is
    /// in use, publishes, and answers the demands whose watches listed.
    fn settle(&mut self) {
        for (ns, name) in self.state.deleted_services() {
            tracing::info!(service = %format!("{ns}/{name}"), "Kubernetes Service deleted; no longer followed");
            self.state.drop_service(&ns, &name);
        }
        let desired = self.state.desired();
        let stale: Vec<WatchKey> = self
            .watches
            .keys()
            .filter(|k| !desired.contains(*k))
            .cloned()
            .collect();
        for key in stale {
            if let Some((_, task)) = self.watches.remove(&key) {
                task.abort();
            }
            self.state.watch_stopped(&key);
        }
        for key in desired {
            if self.watches.contains_key(&key) {
                continue;
            }
            // Watches exist only for what a lookup found, with the client.
            let Some(client) = self.client.clone() else {
                continue;
            };
            self.next_gen += 1;
            let generation = self.next_gen;
            self.state.watch_started(key.clone());
            let task = tokio::spawn(watch::run(
                client,
                key.clone(),
                generation,
                self.rules.clone(),
                self.cfg.resync_ms,
                self.tx.clone(),
            ));
            self.watches.insert(key, (generation, task.abort_handle()));
        }
        crate::metrics::watches(SourceKind::Kubernetes, self.watches.len());
        self.publisher
            .publish(self.state.source_state(&self.cfg.cluster_domain));
        let state = &self.state;
        self.pending.retain(|w| {
            let (ready, demand) = match w {
                Waiting::Service { ns, name, demand } => (
                    state.service_synced(ns, name) || !state.desired().iter().any(|k| {
                        matches!(k, WatchKey::Service { ns: n, name: s } if n == ns && s == name)
                    }),
                    demand,
                ),
                Waiting::Pod { ip, demand } => (state.pod_ip_synced(*ip), demand),
            };
            if ready {
                demand.done.send_replace(true);
            }
            !ready
        });
    }
}

/// What `ip` is: a Service's ClusterIP, else a pod's address, else nothing.
async fn lookup(client: Client, ip: IpAddr) -> Found {
    let by = |field: &str| ListParams::default().fields(&format!("{field}={ip}"));
    match Api::<Service>::all(client.clone())
        .list(&by("spec.clusterIP"))
        .await
    {
        Ok(list) => {
            if let Some(s) = list.items.first() {
                return Found::Service {
                    ns: s.metadata.namespace.clone().unwrap_or_default(),
                    name: s.metadata.name.clone().unwrap_or_default(),
                };
            }
        }
        Err(e) => return Found::Failed(e.to_string()),
    }
    // A dual-stack Service's ClusterIP of its second family is not
    // `spec.clusterIP`, the only one the field selector sees. Since
    // MultiCIDRServiceAllocator (GA in 1.33) the API server keeps an
    // IPAddress object per allocated ClusterIP, named by the address in
    // its canonical form, whose parentRef is the Service.
    match Api::<IPAddress>::all(client.clone())
        .get_opt(&ip.to_string())
        .await
    {
        Ok(Some(a)) => {
            let p = a.spec.parent_ref;
            if p.resource == "services"
                && p.group.as_deref().unwrap_or_default().is_empty()
                && let Some(ns) = p.namespace
            {
                return Found::Service { ns, name: p.name };
            }
        }
        Ok(None) => {}
        // An older API server, or RBAC without `ipaddresses`: the primary
        // ClusterIPs are still found.
        Err(e) => tracing::debug!(dst.addr = %ip, error = %e, "no IPAddress lookup"),
    }
    match Api::<Pod>::all(client).list(&by("status.podIP")).await {
        Ok(list) if list.items.is_empty() => Found::Nothing,
        Ok(_) => Found::Pod(ip),
        Err(e) => Found::Failed(e.to_string()),
    }
}
