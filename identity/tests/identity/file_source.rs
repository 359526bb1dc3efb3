//! The file source: reload on change, Kubernetes Secret volume updates (the
//! atomic `..data` symlink swap), a broken update keeping the last good
//! identity, and bundles as SPIFFE JWK Sets.

use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::Duration;

use base64::Engine;
use rampart_identity::bundle::TrustBundle;
use rampart_identity::ca::DevCa;
use rampart_identity::files::{FilePaths, FileSource};
use rampart_identity::rotation::Update;
use rampart_identity::{SpiffeId, TrustDomain};
use tokio::sync::mpsc;

const POLL: Duration = Duration::from_millis(20);

fn ca() -> DevCa {
    DevCa::generate(
        &TrustDomain::parse("example.org").unwrap(),
        Duration::from_secs(3600),
    )
    .unwrap()
}

/// Writes one version of a Secret volume the way the kubelet does: files in
/// a fresh timestamped directory, then `..data` swapped to it by rename.
fn kubelet_write(volume: &Path, version: u32, ca: &DevCa, cert: &str) {
    let issued = ca
        .issue(
            &SpiffeId::parse("spiffe://example.org/web").unwrap(),
            Duration::from_secs(600),
        )
        .unwrap();
    let dir = volume.join(format!("..2026_v{version}"));
    std::fs::create_dir(&dir).unwrap();
    let cert = if cert.is_empty() {
        issued.chain_pem.as_str()
    } else {
        cert
    };
    std::fs::write(dir.join("tls.crt"), cert).unwrap();
    std::fs::write(dir.join("tls.key"), &issued.key_pem).unwrap();
    std::fs::write(dir.join("ca.crt"), ca.cert_pem()).unwrap();
    let tmp = volume.join("..data_tmp");
    symlink(dir.file_name().unwrap(), &tmp).unwrap();
    std::fs::rename(&tmp, volume.join("..data")).unwrap();
    for f in ["tls.crt", "tls.key", "ca.crt"] {
        let link = volume.join(f);
        if link.symlink_metadata().is_err() {
            symlink(format!("..data/{f}"), link).unwrap();
        }
    }
}

fn paths(volume: &Path) -> FilePaths {
    FilePaths {
        cert: volume.join("tls.crt"),
        key: volume.join("tls.key"),
        bundle: volume.join("ca.crt"),
        federated: vec![],
    }
}

async fn next_serial(rx: &mut mpsc::Receiver<Update>) -> Option<String> {
    match tokio::time::timeout(Duration::from_secs(2), rx.recv()).await {
        Ok(Some(Update::Identity(id))) => Some(id.svid.info().serial.clone()),
        Ok(other) => panic!("unexpected {other:?}"),
        Err(_) => None,
    }
}

#[tokio::test]
async fn secret_volume_updates_are_picked_up_and_broken_ones_ignored() {
    let volume = tempfile::tempdir().unwrap();
    let ca = ca();
    kubelet_write(volume.path(), 1, &ca, "");
    let (tx, mut rx) = mpsc::channel(4);
    tokio::spawn(FileSource::new(paths(volume.path()), POLL).run(tx));
    let first = next_serial(&mut rx).await.expect("initial load");

    // Unchanged files: nothing is sent.
    assert_eq!(next_serial(&mut rx).await, None);

    kubelet_write(volume.path(), 2, &ca, "");
    let second = next_serial(&mut rx)
        .await
        .expect("reload after the ..data swap");
    assert_ne!(first, second);

    // A broken certificate is not sent: the last good identity stays.
    kubelet_write(
        volume.path(),
        3,
        &ca,
        "-----BEGIN CERTIFICATE-----\nnot base64\n",
    );
    assert_eq!(next_serial(&mut rx).await, None);

    // Fixed again: picked up.
    kubelet_write(volume.path(), 4, &ca, "");
    assert!(next_serial(&mut rx).await.is_some());
}

#[test]
fn bundles_parse_from_jwks_and_pem_alike() {
    let ca = ca();
    let td = TrustDomain::parse("example.org").unwrap();
    let der = ca.bundle().unwrap().certs()[0].clone();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&der);
    let jwks = format!(
        r#"{{"spiffe_sequence": 7, "keys": [
            {{"kty": "EC", "use": "jwt-svid", "kid": "k1", "crv": "P-256", "x": "a", "y": "b"}},
            {{"kty": "EC", "use": "x509-svid", "crv": "P-256", "x": "a", "y": "b", "x5c": ["{b64}"]}},
            {{"kty": "EC", "use": "x509-svid"}}
        ]}}"#
    );
    let from_jwks = TrustBundle::parse(td.clone(), jwks.as_bytes()).unwrap();
    let from_pem = TrustBundle::parse(td.clone(), ca.cert_pem().as_bytes()).unwrap();
    assert_eq!(from_jwks.certs(), std::slice::from_ref(&der));
    assert_eq!(from_pem.certs(), &[der]);
    // A JWK Set without X.509 authorities names no CA: refused, not trusted-by-nobody silently.
    assert!(TrustBundle::parse(td.clone(), br#"{"keys": []}"#).is_err());
    assert!(TrustBundle::parse(td.clone(), br#"{"nokeys": 1}"#).is_err());
    assert!(TrustBundle::parse(td, b"garbage").is_err());
}
