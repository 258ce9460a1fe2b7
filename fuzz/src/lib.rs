//! Fuzz targets for everything the host controls, as plain functions: each
//! `run` takes the raw input, feeds it to the parsers and panics when a
//! property fails (or when a parser panics or overflows: the fuzz build
//! checks overflow). The libFuzzer binaries in `fuzz_targets/` call them;
//! `cargo test` replays the seeds and the saved crash inputs through them.
//!
//! | target | what the host controls |
//! |---|---|
//! | [`acpi`] (`acpi_madt`) | the ACPI tables: RSDP, RSDT/XSDT, MADT |
//! | [`bootinfo`] (`boot_info`) | the PVH start info and the Linux zero page with its e820 map |
//! | [`ve`] (`ve_info`) | the #VE information and every TDVMCALL answer |
//! | [`kernel`] (`kernel_image`) | the kernel file the emulator loads (ELF or bzImage) |
//!
//! Run them with `make fuzz-smoke` (seconds each, part of `make test`) or
//! `make fuzz` (minutes each); see `scripts/fuzz.sh`.

// Lists of allowed byte ranges often hold one range: that is what is meant.
#![allow(clippy::single_range_in_vec_init)]

pub mod acpi;
pub mod bootinfo;
pub mod kernel;
pub mod memory;
pub mod seeds;
pub mod ve;

/// The target called `name`, for the replay tests and tools.
pub fn target(name: &str) -> Option<fn(&[u8])> {
    match name {
        "acpi_madt" => Some(acpi::run),
        "boot_info" => Some(bootinfo::run),
        "ve_info" => Some(ve::run),
        "kernel_image" => Some(kernel::run),
        _ => None,
    }
}
