//! Host tests of the TD model: options, every TDCALL leaf and TDVMCALL the
//! model answers, MapGPA/ACCEPT order and serialisation, and each
//! wrong-state rule under each policy.

use super::*;
use std::sync::atomic::{AtomicBool, AtomicU8};
use std::sync::{Barrier, Mutex};

const S: u64 = 1 << 47;
const PRIV: u8 = 1;
const SHARED: u8 = 2;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    Map(u64, PageState),
    Zero(u64),
    Flush,
}

/// Nested tables over arrays: per page, bit 0 = private alias mapped, bit 1 =
/// shared alias mapped. Logs every call and checks on every call that the
/// model holds the page it changes, that no alias is inserted twice, that no
/// page is zeroed while mapped, and that a state byte a reader could act on
/// (not busy) agrees with the mapping.
struct Fake<'a> {
    states: &'a [AtomicU8],
    mapped: Vec<AtomicU8>,
    /// Per page: bumped before and after each mapping change (odd: changing).
    generation: Vec<AtomicU64>,
    log: Mutex<Vec<Op>>,
    violations: Mutex<Vec<String>>,
    /// Yield inside calls, to widen race windows.
    slow: bool,
}

fn bits(state: PageState) -> u8 {
    match state {
        PageState::Private => PRIV,
        PageState::Pending => 0,
        PageState::Shared => SHARED,
    }
}

impl<'a> Fake<'a> {
    fn new(states: &'a [AtomicU8]) -> Self {
        Fake {
            states,
            mapped: (0..states.len()).map(|_| AtomicU8::new(PRIV)).collect(),
            generation: (0..states.len()).map(|_| AtomicU64::new(0)).collect(),
            log: Mutex::new(Vec::new()),
            violations: Mutex::new(Vec::new()),
            slow: false,
        }
    }

    fn violation(&self, s: String) {
        self.violations.lock().unwrap().push(s);
    }

    fn check_agree(&self, page: usize, when: &str) {
        let byte = self.states[page].load(Ordering::SeqCst);
        if byte & BUSY != 0 {
            return;
        }
        let want = bits(PageState::from_byte(byte));
        let have = self.mapped[page].load(Ordering::SeqCst);
        if want != have {
            self.violation(format!(
                "page {page:#x}: {when}: state byte {byte:#x} but mapping {have:#b}"
            ));
        }
    }

    fn check_held(&self, page: usize, what: &str) {
        if self.states[page].load(Ordering::SeqCst) & BUSY == 0 {
            self.violation(format!("page {page:#x}: {what} while not held"));
        }
    }

    fn log(&self) -> Vec<Op> {
        self.log.lock().unwrap().clone()
    }

    fn assert_clean(&self) {
        {
            let v = self.violations.lock().unwrap();
            assert!(
                v.is_empty(),
                "{} violations, first: {:?}",
                v.len(),
                v.first()
            );
        }
        for page in 0..self.states.len() {
            assert_eq!(
                self.states[page].load(Ordering::SeqCst) & BUSY,
                0,
                "page {page:#x} left held"
            );
            self.check_agree(page, "at the end");
        }
        let v = self.violations.lock().unwrap();
        assert!(v.is_empty(), "{v:?}");
    }
}

impl Backing for Fake<'_> {
    fn set_mapping(&self, gpa: u64, state: PageState) {
        let page = (gpa / PAGE) as usize;
        self.check_held(page, "set_mapping");
        self.generation[page].fetch_add(1, Ordering::SeqCst);
        if self.slow {
            std::thread::yield_now();
        }
        let want = bits(state);
        let old = self.mapped[page].swap(want, Ordering::SeqCst);
        if old & PRIV != 0 && want & PRIV != 0 {
            self.violation(format!("page {page:#x}: private alias inserted twice"));
        }
        self.log.lock().unwrap().push(Op::Map(gpa, state));
        if self.slow {
            std::thread::yield_now();
        }
        self.generation[page].fetch_add(1, Ordering::SeqCst);
    }

    fn zero_page(&self, gpa: u64) {
        let page = (gpa / PAGE) as usize;
        self.check_held(page, "zero_page");
        if self.mapped[page].load(Ordering::SeqCst) != 0 {
            self.violation(format!("page {page:#x}: zeroed while an alias is mapped"));
        }
        self.log.lock().unwrap().push(Op::Zero(gpa));
        if self.slow {
            std::thread::yield_now();
        }
    }

    fn flush_nested_tlbs(&self) {
        self.log.lock().unwrap().push(Op::Flush);
    }
}

fn states(pages: usize) -> Vec<AtomicU8> {
    (0..pages).map(|_| AtomicU8::new(0)).collect()
}

/// Runs `f` on a 48-bit TD of `pages` pages with 4 vCPUs.
fn with_td(pages: usize, options: Options, f: impl FnOnce(&TdModel, &Fake, &Counters)) {
    let states = states(pages);
    let counters = Counters::new();
    let model = TdModel::new(&states, 48, 4, options, &counters);
    let fake = Fake::new(&states);
    f(&model, &fake, &counters);
    fake.assert_clean();
}

fn policy(wrong_state: WrongStatePolicy) -> Options {
    Options {
        wrong_state,
        ..Options::default()
    }
}

const POLICIES: [WrongStatePolicy; 3] = [
    WrongStatePolicy::Ve,
    WrongStatePolicy::Convert,
    WrongStatePolicy::Shutdown,
];

fn call(model: &TdModel, fake: &Fake, regs: &mut TdcallRegs) -> TdcallEffect {
    model.tdcall(&mut VcpuState::default(), regs, fake)
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

/// MapGPA; the TDVMCALL status (R10).
fn map_gpa(model: &TdModel, fake: &Fake, gpa: u64, size: u64) -> u64 {
    let mut regs = vmcall_regs(subfn::MAP_GPA, gpa, size);
    assert_eq!(call(model, fake, &mut regs), TdcallEffect::Resume);
    assert_eq!(regs.rax, 0);
    regs.r10
}

/// ACCEPT as a vCPU executes it: re-executed while the effect says Retry.
fn accept(model: &TdModel, fake: &Fake, rcx: u64) -> (u64, TdcallEffect) {
    for _ in 0..10_000 {
        let mut regs = TdcallRegs {
            rax: leaf::TDG_MEM_PAGE_ACCEPT,
            rcx,
            ..TdcallRegs::default()
        };
        let effect = call(model, fake, &mut regs);
        if effect != TdcallEffect::Retry {
            return (regs.rax, effect);
        }
    }
    panic!("ACCEPT retried forever");
}

fn fault(model: &TdModel, fake: &Fake, gpa: u64, access: Access) -> FaultEffect {
    let gla = 0xffff_8880_0000_0000 | (gpa & 0xfff_ffff);
    model.nested_fault(&mut VcpuState::default(), gpa, gla, access, fake)
}

fn load(c: &AtomicU64) -> u64 {
    c.load(Ordering::SeqCst)
}

struct ModelCall<'a> {
    model: &'a TdModel<'a>,
    fake: &'a Fake<'a>,
}

impl tdx_hypercall::TdCall for ModelCall<'_> {
    fn tdcall(&self, regs: &mut TdcallRegs) {
        let mut vcpu = VcpuState {
            index: 3,
            ve_latched: None,
        };
        while self.model.tdcall(&mut vcpu, regs, self.fake) == TdcallEffect::Retry {}
    }
}

// ---------------------------------------------------------------- options

