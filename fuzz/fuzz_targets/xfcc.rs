//! Fuzz target `xfcc`: see `rampart_fuzz::bodies::xfcc`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| rampart_fuzz::bodies::xfcc(data));
