//! Test doubles: [`FakeTdxModule`], a scripted model of the TDX module and the VMM behind it.
//!
//! It keeps a per-4K-page state (private / pending / shared), answers every leaf and
//! sub-function this crate issues, can be told to misbehave in the ways real VMMs and TDX
//! modules do (RETRY, stuck or bogus R11, busy, size mismatch, failures), and logs every call.
//! Only built for tests or with the `sim` feature; uses std.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::{
    leaf, status, subfn, AcceptSize, CpuidResult, Gpa, TdCall, TdcallRegs, VeInfo, VmcallStatus,
    VpInfo, PAGE_SIZE,
};

/// The GHCI-standard TDVMCALL register bitmap (R10..R15) the fake insists on.
const EXPOSE_R10_R15: u64 = 0xFC00;

/// State of one 4 KiB page of guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageState {
    /// Private and accepted: usable through the private alias.
    Private,
    /// Private but not accepted (after MapGPA to private): needs ACCEPT.
    Pending,
    /// Shared with the VMM: usable through the shared alias.
    Shared,
}

/// One TDCALL as the fake decoded it. Register values are kept raw so marshalling bugs show.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    /// TDG.VP.INFO.
    VpInfo,
    /// TDG.VP.VEINFO.GET.
    VeinfoGet,
    /// TDG.MEM.PAGE.ACCEPT with a valid level.
    Accept {
        /// RCX with the level bits cleared.
        gpa: Gpa,
        /// Decoded level.
        size: AcceptSize,
    },
    /// TDG.MEM.PAGE.ACCEPT with a reserved level or reserved RCX bits set.
    BadAccept {
        /// Raw RCX.
        rcx: u64,
    },
    /// TDVMCALL MapGPA.
    MapGpa {
        /// Start GPA, with the shared bit when converting to shared.
        r12: u64,
        /// Size.
        r13: u64,
    },
    /// TDVMCALL CPUID.
    Cpuid {
        /// R12.
        leaf: u64,
        /// R13.
        subleaf: u64,
    },
    /// TDVMCALL HLT.
    Hlt {
        /// R12.
        interrupts_blocked: u64,
    },
    /// TDVMCALL IO, direction read.
    IoRead {
        /// R12.
        size: u64,
        /// R14.
        port: u64,
    },
    /// TDVMCALL IO, direction write.
    IoWrite {
        /// R12.
        size: u64,
        /// R14.
        port: u64,
        /// R15.
        value: u64,
    },
    /// TDVMCALL RDMSR.
    Rdmsr {
        /// R12.
        msr: u64,
    },
    /// TDVMCALL WRMSR.
    Wrmsr {
        /// R12.
        msr: u64,
        /// R13.
        value: u64,
    },
    /// TDVMCALL #VE.RequestMMIO, read.
    MmioRead {
        /// R12.
        size: u64,
        /// R14.
        addr: u64,
    },
    /// TDVMCALL #VE.RequestMMIO, write.
    MmioWrite {
        /// R12.
        size: u64,
        /// R14.
        addr: u64,
        /// R15.
        value: u64,
    },
    /// TDVMCALL ReportFatalError.
    ReportFatalError {
        /// R12.
        code: u64,
        /// R13.
        data: u64,
    },
    /// TDVMCALL that is not GHCI-standard (RCX != 0xFC00 or R10 != 0), or an IO/MMIO request
    /// whose direction (R13) is neither 0 nor 1.
    BadVmcall {
        /// RCX.
        rcx: u64,
        /// R10.
        r10: u64,
        /// R11.
        r11: u64,
    },
    /// TDVMCALL with an unknown sub-function (answered SUBFUNC_UNSUPPORTED).
    UnknownVmcall {
        /// R11.
        subfunction: u64,
    },
    /// Unknown leaf (answered TDX_OPERAND_INVALID).
    UnknownLeaf {
        /// RAX.
        rax: u64,
    },
}

/// A scripted answer to the next MapGPA call, consumed one per call (see
/// [`FakeTdxModule::script_map_replies`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapReply {
    /// Behave as configured (retry_every, fail_map_at, ...).
    Normal,
    /// Convert nothing; answer RETRY with exactly this R11.
    Retry {
        /// Raw R11 to return.
        r11: u64,
    },
    /// Convert `[request start, up_to)` (plain GPAs, clipped to the request and memory), then
    /// answer RETRY with exactly this R11.
    ConvertThenRetry {
        /// End of the converted prefix (no shared bit).
        up_to: u64,
        /// Raw R11 to return.
        r11: u64,
    },
    /// Convert nothing; answer with this raw TDVMCALL status (R10).
    Status(u64),
}

