//! Just enough ELF64 to load the guest kernel: its PT_LOAD segments, the
//! PVH entry point from its `XEN_ELFNOTE_PHYS32_ENTRY` note and the ELF
//! entry point (`e_entry`, the 64-bit entry of the Linux 64-bit boot
//! protocol in this project's kernels).

/// One PT_LOAD segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Offset of the bytes in the file.
    pub offset: u64,
    /// Guest-physical load address.
    pub paddr: u64,
    /// Bytes to copy.
    pub file_size: u64,
    /// Bytes to occupy (the rest zeroed).
    pub memory_size: u64,
}

/// Why the image was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElfError {
    /// Not a little-endian x86-64 ELF64.
    NotElf64,
    /// A header, segment or note runs past the end of the file.
    Truncated,
    /// No `XEN_ELFNOTE_PHYS32_ENTRY` note, or one of a bad size.
    NoPvhEntry,
    /// More than [`MAX_SEGMENTS`] PT_LOAD segments.
    TooManySegments,
    /// `e_entry` is not inside the file bytes of any PT_LOAD segment.
    EntryOutsideImage,
    /// A PT_LOAD segment with more file bytes than memory bytes (the
    /// loader would zero a negative tail), or whose memory would run past
    /// the top of the address space.
    BadSegment,
}

impl core::fmt::Display for ElfError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            ElfError::NotElf64 => "not an x86-64 ELF64 image",
            ElfError::Truncated => "the ELF image is truncated",
            ElfError::NoPvhEntry => "the ELF image has no PVH entry note",
            ElfError::TooManySegments => "the ELF image has too many PT_LOAD segments",
            ElfError::EntryOutsideImage => {
                "the ELF entry point is outside the image's loaded bytes"
            }
            ElfError::BadSegment => {
                "an ELF segment has more file than memory bytes, or wraps the address space"
            }
        })
    }
}

/// Segments kept at most.
pub const MAX_SEGMENTS: usize = 16;

/// A parsed image. Every segment's file bytes lie inside the file, its
/// `file_size` is at most its `memory_size` (> 0), and
/// `paddr + memory_size` does not wrap; `fuzz/` checks it (target
/// `kernel_image`).
#[derive(Clone, Copy, Debug)]
pub struct Image {
    pub segments: [Segment; MAX_SEGMENTS],
    pub segment_count: usize,
    /// 32-bit PVH entry point.
    pub pvh_entry: u32,
    /// The ELF entry point (`e_entry`): where a 64-bit hand-over jumps, at
    /// a physical = virtual address of the identity map. Inside the loaded
    /// bytes of a segment (checked against their physical addresses).
    pub entry: u64,
}

fn read<const N: usize>(bytes: &[u8], at: u64) -> Result<[u8; N], ElfError> {
    let start = usize::try_from(at).map_err(|_| ElfError::Truncated)?;
    let end = start.checked_add(N).ok_or(ElfError::Truncated)?;
    bytes
        .get(start..end)
        .and_then(|s| s.try_into().ok())
        .ok_or(ElfError::Truncated)
}

/// `base + offset`: a field of a header or note the file places there. One
/// that would be past the end of the address space is past the end of the
/// file.
fn at(base: u64, offset: u64) -> Result<u64, ElfError> {
    base.checked_add(offset).ok_or(ElfError::Truncated)
}

fn u16_at(bytes: &[u8], at: u64) -> Result<u16, ElfError> {
    read::<2>(bytes, at).map(u16::from_le_bytes)
}
fn u32_at(bytes: &[u8], at: u64) -> Result<u32, ElfError> {
    read::<4>(bytes, at).map(u32::from_le_bytes)
}
fn u64_at(bytes: &[u8], at: u64) -> Result<u64, ElfError> {
    read::<8>(bytes, at).map(u64::from_le_bytes)
}

const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// Parses `bytes` as a little-endian x86-64 ELF with a PVH note.
pub fn parse(bytes: &[u8]) -> Result<Image, ElfError> {
    if read::<4>(bytes, 0)? != *b"\x7fELF"
        || read::<1>(bytes, 4)? != [2]
        || u16_at(bytes, 18)? != 62
    {
        return Err(ElfError::NotElf64);
    }
    let entry_point = u64_at(bytes, 24)?;
    let phoff = u64_at(bytes, 32)?;
    let phentsize = u64::from(u16_at(bytes, 54)?);
    let phnum = u64::from(u16_at(bytes, 56)?);
    let mut image = Image {
        segments: [Segment {
            offset: 0,
            paddr: 0,
            file_size: 0,
            memory_size: 0,
        }; MAX_SEGMENTS],
        segment_count: 0,
        pvh_entry: 0,
        entry: 0,
    };
    let mut entry = None;
    for index in 0..phnum {
        // phnum and phentsize are u16: the product cannot overflow.
        let header = at(phoff, index * phentsize)?;
        let kind = u32_at(bytes, header)?;
        let offset = u64_at(bytes, at(header, 8)?)?;
        let paddr = u64_at(bytes, at(header, 24)?)?;
        let file_size = u64_at(bytes, at(header, 32)?)?;
        let memory_size = u64_at(bytes, at(header, 40)?)?;
        match kind {
            PT_LOAD if memory_size > 0 => {
                if offset
                    .checked_add(file_size)
                    .is_none_or(|end| end > bytes.len() as u64)
                {
                    return Err(ElfError::Truncated);
                }
                if file_size > memory_size || paddr.checked_add(memory_size).is_none() {
                    return Err(ElfError::BadSegment);
                }
                let slot = image
                    .segments
                    .get_mut(image.segment_count)
                    .ok_or(ElfError::TooManySegments)?;
                *slot = Segment {
                    offset,
                    paddr,
                    file_size,
                    memory_size,
                };
                image.segment_count += 1;
            }
            PT_NOTE => entry = entry.or(find_pvh_note(bytes, offset, file_size)?),
            _ => {}
        }
    }
    image.pvh_entry = entry.ok_or(ElfError::NoPvhEntry)?;
    let loaded = image.segments[..image.segment_count]
        .iter()
        .any(|s| s.paddr <= entry_point && entry_point - s.paddr < s.file_size);
    if !loaded {
        return Err(ElfError::EntryOutsideImage);
    }
    image.entry = entry_point;
    Ok(image)
}

