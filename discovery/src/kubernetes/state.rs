//! What the Kubernetes source knows, and what it must watch to keep
//! knowing it. Pure data: the worker feeds it what the watches report, and
//! asks it which watches it needs ([`State::desired`]) and what to publish
//! ([`State::source_state`]). Only the facts routing needs are kept of each
//! object (addresses, ports, the pod's derived identity), never the whole
//! object, so memory grows with the endpoints of the services in use only.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};

use crate::model::{
    Destination, Endpoint, EndpointIdentity, PodAddr, Service, SourceKind, SourceState,
};

/// One list+watch the source keeps open; each is a single request to the
/// API server, scoped to one namespace and one name, label or address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WatchKey {
    /// A Service by name (`fieldSelector=metadata.name=`).
    Service {
        /// Namespace.
        ns: String,
        /// Service name.
        name: String,
    },
    /// A Service's EndpointSlices (`labelSelector=kubernetes.io/service-name=`).
    Slices {
        /// Namespace.
        ns: String,
        /// Service name.
        service: String,
    },
    /// The pods a Service selects (`labelSelector=` its selector).
    Pods {
        /// Namespace.
        ns: String,
        /// The selector, `k=v,k2=v2` (sorted).
        selector: String,
    },
    /// One pod by name (an endpoint of a Service without a selector).
    Pod {
        /// Namespace.
        ns: String,
        /// Pod name.
        name: String,
    },
    /// The pod at an address the app dialled directly (`fieldSelector=status.podIP=`).
    PodByIp(IpAddr),
}

/// A Service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvcPort {
    /// Its name (`""` when unnamed).
    pub name: String,
    /// The port clients dial.
    pub port: u16,
}

/// What is kept of a Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvcInfo {
    /// `spec.clusterIPs` (none for a headless Service).
    pub cluster_ips: Vec<IpAddr>,
    /// Its TCP ports.
    pub ports: Vec<SvcPort>,
    /// `spec.selector`, if it has one.
    pub selector: Option<BTreeMap<String, String>>,
}

/// One endpoint of a slice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceEndpoint {
    /// Its address (the first of `addresses`, which are fungible).
    pub addr: IpAddr,
    /// `conditions.ready` (unset means ready).
    pub ready: bool,
    /// `conditions.serving` and `conditions.terminating` both set.
    pub serving_terminating: bool,
    /// The pod of `targetRef`, when it names one.
    pub pod: Option<String>,
}

/// What is kept of an EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceInfo {
    /// Port name to target port.
    pub ports: Vec<(String, u16)>,
    /// Its endpoints.
    pub endpoints: Vec<SliceEndpoint>,
}

/// What is kept of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    /// `namespace/name`.
    pub owner: String,
    /// `status.podIPs`.
    pub ips: Vec<IpAddr>,
    /// Derived by the identity rules.
    pub identity: EndpointIdentity,
    /// Not finished (`Succeeded` / `Failed` pods no longer own their IPs).
    pub active: bool,
}

/// An object a watch reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Obj {
    /// A Service.
    Service(SvcInfo),
    /// An EndpointSlice.
    Slice(SliceInfo),
    /// A pod.
    Pod(PodInfo),
}

/// A change a watch reports.
#[derive(Debug, Clone)]
pub enum Change {
    /// A full list: replaces everything the watch knew.
    Listed(Vec<(String, Obj)>),
    /// An object was added or changed.
    Applied(String, Obj),
    /// An object was deleted.
    Deleted(String),
}

#[derive(Debug, Default)]
struct Watched {
    synced: bool,
    objects: BTreeMap<String, Obj>,
}

/// Everything the source knows.
#[derive(Debug, Default)]
pub struct State {
    services: BTreeSet<(String, String)>,
    /// Services followed by name (an explicit listener's target), with the
    /// ports named: followed even while they do not exist.
    named: BTreeMap<(String, String), BTreeSet<u16>>,
    pod_ips: BTreeSet<IpAddr>,
    data: HashMap<WatchKey, Watched>,
}

impl State {
    /// Starts using Service `ns/name` (the app dialled it).
    pub fn use_service(&mut self, ns: &str, name: &str) {
        self.services.insert((ns.to_owned(), name.to_owned()));
    }

