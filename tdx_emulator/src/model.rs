//! Per-4K page state, TDCALL semantics, #VE decisions and counters.

use core::sync::atomic::{AtomicU64, Ordering};
pub use tdx_hypercall::ve::exit_reason;
pub use tdx_hypercall::VeInfo;
use tdx_hypercall::{leaf, status, subfn, TdcallRegs};

/// State of one 4K page of TD memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum PageState {
    /// Private and accepted: reachable through the private alias only.
    Private = 0,
    /// Private, not accepted yet (after MapGPA to private, or strict boot).
    Pending = 1,
    /// Shared: reachable through the shared alias only.
    Shared = 2,
}

impl PageState {
    fn from_u8(value: u8) -> PageState {
        match value {
            1 => PageState::Pending,
            2 => PageState::Shared,
            _ => PageState::Private,
        }
    }
}

/// What the model needs from the machine: the nested page tables and the
/// TD's memory. The emulator implements it over SVM nested paging; tests
/// implement it over arrays.
pub trait Backing {
    /// Makes the nested tables match `state` for the page at `gpa` (private
    /// alias present only for `Private`, shared alias only for `Shared`).
    fn set_mapping(&self, gpa: u64, state: PageState);
    /// Zeroes the page at `gpa` (private->shared drops contents, ACCEPT
    /// zeroes).
    fn zero_page(&self, gpa: u64);
    /// Every vCPU must drop cached nested translations before it next runs
    /// guest code (and running ones must be interrupted to do so).
    fn flush_nested_tlbs(&self);
}

/// Behaviour switches, from the emulator's command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Options {
    /// Strict: RAM outside the launch image starts pending, and port IO,
    /// CPUID, MSRs and HLT raise #VE as on a real TDX module.
    pub strict: bool,
    /// MapGPA converts one page per call and answers RETRY (as the public
    /// QEMU TDX model does), so the guest's resume logic is exercised.
    pub map_gpa_retry_every_page: bool,
    /// ACCEPT at 2M/1G answers PAGE_SIZE_MISMATCH.
    pub refuse_large_accept: bool,
}

/// Counters the harness reads at the end of a run.
pub struct Counters {
    /// #VE injected, by exit reason (index = reason, 0..64).
    pub ve_by_reason: [AtomicU64; 64],
    /// #VE escalated to #DF (a second #VE before VEINFO.GET).
    pub double_faults: AtomicU64,
    /// TDCALLs by leaf (0..8).
    pub tdcalls_by_leaf: [AtomicU64; 8],
    pub map_gpa_calls: AtomicU64,
    pub map_gpa_retries: AtomicU64,
    /// Pages converted by MapGPA to shared and to private.
    pub pages_to_shared: AtomicU64,
    pub pages_to_private: AtomicU64,
    /// Successful ACCEPTs at 4K, 2M, 1G.
    pub accepts: [AtomicU64; 3],
    pub accept_size_mismatches: AtomicU64,
    /// IPIs delivered between vCPUs.
    pub ipis: AtomicU64,
    /// Nested page faults taken.
    pub nested_page_faults: AtomicU64,
}

impl Counters {
    pub const fn new() -> Self {
        Counters {
            ve_by_reason: [const { AtomicU64::new(0) }; 64],
            double_faults: AtomicU64::new(0),
            tdcalls_by_leaf: [const { AtomicU64::new(0) }; 8],
            map_gpa_calls: AtomicU64::new(0),
            map_gpa_retries: AtomicU64::new(0),
            pages_to_shared: AtomicU64::new(0),
            pages_to_private: AtomicU64::new(0),
            accepts: [const { AtomicU64::new(0) }; 3],
            accept_size_mismatches: AtomicU64::new(0),
            ipis: AtomicU64::new(0),
            nested_page_faults: AtomicU64::new(0),
        }
    }

    pub fn ve(&self, reason: u32) -> u64 {
        self.ve_by_reason
            .get(reason as usize)
            .map_or(0, |c| c.load(Ordering::SeqCst))
    }

    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

impl Default for Counters {
    fn default() -> Self {
        Self::new()
    }
}

/// The TD: its memory's states and the options. Shared by all vCPUs; the
/// page states are atomics so a fault on one vCPU can read them while
/// another vCPU's MapGPA changes them (the caller serialises changes).
pub struct TdModel<'a> {
    states: &'a [core::sync::atomic::AtomicU8],
    gpaw: u8,
    vcpus: u32,
    options: Options,
    pub counters: &'a Counters,
}

