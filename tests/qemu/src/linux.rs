//! Judging a Linux boot from its serial log: the lines Linux prints when it
//! finds itself in a TD, the CPUs it brought up, the marker and CPU count
//! of our `/init` (linux-td/init), no crash report, and how QEMU ended.

use crate::describe_exit;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Printed by linux-td/init once userspace runs.
pub const INIT_MARKER: &str = "LINUXTD init reached";
/// linux-td/init's CPU count: `LINUXTD cpus=<processors in /proc/cpuinfo>`.
pub const CPUS_PREFIX: &str = "LINUXTD cpus=";
/// Every line linux-td/init prints starts so.
pub const INIT_PREFIX: &str = "LINUXTD ";
/// arch/x86/coco/tdx/tdx.c, tdx_early_init(): `pr_info("Guest detected\n")`
/// under `pr_fmt "tdx: "`.
pub const TDX_DETECTED: &str = "tdx: Guest detected";
/// arch/x86/mm/mem_encrypt.c, print_mem_encrypt_feature_info():
/// `pr_info("Memory Encryption Features active: ")` then `pr_cont("Intel TDX\n")`.
pub const TDX_MEMORY_ENCRYPTION: &str = "Memory Encryption Features active: Intel TDX";
/// What Linux prints when something went wrong: `BUG:` (BUG(), bad page
/// faults, lockups), `WARNING:` (WARN()), `Oops` (die()), `panic` ("Kernel
/// panic - not syncing"). Case-sensitive: a normal 6.12 boot prints none.
pub const CRASH_WORDS: &[&str] = &["BUG:", "WARNING:", "Oops", "panic"];

/// kernel/smp.c, smp_init(): `pr_info("Brought up %d node%s, %d CPU%s\n")`
/// under `pr_fmt "smp: "`, plural only above one.
pub fn smp_line(cpus: u32) -> String {
    let plural = if cpus == 1 { "" } else { "s" };
    format!("smp: Brought up 1 node, {cpus} CPU{plural}")
}

/// What a boot must show.
#[derive(Clone, Debug)]
pub struct Expect {
    /// vCPUs given to QEMU: Linux must bring up all of them.
    pub cpus: u32,
    /// `true`: the TD lines must be there (under the emulator); `false`:
    /// they must not (plain QEMU, the control).
    pub td: bool,
    /// QEMU's exit status.
    pub exit: i32,
}

/// The lines a boot matched, for the test output.
#[derive(Debug, Default, PartialEq)]
pub struct LinuxBoot {
    /// Each required line as the log has it, in the order checked.
    pub matched: Vec<String>,
    /// linux-td/init's repeat of the kernel's TDX lines (`LINUXTD dmesg: ...`).
    pub tdx_dmesg: Vec<String>,
}

/// The serial console's part of a run's log (run_guest appends QEMU's
/// stderr after a separator; QEMU is not Linux).
pub fn serial_part(log: &str) -> &str {
    log.split_once("\n[qemu stderr]\n")
        .map_or(log, |(serial, _)| serial)
}

/// A console line without the printk timestamp (`[   22.1] `) that lines
/// written to /dev/kmsg carry: linux-td/init logs there, since the TD's
/// UART has no interrupt and a tty write would never drain.
fn without_timestamp(line: &str) -> &str {
    let line = line.trim_start();
    match line
        .strip_prefix('[')
        .and_then(|rest| rest.split_once("] "))
    {
        Some((stamp, rest)) if stamp.trim().parse::<f64>().is_ok() => rest,
        _ => line,
    }
}

/// Whether CI is set (`CI=true`, as `.ci/run` does): missing test files
/// are then a failure, never a skip.
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// Whether every file a Linux test needs exists. If not, `why` turns the
/// list of missing files into the reason; then a panic (ending with
/// `failure_note`) when `must`, else a loud SKIPPED banner and `false`.
pub fn require_files(
    test: &str,
    files: &[&Path],
    why: impl FnOnce(&str) -> String,
    must: bool,
    failure_note: &str,
) -> bool {
    let missing: Vec<String> = files
        .iter()
        .filter(|p| !p.is_file())
        .map(|p| p.display().to_string())
        .collect();
    if missing.is_empty() {
        return true;
    }
    let why = why(&missing.join(", "));
    if must {
        panic!("{test}: {why} ({failure_note})");
    }
    let banner = "!".repeat(78);
    eprintln!("{banner}\nSKIPPED {test}: {why}\n{banner}");
    println!("SKIPPED {test}: {why}");
    false
}

