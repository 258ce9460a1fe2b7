//! The local APIC: enable it, read its ID, signal end of interrupt, send
//! IPIs (fixed, INIT, STARTUP).
//!
//! Two register interfaces, chosen once by [`Apic::new`] for all CPUs:
//! - x2APIC: MSRs `0x800 + offset / 16`, when CPUID.1:ECX[21] reports it
//!   and the caller allows it. 32-bit APIC IDs, the ICR is one 64-bit MSR and
//!   has no delivery-status bit.
//! - xAPIC: 4 KiB of MMIO at a virtual address the caller maps uncached
//!   (identity 0xFEE00000 under the boot map). 8-bit APIC IDs; the ICR is two
//!   registers and the sender waits for delivery status to clear.
//!
//! One [`Apic`] value serves every CPU (each CPU sees its own local APIC at
//! the same address / MSRs), so it can live in a `static` and be used from
//! interrupt handlers. Each CPU calls [`Apic::enable_on_this_cpu`] before
//! any other method; in x2APIC mode the other methods raise #GP on a CPU
//! that has not (a fault, not memory corruption).
//!
//! QEMU 7.2 under TCG does not offer x2APIC (`-cpu qemu64,+x2apic` warns
//! "TCG doesn't support requested feature: CPUID.01H:ECX.x2apic [bit 21]"
//! and clears the bit), so there only the xAPIC path runs.

use crate::cpu::{cpuid, rdmsr, without_interrupts, wrmsr};
use core::arch::asm;
use core::sync::atomic::{fence, Ordering};

/// IA32_APIC_BASE.
const MSR_APIC_BASE: u32 = 0x1b;
/// IA32_APIC_BASE: x2APIC mode (EXTD).
const APIC_BASE_X2APIC: u64 = 1 << 10;
/// IA32_APIC_BASE: APIC globally enabled (EN).
const APIC_BASE_ENABLE: u64 = 1 << 11;
/// IA32_APIC_BASE: the physical base address bits.
const APIC_BASE_ADDRESS_MASK: u64 = 0x000f_ffff_ffff_f000;
/// First x2APIC MSR; register at xAPIC offset `o` is MSR `X2APIC_MSR_BASE + o / 16`.
const X2APIC_MSR_BASE: u32 = 0x800;

/// CPUID.1:EDX[9]: a local APIC is present.
const CPUID_1_EDX_APIC: u32 = 1 << 9;
/// CPUID.1:ECX[21]: x2APIC is supported.
const CPUID_1_ECX_X2APIC: u32 = 1 << 21;

/// Register offsets in the xAPIC MMIO page.
mod register {
    /// Local APIC ID.
    pub const ID: u32 = 0x020;
    /// Task priority.
    pub const TASK_PRIORITY: u32 = 0x080;
    /// End of interrupt.
    pub const EOI: u32 = 0x0b0;
    /// Spurious interrupt vector.
    pub const SPURIOUS: u32 = 0x0f0;
    /// Error status.
    pub const ERROR_STATUS: u32 = 0x280;
    /// Interrupt command, low half (writing it sends).
    pub const ICR_LOW: u32 = 0x300;
    /// Interrupt command, high half (destination in bits 31:24).
    pub const ICR_HIGH: u32 = 0x310;
    /// LVT timer entry.
    pub const LVT_TIMER: u32 = 0x320;
    /// Timer initial count (writing it starts the timer).
    pub const TIMER_INITIAL_COUNT: u32 = 0x380;
    /// Timer current count.
    pub const TIMER_CURRENT_COUNT: u32 = 0x390;
    /// Timer divide configuration.
    pub const TIMER_DIVIDE: u32 = 0x3e0;
}

/// LVT mask bit.
const LVT_MASKED: u32 = 1 << 16;
/// Divide configuration value for "divide by 1".
const TIMER_DIVIDE_BY_1: u32 = 0b1011;

/// Spurious-vector register: APIC software enable.
const SPURIOUS_APIC_ENABLE: u32 = 1 << 8;

