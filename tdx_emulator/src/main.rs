//! The emulator binary: bare-metal, booted by QEMU with `-kernel`, the guest
//! ELF as `-initrd`. On the host it is only a stub that says so.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
mod hypervisor;

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("the TDX-module emulator only runs under QEMU with SVM: see docs/tdx-emulator.md");
    std::process::exit(1);
}
