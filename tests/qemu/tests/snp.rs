//! The guest as an AMD SEV-SNP guest under the emulator's SNP mode (option
//! `snp`): it boots with 1, 2 and 4 vCPUs (APs through AP creation) and
//! passes every test; the stress converts through the non-present window
//! with PVALIDATE through a per-CPU window and meets no unvalidated page
//! (#VC 0x404) and no RMP violation, and the guest's own count of page state
//! changes and PVALIDATEs equals the emulator's; the legacy order meets
//! both (the negative control); a lying PSC ends in a quarantine with the
//! guest alive, and touching it ends the guest; partial PSC progress and
//! refused 2M PVALIDATEs still convert; malformed requests are refused.

use qemu_harness::screen::SNP_SENT_AND_SEEN;
use qemu_harness::{
    check_concurrent, emulator_elf, emulator_errors, guest_elf, guest_legacy_elf, judge, parse_log,
    run_guest, Machine, Report, Run, EXIT_BAD_INPUT, EXIT_FAIL, EXIT_PASS, EXPECTED_TESTS,
};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(600);
/// Round trips of the stress (each two conversions with a shootdown, two
/// page state changes and two PVALIDATEs; every IPI and EOI of an SNP guest
/// is a #VC and a GHCB exit). `make soak-snp` runs 10 000.
const SNP_STRESS_ROUNDS: u32 = 300;

static ONE_QEMU_AT_A_TIME: Mutex<()> = Mutex::new(());

