//! The stress this project exists for. The boot CPU converts one page back
//! and forth while every other CPU runs `load_unaligned_zeropad()` across the
//! boundary into it from the page before. After every conversion the boot
//! CPU writes a fresh pattern into the converted page (a new one each
//! conversion, so different in the private and the shared state; never a
//! zero byte), inside a seqlock. Every loaded value is checked: the bytes
//! inside the first page must be exact; the bytes beyond the boundary, when
//! no conversion ran during the load, exactly the pattern in place (a stale
//! or wrong page shows here: both MapGPA and ACCEPT zero the page in a TD,
//! so a fixed pattern would have been "the page's bytes or zero" either
//! way); during a conversion, each byte that of the old or the new pattern,
//! or zero (the non-present window's #PF fixup, or a page just zeroed).
//! `stable_loads=` counts the exact checks and must be above 0. Any other
//! value, or any
//! fault other than that #PF, is a failure; so is any EPT-violation #VE in a
//! TD (`ve=`; `faults` makes each one fatal at once, so a run that gets to
//! the `STRESS` line reports 0, and the check stands guard should that
//! change).
//!
//! Command line: `stress-rounds=<n>` sets the round trips (default
//! 10,000; a TD under the emulator runs far slower). `order=legacy`, only
//! in a kernel built with the `negative-control` feature, converts in the
//! legacy order instead (flip, flush, notify: no non-present window): the
//! negative control. In a TD it is expected to end at the first
//! EPT-violation #VE, which the emulator counts; elsewhere nothing can see
//! the window missing, and the run passes without needing `fixups > 0`.
//! `stress-skip-pattern=<n>` leaves the pattern of conversion n unwritten:
//! the negative control of the pattern check (wrong values, a failed run).

use super::engine::GuestError;
use super::engine::{engine, ConversionWork};
use super::faults::{EPT_VIOLATION_VE, UNEXPECTED_FAULTS, VE_TAKEN};
use super::memory::DIRECT_MAP_BASE;
use bare::extable::{load_unaligned_zeropad, ZEROPAD_FIXUPS};
use bare::println;
use coco_pagetable::{VirtAddr, PAGE_SIZE};
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use set_memory_enc::{ConvError, ConvStats, Direction};

/// What the command line asks of the stress.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// How it converts.
    pub order: Order,
    /// Round trips (shared then private); each is two conversions.
    pub round_trips: u64,
    /// Negative control: after this conversion (counted from 1) the boot
    /// CPU does not write the new pattern, so loads must find the page
    /// wrong (`stress-skip-pattern=<n>`).
    pub skip_pattern: Option<u64>,
}

/// Round trips without `stress-rounds=`.
pub const DEFAULT_ROUND_TRIPS: u64 = 10_000;

impl Settings {
    /// From `order=` and `stress-rounds=` on the command line. A bad value
    /// panics: a stress that silently ran otherwise would prove nothing.
    pub fn from_command_line(command_line: &str) -> Settings {
        let round_trips = match command_line
            .split_whitespace()
            .find_map(|arg| arg.strip_prefix("stress-rounds="))
        {
            None => DEFAULT_ROUND_TRIPS,
            Some(value) => match value.parse() {
                Ok(n) if n > 0 => n,
                _ => panic!("stress-rounds={value:?}: want a number of round trips above 0"),
            },
        };
        let skip_pattern = command_line
            .split_whitespace()
            .find_map(|arg| arg.strip_prefix("stress-skip-pattern="))
            .map(|value| match value.parse() {
                Ok(n) if n > 0 => n,
                _ => panic!("stress-skip-pattern={value:?}: want a conversion number above 0"),
            });
        Settings {
            order: Order::from_command_line(command_line),
            round_trips,
            skip_pattern,
        }
    }
}

/// How the stress converts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// The seven steps, with the non-present window.
    SevenSteps,
    /// The legacy order, the negative control.
    #[cfg(feature = "negative-control")]
    Legacy,
}

impl Order {
    /// From `order=` on the command line (default: the seven steps). An
    /// unknown value, or `legacy` in a kernel built without the
    /// `negative-control` feature, panics: a control that silently ran the
    /// other order would prove nothing.
    pub fn from_command_line(command_line: &str) -> Order {
        match command_line
            .split_whitespace()
            .find_map(|arg| arg.strip_prefix("order="))
        {
            None => Order::SevenSteps,
            Some(name) => Order::from_name(name),
        }
    }

