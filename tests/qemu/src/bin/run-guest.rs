//! `make run`, `make run-td`, `make run-linux-td`: boots a kernel under QEMU
//! with the harness's command line and streams its serial console.
//!
//! Usage: `run-guest [CPUS] [--td [EMULATOR OPTION...]] [--kernel FILE]
//! [--initrd FILE] [--timeout SECONDS] [-- KERNEL COMMAND LINE...]`.
//! Without `--kernel`, our guest; with `--td`, the kernel runs as a TD
//! under the TDX-module emulator. Every word after `--` is the kernel's
//! command line. It prints the QEMU command line it runs, and exits 0 when
//! the guest reported success or (a kernel of the caller's) powered off.

use qemu_harness::cli::{self, Args, USAGE};
use qemu_harness::{Machine, TdKernel, EXIT_PASS, EXIT_TD_POWER_OFF};
use std::io::{BufRead, Write};
use std::process::{ExitCode, Stdio};
use std::time::Instant;

fn main() -> ExitCode {
    let words: Vec<String> = std::env::args().skip(1).collect();
    // Every refusal is one line naming what is wrong, before anything is
    // built or started.
    let args = match cli::parse(&words).and_then(|a| cli::check_files(&a).map(|()| a)) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("run-guest: error: {e}\n{USAGE}");
            return ExitCode::FAILURE;
        }
    };
    let machine = match build(&args) {
        Ok(machine) => machine,
        Err(e) => {
            eprintln!("run-guest: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut command = qemu_harness::qemu_command(&machine, args.cpus, args.append.as_deref());
    eprintln!(
        "run-guest: {} vCPUs (TCG), timeout {} s:\n  {}",
        args.cpus,
        args.timeout.as_secs(),
        qemu_harness::command_line(&command)
    );
    // The console streams to the terminal line by line, without the
    // firmware's escape sequences (qemu_harness::printable).
    let started = Instant::now();
    let mut child = match command.stdin(Stdio::null()).stdout(Stdio::piped()).spawn() {
        Ok(child) => child,
        Err(e) => {
            eprintln!("run-guest: error: starting qemu-system-x86_64: {e}");
            return ExitCode::FAILURE;
        }
    };
    let console = child.stdout.take().map(|stdout| {
        std::thread::spawn(move || {
            let mut reader = std::io::BufReader::new(stdout);
            let mut line = Vec::new();
            while matches!(reader.read_until(b'\n', &mut line), Ok(n) if n > 0) {
                print!(
                    "{}",
                    qemu_harness::printable(&String::from_utf8_lossy(&line))
                );
                let _ = std::io::stdout().flush();
                line.clear();
            }
        })
    });
    let code = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status.code(),
            Ok(None) if started.elapsed() > args.timeout => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(std::time::Duration::from_millis(50)),
            Err(e) => {
                eprintln!("run-guest: error: waiting for QEMU: {e}");
                let _ = child.kill();
                return ExitCode::FAILURE;
            }
        }
    };
    if let Some(console) = console {
        // QEMU is gone (or killed), so its stdout is at its end.
        let _ = console.join();
    }
    let meaning = qemu_harness::describe_exit(code);
    eprintln!(
        "run-guest: QEMU exit status {code:?} after {:.1?}: {meaning}",
        started.elapsed()
    );
    // Success: our guest's pass status; for a kernel of the caller's, its
    // power-off (the TD's, or plain QEMU quitting normally).
    let success = match code {
        Some(EXIT_PASS) => true,
        Some(EXIT_TD_POWER_OFF) => machine.is_td(),
        Some(0) => args.kernel.is_some() && !machine.is_td(),
        _ => false,
    };
    if success {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn build(args: &Args) -> Result<Machine, String> {
    let kernel = match &args.kernel {
        Some(kernel) => kernel.clone(),
        None => qemu_harness::guest_elf()?,
    };
    Ok(match &args.td {
        None if args.kernel.is_none() && args.initrd.is_none() => Machine::Plain { guest: kernel },
        None => Machine::PlainKernel {
            kernel,
            initrd: args.initrd.clone(),
        },
        // Our guest's TD needs multi-threaded TCG, as tests/qemu/tests/td.rs
        // runs it: its stress spins loaders on every vCPU, and under
        // single-threaded TCG it never got past the first conversion.
        Some(options) if args.kernel.is_none() && args.initrd.is_none() => Machine::Td {
            emulator: qemu_harness::emulator_elf()?,
            guest: kernel,
            options: options.join(" "),
        },
        Some(options) => Machine::TdKernel(TdKernel {
            emulator: qemu_harness::emulator_elf()?,
            kernel,
            initramfs: args.initrd.clone(),
            memory_mib: None,
            options: options.join(" "),
        }),
    })
}
