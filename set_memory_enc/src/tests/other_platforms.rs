//! The engine over the SEV-SNP platform (fake hypervisor with a per-4K RMP,
//! PVALIDATE through the simulated window) and the Hyper-V vTOM platform
//! (a scripted rep hypercall): the seven steps in order, the order inside
//! step 6, 2M where the RMP allows it, and each hypervisor failure ending
//! in the exact quarantine.

use super::*;
use crate::platform::snp::SnpError;
use crate::platform::vtom::{VtomError, MAX_PAGES_PER_CALL};
use crate::platform::{HvHypercall, HyperVVtom, Snp};
use crate::sim::SimWindow;
use snp_hypercall::psc::PscErrorKind;
use snp_hypercall::pvalidate::PvalidateError;
use snp_hypercall::sim::{Call, FakeSnp, RmpState};
use std::sync::atomic::Ordering::Relaxed;

type SnpPlatform = Snp<&'static FakeSnp, &'static FakeSnp, SimWindow<'static>>;

const C_BIT: u8 = 51;

fn snp_world(refuse_2m: bool) -> (&'static FakeSnp, World<SnpPlatform>) {
    let fake: &'static FakeSnp = Box::leak(Box::new(FakeSnp::new(C_BIT)));
    let window = SimWindow {
        snp: fake,
        refuse_2m,
    };
    let platform = Snp::new(C_BIT, fake, fake, window).unwrap();
    (fake, world(platform))
}

fn snp_counters(w: &World<SnpPlatform>) -> [u64; 5] {
    let c = w.engine.platform().inner.counters();
    [
        c.psc_calls.load(Relaxed),
        c.psc_msr_calls.load(Relaxed),
        c.pvalidated[0].load(Relaxed),
        c.pvalidated[1].load(Relaxed),
        c.size_fallbacks.load(Relaxed),
    ]
}

#[test]
fn snp_seven_steps_in_order_with_the_c_bit_private() {
    let (fake, w) = snp_world(false);
    let cc = w.engine.tables().cc_mask();
    assert_eq!(cc.private_bits(), 1 << C_BIT);
    // Caches are flushed both ways unless the CPU says they are coherent.
    assert!(w.engine.platform().needs_cache_flush(Direction::ToPrivate));
    assert!(w.engine.platform().needs_cache_flush(Direction::ToShared));
    check_all_orders(&w);
    assert!(fake.violations().is_empty(), "{:?}", fake.violations());
    assert_eq!(fake.state(GIB + 4096), RmpState::PrivateValidated);
}

/// To shared: rescind every page through the window, then one PSC. To
/// private: the PSC, then validate and zero every page.
#[test]
fn snp_rescinds_before_the_psc_and_validates_after_it() {
    let (fake, w) = snp_world(false);
    w.engine.set_memory_shared(VirtAddr(VMAP), 8).unwrap();
    let calls = fake.calls();
    let kinds: Vec<char> = calls
        .iter()
        .map(|c| match c {
            Call::Pvalidate(_, _, false) => 'r',
            Call::Pvalidate(_, _, true) => 'v',
            Call::Psc(..) => 'p',
            Call::Msr(_) => 'm',
        })
        .collect();
    assert_eq!(kinds.iter().collect::<String>(), "rrrrrrrrp", "{calls:?}");
    assert!((0..8).all(|p| fake.state(CHUNK_A + p * PAGE_SIZE) == RmpState::Shared));
    w.engine.set_memory_private(VirtAddr(VMAP), 8).unwrap();
    let kinds: String = fake.calls()[calls.len()..]
        .iter()
        .map(|c| match c {
            Call::Pvalidate(_, _, true) => 'v',
            Call::Psc(..) => 'p',
            _ => '?',
        })
        .collect();
    assert_eq!(kinds, "pvvvvvvvv");
    assert!(
        (0..8).all(|p| fake.zeroed(CHUNK_A + p * PAGE_SIZE)),
        "validated pages are zeroed"
    );
    assert!((0..8).all(|p| fake.state(CHUNK_A + p * PAGE_SIZE) == RmpState::PrivateValidated));
    // One page goes through the MSR protocol.
    w.engine
        .set_memory_shared(VirtAddr(VMAP + 8 * PAGE_SIZE), 1)
        .unwrap();
    assert!(matches!(fake.calls().last(), Some(Call::Msr(r)) if r & 0xfff == 0x014));
    assert!(fake.violations().is_empty(), "{:?}", fake.violations());
}

