//! Exception handlers. A kernel page fault is fixed up only through the
//! exception table (load_unaligned_zeropad); anything else unexpected is
//! fatal, with a report naming the address, RIP and error code.
//!
//! In a TD, #VE (vector 20) also comes here. Its handler reads the event
//! with TDG.VP.VEINFO.GET before anything else (a #VE before that call
//! becomes a #DF), then does port I/O, CPUID, RDMSR/WRMSR and HLT through
//! TDVMCALLs (`tdx_hypercall::ve`). An EPT-violation #VE means an access met
//! a page in the other state (shared bit disagreeing, or a pending page):
//! with the non-present window that never happens, so each one is a bug. It
//! is counted ([`EPT_VIOLATION_VE`], which the stress reports) and fatal at
//! once, never fixed up: the page's state is then unknown, and on real TDX a
//! private access to a shared page ends the TD anyway. So the legacy-order
//! negative control ends at its first #VE, which the emulator counts.
//!
//! One exception, still counted: an EPT-violation #VE on a private GPA. The
//! TDX module raises it only for a pending page and only while SEPT #VE is
//! enabled (TD ATTRIBUTES without SEPT_VE_DISABLE): a page this kernel
//! accepted and the VMM then took away. Its contents are gone, and
//! accepting it again would hide that behind a page of zeros, so it is
//! recorded ([`LOST_PAGES`], [`LAST_LOST_GPA`]) for its owner to retire
//! (`Converter::retire`), and a load that may fault (load_unaligned_zeropad)
//! ends as it would at an unmapped page. Any other access to it is fatal.

use bare::idt::{self, vector, Frame};
use core::fmt;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use set_memory_enc::Platform;
use tdx_hypercall::ve::{emulate_instruction, VeError, VeRegs};
use tdx_hypercall::{veinfo_get, VeInfo};

/// Faults that were neither expected nor fixed up (each is fatal; counted so
/// the report can say so).
pub static UNEXPECTED_FAULTS: AtomicU64 = AtomicU64::new(0);
/// EPT-violation #VEs taken, all CPUs (each is fatal: at most one per run,
/// unless CPUs take them at the same time).
pub static EPT_VIOLATION_VE: AtomicU64 = AtomicU64::new(0);
/// Private pages found taken away by the VMM, all CPUs (each an
/// EPT-violation #VE on a private GPA), and the GPA of the last one.
pub static LOST_PAGES: AtomicU64 = AtomicU64::new(0);
pub static LAST_LOST_GPA: AtomicU64 = AtomicU64::new(0);
/// Every #VE taken, all CPUs and exit reasons (the stress reports how many
/// arrived while it ran: in a TD it must be none).
pub static VE_TAKEN: AtomicU64 = AtomicU64::new(0);
/// The CPU reporting a fatal error ([`NO_CPU`]: none yet).
static REPORTING_CPU: AtomicUsize = AtomicUsize::new(NO_CPU);
const NO_CPU: usize = usize::MAX;

pub fn install() {
    idt::set_default_handler(unexpected);
    idt::set_handler(vector::PAGE_FAULT, page_fault);
    idt::set_handler(vector::VIRTUALIZATION, virtualization_exception);
    idt::set_handler(vector::GENERAL_PROTECTION, unexpected);
    idt::set_handler(vector::INVALID_OPCODE, invalid_opcode);
    idt::set_handler(vector::NMI, unexpected);
    idt::set_handler(vector::DOUBLE_FAULT, double_fault);
    idt::set_handler(VMM_COMMUNICATION, super::snp::handle_vc);
}

/// #VC, vector 29: only an SEV-ES/SNP guest takes it.
const VMM_COMMUNICATION: u8 = 29;

/// A #VC the handler cannot resolve: fatal, with `why`.
pub fn fatal_vc(frame: &Frame, why: &str) -> ! {
    fatal("#VC", frame, None, Some(format_args!("{why}")))
}

/// #DF. In a TD a #DF can be a second #VE that came before VEINFO.GET
/// (the TDX module escalates it): the #VE info is then still latched, and
/// any port IO the report makes would be a #VE escalated to #DF again, a
/// loop that ends in a triple fault with nothing reported. So read the info
/// first (which frees the latch), then report, naming it.
fn double_fault(frame: &mut Frame) {
    let Some(tdcall) = super::td::tdcall() else {
        fatal("#DF", frame, None, None);
    };
    match veinfo_get(tdcall) {
        Ok(ve) => fatal(
            "#DF",
            frame,
            None,
            Some(format_args!(
                "a #VE before VEINFO.GET: latched exit reason {}, qualification {:#x}, GPA {:#x}",
                ve.exit_reason, ve.exit_qualification, ve.guest_physical_address
            )),
        ),
        Err(e) => fatal(
            "#DF",
            frame,
            None,
            Some(format_args!("no #VE info latched ({e})")),
        ),
    }
}

fn page_fault(frame: &mut Frame) {
    let address = bare::cpu::read_cr2();
    if bare::extable::fixup_page_fault(frame, address) {
        return;
    }
    fatal("page fault", frame, Some(address), None);
}

