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

impl TdCall for TdcallInstruction {
    fn tdcall(&self, regs: &mut TdcallRegs) {
        // SAFETY: a `TdcallInstruction` only exists if the creator promised (`new`'s contract)
        // that we run inside a TD at CPL 0 in 64-bit mode, so the instruction is defined. It
        // does not touch the stack. All registers the ABI reads or writes for the leaves this
        // crate uses are inout operands (with RCX = 0xFC00 for TDVMCALL, no other GPR is
        // exposed to the VMM and the TDX module preserves the rest).
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
