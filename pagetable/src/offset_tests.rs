//! Host tests of the table memory a kernel with a physical-memory offset
//! uses, and of the `x86_64` crate interop: over real (host) memory, which
//! takes `unsafe` the rest of the crate's tests do not need.

use crate::*;

fn kernel_rw() -> PteFlags {
    PteFlags::PRESENT | PteFlags::WRITABLE | PteFlags::NO_EXECUTE | PteFlags::GLOBAL
}

/// Page-aligned host memory standing in for physical RAM at `PHYS_BASE`:
/// `offset()` is what a kernel's physical-memory offset would be.
struct HostRam {
    base: *mut u8,
    frames: usize,
}

const PHYS_BASE: u64 = 0x10_0000;

impl HostRam {
    fn new(frames: usize) -> HostRam {
        let layout = std::alloc::Layout::from_size_align(frames * 4096, 4096).unwrap();
        // SAFETY: a non-zero size with a valid alignment.
        let base = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!base.is_null());
        HostRam { base, frames }
    }
    fn offset(&self) -> u64 {
        (self.base as u64).wrapping_sub(PHYS_BASE)
    }
    fn frame(&self, n: usize) -> PhysAddr {
        assert!(n < self.frames);
        PhysAddr(PHYS_BASE + n as u64 * 4096)
    }
    fn word(&self, frame: usize, index: usize) -> u64 {
        // SAFETY: inside the allocation (checked), 8-byte aligned.
        unsafe { *(self.base.add(frame * 4096 + index * 8) as *const u64) }
    }
}

impl Drop for HostRam {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.frames * 4096, 4096).unwrap();
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.base, layout) };
    }
}

/// Hands out frames 1.. of a `HostRam` (frame 0 is the root).
struct Bump<'a> {
    ram: &'a HostRam,
    next: std::sync::atomic::AtomicUsize,
}

// SAFETY: frames 1.. of the test's host RAM, each handed out once, all
// reached by the tests' OffsetTableMemory.
unsafe impl TableAllocator for Bump<'_> {
    fn allocate_table(&self) -> Option<PhysAddr> {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        (n < self.ram.frames).then(|| self.ram.frame(n))
    }
    unsafe fn free_table(&self, _frame: PhysAddr) {}
}

