//! Linux as a TD: Debian's stock 6.12 cloud kernel (CONFIG_INTEL_TDX_GUEST=y,
//! fetched by scripts/fetch-linux-td.sh, never committed) boots under the
//! TDX-module emulator with `console=ttyS0` and nothing else, brings up every
//! vCPU, runs our initramfs's /init (linux-td/init) and powers the TD off.
//! Linux's TDX code was written against real TDX modules, so this is the
//! check of the emulator that does not come from our own notes.
//!
//! Also: the same kernel under a VMM that answers MapGPA one page per call;
//! plain QEMU booting the same files (the control: if it fails, the fault is
//! in the kernel or initramfs, not the emulator); and the emulator refusing
//! bad input with one line and status 37, never a hang.
//!
//! Without the fetched files these tests skip loudly, unless `CI` is set
//! (or a `LINUX_TD_*` variable names a missing file): then they fail.

use qemu_harness::linux::{ci, initramfs_once, judge_linux, require_files, Expect, LinuxBoot};
use qemu_harness::{
    command_line, emulator_elf, emulator_errors, guest_elf, initramfs, linux_td_busybox,
    linux_td_init_script, linux_td_initramfs, linux_td_kernel, linux_td_source, parse_log,
    qemu_command, run_guest, workspace_root, Machine, Report, Run, TdKernel, EXIT_BAD_INPUT,
    EXIT_TD_POWER_OFF, MAX_TD_VCPUS,
};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Linux under nested paging under TCG: generous, so only a hang reaches it.
const TIMEOUT: Duration = Duration::from_secs(600);
/// The emulator refuses bad input before the TD runs: seconds, not minutes.
const BAD_INPUT_TIMEOUT: Duration = Duration::from_secs(60);
/// All the kernel gets: nothing that works around the emulator.
const CMDLINE: &str = "console=ttyS0";

/// One QEMU at a time, as in td.rs: parallel boots would share the host's
/// cores and make every run's time unpredictable.
static ONE_QEMU_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_qemu_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_QEMU_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The fetched Debian files and the initramfs built from them.
struct Debian {
    kernel: PathBuf,
    initramfs: PathBuf,
    /// scripts/fetch-linux-td.sh's SOURCE, as key=value lines.
    source: String,
}

impl Debian {
    fn source_value(&self, key: &str) -> &str {
        self.source
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .unwrap_or("(not recorded)")
    }

    /// Where the kernel came from, for the test output.
    fn origin(&self) -> String {
        format!(
            "{} {} from [{}], CONFIG_INTEL_TDX_GUEST={}, sha256 {}",
            self.source_value("kernel_package"),
            self.source_value("kernel_version"),
            self.source_value("kernel_origin"),
            self.source_value("kernel_config_intel_tdx_guest"),
            self.source_value("kernel_sha256"),
        )
    }
}

/// Whether a missing kernel fails the test instead of skipping it.
fn must_have_kernel() -> bool {
    let configured = ["LINUX_TD_KERNEL", "LINUX_TD_BUSYBOX", "LINUX_TD_SOURCE"]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|p| !p.is_empty()));
    ci() || configured
}

/// The Debian files, or `None` (after a loud message) when they were never
/// fetched on a developer's machine. Builds the initramfs once per run.
fn debian(test: &str) -> Option<Debian> {
    let (kernel, busybox, source) = (linux_td_kernel(), linux_td_busybox(), linux_td_source());
    let why = |missing: &str| {
        format!(
            "Debian kernel files missing: {missing}. Run scripts/fetch-linux-td.sh (make linux-td does)"
        )
    };
    let note = "a failure: CI is set or LINUX_TD_* names these files";
    if !require_files(
        test,
        &[&kernel, &busybox, &source],
        why,
        must_have_kernel(),
        note,
    ) {
        return None;
    }
    static INITRAMFS: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let initramfs = initramfs_once(&INITRAMFS, linux_td_initramfs(), "the initramfs", |out| {
        initramfs::build_linux_td_initramfs(&linux_td_init_script(), &busybox, out)
    });
    let source =
        std::fs::read_to_string(&source).unwrap_or_else(|e| panic!("{}: {e}", source.display()));
    Some(Debian {
        kernel,
        initramfs,
        source,
    })
}

