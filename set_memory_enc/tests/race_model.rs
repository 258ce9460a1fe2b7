//! The race this crate exists for, as an exhaustive model check.
//!
//! One CPU runs the real engine converting page B. Another CPU, simulated,
//! runs `load_unaligned_zeropad()` across the boundary from page A into B,
//! and sometimes through an alias of B; it has a TLB that keeps translations
//! until they are flushed or spontaneously evicted. The machine raises #VE
//! when a present entry's shared bit disagrees with the page's state in the
//! (fake) TDX module, and #PF when the entry is not present (which the
//! zeropad fixup absorbs).
//!
//! The engine runs on its own thread and stops before every action another
//! CPU could observe: every page-table write (the simulated memory's write
//! hook), every TDCALL (the fake TDX module's call hook) and every TLB flush.
//! The checker enumerates every interleaving of those actions with the
//! loader's loads and evictions, by replaying choice prefixes (stateless
//! depth-first search).
//!
//! (a) The seven-step order: zero #VE in every interleaving, and the #PF
//!     window is actually hit.
//! (b) The legacy order (flip, flush, notify): at least one #VE.
//! (c) The seven steps with a shootdown that does not flush, or with the
//!     alias left mapped: at least one #VE, so the model can see both.

use coco_pagetable::sim::SimMemory;
use coco_pagetable::{
    CcMask, Level, PageTables, PagingMode, PhysAddr, Pte, PteFlags, VirtAddr, PAGE_SIZE,
};
use set_memory_enc::platform::Tdx;
use set_memory_enc::{Converter, Direction, GpaRun, Machine};
use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use tdx_hypercall::sim::{FakeTdxModule, PageState};
use tdx_hypercall::Gpa;

const PAGE_A: u64 = 0xffff_8880_0010_0000;
const PAGE_B: u64 = PAGE_A + PAGE_SIZE;
const ALIAS_B: u64 = 0xffff_c900_0000_0000;
const FRAME_A: u64 = 0x10_0000;
const FRAME_B: u64 = 0x10_1000;
const LOADS: u32 = 3;
const EVICTIONS: u32 = 1;

/// One simulated memory shared by the engine, the loader and the hooks.
type Memory = Arc<SimMemory>;

/// Hands control back and forth between the checker and the engine thread,
/// so that exactly one of them runs at a time.
#[derive(Default)]
struct Baton {
    state: Mutex<BatonState>,
    changed: Condvar,
}

#[derive(Default)]
struct BatonState {
    /// The engine is stopped at a pause, waiting for a grant.
    parked: bool,
    /// A grant is outstanding: the engine may run to its next pause.
    granted: bool,
    /// The conversion returned.
    done: bool,
}

impl Baton {
    /// Engine side: stop before an observable action until granted.
    fn pause(&self) {
        let mut s = self.state.lock().unwrap();
        s.parked = true;
        s.granted = false;
        self.changed.notify_all();
        while !s.granted {
            s = self.changed.wait(s).unwrap();
        }
        s.parked = false;
    }
    /// Engine side: the conversion returned.
    fn finish(&self) {
        let mut s = self.state.lock().unwrap();
        s.done = true;
        s.granted = false;
        self.changed.notify_all();
    }
    /// Checker side: wait until the engine is parked or done.
    fn wait_ready(&self) {
        let mut s = self.state.lock().unwrap();
        while !(s.parked || s.done) {
            s = self.changed.wait(s).unwrap();
        }
    }
    /// Checker side: let the engine run to its next pause (or the end).
    fn grant(&self) {
        self.wait_ready();
        let mut s = self.state.lock().unwrap();
        if s.done {
            return;
        }
        s.granted = true;
        s.parked = false;
        self.changed.notify_all();
        while !(s.parked || s.done) {
            s = self.changed.wait(s).unwrap();
        }
    }
    fn engine_done(&self) -> bool {
        self.state.lock().unwrap().done
    }
}

/// The simulated loader CPU's TLB: page VA -> cached entry.
type Tlb = Arc<Mutex<HashMap<u64, Pte>>>;

/// The engine's view of the machine: removing the alias unmaps it, and the
/// global shootdown empties the loader's TLB once every CPU acknowledges.
struct ModelMachine {
    tables: PageTables<Memory>,
    tlb: Tlb,
    baton: Arc<Baton>,
    broken: Broken,
}

/// Deliberately broken machines: the seven steps are only as good as the
/// hooks, and the model must be able to tell.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Broken {
    Nothing,
    /// The shootdown returns without flushing the other CPU.
    NoShootdown,
    /// Step 1 leaves the alias mapped.
    AliasKept,
}

