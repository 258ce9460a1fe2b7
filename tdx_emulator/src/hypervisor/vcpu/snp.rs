//! The SNP mode's exits (option `snp`): what the CPU does for an SEV-SNP
//! guest (PVALIDATE and RMPADJUST, which TCG does not implement and which
//! arrive as #UD; #VC for every intercept that is not an automatic exit;
//! the RMP checks of a nested fault) and what a KVM-like hypervisor answers
//! through the GHCB (MSR protocol and GHCB page: CPUID, IOIO, MSR, page
//! state change, AP creation). The decisions are in
//! `tdx_emulator::snp_model` and `tdx_emulator::snp_exits`, host-tested;
//! this is the plumbing between them and the VMCB.
//!
//! Sources: AMD APM vol. 2 15.35 (SEV-ES: automatic exits, #VC, the GHCB
//! MSR), 15.36 (PVALIDATE, RMPADJUST, the RMP checks); the GHCB
//! specification as Linux spells it (arch/x86/include/asm/sev-common.h,
//! svm.h); KVM `sev.c` (`sev_handle_vmgexit`, `sev_snp_ap_creation`, its
//! GHCB error answers); QEMU's TCG, which treats `F3 0F 01 D9` as VMMCALL.

use super::*;
use tdx_emulator::snp_exits::{
    self, ghcb_field, vmsa_segment, Ghcb, SnpInstruction, VcEntry, VmsaState,
};
use tdx_emulator::snp_model::{self, MsrAnswer, PvalidateEffect, RmpState, SnpFault, SnpModel};

/// The GHCB MSR and SEV_STATUS (APM vol. 2 15.35.7, 15.34.10).
const MSR_GHCB: u32 = 0xc001_0130;
const MSR_SEV_STATUS: u32 = 0xc001_0131;
const MSR_EFER: u32 = 0xc000_0080;

/// #VC error codes for intercepts: the SVM exit code.
mod vc_code {
    pub const CPUID: u64 = 0x72;
    pub const INVD: u64 = 0x76;
    pub const IOIO: u64 = 0x7b;
    pub const MSR: u64 = 0x7c;
    pub const VMMCALL: u64 = 0x81;
    pub const WBINVD: u64 = 0x89;
}

/// GHCB exit codes (SW_EXITCODE) this hypervisor answers.
mod nae {
    pub const CPUID: u64 = 0x72;
    pub const IOIO: u64 = 0x7b;
    pub const MSR: u64 = 0x7c;
    pub const WBINVD: u64 = 0x89;
    pub const PSC: u64 = 0x8000_0010;
    pub const AP_CREATION: u64 = 0x8000_0013;
}

/// SW_EXITINFO2 reasons with SW_EXITINFO1 = 2 (GHCB spec, sev-common.h
/// `GHCB_ERR_*`).
mod ghcb_error {
    pub const INVALID_USAGE: u64 = 2;
    pub const INVALID_SCRATCH_AREA: u64 = 3;
    pub const MISSING_INPUT: u64 = 4;
    pub const INVALID_INPUT: u64 = 5;
    pub const INVALID_EVENT: u64 = 6;
}

/// What an MSR NAE answers for a refused access: #GP, as an event the
/// guest raises (KVM: `X86_TRAP_GP | SVM_EVTINJ_TYPE_EXEPT |
/// SVM_EVTINJ_VALID`).
const GP_EVENT: u64 = 13 | (3 << 8) | (1 << 31);

/// The RFLAGS bits PVALIDATE and RMPADJUST set from their result: CF, and
/// ZF/PF/AF/SF/OF cleared.
const RESULT_FLAGS: u64 = 0x8d5;

/// Copies a guest page (host-physical `hpa`) out, 8 bytes at a time with
/// volatile loads: other vCPUs (and the guest's own, after the exit) may
/// write it meanwhile, so it is never aliased as Rust memory.
fn copy_from_guest(hpa: u64, out: &mut [u8; 4096]) {
    for (i, chunk) in out.chunks_exact_mut(8).enumerate() {
        // SAFETY: `hpa` is a guest page (host_address checked it),
        // identity-mapped in the emulator, 8-aligned; a volatile load of
        // guest memory is what a DMA read is.
        let word = unsafe { core::ptr::read_volatile((hpa + 8 * i as u64) as *const u64) };
        chunk.copy_from_slice(&word.to_le_bytes());
    }
}

