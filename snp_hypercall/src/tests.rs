use crate::msr::{self, GhcbMsr, MsrError, PageOp};
use crate::psc::{
    psc_range, GhcbPsc, PscDesc, PscEntry, PscErrorKind, PscStats, PSC_MAX_STALLED_CALLS,
};
use crate::pvalidate::{PageSize, PvalidateError};
use crate::sim::{Call, FakeSnp, RmpState};
use crate::{c_bit_from_cpuid, CpuidError};

const MIB2: u64 = 2 << 20;

#[test]
fn c_bit_comes_from_cpuid_only_when_snp_is_reported() {
    assert_eq!(c_bit_from_cpuid(0b1_1011, 51 | (1 << 6)), Ok(51));
    assert_eq!(
        c_bit_from_cpuid(0b0_1011, 51),
        Err(CpuidError::NoSnp { eax: 0b1011 })
    );
    assert_eq!(
        c_bit_from_cpuid(1 << 4, 63),
        Err(CpuidError::CBitOutOfRange(63))
    );
    assert_eq!(
        c_bit_from_cpuid(1 << 4, 5),
        Err(CpuidError::CBitOutOfRange(5))
    );
}

/// A hypervisor that answers every MSR request with `response`.
struct Answers(u64);

impl GhcbMsr for Answers {
    fn exchange(&self, _request: u64) -> u64 {
        self.0
    }
}

#[test]
fn msr_protocol_answers_are_checked() {
    let fake = FakeSnp::new(47);
    assert_eq!(
        msr::sev_info(&fake).map(|i| (i.min_protocol, i.max_protocol, i.c_bit)),
        Ok((2, 2, 47))
    );
    assert_eq!(
        msr::hv_features(&fake).map(|f| f & msr::hv_feature::SNP),
        Ok(1)
    );
    msr::register_ghcb(&fake, 0x7000).unwrap();
    // A response code that is not the request's.
    assert_eq!(
        msr::sev_info(&Answers(0x013)),
        Err(MsrError::WrongResponse {
            request: 0x002,
            response: 0x013
        })
    );
    // Protocol 1 only, or a C-bit outside the address field.
    for bad in [
        (1u64 << 48) | (1 << 32) | (47 << 24) | 1,
        (2 << 48) | (2 << 32) | (60 << 24) | 1,
    ] {
        assert_eq!(
            msr::sev_info(&Answers(bad)),
            Err(MsrError::BadSevInfo { response: bad })
        );
    }
    // Registration that echoes another GFN.
    assert_eq!(
        msr::register_ghcb(&Answers((0x8 << 12) | 0x013), 0x7000),
        Err(MsrError::Refused {
            response: (0x8 << 12) | 0x013
        })
    );
    assert_eq!(
        msr::register_ghcb(&fake, 1 << 53),
        Err(MsrError::GfnTooLarge(1 << 41))
    );
}

#[test]
fn msr_page_state_change_is_one_page_with_its_error_checked() {
    let fake = FakeSnp::new(51);
    msr::page_state_change(&fake, 0x123, PageOp::Shared).unwrap();
    assert_eq!(fake.state(0x123000), RmpState::Shared);
    assert_eq!(
        fake.calls(),
        vec![Call::Msr((2 << 52) | (0x123 << 12) | 0x014)]
    );
    msr::page_state_change(&fake, 0x123, PageOp::Private).unwrap();
    assert_eq!(fake.state(0x123000), RmpState::PrivateUnvalidated);
    fake.msr_psc_fail_at(0x124000);
    assert_eq!(
        msr::page_state_change(&fake, 0x124, PageOp::Shared),
        Err(MsrError::Refused {
            response: (1 << 63) | 0x015
        })
    );
    assert_eq!(
        fake.state(0x124000),
        RmpState::PrivateValidated,
        "refused: unchanged"
    );
    assert_eq!(
        msr::page_state_change(&fake, 1 << 40, PageOp::Shared),
        Err(MsrError::GfnTooLarge(1 << 40))
    );
}

#[test]
fn psc_batches_runs_with_2m_entries_where_aligned() {
    let fake = FakeSnp::new(51);
    let mut stats = PscStats::default();
    // 4K pages up to the 2M boundary, two 2M blocks, 3 more 4K pages.
    let (start, end) = (MIB2 - 5 * 4096, 3 * MIB2 + 3 * 4096);
    psc_range(&fake, start, end, PageOp::Shared, true, &mut stats).unwrap();
    assert_eq!((stats.calls, stats.entries_2m, stats.entries_4k), (1, 2, 8));
    assert_eq!(fake.state(start), RmpState::Shared);
    assert_eq!(fake.state(end - 4096), RmpState::Shared);
    assert_eq!(fake.state(end), RmpState::PrivateValidated);
    assert_eq!(fake.state(start - 4096), RmpState::PrivateValidated);
    // More than 253 entries: several descriptors.
    let mut stats = PscStats::default();
    psc_range(
        &fake,
        8 * MIB2,
        8 * MIB2 + 600 * 4096,
        PageOp::Shared,
        false,
        &mut stats,
    )
    .unwrap();
    assert_eq!((stats.calls, stats.entries_4k), (3, 600));
    assert!(fake.violations().is_empty());
}

#[test]
fn psc_resumes_after_partial_progress() {
    let fake = FakeSnp::new(51);
    fake.psc_pages_per_call(100);
    let mut stats = PscStats::default();
    psc_range(&fake, 0, 2 * MIB2, PageOp::Shared, true, &mut stats).unwrap();
    // 1024 pages, 100 per call, a 2M entry resumed from its cur_page.
    assert_eq!(stats.calls, 11);
    assert!((0..1024).all(|p| fake.state(p * 4096) == RmpState::Shared));
}

