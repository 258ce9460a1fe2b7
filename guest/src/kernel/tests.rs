//! In-guest tests of the engine on the live page tables.

use super::cacheflush::Window;
use super::engine::engine;
use super::memory::{kernel_image, stack_guard, DIRECT_MAP, DIRECT_MAP_BASE, FRAMES};
use super::report::{Test, TestResult};
use super::{test_area, vmalloc};
use crate::ensure;
use bare::extable::{load_unaligned_zeropad, ZEROPAD_FIXUPS};
use coco_pagetable::{
    Leaf, Level, PhysAddr, Pte, PteFlags, TableMemory, VirtAddr, WalkError, PAGE_SIZE,
};
use core::sync::atomic::{AtomicU64, Ordering};
use set_memory_enc::{ConvError, Platform};

const MIB2: u64 = 2 << 20;

/// The tests, in the order they run (some use what earlier ones converted).
pub const TESTS: &[Test] = &[
    ("walker_on_live_tables", walker_on_live_tables),
    (
        "frame_from_non_present_entries",
        frame_from_non_present_entries,
    ),
    ("convert_one_page", convert_one_page),
    ("convert_many_pages", convert_many_pages),
    ("convert_whole_2m", convert_whole_2m),
    ("convert_partial_2m", convert_partial_2m),
    ("bad_inputs_change_nothing", bad_inputs_change_nothing),
    ("alias_purged_by_step_1", alias_purged_by_step_1),
    ("zeropad_next_page_mapped", zeropad_next_page_mapped),
    ("zeropad_next_page_absent", zeropad_next_page_absent),
    (
        "flush_window_maps_frame_as_it_is",
        flush_window_maps_frame_as_it_is,
    ),
    ("ud2_reaches_the_guest", ud2_reaches_the_guest),
    (
        "conversion_started_on_an_ap_completes",
        conversion_started_on_an_ap_completes,
    ),
];

/// A conversion round trip for one AP to run (`conversion_started_on_an_ap_
/// completes`): the page's VA (0: none), and the outcome.
static AP_JOB_VA: AtomicU64 = AtomicU64::new(0);
static AP_JOB_OUTCOME: AtomicU64 = AtomicU64::new(AP_JOB_NONE);
const AP_JOB_NONE: u64 = 0;
const AP_JOB_OK: u64 = 1;
const AP_JOB_FAILED: u64 = 2;

/// Whether a test left a job for an AP (checked by idle APs).
pub fn ap_job_pending() -> bool {
    AP_JOB_VA.load(Ordering::SeqCst) != 0
}

/// Runs the job if this AP is first to claim it: the page to shared and
/// back, each conversion started here, so each shootdown waits for the
/// boot CPU's acknowledgement.
pub fn run_ap_job() {
    let va = AP_JOB_VA.swap(0, Ordering::SeqCst);
    if va == 0 {
        return;
    }
    let ok = engine().set_memory_shared(VirtAddr(va), 1).is_ok()
        && engine().set_memory_private(VirtAddr(va), 1).is_ok();
    let outcome = if ok { AP_JOB_OK } else { AP_JOB_FAILED };
    AP_JOB_OUTCOME.store(outcome, Ordering::SeqCst);
}

/// The engine's promise that any CPU may convert: an AP converts while the
/// boot CPU waits (interrupts on, as always after boot), and its shootdowns
/// complete. With the boot CPU taking no interrupts the AP's first
/// shootdown never got its acknowledgement (issue 11, defect 1): the wait
/// below times out.
fn conversion_started_on_an_ap_completes() -> TestResult {
    if super::shootdown::online_count() < 2 {
        bare::println!("  (one CPU: no AP to convert on)");
        return Ok(());
    }
    let va = block(6) + 30 * PAGE_SIZE;
    let shootdowns = super::shootdown::SHOOTDOWNS.load(Ordering::SeqCst);
    AP_JOB_OUTCOME.store(AP_JOB_NONE, Ordering::SeqCst);
    AP_JOB_VA.store(va, Ordering::SeqCst);
    super::send_ipi_to_others(super::WAKE_VECTOR);
    let done = super::wait_until(20_000_000, || {
        AP_JOB_OUTCOME.load(Ordering::SeqCst) != AP_JOB_NONE
    });
    AP_JOB_VA.store(0, Ordering::SeqCst);
    ensure!(
        done,
        "the AP's conversion did not finish in 20 s (its shootdown waits for the boot CPU)"
    );
    ensure!(
        AP_JOB_OUTCOME.load(Ordering::SeqCst) == AP_JOB_OK,
        "the AP's conversion failed"
    );
    let taken = super::shootdown::SHOOTDOWNS.load(Ordering::SeqCst) - shootdowns;
    ensure!(
        taken == 2,
        "{taken} shootdowns, want 2 (one per conversion)"
    );
    let leaf = lookup(va).map_err(|e| fail(format_args!("lookup: {e:?}")))?;
    ensure!(
        leaf.entry.is_present() && !cc().is_shared(leaf.entry),
        "the page is not present and private after the round trip"
    );
    Ok(())
}

