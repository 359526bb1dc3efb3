//! The DNS source (names outside Kubernetes, as in Linkerd): each
//! configured name is resolved and its addresses are the endpoints of
//! service `NAME:PORT`, every one held to the SPIFFE ID the configuration
//! gives the name. SRV records first, where the name has them (RFC 2782:
//! the targets of the lowest priority, each with its own port; a target
//! of `.` means none; weights are left to the balancer, which measures),
//! else A and AAAA with the configured port. A name is
//! resolved again when its records' TTL runs out (at least every
//! [`MIN_REFRESH`], at most [`MAX_REFRESH`] apart). A failed lookup keeps
//! the last good endpoints (logged, counted); a name that does not exist
//! (NXDOMAIN) or has no address has no endpoints (503 at once).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::{Resolver, TokioResolver};
use rampart_identity::SpiffeId;
use serde::{Deserialize, Serialize};

use crate::model::{Destination, Endpoint, EndpointIdentity, Service, SourceKind, SourceState};
use crate::registry::Publisher;

/// The shortest time between two lookups of a name.
pub const MIN_REFRESH: Duration = Duration::from_secs(1);
/// The longest time a lookup is kept, whatever its TTL.
pub const MAX_REFRESH: Duration = Duration::from_secs(30);

/// `discovery.dns`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// Name servers (`IP` or `IP:PORT`); empty: those of /etc/resolv.conf.
    #[serde(default)]
    pub servers: Vec<String>,
    /// The names to resolve.
    pub names: Vec<DnsName>,
}

/// One name and what its servers must present.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DnsName {
    /// The host name (absolute; no search domains are tried).
    pub name: String,
    /// The port of its endpoints.
    pub port: u16,
    /// The SPIFFE ID every address of the name must present.
    pub identity: SpiffeId,
    /// Other destinations that lead to it (addresses an app dials, such
    /// as an explicit listener's target), besides `name:port`.
    #[serde(default)]
    pub destinations: Vec<String>,
}

impl DnsConfig {
    /// Every problem, as (field path, reason).
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        for (i, s) in self.servers.iter().enumerate() {
            if parse_server(s).is_none() {
                p.push((
                    format!("discovery.dns.servers[{i}]"),
                    format!("`{s}` is not IP or IP:PORT"),
                ));
            }
        }
        if self.names.is_empty() {
            p.push(("discovery.dns.names".into(), "names no name".into()));
        }
        for (i, n) in self.names.iter().enumerate() {
            if format!("{}:{}", n.name, n.port)
                .parse::<Destination>()
                .is_err()
                || n.name.parse::<IpAddr>().is_ok()
            {
                p.push((
                    format!("discovery.dns.names[{i}].name"),
                    format!("`{}` is not a host name", n.name),
                ));
            }
            for (j, d) in n.destinations.iter().enumerate() {
                if let Err(e) = d.parse::<Destination>() {
                    p.push((format!("discovery.dns.names[{i}].destinations[{j}]"), e));
                }
            }
        }
        p
    }
}

fn parse_server(s: &str) -> Option<SocketAddr> {
    s.parse::<SocketAddr>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53)))
}

/// Why the resolver could not be built.
#[derive(Debug, thiserror::Error)]
#[error("DNS resolver: {0}")]
pub struct DnsStartError(String);

fn resolver(cfg: &DnsConfig) -> Result<TokioResolver, DnsStartError> {
    let mut opts = ResolverOpts::default();
    // Our own refresh follows the TTL; the resolver's cache would only
    // delay a change.
    opts.cache_size = 0;
    opts.timeout = Duration::from_secs(2);
    opts.attempts = 2;
    opts.ndots = 0;
    let builder = if cfg.servers.is_empty() {
        Resolver::builder(TokioRuntimeProvider::default())
            .map_err(|e| DnsStartError(e.to_string()))?
    } else {
        let servers = cfg
            .servers
            .iter()
            .filter_map(|s| parse_server(s))
            .map(|a| {
                let mut udp = ConnectionConfig::udp();
                udp.port = a.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = a.port();
                NameServerConfig::new(a.ip(), true, vec![udp, tcp])
            })
            .collect();
        Resolver::builder_with_config(
            ResolverConfig::from_name_servers(servers),
            TokioRuntimeProvider::default(),
        )
    };
    builder
        .with_options(opts)
        .build()
        .map_err(|e| DnsStartError(e.to_string()))
}