/// Copies `bytes` (a multiple of 8) into guest memory at `hpa` (8-aligned),
/// with volatile stores.
fn copy_to_guest(bytes: &[u8], hpa: u64) {
    for (i, chunk) in bytes.chunks_exact(8).enumerate() {
        let word = u64::from_le_bytes(chunk.try_into().expect("chunks of 8"));
        // SAFETY: inside the guest page `hpa` starts in (callers pass a
        // range of one page), identity-mapped, 8-aligned.
        unsafe { core::ptr::write_volatile((hpa + 8 * i as u64) as *mut u64, word) };
    }
}

fn model() -> &'static SnpModel<'static> {
    super::super::snp().expect("SNP exits only in SNP mode")
}

/// An AP's vCPU from the state its VMSA gave.
pub(super) fn vcpu_from_vmsa(
    index: usize,
    vmcb: Vmcb,
    host_vmcb: u64,
    memory: &'static TdMemory,
    state: &VmsaState,
) -> Vcpu {
    let segment = |s: snp_exits::VmsaSegment| Segment {
        selector: s.selector,
        attributes: s.attributes,
        limit: s.limit,
        base: s.base,
    };
    for (i, offset) in [
        save::ES,
        save::CS,
        save::SS,
        save::DS,
        save::FS,
        save::GS,
        save::GDTR,
        save::LDTR,
        save::IDTR,
        save::TR,
    ]
    .into_iter()
    .enumerate()
    {
        vmcb.set_segment(offset, segment(state.segments[i]));
    }
    let cs = state.segments[vmsa_segment::CS];
    vmcb.write_u8(save::CPL, (cs.attributes >> 5) as u8 & 3);
    vmcb.write_u64(save::EFER, state.efer | EFER_SVME);
    vmcb.write_u64(save::CR0, state.cr0);
    vmcb.write_u64(save::CR3, state.cr3);
    vmcb.write_u64(save::CR4, state.cr4);
    vmcb.write_u64(save::RFLAGS, state.rflags | 2);
    vmcb.write_u64(save::RIP, state.rip);
    vmcb.write_u64(save::RSP, state.rsp);
    vmcb.write_u64(save::RAX, state.gprs[0]);
    if state.g_pat != 0 {
        vmcb.write_u64(save::G_PAT, state.g_pat);
    }
    let g = &state.gprs;
    let registers = GuestRegisters {
        rcx: g[1],
        rdx: g[2],
        rbx: g[3],
        rbp: g[5],
        rsi: g[6],
        rdi: g[7],
        r8: g[8],
        r9: g[9],
        r10: g[10],
        r11: g[11],
        r12: g[12],
        r13: g[13],
        r14: g[14],
        r15: g[15],
    };
    Vcpu::new(index, vmcb, host_vmcb, registers, memory)
}

impl Vcpu {
    /// The SNP handling of exit `code`, if this is an SNP guest and the
    /// exit is one SNP changes; `None` leaves it to the common handling.
    pub(super) fn snp_exit(&mut self, code: u64, info1: u64, info2: u64) -> Option<Option<Event>> {
        super::super::snp()?;
        Some(match code {
            exit::EXCEPTION_UD => self.snp_undefined_opcode(),
            exit::VMMCALL => self.snp_vmmcall(),
            exit::CPUID => self.intercept_vc(vc_code::CPUID),
            exit::IOIO => self.intercept_vc(vc_code::IOIO),
            exit::MSR => self.snp_msr(info1 == 1),
            exit::WBINVD => self.intercept_vc(vc_code::WBINVD),
            exit::INVD => self.intercept_vc(vc_code::INVD),
            // HLT is an automatic exit under SEV-ES (APM Table 15-33): the
            // hypervisor sees it without a #VC.
            exit::HLT => {
                self.advance(1);
                self.wait_for_interrupt();
                None
            }
            exit::NPF => self.snp_nested_fault(info1, info2),
            _ => return None,
        })
    }

    /// The host address of guest-virtual `linear` as the CPU reaches it
    /// while delivering #VC (IDT, GDT, TSS, the stack: private accesses),
    /// if its page is validated and the address `align`-aligned. An
    /// unvalidated page there would be a second fault on hardware.
    fn private_host_address(&self, linear: u64, align: u64) -> Option<u64> {
        let gpa = self.translate(linear).filter(|gpa| gpa % align == 0)?;
        if model().state(gpa) != Some(RmpState::Validated) {
            return None;
        }
        self.memory.host_address(gpa)
    }

