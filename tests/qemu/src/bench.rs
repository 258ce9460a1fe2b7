//! Issue 8's cost benchmark, both kernels measured the same way: the
//! `BENCH` lines that the guest (guest/src/kernel/bench.rs) and Linux's
//! module (linux-td/module/coco_race.c) print, and the emulator's counter
//! snapshots both write around every timed call (tag `1_000_000 + 10 *
//! pages + phase`: phase `2 * o + d` before a call of the o-th order in
//! direction d, 0 to shared and 1 to private; [`END_PHASE`] after a size's
//! last round). In a TD the counts per conversion (shootdowns, MapGPA
//! calls, ACCEPTs) come from the emulator for both kernels; on a plain
//! machine from the guest's own counters.

use crate::module::{fields_after, snapshot_sequence};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The tag phase written after a size's last round.
pub const END_PHASE: u64 = 9;

/// The snapshot tag before a call in `phase` (or after the last, [`END_PHASE`]).
pub const fn bench_tag(pages: u64, phase: u64) -> u64 {
    1_000_000 + 10 * pages + phase
}

/// Per phase: how many calls, and the emulator's counters summed over them.
pub type PhaseCounters = BTreeMap<u64, (u64, BTreeMap<String, u64>)>;

/// The emulator's counters summed over every call of each phase of the
/// `pages` benchmark, with the number of calls.
pub fn phase_counters(log: &str, pages: u64) -> Result<PhaseCounters, String> {
    let phase_of = |tag: u64| {
        (0..=END_PHASE)
            .find(|&phase| bench_tag(pages, phase) == tag)
            .ok_or(())
    };
    let sequence: Vec<(u64, BTreeMap<String, u64>)> = snapshot_sequence(log)
        .into_iter()
        .filter_map(|(tag, c)| phase_of(tag).ok().map(|phase| (phase, c)))
        .collect();
    match sequence.last() {
        Some((END_PHASE, _)) => {}
        _ => return Err(format!("{pages} pages: no end-of-benchmark snapshot")),
    }
    let mut out = PhaseCounters::new();
    for pair in sequence.windows(2) {
        let ((phase, before), (_, after)) = (&pair[0], &pair[1]);
        if *phase == END_PHASE {
            return Err(format!("{pages} pages: snapshots after the end snapshot"));
        }
        let entry = out.entry(*phase).or_default();
        entry.0 += 1;
        for (key, &value) in after {
            let was = before.get(key).copied().unwrap_or(0);
            let delta = value
                .checked_sub(was)
                .ok_or_else(|| format!("counter {key} went down: {was} -> {value}"))?;
            *entry.1.entry(key.clone()).or_default() += delta;
        }
    }
    Ok(out)
}

/// One size and direction of one kernel's run, with the counts per
/// conversion.
#[derive(Clone, Debug, PartialEq)]
pub struct Bench {
    pub kernel: String,
    pub order: String,
    pub platform: String,
    pub cpus: u64,
    pub pages: u64,
    pub dir: String,
    /// Median TSC cycles of one call.
    pub cycles: u64,
    pub rounds: u64,
    /// Per conversion: TLB shootdowns (IPIs / other CPUs), MapGPA calls,
    /// ACCEPTs of any size, pages step 4 flushed (ours only: CLFLUSH is
    /// invisible to a hypervisor).
    pub shootdowns: f64,
    pub map_gpa: f64,
    pub accepts: f64,
    pub flushed_pages: Option<f64>,
    /// Where the counts came from: "emulator" or "guest".
    pub counted_by: &'static str,
    /// From a boot that timed both orders round by round (the
    /// seven-steps/legacy ratio); set by the caller.
    pub interleaved: bool,
}

impl Bench {
    /// The line issue 8 specifies, with ours' flushed pages at the end.
    pub fn line(&self) -> String {
        let mut line = format!(
            "BENCH kernel={} order={} platform={} cpus={} pages={} dir={} cycles={} \
             shootdowns={:.2} map_gpa={:.2} accepts={:.2}",
            self.kernel,
            self.order,
            self.platform,
            self.cpus,
            self.pages,
            self.dir,
            self.cycles,
            self.shootdowns,
            self.map_gpa,
            self.accepts
        );
        if let Some(flushed) = self.flushed_pages {
            let _ = write!(line, " flushed_pages={flushed:.2}");
        }
        line
    }
}

