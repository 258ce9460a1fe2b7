//! Single-instruction wrappers. Each is `unsafe` where executing it can break
//! memory safety (CR3, port I/O to arbitrary devices, MSRs), safe otherwise.

use core::arch::asm;

/// Writes a byte to an I/O port.
///
/// # Safety
/// The port must belong to a device whose side effects the caller owns.
pub unsafe fn outb(port: u16, value: u8) {
    // SAFETY: the caller owns the device behind `port`.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

/// Writes a u16 to an I/O port.
///
/// # Safety
/// As [`outb`].
pub unsafe fn outw(port: u16, value: u16) {
    // SAFETY: the caller owns the device behind `port`.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack, preserves_flags))
    }
}

/// Writes a u32 to an I/O port.
///
/// # Safety
/// As [`outb`].
pub unsafe fn outl(port: u16, value: u32) {
    // SAFETY: the caller owns the device behind `port`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a byte from an I/O port.
///
/// # Safety
/// As [`outb`]: reads can have side effects.
pub unsafe fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: the caller owns the device behind `port`.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    }
    value
}

/// CR2: the linear address of the last page fault.
pub fn read_cr2() -> u64 {
    let value: u64;
    // SAFETY: reading CR2 has no side effect; we run at CPL 0.
    unsafe { asm!("mov {}, cr2", out(reg) value, options(nomem, nostack, preserves_flags)) }
    value
}

/// CR3.
pub fn read_cr3() -> u64 {
    let value: u64;
    // SAFETY: reading CR3 has no side effect; we run at CPL 0.
    unsafe { asm!("mov {}, cr3", out(reg) value, options(nomem, nostack, preserves_flags)) }
    value
}

/// Switches address space.
///
/// # Safety
/// `root` must be a complete set of page tables that maps the running code,
/// its stack and everything the caller will touch afterwards.
pub unsafe fn write_cr3(root: u64) {
    // SAFETY: the caller guarantees the new tables map what runs next. Not
    // `nomem`: every memory access after this uses the new translation.
    unsafe { asm!("mov cr3, {}", in(reg) root, options(nostack, preserves_flags)) }
}

/// CR0.
pub fn read_cr0() -> u64 {
    let value: u64;
    // SAFETY: reading CR0 has no side effect; we run at CPL 0.
    unsafe { asm!("mov {}, cr0", out(reg) value, options(nomem, nostack, preserves_flags)) }
    value
}

/// A descriptor-table register (GDTR, IDTR) as SGDT/SIDT store it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DescriptorTable {
    /// The limit (size - 1).
    pub limit: u16,
    /// The linear base.
    pub base: u64,
}

/// The 10 bytes SGDT and SIDT store.
#[repr(C, packed(2))]
struct StoredDescriptorTable {
    limit: u16,
    base: u64,
}

/// GDTR.
pub fn read_gdtr() -> DescriptorTable {
    let mut stored = StoredDescriptorTable { limit: 0, base: 0 };
    // SAFETY: SGDT stores 10 bytes into `stored`, which has that layout; it
    // changes nothing else.
    unsafe { asm!("sgdt [{}]", in(reg) &mut stored, options(nostack, preserves_flags)) };
    DescriptorTable {
        limit: stored.limit,
        base: stored.base,
    }
}

/// IDTR.
pub fn read_idtr() -> DescriptorTable {
    let mut stored = StoredDescriptorTable { limit: 0, base: 0 };
    // SAFETY: as read_gdtr, for SIDT.
    unsafe { asm!("sidt [{}]", in(reg) &mut stored, options(nostack, preserves_flags)) };
    DescriptorTable {
        limit: stored.limit,
        base: stored.base,
    }
}

/// CR4.
pub fn read_cr4() -> u64 {
    let value: u64;
    // SAFETY: reading CR4 has no side effect; we run at CPL 0.
    unsafe { asm!("mov {}, cr4", out(reg) value, options(nomem, nostack, preserves_flags)) }
    value
}

/// CR4.PGE: global pages.
pub const CR4_PGE: u64 = 1 << 7;

/// Enables global pages (CR4.PGE).
pub fn enable_global_pages() {
    let cr4 = read_cr4() | CR4_PGE;
    // SAFETY: setting PGE only lets the TLB keep global entries longer.
    unsafe { asm!("mov cr4, {}", in(reg) cr4, options(nostack, preserves_flags)) }
}

/// Invalidates every TLB entry of this CPU, global ones included (toggling
/// CR4.PGE flushes them; a CR3 write alone would keep them).
pub fn flush_tlb_local() {
    let cr4 = read_cr4();
    if cr4 & CR4_PGE != 0 {
        // SAFETY: clearing and restoring PGE changes no translation, only
        // flushes the TLB. Not `nomem`: later accesses must re-walk.
        unsafe {
            asm!("mov cr4, {0}", "mov cr4, {1}", in(reg) cr4 & !CR4_PGE, in(reg) cr4, options(nostack, preserves_flags))
        }
    } else {
        // SAFETY: reloading CR3 with its own value only flushes the TLB.
        unsafe { write_cr3(read_cr3()) }
    }
}

