//! The TLS stage: terminates mTLS on the inbound side and originates it on
//! the outbound side, with the configurations the identity store publishes.
//! Failures are classified once here, for logs and metrics.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rampart_identity::PeerIdentity;
use rampart_identity::verify::{
    DnsPeerNotAllowed, PeerNotAllowed, UnknownTrustDomain, peer_identity,
};
use rustls::{CertificateError, ClientConfig, ServerConfig};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::accept::Accepted;

/// Server-side TLS stream.
pub type ServerTls = tokio_rustls::server::TlsStream<TcpStream>;
/// Client-side TLS stream.
pub type ClientTls = tokio_rustls::client::TlsStream<TcpStream>;

/// Why a handshake failed, by who is at fault; [`HandshakeError::label`] is the metric label.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The client sent no certificate (not a mesh peer).
    #[error("peer presented no certificate")]
    NoClientCert,
    /// The peer's chain does not lead to a trusted root of its trust domain.
    #[error("peer certificate is not signed by a trusted CA: {0}")]
    UnknownCa(String),
    /// The peer is authenticated but is not an identity we accept here.
    #[error("{0}")]
    IdNotAllowed(String),
    /// The peer's certificate is expired or not yet valid.
    #[error("peer certificate is expired or not yet valid")]
    Expired,
    /// Anything else the peer got wrong (not TLS, bad messages, alerts).
    #[error("TLS protocol error: {0}")]
    Protocol(String),
    /// The handshake did not finish in time.
    #[error("TLS handshake timed out")]
    Timeout,
    /// The handshake completed but no peer identity could be read (a bug:
    /// the verifier accepted it).
    #[error("handshake completed without a peer identity")]
    NoPeerId,
}

impl HandshakeError {
    /// Fixed metric label.
    pub fn label(&self) -> &'static str {
        match self {
            HandshakeError::NoClientCert => "no_client_cert",
            HandshakeError::UnknownCa(_) => "unknown_ca",
            HandshakeError::IdNotAllowed(_) => "id_not_allowed",
            HandshakeError::Expired => "expired",
            HandshakeError::Protocol(_) => "protocol_error",
            HandshakeError::Timeout => "timeout",
            HandshakeError::NoPeerId => "no_peer_id",
        }
    }

    fn classify(e: std::io::Error) -> Self {
        let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
            return HandshakeError::Protocol(e.to_string());
        };
        match tls {
            rustls::Error::NoCertificatesPresented => HandshakeError::NoClientCert,
            rustls::Error::InvalidCertificate(ce) => match ce {
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. } => HandshakeError::Expired,
                CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                    HandshakeError::UnknownCa(tls.to_string())
                }
                CertificateError::Other(o)
                    if o.0.downcast_ref::<PeerNotAllowed>().is_some()
                        || o.0.downcast_ref::<DnsPeerNotAllowed>().is_some() =>
                {
                    HandshakeError::IdNotAllowed(o.0.to_string())
                }
                CertificateError::Other(o)
                    if o.0.downcast_ref::<UnknownTrustDomain>().is_some() =>
                {
                    HandshakeError::UnknownCa(o.0.to_string())
                }
                other => HandshakeError::Protocol(format!("invalid peer certificate: {other:?}")),
            },
            other => HandshakeError::Protocol(other.to_string()),
        }
    }
}

/// A byte stream of any kind (TLS, plaintext, replayed); the pipeline
/// boxes streams at the `tls` stage boundary so later stages are not generic.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A boxed stream.
pub type BoxedIo = Box<dyn Io>;

