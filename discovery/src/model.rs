//! What the sidecar knows about the mesh: destinations (the address an app
//! dials: a ClusterIP or virtual IP with its port, or a name) lead to a
//! service, a service to its endpoints, and every endpoint carries the
//! SPIFFE ID its server must present. Pod addresses are known too, so that
//! an app dialling a pod IP directly is held to that pod's identity.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use rampart_identity::SpiffeId;

/// Which kind of source told us about a service (a metric label and the
/// admin listing's `source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SourceKind {
    /// The static file.
    File,
    /// The Kubernetes API server.
    Kubernetes,
    /// DNS A/AAAA records.
    Dns,
}

impl SourceKind {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::File => "file",
            SourceKind::Kubernetes => "kubernetes",
            SourceKind::Dns => "dns",
        }
    }
}

/// The server identity of an endpoint, or why there is none.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EndpointIdentity {
    /// The SPIFFE ID its server must present in the handshake.
    Id(SpiffeId),
    /// The source knows the endpoint but cannot say who must answer (a
    /// pod without the label the template needs, a template result that
    /// is not a SPIFFE ID): nothing is sent to it (fail closed).
    Underivable(String),
}

impl EndpointIdentity {
    /// The expected ID, if one could be derived.
    pub fn id(&self) -> Option<&SpiffeId> {
        match self {
            EndpointIdentity::Id(id) => Some(id),
            EndpointIdentity::Underivable(_) => None,
        }
    }
}

/// One address requests can go to, with the identity it must present.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// The pod IP and target port (what the sidecar dials).
    pub addr: SocketAddr,
    /// Who must answer there.
    pub identity: EndpointIdentity,
    /// The pod or host it belongs to (`namespace/name` in Kubernetes), for
    /// the admin listing.
    pub owner: Option<String>,
}

/// A service: a name and the endpoints serving one of its ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// `namespace/name:port` in Kubernetes, the entry's name in the file,
    /// `host:port` for DNS. Unique within the snapshot; the metric label.
    pub name: String,
    /// Who told us.
    pub source: SourceKind,
    /// Where requests go, in a stable order.
    pub endpoints: Vec<Endpoint>,
    /// Set when the source follows this service but it does not exist (a
    /// Kubernetes Service an explicit listener names, not or no longer in
    /// the cluster): why, for the 503 its requests get.
    pub missing: Option<String>,
}

/// A pod (or host) address a source attributes to a workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodAddr {
    /// Its identity, or why none.
    pub identity: EndpointIdentity,
    /// `namespace/name`, for logs and the admin listing.
    pub owner: String,
}

/// Everything one source currently knows; a source publishes all of it on
/// every change (sources are small or scoped to what the app dialled).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SourceState {
    /// Services and the destinations that lead to them.
    pub services: Vec<(Vec<Destination>, Service)>,
    /// Pod addresses with their identities.
    pub pods: Vec<(IpAddr, PodAddr)>,
}

/// What an app dials; in the configuration (an explicit listener's
/// `target`), `ADDR:PORT` or `HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Destination {
    /// A ClusterIP (or any virtual IP) and port.
    Addr(SocketAddr),
    /// A host name and port (explicit listeners, DNS).
    Name(String, u16),
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Destination::Addr(a) => write!(f, "{a}"),
            Destination::Name(h, p) => write!(f, "{h}:{p}"),
        }
    }
}

impl Destination {
    /// Its port.
    pub fn port(&self) -> u16 {
        match self {
            Destination::Addr(a) => a.port(),
            Destination::Name(_, p) => *p,
        }
    }

    /// The socket address, when it is one.
    pub fn addr(&self) -> Option<SocketAddr> {
        match self {
            Destination::Addr(a) => Some(*a),
            Destination::Name(..) => None,
        }
    }
}

impl From<SocketAddr> for Destination {
    fn from(a: SocketAddr) -> Self {
        Destination::Addr(a)
    }
}

impl serde::Serialize for Destination {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Destination {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl std::str::FromStr for Destination {
    type Err = String;

    /// `10.96.0.10:80`, `[fd00::1]:80` or `backend.example:8080`.
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(Destination::Addr(a));
        }
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("`{s}` is not HOST:PORT"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("`{port}` in `{s}` is not a port number"))?;
        if host.is_empty()
            || !host
                .chars()
                // `_` for SRV names (`_http._tcp.backend.example`).
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        {
            return Err(format!("`{host}` in `{s}` is not a host name"));
        }
        Ok(Destination::Name(host.to_ascii_lowercase(), port))
    }
}

/// What an address the app dialled is, to discovery.
#[derive(Debug, Clone)]
pub enum Lookup {
    /// A service: balance over its endpoints.
    Service(Arc<Service>),
    /// A pod's own address: go there, holding it to the pod's identity.
    Pod(Endpoint),
    /// No source knows it: today's behaviour (original destination and the
    /// `outbound.servers` rules).
    Unknown,
}

