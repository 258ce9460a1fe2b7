//! ACPI, as far as SMP needs it: RSDP -> RSDT or XSDT -> MADT.
//!
//! Every byte is read through [`PhysRead`], so this module has no unsafe
//! code, runs no privileged instruction and is unit-tested on the host with
//! hand-built tables. Every checksum is verified, every length is checked
//! against the table that holds it before anything inside is read, no read
//! leaves the table being parsed (once its header says how long it is), and
//! no structure may run past the top of the address space (its reads would
//! wrap to address 0). Bad firmware data gives an [`AcpiError`], never a
//! panic; `fuzz/` fuzzes all of it (target `acpi_madt`).
//!
//! What is kept from the MADT ([`Madt`]): the local APIC physical address
//! (with a type 5 override applied), each processor of type 0 (Processor
//! Local APIC) and type 9 (Processor Local x2APIC) with its APIC ID and
//! flags, and the multiprocessor wakeup mailbox of a type 0x10 entry (how
//! APs are started on TDX).

use crate::bootinfo::PhysRead;

/// Processors kept from one MADT; more are counted in
/// [`Madt::processors_omitted`], not stored.
pub const MAX_PROCESSORS: usize = 256;
/// Longest table accepted. A corrupt length field must not make the checksum
/// loop read gigabytes; a MADT for 4096 x2APIC CPUs is 64 KiB.
pub const MAX_TABLE_LENGTH: u32 = 1 << 20;

/// Size of the common header of every system description table.
pub const SDT_HEADER_LENGTH: u32 = 36;
/// Size of the ACPI 1.0 part of the RSDP (what its first checksum covers).
pub const RSDP_V1_LENGTH: u32 = 20;
/// Size of the ACPI 2.0+ RSDP.
pub const RSDP_V2_LENGTH: u32 = 36;

/// The 8-byte RSDP signature.
pub const RSDP_SIGNATURE: [u8; 8] = *b"RSD PTR ";
/// Table signatures.
pub mod signature {
    /// Root System Description Table (32-bit entries).
    pub const RSDT: [u8; 4] = *b"RSDT";
    /// Extended System Description Table (64-bit entries).
    pub const XSDT: [u8; 4] = *b"XSDT";
    /// Multiple APIC Description Table.
    pub const MADT: [u8; 4] = *b"APIC";
}

/// MADT interrupt controller structure types this parser understands.
pub mod madt_entry {
    /// Processor Local APIC.
    pub const LOCAL_APIC: u8 = 0x00;
    /// Local APIC Address Override.
    pub const LOCAL_APIC_ADDRESS_OVERRIDE: u8 = 0x05;
    /// Processor Local x2APIC.
    pub const LOCAL_X2APIC: u8 = 0x09;
    /// Multiprocessor Wakeup.
    pub const MULTIPROCESSOR_WAKEUP: u8 = 0x10;
}

/// Offset of the first interrupt controller structure in the MADT.
const MADT_ENTRIES_OFFSET: u32 = 44;
/// Local APIC flags: the processor is ready to use.
const FLAG_ENABLED: u32 = 1 << 0;
/// Local APIC flags (ACPI 6.3+): the processor can be brought online later.
const FLAG_ONLINE_CAPABLE: u32 = 1 << 1;
/// An xAPIC ID that names no processor.
const INVALID_XAPIC_ID: u32 = 0xff;
/// An x2APIC ID that names no processor.
const INVALID_X2APIC_ID: u32 = 0xffff_ffff;

/// Why the tables were refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcpiError {
    /// The boot information gave no RSDP (address 0).
    NoRsdp,
    /// No "RSD PTR " at the given address.
    BadRsdpSignature {
        /// Where the RSDP was expected.
        address: u64,
    },
    /// The checksum over the first 20 bytes of the RSDP is not 0.
    BadRsdpChecksum {
        /// The RSDP's address.
        address: u64,
    },
    /// The ACPI 2.0+ RSDP's length field is out of range.
    BadRsdpLength {
        /// The RSDP's address.
        address: u64,
        /// The length it claims.
        length: u32,
    },
    /// The extended checksum over the whole ACPI 2.0+ RSDP is not 0.
    BadRsdpExtendedChecksum {
        /// The RSDP's address.
        address: u64,
    },
    /// The RSDP points at no root table (both addresses 0).
    NoRootTable,
    /// A table does not carry the signature the pointer to it promised.
    UnexpectedSignature {
        /// The table's address.
        address: u64,
        /// The signature that was required.
        expected: [u8; 4],
        /// The signature found.
        found: [u8; 4],
    },
    /// A table's length is shorter than its fixed part or longer than
    /// [`MAX_TABLE_LENGTH`].
    BadTableLength {
        /// The table's signature.
        signature: [u8; 4],
        /// The table's address.
        address: u64,
        /// The length it claims.
        length: u32,
    },
    /// A table's checksum is not 0.
    BadTableChecksum {
        /// The table's signature.
        signature: [u8; 4],
        /// The table's address.
        address: u64,
    },
    /// The root table lists no table with this signature.
    TableNotFound {
        /// The signature searched for.
        signature: [u8; 4],
    },
    /// A structure (the RSDP, a table, or a table a root lists) whose bytes
    /// would run past the top of the physical address space: no read may
    /// wrap around to address 0.
    AddressOverflow {
        /// The structure's address.
        address: u64,
        /// The bytes it needs from there.
        length: u32,
    },
    /// A MADT entry is shorter than its type requires, has length 0 or 1,
    /// or runs past the end of the MADT.
    BadMadtEntry {
        /// Offset of the entry from the start of the MADT.
        offset: u32,
        /// The entry's type (0 if not even the type byte fits).
        entry_type: u8,
        /// The entry's length field (0 if it does not fit).
        length: u8,
    },
}

