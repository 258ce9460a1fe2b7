//! One vCPU of the TD per emulator CPU: set up its VMCB, run it, and handle
//! each #VMEXIT as the TDX module (TDCALL, #VE) or as the VMM behind it
//! (TDVMCALL services, x2APIC, IPIs) would.

use super::memory::TdMemory;
use super::svm::{self, control, exit, intercept, save, GuestRegisters, Segment, Vmcb};
use super::{firmware_layout, td, TD_VCPUS};
use bare::println;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use pagetable::{CcMask, PageTables, PagingMode, PhysAddr, VirtAddr};
use tdx_emulator::model::{exit_reason, FaultEffect, TdcallEffect, VcpuState, VeInfo};
use tdx_hypercall::TdcallRegs;

/// Maximum vCPUs.
pub const MAX_VCPUS: usize = 16;
/// The emulator-internal IPI that makes a CPU leave guest mode.
pub const KICK_VECTOR: u8 = 0xf2;

/// Interrupts waiting to be delivered to each vCPU (256-bit sets).
static PENDING: [[AtomicU64; 4]; MAX_VCPUS] =
    [const { [const { AtomicU64::new(0) }; 4] }; MAX_VCPUS];
/// Whether each vCPU is in guest mode, and the nested-TLB generation it
/// flushed for last.
static IN_GUEST: [AtomicBool; MAX_VCPUS] = [const { AtomicBool::new(false) }; MAX_VCPUS];
static SEEN_GENERATION: [AtomicU64; MAX_VCPUS] = [const { AtomicU64::new(0) }; MAX_VCPUS];
static NESTED_GENERATION: AtomicU64 = AtomicU64::new(0);

fn set_pending(vcpu: usize, vector: u8) {
    if let Some(set) = PENDING.get(vcpu) {
        set[usize::from(vector) / 64].fetch_or(1 << (vector % 64), Ordering::SeqCst);
    }
}

fn take_highest_pending(vcpu: usize) -> Option<u8> {
    let set = PENDING.get(vcpu)?;
    for word in (0..4).rev() {
        let bits = set[word].load(Ordering::SeqCst);
        if bits != 0 {
            let bit = 63 - bits.leading_zeros() as usize;
            set[word].fetch_and(!(1 << bit), Ordering::SeqCst);
            return Some((word * 64 + bit) as u8);
        }
    }
    None
}

fn has_pending(vcpu: usize) -> bool {
    PENDING
        .get(vcpu)
        .is_some_and(|set| set.iter().any(|w| w.load(Ordering::SeqCst) != 0))
}

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

/// How a vCPU starts.
pub enum Start {
    /// The boot vCPU: 32-bit protected mode at the PVH entry, EBX = start info.
    Pvh { entry: u32, start_info: u64 },
    /// An AP woken through the mailbox: 64-bit mode at `vector`, RDI = APIC ID.
    Mailbox { vector: u64 },
}

const FLAT_CODE32: u16 = 0xc9b;
const FLAT_CODE64: u16 = 0xa9b;
const FLAT_DATA: u16 = 0xc93;

/// Runs vCPU `index` forever.
pub fn run(index: usize, memory: &'static TdMemory, start: Start) -> ! {
    let frames = &super::memory::FRAMES;
    let page = || frames.allocate().expect("emulator out of memory");
    // SAFETY: a fresh zeroed page used only as this vCPU's VMCB.
    let vmcb = unsafe { Vmcb::new(page()) };
    svm::enable(page());
    let host_vmcb = page();
    let layout = firmware_layout();
    vmcb.write_u32(control::INTERCEPT_EXCEPTIONS, intercept::UD);
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
        intercept::VMRUN | intercept::WBINVD,
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
    let mut registers = GuestRegisters::default();
    let data = Segment {
        selector: 0x10,
        attributes: FLAT_DATA,
        limit: 0xffff_ffff,
        base: 0,
    };
    match start {
        Start::Pvh { entry, start_info } => {
            vmcb.set_segment(
                save::CS,
                Segment {
                    selector: 0x08,
                    attributes: FLAT_CODE32,
                    limit: 0xffff_ffff,
                    base: 0,
                },
            );
            vmcb.write_u64(save::CR0, 0x11); // PE | ET
            vmcb.write_u64(save::EFER, 1 << 12); // SVME
            vmcb.write_u64(save::RIP, u64::from(entry));
            registers.rbx = start_info;
        }
        Start::Mailbox { vector } => {
            vmcb.set_segment(
                save::CS,
                Segment {
                    selector: 0x08,
                    attributes: FLAT_CODE64,
                    limit: 0xffff_ffff,
                    base: 0,
                },
            );
            vmcb.write_u64(save::CR0, 0x8001_0031); // PG | WP | NE | ET | PE
            vmcb.write_u64(save::CR4, 0x20); // PAE
            vmcb.write_u64(save::CR3, layout.ap_tables);
            vmcb.write_u64(save::EFER, (1 << 12) | (1 << 11) | (1 << 10) | (1 << 8)); // SVME NXE LMA LME
            vmcb.set_segment(
                save::GDTR,
                Segment {
                    selector: 0,
                    attributes: 0,
                    limit: 23,
                    base: layout.ap_gdt,
                },
            );
            vmcb.write_u64(save::RIP, vector);
            registers.rdi = index as u64;
        }
    }
    for offset in [save::DS, save::ES, save::SS, save::FS, save::GS] {
        vmcb.set_segment(offset, data);
    }
    let mut vcpu = Vcpu {
        index,
        vmcb,
        host_vmcb,
        registers,
        memory,
        state: VcpuState {
            index: index as u32,
            ve_latched: None,
        },
    };
    if index == 0 {
        // Only before the TD prints anything: the TD's console bytes and
        // the emulator's lines share COM1 without a common lock.
        println!("emulator: vCPU 0 starts");
    }
    loop {
        vcpu.enter();
        vcpu.handle_exit();
    }
}

