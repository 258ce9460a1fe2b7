//! AMD SVM: the VMCB, enabling SVM on a CPU, and the world switch.
//!
//! Field offsets are from the AMD64 APM vol. 2, appendix B. Everything here
//! runs on the boot identity map, so a VMCB's physical address is also its
//! address.

use core::arch::{asm, global_asm};
use core::sync::atomic::{fence, Ordering};

/// Control-area offsets.
pub mod control {
    /// CR reads (bits 15:0) and writes (bits 31:16).
    pub const INTERCEPT_CR: usize = 0x000;
    pub const INTERCEPT_EXCEPTIONS: usize = 0x008;
    pub const INTERCEPT_MISC1: usize = 0x00c;
    pub const INTERCEPT_MISC2: usize = 0x010;
    pub const IOPM_BASE: usize = 0x040;
    pub const MSRPM_BASE: usize = 0x048;
    pub const ASID: usize = 0x058;
    pub const TLB_CONTROL: usize = 0x05c;
    pub const VIRTUAL_INTERRUPT: usize = 0x060;
    /// Bit 0: the guest is in an interrupt shadow (after STI or MOV SS).
    pub const INTERRUPT_SHADOW: usize = 0x068;
    pub const EXIT_CODE: usize = 0x070;
    pub const EXIT_INFO1: usize = 0x078;
    pub const EXIT_INFO2: usize = 0x080;
    pub const EXIT_INT_INFO: usize = 0x088;
    pub const NESTED_CONTROL: usize = 0x090;
    pub const EVENT_INJECTION: usize = 0x0a8;
    pub const NESTED_CR3: usize = 0x0b0;
}

/// State-save-area offsets.
pub mod save {
    pub const ES: usize = 0x400;
    pub const CS: usize = 0x410;
    pub const SS: usize = 0x420;
    pub const DS: usize = 0x430;
    pub const FS: usize = 0x440;
    pub const GS: usize = 0x450;
    pub const GDTR: usize = 0x460;
    pub const LDTR: usize = 0x470;
    pub const IDTR: usize = 0x480;
    pub const TR: usize = 0x490;
    pub const CPL: usize = 0x4cb;
    pub const EFER: usize = 0x4d0;
    pub const CR4: usize = 0x548;
    pub const CR3: usize = 0x550;
    pub const CR0: usize = 0x558;
    pub const DR7: usize = 0x560;
    pub const DR6: usize = 0x568;
    pub const RFLAGS: usize = 0x570;
    pub const RIP: usize = 0x578;
    pub const RSP: usize = 0x5d8;
    pub const RAX: usize = 0x5f8;
    pub const CR2: usize = 0x640;
    pub const G_PAT: usize = 0x668;
}

/// Exit codes used here.
pub mod exit {
    pub const CR0_WRITE: u64 = 0x10;
    pub const CR4_WRITE: u64 = 0x14;
    pub const EXCEPTION_UD: u64 = 0x46;
    pub const INTR: u64 = 0x60;
    pub const NMI: u64 = 0x61;
    pub const VINTR: u64 = 0x64;
    pub const CPUID: u64 = 0x72;
    pub const INVD: u64 = 0x76;
    pub const HLT: u64 = 0x78;
    pub const IOIO: u64 = 0x7b;
    pub const MSR: u64 = 0x7c;
    pub const SHUTDOWN: u64 = 0x7f;
    pub const VMMCALL: u64 = 0x81;
    pub const WBINVD: u64 = 0x89;
    pub const NPF: u64 = 0x400;
    pub const INVALID: u64 = u64::MAX;
}

/// Intercept bits.
pub mod intercept {
    /// In INTERCEPT_CR.
    pub const CR0_WRITE: u32 = 1 << 16;
    pub const CR4_WRITE: u32 = 1 << 20;
    pub const INTR: u32 = 1 << 0;
    pub const NMI: u32 = 1 << 1;
    pub const CPUID: u32 = 1 << 18;
    pub const INVD: u32 = 1 << 22;
    pub const HLT: u32 = 1 << 24;
    pub const IOIO: u32 = 1 << 27;
    pub const MSR: u32 = 1 << 28;
    pub const SHUTDOWN: u32 = 1 << 31;
    /// In MISC2.
    pub const VMRUN: u32 = 1 << 0;
    /// In MISC2 (VMGEXIT arrives as VMMCALL under TCG).
    pub const VMMCALL: u32 = 1 << 1;
    /// In MISC2.
    pub const WBINVD: u32 = 1 << 9;
    /// In the exception vector.
    pub const UD: u32 = 1 << 6;
}

