//! Generated protobuf types and the gRPC server trait of the SPIFFE Workload
//! API (identity/proto/workload.proto). The code is generated once and
//! committed, so that building Rampart needs neither `protoc` nor a build
//! script; identity/proto/README.md says how to regenerate it.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

include!("pb/workload.rs");