#[test]
fn snp_uses_2m_pvalidate_where_the_rmp_and_the_window_allow() {
    // A 4K RMP: each 2M attempt falls back to 512 4K PVALIDATEs.
    let (fake, w) = snp_world(false);
    w.engine
        .set_memory_shared(VirtAddr(DMAP + 8 * MIB2), 1024)
        .unwrap();
    assert_eq!(snp_counters(&w), [1, 0, 1024, 0, 2]);
    // A 2M RMP: one PVALIDATE per block; the PSC has two 2M entries.
    fake.set_rmp_2m(true);
    w.engine
        .set_memory_private(VirtAddr(DMAP + 8 * MIB2), 1024)
        .unwrap();
    assert_eq!(snp_counters(&w), [2, 0, 1024, 2, 2]);
    assert!(
        fake.calls()
            .iter()
            .all(|c| !matches!(c, Call::Psc(_, n) if *n != 2)),
        "each PSC has the two 2M entries"
    );
    assert!(fake.zeroed(8 * MIB2 + MIB2 + 5 * PAGE_SIZE));
    // No 2M window: 4K even though the RMP would take 2M.
    let (_, w) = snp_world(true);
    w.engine
        .set_memory_shared(VirtAddr(DMAP + 8 * MIB2), 512)
        .unwrap();
    assert_eq!(snp_counters(&w), [1, 0, 512, 0, 1]);
}

#[test]
fn snp_psc_partial_progress_is_resumed() {
    let (fake, w) = snp_world(false);
    fake.psc_pages_per_call(5);
    w.engine
        .set_memory_shared(VirtAddr(DMAP + 4 * MIB2), 64)
        .unwrap();
    assert_eq!(snp_counters(&w)[0], 13, "64 pages, 5 per call");
    w.engine
        .set_memory_private(VirtAddr(DMAP + 4 * MIB2), 64)
        .unwrap();
    assert!(fake.violations().is_empty(), "{:?}", fake.violations());
}

fn quarantined<E: core::fmt::Debug>(result: Result<ConvStats, ConvError<E>>) -> Quarantine<E> {
    match result {
        Err(ConvError::Quarantined(q)) => q,
        other => panic!("expected a quarantine, got {other:?}"),
    }
}

/// Going shared, a PSC that stops at page 5 of a 16-page run: pages 0..5
/// are shared and usable, the rest (rescinded, not taken) quarantined.
/// Going private, any PSC failure leaves the run unknown.
#[test]
fn snp_psc_failure_quarantines_exactly_what_it_left_unknown() {
    let (fake, w) = snp_world(false);
    let va = DMAP + 4 * MIB2;
    fake.psc_fail_at(4 * MIB2 + 5 * PAGE_SIZE, 0x100 << 32);
    let q = quarantined(w.engine.set_memory_shared(VirtAddr(va), 16));
    assert_eq!(
        (q.va, q.gpa, q.bytes, q.cause),
        (
            VirtAddr(va + 5 * PAGE_SIZE),
            PhysAddr(4 * MIB2 + 5 * PAGE_SIZE),
            11 * PAGE_SIZE,
            SnpError::Psc(PscErrorKind::Hypervisor(0x100 << 32))
        )
    );
    assert_eq!(state(&w, va, 5 * PAGE_SIZE), (true, true));
    assert!(!state(&w, va + 5 * PAGE_SIZE, 11 * PAGE_SIZE).0);
    assert_eq!(state(&w, va + 16 * PAGE_SIZE, PAGE_SIZE), (true, false));

    let (fake, w) = snp_world(false);
    w.engine.set_memory_shared(VirtAddr(va), 16).unwrap();
    fake.psc_backwards();
    fake.psc_pages_per_call(4);
    let q = quarantined(w.engine.set_memory_private(VirtAddr(va), 16));
    assert_eq!(
        (q.va, q.bytes, q.cause),
        (
            VirtAddr(va),
            16 * PAGE_SIZE,
            SnpError::Psc(PscErrorKind::Backwards)
        )
    );
    assert!(!state(&w, va, 16 * PAGE_SIZE).0);
}

