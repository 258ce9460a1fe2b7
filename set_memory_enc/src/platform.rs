//! Platforms: what the hypervisor is told, and which C/S bit entries carry.
//! [`NoCc`] (an ordinary VM), [`Tdx`], [`snp::Snp`] and [`vtom::HyperVVtom`].

use crate::{Direction, GpaRun, NotifyError, Platform};
use coco_pagetable::{CcMask, MaskError, PhysAddr};
use core::sync::atomic::{AtomicU64, Ordering};
use tdx_hypercall::{
    accept_range_counting, map_gpa_counting, vp_info, AcceptError, AcceptStats, Gpa,
    MapGpaErrorKind, MapGpaStats, MapTarget, TdCall, TdcallError,
};

pub mod snp;
pub mod vtom;

pub use snp::{PrivateWindow, Snp, SnpError};
pub use vtom::{HvHypercall, HyperVVtom, VtomError};

/// An ordinary VM: every step runs, no address bit changes, the hypervisor
/// is not told. Shared state is kept in a software PTE bit so the state
/// checks still hold.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoCc;

impl Platform for NoCc {
    type Error = core::convert::Infallible;

    fn cc_mask(&self) -> CcMask {
        CcMask::NONE
    }
    fn needs_cache_flush(&self, _direction: Direction) -> bool {
        false
    }
    fn notify(&self, _run: &GpaRun, _direction: Direction) -> Result<(), NotifyError<Self::Error>> {
        Ok(())
    }
}

/// Intel TDX: MapGPA for both directions, then TDG.MEM.PAGE.ACCEPT when
/// going private. The shared bit comes from TDG.VP.INFO's GPAW.
pub struct Tdx<T> {
    tdcall: T,
    cc: CcMask,
    counters: TdxCounters,
}

/// What the TDX platform sent, for the harness to compare with the TDX
/// module's own counts.
#[derive(Debug, Default)]
pub struct TdxCounters {
    /// MapGPA TDVMCALLs, retries included.
    pub map_gpa_calls: AtomicU64,
    /// Of those, calls answered with RETRY.
    pub map_gpa_retries: AtomicU64,
    /// ACCEPTs at 4K, 2M and 1G that succeeded.
    pub accepted: [AtomicU64; 3],
    /// ACCEPTs retried after a PAGE_SIZE_MISMATCH at a smaller size.
    pub size_fallbacks: AtomicU64,
}

/// Why the TDX platform could not be set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TdxSetupError {
    /// TDG.VP.INFO failed.
    VpInfo(TdcallError),
    /// GPAW gives no usable shared bit.
    Mask(MaskError),
}

/// Why a TDX notification failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TdxError {
    /// MapGPA failed.
    MapGpa(MapGpaErrorKind),
    /// TDG.MEM.PAGE.ACCEPT failed.
    Accept(AcceptError),
    /// Not a notification's failure: the VMM took a private page away
    /// behind the TD's back (a private-GPA access met a pending page, which
    /// the TDX module reports as an EPT-violation #VE only while SEPT #VE is
    /// enabled). The kernel passes it to [`crate::Converter::retire`].
    PrivatePageLost(Gpa),
}

impl<T: TdCall> Tdx<T> {
    /// Asks the TDX module for GPAW and derives the shared bit from it.
    pub fn new(tdcall: T) -> Result<Self, TdxSetupError> {
        let info = vp_info(&tdcall).map_err(TdxSetupError::VpInfo)?;
        let cc = CcMask::tdx(info.gpaw).map_err(TdxSetupError::Mask)?;
        Ok(Tdx {
            tdcall,
            cc,
            counters: TdxCounters::default(),
        })
    }

    /// The TDCALL executor.
    pub fn tdcall(&self) -> &T {
        &self.tdcall
    }

    /// What was sent so far.
    pub fn counters(&self) -> &TdxCounters {
        &self.counters
    }
}

impl<T: TdCall> Platform for Tdx<T> {
    type Error = TdxError;

    fn cc_mask(&self) -> CcMask {
        self.cc
    }

    /// Dirty lines written through the private key must not land on a page
    /// the host can now see.
    fn needs_cache_flush(&self, direction: Direction) -> bool {
        direction == Direction::ToShared
    }

    fn notify(&self, run: &GpaRun, direction: Direction) -> Result<(), NotifyError<TdxError>> {
        let start = Gpa(run.gpa.0);
        let target = match direction {
            Direction::ToShared => MapTarget::Shared,
            Direction::ToPrivate => MapTarget::Private,
        };
        // Counted whether the call succeeds or not, so that the totals match
        // what the VMM saw even after a failure.
        let c = &self.counters;
        let mut sent = MapGpaStats::default();
        let mapped = map_gpa_counting(
            &self.tdcall,
            start,
            run.bytes,
            target,
            self.cc.shared_bits(),
            &mut sent,
        );
        c.map_gpa_calls
            .fetch_add(sent.calls.into(), Ordering::Relaxed);
        c.map_gpa_retries
            .fetch_add(sent.retries.into(), Ordering::Relaxed);
        if let Err(e) = mapped {
            // Going shared, [start, converted_up_to) is shared and usable.
            // Going private, nothing is accepted yet: the whole run is unknown.
            let consistent_up_to = match direction {
                Direction::ToShared => PhysAddr(e.converted_up_to.0),
                Direction::ToPrivate => run.gpa,
            };
            return Err(NotifyError {
                consistent_up_to,
                cause: TdxError::MapGpa(e.kind),
            });
        }
        if direction == Direction::ToPrivate {
            let end = Gpa(run.gpa_end().0);
            let mut accepted = AcceptStats::default();
            let result = accept_range_counting(&self.tdcall, start, end, &mut accepted);
            c.accepted[0].fetch_add(accepted.accepted_4k, Ordering::Relaxed);
            c.accepted[1].fetch_add(accepted.accepted_2m, Ordering::Relaxed);
            c.accepted[2].fetch_add(accepted.accepted_1g, Ordering::Relaxed);
            c.size_fallbacks
                .fetch_add(accepted.size_mismatch_fallbacks, Ordering::Relaxed);
            if let Err(e) = result {
                return Err(NotifyError {
                    consistent_up_to: PhysAddr(e.accepted_up_to.0),
                    cause: TdxError::Accept(e.cause),
                });
            }
        }
        Ok(())
    }
}