/// Invalidates this CPU's TLB entry for the page holding `va` (global or
/// not).
pub fn invlpg(va: u64) {
    // SAFETY: INVLPG changes no translation and faults on no address; CPL 0.
    // Not `nomem`: later accesses to the page must re-walk.
    unsafe { asm!("invlpg [{}]", in(reg) va, options(nostack, preserves_flags)) }
}

/// Writes back (if dirty) and invalidates the line holding `address` in
/// every cache of the coherence domain, then waits for that to complete.
/// WBINVD would flush everything without a mapping but only this CPU's
/// caches, and it is a #VE in a TD.
///
/// # Safety
/// `address` must be mapped (CLFLUSH translates it like a read).
pub unsafe fn clflush_lines(address: u64, bytes: u64, line_size: u64) {
    let mut line = address & !(line_size - 1);
    while line < address + bytes {
        // SAFETY: the caller guarantees the range is mapped; CLFLUSH changes
        // no memory contents.
        unsafe { asm!("clflush [{}]", in(reg) line, options(nostack, preserves_flags)) };
        line += line_size;
    }
    // SAFETY: MFENCE only orders; CLFLUSH is ordered by it.
    unsafe { asm!("mfence", options(nostack, preserves_flags)) };
}

/// The CLFLUSH line size in bytes (CPUID.1:EBX[15:8] × 8), 64 if the CPU
/// does not say.
pub fn clflush_line_size() -> u64 {
    match (cpuid(1, 0).ebx >> 8) & 0xff {
        0 => 64,
        eights => u64::from(eights) * 8,
    }
}

/// Reads an MSR.
///
/// # Safety
/// The MSR must exist (else #GP) and reading it must have no side effect the
/// caller does not own.
pub unsafe fn rdmsr(msr: u32) -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: the caller guarantees the MSR exists.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") low, out("edx") high, options(nomem, nostack, preserves_flags))
    }
    (u64::from(high) << 32) | u64::from(low)
}

/// Writes an MSR.
///
/// # Safety
/// The MSR must exist and the value must be valid for it; the caller owns
/// what the write changes.
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: the caller guarantees the write is valid. Not `nomem`: MSRs
    // can change how memory is accessed.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nostack, preserves_flags))
    }
}

/// CPUID (every x86-64 CPU has it, so the intrinsic is safe).
pub fn cpuid(leaf: u32, subleaf: u32) -> core::arch::x86_64::CpuidResult {
    core::arch::x86_64::__cpuid_count(leaf, subleaf)
}

/// The time-stamp counter (RDTSC; not ordered with surrounding loads, which the bounded waits
/// that use it do not need).
pub fn read_tsc() -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: RDTSC only reads the counter (CR4.TSD is never set, and we run at CPL 0).
    unsafe {
        asm!("rdtsc", out("eax") low, out("edx") high, options(nomem, nostack, preserves_flags))
    }
    (u64::from(high) << 32) | u64::from(low)
}

/// The time-stamp counter, ordered: LFENCE first, so RDTSC does not run
/// before the instructions ahead of it are done (Linux's rdtsc_ordered()).
/// Also a compiler barrier, so the timed code stays between two readings.
pub fn read_tsc_ordered() -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: LFENCE and RDTSC only order and read the counter (CR4.TSD is
    // never set, and we run at CPL 0).
    unsafe {
        asm!("lfence", "rdtsc", out("eax") low, out("edx") high, options(nostack, preserves_flags))
    }
    (u64::from(high) << 32) | u64::from(low)
}

// cli/sti/hlt are compiler barriers on purpose (no `nomem`): a handler may
// read or write what the code around them does, so the compiler must not
// move memory accesses into or out of an interrupts-off section.

/// Enables interrupts.
pub fn enable_interrupts() {
    // SAFETY: handlers are installed before anyone calls this.
    unsafe { asm!("sti", options(nostack)) }
}

/// Disables interrupts.
pub fn disable_interrupts() {
    // SAFETY: masking interrupts cannot break memory safety.
    unsafe { asm!("cli", options(nostack)) }
}

/// Whether RFLAGS.IF is set.
pub fn interrupts_enabled() -> bool {
    let flags: u64;
    // SAFETY: reading RFLAGS has no side effect.
    unsafe { asm!("pushfq", "pop {}", out(reg) flags, options(nomem, preserves_flags)) }
    flags & (1 << 9) != 0
}

/// Runs `f` with interrupts disabled on this CPU, restoring the previous
/// state after it.
pub fn without_interrupts<T>(f: impl FnOnce() -> T) -> T {
    let were_enabled = interrupts_enabled();
    if were_enabled {
        disable_interrupts();
    }
    let result = f();
    if were_enabled {
        enable_interrupts();
    }
    result
}

/// Waits for an interrupt (returns at once if one is pending and enabled).
pub fn halt() {
    // SAFETY: HLT only waits.
    unsafe { asm!("hlt", options(nomem, nostack, preserves_flags)) }
}

/// Enables interrupts and halts atomically (no wake-up lost in between).
pub fn enable_interrupts_and_halt() {
    // SAFETY: STI's one-instruction shadow makes the pair atomic.
    unsafe { asm!("sti", "hlt", options(nostack)) }
}

/// Stops this CPU for good.
pub fn halt_forever() -> ! {
    loop {
        disable_interrupts();
        halt();
    }
}
