//! A vmalloc-style area: second virtual mappings of frames that the direct
//! map already maps. Freed areas are unmapped lazily, as Linux's vmalloc
//! does, so a freed area can still alias a frame that is about to be
//! converted. Step 1 of a conversion purges those (`purge_lazy_aliases`).

use super::memory::{DirectMap, FRAMES};
use coco_pagetable::{CcMask, Level, PageTables, PhysAddr, PteFlags, VirtAddr, PAGE_SIZE};
use spin::Mutex;

/// Start of the area.
pub const VMALLOC_BASE: u64 = 0xffff_c900_0000_0000;
const VMALLOC_END: u64 = VMALLOC_BASE + (1 << 30);
const MAX_AREAS: usize = 64;

#[derive(Clone, Copy)]
struct Area {
    va: u64,
    pa: u64,
    pages: u64,
    /// Freed by its user but still mapped, waiting for a purge.
    lazily_freed: bool,
}

struct Areas {
    slots: [Option<Area>; MAX_AREAS],
    next_va: u64,
    purged: u64,
}

static AREAS: Mutex<Areas> = Mutex::new(Areas {
    slots: [None; MAX_AREAS],
    next_va: VMALLOC_BASE,
    purged: 0,
});

/// Why a mapping was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmapError {
    NoSlot,
    NoAddressSpace,
    Map(coco_pagetable::TableError),
}

fn tables(cc: CcMask) -> PageTables<DirectMap> {
    super::memory::kernel_tables(cc)
}

/// Maps `pages` frames from `pa` a second time, private, read-write. Areas
/// are separated by an unmapped guard page.
pub fn vmap(pa: u64, pages: u64, cc: CcMask) -> Result<VirtAddr, VmapError> {
    let mut areas = AREAS.lock();
    let slot = areas
        .slots
        .iter()
        .position(Option::is_none)
        .ok_or(VmapError::NoSlot)?;
    let va = areas.next_va;
    let end = va + (pages + 1) * PAGE_SIZE;
    if end > VMALLOC_END {
        return Err(VmapError::NoAddressSpace);
    }
    let flags = PteFlags::PRESENT | PteFlags::WRITABLE | PteFlags::NO_EXECUTE | PteFlags::GLOBAL;
    let tables = tables(cc);
    for page in 0..pages {
        let at = VirtAddr(va + page * PAGE_SIZE);
        tables
            .map_leaf(
                at,
                PhysAddr(pa + page * PAGE_SIZE),
                Level::Pt,
                flags,
                false,
                &FRAMES,
            )
            .map_err(VmapError::Map)?;
    }
    areas.next_va = end;
    areas.slots[slot] = Some(Area {
        va,
        pa,
        pages,
        lazily_freed: false,
    });
    Ok(VirtAddr(va))
}

/// Frees the area at `va` lazily: it stays mapped until a purge.
pub fn vunmap_lazy(va: VirtAddr) {
    let mut areas = AREAS.lock();
    for area in areas.slots.iter_mut().flatten() {
        if area.va == va.0 {
            area.lazily_freed = true;
        }
    }
}

/// Step 1 of a conversion: unmaps every lazily freed area that maps a frame
/// in `[gpa_start, gpa_end)`. The TLB flush of step 3 removes stale
/// translations. Returns how many areas were purged.
pub fn purge_lazy_aliases(gpa_start: u64, gpa_end: u64, cc: CcMask) -> u64 {
    let mut areas = AREAS.lock();
    let tables = tables(cc);
    let mut purged = 0;
    for slot in areas.slots.iter_mut() {
        let Some(area) = *slot else { continue };
        let overlaps = area.pa < gpa_end && gpa_start < area.pa + area.pages * PAGE_SIZE;
        if area.lazily_freed && overlaps {
            for page in 0..area.pages {
                // Already unmapped is fine: the goal is "not mapped".
                let _ = tables.unmap_leaf(VirtAddr(area.va + page * PAGE_SIZE));
            }
            *slot = None;
            purged += 1;
        }
    }
    areas.purged += purged;
    purged
}

/// Areas purged so far.
pub fn purged_total() -> u64 {
    AREAS.lock().purged
}

/// Unmaps one page of an area at once (tests: make the next page absent).
pub fn unmap_page(va: VirtAddr, cc: CcMask) -> Result<(), coco_pagetable::TableError> {
    tables(cc).unmap_leaf(va).map(|_| ())
}