    /// The order `name` names (see [`Order::from_command_line`]).
    pub fn from_name(name: &str) -> Order {
        match name {
            "seven-steps" => Order::SevenSteps,
            #[cfg(feature = "negative-control")]
            "legacy" => Order::Legacy,
            #[cfg(not(feature = "negative-control"))]
            "legacy" => panic!(
                "order=legacy needs a guest built with --features negative-control; \
                 refusing to run in the seven-step order instead"
            ),
            other => panic!("unknown order {other:?} (seven-steps or legacy)"),
        }
    }

    /// The name `order=` takes.
    pub fn name(self) -> &'static str {
        match self {
            Order::SevenSteps => "seven-steps",
            #[cfg(feature = "negative-control")]
            Order::Legacy => "legacy",
        }
    }

    /// Converts `pages` pages from `va` in this order.
    pub fn convert(
        self,
        va: VirtAddr,
        pages: u64,
        direction: Direction,
    ) -> Result<ConvStats, ConvError<GuestError>> {
        match self {
            Order::SevenSteps => engine().convert(va, pages, direction),
            #[cfg(feature = "negative-control")]
            Order::Legacy => engine().convert_in_legacy_order(va, pages, direction),
        }
    }
}

static RUNNING: AtomicBool = AtomicBool::new(false);
static LOADERS_ACTIVE: AtomicUsize = AtomicUsize::new(0);
static LOADS: AtomicU64 = AtomicU64::new(0);
static WRONG_BYTES: AtomicU64 = AtomicU64::new(0);
/// VA of the page before the converted one (0 when no stress is set up).
static FIRST_PAGE: AtomicU64 = AtomicU64::new(0);

/// Byte `offset` of the never-converted page the loads start in.
pub fn first_page_byte(offset: u64) -> u8 {
    (offset % 239) as u8 ^ 0xa5
}

/// Byte `offset` of a converted page's pattern after conversion number
/// `generation` (0: before the first), for the page `salt` names (0: the
/// stress's; each concurrent range its own): different every conversion,
/// so in the private and the shared state too, and never zero, so that it
/// cannot pass for a zero-padded byte or a freshly zeroed page.
fn pattern_byte(offset: u64, generation: u64, salt: u64) -> u8 {
    let g = generation.wrapping_add(salt);
    let mixed = offset.wrapping_mul(37) ^ g.wrapping_mul(0x9e37_79b9) ^ (g >> 7);
    (mixed % 255) as u8 + 1
}

/// Bytes of the converted page the boot CPU rewrites after every
/// conversion (the loaders read its first 7).
const PATTERN_BYTES: u64 = 64;

/// Seqlock over the pattern: odd while a conversion and its rewrite are in
/// progress; `SEQUENCE / 2` is the generation of the pattern in place.
static SEQUENCE: AtomicU64 = AtomicU64::new(0);
/// Loads checked against one exact pattern (no conversion in progress).
static STABLE_LOADS: AtomicU64 = AtomicU64::new(0);
/// How long, in spins, the boot CPU leaves a new pattern in place for a
/// loader to check exactly before it converts again.
const STABLE_WAIT_SPINS: u32 = 1 << 16;

/// Writes generation `generation`'s pattern of the page `salt` names
/// ([`pattern_byte`]) into `page`, which is present and only its
/// writer's between conversions.
pub fn write_pattern(page: u64, generation: u64, salt: u64) {
    for offset in 0..PATTERN_BYTES {
        // SAFETY: `page` is a test-area page of the direct map (the stress's
        // or a concurrent range's), present between conversions and written
        // by nothing else meanwhile.
        unsafe {
            core::ptr::write_volatile(
                (page + offset) as *mut u8,
                pattern_byte(offset, generation, salt),
            )
        };
    }
}

/// One load across into a patterned page, checked.
pub struct CheckedLoad {
    pub value: u64,
    /// The page's seqlock before and after the load.
    pub before: u64,
    pub after: u64,
    /// [`load_is_right`]'s verdict.
    pub right: Option<bool>,
}

impl CheckedLoad {
    /// No conversion ran during the load: it was held to one exact pattern.
    pub fn stable(&self) -> bool {
        self.before == self.after && self.before.is_multiple_of(2)
    }
}

