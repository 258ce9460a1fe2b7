//! A hostile VMM, seen from the guest (issue 11). Run as a TD under the
//! emulator option of the same name, `hostile=<scenario>` converts 16 pages
//! and meets the VMM's misbehaviour:
//! - `mapgpa-fail-after` (`mapgpa-fail-after=<k>`, k < 16): going shared,
//!   the VMM converts k pages and answers INVALID_OPERAND with no resume
//!   point;
//! - `mapgpa-bad-retry-outside|unaligned|stuck` (`mapgpa-bad-retry=`):
//!   going shared, a RETRY whose R11 is past the range, unaligned, or stuck
//!   at the start;
//! - `accept-mismatch|error|busy` (`accept-fail=`): going private again,
//!   the 4th page's ACCEPT answers PAGE_SIZE_MISMATCH at 4K, an error, or
//!   OPERAND_BUSY forever.
//!
//! The guest must get the typed error and an exact quarantine (the whole
//! run when MapGPA fails, since the guest cannot know how far the VMM got;
//! from the failing page on when an ACCEPT fails), its entries
//! non-present, every other page present in the state its entry says, a
//! load across into the quarantine fixed up at the guest's own #PF (no
//! access reaches the GPA: the emulator counts any as
//! `quarantine_accesses`), the range refused from then on, and other
//! conversions still working. With `-touch` appended it then maps a
//! quarantined frame anew and reads it: the negative control, which the
//! emulator must catch.
//!
//! Prints `HOSTILE kind=<scenario> result=ok|failed ...` and returns
//! whether every check held.

use super::cacheflush::Window;
use super::engine::engine;
use super::memory::DIRECT_MAP_BASE;
use bare::extable::{load_unaligned_zeropad, ZEROPAD_FIXUPS};
use bare::println;
use core::sync::atomic::Ordering;
use pagetable::{PhysAddr, VirtAddr, PAGE_SIZE};
use set_memory_enc::platform::TdxError;
use set_memory_enc::{ConvError, Direction, Platform};
use tdx_hypercall::{AcceptError, MapGpaErrorKind, VmcallStatus};

const PAGES: u64 = 16;
/// The page whose ACCEPT the emulator's `accept-fail` fails.
const FAILING_ACCEPT_PAGE: u64 = 3;

/// What a scenario must end in: the direction that fails, the first
/// quarantined page of the run, and whether a cause is the right one.
struct Expected {
    fails: Direction,
    first_quarantined: u64,
    cause: fn(&TdxError, PhysAddr, u64) -> bool,
}

fn expected(scenario: &str) -> Expected {
    let map_gpa = |cause: fn(&TdxError, PhysAddr, u64) -> bool| Expected {
        fails: Direction::ToShared,
        first_quarantined: 0,
        cause,
    };
    let accept = |cause: fn(&TdxError, PhysAddr, u64) -> bool| Expected {
        fails: Direction::ToPrivate,
        first_quarantined: FAILING_ACCEPT_PAGE,
        cause,
    };
    match scenario {
        "mapgpa-fail-after" => map_gpa(|c, _, _| {
            *c == TdxError::MapGpa(MapGpaErrorKind::Status(VmcallStatus::InvalidOperand))
        }),
        "mapgpa-bad-retry-outside" => map_gpa(|c, frame, shared| {
            *c == TdxError::MapGpa(MapGpaErrorKind::ResumeOutOfRange {
                r11: (frame.0 + PAGES * PAGE_SIZE) | shared,
            })
        }),
        "mapgpa-bad-retry-unaligned" => map_gpa(|c, frame, shared| {
            *c == TdxError::MapGpa(MapGpaErrorKind::ResumeUnaligned {
                r11: (frame.0 + PAGE_SIZE + 8) | shared,
            })
        }),
        "mapgpa-bad-retry-stuck" => {
            map_gpa(|c, _, _| *c == TdxError::MapGpa(MapGpaErrorKind::NoProgress))
        }
        "accept-mismatch" => {
            accept(|c, _, _| matches!(c, TdxError::Accept(AcceptError::PageSizeMismatch(_))))
        }
        "accept-error" => accept(|c, _, _| matches!(c, TdxError::Accept(AcceptError::Other(_)))),
        "accept-busy" => {
            accept(|c, _, _| matches!(c, TdxError::Accept(AcceptError::OperandBusy(_))))
        }
        other => panic!(
            "hostile={other:?}: want mapgpa-fail-after, mapgpa-bad-retry-outside|unaligned|stuck \
             or accept-mismatch|error|busy (with -touch: then read the quarantine, the negative \
             control)"
        ),
    }
}