/// Counters kept by the fake.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// All TDCALLs.
    pub tdcalls: u64,
    /// TDG.VP.INFO calls.
    pub vp_info: u64,
    /// TDG.VP.VEINFO.GET calls.
    pub veinfo_get: u64,
    /// ACCEPT calls (any outcome).
    pub accept_calls: u64,
    /// Successful 4K ACCEPTs.
    pub accepted_4k: u64,
    /// Successful 2M ACCEPTs.
    pub accepted_2m: u64,
    /// Successful 1G ACCEPTs.
    pub accepted_1g: u64,
    /// ACCEPTs answered OPERAND_BUSY.
    pub accept_busy: u64,
    /// ACCEPTs answered PAGE_SIZE_MISMATCH.
    pub accept_size_mismatch: u64,
    /// TDG.VP.VMCALL calls (any sub-function).
    pub vmcalls: u64,
    /// MapGPA calls.
    pub map_gpa_calls: u64,
    /// MapGPA calls answered RETRY.
    pub map_gpa_retries: u64,
}

type CallHook = Arc<dyn Fn(&TdcallRegs) + Send + Sync>;
type R11Override = Box<dyn Fn(u64) -> u64 + Send + Sync>;

struct Inner {
    gpaw: u8,
    attributes: u64,
    num_vcpus: u32,
    max_vcpus: u32,
    vcpu_index: u32,
    veinfo: VeInfo,
    pages: Vec<PageState>,

    max_accept: AcceptSize,
    busy_remaining: u32,
    accept_failures: Vec<(u64, u64)>,

    retry_every: u64,
    r11_carries_shared_bit: bool,
    r11_override: Option<R11Override>,
    map_script: VecDeque<MapReply>,
    map_failures: Vec<(u64, u64)>,

    leaf_failures: HashMap<u64, u64>,
    vmcall_failures: HashMap<u64, u64>,
    cpuid: HashMap<(u64, u64), CpuidResult>,
    msrs: HashMap<u64, u64>,
    io_ports: HashMap<u64, u64>,
    mmio: HashMap<u64, u64>,

    calls: Vec<Call>,
    regs_in: Vec<TdcallRegs>,
    counters: Counters,
}

/// Scripted fake of the TDX module and the VMM, implementing [`TdCall`].
///
/// All memory `[0, mem_bytes)` starts [`PageState::Private`]. Interior mutability through a
/// mutex, so it is `Send + Sync` and usable from several threads (vCPUs).
pub struct FakeTdxModule {
    inner: Mutex<Inner>,
    hook: Mutex<Option<CallHook>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not turn every later call into a second panic.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn mask_for_size(size: u64) -> u64 {
    match size {
        1 => 0xff,
        2 => 0xffff,
        4 => 0xffff_ffff,
        _ => u64::MAX,
    }
}

impl FakeTdxModule {
    /// A TD with GPA width `gpaw` (shared bit `1 << (gpaw - 1)`) and `mem_bytes` of memory
    /// (rounded down to 4 KiB pages), all private. One vCPU (num = max = 1, index 0).
    ///
    /// Page state costs one byte per 4 KiB page (256 KiB per GiB of modelled memory).
    pub fn new(gpaw: u8, mem_bytes: u64) -> Self {
        let pages = usize::try_from(mem_bytes / PAGE_SIZE).unwrap_or(usize::MAX);
        FakeTdxModule {
            inner: Mutex::new(Inner {
                gpaw,
                attributes: 0,
                num_vcpus: 1,
                max_vcpus: 1,
                vcpu_index: 0,
                veinfo: VeInfo::default(),
                pages: vec![PageState::Private; pages],
                max_accept: AcceptSize::Size1G,
                busy_remaining: 0,
                accept_failures: Vec::new(),
                retry_every: 0,
                r11_carries_shared_bit: true,
                r11_override: None,
                map_script: VecDeque::new(),
                map_failures: Vec::new(),
                leaf_failures: HashMap::new(),
                vmcall_failures: HashMap::new(),
                cpuid: HashMap::new(),
                msrs: HashMap::new(),
                io_ports: HashMap::new(),
                mmio: HashMap::new(),
                calls: Vec::new(),
                regs_in: Vec::new(),
                counters: Counters::default(),
            }),
            hook: Mutex::new(None),
        }
    }