/// Per-vCPU TDX state.
#[derive(Debug, Default)]
pub struct VcpuState {
    /// vCPU index (TDG.VP.INFO).
    pub index: u32,
    /// #VE info latched until TDG.VP.VEINFO.GET.
    pub ve_latched: Option<VeInfo>,
}

/// What the vCPU loop must do after a TDCALL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TdcallEffect {
    /// Resume after the instruction (RIP += 4).
    Resume,
    /// TDVMCALL HLT: resume after the instruction, then wait for an interrupt.
    Halt,
    /// TDVMCALL IO: the vCPU loop performs the port access, then resumes.
    Io {
        port: u16,
        size: u8,
        write: bool,
        value: u32,
    },
    /// TDVMCALL CPUID: the loop answers (it owns the CPUID policy).
    Cpuid {
        leaf: u32,
        subleaf: u32,
    },
    /// TDVMCALL RDMSR / WRMSR: the loop handles the MSR.
    Rdmsr {
        msr: u32,
    },
    Wrmsr {
        msr: u32,
        value: u64,
    },
    /// ReportFatalError: stop the TD.
    Fatal {
        code: u64,
    },
}

/// What to inject after a guest access that the nested tables refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultEffect {
    /// #VE (vector 20), info latched.
    VirtualizationException,
    /// A second #VE before VEINFO.GET: #DF.
    DoubleFault,
    /// Not TD memory at all: the TD is broken.
    OutsideMemory,
}

const PAGE: u64 = 4096;
const TDVMCALL_SUCCESS: u64 = 0;
const TDVMCALL_RETRY: u64 = 1;
const TDVMCALL_INVALID_OPERAND: u64 = 0x8000_0000_0000_0000;
const TDVMCALL_SUBFUNC_UNSUPPORTED: u64 = 0x8000_0000_0000_0003;
const TDX_OPERAND_INVALID: u64 = status::TDX_OPERAND_INVALID;

impl<'a> TdModel<'a> {
    /// A TD whose memory is `states.len()` pages from GPA 0.
    pub fn new(
        states: &'a [core::sync::atomic::AtomicU8],
        gpaw: u8,
        vcpus: u32,
        options: Options,
        counters: &'a Counters,
    ) -> Self {
        TdModel {
            states,
            gpaw,
            vcpus,
            options,
            counters,
        }
    }

    pub fn options(&self) -> Options {
        self.options
    }

    /// The shared bit (GPAW - 1).
    pub fn shared_bit(&self) -> u64 {
        1 << (self.gpaw - 1)
    }

    /// Bytes of TD memory.
    pub fn memory_bytes(&self) -> u64 {
        self.states.len() as u64 * PAGE
    }

    pub fn state(&self, gpa: u64) -> Option<PageState> {
        self.states
            .get((gpa / PAGE) as usize)
            .map(|s| PageState::from_u8(s.load(Ordering::SeqCst)))
    }

    fn set(&self, gpa: u64, state: PageState, backing: &impl Backing) {
        if let Some(slot) = self.states.get((gpa / PAGE) as usize) {
            slot.store(state as u8, Ordering::SeqCst);
            backing.set_mapping(gpa & !(PAGE - 1), state);
        }
    }

    /// Sets the initial state of `[start, end)` (boot: launch image
    /// accepted, the rest pending in strict mode).
    pub fn initialise(&self, start: u64, end: u64, state: PageState, backing: &impl Backing) {
        let mut gpa = start & !(PAGE - 1);
        while gpa < end {
            self.set(gpa, state, backing);
            gpa += PAGE;
        }
    }

