//! One vCPU of the TD per emulator CPU: set up its VMCB, run it, and handle
//! each #VMEXIT as the TDX module (TDCALL, #VE, native CPUID/MSR answers) or
//! as the KVM-like VMM behind it (TDVMCALL services, x2APIC, timer, IPIs,
//! devices) would.

use super::memory::TdMemory;
use super::svm::{self, control, exit, intercept, save, GuestRegisters, Segment, Vmcb};
use super::{clock, devices, firmware_layout, td, vapic, TD_VCPUS};
use bare::println;
use coco_pagetable::{CcMask, PageTables, PagingMode, PhysAddr, VirtAddr};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use tdx_emulator::control_regs::{self, CrInstruction, CrWrite};
use tdx_emulator::cpuid::{self, CpuidAnswer, CpuidConfig};
use tdx_emulator::decode;
use tdx_emulator::events::{self, Event};
use tdx_emulator::model::{
    exit_reason, vmm_write, Access, FaultEffect, Gpr, TdcallEffect, VcpuState, VeInfo,
};
use tdx_emulator::msr::{self, MsrPolicy};
use tdx_hypercall::TdcallRegs;

mod snp;

/// Maximum vCPUs.
pub const MAX_VCPUS: usize = 16;
/// The emulator-internal IPI that makes a CPU leave guest mode.
pub const KICK_VECTOR: u8 = 0xf2;

/// TDVMCALL status the VMM returns for an operand it refuses (GHCI).
const TDVMCALL_INVALID_OPERAND: u64 = 0x8000_0000_0000_0000;

/// #UDs that were not a TDCALL, reflected to the TD.
pub static REFLECTED_UD: AtomicU64 = AtomicU64::new(0);

/// Whether each vCPU is in guest mode, and the nested-TLB generation it
/// flushed for last.
static IN_GUEST: [AtomicBool; MAX_VCPUS] = [const { AtomicBool::new(false) }; MAX_VCPUS];
static SEEN_GENERATION: [AtomicU64; MAX_VCPUS] = [const { AtomicU64::new(0) }; MAX_VCPUS];
static NESTED_GENERATION: AtomicU64 = AtomicU64::new(0);

/// Makes the emulator CPU running `vcpu` leave guest mode (or its HLT).
fn kick(vcpu: usize) {
    if vcpu != bare::smp::cpu_index() {
        super::send_kick(vcpu);
    }
}

/// After a change to the nested tables: every vCPU flushes its nested
/// translations before it runs guest code again; those in guest mode now are
/// kicked out, and this returns when none can still use a stale translation.
pub fn flush_nested_tlbs_everywhere() {
    let generation = NESTED_GENERATION.fetch_add(1, Ordering::SeqCst) + 1;
    let me = bare::smp::cpu_index();
    for vcpu in 0..TD_VCPUS.load(Ordering::SeqCst) {
        if vcpu == me {
            continue;
        }
        while IN_GUEST[vcpu].load(Ordering::SeqCst)
            && SEEN_GENERATION[vcpu].load(Ordering::SeqCst) < generation
        {
            kick(vcpu);
            for _ in 0..1000 {
                if !IN_GUEST[vcpu].load(Ordering::SeqCst) {
                    break;
                }
                core::hint::spin_loop();
            }
        }
    }
}

/// How a vCPU starts (made once per vCPU, on its stack: the emulator has
/// no allocator to box the VMSA state in).
#[allow(clippy::large_enum_variant)]
pub enum Start {
    /// The boot vCPU, as TD firmware hands over a payload (the Linux 64-bit
    /// boot protocol, Documentation/arch/x86/boot.rst): long mode, paging on
    /// an identity map, CS = 0x10, DS = ES = SS = 0x18, interrupts off,
    /// RSI = the boot_params page.
    Boot64 { entry: u64, boot_params: u64 },
    /// An AP woken through the mailbox: 64-bit mode at `vector`, RDI = APIC ID
    /// (ACPI 6.4 section 5.2.12.19).
    Mailbox { vector: u64 },
    /// An SNP guest's AP, created from the VMSA its guest gave (GHCB AP
    /// creation): segments, descriptor tables, EFER, CR0/CR3/CR4, RFLAGS,
    /// RIP, RSP, the general-purpose registers and G_PAT as it holds them.
    Vmsa(tdx_emulator::snp_exits::VmsaState),
}

