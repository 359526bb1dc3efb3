//! Rampart's data plane.
//!
//! Every connection, HTTP or opaque, flows through the same stages, one
//! module each, in this order:
//!
//! `listen` (bind) -> `accept` (client and destination) -> `orig_dst`
//! (captured listeners) -> `detect` (TLS, HTTP or opaque, from the first
//! bytes) -> `tls` (terminate or originate mTLS, authenticate the peer) ->
//! `authz` (inbound: a decision becomes a permit, a metric and a log line,
//! per connection or per request) -> `forward` (the one place that talks
//! to the app or the peer, per connection or per request). Outbound
//! connections pass `route` (passthrough, or the server identity to
//! expect) instead of `authz`.
//!
//! `inbound` and `outbound` chain the stages for each direction. HTTP's
//! own steps live in `http/`: inbound (`server`, `authorize`, `forward`)
//! beside outbound (`outbound`, `pool`), sharing `headers`, `errors`,
//! `tunnel` and `body`. `access` records one event per connection or
//! request, `metrics` declares every series, `policy` holds the policies
//! in force, `server` binds and drains, `admin` serves health and metrics.

#![forbid(unsafe_code)]

pub mod accept;
pub mod access;
pub mod admin;
pub mod authz;
pub mod config;
pub mod detect;
pub mod drain;
pub mod forward;
pub mod http;
pub mod inbound;
pub mod listen;
pub mod log_limit;
pub mod metrics;
pub mod orig_dst;
pub mod outbound;
pub mod policy;
pub mod probe;
pub mod route;
pub mod server;
pub mod smuggling;
pub mod tls;
pub mod trace;

#[cfg(test)]
mod testing;

pub use config::ProxyConfig;
pub use server::{BoundProxy, bind};
