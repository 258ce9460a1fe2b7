//! Every CPU converts at once (issue 11): each online CPU converts its own
//! 16-page range back and forth, and between its conversions runs
//! `load_unaligned_zeropad()` across into the first page of every other
//! CPU's range, from the never-converted page before it. Each owner writes a
//! fresh pattern (salted by its CPU) into its range's first page after every
//! conversion under a seqlock of its own, and every load is checked as the
//! stress checks it (`stress::load_is_right`). Three quarters of the way
//! through, the boot CPU calls `stop_conversions()` while the others are
//! converting: the conversions in flight finish, every later one must be
//! refused with `Stopped`, and afterwards no page of any range may be
//! non-present, and each must be in the state its owner's last successful
//! conversion left. Runs last: stopped conversions stay stopped.
//!
//! Prints `CONCURRENT cpus=N conversions=C stopped=S errors=E loads=L
//! stable_loads=T fixups=F wrong_bytes=W after_stop=A not_present=P
//! wrong_state_pages=X`; `concurrent-rounds=<n>` sets the round trips per
//! CPU (default 200).

use super::engine::engine;
use super::memory::DIRECT_MAP_BASE;
use super::shootdown::MAX_CPUS;
use super::stress::{self, first_page_byte, load_across};
use bare::extable::ZEROPAD_FIXUPS;
use bare::println;
use coco_pagetable::{VirtAddr, PAGE_SIZE};
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use set_memory_enc::{ConvError, Direction, Platform};

/// Pages each CPU converts.
const RANGE_PAGES: u64 = 16;
/// Pages from one CPU's range to the next (the rest stay private).
const SLOT_PAGES: u64 = 32;
/// The first slot's page in the test area's block 5 (the in-guest tests
/// use the block's first pages).
const FIRST_SLOT_PAGE: u64 = 256;
/// CPUs that take part (the slots fit in the block's second half).
const MAX_PARTICIPANTS: usize = 8;
const DEFAULT_ROUNDS: u64 = 200;

static RUNNING: AtomicBool = AtomicBool::new(false);
static ROUNDS: AtomicU64 = AtomicU64::new(0);
static PARTICIPANTS: AtomicUsize = AtomicUsize::new(0);
static DONE: AtomicUsize = AtomicUsize::new(0);
/// Per CPU: the seqlock of its range's pattern (odd while converting).
static SEQUENCE: [AtomicU64; MAX_PARTICIPANTS] = [const { AtomicU64::new(0) }; MAX_PARTICIPANTS];
/// Per CPU: whether its range is shared now (its last successful conversion).
static SHARED: [AtomicBool; MAX_PARTICIPANTS] =
    [const { AtomicBool::new(false) }; MAX_PARTICIPANTS];
/// Set once `stop_conversions()` has returned.
static STOPPED: AtomicBool = AtomicBool::new(false);
static CONVERSIONS: AtomicU64 = AtomicU64::new(0);
static REFUSED_STOPPED: AtomicU64 = AtomicU64::new(0);
static ERRORS: AtomicU64 = AtomicU64::new(0);
/// Conversions that succeeded although they started after the stop.
static AFTER_STOP: AtomicU64 = AtomicU64::new(0);
static LOADS: AtomicU64 = AtomicU64::new(0);
static STABLE_LOADS: AtomicU64 = AtomicU64::new(0);
static WRONG: AtomicU64 = AtomicU64::new(0);

fn block5() -> u64 {
    DIRECT_MAP_BASE + super::test_area().0 + 5 * (2 << 20)
}

fn range_of(cpu: usize) -> u64 {
    block5() + (FIRST_SLOT_PAGE + cpu as u64 * SLOT_PAGES) * PAGE_SIZE
}

/// A pattern of CPU `cpu`'s range, distinct from every other CPU's.
fn salt(cpu: usize) -> u64 {
    (cpu as u64 + 1) << 40
}

fn write_pattern(cpu: usize, generation: u64) {
    stress::write_pattern(range_of(cpu), generation, salt(cpu));
}

/// Whether an AP should join (checked by idle APs).
pub fn work_pending() -> bool {
    RUNNING.load(Ordering::SeqCst)
}

