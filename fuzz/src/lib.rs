//! Rampart's fuzz target bodies, shared by the libFuzzer targets in
//! `fuzz_targets/` and by the root crate's `tests/cli/fuzz_seeds.rs`.

#[path = "bodies.rs"]
pub mod bodies;
