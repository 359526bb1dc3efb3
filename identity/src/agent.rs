//! A development SPIFFE Workload API server (`rampart agent`): serves
//! `FetchX509SVID` and `FetchX509Bundles` on a Unix socket, issuing SVIDs
//! from a [`DevCa`]. Callers are attested by the Unix UID of the peer process
//! (`SO_PEERCRED`), mapped to SPIFFE IDs by [`Registrations`].
//!
//! It follows the public protocol, so SPIRE's clients (go-spiffe, py-spiffe,
//! the `spiffe` crate) work against it: the `workload.spiffe.io: true` header
//! is required (`InvalidArgument` otherwise), unregistered callers get
//! `PermissionDenied`, every message carries full state, and open streams get
//! a fresh SVID at half-life, well before the old one expires. JWT-SVIDs are
//! not served (`Unimplemented`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::codegen::BoxStream;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};

use crate::ca::{CaError, DevCa};
use crate::id::SpiffeId;
use crate::pb::spiffe_workload_api_server::{SpiffeWorkloadApi, SpiffeWorkloadApiServer};
use crate::pb::{
    X509BundlesRequest, X509BundlesResponse, X509svid, X509svidRequest, X509svidResponse,
};

/// The metadata every Workload API request carries (Workload API §5).
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

/// Which SPIFFE IDs each Unix UID may obtain; the first is its default.
#[derive(Debug, Clone, Default)]
pub struct Registrations {
    by_uid: HashMap<u32, Vec<SpiffeId>>,
}

impl Registrations {
    /// Empty: everybody is refused.
    pub fn new() -> Self {
        Self::default()
    }

    /// Grants `id` to processes running as `uid` (in addition to earlier grants).
    pub fn add(&mut self, uid: u32, id: SpiffeId) {
        self.by_uid.entry(uid).or_default().push(id);
    }

    /// The IDs granted to `uid`, default first.
    pub fn lookup(&self, uid: u32) -> Option<&[SpiffeId]> {
        self.by_uid
            .get(&uid)
            .map(Vec::as_slice)
            .filter(|v| !v.is_empty())
    }
}

/// The agent: a CA, who gets what, and for how long.
pub struct Agent {
    ca: Arc<DevCa>,
    registrations: Arc<Registrations>,
    ttl: Duration,
    // Ends every open stream at shutdown; a graceful server shutdown waits
    // for in-flight requests, and these streams would otherwise never end.
    stop: Arc<watch::Sender<bool>>,
}

impl Agent {
    /// An agent issuing SVIDs valid for `ttl` from `ca`.
    pub fn new(ca: Arc<DevCa>, registrations: Registrations, ttl: Duration) -> Self {
        Agent {
            ca,
            registrations: Arc::new(registrations),
            ttl,
            stop: Arc::new(watch::channel(false).0),
        }
    }

    /// Serves the Workload API on `listener` until `shutdown` completes.
    pub async fn serve(
        self,
        listener: UnixListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), tonic::transport::Error> {
        let stop = self.stop.clone();
        let shutdown = async move {
            shutdown.await;
            stop.send_replace(true);
        };
        tonic::transport::Server::builder()
            .serve_with_incoming_shutdown(
                SpiffeWorkloadApiServer::new(self),
                UnixListenerStream::new(listener),
                shutdown,
            )
            .await
    }

    /// The IDs the calling process may obtain, after the header check.
    fn authorize<T>(&self, req: &Request<T>) -> Result<(u32, Vec<SpiffeId>), Status> {
        // "If the header is not present ... the server MUST respond with
        // InvalidArgument" (Workload API §5.2); the value is case-sensitive.
        let header = req.metadata().get(SECURITY_HEADER).map(|v| v.as_bytes());
        if header != Some(b"true".as_slice()) {
            return Err(Status::invalid_argument(
                "security header missing from request",
            ));
        }
        let uid = req
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|i| i.peer_cred)
            .map(|c| c.uid())
            .ok_or_else(|| Status::internal("peer credentials unavailable"))?;
        match self.registrations.lookup(uid) {
            Some(ids) => Ok((uid, ids.to_vec())),
            None => {
                tracing::info!(peer.uid = uid, "workload not registered; denied");
                Err(Status::permission_denied("no identity issued"))
            }
        }
    }

    fn x509_response(
        ca: &DevCa,
        ids: &[SpiffeId],
        ttl: Duration,
    ) -> Result<X509svidResponse, CaError> {
        let bundle = concat(ca.bundle()?.certs());
        let svids = ids
            .iter()
            .map(|id| {
                let issued = ca.issue(id, ttl)?;
                let svid = issued.svid;
                Ok(X509svid {
                    spiffe_id: id.to_string(),
                    x509_svid: concat(svid.chain()),
                    x509_svid_key: svid.key().secret_der().to_vec(),
                    bundle: bundle.clone(),
                    hint: String::new(),
                })
            })
            .collect::<Result<_, CaError>>()?;
        Ok(X509svidResponse {
            svids,
            crl: Vec::new(),
            federated_bundles: HashMap::new(),
        })
    }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for Agent {
    async fn fetch_x509svid(
        &self,
        req: Request<X509svidRequest>,
    ) -> Result<Response<BoxStream<X509svidResponse>>, Status> {
        let (uid, ids) = self.authorize(&req)?;
        let (tx, rx) = mpsc::channel(1);
        let ca = self.ca.clone();
        let ttl = self.ttl;
        let mut stop = self.stop.subscribe();
        tracing::info!(peer.uid = uid, spiffe.id = %ids[0], "X.509-SVID stream opened");
        tokio::spawn(async move {
            loop {
                let msg = Self::x509_response(&ca, &ids, ttl).map_err(|e| {
                    tracing::error!(error = %e, "SVID issuance failed");
                    Status::internal("SVID issuance failed")
                });
                let failed = msg.is_err();
                if tx.send(msg).await.is_err() || failed {
                    return;
                }
                tracing::debug!(peer.uid = uid, "X.509-SVID pushed");
                // Push the next SVID at half-life, before the current expires.
                tokio::select! {
                    () = tokio::time::sleep(ttl / 2) => {}
                    () = tx.closed() => return,
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn fetch_x509_bundles(
        &self,
        req: Request<X509BundlesRequest>,
    ) -> Result<Response<BoxStream<X509BundlesResponse>>, Status> {
        self.authorize(&req)?;
        let bundle = self
            .ca
            .bundle()
            .map_err(|_| Status::internal("bundle unavailable"))?;
        let td = bundle.trust_domain().id_string();
        let msg = X509BundlesResponse {
            crl: Vec::new(),
            bundles: HashMap::from([(td, concat(bundle.certs()))]),
        };
        let (tx, rx) = mpsc::channel(1);
        let mut stop = self.stop.subscribe();
        tokio::spawn(async move {
            // The bundle never changes while the agent runs; keep the stream
            // open (clients reconnect when it closes) until the client leaves.
            if tx.send(Ok(msg)).await.is_ok() {
                tokio::select! {
                    () = tx.closed() => {}
                    _ = stop.wait_for(|s| *s) => {}
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Concatenated DER certificates, the Workload API's encoding of chains and bundles.
fn concat(certs: &[rustls_pki_types::CertificateDer<'_>]) -> Vec<u8> {
    certs.iter().flat_map(|c| c.iter().copied()).collect()
}