#[test]
fn option_words_set_options() {
    let mut o = Options::default();
    assert_eq!(
        (o.pending_ram, o.wrong_state, o.memory_mib),
        (false, WrongStatePolicy::Convert, 1024)
    );
    assert_eq!(o.memory_pages(), 262_144);
    for word in [
        "strict",
        "memory=1536",
        "wrong-state=ve",
        "mapgpa-retry-every-page",
        "refuse-large-accept",
        "sept-ve",
        "implicit-convert",
    ] {
        o.parse_word(word).unwrap();
    }
    assert_eq!(
        o,
        Options {
            pending_ram: true,
            wrong_state: WrongStatePolicy::Ve,
            map_gpa_retry_every_page: true,
            refuse_large_accept: true,
            memory_mib: 1536,
            double_ve_at: 0,
            map_gpa_fail_after: 0,
            map_gpa_bad_retry: None,
            accept_fail: None,
            sept_ve: true,
            implicit_convert: true,
        }
    );
    o.parse_word("accept-fail=busy").unwrap();
    assert_eq!(o.accept_fail, Some(AcceptFail::Busy));
    assert!(Options::default().parse_word("accept-fail=slow").is_err());
    o.accept_fail = None;
    o.parse_word("mapgpa-bad-retry=stuck").unwrap();
    assert_eq!(o.map_gpa_bad_retry, Some(BadRetry::Stuck));
    assert!(Options::default()
        .parse_word("mapgpa-bad-retry=late")
        .is_err());
    o.map_gpa_bad_retry = None;
    o.parse_word("mapgpa-fail-after=5").unwrap();
    assert_eq!(o.map_gpa_fail_after, 5);
    for bad in ["mapgpa-fail-after=0", "mapgpa-fail-after=x"] {
        assert!(Options::default().parse_word(bad).is_err(), "{bad}");
    }
    o.map_gpa_fail_after = 0;
    o.parse_word("accepted").unwrap();
    o.parse_word("wrong-state=shutdown").unwrap();
    o.parse_word("memory=256").unwrap();
    assert_eq!(
        (o.pending_ram, o.wrong_state, o.memory_mib),
        (false, WrongStatePolicy::Shutdown, 256)
    );
    o.parse_word("wrong-state=convert").unwrap();
    assert_eq!(o.wrong_state, WrongStatePolicy::Convert);
    // Display gives the words back.
    let mut again = Options::default();
    for word in format!("{o}").split_whitespace() {
        again.parse_word(word).unwrap();
    }
    assert_eq!(again, o);
}

#[test]
fn bad_option_words_are_refused_with_one_line_naming_them() {
    for (word, kind, why) in [
        ("lazy", OptionErrorKind::Unknown, "unknown"),
        ("memory=", OptionErrorKind::MemoryNotANumber, "MiB"),
        ("memory=1G", OptionErrorKind::MemoryNotANumber, "MiB"),
        (
            "memory=255",
            OptionErrorKind::MemoryOutOfRange,
            "256..=1536",
        ),
        (
            "memory=1537",
            OptionErrorKind::MemoryOutOfRange,
            "256..=1536",
        ),
        (
            "memory=99999999999",
            OptionErrorKind::MemoryNotANumber,
            "MiB",
        ),
        (
            "wrong-state=panic",
            OptionErrorKind::WrongStatePolicy,
            "ve, convert or shutdown",
        ),
        (
            "wrong-state=",
            OptionErrorKind::WrongStatePolicy,
            "ve, convert or shutdown",
        ),
    ] {
        let mut o = Options::default();
        let err = o.parse_word(word).unwrap_err();
        assert_eq!((err.word, err.kind), (word, kind));
        let line = format!("{err}");
        assert!(line.contains(&format!("\"{word}\"")), "{line}");
        assert!(line.contains(why), "{line}");
        assert!(!line.contains('\n'), "{line}");
        assert_eq!(o, Options::default(), "{word} changed nothing");
    }
}

// ---------------------------------------------------------------- VP.INFO

#[test]
fn vp_info_reports_gpaw_attributes_and_vcpus() {
    with_td(16, Options::default(), |model, fake, _| {
        let mut vcpu = VcpuState {
            index: 2,
            ve_latched: None,
        };
        let mut regs = TdcallRegs {
            rax: 1,
            r10: 7,
            r11: 7,
            ..TdcallRegs::default()
        };
        assert_eq!(
            model.tdcall(&mut vcpu, &mut regs, fake),
            TdcallEffect::Resume
        );
        assert_eq!(
            (regs.rax, regs.rcx, regs.r8, regs.r9, regs.r10, regs.r11),
            (0, 48, 4 | (4 << 32), 2, 0, 0)
        );
        assert_ne!(regs.rdx & (1 << 28), 0, "SEPT_VE_DISABLE");
        assert_eq!(regs.rdx & 1, 0, "not DEBUG");
        // The guest library parses it.
        let info = tdx_hypercall::vp_info(&ModelCall { model, fake }).unwrap();
        assert_eq!(info.shared_bit(), S);
        assert_eq!(info.vcpu_index, 3);
    });
    let states = states(4);
    let counters = Counters::new();
    let model = TdModel::new(&states, 52, 1, Options::default(), &counters);
    assert_eq!(model.shared_bit(), 1 << 51);
    assert_eq!(
        model.config_flags(),
        config_flags::NO_RBP_MOD | config_flags::GPAW
    );
}

// ---------------------------------------------------------------- VM.RD / VM.WR

fn vm_rd(model: &TdModel, fake: &Fake, field: u64) -> (u64, u64) {
    let mut regs = TdcallRegs {
        rax: 7,
        rdx: field,
        r8: 0xdead,
        ..TdcallRegs::default()
    };
    call(model, fake, &mut regs);
    (regs.rax, regs.r8)
}

fn vm_wr(model: &TdModel, fake: &Fake, field: u64, value: u64, mask: u64) -> (u64, u64) {
    let mut regs = TdcallRegs {
        rax: 8,
        rdx: field,
        r8: value,
        r9: mask,
        ..TdcallRegs::default()
    };
    call(model, fake, &mut regs);
    (regs.rax, regs.r8)
}

#[test]
fn vm_rd_answers_the_fields_linux_reads() {
    with_td(16, Options::default(), |model, fake, counters| {
        // CONFIG_FLAGS: NO_RBP_MOD, no FLEXIBLE_PENDING_VE.
        assert_eq!(vm_rd(model, fake, field::CONFIG_FLAGS), (0, 4));
        // TD_CTLS: PENDING_VE_DISABLE = SEPT_VE_DISABLE (tdh_mng_init.c).
        assert_eq!(vm_rd(model, fake, field::TD_CTLS), (0, 1));
        assert_eq!(vm_rd(model, fake, field::ATTRIBUTES), (0, 1 << 28));
        assert_eq!(vm_rd(model, fake, field::MAX_VCPUS), (0, 4));
        assert_eq!(vm_rd(model, fake, field::NUM_VCPUS), (0, 4));
        assert_eq!(vm_rd(model, fake, field::GPAW), (0, 0));
        assert_eq!(vm_rd(model, fake, field::NOTIFY_ENABLES), (0, 0));
        // Linux 6.12.y disable_sept_ve(): no FLEXIBLE_PENDING_VE, so the
        // attribute decides, and it is set: no panic.
        let (_, config) = vm_rd(model, fake, field::CONFIG_FLAGS);
        assert_eq!(config & (1 << 1), 0);
        assert_eq!(load(&counters.tdcalls_by_leaf[7]), 8);
    });
}

#[test]
fn vm_wr_notify_enables_as_linux_does_and_masks_bits() {
    with_td(16, Options::default(), |model, fake, counters| {
        // v6.12.0 tdx_early_init: value 0, mask -1, its own spelling of the ID.
        assert_eq!(
            vm_wr(model, fake, 0x9100_0000_0000_0010, 0, u64::MAX),
            (0, 0)
        );
        assert_eq!(vm_wr(model, fake, 0x9100_0000_0000_0010, 1, 1), (0, 0));
        // R8 returns the old value.
        assert_eq!(vm_wr(model, fake, field::NOTIFY_ENABLES, 1, 1), (0, 1));
        assert_eq!(vm_rd(model, fake, field::NOTIFY_ENABLES), (0, 1));
        // Changing a bit outside the guest's write mask is refused, R8 = 0.
        assert_eq!(
            vm_wr(model, fake, field::NOTIFY_ENABLES, 2, u64::MAX),
            (status::TDX_METADATA_FIELD_VALUE_NOT_VALID, 0)
        );
        // A mask with no writable bit.
        assert_eq!(
            vm_wr(model, fake, field::NOTIFY_ENABLES, 0, 2),
            (status::TDX_METADATA_FIELD_NOT_WRITABLE, 0)
        );
        assert_eq!(load(&counters.tdcalls_by_leaf[8]), 5);
    });
}

