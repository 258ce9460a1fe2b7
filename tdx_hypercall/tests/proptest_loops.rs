//! Property tests of the two loops that run on the VMM's and the TDX
//! module's word: MapGPA (RETRY with a resume address in R11) and the ACCEPT
//! walk (OPERAND_BUSY, PAGE_SIZE_MISMATCH fallbacks, errors).
//!
//! A scripted answerer (a [`TdCall`]) replies to each call from a random
//! script, then with a random default forever: success, a stuck VMM, a VMM
//! that moves one page per call, a module that is always busy or always
//! refuses the size. It checks every request as it comes (registers, range,
//! alignment) and panics past the loop's documented bound, so a loop that
//! does not end fails instead of hanging. The checks then run on the
//! transcript:
//! - MapGPA: the first request is at `start`; every later one resumes where
//!   the previous RETRY said, and only if that point is page aligned, inside
//!   `[current, end)` and read in the right encoding (the shared bit stripped
//!   only when converting to shared): never outside, unaligned or backwards;
//!   R12/R13 always name `[current, end)`; at most `MAP_GPA_MAX_STALLED_RETRIES`
//!   retries in a row without progress are followed; the result (stats, or
//!   the typed error and `converted_up_to`) is the one the last answer implies.
//! - ACCEPT: each request is at the frontier of what was accepted, aligned,
//!   inside the range, at the largest size alignment, length and earlier
//!   refusals allow; busy answers are retried at most `ACCEPT_BUSY_RETRIES`
//!   times in a row; accepted pieces tile `[start, accepted_up_to)`; the
//!   result is the one the last answer implies (`accept_ram` skips
//!   ALREADY_ACCEPTED pieces, `accept_range` stops there).
//! - Bad inputs to either make no call and return their typed error.

use proptest::prelude::*;
use proptest::sample::Index;
use std::cell::RefCell;
use tdx_hypercall::{
    accept_ram, accept_range, leaf, map_gpa, status, subfn, AcceptError, AcceptRangeError,
    AcceptSize, AcceptStats, Gpa, MapGpaError, MapGpaErrorKind, MapGpaStats, MapTarget, TdCall,
    TdcallError, TdcallRegs, VmcallStatus, ACCEPT_BUSY_RETRIES, MAP_GPA_MAX_STALLED_RETRIES,
    PAGE_SIZE,
};

const MIB2: u64 = 2 << 20;
const GIB: u64 = 1 << 30;

/// `PROPTEST_CASES` from the environment (for a longer run), else `default`.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------
// MapGPA.

/// Where a RETRY says to resume, relative to the request it answers.
#[derive(Clone, Copy, Debug)]
enum Resume {
    /// 1..=remaining pages on (the last is `end`: out of range).
    Advance(Index),
    One,
    Stall,
    /// Up to 64 pages back.
    Back(u8),
    End,
    /// Pages past the end.
    Beyond(u32),
    /// A page boundary in the range plus 1..4095 bytes.
    Unaligned(Index, u16),
    Raw(u64),
    /// The worst VMM within the rules: three stalls, then one page, again
    /// and again (the loop's bound, exactly).
    Crawl,
}

/// How R11 carries the shared bit.
#[derive(Clone, Copy, Debug)]
enum Encoding {
    /// As R12 does (QEMU/KVM).
    Echo,
    Plain,
    WithSharedBit,
    /// With the bit above the shared bit.
    HighBit,
}

#[derive(Clone, Copy, Debug)]
enum MapAnswer {
    Success,
    Retry(Resume, Encoding),
    /// R10 = this (never 0 or 1).
    Status(u64),
    /// RAX = this (nonzero): TDG.VP.VMCALL itself failed.
    Tdcall(u64),
}

/// One MapGPA call as the VMM saw and answered it.
#[derive(Clone, Copy, Debug)]
struct MapCall {
    r12: u64,
    r13: u64,
    answer: MapAnswer,
    r11: u64,
}

struct Vmm {
    shared_bit: u64,
    target: MapTarget,
    script: Vec<MapAnswer>,
    default: MapAnswer,
    bound: u64,
    calls: RefCell<Vec<MapCall>>,
}

