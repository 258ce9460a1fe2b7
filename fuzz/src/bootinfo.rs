//! Target `boot_info`: `bare::bootinfo::BootInfo` from a PVH
//! `hvm_start_info` or a Linux `boot_params` (zero page) the host wrote.
//!
//! Input: byte 0 picks the format (bit 0: 0 PVH, 1 the 64-bit boot
//! protocol), bytes 1..9 the structure's address (little-endian u64); the
//! whole input is physical memory from address 0, and 0xff above it.
//!
//! Checked: no read wraps the address space; `parse_for` agrees with the
//! format's own parser; and on success
//! - `region_count <= MAX_REGIONS`, `region_count + regions_dropped` is the
//!   entry count the structure gives (at most 128 for a zero page, whose
//!   table then lies inside its 4 KiB), the slots past `region_count` are
//!   empty, and each region is the entry at its place in memory;
//! - every read lies inside the structure (56 bytes of `hvm_start_info`, or
//!   the 4 KiB zero page), the PVH memory map's kept entries, or the PVH
//!   first module's 16 bytes;
//! - `ram()` yields only E820 RAM, from the kept regions;
//! - the first module, command line and RSDP are the fields' values.

use crate::memory::{assert_covered, Input, Memory};
use bare::bootinfo::{
    zero_page, BootInfo, BootInfoError, BootProtocol, Region, E820_RAM, HVM_START_MAGIC,
    MAX_REGIONS,
};

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let protocol = if input.u8() & 1 == 0 {
        BootProtocol::Pvh
    } else {
        BootProtocol::Linux64
    };
    let pa = input.u64();
    let memory = Memory::new(data);
    let parsed = match protocol {
        BootProtocol::Pvh => BootInfo::parse(&memory, pa),
        BootProtocol::Linux64 => BootInfo::parse_boot_params(&memory, pa),
    };
    let reads = memory.reads();
    let again = BootInfo::parse_for(protocol, &memory, pa);
    match (&parsed, &again) {
        (Ok(a), Ok(b)) => assert_same(a, b),
        (Err(a), Err(b)) => assert_eq!(a, b),
        _ => panic!("parse_for disagrees: {parsed:?} / {again:?}"),
    }
    memory.clear_reads();
    let Ok(info) = parsed else { return };
    let regions = &info.regions[..info.region_count];
    assert!(info.region_count <= MAX_REGIONS);
    assert!(info.regions[info.region_count..]
        .iter()
        .all(|r| *r == Region::default()));
    assert!(info.ram().all(|r| r.kind == E820_RAM));
    assert_eq!(
        info.ram().count(),
        regions.iter().filter(|r| r.kind == E820_RAM).count()
    );
    let entry_at = |at: u64| Region {
        start: memory.peek_u64(at),
        len: memory.peek_u64(at + 8),
        kind: memory.peek_u32(at + 16),
    };
    match protocol {
        BootProtocol::Pvh => {
            assert_eq!(memory.peek_u32(pa), HVM_START_MAGIC);
            assert!(memory.peek_u32(pa + 4) >= 1, "version 0 has no memory map");
            let entries = memory.peek_u32(pa + 48) as usize;
            assert_eq!(info.region_count, entries.min(MAX_REGIONS));
            assert_eq!(info.region_count + info.regions_dropped, entries);
            let memmap = memory.peek_u64(pa + 40);
            let map_end = memmap
                .checked_add(24 * info.region_count as u64)
                .expect("accepted a memory map that wraps");
            for (i, region) in regions.iter().enumerate() {
                assert_eq!(*region, entry_at(memmap + 24 * i as u64), "region {i}");
            }
            let modules = memory.peek_u32(pa + 12);
            let modlist = memory.peek_u64(pa + 16);
            let module = (modules > 0 && modlist != 0)
                .then(|| (memory.peek_u64(modlist), memory.peek_u64(modlist + 8)));
            assert_eq!(info.first_module, module);
            assert_eq!(info.cmdline, memory.peek_u64(pa + 24));
            assert_eq!(info.rsdp, memory.peek_u64(pa + 32));
            let mut allowed = vec![pa..pa + 56, memmap..map_end];
            if module.is_some() {
                allowed.push(modlist..modlist + 16);
            }
            assert_covered(&reads, &allowed, "BootInfo::parse");
        }
        BootProtocol::Linux64 => {
            use zero_page::*;
            let end = pa + SIZE;
            let entries = usize::from(memory.peek::<1>(pa + E820_ENTRIES)[0]);
            assert!(entries <= usize::from(E820_MAX_ENTRIES));
            assert!(E820_TABLE + entries as u64 * E820_ENTRY_SIZE <= SIZE);
            assert_eq!(info.region_count, entries.min(MAX_REGIONS));
            assert_eq!(info.region_count + info.regions_dropped, entries);
            for (i, region) in regions.iter().enumerate() {
                let at = pa + E820_TABLE + i as u64 * E820_ENTRY_SIZE;
                assert_eq!(*region, entry_at(at), "e820 entry {i}");
            }
            let high_low = |high: u64, low: u64| {
                u64::from(memory.peek_u32(pa + high)) << 32 | u64::from(memory.peek_u32(pa + low))
            };
            let ramdisk = high_low(EXT_RAMDISK_IMAGE, RAMDISK_IMAGE);
            let ramdisk_size = high_low(EXT_RAMDISK_SIZE, RAMDISK_SIZE);
            assert_eq!(
                info.first_module,
                (ramdisk != 0 && ramdisk_size != 0).then_some((ramdisk, ramdisk_size))
            );
            assert_eq!(info.cmdline, high_low(EXT_CMD_LINE_PTR, CMD_LINE_PTR));
            assert_eq!(info.rsdp, memory.peek_u64(pa + ACPI_RSDP_ADDR));
            assert_covered(&reads, &[pa..end], "BootInfo::parse_boot_params");
        }
    }
}

fn assert_same(a: &BootInfo, b: &BootInfo) {
    assert_eq!(a.rsdp, b.rsdp);
    assert_eq!(a.cmdline, b.cmdline);
    assert_eq!(a.regions, b.regions);
    assert_eq!(a.region_count, b.region_count);
    assert_eq!(a.regions_dropped, b.regions_dropped);
    assert_eq!(a.first_module, b.first_module);
}

/// Parses a zero page that `bytes` holds at address 0 (for the kernel-image
/// target's round trip), through the same recording memory.
pub fn parse_zero_page(bytes: &[u8]) -> Result<BootInfo, BootInfoError> {
    let memory = Memory::new(bytes);
    let info = BootInfo::parse_boot_params(&memory, 0);
    memory.assert_reads_within(&[0..zero_page::SIZE], "parse_boot_params");
    info
}
