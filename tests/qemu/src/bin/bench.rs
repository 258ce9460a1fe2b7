//! `make bench` (issue 8): the same cost benchmark on both kernels, in one
//! command on one machine, every run a TD under the emulator or a plain
//! boot with 2 vCPUs:
//! - Linux: Debian's kernel with the coco_race module (its own
//!   set_memory_decrypted/encrypted);
//! - ours, the production build, as a TD;
//! - ours, the negative-control build, the seven steps and the legacy order
//!   interleaved round by round in one boot, as a TD and plain.
//!
//! Prints every `BENCH` line (counts per call from the emulator in a TD),
//! writes them to target/bench/bench.txt, renders the table into README.md
//! between its bench-table markers, and says how the engine meets issue 8's
//! goals. TCG cycles are host time: only the ratios mean anything.
//!
//! Usage: `bench [--rounds N] [--no-readme]` (default 20 rounds, the
//! module's default).

use qemu_harness::bench::{render_table, run_linux, run_ours, with_table, Bench, Series};
use qemu_harness::{guest_elf, guest_legacy_elf, workspace_root};
use std::process::ExitCode;

const SIZES: [u64; 4] = [1, 16, 64, 512];

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("an unknown CPU", |(_, m)| m.trim())
        .to_string();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let qemu = std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|v| v.lines().next().map(str::to_string))
        .unwrap_or_else(|| "QEMU".into());
    format!("{model} ({cores} cores), {qemu}")
}

fn run(rounds: u32) -> Result<Vec<Bench>, String> {
    let mut all = Vec::new();
    let mut add = |what: &str, result: Result<(qemu_harness::Run, Vec<Bench>), String>| {
        let (run, benches) = result?;
        eprintln!(
            "bench: {what}: {} lines in {:.1} s",
            benches.len(),
            run.elapsed.as_secs_f64()
        );
        for b in &benches {
            println!("{}", b.line());
        }
        all.extend(benches);
        Ok::<(), String>(())
    };
    add("Linux as a TD", run_linux(rounds))?;
    add(
        "ours as a TD",
        run_ours(guest_elf()?, true, 2, rounds, &SIZES, &["seven-steps"]),
    )?;
    let both = ["seven-steps", "legacy"];
    add(
        "ours as a TD, both orders",
        run_ours(guest_legacy_elf()?, true, 2, rounds, &SIZES, &both),
    )?;
    add(
        "ours plain, both orders",
        run_ours(guest_legacy_elf()?, false, 2, rounds, &SIZES, &both),
    )?;
    Ok(all)
}

/// Issue 8's goals, each with what this run measured.
fn goals(all: &[Bench]) -> Vec<(bool, String)> {
    let mut out = Vec::new();
    for pages in SIZES {
        for dir in ["to-shared", "to-private"] {
            if let (Some(ours), Some(linux)) = (
                Series::OURS_TD.find(all, pages, dir),
                Series::LINUX.find(all, pages, dir),
            ) {
                let r = ours.cycles as f64 / linux.cycles as f64;
                out.push((
                    r <= 1.0,
                    format!("{pages} pages {dir}: ours/Linux {r:.2} (want <= 1)"),
                ));
            }
        }
    }
    for dir in ["to-shared", "to-private"] {
        if let (Some(seven), Some(legacy)) = (
            Series::TD_SEVEN_STEPS.find(all, 64, dir),
            Series::TD_LEGACY.find(all, 64, dir),
        ) {
            let r = seven.cycles as f64 / legacy.cycles as f64;
            out.push((
                r <= 1.05,
                format!("64 pages {dir}, TD: seven steps/legacy {r:.2} (want <= 1.05)"),
            ));
        }
    }
    let ours_one = all
        .iter()
        .filter(|b| !b.kernel.starts_with("linux"))
        .all(|b| b.shootdowns == 1.0);
    out.push((
        ours_one,
        "ours: exactly one shootdown per call, both directions".into(),
    ));
    out
}

fn main() -> ExitCode {
    let mut rounds = 20u32;
    let mut readme = true;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--rounds" => match args.next().and_then(|n| n.parse().ok()) {
                Some(n) if (1..=1000).contains(&n) => rounds = n,
                _ => {
                    eprintln!("bench: error: --rounds wants 1..=1000");
                    return ExitCode::FAILURE;
                }
            },
            "--no-readme" => readme = false,
            other => {
                eprintln!("bench: error: unexpected argument {other:?}\nusage: bench [--rounds N] [--no-readme]");
                return ExitCode::FAILURE;
            }
        }
    }
    let all = match run(rounds) {
        Ok(all) => all,
        Err(e) => {
            eprintln!("bench: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let out_dir = workspace_root().join("target/bench");
    let lines: String = all.iter().map(|b| b.line() + "\n").collect();
    if let Err(e) = std::fs::create_dir_all(&out_dir)
        .and_then(|()| std::fs::write(out_dir.join("bench.txt"), &lines))
    {
        eprintln!("bench: error: writing {}: {e}", out_dir.display());
        return ExitCode::FAILURE;
    }
    let table = render_table(&all, &machine());
    println!("\n{table}");
    if readme {
        let path = workspace_root().join("README.md");
        let updated = std::fs::read_to_string(&path)
            .map_err(|e| e.to_string())
            .and_then(|text| with_table(&text, &table));
        match updated.and_then(|text| std::fs::write(&path, text).map_err(|e| e.to_string())) {
            Ok(()) => eprintln!("bench: wrote the table into {}", path.display()),
            Err(e) => {
                eprintln!("bench: error: README.md: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let goals = goals(&all);
    for (met, what) in &goals {
        println!("GOAL {} {what}", if *met { "met" } else { "MISSED" });
    }
    println!(
        "bench: {} of {} goals met in this run",
        goals.iter().filter(|(m, _)| *m).count(),
        goals.len()
    );
    ExitCode::SUCCESS
}
