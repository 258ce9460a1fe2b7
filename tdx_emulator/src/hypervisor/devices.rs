//! The devices the VMM offers the TD, behind TDVMCALL<Instruction.IO> and
//! <#VE.RequestMMIO>: COM1 (QEMU's own 16550, shared with the emulator's
//! console), isa-debug-exit (the harness's verdict), and the ACPI fixed
//! hardware of the emulator's FADT (sleep control for S5, the reset
//! register). Everything else is absent hardware: reads are all ones, writes
//! are dropped, and both are counted; nothing is forwarded to QEMU's other
//! devices.

use core::sync::atomic::{AtomicU64, Ordering};
use tdx_emulator::firmware;
use tdx_emulator::model::PageState;

/// Port and MMIO accesses to hardware the TD does not have.
pub static ABSENT_IO: AtomicU64 = AtomicU64::new(0);
pub static ABSENT_MMIO: AtomicU64 = AtomicU64::new(0);

const COM1: core::ops::RangeInclusive<u16> = 0x3f8..=0x3ff;
/// The emulator's counter-snapshot port: a 32-bit write of a tag prints
/// one `TDXEMU snapshot=<tag> ...` line with every counter, so a TD can
/// bracket a measurement (the Linux benchmark module does) and the harness
/// takes differences. Not a device a real TD has: test instrumentation.
pub const SNAPSHOT_PORT: u16 = 0xf8;
/// The emulator's page-state probe: a 32-bit write of a GPA's page number
/// (GPA >> 12) prints one `TDXEMU page=<gpa> state=<state> mapped=<alias>`
/// line with the model's state of that page, which `make run` shows beside the guest's
/// entry at each step of a conversion. Test instrumentation, as above.
pub const PAGE_STATE_PORT: u16 = 0xfc;
/// Keyboard controller command port: 0xFE pulses the reset line.
const KBD_COMMAND: u16 = 0x64;
/// The PCI reset control register: bit 2 with bit 1 resets.
const RESET_CONTROL: u16 = 0xcf9;

fn all_ones(size: u8) -> u32 {
    match size {
        1 => 0xff,
        2 => 0xffff,
        _ => 0xffff_ffff,
    }
}

fn power_off() -> ! {
    bare::println!("emulator: the TD powered off (ACPI S5)");
    super::print_counters();
    bare::exit::qemu_exit(bare::exit::EXIT_TD_POWER_OFF)
}

fn reset() -> ! {
    bare::println!("emulator: the TD asked for a reset");
    super::print_counters();
    bare::exit::qemu_exit(bare::exit::EXIT_TD_RESET)
}

/// A port access; the value read, for reads.
pub fn port_io(port: u16, size: u8, write: bool, value: u32) -> Option<u32> {
    if write && port == bare::exit::DEBUG_EXIT_PORT {
        // The TD is done: the counters first, then its verdict.
        super::print_counters();
        bare::exit::qemu_exit(value);
    }
    if write && port == SNAPSHOT_PORT {
        super::print_counters_tagged(Some(value));
        return None;
    }
    if write && port == PAGE_STATE_PORT {
        let gpa = u64::from(value) << 12;
        if let Some(snp) = super::snp() {
            use tdx_emulator::snp_model::RmpState;
            let (state, mapped) = match snp.state(gpa) {
                Some(RmpState::Validated) => ("validated", "private"),
                Some(RmpState::Unvalidated) => ("unvalidated", "ciphertext"),
                Some(RmpState::Shared) => ("shared", "shared"),
                None => ("outside", "none"),
            };
            bare::println!("SNPEMU page={gpa:#x} state={state} mapped={mapped}");
            return None;
        }
        // The state, and which alias the nested tables map for it.
        let (state, mapped) = match super::td().state(gpa) {
            Some(PageState::Private) => ("private", "private"),
            Some(PageState::Pending) => ("pending", "none"),
            Some(PageState::Shared) => ("shared", "shared"),
            None => ("outside", "none"),
        };
        bare::println!("TDXEMU page={gpa:#x} state={state} mapped={mapped}");
        return None;
    }
    if COM1.contains(&port) {
        // One writer at a time with the emulator's own lines (bare::serial's
        // lock, which every println! holds for its whole line): when a TD
        // crashes on one vCPU while the emulator stops it on another, the
        // emulator's counters line stays whole instead of interleaving
        // byte by byte with the TD's report.
        let _console = bare::serial::SERIAL.lock();
        // SAFETY: COM1 is the one device the TD drives directly; the
        // emulator's console shares it on purpose.
        return unsafe { super::port_io(port, size, write, value) };
    }
    match (port, write) {
        (firmware::SLEEP_CONTROL_PORT, true) => {
            if firmware::is_s5_request(value as u8) {
                power_off();
            }
            return None;
        }
        (firmware::SLEEP_CONTROL_PORT | firmware::SLEEP_STATUS_PORT, false) => return Some(0),
        (firmware::SLEEP_STATUS_PORT, true) => return None,
        (firmware::RESET_PORT, true) if value as u8 == firmware::RESET_VALUE => reset(),
        (KBD_COMMAND, true) if value as u8 == 0xfe => reset(),
        (RESET_CONTROL, true) if value & 0x4 != 0 => reset(),
        _ => {}
    }
    ABSENT_IO.fetch_add(1, Ordering::Relaxed);
    (!write).then_some(all_ones(size))
}

/// An MMIO access (the TD has no MMIO device): all ones, counted.
pub fn mmio(_gpa: u64, size: u8, write: bool, _value: u64) -> Option<u64> {
    ABSENT_MMIO.fetch_add(1, Ordering::Relaxed);
    (!write).then_some(match size {
        8 => u64::MAX,
        other => u64::from(all_ones(other)),
    })
}
