//! Page state change through the GHCB page (NAE exit code 0x8000_0010):
//! a descriptor of up to 253 entries in the GHCB's shared buffer, which the
//! hypervisor may process only in part before it resumes the guest; the
//! guest then asks again from where it stopped (GHCB specification; Linux
//! `vmgexit_psc`). The hypervisor writes the descriptor, so everything it
//! writes is checked: the header's end and reserved field must not change,
//! progress must not go backwards, an entry's page, operation and size must
//! stay as the guest wrote them, and stalls are bounded.

use crate::msr::PageOp;

/// SW_EXITCODE of the page state change NAE.
pub const EXIT_PSC: u64 = 0x8000_0010;
/// Entries that fit the GHCB shared buffer (2032 bytes: an 8-byte header
/// and 253 entries).
pub const PSC_MAX_ENTRIES: usize = 253;
/// Calls in a row that may make no progress before the guest gives up.
pub const PSC_MAX_STALLED_CALLS: u32 = 16;

const PAGE: u64 = 4096;
const PAGE_2M: u64 = 2 << 20;

/// One descriptor entry: bits 11:0 pages done (of a 2M entry), 51:12 GFN,
/// 55:52 operation, 56 size (1: 2M).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PscEntry(pub u64);

impl PscEntry {
    /// An entry for `gfn`, nothing done yet.
    pub const fn new(gfn: u64, op: PageOp, huge: bool) -> PscEntry {
        PscEntry(((gfn & ((1 << 40) - 1)) << 12) | ((op as u64) << 52) | ((huge as u64) << 56))
    }
    /// 4K pages the hypervisor says it has done.
    pub const fn cur_page(self) -> u64 {
        self.0 & 0xfff
    }
    /// The page (a 4K GFN; 2M-aligned for a 2M entry).
    pub const fn gfn(self) -> u64 {
        (self.0 >> 12) & ((1 << 40) - 1)
    }
    /// Whether the entry is a 2M page.
    pub const fn huge(self) -> bool {
        self.0 & (1 << 56) != 0
    }
    /// 4K pages the entry covers.
    pub const fn pages(self) -> u64 {
        if self.huge() {
            512
        } else {
            1
        }
    }
    /// The entry without its progress field: what the hypervisor may not
    /// change.
    const fn request(self) -> u64 {
        self.0 & !0xfff
    }
}

/// The descriptor as the GHCB's shared buffer holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PscDesc {
    /// The next entry to process.
    pub cur_entry: u16,
    /// The last entry.
    pub end_entry: u16,
    /// Must stay zero.
    pub reserved: u32,
    /// The entries (only `0..=end_entry` are used).
    pub entries: [PscEntry; PSC_MAX_ENTRIES],
}

impl Default for PscDesc {
    fn default() -> Self {
        PscDesc {
            cur_entry: 0,
            end_entry: 0,
            reserved: 0,
            entries: [PscEntry::default(); PSC_MAX_ENTRIES],
        }
    }
}

/// One page state change NAE: the kernel copies `desc` into its GHCB's
/// shared buffer, sets SW_EXITCODE 0x8000_0010, SW_EXITINFO1/2 = 0 and
/// SW_SCRATCH = the buffer's GPA (all marked valid), VMGEXITs with the GHCB
/// registered and interrupts off, copies the buffer back into `desc` and
/// returns SW_EXITINFO2 (0: no error). Host tests use [`crate::sim`].
pub trait GhcbPsc {
    /// The NAE.
    fn page_state_change(&self, desc: &mut PscDesc) -> u64;
}

impl<T: GhcbPsc + ?Sized> GhcbPsc for &T {
    fn page_state_change(&self, desc: &mut PscDesc) -> u64 {
        (**self).page_state_change(desc)
    }
}

/// What went wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PscErrorKind {
    /// The range is empty, unaligned, or past the 40-bit GFN field.
    BadRange,
    /// SW_EXITINFO2 was not zero (KVM: 0x100 << 32 generic, 1 << 32 | 1
    /// invalid header, 1 << 32 | 2 invalid entry).
    Hypervisor(u64),
    /// The hypervisor set the header's reserved field.
    ReservedSet(u32),
    /// It changed the last entry, or moved backwards.
    Backwards,
    /// It changed an entry's page, operation or size, or claimed more pages
    /// done than the entry has.
    EntryChanged {
        /// The entry.
        index: u16,
        /// What it holds now.
        entry: u64,
    },
    /// [`PSC_MAX_STALLED_CALLS`] calls in a row made no progress.
    NoProgress,
}

/// A page state change that stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PscError {
    /// `[start, done_up_to)` changed state (as far as the hypervisor's
    /// checked progress says); nothing is known of the rest.
    pub done_up_to: u64,
    /// Why it stopped.
    pub kind: PscErrorKind,
}

