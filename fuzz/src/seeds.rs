//! Valid inputs for each target, built here rather than checked in as
//! binary files: the fuzzers start from them (`write-seeds`), and the
//! replay tests run them.

use crate::kernel::CONTROL_BYTES;

/// A target's name and its seeds.
pub struct Seeds {
    /// The target (its binary's name).
    pub target: &'static str,
    /// Named inputs.
    pub inputs: Vec<(&'static str, Vec<u8>)>,
}

/// The seeds of every target.
pub fn all() -> Vec<Seeds> {
    vec![
        Seeds {
            target: "acpi_madt",
            inputs: acpi(),
        },
        Seeds {
            target: "boot_info",
            inputs: boot_info(),
        },
        Seeds {
            target: "ve_info",
            inputs: ve_info(),
        },
        Seeds {
            target: "kernel_image",
            inputs: kernel_image(),
        },
    ]
}

fn put(bytes: &mut Vec<u8>, at: usize, value: &[u8]) {
    if bytes.len() < at + value.len() {
        bytes.resize(at + value.len(), 0);
    }
    bytes[at..at + value.len()].copy_from_slice(value);
}

fn checksum(bytes: &mut [u8], start: usize, length: usize, at: usize) {
    bytes[at] = 0;
    let sum = bytes[start..start + length]
        .iter()
        .fold(0u8, |s, b| s.wrapping_add(*b));
    bytes[at] = sum.wrapping_neg();
}

fn table(bytes: &mut Vec<u8>, at: usize, signature: &[u8; 4], body: &[u8]) {
    let length = 36 + body.len();
    put(bytes, at, signature);
    put(bytes, at + 4, &(length as u32).to_le_bytes());
    put(bytes, at + 8, &[1, 0]);
    put(bytes, at + 10, b"FUZZ  FUZZTBL 1   FUZZ1   ");
    put(bytes, at + 36, body);
    checksum(bytes, at, length, at + 9);
}

const RSDP: usize = 0x40;
const ROOT: usize = 0x80;
const FACP: usize = 0xc0;
const MADT: usize = 0x100;

fn madt_body() -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&0xfee0_0000u32.to_le_bytes());
    body.extend_from_slice(&1u32.to_le_bytes());
    for (uid, id, flags) in [
        (0u8, 0u8, 1u32),
        (1, 1, 1),
        (2, 2, 0),
        (3, 3, 2),
        (4, 0xff, 1),
    ] {
        body.extend_from_slice(&[0, 8, uid, id]);
        body.extend_from_slice(&flags.to_le_bytes());
    }
    body.extend_from_slice(&[1, 12, 0, 0, 0, 0, 0xc0, 0xfe, 0, 0, 0, 0]); // I/O APIC
    for (id, flags, uid) in [(300u32, 1u32, 7u32), (1, 1, 8)] {
        body.extend_from_slice(&[9, 16, 0, 0]);
        body.extend_from_slice(&id.to_le_bytes());
        body.extend_from_slice(&flags.to_le_bytes());
        body.extend_from_slice(&uid.to_le_bytes());
    }
    body.extend_from_slice(&[5, 12, 0, 0]);
    body.extend_from_slice(&0xfee0_0000u64.to_le_bytes());
    body.extend_from_slice(&[0x10, 16, 0, 0, 0, 0, 0, 0]);
    body.extend_from_slice(&0x7_f000u64.to_le_bytes());
    body
}

/// RSDP rev 0 -> RSDT, or rev 2 -> XSDT, each listing a FACP and the MADT.
fn acpi_machine(revision: u8, flags: u8) -> Vec<u8> {
    let mut m = vec![0u8; 17];
    m[0] = flags;
    put(&mut m, 1, &(RSDP as u64).to_le_bytes());
    put(&mut m, 9, &(MADT as u64).to_le_bytes());
    put(&mut m, RSDP, b"RSD PTR ");
    put(&mut m, RSDP + 9, b"FUZZ  ");
    put(&mut m, RSDP + 15, &[revision]);
    table(&mut m, FACP, b"FACP", &[0; 8]);
    table(&mut m, MADT, b"APIC", &madt_body());
    if revision >= 2 {
        put(&mut m, RSDP + 20, &36u32.to_le_bytes());
        put(&mut m, RSDP + 24, &(ROOT as u64).to_le_bytes());
        let mut body = Vec::new();
        body.extend_from_slice(&(FACP as u64).to_le_bytes());
        body.extend_from_slice(&(MADT as u64).to_le_bytes());
        table(&mut m, ROOT, b"XSDT", &body);
        checksum(&mut m, RSDP, 20, RSDP + 8);
        checksum(&mut m, RSDP, 36, RSDP + 32);
    } else {
        put(&mut m, RSDP + 16, &(ROOT as u32).to_le_bytes());
        let mut body = Vec::new();
        body.extend_from_slice(&(FACP as u32).to_le_bytes());
        body.extend_from_slice(&(MADT as u32).to_le_bytes());
        table(&mut m, ROOT, b"RSDT", &body);
        checksum(&mut m, RSDP, 20, RSDP + 8);
    }
    m
}

