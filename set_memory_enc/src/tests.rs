//! Engine tests over simulated page tables. The hooks inspect the entries at
//! the moment each step runs, so the order is checked on real state, not on
//! what the engine says it did.

use crate::platform::{NoCc, Tdx, TdxError};
use crate::sim::{Event, EventLog, RecordingMachine, RecordingPlatform};
use crate::*;
use coco_pagetable::sim::SimMemory;
use coco_pagetable::{Level, PagingMode};
use std::sync::{Arc, Mutex};
use tdx_hypercall::sim::{FakeTdxModule, PageState};
use tdx_hypercall::{AcceptError, AcceptSize, Gpa, MapGpaErrorKind, VmcallStatus};

const MIB2: u64 = 2 << 20;
const GIB: u64 = 1 << 30;
/// Direct map: 64 MiB of 2M leaves.
const DMAP: u64 = 0xffff_8880_0000_0000;
const DMAP_BYTES: u64 = 32 * MIB2;
/// One 1G leaf mapping GPA 1G.
const HUGE: u64 = 0xffff_c000_0000_0000;
/// 16 4K leaves: 8 frames at CHUNK_A then 8 at CHUNK_B (two GPA runs).
const VMAP: u64 = 0xffff_c900_0000_0000;
const CHUNK_A: u64 = 0x1000_0000;
const CHUNK_B: u64 = 0x3000_0000;
const TABLES_AT: u64 = 0x10_0000_0000;

type Engine<P> =
    Converter<&'static SimMemory, &'static SimMemory, RecordingMachine, RecordingPlatform<P>>;

struct World<P> {
    mem: &'static SimMemory,
    engine: Engine<P>,
    log: EventLog,
}

fn flags() -> PteFlags {
    PteFlags::PRESENT | PteFlags::WRITABLE | PteFlags::NO_EXECUTE | PteFlags::GLOBAL
}

fn world<P: Platform>(platform: P) -> World<P> {
    world_with_frames(platform, 64)
}

fn world_with_frames<P: Platform>(platform: P, frames: usize) -> World<P> {
    let mem: &'static SimMemory = Box::leak(Box::new(SimMemory::new(PhysAddr(TABLES_AT), frames)));
    let root = mem.allocate_zeroed();
    let log = EventLog::default();
    let machine = RecordingMachine { log: log.clone() };
    let platform = RecordingPlatform {
        inner: platform,
        log: log.clone(),
    };
    // SAFETY: a zeroed root of the simulated memory, which also allocates.
    let engine =
        unsafe { Converter::new(mem, root, PagingMode::FourLevel, mem, machine, platform) };
    let pt = engine.tables();
    for i in 0..DMAP_BYTES / MIB2 {
        pt.map_leaf(
            VirtAddr(DMAP + i * MIB2),
            PhysAddr(i * MIB2),
            Level::Pd,
            flags(),
            false,
            &mem,
        )
        .unwrap();
    }
    pt.map_leaf(
        VirtAddr(HUGE),
        PhysAddr(GIB),
        Level::Pdpt,
        flags(),
        false,
        &mem,
    )
    .unwrap();
    for i in 0..16u64 {
        let frame = if i < 8 {
            CHUNK_A + i * PAGE_SIZE
        } else {
            CHUNK_B + (i - 8) * PAGE_SIZE
        };
        pt.map_leaf(
            VirtAddr(VMAP + i * PAGE_SIZE),
            PhysAddr(frame),
            Level::Pt,
            flags(),
            false,
            &mem,
        )
        .unwrap();
    }
    World { mem, engine, log }
}

fn tdx_fake() -> Arc<FakeTdxModule> {
    Arc::new(FakeTdxModule::new(48, 4 * GIB))
}

fn tdx_platform(fake: &Arc<FakeTdxModule>) -> Tdx<Arc<FakeTdxModule>> {
    Tdx::new(fake.clone()).unwrap()
}

/// Every leaf overlapping `[va, va + bytes)`.
fn leaves<P: Platform>(w: &World<P>, va: u64, bytes: u64) -> Vec<Leaf> {
    let mut out = Vec::new();
    let mut at = va;
    while at < va + bytes {
        let leaf = w.engine.tables().lookup_address(VirtAddr(at)).unwrap();
        at = leaf.end();
        out.push(leaf);
    }
    out
}

/// (present, shared) of every leaf in the range, all equal, or panics.
fn state<P: Platform>(w: &World<P>, va: u64, bytes: u64) -> (bool, bool) {
    let cc = w.engine.tables().cc_mask();
    let all: Vec<_> = leaves(w, va, bytes)
        .iter()
        .map(|l| (l.entry.is_present(), cc.is_shared(l.entry)))
        .collect();
    assert!(all.windows(2).all(|p| p[0] == p[1]), "mixed states {all:?}");
    all[0]
}

