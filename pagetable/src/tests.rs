use crate::sim::SimMemory;
use crate::*;

const GIB: u64 = 1 << 30;
const MIB2: u64 = 2 << 20;

fn tables(mem: &SimMemory, mode: PagingMode, cc: CcMask) -> PageTables<&SimMemory> {
    let root = mem.allocate_zeroed();
    // SAFETY: a zeroed root frame of `mem`, changed only through these tables.
    unsafe { PageTables::new(mem, root, mode, cc) }
}

fn kernel_rw() -> PteFlags {
    PteFlags::PRESENT | PteFlags::WRITABLE | PteFlags::NO_EXECUTE | PteFlags::GLOBAL
}

/// Clears PRESENT the way the engine does, through update_leaf.
fn make_not_present(pt: &PageTables<&SimMemory>, va: VirtAddr) -> Leaf {
    let leaf = pt.lookup_address(va).unwrap();
    pt.update_leaf(&leaf, |e| Pte(e.0 & !PteFlags::PRESENT.bits()))
        .unwrap();
    pt.lookup_address(va).unwrap()
}

#[test]
fn frame_recovered_from_non_present_leaves_at_every_level_and_encoding() {
    let cases = [
        (Level::Pt, 0x4000_0000_1000u64 + 0x1000, 0x12_3456_7000u64),
        (Level::Pd, 0x4000_0020_0000 + 0x40_0000, 0x12_3460_0000),
        (Level::Pdpt, 0x4080_0000_0000, 0x7_c000_0000),
    ];
    for gpaw in [48u8, 52] {
        let cc = CcMask::tdx(gpaw).unwrap();
        assert_eq!(cc.shared_bits(), 1 << (gpaw - 1));
        for shared in [false, true] {
            for (level, va, frame) in cases {
                let mem = SimMemory::new(PhysAddr(0x100_0000), 16);
                let pt = tables(&mem, PagingMode::FourLevel, cc);
                pt.map_leaf(
                    VirtAddr(va),
                    PhysAddr(frame),
                    level,
                    kernel_rw(),
                    shared,
                    &&mem,
                )
                .unwrap();
                let leaf = make_not_present(&pt, VirtAddr(va + 0x234));
                assert!(!leaf.entry.is_present());
                assert_eq!(leaf.level(), level, "gpaw {gpaw} shared {shared}");
                assert_eq!(leaf.va, VirtAddr(va));
                assert_eq!(cc.is_shared(leaf.entry), shared);
                assert_eq!(
                    leaf.entry.0 & cc.shared_bits() != 0,
                    shared,
                    "the raw entry carries the shared bit"
                );
                assert_eq!(cc.leaf_frame(leaf.entry, level), PhysAddr(frame));
                // The CPU's view: nothing there.
                assert_eq!(pt.translate(VirtAddr(va)), None);
            }
        }
    }
}

#[test]
fn sev_style_private_bit_is_masked_from_frames_and_table_pointers() {
    let cc = CcMask::with_private_bit(51).unwrap();
    let mem = SimMemory::new(PhysAddr(0x100_0000), 16);
    let pt = tables(&mem, PagingMode::FourLevel, cc);
    let va = VirtAddr(0xffff_8880_0000_0000);
    pt.map_leaf(
        va,
        PhysAddr(0x20_0000),
        Level::Pd,
        kernel_rw(),
        false,
        &&mem,
    )
    .unwrap();
    // The PML4 entry points to a table in encrypted memory: C-bit set.
    // SAFETY: the root, a table of `mem`.
    let top = Pte(unsafe { mem.load(pt.root(), Level::Pml4.index_of(va)) });
    assert_ne!(top.0 & (1 << 51), 0);
    let leaf = make_not_present(&pt, va);
    assert!(!cc.is_shared(leaf.entry));
    assert_eq!(cc.leaf_frame(leaf.entry, Level::Pd), PhysAddr(0x20_0000));
    let shared = cc.make_shared(leaf.entry);
    assert!(cc.is_shared(shared));
    assert_eq!(shared.0 & (1 << 51), 0);
    assert_eq!(cc.leaf_frame(shared, Level::Pd), PhysAddr(0x20_0000));
}

#[test]
fn masks_refuse_bits_outside_the_address_field() {
    assert_eq!(CcMask::tdx(47), Err(MaskError::UnsupportedGpaw(47)));
    assert_eq!(
        CcMask::with_shared_bit(11),
        Err(MaskError::BitOutsideAddressField(11))
    );
    assert_eq!(
        CcMask::with_private_bit(52),
        Err(MaskError::BitOutsideAddressField(52))
    );
    // The "none" mask changes no address bit.
    assert_eq!(CcMask::NONE.all() & ADDR_FIELD, 0);
}