/// The initramfs at `out`, built by `build` once per test binary (`cell`)
/// and read back: a malformed archive would show up only as a kernel panic
/// deep in the boot log. Panics naming `what` if either fails.
pub fn initramfs_once<E: std::fmt::Display>(
    cell: &'static OnceLock<Result<PathBuf, String>>,
    out: PathBuf,
    what: &str,
    build: impl FnOnce(&Path) -> Result<(), E>,
) -> PathBuf {
    cell.get_or_init(|| {
        build(&out).map_err(|e| e.to_string())?;
        let bytes = std::fs::read(&out).map_err(|e| format!("{}: {e}", out.display()))?;
        crate::initramfs::parse_newc(&bytes).map_err(|e| e.to_string())?;
        Ok(out)
    })
    .clone()
    .unwrap_or_else(|e| panic!("building {what}: {e}"))
}

/// Judges a Linux boot; on failure, every problem found, one per line.
pub fn judge_linux(exit: Option<i32>, log: &str, expect: &Expect) -> Result<LinuxBoot, String> {
    let serial = serial_part(log);
    let lines: Vec<&str> = serial.lines().map(str::trim_end).collect();
    let mut boot = LinuxBoot::default();
    let mut problems = Vec::new();
    // The kernel's own lines: linux-td/init repeats some of them
    // (`LINUXTD dmesg: ...`), and a repeat must not stand in for the
    // kernel's console output.
    let is_kernel = |l: &str| !without_timestamp(l).starts_with(INIT_PREFIX);
    let find = |needle: &str| lines.iter().position(|l| l.contains(needle));

    let mut required = vec![smp_line(expect.cpus), INIT_MARKER.to_string()];
    if expect.td {
        required.splice(0..0, [TDX_DETECTED.into(), TDX_MEMORY_ENCRYPTION.into()]);
    } else if let Some(line) = lines
        .iter()
        .filter(|l| is_kernel(l))
        .find(|l| l.contains(TDX_DETECTED))
    {
        problems.push(format!("not a TD, yet Linux printed {line:?}"));
    }
    for needle in &required {
        // The SMP line must end there, so "1 CPU" cannot match "1 CPUs".
        let is_smp = needle.starts_with("smp: ");
        let is_marker = needle == INIT_MARKER;
        match lines
            .iter()
            .filter(|l| is_marker || is_kernel(l))
            .find(|l| {
                if is_smp {
                    l.ends_with(needle.as_str())
                } else {
                    l.contains(needle.as_str())
                }
            }) {
            Some(line) => boot.matched.push(line.to_string()),
            None => problems.push(format!("missing in the serial log: {needle:?}")),
        }
    }

    let cpus: Vec<&str> = lines
        .iter()
        .filter_map(|l| without_timestamp(l).strip_prefix(CPUS_PREFIX))
        .collect();
    match cpus.as_slice() {
        [n] if n.trim().parse::<u32>() == Ok(expect.cpus) => {
            boot.matched.push(format!("{CPUS_PREFIX}{}", n.trim()));
        }
        [n] => problems.push(format!(
            "/proc/cpuinfo lists {} processors, want {}",
            n.trim(),
            expect.cpus
        )),
        [] => problems.push(format!("missing in the serial log: {CPUS_PREFIX:?}")),
        _ => problems.push(format!("{CPUS_PREFIX} printed {} times", cpus.len())),
    }

    // Crash reports: before the marker as the acceptance asks, and after it
    // too (a WARN in the power-off path is as much a fidelity bug). Our own
    // init's lines are skipped: they repeat kernel lines already checked.
    let marker = find(INIT_MARKER);
    for (i, line) in lines.iter().enumerate() {
        if without_timestamp(line).starts_with(INIT_PREFIX) || line.starts_with("TDXEMU ") {
            continue;
        }
        if let Some(word) = CRASH_WORDS.iter().find(|w| line.contains(*w)) {
            let when = match marker {
                Some(m) if i > m => "after the init marker",
                Some(_) => "before the init marker",
                None => "and no init marker",
            };
            problems.push(format!("{word:?} {when}, line {}: {line}", i + 1));
        }
    }

    boot.tdx_dmesg = lines
        .iter()
        .filter_map(|l| without_timestamp(l).strip_prefix("LINUXTD dmesg: "))
        .map(str::to_string)
        .collect();

    if exit != Some(expect.exit) {
        problems.push(format!(
            "QEMU exit status {exit:?} ({}), want {} ({})",
            describe_exit(exit),
            expect.exit,
            describe_exit(Some(expect.exit))
        ));
    }
    if problems.is_empty() {
        Ok(boot)
    } else {
        Err(problems.join("\n"))
    }
}