/// A `ud2` (BUG()/WARN()) raises the guest's own #UD: in a TD the emulator
/// intercepts every #UD to find TDCALLs and must reflect the rest.
fn ud2_reaches_the_guest() -> TestResult {
    let before = super::faults::TEST_UD_TAKEN.load(Ordering::SeqCst);
    super::faults::execute_test_ud2();
    let taken = super::faults::TEST_UD_TAKEN.load(Ordering::SeqCst) - before;
    ensure!(taken == 1, "{taken} #UD taken at the test ud2, want 1");
    Ok(())
}

/// Test block `n` (2M each) of the reserved test area, as a direct-map VA.
fn block(n: u64) -> u64 {
    DIRECT_MAP_BASE + test_area().0 + n * MIB2
}

fn lookup(va: u64) -> Result<Leaf, WalkError> {
    engine().tables().lookup_address(VirtAddr(va))
}

fn cc() -> coco_pagetable::CcMask {
    engine().platform().cc_mask()
}

/// (present, shared, level) of every leaf in `[va, va + pages)`, if all equal.
fn uniform_state(va: u64, pages: u64) -> Option<(bool, bool, Level)> {
    let mut at = va;
    let mut seen = None;
    while at < va + pages * PAGE_SIZE {
        let leaf = lookup(at).ok()?;
        let state = (
            leaf.entry.is_present(),
            cc().is_shared(leaf.entry),
            leaf.level(),
        );
        if *seen.get_or_insert(state) != state {
            return None;
        }
        at = leaf.end();
    }
    seen
}

fn fill(va: u64, pages: u64, seed: u8) {
    for i in 0..pages * PAGE_SIZE {
        // SAFETY: `va` is a mapped, present test-area page we own.
        unsafe {
            core::ptr::write_volatile((va + i) as *mut u8, seed.wrapping_add((i % 251) as u8))
        };
    }
}

fn check_fill(va: u64, pages: u64, seed: u8) -> bool {
    (0..pages * PAGE_SIZE).all(|i| {
        // SAFETY: as in `fill`.
        let byte = unsafe { core::ptr::read_volatile((va + i) as *const u8) };
        byte == seed.wrapping_add((i % 251) as u8)
    })
}

fn walker_on_live_tables() -> TestResult {
    let leaf = lookup(block(0)).map_err(|e| fail(format_args!("direct map: {e:?}")))?;
    ensure!(
        leaf.level() == Level::Pd,
        "test area mapped at {:?}, want 2M",
        leaf.level()
    );
    let frame = cc().leaf_frame(leaf.entry, leaf.level());
    ensure!(
        frame.0 == test_area().0,
        "frame {frame:?} != {:#x}",
        test_area().0
    );
    let (kernel_start, _) = kernel_image();
    let text = lookup(kernel_start).map_err(|e| fail(format_args!("kernel text: {e:?}")))?;
    ensure!(
        text.level() == Level::Pt,
        "kernel text at {:?}",
        text.level()
    );
    ensure!(
        text.entry.flags().contains(PteFlags::PRESENT)
            && !text.entry.flags().contains(PteFlags::NO_EXECUTE),
        "kernel text flags {:?}",
        text.entry.flags()
    );
    ensure!(
        matches!(lookup(stack_guard(0)), Err(WalkError::NotMapped { .. })),
        "stack guard page is mapped"
    );
    ensure!(
        matches!(lookup(0), Err(WalkError::NotMapped { .. })),
        "page 0 is mapped"
    );
    Ok(())
}

fn fail(args: core::fmt::Arguments<'_>) -> super::report::Failure {
    super::report::Failure::new(args)
}

