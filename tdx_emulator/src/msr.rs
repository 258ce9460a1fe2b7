//! How the TDX module 1.5 virtualizes RDMSR/WRMSR for a TD, and what the VMM
//! (KVM-like) answers through TDVMCALL<Instruction.RDMSR/WRMSR>.
//!
//! Sources (intel/tdx-module, branch `tdx_1.5`; facts taken, code not copied):
//! - `include/auto_gen/msr_config_lookup.c`: per MSR range, the bitmap bit
//!   meaning (FIXED_0 = no exit, the CPU executes it; FIXED_1 = exit; DYN_* =
//!   no exit only if the feature is enabled for the TD) and the action on an
//!   exit (#VE, #GP, #GP-or-#VE, or "other" = handled by the module);
//! - `src/td_dispatcher/vm_exits/td_msr_access.c`: an MSR outside the two
//!   bitmap ranges, or absent from the table, #VEs; the handlers for EFER,
//!   DEBUGCTL, XSS writes and MISC_ENABLE, PERF_CAPABILITIES,
//!   ARCH_CAPABILITIES, XAPIC_DISABLE_STATUS, VMX capability reads; which
//!   feature decides each #GP-or-#VE;
//! - `src/common/helpers/helpers.c` (`is_msr_dynamic_bit_cleared`): which TD
//!   feature opens each DYN_* class;
//! - `src/common/helpers/virt_msr_helpers.[ch]`: the virtual
//!   IA32_ARCH_CAPABILITIES; `src/common/x86_defs/msr_defs.h`: bit layouts;
//!   `src/common/x86_defs/vmcs_defs.h`: the bitmap ranges.
//!
//! The TD is the one of cpuid.rs: no PERFMON, PKS, TSX, WAITPKG, DCA, TME or
//! MKTME (PCONFIG); XFAM without PT, CET, ULI, LBR, AMX (so no XFD); with
//! TSC-deadline. Every DYN_* class is therefore closed (its MSRs #GP) and
//! every #GP-or-#VE resolves as below.
//!
//! Where the bitmap is FIXED_0 the module never sees the access: the CPU
//! executes it with the TD's VMCS (virtualize x2APIC mode, APIC-register
//! virtualization, virtual-interrupt delivery). Reading a write-only MSR or
//! writing a read-only one then raises #GP from the CPU itself; those cases
//! are listed here as `GeneralProtection` (Intel SDM vol. 3, "Virtualizing
//! MSR-based APIC accesses" and the x2APIC register table; PRED_CMD and
//! FLUSH_CMD are write-only, ARCH_CAPABILITIES and XAPIC_DISABLE_STATUS
//! read-only).

/// How the TDX module handles an RDMSR (`write == false`) or WRMSR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsrPolicy {
    /// The module handles it without #VE (context-switched or virtualized);
    /// the emulator either lets the CPU execute it (pass through) or
    /// emulates the value given by `native_value`.
    Native,
    /// #VE (exit reason 31 RDMSR / 32 WRMSR); the guest asks the VMM through
    /// TDVMCALL.
    VirtualizationException,
    /// #GP(0) in the TD.
    GeneralProtection,
}

const N: MsrPolicy = MsrPolicy::Native;
const V: MsrPolicy = MsrPolicy::VirtualizationException;
const G: MsrPolicy = MsrPolicy::GeneralProtection;

pub const IA32_TSC: u32 = 0x10;
pub const IA32_PLATFORM_ID: u32 = 0x17;
pub const IA32_APIC_BASE: u32 = 0x1B;
pub const MSR_TEST_CTRL: u32 = 0x33;
pub const IA32_FEAT_CTL: u32 = 0x3A;
pub const IA32_TSC_ADJUST: u32 = 0x3B;
pub const IA32_SPEC_CTRL: u32 = 0x48;
pub const IA32_PRED_CMD: u32 = 0x49;
pub const IA32_MKTME_KEYID_PARTITIONING: u32 = 0x87;
pub const IA32_UCODE_REV: u32 = 0x8B;
pub const IA32_MISC_PACKAGE_CTLS: u32 = 0xBC;
pub const IA32_XAPIC_DISABLE_STATUS: u32 = 0xBD;
pub const MSR_PLATFORM_INFO: u32 = 0xCE;
pub const IA32_MTRRCAP: u32 = 0xFE;
pub const IA32_ARCH_CAPABILITIES: u32 = 0x10A;
pub const IA32_FLUSH_CMD: u32 = 0x10B;
pub const MSR_MISC_FEATURES_ENABLES: u32 = 0x140;
pub const IA32_SYSENTER_CS: u32 = 0x174;
pub const IA32_SYSENTER_ESP: u32 = 0x175;
pub const IA32_SYSENTER_EIP: u32 = 0x176;
pub const IA32_MCG_CAP: u32 = 0x179;
pub const IA32_MCG_STATUS: u32 = 0x17A;
pub const IA32_MCG_CTL: u32 = 0x17B;
pub const IA32_MISC_ENABLE: u32 = 0x1A0;
pub const IA32_DEBUGCTL: u32 = 0x1D9;
pub const IA32_PAT: u32 = 0x277;
pub const IA32_MTRR_DEF_TYPE: u32 = 0x2FF;
pub const IA32_PERF_CAPABILITIES: u32 = 0x345;
pub const IA32_MC0_CTL: u32 = 0x400;
pub const IA32_DS_AREA: u32 = 0x600;
pub const IA32_TSC_DEADLINE: u32 = 0x6E0;
pub const IA32_DEBUG_INTERFACE: u32 = 0xC80;
pub const IA32_XSS: u32 = 0xDA0;
pub const IA32_UARCH_MISC_CTL: u32 = 0x1B01;
pub const IA32_EFER: u32 = 0xC000_0080;
pub const IA32_STAR: u32 = 0xC000_0081;
pub const IA32_LSTAR: u32 = 0xC000_0082;
pub const IA32_CSTAR: u32 = 0xC000_0083;
pub const IA32_FMASK: u32 = 0xC000_0084;
pub const IA32_FS_BASE: u32 = 0xC000_0100;
pub const IA32_GS_BASE: u32 = 0xC000_0101;
pub const IA32_KERNEL_GS_BASE: u32 = 0xC000_0102;
pub const IA32_TSC_AUX: u32 = 0xC000_0103;
pub const X2APIC_TPR: u32 = 0x808;
pub const X2APIC_PPR: u32 = 0x80A;
pub const X2APIC_EOI: u32 = 0x80B;
pub const X2APIC_SELF_IPI: u32 = 0x83F;

/// One range of `msr_config_lookup.c`, resolved for the emulated TD.
struct Entry {
    start: u32,
    end: u32,
    read: MsrPolicy,
    write: MsrPolicy,
}

const fn e(start: u32, end: u32, read: MsrPolicy, write: MsrPolicy) -> Entry {
    Entry {
        start,
        end,
        read,
        write,
    }
}