fn acpi() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("rsdt", acpi_machine(0, 0)),
        ("xsdt", acpi_machine(2, 0)),
        ("rsdt-fix-checksums", acpi_machine(0, 1)),
        ("xsdt-fix-checksums", acpi_machine(2, 1)),
    ]
}

fn boot_info() -> Vec<(&'static str, Vec<u8>)> {
    use bare::bootinfo::{zero_page::*, HVM_START_MAGIC};
    // PVH: start info at 0x10, memory map at 0x50, module list at 0xb0.
    let mut pvh = vec![0u8; 0xc0];
    put(&mut pvh, 1, &0x10u64.to_le_bytes());
    put(&mut pvh, 0x10, &HVM_START_MAGIC.to_le_bytes());
    put(&mut pvh, 0x14, &1u32.to_le_bytes());
    put(&mut pvh, 0x1c, &1u32.to_le_bytes()); // nr_modules
    put(&mut pvh, 0x20, &0xb0u64.to_le_bytes()); // modlist
    put(&mut pvh, 0x28, &0x9000u64.to_le_bytes()); // cmdline
    put(&mut pvh, 0x30, &0xf_5a20u64.to_le_bytes()); // rsdp
    put(&mut pvh, 0x38, &0x50u64.to_le_bytes()); // memmap
    put(&mut pvh, 0x40, &4u32.to_le_bytes()); // entries
    for (i, (start, len, kind)) in [
        (0u64, 0x9fc00u64, 1u32),
        (0xf0000, 0x10000, 2),
        (0x10_0000, 0xff0_0000, 1),
        (0xfee0_0000, 0x1000, 4),
    ]
    .iter()
    .enumerate()
    {
        // Only 4 entries of 24 bytes fit before the module list.
        let at = 0x50 + i * 24;
        put(&mut pvh, at, &start.to_le_bytes());
        put(&mut pvh, at + 8, &len.to_le_bytes());
        put(&mut pvh, at + 16, &kind.to_le_bytes());
    }
    put(&mut pvh, 0xb0, &0x20_0000u64.to_le_bytes());
    put(&mut pvh, 0xb8, &0x1234u64.to_le_bytes());

    // A zero page at 0x10.
    let zp = 0x10usize;
    let mut linux = vec![0u8; zp + SIZE as usize];
    linux[0] = 1;
    put(&mut linux, 1, &(zp as u64).to_le_bytes());
    let z = |offset: u64| zp + offset as usize;
    put(&mut linux, z(BOOT_FLAG), &BOOT_FLAG_VALUE.to_le_bytes());
    put(&mut linux, z(HEADER), &HEADER_MAGIC.to_le_bytes());
    put(&mut linux, z(ACPI_RSDP_ADDR), &0xe_0000u64.to_le_bytes());
    put(&mut linux, z(CMD_LINE_PTR), &0x2800u32.to_le_bytes());
    put(&mut linux, z(RAMDISK_IMAGE), &0x20_0000u32.to_le_bytes());
    put(&mut linux, z(RAMDISK_SIZE), &0x1000u32.to_le_bytes());
    put(&mut linux, z(EXT_RAMDISK_IMAGE), &1u32.to_le_bytes());
    linux[z(E820_ENTRIES)] = 3;
    for (i, (start, len, kind)) in [
        (0u64, 0x9_f000u64, 1u32),
        (0xe_0000, 0x2_0000, 2),
        (0x10_0000, 0xff0_0000, 1),
    ]
    .iter()
    .enumerate()
    {
        let at = z(E820_TABLE) + i * E820_ENTRY_SIZE as usize;
        put(&mut linux, at, &start.to_le_bytes());
        put(&mut linux, at + 8, &len.to_le_bytes());
        put(&mut linux, at + 16, &kind.to_le_bytes());
    }
    vec![("pvh", pvh), ("boot-params", linux)]
}

fn ve_info() -> Vec<(&'static str, Vec<u8>)> {
    // Context: RAX, RBX, RCX, RDX, RIP, RFLAGS (IF set).
    let context = [
        0x1122_3344_5566_7788u64,
        2,
        0x1b,
        4,
        0xffff_8000_0010_0000,
        0x202,
    ];
    // (exit reason, qualification, instruction length)
    let events: [(&str, u64, u64, u64); 9] = [
        ("out-byte", 30, 0x3f8 << 16, 1),
        ("in-word", 30, 0x604 << 16 | 1 << 3 | 1, 2),
        ("in-dword", 30, 0xcf8 << 16 | 1 << 3 | 3, 1),
        ("string-io", 30, 0x3f8 << 16 | 1 << 4, 2),
        ("cpuid", 10, 0, 2),
        ("rdmsr", 31, 0, 2),
        ("wrmsr", 32, 0, 2),
        ("hlt", 12, 0, 1),
        ("ept-violation", 48, 0x181, 0),
    ];
    events
        .iter()
        .map(|&(name, reason, qualification, length)| {
            let mut input = Vec::new();
            for r in context {
                input.extend_from_slice(&r.to_le_bytes());
            }
            // VEINFO.GET: status 0, RCX reason, RDX qualification, R8 GLA,
            // R9 GPA, R10 length; R11..R15.
            let veinfo = [
                0,
                reason,
                qualification,
                0x1000,
                0x8000_1000,
                length,
                0,
                0,
                0,
                0,
                0,
            ];
            // The TDVMCALL: status 0, R10 = 0 (success), R11..R15 results.
            let vmcall = [0, 0, 0, 0, 0, 0, 0xab, 0x11, 0x22, 0x33, 0x44];
            for r in veinfo.iter().chain(&vmcall) {
                input.extend_from_slice(&r.to_le_bytes());
            }
            (name, input)
        })
        .collect()
}