/// `load_unaligned_zeropad()` at `PAGE_SIZE - back` of `first`, into the
/// page after it, whose patterns `salt` names, between two reads of its
/// seqlock `sequence`; checked with [`load_is_right`].
///
/// # Safety
/// `first` stays mapped and present; the page after it is mapped, or
/// non-present while it converts (what the zeropad fixup is for).
pub unsafe fn load_across(first: u64, back: u64, sequence: &AtomicU64, salt: u64) -> CheckedLoad {
    let before = sequence.load(Ordering::Acquire);
    // SAFETY: the caller's contract; the 8 bytes start inside `first`.
    let value = unsafe { load_unaligned_zeropad((first + PAGE_SIZE - back) as *const u8) };
    // Seqlock read side: the load above stays before the re-read.
    core::sync::atomic::fence(Ordering::Acquire);
    let after = sequence.load(Ordering::Relaxed);
    CheckedLoad {
        value,
        before,
        after,
        right: load_is_right(value, back, before, after, salt),
    }
}

/// Whether `value`, loaded at `PAGE_SIZE - back` of the first page between
/// reading `SEQUENCE` as `before` and as `after`, is right: the first page's
/// bytes exactly; past the boundary, with no conversion in between, exactly
/// the pattern in place; otherwise each byte that of a pattern of the
/// generations involved, or zero (the #PF fixup's zero padding, or a page
/// the conversion zeroed). `None`: too many conversions went by to say.
/// `salt`: which page's patterns ([`pattern_byte`]; 0 for the
/// stress's page).
fn load_is_right(value: u64, back: u64, before: u64, after: u64, salt: u64) -> Option<bool> {
    let stable = before == after && before.is_multiple_of(2);
    if after.wrapping_sub(before) > 2 {
        return None;
    }
    let (oldest, newest) = (before / 2, after.div_ceil(2));
    let right = (0..8u64).all(|k| {
        let byte = (value >> (8 * k)) as u8;
        if k < back {
            return byte == first_page_byte(PAGE_SIZE - back + k);
        }
        let offset = k - back;
        if stable {
            return byte == pattern_byte(offset, oldest, salt);
        }
        byte == 0 || (oldest..=newest).any(|g| byte == pattern_byte(offset, g, salt))
    });
    Some(right)
}

/// Whether a stress is running that this CPU should join.
pub fn work_pending() -> bool {
    RUNNING.load(Ordering::SeqCst)
}

/// Runs on every CPU but the boot CPU while the stress is on.
pub fn loader_loop() {
    let first = FIRST_PAGE.load(Ordering::SeqCst);
    if first == 0 {
        return;
    }
    LOADERS_ACTIVE.fetch_add(1, Ordering::SeqCst);
    let mut loads = 0u64;
    let mut wrong = 0u64;
    while RUNNING.load(Ordering::Relaxed) {
        for back in 1..=7u64 {
            // SAFETY: the first page stays mapped and present for the whole
            // stress; the next one is the page under conversion.
            let load = unsafe { load_across(first, back, &SEQUENCE, 0) };
            if load.right == Some(false) {
                wrong += 1;
                if wrong <= 3 {
                    println!(
                        "STRESS wrong value at -{back}: {:#018x} (sequence {} -> {})",
                        load.value, load.before, load.after
                    );
                }
            }
            if load.stable() {
                STABLE_LOADS.fetch_add(1, Ordering::Relaxed);
            }
            loads += 1;
        }
    }
    LOADS.fetch_add(loads, Ordering::SeqCst);
    WRONG_BYTES.fetch_add(wrong, Ordering::SeqCst);
    LOADERS_ACTIVE.fetch_sub(1, Ordering::SeqCst);
}

