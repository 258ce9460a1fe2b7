//! Host tests of the SNP model: the MSR protocol's answers, the GHCB-page
//! PSC (partial progress, errors, a hostile knob), PVALIDATE's outcomes, and
//! each row of the RMP-check table under both policies.

use super::*;
use std::sync::Mutex;

/// Nested tables over arrays, as the TD model's tests keep them: which
/// alias is mapped per page, checked against the state byte on each call.
struct Fake<'a> {
    states: &'a [AtomicU8],
    mapped: Mutex<Vec<Option<RmpState>>>,
    zeroed: Mutex<Vec<u64>>,
    flushes: AtomicU64,
}

impl<'a> Fake<'a> {
    fn new(states: &'a [AtomicU8]) -> Self {
        Fake {
            states,
            mapped: Mutex::new(vec![None; states.len()]),
            zeroed: Mutex::new(Vec::new()),
            flushes: AtomicU64::new(0),
        }
    }
}

impl SnpBacking for Fake<'_> {
    fn set_mapping(&self, gpa: u64, state: RmpState) {
        let page = (gpa / PAGE) as usize;
        assert_ne!(
            self.states[page].load(Ordering::SeqCst) & BUSY,
            0,
            "mapping of {gpa:#x} changed while not held"
        );
        self.mapped.lock().unwrap()[page] = Some(state);
    }
    fn zero_page(&self, gpa: u64) {
        self.zeroed.lock().unwrap().push(gpa);
    }
    fn flush_nested_tlbs(&self) {
        self.flushes.fetch_add(1, Ordering::SeqCst);
    }
}

const C: u64 = 1 << 47;

fn with_snp(options: SnpOptions, f: impl FnOnce(&SnpModel, &Fake, &SnpCounters)) {
    let states: Vec<AtomicU8> = (0..64).map(|_| AtomicU8::new(0)).collect();
    let counters = SnpCounters::new();
    let model = SnpModel::new(&states, options, &counters);
    let fake = Fake::new(&states);
    // Launch: the image (page 0..4) validated, the rest assigned.
    model.initialise(0, 4 * PAGE, RmpState::Validated, &fake);
    model.initialise(4 * PAGE, 64 * PAGE, RmpState::Unvalidated, &fake);
    f(&model, &fake, &counters);
    for (page, slot) in states.iter().enumerate() {
        assert_eq!(
            slot.load(Ordering::SeqCst) & BUSY,
            0,
            "page {page} left held"
        );
        assert_eq!(
            fake.mapped.lock().unwrap()[page],
            Some(RmpState::from_byte(slot.load(Ordering::SeqCst))),
            "page {page}: mapping and state disagree"
        );
    }
}

fn load(c: &AtomicU64) -> u64 {
    c.load(Ordering::SeqCst)
}

fn response(answer: MsrAnswer) -> u64 {
    match answer {
        MsrAnswer::Response(r) => r,
        other => panic!("{other:?}"),
    }
}

#[test]
fn msr_protocol_answers_as_the_ghcb_specification_lays_them_out() {
    with_snp(SnpOptions::default(), |model, fake, counters| {
        let info = response(model.msr_protocol(0x002, fake));
        assert_eq!((info & 0xfff, (info >> 24) & 0xff), (0x001, 47));
        assert_eq!(
            ((info >> 32) & 0xffff, info >> 48),
            (1, 2),
            "protocol 1..=2"
        );
        assert_eq!(
            response(model.msr_protocol(0x080, fake)),
            (0b11 << 12) | 0x081
        );
        // GHCB registration: only a shared page.
        assert_eq!(
            response(model.msr_protocol((20 << 12) | 0x012, fake)) >> 12,
            (1 << 40) - 1,
            "a private page is refused"
        );
        assert_eq!(
            response(model.msr_protocol((2 << 52) | (20 << 12) | 0x014, fake)),
            0x015
        );
        assert_eq!(model.state(20 * PAGE), Some(RmpState::Shared));
        assert_eq!(
            response(model.msr_protocol((20 << 12) | 0x012, fake)),
            (20 << 12) | 0x013
        );
        // PSC with a bad operation, or outside memory: the error bit.
        for bad in [
            (3 << 52) | (21 << 12) | 0x014,
            (2 << 52) | (999 << 12) | 0x014,
        ] {
            assert_eq!(response(model.msr_protocol(bad, fake)), (1 << 63) | 0x015);
        }
        assert_eq!(
            model.msr_protocol((7 << 16) | (1 << 12) | 0x100, fake),
            MsrAnswer::Terminate { set: 1, code: 7 }
        );
        assert_eq!(
            response(model.msr_protocol(0x0ff, fake)),
            0x0ff,
            "unknown: the MSR kept"
        );
        assert_eq!(load(&counters.msr_psc), 3);
    });
}

