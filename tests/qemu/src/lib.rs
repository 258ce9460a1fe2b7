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

pub mod bench;
pub mod cli;
pub mod initramfs;
pub mod linux;
pub mod module;
pub mod screen;

/// How QEMU runs a program: the guest alone, the guest as a TD under the
/// TDX-module emulator, or any kernel file either way.
#[derive(Clone, Debug)]
pub enum Machine {
    /// `-kernel guest`.
    Plain { guest: PathBuf },
    /// `-kernel emulator -initrd guest`, on a CPU with SVM and nested paging;
    /// the TD memory is the `memory=` option or the emulator's default.
    Td {
        emulator: PathBuf,
        guest: PathBuf,
        options: String,
    },
    /// Any kernel file QEMU itself loads (our guest's PVH ELF, a Linux
    /// bzImage), with an optional initrd: the plain-QEMU controls.
    PlainKernel {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
    },
    /// Any kernel file as a TD (see [`TdKernel`]).
    TdKernel(TdKernel),
    /// The same, with multi-threaded TCG: for a Linux run that needs its
    /// vCPUs to really run in parallel (the conversion race of
    /// tests/qemu/tests/linux_race.rs), at the risk described at
    /// [`qemu_command`].
    TdKernelParallel(TdKernel),
}

/// A kernel file booted as a TD under the TDX-module emulator.
#[derive(Clone, Debug)]
pub struct TdKernel {
    pub emulator: PathBuf,
    /// Our guest's ELF or a Linux bzImage: QEMU's `-initrd`, which the
    /// emulator (QEMU's `-kernel`) loads into the TD.
    pub kernel: PathBuf,
    /// The kernel's initramfs, handed to the emulator through fw_cfg as
    /// [`INITRAMFS_FW_CFG`] (QEMU's `-initrd` already carries the kernel).
    pub initramfs: Option<PathBuf>,
    /// TD memory in MiB, written as the emulator option `memory=`. `None`:
    /// whatever `memory=` word `options` has, else the emulator's default.
    /// Set this or a `memory=` option, not both.
    pub memory_mib: Option<u32>,
    /// Emulator option words (`strict`, `wrong-state=ve`, ...).
    pub options: String,
}

/// The fw_cfg file through which the emulator receives an initramfs.
pub const INITRAMFS_FW_CFG: &str = "opt/tdx-emulator/initrd";
/// The emulator's TD memory when no `memory=` option is given, in MiB.
pub const DEFAULT_TD_MEMORY_MIB: u32 = 1024;
/// The `memory=` values the emulator accepts, in MiB.
pub const TD_MEMORY_MIB: std::ops::RangeInclusive<u32> = 256..=1536;
/// QEMU's RAM beyond the TD's: the emulator's own memory (its interface
/// asks for `-m <TD MiB + 1024>M`).
pub const EMULATOR_OWN_MEMORY_MIB: u32 = 1024;
/// The most vCPUs the emulator runs (it refuses more with
/// [`EXIT_BAD_INPUT`]).
pub const MAX_TD_VCPUS: u32 = 16;

impl TdKernel {
    /// The emulator options as passed, with `memory=` first if set here.
    pub fn emulator_options(&self) -> String {
        let memory = self.memory_mib.map(|mib| format!("memory={mib}"));
        memory
            .iter()
            .map(String::as_str)
            .chain(self.options.split_whitespace())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The TD memory the emulator will use, in MiB, as far as the harness
    /// can tell: the last `memory=` word (the one a last-wins parser takes),
    /// else the default. An unparsable value counts as the default here; the
    /// emulator refuses it itself.
    pub fn td_memory_mib(&self) -> u32 {
        self.emulator_options()
            .split_whitespace()
            .filter_map(|w| w.strip_prefix("memory="))
            .next_back()
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_TD_MEMORY_MIB)
    }

    /// QEMU's `-m` in MiB. Clamped to the range the emulator accepts, so an
    /// out-of-range `memory=` reaches the emulator (which must refuse it
    /// with a one-line error) instead of making QEMU fail to allocate RAM.
    pub fn qemu_memory_mib(&self) -> u32 {
        let td = self
            .td_memory_mib()
            .clamp(*TD_MEMORY_MIB.start(), *TD_MEMORY_MIB.end());
        td + EMULATOR_OWN_MEMORY_MIB
    }
}

