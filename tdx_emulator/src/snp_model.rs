//! The SEV-SNP side of the emulator (issue 9, part 2), host-tested: per-4K
//! RMP state, the GHCB MSR protocol and GHCB-page page state change as a
//! KVM-like hypervisor answers them, PVALIDATE as the CPU executes it, and
//! what a nested fault means under the RMP checks. The vCPU loop
//! (hypervisor/snp.rs) calls it; everything here is host-tested.
//!
//! Sources, as for the TD model (docs/tdx-emulator.md has the table):
//! AMD APM vol. 2 15.36.10 (Table 15-39: which access faults to whom),
//! 15.36.6 (PVALIDATE, RMP page size); the GHCB specification's MSR
//! protocol and PSC layout as Linux `sev-common.h` spells them; KVM
//! `sev.c` (`snp_begin_psc`, `GHCB_MSR_PSC_RESP`, `VMGEXIT_PSC_ERROR_*`),
//! KVM `npf_interception` + QEMU `kvm_convert_memory` (implicit conversion).
//! Written from those, not from the guest library (`snp_hypercall`), so the
//! two do not share a mistake.

use crate::model::Counters;
use crate::page_slots::{self, BUSY};
use core::fmt;
use core::sync::atomic::{AtomicU64, AtomicU8, Ordering};

const PAGE: u64 = 4096;
/// Pages per 2M block.
const PAGES_2M: u64 = 512;
/// The RMP entry's VMSA bit, kept beside the state in the page's byte (set
/// by RMPADJUST; any change of the page's state clears it, as RMPUPDATE and
/// PVALIDATE rewrite the entry).
const VMSA: u8 = 0x40;

/// RMP state of one 4K page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RmpState {
    /// Hypervisor-owned (shared): reachable through the C=0 alias only.
    Shared = 0,
    /// Assigned to the guest, not validated: a C=1 access is #VC 0x404.
    Unvalidated = 1,
    /// Assigned and validated: reachable through the C=1 alias.
    Validated = 2,
}

impl RmpState {
    fn from_byte(byte: u8) -> RmpState {
        match byte & !(BUSY | VMSA) {
            1 => RmpState::Unvalidated,
            2 => RmpState::Validated,
            _ => RmpState::Shared,
        }
    }
}

/// What the model needs from the machine (as the TD model's `Backing`).
pub trait SnpBacking: Sync {
    /// Makes the nested tables match `state` for the page at `gpa` (no
    /// C-bit): the C=1 alias mapped only while `Validated`, the C=0 alias
    /// read-write while `Shared` and, while private, read-only to a
    /// "ciphertext" frame (C=0 reads of a private page return no data of
    /// the guest's; writes fault).
    fn set_mapping(&self, gpa: u64, state: RmpState);
    /// Zeroes the page (its new contents after the hypervisor reassigns it).
    fn zero_page(&self, gpa: u64);
    /// Drops every vCPU's cached nested translations (as the TD model's).
    fn flush_nested_tlbs(&self);
}

/// The hypervisor's answer to an RMP violation (a C=1 access to a shared
/// page, a C=0 write to a private one, PVALIDATE of a shared page), which
/// reaches it as a nested fault (`snp-wrong-state=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RmpPolicy {
    /// Convert the page to the state of the access, as KVM
    /// (KVM_EXIT_MEMORY_FAULT) + QEMU (`kvm_convert_memory`) do.
    #[default]
    Convert,
    /// Stop the guest with a report.
    Kill,
}

/// Options of the SNP mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnpOptions {
    /// The C-bit position (must be below the L1's phys-bits).
    pub c_bit: u8,
    /// RAM outside the launch image starts assigned but unvalidated
    /// (SNP_LAUNCH leaves only the measured image validated).
    pub strict: bool,
    /// What an RMP violation leads to.
    pub policy: RmpPolicy,
    /// Hostile: a GHCB-page PSC does at most this many 4K pages per
    /// VMGEXIT (0: all).
    pub psc_pages_per_call: u64,
    /// Hostile: a GHCB-page PSC reports every entry done and changes
    /// nothing.
    pub psc_lie: bool,
    /// Every 2M PVALIDATE is FAIL_SIZEMISMATCH (as when the hypervisor
    /// backs the guest with 4K RMP entries only).
    pub refuse_2m_pvalidate: bool,
}

