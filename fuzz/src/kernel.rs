//! Target `kernel_image`: the emulator's kernel-image loaders
//! (`tdx_emulator::bzimage` and `tdx_emulator::elf`) on a kernel file the
//! host gave, and the zero page built for it read back by the guest's
//! parser (`bare::bootinfo`).
//!
//! Input: a [`CONTROL_BYTES`]-byte prefix (TD memory size, the end of what
//! the firmware placed low, initrd size, command-line and RSDP addresses,
//! number of memory-map entries, flags), then the kernel file.
//!
//! Checked for an ELF file that `elf::parse` accepts:
//! - at most `MAX_SEGMENTS` segments, each with its file bytes inside the
//!   file, `file_size <= memory_size`, `memory_size > 0` and
//!   `paddr + memory_size` not wrapping;
//! - the entry point lies in the loaded bytes of a segment;
//! - the emulator's loading loop (its arithmetic, repeated here) neither
//!   overflows nor slices outside the file.
//!
//! For a bzImage that `BzImage::parse` accepts:
//! - the payload and the setup header are the file's bytes at their
//!   places (`(setup_sects + 1) * 512`, `syssize * 16` bytes; 0x1F1 up to
//!   at most 0x290);
//! - the load address is at least 1 MiB, aligned when the alignment is a
//!   power of two, and the kernel's memory from it ends below 2^52 without
//!   saturating; the 64-bit entry lies inside the payload;
//! - `check_fits` and `check_cmdline` agree with their definitions;
//! - a place `place_initrd` gives is 4 KiB aligned, above what was placed
//!   low, under its limit and off the kernel, and `build_boot_params`
//!   accepts it.
//!
//! For every zero page `build_boot_params` builds (for the bzImage, or for
//! an ELF guest): the guest's `BootInfo::parse_boot_params` accepts it,
//! reads only its 4 KiB, and finds the memory map, command line, initrd
//! (none when none was given) and RSDP that were put in.

use crate::memory::Input;
use tdx_emulator::bzimage::{
    build_boot_params, detect, place_initrd, BzImage, E820Entry, KernelError, KernelFormat,
    MAX_E820_ENTRIES,
};
use tdx_emulator::elf;

/// Length of the control prefix.
pub const CONTROL_BYTES: usize = 48;
/// The end of the emulator's firmware window: ELF segments go above it.
const FIRMWARE_END: u64 = 0x10_0000;
const FOUR_GIB: u64 = 1 << 32;

/// The loader's parameters, from the prefix.
#[derive(Clone, Copy, Debug)]
struct Control {
    memory_bytes: u64,
    placed_low_end: u64,
    initrd_size: u64,
    cmdline_gpa: u64,
    rsdp_gpa: u64,
    e820_entries: usize,
    no_initrd: bool,
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let control = Control {
        memory_bytes: input.u64(),
        placed_low_end: input.u64(),
        initrd_size: input.u64(),
        cmdline_gpa: input.u64(),
        rsdp_gpa: input.u64(),
        e820_entries: usize::from(input.u8()),
        no_initrd: input.u8() & 1 != 0,
    };
    let _padding = input.take::<6>();
    let file = input.rest();

    match detect(file) {
        Ok(KernelFormat::Elf) => assert_eq!(file.get(..4), Some(&b"\x7fELF"[..])),
        Ok(KernelFormat::BzImage) => {
            assert_eq!(file.get(0x1fe..0x200), Some(&[0x55, 0xaa][..]));
            assert_eq!(file.get(0x202..0x206), Some(&b"HdrS"[..]));
        }
        Err(e) => assert_eq!(e, KernelError::Unrecognised),
    }
    if let Ok(image) = elf::parse(file) {
        check_elf(file, &image, &control);
    }
    if let Ok(image) = BzImage::parse(file) {
        check_bzimage(file, &image, &control);
    }
}

fn check_elf(file: &[u8], image: &elf::Image, control: &Control) {
    assert!((1..=elf::MAX_SEGMENTS).contains(&image.segment_count));
    let segments = &image.segments[..image.segment_count];
    for s in segments {
        let file_end = s.offset.checked_add(s.file_size).expect("file range wraps");
        assert!(file_end <= file.len() as u64, "segment past the file's end");
        assert!(s.memory_size > 0);
        assert!(s.file_size <= s.memory_size, "file bytes beyond the memory");
        assert!(s.paddr.checked_add(s.memory_size).is_some(), "memory wraps");
    }
    assert!(
        segments
            .iter()
            .any(|s| s.paddr <= image.entry && image.entry - s.paddr < s.file_size),
        "entry {:#x} outside the loaded bytes",
        image.entry
    );

    // The emulator's loop (tdx_emulator/src/hypervisor/mod.rs, load_kernel),
    // with its unchecked arithmetic: it must hold for every accepted image.
    let (mut low, mut high) = (u64::MAX, 0);
    let mut refused = false;
    for s in segments {
        let end = s.paddr.saturating_add(s.memory_size);
        if end > control.memory_bytes || s.paddr < FIRMWARE_END {
            refused = true;
            break;
        }
        let bytes = &file[s.offset as usize..(s.offset + s.file_size) as usize];
        assert_eq!(bytes.len() as u64, s.file_size);
        let _zeroed_at = s.paddr + s.file_size;
        let _zeroed = (s.memory_size - s.file_size) as usize;
        low = low.min(s.paddr);
        high = high.max(end);
    }
    if !refused {
        assert!(low <= image.entry && image.entry < high);
    }

    // The zero page the emulator builds for an ELF guest.
    let e820 = memory_map(control);
    let initrd = (!control.no_initrd).then(|| {
        place_initrd(
            None,
            control.memory_bytes,
            control.placed_low_end,
            control.initrd_size,
        )
    });
    let initrd = match initrd {
        Some(Ok(gpa)) => {
            check_placed(None, control, gpa);
            Some((gpa, control.initrd_size))
        }
        _ => None,
    };
    check_zero_page(None, &e820, control, initrd);
}

