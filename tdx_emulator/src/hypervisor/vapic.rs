//! The TD's virtual x2APIC, as the VMM behind a TD emulates it (KVM's
//! lapic.c for TDX, with the TDX module's split: TPR/PPR/EOI/ISR/TMR/IRR and
//! SELF_IPI are reached natively through the virtual-APIC page, everything
//! else through #VE and TDVMCALL, see `tdx_emulator::msr`). One per vCPU:
//! pending vectors, the LVT entries and the timer (one-shot, periodic and
//! TSC-deadline).

use super::clock;
use super::vcpu::MAX_VCPUS;
use core::sync::atomic::{AtomicU64, Ordering};

/// KVM's APIC bus for TDX ticks at 25 MHz (`TDX_APIC_BUS_CYCLE_NS` = 40 in
/// KVM's vmx/tdx.c), the crystal that CPUID leaf 0x15 reports.
const APIC_BUS_HZ: u64 = 25_000_000;

/// x2APIC MSR numbers (SDM vol. 3 table 11-6).
pub mod reg {
    pub const APIC_BASE: u32 = 0x1b;
    pub const ID: u32 = 0x802;
    pub const VERSION: u32 = 0x803;
    pub const TPR: u32 = 0x808;
    pub const PPR: u32 = 0x80a;
    pub const EOI: u32 = 0x80b;
    pub const LDR: u32 = 0x80d;
    pub const SVR: u32 = 0x80f;
    pub const ISR0: u32 = 0x810;
    pub const IRR7: u32 = 0x827;
    pub const ESR: u32 = 0x828;
    pub const LVT_CMCI: u32 = 0x82f;
    pub const ICR: u32 = 0x830;
    pub const LVT_TIMER: u32 = 0x832;
    pub const LVT_ERROR: u32 = 0x837;
    pub const TIMER_INITIAL: u32 = 0x838;
    pub const TIMER_CURRENT: u32 = 0x839;
    pub const TIMER_DIVIDE: u32 = 0x83e;
    pub const SELF_IPI: u32 = 0x83f;
    pub const TSC_DEADLINE: u32 = 0x6e0;
}

const LVT_MASKED: u64 = 1 << 16;
const TIMER_MODE_SHIFT: u32 = 17;
const TIMER_PERIODIC: u64 = 1;
const TIMER_TSC_DEADLINE: u64 = 2;

struct State {
    /// Pending vectors (the IRR), 256 bits.
    irr: [AtomicU64; 4],
    tpr: AtomicU64,
    svr: AtomicU64,
    /// CMCI (0x82f) and the LVT entries 0x832..=0x837.
    lvt: [AtomicU64; 7],
    divide: AtomicU64,
    initial_count: AtomicU64,
    /// TSC value at which the timer fires (0: not armed).
    deadline: AtomicU64,
    /// Periodic mode: TSC ticks per period.
    period: AtomicU64,
}

impl State {
    const fn new() -> State {
        State {
            irr: [const { AtomicU64::new(0) }; 4],
            tpr: AtomicU64::new(0),
            svr: AtomicU64::new(0xff),
            lvt: [const { AtomicU64::new(LVT_MASKED) }; 7],
            divide: AtomicU64::new(0),
            initial_count: AtomicU64::new(0),
            deadline: AtomicU64::new(0),
            period: AtomicU64::new(0),
        }
    }
}

static APICS: [State; MAX_VCPUS] = [const { State::new() }; MAX_VCPUS];

/// The MSRs this APIC emulates: APIC_BASE, the x2APIC range, TSC_DEADLINE.
pub fn is_apic_msr(msr: u32) -> bool {
    msr == reg::APIC_BASE || msr == reg::TSC_DEADLINE || (0x800..=0x8ff).contains(&msr)
}

fn apic(vcpu: usize) -> &'static State {
    &APICS[vcpu % MAX_VCPUS]
}

/// Makes `vector` pending on `vcpu`.
pub fn set_pending(vcpu: usize, vector: u8) {
    if vcpu < MAX_VCPUS {
        apic(vcpu).irr[usize::from(vector) / 64].fetch_or(1 << (vector % 64), Ordering::SeqCst);
    }
}

/// Takes the highest pending vector.
pub fn take_highest_pending(vcpu: usize) -> Option<u8> {
    let irr = &apic(vcpu).irr;
    for word in (0..4).rev() {
        let bits = irr[word].load(Ordering::SeqCst);
        if bits != 0 {
            let bit = 63 - bits.leading_zeros() as usize;
            irr[word].fetch_and(!(1 << bit), Ordering::SeqCst);
            return Some((word * 64 + bit) as u8);
        }
    }
    None
}

pub fn has_pending(vcpu: usize) -> bool {
    apic(vcpu).irr.iter().any(|w| w.load(Ordering::SeqCst) != 0)
}