/// ICR fields.
mod icr {
    /// Delivery mode: fixed.
    pub const FIXED: u32 = 0b000 << 8;
    /// Delivery mode: INIT.
    pub const INIT: u32 = 0b101 << 8;
    /// Delivery mode: STARTUP.
    pub const STARTUP: u32 = 0b110 << 8;
    /// xAPIC only: the previous IPI has not been accepted yet.
    pub const DELIVERY_PENDING: u32 = 1 << 12;
    /// Level: assert (required for every mode but INIT de-assert).
    pub const ASSERT: u32 = 1 << 14;
    /// Trigger mode: level (only meaningful for INIT).
    pub const LEVEL_TRIGGERED: u32 = 1 << 15;
    /// Destination shorthand: all excluding self.
    pub const ALL_BUT_SELF: u32 = 0b11 << 18;
}

/// Reads of the delivery-status bit before an xAPIC send gives up. Real
/// APICs accept an IPI within microseconds; QEMU's clears the bit at once.
const DELIVERY_POLL_LIMIT: u32 = 1_000_000;

/// Lowest vector accepted for fixed IPIs and the spurious vector: 0-15 are
/// illegal for the APIC and 16-31 are the CPU's exceptions.
pub const FIRST_INTERRUPT_VECTOR: u8 = 32;
/// Largest APIC ID an xAPIC can address one CPU by (0xff is broadcast).
pub const MAX_XAPIC_ID: u32 = 0xfe;
/// Largest APIC ID an x2APIC can address one CPU by (0xffffffff is
/// broadcast).
pub const MAX_X2APIC_ID: u32 = 0xffff_fffe;

/// Why an APIC operation was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApicError {
    /// CPUID reports no local APIC.
    NotPresent,
    /// [`Apic::x2apic_only`]: CPUID reports no x2APIC.
    X2apicNotSupported,
    /// The vector is below [`FIRST_INTERRUPT_VECTOR`].
    InvalidVector(u8),
    /// The APIC ID cannot name one CPU in this mode (above
    /// [`MAX_XAPIC_ID`] / [`MAX_X2APIC_ID`]: the broadcast ID or too wide).
    DestinationOutOfRange(u32),
    /// A STARTUP IPI's code page must be 4 KiB-aligned, below 1 MiB and not
    /// in 0xA0000-0xBFFFF (vectors 0xA0-0xBF are reserved).
    BadStartupAddress(u64),
    /// xAPIC: the previous IPI was still pending after
    /// `DELIVERY_POLL_LIMIT` reads of the delivery-status bit.
    DeliveryTimeout,
}

/// The register interface in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ApicMode {
    /// MSR interface, 32-bit APIC IDs.
    X2apic,
    /// MMIO interface at this virtual address.
    Xapic {
        /// Virtual address of the (uncached) register page.
        mmio: usize,
    },
}

/// The local APIC driver (one value for all CPUs).
#[derive(Clone, Copy, Debug)]
pub struct Apic {
    mode: ApicMode,
    /// Whether [`Apic::enable_on_this_cpu`] sets the mode in IA32_APIC_BASE
    /// (false where the platform fixes it: see [`Apic::x2apic_only`]).
    sets_base_msr: bool,
}

/// Whether this CPU reports x2APIC support (CPUID.1:ECX[21]).
pub fn x2apic_supported() -> bool {
    cpuid(1, 0).ecx & CPUID_1_ECX_X2APIC != 0
}