impl Machine {
    /// Whether this machine runs under the TDX-module emulator.
    pub fn is_td(&self) -> bool {
        matches!(
            self,
            Machine::Td { .. } | Machine::TdKernel(_) | Machine::TdKernelParallel(_)
        )
    }
}

/// QEMU's exit status when the guest reports success.
pub const EXIT_PASS: i32 = 33;
/// QEMU's exit status when the guest reports failure, or the emulator hit a
/// fatal TD error or a TD shutdown.
pub const EXIT_FAIL: i32 = 35;
/// The emulator refused its input (kernel file, initramfs, vCPU count,
/// option) after printing one line `emulator: error: <what>: <reason>`.
/// This and the two below are `bare::exit::qemu_status(bare::exit::EXIT_*)`
/// (bare/src/exit.rs, built only for the bare-metal target, hence copied;
/// a unit test reads that file and checks them).
pub const EXIT_BAD_INPUT: i32 = 37;
/// The TD powered itself off (ACPI S5).
pub const EXIT_TD_POWER_OFF: i32 = 65;
/// The TD asked for a reset.
pub const EXIT_TD_RESET: i32 = 67;

/// The prefix of the one line the emulator prints when it refuses input.
pub const EMULATOR_ERROR_PREFIX: &str = "emulator: error:";

/// What a QEMU exit status means in these runs.
pub fn describe_exit(code: Option<i32>) -> String {
    match code {
        None => "killed at the timeout".into(),
        Some(0) => "QEMU exited normally (plain QEMU: the guest powered off)".into(),
        Some(EXIT_PASS) => "the guest reported success".into(),
        Some(EXIT_FAIL) => {
            "failure (the guest failed, or the emulator hit a fatal TD error)".into()
        }
        Some(EXIT_BAD_INPUT) => "the emulator refused its input".into(),
        Some(EXIT_TD_POWER_OFF) => "the TD powered off".into(),
        Some(EXIT_TD_RESET) => "the TD reset".into(),
        Some(other) => format!("QEMU exit status {other}"),
    }
}

/// Whether the `CONCURRENT` counters of a run with `cpus` CPUs show every
/// CPU converting at once and `stop_conversions()` raced against them, as
/// guest/src/kernel/concurrent.rs promises; `Err` says what is wrong.
pub fn check_concurrent(report: &Report, cpus: u32) -> Result<(), String> {
    let c = |key: &str| report.concurrent.get(key).copied();
    if cpus < 2 {
        return match c("skipped") {
            Some(1) => Ok(()),
            _ => Err(format!(
                "one CPU: want skipped=1, got {:?}",
                report.concurrent
            )),
        };
    }
    let participants = u64::from(cpus).min(8);
    let checks = [
        ("cpus", c("cpus") == Some(participants)),
        ("all CPUs done", c("all_done") == Some(1)),
        (
            "conversions >= 2 per CPU",
            c("conversions").is_some_and(|n| n >= 2 * participants),
        ),
        (
            "each CPU refused once after the stop",
            c("stopped") == Some(participants),
        ),
        ("no error", c("errors") == Some(0)),
        ("no conversion after the stop", c("after_stop") == Some(0)),
        ("nothing left non-present", c("not_present") == Some(0)),
        (
            "every page as its owner left it",
            c("wrong_state_pages") == Some(0),
        ),
        ("wrong bytes == 0", c("wrong_bytes") == Some(0)),
        (
            "loads checked exactly > 0",
            c("stable_loads").is_some_and(|n| n > 0),
        ),
        (
            "fixups > 0 (the windows were hit)",
            c("fixups").is_some_and(|n| n > 0),
        ),
    ];
    match checks.iter().find(|(_, ok)| !ok) {
        None => Ok(()),
        Some((what, _)) => Err(format!(
            "concurrent conversions: {what}; counters {:?}",
            report.concurrent
        )),
    }
}

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
    "ud2_reaches_the_guest",
    "conversion_started_on_an_ap_completes",
];

/// The workspace root (two levels above this crate), without `..` where
/// the path exists, so the paths printed are readable.
pub fn workspace_root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    root.canonicalize().unwrap_or(root)
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

/// Where `scripts/fetch-linux-td.sh` puts its files by default.
pub fn linux_td_cache() -> PathBuf {
    workspace_root().join("target/linux-td")
}

