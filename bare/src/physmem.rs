//! Page-table memory as both bare-metal programs reach it: RAM at a fixed
//! offset from its physical address (0 under the boot identity map, the
//! direct-map base once a kernel has its own tables).

use coco_pagetable::{PhysAddr, TableMemory};
use core::sync::atomic::{AtomicU64, Ordering};

/// Table entries at `physical + offset`, the offset read from a static so a
/// kernel can move from the identity map to its direct map.
#[derive(Clone, Copy)]
pub struct MappedTables {
    offset: &'static AtomicU64,
}

impl MappedTables {
    /// Tables reached through `offset`. Whoever changes `offset` must keep
    /// every page-table frame mapped at the new value from then on.
    pub const fn new(offset: &'static AtomicU64) -> MappedTables {
        MappedTables { offset }
    }

    fn entry(&self, table: PhysAddr, index: usize) -> &'static AtomicU64 {
        let address = table.0 + self.offset.load(Ordering::Relaxed) + (index as u64 & 511) * 8;
        // SAFETY: `table` is a page-table frame (the root, or a pointer read
        // from or written to these tables), it is RAM, and RAM stays mapped
        // at `physical + offset` for the life of the program (`new`'s
        // contract). Entries are 8-byte aligned and only ever accessed
        // atomically, by the program and by the CPU's page walker.
        unsafe { AtomicU64::from_ptr(address as *mut u64) }
    }
}

impl TableMemory for MappedTables {
    fn load(&self, table: PhysAddr, index: usize) -> u64 {
        self.entry(table, index).load(Ordering::SeqCst)
    }
    fn compare_exchange(
        &self,
        table: PhysAddr,
        index: usize,
        current: u64,
        new: u64,
    ) -> Result<u64, u64> {
        self.entry(table, index)
            .compare_exchange(current, new, Ordering::SeqCst, Ordering::SeqCst)
    }
    fn store_unpublished(&self, table: PhysAddr, index: usize, value: u64) {
        self.entry(table, index).store(value, Ordering::SeqCst)
    }
}
