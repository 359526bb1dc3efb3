//! The registry: the one writer of what discovery knows. Sources are
//! workers that only produce updates (as the identity sources are): each
//! holds a [`Publisher`] and publishes its whole state on every change; the
//! registry merges the states in source order into a [`Snapshot`],
//! updates the balancers of the services in it (keeping what was learnt
//! of endpoints that stay), and publishes the snapshot on a `watch`
//! channel. A lookup costs a `watch` borrow and a hash lookup.
//!
//! A source that learns only what the app dials (Kubernetes) takes
//! [`Demand`]s: the first time an address no source knows is dialled, the
//! route stage asks, and waits (bounded) for the source to say it looked.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::balance::Balancer;
use crate::model::{Destination, Endpoint, Lookup, Snapshot, SourceKind, SourceState};

/// How many distinct addresses are remembered as asked before the memory
/// starts over (each is asked again then).
const MAX_ASKED: usize = 4096;
/// An address a demand-driven source found nothing for (or could not look
/// up: the API server was unreachable) is asked again when dialled after
/// this long, so a Service created later, or an outage, is not remembered
/// for ever.
pub const REASK_AFTER: Duration = Duration::from_secs(10);

/// Where an outbound connection goes, by discovery.
#[derive(Debug, Clone)]
pub enum Resolved {
    /// A service: balance over its endpoints.
    Service(Arc<Balancer>),
    /// A pod's own address with the identity it must present.
    Pod(Endpoint),
    /// A pod's own address whose identity cannot be derived: refuse.
    Unverifiable(Endpoint),
    /// No source knows it.
    Unknown,
}

/// A request to a demand-driven source to look a destination up.
#[derive(Debug)]
pub struct Demand {
    /// What the app dialled: an address, or the name an explicit listener
    /// targets.
    pub dest: Destination,
    /// Set to `true` once the source has published what it found (or
    /// found nothing).
    pub done: watch::Sender<bool>,
}

/// What is remembered as asked: an address by its IP (any port), a name
/// with its port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Asked {
    Ip(IpAddr),
    Name(String, u16),
}

impl Asked {
    fn of(dest: &Destination) -> Asked {
        match dest {
            Destination::Addr(a) => Asked::Ip(a.ip()),
            Destination::Name(h, p) => Asked::Name(h.clone(), *p),
        }
    }
}

struct Inner {
    kinds: Vec<SourceKind>,
    states: Vec<SourceState>,
    balancers: HashMap<String, Arc<Balancer>>,
    version: u64,
}

/// What every source publishes into and the proxy reads from.
pub struct Registry {
    inner: Mutex<Inner>,
    tx: watch::Sender<Arc<Snapshot>>,
    demand: Mutex<Option<mpsc::UnboundedSender<Demand>>>,
    asked: Mutex<HashMap<Asked, (watch::Receiver<bool>, tokio::time::Instant)>>,
    demand_wait: Duration,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

/// A source's handle to publish its state.
#[derive(Clone)]
pub struct Publisher {
    registry: Arc<Registry>,
    index: usize,
    kind: SourceKind,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("index", &self.index)
            .field("kind", &self.kind)
            .finish()
    }
}

impl Publisher {
    /// Replaces this source's state.
    pub fn publish(&self, state: SourceState) {
        self.registry.publish(self.index, state);
    }

    /// The source's kind.
    pub fn kind(&self) -> SourceKind {
        self.kind
    }
}

impl Registry {
    /// An empty registry; a first dial of an address no source knows waits
    /// up to `demand_wait` for a demand-driven source.
    pub fn new(demand_wait: Duration) -> Arc<Registry> {
        let (tx, _) = watch::channel(Arc::new(Snapshot::default()));
        Arc::new(Registry {
            inner: Mutex::new(Inner {
                kinds: Vec::new(),
                states: Vec::new(),
                balancers: HashMap::new(),
                version: 0,
            }),
            tx,
            demand: Mutex::new(None),
            asked: Mutex::new(HashMap::new()),
            demand_wait,
        })
    }