/// `msr_config_lookup.c`, in its order (sorted by address), each range with
/// the policy its bit meaning and action give for the emulated TD.
const TABLE: &[Entry] = &[
    // IA32_TIME_STAMP_COUNTER: read FIXED_0; write FIXED_1 -> #VE.
    e(0x10, 0x10, N, V),
    // IA32_SPEC_CTRL: FIXED_0 both.
    e(0x48, 0x48, N, N),
    // IA32_PRED_CMD: FIXED_0 both; a read of this write-only MSR #GPs.
    e(0x49, 0x49, G, N),
    // IA32_MKTME_KEYID_PARTITIONING: #GP-or-#VE, #VE only if the TD's
    // CPUID.7.0:EDX.PCONFIG is 1 (`td_msr_access.c`); cpuid.rs clears it.
    e(0x87, 0x87, G, G),
    // IA32_SGXLEPUBKEYHASHx, WBINVDP, WBNOINVDP, INTR_PENDING,
    // SMM_MONITOR_CTL, SMBASE: FIXED_1, #GP.
    e(0x8C, 0x8F, G, G),
    e(0x98, 0x98, G, G),
    e(0x99, 0x99, G, G),
    e(0x9A, 0x9A, G, G),
    e(0x9B, 0x9B, G, G),
    e(0x9E, 0x9E, G, G),
    // IA32_MISC_PACKAGE_CTLS: read FIXED_0; write #VE.
    e(0xBC, 0xBC, N, V),
    // IA32_XAPIC_DISABLE_STATUS: read handled by the module (value 1);
    // write FIXED_0, a read-only MSR: #GP.
    e(0xBD, 0xBD, N, G),
    // IA32_PMCx: DYN_PERFMON, #GP.
    e(0xC1, 0xC8, G, G),
    // IA32_UMWAIT_CONTROL: DYN_UMWAIT (WAITPKG off), #GP.
    e(0xE1, 0xE1, G, G),
    // IA32_ARCH_CAPABILITIES: read handled by the module (virtual value);
    // write FIXED_0, a read-only MSR: #GP.
    e(0x10A, 0x10A, N, G),
    // IA32_FLUSH_CMD: FIXED_0 both; a read of this write-only MSR #GPs.
    e(0x10B, 0x10B, G, N),
    // IA32_TSX_CTRL: DYN_TSX, #GP.
    e(0x122, 0x122, G, G),
    // IA32_SYSENTER_CS/ESP/EIP: FIXED_0.
    e(0x174, 0x176, N, N),
    // IA32_PERFEVTSELx: DYN_PERFMON, #GP.
    e(0x186, 0x18D, G, G),
    // IA32_OVERCLOCKING_STATUS: #GP.
    e(0x195, 0x195, G, G),
    // IA32_MISC_ENABLE: read DYN_PERFMON, handled by the module without
    // PERFMON; write FIXED_1 -> #VE.
    e(0x1A0, 0x1A0, N, V),
    // MSR_OFFCORE_RSPx: DYN_PERFMON, #GP.
    e(0x1A6, 0x1A7, G, G),
    // IA32_XFD, IA32_XFD_ERR: DYN_XFD, #GP.
    e(0x1C4, 0x1C5, G, G),
    // IA32_DEBUGCTL: handled by the module both ways.
    e(0x1D9, 0x1D9, N, N),
    // IA32_PLATFORM_DCA_CAP, CPU_DCA_CAP, DCA_0_CAP: #GP-or-#VE, #VE only
    // with CPUID.1:ECX.DCA, which cpuid.rs clears.
    e(0x1F8, 0x1FA, G, G),
    // MSR_SLAM_ENABLE: #GP.
    e(0x276, 0x276, G, G),
    // IA32_PAT: FIXED_0.
    e(0x277, 0x277, N, N),
    // IA32_FIXED_CTRx: DYN_PERFMON, #GP.
    e(0x309, 0x310, G, G),
    // IA32_PERF_METRICS: DYN_OTHER (needs PERFMON), #GP.
    e(0x329, 0x329, G, G),
    // IA32_PERF_CAPABILITIES: read handled by the module (0 without
    // PERFMON); write DYN_PERFMON, #GP.
    e(0x345, 0x345, N, G),
    // IA32_FIXED_CTR_CTRL, PERF_GLOBAL_STATUS, _CTRL, _STATUS_RESET,
    // _STATUS_SET, _INUSE: DYN_PERFMON, #GP.
    e(0x38D, 0x38D, G, G),
    e(0x38E, 0x38E, G, G),
    e(0x38F, 0x38F, G, G),
    e(0x390, 0x390, G, G),
    e(0x391, 0x391, G, G),
    e(0x392, 0x392, G, G),
    // IA32_PEBS_ENABLE, PEBS_MATRIX_VECT, PEBS_LD_LATENCY, PEBS_FRONTEND:
    // DYN_PERFMON, #GP.
    e(0x3F1, 0x3F1, G, G),
    e(0x3F2, 0x3F2, G, G),
    e(0x3F6, 0x3F6, G, G),
    e(0x3F7, 0x3F7, G, G),
    // IA32_VMX_*: reads handled by the module (virtual values, for TD
    // partitioning) except PINBASED/PROCBASED/EXIT/ENTRY_CTLS and
    // VMCS_ENUM (#VE); writes #GP.
    e(0x480, 0x480, N, G),
    e(0x481, 0x484, V, G),
    e(0x485, 0x489, N, G),
    e(0x48A, 0x48A, V, G),
    e(0x48B, 0x492, N, G),
    // IA32_A_PMCx: DYN_PERFMON, #GP.
    e(0x4C1, 0x4C8, G, G),
    // IA32_SGX_SVN_STATUS: #GP.
    e(0x500, 0x500, G, G),
    // IA32_RTIT_*: DYN_XFAM_PT, #GP.
    e(0x560, 0x561, G, G),
    e(0x570, 0x572, G, G),
    e(0x580, 0x587, G, G),
    // IA32_DS_AREA: FIXED_0.
    e(0x600, 0x600, N, N),
    // IA32_U_CET, S_CET, PL0-3_SSP, INTERRUPT_SSP_TABLE_ADDR: DYN_XFAM_CET,
    // #GP (0x6A1 and 0x6A3 are not in the table: #VE).
    e(0x6A0, 0x6A0, G, G),
    e(0x6A2, 0x6A2, G, G),
    e(0x6A4, 0x6A8, G, G),
    // IA32_TSC_DEADLINE: #GP-or-#VE, #VE because the TD's CPUID has
    // TSC-deadline (cpuid.rs).
    e(0x6E0, 0x6E0, V, V),
    // IA32_PKRS: DYN_PKS, #GP.
    e(0x6E1, 0x6E1, G, G),
    // x2APIC (`msr_config_lookup.c` "Reserved for xAPIC MSRs" = FIXED_1,
    // #GP; TPR, PPR, EOI, ISR, TMR, IRR, SELF_IPI and 0x809/0x80C/0x80E
    // FIXED_0; every other x2APIC register is absent: #VE).
    e(0x800, 0x801, G, G),
    e(0x804, 0x807, G, G),
    // TPR: virtualized both ways (TPR shadow).
    e(0x808, 0x808, N, N),
    // 0x809, 0x80C, 0x80E: FIXED_0 but reserved x2APIC registers: the CPU
    // raises #GP.
    e(0x809, 0x809, G, G),
    // PPR: virtualized read; read-only, a write #GPs.
    e(0x80A, 0x80A, N, G),
    // EOI: virtualized write; write-only, a read #GPs.
    e(0x80B, 0x80B, G, N),
    e(0x80C, 0x80C, G, G),
    e(0x80E, 0x80E, G, G),
    // ISR, TMR, IRR: virtualized reads; read-only, writes #GP.
    e(0x810, 0x817, N, G),
    e(0x818, 0x81F, N, G),
    e(0x820, 0x827, N, G),
    e(0x829, 0x82E, G, G),
    e(0x831, 0x831, G, G),
    // SELF_IPI: virtualized write; write-only, a read #GPs.
    e(0x83F, 0x83F, G, N),
    e(0x840, 0x87F, G, G),
    e(0x880, 0x8BF, G, G),
    e(0x8C0, 0x8FF, G, G),
    // IA32_TME_CAPABILITY, TME_ACTIVATE, TME_EXCLUDE_MASK/BASE: #GP-or-#VE,
    // #VE only with CPUID.7.0:ECX.TME, which cpuid.rs clears.
    e(0x981, 0x984, G, G),
    // IA32_UINTR_*: DYN_XFAM_ULI, #GP.
    e(0x985, 0x98A, G, G),
    // IA32_DEBUG_INTERFACE: read FIXED_0; write #VE.
    e(0xC80, 0xC80, N, V),
    // IA32_BNDCFGS, IA32_PASID: #GP.
    e(0xD90, 0xD90, G, G),
    e(0xD93, 0xD93, G, G),
    // IA32_XSS: read FIXED_0; write handled by the module.
    e(0xDA0, 0xDA0, N, N),
    // IA32_LBR_INFO, LBR_CTL, LBR_DEPTH, LBR_x_FROM_IP, LBR_x_TO_IP:
    // DYN_XFAM_LBR, #GP.
    e(0x1200, 0x12FF, G, G),
    e(0x14CE, 0x14CE, G, G),
    e(0x14CF, 0x14CF, G, G),
    e(0x1500, 0x15FF, G, G),
    e(0x1600, 0x16FF, G, G),
    // IA32_UARCH_MISC_CTL: FIXED_0.
    e(0x1B01, 0x1B01, N, N),
    // IA32_EFER: read FIXED_0; write handled by the module
    // (`wrmsr_ia32_efer`, see `efer_write_allowed`).
    e(0xC000_0080, 0xC000_0080, N, N),
    // IA32_STAR, LSTAR, FMASK: FIXED_0. IA32_CSTAR (0xC000_0083) is not in
    // the table: #VE (Linux `arch/x86/kernel/cpu/common.c` `wrmsrl_cstar`
    // skips the write on Intel because it "raises a #VE trap in a TDX
    // guest").
    e(0xC000_0081, 0xC000_0082, N, N),
    e(0xC000_0084, 0xC000_0084, N, N),
    // IA32_FSBASE, GSBASE, KERNEL_GS_BASE, TSC_AUX: FIXED_0.
    e(0xC000_0100, 0xC000_0103, N, N),
];

