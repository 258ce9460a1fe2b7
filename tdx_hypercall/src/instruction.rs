//! The real TDCALL instruction: the only unsafe code in the crate.

use crate::{TdCall, TdcallRegs};

/// The real `TDCALL` instruction (`66 0F 01 CC`).
///
/// Only constructible through the unsafe [`TdcallInstruction::new`], which is where the caller
/// promises to be running inside a TD; [`TdCall::tdcall`] is then safe to call.
#[derive(Debug)]
pub struct TdcallInstruction {
    _private: (),
}

impl TdcallInstruction {
    /// Creates the handle.
    ///
    /// # Safety
    ///
    /// The caller must be running inside a TDX trust domain, at CPL 0, in 64-bit mode. Outside
    /// a TD the instruction raises #UD; at CPL > 0 it raises #GP.
    pub unsafe fn new() -> Self {
        TdcallInstruction { _private: () }
    }
}

/// TDVMCALL RCX bits that expose a register the asm below declares as an
/// operand: RDX (2), R8-R15 (8-15). Exposing any other GPR (RBX, RBP, RSI,
/// RDI) or an XMM register (bits 16-31) would let the VMM rewrite a register
/// the compiler believes preserved.
pub const SOUND_VMCALL_EXPOSE_MASK: u64 = 0xff04;

/// The TDCALL leaves whose register use the asm below covers (RAX, RCX, RDX,
/// R8-R15): TDG.VP.VMCALL (0) with a sound RCX bitmap, and leaves 1..=11
/// (VP.INFO, MR.RTMR.EXTEND, VP.VEINFO.GET, MR.REPORT, VP.CPUIDVE.SET,
/// MEM.PAGE.ACCEPT, VM.RD, VM.WR, VP.RD, VP.WR, SYS.RD).
pub const fn is_sound_tdcall(regs: &TdcallRegs) -> bool {
    match regs.rax {
        crate::leaf::TDG_VP_VMCALL => regs.rcx & !SOUND_VMCALL_EXPOSE_MASK == 0,
        1..=11 => true,
        _ => false,
    }
}

impl TdCall for TdcallInstruction {
    /// Refuses, without executing anything, a call [`is_sound_tdcall`] rejects: RAX
    /// then holds TDX_OPERAND_INVALID and the other registers are untouched.
    fn tdcall(&self, regs: &mut TdcallRegs) {
        if !is_sound_tdcall(regs) {
            regs.rax = crate::status::TDX_OPERAND_INVALID;
            return;
        }
        // SAFETY: a `TdcallInstruction` only exists if the creator promised (`new`'s contract)
        // that we run inside a TD at CPL 0 in 64-bit mode, so the instruction is defined. It
        // does not touch the stack. `is_sound_tdcall` admitted only leaves whose registers are all
        // inout operands here, and for TDVMCALL only an RCX bitmap that exposes no other
        // register to the VMM (the TDX module preserves the rest).
        //
        // Deliberately no `nomem`/`readonly`: the asm block must be a compiler memory barrier.
        // ACCEPT zeroes and maps a page and MapGPA changes which alias of a page is backed, so
        // the meaning of memory changes across the call; the compiler must neither cache loads
        // across it nor sink or drop stores past it (a guest once got this wrong).
        unsafe {
            core::arch::asm!(
                ".byte 0x66, 0x0f, 0x01, 0xcc",
                inout("rax") regs.rax,
                inout("rcx") regs.rcx,
                inout("rdx") regs.rdx,
                inout("r8") regs.r8,
                inout("r9") regs.r9,
                inout("r10") regs.r10,
                inout("r11") regs.r11,
                inout("r12") regs.r12,
                inout("r13") regs.r13,
                inout("r14") regs.r14,
                inout("r15") regs.r15,
                options(nostack),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs(rax: u64, rcx: u64) -> TdcallRegs {
        TdcallRegs {
            rax,
            rcx,
            ..TdcallRegs::default()
        }
    }

    #[test]
    fn only_bitmaps_that_expose_declared_registers_are_sound() {
        // Ours (R10-R15) and with RDX, R8, R9.
        assert!(is_sound_tdcall(&regs(0, 0xfc00)));
        assert!(is_sound_tdcall(&regs(0, 0xff04)));
        // Linux's 0xFFCC exposes RBX, RSI, RDI: the VMM could rewrite
        // registers this asm does not declare.
        assert!(!is_sound_tdcall(&regs(0, 0xffcc)));
        assert!(!is_sound_tdcall(&regs(0, 0xfc00 | 1 << 5)), "RBP");
        assert!(!is_sound_tdcall(&regs(0, 0xfc00 | 1 << 16)), "XMM0");
        assert!(!is_sound_tdcall(&regs(0, 0xfc00 | 1 << 32)));
    }

    #[test]
    fn unknown_leaves_are_refused_without_executing() {
        for leaf in [1, 3, 6, 8, 11] {
            assert!(is_sound_tdcall(&regs(leaf, 0)), "leaf {leaf}");
        }
        for leaf in [12, 25, 0x1_0000_0000] {
            assert!(!is_sound_tdcall(&regs(leaf, 0)), "leaf {leaf}");
        }
        // Refused before the instruction: safe to call on the host.
        // SAFETY: never executes TDCALL, since every call below is refused.
        let tdcall = unsafe { TdcallInstruction::new() };
        let mut r = regs(0, 0xffcc);
        r.r12 = 7;
        tdcall.tdcall(&mut r);
        assert_eq!(
            (r.rax, r.rcx, r.r12),
            (crate::status::TDX_OPERAND_INVALID, 0xffcc, 7)
        );
    }
}