#[test]
fn vm_wr_td_ctls_cannot_change_pending_ve_disable_without_flexible_pending_ve() {
    with_td(16, Options::default(), |model, fake, _| {
        assert_eq!(
            vm_wr(model, fake, field::TD_CTLS, 0, 1),
            (status::TDX_METADATA_FIELD_VALUE_NOT_VALID, 0)
        );
        // Writing the value it has is no change: allowed.
        assert_eq!(vm_wr(model, fake, field::TD_CTLS, 1, 1), (0, 1));
        assert_eq!(vm_rd(model, fake, field::TD_CTLS), (0, 1));
        assert_eq!(
            vm_wr(model, fake, field::CONFIG_FLAGS, 2, 2),
            (status::TDX_METADATA_FIELD_NOT_WRITABLE, 0)
        );
        assert_eq!(
            vm_wr(model, fake, field::ATTRIBUTES, 0, u64::MAX),
            (status::TDX_METADATA_FIELD_NOT_WRITABLE, 0)
        );
    });
}

#[test]
fn vm_rd_wr_errors_are_the_modules() {
    with_td(16, Options::default(), |model, fake, _| {
        let incorrect = (status::TDX_METADATA_FIELD_ID_INCORRECT, 0);
        assert_eq!(vm_rd(model, fake, 0x1110_0003_0000_0099), incorrect);
        assert_eq!(vm_wr(model, fake, 0x9110_0003_0000_0042, 0, 1), incorrect);
        // Reserved bits 31:24, LAST_ELEMENT_IN_FIELD.
        assert_eq!(vm_rd(model, fake, field::CONFIG_FLAGS | 1 << 24), incorrect);
        assert_eq!(vm_rd(model, fake, field::CONFIG_FLAGS | 1 << 34), incorrect);
        // RCX (VM ID) must be 0; R8 zeroed.
        for rax in [7, 8] {
            let mut regs = TdcallRegs {
                rax,
                rcx: 1,
                rdx: field::CONFIG_FLAGS,
                r8: 0xdead,
                r9: 1,
                ..TdcallRegs::default()
            };
            call(model, fake, &mut regs);
            assert_eq!((regs.rax, regs.r8), (0xC000_0100_0000_0001, 0));
        }
        // Versions: only TDG.VM.RD has them; version 1 is not modelled.
        for rax in [7 | 1 << 16, 8 | 1 << 16, 6 | 1 << 16, 7 | 2 << 16] {
            let mut regs = TdcallRegs {
                rax,
                rdx: field::CONFIG_FLAGS,
                ..TdcallRegs::default()
            };
            call(model, fake, &mut regs);
            assert_eq!(regs.rax, 0xC000_0100_0000_0000, "{rax:#x}");
        }
    });
}

// ---------------------------------------------------------------- leaves

#[test]
fn unknown_leaves_and_reserved_rax_bits_are_operand_invalid() {
    with_td(16, Options::default(), |model, fake, counters| {
        for rax in [2, 4, 5, 9, 11, 20, 0xffff, 1 << 24, 1 | 1 << 40] {
            let mut regs = TdcallRegs {
                rax,
                ..TdcallRegs::default()
            };
            assert_eq!(call(model, fake, &mut regs), TdcallEffect::Resume);
            assert_eq!(regs.rax, 0xC000_0100_0000_0000, "{rax:#x}");
        }
        assert_eq!(load(&counters.tdcalls_by_leaf[20]), 1);
        assert_eq!(load(&counters.tdcalls_by_leaf[11]), 1);
        assert_eq!(load(&counters.tdcalls_unmodelled), 7);
    });
}

#[test]
fn veinfo_get_with_nothing_latched_is_no_valid_ve_info_and_zeroes_outputs() {
    with_td(16, Options::default(), |model, fake, _| {
        let mut regs = TdcallRegs {
            rax: 3,
            rcx: 1,
            rdx: 2,
            r8: 3,
            r9: 4,
            r10: 5,
            r11: 6,
            ..TdcallRegs::default()
        };
        call(model, fake, &mut regs);
        assert_eq!(regs.rax, 0xC000_0704_0000_0000);
        assert_eq!(
            (regs.rcx, regs.rdx, regs.r8, regs.r9, regs.r10, regs.r11),
            (0, 0, 0, 0, 0, 6)
        );
    });
}

#[test]
fn second_ve_before_veinfo_get_is_a_double_fault() {
    with_td(16, Options::default(), |model, fake, counters| {
        let mut vcpu = VcpuState::default();
        let mmio = 0xfec0_0000 | S;
        assert_eq!(
            model.nested_fault(&mut vcpu, mmio, 0xffff_c900_0000_0000, Access::READ, fake),
            FaultEffect::VirtualizationException
        );
        assert_eq!(
            model.nested_fault(
                &mut vcpu,
                mmio + 4,
                0xffff_c900_0000_0004,
                Access::WRITE,
                fake
            ),
            FaultEffect::DoubleFault
        );
        let mut regs = TdcallRegs {
            rax: 3,
            ..TdcallRegs::default()
        };
        model.tdcall(&mut vcpu, &mut regs, fake);
        assert_eq!(
            (regs.rax, regs.rcx, regs.rdx, regs.r8, regs.r9),
            (0, 48, 1, 0xffff_c900_0000_0000, mmio)
        );
        assert_eq!(counters.ve(48), 1);
        assert_eq!(load(&counters.double_faults), 1);
        // Free again.
        assert_eq!(
            model.nested_fault(&mut vcpu, mmio, 0, Access::READ, fake),
            FaultEffect::VirtualizationException
        );
    });
}

#[test]
fn inject_double_ve_turns_the_nth_ve_into_a_double_fault_with_the_info_latched() {
    let mut options = Options::default();
    options.parse_word("inject-double-ve=2").unwrap();
    assert!(options.parse_word("inject-double-ve=0").is_err());
    assert!(options.parse_word("inject-double-ve=x").is_err());
    assert!(options.to_string().contains("inject-double-ve=2"));
    with_td(16, options, |model, fake, counters| {
        let mut vcpu = VcpuState::default();
        let mmio = 0xfec0_0000 | S;
        let first = model.nested_fault(&mut vcpu, mmio, 0, Access::READ, fake);
        assert_eq!(first, FaultEffect::VirtualizationException);
        let mut regs = TdcallRegs {
            rax: 3,
            ..TdcallRegs::default()
        };
        model.tdcall(&mut vcpu, &mut regs, fake);
        let second = model.nested_fault(&mut vcpu, mmio + 8, 0, Access::READ, fake);
        assert_eq!(second, FaultEffect::DoubleFault);
        assert_eq!(load(&counters.double_faults), 1);
        // The #DF handler finds the #VE's info latched.
        let mut regs = TdcallRegs {
            rax: 3,
            ..TdcallRegs::default()
        };
        model.tdcall(&mut vcpu, &mut regs, fake);
        assert_eq!((regs.rax, regs.r9), (0, mmio + 8));
        let third = model.nested_fault(&mut vcpu, mmio, 0, Access::READ, fake);
        assert_eq!(third, FaultEffect::VirtualizationException);
    });
}

// ---------------------------------------------------------------- TDVMCALL

#[test]
fn vmcall_rcx_bitmap_is_validated_as_the_module_does() {
    with_td(16, Options::default(), |model, fake, _| {
        for rcx in [0xffcc, 0xfc00, 0xffff_fc00, 0x0c00] {
            let mut regs = TdcallRegs {
                rcx,
                r11: subfn::GET_TD_VM_CALL_INFO,
                ..TdcallRegs::default()
            };
            call(model, fake, &mut regs);
            assert_eq!((regs.rax, regs.r10), (0, 0), "{rcx:#x}");
            assert_eq!(regs.rcx, rcx, "RCX is returned unchanged");
        }
        // RAX, RCX, RSP, RBP (NO_RBP_MOD) and bits 63:32.
        for rcx in [0xfc01, 0xfc02, 0xfc10, 0xfc20, 1 << 32 | 0xfc00, 1 << 63] {
            let mut regs = TdcallRegs {
                rcx,
                r10: 0x55,
                r11: subfn::GET_TD_VM_CALL_INFO,
                ..TdcallRegs::default()
            };
            assert_eq!(call(model, fake, &mut regs), TdcallEffect::Resume);
            assert_eq!(regs.rax, 0xC000_0100_0000_0001, "{rcx:#x}");
            assert_eq!(regs.r10, 0x55, "no exit to the VMM");
        }
    });
}