    /// The shared bit this fake uses (`1 << (gpaw - 1)`, 0 if gpaw is not 32..=52).
    pub fn shared_bit(&self) -> u64 {
        lock(&self.inner).shared_bit()
    }

    // ----- page state -----

    /// State of the page holding `gpa`, or `None` outside the modelled memory.
    pub fn try_state(&self, gpa: Gpa) -> Option<PageState> {
        let inner = lock(&self.inner);
        let idx = usize::try_from(gpa.0 / PAGE_SIZE).ok()?;
        inner.pages.get(idx).copied()
    }

    /// State of the page holding `gpa`. Addresses outside the modelled memory report
    /// [`PageState::Private`] (never mapped, never convertible); use
    /// [`FakeTdxModule::try_state`] to tell.
    pub fn state(&self, gpa: Gpa) -> PageState {
        self.try_state(gpa).unwrap_or(PageState::Private)
    }

    /// Sets every page overlapping `range` to `state` (pages outside memory are ignored).
    pub fn set_state(&self, range: Range<Gpa>, state: PageState) {
        let mut inner = lock(&self.inner);
        for p in inner.page_slice_mut(range.start.0, range.end.0) {
            *p = state;
        }
    }

    /// Number of pages overlapping `range` that are in `state`.
    pub fn count_state(&self, range: Range<Gpa>, state: PageState) -> u64 {
        let mut inner = lock(&self.inner);
        inner
            .page_slice_mut(range.start.0, range.end.0)
            .iter()
            .filter(|p| **p == state)
            .count() as u64
    }

    /// Whether every page overlapping `range` exists and is in `state`.
    pub fn all_in_state(&self, range: Range<Gpa>, state: PageState) -> bool {
        let pages = (range.end.0.div_ceil(PAGE_SIZE)).saturating_sub(range.start.0 / PAGE_SIZE);
        self.count_state(range, state) == pages
    }

    // ----- VP.INFO / VEINFO -----

    /// Changes the GPA width VP.INFO reports (and the shared bit MapGPA recognises).
    pub fn set_gpaw(&self, gpaw: u8) {
        lock(&self.inner).gpaw = gpaw;
    }

    /// vCPU counts VP.INFO reports.
    pub fn set_vcpus(&self, num_vcpus: u32, max_vcpus: u32, vcpu_index: u32) {
        let mut inner = lock(&self.inner);
        inner.num_vcpus = num_vcpus;
        inner.max_vcpus = max_vcpus;
        inner.vcpu_index = vcpu_index;
    }

    /// TD attributes VP.INFO reports.
    pub fn set_attributes(&self, attributes: u64) {
        lock(&self.inner).attributes = attributes;
    }

    /// Latches the #VE information VEINFO.GET returns (every call returns it; the fake does not
    /// model the "valid" flag the real module clears).
    pub fn set_veinfo(&self, veinfo: VeInfo) {
        lock(&self.inner).veinfo = veinfo;
    }

    // ----- ACCEPT options -----

    /// ACCEPTs larger than `size` answer PAGE_SIZE_MISMATCH (as if the secure EPT mapped
    /// memory at most at `size`).
    pub fn refuse_sizes_above(&self, size: AcceptSize) {
        lock(&self.inner).max_accept = size;
    }

    /// The next `n` ACCEPTs answer OPERAND_BUSY (before anything else is checked).
    pub fn busy_next(&self, n: u32) {
        lock(&self.inner).busy_remaining = n;
    }

    /// Every ACCEPT whose block contains `gpa` answers the raw `status` (persistently).
    pub fn fail_accept_at(&self, gpa: Gpa, status: u64) {
        lock(&self.inner).accept_failures.push((gpa.0, status));
    }

    // ----- MapGPA options -----

    /// Each MapGPA converts at most `bytes` (rounded down to 4 KiB, at least 4 KiB) from its
    /// start and answers RETRY with R11 = where it stopped, like KVM's 64 MiB chunks.
    /// 0 disables (default).
    pub fn retry_every(&self, bytes: u64) {
        let chunk = if bytes == 0 {
            0
        } else {
            (bytes & !(PAGE_SIZE - 1)).max(PAGE_SIZE)
        };
        lock(&self.inner).retry_every = chunk;
    }

