//! TDX guest TDCALL layer.
//!
//! Typed wrappers for the TDCALL leaves and TDVMCALL sub-functions a TD guest kernel needs
//! (VP.INFO, VEINFO.GET, MEM.PAGE.ACCEPT, VP.VMCALL with MapGPA and the instruction services),
//! and the part of a #VE handler that does an instruction through the VMM ([`ve`]).
//!
//! The instruction itself is injected through the [`TdCall`] trait: [`TdcallInstruction`] executes
//! the real `TDCALL`, and the `sim` module (feature `sim`) provides a fake TDX module + VMM. So
//! everything except one `asm!` block is safe code that runs in host tests.
//!
//! Library code never panics on caller input: bad input and unexpected answers from the TDX
//! module or the VMM become typed errors.

#![cfg_attr(not(any(test, feature = "sim")), no_std)]
#![deny(unsafe_code)]
#![warn(missing_docs)]

mod accept;
mod info;
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod instruction;
mod map_gpa;
pub mod ve;
mod vmcall;

#[cfg(any(test, feature = "sim"))]
pub mod sim;

#[cfg(test)]
mod tests;

pub use accept::{
    accept_ram, accept_range, accept_range_counting, page_accept, AcceptError, AcceptRamStats,
    AcceptRangeError, AcceptSize, AcceptStats, ACCEPT_BUSY_RETRIES,
};
pub use info::{
    is_tdx_cpuid_signature, veinfo_get, vp_info, VeInfo, VpInfo, EXIT_REASON_EPT_VIOLATION,
    TDX_CPUID_LEAF,
};
#[cfg(target_arch = "x86_64")]
pub use instruction::{is_sound_tdcall, TdcallInstruction, SOUND_VMCALL_EXPOSE_MASK};
pub use map_gpa::{
    map_gpa, map_gpa_counting, MapGpaError, MapGpaErrorKind, MapGpaStats, MapTarget,
    MAP_GPA_MAX_STALLED_RETRIES,
};
pub use vmcall::{
    cpuid, hlt, io_read, io_write, mmio_read, mmio_write, rdmsr, report_fatal_error, vmcall, wrmsr,
    CpuidResult, IoSize, MmioSize, VmcallArgs, VmcallError, VmcallOutput, VmcallStatus,
};

/// Size of the base page: the granularity of ACCEPT and MapGPA.
pub const PAGE_SIZE: u64 = 4096;

/// TDCALL leaf numbers (RAX on input).
pub mod leaf {
    /// TDG.VP.VMCALL: exit to the VMM (TDVMCALL).
    pub const TDG_VP_VMCALL: u64 = 0;
    /// TDG.VP.INFO: TD execution environment (GPAW, attributes, vCPUs).
    pub const TDG_VP_INFO: u64 = 1;
    /// TDG.VP.VEINFO.GET: information latched for the current #VE.
    pub const TDG_VP_VEINFO_GET: u64 = 3;
    /// TDG.MEM.PAGE.ACCEPT: accept a pending private page.
    pub const TDG_MEM_PAGE_ACCEPT: u64 = 6;
}

/// TDVMCALL sub-function numbers (R11 on input to TDG.VP.VMCALL).
///
/// The instruction services use the VMX exit reason of the instruction they emulate.
pub mod subfn {
    /// CPUID emulation.
    pub const CPUID: u64 = 10;
    /// HLT.
    pub const HLT: u64 = 12;
    /// Port I/O.
    pub const IO: u64 = 30;
    /// RDMSR.
    pub const RDMSR: u64 = 31;
    /// WRMSR.
    pub const WRMSR: u64 = 32;
    /// #VE.RequestMMIO.
    pub const REQUEST_MMIO: u64 = 48;
    /// GetTdVmCallInfo.
    pub const GET_TD_VM_CALL_INFO: u64 = 0x10000;
    /// MapGPA: convert a GPA range between private and shared.
    pub const MAP_GPA: u64 = 0x10001;
    /// GetQuote.
    pub const GET_QUOTE: u64 = 0x10002;
    /// ReportFatalError.
    pub const REPORT_FATAL_ERROR: u64 = 0x10003;
    /// SetupEventNotifyInterrupt.
    pub const SETUP_EVENT_NOTIFY_INTERRUPT: u64 = 0x10004;
}

