//! Unit-test support for the pipeline stages: a development CA, TLS
//! configurations built the way the identity store builds them, and
//! accepted connections over `tokio::io::duplex`, so that `tls`, `authz`
//! and `forward` are tested over real mTLS without sockets.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rampart_identity::bundle::BundleSet;
use rampart_identity::ca::DevCa;
use rampart_identity::svid::Svid;
use rampart_identity::tls::{ServerSpec, client_config, server_config_for};
use rampart_identity::{IdMatcher, SpiffeId, TrustDomain};
use rustls::{ClientConfig, ServerConfig};
use tokio::io::DuplexStream;
use tokio::sync::Semaphore;

use crate::accept::{Accepted, ClientAddr, OrigDstAddr};
use crate::tls::{self, Authenticated};

/// The trust domain of the test PKI.
pub const TD: &str = "example.org";
/// The ALPN the sidecars offer.
pub const ALPN: &[u8] = b"h2";

/// A SPIFFE ID of the test trust domain.
pub fn id(path: &str) -> SpiffeId {
    // Invariant: test paths are written valid.
    SpiffeId::parse(&format!("spiffe://{TD}/{path}")).expect("valid test ID")
}

/// A development CA and its bundle.
pub struct Pki {
    /// The CA.
    pub ca: DevCa,
    /// Its bundle, alone in the set.
    pub bundles: BundleSet,
}

impl Pki {
    /// A fresh CA for [`TD`].
    pub fn new() -> Pki {
        let td = TrustDomain::parse(TD).expect("valid trust domain");
        let ca = DevCa::generate(&td, Duration::from_secs(3600)).expect("CA");
        let mut bundles = BundleSet::new();
        bundles.insert(ca.bundle().expect("bundle"));
        Pki { ca, bundles }
    }

    /// An SVID for `spiffe://example.org/<path>`.
    pub fn svid(&self, path: &str) -> Svid {
        self.ca
            .issue(&id(path), Duration::from_secs(600))
            .expect("issued")
            .svid
    }

    /// A server configuration presenting `path`'s SVID.
    pub fn server(&self, path: &str) -> Arc<ServerConfig> {
        server_config_for(
            &self.svid(path),
            &self.bundles,
            &ServerSpec::default(),
            &[ALPN.to_vec()],
        )
        .expect("server config")
    }

    /// A client configuration presenting `path`'s SVID and expecting a
    /// server of `expect`.
    pub fn client(&self, path: &str, expect: &str) -> Arc<ClientConfig> {
        client_config(
            &self.svid(path),
            &self.bundles,
            IdMatcher::ids([id(expect)]),
            &[ALPN.to_vec()],
        )
        .expect("client config")
    }
}

/// The address the duplex "client" connects from.
pub fn client_addr() -> SocketAddr {
    "10.0.0.1:40000".parse().expect("valid address")
}

/// An accepted connection over one end of a duplex pipe, destined for
/// `dst`; the other end is returned for the test to drive.
pub fn accepted(dst: SocketAddr) -> (Accepted<DuplexStream>, DuplexStream) {
    let (near, far) = tokio::io::duplex(64 * 1024);
    let slot = Arc::new(Semaphore::new(1))
        .try_acquire_owned()
        .expect("a free slot");
    let a = Accepted {
        client: ClientAddr(client_addr()),
        orig_dst: OrigDstAddr(dst),
        stream: near,
        slot: slot.into(),
    };
    (a, far)
}

/// An inbound connection authenticated over real mTLS on a duplex pipe:
/// the sidecar is `server`, the peer `client`. Returns the sidecar's side
/// and the peer's TLS stream.
pub async fn authenticated(
    pki: &Pki,
    server: &str,
    client: &str,
    dst: SocketAddr,
) -> (Authenticated, tokio_rustls::client::TlsStream<DuplexStream>) {
    let (accepted, far) = accepted(dst);
    let server_cfg = pki.server(server);
    let client_cfg = pki.client(client, server);
    let (authn, peer) = tokio::join!(
        tls::terminate(accepted, server_cfg, Duration::from_secs(5)),
        tls::originate(far, dst, client_cfg, Duration::from_secs(5)),
    );
    let (peer_tls, _) = peer.expect("client handshake");
    (authn.expect("server handshake"), peer_tls)
}

/// Published TLS state for a sidecar whose SVID is `path` (valid for an
/// hour): what the identity store hands the stages while an identity is held.
/// The stage tests bring their own rustls configurations, so none is listed.
pub fn identity(path: &str) -> Arc<rampart_identity::store::TlsConfigs> {
    let now = std::time::SystemTime::now();
    Arc::new(rampart_identity::store::TlsConfigs {
        svid: rampart_identity::svid::LeafInfo {
            id: id(path),
            dns_names: vec![],
            serial: "01".into(),
            not_before: now,
            not_after: now + Duration::from_secs(3600),
        },
        trust_domains: vec![TrustDomain::parse(TD).expect("valid trust domain")],
        server: vec![],
        client: vec![],
        endpoints: rampart_identity::store::EndpointClients::none(),
    })
}

/// A minimal sidecar plan: no listeners, deny by default, `authorizer`'s
/// policies in force.
pub fn config(authorizer: rampart_authz::Authorizer) -> crate::config::ProxyConfig {
    use crate::config::*;
    ProxyConfig {
        trust_domain: TrustDomain::parse(TD).expect("valid trust domain"),
        admin: "127.0.0.1:0".parse().expect("valid address"),
        transparent: None,
        listeners: vec![],
        outbound: OutboundConfig::default(),
        authorizer: Arc::new(crate::policy::PolicyCell::new(authorizer)),
        inbound: InboundServing::default(),
        limits: Limits::default(),
        observe: ObserveConfig::default(),
        central: CentralConfig::default(),
        discovery: None,
    }
}

/// An app that answers every HTTP/1.1 request with `200 ok` and closes.
pub async fn http_app() -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("bound");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                    )
                    .await;
            });
        }
    });
    addr
}

/// Sends `req` over `io` as HTTP/1.1 and returns the response head and body.
pub async fn http1_exchange<S>(
    io: S,
    req: http::Request<http_body_util::Empty<bytes::Bytes>>,
) -> (http::response::Parts, bytes::Bytes)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    use http_body_util::BodyExt;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
        .await
        .expect("client handshake");
    tokio::spawn(conn);
    let resp = send.send_request(req).await.expect("a response");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("a body").to_bytes();
    (parts, body)
}