    /// Whether the R11 of a RETRY to shared carries the shared bit (default `true`, as
    /// QEMU/KVM echo R12's encoding). R11 of a RETRY to private never carries it.
    pub fn r11_carries_shared_bit(&self, carries: bool) {
        lock(&self.inner).r11_carries_shared_bit = carries;
    }

    /// Rewrites the R11 of every normal RETRY: `f(natural_r11)` is returned instead. The
    /// conversion itself still covers the natural prefix.
    pub fn r11_override(&self, f: impl Fn(u64) -> u64 + Send + Sync + 'static) {
        lock(&self.inner).r11_override = Some(Box::new(f));
    }

    /// Queues scripted answers, consumed one per MapGPA call before normal behaviour.
    pub fn script_map_replies(&self, replies: impl IntoIterator<Item = MapReply>) {
        lock(&self.inner).map_script.extend(replies);
    }

    /// A MapGPA whose (chunk of) range contains `gpa` converts `[start, gpa)` (gpa rounded
    /// down to 4 KiB) and answers the raw TDVMCALL `status`, persistently.
    ///
    /// When a [`FakeTdxModule::retry_every`] chunk ends exactly at `gpa`, that call is a normal
    /// RETRY (the chunk does not contain `gpa`) and the next call fails having converted
    /// nothing, like a VMM that fails at the first page it touches.
    pub fn fail_map_at(&self, gpa: Gpa, status: u64) {
        lock(&self.inner).map_failures.push((gpa.0, status));
    }

    // ----- other leaves -----

    /// TDCALL `leaf` answers RAX = `status` without doing anything (TDX-module failure).
    pub fn fail_leaf(&self, leaf: u64, status: u64) {
        lock(&self.inner).leaf_failures.insert(leaf, status);
    }

    /// TDVMCALL `subfunction` answers R10 = `status` without doing anything (VMM failure).
    pub fn fail_vmcall(&self, subfunction: u64, status: u64) {
        lock(&self.inner)
            .vmcall_failures
            .insert(subfunction, status);
    }

    /// CPUID answer for (`leaf`, `subleaf`); unknown leaves answer all zeros.
    pub fn set_cpuid(&self, leaf: u32, subleaf: u32, result: CpuidResult) {
        lock(&self.inner)
            .cpuid
            .insert((leaf.into(), subleaf.into()), result);
    }

    /// Value of an MSR; RDMSR of an MSR never set or written answers INVALID_OPERAND.
    pub fn set_msr(&self, msr: u32, value: u64) {
        lock(&self.inner).msrs.insert(msr.into(), value);
    }

    /// Current value of an MSR (set or written by WRMSR).
    pub fn msr(&self, msr: u32) -> Option<u64> {
        lock(&self.inner).msrs.get(&u64::from(msr)).copied()
    }

    /// Value port reads return (masked to the width); unknown ports read as all ones, like an
    /// empty bus. Port writes store the value here.
    pub fn set_io_port(&self, port: u16, value: u32) {
        lock(&self.inner).io_ports.insert(port.into(), value.into());
    }

    /// Last value written to / set for a port.
    pub fn io_port(&self, port: u16) -> Option<u64> {
        lock(&self.inner).io_ports.get(&u64::from(port)).copied()
    }

    /// Value MMIO reads at `addr` return (masked to the width); unknown addresses read 0.
    /// MMIO writes store the value here.
    pub fn set_mmio(&self, addr: u64, value: u64) {
        lock(&self.inner).mmio.insert(addr, value);
    }

    /// Last value written to / set for an MMIO address.
    pub fn mmio(&self, addr: u64) -> Option<u64> {
        lock(&self.inner).mmio.get(&addr).copied()
    }

    // ----- observation -----

    /// Every call so far, decoded, in order.
    pub fn calls(&self) -> Vec<Call> {
        lock(&self.inner).calls.clone()
    }

    /// The input register file of every call so far, in order.
    pub fn regs_log(&self) -> Vec<TdcallRegs> {
        lock(&self.inner).regs_in.clone()
    }

    /// Counters so far.
    pub fn counters(&self) -> Counters {
        lock(&self.inner).counters
    }

    /// Forgets the call log and counters (page state and options are kept).
    pub fn clear_log(&self) {
        let mut inner = lock(&self.inner);
        inner.calls.clear();
        inner.regs_in.clear();
        inner.counters = Counters::default();
    }

