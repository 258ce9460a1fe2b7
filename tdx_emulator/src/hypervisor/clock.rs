//! The emulator's clocks: the TSC rate (the TD's CPUID leaf 0x15 must
//! describe the TSC it really sees, Linux `native_calibrate_tsc`) and the
//! rate of this machine's APIC timer (which wakes a vCPU at the TD's timer
//! deadline), both measured once at boot against the PIT.

use bare::apic::Apic;
use core::sync::atomic::{AtomicU64, Ordering};

static TSC_HZ: AtomicU64 = AtomicU64::new(0);
static APIC_TIMER_HZ: AtomicU64 = AtomicU64::new(0);

/// PIT input clock (Hz).
const PIT_HZ: u64 = 1_193_182;
/// Calibration window.
const WINDOW_MS: u64 = 50;

/// Measures both rates over one PIT channel-2 countdown (the method of
/// Linux's `pit_calibrate_tsc`). Call once, on the boot CPU, before any vCPU
/// runs and with the APIC timer unused.
pub fn calibrate(apic: &Apic) {
    let latch = PIT_HZ * WINDOW_MS / 1000;
    // SAFETY: ports 0x61/0x42/0x43 are the PIT's channel 2 and its gate on
    // QEMU's PC machine; nothing else uses them, and no memory is touched.
    unsafe {
        let gate = bare::cpu::inb(0x61);
        bare::cpu::outb(0x61, (gate & !0x02) | 0x01);
        // Channel 2, low then high byte, mode 0 (interrupt on terminal count).
        bare::cpu::outb(0x43, 0xb0);
        bare::cpu::outb(0x42, latch as u8);
        bare::cpu::outb(0x42, (latch >> 8) as u8);
    }
    // A masked-out vector would do as well: u32::MAX ticks outlast the window.
    apic.start_one_shot_timer(super::TIMER_VECTOR, u32::MAX)
        .expect("timer vector is valid");
    let tsc_start = bare::cpu::read_tsc();
    let apic_start = apic.timer_current_count();
    // SAFETY: as above; OUT2 is bit 5 of port 0x61.
    while unsafe { bare::cpu::inb(0x61) } & 0x20 == 0 {
        core::hint::spin_loop();
    }
    let tsc_ticks = bare::cpu::read_tsc() - tsc_start;
    let apic_ticks = u64::from(apic_start - apic.timer_current_count());
    apic.stop_timer();
    TSC_HZ.store(tsc_ticks * 1000 / WINDOW_MS, Ordering::SeqCst);
    APIC_TIMER_HZ.store((apic_ticks * 1000 / WINDOW_MS).max(1), Ordering::SeqCst);
}

/// TSC ticks per second (0 before `calibrate`).
pub fn tsc_hz() -> u64 {
    TSC_HZ.load(Ordering::SeqCst)
}

/// APIC timer ticks per second at divide-by-1.
pub fn apic_timer_hz() -> u64 {
    APIC_TIMER_HZ.load(Ordering::SeqCst)
}

/// APIC timer ticks that cover `tsc_ticks` (at least 1, at most u32::MAX).
pub fn apic_ticks_for(tsc_ticks: u64) -> u32 {
    let tsc = tsc_hz().max(1);
    let ticks = u128::from(tsc_ticks) * u128::from(apic_timer_hz()) / u128::from(tsc);
    ticks.clamp(1, u128::from(u32::MAX)) as u32
}