    fn read_guest_u64(&self, linear: u64) -> Option<u64> {
        let hpa = self.private_host_address(linear, 8)?;
        // SAFETY: guest memory, identity-mapped in the emulator, 8-aligned;
        // a volatile load (other vCPUs may write it, as with a DMA read).
        Some(unsafe { core::ptr::read_volatile(hpa as *const u64) })
    }

    fn write_guest_u64(&self, linear: u64, value: u64) -> bool {
        let Some(hpa) = self.private_host_address(linear, 8) else {
            return false;
        };
        // SAFETY: guest memory, identity-mapped, 8-aligned; a volatile
        // store, as the CPU's own push to the stack would be.
        unsafe { core::ptr::write_volatile(hpa as *mut u64, value) };
        true
    }

    /// An intercept that SEV-ES turns into #VC in the guest, which asks the
    /// hypervisor itself through the GHCB.
    fn intercept_vc(&mut self, code: u64) -> Option<Event> {
        let counters = model().counters;
        let counter = match code {
            vc_code::CPUID => &counters.vc_cpuid,
            vc_code::IOIO => &counters.vc_ioio,
            vc_code::MSR => &counters.vc_msr,
            _ => &counters.vc_other,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.deliver_vc(code)
    }

    /// Delivers #VC with `error_code` the way the CPU does in 64-bit mode
    /// (snp_exits::deliver_vc): QEMU's TCG would drop the error code of an
    /// injected vector 29.
    fn deliver_vc(&mut self, error_code: u64) -> Option<Event> {
        let vmcb = &self.vmcb;
        let idt = vmcb.segment_base(save::IDTR);
        let idt_limit = vmcb.read_u32(save::IDTR + 4);
        let gate_at = idt + u64::from(snp_exits::VC_VECTOR) * 16;
        if u64::from(idt_limit) < u64::from(snp_exits::VC_VECTOR) * 16 + 15 {
            self.shut_down(format_args!(
                "#VC {error_code:#x} with no IDT entry for vector 29 (IDT limit {idt_limit:#x})"
            ));
        }
        let (Some(low), Some(high)) = (
            self.read_guest_u64(gate_at),
            self.read_guest_u64(gate_at + 8),
        ) else {
            self.shut_down(format_args!(
                "#VC {error_code:#x}: the IDT at {idt:#x} is not mapped on a validated page"
            ));
        };
        let mut gate = [0u8; 16];
        gate[..8].copy_from_slice(&low.to_le_bytes());
        gate[8..].copy_from_slice(&high.to_le_bytes());
        let tss = vmcb.segment_base(save::TR);
        let tss_u64 = |at: u64| {
            // The TSS fields are 4-aligned only: two reads.
            let lo = self.read_guest_u32(tss + at).unwrap_or(0);
            let hi = self.read_guest_u32(tss + at + 4).unwrap_or(0);
            u64::from(lo) | (u64::from(hi) << 32)
        };
        let entry = VcEntry {
            gate,
            tss_rsp0: tss_u64(4),
            tss_ist: core::array::from_fn(|i| tss_u64(0x24 + 8 * i as u64)),
            cpl: vmcb.read_u8(save::CPL),
            rip: self.rip(),
            cs: vmcb.read_u16(save::CS),
            rflags: vmcb.read_u64(save::RFLAGS),
            rsp: vmcb.read_u64(save::RSP),
            ss: vmcb.read_u16(save::SS),
            error_code,
        };
        let delivery = match snp_exits::deliver_vc(&entry) {
            Ok(delivery) => delivery,
            Err(e) => self.shut_down(format_args!(
                "#VC {error_code:#x} cannot be delivered: {e:?}"
            )),
        };
        let code_descriptor = self
            .read_guest_u64(vmcb.segment_base(save::GDTR) + u64::from(delivery.cs & !7))
            .unwrap_or(0);
        let attributes = ((code_descriptor >> 40) & 0xff) as u16
            | ((((code_descriptor >> 52) & 0xf) as u16) << 8);
        if attributes & 0x80 == 0 || attributes & 0x600 != 0x200 {
            self.shut_down(format_args!(
                "#VC {error_code:#x}: gate selector {:#x} is not a present 64-bit code segment",
                delivery.cs
            ));
        }
        for (i, value) in delivery.frame.iter().enumerate() {
            if !self.write_guest_u64(delivery.rsp + 8 * i as u64, *value) {
                self.shut_down(format_args!(
                    "#VC {error_code:#x}: its frame at {:#x} is not on a validated page",
                    delivery.rsp
                ));
            }
        }
        let vmcb = &self.vmcb;
        vmcb.set_segment(
            save::CS,
            Segment {
                selector: delivery.cs,
                attributes,
                limit: 0xffff_ffff,
                base: 0,
            },
        );
        if let Some(ss) = delivery.ss {
            vmcb.set_segment(
                save::SS,
                Segment {
                    selector: ss,
                    attributes: 0,
                    limit: 0,
                    base: 0,
                },
            );
        }
        vmcb.write_u8(save::CPL, (delivery.cs & 3) as u8);
        vmcb.write_u64(save::RIP, delivery.rip);
        vmcb.write_u64(save::RSP, delivery.rsp);
        vmcb.write_u64(save::RFLAGS, delivery.rflags);
        vmcb.write_u64(control::INTERRUPT_SHADOW, 0);
        None
    }

    fn read_guest_u32(&self, linear: u64) -> Option<u32> {
        let hpa = self.private_host_address(linear, 4)?;
        // SAFETY: guest memory, identity-mapped in the emulator, 4-aligned;
        // a volatile load.
        Some(unsafe { core::ptr::read_volatile(hpa as *const u32) })
    }

    fn instruction_at_rip(&self) -> Option<SnpInstruction> {
        let rip = self.vmcb.segment_base(save::CS) + self.rip();
        let bytes = [0, 1, 2, 3].map(|i| self.read_guest_byte(rip + i).unwrap_or(0));
        SnpInstruction::at(&bytes)
    }

    fn snp_undefined_opcode(&mut self) -> Option<Event> {
        match self.instruction_at_rip() {
            Some(SnpInstruction::Pvalidate) => self.pvalidate(),
            Some(SnpInstruction::Rmpadjust) => self.rmpadjust(),
            _ => {
                REFLECTED_UD.fetch_add(1, Ordering::Relaxed);
                Some(Event::exception(6, None))
            }
        }
    }

    /// The guest-physical page `va` maps (no C-bit), if its leaf is present
    /// and private (C=1), or the #PF the CPU would raise.
    fn private_page_of(&self, va: u64) -> Result<Option<u64>, Event> {
        let Some(gpa) = self.translate(va) else {
            // A supervisor read of a not-present page (APM: PVALIDATE
            // translates RAX as a read).
            self.vmcb.write_u64(save::CR2, va);
            return Err(Event::exception(14, Some(0)));
        };
        // Whether the leaf carries the C-bit (translate strips it).
        let leaf = self
            .guest_tables()
            .and_then(|tables| tables.lookup_address(VirtAddr(va)).ok());
        let private = leaf.is_some_and(|leaf| leaf.entry.0 & self.memory.c_bit != 0);
        Ok(private.then_some(gpa))
    }

    /// PVALIDATE (`F2 0F 01 FF`): RAX the page's virtual address, ECX 0 for
    /// 4K or 1 for 2M, EDX 1 to validate or 0 to rescind; EAX the result,
    /// CF = 1 if the Validated bit did not change.
    fn pvalidate(&mut self) -> Option<Event> {
        if self.vmcb.read_u8(save::CPL) != 0 {
            return Some(Event::exception(13, Some(0)));
        }
        let va = self.vmcb.read_u64(save::RAX);
        let size = self.registers.rcx as u32;
        let validate = self.registers.rdx & 1 != 0;
        let align = if size == 1 { 2 << 20 } else { 4096 };
        if size > 1 || !va.is_multiple_of(align) {
            // Checked on RAX itself: a 4K leaf of an unaligned address may
            // map an aligned frame.
            self.finish_rmp_instruction(snp_model::pvalidate_rc::FAIL_INPUT, false);
            return None;
        }
        let gpa = match self.private_page_of(va) {
            Err(fault) => return Some(fault),
            // Through a C=0 mapping: FAIL_INPUT (our choice; the APM does
            // not say, and a correct guest never does it).
            Ok(None) => {
                self.finish_rmp_instruction(snp_model::pvalidate_rc::FAIL_INPUT, false);
                return None;
            }
            Ok(Some(gpa)) => gpa,
        };
        match model().pvalidate(gpa, size == 1, validate, self.memory) {
            PvalidateEffect::Done { rc, unchanged } => self.finish_rmp_instruction(rc, unchanged),
            PvalidateEffect::Retry => {}
            PvalidateEffect::Kill(why) => self.shut_down(why),
        }
        None
    }

    /// RMPADJUST (`F3 0F 01 FE`): RAX the page's virtual address, ECX the
    /// size, RDX the attributes; EAX the result.
    fn rmpadjust(&mut self) -> Option<Event> {
        if self.vmcb.read_u8(save::CPL) != 0 {
            return Some(Event::exception(13, Some(0)));
        }
        let va = self.vmcb.read_u64(save::RAX);
        let size = self.registers.rcx as u32;
        let rc = match self.private_page_of(va) {
            Err(fault) => return Some(fault),
            Ok(None) => snp_model::pvalidate_rc::FAIL_INPUT,
            Ok(Some(_)) if size > 1 => snp_model::pvalidate_rc::FAIL_INPUT,
            Ok(Some(gpa)) => model().rmpadjust(gpa, size == 1, self.registers.rdx),
        };
        self.finish_rmp_instruction(rc, false);
        None
    }

    fn finish_rmp_instruction(&mut self, rc: u32, carry: bool) {
        self.vmcb.write_u64(save::RAX, u64::from(rc));
        let flags = self.vmcb.read_u64(save::RFLAGS) & !RESULT_FLAGS;
        self.vmcb.write_u64(save::RFLAGS, flags | u64::from(carry));
        self.advance(4);
    }

    /// VMMCALL exits: VMGEXIT (its REP prefix tells it apart), or a plain
    /// VMMCALL, which SEV-ES turns into #VC.
    fn snp_vmmcall(&mut self) -> Option<Event> {
        if self.instruction_at_rip() != Some(SnpInstruction::Vmgexit) {
            return self.intercept_vc(vc_code::VMMCALL);
        }
        // VMGEXIT is trap-like: the guest resumes after it.
        self.advance(SnpInstruction::Vmgexit.length());
        let value = self.ghcb_msr;
        if value & 0xfff != 0 {
            self.msr_protocol(value);
        } else {
            self.ghcb_exit(value);
        }
        None
    }

    fn snp_cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4] {
        snp_exits::snp_cpuid(
            leaf,
            subleaf,
            self.index as u32,
            self.memory.c_bit.trailing_zeros() as u8,
            host_cpuid,
        )
    }

