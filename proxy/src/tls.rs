//! The TLS stage: terminates mTLS on the inbound side and originates it on
//! the outbound side, with the configurations the identity store publishes.
//! Failures are classified once here, for logs and metrics.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rampart_identity::PeerIdentity;
use rampart_identity::verify::{PeerRejection, peer_identity};
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::accept::Accepted;
use crate::metrics::{HandshakeFailure, HandshakeResult};

/// Server-side TLS stream.
pub type ServerTls = tokio_rustls::server::TlsStream<TcpStream>;
/// Client-side TLS stream.
pub type ClientTls = tokio_rustls::client::TlsStream<TcpStream>;

/// Why a handshake failed, by who is at fault; [`HandshakeError::result`]
/// is its metric label.
#[derive(Debug, Clone, thiserror::Error)]
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
    /// The peer's leaf breaks an X.509-SVID rule.
    #[error("peer certificate is not a valid X.509-SVID: {0}")]
    InvalidSvid(String),
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
    /// The `result` label of `rampart_tls_handshakes_total`.
    pub fn result(&self) -> HandshakeResult {
        HandshakeResult::Failed(match self {
            HandshakeError::NoClientCert => HandshakeFailure::NoClientCert,
            HandshakeError::UnknownCa(_) => HandshakeFailure::UnknownCa,
            HandshakeError::IdNotAllowed(_) => HandshakeFailure::IdNotAllowed,
            HandshakeError::Expired => HandshakeFailure::Expired,
            HandshakeError::InvalidSvid(_) => HandshakeFailure::InvalidSvid,
            HandshakeError::Protocol(_) => HandshakeFailure::ProtocolError,
            HandshakeError::Timeout => HandshakeFailure::Timeout,
            HandshakeError::NoPeerId => HandshakeFailure::NoPeerId,
        })
    }

    fn classify(e: std::io::Error) -> Self {
        let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
            return HandshakeError::Protocol(e.to_string());
        };
        // The taxonomy of certificate refusals is decoded in `identity`,
        // beside the verifiers that encode it.
        match PeerRejection::of(tls) {
            Some(PeerRejection::NoCertificate) => HandshakeError::NoClientCert,
            Some(PeerRejection::UnknownCa | PeerRejection::UnknownTrustDomain) => {
                HandshakeError::UnknownCa(tls.to_string())
            }
            Some(PeerRejection::NotAllowed) => HandshakeError::IdNotAllowed(tls.to_string()),
            Some(PeerRejection::Expired) => HandshakeError::Expired,
            Some(PeerRejection::InvalidSvid) => HandshakeError::InvalidSvid(tls.to_string()),
            None => HandshakeError::Protocol(tls.to_string()),
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
    /// When the connection must end: the earlier of the peer's
    /// certificate's and our SVID's `notAfter` (`None` for plaintext; the
    /// inbound stage lowers it to its own SVID's).
    pub expires: Option<SystemTime>,
    /// The listener slot.
    pub slot: crate::listen::Slot,
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
pub fn allow_plaintext<S: Io>(accepted: Accepted<S>) -> Authenticated {
    let Accepted {
        client,
        orig_dst,
        stream,
        slot,
    } = accepted;
    Authenticated {
        client,
        orig_dst,
        peer: None,
        stream: Box::new(stream),
        alpn_h2: false,
        alpn_http1: false,
        sni: None,
        expires: None,
        slot,
    }
}

/// Terminates mTLS on an accepted connection.
pub async fn terminate<S: Io>(
    accepted: Accepted<S>,
    config: Arc<ServerConfig>,
    timeout: Duration,
) -> Result<Authenticated, HandshakeError> {
    let Accepted {
        client,
        orig_dst,
        stream,
        slot,
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
    let expires = peer_expiry(tls.get_ref().1.peer_certificates());
    Ok(Authenticated {
        client,
        orig_dst,
        peer: Some(peer),
        stream: Box::new(tls),
        alpn_h2,
        alpn_http1,
        sni,
        expires,
        slot,
    })
}

/// The `notAfter` of a verified peer's leaf certificate.
pub fn peer_expiry(certs: Option<&[rustls_pki_types::CertificateDer<'_>]>) -> Option<SystemTime> {
    rampart_identity::svid::leaf_not_after(certs?.first()?)
}

/// The earlier of two optional expiries.
pub fn earlier(a: Option<SystemTime>, b: Option<SystemTime>) -> Option<SystemTime> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Originates mTLS over a connected socket; the server's identity is checked
/// by the verifier inside `config`, during the handshake.
pub async fn originate<S: Io>(
    stream: S,
    dst: SocketAddr,
    config: Arc<ClientConfig>,
    timeout: Duration,
) -> Result<(tokio_rustls::client::TlsStream<S>, PeerIdentity), HandshakeError> {
    // An IP server name: rustls sends no SNI for it, and hostname checks are
    // replaced by the SPIFFE verifier.
    let name = ServerName::IpAddress(dst.ip().into());
    let tls = tokio::time::timeout(timeout, TlsConnector::from(config).connect(name, stream))
        .await
        .map_err(|_| HandshakeError::Timeout)?
        .map_err(HandshakeError::classify)?;
    // A server is a SPIFFE workload, or a DNS-SAN server that the
    // verifier accepted because `config` names it (`allow_dns_san_servers`).
    let peer =
        peer_identity(tls.get_ref().1.peer_certificates()).ok_or(HandshakeError::NoPeerId)?;
    Ok((tls, peer))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{self, Pki, id};
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const DST: &str = "10.0.0.2:8080";

    #[tokio::test]
    async fn terminate_and_originate_authenticate_both_ends_over_a_duplex() {
        let pki = Pki::new();
        let (mut authn, mut peer) =
            testing::authenticated(&pki, "server", "client", DST.parse().unwrap()).await;
        assert_eq!(authn.peer.as_ref().unwrap().id, Some(id("client")));
        assert!(authn.alpn_h2, "ALPN h2 negotiated");
        assert_eq!(authn.orig_dst.0, DST.parse().unwrap());
        peer.write_all(b"ping").await.unwrap();
        peer.flush().await.unwrap();
        let mut buf = [0; 4];
        authn.stream.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
    }

    #[tokio::test]
    async fn a_server_with_another_identity_is_refused_during_the_handshake() {
        let pki = Pki::new();
        let dst: SocketAddr = DST.parse().unwrap();
        let (accepted, far) = testing::accepted(dst);
        // The client expects `billing`; the server is `server`.
        let (server, client) = tokio::join!(
            terminate(accepted, pki.server("server"), Duration::from_secs(5)),
            originate(
                far,
                dst,
                pki.client("client", "billing"),
                Duration::from_secs(5)
            ),
        );
        let e = client.expect_err("refused");
        assert!(matches!(e, HandshakeError::IdNotAllowed(_)), "{e}");
        assert_eq!(e.result().as_str(), "id_not_allowed");
        assert!(server.is_err(), "the server saw the handshake fail too");
    }

    #[tokio::test]
    async fn a_client_leaf_that_breaks_an_svid_rule_is_counted_as_invalid_svid() {
        let pki = Pki::new();
        let dst: SocketAddr = DST.parse().unwrap();
        let (accepted, far) = testing::accepted(dst);
        // A DNS-SAN client certificate (no URI SAN) on a SPIFFE-only port.
        let cert = pki
            .ca
            .issue_dns_client(&["ingress.example.org".into()], Duration::from_secs(600))
            .unwrap();
        let provider = rampart_identity::tls::provider();
        let verifier = rampart_identity::verify::SpiffeServerVerifier::new(
            pki.bundles.clone(),
            rampart_identity::IdMatcher::ids([id("server")]),
            &provider,
        );
        let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).unwrap();
        let client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(vec![CertificateDer::from(cert.cert_der.to_vec())], key)
            .unwrap();
        let (server, _client) = tokio::join!(
            terminate(accepted, pki.server("server"), Duration::from_secs(5)),
            originate(far, dst, Arc::new(client), Duration::from_secs(5)),
        );
        let e = server.expect_err("refused");
        assert!(matches!(e, HandshakeError::InvalidSvid(_)), "{e}");
        assert_eq!(e.result().as_str(), "invalid_svid");
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_times_out() {
        let pki = Pki::new();
        let (accepted, _far) = testing::accepted(DST.parse().unwrap());
        let e = terminate(accepted, pki.server("server"), Duration::from_secs(5))
            .await
            .expect_err("timed out");
        assert!(matches!(e, HandshakeError::Timeout));
        assert_eq!(e.result().as_str(), "timeout");
    }
}