/// The control prefix of the kernel-image target.
fn control(memory: u64, placed_low_end: u64, initrd: u64, cmdline: u64, entries: u8) -> Vec<u8> {
    let mut c = Vec::new();
    for v in [memory, placed_low_end, initrd, cmdline, 0xe_0000] {
        c.extend_from_slice(&v.to_le_bytes());
    }
    c.push(entries);
    c.push(0);
    c.resize(CONTROL_BYTES, 0);
    c
}

/// A bzImage header: protocol 2.15, setup_sects 3, a 0x400-byte payload,
/// pref_address 16 MiB, 2 MiB alignment, relocatable, 64-bit, init_size
/// 32 MiB, cmdline_size 2047.
fn bzimage() -> Vec<u8> {
    let mut b = vec![0u8; 4 * 512 + 0x400];
    b[0x1f1] = 3;
    put(&mut b, 0x1f4, &(0x400u32 / 16).to_le_bytes());
    put(&mut b, 0x1fe, &0xaa55u16.to_le_bytes());
    put(&mut b, 0x200, &[0xeb, 0x6a]);
    put(&mut b, 0x202, b"HdrS");
    put(&mut b, 0x206, &0x020fu16.to_le_bytes());
    b[0x211] = 1;
    put(&mut b, 0x22c, &0x7fff_ffffu32.to_le_bytes());
    put(&mut b, 0x230, &0x20_0000u32.to_le_bytes());
    b[0x234] = 1;
    put(&mut b, 0x236, &0x7fu16.to_le_bytes());
    put(&mut b, 0x238, &2047u32.to_le_bytes());
    put(&mut b, 0x258, &0x100_0000u64.to_le_bytes());
    put(&mut b, 0x260, &0x200_0000u32.to_le_bytes());
    b
}

/// An ELF64 with one PT_LOAD (0x10 bytes at file 0x100 to 0x200000, 0x1000
/// in memory) and a PT_NOTE with the PVH entry.
fn elf() -> Vec<u8> {
    let mut b = vec![0u8; 0x200];
    put(&mut b, 0, b"\x7fELF");
    b[4] = 2;
    put(&mut b, 18, &62u16.to_le_bytes());
    put(&mut b, 24, &0x20_0008u64.to_le_bytes());
    put(&mut b, 32, &64u64.to_le_bytes());
    put(&mut b, 54, &56u16.to_le_bytes());
    put(&mut b, 56, &2u16.to_le_bytes());
    let load = 64;
    put(&mut b, load, &1u32.to_le_bytes());
    put(&mut b, load + 8, &0x100u64.to_le_bytes());
    put(&mut b, load + 24, &0x20_0000u64.to_le_bytes());
    put(&mut b, load + 32, &0x10u64.to_le_bytes());
    put(&mut b, load + 40, &0x1000u64.to_le_bytes());
    let note = 64 + 56;
    put(&mut b, note, &4u32.to_le_bytes());
    put(&mut b, note + 8, &0x180u64.to_le_bytes());
    put(&mut b, note + 32, &20u64.to_le_bytes());
    put(&mut b, 0x180, &4u32.to_le_bytes());
    put(&mut b, 0x184, &4u32.to_le_bytes());
    put(&mut b, 0x188, &18u32.to_le_bytes());
    put(&mut b, 0x18c, b"Xen\0");
    put(&mut b, 0x190, &0x20_0123u32.to_le_bytes());
    b
}

fn kernel_image() -> Vec<(&'static str, Vec<u8>)> {
    let mib = 1u64 << 20;
    let with = |prefix: Vec<u8>, file: Vec<u8>| [prefix, file].concat();
    vec![
        (
            "bzimage",
            with(control(256 * mib, 2 * mib, 0x1800, 0x2_0000, 3), bzimage()),
        ),
        (
            "bzimage-high",
            with(control(8 << 30, 2 * mib, 0x1000, 0x2_0000, 130), bzimage()),
        ),
        (
            "elf",
            with(control(64 * mib, 4 * mib, 0x4000, 0x9000, 3), elf()),
        ),
    ]
}
