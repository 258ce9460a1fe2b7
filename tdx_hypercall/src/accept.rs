//! TDG.MEM.PAGE.ACCEPT, for one page and for a range.

use crate::{leaf, status, Gpa, TdCall, TdcallRegs, PAGE_SIZE};

/// How many times in a row [`accept_range`] retries an ACCEPT that returned OPERAND_BUSY
/// before giving up (so at most 17 calls for one piece).
pub const ACCEPT_BUSY_RETRIES: u32 = 16;

/// Page size of one ACCEPT; encoded as the level in `RCX[2:0]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcceptSize {
    /// 4 KiB, level 0.
    Size4K,
    /// 2 MiB, level 1.
    Size2M,
    /// 1 GiB, level 2.
    Size1G,
}

impl AcceptSize {
    /// Size in bytes.
    pub const fn bytes(self) -> u64 {
        match self {
            AcceptSize::Size4K => PAGE_SIZE,
            AcceptSize::Size2M => 2 << 20,
            AcceptSize::Size1G => 1 << 30,
        }
    }

    /// The level encoded in `RCX[2:0]`: 0, 1 or 2.
    pub const fn level(self) -> u64 {
        match self {
            AcceptSize::Size4K => 0,
            AcceptSize::Size2M => 1,
            AcceptSize::Size1G => 2,
        }
    }

    /// Inverse of [`AcceptSize::level`].
    pub const fn from_level(level: u64) -> Option<AcceptSize> {
        match level {
            0 => Some(AcceptSize::Size4K),
            1 => Some(AcceptSize::Size2M),
            2 => Some(AcceptSize::Size1G),
            _ => None,
        }
    }
}

/// Failure of an ACCEPT. TDX statuses keep their full value (the low half names the operand).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcceptError {
    /// The GPA is not aligned to the page size (detected before any TDCALL).
    Unaligned {
        /// The offending address.
        gpa: Gpa,
        /// The alignment it needed.
        size: AcceptSize,
    },
    /// `start > end` in [`accept_range`] (detected before any TDCALL).
    InvalidRange {
        /// Start of the range.
        start: Gpa,
        /// End of the range.
        end: Gpa,
    },
    /// Status class 0x8000_0200: a secure-EPT entry was busy; the same call may be retried.
    OperandBusy(u64),
    /// Status class 0xC000_0B0B: the page is mapped at a smaller size; accept it in pieces.
    PageSizeMismatch(u64),
    /// Status class 0x0000_0B0A: the page was already accepted. Accepting twice hints at a
    /// state-tracking bug (or an attack replaying a page), so it is not silently ignored.
    AlreadyAccepted(u64),
    /// Any other nonzero status.
    Other(u64),
}

impl AcceptError {
    /// Classifies a nonzero ACCEPT status by its class (upper 32 bits).
    pub const fn from_status(raw: u64) -> AcceptError {
        match status::class(raw) {
            status::TDX_OPERAND_BUSY_CLASS => AcceptError::OperandBusy(raw),
            status::TDX_PAGE_SIZE_MISMATCH_CLASS => AcceptError::PageSizeMismatch(raw),
            status::TDX_PAGE_ALREADY_ACCEPTED_CLASS => AcceptError::AlreadyAccepted(raw),
            _ => AcceptError::Other(raw),
        }
    }
}

/// TDG.MEM.PAGE.ACCEPT (leaf 6) of one page of `size` at `gpa`: RCX = gpa | level.
///
/// An unaligned `gpa` is rejected before any TDCALL (its low bits would corrupt the level).
pub fn page_accept<T: TdCall + ?Sized>(
    tdcall: &T,
    gpa: Gpa,
    size: AcceptSize,
) -> Result<(), AcceptError> {
    if !gpa.is_aligned(size.bytes()) {
        return Err(AcceptError::Unaligned { gpa, size });
    }
    let mut regs = TdcallRegs {
        rax: leaf::TDG_MEM_PAGE_ACCEPT,
        rcx: gpa.0 | size.level(),
        ..TdcallRegs::default()
    };
    tdcall.tdcall(&mut regs);
    match regs.rax {
        0 => Ok(()),
        raw => Err(AcceptError::from_status(raw)),
    }
}

/// Counters of one [`accept_range`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AcceptStats {
    /// Successful 1 GiB ACCEPTs.
    pub accepted_1g: u64,
    /// Successful 2 MiB ACCEPTs.
    pub accepted_2m: u64,
    /// Successful 4 KiB ACCEPTs.
    pub accepted_4k: u64,
    /// PAGE_SIZE_MISMATCH answers that made a block be accepted as smaller pieces.
    pub size_mismatch_fallbacks: u64,
    /// OPERAND_BUSY answers that were retried.
    pub busy_retries: u64,
}

