//! PVALIDATE (F2 0F 01 FF): RAX = a virtual address of the page, ECX = its
//! size (0: 4K, 1: 2M), EDX = 1 to validate, 0 to rescind. EAX is 0 for
//! success, 1 FAIL_INPUT, 6 FAIL_SIZEMISMATCH; on success CF = 1 means the
//! RMP's Validated bit did not change (AMD APM vol. 2, 15.36; Linux
//! `pvalidate()`). The address is translated as a one-byte read, so it needs
//! a present private (C=1) mapping.
//!
//! The crate's only unsafe code: changing a page's validation is unsafe for
//! the memory it names, and the instruction itself is one `asm!` block.
#![allow(unsafe_code)]

/// PVALIDATE's page size operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageSize {
    /// 4 KiB (ECX = 0).
    Size4K = 0,
    /// 2 MiB (ECX = 1): the address must be 2M-aligned.
    Size2M = 1,
}

impl PageSize {
    /// Bytes.
    pub const fn bytes(self) -> u64 {
        match self {
            PageSize::Size4K => 4096,
            PageSize::Size2M => 2 << 20,
        }
    }
}

/// What the instruction left: EAX and CF.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PvalidateOutcome {
    /// The return code.
    pub rc: u32,
    /// The carry flag.
    pub unchanged: bool,
}

/// The PVALIDATE instruction, injected: [`PvalidateInstruction`] runs the
/// real one; host tests use [`crate::sim`].
pub trait Pvalidate {
    /// PVALIDATE of the page (or 2M block) mapped at `va`.
    ///
    /// # Safety
    /// `va` maps, through a present private (C=1) mapping, the memory the
    /// caller means to change, and nothing uses that memory while its
    /// validation changes: rescinding memory in use makes its next private
    /// access a #VC, and the contents of memory just validated are the
    /// hypervisor's until the caller overwrites them.
    unsafe fn pvalidate(&self, va: u64, size: PageSize, validate: bool) -> PvalidateOutcome;
}

impl<T: Pvalidate + ?Sized> Pvalidate for &T {
    unsafe fn pvalidate(&self, va: u64, size: PageSize, validate: bool) -> PvalidateOutcome {
        // SAFETY: the caller's promise, passed on.
        unsafe { (**self).pvalidate(va, size, validate) }
    }
}

/// Return codes.
pub mod rc {
    /// Success.
    pub const SUCCESS: u32 = 0;
    /// Bad input (size, alignment).
    pub const FAIL_INPUT: u32 = 1;
    /// The RMP entry's page size differs from the request's.
    pub const FAIL_SIZEMISMATCH: u32 = 6;
}

/// A PVALIDATE that did not do what it was asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PvalidateError {
    /// FAIL_INPUT.
    Input,
    /// FAIL_SIZEMISMATCH: the RMP holds the page at 4K (retry at 4K).
    SizeMismatch,
    /// Success with CF = 1: the page was already in the state asked for.
    /// In a conversion that is a hypervisor that did not do what it said
    /// (or took the page away behind the guest's back): never ignore it.
    Unchanged,
    /// Any other return code.
    Other(u32),
}

/// PVALIDATE, with the outcome checked.
///
/// # Safety
/// As [`Pvalidate::pvalidate`].
pub unsafe fn pvalidate(
    instruction: &impl Pvalidate,
    va: u64,
    size: PageSize,
    validate: bool,
) -> Result<(), PvalidateError> {
    // SAFETY: the caller's promise, passed on.
    let outcome = unsafe { instruction.pvalidate(va, size, validate) };
    match outcome.rc {
        rc::SUCCESS if outcome.unchanged => Err(PvalidateError::Unchanged),
        rc::SUCCESS => Ok(()),
        rc::FAIL_INPUT => Err(PvalidateError::Input),
        rc::FAIL_SIZEMISMATCH => Err(PvalidateError::SizeMismatch),
        other => Err(PvalidateError::Other(other)),
    }
}

/// The real PVALIDATE.
///
/// Only constructible through the unsafe [`PvalidateInstruction::new`],
/// where the caller promises to run in an SNP guest at CPL 0.
#[cfg(target_arch = "x86_64")]
#[derive(Debug)]
pub struct PvalidateInstruction {
    _private: (),
}

#[cfg(target_arch = "x86_64")]
impl PvalidateInstruction {
    /// Creates the handle.
    ///
    /// # Safety
    /// The caller must run in an SEV-SNP guest, at CPL 0 (elsewhere the
    /// instruction raises #UD or #GP). Each call has its own contract
    /// ([`Pvalidate::pvalidate`]).
    pub unsafe fn new() -> Self {
        PvalidateInstruction { _private: () }
    }
}

#[cfg(target_arch = "x86_64")]
impl Pvalidate for PvalidateInstruction {
    unsafe fn pvalidate(&self, va: u64, size: PageSize, validate: bool) -> PvalidateOutcome {
        let rc: u64;
        let unchanged: u8;
        // SAFETY: a `PvalidateInstruction` exists only if its creator
        // promised an SNP guest at CPL 0 (`new`), where the instruction is
        // defined; the memory it changes the validation of is the caller's
        // to change (this method's contract). It reads RAX, ECX, EDX,
        // writes EAX and the flags, and touches no memory the compiler
        // knows (its effect is on the RMP).
        // Deliberately no `nomem`: it must be a compiler memory barrier,
        // since it changes whether the page's private contents can be
        // reached; no access to the page may move across it.
        unsafe {
            core::arch::asm!(
                ".byte 0xf2, 0x0f, 0x01, 0xff",
                "setc {unchanged}",
                inout("rax") va => rc,
                in("rcx") size as u64,
                in("rdx") u64::from(validate),
                unchanged = out(reg_byte) unchanged,
                options(nostack),
            );
        }
        PvalidateOutcome {
            rc: rc as u32,
            unchanged: unchanged != 0,
        }
    }
}