#[test]
fn vmcall_exposes_and_returns_only_the_selected_registers() {
    with_td(16, Options::default(), |model, fake, _| {
        // R12 not exposed: the VMM reads 0 there (leaf 0: success) and the
        // TD's R12..R15 keep their values.
        let mut regs = TdcallRegs {
            rcx: 0x0c00,
            r11: subfn::GET_TD_VM_CALL_INFO,
            r12: 5,
            r13: 6,
            ..TdcallRegs::default()
        };
        call(model, fake, &mut regs);
        assert_eq!((regs.r10, regs.r11, regs.r12, regs.r13), (0, 0, 5, 6));
        // Exposed: leaf 5 is refused.
        let mut regs = vmcall_regs(subfn::GET_TD_VM_CALL_INFO, 5, 6);
        call(model, fake, &mut regs);
        assert_eq!(regs.r10, vmcall_status::INVALID_OPERAND);
        // Leaf 0 with everything exposed: R11..R14 zeroed.
        let mut regs = TdcallRegs {
            r14: 9,
            ..vmcall_regs(subfn::GET_TD_VM_CALL_INFO, 0, 8)
        };
        call(model, fake, &mut regs);
        assert_eq!(
            (regs.r10, regs.r11, regs.r12, regs.r13, regs.r14),
            (0, 0, 0, 0, 0)
        );
        // vmm_write honours the bitmap.
        let mut regs = TdcallRegs {
            rcx: 0x0c00,
            ..TdcallRegs::default()
        };
        assert!(vmm_write(&mut regs, Gpr::R11, 7));
        assert!(!vmm_write(&mut regs, Gpr::R12, 7));
        assert_eq!((regs.r11, regs.r12), (7, 0));
    });
}

#[test]
fn vmcall_subfunctions_give_their_effects() {
    with_td(16, Options::default(), |model, fake, counters| {
        let mut regs = vmcall_regs(subfn::HLT, 1, 0);
        assert_eq!(
            call(model, fake, &mut regs),
            TdcallEffect::Halt {
                interrupts_blocked: true
            }
        );
        let mut regs = vmcall_regs(subfn::HLT, 0, 0);
        assert_eq!(
            call(model, fake, &mut regs),
            TdcallEffect::Halt {
                interrupts_blocked: false
            }
        );
        let mut regs = vmcall_regs(subfn::CPUID, 0x4000_0000, 0);
        assert_eq!(
            call(model, fake, &mut regs),
            TdcallEffect::Cpuid {
                leaf: 0x4000_0000,
                subleaf: 0
            }
        );
        let mut regs = TdcallRegs {
            r14: 0x3f8,
            r15: 0x41,
            ..vmcall_regs(subfn::IO, 1, 1)
        };
        assert_eq!(
            call(model, fake, &mut regs),
            TdcallEffect::Io {
                port: 0x3f8,
                size: 1,
                write: true,
                value: 0x41
            }
        );
        for (r12, r13) in [(3, 0), (1, 2)] {
            let mut regs = TdcallRegs {
                r14: 0x3f8,
                ..vmcall_regs(subfn::IO, r12, r13)
            };
            assert_eq!(call(model, fake, &mut regs), TdcallEffect::Resume);
            assert_eq!(regs.r10, vmcall_status::INVALID_OPERAND);
        }
        let mut regs = vmcall_regs(subfn::REPORT_FATAL_ERROR, 0, 0);
        assert_eq!(
            call(model, fake, &mut regs),
            TdcallEffect::Fatal { code: 0 }
        );
        // Unknown sub-function; a vendor (KVM) hypercall.
        let mut regs = vmcall_regs(subfn::GET_QUOTE, 0, 0);
        call(model, fake, &mut regs);
        assert_eq!(regs.r10, vmcall_status::SUBFUNC_UNSUPPORTED);
        let mut regs = TdcallRegs {
            r10: 9,
            ..vmcall_regs(1, 0, 0)
        };
        call(model, fake, &mut regs);
        assert_eq!(regs.r10 as i64, -1000);
        assert_eq!(load(&counters.tdvmcalls_unsupported), 2);
    });
}

#[test]
fn request_mmio_checks_size_direction_and_address() {
    with_td(16, Options::default(), |model, fake, _| {
        let mmio = |size, write, gpa, value| TdcallRegs {
            r14: gpa,
            r15: value,
            ..vmcall_regs(subfn::REQUEST_MMIO, size, write)
        };
        for size in [1, 2, 4, 8] {
            let mut regs = mmio(size, 1, 0xfee0_0300 | S, 0x1234);
            assert_eq!(
                call(model, fake, &mut regs),
                TdcallEffect::Mmio {
                    gpa: 0xfee0_0300,
                    size: size as u8,
                    write: true,
                    value: 0x1234
                }
            );
            assert_eq!(regs.r10, 0);
        }
        let mut regs = mmio(4, 0, 0xfec0_0000, 0x99);
        assert_eq!(
            call(model, fake, &mut regs),
            TdcallEffect::Mmio {
                gpa: 0xfec0_0000,
                size: 4,
                write: false,
                value: 0
            }
        );
        for regs in [
            mmio(3, 0, 0xfec0_0000 | S, 0),
            mmio(16, 0, 0xfec0_0000 | S, 0),
            mmio(4, 2, 0xfec0_0000 | S, 0),
            mmio(8, 0, 0xfec0_0ffc | S, 0),
            mmio(4, 0, 0x1000 | S, 0),
            mmio(4, 0, 1 << 50, 0),
        ] {
            let mut regs = regs;
            assert_eq!(call(model, fake, &mut regs), TdcallEffect::Resume);
            assert_eq!(regs.r10, vmcall_status::INVALID_OPERAND, "{regs:x?}");
        }
    });
}

// ---------------------------------------------------------------- MapGPA

#[test]
fn map_gpa_to_shared_unmaps_flushes_zeroes_then_maps_in_that_order() {
    with_td(16, Options::default(), |model, fake, counters| {
        assert_eq!(map_gpa(model, fake, 0x2000 | S, 0x3000), 0);
        let log = fake.log();
        let flushes: Vec<usize> = (0..log.len()).filter(|&i| log[i] == Op::Flush).collect();
        assert_eq!(flushes.len(), 1, "one flush per call: {log:?}");
        let flush = flushes[0];
        for gpa in [0x2000, 0x3000, 0x4000] {
            let pos = |op| log.iter().position(|&o| o == op).unwrap();
            let unmap = pos(Op::Map(gpa, PageState::Pending));
            let zero = pos(Op::Zero(gpa));
            let map = pos(Op::Map(gpa, PageState::Shared));
            assert!(
                unmap < flush && flush < zero && zero < map,
                "{gpa:#x}: {log:?}"
            );
            assert_eq!(model.state(gpa), Some(PageState::Shared));
        }
        assert_eq!(model.state(0x1000), Some(PageState::Private));
        assert_eq!(model.state(0x5000), Some(PageState::Private));
        assert_eq!(load(&counters.pages_to_shared), 3);
    });
}

#[test]
fn map_gpa_to_private_unmaps_flushes_and_leaves_pending_until_accept() {
    with_td(16, Options::default(), |model, fake, counters| {
        assert_eq!(map_gpa(model, fake, 0x3000 | S, 0x2000), 0);
        fake.log.lock().unwrap().clear();
        assert_eq!(map_gpa(model, fake, 0x3000, 0x2000), 0);
        assert_eq!(
            fake.log(),
            [
                Op::Map(0x3000, PageState::Pending),
                Op::Map(0x4000, PageState::Pending),
                Op::Flush
            ]
        );
        assert_eq!(model.state(0x3000), Some(PageState::Pending));
        assert_eq!(load(&counters.pages_to_private), 2);
        fake.log.lock().unwrap().clear();
        // ACCEPT zeroes, then maps the private alias.
        assert_eq!(accept(model, fake, 0x3000), (0, TdcallEffect::Resume));
        assert_eq!(
            fake.log(),
            [Op::Zero(0x3000), Op::Map(0x3000, PageState::Private)]
        );
        assert_eq!(model.state(0x3000), Some(PageState::Private));
        assert_eq!(load(&counters.accepts[0]), 1);
        // Twice: ALREADY_ACCEPTED, level 0.
        assert_eq!(accept(model, fake, 0x3000).0, 0x0000_0B0A_0000_0000);
    });
}

