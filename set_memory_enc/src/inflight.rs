//! The table of conversions in progress. It makes overlapping conversions
//! fail with `Busy` instead of interleaving their steps, lets disjoint ones run
//! concurrently, and implements the kexec-style stop (Linux 6.11's
//! `set_memory_enc_stop_conversion()`).
//!
//! A lock bit guards the slots; the slots are atomics only so that this needs
//! no `unsafe`: every access to them happens with the lock bit held.

use core::hint::spin_loop;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// How many conversions may be in progress at once (one per CPU is typical).
pub const MAX_IN_FLIGHT: usize = 64;

/// Why a range could not be reserved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReserveError {
    Overlaps { start: u64, end: u64 },
    Stopped,
    Full,
}

pub(crate) struct InFlight {
    lock: AtomicBool,
    stopped: AtomicBool,
    /// `[start, end)` per slot; `start == end == 0` is a free slot (a real
    /// range is never empty).
    slots: [(AtomicU64, AtomicU64); MAX_IN_FLIGHT],
}

struct LockGuard<'a>(&'a AtomicBool);

impl Drop for LockGuard<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl InFlight {
    pub(crate) const fn new() -> Self {
        InFlight {
            lock: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            slots: [const { (AtomicU64::new(0), AtomicU64::new(0)) }; MAX_IN_FLIGHT],
        }
    }

    fn lock(&self) -> LockGuard<'_> {
        while self
            .lock
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            spin_loop();
        }
        LockGuard(&self.lock)
    }

    /// Records `[start, end)` as being converted, unless it overlaps a
    /// conversion in progress or conversions are stopped.
    pub(crate) fn reserve(&self, start: u64, end: u64) -> Result<Reservation<'_>, ReserveError> {
        let _guard = self.lock();
        if self.stopped.load(Ordering::Relaxed) {
            return Err(ReserveError::Stopped);
        }
        let mut free = None;
        for (index, (slot_start, slot_end)) in self.slots.iter().enumerate() {
            let (s, e) = (
                slot_start.load(Ordering::Relaxed),
                slot_end.load(Ordering::Relaxed),
            );
            if s == e {
                free.get_or_insert(index);
            } else if s < end && start < e {
                return Err(ReserveError::Overlaps { start: s, end: e });
            }
        }
        let index = free.ok_or(ReserveError::Full)?;
        self.slots[index].0.store(start, Ordering::Relaxed);
        self.slots[index].1.store(end, Ordering::Relaxed);
        Ok(Reservation { table: self, index })
    }

    /// Refuses new conversions from now on and waits for those in progress.
    pub(crate) fn stop(&self) {
        {
            let _guard = self.lock();
            self.stopped.store(true, Ordering::Relaxed);
        }
        while !self.is_idle() {
            spin_loop();
        }
    }

    pub(crate) fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    fn is_idle(&self) -> bool {
        let _guard = self.lock();
        self.slots
            .iter()
            .all(|(s, e)| s.load(Ordering::Relaxed) == e.load(Ordering::Relaxed))
    }
}

/// A reserved range; released on drop.
pub(crate) struct Reservation<'a> {
    table: &'a InFlight,
    index: usize,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let _guard = self.table.lock();
        self.table.slots[self.index].0.store(0, Ordering::Relaxed);
        self.table.slots[self.index].1.store(0, Ordering::Relaxed);
    }
}
