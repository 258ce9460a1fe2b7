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

/// Where the SEV-SNP PVALIDATE windows start (`snp::ValidationWindow`):
/// CPU n's 4K one is the page at `VALIDATE_WINDOWS + n * 8K + 4K`, its 2M
/// one the block at `VALIDATE_WINDOWS_2M + n * 4M + 2M`, each behind a
/// never-mapped gap of its own size, so that a load running off the end of
/// whatever precedes it cannot reach it. Writable (the page is zeroed
/// through it) and private.
pub const VALIDATE_WINDOWS: u64 = 0xffff_fd00_8000_0000;
pub const VALIDATE_WINDOWS_2M: u64 = 0xffff_fd00_c000_0000;

/// CLFLUSH line size, read at boot (CPUID is a #VE in a TD: not during a
/// conversion).
static LINE_SIZE: AtomicU64 = AtomicU64::new(0);
/// The page table of the 4K windows and the page directory of the 2M ones
/// (physical; 0 before `init`).
static WINDOW_TABLE_4K: AtomicU64 = AtomicU64::new(0);
static WINDOW_TABLE_2M: AtomicU64 = AtomicU64::new(0);
static VALIDATE_TABLE_4K: AtomicU64 = AtomicU64::new(0);
static VALIDATE_TABLE_2M: AtomicU64 = AtomicU64::new(0);
/// Pages step 4 flushed, all CPUs.
pub static FLUSHED_PAGES: AtomicU64 = AtomicU64::new(0);

/// Reads the line size and creates the tables that hold every CPU's
/// windows (mapping and unmapping CPU 0's once), so that step 4 never walks
/// or allocates: a window is then one entry write and one INVLPG. Boot CPU,
/// before any conversion.
pub fn init(cc: CcMask) -> Result<(), TableError> {
    LINE_SIZE.store(bare::cpu::clflush_line_size(), Ordering::SeqCst);
    for (size, purpose, table) in [
        (Level::Pt, Purpose::Flush, &WINDOW_TABLE_4K),
        (Level::Pd, Purpose::Flush, &WINDOW_TABLE_2M),
        (Level::Pt, Purpose::Validate, &VALIDATE_TABLE_4K),
        (Level::Pd, Purpose::Validate, &VALIDATE_TABLE_2M),
    ] {
        let va = VirtAddr(window_address(purpose, size, 0));
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

/// What a window is for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// Step 4: read-only, in the frame's current state.
    Flush,
    /// SNP's PVALIDATE and zeroing: private and writable, behind a gap.
    Validate,
}

/// `cpu`'s window of `size` for `purpose`.
fn window_address(purpose: Purpose, size: Level, cpu: usize) -> u64 {
    let span = size.entry_span();
    match (purpose, size) {
        (Purpose::Flush, Level::Pt) => FLUSH_WINDOWS + cpu as u64 * span,
        (Purpose::Flush, _) => FLUSH_WINDOWS_2M + cpu as u64 * span,
        (Purpose::Validate, Level::Pt) => VALIDATE_WINDOWS + (2 * cpu as u64 + 1) * span,
        (Purpose::Validate, _) => VALIDATE_WINDOWS_2M + (2 * cpu as u64 + 1) * span,
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
        Window::map_for(Purpose::Flush, cpu, frame, size, shared, cc)
    }

    /// `cpu`'s PVALIDATE window (SEV-SNP) mapping `frame` (4K or a 2M
    /// block) private and writable. Only `cpu` itself may call this.
    pub fn map_for_validation(
        cpu: usize,
        frame: PhysAddr,
        size: Level,
        cc: CcMask,
    ) -> Result<Window, TableError> {
        Window::map_for(Purpose::Validate, cpu, frame, size, false, cc)
    }

    fn map_for(
        purpose: Purpose,
        cpu: usize,
        frame: PhysAddr,
        size: Level,
        shared: bool,
        cc: CcMask,
    ) -> Result<Window, TableError> {
        let table = match (purpose, size) {
            (Purpose::Flush, Level::Pt) => &WINDOW_TABLE_4K,
            (Purpose::Flush, Level::Pd) => &WINDOW_TABLE_2M,
            (Purpose::Validate, Level::Pt) => &VALIDATE_TABLE_4K,
            (Purpose::Validate, Level::Pd) => &VALIDATE_TABLE_2M,
            _ => return Err(TableError::BadLeaf),
        };
        let table = PhysAddr(table.load(Ordering::SeqCst));
        let span = size.entry_span();
        if cpu >= MAX_CPUS || table.0 == 0 || !frame.is_aligned(span) || frame.0 & cc.all() != 0 {
            return Err(TableError::BadLeaf);
        }
        let va = VirtAddr(window_address(purpose, size, cpu));
        let index = size.index_of(va);
        // ACCESSED (and for a writable window DIRTY) preset: the CPU never
        // writes the entry, so drop's compare-exchange sees exactly what
        // this wrote.
        let writable = if purpose == Purpose::Validate {
            (PteFlags::WRITABLE | PteFlags::DIRTY).bits()
        } else {
            0
        };
        let mut entry = writable
            | frame.0
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
