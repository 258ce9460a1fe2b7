//! The guest kernel. Built for `x86_64-unknown-none` it boots under QEMU;
//! on the host it is only a stub that says so.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
mod kernel;

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("the guest kernel only runs under QEMU: build it for x86_64-unknown-none (make run)");
    std::process::exit(1);
}
