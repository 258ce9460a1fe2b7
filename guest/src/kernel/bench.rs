//! The conversion cost benchmark (issue 8), the same as Linux's side
//! (linux-td/module/coco_race.c, mode=bench): for 1, 16, 64 and 512 pages
//! (the 512-page case one whole 2M-aligned block), `rounds` times, it times
//! one conversion to shared and one back in TSC cycles and prints the
//! medians, one line per size and direction:
//!
//! `BENCH kernel=ours order=<o> platform=<td|snp|plain> cpus=N pages=P
//! dir=<to-shared|to-private> cycles=<median> rounds=K guest_shootdowns=S
//! guest_ipis=I guest_map_gpa=M guest_accepts=A flushed_pages=F`
//!
//! The counts are per conversion, from this kernel's own counters. In a TD
//! it also writes the emulator's counter-snapshot tags around every call,
//! as the module does, so the harness reads both kernels' counts from the
//! emulator the same way: [`snapshot_tag`].
//!
//! Command line: `bench-rounds=<K>` (1..=1000) selects the benchmark
//! instead of the tests and the stress; `bench-sizes=<p,p,...>` (each
//! 1..=512, at most 4) replaces the sizes; `bench-orders=<o,o>` lists the
//! orders to time (default `seven-steps`; `legacy` needs the
//! negative-control build), interleaved round by round on the same pages,
//! so that their ratio is measured in one boot under the same conditions.

use super::engine::ConversionWork;
use super::stress::Order;
use super::{memory, td};
use bare::println;
use coco_pagetable::VirtAddr;
use set_memory_enc::Direction;

/// Most rounds per size (the module's limit too).
pub const MAX_ROUNDS: usize = 1000;
/// Pages in one 2M block: the largest size.
pub const MAX_PAGES: u64 = 512;
const MAX_SIZES: usize = 4;
const DEFAULT_SIZES: [u64; MAX_SIZES] = [1, 16, 64, 512];

/// What the command line asks of the benchmark.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Timed round trips per size.
    pub rounds: usize,
    sizes: [u64; MAX_SIZES],
    size_count: usize,
    orders: [Order; MAX_ORDERS],
    order_count: usize,
}

const MAX_ORDERS: usize = 2;

impl Settings {
    /// `None` without `bench-rounds=`. A bad value panics: a benchmark that
    /// silently measured something else would mislead.
    pub fn from_command_line(command_line: &str) -> Option<Settings> {
        let word = |key: &str| {
            command_line
                .split_whitespace()
                .find_map(|arg| arg.strip_prefix(key))
        };
        let rounds = word("bench-rounds=")?;
        let rounds = match rounds.parse::<usize>() {
            Ok(n) if (1..=MAX_ROUNDS).contains(&n) => n,
            _ => panic!("bench-rounds={rounds:?}: want 1..={MAX_ROUNDS}"),
        };
        let (mut sizes, mut size_count) = (DEFAULT_SIZES, MAX_SIZES);
        if let Some(list) = word("bench-sizes=") {
            size_count = 0;
            for item in list.split(',') {
                let pages = match item.parse::<u64>() {
                    Ok(p) if (1..=MAX_PAGES).contains(&p) => p,
                    _ => panic!("bench-sizes={list:?}: {item:?} is not 1..={MAX_PAGES} pages"),
                };
                if size_count == MAX_SIZES {
                    panic!("bench-sizes={list:?}: more than {MAX_SIZES} sizes");
                }
                sizes[size_count] = pages;
                size_count += 1;
            }
        }
        let (mut orders, mut order_count) = ([Order::SevenSteps; MAX_ORDERS], 1);
        if let Some(list) = word("bench-orders=") {
            order_count = 0;
            for name in list.split(',') {
                if order_count == MAX_ORDERS {
                    panic!("bench-orders={list:?}: more than {MAX_ORDERS} orders");
                }
                orders[order_count] = Order::from_name(name);
                order_count += 1;
            }
        }
        Some(Settings {
            rounds,
            sizes,
            size_count,
            orders,
            order_count,
        })
    }

    fn sizes(&self) -> &[u64] {
        &self.sizes[..self.size_count]
    }

    fn orders(&self) -> &[Order] {
        &self.orders[..self.order_count]
    }
}

/// The snapshot tag written before each timed call and after the last one:
/// `1_000_000 + 10 * pages + phase`, phase `2 * o` before a conversion to
/// shared in the o-th order of `bench-orders=`, `2 * o + 1` before one to
/// private, 9 after a size's last round. The counters between a tag and the
/// next are that call's. linux-td/module/coco_race.c writes the same tags
/// (one order).
pub const fn snapshot_tag(pages: u64, phase: u64) -> u32 {
    (1_000_000 + 10 * pages + phase) as u32
}

/// The phase after a size's last round.
const END_PHASE: u64 = 9;

