//! libFuzzer entry of the `ve_info` target: see `fuzz::ve`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz::ve::run(data));
