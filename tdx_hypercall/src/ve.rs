//! The part of a #VE handler that does an instruction for the TD.
//!
//! In a TD, port I/O, CPUID, RDMSR/WRMSR and HLT may raise #VE instead of executing. The handler
//! reads the event with [`crate::veinfo_get`] (first, before anything that could raise a second
//! #VE), then [`emulate_instruction`] does the instruction through the matching TDVMCALL, as the
//! GHCI describes, writes its results into the interrupted context's registers and steps RIP over
//! it. An EPT violation is not an instruction to redo: it comes back as
//! [`VeError::EptViolation`] for the kernel, which alone knows whether the access was expected.
//!
//! Decoding is separate from doing ([`Instruction::decode`]), so an event this module cannot
//! handle makes no TDVMCALL and leaves the registers untouched.

use crate::{cpuid, hlt, io_read, io_write, rdmsr, wrmsr, IoSize, TdCall, VeInfo, VmcallError};

/// VMX basic exit reasons, as TDG.VP.VEINFO.GET reports them for a #VE.
pub mod exit_reason {
    /// CPUID.
    pub const CPUID: u32 = 10;
    /// HLT.
    pub const HLT: u32 = 12;
    /// INVD (a #VE in a TD whatever the configuration).
    pub const INVD: u32 = 13;
    /// Control-register access (a CR0/CR4 write the TDX module does not allow).
    pub const CR_ACCESS: u32 = 28;
    /// IN/OUT (and INS/OUTS).
    pub const IO: u32 = 30;
    /// RDMSR.
    pub const RDMSR: u32 = 31;
    /// WRMSR.
    pub const WRMSR: u32 = 32;
    /// WBINVD (a #VE in a TD whatever the configuration: a TD flushes
    /// caches by line, with CLFLUSH).
    pub const WBINVD: u32 = 54;
    /// EPT violation: an access the secure EPT did not allow (shared bit disagreeing with the
    /// page's state, or a pending page).
    pub const EPT_VIOLATION: u32 = crate::EXIT_REASON_EPT_VIOLATION;
}

/// RFLAGS.IF.
const RFLAGS_IF: u64 = 1 << 9;
/// The longest x86 instruction.
const MAX_INSTRUCTION_LENGTH: u32 = 15;

/// I/O exit qualification fields (Intel SDM, "Exit Qualification for I/O Instructions").
mod io_qualification {
    /// Bits 2:0: access size minus one.
    pub const SIZE_MINUS_ONE: u64 = 0b111;
    /// Bit 3: direction, 1 = IN.
    pub const DIRECTION_IN: u64 = 1 << 3;
    /// Bit 4: string instruction (INS/OUTS).
    pub const STRING: u64 = 1 << 4;
    /// Bits 31:16: the port.
    pub const PORT_SHIFT: u32 = 16;
}

/// Which way a port access goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoDirection {
    /// OUT: the value comes from AL/AX/EAX.
    Out,
    /// IN: the value goes to AL/AX/EAX.
    In,
}

/// A port access, decoded from the exit qualification of an I/O #VE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoAccess {
    /// Width.
    pub size: IoSize,
    /// Direction.
    pub direction: IoDirection,
    /// The port (from the qualification, so `in al, dx` and `in al, imm8` look the same).
    pub port: u16,
}

impl IoAccess {
    /// Decodes a VMX I/O exit qualification: size = bits 2:0 + 1, bit 3 set for IN, bit 4 for
    /// a string instruction (refused: INS/OUTS would need the guest's memory and RCX, and
    /// nothing in a kernel of this project uses them), port = bits 31:16.
    pub fn decode(qualification: u64) -> Result<IoAccess, VeError> {
        use io_qualification::*;
        if qualification & STRING != 0 {
            return Err(VeError::StringIo { qualification });
        }
        let size = match (qualification & SIZE_MINUS_ONE) + 1 {
            1 => IoSize::Byte,
            2 => IoSize::Word,
            4 => IoSize::Dword,
            _ => return Err(VeError::BadIoSize { qualification }),
        };
        let direction = if qualification & DIRECTION_IN != 0 {
            IoDirection::In
        } else {
            IoDirection::Out
        };
        Ok(IoAccess {
            size,
            direction,
            port: (qualification >> PORT_SHIFT) as u16,
        })
    }
}

/// An instruction a #VE asks the kernel to do for the TD.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Instruction {
    /// IN or OUT.
    Io(IoAccess),
    /// CPUID with EAX = leaf, ECX = subleaf.
    Cpuid,
    /// RDMSR of ECX.
    Rdmsr,
    /// WRMSR of EDX:EAX to ECX.
    Wrmsr,
    /// HLT.
    Hlt,
}

