//! libFuzzer entry of the `kernel_image` target: see `fuzz::kernel`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz::kernel::run(data));
