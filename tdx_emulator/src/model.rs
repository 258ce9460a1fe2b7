//! The TDX module and a KVM + QEMU-like VMM, as the TD sees them: per-4K page
//! states, what each TDCALL and TDVMCALL does, what the VMM answers when the
//! guest touches a page through the alias that does not match its state, and
//! the counters.
//!
//! Sources named in comments:
//! - "module `file.c`": Intel's tdx-module sources, TDX 1.5.01
//!   (github.com/intel/tdx-module, branch tdx_1.5), `src/td_dispatcher/...`,
//!   `src/common/...`, `include/...`.
//! - "KVM tdx.c": Linux `arch/x86/kvm/vmx/tdx.c` as merged in 6.16.
//! - "QEMU": `target/i386/kvm/tdx.c` and `accel/kvm/kvm-all.c`
//!   (`kvm_convert_memory`).
//! - "Linux tdx.c": the guest, `arch/x86/coco/tdx/tdx.c` (6.12 / 6.12.y).
//!
//! Instruction virtualization (CPUID, MSRs, port IO, HLT) is not decided
//! here and does not depend on any option: the vCPU loop owns it.
//!
//! Concurrency: every vCPU calls into one `TdModel`. A page's state byte
//! carries a busy bit; whoever changes a page (a TDCALL, a VMM action) holds
//! it, and the page's nested mappings only change while it is held, so a
//! page's state and its mappings change together for every vCPU. A reader that
//! finds a page busy re-executes the access.

use crate::page_slots::{self, BUSY};
use core::fmt;
use core::sync::atomic::{AtomicU64, AtomicU8, Ordering};
pub use tdx_hypercall::ve::exit_reason;
pub use tdx_hypercall::VeInfo;
use tdx_hypercall::{leaf, subfn, TdcallRegs};

/// TDX module completion statuses (RAX), from module
/// `include/auto_gen/tdx_error_codes_defs.h`. The low 32 bits carry an operand
/// ID (`api_error_with_operand_id()` adds it).
pub mod status {
    pub const TDX_SUCCESS: u64 = 0;
    pub const TDX_OPERAND_INVALID: u64 = 0xC000_0100_0000_0000;
    pub const TDX_OPERAND_BUSY: u64 = 0x8000_0200_0000_0000;
    pub const TDX_NO_VALID_VE_INFO: u64 = 0xC000_0704_0000_0000;
    pub const TDX_PAGE_ALREADY_ACCEPTED: u64 = 0x0000_0B0A_0000_0000;
    pub const TDX_PAGE_SIZE_MISMATCH: u64 = 0xC000_0B0B_0000_0000;
    pub const TDX_METADATA_FIELD_ID_INCORRECT: u64 = 0xC000_0C00_0000_0000;
    pub const TDX_METADATA_FIELD_NOT_WRITABLE: u64 = 0xC000_0C01_0000_0000;
    pub const TDX_METADATA_FIELD_NOT_READABLE: u64 = 0xC000_0C02_0000_0000;
    pub const TDX_METADATA_FIELD_VALUE_NOT_VALID: u64 = 0xC000_0C03_0000_0000;
    /// Operand IDs (same header).
    pub const OPERAND_ID_RAX: u64 = 0;
    pub const OPERAND_ID_RCX: u64 = 1;
    pub const OPERAND_ID_METADATA_FIELD: u64 = 176;
}

/// TDVMCALL statuses (R10), GHCI; the values as in Linux
/// `arch/x86/include/asm/shared/tdx.h`.
pub mod vmcall_status {
    pub const SUCCESS: u64 = 0;
    pub const RETRY: u64 = 1;
    pub const INVALID_OPERAND: u64 = 0x8000_0000_0000_0000;
    pub const ALIGN_ERROR: u64 = 0x8000_0000_0000_0002;
    pub const SUBFUNC_UNSUPPORTED: u64 = 0x8000_0000_0000_0003;
}

/// TD ATTRIBUTES bits (TDX module ABI; Linux tdx.c `ATTR_DEBUG`,
/// `ATTR_SEPT_VE_DISABLE`).
pub mod attributes {
    pub const DEBUG: u64 = 1 << 0;
    pub const SEPT_VE_DISABLE: u64 = 1 << 28;
}

/// TDCS CONFIG_FLAGS bits (module `include/tdx_api_defs.h`, `config_flags_t`).
pub mod config_flags {
    /// The shared bit is GPA[51] (GPAW 52) rather than GPA[47].
    pub const GPAW: u64 = 1 << 0;
    /// The TD may change TD_CTLS.PENDING_VE_DISABLE.
    pub const FLEXIBLE_PENDING_VE: u64 = 1 << 1;
    /// TDG.VP.VMCALL and TDH.VP.ENTER preserve RBP.
    pub const NO_RBP_MOD: u64 = 1 << 2;
}

/// TDCS metadata field IDs the TD may read or write (module
/// `include/auto_gen/tdr_tdcs_fields_lookup.c`; Linux 6.12.y tdx.c uses the
/// last three).
pub mod field {
    pub const NUM_VCPUS: u64 = 0x9010_0002_0000_0001;
    pub const ATTRIBUTES: u64 = 0x1110_0003_0000_0000;
    pub const MAX_VCPUS: u64 = 0x1110_0002_0000_0002;
    pub const GPAW: u64 = 0x1110_0000_0000_0003;
    /// As the module's table spells it; Linux passes 0x9100000000000010,
    /// which names the same field (the lookup compares class and field code
    /// only: module `metadata_generic.c` `md_find_entry_idx()`).
    pub const NOTIFY_ENABLES: u64 = 0x9110_0003_0000_0010;
    pub const CONFIG_FLAGS: u64 = 0x1110_0003_0000_0016;
    pub const TD_CTLS: u64 = 0x1110_0003_0000_0017;
}

/// TDCALL leaves the model answers (module `include/tdx_api_defs.h`).
const TDG_VM_RD: u64 = 7;
const TDG_VM_WR: u64 = 8;

/// `-KVM_ENOSYS`, what KVM's `__kvm_emulate_hypercall()` answers an unknown
/// hypercall; KVM tdx.c `tdx_emulate_vmcall()` puts it in R10.
const KVM_ENOSYS: u64 = (-1000i64) as u64;

const PAGE: u64 = 4096;
const PAGE_2M: u64 = 2 << 20;
const STATE_MASK: u8 = 0x03;

/// State of one 4K page of TD memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum PageState {
    /// Private and accepted: reachable through the private alias only.
    Private = 0,
    /// Private, not accepted yet (after MapGPA to private, an implicit
    /// conversion to private, or pending boot RAM): reachable through
    /// neither alias.
    Pending = 1,
    /// Shared: reachable through the shared alias only.
    Shared = 2,
}

impl PageState {
    fn from_byte(byte: u8) -> PageState {
        match byte & STATE_MASK {
            1 => PageState::Pending,
            2 => PageState::Shared,
            _ => PageState::Private,
        }
    }
}

/// What the model needs from the machine: the nested page tables and the
/// TD's memory. The emulator implements it over SVM nested paging; tests
/// implement it over arrays. Called from every vCPU, hence `Sync`; the model
/// only calls `set_mapping` and `zero_page` for a page it holds, so calls for
/// one page never overlap.
pub trait Backing: Sync {
    /// Makes the nested tables match `state` for the page at `gpa` (no shared
    /// bit): the private alias present only for `Private`, the shared alias
    /// (GPA | shared bit) only for `Shared`, neither for `Pending`. So
    /// `set_mapping(gpa, Pending)` is "unmap".
    fn set_mapping(&self, gpa: u64, state: PageState);
    /// Zeroes the page at `gpa`; only called while no alias of it is mapped.
    fn zero_page(&self, gpa: u64);
    /// Every vCPU must drop cached nested translations before it next runs
    /// guest code, and this returns when no vCPU can still use a stale one.
    /// The model may call it while it holds pages, so it must not wait for a
    /// vCPU that is not in guest mode (such a vCPU may be waiting for one of
    /// those pages).
    fn flush_nested_tlbs(&self);
}

/// The VMM's answer to a wrong-state access that the TDX module reports to
/// it (issue 7; DESIGN.md section 4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum WrongStatePolicy {
    /// Shared-GPA access to a private page: reflect it as an EPT-violation
    /// #VE, as Linux's TDX comments assume a VMM does (a shared-EPT entry
    /// with SUPPRESS_VE clear). Private-GPA accesses behave as `Convert`:
    /// with SEPT_VE_DISABLE the module never raises a #VE for them.
    Ve,
    /// Convert the page implicitly to the state of the alias used, as KVM
    /// (KVM_EXIT_MEMORY_FAULT) + QEMU (`kvm_convert_memory`) do today.
    #[default]
    Convert,
    /// Shut the TD down.
    Shutdown,
}

impl WrongStatePolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            WrongStatePolicy::Ve => "ve",
            WrongStatePolicy::Convert => "convert",
            WrongStatePolicy::Shutdown => "shutdown",
        }
    }
}

