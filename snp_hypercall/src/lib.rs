//! AMD SEV-SNP guest layer.
//!
//! What a guest kernel needs to change a page between private and shared
//! under SEV-SNP, with every answer of the hypervisor checked:
//! - [`msr`]: the GHCB MSR protocol (SEV information with the C-bit,
//!   hypervisor features, GHCB registration, one-page page state change,
//!   termination), behind the [`msr::GhcbMsr`] trait (write the MSR, VMGEXIT,
//!   read it back).
//! - [`psc`]: page state change through the GHCB page for runs of pages,
//!   resuming after partial progress, refusing backwards progress and
//!   bounding stalls, behind the [`psc::GhcbPsc`] trait.
//! - [`pvalidate`]: PVALIDATE behind the [`pvalidate::Pvalidate`] trait, with
//!   [`pvalidate::PvalidateInstruction`] (one `asm!` block) for the real one.
//! - [`ghcb`]: the GHCB page's fields, valid bitmap and shared buffer.
//! - [`c_bit_from_cpuid`]: the C-bit position from CPUID 0x8000_001F.
//!
//! Feature `sim`: a fake hypervisor with a per-4K RMP (shared, private
//! unvalidated, private validated) and scripted misbehaviour, for host tests.
//!
//! Facts and their sources: the project's `docs/` and the research notes it
//! cites (AMD APM vol. 2 section 15.36, the GHCB specification, Linux
//! `arch/x86/include/asm/sev-common.h` and `arch/x86/coco/sev/core.c`).
//! Library code never panics on input: bad input and unexpected answers
//! become typed errors.

#![cfg_attr(not(any(test, feature = "sim")), no_std)]
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod ghcb;
pub mod msr;
pub mod psc;
pub mod pvalidate;

#[cfg(any(test, feature = "sim"))]
pub mod sim;

#[cfg(test)]
#[allow(unsafe_code)]
mod tests;

/// CPUID leaf of the memory-encryption features (EAX: bit 1 SEV, 3 SEV-ES,
/// 4 SEV-SNP; EBX bits 5:0: the C-bit position).
pub const MEMORY_ENCRYPTION_CPUID_LEAF: u32 = 0x8000_001f;

/// Why CPUID 0x8000_001F does not describe an SNP guest this crate can
/// serve.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuidError {
    /// EAX bit 4 (SEV-SNP) is clear.
    NoSnp {
        /// The EAX the leaf returned.
        eax: u32,
    },
    /// The C-bit lies outside the physical-address field (12..=51).
    CBitOutOfRange(u8),
}

/// The C-bit position from CPUID 0x8000_001F (EAX, EBX): SNP must be
/// reported, and the bit must lie in the address field of an entry. Under
/// SNP the leaf's answer comes from the CPUID table page or the GHCB MSR
/// CPUID request; compare it with [`msr::SevInfo::c_bit`].
pub fn c_bit_from_cpuid(eax: u32, ebx: u32) -> Result<u8, CpuidError> {
    if eax & (1 << 4) == 0 {
        return Err(CpuidError::NoSnp { eax });
    }
    let bit = (ebx & 0x3f) as u8;
    if !(12..=51).contains(&bit) {
        return Err(CpuidError::CBitOutOfRange(bit));
    }
    Ok(bit)
}

/// The SEV_STATUS MSR (read-only, never intercepted).
pub const MSR_SEV_STATUS: u32 = 0xc001_0131;
/// SEV_STATUS bit 2: SEV-SNP is active.
pub const SEV_STATUS_SNP: u64 = 1 << 2;