fn fail_with_log(run: &Run, why: &str) -> ! {
    panic!(
        "{why}\n----- serial log -----\n{}\n----- end of log -----",
        run.log
    )
}

/// Boots `machine`, printing the QEMU command line, how it ended and the
/// emulator's counters. Callers hold [`one_qemu_at_a_time`] for their whole
/// test, so its output (under --nocapture) is not interleaved with another's.
fn boot(machine: &Machine, cpus: u32, append: Option<&str>, timeout: Duration) -> (Run, Report) {
    println!(
        "  qemu: {}",
        command_line(&qemu_command(machine, cpus, append))
    );
    let run = run_guest(machine, cpus, append, timeout).unwrap_or_else(|e| panic!("{e}"));
    let report = parse_log(&run.log);
    println!(
        "  exit {:?} ({}) after {:.1?}",
        run.exit_code,
        qemu_harness::describe_exit(run.exit_code),
        run.elapsed
    );
    if !report.tdx.is_empty() {
        println!("  emulator counters: {:?}", report.tdx);
    }
    (run, report)
}

fn counter(report: &Report, key: &str) -> Option<u64> {
    report.tdx.get(key).copied()
}

/// Debian's kernel as a TD with default emulator options plus `options`,
/// judged by [`judge_linux`] and required to have made MapGPA calls (Linux
/// decrypts its swiotlb bounce buffers at boot).
fn linux_as_td(test: &str, cpus: u32, options: &str) -> Option<(Run, Report, LinuxBoot)> {
    let debian = debian(test)?;
    let _only_me = one_qemu_at_a_time();
    println!("{test}: {}", debian.origin());
    let machine = Machine::TdKernel(TdKernel {
        emulator: emulator_elf().unwrap_or_else(|e| panic!("{e}")),
        kernel: debian.kernel.clone(),
        initramfs: Some(debian.initramfs.clone()),
        memory_mib: None,
        options: options.to_string(),
    });
    let (run, report) = boot(&machine, cpus, Some(CMDLINE), TIMEOUT);
    let expect = Expect {
        cpus,
        td: true,
        exit: EXIT_TD_POWER_OFF,
    };
    let linux = judge_linux(run.exit_code, &run.log, &expect)
        .unwrap_or_else(|why| fail_with_log(&run, &why));
    match counter(&report, "map_gpa_calls") {
        Some(n) if n > 0 => {}
        other => fail_with_log(
            &run,
            &format!(
                "emulator counted map_gpa_calls={other:?}, want > 0 (Linux's swiotlb goes shared)"
            ),
        ),
    }
    for line in &linux.matched {
        println!("  matched: {line}");
    }
    for line in &linux.tdx_dmesg {
        println!("  dmesg:   {line}");
    }
    Some((run, report, linux))
}

#[test]
fn linux_boots_as_a_td_with_1_vcpu() {
    linux_as_td("linux_boots_as_a_td_with_1_vcpu", 1, "");
}

#[test]
fn linux_boots_as_a_td_with_4_vcpus() {
    linux_as_td("linux_boots_as_a_td_with_4_vcpus", 4, "");
}

/// A VMM that converts one page per MapGPA and answers RETRY for the rest:
/// Linux's MapGPA loop must resume from the GPA the VMM returns.
#[test]
fn linux_boots_as_a_td_when_mapgpa_retries_every_page() {
    let test = "linux_boots_as_a_td_when_mapgpa_retries_every_page";
    let Some((run, report, _)) = linux_as_td(test, 2, "mapgpa-retry-every-page") else {
        return;
    };
    match counter(&report, "map_gpa_retries") {
        Some(n) if n > 0 => {}
        other => fail_with_log(
            &run,
            &format!("emulator counted map_gpa_retries={other:?}, want > 0"),
        ),
    }
}