fn number<T: std::str::FromStr>(
    f: &BTreeMap<&str, &str>,
    key: &str,
    line: &str,
) -> Result<T, String> {
    f.get(key)
        .ok_or_else(|| format!("no {key}= in {line:?}"))?
        .parse()
        .map_err(|_| format!("{key}= is not a number in {line:?}"))
}

/// Every `BENCH kernel=` line of a run's log, with its counts: from the
/// emulator in a TD (checked against the guest's own where it printed
/// them: they must agree), from the guest otherwise. `orders` is the
/// `bench-orders=` list the run had (Linux: `["linux"]`), which gives each
/// line's snapshot phase.
pub fn collect(log: &str, orders: &[&str]) -> Result<Vec<Bench>, String> {
    let mut out = Vec::new();
    let mut phases: BTreeMap<u64, PhaseCounters> = BTreeMap::new();
    for line in log.lines().filter(|l| l.contains("BENCH kernel=")) {
        let f = fields_after(line, "BENCH ").expect("contains BENCH");
        let text = |key: &str| {
            f.get(key)
                .map(|v| v.to_string())
                .ok_or_else(|| format!("no {key}= in {line:?}"))
        };
        let (order, dir, platform) = (text("order")?, text("dir")?, text("platform")?);
        let (cpus, pages): (u64, u64) = (number(&f, "cpus", line)?, number(&f, "pages", line)?);
        let rounds: u64 = number(&f, "rounds", line)?;
        let o = orders
            .iter()
            .position(|x| *x == order)
            .ok_or_else(|| format!("order {order} is not one of {orders:?}"))?;
        let d = match dir.as_str() {
            "to-shared" => 0,
            "to-private" => 1,
            other => return Err(format!("dir={other} in {line:?}")),
        };
        let guest = |key: &str| number::<f64>(&f, key, line);
        let flushed_pages = guest("flushed_pages").ok();
        let (shootdowns, map_gpa, accepts, counted_by) = if platform == "td" {
            let counters = match phases.entry(pages) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => {
                    e.insert(phase_counters(log, pages)?)
                }
            };
            let (calls, sums) = counters
                .get(&(2 * o as u64 + d))
                .ok_or_else(|| format!("no snapshots for {line:?}"))?;
            if *calls != rounds {
                return Err(format!(
                    "{calls} snapshot phases for {rounds} rounds: {line:?}"
                ));
            }
            let per = |keys: &[&str]| {
                keys.iter()
                    .map(|k| sums.get(*k).copied().unwrap_or(0))
                    .sum::<u64>() as f64
                    / *calls as f64
            };
            let others = cpus.saturating_sub(1).max(1) as f64;
            let emulator = (
                per(&["ipis"]) / others,
                per(&["map_gpa_calls"]),
                per(&["accept_4k", "accept_2m", "accept_1g"]),
            );
            if let (Ok(s), Ok(m), Ok(a)) = (
                guest("guest_shootdowns"),
                guest("guest_map_gpa"),
                guest("guest_accepts"),
            ) {
                let close = |x: f64, y: f64| (x - y).abs() < 0.005;
                if !(close(s, emulator.0) && close(m, emulator.1) && close(a, emulator.2)) {
                    return Err(format!(
                        "the guest counted shootdowns/map_gpa/accepts {s}/{m}/{a}, the emulator \
                         {:.2}/{:.2}/{:.2}: {line:?}",
                        emulator.0, emulator.1, emulator.2
                    ));
                }
            }
            (emulator.0, emulator.1, emulator.2, "emulator")
        } else {
            (
                guest("guest_shootdowns")?,
                guest("guest_map_gpa")?,
                guest("guest_accepts")?,
                "guest",
            )
        };
        out.push(Bench {
            kernel: text("kernel")?,
            order,
            platform,
            cpus,
            pages,
            dir,
            cycles: number(&f, "cycles", line)?,
            rounds,
            shootdowns,
            map_gpa,
            accepts,
            flushed_pages,
            counted_by,
            interleaved: false,
        });
    }
    if out.is_empty() {
        return Err("no BENCH lines".into());
    }
    Ok(out)
}

