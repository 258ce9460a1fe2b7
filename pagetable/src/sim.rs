//! Test doubles: simulated physical memory for page tables, and a frame
//! allocator over it. They let host tests run the real walker, splitter and
//! engine. Std-based; enabled by the `sim` feature.
#![allow(unsafe_code)] // the TableMemory/TableAllocator impls, each with its SAFETY

use crate::addr::{PhysAddr, PAGE_SIZE};
use crate::level::ENTRIES_PER_TABLE;
use crate::tables::{TableAllocator, TableMemory};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Called before every write to table memory with (table, index, old, new).
/// A model checker uses it as a scheduling point.
pub type WriteHook = Box<dyn Fn(PhysAddr, usize, u64, u64) + Send + Sync>;

/// `frames` 4K frames of table memory at physical addresses
/// `base .. base + frames * 4K`, all zero, plus a free list over them.
pub struct SimMemory {
    base: u64,
    words: Vec<AtomicU64>,
    free: Mutex<Vec<PhysAddr>>,
    writes: AtomicUsize,
    reads: AtomicUsize,
    hook: Mutex<Option<std::sync::Arc<WriteHook>>>,
}

impl SimMemory {
    /// A memory of `frames` frames starting at `base` (page aligned).
    pub fn new(base: PhysAddr, frames: usize) -> SimMemory {
        assert!(
            base.is_aligned(PAGE_SIZE),
            "sim memory base must be page aligned"
        );
        let words = (0..frames * ENTRIES_PER_TABLE)
            .map(|_| AtomicU64::new(0))
            .collect();
        let free = (0..frames)
            .rev()
            .map(|n| PhysAddr(base.0 + n as u64 * PAGE_SIZE))
            .collect();
        SimMemory {
            base: base.0,
            words,
            free: Mutex::new(free),
            writes: AtomicUsize::new(0),
            reads: AtomicUsize::new(0),
            hook: Mutex::new(None),
        }
    }

    fn word(&self, table: PhysAddr, index: usize) -> &AtomicU64 {
        assert!(
            index < ENTRIES_PER_TABLE,
            "entry index {index} out of range"
        );
        let frame = table
            .0
            .checked_sub(self.base)
            .map(|off| off / PAGE_SIZE)
            .filter(|&n| table.is_aligned(PAGE_SIZE) && (n as usize) < self.frames())
            .unwrap_or_else(|| panic!("table {table:?} is not simulated table memory"));
        &self.words[frame as usize * ENTRIES_PER_TABLE + index]
    }

    /// Number of frames.
    pub fn frames(&self) -> usize {
        self.words.len() / ENTRIES_PER_TABLE
    }

    /// Every word of table memory: compare two snapshots to prove nothing
    /// was written.
    pub fn snapshot(&self) -> Vec<u64> {
        self.words
            .iter()
            .map(|w| w.load(Ordering::SeqCst))
            .collect()
    }

    /// Number of successful writes so far.
    pub fn writes(&self) -> usize {
        self.writes.load(Ordering::SeqCst)
    }

    /// Number of entry reads ([`TableMemory::load`]) so far: with
    /// [`SimMemory::writes`], what a walk or a conversion costs, counted.
    pub fn reads(&self) -> usize {
        self.reads.load(Ordering::SeqCst)
    }

    /// Frames still free.
    pub fn free_frames(&self) -> usize {
        self.free.lock().unwrap().len()
    }

    /// Installs a hook run before every write (replacing any earlier one).
    pub fn set_write_hook(&self, hook: Option<WriteHook>) {
        *self.hook.lock().unwrap() = hook.map(std::sync::Arc::new);
    }

    fn before_write(&self, table: PhysAddr, index: usize, old: u64, new: u64) {
        let hook = self.hook.lock().unwrap().clone();
        if let Some(hook) = hook {
            hook(table, index, old, new);
        }
    }

    /// Takes a zeroed frame off the free list (for building tables in tests).
    pub fn allocate_zeroed(&self) -> PhysAddr {
        let frame = self.allocate_table().expect("sim memory exhausted");
        for i in 0..ENTRIES_PER_TABLE {
            self.word(frame, i).store(0, Ordering::SeqCst);
        }
        frame
    }
}

// SAFETY: every access is an atomic on the simulated word (`word` panics
// for a frame outside the simulated memory rather than touch anything else).
unsafe impl TableMemory for SimMemory {
    unsafe fn load(&self, table: PhysAddr, index: usize) -> u64 {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.word(table, index).load(Ordering::SeqCst)
    }

    unsafe fn compare_exchange(
        &self,
        table: PhysAddr,
        index: usize,
        current: u64,
        new: u64,
    ) -> Result<u64, u64> {
        self.before_write(table, index, current, new);
        let result = self.word(table, index).compare_exchange(
            current,
            new,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
        if result.is_ok() {
            self.writes.fetch_add(1, Ordering::SeqCst);
        }
        result
    }

    unsafe fn store_unpublished(&self, table: PhysAddr, index: usize, value: u64) {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.word(table, index).store(value, Ordering::SeqCst);
    }
}

// SAFETY: its frames are its own simulated ones, each on the free list at
// most once while free.
unsafe impl TableAllocator for SimMemory {
    fn allocate_table(&self) -> Option<PhysAddr> {
        self.free.lock().unwrap().pop()
    }

    unsafe fn free_table(&self, frame: PhysAddr) {
        self.free.lock().unwrap().push(frame);
    }
}

/// Lets one simulated memory be shared by the engine, the hooks and a test.
// SAFETY: forwards to `T`.
unsafe impl<T: TableMemory + ?Sized> TableMemory for std::sync::Arc<T> {
    unsafe fn load(&self, table: PhysAddr, index: usize) -> u64 {
        // SAFETY: the caller's promise, passed on.
        unsafe { (**self).load(table, index) }
    }
    unsafe fn compare_exchange(
        &self,
        table: PhysAddr,
        index: usize,
        current: u64,
        new: u64,
    ) -> Result<u64, u64> {
        // SAFETY: the caller's promise, passed on.
        unsafe { (**self).compare_exchange(table, index, current, new) }
    }
    unsafe fn store_unpublished(&self, table: PhysAddr, index: usize, value: u64) {
        // SAFETY: the caller's promise, passed on.
        unsafe { (**self).store_unpublished(table, index, value) }
    }
}

// SAFETY: forwards to `T`.
unsafe impl<T: TableAllocator + ?Sized> TableAllocator for std::sync::Arc<T> {
    fn allocate_table(&self) -> Option<PhysAddr> {
        (**self).allocate_table()
    }
    unsafe fn free_table(&self, frame: PhysAddr) {
        // SAFETY: the caller's promise, passed on.
        unsafe { (**self).free_table(frame) }
    }
}