impl Instruction {
    /// What the #VE described by `ve` asks for, without doing it.
    pub fn decode(ve: &VeInfo) -> Result<Instruction, VeError> {
        let instruction = match ve.exit_reason {
            exit_reason::EPT_VIOLATION => return Err(VeError::EptViolation),
            exit_reason::IO => Instruction::Io(IoAccess::decode(ve.exit_qualification)?),
            exit_reason::CPUID => Instruction::Cpuid,
            exit_reason::RDMSR => Instruction::Rdmsr,
            exit_reason::WRMSR => Instruction::Wrmsr,
            exit_reason::HLT => Instruction::Hlt,
            other => return Err(VeError::UnsupportedExitReason(other)),
        };
        // RIP is stepped over the instruction by this length: a bogus one would resume the
        // interrupted code in the middle of an instruction.
        if !(1..=MAX_INSTRUCTION_LENGTH).contains(&ve.instruction_length) {
            return Err(VeError::BadInstructionLength(ve.instruction_length));
        }
        Ok(instruction)
    }
}

/// The interrupted context's registers that the handled instructions read or write.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VeRegs {
    /// RAX.
    pub rax: u64,
    /// RBX.
    pub rbx: u64,
    /// RCX.
    pub rcx: u64,
    /// RDX.
    pub rdx: u64,
    /// RIP: the instruction that raised the #VE; stepped over on success.
    pub rip: u64,
    /// RFLAGS (read only: IF decides whether HLT may be woken by an interrupt).
    pub rflags: u64,
}

/// Why a #VE was not handled here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VeError {
    /// An EPT violation: for the kernel to judge (nothing was done).
    EptViolation,
    /// An exit reason this module does not handle.
    UnsupportedExitReason(u32),
    /// INS/OUTS (qualification bit 4).
    StringIo {
        /// The exit qualification.
        qualification: u64,
    },
    /// An I/O size other than 1, 2 or 4 bytes.
    BadIoSize {
        /// The exit qualification.
        qualification: u64,
    },
    /// An instruction length outside 1..=15.
    BadInstructionLength(u32),
    /// The TDVMCALL failed (the registers are unchanged).
    Vmcall(VmcallError),
}

impl From<VmcallError> for VeError {
    fn from(e: VmcallError) -> Self {
        VeError::Vmcall(e)
    }
}

/// Does the instruction of the #VE described by `ve` through the VMM and steps `regs.rip` over
/// it. IN writes AL or AX (the rest of RAX kept) or EAX (zero-extended into RAX, as a 32-bit
/// register write does); RDMSR and CPUID write their outputs zero-extended. HLT asks the VMM to
/// wake the vCPU for an interrupt only if the interrupted context had IF set (after `sti; hlt`
/// it has: the interrupt is then taken once the handler returns). On any error nothing in
/// `regs` changes.
pub fn emulate_instruction<T: TdCall + ?Sized>(
    tdcall: &T,
    ve: &VeInfo,
    regs: &mut VeRegs,
) -> Result<Instruction, VeError> {
    let instruction = Instruction::decode(ve)?;
    let mut out = *regs;
    match instruction {
        Instruction::Io(IoAccess {
            size,
            direction: IoDirection::In,
            port,
        }) => {
            let value = u64::from(io_read(tdcall, port, size)?);
            out.rax = match size {
                IoSize::Byte => (regs.rax & !0xff) | value,
                IoSize::Word => (regs.rax & !0xffff) | value,
                IoSize::Dword => value,
            };
        }
        Instruction::Io(IoAccess {
            size,
            direction: IoDirection::Out,
            port,
        }) => io_write(tdcall, port, size, regs.rax as u32)?,
        Instruction::Cpuid => {
            let result = cpuid(tdcall, regs.rax as u32, regs.rcx as u32)?;
            out.rax = result.eax.into();
            out.rbx = result.ebx.into();
            out.rcx = result.ecx.into();
            out.rdx = result.edx.into();
        }
        Instruction::Rdmsr => {
            let value = rdmsr(tdcall, regs.rcx as u32)?;
            out.rax = value & 0xffff_ffff;
            out.rdx = value >> 32;
        }
        Instruction::Wrmsr => {
            let value = (regs.rdx << 32) | (regs.rax & 0xffff_ffff);
            wrmsr(tdcall, regs.rcx as u32, value)?;
        }
        Instruction::Hlt => hlt(tdcall, regs.rflags & RFLAGS_IF == 0)?,
    }
    out.rip = regs.rip.wrapping_add(ve.instruction_length.into());
    *regs = out;
    Ok(instruction)
}

impl core::fmt::Display for VeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            VeError::EptViolation => write!(f, "EPT violation"),
            VeError::UnsupportedExitReason(r) => write!(f, "unsupported #VE exit reason {r}"),
            VeError::StringIo { qualification } => {
                write!(f, "string port I/O (qualification {qualification:#x})")
            }
            VeError::BadIoSize { qualification } => {
                write!(
                    f,
                    "port I/O of a bad size (qualification {qualification:#x})"
                )
            }
            VeError::BadInstructionLength(l) => write!(f, "instruction length {l}"),
            VeError::Vmcall(e) => write!(f, "{e}"),
        }
    }
}

impl core::error::Error for VeError {}