#[test]
fn walk_reports_unmapped_non_canonical_and_reserved() {
    let mem = SimMemory::new(PhysAddr(0x100_0000), 16);
    let pt = tables(&mem, PagingMode::FourLevel, CcMask::NONE);
    assert_eq!(
        pt.lookup_address(VirtAddr(0x1000)),
        Err(WalkError::NotMapped {
            va: VirtAddr(0x1000),
            level: Level::Pml4
        })
    );
    assert_eq!(
        pt.lookup_address(VirtAddr(0x0000_8000_0000_0000)),
        Err(WalkError::NonCanonical(VirtAddr(0x0000_8000_0000_0000)))
    );
    pt.map_leaf(
        VirtAddr(0x20_0000),
        PhysAddr(0x20_0000),
        Level::Pd,
        kernel_rw(),
        false,
        &&mem,
    )
    .unwrap();
    // Next 2M is inside a present PD but its entry is zero.
    assert_eq!(
        pt.lookup_address(VirtAddr(0x40_0000)),
        Err(WalkError::NotMapped {
            va: VirtAddr(0x40_0000),
            level: Level::Pd
        })
    );
    // PS at PML4 level is reserved.
    // SAFETY: the root, a table of `mem` (and for the exchange below).
    let root_entry = unsafe { mem.load(pt.root(), 0) };
    unsafe {
        mem.compare_exchange(
            pt.root(),
            0,
            root_entry,
            root_entry | PteFlags::HUGE_PAGE.bits(),
        )
    }
    .unwrap();
    assert_eq!(
        pt.lookup_address(VirtAddr(0x20_0000)),
        Err(WalkError::Reserved {
            va: VirtAddr(0x20_0000),
            level: Level::Pml4
        })
    );
}

#[test]
fn five_level_walk_uses_the_extra_table() {
    let cc = CcMask::tdx(52).unwrap();
    let mem = SimMemory::new(PhysAddr(0x100_0000), 16);
    let pt = tables(&mem, PagingMode::FiveLevel, cc);
    // Canonical only with 57-bit addresses.
    let va = VirtAddr(0xff11_0000_0000_0000);
    assert!(!PagingMode::FourLevel.is_canonical(va));
    pt.map_leaf(
        va,
        PhysAddr(0x8_0000_0000),
        Level::Pdpt,
        kernel_rw(),
        true,
        &&mem,
    )
    .unwrap();
    // SAFETY: the root, a table of `mem`.
    assert_ne!(unsafe { mem.load(pt.root(), Level::Pml5.index_of(va)) }, 0);
    let leaf = pt.lookup_address(VirtAddr(va.0 + 0x1234_5678)).unwrap();
    assert_eq!(leaf.level(), Level::Pdpt);
    assert_eq!(
        pt.translate(VirtAddr(va.0 + 0x1234_5678)),
        Some(PhysAddr(0x8_1234_5678))
    );
    assert_eq!(PagingMode::FiveLevel.va_bits(), 57);
}

/// Every 4K page of `[va, va+len)` translates and carries the same flags
/// and C/S bits before and after.
fn translations(pt: &PageTables<&SimMemory>, va: u64, len: u64) -> Vec<(Option<PhysAddr>, u64)> {
    (0..len / PAGE_SIZE)
        .map(|i| {
            let v = VirtAddr(va + i * PAGE_SIZE);
            let leaf = pt.lookup_address(v).unwrap();
            // Normalise the PAT position so 2M and 4K entries compare.
            let pat = leaf.entry.0
                & if leaf.level() == Level::Pt {
                    PAT_4K
                } else {
                    PAT_LARGE
                }
                != 0;
            let flags = leaf.entry.0 & !ADDR_FIELD & !PteFlags::HUGE_PAGE.bits();
            let cc = leaf.entry.0 & pt.cc_mask().all();
            (pt.translate(v), flags | cc | (pat as u64) << 10)
        })
        .collect()
}

