//! MapGPA (TDVMCALL 0x10001) over a range, with RETRY handling.

use crate::{subfn, vmcall, Gpa, TdCall, TdcallError, VmcallArgs, VmcallStatus, PAGE_SIZE};

/// Consecutive RETRY answers without progress that [`map_gpa`] tolerates; the next one fails
/// with [`MapGpaErrorKind::NoProgress`] (so a VMM stuck at one R11 sees exactly 4 calls).
pub const MAP_GPA_MAX_STALLED_RETRIES: u32 = 3;

/// Which alias a MapGPA range is converted to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapTarget {
    /// Shared with the VMM: R12 carries the shared bit.
    Shared,
    /// Private to the TD: R12 without the shared bit; pages must be ACCEPTed afterwards.
    Private,
}

/// Counters of one successful [`map_gpa`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapGpaStats {
    /// TDVMCALLs made.
    pub calls: u32,
    /// RETRY answers among them.
    pub retries: u32,
}

/// Why [`map_gpa`] failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapGpaErrorKind {
    /// `start` is not 4 KiB aligned (no TDCALL made).
    UnalignedStart,
    /// `len` is not a multiple of 4 KiB (no TDCALL made).
    UnalignedLength,
    /// `len` is 0 (no TDCALL made).
    ZeroLength,
    /// `start + len` overflows (no TDCALL made).
    RangeOverflow,
    /// `shared_bit` is not a single bit in 13..=63 (no TDCALL made).
    BadSharedBit,
    /// The range is not entirely below the shared bit, so `start` or `end` would carry it
    /// (no TDCALL made).
    SharedBitInRange,
    /// RETRY with an R11 (shown raw) outside `[current, end)` or in the wrong encoding.
    ResumeOutOfRange {
        /// R11 as returned by the VMM.
        r11: u64,
    },
    /// RETRY with an R11 (shown raw) that is not 4 KiB aligned.
    ResumeUnaligned {
        /// R11 as returned by the VMM.
        r11: u64,
    },
    /// More than [`MAP_GPA_MAX_STALLED_RETRIES`] consecutive RETRYs without progress.
    NoProgress,
    /// The VMM answered with a status other than SUCCESS or RETRY.
    Status(VmcallStatus),
    /// TDG.VP.VMCALL itself failed.
    Tdcall(TdcallError),
}

/// Failure of [`map_gpa`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapGpaError {
    /// `[start, converted_up_to)` is known converted (the last accepted resume point; `start`
    /// if none). Nothing is known about `[converted_up_to, end)`: the VMM may have converted
    /// any part of it, so it must be treated as being in an unknown state.
    pub converted_up_to: Gpa,
    /// What went wrong.
    pub kind: MapGpaErrorKind,
}

/// Checks the inputs; returns the end of the range.
fn validate(start: Gpa, len: u64, shared_bit: u64) -> Result<u64, MapGpaErrorKind> {
    if !shared_bit.is_power_of_two() || shared_bit.trailing_zeros() <= 12 {
        return Err(MapGpaErrorKind::BadSharedBit);
    }
    if !start.is_aligned(PAGE_SIZE) {
        return Err(MapGpaErrorKind::UnalignedStart);
    }
    if len & (PAGE_SIZE - 1) != 0 {
        return Err(MapGpaErrorKind::UnalignedLength);
    }
    if len == 0 {
        return Err(MapGpaErrorKind::ZeroLength);
    }
    let end = start
        .0
        .checked_add(len)
        .ok_or(MapGpaErrorKind::RangeOverflow)?;
    // The private GPA space is [0, shared_bit): a range reaching past it would have addresses
    // that already carry the shared bit, i.e. it would name the other alias.
    if end > shared_bit {
        return Err(MapGpaErrorKind::SharedBitInRange);
    }
    Ok(end)
}

