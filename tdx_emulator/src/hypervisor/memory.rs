//! The emulator's own memory (the boot identity map, a bump allocator) and
//! the TD's: guest-physical `[0, bytes)` backed by host-physical
//! `[base, base + bytes)`, reached through nested tables that map a
//! page's private alias only while it is private-accepted and its shared
//! alias (bit 47) only while it is shared.

use coco_pagetable::{
    CcMask, Level, PageTables, PagingMode, PhysAddr, PteFlags, TableAllocator, VirtAddr,
};
use core::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use spin::Mutex;
use tdx_emulator::model::{Backing, PageState};
use tdx_emulator::snp_model::{RmpState, SnpBacking};

/// The most TD memory the emulator offers (the `memory=` option's limit).
pub const MAX_TD_BYTES: u64 = 1536 << 20;
/// Pages of the largest TD.
pub const MAX_TD_PAGES: usize = (MAX_TD_BYTES / 4096) as usize;

/// Page-table memory through the boot identity map (all RAM below 4 GiB).
pub type Identity = coco_pagetable::OffsetTableMemory;
/// The nested tables' memory.
// SAFETY: the nested tables' frames come from `Frames`, RAM below 4 GiB,
// which the boot identity map covers for the emulator's whole life; their
// entries are only accessed atomically, here and by the CPU's nested walker.
pub const IDENTITY: Identity = unsafe { Identity::new(0) };

/// Zeroed 4K frames from `[next, end)`; never freed (the emulator runs one TD).
pub struct Frames {
    range: Mutex<(u64, u64)>,
}

impl Frames {
    pub const fn new() -> Frames {
        Frames {
            range: Mutex::new((0, 0)),
        }
    }
    pub fn set_range(&self, start: u64, end: u64) {
        *self.range.lock() = ((start + 4095) & !4095, end & !4095);
    }
    pub fn allocate(&self) -> Option<u64> {
        let mut range = self.range.lock();
        if range.0 + 4096 > range.1 {
            return None;
        }
        let frame = range.0;
        range.0 += 4096;
        // SAFETY: the frame is RAM taken off the allocator, identity-mapped,
        // used by no one else.
        unsafe { core::ptr::write_bytes(frame as *mut u8, 0, 4096) };
        Some(frame)
    }
    /// `pages` contiguous frames.
    pub fn allocate_contiguous(&self, pages: u64) -> Option<u64> {
        let first = self.allocate()?;
        for _ in 1..pages {
            self.allocate()?;
        }
        Some(first)
    }
}

// SAFETY: zeroed frames of the emulator's own RAM (identity-mapped, which
// IDENTITY reaches), each handed out once and never reused (a frame given
// back is simply not used again).
unsafe impl TableAllocator for Frames {
    fn allocate_table(&self) -> Option<PhysAddr> {
        self.allocate().map(PhysAddr)
    }
    unsafe fn free_table(&self, _frame: PhysAddr) {}
}

pub static FRAMES: Frames = Frames::new();

/// Page states of the TD, one byte per 4K page.
pub static PAGE_STATES: [AtomicU8; MAX_TD_PAGES] = [const { AtomicU8::new(0) }; MAX_TD_PAGES];

/// The TD's memory and nested tables.
pub struct TdMemory {
    /// Host-physical address of guest-physical 0.
    pub base: u64,
    /// Bytes of TD memory.
    pub bytes: u64,
    pub nested: PageTables<Identity>,
    pub shared_bit: u64,
    /// SNP mode: the C-bit (the private alias's bit), and the host frame
    /// every C=0 alias of a private page maps read-only (0 in TD mode).
    pub c_bit: u64,
    ciphertext: AtomicU64,
}

/// What a C=0 read of a private page returns: no byte of the guest's data
/// (real hardware returns the ciphertext; any fixed pattern shows the same
/// mistake).
pub const CIPHERTEXT_BYTE: u8 = 0xc1;

/// Flags of a nested leaf: nested walks are user accesses, so U is needed.
fn nested_flags() -> PteFlags {
    PteFlags::PRESENT | PteFlags::WRITABLE | PteFlags::USER
}

impl TdMemory {
    pub fn new(base: u64, bytes: u64, shared_bit: u64) -> Option<TdMemory> {
        let root = FRAMES.allocate()?;
        Some(TdMemory {
            base,
            bytes,
            // SAFETY: a fresh zeroed root from FRAMES; the nested tables are
            // built and changed only through these tables (atomically), and
            // every frame of them comes from FRAMES.
            nested: unsafe {
                PageTables::new(
                    IDENTITY,
                    PhysAddr(root),
                    PagingMode::FourLevelNested,
                    CcMask::NONE,
                )
            },
            shared_bit,
            c_bit: 0,
            ciphertext: AtomicU64::new(0),
        })
    }