    /// Starts using Service `ns/name` by name, at `port` (an explicit
    /// listener targets `NAME.NS...:PORT`): it is followed whether or not
    /// it exists, and while it does not (or has no such port) its
    /// destinations are published as a missing service, so that requests
    /// fail closed with the reason instead of falling back to the rules.
    pub fn use_service_by_name(&mut self, ns: &str, name: &str, port: u16) {
        let key = (ns.to_owned(), name.to_owned());
        self.services.insert(key.clone());
        self.named.entry(key).or_default().insert(port);
    }

    /// Whether Service `ns/name` is in use.
    pub fn uses_service(&self, ns: &str, name: &str) -> bool {
        self.services.contains(&(ns.to_owned(), name.to_owned()))
    }

    /// Stops using a Service (it was deleted).
    pub fn drop_service(&mut self, ns: &str, name: &str) {
        let key = (ns.to_owned(), name.to_owned());
        self.services.remove(&key);
        self.named.remove(&key);
    }

    /// Starts following the pod at `ip` (the app dialled it directly).
    pub fn use_pod_ip(&mut self, ip: IpAddr) {
        self.pod_ips.insert(ip);
    }

    /// The Services in use.
    pub fn services_in_use(&self) -> usize {
        self.services.len()
    }

    /// The pod addresses followed by themselves.
    pub fn pod_ips_in_use(&self) -> usize {
        self.pod_ips.len()
    }

    /// A watch was started: its data starts empty and unsynced.
    pub fn watch_started(&mut self, key: WatchKey) {
        self.data.insert(key, Watched::default());
    }

    /// A watch was stopped: what it reported is forgotten.
    pub fn watch_stopped(&mut self, key: &WatchKey) {
        self.data.remove(key);
    }

    /// Applies what a watch reported; false when the watch is not (any
    /// longer) wanted.
    pub fn apply(&mut self, key: &WatchKey, change: Change) -> bool {
        let Some(w) = self.data.get_mut(key) else {
            return false;
        };
        match change {
            Change::Listed(objects) => {
                w.objects = objects.into_iter().collect();
                w.synced = true;
            }
            Change::Applied(name, obj) => {
                w.objects.insert(name, obj);
            }
            Change::Deleted(name) => {
                w.objects.remove(&name);
            }
        }
        true
    }

    fn service(&self, ns: &str, name: &str) -> Option<&SvcInfo> {
        let key = WatchKey::Service {
            ns: ns.to_owned(),
            name: name.to_owned(),
        };
        match self.data.get(&key)?.objects.get(name)? {
            Obj::Service(s) => Some(s),
            _ => None,
        }
    }

    fn slices(&self, ns: &str, service: &str) -> impl Iterator<Item = &SliceInfo> {
        let key = WatchKey::Slices {
            ns: ns.to_owned(),
            service: service.to_owned(),
        };
        self.data
            .get(&key)
            .into_iter()
            .flat_map(|w| w.objects.values())
            .filter_map(|o| match o {
                Obj::Slice(s) => Some(s),
                _ => None,
            })
    }

    /// Every watch the Services and pod addresses in use need.
    pub fn desired(&self) -> BTreeSet<WatchKey> {
        let mut d = BTreeSet::new();
        for (ns, name) in &self.services {
            d.insert(WatchKey::Service {
                ns: ns.clone(),
                name: name.clone(),
            });
            d.insert(WatchKey::Slices {
                ns: ns.clone(),
                service: name.clone(),
            });
            d.extend(self.pod_watches(ns, name));
        }
        d.extend(self.pod_ips.iter().map(|ip| WatchKey::PodByIp(*ip)));
        d
    }

    /// The pod watches of Service `ns/name`: its selector's, or (without
    /// a selector) one per pod its slices name.
    fn pod_watches(&self, ns: &str, name: &str) -> Vec<WatchKey> {
        let Some(svc) = self.service(ns, name) else {
            return Vec::new();
        };
        match &svc.selector {
            Some(sel) => vec![WatchKey::Pods {
                ns: ns.to_owned(),
                selector: selector_string(sel),
            }],
            None => {
                let pods: BTreeSet<&String> = self
                    .slices(ns, name)
                    .flat_map(|s| s.endpoints.iter().filter_map(|e| e.pod.as_ref()))
                    .collect();
                pods.into_iter()
                    .map(|p| WatchKey::Pod {
                        ns: ns.to_owned(),
                        name: p.clone(),
                    })
                    .collect()
            }
        }
    }