/// Clears PRESENT by hand on a vmalloc alias (4K) and on the test area's
/// last 2M leaf, and recovers the frames from the non-present entries.
fn frame_from_non_present_entries() -> TestResult {
    let tables = engine().tables();
    let frame = FRAMES
        .allocate_zeroed()
        .ok_or_else(|| fail(format_args!("no frame")))?;
    let alias = vmalloc::vmap(frame, 1, cc()).map_err(|e| fail(format_args!("vmap: {e:?}")))?;
    let big = block(super::TEST_AREA_BLOCKS - 1);
    for (va, level, want) in [
        (alias.0, Level::Pt, frame),
        (big, Level::Pd, big - DIRECT_MAP_BASE),
    ] {
        let leaf = lookup(va).map_err(|e| fail(format_args!("{e:?}")))?;
        ensure!(leaf.level() == level, "{va:#x} at {:?}", leaf.level());
        tables
            .update_leaf(&leaf, |e| Pte(e.0 & !PteFlags::PRESENT.bits()))
            .map_err(|e| fail(format_args!("{e:?}")))?;
        super::shootdown::flush_all_cpus();
        let hidden =
            lookup(va).map_err(|e| fail(format_args!("non-present leaf not found: {e:?}")))?;
        let cpu_view = tables.translate(VirtAddr(va));
        let restored = tables.update_leaf(&hidden, |e| Pte(e.0 | PteFlags::PRESENT.bits()));
        super::shootdown::flush_all_cpus();
        ensure!(!hidden.entry.is_present(), "entry still present");
        ensure!(
            cpu_view.is_none(),
            "a CPU-style walk still translates {va:#x}"
        );
        let got = cc().leaf_frame(hidden.entry, hidden.level()).0;
        ensure!(
            got == want,
            "{:?} leaf at {va:#x}: frame {got:#x}, want {want:#x}",
            level
        );
        ensure!(restored.is_ok(), "could not restore PRESENT");
    }
    vmalloc::vunmap_lazy(alias);
    Ok(())
}

fn convert_and_back(va: u64, pages: u64, splits: u32, level_after: Level) -> TestResult {
    fill(va, pages, 0x5a);
    let stats = engine()
        .set_memory_shared(VirtAddr(va), pages)
        .map_err(|e| fail(format_args!("to shared: {e:?}")))?;
    ensure!(
        stats.splits == splits,
        "{} splits, want {splits}",
        stats.splits
    );
    ensure!(stats.pages == pages, "{} pages", stats.pages);
    ensure!(
        uniform_state(va, pages) == Some((true, true, level_after)),
        "after sharing: {:?}",
        uniform_state(va, pages)
    );
    // Neighbours untouched.
    if let Some(before) = lookup(va - PAGE_SIZE).ok().filter(|l| l.end() <= va) {
        ensure!(
            !cc().is_shared(before.entry),
            "page before the range became shared"
        );
    }
    if super::confidential() {
        // MapGPA (or the PSC) dropped the private contents; the shared alias must work.
        fill(va, pages, 0xc3);
        ensure!(
            check_fill(va, pages, 0xc3),
            "the shared pages do not keep what was written to them"
        );
    } else {
        ensure!(
            check_fill(va, pages, 0x5a),
            "contents changed (no hypervisor here to drop them)"
        );
    }
    let back = engine()
        .set_memory_private(VirtAddr(va), pages)
        .map_err(|e| fail(format_args!("to private: {e:?}")))?;
    ensure!(back.splits == 0, "split again on the way back");
    ensure!(
        uniform_state(va, pages) == Some((true, false, level_after)),
        "after going back: {:?}",
        uniform_state(va, pages)
    );
    if super::confidential() {
        ensure!(
            check_zero(va, pages),
            "not zero after going private (ACCEPT zeroes a page)"
        );
    }
    Ok(())
}

fn check_zero(va: u64, pages: u64) -> bool {
    (0..pages * PAGE_SIZE).all(|i| {
        // SAFETY: as in `fill`.
        unsafe { core::ptr::read_volatile((va + i) as *const u8) == 0 }
    })
}

fn convert_one_page() -> TestResult {
    convert_and_back(block(0) + 3 * PAGE_SIZE, 1, 1, Level::Pt)
}

fn convert_many_pages() -> TestResult {
    // 37 pages across the boundary of blocks 1 and 2: both 2M leaves split.
    convert_and_back(block(2) - 16 * PAGE_SIZE, 37, 2, Level::Pt)
}

fn convert_whole_2m() -> TestResult {
    convert_and_back(block(3), 512, 0, Level::Pd)
}

fn convert_partial_2m() -> TestResult {
    convert_and_back(block(4) + MIB2 / 2, 256, 1, Level::Pt)
}

