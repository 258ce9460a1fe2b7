use super::{GIB, KIB4, MIB};
use crate::sim::{Call, FakeTdxModule, PageState};
use crate::{
    accept_ram, accept_range, page_accept, AcceptError, AcceptRamStats, AcceptRangeError,
    AcceptSize, AcceptStats, Gpa, ACCEPT_BUSY_RETRIES,
};

const BUSY: u64 = 0x8000_0200_0000_0000;
const MISMATCH: u64 = 0xC000_0B0B_0000_0001;
const ALREADY: u64 = 0x0000_0B0A_0000_0000;

fn accepts(f: &FakeTdxModule) -> Vec<(u64, AcceptSize)> {
    f.calls()
        .into_iter()
        .map(|c| match c {
            Call::Accept { gpa, size } => (gpa.0, size),
            other => panic!("unexpected call {other:?}"),
        })
        .collect()
}

/// Fake with `[start, end)` pending.
fn pending(mem: u64, start: u64, end: u64) -> FakeTdxModule {
    let f = FakeTdxModule::new(48, mem);
    f.set_state(Gpa(start)..Gpa(end), PageState::Pending);
    f
}

#[test]
fn accept_size_encoding() {
    assert_eq!(AcceptSize::Size4K.bytes(), 4096);
    assert_eq!(AcceptSize::Size2M.bytes(), 0x20_0000);
    assert_eq!(AcceptSize::Size1G.bytes(), 0x4000_0000);
    assert_eq!(AcceptSize::Size4K.level(), 0);
    assert_eq!(AcceptSize::Size2M.level(), 1);
    assert_eq!(AcceptSize::Size1G.level(), 2);
    assert_eq!(AcceptSize::from_level(2), Some(AcceptSize::Size1G));
    assert_eq!(AcceptSize::from_level(3), None);
}

#[test]
fn status_classification_uses_the_upper_half() {
    assert_eq!(
        AcceptError::from_status(BUSY | 0x12),
        AcceptError::OperandBusy(BUSY | 0x12)
    );
    assert_eq!(
        AcceptError::from_status(MISMATCH),
        AcceptError::PageSizeMismatch(MISMATCH)
    );
    assert_eq!(
        AcceptError::from_status(ALREADY | 7),
        AcceptError::AlreadyAccepted(ALREADY | 7)
    );
    assert_eq!(
        AcceptError::from_status(0xC000_0100_0000_0000),
        AcceptError::Other(0xC000_0100_0000_0000)
    );
    // Same low half, different class.
    assert_eq!(
        AcceptError::from_status(0x8000_0201_0000_0000),
        AcceptError::Other(0x8000_0201_0000_0000)
    );
}

#[test]
fn page_accept_encodes_level_and_checks_alignment() {
    let f = pending(4 * MIB, 0, 4 * MIB);
    assert_eq!(page_accept(&f, Gpa(2 * MIB), AcceptSize::Size2M), Ok(()));
    assert_eq!(f.regs_log()[0].rcx, (2 * MIB) | 1);
    assert_eq!(f.regs_log()[0].rax, 6);
    assert_eq!(
        page_accept(&f, Gpa(KIB4), AcceptSize::Size2M),
        Err(AcceptError::Unaligned {
            gpa: Gpa(KIB4),
            size: AcceptSize::Size2M
        })
    );
    assert_eq!(
        page_accept(&f, Gpa(0x10), AcceptSize::Size4K),
        Err(AcceptError::Unaligned {
            gpa: Gpa(0x10),
            size: AcceptSize::Size4K
        })
    );
    assert_eq!(f.calls().len(), 1);
    assert_eq!(
        page_accept(&f, Gpa(2 * MIB), AcceptSize::Size4K),
        Err(AcceptError::AlreadyAccepted(ALREADY))
    );
}