/// Behaviour switches, from the emulator's command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    /// RAM outside the launch image starts pending (`strict`), rather than
    /// accepted by firmware (`accepted`, the default: Linux without an EFI
    /// unaccepted-memory table needs all RAM accepted).
    pub pending_ram: bool,
    /// What the VMM does with a wrong-state access (`wrong-state=`).
    pub wrong_state: WrongStatePolicy,
    /// MapGPA converts one page per call and answers RETRY (as the public
    /// QEMU TDX model does), so the guest's resume logic is exercised.
    pub map_gpa_retry_every_page: bool,
    /// ACCEPT at 2M answers PAGE_SIZE_MISMATCH, as under KVM, which maps
    /// private memory at 4K only (KVM tdx.c `tdx_sept_set_private_spte()`).
    pub refuse_large_accept: bool,
    /// TD memory in MiB (`memory=`).
    pub memory_mib: u32,
    /// Fault injection (`inject-double-ve=<N>`): the Nth #VE of the run
    /// arrives as if a second #VE had come before the guest's VEINFO.GET,
    /// i.e. as #DF with the #VE info latched (0: never). Tests a guest's #DF
    /// path in a TD, which must read the info before it does port IO.
    pub double_ve_at: u64,
    /// A hostile VMM (`mapgpa-fail-after=<k>`, 0: off): the first MapGPA of
    /// more than k pages converts its first k, then answers INVALID_OPERAND
    /// with no resume point, so the guest cannot know how far it got. The
    /// whole range is then the guest's quarantine: its aliases stay unmapped
    /// and every later access to it (a fault, a MapGPA or an ACCEPT naming
    /// it) is counted (`quarantine_accesses`) and, as a fault, stops the TD.
    pub map_gpa_fail_after: u64,
    /// A hostile VMM (`mapgpa-bad-retry=outside|unaligned|stuck`): the
    /// first MapGPA of more than one page answers RETRY with R11 past the
    /// range, or not page-aligned (after converting the first page), or at
    /// the start again, every time (converting nothing). The range is then
    /// the guest's quarantine, as with `map_gpa_fail_after`.
    pub map_gpa_bad_retry: Option<BadRetry>,
    /// A hostile VMM (`accept-fail=mismatch|error|busy`): after the first
    /// MapGPA to private of more than 3 pages, the ACCEPT of its 4th page
    /// answers PAGE_SIZE_MISMATCH (at 4K, where no smaller size exists),
    /// OPERAND_INVALID, or OPERAND_BUSY every time: the VMM mapped it
    /// wrong, or holds it forever. From that page to the run's end is the
    /// guest's quarantine, as with `map_gpa_fail_after`.
    pub accept_fail: Option<AcceptFail>,
    /// TD ATTRIBUTES without SEPT_VE_DISABLE (`sept-ve`): TDG.VP.INFO and
    /// TDG.VM.RD report bit 28 clear, TD_CTLS.PENDING_VE_DISABLE starts
    /// clear, and a private access to a pending page raises an
    /// EPT-violation #VE instead of exiting to the VMM (module
    /// `td_ept_violation.c`). Linux refuses to run so unless DEBUG is set.
    pub sept_ve: bool,
    /// A hostile VMM (`implicit-convert`): after the first MapGPA to
    /// private of more than 3 pages, once the guest has accepted the run's
    /// last page, the VMM converts the run's 4th page on its own, behind
    /// the guest's back (TDH.MEM.PAGE.REMOVE then AUG, as KVM does when
    /// QEMU flips a page's attributes twice): pending, contents gone. The
    /// guest's next private access to it is its only news of that: with
    /// `sept-ve` an EPT-violation #VE, else KVM kills the TD. From that
    /// access on the page is the guest's quarantine, as with
    /// `map_gpa_fail_after`.
    pub implicit_convert: bool,
}

/// How a hostile ACCEPT fails (`accept-fail=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcceptFail {
    /// TDX_PAGE_SIZE_MISMATCH at the 4K level.
    Mismatch,
    /// TDX_OPERAND_INVALID.
    Error,
    /// TDX_OPERAND_BUSY, on every retry.
    Busy,
}

impl AcceptFail {
    fn as_str(self) -> &'static str {
        match self {
            AcceptFail::Mismatch => "mismatch",
            AcceptFail::Error => "error",
            AcceptFail::Busy => "busy",
        }
    }
}

/// What a hostile MapGPA's RETRY names (`mapgpa-bad-retry=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadRetry {
    /// R11 = the end of the range: outside `[start, end)`.
    Outside,
    /// R11 = 8 bytes past the first page.
    Unaligned,
    /// R11 = the start, no progress, on every call.
    Stuck,
}

impl BadRetry {
    fn as_str(self) -> &'static str {
        match self {
            BadRetry::Outside => "outside",
            BadRetry::Unaligned => "unaligned",
            BadRetry::Stuck => "stuck",
        }
    }
}

/// How many times a stuck hostile MapGPA answers the guest's retries of the
/// same range before they count as accesses to the quarantine.
const STUCK_ANSWERS: u64 = 64;

/// No page (`TdModel::taken` before a hostile VMM took one).
const NO_PAGE: u64 = u64::MAX;

impl Default for Options {
    fn default() -> Self {
        Options {
            pending_ram: false,
            wrong_state: WrongStatePolicy::Convert,
            map_gpa_retry_every_page: false,
            refuse_large_accept: false,
            memory_mib: 1024,
            double_ve_at: 0,
            map_gpa_fail_after: 0,
            map_gpa_bad_retry: None,
            accept_fail: None,
            sept_ve: false,
            implicit_convert: false,
        }
    }
}

/// Why an emulator option word was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptionErrorKind {
    Unknown,
    /// `memory=` without a decimal number.
    MemoryNotANumber,
    /// `memory=` outside [`Options::MEMORY_MIB_MIN`]..=[`Options::MEMORY_MIB_MAX`].
    MemoryOutOfRange,
    /// `wrong-state=` with something else than ve, convert or shutdown.
    WrongStatePolicy,
    /// `inject-double-ve=` without a number from 1 on.
    DoubleVeNotANumber,
    /// `mapgpa-fail-after=` without a page count from 1 on.
    MapGpaFailNotANumber,
    /// `mapgpa-bad-retry=` with something else than outside, unaligned or stuck.
    BadRetry,
    /// `accept-fail=` with something else than mismatch, error or busy.
    AcceptFail,
}

/// A refused option word; `Display` gives one line naming it and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionError<'w> {
    pub word: &'w str,
    pub kind: OptionErrorKind,
}

impl fmt::Display for OptionError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "emulator option \"{}\": ", self.word)?;
        match self.kind {
            OptionErrorKind::Unknown => write!(
                f,
                "unknown (known: strict, accepted, memory=<MiB>, wrong-state=ve|convert|shutdown, \
                 mapgpa-retry-every-page, refuse-large-accept, inject-double-ve=<N>, \
                 mapgpa-fail-after=<pages>, mapgpa-bad-retry=outside|unaligned|stuck, \
                 accept-fail=mismatch|error|busy, sept-ve, implicit-convert)"
            ),
            OptionErrorKind::MemoryNotANumber => {
                write!(f, "memory= needs a size in MiB, a decimal number")
            }
            OptionErrorKind::MemoryOutOfRange => write!(
                f,
                "TD memory must be {}..={} MiB",
                Options::MEMORY_MIB_MIN,
                Options::MEMORY_MIB_MAX
            ),
            OptionErrorKind::WrongStatePolicy => {
                write!(f, "wrong-state= takes ve, convert or shutdown")
            }
            OptionErrorKind::DoubleVeNotANumber => {
                write!(f, "inject-double-ve= needs which #VE, a number from 1 on")
            }
            OptionErrorKind::MapGpaFailNotANumber => {
                write!(
                    f,
                    "mapgpa-fail-after= needs a page count, a number from 1 on"
                )
            }
            OptionErrorKind::BadRetry => {
                write!(f, "mapgpa-bad-retry= takes outside, unaligned or stuck")
            }
            OptionErrorKind::AcceptFail => {
                write!(f, "accept-fail= takes mismatch, error or busy")
            }
        }
    }
}

impl core::error::Error for OptionError<'_> {}

impl Options {
    pub const MEMORY_MIB_MIN: u32 = 256;
    pub const MEMORY_MIB_MAX: u32 = 1536;

    /// Applies one word of the emulator's command line.
    pub fn parse_word<'w>(&mut self, word: &'w str) -> Result<(), OptionError<'w>> {
        let error = |kind| Err(OptionError { word, kind });
        match word {
            "strict" => self.pending_ram = true,
            "accepted" => self.pending_ram = false,
            "mapgpa-retry-every-page" => self.map_gpa_retry_every_page = true,
            "refuse-large-accept" => self.refuse_large_accept = true,
            "sept-ve" => self.sept_ve = true,
            "implicit-convert" => self.implicit_convert = true,
            _ => {
                if let Some(mib) = word.strip_prefix("memory=") {
                    let Ok(mib) = mib.parse::<u32>() else {
                        return error(OptionErrorKind::MemoryNotANumber);
                    };
                    if !(Self::MEMORY_MIB_MIN..=Self::MEMORY_MIB_MAX).contains(&mib) {
                        return error(OptionErrorKind::MemoryOutOfRange);
                    }
                    self.memory_mib = mib;
                } else if let Some(kind) = word.strip_prefix("accept-fail=") {
                    self.accept_fail = Some(match kind {
                        "mismatch" => AcceptFail::Mismatch,
                        "error" => AcceptFail::Error,
                        "busy" => AcceptFail::Busy,
                        _ => return error(OptionErrorKind::AcceptFail),
                    });
                } else if let Some(kind) = word.strip_prefix("mapgpa-bad-retry=") {
                    self.map_gpa_bad_retry = Some(match kind {
                        "outside" => BadRetry::Outside,
                        "unaligned" => BadRetry::Unaligned,
                        "stuck" => BadRetry::Stuck,
                        _ => return error(OptionErrorKind::BadRetry),
                    });
                } else if let Some(n) = word.strip_prefix("mapgpa-fail-after=") {
                    match count_from_one(n) {
                        Some(n) => self.map_gpa_fail_after = n,
                        None => return error(OptionErrorKind::MapGpaFailNotANumber),
                    }
                } else if let Some(n) = word.strip_prefix("inject-double-ve=") {
                    match count_from_one(n) {
                        Some(n) => self.double_ve_at = n,
                        None => return error(OptionErrorKind::DoubleVeNotANumber),
                    }
                } else if let Some(policy) = word.strip_prefix("wrong-state=") {
                    self.wrong_state = match policy {
                        "ve" => WrongStatePolicy::Ve,
                        "convert" => WrongStatePolicy::Convert,
                        "shutdown" => WrongStatePolicy::Shutdown,
                        _ => return error(OptionErrorKind::WrongStatePolicy),
                    };
                } else {
                    return error(OptionErrorKind::Unknown);
                }
            }
        }
        Ok(())
    }

    pub fn memory_bytes(&self) -> u64 {
        u64::from(self.memory_mib) << 20
    }

    /// 4K pages of TD memory: the length of the state array to give
    /// [`TdModel::new`].
    pub fn memory_pages(&self) -> usize {
        (self.memory_bytes() / PAGE) as usize
    }
}