    /// Makes this the memory of an SNP guest with C-bit `c_bit`.
    pub fn enable_snp(&mut self, c_bit: u64) -> Option<()> {
        let frame = FRAMES.allocate()?;
        // SAFETY: the frame just allocated, identity-mapped, used only as
        // the ciphertext frame from now on.
        unsafe { core::ptr::write_bytes(frame as *mut u8, CIPHERTEXT_BYTE, 4096) };
        self.ciphertext.store(frame, Ordering::SeqCst);
        self.c_bit = c_bit;
        Some(())
    }

    /// Maps `alias` to `target` (host frame, writable) or unmaps it.
    fn ensure_exactly(&self, alias: u64, target: Option<(u64, bool)>) {
        let current = self
            .nested
            .lookup_address(VirtAddr(alias))
            .ok()
            .filter(|leaf| leaf.entry.is_present())
            .map(|leaf| {
                (
                    leaf.entry.0 & 0x000f_ffff_ffff_f000,
                    leaf.entry.flags().contains(PteFlags::WRITABLE),
                )
            });
        if current == target {
            return;
        }
        if current.is_some() {
            let _ = self.nested.unmap_leaf(VirtAddr(alias));
        }
        if let Some((hpa, writable)) = target {
            let flags = if writable {
                nested_flags()
            } else {
                nested_flags() - PteFlags::WRITABLE
            };
            if let Err(e) = self.nested.map_leaf(
                VirtAddr(alias),
                PhysAddr(hpa),
                Level::Pt,
                flags,
                false,
                &FRAMES,
            ) {
                panic!("nested map of {alias:#x}: {e:?}");
            }
        }
    }

    pub fn root(&self) -> u64 {
        self.nested.root().0
    }

    /// Host-physical address of `gpa` (no shared bit), if it is TD memory.
    pub fn host_address(&self, gpa: u64) -> Option<u64> {
        (gpa < self.bytes).then_some(self.base + gpa)
    }

    fn ensure(&self, alias: u64, hpa: u64, present: bool) {
        let mapped = self.nested.translate(VirtAddr(alias)).is_some();
        if present && !mapped {
            if let Err(e) = self.nested.map_leaf(
                VirtAddr(alias),
                PhysAddr(hpa),
                Level::Pt,
                nested_flags(),
                false,
                &FRAMES,
            ) {
                panic!("nested map of {alias:#x}: {e:?}");
            }
        } else if !present && mapped {
            let _ = self.nested.unmap_leaf(VirtAddr(alias));
        }
    }

    /// Copies `bytes` into TD memory at `gpa`.
    pub fn write(&self, gpa: u64, bytes: &[u8]) {
        assert!(
            gpa + bytes.len() as u64 <= self.bytes,
            "write outside TD memory"
        );
        // SAFETY: the range is TD memory (checked), identity-mapped RAM that
        // the emulator owns; no vCPU runs yet or the caller owns the page.
        unsafe {
            core::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                (self.base + gpa) as *mut u8,
                bytes.len(),
            )
        };
    }

    /// A view of TD memory at `gpa` for building firmware structures.
    pub fn slice_mut(&self, gpa: u64, len: usize) -> &'static mut [u8] {
        assert!(gpa + len as u64 <= self.bytes, "slice outside TD memory");
        // SAFETY: TD memory, identity-mapped; only used while setting the TD
        // up, before any vCPU runs, one slice at a time.
        unsafe { core::slice::from_raw_parts_mut((self.base + gpa) as *mut u8, len) }
    }
}

impl Backing for TdMemory {
    fn set_mapping(&self, gpa: u64, state: PageState) {
        let hpa = self.base + gpa;
        self.ensure(gpa, hpa, state == PageState::Private);
        self.ensure(gpa | self.shared_bit, hpa, state == PageState::Shared);
    }

    fn zero_page(&self, gpa: u64) {
        if gpa < self.bytes {
            // SAFETY: a TD page, identity-mapped; the guest has no mapping
            // to it at this moment (it is being converted or accepted).
            unsafe { core::ptr::write_bytes((self.base + gpa) as *mut u8, 0, 4096) };
        }
    }

    fn flush_nested_tlbs(&self) {
        super::vcpu::flush_nested_tlbs_everywhere();
    }
}

/// The SNP aliases (tdx_emulator::snp_model::SnpBacking): `gpa | C` maps
/// the page only while it is validated; `gpa` maps it read-write while it
/// is shared and the ciphertext frame read-only while it is the guest's.
impl SnpBacking for TdMemory {
    fn set_mapping(&self, gpa: u64, state: RmpState) {
        let hpa = self.base + gpa;
        let private = (state == RmpState::Validated).then_some((hpa, true));
        let shared = if state == RmpState::Shared {
            (hpa, true)
        } else {
            (self.ciphertext.load(Ordering::SeqCst), false)
        };
        self.ensure_exactly(gpa | self.c_bit, private);
        self.ensure_exactly(gpa, Some(shared));
    }

    fn zero_page(&self, gpa: u64) {
        Backing::zero_page(self, gpa)
    }

    fn flush_nested_tlbs(&self) {
        super::vcpu::flush_nested_tlbs_everywhere();
    }
}
