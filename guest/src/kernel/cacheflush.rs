//! Step 4 on this machine: CLFLUSH through a per-CPU window.
//!
//! At step 4 the range's own entries are non-present (that is what steps 2
//! and 3 are for), so its lines cannot be flushed through them. Each CPU
//! owns a one-page window that it maps, for itself only, to one frame at a
//! time in the frame's current state (private before a private->shared
//! conversion), flushes that page's lines and unmaps again. The mapping
//! agrees with the hypervisor's view of the frame, so it raises no #VE; no
//! other CPU ever uses the window, so invalidating this CPU's entry is
//! enough. WBINVD is not an option: it is a #VE in a TD, and it would flush
//! only this CPU's caches.

use super::memory::{kernel_tables, FRAMES};
use super::shootdown::MAX_CPUS;
use core::sync::atomic::{AtomicU64, Ordering};
use pagetable::{CcMask, Level, PhysAddr, PteFlags, TableError, VirtAddr, PAGE_SIZE};
use set_memory_enc::GpaRun;

/// Where the windows start: CPU n's is the page at `FLUSH_WINDOWS + n * 4K`.
/// All of them share one page table, created by [`init`].
pub const FLUSH_WINDOWS: u64 = 0xffff_fd00_0000_0000;

/// CLFLUSH line size, read at boot (CPUID is a #VE in a TD: not during a
/// conversion).
static LINE_SIZE: AtomicU64 = AtomicU64::new(0);
/// Pages step 4 flushed, all CPUs.
pub static FLUSHED_PAGES: AtomicU64 = AtomicU64::new(0);

/// Reads the line size and creates the page table that holds every CPU's
/// window, so that step 4 never allocates. Boot CPU, before any conversion.
pub fn init(cc: CcMask) -> Result<(), TableError> {
    LINE_SIZE.store(bare::cpu::clflush_line_size(), Ordering::SeqCst);
    let first = Window::map(0, PhysAddr(0), false, cc)?;
    drop(first);
    Ok(())
}

/// One frame mapped, read-only, at one CPU's window; unmapped on drop.
pub struct Window {
    va: VirtAddr,
    cc: CcMask,
}

impl Window {
    /// Maps `frame` at `cpu`'s window, shared or private as `shared` says.
    /// Only `cpu` itself may call this, and not from an interrupt handler
    /// (one mapping per window at a time: a second one is refused).
    pub fn map(
        cpu: usize,
        frame: PhysAddr,
        shared: bool,
        cc: CcMask,
    ) -> Result<Window, TableError> {
        if cpu >= MAX_CPUS {
            return Err(TableError::BadLeaf);
        }
        let va = VirtAddr(FLUSH_WINDOWS + cpu as u64 * PAGE_SIZE);
        kernel_tables(cc).map_leaf(
            va,
            frame,
            Level::Pt,
            PteFlags::PRESENT | PteFlags::NO_EXECUTE,
            shared,
            &FRAMES,
        )?;
        // No stale translation to drop: the entry was empty, and `drop`
        // invalidated the last one.
        Ok(Window { va, cc })
    }

    /// The window's address.
    pub fn address(&self) -> u64 {
        self.va.0
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        // Mapped by `map`, so it can only be found. Only this CPU can hold a
        // translation of it.
        let _ = kernel_tables(self.cc).unmap_leaf(self.va);
        bare::cpu::invlpg(self.va.0);
    }
}

/// Writes back and invalidates, in every cache, the lines of `run`'s frames,
/// which are `shared` or private now.
pub fn flush_frames(run: &GpaRun, shared: bool, cc: CcMask) {
    let cpu = super::cpu_index();
    let line_size = match LINE_SIZE.load(Ordering::Relaxed) {
        0 => panic!("cacheflush::init did not run"),
        size => size,
    };
    for page in 0..run.pages() {
        let frame = PhysAddr(run.gpa.0 + page * PAGE_SIZE);
        let window = match Window::map(cpu, frame, shared, cc) {
            Ok(window) => window,
            Err(e) => panic!("flush window of CPU {cpu}: {e:?}"),
        };
        // SAFETY: the window maps the page just now (read-only is enough:
        // CLFLUSH checks permissions as a read).
        unsafe { bare::cpu::clflush_lines(window.address(), PAGE_SIZE, line_size) };
    }
    FLUSHED_PAGES.fetch_add(run.pages(), Ordering::Relaxed);
}
