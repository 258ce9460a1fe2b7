//! CR0 and CR4 writes in a TD. The TDX module fixes some bits (TDX module
//! 1.5 `td_vmcs_init.c` guest/host masks and `td_other_exits.c`
//! `td_cr_access_exit`; TDX module base spec, "CR0 and CR4 virtualization"):
//! a write that clears a fixed-1 bit of CR0 (PE, NE, PG) is a #GP(0), one
//! that sets CD or NW (disabling caches) is a #VE with exit reason 28; a
//! CR4 write that clears MCE is a #VE, one that clears PAE or sets VMXE or
//! SMXE is a #GP(0). This is where Linux's PVH entry dies on a real TD (it
//! writes CR0 = PG | PE, without NE). SVM without decode assists (QEMU TCG)
//! reports no operand, so the instruction is decoded here.

const CR0_PE: u64 = 1 << 0;
const CR0_TS: u64 = 1 << 3;
const CR0_NE: u64 = 1 << 5;
const CR0_NW: u64 = 1 << 29;
const CR0_CD: u64 = 1 << 30;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_MCE: u64 = 1 << 6;
const CR4_VMXE: u64 = 1 << 13;
const CR4_SMXE: u64 = 1 << 14;

/// What the TD gets for a control-register write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrWrite {
    /// The write takes effect with this value.
    Apply(u64),
    GeneralProtection,
    /// #VE, exit reason 28 (control-register access).
    VirtualizationException,
}

pub fn cr0_write(new: u64) -> CrWrite {
    if new & (CR0_PE | CR0_NE | CR0_PG) != (CR0_PE | CR0_NE | CR0_PG) || new >> 32 != 0 {
        CrWrite::GeneralProtection
    } else if new & (CR0_CD | CR0_NW) != 0 {
        CrWrite::VirtualizationException
    } else {
        CrWrite::Apply(new)
    }
}

pub fn cr4_write(new: u64) -> CrWrite {
    if new & CR4_PAE == 0 || new & (CR4_VMXE | CR4_SMXE) != 0 {
        CrWrite::GeneralProtection
    } else if new & CR4_MCE == 0 {
        CrWrite::VirtualizationException
    } else {
        CrWrite::Apply(new)
    }
}

/// A decoded instruction that writes CR0 or CR4.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrInstruction {
    /// `mov crN, r64` (0F 22 /r, REX.R extends the CR, REX.B the GPR).
    MovToCr { cr: u8, gpr: u8, length: u8 },
    /// `clts` (0F 06): clears CR0.TS.
    Clts,
}

impl CrInstruction {
    pub const fn length(self) -> u8 {
        match self {
            CrInstruction::MovToCr { length, .. } => length,
            CrInstruction::Clts => 2,
        }
    }
}

/// Decodes the instruction at the faulting RIP (up to 4 bytes; a byte that
/// could not be read is `None`).
pub fn decode(bytes: [Option<u8>; 4]) -> Option<CrInstruction> {
    let (rex, at) = match bytes[0]? {
        prefix @ 0x40..=0x4f => (prefix, 1),
        _ => (0, 0),
    };
    if bytes[at]? != 0x0f {
        return None;
    }
    match bytes.get(at + 1).copied().flatten()? {
        0x06 if rex == 0 => Some(CrInstruction::Clts),
        0x22 => {
            let modrm = bytes.get(at + 2).copied().flatten()?;
            // Register form only (mod = 11); the CPU ignores mod for MOV CR.
            let cr = ((modrm >> 3) & 7) | ((rex & 4) << 1);
            let gpr = (modrm & 7) | ((rex & 1) << 3);
            Some(CrInstruction::MovToCr {
                cr,
                gpr,
                length: at as u8 + 3,
            })
        }
        _ => None,
    }
}

/// CR0 after CLTS.
pub const fn after_clts(cr0: u64) -> u64 {
    cr0 & !CR0_TS
}

/// The VMX exit qualification of a MOV to CR (SDM vol. 3 table 28-3): CR
/// number in 3:0, access type 0 in 5:4, the GPR in 11:8.
pub const fn qualification(cr: u8, gpr: u8) -> u64 {
    (cr as u64 & 0xf) | ((gpr as u64 & 0xf) << 8)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINUX_CR0: u64 = 0x8005_0033;

    #[test]
    fn cr0_without_ne_is_a_general_protection_fault() {
        // Linux's PVH entry: mov $(X86_CR0_PG | X86_CR0_PE), %cr0.
        assert_eq!(cr0_write(CR0_PG | CR0_PE), CrWrite::GeneralProtection);
        assert_eq!(cr0_write(LINUX_CR0 & !CR0_PG), CrWrite::GeneralProtection);
        assert_eq!(cr0_write(LINUX_CR0), CrWrite::Apply(LINUX_CR0));
        assert_eq!(
            cr0_write(LINUX_CR0 | CR0_CD),
            CrWrite::VirtualizationException
        );
    }

    #[test]
    fn cr4_rules() {
        let cr4 = 0x3006f0; // PAE MCE PGE OSFXSR OSXMMEXCPT SMEP SMAP PSE
        assert_eq!(cr4_write(cr4), CrWrite::Apply(cr4));
        assert_eq!(cr4_write(cr4 & !CR4_MCE), CrWrite::VirtualizationException);
        assert_eq!(cr4_write(cr4 & !CR4_PAE), CrWrite::GeneralProtection);
        assert_eq!(cr4_write(cr4 | CR4_VMXE), CrWrite::GeneralProtection);
    }

    #[test]
    fn decodes_mov_to_cr_and_clts() {
        // mov cr0, rax = 0f 22 c0; mov cr4, r9 = 41 0f 22 e1.
        assert_eq!(
            decode([Some(0x0f), Some(0x22), Some(0xc0), None]),
            Some(CrInstruction::MovToCr {
                cr: 0,
                gpr: 0,
                length: 3
            })
        );
        assert_eq!(
            decode([Some(0x41), Some(0x0f), Some(0x22), Some(0xe1)]),
            Some(CrInstruction::MovToCr {
                cr: 4,
                gpr: 9,
                length: 4
            })
        );
        assert_eq!(
            decode([Some(0x0f), Some(0x06), None, None]),
            Some(CrInstruction::Clts)
        );
        assert_eq!(decode([Some(0x0f), Some(0x01), Some(0xf0), None]), None);
        assert_eq!(decode([None, None, None, None]), None);
        assert_eq!(qualification(4, 9), 0x904);
    }
}