    /// Installs `hook`, called at the start of every TDCALL with the input registers, BEFORE
    /// the fake acts and with no lock of the fake held (so it may call back into the fake, or
    /// block, e.g. as a scheduling point of a model checker). Replaces any previous hook.
    pub fn set_call_hook(&self, hook: Box<dyn Fn(&TdcallRegs) + Send + Sync>) {
        *lock(&self.hook) = Some(Arc::from(hook));
    }

    /// Removes the call hook.
    pub fn clear_call_hook(&self) {
        *lock(&self.hook) = None;
    }
}

impl Inner {
    fn shared_bit(&self) -> u64 {
        VpInfo {
            gpaw: self.gpaw,
            attributes: 0,
            num_vcpus: 0,
            max_vcpus: 0,
            vcpu_index: 0,
        }
        .shared_bit()
    }

    /// Pages overlapping `[start, end)`, clipped to memory.
    fn page_slice_mut(&mut self, start: u64, end: u64) -> &mut [PageState] {
        let n = self.pages.len();
        let first = usize::try_from(start / PAGE_SIZE).unwrap_or(n).min(n);
        let last = usize::try_from(end.div_ceil(PAGE_SIZE))
            .unwrap_or(n)
            .min(n)
            .max(first);
        self.pages.get_mut(first..last).unwrap_or_default()
    }

    /// Whether `[start, end)` lies entirely inside memory.
    fn in_memory(&self, start: u64, end: u64) -> bool {
        let mem = (self.pages.len() as u64).saturating_mul(PAGE_SIZE);
        start <= end && end <= mem
    }

    fn handle(&mut self, regs: &mut TdcallRegs) {
        self.counters.tdcalls += 1;
        self.regs_in.push(*regs);
        let call = decode(regs);
        self.calls.push(call);
        if let Some(&st) = self.leaf_failures.get(&regs.rax) {
            regs.rax = st;
            return;
        }
        match call {
            Call::VpInfo => {
                self.counters.vp_info += 1;
                regs.rax = 0;
                regs.rcx = self.gpaw.into();
                regs.rdx = self.attributes;
                regs.r8 = u64::from(self.num_vcpus) | (u64::from(self.max_vcpus) << 32);
                regs.r9 = self.vcpu_index.into();
            }
            Call::VeinfoGet => {
                self.counters.veinfo_get += 1;
                let ve = self.veinfo;
                regs.rax = 0;
                regs.rcx = ve.exit_reason.into();
                regs.rdx = ve.exit_qualification;
                regs.r8 = ve.guest_linear_address;
                regs.r9 = ve.guest_physical_address;
                regs.r10 =
                    u64::from(ve.instruction_length) | (u64::from(ve.instruction_info) << 32);
            }
            Call::Accept { gpa, size } => {
                self.counters.accept_calls += 1;
                regs.rax = self.accept(gpa.0, size);
            }
            Call::BadAccept { .. } => {
                self.counters.accept_calls += 1;
                regs.rax = status::TDX_OPERAND_INVALID;
            }
            Call::UnknownLeaf { .. } | Call::BadVmcall { .. } => {
                regs.rax = status::TDX_OPERAND_INVALID;
            }
            _ => {
                // Every remaining variant is a well-formed TDVMCALL.
                self.counters.vmcalls += 1;
                regs.rax = 0;
                let (r10, r11) = match self.vmcall_failures.get(&regs.r11) {
                    Some(&st) => (st, 0),
                    None => self.vmcall(call, regs),
                };
                regs.r10 = r10;
                regs.r11 = r11;
            }
        }
    }

