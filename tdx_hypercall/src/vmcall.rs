//! TDG.VP.VMCALL (TDVMCALL) and the instruction services built on it.

use crate::{leaf, subfn, TdCall, TdcallError, TdcallRegs};

/// RCX bitmap of the registers exposed to the VMM: R10..R15 (bits 10..15). Nothing else is
/// exposed, so the VMM sees no other guest register.
const EXPOSE_R10_R15: u64 = 0xFC00;

/// Arguments of a TDVMCALL: the sub-function (R11) and R12..R15.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmcallArgs {
    /// Sub-function, placed in R11.
    pub subfunction: u64,
    /// R12.
    pub r12: u64,
    /// R13.
    pub r13: u64,
    /// R14.
    pub r14: u64,
    /// R15.
    pub r15: u64,
}

/// TDVMCALL status, returned by the VMM in R10.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmcallStatus {
    /// 0.
    Success,
    /// 1: partial progress; for MapGPA, R11 holds the GPA to resume from.
    Retry,
    /// 0x8000_0000_0000_0000.
    InvalidOperand,
    /// 0x8000_0000_0000_0002.
    AlignError,
    /// 0x8000_0000_0000_0003.
    SubfuncUnsupported,
    /// Any other value.
    Other(u64),
}

impl VmcallStatus {
    /// Decodes R10.
    pub const fn from_raw(raw: u64) -> VmcallStatus {
        match raw {
            0 => VmcallStatus::Success,
            1 => VmcallStatus::Retry,
            0x8000_0000_0000_0000 => VmcallStatus::InvalidOperand,
            0x8000_0000_0000_0002 => VmcallStatus::AlignError,
            0x8000_0000_0000_0003 => VmcallStatus::SubfuncUnsupported,
            other => VmcallStatus::Other(other),
        }
    }

    /// The raw R10 value.
    pub const fn raw(self) -> u64 {
        match self {
            VmcallStatus::Success => 0,
            VmcallStatus::Retry => 1,
            VmcallStatus::InvalidOperand => 0x8000_0000_0000_0000,
            VmcallStatus::AlignError => 0x8000_0000_0000_0002,
            VmcallStatus::SubfuncUnsupported => 0x8000_0000_0000_0003,
            VmcallStatus::Other(raw) => raw,
        }
    }
}

/// Result registers of a TDVMCALL that the TDX module completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmcallOutput {
    /// The VMM's status (R10).
    pub status: VmcallStatus,
    /// R11 (the main output of most sub-functions).
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

/// Failure of a TDVMCALL-based service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmcallError {
    /// The TDX module failed TDG.VP.VMCALL itself (nonzero RAX).
    Tdcall(TdcallError),
    /// The VMM answered with this non-success status.
    Status(VmcallStatus),
}

impl From<TdcallError> for VmcallError {
    fn from(e: TdcallError) -> Self {
        VmcallError::Tdcall(e)
    }
}

/// TDG.VP.VMCALL (leaf 0) with the GHCI standard ABI: RCX = 0xFC00 (R10..R15 exposed),
/// R10 = 0, R11 = sub-function, R12..R15 = arguments.
///
/// A nonzero RAX is a TDX-module failure ([`TdcallError::Status`]); the VMM's own status is
/// returned in [`VmcallOutput::status`] and is not interpreted here.
pub fn vmcall<T: TdCall + ?Sized>(
    tdcall: &T,
    args: VmcallArgs,
) -> Result<VmcallOutput, TdcallError> {
    let mut regs = TdcallRegs {
        rax: leaf::TDG_VP_VMCALL,
        rcx: EXPOSE_R10_R15,
        r10: 0,
        r11: args.subfunction,
        r12: args.r12,
        r13: args.r13,
        r14: args.r14,
        r15: args.r15,
        ..TdcallRegs::default()
    };
    tdcall.tdcall(&mut regs);
    if regs.rax != 0 {
        return Err(TdcallError::Status(regs.rax));
    }
    Ok(VmcallOutput {
        status: VmcallStatus::from_raw(regs.r10),
        r11: regs.r11,
        r12: regs.r12,
        r13: regs.r13,
        r14: regs.r14,
        r15: regs.r15,
    })
}