    fn synced(&self, key: &WatchKey) -> bool {
        self.data.get(key).is_some_and(|w| w.synced)
    }

    /// Whether everything Service `ns/name` needs has been listed once
    /// (so a first request finds its endpoints).
    pub fn service_synced(&self, ns: &str, name: &str) -> bool {
        let svc = WatchKey::Service {
            ns: ns.to_owned(),
            name: name.to_owned(),
        };
        let slices = WatchKey::Slices {
            ns: ns.to_owned(),
            service: name.to_owned(),
        };
        self.synced(&svc)
            && self.synced(&slices)
            && self.pod_watches(ns, name).iter().all(|k| self.synced(k))
    }

    /// Whether the pod at `ip` has been looked up by its watch.
    pub fn pod_ip_synced(&self, ip: IpAddr) -> bool {
        self.synced(&WatchKey::PodByIp(ip))
    }

    /// Services in use whose watch says they are gone (except those used
    /// by name, which stay followed, missing).
    pub fn deleted_services(&self) -> Vec<(String, String)> {
        self.services
            .iter()
            .filter(|key| !self.named.contains_key(*key))
            .filter(|(ns, name)| {
                let key = WatchKey::Service {
                    ns: ns.clone(),
                    name: name.clone(),
                };
                self.synced(&key) && self.service(ns, name).is_none()
            })
            .cloned()
            .collect()
    }

    /// Every pod known, by `namespace/name`.
    fn pods(&self) -> BTreeMap<&str, &PodInfo> {
        let mut pods = BTreeMap::new();
        for w in self.data.values() {
            for o in w.objects.values() {
                if let Obj::Pod(p) = o {
                    pods.insert(p.owner.as_str(), p);
                }
            }
        }
        pods
    }

    /// What to publish: a service per port of every Service in use, with
    /// its destinations (ClusterIPs with the port, and the Service's DNS
    /// names under `cluster_domain`), and every known pod address.
    pub fn source_state(&self, cluster_domain: &str) -> SourceState {
        let pods = self.pods();
        let mut out = SourceState::default();
        for (ns, name) in &self.services {
            let named = self.named.get(&(ns.clone(), name.clone()));
            // Its DNS names at `port`; the short `NAME.NS` form only when an
            // explicit listener used a name (a two-label name may as well
            // be another source's).
            let names = |port: u16| {
                let mut hosts = vec![
                    format!("{name}.{ns}.svc.{cluster_domain}"),
                    format!("{name}.{ns}.svc"),
                ];
                if named.is_some() {
                    hosts.push(format!("{name}.{ns}"));
                }
                hosts
                    .into_iter()
                    .map(move |h| Destination::Name(h.to_ascii_lowercase(), port))
            };
            let missing = |port: u16, why: String| {
                (
                    names(port).collect(),
                    Service {
                        name: format!("{ns}/{name}:{port}"),
                        source: SourceKind::Kubernetes,
                        endpoints: Vec::new(),
                        missing: Some(why),
                    },
                )
            };
            let Some(svc) = self.service(ns, name) else {
                // Followed by name and (so far) absent.
                for port in named.into_iter().flatten() {
                    out.services.push(missing(
                        *port,
                        format!("no Service {ns}/{name} in the cluster"),
                    ));
                }
                continue;
            };
            for port in &svc.ports {
                let mut dests: Vec<Destination> = svc
                    .cluster_ips
                    .iter()
                    .map(|ip| Destination::Addr(SocketAddr::new(*ip, port.port)))
                    .collect();
                dests.extend(names(port.port));
                out.services.push((
                    dests,
                    Service {
                        name: format!("{ns}/{name}:{}", port.port),
                        source: SourceKind::Kubernetes,
                        endpoints: self.endpoints(ns, name, &port.name, &pods),
                        missing: None,
                    },
                ));
            }
            for port in named.into_iter().flatten() {
                if !svc.ports.iter().any(|p| p.port == *port) {
                    out.services.push(missing(
                        *port,
                        format!("Service {ns}/{name} has no TCP port {port}"),
                    ));
                }
            }
        }
        for pod in pods.values().filter(|p| p.active) {
            for ip in &pod.ips {
                out.pods.push((
                    *ip,
                    PodAddr {
                        identity: pod.identity.clone(),
                        owner: pod.owner.clone(),
                    },
                ));
            }
        }
        out
    }