/// The "Oops: int3" that multi-threaded TCG's stale translation of code
/// Linux just patched causes (see [`crate::qemu_command`]), if the log has one.
pub fn tcg_stale_code_oops(log: &str) -> Option<&str> {
    log.lines().find(|l| l.contains("Oops: int3"))
}

/// More boots after the first when that oops ends one.
pub const TCG_STALE_CODE_RETRIES: u32 = 2;

/// Runs `boot`, and again (at most [`TCG_STALE_CODE_RETRIES`] more times)
/// while its run ends in TCG's stale-code oops, saying so each time: a
/// QEMU defect, not what the run measures. Any other outcome is returned as
/// it is, and so is the last of the oopsing runs.
pub fn retry_tcg_stale_code(
    what: &str,
    mut boot: impl FnMut() -> Result<crate::Run, String>,
) -> Result<crate::Run, String> {
    let mut run = boot()?;
    for retry in 1..=TCG_STALE_CODE_RETRIES {
        let Some(line) = tcg_stale_code_oops(serial_part(&run.log)) else {
            break;
        };
        eprintln!(
            "{what}: Linux hit multi-threaded TCG's stale-code int3 ({}); boot {} of {}",
            line.trim(),
            retry + 1,
            TCG_STALE_CODE_RETRIES + 1
        );
        run = boot()?;
    }
    Ok(run)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_int3_oops_counts_as_tcg_stale_code() {
        let int3 = "[ 10.9] Oops: int3: 0000 [#1] PREEMPT SMP PTI\n[ 10.9] RIP: 0010:sched_clock_cpu+0x9/0x190";
        assert!(tcg_stale_code_oops(int3).is_some_and(|l| l.contains("int3")));
        assert!(tcg_stale_code_oops("[ 1.0] Oops: general protection fault: 0000 [#1]").is_none());
        assert!(tcg_stale_code_oops("all fine").is_none());
    }
    use crate::EXIT_TD_POWER_OFF;

    // Abridged from a 6.12 boot (timestamps as CONFIG_PRINTK_TIME prints
    // them), with the emulator's counter line at the end.
    const TD_4: &str = "\
[    0.000000] Linux version 6.12.117+deb12-cloud-amd64
[    0.000000] tdx: Guest detected
[    0.000000] Memory Encryption Features active: Intel TDX
[    0.104000] smp: Brought up 1 node, 4 CPUs
[    1.200000] Run /init as init process
LINUXTD init reached
LINUXTD cpus=4
LINUXTD dmesg: [    0.000000] tdx: Guest detected
LINUXTD powering off
[    1.300000] reboot: Power down
TDXEMU map_gpa_calls=12 map_gpa_retries=0
";

    fn td(cpus: u32) -> Expect {
        Expect {
            cpus,
            td: true,
            exit: EXIT_TD_POWER_OFF,
        }
    }

    #[test]
    fn a_good_td_boot_passes_and_reports_its_lines() {
        let boot = judge_linux(Some(EXIT_TD_POWER_OFF), TD_4, &td(4)).unwrap();
        assert_eq!(boot.matched.len(), 5);
        assert_eq!(
            boot.matched[2],
            "[    0.104000] smp: Brought up 1 node, 4 CPUs"
        );
        assert_eq!(boot.matched[4], "LINUXTD cpus=4");
        assert_eq!(boot.tdx_dmesg, ["[    0.000000] tdx: Guest detected"]);
    }

    #[test]
    fn one_cpu_is_singular_and_must_match_exactly() {
        let one = TD_4.replace("4 CPUs", "1 CPU").replace("cpus=4", "cpus=1");
        assert!(judge_linux(Some(EXIT_TD_POWER_OFF), &one, &td(1)).is_ok());
        let wrong = TD_4.replace("cpus=4", "cpus=1");
        let why = judge_linux(Some(EXIT_TD_POWER_OFF), &wrong, &td(1)).unwrap_err();
        assert!(why.contains("\"smp: Brought up 1 node, 1 CPU\""), "{why}");
        assert!(!why.contains("processors"), "{why}");
        let why = judge_linux(Some(EXIT_TD_POWER_OFF), &wrong, &td(4)).unwrap_err();
        assert!(why.contains("lists 1 processors, want 4"), "{why}");
    }

    #[test]
    fn missing_tdx_lines_or_marker_fail() {
        for line in [TDX_DETECTED, TDX_MEMORY_ENCRYPTION, INIT_MARKER] {
            let log = TD_4.replacen(line, "something else", 1);
            let why = judge_linux(Some(EXIT_TD_POWER_OFF), &log, &td(4)).unwrap_err();
            assert!(
                why.contains(&format!("missing in the serial log: {line:?}")),
                "{why}"
            );
        }
    }

    #[test]
    fn crash_words_fail_wherever_linux_prints_them() {
        for (text, word) in [
            ("BUG: kernel NULL pointer dereference", "BUG:"),
            (
                "WARNING: CPU: 0 PID: 1 at arch/x86/coco/tdx/tdx.c:1",
                "WARNING:",
            ),
            ("Oops: general protection fault", "Oops"),
            (
                "Kernel panic - not syncing: Attempted to kill init!",
                "panic",
            ),
        ] {
            let before = TD_4.replace("Run /init", &format!("{text}\n[ 1.2] Run /init"));
            let why = judge_linux(Some(EXIT_TD_POWER_OFF), &before, &td(4)).unwrap_err();
            assert!(
                why.contains(&format!("{word:?} before the init marker")),
                "{why}"
            );
            let after = TD_4.replace("reboot: Power down", text);
            let why = judge_linux(Some(EXIT_TD_POWER_OFF), &after, &td(4)).unwrap_err();
            assert!(why.contains("after the init marker"), "{why}");
        }
        // Case-sensitive as Linux prints them; QEMU's stderr is not Linux.
        let benign = format!("{TD_4}bug: warning: oops Panic\n[qemu stderr]\nWARNING: x\n");
        assert!(judge_linux(Some(EXIT_TD_POWER_OFF), &benign, &td(4)).is_ok());
    }

    #[test]
    fn only_the_expected_exit_passes() {
        for exit in [None, Some(0), Some(35), Some(67)] {
            let why = judge_linux(exit, TD_4, &td(4)).unwrap_err();
            assert!(why.contains("QEMU exit status"), "{why}");
        }
    }

    #[test]
    fn the_plain_control_must_not_claim_a_td() {
        let plain = Expect {
            cpus: 4,
            td: false,
            exit: 0,
        };
        let why = judge_linux(Some(0), TD_4, &plain).unwrap_err();
        assert!(why.contains("not a TD"), "{why}");
        let log = TD_4
            .replace("tdx: Guest detected", "x")
            .replace(TDX_MEMORY_ENCRYPTION, "y");
        assert!(judge_linux(Some(0), &log, &plain).is_ok());
    }
}
