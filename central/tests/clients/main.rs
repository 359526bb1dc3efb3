//! The central-management clients against real servers: the bundle poller
//! over nginx (plain and mTLS), the decision-log shipper, the ext_authz
//! client. One binary, one module per client.

mod bundle_mtls;
mod bundle_poller;
mod decision_logs;
mod ext_authz;
mod jwks_https;