/// A segment as the VMCB stores it.
#[derive(Clone, Copy)]
pub struct Segment {
    pub selector: u16,
    /// Packed attributes: type, S, DPL, P (bits 0-7), AVL, L, D/B, G (8-11).
    pub attributes: u16,
    pub limit: u32,
    pub base: u64,
}

/// One VMCB page (4K aligned, owned by one vCPU).
pub struct Vmcb {
    address: u64,
}

impl Vmcb {
    /// # Safety
    /// `address` is a zeroed, 4K-aligned, identity-mapped page that only
    /// this `Vmcb` uses.
    pub unsafe fn new(address: u64) -> Vmcb {
        Vmcb { address }
    }

    pub fn address(&self) -> u64 {
        self.address
    }

    fn field<T>(&self, offset: usize) -> *mut T {
        debug_assert!(offset + core::mem::size_of::<T>() <= 4096);
        (self.address + offset as u64) as *mut T
    }

    pub fn read_u64(&self, offset: usize) -> u64 {
        // SAFETY: the VMCB page is ours (`new`), identity-mapped, and the
        // offset lies inside it; the CPU writes it only during VMRUN, which
        // this thread is not in while it reads.
        unsafe { core::ptr::read_volatile(self.field::<u64>(offset)) }
    }

    pub fn write_u64(&self, offset: usize, value: u64) {
        // SAFETY: as read_u64.
        unsafe { core::ptr::write_volatile(self.field::<u64>(offset), value) }
    }

    pub fn read_u32(&self, offset: usize) -> u32 {
        // SAFETY: as read_u64.
        unsafe { core::ptr::read_volatile(self.field::<u32>(offset)) }
    }

    pub fn read_u8(&self, offset: usize) -> u8 {
        // SAFETY: as read_u64.
        unsafe { core::ptr::read_volatile(self.field::<u8>(offset)) }
    }

    pub fn read_u16(&self, offset: usize) -> u16 {
        // SAFETY: as read_u64.
        unsafe { core::ptr::read_volatile(self.field::<u16>(offset)) }
    }

    pub fn write_u32(&self, offset: usize, value: u32) {
        // SAFETY: as read_u64.
        unsafe { core::ptr::write_volatile(self.field::<u32>(offset), value) }
    }

    pub fn write_u8(&self, offset: usize, value: u8) {
        // SAFETY: as read_u64.
        unsafe { core::ptr::write_volatile(self.field::<u8>(offset), value) }
    }

    pub fn set_segment(&self, offset: usize, segment: Segment) {
        // SAFETY: as read_u64; a segment is 16 bytes at `offset`.
        unsafe {
            core::ptr::write_volatile(self.field::<u16>(offset), segment.selector);
            core::ptr::write_volatile(self.field::<u16>(offset + 2), segment.attributes);
            core::ptr::write_volatile(self.field::<u32>(offset + 4), segment.limit);
            core::ptr::write_volatile(self.field::<u64>(offset + 8), segment.base);
        }
    }

    pub fn segment_base(&self, offset: usize) -> u64 {
        self.read_u64(offset + 8)
    }
}

/// The guest's general-purpose registers that VMRUN does not switch (RAX,
/// RSP and RIP live in the VMCB). Field order is fixed: the asm uses it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GuestRegisters {
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
}

const MSR_EFER: u32 = 0xc000_0080;
const MSR_VM_HSAVE_PA: u32 = 0xc001_0117;
const EFER_SVME: u64 = 1 << 12;

/// Whether the CPU has SVM with nested paging.
pub fn supported() -> bool {
    let extended = bare::cpu::cpuid(0x8000_0001, 0);
    let svm = extended.ecx & (1 << 2) != 0;
    svm && bare::cpu::cpuid(0x8000_000a, 0).edx & 1 != 0
}

