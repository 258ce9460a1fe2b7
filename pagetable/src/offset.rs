//! Table memory for a kernel that maps all physical memory at an offset (a
//! direct map, or the identity map with offset 0): what most kernels have,
//! so none of them needs a [`TableMemory`] of its own.
#![allow(unsafe_code)]

use crate::addr::PhysAddr;
use crate::tables::TableMemory;
use core::sync::atomic::{AtomicU64, Ordering};

/// Page-table entries read and written at `physical + offset`.
///
/// The offset is fixed ([`OffsetTableMemory::new`]), or read from a static
/// at every access ([`OffsetTableMemory::with_shared_offset`]) for a kernel
/// that moves from the boot identity map to its own direct map.
#[derive(Clone, Copy, Debug)]
pub struct OffsetTableMemory {
    offset: Offset,
}

#[derive(Clone, Copy, Debug)]
enum Offset {
    Fixed(u64),
    Shared(&'static AtomicU64),
}

impl OffsetTableMemory {
    /// Tables at `physical + offset` (x86_64 crate users: the
    /// `physical_memory_offset` a bootloader reports, `offset.as_u64()`).
    ///
    /// # Safety
    /// For as long as the value (or a copy) is used, every page-table frame
    /// of the hierarchies it serves, and every frame their allocator hands
    /// out, must be RAM mapped readable and writable at `physical + offset`,
    /// and no one may access those frames but atomically (the CPU's page
    /// walker included); a kernel's mapper (an `OffsetPageTable`) may
    /// change them only while nothing uses this value.
    pub const unsafe fn new(offset: u64) -> OffsetTableMemory {
        OffsetTableMemory {
            offset: Offset::Fixed(offset),
        }
    }

    /// Tables at `physical + offset.load()`, the offset read at each access.
    ///
    /// # Safety
    /// As for [`OffsetTableMemory::new`], for every value `offset` holds
    /// while the value is used: whoever changes it must have every table
    /// frame mapped at the new value first.
    pub const unsafe fn with_shared_offset(offset: &'static AtomicU64) -> OffsetTableMemory {
        OffsetTableMemory {
            offset: Offset::Shared(offset),
        }
    }

    /// The offset now.
    pub fn offset(&self) -> u64 {
        match self.offset {
            Offset::Fixed(offset) => offset,
            Offset::Shared(offset) => offset.load(Ordering::Relaxed),
        }
    }

    /// The entry, as an atomic.
    ///
    /// # Safety
    /// `table` is a page-table frame of the hierarchy this memory serves
    /// (TableMemory's contract on its callers).
    unsafe fn entry(&self, table: PhysAddr, index: usize) -> &AtomicU64 {
        // The index wraps inside the table: no access ever leaves its frame.
        let within = (index as u64 % 512) * 8;
        let address = (table.0 & !0xfff).wrapping_add(self.offset()) + within;
        // SAFETY: `table` is a page-table frame (this function's contract),
        // so by the constructor's contract it is RAM mapped read-write at
        // `physical + offset` while `self` is used, and only accessed
        // atomically. An entry is 8-byte aligned (a page-aligned frame plus
        // a multiple of 8) and lies inside that frame.
        unsafe { AtomicU64::from_ptr(address as *mut u64) }
    }
}

// SAFETY: each method is one SeqCst atomic access to entry `index` of the
// table at `table`, through the mapping the constructor's contract provides.
unsafe impl TableMemory for OffsetTableMemory {
    unsafe fn load(&self, table: PhysAddr, index: usize) -> u64 {
        // SAFETY: the caller names a table frame (TableMemory's contract).
        unsafe { self.entry(table, index) }.load(Ordering::SeqCst)
    }
    unsafe fn compare_exchange(
        &self,
        table: PhysAddr,
        index: usize,
        current: u64,
        new: u64,
    ) -> Result<u64, u64> {
        // SAFETY: as for `load`.
        unsafe { self.entry(table, index) }.compare_exchange(
            current,
            new,
            Ordering::SeqCst,
            Ordering::SeqCst,
        )
    }
    unsafe fn store_unpublished(&self, table: PhysAddr, index: usize, value: u64) {
        // SAFETY: as for `load`.
        unsafe { self.entry(table, index) }.store(value, Ordering::SeqCst)
    }
}