fn timer_lvt(vcpu: usize) -> u64 {
    apic(vcpu).lvt[1].load(Ordering::SeqCst)
}

fn timer_mode(vcpu: usize) -> u64 {
    (timer_lvt(vcpu) >> TIMER_MODE_SHIFT) & 3
}

/// The TSC deadline at which this vCPU's timer fires, if armed.
pub fn next_deadline(vcpu: usize) -> Option<u64> {
    match apic(vcpu).deadline.load(Ordering::SeqCst) {
        0 => None,
        deadline => Some(deadline),
    }
}

/// Fires the timer if its deadline passed: its vector becomes pending
/// (unless masked) and a periodic timer re-arms.
pub fn poll_timer(vcpu: usize, now: u64) {
    let state = apic(vcpu);
    let deadline = state.deadline.load(Ordering::SeqCst);
    if deadline == 0 || now < deadline {
        return;
    }
    let next = match (timer_mode(vcpu), state.period.load(Ordering::SeqCst)) {
        (TIMER_PERIODIC, period) if period > 0 => {
            // Skip the periods that passed unseen, as a real timer would.
            let behind = (now - deadline) / period + 1;
            deadline + behind * period
        }
        _ => 0,
    };
    if state
        .deadline
        .compare_exchange(deadline, next, Ordering::SeqCst, Ordering::SeqCst)
        .is_ok()
    {
        let lvt = timer_lvt(vcpu);
        if lvt & LVT_MASKED == 0 {
            set_pending(vcpu, lvt as u8);
        }
    }
}

fn divisor(vcpu: usize) -> u64 {
    let value = apic(vcpu).divide.load(Ordering::SeqCst);
    let code = (value & 3) | ((value & 8) >> 1);
    if code == 7 {
        1
    } else {
        2 << code
    }
}

fn bus_ticks_to_tsc(ticks: u64) -> u64 {
    (u128::from(ticks) * u128::from(clock::tsc_hz()) / u128::from(APIC_BUS_HZ)) as u64
}

fn tsc_to_bus_ticks(tsc: u64) -> u64 {
    (u128::from(tsc) * u128::from(APIC_BUS_HZ) / u128::from(clock::tsc_hz().max(1))) as u64
}

fn x2apic_ldr(id: u64) -> u64 {
    ((id >> 4) << 16) | (1 << (id & 0xf))
}

/// A set of vCPUs.
#[derive(Clone, Copy)]
pub struct VcpuSet(u64);

impl VcpuSet {
    pub fn iter(self) -> impl Iterator<Item = usize> {
        (0..64).filter(move |i| self.0 & (1 << i) != 0)
    }
}

/// What a write asks for.
pub enum ApicWrite {
    Done,
    /// The VMM refuses it (an error status for the TDVMCALL).
    Refused,
    /// Fixed interrupt `vector` to `targets`.
    Ipi {
        targets: VcpuSet,
        vector: u8,
    },
}

/// Reads an APIC register of `vcpu` (native or on the VMM's side alike).
pub fn read(vcpu: usize, msr: u32) -> Option<u64> {
    let state = apic(vcpu);
    let id = vcpu as u64;
    Some(match msr {
        // Enabled, x2APIC (EXTD), BSP on vCPU 0.
        reg::APIC_BASE => 0xfee0_0000 | (1 << 11) | (1 << 10) | if vcpu == 0 { 1 << 8 } else { 0 },
        reg::ID => id,
        // Version 0x14, max LVT entry 6 (CMCI included), no EOI broadcast
        // suppression.
        reg::VERSION => 0x0006_0014,
        reg::TPR => state.tpr.load(Ordering::SeqCst),
        reg::PPR => state.tpr.load(Ordering::SeqCst) & 0xf0,
        reg::LDR => x2apic_ldr(id),
        reg::SVR => state.svr.load(Ordering::SeqCst),
        reg::ISR0..=reg::IRR7 => {
            // ISR and TMR read as empty (no nesting is tracked); IRR from the
            // pending set.
            if msr >= 0x820 {
                let index = (msr - 0x820) as usize;
                let word = state.irr[index / 2].load(Ordering::SeqCst);
                (word >> ((index % 2) * 32)) & 0xffff_ffff
            } else {
                0
            }
        }
        reg::ESR => 0,
        reg::LVT_CMCI => state.lvt[0].load(Ordering::SeqCst),
        0x832..=reg::LVT_ERROR => state.lvt[(msr - 0x831) as usize].load(Ordering::SeqCst),
        reg::TIMER_INITIAL => state.initial_count.load(Ordering::SeqCst),
        reg::TIMER_CURRENT => {
            let deadline = state.deadline.load(Ordering::SeqCst);
            let now = bare::cpu::read_tsc();
            if timer_mode(vcpu) == TIMER_TSC_DEADLINE || deadline <= now {
                0
            } else {
                tsc_to_bus_ticks(deadline - now) / divisor(vcpu)
            }
        }
        reg::TIMER_DIVIDE => state.divide.load(Ordering::SeqCst),
        reg::TSC_DEADLINE => {
            if timer_mode(vcpu) == TIMER_TSC_DEADLINE {
                state.deadline.load(Ordering::SeqCst)
            } else {
                0
            }
        }
        _ => return None,
    })
}

