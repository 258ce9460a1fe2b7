//! AMD SEV-SNP: page state change through the GHCB, PVALIDATE through a
//! temporary private mapping of each frame.
//!
//! PVALIDATE takes a virtual address and needs a present private (C=1)
//! mapping, which is why Linux never gave SNP the non-present window. Here
//! the kernel lends a window ([`PrivateWindow`]): a per-CPU address behind
//! a guard page where one frame at a time is mapped C=1 while every
//! ordinary entry of the range stays non-present. Inside step 6:
//! - to shared: rescind every page (PVALIDATE through the window), then the
//!   page state change to shared;
//! - to private: the page state change to private, then validate every
//!   page and zero it through the window (its contents are the
//!   hypervisor's until then).
//!
//! CF = 1 from PVALIDATE (the Validated bit did not change) and any PSC
//! error are a broken or hostile hypervisor: the pages whose state is then
//! unknown are quarantined, never reused.

#![allow(unsafe_code)] // PVALIDATE and the window's zeroing, each with its SAFETY.

use crate::{Direction, GpaRun, NotifyError, Platform};
use coco_pagetable::{CcMask, MaskError, PhysAddr, VirtAddr};
use core::sync::atomic::{AtomicU64, Ordering};
use snp_hypercall::msr::{self, GhcbMsr, MsrError, PageOp};
use snp_hypercall::psc::{psc_range, GhcbPsc, PscErrorKind, PscStats};
use snp_hypercall::pvalidate::{pvalidate, PageSize, Pvalidate, PvalidateError};

const PAGE: u64 = 4096;
const PAGE_2M: u64 = 2 << 20;

/// The window could not be mapped (a 2M one, say): the platform falls back
/// to 4K, or fails the conversion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowUnavailable;

/// What the kernel lends the SNP platform for PVALIDATE.
pub trait PrivateWindow {
    /// Maps `frame` (`size` bytes, aligned to it) private (C=1) and
    /// writable at a virtual address only this CPU uses, preceded by a page
    /// that is never mapped (so a load running off the page before cannot
    /// reach it), invalidates that address in this CPU's TLB, calls `f` with
    /// it, then unmaps it and invalidates it again. Nothing else may use the
    /// window meanwhile (interrupts off, or a window per context).
    fn with_frame(
        &self,
        frame: PhysAddr,
        size: PageSize,
        f: &mut dyn FnMut(VirtAddr),
    ) -> Result<(), WindowUnavailable>;
    /// Zeroes `bytes` at `va`.
    ///
    /// # Safety
    /// `va` and `bytes` are the address and size [`PrivateWindow::with_frame`]
    /// passed to the closure that calls this, while it runs (the window is
    /// mapped, and only this CPU uses it).
    unsafe fn zero(&self, va: VirtAddr, bytes: u64);
}

impl<T: PrivateWindow + ?Sized> PrivateWindow for &T {
    fn with_frame(
        &self,
        frame: PhysAddr,
        size: PageSize,
        f: &mut dyn FnMut(VirtAddr),
    ) -> Result<(), WindowUnavailable> {
        (**self).with_frame(frame, size, f)
    }
    unsafe fn zero(&self, va: VirtAddr, bytes: u64) {
        // SAFETY: the caller's promise, passed on.
        unsafe { (**self).zero(va, bytes) }
    }
}

/// Why an SNP notification failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnpError {
    /// The run is not one the engine makes (empty, unaligned, past 2^52):
    /// refused before anything is asked of the hypervisor.
    BadRun,
    /// The GHCB-page page state change stopped.
    Psc(PscErrorKind),
    /// The MSR-protocol page state change (one page) was refused.
    PscMsr(MsrError),
    /// PVALIDATE of the page at `gpa` failed; `Unchanged` is CF = 1.
    Pvalidate {
        /// The page (the 2M block's first page for a 2M PVALIDATE).
        gpa: u64,
        /// What it returned.
        error: PvalidateError,
    },
    /// The kernel could not map its window for the page at `gpa` (or did
    /// not run the PVALIDATE through it).
    Window {
        /// The page.
        gpa: u64,
    },
}

