//! Issue 8, section 4: the exact operation counts of our conversions as
//! regression guards, from the guest's benchmark (guest/src/kernel/bench.rs)
//! and the emulator's counter snapshots around every call: per conversion
//! one shootdown (one IPI to the other vCPU), one MapGPA for the one GPA
//! run, an ACCEPT per 4K page going private or one for an aligned 2M block,
//! and every page flushed by step 4 going shared in a TD. The legacy order
//! (negative-control build, interleaved with the seven steps in the same
//! boot) must cost the same hypercalls. Also: bad benchmark parameters are
//! refused with a message, never run as something else. The timings are
//! printed, not judged (`make bench` renders them).

use qemu_harness::bench::{run_ours, Bench};
use qemu_harness::{guest_elf, guest_legacy_elf, run_guest, Machine, EXIT_FAIL};
use std::sync::Mutex;
use std::time::Duration;

const SIZES: [u64; 4] = [1, 16, 64, 512];
const ROUNDS: u32 = 3;
static ONE_QEMU_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_QEMU_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The counts a conversion must cost.
fn check(b: &Bench, td: bool) -> Result<(), String> {
    let to_private = b.dir == "to-private";
    let accepts = match (td, to_private, b.pages) {
        (false, _, _) | (true, false, _) => 0.0,
        // The 512-page case is one 2M-aligned block: one 2M ACCEPT.
        (true, true, 512) => 1.0,
        (true, true, pages) => pages as f64,
    };
    let flushed = if td && !to_private {
        b.pages as f64
    } else {
        0.0
    };
    let want = (1.0, if td { 1.0 } else { 0.0 }, accepts, Some(flushed));
    let got = (b.shootdowns, b.map_gpa, b.accepts, b.flushed_pages);
    if got == want {
        Ok(())
    } else {
        Err(format!(
            "{}: (shootdowns, map_gpa, accepts, flushed pages) per conversion {got:?}, want {want:?}",
            b.line()
        ))
    }
}

fn guard(td: bool, legacy_build: bool, orders: &[&str]) {
    let guest = if legacy_build {
        guest_legacy_elf()
    } else {
        guest_elf()
    }
    .unwrap_or_else(|e| panic!("{e}"));
    let _one = one_at_a_time();
    let (run, benches) =
        run_ours(guest, td, 2, ROUNDS, &SIZES, orders).unwrap_or_else(|e| panic!("{e}"));
    println!(
        "bench (td: {td}, orders {orders:?}): {} lines in {:.1} s",
        benches.len(),
        run.elapsed.as_secs_f64()
    );
    for b in &benches {
        println!("{} (counted by the {})", b.line(), b.counted_by);
    }
    assert_eq!(benches.len(), SIZES.len() * 2 * orders.len());
    if td {
        assert!(benches.iter().all(|b| b.counted_by == "emulator"));
    }
    let wrong: Vec<String> = benches.iter().filter_map(|b| check(b, td).err()).collect();
    assert!(
        wrong.is_empty(),
        "operation counts changed:\n{}\n--- serial log ---\n{}",
        wrong.join("\n"),
        run.log
    );
}

#[test]
fn td_conversions_cost_exactly_one_shootdown_one_map_gpa_and_the_accepts_both_orders() {
    guard(true, true, &["seven-steps", "legacy"]);
}

#[test]
fn td_conversions_of_the_production_build_cost_the_same() {
    guard(true, false, &["seven-steps"]);
}

#[test]
fn plain_conversions_cost_one_shootdown_and_nothing_else() {
    guard(false, true, &["seven-steps", "legacy"]);
}

/// A bad benchmark parameter stops the guest with a message naming it.
#[test]
fn bad_benchmark_parameters_are_refused() {
    let guest = guest_elf().unwrap_or_else(|e| panic!("{e}"));
    for (append, says) in [
        ("bench-rounds=0", "bench-rounds=\"0\""),
        ("bench-rounds=1001", "bench-rounds=\"1001\""),
        ("bench-rounds=2 bench-sizes=0", "is not 1..=512 pages"),
        ("bench-rounds=2 bench-sizes=513", "is not 1..=512 pages"),
        ("bench-rounds=2 bench-sizes=1,2,3,4,5", "more than 4 sizes"),
        (
            "bench-rounds=2 bench-orders=legacy",
            "needs a guest built with",
        ),
        ("bench-rounds=2 bench-orders=fast", "unknown order"),
    ] {
        let _one = one_at_a_time();
        let run = run_guest(
            &Machine::Plain {
                guest: guest.clone(),
            },
            1,
            Some(append),
            Duration::from_secs(60),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(run.exit_code, Some(EXIT_FAIL), "{append}: {}", run.log);
        assert!(
            run.log.contains(says) && !run.log.contains("BENCH kernel="),
            "{append}: want a panic saying {says:?} and no BENCH line:\n{}",
            run.log
        );
    }
}
