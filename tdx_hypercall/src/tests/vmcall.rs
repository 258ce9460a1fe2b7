use super::FnTdCall;
use crate::sim::{Call, FakeTdxModule};
use crate::{
    cpuid, hlt, io_read, io_write, mmio_read, mmio_write, rdmsr, report_fatal_error, vmcall, wrmsr,
    CpuidResult, IoSize, MmioSize, TdcallError, TdcallRegs, VmcallArgs, VmcallError, VmcallOutput,
    VmcallStatus,
};

fn fake() -> FakeTdxModule {
    FakeTdxModule::new(48, 1 << 20)
}

/// The register file a TDVMCALL must present to the TDX module.
fn vmcall_regs(subfunction: u64, r12: u64, r13: u64, r14: u64, r15: u64) -> TdcallRegs {
    TdcallRegs {
        rax: 0,
        rcx: 0xFC00,
        r10: 0,
        r11: subfunction,
        r12,
        r13,
        r14,
        r15,
        ..TdcallRegs::default()
    }
}

fn only_regs(f: &FakeTdxModule) -> TdcallRegs {
    let log = f.regs_log();
    assert_eq!(log.len(), 1);
    log[0]
}

#[test]
fn status_round_trip() {
    let cases = [
        (0, VmcallStatus::Success),
        (1, VmcallStatus::Retry),
        (0x8000_0000_0000_0000, VmcallStatus::InvalidOperand),
        (0x8000_0000_0000_0002, VmcallStatus::AlignError),
        (0x8000_0000_0000_0003, VmcallStatus::SubfuncUnsupported),
        (
            0x8000_0000_0000_0001,
            VmcallStatus::Other(0x8000_0000_0000_0001),
        ),
        (2, VmcallStatus::Other(2)),
    ];
    for (raw, st) in cases {
        assert_eq!(VmcallStatus::from_raw(raw), st);
        assert_eq!(st.raw(), raw);
    }
}

#[test]
fn generic_vmcall_marshals_and_unmarshals() {
    let t = FnTdCall(|r: &mut TdcallRegs| {
        assert_eq!(*r, vmcall_regs(0x1234, 5, 6, 7, 8));
        r.rax = 0;
        r.r10 = 1;
        r.r11 = 0x11;
        r.r12 = 0x12;
        r.r13 = 0x13;
        r.r14 = 0x14;
        r.r15 = 0x15;
    });
    let out = vmcall(
        &t,
        VmcallArgs {
            subfunction: 0x1234,
            r12: 5,
            r13: 6,
            r14: 7,
            r15: 8,
        },
    );
    assert_eq!(
        out,
        Ok(VmcallOutput {
            status: VmcallStatus::Retry,
            r11: 0x11,
            r12: 0x12,
            r13: 0x13,
            r14: 0x14,
            r15: 0x15
        })
    );
}

#[test]
fn nonzero_rax_is_a_tdx_module_failure() {
    let t = FnTdCall(|r: &mut TdcallRegs| {
        r.rax = 0xC000_0100_0000_0000;
        r.r10 = 0;
    });
    assert_eq!(
        vmcall(&t, VmcallArgs::default()),
        Err(TdcallError::Status(0xC000_0100_0000_0000))
    );
    assert_eq!(
        rdmsr(&t, 0x10),
        Err(VmcallError::Tdcall(TdcallError::Status(
            0xC000_0100_0000_0000
        )))
    );
}

#[test]
fn unknown_subfunction_is_unsupported() {
    let f = fake();
    let out = vmcall(
        &f,
        VmcallArgs {
            subfunction: 0x10002,
            ..VmcallArgs::default()
        },
    )
    .unwrap();
    assert_eq!(out.status, VmcallStatus::SubfuncUnsupported);
    assert_eq!(
        f.calls(),
        vec![Call::UnknownVmcall {
            subfunction: 0x10002
        }]
    );
}

#[test]
fn cpuid_marshals() {
    let f = fake();
    let want = CpuidResult {
        eax: 0xA,
        ebx: 0xB,
        ecx: 0xC,
        edx: 0xD,
    };
    f.set_cpuid(7, 1, want);
    assert_eq!(cpuid(&f, 7, 1), Ok(want));
    assert_eq!(only_regs(&f), vmcall_regs(10, 7, 1, 0, 0));
    assert_eq!(
        f.calls(),
        vec![Call::Cpuid {
            leaf: 7,
            subleaf: 1
        }]
    );
    assert_eq!(cpuid(&f, 0x4000_0000, 0), Ok(CpuidResult::default()));

    let t = FnTdCall(|r: &mut TdcallRegs| {
        r.rax = 0;
        r.r10 = 0;
        r.r12 = 0xFFFF_FFFF_0000_0001;
        r.r13 = 2;
        r.r14 = 3;
        r.r15 = 0x1_0000_0004;
    });
    assert_eq!(
        cpuid(&t, 0, 0),
        Ok(CpuidResult {
            eax: 1,
            ebx: 2,
            ecx: 3,
            edx: 4
        })
    );
}

#[test]
fn cpuid_failure_status() {
    let f = fake();
    f.fail_vmcall(10, 1);
    assert_eq!(
        cpuid(&f, 1, 0),
        Err(VmcallError::Status(VmcallStatus::Retry))
    );
}