struct Vcpu {
    index: usize,
    vmcb: Vmcb,
    /// This CPU's VMSAVE area for the emulator's own state.
    host_vmcb: u64,
    registers: GuestRegisters,
    memory: &'static TdMemory,
    state: VcpuState,
}

fn inject_exception(vmcb: &Vmcb, vector: u8, error_code: Option<u32>) {
    let mut event = u64::from(vector) | (3 << 8) | (1 << 31);
    if let Some(code) = error_code {
        event |= (1 << 11) | (u64::from(code) << 32);
    }
    vmcb.write_u64(control::EVENT_INJECTION, event);
}

impl Vcpu {
    fn rip(&self) -> u64 {
        self.vmcb.read_u64(save::RIP)
    }

    fn advance(&self, bytes: u64) {
        self.vmcb.write_u64(save::RIP, self.rip() + bytes);
    }

    fn enter(&mut self) {
        let vmcb = &self.vmcb;
        svm::hold_interrupts_until_exit();
        // A virtual interrupt for the guest, if one waits and none is queued.
        // A vector set pending after this look comes with a kick, which GIF
        // holds until VMRUN turns it into an exit.
        let virtual_interrupt = vmcb.read_u64(control::VIRTUAL_INTERRUPT);
        if virtual_interrupt & (1 << 8) == 0 {
            if let Some(vector) = take_highest_pending(self.index) {
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
        // An event interrupted in delivery is delivered again, unless this
        // exit injects its own.
        let interrupted = self.vmcb.read_u64(control::EXIT_INT_INFO);
        self.vmcb.write_u64(
            control::EVENT_INJECTION,
            if interrupted & (1 << 31) != 0 {
                interrupted
            } else {
                0
            },
        );
        let strict = td().options().strict;
        match code {
            exit::EXCEPTION_UD => self.undefined_opcode(),
            exit::CPUID => self.cpuid(strict),
            exit::HLT => {
                if strict {
                    self.virtualization_exception(exit_reason::HLT, 0, 1);
                } else {
                    self.advance(1);
                    self.wait_for_interrupt();
                }
            }
            exit::IOIO => self.port_io(info1, info2, strict),
            exit::MSR => self.msr(info1 == 1, strict),
            exit::NPF => self.nested_page_fault(info1, info2),
            // The TDX module raises #VE for these in every configuration.
            exit::WBINVD => self.virtualization_exception(exit_reason::WBINVD, 0, 2),
            exit::INVD => self.virtualization_exception(exit_reason::INVD, 0, 2),
            exit::INTR | exit::NMI | exit::VINTR => {}
            exit::SHUTDOWN => self.fatal("the TD shut down (triple fault)"),
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

    fn virtualization_exception(&mut self, reason: u32, qualification: u64, length: u32) {
        let info = VeInfo {
            exit_reason: reason,
            exit_qualification: qualification,
            instruction_length: length,
            ..VeInfo::default()
        };
        let effect = td().raise_ve(&mut self.state, info);
        self.inject_fault_effect(effect);
    }

    fn inject_fault_effect(&self, effect: FaultEffect) {
        match effect {
            FaultEffect::VirtualizationException => inject_exception(&self.vmcb, 20, None),
            FaultEffect::DoubleFault => inject_exception(&self.vmcb, 8, Some(0)),
            FaultEffect::OutsideMemory => self.fatal("access outside TD memory"),
        }
    }

    /// Guest linear address to guest-physical, through the guest's tables.
    fn translate(&self, linear: u64) -> Option<u64> {
        if self.vmcb.read_u64(save::CR0) & (1 << 31) == 0 {
            return Some(linear);
        }
        let root = self.vmcb.read_u64(save::CR3) & 0x000f_ffff_ffff_f000;
        let tables = PageTables::new(
            GuestTables(self.memory),
            PhysAddr(root),
            PagingMode::FourLevel,
            CcMask::tdx(super::GPAW).ok()?,
        );
        tables.translate(VirtAddr(linear)).map(|pa| pa.0)
    }

    fn read_guest_byte(&self, linear: u64) -> Option<u8> {
        let gpa = self.translate(linear)?;
        let hpa = self.memory.host_address(gpa)?;
        // SAFETY: TD memory, identity-mapped in the emulator.
        Some(unsafe { core::ptr::read_volatile(hpa as *const u8) })
    }

    fn undefined_opcode(&mut self) {
        let rip = self.vmcb.segment_base(save::CS) + self.rip();
        let bytes = [0, 1, 2, 3].map(|i| self.read_guest_byte(rip + i));
        if bytes != [Some(0x66), Some(0x0f), Some(0x01), Some(0xcc)] {
            inject_exception(&self.vmcb, 6, None);
            return;
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
        self.advance(4);
        match effect {
            TdcallEffect::Resume => {}
            TdcallEffect::Halt => self.wait_for_interrupt(),
            TdcallEffect::Io {
                port,
                size,
                write,
                value,
            } => {
                if let Some(read) = self.io(port, size, write, value) {
                    regs.r11 = u64::from(read);
                }
            }
            TdcallEffect::Cpuid { leaf, subleaf } => {
                let [a, b, c, d] = cpuid_for_guest(leaf, subleaf);
                (regs.r12, regs.r13, regs.r14, regs.r15) = (a.into(), b.into(), c.into(), d.into());
            }
            TdcallEffect::Rdmsr { msr } => match self.read_msr(msr) {
                Some(value) => regs.r11 = value,
                None => regs.r10 = 0x8000_0000_0000_0000,
            },
            TdcallEffect::Wrmsr { msr, value } => {
                if !self.write_msr(msr, value) {
                    regs.r10 = 0x8000_0000_0000_0000;
                }
            }
            TdcallEffect::Fatal { code } => {
                println!("emulator: the TD reported a fatal error {code:#x}");
                self.fatal("ReportFatalError");
            }
        }
        self.vmcb.write_u64(save::RAX, regs.rax);
        let r = &mut self.registers;
        (r.rcx, r.rdx, r.r8, r.r9, r.r10, r.r11) =
            (regs.rcx, regs.rdx, regs.r8, regs.r9, regs.r10, regs.r11);
        (r.r12, r.r13, r.r14, r.r15) = (regs.r12, regs.r13, regs.r14, regs.r15);
    }

    fn cpuid(&mut self, strict: bool) {
        let leaf = self.vmcb.read_u64(save::RAX) as u32;
        let subleaf = self.registers.rcx as u32;
        // Leaf 0x21 is how a guest finds out it is a TD: answered even in
        // strict mode, before the guest can handle a #VE.
        if strict && leaf != 0x21 {
            self.virtualization_exception(exit_reason::CPUID, 0, 2);
            return;
        }
        let [a, b, c, d] = cpuid_for_guest(leaf, subleaf);
        self.vmcb.write_u64(save::RAX, a.into());
        (self.registers.rbx, self.registers.rcx, self.registers.rdx) =
            (b.into(), c.into(), d.into());
        self.advance(2);
    }

    fn port_io(&mut self, info1: u64, next_rip: u64, strict: bool) {
        let port = (info1 >> 16) as u16;
        let size = if info1 & (1 << 4) != 0 {
            1
        } else if info1 & (1 << 5) != 0 {
            2
        } else {
            4
        };
        let read = info1 & 1 != 0;
        if info1 & (1 << 2) != 0 {
            self.fatal("string port IO is not emulated");
        }
        if strict {
            let qualification =
                u64::from(size - 1) | (u64::from(read) << 3) | (u64::from(port) << 16);
            let length = next_rip.saturating_sub(self.rip()) as u32;
            self.virtualization_exception(exit_reason::IO, qualification, length);
            return;
        }
        let rax = self.vmcb.read_u64(save::RAX);
        if let Some(value) = self.io(port, size, !read, rax as u32) {
            let mask = if size == 4 {
                0xffff_ffff
            } else {
                (1u64 << (size * 8)) - 1
            };
            self.vmcb
                .write_u64(save::RAX, (rax & !mask) | (u64::from(value) & mask));
        }
        self.vmcb.write_u64(save::RIP, next_rip);
    }

    /// Performs a port access for the guest; the result for reads.
    fn io(&self, port: u16, size: u8, write: bool, value: u32) -> Option<u32> {
        if write && port == bare::exit::DEBUG_EXIT_PORT {
            // The TD is done: the counters first, then its verdict.
            super::print_counters();
            bare::exit::qemu_exit(value);
        }
        // SAFETY: the TD owns the emulated machine's devices except the
        // emulator's console, which it shares on purpose (COM1).
        unsafe { super::port_io(port, size, write, value) }
    }

    fn msr(&mut self, write: bool, strict: bool) {
        let msr = self.registers.rcx as u32;
        let apic = super::is_apic_msr(msr);
        if strict && !apic {
            let reason = if write {
                exit_reason::WRMSR
            } else {
                exit_reason::RDMSR
            };
            self.virtualization_exception(reason, 0, 2);
            return;
        }
        if write {
            let value = (self.registers.rdx << 32) | (self.vmcb.read_u64(save::RAX) & 0xffff_ffff);
            if !self.write_msr(msr, value) {
                inject_exception(&self.vmcb, 13, Some(0));
                return;
            }
        } else {
            match self.read_msr(msr) {
                Some(value) => {
                    self.vmcb.write_u64(save::RAX, value & 0xffff_ffff);
                    self.registers.rdx = value >> 32;
                }
                None => {
                    inject_exception(&self.vmcb, 13, Some(0));
                    return;
                }
            }
        }
        self.advance(2);
    }

    fn read_msr(&self, msr: u32) -> Option<u64> {
        super::apic_read(self.index, msr)
    }

    fn write_msr(&self, msr: u32, value: u64) -> bool {
        match super::apic_write(self.index, msr, value) {
            super::ApicWrite::Done => true,
            super::ApicWrite::Refused => false,
            super::ApicWrite::Ipi { targets, vector } => {
                for target in targets.iter() {
                    set_pending(target, vector);
                    td().counters.ipis.fetch_add(1, Ordering::Relaxed);
                    kick(target);
                }
                true
            }
        }
    }

    fn nested_page_fault(&mut self, error: u64, gpa: u64) {
        let write = error & 2 != 0;
        let fetch = error & 16 != 0;
        let effect = td().nested_fault(&mut self.state, gpa, 0, write, fetch);
        if effect == FaultEffect::OutsideMemory {
            println!(
                "emulator: vCPU {}: nested fault at GPA {gpa:#x}, error {error:#x}",
                self.index
            );
        }
        self.inject_fault_effect(effect);
    }

    /// HLT: sleep until an interrupt for this vCPU is pending.
    fn wait_for_interrupt(&self) {
        loop {
            bare::cpu::disable_interrupts();
            if has_pending(self.index)
                || self.vmcb.read_u64(control::VIRTUAL_INTERRUPT) & (1 << 8) != 0
            {
                bare::cpu::enable_interrupts();
                return;
            }
            // A kick that arrives after the check ends the HLT.
            bare::cpu::enable_interrupts_and_halt();
        }
    }
}

/// The guest's page tables, read through TD memory.
struct GuestTables(&'static TdMemory);

impl pagetable::TableMemory for GuestTables {
    fn load(&self, table: PhysAddr, index: usize) -> u64 {
        match self.0.host_address(table.0 + (index as u64 & 511) * 8) {
            // SAFETY: TD memory, identity-mapped; entries are 8-byte aligned.
            Some(hpa) => unsafe { core::ptr::read_volatile(hpa as *const u64) },
            None => 0,
        }
    }
    // The emulator never writes the guest's tables.
    fn compare_exchange(
        &self,
        _table: PhysAddr,
        _index: usize,
        current: u64,
        _new: u64,
    ) -> Result<u64, u64> {
        Err(current)
    }
    fn store_unpublished(&self, _table: PhysAddr, _index: usize, _value: u64) {}
}

/// CPUID as the TD sees it.
pub fn cpuid_for_guest(leaf: u32, subleaf: u32) -> [u32; 4] {
    if leaf == 0x21 && subleaf == 0 {
        // "IntelTDX    " in EBX, EDX, ECX.
        return [
            0,
            u32::from_le_bytes(*b"Inte"),
            u32::from_le_bytes(*b"    "),
            u32::from_le_bytes(*b"lTDX"),
        ];
    }
    let result = bare::cpu::cpuid(leaf, subleaf);
    let mut values = [result.eax, result.ebx, result.ecx, result.edx];
    match leaf {
        // x2APIC (ECX bit 21) is what a TD has; the initial APIC ID is ours.
        1 => {
            values[2] |= 1 << 21;
            values[1] = (values[1] & 0x00ff_ffff) | ((bare::smp::cpu_index() as u32) << 24);
        }
        // No SVM inside the TD.
        0x8000_0001 => values[2] &= !(1 << 2),
        _ => {}
    }
    values
}