/// Debian's kernel for the Linux-TD test: `$LINUX_TD_KERNEL`, else
/// `target/linux-td/kernel`.
pub fn linux_td_kernel() -> PathBuf {
    env_or_cache("LINUX_TD_KERNEL", "kernel")
}

/// Debian's static busybox for the initramfs: `$LINUX_TD_BUSYBOX`, else
/// `target/linux-td/busybox`.
pub fn linux_td_busybox() -> PathBuf {
    env_or_cache("LINUX_TD_BUSYBOX", "busybox")
}

/// Where the kernel and busybox came from (packages, versions, apt
/// origins): `$LINUX_TD_SOURCE`, else `target/linux-td/SOURCE`.
pub fn linux_td_source() -> PathBuf {
    env_or_cache("LINUX_TD_SOURCE", "SOURCE")
}

/// The initramfs's `/init` script (committed, unlike the archive).
pub fn linux_td_init_script() -> PathBuf {
    workspace_root().join("linux-td/init")
}

/// Where the harness writes the initramfs it builds.
pub fn linux_td_initramfs() -> PathBuf {
    linux_td_cache().join("initramfs.cpio")
}

fn env_or_cache(variable: &str, file: &str) -> PathBuf {
    match std::env::var_os(variable) {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => linux_td_cache().join(file),
    }
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
/// really run in parallel, except for a Linux kernel booted directly: Linux
/// patches its own code on one CPU while others run it (text_poke_bp's int3
/// protocol), and multi-threaded TCG can run a stale translation of the
/// patched code after the patch is done, an "Oops: int3" that has nothing to
/// do with what the run checks (seen once in about eight plain boots). The
/// same holds for a kernel file booted as a TD (`Machine::TdKernel`), which
/// also boots faster that way on 2 cores (Linux: 23 s against 42 s); our
/// guest's TD runs keep real parallelism, which its stress needs.
pub fn qemu_command(machine: &Machine, cpus: u32, append: Option<&str>) -> Command {
    let mut command = Command::new("qemu-system-x86_64");
    let accel = match machine {
        Machine::PlainKernel { .. } | Machine::TdKernel(_) => "tcg,thread=single",
        _ => "tcg,thread=multi",
    };
    command
        .args(["-accel", accel, "-machine", "q35"])
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
            plain_kernel(&mut command, guest, None, append);
        }
        Machine::PlainKernel { kernel, initrd } => {
            plain_kernel(&mut command, kernel, initrd.as_deref(), append);
        }
        Machine::Td {
            emulator,
            guest,
            options,
        } => {
            let td = TdKernel {
                emulator: emulator.clone(),
                kernel: guest.clone(),
                initramfs: None,
                memory_mib: None,
                options: options.clone(),
            };
            td_kernel(&mut command, &td, append);
        }
        Machine::TdKernel(td) | Machine::TdKernelParallel(td) => {
            td_kernel(&mut command, td, append)
        }
    }
    command
}

fn plain_kernel(command: &mut Command, kernel: &Path, initrd: Option<&Path>, append: Option<&str>) {
    // 256M suits our guest; Linux with a small initramfs boots in it too.
    command
        .args(["-cpu", "qemu64", "-m", "256M"])
        .arg("-kernel")
        .arg(kernel);
    if let Some(initrd) = initrd {
        command.arg("-initrd").arg(initrd);
    }
    if let Some(append) = append {
        command.args(["-append", append]);
    }
}

fn td_kernel(command: &mut Command, td: &TdKernel, append: Option<&str>) {
    // The emulator takes its options, then `--`, then the kernel's command
    // line, all of it (the emulator splits at the first `--`).
    let line = format!("{} -- {}", td.emulator_options(), append.unwrap_or(""));
    command
        .args(["-cpu", "qemu64,+svm,+npt,+rdrand,phys-bits=48"])
        .args(["-m", &format!("{}M", td.qemu_memory_mib())])
        .arg("-kernel")
        .arg(&td.emulator)
        .arg("-initrd")
        .arg(&td.kernel);
    if let Some(initramfs) = &td.initramfs {
        let mut spec = std::ffi::OsString::from(format!("name={INITRAMFS_FW_CFG},file="));
        spec.push(escape_qemu_option_value(initramfs.as_os_str()));
        command.arg("-fw_cfg").arg(spec);
    }
    command.args(["-append", line.trim()]);
}