const FLAT_CODE64: u16 = 0xa9b;
const FLAT_DATA: u16 = 0xc93;
/// CR0 of a TD in long mode: PE, MP, ET, NE, WP, PG (NE, PE and PG are
/// fixed to 1 in a TD: TDX module `td_vmcs_init.c`, CR0 guest/host mask).
const TD_CR0: u64 = 0x8001_0033;
/// CR4: PAE and MCE (MCE is fixed to 1 in a TD).
const TD_CR4: u64 = 0x60;
/// EFER: SCE, LME, LMA, NXE (the TD's initial EFER, 0xD01 with LMA) plus
/// SVME, which SVM requires of the guest and which reads and writes through
/// the MSR intercept never show.
const TD_EFER_VISIBLE: u64 = 0xd01;
const EFER_SVME: u64 = 1 << 12;

/// Runs vCPU `index` forever.
pub fn run(index: usize, memory: &'static TdMemory, start: Start) -> ! {
    let frames = &super::memory::FRAMES;
    let page = || frames.allocate().expect("emulator out of memory");
    // SAFETY: a fresh zeroed page used only as this vCPU's VMCB.
    let vmcb = unsafe { Vmcb::new(page()) };
    svm::enable(page());
    let host_vmcb = page();
    let layout = firmware_layout();
    let snp = super::snp().is_some();
    vmcb.write_u32(control::INTERCEPT_EXCEPTIONS, intercept::UD);
    // An SNP guest's control registers live in its VMSA, out of the
    // hypervisor's reach (SEV-ES: APM vol. 2 15.35.1).
    if !snp {
        vmcb.write_u32(
            control::INTERCEPT_CR,
            intercept::CR0_WRITE | intercept::CR4_WRITE,
        );
    }
    vmcb.write_u32(
        control::INTERCEPT_MISC1,
        intercept::INTR
            | intercept::NMI
            | intercept::CPUID
            | intercept::INVD
            | intercept::HLT
            | intercept::IOIO
            | intercept::MSR
            | intercept::SHUTDOWN,
    );
    vmcb.write_u32(
        control::INTERCEPT_MISC2,
        intercept::VMRUN | intercept::WBINVD | if snp { intercept::VMMCALL } else { 0 },
    );
    vmcb.write_u64(control::IOPM_BASE, super::io_permission_map());
    vmcb.write_u64(control::MSRPM_BASE, super::msr_permission_map());
    vmcb.write_u32(control::ASID, 1);
    vmcb.write_u64(control::NESTED_CONTROL, 1);
    vmcb.write_u64(control::NESTED_CR3, memory.root());
    // V_INTR_MASKING: the guest's IF masks only virtual interrupts.
    vmcb.write_u64(control::VIRTUAL_INTERRUPT, 1 << 24);
    vmcb.write_u64(save::G_PAT, 0x0007_0406_0007_0406);
    vmcb.write_u64(save::DR6, 0xffff_0ff0);
    vmcb.write_u64(save::DR7, 0x400);
    vmcb.write_u64(save::RFLAGS, 2);
    vmcb.set_segment(
        save::LDTR,
        Segment {
            selector: 0,
            attributes: 0x82,
            limit: 0xffff,
            base: 0,
        },
    );
    vmcb.set_segment(
        save::TR,
        Segment {
            selector: 0,
            attributes: 0x8b,
            limit: 0xffff,
            base: 0,
        },
    );
    vmcb.write_u64(save::CR0, TD_CR0);
    vmcb.write_u64(save::CR4, TD_CR4);
    vmcb.write_u64(save::CR3, layout.ap_tables | memory.c_bit);
    vmcb.write_u64(save::EFER, TD_EFER_VISIBLE | EFER_SVME);
    let mut registers = GuestRegisters::default();
    let (code, data, gdt, rip) = match start {
        Start::Boot64 { entry, boot_params } => {
            registers.rsi = boot_params;
            (0x10, 0x18, layout.boot_gdt, entry)
        }
        Start::Mailbox { vector } => {
            registers.rdi = index as u64;
            (0x08, 0x10, layout.ap_gdt, vector)
        }
        Start::Vmsa(state) => {
            let vcpu = snp::vcpu_from_vmsa(index, vmcb, host_vmcb, memory, &state);
            if index == 0 {
                println!("emulator: vCPU 0 starts");
            }
            vcpu.run_forever()
        }
    };
    vmcb.set_segment(
        save::CS,
        Segment {
            selector: code,
            attributes: FLAT_CODE64,
            limit: 0xffff_ffff,
            base: 0,
        },
    );
    for offset in [save::DS, save::ES, save::SS, save::FS, save::GS] {
        vmcb.set_segment(
            offset,
            Segment {
                selector: data,
                attributes: FLAT_DATA,
                limit: 0xffff_ffff,
                base: 0,
            },
        );
    }
    vmcb.set_segment(
        save::GDTR,
        Segment {
            selector: 0,
            attributes: 0,
            limit: 31,
            base: gdt,
        },
    );
    vmcb.write_u64(save::RIP, rip);
    let vcpu = Vcpu::new(index, vmcb, host_vmcb, registers, memory);
    if index == 0 {
        // Only before the TD prints anything: the TD's console bytes and
        // the emulator's lines share COM1 without a common lock.
        println!("emulator: vCPU 0 starts");
    }
    vcpu.run_forever()
}

