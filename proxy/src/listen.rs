//! The listen stage: binds listener sockets with the options a proxy wants
//! and pairs each with its destination rule and connection limits. The
//! [`Listener`] it makes is what the `accept` stage accepts from.
//!
//! Two limits keep a flood from one client off everyone else (issue 19,
//! F3): `max_connections` slots per listener, held for a connection's
//! life, and, on inbound listeners, at most `max_pending_per_source`
//! connections per source address (per /64 for IPv6) that have not yet
//! finished their handshake and protocol detection. A connection over the
//! second is closed at once; a full listener is logged (rate-limited) and
//! counted.
//!
//! Sockets are bound with `SO_REUSEPORT`, so that a replacement process
//! can bind the same ports while this one drains (a hot restart without a
//! gap); Linux shares a port only between sockets of the same effective
//! user.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::log_limit::{EVERY, RateLimited};

/// How a listener learns a connection's destination.
#[derive(Debug, Clone, Copy)]
pub enum DstSource {
    /// From `SO_ORIGINAL_DST` (iptables REDIRECT).
    OriginalDst,
    /// A fixed, configured target.
    Fixed(SocketAddr),
}

/// Binds a TCP listener with the options a proxy wants.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let domain = if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let sock = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    TcpListener::from_std(sock.into())
}

/// A bound listener with its destination rule and connection limits.
#[derive(Debug)]
pub struct Listener {
    pub(crate) listener: TcpListener,
    pub(crate) dst: DstSource,
    pub(crate) slots: Arc<Semaphore>,
    pub(crate) max_connections: usize,
    pub(crate) local: SocketAddr,
    /// Connections still in handshake or detection, per source.
    pub(crate) pending: Option<Arc<PendingBySource>>,
    pub(crate) full_log: RateLimited,
    pub(crate) source_log: RateLimited,
}

impl Listener {
    /// Wraps a bound listener.
    pub fn new(
        listener: TcpListener,
        dst: DstSource,
        max_connections: usize,
    ) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        Ok(Listener {
            listener,
            dst,
            slots: Arc::new(Semaphore::new(max_connections)),
            max_connections,
            local,
            pending: None,
            full_log: RateLimited::new(EVERY),
            source_log: RateLimited::new(EVERY),
        })
    }

    /// Limits each source address (each /64 for IPv6) to `per_source`
    /// connections that have not finished their handshake and detection
    /// ([`Slot::established`]); the ones over it are closed at accept.
    /// For inbound listeners: an outbound listener's only source is the
    /// pod's own app.
    pub fn with_pending_limit(mut self, per_source: usize) -> Self {
        self.pending = Some(Arc::new(PendingBySource {
            limit: per_source,
            counts: Mutex::new(HashMap::new()),
        }));
        self
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

/// A connection's hold on its listener: one of its `max_connections`
/// slots for the connection's whole life and, until
/// [`Slot::established`], one of its source's pending places.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    pending: Option<PendingGuard>,
}

impl Slot {
    pub(crate) fn new(permit: OwnedSemaphorePermit, pending: Option<PendingGuard>) -> Slot {
        Slot {
            _permit: permit,
            pending,
        }
    }

    /// The connection finished its handshake and protocol detection: it
    /// no longer counts against its source's pending limit.
    pub fn established(&mut self) {
        self.pending = None;
    }
}

impl From<OwnedSemaphorePermit> for Slot {
    fn from(permit: OwnedSemaphorePermit) -> Slot {
        Slot::new(permit, None)
    }
}

/// Counts, per source, the connections still in handshake or detection.
#[derive(Debug)]
pub(crate) struct PendingBySource {
    limit: usize,
    counts: Mutex<HashMap<IpAddr, usize>>,
}

/// One pending place of a source; released on drop.
#[derive(Debug)]
pub(crate) struct PendingGuard {
    table: Arc<PendingBySource>,
    source: IpAddr,
}

/// The key a source is counted under: its address, or its /64 for IPv6
/// (one host's usual allocation, so that it cannot spread over addresses).
fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
    }
}

impl PendingBySource {
    /// A pending place for a connection from `ip`, or `None` when the
    /// source has its limit in handshake or detection already.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<PendingGuard> {
        let source = source_key(ip);
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(source).or_insert(0);
        if *n >= self.limit {
            return None;
        }
        *n += 1;
        Some(PendingGuard {
            table: self.clone(),
            source,
        })
    }
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        let mut counts = self.table.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_source_has_its_own_pending_limit_and_places_come_back() {
        let t = Arc::new(PendingBySource {
            limit: 2,
            counts: Mutex::new(HashMap::new()),
        });
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let g1 = t.admit(a).unwrap();
        let _g2 = t.admit(a).unwrap();
        assert!(t.admit(a).is_none(), "a third pending connection from a");
        assert!(t.admit(b).is_some(), "b is not held back by a");
        drop(g1);
        assert!(t.admit(a).is_some(), "a released place is reused");
        // The same host over IPv4-mapped IPv6 and across one /64.
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(source_key(mapped), a);
        let (x, y): (IpAddr, IpAddr) = (
            "2001:db8::1".parse().unwrap(),
            "2001:db8::ffff:2".parse().unwrap(),
        );
        assert_eq!(source_key(x), source_key(y));
        assert_ne!(
            source_key(x),
            source_key("2001:db8:0:1::1".parse().unwrap())
        );
    }
}