impl Default for SnpOptions {
    fn default() -> Self {
        SnpOptions {
            c_bit: 47,
            strict: true,
            policy: RmpPolicy::Convert,
            psc_pages_per_call: 0,
            psc_lie: false,
            refuse_2m_pvalidate: false,
        }
    }
}

/// Why an SNP option word was refused; `Display` gives one line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnpOptionError<'w> {
    /// A word the SNP mode does not know.
    Unknown(&'w str),
    /// `c-bit=` outside 32..=51 (it must also be below the L1's phys-bits).
    CBit(&'w str),
    /// `snp-wrong-state=` with something else than convert or kill.
    Policy(&'w str),
    /// `psc-pages-per-call=` without a number from 1 on.
    PagesPerCall(&'w str),
}

impl fmt::Display for SnpOptionError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SnpOptionError::Unknown(w) => write!(
                f,
                "SNP option \"{w}\": unknown (known: strict, lazy, c-bit=<32..51>, \
                 snp-wrong-state=convert|kill (or wrong-state=convert|shutdown), \
                 psc-pages-per-call=<n>, psc-lie, \
                 pvalidate-2m-refused)"
            ),
            SnpOptionError::CBit(w) => write!(f, "SNP option \"{w}\": c-bit= takes 32..=51"),
            SnpOptionError::Policy(w) => {
                write!(
                    f,
                    "SNP option \"{w}\": snp-wrong-state= takes convert or kill, \
                     wrong-state= convert or shutdown"
                )
            }
            SnpOptionError::PagesPerCall(w) => {
                write!(
                    f,
                    "SNP option \"{w}\": psc-pages-per-call= needs a number from 1 on"
                )
            }
        }
    }
}

impl SnpOptions {
    /// Applies one word of the emulator's command line; a refused word
    /// changes nothing.
    pub fn parse_word<'w>(&mut self, word: &'w str) -> Result<(), SnpOptionError<'w>> {
        match word {
            "strict" => self.strict = true,
            "lazy" => self.strict = false,
            "psc-lie" => self.psc_lie = true,
            "pvalidate-2m-refused" => self.refuse_2m_pvalidate = true,
            _ => {
                if let Some(bit) = word.strip_prefix("c-bit=") {
                    match bit.parse::<u8>() {
                        Ok(bit) if (32..=51).contains(&bit) => self.c_bit = bit,
                        _ => return Err(SnpOptionError::CBit(word)),
                    }
                } else if let Some(policy) = word.strip_prefix("snp-wrong-state=") {
                    self.policy = match policy {
                        "convert" => RmpPolicy::Convert,
                        "kill" => RmpPolicy::Kill,
                        _ => return Err(SnpOptionError::Policy(word)),
                    };
                } else if let Some(policy) = word.strip_prefix("wrong-state=") {
                    // The TD mode's word, for the same two policies (SNP
                    // has no #VE to report a wrong-state access with).
                    self.policy = match policy {
                        "convert" => RmpPolicy::Convert,
                        "shutdown" => RmpPolicy::Kill,
                        _ => return Err(SnpOptionError::Policy(word)),
                    };
                } else if let Some(n) = word.strip_prefix("psc-pages-per-call=") {
                    match crate::model::count_from_one(n) {
                        Some(n) => self.psc_pages_per_call = n,
                        None => return Err(SnpOptionError::PagesPerCall(word)),
                    }
                } else {
                    return Err(SnpOptionError::Unknown(word));
                }
            }
        }
        Ok(())
    }
}

