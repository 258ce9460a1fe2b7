//! The host side of the guest tests: one QEMU command line (used by the
//! tests and by `make run`), a bounded run that keeps the serial log, and a
//! judge that fails on any failed, missing or crashed test.
//!
//! The guest speaks a line protocol on COM1: `PLAN <n>`, `TEST <name> ok` or
//! `TEST <name> FAILED: <why>`, `STRESS key=value ...`, `SUMMARY passed=<n>
//! failed=<n>`; a crash prints `FATAL: ...` or `PANIC: ...`. isa-debug-exit
//! turns the guest's verdict into QEMU's exit status: 33 pass, 35 fail.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How QEMU runs a program: the guest alone, or the guest as a TD under the
/// TDX-module emulator.
#[derive(Clone, Debug)]
pub enum Machine {
    /// `-kernel guest`.
    Plain { guest: PathBuf },
    /// `-kernel emulator -initrd guest`, on a CPU with SVM and nested paging.
    Td {
        emulator: PathBuf,
        guest: PathBuf,
        options: String,
    },
}

/// QEMU's exit status when the guest reports success.
pub const EXIT_PASS: i32 = 33;
/// QEMU's exit status when the guest reports failure.
pub const EXIT_FAIL: i32 = 35;

/// Every test the guest must report, in order.
pub const EXPECTED_TESTS: &[&str] = &[
    "walker_on_live_tables",
    "frame_from_non_present_entries",
    "convert_one_page",
    "convert_many_pages",
    "convert_whole_2m",
    "convert_partial_2m",
    "bad_inputs_change_nothing",
    "alias_purged_by_step_1",
    "zeropad_next_page_mapped",
    "zeropad_next_page_absent",
    "flush_window_maps_frame_as_it_is",
];

/// The workspace root (two levels above this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The guest ELF: `$GUEST_ELF` if set (the Makefile builds it first), else
/// built here.
pub fn guest_elf() -> Result<PathBuf, String> {
    bare_metal_elf("GUEST_ELF", "guest", &[])
}

/// The guest built with the legacy conversion order available (for the
/// negative control): `$GUEST_LEGACY_ELF`, else built here.
pub fn guest_legacy_elf() -> Result<PathBuf, String> {
    bare_metal_elf(
        "GUEST_LEGACY_ELF",
        "guest",
        &["--features", "negative-control"],
    )
}

/// The TDX-module emulator: `$EMULATOR_ELF`, else built here.
pub fn emulator_elf() -> Result<PathBuf, String> {
    bare_metal_elf("EMULATOR_ELF", "tdx_emulator", &[])
}

/// `$variable` if set, else `package` built with `extra` arguments into a
/// target directory of its own, so it cannot wait on the lock of the cargo
/// that runs these tests.
fn bare_metal_elf(variable: &str, package: &str, extra: &[&str]) -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os(variable) {
        return Ok(PathBuf::from(path));
    }
    let root = workspace_root();
    let flavour = if extra.is_empty() {
        "default"
    } else {
        "features"
    };
    let target_dir = root.join(format!("target/harness-{package}-{flavour}"));
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(&root)
        .args([
            "build",
            "--release",
            "-p",
            package,
            "--target",
            "x86_64-unknown-none",
        ])
        .args(extra)
        .arg("--target-dir")
        .arg(&target_dir)
        .status()
        .map_err(|e| format!("running cargo: {e}"))?;
    if !status.success() {
        return Err(format!("building {package} failed: {status}"));
    }
    Ok(target_dir.join(format!("x86_64-unknown-none/release/{package}")))
}

