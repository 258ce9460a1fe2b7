//! The stress this project exists for. The boot CPU converts one page back
//! and forth while every other CPU runs `load_unaligned_zeropad()` across the
//! boundary into it from the page before. Every loaded value is checked: the
//! bytes inside the first page must be exact; the bytes beyond the boundary
//! either the converted page's bytes (it was present) or zero (the load hit
//! the non-present window and the #PF fixup ran). Any other value, or any
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

use super::engine::engine;
use super::faults::{EPT_VIOLATION_VE, UNEXPECTED_FAULTS, VE_TAKEN};
use super::memory::DIRECT_MAP_BASE;
use bare::extable::{load_unaligned_zeropad, ZEROPAD_FIXUPS};
use bare::println;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use pagetable::{VirtAddr, PAGE_SIZE};
use set_memory_enc::platform::TdxError;
use set_memory_enc::{ConvError, ConvStats, Direction};

/// What the command line asks of the stress.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// How it converts.
    pub order: Order,
    /// Round trips (shared then private); each is two conversions.
    pub round_trips: u64,
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
        Settings {
            order: Order::from_command_line(command_line),
            round_trips,
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
    ) -> Result<ConvStats, ConvError<TdxError>> {
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

fn first_page_byte(offset: u64) -> u8 {
    (offset % 239) as u8 ^ 0xa5
}

fn converted_page_byte(offset: u64) -> u8 {
    (offset % 241) as u8 ^ 0x3c
}

/// What a load at `PAGE_SIZE - back` of the first page may return: the
/// bytes read through the boundary, or those bytes with zeros past it.
fn acceptable(back: u64) -> (u64, u64) {
    let mut inside = 0u64;
    let mut beyond = 0u64;
    for k in 0..8 {
        if k < back {
            inside |= u64::from(first_page_byte(PAGE_SIZE - back + k)) << (8 * k);
        } else {
            beyond |= u64::from(converted_page_byte(k - back)) << (8 * k);
        }
    }
    (inside | beyond, inside)
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
    let expected: [(u64, u64); 8] = core::array::from_fn(|back| acceptable(back as u64));
    let mut loads = 0u64;
    let mut wrong = 0u64;
    while RUNNING.load(Ordering::Relaxed) {
        for back in 1..=7u64 {
            let address = first + PAGE_SIZE - back;
            // SAFETY: the first page stays mapped and present for the whole
            // stress; the next one is the page under conversion, which is
            // exactly what load_unaligned_zeropad is for.
            let value = unsafe { load_unaligned_zeropad(address as *const u8) };
            let (through, zeropadded) = expected[back as usize];
            if value != through && value != zeropadded {
                wrong += 1;
                if wrong <= 3 {
                    println!("STRESS wrong value at -{back}: {value:#018x} (want {through:#018x} or {zeropadded:#018x})");
                }
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
    let Settings { order, round_trips } = settings;
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
            core::ptr::write_volatile((converted + offset) as *mut u8, converted_page_byte(offset));
        }
    }
    let fixups_before = ZEROPAD_FIXUPS.load(Ordering::SeqCst);
    let faults_before = UNEXPECTED_FAULTS.load(Ordering::SeqCst);
    let ve_before = EPT_VIOLATION_VE.load(Ordering::SeqCst);
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
    let platform_before = PlatformWork::now();

    let mut conversions = 0u64;
    let mut errors = 0u64;
    // Five progress lines, whatever the length.
    let progress_every = round_trips.div_ceil(5);
    for round in 0..round_trips {
        if show_progress && round % progress_every == 0 {
            println!(
                "stress: {round} round trips, {} fixups so far",
                ZEROPAD_FIXUPS.load(Ordering::Relaxed) - fixups_before
            );
        }
        for direction in [Direction::ToShared, Direction::ToPrivate] {
            match order.convert(VirtAddr(converted), 1, direction) {
                Ok(_) => conversions += 1,
                Err(e) => {
                    errors += 1;
                    if errors <= 3 {
                        println!("STRESS conversion failed: {e:?}");
                    }
                }
            }
        }
    }

    let ve_any = VE_TAKEN.load(Ordering::SeqCst) - any_ve_before;
    let platform = PlatformWork::now().since(platform_before);
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
    println!(
        "STRESS cpus={cpus} conversions={conversions} conversion_errors={errors} loads={loads} fixups={fixups} unexpected_faults={unexpected} wrong_bytes={wrong} shootdowns={} ipis={} ve={ve} ve_any={ve_any} order={} map_gpa_during={} accepts_during={} flushed_pages_during={}",
        super::shootdown::SHOOTDOWNS.load(Ordering::SeqCst),
        super::shootdown::IPIS_SENT.load(Ordering::SeqCst),
        order.name(),
        platform.map_gpa_calls,
        platform.accepts,
        platform.flushed_pages,
    );
    let sound =
        errors == 0 && wrong == 0 && unexpected == 0 && ve == 0 && conversions == 2 * round_trips;
    match order {
        // The window was hit.
        Order::SevenSteps => sound && fixups > 0,
        // There is no window to hit.
        #[cfg(feature = "negative-control")]
        Order::Legacy => sound,
    }
}

/// What the conversions asked of the platform: MapGPA calls, successful
/// ACCEPTs (any size) and pages step 4 flushed (all zero outside a TD).
#[derive(Clone, Copy)]
struct PlatformWork {
    map_gpa_calls: u64,
    accepts: u64,
    flushed_pages: u64,
}

impl PlatformWork {
    fn now() -> PlatformWork {
        let load = |counter: &AtomicU64| counter.load(Ordering::SeqCst);
        let sent = engine().platform().tdx().map(|tdx| tdx.counters());
        PlatformWork {
            map_gpa_calls: sent.map_or(0, |c| load(&c.map_gpa_calls)),
            accepts: sent.map_or(0, |c| c.accepted.iter().map(load).sum()),
            flushed_pages: load(&super::cacheflush::FLUSHED_PAGES),
        }
    }

    fn since(self, before: PlatformWork) -> PlatformWork {
        PlatformWork {
            map_gpa_calls: self.map_gpa_calls - before.map_gpa_calls,
            accepts: self.accepts - before.accepts,
            flushed_pages: self.flushed_pages - before.flushed_pages,
        }
    }
}
