//! Fuzz target `detect`: see `rampart_fuzz::bodies::detect`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| rampart_fuzz::bodies::detect(data));
