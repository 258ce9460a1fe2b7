//! The boot information a loader hands over, in either of the two formats
//! the entries of [`crate::boot`] accept: the PVH `hvm_start_info` (Xen
//! public ABI, used by QEMU's PVH boot) or the Linux `struct boot_params`
//! (the "zero page" of the 64-bit boot protocol, used by TD firmware). Both
//! become the same [`BootInfo`]. Physical memory is read through
//! [`PhysRead`] so the parsers are tested on the host.

/// `hvm_start_info.magic`.
pub const HVM_START_MAGIC: u32 = 0x336e_c578;
/// E820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// Entries this parser keeps at most.
pub const MAX_REGIONS: usize = 32;

/// The Linux `struct boot_params` ("zero page", `arch/x86/include/uapi/asm/bootparam.h`):
/// byte offsets of the fields this parser reads, and their expected values.
pub mod zero_page {
    /// The structure's size: every field is inside these bytes.
    pub const SIZE: u64 = 4096;
    /// `acpi_rsdp_addr` (u64).
    pub const ACPI_RSDP_ADDR: u64 = 0x070;
    /// `ext_ramdisk_image` (u32): bits 63..32 of the ramdisk address.
    pub const EXT_RAMDISK_IMAGE: u64 = 0x0c0;
    /// `ext_ramdisk_size` (u32): bits 63..32 of the ramdisk size.
    pub const EXT_RAMDISK_SIZE: u64 = 0x0c4;
    /// `ext_cmd_line_ptr` (u32): bits 63..32 of the command-line address.
    pub const EXT_CMD_LINE_PTR: u64 = 0x0c8;
    /// `e820_entries` (u8).
    pub const E820_ENTRIES: u64 = 0x1e8;
    /// `hdr.boot_flag` (u16).
    pub const BOOT_FLAG: u64 = 0x1fe;
    /// `hdr.header` (u32).
    pub const HEADER: u64 = 0x202;
    /// `hdr.ramdisk_image` (u32).
    pub const RAMDISK_IMAGE: u64 = 0x218;
    /// `hdr.ramdisk_size` (u32).
    pub const RAMDISK_SIZE: u64 = 0x21c;
    /// `hdr.cmd_line_ptr` (u32).
    pub const CMD_LINE_PTR: u64 = 0x228;
    /// `e820_table`: entries of [`E820_ENTRY_SIZE`] bytes (addr u64, size
    /// u64, type u32).
    pub const E820_TABLE: u64 = 0x2d0;
    /// One `boot_e820_entry`.
    pub const E820_ENTRY_SIZE: u64 = 20;
    /// `E820_MAX_ENTRIES_ZEROPAGE`: the room in `e820_table`.
    pub const E820_MAX_ENTRIES: u8 = 128;
    /// `hdr.boot_flag` of a valid setup header.
    pub const BOOT_FLAG_VALUE: u16 = 0xaa55;
    /// `hdr.header`: "HdrS".
    pub const HEADER_MAGIC: u32 = 0x5372_6448;
}

/// How the program was entered, and so what its boot information is: the
/// second argument of `bare_main` (see [`crate::boot`]), as a raw number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootProtocol {
    /// The PVH entry: the information is an `hvm_start_info`.
    Pvh,
    /// The Linux 64-bit boot protocol: the information is a `struct
    /// boot_params`.
    Linux64,
}

impl BootProtocol {
    /// The number the boot code passes for this protocol.
    pub const fn raw(self) -> u64 {
        match self {
            BootProtocol::Pvh => 0,
            BootProtocol::Linux64 => 1,
        }
    }

    /// The protocol the boot code passed as `raw`.
    pub const fn from_raw(raw: u64) -> Result<BootProtocol, BootInfoError> {
        match raw {
            0 => Ok(BootProtocol::Pvh),
            1 => Ok(BootProtocol::Linux64),
            other => Err(BootInfoError::UnknownProtocol(other)),
        }
    }