/// The QEMU command line for `machine` with `cpus` vCPUs and the guest
/// command line `append`. No KVM: TCG, with one host thread per vCPU so they
/// really run in parallel.
pub fn qemu_command(machine: &Machine, cpus: u32, append: Option<&str>) -> Command {
    let mut command = Command::new("qemu-system-x86_64");
    command
        .args(["-accel", "tcg,thread=multi", "-machine", "q35"])
        .args(["-smp", &cpus.to_string()])
        .args([
            "-nodefaults",
            "-nographic",
            "-no-reboot",
            "-monitor",
            "none",
            "-serial",
            "stdio",
        ])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"]);
    match machine {
        Machine::Plain { guest } => {
            command
                .args(["-cpu", "qemu64", "-m", "256M"])
                .arg("-kernel")
                .arg(guest);
            if let Some(append) = append {
                command.args(["-append", append]);
            }
        }
        Machine::Td {
            emulator,
            guest,
            options,
        } => {
            // The emulator takes its options, then `--`, then the guest's.
            let line = format!("{options} -- {}", append.unwrap_or(""));
            command
                .args(["-cpu", "qemu64,+svm,+npt,phys-bits=48", "-m", "1G"])
                .arg("-kernel")
                .arg(emulator)
                .arg("-initrd")
                .arg(guest)
                .args(["-append", line.trim()]);
        }
    }
    command
}

/// What a bounded run produced.
#[derive(Debug)]
pub struct Run {
    /// QEMU's exit status, `None` if it was killed at the timeout.
    pub exit_code: Option<i32>,
    /// Everything the guest printed.
    pub log: String,
    /// How long it took.
    pub elapsed: Duration,
}

/// Boots `machine` and waits at most `timeout`, keeping the serial log.
pub fn run_guest(
    machine: &Machine,
    cpus: u32,
    append: Option<&str>,
    timeout: Duration,
) -> Result<Run, String> {
    let started = Instant::now();
    let mut child = qemu_command(machine, cpus, append)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting qemu-system-x86_64: {e}"))?;
    let mut stdout = child.stdout.take().ok_or("no stdout")?;
    let reader = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stdout.read_to_end(&mut bytes);
        bytes
    });
    let exit_code = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status.code();
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut errors = String::new();
    if let Some(mut stderr) = child.stderr.take() {
        let _ = stderr.read_to_string(&mut errors);
    }
    let bytes = reader.join().unwrap_or_default();
    let mut log = String::from_utf8_lossy(&bytes).replace('\r', "");
    if !errors.is_empty() {
        log.push_str("\n[qemu stderr]\n");
        log.push_str(&errors);
    }
    Ok(Run {
        exit_code,
        log,
        elapsed: started.elapsed(),
    })
}

/// What the guest reported.
#[derive(Debug, Default, PartialEq)]
pub struct Report {
    /// `PLAN <n>`.
    pub plan: Option<usize>,
    /// Test name -> `Ok` or the failure message, in order of appearance.
    pub tests: Vec<(String, Result<(), String>)>,
    /// `STRESS` counters.
    pub stress: BTreeMap<String, u64>,
    /// The TDX-module emulator's `TDXEMU` counters (TD runs only).
    pub tdx: BTreeMap<String, u64>,
    /// `SUMMARY passed=.. failed=..`.
    pub summary: Option<(u64, u64)>,
    /// The first `FATAL:` or `PANIC:` line.
    pub crash: Option<String>,
}

/// Parses the guest's serial log.
pub fn parse_log(log: &str) -> Report {
    let mut report = Report::default();
    for line in log.lines().map(str::trim) {
        if let Some(count) = line.strip_prefix("PLAN ") {
            report.plan = count.trim().parse().ok();
        } else if let Some(rest) = line.strip_prefix("TEST ") {
            let (name, outcome) = rest.split_once(' ').unwrap_or((rest, ""));
            let result = match outcome {
                "ok" => Ok(()),
                other => Err(other.strip_prefix("FAILED: ").unwrap_or(other).to_string()),
            };
            report.tests.push((name.to_string(), result));
        } else if let Some(rest) = line.strip_prefix("STRESS ") {
            parse_counters(rest, &mut report.stress);
        } else if let Some(rest) = line.strip_prefix("TDXEMU ") {
            parse_counters(rest, &mut report.tdx);
        } else if let Some(rest) = line.strip_prefix("SUMMARY ") {
            let field = |key: &str| {
                rest.split_whitespace()
                    .find_map(|p| p.strip_prefix(key))
                    .and_then(|v| v.parse().ok())
            };
            if let (Some(passed), Some(failed)) = (field("passed="), field("failed=")) {
                report.summary = Some((passed, failed));
            }
        } else if (line.starts_with("FATAL:") || line.starts_with("PANIC:"))
            && report.crash.is_none()
        {
            report.crash = Some(line.to_string());
        }
    }
    report
}