    /// Decides what a nested page fault at `gpa` (as the guest put it on
    /// the bus, shared bit included) means, and latches #VE info.
    pub fn nested_fault(
        &self,
        vcpu: &mut VcpuState,
        gpa: u64,
        gla: u64,
        write: bool,
        fetch: bool,
    ) -> FaultEffect {
        Counters::bump(&self.counters.nested_page_faults);
        let page = gpa & !self.shared_bit();
        if page >= self.memory_bytes() || gpa >> self.gpaw != 0 {
            return FaultEffect::OutsideMemory;
        }
        // EPT-violation exit qualification: bit 0 read, 1 write, 2 fetch;
        // bits 3..5 (permissions of the translation) clear: not mapped.
        let qualification = if fetch {
            4
        } else if write {
            2
        } else {
            1
        };
        self.raise_ve(
            vcpu,
            VeInfo {
                exit_reason: exit_reason::EPT_VIOLATION,
                exit_qualification: qualification,
                guest_linear_address: gla,
                guest_physical_address: gpa,
                instruction_length: 0,
                instruction_info: 0,
            },
        )
    }

    /// Latches `info` and says whether to inject #VE or, if one is still
    /// latched, #DF.
    pub fn raise_ve(&self, vcpu: &mut VcpuState, info: VeInfo) -> FaultEffect {
        if vcpu.ve_latched.is_some() {
            Counters::bump(&self.counters.double_faults);
            return FaultEffect::DoubleFault;
        }
        if let Some(counter) = self.counters.ve_by_reason.get(info.exit_reason as usize) {
            Counters::bump(counter);
        }
        vcpu.ve_latched = Some(info);
        FaultEffect::VirtualizationException
    }

    /// Executes the TDCALL in `regs` for `vcpu`.
    pub fn tdcall(
        &self,
        vcpu: &mut VcpuState,
        regs: &mut TdcallRegs,
        backing: &impl Backing,
    ) -> TdcallEffect {
        if let Some(counter) = self.counters.tdcalls_by_leaf.get(regs.rax as usize) {
            Counters::bump(counter);
        }
        match regs.rax {
            leaf::TDG_VP_VMCALL => self.vmcall(regs, backing),
            leaf::TDG_VP_INFO => {
                regs.rax = 0;
                regs.rcx = u64::from(self.gpaw);
                regs.rdx = 0;
                regs.r8 = u64::from(self.vcpus) | (u64::from(self.vcpus) << 32);
                regs.r9 = u64::from(vcpu.index);
                regs.r10 = 0;
                regs.r11 = 0;
                TdcallEffect::Resume
            }
            leaf::TDG_VP_VEINFO_GET => {
                match vcpu.ve_latched.take() {
                    Some(info) => {
                        regs.rax = 0;
                        regs.rcx = u64::from(info.exit_reason);
                        regs.rdx = info.exit_qualification;
                        regs.r8 = info.guest_linear_address;
                        regs.r9 = info.guest_physical_address;
                        regs.r10 = u64::from(info.instruction_length)
                            | (u64::from(info.instruction_info) << 32);
                    }
                    // No valid #VE info.
                    None => regs.rax = TDX_OPERAND_INVALID,
                }
                TdcallEffect::Resume
            }
            leaf::TDG_MEM_PAGE_ACCEPT => {
                regs.rax = self.accept(regs.rcx, backing);
                TdcallEffect::Resume
            }
            _ => {
                regs.rax = TDX_OPERAND_INVALID;
                TdcallEffect::Resume
            }
        }
    }

    fn accept(&self, rcx: u64, backing: &impl Backing) -> u64 {
        let level = rcx & 7;
        let gpa = rcx & !0xfff;
        let size = match level {
            0 => PAGE,
            1 => 2 << 20,
            2 => 1 << 30,
            _ => return TDX_OPERAND_INVALID,
        };
        if gpa % size != 0
            || gpa
                .checked_add(size)
                .is_none_or(|end| end > self.memory_bytes())
        {
            return TDX_OPERAND_INVALID;
        }
        if level > 0 && self.options.refuse_large_accept {
            Counters::bump(&self.counters.accept_size_mismatches);
            return status::TDX_PAGE_SIZE_MISMATCH;
        }
        let pages = (gpa..gpa + size).step_by(PAGE as usize);
        let pending = pages
            .clone()
            .filter(|&p| self.state(p) == Some(PageState::Pending))
            .count() as u64;
        if pending == 0 {
            return status::TDX_PAGE_ALREADY_ACCEPTED;
        }
        if pending != size / PAGE {
            // Part of the block is mapped at 4K already: as a real secure
            // EPT would say, the size does not match.
            Counters::bump(&self.counters.accept_size_mismatches);
            return status::TDX_PAGE_SIZE_MISMATCH;
        }
        for page in pages {
            backing.zero_page(page);
            self.set(page, PageState::Private, backing);
        }
        Counters::bump(&self.counters.accepts[level as usize]);
        0
    }

