//! Central management for Rampart sidecars, the network-facing half (the
//! pure half is `rampart_authz::central`):
//!
//! - [`bundle_poller`]: fetches a policy bundle from a URL (`If-None-Match`,
//!   jittered interval, mTLS with the sidecar's SVID for `https`), verifies
//!   and compiles it off the runtime's worker threads, and publishes the new
//!   `Arc<Authorizer>` over a `watch` channel; a bad bundle leaves the last
//!   good one in force.
//! - [`ext_authz`]: the client of Envoy's ext_authz gRPC v3 `Check`, behind
//!   `rampart_authz::external::ExternalAuthorizer`, for CUSTOM policies.
//! - [`decision_logs`]: a bounded queue the request path pushes to without
//!   waiting, and a shipper that posts gzipped batches in OPA's
//!   decision-log shape.
//!
//! Everything here is spawned and wired by the `rampart` binary; nothing
//! reads the environment or files on its own.
//!
//! # Wiring
//!
//! `src/central.rs` in the `rampart` binary does it at start, from the
//! configuration's `inbound.bundle`, `ext_authz` and `decision_logs`:
//! [`bundle_poller::spawn`] with the identity store's client configuration
//! for `https` URLs, a task that puts every published `Arc<Authorizer>` into
//! the proxy's policy cell (with the revision, for the admin API), an
//! [`ext_authz::ExtAuthzClients`] as the proxy's `ExternalAuthorizer`, and a
//! [`decision_logs::DecisionLogger`] as its `DecisionSink`.

#![forbid(unsafe_code)]

pub mod bundle_poller;
pub mod decision_logs;
pub mod ext_authz;
pub mod http_fetch;
pub mod jwks;
pub mod metrics;
pub mod pb;