/// An option's count: a decimal number from 1 on.
pub(crate) fn count_from_one(word: &str) -> Option<u64> {
    word.parse::<u64>().ok().filter(|n| *n >= 1)
}

/// The words that give these options, for a configuration line.
impl fmt::Display for Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} memory={} wrong-state={}",
            if self.pending_ram {
                "strict"
            } else {
                "accepted"
            },
            self.memory_mib,
            self.wrong_state.as_str()
        )?;
        if self.map_gpa_retry_every_page {
            f.write_str(" mapgpa-retry-every-page")?;
        }
        if self.refuse_large_accept {
            f.write_str(" refuse-large-accept")?;
        }
        if self.double_ve_at != 0 {
            write!(f, " inject-double-ve={}", self.double_ve_at)?;
        }
        if self.map_gpa_fail_after != 0 {
            write!(f, " mapgpa-fail-after={}", self.map_gpa_fail_after)?;
        }
        if let Some(kind) = self.map_gpa_bad_retry {
            write!(f, " mapgpa-bad-retry={}", kind.as_str())?;
        }
        if let Some(kind) = self.accept_fail {
            write!(f, " accept-fail={}", kind.as_str())?;
        }
        if self.sept_ve {
            f.write_str(" sept-ve")?;
        }
        if self.implicit_convert {
            f.write_str(" implicit-convert")?;
        }
        Ok(())
    }
}

/// Counters the harness reads at the end of a run.
pub struct Counters {
    /// #VE injected, by exit reason (index = reason, 0..64).
    pub ve_by_reason: [AtomicU64; 64],
    /// #VE escalated to #DF (a second #VE before VEINFO.GET).
    pub double_faults: AtomicU64,
    /// TDCALLs by leaf (RAX[15:0], 0..32).
    pub tdcalls_by_leaf: [AtomicU64; 32],
    /// TDCALLs answered TDX_OPERAND_INVALID because the model does not
    /// implement their leaf (or version), whether or not the module does.
    pub tdcalls_unmodelled: AtomicU64,
    /// TDVMCALLs answered SUBFUNC_UNSUPPORTED (or -KVM_ENOSYS).
    pub tdvmcalls_unsupported: AtomicU64,
    pub map_gpa_calls: AtomicU64,
    pub map_gpa_retries: AtomicU64,
    /// Pages converted by MapGPA to shared and to private.
    pub pages_to_shared: AtomicU64,
    pub pages_to_private: AtomicU64,
    /// Successful ACCEPTs at 4K, 2M, 1G (1G stays 0: the module refuses it).
    pub accepts: [AtomicU64; 3],
    pub accept_size_mismatches: AtomicU64,
    /// ACCEPTs answered TDX_OPERAND_BUSY (another vCPU held a page).
    pub accept_busy: AtomicU64,
    /// IPIs delivered between vCPUs.
    pub ipis: AtomicU64,
    /// Nested page faults taken.
    pub nested_page_faults: AtomicU64,
    /// Accesses (and ACCEPTs) through the alias that does not match the
    /// page's state, in every policy.
    pub wrong_state_accesses: AtomicU64,
    /// Accesses to the range a hostile MapGPA left unknown
    /// (`mapgpa-fail-after`): the guest must never touch it again.
    pub quarantine_accesses: AtomicU64,
    /// Pages the VMM converted on a wrong-state access.
    pub implicit_conversions: AtomicU64,
    /// Shared-GPA accesses outside TD RAM (MMIO #VE).
    pub mmio_faults: AtomicU64,
    /// Nested faults on a page that was busy, or whose alias was mapped by
    /// the time they were handled: the access is re-executed.
    pub spurious_faults: AtomicU64,
}

impl Counters {
    pub const fn new() -> Self {
        Counters {
            ve_by_reason: [const { AtomicU64::new(0) }; 64],
            double_faults: AtomicU64::new(0),
            tdcalls_by_leaf: [const { AtomicU64::new(0) }; 32],
            tdcalls_unmodelled: AtomicU64::new(0),
            tdvmcalls_unsupported: AtomicU64::new(0),
            map_gpa_calls: AtomicU64::new(0),
            map_gpa_retries: AtomicU64::new(0),
            pages_to_shared: AtomicU64::new(0),
            pages_to_private: AtomicU64::new(0),
            accepts: [const { AtomicU64::new(0) }; 3],
            accept_size_mismatches: AtomicU64::new(0),
            accept_busy: AtomicU64::new(0),
            ipis: AtomicU64::new(0),
            nested_page_faults: AtomicU64::new(0),
            wrong_state_accesses: AtomicU64::new(0),
            quarantine_accesses: AtomicU64::new(0),
            implicit_conversions: AtomicU64::new(0),
            mmio_faults: AtomicU64::new(0),
            spurious_faults: AtomicU64::new(0),
        }
    }

    /// #VEs injected with `reason`.
    pub fn ve(&self, reason: u32) -> u64 {
        self.ve_by_reason
            .get(reason as usize)
            .map_or(0, |c| c.load(Ordering::SeqCst))
    }

    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

impl Default for Counters {
    fn default() -> Self {
        Self::new()
    }
}

/// Per-vCPU TDX state.
#[derive(Debug, Default)]
pub struct VcpuState {
    /// vCPU index (TDG.VP.INFO).
    pub index: u32,
    /// #VE info latched until TDG.VP.VEINFO.GET.
    pub ve_latched: Option<VeInfo>,
}

/// How the guest accessed memory (from the nested-fault error code).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Access {
    pub write: bool,
    pub fetch: bool,
}

impl Access {
    pub const READ: Access = Access {
        write: false,
        fetch: false,
    };
    pub const WRITE: Access = Access {
        write: true,
        fetch: false,
    };
    pub const FETCH: Access = Access {
        write: false,
        fetch: true,
    };

    /// EPT-violation exit qualification (Intel SDM, "Exit Qualification for
    /// EPT Violations"): bit 0 data read, 1 data write, 2 instruction fetch;
    /// bits 5:3 (what the translation allowed) clear: not mapped.
    fn ept_qualification(self) -> u64 {
        if self.fetch {
            1 << 2
        } else if self.write {
            1 << 1
        } else {
            1 << 0
        }
    }
}

/// Why the TD is shut down; `Display` gives one line for the FATAL line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShutdownReason {
    /// A GPA with bits at or above GPAW set (no memslot can hold it).
    GpaAboveGpaw { gpa: u64 },
    /// A private-GPA access outside TD RAM (no memslot: KVM exits with an
    /// error, QEMU's `kvm_convert_memory` finds no RAM and stops the VM).
    PrivateAccessOutsideRam { gpa: u64 },
    /// A private-GPA access to a pending page: with SEPT_VE_DISABLE the module
    /// exits to KVM, which kills the TD (`tdx_is_sept_violation_unexpected_pending`).
    PrivateAccessToPending { gpa: u64 },
    /// A private-GPA access to a shared page, policy `shutdown`.
    PrivateAccessToShared { gpa: u64 },
    /// A shared-GPA access to a private or pending page, policy `shutdown`.
    SharedAccessToPrivate { gpa: u64 },
    /// ACCEPT of memory outside TD RAM (no memslot, as above).
    AcceptOutsideRam { gpa: u64 },
    /// ACCEPT of a shared page, policy `shutdown`.
    AcceptOfShared { gpa: u64 },
    /// An access to the range a hostile VMM left unknown (a failed MapGPA
    /// or ACCEPT, a page taken behind the guest's back), which the guest
    /// must never touch again.
    QuarantinedAccess { gpa: u64 },
}

impl fmt::Display for ShutdownReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ShutdownReason::GpaAboveGpaw { gpa } => {
                write!(f, "access to GPA {gpa:#x}, above the TD's GPA width")
            }
            ShutdownReason::PrivateAccessOutsideRam { gpa } => write!(
                f,
                "private-GPA access to {gpa:#x}, outside TD RAM (no memslot)"
            ),
            ShutdownReason::PrivateAccessToPending { gpa } => write!(
                f,
                "private-GPA access to {gpa:#x} before ACCEPT (SEPT_VE_DISABLE: KVM kills the TD)"
            ),
            ShutdownReason::PrivateAccessToShared { gpa } => write!(
                f,
                "private-GPA access to shared page {gpa:#x} (policy wrong-state=shutdown)"
            ),
            ShutdownReason::SharedAccessToPrivate { gpa } => write!(
                f,
                "shared-GPA access to private page {gpa:#x} (policy wrong-state=shutdown)"
            ),
            ShutdownReason::AcceptOutsideRam { gpa } => {
                write!(f, "ACCEPT of {gpa:#x}, outside TD RAM (no memslot)")
            }
            ShutdownReason::AcceptOfShared { gpa } => write!(
                f,
                "ACCEPT of shared page {gpa:#x} (policy wrong-state=shutdown)"
            ),
            ShutdownReason::QuarantinedAccess { gpa } => write!(
                f,
                "access to {gpa:#x}, in the range a hostile VMM left unknown (mapgpa-fail-after, \
                 mapgpa-bad-retry, accept-fail, implicit-convert): the guest must never touch it \
                 again"
            ),
        }
    }
}

