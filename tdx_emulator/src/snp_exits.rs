//! Pieces of the SNP mode's exit handling that need no SVM machinery, so
//! they are host-tested (the vCPU loop, hypervisor/snp.rs, uses them):
//! recognising the SNP instructions that reach the emulator as #UD or
//! VMMCALL exits, reading and answering the GHCB page, delivering #VC with
//! its error code (which QEMU's TCG event injection would drop), the CPUID
//! a KVM-like hypervisor answers an SNP guest, and reading an AP's VMSA.
//!
//! Sources: AMD APM vol. 2 (8.9.3 long-mode interrupt delivery: IST, stack
//! alignment, the pushed frame; 15.35 #VC is vector 29 with an error code);
//! Linux `struct ghcb` / `ghcb_save_area` (arch/x86/include/asm/svm.h) for
//! the GHCB layout and its valid bitmap; research notes
//! `../shared/reference/sev-snp.md` 1.4, 1.6, 1.7 and 4.6 (QEMU's
//! `exception_has_error_code()` covers vectors 8, 10-14 and 17 only).

/// An SNP instruction at the guest's RIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnpInstruction {
    /// VMGEXIT, `F3 0F 01 D9` (REP VMMCALL): QEMU's VMMCALL ignores the
    /// prefix, so it arrives as a VMMCALL exit.
    Vmgexit,
    /// VMMCALL, `0F 01 D9`, without the prefix: not the GHCB protocol.
    Vmmcall,
    /// PVALIDATE, `F2 0F 01 FF`: a #UD under TCG.
    Pvalidate,
    /// RMPADJUST, `F3 0F 01 FE`: a #UD under TCG.
    Rmpadjust,
}

impl SnpInstruction {
    /// Its length, to step over it.
    pub const fn length(self) -> u64 {
        match self {
            SnpInstruction::Vmmcall => 3,
            _ => 4,
        }
    }

    /// The instruction `bytes` (read at RIP) begin with, if one of these.
    pub fn at(bytes: &[u8]) -> Option<SnpInstruction> {
        match bytes {
            [0xf3, 0x0f, 0x01, 0xd9, ..] => Some(SnpInstruction::Vmgexit),
            [0x0f, 0x01, 0xd9, ..] => Some(SnpInstruction::Vmmcall),
            [0xf2, 0x0f, 0x01, 0xff, ..] => Some(SnpInstruction::Pvalidate),
            [0xf3, 0x0f, 0x01, 0xfe, ..] => Some(SnpInstruction::Rmpadjust),
            _ => None,
        }
    }
}

/// GHCB save-area fields the emulator reads or writes (byte offsets).
pub mod ghcb_field {
    pub const RAX: usize = 0x1f8;
    pub const RCX: usize = 0x308;
    pub const RDX: usize = 0x310;
    pub const RBX: usize = 0x318;
    pub const SW_EXITCODE: usize = 0x390;
    pub const SW_EXITINFO1: usize = 0x398;
    pub const SW_EXITINFO2: usize = 0x3a0;
    pub const SW_SCRATCH: usize = 0x3a8;
    pub const XCR0: usize = 0x3e8;
}

/// Where the valid bitmap (one bit per qword of the save area) starts.
const VALID_BITMAP: usize = 0x3f0;
/// The end of the save area with its valid bitmap: what the hypervisor
/// writes back.
pub const SAVE_AREA_END: usize = 0x400;
/// The shared buffer (where a PSC descriptor goes) and its size.
pub const SHARED_BUFFER: usize = 0x800;
pub const SHARED_BUFFER_BYTES: usize = 2032;
/// `protocol_version` (u16) and `ghcb_usage` (u32, 0: standard).
const PROTOCOL_VERSION: usize = 0xffa;
const USAGE: usize = 0xffc;

/// A GHCB page, as the emulator reads it from the guest's shared page.
pub struct Ghcb<'a> {
    page: &'a mut [u8; 4096],
}