    /// The endpoints of port `port_name` of Service `ns/name`: the ready
    /// ones; when none is ready, those still serving while they terminate
    /// (as kube-proxy does).
    fn endpoints(
        &self,
        ns: &str,
        name: &str,
        port_name: &str,
        pods: &BTreeMap<&str, &PodInfo>,
    ) -> Vec<Endpoint> {
        let mut ready = Vec::new();
        let mut terminating = Vec::new();
        for slice in self.slices(ns, name) {
            let Some(target) = slice
                .ports
                .iter()
                .find(|(n, _)| n == port_name)
                .map(|(_, p)| *p)
            else {
                continue;
            };
            for e in &slice.endpoints {
                let list = if e.ready {
                    &mut ready
                } else if e.serving_terminating {
                    &mut terminating
                } else {
                    continue;
                };
                let addr = SocketAddr::new(e.addr, target);
                if list.iter().any(|x: &Endpoint| x.addr == addr) {
                    continue;
                }
                let (identity, owner) = endpoint_identity(ns, e, pods);
                list.push(Endpoint {
                    addr,
                    identity,
                    owner,
                });
            }
        }
        let mut chosen = if ready.is_empty() { terminating } else { ready };
        chosen.sort_by_key(|e| e.addr);
        chosen
    }
}

/// An endpoint's identity is its pod's, when the pod is known, running,
/// and has the endpoint's address (a slice that lags a pod's restart, or
/// names a pod whose IP went to another, gets none).
fn endpoint_identity(
    ns: &str,
    e: &SliceEndpoint,
    pods: &BTreeMap<&str, &PodInfo>,
) -> (EndpointIdentity, Option<String>) {
    let Some(pod) = &e.pod else {
        return (
            EndpointIdentity::Underivable(format!("endpoint {} names no pod", e.addr)),
            None,
        );
    };
    let owner = format!("{ns}/{pod}");
    let identity = match pods.get(owner.as_str()) {
        None => EndpointIdentity::Underivable(format!("pod {owner} is not known")),
        Some(p) if !p.active => EndpointIdentity::Underivable(format!("pod {owner} has finished")),
        Some(p) if !p.ips.contains(&e.addr) => {
            EndpointIdentity::Underivable(format!("pod {owner} does not have address {}", e.addr))
        }
        Some(p) => p.identity.clone(),
    };
    (identity, Some(owner))
}

/// The Service `(namespace, name)` a host name names, as a pod's resolver
/// would find it with the cluster's search path: `NAME.NS.svc.DOMAIN`,
/// `NAME.NS.svc` or `NAME.NS` (both DNS labels); anything else is no
/// Service's name.
pub fn service_of_name(host: &str, cluster_domain: &str) -> Option<(String, String)> {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let domain = cluster_domain.trim_end_matches('.').to_ascii_lowercase();
    let rest = host
        .strip_suffix(&format!(".svc.{domain}"))
        .or_else(|| host.strip_suffix(".svc"))
        .unwrap_or(&host);
    let (name, ns) = rest.split_once('.')?;
    // RFC 1123 labels, as Service and namespace names are.
    let label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    (label(name) && label(ns)).then(|| (ns.to_owned(), name.to_owned()))
}

