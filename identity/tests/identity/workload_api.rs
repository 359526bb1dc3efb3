//! The Workload API source (the `spiffe` crate's client) against the
//! development agent, in process, over a Unix socket: selection by ID and
//! hint, redaction, permission denied, and rotation pushed on open streams.

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::time::Duration;

use rampart_identity::agent::{Agent, Registrations};
use rampart_identity::ca::DevCa;
use rampart_identity::rotation::Update;
use rampart_identity::workload_api::{SvidSelector, WorkloadApiConfig, WorkloadApiSource};
use rampart_identity::{SpiffeId, TrustDomain};
use spiffe::{WorkloadApiClient, WorkloadApiError};
use tokio::sync::mpsc;

const WEB: &str = "spiffe://example.org/web";
const DB: &str = "spiffe://example.org/db";

struct Running {
    _dir: tempfile::TempDir,
    endpoint: String,
}

/// Starts an agent granting this process's UID `ids` (first is the default).
async fn agent(ids: &[&str], ttl: Duration) -> Running {
    let dir = tempfile::tempdir().unwrap();
    // Our UID, without libc: the owner of a file we just created.
    let marker = dir.path().join("uid");
    std::fs::write(&marker, b"").unwrap();
    let uid = std::fs::metadata(&marker).unwrap().uid();
    let mut regs = Registrations::new();
    for id in ids {
        regs.add(uid, SpiffeId::parse(id).unwrap());
    }
    let td = TrustDomain::parse("example.org").unwrap();
    let ca = DevCa::generate(&td, Duration::from_secs(3600)).unwrap();
    let socket = dir.path().join("agent.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let agent = Agent::new(Arc::new(ca), regs, ttl);
    tokio::spawn(agent.serve(listener, std::future::pending()));
    Running {
        endpoint: format!("unix://{}", socket.display()),
        _dir: dir,
    }
}

fn source(endpoint: &str, select: SvidSelector) -> mpsc::Receiver<Update> {
    let (tx, rx) = mpsc::channel(4);
    let src = WorkloadApiSource::new(WorkloadApiConfig {
        endpoint: endpoint.to_owned(),
        select,
        backoff_initial: Duration::from_millis(50),
        backoff_max: Duration::from_millis(200),
    });
    tokio::spawn(src.run(tx));
    rx
}

async fn next(rx: &mut mpsc::Receiver<Update>) -> Update {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("an update in time")
        .expect("source running")
}

#[tokio::test]
async fn selects_the_default_svid_or_the_configured_one() {
    let a = agent(&[WEB, DB], Duration::from_secs(600)).await;
    for (select, want) in [
        (SvidSelector::First, WEB),
        (SvidSelector::Id(SpiffeId::parse(DB).unwrap()), DB),
    ] {
        let mut rx = source(&a.endpoint, select.clone());
        match next(&mut rx).await {
            Update::Identity(id) => {
                assert_eq!(id.svid.id().as_str(), want, "{select:?}");
                let td = TrustDomain::parse("example.org").unwrap();
                assert!(id.bundles.get(&td).is_some(), "own trust domain bundle");
            }
            Update::Revoked => panic!("{select:?}: revoked"),
        }
    }
}

#[tokio::test]
async fn a_missing_selected_svid_revokes_the_identity() {
    let a = agent(&[WEB], Duration::from_secs(600)).await;
    let mut rx = source(&a.endpoint, SvidSelector::Hint("internal".into()));
    assert!(matches!(next(&mut rx).await, Update::Revoked));
}

#[tokio::test]
async fn open_streams_get_a_new_svid_before_expiry() {
    let a = agent(&[WEB], Duration::from_secs(2)).await;
    let mut rx = source(&a.endpoint, SvidSelector::First);
    let serial = |u: Update| match u {
        Update::Identity(id) => (id.svid.info().serial.clone(), id.svid.info().not_after),
        Update::Revoked => panic!("revoked"),
    };
    let (first, expires) = serial(next(&mut rx).await);
    let (second, _) = serial(next(&mut rx).await);
    assert_ne!(first, second);
    assert!(
        std::time::SystemTime::now() < expires,
        "pushed after expiry"
    );
}

#[tokio::test]
async fn unregistered_callers_are_denied() {
    let a = agent(&[], Duration::from_secs(600)).await;
    let client = WorkloadApiClient::connect_to(&a.endpoint).await.unwrap();
    let err = client.fetch_x509_svid().await.unwrap_err();
    assert!(
        matches!(
            err,
            WorkloadApiError::NoIdentityIssued | WorkloadApiError::PermissionDenied(_)
        ),
        "{err:?}"
    );
    // The source says the workload has no identity (so that one in service
    // is withdrawn, as when SPIRE deletes an entry), keeps retrying with
    // backoff, and never delivers an identity meanwhile.
    let mut rx = source(&a.endpoint, SvidSelector::First);
    let deadline = tokio::time::Instant::now() + Duration::from_millis(700);
    let mut revoked = 0;
    while let Ok(update) = tokio::time::timeout_at(deadline, rx.recv()).await {
        match update.expect("source running") {
            Update::Revoked => revoked += 1,
            Update::Identity(id) => {
                panic!("an identity for an unregistered caller: {}", id.svid.id())
            }
        }
    }
    assert!(revoked >= 2, "{revoked} revocations: not retrying?");
}