/// Failure of [`accept_range`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcceptRangeError {
    /// Everything in `[start, accepted_up_to)` was accepted by this call and nothing in
    /// `[accepted_up_to, end)` was. Callers quarantine from here.
    pub accepted_up_to: Gpa,
    /// Why it stopped.
    pub cause: AcceptError,
}

/// Largest size allowed by `cap`, the alignment of `cur` and the `remaining` length.
fn largest_fitting(cur: Gpa, remaining: u64, cap: AcceptSize) -> AcceptSize {
    for size in [AcceptSize::Size1G, AcceptSize::Size2M] {
        if size.bytes() <= cap.bytes() && size.bytes() <= remaining && cur.is_aligned(size.bytes())
        {
            return size;
        }
    }
    AcceptSize::Size4K
}

/// Accepts `[start, end)` (both 4 KiB aligned, `start <= end`), using at each position the
/// largest size whose alignment and the remaining length allow (1G, then 2M, then 4K).
///
/// PAGE_SIZE_MISMATCH on a 1G block accepts that block as 2M pieces (each of which may fall
/// back to 4K again); on a 2M block, as 4K pieces. OPERAND_BUSY retries the same call at most
/// [`ACCEPT_BUSY_RETRIES`] times in a row. Any other error stops; see
/// [`AcceptRangeError::accepted_up_to`] for what is then known.
///
/// Iterative: a fallback narrows the maximum size until the end of the block that was refused,
/// instead of recursing.
pub fn accept_range<T: TdCall + ?Sized>(
    tdcall: &T,
    start: Gpa,
    end: Gpa,
) -> Result<AcceptStats, AcceptRangeError> {
    let mut stats = AcceptStats::default();
    accept_range_counting(tdcall, start, end, &mut stats)?;
    Ok(stats)
}

/// [`accept_range`], adding what it did to `stats` whether it succeeds or not: a caller that
/// keeps totals (to compare with what the TDX module saw) counts the ACCEPTs that succeeded
/// before a failing one too.
pub fn accept_range_counting<T: TdCall + ?Sized>(
    tdcall: &T,
    start: Gpa,
    end: Gpa,
    stats: &mut AcceptStats,
) -> Result<(), AcceptRangeError> {
    check_range(start, end)?;
    accept_pieces(tdcall, start, end, stats, None)
}

/// Counters of one [`accept_ram`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AcceptRamStats {
    /// What this call accepted, and at which sizes.
    pub accepted: AcceptStats,
    /// Bytes the TDX module reported as accepted already (skipped).
    pub already_accepted_bytes: u64,
}

impl AcceptRamStats {
    /// Bytes this call accepted.
    pub fn accepted_bytes(&self) -> u64 {
        let s = &self.accepted;
        [
            (s.accepted_1g, AcceptSize::Size1G),
            (s.accepted_2m, AcceptSize::Size2M),
            (s.accepted_4k, AcceptSize::Size4K),
        ]
        .iter()
        .fold(0u64, |total, (count, size)| {
            total.saturating_add(count.saturating_mul(size.bytes()))
        })
    }
}

/// Accepts boot RAM `[start, end)` whose state is not known page by page, as [`accept_range`]
/// does, except that a piece the TDX module answers with ALREADY_ACCEPTED is skipped instead of
/// ending the walk: at boot that is expected (the launch image, or all of RAM when the VMM
/// accepted it up front). A 2M or 1G piece answered so is skipped whole: the TDX module gives
/// ALREADY_ACCEPTED only for a block mapped and accepted at that size (a block with pending 4K
/// pages inside gets PAGE_SIZE_MISMATCH and is done in smaller pieces).
///
/// Only for memory whose every page is either pending or private: a page that was converted to
/// shared would be answered ALREADY_ACCEPTED too, and skipped.
pub fn accept_ram<T: TdCall + ?Sized>(
    tdcall: &T,
    start: Gpa,
    end: Gpa,
) -> Result<AcceptRamStats, AcceptRangeError> {
    check_range(start, end)?;
    let mut stats = AcceptRamStats::default();
    accept_pieces(
        tdcall,
        start,
        end,
        &mut stats.accepted,
        Some(&mut stats.already_accepted_bytes),
    )?;
    Ok(stats)
}