    /// Adds a source (earlier sources win a destination both claim).
    pub fn source(self: &Arc<Self>, kind: SourceKind) -> Publisher {
        let mut inner = self.lock();
        inner.kinds.push(kind);
        inner.states.push(SourceState::default());
        Publisher {
            registry: self.clone(),
            index: inner.states.len() - 1,
            kind,
        }
    }

    /// Adds a demand-driven source: the receiver gets every address to
    /// look up.
    pub fn demand_source(
        self: &Arc<Self>,
        kind: SourceKind,
    ) -> (Publisher, mpsc::UnboundedReceiver<Demand>) {
        let (tx, rx) = mpsc::unbounded_channel();
        if let Ok(mut d) = self.demand.lock() {
            *d = Some(tx);
        }
        (self.source(kind), rx)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Poisoning needs a panic while holding the lock; the merge does not
        // panic, so take the state as it is.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, index: usize, state: SourceState) {
        let mut inner = self.lock();
        if inner.states.get(index) == Some(&state) {
            return;
        }
        if let Some(slot) = inner.states.get_mut(index) {
            *slot = state;
        }
        inner.version += 1;
        let snapshot = Snapshot::merge(&inner.states, inner.version);
        // Services that left get no endpoints (connections holding their
        // balancer answer 503), then are forgotten.
        let mut balancers = std::mem::take(&mut inner.balancers);
        for (name, b) in balancers.iter() {
            if snapshot.service(name).is_none() {
                b.update(&crate::model::Service {
                    name: name.clone(),
                    source: SourceKind::File,
                    endpoints: Vec::new(),
                    missing: None,
                });
            }
        }
        balancers.retain(|name, _| snapshot.service(name).is_some());
        for svc in snapshot.services() {
            match balancers.get(&svc.name) {
                Some(b) => b.update(svc),
                None => {
                    balancers.insert(svc.name.clone(), Arc::new(Balancer::new(svc)));
                }
            }
        }
        inner.balancers = balancers;
        tracing::debug!(
            version = inner.version,
            services = inner.balancers.len(),
            pods = snapshot.pod_count(),
            "discovery updated"
        );
        self.tx.send_replace(Arc::new(snapshot));
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    /// A receiver of snapshots.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    /// The balancer of service `name`.
    pub fn balancer(&self, name: &str) -> Option<Arc<Balancer>> {
        self.lock().balancers.get(name).cloned()
    }

    fn resolved(&self, lookup: Lookup) -> Resolved {
        match lookup {
            Lookup::Unknown => Resolved::Unknown,
            Lookup::Pod(e) if e.identity.id().is_some() => Resolved::Pod(e),
            Lookup::Pod(e) => Resolved::Unverifiable(e),
            Lookup::Service(svc) => match self.balancer(&svc.name) {
                Some(b) => Resolved::Service(b),
                // Published together with the snapshot; a race with a
                // removal at most.
                None => Resolved::Unknown,
            },
        }
    }

    /// What `dst` is, without asking any source.
    pub fn lookup(&self, dst: SocketAddr) -> Resolved {
        let lookup = self.snapshot().lookup(dst);
        self.resolved(lookup)
    }

    /// What a destination named by an explicit listener is.
    pub fn lookup_dest(&self, dest: &Destination) -> Resolved {
        let addr = match dest {
            Destination::Addr(a) => Some(*a),
            Destination::Name(..) => None,
        };
        let lookup = self.snapshot().lookup_dest(dest, addr);
        self.resolved(lookup)
    }

    /// What `dst` is; the first time an address no source knows is seen,
    /// the demand-driven source (if any) is asked, and this waits for its
    /// answer up to the registry's demand wait.
    pub async fn resolve(&self, dst: SocketAddr) -> Resolved {
        self.resolve_dest(&Destination::Addr(dst)).await
    }

    /// [`Registry::resolve`] for any destination: an address, or a name an
    /// explicit listener targets (`web.shop.svc.cluster.local:80`), which
    /// a demand-driven source looks up by name.
    pub async fn resolve_dest(&self, dest: &Destination) -> Resolved {
        let known = self.lookup_dest(dest);
        if !matches!(known, Resolved::Unknown) {
            return known;
        }
        let Some(mut done) = self.ask(dest) else {
            return known;
        };
        if tokio::time::timeout(self.demand_wait, done.wait_for(|d| *d))
            .await
            .is_err()
        {
            tracing::debug!(destination = %dest, "discovery did not answer in time");
        }
        self.lookup_dest(dest)
    }

    fn ask(&self, dest: &Destination) -> Option<watch::Receiver<bool>> {
        let demand = self.demand.lock().ok()?.clone()?;
        let mut asked = self.asked.lock().ok()?;
        let key = Asked::of(dest);
        if let Some((rx, at)) = asked.get(&key) {
            // Still unknown after an answer, long enough ago: ask again.
            let stale = *rx.borrow() && at.elapsed() >= REASK_AFTER;
            if !stale {
                return Some(rx.clone());
            }
        }
        if asked.len() >= MAX_ASKED {
            asked.clear();
        }
        let (done, rx) = watch::channel(false);
        let d = Demand {
            dest: dest.clone(),
            done,
        };
        if demand.send(d).is_err() {
            // The source is gone: nothing to wait for.
            return None;
        }
        asked.insert(key, (rx.clone(), tokio::time::Instant::now()));
        Some(rx)
    }
}

impl Registry {
    /// What the admin API's `/discovery` shows: every service with its
    /// destinations and endpoint counts; with `query` (`ADDR:PORT`,
    /// `HOST:PORT` or a service name), what the sidecar knows about that
    /// destination: its service, and each endpoint's address, expected
    /// SPIFFE ID (or why none), owner, load, latency estimate and ejection.
    pub async fn describe(&self, query: Option<&str>) -> serde_json::Value {
        use serde_json::json;
        let Some(q) = query else {
            let snap = self.snapshot();
            let services: Vec<_> = snap
                .services()
                .map(|s| {
                    let usable = s.endpoints.iter().filter(|e| e.identity.id().is_some()).count();
                    json!({
                        "service": s.name,
                        "source": s.source.as_str(),
                        "destinations": snap.destinations_of(&s.name).iter().map(|d| d.to_string()).collect::<Vec<_>>(),
                        "endpoints": s.endpoints.len(),
                        "endpoints_with_identity": usable,
                    })
                })
                .collect();
            return json!({
                "version": snap.version,
                "services": services,
                "pod_addresses": snap.pod_count(),
            });
        };
        let resolved = match q.parse::<Destination>() {
            Ok(Destination::Addr(a)) => self.resolve(a).await,
            Ok(d @ Destination::Name(..)) => self.resolve_dest(&d).await,
            Err(_) => match self.balancer(q) {
                Some(b) => Resolved::Service(b),
                None => Resolved::Unknown,
            },
        };
        let ident = |e: &Endpoint| match &e.identity {
            crate::model::EndpointIdentity::Id(id) => json!({ "spiffe_id": id.as_str() }),
            crate::model::EndpointIdentity::Underivable(why) => {
                json!({ "spiffe_id": null, "no_identity": why })
            }
        };
        match resolved {
            Resolved::Unknown => json!({
                "destination": q,
                "kind": "unknown",
                "note": "no discovery source knows it: routed by the outbound rules",
            }),
            Resolved::Pod(e) | Resolved::Unverifiable(e) => {
                let mut v = json!({
                    "destination": q,
                    "kind": "pod",
                    "address": e.addr.to_string(),
                    "owner": e.owner,
                });
                if let (Some(o), serde_json::Value::Object(i)) = (v.as_object_mut(), ident(&e)) {
                    o.extend(i);
                }
                v
            }
            Resolved::Service(b) => {
                let endpoints: Vec<_> = b
                    .endpoints()
                    .iter()
                    .map(|s| {
                        let view = s.view();
                        let mut v = json!({
                            "address": s.endpoint.addr.to_string(),
                            "owner": s.endpoint.owner,
                            "in_flight": view.pending,
                            "latency_ewma_ms": view.rtt_ewma.as_secs_f64() * 1e3,
                            "ejected_for_ms": view.ejected_for.map(|d| d.as_millis() as u64),
                            "refusals_in_a_row": view.refusals_in_a_row,
                            "requests": view.requests,
                            "failures": view.failures,
                        });
                        if let (Some(o), serde_json::Value::Object(i)) =
                            (v.as_object_mut(), ident(&s.endpoint))
                        {
                            o.extend(i);
                        }
                        v
                    })
                    .collect();
                let snap = self.snapshot();
                let svc = snap.service(b.name());
                let mut v = json!({
                    "destination": q,
                    "kind": "service",
                    "service": b.name(),
                    "source": svc.map(|s| s.source.as_str()),
                    "endpoints": endpoints,
                });
                if let (Some(o), Some(why)) =
                    (v.as_object_mut(), svc.and_then(|s| s.missing.clone()))
                {
                    o.insert("missing".into(), why.into());
                }
                v
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{EndpointIdentity, Service};
    use rampart_identity::SpiffeId;

    fn state(vip: &str, eps: &[&str]) -> SourceState {
        SourceState {
            services: vec![(
                vec![Destination::Addr(vip.parse().unwrap())],
                Service {
                    name: "svc".into(),
                    source: SourceKind::File,
                    endpoints: eps
                        .iter()
                        .map(|a| Endpoint {
                            addr: a.parse().unwrap(),
                            identity: EndpointIdentity::Id(
                                SpiffeId::parse("spiffe://td/s").unwrap(),
                            ),
                            owner: None,
                        })
                        .collect(),
                    missing: None,
                },
            )],
            pods: vec![],
        }
    }

    #[tokio::test]
    async fn publishing_updates_balancers_in_place_and_removal_empties_them() {
        let r = Registry::new(Duration::from_millis(10));
        let p = r.source(SourceKind::File);
        p.publish(state("10.96.0.1:80", &["10.1.0.1:80"]));
        let Resolved::Service(b) = r.lookup("10.96.0.1:80".parse().unwrap()) else {
            panic!("not a service")
        };
        p.publish(state("10.96.0.1:80", &["10.1.0.1:80", "10.1.0.2:80"]));
        assert_eq!(b.endpoints().len(), 2, "the same balancer sees the change");
        p.publish(SourceState::default());
        assert!(b.endpoints().is_empty());
        assert!(matches!(
            r.lookup("10.96.0.1:80".parse().unwrap()),
            Resolved::Unknown
        ));
    }

    #[tokio::test]
    async fn a_first_dial_asks_the_demand_source_once_and_waits_for_it() {
        let r = Registry::new(Duration::from_secs(5));
        let (p, mut demands) = r.demand_source(SourceKind::Kubernetes);
        let answer = tokio::spawn(async move {
            let d = demands.recv().await.unwrap();
            assert_eq!(d.dest, Destination::Addr("10.96.0.1:80".parse().unwrap()));
            p.publish(state("10.96.0.1:80", &["10.1.0.1:80"]));
            d.done.send_replace(true);
            demands
        });
        assert!(matches!(
            r.resolve("10.96.0.1:80".parse().unwrap()).await,
            Resolved::Service(_)
        ));
        let mut demands = answer.await.unwrap();
        assert!(matches!(
            r.resolve("10.96.0.1:81".parse().unwrap()).await,
            Resolved::Unknown
        ));
        // The same IP is not asked again (another port)...
        assert!(demands.try_recv().is_err());
        // ... until it has stayed unknown for a while.
        tokio::time::pause();
        tokio::time::advance(REASK_AFTER).await;
        let again = tokio::spawn({
            let r = r.clone();
            async move { r.resolve("10.96.0.1:81".parse().unwrap()).await }
        });
        let d = demands.recv().await.unwrap();
        assert_eq!(d.dest, Destination::Addr("10.96.0.1:81".parse().unwrap()));
        d.done.send_replace(true);
        assert!(matches!(again.await.unwrap(), Resolved::Unknown));
    }
}
