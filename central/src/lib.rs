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
//! # Wiring (what the binary does at start)
//!
//! ```text
//! metrics::describe();
//! // inbound.bundle: {url, poll_interval, timeout, query, verification}
//! let options = BundleOptions { authz: <Options>, verification: Some(Verification {
//!         keys: vec![VerificationKey::from_public_pem(key_id, alg, &pem)?], scope }),
//!     query, ..Default::default() };
//! let tls: ClientTlsProvider = Arc::new(move || store.current().map(|c| c.client[i].clone()));
//! let (policies, _task) = bundle_poller::spawn(source, options, Some(tls), fallback);
//! //   readiness: policies.has_policy(); admin API: policies.status();
//! //   the proxy reads policies.current() (or subscribe()) per request.
//! // ext_authz.providers: [{name, endpoint, timeout, failure_mode_allow_i_understand_the_risk}]
//! let providers = ExtAuthzClients::new(configs)?;   // an ExternalAuthorizer
//! //   per request: authorizer.authorize_request(&conn, &req, &providers).await
//! // decision_logs: {url, max_queued, max_batch, flush_interval, labels, redact}
//! let (logger, _task) = decision_logs::spawn(config, EntryContext { .. }, Some(tls));
//! //   per request, after deciding: logger.log(&conn, &req, &decision)
//! ```

pub mod bundle_poller;
pub mod decision_logs;
pub mod ext_authz;
pub mod http_fetch;
pub mod metrics;
pub mod pb;