/// What the vCPU loop must do after a TDCALL. Answers the loop computes for
/// a TDVMCALL go back through [`vmm_write`], which honours the RCX bitmap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TdcallEffect {
    /// Resume after the instruction (RIP += 4).
    Resume,
    /// Re-execute the TDCALL (RIP unchanged): the module exited to the VMM
    /// without completing it (ACCEPT of a page the VMM then converted).
    Retry,
    /// TDVMCALL HLT: resume after the instruction, then wait for an
    /// interrupt. `interrupts_blocked` is R12 (GHCI; Linux `handle_halt`).
    Halt {
        interrupts_blocked: bool,
    },
    /// TDVMCALL IO: the loop performs the port access (a read's value goes
    /// to R11), then resumes.
    Io {
        port: u16,
        size: u8,
        write: bool,
        value: u32,
    },
    /// TDVMCALL #VE.RequestMMIO: the loop performs the access at `gpa`
    /// (shared bit stripped, as KVM does) and puts a read's value in R11.
    Mmio {
        gpa: u64,
        size: u8,
        write: bool,
        value: u64,
    },
    /// TDVMCALL CPUID: the loop answers in R12..R15 (it owns the CPUID policy).
    Cpuid {
        leaf: u32,
        subleaf: u32,
    },
    /// TDVMCALL RDMSR / WRMSR: the loop handles the MSR (value in R11;
    /// failure: R10 = INVALID_OPERAND).
    Rdmsr {
        msr: u32,
    },
    Wrmsr {
        msr: u32,
        value: u64,
    },
    /// ReportFatalError: stop the TD (R12 = error code; the message is in
    /// R14, R15, RBX, RDI, RSI, R8, R9, RDX, which the loop may decode).
    Fatal {
        code: u64,
    },
    /// The VMM shuts the TD down.
    Shutdown(ShutdownReason),
}

/// What to do after a guest access that the nested tables refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultEffect {
    /// Inject #VE (vector 20); its info is latched.
    VirtualizationException,
    /// A second #VE before VEINFO.GET: inject #DF.
    DoubleFault,
    /// Re-execute the instruction (the page changed, is changing, or was
    /// converted by the VMM).
    Retry,
    /// The TD is shut down.
    Shutdown(ShutdownReason),
}

/// A GPR of the TDCALL register file, by its index in the TDVMCALL RCX
/// bitmap (module `tdg_vp_vmcall.c`: bit i exposes GPR i).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gpr {
    Rdx = 2,
    R8 = 8,
    R9 = 9,
    R10 = 10,
    R11 = 11,
    R12 = 12,
    R13 = 13,
    R14 = 14,
    R15 = 15,
}

impl Gpr {
    const ALL: [Gpr; 9] = [
        Gpr::Rdx,
        Gpr::R8,
        Gpr::R9,
        Gpr::R10,
        Gpr::R11,
        Gpr::R12,
        Gpr::R13,
        Gpr::R14,
        Gpr::R15,
    ];

    fn slot(self, regs: &mut TdcallRegs) -> &mut u64 {
        match self {
            Gpr::Rdx => &mut regs.rdx,
            Gpr::R8 => &mut regs.r8,
            Gpr::R9 => &mut regs.r9,
            Gpr::R10 => &mut regs.r10,
            Gpr::R11 => &mut regs.r11,
            Gpr::R12 => &mut regs.r12,
            Gpr::R13 => &mut regs.r13,
            Gpr::R14 => &mut regs.r14,
            Gpr::R15 => &mut regs.r15,
        }
    }

    fn exposed(self, rcx: u64) -> bool {
        rcx & (1 << self as u32) != 0
    }
}

/// Writes the VMM's answer to a TDVMCALL into `regs`, as TDH.VP.ENTER does
/// after a TDVMCALL: only GPRs the TD selected in RCX are copied back (module
/// `tdh_vp_enter.c` `save_regs_after_tdvmcall()`). Returns whether it wrote.
pub fn vmm_write(regs: &mut TdcallRegs, gpr: Gpr, value: u64) -> bool {
    if !gpr.exposed(regs.rcx) {
        return false;
    }
    *gpr.slot(regs) = value;
    true
}

/// The TD: its memory's page states, TD-scope metadata, the options.
/// Shared by all vCPUs.
pub struct TdModel<'a> {
    states: &'a [AtomicU8],
    gpaw: u8,
    vcpus: u32,
    options: Options,
    /// TDCS NOTIFY_ENABLES, written by the TD (Linux tdx_early_init).
    notify_enables: AtomicU64,
    /// TDCS TD_CTLS. PENDING_VE_DISABLE starts as ATTRIBUTES.SEPT_VE_DISABLE
    /// (module `tdh_mng_init.c`).
    td_ctls: AtomicU64,
    /// #VEs raised so far (for `inject-double-ve`).
    ves_raised: AtomicU64,
    /// `[start, end)` a hostile MapGPA left unknown (`mapgpa-fail-after`;
    /// empty until it happened).
    quarantine: [AtomicU64; 2],
    /// Answers a stuck hostile MapGPA gave the guest's retries (and a
    /// hostile busy ACCEPT).
    stuck_answers: AtomicU64,
    /// `[start, end)` whose first page's ACCEPT a hostile VMM fails
    /// (`accept-fail`), or takes away once the run's last page is accepted
    /// (`implicit-convert`); empty until a MapGPA armed it.
    hostile_run: [AtomicU64; 2],
    /// The page a hostile VMM converted behind the guest's back
    /// (`implicit-convert`; [`NO_PAGE`] until then).
    taken: AtomicU64,
    pub counters: &'a Counters,
}

/// A metadata field as the module's lookup table describes it for the guest.
struct Field {
    value: u64,
    /// `guest_rd_mask`, `guest_wr_mask` (module `tdr_tdcs_fields_lookup.c`).
    rd_mask: u64,
    wr_mask: u64,
    /// Element size mask (`md_get_element_size_mask()`).
    size_mask: u64,
    /// Where a write goes; `None`: read-only.
    store: Option<Store>,
}

/// The TD-writable metadata fields.
#[derive(Clone, Copy)]
enum Store {
    NotifyEnables,
    TdCtls,
}

impl<'a> TdModel<'a> {
    /// A TD whose memory is `states.len()` pages from GPA 0 (pass
    /// `&STATES[..options.memory_pages()]`), with GPAW 48 or 52 (any other
    /// value means 48) and `vcpus` vCPUs. Every page starts private.
    pub fn new(
        states: &'a [AtomicU8],
        gpaw: u8,
        vcpus: u32,
        options: Options,
        counters: &'a Counters,
    ) -> Self {
        TdModel {
            states,
            gpaw: if gpaw == 52 { 52 } else { 48 },
            vcpus,
            options,
            notify_enables: AtomicU64::new(0),
            td_ctls: AtomicU64::new(u64::from(
                Self::attributes_for(options) & attributes::SEPT_VE_DISABLE != 0,
            )),
            ves_raised: AtomicU64::new(0),
            quarantine: [AtomicU64::new(0), AtomicU64::new(0)],
            stuck_answers: AtomicU64::new(0),
            hostile_run: [AtomicU64::new(0), AtomicU64::new(0)],
            taken: AtomicU64::new(NO_PAGE),
            counters,
        }
    }

    /// Whether `[start, end)` overlaps the range a hostile MapGPA left
    /// unknown; counts the access if so.
    fn touches_quarantine(&self, start: u64, end: u64) -> bool {
        let (q_start, q_end) = (
            self.quarantine[0].load(Ordering::SeqCst),
            self.quarantine[1].load(Ordering::SeqCst),
        );
        let touches = start < q_end && q_start < end;
        if touches {
            Counters::bump(&self.counters.quarantine_accesses);
        }
        touches
    }

    /// A hostile MapGPA's leftovers: `[start, converted)` lose both aliases
    /// (pending: in no usable state), and `[start, end)` becomes the range
    /// the guest must never touch again. Every access to it then faults
    /// and is counted.
    fn strand(&self, start: u64, end: u64, converted: u64, backing: &impl Backing) {
        let mut page = start;
        while page < converted {
            if let Some(slot) = self.slot(page) {
                Self::hold(slot);
                backing.set_mapping(page, PageState::Pending);
            }
            page += PAGE;
        }
        backing.flush_nested_tlbs();
        let mut page = start;
        while page < converted {
            if let Some(slot) = self.slot(page) {
                Self::release(slot, PageState::Pending);
            }
            page += PAGE;
        }
        self.quarantine[0].store(start, Ordering::SeqCst);
        self.quarantine[1].store(end, Ordering::SeqCst);
    }

    /// TD ATTRIBUTES: SEPT_VE_DISABLE set, DEBUG clear, as QEMU's tdx-guest
    /// object sets by default (QEMU `tdx_guest_init`: `attributes =
    /// TDX_TD_ATTRIBUTES_SEPT_VE_DISABLE`); Linux 6.12 tdx_early_init panics
    /// without it in a non-debug TD. With `sept-ve`, nothing set (QEMU's
    /// `sept-ve-disable=off`).
    pub fn attributes(&self) -> u64 {
        Self::attributes_for(self.options)
    }

    fn attributes_for(options: Options) -> u64 {
        if options.sept_ve {
            0
        } else {
            attributes::SEPT_VE_DISABLE
        }
    }

    /// TD_CTLS.PENDING_VE_DISABLE (bit 0): whether a private access to a
    /// pending page exits to the VMM rather than raising #VE.
    fn pending_ve_disabled(&self) -> bool {
        self.td_ctls.load(Ordering::SeqCst) & 1 != 0
    }

    pub fn options(&self) -> Options {
        self.options
    }

    pub fn gpaw(&self) -> u8 {
        self.gpaw
    }

    /// The shared bit (GPAW - 1).
    pub fn shared_bit(&self) -> u64 {
        1 << (self.gpaw - 1)
    }