impl<'a> Ghcb<'a> {
    /// The page.
    pub fn new(page: &'a mut [u8; 4096]) -> Self {
        Ghcb { page }
    }

    fn qword(&self, offset: usize) -> u64 {
        let mut raw = [0u8; 8];
        raw.copy_from_slice(&self.page[offset..offset + 8]);
        u64::from_le_bytes(raw)
    }

    fn valid_bit(offset: usize) -> (usize, u8) {
        let qword = offset / 8;
        (VALID_BITMAP + qword / 8, 1 << (qword % 8))
    }

    /// The field at `offset` if the guest marked it valid (a hypervisor
    /// must not use fields the guest did not set).
    pub fn get(&self, offset: usize) -> Option<u64> {
        let (byte, bit) = Self::valid_bit(offset);
        (self.page[byte] & bit != 0).then(|| self.qword(offset))
    }

    /// Sets a field for the guest to read, and its valid bit.
    pub fn set(&mut self, offset: usize, value: u64) {
        self.page[offset..offset + 8].copy_from_slice(&value.to_le_bytes());
        let (byte, bit) = Self::valid_bit(offset);
        self.page[byte] |= bit;
    }

    /// Clears the valid bitmap before the hypervisor's answer (as KVM does
    /// when it syncs its answer back), so only answered fields are valid.
    pub fn clear_valid(&mut self) {
        self.page[VALID_BITMAP..VALID_BITMAP + 16].fill(0);
    }

    /// Standard usage (0) and protocol version 2, which SNP requires.
    pub fn is_standard_v2(&self) -> bool {
        let version =
            u16::from_le_bytes([self.page[PROTOCOL_VERSION], self.page[PROTOCOL_VERSION + 1]]);
        let mut usage = [0u8; 4];
        usage.copy_from_slice(&self.page[USAGE..USAGE + 4]);
        version == 2 && u32::from_le_bytes(usage) == 0
    }

    /// The shared buffer, when SW_SCRATCH names it (`gpa` is the GHCB's
    /// own GPA): the only scratch area this emulator accepts.
    pub fn shared_buffer(&mut self, gpa: u64) -> Option<&mut [u8]> {
        let scratch = self.get(ghcb_field::SW_SCRATCH)?;
        (scratch == gpa + SHARED_BUFFER as u64)
            .then(move || &mut self.page[SHARED_BUFFER..SHARED_BUFFER + SHARED_BUFFER_BYTES])
    }
}

/// #VC's vector.
pub const VC_VECTOR: u8 = 29;

/// What delivering #VC needs: the IDT gate for vector 29 (16 bytes), the
/// TSS's RSP0 and IST pointers, and the interrupted state.
#[derive(Clone, Copy, Debug)]
pub struct VcEntry {
    pub gate: [u8; 16],
    pub tss_rsp0: u64,
    pub tss_ist: [u64; 7],
    pub cpl: u8,
    pub rip: u64,
    pub cs: u16,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u16,
    pub error_code: u64,
}

/// The state after delivery, and the frame to write at `rsp` (lowest
/// address first: error code, RIP, CS, RFLAGS, RSP, SS).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VcDelivery {
    pub rip: u64,
    pub cs: u16,
    pub rflags: u64,
    pub rsp: u64,
    /// The new SS when the CPL changes (a null selector), else unchanged.
    pub ss: Option<u16>,
    pub frame: [u64; 6],
}

/// Why #VC cannot be delivered (the guest is then stopped with a report:
/// on hardware each is a further fault, ending in a shutdown).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcDeliveryError {
    /// The gate is not present.
    NotPresent,
    /// Not a 64-bit interrupt or trap gate.
    NotAGate(u8),
}

const RFLAGS_TF: u64 = 1 << 8;
const RFLAGS_IF: u64 = 1 << 9;
const RFLAGS_NT: u64 = 1 << 14;
const RFLAGS_RF: u64 = 1 << 16;

