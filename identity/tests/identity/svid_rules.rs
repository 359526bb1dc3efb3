//! X.509-SVID rules, one certificate per rule: each breaks exactly that rule
//! and is otherwise a good SVID, and is refused both by `validate_leaf` and
//! by the server's client-certificate verifier in a real handshake. Chains
//! through an intermediate CA are accepted; chains to an unknown root are not.

use std::sync::Arc;
use std::time::Duration;

use rampart_identity::bundle::{BundleSet, TrustBundle};
use rampart_identity::svid::{Svid, SvidError, validate_leaf};
use rampart_identity::{IdMatcher, TrustDomain, tls};
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TD: &str = "example.org";
const GOOD_ID: &str = "spiffe://example.org/web";

/// A CA that can sign test leaves.
struct Ca {
    der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

fn ca(uri: &str, signer: Option<&Ca>) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("test CA {uri}"));
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
    let cert = match signer {
        Some(s) => p.signed_by(&key, &s.issuer).unwrap(),
        None => p.self_signed(&key).unwrap(),
    };
    Ca {
        der: cert.der().clone(),
        issuer: Issuer::new(p, key),
    }
}

/// What a leaf looks like; `good()` is a valid SVID, each rule changes one field.
#[derive(Clone)]
struct Leaf {
    uris: Vec<&'static str>,
    is_ca: bool,
    key_usage: Option<Vec<KeyUsagePurpose>>,
}

fn good() -> Leaf {
    Leaf {
        uris: vec![GOOD_ID],
        is_ca: false,
        key_usage: Some(vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ]),
    }
}

/// Signs `leaf` with `ca`; returns the certificate and its key.
fn issue(leaf: &Leaf, ca: &Ca) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = leaf
        .uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().unwrap()))
        .collect();
    if leaf.is_ca {
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    } else {
        // cA at its DER default (false): an empty SEQUENCE.
        p.is_ca = IsCa::NoCa;
        let mut bc = CustomExtension::from_oid_content(&[2, 5, 29, 19], vec![0x30, 0x00]);
        bc.set_criticality(true);
        p.custom_extensions.push(bc);
    }
    p.key_usages = leaf.key_usage.clone().unwrap_or_default();
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = p.signed_by(&key, &ca.issuer).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    (cert.der().clone(), key)
}

fn td() -> TrustDomain {
    TrustDomain::parse(TD).unwrap()
}

fn bundles(roots: &[&Ca]) -> BundleSet {
    let mut set = BundleSet::new();
    set.insert(TrustBundle::new(td(), roots.iter().map(|c| c.der.clone()).collect()).unwrap());
    set
}

/// Each rule of X509-SVID.md, and the one-field change that breaks it.
fn rules() -> Vec<(&'static str, Leaf, SvidError)> {
    let with = |f: &dyn Fn(&mut Leaf)| {
        let mut l = good();
        f(&mut l);
        l
    };
    vec![
        (
            "§2 exactly one URI SAN: none",
            with(&|l| l.uris.clear()),
            SvidError::UriSanCount(0),
        ),
        (
            "§2 exactly one URI SAN: two",
            with(&|l| l.uris.push("spiffe://example.org/other")),
            SvidError::UriSanCount(2),
        ),
        (
            "§2 the URI SAN is a SPIFFE ID",
            with(&|l| l.uris = vec!["https://example.org/web"]),
            SvidError::BadSpiffeId(rampart_identity::SpiffeIdError::WrongScheme),
        ),
        (
            "§3 leaf MUST NOT have a root path",
            with(&|l| l.uris = vec!["spiffe://example.org"]),
            SvidError::NoPath,
        ),
        (
            "§4.1 leaf cA MUST be false",
            with(&|l| l.is_ca = true),
            SvidError::LeafIsCa,
        ),
        (
            "§4.3 keyUsage MUST be present",
            with(&|l| l.key_usage = None),
            SvidError::NoDigitalSignature,
        ),
        (
            "§4.3 leaf MUST set digitalSignature",
            with(&|l| l.key_usage = Some(vec![KeyUsagePurpose::KeyEncipherment])),
            SvidError::NoDigitalSignature,
        ),
        (
            "§4.3 leaf MUST NOT set keyCertSign",
            with(&|l| {
                l.key_usage = Some(vec![
                    KeyUsagePurpose::DigitalSignature,
                    KeyUsagePurpose::KeyCertSign,
                ])
            }),
            SvidError::LeafCanSign,
        ),
        (
            "§4.3 leaf MUST NOT set cRLSign",
            with(&|l| {
                l.key_usage = Some(vec![
                    KeyUsagePurpose::DigitalSignature,
                    KeyUsagePurpose::CrlSign,
                ])
            }),
            SvidError::LeafCanSign,
        ),
    ]
}