/// Installs a hook that records (event, present, shared) of the range at
/// every hook call.
fn watch<P: Platform + 'static>(
    w: &World<P>,
    va: u64,
    bytes: u64,
) -> Arc<Mutex<Vec<(Event, bool, bool)>>>
where
    P::Error: 'static,
{
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (mem, root, cc) = (w.mem, w.engine.tables().root(), w.engine.tables().cc_mask());
    let out = seen.clone();
    w.log.set_hook(Some(Arc::new(move |event: &Event| {
        // SAFETY: the engine's own tables, in the simulated memory.
        let pt = unsafe { PageTables::new(mem, root, PagingMode::FourLevel, cc) };
        let mut at = va;
        let mut states = Vec::new();
        while at < va + bytes {
            let leaf = pt.lookup_address(VirtAddr(at)).unwrap();
            states.push((leaf.entry.is_present(), cc.is_shared(leaf.entry)));
            at = leaf.end();
        }
        assert!(
            states.windows(2).all(|p| p[0] == p[1]),
            "mixed {states:?} at {event:?}"
        );
        out.lock().unwrap().push((*event, states[0].0, states[0].1));
    })));
    seen
}

struct Case {
    name: &'static str,
    va: u64,
    pages: u64,
    /// Number of contiguous GPA runs.
    runs: usize,
    /// Leaves touched.
    leaves: u64,
    splits: u32,
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "one page",
            va: DMAP + 5 * MIB2 + 3 * PAGE_SIZE,
            pages: 1,
            runs: 1,
            leaves: 1,
            splits: 1,
        },
        Case {
            name: "many pages, two GPA runs",
            va: VMAP,
            pages: 16,
            runs: 2,
            leaves: 16,
            splits: 0,
        },
        Case {
            name: "whole aligned 2M",
            va: DMAP + 8 * MIB2,
            pages: 512,
            runs: 1,
            leaves: 1,
            splits: 0,
        },
        Case {
            name: "half of a 2M",
            va: DMAP + 10 * MIB2 + MIB2 / 2,
            pages: 256,
            runs: 1,
            leaves: 256,
            splits: 1,
        },
        Case {
            name: "2M leaves and a straddled one",
            va: DMAP + 12 * MIB2,
            pages: 2 * 512 + 1,
            runs: 1,
            leaves: 3,
            splits: 1,
        },
        Case {
            name: "whole 1G",
            va: HUGE,
            pages: GIB / PAGE_SIZE,
            runs: 1,
            leaves: 1,
            splits: 0,
        },
    ]
}

/// Runs one conversion and checks that the entries were in the right state
/// at each hook, for each step.
fn check_order<P: Platform + 'static>(
    w: &World<P>,
    case: &Case,
    direction: Direction,
    cache_flush: bool,
) where
    P::Error: 'static,
{
    let bytes = case.pages * PAGE_SIZE;
    let from_shared = direction == Direction::ToPrivate;
    let before_leaves: Vec<_> = leaves(w, DMAP, DMAP_BYTES)
        .iter()
        .map(|l| (l.va, l.level()))
        .collect();
    w.log.clear();
    let seen = watch(w, case.va, bytes);
    let stats = w
        .engine
        .convert(VirtAddr(case.va), case.pages, direction)
        .unwrap();
    w.log.set_hook(None);
    let what = format!("{} {:?}", case.name, direction);

    let mut expected_steps = vec![1, 2, 3, 5, 6, 7];
    if cache_flush {
        expected_steps.insert(3, 4);
    }
    assert_eq!(w.log.steps(), expected_steps, "{what}");
    let splits = if direction == Direction::ToShared {
        case.splits
    } else {
        0
    };
    assert_eq!(
        stats.splits, splits,
        "{what}: split only on first conversion"
    );
    assert_eq!(stats.leaves, case.leaves, "{what}");
    assert_eq!(stats.runs as usize, case.runs, "{what}");

    let seen = seen.lock().unwrap().clone();
    let mut step = 0;
    let mut flushes = 0;
    let mut notifies = 0;
    let mut gpa_pages = 0;
    for (event, present, shared) in &seen {
        match event {
            Event::Step(s, d) => {
                assert_eq!(*d, direction);
                step = *s as u8;
            }
            Event::RemoveAliases(_) => {
                assert_eq!(
                    (step, *present, *shared),
                    (1, true, from_shared),
                    "{what}: aliases go first, while mapped as before"
                )
            }
            Event::FlushTlb => {
                flushes += 1;
                assert_eq!(
                    (step, *present, *shared),
                    (3, false, from_shared),
                    "{what}: flush after PRESENT cleared, before the flip"
                )
            }
            Event::FlushCaches(_, d) => {
                assert_eq!(*d, direction, "{what}");
                assert_eq!((step, *present, *shared), (4, false, from_shared), "{what}")
            }
            Event::Notify(run, d) => {
                notifies += 1;
                gpa_pages += run.pages();
                assert_eq!(*d, direction);
                assert_eq!(
                    (step, *present, *shared),
                    (6, false, !from_shared),
                    "{what}: hypervisor told while non-present and flipped"
                )
            }
        }
    }
    assert_eq!(flushes, 1, "{what}: one global shootdown per call");
    assert_eq!(notifies, case.runs, "{what}: one notification per GPA run");
    assert_eq!(gpa_pages, case.pages, "{what}");
    assert_eq!(
        state(w, case.va, bytes),
        (true, !from_shared),
        "{what}: present again, flipped"
    );
    // The straddled 2M leaf became 512 leaves; nothing else changed size.
    let after: Vec<_> = leaves(w, DMAP, DMAP_BYTES)
        .iter()
        .map(|l| (l.va, l.level()))
        .collect();
    if case.va >= DMAP && case.va < DMAP + DMAP_BYTES {
        assert_eq!(
            after.len(),
            before_leaves.len() + 511 * splits as usize,
            "{what}"
        );
    } else {
        assert_eq!(before_leaves, after, "{what}");
    }
}

