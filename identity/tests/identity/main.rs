//! Identity end to end: TLS handshakes between SPIFFE identities (and
//! DNS-SAN ingress clients), X.509-SVID rules, the file source and the
//! Workload API. One binary, one module per topic.

mod dns_san_clients;
mod dns_san_servers;
mod file_source;
mod handshake;
mod svid_rules;
mod workload_api;
