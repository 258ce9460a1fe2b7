use super::{FnTdCall, GIB, KIB4, MIB, SB47};
use crate::sim::{Call, FakeTdxModule, MapReply, PageState};
use crate::{
    map_gpa, Gpa, MapGpaError, MapGpaErrorKind, MapGpaStats, MapTarget, TdcallError, VmcallStatus,
};

const INVALID_OPERAND: u64 = 0x8000_0000_0000_0000;

fn fake() -> FakeTdxModule {
    FakeTdxModule::new(48, 256 * MIB)
}

fn map_calls(f: &FakeTdxModule) -> Vec<(u64, u64)> {
    f.calls()
        .into_iter()
        .map(|c| match c {
            Call::MapGpa { r12, r13 } => (r12, r13),
            other => panic!("unexpected call {other:?}"),
        })
        .collect()
}

#[test]
fn success_in_one_call() {
    let f = fake();
    let r = map_gpa(&f, Gpa(MIB), 2 * MIB, MapTarget::Shared, SB47);
    assert_eq!(
        r,
        Ok(MapGpaStats {
            calls: 1,
            retries: 0
        })
    );
    assert_eq!(map_calls(&f), vec![(MIB | SB47, 2 * MIB)]);
    assert!(f.all_in_state(Gpa(MIB)..Gpa(3 * MIB), PageState::Shared));
    assert_eq!(f.state(Gpa(MIB - KIB4)), PageState::Private);
    assert_eq!(f.state(Gpa(3 * MIB)), PageState::Private);
}

#[test]
fn to_private_in_one_call_leaves_pages_pending() {
    let f = fake();
    f.set_state(Gpa(0)..Gpa(4 * MIB), PageState::Shared);
    let r = map_gpa(&f, Gpa(0), 4 * MIB, MapTarget::Private, SB47);
    assert_eq!(
        r,
        Ok(MapGpaStats {
            calls: 1,
            retries: 0
        })
    );
    assert_eq!(map_calls(&f), vec![(0, 4 * MIB)]);
    assert_eq!(
        f.count_state(Gpa(0)..Gpa(4 * MIB), PageState::Pending),
        1024
    );
}

#[test]
fn retry_with_shared_bit_in_r11_to_shared() {
    let f = fake();
    f.retry_every(MIB);
    let r = map_gpa(&f, Gpa(8 * MIB), 4 * MIB, MapTarget::Shared, SB47);
    assert_eq!(
        r,
        Ok(MapGpaStats {
            calls: 4,
            retries: 3
        })
    );
    assert_eq!(
        map_calls(&f),
        vec![
            ((8 * MIB) | SB47, 4 * MIB),
            ((9 * MIB) | SB47, 3 * MIB),
            ((10 * MIB) | SB47, 2 * MIB),
            ((11 * MIB) | SB47, MIB),
        ]
    );
    assert!(f.all_in_state(Gpa(8 * MIB)..Gpa(12 * MIB), PageState::Shared));
    assert_eq!(f.state(Gpa(12 * MIB)), PageState::Private);
}

#[test]
fn retry_without_shared_bit_in_r11_to_shared() {
    let f = fake();
    f.retry_every(MIB);
    f.r11_carries_shared_bit(false);
    let r = map_gpa(&f, Gpa(8 * MIB), 3 * MIB, MapTarget::Shared, SB47);
    assert_eq!(
        r,
        Ok(MapGpaStats {
            calls: 3,
            retries: 2
        })
    );
    assert_eq!(
        map_calls(&f),
        vec![
            ((8 * MIB) | SB47, 3 * MIB),
            ((9 * MIB) | SB47, 2 * MIB),
            ((10 * MIB) | SB47, MIB),
        ]
    );
    assert!(f.all_in_state(Gpa(8 * MIB)..Gpa(11 * MIB), PageState::Shared));
}

