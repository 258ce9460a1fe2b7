//! A hostile VMM, seen from the guest (issue 11): run as a TD under the
//! emulator's `mapgpa-fail-after=<k>` (k < 16), `hostile=mapgpa-fail-after`
//! converts 16 pages to shared; the VMM converts k of them and answers
//! INVALID_OPERAND with no resume point. Under `mapgpa-bad-retry=<how>`,
//! `hostile=mapgpa-bad-retry-<how>` meets a RETRY whose R11 is past the
//! range, unaligned, or stuck at the start. The guest must get the typed
//! error, with the whole run quarantined (it cannot know how far the VMM
//! got), its entries non-present, the pages around it untouched, a load
//! across into it fixed up at the guest's own #PF (no access reaches the
//! GPA: the emulator counts any as `quarantine_accesses`), the range
//! refused from then on, and other conversions still working.
//! `hostile=mapgpa-fail-after-touch` then maps one quarantined frame anew
//! and reads it: the negative control, which the emulator must catch.
//!
//! Prints `HOSTILE kind=<k> result=ok|failed ...` and returns whether every
//! check held.

use super::cacheflush::Window;
use super::engine::engine;
use super::memory::DIRECT_MAP_BASE;
use bare::extable::{load_unaligned_zeropad, ZEROPAD_FIXUPS};
use bare::println;
use core::sync::atomic::Ordering;
use pagetable::{PhysAddr, VirtAddr, PAGE_SIZE};
use set_memory_enc::platform::TdxError;
use set_memory_enc::{ConvError, Platform};
use tdx_hypercall::{MapGpaErrorKind, VmcallStatus};

const PAGES: u64 = 16;

/// Runs the scenario `kind` names.
pub fn run(kind: &str) -> bool {
    let (scenario, touch) = match kind.strip_suffix("-touch") {
        Some(scenario) => (scenario, true),
        None => (kind, false),
    };
    let block = super::test_area().0 + (2 << 20);
    let va = VirtAddr(DIRECT_MAP_BASE + block + 8 * PAGE_SIZE);
    let frame = PhysAddr(va.0 - DIRECT_MAP_BASE);
    let cc = engine().platform().cc_mask();
    // What the emulator's option of the same name makes the VMM answer.
    let shared = cc.shared_bits();
    let expected = match scenario {
        "mapgpa-fail-after" => MapGpaErrorKind::Status(VmcallStatus::InvalidOperand),
        "mapgpa-bad-retry-outside" => MapGpaErrorKind::ResumeOutOfRange {
            r11: (frame.0 + PAGES * PAGE_SIZE) | shared,
        },
        "mapgpa-bad-retry-unaligned" => MapGpaErrorKind::ResumeUnaligned {
            r11: (frame.0 + PAGE_SIZE + 8) | shared,
        },
        "mapgpa-bad-retry-stuck" => MapGpaErrorKind::NoProgress,
        other => panic!(
            "hostile={other:?}: want mapgpa-fail-after or mapgpa-bad-retry-outside|unaligned|stuck \
             (with -touch: then read the quarantine, the negative control)"
        ),
    };
    let mut failures = 0u32;
    let mut check = |ok: bool, what: &str| {
        if !ok {
            failures += 1;
            println!("HOSTILE check failed: {what}");
        }
    };
    let q = match engine().set_memory_shared(va, PAGES) {
        Err(ConvError::Quarantined(q)) => q,
        other => {
            println!("HOSTILE kind={kind} result=failed: want a quarantine, got {other:?}");
            return false;
        }
    };
    check(
        (q.va, q.gpa, q.bytes) == (va, frame, PAGES * PAGE_SIZE),
        "the quarantine is the whole run (no resume point: nothing is known)",
    );
    check(
        q.cause == TdxError::MapGpa(expected),
        "the cause is the typed error of what the VMM answered",
    );
    let present = |at: u64| {
        engine()
            .tables()
            .lookup_address(VirtAddr(at))
            .map(|l| (l.entry.is_present(), cc.is_shared(l.entry)))
    };
    check(
        (0..PAGES).all(|p| matches!(present(va.0 + p * PAGE_SIZE), Ok((false, _)))),
        "every quarantined entry is non-present",
    );
    check(
        present(va.0 - PAGE_SIZE) == Ok((true, false))
            && present(va.0 + PAGES * PAGE_SIZE) == Ok((true, false)),
        "the pages around the quarantine are present and private",
    );
    let fixups = ZEROPAD_FIXUPS.load(Ordering::SeqCst);
    // SAFETY: the page before the quarantine is present and private; the
    // quarantined page after it is non-present, what the fixup is for.
    let value = unsafe { load_unaligned_zeropad((va.0 - 4) as *const u8) };
    check(
        value >> 32 == 0 && ZEROPAD_FIXUPS.load(Ordering::SeqCst) == fixups + 1,
        "a load across into the quarantine is zero-padded by the guest's own #PF",
    );
    check(
        engine().set_memory_private(va, 1) == Err(ConvError::NotPresent(va)),
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
        let window = Window::map(super::cpu_index(), frame, false, cc);
        if let Ok(window) = window {
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
