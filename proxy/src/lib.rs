//! Rampart's data plane.
//!
//! Every connection flows through the same stages, one module each:
//! `listen -> accept -> orig_dst -> detect -> tls -> identity -> authz -> forward`.
