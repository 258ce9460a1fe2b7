//! A fake SEV-SNP hypervisor and CPU for host tests (feature `sim`): a
//! per-4K RMP (shared, private unvalidated, private validated), the GHCB MSR
//! protocol and GHCB-page PSC over it, and PVALIDATE through "windows" (the
//! virtual addresses a test maps a frame at), with scripted misbehaviour.
//! Whatever real hardware would not let the guest see (a PVALIDATE of a
//! hypervisor-owned page is a nested fault, an unmapped address a #PF) is
//! counted as a violation and answered FAIL_INPUT, so a test can assert
//! there was none.

use crate::msr::{code, GhcbMsr, PageOp};
use crate::psc::{GhcbPsc, PscDesc};
use crate::pvalidate::{rc, PageSize, Pvalidate, PvalidateOutcome};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

const PAGE: u64 = 4096;

/// A page's RMP state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum RmpState {
    /// Hypervisor-owned.
    Shared,
    /// Assigned to the guest, not validated: a private access is a #VC.
    PrivateUnvalidated,
    /// Assigned and validated.
    PrivateValidated,
}

/// One recorded call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    /// A GHCB MSR exchange (the request).
    Msr(u64),
    /// A GHCB-page PSC NAE: (first GFN of the descriptor, its entries).
    Psc(u64, u16),
    /// A PVALIDATE: (GPA, size, validate).
    Pvalidate(u64, PageSize, bool),
}

#[derive(Default)]
struct Inner {
    rmp: BTreeMap<u64, RmpState>,
    default_state: Option<RmpState>,
    rmp_2m: bool,
    windows: BTreeMap<u64, (u64, PageSize)>,
    calls: Vec<Call>,
    zeroed: BTreeSet<u64>,
    c_bit: u8,
    psc_pages_per_call: Option<u64>,
    psc_fail_at: Option<(u64, u64)>,
    psc_lie: bool,
    psc_backwards: bool,
    psc_reserved: bool,
    msr_fail_at: Option<u64>,
    unchanged_at: Option<u64>,
    pvalidate_fail_at: Option<(u64, u32)>,
    violations: Vec<String>,
}

/// The fake hypervisor and CPU.
pub struct FakeSnp {
    inner: Mutex<Inner>,
}

