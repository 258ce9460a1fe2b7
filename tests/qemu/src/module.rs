//! Issue 8's Linux side: what linux-td/module/coco_race.c prints (`RACE`,
//! `BENCH`, `CORACE done`) and the emulator's counter snapshots it asks for
//! (`TDXEMU snapshot=<tag> key=value ...`, written when the TD writes the
//! tag to port 0xf8), parsed from a serial log, with counter differences.

use std::collections::BTreeMap;
use std::path::PathBuf;

/// Printed last by the module, whatever happened: `CORACE done mode=<m>
/// result=<errno>`.
pub const DONE: &str = "CORACE done";
/// The snapshot tags the module writes around the race.
pub const RACE_BEFORE: u64 = 1;
pub const RACE_AFTER: u64 = 2;

/// The module built by scripts/build-linux-td-module.sh: `$LINUX_TD_MODULE`,
/// else `target/linux-td/coco_race.ko`.
pub fn linux_td_module() -> PathBuf {
    match std::env::var_os("LINUX_TD_MODULE") {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => crate::linux_td_cache().join("coco_race.ko"),
    }
}

/// What the build script records about the module (packages, vermagic).
pub fn linux_td_module_record() -> PathBuf {
    crate::linux_td_cache().join("MODULE")
}

/// Where the harness writes the initramfs with the module in it.
pub fn linux_td_race_initramfs() -> PathBuf {
    crate::linux_td_cache().join("initramfs-race.cpio")
}

/// `key=value` words of a line, from the word `first` on (a printk
/// timestamp or anything else before it is skipped).
pub fn fields_after<'a>(line: &'a str, first: &str) -> Option<BTreeMap<&'a str, &'a str>> {
    let at = line.find(first)?;
    let rest = &line[at + first.len()..];
    Some(
        rest.split_whitespace()
            .filter_map(|w| w.split_once('='))
            .collect(),
    )
}

/// Every `TDXEMU snapshot=<tag> ...` line's tag and counters, in log order.
pub fn snapshot_sequence(log: &str) -> Vec<(u64, BTreeMap<String, u64>)> {
    log.lines()
        .filter_map(|line| {
            let at = line.find("TDXEMU snapshot=")?;
            let rest = &line[at + "TDXEMU snapshot=".len()..];
            let (tag, counters) = rest.split_once(' ').unwrap_or((rest, ""));
            let mut map = BTreeMap::new();
            crate::parse_counters(counters, &mut map);
            Some((tag.parse().ok()?, map))
        })
        .collect()
}

/// Every `TDXEMU snapshot=<tag> ...` line's counters, by tag (the last line
/// of a tag wins).
pub fn snapshots(log: &str) -> BTreeMap<u64, BTreeMap<String, u64>> {
    snapshot_sequence(log).into_iter().collect()
}

/// Counter differences `after - before` between two snapshots.
pub fn delta(
    snaps: &BTreeMap<u64, BTreeMap<String, u64>>,
    before: u64,
    after: u64,
) -> Result<BTreeMap<String, u64>, String> {
    let b = snaps
        .get(&before)
        .ok_or_else(|| format!("no TDXEMU snapshot={before} line"))?;
    let a = snaps
        .get(&after)
        .ok_or_else(|| format!("no TDXEMU snapshot={after} line"))?;
    a.iter()
        .map(|(k, &v)| {
            let w = b.get(k).copied().unwrap_or(0);
            v.checked_sub(w)
                .map(|d| (k.clone(), d))
                .ok_or_else(|| format!("counter {k} went down: {w} -> {v}"))
        })
        .collect()
}

/// The module's `RACE` line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RaceLine {
    pub kernel: String,
    pub cpus: u64,
    pub conversions: u64,
    pub loads: u64,
    pub fixups: u64,
    pub wrong_bytes: u64,
    pub conversion_errors: u64,
}

fn number(fields: &BTreeMap<&str, &str>, key: &str, line: &str) -> Result<u64, String> {
    fields
        .get(key)
        .ok_or_else(|| format!("no {key}= in {line:?}"))?
        .parse()
        .map_err(|_| format!("{key}= is not a number in {line:?}"))
}