struct Vcpu {
    index: usize,
    vmcb: Vmcb,
    /// This CPU's VMSAVE area for the emulator's own state.
    host_vmcb: u64,
    registers: GuestRegisters,
    memory: &'static TdMemory,
    state: VcpuState,
    /// The TSC deadline this CPU's APIC timer is armed for (0: none).
    armed_deadline: u64,
    /// Emulated native MSRs with a per-vCPU value (DEBUGCTL, SPEC_CTRL,
    /// DS_AREA, XSS, UARCH_MISC_CTL): (MSR, value), MSR 0 = free slot.
    stored: [(u32, u64); 8],
    /// SNP: the GHCB MSR (0xC001_0130), which hardware keeps in the VMSA,
    /// and the GHCB GPA this vCPU registered.
    ghcb_msr: u64,
    registered_ghcb: Option<u64>,
}

impl Vcpu {
    /// A vCPU whose VMCB holds its starting state.
    fn new(
        index: usize,
        vmcb: Vmcb,
        host_vmcb: u64,
        registers: GuestRegisters,
        memory: &'static TdMemory,
    ) -> Vcpu {
        Vcpu {
            index,
            vmcb,
            host_vmcb,
            registers,
            memory,
            state: VcpuState {
                index: index as u32,
                ve_latched: None,
            },
            armed_deadline: 0,
            stored: [(0, 0); 8],
            ghcb_msr: 0,
            registered_ghcb: None,
        }
    }

    fn run_forever(mut self) -> ! {
        loop {
            self.enter();
            self.handle_exit();
        }
    }

    fn rip(&self) -> u64 {
        self.vmcb.read_u64(save::RIP)
    }

    fn advance(&self, bytes: u64) {
        self.vmcb.write_u64(save::RIP, self.rip() + bytes);
    }

    fn inject(&self, event: Event) {
        self.vmcb
            .write_u64(control::EVENT_INJECTION, event.to_event_injection());
    }

    /// Fires the TD's timer if due, and arms this CPU's APIC timer so that a
    /// later deadline forces an exit (or ends a HLT) when it comes.
    fn service_timer(&mut self) {
        let now = bare::cpu::read_tsc();
        vapic::poll_timer(self.index, now);
        let deadline = vapic::next_deadline(self.index).unwrap_or(0);
        if deadline == self.armed_deadline {
            return;
        }
        self.armed_deadline = deadline;
        if let Some(apic) = super::APIC.get() {
            if deadline == 0 {
                apic.stop_timer();
            } else {
                let ticks = clock::apic_ticks_for(deadline.saturating_sub(now));
                let _ = apic.start_one_shot_timer(super::TIMER_VECTOR, ticks);
            }
        }
    }

    fn enter(&mut self) {
        self.service_timer();
        let vmcb = &self.vmcb;
        svm::hold_interrupts_until_exit();
        // A virtual interrupt for the guest, if one waits and none is queued.
        // A vector set pending after this look comes with a kick, which GIF
        // holds until VMRUN turns it into an exit.
        let virtual_interrupt = vmcb.read_u64(control::VIRTUAL_INTERRUPT);
        if virtual_interrupt & (1 << 8) == 0 {
            if let Some(vector) = vapic::take_highest_pending(self.index) {
                let value =
                    (1 << 24) | (1 << 20) | (0xf << 16) | (1 << 8) | (u64::from(vector) << 32);
                vmcb.write_u64(control::VIRTUAL_INTERRUPT, value);
            }
        }
        IN_GUEST[self.index].store(true, Ordering::SeqCst);
        let generation = NESTED_GENERATION.load(Ordering::SeqCst);
        let flush = SEEN_GENERATION[self.index].swap(generation, Ordering::SeqCst) != generation;
        vmcb.write_u8(control::TLB_CONTROL, u8::from(flush));
        // SAFETY: SVM is enabled on this CPU (run), the VMCB holds a
        // consistent state built in `run` and updated only by exit handling,
        // the nested tables map only TD memory, host_vmcb is this vCPU's own
        // page, interrupts are enabled and GIF is clear (above).
        unsafe { svm::run(vmcb, &mut self.registers, self.host_vmcb) };
        IN_GUEST[self.index].store(false, Ordering::SeqCst);
    }

