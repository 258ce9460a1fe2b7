//! Ending a QEMU run with a status: `-device isa-debug-exit,iobase=0xf4,iosize=4`
//! makes QEMU exit with `(value << 1) | 1`.

/// I/O port of isa-debug-exit.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// Written on success: QEMU exits with 33.
pub const EXIT_SUCCESS: u32 = 0x10;
/// Written on failure: QEMU exits with 35.
pub const EXIT_FAILURE: u32 = 0x11;

/// Exits QEMU with `code`; halts forever if there is no isa-debug-exit.
pub fn qemu_exit(code: u32) -> ! {
    // SAFETY: port 0xf4 is isa-debug-exit (or nothing); writing it has no
    // effect on memory.
    unsafe { crate::cpu::outl(DEBUG_EXIT_PORT, code) };
    crate::cpu::halt_forever()
}