/// A PSC descriptor in a buffer the size of the GHCB's shared area.
fn descriptor(entries: &[(u64, u64, bool)]) -> Vec<u8> {
    let mut buffer = vec![0u8; 8 + 8 * PSC_MAX_ENTRIES];
    buffer[2..4].copy_from_slice(&((entries.len() - 1) as u16).to_le_bytes());
    for (i, (gfn, op, huge)) in entries.iter().enumerate() {
        let entry = (gfn << 12) | (op << 52) | (u64::from(*huge) << 56);
        buffer[8 + 8 * i..16 + 8 * i].copy_from_slice(&entry.to_le_bytes());
    }
    buffer
}

fn cur_entry(buffer: &[u8]) -> u16 {
    u16::from_le_bytes([buffer[0], buffer[1]])
}

#[test]
fn ghcb_psc_processes_from_cur_entry_and_reports_progress_in_place() {
    let options = SnpOptions {
        psc_pages_per_call: 3,
        ..SnpOptions::default()
    };
    with_snp(options, |model, fake, counters| {
        let mut buffer = descriptor(&[
            (10, 2, false),
            (11, 2, false),
            (12, 2, false),
            (13, 2, false),
        ]);
        assert_eq!(model.ghcb_psc(&mut buffer, fake), 0);
        assert_eq!(cur_entry(&buffer), 3, "three pages per call");
        assert_eq!(model.state(13 * PAGE), Some(RmpState::Unvalidated));
        assert_eq!(model.ghcb_psc(&mut buffer, fake), 0);
        assert_eq!(cur_entry(&buffer), 4);
        assert_eq!(model.state(13 * PAGE), Some(RmpState::Shared));
        assert_eq!(load(&counters.pages_to_shared), 4);
        assert!(fake.zeroed.lock().unwrap().contains(&(12 * PAGE)));
        // Back to private: assigned, unvalidated.
        let mut buffer = descriptor(&[(10, 1, false)]);
        assert_eq!(model.ghcb_psc(&mut buffer, fake), 0);
        assert_eq!(model.state(10 * PAGE), Some(RmpState::Unvalidated));
    });
}

#[test]
fn ghcb_psc_refuses_bad_headers_and_entries_with_kvms_codes() {
    with_snp(SnpOptions::default(), |model, fake, _| {
        let mut buffer = descriptor(&[(10, 2, false)]);
        buffer[2..4].copy_from_slice(&(253u16).to_le_bytes());
        assert_eq!(model.ghcb_psc(&mut buffer, fake), psc_error::INVALID_HDR);
        for (gfn, op, huge) in [(10, 5, false), (33, 2, true)] {
            let mut buffer = descriptor(&[(gfn, op, huge)]);
            assert_eq!(model.ghcb_psc(&mut buffer, fake), psc_error::INVALID_ENTRY);
        }
        // Outside memory part-way: progress up to it is written back.
        let mut buffer = descriptor(&[(62, 2, false), (63, 2, false), (64, 2, false)]);
        assert_eq!(model.ghcb_psc(&mut buffer, fake), psc_error::GENERIC);
        assert_eq!(cur_entry(&buffer), 2);
        assert_eq!(model.state(63 * PAGE), Some(RmpState::Shared));
        assert_eq!(model.ghcb_psc(&mut [0u8; 16], fake), psc_error::GENERIC);
    });
}

#[test]
fn a_lying_psc_reports_success_and_changes_nothing() {
    let options = SnpOptions {
        psc_lie: true,
        ..SnpOptions::default()
    };
    with_snp(options, |model, fake, _| {
        let mut buffer = descriptor(&[(10, 2, false), (11, 2, false)]);
        assert_eq!(model.ghcb_psc(&mut buffer, fake), 0);
        assert_eq!(cur_entry(&buffer), 2);
        assert_eq!(model.state(10 * PAGE), Some(RmpState::Unvalidated));
    });
}

