//! What `make run` shows: the guest's traced conversion (its `TRACE` lines,
//! each followed in a TD or an SNP guest by the emulator's `TDXEMU page=` or
//! `SNPEMU page=` probe line) as a table, and the counters of a run as a
//! few lines.

use crate::Report;

/// One row of the trace: the page's entry as a step starts (or when the
/// conversion is done), and the emulator's state of the page then.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceRow {
    /// `ToShared` or `ToPrivate`.
    pub direction: String,
    /// The step number, or `done`.
    pub step: String,
    /// The step's name (`RemoveAliases`...), empty for `done`.
    pub name: String,
    pub va: String,
    pub entry: String,
    pub present: bool,
    pub shared: bool,
    pub frame: String,
    /// (state, alias mapped), from the emulator; `None` outside a TD.
    pub emulator: Option<(String, String)>,
}

fn field<'a>(words: &[&'a str], key: &str) -> Option<&'a str> {
    words.iter().find_map(|w| w.strip_prefix(key))
}

/// The trace rows of `log`, in order.
pub fn trace_rows(log: &str) -> Vec<TraceRow> {
    let mut rows: Vec<TraceRow> = Vec::new();
    for line in log.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("TRACE ") {
            let words: Vec<&str> = rest.split_whitespace().collect();
            let (Some(step), Some(direction), Some(entry)) = (
                field(&words, "step="),
                field(&words, "direction="),
                field(&words, "entry="),
            ) else {
                continue;
            };
            let name = match words.get(1) {
                Some(name) if step != "done" && !name.contains('=') => name.to_string(),
                _ => String::new(),
            };
            rows.push(TraceRow {
                direction: direction.to_string(),
                step: step.to_string(),
                name,
                va: field(&words, "va=").unwrap_or("?").to_string(),
                entry: entry.to_string(),
                present: field(&words, "present=") == Some("1"),
                shared: field(&words, "shared=") == Some("1"),
                frame: field(&words, "frame=").unwrap_or("?").to_string(),
                emulator: None,
            });
        } else if let Some(rest) = line
            .strip_prefix("TDXEMU page=")
            .or_else(|| line.strip_prefix("SNPEMU page="))
        {
            let words: Vec<&str> = rest.split_whitespace().collect();
            if let (Some(row), Some(state), Some(mapped)) = (
                rows.last_mut(),
                field(&words, "state="),
                field(&words, "mapped="),
            ) {
                if row.emulator.is_none() && words.first() == Some(&row.frame.as_str()) {
                    row.emulator = Some((state.to_string(), mapped.to_string()));
                }
            }
        }
    }
    rows
}

/// What a step does, in a few words.
fn step_words(name: &str) -> &str {
    match name {
        "RemoveAliases" => "remove aliases",
        "ClearPresent" => "clear PRESENT",
        "FlushTlb" => "flush TLBs, all CPUs",
        "FlushCaches" => "flush caches",
        "FlipEncoding" => "flip the C/S bit",
        "NotifyHypervisor" => "notify the hypervisor",
        "SetPresent" => "set PRESENT",
        other => other,
    }
}

/// The trace as tables, one per direction.
pub fn render_trace(rows: &[TraceRow]) -> String {
    let mut out = String::new();
    let Some(first) = rows.first() else {
        return "  (no trace in the log)\n".into();
    };
    out.push_str(&format!(
        "One conversion, step by step: the 4K page at {} (GPA {}), inside a 2M leaf\n",
        first.va, first.frame
    ));
    let yes = |b: bool| if b { "yes" } else { "no" };
    let mut direction = "";
    for row in rows {
        if row.direction != direction {
            direction = &row.direction;
            let title = if direction == "ToShared" {
                "to shared"
            } else {
                "to private"
            };
            out.push_str(&format!(
                "  {title:<28} {:<20} {:<8} {:<7} {}\n",
                "entry", "present", "shared", "emulator: page (alias mapped)"
            ));
        }
        let step = if row.step == "done" {
            "done".to_string()
        } else {
            format!("{} {}", row.step, step_words(&row.name))
        };
        let emulator = match &row.emulator {
            Some((state, mapped)) => format!("{state} ({mapped})"),
            None => "-".into(),
        };
        out.push_str(&format!(
            "    {step:<26} {:<20} {:<8} {:<7} {emulator}\n",
            row.entry,
            yes(row.present),
            yes(row.shared)
        ));
    }
    out
}

/// The value of `key` in `counters`, `-` when absent.
pub fn value(counters: &std::collections::BTreeMap<String, u64>, key: &str) -> String {
    counters
        .get(key)
        .map_or_else(|| "-".into(), |v| v.to_string())
}

