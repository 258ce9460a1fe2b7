//! Physical memory and the kernel's own page tables.
//!
//! Layout (virtual):
//! - `DIRECT_MAP_BASE + pa`: every RAM frame, 2M leaves where a whole aligned
//!   2M block is RAM, 4K leaves at the edges. The engine converts these.
//! - the kernel image, identity-mapped with 4K leaves: text RX, rodata R,
//!   data/bss RW (no page is both writable and executable).
//! - how APs start, identity-mapped: the AP trampoline page and the local
//!   APIC (INIT-SIPI), or the ACPI wakeup mailbox (a TD, which has neither).
//! - per-CPU stacks at `STACKS_BASE`, each below an unmapped guard page.
//! - `VMALLOC_BASE`: second mappings of frames (see `vmalloc`).
//!
//! Nothing else is mapped: address 0 faults.

use coco_pagetable::{
    CcMask, Level, PageTables, PagingMode, PhysAddr, PteFlags, TableAllocator, TableError,
    VirtAddr, PAGE_SIZE,
};
use core::sync::atomic::{AtomicU64, Ordering};
use spin::Mutex;

/// Where the direct map starts.
pub const DIRECT_MAP_BASE: u64 = 0xffff_8880_0000_0000;
/// Per-CPU stack area.
pub const STACKS_BASE: u64 = 0xffff_fe00_0000_0000;
/// Stack slot per CPU: kernel stack, #DF stack, NMI stack, each with a guard.
pub const STACK_SLOT: u64 = 1 << 20;
/// Kernel stack size.
pub const KERNEL_STACK: u64 = 128 * 1024;
/// #DF and NMI stack size.
pub const IST_STACK: u64 = 16 * 1024;
/// Local APIC MMIO (identity-mapped, uncached).
pub const LAPIC_BASE: u64 = 0xfee0_0000;
/// The page APs start in (real mode: below 1 MiB).
pub const TRAMPOLINE_PAGE: u64 = 0x8000;
/// The boot identity map covers `[0, IDENTITY_MAPPED_END)` (bare/src/boot.rs);
/// no frame from it up is handed out.
pub const IDENTITY_MAPPED_END: u64 = 4 << 30;
/// Frames below this are never handed out (BIOS data, trampoline, boot info).
pub const LOW_MEMORY_END: u64 = 0x10_0000;

/// Added to a physical address to reach it: 0 while the boot identity map is
/// live, `DIRECT_MAP_BASE` once our tables are loaded.
static PHYS_OFFSET: AtomicU64 = AtomicU64::new(0);

/// A physical address as a pointer, through the current mapping of RAM.
pub fn phys_to_virt(pa: u64) -> u64 {
    pa + PHYS_OFFSET.load(Ordering::Relaxed)
}

/// Page-table memory through the direct map (or, before it exists, the
/// boot identity map): `PHYS_OFFSET` says which.
pub type DirectMap = coco_pagetable::OffsetTableMemory;
/// The kernel's page-table memory.
// SAFETY: every table frame (the boot tables' and every frame FRAMES hands
// out, all below IDENTITY_MAPPED_END) is mapped read-write at `physical +
// PHYS_OFFSET`: at 0 by the boot identity map of the low 4 GiB, and at
// DIRECT_MAP_BASE by our own tables, which direct-map all RAM and are loaded
// before PHYS_OFFSET changes (`switch_to`). Entries are only accessed
// atomically, here and by the CPU's walker.
pub const DIRECT_MAP: DirectMap = unsafe { DirectMap::with_shared_offset(&PHYS_OFFSET) };

/// Usable RAM, as the boot memory map says.
#[derive(Clone, Copy)]
pub struct RamRegion {
    pub start: u64,
    pub end: u64,
}

/// Hands out 4K frames: a bump pointer through the RAM regions, and a stack
/// of frames given back.
pub struct FrameAllocator {
    inner: Mutex<AllocatorState>,
}

const MAX_RAM_REGIONS: usize = 16;
const FREED_CAPACITY: usize = 1024;

struct AllocatorState {
    regions: [RamRegion; MAX_RAM_REGIONS],
    region_count: usize,
    current: usize,
    next: u64,
    freed: [u64; FREED_CAPACITY],
    freed_count: usize,
    allocated: u64,
}

impl FrameAllocator {
    pub const fn new() -> Self {
        FrameAllocator {
            inner: Mutex::new(AllocatorState {
                regions: [RamRegion { start: 0, end: 0 }; MAX_RAM_REGIONS],
                region_count: 0,
                current: 0,
                next: 0,
                freed: [0; FREED_CAPACITY],
                freed_count: 0,
                allocated: 0,
            }),
        }
    }