#[test]
fn offset_table_memory_reaches_entries_at_physical_plus_offset() {
    let ram = HostRam::new(8);
    // SAFETY: every frame the tables use is one of `ram`'s, alive for the
    // test and mapped at `physical + ram.offset()`.
    let memory = unsafe { OffsetTableMemory::new(ram.offset()) };
    let frame = ram.frame(2);
    // SAFETY (these five): frame 2 is one of the tables' frames here.
    unsafe { memory.store_unpublished(frame, 5, 0xabc) };
    assert_eq!(ram.word(2, 5), 0xabc);
    assert_eq!(unsafe { memory.load(frame, 5) }, 0xabc);
    assert_eq!(
        unsafe { memory.compare_exchange(frame, 5, 1, 2) },
        Err(0xabc)
    );
    assert_eq!(
        unsafe { memory.compare_exchange(frame, 5, 0xabc, 7) },
        Ok(0xabc)
    );
    // An index wraps inside its table, never into the next frame.
    assert_eq!(unsafe { memory.load(frame, 512 + 5) }, 7);
    assert_eq!(ram.word(3, 5), 0);

    // A walker over it: map, make non-present, still found.
    let alloc = Bump {
        ram: &ram,
        next: 3.into(),
    };
    // SAFETY: frame 0 is a zeroed root in `ram`, whose frames `memory` reaches.
    let pt = unsafe { PageTables::new(memory, ram.frame(0), PagingMode::FourLevel, CcMask::NONE) };
    let va = VirtAddr(0xffff_8880_0020_3000);
    pt.map_leaf(
        va,
        PhysAddr(0x4321_0000),
        Level::Pt,
        kernel_rw(),
        false,
        &alloc,
    )
    .unwrap();
    let leaf = pt.lookup_address(va).unwrap();
    assert_eq!(
        ram.word(0, 273) & (ADDR_FIELD | PteFlags::PRESENT.bits()),
        ram.frame(3).0 | 1,
        "the PML4 entry, in frame 0, points to frame 3"
    );
    pt.update_leaf(&leaf, |e| Pte(e.0 & !PteFlags::PRESENT.bits()))
        .unwrap();
    let leaf = pt.lookup_address(va).unwrap();
    assert!(!leaf.entry.is_present());
    assert_eq!(
        CcMask::NONE.leaf_frame(leaf.entry, leaf.level()),
        PhysAddr(0x4321_0000)
    );

    // A shared offset is read at every access: a kernel moving to its
    // direct map moves its table memory with it.
    static OFFSET: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    OFFSET.store(ram.offset(), std::sync::atomic::Ordering::SeqCst);
    // SAFETY: as above for every value OFFSET holds while `moving` is used.
    let moving = unsafe { OffsetTableMemory::with_shared_offset(&OFFSET) };
    // SAFETY: frames 1 and 2 are the test's table frames.
    assert_eq!(unsafe { moving.load(ram.frame(2), 5) }, 7);
    OFFSET.store(ram.offset() + 4096, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(moving.offset(), ram.offset() + 4096);
    // SAFETY: as above.
    assert_eq!(
        unsafe { moving.load(ram.frame(1), 5) },
        7,
        "frame 1 now reads frame 2"
    );
}

#[cfg(feature = "x86_64")]
mod x86_64_interop {
    use super::*;
    use crate::x86_64_interop::{FrameError, LockedFrameAllocator, UnnamedFlags};
    use x86_64::structures::paging::{
        FrameAllocator, Mapper, OffsetPageTable, Page, PageTable, PageTableFlags, PhysFrame,
        Size1GiB, Size2MiB, Size4KiB,
    };

    #[test]
    fn addresses_frames_and_pages_convert_where_both_can_hold_them() {
        let pa = x86_64::PhysAddr::new(0x000f_ffff_ffff_f000);
        assert_eq!(PhysAddr::from(pa), PhysAddr(0x000f_ffff_ffff_f000));
        assert_eq!(
            x86_64::PhysAddr::try_from(PhysAddr::from(pa)).ok(),
            Some(pa)
        );
        assert!(x86_64::PhysAddr::try_from(PhysAddr(1 << 52)).is_err());

        let va = x86_64::VirtAddr::new(0xffff_8880_0000_0000);
        assert_eq!(VirtAddr::from(va), VirtAddr(0xffff_8880_0000_0000));
        assert_eq!(
            x86_64::VirtAddr::try_from(VirtAddr::from(va)).ok(),
            Some(va)
        );
        // Canonical with 5-level paging only: bit 47 set, 63..48 clear.
        assert!(x86_64::VirtAddr::try_from(VirtAddr(0x0000_8000_0000_0000)).is_err());

        let frame = PhysFrame::<Size2MiB>::try_from(PhysAddr(0x4020_0000)).unwrap();
        assert_eq!(PhysAddr::from(frame), PhysAddr(0x4020_0000));
        assert_eq!(
            PhysFrame::<Size1GiB>::try_from(PhysAddr(0x4020_0000)),
            Err(FrameError::Unaligned(0x4020_0000))
        );
        assert_eq!(
            PhysFrame::<Size4KiB>::try_from(PhysAddr(1 << 60)),
            Err(FrameError::Invalid(1 << 60))
        );
        let page = Page::<Size4KiB>::try_from(VirtAddr(0xffff_8880_0000_3000)).unwrap();
        assert_eq!(VirtAddr::from(page), VirtAddr(0xffff_8880_0000_3000));
        assert_eq!(
            Page::<Size4KiB>::try_from(VirtAddr(0xffff_8880_0000_3008)),
            Err(FrameError::Unaligned(0xffff_8880_0000_3008))
        );
        assert_eq!(
            Page::<Size4KiB>::try_from(VirtAddr(0x0000_8000_0000_0000)),
            Err(FrameError::Invalid(0x0000_8000_0000_0000))
        );
    }

    #[test]
    fn flags_convert_and_unnamed_bits_are_refused() {
        let ours = kernel_rw() | PteFlags::USER | PteFlags::DIRTY;
        let theirs = PageTableFlags::from(ours);
        assert_eq!(
            theirs,
            PageTableFlags::PRESENT
                | PageTableFlags::WRITABLE
                | PageTableFlags::NO_EXECUTE
                | PageTableFlags::GLOBAL
                | PageTableFlags::USER_ACCESSIBLE
                | PageTableFlags::DIRTY
        );
        assert_eq!(PteFlags::try_from(theirs), Ok(ours));
        // Bit 9 would mark the page shared where no C/S bit exists.
        assert_eq!(
            PteFlags::try_from(PageTableFlags::PRESENT | PageTableFlags::BIT_9),
            Err(UnnamedFlags(1 << 9))
        );
        assert_eq!(
            PteFlags::try_from(PageTableFlags::BIT_52 | PageTableFlags::BIT_62),
            Err(UnnamedFlags((1 << 52) | (1 << 62)))
        );
    }

    /// A blog_os-style frame allocator: frames of `HostRam` from `next` on.
    struct BootFrames<'a> {
        ram: &'a HostRam,
        next: usize,
    }

    // SAFETY: each frame is handed out once and is unused RAM of the test.
    unsafe impl FrameAllocator<Size4KiB> for BootFrames<'_> {
        fn allocate_frame(&mut self) -> Option<PhysFrame> {
            let frame = (self.next < self.ram.frames).then(|| self.ram.frame(self.next))?;
            self.next += 1;
            PhysFrame::try_from(frame).ok()
        }
    }

    #[test]
    fn locked_allocator_reuses_given_back_frames_and_counts_the_rest() {
        let ram = HostRam::new(16);
        // SAFETY: BootFrames hands out `ram`'s frames, which the tests'
        // OffsetTableMemory reaches.
        let frames = unsafe { LockedFrameAllocator::new(BootFrames { ram: &ram, next: 1 }) };
        let a = frames.allocate_table().unwrap();
        assert_eq!(a, ram.frame(1));
        unsafe { frames.free_table(a) };
        assert_eq!(
            frames.allocate_table(),
            Some(a),
            "given back, handed out again"
        );
        let taken: Vec<_> = (0..9).map(|_| frames.allocate_table().unwrap()).collect();
        assert_eq!(taken[0], ram.frame(2));
        for frame in &taken {
            // SAFETY: allocated above, never linked, given back once.
            unsafe { frames.free_table(*frame) };
        }
        assert_eq!(frames.leaked(), 1, "8 kept, the 9th leaked");
        let mut again: Vec<_> = (0..8).map(|_| frames.allocate_table().unwrap()).collect();
        again.sort();
        assert_eq!(
            again,
            taken[..8].to_vec(),
            "each kept frame handed out once"
        );
        assert_eq!(
            frames.allocate_table(),
            Some(ram.frame(11)),
            "then the allocator's"
        );
        assert_eq!(frames.with(|boot| boot.next), 12);
        while frames.allocate_table().is_some() {}
        assert_eq!(frames.with(|boot| boot.next), 16, "exhausted: None");
    }

    /// What a kernel with the x86_64 crate has (an `OffsetPageTable` over its
    /// physical-memory offset, a boot frame allocator) is what this crate
    /// needs: its mappings are found by this crate's walker, the same frame
    /// allocator serves both, and this crate's changes are seen by its.
    #[test]
    fn tables_an_offset_page_table_built_are_walked_and_changed_here() {
        use x86_64::structures::paging::mapper::{Translate, TranslateResult};
        let ram = HostRam::new(16);
        // SAFETY: BootFrames hands out `ram`'s frames, which the tests'
        // OffsetTableMemory reaches.
        let frames = unsafe { LockedFrameAllocator::new(BootFrames { ram: &ram, next: 1 }) };
        let offset = x86_64::VirtAddr::new(ram.offset());
        let root = ram.frame(0);
        // A mapper over the tables, made when it is used and dropped before
        // this crate touches them: its `&mut PageTable` must be the only
        // way to them while it lives.
        let mapper = || {
            // SAFETY: frame 0 is a table at `physical + offset`, all of `ram`
            // is mapped at that offset, and no other reference to it lives
            // while the mapper does (each use below ends before `pt` runs).
            unsafe {
                let level_4 = &mut *((root.0 + ram.offset()) as *mut PageTable);
                OffsetPageTable::new(level_4, offset)
            }
        };
        let page = Page::<Size4KiB>::try_from(VirtAddr(0xffff_c900_0000_5000)).unwrap();
        let buffer = PhysFrame::<Size4KiB>::try_from(PhysAddr(0x7654_3000)).unwrap();
        let flags = PageTableFlags::PRESENT | PageTableFlags::WRITABLE;
        frames.with(|boot| {
            // SAFETY: the frame is not mapped anywhere else.
            unsafe { mapper().map_to(page, buffer, flags, boot) }
                .unwrap()
                .ignore()
        });

        // SAFETY: as for the mapper above.
        let memory = unsafe { OffsetTableMemory::new(offset.as_u64()) };
        // SAFETY: the mapper built a hierarchy of `ram`'s frames at `root`; no
        // mapper lives while `pt` reads or changes it.
        let pt = unsafe { PageTables::new(memory, root, PagingMode::FourLevel, CcMask::NONE) };
        let leaf = pt.lookup_address(page.into()).unwrap();
        assert_eq!(leaf.level(), Level::Pt);
        assert_eq!(
            CcMask::NONE.leaf_frame(leaf.entry, leaf.level()),
            buffer.into()
        );
        assert_eq!(
            PageTableFlags::from(leaf.entry.flags()),
            flags,
            "the flags the mapper wrote"
        );
        // A mapping made here, with the same allocator, in a new table.
        let va = VirtAddr(0xffff_c900_4000_0000);
        pt.map_leaf(
            va,
            PhysAddr(0x1_0000_0000),
            Level::Pd,
            kernel_rw(),
            false,
            &frames,
        )
        .unwrap();
        let ours = x86_64::VirtAddr::try_from(va).unwrap();
        assert_eq!(
            mapper().translate_addr(ours + 0x1234u64),
            Some(x86_64::PhysAddr::new(0x1_0000_1234))
        );
        // Made non-present here: the mapper sees PRESENT gone (its
        // translate() reports any non-zero entry as mapped, with its flags);
        // we still see the frame.
        pt.update_leaf(&leaf, |e| Pte(e.0 & !PteFlags::PRESENT.bits()))
            .unwrap();
        match mapper().translate(page.start_address()) {
            TranslateResult::Mapped { frame, flags, .. } => {
                assert_eq!(frame.start_address(), buffer.start_address());
                assert!(!flags.contains(PageTableFlags::PRESENT), "{flags:?}");
            }
            other => panic!("{other:?}"),
        }
        let leaf = pt.lookup_address(page.into()).unwrap();
        assert_eq!(
            CcMask::NONE.leaf_frame(leaf.entry, leaf.level()),
            buffer.into()
        );
    }
}
