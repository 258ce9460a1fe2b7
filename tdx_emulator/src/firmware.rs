//! What TD firmware hands the guest, built by the emulator in guest memory:
//! the PVH `hvm_start_info` with a memory map, and ACPI tables (RSDP, XSDT,
//! MADT with one local x2APIC entry per vCPU and the multiprocessor-wakeup
//! mailbox through which the guest starts its APs, as on TDX).

/// Where each structure goes in the firmware page(s) (offsets from its GPA).
pub const RSDP_OFFSET: usize = 0;
pub const XSDT_OFFSET: usize = 64;
pub const MADT_OFFSET: usize = 128;

/// Why the tables do not fit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TooSmall;

fn put(buffer: &mut [u8], at: usize, bytes: &[u8]) -> Result<(), TooSmall> {
    buffer
        .get_mut(at..at + bytes.len())
        .ok_or(TooSmall)?
        .copy_from_slice(bytes);
    Ok(())
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)))
}

fn sdt_header(
    buffer: &mut [u8],
    at: usize,
    signature: &[u8; 4],
    length: u32,
) -> Result<(), TooSmall> {
    put(buffer, at, signature)?;
    put(buffer, at + 4, &length.to_le_bytes())?;
    put(buffer, at + 8, &[1])?; // revision
    put(buffer, at + 10, b"COCOEM")?;
    put(buffer, at + 16, b"TDXEMU  ")?;
    put(buffer, at + 24, &1u32.to_le_bytes())
}

fn seal(buffer: &mut [u8], at: usize, length: usize, checksum_at: usize) -> Result<(), TooSmall> {
    let sum = checksum(buffer.get(at..at + length).ok_or(TooSmall)?);
    put(buffer, checksum_at, &[sum])
}

/// Builds RSDP, XSDT and MADT into `buffer`, which the guest sees at
/// `base_gpa`. Returns the RSDP's GPA.
pub fn build_acpi(
    buffer: &mut [u8],
    base_gpa: u64,
    x2apic_ids: &[u32],
    mailbox_gpa: u64,
) -> Result<u64, TooSmall> {
    // MADT: header, local APIC address, flags, then the entries.
    let madt_length = 44 + 16 * x2apic_ids.len() + 16;
    sdt_header(buffer, MADT_OFFSET, b"APIC", madt_length as u32)?;
    put(buffer, MADT_OFFSET + 36, &0xfee0_0000u32.to_le_bytes())?;
    put(buffer, MADT_OFFSET + 40, &0u32.to_le_bytes())?;
    let mut at = MADT_OFFSET + 44;
    for (uid, id) in x2apic_ids.iter().enumerate() {
        // Type 9: processor local x2APIC, enabled.
        put(buffer, at, &[9, 16, 0, 0])?;
        put(buffer, at + 4, &id.to_le_bytes())?;
        put(buffer, at + 8, &1u32.to_le_bytes())?;
        put(buffer, at + 12, &(uid as u32).to_le_bytes())?;
        at += 16;
    }
    // Type 0x10: multiprocessor wakeup, mailbox version 0.
    put(buffer, at, &[0x10, 16, 0, 0, 0, 0, 0, 0])?;
    put(buffer, at + 8, &mailbox_gpa.to_le_bytes())?;
    seal(buffer, MADT_OFFSET, madt_length, MADT_OFFSET + 9)?;

    // XSDT with one entry.
    sdt_header(buffer, XSDT_OFFSET, b"XSDT", 44)?;
    put(
        buffer,
        XSDT_OFFSET + 36,
        &(base_gpa + MADT_OFFSET as u64).to_le_bytes(),
    )?;
    seal(buffer, XSDT_OFFSET, 44, XSDT_OFFSET + 9)?;

    // RSDP revision 2: v1 checksum over 20 bytes, extended over 36.
    put(buffer, RSDP_OFFSET, b"RSD PTR ")?;
    put(buffer, RSDP_OFFSET + 9, b"COCOEM")?;
    put(buffer, RSDP_OFFSET + 15, &[2])?;
    put(buffer, RSDP_OFFSET + 20, &36u32.to_le_bytes())?;
    put(
        buffer,
        RSDP_OFFSET + 24,
        &(base_gpa + XSDT_OFFSET as u64).to_le_bytes(),
    )?;
    seal(buffer, RSDP_OFFSET, 20, RSDP_OFFSET + 8)?;
    seal(buffer, RSDP_OFFSET, 36, RSDP_OFFSET + 32)?;
    Ok(base_gpa + RSDP_OFFSET as u64)
}

