//! Target `acpi_madt`: `bare::acpi::parse_madt` over memory the host wrote.
//!
//! Input: byte 0 holds flags (bit 0: fix every checksum the tables have
//! before parsing, so the fuzzer gets past them and into the entries),
//! bytes 1..9 the RSDP address (little-endian u64); the whole input is
//! physical memory from address 0, and 0xff above it.
//!
//! Checked on every input: no read wraps the address space, and no panic.
//! On a parsed MADT:
//! - the table at its address has the MADT signature, a length in
//!   44..=`MAX_TABLE_LENGTH` and a zero checksum;
//! - parsing it again at that address gives the same result and reads
//!   nothing outside `[address, address + length)`: every entry used lies
//!   inside the table;
//! - the processors, local APIC address, PCAT flag and wakeup mailbox equal
//!   those of an independent walk of the entries (the reference model
//!   below), and every read of the whole parse lies in the RSDP, a root
//!   table, the signature of a table the root lists, or the MADT;
//! - processors are unique, at most `MAX_PROCESSORS`, never an invalid ID.
//!
//! On a `BadMadtEntry` from `parse_madt_at`, the model also fails at that
//! offset, which lies inside the table.

use crate::memory::{assert_covered, Input, Memory};
use bare::acpi::{
    parse_madt, parse_madt_at, signature, AcpiError, Madt, Processor, ProcessorKind, WakeupMailbox,
    MAX_PROCESSORS, MAX_TABLE_LENGTH, SDT_HEADER_LENGTH,
};
use std::ops::Range;

/// Bit 0 of the flags byte: fix the checksums first.
pub const FIX_CHECKSUMS: u8 = 1;

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let flags = input.u8();
    let rsdp = input.u64();
    let mut bytes = data.to_vec();
    if flags & FIX_CHECKSUMS != 0 {
        fix_checksums(&mut bytes, rsdp);
    }
    let memory = Memory::new(&bytes);
    let parsed = parse_madt(&memory, rsdp);
    let whole_parse = memory.reads();
    if let Ok(madt) = parsed {
        check_madt(&memory, rsdp, &madt, &whole_parse);
    }
    // The MADT parser alone, at an address the input chooses (bytes 9..17),
    // with its own checks.
    let address = input.u64();
    memory.clear_reads();
    match parse_madt_at(&memory, address) {
        Ok(madt) => {
            check_table_parse(&memory, address, &madt);
        }
        Err(AcpiError::BadMadtEntry { offset, .. }) => {
            let length = memory.peek_u32(address.wrapping_add(4));
            assert!(
                (44..length).contains(&offset),
                "bad entry at {offset} outside the table (length {length})"
            );
            assert_eq!(
                model(&memory, address, length).err(),
                Some(offset),
                "the model fails at another offset"
            );
        }
        Err(_) => {}
    }
}

/// The checks of a MADT that `parse_madt` returned.
fn check_madt(memory: &Memory, rsdp: u64, madt: &Madt, whole_parse: &[Range<u64>]) {
    let length = check_table_parse(memory, madt.address, madt);
    let mut allowed = vec![rsdp..rsdp.saturating_add(rsdp_length(memory, rsdp))];
    for (root, entry_size) in [
        (u64::from(memory.peek_u32(rsdp.saturating_add(16))), 4),
        (memory.peek_u64(rsdp.saturating_add(24)), 8),
    ] {
        let root_length = memory
            .peek_u32(root.saturating_add(4))
            .min(MAX_TABLE_LENGTH);
        allowed.push(root..root.saturating_add(u64::from(root_length)));
        let entries = root_length.saturating_sub(SDT_HEADER_LENGTH) / entry_size;
        for index in 0..u64::from(entries) {
            let at = root
                .saturating_add(u64::from(SDT_HEADER_LENGTH))
                .saturating_add(index * u64::from(entry_size));
            let table = if entry_size == 4 {
                u64::from(memory.peek_u32(at))
            } else {
                memory.peek_u64(at)
            };
            allowed.push(table..table.saturating_add(4));
        }
    }
    allowed.push(madt.address..madt.address + u64::from(length));
    assert_covered(
        whole_parse,
        &allowed,
        "parse_madt (RSDP, root tables, their pointers' signatures, MADT)",
    );
}

/// The bytes of the RSDP a parse reads: 20, or the ACPI 2.0+ length.
fn rsdp_length(memory: &Memory, rsdp: u64) -> u64 {
    if memory.peek::<1>(rsdp.saturating_add(15))[0] >= 2 {
        u64::from(memory.peek_u32(rsdp.saturating_add(20)).min(4096))
    } else {
        20
    }
}