/// `vmcall` that turns a non-success VMM status into an error.
fn vmcall_ok<T: TdCall + ?Sized>(
    tdcall: &T,
    args: VmcallArgs,
) -> Result<VmcallOutput, VmcallError> {
    let out = vmcall(tdcall, args)?;
    match out.status {
        VmcallStatus::Success => Ok(out),
        status => Err(VmcallError::Status(status)),
    }
}

/// Output of an emulated CPUID.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuidResult {
    /// EAX.
    pub eax: u32,
    /// EBX.
    pub ebx: u32,
    /// ECX.
    pub ecx: u32,
    /// EDX.
    pub edx: u32,
}

/// CPUID through the VMM (sub-function 10): R12 = leaf, R13 = subleaf; out R12..R15 = EAX..EDX.
///
/// The answer is the untrusted VMM's; do not use it for security decisions.
pub fn cpuid<T: TdCall + ?Sized>(
    tdcall: &T,
    leaf: u32,
    subleaf: u32,
) -> Result<CpuidResult, VmcallError> {
    let out = vmcall_ok(
        tdcall,
        VmcallArgs {
            subfunction: subfn::CPUID,
            r12: leaf.into(),
            r13: subleaf.into(),
            ..VmcallArgs::default()
        },
    )?;
    // The registers are 32-bit values in 64-bit registers: the upper halves are dropped.
    Ok(CpuidResult {
        eax: out.r12 as u32,
        ebx: out.r13 as u32,
        ecx: out.r14 as u32,
        edx: out.r15 as u32,
    })
}

/// HLT through the VMM (sub-function 12): R12 = 1 if interrupts are blocked (the VMM must not
/// wake the vCPU for an interrupt the guest cannot take), else 0.
pub fn hlt<T: TdCall + ?Sized>(tdcall: &T, interrupts_blocked: bool) -> Result<(), VmcallError> {
    vmcall_ok(
        tdcall,
        VmcallArgs {
            subfunction: subfn::HLT,
            r12: u64::from(interrupts_blocked),
            ..VmcallArgs::default()
        },
    )?;
    Ok(())
}

/// Width of a port I/O access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoSize {
    /// 1 byte.
    Byte,
    /// 2 bytes.
    Word,
    /// 4 bytes.
    Dword,
}

impl IoSize {
    /// Width in bytes (R12).
    pub const fn bytes(self) -> u64 {
        match self {
            IoSize::Byte => 1,
            IoSize::Word => 2,
            IoSize::Dword => 4,
        }
    }

    const fn mask(self) -> u64 {
        match self {
            IoSize::Byte => 0xff,
            IoSize::Word => 0xffff,
            IoSize::Dword => 0xffff_ffff,
        }
    }
}

const DIRECTION_READ: u64 = 0;
const DIRECTION_WRITE: u64 = 1;

/// Port input through the VMM (sub-function 30): R12 = size, R13 = 0, R14 = port; out R11.
///
/// The result is masked to the access width, so a VMM cannot return bits the instruction could
/// not have produced.
pub fn io_read<T: TdCall + ?Sized>(
    tdcall: &T,
    port: u16,
    size: IoSize,
) -> Result<u32, VmcallError> {
    let out = vmcall_ok(
        tdcall,
        VmcallArgs {
            subfunction: subfn::IO,
            r12: size.bytes(),
            r13: DIRECTION_READ,
            r14: port.into(),
            r15: 0,
        },
    )?;
    // Masked to at most 32 bits, so the cast is lossless.
    Ok((out.r11 & size.mask()) as u32)
}

/// Port output through the VMM (sub-function 30): R12 = size, R13 = 1, R14 = port,
/// R15 = value masked to the access width.
pub fn io_write<T: TdCall + ?Sized>(
    tdcall: &T,
    port: u16,
    size: IoSize,
    value: u32,
) -> Result<(), VmcallError> {
    vmcall_ok(
        tdcall,
        VmcallArgs {
            subfunction: subfn::IO,
            r12: size.bytes(),
            r13: DIRECTION_WRITE,
            r14: port.into(),
            r15: u64::from(value) & size.mask(),
        },
    )?;
    Ok(())
}

