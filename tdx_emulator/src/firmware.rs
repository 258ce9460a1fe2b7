//! What TD firmware hands the guest, built by the emulator in guest memory:
//! the PVH `hvm_start_info` with a memory map, and ACPI tables.
//!
//! The ACPI tables are what Linux needs to run as a TD with no legacy
//! hardware (reference/linux-tdx-guest.md section 5; ACPI 6.5 chapter 5):
//! RSDP (revision 2) -> XSDT -> { MADT, FADT -> DSDT }.
//! - MADT (5.2.12): no PCAT_COMPAT flag (so Linux does not probe an 8259),
//!   one enabled Processor Local x2APIC entry (type 9) per vCPU, and the
//!   Multiprocessor Wakeup entry (type 0x10, mailbox version 0) through
//!   which the guest starts its APs, as on TDX (Linux
//!   `arch/x86/kernel/acpi/madt_wakeup.c`).
//! - FADT (5.2.9, revision 6, minor 5): HW_REDUCED_ACPI, so Linux touches no
//!   PIT, HPET or PIC (`acpi_generic_reduced_hw_init`); the hardware-reduced
//!   sleep control/status registers (4.8.3.7) and the reset register as
//!   8-bit System I/O ports, so `poweroff` and `reboot` reach the VMM.
//! - DSDT (5.2.11.1, revision 2) holding only `Name (_S5, Package () {5, 5})`
//!   so that Linux finds S5 and registers `acpi_power_off`.
//!
//! Power-off as Linux does it on hardware-reduced ACPI
//! (`drivers/acpi/acpica/hwesleep.c`, `acpi_hw_extended_sleep`): it writes
//! `ACPI_X_WAKE_STATUS` (0x80) to the sleep status register, then
//! `((SLP_TYP << 2) & 0x1C) | SLP_EN` to the sleep control register, with
//! SLP_TYP from `_S5`: 0x34 at [`SLEEP_CONTROL_PORT`] ([`is_s5_request`]).
//! Reboot (`drivers/acpi/reboot.c`, `acpi_reboot`, FADT flag RESET_REG_SUP):
//! [`RESET_VALUE`] written to [`RESET_PORT`].

/// Where each structure goes in the firmware buffer (offsets from its GPA).
/// The MADT is last because it grows with the number of vCPUs; past about
/// 220 vCPUs the tables need a second page ([`acpi_size`]).
pub const RSDP_OFFSET: usize = 0;
pub const XSDT_OFFSET: usize = 64;
pub const FADT_OFFSET: usize = 128;
pub const DSDT_OFFSET: usize = 416;
pub const MADT_OFFSET: usize = 512;

/// The hardware-reduced sleep control register (FADT SLEEP_CONTROL_REG).
/// FADT IAPC_BOOT_ARCH: offset and flags (ACPI 6.5 table 5.11).
const IAPC_BOOT_ARCH_OFFSET: usize = 109;
const IAPC_BOOT_ARCH_NO_VGA: u16 = 1 << 2;
const IAPC_BOOT_ARCH_NO_CMOS_RTC: u16 = 1 << 5;
pub const SLEEP_CONTROL_PORT: u16 = 0x604;
/// The hardware-reduced sleep status register (FADT SLEEP_STATUS_REG).
pub const SLEEP_STATUS_PORT: u16 = 0x605;
/// The reset register (FADT RESET_REG).
pub const RESET_PORT: u16 = 0x606;
/// What the guest writes to [`RESET_PORT`] to reset (FADT RESET_VALUE).
pub const RESET_VALUE: u8 = 0x01;
/// Sleep control register: SLP_EN, bit 5 (ACPI 6.5 4.8.3.7; ACPICA
/// `ACPI_X_SLEEP_ENABLE`).
pub const SLP_EN: u8 = 1 << 5;
/// The SLP_TYP value the DSDT's `_S5` gives (both package elements).
pub const S5_SLP_TYP: u8 = 5;
/// Sleep control register: SLP_TYP, bits 4:2 (ACPICA
/// `ACPI_X_SLEEP_TYPE_MASK`, `ACPI_X_SLEEP_TYPE_POSITION`).
pub const SLP_TYP_MASK: u8 = 0x1c;
pub const SLP_TYP_SHIFT: u8 = 2;