/// Checks a MADT parsed at `address` and returns the table's length.
fn check_table_parse(memory: &Memory, address: u64, madt: &Madt) -> u32 {
    assert_eq!(madt.address, address);
    assert_eq!(memory.peek(address), signature::MADT, "not a MADT");
    let length = memory.peek_u32(address.wrapping_add(4));
    assert!(
        (44..=MAX_TABLE_LENGTH).contains(&length),
        "accepted length {length}"
    );
    let end = address
        .checked_add(u64::from(length))
        .expect("an accepted table wraps the address space");
    let sum = (address..end).fold(0u8, |s, pa| s.wrapping_add(memory.byte(pa)));
    assert_eq!(sum, 0, "accepted a table with a bad checksum");

    // Again, recording only this parse: nothing outside the table.
    memory.clear_reads();
    let again = parse_madt_at(memory, address).expect("a parsed MADT parses again");
    memory.assert_reads_within(&[address..end], "parse_madt_at");
    assert_eq!(again.processors(), madt.processors());
    assert_eq!(again.local_apic_address, madt.local_apic_address);

    let expected = model(memory, address, length).expect("the model refuses a parsed MADT");
    assert_eq!(madt.local_apic_address, expected.local_apic_address);
    assert_eq!(madt.pcat_compatible, expected.pcat_compatible);
    assert_eq!(madt.wakeup_mailbox, expected.wakeup_mailbox);
    assert_eq!(madt.processors(), &expected.processors[..]);
    assert_eq!(madt.processors_omitted, expected.omitted);

    let processors = madt.processors();
    assert!(processors.len() <= MAX_PROCESSORS);
    for (i, p) in processors.iter().enumerate() {
        assert!(
            processors[..i].iter().all(|q| q.apic_id != p.apic_id),
            "APIC ID {} twice",
            p.apic_id
        );
        match p.kind {
            ProcessorKind::LocalApic => assert!(p.apic_id < 0xff),
            ProcessorKind::LocalX2apic => assert!(p.apic_id != u32::MAX),
        }
    }
    let enabled = processors.iter().filter(|p| p.enabled).count();
    let mut out = [0u32; 3];
    assert_eq!(madt.enabled_apic_ids_into(&mut out), enabled.min(3));
    length
}

/// What the model reads from a MADT.
struct Expected {
    local_apic_address: u64,
    pcat_compatible: bool,
    wakeup_mailbox: Option<WakeupMailbox>,
    processors: Vec<Processor>,
    omitted: usize,
}

/// An independent walk of the MADT's entries (ACPI 6.5, 5.2.12): the
/// offset of the first bad entry, or what a parser must find.
fn model(memory: &Memory, address: u64, length: u32) -> Result<Expected, u32> {
    let byte = |offset: u32| memory.peek::<1>(address.wrapping_add(u64::from(offset)))[0];
    let u32_at = |offset: u32| memory.peek_u32(address.wrapping_add(u64::from(offset)));
    let u64_at = |offset: u32| memory.peek_u64(address.wrapping_add(u64::from(offset)));
    let mut expected = Expected {
        local_apic_address: u64::from(u32_at(36)),
        pcat_compatible: u32_at(40) & 1 != 0,
        wakeup_mailbox: None,
        processors: Vec::new(),
        omitted: 0,
    };
    let push = |expected: &mut Expected, p: Processor| {
        let repeat = expected.processors.iter().any(|q| q.apic_id == p.apic_id);
        if repeat {
            // Left out, like the parser does.
        } else if expected.processors.len() < MAX_PROCESSORS {
            expected.processors.push(p);
        } else {
            expected.omitted += 1;
        }
    };
    let mut offset = 44u32;
    while offset < length {
        if length - offset < 2 {
            return Err(offset);
        }
        let (kind, entry_length) = (byte(offset), byte(offset + 1));
        let minimum = match kind {
            0 => 8,
            5 => 12,
            9 | 0x10 => 16,
            _ => 2,
        };
        if entry_length < minimum || u32::from(entry_length) > length - offset {
            return Err(offset);
        }
        match kind {
            0 if byte(offset + 3) != 0xff => {
                let flags = u32_at(offset + 4);
                push(
                    &mut expected,
                    Processor {
                        apic_id: u32::from(byte(offset + 3)),
                        acpi_uid: u32::from(byte(offset + 2)),
                        kind: ProcessorKind::LocalApic,
                        enabled: flags & 1 != 0,
                        online_capable: flags & 2 != 0,
                    },
                );
            }
            9 if u32_at(offset + 4) != u32::MAX => {
                let flags = u32_at(offset + 8);
                push(
                    &mut expected,
                    Processor {
                        apic_id: u32_at(offset + 4),
                        acpi_uid: u32_at(offset + 12),
                        kind: ProcessorKind::LocalX2apic,
                        enabled: flags & 1 != 0,
                        online_capable: flags & 2 != 0,
                    },
                );
            }
            5 => expected.local_apic_address = u64_at(offset + 4),
            0x10 => {
                expected.wakeup_mailbox = Some(WakeupMailbox {
                    version: u16::from_le_bytes([byte(offset + 2), byte(offset + 3)]),
                    address: u64_at(offset + 8),
                })
            }
            _ => {}
        }
        offset += u32::from(entry_length);
    }
    Ok(expected)
}

