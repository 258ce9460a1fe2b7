//! x86-64 paging for confidential guests.
//!
//! The one thing this crate does that an ordinary page-table crate does not:
//! [`PageTables::lookup_address`] returns the leaf for an address **even when
//! its PRESENT bit is clear**, and [`CcMask`] recovers the frame from such an
//! entry with the confidential-computing bit masked off. A private<->shared
//! conversion needs both: it makes the entries non-present first, and then
//! must tell the hypervisor which frames they map.
//!
//! Table memory is reached through [`TableMemory`] (a physical-to-virtual
//! mapper), so the same walker runs on a kernel's direct map
//! ([`OffsetTableMemory`]) and, in host tests, over `sim::SimMemory`
//! (feature `sim`). Feature `x86_64`: conversions to and from the `x86_64`
//! crate's types and an adapter for its frame allocators
//! (`x86_64_interop`).
#![cfg_attr(not(any(test, feature = "sim")), no_std)]
#![deny(unsafe_code)]
#![warn(missing_docs)]

mod addr;
mod entry;
mod level;
mod offset;
mod tables;
#[cfg(feature = "x86_64")]
pub mod x86_64_interop;

#[cfg(any(test, feature = "sim"))]
pub mod sim;

pub use addr::{PhysAddr, VirtAddr, PAGE_SIZE};
pub use entry::{
    leaf_addr_field, CcMask, MaskError, Pte, PteFlags, ADDR_FIELD, PAT_4K, PAT_LARGE,
    SOFTWARE_SHARED_BIT,
};
pub use level::{Level, PagingMode, ENTRIES_PER_TABLE};
pub use offset::OffsetTableMemory;
pub use tables::{Leaf, LeafSpan, PageTables, TableAllocator, TableError, TableMemory, WalkError};

#[cfg(test)]
#[allow(unsafe_code)]
mod offset_tests;
#[cfg(test)]
#[allow(unsafe_code)]
mod tests;