/// One CPU's part. The boot CPU converts `ROUNDS` round trips and stops
/// the conversions three quarters of the way; the others go on until they
/// are refused (at most a hundred times as many round trips), so that every
/// CPU meets the stop while converting.
fn take_part(cpu: usize, stop_at: Option<u64>) {
    let participants = PARTICIPANTS.load(Ordering::SeqCst);
    let rounds = match stop_at {
        Some(_) => ROUNDS.load(Ordering::SeqCst),
        None => ROUNDS.load(Ordering::SeqCst).saturating_mul(100),
    };
    let va = VirtAddr(range_of(cpu));
    let (mut loads, mut stable, mut wrong) = (0u64, 0u64, 0u64);
    'rounds: for round in 0..rounds {
        if stop_at == Some(round) {
            engine().stop_conversions();
            STOPPED.store(true, Ordering::SeqCst);
        }
        for direction in [Direction::ToShared, Direction::ToPrivate] {
            let generation = SEQUENCE[cpu].fetch_add(1, Ordering::SeqCst) / 2 + 1;
            let stopped_before = STOPPED.load(Ordering::SeqCst);
            match engine().convert(va, RANGE_PAGES, direction) {
                Ok(_) => {
                    CONVERSIONS.fetch_add(1, Ordering::SeqCst);
                    SHARED[cpu].store(direction == Direction::ToShared, Ordering::SeqCst);
                    if stopped_before {
                        AFTER_STOP.fetch_add(1, Ordering::SeqCst);
                    }
                }
                Err(ConvError::Stopped) => {
                    REFUSED_STOPPED.fetch_add(1, Ordering::SeqCst);
                    write_pattern(cpu, generation);
                    SEQUENCE[cpu].fetch_add(1, Ordering::SeqCst);
                    break 'rounds;
                }
                Err(e) => {
                    ERRORS.fetch_add(1, Ordering::SeqCst);
                    println!("CONCURRENT CPU {cpu}: {direction:?} failed: {e:?}");
                    // Its state is unknown: the sequence stays odd.
                    break 'rounds;
                }
            }
            write_pattern(cpu, generation);
            SEQUENCE[cpu].fetch_add(1, Ordering::SeqCst);
            // Into every other CPU's range, across from its guard page.
            for other in (0..participants).filter(|&o| o != cpu) {
                let first = range_of(other) - PAGE_SIZE;
                for back in 1..=7u64 {
                    // SAFETY: the page before each range is never converted
                    // and stays mapped and present; the range's first page
                    // is mapped or non-present while it converts.
                    let load = unsafe { load_across(first, back, &SEQUENCE[other], salt(other)) };
                    if load.right == Some(false) {
                        wrong += 1;
                        if wrong <= 3 {
                            println!("CONCURRENT CPU {cpu}: wrong value {:#018x} at -{back} into CPU {other}'s range (sequence {} -> {})", load.value, load.before, load.after);
                        }
                    }
                    if load.stable() {
                        stable += 1;
                    }
                    loads += 1;
                }
            }
        }
    }
    LOADS.fetch_add(loads, Ordering::SeqCst);
    STABLE_LOADS.fetch_add(stable, Ordering::SeqCst);
    WRONG.fetch_add(wrong, Ordering::SeqCst);
    DONE.fetch_add(1, Ordering::SeqCst);
}

/// Runs on an AP that found `work_pending()`.
pub fn ap_part() {
    let cpu = super::cpu_index();
    if cpu < PARTICIPANTS.load(Ordering::SeqCst) {
        take_part(cpu, None);
    }
    while RUNNING.load(Ordering::SeqCst) {
        core::hint::spin_loop();
    }
}

/// Runs the whole thing from the boot CPU with `cpus` CPUs online; prints
/// the `CONCURRENT` line and returns whether everything held.
pub fn run(cpus: usize, command_line: &str, wake: impl Fn()) -> bool {
    if cpus < 2 {
        println!("CONCURRENT cpus={cpus} skipped=1");
        return true;
    }
    let rounds = match command_line
        .split_whitespace()
        .find_map(|arg| arg.strip_prefix("concurrent-rounds="))
    {
        None => DEFAULT_ROUNDS,
        Some(value) => match value.parse() {
            Ok(n) if n >= 4 => n,
            _ => panic!("concurrent-rounds={value:?}: want at least 4 round trips"),
        },
    };
    let participants = cpus.min(MAX_PARTICIPANTS).min(MAX_CPUS);
    // The guard page before each range, and each range's first pattern.
    for (cpu, sequence) in SEQUENCE.iter().enumerate().take(participants) {
        let guard = range_of(cpu) - PAGE_SIZE;
        for offset in PAGE_SIZE - 8..PAGE_SIZE {
            // SAFETY: test-area pages of the direct map, present, private,
            // used by nothing else.
            unsafe {
                core::ptr::write_volatile((guard + offset) as *mut u8, first_page_byte(offset))
            };
        }
        sequence.store(0, Ordering::SeqCst);
        write_pattern(cpu, 0);
    }
    let fixups_before = ZEROPAD_FIXUPS.load(Ordering::SeqCst);
    ROUNDS.store(rounds, Ordering::SeqCst);
    PARTICIPANTS.store(participants, Ordering::SeqCst);
    RUNNING.store(true, Ordering::SeqCst);
    wake();
    take_part(0, Some(rounds * 3 / 4));
    let all_done = super::wait_until(600_000_000, || DONE.load(Ordering::SeqCst) == participants);
    RUNNING.store(false, Ordering::SeqCst);
    // Nothing left non-present, and each range as its owner last left it.
    let cc = engine().platform().cc_mask();
    let (mut not_present, mut wrong_state) = (0u64, 0u64);
    for (cpu, shared) in SHARED.iter().enumerate().take(participants) {
        let shared = shared.load(Ordering::SeqCst);
        for page in 0..RANGE_PAGES {
            match engine()
                .tables()
                .lookup_address(VirtAddr(range_of(cpu) + page * PAGE_SIZE))
            {
                Ok(leaf) if !leaf.entry.is_present() => not_present += 1,
                Ok(leaf) if cc.is_shared(leaf.entry) != shared => wrong_state += 1,
                Ok(_) => {}
                Err(_) => not_present += 1,
            }
        }
    }
    let load = |c: &AtomicU64| c.load(Ordering::SeqCst);
    let (conversions, stopped, errors) =
        (load(&CONVERSIONS), load(&REFUSED_STOPPED), load(&ERRORS));
    let (wrong, after_stop, stable) = (load(&WRONG), load(&AFTER_STOP), load(&STABLE_LOADS));
    println!(
        "CONCURRENT cpus={participants} rounds={rounds} conversions={conversions} stopped={stopped} errors={errors} loads={} stable_loads={stable} fixups={} wrong_bytes={wrong} after_stop={after_stop} not_present={not_present} wrong_state_pages={wrong_state} all_done={}",
        load(&LOADS),
        ZEROPAD_FIXUPS.load(Ordering::SeqCst) - fixups_before,
        all_done as u8,
    );
    // Every CPU got to the stop, so each was refused exactly once.
    all_done
        && errors == 0
        && wrong == 0
        && after_stop == 0
        && not_present == 0
        && wrong_state == 0
        && stable > 0
        && stopped == participants as u64
        && engine().conversions_stopped()
}