/// CF = 1: a page the hypervisor took away behind the guest's back (its
/// Validated bit already clear when the guest rescinds it) quarantines the
/// run going shared; a validation that reports "unchanged" quarantines
/// from that page going private. The other pages validated before it are
/// zeroed and private.
#[test]
fn snp_pvalidate_unchanged_is_a_hostile_hypervisor_and_quarantines() {
    let (fake, w) = snp_world(false);
    let va = DMAP + 4 * MIB2;
    fake.take_page(4 * MIB2 + 3 * PAGE_SIZE);
    let q = quarantined(w.engine.set_memory_shared(VirtAddr(va), 8));
    assert_eq!(
        (q.va, q.bytes, q.cause),
        (
            VirtAddr(va),
            8 * PAGE_SIZE,
            SnpError::Pvalidate {
                gpa: 4 * MIB2 + 3 * PAGE_SIZE,
                error: PvalidateError::Unchanged
            }
        )
    );
    assert!(
        !fake.calls().iter().any(|c| matches!(c, Call::Psc(..))),
        "no PSC after a failed rescind"
    );

    let (fake, w) = snp_world(false);
    w.engine.set_memory_shared(VirtAddr(va), 8).unwrap();
    fake.pvalidate_unchanged_at(4 * MIB2 + 6 * PAGE_SIZE);
    let q = quarantined(w.engine.set_memory_private(VirtAddr(va), 8));
    assert_eq!(
        (q.va, q.gpa, q.bytes),
        (
            VirtAddr(va + 6 * PAGE_SIZE),
            PhysAddr(4 * MIB2 + 6 * PAGE_SIZE),
            2 * PAGE_SIZE
        )
    );
    assert_eq!(state(&w, va, 6 * PAGE_SIZE), (true, false));
    assert!((0..6).all(|p| fake.zeroed(4 * MIB2 + p * PAGE_SIZE)));
    assert!(!fake.zeroed(4 * MIB2 + 6 * PAGE_SIZE));
    // The quarantine is refused from then on.
    assert_eq!(
        w.engine.set_memory_shared(VirtAddr(va + 6 * PAGE_SIZE), 1),
        Err(ConvError::NotPresent(VirtAddr(va + 6 * PAGE_SIZE)))
    );
}

/// A PSC that says it converted the pages and did not: PVALIDATE then
/// meets hypervisor-owned pages (on hardware a nested fault and no
/// progress; the fake records it and fails the call): quarantined.
#[test]
fn snp_lying_psc_ends_in_quarantine() {
    let (fake, w) = snp_world(false);
    let va = DMAP + 4 * MIB2;
    w.engine.set_memory_shared(VirtAddr(va), 8).unwrap();
    fake.psc_lie();
    let q = quarantined(w.engine.set_memory_private(VirtAddr(va), 8));
    assert_eq!((q.va, q.bytes), (VirtAddr(va), 8 * PAGE_SIZE));
    assert!(matches!(
        q.cause,
        SnpError::Pvalidate {
            error: PvalidateError::Input,
            ..
        }
    ));
    assert_eq!(fake.violations().len(), 1, "{:?}", fake.violations());
}

// ------------------------------------------------------------ Hyper-V vTOM

/// A scripted Hyper-V: completes at most `per_call` reps per call, fails
/// with `status` at page `fail_at`, records every call.
#[derive(Default)]
struct FakeHyperV {
    per_call: Option<u64>,
    fail_at: Option<(u64, u16)>,
    reps_lie: bool,
    calls: Mutex<Vec<(u64, Vec<u64>)>>,
    visible: Mutex<std::collections::BTreeMap<u64, u64>>,
}

impl HvHypercall for FakeHyperV {
    fn hypercall(&self, control: u64, input: &[u64]) -> u64 {
        self.calls.lock().unwrap().push((control, input.to_vec()));
        let count = (control >> 32) & 0xfff;
        let start = (control >> 48) & 0xfff;
        if self.reps_lie {
            return (count + 1) << 32;
        }
        let mut done = start;
        while done < count && done - start < self.per_call.unwrap_or(u64::MAX) {
            let page = input[2 + done as usize];
            if let Some((at, status)) = self.fail_at {
                if page == at {
                    return (done << 32) | u64::from(status);
                }
            }
            self.visible.lock().unwrap().insert(page, input[1]);
            done += 1;
        }
        done << 32
    }
}

