//! Paging levels and modes. The walker is written against [`PagingMode::top`]
//! so 5-level paging is the same code with one more table on top.

use crate::addr::VirtAddr;

/// A paging-structure level, counted from the bottom as the SDM does.
/// Leaves can sit at [`Level::Pt`] (4 KiB), [`Level::Pd`] (2 MiB) and
/// [`Level::Pdpt`] (1 GiB).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Page table: 4 KiB leaves.
    Pt = 1,
    /// Page directory: 2 MiB leaves or page tables.
    Pd = 2,
    /// Page-directory-pointer table: 1 GiB leaves or page directories.
    Pdpt = 3,
    /// PML4.
    Pml4 = 4,
    /// PML5 (5-level paging only).
    Pml5 = 5,
}

/// Entries per table at every level.
pub const ENTRIES_PER_TABLE: usize = 512;

impl Level {
    /// Bit position of the lowest virtual-address bit this level translates.
    pub const fn shift(self) -> u32 {
        12 + 9 * (self as u32 - 1)
    }

    /// Bytes one entry at this level maps.
    pub const fn entry_span(self) -> u64 {
        1 << self.shift()
    }

    /// Whether an entry at this level may be a leaf (4K, 2M, 1G).
    pub const fn can_be_leaf(self) -> bool {
        matches!(self, Level::Pt | Level::Pd | Level::Pdpt)
    }

    /// The level below, or `None` for [`Level::Pt`].
    pub const fn lower(self) -> Option<Level> {
        match self {
            Level::Pt => None,
            Level::Pd => Some(Level::Pt),
            Level::Pdpt => Some(Level::Pd),
            Level::Pml4 => Some(Level::Pdpt),
            Level::Pml5 => Some(Level::Pml4),
        }
    }

    /// Index of `va` in a table of this level.
    pub const fn index_of(self, va: VirtAddr) -> usize {
        ((va.0 >> self.shift()) & (ENTRIES_PER_TABLE as u64 - 1)) as usize
    }

    /// Human-readable page size of a leaf at this level.
    pub const fn page_size_name(self) -> &'static str {
        match self {
            Level::Pt => "4K",
            Level::Pd => "2M",
            Level::Pdpt => "1G",
            Level::Pml4 => "512G",
            Level::Pml5 => "256T",
        }
    }
}

/// 4-level (48-bit virtual addresses) or 5-level (57-bit) paging, or
/// 4-level nested tables (NPT/EPT) that translate guest-physical addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PagingMode {
    /// CR4.LA57 = 0.
    FourLevel,
    /// CR4.LA57 = 1.
    FiveLevel,
    /// Nested paging: the input is a 48-bit guest-physical address, which is
    /// not sign-extended (a TDX shared alias has bit 47 set).
    FourLevelNested,
}

impl PagingMode {
    /// The root table's level.
    pub const fn top(self) -> Level {
        match self {
            PagingMode::FourLevel | PagingMode::FourLevelNested => Level::Pml4,
            PagingMode::FiveLevel => Level::Pml5,
        }
    }

    /// Number of implemented virtual-address bits.
    pub const fn va_bits(self) -> u32 {
        self.top().shift() + 9
    }

    /// Whether `va` is canonical: bits above `va_bits - 1` copy that bit
    /// (for nested tables: are zero).
    pub const fn is_canonical(self, va: VirtAddr) -> bool {
        let unused = 64 - self.va_bits();
        if let PagingMode::FourLevelNested = self {
            return va.0 >> self.va_bits() == 0;
        }
        (((va.0 << unused) as i64) >> unused) as u64 == va.0
    }
}