/// The one `RACE kernel=...` line of a log.
pub fn race_line(log: &str) -> Result<RaceLine, String> {
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("RACE kernel=")).collect();
    let line = match lines.as_slice() {
        [line] => *line,
        [] => return Err("no RACE line".into()),
        _ => return Err(format!("{} RACE lines", lines.len())),
    };
    let f = fields_after(line, "RACE ").expect("contains RACE");
    Ok(RaceLine {
        kernel: f
            .get("kernel")
            .ok_or_else(|| format!("no kernel= in {line:?}"))?
            .to_string(),
        cpus: number(&f, "cpus", line)?,
        conversions: number(&f, "conversions", line)?,
        loads: number(&f, "loads", line)?,
        fixups: number(&f, "fixups", line)?,
        wrong_bytes: number(&f, "wrong_bytes", line)?,
        conversion_errors: number(&f, "conversion_errors", line)?,
    })
}

/// One of the module's `BENCH` lines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BenchLine {
    /// The line from `BENCH` on, as the module printed it.
    pub text: String,
    /// Online CPUs when it ran.
    pub cpus: u64,
    pub pages: u64,
    pub dir: String,
    pub cycles: u64,
    /// Timed conversions in this direction (the median's sample count).
    pub rounds: u64,
}

/// Every `BENCH kernel=...` line of a log, in order.
pub fn bench_lines(log: &str) -> Result<Vec<BenchLine>, String> {
    log.lines()
        .filter_map(|l| Some((l, l.find("BENCH kernel=")?)))
        .map(|(line, at)| {
            // As issue 8 spells it: the sample count is not part of it.
            let text = line[at..]
                .split_whitespace()
                .filter(|w| !w.starts_with("rounds="))
                .collect::<Vec<_>>()
                .join(" ");
            let f = fields_after(line, "BENCH ").expect("contains BENCH");
            Ok(BenchLine {
                cpus: number(&f, "cpus", line)?,
                pages: number(&f, "pages", line)?,
                dir: f
                    .get("dir")
                    .ok_or_else(|| format!("no dir= in {line:?}"))?
                    .to_string(),
                cycles: number(&f, "cycles", line)?,
                rounds: number(&f, "rounds", line)?,
                text,
            })
        })
        .collect()
}

/// The module's final line's `result=` (0 or a negative errno).
pub fn done_result(log: &str) -> Option<i64> {
    log.lines()
        .filter_map(|l| fields_after(l, DONE))
        .next_back()
        .and_then(|f| f.get("result")?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "\
[   20.2] LINUXTD coco_race insmod mode=race rounds=1000
TDXEMU snapshot=1 ve_ept_violation=0 wrong_state=5 ipis=10
[   30.0] RACE kernel=linux-6.12.117+deb12-cloud-amd64 cpus=4 conversions=2000 loads=220056 fixups=3 wrong_bytes=0 conversion_errors=0
TDXEMU snapshot=2 ve_ept_violation=3 wrong_state=9 ipis=4010
[   30.1] BENCH kernel=linux-6.12 order=linux platform=td cpus=2 pages=16 dir=to-shared cycles=12345 rounds=20
[   30.2] CORACE done mode=race result=0
TDXEMU ve_ept_violation=3
";

    #[test]
    fn parses_the_module_lines_and_the_snapshot_deltas() {
        let race = race_line(LOG).unwrap();
        assert_eq!(race.kernel, "linux-6.12.117+deb12-cloud-amd64");
        assert_eq!((race.cpus, race.conversions, race.fixups), (4, 2000, 3));
        let d = delta(&snapshots(LOG), RACE_BEFORE, RACE_AFTER).unwrap();
        assert_eq!(d["ve_ept_violation"], 3);
        assert_eq!(d["wrong_state"], 4);
        assert_eq!(d["ipis"], 4000);
        let bench = bench_lines(LOG).unwrap();
        assert_eq!(bench.len(), 1);
        assert_eq!((bench[0].pages, bench[0].cycles), (16, 12345));
        assert!(bench[0].text.starts_with("BENCH kernel="));
        assert!(bench[0].text.ends_with("dir=to-shared cycles=12345"));
        assert_eq!(done_result(LOG), Some(0));
        assert!(delta(&snapshots(LOG), 1, 7).is_err());
    }

    #[test]
    fn a_missing_or_doubled_race_line_is_an_error() {
        assert!(race_line("nothing").is_err());
        let twice = format!("{LOG}{LOG}");
        assert!(race_line(&twice).unwrap_err().contains("2 RACE lines"));
    }
}