#[test]
fn one_gig_two_meg_four_k() {
    let (start, end) = (GIB, 2 * GIB + 2 * MIB + KIB4);
    let f = pending(3 * GIB, start, end);
    let stats = accept_range(&f, Gpa(start), Gpa(end)).unwrap();
    assert_eq!(
        stats,
        AcceptStats {
            accepted_1g: 1,
            accepted_2m: 1,
            accepted_4k: 1,
            size_mismatch_fallbacks: 0,
            busy_retries: 0
        }
    );
    assert_eq!(
        accepts(&f),
        vec![
            (GIB, AcceptSize::Size1G),
            (2 * GIB, AcceptSize::Size2M),
            (2 * GIB + 2 * MIB, AcceptSize::Size4K),
        ]
    );
    assert!(f.all_in_state(Gpa(start)..Gpa(end), PageState::Private));
}

#[test]
fn unaligned_start_uses_4k_until_2m_alignment() {
    let (start, end) = (2 * MIB - 2 * KIB4, 6 * MIB);
    let f = pending(8 * MIB, start, end);
    let stats = accept_range(&f, Gpa(start), Gpa(end)).unwrap();
    assert_eq!(
        stats,
        AcceptStats {
            accepted_1g: 0,
            accepted_2m: 2,
            accepted_4k: 2,
            size_mismatch_fallbacks: 0,
            busy_retries: 0
        }
    );
    assert_eq!(
        accepts(&f),
        vec![
            (2 * MIB - 2 * KIB4, AcceptSize::Size4K),
            (2 * MIB - KIB4, AcceptSize::Size4K),
            (2 * MIB, AcceptSize::Size2M),
            (4 * MIB, AcceptSize::Size2M),
        ]
    );
    assert!(f.all_in_state(Gpa(start)..Gpa(end), PageState::Private));
}

#[test]
fn size_mismatch_at_2m_falls_back_to_4k() {
    let (start, end) = (2 * MIB, 6 * MIB + 2 * KIB4);
    let f = pending(8 * MIB, start, end);
    f.refuse_sizes_above(AcceptSize::Size4K);
    let stats = accept_range(&f, Gpa(start), Gpa(end)).unwrap();
    assert_eq!(
        stats,
        AcceptStats {
            accepted_1g: 0,
            accepted_2m: 0,
            accepted_4k: 1026,
            size_mismatch_fallbacks: 2,
            busy_retries: 0
        }
    );
    let calls = accepts(&f);
    assert_eq!(calls.len(), 1028);
    assert_eq!(calls[0], (2 * MIB, AcceptSize::Size2M));
    assert_eq!(calls[1], (2 * MIB, AcceptSize::Size4K));
    assert_eq!(calls[512], (4 * MIB - KIB4, AcceptSize::Size4K));
    assert_eq!(calls[513], (4 * MIB, AcceptSize::Size2M));
    assert_eq!(calls[514], (4 * MIB, AcceptSize::Size4K));
    assert_eq!(calls[1027], (6 * MIB + KIB4, AcceptSize::Size4K));
    assert_eq!(
        calls.iter().filter(|c| c.1 == AcceptSize::Size4K).count(),
        1026
    );
    assert!(f.all_in_state(Gpa(start)..Gpa(end), PageState::Private));
}

#[test]
fn size_mismatch_at_1g_falls_back_to_2m() {
    let f = pending(2 * GIB, GIB, 2 * GIB);
    f.refuse_sizes_above(AcceptSize::Size2M);
    let stats = accept_range(&f, Gpa(GIB), Gpa(2 * GIB)).unwrap();
    assert_eq!(
        stats,
        AcceptStats {
            accepted_1g: 0,
            accepted_2m: 512,
            accepted_4k: 0,
            size_mismatch_fallbacks: 1,
            busy_retries: 0
        }
    );
    let calls = accepts(&f);
    assert_eq!(calls.len(), 513);
    assert_eq!(calls[0], (GIB, AcceptSize::Size1G));
    assert_eq!(calls[1], (GIB, AcceptSize::Size2M));
    assert_eq!(calls[512], (2 * GIB - 2 * MIB, AcceptSize::Size2M));
}

