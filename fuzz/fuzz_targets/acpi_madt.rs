//! libFuzzer entry of the `acpi_madt` target: see `fuzz::acpi`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz::acpi::run(data));