/// The counters of an SNP run (the `SNPEMU` line).
pub struct SnpCounters {
    /// GHCB MSR protocol requests, and of those page state changes.
    pub msr_requests: AtomicU64,
    pub msr_psc: AtomicU64,
    /// GHCB-page PSC VMGEXITs (each partial one counts).
    pub ghcb_psc_calls: AtomicU64,
    /// Pages a PSC made private and shared.
    pub pages_to_private: AtomicU64,
    pub pages_to_shared: AtomicU64,
    /// PVALIDATEs that changed the Validated bit, at 4K and 2M.
    pub pvalidated: [AtomicU64; 2],
    /// PVALIDATEs answered CF = 1 (no change) and FAIL_SIZEMISMATCH.
    pub pvalidate_unchanged: AtomicU64,
    pub pvalidate_size_mismatch: AtomicU64,
    /// #VC 0x404 (a C=1 access to an unvalidated page) delivered.
    pub vc_page_not_validated: AtomicU64,
    /// RMP violations (wrong-state accesses, PVALIDATE of a shared page).
    pub rmp_violations: AtomicU64,
    /// Pages the hypervisor converted on such a violation.
    pub implicit_conversions: AtomicU64,
    /// #VC delivered for intercepts, by exit code: CPUID, IOIO, MSR, and
    /// the rest (WBINVD, VMMCALL, ...).
    pub vc_cpuid: AtomicU64,
    pub vc_ioio: AtomicU64,
    pub vc_msr: AtomicU64,
    pub vc_other: AtomicU64,
    /// VMGEXITs with a GHCB page (the MSR protocol counts above).
    pub ghcb_exits: AtomicU64,
    /// GHCB requests refused as malformed (not shared, not registered,
    /// wrong usage or scratch, unknown exit code, bad VMSA).
    pub ghcb_refused: AtomicU64,
    /// APs started through AP creation.
    pub aps_created: AtomicU64,
    /// RMPADJUSTs that succeeded.
    pub rmpadjust: AtomicU64,
}

impl Default for SnpCounters {
    fn default() -> Self {
        Self::new()
    }
}

impl SnpCounters {
    /// Every counter at 0.
    pub const fn new() -> Self {
        SnpCounters {
            msr_requests: AtomicU64::new(0),
            msr_psc: AtomicU64::new(0),
            ghcb_psc_calls: AtomicU64::new(0),
            pages_to_private: AtomicU64::new(0),
            pages_to_shared: AtomicU64::new(0),
            pvalidated: [AtomicU64::new(0), AtomicU64::new(0)],
            pvalidate_unchanged: AtomicU64::new(0),
            pvalidate_size_mismatch: AtomicU64::new(0),
            vc_page_not_validated: AtomicU64::new(0),
            rmp_violations: AtomicU64::new(0),
            implicit_conversions: AtomicU64::new(0),
            vc_cpuid: AtomicU64::new(0),
            vc_ioio: AtomicU64::new(0),
            vc_msr: AtomicU64::new(0),
            vc_other: AtomicU64::new(0),
            ghcb_exits: AtomicU64::new(0),
            ghcb_refused: AtomicU64::new(0),
            aps_created: AtomicU64::new(0),
            rmpadjust: AtomicU64::new(0),
        }
    }
}

impl fmt::Display for SnpCounters {
    /// The one line the harness parses: `SNPEMU name=value ...`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SNPEMU{}", self.fields())
    }
}

impl SnpCounters {
    /// The ` name=value` words of the line, for a caller that adds its own.
    pub fn fields(&self) -> SnpCounterFields<'_> {
        SnpCounterFields(self)
    }
}

/// [`SnpCounters::fields`].
pub struct SnpCounterFields<'a>(&'a SnpCounters);

impl fmt::Display for SnpCounterFields<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let load = |c: &AtomicU64| c.load(Ordering::SeqCst);
        let c = self.0;
        for (name, value) in [
            ("msr_requests", load(&c.msr_requests)),
            ("msr_psc", load(&c.msr_psc)),
            ("ghcb_psc_calls", load(&c.ghcb_psc_calls)),
            ("pages_to_private", load(&c.pages_to_private)),
            ("pages_to_shared", load(&c.pages_to_shared)),
            ("pvalidate_4k", load(&c.pvalidated[0])),
            ("pvalidate_2m", load(&c.pvalidated[1])),
            ("pvalidate_unchanged", load(&c.pvalidate_unchanged)),
            ("pvalidate_size_mismatch", load(&c.pvalidate_size_mismatch)),
            ("vc_404", load(&c.vc_page_not_validated)),
            ("wrong_state", load(&c.rmp_violations)),
            ("implicit_conversions", load(&c.implicit_conversions)),
            ("vc_cpuid", load(&c.vc_cpuid)),
            ("vc_ioio", load(&c.vc_ioio)),
            ("vc_msr", load(&c.vc_msr)),
            ("vc_other", load(&c.vc_other)),
            ("ghcb_exits", load(&c.ghcb_exits)),
            ("ghcb_refused", load(&c.ghcb_refused)),
            ("aps_created", load(&c.aps_created)),
            ("rmpadjust", load(&c.rmpadjust)),
        ] {
            write!(f, " {name}={value}")?;
        }
        Ok(())
    }
}