#[test]
fn split_2m_keeps_translation_attributes_pat_and_shared_bit() {
    let cc = CcMask::tdx(48).unwrap();
    let mem = SimMemory::new(PhysAddr(0x100_0000), 16);
    let pt = tables(&mem, PagingMode::FourLevel, cc);
    let va = 0xffff_8880_0060_0000u64;
    let flags = kernel_rw() | PteFlags::WRITE_THROUGH;
    pt.map_leaf(
        VirtAddr(va),
        PhysAddr(0x3460_0000),
        Level::Pd,
        flags,
        true,
        &&mem,
    )
    .unwrap();
    // Set the large-page PAT bit by hand.
    let leaf = pt.lookup_address(VirtAddr(va)).unwrap();
    pt.update_leaf(&leaf, |e| Pte(e.0 | PAT_LARGE)).unwrap();
    let before = translations(&pt, va, MIB2);
    let leaf = pt.lookup_address(VirtAddr(va)).unwrap();
    pt.split(&leaf, &&mem).unwrap();
    let after = translations(&pt, va, MIB2);
    assert_eq!(before, after);
    let child = pt.lookup_address(VirtAddr(va + 0x4000)).unwrap();
    assert_eq!(child.level(), Level::Pt);
    assert_ne!(child.entry.0 & PAT_4K, 0, "PAT moved to bit 7");
    assert_eq!(
        child.entry.0 & PAT_LARGE,
        0,
        "bit 12 is an address bit at 4K"
    );
    assert!(cc.is_shared(child.entry));
    assert_eq!(cc.leaf_frame(child.entry, Level::Pt), PhysAddr(0x3460_4000));
    // 4K leaves cannot be split.
    assert_eq!(pt.split(&child, &&mem), Err(TableError::NotSplittable));
}

#[test]
fn split_1g_gives_2m_leaves_that_stay_large() {
    let cc = CcMask::tdx(52).unwrap();
    let mem = SimMemory::new(PhysAddr(0x100_0000), 16);
    let pt = tables(&mem, PagingMode::FourLevel, cc);
    let va = 0xffff_8881_0000_0000u64;
    pt.map_leaf(
        VirtAddr(va),
        PhysAddr(3 * GIB),
        Level::Pdpt,
        kernel_rw(),
        false,
        &&mem,
    )
    .unwrap();
    let before = translations(&pt, va, 8 * MIB2);
    let leaf = pt.lookup_address(VirtAddr(va)).unwrap();
    pt.split(&leaf, &&mem).unwrap();
    assert_eq!(before, translations(&pt, va, 8 * MIB2));
    let child = pt.lookup_address(VirtAddr(va + 511 * MIB2 + 5)).unwrap();
    assert_eq!(child.level(), Level::Pd);
    assert_eq!(
        cc.leaf_frame(child.entry, Level::Pd),
        PhysAddr(3 * GIB + 511 * MIB2)
    );
}

#[test]
fn split_at_splits_only_what_straddles() {
    let mem = SimMemory::new(PhysAddr(0x100_0000), 16);
    let pt = tables(&mem, PagingMode::FourLevel, CcMask::tdx(48).unwrap());
    let va = 0x40_0000_0000u64;
    pt.map_leaf(
        VirtAddr(va),
        PhysAddr(GIB),
        Level::Pdpt,
        kernel_rw(),
        false,
        &&mem,
    )
    .unwrap();
    // On a 1G boundary and on a 2M boundary inside: nothing / one split.
    assert_eq!(pt.splits_needed_at(VirtAddr(va)), Ok(0));
    assert_eq!(pt.splits_needed_at(VirtAddr(va + MIB2)), Ok(1));
    assert_eq!(pt.splits_needed_at(VirtAddr(va + MIB2 + 0x3000)), Ok(2));
    assert_eq!(pt.splits_needed_at(VirtAddr(0x80_0000_0000)), Ok(0));
    let free = mem.free_frames();
    assert_eq!(pt.split_at(VirtAddr(va), &&mem), Ok(0));
    assert_eq!(pt.split_at(VirtAddr(va + MIB2 + 0x3000), &&mem), Ok(2));
    assert_eq!(mem.free_frames(), free - 2);
    assert_eq!(pt.lookup_address(VirtAddr(va)).unwrap().level(), Level::Pd);
    assert_eq!(
        pt.lookup_address(VirtAddr(va + MIB2 + 0x3000))
            .unwrap()
            .level(),
        Level::Pt
    );
    assert_eq!(
        pt.lookup_address(VirtAddr(va + 2 * MIB2)).unwrap().level(),
        Level::Pd,
        "the neighbours stay 2M"
    );
}

#[test]
fn split_without_memory_changes_nothing() {
    let mem = SimMemory::new(PhysAddr(0x100_0000), 3);
    let pt = tables(&mem, PagingMode::FourLevel, CcMask::NONE);
    pt.map_leaf(
        VirtAddr(0),
        PhysAddr(0),
        Level::Pd,
        kernel_rw(),
        false,
        &&mem,
    )
    .unwrap();
    assert_eq!(mem.free_frames(), 0);
    let before = mem.snapshot();
    assert_eq!(
        pt.split_at(VirtAddr(0x1000), &&mem),
        Err(TableError::OutOfTableMemory)
    );
    assert_eq!(before, mem.snapshot());
}

