//! Working beside the [`x86_64`] crate (feature `x86_64`): conversions
//! between its address, frame, page and flag types and this crate's, and
//! [`LockedFrameAllocator`], which lends its frame allocators to the tables.
//!
//! Conversions into this crate's types never fail. Conversions into the
//! `x86_64` crate's are `TryFrom` where it rejects values this crate holds:
//! a virtual address canonical only with 5-level paging, a physical address
//! above bit 51, flag bits it has no name for or an unaligned frame.
//!
//! Two rules for a kernel that also uses the `x86_64` crate's page tables:
//! - While a range converts, no `OffsetPageTable` (or other mapper) may
//!   change its entries or the tables above them: the engine reserves the
//!   range against other conversions only, and the mapper writes entries
//!   without compare-exchange. Map and unmap elsewhere, or between
//!   conversions.
//! - The TLB flush of the conversion's step 3 must drop global entries too:
//!   `x86_64::instructions::tlb::flush_all` reloads CR3, which keeps them.
//!   Toggle CR4.PGE (or use INVPCID type 2) on every CPU.
#![allow(unsafe_code)] // the TableAllocator impl, with its SAFETY

use crate::addr::{PhysAddr, VirtAddr};
use crate::entry::PteFlags;
use crate::tables::TableAllocator;
use x86_64::structures::paging::{
    FrameAllocator, Page, PageSize, PageTableFlags, PhysFrame, Size4KiB,
};

impl From<x86_64::PhysAddr> for PhysAddr {
    fn from(addr: x86_64::PhysAddr) -> Self {
        PhysAddr(addr.as_u64())
    }
}

impl TryFrom<PhysAddr> for x86_64::PhysAddr {
    type Error = x86_64::addr::PhysAddrNotValid;
    /// Fails for an address with bits 52 and above set.
    fn try_from(addr: PhysAddr) -> Result<Self, Self::Error> {
        x86_64::PhysAddr::try_new(addr.0)
    }
}

impl From<x86_64::VirtAddr> for VirtAddr {
    fn from(addr: x86_64::VirtAddr) -> Self {
        VirtAddr(addr.as_u64())
    }
}

impl TryFrom<VirtAddr> for x86_64::VirtAddr {
    type Error = x86_64::addr::VirtAddrNotValid;
    /// Fails for an address not canonical with 4-level paging (the
    /// `x86_64` crate knows no other), e.g. one with bit 47 set and bits
    /// 63..48 clear.
    fn try_from(addr: VirtAddr) -> Result<Self, Self::Error> {
        x86_64::VirtAddr::try_new(addr.0)
    }
}

/// Why an address is no frame or page of the `x86_64` crate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// Not a valid address for it (see the address conversions).
    Invalid(u64),
    /// Not aligned to the frame or page size.
    Unaligned(u64),
}

impl<S: PageSize> From<PhysFrame<S>> for PhysAddr {
    fn from(frame: PhysFrame<S>) -> Self {
        frame.start_address().into()
    }
}

impl<S: PageSize> TryFrom<PhysAddr> for PhysFrame<S> {
    type Error = FrameError;
    fn try_from(addr: PhysAddr) -> Result<Self, Self::Error> {
        let start = x86_64::PhysAddr::try_from(addr).map_err(|_| FrameError::Invalid(addr.0))?;
        PhysFrame::from_start_address(start).map_err(|_| FrameError::Unaligned(addr.0))
    }
}

impl<S: PageSize> From<Page<S>> for VirtAddr {
    fn from(page: Page<S>) -> Self {
        page.start_address().into()
    }
}

impl<S: PageSize> TryFrom<VirtAddr> for Page<S> {
    type Error = FrameError;
    fn try_from(addr: VirtAddr) -> Result<Self, Self::Error> {
        let start = x86_64::VirtAddr::try_from(addr).map_err(|_| FrameError::Invalid(addr.0))?;
        Page::from_start_address(start).map_err(|_| FrameError::Unaligned(addr.0))
    }
}

