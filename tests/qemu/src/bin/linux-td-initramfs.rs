//! `make run-linux-td`: writes the Linux-TD test's initramfs (linux-td/init
//! and Debian's busybox-static, see qemu_harness::initramfs) and prints its
//! path, so the same archive the test boots can be booted by hand.
//!
//! Usage: `linux-td-initramfs [OUT]` (default target/linux-td/initramfs.cpio);
//! busybox from `$LINUX_TD_BUSYBOX` or target/linux-td/busybox.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let out = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(qemu_harness::linux_td_initramfs);
    if let Some(extra) = args.next() {
        eprintln!("linux-td-initramfs: error: unexpected argument {extra:?}\nusage: linux-td-initramfs [OUT]");
        return ExitCode::FAILURE;
    }
    let init = qemu_harness::linux_td_init_script();
    let busybox = qemu_harness::linux_td_busybox();
    match qemu_harness::initramfs::build_linux_td_initramfs(&init, &busybox, &out) {
        Ok(()) => {
            println!("{}", out.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("linux-td-initramfs: error: {e} (run scripts/fetch-linux-td.sh first?)");
            ExitCode::FAILURE
        }
    }
}
