//! The conversion engine on this machine: the kernel's tables, its frame
//! allocator, and hooks that do the real thing (vmalloc purge, IPI TLB
//! shootdown, WBINVD).

use super::memory::{DirectMap, FrameAllocator, FRAMES};
use super::{shootdown, vmalloc};
use bare::println;
use core::sync::atomic::{AtomicBool, Ordering};
use pagetable::VirtAddr;
use pagetable::{PagingMode, PhysAddr};
use set_memory_enc::platform::NoCc;
use set_memory_enc::{Converter, Direction, GpaRun, Machine, Platform, Step};

/// Hooks for this kernel.
pub struct GuestMachine;

impl Machine for GuestMachine {
    fn remove_aliases(&self, run: &GpaRun) {
        vmalloc::purge_lazy_aliases(run.gpa.0, run.gpa_end().0, engine().platform().cc_mask());
    }
    fn flush_tlb_all(&self) {
        shootdown::flush_all_cpus();
    }
    fn flush_caches(&self, _run: &GpaRun) {
        // WBINVD covers every line; a range flush with CLFLUSHOPT would be
        // cheaper for small runs but needs the run mapped, which it is not.
        bare::cpu::wbinvd();
    }
    fn on_step(&self, step: Step, direction: Direction, va: VirtAddr, pages: u64) {
        if TRACE.load(Ordering::Relaxed) {
            let tables = engine().tables();
            let leaf = tables.lookup_address(va).ok();
            let state = leaf.map(|l| {
                (
                    l.entry.is_present(),
                    engine().platform().cc_mask().is_shared(l.entry),
                )
            });
            println!("  step {} {step:?} ({direction:?}, {pages} page(s) at {va}): entry before the step (present, shared) = {state:?}", step as u8);
        }
    }
}

/// Print each step of conversions while set (for `make run`).
pub static TRACE: AtomicBool = AtomicBool::new(false);

/// The platform this kernel runs on (an ordinary VM so far).
pub type GuestPlatform = NoCc;

/// The engine type.
pub type Engine = Converter<DirectMap, &'static FrameAllocator, GuestMachine, GuestPlatform>;

static ENGINE: spin::Once<Engine> = spin::Once::new();

/// Creates the engine over the live tables rooted at `root`.
pub fn init(root: PhysAddr, platform: GuestPlatform) -> &'static Engine {
    ENGINE.call_once(|| {
        Converter::new(
            DirectMap,
            root,
            PagingMode::FourLevel,
            &FRAMES,
            GuestMachine,
            platform,
        )
    })
}

/// The engine (after `init`).
pub fn engine() -> &'static Engine {
    ENGINE.get().expect("engine used before init")
}
