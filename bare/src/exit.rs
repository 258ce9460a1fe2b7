//! Ending a QEMU run with a status: `-device isa-debug-exit,iobase=0xf4,iosize=4`
//! makes QEMU exit with `(value << 1) | 1`.

/// I/O port of isa-debug-exit.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// Written on success: QEMU exits with 33.
pub const EXIT_SUCCESS: u32 = 0x10;
/// Written on failure: QEMU exits with 35.
pub const EXIT_FAILURE: u32 = 0x11;
/// The emulator refused its input (kernel file, initramfs, options): QEMU
/// exits with 37.
pub const EXIT_BAD_INPUT: u32 = 0x12;
/// The TD powered itself off (ACPI S5 through the FADT sleep control
/// register): QEMU exits with 65.
pub const EXIT_TD_POWER_OFF: u32 = 0x20;
/// The TD asked for a reset (ACPI reset register, keyboard controller or
/// port 0xcf9): QEMU exits with 67.
pub const EXIT_TD_RESET: u32 = 0x21;

/// QEMU's exit status for a value written to isa-debug-exit.
pub const fn qemu_status(code: u32) -> i32 {
    ((code << 1) | 1) as i32
}

/// Exits QEMU with `code`; halts forever if there is no isa-debug-exit.
pub fn qemu_exit(code: u32) -> ! {
    // SAFETY: port 0xf4 is isa-debug-exit (or nothing); writing it has no
    // effect on memory.
    unsafe { crate::cpu::outl(DEBUG_EXIT_PORT, code) };
    crate::cpu::halt_forever()
}
