//! Fuzz target `smuggling`: see `rampart_fuzz::bodies::smuggling`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| rampart_fuzz::bodies::smuggling(data));