    fn msr_protocol(&mut self, request: u64) {
        self.ghcb_msr = match model().msr_protocol(request, self.memory) {
            MsrAnswer::Response(response) => {
                if request & 0xfff == 0x012 && response >> 12 == request >> 12 {
                    self.registered_ghcb = Some(request & !0xfff);
                }
                response
            }
            MsrAnswer::Cpuid { leaf, register } => {
                let value = self.snp_cpuid(leaf, 0)[usize::from(register)];
                (u64::from(value) << 32) | 0x005
            }
            MsrAnswer::Terminate { set, code } => self.shut_down(format_args!(
                "the SNP guest asked to terminate: reason set {set}, code {code}"
            )),
        };
    }

    /// A VMGEXIT with the GHCB page at `gpa` (the MSR holds its address).
    fn ghcb_exit(&mut self, gpa: u64) {
        let snp = model();
        if self.registered_ghcb != Some(gpa) {
            snp.counters.ghcb_refused.fetch_add(1, Ordering::Relaxed);
            self.shut_down(format_args!(
                "VMGEXIT with GHCB {gpa:#x}, which this vCPU did not register (KVM stops an SNP guest for it)"
            ));
        }
        if snp.state(gpa) != Some(RmpState::Shared) {
            snp.counters.ghcb_refused.fetch_add(1, Ordering::Relaxed);
            self.shut_down(format_args!(
                "VMGEXIT with GHCB {gpa:#x}, which is not a shared page: the hypervisor cannot read it"
            ));
        }
        let Some(hpa) = self.memory.host_address(gpa) else {
            self.shut_down(format_args!("GHCB {gpa:#x} outside guest memory"));
        };
        snp.counters.ghcb_exits.fetch_add(1, Ordering::Relaxed);
        let mut page = [0u8; 4096];
        copy_from_guest(hpa, &mut page);
        let mut ghcb = Ghcb::new(&mut page);
        let answer = self.ghcb_request(&mut ghcb, gpa);
        if let Err(reason) = answer {
            snp.counters.ghcb_refused.fetch_add(1, Ordering::Relaxed);
            ghcb.clear_valid();
            ghcb.set(ghcb_field::SW_EXITINFO1, 2);
            ghcb.set(ghcb_field::SW_EXITINFO2, reason);
        }
        // The request may have changed the GHCB's own state (a PSC that
        // names it): the hypervisor then may not write it.
        if snp.state(gpa) != Some(RmpState::Shared) {
            snp.counters.ghcb_refused.fetch_add(1, Ordering::Relaxed);
            self.shut_down(format_args!(
                "the GHCB at {gpa:#x} stopped being a shared page during the request"
            ));
        }
        // Back go the save area (answered fields and the valid bitmap) and
        // the shared buffer, as KVM writes back what it answered and the
        // scratch area; the rest of the page stays the guest's.
        copy_to_guest(&page[..snp_exits::SAVE_AREA_END], hpa);
        copy_to_guest(
            &page[snp_exits::SHARED_BUFFER
                ..snp_exits::SHARED_BUFFER + snp_exits::SHARED_BUFFER_BYTES],
            hpa + snp_exits::SHARED_BUFFER as u64,
        );
    }