/// Both ends 4 KiB aligned and in order.
fn check_range(start: Gpa, end: Gpa) -> Result<(), AcceptRangeError> {
    let invalid = |cause| {
        Err(AcceptRangeError {
            accepted_up_to: start,
            cause,
        })
    };
    if !start.is_aligned(PAGE_SIZE) {
        return invalid(AcceptError::Unaligned {
            gpa: start,
            size: AcceptSize::Size4K,
        });
    }
    if !end.is_aligned(PAGE_SIZE) {
        return invalid(AcceptError::Unaligned {
            gpa: end,
            size: AcceptSize::Size4K,
        });
    }
    if start > end {
        return invalid(AcceptError::InvalidRange { start, end });
    }
    Ok(())
}

/// The walk of [`accept_range`] over a checked range. With `already_accepted`, pieces answered
/// ALREADY_ACCEPTED are skipped and their bytes added there; without, they stop the walk.
fn accept_pieces<T: TdCall + ?Sized>(
    tdcall: &T,
    start: Gpa,
    end: Gpa,
    stats: &mut AcceptStats,
    mut already_accepted: Option<&mut u64>,
) -> Result<(), AcceptRangeError> {
    let mut cur = start.0;
    // Ends of the blocks refused at 1G (accepted as <= 2M until here) and at 2M (accepted as 4K
    // until here). Both are inside [start, end] because the refused block fitted.
    let mut cap_2m_until = cur;
    let mut cap_4k_until = cur;
    let mut busy_in_a_row: u32 = 0;

    while cur < end.0 {
        // No underflow: cur < end. Every size chosen below is <= remaining, so `cur + size`
        // and the caps cannot overflow (they are <= end).
        let remaining = end.0 - cur;
        let cap = if cur < cap_4k_until {
            AcceptSize::Size4K
        } else if cur < cap_2m_until {
            AcceptSize::Size2M
        } else {
            AcceptSize::Size1G
        };
        let size = largest_fitting(Gpa(cur), remaining, cap);
        match page_accept(tdcall, Gpa(cur), size) {
            Ok(()) => {
                busy_in_a_row = 0;
                let counter = match size {
                    AcceptSize::Size1G => &mut stats.accepted_1g,
                    AcceptSize::Size2M => &mut stats.accepted_2m,
                    AcceptSize::Size4K => &mut stats.accepted_4k,
                };
                *counter = counter.saturating_add(1);
                cur += size.bytes();
            }
            Err(AcceptError::OperandBusy(raw)) => {
                if busy_in_a_row >= ACCEPT_BUSY_RETRIES {
                    return Err(AcceptRangeError {
                        accepted_up_to: Gpa(cur),
                        cause: AcceptError::OperandBusy(raw),
                    });
                }
                busy_in_a_row += 1;
                stats.busy_retries = stats.busy_retries.saturating_add(1);
            }
            Err(AcceptError::PageSizeMismatch(_)) if size == AcceptSize::Size1G => {
                busy_in_a_row = 0;
                stats.size_mismatch_fallbacks = stats.size_mismatch_fallbacks.saturating_add(1);
                cap_2m_until = cur + size.bytes();
            }
            Err(AcceptError::PageSizeMismatch(_)) if size == AcceptSize::Size2M => {
                busy_in_a_row = 0;
                stats.size_mismatch_fallbacks = stats.size_mismatch_fallbacks.saturating_add(1);
                cap_4k_until = cur + size.bytes();
            }
            Err(AcceptError::AlreadyAccepted(_)) if already_accepted.is_some() => {
                busy_in_a_row = 0;
                if let Some(skipped) = already_accepted.as_deref_mut() {
                    *skipped = skipped.saturating_add(size.bytes());
                }
                cur += size.bytes();
            }
            Err(cause) => {
                return Err(AcceptRangeError {
                    accepted_up_to: Gpa(cur),
                    cause,
                })
            }
        }
    }
    Ok(())
}

impl core::fmt::Display for AcceptError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            AcceptError::Unaligned { gpa, size } => {
                write!(f, "GPA {gpa} not aligned for a {size:?} ACCEPT")
            }
            AcceptError::InvalidRange { start, end } => {
                write!(f, "invalid ACCEPT range {start}..{end}")
            }
            AcceptError::OperandBusy(s) => write!(f, "ACCEPT: operand busy ({s:#018x})"),
            AcceptError::PageSizeMismatch(s) => write!(f, "ACCEPT: page size mismatch ({s:#018x})"),
            AcceptError::AlreadyAccepted(s) => write!(f, "ACCEPT: already accepted ({s:#018x})"),
            AcceptError::Other(s) => write!(f, "ACCEPT failed with status {s:#018x}"),
        }
    }
}

impl core::error::Error for AcceptError {}

impl core::fmt::Display for AcceptRangeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{} (accepted up to {})", self.cause, self.accepted_up_to)
    }
}

impl core::error::Error for AcceptRangeError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        Some(&self.cause)
    }
}
