//! Generated protobuf types, client and server of Envoy's ext_authz v3
//! `Authorization/Check` (central/proto/ext_authz.proto). Generated once and
//! committed; central/proto/README.md says how to regenerate.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

include!("pb/ext_authz.rs");