/// Long-mode delivery of #VC through its gate (APM 8.9.3): the stack is
/// the IST one if the gate names one, RSP0 on a privilege change, else the
/// current one; aligned down to 16 bytes; SS, RSP, RFLAGS, CS, RIP and the
/// error code pushed; TF, NT and RF cleared, and IF too for an interrupt
/// gate.
pub fn deliver_vc(entry: &VcEntry) -> Result<VcDelivery, VcDeliveryError> {
    let g = &entry.gate;
    let attributes = g[5];
    if attributes & 0x80 == 0 {
        return Err(VcDeliveryError::NotPresent);
    }
    let kind = attributes & 0x0f;
    if kind != 0x0e && kind != 0x0f {
        return Err(VcDeliveryError::NotAGate(kind));
    }
    let offset = u64::from(u16::from_le_bytes([g[0], g[1]]))
        | (u64::from(u16::from_le_bytes([g[6], g[7]])) << 16)
        | (u64::from(u32::from_le_bytes([g[8], g[9], g[10], g[11]])) << 32);
    let selector = u16::from_le_bytes([g[2], g[3]]);
    let ist = usize::from(g[4] & 0x7);
    let new_cpl = (selector & 3) as u8;
    let changes_privilege = new_cpl < entry.cpl;
    let stack = if ist != 0 {
        entry.tss_ist[ist - 1]
    } else if changes_privilege {
        entry.tss_rsp0
    } else {
        entry.rsp
    };
    let rsp = (stack & !0xf).wrapping_sub(6 * 8);
    let mut rflags = entry.rflags & !(RFLAGS_TF | RFLAGS_NT | RFLAGS_RF);
    if kind == 0x0e {
        rflags &= !RFLAGS_IF;
    }
    Ok(VcDelivery {
        rip: offset,
        cs: selector,
        rflags,
        rsp,
        ss: changes_privilege.then_some(u16::from(new_cpl)),
        frame: [
            entry.error_code,
            entry.rip,
            u64::from(entry.cs),
            entry.rflags,
            entry.rsp,
            u64::from(entry.ss),
        ],
    })
}

/// The CPUID answer the hypervisor gives an SNP guest through the GHCB
/// (KVM's: the CPU's own leaves as `base` gives them, with what KVM sets
/// for a guest). Leaf 1: this vCPU's APIC ID in EBX[31:24], x2APIC and the
/// hypervisor bit (the emulator's APIC is x2APIC only); 0x21 (the TDX
/// signature) is not there; extended leaves reach 0x8000_001F, which says
/// SME, SEV, SEV-ES, SNP and SME_COHERENT (bit 10: Linux then skips the
/// cache flush, `amd_enc_cache_flush_required`) with the C-bit in
/// EBX[5:0] and one bit of address reduction in EBX[11:6]. KVM's
/// signature at 0x4000_0000.
pub fn snp_cpuid(
    leaf: u32,
    subleaf: u32,
    vcpu_index: u32,
    c_bit: u8,
    base: impl Fn(u32, u32) -> [u32; 4],
) -> [u32; 4] {
    const X2APIC: u32 = 1 << 21;
    const HYPERVISOR: u32 = 1 << 31;
    match leaf {
        0x1 => {
            let [a, b, c, d] = base(1, 0);
            [
                a,
                (b & 0x00ff_ffff) | (vcpu_index << 24),
                c | X2APIC | HYPERVISOR,
                d,
            ]
        }
        0x21 => [0; 4],
        0x4000_0000 => crate::cpuid::vmm_cpuid(leaf, subleaf),
        0x8000_0000 => {
            let [a, b, c, d] = base(leaf, 0);
            [a.max(0x8000_001f), b, c, d]
        }
        0x8000_001f => [0b1_1011 | (1 << 10), u32::from(c_bit) | (1 << 6), 0, 0],
        _ if (0x8000_0000..0x8000_001f).contains(&leaf) => {
            if base(0x8000_0000, 0)[0] < leaf {
                [0; 4]
            } else {
                base(leaf, subleaf)
            }
        }
        _ => base(leaf, subleaf),
    }
}

