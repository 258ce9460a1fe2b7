//! The TDX-module emulator's logic, separate from the SVM machinery so it is
//! unit-tested on the host: the per-page state of the TD's memory, what each
//! TDCALL does to it, when a guest access deserves a #VE, and the counters.
//!
//! A guest-visible model of TDX, not TDX: there is no confidentiality. It
//! exists so the guest's TD code paths run, and so that an access through a
//! mapping whose shared bit disagrees with the page's state is observed, as
//! the #VE the TDX module would raise, and counted.
#![cfg_attr(not(test), no_std)]

pub mod bzimage;
pub mod control_regs;
pub mod cpuid;
pub mod decode;
pub mod elf;
pub mod events;
pub mod firmware;
pub mod model;
pub mod msr;
mod page_slots;
pub mod snp_exits;
pub mod snp_model;
