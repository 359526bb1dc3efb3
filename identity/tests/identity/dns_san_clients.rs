//! DNS-SAN client certificates (an ingress outside the mesh, `SCENARIOS.md`
//! §3.2) over in-memory pipes: accepted only by a server configuration that
//! opts in, only when issued by the CA of the server's own trust domain, and
//! then known by DNS name with no SPIFFE ID.

use rampart_testkit::Pki;
use std::sync::Arc;
use std::time::Duration;

use rampart_identity::svid::{SvidError, validate_dns_client_leaf};
use rampart_identity::tls::{self, ServerSpec};
use rampart_identity::verify::{PeerIdentity, SpiffeServerVerifier};
use rampart_identity::{IdMatcher, SpiffeId, TrustDomain, verify};
use rustls::ClientConfig;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const INGRESS: &str = "ingress-nginx.ext.cluster.local";

fn td(s: &str) -> TrustDomain {
    TrustDomain::parse(s).unwrap()
}

/// A client presenting a DNS-SAN certificate of `issuer`, verifying the
/// server as a workload of `server_pki`'s trust domain.
fn ingress_client(issuer: &Pki, server_pki: &Pki, names: &[&str]) -> Arc<ClientConfig> {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let cert = issuer
        .ca()
        .issue_dns_client(&names, Duration::from_secs(600))
        .unwrap();
    let key = rustls_pemfile::private_key(&mut cert.key_pem.as_bytes())
        .unwrap()
        .unwrap();
    client_with(server_pki, vec![cert.cert_der], key)
}

fn client_with(
    server_pki: &Pki,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Arc<ClientConfig> {
    let provider = tls::provider();
    let verifier = SpiffeServerVerifier::new(
        server_pki.bundles().clone(),
        IdMatcher::trust_domains([td("example.org")]),
        &provider,
    );
    Arc::new(
        ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(chain, key)
            .unwrap(),
    )
}

/// Handshake plus one byte; the server's view of the peer, or its error.
async fn serve_one(
    ccfg: Arc<ClientConfig>,
    p: &Pki,
    spec: ServerSpec,
) -> Result<PeerIdentity, String> {
    let server = p
        .ca()
        .issue(
            &SpiffeId::parse("spiffe://example.org/app2").unwrap(),
            Duration::from_secs(600),
        )
        .unwrap()
        .svid;
    let scfg = tls::server_config_for(&server, p.bundles(), &spec, &[]).unwrap();
    let (c, s) = tokio::io::duplex(64 * 1024);
    let client = async move {
        let name = ServerName::try_from("10.0.0.1").unwrap();
        let Ok(mut stream) = tokio_rustls::TlsConnector::from(ccfg)
            .connect(name, c)
            .await
        else {
            return;
        };
        let _ = stream.write_all(b"x").await;
        let mut b = [0u8; 1];
        let _ = stream.read_exact(&mut b).await;
    };
    let server = async move {
        let mut stream = tokio_rustls::TlsAcceptor::from(scfg)
            .accept(s)
            .await
            .map_err(|e| format!("{e:?}"))?;
        let peer = verify::peer_identity(stream.get_ref().1.peer_certificates())
            .ok_or("no peer identity")?;
        let mut b = [0u8; 1];
        stream.read_exact(&mut b).await.map_err(|e| e.to_string())?;
        stream.write_all(&b).await.map_err(|e| e.to_string())?;
        stream.flush().await.map_err(|e| e.to_string())?;
        Ok(peer)
    };
    tokio::join!(client, server).1
}

fn opt_in() -> ServerSpec {
    ServerSpec {
        allow_dns_san_clients: true,
        ..ServerSpec::default()
    }
}

#[tokio::test]
async fn dns_san_client_of_the_mesh_ca_is_accepted_with_the_opt_in() {
    let p = Pki::new("example.org");
    let peer = serve_one(ingress_client(&p, &p, &[INGRESS]), &p, opt_in())
        .await
        .unwrap();
    assert_eq!(peer.id, None, "a DNS-SAN client has no SPIFFE ID");
    assert_eq!(peer.dns_names, vec![INGRESS.to_string()]);
    assert_eq!(peer.principal(), INGRESS);
    assert_eq!(peer.cert_sha256.len(), 64);
}

#[tokio::test]
async fn dns_san_client_is_refused_without_the_opt_in() {
    let p = Pki::new("example.org");
    let err = serve_one(
        ingress_client(&p, &p, &[INGRESS]),
        &p,
        ServerSpec::default(),
    )
    .await
    .unwrap_err();
    assert!(err.contains("UriSanCount(0)"), "{err}");
}

#[tokio::test]
async fn dns_san_client_of_another_ca_is_refused() {
    let p = Pki::new("example.org");
    // Same trust domain name, another CA: the chain must not verify.
    let rogue = Pki::new("example.org");
    let err = serve_one(ingress_client(&rogue, &p, &[INGRESS]), &p, opt_in())
        .await
        .unwrap_err();
    assert!(
        err.contains("UnknownIssuer") || err.contains("BadSignature"),
        "{err}"
    );
}

#[tokio::test]
async fn dns_san_client_is_refused_where_spiffe_ids_are_pinned() {
    let p = Pki::new("example.org");
    let spec = ServerSpec {
        allowed_clients: Some(IdMatcher::trust_domains([td("example.org")])),
        allow_dns_san_clients: true,
    };
    let err = serve_one(ingress_client(&p, &p, &[INGRESS]), &p, spec)
        .await
        .unwrap_err();
    assert!(err.contains("DnsPeerNotAllowed"), "{err}");
}

#[tokio::test]
async fn svids_still_work_on_an_opted_in_port() {
    let p = Pki::new("example.org");
    let c = p
        .ca()
        .issue(
            &SpiffeId::parse("spiffe://example.org/app1").unwrap(),
            Duration::from_secs(600),
        )
        .unwrap()
        .svid;
    let peer = serve_one(client_with(&p, c.chain().to_vec(), c.key()), &p, opt_in())
        .await
        .unwrap();
    assert_eq!(peer.id.unwrap().as_str(), "spiffe://example.org/app1");
}

#[test]
fn dns_client_leaf_rules() {
    let p = Pki::new("example.org");
    let good = p
        .ca()
        .issue_dns_client(
            &[INGRESS.into(), "b.example".into()],
            Duration::from_secs(60),
        )
        .unwrap();
    assert_eq!(
        validate_dns_client_leaf(&good.cert_der).unwrap(),
        vec![INGRESS.to_string(), "b.example".to_string()]
    );
    // An SVID is not a DNS-SAN client certificate, even with DNS SANs.
    let svid = p
        .ca()
        .issue_with(
            &SpiffeId::parse("spiffe://example.org/x").unwrap(),
            Duration::from_secs(60),
            &[INGRESS.into()],
        )
        .unwrap();
    assert_eq!(
        validate_dns_client_leaf(svid.svid.chain()[0].as_ref()),
        Err(SvidError::UriSanCount(1))
    );
    // No names at all: nothing to issue.
    assert!(
        p.ca()
            .issue_dns_client(&[], Duration::from_secs(60))
            .is_err()
    );
    // A name that would break XFCC apart or never match a policy.
    assert!(
        p.ca()
            .issue_dns_client(
                &["a;URI=spiffe://example.org/admin".into()],
                Duration::from_secs(60)
            )
            .is_err()
    );
    assert_eq!(
        validate_dns_client_leaf(b"not der"),
        Err(SvidError::Malformed)
    );
}