/// What is known of one name.
#[derive(Debug, Clone, Default)]
struct Known {
    addrs: Vec<SocketAddr>,
}

/// Why a name has no addresses.
enum Missing {
    /// It does not exist, or has no usable records: no endpoints.
    NoRecords,
    /// The lookup failed: keep what was known.
    Failed(hickory_resolver::net::NetError),
}

/// The endpoints of `fqdn`: its SRV targets' addresses with their ports,
/// or (no SRV records) its A/AAAA addresses with `port`; and until when
/// the answer holds.
async fn resolve(
    resolver: &TokioResolver,
    fqdn: &str,
    port: u16,
) -> Result<(Vec<SocketAddr>, std::time::Instant), Missing> {
    let none = |e: &hickory_resolver::net::NetError| e.is_no_records_found() || e.is_nx_domain();
    match resolver.lookup(fqdn, RecordType::SRV).await {
        Ok(srv) => {
            let records: Vec<_> = srv
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::SRV(s) => Some(s.clone()),
                    _ => None,
                })
                .collect();
            if let Some(best) = records.iter().map(|s| s.priority).min() {
                let mut addrs = Vec::new();
                let mut until = srv.valid_until();
                for s in records.iter().filter(|s| s.priority == best) {
                    if s.target.is_root() {
                        continue;
                    }
                    match resolver.lookup_ip(s.target.clone()).await {
                        Ok(ips) => {
                            until = until.min(ips.valid_until());
                            addrs.extend(ips.iter().map(|ip| SocketAddr::new(ip, s.port)));
                        }
                        Err(e) if none(&e) => {}
                        Err(e) => return Err(Missing::Failed(e)),
                    }
                }
                return if addrs.is_empty() {
                    Err(Missing::NoRecords)
                } else {
                    Ok((addrs, until))
                };
            }
        }
        // No SRV records: the name's own addresses.
        Err(e) if none(&e) => {}
        Err(e) => return Err(Missing::Failed(e)),
    }
    match resolver.lookup_ip(fqdn).await {
        Ok(found) => Ok((
            found.iter().map(|ip| SocketAddr::new(ip, port)).collect(),
            found.valid_until(),
        )),
        Err(e) if none(&e) => Err(Missing::NoRecords),
        Err(e) => Err(Missing::Failed(e)),
    }
}

fn state(cfg: &DnsConfig, known: &[Known]) -> SourceState {
    let mut s = SourceState::default();
    for (n, k) in cfg.names.iter().zip(known) {
        let name = format!("{}:{}", n.name.to_ascii_lowercase(), n.port);
        let mut dests: Vec<Destination> = n
            .destinations
            .iter()
            .filter_map(|d| d.parse().ok())
            .collect();
        if let Ok(d) = name.parse() {
            dests.push(d);
        }
        let mut addrs = k.addrs.clone();
        addrs.sort();
        addrs.dedup();
        s.services.push((
            dests,
            Service {
                name,
                source: SourceKind::Dns,
                endpoints: addrs
                    .into_iter()
                    .map(|addr| Endpoint {
                        addr,
                        identity: EndpointIdentity::Id(n.identity.clone()),
                        owner: Some(n.name.clone()),
                    })
                    .collect(),
                missing: None,
            },
        ));
    }
    s
}