    fn handle_exit(&mut self) {
        let code = self.vmcb.read_u64(control::EXIT_CODE);
        let info1 = self.vmcb.read_u64(control::EXIT_INFO1);
        let info2 = self.vmcb.read_u64(control::EXIT_INFO2);
        // An event interrupted in delivery is delivered again; an exit that
        // injects its own event must not lose it (events::merge).
        let interrupted = Event::from_exit_int_info(self.vmcb.read_u64(control::EXIT_INT_INFO));
        self.vmcb.write_u64(control::EVENT_INJECTION, 0);
        let injected = match self.snp_exit(code, info1, info2) {
            Some(answer) => answer,
            None => self.td_exit(code, info1, info2),
        };
        let merged = events::merge(interrupted, injected);
        if let Some(vector) = merged.requeue {
            vapic::set_pending(self.index, vector);
        }
        if let Some(event) = merged.inject {
            self.inject(event);
        }
    }

    /// A TD's exit, and the exits an SNP guest shares with it.
    fn td_exit(&mut self, code: u64, info1: u64, info2: u64) -> Option<Event> {
        match code {
            exit::EXCEPTION_UD => self.undefined_opcode(),
            exit::CPUID => self.cpuid(),
            exit::CR0_WRITE | exit::CR4_WRITE => self.control_register_write(),
            // HLT always #VEs in a TD (TDX module td_other_exits.c); the
            // guest asks the VMM through TDVMCALL<Instruction.HLT>.
            exit::HLT => self.virtualization_exception(exit_reason::HLT, 0, 1),
            exit::IOIO => self.port_io(info1, info2),
            exit::MSR => self.msr(info1 == 1),
            exit::NPF => self.nested_page_fault(info1, info2),
            // The TDX module raises #VE for these in every configuration.
            exit::WBINVD => self.virtualization_exception(exit_reason::WBINVD, 0, 2),
            exit::INVD => self.virtualization_exception(exit_reason::INVD, 0, 2),
            exit::INTR | exit::NMI | exit::VINTR => None,
            exit::SHUTDOWN => self.shut_down("the TD shut down (triple fault)"),
            exit::INVALID => self.fatal("VMRUN refused the guest state"),
            other => {
                println!(
                    "emulator: vCPU {} unexpected #VMEXIT {other:#x} info {info1:#x} {info2:#x}",
                    self.index
                );
                self.fatal("unexpected exit");
            }
        }
    }

    fn fatal(&self, why: &str) -> ! {
        println!(
            "FATAL: emulator: vCPU {}: {why} at RIP {:#x} (CR0 {:#x} CR3 {:#x})",
            self.index,
            self.rip(),
            self.vmcb.read_u64(save::CR0),
            self.vmcb.read_u64(save::CR3)
        );
        super::print_counters();
        bare::exit::qemu_exit(bare::exit::EXIT_FAILURE)
    }

    /// The VMM stops the TD (a KVM VM marked dead, or a triple fault).
    fn shut_down(&self, why: impl core::fmt::Display) -> ! {
        if super::snp().is_some() {
            println!("emulator: SNP guest shutdown: {why}");
            self.fatal("SNP guest shutdown")
        }
        println!("emulator: TD shutdown: {why}");
        self.fatal("TD shutdown")
    }

    fn virtualization_exception(
        &mut self,
        reason: u32,
        qualification: u64,
        length: u32,
    ) -> Option<Event> {
        let info = VeInfo {
            exit_reason: reason,
            exit_qualification: qualification,
            instruction_length: length,
            ..VeInfo::default()
        };
        let effect = td().raise_ve(&mut self.state, info);
        self.fault_effect(effect)
    }