/// Tells the emulator to print its counters with `tag` (a TD only; port
/// 0xf8 is the emulator's, and nothing on a plain machine).
fn snapshot(tag: u32) {
    if td::active() {
        // SAFETY: port 0xf8 is the emulator's counter-snapshot port; the
        // write has no other effect (it is a #VE, which the handler turns
        // into the IO TDVMCALL).
        unsafe { bare::cpu::outl(0xf8, tag) };
    }
}

/// Cycles of each round, per order and direction (one benchmark at a
/// time: the boot CPU runs it).
static SAMPLES: spin::Mutex<[[u64; MAX_ROUNDS]; 2 * MAX_ORDERS]> =
    spin::Mutex::new([[0; MAX_ROUNDS]; 2 * MAX_ORDERS]);

fn median(samples: &mut [u64]) -> u64 {
    samples.sort_unstable();
    let n = samples.len();
    if n % 2 == 1 {
        samples[n / 2]
    } else {
        (samples[n / 2 - 1] + samples[n / 2]) / 2
    }
}

/// Hundredths, printed as a decimal (`1.50`).
struct PerConversion(u64, u64);

impl core::fmt::Display for PerConversion {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let hundredths = (self.0 * 100 + self.1 / 2) / self.1.max(1);
        write!(f, "{}.{:02}", hundredths / 100, hundredths % 100)
    }
}

/// What step 3 costs on its own, to say whether a range flush would pay:
/// the medians of a full local flush (global entries included), of one
/// INVLPG, and of a whole shootdown (IPIs, every CPU's full flush, the
/// wait). Printed as `BENCH-TLB cpus=N full_flush=X invlpg=Y shootdown=Z`.
fn time_tlb_flushes(cpus: usize, samples: &mut [u64]) {
    let mut time = |op: &dyn Fn()| {
        for sample in samples.iter_mut() {
            let t0 = bare::cpu::read_tsc_ordered();
            op();
            *sample = bare::cpu::read_tsc_ordered() - t0;
        }
        median(samples)
    };
    let page = memory::DIRECT_MAP_BASE + super::test_area().0;
    let full = time(&bare::cpu::flush_tlb_local);
    let one = time(&|| bare::cpu::invlpg(page));
    let shootdown = time(&super::shootdown::flush_all_cpus);
    println!("BENCH-TLB cpus={cpus} full_flush={full} invlpg={one} shootdown={shootdown}");
}

/// Runs the benchmark on the boot CPU with `cpus` CPUs online; returns
/// whether every conversion succeeded. Size number s uses test-area block
/// s, from its start.
pub fn run(cpus: usize, settings: Settings) -> bool {
    let rounds = settings.rounds;
    let platform = super::engine::engine().platform().name();
    let mut samples = SAMPLES.lock();
    time_tlb_flushes(cpus, &mut samples[0][..rounds]);
    for (s, &pages) in settings.sizes().iter().enumerate() {
        let block = super::test_area().0 + s as u64 * (2 << 20);
        let va = VirtAddr(memory::DIRECT_MAP_BASE + block);
        let mut work = [ConversionWork::default(); 2 * MAX_ORDERS];
        for round in 0..rounds {
            for (o, order) in settings.orders().iter().enumerate() {
                for (d, direction) in [Direction::ToShared, Direction::ToPrivate]
                    .into_iter()
                    .enumerate()
                {
                    let phase = 2 * o + d;
                    snapshot(snapshot_tag(pages, phase as u64));
                    let before = ConversionWork::now();
                    let t0 = bare::cpu::read_tsc_ordered();
                    let result = order.convert(va, pages, direction);
                    let t1 = bare::cpu::read_tsc_ordered();
                    work[phase].add(ConversionWork::now().since(before));
                    samples[phase][round] = t1 - t0;
                    if let Err(e) = result {
                        // The block's state is unknown: stop, leave it be.
                        snapshot(snapshot_tag(pages, END_PHASE));
                        println!(
                            "BENCH failed: {} order, {pages} pages {direction:?} round {round}: {e:?}",
                            order.name()
                        );
                        return false;
                    }
                }
            }
        }
        snapshot(snapshot_tag(pages, END_PHASE));
        for (o, order) in settings.orders().iter().enumerate() {
            for (d, dir) in ["to-shared", "to-private"].into_iter().enumerate() {
                let phase = 2 * o + d;
                let conversions = rounds as u64;
                let w = work[phase];
                println!(
                    "BENCH kernel=ours order={} platform={platform} cpus={cpus} pages={pages} dir={dir} cycles={} rounds={rounds} guest_shootdowns={} guest_ipis={} guest_map_gpa={} guest_accepts={} flushed_pages={}",
                    order.name(),
                    median(&mut samples[phase][..rounds]),
                    PerConversion(w.shootdowns, conversions),
                    PerConversion(w.ipis, conversions),
                    PerConversion(w.map_gpa, conversions),
                    PerConversion(w.accepts, conversions),
                    PerConversion(w.flushed_pages, conversions),
                );
            }
        }
    }
    true
}