    fn vmcall(&self, regs: &mut TdcallRegs, backing: &impl Backing) -> TdcallEffect {
        regs.rax = 0;
        let subfunction = regs.r11;
        let mut effect = TdcallEffect::Resume;
        let status = match subfunction {
            subfn::MAP_GPA => self.map_gpa(regs, backing),
            subfn::CPUID => {
                effect = TdcallEffect::Cpuid {
                    leaf: regs.r12 as u32,
                    subleaf: regs.r13 as u32,
                };
                TDVMCALL_SUCCESS
            }
            subfn::HLT => {
                effect = TdcallEffect::Halt;
                TDVMCALL_SUCCESS
            }
            subfn::IO => {
                let size = regs.r12 as u8;
                if !matches!(size, 1 | 2 | 4) || regs.r14 > 0xffff {
                    TDVMCALL_INVALID_OPERAND
                } else {
                    effect = TdcallEffect::Io {
                        port: regs.r14 as u16,
                        size,
                        write: regs.r13 == 1,
                        value: regs.r15 as u32,
                    };
                    TDVMCALL_SUCCESS
                }
            }
            subfn::RDMSR => {
                effect = TdcallEffect::Rdmsr {
                    msr: regs.r12 as u32,
                };
                TDVMCALL_SUCCESS
            }
            subfn::WRMSR => {
                effect = TdcallEffect::Wrmsr {
                    msr: regs.r12 as u32,
                    value: regs.r13,
                };
                TDVMCALL_SUCCESS
            }
            subfn::REPORT_FATAL_ERROR => {
                effect = TdcallEffect::Fatal { code: regs.r12 };
                TDVMCALL_SUCCESS
            }
            _ => TDVMCALL_SUBFUNC_UNSUPPORTED,
        };
        regs.r10 = status;
        effect
    }

