//! `make run` as a user sees it (issue 10): the `run` binary boots our guest
//! as a TD with 4 vCPUs and the negative-control build in the legacy order,
//! and prints one screen. It must show the traced conversion with the
//! emulator's page state at each step, the stress counters, the legacy
//! order's wrong-state accesses beside ours, and no terminal escape
//! sequence; its exit status is its verdict.

use std::process::Command;

#[test]
fn make_run_shows_the_td_run_and_the_legacy_order_beside_it() {
    let output = Command::new(env!("CARGO_BIN_EXE_run"))
        .args(["--rounds", "50"])
        .output()
        .expect("running the run binary");
    let screen = String::from_utf8_lossy(&output.stdout);
    let why = |what: &str| {
        format!(
            "{what}\n----- screen -----\n{screen}\n----- stderr -----\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    };
    assert!(output.status.success(), "{}", why("run failed"));
    for want in [
        "One conversion, step by step",
        // To shared: step 7 starts with the entry shared and non-present,
        // the emulator's page already shared (MapGPA ran in step 6).
        "7 set PRESENT",
        "shared (shared)",
        "In-guest tests: 13 passed, 0 failed",
        "wrong_bytes=0",
        "emulator: wrong_state=0 ve_ept_violation=0",
        "legacy order",
        "failed, as the negative control must",
        // The SNP run: the trace shows the RMP state, the counts match.
        "[3/3] the same guest as an AMD SEV-SNP guest",
        "validated (private)",
        "shared (shared)",
        "emulator: wrong_state=0 vc_404=0",
        "SNP run: passed, no page met in the other state, every count matched",
    ] {
        assert!(
            screen.contains(want),
            "{}",
            why(&format!("missing {want:?}"))
        );
    }
    // The engine accepts inside step 6, so no step of the trace may find
    // the page pending (MapGPA's result before ACCEPT).
    assert!(
        !screen.contains("pending (none)"),
        "{}",
        why("the trace met the page pending")
    );
    let summary = screen
        .lines()
        .find(|l| {
            l.trim_start()
                .starts_with("wrong-state accesses (emulator)")
        })
        .unwrap_or_else(|| panic!("{}", why("no summary row")));
    let counts: Vec<u64> = summary
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert!(
        counts.len() == 2 && counts[0] == 0 && counts[1] > 0,
        "{}",
        why(&format!(
            "want 0 for ours and more for the legacy order: {summary:?}"
        ))
    );
    assert!(
        !screen.contains('\x1b') && !screen.contains('\r'),
        "{}",
        why("terminal control in the output")
    );
    println!("{screen}");
}