/// Converts `[start, start + len)` to `target` with TDVMCALL MapGPA (sub-function 0x10001):
/// R12 = current position (| `shared_bit` for [`MapTarget::Shared`]), R13 = remaining size.
///
/// `shared_bit` must come from [`crate::VpInfo::shared_bit`]. Inputs are validated before any
/// TDCALL. On RETRY the VMM has converted a prefix and R11 names the GPA to resume from; it is
/// accepted only if 4 KiB aligned and inside `[current, end)`. Progress resets a counter of
/// stalled retries; more than [`MAP_GPA_MAX_STALLED_RETRIES`] in a row fail. On any failure,
/// [`MapGpaError::converted_up_to`] says what is known.
pub fn map_gpa<T: TdCall + ?Sized>(
    tdcall: &T,
    start: Gpa,
    len: u64,
    target: MapTarget,
    shared_bit: u64,
) -> Result<MapGpaStats, MapGpaError> {
    let mut stats = MapGpaStats::default();
    map_gpa_counting(tdcall, start, len, target, shared_bit, &mut stats)?;
    Ok(stats)
}

/// [`map_gpa`], adding its calls and RETRYs to `stats` whether it succeeds or not: a caller
/// that keeps totals (to compare with what the VMM saw) counts the calls of a failed
/// conversion too.
pub fn map_gpa_counting<T: TdCall + ?Sized>(
    tdcall: &T,
    start: Gpa,
    len: u64,
    target: MapTarget,
    shared_bit: u64,
    stats: &mut MapGpaStats,
) -> Result<(), MapGpaError> {
    let end = validate(start, len, shared_bit).map_err(|kind| MapGpaError {
        converted_up_to: start,
        kind,
    })?;
    let fail = |cur: u64, kind| {
        Err(MapGpaError {
            converted_up_to: Gpa(cur),
            kind,
        })
    };

    let mut cur = start.0;
    let mut stalled: u32 = 0;
    loop {
        let r12 = match target {
            MapTarget::Shared => cur | shared_bit,
            MapTarget::Private => cur,
        };
        let out = vmcall(
            tdcall,
            VmcallArgs {
                subfunction: subfn::MAP_GPA,
                r12,
                // No underflow: cur < end is kept by the checks below.
                r13: end - cur,
                ..VmcallArgs::default()
            },
        );
        stats.calls = stats.calls.saturating_add(1);
        let out = match out {
            Ok(out) => out,
            Err(e) => return fail(cur, MapGpaErrorKind::Tdcall(e)),
        };
        match out.status {
            VmcallStatus::Success => return Ok(()),
            VmcallStatus::Retry => stats.retries = stats.retries.saturating_add(1),
            other => return fail(cur, MapGpaErrorKind::Status(other)),
        }

        let r11 = out.r11;
        // Compare R11 and the bounds in ONE encoding, the private one (no shared bit). VMMs
        // echo the encoding of R12, so when converting to shared R11 usually carries the shared
        // bit; comparing that raw value against bounds without the bit (a bug seen in other
        // guests) would reject every valid resume point, or, with bounds that do carry the bit,
        // accept an R11 lacking it. So the bit is stripped from R11 only where it is legitimate
        // (target Shared). For target Private an R11 with the bit is >= shared_bit >= end and
        // is rejected; so is any R11 with bits above the shared bit.
        let resume = match target {
            MapTarget::Shared if r11 & shared_bit != 0 => r11 & !shared_bit,
            _ => r11,
        };
        if resume < cur || resume >= end {
            return fail(cur, MapGpaErrorKind::ResumeOutOfRange { r11 });
        }
        if resume & (PAGE_SIZE - 1) != 0 {
            return fail(cur, MapGpaErrorKind::ResumeUnaligned { r11 });
        }
        if resume == cur {
            stalled += 1;
            if stalled > MAP_GPA_MAX_STALLED_RETRIES {
                return fail(cur, MapGpaErrorKind::NoProgress);
            }
        } else {
            stalled = 0;
            cur = resume;
        }
    }
}

impl core::fmt::Display for MapGpaError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "MapGPA failed: {:?} (converted up to {})",
            self.kind, self.converted_up_to
        )
    }
}

impl core::error::Error for MapGpaError {}