impl Apic {
    /// Chooses the mode: x2APIC if `allow_x2apic` and CPUID reports it, else
    /// xAPIC through the register page at virtual address `xapic_mmio`.
    /// Touches no APIC register.
    ///
    /// # Safety
    /// Unless x2APIC is chosen, `xapic_mmio` must map this machine's local
    /// APIC page (physical base from IA32_APIC_BASE, normally 0xFEE00000)
    /// uncached, on every CPU that uses the returned value, for as long as
    /// it is used.
    pub unsafe fn new(xapic_mmio: usize, allow_x2apic: bool) -> Result<Apic, ApicError> {
        if cpuid(1, 0).edx & CPUID_1_EDX_APIC == 0 {
            return Err(ApicError::NotPresent);
        }
        let mode = if allow_x2apic && x2apic_supported() {
            ApicMode::X2apic
        } else {
            ApicMode::Xapic { mmio: xapic_mmio }
        };
        Ok(Apic {
            mode,
            sets_base_msr: true,
        })
    }

    /// The x2APIC interface of a platform that keeps every local APIC
    /// enabled in x2APIC mode, such as a TD (its APIC is virtualized through
    /// the x2APIC MSRs only), or an error if CPUID does not report x2APIC.
    /// [`Apic::enable_on_this_cpu`] then leaves IA32_APIC_BASE alone: it is
    /// not the guest's to change there, and in a TD even reading it may cost
    /// a #VE and a question to the VMM. Needs no mapping, so unlike
    /// [`Apic::new`] it is safe.
    pub fn x2apic_only() -> Result<Apic, ApicError> {
        if cpuid(1, 0).edx & CPUID_1_EDX_APIC == 0 {
            return Err(ApicError::NotPresent);
        }
        if !x2apic_supported() {
            return Err(ApicError::X2apicNotSupported);
        }
        Ok(Apic {
            mode: ApicMode::X2apic,
            sets_base_msr: false,
        })
    }

    fn read(&self, offset: u32) -> u32 {
        match self.mode {
            // SAFETY: x2APIC mode is chosen only when CPUID reports x2APIC,
            // so the MSRs 0x800-0x8ff exist once this CPU enabled x2APIC
            // (a #GP otherwise, see the module doc); reads of the registers
            // used here have no side effect.
            ApicMode::X2apic => unsafe { rdmsr(X2APIC_MSR_BASE + offset / 16) as u32 },
            // SAFETY: `new`'s contract: `mmio` maps the APIC page uncached;
            // `offset` is one of the aligned register offsets in `register`.
            ApicMode::Xapic { mmio } => unsafe {
                core::ptr::read_volatile((mmio + offset as usize) as *const u32)
            },
        }
    }

    fn write(&self, offset: u32, value: u32) {
        match self.mode {
            // SAFETY: as in `read`; the registers written here (TPR, EOI, timer,
            // SVR, ESR) take any 32-bit value this module composes.
            ApicMode::X2apic => unsafe { wrmsr(X2APIC_MSR_BASE + offset / 16, u64::from(value)) },
            // SAFETY: as in `read`.
            ApicMode::Xapic { mmio } => unsafe {
                core::ptr::write_volatile((mmio + offset as usize) as *mut u32, value)
            },
        }
    }

    /// Turns this CPU's local APIC on in the chosen mode: IA32_APIC_BASE
    /// global enable (plus EXTD for x2APIC; left alone for
    /// [`Apic::x2apic_only`]), task priority 0 (accept every vector), error
    /// status cleared, spurious-vector register = software enable |
    /// `spurious_vector`. The spurious vector needs an IDT handler
    /// that does *not* send EOI.
    pub fn enable_on_this_cpu(&self, spurious_vector: u8) -> Result<(), ApicError> {
        if spurious_vector < FIRST_INTERRUPT_VECTOR {
            return Err(ApicError::InvalidVector(spurious_vector));
        }
        if self.sets_base_msr {
            self.set_mode_in_base_msr();
        }
        self.write(register::TASK_PRIORITY, 0);
        // The ESR latches on a write; two writes clear what was recorded.
        self.write(register::ERROR_STATUS, 0);
        self.write(register::ERROR_STATUS, 0);
        self.write(
            register::SPURIOUS,
            SPURIOUS_APIC_ENABLE | u32::from(spurious_vector),
        );
        Ok(())
    }

