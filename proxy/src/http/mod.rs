//! HTTP through the pipeline: inbound (`server`) and outbound (`outbound`,
//! the pooled sidecar-to-sidecar HTTP/2), tunnels and bodies.

pub mod body;
pub mod outbound;
pub mod server;
pub mod tunnel;

pub use server::*;