#[test]
fn retry_to_private() {
    let f = fake();
    f.set_state(Gpa(0)..Gpa(256 * MIB), PageState::Shared);
    f.retry_every(2 * MIB);
    let r = map_gpa(&f, Gpa(2 * MIB), 5 * MIB, MapTarget::Private, SB47);
    assert_eq!(
        r,
        Ok(MapGpaStats {
            calls: 3,
            retries: 2
        })
    );
    assert_eq!(
        map_calls(&f),
        vec![(2 * MIB, 5 * MIB), (4 * MIB, 3 * MIB), (6 * MIB, MIB)]
    );
    assert!(f.all_in_state(Gpa(2 * MIB)..Gpa(7 * MIB), PageState::Pending));
    assert_eq!(f.state(Gpa(7 * MIB)), PageState::Shared);
    assert_eq!(f.state(Gpa(2 * MIB - KIB4)), PageState::Shared);
}

#[test]
fn retry_every_64m_over_200m_takes_four_calls() {
    let f = fake();
    f.retry_every(64 * MIB);
    let r = map_gpa(&f, Gpa(0), 200 * MIB, MapTarget::Shared, SB47);
    assert_eq!(
        r,
        Ok(MapGpaStats {
            calls: 4,
            retries: 3
        })
    );
    assert_eq!(
        map_calls(&f),
        vec![
            (SB47, 200 * MIB),
            ((64 * MIB) | SB47, 136 * MIB),
            ((128 * MIB) | SB47, 72 * MIB),
            ((192 * MIB) | SB47, 8 * MIB),
        ]
    );
    assert_eq!(
        f.count_state(Gpa(0)..Gpa(200 * MIB), PageState::Shared),
        200 * MIB / KIB4
    );
    assert_eq!(f.state(Gpa(200 * MIB)), PageState::Private);
    assert_eq!(f.counters().map_gpa_calls, 4);
    assert_eq!(f.counters().map_gpa_retries, 3);
}

/// Runs one map_gpa over [8M, 12M) with the scripted replies; returns the error.
fn scripted_err(target: MapTarget, replies: Vec<MapReply>) -> (FakeTdxModule, MapGpaError) {
    let f = fake();
    f.script_map_replies(replies);
    let e = map_gpa(&f, Gpa(8 * MIB), 4 * MIB, target, SB47).unwrap_err();
    (f, e)
}

#[test]
fn r11_below_start_is_rejected() {
    let r11 = (8 * MIB - KIB4) | SB47;
    let (f, e) = scripted_err(MapTarget::Shared, vec![MapReply::Retry { r11 }]);
    assert_eq!(
        e,
        MapGpaError {
            converted_up_to: Gpa(8 * MIB),
            kind: MapGpaErrorKind::ResumeOutOfRange { r11 }
        }
    );
    assert_eq!(f.calls().len(), 1);
}

#[test]
fn r11_before_current_position_is_rejected() {
    // Progress to 10M, then a resume point inside the range but behind the current position.
    let r11 = (9 * MIB) | SB47;
    let (f, e) = scripted_err(
        MapTarget::Shared,
        vec![
            MapReply::ConvertThenRetry {
                up_to: 10 * MIB,
                r11: (10 * MIB) | SB47,
            },
            MapReply::Retry { r11 },
        ],
    );
    assert_eq!(
        e,
        MapGpaError {
            converted_up_to: Gpa(10 * MIB),
            kind: MapGpaErrorKind::ResumeOutOfRange { r11 }
        }
    );
    assert_eq!(
        map_calls(&f),
        vec![((8 * MIB) | SB47, 4 * MIB), ((10 * MIB) | SB47, 2 * MIB)]
    );
}

#[test]
fn r11_at_end_is_rejected() {
    for r11 in [(12 * MIB) | SB47, 12 * MIB] {
        let (f, e) = scripted_err(MapTarget::Shared, vec![MapReply::Retry { r11 }]);
        assert_eq!(
            e,
            MapGpaError {
                converted_up_to: Gpa(8 * MIB),
                kind: MapGpaErrorKind::ResumeOutOfRange { r11 }
            }
        );
        assert_eq!(f.calls().len(), 1);
    }
}