/// The merged view of every source at one moment, published whole.
#[derive(Debug, Default)]
pub struct Snapshot {
    services: BTreeMap<String, Arc<Service>>,
    by_dest: HashMap<Destination, String>,
    pods: HashMap<IpAddr, PodAddr>,
    /// How many times the sources' states were merged (for the listing).
    pub version: u64,
}

impl Snapshot {
    /// Merges the sources' states, in source order: a destination or pod
    /// address two sources claim goes to the first (logged).
    pub fn merge<'a>(states: impl IntoIterator<Item = &'a SourceState>, version: u64) -> Snapshot {
        let mut s = Snapshot {
            version,
            ..Snapshot::default()
        };
        for state in states {
            for (dests, svc) in &state.services {
                if s.services.contains_key(&svc.name) {
                    tracing::warn!(service = %svc.name, "two sources name the same service; the first wins");
                    continue;
                }
                for d in dests {
                    if let Some(prev) = s.by_dest.get(d) {
                        tracing::warn!(destination = %d, first = %prev, second = %svc.name, "destination claimed twice; the first wins");
                        continue;
                    }
                    s.by_dest.insert(d.clone(), svc.name.clone());
                }
                s.services.insert(svc.name.clone(), Arc::new(svc.clone()));
            }
            for (ip, pod) in &state.pods {
                s.pods.entry(*ip).or_insert_with(|| pod.clone());
            }
        }
        s
    }

    /// What `dst` (an address the app dialled) is.
    pub fn lookup(&self, dst: SocketAddr) -> Lookup {
        self.lookup_dest(&Destination::Addr(dst), Some(dst))
    }

    /// What a destination is; `addr` is the socket address it was dialled
    /// at, if any (to recognise pod addresses).
    pub fn lookup_dest(&self, dest: &Destination, addr: Option<SocketAddr>) -> Lookup {
        if let Some(svc) = self.by_dest.get(dest).and_then(|n| self.services.get(n)) {
            return Lookup::Service(svc.clone());
        }
        if let Some(addr) = addr
            && let Some(pod) = self.pods.get(&addr.ip())
        {
            return Lookup::Pod(Endpoint {
                addr,
                identity: pod.identity.clone(),
                owner: Some(pod.owner.clone()),
            });
        }
        Lookup::Unknown
    }

    /// A service by name.
    pub fn service(&self, name: &str) -> Option<&Arc<Service>> {
        self.services.get(name)
    }

    /// Every service, by name.
    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.values()
    }

    /// The destinations leading to service `name`.
    pub fn destinations_of(&self, name: &str) -> Vec<&Destination> {
        let mut d: Vec<_> = self
            .by_dest
            .iter()
            .filter(|(_, n)| n.as_str() == name)
            .map(|(d, _)| d)
            .collect();
        d.sort();
        d
    }

    /// How many pod addresses are known.
    pub fn pod_count(&self) -> usize {
        self.pods.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> EndpointIdentity {
        EndpointIdentity::Id(SpiffeId::parse(s).unwrap())
    }

    #[test]
    fn destinations_parse() {
        assert_eq!(
            "10.0.0.1:80".parse::<Destination>().unwrap(),
            Destination::Addr("10.0.0.1:80".parse().unwrap())
        );
        assert_eq!(
            "Backend.Example:8080".parse::<Destination>().unwrap(),
            Destination::Name("backend.example".into(), 8080)
        );
        assert!("backend".parse::<Destination>().is_err());
        assert!("backend:http".parse::<Destination>().is_err());
        assert!("a b:80".parse::<Destination>().is_err());
    }

    #[test]
    fn lookups_prefer_services_then_pods_and_the_first_source_wins() {
        let ep = |a: &str, i: &str| Endpoint {
            addr: a.parse().unwrap(),
            identity: id(i),
            owner: None,
        };
        let vip: SocketAddr = "10.96.0.1:80".parse().unwrap();
        let first = SourceState {
            services: vec![(
                vec![Destination::Addr(vip)],
                Service {
                    name: "a".into(),
                    source: SourceKind::File,
                    endpoints: vec![ep("10.1.0.1:8080", "spiffe://td/a")],
                    missing: None,
                },
            )],
            pods: vec![(
                "10.1.0.9".parse().unwrap(),
                PodAddr {
                    identity: EndpointIdentity::Underivable("no label".into()),
                    owner: "ns/p".into(),
                },
            )],
        };
        let second = SourceState {
            services: vec![(
                vec![Destination::Addr(vip)],
                Service {
                    name: "b".into(),
                    source: SourceKind::Dns,
                    endpoints: vec![],
                    missing: None,
                },
            )],
            pods: vec![],
        };
        let s = Snapshot::merge([&first, &second], 1);
        match s.lookup(vip) {
            Lookup::Service(svc) => assert_eq!(svc.name, "a"),
            other => panic!("{other:?}"),
        }
        match s.lookup("10.1.0.9:8080".parse().unwrap()) {
            Lookup::Pod(e) => assert!(e.identity.id().is_none()),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            s.lookup("10.1.0.10:8080".parse().unwrap()),
            Lookup::Unknown
        ));
        assert_eq!(s.destinations_of("b"), Vec::<&Destination>::new());
    }
}
