//! Rampart's data plane.
//!
//! Every connection flows through the same stages, one module each:
//! `accept` (listen, accept, original destination) -> `tls` (terminate or
//! originate mTLS, authenticate the peer) -> `authz` (inbound: obtain a
//! permit) -> `forward` (splice bytes). `inbound` and `outbound` chain the
//! stages; `server` binds and drains; `admin` serves health and metrics.

pub mod accept;
pub mod admin;
pub mod authz;
pub mod config;
pub mod drain;
pub mod forward;
pub mod inbound;
pub mod metrics;
pub mod orig_dst;
pub mod outbound;
pub mod server;
pub mod tls;

pub use config::ProxyConfig;
pub use server::{BoundProxy, bind};