/// What a page state change took.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PscStats {
    /// NAEs issued (one per call, partial progress included).
    pub calls: u64,
    /// 2M entries sent.
    pub entries_2m: u64,
    /// 4K entries sent.
    pub entries_4k: u64,
}

/// Changes `[start, end)` (GPAs, 4K-aligned) to `op`, in descriptors of up
/// to [`PSC_MAX_ENTRIES`] entries, 2M entries for 2M-aligned 2M blocks when
/// `use_2m`. Counts into `stats` also when it fails.
pub fn psc_range(
    ghcb: &impl GhcbPsc,
    start: u64,
    end: u64,
    op: PageOp,
    use_2m: bool,
    stats: &mut PscStats,
) -> Result<(), PscError> {
    let bad = |kind| PscError {
        done_up_to: start,
        kind,
    };
    if start >= end
        || !start.is_multiple_of(PAGE)
        || !end.is_multiple_of(PAGE)
        || (end - 1) >> 52 != 0
    {
        return Err(bad(PscErrorKind::BadRange));
    }
    let mut desc = PscDesc::default();
    let mut next = start;
    while next < end {
        // Fill one descriptor.
        let batch_start = next;
        let mut count = 0;
        while next < end && count < PSC_MAX_ENTRIES {
            let huge = use_2m && next.is_multiple_of(PAGE_2M) && end - next >= PAGE_2M;
            desc.entries[count] = PscEntry::new(next / PAGE, op, huge);
            if huge {
                stats.entries_2m += 1;
                next += PAGE_2M;
            } else {
                stats.entries_4k += 1;
                next += PAGE;
            }
            count += 1;
        }
        desc.cur_entry = 0;
        desc.end_entry = (count - 1) as u16;
        desc.reserved = 0;
        run_descriptor(ghcb, &mut desc, batch_start, stats)?;
    }
    Ok(())
}

/// Issues the NAE until every entry of `desc` is done, checking each answer.
fn run_descriptor(
    ghcb: &impl GhcbPsc,
    desc: &mut PscDesc,
    batch_start: u64,
    stats: &mut PscStats,
) -> Result<(), PscError> {
    let sent = desc.clone();
    let end_entry = desc.end_entry;
    let mut progress = (0u16, 0u64);
    let mut stalled = 0;
    loop {
        let before = desc.clone();
        stats.calls += 1;
        let status = ghcb.page_state_change(desc);
        // What the hypervisor wrote is checked before it is believed.
        let checked = check_answer(&sent, &before, desc);
        let done_up_to = match checked {
            Ok(()) => done_up_to(desc, batch_start),
            Err(_) => done_up_to(&before, batch_start),
        };
        let fail = |kind| Err(PscError { done_up_to, kind });
        if let Err(kind) = checked {
            return fail(kind);
        }
        if status != 0 {
            return fail(PscErrorKind::Hypervisor(status));
        }
        if desc.cur_entry > end_entry {
            return Ok(());
        }
        let now = (
            desc.cur_entry,
            desc.entries[desc.cur_entry as usize].cur_page(),
        );
        if now == progress {
            stalled += 1;
            if stalled >= PSC_MAX_STALLED_CALLS {
                return fail(PscErrorKind::NoProgress);
            }
        } else {
            stalled = 0;
            progress = now;
        }
    }
}

fn check_answer(sent: &PscDesc, before: &PscDesc, after: &PscDesc) -> Result<(), PscErrorKind> {
    if after.reserved != 0 {
        return Err(PscErrorKind::ReservedSet(after.reserved));
    }
    if after.end_entry != sent.end_entry || after.cur_entry < before.cur_entry {
        return Err(PscErrorKind::Backwards);
    }
    for index in 0..=sent.end_entry {
        let (was, now) = (
            before.entries[index as usize],
            after.entries[index as usize],
        );
        if now.request() != sent.entries[index as usize].request() || now.cur_page() > now.pages() {
            return Err(PscErrorKind::EntryChanged {
                index,
                entry: now.0,
            });
        }
        if now.cur_page() < was.cur_page() {
            return Err(PscErrorKind::Backwards);
        }
    }
    Ok(())
}

/// The GPA up to which `desc` says the batch starting at `batch_start` is
/// done: every entry before `cur_entry`, and `cur_page` pages of that one.
fn done_up_to(desc: &PscDesc, batch_start: u64) -> u64 {
    let last = desc.end_entry as usize;
    let current = desc.cur_entry as usize;
    if current > last {
        let entry = desc.entries[last];
        return entry.gfn() * PAGE + entry.pages() * PAGE;
    }
    let entry = desc.entries[current];
    let at = entry.gfn() * PAGE + entry.cur_page() * PAGE;
    at.max(batch_start)
}