/// Boots our guest (`guest`: the production build, or the negative-control
/// build for `legacy` in `orders`) with `cpus` vCPUs, as a TD under the
/// emulator or plain, runs its benchmark and returns the run and its lines.
pub fn run_ours(
    guest: std::path::PathBuf,
    td: bool,
    cpus: u32,
    rounds: u32,
    sizes: &[u64],
    orders: &[&str],
) -> Result<(crate::Run, Vec<Bench>), String> {
    let machine = if td {
        crate::Machine::Td {
            emulator: crate::emulator_elf()?,
            guest,
            options: String::new(),
        }
    } else {
        crate::Machine::Plain { guest }
    };
    let sizes: Vec<String> = sizes.iter().map(u64::to_string).collect();
    let append = format!(
        "bench-rounds={rounds} bench-sizes={} bench-orders={}",
        sizes.join(","),
        orders.join(",")
    );
    let run = crate::run_guest(
        &machine,
        cpus,
        Some(&append),
        std::time::Duration::from_secs(300),
    )?;
    let log = || format!("\n--- serial log ---\n{}", run.log);
    if run.exit_code != Some(crate::EXIT_PASS) {
        return Err(format!(
            "the benchmark boot ({append}, td: {td}) ended: {}{}",
            crate::describe_exit(run.exit_code),
            log()
        ));
    }
    let mut benches = collect(&run.log, orders).map_err(|e| format!("{e}{}", log()))?;
    let interleaved = orders.len() > 1;
    for b in &mut benches {
        b.interleaved = interleaved;
    }
    Ok((run, benches))
}

/// Boots Debian's kernel as a TD with 2 vCPUs under the emulator with the
/// module's benchmark (`rounds` per size, its default sizes 1, 16, 64,
/// 512), on the same multi-threaded TCG as our TD runs, and returns the
/// run and its lines. The kernel, busybox and module come from
/// scripts/fetch-linux-td.sh.
pub fn run_linux(rounds: u32) -> Result<(crate::Run, Vec<Bench>), String> {
    let (kernel, busybox, module) = (
        crate::linux_td_kernel(),
        crate::linux_td_busybox(),
        crate::module::linux_td_module(),
    );
    for file in [&kernel, &busybox, &module] {
        if !file.is_file() {
            return Err(format!(
                "missing {}: run scripts/fetch-linux-td.sh (make linux-td-fetch)",
                file.display()
            ));
        }
    }
    let initramfs = crate::module::linux_td_race_initramfs();
    crate::initramfs::build_linux_td_race_initramfs(
        &crate::linux_td_init_script(),
        &busybox,
        &module,
        &initramfs,
    )
    .map_err(|e| format!("the module's initramfs: {e}"))?;
    let machine = crate::Machine::TdKernelParallel(crate::TdKernel {
        emulator: crate::emulator_elf()?,
        kernel,
        initramfs: Some(initramfs),
        memory_mib: None,
        options: String::new(),
    });
    let append = format!("console=ttyS0 coco_race=bench coco_race.bench_rounds={rounds}");
    let run = crate::linux::retry_tcg_stale_code("bench: Linux", || {
        crate::run_guest(
            &machine,
            2,
            Some(&append),
            std::time::Duration::from_secs(600),
        )
    })?;
    let serial = crate::linux::serial_part(&run.log);
    let log = || format!("\n--- serial log ---\n{}", run.log);
    if run.exit_code != Some(crate::EXIT_TD_POWER_OFF)
        || crate::module::done_result(serial) != Some(0)
    {
        return Err(format!(
            "Linux's benchmark boot ended: {}, module result {:?}{}",
            crate::describe_exit(run.exit_code),
            crate::module::done_result(serial),
            log()
        ));
    }
    let benches = collect(serial, &["linux"]).map_err(|e| format!("{e}{}", log()))?;
    Ok((run, benches))
}

/// Where `make bench` writes its table in README.md.
pub const README_BEGIN: &str = "<!-- bench-table:begin (make bench writes this part) -->";
pub const README_END: &str = "<!-- bench-table:end -->";

/// Which of `make bench`'s runs a line comes from.
#[derive(Clone, Copy, Debug)]
pub struct Series {
    /// Linux's module, or our guest.
    pub linux: bool,
    pub order: &'static str,
    pub platform: &'static str,
    /// From the boot that interleaved both orders.
    pub interleaved: bool,
}

