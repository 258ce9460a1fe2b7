//! Bare-metal x86-64 code that both bare-metal programs of this project need
//! (the guest kernel and the TDX-module emulator), written once.
//!
//! Everything that executes privileged instructions or assembles boot code is
//! compiled only for `target_os = "none"`; the parsing logic (boot info, ACPI)
//! also builds on the host, where it is unit-tested.
#![cfg_attr(not(test), no_std)]

pub mod acpi;
#[cfg(target_os = "none")]
pub mod apic;
#[cfg(target_os = "none")]
pub mod boot;
pub mod bootinfo;
#[cfg(target_os = "none")]
pub mod cpu;
#[cfg(target_os = "none")]
pub mod exit;
#[cfg(target_os = "none")]
pub mod extable;
// Also built for host tests: its descriptor encoding is tested there.
#[cfg(any(target_os = "none", test))]
pub mod gdt;
#[cfg(target_os = "none")]
pub mod idt;
pub mod mpwakeup;
#[cfg(target_os = "none")]
pub mod serial;
#[cfg(target_os = "none")]
pub mod smp;
pub mod tsc;