fn parse_counters(text: &str, into: &mut BTreeMap<String, u64>) {
    for pair in text.split_whitespace() {
        if let Some((key, value)) = pair.split_once('=') {
            if let Ok(value) = value.parse() {
                into.insert(key.to_string(), value);
            }
        }
    }
}

/// Every expected test reported ok exactly once, nothing failed or crashed,
/// the summary agrees, and QEMU exited with the pass status.
pub fn judge(run_exit: Option<i32>, report: &Report, expected: &[&str]) -> Result<(), String> {
    let mut problems = Vec::new();
    if let Some(crash) = &report.crash {
        problems.push(format!("guest crashed: {crash}"));
    }
    for name in expected {
        let results: Vec<_> = report.tests.iter().filter(|(n, _)| n == name).collect();
        match results.as_slice() {
            [] => problems.push(format!("test {name} missing")),
            [(_, Ok(()))] => {}
            [(_, Err(why))] => problems.push(format!("test {name} failed: {why}")),
            _ => problems.push(format!("test {name} reported {} times", results.len())),
        }
    }
    for (name, result) in &report.tests {
        if !expected.contains(&name.as_str()) && result.is_err() {
            problems.push(format!("unexpected test {name} failed"));
        }
    }
    if report.plan != Some(report.tests.len()) {
        problems.push(format!(
            "plan {:?} but {} tests reported",
            report.plan,
            report.tests.len()
        ));
    }
    let failed = report.tests.iter().filter(|(_, r)| r.is_err()).count() as u64;
    let passed = report.tests.len() as u64 - failed;
    if report.summary != Some((passed, failed)) {
        problems.push(format!(
            "summary {:?} but counted passed={passed} failed={failed}",
            report.summary
        ));
    }
    if run_exit != Some(EXIT_PASS) {
        problems.push(format!("QEMU exit status {run_exit:?}, want {EXIT_PASS}"));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "guest: booted\nPLAN 2\nTEST a ok\nTEST b ok\nSTRESS cpus=2 conversions=10000 fixups=5\nSUMMARY passed=2 failed=0\nTDXEMU ve_ept_violation=0 map_gpa_calls=7\n";

    #[test]
    fn a_good_log_passes() {
        let report = parse_log(GOOD);
        assert_eq!(report.stress.get("conversions"), Some(&10000));
        assert_eq!(report.tdx.get("map_gpa_calls"), Some(&7));
        assert_eq!(judge(Some(EXIT_PASS), &report, &["a", "b"]), Ok(()));
    }

    #[test]
    fn a_missing_test_fails() {
        let report = parse_log(GOOD);
        let verdict = judge(Some(EXIT_PASS), &report, &["a", "b", "c"]).unwrap_err();
        assert!(verdict.contains("test c missing"), "{verdict}");
    }

    #[test]
    fn a_failed_test_fails() {
        let log = GOOD
            .replace("TEST b ok", "TEST b FAILED: 3 != 4")
            .replace("passed=2 failed=0", "passed=1 failed=1");
        let verdict = judge(Some(EXIT_FAIL), &parse_log(&log), &["a", "b"]).unwrap_err();
        assert!(verdict.contains("test b failed: 3 != 4"), "{verdict}");
        assert!(verdict.contains("exit status Some(35)"), "{verdict}");
    }

    #[test]
    fn a_crash_or_timeout_fails_even_with_all_tests_ok() {
        let log = format!("{GOOD}FATAL: kernel page fault at address 0x0\n");
        assert!(judge(Some(EXIT_PASS), &parse_log(&log), &["a", "b"])
            .unwrap_err()
            .contains("crashed"));
        assert!(judge(None, &parse_log(GOOD), &["a", "b"])
            .unwrap_err()
            .contains("exit status None"));
    }

    #[test]
    fn a_lying_summary_or_plan_fails() {
        let log = GOOD
            .replace("passed=2", "passed=3")
            .replace("PLAN 2", "PLAN 5");
        let verdict = judge(Some(EXIT_PASS), &parse_log(&log), &["a", "b"]).unwrap_err();
        assert!(
            verdict.contains("summary") && verdict.contains("plan"),
            "{verdict}"
        );
    }
}