/// The MSRs the VMX MSR bitmaps cover: 0..=0x1FFF and
/// 0xC000_0000..=0xC000_1FFF (`vmcs_defs.h` MSR_BITMAP_SIZE 1 KiB per half,
/// HIGH_MSR_START). `td_msr_access.c`: any other MSR #VEs (KVM's
/// 0x4b56_4d00.., Hyper-V's 0x4000_0000.., AMD's 0xC001_xxxx).
pub const fn in_bitmap_range(msr: u32) -> bool {
    msr <= 0x1FFF || (msr >= 0xC000_0000 && msr <= 0xC000_1FFF)
}

fn lookup(msr: u32) -> Option<&'static Entry> {
    TABLE
        .iter()
        .find(|entry| entry.start <= msr && msr <= entry.end)
}

/// How the TDX module handles RDMSR (`write == false`) or WRMSR of `msr` in
/// the emulated TD (`td_msr_access.c` `td_rdmsr_exit`/`td_wrmsr_exit` with
/// `msr_config_lookup.c`). An MSR outside the bitmap ranges or absent from
/// the table #VEs: APIC_BASE 0x1B, the other x2APIC registers (ID, VER,
/// LDR, SVR, ESR, CMCI, ICR, LVTs, TMICT, TMCCT, TDCR), MTRRs (0xFE,
/// 0x200-0x2FF but PAT and SLAM), MCG_*/MCi_* (0x179-0x17B, 0x400-0x47F),
/// FEAT_CTL, UCODE_REV, PLATFORM_ID, PLATFORM_INFO, TEST_CTRL, TSC_ADJUST,
/// CSTAR, KVM and Hyper-V MSRs, ...
///
/// EFER writes are `Native`: the caller applies [`efer_write_allowed`] (or
/// [`native_write`]) and raises the #VE itself on a refused change.
pub fn td_msr_policy(msr: u32, write: bool) -> MsrPolicy {
    if !in_bitmap_range(msr) {
        return V;
    }
    match lookup(msr) {
        Some(entry) if write => entry.write,
        Some(entry) => entry.read,
        None => V,
    }
}

/// MSRs the emulator may leave to the CPU (no SVM intercept) for read and
/// for write: the subset of Native ones that QEMU TCG implements as the TD
/// needs them (FS/GS/KERNEL_GS_BASE, STAR/LSTAR/FMASK, SYSENTER_CS/ESP/EIP,
/// PAT, TSC_AUX, TSC read only). Everything else Native is emulated by the
/// emulator via [`NativeMsr`]. CSTAR is not here: it #VEs in a TD (see
/// `td_msr_policy`).
pub fn passes_through(msr: u32, write: bool) -> bool {
    match msr {
        IA32_TSC => !write,
        IA32_SYSENTER_CS..=IA32_SYSENTER_EIP
        | IA32_PAT
        | IA32_STAR
        | IA32_LSTAR
        | IA32_FMASK
        | IA32_FS_BASE..=IA32_TSC_AUX => true,
        _ => false,
    }
}

/// For Native MSRs that are emulated: what the module does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NativeMsr {
    /// IA32_EFER 0xC000_0080: read the guest's value; writes by
    /// [`efer_write_allowed`] (`wrmsr_ia32_efer`).
    Efer,
    /// IA32_MISC_ENABLE 0x1A0: read = [`MISC_ENABLE_VALUE`]
    /// (`rdmsr_ia32_misc_enables`); write #VE. Linux's `verify_cpu`
    /// (arch/x86/kernel/verify_cpu.S) reads it before any IDT exists.
    MiscEnable,
    /// IA32_ARCH_CAPABILITIES 0x10A: read = [`ARCH_CAPABILITIES_VALUE`]
    /// (`rdmsr_ia32_arch_capabilities`); write #GP.
    ArchCapabilities,
    /// IA32_XAPIC_DISABLE_STATUS 0xBD: read = 1, LEGACY_XAPIC_DISABLED
    /// (`td_rdmsr_exit`); write #GP.
    XapicDisableStatus,
    /// IA32_DEBUGCTL 0x1D9 (`rdmsr_ia32_debugctl`, `wrmsr_ia32_debugctl`).
    DebugCtl,
    /// x2APIC registers in the virtual-APIC page, handled by the CPU
    /// (FIXED_0): TPR 0x808, PPR 0x80A, EOI 0x80B, ISR 0x810-0x817,
    /// TMR 0x818-0x81F, IRR 0x820-0x827, SELF_IPI 0x83F. The emulator's APIC
    /// code holds the state; the value is the MSR number.
    X2apicVirtual(u32),
    /// IA32_SPEC_CTRL 0x48 (FIXED_0: the guest's own value).
    SpecCtrl,
    /// IA32_PRED_CMD 0x49 (FIXED_0, write-only command: IBPB).
    PredCmd,
    /// IA32_FLUSH_CMD 0x10B (FIXED_0, write-only command: L1D flush).
    FlushCmd,
    /// IA32_MISC_PACKAGE_CTLS 0xBC (read FIXED_0; write #VE).
    MiscPackageCtls,
    /// IA32_PERF_CAPABILITIES 0x345: read 0 without PERFMON
    /// (`rdmsr_ia32_perf_capabilities`); write #GP.
    PerfCapabilities,
    /// IA32_VMX_BASIC 0x480, MISC and CR0/CR4_FIXED 0x485-0x489,
    /// PROCBASED_CTLS2..PROCBASED_CTLS3 0x48B-0x492: virtual values for TD
    /// partitioning (`rdmsr_l1_only_special_msrs`); writes #GP. The value is
    /// the MSR number.
    VmxCapability(u32),
    /// IA32_DS_AREA 0x600 (FIXED_0: the guest's own value).
    DsArea,
    /// IA32_DEBUG_INTERFACE 0xC80 (read FIXED_0; write #VE).
    DebugInterface,
    /// IA32_XSS 0xDA0: read the guest's value; write checked against XFAM
    /// (`wrmsr_ia32_xss`).
    Xss,
    /// IA32_UARCH_MISC_CTL 0x1B01 (FIXED_0: the guest's own value).
    UarchMiscCtl,
}