    /// TDCS CONFIG_FLAGS: KVM always sets NO_RBP_MOD (KVM tdx.c
    /// `setup_tdparams`: `config_flags = TDX_CONFIG_FLAGS_NO_RBP_MOD`) and
    /// MAX_GPAW for a 5-level (GPAW 52) TD; FLEXIBLE_PENDING_VE is never set.
    pub fn config_flags(&self) -> u64 {
        config_flags::NO_RBP_MOD
            | if self.gpaw == 52 {
                config_flags::GPAW
            } else {
                0
            }
    }

    /// Bytes of TD memory.
    pub fn memory_bytes(&self) -> u64 {
        self.states.len() as u64 * PAGE
    }

    /// The state of the page holding `gpa` (no shared bit), busy or not.
    pub fn state(&self, gpa: u64) -> Option<PageState> {
        self.slot(gpa)
            .map(|s| PageState::from_byte(s.load(Ordering::SeqCst)))
    }

    fn slot(&self, gpa: u64) -> Option<&AtomicU8> {
        usize::try_from(gpa / PAGE)
            .ok()
            .and_then(|i| self.states.get(i))
    }

    /// Takes the page if no one holds it; its state then.
    fn try_hold(slot: &AtomicU8) -> Option<PageState> {
        page_slots::try_hold(slot).map(PageState::from_byte)
    }

    /// Takes the page, waiting while someone else holds it (a VMM action
    /// blocks rather than fails); its state then.
    fn hold(slot: &AtomicU8) -> PageState {
        PageState::from_byte(page_slots::hold(slot))
    }

    /// Releases a held page in `state`.
    fn release(slot: &AtomicU8, state: PageState) {
        page_slots::release(slot, state as u8);
    }

    /// Releases a held page unchanged.
    fn release_unchanged(slot: &AtomicU8) {
        page_slots::release_unchanged(slot);
    }

    /// Sets the initial state of `[start, end)` (boot: the launch image
    /// accepted, the rest pending with `pending_ram`). Parts outside TD
    /// memory are ignored.
    pub fn initialise(&self, start: u64, end: u64, state: PageState, backing: &impl Backing) {
        let mut gpa = start & !(PAGE - 1);
        while gpa < end.min(self.memory_bytes()) {
            if let Some(slot) = self.slot(gpa) {
                Self::hold(slot);
                backing.set_mapping(gpa, state);
                Self::release(slot, state);
            }
            gpa += PAGE;
        }
    }

    /// Latches `info` and says whether to inject #VE or, if one is still
    /// latched, #DF (module `td_other_exits.c` `tdx_inject_ve()`: a #VE while
    /// VE_INFO.VALID is set becomes #DF).
    pub fn raise_ve(&self, vcpu: &mut VcpuState, info: VeInfo) -> FaultEffect {
        if vcpu.ve_latched.is_some() {
            Counters::bump(&self.counters.double_faults);
            return FaultEffect::DoubleFault;
        }
        if let Some(counter) = self.counters.ve_by_reason.get(info.exit_reason as usize) {
            Counters::bump(counter);
        }
        vcpu.ve_latched = Some(info);
        let raised = self.ves_raised.fetch_add(1, Ordering::SeqCst) + 1;
        if raised == self.options.double_ve_at {
            // As if another #VE had followed this one before VEINFO.GET.
            Counters::bump(&self.counters.double_faults);
            return FaultEffect::DoubleFault;
        }
        FaultEffect::VirtualizationException
    }

    /// Decides what a nested page fault means. `gpa` is the address as the
    /// guest put it on the bus (shared bit included), `gla` the linear address
    /// the vCPU decoded for it.
    pub fn nested_fault(
        &self,
        vcpu: &mut VcpuState,
        gpa: u64,
        gla: u64,
        access: Access,
        backing: &impl Backing,
    ) -> FaultEffect {
        Counters::bump(&self.counters.nested_page_faults);
        // No memslot can hold it. (The module turns such an EPT violation
        // into #PF(RSVD) when GPAW < MAX_PA, `td_ept_violation.c`; under SVM
        // with phys-bits = GPAW the guest's own walk faults first.)
        if gpa >> self.gpaw != 0 {
            return FaultEffect::Shutdown(ShutdownReason::GpaAboveGpaw { gpa });
        }
        let shared = gpa & self.shared_bit() != 0;
        let page = gpa & !self.shared_bit() & !(PAGE - 1);
        if self.touches_quarantine(page, page + PAGE) {
            return FaultEffect::Shutdown(ShutdownReason::QuarantinedAccess { gpa });
        }
        let Some(slot) = self.slot(page) else {
            if !shared {
                return FaultEffect::Shutdown(ShutdownReason::PrivateAccessOutsideRam { gpa });
            }
            // MMIO: KVM maps MMIO in the shared EPT with SUPPRESS_VE clear
            // (KVM tdx.c `tdx_vm_init`: `kvm_mmu_set_mmio_spte_value(kvm,
            // 0)`), so the CPU raises an EPT-violation #VE with the GLA and
            // the GPA as accessed; Linux `handle_mmio` then uses
            // #VE.RequestMMIO and checks the GLA.
            Counters::bump(&self.counters.mmio_faults);
            return self.ept_violation_ve(vcpu, gpa, gla, access);
        };
        let byte = slot.load(Ordering::SeqCst);
        let state = PageState::from_byte(byte);
        if byte & BUSY != 0
            || (shared && state == PageState::Shared)
            || (!shared && state == PageState::Private)
        {
            // Busy: the mapping is changing; or the alias is mapped by now
            // (another vCPU converted the page between the fault and here).
            Counters::bump(&self.counters.spurious_faults);
            return FaultEffect::Retry;
        }
        if !shared && state == PageState::Pending && page == self.taken.load(Ordering::SeqCst) {
            // The page a hostile VMM took (`implicit-convert`): the guest's
            // entry says private, as the guest left it, so this is no
            // wrong-state access of the guest's. It is the guest's only news
            // of the loss; from here on the page is its quarantine.
            self.quarantine[0].store(page, Ordering::SeqCst);
            self.quarantine[1].store(page + PAGE, Ordering::SeqCst);
            return self.pending_access(vcpu, gpa, gla, access);
        }
        Counters::bump(&self.counters.wrong_state_accesses);
        let policy = self.options.wrong_state;
        if shared {
            // Shared-EPT violation on a private or pending page: the module
            // exits to the VMM (`td_ept_violation.c`, shared GPA).
            match policy {
                WrongStatePolicy::Ve => self.ept_violation_ve(vcpu, gpa, gla, access),
                // KVM: shared fault on a private-attribute gfn ->
                // KVM_EXIT_MEMORY_FAULT -> QEMU kvm_convert_memory(shared):
                // the private page is discarded, the shared one is fresh.
                WrongStatePolicy::Convert => {
                    self.implicit_conversion(page, state, PageState::Shared, backing)
                }
                WrongStatePolicy::Shutdown => {
                    FaultEffect::Shutdown(ShutdownReason::SharedAccessToPrivate { gpa })
                }
            }
        } else if state == PageState::Pending {
            self.pending_access(vcpu, gpa, gla, access)
        } else {
            // Private GPA, shared page: no private S-EPT mapping, so the
            // module exits to the VMM (SEPT_VE_DISABLE: no #VE in any policy).
            match policy {
                // KVM_EXIT_MEMORY_FAULT(private) -> QEMU converts to private;
                // KVM then TDH.MEM.PAGE.AUGs it: pending. The retried access
                // meets the pending rule.
                WrongStatePolicy::Ve | WrongStatePolicy::Convert => {
                    self.implicit_conversion(page, state, PageState::Pending, backing)
                }
                WrongStatePolicy::Shutdown => {
                    FaultEffect::Shutdown(ShutdownReason::PrivateAccessToShared { gpa })
                }
            }
        }
    }

    /// A private-GPA access to a pending page (`td_ept_violation.c`): with
    /// TD_CTLS.PENDING_VE_DISABLE clear the module raises an EPT-violation
    /// #VE; set (= SEPT_VE_DISABLE, always for Linux), it exits to the VMM
    /// with EEQ PENDING_EPT_VIOLATION, and KVM tdx.c
    /// `tdx_is_sept_violation_unexpected_pending` says "Guest access before
    /// accepting" and kills the TD. Every policy.
    fn pending_access(
        &self,
        vcpu: &mut VcpuState,
        gpa: u64,
        gla: u64,
        access: Access,
    ) -> FaultEffect {
        if self.pending_ve_disabled() {
            FaultEffect::Shutdown(ShutdownReason::PrivateAccessToPending { gpa })
        } else {
            self.ept_violation_ve(vcpu, gpa, gla, access)
        }
    }

    fn ept_violation_ve(
        &self,
        vcpu: &mut VcpuState,
        gpa: u64,
        gla: u64,
        access: Access,
    ) -> FaultEffect {
        self.raise_ve(
            vcpu,
            VeInfo {
                exit_reason: exit_reason::EPT_VIOLATION,
                exit_qualification: access.ept_qualification(),
                guest_linear_address: gla,
                guest_physical_address: gpa,
                instruction_length: 0,
                instruction_info: 0,
            },
        )
    }

    /// The VMM converts `page`, seen in state `seen`, to `target` (Shared or
    /// Pending), in MapGPA's order; the access is retried.
    fn implicit_conversion(
        &self,
        page: u64,
        seen: PageState,
        target: PageState,
        backing: &impl Backing,
    ) -> FaultEffect {
        let Some(slot) = self.slot(page) else {
            return FaultEffect::Retry;
        };
        if Self::hold(slot) != seen {
            // Someone changed it meanwhile: re-execute and look again.
            Self::release_unchanged(slot);
            return FaultEffect::Retry;
        }
        backing.set_mapping(page, PageState::Pending);
        backing.flush_nested_tlbs();
        if target == PageState::Shared {
            backing.zero_page(page);
            backing.set_mapping(page, PageState::Shared);
        }
        Self::release(slot, target);
        Counters::bump(&self.counters.implicit_conversions);
        FaultEffect::Retry
    }

