//! COM1 (16550 at 0x3f8): the console. One lock for all CPUs so lines do not
//! interleave.

use crate::cpu::{inb, outb};
use core::fmt;
use spin::Mutex;

const COM1: u16 = 0x3f8;

/// The console.
pub struct Serial {
    initialised: bool,
}

/// The one console.
pub static SERIAL: Mutex<Serial> = Mutex::new(Serial { initialised: false });

impl Serial {
    fn init(&mut self) {
        // SAFETY: COM1 is the console device this module owns.
        unsafe {
            outb(COM1 + 1, 0x00); // no interrupts
            outb(COM1 + 3, 0x80); // DLAB
            outb(COM1, 0x01); // 115200 baud
            outb(COM1 + 1, 0x00);
            outb(COM1 + 3, 0x03); // 8N1
            outb(COM1 + 2, 0xc7); // FIFO on, cleared
            outb(COM1 + 4, 0x03); // DTR, RTS
        }
        self.initialised = true;
    }

    fn write_byte(&mut self, byte: u8) {
        if !self.initialised {
            self.init();
        }
        // SAFETY: COM1 is the console device this module owns.
        unsafe {
            while inb(COM1 + 5) & 0x20 == 0 {
                core::hint::spin_loop();
            }
            outb(COM1, byte);
        }
    }
}

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for byte in s.bytes() {
            if byte == b'\n' {
                self.write_byte(b'\r');
            }
            self.write_byte(byte);
        }
        Ok(())
    }
}

/// Writes to the console (used by the macros).
pub fn print(args: fmt::Arguments<'_>) {
    use fmt::Write;
    let _ = SERIAL.lock().write_fmt(args);
}

/// Writes to the console even if the lock is held (for panics and fatal
/// exceptions, which may interrupt a holder on this CPU).
pub fn print_unlocked(args: fmt::Arguments<'_>) {
    use fmt::Write;
    // A second writer on the same port instead of breaking the lock: the
    // worst case is a line mixed with the interrupted one.
    let mut writer = Serial { initialised: true };
    let _ = writer.write_fmt(args);
}

/// `print!` to the serial console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::serial::print(format_args!($($arg)*)) };
}

/// `println!` to the serial console.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => { $crate::serial::print(format_args!("{}\n", format_args!($($arg)*))) };
}