impl TdCall for Vmm {
    fn tdcall(&self, regs: &mut TdcallRegs) {
        let mut calls = self.calls.borrow_mut();
        assert!(
            (calls.len() as u64) < self.bound,
            "MapGPA made more than its bound of {} calls: {:?}",
            self.bound,
            &calls[calls.len().saturating_sub(8)..]
        );
        assert_eq!(regs.rax, leaf::TDG_VP_VMCALL, "not a TDVMCALL");
        assert_eq!(regs.rcx, 0xFC00, "TDVMCALL exposes R10..R15 only");
        assert_eq!(regs.r10, 0, "standard TDVMCALL");
        assert_eq!(regs.r11, subfn::MAP_GPA, "not MapGPA");
        assert!(regs.r13 > 0, "MapGPA of nothing");
        let answer = self
            .script
            .get(calls.len())
            .copied()
            .unwrap_or(self.default);
        let cur = regs.r12 & !self.shared_bit;
        let end = cur.saturating_add(regs.r13);
        let mut r11 = 0;
        match answer {
            MapAnswer::Success => {
                regs.rax = 0;
                regs.r10 = 0;
            }
            MapAnswer::Retry(resume, encoding) => {
                let pages = (end - cur) / PAGE_SIZE;
                let at = match resume {
                    Resume::Advance(i) => cur + (1 + i.index(pages as usize) as u64) * PAGE_SIZE,
                    Resume::One => cur + PAGE_SIZE,
                    Resume::Stall => cur,
                    Resume::Back(n) => cur.saturating_sub((1 + u64::from(n % 64)) * PAGE_SIZE),
                    Resume::End => end,
                    Resume::Beyond(n) => end.saturating_add((1 + u64::from(n)) * PAGE_SIZE),
                    Resume::Unaligned(i, d) => {
                        cur + i.index(pages as usize) as u64 * PAGE_SIZE + 1 + u64::from(d % 4095)
                    }
                    Resume::Raw(x) => x,
                    Resume::Crawl if calls.len() % 4 == 3 => cur + PAGE_SIZE,
                    Resume::Crawl => cur,
                };
                r11 = match encoding {
                    Encoding::Echo if self.target == MapTarget::Shared => at | self.shared_bit,
                    Encoding::Echo | Encoding::Plain => at,
                    Encoding::WithSharedBit => at | self.shared_bit,
                    Encoding::HighBit => at | (self.shared_bit << 1),
                };
                regs.rax = 0;
                regs.r10 = 1;
                regs.r11 = r11;
            }
            MapAnswer::Status(s) => {
                regs.rax = 0;
                regs.r10 = s;
            }
            MapAnswer::Tdcall(s) => regs.rax = s,
        }
        calls.push(MapCall {
            r12: regs.r12,
            r13: regs.r13,
            answer,
            r11,
        });
    }
}

fn resume() -> impl Strategy<Value = Resume> {
    prop_oneof![
        30 => any::<Index>().prop_map(Resume::Advance),
        15 => Just(Resume::One),
        15 => Just(Resume::Stall),
        1 => any::<u8>().prop_map(Resume::Back),
        1 => Just(Resume::End),
        1 => any::<u32>().prop_map(Resume::Beyond),
        1 => (any::<Index>(), any::<u16>()).prop_map(|(i, d)| Resume::Unaligned(i, d)),
        1 => any::<u64>().prop_map(Resume::Raw),
    ]
}

fn encoding() -> impl Strategy<Value = Encoding> {
    prop_oneof![
        20 => Just(Encoding::Echo),
        6 => Just(Encoding::Plain),
        1 => Just(Encoding::WithSharedBit),
        1 => Just(Encoding::HighBit),
    ]
}

fn map_answer() -> impl Strategy<Value = MapAnswer> {
    prop_oneof![
        1 => Just(MapAnswer::Success),
        16 => (resume(), encoding()).prop_map(|(r, e)| MapAnswer::Retry(r, e)),
        1 => prop_oneof![
            Just(VmcallStatus::InvalidOperand.raw()),
            Just(VmcallStatus::AlignError.raw()),
            any::<u64>().prop_map(|s| s.max(2)),
        ]
        .prop_map(MapAnswer::Status),
        1 => any::<u64>().prop_map(|s| MapAnswer::Tdcall(s.max(1))),
    ]
}