    /// One GHCB request; Err is the SW_EXITINFO2 reason of a malformed one.
    fn ghcb_request(&mut self, ghcb: &mut Ghcb, gpa: u64) -> Result<(), u64> {
        use ghcb_error::*;
        if !ghcb.is_standard_v2() {
            return Err(INVALID_USAGE);
        }
        let code = ghcb.get(ghcb_field::SW_EXITCODE).ok_or(MISSING_INPUT)?;
        let info1 = ghcb.get(ghcb_field::SW_EXITINFO1).ok_or(MISSING_INPUT)?;
        let info2 = ghcb.get(ghcb_field::SW_EXITINFO2).ok_or(MISSING_INPUT)?;
        let input = |field| ghcb.get(field).ok_or(MISSING_INPUT);
        let mut answer = [(0usize, 0u64); 4];
        let mut answers = 0;
        let mut out_info1 = 0;
        let mut out_info2 = 0;
        match code {
            nae::CPUID => {
                let leaf = input(ghcb_field::RAX)? as u32;
                let subleaf = input(ghcb_field::RCX)? as u32;
                let [a, b, c, d] = self.snp_cpuid(leaf, subleaf);
                answer = [
                    (ghcb_field::RAX, a.into()),
                    (ghcb_field::RBX, b.into()),
                    (ghcb_field::RCX, c.into()),
                    (ghcb_field::RDX, d.into()),
                ];
                answers = 4;
            }
            nae::IOIO => {
                let (port, size, write) = snp_exits::ioio_request(info1).ok_or(INVALID_INPUT)?;
                let rax = input(ghcb_field::RAX).unwrap_or(0);
                let value = if write { rax as u32 } else { 0 };
                if let Some(read) = devices::port_io(port, size, write, value) {
                    let mask = match size {
                        1 => 0xff,
                        2 => 0xffff,
                        _ => 0xffff_ffff,
                    };
                    answer[0] = (ghcb_field::RAX, (rax & !mask) | (u64::from(read) & mask));
                    answers = 1;
                }
            }
            nae::MSR => {
                let msr = input(ghcb_field::RCX)? as u32;
                if info1 == 1 {
                    let value =
                        (input(ghcb_field::RDX)? << 32) | (input(ghcb_field::RAX)? & 0xffff_ffff);
                    if !self.vmm_wrmsr(msr, value) {
                        (out_info1, out_info2) = (1, GP_EVENT);
                    }
                } else {
                    match self.vmm_rdmsr(msr) {
                        Some(value) => {
                            answer[0] = (ghcb_field::RAX, value & 0xffff_ffff);
                            answer[1] = (ghcb_field::RDX, value >> 32);
                            answers = 2;
                        }
                        None => (out_info1, out_info2) = (1, GP_EVENT),
                    }
                }
            }
            // Caches are coherent here: nothing to write back.
            nae::WBINVD => {}
            nae::PSC => {
                let buffer = ghcb.shared_buffer(gpa).ok_or(INVALID_SCRATCH_AREA)?;
                out_info2 = model().ghcb_psc(buffer, self.memory);
            }
            nae::AP_CREATION => {
                let sev_features = input(ghcb_field::RAX)?;
                self.create_ap(info1, info2, sev_features)?;
            }
            _ => return Err(INVALID_EVENT),
        }
        ghcb.clear_valid();
        for &(field, value) in &answer[..answers] {
            ghcb.set(field, value);
        }
        ghcb.set(ghcb_field::SW_EXITINFO1, out_info1);
        ghcb.set(ghcb_field::SW_EXITINFO2, out_info2);
        Ok(())
    }