/// What the SNP platform asked for, for comparison with the hypervisor's
/// counts.
#[derive(Debug, Default)]
pub struct SnpCounters {
    /// GHCB-page PSC NAEs (resumed ones included) and MSR-protocol PSCs.
    pub psc_calls: AtomicU64,
    /// Of those, MSR-protocol ones.
    pub psc_msr_calls: AtomicU64,
    /// Successful PVALIDATEs at 4K and 2M.
    pub pvalidated: [AtomicU64; 2],
    /// 2M PVALIDATEs retried as 4K (FAIL_SIZEMISMATCH or no 2M window).
    pub size_fallbacks: AtomicU64,
    /// Pages zeroed after validation.
    pub zeroed_pages: AtomicU64,
}

/// AMD SEV-SNP: C=1 is private. `H` is the hypervisor interface (the GHCB
/// MSR protocol and the GHCB page), `V` the PVALIDATE instruction, `W` the
/// kernel's private window.
pub struct Snp<H, V, W> {
    hv: H,
    pvalidate: V,
    window: W,
    cc: CcMask,
    coherent_caches: bool,
    counters: SnpCounters,
}

impl<H: GhcbMsr + GhcbPsc, V: Pvalidate, W: PrivateWindow> Snp<H, V, W> {
    /// The platform with the C-bit at `c_bit` (from
    /// `snp_hypercall::c_bit_from_cpuid` or the SEV information). Caches are
    /// flushed in step 4 unless [`Snp::with_coherent_caches`] says the CPU
    /// keeps them coherent across keys.
    pub fn new(c_bit: u8, hv: H, pvalidate: V, window: W) -> Result<Self, MaskError> {
        Ok(Snp {
            hv,
            pvalidate,
            window,
            cc: CcMask::with_private_bit(u32::from(c_bit))?,
            coherent_caches: false,
            counters: SnpCounters::default(),
        })
    }

    /// CPUID 0x8000_001F EAX bit 10 (SME_COHERENT): no cache flush needed
    /// (Linux `amd_enc_cache_flush_required`).
    pub fn with_coherent_caches(mut self, coherent: bool) -> Self {
        self.coherent_caches = coherent;
        self
    }

    /// What was sent so far.
    pub fn counters(&self) -> &SnpCounters {
        &self.counters
    }

    /// The hypervisor interface.
    pub fn hypervisor(&self) -> &H {
        &self.hv
    }

    /// The page state change of `[start, end)`: the MSR protocol for one
    /// page, the GHCB page for more. Err: the GPA up to which it is done.
    fn page_state_change(&self, start: u64, end: u64, op: PageOp) -> Result<(), (u64, SnpError)> {
        let c = &self.counters;
        if end - start == PAGE {
            c.psc_calls.fetch_add(1, Ordering::Relaxed);
            c.psc_msr_calls.fetch_add(1, Ordering::Relaxed);
            return msr::page_state_change(&self.hv, start / PAGE, op)
                .map_err(|e| (start, SnpError::PscMsr(e)));
        }
        let mut stats = PscStats::default();
        let result = psc_range(&self.hv, start, end, op, true, &mut stats);
        c.psc_calls.fetch_add(stats.calls, Ordering::Relaxed);
        result.map_err(|e| (e.done_up_to, SnpError::Psc(e.kind)))
    }

