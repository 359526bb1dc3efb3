//! Fuzz target `http_detect`: see `rampart_fuzz::bodies::http_detect`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| rampart_fuzz::bodies::http_detect(data));
