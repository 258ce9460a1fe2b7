//! Address types. A physical address here is what the CPU puts on the bus after
//! the page walk, *without* any confidential-computing bit: those bits live in
//! entries only (see [`crate::CcMask`]).

use core::fmt;

/// A physical (guest-physical, in a VM) address with no C/S bit in it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PhysAddr(pub u64);

/// A virtual address. Canonical form depends on the paging mode.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct VirtAddr(pub u64);

/// Size of the smallest page.
pub const PAGE_SIZE: u64 = 4096;

macro_rules! address_ops {
    ($name:ident) => {
        impl $name {
            /// The raw value.
            pub const fn as_u64(self) -> u64 {
                self.0
            }
            /// Whether the address is a multiple of `align` (a power of two).
            pub const fn is_aligned(self, align: u64) -> bool {
                self.0 & (align - 1) == 0
            }
            /// Rounds down to a multiple of `align` (a power of two).
            pub const fn align_down(self, align: u64) -> Self {
                Self(self.0 & !(align - 1))
            }
            /// `self + bytes`, or `None` on overflow.
            pub const fn checked_add(self, bytes: u64) -> Option<Self> {
                match self.0.checked_add(bytes) {
                    Some(v) => Some(Self(v)),
                    None => None,
                }
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({:#x})"), self.0)
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
    };
}
address_ops!(PhysAddr);
address_ops!(VirtAddr);