/// The Native MSR `msr` that the emulator must emulate (not pass through),
/// or `None` (pass-through, or not Native at all).
pub fn classify_native(msr: u32) -> Option<NativeMsr> {
    let kind = match msr {
        IA32_EFER => NativeMsr::Efer,
        IA32_MISC_ENABLE => NativeMsr::MiscEnable,
        IA32_ARCH_CAPABILITIES => NativeMsr::ArchCapabilities,
        IA32_XAPIC_DISABLE_STATUS => NativeMsr::XapicDisableStatus,
        IA32_DEBUGCTL => NativeMsr::DebugCtl,
        X2APIC_TPR | X2APIC_PPR | X2APIC_EOI | 0x810..=0x827 | X2APIC_SELF_IPI => {
            NativeMsr::X2apicVirtual(msr)
        }
        IA32_SPEC_CTRL => NativeMsr::SpecCtrl,
        IA32_PRED_CMD => NativeMsr::PredCmd,
        IA32_FLUSH_CMD => NativeMsr::FlushCmd,
        IA32_MISC_PACKAGE_CTLS => NativeMsr::MiscPackageCtls,
        IA32_PERF_CAPABILITIES => NativeMsr::PerfCapabilities,
        0x480 | 0x485..=0x489 | 0x48B..=0x492 => NativeMsr::VmxCapability(msr),
        IA32_DS_AREA => NativeMsr::DsArea,
        IA32_DEBUG_INTERFACE => NativeMsr::DebugInterface,
        IA32_XSS => NativeMsr::Xss,
        IA32_UARCH_MISC_CTL => NativeMsr::UarchMiscCtl,
        _ => return None,
    };
    Some(kind)
}

/// The virtual IA32_ARCH_CAPABILITIES: the least a TDX host may have
/// (`virt_msr_helpers.h` `check_native_ia32_arch_capabilities` requires
/// RDCL_NO, IBRS_ALL, SKIP_L1DFL_VMENTRY, MDS_NO, IF_PSCHANGE_MC_NO, TAA_NO,
/// DOITM, SBDR_SSDP_NO, FBSDP_NO, PSDP_NO and RSBA = 0) after
/// `init_virt_ia32_arch_capabilities` (SSB_NO, BHI_NO, PBRSB_NO not
/// configured: 0; TSX_CTRL 0 without TSX; bits 9-11, 16-18, 21-23, 25-63
/// fixed 0). cpuid.rs does not advertise the MSR (CPUID.7.0:EDX[29] = 0),
/// so Linux does not read it; a read still gets this value.
pub const ARCH_CAPABILITIES_VALUE: u64 = 0xF16B;

/// IA32_MISC_ENABLE as the module returns it without PERFMON
/// (`rdmsr_ia32_misc_enables`: the host's value with PERFMON_AVAILABLE (7)
/// cleared and PEBS_UNAVAILABLE (12) set). The host part is the emulator's
/// choice: FAST_STRING (0) and BTS_UNAVAILABLE (11); LIMIT_CPUID (22) and
/// XD_DISABLE (34) clear, so Linux (`verify_cpu.S`, `early_init_intel` in
/// arch/x86/kernel/cpu/intel.c) never writes it (a write would #VE).
pub const MISC_ENABLE_VALUE: u64 = (1 << 0) | (1 << 11) | (1 << 12);

/// IA32_XAPIC_DISABLE_STATUS: LEGACY_XAPIC_DISABLED (bit 0) set.
pub const XAPIC_DISABLE_STATUS_VALUE: u64 = 1;

const EFER_SCE: u64 = 1 << 0;
const EFER_LMA: u64 = 1 << 10;

/// DEBUGCTL: reserved bits 3-5 and 16-63 (`msr_defs.h` ia32_debugctl_t).
const DEBUGCTL_RESERVED: u64 = 0b11_1000 | !0xFFFF;
const DEBUGCTL_TR: u64 = 1 << 6;
const DEBUGCTL_BTS: u64 = 1 << 7;
const DEBUGCTL_EN_UNCORE_PMI: u64 = 1 << 13;

/// SPEC_CTRL bits defined by `msr_defs.h` ia32_spec_ctrl_t (IBRS, STIBP,
/// SSBD, IPRED_DIS_U/S, RRSBA_DIS_U/S, PSFD, DDPD_U, BHI_DIS_S); others are
/// reserved and the CPU #GPs.
const SPEC_CTRL_DEFINED: u64 = 0x5FF;

/// The value a read of an emulated Native MSR returns. `stored` is the
/// vCPU's current value for the MSRs that keep one (0 at reset); for the
/// x2APIC registers it is the APIC code's value.
pub fn native_value(kind: NativeMsr, stored: u64) -> u64 {
    match kind {
        NativeMsr::MiscEnable => MISC_ENABLE_VALUE,
        NativeMsr::ArchCapabilities => ARCH_CAPABILITIES_VALUE,
        NativeMsr::XapicDisableStatus => XAPIC_DISABLE_STATUS_VALUE,
        // `rdmsr_ia32_debugctl`: bit 13 (uncore PMI) virtualized as 0.
        NativeMsr::DebugCtl => stored & !DEBUGCTL_EN_UNCORE_PMI,
        // `rdmsr_ia32_perf_capabilities` without PERFMON: 0.
        NativeMsr::PerfCapabilities => 0,
        // The module returns virtual VMX capabilities (TD partitioning); the
        // emulated TD has no VMX in CPUID and the values are not modelled:
        // 0. Reads of write-only MSRs (#GP by policy) return 0 too.
        NativeMsr::VmxCapability(_) | NativeMsr::PredCmd | NativeMsr::FlushCmd => 0,
        // A host value read natively; the emulator's host has neither
        // package controls nor a debug interface enabled: 0.
        NativeMsr::MiscPackageCtls | NativeMsr::DebugInterface => 0,
        NativeMsr::Efer
        | NativeMsr::X2apicVirtual(_)
        | NativeMsr::SpecCtrl
        | NativeMsr::DsArea
        | NativeMsr::Xss
        | NativeMsr::UarchMiscCtl => stored,
    }
}

/// What an emulated Native WRMSR does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NativeWrite {
    /// Accepted: the vCPU's value becomes this.
    Store(u64),
    /// Accepted, nothing stored: a command (IBPB, L1D flush) or an APIC
    /// action (EOI, self-IPI with vector `value & 0xFF`) for the caller.
    Command(u64),
    /// #GP(0) in the TD.
    GeneralProtection,
    /// #VE (exit reason 32): the guest asks the VMM.
    VirtualizationException,
}