impl Machine for ModelMachine {
    fn remove_aliases(&self, run: &GpaRun) {
        if self.broken != Broken::AliasKept && run.gpa.0 <= FRAME_B && FRAME_B < run.gpa_end().0 {
            // The unmap is a page-table write: the write hook pauses there.
            let _ = self.tables.unmap_leaf(VirtAddr(ALIAS_B));
        }
    }
    fn flush_tlb_all(&self) {
        self.baton.pause();
        if self.broken != Broken::NoShootdown {
            self.tlb.lock().unwrap().clear();
        }
    }
    fn flush_caches(&self, _run: &GpaRun, _direction: Direction) {}
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Order {
    SevenStep,
    Legacy,
}

#[derive(Clone, Copy, Debug)]
enum Choice {
    Engine,
    LoadAcross,
    LoadAlias,
    Evict,
}

#[derive(Default, Debug)]
struct Tally {
    interleavings: u64,
    ve: u64,
    zeropad_fixups: u64,
    loads: u64,
    /// One choice sequence that raised #VE, for the report.
    first_ve: Option<Vec<Choice>>,
}

/// The loader's CPU: what one 8-byte load touching `page` does.
enum Access {
    Ok,
    PageFault,
    VirtualizationException,
}

fn access(tables: &PageTables<Memory>, tlb: &Tlb, tdx: &FakeTdxModule, page: u64) -> Access {
    let cc = tables.cc_mask();
    let cached = tlb.lock().unwrap().get(&page).copied();
    let entry = match cached {
        Some(entry) => entry,
        None => match tables.lookup_address(VirtAddr(page)) {
            Ok(leaf) if leaf.entry.is_present() => {
                tlb.lock().unwrap().insert(page, leaf.entry);
                leaf.entry
            }
            _ => return Access::PageFault,
        },
    };
    let frame = cc.leaf_frame(entry, Level::Pt);
    let mapped_shared = cc.is_shared(entry);
    match (mapped_shared, tdx.state(Gpa(frame.0))) {
        (true, PageState::Shared) | (false, PageState::Private) => Access::Ok,
        _ => Access::VirtualizationException,
    }
}

/// Runs one execution following `prefix`, then choosing the first option;
/// returns every decision as (chosen, number of options).
fn execute(
    order: Order,
    broken: Broken,
    direction: Direction,
    prefix: &[usize],
    tally: &mut Tally,
) -> Vec<(usize, usize)> {
    let memory: Memory = Arc::new(SimMemory::new(PhysAddr(0x10_0000_0000), 8));
    let root = memory.allocate_zeroed();
    let tdx = Arc::new(FakeTdxModule::new(48, 16 << 20));
    let platform = Tdx::new(tdx.clone()).unwrap();
    let cc: CcMask = set_memory_enc::Platform::cc_mask(&platform);
    // SAFETY: a zeroed root of the simulated memory (and for the two below).
    let tables = unsafe { PageTables::new(memory.clone(), root, PagingMode::FourLevel, cc) };
    let flags = PteFlags::PRESENT | PteFlags::WRITABLE | PteFlags::NO_EXECUTE;
    let start_shared = direction == Direction::ToPrivate;
    tables
        .map_leaf(
            VirtAddr(PAGE_A),
            PhysAddr(FRAME_A),
            Level::Pt,
            flags,
            false,
            &memory,
        )
        .unwrap();
    tables
        .map_leaf(
            VirtAddr(PAGE_B),
            PhysAddr(FRAME_B),
            Level::Pt,
            flags,
            start_shared,
            &memory,
        )
        .unwrap();
    tables
        .map_leaf(
            VirtAddr(ALIAS_B),
            PhysAddr(FRAME_B),
            Level::Pt,
            flags,
            start_shared,
            &memory,
        )
        .unwrap();
    if start_shared {
        tdx.set_state(Gpa(FRAME_B)..Gpa(FRAME_B + PAGE_SIZE), PageState::Shared);
    }

    let baton = Arc::new(Baton::default());
    let tlb: Tlb = Arc::default();
    let machine = ModelMachine {
        // SAFETY: as above.
        tables: unsafe { PageTables::new(memory.clone(), root, PagingMode::FourLevel, cc) },
        tlb: tlb.clone(),
        baton: baton.clone(),
        broken,
    };
    // SAFETY: as above; the memory also allocates.
    let engine = unsafe {
        Converter::new(
            memory.clone(),
            root,
            PagingMode::FourLevel,
            memory.clone(),
            machine,
            platform,
        )
    };
    let pause = baton.clone();
    memory.set_write_hook(Some(Box::new(move |_, _, _, _| pause.pause())));
    let pause = baton.clone();
    tdx.set_call_hook(Box::new(move |_| pause.pause()));

    let worker_baton = baton.clone();
    let worker = std::thread::spawn(move || {
        // Wait for the first grant before touching anything.
        worker_baton.pause();
        let result = match order {
            Order::SevenStep => engine.convert(VirtAddr(PAGE_B), 1, direction),
            Order::Legacy => engine.convert_in_legacy_order(VirtAddr(PAGE_B), 1, direction),
        };
        worker_baton.finish();
        result
    });
    baton.wait_ready();

    let mut decisions = Vec::new();
    let mut taken = Vec::new();
    let (mut loads_left, mut evictions_left) = (LOADS, EVICTIONS);
    let mut saw_ve = false;
    loop {
        let mut options = Vec::new();
        if !baton.engine_done() {
            options.push(Choice::Engine);
        }
        if loads_left > 0 {
            options.push(Choice::LoadAcross);
            options.push(Choice::LoadAlias);
        }
        if evictions_left > 0 && !tlb.lock().unwrap().is_empty() {
            options.push(Choice::Evict);
        }
        if options.is_empty() {
            break;
        }
        let depth = decisions.len();
        let chosen = prefix.get(depth).copied().unwrap_or(0);
        decisions.push((chosen, options.len()));
        taken.push(options[chosen]);
        match options[chosen] {
            Choice::Engine => baton.grant(),
            Choice::Evict => {
                evictions_left -= 1;
                tlb.lock().unwrap().clear();
            }
            load => {
                loads_left -= 1;
                tally.loads += 1;
                // Page A is private and stays so: the load's first half.
                let page = if matches!(load, Choice::LoadAcross) {
                    PAGE_B
                } else {
                    ALIAS_B
                };
                match access(&tables, &tlb, &tdx, page) {
                    Access::Ok => {}
                    Access::PageFault => tally.zeropad_fixups += 1,
                    Access::VirtualizationException => {
                        tally.ve += 1;
                        saw_ve = true;
                    }
                }
            }
        }
    }
    let result = worker.join().unwrap();
    assert!(result.is_ok(), "{order:?} {direction:?}: {result:?}");
    let target = match direction {
        Direction::ToShared => PageState::Shared,
        Direction::ToPrivate => PageState::Private,
    };
    assert_eq!(tdx.state(Gpa(FRAME_B)), target);
    tally.interleavings += 1;
    if saw_ve && tally.first_ve.is_none() {
        tally.first_ve = Some(taken);
    }
    decisions
}

/// Every interleaving, by depth-first search over the decisions.
fn explore(order: Order, broken: Broken, direction: Direction) -> Tally {
    let mut tally = Tally::default();
    let mut prefix: Vec<usize> = Vec::new();
    loop {
        let decisions = execute(order, broken, direction, &prefix, &mut tally);
        // Backtrack: the deepest decision with an untried option.
        let Some(depth) = decisions
            .iter()
            .rposition(|&(chosen, options)| chosen + 1 < options)
        else {
            break;
        };
        prefix = decisions[..depth]
            .iter()
            .map(|&(chosen, _)| chosen)
            .collect();
        prefix.push(decisions[depth].0 + 1);
    }
    println!(
        "{order:?} order, {broken:?} broken, {direction:?}: {} interleavings explored, {} loads, {} #VE, {} zeropad #PF fixups",
        tally.interleavings, tally.loads, tally.ve, tally.zeropad_fixups
    );
    tally
}

#[test]
fn seven_step_order_never_raises_ve() {
    for direction in [Direction::ToShared, Direction::ToPrivate] {
        let tally = explore(Order::SevenStep, Broken::Nothing, direction);
        assert_eq!(tally.ve, 0, "{direction:?}: #VE in {:?}", tally.first_ve);
        assert!(
            tally.zeropad_fixups > 0,
            "{direction:?}: the non-present window was never hit"
        );
        assert!(
            tally.interleavings > 1000,
            "{direction:?}: too few interleavings to mean anything"
        );
    }
}

#[test]
fn legacy_order_raises_ve() {
    for direction in [Direction::ToShared, Direction::ToPrivate] {
        let tally = explore(Order::Legacy, Broken::Nothing, direction);
        assert!(
            tally.ve > 0,
            "{direction:?}: the negative control found no #VE"
        );
        println!("  first #VE: {:?}", tally.first_ve.unwrap());
    }
}

/// The model sees the TLB and the alias: break either and the seven-step
/// order is caught too.
#[test]
fn seven_step_order_with_a_broken_machine_raises_ve() {
    for broken in [Broken::NoShootdown, Broken::AliasKept] {
        for direction in [Direction::ToShared, Direction::ToPrivate] {
            let tally = explore(Order::SevenStep, broken, direction);
            assert!(tally.ve > 0, "{broken:?} {direction:?}: not caught");
        }
    }
}