    fn fault_effect(&self, effect: FaultEffect) -> Option<Event> {
        match effect {
            FaultEffect::VirtualizationException => Some(Event::exception(20, None)),
            FaultEffect::DoubleFault => Some(Event::exception(8, Some(0))),
            FaultEffect::Retry => None,
            FaultEffect::Shutdown(reason) => self.shut_down(reason),
        }
    }

    /// Guest linear address to guest-physical, through the guest's tables.
    fn translate(&self, linear: u64) -> Option<u64> {
        if self.vmcb.read_u64(save::CR0) & (1 << 31) == 0 {
            return Some(linear);
        }
        self.guest_tables()?
            .translate(VirtAddr(linear))
            .map(|pa| pa.0)
    }

    /// The guest's own tables (CR3), read with its platform's C/S bits
    /// (TDX's shared bit, or SNP's C-bit).
    fn guest_tables(&self) -> Option<PageTables<GuestTables>> {
        let cc = if self.memory.c_bit != 0 {
            CcMask::with_private_bit(self.memory.c_bit.trailing_zeros()).ok()?
        } else {
            CcMask::tdx(super::GPAW).ok()?
        };
        let root = self.vmcb.read_u64(save::CR3) & 0x000f_ffff_ffff_f000 & !cc.all();
        // SAFETY: the guest's tables are the guest's to get wrong, and
        // GuestTables is sound for any address: it reads only TD memory (8
        // aligned bytes, volatile) and writes nothing.
        Some(unsafe {
            PageTables::new(
                GuestTables(self.memory),
                PhysAddr(root),
                PagingMode::FourLevel,
                cc,
            )
        })
    }

    fn read_guest_byte(&self, linear: u64) -> Option<u8> {
        let gpa = self.translate(linear)?;
        let hpa = self.memory.host_address(gpa)?;
        // SAFETY: TD memory, identity-mapped in the emulator.
        Some(unsafe { core::ptr::read_volatile(hpa as *const u8) })
    }

    fn undefined_opcode(&mut self) -> Option<Event> {
        let rip = self.vmcb.segment_base(save::CS) + self.rip();
        let bytes = [0, 1, 2, 3].map(|i| self.read_guest_byte(rip + i));
        if bytes != [Some(0x66), Some(0x0f), Some(0x01), Some(0xcc)] {
            // Not a TDCALL (BUG()/WARN() use ud2): the guest's own #UD.
            REFLECTED_UD.fetch_add(1, Ordering::Relaxed);
            return Some(Event::exception(6, None));
        }
        let r = &mut self.registers;
        let mut regs = TdcallRegs {
            rax: self.vmcb.read_u64(save::RAX),
            rcx: r.rcx,
            rdx: r.rdx,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
        };
        let effect = td().tdcall(&mut self.state, &mut regs, self.memory);
        if effect != TdcallEffect::Retry {
            self.advance(4);
        }
        let failed = TDVMCALL_INVALID_OPERAND;
        match effect {
            TdcallEffect::Resume | TdcallEffect::Retry => {}
            TdcallEffect::Shutdown(reason) => self.shut_down(reason),
            TdcallEffect::Halt { .. } => self.wait_for_interrupt(),
            TdcallEffect::Io {
                port,
                size,
                write,
                value,
            } => {
                if let Some(read) = devices::port_io(port, size, write, value) {
                    vmm_write(&mut regs, Gpr::R11, u64::from(read));
                }
            }
            TdcallEffect::Mmio {
                gpa,
                size,
                write,
                value,
            } => {
                if let Some(read) = devices::mmio(gpa, size, write, value) {
                    vmm_write(&mut regs, Gpr::R11, read);
                }
            }
            TdcallEffect::Cpuid { leaf, subleaf } => {
                let [a, b, c, d] = cpuid::vmm_cpuid(leaf, subleaf);
                for (gpr, value) in [(Gpr::R12, a), (Gpr::R13, b), (Gpr::R14, c), (Gpr::R15, d)] {
                    vmm_write(&mut regs, gpr, value.into());
                }
            }
            TdcallEffect::Rdmsr { msr } => {
                match self.vmm_rdmsr(msr) {
                    Some(value) => vmm_write(&mut regs, Gpr::R11, value),
                    None => vmm_write(&mut regs, Gpr::R10, failed),
                };
            }
            TdcallEffect::Wrmsr { msr, value } => {
                if !self.vmm_wrmsr(msr, value) {
                    vmm_write(&mut regs, Gpr::R10, failed);
                }
            }
            TdcallEffect::Fatal { code } => {
                println!("emulator: the TD reported a fatal error {code:#x}");
                self.shut_down("ReportFatalError");
            }
        }
        self.vmcb.write_u64(save::RAX, regs.rax);
        let r = &mut self.registers;
        (r.rcx, r.rdx, r.r8, r.r9, r.r10, r.r11) =
            (regs.rcx, regs.rdx, regs.r8, regs.r9, regs.r10, regs.r11);
        (r.r12, r.r13, r.r14, r.r15) = (regs.r12, regs.r13, regs.r14, regs.r15);
        None
    }