/// What a nested fault of an SNP guest becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnpFault {
    /// The alias is mapped by now (or the page was busy): re-execute.
    Retry,
    /// Deliver #VC with this error code (the vCPU loop puts the faulting
    /// virtual address in CR2).
    Vc {
        /// The error code (0x404: PAGE_NOT_VALIDATED).
        error_code: u64,
    },
    /// Stop the guest.
    Kill(SnpKill),
}

/// Why the SNP guest is stopped; `Display` gives one line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnpKill {
    /// A C=1 access to a hypervisor-owned page (policy kill).
    PrivateAccessToShared { gpa: u64 },
    /// A C=0 write to a guest-owned page (policy kill).
    SharedWriteToPrivate { gpa: u64 },
    /// PVALIDATE of a hypervisor-owned page (policy kill).
    PvalidateOfShared { gpa: u64 },
    /// An access outside guest memory.
    OutsideMemory { gpa: u64 },
}

impl fmt::Display for SnpKill {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            SnpKill::PrivateAccessToShared { gpa } => write!(
                f,
                "C=1 access to hypervisor-owned page {gpa:#x} (RMP violation, policy kill)"
            ),
            SnpKill::SharedWriteToPrivate { gpa } => write!(
                f,
                "C=0 write to guest-owned page {gpa:#x} (RMP violation, policy kill)"
            ),
            SnpKill::PvalidateOfShared { gpa } => write!(
                f,
                "PVALIDATE of hypervisor-owned page {gpa:#x}: page state change not done first \
                 (policy kill)"
            ),
            SnpKill::OutsideMemory { gpa } => write!(f, "access to {gpa:#x}, outside guest memory"),
        }
    }
}

/// #VC error code of a C=1 access to an assigned, unvalidated page.
pub const VC_PAGE_NOT_VALIDATED: u64 = 0x404;

/// PVALIDATE return codes.
pub mod pvalidate_rc {
    pub const SUCCESS: u32 = 0;
    pub const FAIL_INPUT: u32 = 1;
    pub const FAIL_SIZEMISMATCH: u32 = 6;
}

/// What PVALIDATE leaves: EAX and CF, or the guest stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PvalidateEffect {
    /// Resume after the instruction with EAX = `rc`, CF = `unchanged`.
    Done { rc: u32, unchanged: bool },
    /// The page was shared and the hypervisor converted it (policy
    /// convert): re-execute.
    Retry,
    /// Stop the guest.
    Kill(SnpKill),
}

/// RMPADJUST return codes beyond PVALIDATE's.
pub mod rmpadjust_rc {
    pub const FAIL_PERMISSION: u32 = 2;
}

/// The GHCB MSR protocol's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsrAnswer {
    /// Put this in the GHCB MSR and resume.
    Response(u64),
    /// The guest asked to terminate (reason set, reason code).
    Terminate { set: u8, code: u8 },
    /// CPUID request: the vCPU loop answers `(value << 32) | 0x005` with
    /// register `register` (0 EAX .. 3 EDX) of leaf `leaf`, sub-leaf 0.
    Cpuid { leaf: u32, register: u8 },
}

/// SW_EXITINFO2 errors of a GHCB-page PSC (KVM `VMGEXIT_PSC_ERROR_*`).
pub mod psc_error {
    pub const GENERIC: u64 = 0x100 << 32;
    pub const INVALID_HDR: u64 = (1 << 32) | 1;
    pub const INVALID_ENTRY: u64 = (1 << 32) | 2;
}

/// Pages whose change has begun (held, old alias unmapped), waiting for
/// the one flush that completes them all.
struct ChangeBatch {
    pages: [(u64, RmpState); 512],
    len: usize,
}

impl ChangeBatch {
    fn new() -> Self {
        ChangeBatch {
            pages: [(0, RmpState::Shared); 512],
            len: 0,
        }
    }
}

/// The most entries a PSC descriptor in the GHCB's shared buffer holds.
pub const PSC_MAX_ENTRIES: usize = 253;

/// Shared by all vCPUs.
pub struct SnpModel<'a> {
    states: &'a [AtomicU8],
    options: SnpOptions,
    /// What happened so far (the `SNPEMU` line).
    pub counters: &'a SnpCounters,
}

impl<'a> SnpModel<'a> {
    /// Guest memory is `states.len()` pages from GPA 0, every page shared
    /// until [`SnpModel::initialise`] says otherwise.
    pub fn new(states: &'a [AtomicU8], options: SnpOptions, counters: &'a SnpCounters) -> Self {
        SnpModel {
            states,
            options,
            counters,
        }
    }

