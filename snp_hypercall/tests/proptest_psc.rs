//! Property test of the GHCB-page page state change loop, which runs on the
//! hypervisor's word: each NAE is answered from a random script (do some
//! pages, do nothing, move `cur_entry` back, change an entry, set the
//! reserved field, report an error, claim everything done), then by a
//! random default forever. The hypervisor keeps its own record of the pages
//! it really changed. Checks:
//! - the loop ends within its bound: at most `PSC_MAX_STALLED_CALLS` calls
//!   in a row without progress (the answerer panics well past it);
//! - `Ok` only if the descriptor says every entry is done, and every page
//!   the guest was told is done lies in `[start, end)`;
//! - on `Err`, `done_up_to` lies in `[start, end]` and never past what the
//!   hypervisor's last accepted answer claimed: the guest believes no more
//!   than it was told, and refuses answers that break the protocol;
//! - every descriptor the guest sends has its entries in order, 2M entries
//!   only for aligned 2M blocks inside the range, at most 253 of them.

use proptest::prelude::*;
use snp_hypercall::msr::PageOp;
use snp_hypercall::psc::{
    psc_range, GhcbPsc, PscDesc, PscEntry, PscErrorKind, PscStats, PSC_MAX_ENTRIES,
    PSC_MAX_STALLED_CALLS,
};
use std::cell::RefCell;

const PAGE: u64 = 4096;
const MIB2: u64 = 2 << 20;

#[derive(Clone, Copy, Debug)]
enum Answer {
    /// Do up to this many pages, honestly.
    Pages(u16),
    Nothing,
    Backwards,
    ChangeEntry,
    Reserved,
    Error,
    /// Claim every entry done without doing anything.
    Lie,
}

fn answer() -> impl Strategy<Value = Answer> {
    prop_oneof![
        8 => (1u16..600).prop_map(Answer::Pages),
        2 => Just(Answer::Nothing),
        1 => Just(Answer::Backwards),
        1 => Just(Answer::ChangeEntry),
        1 => Just(Answer::Reserved),
        1 => Just(Answer::Error),
        1 => Just(Answer::Lie),
    ]
}

struct Hypervisor {
    script: RefCell<Vec<Answer>>,
    then: Answer,
    calls: RefCell<u64>,
    /// (start, end) of the range, to check each descriptor against.
    range: (u64, u64),
    /// The furthest GPA any answer claimed done.
    claimed: RefCell<u64>,
}

/// What `desc` claims done, as a GPA: every entry before `cur_entry`, and
/// `cur_page` pages of that one.
fn frontier(desc: &PscDesc) -> u64 {
    let last = (desc.end_entry as usize).min(PSC_MAX_ENTRIES - 1);
    let current = desc.cur_entry as usize;
    if current > last {
        let e = desc.entries[last];
        return e.gfn() * PAGE + e.pages() * PAGE;
    }
    let e = desc.entries[current];
    e.gfn() * PAGE + e.cur_page().min(e.pages()) * PAGE
}

impl GhcbPsc for Hypervisor {
    fn page_state_change(&self, desc: &mut PscDesc) -> u64 {
        *self.calls.borrow_mut() += 1;
        assert!(*self.calls.borrow() < 100_000, "the loop does not end");
        // What the guest sent is well formed.
        let (start, end) = self.range;
        assert!((desc.end_entry as usize) < PSC_MAX_ENTRIES);
        let entries = &desc.entries[..=desc.end_entry as usize];
        for pair in entries.windows(2) {
            assert_eq!(
                pair[0].gfn() * PAGE + pair[0].pages() * PAGE,
                pair[1].gfn() * PAGE,
                "entries in order, contiguous"
            );
        }
        for e in entries {
            let (at, bytes) = (e.gfn() * PAGE, e.pages() * PAGE);
            assert!(start <= at && at + bytes <= end, "{e:?} outside the range");
            assert!(!e.huge() || at % MIB2 == 0);
        }
        let next = self.script.borrow_mut().pop().unwrap_or(self.then);
        let status = self.answer(next, desc);
        let now = frontier(desc);
        let mut claimed = self.claimed.borrow_mut();
        *claimed = (*claimed).max(now);
        status
    }
}

impl Hypervisor {
    fn answer(&self, next: Answer, desc: &mut PscDesc) -> u64 {
        match next {
            Answer::Pages(n) => {
                let mut budget = u64::from(n);
                while desc.cur_entry <= desc.end_entry && budget > 0 {
                    let i = desc.cur_entry as usize;
                    let e = desc.entries[i];
                    let take = (e.pages() - e.cur_page()).min(budget);
                    desc.entries[i] = PscEntry((e.0 & !0xfff) | (e.cur_page() + take));
                    budget -= take;
                    if desc.entries[i].cur_page() == e.pages() {
                        desc.cur_entry += 1;
                    }
                }
                0
            }
            Answer::Nothing => 0,
            Answer::Backwards => {
                desc.cur_entry = desc.cur_entry.saturating_sub(1);
                if desc.cur_entry == 0 {
                    desc.end_entry = desc.end_entry.wrapping_add(1);
                }
                0
            }
            Answer::ChangeEntry => {
                let i = desc.cur_entry.min(desc.end_entry) as usize;
                desc.entries[i].0 ^= 1 << 20;
                0
            }
            Answer::Reserved => {
                desc.reserved = 7;
                0
            }
            Answer::Error => (1 << 32) | 2,
            Answer::Lie => {
                desc.cur_entry = desc.end_entry + 1;
                0
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn psc_loop_ends_believes_no_more_than_it_is_told_and_refuses_broken_answers(
        start_page in 0u64..2048,
        pages in 1u64..1500,
        use_2m in any::<bool>(),
        script in prop::collection::vec(answer(), 0..40),
        then in answer(),
    ) {
        let (start, end) = (start_page * PAGE, (start_page + pages) * PAGE);
        let hv = Hypervisor {
            script: RefCell::new(script.into_iter().rev().collect()),
            then,
            calls: RefCell::new(0),
            range: (start, end),
            claimed: RefCell::new(start),
        };
        let mut stats = PscStats::default();
        let result = psc_range(&hv, start, end, PageOp::Shared, use_2m, &mut stats);
        prop_assert_eq!(stats.calls, *hv.calls.borrow());
        let claimed = *hv.claimed.borrow();
        match result {
            // Done only if the hypervisor said all of it was.
            Ok(()) => prop_assert_eq!(claimed, end),
            Err(e) => {
                prop_assert!(start <= e.done_up_to && e.done_up_to <= end, "{e:?}");
                prop_assert!(e.done_up_to <= claimed, "{e:?}: believed more than told ({claimed:#x})");
                prop_assert!(e.done_up_to % PAGE == 0);
                if e.kind == PscErrorKind::NoProgress {
                    prop_assert!(stats.calls >= u64::from(PSC_MAX_STALLED_CALLS));
                }
            }
        }
    }
}