#[test]
fn pvalidate_flips_the_validated_bit_or_reports_cf() {
    with_snp(SnpOptions::default(), |model, fake, counters| {
        let done = |rc, unchanged| PvalidateEffect::Done { rc, unchanged };
        assert_eq!(model.pvalidate(5 * PAGE, false, true, fake), done(0, false));
        assert_eq!(model.state(5 * PAGE), Some(RmpState::Validated));
        assert_eq!(
            model.pvalidate(5 * PAGE, false, true, fake),
            done(0, true),
            "CF=1"
        );
        let flushes = load(&fake.flushes);
        assert_eq!(
            model.pvalidate(5 * PAGE, false, false, fake),
            done(0, false)
        );
        assert_eq!(
            load(&fake.flushes),
            flushes + 1,
            "a rescind drops the C=1 alias everywhere"
        );
        assert_eq!(model.pvalidate(5 * PAGE, false, false, fake), done(0, true));
        assert_eq!(
            model.pvalidate(5 * PAGE + 8, false, true, fake),
            done(1, false)
        );
        assert_eq!(
            model.pvalidate(PAGE, true, true, fake),
            done(1, false),
            "unaligned 2M"
        );
        assert_eq!(load(&counters.pvalidate_unchanged), 2);
        assert_eq!(
            model.pvalidate(999 * PAGE, false, true, fake),
            PvalidateEffect::Kill(SnpKill::OutsideMemory { gpa: 999 * PAGE })
        );
    });
}

#[test]
fn pvalidate_of_a_shared_page_is_an_rmp_violation_under_each_policy() {
    for policy in [RmpPolicy::Convert, RmpPolicy::Kill] {
        let options = SnpOptions {
            policy,
            ..SnpOptions::default()
        };
        with_snp(options, |model, fake, counters| {
            assert_eq!(
                response(model.msr_protocol((2 << 52) | (9 << 12) | 0x014, fake)),
                0x015
            );
            let effect = model.pvalidate(9 * PAGE, false, true, fake);
            assert_eq!(load(&counters.rmp_violations), 1);
            match policy {
                RmpPolicy::Kill => assert_eq!(
                    effect,
                    PvalidateEffect::Kill(SnpKill::PvalidateOfShared { gpa: 9 * PAGE })
                ),
                RmpPolicy::Convert => {
                    assert_eq!(effect, PvalidateEffect::Retry);
                    assert_eq!(model.state(9 * PAGE), Some(RmpState::Unvalidated));
                }
            }
        });
    }
}

/// Table 15-39, row by row: C=1 to unvalidated is #VC 0x404 in the guest;
/// C=1 to shared and C=0 writes to private reach the hypervisor; C=0 reads
/// of private pages and accesses through a mapped alias are retried.
#[test]
fn nested_faults_follow_the_rmp_checks_under_each_policy() {
    for policy in [RmpPolicy::Convert, RmpPolicy::Kill] {
        let options = SnpOptions {
            policy,
            ..SnpOptions::default()
        };
        with_snp(options, |model, fake, counters| {
            assert_eq!(
                model.nested_fault(C | (5 * PAGE), false, fake),
                SnpFault::Vc {
                    error_code: VC_PAGE_NOT_VALIDATED
                }
            );
            assert_eq!(load(&counters.vc_page_not_validated), 1);
            assert_eq!(model.nested_fault(C | PAGE, true, fake), SnpFault::Retry);
            assert_eq!(
                model.nested_fault(6 * PAGE, false, fake),
                SnpFault::Retry,
                "ciphertext"
            );
            assert_eq!(load(&counters.rmp_violations), 0);
            response(model.msr_protocol((2 << 52) | (7 << 12) | 0x014, fake));
            let c1_to_shared = model.nested_fault(C | (7 * PAGE), false, fake);
            let c0_write = model.nested_fault(8 * PAGE, true, fake);
            assert_eq!(load(&counters.rmp_violations), 2);
            match policy {
                RmpPolicy::Kill => {
                    assert_eq!(
                        c1_to_shared,
                        SnpFault::Kill(SnpKill::PrivateAccessToShared {
                            gpa: C | (7 * PAGE)
                        })
                    );
                    assert_eq!(
                        c0_write,
                        SnpFault::Kill(SnpKill::SharedWriteToPrivate { gpa: 8 * PAGE })
                    );
                }
                RmpPolicy::Convert => {
                    assert_eq!((c1_to_shared, c0_write), (SnpFault::Retry, SnpFault::Retry));
                    // The retried C=1 access meets an unvalidated page.
                    assert_eq!(model.state(7 * PAGE), Some(RmpState::Unvalidated));
                    assert!(matches!(
                        model.nested_fault(C | (7 * PAGE), false, fake),
                        SnpFault::Vc { .. }
                    ));
                    assert_eq!(model.state(8 * PAGE), Some(RmpState::Shared));
                    assert_eq!(load(&counters.implicit_conversions), 2);
                }
            }
            assert_eq!(
                model.nested_fault(C | (999 * PAGE), false, fake),
                SnpFault::Kill(SnpKill::OutsideMemory {
                    gpa: C | (999 * PAGE)
                })
            );
        });
    }
}

