//! How the TDX module 1.5 virtualizes CPUID for a TD, as a pure function of
//! what the underlying CPU answers, plus what the VMM answers through
//! TDVMCALL<Instruction.CPUID>.
//!
//! Sources (intel/tdx-module, branch `tdx_1.5`; facts taken, code not copied):
//! - `src/td_dispatcher/vm_exits/td_cpuid.c` (`td_cpuid_exit`): the out-of-range
//!   remap, the table lookup (#VE if absent or "faulting") and the dynamic
//!   bits (VCPU_INDEX, OSXSAVE, OSPKE, SYSCALL, XSAVE sizes);
//! - `include/auto_gen/cpuid_configurations.c`: the leaf/sub-leaf table, the
//!   FIXED0/FIXED1 masks, the verify masks (bits a host must have, so every
//!   real TD sees them) and the XFAM masks;
//! - `src/vmm_dispatcher/api_calls/tdh_mng_init.c`: how TDH.MNG.INIT turns the
//!   native values into the TD's values (leaf 0x5 needs MONITOR, 0xA needs
//!   ATTRIBUTES.PERFMON, 0xD.n needs XFAM[n], 0x14 needs XFAM.PT, 0x15.EBX is
//!   TSC_FREQUENCY, 0x19 is zero, 0x1C needs XFAM.LBR, 0x1D needs XFAM.AMX,
//!   0x8000_0008 linear bits from LA57);
//! - `src/common/helpers/helpers.c` (`get_cpuid_lookup_entry`): an entry with
//!   sub-leaf "N/A" matches every sub-leaf; the others match one sub-leaf only;
//! - `src/vmm_dispatcher/api_calls/tdh_sys_init.c`, `src/common/x86_defs/x86_defs.h`:
//!   last base leaf 0x23, the hypervisor range 0x4000_0000..=0x4FFF_FFFF.
//!
//! The TD modelled here has ATTRIBUTES without PERFMON, PKS or KL, and an XFAM
//! of x87, SSE and whichever of AVX, AVX-512 and PKRU the base CPU enumerates
//! in CPUID.0xD.0 (no supervisor state: no PT, CET, ULI, LBR; no AMX). The
//! VMM's configurable choices are made for the emulator: MONITOR, DCA,
//! WAITPKG, TME and PCONFIG off, TSC-deadline on, LA57 as the base CPU.
//!
//! Why Linux 6.12 needs this (`arch/x86/coco/tdx/tdx.c` `handle_cpuid`): a
//! CPUID #VE outside the hypervisor range reads as all zeros, so every leaf
//! Linux depends on (0x1, 0x7, 0xD, 0x15, 0x8000_0001, ...) must be native.

/// `CPUID_LAST_BASE_LEAF` (x86_defs.h; `tdh_sys_init.c` sets
/// `cpuid_last_base_leaf` to it).
pub const LAST_BASE_LEAF: u32 = 0x23;
/// `CPUID_LAST_EXTENDED_LEAF` (x86_defs.h). The module uses the host's
/// CPUID.0x8000_0000.EAX, which `tdh_sys_init.c` requires to be at least this;
/// the emulator models a host that reports exactly this.
pub const LAST_EXTENDED_LEAF: u32 = 0x8000_0008;
/// `CPUID_MAX_EXTENDED_VAL_LEAF` (x86_defs.h): start of the extended range.
pub const EXTENDED_START: u32 = 0x8000_0000;
/// `CPUID_RESERVED_START` / `CPUID_RESERVED_END` (x86_defs.h).
pub const HYPERVISOR_START: u32 = 0x4000_0000;
pub const HYPERVISOR_END: u32 = 0x4FFF_FFFF;

/// CPUID.0x15.ECX, fixed by the module (`cpuid_configurations.c` leaf 0x15
/// FIXED1 ECX = 0x17D7840): the nominal core crystal clock, 25 MHz.
pub const CRYSTAL_HZ: u32 = 25_000_000;

/// "GenuineIntel": CPUID.0 EBX, ECX, EDX (the module's verify values for
/// leaf 0; a TDX host is always Intel).
pub const VENDOR_INTEL: [u32; 3] = [0x756e_6547, 0x6c65_746e, 0x4965_6e69];
/// "IntelTDX    ": CPUID.0x21.0 EBX, ECX, EDX (`cpuid_configurations.c` leaf
/// 0x21.0 FIXED1; Linux `arch/x86/coco/tdx/tdx.c` `tdx_early_init` compares
/// EBX, EDX, ECX against "Inte", "lTDX", "    ").
pub const TDX_SIGNATURE: [u32; 3] = [0x6574_6e49, 0x2020_2020, 0x5844_546c];
/// "KVMKVMKVM\0\0\0": CPUID.0x4000_0000 EBX, ECX, EDX as KVM answers
/// (`arch/x86/kvm/cpuid.c`, `KVM_SIGNATURE`).
pub const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];

/// What the emulator knows when it answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuidConfig {
    /// The TD's TSC frequency (what the guest's TSC really advances at).
    pub tsc_hz: u64,
    /// Number of vCPUs (not needed by any rule below: the module does not
    /// derive CPUID from it; kept for the callers).
    pub vcpus: u32,
    /// Guest physical address width (48 or 52); the shared bit is GPAW-1.
    pub gpaw: u8,
}

/// How a CPUID executed in the TD is answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuidAnswer {
    /// Answered by the TDX module itself, no #VE: EAX, EBX, ECX, EDX.
    Native([u32; 4]),
    /// The module raises #VE (exit reason 10, CPUID); the guest then asks the
    /// VMM or (Linux, outside the hypervisor range) reads zeros.
    VirtualizationException,
}

const EAX: usize = 0;
const EBX: usize = 1;
const ECX: usize = 2;
const EDX: usize = 3;

const fn bit(n: u32) -> u32 {
    1 << n
}

/// True for the hypervisor range, which is never remapped and always #VEs
/// (`td_cpuid.c`: the remap skips `CPUID_RESERVED_START..=END`, and the table
/// has no entry there).
pub const fn is_hypervisor_leaf(leaf: u32) -> bool {
    leaf >= HYPERVISOR_START && leaf <= HYPERVISOR_END
}

/// The leaf the module actually looks up (`td_cpuid.c`): outside the
/// hypervisor range, a leaf above the last extended leaf, or above the last
/// base leaf but below the extended range, is treated as the last base leaf
/// (0x23). The sub-leaf is kept as it is.
pub const fn effective_leaf(leaf: u32) -> u32 {
    if is_hypervisor_leaf(leaf) {
        leaf
    } else if leaf > LAST_EXTENDED_LEAF || (leaf > LAST_BASE_LEAF && leaf < EXTENDED_START) {
        LAST_BASE_LEAF
    } else {
        leaf
    }
}

/// CPUID.0x15.EBX: the TSC frequency in units of 25 MHz, rounded to nearest
/// and at least 1 (`tdh_mng_init.c`: EBX = TD_PARAMS.TSC_FREQUENCY, which is
/// in units of 25 MHz; TSC Hz = ECX * EBX / EAX with EAX fixed 1). Linux
/// `arch/x86/kernel/tsc.c` `native_calibrate_tsc` computes the same product.
pub fn tsc_ratio_25mhz(tsc_hz: u64) -> u32 {
    let crystal = u64::from(CRYSTAL_HZ);
    let ratio = tsc_hz.saturating_add(crystal / 2) / crystal;
    u32::try_from(ratio).unwrap_or(u32::MAX).max(1)
}

