//! Running as an Intel TDX guest (a TD): detection, the TDCALL handle of the
//! #VE handler and the TDX platform, accepting RAM at boot, and telling the
//! VMM about a fatal error. Outside a TD nothing here does anything.

use super::memory::{align_up, RamRegion, LOW_MEMORY_END};
use coco_pagetable::PAGE_SIZE;
use tdx_hypercall::{
    accept_ram, is_tdx_cpuid_signature, report_fatal_error, AcceptStats, Gpa, TdcallInstruction,
    TDX_CPUID_LEAF,
};

/// The TDCALL instruction, set at boot only in a TD.
static TDCALL: spin::Once<TdcallInstruction> = spin::Once::new();
/// The ACCEPTs of [`accept_boot_ram`], for the totals the kernel reports.
static BOOT_ACCEPTS: spin::Once<AcceptStats> = spin::Once::new();

/// ReportFatalError codes (R12): what stopped the kernel.
pub mod fatal_code {
    /// A Rust panic.
    pub const PANIC: u64 = 1;
    /// An exception with no fixup (including an EPT-violation #VE).
    pub const EXCEPTION: u64 = 2;
}

/// Detects a TD and, in one, enables TDCALL for the rest of the run. Runs
/// first at boot: CPUID leaf 0x21 is the one CPUID that raises no #VE in a
/// TD (the TDX module, and the emulator, answer it directly), and before
/// this nothing may raise one (there is no handler yet).
pub fn enter_if_td() -> Option<&'static TdcallInstruction> {
    let signature = bare::cpu::cpuid(TDX_CPUID_LEAF, 0);
    if !is_tdx_cpuid_signature(signature.ebx, signature.ecx, signature.edx) {
        return None;
    }
    // SAFETY: CPUID leaf 0x21 named the TDX module, so this is a TD, and the
    // kernel runs at CPL 0 in 64-bit mode: TDCALL is defined.
    Some(TDCALL.call_once(|| unsafe { TdcallInstruction::new() }))
}

/// The TDCALL instruction, if this is a TD.
pub fn tdcall() -> Option<&'static TdcallInstruction> {
    TDCALL.get()
}

/// Whether this kernel runs as a TD.
pub fn active() -> bool {
    TDCALL.get().is_some()
}

/// What [`accept_boot_ram`] did, in 4 KiB pages.
pub struct AcceptedRam {
    /// Pages this kernel accepted.
    pub accepted: u64,
    /// Pages the TDX module reported as accepted already (the launch image,
    /// or everything when the VMM accepts RAM up front).
    pub already_accepted: u64,
}

/// Accepts every page of `ram` from 1 MiB up: all that the frame allocator
/// hands out and the test area, before anything touches them (a private
/// access to a pending page is an EPT-violation #VE). The first MiB is the
/// launch image's (accepted, and never allocated). A failure panics: with
/// RAM in an unknown state the kernel cannot run.
pub fn accept_boot_ram(tdcall: &TdcallInstruction, ram: &[RamRegion]) -> AcceptedRam {
    let mut total = AcceptedRam {
        accepted: 0,
        already_accepted: 0,
    };
    let mut calls = AcceptStats::default();
    for region in ram {
        let start = align_up(region.start.max(LOW_MEMORY_END), PAGE_SIZE);
        let end = region.end & !(PAGE_SIZE - 1);
        if start >= end {
            continue;
        }
        match accept_ram(tdcall, Gpa(start), Gpa(end)) {
            Ok(stats) => {
                total.accepted += stats.accepted_bytes() / PAGE_SIZE;
                total.already_accepted += stats.already_accepted_bytes / PAGE_SIZE;
                let s = stats.accepted;
                calls.accepted_4k += s.accepted_4k;
                calls.accepted_2m += s.accepted_2m;
                calls.accepted_1g += s.accepted_1g;
                calls.size_mismatch_fallbacks += s.size_mismatch_fallbacks;
                calls.busy_retries += s.busy_retries;
            }
            Err(e) => panic!("accepting RAM {start:#x}..{end:#x}: {e}"),
        }
    }
    BOOT_ACCEPTS.call_once(|| calls);
    total
}

/// What [`accept_boot_ram`] asked of the TDX module (zero before it ran).
pub fn boot_accepts() -> AcceptStats {
    BOOT_ACCEPTS.get().copied().unwrap_or_default()
}

/// In a TD, tells the VMM the kernel is stopping on a fatal error (the
/// caller has printed why); a VMM that returns leaves the stopping to the
/// caller. Nothing outside a TD.
pub fn report_fatal(code: u64) {
    if let Some(tdcall) = tdcall() {
        // Already failing: a refused report changes nothing.
        let _ = report_fatal_error(tdcall, code);
    }
}