fn check_bzimage(file: &[u8], image: &BzImage, control: &Control) {
    let setup_sects = match file[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    let payload_start = (setup_sects + 1) * 512;
    let syssize = u32::from_le_bytes(file[0x1f4..0x1f8].try_into().unwrap());
    let payload = image.payload();
    assert_eq!(payload.len() as u64, u64::from(syssize) * 16);
    assert_eq!(payload, &file[payload_start..payload_start + payload.len()]);
    assert_eq!(payload.as_ptr(), file[payload_start..].as_ptr());
    let header = image.setup_header();
    assert!(header.len() <= 0x290 - 0x1f1);
    assert_eq!(header, &file[0x1f1..0x1f1 + header.len()]);

    let load = image.load_address();
    assert!(load >= 0x10_0000, "load address {load:#x} below 1 MiB");
    let alignment = u64::from(image.kernel_alignment());
    if alignment.is_power_of_two() {
        assert_eq!(load % alignment, 0, "load address unaligned");
    }
    let end = load
        .checked_add(image.memory_needed())
        .expect("kernel memory wraps");
    assert_eq!(image.kernel_end(), end);
    assert!(end <= 1 << 52, "kernel memory ends at {end:#x}");
    assert!(image.memory_needed() >= payload.len() as u64);
    let entry = image.entry_64();
    assert!(
        load <= entry && entry - load < payload.len() as u64,
        "64-bit entry {entry:#x} outside the payload at {load:#x} ({:#x} bytes)",
        payload.len()
    );
    assert_eq!(
        image.check_fits(control.memory_bytes).is_ok(),
        end <= control.memory_bytes
    );
    let line = [b'x'; 300];
    let length = (control.cmdline_gpa % 301) as usize;
    assert_eq!(
        image.check_cmdline(&line[..length]).is_ok(),
        length as u64 <= u64::from(image.cmdline_size())
    );

    let e820 = memory_map(control);
    let initrd = if control.no_initrd {
        None
    } else {
        match place_initrd(
            Some(image),
            control.memory_bytes,
            control.placed_low_end,
            control.initrd_size,
        ) {
            Ok(gpa) => {
                check_placed(Some(image), control, gpa);
                Some((gpa, control.initrd_size))
            }
            Err(_) => None,
        }
    };
    check_zero_page(Some(image), &e820, control, initrd);
}

/// The checks of an initrd address that `place_initrd` gave.
fn check_placed(image: Option<&BzImage>, control: &Control, gpa: u64) {
    let size = control.initrd_size;
    assert_eq!(gpa % 4096, 0, "initrd at {gpa:#x}");
    assert!(
        gpa >= control.placed_low_end,
        "initrd under what was placed"
    );
    let end = gpa.checked_add(size).expect("initrd wraps");
    assert!(end <= control.memory_bytes, "initrd past the TD's memory");
    if let Some(image) = image {
        if !(image.can_be_above_4g() && control.memory_bytes > FOUR_GIB) {
            assert!(end <= u64::from(image.initrd_addr_max()) + 1);
        }
        if size > 0 {
            assert!(
                end <= image.load_address() || gpa >= image.kernel_end(),
                "initrd over the kernel"
            );
        }
    }
}

/// A memory map of `control.e820_entries` entries (over 128 must be refused).
fn memory_map(control: &Control) -> Vec<E820Entry> {
    (0..control.e820_entries as u64)
        .map(|i| E820Entry {
            addr: (i << 21) ^ control.rsdp_gpa,
            size: control.memory_bytes.rotate_left(i as u32),
            kind: (i % 5) as u32,
        })
        .collect()
}

/// Builds the zero page and reads it back as the guest does.
fn check_zero_page(
    image: Option<&BzImage>,
    e820: &[E820Entry],
    control: &Control,
    initrd: Option<(u64, u64)>,
) {
    let mut page = vec![0xa5u8; 4096];
    let built = build_boot_params(
        &mut page,
        image,
        e820,
        control.cmdline_gpa,
        initrd,
        control.rsdp_gpa,
    );
    if e820.len() > MAX_E820_ENTRIES {
        assert_eq!(
            built,
            Err(KernelError::TooManyE820Entries { count: e820.len() })
        );
        return;
    }
    let reachable = image.is_none_or(|i| i.can_be_above_4g() || control.cmdline_gpa < FOUR_GIB);
    if initrd.is_some() && reachable {
        // What place_initrd chose, build_boot_params accepts.
        assert_eq!(built, Ok(()), "a placed initrd refused");
    }
    if built.is_err() {
        assert!(page.iter().all(|&b| b == 0xa5), "written on an error");
        return;
    }
    let info = crate::bootinfo::parse_zero_page(&page).expect("the guest refuses the zero page");
    let kept = e820.len().min(bare::bootinfo::MAX_REGIONS);
    assert_eq!(info.region_count, kept);
    assert_eq!(info.regions_dropped, e820.len() - kept);
    for (region, entry) in info.regions[..kept].iter().zip(e820) {
        assert_eq!(
            (region.start, region.len, region.kind),
            (entry.addr, entry.size, entry.kind)
        );
    }
    assert_eq!(info.cmdline, control.cmdline_gpa);
    assert_eq!(info.rsdp, control.rsdp_gpa);
    let expected_module = initrd.filter(|&(gpa, size)| gpa != 0 && size != 0);
    assert_eq!(
        info.first_module, expected_module,
        "the guest finds another initrd than was given"
    );
}