#[test]
fn size_mismatch_at_1g_and_2m_falls_back_to_4k_then_returns_to_1g() {
    // [1G, 3G): the first 1G block is only mapped at 4K, the second one accepts at 1G.
    let f = pending(3 * GIB, GIB, 3 * GIB);
    f.refuse_sizes_above(AcceptSize::Size4K);
    // Make the second block look like a normal 1G mapping again after the first block.
    let hook_fake = std::sync::Arc::new(f);
    let weak = std::sync::Arc::downgrade(&hook_fake);
    hook_fake.set_call_hook(Box::new(move |regs| {
        if regs.rcx == (2 * GIB) | 2 {
            if let Some(f) = weak.upgrade() {
                f.refuse_sizes_above(AcceptSize::Size1G);
            }
        }
    }));
    let f = &*hook_fake;
    let stats = accept_range(f, Gpa(GIB), Gpa(3 * GIB)).unwrap();
    assert_eq!(
        stats,
        AcceptStats {
            accepted_1g: 1,
            accepted_2m: 0,
            accepted_4k: 262_144,
            size_mismatch_fallbacks: 513,
            busy_retries: 0
        }
    );
    let calls = accepts(f);
    assert_eq!(calls.len(), 1 + 512 + 262_144 + 1);
    assert_eq!(calls[0], (GIB, AcceptSize::Size1G));
    assert_eq!(calls[1], (GIB, AcceptSize::Size2M));
    assert_eq!(calls[2], (GIB, AcceptSize::Size4K));
    assert_eq!(calls[514], (GIB + 2 * MIB, AcceptSize::Size2M));
    assert_eq!(*calls.last().unwrap(), (2 * GIB, AcceptSize::Size1G));
    assert!(f.all_in_state(Gpa(GIB)..Gpa(3 * GIB), PageState::Private));
}

#[test]
fn partly_pending_2m_block_falls_back_and_stops_at_the_accepted_page() {
    let f = pending(4 * MIB, 0, 2 * MIB);
    f.set_state(Gpa(5 * KIB4)..Gpa(6 * KIB4), PageState::Private);
    let e = accept_range(&f, Gpa(0), Gpa(2 * MIB)).unwrap_err();
    assert_eq!(
        e,
        AcceptRangeError {
            accepted_up_to: Gpa(5 * KIB4),
            cause: AcceptError::AlreadyAccepted(ALREADY)
        }
    );
    assert_eq!(accepts(&f).len(), 1 + 6);
    assert_eq!(f.state(Gpa(6 * KIB4)), PageState::Pending);
}

#[test]
fn busy_three_times_then_success() {
    let f = pending(4 * MIB, 0, 2 * MIB + KIB4);
    f.busy_next(3);
    let stats = accept_range(&f, Gpa(0), Gpa(2 * MIB + KIB4)).unwrap();
    assert_eq!(
        stats,
        AcceptStats {
            accepted_1g: 0,
            accepted_2m: 1,
            accepted_4k: 1,
            size_mismatch_fallbacks: 0,
            busy_retries: 3
        }
    );
    assert_eq!(
        accepts(&f),
        vec![
            (0, AcceptSize::Size2M),
            (0, AcceptSize::Size2M),
            (0, AcceptSize::Size2M),
            (0, AcceptSize::Size2M),
            (2 * MIB, AcceptSize::Size4K),
        ]
    );
}

#[test]
fn busy_sixteen_times_is_still_tolerated() {
    let f = pending(4 * MIB, 0, KIB4);
    f.busy_next(ACCEPT_BUSY_RETRIES);
    let stats = accept_range(&f, Gpa(0), Gpa(KIB4)).unwrap();
    assert_eq!(stats.busy_retries, 16);
    assert_eq!(stats.accepted_4k, 1);
    assert_eq!(f.calls().len(), 17);
}

#[test]
fn busy_forever_fails_after_17_calls() {
    let f = pending(4 * MIB, 0, 3 * KIB4);
    // First page succeeds, then the module stays busy.
    assert_eq!(page_accept(&f, Gpa(0), AcceptSize::Size4K), Ok(()));
    f.clear_log();
    f.busy_next(u32::MAX);
    let e = accept_range(&f, Gpa(KIB4), Gpa(3 * KIB4)).unwrap_err();
    assert_eq!(
        e,
        AcceptRangeError {
            accepted_up_to: Gpa(KIB4),
            cause: AcceptError::OperandBusy(BUSY)
        }
    );
    assert_eq!(accepts(&f), vec![(KIB4, AcceptSize::Size4K); 17]);
    assert_eq!(f.state(Gpa(KIB4)), PageState::Pending);
}