    /// Executes the TDCALL in `regs` for `vcpu` (module
    /// `tdx_td_dispatcher.c` `td_call()`).
    pub fn tdcall(
        &self,
        vcpu: &mut VcpuState,
        regs: &mut TdcallRegs,
        backing: &impl Backing,
    ) -> TdcallEffect {
        // RAX: leaf [15:0], version [23:16], the rest reserved (zero).
        let leaf_number = regs.rax & 0xffff;
        let version = (regs.rax >> 16) & 0xff;
        if let Some(counter) = self.counters.tdcalls_by_leaf.get(leaf_number as usize) {
            Counters::bump(counter);
        }
        let operand_invalid_rax = status::TDX_OPERAND_INVALID | status::OPERAND_ID_RAX;
        if regs.rax >> 24 != 0 || (version > 0 && leaf_number != TDG_VM_RD) {
            regs.rax = operand_invalid_rax;
            return TdcallEffect::Resume;
        }
        match leaf_number {
            leaf::TDG_VP_VMCALL => self.vmcall(regs, backing),
            leaf::TDG_VP_INFO => {
                self.vp_info(vcpu, regs);
                TdcallEffect::Resume
            }
            leaf::TDG_VP_VEINFO_GET => {
                Self::veinfo_get(vcpu, regs);
                TdcallEffect::Resume
            }
            leaf::TDG_MEM_PAGE_ACCEPT => self.accept(regs, backing),
            TDG_VM_RD | TDG_VM_WR => {
                self.vm_rd_wr(regs, version, leaf_number == TDG_VM_WR);
                TdcallEffect::Resume
            }
            // The dispatcher's default: "Invalid leaf number for TDCALL".
            // Leaves the module has but the model lacks (RTMR.EXTEND,
            // MR.REPORT, VP.CPUIDVE.SET, VP.RD/WR, SYS.RD, ...) get the same
            // answer and are counted apart.
            _ => {
                Counters::bump(&self.counters.tdcalls_unmodelled);
                regs.rax = operand_invalid_rax;
                TdcallEffect::Resume
            }
        }
    }

    /// TDG.VP.INFO (module `tdg_vp_info.c`).
    fn vp_info(&self, vcpu: &VcpuState, regs: &mut TdcallRegs) {
        regs.rax = status::TDX_SUCCESS;
        // MAX_PA_FOR_GPAW (52) or MAX_PA_FOR_GPA_NOT_WIDE (48).
        regs.rcx = u64::from(self.gpaw);
        regs.rdx = self.attributes();
        // td_num_of_vcpus_t: NUM_VCPUS [31:0], MAX_VCPUS [63:32].
        regs.r8 = u64::from(self.vcpus) | (u64::from(self.vcpus) << 32);
        regs.r9 = u64::from(vcpu.index);
        // TDX 1.5 sets bit 0 (TDG.SYS.RD available); the model has no
        // TDG.SYS.RD, so it answers as a TDX 1.0 module: 0.
        regs.r10 = 0;
        regs.r11 = 0;
    }

    /// TDG.VP.VEINFO.GET (module `tdg_vp_veinfo_get.c`): outputs zeroed
    /// first, TDX_NO_VALID_VE_INFO if nothing is latched.
    fn veinfo_get(vcpu: &mut VcpuState, regs: &mut TdcallRegs) {
        (regs.rcx, regs.rdx, regs.r8, regs.r9, regs.r10) = (0, 0, 0, 0, 0);
        match vcpu.ve_latched.take() {
            Some(info) => {
                regs.rax = status::TDX_SUCCESS;
                regs.rcx = u64::from(info.exit_reason);
                regs.rdx = info.exit_qualification;
                regs.r8 = info.guest_linear_address;
                regs.r9 = info.guest_physical_address;
                regs.r10 =
                    u64::from(info.instruction_length) | (u64::from(info.instruction_info) << 32);
            }
            None => regs.rax = status::TDX_NO_VALID_VE_INFO,
        }
    }

    /// The TD-scope field named by (class code, field code), as the guest
    /// sees it.
    fn field(&self, class: u64, code: u64) -> Option<Field> {
        let ro = |value, size_mask| Field {
            value,
            rd_mask: u64::MAX,
            wr_mask: 0,
            size_mask,
            store: None,
        };
        let field = match (class, code) {
            (0x10, 0x01) => ro(u64::from(self.vcpus), 0xffff_ffff),
            (0x11, 0x00) => ro(self.attributes(), u64::MAX),
            (0x11, 0x02) => ro(u64::from(self.vcpus), 0xffff_ffff),
            // TDCS GPAW execution control: set for GPAW 52.
            (0x11, 0x03) => ro(u64::from(self.gpaw == 52), 0xff),
            (0x11, 0x10) => Field {
                value: self.notify_enables.load(Ordering::SeqCst),
                rd_mask: 1,
                wr_mask: 1,
                size_mask: u64::MAX,
                store: Some(Store::NotifyEnables),
            },
            (0x11, 0x16) => ro(self.config_flags(), u64::MAX),
            (0x11, 0x17) => Field {
                value: self.td_ctls.load(Ordering::SeqCst),
                rd_mask: u64::MAX,
                wr_mask: 1,
                size_mask: u64::MAX,
                store: Some(Store::TdCtls),
            },
            _ => return None,
        };
        Some(field)
    }

    /// TDG.VM.RD / TDG.VM.WR (module `tdg_vm_rd_wr.c`, `metadata_generic.c`,
    /// `metadata_td.c`): RDX = field ID, R8 = value (out: the value read, or
    /// for a write the old value), R9 = write mask; R8 = 0 on error.
    fn vm_rd_wr(&self, regs: &mut TdcallRegs, version: u64, write: bool) {
        let (value, request) = (regs.r8, regs.r9);
        regs.r8 = 0;
        regs.rax = self.vm_rd_wr_status(regs, version, write, value, request);
    }

    fn vm_rd_wr_status(
        &self,
        regs: &mut TdcallRegs,
        version: u64,
        write: bool,
        value: u64,
        request: u64,
    ) -> u64 {
        // Version 1 of TDG.VM.RD (RDX returns the next field ID) is not
        // modelled; the module refuses versions above 1.
        if version > 0 {
            Counters::bump(&self.counters.tdcalls_unmodelled);
            return status::TDX_OPERAND_INVALID | status::OPERAND_ID_RAX;
        }
        if regs.rcx != 0 {
            return status::TDX_OPERAND_INVALID | status::OPERAND_ID_RCX;
        }
        let id = regs.rdx;
        // md_check_as_single_element_id(): reserved bits 31:24, 49:47, 55,
        // 62 and LAST_ELEMENT_IN_FIELD (37:34), LAST_FIELD_IN_SEQUENCE
        // (46:38) must be 0; size, INC_SIZE, WRITE_MASK_VALID and the
        // context code are ignored.
        const MUST_BE_ZERO: u64 =
            (0xff << 24) | (0xf << 34) | (0x1ff << 38) | (0x7 << 47) | (1 << 55) | (1 << 62);
        if id & MUST_BE_ZERO != 0 {
            return status::TDX_METADATA_FIELD_ID_INCORRECT;
        }
        let (class, code) = ((id >> 56) & 0x3f, id & 0xff_ffff);
        let Some(field) = self.field(class, code) else {
            return status::TDX_METADATA_FIELD_ID_INCORRECT;
        };
        let old = field.value & field.size_mask;
        if !write {
            if field.rd_mask == 0 {
                return status::TDX_METADATA_FIELD_NOT_READABLE;
            }
            regs.r8 = old & field.rd_mask;
            return status::TDX_SUCCESS;
        }
        // md_td_write_element().
        let combined = field.wr_mask & request;
        if combined == 0 {
            return status::TDX_METADATA_FIELD_NOT_WRITABLE;
        }
        let forbidden = request & !field.wr_mask;
        if old & forbidden != value & forbidden {
            return status::TDX_METADATA_FIELD_VALUE_NOT_VALID;
        }
        let new = (old & !combined) | (value & combined);
        let store = match field.store {
            Some(Store::NotifyEnables) => &self.notify_enables,
            Some(Store::TdCtls) => {
                // Without CONFIG_FLAGS.FLEXIBLE_PENDING_VE the TD may not
                // change TD_CTLS.PENDING_VE_DISABLE.
                if self.config_flags() & config_flags::FLEXIBLE_PENDING_VE == 0
                    && (new ^ old) & 1 != 0
                {
                    return status::TDX_METADATA_FIELD_VALUE_NOT_VALID;
                }
                &self.td_ctls
            }
            None => return status::TDX_METADATA_FIELD_NOT_WRITABLE,
        };
        // write_element_by_size(): a compare-exchange; losing it is BUSY.
        if store
            .compare_exchange(old, new, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return status::TDX_OPERAND_BUSY | status::OPERAND_ID_METADATA_FIELD;
        }
        regs.r8 = old & field.rd_mask;
        status::TDX_SUCCESS
    }