    /// The options.
    pub fn options(&self) -> SnpOptions {
        self.options
    }

    /// The C-bit as a GPA bit.
    pub fn c_bit(&self) -> u64 {
        1 << self.options.c_bit
    }

    fn slot(&self, gpa: u64) -> Option<&AtomicU8> {
        usize::try_from(gpa / PAGE)
            .ok()
            .and_then(|i| self.states.get(i))
    }

    /// The RMP state of the page holding `gpa` (no C-bit).
    pub fn state(&self, gpa: u64) -> Option<RmpState> {
        self.slot(gpa)
            .map(|s| RmpState::from_byte(s.load(Ordering::SeqCst)))
    }

    /// Sets `[start, end)` to `state` at launch (the image validated, the
    /// rest unvalidated in strict mode, shared otherwise).
    pub fn initialise(&self, start: u64, end: u64, state: RmpState, backing: &impl SnpBacking) {
        let mut gpa = start & !(PAGE - 1);
        while gpa < end {
            if let Some(slot) = self.slot(gpa) {
                page_slots::hold(slot);
                backing.set_mapping(gpa, state);
                page_slots::release(slot, state as u8);
            }
            gpa += PAGE;
        }
    }

    /// CPUID 0x8000_001F (EAX, EBX, ECX, EDX): SME, SEV, SEV-ES, SNP
    /// (bits 0, 1, 3, 4); the C-bit in EBX[5:0], one bit of physical
    /// address reduction in EBX[11:6].
    pub fn cpuid_memory_encryption(&self) -> [u32; 4] {
        [0b1_1011, u32::from(self.options.c_bit) | (1 << 6), 0, 0]
    }

    /// SEV_STATUS (MSR 0xC001_0131): SEV, SEV-ES, SNP.
    pub const SEV_STATUS: u64 = 0b111;

    /// One GHCB MSR protocol request (the value the guest wrote to MSR
    /// 0xC001_0130 before VMGEXIT).
    pub fn msr_protocol(&self, request: u64, backing: &impl SnpBacking) -> MsrAnswer {
        Counters::bump(&self.counters.msr_requests);
        let data = request >> 12;
        let answer = |code: u64, value: u64| MsrAnswer::Response((value << 12) | code);
        match request & 0xfff {
            // CPUID: function in 63:32, register in 31:30 (sub-leaf 0:
            // the MSR protocol has no ECX).
            0x004 => MsrAnswer::Cpuid {
                leaf: (request >> 32) as u32,
                register: ((request >> 30) & 3) as u8,
            },
            // SEV information: protocol 1..=2, the C-bit.
            0x002 => MsrAnswer::Response(
                (2 << 48) | (1 << 32) | (u64::from(self.options.c_bit) << 24) | 0x001,
            ),
            // Hypervisor features: SNP and AP creation.
            0x080 => answer(0x081, 0b11),
            // GHCB registration: echo the GFN if the page is shared, else a
            // GFN of all ones. KVM echoes any GFN; refusing a page the
            // hypervisor cannot read is this emulator's policy, so a guest
            // that offers a private page hears of it at once.
            0x012 => {
                let gfn = data & ((1 << 40) - 1);
                if self.state(gfn * PAGE) == Some(RmpState::Shared) {
                    answer(0x013, gfn)
                } else {
                    answer(0x013, (1 << 40) - 1)
                }
            }
            // One-page PSC: op in 55:52, GFN in 51:12; errors in 63:32.
            0x014 => {
                Counters::bump(&self.counters.msr_psc);
                let gfn = data & ((1 << 40) - 1);
                let op = (request >> 52) & 0xf;
                let ok = (op == 1 || op == 2) && self.change(gfn * PAGE, op == 2, backing);
                MsrAnswer::Response(if ok { 0x015 } else { (1 << 63) | 0x015 })
            }
            0x100 => MsrAnswer::Terminate {
                set: ((request >> 12) & 0xf) as u8,
                code: ((request >> 16) & 0xff) as u8,
            },
            // Unknown requests: KVM leaves the GHCB MSR as it is
            // (`sev_handle_vmgexit_msr_protocol`, "keep GHCB MSR value
            // as-is"): the guest reads its own request back, which no
            // response code matches.
            _ => MsrAnswer::Response(request),
        }
    }