    /// A name for logs.
    pub const fn name(self) -> &'static str {
        match self {
            BootProtocol::Pvh => "PVH",
            BootProtocol::Linux64 => "64-bit boot protocol",
        }
    }
}

/// Reads physical memory (identity-mapped at boot).
pub trait PhysRead {
    /// The little-endian u32 at `pa`.
    fn read_u32(&self, pa: u64) -> u32;
    /// The little-endian u64 at `pa`.
    fn read_u64(&self, pa: u64) -> u64;
}

/// Physical memory read through the boot identity map (the low 4 GiB, as
/// both entries map it), where the loader puts the boot information, the
/// memory map and the ACPI tables.
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

/// What the kernel needs from the boot information.
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    /// Physical address of the ACPI RSDP (0 if none).
    pub rsdp: u64,
    /// Physical address of the NUL-terminated command line (0 if none).
    pub cmdline: u64,
    /// The memory map, `regions[..region_count]`, in the loader's order.
    pub regions: [Region; MAX_REGIONS],
    /// Valid entries in `regions`.
    pub region_count: usize,
    /// Memory-map entries past the first [`MAX_REGIONS`], not kept. Nothing
    /// in them is used: RAM among them stays unused (safe, only smaller).
    pub regions_dropped: usize,
    /// Physical address of the first module (e.g. `-initrd`, or the
    /// ramdisk of the 64-bit boot protocol), and its size.
    pub first_module: Option<(u64, u64)>,
}

/// Why the boot information was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootInfoError {
    /// Not an `hvm_start_info` (bad magic).
    BadMagic(u32),
    /// Version 0 has no memory map.
    NoMemoryMap,
    /// A `boot_params` whose `hdr.boot_flag` is not 0xAA55.
    BadBootFlag(u16),
    /// A `boot_params` whose `hdr.header` is not "HdrS".
    BadHeaderMagic(u32),
    /// More `e820_entries` than `e820_table` has room for (128).
    TooManyE820Entries(u8),
    /// A structure or table that would run past the end of the address
    /// space (its start address).
    AddressOverflow(u64),
    /// The boot code passed a protocol number this crate does not know.
    UnknownProtocol(u64),
}

/// `base + offset`, refused if it wraps.
fn at(base: u64, offset: u64) -> Result<u64, BootInfoError> {
    base.checked_add(offset)
        .ok_or(BootInfoError::AddressOverflow(base))
}

impl BootInfo {
    /// Parses the boot information at `pa` in the format `protocol` says.
    pub fn parse_for(
        protocol: BootProtocol,
        memory: &impl PhysRead,
        pa: u64,
    ) -> Result<BootInfo, BootInfoError> {
        match protocol {
            BootProtocol::Pvh => BootInfo::parse(memory, pa),
            BootProtocol::Linux64 => BootInfo::parse_boot_params(memory, pa),
        }
    }

    /// Parses the PVH `hvm_start_info` at `pa`.
    pub fn parse(memory: &impl PhysRead, pa: u64) -> Result<BootInfo, BootInfoError> {
        // The version-1 structure is 56 bytes.
        at(pa, 56)?;
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
        let kept = entries.min(MAX_REGIONS);
        // Every entry read is 24 bytes; the first module 16.
        at(memmap, kept as u64 * 24)?;
        let mut info = BootInfo {
            rsdp,
            cmdline,
            regions: [Region::default(); MAX_REGIONS],
            region_count: 0,
            regions_dropped: entries - kept,
            first_module: None,
        };
        for i in 0..kept {
            let entry = memmap + i as u64 * 24;
            info.regions[i] = Region {
                start: memory.read_u64(entry),
                len: memory.read_u64(entry + 8),
                kind: memory.read_u32(entry + 16),
            };
            info.region_count += 1;
        }
        if nr_modules > 0 && modlist != 0 {
            at(modlist, 16)?;
            info.first_module = Some((memory.read_u64(modlist), memory.read_u64(modlist + 8)));
        }
        Ok(info)
    }

