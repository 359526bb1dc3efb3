//! One list+watch per [`WatchKey`]: list (the whole state), then watch from
//! the list's resource version (with bookmarks, so a reconnect resumes
//! where it stopped), and list again when the server says the version is
//! too old (410 Gone), after an error, and every resync interval (so a
//! missed event cannot stay wrong for longer). Each object is reduced to
//! the facts routing needs at once ([`Obj`]).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use super::Event;
use super::identity::{IdentityRules, PodFacts};
use super::state::{Change, Obj, PodInfo, SliceEndpoint, SliceInfo, SvcInfo, SvcPort, WatchKey};

/// The longest a single watch request stays open (the API server's own
/// limit for `timeoutSeconds` is higher; a shorter one keeps reconnects
/// routine).
const WATCH_TIMEOUT_S: u32 = 290;
/// The first wait after a failed list or watch; doubles up to [`BACKOFF_MAX`].
const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// The longest wait between two attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Follows `key` until the task is aborted, sending every change as
/// `Event::Watch { key, generation, .. }`.
pub(super) async fn run(
    client: Client,
    key: WatchKey,
    generation: u64,
    rules: Arc<IdentityRules>,
    resync: Duration,
    tx: mpsc::UnboundedSender<Event>,
) {
    let send = {
        let key = key.clone();
        move |change: Change| {
            tx.send(Event::Watch {
                key: key.clone(),
                generation,
                change,
            })
            .is_ok()
        }
    };
    let f = Follow { resync, send };
    match &key {
        WatchKey::Service { ns, name } => {
            f.run(
                Api::<Service>::namespaced(client, ns),
                None,
                Some(format!("metadata.name={name}")),
                service,
            )
            .await
        }
        WatchKey::Slices { ns, service } => {
            f.run(
                Api::<EndpointSlice>::namespaced(client, ns),
                Some(format!("kubernetes.io/service-name={service}")),
                None,
                slice,
            )
            .await
        }
        WatchKey::Pods { ns, selector } => {
            f.run(
                Api::<Pod>::namespaced(client, ns),
                Some(selector.clone()),
                None,
                |p| pod(p, &rules),
            )
            .await
        }
        WatchKey::Pod { ns, name } => {
            f.run(
                Api::<Pod>::namespaced(client, ns),
                None,
                Some(format!("metadata.name={name}")),
                |p| pod(p, &rules),
            )
            .await
        }
        WatchKey::PodByIp(ip) => {
            f.run(
                Api::<Pod>::all(client),
                None,
                Some(format!("status.podIP={ip}")),
                |p| pod(p, &rules),
            )
            .await
        }
    }
}

struct Follow<S> {
    resync: Duration,
    send: S,
}

/// Why a watch stopped.
enum Stop {
    /// List again (resync, 410 Gone, an error).
    Relist,
    /// The worker is gone.
    Closed,
}