    fn cpuid(&mut self) -> Option<Event> {
        let leaf = self.vmcb.read_u64(save::RAX) as u32;
        let subleaf = self.registers.rcx as u32;
        let config = CpuidConfig {
            tsc_hz: clock::tsc_hz(),
            vcpus: TD_VCPUS.load(Ordering::SeqCst) as u32,
            gpaw: super::GPAW,
        };
        match cpuid::td_cpuid(leaf, subleaf, self.index as u32, &config, host_cpuid) {
            CpuidAnswer::Native([a, b, c, d]) => {
                self.vmcb.write_u64(save::RAX, a.into());
                (self.registers.rbx, self.registers.rcx, self.registers.rdx) =
                    (b.into(), c.into(), d.into());
                self.advance(2);
                None
            }
            CpuidAnswer::VirtualizationException => {
                self.virtualization_exception(exit_reason::CPUID, 0, 2)
            }
        }
    }

    /// Guest general-purpose register `n` (0 = RAX ... 15 = R15).
    fn gpr(&self, n: u8) -> u64 {
        let r = &self.registers;
        match n {
            0 => self.vmcb.read_u64(save::RAX),
            1 => r.rcx,
            2 => r.rdx,
            3 => r.rbx,
            4 => self.vmcb.read_u64(save::RSP),
            5 => r.rbp,
            6 => r.rsi,
            7 => r.rdi,
            8 => r.r8,
            9 => r.r9,
            10 => r.r10,
            11 => r.r11,
            12 => r.r12,
            13 => r.r13,
            14 => r.r14,
            _ => r.r15,
        }
    }

    /// MOV to CR0/CR4 or CLTS, constrained as in a TD
    /// (tdx_emulator::control_regs).
    fn control_register_write(&mut self) -> Option<Event> {
        let rip = self.vmcb.segment_base(save::CS) + self.rip();
        let bytes = [0, 1, 2, 3].map(|i| self.read_guest_byte(rip + i));
        let Some(instruction) = control_regs::decode(bytes) else {
            self.fatal("a CR0/CR4 write by an instruction the emulator does not decode");
        };
        let (cr, gpr, value) = match instruction {
            CrInstruction::MovToCr { cr, gpr, .. } => (cr, gpr, self.gpr(gpr)),
            CrInstruction::Clts => (
                0,
                0,
                control_regs::after_clts(self.vmcb.read_u64(save::CR0)),
            ),
        };
        let (verdict, offset) = match cr {
            0 => (control_regs::cr0_write(value), save::CR0),
            4 => (control_regs::cr4_write(value), save::CR4),
            _ => self.fatal("a control-register write the intercepts do not ask for"),
        };
        match verdict {
            CrWrite::Apply(value) => {
                self.vmcb.write_u64(offset, value);
                self.advance(u64::from(instruction.length()));
                None
            }
            CrWrite::GeneralProtection => Some(Event::exception(13, Some(0))),
            CrWrite::VirtualizationException => self.virtualization_exception(
                exit_reason::CR_ACCESS,
                control_regs::qualification(cr, gpr),
                u32::from(instruction.length()),
            ),
        }
    }

    /// Port IO always #VEs in a TD (the TDX module sets unconditional IO
    /// exiting), with the VMX exit qualification (SDM vol. 3 table 28-5:
    /// size - 1 in bits 2:0, IN in bit 3, string in bit 4, REP in bit 5,
    /// port in 31:16) converted from SVM's IOIO EXITINFO1.
    fn port_io(&mut self, info1: u64, next_rip: u64) -> Option<Event> {
        let port = (info1 >> 16) & 0xffff;
        let size = if info1 & (1 << 4) != 0 {
            1
        } else if info1 & (1 << 5) != 0 {
            2
        } else {
            4
        };
        let read = info1 & 1;
        let string = (info1 >> 2) & 1;
        let rep = (info1 >> 3) & 1;
        let qualification = (size - 1) | (read << 3) | (string << 4) | (rep << 5) | (port << 16);
        let length = next_rip.saturating_sub(self.rip()) as u32;
        self.virtualization_exception(exit_reason::IO, qualification, length)
    }