impl From<PteFlags> for PageTableFlags {
    /// Every bit kept: the `x86_64` crate names each bit this crate does.
    fn from(flags: PteFlags) -> Self {
        PageTableFlags::from_bits_retain(flags.bits())
    }
}

/// Flag bits [`PteFlags`] does not name: the software-available bits 9-11
/// and 52-62 (bit 9 marks shared pages where a platform has no C/S bit,
/// [`crate::SOFTWARE_SHARED_BIT`]), or anything outside the flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnnamedFlags(pub u64);

impl TryFrom<PageTableFlags> for PteFlags {
    type Error = UnnamedFlags;
    fn try_from(flags: PageTableFlags) -> Result<Self, Self::Error> {
        PteFlags::from_bits(flags.bits())
            .ok_or(UnnamedFlags(flags.bits() & !PteFlags::all().bits()))
    }
}

/// An `x86_64` crate frame allocator, locked, as the tables' and the
/// conversion engine's [`TableAllocator`] (which every CPU calls through a
/// shared reference).
///
/// Frames given back (a conversion returns the ones it reserved for a
/// split but did not use) are kept in a small list and handed out first;
/// `FrameAllocator` cannot take frames back, so one more than the list
/// holds is counted in [`LockedFrameAllocator::leaked`] and never used again.
pub struct LockedFrameAllocator<A> {
    inner: spin::Mutex<Inner<A>>,
}

struct Inner<A> {
    allocator: A,
    returned: [Option<PhysAddr>; RETURNED_KEPT],
    leaked: u64,
}

/// How many given-back frames are kept for reuse (a conversion reserves at
/// most four, two splits at each end).
const RETURNED_KEPT: usize = 8;

impl<A> LockedFrameAllocator<A> {
    /// Wraps `allocator`.
    ///
    /// # Safety
    /// The frames `allocator` hands out are RAM the tables' [`crate::TableMemory`]
    /// reaches (for [`crate::OffsetTableMemory`]: mapped at its offset).
    /// That they are unused is the `FrameAllocator`'s own promise.
    pub const unsafe fn new(allocator: A) -> Self {
        LockedFrameAllocator {
            inner: spin::Mutex::new(Inner {
                allocator,
                returned: [None; RETURNED_KEPT],
                leaked: 0,
            }),
        }
    }

    /// Frames given back that the list had no room for.
    pub fn leaked(&self) -> u64 {
        self.inner.lock().leaked
    }

    /// Runs `f` on the wrapped allocator (e.g. to hand it to an
    /// `OffsetPageTable::map_to` between conversions).
    pub fn with<R>(&self, f: impl FnOnce(&mut A) -> R) -> R {
        f(&mut self.inner.lock().allocator)
    }
}

// SAFETY: a frame handed out is unused (`FrameAllocator`'s contract) and
// reachable through the tables' memory (`new`'s), or one given back, which
// `free_table`'s caller promised is allocated here and not linked; each is
// kept at most once, so none is handed out twice.
unsafe impl<A: FrameAllocator<Size4KiB>> TableAllocator for LockedFrameAllocator<A> {
    fn allocate_table(&self) -> Option<PhysAddr> {
        let mut inner = self.inner.lock();
        if let Some(frame) = inner.returned.iter_mut().find_map(Option::take) {
            return Some(frame);
        }
        inner.allocator.allocate_frame().map(PhysAddr::from)
    }

    unsafe fn free_table(&self, frame: PhysAddr) {
        let mut inner = self.inner.lock();
        // A frame given back twice is kept once: handing it out twice
        // would put two tables in one frame.
        if inner.returned.contains(&Some(frame)) {
            return;
        }
        match inner.returned.iter_mut().find(|slot| slot.is_none()) {
            Some(slot) => *slot = Some(frame),
            None => inner.leaked += 1,
        }
    }
}
