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
//!   OPERAND_BUSY forever;
//! - `implicit` (`sept-ve implicit-convert`): going private again succeeds,
//!   then the VMM takes the 4th page behind the guest's back (pending,
//!   contents gone); the guest learns it from the EPT-violation #VE of a
//!   load crossing into it, and retires the page (`Converter::retire`).
//!
//! The guest must get the typed error and an exact quarantine (the whole
//! run when MapGPA fails, since the guest cannot know how far the VMM got;
//! from the failing page on when an ACCEPT fails; the taken page alone),
//! its entries
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
use super::engine::GuestError;
use super::faults::{LAST_LOST_GPA, LOST_PAGES};
use super::memory::DIRECT_MAP_BASE;
use bare::extable::{load_unaligned_zeropad, ZEROPAD_FIXUPS};
use bare::println;
use coco_pagetable::{PhysAddr, VirtAddr, PAGE_SIZE};
use core::sync::atomic::Ordering;
use set_memory_enc::platform::{SnpError, TdxError};
use set_memory_enc::{ConvError, Direction, Platform, Quarantine};
use snp_hypercall::pvalidate::PvalidateError;
use tdx_hypercall::{AcceptError, Gpa, MapGpaErrorKind, VmcallStatus};

const PAGES: u64 = 16;
/// The page whose ACCEPT the emulator's `accept-fail` fails, and which its
/// `implicit-convert` takes.
const FAILING_ACCEPT_PAGE: u64 = 3;

/// What a scenario must end in: the direction that fails (or, for a page
/// taken behind the guest's back, is the last one to succeed), the
/// quarantined pages of the run, and whether a cause is the right one.
struct Expected {
    fails: Direction,
    first_quarantined: u64,
    quarantined: u64,
    cause: Cause,
}

/// Whether a quarantine's cause is the right one: a TDX error (given the
/// run's frame and the shared bit) or an SNP one.
enum Cause {
    Tdx(fn(&TdxError, PhysAddr, u64) -> bool),
    Snp(fn(&SnpError) -> bool),
}

impl Cause {
    fn matches(&self, cause: &GuestError, frame: PhysAddr, shared: u64) -> bool {
        match (self, cause) {
            (Cause::Tdx(f), GuestError::Tdx(c)) => f(c, frame, shared),
            (Cause::Snp(f), GuestError::Snp(c)) => f(c),
            _ => false,
        }
    }
}

fn expected(scenario: &str) -> Expected {
    let map_gpa = |cause: fn(&TdxError, PhysAddr, u64) -> bool| Expected {
        fails: Direction::ToShared,
        first_quarantined: 0,
        quarantined: PAGES,
        cause: Cause::Tdx(cause),
    };
    let accept = |cause: fn(&TdxError, PhysAddr, u64) -> bool| Expected {
        fails: Direction::ToPrivate,
        first_quarantined: FAILING_ACCEPT_PAGE,
        quarantined: PAGES - FAILING_ACCEPT_PAGE,
        cause: Cause::Tdx(cause),
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
        "implicit" => Expected {
            quarantined: 1,
            ..accept(|c, frame, _| {
                *c == TdxError::PrivatePageLost(Gpa(frame.0 + FAILING_ACCEPT_PAGE * PAGE_SIZE))
            })
        },
        // SNP, `psc-lie`: the PSC to private says done and changes
        // nothing, so PVALIDATE of the first page meets a hypervisor-owned
        // page; nothing of the run is then known.
        "psc-lie" => Expected {
            fails: Direction::ToPrivate,
            first_quarantined: 0,
            quarantined: PAGES,
            cause: Cause::Snp(|c| {
                matches!(
                    c,
                    SnpError::Pvalidate {
                        error: PvalidateError::Input,
                        ..
                    }
                )
            }),
        },
        other => panic!(
            "hostile={other:?}: want mapgpa-fail-after, mapgpa-bad-retry-outside|unaligned|stuck, \
             accept-mismatch|error|busy, implicit or psc-lie (with -touch: then read the \
             quarantine, the negative control)"
        ),
    }
}