/// TDX module completion statuses (RAX after TDCALL) that this crate classifies.
///
/// The class of a status is its upper 32 bits; the lower 32 bits carry details such as the
/// operand ID, so classification compares classes only.
pub mod status {
    /// Success.
    pub const TDX_SUCCESS: u64 = 0;
    /// Class of TDX_OPERAND_BUSY: a resource was busy, retry the same call.
    pub const TDX_OPERAND_BUSY_CLASS: u32 = 0x8000_0200;
    /// Class of TDX_PAGE_SIZE_MISMATCH: the page is mapped at a smaller size than requested.
    pub const TDX_PAGE_SIZE_MISMATCH_CLASS: u32 = 0xC000_0B0B;
    /// Class of TDX_PAGE_ALREADY_ACCEPTED.
    pub const TDX_PAGE_ALREADY_ACCEPTED_CLASS: u32 = 0x0000_0B0A;
    /// Full TDX_OPERAND_BUSY status as reported for a busy secure-EPT entry (operand ID 0).
    pub const TDX_OPERAND_BUSY: u64 = 0x8000_0200_0000_0000;
    /// Full PAGE_SIZE_MISMATCH status as seen for ACCEPT.
    pub const TDX_PAGE_SIZE_MISMATCH: u64 = 0xC000_0B0B_0000_0001;
    /// Full PAGE_ALREADY_ACCEPTED status.
    pub const TDX_PAGE_ALREADY_ACCEPTED: u64 = 0x0000_0B0A_0000_0000;
    /// TDX_OPERAND_INVALID (bad GPA, level or alignment).
    pub const TDX_OPERAND_INVALID: u64 = 0xC000_0100_0000_0000;

    /// Class (upper 32 bits) of a TDX module status.
    pub const fn class(status: u64) -> u32 {
        (status >> 32) as u32
    }
}

/// Register file of one TDCALL. Fields are the GPRs the ABI uses.
///
/// On input RAX is the leaf; on output RAX is the TDX module status. Which other registers
/// carry inputs and outputs depends on the leaf.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TdcallRegs {
    /// Leaf in, status out.
    pub rax: u64,
    /// RCX.
    pub rcx: u64,
    /// RDX.
    pub rdx: u64,
    /// R8.
    pub r8: u64,
    /// R9.
    pub r9: u64,
    /// R10.
    pub r10: u64,
    /// R11.
    pub r11: u64,
    /// R12.
    pub r12: u64,
    /// R13.
    pub r13: u64,
    /// R14.
    pub r14: u64,
    /// R15.
    pub r15: u64,
}

/// Executes TDCALL. Implementations: the real instruction, or a fake TDX module in tests.
///
/// The implementation loads `regs` into the GPRs, executes the call and stores every register
/// back into `regs`. It is infallible: failures are statuses in the returned registers.
pub trait TdCall {
    /// Execute one TDCALL with the register file `regs` (in and out).
    fn tdcall(&self, regs: &mut TdcallRegs);
}

impl<T: TdCall + ?Sized> TdCall for &T {
    fn tdcall(&self, regs: &mut TdcallRegs) {
        (**self).tdcall(regs);
    }
}

/// Failure of a TDCALL leaf itself (as opposed to a VMM status inside a TDVMCALL).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TdcallError {
    /// The TDX module returned this nonzero completion status in RAX.
    Status(u64),
    /// TDG.VP.INFO reported a GPA width outside 32..=52, so no shared bit can be derived.
    BadGpaw(u8),
}

impl core::error::Error for TdcallError {}

impl core::fmt::Display for TdcallError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            TdcallError::Status(s) => write!(f, "TDCALL failed with status {s:#018x}"),
            TdcallError::BadGpaw(g) => write!(f, "TDG.VP.INFO reported unusable GPAW {g}"),
        }
    }
}

/// Guest physical address WITHOUT the shared bit.
///
/// Private and shared aliases of a page differ only in the shared bit; keeping that bit out of
/// this type means range arithmetic and comparisons are always done in one encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Gpa(pub u64);

impl Gpa {
    /// The raw address.
    pub const fn as_u64(self) -> u64 {
        self.0
    }

    /// Offset inside the 4 KiB page.
    pub const fn page_offset(self) -> u64 {
        self.0 & (PAGE_SIZE - 1)
    }

    /// Whether the address is a multiple of `size`. `size` must be a power of two; any other
    /// `size` (including 0) yields `false`.
    pub const fn is_aligned(self, size: u64) -> bool {
        size.is_power_of_two() && self.0 & (size - 1) == 0
    }

    /// `self + bytes`, or `None` on overflow.
    pub const fn checked_add(self, bytes: u64) -> Option<Gpa> {
        match self.0.checked_add(bytes) {
            Some(v) => Some(Gpa(v)),
            None => None,
        }
    }
}

impl core::fmt::Display for Gpa {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}