/// Writes an APIC register of `vcpu`.
pub fn write(vcpu: usize, msr: u32, value: u64) -> ApicWrite {
    let state = apic(vcpu);
    match msr {
        // The TD cannot leave x2APIC mode (TDX: APIC_BASE writes that change
        // it are refused); writing the current value is accepted.
        reg::APIC_BASE => {
            return if Some(value) == read(vcpu, msr) {
                ApicWrite::Done
            } else {
                ApicWrite::Refused
            }
        }
        reg::TPR => state.tpr.store(value & 0xff, Ordering::SeqCst),
        reg::EOI | reg::ESR => {}
        reg::SVR => state.svr.store(value & 0x11ff, Ordering::SeqCst),
        reg::LVT_CMCI => state.lvt[0].store(value & 0x1_07ff, Ordering::SeqCst),
        reg::LVT_TIMER => {
            let old_mode = timer_mode(vcpu);
            state.lvt[1].store(value & 0x7_10ff, Ordering::SeqCst);
            if timer_mode(vcpu) != old_mode {
                // A mode change disarms the timer (SDM 11.5.4.1).
                state.deadline.store(0, Ordering::SeqCst);
                state.initial_count.store(0, Ordering::SeqCst);
            }
        }
        0x833..=reg::LVT_ERROR => {
            state.lvt[(msr - 0x831) as usize].store(value & 0x1_f7ff, Ordering::SeqCst)
        }
        reg::TIMER_INITIAL => {
            if timer_mode(vcpu) == TIMER_TSC_DEADLINE {
                return ApicWrite::Done;
            }
            let count = value & 0xffff_ffff;
            state.initial_count.store(count, Ordering::SeqCst);
            let period = bus_ticks_to_tsc(count * divisor(vcpu));
            state.period.store(period, Ordering::SeqCst);
            let deadline = if count == 0 {
                0
            } else {
                bare::cpu::read_tsc() + period.max(1)
            };
            state.deadline.store(deadline, Ordering::SeqCst);
        }
        reg::TIMER_DIVIDE => state.divide.store(value & 0xb, Ordering::SeqCst),
        reg::TSC_DEADLINE => {
            // Ignored outside TSC-deadline mode (SDM 11.5.4.1).
            if timer_mode(vcpu) == TIMER_TSC_DEADLINE {
                state.period.store(0, Ordering::SeqCst);
                state.deadline.store(value, Ordering::SeqCst);
            }
        }
        reg::SELF_IPI => {
            let vector = value as u8;
            if vector >= 16 {
                set_pending(vcpu, vector);
            }
        }
        reg::ICR => return icr(vcpu, value),
        0x800..=0x8ff => {}
        _ => return ApicWrite::Refused,
    }
    ApicWrite::Done
}

/// An ICR write: fixed (or lowest-priority, delivered as fixed) IPIs.
fn icr(vcpu: usize, value: u64) -> ApicWrite {
    let vcpus = (super::TD_VCPUS.load(Ordering::SeqCst) as u64).min(64);
    let all = if vcpus >= 64 {
        u64::MAX
    } else {
        (1u64 << vcpus) - 1
    };
    let vector = value as u8;
    match (value >> 8) & 7 {
        0 | 1 if vector >= 16 => {}
        // NMI, SMI, INIT, SIPI: a TD's VMM does not deliver them this way
        // (TDX starts APs through the mailbox; NMIs through TDG.VP.WR).
        _ => return ApicWrite::Refused,
    }
    let destination = value >> 32;
    let logical = value & (1 << 11) != 0;
    let targets = match (value >> 18) & 3 {
        0 if destination == 0xffff_ffff => all,
        0 if logical => (0..vcpus)
            .filter(|&id| {
                let ldr = x2apic_ldr(id);
                destination >> 16 == ldr >> 16 && destination & ldr & 0xffff != 0
            })
            .fold(0, |set, id| set | (1 << id)),
        0 if destination < vcpus => 1 << destination,
        0 => 0,
        1 => 1 << vcpu,
        2 => all,
        _ => all & !(1 << vcpu),
    };
    ApicWrite::Ipi {
        targets: VcpuSet(targets),
        vector,
    }
}