/// Sets the checksum byte of every structure the RSDP at `rsdp` leads to
/// (the tables the roots list first, then the roots, then the RSDP), where
/// it lies inside `bytes`.
pub fn fix_checksums(bytes: &mut [u8], rsdp: u64) {
    let u32_at = |bytes: &[u8], at: u64| -> Option<u32> {
        let at = usize::try_from(at).ok()?;
        Some(u32::from_le_bytes(
            bytes.get(at..at.checked_add(4)?)?.try_into().ok()?,
        ))
    };
    let u64_at = |bytes: &[u8], at: u64| -> Option<u64> {
        let at = usize::try_from(at).ok()?;
        Some(u64::from_le_bytes(
            bytes.get(at..at.checked_add(8)?)?.try_into().ok()?,
        ))
    };
    let revision = usize::try_from(rsdp.saturating_add(15))
        .ok()
        .and_then(|at| bytes.get(at).copied())
        .unwrap_or(0);
    let rsdt = u32_at(bytes, rsdp.saturating_add(16)).map(u64::from);
    let (xsdt, extended_length) = if revision >= 2 {
        (
            u64_at(bytes, rsdp.saturating_add(24)),
            u32_at(bytes, rsdp.saturating_add(20)),
        )
    } else {
        (None, None)
    };
    let roots = [(rsdt, 4u64), (xsdt, 8u64)];
    for (root, entry_size) in roots {
        let Some(root) = root else { continue };
        let Some(root_length) = u32_at(bytes, root.saturating_add(4)) else {
            continue;
        };
        let entries = u64::from(root_length.saturating_sub(SDT_HEADER_LENGTH)) / entry_size;
        for index in 0..entries.min(bytes.len() as u64) {
            let at = root.saturating_add(36 + index * entry_size);
            let table = if entry_size == 4 {
                u32_at(bytes, at).map(u64::from)
            } else {
                u64_at(bytes, at)
            };
            if let Some(table) = table {
                fix_table(bytes, table);
            }
        }
    }
    for (root, _) in roots {
        if let Some(root) = root {
            fix_table(bytes, root);
        }
    }
    set_checksum(bytes, rsdp, 20, rsdp.saturating_add(8));
    if let Some(length) = extended_length {
        set_checksum(bytes, rsdp, u64::from(length), rsdp.saturating_add(32));
    }
}

fn fix_table(bytes: &mut [u8], table: u64) {
    let length = usize::try_from(table.saturating_add(4))
        .ok()
        .and_then(|at| {
            Some(u32::from_le_bytes(
                bytes.get(at..at.checked_add(4)?)?.try_into().ok()?,
            ))
        });
    if let Some(length) = length {
        set_checksum(bytes, table, u64::from(length), table.saturating_add(9));
    }
}

/// Makes the byte sum of `bytes[start..start + length]` zero by setting the
/// byte at `at`, if all of it lies in `bytes`.
fn set_checksum(bytes: &mut [u8], start: u64, length: u64, at: u64) {
    let (Ok(start), Ok(at)) = (usize::try_from(start), usize::try_from(at)) else {
        return;
    };
    let Some(end) = usize::try_from(length)
        .ok()
        .and_then(|length| start.checked_add(length))
    else {
        return;
    };
    if end > bytes.len() || !(start..end).contains(&at) {
        return;
    }
    bytes[at] = 0;
    let sum = bytes[start..end]
        .iter()
        .fold(0u8, |s, b| s.wrapping_add(*b));
    bytes[at] = sum.wrapping_neg();
}