/// A value inside a QEMU `key=value,...` option: QEMU splits at commas and
/// reads `,,` as one literal comma.
fn escape_qemu_option_value(value: &std::ffi::OsStr) -> std::ffi::OsString {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let mut out = Vec::with_capacity(value.len());
    for &byte in value.as_bytes() {
        out.push(byte);
        if byte == b',' {
            out.push(b',');
        }
    }
    std::ffi::OsString::from_vec(out)
}

/// `command` as a line a POSIX shell runs unchanged, for logs and docs.
pub fn command_line(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|word| shell_quote(&word.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ")
}

fn shell_quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-+=/.,:@%".contains(&b));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

/// `text` without terminal control: escape sequences (SeaBIOS clears the
/// screen and sets modes on the serial console: ESC c, ESC [ ... final
/// byte, ESC ] ... BEL) and control characters but newline and tab (CR
/// among them) are dropped, so a log prints as plain text.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => match chars.next() {
                // CSI: parameters and intermediates, then a final byte in @..~.
                Some('[') => {
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
                // OSC: up to BEL or ESC \.
                Some(']') => {
                    while let Some(c) = chars.next() {
                        if c == '\x07' {
                            break;
                        }
                        if c == '\x1b' {
                            chars.next_if_eq(&'\\');
                            break;
                        }
                    }
                }
                // A two-character sequence (ESC c, ESC 7, ...).
                _ => {}
            },
            '\n' | '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
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
    let mut log = printable(&String::from_utf8_lossy(&bytes));
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
    /// `CONCURRENT` counters (every CPU converting at once).
    pub concurrent: BTreeMap<String, u64>,
    /// The TDX-module emulator's `TDXEMU` counters (TD runs only).
    pub tdx: BTreeMap<String, u64>,
    /// Its `SNPEMU` counters (SEV-SNP runs only).
    pub snp: BTreeMap<String, u64>,
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
        } else if let Some(rest) = line.strip_prefix("CONCURRENT ") {
            parse_counters(rest, &mut report.concurrent);
        } else if let Some(at) = line.find("TDXEMU ") {
            // Anywhere in the line: when a crash report from one vCPU and
            // the emulator's exit line from another reach the serial port
            // at once, the counters can start mid-line ("#VETDXEMU ...").
            // Snapshots a TD asked for mid-run (`TDXEMU snapshot=<tag> ...`)
            // are not the run's totals.
            // Nor are its page-state probes (`TDXEMU page=<gpa> ...`).
            let rest = &line[at + "TDXEMU ".len()..];
            if !rest.starts_with("snapshot=") && !rest.starts_with("page=") {
                parse_counters(rest, &mut report.tdx);
            }
        } else if let Some(at) = line.find("SNPEMU ") {
            // As TDXEMU: anywhere in the line, not the snapshots or probes.
            let rest = &line[at + "SNPEMU ".len()..];
            if !rest.starts_with("snapshot=") && !rest.starts_with("page=") {
                parse_counters(rest, &mut report.snp);
            }
        } else if let Some(rest) = line.strip_prefix("SUMMARY ") {
            let field = |key: &str| {
                rest.split_whitespace()
                    .find_map(|p| p.strip_prefix(key))
                    .and_then(|v| v.parse().ok())
            };
            if let (Some(passed), Some(failed)) = (field("passed="), field("failed=")) {
                report.summary = Some((passed, failed));
            }
        }
        // Not part of the chain above: a crash line that the emulator's
        // counters ran into is still a crash.
        if (line.starts_with("FATAL:") || line.starts_with("PANIC:")) && report.crash.is_none() {
            report.crash = Some(line.to_string());
        }
    }
    report
}

/// `key=value` words with a number as value, into `into`.
pub(crate) fn parse_counters(text: &str, into: &mut BTreeMap<String, u64>) {
    for pair in text.split_whitespace() {
        if let Some((key, value)) = pair.split_once('=') {
            if let Ok(value) = value.parse() {
                into.insert(key.to_string(), value);
            }
        }
    }
}