/// The control: the same kernel and initramfs under plain QEMU reach /init
/// with every CPU and power off, and Linux does not claim to be a TD. If
/// this fails, the TD tests' failures say nothing about the emulator.
#[test]
fn linux_boots_under_plain_qemu_as_the_control() {
    let test = "linux_boots_under_plain_qemu_as_the_control";
    let Some(debian) = debian(test) else { return };
    let _only_me = one_qemu_at_a_time();
    println!("{test}: {}", debian.origin());
    let machine = Machine::PlainKernel {
        kernel: debian.kernel.clone(),
        initrd: Some(debian.initramfs.clone()),
    };
    let (run, _) = boot(&machine, 4, Some(CMDLINE), TIMEOUT);
    // Plain QEMU quits with status 0 when the guest powers off through ACPI.
    let expect = Expect {
        cpus: 4,
        td: false,
        exit: 0,
    };
    let linux = judge_linux(run.exit_code, &run.log, &expect)
        .unwrap_or_else(|why| fail_with_log(&run, &why));
    for line in &linux.matched {
        println!("  matched: {line}");
    }
}

// ---- Bad input: status 37 and one `emulator: error:` line, quickly. ----

/// Files the bad-input tests write, removed when the test ends (one of
/// them is a 2 GiB sparse file).
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = workspace_root().join("target/linux-td/bad-input");
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        Scratch(dir.join(name))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs the emulator on bad input: QEMU must exit with [`EXIT_BAD_INPUT`]
/// within [`BAD_INPUT_TIMEOUT`] after exactly one error line that names
/// what was wrong (one of `names`, case-insensitive).
fn refused(what: &str, machine: &Machine, cpus: u32, names: &[&str]) {
    let _only_me = one_qemu_at_a_time();
    println!("{what}:");
    let started = Instant::now();
    let (run, _) = boot(machine, cpus, Some(CMDLINE), BAD_INPUT_TIMEOUT);
    if run.exit_code != Some(EXIT_BAD_INPUT) {
        fail_with_log(
            &run,
            &format!(
                "{what}: QEMU exit status {:?}, want {EXIT_BAD_INPUT} (the emulator refusing its input)",
                run.exit_code
            ),
        );
    }
    let errors = emulator_errors(&run.log);
    let [line] = errors.as_slice() else {
        fail_with_log(
            &run,
            &format!("{what}: want exactly one `emulator: error:` line, got {errors:?}"),
        );
    };
    let lower = line.to_lowercase();
    if !names.iter().any(|n| lower.contains(n)) {
        fail_with_log(
            &run,
            &format!("{what}: the error line names none of {names:?}: {line}"),
        );
    }
    println!("  refused in {:.1?}: {line}", started.elapsed());
}

fn td_with(kernel: &Path, initramfs: Option<&Path>, memory_mib: Option<u32>) -> Machine {
    Machine::TdKernel(TdKernel {
        emulator: emulator_elf().unwrap_or_else(|e| panic!("{e}")),
        kernel: kernel.to_path_buf(),
        initramfs: initramfs.map(Path::to_path_buf),
        memory_mib,
        options: String::new(),
    })
}

/// 64 KiB that is neither an ELF (no `\x7fELF`) nor a bzImage (no 0xAA55 at
/// 0x1fe, no `HdrS` at 0x202).
#[test]
fn a_kernel_that_is_neither_elf_nor_bzimage_is_refused() {
    let file = Scratch::new("not-a-kernel.bin");
    let pattern: Vec<u8> = b"not a kernel\n"
        .iter()
        .copied()
        .cycle()
        .take(64 << 10)
        .collect();
    std::fs::write(&file.0, pattern).unwrap();
    refused(
        "64 KiB of text as the kernel",
        &td_with(&file.0, None, None),
        1,
        &["kernel", "elf", "bzimage"],
    );
}