#[test]
fn update_leaf_notices_a_concurrent_split() {
    let mem = SimMemory::new(PhysAddr(0x100_0000), 8);
    let pt = tables(&mem, PagingMode::FourLevel, CcMask::NONE);
    pt.map_leaf(
        VirtAddr(0),
        PhysAddr(0),
        Level::Pd,
        kernel_rw(),
        false,
        &&mem,
    )
    .unwrap();
    let stale = pt.lookup_address(VirtAddr(0)).unwrap();
    pt.split(&stale, &&mem).unwrap();
    assert_eq!(
        pt.update_leaf(&stale, |e| Pte(e.0 & !1)),
        Err(TableError::Raced)
    );
    assert_eq!(pt.split(&stale, &&mem), Err(TableError::Raced));
}

#[test]
fn map_leaf_refuses_overlaps_and_bad_leaves() {
    let mem = SimMemory::new(PhysAddr(0x100_0000), 8);
    let pt = tables(&mem, PagingMode::FourLevel, CcMask::tdx(48).unwrap());
    pt.map_leaf(
        VirtAddr(0),
        PhysAddr(0),
        Level::Pd,
        kernel_rw(),
        false,
        &&mem,
    )
    .unwrap();
    assert_eq!(
        pt.map_leaf(
            VirtAddr(0x1000),
            PhysAddr(0x1000),
            Level::Pt,
            kernel_rw(),
            false,
            &&mem
        ),
        Err(TableError::AlreadyMapped {
            va: VirtAddr(0x1000),
            level: Level::Pd
        })
    );
    for (va, pa, level) in [
        (0x1000, 0, Level::Pd),
        (0, 0x1000, Level::Pd),
        (0, 0, Level::Pml4),
        (0x20_0000, 1 << 47, Level::Pd),
    ] {
        assert_eq!(
            pt.map_leaf(VirtAddr(va), PhysAddr(pa), level, kernel_rw(), false, &&mem),
            Err(TableError::BadLeaf)
        );
    }
    let gone = pt.unmap_leaf(VirtAddr(0x1234)).unwrap();
    assert_eq!(gone.level(), Level::Pd);
    assert!(pt.lookup_address(VirtAddr(0)).is_err());
}

#[test]
fn nested_tables_take_guest_physical_addresses_with_bit_47() {
    let mem = SimMemory::new(PhysAddr(0x100_0000), 8);
    let pt = tables(&mem, PagingMode::FourLevelNested, CcMask::NONE);
    let shared_alias = VirtAddr((1 << 47) | 0x20_3000);
    assert!(!PagingMode::FourLevel.is_canonical(shared_alias));
    assert!(PagingMode::FourLevelNested.is_canonical(shared_alias));
    assert!(!PagingMode::FourLevelNested.is_canonical(VirtAddr(0xffff_8000_0000_0000)));
    let flags = PteFlags::PRESENT | PteFlags::WRITABLE | PteFlags::USER;
    pt.map_leaf(
        shared_alias,
        PhysAddr(0x4020_3000),
        Level::Pt,
        flags,
        false,
        &&mem,
    )
    .unwrap();
    assert_eq!(pt.translate(shared_alias), Some(PhysAddr(0x4020_3000)));
    // Every level on the way carries U, as a nested walk requires.
    let mut table = pt.root();
    for level in [Level::Pml4, Level::Pdpt, Level::Pd] {
        // SAFETY: the root, then the tables its pointers name.
        let entry = Pte(unsafe { mem.load(table, level.index_of(shared_alias)) });
        assert!(
            entry.flags().contains(PteFlags::USER),
            "{level:?} pointer lacks U"
        );
        table = CcMask::NONE.table_addr(entry);
    }
    assert_eq!(
        pt.translate(VirtAddr(0x20_3000)),
        None,
        "the private alias is separate"
    );
}