#[test]
fn already_accepted_stops_with_exact_boundary() {
    let f = pending(4 * MIB, 0, 4 * KIB4);
    f.set_state(Gpa(2 * KIB4)..Gpa(3 * KIB4), PageState::Private);
    let e = accept_range(&f, Gpa(0), Gpa(4 * KIB4)).unwrap_err();
    assert_eq!(
        e,
        AcceptRangeError {
            accepted_up_to: Gpa(2 * KIB4),
            cause: AcceptError::AlreadyAccepted(ALREADY)
        }
    );
    assert_eq!(f.calls().len(), 3);
    assert_eq!(f.state(Gpa(KIB4)), PageState::Private);
    assert_eq!(f.state(Gpa(3 * KIB4)), PageState::Pending);
}

#[test]
fn other_error_stops_with_exact_boundary() {
    let f = pending(8 * MIB, 2 * MIB, 6 * MIB);
    f.fail_accept_at(Gpa(4 * MIB + 3 * KIB4), 0xC000_0100_0000_0000);
    let e = accept_range(&f, Gpa(2 * MIB), Gpa(6 * MIB)).unwrap_err();
    assert_eq!(
        e,
        AcceptRangeError {
            accepted_up_to: Gpa(4 * MIB),
            cause: AcceptError::Other(0xC000_0100_0000_0000)
        }
    );
    assert_eq!(
        accepts(&f),
        vec![(2 * MIB, AcceptSize::Size2M), (4 * MIB, AcceptSize::Size2M)]
    );
    assert_eq!(f.state(Gpa(4 * MIB)), PageState::Pending);
}

#[test]
fn mismatch_at_4k_is_an_error() {
    let f = pending(4 * MIB, 0, KIB4);
    f.fail_accept_at(Gpa(0), MISMATCH);
    let e = accept_range(&f, Gpa(0), Gpa(KIB4)).unwrap_err();
    assert_eq!(
        e,
        AcceptRangeError {
            accepted_up_to: Gpa(0),
            cause: AcceptError::PageSizeMismatch(MISMATCH)
        }
    );
    assert_eq!(f.calls().len(), 1);
}

#[test]
fn bad_ranges_make_no_call() {
    let f = pending(4 * MIB, 0, 4 * MIB);
    let cases = [
        (
            0x10,
            KIB4,
            AcceptError::Unaligned {
                gpa: Gpa(0x10),
                size: AcceptSize::Size4K,
            },
        ),
        (
            0,
            KIB4 + 1,
            AcceptError::Unaligned {
                gpa: Gpa(KIB4 + 1),
                size: AcceptSize::Size4K,
            },
        ),
        (
            2 * KIB4,
            KIB4,
            AcceptError::InvalidRange {
                start: Gpa(2 * KIB4),
                end: Gpa(KIB4),
            },
        ),
    ];
    for (start, end, cause) in cases {
        assert_eq!(
            accept_range(&f, Gpa(start), Gpa(end)),
            Err(AcceptRangeError {
                accepted_up_to: Gpa(start),
                cause
            })
        );
    }
    assert_eq!(
        accept_range(&f, Gpa(KIB4), Gpa(KIB4)),
        Ok(AcceptStats::default())
    );
    assert!(f.calls().is_empty());
}

#[test]
fn range_at_the_top_of_the_address_space_does_not_overflow() {
    // A module that accepts anything: exercises the arithmetic near u64::MAX.
    let t = super::FnTdCall(|r: &mut crate::TdcallRegs| r.rax = 0);
    let end = !0xfff;
    let stats = accept_range(&t, Gpa(end - 2 * MIB - KIB4), Gpa(end)).unwrap();
    assert_eq!(stats.accepted_2m, 0);
    assert_eq!(stats.accepted_4k, 513);
    let stats = accept_range(&t, Gpa(end - GIB - KIB4), Gpa(end)).unwrap();
    assert_eq!(stats.accepted_4k, 2 + 511);
    assert_eq!(stats.accepted_2m, 511);
}

