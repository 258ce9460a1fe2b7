//! The exception table: for each instruction allowed to fault, where to resume
//! and how. It lives in the `__ex_table` section, which the linker script
//! brackets with `__start_ex_table` / `__stop_ex_table`.
//!
//! `load_unaligned_zeropad()` is the one user so far: an 8-byte load that may
//! run off the end of a mapped page into one that is not present (being
//! converted, or unmapped). Its fixup returns the bytes that are readable and
//! zeros for the rest, exactly as Linux's `ex_handler_zeropad()` does.

use crate::idt::Frame;
use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};

/// How a faulting instruction is fixed up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum FixupKind {
    /// `load_unaligned_zeropad`: address in RDI, result in RAX.
    Zeropad = 1,
}

/// One entry, as emitted by the `.pushsection __ex_table` blocks.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Entry {
    /// Address of the instruction that may fault.
    pub instruction: u64,
    /// Where to resume after the fixup.
    pub resume: u64,
    /// A [`FixupKind`] value.
    pub kind: u64,
}

extern "C" {
    static __start_ex_table: Entry;
    static __stop_ex_table: Entry;
}

/// Every entry of the table.
pub fn entries() -> &'static [Entry] {
    let start = core::ptr::addr_of!(__start_ex_table);
    let stop = core::ptr::addr_of!(__stop_ex_table);
    let count = (stop as usize - start as usize) / core::mem::size_of::<Entry>();
    // SAFETY: the linker script places the symbols around the __ex_table
    // section, which holds only `Entry` records (emitted below), is read-only
    // and lives for the whole run.
    unsafe { core::slice::from_raw_parts(start, count) }
}

/// The entry for the instruction at `rip`, if any.
pub fn search(rip: u64) -> Option<&'static Entry> {
    entries().iter().find(|e| e.instruction == rip)
}

/// Zeropad fixups applied so far, all CPUs.
pub static ZEROPAD_FIXUPS: AtomicU64 = AtomicU64::new(0);

/// Tries to fix up a page fault at `fault_address` taken in `frame`.
/// Returns false when no entry applies: the fault is then a bug.
pub fn fixup_page_fault(frame: &mut Frame, fault_address: u64) -> bool {
    let Some(entry) = search(frame.rip) else {
        return false;
    };
    if entry.kind != FixupKind::Zeropad as u64 {
        return false;
    }
    let address = frame.rdi;
    let offset = address & 7;
    let aligned = address & !7;
    // Only the fault the design allows: the load ran into the next word,
    // which starts the next page. Anything else is a real bug.
    if aligned.checked_add(8) != Some(fault_address) {
        return false;
    }
    // SAFETY: `aligned` is the 8-byte word holding the first byte of the
    // load; that byte was readable (the fault is at the next word), and a
    // word never crosses a page, so the whole word is mapped.
    let word = unsafe { core::ptr::read_volatile(aligned as *const u64) };
    frame.rax = word >> (offset * 8);
    frame.rip = entry.resume;
    ZEROPAD_FIXUPS.fetch_add(1, Ordering::Relaxed);
    true
}

/// Loads 8 bytes from `address`, which may be unaligned and may run into an
/// unmapped or non-present next page: the bytes beyond the boundary then read
/// as zero. The bytes before the boundary must be mapped.
///
/// # Safety
/// The first byte at `address` must be readable; the load may race with any
/// change to the following page (that is its purpose).
pub unsafe fn load_unaligned_zeropad(address: *const u8) -> u64 {
    let value: u64;
    // SAFETY: the first byte is readable (caller); if the rest is not, the
    // #PF handler applies the Zeropad fixup registered here, which expects
    // the address in RDI and writes the result to RAX.
    unsafe {
        asm!(
            "2: mov rax, qword ptr [rdi]",
            "3:",
            ".pushsection __ex_table, \"a\"",
            ".balign 8",
            ".quad 2b, 3b, {kind}",
            ".popsection",
            in("rdi") address,
            out("rax") value,
            kind = const FixupKind::Zeropad as u64,
            options(readonly, nostack, preserves_flags),
        );
    }
    value
}