/// next_leaf walks a range with one entry read per leaf inside a table and a
/// walk from the root where a table ends; the spans it yields take updates
/// with no walk, and a span made stale by a split (or an unmap) is refused
/// at the first entry that is no longer its leaf, with nothing after it
/// touched.
#[test]
fn next_leaf_and_spans_read_each_entry_once_and_refuse_stale_spans() {
    let mem = SimMemory::new(PhysAddr(0x100_0000), 16);
    let pt = tables(&mem, PagingMode::FourLevel, CcMask::tdx(48).unwrap());
    let base = 0xffff_8880_0000_0000u64;
    // 4K leaves at the end of one page table, then a 2M leaf after it.
    for i in 508..512u64 {
        let va = VirtAddr(base + i * PAGE_SIZE);
        pt.map_leaf(
            va,
            PhysAddr(i * PAGE_SIZE),
            Level::Pt,
            kernel_rw(),
            false,
            &&mem,
        )
        .unwrap();
    }
    pt.map_leaf(
        VirtAddr(base + MIB2),
        PhysAddr(MIB2),
        Level::Pd,
        kernel_rw(),
        false,
        &&mem,
    )
    .unwrap();
    let first = pt.lookup_address(VirtAddr(base + 508 * PAGE_SIZE)).unwrap();
    let reads = mem.reads();
    let mut leaf = first;
    let mut span = LeafSpan::of(&first);
    for _ in 0..3 {
        leaf = pt.next_leaf(&leaf).unwrap();
        assert!(span.extend(&leaf));
    }
    assert_eq!(mem.reads() - reads, 3, "one read per leaf inside the table");
    assert_eq!(span.count(), 4);
    // Entry 511 ends the table: a walk from the root (PML4, PDPT, PD).
    let reads = mem.reads();
    let large = pt.next_leaf(&leaf).unwrap();
    assert_eq!(mem.reads() - reads, 3);
    assert_eq!(
        (large.level(), large.va),
        (Level::Pd, VirtAddr(base + MIB2))
    );
    assert!(!span.extend(&large), "another table, another span");

    let clear = |e: Pte| Pte(e.0 & !PteFlags::PRESENT.bits());
    pt.update_span(&span, clear).unwrap();
    for i in 508..512u64 {
        assert_eq!(pt.translate(VirtAddr(base + i * PAGE_SIZE)), None);
    }
    // The 2M leaf split after its span was taken: the span is stale.
    let stale = LeafSpan::of(&large);
    pt.split(&large, &&mem).unwrap();
    let before = mem.snapshot();
    assert_eq!(pt.update_span(&stale, clear), Err(VirtAddr(base + MIB2)));
    assert_eq!(
        mem.snapshot(),
        before,
        "nothing written through a stale span"
    );
    // An entry of a 4K span unmapped: refused there, earlier ones done.
    let set = |e: Pte| Pte(e.0 | PteFlags::PRESENT.bits());
    pt.unmap_leaf(VirtAddr(base + 510 * PAGE_SIZE)).unwrap();
    assert_eq!(
        pt.update_span(&span, set),
        Err(VirtAddr(base + 510 * PAGE_SIZE))
    );
    assert!(pt.translate(VirtAddr(base + 509 * PAGE_SIZE)).is_some());
    assert!(pt
        .lookup_address(VirtAddr(base + 511 * PAGE_SIZE))
        .is_ok_and(|l| !l.entry.is_present()));
}

/// The entry updates write only leaves where leaves are: an update that
/// would turn a 2M leaf into a table pointer (which walks follow) is
/// refused, and so is a leaf found in other tables.
#[test]
fn updates_never_make_a_large_leaf_a_table_pointer() {
    let mem = SimMemory::new(PhysAddr(0x10_0000_0000), 16);
    let pt = tables(&mem, PagingMode::FourLevel, CcMask::NONE);
    let va = VirtAddr(0xffff_8880_0020_0000);
    pt.map_leaf(
        va,
        PhysAddr(0x4020_0000),
        Level::Pd,
        kernel_rw(),
        false,
        &&mem,
    )
    .unwrap();
    let leaf = pt.lookup_address(va).unwrap();
    let pointer = |e: Pte| Pte(e.0 & !PteFlags::HUGE_PAGE.bits());
    assert_eq!(pt.update_leaf(&leaf, pointer), Err(TableError::BadLeaf));
    let span = LeafSpan::of(&leaf);
    assert_eq!(pt.update_span(&span, pointer), Err(va));
    assert_eq!(
        pt.lookup_address(va).unwrap().entry,
        leaf.entry,
        "unchanged"
    );
    // Clearing PRESENT, or zeroing, keeps it a leaf (or nothing).
    pt.update_leaf(&leaf, |e| Pte(e.0 & !PteFlags::PRESENT.bits()))
        .unwrap();
    // A leaf of other tables is refused.
    let other = tables(&mem, PagingMode::FourLevel, CcMask::NONE);
    let stale = pt.lookup_address(va).unwrap();
    assert_eq!(other.update_leaf(&stale, |e| e), Err(TableError::BadLeaf));
    assert_eq!(other.split(&stale, &&mem), Err(TableError::BadLeaf));
}