    /// RDMSR/WRMSR that the MSR bitmap sent here: the module's policy
    /// (tdx_emulator::msr) decides native, #VE or #GP.
    fn msr(&mut self, write: bool) -> Option<Event> {
        let msr = self.registers.rcx as u32;
        let value = (self.registers.rdx << 32) | (self.vmcb.read_u64(save::RAX) & 0xffff_ffff);
        match msr::td_msr_policy(msr, write) {
            MsrPolicy::VirtualizationException => {
                let reason = if write {
                    exit_reason::WRMSR
                } else {
                    exit_reason::RDMSR
                };
                return self.virtualization_exception(reason, 0, 2);
            }
            MsrPolicy::GeneralProtection => return Some(Event::exception(13, Some(0))),
            MsrPolicy::Native => {}
        }
        if write {
            match self.native_wrmsr(msr, value) {
                NativeWrite::Done => {}
                NativeWrite::VirtualizationException => {
                    return self.virtualization_exception(exit_reason::WRMSR, 0, 2)
                }
                NativeWrite::GeneralProtection => return Some(Event::exception(13, Some(0))),
            }
        } else {
            let Some(value) = self.native_rdmsr(msr) else {
                return Some(Event::exception(13, Some(0)));
            };
            self.vmcb.write_u64(save::RAX, value & 0xffff_ffff);
            self.registers.rdx = value >> 32;
        }
        self.advance(2);
        None
    }

    /// A native MSR the emulator answers (those the CPU may answer itself
    /// are not intercepted: msr::passes_through).
    fn native_rdmsr(&self, msr: u32) -> Option<u64> {
        match msr::classify_native(msr)? {
            msr::NativeMsr::Efer => Some(self.vmcb.read_u64(save::EFER) & !EFER_SVME),
            msr::NativeMsr::X2apicVirtual(msr) => vapic::read(self.index, msr),
            kind => Some(msr::native_value(kind, self.stored_msr(msr))),
        }
    }

    fn native_wrmsr(&mut self, msr: u32, value: u64) -> NativeWrite {
        let Some(kind) = msr::classify_native(msr) else {
            return NativeWrite::GeneralProtection;
        };
        if let msr::NativeMsr::X2apicVirtual(msr) = kind {
            return if self.apic_write(msr, value) {
                NativeWrite::Done
            } else {
                NativeWrite::GeneralProtection
            };
        }
        let current = match kind {
            msr::NativeMsr::Efer => self.vmcb.read_u64(save::EFER) & !EFER_SVME,
            _ => self.stored_msr(msr),
        };
        match msr::native_write(kind, current, value) {
            msr::NativeWrite::Store(new) => {
                if kind == msr::NativeMsr::Efer {
                    self.vmcb.write_u64(save::EFER, new | EFER_SVME);
                } else if let Some(slot) =
                    self.stored.iter_mut().find(|(m, _)| *m == msr || *m == 0)
                {
                    *slot = (msr, new);
                }
                NativeWrite::Done
            }
            // IBPB and L1D flush: nothing to do in an emulated TD.
            msr::NativeWrite::Command(_) => NativeWrite::Done,
            msr::NativeWrite::GeneralProtection => NativeWrite::GeneralProtection,
            msr::NativeWrite::VirtualizationException => NativeWrite::VirtualizationException,
        }
    }

    /// The vCPU's value of an emulated native MSR that keeps one (0 at reset).
    fn stored_msr(&self, msr: u32) -> u64 {
        self.stored
            .iter()
            .find(|(m, _)| *m == msr)
            .map_or(0, |(_, value)| *value)
    }

    /// TDVMCALL<Instruction.RDMSR>: the VMM's answer.
    fn vmm_rdmsr(&self, msr: u32) -> Option<u64> {
        if vapic::is_apic_msr(msr) {
            return vapic::read(self.index, msr);
        }
        msr::vmm_rdmsr(msr)
    }

    fn vmm_wrmsr(&self, msr: u32, value: u64) -> bool {
        if vapic::is_apic_msr(msr) {
            return self.apic_write(msr, value);
        }
        msr::vmm_wrmsr(msr, value)
    }

