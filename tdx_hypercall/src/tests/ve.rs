use crate::sim::{Call, FakeTdxModule};
use crate::ve::{
    emulate_instruction, exit_reason, Instruction, IoAccess, IoDirection, VeError, VeRegs,
};
use crate::{CpuidResult, IoSize, VeInfo, VmcallError, VmcallStatus};

const RIP: u64 = 0xffff_ffff_8010_0000;
const IF: u64 = 1 << 9;

fn ve(exit_reason: u32, exit_qualification: u64, instruction_length: u32) -> VeInfo {
    VeInfo {
        exit_reason,
        exit_qualification,
        instruction_length,
        ..VeInfo::default()
    }
}

/// Qualification of `size`-byte port access to `port`, IN if `input`.
fn io(size: u64, input: bool, port: u16) -> u64 {
    (size - 1) | (u64::from(input) << 3) | (u64::from(port) << 16)
}

fn regs(rax: u64, rcx: u64, rdx: u64) -> VeRegs {
    VeRegs {
        rax,
        rbx: 0x5555_5555_5555_5555,
        rcx,
        rdx,
        rip: RIP,
        rflags: 0x2,
    }
}

#[test]
fn io_qualification_decodes_size_direction_and_port() {
    assert_eq!(
        IoAccess::decode(io(1, false, 0x3f8)),
        Ok(IoAccess {
            size: IoSize::Byte,
            direction: IoDirection::Out,
            port: 0x3f8
        })
    );
    assert_eq!(
        IoAccess::decode(io(2, true, 0x3fd)),
        Ok(IoAccess {
            size: IoSize::Word,
            direction: IoDirection::In,
            port: 0x3fd
        })
    );
    // Bit 6 (immediate operand) and bits above 31 do not change the access.
    assert_eq!(
        IoAccess::decode(io(4, false, 0xf4) | 1 << 6 | 0xdead << 32),
        Ok(IoAccess {
            size: IoSize::Dword,
            direction: IoDirection::Out,
            port: 0xf4
        })
    );
}

#[test]
fn string_io_and_odd_sizes_are_refused() {
    let outs = io(1, false, 0x3f8) | 1 << 4;
    assert_eq!(
        IoAccess::decode(outs),
        Err(VeError::StringIo {
            qualification: outs
        })
    );
    for size_minus_one in [2u64, 4, 5, 6, 7] {
        let q = size_minus_one | 0x60 << 16;
        assert_eq!(
            IoAccess::decode(q),
            Err(VeError::BadIoSize { qualification: q })
        );
    }
}

#[test]
fn out_sends_the_low_bytes_of_rax_and_steps_over_the_instruction() {
    let f = FakeTdxModule::new(48, 1 << 20);
    let mut r = regs(0x1234_5678_9abc_de41, 0, 0);
    let before = r;
    let done = emulate_instruction(&f, &ve(exit_reason::IO, io(1, false, 0x3f8), 1), &mut r);
    assert!(matches!(done, Ok(Instruction::Io(_))), "{done:?}");
    assert_eq!(
        f.calls(),
        vec![Call::IoWrite {
            size: 1,
            port: 0x3f8,
            value: 0x41
        }]
    );
    assert_eq!(
        r,
        VeRegs {
            rip: RIP + 1,
            ..before
        }
    );
    let mut r = regs(0xffff_ffff_0000_0011, 0, 0);
    emulate_instruction(&f, &ve(exit_reason::IO, io(4, false, 0xf4), 1), &mut r).unwrap();
    assert_eq!(f.io_port(0xf4), Some(0x11));
}

#[test]
fn in_merges_al_and_ax_and_zero_extends_eax() {
    let f = FakeTdxModule::new(48, 1 << 20);
    f.set_io_port(0x3fd, 0xaabb_cc60);
    let cases = [
        (1, 0x1111_2222_3333_4444, 0x1111_2222_3333_4460),
        (2, 0x1111_2222_3333_4444, 0x1111_2222_3333_cc60),
        (4, 0x1111_2222_3333_4444, 0x0000_0000_aabb_cc60),
    ];
    for (size, rax, want) in cases {
        let mut r = regs(rax, 0, 0);
        emulate_instruction(&f, &ve(exit_reason::IO, io(size, true, 0x3fd), 2), &mut r).unwrap();
        assert_eq!(r.rax, want, "{size}-byte IN");
        assert_eq!(r.rip, RIP + 2);
    }
}

