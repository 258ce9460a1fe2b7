//! TDG.VP.INFO and TDG.VP.VEINFO.GET.

use crate::{leaf, TdCall, TdcallError, TdcallRegs};

/// VMX basic exit reason of an EPT violation, as latched in [`VeInfo::exit_reason`].
pub const EXIT_REASON_EPT_VIOLATION: u32 = 48;

/// The CPUID leaf whose subleaf 0 identifies the TDX module to a TD.
pub const TDX_CPUID_LEAF: u32 = 0x21;

/// Whether CPUID leaf [`TDX_CPUID_LEAF`], subleaf 0, returned the TDX vendor string:
/// "IntelTDX    " as EBX, EDX, ECX ("Inte", "lTDX", "    "). Outside a TD the leaf returns
/// anything else (a CPU answers a leaf above its maximum with its highest basic leaf), so this
/// is how a kernel knows it runs as a TD, with no TDCALL (which would #UD outside one).
pub fn is_tdx_cpuid_signature(ebx: u32, ecx: u32, edx: u32) -> bool {
    ebx.to_le_bytes() == *b"Inte" && edx.to_le_bytes() == *b"lTDX" && ecx.to_le_bytes() == *b"    "
}

/// Smallest and largest GPA width a TD can have (the shared bit is GPAW-1: bit 31..=51).
const GPAW_MIN: u8 = 32;
const GPAW_MAX: u8 = 52;

/// TD execution environment reported by TDG.VP.INFO.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VpInfo {
    /// Guest physical address width (`RCX[5:0]`); the shared bit is bit `gpaw - 1`.
    pub gpaw: u8,
    /// TD attributes (RDX).
    pub attributes: u64,
    /// Number of vCPUs currently in the TD (`R8[31:0]`).
    pub num_vcpus: u32,
    /// Maximum number of vCPUs (`R8[63:32]`).
    pub max_vcpus: u32,
    /// Index of the calling vCPU (`R9[31:0]`).
    pub vcpu_index: u32,
}

impl VpInfo {
    /// The shared bit, `1 << (gpaw - 1)`: bit 47 for GPAW 48, bit 51 for GPAW 52.
    ///
    /// It must come from here, never be hard-coded: it depends on the TD's configuration.
    /// Returns 0 if `gpaw` is outside 32..=52 (only possible for a hand-built `VpInfo`:
    /// [`vp_info`] rejects such widths); 0 is rejected by [`crate::map_gpa`] as a shared bit.
    pub fn shared_bit(&self) -> u64 {
        if (GPAW_MIN..=GPAW_MAX).contains(&self.gpaw) {
            1u64 << (self.gpaw - 1)
        } else {
            0
        }
    }
}

/// TDG.VP.INFO (leaf 1): GPA width, attributes and vCPU counts.
///
/// Fails with [`TdcallError::BadGpaw`] when the reported width is outside 32..=52, so callers
/// never derive a bogus shared bit.
pub fn vp_info<T: TdCall + ?Sized>(tdcall: &T) -> Result<VpInfo, TdcallError> {
    let mut regs = TdcallRegs {
        rax: leaf::TDG_VP_INFO,
        ..TdcallRegs::default()
    };
    tdcall.tdcall(&mut regs);
    if regs.rax != 0 {
        return Err(TdcallError::Status(regs.rax));
    }
    // RCX[5:0] is GPAW; the other bits are reserved and ignored.
    let gpaw = (regs.rcx & 0x3f) as u8;
    if !(GPAW_MIN..=GPAW_MAX).contains(&gpaw) {
        return Err(TdcallError::BadGpaw(gpaw));
    }
    Ok(VpInfo {
        gpaw,
        attributes: regs.rdx,
        num_vcpus: regs.r8 as u32,
        max_vcpus: (regs.r8 >> 32) as u32,
        vcpu_index: regs.r9 as u32,
    })
}

/// Information about the current #VE, from TDG.VP.VEINFO.GET.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VeInfo {
    /// VMX exit reason of the event that caused the #VE (`RCX[31:0]`).
    pub exit_reason: u32,
    /// Exit qualification (RDX).
    pub exit_qualification: u64,
    /// Guest linear address (R8).
    pub guest_linear_address: u64,
    /// Guest physical address, including the shared bit if the access used it (R9).
    pub guest_physical_address: u64,
    /// Length of the faulting instruction (`R10[31:0]`).
    pub instruction_length: u32,
    /// VMX instruction information (`R10[63:32]`).
    pub instruction_info: u32,
}

impl VeInfo {
    /// Whether the #VE was caused by an EPT violation (exit reason 48), e.g. an access through a
    /// mapping whose shared bit disagrees with the page's state.
    pub fn is_ept_violation(&self) -> bool {
        self.exit_reason == EXIT_REASON_EPT_VIOLATION
    }
}

/// TDG.VP.VEINFO.GET (leaf 3).
///
/// A #VE handler must call this before anything that could raise another #VE: a nested #VE
/// before the info is read is escalated to #DF.
pub fn veinfo_get<T: TdCall + ?Sized>(tdcall: &T) -> Result<VeInfo, TdcallError> {
    let mut regs = TdcallRegs {
        rax: leaf::TDG_VP_VEINFO_GET,
        ..TdcallRegs::default()
    };
    tdcall.tdcall(&mut regs);
    if regs.rax != 0 {
        return Err(TdcallError::Status(regs.rax));
    }
    Ok(VeInfo {
        exit_reason: regs.rcx as u32,
        exit_qualification: regs.rdx,
        guest_linear_address: regs.r8,
        guest_physical_address: regs.r9,
        instruction_length: regs.r10 as u32,
        instruction_info: (regs.r10 >> 32) as u32,
    })
}