#[test]
fn busy_counter_resets_after_each_success() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let f = Arc::new(pending(4 * MIB, 0, 2 * KIB4));
    f.busy_next(10);
    let (weak, armed) = (Arc::downgrade(&f), AtomicBool::new(true));
    // Ten more busy answers for the second page: 20 in total, but never 17 in a row.
    f.set_call_hook(Box::new(move |regs| {
        if regs.rcx == KIB4 && armed.swap(false, Ordering::SeqCst) {
            if let Some(f) = weak.upgrade() {
                f.busy_next(10);
            }
        }
    }));
    let stats = accept_range(&*f, Gpa(0), Gpa(2 * KIB4)).unwrap();
    assert_eq!(stats.busy_retries, 20);
    assert_eq!(stats.accepted_4k, 2);
    assert_eq!(f.calls().len(), 22);
}

#[test]
fn accept_ram_skips_ram_that_is_all_accepted_already() {
    // "Lazy" boot: the VMM accepted everything; 2M answers skip whole blocks.
    let f = FakeTdxModule::new(48, 8 * MIB);
    let stats = accept_ram(&f, Gpa(MIB), Gpa(8 * MIB)).unwrap();
    assert_eq!(
        stats,
        AcceptRamStats {
            accepted: AcceptStats::default(),
            already_accepted_bytes: 7 * MIB,
        }
    );
    assert_eq!(stats.accepted_bytes(), 0);
    let mut want: Vec<_> = (0..256)
        .map(|i| (MIB + i * KIB4, AcceptSize::Size4K))
        .collect();
    want.extend((1..4).map(|i| (2 * i * MIB, AcceptSize::Size2M)));
    assert_eq!(accepts(&f), want);
}

#[test]
fn accept_ram_accepts_around_a_launch_image_accepted_in_4k_pages() {
    // "Strict" boot: RAM from 1M pending except a launch image of 300 KiB at 1M.
    let image_end = MIB + 75 * KIB4;
    let f = pending(8 * MIB, MIB, 8 * MIB);
    f.set_state(Gpa(MIB)..Gpa(image_end), PageState::Private);
    let stats = accept_ram(&f, Gpa(MIB), Gpa(8 * MIB)).unwrap();
    assert_eq!(stats.already_accepted_bytes, image_end - MIB);
    assert_eq!(stats.accepted_bytes(), 8 * MIB - image_end);
    assert_eq!(
        stats.accepted,
        AcceptStats {
            accepted_2m: 3,
            accepted_4k: 256 - 75,
            ..AcceptStats::default()
        }
    );
    assert!(f.all_in_state(Gpa(MIB)..Gpa(8 * MIB), PageState::Private));
}

#[test]
fn accept_ram_falls_back_inside_a_partly_accepted_2m_block() {
    // One private page in the middle of an otherwise pending 2M block.
    let f = pending(4 * MIB, 0, 4 * MIB);
    f.set_state(
        Gpa(2 * MIB + 7 * KIB4)..Gpa(2 * MIB + 8 * KIB4),
        PageState::Private,
    );
    let stats = accept_ram(&f, Gpa(0), Gpa(4 * MIB)).unwrap();
    assert_eq!(stats.already_accepted_bytes, KIB4);
    assert_eq!(
        stats.accepted,
        AcceptStats {
            accepted_2m: 1,
            accepted_4k: 511,
            size_mismatch_fallbacks: 1,
            ..AcceptStats::default()
        }
    );
    assert!(f.all_in_state(Gpa(0)..Gpa(4 * MIB), PageState::Private));
}

#[test]
fn accept_ram_still_stops_at_other_errors() {
    // The first block is accepted already (skipped), the second fails.
    let f = pending(4 * MIB, 2 * MIB, 4 * MIB);
    f.fail_accept_at(Gpa(2 * MIB + 3 * KIB4), 0xC000_0100_0000_0000);
    let e = accept_ram(&f, Gpa(0), Gpa(4 * MIB)).unwrap_err();
    assert_eq!(
        e,
        AcceptRangeError {
            accepted_up_to: Gpa(2 * MIB),
            cause: AcceptError::Other(0xC000_0100_0000_0000)
        }
    );
    assert_eq!(f.state(Gpa(2 * MIB)), PageState::Pending);
    assert_eq!(
        accept_ram(&f, Gpa(KIB4), Gpa(0)).unwrap_err().cause,
        AcceptError::InvalidRange {
            start: Gpa(KIB4),
            end: Gpa(0)
        }
    );
}