    /// PVALIDATE of every page of `[start, end)` through the window, 2M
    /// blocks at 2M where the RMP and the window allow; each page validated
    /// is zeroed. Err: the first page not done, and why.
    fn pvalidate_range(&self, start: u64, end: u64, validate: bool) -> Result<(), (u64, SnpError)> {
        let mut gpa = start;
        while gpa < end {
            if gpa.is_multiple_of(PAGE_2M) && end - gpa >= PAGE_2M {
                match self.pvalidate_one(gpa, PageSize::Size2M, validate) {
                    Ok(()) => {
                        gpa += PAGE_2M;
                        continue;
                    }
                    // The RMP holds the block at 4K, or no 2M window: 4K.
                    Err(SnpError::Pvalidate {
                        error: PvalidateError::SizeMismatch,
                        ..
                    })
                    | Err(SnpError::Window { .. }) => {
                        self.counters.size_fallbacks.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => return Err((gpa, e)),
                }
                for page in (gpa..gpa + PAGE_2M).step_by(PAGE as usize) {
                    self.pvalidate_one(page, PageSize::Size4K, validate)
                        .map_err(|e| (page, e))?;
                }
                gpa += PAGE_2M;
                continue;
            }
            self.pvalidate_one(gpa, PageSize::Size4K, validate)
                .map_err(|e| (gpa, e))?;
            gpa += PAGE;
        }
        Ok(())
    }

    fn pvalidate_one(&self, gpa: u64, size: PageSize, validate: bool) -> Result<(), SnpError> {
        // Not done until the closure says so: a window that returns without
        // calling it leaves the page as it was.
        let mut result = Err(SnpError::Window { gpa });
        let mapped = self.window.with_frame(PhysAddr(gpa), size, &mut |va| {
            // SAFETY: `va` is the window, mapping `gpa` private for this
            // closure only (PrivateWindow's contract), and the memory is
            // this conversion's: its entries are non-present and the engine
            // reserved the range, so nothing else uses it while its
            // validation changes; validated memory is zeroed before use.
            result = unsafe { pvalidate(&self.pvalidate, va.0, size, validate) }
                .map_err(|error| SnpError::Pvalidate { gpa, error });
            if result.is_ok() && validate {
                // Validated: the page's contents were the hypervisor's.
                // SAFETY: the window and size with_frame passed, inside its
                // closure.
                unsafe { self.window.zero(va, size.bytes()) };
            }
        });
        if mapped.is_err() {
            return Err(SnpError::Window { gpa });
        }
        result?;
        let c = &self.counters;
        c.pvalidated[size as usize].fetch_add(1, Ordering::Relaxed);
        if validate {
            c.zeroed_pages
                .fetch_add(size.bytes() / PAGE, Ordering::Relaxed);
        }
        Ok(())
    }
}

impl<H: GhcbMsr + GhcbPsc, V: Pvalidate, W: PrivateWindow> Platform for Snp<H, V, W> {
    type Error = SnpError;

    fn cc_mask(&self) -> CcMask {
        self.cc
    }

    /// Unless the CPU keeps caches coherent across encryption keys, lines
    /// cached under one key must go before the page is used under the other.
    fn needs_cache_flush(&self, _direction: Direction) -> bool {
        !self.coherent_caches
    }

    fn notify(&self, run: &GpaRun, direction: Direction) -> Result<(), NotifyError<SnpError>> {
        let (start, end) = (run.gpa.0, run.gpa_end().0);
        let failed = |consistent_up_to: u64, cause| {
            Err(NotifyError {
                consistent_up_to: PhysAddr(consistent_up_to),
                cause,
            })
        };
        if !run.is_well_formed() {
            return failed(start, SnpError::BadRun);
        }
        match direction {
            Direction::ToShared => {
                // Rescind strictly before the hypervisor takes the pages. A
                // rescinded page it does not take is usable in no state.
                if let Err((_, cause)) = self.pvalidate_range(start, end, false) {
                    return failed(start, cause);
                }
                // Pages it reports shared are shared and usable.
                if let Err((done, cause)) = self.page_state_change(start, end, PageOp::Shared) {
                    return failed(done, cause);
                }
            }
            Direction::ToPrivate => {
                // Nothing is usable until validated: a failed page state
                // change leaves the whole run unknown.
                if let Err((_, cause)) = self.page_state_change(start, end, PageOp::Private) {
                    return failed(start, cause);
                }
                // Validate strictly after; pages before a failure are
                // validated and zeroed.
                if let Err((at, cause)) = self.pvalidate_range(start, end, true) {
                    return failed(at, cause);
                }
            }
        }
        Ok(())
    }
}