/// One segment register as the VMSA (and the VMCB) stores it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmsaSegment {
    pub selector: u16,
    /// Packed: type, S, DPL, P (bits 7:0), AVL, L, D/B, G (11:8).
    pub attributes: u16,
    pub limit: u32,
    pub base: u64,
}

/// What AP creation takes from a VMSA page (Linux `struct
/// sev_es_save_area`, APM vol. 2 appendix B): segments, control registers,
/// flags, RIP and the general-purpose registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmsaState {
    /// ES, CS, SS, DS, FS, GS, GDTR, LDTR, IDTR, TR (that order).
    pub segments: [VmsaSegment; 10],
    pub efer: u64,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub rflags: u64,
    pub rip: u64,
    pub rsp: u64,
    /// RAX, RCX, RDX, RBX, (RSP unused here), RBP, RSI, RDI, R8..R15.
    pub gprs: [u64; 16],
    pub g_pat: u64,
    pub sev_features: u64,
}

/// Indexes of [`VmsaState::segments`].
pub mod vmsa_segment {
    pub const ES: usize = 0;
    pub const CS: usize = 1;
    pub const SS: usize = 2;
    pub const DS: usize = 3;
    pub const FS: usize = 4;
    pub const GS: usize = 5;
    pub const GDTR: usize = 6;
    pub const LDTR: usize = 7;
    pub const IDTR: usize = 8;
    pub const TR: usize = 9;
}

/// Why a VMSA was refused; `Display` gives one line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmsaError {
    /// It does not describe 64-bit mode: EFER.LME/LMA, CR0.PE/PG, CR4.PAE
    /// and a present long-mode CS (L=1, D=0) are all needed.
    NotLongMode {
        efer: u64,
        cr0: u64,
        cr4: u64,
        cs_attributes: u16,
    },
    /// SEV_FEATURES lacks SNP_ACTIVE (bit 0), or differs from what the AP
    /// creation request's RAX says.
    SevFeatures { vmsa: u64, request: u64 },
}

impl core::fmt::Display for VmsaError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            VmsaError::NotLongMode {
                efer,
                cr0,
                cr4,
                cs_attributes,
            } => write!(
                f,
                "the VMSA does not describe long mode (EFER {efer:#x}, CR0 {cr0:#x}, CR4 \
                 {cr4:#x}, CS attributes {cs_attributes:#x})"
            ),
            VmsaError::SevFeatures { vmsa, request } => write!(
                f,
                "the VMSA's SEV_FEATURES {vmsa:#x} lack SNP_ACTIVE or differ from the \
                 request's {request:#x}"
            ),
        }
    }
}

