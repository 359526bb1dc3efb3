//! Identity for Rampart: SPIFFE IDs, X.509-SVIDs, trust bundles, identity
//! sources and the rustls verifiers that authenticate peers.
//!
//! The proxy never touches certificates directly: it receives ready-made TLS
//! configurations from the [`store::IdentityStore`] and the peer's
//! [`verify::PeerIdentity`] after a handshake.
//!
//! Identity sources are workers that only produce [`rotation::Update`]s:
//! [`workload_api::WorkloadApiSource`] (a SPIRE agent or `rampart agent`),
//! [`files::FileSource`] and [`ca::DevCaSource`]. One [`rotation::Rotation`]
//! worker publishes them into the store and withdraws an expired SVID.
//! [`agent`] is the development Workload API server behind `rampart agent`.

#![forbid(unsafe_code)]

pub mod agent;
pub mod bundle;
pub mod ca;
pub mod files;
pub mod id;
pub mod metrics;
mod pb;
pub mod rotation;
pub mod store;
pub mod svid;
pub mod tls;
pub mod verify;
pub mod workload_api;

pub use id::{SpiffeId, SpiffeIdError, TrustDomain};
pub use verify::{IdMatcher, PeerIdentity};
