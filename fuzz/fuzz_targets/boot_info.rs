//! libFuzzer entry of the `boot_info` target: see `fuzz::bootinfo`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz::bootinfo::run(data));