    /// Adds RAM `[start, end)`, minus low memory, `[reserved_start,
    /// reserved_end)` and anything from 4 GiB up: frames are handed out
    /// while the boot identity map (the low 4 GiB) is how RAM is reached.
    pub fn add_ram(&self, start: u64, end: u64, reserved_start: u64, reserved_end: u64) {
        let start = align_up(start.max(LOW_MEMORY_END), PAGE_SIZE);
        let end = (end & !(PAGE_SIZE - 1)).min(IDENTITY_MAPPED_END);
        let mut state = self.inner.lock();
        for (s, e) in [
            (start, end.min(reserved_start)),
            (start.max(reserved_end), end),
        ] {
            if s < e && state.region_count < MAX_RAM_REGIONS {
                let n = state.region_count;
                state.regions[n] = RamRegion { start: s, end: e };
                state.region_count += 1;
            }
        }
        if state.next == 0 && state.region_count > 0 {
            state.next = state.regions[0].start;
        }
    }

    /// A frame, contents undefined.
    pub fn allocate(&self) -> Option<u64> {
        let mut state = self.inner.lock();
        if state.freed_count > 0 {
            state.freed_count -= 1;
            state.allocated += 1;
            return Some(state.freed[state.freed_count]);
        }
        while state.current < state.region_count {
            let region = state.regions[state.current];
            if state.next < region.start {
                state.next = region.start;
            }
            if state.next + PAGE_SIZE <= region.end {
                let frame = state.next;
                state.next += PAGE_SIZE;
                state.allocated += 1;
                return Some(frame);
            }
            state.current += 1;
        }
        None
    }

    /// A zeroed frame.
    pub fn allocate_zeroed(&self) -> Option<u64> {
        let frame = self.allocate()?;
        // SAFETY: the frame is RAM we just took off the allocator, so no one
        // else uses it, and RAM is mapped at phys_to_virt.
        unsafe { core::ptr::write_bytes(phys_to_virt(frame) as *mut u8, 0, PAGE_SIZE as usize) };
        Some(frame)
    }

    /// Gives a frame back. A frame that does not fit the free stack leaks
    /// (never double-hands it out).
    pub fn free(&self, frame: u64) {
        let mut state = self.inner.lock();
        if state.freed_count < FREED_CAPACITY {
            let n = state.freed_count;
            state.freed[n] = frame;
            state.freed_count += 1;
            state.allocated -= 1;
        }
    }

    /// Frames handed out and not given back.
    pub fn allocated(&self) -> u64 {
        self.inner.lock().allocated
    }
}

// SAFETY: the frames are RAM below IDENTITY_MAPPED_END that DIRECT_MAP
// reaches, handed out once until freed (the allocator's free list).
unsafe impl TableAllocator for FrameAllocator {
    fn allocate_table(&self) -> Option<PhysAddr> {
        self.allocate().map(PhysAddr)
    }
    unsafe fn free_table(&self, frame: PhysAddr) {
        self.free(frame.0)
    }
}

/// The kernel's frame allocator.
pub static FRAMES: FrameAllocator = FrameAllocator::new();

pub const fn align_up(value: u64, align: u64) -> u64 {
    (value + align - 1) & !(align - 1)
}

extern "C" {
    static __kernel_start: u8;
    static __rodata_start: u8;
    static __data_start: u8;
    static __kernel_end: u8;
}

fn symbol(s: &u8) -> u64 {
    s as *const u8 as u64
}

/// The kernel image `[start, end)`.
pub fn kernel_image() -> (u64, u64) {
    // SAFETY: only the addresses of these linker symbols are taken.
    unsafe { (symbol(&__kernel_start), symbol(&__kernel_end)) }
}

/// Page tables of the kernel (the one address space).
pub type KernelTables = PageTables<DirectMap>;

fn global_rw() -> PteFlags {
    PteFlags::PRESENT | PteFlags::WRITABLE | PteFlags::NO_EXECUTE | PteFlags::GLOBAL
}