#[test]
fn each_rule_is_enforced_by_validate_leaf() {
    let root = ca("spiffe://example.org", None);
    let (cert, _) = issue(&good(), &root);
    validate_leaf(&cert).expect("the baseline leaf is a valid SVID");
    for (rule, leaf, want) in rules() {
        let (cert, _) = issue(&leaf, &root);
        assert_eq!(validate_leaf(&cert).err(), Some(want), "{rule}");
    }
}

#[tokio::test]
async fn each_rule_is_enforced_in_the_handshake() {
    let root = ca("spiffe://example.org", None);
    let set = bundles(&[&root]);
    let server = {
        let (c, k) = issue(&good(), &root);
        Svid::from_der(vec![c], k).unwrap()
    };
    let (c, k) = issue(&good(), &root);
    assert_eq!(client_handshake(vec![c], k, &server, &set).await, Ok(()));
    for (rule, leaf, _) in rules() {
        let (c, k) = issue(&leaf, &root);
        let r = client_handshake(vec![c], k, &server, &set).await;
        assert!(r.is_err(), "{rule}: server accepted the client certificate");
    }
}

#[tokio::test]
async fn intermediate_ca_chain_is_accepted() {
    let root = ca("spiffe://example.org", None);
    let intermediate = ca("spiffe://example.org", Some(&root));
    let set = bundles(&[&root]);
    let (leaf, key) = issue(&good(), &intermediate);
    let chain = vec![leaf, intermediate.der.clone()];
    // As our own SVID (presented by the server) and as a peer's (client).
    let server = Svid::from_der(chain.clone(), key.clone_key()).unwrap();
    assert_eq!(client_handshake(chain, key, &server, &set).await, Ok(()));
    let client = server.clone();
    let ccfg = tls::client_config(&client, &set, IdMatcher::trust_domains([td()]), &[]).unwrap();
    let scfg = tls::server_config(&server, &set, None, &[]).unwrap();
    assert_eq!(handshake(ccfg, scfg).await, Ok(()));
}

#[tokio::test]
async fn chain_to_an_unknown_root_is_refused() {
    let root = ca("spiffe://example.org", None);
    let stranger = ca("spiffe://example.org", None);
    let set = bundles(&[&root]);
    let server = {
        let (c, k) = issue(&good(), &root);
        Svid::from_der(vec![c], k).unwrap()
    };
    let (c, k) = issue(&good(), &stranger);
    assert!(client_handshake(vec![c], k, &server, &set).await.is_err());
    // Also through an intermediate of the stranger, chain presented in full.
    let inter = ca("spiffe://example.org", Some(&stranger));
    let (c, k) = issue(&good(), &inter);
    let r = client_handshake(vec![c, inter.der.clone()], k, &server, &set).await;
    assert!(r.is_err());
}

/// A client presenting `chain` (not validated by us: that is the point)
/// against a Rampart server configuration; Ok when the server accepts it.
async fn client_handshake(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    server: &Svid,
    set: &BundleSet,
) -> Result<(), String> {
    let ccfg = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer))
        .with_client_auth_cert(chain, key)
        .unwrap();
    let scfg = tls::server_config(server, set, None, &[]).unwrap();
    handshake(Arc::new(ccfg), scfg).await
}

async fn handshake(
    ccfg: Arc<rustls::ClientConfig>,
    scfg: Arc<rustls::ServerConfig>,
) -> Result<(), String> {
    let (c, s) = tokio::io::duplex(64 * 1024);
    let client = async move {
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let mut t = tokio_rustls::TlsConnector::from(ccfg)
            .connect(name, c)
            .await
            .map_err(|e| e.to_string())?;
        t.write_all(b"x").await.map_err(|e| e.to_string())?;
        let mut b = [0u8; 1];
        t.read_exact(&mut b).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(())
    };
    let server = async move {
        let mut t = tokio_rustls::TlsAcceptor::from(scfg)
            .accept(s)
            .await
            .map_err(|e| e.to_string())?;
        let mut b = [0u8; 1];
        t.read_exact(&mut b).await.map_err(|e| e.to_string())?;
        t.write_all(&b).await.map_err(|e| e.to_string())?;
        t.flush().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(())
    };
    let (c, s) = tokio::time::timeout(Duration::from_secs(5), async {
        tokio::join!(client, server)
    })
    .await
    .map_err(|_| "handshake timed out".to_string())?;
    s?;
    c
}

/// Accepts any server: these tests are about the server verifying clients.
#[derive(Debug)]
struct AnyServer;

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        tls::provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
