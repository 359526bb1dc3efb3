//! Listening and accepting: binds listener sockets and turns each accepted
//! socket into an [`Accepted`] value carrying its client and original
//! destination. Transparent and explicit listeners differ only here, in how
//! the destination is found.

use std::net::SocketAddr;
use std::sync::Arc;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::orig_dst::{NoOriginalDst, original_dst};

/// Address of the connecting client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

/// Where the client meant to connect: the pre-NAT destination for captured
/// connections, the configured target for explicit listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrigDstAddr(pub SocketAddr);

/// How a listener learns a connection's destination.
#[derive(Debug, Clone, Copy)]
pub enum DstSource {
    /// From `SO_ORIGINAL_DST` (iptables REDIRECT).
    OriginalDst,
    /// A fixed, configured target.
    Fixed(SocketAddr),
}

/// An accepted connection and what is known about it.
#[derive(Debug)]
pub struct Accepted {
    /// The client.
    pub client: ClientAddr,
    /// The destination.
    pub orig_dst: OrigDstAddr,
    /// The socket.
    pub stream: TcpStream,
    /// Holds the listener's connection slot until the connection ends.
    pub _slot: OwnedSemaphorePermit,
}

/// Why an accepted connection could not be classified.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    /// The socket was not redirected (someone connected to the capture port directly).
    #[error(transparent)]
    NoOriginalDst(#[from] NoOriginalDst),
    /// The original destination is the listener itself: forwarding would loop.
    #[error("original destination {0} is the listener itself; refusing to loop")]
    Loop(SocketAddr),
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
    listener: TcpListener,
    dst: DstSource,
    slots: Arc<Semaphore>,
    local: SocketAddr,
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

    /// Waits for a connection slot and a connection. Accept errors (for
    /// example running out of file descriptors) are returned to the caller,
    /// which backs off; classification errors come with the socket so the
    /// caller can log and close it.
    pub async fn accept(&self) -> std::io::Result<Result<Accepted, (AcceptError, ClientAddr)>> {
        // Invariant: the semaphore is never closed.
        let slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore open");
        let (stream, peer) = self.listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let client = ClientAddr(peer);
        let dst = match self.dst {
            DstSource::Fixed(t) => t,
            DstSource::OriginalDst => {
                let local = stream.local_addr()?;
                match original_dst(&stream, local) {
                    Ok(d)
                        if d == local || d.port() == self.local.port() && d.ip() == local.ip() =>
                    {
                        return Ok(Err((AcceptError::Loop(d), client)));
                    }
                    Ok(d) => d,
                    Err(e) => return Ok(Err((e.into(), client))),
                }
            }
        };
        Ok(Ok(Accepted {
            client,
            orig_dst: OrigDstAddr(dst),
            stream,
            _slot: slot,
        }))
    }
}