// ---------------------------------------------------------------------------
// XFAM (`cpuid_configurations.c` xfam_mask_* tables; applied by
// `tdh_mng_init.c` `apply_cpuid_xfam_masks`: for each XFAM bit that is 0, the
// listed CPUID bits are cleared).

/// XFAM bits the emulated TD may have: x87 (0), SSE (1), AVX (2), AVX-512
/// opmask/ZMM_Hi256/Hi16_ZMM (5-7), PKRU (9). No PT (8), CET (11, 12),
/// ULI (14), LBR (15), AMX (17, 18): their MSRs #GP (see msr.rs).
const XFAM_ALLOWED: u32 = 0b11 | bit(2) | bit(5) | bit(6) | bit(7) | bit(9);

struct XfamMask {
    xfam_bit: u32,
    regs: [u32; 4],
}

const fn xm(xfam_bit: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> XfamMask {
    XfamMask {
        xfam_bit,
        regs: [eax, ebx, ecx, edx],
    }
}

/// xfam_mask_0x1_0xffffffff: AVX gates FMA, AVX, F16C.
const XFAM_LEAF_1: &[XfamMask] = &[xm(2, 0, 0, 0x3000_1000, 0)];
/// xfam_mask_0x7_0x0.
const XFAM_LEAF_7_0: &[XfamMask] = &[
    xm(2, 0, 0x20, 0x600, 0),
    xm(5, 0, 0xdc23_0000, 0x5842, 0x0080_010c),
    xm(6, 0, 0xdc23_0000, 0x5842, 0x0080_010c),
    xm(7, 0, 0xdc23_0000, 0x5842, 0x0080_010c),
    xm(8, 0, 0x0200_0000, 0, 0),
    xm(9, 0, 0, 0x8, 0),
    xm(11, 0, 0, 0x80, 0x0010_0000),
    xm(12, 0, 0, 0x80, 0x0010_0000),
    xm(14, 0, 0, 0, 0x20),
    xm(15, 0, 0, 0, 0x0008_0000),
    xm(17, 0, 0, 0, 0x0340_0000),
    xm(18, 0, 0, 0, 0x0340_0000),
];
/// xfam_mask_0x7_0x1.
const XFAM_LEAF_7_1: &[XfamMask] = &[
    xm(5, 0x30, 0, 0, 0),
    xm(6, 0x30, 0, 0, 0),
    xm(7, 0x30, 0, 0, 0),
];
/// xfam_mask_0xd_0x0.
const XFAM_LEAF_D_0: &[XfamMask] = &[
    xm(2, 0x4, 0, 0, 0),
    xm(5, 0xe0, 0, 0, 0),
    xm(6, 0xe0, 0, 0, 0),
    xm(7, 0xe0, 0, 0, 0),
    xm(9, 0x200, 0, 0, 0),
    xm(17, 0x0006_0000, 0, 0, 0),
    xm(18, 0x0006_0000, 0, 0, 0),
];
/// xfam_mask_0xd_0x1.
const XFAM_LEAF_D_1: &[XfamMask] = &[
    xm(8, 0, 0, 0x100, 0),
    xm(11, 0, 0, 0x1800, 0),
    xm(12, 0, 0, 0x1800, 0),
    xm(14, 0, 0, 0x4000, 0),
    xm(15, 0, 0, 0x8000, 0),
];

fn apply_xfam(regs: &mut [u32; 4], xfam: u32, table: &[XfamMask]) {
    for mask in table {
        if xfam & bit(mask.xfam_bit) == 0 {
            for (reg, m) in regs.iter_mut().zip(mask.regs) {
                *reg &= !m;
            }
        }
    }
}

fn and_not(regs: [u32; 4], clear: [u32; 4]) -> [u32; 4] {
    [
        regs[EAX] & !clear[EAX],
        regs[EBX] & !clear[EBX],
        regs[ECX] & !clear[ECX],
        regs[EDX] & !clear[EDX],
    ]
}

/// What the base CPU answers for a leaf it really has. Intel CPUs (and QEMU,
/// `target/i386/cpu.c` `cpu_x86_cpuid`) answer a leaf above their maximum
/// with the data of their highest basic leaf; the module samples real leaves
/// only, so a leaf the base CPU lacks reads as zeros here.
fn base_leaf(base: &impl Fn(u32, u32) -> [u32; 4], leaf: u32, subleaf: u32) -> [u32; 4] {
    let present = if leaf < EXTENDED_START {
        leaf <= base(0, 0)[EAX]
    } else {
        let max_ext = base(EXTENDED_START, 0)[EAX];
        max_ext >= EXTENDED_START && leaf <= max_ext
    };
    if present {
        base(leaf, subleaf)
    } else {
        [0; 4]
    }
}

/// The TD's XFAM: x87 and SSE, plus the allowed user components the base CPU
/// enumerates in CPUID.0xD.0.EAX (`tdh_mng_init.c` checks XFAM against the
/// CPU; the TD's VMM picks it).
fn td_xfam(base: &impl Fn(u32, u32) -> [u32; 4]) -> u32 {
    let supported = base_leaf(base, 0xD, 0)[EAX];
    0b11 | (supported & XFAM_ALLOWED)
}

// CPUID.1 bits.
const L1_ECX_MONITOR: u32 = bit(3);
const L1_ECX_VMX: u32 = bit(5);
const L1_ECX_SMX: u32 = bit(6);
const L1_ECX_DCA: u32 = bit(18);
const L1_ECX_X2APIC: u32 = bit(21);
const L1_ECX_TSC_DEADLINE: u32 = bit(24);
const L1_ECX_HYPERVISOR: u32 = bit(31);
const L1_EDX_APIC: u32 = bit(9);
const L1_EDX_CLFLUSH: u32 = bit(19);

// CPUID.7.0 bits.
const L7_ECX_WAITPKG: u32 = bit(5);
const L7_ECX_CET_SS: u32 = bit(7);
const L7_ECX_TME: u32 = bit(13);
const L7_ECX_LA57: u32 = bit(16);
const L7_ECX_KL: u32 = bit(23);
const L7_ECX_PKS: u32 = bit(31);
const L7_EDX_PCONFIG: u32 = bit(18);
const L7_EDX_CET_IBT: u32 = bit(20);
const L7_EDX_ARCH_CAPABILITIES: u32 = bit(29);
const L7_EDX_CORE_CAPABILITIES: u32 = bit(30);

const EXT1_EDX_SYSCALL: u32 = bit(11);
const EXT7_EDX_INVARIANT_TSC: u32 = bit(8);

/// Leaf 0x4 for a base CPU that has none (QEMU's AMD-vendor models answer
/// zeros, `target/i386/cpu.c` with `vendor-cpuid-only`): a plausible Intel
/// cache hierarchy with 64-byte lines, each cache private to its vCPU
/// (EAX[25:14] = 0, EAX[31:26] = 0), so Linux's cacheinfo and topology agree
/// with leaf 0x1. Sub-leaf 3 is an L3 (the module's verify values require
/// level 3 there and EDX[0] = 0; line size 64 in every sub-leaf).
const SYNTHETIC_LEAF_4: [[u32; 4]; 4] = [
    // L1d: type 1, level 1, self-initializing; 8 ways, 64 sets: 32 KiB.
    [0x121, (7 << 22) | 63, 63, 0],
    // L1i: type 2, level 1; 8 ways, 64 sets: 32 KiB.
    [0x122, (7 << 22) | 63, 63, 0],
    // L2: type 3, level 2; 16 ways, 1024 sets: 1 MiB.
    [0x143, (15 << 22) | 63, 1023, 0],
    // L3: type 3, level 3; 16 ways, 16384 sets: 16 MiB.
    [0x163, (15 << 22) | 63, 16383, 0],
];

/// How the TD's CPUID is answered, for a vCPU in 64-bit mode (Linux runs all
/// its CPUIDs in long mode on the 64-bit boot protocol and the TDX AP wakeup).
/// `base(leaf, subleaf)` is what the underlying CPU (QEMU TCG's qemu64 model,
/// an AMD-vendor CPU) answers; it must reflect the guest's CR4.OSXSAVE,
/// CR4.PKE and XCR0/XSS (the module makes CPUID.1:ECX[27] and
/// CPUID.7.0:ECX[4] follow the guest's CR4 and takes CPUID.0xD.0/1:EBX from
/// the CPU with the guest's XCR0, `td_cpuid.c`). `base` may be called
/// several times per answer (it is also asked for leaves 0x0, 0x7, 0xD and
/// 0x8000_0000 to check ranges and derive XFAM and LA57).
pub fn td_cpuid(
    leaf: u32,
    subleaf: u32,
    vcpu_index: u32,
    config: &CpuidConfig,
    base: impl Fn(u32, u32) -> [u32; 4],
) -> CpuidAnswer {
    td_cpuid_in_mode(leaf, subleaf, vcpu_index, config, true, base)
}

/// As [`td_cpuid`], with the vCPU's mode: CPUID.0x8000_0001:EDX[11]
/// (SYSCALL) reads 1 only in 64-bit mode (`td_cpuid.c`,
/// `is_td_guest_in_64b_mode`).
pub fn td_cpuid_in_mode(
    leaf: u32,
    subleaf: u32,
    vcpu_index: u32,
    config: &CpuidConfig,
    long_mode: bool,
    base: impl Fn(u32, u32) -> [u32; 4],
) -> CpuidAnswer {
    match native_value(
        effective_leaf(leaf),
        subleaf,
        vcpu_index,
        config,
        long_mode,
        &base,
    ) {
        Some(regs) => CpuidAnswer::Native(regs),
        None => CpuidAnswer::VirtualizationException,
    }
}

/// The table of `cpuid_configurations.c` with `tdh_mng_init.c`'s rules, for
/// the TD described in the module documentation. `None` = #VE (no entry for
/// this leaf/sub-leaf, or an entry marked faulting).
fn native_value(
    leaf: u32,
    subleaf: u32,
    vcpu_index: u32,
    config: &CpuidConfig,
    long_mode: bool,
    base: &impl Fn(u32, u32) -> [u32; 4],
) -> Option<[u32; 4]> {
    let xfam = td_xfam(base);
    // Entries whose sub-leaf is N/A match every sub-leaf; the module sampled
    // them with sub-leaf 0.
    let regs = match leaf {
        // Leaf 0: EAX FIXED1 0x23 (FIXED0 the rest of EAX); vendor verified
        // GenuineIntel. Linux needs Intel: `native_calibrate_tsc` returns 0
        // for other vendors (arch/x86/kernel/tsc.c).
        0x0 => [
            LAST_BASE_LEAF,
            VENDOR_INTEL[0],
            VENDOR_INTEL[1],
            VENDOR_INTEL[2],
        ],
        0x1 => leaf_1(vcpu_index, xfam, base),
        // 0x3, 0x8, 0xE, 0x11, 0x12, 0x13, 0x20, 0x22: in the table with
        // every bit FIXED0 (all zeros).
        0x3 | 0x8 | 0xE | 0x11 | 0x12 | 0x13 | 0x20 | 0x22 => [0; 4],
        0x4 => leaf_4(subleaf, base)?,
        // Leaf 5 is zeroed unless CPUID.1:ECX.MONITOR is configured
        // (`tdh_mng_init.c`); the emulator configures it 0.
        0x5 => [0; 4],
        // Leaf 6: entry marked faulting (#VE); Linux reads zeros (no ARAT,
        // no EPB, no HWP).
        0x6 => return None,
        0x7 => leaf_7(subleaf, xfam, base)?,
        // Leaf 0xA is zero unless ATTRIBUTES.PERFMON (`tdh_mng_init.c`).
        0xA => [0; 4],
        0xD => leaf_d(subleaf, xfam, base)?,
        // Leaf 0x14 (PT) is zero unless XFAM.PT; sub-leaves 0 and 1 only.
        0x14 => match subleaf {
            0 | 1 => [0; 4],
            _ => return None,
        },
        // Leaf 0x15: EAX FIXED1 1, ECX FIXED1 0x17D7840, EDX FIXED0,
        // EBX = TSC_FREQUENCY (`tdh_mng_init.c`). Linux takes the TSC
        // frequency from it (arch/x86/kernel/tsc.c `native_calibrate_tsc`).
        0x15 => [1, tsc_ratio_25mhz(config.tsc_hz), CRYSTAL_HZ, 0],
        // Leaf 0x19 (Key Locker) is zeroed (`tdh_mng_init.c`).
        0x19 => [0; 4],
        // Leaf 0x1C (arch LBR) is zero unless XFAM.LBR.
        0x1C => [0; 4],
        // Leaf 0x1D (AMX tiles), sub-leaves 0 and 1, zero unless XFAM.AMX.
        0x1D => match subleaf {
            0 | 1 => [0; 4],
            _ => return None,
        },
        // Leaf 0x1E (TMUL): native (verify_same, no FIXED bits).
        0x1E => base_leaf(base, 0x1E, 0),
        // Leaf 0x1F.0-5: faulting; other sub-leaves: not in the table. Linux
        // then falls back to leaf 0x1/0x4 topology (0xB is #VE too).
        0x1F => return None,
        // Leaf 0x21.0: the TDX signature; other sub-leaves not in the table.
        0x21 => match subleaf {
            0 => [0, TDX_SIGNATURE[0], TDX_SIGNATURE[1], TDX_SIGNATURE[2]],
            _ => return None,
        },
        // Leaf 0x23.0-3 (perfmon extensions), FIXED0 masks per sub-leaf.
        0x23 => match subleaf {
            0 => and_not(base_leaf(base, 0x23, 0), [0xffff_fff0, 0, !0, !0]),
            1 => and_not(base_leaf(base, 0x23, 1), [0, 0, !0, !0]),
            2 => [0; 4],
            3 => and_not(base_leaf(base, 0x23, 3), [0, !0, !0, !0]),
            _ => return None,
        },
        // 0x8000_0000: EAX FIXED1 0x8000_0008, EBX/ECX/EDX FIXED0 (an Intel
        // CPU has no vendor string there). Keeps Linux's SEV code
        // (`sme_enable`) from reading 0x8000_001F.
        0x8000_0000 => [LAST_EXTENDED_LEAF, 0, 0, 0],
        0x8000_0001 => {
            let b = base_leaf(base, 0x8000_0001, 0);
            // FIXED0 ECX 0xfffffede: only LAHF (0), LZCNT (5), PREFETCHW (8)
            // remain, so SVM (2) is cleared. FIXED0 EDX 0xd3efffff: only
            // SYSCALL (11), NX (20), 1G pages (26), RDTSCP (27), LM (29).
            // SYSCALL is dynamic: 1 in 64-bit mode (`td_cpuid.c`).
            let mut edx = b[EDX] & 0x2c10_0800 & !EXT1_EDX_SYSCALL;
            if long_mode {
                edx |= EXT1_EDX_SYSCALL;
            }
            [0, 0, b[ECX] & 0x121, edx]
        }
        // 0x8000_0006: faulting (#VE).
        0x8000_0006 => return None,
        // 0x8000_0007: only EDX[8] invariant TSC, which the module verifies
        // on the host, so every TD sees it (Linux: X86_FEATURE_CONSTANT_TSC
        // and NONSTOP_TSC, arch/x86/kernel/cpu/intel.c).
        0x8000_0007 => [0, 0, 0, EXT7_EDX_INVARIANT_TSC],
        0x8000_0008 => leaf_8000_0008(config, base),
        // Everything else (0x2, 0x9, 0xB, 0x10, 0x16-0x18, 0x1A, 0x1B,
        // 0x8000_0002-5, the hypervisor range, ...) has no table entry.
        _ => return None,
    };
    Some(regs)
}

fn leaf_1(vcpu_index: u32, xfam: u32, base: &impl Fn(u32, u32) -> [u32; 4]) -> [u32; 4] {
    let b = base_leaf(base, 0x1, 0);
    // EAX: family/model/stepping (config_direct; 0 = native); FIXED0
    // 0xf000c000 (reserved bits).
    let eax = b[EAX] & !0xf000_c000;
    // EBX: [7:0] brand index FIXED0; [15:8] CLFLUSH line size, verified 8
    // (64 bytes) on the host; [23:16] logical processor count,
    // config_direct (as the base CPU); [31:24] initial APIC ID = VCPU_INDEX
    // (`td_cpuid.c`). Truncation to 8 bits is the register's width.
    let ebx = ((vcpu_index & 0xff) << 24) | (b[EBX] & 0x00ff_0000) | (8 << 8);
    // ECX: FIXED1 hypervisor (31). x2APIC (21) is verified on the host and
    // native, so always 1 (Linux: INTEL_TDX_GUEST depends on X86_X2APIC).
    // TSC-deadline (24) is configurable: on (Linux's lapic-deadline timer).
    // FIXED0_OR_DYNAMIC 0x08010060: VMX (5), SMX (6), bit 16, OSXSAVE (27,
    // dynamic = guest CR4.OSXSAVE, which `base` reflects, so kept).
    // MONITOR (3) and DCA (18) are configurable: off (Linux would pick
    // mwait_idle, `arch/x86/kernel/process.c` `prefer_mwait_c1_over_halt`;
    // MONITOR/MWAIT #VE; DCA would make MSRs 0x1F8-0x1FA #VE, see msr.rs).
    let mut ecx = b[ECX] & !(L1_ECX_VMX | L1_ECX_SMX | bit(16) | L1_ECX_MONITOR | L1_ECX_DCA);
    ecx |= L1_ECX_HYPERVISOR | L1_ECX_X2APIC | L1_ECX_TSC_DEADLINE;
    // EDX: FIXED1 APIC (9); CLFLUSH (19) verified on the host (Linux's
    // `cpa_flush` needs it, else WBINVD, which #VEs); FIXED0 bits 10, 17,
    // 20, 30. MCE (7), MCA (14) and the rest as the base CPU.
    let mut edx = b[EDX] & !(bit(10) | bit(17) | bit(20) | bit(30));
    edx |= L1_EDX_APIC | L1_EDX_CLFLUSH;
    let mut regs = [eax, ebx, ecx, edx];
    apply_xfam(&mut regs, xfam, XFAM_LEAF_1);
    regs
}

fn leaf_4(subleaf: u32, base: &impl Fn(u32, u32) -> [u32; 4]) -> Option<[u32; 4]> {
    let index = match subleaf {
        0..=3 => subleaf as usize,
        // 0x4.4: every bit FIXED0 (the end of the list).
        4 => return Some([0; 4]),
        // No entry for 0x4.5 and above: #VE (Linux reads zeros, the same).
        _ => return None,
    };
    // The base CPU's description if it has one (a cache type in sub-leaf 0),
    // else the synthetic one.
    let regs = if base_leaf(base, 0x4, 0)[EAX] & 0x1f != 0 {
        base_leaf(base, 0x4, subleaf)
    } else {
        SYNTHETIC_LEAF_4.get(index).copied().unwrap_or([0; 4])
    };
    // FIXED0: EAX[13:10]; EDX[2] (complex indexing) in sub-leaves 0-2,
    // EDX[31:3] in sub-leaf 3.
    let edx_clear = if subleaf == 3 { 0xffff_fff8 } else { 0x4 };
    Some(and_not(regs, [0x3c00, 0, 0, edx_clear]))
}

fn leaf_7(subleaf: u32, xfam: u32, base: &impl Fn(u32, u32) -> [u32; 4]) -> Option<[u32; 4]> {
    match subleaf {
        0 => {
            let b = base_leaf(base, 0x7, 0);
            // EAX: max sub-leaf, verified 2 on the host and native.
            // FIXED0_OR_DYNAMIC EBX 0x00404006 (TSC_ADJUST (1), SGX (2),
            // MPX (14), bit 22); ECX 0x643e8010 (OSPKE (4, dynamic = CR4.PKE,
            // which `base` reflects, restored below), 15, MAWAU 17-21, 26,
            // 29, SGX_LC 30); EDX 0x002298c3.
            let mut regs = and_not(b, [0, 0x0040_4006, 0x643e_8010, 0x0022_98c3]);
            regs[EAX] = 2;
            regs[ECX] |= b[ECX] & bit(4);
            // PKS reflects ATTRIBUTES.PKS (0) and KL is forced 0
            // (`tdh_mng_init.c`). WAITPKG, TME and PCONFIG are
            // configurable: off (UMWAIT_CONTROL #GPs, TME/MKTME MSRs then
            // #GP, see msr.rs). LA57 is configurable: as the base CPU.
            regs[ECX] &= !(L7_ECX_PKS | L7_ECX_KL | L7_ECX_WAITPKG | L7_ECX_TME);
            // CET (ECX 7, EDX 20) is cleared by the XFAM masks below (no CET
            // state in XFAM); cleared here too for clarity.
            regs[ECX] &= !L7_ECX_CET_SS;
            regs[EDX] &= !(L7_EDX_CET_IBT | L7_EDX_PCONFIG);
            // Deviation: a real TD always has ARCH_CAPABILITIES (29) and
            // CORE_CAPABILITIES (30) (verified on the host). The emulator
            // clears them so Linux does not read MSR 0x10A (answered by the
            // module, msr.rs, but its value is a host's) nor 0xCF (#VE, which
            // the emulated VMM does not answer).
            regs[EDX] &= !(L7_EDX_ARCH_CAPABILITIES | L7_EDX_CORE_CAPABILITIES);
            // TSC_ADJUST (EBX 1) is FIXED0 (mask above): MSR 0x3B #VEs and
            // the VMM errors (msr.rs).
            apply_xfam(&mut regs, xfam, XFAM_LEAF_7_0);
            Some(regs)
        }
        1 => {
            // FIXED0 EAX 0xffffe2cf, EBX/ECX/EDX all.
            let mut regs = and_not(base_leaf(base, 0x7, 1), [0xffff_e2cf, !0, !0, !0]);
            apply_xfam(&mut regs, xfam, XFAM_LEAF_7_1);
            Some(regs)
        }
        // FIXED0 EAX/EBX/ECX all, EDX 0xffffffc0.
        2 => Some(and_not(base_leaf(base, 0x7, 2), [!0, !0, !0, 0xffff_ffc0])),
        // No entry for 0x7.3 and above.
        _ => None,
    }
}

fn leaf_d(subleaf: u32, xfam: u32, base: &impl Fn(u32, u32) -> [u32; 4]) -> Option<[u32; 4]> {
    match subleaf {
        0 => {
            // EAX: supported XCR0 bits, FIXED0 0xfff9fd18 and the XFAM masks.
            // EBX: dynamic, the CPU's size for the current XCR0
            // (`td_cpuid.c` executes CPUID). ECX: the size for XFAM
            // (`calculate_xsave_area_max_size`; the base CPU's value, XFAM
            // being the base CPU's user components). EDX: FIXED0.
            let mut regs = and_not(base_leaf(base, 0xD, 0), [0xfff9_fd18, 0, 0, !0]);
            apply_xfam(&mut regs, xfam, XFAM_LEAF_D_0);
            Some(regs)
        }
        1 => {
            // EAX FIXED0 0xffffffe0 (XSAVEOPT, XSAVEC, XGETBV1, XSAVES,
            // XFD remain); XFD (4) only if an XFAM component supports XFD
            // (AMX; none here). EBX dynamic. ECX (IA32_XSS bits) FIXED0
            // 0xffff26ff and the XFAM masks (no supervisor state: 0).
            let mut regs = and_not(
                base_leaf(base, 0xD, 1),
                [0xffff_ffe0 | bit(4), 0, 0xffff_26ff, !0],
            );
            apply_xfam(&mut regs, xfam, XFAM_LEAF_D_1);
            Some(regs)
        }
        // Sub-leaf n in 2..=18 is zero unless XFAM[n]; EDX FIXED0.
        2..=0x12 => {
            if xfam & bit(subleaf) == 0 {
                Some([0; 4])
            } else {
                Some(and_not(base_leaf(base, 0xD, subleaf), [0, 0, 0, !0]))
            }
        }
        // No entry for 0xD.0x13 and above.
        _ => None,
    }
}

fn leaf_8000_0008(config: &CpuidConfig, base: &impl Fn(u32, u32) -> [u32; 4]) -> [u32; 4] {
    let b = base_leaf(base, 0x8000_0008, 0);
    // EAX[7:0]: physical address bits, native. The shared bit (GPAW-1) must
    // be a legal address bit for Linux's page tables, so the emulator never
    // reports fewer than GPAW (QEMU must then run with phys-bits >= GPAW).
    let phys = (b[EAX] & 0xff).max(u32::from(config.gpaw));
    // EAX[15:8]: linear bits, 57 with LA57 else 48 (`tdh_mng_init.c`);
    // EAX[31:16] FIXED0. LA57 in the TD is the base CPU's (leaf_7).
    let la57 = base_leaf(base, 0x7, 0)[ECX] & L7_ECX_LA57 != 0;
    let linear: u32 = if la57 { 57 } else { 48 };
    // EBX: only WBNOINVD (9) remains; ECX, EDX FIXED0.
    [phys | (linear << 8), b[EBX] & bit(9), 0, 0]
}

/// What the VMM (KVM-like) answers through TDVMCALL<Instruction.CPUID>.
///
/// Hypervisor range (Linux asks the VMM only there, `arch/x86/coco/tdx/tdx.c`
/// `handle_cpuid`): 0x4000_0000 = max leaf 0x4000_0001 and "KVMKVMKVM\0\0\0"
/// (`arch/x86/kvm/cpuid.c`, KVM_CPUID_SIGNATURE); 0x4000_0001 = no features,
/// no hints (KVM_CPUID_FEATURES all zero); everything else zeros, which ends
/// Linux's `hypervisor_cpuid_base` scan of 0x4000_0000 + n*0x100 without a
/// match for the other hypervisors. The KVM signature makes
/// `kvm_init_platform` (arch/x86/kernel/kvm.c) call `mtrr_overwrite_state`
/// so the MTRR code stays quiet.
///
/// Outside the hypervisor range (Linux never asks: it reads zeros without a
/// TDVMCALL) this VMM answers zeros too: it has no view of the base CPU,
/// and zeros are what a Linux guest would see anyway.
pub fn vmm_cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    let _ = subleaf;
    match leaf {
        0x4000_0000 => [
            0x4000_0001,
            KVM_SIGNATURE[0],
            KVM_SIGNATURE[1],
            KVM_SIGNATURE[2],
        ],
        _ => [0; 4],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: CpuidConfig = CpuidConfig {
        tsc_hz: 2_100_000_000,
        vcpus: 4,
        gpaw: 52,
    };

    fn ones(_: u32, _: u32) -> [u32; 4] {
        [!0; 4]
    }

    fn zeros(_: u32, _: u32) -> [u32; 4] {
        [0; 4]
    }

    /// A qemu64-like base: AMD vendor, max basic leaf 0xD, max extended
    /// 0x8000_000A, no leaf 4 (QEMU 7.2 TCG, `target/i386/cpu.c`), and
    /// "garbage" (the highest basic leaf) for leaves above the maximum.
    fn qemu64(leaf: u32, subleaf: u32) -> [u32; 4] {
        let leaf = if (0xE..EXTENDED_START).contains(&leaf) || leaf > 0x8000_000A {
            0xD
        } else {
            leaf
        };
        match (leaf, subleaf) {
            (0, _) => [0xD, 0x6874_7541, 0x444d_4163, 0x6974_6e65],
            // family 15 model 107 stepping 1; 1 logical CPU; SSE3, CX16,
            // POPCNT, hypervisor; FPU..SSE2 with MCE, MCA, MTRR, no CLFLUSH
            // for the test.
            (1, _) => [
                0x0006_0fb1,
                0x0001_0800,
                0x8080_2001,
                0x0787_fbff & !L1_EDX_CLFLUSH,
            ],
            (4, _) => [0; 4],
            (7, 0) => [0, 0x0000_0000, 0, 0],
            (0xD, 0) => [0x3, 0x240, 0, 0x240],
            (0xD, _) => [0x1234, 0x5678, 0x9abc, 0xdef0],
            (0x8000_0000, _) => [0x8000_000A, 0x6874_7541, 0x444d_4163, 0x6974_6e65],
            (0x8000_0001, _) => [0x0006_0fb1, 0, 0x0000_0005, 0x2191_3bff],
            (0x8000_0008, _) => [0x0000_3028, 0, 0, 0],
            _ => [0; 4],
        }
    }

    fn native(leaf: u32, subleaf: u32, base: fn(u32, u32) -> [u32; 4]) -> [u32; 4] {
        match td_cpuid(leaf, subleaf, 3, &CONFIG, base) {
            CpuidAnswer::Native(regs) => regs,
            CpuidAnswer::VirtualizationException => panic!("leaf {leaf:#x}.{subleaf} #VE'd"),
        }
    }

    fn is_ve(leaf: u32, subleaf: u32) -> bool {
        [ones as fn(u32, u32) -> [u32; 4], zeros, qemu64]
            .iter()
            .all(|b| td_cpuid(leaf, subleaf, 0, &CONFIG, b) == CpuidAnswer::VirtualizationException)
    }

    #[test]
    fn native_leaves_do_not_ve() {
        let table: &[(u32, &[u32])] = &[
            (0x0, &[0, 7]),
            (0x1, &[0, 9]),
            (0x3, &[0]),
            (0x4, &[0, 1, 2, 3, 4]),
            (0x5, &[0]),
            (0x7, &[0, 1, 2]),
            (0x8, &[0]),
            (0xA, &[0]),
            (0xD, &[0, 1, 2, 5, 0x11, 0x12]),
            (0xE, &[0]),
            (0x11, &[0]),
            (0x12, &[0, 3]),
            (0x13, &[0]),
            (0x14, &[0, 1]),
            (0x15, &[0, 1]),
            (0x19, &[0]),
            (0x1C, &[0]),
            (0x1D, &[0, 1]),
            (0x1E, &[0, 1]),
            (0x20, &[0]),
            (0x21, &[0]),
            (0x22, &[0]),
            (0x23, &[0, 1, 2, 3]),
            (0x8000_0000, &[0]),
            (0x8000_0001, &[0]),
            (0x8000_0007, &[0]),
            (0x8000_0008, &[0]),
        ];
        for &(leaf, subleaves) in table {
            for &sub in subleaves {
                for base in [ones as fn(u32, u32) -> [u32; 4], zeros, qemu64] {
                    assert!(
                        matches!(
                            td_cpuid(leaf, sub, 1, &CONFIG, base),
                            CpuidAnswer::Native(_)
                        ),
                        "{leaf:#x}.{sub}"
                    );
                }
            }
        }
    }

    #[test]
    fn ve_leaves() {
        let table: &[(u32, u32)] = &[
            (0x2, 0),
            (0x4, 5),
            (0x4, 100),
            (0x6, 0),
            (0x7, 3),
            (0x9, 0),
            (0xB, 0),
            (0xB, 1),
            (0xD, 0x13),
            (0x10, 0),
            (0x14, 2),
            (0x16, 0),
            (0x17, 0),
            (0x18, 0),
            (0x1A, 0),
            (0x1B, 0),
            (0x1D, 2),
            (0x1F, 0),
            (0x1F, 5),
            (0x1F, 6),
            (0x21, 1),
            (0x23, 4),
            (0x8000_0002, 0),
            (0x8000_0003, 0),
            (0x8000_0004, 0),
            (0x8000_0005, 0),
            (0x8000_0006, 0),
        ];
        for &(leaf, sub) in table {
            assert!(is_ve(leaf, sub), "{leaf:#x}.{sub}");
        }
    }

    #[test]
    fn hypervisor_range_always_ves() {
        for leaf in [
            0x4000_0000,
            0x4000_0001,
            0x4000_0100,
            0x4000_0010,
            0x4800_0000,
            0x4FFF_FFFF,
        ] {
            for sub in [0, 1, 0xFFFF_FFFF] {
                assert!(is_ve(leaf, sub), "{leaf:#x}");
            }
            assert_eq!(effective_leaf(leaf), leaf);
        }
    }

    #[test]
    fn out_of_range_leaves_answer_as_0x23() {
        for leaf in [
            0x24,
            0x100,
            0x3FFF_FFFF,
            0x5000_0000,
            0x7FFF_FFFF,
            0x8000_0009,
            0x8000_001F,
            0xC000_0000,
            0xFFFF_FFFF,
        ] {
            assert_eq!(effective_leaf(leaf), 0x23, "{leaf:#x}");
            for sub in [0, 1, 2, 3, 4] {
                for base in [ones as fn(u32, u32) -> [u32; 4], zeros, qemu64] {
                    assert_eq!(
                        td_cpuid(leaf, sub, 0, &CONFIG, base),
                        td_cpuid(0x23, sub, 0, &CONFIG, base),
                        "{leaf:#x}.{sub}"
                    );
                }
            }
        }
        // In-range leaves are not remapped.
        for leaf in [0x0, 0x16, 0x23, 0x8000_0000, 0x8000_0008] {
            assert_eq!(effective_leaf(leaf), leaf);
        }
        // 0x23.0 with an all-ones base: FIXED0 masks applied.
        assert_eq!(native(0x24, 0, ones), [0xf, !0, 0, 0]);
    }

    #[test]
    fn leaf_0_vendor_and_max() {
        for base in [ones as fn(u32, u32) -> [u32; 4], zeros, qemu64] {
            let regs = native(0, 0, base);
            assert_eq!(regs, [0x23, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]);
            let mut vendor = [0u8; 12];
            vendor[..4].copy_from_slice(&regs[EBX].to_le_bytes());
            vendor[4..8].copy_from_slice(&regs[EDX].to_le_bytes());
            vendor[8..].copy_from_slice(&regs[ECX].to_le_bytes());
            assert_eq!(&vendor, b"GenuineIntel");
        }
    }

    #[test]
    fn leaf_0x21_signature() {
        for base in [ones as fn(u32, u32) -> [u32; 4], zeros, qemu64] {
            let regs = native(0x21, 0, base);
            assert_eq!(regs[EAX], 0);
            let mut sig = [0u8; 12];
            sig[..4].copy_from_slice(&regs[EBX].to_le_bytes());
            sig[4..8].copy_from_slice(&regs[EDX].to_le_bytes());
            sig[8..].copy_from_slice(&regs[ECX].to_le_bytes());
            assert_eq!(&sig, b"IntelTDX    ");
        }
    }

    #[test]
    fn leaf_1_forced_bits_all_ones_base() {
        let [eax, ebx, ecx, edx] = native(1, 0, ones);
        assert_eq!(eax, !0xf000_c000);
        assert_eq!(
            ebx, 0x03ff_0800,
            "APIC ID 3, count as base, CLFLUSH 8, brand 0"
        );
        for (bit_no, want) in [
            (31, true),  // hypervisor
            (21, true),  // x2APIC
            (24, true),  // TSC-deadline
            (3, false),  // MONITOR
            (5, false),  // VMX
            (6, false),  // SMX
            (16, false), // reserved, FIXED0
            (18, false), // DCA
            (27, true),  // OSXSAVE as base
            (28, true),  // AVX as base (XFAM has AVX: base 0xD.0 all ones)
            (0, true),   // SSE3 as base
        ] {
            assert_eq!(ecx & bit(bit_no) != 0, want, "ECX bit {bit_no}");
        }
        for (bit_no, want) in [
            (9, true),   // APIC
            (19, true),  // CLFLUSH
            (7, true),   // MCE as base
            (14, true),  // MCA as base
            (12, true),  // MTRR as base
            (10, false), // FIXED0
            (17, false), // FIXED0
            (20, false), // FIXED0
            (30, false), // FIXED0
        ] {
            assert_eq!(edx & bit(bit_no) != 0, want, "EDX bit {bit_no}");
        }
    }

    #[test]
    fn leaf_1_forced_bits_all_zeros_base() {
        let regs = native(1, 0, zeros);
        assert_eq!(
            regs,
            [
                0,
                0x0300_0800,
                L1_ECX_HYPERVISOR | L1_ECX_X2APIC | L1_ECX_TSC_DEADLINE,
                L1_EDX_APIC | L1_EDX_CLFLUSH,
            ]
        );
    }

    #[test]
    fn leaf_1_apic_id_follows_vcpu_index() {
        for index in [0u32, 1, 7, 255] {
            let CpuidAnswer::Native(regs) = td_cpuid(1, 0, index, &CONFIG, qemu64) else {
                panic!("leaf 1 #VE'd");
            };
            assert_eq!(regs[EBX] >> 24, index);
            assert_eq!((regs[EBX] >> 16) & 0xff, 1, "logical count as base");
            assert_eq!(regs[EAX], 0x0006_0fb1, "family/model/stepping as base");
            assert_eq!(regs[EDX] & L1_EDX_CLFLUSH, L1_EDX_CLFLUSH);
        }
    }

    #[test]
    fn leaf_1_avx_follows_xfam() {
        // Base advertises AVX in leaf 1 but no YMM state in 0xD.0: cleared.
        let base = |leaf: u32, sub: u32| match (leaf, sub) {
            (0, _) => [0xD, 0, 0, 0],
            (1, _) => [0, 0, bit(28) | bit(12) | bit(29) | bit(0), 0],
            (0xD, 0) => [0x3, 0, 0, 0],
            _ => [0; 4],
        };
        let CpuidAnswer::Native(regs) = td_cpuid(1, 0, 0, &CONFIG, base) else {
            panic!("leaf 1 #VE'd");
        };
        assert_eq!(regs[ECX] & (bit(28) | bit(12) | bit(29)), 0);
        assert_eq!(regs[ECX] & bit(0), bit(0));
    }

    #[test]
    fn leaf_7_0_rules() {
        let [eax, ebx, ecx, edx] = native(7, 0, ones);
        assert_eq!(eax, 2, "max sub-leaf");
        for (reg, bit_no, want, what) in [
            (ebx, 1, false, "TSC_ADJUST"),
            (ebx, 2, false, "SGX"),
            (ebx, 14, false, "MPX"),
            (ebx, 25, false, "PT (XFAM)"),
            (ebx, 5, true, "AVX2"),
            (ebx, 0, true, "FSGSBASE"),
            (ecx, 5, false, "WAITPKG"),
            (ecx, 7, false, "CET_SS"),
            (ecx, 13, false, "TME"),
            (ecx, 16, true, "LA57 as base"),
            (ecx, 23, false, "KL"),
            (ecx, 31, false, "PKS"),
            (ecx, 4, true, "OSPKE as base"),
            (ecx, 3, true, "PKU (XFAM.PKRU)"),
            (edx, 18, false, "PCONFIG"),
            (edx, 20, false, "CET_IBT"),
            (edx, 29, false, "ARCH_CAPABILITIES"),
            (edx, 30, false, "CORE_CAPABILITIES"),
            (edx, 5, false, "UINTR (XFAM)"),
            (edx, 19, false, "ARCH_LBR (XFAM)"),
            (edx, 24, false, "AMX (XFAM)"),
            (edx, 26, true, "IBRS/IBPB"),
            (edx, 10, true, "MD_CLEAR"),
        ] {
            assert_eq!(reg & bit(bit_no) != 0, want, "{what}");
        }
        // LA57 only if the base has it.
        assert_eq!(native(7, 0, zeros), [2, 0, 0, 0]);
        assert_eq!(native(7, 0, qemu64)[ECX] & L7_ECX_LA57, 0);
    }

    #[test]
    fn leaf_7_subleaves_1_2() {
        assert_eq!(native(7, 1, ones), [0x1d30, 0, 0, 0]);
        assert_eq!(native(7, 2, ones), [0, 0, 0, 0x3f]);
        assert_eq!(native(7, 1, zeros), [0; 4]);
    }

    #[test]
    fn leaf_0x15_tsc() {
        assert_eq!(native(0x15, 0, qemu64), [1, 84, 25_000_000, 0]);
        assert_eq!(native(0x15, 0, ones), [1, 84, 0x17D_7840, 0]);
        for (hz, ratio) in [
            (2_100_000_000u64, 84u32),
            (25_000_000, 1),
            (1, 1),
            (0, 1),
            (1_000_000_000, 40),
            (1_012_500_000, 41),
            (1_012_499_999, 40),
            (3_000_000_000, 120),
            (u64::MAX, u32::MAX),
        ] {
            assert_eq!(tsc_ratio_25mhz(hz), ratio, "{hz}");
            let config = CpuidConfig {
                tsc_hz: hz,
                ..CONFIG
            };
            assert_eq!(
                td_cpuid(0x15, 0, 0, &config, zeros),
                CpuidAnswer::Native([1, ratio, CRYSTAL_HZ, 0])
            );
        }
        // Linux's product ECX * EBX / EAX gives the TSC frequency.
        let [eax, ebx, ecx, _] = native(0x15, 0, zeros);
        assert_eq!(
            u64::from(ecx) * u64::from(ebx) / u64::from(eax),
            2_100_000_000
        );
    }

    #[test]
    fn zero_leaves() {
        for (leaf, sub) in [
            (0x3, 0),
            (0x5, 0),
            (0x8, 0),
            (0xA, 0),
            (0xE, 0),
            (0x11, 0),
            (0x12, 0),
            (0x13, 0),
            (0x14, 0),
            (0x14, 1),
            (0x19, 0),
            (0x1C, 0),
            (0x1D, 0),
            (0x1D, 1),
            (0x20, 0),
            (0x22, 0),
            (0x23, 2),
            (0x4, 4),
        ] {
            assert_eq!(native(leaf, sub, ones), [0; 4], "{leaf:#x}.{sub}");
        }
    }

    #[test]
    fn leaf_4_caches() {
        // Base without leaf 4 (qemu64): the synthetic hierarchy.
        for sub in 0..4u32 {
            let regs = native(4, sub, qemu64);
            assert_ne!(regs[EAX] & 0x1f, 0, "cache type");
            assert_eq!((regs[EAX] >> 5) & 7, if sub < 2 { 1 } else { sub }, "level");
            assert_eq!(regs[EBX] & 0xfff, 63, "64-byte lines");
            assert_eq!(regs[EAX] >> 14, 0, "private caches");
        }
        assert_eq!(native(4, 0, qemu64), SYNTHETIC_LEAF_4[0]);
        assert_eq!(native(4, 4, qemu64), [0; 4]);
        // An Intel-like base: passed through with the FIXED0 masks.
        assert_eq!(native(4, 0, ones), [!0x3c00, !0, !0, !0x4]);
        assert_eq!(native(4, 3, ones), [!0x3c00, !0, !0, 0x7]);
    }

    #[test]
    fn leaf_d_xsave() {
        // qemu64: x87+SSE only; sub-leaves 2.. are zero (no XFAM bit).
        assert_eq!(native(0xD, 0, qemu64), [0x3, 0x240, 0, 0]);
        assert_eq!(native(0xD, 2, qemu64), [0; 4]);
        // All-ones base: XFAM = x87, SSE, AVX, AVX-512, PKRU.
        assert_eq!(native(0xD, 0, ones), [0x2e7, !0, !0, 0]);
        assert_eq!(native(0xD, 1, ones), [0xf, !0, 0, 0]);
        assert_eq!(native(0xD, 2, ones), [!0, !0, !0, 0]);
        assert_eq!(native(0xD, 9, ones), [!0, !0, !0, 0]);
        for sub in [3, 4, 8, 11, 12, 14, 15, 17, 18] {
            assert_eq!(native(0xD, sub, ones), [0; 4], "0xD.{sub}");
        }
    }

    #[test]
    fn extended_leaves() {
        assert_eq!(native(0x8000_0000, 0, qemu64), [0x8000_0008, 0, 0, 0]);
        assert_eq!(native(0x8000_0000, 0, ones), [0x8000_0008, 0, 0, 0]);
        // 0x8000_0001: SVM cleared; LAHF, LM, NX, SYSCALL kept.
        let [_, _, ecx, edx] = native(0x8000_0001, 0, qemu64);
        assert_eq!(ecx, 0x1, "LAHF kept, SVM (bit 2) cleared");
        assert_eq!(
            edx & (bit(29) | bit(20) | bit(11)),
            bit(29) | bit(20) | bit(11)
        );
        assert_eq!(native(0x8000_0001, 0, ones), [0, 0, 0x121, 0x2c10_0800]);
        // SYSCALL is 1 in 64-bit mode even if the base lacks it, 0 outside.
        assert_eq!(native(0x8000_0001, 0, zeros), [0, 0, 0, bit(11)]);
        assert_eq!(
            td_cpuid_in_mode(0x8000_0001, 0, 0, &CONFIG, false, ones),
            CpuidAnswer::Native([0, 0, 0x121, 0x2c10_0800 & !bit(11)])
        );
        // 0x8000_0007: only invariant TSC.
        for base in [ones as fn(u32, u32) -> [u32; 4], zeros, qemu64] {
            assert_eq!(native(0x8000_0007, 0, base), [0, 0, 0, 0x100]);
        }
    }

    #[test]
    fn leaf_8000_0008_address_bits() {
        // qemu64 reports 40 physical bits: never fewer than GPAW (52).
        assert_eq!(native(0x8000_0008, 0, qemu64), [52 | (48 << 8), 0, 0, 0]);
        let gpaw48 = CpuidConfig { gpaw: 48, ..CONFIG };
        let base52 = |leaf: u32, _: u32| match leaf {
            0 => [0xD, 0, 0, 0],
            0x8000_0000 => [0x8000_0008, 0, 0, 0],
            0x8000_0008 => [0x3034, 0x200, 0x7, 0x7],
            _ => [0; 4],
        };
        assert_eq!(
            td_cpuid(0x8000_0008, 0, 0, &gpaw48, base52),
            CpuidAnswer::Native([52 | (48 << 8), 0x200, 0, 0]),
            "base above GPAW: the base's value"
        );
        assert_eq!(
            td_cpuid(0x8000_0008, 0, 0, &gpaw48, qemu64),
            CpuidAnswer::Native([48 | (48 << 8), 0, 0, 0])
        );
        // LA57 in the base: 57 linear bits.
        assert_eq!(
            native(0x8000_0008, 0, ones),
            [0xff | (57 << 8), 0x200, 0, 0]
        );
    }

    #[test]
    fn base_leaves_beyond_the_base_maximum_read_zero() {
        // qemu64 answers leaf 0x1E / 0x23 with leaf 0xD's data: not used.
        assert_eq!(native(0x1E, 0, qemu64), [0; 4]);
        assert_eq!(native(0x23, 0, qemu64), [0; 4]);
        assert_eq!(native(0x23, 1, qemu64), [0; 4]);
        assert_eq!(native(0x1E, 5, ones), [!0; 4]);
    }

    #[test]
    fn vmm_cpuid_kvm_signature() {
        let regs = vmm_cpuid(0x4000_0000, 0);
        assert_eq!(regs[EAX], 0x4000_0001);
        let mut sig = [0u8; 12];
        sig[..4].copy_from_slice(&regs[EBX].to_le_bytes());
        sig[4..8].copy_from_slice(&regs[ECX].to_le_bytes());
        sig[8..].copy_from_slice(&regs[EDX].to_le_bytes());
        assert_eq!(&sig, b"KVMKVMKVM\0\0\0");
        assert_eq!(vmm_cpuid(0x4000_0001, 0), [0; 4]);
        for leaf in [
            0x4000_0002,
            0x4000_0010,
            0x4000_0100,
            0x4FFF_FFFF,
            0x0,
            0x1,
            0x8000_0000,
        ] {
            assert_eq!(vmm_cpuid(leaf, 0), [0; 4], "{leaf:#x}");
        }
    }

    #[test]
    fn no_panic_on_any_input() {
        let leaves = [
            0u32,
            1,
            4,
            7,
            0xD,
            0x15,
            0x23,
            0x24,
            0x4000_0000,
            0x8000_0001,
            0x8000_0008,
            u32::MAX,
        ];
        let subs = [0u32, 1, 3, 4, 5, 0x12, 0x13, u32::MAX];
        for &leaf in &leaves {
            for &sub in &subs {
                for idx in [0, 255, 256, u32::MAX] {
                    for config in [
                        CONFIG,
                        CpuidConfig {
                            tsc_hz: 0,
                            vcpus: 0,
                            gpaw: 0,
                        },
                        CpuidConfig {
                            tsc_hz: u64::MAX,
                            vcpus: u32::MAX,
                            gpaw: u8::MAX,
                        },
                    ] {
                        for base in [ones as fn(u32, u32) -> [u32; 4], zeros, qemu64] {
                            let _ = td_cpuid(leaf, sub, idx, &config, base);
                        }
                    }
                }
                let _ = vmm_cpuid(leaf, sub);
            }
        }
    }
}