/// Copies of page tables, kept off the stack (4 KiB each).
static SNAPSHOTS: spin::Mutex<[[u64; 512]; 6]> = spin::Mutex::new([[0; 512]; 6]);

/// Copies the table holding each of `vas`' leaves into snapshot slots
/// `first..first + 3`.
fn snapshot_tables(vas: &[u64; 3], first: usize) {
    let mut snapshots = SNAPSHOTS.lock();
    for (slot, va) in vas.iter().enumerate() {
        let copy = &mut snapshots[first + slot];
        *copy = [0; 512];
        if let Ok(leaf) = lookup(*va) {
            for (i, word) in copy.iter_mut().enumerate() {
                // SAFETY: the table a walk of the kernel's tables found.
                *word = unsafe { DIRECT_MAP.load(leaf.table(), i) };
            }
        }
    }
}

fn bad_inputs_change_nothing() -> TestResult {
    let e = engine();
    let shared_page = block(5) + 7 * PAGE_SIZE;
    e.set_memory_shared(VirtAddr(shared_page), 1)
        .map_err(|x| fail(format_args!("setup: {x:?}")))?;
    let watched = [block(5), block(0), block(3)];
    snapshot_tables(&watched, 0);
    let guard = stack_guard(0);
    let cases: [(&str, Result<_, ConvError<_>>); 8] = [
        ("unaligned", e.set_memory_shared(VirtAddr(block(5) + 8), 1)),
        ("zero pages", e.set_memory_shared(VirtAddr(block(5)), 0)),
        (
            "overflow",
            e.set_memory_shared(VirtAddr(block(5)), u64::MAX / 2),
        ),
        (
            "non-canonical",
            e.set_memory_shared(VirtAddr(0x0000_9000_0000_0000), 1),
        ),
        ("unmapped", e.set_memory_shared(VirtAddr(guard), 1)),
        (
            "already shared",
            e.set_memory_shared(VirtAddr(shared_page), 1),
        ),
        ("partly shared", e.set_memory_shared(VirtAddr(block(5)), 16)),
        (
            "already private",
            e.set_memory_private(VirtAddr(block(3)), 512),
        ),
    ];
    let expected = [
        ConvError::Unaligned(VirtAddr(block(5) + 8)),
        ConvError::ZeroLength,
        ConvError::Overflow,
        ConvError::NonCanonical(VirtAddr(0x0000_9000_0000_0000)),
        ConvError::NotMapped(VirtAddr(guard)),
        ConvError::AlreadyInTargetState(VirtAddr(shared_page)),
        ConvError::AlreadyInTargetState(VirtAddr(shared_page)),
        ConvError::AlreadyInTargetState(VirtAddr(block(3))),
    ];
    for ((name, got), want) in cases.into_iter().zip(expected) {
        ensure!(got == Err(want), "{name}: {got:?}, want {want:?}");
    }
    snapshot_tables(&watched, 3);
    let unchanged = {
        let snapshots = SNAPSHOTS.lock();
        snapshots[..3] == snapshots[3..]
    };
    ensure!(unchanged, "a refused conversion changed an entry");
    e.set_memory_private(VirtAddr(shared_page), 1)
        .map_err(|x| fail(format_args!("cleanup: {x:?}")))?;
    Ok(())
}

fn alias_purged_by_step_1() -> TestResult {
    let va = block(6) + 9 * PAGE_SIZE;
    let frame = va - DIRECT_MAP_BASE;
    let alias = vmalloc::vmap(frame, 1, cc()).map_err(|e| fail(format_args!("vmap: {e:?}")))?;
    ensure!(lookup(alias.0).is_ok(), "alias not mapped");
    vmalloc::vunmap_lazy(alias);
    ensure!(lookup(alias.0).is_ok(), "lazy free unmapped at once");
    let purged = vmalloc::purged_total();
    engine()
        .set_memory_shared(VirtAddr(va), 1)
        .map_err(|e| fail(format_args!("{e:?}")))?;
    ensure!(
        vmalloc::purged_total() == purged + 1,
        "step 1 purged {} areas",
        vmalloc::purged_total() - purged
    );
    ensure!(
        lookup(alias.0).is_err(),
        "alias still mapped after the conversion"
    );
    engine()
        .set_memory_private(VirtAddr(va), 1)
        .map_err(|e| fail(format_args!("{e:?}")))?;
    Ok(())
}