/// Every case both ways; step 4 runs where the platform says it must.
fn check_all_orders<P: Platform + 'static>(w: &World<P>)
where
    P::Error: 'static,
{
    for case in cases() {
        for direction in [Direction::ToShared, Direction::ToPrivate] {
            let flush = w.engine.platform().needs_cache_flush(direction);
            check_order(w, &case, direction, flush);
        }
    }
}

#[test]
fn seven_steps_in_order_none_platform() {
    let w = world(NoCc);
    assert!(!w.engine.platform().needs_cache_flush(Direction::ToShared));
    assert!(!w.engine.platform().needs_cache_flush(Direction::ToPrivate));
    check_all_orders(&w);
}

#[test]
fn seven_steps_in_order_tdx_platform() {
    let fake = tdx_fake();
    let w = world(tdx_platform(&fake));
    assert!(w.engine.platform().needs_cache_flush(Direction::ToShared));
    assert!(!w.engine.platform().needs_cache_flush(Direction::ToPrivate));
    check_all_orders(&w);
}

#[test]
fn tdx_hypervisor_sees_the_frames_from_the_entries() {
    let fake = tdx_fake();
    let w = world(tdx_platform(&fake));
    let one_g = GIB / PAGE_SIZE;
    w.engine.set_memory_shared(VirtAddr(HUGE), one_g).unwrap();
    w.engine.set_memory_shared(VirtAddr(VMAP), 16).unwrap();
    for gpa in [
        GIB,
        GIB + GIB / 2,
        2 * GIB - PAGE_SIZE,
        CHUNK_A,
        CHUNK_A + 7 * PAGE_SIZE,
        CHUNK_B + 7 * PAGE_SIZE,
    ] {
        assert_eq!(fake.state(Gpa(gpa)), PageState::Shared, "{gpa:#x}");
    }
    assert_eq!(fake.state(Gpa(CHUNK_A + 8 * PAGE_SIZE)), PageState::Private);
    assert_eq!(fake.state(Gpa(CHUNK_B + 8 * PAGE_SIZE)), PageState::Private);
    w.engine.set_memory_private(VirtAddr(HUGE), one_g).unwrap();
    assert_eq!(fake.state(Gpa(GIB + 12345 * PAGE_SIZE)), PageState::Private);
    let c = w.engine.platform().inner.counters();
    // A whole 1G leaf is accepted at 1G, once.
    assert_eq!(c.accepted[2].load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(c.accepted[0].load(std::sync::atomic::Ordering::Relaxed), 0);
}

#[test]
fn tdx_large_range_survives_retry_every_64mib_and_refused_2m_accept() {
    let fake = tdx_fake();
    fake.retry_every(64 << 20);
    fake.refuse_sizes_above(AcceptSize::Size4K);
    let w = world(tdx_platform(&fake));
    let pages = GIB / PAGE_SIZE;
    w.engine.set_memory_shared(VirtAddr(HUGE), pages).unwrap();
    w.engine.set_memory_private(VirtAddr(HUGE), pages).unwrap();
    assert_eq!(state(&w, HUGE, GIB), (true, false));
    let c = w.engine.platform().inner.counters();
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    // 1 GiB in 64 MiB chunks: 16 calls each way, 15 of them answered RETRY.
    assert_eq!(load(&c.map_gpa_calls), 32);
    assert_eq!(load(&c.map_gpa_retries), 30);
    assert_eq!(load(&c.accepted[0]), pages);
    assert_eq!(load(&c.accepted[2]), 0);
    assert_eq!(fake.state(Gpa(2 * GIB - PAGE_SIZE)), PageState::Private);
}

type Outcome = Result<ConvStats, ConvError<TdxError>>;

/// Every bad input: its error, not one word of table memory written, and no
/// hook called.
#[test]
fn bad_inputs_change_nothing() {
    let fake = tdx_fake();
    let w = world(tdx_platform(&fake));
    w.engine
        .set_memory_shared(VirtAddr(DMAP + 20 * MIB2), 512)
        .unwrap();
    w.engine
        .set_memory_shared(VirtAddr(VMAP + 2 * PAGE_SIZE), 1)
        .unwrap();
    let tdcalls = fake.calls().len();
    w.log.clear();
    let before = w.mem.snapshot();
    let e = &w.engine;
    let shared = Direction::ToShared;
    let cases: Vec<(&str, Outcome, ConvError<TdxError>)> = vec![
        (
            "unaligned",
            e.convert(VirtAddr(DMAP + 8), 1, shared),
            ConvError::Unaligned(VirtAddr(DMAP + 8)),
        ),
        (
            "zero length",
            e.convert(VirtAddr(DMAP), 0, shared),
            ConvError::ZeroLength,
        ),
        (
            "overflowing length",
            e.convert(VirtAddr(DMAP), u64::MAX / 2, shared),
            ConvError::Overflow,
        ),
        (
            "wraps past 2^64",
            e.convert(VirtAddr(0xffff_ffff_ffff_f000), 1, shared),
            ConvError::Overflow,
        ),
        (
            "non-canonical",
            e.convert(VirtAddr(0x0000_9000_0000_0000), 1, shared),
            ConvError::NonCanonical(VirtAddr(0x0000_9000_0000_0000)),
        ),
        (
            "crosses the hole",
            e.convert(VirtAddr(0x0000_7fff_ffff_f000), 2, shared),
            ConvError::NonCanonical(VirtAddr(0x0000_8000_0000_0fff)),
        ),
        (
            "not mapped",
            e.convert(VirtAddr(0xffff_d000_0000_0000), 1, shared),
            ConvError::NotMapped(VirtAddr(0xffff_d000_0000_0000)),
        ),
        (
            "runs past the mapping",
            e.convert(VirtAddr(DMAP + DMAP_BYTES - PAGE_SIZE), 2, shared),
            ConvError::NotMapped(VirtAddr(DMAP + DMAP_BYTES)),
        ),
        (
            "wholly in target state",
            e.convert(VirtAddr(DMAP + 20 * MIB2), 512, shared),
            ConvError::AlreadyInTargetState(VirtAddr(DMAP + 20 * MIB2)),
        ),
        (
            "partly in target state (2M)",
            e.convert(VirtAddr(DMAP + 19 * MIB2 + MIB2 / 2), 512, shared),
            ConvError::AlreadyInTargetState(VirtAddr(DMAP + 20 * MIB2)),
        ),
        (
            "partly in target state (4K)",
            e.convert(VirtAddr(VMAP), 4, shared),
            ConvError::AlreadyInTargetState(VirtAddr(VMAP + 2 * PAGE_SIZE)),
        ),
        (
            "private to private",
            e.convert(VirtAddr(DMAP), 512, Direction::ToPrivate),
            ConvError::AlreadyInTargetState(VirtAddr(DMAP)),
        ),
    ];
    for (name, got, want) in cases {
        assert_eq!(got, Err(want), "{name}");
        assert!(before == w.mem.snapshot(), "{name}: table memory changed");
    }
    assert_eq!(
        w.log.events(),
        vec![],
        "no hook may run for a refused conversion"
    );
    assert_eq!(
        fake.calls().len(),
        tdcalls,
        "no TDCALL for a refused conversion"
    );
}

#[test]
fn non_present_entry_in_range_is_refused() {
    let w = world(NoCc);
    let leaf = w
        .engine
        .tables()
        .lookup_address(VirtAddr(VMAP + 5 * PAGE_SIZE))
        .unwrap();
    w.engine
        .tables()
        .update_leaf(&leaf, |e| Pte(e.0 & !1))
        .unwrap();
    let before = w.mem.snapshot();
    assert_eq!(
        w.engine.set_memory_shared(VirtAddr(VMAP), 16),
        Err(ConvError::NotPresent(VirtAddr(VMAP + 5 * PAGE_SIZE)))
    );
    assert!(before == w.mem.snapshot());
}

#[test]
fn out_of_table_memory_for_a_split_changes_nothing() {
    // Root, one PDPT and one PD for the direct map, PDPT for HUGE, PDPT+PD+PT
    // for VMAP: 7 frames, none left for a split.
    let w = world_with_frames(NoCc, 7);
    assert_eq!(w.mem.free_frames(), 0);
    let before = w.mem.snapshot();
    assert_eq!(
        w.engine.set_memory_shared(VirtAddr(DMAP + PAGE_SIZE), 1),
        Err(ConvError::OutOfTableMemory)
    );
    assert!(before == w.mem.snapshot());
    assert!(w.log.events().is_empty());
    // A whole 2M needs no split and still works.
    w.engine.set_memory_shared(VirtAddr(DMAP), 512).unwrap();
}

#[test]
fn split_reservation_is_returned_when_another_split_wins() {
    let w = world(NoCc);
    let free = w.mem.free_frames();
    // Counted before splitting: the start needs 1G -> 2M -> 4K (2), the end,
    // inside the 1G leaf, needs 1. But the start's 1G split also serves the
    // 2M-aligned end, so only 2 of the 3 reserved frames are used.
    assert_eq!(
        w.engine
            .tables()
            .splits_needed_at(VirtAddr(HUGE + MIB2 - PAGE_SIZE)),
        Ok(2)
    );
    assert_eq!(
        w.engine.tables().splits_needed_at(VirtAddr(HUGE + MIB2)),
        Ok(1)
    );
    let stats = w
        .engine
        .set_memory_shared(VirtAddr(HUGE + MIB2 - PAGE_SIZE), 1)
        .unwrap();
    assert_eq!(stats.splits, 2);
    assert_eq!(
        w.mem.free_frames(),
        free - 2,
        "the unused reserved frame came back"
    );
}

#[test]
fn overlapping_conversion_is_busy_and_disjoint_one_proceeds() {
    let w = Arc::new(world(NoCc));
    let inner = w.clone();
    let results = Arc::new(Mutex::new(Vec::new()));
    let out = results.clone();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let once = done.clone();
    // While the outer conversion is between steps 3 and 5, another CPU asks.
    w.log.set_hook(Some(Arc::new(move |event: &Event| {
        if *event == Event::FlushTlb && !once.swap(true, std::sync::atomic::Ordering::SeqCst) {
            let before = inner.mem.snapshot();
            let overlapping = inner
                .engine
                .set_memory_shared(VirtAddr(VMAP + 15 * PAGE_SIZE), 1);
            let unchanged = before == inner.mem.snapshot();
            let disjoint = inner.engine.set_memory_shared(VirtAddr(DMAP), 512);
            out.lock().unwrap().push((overlapping, unchanged, disjoint));
        }
    })));
    w.engine.set_memory_shared(VirtAddr(VMAP), 16).unwrap();
    w.log.set_hook(None);
    let results = results.lock().unwrap();
    let (overlapping, unchanged, disjoint) = &results[0];
    assert_eq!(
        *overlapping,
        Err(ConvError::Busy {
            start: VirtAddr(VMAP),
            end: VirtAddr(VMAP + 16 * PAGE_SIZE)
        })
    );
    assert!(unchanged);
    assert!(disjoint.is_ok());
    assert_eq!(state(&w, VMAP, 16 * PAGE_SIZE), (true, true));
    assert_eq!(state(&w, DMAP, MIB2), (true, true));
}

#[test]
fn stopped_conversions_are_refused() {
    let w = world(NoCc);
    w.engine.set_memory_shared(VirtAddr(DMAP), 1).unwrap();
    w.engine.stop_conversions();
    assert!(w.engine.conversions_stopped());
    let before = w.mem.snapshot();
    assert_eq!(
        w.engine.set_memory_private(VirtAddr(DMAP), 1),
        Err(ConvError::Stopped)
    );
    assert_eq!(
        w.engine.set_memory_shared(VirtAddr(VMAP), 1),
        Err(ConvError::Stopped)
    );
    assert!(before == w.mem.snapshot());
}

#[test]
fn disjoint_ranges_convert_concurrently() {
    let w = Arc::new(world(NoCc));
    let threads: Vec<_> = (0..4u64)
        .map(|cpu| {
            let w = w.clone();
            std::thread::spawn(move || {
                // Each CPU owns a quarter of one 2M leaf: they race to split it.
                let va = VirtAddr(DMAP + 3 * MIB2 + cpu * MIB2 / 4);
                for _ in 0..200 {
                    w.engine.set_memory_shared(va, 128).unwrap();
                    w.engine.set_memory_private(va, 128).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(state(&w, DMAP + 3 * MIB2, MIB2), (true, false));
    assert_eq!(leaves(&w, DMAP + 3 * MIB2, MIB2).len(), 512, "split once");
    let flushes = w
        .log
        .events()
        .iter()
        .filter(|e| **e == Event::FlushTlb)
        .count();
    assert_eq!(flushes, 4 * 400);
}

fn quarantine_of(result: Result<ConvStats, ConvError<TdxError>>) -> Quarantine<TdxError> {
    match result {
        Err(ConvError::Quarantined(q)) => q,
        other => panic!("expected a quarantine, got {other:?}"),
    }
}

/// A TD whose MapGPA converts 2 pages per call and fails at CHUNK_A + 5
/// pages: converting VMAP's 8 pages of CHUNK_A then 8 of CHUNK_B, pages 0..4
/// are known shared.
fn world_with_map_gpa_failing_mid_first_run() -> (Arc<FakeTdxModule>, World<Tdx<Arc<FakeTdxModule>>>)
{
    let fake = tdx_fake();
    fake.retry_every(2 * PAGE_SIZE);
    fake.fail_map_at(
        Gpa(CHUNK_A + 5 * PAGE_SIZE),
        VmcallStatus::InvalidOperand.raw(),
    );
    let w = world(tdx_platform(&fake));
    (fake, w)
}

#[test]
fn map_gpa_failure_mid_range_quarantines_exactly_the_unknown_pages() {
    let (fake, w) = world_with_map_gpa_failing_mid_first_run();
    let q = quarantine_of(w.engine.set_memory_shared(VirtAddr(VMAP), 16));
    assert_eq!(q.va, VirtAddr(VMAP + 4 * PAGE_SIZE));
    assert_eq!(q.gpa, PhysAddr(CHUNK_A + 4 * PAGE_SIZE));
    assert_eq!(q.bytes, 4 * PAGE_SIZE, "rest of the first run");
    assert!(
        matches!(
            q.cause,
            TdxError::MapGpa(MapGpaErrorKind::Status(VmcallStatus::InvalidOperand))
        ),
        "{:?}",
        q.cause
    );
    assert_eq!(
        state(&w, VMAP, 4 * PAGE_SIZE),
        (true, true),
        "converted part usable"
    );
    assert_eq!(
        state(&w, VMAP + 4 * PAGE_SIZE, 4 * PAGE_SIZE),
        (false, true),
        "quarantine stays non-present"
    );
    assert_eq!(
        state(&w, VMAP + 8 * PAGE_SIZE, 8 * PAGE_SIZE),
        (true, false),
        "never-notified run rolled back"
    );
    assert_eq!(fake.state(Gpa(CHUNK_B)), PageState::Private);
    // The quarantined pages are refused from now on.
    assert_eq!(
        w.engine
            .set_memory_shared(VirtAddr(VMAP + 4 * PAGE_SIZE), 1),
        Err(ConvError::NotPresent(VirtAddr(VMAP + 4 * PAGE_SIZE)))
    );
}

#[test]
fn accept_failure_quarantines_from_the_failing_page_rounded_to_its_leaf() {
    let fake = tdx_fake();
    let w = world(tdx_platform(&fake));
    w.engine.set_memory_shared(VirtAddr(VMAP), 16).unwrap();
    w.engine
        .set_memory_shared(VirtAddr(DMAP + 4 * MIB2), 1024)
        .unwrap();
    // 4K ACCEPT of page 3 of CHUNK_B fails hard.
    fake.fail_accept_at(Gpa(CHUNK_B + 3 * PAGE_SIZE), 0xC000_0100_0000_0000);
    let q = quarantine_of(w.engine.set_memory_private(VirtAddr(VMAP), 16));
    assert_eq!(
        (q.va, q.gpa, q.bytes),
        (
            VirtAddr(VMAP + 11 * PAGE_SIZE),
            PhysAddr(CHUNK_B + 3 * PAGE_SIZE),
            5 * PAGE_SIZE
        )
    );
    assert!(
        matches!(q.cause, TdxError::Accept(AcceptError::Other(_))),
        "{:?}",
        q.cause
    );
    assert_eq!(state(&w, VMAP, 11 * PAGE_SIZE), (true, false));
    assert_eq!(
        state(&w, VMAP + 11 * PAGE_SIZE, 5 * PAGE_SIZE),
        (false, false)
    );
    // Inside a 2M leaf the failing page takes its whole leaf with it.
    fake.fail_accept_at(Gpa(5 * MIB2 + 7 * PAGE_SIZE), 0xC000_0100_0000_0000);
    fake.refuse_sizes_above(AcceptSize::Size4K);
    let q = quarantine_of(w.engine.set_memory_private(VirtAddr(DMAP + 4 * MIB2), 1024));
    assert_eq!(
        (q.va, q.gpa, q.bytes),
        (VirtAddr(DMAP + 5 * MIB2), PhysAddr(5 * MIB2), MIB2)
    );
    assert_eq!(state(&w, DMAP + 4 * MIB2, MIB2), (true, false));
    assert_eq!(state(&w, DMAP + 5 * MIB2, MIB2), (false, false));
}

/// A range that ends exactly at the top of the lower canonical half
/// (0x0000_8000_0000_0000, exclusive) is canonical: its last byte is.
#[test]
fn a_range_ending_at_the_top_of_the_lower_half_converts() {
    let fake = tdx_fake();
    let w = world(tdx_platform(&fake));
    let last_page = 0x0000_8000_0000_0000 - PAGE_SIZE;
    w.engine
        .tables()
        .map_leaf(
            VirtAddr(last_page),
            PhysAddr(CHUNK_A),
            Level::Pt,
            flags(),
            false,
            &w.mem,
        )
        .unwrap();
    let result = w.engine.set_memory_shared(VirtAddr(last_page), 1);
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(state(&w, last_page, PAGE_SIZE), (true, true));
}

/// What one conversion cost: entry reads and writes, and the hook calls.
#[derive(Debug, PartialEq, Eq)]
struct Work {
    reads: usize,
    writes: usize,
    shootdowns: usize,
    notified_runs: usize,
    flushed_pages: u64,
    accepts: u64,
    map_gpa_calls: u64,
}

fn work_of<P: Platform>(
    w: &World<P>,
    accepts_and_map_gpa: impl Fn() -> (u64, u64),
    convert: impl FnOnce() -> Outcome,
) -> Work
where
    P::Error: Into<TdxError>,
{
    w.log.clear();
    let (reads, writes) = (w.mem.reads(), w.mem.writes());
    let (accepts, map_gpa_calls) = accepts_and_map_gpa();
    convert().map_err(|e| format!("{e:?}")).unwrap();
    let (accepts_after, map_gpa_after) = accepts_and_map_gpa();
    let events = w.log.events();
    Work {
        reads: w.mem.reads() - reads,
        writes: w.mem.writes() - writes,
        shootdowns: events.iter().filter(|e| **e == Event::FlushTlb).count(),
        notified_runs: events
            .iter()
            .filter(|e| matches!(e, Event::Notify(..)))
            .count(),
        flushed_pages: events
            .iter()
            .map(|e| match e {
                Event::FlushCaches(run, _) => run.pages(),
                _ => 0,
            })
            .sum(),
        accepts: accepts_after - accepts,
        map_gpa_calls: map_gpa_after - map_gpa_calls,
    }
}

/// Regression guards on what a conversion costs (issue 8, section 4): a
/// change that adds a walk, a write, a shootdown or a hypercall fails here.
/// 64 pages of one page table (the leaves split by a first round trip), as
/// a TD: two walks over the leaves (validation, step 2), each one walk from
/// the root (4 reads) and one read per further leaf; 4 reads for each of
/// the two boundary split checks; one read per leaf in each of steps 5 and
/// 7, which write where step 2 found the entries; one write per leaf in
/// each of steps 2, 5 and 7; the runs come from the validation's walk. The
/// legacy order: two walks over the leaves and one write per leaf. Both: one shootdown, one
/// MapGPA for the one GPA run, an ACCEPT per 4K page going private, and
/// every page flushed going shared.
#[test]
fn operation_counts_per_conversion_are_regression_guards() {
    let fake = tdx_fake();
    let w = world(tdx_platform(&fake));
    let (va, pages) = (DMAP + 3 * MIB2 + 0x10_000, 64u64);
    // A first round trip splits the 2M leaf; afterwards the leaves are 4K.
    w.engine.set_memory_shared(VirtAddr(va), pages).unwrap();
    w.engine.set_memory_private(VirtAddr(va), pages).unwrap();
    let counts = || {
        let c = w.engine.platform().inner.counters();
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::SeqCst);
        (c.accepted.iter().map(load).sum(), load(&c.map_gpa_calls))
    };
    let leaves = pages as usize;
    let pass = 4 + (leaves - 1);
    let split_checks = 2 * 4;
    let seven = |accepts, flushed_pages| Work {
        reads: 2 * pass + 2 * leaves + split_checks,
        writes: 3 * leaves,
        shootdowns: 1,
        notified_runs: 1,
        flushed_pages,
        accepts,
        map_gpa_calls: 1,
    };
    let shared = work_of(&w, counts, || {
        w.engine.set_memory_shared(VirtAddr(va), pages)
    });
    assert_eq!(shared, seven(0, pages), "seven steps, to shared");
    let private = work_of(&w, counts, || {
        w.engine.set_memory_private(VirtAddr(va), pages)
    });
    assert_eq!(private, seven(pages, 0), "seven steps, to private");
    // The comparator exists only with the feature (make test enables it).
    #[cfg(feature = "negative-control")]
    {
        let legacy = |accepts, flushed_pages| Work {
            reads: 2 * pass + split_checks,
            writes: leaves,
            ..seven(accepts, flushed_pages)
        };
        let shared = work_of(&w, counts, || {
            w.engine
                .convert_in_legacy_order(VirtAddr(va), pages, Direction::ToShared)
        });
        assert_eq!(shared, legacy(0, pages), "legacy order, to shared");
        let private = work_of(&w, counts, || {
            w.engine
                .convert_in_legacy_order(VirtAddr(va), pages, Direction::ToPrivate)
        });
        assert_eq!(private, legacy(pages, 0), "legacy order, to private");
    }

    // A whole 2M leaf: one entry, one 2M ACCEPT, no split.
    let block = DMAP + 5 * MIB2;
    let pages = MIB2 / PAGE_SIZE;
    let one_leaf = |accepts, flushed_pages| Work {
        reads: 2 * 3 + 2 + split_checks - 2,
        writes: 3,
        shootdowns: 1,
        notified_runs: 1,
        flushed_pages,
        accepts,
        map_gpa_calls: 1,
    };
    let shared = work_of(&w, counts, || {
        w.engine.set_memory_shared(VirtAddr(block), pages)
    });
    assert_eq!(shared, one_leaf(0, pages), "a 2M leaf to shared");
    let private = work_of(&w, counts, || {
        w.engine.set_memory_private(VirtAddr(block), pages)
    });
    assert_eq!(private, one_leaf(1, 0), "a 2M leaf to private");
}

/// A restore that fails after a hypervisor failure keeps the quarantine
/// (issue 11, defect 4: it used to come back as `TablesChanged`, and the
/// caller lost which pages never to reuse): MapGPA fails in the first run,
/// and a rule-breaker unmaps a page of the second run meanwhile, so
/// restoring stops there. The error carries both the quarantine and where
/// restoring stopped; everything from there on stays non-present.
#[test]
fn a_failed_restore_after_a_hypervisor_failure_keeps_the_quarantine() {
    let (_fake, w) = world_with_map_gpa_failing_mid_first_run();
    let mem = w.mem;
    let (cc, root) = (w.engine.tables().cc_mask(), w.engine.tables().root());
    let pulled = VirtAddr(VMAP + 12 * PAGE_SIZE);
    w.log.set_hook(Some(Arc::new(move |e: &Event| {
        if matches!(e, Event::Notify(..)) {
            // SAFETY: the engine's own tables, in the simulated memory.
            let tables = unsafe { PageTables::new(mem, root, PagingMode::FourLevel, cc) };
            let _ = tables.unmap_leaf(pulled);
        }
    })));
    let result = w.engine.set_memory_shared(VirtAddr(VMAP), 16);
    w.log.set_hook(None);
    match result {
        Err(ConvError::QuarantinedAndTablesChanged { quarantine, at }) => {
            assert_eq!(quarantine.va, VirtAddr(VMAP + 4 * PAGE_SIZE));
            assert_eq!(quarantine.bytes, 4 * PAGE_SIZE);
            assert_eq!(at, pulled, "restoring stopped at the unmapped page");
        }
        other => panic!("want the quarantine and where restoring stopped, got {other:?}"),
    }
    assert_eq!(
        state(&w, VMAP, 4 * PAGE_SIZE),
        (true, true),
        "converted part usable"
    );
    assert_eq!(
        state(&w, VMAP + 8 * PAGE_SIZE, 4 * PAGE_SIZE),
        (true, false),
        "restored before the stop"
    );
    let after = w
        .engine
        .tables()
        .lookup_address(VirtAddr(VMAP + 13 * PAGE_SIZE))
        .unwrap();
    assert!(!after.entry.is_present(), "not restored after the stop");
}

/// A page the VMM took away is retired: steps 1 to 3 only, the hypervisor
/// hears nothing, the entry stays non-present with its frame and C/S bit,
/// the neighbours (even inside the 2M leaf split for it) keep their state,
/// and the page is refused from then on. Bad input changes nothing.
#[test]
fn a_lost_page_is_retired_without_telling_the_hypervisor() {
    let fake = tdx_fake();
    let w = world(tdx_platform(&fake));
    let cc = w.engine.tables().cc_mask();
    // Pages 0..8 of VMAP shared, 8..16 private: retire takes either state.
    w.engine.set_memory_shared(VirtAddr(VMAP), 8).unwrap();
    let calls = fake.calls().len();
    w.log.clear();
    let lost = TdxError::PrivatePageLost(Gpa(CHUNK_A + 7 * PAGE_SIZE));
    // Two runs of frames (CHUNK_A's last page, CHUNK_B's first): refused,
    // nothing changed; each run is retired on its own.
    let before = leaves(&w, VMAP, 16 * PAGE_SIZE);
    assert_eq!(
        w.engine.retire(VirtAddr(VMAP + 7 * PAGE_SIZE), 2, lost),
        Err(ConvError::Discontiguous(VirtAddr(VMAP + 8 * PAGE_SIZE)))
    );
    assert_eq!(leaves(&w, VMAP, 16 * PAGE_SIZE), before);
    assert!(w.log.events().is_empty());
    let q = w
        .engine
        .retire(VirtAddr(VMAP + 7 * PAGE_SIZE), 1, lost)
        .unwrap();
    assert_eq!(
        (q.va, q.gpa, q.bytes, q.cause),
        (
            VirtAddr(VMAP + 7 * PAGE_SIZE),
            PhysAddr(CHUNK_A + 7 * PAGE_SIZE),
            PAGE_SIZE,
            lost
        )
    );
    let q = w
        .engine
        .retire(VirtAddr(VMAP + 8 * PAGE_SIZE), 1, lost)
        .unwrap();
    assert_eq!((q.gpa, q.bytes), (PhysAddr(CHUNK_B), PAGE_SIZE));
    assert_eq!(fake.calls().len(), calls, "no TDCALL for a retired page");
    let events = w.log.events();
    assert!(matches!(events[..], [.., Event::FlushTlb]), "{events:?}");
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, Event::RemoveAliases(_)))
            .count(),
        2,
        "each retired page loses its aliases"
    );
    assert!(!events.iter().any(|e| matches!(e, Event::Notify(..))));
    assert_eq!(state(&w, VMAP + 7 * PAGE_SIZE, PAGE_SIZE), (false, true));
    assert_eq!(state(&w, VMAP + 8 * PAGE_SIZE, PAGE_SIZE), (false, false));
    assert_eq!(state(&w, VMAP, 7 * PAGE_SIZE), (true, true));
    assert_eq!(
        state(&w, VMAP + 9 * PAGE_SIZE, 7 * PAGE_SIZE),
        (true, false)
    );
    let leaf = w
        .engine
        .tables()
        .lookup_address(VirtAddr(VMAP + 8 * PAGE_SIZE))
        .unwrap();
    assert_eq!(cc.leaf_frame(leaf.entry, leaf.level()), PhysAddr(CHUNK_B));
    for retired in [VMAP + 7 * PAGE_SIZE, VMAP + 8 * PAGE_SIZE] {
        assert_eq!(
            w.engine.set_memory_private(VirtAddr(retired), 1),
            Err(ConvError::NotPresent(VirtAddr(retired)))
        );
        assert_eq!(
            w.engine.retire(VirtAddr(retired), 1, lost),
            Err(ConvError::NotPresent(VirtAddr(retired)))
        );
    }
    // One page inside a 2M leaf: split, the rest of the block stays.
    let q = w
        .engine
        .retire(VirtAddr(DMAP + MIB2 + 5 * PAGE_SIZE), 1, lost)
        .unwrap();
    assert_eq!(
        (q.gpa, q.bytes),
        (PhysAddr(MIB2 + 5 * PAGE_SIZE), PAGE_SIZE)
    );
    assert_eq!(
        state(&w, DMAP + MIB2 + 5 * PAGE_SIZE, PAGE_SIZE),
        (false, false)
    );
    assert_eq!(state(&w, DMAP + MIB2, 5 * PAGE_SIZE), (true, false));
    assert_eq!(
        state(&w, DMAP + MIB2 + 6 * PAGE_SIZE, MIB2 - 6 * PAGE_SIZE),
        (true, false)
    );
    // Bad input: a typed error, nothing changed.
    let before = leaves(&w, VMAP, 16 * PAGE_SIZE);
    assert_eq!(
        w.engine.retire(VirtAddr(VMAP + 1), 1, lost),
        Err(ConvError::Unaligned(VirtAddr(VMAP + 1)))
    );
    assert_eq!(
        w.engine.retire(VirtAddr(VMAP), 0, lost),
        Err(ConvError::ZeroLength)
    );
    assert_eq!(
        w.engine.retire(VirtAddr(VMAP), 16, lost),
        Err(ConvError::NotPresent(VirtAddr(VMAP + 7 * PAGE_SIZE)))
    );
    assert_eq!(leaves(&w, VMAP, 16 * PAGE_SIZE), before);
    w.engine.stop_conversions();
    assert_eq!(
        w.engine.retire(VirtAddr(VMAP), 1, lost),
        Err(ConvError::Stopped)
    );
}

/// The SEV-SNP and Hyper-V vTOM platforms under the same engine.
mod other_platforms;