impl<S: Fn(Change) -> bool> Follow<S> {
    async fn run<K>(
        &self,
        api: Api<K>,
        labels: Option<String>,
        fields: Option<String>,
        extract: impl Fn(&K) -> (String, Option<Obj>),
    ) where
        K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
    {
        let mut backoff = BACKOFF_BASE;
        loop {
            let lp = ListParams {
                label_selector: labels.clone(),
                field_selector: fields.clone(),
                ..ListParams::default()
            };
            let list = match api.list(&lp).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, labels = ?labels, fields = ?fields, backoff = ?backoff, "Kubernetes list failed; retrying");
                    crate::metrics::source_update(crate::model::SourceKind::Kubernetes, false);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            };
            backoff = BACKOFF_BASE;
            let mut rv = list.metadata.resource_version.clone().unwrap_or_default();
            let objects = list
                .items
                .iter()
                .filter_map(|o| match extract(o) {
                    (k, Some(obj)) => Some((k, obj)),
                    (_, None) => None,
                })
                .collect();
            if !(self.send)(Change::Listed(objects)) {
                return;
            }
            let until = tokio::time::Instant::now() + self.resync;
            match self
                .watch(&api, &labels, &fields, &extract, &mut rv, until)
                .await
            {
                Stop::Closed => return,
                Stop::Relist => {}
            }
        }
    }

    /// Watches from `rv` until `until` (then a resync), reconnecting when
    /// a watch request ends.
    async fn watch<K>(
        &self,
        api: &Api<K>,
        labels: &Option<String>,
        fields: &Option<String>,
        extract: &impl Fn(&K) -> (String, Option<Obj>),
        rv: &mut String,
        until: tokio::time::Instant,
    ) -> Stop
    where
        K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
    {
        loop {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Stop::Relist;
            }
            let wp = WatchParams {
                label_selector: labels.clone(),
                field_selector: fields.clone(),
                timeout: Some((left.as_secs() as u32).clamp(1, WATCH_TIMEOUT_S)),
                bookmarks: true,
                send_initial_events: false,
            };
            let stream = match api.watch(&wp, rv).await {
                Ok(s) => s,
                Err(kube::Error::Api(s)) if s.code == 410 => return Stop::Relist,
                Err(e) => {
                    tracing::warn!(error = %e, "Kubernetes watch failed; listing again");
                    crate::metrics::source_update(crate::model::SourceKind::Kubernetes, false);
                    tokio::time::sleep(BACKOFF_BASE).await;
                    return Stop::Relist;
                }
            };
            let mut stream = std::pin::pin!(stream);
            while let Some(ev) = stream.next().await {
                let change = match ev {
                    Ok(WatchEvent::Added(o)) | Ok(WatchEvent::Modified(o)) => {
                        if let Some(v) = &o.meta().resource_version {
                            rv.clone_from(v);
                        }
                        match extract(&o) {
                            (k, Some(obj)) => Change::Applied(k, obj),
                            (k, None) => Change::Deleted(k),
                        }
                    }
                    Ok(WatchEvent::Deleted(o)) => {
                        if let Some(v) = &o.meta().resource_version {
                            rv.clone_from(v);
                        }
                        Change::Deleted(extract(&o).0)
                    }
                    Ok(WatchEvent::Bookmark(b)) => {
                        *rv = b.metadata.resource_version;
                        continue;
                    }
                    Ok(WatchEvent::Error(s)) => {
                        if s.code != 410 {
                            tracing::info!(code = s.code, message = %s.message, "Kubernetes watch ended with an error; listing again");
                        }
                        return Stop::Relist;
                    }
                    Err(e) => {
                        tracing::info!(error = %e, "Kubernetes watch stream failed; listing again");
                        tokio::time::sleep(BACKOFF_BASE).await;
                        return Stop::Relist;
                    }
                };
                crate::metrics::source_update(crate::model::SourceKind::Kubernetes, true);
                if !(self.send)(change) {
                    return Stop::Closed;
                }
            }
        }
    }
}

fn name_of<K: Resource>(o: &K) -> String {
    o.meta().name.clone().unwrap_or_default()
}

/// A Service's ClusterIPs, TCP ports and selector; an ExternalName
/// Service has no endpoints of its own (nothing to balance).
pub(super) fn service(s: &Service) -> (String, Option<Obj>) {
    let name = name_of(s);
    let Some(spec) = &s.spec else {
        return (name, None);
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return (name, None);
    }
    let ips: Vec<String> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.clone(),
        _ => spec.cluster_ip.iter().cloned().collect(),
    };
    let info = SvcInfo {
        // "None" (headless) does not parse.
        cluster_ips: ips.iter().filter_map(|i| i.parse().ok()).collect(),
        ports: spec
            .ports
            .iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().is_none_or(|p| p == "TCP"))
            .filter_map(|p| {
                Some(SvcPort {
                    name: p.name.clone().unwrap_or_default(),
                    port: u16::try_from(p.port).ok()?,
                })
            })
            .collect(),
        selector: spec.selector.clone().filter(|s| !s.is_empty()),
    };
    (name, Some(Obj::Service(info)))
}

/// An EndpointSlice's TCP ports and IP endpoints ("A nil value should be
/// interpreted as ready", EndpointConditions; serving defaults to ready).
pub(super) fn slice(s: &EndpointSlice) -> (String, Option<Obj>) {
    let info = SliceInfo {
        ports: s
            .ports
            .iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().is_none_or(|p| p == "TCP"))
            .filter_map(|p| {
                Some((
                    p.name.clone().unwrap_or_default(),
                    u16::try_from(p.port?).ok()?,
                ))
            })
            .collect(),
        endpoints: s
            .endpoints
            .iter()
            .flatten()
            .filter_map(|e| {
                // FQDN slices do not parse as addresses.
                let addr: IpAddr = e.addresses.first()?.parse().ok()?;
                let c = e.conditions.as_ref();
                let ready = c.and_then(|c| c.ready).unwrap_or(true);
                let serving = c.and_then(|c| c.serving).unwrap_or(ready);
                let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
                let pod = e
                    .target_ref
                    .as_ref()
                    .filter(|r| r.kind.as_deref() == Some("Pod"))
                    .and_then(|r| r.name.clone());
                Some(SliceEndpoint {
                    addr,
                    ready,
                    serving_terminating: !ready && serving && terminating,
                    pod,
                })
            })
            .collect(),
    };
    (name_of(s), Some(Obj::Slice(info)))
}