impl FakeSnp {
    /// Every page private and validated (what launch and boot leave), a
    /// 4K-only RMP, the C-bit at `c_bit`.
    pub fn new(c_bit: u8) -> FakeSnp {
        FakeSnp {
            inner: Mutex::new(Inner {
                default_state: Some(RmpState::PrivateValidated),
                c_bit,
                ..Inner::default()
            }),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        f(&mut self.inner.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The RMP state of the page at `gpa`.
    pub fn state(&self, gpa: u64) -> RmpState {
        self.with(|i| i.state(gpa / PAGE))
    }
    /// Sets `[start, end)` to `state`.
    pub fn set_state(&self, start: u64, end: u64, state: RmpState) {
        self.with(|i| {
            for gfn in start / PAGE..end.div_ceil(PAGE) {
                i.rmp.insert(gfn, state);
            }
        })
    }
    /// Whether the RMP holds 2M pages (then a 2M PVALIDATE of an aligned
    /// block in one state succeeds; else FAIL_SIZEMISMATCH).
    pub fn set_rmp_2m(&self, on: bool) {
        self.with(|i| i.rmp_2m = on)
    }
    /// Every call so far.
    pub fn calls(&self) -> Vec<Call> {
        self.with(|i| i.calls.clone())
    }
    /// What real hardware would not have answered (see the module docs).
    pub fn violations(&self) -> Vec<String> {
        self.with(|i| i.violations.clone())
    }
    /// Whether the page at `gpa` was zeroed through a window.
    pub fn zeroed(&self, gpa: u64) -> bool {
        self.with(|i| i.zeroed.contains(&(gpa / PAGE)))
    }

    /// Maps the frame at `gpa` (of `size`) at `va`, private, as a window.
    pub fn map_window(&self, va: u64, gpa: u64, size: PageSize) {
        self.with(|i| i.windows.insert(va, (gpa, size)));
    }
    /// Unmaps the window at `va`.
    pub fn unmap_window(&self, va: u64) {
        self.with(|i| i.windows.remove(&va));
    }
    /// Zeroes `bytes` through the window at `va`: a private write, which
    /// needs every page validated.
    pub fn zero_window(&self, va: u64, bytes: u64) {
        self.with(|i| match i.windows.get(&va).copied() {
            Some((gpa, _)) => {
                for gfn in gpa / PAGE..(gpa + bytes) / PAGE {
                    if i.state(gfn) != RmpState::PrivateValidated {
                        i.violations.push(format!(
                            "private write to GFN {gfn:#x} in state {:?}",
                            i.state(gfn)
                        ));
                    }
                    i.zeroed.insert(gfn);
                }
            }
            None => i
                .violations
                .push(format!("write through unmapped window {va:#x}")),
        })
    }

    /// Hostile: each PSC NAE does at most `pages` 4K pages, then returns.
    pub fn psc_pages_per_call(&self, pages: u64) {
        self.with(|i| i.psc_pages_per_call = Some(pages.max(1)))
    }
    /// Hostile: the PSC stops at the page `gpa` with SW_EXITINFO2 `error`.
    pub fn psc_fail_at(&self, gpa: u64, error: u64) {
        self.with(|i| i.psc_fail_at = Some((gpa / PAGE, error)))
    }
    /// Hostile: the PSC reports every entry done and changes nothing.
    pub fn psc_lie(&self) {
        self.with(|i| i.psc_lie = true)
    }
    /// Hostile: a PSC resumed after partial progress moves `cur_entry` back
    /// to 0.
    pub fn psc_backwards(&self) {
        self.with(|i| i.psc_backwards = true)
    }
    /// Hostile: the PSC sets the header's reserved field.
    pub fn psc_reserved(&self) {
        self.with(|i| i.psc_reserved = true)
    }
    /// Hostile: the MSR-protocol PSC of the page `gpa` answers an error.
    pub fn msr_psc_fail_at(&self, gpa: u64) {
        self.with(|i| i.msr_fail_at = Some(gpa / PAGE))
    }
    /// Hostile, as a hypervisor that took the page at `gpa` away and gave
    /// it back: its Validated bit is clear behind the guest's back, so the
    /// guest's next PVALIDATE of it may find it unchanged.
    pub fn take_page(&self, gpa: u64) {
        self.with(|i| {
            i.rmp.insert(gpa / PAGE, RmpState::PrivateUnvalidated);
        })
    }
    /// Scripted: PVALIDATE of the page `gpa` reports CF = 1 (unchanged).
    pub fn pvalidate_unchanged_at(&self, gpa: u64) {
        self.with(|i| i.unchanged_at = Some(gpa / PAGE))
    }
    /// Scripted: PVALIDATE of the page `gpa` returns `code`.
    pub fn pvalidate_fail_at(&self, gpa: u64, code: u32) {
        self.with(|i| i.pvalidate_fail_at = Some((gpa / PAGE, code)))
    }
}

impl Inner {
    fn state(&self, gfn: u64) -> RmpState {
        self.rmp
            .get(&gfn)
            .copied()
            .or(self.default_state)
            .unwrap_or(RmpState::Shared)
    }

    fn change(&mut self, gfn: u64, op: u64) {
        let new = match (op, self.state(gfn)) {
            (1, RmpState::Shared) => RmpState::PrivateUnvalidated,
            (1, keep) => keep,
            _ => RmpState::Shared,
        };
        self.rmp.insert(gfn, new);
    }
}

impl GhcbMsr for FakeSnp {
    fn exchange(&self, request: u64) -> u64 {
        self.with(|i| {
            i.calls.push(Call::Msr(request));
            match request & 0xfff {
                code::SEV_INFO_REQ => {
                    (2u64 << 48) | (2u64 << 32) | (u64::from(i.c_bit) << 24) | code::SEV_INFO_RESP
                }
                code::HV_FEATURES_REQ => (0b11 << 12) | code::HV_FEATURES_RESP,
                code::REGISTER_GHCB_REQ => (request & !0xfff) | code::REGISTER_GHCB_RESP,
                code::PSC_REQ => {
                    let gfn = (request >> 12) & ((1 << 40) - 1);
                    let op = (request >> 52) & 0xf;
                    if i.msr_fail_at == Some(gfn)
                        || !(op == PageOp::Private as u64 || op == PageOp::Shared as u64)
                    {
                        // KVM's generic error.
                        return (1 << 63) | code::PSC_RESP;
                    }
                    i.change(gfn, op);
                    code::PSC_RESP
                }
                _ => 0,
            }
        })
    }
}

impl GhcbPsc for FakeSnp {
    fn page_state_change(&self, desc: &mut PscDesc) -> u64 {
        self.with(|i| {
            let first = desc.entries[desc.cur_entry.min(desc.end_entry) as usize].gfn();
            i.calls.push(Call::Psc(first, desc.end_entry + 1));
            if i.psc_reserved {
                desc.reserved = 1;
            }
            if i.psc_lie {
                desc.cur_entry = desc.end_entry + 1;
                return 0;
            }
            let started = desc.cur_entry;
            let mut budget = i.psc_pages_per_call.unwrap_or(u64::MAX);
            while desc.cur_entry <= desc.end_entry && budget > 0 {
                let index = desc.cur_entry as usize;
                let entry = desc.entries[index];
                let op = (entry.0 >> 52) & 0xf;
                let mut done = entry.cur_page();
                while done < entry.pages() && budget > 0 {
                    let gfn = entry.gfn() + done;
                    if i.psc_fail_at.map(|(at, _)| at) == Some(gfn) {
                        desc.entries[index].0 = (entry.0 & !0xfff) | done;
                        return i.psc_fail_at.map_or(0, |(_, error)| error);
                    }
                    i.change(gfn, op);
                    done += 1;
                    budget -= 1;
                }
                desc.entries[index].0 = (entry.0 & !0xfff) | done;
                if done == entry.pages() {
                    desc.cur_entry += 1;
                }
            }
            if i.psc_backwards && started > 0 {
                desc.cur_entry = 0;
            }
            0
        })
    }
}

#[allow(unsafe_code)]
impl Pvalidate for FakeSnp {
    /// Safe in fact: the fake changes only its own RMP.
    unsafe fn pvalidate(&self, va: u64, size: PageSize, validate: bool) -> PvalidateOutcome {
        self.with(|i| {
            let fail = |rc| PvalidateOutcome {
                rc,
                unchanged: false,
            };
            let Some((gpa, mapped)) = i.windows.get(&va).copied() else {
                i.violations
                    .push(format!("PVALIDATE of {va:#x}, not mapped: a #PF"));
                return fail(rc::FAIL_INPUT);
            };
            i.calls.push(Call::Pvalidate(gpa, size, validate));
            if !va.is_multiple_of(size.bytes()) || size.bytes() > mapped.bytes() {
                return fail(rc::FAIL_INPUT);
            }
            let first = gpa / PAGE;
            let pages = size.bytes() / PAGE;
            if let Some((at, code)) = i.pvalidate_fail_at {
                if (first..first + pages).contains(&at) {
                    return fail(code);
                }
            }
            if size == PageSize::Size2M && !i.rmp_2m {
                return fail(rc::FAIL_SIZEMISMATCH);
            }
            let states: BTreeSet<_> = (first..first + pages).map(|g| i.state(g)).collect();
            if states.contains(&RmpState::Shared) {
                i.violations.push(format!(
                    "PVALIDATE of hypervisor-owned GFN {first:#x}: a nested fault, no progress"
                ));
                return fail(rc::FAIL_INPUT);
            }
            let target = if validate {
                RmpState::PrivateValidated
            } else {
                RmpState::PrivateUnvalidated
            };
            let scripted = i
                .unchanged_at
                .is_some_and(|at| (first..first + pages).contains(&at));
            let unchanged = scripted || states.iter().all(|s| *s == target);
            if !scripted {
                for gfn in first..first + pages {
                    i.rmp.insert(gfn, target);
                }
            }
            PvalidateOutcome {
                rc: rc::SUCCESS,
                unchanged,
            }
        })
    }
}
