//! mTLS handshakes between SPIFFE peers over in-memory pipes: who is
//! accepted and who is refused, by the client and by the server.

use rampart_testkit::Pki;
use std::sync::Arc;
use std::time::Duration;

use rampart_identity::bundle::BundleSet;
use rampart_identity::ca::DevCa;
use rampart_identity::svid::Svid;
use rampart_identity::{IdMatcher, SpiffeId, TrustDomain, tls, verify};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn td(s: &str) -> TrustDomain {
    TrustDomain::parse(s).unwrap()
}
fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

fn svid(p: &Pki, s: &str) -> Svid {
    p.ca().issue(&id(s), Duration::from_secs(600)).unwrap().svid
}

/// Runs a handshake and one byte of data; returns (client result, server result).
async fn handshake(
    client_svid: &Svid,
    client_bundles: &BundleSet,
    expect_server: IdMatcher,
    server_svid: &Svid,
    server_bundles: &BundleSet,
    allowed_clients: Option<IdMatcher>,
) -> (Result<(), String>, Result<Option<SpiffeId>, String>) {
    let ccfg = tls::client_config(client_svid, client_bundles, expect_server, &[]).unwrap();
    let scfg = tls::server_config(server_svid, server_bundles, allowed_clients, &[]).unwrap();
    let (c, s) = tokio::io::duplex(64 * 1024);
    let client = async move {
        let name = ServerName::try_from("10.0.0.1").unwrap();
        let mut stream = tokio_rustls::TlsConnector::from(ccfg)
            .connect(name, c)
            .await
            .map_err(|e| e.to_string())?;
        stream.write_all(b"x").await.map_err(|e| e.to_string())?;
        let mut b = [0u8; 1];
        stream.read_exact(&mut b).await.map_err(|e| e.to_string())?;
        Ok(())
    };
    let server = async move {
        let mut stream = tokio_rustls::TlsAcceptor::from(scfg)
            .accept(s)
            .await
            .map_err(|e| e.to_string())?;
        let peer = verify::peer_identity(stream.get_ref().1.peer_certificates()).and_then(|p| p.id);
        let mut b = [0u8; 1];
        stream.read_exact(&mut b).await.map_err(|e| e.to_string())?;
        stream.write_all(&b).await.map_err(|e| e.to_string())?;
        stream.flush().await.map_err(|e| e.to_string())?;
        Ok(peer)
    };
    tokio::join!(client, server)
}

#[tokio::test]
async fn mesh_peers_authenticate_each_other() {
    let p = Pki::new("example.org");
    let c = svid(&p, "spiffe://example.org/ec-web");
    let s = svid(&p, "spiffe://example.org/ec-backend");
    let (cr, sr) = handshake(
        &c,
        p.bundles(),
        IdMatcher::ids([id("spiffe://example.org/ec-backend")]),
        &s,
        p.bundles(),
        Some(IdMatcher::ids([id("spiffe://example.org/ec-web")])),
    )
    .await;
    cr.unwrap();
    assert_eq!(sr.unwrap(), Some(id("spiffe://example.org/ec-web")));
}

#[tokio::test]
async fn client_refuses_server_with_wrong_id() {
    let p = Pki::new("example.org");
    let c = svid(&p, "spiffe://example.org/ec-web");
    let s = svid(&p, "spiffe://example.org/impostor");
    let (cr, _) = handshake(
        &c,
        p.bundles(),
        IdMatcher::ids([id("spiffe://example.org/ec-backend")]),
        &s,
        p.bundles(),
        None,
    )
    .await;
    let err = cr.unwrap_err();
    assert!(err.contains("PeerNotAllowed"), "{err}");
}

#[tokio::test]
async fn server_refuses_client_not_pinned() {
    let p = Pki::new("example.org");
    let c = svid(&p, "spiffe://example.org/news-web");
    let s = svid(&p, "spiffe://example.org/ec-backend");
    let (_, sr) = handshake(
        &c,
        p.bundles(),
        IdMatcher::trust_domains([td("example.org")]),
        &s,
        p.bundles(),
        Some(IdMatcher::ids([id("spiffe://example.org/ec-web")])),
    )
    .await;
    let err = sr.unwrap_err();
    assert!(err.contains("PeerNotAllowed"), "{err}");
}

#[tokio::test]
async fn peers_from_another_ca_are_refused_both_ways() {
    let p = Pki::new("example.org");
    // Same trust domain name, different CA: the chain does not verify.
    let rogue = Pki::new("example.org");
    let good = svid(&p, "spiffe://example.org/a");
    let bad = svid(&rogue, "spiffe://example.org/b");
    let any = IdMatcher::trust_domains([td("example.org")]);
    let (_, sr) = handshake(&bad, rogue.bundles(), any.clone(), &good, p.bundles(), None).await;
    assert!(sr.is_err(), "server accepted a client from another CA");
    let (cr, _) = handshake(&good, p.bundles(), any, &bad, rogue.bundles(), None).await;
    assert!(cr.is_err(), "client accepted a server from another CA");
}

#[tokio::test]
async fn foreign_trust_domain_needs_its_own_bundle() {
    let p = Pki::new("example.org");
    let other = Pki::new("other.org");
    let c = svid(&other, "spiffe://other.org/client");
    let s = svid(&p, "spiffe://example.org/server");
    let any = IdMatcher::trust_domains([td("example.org"), td("other.org")]);
    let mut client_fed = other.bundles().clone();
    client_fed.insert(p.ca().bundle().unwrap());
    // The server trusts only example.org: refused.
    let (_, sr) = handshake(&c, &client_fed, any.clone(), &s, p.bundles(), None).await;
    let err = sr.unwrap_err();
    assert!(err.contains("UnknownTrustDomain"), "{err}");
    // Federated: the server holds other.org's bundle too: accepted.
    let mut fed = p.bundles().clone();
    fed.insert(other.ca().bundle().unwrap());
    let (cr, sr) = handshake(&c, &client_fed, any, &s, &fed, None).await;
    cr.unwrap();
    assert_eq!(sr.unwrap(), Some(id("spiffe://other.org/client")));
}

#[tokio::test]
async fn expired_svid_is_refused() {
    let p = Pki::new("example.org");
    let s = svid(&p, "spiffe://example.org/server");
    // An SVID whose validity ended: issue with a zero TTL and wait past it.
    let c = p
        .ca()
        .issue(&id("spiffe://example.org/client"), Duration::from_secs(0))
        .unwrap()
        .svid;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (_, sr) = handshake(
        &c,
        p.bundles(),
        IdMatcher::trust_domains([td("example.org")]),
        &s,
        p.bundles(),
        None,
    )
    .await;
    let err = sr.unwrap_err();
    assert!(err.to_lowercase().contains("expired"), "{err}");
}

#[test]
fn dev_ca_round_trips_through_disk() {
    let dir = tempfile::tempdir().unwrap();
    let p = Pki::new("example.org");
    p.ca().save(dir.path()).unwrap();
    let loaded = DevCa::load(dir.path()).unwrap();
    assert_eq!(loaded.trust_domain().as_str(), "example.org");
    let issued = loaded
        .issue(&id("spiffe://example.org/x"), Duration::from_secs(60))
        .unwrap();
    let again = Svid::from_pem(issued.chain_pem.as_bytes(), issued.key_pem.as_bytes()).unwrap();
    assert_eq!(again.id().as_str(), "spiffe://example.org/x");
    let _ = Arc::new(again);
}
