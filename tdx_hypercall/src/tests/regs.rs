use super::{FnTdCall, KIB4, MIB};
use crate::sim::{Call, FakeTdxModule, PageState};
use crate::{
    accept_range, hlt, map_gpa, page_accept, veinfo_get, vp_info, AcceptSize, Gpa, MapTarget,
    TdCall, TdcallRegs,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[test]
fn each_leaf_presents_rax_and_rcx_as_documented() {
    let f = FakeTdxModule::new(48, 8 * MIB);
    f.set_state(Gpa(0)..Gpa(8 * MIB), PageState::Pending);
    vp_info(&f).unwrap();
    veinfo_get(&f).unwrap();
    page_accept(&f, Gpa(2 * MIB), AcceptSize::Size2M).unwrap();
    page_accept(&f, Gpa(KIB4), AcceptSize::Size4K).unwrap();
    map_gpa(&f, Gpa(4 * MIB), MIB, MapTarget::Shared, 1 << 47).unwrap();
    hlt(&f, false).unwrap();
    let log = f.regs_log();
    let rax_rcx: Vec<(u64, u64)> = log.iter().map(|r| (r.rax, r.rcx)).collect();
    assert_eq!(
        rax_rcx,
        vec![
            (1, 0),
            (3, 0),
            (6, (2 * MIB) | 1),
            (6, KIB4),
            (0, 0xFC00),
            (0, 0xFC00),
        ]
    );
    // VP.INFO and VEINFO.GET take no other input; TDVMCALL always passes R10 = 0.
    assert_eq!(
        log[0],
        TdcallRegs {
            rax: 1,
            ..TdcallRegs::default()
        }
    );
    assert_eq!(
        log[1],
        TdcallRegs {
            rax: 3,
            ..TdcallRegs::default()
        }
    );
    assert_eq!(
        log[4],
        TdcallRegs {
            rax: 0,
            rcx: 0xFC00,
            r10: 0,
            r11: 0x10001,
            r12: (4 * MIB) | (1 << 47),
            r13: MIB,
            ..TdcallRegs::default()
        }
    );
    assert_eq!(log[5].r10, 0);
    assert_eq!(
        f.calls(),
        vec![
            Call::VpInfo,
            Call::VeinfoGet,
            Call::Accept {
                gpa: Gpa(2 * MIB),
                size: AcceptSize::Size2M
            },
            Call::Accept {
                gpa: Gpa(KIB4),
                size: AcceptSize::Size4K
            },
            Call::MapGpa {
                r12: (4 * MIB) | (1 << 47),
                r13: MIB
            },
            Call::Hlt {
                interrupts_blocked: 0
            },
        ]
    );
    let c = f.counters();
    assert_eq!(
        (
            c.tdcalls,
            c.vp_info,
            c.veinfo_get,
            c.accept_calls,
            c.vmcalls
        ),
        (6, 1, 1, 2, 2)
    );
    assert_eq!((c.accepted_2m, c.accepted_4k, c.map_gpa_calls), (1, 1, 1));
}

#[test]
fn malformed_calls_are_rejected_by_the_fake() {
    let f = FakeTdxModule::new(48, 8 * MIB);
    let mut r = TdcallRegs {
        rax: 6,
        rcx: 3,
        ..TdcallRegs::default()
    };
    f.tdcall(&mut r);
    assert_eq!(r.rax, 0xC000_0100_0000_0000);
    let mut r = TdcallRegs {
        rax: 0,
        rcx: 0xFC00,
        r10: 1,
        r11: 0x10001,
        ..TdcallRegs::default()
    };
    f.tdcall(&mut r);
    assert_eq!(r.rax, 0xC000_0100_0000_0000);
    let mut r = TdcallRegs {
        rax: 99,
        ..TdcallRegs::default()
    };
    f.tdcall(&mut r);
    assert_eq!(r.rax, 0xC000_0100_0000_0000);
    assert_eq!(
        f.calls(),
        vec![
            Call::BadAccept { rcx: 3 },
            Call::BadVmcall {
                rcx: 0xFC00,
                r10: 1,
                r11: 0x10001
            },
            Call::UnknownLeaf { rax: 99 },
        ]
    );
}

#[test]
fn call_hook_runs_before_the_module_without_the_lock() {
    let f = Arc::new(FakeTdxModule::new(48, 8 * MIB));
    let seen = Arc::new(AtomicU64::new(0));
    let (weak, seen2) = (Arc::downgrade(&f), Arc::clone(&seen));
    f.set_call_hook(Box::new(move |regs| {
        // Calling back into the fake would deadlock if its lock were held.
        let f = weak.upgrade().unwrap();
        let before = f.counters().tdcalls;
        seen2.store(before * 100 + regs.rax, Ordering::SeqCst);
    }));
    vp_info(&*f).unwrap();
    assert_eq!(seen.load(Ordering::SeqCst), 1);
    veinfo_get(&*f).unwrap();
    assert_eq!(seen.load(Ordering::SeqCst), 103);
    f.clear_call_hook();
    vp_info(&*f).unwrap();
    assert_eq!(seen.load(Ordering::SeqCst), 103);
}

#[test]
fn fake_is_send_and_sync_and_usable_from_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<FakeTdxModule>();

    let f = Arc::new(FakeTdxModule::new(48, 8 * MIB));
    f.set_state(Gpa(0)..Gpa(8 * MIB), PageState::Pending);
    let handles: Vec<_> = (0..4u64)
        .map(|i| {
            let f = Arc::clone(&f);
            std::thread::spawn(move || accept_range(&*f, Gpa(i * 2 * MIB), Gpa((i + 1) * 2 * MIB)))
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap().unwrap().accepted_2m, 1);
    }
    assert!(f.all_in_state(Gpa(0)..Gpa(8 * MIB), PageState::Private));
    assert_eq!(f.counters().accepted_2m, 4);
}

#[test]
fn gpa_helpers() {
    assert_eq!(Gpa(0x1234_5678).page_offset(), 0x678);
    assert!(Gpa(2 * MIB).is_aligned(2 * MIB));
    assert!(!Gpa(2 * MIB + KIB4).is_aligned(2 * MIB));
    assert!(!Gpa(0).is_aligned(0));
    assert!(!Gpa(0).is_aligned(3));
    assert_eq!(Gpa(KIB4).checked_add(KIB4), Some(Gpa(2 * KIB4)));
    assert_eq!(Gpa(u64::MAX).checked_add(1), None);
    // `&T` is itself a TdCall, so wrappers can be handed references to references.
    let t = FnTdCall(|r: &mut TdcallRegs| {
        r.rax = 0;
        r.rcx = 48;
    });
    assert_eq!(vp_info(&&t).unwrap().gpaw, 48);
}