    fn accept(&mut self, gpa: u64, size: AcceptSize) -> u64 {
        if self.busy_remaining > 0 {
            self.busy_remaining -= 1;
            self.counters.accept_busy += 1;
            return status::TDX_OPERAND_BUSY;
        }
        let bytes = size.bytes();
        let end = match gpa.checked_add(bytes) {
            Some(end) if Gpa(gpa).is_aligned(bytes) && self.in_memory(gpa, end) => end,
            _ => return status::TDX_OPERAND_INVALID,
        };
        if let Some(&(_, st)) = self
            .accept_failures
            .iter()
            .find(|(at, _)| (gpa..end).contains(at))
        {
            return st;
        }
        if bytes > self.max_accept.bytes() {
            self.counters.accept_size_mismatch += 1;
            return status::TDX_PAGE_SIZE_MISMATCH;
        }
        let pages = self.page_slice_mut(gpa, end);
        let pending = pages.iter().filter(|p| **p == PageState::Pending).count();
        if pending == 0 {
            return status::TDX_PAGE_ALREADY_ACCEPTED;
        }
        if pending != pages.len() {
            // Partly pending: the real secure EPT would map this block as smaller pages.
            self.counters.accept_size_mismatch += 1;
            return status::TDX_PAGE_SIZE_MISMATCH;
        }
        pages.fill(PageState::Private);
        let counter = match size {
            AcceptSize::Size4K => &mut self.counters.accepted_4k,
            AcceptSize::Size2M => &mut self.counters.accepted_2m,
            AcceptSize::Size1G => &mut self.counters.accepted_1g,
        };
        *counter += 1;
        status::TDX_SUCCESS
    }

    /// Answers a well-formed TDVMCALL: returns (R10, R11); may write R12..R15.
    fn vmcall(&mut self, call: Call, regs: &mut TdcallRegs) -> (u64, u64) {
        const OK: u64 = 0;
        let invalid = VmcallStatus::InvalidOperand.raw();
        match call {
            Call::MapGpa { r12, r13 } => self.map_gpa(r12, r13),
            Call::Cpuid { leaf, subleaf } => {
                let r = self
                    .cpuid
                    .get(&(leaf, subleaf))
                    .copied()
                    .unwrap_or_default();
                regs.r12 = r.eax.into();
                regs.r13 = r.ebx.into();
                regs.r14 = r.ecx.into();
                regs.r15 = r.edx.into();
                (OK, 0)
            }
            Call::Hlt { .. } | Call::ReportFatalError { .. } => (OK, 0),
            Call::IoRead { size, port } => {
                let v = self.io_ports.get(&port).copied().unwrap_or(u64::MAX);
                (OK, v & mask_for_size(size))
            }
            Call::IoWrite { size, port, value } => {
                self.io_ports.insert(port, value & mask_for_size(size));
                (OK, 0)
            }
            Call::Rdmsr { msr } => match self.msrs.get(&msr) {
                Some(&v) => (OK, v),
                None => (invalid, 0),
            },
            Call::Wrmsr { msr, value } => {
                self.msrs.insert(msr, value);
                (OK, 0)
            }
            Call::MmioRead { size, addr } => {
                let v = self.mmio.get(&addr).copied().unwrap_or(0);
                (OK, v & mask_for_size(size))
            }
            Call::MmioWrite { size, addr, value } => {
                self.mmio.insert(addr, value & mask_for_size(size));
                (OK, 0)
            }
            _ => (VmcallStatus::SubfuncUnsupported.raw(), 0),
        }
    }

    /// Converts the pages of `[start, end)` (clipped to memory) to the target state.
    fn convert(&mut self, start: u64, end: u64, shared: bool) {
        let state = if shared {
            PageState::Shared
        } else {
            PageState::Pending
        };
        self.page_slice_mut(start, end).fill(state);
    }