/// The module's EFER write rule (`td_msr_access.c` `wrmsr_ia32_efer`, L1
/// TD): LMA (bit 10) is read-only and ignored; SCE (bit 0) may change; any
/// other change (LME, NXE, SVME, ...) is refused and #VEs. `current` is the
/// guest-visible EFER.
pub fn efer_write_allowed(current: u64, new: u64) -> bool {
    (current ^ new) & !(EFER_SCE | EFER_LMA) == 0
}

/// 48-bit canonical (the base CPU has no LA57; WRMSR of an address MSR with
/// a non-canonical value #GPs).
fn canonical48(value: u64) -> bool {
    let top = value >> 47;
    top == 0 || top == (1 << 17) - 1
}

/// WRMSR of an emulated Native MSR: `current` is the vCPU's value (for
/// EFER the guest-visible EFER), `new` the value written.
pub fn native_write(kind: NativeMsr, current: u64, new: u64) -> NativeWrite {
    use NativeWrite::{Command, GeneralProtection, Store, VirtualizationException};
    match kind {
        NativeMsr::Efer => {
            if efer_write_allowed(current, new) {
                Store((new & !EFER_LMA) | (current & EFER_LMA))
            } else {
                VirtualizationException
            }
        }
        // `wrmsr_ia32_debugctl`: reserved bits #GP; TR without BTS (bits
        // 7:6 = 01) #VEs outside debug mode; bit 13 keeps its old value.
        NativeMsr::DebugCtl => {
            if new & DEBUGCTL_RESERVED != 0 {
                GeneralProtection
            } else if new & DEBUGCTL_TR != 0 && new & DEBUGCTL_BTS == 0 {
                VirtualizationException
            } else {
                Store((new & !DEBUGCTL_EN_UNCORE_PMI) | (current & DEBUGCTL_EN_UNCORE_PMI))
            }
        }
        // `wrmsr_ia32_xss`: bits must be in the CPU's XSS mask and XFAM; the
        // TD's XFAM has no supervisor components, so only 0.
        NativeMsr::Xss => {
            if new == 0 {
                Store(0)
            } else {
                GeneralProtection
            }
        }
        NativeMsr::SpecCtrl => {
            if new & !SPEC_CTRL_DEFINED == 0 {
                Store(new)
            } else {
                GeneralProtection
            }
        }
        // PRED_CMD: IBPB (bit 0); FLUSH_CMD: L1D_FLUSH (bit 0); other bits
        // reserved (the CPU #GPs).
        NativeMsr::PredCmd | NativeMsr::FlushCmd => {
            if new & !1 == 0 {
                Command(new)
            } else {
                GeneralProtection
            }
        }
        // UARCH_MISC_CTL: DOITM (bit 0); other bits reserved.
        NativeMsr::UarchMiscCtl => {
            if new & !1 == 0 {
                Store(new)
            } else {
                GeneralProtection
            }
        }
        NativeMsr::DsArea => {
            if canonical48(new) {
                Store(new)
            } else {
                GeneralProtection
            }
        }
        NativeMsr::X2apicVirtual(msr) => match msr {
            // TPR: bits 63:8 must be 0 (SDM, TPR virtualization).
            X2APIC_TPR if new >> 8 == 0 => Store(new),
            // EOI: the value must be 0 (SDM, EOI virtualization).
            X2APIC_EOI if new == 0 => Command(0),
            // SELF_IPI: bits 63:8 must be 0; the vector is bits 7:0.
            X2APIC_SELF_IPI if new >> 8 == 0 => Command(new),
            // PPR, ISR, TMR, IRR are read-only; reserved bits above.
            _ => GeneralProtection,
        },
        // Read-only MSRs (FIXED_0 write on a read-only MSR, or #GP action).
        NativeMsr::ArchCapabilities
        | NativeMsr::XapicDisableStatus
        | NativeMsr::PerfCapabilities
        | NativeMsr::VmxCapability(_) => GeneralProtection,
        // Write FIXED_1 with the #VE action.
        NativeMsr::MiscEnable | NativeMsr::MiscPackageCtls | NativeMsr::DebugInterface => {
            VirtualizationException
        }
    }
}

/// IA32_FEAT_CTL as the VMM reports it: locked (bit 0), nothing enabled (no
/// VMX, SGX or LMCE). Linux's `init_ia32_feat_ctl`
/// (arch/x86/kernel/cpu/feat_ctl.c) then leaves it alone.
pub const FEAT_CTL_VALUE: u64 = 1;

/// True for the MTRR block the VMM answers with zeros: 0x200-0x2FF
/// (variable and fixed MTRRs, MTRRdefType 0x2FF, and MCi_CTL2 0x280-0x29F,
/// which KVM's `kvm_get_msr_common` also routes through this range), except
/// SLAM (0x276, #GP in the TD) and PAT (0x277, native in the TD), which
/// never reach the VMM.
fn vmm_zero_mtrr(msr: u32) -> bool {
    (0x200..=0x2FF).contains(&msr) && msr != 0x276 && msr != IA32_PAT
}

/// The VMM (KVM-like) side of TDVMCALL<RDMSR> for the #VE MSRs that are not
/// the x2APIC (0x800-0x8FF, APIC_BASE 0x1B and the APIC timer's
/// TSC_DEADLINE 0x6E0 belong to the emulator's APIC code: `None` here).
/// `Some(value)` if the VMM emulates it, `None` for an error status (Linux
/// then takes its rdmsr_safe/extable path, `arch/x86/coco/tdx/tdx.c`
/// `read_msr` -> `ve_raise_fault`).
///
/// - MCG_CAP 0x179 = 0 (no banks, no MCG_CTL_P, no LMCE) and MCG_STATUS
///   0x17A = 0: Linux's `mce_rdmsrl` (arch/x86/kernel/cpu/mce/core.c)
///   panics "MCA architectural violation!" if MCG_STATUS fails. KVM
///   (arch/x86/kvm/x86.c `get_msr_mce`) answers both from its state; with
///   no banks it rejects MCG_CTL 0x17B (no MCG_CTL_P): error here too.
/// - MCi_* 0x400-0x47F = 0 (KVM would reject banks beyond MCG_CAP; Linux
///   reads none with 0 banks).
/// - MTRRcap 0xFE = 0 (KVM's TDX code, arch/x86/kvm/vmx/tdx.c, reports
///   MTRRcap = 0 for a TD), MTRRdefType 0x2FF and the other MTRRs = 0
///   ("disabled by BIOS" for Linux's `mtrr_bp_init`).
/// - FEAT_CTL 0x3A = locked, nothing enabled (KVM `vmx_get_msr`).
/// - UCODE_REV 0x8B = 0, PLATFORM_ID 0x17 = 0 (KVM `kvm_get_msr_common`
///   answers both).
/// - MISC_FEATURES_ENABLES 0x140 = 0 (KVM: no CPUID faulting).
/// - PLATFORM_INFO 0xCE: error (Linux probes it with `rdmsrl_safe` for CPUID
///   faulting). TSC_ADJUST 0x3B: error (not in the TD's CPUID). KVM MSRs
///   0x4b56_4d00-0x4b56_4dff and the legacy 0x11/0x12: error (no KVM
///   features advertised). Hyper-V 0x4000_0000..: error. Everything else:
///   error.
pub fn vmm_rdmsr(msr: u32) -> Option<u64> {
    match msr {
        IA32_PLATFORM_ID | IA32_UCODE_REV | IA32_MTRRCAP | MSR_MISC_FEATURES_ENABLES => Some(0),
        IA32_FEAT_CTL => Some(FEAT_CTL_VALUE),
        IA32_MCG_CAP | IA32_MCG_STATUS => Some(0),
        0x400..=0x47F => Some(0),
        _ if vmm_zero_mtrr(msr) => Some(0),
        _ => None,
    }
}

