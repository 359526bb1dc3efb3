//! The rotation worker under paused tokio time: publish, rotate, expire,
//! recover, revoke.

use std::time::{Duration, SystemTime};

use super::*;
use crate::ca::DevCa;
use crate::id::{SpiffeId, TrustDomain};
use crate::store::ConfigSpec;
use crate::verify::IdMatcher;

struct Harness {
    ca: DevCa,
    store: Arc<IdentityStore>,
    tx: mpsc::Sender<Update>,
    clock: Clock,
}

fn harness() -> Harness {
    let td = TrustDomain::parse("example.org").unwrap();
    let ca = DevCa::generate(&td, Duration::from_secs(3600)).unwrap();
    let store = Arc::new(IdentityStore::new(ConfigSpec {
        server: vec![crate::tls::ServerSpec::default()],
        client: vec![IdMatcher::trust_domains([td])],
        alpn: vec![],
        server_alpn: vec![],
    }));
    let (tx, rx) = mpsc::channel(UPDATE_CHANNEL);
    let clock = tokio_clock(SystemTime::now());
    let worker = Rotation::new(store.clone(), SourceKind::DevCa, clock.clone());
    tokio::spawn(worker.run(rx));
    Harness {
        ca,
        store,
        tx,
        clock,
    }
}

impl Harness {
    /// An identity valid for `ttl` from now (the CA backdates by a minute).
    fn identity(&self, ttl: Duration) -> Identity {
        let id = SpiffeId::parse("spiffe://example.org/web").unwrap();
        let mut bundles = BundleSet::new();
        bundles.insert(self.ca.bundle().unwrap());
        Identity {
            svid: self
                .ca
                .issue_at(&id, (self.clock)(), ttl, &[])
                .unwrap()
                .svid,
            bundles,
        }
    }

    async fn send(&self, id: Identity) {
        self.tx.send(Update::Identity(Box::new(id))).await.unwrap();
        settle().await;
    }

    fn serial(&self) -> Option<String> {
        self.store.current().map(|c| c.svid.serial.clone())
    }
}

/// Lets the worker run without moving the clock.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn not_ready_until_the_first_svid() {
    let h = harness();
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(h.store.current().is_none());
    h.send(h.identity(Duration::from_secs(30))).await;
    assert!(h.store.current().is_some());
}

#[tokio::test(start_paused = true)]
async fn expiry_without_replacement_withdraws_at_not_after() {
    let h = harness();
    h.send(h.identity(Duration::from_secs(30))).await;
    tokio::time::sleep(Duration::from_secs(29)).await;
    assert!(h.store.current().is_some(), "withdrawn before expiry");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(h.store.current().is_none(), "still serving an expired SVID");
}

#[tokio::test(start_paused = true)]
async fn rotation_replaces_the_svid_and_moves_the_deadline() {
    let h = harness();
    h.send(h.identity(Duration::from_secs(30))).await;
    let first = h.serial().unwrap();
    tokio::time::sleep(Duration::from_secs(20)).await;
    h.send(h.identity(Duration::from_secs(30))).await;
    let second = h.serial().unwrap();
    assert_ne!(first, second);
    // Past the first SVID's expiry, the second keeps the sidecar ready.
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(h.serial().as_deref(), Some(second.as_str()));
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert!(h.store.current().is_none());
}

#[tokio::test(start_paused = true)]
async fn recovers_by_itself_after_expiry() {
    let h = harness();
    h.send(h.identity(Duration::from_secs(5))).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(h.store.current().is_none());
    h.send(h.identity(Duration::from_secs(5))).await;
    assert!(h.store.current().is_some());
}

#[tokio::test(start_paused = true)]
async fn an_expired_svid_is_ignored_and_the_current_one_kept() {
    let h = harness();
    let stale = h.identity(Duration::from_secs(1));
    h.send(h.identity(Duration::from_secs(600))).await;
    let serial = h.serial();
    tokio::time::sleep(Duration::from_secs(5)).await;
    h.send(stale).await;
    assert_eq!(h.serial(), serial);
}

#[tokio::test(start_paused = true)]
async fn revocation_withdraws_immediately() {
    let h = harness();
    h.send(h.identity(Duration::from_secs(600))).await;
    h.tx.send(Update::Revoked).await.unwrap();
    settle().await;
    assert!(h.store.current().is_none());
}

#[tokio::test(start_paused = true)]
async fn source_gone_keeps_serving_until_expiry() {
    let h = harness();
    h.send(h.identity(Duration::from_secs(30))).await;
    let Harness {
        store, tx, clock, ..
    } = h;
    drop(clock);
    drop(tx);
    settle().await;
    assert!(store.current().is_some());
    tokio::time::sleep(Duration::from_secs(31)).await;
    assert!(store.current().is_none());
}

#[test]
fn backoff_doubles_to_its_cap_with_jitter_and_resets() {
    let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
    let bases = [100, 200, 400, 800, 1000, 1000];
    for base in bases {
        let d = b.next_delay();
        let base = Duration::from_millis(base);
        assert!(
            d >= base / 2 && d <= base,
            "{d:?} not in [{:?}, {base:?}]",
            base / 2
        );
    }
    b.reset();
    assert!(b.next_delay() <= Duration::from_millis(100));
}
