//! Fuzz target `admin_inputs`: see `rampart_fuzz::bodies::admin_inputs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| rampart_fuzz::bodies::admin_inputs(data));