/// Whether a byte written to [`SLEEP_CONTROL_PORT`] asks for S5 (soft off):
/// SLP_EN set and SLP_TYP = [`S5_SLP_TYP`].
pub fn is_s5_request(value: u8) -> bool {
    value & SLP_EN != 0 && (value & SLP_TYP_MASK) >> SLP_TYP_SHIFT == S5_SLP_TYP
}

/// FADT Flags (ACPI 6.5 Table 5.10): RESET_REG_SUP.
pub const FADT_RESET_REG_SUP: u32 = 1 << 10;
/// FADT Flags: HW_REDUCED_ACPI.
pub const FADT_HW_REDUCED_ACPI: u32 = 1 << 20;

/// The DSDT's AML body (ACPI 6.5 chapter 20), `Name (_S5, Package () {5, 5})`:
/// - DefName := NameOp NameString DataRefObject; NameOp = 0x08 (20.2.5.1);
/// - NameString = the NameSeg "_S5_" (20.2.2: four chars, padded with '_');
/// - DefPackage := PackageOp PkgLength NumElements PackageElementList;
///   PackageOp = 0x12 (20.2.5.4);
/// - PkgLength = 0x06: one byte (bits 7:6 = 0) encoding lengths up to 63
///   (20.2.4), a length that counts itself (5.4, "PkgLength is the ...
///   inclusive length of the data"): PkgLength 1 + NumElements 1 + two
///   ByteConsts of 2 = 6;
/// - NumElements = 2 (ByteData);
/// - ByteConst := BytePrefix ByteData, BytePrefix = 0x0A (20.2.3), twice.
pub const S5_AML: [u8; 12] = [
    0x08, b'_', b'S', b'5', b'_', 0x12, 0x06, 0x02, 0x0a, S5_SLP_TYP, 0x0a, S5_SLP_TYP,
];

const SDT_HEADER: usize = 36;
const XSDT_LENGTH: usize = SDT_HEADER + 2 * 8;
/// The ACPI 6.0+ FADT, through HYPERVISOR_VENDOR_IDENTITY.
const FADT_LENGTH: usize = 276;
const DSDT_LENGTH: usize = SDT_HEADER + S5_AML.len();
const MADT_HEADER: usize = 44;
const X2APIC_ENTRY: usize = 16;
const WAKEUP_ENTRY: usize = 16;

/// FADT field offsets (ACPI 6.5 Table 5.9).
mod fadt {
    pub const DSDT: usize = 40;
    pub const FLAGS: usize = 112;
    pub const RESET_REG: usize = 116;
    pub const RESET_VALUE: usize = 128;
    pub const MINOR_VERSION: usize = 131;
    pub const X_DSDT: usize = 140;
    pub const SLEEP_CONTROL_REG: usize = 244;
    pub const SLEEP_STATUS_REG: usize = 256;
}

/// Why the tables do not fit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TooSmall;

/// Where [`build_acpi`] put each table (GPAs) and how many bytes from the
/// start of the buffer it used (the range to describe as E820 ACPI).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcpiTables {
    pub rsdp: u64,
    pub xsdt: u64,
    pub fadt: u64,
    pub dsdt: u64,
    pub madt: u64,
    pub length: usize,
}

fn put(buffer: &mut [u8], at: usize, bytes: &[u8]) -> Result<(), TooSmall> {
    let end = at.checked_add(bytes.len()).ok_or(TooSmall)?;
    buffer
        .get_mut(at..end)
        .ok_or(TooSmall)?
        .copy_from_slice(bytes);
    Ok(())
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)))
}

/// The common table header (ACPI 6.5 5.2.6), checksum left 0.
fn sdt_header(
    buffer: &mut [u8],
    at: usize,
    signature: &[u8; 4],
    length: usize,
    revision: u8,
) -> Result<(), TooSmall> {
    let length = u32::try_from(length).map_err(|_| TooSmall)?;
    put(buffer, at, signature)?;
    put(buffer, at + 4, &length.to_le_bytes())?;
    put(buffer, at + 8, &[revision])?;
    put(buffer, at + 10, b"COCOEM")?;
    put(buffer, at + 16, b"TDXEMU  ")?;
    put(buffer, at + 24, &1u32.to_le_bytes())?; // OEM revision
    put(buffer, at + 28, b"COCO")?; // creator ID
    put(buffer, at + 32, &1u32.to_le_bytes()) // creator revision
}