/// Reads a VMSA page for AP creation; `sev_features` is the request's RAX.
pub fn parse_vmsa(page: &[u8; 4096], sev_features: u64) -> Result<VmsaState, VmsaError> {
    let q = |at: usize| {
        let mut raw = [0u8; 8];
        raw.copy_from_slice(&page[at..at + 8]);
        u64::from_le_bytes(raw)
    };
    let segment = |at: usize| VmsaSegment {
        selector: u16::from_le_bytes([page[at], page[at + 1]]),
        attributes: u16::from_le_bytes([page[at + 2], page[at + 3]]),
        limit: u32::from_le_bytes([page[at + 4], page[at + 5], page[at + 6], page[at + 7]]),
        base: q(at + 8),
    };
    let mut state = VmsaState {
        segments: core::array::from_fn(|i| segment(i * 0x10)),
        efer: q(0xd0),
        cr4: q(0x148),
        cr3: q(0x150),
        cr0: q(0x158),
        rflags: q(0x170),
        rip: q(0x178),
        rsp: q(0x1d8),
        g_pat: q(0x268),
        sev_features: q(0x3b0),
        gprs: [0; 16],
    };
    // RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8..R15.
    let offsets = [
        0x1f8, 0x308, 0x310, 0x318, 0x1d8, 0x328, 0x330, 0x338, 0x340, 0x348, 0x350, 0x358, 0x360,
        0x368, 0x370, 0x378,
    ];
    for (gpr, at) in state.gprs.iter_mut().zip(offsets) {
        *gpr = q(at);
    }
    let cs = state.segments[vmsa_segment::CS].attributes;
    let long_mode = state.efer & 0x500 == 0x500
        && state.cr0 & 0x8000_0001 == 0x8000_0001
        && state.cr4 & 0x20 != 0
        && cs & 0x80 != 0
        && cs & 0x600 == 0x200;
    if !long_mode {
        return Err(VmsaError::NotLongMode {
            efer: state.efer,
            cr0: state.cr0,
            cr4: state.cr4,
            cs_attributes: cs,
        });
    }
    if state.sev_features & 1 == 0 || state.sev_features != sev_features {
        return Err(VmsaError::SevFeatures {
            vmsa: state.sev_features,
            request: sev_features,
        });
    }
    Ok(state)
}