/// Builds the kernel's tables (while the boot identity map is live) and
/// returns their root. `ram` lists RAM regions; `cpus` how many stack slots;
/// `ap_start` says which pages outside RAM the kernel reaches at VA == PA.
pub fn build_tables(
    ram: &[RamRegion],
    cc: CcMask,
    cpus: usize,
    ap_start: super::ApStartMethod,
) -> Result<PhysAddr, TableError> {
    let root = PhysAddr(
        FRAMES
            .allocate_zeroed()
            .ok_or(TableError::OutOfTableMemory)?,
    );
    // SAFETY: a zeroed root from FRAMES, built up here through these tables.
    let tables = unsafe { PageTables::new(DIRECT_MAP, root, PagingMode::FourLevel, cc) };
    let mib2 = Level::Pd.entry_span();

    for region in ram {
        let mut pa = align_up(region.start, PAGE_SIZE);
        while pa + PAGE_SIZE <= region.end {
            let va = VirtAddr(DIRECT_MAP_BASE + pa);
            if pa & (mib2 - 1) == 0 && pa + mib2 <= region.end {
                tables.map_leaf(va, PhysAddr(pa), Level::Pd, global_rw(), false, &FRAMES)?;
                pa += mib2;
            } else {
                tables.map_leaf(va, PhysAddr(pa), Level::Pt, global_rw(), false, &FRAMES)?;
                pa += PAGE_SIZE;
            }
        }
    }

    // SAFETY: only the addresses of the linker symbols are taken.
    let (start, rodata, data, end) = unsafe {
        (
            symbol(&__kernel_start),
            symbol(&__rodata_start),
            symbol(&__data_start),
            symbol(&__kernel_end),
        )
    };
    let mut pa = start;
    while pa < end {
        let flags = if pa < rodata {
            PteFlags::PRESENT | PteFlags::GLOBAL
        } else if pa < data {
            PteFlags::PRESENT | PteFlags::NO_EXECUTE | PteFlags::GLOBAL
        } else {
            global_rw()
        };
        tables.map_leaf(VirtAddr(pa), PhysAddr(pa), Level::Pt, flags, false, &FRAMES)?;
        pa += PAGE_SIZE;
    }

    let identity = |pa: u64, flags: PteFlags| {
        tables.map_leaf(VirtAddr(pa), PhysAddr(pa), Level::Pt, flags, false, &FRAMES)
    };
    match ap_start {
        super::ApStartMethod::InitSipi => {
            // The AP trampoline executes here with our CR3 loaded.
            identity(TRAMPOLINE_PAGE, PteFlags::PRESENT | PteFlags::WRITABLE)?;
            let mmio = global_rw() | PteFlags::NO_CACHE | PteFlags::WRITE_THROUGH;
            identity(LAPIC_BASE, mmio)?;
        }
        // A TD has no xAPIC page and no real mode: only the mailbox, which
        // is private firmware memory (ordinary write-back, like RAM).
        super::ApStartMethod::WakeupMailbox {
            mailbox: Some(page),
        } => {
            identity(page, global_rw())?;
        }
        super::ApStartMethod::WakeupMailbox { mailbox: None }
        | super::ApStartMethod::SnpApCreation => {}
    }

    for cpu in 0..cpus as u64 {
        for (offset, size) in stack_layout() {
            let base = STACKS_BASE + cpu * STACK_SLOT + offset;
            for page in 0..size / PAGE_SIZE {
                let frame = FRAMES
                    .allocate_zeroed()
                    .ok_or(TableError::OutOfTableMemory)?;
                tables.map_leaf(
                    VirtAddr(base + page * PAGE_SIZE),
                    PhysAddr(frame),
                    Level::Pt,
                    global_rw(),
                    false,
                    &FRAMES,
                )?;
            }
        }
    }
    Ok(root)
}

/// (offset in the slot, size) of the kernel, #DF and NMI stacks. Each starts
/// one page above the previous end: the gap is the guard page.
const fn stack_layout() -> [(u64, u64); 3] {
    let kernel = PAGE_SIZE;
    let double_fault = kernel + KERNEL_STACK + PAGE_SIZE;
    let nmi = double_fault + IST_STACK + PAGE_SIZE;
    [
        (kernel, KERNEL_STACK),
        (double_fault, IST_STACK),
        (nmi, IST_STACK),
    ]
}

/// Top of `cpu`'s kernel, #DF and NMI stacks.
pub fn stack_tops(cpu: usize) -> (u64, u64, u64) {
    let slot = STACKS_BASE + cpu as u64 * STACK_SLOT;
    let [k, d, n] = stack_layout();
    (slot + k.0 + k.1, slot + d.0 + d.1, slot + n.0 + n.1)
}

/// The guard page below `cpu`'s kernel stack.
pub fn stack_guard(cpu: usize) -> u64 {
    STACKS_BASE + cpu as u64 * STACK_SLOT
}

/// Loads our tables and from then on reaches RAM through the direct map.
///
/// # Safety
/// `root` must come from [`build_tables`]: it maps the kernel image (code,
/// the boot stack in .bss) identically, so execution continues.
pub unsafe fn switch_to(root: PhysAddr, cc: CcMask) {
    // SAFETY: by the caller's contract the new tables map everything that
    // runs next; RAM is then reached through the direct map. The root is
    // private: under SEV the C-bit goes in CR3 too.
    unsafe { bare::cpu::write_cr3(root.0 | cc.private_bits()) };
    PHYS_OFFSET.store(DIRECT_MAP_BASE, Ordering::SeqCst);
    bare::cpu::enable_global_pages();
    bare::cpu::flush_tlb_local();
}

/// The kernel's tables, after the switch.
pub fn kernel_tables(cc: CcMask) -> KernelTables {
    // SAFETY: CR3 holds the root `build_tables` made (`switch_to` loaded
    // it): frames DIRECT_MAP reaches, changed only by atomic writes.
    unsafe {
        PageTables::new(
            DIRECT_MAP,
            PhysAddr(bare::cpu::read_cr3() & 0x000f_ffff_ffff_f000 & !cc.all()),
            PagingMode::FourLevel,
            cc,
        )
    }
}