/// Runs the stress from the boot CPU with `cpus` CPUs online, prints the
/// `STRESS` line, and returns whether it proved something and found nothing
/// wrong. `wake_loaders` makes the other CPUs enter `loader_loop`.
pub fn run(cpus: usize, first_page_pa: u64, settings: Settings, wake_loaders: impl Fn()) -> bool {
    let Settings {
        order,
        round_trips,
        skip_pattern,
    } = settings;
    if cpus < 2 {
        println!("STRESS cpus={cpus} skipped=1");
        return true;
    }
    let first = DIRECT_MAP_BASE + first_page_pa;
    let converted = first + PAGE_SIZE;
    for offset in 0..PAGE_SIZE {
        // SAFETY: both pages are test-area pages of the direct map, present,
        // private, used by nothing else.
        unsafe {
            core::ptr::write_volatile((first + offset) as *mut u8, first_page_byte(offset));
        }
    }
    SEQUENCE.store(0, Ordering::SeqCst);
    write_pattern(converted, 0, 0);
    let stable_before = STABLE_LOADS.load(Ordering::SeqCst);
    let fixups_before = ZEROPAD_FIXUPS.load(Ordering::SeqCst);
    let faults_before = UNEXPECTED_FAULTS.load(Ordering::SeqCst);
    let ve_before = EPT_VIOLATION_VE.load(Ordering::SeqCst);
    let vc_404_before = super::snp::VC_NOT_VALIDATED.load(Ordering::SeqCst);
    // In a TD every console byte is a #VE (port IO): no progress lines
    // there, so that "no #VE of any kind during the stress" can be checked.
    let show_progress = !super::td::active();
    FIRST_PAGE.store(first, Ordering::SeqCst);
    RUNNING.store(true, Ordering::SeqCst);
    wake_loaders();
    while LOADERS_ACTIVE.load(Ordering::SeqCst) < cpus - 1 {
        core::hint::spin_loop();
    }
    // The window is the conversions themselves: idle CPUs halting (a #VE
    // in a TD) before they join, or after they leave, are not part of it.
    let any_ve_before = VE_TAKEN.load(Ordering::SeqCst);
    let platform_before = ConversionWork::now();

    let mut conversions = 0u64;
    let mut errors = 0u64;
    // Five progress lines, whatever the length.
    let progress_every = round_trips.div_ceil(5);
    'rounds: for round in 0..round_trips {
        if show_progress && round % progress_every == 0 {
            println!(
                "stress: {round} round trips, {} fixups so far",
                ZEROPAD_FIXUPS.load(Ordering::Relaxed) - fixups_before
            );
        }
        for direction in [Direction::ToShared, Direction::ToPrivate] {
            // Odd: in flux until the new pattern is in place.
            let generation = SEQUENCE.fetch_add(1, Ordering::SeqCst) / 2 + 1;
            match order.convert(VirtAddr(converted), 1, direction) {
                Ok(_) => conversions += 1,
                Err(e) => {
                    // The page's state is unknown: stop, and leave the
                    // sequence odd so that no load is held to a pattern.
                    errors += 1;
                    println!("STRESS conversion failed: {e:?}");
                    break 'rounds;
                }
            }
            if skip_pattern != Some(conversions) {
                write_pattern(converted, generation, 0);
            }
            SEQUENCE.fetch_add(1, Ordering::SeqCst);
            // Back to back, conversions would leave no load a stable
            // pattern to check: wait (bounded) until one loader did.
            let seen = STABLE_LOADS.load(Ordering::SeqCst);
            for _ in 0..STABLE_WAIT_SPINS {
                if STABLE_LOADS.load(Ordering::Relaxed) != seen {
                    break;
                }
                core::hint::spin_loop();
            }
        }
    }

    let ve_any = VE_TAKEN.load(Ordering::SeqCst) - any_ve_before;
    let platform = ConversionWork::now().since(platform_before);
    RUNNING.store(false, Ordering::SeqCst);
    while LOADERS_ACTIVE.load(Ordering::SeqCst) > 0 {
        core::hint::spin_loop();
    }
    FIRST_PAGE.store(0, Ordering::SeqCst);
    let ve = EPT_VIOLATION_VE.load(Ordering::SeqCst) - ve_before;
    let fixups = ZEROPAD_FIXUPS.load(Ordering::SeqCst) - fixups_before;
    let unexpected = UNEXPECTED_FAULTS.load(Ordering::SeqCst) - faults_before;
    let loads = LOADS.load(Ordering::SeqCst);
    let wrong = WRONG_BYTES.load(Ordering::SeqCst);
    let stable = STABLE_LOADS.load(Ordering::SeqCst) - stable_before;
    let vc_404 = super::snp::VC_NOT_VALIDATED.load(Ordering::SeqCst) - vc_404_before;
    println!(
        "STRESS cpus={cpus} platform={} vc_404={vc_404} conversions={conversions} conversion_errors={errors} loads={loads} stable_loads={stable} fixups={fixups} unexpected_faults={unexpected} wrong_bytes={wrong} shootdowns={} ipis={} ve={ve} ve_any={ve_any} order={} map_gpa_during={} accepts_during={} flushed_pages_during={}",
        super::engine::engine().platform().name(),
        super::shootdown::SHOOTDOWNS.load(Ordering::SeqCst),
        super::shootdown::IPIS_SENT.load(Ordering::SeqCst),
        order.name(),
        platform.map_gpa,
        platform.accepts,
        platform.flushed_pages,
    );
    // Loads held to one exact pattern: without them the fresh patterns
    // prove nothing.
    let sound = errors == 0
        && wrong == 0
        && unexpected == 0
        && ve == 0
        && vc_404 == 0
        && stable > 0
        && conversions == 2 * round_trips;
    match order {
        // The window was hit.
        Order::SevenSteps => sound && fixups > 0,
        // There is no window to hit.
        #[cfg(feature = "negative-control")]
        Order::Legacy => sound,
    }
}