    /// TDG.MEM.PAGE.ACCEPT (module `tdg_mem_page_accept.c`): RCX = GPA |
    /// level.
    fn accept(&self, regs: &mut TdcallRegs, backing: &impl Backing) -> TdcallEffect {
        let operand_invalid = status::TDX_OPERAND_INVALID | status::OPERAND_ID_RCX;
        let rcx = regs.rcx;
        let level = rcx & 7;
        let gpa = rcx & 0x000f_ffff_ffff_f000;
        // verify_page_info_input(LVL_PT, LVL_PD): reserved bits 11:3 and
        // 63:52 zero, level 4K or 2M (no 1G), GPA aligned to the level;
        // check_gpa_validity(PRIVATE_ONLY): below GPAW, shared bit clear.
        let size = match level {
            0 => PAGE,
            1 => PAGE_2M,
            _ => {
                regs.rax = operand_invalid;
                return TdcallEffect::Resume;
            }
        };
        if rcx & 0xfff0_0000_0000_0ff8 != 0
            || !gpa.is_multiple_of(size)
            || gpa >> self.gpaw != 0
            || gpa & self.shared_bit() != 0
        {
            regs.rax = operand_invalid;
            return TdcallEffect::Resume;
        }
        let end = gpa + size;
        if let Some(kind) = self.options.accept_fail {
            let (fail_at, fail_end) = (
                self.hostile_run[0].load(Ordering::SeqCst),
                self.hostile_run[1].load(Ordering::SeqCst),
            );
            let armed = fail_end != 0 && gpa == fail_at;
            let first_time = armed && self.quarantine[1].load(Ordering::SeqCst) == 0;
            let busy_again = armed
                && kind == AcceptFail::Busy
                && self.quarantine[0].load(Ordering::SeqCst) == fail_at
                && self.stuck_answers.fetch_add(1, Ordering::SeqCst) < STUCK_ANSWERS;
            if first_time || busy_again {
                // Hostile: this page's ACCEPT fails with a completion code
                // the module defines for it (TDX module ABI,
                // tdg_mem_page_accept.c: SIZE_MISMATCH at the walk's level,
                // OPERAND_INVALID, OPERAND_BUSY on the RCX operand), as a VMM
                // that mapped the page wrong or holds its S-EPT entry can
                // cause; from here to the run's
                // end is what the guest must never touch again.
                self.quarantine[0].store(fail_at, Ordering::SeqCst);
                self.quarantine[1].store(fail_end, Ordering::SeqCst);
                regs.rax = match kind {
                    AcceptFail::Mismatch => status::TDX_PAGE_SIZE_MISMATCH | level,
                    AcceptFail::Error => operand_invalid,
                    AcceptFail::Busy => status::TDX_OPERAND_BUSY | status::OPERAND_ID_RCX,
                };
                return TdcallEffect::Resume;
            }
        }
        self.touches_quarantine(gpa, end);
        if gpa >= self.memory_bytes() {
            // The S-EPT walk fails: EPT-violation exit to the VMM, which has
            // no memslot there (KVM -> KVM_EXIT_MEMORY_FAULT -> QEMU finds no
            // RAM and stops).
            return TdcallEffect::Shutdown(ShutdownReason::AcceptOutsideRam { gpa });
        }
        if end > self.memory_bytes() || (level > 0 && self.options.refuse_large_accept) {
            // A VMM can map 4K only there (the memslot ends inside the 2M
            // block, or KVM maps private memory at 4K only): the PD entry is
            // not a leaf, TDACCEPT_SIZE_MISMATCH at the walk's level.
            Counters::bump(&self.counters.accept_size_mismatches);
            regs.rax = status::TDX_PAGE_SIZE_MISMATCH | level;
            return TdcallEffect::Resume;
        }
        // Hold every page of the block, without waiting: the module locks the
        // S-EPT entry with sept_lock_acquire_guest() and answers
        // TDX_OPERAND_BUSY with operand RCX if it is locked.
        let mut held = 0u64;
        let mut counts = [0u64; 3];
        let mut page = gpa;
        while page < end {
            match self.slot(page).and_then(Self::try_hold) {
                Some(state) => counts[state as usize] += 1,
                None => {
                    self.release_range(gpa, gpa + held * PAGE);
                    Counters::bump(&self.counters.accept_busy);
                    regs.rax = status::TDX_OPERAND_BUSY | status::OPERAND_ID_RCX;
                    return TdcallEffect::Resume;
                }
            }
            held += 1;
            page += PAGE;
        }
        let pages = size / PAGE;
        let [private, pending, shared] = counts;
        if pending == pages {
            // init_sept_4k_page() zeroes each page, then the entry becomes
            // MAPPED.
            let mut page = gpa;
            while page < end {
                backing.zero_page(page);
                backing.set_mapping(page, PageState::Private);
                if let Some(slot) = self.slot(page) {
                    Self::release(slot, PageState::Private);
                }
                page += PAGE;
            }
            Counters::bump(&self.counters.accepts[level as usize]);
            regs.rax = status::TDX_SUCCESS;
            self.take_page_if_armed(end, backing);
            return TdcallEffect::Resume;
        }
        if private == pages {
            // A guest-accessible leaf at the requested level (the model
            // treats the block as mapped at that size).
            self.release_range(gpa, end);
            regs.rax = status::TDX_PAGE_ALREADY_ACCEPTED | level;
            return TdcallEffect::Resume;
        }
        if level == 0 && shared == 1 {
            // A shared page has no private S-EPT mapping (KVM removed it at
            // conversion): TDACCEPT_VIOLATION, an EPT-violation exit to the
            // VMM, RIP unchanged. KVM: private fault on a shared-attribute
            // gfn -> KVM_EXIT_MEMORY_FAULT -> QEMU converts it to private,
            // KVM AUGs it, the TD re-executes the ACCEPT.
            Counters::bump(&self.counters.wrong_state_accesses);
            if self.options.wrong_state == WrongStatePolicy::Shutdown {
                self.release_range(gpa, end);
                return TdcallEffect::Shutdown(ShutdownReason::AcceptOfShared { gpa });
            }
            backing.set_mapping(gpa, PageState::Pending);
            backing.flush_nested_tlbs();
            if let Some(slot) = self.slot(gpa) {
                Self::release(slot, PageState::Pending);
            }
            Counters::bump(&self.counters.implicit_conversions);
            return TdcallEffect::Retry;
        }
        // A 2M block neither wholly pending nor wholly private: its pages are
        // (or were) mapped at 4K, so the PD entry is not a leaf.
        self.release_range(gpa, end);
        Counters::bump(&self.counters.accept_size_mismatches);
        regs.rax = status::TDX_PAGE_SIZE_MISMATCH | level;
        TdcallEffect::Resume
    }