/// The first 4 KiB of Debian's bzImage: a valid setup header whose
/// setup_sects and syssize point far past the end of the file.
#[test]
fn a_truncated_bzimage_is_refused() {
    let Some(debian) = debian("a_truncated_bzimage_is_refused") else {
        return;
    };
    let file = Scratch::new("truncated-bzImage");
    let bytes = std::fs::read(&debian.kernel).unwrap();
    std::fs::write(&file.0, &bytes[..4096]).unwrap();
    refused(
        "Debian's bzImage cut to 4 KiB",
        &td_with(&file.0, None, None),
        1,
        &["kernel", "bzimage", "truncated"],
    );
}

/// A 2 GiB initramfs (sparse: no disk space) for a 256 MiB TD.
#[test]
fn an_initramfs_larger_than_td_memory_is_refused() {
    let Some(debian) = debian("an_initramfs_larger_than_td_memory_is_refused") else {
        return;
    };
    let file = Scratch::new("initramfs-2GiB.sparse");
    std::fs::File::create(&file.0)
        .and_then(|f| f.set_len(2 << 30))
        .unwrap_or_else(|e| panic!("{}: {e}", file.0.display()));
    refused(
        "a 2 GiB initramfs with memory=256",
        &td_with(&debian.kernel, Some(&file.0), Some(256)),
        1,
        &["initramfs", "initrd"],
    );
}

/// QEMU itself runs 17 vCPUs; the emulator must refuse them.
#[test]
fn more_vcpus_than_the_emulator_runs_are_refused_by_the_emulator() {
    let guest = guest_elf().unwrap_or_else(|e| panic!("{e}"));
    refused(
        &format!("-smp {}", MAX_TD_VCPUS + 1),
        &td_with(&guest, None, None),
        MAX_TD_VCPUS + 1,
        &["cpu"],
    );
}

// ---- run-guest, with a stand-in for QEMU that records its arguments. ----

/// A folder with a `qemu-system-x86_64` that writes its arguments, one a
/// line, to `args` and exits with `status`; run-guest finds it first on
/// PATH, so these tests start no QEMU and need no kernel.
struct FakeQemu {
    dir: PathBuf,
}