#[test]
fn hlt_marshals() {
    let f = fake();
    assert_eq!(hlt(&f, true), Ok(()));
    assert_eq!(only_regs(&f), vmcall_regs(12, 1, 0, 0, 0));
    let f = fake();
    assert_eq!(hlt(&f, false), Ok(()));
    assert_eq!(only_regs(&f), vmcall_regs(12, 0, 0, 0, 0));
    assert_eq!(
        f.calls(),
        vec![Call::Hlt {
            interrupts_blocked: 0
        }]
    );
}

#[test]
fn io_read_marshals_and_masks() {
    let f = fake();
    f.set_io_port(0x71, 0x1234_5678);
    assert_eq!(io_read(&f, 0x71, IoSize::Word), Ok(0x5678));
    assert_eq!(only_regs(&f), vmcall_regs(30, 2, 0, 0x71, 0));
    assert_eq!(io_read(&f, 0x71, IoSize::Dword), Ok(0x1234_5678));
    assert_eq!(io_read(&f, 0x3F8, IoSize::Byte), Ok(0xFF));
    assert_eq!(f.regs_log()[2], vmcall_regs(30, 1, 0, 0x3F8, 0));

    // A VMM returning garbage in the upper bits cannot leak them through.
    let t = FnTdCall(|r: &mut TdcallRegs| {
        r.rax = 0;
        r.r10 = 0;
        r.r11 = 0xFFFF_FFFF_FFFF_FF41;
    });
    assert_eq!(io_read(&t, 0x60, IoSize::Byte), Ok(0x41));
}

#[test]
fn io_write_marshals_and_masks() {
    let f = fake();
    assert_eq!(io_write(&f, 0xF4, IoSize::Byte, 0x1234), Ok(()));
    assert_eq!(only_regs(&f), vmcall_regs(30, 1, 1, 0xF4, 0x34));
    assert_eq!(
        f.calls(),
        vec![Call::IoWrite {
            size: 1,
            port: 0xF4,
            value: 0x34
        }]
    );
    assert_eq!(io_write(&f, 0xCF8, IoSize::Dword, 0x8000_0000), Ok(()));
    assert_eq!(f.regs_log()[1], vmcall_regs(30, 4, 1, 0xCF8, 0x8000_0000));
    assert_eq!(f.io_port(0xCF8), Some(0x8000_0000));
}

#[test]
fn rdmsr_wrmsr_marshal() {
    let f = fake();
    f.set_msr(0x1B, 0xFEE0_0900);
    assert_eq!(rdmsr(&f, 0x1B), Ok(0xFEE0_0900));
    assert_eq!(only_regs(&f), vmcall_regs(31, 0x1B, 0, 0, 0));
    assert_eq!(
        rdmsr(&f, 0xC000_0080),
        Err(VmcallError::Status(VmcallStatus::InvalidOperand))
    );

    let f = fake();
    assert_eq!(wrmsr(&f, 0x6E0, 0x1122_3344_5566_7788), Ok(()));
    assert_eq!(
        only_regs(&f),
        vmcall_regs(32, 0x6E0, 0x1122_3344_5566_7788, 0, 0)
    );
    assert_eq!(f.msr(0x6E0), Some(0x1122_3344_5566_7788));
    assert_eq!(rdmsr(&f, 0x6E0), Ok(0x1122_3344_5566_7788));
}

#[test]
fn mmio_marshals_and_masks() {
    let addr = (1 << 47) | 0xFEC0_0000;
    let f = fake();
    f.set_mmio(addr, 0x0102_0304_0506_0708);
    assert_eq!(
        mmio_read(&f, addr, MmioSize::Qword),
        Ok(0x0102_0304_0506_0708)
    );
    assert_eq!(only_regs(&f), vmcall_regs(48, 8, 0, addr, 0));
    assert_eq!(mmio_read(&f, addr, MmioSize::Word), Ok(0x0708));
    assert_eq!(f.regs_log()[1], vmcall_regs(48, 2, 0, addr, 0));

    let f = fake();
    assert_eq!(
        mmio_write(&f, addr + 0x10, MmioSize::Dword, 0xAAAA_BBBB_CCCC_DDDD),
        Ok(())
    );
    assert_eq!(
        only_regs(&f),
        vmcall_regs(48, 4, 1, addr + 0x10, 0xCCCC_DDDD)
    );
    assert_eq!(f.mmio(addr + 0x10), Some(0xCCCC_DDDD));
    assert_eq!(mmio_write(&f, addr, MmioSize::Byte, 0x1FF), Ok(()));
    assert_eq!(f.regs_log()[1], vmcall_regs(48, 1, 1, addr, 0xFF));
}

#[test]
fn report_fatal_error_marshals() {
    let f = fake();
    assert_eq!(report_fatal_error(&f, 0xDEAD), Ok(()));
    assert_eq!(only_regs(&f), vmcall_regs(0x10003, 0xDEAD, 0, 0, 0));
    assert_eq!(
        f.calls(),
        vec![Call::ReportFatalError {
            code: 0xDEAD,
            data: 0
        }]
    );
}