/// Which MADT structure described a processor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcessorKind {
    /// Type 0, Processor Local APIC (8-bit APIC ID).
    LocalApic,
    /// Type 9, Processor Local x2APIC (32-bit APIC ID).
    LocalX2apic,
}

/// One processor of the MADT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Processor {
    /// Its local APIC ID (what IPIs are addressed to).
    pub apic_id: u32,
    /// Its ACPI processor UID.
    pub acpi_uid: u32,
    /// The structure it came from.
    pub kind: ProcessorKind,
    /// Flags bit 0: ready to use now.
    pub enabled: bool,
    /// Flags bit 1 (ACPI 6.3+): not enabled, but can be brought online at
    /// run time (hot-add). Meaningless when `enabled` is set.
    pub online_capable: bool,
}

/// The ACPI multiprocessor wakeup mailbox (MADT type 0x10).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WakeupMailbox {
    /// Physical address of the 4 KiB mailbox.
    pub address: u64,
    /// The mailbox version field.
    pub version: u16,
}

/// What SMP bring-up needs from the MADT.
#[derive(Clone, Copy, Debug)]
pub struct Madt {
    /// Physical address of the MADT itself.
    pub address: u64,
    /// Physical address of the local APICs (a type 5 override applied).
    pub local_apic_address: u64,
    /// Flags bit 0: the machine also has dual 8259 PICs (mask them before
    /// enabling interrupts on the BSP).
    pub pcat_compatible: bool,
    /// The mailbox of a type 0x10 entry, if there is one.
    pub wakeup_mailbox: Option<WakeupMailbox>,
    processors: [Processor; MAX_PROCESSORS],
    processor_count: usize,
    /// Usable processor entries that did not fit in [`MAX_PROCESSORS`].
    pub processors_omitted: usize,
}

impl Madt {
    /// The processors, in MADT order (the firmware lists the BSP first, but
    /// nothing depends on it). Entries with the invalid APIC IDs 0xff (type
    /// 0) or 0xffffffff (type 9), and repeats of an APIC ID already listed,
    /// are left out.
    pub fn processors(&self) -> &[Processor] {
        &self.processors[..self.processor_count]
    }

    /// The APIC IDs of the processors that are enabled now, in MADT order:
    /// the CPUs to start at boot.
    pub fn enabled_apic_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.processors()
            .iter()
            .filter(|p| p.enabled)
            .map(|p| p.apic_id)
    }

    /// Copies [`Madt::enabled_apic_ids`] into `out` and returns how many were
    /// copied (at most `out.len()`), for APIs that take a slice.
    pub fn enabled_apic_ids_into(&self, out: &mut [u32]) -> usize {
        let mut count = 0;
        for (slot, id) in out.iter_mut().zip(self.enabled_apic_ids()) {
            *slot = id;
            count += 1;
        }
        count
    }

    fn push(&mut self, processor: Processor) {
        let duplicate = self
            .processors()
            .iter()
            .any(|p| p.apic_id == processor.apic_id);
        if duplicate {
            return;
        }
        match self.processors.get_mut(self.processor_count) {
            Some(slot) => {
                *slot = processor;
                self.processor_count += 1;
            }
            None => self.processors_omitted += 1,
        }
    }
}

/// Reads within one validated byte range `[base, base + length)`; every
/// access outside it is refused, and no read touches a byte outside it.
#[derive(Clone, Copy)]
struct Window<'m, M: PhysRead> {
    memory: &'m M,
    base: u64,
    length: u32,
}

impl<'m, M: PhysRead> Window<'m, M> {
    /// The window `[base, base + length)`, refused if it would wrap the
    /// address space (so no `base + offset` below can overflow).
    fn new(memory: &'m M, base: u64, length: u32) -> Result<Self, AcpiError> {
        check_span(base, length)?;
        Ok(Window {
            memory,
            base,
            length,
        })
    }

    fn fits(&self, offset: u32, size: u32) -> bool {
        offset
            .checked_add(size)
            .is_some_and(|end| end <= self.length)
    }

