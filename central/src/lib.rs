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

pub mod bundle_poller;
pub mod decision_logs;
pub mod ext_authz;
pub mod http_fetch;
pub mod metrics;
pub mod pb;
