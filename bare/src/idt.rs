//! The IDT. Every vector enters through a stub that pushes a [`Frame`] with
//! all general-purpose registers; the handler gets it `&mut` and whatever it
//! writes (RIP, RAX, ...) is what the interrupted code resumes with. That is
//! how exception-table fixups work.

use crate::gdt::{IST_DOUBLE_FAULT, IST_NMI, KERNEL_CODE};
use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicUsize, Ordering};

/// Vector numbers.
pub mod vector {
    /// #DE
    pub const DIVIDE: u8 = 0;
    /// NMI
    pub const NMI: u8 = 2;
    /// #UD
    pub const INVALID_OPCODE: u8 = 6;
    /// #DF
    pub const DOUBLE_FAULT: u8 = 8;
    /// #GP
    pub const GENERAL_PROTECTION: u8 = 13;
    /// #PF
    pub const PAGE_FAULT: u8 = 14;
    /// #VE
    pub const VIRTUALIZATION: u8 = 20;
}

/// The interrupted context, as the entry stub saved it. Field order is the
/// stack layout: registers pushed by the stub, then vector and error code,
/// then what the CPU pushed.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Frame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    /// The vector.
    pub vector: u64,
    /// The CPU's error code (0 for vectors without one).
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

/// A handler. It may edit the frame; returning resumes the frame.
pub type Handler = fn(&mut Frame);

const NO_HANDLER: usize = 0;
static HANDLERS: [AtomicUsize; 256] = [const { AtomicUsize::new(NO_HANDLER) }; 256];
static DEFAULT: AtomicUsize = AtomicUsize::new(NO_HANDLER);

/// Installs `handler` for `vector` (replacing any earlier one).
pub fn set_handler(vector: u8, handler: Handler) {
    HANDLERS[usize::from(vector)].store(handler as usize, Ordering::Release);
}

/// Installs the handler for vectors that have none.
pub fn set_default_handler(handler: Handler) {
    DEFAULT.store(handler as usize, Ordering::Release);
}

fn handler_for(vector: usize) -> Option<Handler> {
    let raw = match HANDLERS.get(vector).map(|h| h.load(Ordering::Acquire)) {
        Some(NO_HANDLER) | None => DEFAULT.load(Ordering::Acquire),
        Some(raw) => raw,
    };
    if raw == NO_HANDLER {
        return None;
    }
    // SAFETY: the only non-zero values ever stored are `Handler` function
    // pointers converted with `as usize` in `set_handler`/`set_default_handler`.
    Some(unsafe { core::mem::transmute::<usize, Handler>(raw) })
}

#[no_mangle]
extern "C" fn bare_interrupt_dispatch(frame: &mut Frame) {
    match handler_for(frame.vector as usize) {
        Some(handler) => handler(frame),
        None => {
            crate::serial::print_unlocked(format_args!(
                "\nFATAL: unhandled vector {} error {:#x} at RIP {:#x}\n",
                frame.vector, frame.error_code, frame.rip
            ));
            crate::exit::qemu_exit(crate::exit::EXIT_FAILURE);
        }
    }
}

// 256 stubs of 16 bytes each. Vectors with a CPU error code do not push a
// dummy one. AT&T syntax for `.rept` with an immediate counter.
global_asm!(
    r#"
    .pushsection .text.interrupts, "ax"
    .balign 16
    .global bare_interrupt_stubs
bare_interrupt_stubs:
    .set vec, 0
    .rept 256
    .balign 16
    .if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    .else
    pushq $0
    .endif
    pushq $vec
    jmp bare_interrupt_common
    .set vec, vec + 1
    .endr

bare_interrupt_common:
    cld
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, %rdi
    call bare_interrupt_dispatch
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rbp
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rbx
    popq %rax
    addq $16, %rsp
    iretq
    .popsection
"#,
    options(att_syntax)
);

extern "C" {
    static bare_interrupt_stubs: u8;
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    attributes: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

#[repr(C, align(16))]
struct Table([Gate; 256]);

static IDT: spin::Once<Table> = spin::Once::new();

#[repr(C, packed(2))]
struct Pointer {
    limit: u16,
    base: u64,
}

fn build() -> Table {
    let stubs = core::ptr::addr_of!(bare_interrupt_stubs) as u64;
    let mut table = Table(
        [Gate {
            offset_low: 0,
            selector: 0,
            ist: 0,
            attributes: 0,
            offset_mid: 0,
            offset_high: 0,
            reserved: 0,
        }; 256],
    );
    for (vector, gate) in table.0.iter_mut().enumerate() {
        let target = stubs + vector as u64 * 16;
        let ist = match vector as u8 {
            vector::DOUBLE_FAULT => IST_DOUBLE_FAULT,
            vector::NMI => IST_NMI,
            _ => 0,
        };
        *gate = Gate {
            offset_low: target as u16,
            selector: KERNEL_CODE,
            ist,
            attributes: 0x8e, // present, DPL 0, 64-bit interrupt gate
            offset_mid: (target >> 16) as u16,
            offset_high: (target >> 32) as u32,
            reserved: 0,
        };
    }
    table
}

/// Loads the (shared) IDT on this CPU. The CPU's TSS must provide IST1/IST2.
pub fn load() {
    let table = IDT.call_once(build);
    let pointer = Pointer {
        limit: (core::mem::size_of::<Table>() - 1) as u16,
        base: table as *const Table as u64,
    };
    // SAFETY: the IDT is 'static (in a Once) and every gate points at a stub
    // in this module, which saves and restores the full context.
    unsafe { asm!("lidt [{}]", in(reg) &pointer, options(readonly, nostack, preserves_flags)) }
}
