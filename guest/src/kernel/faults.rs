//! Exception handlers. A kernel page fault is fixed up only through the
//! exception table (load_unaligned_zeropad); anything else unexpected is
//! fatal, with a report naming the address, RIP and error code.

use bare::idt::{self, vector, Frame};
use core::sync::atomic::{AtomicU64, Ordering};

/// Faults that were neither expected nor fixed up (each is fatal; counted so
/// the report can say so).
pub static UNEXPECTED_FAULTS: AtomicU64 = AtomicU64::new(0);

pub fn install() {
    idt::set_default_handler(unexpected);
    idt::set_handler(vector::PAGE_FAULT, page_fault);
    idt::set_handler(vector::VIRTUALIZATION, virtualization_exception);
    idt::set_handler(vector::GENERAL_PROTECTION, unexpected);
    idt::set_handler(vector::INVALID_OPCODE, unexpected);
    idt::set_handler(vector::NMI, unexpected);
    idt::set_handler(vector::DOUBLE_FAULT, unexpected);
}

fn page_fault(frame: &mut Frame) {
    let address = bare::cpu::read_cr2();
    if bare::extable::fixup_page_fault(frame, address) {
        return;
    }
    fatal("page fault", frame, Some(address));
}

fn virtualization_exception(frame: &mut Frame) {
    // No platform of this kernel raises #VE yet (the TDX one will read
    // TDG.VP.VEINFO.GET first); one now means a conversion went wrong.
    fatal("#VE", frame, None);
}

fn unexpected(frame: &mut Frame) {
    let name = match frame.vector as u8 {
        vector::DIVIDE => "#DE",
        vector::NMI => "NMI",
        vector::INVALID_OPCODE => "#UD",
        vector::DOUBLE_FAULT => "#DF",
        vector::GENERAL_PROTECTION => "#GP",
        _ => "unexpected interrupt",
    };
    fatal(name, frame, None);
}

fn fatal(what: &str, frame: &Frame, address: Option<u64>) -> ! {
    UNEXPECTED_FAULTS.fetch_add(1, Ordering::SeqCst);
    let p = bare::serial::print_unlocked;
    p(format_args!(
        "\nFATAL: kernel {what} (vector {})",
        frame.vector
    ));
    if let Some(address) = address {
        p(format_args!(" at address {address:#x}"));
    }
    p(format_args!(
        ", RIP {:#x}, error code {:#x}, CPU {}\n",
        frame.rip,
        frame.error_code,
        super::cpu_index()
    ));
    p(format_args!(
        "  rax {:#x} rbx {:#x} rcx {:#x} rdx {:#x} rsi {:#x} rdi {:#x}\n  rbp {:#x} rsp {:#x} rflags {:#x} cs {:#x} ss {:#x}\n",
        frame.rax, frame.rbx, frame.rcx, frame.rdx, frame.rsi, frame.rdi, frame.rbp, frame.rsp, frame.rflags, frame.cs, frame.ss
    ));
    bare::exit::qemu_exit(bare::exit::EXIT_FAILURE)
}
