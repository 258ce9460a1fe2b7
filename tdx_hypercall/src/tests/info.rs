use super::FnTdCall;
use crate::sim::{Call, FakeTdxModule};
use crate::{is_tdx_cpuid_signature, veinfo_get, vp_info, TdcallError, TdcallRegs, VeInfo, VpInfo};

#[test]
fn vp_info_gpaw_48() {
    let f = FakeTdxModule::new(48, 1 << 20);
    f.set_vcpus(4, 8, 3);
    f.set_attributes(0x1000_0000_0000_0001);
    let info = vp_info(&f).unwrap();
    assert_eq!(
        info,
        VpInfo {
            gpaw: 48,
            attributes: 0x1000_0000_0000_0001,
            num_vcpus: 4,
            max_vcpus: 8,
            vcpu_index: 3
        }
    );
    assert_eq!(info.shared_bit(), 1 << 47);
    assert_eq!(f.calls(), vec![Call::VpInfo]);
}

#[test]
fn vp_info_gpaw_52() {
    let f = FakeTdxModule::new(52, 1 << 20);
    let info = vp_info(&f).unwrap();
    assert_eq!(info.gpaw, 52);
    assert_eq!(info.shared_bit(), 1 << 51);
    assert_eq!((info.num_vcpus, info.max_vcpus, info.vcpu_index), (1, 1, 0));
}

#[test]
fn vp_info_splits_r8_and_ignores_reserved_bits() {
    let t = FnTdCall(|r: &mut TdcallRegs| {
        assert_eq!(r.rax, 1);
        r.rax = 0;
        r.rcx = 0xFFFF_FFC0 | 32;
        r.rdx = 7;
        r.r8 = 0x0000_0100_0000_00FF;
        r.r9 = 0xDEAD_0000_0000_0005;
    });
    let info = vp_info(&t).unwrap();
    assert_eq!(
        info,
        VpInfo {
            gpaw: 32,
            attributes: 7,
            num_vcpus: 0xFF,
            max_vcpus: 0x100,
            vcpu_index: 5
        }
    );
    assert_eq!(info.shared_bit(), 1 << 31);
}

#[test]
fn vp_info_bad_gpaw() {
    for gpaw in [0u8, 1, 31, 53, 63] {
        let f = FakeTdxModule::new(gpaw, 1 << 20);
        assert_eq!(vp_info(&f), Err(TdcallError::BadGpaw(gpaw)));
    }
    // A hand-built VpInfo with a bad width never yields a bogus shift.
    for gpaw in [0u8, 31, 53, 64, 65, 255] {
        let info = VpInfo {
            gpaw,
            attributes: 0,
            num_vcpus: 0,
            max_vcpus: 0,
            vcpu_index: 0,
        };
        assert_eq!(info.shared_bit(), 0);
    }
}

#[test]
fn vp_info_tdcall_failure() {
    let f = FakeTdxModule::new(48, 1 << 20);
    f.fail_leaf(1, 0xC000_0100_0000_0000);
    assert_eq!(vp_info(&f), Err(TdcallError::Status(0xC000_0100_0000_0000)));
}

#[test]
fn veinfo_get_returns_latched_info() {
    let f = FakeTdxModule::new(48, 1 << 20);
    let ve = VeInfo {
        exit_reason: 48,
        exit_qualification: 0x181,
        guest_linear_address: 0xFFFF_8880_0010_0008,
        guest_physical_address: (1 << 47) | 0x10_0008,
        instruction_length: 3,
        instruction_info: 0xABCD_1234,
    };
    f.set_veinfo(ve);
    let got = veinfo_get(&f).unwrap();
    assert_eq!(got, ve);
    assert!(got.is_ept_violation());
    let r = f.regs_log()[0];
    assert_eq!((r.rax, r.rcx), (3, 0));
    assert_eq!(f.calls(), vec![Call::VeinfoGet]);

    f.set_veinfo(VeInfo {
        exit_reason: 30,
        ..ve
    });
    let got = veinfo_get(&f).unwrap();
    assert_eq!(got.exit_reason, 30);
    assert!(!got.is_ept_violation());
}

#[test]
fn veinfo_get_splits_r10() {
    let t = FnTdCall(|r: &mut TdcallRegs| {
        r.rax = 0;
        r.rcx = 12;
        r.rdx = 1;
        r.r8 = 2;
        r.r9 = 3;
        r.r10 = 0x1122_3344_0000_0004;
    });
    assert_eq!(
        veinfo_get(&t),
        Ok(VeInfo {
            exit_reason: 12,
            exit_qualification: 1,
            guest_linear_address: 2,
            guest_physical_address: 3,
            instruction_length: 4,
            instruction_info: 0x1122_3344
        })
    );
    let f = FakeTdxModule::new(48, 1 << 20);
    f.fail_leaf(3, 0xC000_0B07_0000_0000);
    assert_eq!(
        veinfo_get(&f),
        Err(TdcallError::Status(0xC000_0B07_0000_0000))
    );
}

/// EBX, ECX, EDX as CPUID returns them for `text` in EBX:EDX:ECX order.
fn signature_registers(text: &[u8; 12]) -> (u32, u32, u32) {
    let word = |i: usize| u32::from_le_bytes([text[i], text[i + 1], text[i + 2], text[i + 3]]);
    (word(0), word(8), word(4))
}

#[test]
fn tdx_cpuid_signature_is_intel_tdx_in_ebx_edx_ecx_order() {
    let (ebx, ecx, edx) = signature_registers(b"IntelTDX    ");
    assert!(is_tdx_cpuid_signature(ebx, ecx, edx));
    // The same words in CPUID vendor order (EBX:ECX:EDX) are not it.
    assert!(!is_tdx_cpuid_signature(ebx, edx, ecx));
    // What a non-TD CPU may answer: zeros, another leaf's data, a near miss.
    assert!(!is_tdx_cpuid_signature(0, 0, 0));
    assert!(!is_tdx_cpuid_signature(0x0000_0340, 0, 0x0000_0001));
    let (ebx, ecx, edx) = signature_registers(b"IntelTDX   \0");
    assert!(!is_tdx_cpuid_signature(ebx, ecx, edx));
}