#[test]
fn cpuid_and_sev_status_report_snp_with_the_c_bit() {
    with_snp(SnpOptions::default(), |model, _, _| {
        let [eax, ebx, _, _] = model.cpuid_memory_encryption();
        assert_eq!(eax & (1 << 4), 1 << 4, "SEV-SNP");
        assert_eq!(ebx & 0x3f, 47);
        assert_eq!(SnpModel::SEV_STATUS & 0b111, 0b111);
    });
}

#[test]
fn options_parse_and_refuse_with_one_line() {
    let mut o = SnpOptions::default();
    for word in [
        "lazy",
        "c-bit=51",
        "snp-wrong-state=kill",
        "psc-pages-per-call=7",
        "psc-lie",
        "pvalidate-2m-refused",
    ] {
        o.parse_word(word).unwrap();
    }
    assert_eq!(
        o,
        SnpOptions {
            c_bit: 51,
            strict: false,
            policy: RmpPolicy::Kill,
            psc_pages_per_call: 7,
            psc_lie: true,
            refuse_2m_pvalidate: true,
        }
    );
    for bad in [
        "c-bit=31",
        "c-bit=52",
        "c-bit=x",
        "snp-wrong-state=ve",
        "wrong-state=ve",
        "psc-pages-per-call=0",
        "tdx",
    ] {
        let mut o = SnpOptions::default();
        let e = o.parse_word(bad).unwrap_err();
        let line = e.to_string();
        assert!(line.contains(bad) && !line.contains('\n'), "{line}");
        assert_eq!(o, SnpOptions::default(), "{bad} changed nothing");
    }
    // The TD mode's policy word names the same two policies.
    let mut o = SnpOptions::default();
    o.parse_word("wrong-state=shutdown").unwrap();
    assert_eq!(o.policy, RmpPolicy::Kill);
    o.parse_word("wrong-state=convert").unwrap();
    assert_eq!(o.policy, RmpPolicy::Convert);
}

#[test]
fn the_counters_line_names_every_counter() {
    with_snp(SnpOptions::default(), |model, fake, counters| {
        model.msr_protocol((2 << 52) | (9 << 12) | 0x014, fake);
        model.nested_fault(C | (10 * PAGE), false, fake);
        let line = counters.to_string();
        assert!(line.starts_with("SNPEMU "), "{line}");
        assert!(
            line.contains(" msr_psc=1 ") && line.contains(" vc_404=1 "),
            "{line}"
        );
        assert!(line.contains(" wrong_state=0 "), "{line}");
        assert_eq!(line.split_whitespace().count(), 21);
    });
}