/// A label selector as the API takes it: `k=v,k2=v2`, sorted.
pub fn selector_string(sel: &BTreeMap<String, String>) -> String {
    sel.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use rampart_identity::SpiffeId;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn svc(selector: bool) -> Obj {
        Obj::Service(SvcInfo {
            cluster_ips: vec![ip("10.96.0.10")],
            ports: vec![
                SvcPort {
                    name: "http".into(),
                    port: 80,
                },
                SvcPort {
                    name: "admin".into(),
                    port: 9000,
                },
            ],
            selector: selector.then(|| [("app".to_owned(), "web".to_owned())].into()),
        })
    }

    fn ep(addr: &str, ready: bool, pod: Option<&str>) -> SliceEndpoint {
        SliceEndpoint {
            addr: ip(addr),
            ready,
            serving_terminating: !ready,
            pod: pod.map(str::to_owned),
        }
    }

    fn pod(name: &str, addr: &str, active: bool) -> (String, Obj) {
        (
            format!("shop/{name}"),
            Obj::Pod(PodInfo {
                owner: format!("shop/{name}"),
                ips: vec![ip(addr)],
                identity: EndpointIdentity::Id(
                    SpiffeId::parse("spiffe://td/ns/shop/sa/web").unwrap(),
                ),
                active,
            }),
        )
    }

    fn keys() -> (WatchKey, WatchKey, WatchKey) {
        (
            WatchKey::Service {
                ns: "shop".into(),
                name: "web".into(),
            },
            WatchKey::Slices {
                ns: "shop".into(),
                service: "web".into(),
            },
            WatchKey::Pods {
                ns: "shop".into(),
                selector: "app=web".into(),
            },
        )
    }

    #[test]
    fn names_are_services_as_a_pod_s_resolver_finds_them() {
        let of = |h: &str| service_of_name(h, "cluster.local");
        let web = Some(("shop".to_owned(), "web".to_owned()));
        assert_eq!(of("web.shop.svc.cluster.local"), web);
        assert_eq!(of("Web.Shop.svc.cluster.local."), web);
        assert_eq!(of("web.shop.svc"), web);
        assert_eq!(of("web.shop"), web);
        assert_eq!(of("web"), None);
        assert_eq!(of("web.shop.example.com"), None);
        assert_eq!(of("web.shop.svc.other.domain"), None);
        assert_eq!(of("-web.shop"), None);
        assert_eq!(of("web_1.shop"), None);
    }

    #[test]
    fn a_service_followed_by_name_is_published_missing_until_it_exists() {
        let mut s = State::default();
        s.use_service_by_name("shop", "web", 80);
        s.use_service_by_name("shop", "web", 81);
        let (svc_k, slices_k, pods_k) = keys();
        for k in s.desired() {
            s.watch_started(k);
        }
        s.apply(&svc_k, Change::Listed(vec![]));
        s.apply(&slices_k, Change::Listed(vec![]));
        // Absent, but not dropped: it stays followed.
        assert!(s.service_synced("shop", "web"));
        assert!(s.deleted_services().is_empty());
        let out = s.source_state("cluster.local");
        let missing: Vec<_> = out
            .services
            .iter()
            .map(|(d, svc)| (svc.name.as_str(), d.len(), svc.missing.as_deref()))
            .collect();
        assert_eq!(
            missing,
            [
                ("shop/web:80", 3, Some("no Service shop/web in the cluster")),
                ("shop/web:81", 3, Some("no Service shop/web in the cluster")),
            ]
        );
        assert!(
            out.services[0]
                .0
                .contains(&Destination::Name("web.shop".into(), 80))
        );
        // It comes (with port 80 only).
        s.apply(&svc_k, Change::Applied("web".into(), svc(true)));
        assert!(s.desired().contains(&pods_k));
        let out = s.source_state("cluster.local");
        let by_name: BTreeMap<_, _> = out
            .services
            .iter()
            .map(|(_, svc)| (svc.name.as_str(), svc.missing.as_deref()))
            .collect();
        assert_eq!(by_name["shop/web:80"], None);
        assert_eq!(
            by_name["shop/web:81"],
            Some("Service shop/web has no TCP port 81")
        );
        // A Service followed by ClusterIP only has no short name.
        let mut t = State::default();
        t.use_service("shop", "web");
        for k in t.desired() {
            t.watch_started(k);
        }
        t.apply(&svc_k, Change::Listed(vec![("web".into(), svc(true))]));
        let (dests, _) = &t.source_state("cluster.local").services[0];
        assert!(!dests.contains(&Destination::Name("web.shop".into(), 80)));
    }

    #[test]
    fn both_address_families_are_destinations_and_endpoints() {
        let mut s = State::default();
        s.use_service("shop", "web");
        let (svc_k, slices_k, pods_k) = keys();
        for k in s.desired() {
            s.watch_started(k);
        }
        let dual = Obj::Service(SvcInfo {
            cluster_ips: vec![ip("10.96.0.10"), ip("fd00::10")],
            ports: vec![SvcPort {
                name: "http".into(),
                port: 80,
            }],
            selector: Some([("app".to_owned(), "web".to_owned())].into()),
        });
        s.apply(&svc_k, Change::Listed(vec![("web".into(), dual)]));
        s.watch_started(pods_k.clone());
        let slice = |addr: &str| {
            Obj::Slice(SliceInfo {
                ports: vec![("http".into(), 8080)],
                endpoints: vec![ep(addr, true, Some("p1"))],
            })
        };
        s.apply(
            &slices_k,
            Change::Listed(vec![
                ("web-v4".into(), slice("10.1.0.1")),
                ("web-v6".into(), slice("fd00:1::1")),
            ]),
        );
        let (name, Obj::Pod(mut p1)) = pod("p1", "10.1.0.1", true) else {
            unreachable!("pod() makes a pod")
        };
        p1.ips.push(ip("fd00:1::1"));
        s.apply(&pods_k, Change::Listed(vec![(name, Obj::Pod(p1))]));
        let out = s.source_state("cluster.local");
        let (dests, svc) = &out.services[0];
        assert!(dests.contains(&Destination::Addr("[fd00::10]:80".parse().unwrap())));
        assert!(dests.contains(&Destination::Addr("10.96.0.10:80".parse().unwrap())));
        let eps: Vec<(String, bool)> = svc
            .endpoints
            .iter()
            .map(|e| (e.addr.to_string(), e.identity.id().is_some()))
            .collect();
        assert_eq!(
            eps,
            [
                ("10.1.0.1:8080".to_owned(), true),
                ("[fd00:1::1]:8080".to_owned(), true)
            ]
        );
        assert_eq!(out.pods.len(), 2, "both addresses are the pod's");
    }

    #[test]
    fn a_service_in_use_needs_three_watches_and_publishes_per_port() {
        let mut s = State::default();
        s.use_service("shop", "web");
        let (svc_k, slices_k, pods_k) = keys();
        assert_eq!(
            s.desired().into_iter().collect::<Vec<_>>(),
            [svc_k.clone(), slices_k.clone()]
        );
        for k in s.desired() {
            s.watch_started(k);
        }
        s.apply(&svc_k, Change::Listed(vec![("web".into(), svc(true))]));
        assert!(s.desired().contains(&pods_k));
        assert!(!s.service_synced("shop", "web"));
        s.watch_started(pods_k.clone());
        s.apply(
            &slices_k,
            Change::Listed(vec![(
                "web-1".into(),
                Obj::Slice(SliceInfo {
                    ports: vec![("http".into(), 8080), ("admin".into(), 9090)],
                    endpoints: vec![
                        ep("10.1.0.2", true, Some("p2")),
                        ep("10.1.0.1", true, Some("p1")),
                        ep("10.1.0.3", false, Some("p3")),
                        ep("10.1.0.4", true, None),
                        ep("10.1.0.5", true, Some("p5")),
                        ep("10.1.0.6", true, Some("p6")),
                    ],
                }),
            )]),
        );
        s.apply(
            &pods_k,
            Change::Listed(vec![
                pod("p1", "10.1.0.1", true),
                pod("p2", "10.1.0.2", true),
                pod("p3", "10.1.0.3", true),
                pod("p5", "10.1.0.50", true),
                pod("p6", "10.1.0.6", false),
            ]),
        );
        assert!(s.service_synced("shop", "web"));
        let out = s.source_state("cluster.local");
        assert_eq!(out.services.len(), 2);
        let (dests, http) = &out.services[0];
        assert_eq!(http.name, "shop/web:80");
        assert_eq!(
            dests,
            &[
                Destination::Addr("10.96.0.10:80".parse().unwrap()),
                Destination::Name("web.shop.svc.cluster.local".into(), 80),
                Destination::Name("web.shop.svc".into(), 80),
            ]
        );
        let eps: Vec<(String, Option<&str>)> = http
            .endpoints
            .iter()
            .map(|e| (e.addr.to_string(), e.identity.id().map(|i| i.as_str())))
            .collect();
        assert_eq!(
            eps,
            [
                ("10.1.0.1:8080".into(), Some("spiffe://td/ns/shop/sa/web")),
                ("10.1.0.2:8080".into(), Some("spiffe://td/ns/shop/sa/web")),
                // No targetRef, the pod's IP moved on, the pod finished.
                ("10.1.0.4:8080".into(), None),
                ("10.1.0.5:8080".into(), None),
                ("10.1.0.6:8080".into(), None),
            ]
        );
        assert_eq!(out.services[1].1.endpoints[0].addr.port(), 9090);
        // Pod addresses: the active pods'.
        let mut pod_ips: Vec<String> = out.pods.iter().map(|(i, _)| i.to_string()).collect();
        pod_ips.sort();
        assert_eq!(pod_ips, ["10.1.0.1", "10.1.0.2", "10.1.0.3", "10.1.0.50"]);
    }

    #[test]
    fn terminating_endpoints_serve_only_when_none_is_ready_and_deletions_apply() {
        let mut s = State::default();
        s.use_service("shop", "web");
        let (svc_k, slices_k, pods_k) = keys();
        for k in [&svc_k, &slices_k, &pods_k] {
            s.watch_started(k.clone());
        }
        s.apply(&svc_k, Change::Listed(vec![("web".into(), svc(true))]));
        s.apply(&pods_k, Change::Listed(vec![pod("p1", "10.1.0.1", true)]));
        let slice = |eps| {
            Obj::Slice(SliceInfo {
                ports: vec![("http".into(), 8080)],
                endpoints: eps,
            })
        };
        s.apply(
            &slices_k,
            Change::Listed(vec![(
                "a".into(),
                slice(vec![ep("10.1.0.1", false, Some("p1"))]),
            )]),
        );
        let count = |s: &State| {
            s.source_state("cluster.local").services[0]
                .1
                .endpoints
                .len()
        };
        assert_eq!(count(&s), 1, "terminating but serving, none ready");
        s.apply(
            &slices_k,
            Change::Applied("b".into(), slice(vec![ep("10.1.0.9", true, Some("p9"))])),
        );
        let eps = &s.source_state("cluster.local").services[0].1.endpoints;
        assert_eq!(eps.len(), 1);
        assert_eq!(eps[0].addr.to_string(), "10.1.0.9:8080");
        s.apply(&slices_k, Change::Deleted("b".into()));
        s.apply(&slices_k, Change::Deleted("a".into()));
        assert_eq!(count(&s), 0);
        // The Service is deleted: reported, and a stopped watch's late
        // reports are ignored.
        s.apply(&svc_k, Change::Deleted("web".into()));
        assert_eq!(s.deleted_services(), [("shop".into(), "web".into())]);
        s.watch_stopped(&pods_k);
        assert!(!s.apply(&pods_k, Change::Listed(vec![])));
    }

    #[test]
    fn a_service_without_selector_watches_the_pods_its_slices_name() {
        let mut s = State::default();
        s.use_service("shop", "web");
        let (svc_k, slices_k, _) = keys();
        s.watch_started(svc_k.clone());
        s.watch_started(slices_k.clone());
        s.apply(&svc_k, Change::Listed(vec![("web".into(), svc(false))]));
        s.apply(
            &slices_k,
            Change::Listed(vec![(
                "a".into(),
                Obj::Slice(SliceInfo {
                    ports: vec![("http".into(), 8080)],
                    endpoints: vec![ep("10.1.0.1", true, Some("p1")), ep("10.1.0.2", true, None)],
                }),
            )]),
        );
        assert!(s.desired().contains(&WatchKey::Pod {
            ns: "shop".into(),
            name: "p1".into()
        }));
        assert_eq!(s.desired().len(), 3);
        s.use_pod_ip(ip("10.1.7.7"));
        assert!(s.desired().contains(&WatchKey::PodByIp(ip("10.1.7.7"))));
    }
}