#[test]
fn map_gpa_leaves_pages_already_in_the_target_state_alone() {
    with_td(16, Options::default(), |model, fake, counters| {
        // Private (accepted) to private: the attribute does not change, KVM
        // zaps nothing: it stays accepted.
        assert_eq!(map_gpa(model, fake, 0x1000, 0x1000), 0);
        assert_eq!(model.state(0x1000), Some(PageState::Private));
        assert_eq!(map_gpa(model, fake, 0x2000 | S, 0x1000), 0);
        fake.log.lock().unwrap().clear();
        // Shared to shared: contents kept, nothing unmapped, no flush.
        assert_eq!(map_gpa(model, fake, 0x2000 | S, 0x1000), 0);
        assert!(fake.log().is_empty(), "{:?}", fake.log());
        assert_eq!(load(&counters.pages_to_shared), 1);
        assert_eq!(load(&counters.pages_to_private), 0);
    });
}

#[test]
fn map_gpa_retry_every_page_gives_resume_points_in_r12_encoding() {
    let options = Options {
        map_gpa_retry_every_page: true,
        ..Options::default()
    };
    with_td(64, options, |model, fake, counters| {
        let mut regs = vmcall_regs(subfn::MAP_GPA, 0x4000 | S, 0x3000);
        call(model, fake, &mut regs);
        assert_eq!((regs.r10, regs.r11), (vmcall_status::RETRY, 0x5000 | S));
        assert_eq!(model.state(0x4000), Some(PageState::Shared));
        assert_eq!(model.state(0x5000), Some(PageState::Private));
        // The guest library converts the whole range.
        let stats = tdx_hypercall::map_gpa(
            &ModelCall { model, fake },
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
        assert_eq!(load(&counters.map_gpa_retries), 3);
    });
}

#[test]
fn bad_map_gpa_operands_are_refused_as_kvm_and_qemu_do() {
    with_td(16, Options::default(), |model, fake, _| {
        use vmcall_status::*;
        for (r12, r13, want) in [
            (0x1001, 0x1000, ALIGN_ERROR),
            (0x1000, 0x1001, ALIGN_ERROR),
            (0x1000, 0, INVALID_OPERAND),
            (u64::MAX - 0xfff, 0x2000, INVALID_OPERAND),
            // The shared bit differs between the first and the last byte.
            (0x7fff_ffff_f000, 0x2000, INVALID_OPERAND),
            // Above GPAW.
            (1 << 48, 0x1000, INVALID_OPERAND),
            // Straddles the end of TD RAM (64 KiB here), either direction.
            (0xf000, 0x2000, INVALID_OPERAND),
            (0xf000 | S, 0x2000, INVALID_OPERAND),
            // Outside RAM: to private fails, to shared is ignored.
            (0x10_0000, 0x1000, INVALID_OPERAND),
            (0xfec0_0000 | S, 0x1000, SUCCESS),
        ] {
            assert_eq!(map_gpa(model, fake, r12, r13), want, "{r12:#x} {r13:#x}");
        }
        assert!(fake.log().is_empty(), "nothing changed: {:?}", fake.log());
    });
}

// ---------------------------------------------------------------- ACCEPT

#[test]
fn accept_range_from_the_guest_library_uses_2m_unless_refused() {
    for refuse in [false, true] {
        let options = Options {
            refuse_large_accept: refuse,
            ..Options::default()
        };
        with_td(2048, options, |model, fake, _| {
            model.initialise(0, 4 << 20, PageState::Pending, fake);
            let stats = tdx_hypercall::accept_range(
                &ModelCall { model, fake },
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
        });
    }
}

#[test]
fn accept_operands_and_statuses_are_the_modules() {
    with_td(1024, Options::default(), |model, fake, counters| {
        let invalid = 0xC000_0100_0000_0001;
        for rcx in [
            0x1000 | 1, // 2M not aligned
            2,          // 1G: the module accepts 4K and 2M only
            3,
            0x1000 | 1 << 3,  // reserved bits 11:3
            0x1000 | 1 << 52, // reserved bits 63:52
            0x1000 | S,       // shared GPA
        ] {
            assert_eq!(
                accept(model, fake, rcx),
                (invalid, TdcallEffect::Resume),
                "{rcx:#x}"
            );
        }
        // All private: ALREADY_ACCEPTED at the requested level.
        assert_eq!(accept(model, fake, 0).0, 0x0000_0B0A_0000_0000);
        assert_eq!(accept(model, fake, 1).0, 0x0000_0B0A_0000_0001);
        // A 2M block with one pending page: PAGE_SIZE_MISMATCH at level 1.
        assert_eq!(map_gpa(model, fake, 0x3000 | S, 0x1000), 0);
        assert_eq!(map_gpa(model, fake, 0x3000, 0x1000), 0);
        assert_eq!(accept(model, fake, 1).0, 0xC000_0B0B_0000_0001);
        assert_eq!(load(&counters.accept_size_mismatches), 1);
        // A 2M block straddling the end of TD RAM (4 MiB here): 4K mappings.
        let states = states(768);
        let c2 = Counters::new();
        let small = TdModel::new(&states, 48, 1, Options::default(), &c2);
        let f2 = Fake::new(&states);
        assert_eq!(accept(&small, &f2, (2 << 20) | 1).0, 0xC000_0B0B_0000_0001);
        // Wholly outside TD RAM: no memslot, the VMM stops the TD.
        assert_eq!(
            accept(&small, &f2, 8 << 20).1,
            TdcallEffect::Shutdown(ShutdownReason::AcceptOutsideRam { gpa: 8 << 20 })
        );
        f2.assert_clean();
    });
}

#[test]
fn accept_of_a_held_page_is_operand_busy_and_releases_what_it_took() {
    with_td(1024, Options::default(), |model, fake, counters| {
        model.initialise(0, 2 << 20, PageState::Pending, fake);
        // Another vCPU holds page 5.
        hold_page(model, 0x5000);
        assert_eq!(accept(model, fake, 0x5000).0, 0x8000_0200_0000_0001);
        assert_eq!(accept(model, fake, 1).0, 0x8000_0200_0000_0001);
        for p in (0..2 << 20).step_by(4096).filter(|&p| p != 0x5000) {
            assert_eq!(
                model.slot(p).unwrap().load(Ordering::SeqCst),
                PageState::Pending as u8
            );
        }
        TdModel::release_unchanged(model.slot(0x5000).unwrap());
        assert_eq!(accept(model, fake, 1).0, 0);
        assert_eq!(load(&counters.accept_busy), 2);
    });
}

fn hold_page(model: &TdModel, gpa: u64) {
    assert!(TdModel::try_hold(model.slot(gpa).unwrap()).is_some());
}

#[test]
fn accept_of_a_shared_page_is_converted_or_shuts_down_per_policy() {
    for policy_ in POLICIES {
        with_td(16, policy(policy_), |model, fake, counters| {
            assert_eq!(map_gpa(model, fake, 0x2000 | S, 0x1000), 0);
            let mut regs = TdcallRegs {
                rax: 6,
                rcx: 0x2000,
                ..TdcallRegs::default()
            };
            let effect = call(model, fake, &mut regs);
            assert_eq!(load(&counters.wrong_state_accesses), 1);
            if policy_ == WrongStatePolicy::Shutdown {
                assert_eq!(
                    effect,
                    TdcallEffect::Shutdown(ShutdownReason::AcceptOfShared { gpa: 0x2000 })
                );
                assert_eq!(model.state(0x2000), Some(PageState::Shared));
            } else {
                // An EPT-violation exit; the VMM converts; the TDCALL runs again.
                assert_eq!(effect, TdcallEffect::Retry);
                assert_eq!(model.state(0x2000), Some(PageState::Pending));
                assert_eq!(accept(model, fake, 0x2000), (0, TdcallEffect::Resume));
                assert_eq!(model.state(0x2000), Some(PageState::Private));
                assert_eq!(load(&counters.implicit_conversions), 1);
            }
        });
    }
}

// ---------------------------------------------------------------- wrong-state accesses

#[test]
fn shared_access_outside_ram_is_an_mmio_ve_with_the_gla_in_every_policy() {
    for policy_ in POLICIES {
        with_td(16, policy(policy_), |model, fake, counters| {
            for (access, qualification) in
                [(Access::READ, 1), (Access::WRITE, 2), (Access::FETCH, 4)]
            {
                let mut vcpu = VcpuState::default();
                let gpa = 0xfee0_0030 | S;
                assert_eq!(
                    model.nested_fault(&mut vcpu, gpa, 0xffff_f000_0000_0030, access, fake),
                    FaultEffect::VirtualizationException
                );
                assert_eq!(
                    vcpu.ve_latched,
                    Some(VeInfo {
                        exit_reason: 48,
                        exit_qualification: qualification,
                        guest_linear_address: 0xffff_f000_0000_0030,
                        guest_physical_address: gpa,
                        instruction_length: 0,
                        instruction_info: 0,
                    })
                );
            }
            assert_eq!(load(&counters.mmio_faults), 3);
            assert_eq!(load(&counters.wrong_state_accesses), 0);
            assert!(fake.log().is_empty());
        });
    }
}

#[test]
fn shared_access_to_a_private_or_pending_page_per_policy() {
    for seen in [PageState::Private, PageState::Pending] {
        for policy_ in POLICIES {
            with_td(16, policy(policy_), |model, fake, counters| {
                if seen == PageState::Pending {
                    model.initialise(0x3000, 0x4000, seen, fake);
                }
                fake.log.lock().unwrap().clear();
                let gpa = 0x3008 | S;
                let mut vcpu = VcpuState::default();
                let effect =
                    model.nested_fault(&mut vcpu, gpa, 0xffff_8880_0000_3008, Access::WRITE, fake);
                assert_eq!(
                    load(&counters.wrong_state_accesses),
                    1,
                    "{seen:?} {policy_:?}"
                );
                match policy_ {
                    WrongStatePolicy::Ve => {
                        assert_eq!(effect, FaultEffect::VirtualizationException);
                        let info = vcpu.ve_latched.unwrap();
                        assert_eq!(
                            (
                                info.exit_reason,
                                info.exit_qualification,
                                info.guest_physical_address
                            ),
                            (48, 2, gpa)
                        );
                        assert_eq!(info.guest_linear_address, 0xffff_8880_0000_3008);
                        assert_eq!(model.state(0x3000), Some(seen));
                        assert!(fake.log().is_empty());
                    }
                    WrongStatePolicy::Convert => {
                        assert_eq!(effect, FaultEffect::Retry);
                        assert_eq!(model.state(0x3000), Some(PageState::Shared));
                        assert_eq!(
                            fake.log(),
                            [
                                Op::Map(0x3000, PageState::Pending),
                                Op::Flush,
                                Op::Zero(0x3000),
                                Op::Map(0x3000, PageState::Shared)
                            ]
                        );
                        assert_eq!(load(&counters.implicit_conversions), 1);
                        // The retried access now finds its alias: not faulted again
                        // on hardware; if it were, a spurious retry.
                        assert_eq!(fault(model, fake, gpa, Access::WRITE), FaultEffect::Retry);
                        assert_eq!(load(&counters.spurious_faults), 1);
                    }
                    WrongStatePolicy::Shutdown => {
                        assert_eq!(
                            effect,
                            FaultEffect::Shutdown(ShutdownReason::SharedAccessToPrivate { gpa })
                        );
                        assert_eq!(model.state(0x3000), Some(seen));
                    }
                }
            });
        }
    }
}

#[test]
fn private_access_to_a_shared_page_converts_to_pending_unless_shutdown() {
    for policy_ in POLICIES {
        with_td(16, policy(policy_), |model, fake, counters| {
            assert_eq!(map_gpa(model, fake, 0x3000 | S, 0x1000), 0);
            fake.log.lock().unwrap().clear();
            let effect = fault(model, fake, 0x3010, Access::READ);
            assert_eq!(load(&counters.wrong_state_accesses), 1);
            if policy_ == WrongStatePolicy::Shutdown {
                assert_eq!(
                    effect,
                    FaultEffect::Shutdown(ShutdownReason::PrivateAccessToShared { gpa: 0x3010 })
                );
                assert_eq!(model.state(0x3000), Some(PageState::Shared));
            } else {
                // SEPT_VE_DISABLE: never a #VE; KVM + QEMU convert, KVM AUGs.
                assert_eq!(effect, FaultEffect::Retry);
                assert_eq!(model.state(0x3000), Some(PageState::Pending));
                assert_eq!(fake.log(), [Op::Map(0x3000, PageState::Pending), Op::Flush]);
                // The retried access meets the pending page: KVM kills the TD.
                assert_eq!(
                    fault(model, fake, 0x3010, Access::READ),
                    FaultEffect::Shutdown(ShutdownReason::PrivateAccessToPending { gpa: 0x3010 })
                );
                assert_eq!(load(&counters.wrong_state_accesses), 2);
            }
        });
    }
}

#[test]
fn private_access_to_a_pending_page_shuts_down_in_every_policy() {
    for policy_ in POLICIES {
        with_td(16, policy(policy_), |model, fake, counters| {
            model.initialise(0x4000, 0x5000, PageState::Pending, fake);
            assert_eq!(
                fault(model, fake, 0x4000, Access::FETCH),
                FaultEffect::Shutdown(ShutdownReason::PrivateAccessToPending { gpa: 0x4000 })
            );
            assert_eq!(load(&counters.wrong_state_accesses), 1);
            assert_eq!(model.state(0x4000), Some(PageState::Pending));
        });
    }
}

#[test]
fn private_access_outside_ram_and_gpas_above_gpaw_shut_down() {
    for policy_ in POLICIES {
        with_td(16, policy(policy_), |model, fake, counters| {
            assert_eq!(
                fault(model, fake, 0x10_0000, Access::READ),
                FaultEffect::Shutdown(ShutdownReason::PrivateAccessOutsideRam { gpa: 0x10_0000 })
            );
            assert_eq!(
                fault(model, fake, 1 << 48 | 0x1000, Access::READ),
                FaultEffect::Shutdown(ShutdownReason::GpaAboveGpaw {
                    gpa: 1 << 48 | 0x1000
                })
            );
            assert_eq!(load(&counters.wrong_state_accesses), 0);
            assert_eq!(load(&counters.nested_page_faults), 2);
        });
    }
}

#[test]
fn a_fault_whose_alias_is_mapped_by_now_is_retried_as_spurious() {
    with_td(16, Options::default(), |model, fake, counters| {
        assert_eq!(fault(model, fake, 0x1000, Access::READ), FaultEffect::Retry);
        assert_eq!(map_gpa(model, fake, 0x2000 | S, 0x1000), 0);
        assert_eq!(
            fault(model, fake, 0x2000 | S, Access::WRITE),
            FaultEffect::Retry
        );
        assert_eq!(load(&counters.spurious_faults), 2);
        assert_eq!(load(&counters.wrong_state_accesses), 0);
    });
}

#[test]
fn a_fault_on_a_held_page_is_retried_in_every_policy() {
    for policy_ in POLICIES {
        with_td(16, policy(policy_), |model, fake, counters| {
            model.initialise(0x5000, 0x6000, PageState::Pending, fake);
            fake.log.lock().unwrap().clear();
            for gpa in [0x1000, 0x5000] {
                hold_page(model, gpa);
                for alias in [gpa, gpa | S] {
                    assert_eq!(fault(model, fake, alias, Access::WRITE), FaultEffect::Retry);
                }
                TdModel::release_unchanged(model.slot(gpa).unwrap());
            }
            assert_eq!(load(&counters.spurious_faults), 4);
            assert_eq!(load(&counters.wrong_state_accesses), 0);
            assert!(fake.log().is_empty());
        });
    }
}

#[test]
fn shutdown_reasons_print_one_line_with_the_gpa() {
    for reason in [
        ShutdownReason::GpaAboveGpaw { gpa: 0x1234 },
        ShutdownReason::PrivateAccessOutsideRam { gpa: 0x1234 },
        ShutdownReason::PrivateAccessToPending { gpa: 0x1234 },
        ShutdownReason::PrivateAccessToShared { gpa: 0x1234 },
        ShutdownReason::SharedAccessToPrivate { gpa: 0x1234 },
        ShutdownReason::AcceptOutsideRam { gpa: 0x1234 },
        ShutdownReason::AcceptOfShared { gpa: 0x1234 },
    ] {
        let line = format!("{reason}");
        assert!(line.contains("0x1234") && !line.contains('\n'), "{line}");
    }
}

#[test]
fn initialise_sets_states_and_mappings_inside_memory_only() {
    with_td(16, Options::default(), |model, fake, _| {
        model.initialise(0xe000, 0x20_0000, PageState::Pending, fake);
        assert_eq!(model.state(0xd000), Some(PageState::Private));
        assert_eq!(model.state(0xe000), Some(PageState::Pending));
        assert_eq!(model.state(0xf000), Some(PageState::Pending));
        assert_eq!(model.state(0x10000), None);
        assert_eq!(fake.log().len(), 2);
    });
}

// ---------------------------------------------------------------- defect (a): races

/// Checks, like a reader on another vCPU, that a page's state byte and its
/// mapping agree whenever the byte says the page is not held: a seqlock read
/// over the fake's per-page generation.
fn reader(fake: &Fake, stop: &AtomicBool, pages: usize) -> u64 {
    let mut checked = 0;
    while !stop.load(Ordering::SeqCst) {
        std::thread::yield_now();
        for page in 0..pages {
            let g1 = fake.generation[page].load(Ordering::SeqCst);
            let b1 = fake.states[page].load(Ordering::SeqCst);
            let mapped = fake.mapped[page].load(Ordering::SeqCst);
            let b2 = fake.states[page].load(Ordering::SeqCst);
            let g2 = fake.generation[page].load(Ordering::SeqCst);
            if g1 != g2 || g1 % 2 == 1 || b1 != b2 || b1 & BUSY != 0 {
                continue;
            }
            checked += 1;
            if bits(PageState::from_byte(b1)) != mapped {
                fake.violation(format!(
                    "page {page:#x}: a reader saw state byte {b1:#x} with mapping {mapped:#b}"
                ));
            }
        }
    }
    checked
}

#[test]
fn racing_accepts_of_one_page_succeed_once_and_insert_the_alias_once() {
    let states = states(64);
    let counters = Counters::new();
    let model = TdModel::new(&states, 48, 3, Options::default(), &counters);
    let mut fake = Fake::new(&states);
    fake.slow = true;
    let barrier = Barrier::new(2);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let r = s.spawn(|| reader(&fake, &stop, 8));
        for _ in 0..300 {
            assert_eq!(map_gpa(&model, &fake, S, 8 * 4096), 0);
            assert_eq!(map_gpa(&model, &fake, 0, 8 * 4096), 0);
            let ok = [AtomicU64::new(0), AtomicU64::new(0)];
            std::thread::scope(|s| {
                for ok in &ok {
                    let (model, fake, barrier) = (&model, &fake, &barrier);
                    s.spawn(move || {
                        barrier.wait();
                        for p in 0..8u64 {
                            let status = accept(model, fake, p * 4096).0;
                            assert!(
                                matches!(status, 0 | 0x0000_0B0A_0000_0000 | 0x8000_0200_0000_0001),
                                "{status:#x}"
                            );
                            if status == 0 {
                                ok.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                    });
                }
            });
            let total = load(&ok[0]) + load(&ok[1]);
            assert_eq!(total, 8, "every page accepted exactly once");
        }
        stop.store(true, Ordering::SeqCst);
        let checked = r.join().unwrap();
        println!("ACCEPT vs ACCEPT: the reader checked {checked} stable states");
        assert!(checked > 0, "the reader checked something");
    });
    fake.assert_clean();
    assert_eq!(load(&counters.accepts[0]), 2400);
    println!(
        "ACCEPT vs ACCEPT: 2400 pages accepted once each, {} OPERAND_BUSY answers",
        load(&counters.accept_busy)
    );
}

#[test]
fn map_gpa_to_shared_racing_accept_keeps_state_and_mappings_together() {
    let states = states(64);
    let counters = Counters::new();
    let model = TdModel::new(&states, 48, 3, Options::default(), &counters);
    let mut fake = Fake::new(&states);
    fake.slow = true;
    let barrier = Barrier::new(2);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let r = s.spawn(|| reader(&fake, &stop, 8));
        for round in 0..300u64 {
            assert_eq!(map_gpa(&model, &fake, S, 8 * 4096), 0);
            assert_eq!(map_gpa(&model, &fake, 0, 8 * 4096), 0);
            std::thread::scope(|s| {
                let (m, f, b) = (&model, &fake, &barrier);
                s.spawn(move || {
                    b.wait();
                    // Alternate one MapGPA for the range and one per page.
                    if round % 2 == 0 {
                        assert_eq!(map_gpa(m, f, S, 8 * 4096), 0);
                    } else {
                        for p in 0..8u64 {
                            assert_eq!(map_gpa(m, f, (p * 4096) | S, 4096), 0);
                        }
                    }
                });
                s.spawn(move || {
                    b.wait();
                    for p in 0..8u64 {
                        accept(m, f, p * 4096);
                    }
                });
            });
            for p in 0..8 {
                fake.check_agree(p, "after both returned");
            }
        }
        stop.store(true, Ordering::SeqCst);
        assert!(r.join().unwrap() > 0);
    });
    fake.assert_clean();
}