/// The lines of `log` in which the emulator refused its input.
pub fn emulator_errors(log: &str) -> Vec<&str> {
    log.lines()
        .map(str::trim)
        .filter(|l| l.starts_with(EMULATOR_ERROR_PREFIX))
        .collect()
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
    #[test]
    fn printable_drops_terminal_control_and_keeps_text() {
        let seabios = "\x1bc\x1b[?7l\x1b[2J\x1b[0mSeaBIOS (version 1.16.2)\r\nBooting\x07 from ROM..\x1b]0;title\x07ok\tdone\n";
        assert_eq!(
            super::printable(seabios),
            "SeaBIOS (version 1.16.2)\nBooting from ROM..ok\tdone\n"
        );
        assert_eq!(
            super::printable("TDXEMU a=1 \u{e9}\n"),
            "TDXEMU a=1 \u{e9}\n"
        );
        // A sequence cut off at the end of the log ends the text there.
        assert_eq!(super::printable("x\x1b[12"), "x");
    }

    use super::*;

    const GOOD: &str = "guest: booted\nPLAN 2\nTEST a ok\nTEST b ok\nSTRESS cpus=2 conversions=10000 fixups=5\nSUMMARY passed=2 failed=0\nTDXEMU ve_ept_violation=0 map_gpa_calls=7\n";

    /// Two vCPUs' output interleaved on the serial port: the counters
    /// still parse, and the crash is still the crash (a legacy-order TD run
    /// once failed its check because "#VETDXEMU ..." was not read).
    #[test]
    fn counters_and_crash_survive_interleaved_lines() {
        let log = "FATAL: kernel EPT-violatiemulator: TD shutdown: private-GPA access\n\
                   #VETDXEMU ve_ept_violation=2 wrong_state=4 ipis=81\n";
        let report = parse_log(log);
        assert_eq!(report.tdx.get("wrong_state"), Some(&4));
        assert_eq!(report.tdx.get("ve_ept_violation"), Some(&2));
        assert!(report
            .crash
            .is_some_and(|c| c.starts_with("FATAL: kernel EPT")));
        let snapshot = parse_log("xTDXEMU snapshot=7 wrong_state=9\n");
        assert!(
            snapshot.tdx.is_empty(),
            "a snapshot is not the run's totals"
        );
    }

    #[test]
    fn counter_snapshots_are_not_the_totals() {
        let log = "TDXEMU snapshot=1 map_gpa_calls=3\nTDXEMU map_gpa_calls=7\n";
        let report = parse_log(log);
        assert_eq!(report.tdx.get("map_gpa_calls"), Some(&7));
        assert_eq!(report.tdx.get("snapshot"), None);
    }

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

    fn args(command: &Command) -> Vec<String> {
        command
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    fn value_of<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    fn linux_td(initramfs: Option<&str>, memory_mib: Option<u32>, options: &str) -> Machine {
        Machine::TdKernel(TdKernel {
            emulator: "emu".into(),
            kernel: "bzImage".into(),
            initramfs: initramfs.map(PathBuf::from),
            memory_mib,
            options: options.into(),
        })
    }

    #[test]
    fn a_td_gets_the_emulator_s_qemu_line() {
        let machine = linux_td(Some("/cache/initramfs.cpio"), None, "");
        let a = args(&qemu_command(&machine, 4, Some("console=ttyS0 quiet")));
        assert_eq!(value_of(&a, "-kernel"), ["emu"]);
        assert_eq!(value_of(&a, "-initrd"), ["bzImage"]);
        assert_eq!(value_of(&a, "-smp"), ["4"]);
        assert_eq!(
            value_of(&a, "-cpu"),
            ["qemu64,+svm,+npt,+rdrand,phys-bits=48"]
        );
        // Default TD memory (1024) plus the emulator's own 1024.
        assert_eq!(value_of(&a, "-m"), ["2048M"]);
        assert_eq!(
            value_of(&a, "-fw_cfg"),
            ["name=opt/tdx-emulator/initrd,file=/cache/initramfs.cpio"]
        );
        // Every word of the kernel's command line, after the separator.
        assert_eq!(value_of(&a, "-append"), ["-- console=ttyS0 quiet"]);
    }

    #[test]
    fn td_memory_comes_from_the_field_or_the_option() {
        let a = args(&qemu_command(&linux_td(None, Some(256), "strict"), 1, None));
        assert_eq!(value_of(&a, "-m"), ["1280M"]);
        assert_eq!(value_of(&a, "-append"), ["memory=256 strict --"]);
        assert!(value_of(&a, "-fw_cfg").is_empty());
        let a = args(&qemu_command(
            &linux_td(None, None, "memory=1536"),
            1,
            Some("x"),
        ));
        assert_eq!(value_of(&a, "-m"), ["2560M"]);
        assert_eq!(value_of(&a, "-append"), ["memory=1536 -- x"]);
        // Out of range or unparsable: the emulator must refuse it, so QEMU
        // still gets a size it can allocate.
        for (option, m) in [
            ("memory=99999", "2560M"),
            ("memory=1", "1280M"),
            ("memory=x", "2048M"),
        ] {
            let a = args(&qemu_command(&linux_td(None, None, option), 1, None));
            assert_eq!(value_of(&a, "-m"), [m], "{option}");
        }
        // The existing TD variant: our guest, same line.
        let td = Machine::Td {
            emulator: "emu".into(),
            guest: "guest".into(),
            options: "strict".into(),
        };
        let a = args(&qemu_command(&td, 2, Some("stress-rounds=3 order=legacy")));
        assert_eq!(value_of(&a, "-initrd"), ["guest"]);
        assert_eq!(value_of(&a, "-m"), ["2048M"]);
        assert_eq!(
            value_of(&a, "-append"),
            ["strict -- stress-rounds=3 order=legacy"]
        );
    }

    #[test]
    fn a_comma_in_the_initramfs_path_is_escaped_for_qemu() {
        let a = args(&qemu_command(&linux_td(Some("/a,b/fs"), None, ""), 1, None));
        assert_eq!(
            value_of(&a, "-fw_cfg"),
            ["name=opt/tdx-emulator/initrd,file=/a,,b/fs"]
        );
    }

    #[test]
    fn plain_kernels_take_an_initrd() {
        let machine = Machine::PlainKernel {
            kernel: "bzImage".into(),
            initrd: Some("fs.cpio".into()),
        };
        let a = args(&qemu_command(&machine, 2, Some("console=ttyS0")));
        assert_eq!(value_of(&a, "-kernel"), ["bzImage"]);
        assert_eq!(value_of(&a, "-initrd"), ["fs.cpio"]);
        assert_eq!(value_of(&a, "-append"), ["console=ttyS0"]);
        assert_eq!(value_of(&a, "-accel"), ["tcg,thread=single"]);
        assert!(!machine.is_td());
        assert!(linux_td(None, None, "").is_td());
    }

    #[test]
    fn the_printed_command_line_is_shell_safe() {
        let mut command = Command::new("qemu-system-x86_64");
        command.args([
            "-m",
            "2048M",
            "-append",
            "strict -- console=ttyS0",
            "it's",
            "",
        ]);
        assert_eq!(
            command_line(&command),
            "qemu-system-x86_64 -m 2048M -append 'strict -- console=ttyS0' 'it'\\''s' ''"
        );
    }

    /// The exit statuses copied here are the ones bare/src/exit.rs defines
    /// (that module builds only for the bare-metal target, so it is read).
    #[test]
    fn exit_statuses_match_bare_exit() {
        let path = workspace_root().join("bare/src/exit.rs");
        let text = std::fs::read_to_string(&path).unwrap();
        let value = |name: &str| -> i32 {
            let line = text
                .lines()
                .find(|l| l.contains(&format!("pub const {name}: u32 =")))
                .unwrap_or_else(|| panic!("{}: no {name}", path.display()));
            let number = line.split('=').nth(1).unwrap().trim().trim_end_matches(';');
            let code = match number.strip_prefix("0x") {
                Some(hex) => u32::from_str_radix(hex, 16),
                None => number.parse(),
            }
            .unwrap_or_else(|e| panic!("{name} = {number}: {e}"));
            ((code << 1) | 1) as i32 // bare::exit::qemu_status
        };
        assert_eq!(value("EXIT_SUCCESS"), EXIT_PASS);
        assert_eq!(value("EXIT_FAILURE"), EXIT_FAIL);
        assert_eq!(value("EXIT_BAD_INPUT"), EXIT_BAD_INPUT);
        assert_eq!(value("EXIT_TD_POWER_OFF"), EXIT_TD_POWER_OFF);
        assert_eq!(value("EXIT_TD_RESET"), EXIT_TD_RESET);
    }

    #[test]
    fn emulator_errors_are_found_in_a_log() {
        let log =
            "emulator: starting\nemulator: error: kernel: not an ELF or a bzImage\nTDXEMU a=1\n";
        assert_eq!(
            emulator_errors(log),
            ["emulator: error: kernel: not an ELF or a bzImage"]
        );
        assert!(emulator_errors("emulator: errors: none\n").is_empty());
    }
}
