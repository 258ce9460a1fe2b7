//! `make run`: what the project is for, on one screen. Our guest boots as a
//! TD under the TDX-module emulator with 4 vCPUs: one conversion traced
//! step by step (the page's entry and the emulator's state of the page at
//! each step), the in-guest tests, the load_unaligned_zeropad stress and the
//! concurrent conversions with their counters. Then the negative-control
//! build runs the same stress in the legacy order (flip the shared bit in
//! the live entry, flush, MapGPA) under the VMM policy KVM + QEMU have
//! (implicit conversion), and a closing table puts its wrong-state accesses
//! beside ours. Last, the same guest boots as an AMD SEV-SNP guest under
//! the emulator's SNP mode: the traced conversion with the RMP state of the
//! page at each step, the tests, the stress, and the page state changes and
//! PVALIDATEs the guest sent beside those the emulator counted. Full logs
//! go to target/run/; nothing printed carries terminal escape sequences
//! (`qemu_harness::printable`).
//!
//! Usage: `run [--rounds N]` (stress round trips, default 300; the SNP run
//! does a third of them, each costing several times a TD's). Exit status 0
//! when our runs passed with no wrong-state access and the legacy order
//! showed some.

use qemu_harness::screen::{
    render_snp, render_stress, render_trace, trace_rows, value, SNP_SENT_AND_SEEN,
};
use qemu_harness::{
    describe_exit, emulator_elf, guest_elf, guest_legacy_elf, parse_log, run_guest, workspace_root,
    Machine, Report, Run, EXIT_PASS,
};
use std::process::ExitCode;
use std::time::Duration;

const CPUS: u32 = 4;
const TIMEOUT: Duration = Duration::from_secs(900);
const DEFAULT_ROUNDS: u32 = 300;
/// KVM + QEMU's answer to a wrong-state access: convert the page.
const LEGACY_POLICY: &str = "convert";

fn main() -> ExitCode {
    let words: Vec<String> = std::env::args().skip(1).collect();
    let rounds = match words.as_slice() {
        [] => DEFAULT_ROUNDS,
        [flag, n] if flag == "--rounds" => match n.parse::<u32>() {
            Ok(n) if n > 0 => n,
            _ => return usage(&format!("--rounds needs a positive number, not {n:?}")),
        },
        _ => return usage(&format!("unexpected arguments {words:?}")),
    };
    match run(rounds) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("run: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn usage(why: &str) -> ExitCode {
    eprintln!("run: error: {why}\nusage: run [--rounds N]");
    ExitCode::FAILURE
}

/// Boots `guest` as a TD; the log also goes to target/run/<name>.log.
fn boot(
    name: &str,
    guest: std::path::PathBuf,
    options: &str,
    append: &str,
) -> Result<(Run, Report), String> {
    let machine = Machine::Td {
        emulator: emulator_elf()?,
        guest,
        options: options.to_string(),
    };
    let run = run_guest(&machine, CPUS, Some(append), TIMEOUT)?;
    let dir = workspace_root().join("target/run");
    let path = dir.join(format!("{name}.log"));
    std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(&path, &run.log))
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    println!(
        "  done in {:.1?}: exit {:?}, {}; log in target/run/{name}.log\n",
        run.elapsed,
        run.exit_code,
        describe_exit(run.exit_code)
    );
    let report = parse_log(&run.log);
    Ok((run, report))
}