    /// AP creation (SW_EXITINFO1: APIC ID in 63:32, VMPL in 23:16, request
    /// in 15:0; SW_EXITINFO2: the VMSA's GPA), request 1 (create) only.
    fn create_ap(&self, info1: u64, vmsa_gpa: u64, sev_features: u64) -> Result<(), u64> {
        let refuse = |why: core::fmt::Arguments| {
            println!("emulator: AP creation refused: {why}");
            Err(ghcb_error::INVALID_INPUT)
        };
        let (request, vmpl, apic_id) = (info1 & 0xffff, (info1 >> 16) & 0xff, info1 >> 32);
        if request != 1 || vmpl != 0 {
            return refuse(format_args!(
                "request {request} at VMPL {vmpl} (only 1, create, at VMPL 0)"
            ));
        }
        if !vmsa_gpa.is_multiple_of(4096) || !model().is_vmsa(vmsa_gpa) {
            return refuse(format_args!(
                "{vmsa_gpa:#x} is not a validated page that RMPADJUST marked as a VMSA"
            ));
        }
        let Some(hpa) = self.memory.host_address(vmsa_gpa) else {
            return refuse(format_args!("VMSA {vmsa_gpa:#x} outside guest memory"));
        };
        let mut page = [0u8; 4096];
        copy_from_guest(hpa, &mut page);
        let state = match snp_exits::parse_vmsa(&page, sev_features) {
            Ok(state) => state,
            Err(e) => return refuse(format_args!("{e}")),
        };
        if !super::super::post_vmsa(apic_id, self.index, state) {
            return refuse(format_args!(
                "APIC ID {apic_id} is not a vCPU that can start (none, this one, or running)"
            ));
        }
        model().counters.aps_created.fetch_add(1, Ordering::Relaxed);
        super::super::send_kick(apic_id as usize);
        Ok(())
    }