#[test]
fn psc_failure_says_exactly_how_far_it_got() {
    let fake = FakeSnp::new(51);
    fake.psc_fail_at(MIB2 + 7 * 4096, (1 << 32) | 2);
    let mut stats = PscStats::default();
    let e = psc_range(
        &fake,
        MIB2 - 4096,
        3 * MIB2,
        PageOp::Shared,
        true,
        &mut stats,
    )
    .unwrap_err();
    assert_eq!(e.kind, PscErrorKind::Hypervisor((1 << 32) | 2));
    assert_eq!(
        e.done_up_to,
        MIB2 + 7 * 4096,
        "the 4K page and 7 pages of the 2M entry"
    );
    assert_eq!(fake.state(MIB2 + 6 * 4096), RmpState::Shared);
    assert_eq!(fake.state(MIB2 + 7 * 4096), RmpState::PrivateValidated);
}

#[test]
fn psc_answers_that_break_the_protocol_are_refused() {
    let mut stats = PscStats::default();
    let fake = FakeSnp::new(51);
    fake.psc_pages_per_call(3);
    fake.psc_backwards();
    let e = psc_range(&fake, 0, 10 * 4096, PageOp::Shared, false, &mut stats).unwrap_err();
    // The first call did 3 pages; the resumed one went back.
    assert_eq!((e.kind, e.done_up_to), (PscErrorKind::Backwards, 3 * 4096));

    let fake = FakeSnp::new(51);
    fake.psc_reserved();
    let e = psc_range(&fake, 0, 4096, PageOp::Shared, false, &mut stats).unwrap_err();
    assert_eq!(e.kind, PscErrorKind::ReservedSet(1));

    /// Rewrites the entry's GFN.
    struct Redirects;
    impl GhcbPsc for Redirects {
        fn page_state_change(&self, desc: &mut PscDesc) -> u64 {
            desc.entries[0] = PscEntry::new(0x999, PageOp::Shared, false);
            0
        }
    }
    let e = psc_range(&Redirects, 0, 4096, PageOp::Shared, false, &mut stats).unwrap_err();
    assert!(
        matches!(e.kind, PscErrorKind::EntryChanged { index: 0, .. }),
        "{e:?}"
    );

    /// Never does anything, and says nothing is wrong.
    struct Stalls;
    impl GhcbPsc for Stalls {
        fn page_state_change(&self, _desc: &mut PscDesc) -> u64 {
            0
        }
    }
    let mut stats = PscStats::default();
    let e = psc_range(&Stalls, 0, 4096, PageOp::Shared, false, &mut stats).unwrap_err();
    assert_eq!((e.kind, e.done_up_to), (PscErrorKind::NoProgress, 0));
    assert_eq!(stats.calls, u64::from(PSC_MAX_STALLED_CALLS));

    for (start, end) in [(0, 0), (4096, 4096), (1, 4096), (0, 4095), (0, 1 << 53)] {
        assert_eq!(
            psc_range(&Stalls, start, end, PageOp::Shared, false, &mut stats)
                .unwrap_err()
                .kind,
            PscErrorKind::BadRange
        );
    }
}

/// PVALIDATE through the fake, whose windows are bookkeeping only.
fn pvalidate(
    fake: &FakeSnp,
    va: u64,
    size: PageSize,
    validate: bool,
) -> Result<(), PvalidateError> {
    // SAFETY: the fake changes only its own RMP; no memory is involved.
    unsafe { crate::pvalidate::pvalidate(fake, va, size, validate) }
}

#[test]
fn pvalidate_outcomes_become_typed_errors() {
    let fake = FakeSnp::new(51);
    let window = 0xffff_c000_0000_0000;
    fake.map_window(window, 0x5000, PageSize::Size4K);
    assert_eq!(pvalidate(&fake, window, PageSize::Size4K, false), Ok(()));
    assert_eq!(fake.state(0x5000), RmpState::PrivateUnvalidated);
    // Already rescinded: CF = 1.
    assert_eq!(
        pvalidate(&fake, window, PageSize::Size4K, false),
        Err(PvalidateError::Unchanged)
    );
    assert_eq!(pvalidate(&fake, window, PageSize::Size4K, true), Ok(()));
    // 2M against a 4K RMP.
    fake.map_window(window + MIB2, MIB2, PageSize::Size2M);
    assert_eq!(
        pvalidate(&fake, window + MIB2, PageSize::Size2M, false),
        Err(PvalidateError::SizeMismatch)
    );
    fake.set_rmp_2m(true);
    assert_eq!(
        pvalidate(&fake, window + MIB2, PageSize::Size2M, false),
        Ok(())
    );
    // 2M through a 4K window, and a 2M request at an address not 2M-aligned.
    assert_eq!(
        pvalidate(&fake, window, PageSize::Size2M, true),
        Err(PvalidateError::Input)
    );
    fake.map_window(window + 4096, 2 * MIB2, PageSize::Size2M);
    assert_eq!(
        pvalidate(&fake, window + 4096, PageSize::Size2M, true),
        Err(PvalidateError::Input)
    );
    fake.pvalidate_fail_at(0x5000, 9);
    assert_eq!(
        pvalidate(&fake, window, PageSize::Size4K, false),
        Err(PvalidateError::Other(9))
    );
    assert!(fake.violations().is_empty());
    // What hardware would not answer is recorded: a shared page, no window.
    fake.set_state(0x5000, 0x6000, RmpState::Shared);
    fake.pvalidate_fail_at(0, 0);
    let _ = pvalidate(&fake, window, PageSize::Size4K, true);
    let _ = pvalidate(&fake, 0x1234_0000, PageSize::Size4K, true);
    assert_eq!(fake.violations().len(), 2, "{:?}", fake.violations());
}
