//! The listen stage: binds listener sockets with the options a proxy wants
//! and pairs each with its destination rule and connection limit. The
//! [`Listener`] it makes is what the `accept` stage accepts from.

use std::net::SocketAddr;
use std::sync::Arc;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

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
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    TcpListener::from_std(sock.into())
}

/// A bound listener with its destination rule and connection limit.
#[derive(Debug)]
pub struct Listener {
    pub(crate) listener: TcpListener,
    pub(crate) dst: DstSource,
    pub(crate) slots: Arc<Semaphore>,
    pub(crate) local: SocketAddr,
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
            local,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}