    /// RDMSR/WRMSR: the GHCB MSR and SEV_STATUS are the CPU's (never
    /// intercepted on hardware), EFER is kept as in TD mode (SVME hidden);
    /// every other intercepted MSR is #VC 0x7C.
    fn snp_msr(&mut self, write: bool) -> Option<Event> {
        let msr = self.registers.rcx as u32;
        let value = (self.registers.rdx << 32) | (self.vmcb.read_u64(save::RAX) & 0xffff_ffff);
        let read = match (msr, write) {
            (MSR_GHCB, true) => {
                self.ghcb_msr = value;
                None
            }
            (MSR_GHCB, false) => Some(self.ghcb_msr),
            (MSR_SEV_STATUS, false) => Some(SnpModel::SEV_STATUS),
            (MSR_SEV_STATUS, true) => return Some(Event::exception(13, Some(0))),
            (MSR_EFER, _) => return self.msr(write),
            _ => return self.intercept_vc(vc_code::MSR),
        };
        if let Some(value) = read {
            self.vmcb.write_u64(save::RAX, value & 0xffff_ffff);
            self.registers.rdx = value >> 32;
        }
        self.advance(2);
        None
    }

    fn snp_nested_fault(&mut self, error: u64, gpa: u64) -> Option<Event> {
        super::super::COUNTERS
            .nested_page_faults
            .fetch_add(1, Ordering::Relaxed);
        match model().nested_fault(gpa, error & 2 != 0, self.memory) {
            SnpFault::Retry => None,
            SnpFault::Vc { error_code } => {
                // The faulting guest virtual address goes in CR2 (APM
                // 15.36.10); SVM reports only the GPA, so it is decoded
                // from the instruction as in TD mode (0 when it is not one
                // the decoder knows).
                let gla = self.faulting_linear_address(gpa & !self.memory.c_bit);
                self.vmcb.write_u64(save::CR2, gla);
                self.deliver_vc(error_code)
            }
            SnpFault::Kill(why) => self.shut_down(why),
        }
    }
}
