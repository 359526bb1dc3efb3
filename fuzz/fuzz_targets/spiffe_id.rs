//! Fuzz target `spiffe_id`: see `rampart_fuzz::bodies::spiffe_id`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| rampart_fuzz::bodies::spiffe_id(data));