    /// The page state change of one page: to shared or assigned
    /// (unvalidated; RMPUPDATE clears Validated). False outside memory.
    fn change(&self, gpa: u64, to_shared: bool, backing: &impl SnpBacking) -> bool {
        let mut batch = ChangeBatch::new();
        let done = self.begin_change(gpa, to_shared, backing, &mut batch);
        self.finish_changes(&mut batch, backing);
        done
    }

    /// Starts the change of the page at `gpa`: holds it and, if its state
    /// changes, unmaps its old alias and adds it to `batch`, whose pages
    /// get their new state in [`SnpModel::finish_changes`] after one
    /// nested-TLB flush for all of them (a PSC of many pages is one flush,
    /// not one per page). Never waits while holding: a page held elsewhere
    /// finishes the batch first. False outside memory.
    fn begin_change(
        &self,
        gpa: u64,
        to_shared: bool,
        backing: &impl SnpBacking,
        batch: &mut ChangeBatch,
    ) -> bool {
        let Some(slot) = self.slot(gpa) else {
            return false;
        };
        let byte = match page_slots::try_hold(slot) {
            Some(byte) => byte,
            None => {
                self.finish_changes(batch, backing);
                page_slots::hold(slot)
            }
        };
        let before = RmpState::from_byte(byte);
        let after = match (to_shared, before) {
            (true, _) => RmpState::Shared,
            // Already assigned: KVM leaves it (and its Validated bit).
            (false, RmpState::Shared) => RmpState::Unvalidated,
            (false, assigned) => assigned,
        };
        if after == before {
            page_slots::release_unchanged(slot);
            return true;
        }
        // The old alias goes before the page changes hands.
        backing.set_mapping(gpa, RmpState::Unvalidated);
        batch.pages[batch.len] = (gpa, after);
        batch.len += 1;
        if batch.len == batch.pages.len() {
            self.finish_changes(batch, backing);
        }
        true
    }

    /// Completes the batch: one flush, then each page zeroed (a page
    /// changing hands gets fresh contents), mapped in its new state and
    /// released.
    fn finish_changes(&self, batch: &mut ChangeBatch, backing: &impl SnpBacking) {
        if batch.len == 0 {
            return;
        }
        backing.flush_nested_tlbs();
        for &(gpa, after) in &batch.pages[..batch.len] {
            backing.zero_page(gpa);
            backing.set_mapping(gpa, after);
            if let Some(slot) = self.slot(gpa) {
                page_slots::release(slot, after as u8);
            }
            let counter = if after == RmpState::Shared {
                &self.counters.pages_to_shared
            } else {
                &self.counters.pages_to_private
            };
            Counters::bump(counter);
        }
        batch.len = 0;
    }