/// Builds the resolver and returns the worker that resolves every name
/// and keeps them fresh, publishing on every change.
pub fn start(
    cfg: DnsConfig,
    publisher: Publisher,
) -> Result<impl std::future::Future<Output = ()>, DnsStartError> {
    let resolver = resolver(&cfg)?;
    // Known (empty) at once: a name's destinations answer 503, not the
    // rules, until its first lookup.
    let mut known = vec![Known::default(); cfg.names.len()];
    publisher.publish(state(&cfg, &known));
    Ok(async move {
        let mut next = vec![tokio::time::Instant::now(); cfg.names.len()];
        loop {
            let now = tokio::time::Instant::now();
            let mut changed = false;
            for (i, n) in cfg.names.iter().enumerate() {
                if next[i] > now {
                    continue;
                }
                // Absolute: no search domain is appended.
                let fqdn = format!("{}.", n.name.trim_end_matches('.'));
                match resolve(&resolver, &fqdn, n.port).await {
                    Ok((addrs, valid_until)) => {
                        let ttl = valid_until.saturating_duration_since(std::time::Instant::now());
                        next[i] = now + ttl.clamp(MIN_REFRESH, MAX_REFRESH);
                        if addrs != known[i].addrs {
                            tracing::info!(name = %n.name, addresses = ?addrs, "DNS endpoints changed");
                            known[i].addrs = addrs;
                            changed = true;
                        }
                        crate::metrics::source_update(SourceKind::Dns, true);
                    }
                    Err(Missing::NoRecords) => {
                        next[i] = now + MIN_REFRESH;
                        if !known[i].addrs.is_empty() {
                            tracing::info!(name = %n.name, "DNS name has no address any more");
                            known[i].addrs.clear();
                            changed = true;
                        }
                        crate::metrics::source_update(SourceKind::Dns, true);
                    }
                    Err(Missing::Failed(e)) => {
                        next[i] = now + MIN_REFRESH;
                        tracing::warn!(name = %n.name, error = %e, "DNS lookup failed; keeping the last endpoints");
                        crate::metrics::source_update(SourceKind::Dns, false);
                    }
                }
            }
            if changed {
                publisher.publish(state(&cfg, &known));
            }
            let wake = next.iter().min().copied().unwrap_or(now + MAX_REFRESH);
            tokio::time::sleep_until(wake.max(now + Duration::from_millis(100))).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> DnsConfig {
        serde_yaml::from_str(text).unwrap()
    }

    #[test]
    fn configuration_is_checked() {
        let c = cfg(
            "servers: [\"10.0.0.1\", \"10.0.0.1:5353\", \"nope\"]\nnames:\n  - name: backend.example\n    port: 80\n    identity: spiffe://td/b\n    destinations: [\"10.96.0.1:80\", \"bad\"]\n  - name: 10.0.0.9\n    port: 80\n    identity: spiffe://td/b\n",
        );
        let p = c.validate();
        let fields: Vec<_> = p.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            [
                "discovery.dns.servers[2]",
                "discovery.dns.names[0].destinations[1]",
                "discovery.dns.names[1].name"
            ],
            "{p:?}"
        );
    }

    #[test]
    fn a_name_is_a_service_of_its_addresses_with_the_name_s_identity() {
        let c = cfg(
            "names:\n  - name: Backend.Example\n    port: 8080\n    identity: spiffe://td/b\n    destinations: [\"10.96.0.1:80\"]\n",
        );
        let s = state(
            &c,
            &[Known {
                addrs: vec![
                    "10.0.0.2:8080".parse().unwrap(),
                    "10.0.0.1:8080".parse().unwrap(),
                ],
            }],
        );
        let snap = crate::model::Snapshot::merge([&s], 1);
        let crate::model::Lookup::Service(svc) = snap.lookup("10.96.0.1:80".parse().unwrap())
        else {
            panic!()
        };
        assert_eq!(svc.name, "backend.example:8080");
        assert_eq!(
            svc.endpoints
                .iter()
                .map(|e| e.addr.to_string())
                .collect::<Vec<_>>(),
            ["10.0.0.1:8080", "10.0.0.2:8080"]
        );
        assert!(
            svc.endpoints
                .iter()
                .all(|e| e.identity.id().unwrap().as_str() == "spiffe://td/b")
        );
        assert!(matches!(
            snap.lookup_dest(&"backend.example:8080".parse().unwrap(), None),
            crate::model::Lookup::Service(_)
        ));
    }
}