#[test]
fn implicit_conversions_racing_map_gpa_and_accept_keep_state_and_mappings_together() {
    let states = states(16);
    let counters = Counters::new();
    let model = TdModel::new(&states, 48, 3, Options::default(), &counters);
    let mut fake = Fake::new(&states);
    fake.slow = true;
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let r = s.spawn(|| reader(&fake, &stop, 4));
        let (m, f) = (&model, &fake);
        let workers = [
            s.spawn(move || {
                for i in 0..400u64 {
                    let p = (i % 4) * 4096;
                    map_gpa(m, f, p | if i % 3 == 0 { 0 } else { S }, 4096);
                }
            }),
            s.spawn(move || {
                for i in 0..400u64 {
                    accept(m, f, (i % 4) * 4096);
                }
            }),
            s.spawn(move || {
                for i in 0..400u64 {
                    // Shared-alias accesses: converted to shared (Convert).
                    let effect = fault(m, f, ((i % 4) * 4096) | S, Access::READ);
                    assert!(matches!(effect, FaultEffect::Retry), "{effect:?}");
                }
            }),
        ];
        for w in workers {
            w.join().unwrap();
        }
        stop.store(true, Ordering::SeqCst);
        assert!(r.join().unwrap() > 0);
    });
    fake.assert_clean();
    assert!(load(&counters.implicit_conversions) > 0);
}

