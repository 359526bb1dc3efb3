//! Fuzz target `normalize_path`: see `rampart_fuzz::bodies::normalize`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| rampart_fuzz::bodies::normalize(data));