/// A range below the shared bit: (start, pages).
fn map_range() -> impl Strategy<Value = (u64, u64)> {
    (
        prop_oneof![
            Just(0u64),
            (0u64..1 << 20).prop_map(|p| p * PAGE_SIZE),
            (1u64..64).prop_map(|g| g * GIB - 8 * PAGE_SIZE),
        ],
        prop_oneof![
            6 => 1u64..=64,
            2 => 1u64..=4096,
            1 => 1u64..=1 << 20,
        ],
    )
}

/// The resume point a RETRY's R11 names, in the guest's (private) encoding:
/// the shared bit is stripped only when converting to shared.
fn resume_point(r11: u64, target: MapTarget, shared_bit: u64) -> u64 {
    match target {
        MapTarget::Shared => r11 & !shared_bit,
        MapTarget::Private => r11,
    }
}

fn check_map_gpa(
    shared_bit: u64,
    target: MapTarget,
    start: u64,
    pages: u64,
    script: Vec<MapAnswer>,
    default: MapAnswer,
) {
    let len = pages * PAGE_SIZE;
    let end = start + len;
    // A stalling or crawling default on a large range would take a long
    // time to reach its end; those are covered by the small ranges.
    let default = match default {
        MapAnswer::Retry(Resume::One | Resume::Advance(_) | Resume::Crawl, _) if pages > 4096 => {
            MapAnswer::Success
        }
        other => other,
    };
    let bound = u64::from(MAP_GPA_MAX_STALLED_RETRIES + 1) * pages;
    let vmm = Vmm {
        shared_bit,
        target,
        script,
        default,
        bound,
        calls: RefCell::new(Vec::new()),
    };
    let result = map_gpa(&vmm, Gpa(start), len, target, shared_bit);
    let calls = vmm.calls.into_inner();
    let what = format!(
        "map_gpa({start:#x}, {len:#x}, {target:?}, bit {shared_bit:#x}) = {result:?}; \
         calls: {:?}",
        &calls[..calls.len().min(12)]
    );
    assert!(!calls.is_empty(), "{what}");
    assert!(calls.len() as u64 <= bound, "{what}");

    // Every request names [cur, end) in the target's encoding; each resumes
    // where the previous RETRY said, never outside, unaligned or backwards.
    let mut cur = start;
    let mut stalled = 0;
    for (i, call) in calls.iter().enumerate() {
        let bit = match target {
            MapTarget::Shared => shared_bit,
            MapTarget::Private => 0,
        };
        assert_eq!(call.r12, cur | bit, "{what}: call #{i}'s R12");
        assert_eq!(call.r13, end - cur, "{what}: call #{i}'s R13");
        let Some(next) = calls.get(i + 1) else {
            break;
        };
        let MapAnswer::Retry(..) = call.answer else {
            panic!(
                "{what}: call #{i} answered {:?} was followed by another",
                call.answer
            );
        };
        let resume = resume_point(call.r11, target, shared_bit);
        assert!(
            resume >= cur && resume < end && resume.is_multiple_of(PAGE_SIZE),
            "{what}: call #{i}'s R11 {:#x} (resume {resume:#x}) outside [{cur:#x}, {end:#x}) \
             or unaligned, yet followed",
            call.r11
        );
        if resume == cur {
            stalled += 1;
            assert!(
                stalled <= MAP_GPA_MAX_STALLED_RETRIES,
                "{what}: {stalled} RETRYs in a row without progress followed"
            );
        } else {
            stalled = 0;
        }
        assert_eq!(
            next.r12 & !bit,
            resume,
            "{what}: call #{} resumes elsewhere",
            i + 1
        );
        cur = resume;
    }

    // The last answer decides the result.
    let last = calls.last().unwrap();
    let fail = |kind| {
        Err(MapGpaError {
            converted_up_to: Gpa(cur),
            kind,
        })
    };
    let retries = calls
        .iter()
        .filter(|c| matches!(c.answer, MapAnswer::Retry(..)))
        .count() as u32;
    let expected = match last.answer {
        MapAnswer::Success => Ok(MapGpaStats {
            calls: calls.len() as u32,
            retries,
        }),
        MapAnswer::Tdcall(s) => fail(MapGpaErrorKind::Tdcall(TdcallError::Status(s))),
        MapAnswer::Status(s) => fail(MapGpaErrorKind::Status(VmcallStatus::from_raw(s))),
        MapAnswer::Retry(..) => {
            let resume = resume_point(last.r11, target, shared_bit);
            if resume < cur || resume >= end {
                fail(MapGpaErrorKind::ResumeOutOfRange { r11: last.r11 })
            } else if !resume.is_multiple_of(PAGE_SIZE) {
                fail(MapGpaErrorKind::ResumeUnaligned { r11: last.r11 })
            } else {
                assert!(
                    resume == cur && stalled == MAP_GPA_MAX_STALLED_RETRIES,
                    "{what}: a valid RETRY was not followed"
                );
                fail(MapGpaErrorKind::NoProgress)
            }
        }
    };
    assert_eq!(result, expected, "{what}");
}