    /// MapGPA: R12 = start (shared bit set: to shared), R13 = size.
    fn map_gpa(&self, regs: &mut TdcallRegs, backing: &impl Backing) -> u64 {
        Counters::bump(&self.counters.map_gpa_calls);
        let shared_bit = self.shared_bit();
        let to_shared = regs.r12 & shared_bit != 0;
        let start = regs.r12 & !shared_bit;
        let size = regs.r13;
        let end = match start.checked_add(size) {
            Some(end)
                if start % PAGE == 0
                    && size % PAGE == 0
                    && size > 0
                    && end <= self.memory_bytes() =>
            {
                end
            }
            _ => return TDVMCALL_INVALID_OPERAND,
        };
        let stop = if self.options.map_gpa_retry_every_page {
            start + PAGE
        } else {
            end
        };
        let mut gpa = start;
        while gpa < stop {
            if to_shared {
                // The private contents are gone for the host to see.
                backing.zero_page(gpa);
                self.set(gpa, PageState::Shared, backing);
                Counters::bump(&self.counters.pages_to_shared);
            } else {
                self.set(gpa, PageState::Pending, backing);
                Counters::bump(&self.counters.pages_to_private);
            }
            gpa += PAGE;
        }
        backing.flush_nested_tlbs();
        if stop < end {
            Counters::bump(&self.counters.map_gpa_retries);
            // Resume point in the encoding of R12, as QEMU/KVM do.
            regs.r11 = stop | if to_shared { shared_bit } else { 0 };
            return TDVMCALL_RETRY;
        }
        TDVMCALL_SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU8;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Fake {
        mappings: Mutex<Vec<(u64, PageState)>>,
        zeroed: Mutex<Vec<u64>>,
        flushes: AtomicU64,
    }

    impl Backing for Fake {
        fn set_mapping(&self, gpa: u64, state: PageState) {
            self.mappings.lock().unwrap().push((gpa, state));
        }
        fn zero_page(&self, gpa: u64) {
            self.zeroed.lock().unwrap().push(gpa);
        }
        fn flush_nested_tlbs(&self) {
            self.flushes.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn td(pages: usize) -> (Vec<AtomicU8>, Counters) {
        (
            (0..pages).map(|_| AtomicU8::new(0)).collect(),
            Counters::new(),
        )
    }

    fn vmcall_regs(subfunction: u64, r12: u64, r13: u64) -> TdcallRegs {
        TdcallRegs {
            rax: 0,
            rcx: 0xfc00,
            r11: subfunction,
            r12,
            r13,
            ..TdcallRegs::default()
        }
    }

    const S: u64 = 1 << 47;

    #[test]
    fn vp_info_reports_gpaw_and_vcpus() {
        let (states, counters) = td(16);
        let model = TdModel::new(&states, 48, 4, Options::default(), &counters);
        let mut vcpu = VcpuState {
            index: 2,
            ve_latched: None,
        };
        let mut regs = TdcallRegs {
            rax: 1,
            ..TdcallRegs::default()
        };
        assert_eq!(
            model.tdcall(&mut vcpu, &mut regs, &Fake::default()),
            TdcallEffect::Resume
        );
        assert_eq!(
            (regs.rax, regs.rcx, regs.r8, regs.r9),
            (0, 48, 4 | (4 << 32), 2)
        );
        // And the guest library parses it.
        assert_eq!(model.shared_bit(), S);
    }

    #[test]
    fn map_gpa_moves_states_zeroes_and_flushes() {
        let (states, counters) = td(16);
        let model = TdModel::new(&states, 48, 1, Options::default(), &counters);
        let fake = Fake::default();
        let mut vcpu = VcpuState::default();
        let mut regs = vmcall_regs(subfn::MAP_GPA, 0x2000 | S, 0x3000);
        model.tdcall(&mut vcpu, &mut regs, &fake);
        assert_eq!(regs.r10, 0);
        assert_eq!(model.state(0x1000), Some(PageState::Private));
        assert_eq!(model.state(0x2000), Some(PageState::Shared));
        assert_eq!(model.state(0x4000), Some(PageState::Shared));
        assert_eq!(model.state(0x5000), Some(PageState::Private));
        assert_eq!(*fake.zeroed.lock().unwrap(), vec![0x2000, 0x3000, 0x4000]);
        assert_eq!(fake.flushes.load(Ordering::SeqCst), 1);
        let mut regs = vmcall_regs(subfn::MAP_GPA, 0x3000, 0x1000);
        model.tdcall(&mut vcpu, &mut regs, &fake);
        assert_eq!(model.state(0x3000), Some(PageState::Pending));
        // ACCEPT makes it private again, zeroed; twice is ALREADY_ACCEPTED.
        let mut regs = TdcallRegs {
            rax: 6,
            rcx: 0x3000,
            ..TdcallRegs::default()
        };
        model.tdcall(&mut vcpu, &mut regs, &fake);
        assert_eq!(
            (regs.rax, model.state(0x3000)),
            (0, Some(PageState::Private))
        );
        model.tdcall(
            &mut vcpu,
            &mut TdcallRegs {
                rax: 6,
                rcx: 0x3000,
                ..TdcallRegs::default()
            },
            &fake,
        );
        let mut again = TdcallRegs {
            rax: 6,
            rcx: 0x3000,
            ..TdcallRegs::default()
        };
        model.tdcall(&mut vcpu, &mut again, &fake);
        assert_eq!(again.rax, status::TDX_PAGE_ALREADY_ACCEPTED);
        assert_eq!(counters.pages_to_shared.load(Ordering::SeqCst), 3);
        assert_eq!(counters.accepts[0].load(Ordering::SeqCst), 1);
    }

    #[test]
    fn map_gpa_retry_every_page_gives_resume_points_in_r12_encoding() {
        let options = Options {
            map_gpa_retry_every_page: true,
            ..Options::default()
        };
        let (states, counters) = td(16);
        let model = TdModel::new(&states, 48, 1, options, &counters);
        let fake = Fake::default();
        let mut regs = vmcall_regs(subfn::MAP_GPA, 0x4000 | S, 0x3000);
        model.tdcall(&mut VcpuState::default(), &mut regs, &fake);
        assert_eq!((regs.r10, regs.r11), (TDVMCALL_RETRY, 0x5000 | S));
        assert_eq!(model.state(0x5000), Some(PageState::Private));
        // The guest library copes: it converts the whole range.
        let tdcall = ModelCall {
            model: &model,
            fake: &fake,
        };
        let stats = tdx_hypercall::map_gpa(
            &tdcall,
            tdx_hypercall::Gpa(0x8000),
            0x3000,
            tdx_hypercall::MapTarget::Shared,
            S,
        )
        .unwrap();
        assert_eq!((stats.calls, stats.retries), (3, 2));
        assert!((0x8000..0xb000)
            .step_by(4096)
            .all(|p| model.state(p) == Some(PageState::Shared)));
    }

    struct ModelCall<'a> {
        model: &'a TdModel<'a>,
        fake: &'a Fake,
    }

    impl tdx_hypercall::TdCall for ModelCall<'_> {
        fn tdcall(&self, regs: &mut TdcallRegs) {
            self.model
                .tdcall(&mut VcpuState::default(), regs, self.fake);
        }
    }

    #[test]
    fn accept_range_from_the_guest_library_uses_2m_unless_refused() {
        for refuse in [false, true] {
            let options = Options {
                refuse_large_accept: refuse,
                ..Options::default()
            };
            let (states, counters) = td(2048);
            let model = TdModel::new(&states, 48, 1, options, &counters);
            let fake = Fake::default();
            model.initialise(0, 4 << 20, PageState::Pending, &fake);
            let tdcall = ModelCall {
                model: &model,
                fake: &fake,
            };
            let stats = tdx_hypercall::accept_range(
                &tdcall,
                tdx_hypercall::Gpa(0),
                tdx_hypercall::Gpa(4 << 20),
            )
            .unwrap();
            if refuse {
                assert_eq!((stats.accepted_2m, stats.accepted_4k), (0, 1024));
            } else {
                assert_eq!((stats.accepted_2m, stats.accepted_4k), (2, 0));
            }
            assert!((0..4 << 20)
                .step_by(4096)
                .all(|p| model.state(p) == Some(PageState::Private)));
        }
    }

    #[test]
    fn second_ve_before_veinfo_get_is_a_double_fault() {
        let (states, counters) = td(16);
        let model = TdModel::new(&states, 48, 1, Options::default(), &counters);
        let mut vcpu = VcpuState::default();
        assert_eq!(
            model.nested_fault(&mut vcpu, 0x3000 | S, 0xffff_8880_0000_3000, false, false),
            FaultEffect::VirtualizationException
        );
        assert_eq!(
            model.nested_fault(&mut vcpu, 0x4000, 0, true, false),
            FaultEffect::DoubleFault
        );
        let mut regs = TdcallRegs {
            rax: 3,
            ..TdcallRegs::default()
        };
        model.tdcall(&mut vcpu, &mut regs, &Fake::default());
        assert_eq!((regs.rax, regs.rcx, regs.r9), (0, 48, 0x3000 | S));
        assert_eq!(counters.ve(48), 1);
        assert_eq!(counters.double_faults.load(Ordering::SeqCst), 1);
        // Now the latch is free again; no info -> an error status.
        let mut none = TdcallRegs {
            rax: 3,
            ..TdcallRegs::default()
        };
        model.tdcall(&mut vcpu, &mut none, &Fake::default());
        assert_ne!(none.rax, 0);
        assert_eq!(
            model.nested_fault(&mut vcpu, 64 << 20, 0, false, false),
            FaultEffect::OutsideMemory
        );
    }

    #[test]
    fn bad_map_gpa_and_accept_operands_are_refused() {
        let (states, counters) = td(16);
        let model = TdModel::new(&states, 48, 1, Options::default(), &counters);
        let fake = Fake::default();
        for (r12, r13) in [
            (0x1001, 0x1000),
            (0x1000, 0),
            (0xf000, 0x2000),
            (0x7fff_ffff_f000, 0x2000),
        ] {
            let mut regs = vmcall_regs(subfn::MAP_GPA, r12, r13);
            model.tdcall(&mut VcpuState::default(), &mut regs, &fake);
            assert_eq!(regs.r10, TDVMCALL_INVALID_OPERAND, "{r12:#x} {r13:#x}");
        }
        let mut regs = TdcallRegs {
            rax: 6,
            rcx: 0x1000 | 1,
            ..TdcallRegs::default()
        };
        model.tdcall(&mut VcpuState::default(), &mut regs, &fake);
        assert_eq!(regs.rax, TDX_OPERAND_INVALID, "unaligned 2M");
        assert!(fake.mappings.lock().unwrap().is_empty(), "nothing changed");
    }
}