/// `implicit`: converting the run at `run` private again succeeds, and then
/// the VMM takes its page FAILING_ACCEPT_PAGE behind the guest's back. A load from the page
/// before it that crosses into it (what load_unaligned_zeropad does) is the
/// guest's news: the #VE handler records the lost GPA and zero-pads the load.
/// The page is then retired, the quarantine coming back as a conversion's
/// would. A failure is printed after `kind`.
fn meet_the_taken_page(kind: &str, run: VirtAddr) -> Option<Quarantine<GuestError>> {
    let failed = |why: core::fmt::Arguments<'_>| {
        println!("HOSTILE kind={kind} result=failed: {why}");
        None
    };
    let taken = VirtAddr(run.0 + FAILING_ACCEPT_PAGE * PAGE_SIZE);
    if let Err(e) = engine().set_memory_private(run, PAGES) {
        return failed(format_args!("going private again: {e:?}"));
    }
    let (lost, fixups) = (
        LOST_PAGES.load(Ordering::SeqCst),
        ZEROPAD_FIXUPS.load(Ordering::SeqCst),
    );
    // SAFETY: the page before `taken` is present and private; the load
    // crosses into `taken`, whose fault the handler fixes up.
    let value = unsafe { load_unaligned_zeropad((taken.0 - 4) as *const u8) };
    let gpa = LAST_LOST_GPA.load(Ordering::SeqCst);
    if LOST_PAGES.load(Ordering::SeqCst) != lost + 1
        || ZEROPAD_FIXUPS.load(Ordering::SeqCst) != fixups + 1
        || value >> 32 != 0
    {
        return failed(format_args!(
            "want one lost page and a zero-padded load, got lost pages +{}, fixups +{}, \
             value {value:#x}",
            LOST_PAGES.load(Ordering::SeqCst) - lost,
            ZEROPAD_FIXUPS.load(Ordering::SeqCst) - fixups
        ));
    }
    match engine().retire(
        taken,
        1,
        GuestError::Tdx(TdxError::PrivatePageLost(Gpa(gpa))),
    ) {
        Ok(q) => Some(q),
        Err(e) => failed(format_args!("retiring the lost page: {e:?}")),
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
        if scenario == "psc-lie" {
            // Use the shared pages, as their owner would: a hypervisor
            // whose PSC lied meets C=0 writes to pages it left private.
            for n in 0..PAGES {
                // SAFETY: the run is mapped shared (C=0) and this
                // scenario's own.
                unsafe { core::ptr::write_volatile((va.0 + n * PAGE_SIZE) as *mut u64, n) };
            }
        }
    }
    let page = |n: u64| va.0 + n * PAGE_SIZE;
    let q = if scenario == "implicit" {
        match meet_the_taken_page(kind, va) {
            Some(q) => q,
            None => return false,
        }
    } else {
        match engine().convert(va, PAGES, want.fails) {
            Err(ConvError::Quarantined(q)) => q,
            other => {
                println!("HOSTILE kind={kind} result=failed: want a quarantine, got {other:?}");
                return false;
            }
        }
    };
    let first = want.first_quarantined * PAGE_SIZE;
    let after = want.first_quarantined + want.quarantined;
    check(
        (q.va, q.gpa, q.bytes)
            == (
                VirtAddr(va.0 + first),
                PhysAddr(frame.0 + first),
                want.quarantined * PAGE_SIZE,
            ),
        "the quarantine is exactly what the VMM's failure left unknown",
    );
    check(
        want.cause.matches(&q.cause, frame, cc.shared_bits()),
        "the cause is the typed error of what the VMM answered",
    );
    let state = |at: u64| {
        engine()
            .tables()
            .lookup_address(VirtAddr(at))
            .map(|l| (l.entry.is_present(), cc.is_shared(l.entry)))
    };
    check(
        (want.first_quarantined..after).all(|n| matches!(state(page(n)), Ok((false, _)))),
        "every quarantined entry is non-present",
    );
    // Pages before the quarantine reached the target state (private: an
    // ACCEPT failed after them, or the VMM took the page after them); so
    // did those after a taken page; the pages around the run are untouched.
    check(
        (0..want.first_quarantined)
            .chain(after..PAGES)
            .all(|n| state(page(n)) == Ok((true, false))),
        "the run's other pages are present and private",
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