    /// The `size` (1 or 2) bytes at `offset`: read as part of an in-range
    /// u32 so that `PhysRead` (which has no byte read) never strays out.
    fn small(&self, offset: u32, size: u32) -> Option<u32> {
        if !self.fits(offset, size) || self.length < 4 {
            return None;
        }
        let dword_offset = offset.min(self.length - 4);
        let shift = (offset - dword_offset) * 8;
        let dword = self.memory.read_u32(self.base + u64::from(dword_offset));
        let mask = if size == 1 { 0xff } else { 0xffff };
        Some((dword >> shift) & mask)
    }

    fn u8(&self, offset: u32) -> Option<u8> {
        self.small(offset, 1).map(|v| v as u8)
    }

    fn u16(&self, offset: u32) -> Option<u16> {
        self.small(offset, 2).map(|v| v as u16)
    }

    fn u32(&self, offset: u32) -> Option<u32> {
        self.fits(offset, 4)
            .then(|| self.memory.read_u32(self.base + u64::from(offset)))
    }

    fn u64(&self, offset: u32) -> Option<u64> {
        self.fits(offset, 8)
            .then(|| self.memory.read_u64(self.base + u64::from(offset)))
    }

    /// The byte sum of the whole window (0 for a valid ACPI structure).
    fn checksum(&self) -> u8 {
        let mut sum = 0u8;
        let mut offset = 0;
        while self.fits(offset, 4) {
            let dword = self.memory.read_u32(self.base + u64::from(offset));
            sum = dword
                .to_le_bytes()
                .iter()
                .fold(sum, |s, b| s.wrapping_add(*b));
            offset += 4;
        }
        while let Some(byte) = self.u8(offset) {
            sum = sum.wrapping_add(byte);
            offset += 1;
        }
        sum
    }
}

/// [`AcpiError::AddressOverflow`] if `length` bytes from `address` wrap.
fn check_span(address: u64, length: u32) -> Result<(), AcpiError> {
    match address.checked_add(u64::from(length)) {
        Some(_) => Ok(()),
        None => Err(AcpiError::AddressOverflow { address, length }),
    }
}

/// Maps an out-of-window read (which the length checks made impossible) to
/// an error instead of a panic.
fn field<T>(
    value: Option<T>,
    signature: [u8; 4],
    address: u64,
    length: u32,
) -> Result<T, AcpiError> {
    value.ok_or(AcpiError::BadTableLength {
        signature,
        address,
        length,
    })
}

/// The root table the RSDP points at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Root {
    Rsdt(u64),
    Xsdt(u64),
}

fn parse_rsdp(memory: &impl PhysRead, address: u64) -> Result<Root, AcpiError> {
    if address == 0 {
        return Err(AcpiError::NoRsdp);
    }
    let v1 = Window::new(memory, address, RSDP_V1_LENGTH)?;
    let low = u64::from(memory.read_u32(address));
    let high = u64::from(memory.read_u32(address + 4));
    if (low | high << 32).to_le_bytes() != RSDP_SIGNATURE {
        return Err(AcpiError::BadRsdpSignature { address });
    }
    if v1.checksum() != 0 {
        return Err(AcpiError::BadRsdpChecksum { address });
    }
    let revision = v1.u8(15).unwrap_or(0);
    let rsdt = u64::from(v1.u32(16).unwrap_or(0));
    if revision >= 2 {
        // The length field ends at 24: inside the 36 bytes of a 2.0 RSDP.
        check_span(address, RSDP_V2_LENGTH)?;
        let length = memory.read_u32(address + 20);
        if !(RSDP_V2_LENGTH..=4096).contains(&length) {
            return Err(AcpiError::BadRsdpLength { address, length });
        }
        let v2 = Window::new(memory, address, length)?;
        if v2.checksum() != 0 {
            return Err(AcpiError::BadRsdpExtendedChecksum { address });
        }
        let xsdt = v2.u64(24).unwrap_or(0);
        if xsdt != 0 {
            return Ok(Root::Xsdt(xsdt));
        }
    }
    if rsdt == 0 {
        return Err(AcpiError::NoRootTable);
    }
    Ok(Root::Rsdt(rsdt))
}

/// The signature of the table at `address`, whose header must not wrap.
fn signature_at(memory: &impl PhysRead, address: u64) -> Result<[u8; 4], AcpiError> {
    check_span(address, SDT_HEADER_LENGTH)?;
    Ok(memory.read_u32(address).to_le_bytes())
}

/// Validates the table at `address`: signature, length and checksum.
fn open_table<M: PhysRead>(
    memory: &M,
    address: u64,
    expected: [u8; 4],
    minimum_length: u32,
) -> Result<Window<'_, M>, AcpiError> {
    let found = signature_at(memory, address)?;
    if found != expected {
        return Err(AcpiError::UnexpectedSignature {
            address,
            expected,
            found,
        });
    }
    let length = memory.read_u32(address + 4);
    if !(minimum_length..=MAX_TABLE_LENGTH).contains(&length) {
        return Err(AcpiError::BadTableLength {
            signature: expected,
            address,
            length,
        });
    }
    let table = Window::new(memory, address, length)?;
    if table.checksum() != 0 {
        return Err(AcpiError::BadTableChecksum {
            signature: expected,
            address,
        });
    }
    Ok(table)
}

