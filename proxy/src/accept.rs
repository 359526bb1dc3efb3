//! The accept stage: turns each socket accepted from a [`Listener`] (the
//! `listen` stage) into an [`Accepted`] value carrying its client and
//! original destination (the `orig_dst` stage for captured listeners).
//! Transparent and explicit listeners differ only here, in how the
//! destination is found.

use std::net::SocketAddr;

use tokio::net::TcpStream;

pub use crate::listen::{DstSource, Listener, Slot};
use crate::metrics::ForwardFailure;
use crate::orig_dst::{NoOriginalDst, original_dst};

/// Address of the connecting client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

/// Where the client meant to connect: the pre-NAT destination for captured
/// connections, the configured target for explicit listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrigDstAddr(pub SocketAddr);

/// An accepted connection and what is known about it. Generic over its
/// stream so that later stages are tested over `tokio::io::duplex`.
#[derive(Debug)]
pub struct Accepted<S = TcpStream> {
    /// The client.
    pub client: ClientAddr,
    /// The destination.
    pub orig_dst: OrigDstAddr,
    /// The socket.
    pub stream: S,
    /// Holds the listener's connection slot until the connection ends (and
    /// its source's pending place until it is established).
    pub slot: Slot,
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

impl AcceptError {
    /// The metric label.
    pub fn reason(&self) -> ForwardFailure {
        match self {
            AcceptError::NoOriginalDst(_) => ForwardFailure::NoOriginalDst,
            AcceptError::Loop(_) => ForwardFailure::OriginalDstLoop,
        }
    }
}

impl Listener {
    /// Waits for a connection slot and a connection. Accept errors (for
    /// example running out of file descriptors) are returned to the caller,
    /// which backs off; classification errors come with the socket so the
    /// caller can log and close it.
    /// A full listener is logged (once per 10 s) and counted; so is a
    /// connection over its source's pending limit, which is closed here.
    pub async fn accept(&self) -> std::io::Result<Result<Accepted, (AcceptError, ClientAddr)>> {
        let permit = match self.slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                crate::metrics::listener_full();
                if let Some(suppressed) = self.full_log.hit() {
                    tracing::warn!(
                        listener = %self.local,
                        max_connections = self.max_connections,
                        suppressed,
                        "listener full: new connections wait until one closes"
                    );
                }
                // Invariant: the semaphore is never closed.
                self.slots
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("semaphore open")
            }
        };
        let (stream, peer, pending) = loop {
            let (stream, peer) = self.listener.accept().await?;
            let Some(table) = &self.pending else {
                break (stream, peer, None);
            };
            match table.admit(peer.ip()) {
                Some(g) => break (stream, peer, Some(g)),
                None => {
                    crate::metrics::source_pending_refused();
                    if let Some(suppressed) = self.source_log.hit() {
                        tracing::warn!(
                            listener = %self.local,
                            src.addr = %peer,
                            suppressed,
                            "connection closed: its source has too many connections in handshake"
                        );
                    }
                    drop(stream);
                }
            }
        };
        let slot = Slot::new(permit, pending);
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
            slot,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::listen::{self, DstSource};

    #[tokio::test]
    async fn an_explicit_listener_gives_its_configured_destination() {
        let target: SocketAddr = "10.0.0.9:8080".parse().unwrap();
        let l = Listener::new(
            listen::bind("127.0.0.1:0".parse().unwrap()).unwrap(),
            DstSource::Fixed(target),
            1,
        )
        .unwrap();
        let client = tokio::net::TcpStream::connect(l.local_addr())
            .await
            .unwrap();
        let a = l.accept().await.unwrap().expect("classified");
        assert_eq!(a.orig_dst.0, target);
        assert_eq!(a.client.0, client.local_addr().unwrap());
        // The one slot is held by `a`: a second connection waits.
        let _c2 = tokio::net::TcpStream::connect(l.local_addr())
            .await
            .unwrap();
        let waited = tokio::time::timeout(std::time::Duration::from_millis(100), l.accept()).await;
        assert!(waited.is_err(), "the connection limit holds");
        drop(a);
        let b = tokio::time::timeout(std::time::Duration::from_secs(5), l.accept()).await;
        assert!(matches!(b, Ok(Ok(Ok(_)))), "a freed slot admits the next");
    }

    #[test]
    fn a_loop_is_not_counted_as_a_missing_original_destination() {
        let e = AcceptError::Loop("127.0.0.1:15001".parse().unwrap());
        assert_eq!(e.reason(), ForwardFailure::OriginalDstLoop);
        assert_eq!(e.reason().as_str(), "original_dst_loop");
        let e = AcceptError::NoOriginalDst(NoOriginalDst(std::io::Error::other("x")));
        assert_eq!(e.reason().as_str(), "no_original_dst");
    }
}
