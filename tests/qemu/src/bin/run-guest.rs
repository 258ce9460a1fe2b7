//! `make run`: boots the guest under QEMU with the harness's command line
//! and streams its serial console. Usage: run-guest [CPUS] [-- APPEND].

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cpus: u32 = args.first().and_then(|a| a.parse().ok()).unwrap_or(4);
    let append = args
        .iter()
        .position(|a| a == "--")
        .and_then(|i| args.get(i + 1))
        .map(String::as_str);
    let elf = match qemu_harness::guest_elf() {
        Ok(elf) => elf,
        Err(e) => {
            eprintln!("run-guest: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!(
        "run-guest: booting {} with {cpus} vCPUs (TCG)",
        elf.display()
    );
    match qemu_harness::qemu_command(&elf, cpus, append).status() {
        Ok(status) if status.code() == Some(qemu_harness::EXIT_PASS) => {
            eprintln!("run-guest: guest reported success");
            ExitCode::SUCCESS
        }
        Ok(status) => {
            eprintln!("run-guest: guest failed ({status})");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("run-guest: starting qemu-system-x86_64: {e}");
            ExitCode::FAILURE
        }
    }
}