fn snp_boot(guest: PathBuf, cpus: u32, options: &str, append: &str) -> (Run, Report) {
    let _only_me = ONE_QEMU_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let emulator = emulator_elf().unwrap_or_else(|e| panic!("{e}"));
    let machine = Machine::Td {
        emulator,
        guest,
        options: format!("snp {options}").trim().to_string(),
    };
    let append = format!("stress-rounds={SNP_STRESS_ROUNDS} {append}");
    let run =
        run_guest(&machine, cpus, Some(append.trim()), TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    println!(
        "SNP -smp {cpus} [snp {options}] [{append}]: exit {:?} after {:.1?}",
        run.exit_code, run.elapsed
    );
    let report = parse_log(&run.log);
    println!("  emulator counters: {:?}", report.snp);
    (run, report)
}

fn fail_with_log(run: &Run, why: &str) -> ! {
    panic!(
        "{why}\n----- serial log -----\n{}\n----- end of log -----",
        run.log
    )
}

fn emulator(report: &Report, key: &str) -> u64 {
    report.snp.get(key).copied().unwrap_or(u64::MAX)
}

fn guest(report: &Report, key: &str) -> u64 {
    report.stress.get(key).copied().unwrap_or(u64::MAX)
}

/// Every test passes as an SNP guest; nothing met a page in the wrong
/// state; what the guest sent equals what the emulator counted.
fn passes_as_snp(cpus: u32, options: &str) -> Report {
    let elf = guest_elf().unwrap_or_else(|e| panic!("{e}"));
    let (run, report) = snp_boot(elf, cpus, options, "");
    if let Err(why) = judge(run.exit_code, &report, EXPECTED_TESTS) {
        fail_with_log(&run, &why);
    }
    if !run.log.contains("running as an SEV-SNP guest, C-bit 47") {
        fail_with_log(&run, "the guest did not detect SNP (or not C-bit 47)");
    }
    if let Err(why) = check_concurrent(&report, cpus) {
        fail_with_log(&run, &why);
    }
    for (key, want) in [
        ("vc_404", 0),
        ("wrong_state", 0),
        ("implicit_conversions", 0),
        ("ghcb_refused", 0),
        ("aps_created", u64::from(cpus) - 1),
    ] {
        if emulator(&report, key) != want {
            fail_with_log(
                &run,
                &format!("SNPEMU {key}={}, want {want}", emulator(&report, key)),
            );
        }
    }
    // The guest's totals (boot and every conversion) against the
    // emulator's: page state changes of both kinds, PVALIDATEs of both
    // sizes, 2M refusals, and each page made private zeroed once.
    let sent_and_seen = SNP_SENT_AND_SEEN.iter().map(|&(_, g, e)| (g, e));
    for (guest_key, emulator_key) in sent_and_seen.chain([
        ("pvalidate_size_mismatch", "pvalidate_size_mismatch"),
        ("vc_cpuid", "vc_cpuid"),
    ]) {
        let (g, e) = (guest(&report, guest_key), emulator(&report, emulator_key));
        if g != e || g == u64::MAX {
            fail_with_log(
                &run,
                &format!("guest {guest_key}={g} but emulator {emulator_key}={e}"),
            );
        }
    }
    if cpus > 1 {
        let (fixups, conversions) = (guest(&report, "fixups"), guest(&report, "conversions"));
        if fixups == 0 || fixups == u64::MAX || conversions != 2 * u64::from(SNP_STRESS_ROUNDS) {
            fail_with_log(
                &run,
                &format!("stress: {conversions} conversions, {fixups} fixups"),
            );
        }
        if !run.log.contains("STRESS cpus=") || !run.log.contains(" platform=snp vc_404=0 ") {
            fail_with_log(&run, "the stress did not report platform=snp with vc_404=0");
        }
    }
    report
}

#[test]
fn snp_guest_boots_with_one_vcpu() {
    passes_as_snp(1, "");
}

#[test]
fn snp_guest_boots_with_two_vcpus() {
    passes_as_snp(2, "");
}

#[test]
fn snp_guest_boots_with_four_vcpus_and_the_stress_meets_no_page_in_the_other_state() {
    let report = passes_as_snp(4, "");
    println!(
        "  stress: {} conversions, {} fixups, vc_404={}, wrong_state={}",
        guest(&report, "conversions"),
        guest(&report, "fixups"),
        emulator(&report, "vc_404"),
        emulator(&report, "wrong_state")
    );
}

/// The negative control: converting in Linux's order (the entry stays
/// present while the C-bit flips and the hypervisor is told) lets the
/// loaders meet pages in the other state: C=1 accesses to unvalidated
/// pages (#VC 0x404) and to hypervisor-owned ones (RMP violations).
#[test]
fn snp_legacy_order_meets_unvalidated_and_hypervisor_owned_pages() {
    let elf = guest_legacy_elf().unwrap_or_else(|e| panic!("{e}"));
    let (run, report) = snp_boot(elf, 4, "", "order=legacy");
    let (vc_404, wrong) = (
        emulator(&report, "vc_404"),
        emulator(&report, "wrong_state"),
    );
    // Both kinds: to private, the C=1 entry is present before the PSC (a
    // hypervisor-owned page: an RMP violation, converted as KVM does) and
    // before PVALIDATE (#VC 0x404).
    if vc_404 == 0 || wrong == 0 || vc_404 == u64::MAX || wrong == u64::MAX {
        fail_with_log(
            &run,
            &format!("the legacy order met vc_404={vc_404} wrong_state={wrong}: want both > 0"),
        );
    }
    if run.exit_code == Some(EXIT_PASS) {
        fail_with_log(&run, "the legacy order passed");
    }
    println!("  legacy order: vc_404={vc_404} wrong_state={wrong}");
    // Under the other policy the first RMP violation stops the guest (or
    // the guest stops at its first #VC 0x404 that is no zeropad load).
    let elf = guest_legacy_elf().unwrap_or_else(|e| panic!("{e}"));
    let (run, report) = snp_boot(elf, 4, "wrong-state=shutdown", "order=legacy");
    let stopped_by_emulator = run.log.contains("(RMP violation, policy kill)");
    let vc_404 = emulator(&report, "vc_404");
    let stopped_by_guest = vc_404 > 0 && vc_404 != u64::MAX && report.crash.is_some();
    if run.exit_code != Some(EXIT_FAIL) || !(stopped_by_emulator || stopped_by_guest) {
        fail_with_log(
            &run,
            "wrong-state=shutdown: the legacy order did not end at a page in the other state",
        );
    }
}

/// A PSC that says it converted and did not: PVALIDATE meets the
/// hypervisor-owned page, the run is quarantined, the guest lives on.
#[test]
fn snp_lying_psc_ends_in_quarantine_with_the_guest_alive() {
    let elf = guest_elf().unwrap_or_else(|e| panic!("{e}"));
    let (run, report) = snp_boot(elf.clone(), 2, "psc-lie memory=256", "hostile=psc-lie");
    if run.exit_code != Some(EXIT_PASS)
        || !run
            .log
            .contains("HOSTILE kind=psc-lie result=ok quarantine_va=")
        || !run.log.contains("quarantine_bytes=65536")
        || report.crash.is_some()
    {
        fail_with_log(&run, "want a 64 KiB quarantine and the guest alive");
    }
    // The negative control: reading the quarantined frame ends the guest.
    let (run, report) = snp_boot(elf, 2, "psc-lie memory=256", "hostile=psc-lie-touch");
    if run.exit_code != Some(EXIT_FAIL) || report.crash.is_none() {
        fail_with_log(&run, "touching the quarantine did not stop the guest");
    }
    if matches!(emulator(&report, "vc_404"), 0 | u64::MAX) {
        fail_with_log(&run, "the touch met no unvalidated page");
    }
}

/// A hypervisor that changes three pages per PSC call and refuses every
/// 2M PVALIDATE: the guest resumes the PSC and validates at 4K.
#[test]
fn snp_partial_psc_and_refused_2m_pvalidate_still_convert() {
    let report = passes_as_snp(2, "psc-pages-per-call=3 pvalidate-2m-refused memory=256");
    if emulator(&report, "pvalidate_2m") != 0 || emulator(&report, "pvalidate_size_mismatch") == 0 {
        panic!(
            "want no 2M PVALIDATE and some size mismatches: {:?}",
            report.snp
        );
    }
}

/// Malformed requests get the GHCB protocol's refusal (or, for a GHCB the
/// vCPU never registered, the guest is stopped with one line); the
/// emulator never acts on them.
#[test]
fn snp_malformed_requests_are_refused() {
    let elf = guest_elf().unwrap_or_else(|e| panic!("{e}"));
    for kind in [
        "snp-psc-too-long",
        "snp-psc-bad-entry",
        "snp-bad-vmsa",
        "snp-ghcb-private",
    ] {
        let (run, _) = snp_boot(elf.clone(), 2, "memory=256", &format!("fault={kind}"));
        if run.exit_code != Some(EXIT_PASS)
            || !run.log.contains(&format!("SNPBAD kind={kind} refused=1"))
        {
            fail_with_log(&run, &format!("{kind}: not refused"));
        }
        // The emulator acted on nothing: the page the refused PSC named
        // is as it was.
        if kind.starts_with("snp-psc-")
            && !run
                .log
                .contains("SNPEMU page=0x8000000 state=validated mapped=private")
        {
            fail_with_log(&run, &format!("{kind}: the page the PSC named changed"));
        }
        if kind == "snp-bad-vmsa"
            && !run
                .log
                .contains("emulator: AP creation refused: the VMSA does not describe long mode")
        {
            fail_with_log(&run, "no one-line report of the bad VMSA");
        }
    }
    let (run, _) = snp_boot(elf, 2, "memory=256", "fault=snp-ghcb-unregistered");
    if run.exit_code != Some(EXIT_FAIL) || !run.log.contains("which this vCPU did not register") {
        fail_with_log(
            &run,
            "an unregistered GHCB did not stop the guest with a report",
        );
    }
}

/// Options the emulator cannot honour are refused in one line before the
/// guest runs: a C-bit at or above the CPU's phys-bits (48 here), an
/// unknown SNP word, a TD-only word in SNP mode.
#[test]
fn snp_options_the_emulator_cannot_honour_are_refused() {
    let elf = guest_elf().unwrap_or_else(|e| panic!("{e}"));
    for (options, says) in [
        ("c-bit=48", "needs QEMU phys-bits above it"),
        ("c-bit=31", "c-bit= takes 32..=51"),
        ("psc-pages-per-call=0", "psc-pages-per-call="),
        ("sept-ve", "unknown"),
    ] {
        let (run, _) = snp_boot(elf.clone(), 1, options, "");
        let errors = emulator_errors(&run.log);
        if run.exit_code != Some(EXIT_BAD_INPUT)
            || errors.len() != 1
            || !errors[0].contains(says)
            || run.log.contains("guest: booted")
        {
            fail_with_log(
                &run,
                &format!("[snp {options}]: want one refusal saying {says:?}"),
            );
        }
    }
}
