//! Step 3: flush every CPU's TLB and wait until each has done it.
//!
//! The initiator bumps a generation, sends an IPI to every other online CPU,
//! flushes its own TLB and waits until each target has recorded the new
//! generation. Targets flush in the IPI handler (global entries included),
//! then record it. One shootdown at a time; waiting CPUs keep interrupts
//! enabled, so two initiators cannot deadlock on each other's IPIs.

use bare::idt::Frame;
use core::sync::atomic::{AtomicU64, Ordering};
use spin::Mutex;

/// The IPI vector.
pub const SHOOTDOWN_VECTOR: u8 = 0xf0;
/// CPUs this kernel supports.
pub const MAX_CPUS: usize = 64;

static GENERATION: AtomicU64 = AtomicU64::new(0);
static ACKED: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// Bit n: CPU n takes shootdown IPIs.
static ONLINE: AtomicU64 = AtomicU64::new(0);
static INITIATOR: Mutex<()> = Mutex::new(());
/// Shootdowns done, and IPIs sent for them.
pub static SHOOTDOWNS: AtomicU64 = AtomicU64::new(0);
pub static IPIS_SENT: AtomicU64 = AtomicU64::new(0);

/// Marks this CPU as taking shootdowns (its IDT and APIC are ready), with
/// interrupts still off. It joins first, then reads the generation, then
/// flushes, then acknowledges what it read: an initiator that saw it
/// offline bumped the generation before it joined (so the flush comes
/// after that initiator's entry changes); one that saw it online waits for
/// an acknowledgement of its own generation, which the IPI, pending until
/// this CPU enables interrupts, brings. Acknowledging before joining, or
/// flushing before reading the generation, could acknowledge a flush that
/// happened before the entries changed.
pub fn cpu_online(cpu: usize) {
    ONLINE.fetch_or(1 << cpu, Ordering::SeqCst);
    let generation = GENERATION.load(Ordering::SeqCst);
    bare::cpu::flush_tlb_local();
    ACKED[cpu].store(generation, Ordering::SeqCst);
}

/// How many CPUs take shootdowns.
pub fn online_count() -> u32 {
    ONLINE.load(Ordering::SeqCst).count_ones()
}

/// Flushes all TLBs on all online CPUs and returns when every one has.
pub fn flush_all_cpus() {
    let _one_at_a_time = INITIATOR.lock();
    let me = super::cpu_index();
    let generation = GENERATION.fetch_add(1, Ordering::SeqCst) + 1;
    let others = ONLINE.load(Ordering::SeqCst) & !(1 << me);
    if others != 0 {
        super::send_ipi_to_others(SHOOTDOWN_VECTOR);
        IPIS_SENT.fetch_add(u64::from(others.count_ones()), Ordering::Relaxed);
    }
    bare::cpu::flush_tlb_local();
    ACKED[me].store(generation, Ordering::SeqCst);
    for (cpu, acked) in ACKED.iter().enumerate() {
        if others & (1 << cpu) != 0 {
            while acked.load(Ordering::SeqCst) < generation {
                core::hint::spin_loop();
            }
        }
    }
    SHOOTDOWNS.fetch_add(1, Ordering::Relaxed);
}

/// The IPI handler.
pub fn handle_ipi(_frame: &mut Frame) {
    bare::cpu::flush_tlb_local();
    ACKED[super::cpu_index()].store(GENERATION.load(Ordering::SeqCst), Ordering::SeqCst);
    super::end_of_interrupt();
}