#[test]
fn cpuid_uses_eax_ecx_and_zero_extends_all_four_outputs() {
    let f = FakeTdxModule::new(48, 1 << 20);
    let answer = CpuidResult {
        eax: 0x806f8,
        ebx: 0x0800,
        ecx: 1 << 21,
        edx: 1 << 9,
    };
    f.set_cpuid(1, 0, answer);
    let mut r = regs(0xffff_ffff_0000_0001, 0xffff_ffff_0000_0000, 0x77);
    emulate_instruction(&f, &ve(exit_reason::CPUID, 0, 2), &mut r).unwrap();
    assert_eq!(
        f.calls(),
        vec![Call::Cpuid {
            leaf: 1,
            subleaf: 0
        }]
    );
    assert_eq!(
        (r.rax, r.rbx, r.rcx, r.rdx, r.rip),
        (0x806f8, 0x0800, 1 << 21, 1 << 9, RIP + 2)
    );
}

#[test]
fn rdmsr_splits_into_edx_eax_and_wrmsr_joins_them() {
    let f = FakeTdxModule::new(48, 1 << 20);
    f.set_msr(0x1b, 0x0000_0001_fee0_0d00);
    let mut r = regs(
        0xdead_beef_dead_beef,
        0xffff_ffff_0000_001b,
        0xdead_beef_dead_beef,
    );
    emulate_instruction(&f, &ve(exit_reason::RDMSR, 0, 2), &mut r).unwrap();
    assert_eq!((r.rax, r.rdx), (0xfee0_0d00, 1));

    let mut r = regs(0xffff_ffff_0000_0900, 0xc000_0080, 0xffff_ffff_0000_0002);
    emulate_instruction(&f, &ve(exit_reason::WRMSR, 0, 2), &mut r).unwrap();
    assert_eq!(f.msr(0xc000_0080), Some(0x0000_0002_0000_0900));
    assert_eq!(r.rip, RIP + 2);
}

#[test]
fn hlt_tells_the_vmm_whether_interrupts_can_wake_it() {
    let f = FakeTdxModule::new(48, 1 << 20);
    let mut after_sti = regs(0, 0, 0);
    after_sti.rflags |= IF;
    emulate_instruction(&f, &ve(exit_reason::HLT, 0, 1), &mut after_sti).unwrap();
    let mut with_cli = regs(0, 0, 0);
    emulate_instruction(&f, &ve(exit_reason::HLT, 0, 1), &mut with_cli).unwrap();
    assert_eq!(
        f.calls(),
        vec![
            Call::Hlt {
                interrupts_blocked: 0
            },
            Call::Hlt {
                interrupts_blocked: 1
            }
        ]
    );
    assert_eq!((after_sti.rip, with_cli.rip), (RIP + 1, RIP + 1));
}

#[test]
fn ept_violation_and_unknown_reasons_make_no_call_and_change_nothing() {
    let f = FakeTdxModule::new(48, 1 << 20);
    let cases = [
        (
            ve(exit_reason::EPT_VIOLATION, 0x181, 0),
            VeError::EptViolation,
        ),
        (ve(16, 0, 2), VeError::UnsupportedExitReason(16)),
        (
            ve(exit_reason::CPUID, 0, 0),
            VeError::BadInstructionLength(0),
        ),
        (
            ve(exit_reason::HLT, 0, 16),
            VeError::BadInstructionLength(16),
        ),
    ];
    for (info, want) in cases {
        let mut r = regs(1, 2, 3);
        let before = r;
        assert_eq!(emulate_instruction(&f, &info, &mut r), Err(want));
        assert_eq!(r, before);
    }
    assert_eq!(f.calls(), vec![]);
}

#[test]
fn a_failed_tdvmcall_leaves_the_registers_alone() {
    let f = FakeTdxModule::new(48, 1 << 20);
    // RDMSR of an MSR the fake VMM does not know answers INVALID_OPERAND.
    let mut r = regs(1, 0x123, 3);
    let before = r;
    assert_eq!(
        emulate_instruction(&f, &ve(exit_reason::RDMSR, 0, 2), &mut r),
        Err(VeError::Vmcall(VmcallError::Status(
            VmcallStatus::InvalidOperand
        )))
    );
    assert_eq!(r, before);
}