/// The PVH entry of the notes in `bytes[offset..offset + size]`, if one is
/// there. Every offset is checked: a note that would run past the end of
/// the address space is [`ElfError::Truncated`], like one past the file's.
fn find_pvh_note(bytes: &[u8], offset: u64, size: u64) -> Result<Option<u32>, ElfError> {
    // Sizes are u32s: rounding them up cannot overflow a u64.
    let align4 = |n: u64| (n + 3) & !3;
    let end = at(offset, size)?;
    let mut note = offset;
    while at(note, 12)? <= end {
        let name_size = u64::from(u32_at(bytes, note)?);
        let desc_size = u64::from(u32_at(bytes, at(note, 4)?)?);
        let kind = u32_at(bytes, at(note, 8)?)?;
        let name_at = at(note, 12)?;
        let desc_at = at(name_at, align4(name_size))?;
        if kind == XEN_ELFNOTE_PHYS32_ENTRY && read::<4>(bytes, name_at)? == *b"Xen\0" {
            return match desc_size {
                4 => u32_at(bytes, desc_at).map(Some),
                8 => u64_at(bytes, desc_at).map(|v| Some(v as u32)),
                _ => Err(ElfError::NoPvhEntry),
            };
        }
        note = at(desc_at, align4(desc_size))?;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The real guest, if it was built (make test builds it first).
    fn guest() -> Option<Vec<u8>> {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../target/x86_64-unknown-none/release/guest"
        );
        std::fs::read(path).ok()
    }

    #[test]
    fn parses_the_guest_kernel_when_built() {
        let Some(bytes) = guest() else {
            eprintln!("guest not built; covered by the hand-made image test");
            return;
        };
        let image = parse(&bytes).unwrap();
        assert_eq!(
            image.pvh_entry, 0x10_0000,
            "pvh_start is the first byte of .text"
        );
        // _start64 follows the 32-bit entry in the same (first) segment.
        let text = image.segments[0];
        assert_eq!(text.paddr, 0x10_0000);
        assert!(image.entry > u64::from(image.pvh_entry));
        assert!(image.entry < text.paddr + text.file_size);
        assert!(image.segment_count >= 3);
        assert!(image.segments[..image.segment_count]
            .iter()
            .all(|s| s.paddr >= 0x10_0000));
    }

    fn hand_made() -> Vec<u8> {
        let mut b = vec![0u8; 0x200];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[18..20].copy_from_slice(&62u16.to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[24..32].copy_from_slice(&0x20_0008u64.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&2u16.to_le_bytes());
        // PT_LOAD: 0x10 bytes at file 0x100 to 0x200000, 0x1000 in memory.
        let load = 64;
        b[load..load + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
        b[load + 8..load + 16].copy_from_slice(&0x100u64.to_le_bytes());
        b[load + 24..load + 32].copy_from_slice(&0x20_0000u64.to_le_bytes());
        b[load + 32..load + 40].copy_from_slice(&0x10u64.to_le_bytes());
        b[load + 40..load + 48].copy_from_slice(&0x1000u64.to_le_bytes());
        // PT_NOTE at 0x180: "Xen", type 18, 4-byte entry 0x200123.
        let note = 64 + 56;
        b[note..note + 4].copy_from_slice(&PT_NOTE.to_le_bytes());
        b[note + 8..note + 16].copy_from_slice(&0x180u64.to_le_bytes());
        b[note + 32..note + 40].copy_from_slice(&20u64.to_le_bytes());
        b[0x180..0x184].copy_from_slice(&4u32.to_le_bytes());
        b[0x184..0x188].copy_from_slice(&4u32.to_le_bytes());
        b[0x188..0x18c].copy_from_slice(&18u32.to_le_bytes());
        b[0x18c..0x190].copy_from_slice(b"Xen\0");
        b[0x190..0x194].copy_from_slice(&0x20_0123u32.to_le_bytes());
        b
    }

    #[test]
    fn parses_a_hand_made_image() {
        let image = parse(&hand_made()).unwrap();
        assert_eq!(image.pvh_entry, 0x20_0123);
        assert_eq!(image.entry, 0x20_0008);
        assert_eq!(image.segment_count, 1);
        assert_eq!(
            image.segments[0],
            Segment {
                offset: 0x100,
                paddr: 0x20_0000,
                file_size: 0x10,
                memory_size: 0x1000
            }
        );
    }

    /// Found by the `kernel_image` fuzz target: a PT_NOTE whose offset plus
    /// size wraps made `find_pvh_note` overflow (a panic in a debug build,
    /// a loop over the wrong bytes in a release one). Now `Truncated`.
    #[test]
    fn notes_that_wrap_the_address_space_are_truncated() {
        let note = 64 + 56;
        for (offset, size) in [(0x180, u64::MAX), (u64::MAX - 4, 20), (u64::MAX - 11, 12)] {
            let mut b = hand_made();
            b[note + 8..note + 16].copy_from_slice(&offset.to_le_bytes());
            b[note + 32..note + 40].copy_from_slice(&size.to_le_bytes());
            assert_eq!(
                parse(&b).unwrap_err(),
                ElfError::Truncated,
                "note at {offset:#x}, {size:#x} bytes"
            );
        }
        // A name size that puts the descriptor past the file: no overflow
        // (the sizes are u32s), just another note past the end.
        let mut b = hand_made();
        b[0x180..0x184].copy_from_slice(&u32::MAX.to_le_bytes());
        b[0x188..0x18c].copy_from_slice(&17u32.to_le_bytes());
        b[note + 32..note + 40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(parse(&b).unwrap_err(), ElfError::Truncated);
    }

    /// Found by the `kernel_image` fuzz target's checks: a PT_LOAD whose
    /// memory wraps the address space was accepted, and so was one with
    /// more file than memory bytes, for which the emulator's loader computes
    /// `memory_size - file_size` as the zeroed tail (an overflow panic, or
    /// a fill of nearly 2^64 bytes).
    #[test]
    fn segments_the_loader_cannot_place_are_refused() {
        let load = 64;
        let mut b = hand_made();
        b[load + 40..load + 48].copy_from_slice(&0xfu64.to_le_bytes());
        assert_eq!(parse(&b).unwrap_err(), ElfError::BadSegment);
        // Memory past 2^64, with the entry in the segment's file bytes.
        let mut b = hand_made();
        b[load + 24..load + 32].copy_from_slice(&(u64::MAX - 0x10).to_le_bytes());
        b[24..32].copy_from_slice(&(u64::MAX - 0x8).to_le_bytes());
        assert_eq!(parse(&b).unwrap_err(), ElfError::BadSegment);
        // Exactly as many memory as file bytes, and memory ending at the
        // top: fine (the entry is checked separately).
        let mut b = hand_made();
        b[load + 40..load + 48].copy_from_slice(&0x10u64.to_le_bytes());
        let image = parse(&b).unwrap();
        assert_eq!(image.segments[0].memory_size, 0x10);
        let mut b = hand_made();
        b[load + 24..load + 32].copy_from_slice(&(u64::MAX - 0x1000).to_le_bytes());
        b[24..32].copy_from_slice(&(u64::MAX - 0x1000).to_le_bytes());
        assert!(parse(&b).is_ok());
    }

    #[test]
    fn refuses_broken_images() {
        assert_eq!(parse(b"MZ").unwrap_err(), ElfError::Truncated);
        let mut not_elf = hand_made();
        not_elf[0] = b'X';
        assert_eq!(parse(&not_elf).unwrap_err(), ElfError::NotElf64);
        let mut no_note = hand_made();
        no_note[0x188] = 17;
        assert_eq!(parse(&no_note).unwrap_err(), ElfError::NoPvhEntry);
        let mut past_end = hand_made();
        past_end[64 + 32..64 + 40].copy_from_slice(&0x1000u64.to_le_bytes());
        assert_eq!(parse(&past_end).unwrap_err(), ElfError::Truncated);
        // e_entry must name loaded bytes: not before the segment, not in
        // its zero-filled tail, not where nothing is loaded.
        for outside in [0x1f_ffff, 0x20_0010, 0x20_0fff, 0, u64::MAX] {
            let mut bad_entry = hand_made();
            bad_entry[24..32].copy_from_slice(&outside.to_le_bytes());
            assert_eq!(
                parse(&bad_entry).unwrap_err(),
                ElfError::EntryOutsideImage,
                "e_entry {outside:#x}"
            );
        }
        let mut last_byte = hand_made();
        last_byte[24..32].copy_from_slice(&0x20_000fu64.to_le_bytes());
        assert_eq!(parse(&last_byte).unwrap().entry, 0x20_000f);
        // A header cut before e_entry is truncated, not misread.
        assert_eq!(parse(&hand_made()[..28]).unwrap_err(), ElfError::Truncated);
        assert_eq!(
            ElfError::EntryOutsideImage.to_string(),
            "the ELF entry point is outside the image's loaded bytes"
        );
    }
}