/// The VMM side of TDVMCALL<WRMSR>: `true` if accepted. This VMM keeps no
/// state: accepted writes are discarded and reads keep their values above.
///
/// - UCODE_REV 0x8B: accepted, ignored (KVM stores guest writes nowhere;
///   Linux's `intel_get_microcode_revision` writes 0 before reading).
/// - MCG_STATUS 0x17A, MCi_* 0x400-0x47F, MTRRs (0x200-0x2FF but SLAM, PAT):
///   accepted.
/// - MISC_FEATURES_ENABLES 0x140: 0 accepted; CPUID_FAULT (bit 0) or any
///   reserved bit refused (KVM: faulting needs PLATFORM_INFO support).
/// - MCG_CAP, MTRRcap, PLATFORM_ID (read-only), FEAT_CTL (locked: KVM
///   `vmx_set_msr` refuses), and everything else: refused.
pub fn vmm_wrmsr(msr: u32, value: u64) -> bool {
    match msr {
        IA32_UCODE_REV | IA32_MCG_STATUS => true,
        MSR_MISC_FEATURES_ENABLES => value == 0,
        0x400..=0x47F => true,
        _ => vmm_zero_mtrr(msr),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy_both(msr: u32) -> (MsrPolicy, MsrPolicy) {
        (td_msr_policy(msr, false), td_msr_policy(msr, true))
    }

    #[test]
    fn native_both_ways() {
        for msr in [
            IA32_SPEC_CTRL,
            IA32_SYSENTER_CS,
            IA32_SYSENTER_ESP,
            IA32_SYSENTER_EIP,
            IA32_PAT,
            IA32_DS_AREA,
            IA32_DEBUGCTL,
            IA32_XSS,
            IA32_UARCH_MISC_CTL,
            IA32_EFER,
            IA32_STAR,
            IA32_LSTAR,
            IA32_FMASK,
            IA32_FS_BASE,
            IA32_GS_BASE,
            IA32_KERNEL_GS_BASE,
            IA32_TSC_AUX,
            X2APIC_TPR,
        ] {
            assert_eq!(policy_both(msr), (N, N), "{msr:#x}");
        }
    }

    #[test]
    fn native_one_way() {
        // (msr, read, write)
        let table: &[(u32, MsrPolicy, MsrPolicy)] = &[
            (IA32_TSC, N, V),
            (IA32_MISC_ENABLE, N, V),
            (IA32_MISC_PACKAGE_CTLS, N, V),
            (IA32_DEBUG_INTERFACE, N, V),
            (IA32_ARCH_CAPABILITIES, N, G),
            (IA32_XAPIC_DISABLE_STATUS, N, G),
            (IA32_PERF_CAPABILITIES, N, G),
            (IA32_PRED_CMD, G, N),
            (IA32_FLUSH_CMD, G, N),
            (X2APIC_PPR, N, G),
            (X2APIC_EOI, G, N),
            (X2APIC_SELF_IPI, G, N),
            (0x810, N, G),
            (0x817, N, G),
            (0x818, N, G),
            (0x81F, N, G),
            (0x820, N, G),
            (0x827, N, G),
            (0x480, N, G),
            (0x481, V, G),
            (0x484, V, G),
            (0x485, N, G),
            (0x489, N, G),
            (0x48A, V, G),
            (0x48B, N, G),
            (0x492, N, G),
        ];
        for &(msr, read, write) in table {
            assert_eq!(policy_both(msr), (read, write), "{msr:#x}");
        }
    }

    #[test]
    fn virtualization_exception_msrs() {
        for msr in [
            IA32_APIC_BASE,
            0x802, // ID
            0x803, // VER
            0x80D, // LDR
            0x80F, // SVR
            0x828, // ESR
            0x82F, // CMCI
            0x830, // ICR
            0x832,
            0x833,
            0x834,
            0x835,
            0x836,
            0x837, // LVTs
            0x838, // TMICT
            0x839, // TMCCT
            0x83E, // TDCR
            IA32_TSC_DEADLINE,
            IA32_MTRRCAP,
            0x200,
            0x20F,
            0x250,
            0x258,
            0x268,
            0x26F,
            0x280,
            IA32_MTRR_DEF_TYPE,
            IA32_MCG_CAP,
            IA32_MCG_STATUS,
            IA32_MCG_CTL,
            0x400,
            0x401,
            0x47F,
            IA32_FEAT_CTL,
            IA32_UCODE_REV,
            IA32_PLATFORM_ID,
            MSR_PLATFORM_INFO,
            MSR_TEST_CTRL,
            IA32_TSC_ADJUST,
            MSR_MISC_FEATURES_ENABLES,
            IA32_CSTAR,
            0xCF,  // CORE_CAPABILITIES
            0x1B0, // ENERGY_PERF_BIAS
            0x6A1, // between CET MSRs
            0x680, // legacy LBR FROM_IP
            0x562, // between RTIT MSRs
            0x1FFF,
            0x4b56_4d00,
            0x4b56_4d01,
            0x4b56_4dff,
            0x11, // MSR_KVM_WALL_CLOCK (legacy)
            0x12, // MSR_KVM_SYSTEM_TIME (legacy)
            0x4000_0000,
            0x4000_00ff,
            0xC000_0104,
            0xC000_1FFF,
            0xC001_0000,
            0xC001_0114,
            0x2000,
            u32::MAX,
        ] {
            assert_eq!(policy_both(msr), (V, V), "{msr:#x}");
        }
    }

    #[test]
    fn general_protection_msrs() {
        for msr in [
            0xC1, 0xC8, // PMCs
            0x186, 0x18D, // PERFEVTSEL
            0x309, 0x30B, 0x310, // FIXED_CTR
            0x329, // PERF_METRICS
            0x38D, 0x38E, 0x38F, 0x390, 0x391, 0x392, // global perf controls
            0x3F1, 0x3F2, 0x3F6, 0x3F7, // PEBS
            0x4C1, 0x4C8, // A_PMC
            0x1A6, 0x1A7, // OFFCORE_RSP
            0x560, 0x561, 0x570, 0x571, 0x572, 0x580, 0x587, // RTIT
            0x6A0, 0x6A2, 0x6A4, 0x6A8, // CET
            0x6E1, // PKRS
            0x1C4, 0x1C5, // XFD
            0xE1,  // UMWAIT_CONTROL
            0x122, // TSX_CTRL
            0x985, 0x98A, // UINTR
            0x1200, 0x12FF, 0x14CE, 0x14CF, 0x1500, 0x16FF, // arch LBR
            0x87,   // MKTME_KEYID_PARTITIONING (no PCONFIG in CPUID)
            0x1F8, 0x1F9, 0x1FA, // DCA (no DCA in CPUID)
            0x981, 0x982, 0x983, 0x984, // TME (no TME in CPUID)
            0x8C, 0x8F, 0x98, 0x99, 0x9A, 0x9B, 0x9E, 0x195, 0x276, 0x500, 0xD90, 0xD93, 0x800,
            0x801, 0x804, 0x807, 0x809, 0x80C, 0x80E, 0x829, 0x82E, 0x831, 0x840, 0x87F, 0x880,
            0x8C0, 0x8FF, // reserved x2APIC
        ] {
            assert_eq!(policy_both(msr), (G, G), "{msr:#x}");
        }
    }

    #[test]
    fn table_is_sorted_and_disjoint() {
        for pair in TABLE.windows(2) {
            assert!(pair[0].start <= pair[0].end);
            assert!(pair[0].end < pair[1].start, "{:#x}", pair[1].start);
        }
        assert!(TABLE
            .iter()
            .all(|entry| in_bitmap_range(entry.start) && in_bitmap_range(entry.end)));
    }

    #[test]
    fn whole_x2apic_range_is_classified() {
        for msr in 0x800..=0x8FF {
            for write in [false, true] {
                let policy = td_msr_policy(msr, write);
                let native_reg = matches!(msr, 0x808 | 0x80A | 0x80B | 0x810..=0x827 | 0x83F);
                if policy == N {
                    assert!(native_reg, "{msr:#x}");
                    assert_eq!(classify_native(msr), Some(NativeMsr::X2apicVirtual(msr)));
                }
                if !native_reg && lookup(msr).is_none() {
                    assert_eq!(policy, V, "{msr:#x}");
                }
            }
        }
    }

    /// Every MSR the table or the tests name, plus neighbours.
    fn interesting_msrs() -> impl Iterator<Item = u32> {
        let from_table = TABLE.iter().flat_map(|entry| {
            [
                entry.start.wrapping_sub(1),
                entry.start,
                entry.end,
                entry.end.wrapping_add(1),
            ]
        });
        let more = [
            0x1B,
            0x3A,
            0x3B,
            0x8B,
            0x17,
            0xCE,
            0xFE,
            0x140,
            0x179,
            0x17A,
            0x17B,
            0x200,
            0x2FF,
            0x400,
            0x47F,
            0x4b56_4d00,
            0x4000_0000,
            0xC000_0083,
            0,
        ];
        from_table.chain(more)
    }

    #[test]
    fn pass_through_is_native_and_classification_is_complete() {
        for msr in interesting_msrs() {
            let mut native_somewhere = false;
            for write in [false, true] {
                let policy = td_msr_policy(msr, write);
                if passes_through(msr, write) {
                    assert_eq!(policy, N, "{msr:#x} passes through but is not Native");
                    assert_eq!(classify_native(msr), None, "{msr:#x}");
                }
                if policy == N {
                    native_somewhere = true;
                    if !passes_through(msr, write) {
                        assert!(
                            classify_native(msr).is_some(),
                            "{msr:#x} Native, not emulated"
                        );
                    }
                }
            }
            if classify_native(msr).is_some() {
                assert!(native_somewhere, "{msr:#x} classified but never Native");
            }
        }
    }

    #[test]
    fn pass_through_set() {
        let both = [
            IA32_FS_BASE,
            IA32_GS_BASE,
            IA32_KERNEL_GS_BASE,
            IA32_STAR,
            IA32_LSTAR,
            IA32_FMASK,
            IA32_SYSENTER_CS,
            IA32_SYSENTER_ESP,
            IA32_SYSENTER_EIP,
            IA32_PAT,
            IA32_TSC_AUX,
        ];
        for msr in both {
            assert!(
                passes_through(msr, false) && passes_through(msr, true),
                "{msr:#x}"
            );
        }
        assert!(passes_through(IA32_TSC, false));
        assert!(!passes_through(IA32_TSC, true));
        for msr in [
            IA32_CSTAR,
            IA32_EFER,
            IA32_SPEC_CTRL,
            IA32_MISC_ENABLE,
            X2APIC_TPR,
            IA32_APIC_BASE,
        ] {
            assert!(
                !passes_through(msr, false) && !passes_through(msr, true),
                "{msr:#x}"
            );
        }
    }

    #[test]
    fn native_writes_agree_with_policy() {
        // Where the policy refuses a write, `native_write` refuses it the same
        // way whatever the value.
        for msr in interesting_msrs() {
            let Some(kind) = classify_native(msr) else {
                continue;
            };
            for value in [0u64, 1, 0xFF, 0x100, !0] {
                let outcome = native_write(kind, 0, value);
                match td_msr_policy(msr, true) {
                    MsrPolicy::GeneralProtection => {
                        assert_eq!(outcome, NativeWrite::GeneralProtection, "{msr:#x}")
                    }
                    MsrPolicy::VirtualizationException => {
                        assert_eq!(outcome, NativeWrite::VirtualizationException, "{msr:#x}")
                    }
                    MsrPolicy::Native => {}
                }
            }
        }
    }

    #[test]
    fn efer_rule() {
        const LME: u64 = 1 << 8;
        const NXE: u64 = 1 << 11;
        let running = EFER_SCE | LME | EFER_LMA | NXE;
        // SCE may toggle.
        assert!(efer_write_allowed(running, running & !EFER_SCE));
        assert!(efer_write_allowed(running & !EFER_SCE, running));
        // LMA differences are ignored.
        assert!(efer_write_allowed(running, running & !EFER_LMA));
        assert!(efer_write_allowed(running & !EFER_LMA, running));
        assert!(efer_write_allowed(running, running));
        // NXE and LME changes are refused, as is any other bit.
        assert!(!efer_write_allowed(running, running & !NXE));
        assert!(!efer_write_allowed(running & !NXE, running));
        assert!(!efer_write_allowed(running, running & !LME));
        assert!(!efer_write_allowed(running, running | (1 << 12)));
        assert!(!efer_write_allowed(running, !0));
        // native_write keeps LMA from the current value.
        assert_eq!(
            native_write(NativeMsr::Efer, running, (running & !EFER_LMA) & !EFER_SCE),
            NativeWrite::Store(running & !EFER_SCE)
        );
        assert_eq!(
            native_write(NativeMsr::Efer, running, running & !NXE),
            NativeWrite::VirtualizationException
        );
        assert_eq!(td_msr_policy(IA32_EFER, true), N);
    }

    #[test]
    fn fixed_native_values() {
        assert_eq!(native_value(NativeMsr::XapicDisableStatus, 0), 1);
        assert_eq!(
            native_value(NativeMsr::ArchCapabilities, 7),
            ARCH_CAPABILITIES_VALUE
        );
        // XAPIC_DISABLE_STATUS (bit 21) is fixed 0 in the virtual value.
        assert_eq!(ARCH_CAPABILITIES_VALUE & (1 << 21), 0);
        let misc = native_value(NativeMsr::MiscEnable, !0);
        assert_eq!(misc & (1 << 7), 0, "PERFMON_AVAILABLE");
        assert_ne!(misc & (1 << 12), 0, "PEBS_UNAVAILABLE");
        assert_eq!(misc & (1 << 22), 0, "LIMIT_CPUID");
        assert_eq!(misc & (1 << 34), 0, "XD_DISABLE");
        assert_eq!(native_value(NativeMsr::PerfCapabilities, !0), 0);
        assert_eq!(
            native_value(NativeMsr::DebugCtl, !0),
            !DEBUGCTL_EN_UNCORE_PMI
        );
        assert_eq!(native_value(NativeMsr::SpecCtrl, 5), 5);
    }

    #[test]
    fn native_write_rules() {
        use NativeWrite::*;
        let cases: &[(NativeMsr, u64, u64, NativeWrite)] = &[
            (NativeMsr::DebugCtl, 0, 0x1, Store(0x1)),
            (NativeMsr::DebugCtl, 0, 1 << 3, GeneralProtection),
            (NativeMsr::DebugCtl, 0, 1 << 16, GeneralProtection),
            (NativeMsr::DebugCtl, 0, DEBUGCTL_TR, VirtualizationException),
            (
                NativeMsr::DebugCtl,
                0,
                DEBUGCTL_TR | DEBUGCTL_BTS,
                Store(0xC0),
            ),
            (
                NativeMsr::DebugCtl,
                DEBUGCTL_EN_UNCORE_PMI,
                0,
                Store(DEBUGCTL_EN_UNCORE_PMI),
            ),
            (NativeMsr::DebugCtl, 0, DEBUGCTL_EN_UNCORE_PMI, Store(0)),
            (NativeMsr::Xss, 0, 0, Store(0)),
            (NativeMsr::Xss, 0, 1 << 11, GeneralProtection),
            (NativeMsr::SpecCtrl, 0, 0x7, Store(0x7)),
            (NativeMsr::SpecCtrl, 0, 1 << 9, GeneralProtection),
            (NativeMsr::PredCmd, 0, 1, Command(1)),
            (NativeMsr::PredCmd, 0, 2, GeneralProtection),
            (NativeMsr::FlushCmd, 0, 1, Command(1)),
            (NativeMsr::FlushCmd, 0, 1 << 40, GeneralProtection),
            (
                NativeMsr::DsArea,
                0,
                0xFFFF_8000_0000_0000,
                Store(0xFFFF_8000_0000_0000),
            ),
            (
                NativeMsr::DsArea,
                0,
                0x0000_8000_0000_0000,
                GeneralProtection,
            ),
            (NativeMsr::UarchMiscCtl, 0, 1, Store(1)),
            (NativeMsr::UarchMiscCtl, 0, 2, GeneralProtection),
            (NativeMsr::X2apicVirtual(X2APIC_TPR), 0, 0x20, Store(0x20)),
            (
                NativeMsr::X2apicVirtual(X2APIC_TPR),
                0,
                0x100,
                GeneralProtection,
            ),
            (NativeMsr::X2apicVirtual(X2APIC_EOI), 0, 0, Command(0)),
            (
                NativeMsr::X2apicVirtual(X2APIC_EOI),
                0,
                1,
                GeneralProtection,
            ),
            (
                NativeMsr::X2apicVirtual(X2APIC_SELF_IPI),
                0,
                0xEC,
                Command(0xEC),
            ),
            (
                NativeMsr::X2apicVirtual(X2APIC_SELF_IPI),
                0,
                0x1EC,
                GeneralProtection,
            ),
            (
                NativeMsr::X2apicVirtual(X2APIC_PPR),
                0,
                0,
                GeneralProtection,
            ),
            (NativeMsr::X2apicVirtual(0x810), 0, 0, GeneralProtection),
            (NativeMsr::ArchCapabilities, 0, 0, GeneralProtection),
            (NativeMsr::XapicDisableStatus, 0, 1, GeneralProtection),
            (
                NativeMsr::MiscEnable,
                0,
                MISC_ENABLE_VALUE,
                VirtualizationException,
            ),
        ];
        for &(kind, current, new, want) in cases {
            assert_eq!(native_write(kind, current, new), want, "{kind:?} {new:#x}");
        }
    }

    #[test]
    fn vmm_reads() {
        let table: &[(u32, Option<u64>)] = &[
            (IA32_MCG_CAP, Some(0)),
            (IA32_MCG_STATUS, Some(0)),
            (IA32_MCG_CTL, None),
            (0x400, Some(0)),
            (0x401, Some(0)),
            (0x47F, Some(0)),
            (0x480, None),
            (IA32_MTRRCAP, Some(0)),
            (IA32_MTRR_DEF_TYPE, Some(0)),
            (0x200, Some(0)),
            (0x250, Some(0)),
            (0x280, Some(0)),
            (IA32_FEAT_CTL, Some(1)),
            (MSR_PLATFORM_INFO, None),
            (IA32_UCODE_REV, Some(0)),
            (IA32_PLATFORM_ID, Some(0)),
            (MSR_MISC_FEATURES_ENABLES, Some(0)),
            (IA32_TSC_ADJUST, None),
            (0x4b56_4d00, None),
            (0x4b56_4d01, None),
            (0x4b56_4dff, None),
            (0x11, None),
            (0x12, None),
            (0x4000_0000, None),
            (IA32_APIC_BASE, None),
            (0x802, None),
            (IA32_TSC_DEADLINE, None),
            (IA32_CSTAR, None),
            (MSR_TEST_CTRL, None),
            (0xCF, None),
            (IA32_PAT, None),
            (0x276, None),
            (u32::MAX, None),
        ];
        for &(msr, want) in table {
            assert_eq!(vmm_rdmsr(msr), want, "{msr:#x}");
        }
    }

    #[test]
    fn vmm_writes() {
        let table: &[(u32, u64, bool)] = &[
            (IA32_UCODE_REV, 0, true),
            (IA32_MCG_STATUS, 0, true),
            (0x401, 0, true),
            (0x400, !0, true),
            (IA32_MTRR_DEF_TYPE, 0x806, true),
            (0x200, 0, true),
            (MSR_MISC_FEATURES_ENABLES, 0, true),
            (MSR_MISC_FEATURES_ENABLES, 1, false),
            (IA32_MCG_CAP, 0, false),
            (IA32_MTRRCAP, 0, false),
            (IA32_PLATFORM_ID, 0, false),
            (IA32_FEAT_CTL, 1, false),
            (IA32_FEAT_CTL, 5, false),
            (MSR_PLATFORM_INFO, 0, false),
            (IA32_TSC_ADJUST, 0, false),
            (0x4b56_4d00, 1, false),
            (IA32_TSC, 0, false),
            (IA32_MISC_ENABLE, MISC_ENABLE_VALUE, false),
            (IA32_PAT, 0, false),
            (IA32_CSTAR, 0, false),
        ];
        for &(msr, value, want) in table {
            assert_eq!(vmm_wrmsr(msr, value), want, "{msr:#x}");
        }
    }

    #[test]
    fn vmm_answers_only_ve_msrs() {
        for msr in interesting_msrs().chain(0x200..=0x2FF).chain(0x400..=0x47F) {
            if vmm_rdmsr(msr).is_some() {
                assert_eq!(td_msr_policy(msr, false), V, "{msr:#x}");
            }
            if vmm_wrmsr(msr, 0) {
                assert_eq!(td_msr_policy(msr, true), V, "{msr:#x}");
            }
        }
    }

    #[test]
    fn no_panic_on_any_input() {
        let mut msr = 0u32;
        loop {
            for write in [false, true] {
                let _ = td_msr_policy(msr, write);
                let _ = passes_through(msr, write);
            }
            if let Some(kind) = classify_native(msr) {
                for value in [0, 1, u64::MAX] {
                    let _ = native_value(kind, value);
                    let _ = native_write(kind, value, !value);
                }
            }
            let _ = vmm_rdmsr(msr);
            let _ = vmm_wrmsr(msr, u64::MAX);
            match msr.checked_add(0x0001_0003) {
                Some(next) => msr = next,
                None => break,
            }
        }
    }
}