/// One memory-map entry of the start info.
#[derive(Clone, Copy, Debug)]
pub struct MemoryRange {
    pub start: u64,
    pub length: u64,
    /// E820 type (1 RAM, 2 reserved).
    pub kind: u32,
}

/// Builds `hvm_start_info` (version 1) followed by its memory map and the
/// command line into `buffer`, seen by the guest at `base_gpa`. Returns the
/// GPA to pass in EBX.
pub fn build_start_info(
    buffer: &mut [u8],
    base_gpa: u64,
    memory_map: &[MemoryRange],
    rsdp_gpa: u64,
    command_line: &[u8],
) -> Result<u64, TooSmall> {
    let memmap_at = 64;
    let cmdline_at = memmap_at + 24 * memory_map.len();
    put(buffer, 0, &bare::bootinfo::HVM_START_MAGIC.to_le_bytes())?;
    put(buffer, 4, &1u32.to_le_bytes())?;
    put(buffer, 24, &(base_gpa + cmdline_at as u64).to_le_bytes())?;
    put(buffer, 32, &rsdp_gpa.to_le_bytes())?;
    put(buffer, 40, &(base_gpa + memmap_at as u64).to_le_bytes())?;
    put(buffer, 48, &(memory_map.len() as u32).to_le_bytes())?;
    for (i, range) in memory_map.iter().enumerate() {
        let at = memmap_at + 24 * i;
        put(buffer, at, &range.start.to_le_bytes())?;
        put(buffer, at + 8, &range.length.to_le_bytes())?;
        put(buffer, at + 16, &range.kind.to_le_bytes())?;
    }
    put(buffer, cmdline_at, command_line)?;
    put(buffer, cmdline_at + command_line.len(), &[0])?;
    Ok(base_gpa)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bare::bootinfo::{BootInfo, PhysRead};

    /// Guest memory for the parsers: `bytes` at `base`.
    struct At<'a> {
        base: u64,
        bytes: &'a [u8],
    }

    impl PhysRead for At<'_> {
        fn read_u32(&self, pa: u64) -> u32 {
            let i = (pa - self.base) as usize;
            u32::from_le_bytes(self.bytes[i..i + 4].try_into().unwrap())
        }
        fn read_u64(&self, pa: u64) -> u64 {
            let i = (pa - self.base) as usize;
            u64::from_le_bytes(self.bytes[i..i + 8].try_into().unwrap())
        }
    }

    #[test]
    fn the_guests_acpi_parser_finds_every_vcpu_and_the_mailbox() {
        let mut page = vec![0u8; 4096];
        let rsdp = build_acpi(&mut page, 0xe_0000, &[0, 1, 2, 3], 0x7000).unwrap();
        let madt = bare::acpi::parse_madt(
            &At {
                base: 0xe_0000,
                bytes: &page,
            },
            rsdp,
        )
        .unwrap();
        let ids: Vec<u32> = madt.enabled_apic_ids().collect();
        assert_eq!(ids, vec![0, 1, 2, 3]);
        assert_eq!(madt.wakeup_mailbox.map(|m| m.address), Some(0x7000));
    }

    #[test]
    fn the_guests_boot_info_parser_reads_the_start_info() {
        let mut page = vec![0u8; 4096];
        let map = [
            MemoryRange {
                start: 0,
                length: 0xa_0000,
                kind: 1,
            },
            MemoryRange {
                start: 0x10_0000,
                length: 255 << 20,
                kind: 1,
            },
        ];
        let gpa = build_start_info(&mut page, 0x6000, &map, 0xe_0000, b"fault=none").unwrap();
        let info = BootInfo::parse(
            &At {
                base: 0x6000,
                bytes: &page,
            },
            gpa,
        )
        .unwrap();
        assert_eq!(info.rsdp, 0xe_0000);
        assert_eq!(info.ram().count(), 2);
        let line_at = (info.cmdline - 0x6000) as usize;
        assert_eq!(&page[line_at..line_at + 11], b"fault=none\0");
    }

    #[test]
    fn too_small_a_buffer_is_an_error_not_a_panic() {
        let mut tiny = vec![0u8; 100];
        assert_eq!(build_acpi(&mut tiny, 0, &[0, 1], 0x7000), Err(TooSmall));
    }
}
