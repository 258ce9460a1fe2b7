//! Hyper-V with a virtual top of memory (vTOM), under a paravisor (SEV-SNP
//! or TDX isolation): a GPA at or above vTOM is shared, below it private,
//! so the shared "bit" is the vTOM bit. The guest tells Hyper-V with
//! HvCallModifySparseGpaPageHostVisibility (0x00DB), a rep hypercall of up
//! to 510 GPA page numbers; the paravisor does the page state change and
//! PVALIDATE (or MapGPA and ACCEPT) on physical addresses. This is the one
//! platform on which Linux does the non-present window (arch/x86/hyperv/
//! ivm.c, `hv_vtom_set_host_visibility`).

use crate::{Direction, GpaRun, NotifyError, Platform};
use coco_pagetable::{CcMask, MaskError, PhysAddr};
use core::sync::atomic::{AtomicU64, Ordering};

/// HvCallModifySparseGpaPageHostVisibility.
pub const HVCALL_MODIFY_SPARSE_GPA_PAGE_HOST_VISIBILITY: u64 = 0x00db;
/// GPA pages per hypercall: the input page (4096 bytes) less the partition
/// ID and the visibility word (Linux `HV_MAX_MODIFY_GPA_REP_COUNT`).
pub const MAX_PAGES_PER_CALL: usize = 4096 / 8 - 2;
/// HV_PARTITION_ID_SELF.
pub const PARTITION_SELF: u64 = u64::MAX;
/// Calls in a row that may complete no rep before the guest gives up.
pub const MAX_STALLED_CALLS: u32 = 16;

/// Host visibility values (`hv_gpa_range_for_visibility.host_visibility`).
pub mod visibility {
    /// Not visible to the host: private.
    pub const NOT_VISIBLE: u64 = 0;
    /// Readable and writable by the host: shared.
    pub const READ_WRITE: u64 = 3;
}

/// Hypercall input value layout: call code 15:0, rep count 43:32, rep
/// start 59:48; result: status 15:0, reps completed 43:32 (Hyper-V TLFS;
/// Linux `hv_do_rep_hypercall`).
const REP_COUNT_SHIFT: u32 = 32;
const REP_START_SHIFT: u32 = 48;
const REP_MASK: u64 = 0xfff;

/// One hypercall: the kernel copies `input` to its hypercall input page
/// and issues `control` through the hypercall page (or the paravisor's
/// interface), returning the result value.
pub trait HvHypercall {
    /// The hypercall.
    fn hypercall(&self, control: u64, input: &[u64]) -> u64;
}

impl<T: HvHypercall + ?Sized> HvHypercall for &T {
    fn hypercall(&self, control: u64, input: &[u64]) -> u64 {
        (**self).hypercall(control, input)
    }
}

/// Why a host-visibility change failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VtomError {
    /// The run is not one the engine makes (empty, unaligned, past 2^52):
    /// refused before any hypercall.
    BadRun,
    /// The hypercall's status (not HV_STATUS_SUCCESS).
    Status(u16),
    /// Reps completed outside `[rep start, rep count]`.
    BadRepsCompleted(u64),
    /// [`MAX_STALLED_CALLS`] calls in a row completed nothing.
    NoProgress,
}

/// What the vTOM platform sent.
#[derive(Debug, Default)]
pub struct VtomCounters {
    /// Hypercalls, resumed ones included.
    pub hypercalls: AtomicU64,
    /// Pages whose visibility changed.
    pub pages: AtomicU64,
}

/// Hyper-V vTOM: the shared bit is vTOM.
pub struct HyperVVtom<H> {
    hv: H,
    cc: CcMask,
    counters: VtomCounters,
}

impl<H: HvHypercall> HyperVVtom<H> {
    /// The platform with vTOM at bit `vtom_bit` (Hyper-V CPUID 0x4000_000C
    /// EBX bits 11:6, `shared_gpa_boundary_bits`).
    pub fn new(vtom_bit: u8, hv: H) -> Result<Self, MaskError> {
        Ok(HyperVVtom {
            hv,
            cc: CcMask::with_shared_bit(u32::from(vtom_bit))?,
            counters: VtomCounters::default(),
        })
    }

    /// What was sent so far.
    pub fn counters(&self) -> &VtomCounters {
        &self.counters
    }

    /// One batch of at most [`MAX_PAGES_PER_CALL`] pages from `first`
    /// (a GPA page number), resumed until all its reps are done. Err: how
    /// many reps were done.
    fn batch(&self, first: u64, count: usize, value: u64) -> Result<(), (u64, VtomError)> {
        let mut input = [0u64; MAX_PAGES_PER_CALL + 2];
        input[0] = PARTITION_SELF;
        input[1] = value;
        for (i, slot) in input[2..2 + count].iter_mut().enumerate() {
            *slot = first + i as u64;
        }
        let count = count as u64;
        let mut done = 0u64;
        let mut stalled = 0;
        while done < count {
            let control = HVCALL_MODIFY_SPARSE_GPA_PAGE_HOST_VISIBILITY
                | (count << REP_COUNT_SHIFT)
                | (done << REP_START_SHIFT);
            self.counters.hypercalls.fetch_add(1, Ordering::Relaxed);
            let result = self.hv.hypercall(control, &input[..2 + count as usize]);
            let completed = (result >> REP_COUNT_SHIFT) & REP_MASK;
            if completed < done || completed > count {
                return Err((done, VtomError::BadRepsCompleted(completed)));
            }
            let status = (result & 0xffff) as u16;
            if status != 0 {
                return Err((completed, VtomError::Status(status)));
            }
            if completed == done {
                stalled += 1;
                if stalled >= MAX_STALLED_CALLS {
                    return Err((done, VtomError::NoProgress));
                }
            } else {
                stalled = 0;
            }
            done = completed;
        }
        Ok(())
    }
}

impl<H: HvHypercall> Platform for HyperVVtom<H> {
    type Error = VtomError;

    fn cc_mask(&self) -> CcMask {
        self.cc
    }

    /// Linux `hv_vtom_cache_flush_required`: the paravisor and the hardware
    /// keep caches coherent.
    fn needs_cache_flush(&self, _direction: Direction) -> bool {
        false
    }

    fn notify(&self, run: &GpaRun, direction: Direction) -> Result<(), NotifyError<VtomError>> {
        let value = match direction {
            Direction::ToShared => visibility::READ_WRITE,
            Direction::ToPrivate => visibility::NOT_VISIBLE,
        };
        if !run.is_well_formed() {
            return Err(NotifyError {
                consistent_up_to: run.gpa,
                cause: VtomError::BadRun,
            });
        }
        let pages = run.bytes / 4096;
        let first = run.gpa.0 / 4096;
        let mut sent = 0u64;
        while sent < pages {
            let count = (pages - sent).min(MAX_PAGES_PER_CALL as u64);
            // Pages the hypervisor reports done are in the new state.
            if let Err((done, cause)) = self.batch(first + sent, count as usize, value) {
                self.counters
                    .pages
                    .fetch_add(sent + done, Ordering::Relaxed);
                return Err(NotifyError {
                    consistent_up_to: PhysAddr((first + sent + done) * 4096),
                    cause,
                });
            }
            sent += count;
        }
        self.counters.pages.fetch_add(pages, Ordering::Relaxed);
        Ok(())
    }
}
