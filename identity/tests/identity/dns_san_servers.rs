//! DNS-SAN server certificates (ACM PCA or file certificates, App Mesh's
//! SAN pinning) as an expected server identity: the outbound verifier
//! accepts one only when the expected identities name one of its DNS SANs,
//! and only when it chains to the bundle of the client's own trust domain.

use rampart_testkit::Pki;
use std::time::Duration;

use rampart_identity::verify::{PeerRejection, SpiffeServerVerifier};
use rampart_identity::{IdMatcher, SpiffeId, TrustDomain, tls};
use rustls::client::danger::ServerCertVerifier;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

const BLUE: &str = "color-blue.mesh.local";

fn td(s: &str) -> TrustDomain {
    TrustDomain::parse(s).unwrap()
}

fn dns_server(p: &Pki, names: &[&str]) -> CertificateDer<'static> {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    p.ca()
        .issue_dns_server(&names, Duration::from_secs(600))
        .unwrap()
        .cert_der
}

/// The verifier of a client of `own` (trusting `bundles`) expecting
/// `expected`; `None` when it accepts `leaf`, else why not.
fn verdict(
    bundles: &Pki,
    own: Option<&str>,
    expected: IdMatcher,
    leaf: &CertificateDer<'_>,
) -> Option<PeerRejection> {
    let mut v = SpiffeServerVerifier::new(bundles.bundles().clone(), expected, &tls::provider());
    if let Some(own) = own {
        v = v.with_own_trust_domain(td(own));
    }
    let name = ServerName::try_from("10.0.0.1").unwrap();
    match v.verify_server_cert(leaf, &[], &name, &[], UnixTime::now()) {
        Ok(_) => None,
        Err(e) => Some(PeerRejection::of(&e).unwrap_or_else(|| panic!("unclassified: {e:?}"))),
    }
}

fn names(n: &[&str]) -> IdMatcher {
    IdMatcher::dns_names(n.iter().map(|s| s.to_string()))
}

#[test]
fn a_dns_san_server_is_accepted_only_by_a_name_it_carries() {
    let p = Pki::new("example.org");
    let leaf = dns_server(&p, &[BLUE, "blue.internal"]);
    let own = Some("example.org");
    // (what, expected identities, verdict)
    let cases: [(&str, IdMatcher, Option<PeerRejection>); 6] = [
        ("named", names(&[BLUE]), None),
        ("its second SAN", names(&["blue.internal"]), None),
        (
            "named in another case, with a dot",
            names(&["COLOR-Blue.mesh.local."]),
            None,
        ),
        (
            "another name",
            names(&["color-red.mesh.local"]),
            Some(PeerRejection::NotAllowed),
        ),
        (
            "a SPIFFE ID: a DNS-SAN certificate is no SVID",
            IdMatcher::ids([SpiffeId::parse("spiffe://example.org/color-blue").unwrap()]),
            Some(PeerRejection::InvalidSvid),
        ),
        (
            "the trust domain",
            IdMatcher::trust_domains([td("example.org")]),
            Some(PeerRejection::InvalidSvid),
        ),
    ];
    for (what, expected, want) in cases {
        assert_eq!(verdict(&p, own, expected, &leaf), want, "{what}");
    }
    // Names beside IDs: the union accepts either.
    let both = names(&[BLUE]).union(&IdMatcher::ids([
        SpiffeId::parse("spiffe://example.org/x").unwrap()
    ]));
    assert_eq!(verdict(&p, own, both, &leaf), None);
    // No own trust domain to verify against: refused.
    assert_eq!(
        verdict(&p, None, names(&[BLUE]), &leaf),
        Some(PeerRejection::NotAllowed)
    );
}

#[test]
fn a_dns_san_server_must_chain_to_the_own_trust_domain_and_be_a_server() {
    let mesh = Pki::new("example.org");
    let other = Pki::new("other.org");
    // Issued by another trust domain's CA, even one the client trusts for
    // SVIDs of that domain: DNS-SAN servers chain to the own bundle only.
    let foreign = dns_server(&other, &[BLUE]);
    assert_eq!(
        verdict(&mesh, Some("example.org"), names(&[BLUE]), &foreign),
        Some(PeerRejection::UnknownCa)
    );
    assert_eq!(
        verdict(&other, Some("example.org"), names(&[BLUE]), &foreign),
        Some(PeerRejection::UnknownTrustDomain),
        "no bundle of the own trust domain"
    );
    // A client-only certificate (no serverAuth) is no server.
    let client_only = mesh
        .ca()
        .issue_dns_client(&[BLUE.to_owned()], Duration::from_secs(600))
        .unwrap()
        .cert_der;
    assert_eq!(
        verdict(&mesh, Some("example.org"), names(&[BLUE]), &client_only),
        Some(PeerRejection::InvalidSvid),
        "a client certificate as a server"
    );
    // An SVID is still judged by its SPIFFE ID, whatever DNS SANs it has.
    let svid = mesh
        .ca()
        .issue_with(
            &SpiffeId::parse("spiffe://example.org/red").unwrap(),
            Duration::from_secs(600),
            &[BLUE.to_owned()],
        )
        .unwrap();
    let svid_leaf = svid.svid.chain()[0].clone();
    assert_eq!(
        verdict(&mesh, Some("example.org"), names(&[BLUE]), &svid_leaf),
        Some(PeerRejection::NotAllowed)
    );
}