    /// A GHCB-page PSC: `buffer` is the GHCB's shared buffer (header: u16
    /// cur_entry, u16 end_entry, u32 reserved; then u64 entries: 11:0 pages
    /// done, 51:12 GFN, 55:52 operation, 56 2M), processed from cur_entry
    /// and updated in place. Returns SW_EXITINFO2.
    pub fn ghcb_psc(&self, buffer: &mut [u8], backing: &impl SnpBacking) -> u64 {
        Counters::bump(&self.counters.ghcb_psc_calls);
        if buffer.len() < 8 + 8 * PSC_MAX_ENTRIES {
            return psc_error::GENERIC;
        }
        let read16 = |b: &[u8], at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
        let mut cur = read16(buffer, 0) as usize;
        let end = read16(buffer, 2) as usize;
        if end >= PSC_MAX_ENTRIES || cur > end + 1 {
            return psc_error::INVALID_HDR;
        }
        let entry_at = |i: usize| 8 + 8 * i;
        let mut budget = match self.options.psc_pages_per_call {
            0 => u64::MAX,
            n => n,
        };
        let mut status = 0;
        let mut batch = ChangeBatch::new();
        'entries: while cur <= end && budget > 0 {
            let at = entry_at(cur);
            let mut raw = [0u8; 8];
            raw.copy_from_slice(&buffer[at..at + 8]);
            let entry = u64::from_le_bytes(raw);
            let (done, gfn, op, huge) = (
                entry & 0xfff,
                (entry >> 12) & ((1 << 40) - 1),
                (entry >> 52) & 0xf,
                entry & (1 << 56) != 0,
            );
            let pages = if huge { 512 } else { 1 };
            if !(op == 1 || op == 2) || done > pages || (huge && gfn % 512 != 0) {
                status = psc_error::INVALID_ENTRY;
                break;
            }
            let mut now = done;
            while now < pages && budget > 0 {
                if !self.options.psc_lie
                    && !self.begin_change((gfn + now) * PAGE, op == 2, backing, &mut batch)
                {
                    status = psc_error::GENERIC;
                }
                if status == 0 {
                    now += 1;
                    budget -= 1;
                }
                // Progress so far is written back either way.
                buffer[at..at + 8].copy_from_slice(&((entry & !0xfff) | now).to_le_bytes());
                if status != 0 {
                    break 'entries;
                }
            }
            if now == pages {
                cur += 1;
            }
        }
        self.finish_changes(&mut batch, backing);
        buffer[0..2].copy_from_slice(&(cur as u16).to_le_bytes());
        status
    }

    /// PVALIDATE of the page at `gpa` (no C-bit; the vCPU loop translated
    /// the guest's RAX through a present C=1 mapping), `size_2m` for ECX=1.
    /// A 2M PVALIDATE needs a 2M RMP entry: the model has one where the
    /// whole aligned block is assigned and in one validated state (as a
    /// hypervisor backing the block with a 2M page gives), else
    /// FAIL_SIZEMISMATCH and the guest retries at 4K; `pvalidate-2m-refused`
    /// makes every 2M request a mismatch.
    pub fn pvalidate(
        &self,
        gpa: u64,
        size_2m: bool,
        validate: bool,
        backing: &impl SnpBacking,
    ) -> PvalidateEffect {
        let done = |rc, unchanged| PvalidateEffect::Done { rc, unchanged };
        let align = if size_2m { PAGES_2M * PAGE } else { PAGE };
        if !gpa.is_multiple_of(align) {
            return done(pvalidate_rc::FAIL_INPUT, false);
        }
        let pages = if size_2m { PAGES_2M } else { 1 };
        let Some(slots) = usize::try_from(gpa / PAGE)
            .ok()
            .and_then(|first| self.states.get(first..first + pages as usize))
        else {
            return PvalidateEffect::Kill(SnpKill::OutsideMemory { gpa });
        };
        // Hold the whole block (in order: no two holders deadlock).
        let first = RmpState::from_byte(page_slots::hold(&slots[0]));
        let mut uniform = true;
        for slot in &slots[1..] {
            uniform &= RmpState::from_byte(page_slots::hold(slot)) == first;
        }
        let release_all = || slots.iter().for_each(page_slots::release_unchanged);
        if first == RmpState::Shared && !size_2m {
            release_all();
            // Not assigned to the guest: a nested fault to the hypervisor.
            Counters::bump(&self.counters.rmp_violations);
            if self.options.psc_lie {
                // The hypervisor that lied about the PSC does not fix the
                // fault either: on hardware the PVALIDATE makes no progress
                // (it faults again and again); the model ends it with
                // FAIL_INPUT instead, so the run does not hang.
                return done(pvalidate_rc::FAIL_INPUT, false);
            }
            return match self.options.policy {
                RmpPolicy::Kill => PvalidateEffect::Kill(SnpKill::PvalidateOfShared { gpa }),
                RmpPolicy::Convert => {
                    // KVM: a private access to a shared-attribute page;
                    // QEMU converts it, the PVALIDATE is re-executed.
                    self.change(gpa, false, backing);
                    Counters::bump(&self.counters.implicit_conversions);
                    PvalidateEffect::Retry
                }
            };
        }
        if size_2m && (!uniform || first == RmpState::Shared || self.options.refuse_2m_pvalidate) {
            release_all();
            Counters::bump(&self.counters.pvalidate_size_mismatch);
            return done(pvalidate_rc::FAIL_SIZEMISMATCH, false);
        }
        let before = first;
        let after = if validate {
            RmpState::Validated
        } else {
            RmpState::Unvalidated
        };
        if before == after {
            release_all();
            Counters::bump(&self.counters.pvalidate_unchanged);
            return done(pvalidate_rc::SUCCESS, true);
        }
        for page in 0..pages {
            backing.set_mapping(gpa + page * PAGE, after);
        }
        if !validate {
            // Rescinded: the C=1 alias goes, on every vCPU, before the
            // guest can count on it.
            backing.flush_nested_tlbs();
        }
        slots
            .iter()
            .for_each(|slot| page_slots::release(slot, after as u8));
        Counters::bump(&self.counters.pvalidated[usize::from(size_2m)]);
        done(pvalidate_rc::SUCCESS, false)
    }

    /// RMPADJUST of the page at `gpa` (no C-bit) from VMPL0 with RDX =
    /// `attributes` (7:0 target VMPL, 15:8 permissions, 16 VMSA): the
    /// target must be a lower-privilege VMPL (1..=3) and the page
    /// validated; only the VMSA bit is modelled. Returns EAX (0 success, 1
    /// FAIL_INPUT, 2 FAIL_PERMISSION, 6 FAIL_SIZEMISMATCH for 2M).
    pub fn rmpadjust(&self, gpa: u64, size_2m: bool, attributes: u64) -> u32 {
        let target_vmpl = attributes & 0xff;
        if !gpa.is_multiple_of(PAGE) || attributes >> 17 != 0 {
            return pvalidate_rc::FAIL_INPUT;
        }
        if size_2m {
            return pvalidate_rc::FAIL_SIZEMISMATCH;
        }
        if !(1..=3).contains(&target_vmpl) {
            return rmpadjust_rc::FAIL_PERMISSION;
        }
        let Some(slot) = self.slot(gpa) else {
            return pvalidate_rc::FAIL_INPUT;
        };
        let byte = page_slots::hold(slot);
        if RmpState::from_byte(byte) != RmpState::Validated {
            page_slots::release_unchanged(slot);
            return rmpadjust_rc::FAIL_PERMISSION;
        }
        let vmsa = if attributes & (1 << 16) != 0 { VMSA } else { 0 };
        page_slots::release(slot, (byte & !VMSA) | vmsa);
        Counters::bump(&self.counters.rmpadjust);
        pvalidate_rc::SUCCESS
    }

    /// Whether the page at `gpa` is validated and marked as a VMSA (what AP
    /// creation requires of the page it is given).
    pub fn is_vmsa(&self, gpa: u64) -> bool {
        self.slot(gpa).is_some_and(|slot| {
            let byte = slot.load(Ordering::SeqCst);
            byte & VMSA != 0 && RmpState::from_byte(byte) == RmpState::Validated
        })
    }

    /// A nested fault at `gpa` (C-bit included as the guest put it on the
    /// bus): Table 15-39's checks in order.
    pub fn nested_fault(&self, gpa: u64, write: bool, backing: &impl SnpBacking) -> SnpFault {
        let private = gpa & self.c_bit() != 0;
        let page = gpa & !self.c_bit() & !(PAGE - 1);
        let Some(slot) = self.slot(page) else {
            return SnpFault::Kill(SnpKill::OutsideMemory { gpa });
        };
        let byte = slot.load(Ordering::SeqCst);
        let state = RmpState::from_byte(byte);
        if byte & BUSY != 0
            || (private && state == RmpState::Validated)
            || (!private && state == RmpState::Shared)
            || (!private && !write)
        {
            // Changing, or mapped by now (C=0 reads of a private page go to
            // the ciphertext frame, mapped read-only).
            return SnpFault::Retry;
        }
        if private && state == RmpState::Unvalidated {
            // The validated check fails: #VC in the guest.
            Counters::bump(&self.counters.vc_page_not_validated);
            return SnpFault::Vc {
                error_code: VC_PAGE_NOT_VALIDATED,
            };
        }
        // A C=1 access to a shared page, or a C=0 write to a private one:
        // the RMP check faults to the hypervisor.
        Counters::bump(&self.counters.rmp_violations);
        match self.options.policy {
            RmpPolicy::Kill if private => SnpFault::Kill(SnpKill::PrivateAccessToShared { gpa }),
            RmpPolicy::Kill => SnpFault::Kill(SnpKill::SharedWriteToPrivate { gpa }),
            RmpPolicy::Convert => {
                // KVM_EXIT_MEMORY_FAULT -> QEMU converts the page to the
                // access's state: private becomes assigned and unvalidated
                // (the retry is #VC 0x404), a private page's contents go.
                self.change(page, !private, backing);
                Counters::bump(&self.counters.implicit_conversions);
                SnpFault::Retry
            }
        }
    }
}

#[cfg(test)]
#[path = "snp_model_tests.rs"]
mod tests;