impl FakeQemu {
    fn new(name: &str, status: i32) -> Self {
        use std::os::unix::fs::PermissionsExt;
        let dir = workspace_root().join(format!("target/linux-td/fake-qemu-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("qemu-system-x86_64");
        let args = dir.join("args");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nprintf '%s\\n' \"$@\" > '{}'\nexit {status}\n",
                args.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        for file in ["emulator.elf", "kernel.bin", "initramfs.cpio"] {
            std::fs::write(dir.join(file), b"stand-in").unwrap();
        }
        FakeQemu { dir }
    }

    fn file(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// run-guest with `args`, QEMU replaced, and the ELFs named so nothing
    /// is built: (exit status, stderr, QEMU's arguments if it was started).
    fn run_guest(&self, args: &[&str]) -> (Option<i32>, String, Option<Vec<String>>) {
        let path = format!(
            "{}:{}",
            self.dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let output = Command::new(env!("CARGO_BIN_EXE_run-guest"))
            .args(args)
            .env("PATH", path)
            .env("EMULATOR_ELF", self.file("emulator.elf"))
            .env("GUEST_ELF", self.file("kernel.bin"))
            .output()
            .expect("running run-guest");
        let qemu_args = std::fs::read_to_string(self.dir.join("args"))
            .ok()
            .map(|a| a.lines().map(String::from).collect());
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
            qemu_args,
        )
    }
}

impl Drop for FakeQemu {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn after<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.windows(2)
        .find(|w| w[0] == flag)
        .map(|w| w[1].as_str())
}

#[test]
fn run_guest_refuses_too_many_vcpus_and_missing_files_before_starting_qemu() {
    let qemu = FakeQemu::new("refusals", EXIT_TD_POWER_OFF);
    let kernel = qemu.file("kernel.bin");
    let cases: [(Vec<&str>, &str); 3] = [
        (
            vec!["17", "--td", "--kernel", &kernel, "--", "console=ttyS0"],
            "run-guest: error: 17 vCPUs: the TDX-module emulator runs at most 16",
        ),
        (
            vec!["1", "--td", "--kernel", "/nonexistent/bzImage"],
            "run-guest: error: --kernel /nonexistent/bzImage: ",
        ),
        (
            vec![
                "1",
                "--td",
                "--kernel",
                &kernel,
                "--initrd",
                "/nonexistent/fs.cpio",
            ],
            "run-guest: error: --initrd /nonexistent/fs.cpio: ",
        ),
    ];
    for (args, want) in cases {
        let (status, stderr, started) = qemu.run_guest(&args);
        assert_ne!(status, Some(0), "{args:?}: {stderr}");
        let first = stderr.lines().next().unwrap_or("");
        assert!(first.starts_with(want), "{args:?}: {stderr}");
        assert_eq!(started, None, "{args:?} started QEMU: {stderr}");
        println!("{args:?}: {first}");
    }
}

#[test]
fn run_guest_passes_the_whole_command_line_and_the_initramfs() {
    let qemu = FakeQemu::new("line", EXIT_TD_POWER_OFF);
    let (kernel, initrd) = (qemu.file("kernel.bin"), qemu.file("initramfs.cpio"));
    let args = [
        "2",
        "--td",
        "memory=512",
        "wrong-state=ve",
        "--kernel",
        &kernel,
        "--initrd",
        &initrd,
        "--",
        "console=ttyS0",
        "quiet",
        "loglevel=7",
    ];
    let (status, stderr, started) = qemu.run_guest(&args);
    let qemu_args = started.unwrap_or_else(|| panic!("QEMU not started: {stderr}"));
    assert_eq!(
        after(&qemu_args, "-append"),
        Some("memory=512 wrong-state=ve -- console=ttyS0 quiet loglevel=7")
    );
    assert_eq!(
        after(&qemu_args, "-kernel"),
        Some(qemu.file("emulator.elf").as_str())
    );
    assert_eq!(after(&qemu_args, "-initrd"), Some(kernel.as_str()));
    let fw_cfg = format!("name=opt/tdx-emulator/initrd,file={initrd}");
    assert_eq!(after(&qemu_args, "-fw_cfg"), Some(fw_cfg.as_str()));
    assert_eq!(after(&qemu_args, "-m"), Some("1536M"));
    assert_eq!(after(&qemu_args, "-smp"), Some("2"));
    // The command line it ran is printed, and a TD's power-off is success.
    assert!(stderr.contains("qemu-system-x86_64 -accel"), "{stderr}");
    assert!(
        stderr.contains("'memory=512 wrong-state=ve -- console=ttyS0 quiet loglevel=7'"),
        "{stderr}"
    );
    assert_eq!(status, Some(0), "{stderr}");
    // Our guest without --kernel, as `make run-td` runs it.
    let (_, stderr, started) = qemu.run_guest(&["4", "--td", "strict", "--", "stress-rounds=300"]);
    let qemu_args = started.unwrap_or_else(|| panic!("QEMU not started: {stderr}"));
    assert_eq!(after(&qemu_args, "-initrd"), Some(kernel.as_str()));
    assert_eq!(
        after(&qemu_args, "-append"),
        Some("strict -- stress-rounds=300")
    );
    assert_eq!(after(&qemu_args, "-fw_cfg"), None);
}

#[test]
fn run_guest_reports_failure_statuses() {
    for (status, success) in [(EXIT_BAD_INPUT, false), (35, false), (33, true)] {
        let qemu = FakeQemu::new(&format!("status-{status}"), status);
        let (code, stderr, _) = qemu.run_guest(&["1", "--td", "--", "console=ttyS0"]);
        assert_eq!(code == Some(0), success, "QEMU status {status}: {stderr}");
        assert!(
            stderr.contains(&format!("QEMU exit status Some({status})")),
            "{stderr}"
        );
    }
}