/// A pod's addresses and the identity the rules derive for it.
pub(super) fn pod(p: &Pod, rules: &IdentityRules) -> (String, Option<Obj>) {
    let m = &p.metadata;
    let facts = PodFacts {
        name: m.name.clone().unwrap_or_default(),
        namespace: m.namespace.clone().unwrap_or_default(),
        uid: m.uid.clone().unwrap_or_default(),
        service_account: p
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        node_name: p
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default(),
        labels: m.labels.clone().unwrap_or_default(),
        annotations: m.annotations.clone().unwrap_or_default(),
    };
    let owner = format!("{}/{}", facts.namespace, facts.name);
    let status = p.status.as_ref();
    let mut ips: Vec<IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.parse().ok())
        .collect();
    if ips.is_empty()
        && let Some(ip) = status
            .and_then(|s| s.pod_ip.as_ref())
            .and_then(|i| i.parse().ok())
    {
        ips.push(ip);
    }
    let phase = status.and_then(|s| s.phase.as_deref());
    let info = PodInfo {
        owner: owner.clone(),
        ips,
        identity: rules.identity(&facts),
        active: !matches!(phase, Some("Succeeded") | Some("Failed")),
    };
    (owner, Some(Obj::Pod(info)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::EndpointIdentity;

    fn from<T: DeserializeOwned>(v: serde_json::Value) -> T {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn objects_are_reduced_to_what_routing_needs() {
        let s: Service = from(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00::10"],
                "selector": {"app": "web"},
                "ports": [{"name": "http", "port": 80, "targetPort": 8080},
                          {"name": "dns", "port": 53, "protocol": "UDP"}]}
        }));
        let (name, Some(Obj::Service(info))) = service(&s) else {
            panic!()
        };
        assert_eq!(name, "web");
        assert_eq!(info.cluster_ips.len(), 2);
        assert_eq!(
            info.ports,
            [SvcPort {
                name: "http".into(),
                port: 80
            }]
        );
        let headless: Service = from(serde_json::json!({
            "metadata": {"name": "h"}, "spec": {"clusterIP": "None", "ports": [{"port": 80}]}
        }));
        let (_, Some(Obj::Service(h))) = service(&headless) else {
            panic!()
        };
        assert!(h.cluster_ips.is_empty() && h.selector.is_none());
        let external: Service = from(serde_json::json!({
            "metadata": {"name": "x"}, "spec": {"type": "ExternalName", "externalName": "a.example"}
        }));
        assert!(service(&external).1.is_none());

        let sl: EndpointSlice = from(serde_json::json!({
            "metadata": {"name": "web-abc"}, "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["10.1.0.1"], "targetRef": {"kind": "Pod", "name": "p1"}},
                {"addresses": ["10.1.0.2"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["10.1.0.3"], "conditions": {"ready": false}}
            ]
        }));
        let (_, Some(Obj::Slice(info))) = slice(&sl) else {
            panic!()
        };
        assert_eq!(info.ports, [("http".to_owned(), 8080)]);
        let e = &info.endpoints;
        assert!(e[0].ready && e[0].pod.as_deref() == Some("p1"));
        assert!(!e[1].ready && e[1].serving_terminating && e[1].pod.is_none());
        assert!(!e[2].ready && !e[2].serving_terminating);

        let rules = IdentityRules::new(
            &super::super::identity::default_rules(),
            rampart_identity::TrustDomain::parse("example.org").unwrap(),
            String::new(),
        )
        .unwrap();
        let p: Pod = from(serde_json::json!({
            "metadata": {"name": "p1", "namespace": "shop"},
            "spec": {"serviceAccountName": "web", "containers": []},
            "status": {"phase": "Running", "podIP": "10.1.0.1", "podIPs": [{"ip": "10.1.0.1"}]}
        }));
        let (owner, Some(Obj::Pod(info))) = pod(&p, &rules) else {
            panic!()
        };
        assert_eq!(owner, "shop/p1");
        assert_eq!(info.ips, ["10.1.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            info.identity,
            EndpointIdentity::Id(
                rampart_identity::SpiffeId::parse("spiffe://example.org/ns/shop/sa/web").unwrap()
            )
        );
        assert!(info.active);
    }
}
