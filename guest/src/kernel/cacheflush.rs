//! Step 4 on this machine: CLFLUSH through a per-CPU window.
//!
//! At step 4 the range's own entries are non-present (that is what steps 2
//! and 3 are for), so its lines cannot be flushed through them. Each CPU
//! owns a 4K and a 2M window that it maps, for itself only, to one frame
//! (or one whole 2M block) at a time in its current state (private before
//! a private->shared conversion), flushes its lines and unmaps again: one
//! entry write and one INVLPG, no walk (the tables are found once, at
//! boot). The mapping
//! agrees with the hypervisor's view of the frame, so it raises no #VE; no
//! other CPU ever uses the window, so invalidating this CPU's entry is
//! enough. WBINVD is not an option: it is a #VE in a TD, and it would flush
//! only this CPU's caches.

use super::memory::{kernel_tables, DIRECT_MAP, FRAMES};
use super::shootdown::MAX_CPUS;
use coco_pagetable::{CcMask, Level, PhysAddr, PteFlags, TableError, TableMemory, VirtAddr};
use core::sync::atomic::{AtomicU64, Ordering};
use set_memory_enc::GpaRun;

/// Where the 4K windows start: CPU n's is the page at `FLUSH_WINDOWS + n *
/// 4K`. All of them share one page table, created by [`init`].
pub const FLUSH_WINDOWS: u64 = 0xffff_fd00_0000_0000;
/// Where the 2M windows start: CPU n's is at `FLUSH_WINDOWS_2M + n * 2M`,
/// all in one page directory, created by [`init`]. A whole 2M-aligned block
/// of a run is flushed through one of these: one entry, not 512.
pub const FLUSH_WINDOWS_2M: u64 = 0xffff_fd00_4000_0000;

/// CLFLUSH line size, read at boot (CPUID is a #VE in a TD: not during a
/// conversion).
static LINE_SIZE: AtomicU64 = AtomicU64::new(0);
/// The page table of the 4K windows and the page directory of the 2M ones
/// (physical; 0 before `init`).
static WINDOW_TABLE_4K: AtomicU64 = AtomicU64::new(0);
static WINDOW_TABLE_2M: AtomicU64 = AtomicU64::new(0);
/// Pages step 4 flushed, all CPUs.
pub static FLUSHED_PAGES: AtomicU64 = AtomicU64::new(0);

/// Reads the line size and creates the tables that hold every CPU's
/// windows (mapping and unmapping CPU 0's once), so that step 4 never walks
/// or allocates: a window is then one entry write and one INVLPG. Boot CPU,
/// before any conversion.
pub fn init(cc: CcMask) -> Result<(), TableError> {
    LINE_SIZE.store(bare::cpu::clflush_line_size(), Ordering::SeqCst);
    for (size, table) in [(Level::Pt, &WINDOW_TABLE_4K), (Level::Pd, &WINDOW_TABLE_2M)] {
        let va = VirtAddr(window_base(size));
        let tables = kernel_tables(cc);
        tables.map_leaf(
            va,
            PhysAddr(0),
            size,
            PteFlags::PRESENT | PteFlags::NO_EXECUTE,
            false,
            &FRAMES,
        )?;
        let leaf = tables.unmap_leaf(va)?;
        bare::cpu::invlpg(va.0);
        table.store(leaf.table().0, Ordering::SeqCst);
    }
    Ok(())
}

fn window_base(size: Level) -> u64 {
    if size == Level::Pt {
        FLUSH_WINDOWS
    } else {
        FLUSH_WINDOWS_2M
    }
}

/// One frame (4K) or block (2M) mapped, read-only, at one CPU's window;
/// unmapped on drop.
pub struct Window {
    va: VirtAddr,
    table: PhysAddr,
    index: usize,
    entry: u64,
}