fn run(rounds: u32) -> Result<bool, String> {
    println!(
        "make run: our guest as a TD under the TDX-module emulator, {CPUS} vCPUs (QEMU TCG), \
         then the same stress in the legacy order.\n"
    );
    println!("[1/3] the seven steps: booting (emulator option strict: RAM starts pending) ...");
    let (ours, our_report) = boot(
        "seven-steps",
        guest_elf()?,
        "strict",
        &format!("stress-rounds={rounds}"),
    )?;
    print!("{}", render_trace(&trace_rows(&ours.log)));
    let (passed, failed) = our_report.summary.unwrap_or((0, 0));
    println!("\nIn-guest tests: {passed} passed, {failed} failed");
    println!(
        "Stress: {rounds} round trips of one page range on CPU 0 while the other {} CPUs run \
         load_unaligned_zeropad across it:",
        CPUS - 1
    );
    print!("{}", render_stress(&our_report));
    let c = |k| value(&our_report.concurrent, k);
    println!(
        "Concurrent: every CPU converts its own range at once, then stop_conversions():\n  \
         conversions={} stopped={} errors={} wrong_bytes={} not_present={}\n",
        c("conversions"),
        c("stopped"),
        c("errors"),
        c("wrong_bytes"),
        c("not_present")
    );
    if let Some(crash) = &our_report.crash {
        println!("  crash: {crash}");
    }

    println!(
        "[2/3] the legacy order (flip the shared bit in the live entry, flush, then MapGPA), \
         VMM policy {LEGACY_POLICY} (KVM + QEMU): booting the negative-control build ..."
    );
    let (legacy, legacy_report) = boot(
        "legacy-order",
        guest_legacy_elf()?,
        &format!("strict wrong-state={LEGACY_POLICY}"),
        &format!("stress-rounds={rounds} order=legacy"),
    )?;
    println!("Stress, legacy order:");
    print!("{}", render_stress(&legacy_report));
    // How it ended: the emulator's reason for stopping the TD, or the
    // guest's own report.
    let ending = legacy
        .log
        .lines()
        .find(|l| l.contains("TD shutdown:"))
        .or(legacy_report.crash.as_deref());
    if let Some(ending) = ending {
        println!("  ended: {}", ending.trim());
    }

    let ours_ok = ours.exit_code == Some(EXIT_PASS);
    let wrong = |r: &Report| r.tdx.get("wrong_state").copied();
    let control_ok = legacy.exit_code != Some(EXIT_PASS) && wrong(&legacy_report).unwrap_or(0) > 0;
    let clean = wrong(&our_report) == Some(0);
    println!("\nSummary                          seven steps    legacy order");
    for (what, key, in_tdx) in [
        ("wrong-state accesses (emulator)", "wrong_state", true),
        ("implicit conversions (VMM)", "implicit_conversions", true),
        ("EPT-violation #VEs", "ve_ept_violation", true),
        ("wrong bytes read by loaders", "wrong_bytes", false),
        ("zeropad fixups (#PF)", "fixups", false),
    ] {
        let pick = |r: &Report| value(if in_tdx { &r.tdx } else { &r.stress }, key);
        println!(
            "  {what:<31} {:<14} {}",
            pick(&our_report),
            pick(&legacy_report)
        );
    }
    println!(
        "  {:<31} {:<14} {}",
        "run",
        if ours_ok { "passed" } else { "FAILED" },
        if control_ok {
            "failed, as the negative control must"
        } else {
            "DID NOT FAIL: the control shows nothing"
        }
    );
    let snp_ok = run_snp((rounds / 3).max(1))?;
    let ok = ours_ok && clean && control_ok && snp_ok;
    println!(
        "\n{}",
        if ok {
            "make run: the non-present window kept every access away from a page in the other \
             state, as a TD and as an SNP guest; the legacy order did not."
        } else {
            "make run: FAILED; the logs in target/run/ say why."
        }
    );
    Ok(ok)
}

/// [3/3]: the guest as an SEV-SNP guest; true if it passed with no
/// wrong-state access, no #VC 0x404, and the guest's counts equal the
/// emulator's.
fn run_snp(rounds: u32) -> Result<bool, String> {
    println!(
        "\n[3/3] the same guest as an AMD SEV-SNP guest (emulator option snp: RAM assigned and \
         unvalidated, PVALIDATE through a per-CPU window), {rounds} round trips ..."
    );
    let (snp, report) = boot(
        "snp",
        guest_elf()?,
        "snp",
        &format!("stress-rounds={rounds}"),
    )?;
    print!("{}", render_trace(&trace_rows(&snp.log)));
    let (passed, failed) = report.summary.unwrap_or((0, 0));
    println!("\nIn-guest tests: {passed} passed, {failed} failed");
    println!("Stress and counters:");
    print!("{}", render_snp(&report));
    if let Some(crash) = &report.crash {
        println!("  crash: {crash}");
    }
    let counted = |k: &str| report.snp.get(k).copied();
    let sent = |k: &str| report.stress.get(k).copied();
    let matched = SNP_SENT_AND_SEEN
        .iter()
        .all(|(_, g, e)| sent(g).is_some() && sent(g) == counted(e));
    let ok = snp.exit_code == Some(EXIT_PASS)
        && counted("wrong_state") == Some(0)
        && counted("vc_404") == Some(0)
        && matched;
    println!(
        "  SNP run: {}",
        if ok {
            "passed, no page met in the other state, every count matched"
        } else {
            "FAILED"
        }
    );
    Ok(ok)
}