    fn map_gpa(&mut self, r12: u64, r13: u64) -> (u64, u64) {
        const RETRY: u64 = 1;
        self.counters.map_gpa_calls += 1;
        let sb = self.shared_bit();
        let shared = sb != 0 && r12 & sb != 0;
        let start = r12 & !sb;

        match self.map_script.pop_front().unwrap_or(MapReply::Normal) {
            MapReply::Normal => {}
            MapReply::Retry { r11 } => {
                self.counters.map_gpa_retries += 1;
                return (RETRY, r11);
            }
            MapReply::ConvertThenRetry { up_to, r11 } => {
                let stop = up_to.min(start.saturating_add(r13));
                self.convert(start, stop, shared);
                self.counters.map_gpa_retries += 1;
                return (RETRY, r11);
            }
            MapReply::Status(st) => return (st, 0),
        }

        if start & (PAGE_SIZE - 1) != 0 || r13 & (PAGE_SIZE - 1) != 0 {
            return (VmcallStatus::AlignError.raw(), 0);
        }
        let end = match start.checked_add(r13) {
            Some(end) if r13 != 0 && self.in_memory(start, end) => end,
            _ => return (VmcallStatus::InvalidOperand.raw(), 0),
        };
        let chunk_end = if self.retry_every == 0 {
            end
        } else {
            start.saturating_add(self.retry_every).min(end)
        };
        let failure = self
            .map_failures
            .iter()
            .filter(|(at, _)| (start..chunk_end).contains(at))
            .min_by_key(|(at, _)| *at)
            .copied();
        if let Some((at, st)) = failure {
            self.convert(start, at & !(PAGE_SIZE - 1), shared);
            return (st, 0);
        }
        self.convert(start, chunk_end, shared);
        if chunk_end == end {
            return (0, 0);
        }
        self.counters.map_gpa_retries += 1;
        let natural = if shared && self.r11_carries_shared_bit {
            chunk_end | sb
        } else {
            chunk_end
        };
        let r11 = match &self.r11_override {
            Some(f) => f(natural),
            None => natural,
        };
        (RETRY, r11)
    }
}

fn decode(regs: &TdcallRegs) -> Call {
    match regs.rax {
        leaf::TDG_VP_VMCALL => decode_vmcall(regs),
        leaf::TDG_VP_INFO => Call::VpInfo,
        leaf::TDG_VP_VEINFO_GET => Call::VeinfoGet,
        leaf::TDG_MEM_PAGE_ACCEPT => {
            // RCX[2:0] = level, RCX[11:3] reserved, the rest is the GPA.
            match AcceptSize::from_level(regs.rcx & 7) {
                Some(size) if regs.rcx & 0xff8 == 0 => Call::Accept {
                    gpa: Gpa(regs.rcx & !(PAGE_SIZE - 1)),
                    size,
                },
                _ => Call::BadAccept { rcx: regs.rcx },
            }
        }
        rax => Call::UnknownLeaf { rax },
    }
}

fn decode_vmcall(regs: &TdcallRegs) -> Call {
    let bad = Call::BadVmcall {
        rcx: regs.rcx,
        r10: regs.r10,
        r11: regs.r11,
    };
    if regs.rcx != EXPOSE_R10_R15 || regs.r10 != 0 {
        return bad;
    }
    match (regs.r11, regs.r13) {
        (subfn::MAP_GPA, _) => Call::MapGpa {
            r12: regs.r12,
            r13: regs.r13,
        },
        (subfn::CPUID, _) => Call::Cpuid {
            leaf: regs.r12,
            subleaf: regs.r13,
        },
        (subfn::HLT, _) => Call::Hlt {
            interrupts_blocked: regs.r12,
        },
        (subfn::IO, 0) => Call::IoRead {
            size: regs.r12,
            port: regs.r14,
        },
        (subfn::IO, 1) => Call::IoWrite {
            size: regs.r12,
            port: regs.r14,
            value: regs.r15,
        },
        (subfn::RDMSR, _) => Call::Rdmsr { msr: regs.r12 },
        (subfn::WRMSR, _) => Call::Wrmsr {
            msr: regs.r12,
            value: regs.r13,
        },
        (subfn::REQUEST_MMIO, 0) => Call::MmioRead {
            size: regs.r12,
            addr: regs.r14,
        },
        (subfn::REQUEST_MMIO, 1) => Call::MmioWrite {
            size: regs.r12,
            addr: regs.r14,
            value: regs.r15,
        },
        (subfn::REPORT_FATAL_ERROR, _) => Call::ReportFatalError {
            code: regs.r12,
            data: regs.r13,
        },
        (subfn::IO | subfn::REQUEST_MMIO, _) => bad,
        (subfunction, _) => Call::UnknownVmcall { subfunction },
    }
}

impl TdCall for FakeTdxModule {
    fn tdcall(&self, regs: &mut TdcallRegs) {
        // Clone the hook out so no lock is held while it runs.
        let hook = lock(&self.hook).clone();
        if let Some(hook) = hook {
            hook(regs);
        }
        lock(&self.inner).handle(regs);
    }
}

impl core::fmt::Debug for FakeTdxModule {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let inner = lock(&self.inner);
        f.debug_struct("FakeTdxModule")
            .field("gpaw", &inner.gpaw)
            .field("pages", &inner.pages.len())
            .field("counters", &inner.counters)
            .finish_non_exhaustive()
    }
}

/// Lets one fake module be shared by a platform under test and the test
/// that inspects it.
impl<T: TdCall + ?Sized> TdCall for std::sync::Arc<T> {
    fn tdcall(&self, regs: &mut TdcallRegs) {
        (**self).tdcall(regs)
    }
}
