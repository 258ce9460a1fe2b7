//! Bounded waits on the time-stamp counter, for machines with no PIT to time them: a TD has
//! no port I/O timing (its port I/O goes through the VMM), so [`crate::smp::wait_until`] is not
//! for it.
//!
//! The TSC's frequency is not known without a reference clock, so a timeout is converted to
//! ticks at [`ASSUMED_MAX_TSC_HZ`], above any real TSC: the wait lasts at least as long as asked,
//! longer on a slower TSC (3x at 3.3 GHz), never shorter. That suits what these waits are for:
//! deciding that something will not happen. Under QEMU TCG (and an emulated TD on it) RDTSC reads
//! the host's clock, so the bound holds however slowly the guest runs.

/// The TSC frequency timeouts are converted with (10 GHz).
pub const ASSUMED_MAX_TSC_HZ: u64 = 10_000_000_000;

/// TSC ticks that take at least `us` microseconds on any TSC up to [`ASSUMED_MAX_TSC_HZ`]
/// (saturating).
pub const fn ticks_for_at_least_us(us: u64) -> u64 {
    us.saturating_mul(ASSUMED_MAX_TSC_HZ / 1_000_000)
}

/// Polls `condition` until it holds (true) or `limit` ticks of `clock` passed since the first
/// poll (false). `condition` is polled once more after the limit, so a condition that became
/// true just as time ran out is not reported as a timeout. The clock may wrap.
pub fn wait_until_with_clock(
    mut clock: impl FnMut() -> u64,
    limit: u64,
    mut condition: impl FnMut() -> bool,
) -> bool {
    let start = clock();
    loop {
        if condition() {
            return true;
        }
        if clock().wrapping_sub(start) >= limit {
            return condition();
        }
        core::hint::spin_loop();
    }
}

/// Polls `condition` until it holds (true) or at least `timeout_us` microseconds passed
/// (false), timed by this CPU's TSC. Usable on any CPU, concurrently, and in handlers.
#[cfg(target_os = "none")]
pub fn wait_until(timeout_us: u64, condition: impl FnMut() -> bool) -> bool {
    wait_until_with_clock(
        crate::cpu::read_tsc,
        ticks_for_at_least_us(timeout_us),
        condition,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn ticks_cover_the_fastest_assumed_tsc_and_saturate() {
        assert_eq!(ticks_for_at_least_us(1), 10_000);
        assert_eq!(ticks_for_at_least_us(1_000_000), ASSUMED_MAX_TSC_HZ);
        assert_eq!(ticks_for_at_least_us(u64::MAX), u64::MAX);
    }

    #[test]
    fn a_condition_that_holds_returns_at_once() {
        let reads = Cell::new(0);
        let clock = || {
            reads.set(reads.get() + 1);
            0
        };
        assert!(wait_until_with_clock(clock, 100, || true));
        assert_eq!(reads.get(), 1);
    }

    #[test]
    fn the_wait_ends_once_the_limit_has_passed_and_not_before() {
        let now = Cell::new(0u64);
        let polls = Cell::new(0u64);
        let clock = || {
            now.set(now.get() + 10);
            now.get()
        };
        let condition = || {
            polls.set(polls.get() + 1);
            false
        };
        assert!(!wait_until_with_clock(clock, 100, condition));
        // Started at 10; gives up at the first reading >= 110, after one last poll.
        assert_eq!(now.get(), 110);
        assert_eq!(polls.get(), 11);
    }

    #[test]
    fn a_condition_true_at_the_deadline_counts() {
        let now = Cell::new(0u64);
        let clock = || {
            now.set(now.get() + 50);
            now.get()
        };
        assert!(wait_until_with_clock(clock, 100, || now.get() >= 150));
    }

    #[test]
    fn a_wrapping_clock_still_times_out() {
        let now = Cell::new(u64::MAX - 25);
        let clock = || {
            now.set(now.get().wrapping_add(10));
            now.get()
        };
        assert!(!wait_until_with_clock(clock, 40, || false));
        assert_eq!(now.get(), 24);
    }
}