impl Window {
    /// Maps the 4K `frame` at `cpu`'s window, shared or private as `shared`
    /// says. Only `cpu` itself may call this, and not from an interrupt
    /// handler (one mapping per window at a time: a second one is refused).
    pub fn map(
        cpu: usize,
        frame: PhysAddr,
        shared: bool,
        cc: CcMask,
    ) -> Result<Window, TableError> {
        Window::map_sized(cpu, frame, Level::Pt, shared, cc)
    }

    /// [`Window::map`] for a 4K frame or a 2M-aligned block (`size`
    /// [`Level::Pt`] or [`Level::Pd`]).
    pub fn map_sized(
        cpu: usize,
        frame: PhysAddr,
        size: Level,
        shared: bool,
        cc: CcMask,
    ) -> Result<Window, TableError> {
        let table = match size {
            Level::Pt => &WINDOW_TABLE_4K,
            Level::Pd => &WINDOW_TABLE_2M,
            _ => return Err(TableError::BadLeaf),
        };
        let table = PhysAddr(table.load(Ordering::SeqCst));
        let span = size.entry_span();
        if cpu >= MAX_CPUS || table.0 == 0 || !frame.is_aligned(span) || frame.0 & cc.all() != 0 {
            return Err(TableError::BadLeaf);
        }
        let va = VirtAddr(window_base(size) + cpu as u64 * span);
        let index = size.index_of(va);
        // ACCESSED preset: the CPU never writes the entry, so drop's
        // compare-exchange sees exactly what this wrote.
        let mut entry = frame.0
            | if shared {
                cc.shared_bits()
            } else {
                cc.private_bits()
            }
            | (PteFlags::PRESENT | PteFlags::NO_EXECUTE | PteFlags::ACCESSED).bits();
        if size == Level::Pd {
            entry |= PteFlags::HUGE_PAGE.bits();
        }
        // No stale translation to drop: the entry was empty, and `drop`
        // invalidated the last one.
        // SAFETY: `table` is the window's page table, a table of the
        // kernel's tables (found by `init`'s walk of them, never freed).
        unsafe { DIRECT_MAP.compare_exchange(table, index, 0, entry) }
            .map_err(|_| TableError::AlreadyMapped { va, level: size })?;
        Ok(Window {
            va,
            table,
            index,
            entry,
        })
    }

    /// The window's address.
    pub fn address(&self) -> u64 {
        self.va.0
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        // Only this CPU writes its window's entry, and the CPU never does
        // (ACCESSED preset, no write access): it still holds `entry`. Only
        // this CPU can hold a translation of it.
        // SAFETY: the window's page table, as in `map`.
        let _ = unsafe { DIRECT_MAP.compare_exchange(self.table, self.index, self.entry, 0) };
        bare::cpu::invlpg(self.va.0);
    }
}

/// Writes back and invalidates, in every cache, the lines of `run`'s frames,
/// which are `shared` or private now: through the 2M window for each whole
/// 2M-aligned block, through the 4K one for the rest.
pub fn flush_frames(run: &GpaRun, shared: bool, cc: CcMask) {
    let cpu = super::cpu_index();
    let line_size = match LINE_SIZE.load(Ordering::Relaxed) {
        0 => panic!("cacheflush::init did not run"),
        size => size,
    };
    let block = Level::Pd.entry_span();
    let (mut at, end) = (run.gpa.0, run.gpa_end().0);
    while at < end {
        let size = if at % block == 0 && end - at >= block {
            Level::Pd
        } else {
            Level::Pt
        };
        let window = match Window::map_sized(cpu, PhysAddr(at), size, shared, cc) {
            Ok(window) => window,
            Err(e) => panic!("flush window of CPU {cpu}: {e:?}"),
        };
        let bytes = size.entry_span();
        // SAFETY: the window maps these `bytes` just now (read-only is
        // enough: CLFLUSH checks permissions as a read).
        unsafe { bare::cpu::clflush_lines(window.address(), bytes, line_size) };
        at += bytes;
    }
    FLUSHED_PAGES.fetch_add(run.pages(), Ordering::Relaxed);
}