    /// A write to this vCPU's virtual APIC; false if it refuses it.
    fn apic_write(&self, msr: u32, value: u64) -> bool {
        match vapic::write(self.index, msr, value) {
            vapic::ApicWrite::Done => true,
            vapic::ApicWrite::Refused => false,
            vapic::ApicWrite::Ipi { targets, vector } => {
                self.send_ipi(targets, vector);
                true
            }
        }
    }

    fn send_ipi(&self, targets: vapic::VcpuSet, vector: u8) {
        for target in targets.iter() {
            vapic::set_pending(target, vector);
            super::COUNTERS.ipis.fetch_add(1, Ordering::Relaxed);
            kick(target);
        }
    }

    fn nested_page_fault(&mut self, error: u64, gpa: u64) -> Option<Event> {
        let access = Access {
            write: error & 2 != 0,
            fetch: error & 16 != 0,
        };
        let gla = self.faulting_linear_address(gpa);
        let effect = td().nested_fault(&mut self.state, gpa, gla, access, self.memory);
        self.fault_effect(effect)
    }

    /// The linear address the faulting instruction accessed: SVM reports
    /// none for a nested fault, the TDX module puts it in the #VE info, and
    /// Linux's handle_mmio checks it. Decoded from the instruction's memory
    /// operand (tdx_emulator::decode), moved to the page the access faulted
    /// on; 0 when it is not one of the MMIO instructions Linux decodes either.
    fn faulting_linear_address(&self, gpa: u64) -> u64 {
        let rip = self.vmcb.segment_base(save::CS) + self.rip();
        let mut bytes = [0u8; 15];
        let mut fetched = 0;
        for (i, byte) in bytes.iter_mut().enumerate() {
            match self.read_guest_byte(rip + i as u64) {
                Some(value) => *byte = value,
                None => break,
            }
            fetched = i + 1;
        }
        let context = decode::AddressContext {
            gprs: core::array::from_fn(|n| self.gpr(n as u8)),
            rip,
            fs_base: self.vmcb.segment_base(save::FS),
            gs_base: self.vmcb.segment_base(save::GS),
        };
        decode::memory_operand_address(&bytes[..fetched], &context)
            .map_or(0, |operand| decode::faulting_address(operand, gpa))
    }

    /// TDVMCALL<HLT>: sleep until an interrupt for this vCPU is pending (the
    /// TD's timer included). Linux's tdx_halt/tdx_safe_halt make it with
    /// interrupts blocked in the TD and enable them after it returns, so an
    /// interrupt pending counts whatever the guest's RFLAGS.IF is.
    fn wait_for_interrupt(&mut self) {
        loop {
            bare::cpu::disable_interrupts();
            self.service_timer();
            if vapic::has_pending(self.index)
                || self.vmcb.read_u64(control::VIRTUAL_INTERRUPT) & (1 << 8) != 0
            {
                bare::cpu::enable_interrupts();
                return;
            }
            // A kick or the timer interrupt after the check ends the HLT.
            bare::cpu::enable_interrupts_and_halt();
        }
    }
}

/// This (L1) CPU's CPUID, as EAX, EBX, ECX, EDX: what the CPU offers the
/// guest before the TDX module's or the hypervisor's rules.
fn host_cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    let r = bare::cpu::cpuid(leaf, subleaf);
    [r.eax, r.ebx, r.ecx, r.edx]
}

enum NativeWrite {
    Done,
    VirtualizationException,
    GeneralProtection,
}

/// The guest's page tables, read through TD memory.
struct GuestTables(&'static TdMemory);

// SAFETY: `load` reads the entry it names (or 0 outside TD memory); the
// writes do nothing. It needs nothing of its callers.
unsafe impl coco_pagetable::TableMemory for GuestTables {
    unsafe fn load(&self, table: PhysAddr, index: usize) -> u64 {
        match self.0.host_address(table.0 + (index as u64 & 511) * 8) {
            // SAFETY: TD memory, identity-mapped; entries are 8-byte aligned.
            Some(hpa) => unsafe { core::ptr::read_volatile(hpa as *const u64) },
            None => 0,
        }
    }
    // The emulator never writes the guest's tables.
    unsafe fn compare_exchange(
        &self,
        _table: PhysAddr,
        _index: usize,
        current: u64,
        _new: u64,
    ) -> Result<u64, u64> {
        Err(current)
    }
    unsafe fn store_unpublished(&self, _table: PhysAddr, _index: usize, _value: u64) {}
}