/// Runs the scenario `kind` names.
pub fn run(kind: &str) -> bool {
    let (scenario, touch) = match kind.strip_suffix("-touch") {
        Some(scenario) => (scenario, true),
        None => (kind, false),
    };
    let want = expected(scenario);
    let block = super::test_area().0 + (2 << 20);
    let va = VirtAddr(DIRECT_MAP_BASE + block + 8 * PAGE_SIZE);
    let frame = PhysAddr(va.0 - DIRECT_MAP_BASE);
    let cc = engine().platform().cc_mask();
    let mut failures = 0u32;
    let mut check = |ok: bool, what: &str| {
        if !ok {
            failures += 1;
            println!("HOSTILE check failed: {what}");
        }
    };
    if want.fails == Direction::ToPrivate {
        let shared = engine().set_memory_shared(va, PAGES);
        check(
            shared.is_ok(),
            "the conversion to shared before the failing one",
        );
    }
    let q = match engine().convert(va, PAGES, want.fails) {
        Err(ConvError::Quarantined(q)) => q,
        other => {
            println!("HOSTILE kind={kind} result=failed: want a quarantine, got {other:?}");
            return false;
        }
    };
    let first = want.first_quarantined * PAGE_SIZE;
    check(
        (q.va, q.gpa, q.bytes)
            == (
                VirtAddr(va.0 + first),
                PhysAddr(frame.0 + first),
                PAGES * PAGE_SIZE - first,
            ),
        "the quarantine is exactly what the VMM's failure left unknown",
    );
    check(
        (want.cause)(&q.cause, frame, cc.shared_bits()),
        "the cause is the typed error of what the VMM answered",
    );
    let state = |at: u64| {
        engine()
            .tables()
            .lookup_address(VirtAddr(at))
            .map(|l| (l.entry.is_present(), cc.is_shared(l.entry)))
    };
    let page = |n: u64| va.0 + n * PAGE_SIZE;
    check(
        (want.first_quarantined..PAGES).all(|n| matches!(state(page(n)), Ok((false, _)))),
        "every quarantined entry is non-present",
    );
    // Pages before the quarantine reached the target state (private: an
    // ACCEPT failed after them); the pages around the run are untouched.
    check(
        (0..want.first_quarantined).all(|n| state(page(n)) == Ok((true, false))),
        "the pages before the quarantine are present and private",
    );
    check(
        state(va.0 - PAGE_SIZE) == Ok((true, false)) && state(page(PAGES)) == Ok((true, false)),
        "the pages around the run are present and private",
    );
    let fixups = ZEROPAD_FIXUPS.load(Ordering::SeqCst);
    // SAFETY: the page before the quarantine is present and private; the
    // quarantined page after it is non-present, what the fixup is for.
    let value = unsafe { load_unaligned_zeropad((q.va.0 - 4) as *const u8) };
    check(
        value >> 32 == 0 && ZEROPAD_FIXUPS.load(Ordering::SeqCst) == fixups + 1,
        "a load across into the quarantine is zero-padded by the guest's own #PF",
    );
    check(
        engine().set_memory_shared(q.va, 1) == Err(ConvError::NotPresent(q.va)),
        "the quarantined range is refused from now on",
    );
    let other = VirtAddr(DIRECT_MAP_BASE + block + 64 * PAGE_SIZE);
    check(
        engine().set_memory_shared(other, 1).is_ok()
            && engine().set_memory_private(other, 1).is_ok(),
        "another page still converts",
    );
    if touch {
        println!("HOSTILE kind={kind}: now reading a quarantined frame through a new mapping");
        if let Ok(window) = Window::map(super::cpu_index(), q.gpa, false, cc) {
            // SAFETY: deliberately wrong (the negative control): the frame
            // is quarantined; the emulator must stop the TD here.
            let byte = unsafe { core::ptr::read_volatile(window.address() as *const u8) };
            println!("HOSTILE kind={kind} result=failed: read {byte:#x} from a quarantined frame and lived");
        }
        return false;
    }
    let ok = failures == 0;
    println!(
        "HOSTILE kind={kind} result={} quarantine_va={:#x} quarantine_bytes={} cause={:?}",
        if ok { "ok" } else { "failed" },
        q.va.0,
        q.bytes,
        q.cause
    );
    ok
}