/// RDMSR through the VMM (sub-function 31): R12 = MSR; out R11.
pub fn rdmsr<T: TdCall + ?Sized>(tdcall: &T, msr: u32) -> Result<u64, VmcallError> {
    let out = vmcall_ok(
        tdcall,
        VmcallArgs {
            subfunction: subfn::RDMSR,
            r12: msr.into(),
            ..VmcallArgs::default()
        },
    )?;
    Ok(out.r11)
}

/// WRMSR through the VMM (sub-function 32): R12 = MSR, R13 = value.
pub fn wrmsr<T: TdCall + ?Sized>(tdcall: &T, msr: u32, value: u64) -> Result<(), VmcallError> {
    vmcall_ok(
        tdcall,
        VmcallArgs {
            subfunction: subfn::WRMSR,
            r12: msr.into(),
            r13: value,
            ..VmcallArgs::default()
        },
    )?;
    Ok(())
}

/// Width of an MMIO access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmioSize {
    /// 1 byte.
    Byte,
    /// 2 bytes.
    Word,
    /// 4 bytes.
    Dword,
    /// 8 bytes.
    Qword,
}

impl MmioSize {
    /// Width in bytes (R12).
    pub const fn bytes(self) -> u64 {
        match self {
            MmioSize::Byte => 1,
            MmioSize::Word => 2,
            MmioSize::Dword => 4,
            MmioSize::Qword => 8,
        }
    }

    const fn mask(self) -> u64 {
        match self {
            MmioSize::Byte => 0xff,
            MmioSize::Word => 0xffff,
            MmioSize::Dword => 0xffff_ffff,
            MmioSize::Qword => u64::MAX,
        }
    }
}

/// MMIO read through the VMM (#VE.RequestMMIO, sub-function 48): R12 = size, R13 = 0,
/// R14 = address; out R11, masked to the access width.
///
/// `gpa` is the address as accessed, i.e. normally with the shared bit set (MMIO is shared).
pub fn mmio_read<T: TdCall + ?Sized>(
    tdcall: &T,
    gpa: u64,
    size: MmioSize,
) -> Result<u64, VmcallError> {
    let out = vmcall_ok(
        tdcall,
        VmcallArgs {
            subfunction: subfn::REQUEST_MMIO,
            r12: size.bytes(),
            r13: DIRECTION_READ,
            r14: gpa,
            r15: 0,
        },
    )?;
    Ok(out.r11 & size.mask())
}

/// MMIO write through the VMM (sub-function 48): R12 = size, R13 = 1, R14 = address,
/// R15 = value masked to the access width.
pub fn mmio_write<T: TdCall + ?Sized>(
    tdcall: &T,
    gpa: u64,
    size: MmioSize,
    value: u64,
) -> Result<(), VmcallError> {
    vmcall_ok(
        tdcall,
        VmcallArgs {
            subfunction: subfn::REQUEST_MMIO,
            r12: size.bytes(),
            r13: DIRECTION_WRITE,
            r14: gpa,
            r15: value & size.mask(),
        },
    )?;
    Ok(())
}

/// ReportFatalError (sub-function 0x10003): R12 = error code, R13 = 0 (no shared error page).
///
/// A VMM normally terminates the TD; if this returns, the caller must still stop.
pub fn report_fatal_error<T: TdCall + ?Sized>(
    tdcall: &T,
    error_code: u64,
) -> Result<(), VmcallError> {
    vmcall_ok(
        tdcall,
        VmcallArgs {
            subfunction: subfn::REPORT_FATAL_ERROR,
            r12: error_code,
            r13: 0,
            ..VmcallArgs::default()
        },
    )?;
    Ok(())
}

impl core::fmt::Display for VmcallError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            VmcallError::Tdcall(e) => write!(f, "TDG.VP.VMCALL: {e}"),
            VmcallError::Status(s) => write!(f, "TDVMCALL status {:#018x} ({s:?})", s.raw()),
        }
    }
}

impl core::error::Error for VmcallError {}