/// Enables SVM on this CPU with `host_save_area` (a zeroed 4K page) as its
/// VM_HSAVE area.
pub fn enable(host_save_area: u64) {
    // SAFETY: EFER and VM_HSAVE_PA exist on SVM CPUs (checked by the caller
    // with `supported`); setting SVME only allows the SVM instructions, and
    // the save area is a page reserved for this CPU.
    unsafe {
        let efer = bare::cpu::rdmsr(MSR_EFER);
        bare::cpu::wrmsr(MSR_EFER, efer | EFER_SVME);
        bare::cpu::wrmsr(MSR_VM_HSAVE_PA, host_save_area);
    }
}

global_asm!(
    r#"
    .pushsection .text.svm, "ax"
    .global emulator_svm_run
    /* emulator_svm_run(registers: *mut GuestRegisters, guest_vmcb: u64, host_vmcb: u64) */
emulator_svm_run:
    push rbx
    push rbp
    push r12
    push r13
    push r14
    push r15
    push rdi                      /* [rsp + 16]: registers */
    push rdx                      /* [rsp + 8]: host VMCB */
    push rsi                      /* [rsp + 0]: guest VMCB */
    mov rax, rdx
    vmsave rax                    /* host FS, GS, TR, LDTR, KernelGsBase, ... */
    mov rax, [rsp]
    vmload rax                    /* the guest's */
    mov rbx, [rdi + 0x00]
    mov rcx, [rdi + 0x08]
    mov rdx, [rdi + 0x10]
    mov rsi, [rdi + 0x18]
    mov rbp, [rdi + 0x28]
    mov r8,  [rdi + 0x30]
    mov r9,  [rdi + 0x38]
    mov r10, [rdi + 0x40]
    mov r11, [rdi + 0x48]
    mov r12, [rdi + 0x50]
    mov r13, [rdi + 0x58]
    mov r14, [rdi + 0x60]
    mov r15, [rdi + 0x68]
    mov rdi, [rdi + 0x20]
    vmrun rax
    /* #VMEXIT: RSP and RAX are the host's again (RAX = guest VMCB). */
    push rdi
    mov rdi, [rsp + 24]
    mov [rdi + 0x00], rbx
    mov [rdi + 0x08], rcx
    mov [rdi + 0x10], rdx
    mov [rdi + 0x18], rsi
    pop rax
    mov [rdi + 0x20], rax
    mov [rdi + 0x28], rbp
    mov [rdi + 0x30], r8
    mov [rdi + 0x38], r9
    mov [rdi + 0x40], r10
    mov [rdi + 0x48], r11
    mov [rdi + 0x50], r12
    mov [rdi + 0x58], r13
    mov [rdi + 0x60], r14
    mov [rdi + 0x68], r15
    mov rax, [rsp]
    vmsave rax
    mov rax, [rsp + 8]
    vmload rax
    stgi                          /* a pending host interrupt is taken here */
    add rsp, 24
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbp
    pop rbx
    ret
    .popsection
"#
);

/// Holds off host interrupts (CLGI) until the next #VMEXIT. A vCPU calls
/// this before its last look at pending events: a kick sent after that look
/// stays pending in the local APIC and forces an INTR exit right after
/// VMRUN, instead of being taken in the emulator and lost.
pub fn hold_interrupts_until_exit() {
    // SAFETY: EFER.SVME is set on every CPU that runs vCPUs (`enable`);
    // CLGI touches no memory, and `run`'s STGI after the exit undoes it.
    unsafe { asm!("clgi", options(nostack, preserves_flags)) };
}

extern "C" {
    fn emulator_svm_run(registers: *mut GuestRegisters, guest_vmcb: u64, host_vmcb: u64);
}

/// Runs the guest until the next #VMEXIT.
///
/// # Safety
/// SVM is enabled on this CPU; `guest` holds a consistent guest state and
/// nested tables that map only TD memory; `host_vmcb` is this CPU's VMSAVE
/// area (a zeroed page); interrupts are enabled and GIF is clear
/// (`hold_interrupts_until_exit`): host interrupts that arrive before or
/// during the guest end it with an INTR exit and are taken after it.
pub unsafe fn run(guest: &Vmcb, registers: &mut GuestRegisters, host_vmcb: u64) {
    fence(Ordering::SeqCst);
    // SAFETY: the caller guarantees SVM is on and the state is consistent;
    // the asm saves and restores every callee-saved register and the host's
    // VMSAVE state, and the guest cannot reach host memory through the
    // nested tables.
    unsafe { emulator_svm_run(registers, guest.address(), host_vmcb) };
    fence(Ordering::SeqCst);
}