/// What an SNP guest says it asked for (its `STRESS` key) beside what the
/// emulator counted (its `SNPEMU` key), with a label: the two must agree.
pub const SNP_SENT_AND_SEEN: [(&str, &str, &str); 5] = [
    ("MSR-protocol page state changes", "msr_psc", "msr_psc"),
    (
        "GHCB page state change calls",
        "ghcb_psc_calls",
        "ghcb_psc_calls",
    ),
    ("4K PVALIDATEs", "pvalidate_4k", "pvalidate_4k"),
    ("2M PVALIDATEs", "pvalidate_2m", "pvalidate_2m"),
    (
        "pages made private (zeroed)",
        "zeroed_pages",
        "pages_to_private",
    ),
];

/// An SNP run's stress and counters: the guest's stress, the emulator's
/// wrong-state counts, and what the guest says it sent beside what the
/// emulator counted.
pub fn render_snp(report: &Report) -> String {
    let s = |k| value(&report.stress, k);
    let e = |k| value(&report.snp, k);
    let guest = if report.stress.contains_key("conversions") {
        format!(
            "conversions={} loads={} fixups={} wrong_bytes={} vc_404={}",
            s("conversions"),
            s("loads"),
            s("fixups"),
            s("wrong_bytes"),
            s("vc_404")
        )
    } else {
        "no stress report: the run ended before the stress did".into()
    };
    let mut out = format!(
        "  guest:    {guest}\n  \
         emulator: wrong_state={} vc_404={} implicit_conversions={}\n  \
         {:<34} {:>8} {:>9}\n",
        e("wrong_state"),
        e("vc_404"),
        e("implicit_conversions"),
        "asked by the guest, seen by the emulator",
        "guest",
        "emulator"
    );
    for (what, guest_key, emulator_key) in SNP_SENT_AND_SEEN {
        out.push_str(&format!(
            "    {what:<32} {:>8} {:>9}\n",
            s(guest_key),
            e(emulator_key)
        ));
    }
    out
}

/// The stress and emulator counters of a run, in two lines.
pub fn render_stress(report: &Report) -> String {
    let s = |k| value(&report.stress, k);
    let e = |k| value(&report.tdx, k);
    let guest = if report.stress.contains_key("conversions") {
        format!(
            "conversions={} loads={} fixups={} wrong_bytes={} ept_violation_ve={}",
            s("conversions"),
            s("loads"),
            s("fixups"),
            s("wrong_bytes"),
            s("ve")
        )
    } else {
        "no stress report: the run ended before the stress did".into()
    };
    format!(
        "  guest:    {guest}\n  \
         emulator: wrong_state={} ve_ept_violation={} implicit_conversions={} map_gpa_calls={} \
         accept_4k={} accept_2m={}\n",
        e("wrong_state"),
        e("ve_ept_violation"),
        e("implicit_conversions"),
        e("map_gpa_calls"),
        e("accept_4k"),
        e("accept_2m"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "\
TRACE step=1 RemoveAliases direction=ToShared pages=1 va=0xffff88803fc05000 entry=0x800000003fc05103 present=1 shared=0 frame=0x3fc05000
TDXEMU page=0x3fc05000 state=private mapped=private
TRACE step=6 NotifyHypervisor direction=ToShared pages=1 va=0xffff88803fc05000 entry=0x800080003fc05102 present=0 shared=1 frame=0x3fc05000
TDXEMU page=0x3fc05000 state=private mapped=private
TRACE step=done result=ok splits=1 direction=ToShared pages=1 va=0xffff88803fc05000 entry=0x800080003fc05103 present=1 shared=1 frame=0x3fc05000
TDXEMU page=0x3fc05000 state=shared mapped=shared
TRACE step=1 RemoveAliases direction=ToPrivate pages=1 va=0xffff88803fc05000 entry=0x800080003fc05103 present=1 shared=1 frame=0x3fc05000
TDXEMU page=0x1000 state=shared mapped=shared
";

    #[test]
    fn trace_lines_pair_with_the_emulators_probe_of_the_same_page() {
        let rows = trace_rows(LOG);
        assert_eq!(rows.len(), 4);
        assert_eq!(
            (
                rows[1].step.as_str(),
                rows[1].name.as_str(),
                rows[1].present,
                rows[1].shared
            ),
            ("6", "NotifyHypervisor", false, true)
        );
        assert_eq!(
            rows[2].emulator,
            Some(("shared".to_string(), "shared".to_string()))
        );
        assert_eq!(rows[2].name, "", "done has no step name");
        assert_eq!(
            rows[3].emulator, None,
            "a probe of another page is not this row's"
        );
        let table = render_trace(&rows);
        assert!(table.contains("6 notify the hypervisor"), "{table}");
        assert!(table.contains("to private"), "{table}");
        assert!(!table.contains('\x1b'));
    }
}