/// The hostile MapGPA (`mapgpa-fail-after=5`): the first call of more than
/// 5 pages converts 5, answers INVALID_OPERAND with no resume point and
/// leaves the range unmapped; later calls are honest; any access to the
/// range (a MapGPA, an ACCEPT, a fault) is counted, and a fault stops the TD.
#[test]
fn hostile_map_gpa_fails_after_k_pages_and_counts_accesses_to_the_range() {
    let options = Options {
        map_gpa_fail_after: 5,
        ..Options::default()
    };
    with_td(64, options, |model, fake, counters| {
        // Small calls are honest.
        assert_eq!(map_gpa(model, fake, 0x1000 | S, 0x1000), 0);
        assert_eq!(
            map_gpa(model, fake, 0x10000 | S, 0x10000),
            vmcall_status::INVALID_OPERAND
        );
        for page in 0..16u64 {
            let gpa = 0x10000 + page * 0x1000;
            let want = if page < 5 {
                PageState::Pending
            } else {
                PageState::Private
            };
            assert_eq!(model.state(gpa), Some(want), "{gpa:#x}");
        }
        assert_eq!(load(&counters.quarantine_accesses), 0);
        // One-shot: the next large call is honest.
        assert_eq!(map_gpa(model, fake, 0x30000 | S, 0x10000), 0);
        assert_eq!(load(&counters.quarantine_accesses), 0);
        // Touching the range: counted, and a fault stops the TD.
        assert_eq!(map_gpa(model, fake, 0x1f000, 0x1000), 0);
        assert_eq!(load(&counters.quarantine_accesses), 1);
        assert_eq!(
            fault(model, fake, 0x12000 | S, Access::READ),
            FaultEffect::Shutdown(ShutdownReason::QuarantinedAccess { gpa: 0x12000 | S })
        );
        assert_eq!(load(&counters.quarantine_accesses), 2);
    });
}