#[test]
fn r11_above_end_is_rejected_after_progress() {
    let r11 = (64 * MIB) | SB47;
    let (f, e) = scripted_err(
        MapTarget::Shared,
        vec![
            MapReply::ConvertThenRetry {
                up_to: 9 * MIB,
                r11: (9 * MIB) | SB47,
            },
            MapReply::Retry { r11 },
        ],
    );
    assert_eq!(
        e,
        MapGpaError {
            converted_up_to: Gpa(9 * MIB),
            kind: MapGpaErrorKind::ResumeOutOfRange { r11 }
        }
    );
    assert_eq!(f.calls().len(), 2);
}

#[test]
fn r11_with_wrong_encoding_is_rejected() {
    // To private, the shared bit has no business in R11.
    let r11 = (10 * MIB) | SB47;
    let (_, e) = scripted_err(MapTarget::Private, vec![MapReply::Retry { r11 }]);
    assert_eq!(
        e,
        MapGpaError {
            converted_up_to: Gpa(8 * MIB),
            kind: MapGpaErrorKind::ResumeOutOfRange { r11 }
        }
    );
    // To shared, a different high bit is not the shared bit.
    let r11 = (10 * MIB) | (1 << 46);
    let (_, e) = scripted_err(MapTarget::Shared, vec![MapReply::Retry { r11 }]);
    assert_eq!(
        e,
        MapGpaError {
            converted_up_to: Gpa(8 * MIB),
            kind: MapGpaErrorKind::ResumeOutOfRange { r11 }
        }
    );
    // Shared bit plus extra high bits.
    let r11 = (10 * MIB) | SB47 | (1 << 50);
    let (_, e) = scripted_err(MapTarget::Shared, vec![MapReply::Retry { r11 }]);
    assert_eq!(e.kind, MapGpaErrorKind::ResumeOutOfRange { r11 });
}

#[test]
fn r11_override_applies_to_normal_retries() {
    let f = fake();
    f.retry_every(MIB);
    // A VMM that reports a resume point one page past where it really stopped.
    f.r11_override(|natural| natural + 0x800);
    let e = map_gpa(&f, Gpa(8 * MIB), 4 * MIB, MapTarget::Shared, SB47).unwrap_err();
    assert_eq!(
        e,
        MapGpaError {
            converted_up_to: Gpa(8 * MIB),
            kind: MapGpaErrorKind::ResumeUnaligned {
                r11: (9 * MIB + 0x800) | SB47
            }
        }
    );
}

#[test]
fn r11_unaligned_is_rejected() {
    let r11 = (8 * MIB + 0x10) | SB47;
    let (f, e) = scripted_err(MapTarget::Shared, vec![MapReply::Retry { r11 }]);
    assert_eq!(
        e,
        MapGpaError {
            converted_up_to: Gpa(8 * MIB),
            kind: MapGpaErrorKind::ResumeUnaligned { r11 }
        }
    );
    assert_eq!(f.calls().len(), 1);

    let r11 = 10 * MIB + 0x800;
    let (f, e) = scripted_err(
        MapTarget::Private,
        vec![
            MapReply::ConvertThenRetry {
                up_to: 9 * MIB,
                r11: 9 * MIB,
            },
            MapReply::Retry { r11 },
        ],
    );
    assert_eq!(
        e,
        MapGpaError {
            converted_up_to: Gpa(9 * MIB),
            kind: MapGpaErrorKind::ResumeUnaligned { r11 }
        }
    );
    assert_eq!(f.calls().len(), 2);
}

#[test]
fn r11_stuck_fails_after_exactly_four_calls() {
    let stuck = MapReply::Retry {
        r11: (8 * MIB) | SB47,
    };
    let (f, e) = scripted_err(MapTarget::Shared, vec![stuck; 10]);
    assert_eq!(
        e,
        MapGpaError {
            converted_up_to: Gpa(8 * MIB),
            kind: MapGpaErrorKind::NoProgress
        }
    );
    assert_eq!(map_calls(&f), vec![((8 * MIB) | SB47, 4 * MIB); 4]);
}

