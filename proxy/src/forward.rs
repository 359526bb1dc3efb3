//! The forward stage: connects to the target and splices bytes both ways,
//! propagating half-close (a FIN or TLS close_notify in one direction shuts
//! down only that direction).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::authz::Permitted;

/// Why a target could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The target refused or reset the connection.
    #[error("connecting to {0}: {1}")]
    Refused(SocketAddr, std::io::Error),
    /// The target did not answer in time.
    #[error("connecting to {0}: timed out")]
    Timeout(SocketAddr),
}

impl ConnectError {
    /// Fixed metric label.
    pub fn label(&self) -> &'static str {
        match self {
            ConnectError::Refused(..) => "connect_refused",
            ConnectError::Timeout(_) => "connect_timeout",
        }
    }
}

/// Connects to `target` with a timeout.
pub async fn connect(target: SocketAddr, timeout: Duration) -> Result<TcpStream, ConnectError> {
    let s = tokio::time::timeout(timeout, TcpStream::connect(target))
        .await
        .map_err(|_| ConnectError::Timeout(target))?
        .map_err(|e| ConnectError::Refused(target, e))?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// Bytes moved by a splice.
#[derive(Debug, Clone, Copy, Default)]
pub struct Transferred {
    /// Client to target.
    pub to_target: u64,
    /// Target to client.
    pub to_client: u64,
}

/// Copies bytes both ways until both directions have closed.
pub async fn splice<A, B>(mut client: A, mut target: B) -> std::io::Result<Transferred>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    // 16 KiB per direction: one TLS record's worth, bounded per connection.
    let (to_target, to_client) =
        tokio::io::copy_bidirectional_with_sizes(&mut client, &mut target, 16 * 1024, 16 * 1024)
            .await?;
    Ok(Transferred {
        to_target,
        to_client,
    })
}

/// Forwards a permitted inbound connection to the app at `target`.
/// Taking [`Permitted`] makes forwarding without authorization a type error.
pub async fn forward_inbound(
    permitted: Permitted,
    target: SocketAddr,
    connect_timeout: Duration,
) -> Result<Transferred, ForwardError> {
    let app = connect(target, connect_timeout).await?;
    let Permitted { conn, permit } = permitted;
    tracing::debug!(
        authz.policy = permit.policy(),
        authz.rule = permit.rule(),
        "connection permitted"
    );
    let t = splice(conn.stream, app).await.map_err(ForwardError::Io)?;
    drop(conn.slot);
    Ok(t)
}

/// A failure while forwarding.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The target could not be reached.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The splice ended with an I/O error (a reset, usually).
    #[error("stream error: {0}")]
    Io(std::io::Error),
}