#[test]
fn a_2m_pvalidate_needs_one_state_across_the_block_unless_refused() {
    let states: Vec<AtomicU8> = (0..1024).map(|_| AtomicU8::new(0)).collect();
    let counters = SnpCounters::new();
    let fake = Fake::new(&states);
    let done = |rc, unchanged| PvalidateEffect::Done { rc, unchanged };
    let model = SnpModel::new(&states, SnpOptions::default(), &counters);
    model.initialise(0, 1024 * PAGE, RmpState::Unvalidated, &fake);
    model.initialise(3 * PAGE, 4 * PAGE, RmpState::Validated, &fake);
    assert_eq!(
        model.pvalidate(0, true, true, &fake),
        done(6, false),
        "mixed"
    );
    assert_eq!(model.state(0), Some(RmpState::Unvalidated), "unchanged");
    let block = 512 * PAGE;
    assert_eq!(model.pvalidate(block, true, true, &fake), done(0, false));
    assert!((512..1024).all(|p| model.state(p * PAGE) == Some(RmpState::Validated)));
    assert_eq!(
        model.pvalidate(block, true, true, &fake),
        done(0, true),
        "CF=1"
    );
    assert_eq!(load(&counters.pvalidated[1]), 1);
    assert!(states.iter().all(|s| s.load(Ordering::SeqCst) & BUSY == 0));
    // The knob: every 2M request is a mismatch.
    let refused = SnpOptions {
        refuse_2m_pvalidate: true,
        ..SnpOptions::default()
    };
    let model = SnpModel::new(&states, refused, &counters);
    assert_eq!(model.pvalidate(block, true, false, &fake), done(6, false));
    assert_eq!(model.state(block), Some(RmpState::Validated));
}

#[test]
fn rmpadjust_marks_a_validated_page_as_a_vmsa_and_a_state_change_clears_it() {
    with_snp(SnpOptions::default(), |model, fake, counters| {
        let vmsa_vmpl1 = (1 << 16) | 1;
        assert_eq!(
            model.rmpadjust(5 * PAGE, false, vmsa_vmpl1),
            2,
            "unvalidated"
        );
        assert_eq!(
            model.pvalidate(5 * PAGE, false, true, fake),
            PvalidateEffect::Done {
                rc: 0,
                unchanged: false
            }
        );
        assert_eq!(model.rmpadjust(5 * PAGE, false, 1 << 16), 2, "VMPL0 target");
        assert_eq!(model.rmpadjust(5 * PAGE, true, vmsa_vmpl1), 6);
        assert_eq!(model.rmpadjust(5 * PAGE + 8, false, vmsa_vmpl1), 1);
        assert!(!model.is_vmsa(5 * PAGE));
        assert_eq!(model.rmpadjust(5 * PAGE, false, vmsa_vmpl1), 0);
        assert!(model.is_vmsa(5 * PAGE));
        assert_eq!(
            model.state(5 * PAGE),
            Some(RmpState::Validated),
            "state kept"
        );
        assert_eq!(load(&counters.rmpadjust), 1);
        model.pvalidate(5 * PAGE, false, false, fake);
        assert!(!model.is_vmsa(5 * PAGE), "rescinded: no longer a VMSA");
    });
}

#[test]
fn the_msr_protocol_cpuid_request_names_its_leaf_and_register() {
    with_snp(SnpOptions::default(), |model, fake, _| {
        let request = (0x8000_001f_u64 << 32) | (1 << 30) | 0x004;
        assert_eq!(
            model.msr_protocol(request, fake),
            MsrAnswer::Cpuid {
                leaf: 0x8000_001f,
                register: 1
            }
        );
    });
}

#[test]
fn a_psc_of_many_pages_is_one_nested_tlb_flush_and_each_page_zeroed_after_it() {
    with_snp(SnpOptions::default(), |model, fake, counters| {
        let entries: Vec<_> = (10..30).map(|gfn| (gfn, 2, false)).collect();
        let mut buffer = descriptor(&entries);
        let flushes = load(&fake.flushes);
        assert_eq!(model.ghcb_psc(&mut buffer, fake), 0);
        assert_eq!(load(&fake.flushes), flushes + 1, "one flush for 20 pages");
        assert!((10..30).all(|g| model.state(g * PAGE) == Some(RmpState::Shared)));
        assert_eq!(fake.zeroed.lock().unwrap().len(), 20);
        assert_eq!(load(&counters.pages_to_shared), 20);
        // Unchanged pages cost nothing: the same PSC again flushes nothing.
        let mut again = descriptor(&entries);
        assert_eq!(model.ghcb_psc(&mut again, fake), 0);
        assert_eq!(load(&fake.flushes), flushes + 1);
    });
}