#[test]
fn r11_stuck_after_progress_reports_progress_point() {
    let mut replies = vec![MapReply::ConvertThenRetry {
        up_to: 10 * MIB,
        r11: 10 * MIB,
    }];
    replies.extend([MapReply::Retry { r11: 10 * MIB }; 10]);
    let (f, e) = scripted_err(MapTarget::Private, replies);
    assert_eq!(
        e,
        MapGpaError {
            converted_up_to: Gpa(10 * MIB),
            kind: MapGpaErrorKind::NoProgress
        }
    );
    assert_eq!(f.calls().len(), 5);
}

#[test]
fn progress_resets_the_stall_counter() {
    let f = fake();
    let at_start = MapReply::Retry {
        r11: (8 * MIB) | SB47,
    };
    let at_x = MapReply::Retry {
        r11: (10 * MIB) | SB47,
    };
    f.script_map_replies([
        at_start,
        at_start,
        MapReply::ConvertThenRetry {
            up_to: 10 * MIB,
            r11: (10 * MIB) | SB47,
        },
        at_x,
        at_x,
        at_x,
    ]);
    let r = map_gpa(&f, Gpa(8 * MIB), 4 * MIB, MapTarget::Shared, SB47);
    assert_eq!(
        r,
        Ok(MapGpaStats {
            calls: 7,
            retries: 6
        })
    );
    let calls = map_calls(&f);
    assert_eq!(calls.len(), 7);
    assert_eq!(calls[2], ((8 * MIB) | SB47, 4 * MIB));
    assert_eq!(calls[3], ((10 * MIB) | SB47, 2 * MIB));
    assert_eq!(calls[6], ((10 * MIB) | SB47, 2 * MIB));
    assert!(f.all_in_state(Gpa(8 * MIB)..Gpa(12 * MIB), PageState::Shared));
}

#[test]
fn failure_mid_range_reports_last_resume_point() {
    let f = fake();
    f.retry_every(64 * MIB);
    f.fail_map_at(Gpa(100 * MIB), INVALID_OPERAND);
    let e = map_gpa(&f, Gpa(0), 200 * MIB, MapTarget::Shared, SB47).unwrap_err();
    assert_eq!(
        e,
        MapGpaError {
            converted_up_to: Gpa(64 * MIB),
            kind: MapGpaErrorKind::Status(VmcallStatus::InvalidOperand)
        }
    );
    assert_eq!(
        map_calls(&f),
        vec![(SB47, 200 * MIB), ((64 * MIB) | SB47, 136 * MIB)]
    );
    // The VMM did convert part of the unknown region: the caller must not assume either state.
    assert!(f.all_in_state(Gpa(0)..Gpa(100 * MIB), PageState::Shared));
    assert_eq!(f.state(Gpa(100 * MIB)), PageState::Private);
}

#[test]
fn failure_after_scripted_progress() {
    let x = 9 * MIB + 5 * KIB4;
    let (f, e) = scripted_err(
        MapTarget::Shared,
        vec![
            MapReply::ConvertThenRetry {
                up_to: x,
                r11: x | SB47,
            },
            MapReply::Status(INVALID_OPERAND),
        ],
    );
    assert_eq!(
        e,
        MapGpaError {
            converted_up_to: Gpa(x),
            kind: MapGpaErrorKind::Status(VmcallStatus::InvalidOperand)
        }
    );
    assert_eq!(f.calls().len(), 2);
}

#[test]
fn fail_map_at_on_chunk_boundary_fails_next_call() {
    let f = fake();
    f.retry_every(MIB);
    f.fail_map_at(Gpa(MIB), 0x8000_0000_0000_0002);
    let e = map_gpa(&f, Gpa(0), 4 * MIB, MapTarget::Shared, SB47).unwrap_err();
    assert_eq!(
        e,
        MapGpaError {
            converted_up_to: Gpa(MIB),
            kind: MapGpaErrorKind::Status(VmcallStatus::AlignError)
        }
    );
    assert_eq!(f.calls().len(), 2);
    assert_eq!(f.state(Gpa(MIB)), PageState::Private);
}