impl Series {
    pub const LINUX: Series = Series::new(true, "linux", "td", false);
    pub const OURS_TD: Series = Series::new(false, "seven-steps", "td", false);
    pub const TD_SEVEN_STEPS: Series = Series::new(false, "seven-steps", "td", true);
    pub const TD_LEGACY: Series = Series::new(false, "legacy", "td", true);
    pub const PLAIN_SEVEN_STEPS: Series = Series::new(false, "seven-steps", "plain", true);
    pub const PLAIN_LEGACY: Series = Series::new(false, "legacy", "plain", true);

    const fn new(
        linux: bool,
        order: &'static str,
        platform: &'static str,
        interleaved: bool,
    ) -> Series {
        Series {
            linux,
            order,
            platform,
            interleaved,
        }
    }

    /// This series' line for `pages` and `dir`.
    pub fn find<'a>(self, all: &'a [Bench], pages: u64, dir: &str) -> Option<&'a Bench> {
        all.iter().find(|b| {
            b.kernel.starts_with("linux") == self.linux
                && b.order == self.order
                && b.platform == self.platform
                && b.interleaved == self.interleaved
                && b.pages == pages
                && b.dir == dir
        })
    }
}

/// The table for README.md: per size and direction, Linux's cycles and
/// ours (the production build, a separate boot), their ratio, and the
/// seven-steps/legacy ratio from the boot that interleaved both orders (TD
/// and plain); then the counts per conversion.
pub fn render_table(all: &[Bench], machine: &str) -> String {
    let mut sizes: Vec<u64> = all.iter().map(|b| b.pages).collect();
    sizes.sort_unstable();
    sizes.dedup();
    let ratio = |a: Option<&Bench>, b: Option<&Bench>| match (a, b) {
        (Some(a), Some(b)) if b.cycles > 0 => format!("{:.2}", a.cycles as f64 / b.cycles as f64),
        _ => "-".into(),
    };
    let cycles = |b: Option<&Bench>| b.map_or("-".into(), |b| b.cycles.to_string());
    let counts = |b: Option<&Bench>| {
        b.map_or("-".into(), |b| {
            format!("{:.2} / {:.2} / {:.2}", b.shootdowns, b.map_gpa, b.accepts)
        })
    };
    let mut t = String::new();
    let _ = writeln!(t, "Measured by `make bench` on {machine}, QEMU TCG, 2 vCPUs. TSC cycles under TCG are host time, meaningful only as ratios within this run.");
    let _ = writeln!(t);
    let _ = writeln!(t, "| pages | direction | Linux (TD) | ours (TD) | ours / Linux | TD: seven steps / legacy | plain: seven steps / legacy | shootdowns / MapGPA / ACCEPTs per call, Linux | the same, ours |");
    let _ = writeln!(t, "|---:|---|---:|---:|---:|---:|---:|---|---|");
    for &pages in &sizes {
        for dir in ["to-shared", "to-private"] {
            let linux = Series::LINUX.find(all, pages, dir);
            let ours = Series::OURS_TD.find(all, pages, dir);
            let td7 = Series::TD_SEVEN_STEPS.find(all, pages, dir);
            let tdl = Series::TD_LEGACY.find(all, pages, dir);
            let pl7 = Series::PLAIN_SEVEN_STEPS.find(all, pages, dir);
            let pll = Series::PLAIN_LEGACY.find(all, pages, dir);
            let _ = writeln!(
                t,
                "| {pages} | {dir} | {} | {} | {} | {} | {} | {} | {} |",
                cycles(linux),
                cycles(ours),
                ratio(ours, linux),
                ratio(td7, tdl),
                ratio(pl7, pll),
                counts(linux),
                counts(ours)
            );
        }
    }
    t
}