/// The documented validation, in order; None if the inputs are valid.
fn map_gpa_input_error(start: u64, len: u64, shared_bit: u64) -> Option<MapGpaErrorKind> {
    if !shared_bit.is_power_of_two() || shared_bit.trailing_zeros() < 13 {
        return Some(MapGpaErrorKind::BadSharedBit);
    }
    if !start.is_multiple_of(PAGE_SIZE) {
        return Some(MapGpaErrorKind::UnalignedStart);
    }
    if !len.is_multiple_of(PAGE_SIZE) {
        return Some(MapGpaErrorKind::UnalignedLength);
    }
    if len == 0 {
        return Some(MapGpaErrorKind::ZeroLength);
    }
    let Some(end) = start.checked_add(len) else {
        return Some(MapGpaErrorKind::RangeOverflow);
    };
    (end > shared_bit).then_some(MapGpaErrorKind::SharedBitInRange)
}

// ---------------------------------------------------------------------------
// ACCEPT.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AcceptAnswer {
    Success,
    /// A nonzero status, by class: busy, size mismatch, already accepted,
    /// operand invalid, or any.
    Status(u64),
}

/// What the module answers once the script is used up.
#[derive(Clone, Copy, Debug)]
enum AcceptDefault {
    Success,
    Busy,
    Mismatch,
    /// Success at sizes up to this one, PAGE_SIZE_MISMATCH above.
    MappedAt(AcceptSize),
    /// The worst module within the rules: OPERAND_BUSY as often as the
    /// walk retries it before every answer, then PAGE_SIZE_MISMATCH above
    /// 4K (the walk's bound, nearly exactly).
    Worst,
}

#[derive(Clone, Copy, Debug)]
struct AcceptCall {
    gpa: u64,
    size: AcceptSize,
    answer: AcceptAnswer,
}

struct Module {
    start: u64,
    end: u64,
    script: Vec<AcceptAnswer>,
    default: AcceptDefault,
    bound: u64,
    calls: RefCell<Vec<AcceptCall>>,
}

const BUSY: u64 = 0x8000_0200_0000_0000;
const MISMATCH: u64 = 0xC000_0B0B_0000_0001;

impl TdCall for Module {
    fn tdcall(&self, regs: &mut TdcallRegs) {
        let mut calls = self.calls.borrow_mut();
        assert!(
            (calls.len() as u64) < self.bound,
            "ACCEPT made more than its bound of {} calls: {:?}",
            self.bound,
            &calls[calls.len().saturating_sub(8)..]
        );
        assert_eq!(regs.rax, leaf::TDG_MEM_PAGE_ACCEPT, "not an ACCEPT");
        assert_eq!(
            regs.rcx & 0xff8,
            0,
            "reserved RCX bits set: {:#x}",
            regs.rcx
        );
        let size = AcceptSize::from_level(regs.rcx & 7)
            .unwrap_or_else(|| panic!("bad ACCEPT level in RCX {:#x}", regs.rcx));
        let gpa = regs.rcx & !(PAGE_SIZE - 1);
        assert!(
            gpa.is_multiple_of(size.bytes())
                && gpa >= self.start
                && gpa.checked_add(size.bytes()).is_some_and(|e| e <= self.end),
            "ACCEPT of {gpa:#x} at {size:?} outside [{:#x}, {:#x}) or unaligned",
            self.start,
            self.end
        );
        let answer = match self.script.get(calls.len()) {
            Some(answer) => *answer,
            None => match self.default {
                AcceptDefault::Success => AcceptAnswer::Success,
                AcceptDefault::Busy => AcceptAnswer::Status(BUSY),
                AcceptDefault::Mismatch => AcceptAnswer::Status(MISMATCH),
                AcceptDefault::MappedAt(max) if size.bytes() > max.bytes() => {
                    AcceptAnswer::Status(MISMATCH)
                }
                AcceptDefault::MappedAt(_) => AcceptAnswer::Success,
                AcceptDefault::Worst => {
                    let busy = calls
                        .iter()
                        .rev()
                        .take_while(|c| c.answer == AcceptAnswer::Status(BUSY))
                        .count();
                    if busy < ACCEPT_BUSY_RETRIES as usize {
                        AcceptAnswer::Status(BUSY)
                    } else if size == AcceptSize::Size4K {
                        AcceptAnswer::Success
                    } else {
                        AcceptAnswer::Status(MISMATCH)
                    }
                }
            },
        };
        regs.rax = match answer {
            AcceptAnswer::Success => 0,
            AcceptAnswer::Status(s) => s,
        };
        calls.push(AcceptCall { gpa, size, answer });
    }
}