    /// Parses the Linux `struct boot_params` (the zero page of the 64-bit
    /// boot protocol) at `pa` into the same [`BootInfo`] as
    /// [`BootInfo::parse`]: the E820 table with its types, the command line
    /// (`cmd_line_ptr` with `ext_cmd_line_ptr` as its high half), the ACPI
    /// RSDP (`acpi_rsdp_addr`) and, as the first module, the ramdisk if
    /// its address and size are both non-zero (as Linux decides).
    ///
    /// Refused: a `hdr.boot_flag` other than 0xAA55, a `hdr.header` other
    /// than "HdrS", more than 128 `e820_entries` (the table's room: more
    /// would read the fields after it) and a page that wraps the address
    /// space. Of at most 128 entries the first [`MAX_REGIONS`] are kept, in
    /// order, and the rest counted in [`BootInfo::regions_dropped`].
    /// Every read is inside the 4 KiB at `pa`.
    pub fn parse_boot_params(memory: &impl PhysRead, pa: u64) -> Result<BootInfo, BootInfoError> {
        use zero_page::*;
        at(pa, SIZE)?;
        // PhysRead reads u32 and u64 only: the narrower fields are read
        // within an aligned u32 that stays inside the page.
        let boot_flag = (memory.read_u32(pa + BOOT_FLAG - 2) >> 16) as u16;
        if boot_flag != BOOT_FLAG_VALUE {
            return Err(BootInfoError::BadBootFlag(boot_flag));
        }
        let header = memory.read_u32(pa + HEADER);
        if header != HEADER_MAGIC {
            return Err(BootInfoError::BadHeaderMagic(header));
        }
        let entries = memory.read_u32(pa + E820_ENTRIES) as u8;
        if entries > E820_MAX_ENTRIES {
            return Err(BootInfoError::TooManyE820Entries(entries));
        }
        let high_low = |high: u64, low: u64| {
            (u64::from(memory.read_u32(pa + high)) << 32) | u64::from(memory.read_u32(pa + low))
        };
        let cmdline = high_low(EXT_CMD_LINE_PTR, CMD_LINE_PTR);
        let ramdisk = high_low(EXT_RAMDISK_IMAGE, RAMDISK_IMAGE);
        let ramdisk_size = high_low(EXT_RAMDISK_SIZE, RAMDISK_SIZE);
        let kept = usize::from(entries).min(MAX_REGIONS);
        let mut info = BootInfo {
            rsdp: memory.read_u64(pa + ACPI_RSDP_ADDR),
            cmdline,
            regions: [Region::default(); MAX_REGIONS],
            region_count: 0,
            regions_dropped: usize::from(entries) - kept,
            first_module: (ramdisk != 0 && ramdisk_size != 0).then_some((ramdisk, ramdisk_size)),
        };
        for (i, region) in info.regions[..kept].iter_mut().enumerate() {
            let entry = pa + E820_TABLE + i as u64 * E820_ENTRY_SIZE;
            *region = Region {
                start: memory.read_u64(entry),
                len: memory.read_u64(entry + 8),
                kind: memory.read_u32(entry + 16),
            };
        }
        info.region_count = kept;
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

    #[test]
    fn pvh_keeps_the_first_max_regions_and_counts_the_rest() {
        let entries = MAX_REGIONS + 3;
        let mut b = vec![0u8; 0x100 + entries * 24];
        put(&mut b, 0, &HVM_START_MAGIC.to_le_bytes());
        put(&mut b, 4, &1u32.to_le_bytes());
        put(&mut b, 40, &0x100u64.to_le_bytes());
        put(&mut b, 48, &(entries as u32).to_le_bytes());
        for i in 0..entries {
            put(&mut b, 0x100 + i * 24, &((i as u64) << 20).to_le_bytes());
        }
        let info = BootInfo::parse(&Buffer(b), 0).unwrap();
        assert_eq!(info.region_count, MAX_REGIONS);
        assert_eq!(info.regions_dropped, 3);
        assert_eq!(
            info.regions[MAX_REGIONS - 1].start,
            (MAX_REGIONS as u64 - 1) << 20
        );
    }

    /// Where the synthetic zero page sits in the test buffer (not 0, so
    /// every offset is seen to be relative to it).
    const ZP: usize = 0x1000;

    /// A valid zero page at [`ZP`] with `e820` as its memory map.
    fn zero_page(e820: &[(u64, u64, u32)]) -> Vec<u8> {
        use zero_page::*;
        let mut b = vec![0u8; 0x3000];
        let z = |offset: u64| ZP + offset as usize;
        put(&mut b, z(BOOT_FLAG), &BOOT_FLAG_VALUE.to_le_bytes());
        put(&mut b, z(HEADER), &HEADER_MAGIC.to_le_bytes());
        put(&mut b, z(0x206), &0x020fu16.to_le_bytes());
        b[z(0x210)] = 0xff;
        put(&mut b, z(ACPI_RSDP_ADDR), &0xe_0000u64.to_le_bytes());
        put(&mut b, z(CMD_LINE_PTR), &0x2800u32.to_le_bytes());
        b[z(E820_ENTRIES)] = e820.len() as u8;
        for (i, (start, len, kind)) in e820.iter().enumerate() {
            let at = z(E820_TABLE) + i * E820_ENTRY_SIZE as usize;
            put(&mut b, at, &start.to_le_bytes());
            put(&mut b, at + 8, &len.to_le_bytes());
            put(&mut b, at + 16, &kind.to_le_bytes());
        }
        b
    }

    const MAP: [(u64, u64, u32); 4] = [
        (0, 0x9_f000, 1),
        (0xe_0000, 0x2_0000, 2),
        (0x10_0000, 0xff0_0000, 1),
        (0xfee0_0000, 0x1000, 4),
    ];

    #[test]
    fn parses_a_zero_page() {
        let info = BootInfo::parse_boot_params(&Buffer(zero_page(&MAP)), ZP as u64).unwrap();
        assert_eq!(info.rsdp, 0xe_0000);
        assert_eq!(info.cmdline, 0x2800);
        assert_eq!(info.region_count, 4);
        assert_eq!(info.regions_dropped, 0);
        let regions: Vec<_> = info.regions[..info.region_count]
            .iter()
            .map(|r| (r.start, r.len, r.kind))
            .collect();
        assert_eq!(regions, MAP);
        let ram: Vec<_> = info.ram().map(|r| (r.start, r.end())).collect();
        assert_eq!(ram, vec![(0, 0x9_f000), (0x10_0000, 0x1000_0000)]);
        assert_eq!(info.first_module, None);
        // The same through the protocol number the boot code passes.
        let protocol = BootProtocol::from_raw(BootProtocol::Linux64.raw()).unwrap();
        let same = BootInfo::parse_for(protocol, &Buffer(zero_page(&MAP)), ZP as u64).unwrap();
        assert_eq!(same.regions, info.regions);
    }

    #[test]
    fn zero_page_pointers_take_their_high_halves() {
        use zero_page::*;
        let mut b = zero_page(&MAP);
        let z = |offset: u64| ZP + offset as usize;
        put(&mut b, z(EXT_CMD_LINE_PTR), &0x1u32.to_le_bytes());
        put(&mut b, z(CMD_LINE_PTR), &0x8000_1000u32.to_le_bytes());
        put(&mut b, z(RAMDISK_IMAGE), &0x20_0000u32.to_le_bytes());
        put(&mut b, z(EXT_RAMDISK_IMAGE), &0x2u32.to_le_bytes());
        put(&mut b, z(RAMDISK_SIZE), &0x1234u32.to_le_bytes());
        put(&mut b, z(EXT_RAMDISK_SIZE), &0x1u32.to_le_bytes());
        let info = BootInfo::parse_boot_params(&Buffer(b.clone()), ZP as u64).unwrap();
        assert_eq!(info.cmdline, 0x1_8000_1000);
        assert_eq!(info.first_module, Some((0x2_0020_0000, 0x1_0000_1234)));
        // A ramdisk without an address (or a size) is no ramdisk.
        put(&mut b, z(RAMDISK_IMAGE), &0u32.to_le_bytes());
        put(&mut b, z(EXT_RAMDISK_IMAGE), &0u32.to_le_bytes());
        let info = BootInfo::parse_boot_params(&Buffer(b), ZP as u64).unwrap();
        assert_eq!(info.first_module, None);
    }

    #[test]
    fn zero_page_bad_magic_is_refused() {
        use zero_page::*;
        let z = |offset: u64| ZP + offset as usize;
        let mut b = zero_page(&MAP);
        put(&mut b, z(BOOT_FLAG), &0x55aau16.to_le_bytes());
        assert_eq!(
            BootInfo::parse_boot_params(&Buffer(b), ZP as u64).unwrap_err(),
            BootInfoError::BadBootFlag(0x55aa)
        );
        let mut b = zero_page(&MAP);
        put(&mut b, z(HEADER), b"SrdH");
        assert_eq!(
            BootInfo::parse_boot_params(&Buffer(b), ZP as u64).unwrap_err(),
            BootInfoError::BadHeaderMagic(u32::from_le_bytes(*b"SrdH"))
        );
        // An hvm_start_info is no zero page, and the other way round.
        let mut pvh = zero_page(&MAP);
        put(&mut pvh, ZP, &HVM_START_MAGIC.to_le_bytes());
        put(&mut pvh, z(BOOT_FLAG), &0u16.to_le_bytes());
        assert_eq!(
            BootInfo::parse_boot_params(&Buffer(pvh), ZP as u64).unwrap_err(),
            BootInfoError::BadBootFlag(0)
        );
        assert_eq!(
            BootInfo::parse(&Buffer(zero_page(&MAP)), ZP as u64).unwrap_err(),
            BootInfoError::BadMagic(0)
        );
    }

    #[test]
    fn zero_page_entries_are_bounded() {
        use zero_page::*;
        let all: Vec<_> = (0..u64::from(E820_MAX_ENTRIES))
            .map(|i| (i << 21, 1 << 21, 1 + (i % 2) as u32))
            .collect();
        let info = BootInfo::parse_boot_params(&Buffer(zero_page(&all)), ZP as u64).unwrap();
        assert_eq!(info.region_count, MAX_REGIONS);
        assert_eq!(
            info.regions_dropped,
            usize::from(E820_MAX_ENTRIES) - MAX_REGIONS
        );
        let last = info.regions[MAX_REGIONS - 1];
        assert_eq!((last.start, last.kind), ((MAX_REGIONS as u64 - 1) << 21, 2));

        let mut b = zero_page(&MAP);
        b[ZP + E820_ENTRIES as usize] = E820_MAX_ENTRIES + 1;
        assert_eq!(
            BootInfo::parse_boot_params(&Buffer(b), ZP as u64).unwrap_err(),
            BootInfoError::TooManyE820Entries(E820_MAX_ENTRIES + 1)
        );
    }

    #[test]
    fn wrapping_addresses_and_unknown_protocols_are_refused() {
        // The buffer is never read: the parsers refuse before any access.
        let empty = Buffer(Vec::new());
        let top = u64::MAX - 0xfff;
        assert_eq!(
            BootInfo::parse_boot_params(&empty, top).unwrap_err(),
            BootInfoError::AddressOverflow(top)
        );
        assert_eq!(
            BootInfo::parse(&empty, u64::MAX - 8).unwrap_err(),
            BootInfoError::AddressOverflow(u64::MAX - 8)
        );
        assert_eq!(
            BootProtocol::from_raw(2).unwrap_err(),
            BootInfoError::UnknownProtocol(2)
        );
        assert_eq!(BootProtocol::from_raw(0), Ok(BootProtocol::Pvh));
    }
}