/// Finds the table with `wanted` signature through the RSDP at `rsdp` (the
/// `rsdp` field of [`crate::bootinfo::BootInfo`]). The RSDP and the root
/// table (XSDT when the RSDP is ACPI 2.0+ and gives one, RSDT otherwise) are
/// validated; the returned table's signature, length and checksum too.
/// Returns its physical address.
pub fn find_table(memory: &impl PhysRead, rsdp: u64, wanted: [u8; 4]) -> Result<u64, AcpiError> {
    let (root_address, root_signature, entry_size) = match parse_rsdp(memory, rsdp)? {
        Root::Rsdt(address) => (address, signature::RSDT, 4),
        Root::Xsdt(address) => (address, signature::XSDT, 8),
    };
    let root = open_table(memory, root_address, root_signature, SDT_HEADER_LENGTH)?;
    let entries = (root.length - SDT_HEADER_LENGTH) / entry_size;
    for index in 0..entries {
        let offset = SDT_HEADER_LENGTH + index * entry_size;
        let pointer = if entry_size == 4 {
            root.u32(offset).map(u64::from)
        } else {
            root.u64(offset)
        };
        let table = field(pointer, root_signature, root_address, root.length)?;
        if table != 0 && signature_at(memory, table)? == wanted {
            open_table(memory, table, wanted, SDT_HEADER_LENGTH)?;
            return Ok(table);
        }
    }
    Err(AcpiError::TableNotFound { signature: wanted })
}

/// Finds and parses the MADT through the RSDP at `rsdp`.
pub fn parse_madt(memory: &impl PhysRead, rsdp: u64) -> Result<Madt, AcpiError> {
    let address = find_table(memory, rsdp, signature::MADT)?;
    parse_madt_at(memory, address)
}