/// The hostile RETRYs (`mapgpa-bad-retry=`): R11 past the range, unaligned,
/// or stuck at the start (answered again while the guest retries, then
/// counted); each leaves the range as the quarantine.
#[test]
fn hostile_map_gpa_retries_name_bad_resume_points() {
    for (kind, resume) in [
        (BadRetry::Outside, 0x20000u64),
        (BadRetry::Unaligned, 0x11008),
        (BadRetry::Stuck, 0x10000),
    ] {
        let options = Options {
            map_gpa_bad_retry: Some(kind),
            ..Options::default()
        };
        with_td(64, options, |model, fake, counters| {
            assert_eq!(
                map_gpa(model, fake, 0x1000 | S, 0x1000),
                0,
                "{kind:?}: one page is honest"
            );
            let mut regs = vmcall_regs(subfn::MAP_GPA, 0x10000 | S, 0x10000);
            assert_eq!(call(model, fake, &mut regs), TdcallEffect::Resume);
            assert_eq!(
                (regs.r10, regs.r11),
                (vmcall_status::RETRY, resume | S),
                "{kind:?}"
            );
            let converted = if kind == BadRetry::Stuck { 0 } else { 1 };
            for page in 0..16u64 {
                let want = if page < converted {
                    PageState::Pending
                } else {
                    PageState::Private
                };
                assert_eq!(model.state(0x10000 + page * 0x1000), Some(want), "{kind:?}");
            }
            // A stuck VMM answers the guest's retries the same way.
            let again = map_gpa(model, fake, 0x10000 | S, 0x10000);
            let want = if kind == BadRetry::Stuck {
                vmcall_status::RETRY
            } else {
                0
            };
            assert_eq!(again, want, "{kind:?}");
            let counted = u64::from(kind != BadRetry::Stuck);
            assert_eq!(load(&counters.quarantine_accesses), counted, "{kind:?}");
        });
    }
}

/// The hostile ACCEPT (`accept-fail=`): after a MapGPA to private of 16
/// pages, the 4th page's ACCEPT fails as asked (busy on every retry); the
/// pages before it accept; the rest of the run is the quarantine, and
/// touching it is counted.
#[test]
fn hostile_accept_fails_at_the_fourth_page_of_a_run() {
    for (kind, class) in [
        (AcceptFail::Mismatch, status::TDX_PAGE_SIZE_MISMATCH),
        (AcceptFail::Error, status::TDX_OPERAND_INVALID),
        (AcceptFail::Busy, status::TDX_OPERAND_BUSY),
    ] {
        let options = Options {
            accept_fail: Some(kind),
            ..Options::default()
        };
        with_td(64, options, |model, fake, counters| {
            // ACCEPTs before the knob is armed (a guest's boot) change
            // nothing of it (they once used up the busy answers).
            for _ in 0..100 {
                accept(model, fake, 0x30000);
            }
            assert_eq!(map_gpa(model, fake, 0x10000 | S, 0x10000), 0);
            assert_eq!(map_gpa(model, fake, 0x10000, 0x10000), 0);
            for page in 0..3u64 {
                assert_eq!(
                    accept(model, fake, 0x10000 + page * 0x1000).0,
                    0,
                    "{kind:?}"
                );
            }
            let tries = if kind == AcceptFail::Busy { 20 } else { 1 };
            for _ in 0..tries {
                let (rax, _) = accept(model, fake, 0x13000);
                assert_eq!(rax & 0xffff_ffff_0000_0000, class, "{kind:?}: {rax:#x}");
            }
            assert_eq!(load(&counters.quarantine_accesses), 0, "{kind:?}");
            accept(model, fake, 0x14000);
            assert_eq!(
                load(&counters.quarantine_accesses),
                1,
                "{kind:?}: touching the rest counts"
            );
        });
    }
}

#[test]
fn sept_ve_reports_attributes_without_it_and_raises_ve_for_a_pending_page() {
    let options = Options {
        sept_ve: true,
        ..Options::default()
    };
    with_td(16, options, |model, fake, counters| {
        let info = tdx_hypercall::vp_info(&ModelCall { model, fake }).unwrap();
        assert_eq!(info.attributes & (1 << 28), 0, "SEPT_VE_DISABLE clear");
        assert_eq!(vm_rd(model, fake, field::ATTRIBUTES), (0, 0));
        // tdh_mng_init.c: PENDING_VE_DISABLE starts as SEPT_VE_DISABLE.
        assert_eq!(vm_rd(model, fake, field::TD_CTLS), (0, 0));
        model.initialise(0x4000, 0x5000, PageState::Pending, fake);
        assert_eq!(
            fault(model, fake, 0x4000, Access::READ),
            FaultEffect::VirtualizationException
        );
        assert_eq!(load(&counters.ve_by_reason[48]), 1);
        assert_eq!(load(&counters.wrong_state_accesses), 1);
        assert_eq!(model.state(0x4000), Some(PageState::Pending));
    });
    assert!(
        !Options::default().to_string().contains("sept-ve"),
        "off by default"
    );
}

/// `implicit-convert`: the 4th page of the first run going private is taken
/// once its last page is accepted; the guest's first access to it is its
/// news (#VE with `sept-ve`, else the TD dies, as under KVM) and not its
/// wrong-state access; every later access counts as touching the quarantine.
#[test]
fn hostile_vmm_takes_a_page_behind_the_guests_back() {
    for sept_ve in [true, false] {
        let options = Options {
            implicit_convert: true,
            sept_ve,
            ..Options::default()
        };
        with_td(64, options, |model, fake, counters| {
            assert_eq!(map_gpa(model, fake, 0x10000 | S, 0x10000), 0);
            assert_eq!(map_gpa(model, fake, 0x10000, 0x10000), 0);
            for page in 0..15u64 {
                assert_eq!(accept(model, fake, 0x10000 + page * 0x1000).0, 0);
            }
            assert_eq!(model.state(0x13000), Some(PageState::Private), "not yet");
            assert_eq!(accept(model, fake, 0x1f000).0, 0);
            assert_eq!(model.state(0x13000), Some(PageState::Pending), "taken");
            assert_eq!(load(&counters.implicit_conversions), 1);
            let news = fault(model, fake, 0x13000, Access::READ);
            if sept_ve {
                assert_eq!(news, FaultEffect::VirtualizationException);
            } else {
                assert_eq!(
                    news,
                    FaultEffect::Shutdown(ShutdownReason::PrivateAccessToPending { gpa: 0x13000 })
                );
            }
            assert_eq!(load(&counters.wrong_state_accesses), 0);
            assert_eq!(load(&counters.quarantine_accesses), 0);
            assert_eq!(
                fault(model, fake, 0x13008, Access::READ),
                FaultEffect::Shutdown(ShutdownReason::QuarantinedAccess { gpa: 0x13008 })
            );
            assert_eq!(load(&counters.quarantine_accesses), 1);
            // Taken once: the next run going private keeps its pages.
            assert_eq!(map_gpa(model, fake, 0x20000 | S, 0x10000), 0);
            assert_eq!(map_gpa(model, fake, 0x20000, 0x10000), 0);
            for page in 0..16u64 {
                assert_eq!(accept(model, fake, 0x20000 + page * 0x1000).0, 0);
            }
            assert_eq!(model.state(0x23000), Some(PageState::Private));
        });
    }
}