fn accept_answer() -> impl Strategy<Value = AcceptAnswer> {
    let class = prop_oneof![
        4 => Just(status::TDX_OPERAND_BUSY_CLASS),
        4 => Just(status::TDX_PAGE_SIZE_MISMATCH_CLASS),
        2 => Just(status::TDX_PAGE_ALREADY_ACCEPTED_CLASS),
        1 => Just(0xC000_0100u32),
        1 => any::<u32>(),
    ];
    prop_oneof![
        6 => Just(AcceptAnswer::Success),
        2 => (class, any::<u32>()).prop_map(|(class, low)| {
            let raw = (u64::from(class) << 32) | u64::from(low);
            AcceptAnswer::Status(raw.max(1))
        }),
    ]
}

fn accept_default() -> impl Strategy<Value = AcceptDefault> {
    prop_oneof![
        3 => Just(AcceptDefault::Success),
        1 => Just(AcceptDefault::Busy),
        1 => Just(AcceptDefault::Mismatch),
        1 => Just(AcceptDefault::MappedAt(AcceptSize::Size4K)),
        1 => Just(AcceptDefault::MappedAt(AcceptSize::Size2M)),
        1 => Just(AcceptDefault::Worst),
    ]
}

/// A range: (start, pages), around 2M and 1G boundaries.
fn accept_range_gen() -> impl Strategy<Value = (u64, u64)> {
    (
        prop_oneof![
            Just(0u64),
            (0u64..1 << 16).prop_map(|p| p * PAGE_SIZE),
            (1u64..8, 0u64..=4).prop_map(|(g, p)| g * GIB - p * PAGE_SIZE),
            (1u64..64, 0u64..=4).prop_map(|(m, p)| m * MIB2 - p * PAGE_SIZE),
        ],
        prop_oneof![
            4 => 0u64..=64,
            2 => (0u64..=2, 0u64..=8).prop_map(|(k, p)| k * 512 + p),
            1 => (1u64..=2, 0u64..=8).prop_map(|(k, p)| k * 512 * 512 + p),
            1 => 0u64..=1 << 19,
        ],
    )
}

fn largest_size(cur: u64, remaining: u64, cap: AcceptSize) -> AcceptSize {
    for size in [AcceptSize::Size1G, AcceptSize::Size2M] {
        if size.bytes() <= cap.bytes()
            && size.bytes() <= remaining
            && cur.is_multiple_of(size.bytes())
        {
            return size;
        }
    }
    AcceptSize::Size4K
}