fn seal(buffer: &mut [u8], at: usize, length: usize, checksum_at: usize) -> Result<(), TooSmall> {
    let end = at.checked_add(length).ok_or(TooSmall)?;
    let sum = checksum(buffer.get(at..end).ok_or(TooSmall)?);
    put(buffer, checksum_at, &[sum])
}

/// A Generic Address Structure (ACPI 6.5 5.2.3.2) for one byte of System
/// I/O space: Address Space ID 1, Register Bit Width 8, Bit Offset 0,
/// Access Size 1 (byte), Address = `port`.
fn gas_io8(port: u16) -> [u8; 12] {
    let mut gas = [0u8; 12];
    gas[..4].copy_from_slice(&[1, 8, 0, 1]);
    gas[4..].copy_from_slice(&u64::from(port).to_le_bytes());
    gas
}

fn madt_length(vcpus: usize) -> Option<usize> {
    X2APIC_ENTRY
        .checked_mul(vcpus)?
        .checked_add(MADT_HEADER + WAKEUP_ENTRY)
}

/// Bytes [`build_acpi`] needs for `vcpus` vCPUs (`usize::MAX` if that
/// cannot even be counted).
pub fn acpi_size(vcpus: usize) -> usize {
    madt_length(vcpus)
        .and_then(|madt| madt.checked_add(MADT_OFFSET))
        .unwrap_or(usize::MAX)
}

