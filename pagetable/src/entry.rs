//! Page-table entries and the confidential-computing bits inside them.

use crate::addr::PhysAddr;
use crate::level::Level;
use bitflags::bitflags;

bitflags! {
    /// Architectural flag bits of an x86-64 paging entry.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct PteFlags: u64 {
        /// P: the entry translates.
        const PRESENT = 1 << 0;
        /// R/W.
        const WRITABLE = 1 << 1;
        /// U/S.
        const USER = 1 << 2;
        /// PWT.
        const WRITE_THROUGH = 1 << 3;
        /// PCD.
        const NO_CACHE = 1 << 4;
        /// A.
        const ACCESSED = 1 << 5;
        /// D (leaves only).
        const DIRTY = 1 << 6;
        /// PS in a PD/PDPT entry: the entry is a 2M/1G leaf. In a 4K PTE the same
        /// bit is PAT, see [`PAT_4K`].
        const HUGE_PAGE = 1 << 7;
        /// G (leaves only).
        const GLOBAL = 1 << 8;
        /// XD.
        const NO_EXECUTE = 1 << 63;
    }
}

/// PAT bit of a 4K PTE (bit 7; the same position is PS at higher levels).
pub const PAT_4K: u64 = 1 << 7;
/// PAT bit of a 2M/1G leaf (bit 12, the lowest address bit of a 4K frame).
pub const PAT_LARGE: u64 = 1 << 12;
/// Physical-address field of an entry with MAXPHYADDR 52 (bits 12..=51).
pub const ADDR_FIELD: u64 = 0x000f_ffff_ffff_f000;

/// Physical-address bits a leaf at `level` uses (4K: 12..=51, 2M: 21..=51,
/// 1G: 30..=51). The bits below are flags (PAT) or reserved in large leaves.
pub const fn leaf_addr_field(level: Level) -> u64 {
    ADDR_FIELD & !(level.entry_span() - 1)
}

/// A raw paging entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Pte(pub u64);

impl Pte {
    /// The architectural flags.
    pub const fn flags(self) -> PteFlags {
        PteFlags::from_bits_truncate(self.0)
    }
    /// Whether P is set.
    pub const fn is_present(self) -> bool {
        self.0 & PteFlags::PRESENT.bits() != 0
    }
    /// Whether the entry is all zero (never mapped, or unmapped).
    pub const fn is_unused(self) -> bool {
        self.0 == 0
    }
}

/// Why a confidential-computing mask was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaskError {
    /// The bit is not inside the physical-address field (12..=51).
    BitOutsideAddressField(u32),
    /// TDX GPAW must be 48 or 52 (TDG.VP.INFO).
    UnsupportedGpaw(u8),
}

/// The confidential-computing bits of an entry, as runtime values: on TDX the
/// shared bit is GPAW-1 (learnt from TDG.VP.INFO), on SEV the C-bit (CPUID
/// 0x8000001F), on Hyper-V vTOM the vTOM bit. They are part of the address
/// field, so every address recovered from an entry masks them off.
///
/// An entry is private when `private` bits are set and `shared` bits clear,
/// and shared the other way round. At most one of the two is non-zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CcMask {
    private: u64,
    shared: u64,
}

/// Software-available bit 9, used as the "shared" marker on a machine with no
/// confidential-computing bit, so the engine's state checks still mean something
/// there. Hardware ignores it and it is outside the address field.
pub const SOFTWARE_SHARED_BIT: u64 = 1 << 9;

impl CcMask {
    /// An ordinary VM: no address bit. Shared state is recorded in
    /// [`SOFTWARE_SHARED_BIT`], which changes no translation.
    pub const NONE: CcMask = CcMask {
        private: 0,
        shared: SOFTWARE_SHARED_BIT,
    };

    /// A platform whose *shared* pages carry bit `bit` (TDX, Hyper-V vTOM).
    pub const fn with_shared_bit(bit: u32) -> Result<CcMask, MaskError> {
        match Self::address_bit(bit) {
            Ok(mask) => Ok(CcMask {
                private: 0,
                shared: mask,
            }),
            Err(e) => Err(e),
        }
    }

    /// A platform whose *private* pages carry bit `bit` (AMD SEV's C-bit).
    pub const fn with_private_bit(bit: u32) -> Result<CcMask, MaskError> {
        match Self::address_bit(bit) {
            Ok(mask) => Ok(CcMask {
                private: mask,
                shared: 0,
            }),
            Err(e) => Err(e),
        }
    }

    /// TDX: the shared bit is GPAW-1, GPAW being 48 or 52.
    pub const fn tdx(gpaw: u8) -> Result<CcMask, MaskError> {
        match gpaw {
            48 | 52 => Self::with_shared_bit(gpaw as u32 - 1),
            other => Err(MaskError::UnsupportedGpaw(other)),
        }
    }

    const fn address_bit(bit: u32) -> Result<u64, MaskError> {
        if bit < 12 || bit > 51 {
            return Err(MaskError::BitOutsideAddressField(bit));
        }
        Ok(1 << bit)
    }

    /// Bits set in a private entry.
    pub const fn private_bits(self) -> u64 {
        self.private
    }
    /// Bits set in a shared entry.
    pub const fn shared_bits(self) -> u64 {
        self.shared
    }
    /// Every confidential-computing bit: what an address recovery strips.
    pub const fn all(self) -> u64 {
        self.private | self.shared
    }

    /// Whether `entry` maps its frame as shared.
    pub const fn is_shared(self, entry: Pte) -> bool {
        if self.shared != 0 {
            entry.0 & self.shared != 0
        } else {
            entry.0 & self.private == 0
        }
    }

    /// `entry` re-encoded as shared (only the C/S bits change).
    pub const fn make_shared(self, entry: Pte) -> Pte {
        Pte((entry.0 & !self.private) | self.shared)
    }

    /// `entry` re-encoded as private (only the C/S bits change).
    pub const fn make_private(self, entry: Pte) -> Pte {
        Pte((entry.0 & !self.shared) | self.private)
    }

    /// The frame a leaf at `level` maps, with the C/S bits masked off. Works
    /// whether or not PRESENT is set: the address field of a non-present
    /// entry is software's to keep, and the engine keeps it intact.
    pub const fn leaf_frame(self, entry: Pte, level: Level) -> PhysAddr {
        PhysAddr(entry.0 & leaf_addr_field(level) & !self.all())
    }

    /// The next-level table a non-leaf entry points to, C/S bits masked off
    /// (SEV sets the C-bit in table pointers too).
    pub const fn table_addr(self, entry: Pte) -> PhysAddr {
        PhysAddr(entry.0 & ADDR_FIELD & !self.all())
    }
}
