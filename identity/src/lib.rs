//! Identity for Rampart: SPIFFE IDs, X.509-SVIDs, trust bundles, identity
//! sources and the rustls verifiers that authenticate peers.
//!
//! The proxy never touches certificates directly: it asks this crate for
//! ready-made TLS configurations and receives the peer's [`SpiffeId`] after a
//! handshake.

pub mod id;

pub use id::{SpiffeId, SpiffeIdError, TrustDomain};