/// Two pages through vmalloc with known bytes; returns the first's VA.
fn two_pages() -> Result<u64, super::report::Failure> {
    let frames = [FRAMES.allocate(), FRAMES.allocate()];
    let [Some(first), Some(second)] = frames else {
        return Err(fail(format_args!("no frames")));
    };
    let va = vmalloc::vmap(first, 1, cc()).map_err(|e| fail(format_args!("{e:?}")))?;
    // vmap areas are separated by a guard page: map the second frame right
    // after by hand so the two pages are adjacent.
    let flags = PteFlags::PRESENT | PteFlags::WRITABLE | PteFlags::NO_EXECUTE;
    engine()
        .tables()
        .map_leaf(
            VirtAddr(va.0 + PAGE_SIZE),
            PhysAddr(second),
            Level::Pt,
            flags,
            false,
            &FRAMES,
        )
        .map_err(|e| fail(format_args!("{e:?}")))?;
    for i in 0..2 * PAGE_SIZE {
        // SAFETY: both pages were just mapped and are ours.
        unsafe { core::ptr::write_volatile((va.0 + i) as *mut u8, (i % 253) as u8 + 1) };
    }
    Ok(va.0)
}

fn expected_bytes(address: u64, valid: u64) -> u64 {
    let mut value = 0u64;
    for k in 0..valid {
        let offset = address + k - (address & !(PAGE_SIZE - 1));
        value |= u64::from((offset % 253) as u8 + 1) << (8 * k);
    }
    value
}

fn zeropad_next_page_mapped() -> TestResult {
    let va = two_pages()?;
    let fixups = ZEROPAD_FIXUPS.load(Ordering::SeqCst);
    for offset in 1..=7u64 {
        let address = va + PAGE_SIZE - offset;
        // SAFETY: the first byte is in a mapped page.
        let got = unsafe { load_unaligned_zeropad(address as *const u8) };
        let want = expected_bytes(address, 8);
        ensure!(
            got == want,
            "offset {offset}: {got:#018x}, want {want:#018x}"
        );
    }
    ensure!(
        ZEROPAD_FIXUPS.load(Ordering::SeqCst) == fixups,
        "a fixup ran with both pages mapped"
    );
    Ok(())
}

fn zeropad_next_page_absent() -> TestResult {
    let va = two_pages()?;
    vmalloc::unmap_page(VirtAddr(va + PAGE_SIZE), cc()).map_err(|e| fail(format_args!("{e:?}")))?;
    super::shootdown::flush_all_cpus();
    let fixups = ZEROPAD_FIXUPS.load(Ordering::SeqCst);
    for offset in 1..=7u64 {
        let address = va + PAGE_SIZE - offset;
        // SAFETY: the first byte is in a mapped page; the rest faults and is
        // fixed up.
        let got = unsafe { load_unaligned_zeropad(address as *const u8) };
        let want = expected_bytes(address, offset);
        ensure!(
            got == want,
            "offset {offset}: {got:#018x}, want {want:#018x} (zeros past the page)"
        );
    }
    let taken = ZEROPAD_FIXUPS.load(Ordering::SeqCst) - fixups;
    ensure!(taken == 7, "{taken} fixups, want 7");
    Ok(())
}

/// Step 4's window maps a frame in the state it is in (in a TD, the other
/// state would be an EPT-violation #VE, which is fatal here), one frame per
/// window at a time, and is unmapped again when dropped.
fn flush_window_maps_frame_as_it_is() -> TestResult {
    let va = block(0) + 20 * PAGE_SIZE;
    let frame = PhysAddr(va - DIRECT_MAP_BASE);
    let cpu = super::cpu_index();
    for shared in [false, true] {
        if shared {
            engine()
                .set_memory_shared(VirtAddr(va), 1)
                .map_err(|e| fail(format_args!("to shared: {e:?}")))?;
        }
        let seed = 0x21 + u8::from(shared);
        fill(va, 1, seed);
        let window =
            Window::map(cpu, frame, shared, cc()).map_err(|e| fail(format_args!("map: {e:?}")))?;
        ensure!(
            check_fill(window.address(), 1, seed),
            "the window (shared: {shared}) does not show the frame's bytes"
        );
        ensure!(
            Window::map(cpu, frame, shared, cc()).is_err(),
            "a second mapping of a window in use was allowed"
        );
        let address = window.address();
        drop(window);
        ensure!(
            matches!(lookup(address), Err(WalkError::NotMapped { .. })),
            "the window is still mapped after use"
        );
    }
    engine()
        .set_memory_private(VirtAddr(va), 1)
        .map_err(|e| fail(format_args!("back to private: {e:?}")))?;
    Ok(())
}