    /// IA32_APIC_BASE: global enable, and EXTD as the mode wants.
    fn set_mode_in_base_msr(&self) {
        // SAFETY: IA32_APIC_BASE exists on every CPU with a local APIC,
        // which `new` checked (all CPUs of a machine report the same CPUID).
        let base = unsafe { rdmsr(MSR_APIC_BASE) };
        let enabled = base | APIC_BASE_ENABLE;
        match self.mode {
            ApicMode::X2apic => {
                if base & APIC_BASE_X2APIC == 0 {
                    // SAFETY: the SDM's allowed path disabled/xAPIC ->
                    // xAPIC -> x2APIC, on a CPU that reports x2APIC (`new`);
                    // the base address bits are kept.
                    unsafe {
                        wrmsr(MSR_APIC_BASE, enabled & !APIC_BASE_X2APIC);
                        wrmsr(MSR_APIC_BASE, enabled | APIC_BASE_X2APIC);
                    }
                }
            }
            ApicMode::Xapic { .. } => {
                if base & APIC_BASE_X2APIC != 0 {
                    // x2APIC -> xAPIC is only allowed through disabled.
                    // SAFETY: disabled -> xAPIC enabled is an allowed
                    // transition; the base address bits are kept.
                    unsafe {
                        wrmsr(MSR_APIC_BASE, base & !(APIC_BASE_ENABLE | APIC_BASE_X2APIC));
                        wrmsr(MSR_APIC_BASE, enabled & !APIC_BASE_X2APIC);
                    }
                } else if base & APIC_BASE_ENABLE == 0 {
                    // SAFETY: disabled -> xAPIC enabled, base address kept.
                    unsafe { wrmsr(MSR_APIC_BASE, enabled) };
                }
            }
        }
    }

    /// Physical address of this CPU's APIC page (IA32_APIC_BASE), to compare
    /// with the MADT's and to map for xAPIC mode.
    pub fn physical_base_of_this_cpu() -> u64 {
        // SAFETY: IA32_APIC_BASE exists on every x86-64 CPU with a local
        // APIC; reading it has no side effect.
        unsafe { rdmsr(MSR_APIC_BASE) & APIC_BASE_ADDRESS_MASK }
    }

    /// This CPU's local APIC ID.
    pub fn id(&self) -> u32 {
        let raw = self.read(register::ID);
        match self.mode {
            ApicMode::X2apic => raw,
            ApicMode::Xapic { .. } => raw >> 24,
        }
    }

    /// Starts this CPU's APIC timer in one-shot mode: `vector` fires after
    /// `ticks` timer ticks (bus clock divided by 1). A zero count stops it.
    pub fn start_one_shot_timer(&self, vector: u8, ticks: u32) -> Result<(), ApicError> {
        if vector < FIRST_INTERRUPT_VECTOR {
            return Err(ApicError::InvalidVector(vector));
        }
        self.write(register::TIMER_DIVIDE, TIMER_DIVIDE_BY_1);
        self.write(register::LVT_TIMER, u32::from(vector));
        self.write(register::TIMER_INITIAL_COUNT, ticks);
        Ok(())
    }

    /// Stops this CPU's APIC timer and masks its LVT entry.
    pub fn stop_timer(&self) {
        self.write(register::TIMER_INITIAL_COUNT, 0);
        self.write(register::LVT_TIMER, LVT_MASKED);
    }

    /// Ticks left in this CPU's APIC timer (0 once it fired or stopped).
    pub fn timer_current_count(&self) -> u32 {
        self.read(register::TIMER_CURRENT_COUNT)
    }

    /// Signals end of interrupt for the vector being serviced.
    pub fn eoi(&self) {
        self.write(register::EOI, 0);
    }

    /// Sends fixed-delivery `vector` to the CPU with `apic_id`.
    pub fn send_ipi(&self, apic_id: u32, vector: u8) -> Result<(), ApicError> {
        if vector < FIRST_INTERRUPT_VECTOR {
            return Err(ApicError::InvalidVector(vector));
        }
        self.send(Some(apic_id), icr::FIXED | icr::ASSERT | u32::from(vector))
    }

