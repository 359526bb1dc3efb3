//! Rampart's data plane.
//!
//! Every connection flows through the same stages, one module each:
//! `accept` (listen, accept, original destination) -> `detect` (TLS, HTTP
//! or opaque, from the first bytes) -> `tls` (terminate or originate mTLS,
//! authenticate the peer) -> `authz` (inbound: obtain a permit, per
//! connection or, in `http`, per request) -> `forward` (splice bytes) or
//! `http` (proxy requests). Outbound HTTP/1.1 rides pooled HTTP/2
//! connections between sidecars (`pool`); `Upgrade` and `CONNECT` become
//! tunnels on connections of their own (`tunnel`). `inbound` and `outbound` chain the
//! stages; `server` binds and drains; `admin` serves health and metrics.

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
pub mod metrics;
pub mod orig_dst;
pub mod outbound;
pub mod policy;
pub mod probe;
pub mod server;
pub mod smuggling;
pub mod tls;

pub use config::ProxyConfig;
pub use server::{BoundProxy, bind};
