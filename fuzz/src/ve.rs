//! Target `ve_info`: a #VE as the TDX module and the VMM describe it, through
//! `tdx_hypercall::veinfo_get`, `ve::Instruction::decode` and
//! `ve::emulate_instruction`.
//!
//! Input: the interrupted context's registers (RAX, RBX, RCX, RDX, RIP,
//! RFLAGS: 6 little-endian u64), then the answers of every TDCALL in order
//! (RAX, RCX, RDX, R8..R15 as the TDX module or VMM leaves them: 11 u64 per
//! call, zeros once the input ends). The first call is TDG.VP.VEINFO.GET.
//!
//! Checked:
//! - VEINFO.GET: the leaf is 3; it fails exactly when the status is not 0,
//!   and its fields are the registers' (RCX, RDX, R8, R9, R10 split);
//! - decode: an EPT violation is never an instruction to do; an instruction
//!   has a length in 1..=15; an I/O access has the qualification's size,
//!   direction and port and is never a string instruction;
//! - emulate: it returns what decode returned; when decode failed it made
//!   no TDCALL; on any error the registers are unchanged; on success it made
//!   exactly one TDVMCALL (leaf 0, the R10-R15 bitmap 0xFC00 only: nothing
//!   else exposed to the VMM, the right sub-function and arguments), RIP
//!   advanced by the length, RFLAGS kept, and only the registers the
//!   instruction writes changed, zero-extended where a 32-bit write is.

use crate::memory::Input;
use std::cell::RefCell;
use tdx_hypercall::ve::{emulate_instruction, Instruction, IoAccess, IoDirection, VeError, VeRegs};
use tdx_hypercall::{leaf, subfn, veinfo_get, IoSize, TdCall, TdcallRegs, VeInfo};

/// The TDVMCALL register bitmap of the GHCI: R10..R15 only.
const EXPOSE_R10_R15: u64 = 0xfc00;

/// A TDX module and VMM whose every answer is the fuzzer's; it records what
/// was asked.
struct Host<'a> {
    answers: RefCell<Input<'a>>,
    calls: RefCell<Vec<TdcallRegs>>,
}

impl TdCall for Host<'_> {
    fn tdcall(&self, regs: &mut TdcallRegs) {
        self.calls.borrow_mut().push(*regs);
        let mut answers = self.answers.borrow_mut();
        *regs = TdcallRegs {
            rax: answers.u64(),
            rcx: answers.u64(),
            rdx: answers.u64(),
            r8: answers.u64(),
            r9: answers.u64(),
            r10: answers.u64(),
            r11: answers.u64(),
            r12: answers.u64(),
            r13: answers.u64(),
            r14: answers.u64(),
            r15: answers.u64(),
        };
    }
}

impl Host<'_> {
    fn calls(&self) -> Vec<TdcallRegs> {
        self.calls.borrow().clone()
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let regs = VeRegs {
        rax: input.u64(),
        rbx: input.u64(),
        rcx: input.u64(),
        rdx: input.u64(),
        rip: input.u64(),
        rflags: input.u64(),
    };
    let answer = {
        let mut peek = Input::new(input.rest());
        core::array::from_fn::<u64, 6, _>(|_| peek.u64())
    };
    let host = Host {
        answers: RefCell::new(Input::new(input.rest())),
        calls: RefCell::new(Vec::new()),
    };

    let ve = veinfo_get(&host);
    let calls = host.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].rax, leaf::TDG_VP_VEINFO_GET);
    let [status, rcx, rdx, r8, r9, r10] = answer;
    let ve = match ve {
        Ok(ve) => ve,
        Err(_) => {
            assert_ne!(status, 0, "VEINFO.GET failed with status 0");
            return;
        }
    };
    assert_eq!(status, 0, "VEINFO.GET succeeded with status {status:#x}");
    assert_eq!(
        ve,
        VeInfo {
            exit_reason: rcx as u32,
            exit_qualification: rdx,
            guest_linear_address: r8,
            guest_physical_address: r9,
            instruction_length: r10 as u32,
            instruction_info: (r10 >> 32) as u32,
        }
    );

    let decoded = Instruction::decode(&ve);
    check_decode(&ve, decoded);

    let mut after = regs;
    let result = emulate_instruction(&host, &ve, &mut after);
    let vmcalls = &host.calls()[1..];
    match (decoded, result) {
        (Err(d), Err(e)) => {
            assert_eq!(d, e);
            assert!(vmcalls.is_empty(), "a TDVMCALL for an event not decoded");
        }
        (Ok(_), Err(VeError::Vmcall(_))) => assert_eq!(vmcalls.len(), 1),
        (Ok(d), Ok(e)) => {
            assert_eq!(d, e);
            assert_eq!(vmcalls.len(), 1);
            check_emulated(&ve, e, &regs, &after, &vmcalls[0]);
        }
        (d, e) => panic!("decode gave {d:?}, emulate {e:?}"),
    }
    if result.is_err() {
        assert_eq!(after, regs, "registers changed on an error");
    }
    for call in vmcalls {
        assert_eq!(call.rax, leaf::TDG_VP_VMCALL);
        assert_eq!(
            call.rcx, EXPOSE_R10_R15,
            "TDVMCALL exposes more than R10-R15"
        );
    }
}