/// Parses the MADT at `address` (signature, length and checksum verified).
pub fn parse_madt_at(memory: &impl PhysRead, address: u64) -> Result<Madt, AcpiError> {
    const SIG: [u8; 4] = signature::MADT;
    let table = open_table(memory, address, SIG, MADT_ENTRIES_OFFSET)?;
    let length = table.length;
    let mut madt = Madt {
        address,
        local_apic_address: u64::from(field(table.u32(36), SIG, address, length)?),
        pcat_compatible: field(table.u32(40), SIG, address, length)? & 1 != 0,
        wakeup_mailbox: None,
        processors: [Processor {
            apic_id: 0,
            acpi_uid: 0,
            kind: ProcessorKind::LocalApic,
            enabled: false,
            online_capable: false,
        }; MAX_PROCESSORS],
        processor_count: 0,
        processors_omitted: 0,
    };
    let mut offset = MADT_ENTRIES_OFFSET;
    while offset < length {
        let entry_type = table.u8(offset).unwrap_or(0);
        let entry_length = table.u8(offset + 1).unwrap_or(0);
        let bad = AcpiError::BadMadtEntry {
            offset,
            entry_type,
            length: entry_length,
        };
        let minimum = match entry_type {
            madt_entry::LOCAL_APIC => 8,
            madt_entry::LOCAL_APIC_ADDRESS_OVERRIDE => 12,
            madt_entry::LOCAL_X2APIC | madt_entry::MULTIPROCESSOR_WAKEUP => 16,
            _ => 2,
        };
        if entry_length < minimum || !table.fits(offset, u32::from(entry_length)) {
            return Err(bad);
        }
        // Every read below is inside the entry, which is inside the table.
        let entry = Window {
            memory,
            base: address + u64::from(offset),
            length: u32::from(entry_length),
        };
        match entry_type {
            madt_entry::LOCAL_APIC => {
                let apic_id = u32::from(entry.u8(3).ok_or(bad)?);
                let flags = entry.u32(4).ok_or(bad)?;
                if apic_id != INVALID_XAPIC_ID {
                    madt.push(Processor {
                        apic_id,
                        acpi_uid: u32::from(entry.u8(2).ok_or(bad)?),
                        kind: ProcessorKind::LocalApic,
                        enabled: flags & FLAG_ENABLED != 0,
                        online_capable: flags & FLAG_ONLINE_CAPABLE != 0,
                    });
                }
            }
            madt_entry::LOCAL_X2APIC => {
                let apic_id = entry.u32(4).ok_or(bad)?;
                let flags = entry.u32(8).ok_or(bad)?;
                if apic_id != INVALID_X2APIC_ID {
                    madt.push(Processor {
                        apic_id,
                        acpi_uid: entry.u32(12).ok_or(bad)?,
                        kind: ProcessorKind::LocalX2apic,
                        enabled: flags & FLAG_ENABLED != 0,
                        online_capable: flags & FLAG_ONLINE_CAPABLE != 0,
                    });
                }
            }
            madt_entry::LOCAL_APIC_ADDRESS_OVERRIDE => {
                madt.local_apic_address = entry.u64(4).ok_or(bad)?;
            }
            madt_entry::MULTIPROCESSOR_WAKEUP => {
                madt.wakeup_mailbox = Some(WakeupMailbox {
                    version: entry.u16(2).ok_or(bad)?,
                    address: entry.u64(8).ok_or(bad)?,
                });
            }
            _ => {}
        }
        offset += u32::from(entry_length);
    }
    Ok(madt)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Physical memory as a byte vector; reads past its end return 0xff
    /// bytes like unbacked memory, so corrupt pointers cannot panic a test.
    struct Memory(Vec<u8>);

    impl Memory {
        fn byte(&self, pa: u64) -> u8 {
            usize::try_from(pa)
                .ok()
                .and_then(|at| self.0.get(at).copied())
                .unwrap_or(0xff)
        }
        fn put(&mut self, at: u64, bytes: &[u8]) {
            let at = at as usize;
            self.0[at..at + bytes.len()].copy_from_slice(bytes);
        }
        fn fix_checksum(&mut self, at: u64, length: usize, checksum_offset: u64) {
            self.0[(at + checksum_offset) as usize] = 0;
            let sum = self.0[at as usize..at as usize + length]
                .iter()
                .fold(0u8, |s, b| s.wrapping_add(*b));
            self.0[(at + checksum_offset) as usize] = sum.wrapping_neg();
        }
    }

    impl PhysRead for Memory {
        fn read_u32(&self, pa: u64) -> u32 {
            u32::from_le_bytes(core::array::from_fn(|i| self.byte(pa + i as u64)))
        }
        fn read_u64(&self, pa: u64) -> u64 {
            u64::from_le_bytes(core::array::from_fn(|i| self.byte(pa + i as u64)))
        }
    }

    const RSDP: u64 = 0x100;
    const ROOT: u64 = 0x200;
    const MADT: u64 = 0x400;
    const OTHER: u64 = 0x300;

    fn sdt_header(signature: &[u8; 4], length: u32) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(signature);
        h.extend_from_slice(&length.to_le_bytes());
        h.push(1); // revision
        h.push(0); // checksum, fixed later
        h.extend_from_slice(b"BOCHS ");
        h.extend_from_slice(b"BXPC    ");
        h.extend_from_slice(&1u32.to_le_bytes());
        h.extend_from_slice(b"BXPC");
        h.extend_from_slice(&1u32.to_le_bytes());
        assert_eq!(h.len(), SDT_HEADER_LENGTH as usize);
        h
    }

    fn put_table(memory: &mut Memory, at: u64, signature: &[u8; 4], body: &[u8]) {
        let length = SDT_HEADER_LENGTH as usize + body.len();
        let mut table = sdt_header(signature, length as u32);
        table.extend_from_slice(body);
        memory.put(at, &table);
        memory.fix_checksum(at, length, 9);
    }

    fn local_apic(uid: u8, apic_id: u8, flags: u32) -> Vec<u8> {
        let mut e = vec![0, 8, uid, apic_id];
        e.extend_from_slice(&flags.to_le_bytes());
        e
    }

    fn local_x2apic(apic_id: u32, flags: u32, uid: u32) -> Vec<u8> {
        let mut e = vec![9, 16, 0, 0];
        e.extend_from_slice(&apic_id.to_le_bytes());
        e.extend_from_slice(&flags.to_le_bytes());
        e.extend_from_slice(&uid.to_le_bytes());
        e
    }

    fn wakeup(mailbox: u64) -> Vec<u8> {
        let mut e = vec![0x10, 16, 0, 0, 0, 0, 0, 0];
        e.extend_from_slice(&mailbox.to_le_bytes());
        e
    }

    fn madt_body(entries: &[Vec<u8>]) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&0xfee0_0000u32.to_le_bytes());
        body.extend_from_slice(&1u32.to_le_bytes()); // PCAT_COMPAT
        for e in entries {
            body.extend_from_slice(e);
        }
        body
    }

    fn default_entries() -> Vec<Vec<u8>> {
        vec![
            local_apic(0, 0, 1),
            local_apic(1, 1, 1),
            local_apic(2, 2, 0),                             // disabled
            local_apic(3, 3, 2),                             // online capable
            local_apic(4, 0xff, 1),                          // invalid ID: skipped
            vec![1, 12, 0, 0, 0, 0, 0xc0, 0xfe, 0, 0, 0, 0], // I/O APIC: skipped
            local_x2apic(300, 1, 7),
            local_x2apic(1, 1, 8), // repeat of APIC ID 1: skipped
            wakeup(0x7_f000),
        ]
    }

    /// RSDP rev 0 -> RSDT -> {other table, MADT}.
    fn machine_v1(entries: &[Vec<u8>]) -> Memory {
        let mut m = Memory(vec![0; 0x1000]);
        let mut rsdp = Vec::new();
        rsdp.extend_from_slice(b"RSD PTR ");
        rsdp.push(0);
        rsdp.extend_from_slice(b"BOCHS ");
        rsdp.push(0); // revision 0
        rsdp.extend_from_slice(&(ROOT as u32).to_le_bytes());
        m.put(RSDP, &rsdp);
        m.fix_checksum(RSDP, 20, 8);
        put_table(&mut m, OTHER, b"FACP", &[0; 8]);
        let mut body = Vec::new();
        body.extend_from_slice(&(OTHER as u32).to_le_bytes());
        body.extend_from_slice(&(MADT as u32).to_le_bytes());
        put_table(&mut m, ROOT, b"RSDT", &body);
        put_table(&mut m, MADT, b"APIC", &madt_body(entries));
        m
    }

    /// RSDP rev 2 -> XSDT -> {other table, MADT}; its RSDT address is 0.
    fn machine_v2(entries: &[Vec<u8>]) -> Memory {
        let mut m = Memory(vec![0; 0x1000]);
        let mut rsdp = Vec::new();
        rsdp.extend_from_slice(b"RSD PTR ");
        rsdp.push(0);
        rsdp.extend_from_slice(b"BOCHS ");
        rsdp.push(2);
        rsdp.extend_from_slice(&0u32.to_le_bytes());
        rsdp.extend_from_slice(&36u32.to_le_bytes());
        rsdp.extend_from_slice(&ROOT.to_le_bytes());
        rsdp.extend_from_slice(&[0; 4]); // extended checksum, reserved
        m.put(RSDP, &rsdp);
        m.fix_checksum(RSDP, 20, 8);
        m.fix_checksum(RSDP, 36, 32);
        put_table(&mut m, OTHER, b"FACP", &[0; 8]);
        let mut body = Vec::new();
        body.extend_from_slice(&OTHER.to_le_bytes());
        body.extend_from_slice(&MADT.to_le_bytes());
        put_table(&mut m, ROOT, b"XSDT", &body);
        put_table(&mut m, MADT, b"APIC", &madt_body(entries));
        m
    }

    fn check_default_madt(madt: &Madt) {
        assert_eq!(madt.address, MADT);
        assert_eq!(madt.local_apic_address, 0xfee0_0000);
        assert!(madt.pcat_compatible);
        let ids: Vec<_> = madt
            .processors()
            .iter()
            .map(|p| (p.apic_id, p.enabled, p.online_capable, p.kind))
            .collect();
        use ProcessorKind::*;
        assert_eq!(
            ids,
            vec![
                (0, true, false, LocalApic),
                (1, true, false, LocalApic),
                (2, false, false, LocalApic),
                (3, false, true, LocalApic),
                (300, true, false, LocalX2apic),
            ]
        );
        assert_eq!(madt.processors()[4].acpi_uid, 7);
        assert_eq!(madt.enabled_apic_ids().collect::<Vec<_>>(), vec![0, 1, 300]);
        assert_eq!(madt.processors_omitted, 0);
        assert_eq!(
            madt.wakeup_mailbox,
            Some(WakeupMailbox {
                address: 0x7_f000,
                version: 0
            })
        );
        let mut two = [0u32; 2];
        assert_eq!(madt.enabled_apic_ids_into(&mut two), 2);
        assert_eq!(two, [0, 1]);
    }

    #[test]
    fn rsdt_path_parses_processors_and_mailbox() {
        let m = machine_v1(&default_entries());
        check_default_madt(&parse_madt(&m, RSDP).unwrap());
    }

    #[test]
    fn xsdt_path_parses_processors_and_mailbox() {
        let m = machine_v2(&default_entries());
        check_default_madt(&parse_madt(&m, RSDP).unwrap());
    }

    #[test]
    fn v2_rsdp_without_xsdt_falls_back_to_rsdt() {
        let mut m = machine_v1(&default_entries());
        // Turn the RSDP into rev 2 with XSDT address 0.
        m.put(RSDP + 15, &[2]);
        m.put(RSDP + 20, &36u32.to_le_bytes());
        m.put(RSDP + 24, &0u64.to_le_bytes());
        m.fix_checksum(RSDP, 20, 8);
        m.fix_checksum(RSDP, 36, 32);
        check_default_madt(&parse_madt(&m, RSDP).unwrap());
    }

    #[test]
    fn local_apic_address_override_applies() {
        let mut entries = default_entries();
        let mut over = vec![5, 12, 0, 0];
        over.extend_from_slice(&0x1_0000_0000u64.to_le_bytes());
        entries.push(over);
        let madt = parse_madt(&machine_v2(&entries), RSDP).unwrap();
        assert_eq!(madt.local_apic_address, 0x1_0000_0000);
    }

    #[test]
    fn refuses_missing_or_foreign_rsdp() {
        let m = machine_v1(&default_entries());
        assert_eq!(parse_madt(&m, 0).unwrap_err(), AcpiError::NoRsdp);
        assert_eq!(
            parse_madt(&m, ROOT).unwrap_err(),
            AcpiError::BadRsdpSignature { address: ROOT }
        );
        // An RSDP pointer past the end of memory reads 0xff: no panic (one
        // whose 20 bytes would wrap the address space is refused before any
        // read: structures_that_would_wrap_the_address_space_are_refused).
        assert_eq!(
            parse_madt(&m, 0xffff_ffff_ffff_ff00).unwrap_err(),
            AcpiError::BadRsdpSignature {
                address: 0xffff_ffff_ffff_ff00
            }
        );
    }

    #[test]
    fn refuses_corrupt_rsdp_checksums() {
        let mut m = machine_v2(&default_entries());
        m.0[RSDP as usize + 9] ^= 1; // OEM ID: inside both checksums
        assert_eq!(
            parse_madt(&m, RSDP).unwrap_err(),
            AcpiError::BadRsdpChecksum { address: RSDP }
        );
        let mut m = machine_v2(&default_entries());
        m.0[RSDP as usize + 33] ^= 1; // reserved: only the extended one
        assert_eq!(
            parse_madt(&m, RSDP).unwrap_err(),
            AcpiError::BadRsdpExtendedChecksum { address: RSDP }
        );
        let mut m = machine_v2(&default_entries());
        m.put(RSDP + 20, &0xffff_ffffu32.to_le_bytes());
        m.fix_checksum(RSDP, 20, 8);
        assert_eq!(
            parse_madt(&m, RSDP).unwrap_err(),
            AcpiError::BadRsdpLength {
                address: RSDP,
                length: 0xffff_ffff
            }
        );
    }

    #[test]
    fn refuses_corrupt_root_checksums() {
        for (mut m, signature) in [
            (machine_v1(&default_entries()), signature::RSDT),
            (machine_v2(&default_entries()), signature::XSDT),
        ] {
            m.0[ROOT as usize + 12] ^= 0x40;
            assert_eq!(
                parse_madt(&m, RSDP).unwrap_err(),
                AcpiError::BadTableChecksum {
                    signature,
                    address: ROOT
                }
            );
        }
    }

    #[test]
    fn refuses_corrupt_madt_checksum() {
        for mut m in [
            machine_v1(&default_entries()),
            machine_v2(&default_entries()),
        ] {
            m.0[MADT as usize + 44 + 3] ^= 1; // an APIC ID
            assert_eq!(
                parse_madt(&m, RSDP).unwrap_err(),
                AcpiError::BadTableChecksum {
                    signature: signature::MADT,
                    address: MADT
                }
            );
        }
    }

    #[test]
    fn refuses_absurd_table_lengths() {
        let mut m = machine_v2(&default_entries());
        m.put(MADT + 4, &0xffff_fff0u32.to_le_bytes());
        assert_eq!(
            parse_madt(&m, RSDP).unwrap_err(),
            AcpiError::BadTableLength {
                signature: signature::MADT,
                address: MADT,
                length: 0xffff_fff0
            }
        );
        let mut m = machine_v1(&default_entries());
        m.put(ROOT + 4, &10u32.to_le_bytes());
        assert_eq!(
            parse_madt(&m, RSDP).unwrap_err(),
            AcpiError::BadTableLength {
                signature: signature::RSDT,
                address: ROOT,
                length: 10
            }
        );
    }

    #[test]
    fn refuses_wrong_root_signature_and_missing_madt() {
        let mut m = machine_v1(&default_entries());
        m.put(ROOT, b"XSDT");
        m.fix_checksum(ROOT, 44, 9);
        assert_eq!(
            parse_madt(&m, RSDP).unwrap_err(),
            AcpiError::UnexpectedSignature {
                address: ROOT,
                expected: signature::RSDT,
                found: signature::XSDT
            }
        );
        let mut m = machine_v1(&default_entries());
        m.put(MADT, b"SSDT");
        m.fix_checksum(MADT, 44, 9);
        assert_eq!(
            parse_madt(&m, RSDP).unwrap_err(),
            AcpiError::TableNotFound {
                signature: signature::MADT
            }
        );
        assert_eq!(find_table(&m, RSDP, *b"FACP").unwrap(), OTHER);
    }

    #[test]
    fn refuses_bad_madt_entries() {
        // Zero length would loop forever if accepted.
        let entries = vec![local_apic(0, 0, 1), vec![0x7f, 0, 0, 0]];
        assert_eq!(
            parse_madt(&machine_v2(&entries), RSDP).unwrap_err(),
            AcpiError::BadMadtEntry {
                offset: 52,
                entry_type: 0x7f,
                length: 0
            }
        );
        // A local APIC entry too short for its type.
        let entries = vec![vec![0, 6, 0, 0, 1, 0]];
        assert_eq!(
            parse_madt(&machine_v2(&entries), RSDP).unwrap_err(),
            AcpiError::BadMadtEntry {
                offset: 44,
                entry_type: 0,
                length: 6
            }
        );
        // An entry whose length runs past the end of the table.
        let entries = vec![local_apic(0, 0, 1), vec![9, 16, 0, 0]];
        assert_eq!(
            parse_madt(&machine_v2(&entries), RSDP).unwrap_err(),
            AcpiError::BadMadtEntry {
                offset: 52,
                entry_type: 9,
                length: 16
            }
        );
        // A single trailing byte.
        let entries = vec![local_apic(0, 0, 1), vec![0]];
        assert_eq!(
            parse_madt(&machine_v2(&entries), RSDP).unwrap_err(),
            AcpiError::BadMadtEntry {
                offset: 52,
                entry_type: 0,
                length: 0
            }
        );
    }

    #[test]
    fn counts_processors_beyond_capacity() {
        let entries: Vec<_> = (0..MAX_PROCESSORS as u32 + 3)
            .map(|id| local_x2apic(id, 1, id))
            .collect();
        let mut m = Memory(vec![0; 0x4000]);
        // Same layout as machine_v1, MADT large enough for 259 entries.
        let big = machine_v1(&[]);
        m.put(0, &big.0);
        put_table(&mut m, MADT, b"APIC", &madt_body(&entries));
        let madt = parse_madt(&m, RSDP).unwrap();
        assert_eq!(madt.processors().len(), MAX_PROCESSORS);
        assert_eq!(madt.processors_omitted, 3);
    }

    /// Found by the `acpi_madt` fuzz target: a MADT address near the top
    /// of the address space made `open_table` read across 2^64, and
    /// `address + 4` overflowed (a panic in a debug build, a read at
    /// address 0 in a release one); the RSDP's reads did the same. Every
    /// structure is now refused before a read could wrap.
    #[test]
    fn structures_that_would_wrap_the_address_space_are_refused() {
        /// Every dword reads "APIC": a MADT signature anywhere.
        struct ApicEverywhere;
        impl PhysRead for ApicEverywhere {
            fn read_u32(&self, _: u64) -> u32 {
                u32::from_le_bytes(signature::MADT)
            }
            fn read_u64(&self, _: u64) -> u64 {
                0
            }
        }
        let overflow = |address, length| AcpiError::AddressOverflow { address, length };
        let top = u64::MAX - 3;
        assert_eq!(
            parse_madt_at(&ApicEverywhere, top).unwrap_err(),
            overflow(top, SDT_HEADER_LENGTH)
        );
        let m = machine_v2(&default_entries());
        assert_eq!(parse_madt_at(&m, top).unwrap_err(), overflow(top, 36));
        assert_eq!(
            parse_madt(&m, top).unwrap_err(),
            overflow(top, RSDP_V1_LENGTH)
        );
        // 20 bytes fit, the 36 of a 2.0 RSDP do not: refused before its
        // length field is read.
        let at = u64::MAX - 30;
        let mut tail = Memory(vec![0; 31]);
        tail.put(0, b"RSD PTR ");
        tail.put(15, &[2]);
        tail.fix_checksum(0, 20, 8);
        struct AtTop(Memory);
        impl PhysRead for AtTop {
            fn read_u32(&self, pa: u64) -> u32 {
                self.0.read_u32(pa - (u64::MAX - 30))
            }
            fn read_u64(&self, pa: u64) -> u64 {
                self.0.read_u64(pa - (u64::MAX - 30))
            }
        }
        assert_eq!(
            parse_madt(&AtTop(tail), at).unwrap_err(),
            overflow(at, RSDP_V2_LENGTH)
        );
        // An XSDT pointer near the top.
        let mut m = machine_v2(&default_entries());
        m.put(RSDP + 24, &(u64::MAX - 8).to_le_bytes());
        m.fix_checksum(RSDP, 20, 8);
        m.fix_checksum(RSDP, 36, 32);
        assert_eq!(
            parse_madt(&m, RSDP).unwrap_err(),
            overflow(u64::MAX - 8, SDT_HEADER_LENGTH)
        );
        // A root listing a table near the top, before the MADT.
        let mut m = machine_v2(&default_entries());
        m.put(ROOT + 36, &(u64::MAX - 1).to_le_bytes());
        m.fix_checksum(ROOT, 52, 9);
        assert_eq!(
            parse_madt(&m, RSDP).unwrap_err(),
            overflow(u64::MAX - 1, SDT_HEADER_LENGTH)
        );
    }

    #[test]
    fn window_never_reads_outside() {
        /// Panics on any read outside [16, 21).
        struct Strict;
        impl PhysRead for Strict {
            fn read_u32(&self, pa: u64) -> u32 {
                assert!((16..=17).contains(&pa), "read_u32 at {pa}");
                0x0403_0201
            }
            fn read_u64(&self, pa: u64) -> u64 {
                panic!("read_u64 at {pa}")
            }
        }
        let w = Window {
            memory: &Strict,
            base: 16,
            length: 5,
        };
        assert_eq!(w.u8(4), Some(4)); // from the dword at offset 1
        assert_eq!(w.u8(5), None);
        assert_eq!(w.u16(3), Some(0x0403));
        assert_eq!(w.u32(2), None);
        assert_eq!(w.u64(0), None);
        let _ = w.checksum();
    }
}