#[test]
fn other_statuses_and_tdcall_failures() {
    let f = fake();
    f.fail_vmcall(0x10001, 0x8000_0000_0000_0003);
    let e = map_gpa(&f, Gpa(0), KIB4, MapTarget::Shared, SB47).unwrap_err();
    assert_eq!(
        e,
        MapGpaError {
            converted_up_to: Gpa(0),
            kind: MapGpaErrorKind::Status(VmcallStatus::SubfuncUnsupported)
        }
    );

    let f = fake();
    f.fail_leaf(0, 0xC000_0100_0000_0000);
    let e = map_gpa(&f, Gpa(0), KIB4, MapTarget::Private, SB47).unwrap_err();
    assert_eq!(
        e.kind,
        MapGpaErrorKind::Tdcall(TdcallError::Status(0xC000_0100_0000_0000))
    );
    assert_eq!(f.calls().len(), 1);

    // A status value the enum does not name is kept raw.
    let f = fake();
    f.script_map_replies([MapReply::Status(0x42)]);
    let e = map_gpa(&f, Gpa(0), KIB4, MapTarget::Private, SB47).unwrap_err();
    assert_eq!(e.kind, MapGpaErrorKind::Status(VmcallStatus::Other(0x42)));
}

#[test]
fn bad_inputs_make_no_call() {
    let cases: &[(u64, u64, u64, MapGpaErrorKind)] = &[
        (0x800, KIB4, SB47, MapGpaErrorKind::UnalignedStart),
        (KIB4, 0x1800, SB47, MapGpaErrorKind::UnalignedLength),
        (KIB4, 0, SB47, MapGpaErrorKind::ZeroLength),
        (!0xfff, 2 * KIB4, 1 << 63, MapGpaErrorKind::RangeOverflow),
        (0, KIB4, 0, MapGpaErrorKind::BadSharedBit),
        (0, KIB4, SB47 | (1 << 46), MapGpaErrorKind::BadSharedBit),
        (0, KIB4, 1 << 12, MapGpaErrorKind::BadSharedBit),
        (0, KIB4, 1 << 3, MapGpaErrorKind::BadSharedBit),
        (SB47, KIB4, SB47, MapGpaErrorKind::SharedBitInRange),
        (SB47 | MIB, KIB4, SB47, MapGpaErrorKind::SharedBitInRange),
        (
            SB47 - KIB4,
            2 * KIB4,
            SB47,
            MapGpaErrorKind::SharedBitInRange,
        ),
        (1 << 48, KIB4, SB47, MapGpaErrorKind::SharedBitInRange),
    ];
    for &(start, len, sb, kind) in cases {
        for target in [MapTarget::Shared, MapTarget::Private] {
            let f = fake();
            let e = map_gpa(&f, Gpa(start), len, target, sb).unwrap_err();
            assert_eq!(
                e,
                MapGpaError {
                    converted_up_to: Gpa(start),
                    kind
                },
                "start {start:#x} len {len:#x} sb {sb:#x}"
            );
            assert!(f.calls().is_empty());
        }
    }
    // The last page below the shared bit is fine.
    let t = FnTdCall(|r: &mut crate::TdcallRegs| {
        r.rax = 0;
        r.r10 = 0;
    });
    assert_eq!(
        map_gpa(&t, Gpa(SB47 - KIB4), KIB4, MapTarget::Shared, SB47),
        Ok(MapGpaStats {
            calls: 1,
            retries: 0
        })
    );
}

#[test]
fn gpaw_52_shared_bit_and_large_range() {
    let f = FakeTdxModule::new(52, 3 * GIB);
    f.retry_every(GIB);
    let sb = 1 << 51;
    let r = map_gpa(&f, Gpa(0), 3 * GIB, MapTarget::Shared, sb);
    assert_eq!(
        r,
        Ok(MapGpaStats {
            calls: 3,
            retries: 2
        })
    );
    assert_eq!(
        map_calls(&f),
        vec![(sb, 3 * GIB), (GIB | sb, 2 * GIB), ((2 * GIB) | sb, GIB)]
    );
}