fn virtualization_exception(frame: &mut Frame) {
    // Outside a TD nothing raises #VE: one means something is badly wrong.
    let Some(tdcall) = super::td::tdcall() else {
        fatal("#VE", frame, None, None);
    };
    // First: only after this may the handler raise another #VE.
    let ve = match veinfo_get(tdcall) {
        Ok(ve) => ve,
        Err(e) => fatal(
            "#VE",
            frame,
            None,
            Some(format_args!("TDG.VP.VEINFO.GET failed: {e}")),
        ),
    };
    VE_TAKEN.fetch_add(1, Ordering::Relaxed);
    let mut regs = VeRegs {
        rax: frame.rax,
        rbx: frame.rbx,
        rcx: frame.rcx,
        rdx: frame.rdx,
        rip: frame.rip,
        rflags: frame.rflags,
    };
    match emulate_instruction(tdcall, &ve, &mut regs) {
        Ok(_) => {
            frame.rax = regs.rax;
            frame.rbx = regs.rbx;
            frame.rcx = regs.rcx;
            frame.rdx = regs.rdx;
            frame.rip = regs.rip;
        }
        Err(VeError::EptViolation) => ept_violation(frame, &ve),
        Err(e) => fatal(
            "#VE",
            frame,
            None,
            Some(format_args!(
                "{e}: exit reason {}, qualification {:#x}, instruction length {}",
                ve.exit_reason, ve.exit_qualification, ve.instruction_length
            )),
        ),
    }
}

fn ept_violation(frame: &mut Frame, ve: &VeInfo) {
    EPT_VIOLATION_VE.fetch_add(1, Ordering::SeqCst);
    let gpa = ve.guest_physical_address;
    let cc = super::engine::try_engine().map(|e| e.platform().cc_mask());
    if cc.is_some_and(|cc| cc.shared_bits() != 0 && gpa & cc.shared_bits() == 0) {
        LAST_LOST_GPA.store(gpa & !(coco_pagetable::PAGE_SIZE - 1), Ordering::SeqCst);
        LOST_PAGES.fetch_add(1, Ordering::SeqCst);
        // The GLA of a load that crossed into the page is the page's start.
        if bare::extable::fixup_page_fault(frame, ve.guest_linear_address) {
            return;
        }
        fatal(
            "EPT-violation #VE",
            frame,
            None,
            Some(format_args!(
                "private GPA {gpa:#x} (linear {:#x}) is pending: the VMM took a page this kernel \
                 had accepted, and its contents are lost",
                ve.guest_linear_address
            )),
        );
    }
    fatal(
        "EPT-violation #VE",
        frame,
        None,
        Some(format_args!(
            "GPA {:#x} (linear {:#x}), exit qualification {:#x}: an access met a page in the \
             other state (shared bit disagreeing, or not accepted)",
            ve.guest_physical_address, ve.guest_linear_address, ve.exit_qualification
        )),
    );
}

// One `ud2` at a known address (what BUG()/WARN() execute), for the test
// that a #UD reaches the guest: in a TD the emulator sees every #UD first
// (TDCALL arrives as one) and must reflect the others.
core::arch::global_asm!(
    ".pushsection .text.test_ud2, \"ax\"",
    ".global guest_test_ud2",
    "guest_test_ud2:",
    "ud2",
    "ret",
    ".popsection",
);

extern "C" {
    fn guest_test_ud2();
}

/// #UDs taken at `guest_test_ud2` and stepped over.
pub static TEST_UD_TAKEN: AtomicU64 = AtomicU64::new(0);

/// Executes the test `ud2`; its handler steps over it.
pub fn execute_test_ud2() {
    // SAFETY: `guest_test_ud2` is `ud2; ret`: the #UD handler below moves
    // RIP past the ud2 (2 bytes), and the `ret` returns here. It touches no
    // memory but the return address the call pushed.
    unsafe { guest_test_ud2() }
}

fn invalid_opcode(frame: &mut Frame) {
    if frame.rip == guest_test_ud2 as *const () as u64 {
        TEST_UD_TAKEN.fetch_add(1, Ordering::SeqCst);
        frame.rip += 2;
        return;
    }
    unexpected(frame);
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
    fatal(name, frame, None, None);
}

fn fatal(what: &str, frame: &Frame, address: Option<u64>, detail: Option<fmt::Arguments<'_>>) -> ! {
    UNEXPECTED_FAULTS.fetch_add(1, Ordering::SeqCst);
    // One report: a CPU failing while another reports (several loaders can
    // take the same #VE at once) stops quietly instead of interleaving its
    // lines. The reporter itself may fail again while reporting, and then
    // says so too.
    let me = super::cpu_index();
    if let Err(reporter) =
        REPORTING_CPU.compare_exchange(NO_CPU, me, Ordering::SeqCst, Ordering::SeqCst)
    {
        if reporter != me {
            bare::cpu::halt_forever();
        }
    }
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
        frame.rip, frame.error_code, me
    ));
    if let Some(detail) = detail {
        p(format_args!("  {detail}\n"));
    }
    p(format_args!(
        "  rax {:#x} rbx {:#x} rcx {:#x} rdx {:#x} rsi {:#x} rdi {:#x}\n  rbp {:#x} rsp {:#x} rflags {:#x} cs {:#x} ss {:#x}\n",
        frame.rax, frame.rbx, frame.rcx, frame.rdx, frame.rsi, frame.rdi, frame.rbp, frame.rsp, frame.rflags, frame.cs, frame.ss
    ));
    super::td::report_fatal(super::td::fatal_code::EXCEPTION);
    bare::exit::qemu_exit(bare::exit::EXIT_FAILURE)
}