/// Builds RSDP, XSDT, FADT, DSDT and MADT into `buffer` (all of it the
/// guest sees at `base_gpa`; [`acpi_size`] bytes are needed, else
/// [`TooSmall`] and nothing is written). The used bytes are zeroed first, so
/// every field not named here is 0. `x2apic_ids[i]` gets ACPI processor UID
/// `i`; `mailbox_gpa` is the 4 KiB multiprocessor wakeup mailbox.
pub fn build_acpi(
    buffer: &mut [u8],
    base_gpa: u64,
    x2apic_ids: &[u32],
    mailbox_gpa: u64,
) -> Result<AcpiTables, TooSmall> {
    let madt_length = madt_length(x2apic_ids.len()).ok_or(TooSmall)?;
    let total = acpi_size(x2apic_ids.len());
    buffer.get_mut(..total).ok_or(TooSmall)?.fill(0);
    let gpa = |offset: usize| base_gpa.wrapping_add(offset as u64);

    // MADT (ACPI 6.5 5.2.12): header, local APIC address, flags 0 (no
    // PCAT_COMPAT), then the entries. Revision 1 as before; Linux reads the
    // entries whatever the revision.
    sdt_header(buffer, MADT_OFFSET, b"APIC", madt_length, 1)?;
    put(buffer, MADT_OFFSET + 36, &0xfee0_0000u32.to_le_bytes())?;
    put(buffer, MADT_OFFSET + 40, &0u32.to_le_bytes())?;
    let mut at = MADT_OFFSET + MADT_HEADER;
    for (uid, id) in x2apic_ids.iter().enumerate() {
        // Type 9, Processor Local x2APIC (5.2.12.12): reserved u16, x2APIC
        // ID, flags (bit 0 Enabled), ACPI processor UID.
        put(buffer, at, &[9, X2APIC_ENTRY as u8, 0, 0])?;
        put(buffer, at + 4, &id.to_le_bytes())?;
        put(buffer, at + 8, &1u32.to_le_bytes())?;
        put(buffer, at + 12, &(uid as u32).to_le_bytes())?;
        at += X2APIC_ENTRY;
    }
    // Type 0x10, Multiprocessor Wakeup (5.2.12.19): mailbox version 0,
    // reserved u32, mailbox address.
    put(buffer, at, &[0x10, WAKEUP_ENTRY as u8, 0, 0, 0, 0, 0, 0])?;
    put(buffer, at + 8, &mailbox_gpa.to_le_bytes())?;
    seal(buffer, MADT_OFFSET, madt_length, MADT_OFFSET + 9)?;

    // DSDT (5.2.11.1): revision 2 (integers are 64-bit), the _S5 object.
    sdt_header(buffer, DSDT_OFFSET, b"DSDT", DSDT_LENGTH, 2)?;
    put(buffer, DSDT_OFFSET + SDT_HEADER, &S5_AML)?;
    seal(buffer, DSDT_OFFSET, DSDT_LENGTH, DSDT_OFFSET + 9)?;

    // FADT (5.2.9), revision 6 minor 5 (ACPI 6.5). The 32-bit DSDT field
    // stays 0: "If the X_DSDT field contains a non-zero value then this
    // field must be zero". FIRMWARE_CTRL and X_FIRMWARE_CTRL stay 0: a
    // hardware-reduced platform need not have a FACS.
    sdt_header(buffer, FADT_OFFSET, b"FACP", FADT_LENGTH, 6)?;
    put(buffer, FADT_OFFSET + fadt::DSDT, &0u32.to_le_bytes())?;
    put(
        buffer,
        FADT_OFFSET + fadt::FLAGS,
        &(FADT_HW_REDUCED_ACPI | FADT_RESET_REG_SUP).to_le_bytes(),
    )?;
    // IAPC_BOOT_ARCH (5.2.9.3): no VGA, no CMOS RTC (the TD has neither;
    // Linux then skips its RTC reads, arch/x86/kernel/rtc.c), and the 8042
    // bit clear: no keyboard controller.
    put(
        buffer,
        FADT_OFFSET + IAPC_BOOT_ARCH_OFFSET,
        &(IAPC_BOOT_ARCH_NO_VGA | IAPC_BOOT_ARCH_NO_CMOS_RTC).to_le_bytes(),
    )?;
    put(buffer, FADT_OFFSET + fadt::RESET_REG, &gas_io8(RESET_PORT))?;
    put(buffer, FADT_OFFSET + fadt::RESET_VALUE, &[RESET_VALUE])?;
    put(buffer, FADT_OFFSET + fadt::MINOR_VERSION, &[5])?;
    put(
        buffer,
        FADT_OFFSET + fadt::X_DSDT,
        &gpa(DSDT_OFFSET).to_le_bytes(),
    )?;
    put(
        buffer,
        FADT_OFFSET + fadt::SLEEP_CONTROL_REG,
        &gas_io8(SLEEP_CONTROL_PORT),
    )?;
    put(
        buffer,
        FADT_OFFSET + fadt::SLEEP_STATUS_REG,
        &gas_io8(SLEEP_STATUS_PORT),
    )?;
    seal(buffer, FADT_OFFSET, FADT_LENGTH, FADT_OFFSET + 9)?;

    // XSDT (5.2.8): the MADT and the FADT.
    sdt_header(buffer, XSDT_OFFSET, b"XSDT", XSDT_LENGTH, 1)?;
    put(
        buffer,
        XSDT_OFFSET + SDT_HEADER,
        &gpa(MADT_OFFSET).to_le_bytes(),
    )?;
    put(
        buffer,
        XSDT_OFFSET + SDT_HEADER + 8,
        &gpa(FADT_OFFSET).to_le_bytes(),
    )?;
    seal(buffer, XSDT_OFFSET, XSDT_LENGTH, XSDT_OFFSET + 9)?;

    // RSDP revision 2 (5.2.5.3): v1 checksum over 20 bytes, extended over
    // 36; RsdtAddress 0, XsdtAddress.
    put(buffer, RSDP_OFFSET, b"RSD PTR ")?;
    put(buffer, RSDP_OFFSET + 9, b"COCOEM")?;
    put(buffer, RSDP_OFFSET + 15, &[2])?;
    put(buffer, RSDP_OFFSET + 20, &36u32.to_le_bytes())?;
    put(buffer, RSDP_OFFSET + 24, &gpa(XSDT_OFFSET).to_le_bytes())?;
    seal(buffer, RSDP_OFFSET, 20, RSDP_OFFSET + 8)?;
    seal(buffer, RSDP_OFFSET, 36, RSDP_OFFSET + 32)?;

    Ok(AcpiTables {
        rsdp: gpa(RSDP_OFFSET),
        xsdt: gpa(XSDT_OFFSET),
        fadt: gpa(FADT_OFFSET),
        dsdt: gpa(DSDT_OFFSET),
        madt: gpa(MADT_OFFSET),
        length: total,
    })
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

    const BASE: u64 = 0xe_0000;

    fn le16(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
    }
    fn le32(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }
    fn le64(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    /// The table at `gpa`: signature checked, its bytes (length from the
    /// header), checksum 0.
    fn table<'a>(page: &'a [u8], gpa: u64, signature: &[u8; 4]) -> &'a [u8] {
        let at = (gpa - BASE) as usize;
        assert_eq!(&page[at..at + 4], signature);
        let length = le32(page, at + 4) as usize;
        let bytes = &page[at..at + length];
        assert_eq!(
            bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b)),
            0,
            "{signature:?} checksum"
        );
        bytes
    }

    fn build(vcpus: u32, pages: usize) -> (Vec<u8>, AcpiTables) {
        let mut page = vec![0xa5u8; 4096 * pages];
        let ids: Vec<u32> = (0..vcpus).collect();
        let tables = build_acpi(&mut page, BASE, &ids, 0x7000).unwrap();
        (page, tables)
    }

    #[test]
    fn the_guests_acpi_parser_finds_every_vcpu_and_the_mailbox() {
        let (page, tables) = build(4, 1);
        let madt = bare::acpi::parse_madt(
            &At {
                base: BASE,
                bytes: &page,
            },
            tables.rsdp,
        )
        .unwrap();
        let ids: Vec<u32> = madt.enabled_apic_ids().collect();
        assert_eq!(ids, vec![0, 1, 2, 3]);
        assert_eq!(madt.wakeup_mailbox.map(|m| m.address), Some(0x7000));
        assert!(!madt.pcat_compatible);
    }

    #[test]
    fn rsdp_and_xsdt() {
        let (page, tables) = build(2, 1);
        assert_eq!(tables.rsdp, BASE);
        let rsdp = &page[..36];
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(rsdp[15], 2);
        assert_eq!(rsdp[..20].iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
        assert_eq!(rsdp.iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
        assert_eq!(le32(rsdp, 16), 0);
        assert_eq!(le32(rsdp, 20), 36);
        assert_eq!(le64(rsdp, 24), tables.xsdt);

        let xsdt = table(&page, tables.xsdt, b"XSDT");
        assert_eq!(xsdt.len(), 36 + 16);
        assert_eq!(le64(xsdt, 36), tables.madt);
        assert_eq!(le64(xsdt, 44), tables.fadt);
        // The guest's own parser walks the XSDT to both.
        let memory = At {
            base: BASE,
            bytes: &page,
        };
        assert_eq!(
            bare::acpi::find_table(&memory, tables.rsdp, *b"FACP"),
            Ok(tables.fadt)
        );
        assert_eq!(
            bare::acpi::find_table(&memory, tables.rsdp, *b"APIC"),
            Ok(tables.madt)
        );
    }

    #[test]
    fn madt_entries() {
        let (page, tables) = build(3, 1);
        let madt = table(&page, tables.madt, b"APIC");
        assert_eq!(madt.len(), 44 + 3 * 16 + 16);
        assert_eq!(le32(madt, 36), 0xfee0_0000);
        assert_eq!(le32(madt, 40), 0, "no PCAT_COMPAT");
        for i in 0..3 {
            let e = &madt[44 + 16 * i..60 + 16 * i];
            assert_eq!(&e[..4], &[9, 16, 0, 0]);
            assert_eq!(le32(e, 4), i as u32);
            assert_eq!(le32(e, 8), 1, "enabled");
            assert_eq!(le32(e, 12), i as u32);
        }
        let wakeup = &madt[44 + 48..];
        assert_eq!(&wakeup[..2], &[0x10, 16]);
        assert_eq!(le16(wakeup, 2), 0, "mailbox version 0");
        assert_eq!(le64(wakeup, 8), 0x7000);
        assert_eq!(tables.length, MADT_OFFSET + madt.len());
    }

    #[test]
    fn fadt_fields() {
        let (page, tables) = build(1, 1);
        let fadt = table(&page, tables.fadt, b"FACP");
        assert_eq!(fadt.len(), 276);
        assert_eq!(fadt[8], 6, "revision");
        assert_eq!(fadt[131], 5, "minor version");
        assert_eq!(le32(fadt, 36), 0, "FIRMWARE_CTRL");
        assert_eq!(le32(fadt, 40), 0, "32-bit DSDT");
        assert_eq!(le64(fadt, 132), 0, "X_FIRMWARE_CTRL");
        assert_eq!(le64(fadt, 140), tables.dsdt, "X_DSDT");
        let flags = le32(fadt, 112);
        assert_eq!(flags, (1 << 20) | (1 << 10));
        // IAPC_BOOT_ARCH: no VGA, no CMOS RTC, no 8042.
        assert_eq!(
            u16::from_le_bytes([fadt[109], fadt[110]]),
            (1 << 2) | (1 << 5)
        );
        // Every legacy PM block absent.
        assert!(fadt[44..109].iter().all(|&b| b == 0));
        assert_eq!(fadt[111], 0);
        assert!(fadt[148..244].iter().all(|&b| b == 0));
        let gas = |at: usize| {
            (
                fadt[at],
                fadt[at + 1],
                fadt[at + 2],
                fadt[at + 3],
                le64(fadt, at + 4),
            )
        };
        assert_eq!(gas(116), (1, 8, 0, 1, 0x606), "RESET_REG");
        assert_eq!(fadt[128], 0x01, "RESET_VALUE");
        assert_eq!(gas(244), (1, 8, 0, 1, 0x604), "SLEEP_CONTROL_REG");
        assert_eq!(gas(256), (1, 8, 0, 1, 0x605), "SLEEP_STATUS_REG");
        assert_eq!(le64(fadt, 268), 0, "hypervisor vendor");
    }

    /// Decodes a PkgLength (ACPI 6.5 20.2.4): the byte count in bits 7:6 of
    /// the lead byte; one byte: length in bits 5:0; more: bits 3:0 then
    /// 8 bits a byte. Returns (length, bytes used).
    fn pkg_length(aml: &[u8]) -> (usize, usize) {
        let follow = usize::from(aml[0] >> 6);
        if follow == 0 {
            return (usize::from(aml[0] & 0x3f), 1);
        }
        let mut length = usize::from(aml[0] & 0x0f);
        for i in 0..follow {
            length |= usize::from(aml[1 + i]) << (4 + 8 * i);
        }
        (length, 1 + follow)
    }

    #[test]
    fn dsdt_holds_s5_and_linux_would_power_off() {
        let (page, tables) = build(1, 1);
        let dsdt = table(&page, tables.dsdt, b"DSDT");
        assert_eq!(dsdt[8], 2, "revision");
        let aml = &dsdt[36..];
        assert_eq!(aml.len(), 12);
        // DefName: NameOp, NameSeg "_S5_".
        assert_eq!(aml[0], 0x08);
        assert_eq!(&aml[1..5], b"_S5_");
        // DefPackage: PackageOp, PkgLength (counting itself) reaching
        // exactly the end of the table, NumElements 2.
        assert_eq!(aml[5], 0x12);
        let (length, used) = pkg_length(&aml[6..]);
        assert_eq!(6 + length, aml.len());
        let body = &aml[6 + used..];
        assert_eq!(body[0], 2);
        // Two ByteConsts (BytePrefix 0x0A).
        assert_eq!(&body[1..], &[0x0a, 5, 0x0a, 5]);
        // What acpi_hw_extended_sleep writes for S5.
        let written = ((body[2] << SLP_TYP_SHIFT) & SLP_TYP_MASK) | SLP_EN;
        assert_eq!(written, 0x34);
        assert!(is_s5_request(written));
        assert!(!is_s5_request(written & !SLP_EN));
        assert!(!is_s5_request(SLP_EN | (3 << 2)));
    }

    #[test]
    fn many_vcpus_take_two_pages() {
        assert_eq!(acpi_size(4), 512 + 44 + 64 + 16);
        let ids: Vec<u32> = (0..256).collect();
        let mut one = vec![0u8; 4096];
        assert_eq!(build_acpi(&mut one, BASE, &ids, 0x7000), Err(TooSmall));
        assert!(one.iter().all(|&b| b == 0), "nothing written");
        let (page, tables) = build(256, 2);
        assert!(tables.length > 4096 && tables.length <= 8192);
        let madt = bare::acpi::parse_madt(
            &At {
                base: BASE,
                bytes: &page,
            },
            tables.rsdp,
        )
        .unwrap();
        assert_eq!(madt.enabled_apic_ids().count(), 256);
        table(&page, tables.madt, b"APIC");
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
        for len in [0, 100, 500, 600, acpi_size(2) - 1] {
            let mut tiny = vec![0u8; len];
            assert_eq!(build_acpi(&mut tiny, 0, &[0, 1], 0x7000), Err(TooSmall));
        }
        let mut exact = vec![0u8; acpi_size(2)];
        assert!(build_acpi(&mut exact, 0, &[0, 1], 0x7000).is_ok());
    }
}
