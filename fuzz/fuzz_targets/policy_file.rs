//! Fuzz target `policy_file`: see `rampart_fuzz::bodies::policy_file`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| rampart_fuzz::bodies::policy_file(data));