fn vtom_world(hv: &'static FakeHyperV) -> World<HyperVVtom<&'static FakeHyperV>> {
    world(HyperVVtom::new(46, hv).unwrap())
}

#[test]
fn vtom_seven_steps_in_order_with_vtom_as_the_shared_bit() {
    let hv: &'static FakeHyperV = Box::leak(Box::default());
    let w = vtom_world(hv);
    assert_eq!(w.engine.tables().cc_mask().shared_bits(), 1 << 46);
    assert!(!w.engine.platform().needs_cache_flush(Direction::ToShared));
    assert!(!w.engine.platform().needs_cache_flush(Direction::ToPrivate));
    check_all_orders(&w);
    assert_eq!(
        hv.visible.lock().unwrap().get(&(GIB / PAGE_SIZE + 77)),
        Some(&0)
    );
}

/// 1100 pages: batches of 510, 510 and 80, each with the partition, the
/// visibility and the page numbers; a hypervisor completing 100 reps per
/// call is resumed from its rep start.
#[test]
fn vtom_batches_and_resumes_rep_hypercalls() {
    let hv: &'static FakeHyperV = Box::leak(Box::new(FakeHyperV {
        per_call: Some(100),
        ..FakeHyperV::default()
    }));
    let w = vtom_world(hv);
    w.engine
        .set_memory_shared(VirtAddr(DMAP + 4 * MIB2), 1100)
        .unwrap();
    let calls = hv.calls.lock().unwrap().clone();
    let first_of_batch: Vec<_> = calls
        .iter()
        .filter(|(control, _)| (control >> 48) & 0xfff == 0)
        .map(|(control, input)| {
            (
                (control >> 32) & 0xfff,
                input.len(),
                input[0],
                input[1],
                input[2],
            )
        })
        .collect();
    let page = 4 * MIB2 / PAGE_SIZE;
    assert_eq!(
        first_of_batch,
        vec![
            (510, 512, u64::MAX, 3, page),
            (510, 512, u64::MAX, 3, page + 510),
            (80, 82, u64::MAX, 3, page + 1020),
        ]
    );
    assert!(calls.iter().all(|(control, _)| control & 0xffff == 0xdb));
    assert_eq!(calls.len(), 6 + 6 + 1, "100 reps per call");
    assert_eq!(MAX_PAGES_PER_CALL, 510);
    let c = w.engine.platform().inner.counters();
    assert_eq!(
        (c.hypercalls.load(Relaxed), c.pages.load(Relaxed)),
        (13, 1100)
    );
}

#[test]
fn vtom_failures_quarantine_from_the_first_page_not_done() {
    let va = DMAP + 4 * MIB2;
    let page = 4 * MIB2 / PAGE_SIZE;
    let hv: &'static FakeHyperV = Box::leak(Box::new(FakeHyperV {
        fail_at: Some((page + 600, 11)),
        ..FakeHyperV::default()
    }));
    let w = vtom_world(hv);
    let q = quarantined(w.engine.set_memory_shared(VirtAddr(va), 700));
    assert_eq!(
        (q.va, q.bytes, q.cause),
        (
            VirtAddr(va + 600 * PAGE_SIZE),
            100 * PAGE_SIZE,
            VtomError::Status(11)
        )
    );
    assert_eq!(state(&w, va, 600 * PAGE_SIZE), (true, true));

    let liar: &'static FakeHyperV = Box::leak(Box::new(FakeHyperV {
        reps_lie: true,
        ..FakeHyperV::default()
    }));
    let w = vtom_world(liar);
    let q = quarantined(w.engine.set_memory_shared(VirtAddr(va), 4));
    assert_eq!(
        (q.va, q.cause),
        (VirtAddr(va), VtomError::BadRepsCompleted(5))
    );

    let stuck: &'static FakeHyperV = Box::leak(Box::new(FakeHyperV {
        per_call: Some(0),
        ..FakeHyperV::default()
    }));
    let w = vtom_world(stuck);
    let q = quarantined(w.engine.set_memory_shared(VirtAddr(va), 4));
    assert_eq!(q.cause, VtomError::NoProgress);
    assert_eq!(stuck.calls.lock().unwrap().len(), 16);
}

/// A run the engine would never make is refused before the hypervisor
/// hears of it: nothing rescinded, no PSC, no hypercall.
#[test]
fn snp_and_vtom_refuse_malformed_runs_without_a_call() {
    let (fake, w) = snp_world(false);
    let hv: &'static FakeHyperV = Box::leak(Box::default());
    let vtom = HyperVVtom::new(46, hv).unwrap();
    let run = |gpa: u64, bytes: u64| GpaRun {
        va: VirtAddr(VMAP),
        gpa: PhysAddr(gpa),
        bytes,
    };
    for run in [
        run(0x1000, 0),
        run(0x1008, 4096),
        run(0x1000, 100),
        run(u64::MAX - 4095, 8192),
        run(1 << 52, 4096),
    ] {
        for direction in [Direction::ToShared, Direction::ToPrivate] {
            let e = w
                .engine
                .platform()
                .inner
                .notify(&run, direction)
                .unwrap_err();
            assert_eq!((e.consistent_up_to, e.cause), (run.gpa, SnpError::BadRun));
            let e = vtom.notify(&run, direction).unwrap_err();
            assert_eq!((e.consistent_up_to, e.cause), (run.gpa, VtomError::BadRun));
        }
    }
    assert!(fake.calls().is_empty());
    assert!(hv.calls.lock().unwrap().is_empty());
}

#[test]
fn snp_and_vtom_refuse_a_bit_outside_the_address_field() {
    let fake: &'static FakeSnp = Box::leak(Box::new(FakeSnp::new(C_BIT)));
    let window = SimWindow {
        snp: fake,
        refuse_2m: false,
    };
    assert!(Snp::new(63, fake, fake, window).is_err());
    assert!(HyperVVtom::new(8, FakeHyperV::default()).is_err());
}
