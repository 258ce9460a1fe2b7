//! `make run`: boots the guest under QEMU with the harness's command line
//! and streams its serial console.
//!
//! Usage: `run-guest [CPUS] [--td [EMULATOR OPTION...]] [-- GUEST COMMAND LINE]`.
//! With `--td` the guest runs as a TD under the TDX-module emulator.

use qemu_harness::Machine;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (ours, append) = match args.iter().position(|a| a == "--") {
        Some(i) => (&args[..i], args.get(i + 1).map(String::as_str)),
        None => (&args[..], None),
    };
    let cpus: u32 = ours.iter().find_map(|a| a.parse().ok()).unwrap_or(4);
    let td_options: Option<Vec<&str>> = ours.iter().position(|a| a == "--td").map(|i| {
        ours[i + 1..]
            .iter()
            .map(String::as_str)
            .filter(|a| a.parse::<u32>().is_err())
            .collect()
    });
    let machine = match build(td_options) {
        Ok(machine) => machine,
        Err(e) => {
            eprintln!("run-guest: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!("run-guest: booting with {cpus} vCPUs (TCG): {machine:?}");
    match qemu_harness::qemu_command(&machine, cpus, append).status() {
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

fn build(td_options: Option<Vec<&str>>) -> Result<Machine, String> {
    let guest = qemu_harness::guest_elf()?;
    Ok(match td_options {
        None => Machine::Plain { guest },
        Some(options) => Machine::Td {
            emulator: qemu_harness::emulator_elf()?,
            guest,
            options: options.join(" "),
        },
    })
}