/// An inbound connection past the TLS stage: mTLS with a verified peer, or
/// plaintext on a PERMISSIVE port with no peer.
pub struct Authenticated {
    /// What was known at accept.
    pub client: crate::accept::ClientAddr,
    /// The destination.
    pub orig_dst: crate::accept::OrigDstAddr,
    /// The verified peer (a SPIFFE ID, or DNS SANs only on a port with
    /// `allow_dns_san_clients`); `None` for plaintext.
    pub peer: Option<PeerIdentity>,
    /// The decrypted (or plaintext) stream.
    pub stream: BoxedIo,
    /// Whether the peer negotiated `h2` by ALPN.
    pub alpn_h2: bool,
    /// Whether the peer negotiated `http/1.1` by ALPN (an ingress that
    /// speaks HTTP/1.1 only): the connection is served as HTTP/1.1.
    pub alpn_http1: bool,
    /// The TLS server name the client sent (SNI), if any.
    pub sni: Option<Arc<str>>,
    /// The listener slot.
    pub slot: tokio::sync::OwnedSemaphorePermit,
}

impl std::fmt::Debug for Authenticated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticated")
            .field("client", &self.client)
            .field("orig_dst", &self.orig_dst)
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

/// Accepts a plaintext connection on a PERMISSIVE port: no TLS, no peer.
/// The name says what it weakens.
pub fn allow_plaintext(accepted: Accepted) -> Authenticated {
    let Accepted {
        client,
        orig_dst,
        stream,
        _slot: slot,
    } = accepted;
    Authenticated {
        client,
        orig_dst,
        peer: None,
        stream: Box::new(stream),
        alpn_h2: false,
        alpn_http1: false,
        sni: None,
        slot,
    }
}

/// Terminates mTLS on an accepted connection.
pub async fn terminate(
    accepted: Accepted,
    config: Arc<ServerConfig>,
    timeout: Duration,
) -> Result<Authenticated, HandshakeError> {
    let Accepted {
        client,
        orig_dst,
        stream,
        _slot: slot,
    } = accepted;
    let tls = tokio::time::timeout(timeout, TlsAcceptor::from(config).accept(stream))
        .await
        .map_err(|_| HandshakeError::Timeout)?
        .map_err(HandshakeError::classify)?;
    let peer =
        peer_identity(tls.get_ref().1.peer_certificates()).ok_or(HandshakeError::NoPeerId)?;
    let alpn = tls.get_ref().1.alpn_protocol();
    let (alpn_h2, alpn_http1) = (alpn == Some(b"h2"), alpn == Some(b"http/1.1"));
    let sni = tls.get_ref().1.server_name().map(Arc::from);
    Ok(Authenticated {
        client,
        orig_dst,
        peer: Some(peer),
        stream: Box::new(tls),
        alpn_h2,
        alpn_http1,
        sni,
        slot,
    })
}

/// Originates mTLS over a connected socket; the server's identity is checked
/// by the verifier inside `config`, during the handshake.
pub async fn originate(
    stream: TcpStream,
    dst: SocketAddr,
    config: Arc<ClientConfig>,
    timeout: Duration,
) -> Result<(ClientTls, PeerIdentity), HandshakeError> {
    // An IP server name: rustls sends no SNI for it, and hostname checks are
    // replaced by the SPIFFE verifier.
    let name = ServerName::IpAddress(dst.ip().into());
    let tls = tokio::time::timeout(timeout, TlsConnector::from(config).connect(name, stream))
        .await
        .map_err(|_| HandshakeError::Timeout)?
        .map_err(HandshakeError::classify)?;
    // A server is always a SPIFFE workload (the verifier refuses others).
    let peer = peer_identity(tls.get_ref().1.peer_certificates())
        .filter(|p| p.id.is_some())
        .ok_or(HandshakeError::NoPeerId)?;
    Ok((tls, peer))
}

/// What authz is told about a connection's peer: its SPIFFE ID (absent for
/// plaintext and for DNS-SAN clients) and its certificate's DNS SANs.
pub fn connection_info(
    peer: Option<&PeerIdentity>,
    source: std::net::IpAddr,
    port: u16,
) -> rampart_authz::ConnectionInfo<'_> {
    match peer {
        Some(p) => rampart_authz::ConnectionInfo::new(p.id.as_ref(), source, port)
            .with_peer_dns(&p.dns_names),
        None => rampart_authz::ConnectionInfo::new(None, source, port),
    }
}