/// An IOIO request as SW_EXITINFO1 carries it (the SVM IOIO EXITINFO1
/// layout, APM vol. 2 15.10.2): port 31:16, operand size one-hot in 6:4,
/// bit 0 for IN; string and REP forms refused (the GHCB then needs a
/// scratch area this emulator does not offer).
pub fn ioio_request(info1: u64) -> Option<(u16, u8, bool)> {
    if info1 & 0b1100 != 0 {
        return None;
    }
    let size = match (info1 >> 4) & 0b111 {
        0b001 => 1,
        0b010 => 2,
        0b100 => 4,
        _ => return None,
    };
    Some(((info1 >> 16) as u16, size, info1 & 1 == 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snp_cpuid_says_snp_with_the_c_bit_and_hides_the_tdx_leaf() {
        let base = |leaf: u32, _sub: u32| match leaf {
            0x8000_0000 => [0x8000_000a, 1, 2, 3],
            0x21 => [0, 0x6c65_746e, 0x2020_2020, 0x5844_5449],
            _ => [leaf, 0xff00_0800, 0, 0],
        };
        let [a, b, _, _] = snp_cpuid(0x8000_001f, 0, 2, 47, base);
        assert_eq!(a & 0b1_1011, 0b1_1011, "SME, SEV, SEV-ES, SNP");
        assert_eq!(a & (1 << 10), 1 << 10, "SME_COHERENT");
        assert_eq!((b & 0x3f, (b >> 6) & 0x3f), (47, 1));
        assert_eq!(snp_cpuid(0x8000_0000, 0, 2, 47, base)[0], 0x8000_001f);
        assert_eq!(
            snp_cpuid(0x8000_0010, 0, 2, 47, base),
            [0; 4],
            "past the CPU's"
        );
        assert_eq!(snp_cpuid(0x21, 0, 2, 47, base), [0; 4]);
        let [_, b, c, _] = snp_cpuid(1, 0, 2, 47, base);
        assert_eq!((b >> 24, b & 0xffff), (2, 0x0800));
        assert_eq!(c & (1 << 21 | 1 << 31), 1 << 21 | 1 << 31);
    }

    fn long_mode_vmsa() -> [u8; 4096] {
        let mut page = [0u8; 4096];
        let mut put = |at: usize, v: u64| page[at..at + 8].copy_from_slice(&v.to_le_bytes());
        put(0xd0, 0xd01);
        put(0x158, 0x8005_0033);
        put(0x148, 0x20);
        put(0x150, 0x8000_0000_1000);
        put(0x178, 0xffff_ffff_8000_0000);
        put(0x1d8, 0x7000);
        put(0x338, 3);
        put(0x3b0, 1);
        // CS: selector 8, attributes P S code, L.
        put(0x10, 0x0000_ffff_029b_0008);
        page
    }

    #[test]
    fn a_vmsa_is_read_at_its_offsets_and_must_describe_long_mode() {
        let page = long_mode_vmsa();
        let state = parse_vmsa(&page, 1).unwrap();
        assert_eq!(state.rip, 0xffff_ffff_8000_0000);
        assert_eq!(
            (state.rsp, state.gprs[7], state.cr3),
            (0x7000, 3, 0x8000_0000_1000)
        );
        assert_eq!(state.segments[vmsa_segment::CS].selector, 8);
        assert_eq!(state.segments[vmsa_segment::CS].attributes, 0x29b);
        assert_eq!(
            parse_vmsa(&page, 3),
            Err(VmsaError::SevFeatures {
                vmsa: 1,
                request: 3
            })
        );
        let mut real_mode = page;
        real_mode[0x158..0x160].copy_from_slice(&0x10u64.to_le_bytes());
        assert!(matches!(
            parse_vmsa(&real_mode, 1),
            Err(VmsaError::NotLongMode { cr0: 0x10, .. })
        ));
        let mut compat = page;
        compat[0x12..0x14].copy_from_slice(&0x49bu16.to_le_bytes());
        assert!(parse_vmsa(&compat, 1).is_err(), "D=1, L=0: 32-bit code");
    }

    #[test]
    fn ioio_requests_are_decoded_and_string_forms_refused() {
        assert_eq!(ioio_request((0x3f8 << 16) | 0x10), Some((0x3f8, 1, true)));
        assert_eq!(
            ioio_request((0xf4 << 16) | 0x40 | 1),
            Some((0xf4, 4, false))
        );
        assert_eq!(ioio_request((0x80 << 16) | 0x20), Some((0x80, 2, true)));
        assert_eq!(ioio_request((0x3f8 << 16) | 0x10 | 0x4), None, "string");
        assert_eq!(ioio_request(0x30), None, "two sizes");
    }

    #[test]
    fn snp_instructions_are_told_apart_by_their_bytes() {
        assert_eq!(
            SnpInstruction::at(&[0xf3, 0x0f, 0x01, 0xd9, 0x90]),
            Some(SnpInstruction::Vmgexit)
        );
        assert_eq!(
            SnpInstruction::at(&[0x0f, 0x01, 0xd9]),
            Some(SnpInstruction::Vmmcall)
        );
        assert_eq!(
            SnpInstruction::at(&[0xf2, 0x0f, 0x01, 0xff]),
            Some(SnpInstruction::Pvalidate)
        );
        assert_eq!(
            SnpInstruction::at(&[0xf3, 0x0f, 0x01, 0xfe]),
            Some(SnpInstruction::Rmpadjust)
        );
        assert_eq!(SnpInstruction::at(&[0xf3, 0x0f, 0x01]), None, "cut short");
        assert_eq!(SnpInstruction::at(&[0x0f, 0x0b]), None, "ud2");
        assert_eq!(SnpInstruction::Vmgexit.length(), 4);
        assert_eq!(SnpInstruction::Vmmcall.length(), 3);
    }

    #[test]
    fn ghcb_fields_count_only_when_marked_valid() {
        let mut page = [0u8; 4096];
        let mut ghcb = Ghcb::new(&mut page);
        assert_eq!(ghcb.get(ghcb_field::SW_EXITCODE), None);
        ghcb.set(ghcb_field::SW_EXITCODE, 0x8000_0010);
        ghcb.set(ghcb_field::RAX, 7);
        assert_eq!(ghcb.get(ghcb_field::SW_EXITCODE), Some(0x8000_0010));
        assert_eq!(ghcb.get(ghcb_field::RAX), Some(7));
        assert_eq!(ghcb.get(ghcb_field::RCX), None);
        // SW_EXITCODE is qword 0x72 of the save area: bit 2 of bitmap byte 14.
        assert_eq!(page[VALID_BITMAP + 14] & (1 << 2), 1 << 2);
        let mut ghcb = Ghcb::new(&mut page);
        ghcb.clear_valid();
        assert_eq!(ghcb.get(ghcb_field::RAX), None);
        assert!(!ghcb.is_standard_v2());
        page[PROTOCOL_VERSION] = 2;
        let mut ghcb = Ghcb::new(&mut page);
        assert!(ghcb.is_standard_v2());
        // The scratch area must be the GHCB's own shared buffer.
        assert!(ghcb.shared_buffer(0x7000).is_none(), "not set");
        ghcb.set(ghcb_field::SW_SCRATCH, 0x9000);
        assert!(ghcb.shared_buffer(0x7000).is_none(), "elsewhere");
        ghcb.set(ghcb_field::SW_SCRATCH, 0x7800);
        assert_eq!(ghcb.shared_buffer(0x7000).map(|b| b.len()), Some(2032));
    }

    fn gate(offset: u64, selector: u16, ist: u8, attributes: u8) -> [u8; 16] {
        let mut g = [0u8; 16];
        g[0..2].copy_from_slice(&(offset as u16).to_le_bytes());
        g[2..4].copy_from_slice(&selector.to_le_bytes());
        g[4] = ist;
        g[5] = attributes;
        g[6..8].copy_from_slice(&((offset >> 16) as u16).to_le_bytes());
        g[8..12].copy_from_slice(&((offset >> 32) as u32).to_le_bytes());
        g
    }

    fn entry(gate: [u8; 16]) -> VcEntry {
        VcEntry {
            gate,
            tss_rsp0: 0xffff_c000_0001_0000,
            tss_ist: [0xffff_c000_0002_0008, 0, 0, 0, 0, 0, 0],
            cpl: 0,
            rip: 0xffff_ffff_8000_1234,
            cs: 0x10,
            rflags: 0x246 | RFLAGS_TF,
            rsp: 0xffff_c000_0000_3f08,
            ss: 0x18,
            error_code: 0x404,
        }
    }

    #[test]
    fn vc_is_delivered_with_its_error_code_on_the_right_stack() {
        let handler = 0xffff_ffff_8000_5678;
        // An interrupt gate, no IST, same privilege: the current stack,
        // aligned to 16, six qwords, IF and TF cleared.
        let d = deliver_vc(&entry(gate(handler, 0x10, 0, 0x8e))).unwrap();
        assert_eq!((d.rip, d.cs, d.ss), (handler, 0x10, None));
        assert_eq!(d.rsp, 0xffff_c000_0000_3f00 - 48);
        assert_eq!(d.rflags & (RFLAGS_IF | RFLAGS_TF), 0);
        assert_eq!(
            d.frame,
            [
                0x404,
                0xffff_ffff_8000_1234,
                0x10,
                0x246 | RFLAGS_TF,
                0xffff_c000_0000_3f08,
                0x18
            ]
        );
        // A trap gate keeps IF; IST 1 switches stacks.
        let d = deliver_vc(&entry(gate(handler, 0x10, 1, 0x8f))).unwrap();
        assert_eq!(d.rflags & RFLAGS_IF, RFLAGS_IF);
        assert_eq!(d.rsp, 0xffff_c000_0002_0000 - 48);
        // From CPL 3: RSP0 and a null SS.
        let mut user = entry(gate(handler, 0x10, 0, 0x8e));
        user.cpl = 3;
        let d = deliver_vc(&user).unwrap();
        assert_eq!((d.rsp, d.ss), (0xffff_c000_0001_0000 - 48, Some(0)));
        assert_eq!(
            deliver_vc(&entry(gate(handler, 0x10, 0, 0x0e))),
            Err(VcDeliveryError::NotPresent)
        );
        assert_eq!(
            deliver_vc(&entry(gate(handler, 0x10, 0, 0x8c))),
            Err(VcDeliveryError::NotAGate(0xc))
        );
    }
}