fn check_decode(ve: &VeInfo, decoded: Result<Instruction, VeError>) {
    if ve.is_ept_violation() {
        assert_eq!(decoded, Err(VeError::EptViolation));
    }
    let Ok(instruction) = decoded else { return };
    assert!((1..=15).contains(&ve.instruction_length));
    let q = ve.exit_qualification;
    let expected_reason = match instruction {
        Instruction::Io(IoAccess {
            size,
            direction,
            port,
        }) => {
            assert_eq!(q & 1 << 4, 0, "string I/O decoded");
            assert_eq!(size.bytes(), (q & 7) + 1);
            assert_eq!(direction == IoDirection::In, q & 1 << 3 != 0);
            assert_eq!(port, (q >> 16) as u16);
            30
        }
        Instruction::Cpuid => 10,
        Instruction::Rdmsr => 31,
        Instruction::Wrmsr => 32,
        Instruction::Hlt => 12,
    };
    assert_eq!(ve.exit_reason, expected_reason);
}

fn check_emulated(
    ve: &VeInfo,
    instruction: Instruction,
    before: &VeRegs,
    after: &VeRegs,
    call: &TdcallRegs,
) {
    assert_eq!(
        after.rip,
        before.rip.wrapping_add(u64::from(ve.instruction_length))
    );
    assert_eq!(after.rflags, before.rflags);
    let low32 = |v: u64| v <= u64::from(u32::MAX);
    let same = |a: u64, b: u64| a == b;
    match instruction {
        Instruction::Io(IoAccess {
            size,
            direction,
            port,
        }) => {
            assert_eq!(call.r11, subfn::IO);
            assert_eq!(call.r12, size.bytes());
            assert_eq!(call.r14, u64::from(port));
            assert!(same(after.rbx, before.rbx) && same(after.rcx, before.rcx));
            assert!(same(after.rdx, before.rdx));
            match direction {
                IoDirection::Out => {
                    assert_eq!(call.r13, 1);
                    assert_eq!(call.r15, before.rax & mask(size));
                    assert_eq!(after.rax, before.rax);
                }
                IoDirection::In => {
                    assert_eq!(call.r13, 0);
                    match size {
                        IoSize::Dword => assert!(low32(after.rax)),
                        _ => assert_eq!(after.rax & !mask(size), before.rax & !mask(size)),
                    }
                }
            }
        }
        Instruction::Cpuid => {
            assert_eq!(call.r11, subfn::CPUID);
            assert_eq!(call.r12, before.rax & 0xffff_ffff);
            assert_eq!(call.r13, before.rcx & 0xffff_ffff);
            for v in [after.rax, after.rbx, after.rcx, after.rdx] {
                assert!(low32(v));
            }
        }
        Instruction::Rdmsr => {
            assert_eq!(call.r11, subfn::RDMSR);
            assert_eq!(call.r12, before.rcx & 0xffff_ffff);
            assert!(low32(after.rax) && low32(after.rdx));
            assert!(same(after.rbx, before.rbx) && same(after.rcx, before.rcx));
        }
        Instruction::Wrmsr => {
            assert_eq!(call.r11, subfn::WRMSR);
            assert_eq!(call.r12, before.rcx & 0xffff_ffff);
            assert_eq!(call.r13, before.rdx << 32 | (before.rax & 0xffff_ffff));
            assert_eq!((after.rax, after.rbx), (before.rax, before.rbx));
            assert_eq!((after.rcx, after.rdx), (before.rcx, before.rdx));
        }
        Instruction::Hlt => {
            assert_eq!(call.r11, subfn::HLT);
            assert_eq!(call.r12, u64::from(before.rflags & 1 << 9 == 0));
            assert_eq!((after.rax, after.rbx), (before.rax, before.rbx));
            assert_eq!((after.rcx, after.rdx), (before.rcx, before.rdx));
        }
    }
}

fn mask(size: IoSize) -> u64 {
    match size {
        IoSize::Byte => 0xff,
        IoSize::Word => 0xffff,
        IoSize::Dword => 0xffff_ffff,
    }
}