fn check_accept(
    ram: bool,
    start: u64,
    pages: u64,
    script: Vec<AcceptAnswer>,
    default: AcceptDefault,
) {
    let end = start + pages * PAGE_SIZE;
    // 4K pieces all over a large range would take long; small ones cover it.
    let default = match default {
        AcceptDefault::MappedAt(AcceptSize::Size4K) if pages > 8192 => {
            AcceptDefault::MappedAt(AcceptSize::Size2M)
        }
        AcceptDefault::Worst if pages > 1024 => AcceptDefault::Busy,
        other => other,
    };
    // At most 17 calls for each piece tried: every 4K page once, every 2M
    // and 1G block refused once, and the one that fails.
    let pieces = pages + pages / 512 + pages / (512 * 512) + 1;
    let bound = u64::from(ACCEPT_BUSY_RETRIES + 1) * pieces;
    let module = Module {
        start,
        end,
        script,
        default,
        bound,
        calls: RefCell::new(Vec::new()),
    };
    let (result, skipped) = if ram {
        match accept_ram(&module, Gpa(start), Gpa(end)) {
            Ok(s) => (Ok(s.accepted), s.already_accepted_bytes),
            Err(e) => (Err(e), 0),
        }
    } else {
        (accept_range(&module, Gpa(start), Gpa(end)), 0)
    };
    let calls = module.calls.into_inner();
    let what = format!(
        "{}({start:#x}, {end:#x}) = {result:?}; calls: {:?}",
        if ram { "accept_ram" } else { "accept_range" },
        &calls[..calls.len().min(12)]
    );
    assert!(calls.len() as u64 <= bound, "{what}");

    // Walk the transcript: where each call must be, at which size.
    let mut cur = start;
    let mut cap_2m_until = start;
    let mut cap_4k_until = start;
    let mut busy = 0u32;
    let mut stats = AcceptStats::default();
    let mut skipped_bytes = 0;
    let mut outcome = None;
    for (i, call) in calls.iter().enumerate() {
        assert!(outcome.is_none(), "{what}: call #{i} after the walk ended");
        let cap = if cur < cap_4k_until {
            AcceptSize::Size4K
        } else if cur < cap_2m_until {
            AcceptSize::Size2M
        } else {
            AcceptSize::Size1G
        };
        let want = largest_size(cur, end - cur, cap);
        assert_eq!(
            (call.gpa, call.size),
            (cur, want),
            "{what}: call #{i} is not at the frontier at the largest size allowed"
        );
        let raw = match call.answer {
            AcceptAnswer::Success => {
                busy = 0;
                match call.size {
                    AcceptSize::Size1G => stats.accepted_1g += 1,
                    AcceptSize::Size2M => stats.accepted_2m += 1,
                    AcceptSize::Size4K => stats.accepted_4k += 1,
                }
                cur += call.size.bytes();
                continue;
            }
            AcceptAnswer::Status(raw) => raw,
        };
        match (status::class(raw), call.size) {
            (status::TDX_OPERAND_BUSY_CLASS, _) if busy < ACCEPT_BUSY_RETRIES => {
                busy += 1;
                stats.busy_retries += 1;
            }
            (status::TDX_OPERAND_BUSY_CLASS, _) => {
                outcome = Some(AcceptError::OperandBusy(raw));
            }
            (status::TDX_PAGE_SIZE_MISMATCH_CLASS, AcceptSize::Size1G) => {
                busy = 0;
                stats.size_mismatch_fallbacks += 1;
                cap_2m_until = cur + GIB;
            }
            (status::TDX_PAGE_SIZE_MISMATCH_CLASS, AcceptSize::Size2M) => {
                busy = 0;
                stats.size_mismatch_fallbacks += 1;
                cap_4k_until = cur + MIB2;
            }
            (status::TDX_PAGE_SIZE_MISMATCH_CLASS, AcceptSize::Size4K) => {
                outcome = Some(AcceptError::PageSizeMismatch(raw));
            }
            (status::TDX_PAGE_ALREADY_ACCEPTED_CLASS, _) if ram => {
                busy = 0;
                skipped_bytes += call.size.bytes();
                cur += call.size.bytes();
            }
            (status::TDX_PAGE_ALREADY_ACCEPTED_CLASS, _) => {
                outcome = Some(AcceptError::AlreadyAccepted(raw));
            }
            _ => outcome = Some(AcceptError::Other(raw)),
        }
    }
    let expected = match outcome {
        Some(cause) => Err(AcceptRangeError {
            accepted_up_to: Gpa(cur),
            cause,
        }),
        None => {
            assert_eq!(cur, end, "{what}: the walk stopped early without an error");
            Ok(stats)
        }
    };
    assert_eq!(result, expected, "{what}");
    if result.is_ok() {
        assert_eq!(skipped, skipped_bytes, "{what}: already-accepted bytes");
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(2048),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// MapGPA against a random VMM.
    #[test]
    fn map_gpa_follows_only_valid_resume_points(
        gpaw52 in any::<bool>(),
        shared in any::<bool>(),
        (start, pages) in map_range(),
        script in prop::collection::vec(map_answer(), 0..48),
        default in prop_oneof![
            Just(MapAnswer::Success),
            Just(MapAnswer::Retry(Resume::Stall, Encoding::Echo)),
            Just(MapAnswer::Retry(Resume::One, Encoding::Echo)),
            Just(MapAnswer::Retry(Resume::Crawl, Encoding::Echo)),
            map_answer(),
        ],
    ) {
        let shared_bit = if gpaw52 { 1 << 51 } else { 1 << 47 };
        let target = if shared { MapTarget::Shared } else { MapTarget::Private };
        check_map_gpa(shared_bit, target, start, pages, script, default);
    }

    /// Bad MapGPA inputs make no call and get their typed error.
    #[test]
    fn map_gpa_refuses_bad_inputs_without_a_call(
        start in prop_oneof![any::<u64>(), (0u64..1 << 36).prop_map(|p| p * PAGE_SIZE)],
        len in prop_oneof![any::<u64>(), Just(0u64), (0u64..1 << 36).prop_map(|p| p * PAGE_SIZE)],
        shared_bit in prop_oneof![
            (0u32..64).prop_map(|b| 1u64 << b),
            any::<u64>(),
            Just(1u64 << 47),
        ],
        shared in any::<bool>(),
    ) {
        let target = if shared { MapTarget::Shared } else { MapTarget::Private };
        let vmm = Vmm {
            shared_bit,
            target,
            script: Vec::new(),
            default: MapAnswer::Success,
            bound: 1,
            calls: RefCell::new(Vec::new()),
        };
        let result = map_gpa(&vmm, Gpa(start), len, target, shared_bit);
        let calls = vmm.calls.into_inner().len();
        match map_gpa_input_error(start, len, shared_bit) {
            Some(kind) => {
                prop_assert_eq!(result, Err(MapGpaError { converted_up_to: Gpa(start), kind }));
                prop_assert_eq!(calls, 0);
            }
            None => {
                prop_assert_eq!(result, Ok(MapGpaStats { calls: 1, retries: 0 }));
                prop_assert_eq!(calls, 1);
            }
        }
    }

    /// The ACCEPT walk against a random TDX module.
    #[test]
    fn accept_walk_stays_on_the_frontier(
        ram in prop::bool::weighted(0.3),
        (start, pages) in accept_range_gen(),
        script in prop::collection::vec(accept_answer(), 0..40),
        default in accept_default(),
    ) {
        check_accept(ram, start, pages, script, default);
    }

    /// Bad ACCEPT ranges make no call and get their typed error.
    #[test]
    fn accept_refuses_bad_ranges_without_a_call(
        start in prop_oneof![any::<u64>(), (0u64..1 << 20).prop_map(|p| p * PAGE_SIZE)],
        end in prop_oneof![any::<u64>(), (0u64..1 << 20).prop_map(|p| p * PAGE_SIZE)],
        equal in prop::bool::weighted(0.1),
        ram in any::<bool>(),
    ) {
        // Only bad ranges and empty ones: a good one is swapped into a bad
        // one (start > end).
        let (start, end) = match (equal, start % PAGE_SIZE == 0 && end % PAGE_SIZE == 0) {
            (true, _) => (start, start),
            (false, true) if start < end => (end, start),
            _ => (start, end),
        };
        let module = Module {
            start: 0,
            end: u64::MAX,
            script: Vec::new(),
            default: AcceptDefault::Success,
            bound: 0,
            calls: RefCell::new(Vec::new()),
        };
        let result = if ram {
            accept_ram(&module, Gpa(start), Gpa(end)).map(|s| s.accepted)
        } else {
            accept_range(&module, Gpa(start), Gpa(end))
        };
        let cause = if start % PAGE_SIZE != 0 {
            Some(AcceptError::Unaligned { gpa: Gpa(start), size: AcceptSize::Size4K })
        } else if end % PAGE_SIZE != 0 {
            Some(AcceptError::Unaligned { gpa: Gpa(end), size: AcceptSize::Size4K })
        } else if start > end {
            Some(AcceptError::InvalidRange { start: Gpa(start), end: Gpa(end) })
        } else {
            None
        };
        match cause {
            Some(cause) => prop_assert_eq!(
                result,
                Err(AcceptRangeError { accepted_up_to: Gpa(start), cause })
            ),
            None => prop_assert_eq!(result, Ok(AcceptStats::default())),
        }
        prop_assert!(module.calls.into_inner().is_empty());
    }
}
