//! Central management, the parts that need no network: policy bundles in
//! OPA's format ([`bundle`]), their signatures ([`signature`]) and the
//! bounded decision-log queue ([`decision_log`]). The `rampart` binary's
//! `central` module fetches bundles, ships logs and speaks ext_authz; this
//! module only turns bytes into an [`crate::Authorizer`] and decisions into
//! log entries, so all of it is testable without sockets.

pub mod bundle;
pub mod decision_log;
pub mod signature;