    /// `implicit-convert`: once the ACCEPT ending at `accepted_end` has
    /// finished the armed run, the VMM converts the run's first armed page
    /// behind the guest's back: the private page is removed (its contents
    /// gone) and a fresh one AUGed, pending, as KVM does when QEMU converts
    /// a page to shared and back (`kvm_convert_memory`; KVM tdx.c
    /// `tdx_sept_remove_private_spte`, then `tdx_mem_page_aug`). The guest
    /// was told nothing.
    fn take_page_if_armed(&self, accepted_end: u64, backing: &impl Backing) {
        let (page, end) = (
            self.hostile_run[0].load(Ordering::SeqCst),
            self.hostile_run[1].load(Ordering::SeqCst),
        );
        if !self.options.implicit_convert
            || end == 0
            || accepted_end != end
            || self
                .taken
                .compare_exchange(NO_PAGE, page, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
        {
            return;
        }
        let Some(slot) = self.slot(page) else {
            return;
        };
        Self::hold(slot);
        backing.set_mapping(page, PageState::Pending);
        backing.flush_nested_tlbs();
        backing.zero_page(page);
        Self::release(slot, PageState::Pending);
        Counters::bump(&self.counters.implicit_conversions);
    }

    /// Releases the held pages of `[start, end)` unchanged.
    fn release_range(&self, start: u64, end: u64) {
        let mut page = start;
        while page < end {
            if let Some(slot) = self.slot(page) {
                Self::release_unchanged(slot);
            }
            page += PAGE;
        }
    }

    /// TDG.VP.VMCALL (module `tdg_vp_vmcall.c`), then the VMM's handling
    /// (KVM tdx.c `handle_tdvmcall`), then TDH.VP.ENTER's copy back.
    fn vmcall(&self, regs: &mut TdcallRegs, backing: &impl Backing) -> TdcallEffect {
        let control = regs.rcx;
        // GPR_SELECT bits 0 (RAX), 1 (RCX), 4 (RSP), and 5 (RBP) under
        // NO_RBP_MOD, and RCX[63:32], must be 0. XMM_SELECT (31:16) is free.
        let mut forbidden: u64 = (1 << 0) | (1 << 1) | (1 << 4);
        if self.config_flags() & config_flags::NO_RBP_MOD != 0 {
            forbidden |= 1 << 5;
        }
        if control & forbidden != 0 || control >> 32 != 0 {
            regs.rax = status::TDX_OPERAND_INVALID | status::OPERAND_ID_RCX;
            return TdcallEffect::Resume;
        }
        // The VMM sees the selected GPRs; the others read as zero
        // (copy_gprs_data_from_td_to_vmm()).
        let mut vmm = TdcallRegs {
            rcx: control,
            ..TdcallRegs::default()
        };
        for gpr in Gpr::ALL {
            if gpr.exposed(control) {
                *gpr.slot(&mut vmm) = *gpr.slot(regs);
            }
        }
        let effect = self.vmm_tdvmcall(&mut vmm, backing);
        // save_regs_after_tdvmcall(): selected GPRs from the VMM, RAX =
        // TDX_SUCCESS, RCX unchanged; the rest keep the TD's values.
        for gpr in Gpr::ALL {
            if gpr.exposed(control) {
                *gpr.slot(regs) = *gpr.slot(&mut vmm);
            }
        }
        regs.rax = status::TDX_SUCCESS;
        effect
    }

    /// The VMM's TDVMCALL handling over the registers it sees; status in R10.
    fn vmm_tdvmcall(&self, vmm: &mut TdcallRegs, backing: &impl Backing) -> TdcallEffect {
        use vmcall_status::*;
        if vmm.r10 != 0 {
            // R10 != 0 is vendor-specific: a KVM hypercall numbered R10 (KVM
            // tdx.c `tdx_emulate_vmcall`). The model offers none.
            Counters::bump(&self.counters.tdvmcalls_unsupported);
            vmm.r10 = KVM_ENOSYS;
            return TdcallEffect::Resume;
        }
        let mut effect = TdcallEffect::Resume;
        let status = match vmm.r11 {
            subfn::MAP_GPA => self.map_gpa(vmm, backing),
            subfn::CPUID => {
                effect = TdcallEffect::Cpuid {
                    leaf: vmm.r12 as u32,
                    subleaf: vmm.r13 as u32,
                };
                SUCCESS
            }
            subfn::HLT => {
                effect = TdcallEffect::Halt {
                    interrupts_blocked: vmm.r12 != 0,
                };
                SUCCESS
            }
            // KVM tdx.c `tdx_emulate_io`: size 1, 2 or 4, direction 0 or 1.
            subfn::IO => {
                let size = vmm.r12;
                if !matches!(size, 1 | 2 | 4) || vmm.r13 > 1 || vmm.r14 > 0xffff {
                    INVALID_OPERAND
                } else {
                    effect = TdcallEffect::Io {
                        port: vmm.r14 as u16,
                        size: size as u8,
                        write: vmm.r13 == 1,
                        value: vmm.r15 as u32,
                    };
                    SUCCESS
                }
            }
            subfn::REQUEST_MMIO => match self.mmio_request(vmm) {
                Some(mmio) => {
                    effect = mmio;
                    SUCCESS
                }
                None => INVALID_OPERAND,
            },
            subfn::RDMSR => {
                effect = TdcallEffect::Rdmsr {
                    msr: vmm.r12 as u32,
                };
                SUCCESS
            }
            subfn::WRMSR => {
                effect = TdcallEffect::Wrmsr {
                    msr: vmm.r12 as u32,
                    value: vmm.r13,
                };
                SUCCESS
            }
            // KVM tdx.c `tdx_get_td_vm_call_info`: leaf 0 -> success, R11..R14
            // = 0 (no GHCI extension); another leaf -> INVALID_OPERAND.
            subfn::GET_TD_VM_CALL_INFO => {
                if vmm.r12 == 0 {
                    (vmm.r11, vmm.r12, vmm.r13, vmm.r14) = (0, 0, 0, 0);
                    SUCCESS
                } else {
                    INVALID_OPERAND
                }
            }
            subfn::REPORT_FATAL_ERROR => {
                effect = TdcallEffect::Fatal { code: vmm.r12 };
                SUCCESS
            }
            // KVM's handle_tdvmcall default (GetQuote and
            // SetupEventNotifyInterrupt included: the model has no quoting
            // service and no event notification).
            _ => {
                Counters::bump(&self.counters.tdvmcalls_unsupported);
                SUBFUNC_UNSUPPORTED
            }
        };
        vmm.r10 = status;
        effect
    }

    /// #VE.RequestMMIO (KVM tdx.c `tdx_emulate_mmio`): R12 = size (1, 2, 4,
    /// 8), R13 = 0 read / 1 write, R14 = GPA (shared bit allowed, stripped),
    /// R15 = value. Refused: other sizes or directions, an access crossing a
    /// page, a GPA in TD RAM (a memslot).
    fn mmio_request(&self, vmm: &TdcallRegs) -> Option<TdcallEffect> {
        let size = vmm.r12;
        if !matches!(size, 1 | 2 | 4 | 8) || vmm.r13 > 1 {
            return None;
        }
        let gpa = vmm.r14 & !self.shared_bit();
        if gpa >> self.gpaw != 0
            || (gpa + size - 1) / PAGE != gpa / PAGE
            || gpa < self.memory_bytes()
        {
            return None;
        }
        Some(TdcallEffect::Mmio {
            gpa,
            size: size as u8,
            write: vmm.r13 == 1,
            value: if vmm.r13 == 1 { vmm.r15 } else { 0 },
        })
    }

    /// MapGPA: R12 = start (shared bit set: to shared), R13 = size. Checks as
    /// KVM tdx.c `tdx_map_gpa`; conversion as QEMU `kvm_convert_memory` and
    /// KVM's memory-attribute update (only pages whose attribute changes are
    /// zapped: `kvm_arch_pre_set_memory_attributes`).
    fn map_gpa(&self, vmm: &mut TdcallRegs, backing: &impl Backing) -> u64 {
        use vmcall_status::*;
        Counters::bump(&self.counters.map_gpa_calls);
        let shared_bit = self.shared_bit();
        let (gpa, size) = (vmm.r12, vmm.r13);
        let Some(last) = gpa
            .checked_add(size)
            .filter(|&end| end > gpa)
            .map(|e| e - 1)
        else {
            return INVALID_OPERAND;
        };
        if last >> self.gpaw != 0 || (gpa & shared_bit) != (last & shared_bit) {
            return INVALID_OPERAND;
        }
        if gpa % PAGE != 0 || size % PAGE != 0 {
            return ALIGN_ERROR;
        }
        let to_shared = gpa & shared_bit != 0;
        let start = gpa & !shared_bit;
        let end = start + size;
        let memory = self.memory_bytes();
        if start >= memory {
            // QEMU: "Ignore converting non-assigned region to shared"; to
            // private it fails.
            return if to_shared { SUCCESS } else { INVALID_OPERAND };
        }
        if end > memory {
            // Straddles the end of RAM: QEMU's discard of the range fails.
            return INVALID_OPERAND;
        }
        let encoding = if to_shared { shared_bit } else { 0 };
        let quarantine = (
            self.quarantine[0].load(Ordering::SeqCst),
            self.quarantine[1].load(Ordering::SeqCst),
        );
        if self.options.map_gpa_bad_retry == Some(BadRetry::Stuck)
            && quarantine == (start, end)
            && self.stuck_answers.fetch_add(1, Ordering::SeqCst) < STUCK_ANSWERS
        {
            // The guest's loop asking again, not an access of its own.
            Counters::bump(&self.counters.map_gpa_retries);
            vmm.r11 = start | encoding;
            return RETRY;
        }
        self.touches_quarantine(start, end);
        if quarantine.1 == 0 {
            let pages = size / PAGE;
            let fail_after = self.options.map_gpa_fail_after;
            if fail_after != 0 && pages > fail_after {
                // Hostile: the first k pages change, then an error with no
                // resume point (GHCI: INVALID_OPERAND; only RETRY carries
                // R11, KVM tdx.c `tdx_map_gpa`).
                self.strand(start, end, start + fail_after * PAGE, backing);
                return INVALID_OPERAND;
            }
            if let Some(kind) = self.options.map_gpa_bad_retry.filter(|_| pages > 1) {
                // RETRY with R11 = the GPA to resume from, in R12's encoding
                // (GHCI; KVM tdx.c `tdx_map_gpa`), but a resume point a
                // guest must refuse.
                let (converted, resume) = match kind {
                    BadRetry::Outside => (start + PAGE, end),
                    BadRetry::Unaligned => (start + PAGE, start + PAGE + 8),
                    BadRetry::Stuck => (start, start),
                };
                self.strand(start, end, converted, backing);
                Counters::bump(&self.counters.map_gpa_retries);
                vmm.r11 = resume | encoding;
                return RETRY;
            }
        }
        if (self.options.accept_fail.is_some() || self.options.implicit_convert)
            && !to_shared
            && size / PAGE > 3
            && self.hostile_run[1].load(Ordering::SeqCst) == 0
        {
            self.hostile_run[0].store(start + 3 * PAGE, Ordering::SeqCst);
            self.hostile_run[1].store(end, Ordering::SeqCst);
        }
        let stop = if self.options.map_gpa_retry_every_page {
            start + PAGE
        } else {
            end
        };
        let converted = self.convert(start, stop, to_shared, backing);
        if to_shared {
            self.counters
                .pages_to_shared
                .fetch_add(converted, Ordering::Relaxed);
        } else {
            self.counters
                .pages_to_private
                .fetch_add(converted, Ordering::Relaxed);
        }
        if stop < end {
            Counters::bump(&self.counters.map_gpa_retries);
            // Resume point in the encoding of R12 (KVM: R11 = map_gpa_next).
            vmm.r11 = stop | if to_shared { shared_bit } else { 0 };
            return RETRY;
        }
        SUCCESS
    }

    /// Converts `[start, stop)` (TD memory, no shared bit) to shared or to
    /// private: holds every page (in ascending order, waiting), unmaps the
    /// alias of each page that changes, flushes once, then to shared zeroes
    /// and maps the shared alias; to private the page is pending until
    /// ACCEPT. Pages already in the target attribute are left alone. Returns
    /// how many pages changed.
    fn convert(&self, start: u64, stop: u64, to_shared: bool, backing: &impl Backing) -> u64 {
        let changes = |state: PageState| {
            if to_shared {
                state != PageState::Shared
            } else {
                state == PageState::Shared
            }
        };
        let mut page = start;
        let mut changed = 0;
        while page < stop {
            if let Some(slot) = self.slot(page) {
                if changes(Self::hold(slot)) {
                    backing.set_mapping(page, PageState::Pending);
                    changed += 1;
                }
            }
            page += PAGE;
        }
        if changed > 0 {
            backing.flush_nested_tlbs();
        }
        let mut page = start;
        while page < stop {
            if let Some(slot) = self.slot(page) {
                // Still the old state: held pages are not changed by others.
                let old = PageState::from_byte(slot.load(Ordering::SeqCst));
                if !changes(old) {
                    Self::release_unchanged(slot);
                } else if to_shared {
                    backing.zero_page(page);
                    backing.set_mapping(page, PageState::Shared);
                    Self::release(slot, PageState::Shared);
                } else {
                    Self::release(slot, PageState::Pending);
                }
            }
            page += PAGE;
        }
        changed
    }
}

#[cfg(test)]
#[path = "model_tests.rs"]
mod tests;
