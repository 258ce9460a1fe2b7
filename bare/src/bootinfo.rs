//! The PVH `hvm_start_info` structure (Xen public ABI, used by QEMU's PVH
//! boot) and its memory map. Physical memory is read through [`PhysRead`] so
//! the parser is tested on the host.

/// `hvm_start_info.magic`.
pub const HVM_START_MAGIC: u32 = 0x336e_c578;
/// E820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// Entries this parser keeps at most.
pub const MAX_REGIONS: usize = 32;

/// Reads physical memory (identity-mapped at boot).
pub trait PhysRead {
    /// The little-endian u32 at `pa`.
    fn read_u32(&self, pa: u64) -> u32;
    /// The little-endian u64 at `pa`.
    fn read_u64(&self, pa: u64) -> u64;
}

/// Physical memory read through the boot identity map (the low 4 GiB, as
/// the PVH entry maps it), where QEMU puts the start info, the memory map
/// and the ACPI tables.
#[cfg(target_os = "none")]
pub struct IdentityMapped;

#[cfg(target_os = "none")]
impl PhysRead for IdentityMapped {
    fn read_u32(&self, pa: u64) -> u32 {
        // SAFETY: used only while the boot identity map is live, for
        // structures the loader placed in RAM below 4 GiB.
        unsafe { core::ptr::read_unaligned(pa as *const u32) }
    }
    fn read_u64(&self, pa: u64) -> u64 {
        // SAFETY: as read_u32.
        unsafe { core::ptr::read_unaligned(pa as *const u64) }
    }
}

/// One memory-map entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Region {
    /// First byte.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// E820 type (1 = RAM).
    pub kind: u32,
}

impl Region {
    /// One past the last byte (saturating).
    pub const fn end(&self) -> u64 {
        self.start.saturating_add(self.len)
    }
}

/// What the kernel needs from `hvm_start_info`.
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    /// Physical address of the ACPI RSDP (0 if none).
    pub rsdp: u64,
    /// Physical address of the command line (0 if none).
    pub cmdline: u64,
    /// The memory map, `regions[..region_count]`.
    pub regions: [Region; MAX_REGIONS],
    /// Valid entries in `regions`.
    pub region_count: usize,
    /// Physical address of the first module (e.g. `-initrd`), and its size.
    pub first_module: Option<(u64, u64)>,
}

/// Why the start info was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootInfoError {
    /// Not an `hvm_start_info` (bad magic).
    BadMagic(u32),
    /// Version 0 has no memory map.
    NoMemoryMap,
}

impl BootInfo {
    /// Parses the structure at `pa`.
    pub fn parse(memory: &impl PhysRead, pa: u64) -> Result<BootInfo, BootInfoError> {
        let magic = memory.read_u32(pa);
        if magic != HVM_START_MAGIC {
            return Err(BootInfoError::BadMagic(magic));
        }
        let version = memory.read_u32(pa + 4);
        let nr_modules = memory.read_u32(pa + 12);
        let modlist = memory.read_u64(pa + 16);
        let cmdline = memory.read_u64(pa + 24);
        let rsdp = memory.read_u64(pa + 32);
        if version < 1 {
            return Err(BootInfoError::NoMemoryMap);
        }
        let memmap = memory.read_u64(pa + 40);
        let entries = memory.read_u32(pa + 48) as usize;
        let mut info = BootInfo {
            rsdp,
            cmdline,
            regions: [Region::default(); MAX_REGIONS],
            region_count: 0,
            first_module: None,
        };
        for i in 0..entries.min(MAX_REGIONS) {
            let entry = memmap + i as u64 * 24;
            info.regions[i] = Region {
                start: memory.read_u64(entry),
                len: memory.read_u64(entry + 8),
                kind: memory.read_u32(entry + 16),
            };
            info.region_count += 1;
        }
        if nr_modules > 0 && modlist != 0 {
            info.first_module = Some((memory.read_u64(modlist), memory.read_u64(modlist + 8)));
        }
        Ok(info)
    }

    /// The usable-RAM regions.
    pub fn ram(&self) -> impl Iterator<Item = &Region> {
        self.regions[..self.region_count]
            .iter()
            .filter(|r| r.kind == E820_RAM)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Buffer(Vec<u8>);
    impl PhysRead for Buffer {
        fn read_u32(&self, pa: u64) -> u32 {
            let at = pa as usize;
            u32::from_le_bytes(self.0[at..at + 4].try_into().unwrap())
        }
        fn read_u64(&self, pa: u64) -> u64 {
            let at = pa as usize;
            u64::from_le_bytes(self.0[at..at + 8].try_into().unwrap())
        }
    }

    fn put(buffer: &mut [u8], at: usize, bytes: &[u8]) {
        buffer[at..at + bytes.len()].copy_from_slice(bytes);
    }

    #[test]
    fn parses_memory_map_and_rsdp() {
        let mut b = vec![0u8; 512];
        put(&mut b, 0, &HVM_START_MAGIC.to_le_bytes());
        put(&mut b, 4, &1u32.to_le_bytes());
        put(&mut b, 32, &0xf_5a20u64.to_le_bytes());
        put(&mut b, 40, &0x100u64.to_le_bytes());
        put(&mut b, 48, &3u32.to_le_bytes());
        let regions = [
            (0u64, 0x9fc00u64, 1u32),
            (0xf0000, 0x10000, 2),
            (0x10_0000, 0xff0_0000, 1),
        ];
        for (i, (start, len, kind)) in regions.iter().enumerate() {
            let at = 0x100 + i * 24;
            put(&mut b, at, &start.to_le_bytes());
            put(&mut b, at + 8, &len.to_le_bytes());
            put(&mut b, at + 16, &kind.to_le_bytes());
        }
        let info = BootInfo::parse(&Buffer(b), 0).unwrap();
        assert_eq!(info.rsdp, 0xf_5a20);
        assert_eq!(info.region_count, 3);
        let ram: Vec<_> = info.ram().map(|r| (r.start, r.end())).collect();
        assert_eq!(ram, vec![(0, 0x9fc00), (0x10_0000, 0x1000_0000)]);
        assert_eq!(info.first_module, None);
    }

    #[test]
    fn refuses_bad_magic_and_version_0() {
        let mut b = vec![0u8; 64];
        assert_eq!(
            BootInfo::parse(&Buffer(b.clone()), 0).unwrap_err(),
            BootInfoError::BadMagic(0)
        );
        put(&mut b, 0, &HVM_START_MAGIC.to_le_bytes());
        assert_eq!(
            BootInfo::parse(&Buffer(b), 0).unwrap_err(),
            BootInfoError::NoMemoryMap
        );
    }
}