    /// Sends fixed-delivery `vector` to every CPU but this one.
    pub fn send_ipi_all_but_self(&self, vector: u8) -> Result<(), ApicError> {
        if vector < FIRST_INTERRUPT_VECTOR {
            return Err(ApicError::InvalidVector(vector));
        }
        self.send(
            None,
            icr::ALL_BUT_SELF | icr::FIXED | icr::ASSERT | u32::from(vector),
        )
    }

    /// Sends INIT (assert) to `apic_id`: the CPU resets and waits for a
    /// STARTUP IPI. No INIT de-assert follows: only the 82489DX needed it,
    /// and x2APIC does not support it.
    pub fn send_init(&self, apic_id: u32) -> Result<(), ApicError> {
        self.send(
            Some(apic_id),
            icr::INIT | icr::ASSERT | icr::LEVEL_TRIGGERED,
        )
    }

    /// Sends STARTUP to `apic_id`: a CPU waiting after INIT starts in real
    /// mode at `code_physical` (CS = `code_physical >> 4`, IP = 0), which
    /// must be 4 KiB-aligned, below 1 MiB and outside 0xA0000-0xBFFFF.
    pub fn send_startup(&self, apic_id: u32, code_physical: u64) -> Result<(), ApicError> {
        let reserved = (0xa_0000..0xc_0000).contains(&code_physical);
        if code_physical & 0xfff != 0 || code_physical >= 0x10_0000 || reserved {
            return Err(ApicError::BadStartupAddress(code_physical));
        }
        let page = (code_physical >> 12) as u32;
        self.send(Some(apic_id), icr::STARTUP | icr::ASSERT | page)
    }

    /// Writes the ICR: `low` is the command (vector, mode, shorthand),
    /// `destination` the APIC ID (None with a shorthand). A single
    /// destination must name one CPU: the broadcast ID would also reach this
    /// one (an INIT to it would reset the sender).
    fn send(&self, destination: Option<u32>, low: u32) -> Result<(), ApicError> {
        let limit = match self.mode {
            ApicMode::X2apic => MAX_X2APIC_ID,
            ApicMode::Xapic { .. } => MAX_XAPIC_ID,
        };
        if let Some(id) = destination.filter(|&id| id > limit) {
            return Err(ApicError::DestinationOutOfRange(id));
        }
        let destination = destination.unwrap_or(0);
        match self.mode {
            ApicMode::X2apic => {
                let value = u64::from(destination) << 32 | u64::from(low);
                // A WRMSR to the x2APIC ICR is not serializing: fence so the
                // receiver sees every store made before the IPI (the SDM's
                // MFENCE; LFENCE recipe).
                fence(Ordering::SeqCst);
                // SAFETY: LFENCE only orders instructions.
                unsafe { asm!("lfence", options(nostack, preserves_flags)) };
                // SAFETY: x2APIC mode (CPUID-checked, enabled on this CPU);
                // the value is a well-formed ICR command composed here.
                unsafe { wrmsr(X2APIC_MSR_BASE + register::ICR_LOW / 16, value) };
                Ok(())
            }
            // Interrupts off: a handler on this CPU cannot send an IPI
            // between the two ICR writes.
            ApicMode::Xapic { .. } => without_interrupts(|| {
                self.wait_for_delivery()?;
                self.write(register::ICR_HIGH, destination << 24);
                self.write(register::ICR_LOW, low);
                self.wait_for_delivery()
            }),
        }
    }

    fn wait_for_delivery(&self) -> Result<(), ApicError> {
        for _ in 0..DELIVERY_POLL_LIMIT {
            if self.read(register::ICR_LOW) & icr::DELIVERY_PENDING == 0 {
                return Ok(());
            }
            core::hint::spin_loop();
        }
        Err(ApicError::DeliveryTimeout)
    }
}