/// `readme` with the part between the markers replaced by `table`.
pub fn with_table(readme: &str, table: &str) -> Result<String, String> {
    let begin = readme
        .find(README_BEGIN)
        .ok_or("README.md has no bench-table begin marker")?;
    let end = readme
        .find(README_END)
        .ok_or("README.md has no bench-table end marker")?;
    if end < begin {
        return Err("README.md's bench-table markers are out of order".into());
    }
    Ok(format!(
        "{}{README_BEGIN}\n{table}{}",
        &readme[..begin],
        &readme[end..]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(tag: u64, ipis: u64, map: u64, acc: u64) -> String {
        format!(
            "TDXEMU snapshot={tag} ipis={ipis} map_gpa_calls={map} accept_4k={acc} accept_2m=0\n"
        )
    }

    #[test]
    fn counts_come_from_the_snapshots_between_each_call() {
        let mut log = String::new();
        // Two rounds of 16 pages, Linux-style: two shootdowns going shared.
        log += &snap(bench_tag(16, 0), 0, 0, 0);
        log += &snap(bench_tag(16, 1), 2, 1, 0);
        log += &snap(bench_tag(16, 0), 3, 2, 16);
        log += &snap(bench_tag(16, 1), 5, 3, 16);
        log += &snap(bench_tag(16, END_PHASE), 6, 4, 32);
        log += "[ 1.0] BENCH kernel=linux-6.12 order=linux platform=td cpus=2 pages=16 dir=to-shared cycles=100 rounds=2\n";
        log += "[ 1.0] BENCH kernel=linux-6.12 order=linux platform=td cpus=2 pages=16 dir=to-private cycles=90 rounds=2\n";
        let b = collect(&log, &["linux"]).unwrap();
        assert_eq!(b.len(), 2);
        assert_eq!(
            (b[0].shootdowns, b[0].map_gpa, b[0].accepts),
            (2.0, 1.0, 0.0)
        );
        assert_eq!(
            (b[1].shootdowns, b[1].map_gpa, b[1].accepts),
            (1.0, 1.0, 16.0)
        );
        assert_eq!(b[0].counted_by, "emulator");
        assert!(b[0]
            .line()
            .ends_with("cycles=100 shootdowns=2.00 map_gpa=1.00 accepts=0.00"));
        // Rounds that do not match the snapshots, or a missing end: errors.
        let wrong = log.replace("rounds=2", "rounds=3");
        assert!(collect(&wrong, &["linux"]).is_err());
        let cut: String = log
            .lines()
            .filter(|l| !l.contains("snapshot=1000169"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(collect(&cut, &["linux"]).unwrap_err().contains("no end"));
    }

    #[test]
    fn ours_must_agree_with_the_emulator() {
        let mut log = String::new();
        log += &snap(bench_tag(1, 0), 0, 0, 0);
        log += &snap(bench_tag(1, 1), 1, 1, 0);
        log += &snap(bench_tag(1, END_PHASE), 2, 2, 1);
        let line = |s: &str| {
            format!("BENCH kernel=ours order=seven-steps platform=td cpus=2 pages=1 dir=to-shared cycles=5 rounds=1 guest_shootdowns={s} guest_ipis=1.00 guest_map_gpa=1.00 guest_accepts=0.00 flushed_pages=1.00\n")
        };
        assert!(collect(&format!("{log}{}", line("1.00")), &["seven-steps"]).is_ok());
        let disagree = collect(&format!("{log}{}", line("2.00")), &["seven-steps"]);
        assert!(disagree.unwrap_err().contains("the emulator"));
        assert!(collect("nothing", &["linux"]).is_err());
    }

    #[test]
    fn the_table_has_the_ratios_of_the_right_series() {
        let line = |kernel: &str, order: &str, interleaved: bool, cycles: u64| Bench {
            kernel: kernel.into(),
            order: order.into(),
            platform: "td".into(),
            cpus: 2,
            pages: 64,
            dir: "to-shared".into(),
            cycles,
            rounds: 1,
            shootdowns: 1.0,
            map_gpa: 1.0,
            accepts: 0.0,
            flushed_pages: None,
            counted_by: "emulator",
            interleaved,
        };
        let all = [
            line("linux-6.12", "linux", false, 400),
            line("ours", "seven-steps", false, 100),
            line("ours", "seven-steps", true, 210),
            line("ours", "legacy", true, 200),
        ];
        let table = render_table(&all, "a test");
        let row = table
            .lines()
            .find(|l| l.starts_with("| 64 | to-shared"))
            .unwrap();
        assert_eq!(
            row,
            "| 64 | to-shared | 400 | 100 | 0.25 | 1.05 | - | 1.00 / 1.00 / 0.00 | 1.00 / 1.00 / 0.00 |"
        );
    }

    #[test]
    fn the_table_goes_between_the_markers() {
        let readme = format!("a\n{README_BEGIN}\nold\n{README_END}\nb\n");
        let new = with_table(&readme, "T\n").unwrap();
        assert_eq!(new, format!("a\n{README_BEGIN}\nT\n{README_END}\nb\n"));
        assert!(with_table("no markers", "T").is_err());
    }
}
