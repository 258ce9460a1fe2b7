//! Boot, memory, exceptions, SMP, then the tests, reported on the serial
//! console for the host harness.
//!
//! The same kernel runs as an ordinary VM, as an Intel TDX guest (a TD),
//! decided at boot by CPUID leaf 0x21, or as an AMD SEV-SNP guest (CPUID
//! 0x8000_001F and SEV_STATUS). In a TD it installs the #VE handler
//! before anything that could raise one (the console's port I/O, in the
//! emulator's strict mode), accepts RAM before touching it, uses the x2APIC
//! only and no PIT, and starts APs through the ACPI wakeup mailbox instead of
//! INIT-SIPI-SIPI. An SNP guest likewise: the #VC handler first, its GHCBs
//! before anything prints, PVALIDATE of RAM, APs through AP creation.

mod bench;
mod cacheflush;
mod concurrent;
mod engine;
mod faults;
mod hostile;
mod memory;
pub mod report;
mod shootdown;
mod snp;
mod stress;
mod td;
mod tests;
mod vmalloc;

use bare::apic::Apic;
use bare::bootinfo::{BootInfo, BootProtocol};
use bare::println;
use memory::{RamRegion, FRAMES};

/// 2M blocks reserved at the top of RAM for the conversion tests (never
/// handed out by the frame allocator).
pub const TEST_AREA_BLOCKS: u64 = 8;
static TEST_AREA: spin::Once<(u64, u64)> = spin::Once::new();

/// `[start, end)` physical of the test area.
pub fn test_area() -> (u64, u64) {
    *TEST_AREA.get().expect("test area chosen at boot")
}

/// How the APs of this machine start; build_tables maps what it needs.
#[derive(Clone, Copy, Debug)]
pub enum ApStartMethod {
    /// INIT-SIPI-SIPI with the real-mode trampoline (xAPIC or x2APIC).
    InitSipi,
    /// The ACPI wakeup mailbox (physical page, if the MADT has one): a TD.
    WakeupMailbox { mailbox: Option<u64> },
    /// SEV-SNP AP creation from a VMSA: nothing to map.
    SnpApCreation,
}

static AP_START: spin::Once<ApStartMethod> = spin::Once::new();
/// How long, at least, a TD waits for the firmware to take a wakeup and
/// for the AP to come up (TSC-timed, see `bare::tsc`).
const TD_AP_TIMEOUT_US: u64 = 5_000_000;
/// What the command line asks of the stress (checked at boot).
static STRESS_SETTINGS: spin::Once<stress::Settings> = spin::Once::new();

/// Polls `condition` for at least `timeout_us`: on the PIT as always, or in
/// a TD, which has no PIT, on the TSC.
fn wait_until(timeout_us: u64, condition: impl FnMut() -> bool) -> bool {
    if confidential() {
        bare::tsc::wait_until(timeout_us, condition)
    } else {
        bare::smp::wait_until(timeout_us, condition)
    }
}

pub use bare::smp::cpu_index;

/// Whether this is a confidential guest (a TD or an SNP guest): no PIT, no
/// xAPIC page, and a page's contents do not survive a conversion.
pub fn confidential() -> bool {
    td::active() || snp::active()
}

/// The local APIC driver, shared by all CPUs (set on the BSP before any AP
/// starts).
static APIC: spin::Once<Apic> = spin::Once::new();
const SPURIOUS_VECTOR: u8 = 0xff;
/// Wakes idle CPUs to look for work (the stress, a test's AP job).
pub const WAKE_VECTOR: u8 = 0xf1;
/// APIC IDs of the CPUs the MADT lists as enabled (read under the boot map:
/// the ACPI tables are not RAM, so the direct map does not cover them).
static CPU_APIC_IDS: spin::Once<([u32; shootdown::MAX_CPUS], usize)> = spin::Once::new();

/// Sends `vector` to every other CPU.
pub fn send_ipi_to_others(vector: u8) {
    if let Some(apic) = APIC.get() {
        if let Err(e) = apic.send_ipi_all_but_self(vector) {
            panic!("IPI {vector:#x} to the other CPUs: {e:?}");
        }
    }
}

/// Acknowledges the interrupt being handled.
pub fn end_of_interrupt() {
    if let Some(apic) = APIC.get() {
        apic.eoi();
    }
}

fn spurious_interrupt(_frame: &mut bare::idt::Frame) {}

fn wake_interrupt(_frame: &mut bare::idt::Frame) {
    end_of_interrupt();
}

/// Entered from `bare::boot` with either entry's boot information:
/// `protocol` (a raw [`BootProtocol`]) says which, PVH (plain QEMU) or the
/// Linux 64-bit boot protocol (TD firmware).
#[no_mangle]
extern "C" fn bare_main(boot_info: u64, protocol: u64) -> ! {
    // In a TD (strict mode) even the console's port I/O raises #VE, and in
    // an SNP guest every CPUID, port and MSR access is a #VC: the handlers
    // go in first (nothing before `idt::load` may raise either: a triple
    // fault), then the CPUID leaf that names the TDX module (no #VE in a
    // TD; a #VC that the GHCB MSR protocol answers in an SNP guest), then
    // SNP's detection, which sets up the GHCBs the console needs.
    faults::install();
    bare::idt::load();
    let tdcall = td::enter_if_td();
    let snp = tdcall.is_none() && snp::enter_if_snp();
    let protocol = match BootProtocol::from_raw(protocol) {
        Ok(protocol) => protocol,
        Err(e) => panic!("entered by unknown boot code: {e:?}"),
    };
    println!(
        "guest: booted ({}), boot information at {boot_info:#x}",
        protocol.name()
    );
    if let Some(tdcall) = tdcall {
        let info = match tdx_hypercall::vp_info(tdcall) {
            Ok(info) => info,
            Err(e) => panic!("TDG.VP.INFO: {e}"),
        };
        println!("guest: running as a TD, GPAW {}", info.gpaw);
        println!(
            "guest: TD vCPU {} of {} (at most {})",
            info.vcpu_index, info.num_vcpus, info.max_vcpus
        );
    }
    if let Some(bit) = snp.then(snp::c_bit).flatten() {
        println!("guest: running as an SEV-SNP guest, C-bit {bit}");
    }
    let info = match BootInfo::parse_for(protocol, &bare::bootinfo::IdentityMapped, boot_info) {
        Ok(info) => info,
        Err(e) => panic!("bad {} boot information: {e:?}", protocol.name()),
    };
    if info.regions_dropped > 0 {
        println!(
            "guest: memory map: {} entries past the first {} ignored",
            info.regions_dropped, info.region_count
        );
    }
    let mut ram = [RamRegion { start: 0, end: 0 }; 16];
    let mut count = 0;
    for region in info.ram().take(ram.len()) {
        ram[count] = RamRegion {
            start: region.start,
            end: region.end(),
        };
        count += 1;
    }
    let ram = &ram[..count];
    COMMAND_LINE.call_once(|| read_command_line(info.cmdline));
    STRESS_SETTINGS.call_once(|| stress::Settings::from_command_line(command_line()));
    let total: u64 = ram.iter().map(|r| r.end - r.start).sum();
    println!("guest: {} MiB of RAM in {} regions", total >> 20, ram.len());

    // The test area: the highest 2M-aligned blocks that are wholly RAM.
    let area_bytes = TEST_AREA_BLOCKS * (2 << 20);
    let largest = ram.iter().max_by_key(|r| r.end - r.start).expect("no RAM");
    let area_end = largest.end & !((2 << 20) - 1);
    let area_start = area_end - area_bytes;
    assert!(
        area_start >= largest.start,
        "RAM too small for the test area"
    );
    TEST_AREA.call_once(|| (area_start, area_end));
    if let Some(tdcall) = tdcall {
        // Before the frame allocator hands out (and zeroes) anything.
        let accepted = td::accept_boot_ram(tdcall, ram);
        println!(
            "guest: accepted {} pages of RAM ({} were accepted already)",
            accepted.accepted, accepted.already_accepted
        );
    }
    if snp {
        // Before the frame allocator hands out (and zeroes) anything.
        snp::validate_boot_ram(ram);
        let load = |c: &core::sync::atomic::AtomicU64| c.load(core::sync::atomic::Ordering::SeqCst);
        println!(
            "guest: validated RAM: {} 2M and {} 4K PVALIDATEs, {} 2M blocks retried at 4K, {} pages validated already",
            load(&snp::BOOT_PVALIDATE[1]),
            load(&snp::BOOT_PVALIDATE[0]),
            load(&snp::BOOT_SIZE_FALLBACKS),
            load(&snp::BOOT_ALREADY_VALIDATED)
        );
    }

    let (kernel_start, kernel_end) = memory::kernel_image();
    for region in ram {
        // Two exclusions: the kernel image, and the test area.
        let end = if region.start <= area_start && area_start < region.end {
            area_start
        } else {
            region.end
        };
        FRAMES.add_ram(region.start, end, kernel_start, kernel_end);
    }
    let madt = match bare::acpi::parse_madt(&bare::bootinfo::IdentityMapped, info.rsdp) {
        Ok(madt) => madt,
        Err(e) => panic!("ACPI: {e:?}"),
    };
    let (_, cpus) = CPU_APIC_IDS.call_once(|| {
        let mut ids = [0; shootdown::MAX_CPUS];
        let count = madt.enabled_apic_ids_into(&mut ids);
        (ids, count)
    });
    let ap_start = *AP_START.call_once(|| {
        if snp {
            return ApStartMethod::SnpApCreation;
        }
        if tdcall.is_none() {
            return ApStartMethod::InitSipi;
        }
        let mailbox = madt.wakeup_mailbox.map(|m| m.address);
        if let Some(page) = mailbox.filter(|page| page & 0xfff != 0) {
            panic!("the MADT's wakeup mailbox at {page:#x} is not 4 KiB-aligned");
        }
        ApStartMethod::WakeupMailbox { mailbox }
    });
    let platform = engine::GuestPlatform::for_this_machine();
    let cc = set_memory_enc::Platform::cc_mask(&platform);
    let root = match memory::build_tables(ram, cc, *cpus, ap_start) {
        Ok(root) => root,
        Err(e) => panic!("building page tables: {e:?}"),
    };
    // SAFETY: `root` is the new tables' (build_tables), changed by nothing
    // else yet; DIRECT_MAP reaches them at offset 0 until the switch.
    snp::share_ghcbs_in(&unsafe {
        coco_pagetable::PageTables::new(
            memory::DIRECT_MAP,
            root,
            coco_pagetable::PagingMode::FourLevel,
            cc,
        )
    });
    // SAFETY: `root` comes from build_tables, which maps the kernel image
    // (this code, the boot stack) identically.
    unsafe { memory::switch_to(root, cc) };
    engine::init(root, platform);
    println!(
        "guest: own page tables at {:#x}: direct map at {:#x}, {} frames used",
        root.0,
        memory::DIRECT_MAP_BASE,
        FRAMES.allocated()
    );
    let (stack, _, _) = memory::stack_tops(0);
    // SAFETY: the stack is mapped (build_tables), 16-byte aligned, unused,
    // and bsp_main never returns.
    unsafe { run_on_stack(stack, bsp_main) }
}

/// Continues on the boot CPU's own stack (which has a guard page).
extern "C" fn bsp_main() -> ! {
    let (_, double_fault_stack, nmi_stack) = memory::stack_tops(0);
    CPU_TABLES[0]
        .call_once(|| bare::gdt::CpuTables::new(double_fault_stack, nmi_stack))
        .load();
    if let Err(e) = bare::smp::init_bsp() {
        panic!("init_bsp: {e:?}");
    }
    bare::idt::set_handler(shootdown::SHOOTDOWN_VECTOR, shootdown::handle_ipi);
    bare::idt::set_handler(SPURIOUS_VECTOR, spurious_interrupt);
    bare::idt::set_handler(WAKE_VECTOR, wake_interrupt);
    bare::idt::load();
    let apic = if confidential() {
        // A TD or an SNP guest has no 8259s to mask and no xAPIC page:
        // x2APIC or nothing.
        Apic::x2apic_only()
    } else {
        // SAFETY: ports 0x21/0xa1 mask the 8259s: legacy IRQs stay off.
        unsafe {
            bare::cpu::outb(0x21, 0xff);
            bare::cpu::outb(0xa1, 0xff);
        }
        // SAFETY: build_tables identity-maps the APIC page uncached.
        unsafe { Apic::new(memory::LAPIC_BASE as usize, true) }
    };
    let apic = match apic {
        Ok(apic) => APIC.call_once(|| apic),
        Err(e) => panic!("APIC: {e:?}"),
    };
    if let Err(e) = apic.enable_on_this_cpu(SPURIOUS_VECTOR) {
        panic!("APIC enable: {e:?}");
    }
    shootdown::cpu_online(0);
    // The boot CPU counts as online, so a shootdown started on another CPU
    // waits for its acknowledgement, which its IPI handler gives: it must
    // take interrupts from now on (with them off, a conversion on an AP
    // hung the machine; test conversion_started_on_an_ap_completes).
    bare::cpu::enable_interrupts();
    let (apic_ids, cpus) = CPU_APIC_IDS.get().expect("read at boot");
    let apic_ids = &apic_ids[..*cpus];
    let started = match *AP_START.get().expect("chosen at boot") {
        ApStartMethod::InitSipi => start_aps_with_init_sipi(apic, apic_ids),
        ApStartMethod::WakeupMailbox { mailbox } => start_aps_with_mailbox(apic, apic_ids, mailbox),
        ApStartMethod::SnpApCreation => {
            snp::start_aps(apic.id(), apic_ids, ap_main, TD_AP_TIMEOUT_US)
        }
    };
    let online = match started {
        Ok(online) => online,
        Err(e) => panic!("starting APs: {e:?}"),
    };
    let all_taking_shootdowns =
        wait_until(1_000_000, || shootdown::online_count() as usize == online);
    assert!(all_taking_shootdowns, "APs did not get ready");
    println!("guest: {} CPU(s) online", shootdown::online_count());

    match command_line()
        .split_whitespace()
        .find_map(|arg| arg.strip_prefix("fault="))
    {
        None => {}
        Some("unmapped-read") => fault_unmapped_read(),
        Some("stack-overflow") => fault_stack_overflow(),
        Some(kind) if kind.starts_with("snp-") => finish(snp::send_bad_request(kind)),
        Some(other) => panic!("unknown fault= selector {other:?}"),
    }

    if let Some(kind) = command_line()
        .split_whitespace()
        .find_map(|arg| arg.strip_prefix("hostile="))
    {
        finish(hostile::run(kind));
    }
    if let Some(settings) = bench::Settings::from_command_line(command_line()) {
        finish(bench::run(online, settings));
    }
    trace_one_conversion();
    report::plan(tests::TESTS.len());
    for (name, test) in tests::TESTS {
        report::run(name, *test);
    }
    let stress_page = test_area().0 + (TEST_AREA_BLOCKS - 1) * (2 << 20);
    let settings = *STRESS_SETTINGS.get().expect("read at boot");
    let stress_ok = stress::run(online, stress_page, settings, || {
        send_ipi_to_others(WAKE_VECTOR)
    });
    // Last: it stops conversions for good.
    let concurrent_ok = concurrent::run(online, command_line(), || send_ipi_to_others(WAKE_VECTOR));
    finish(report::summary() && stress_ok && concurrent_ok)
}

/// Ends the run: the TDX or SNP counters line, then QEMU's exit status.
fn finish(ok: bool) -> ! {
    report_tdx_counters();
    report_snp_counters();
    bare::exit::qemu_exit(if ok {
        bare::exit::EXIT_SUCCESS
    } else {
        bare::exit::EXIT_FAILURE
    })
}

/// INIT-SIPI-SIPI through the real-mode trampoline (an ordinary VM).
fn start_aps_with_init_sipi(apic: &Apic, apic_ids: &[u32]) -> Result<usize, bare::smp::SmpError> {
    let config = bare::smp::ApStartConfig {
        trampoline_physical: memory::TRAMPOLINE_PAGE,
        trampoline_virtual: memory::phys_to_virt(memory::TRAMPOLINE_PAGE) as *mut u8,
        cr3: bare::cpu::read_cr3(),
        entry: ap_main,
        stack_top_for: &|cpu| memory::stack_tops(cpu).0,
        timeout_ms: bare::smp::DEFAULT_AP_TIMEOUT_MS,
    };
    // SAFETY: build_tables identity-maps the trampoline page (executable)
    // and the image, maps a stack slot per CPU of the MADT, and the root was
    // the first frame allocated (below 4 GiB); frames below 1 MiB are never
    // handed out, so the trampoline page is free.
    unsafe { bare::smp::start_aps(apic, apic_ids, &config) }
}

/// The ACPI wakeup mailbox (a TD): no INIT, no real mode, no PIT.
fn start_aps_with_mailbox(
    apic: &Apic,
    apic_ids: &[u32],
    mailbox: Option<u64>,
) -> Result<usize, bare::smp::SmpError> {
    let bsp_apic_id = apic.id();
    if apic_ids.iter().all(|&id| id == bsp_apic_id) {
        return Ok(1);
    }
    let Some(mailbox) = mailbox else {
        panic!("a TD starts its APs through the MADT's wakeup mailbox, and the MADT has none");
    };
    // SAFETY: build_tables identity-maps the mailbox page (4 KiB-aligned,
    // checked at boot) writable for the whole run, and only this code
    // posts commands to it.
    let mailbox = unsafe { bare::mpwakeup::Mailbox::at(mailbox as usize) };
    let config = bare::mpwakeup::WakeupConfig {
        cr3: bare::cpu::read_cr3(),
        entry: ap_main,
        stack_top_for: &|cpu| memory::stack_tops(cpu).0,
        timeout_us: TD_AP_TIMEOUT_US,
    };
    // SAFETY: the kernel is linked and loaded at the same addresses below
    // 4 GiB and build_tables identity-maps it (so the firmware's identity
    // map and ours agree on the wakeup vector, the parameter block, the
    // early stack, the IDT and its handlers); it maps a stack slot per CPU of
    // the MADT; the IDT is loaded with the #VE handler in place.
    unsafe { bare::mpwakeup::start_aps(mailbox, bsp_apic_id, apic_ids, &config) }
}

/// In a TD, the totals of what this kernel asked of the TDX module (boot
/// acceptance and every conversion), in the emulator's `TDXEMU` names so
/// the two can be compared: a second `STRESS` line.
fn report_tdx_counters() {
    let Some(tdx) = engine::engine().platform().tdx() else {
        return;
    };
    let sent = tdx.counters();
    let boot = td::boot_accepts();
    let load = |counter: &core::sync::atomic::AtomicU64| {
        counter.load(core::sync::atomic::Ordering::SeqCst)
    };
    println!(
        "STRESS map_gpa_calls={} map_gpa_retries={} accept_4k={} accept_2m={} accept_1g={} accept_size_mismatch={} cache_flushed_pages={}",
        load(&sent.map_gpa_calls),
        load(&sent.map_gpa_retries),
        boot.accepted_4k + load(&sent.accepted[0]),
        boot.accepted_2m + load(&sent.accepted[1]),
        boot.accepted_1g + load(&sent.accepted[2]),
        boot.size_mismatch_fallbacks + load(&sent.size_fallbacks),
        load(&cacheflush::FLUSHED_PAGES),
    );
}

/// In an SNP guest, the totals of what this kernel asked of the
/// hypervisor and the CPU (boot and every conversion) in the emulator's
/// `SNPEMU` names: a `STRESS` line to compare with it.
fn report_snp_counters() {
    let Some(platform) = engine::engine().platform().snp() else {
        return;
    };
    let load = |c: &core::sync::atomic::AtomicU64| c.load(core::sync::atomic::Ordering::SeqCst);
    let sent = platform.counters();
    let psc_msr = load(&sent.psc_msr_calls);
    println!(
        "STRESS platform=snp ghcb_psc_calls={} msr_psc={} pvalidate_4k={} pvalidate_2m={} pvalidate_size_mismatch={} zeroed_pages={} vc_404={} vc_cpuid={} vc_ioio={} vc_msr={}",
        load(&sent.psc_calls) - psc_msr,
        psc_msr + load(&snp::BOOT_MSR_PSC),
        load(&sent.pvalidated[0]) + load(&snp::BOOT_PVALIDATE[0]),
        load(&sent.pvalidated[1]) + load(&snp::BOOT_PVALIDATE[1]),
        load(&sent.size_fallbacks) + load(&snp::BOOT_SIZE_FALLBACKS),
        load(&sent.zeroed_pages),
        load(&snp::VC_NOT_VALIDATED),
        load(&snp::VC_CPUID),
        load(&snp::VC_IOIO),
        load(&snp::VC_MSR),
    );
}

/// Shows the seven steps once, on a test-area page: a `TRACE` line as each
/// step starts and one when the conversion is done, each with the page's
/// entry (and, in a TD, the emulator's state of the page).
fn trace_one_conversion() {
    use set_memory_enc::Direction;
    let va =
        coco_pagetable::VirtAddr(memory::DIRECT_MAP_BASE + test_area().0 + 6 * (2 << 20) + 0x5000);
    println!("guest: one conversion, step by step (a 4K page inside a 2M leaf):");
    for direction in [Direction::ToShared, Direction::ToPrivate] {
        engine::TRACE.store(true, core::sync::atomic::Ordering::SeqCst);
        let result = engine::engine().convert(va, 1, direction);
        engine::TRACE.store(false, core::sync::atomic::Ordering::SeqCst);
        match result {
            Ok(stats) => engine::trace_entry(
                &format_args!("step=done result=ok splits={}", stats.splits),
                direction,
                va,
                1,
            ),
            Err(e) => println!("TRACE step=done result=failed: {e:?}"),
        }
    }
}

/// The PVH command line (`-append`), copied at boot while it is reachable.
static COMMAND_LINE: spin::Once<([u8; 256], usize)> = spin::Once::new();

fn read_command_line(pa: u64) -> ([u8; 256], usize) {
    let mut text = [0u8; 256];
    let mut len = 0;
    if pa != 0 {
        while len < text.len() {
            // SAFETY: before our tables are loaded the boot identity map
            // covers the low 4 GiB, where QEMU put the NUL-terminated line.
            let byte = unsafe { core::ptr::read_volatile((pa + len as u64) as *const u8) };
            if byte == 0 {
                break;
            }
            text[len] = byte;
            len += 1;
        }
    }
    (text, len)
}

fn command_line() -> &'static str {
    COMMAND_LINE
        .get()
        .and_then(|(text, len)| core::str::from_utf8(&text[..*len]).ok())
        .unwrap_or("")
}

/// Negative control for the harness: an unfixable kernel #PF.
fn fault_unmapped_read() -> ! {
    // SAFETY: deliberately unsound: 0xdead000 is not mapped, and the fault
    // handler must stop the machine with a report before anything else runs.
    let value = unsafe { core::ptr::read_volatile(0xdead000 as *const u64) };
    panic!("read unmapped memory and got {value:#x}");
}

/// Negative control for the harness: recursion until the guard page.
fn fault_stack_overflow() -> ! {
    fn recurse(depth: u64) -> u64 {
        // Unreachable base case: the guard page stops us long before.
        if depth == u64::MAX {
            return 0;
        }
        let mut frame = [depth; 64];
        frame[(depth % 64) as usize] = core::hint::black_box(depth);
        core::hint::black_box(&frame);
        recurse(depth + 1) + frame[3]
    }
    let depth = recurse(0);
    panic!("recursion returned at depth {depth}");
}

/// Each AP starts here (from `bare::smp::start_aps`), on its own stack.
extern "C" fn ap_main(cpu: usize) -> ! {
    // An SNP AP's first #VC needs its GHCB.
    snp::register_this_cpu();
    let (_, double_fault_stack, nmi_stack) = memory::stack_tops(cpu);
    CPU_TABLES[cpu]
        .call_once(|| bare::gdt::CpuTables::new(double_fault_stack, nmi_stack))
        .load();
    bare::idt::load();
    let apic = APIC.get().expect("set before the APs start");
    if let Err(e) = apic.enable_on_this_cpu(SPURIOUS_VECTOR) {
        panic!("APIC enable on CPU {cpu}: {e:?}");
    }
    shootdown::cpu_online(cpu);
    loop {
        // Check for work with interrupts off, then STI;HLT: a wake-up IPI
        // sent after the check stays pending and ends the HLT.
        bare::cpu::disable_interrupts();
        if stress::work_pending() {
            bare::cpu::enable_interrupts();
            stress::loader_loop();
        } else if concurrent::work_pending() {
            bare::cpu::enable_interrupts();
            concurrent::ap_part();
        } else if tests::ap_job_pending() {
            bare::cpu::enable_interrupts();
            tests::run_ap_job();
        } else {
            bare::cpu::enable_interrupts_and_halt();
        }
    }
}

static CPU_TABLES: [spin::Once<bare::gdt::CpuTables>; shootdown::MAX_CPUS] =
    [const { spin::Once::new() }; shootdown::MAX_CPUS];

/// Switches to `stack` and calls `entry`.
///
/// # Safety
/// `stack` must be the top of a mapped, unused, 16-byte aligned stack.
unsafe fn run_on_stack(stack: u64, entry: extern "C" fn() -> !) -> ! {
    // SAFETY: the caller guarantees the stack; `entry` never returns, so
    // nothing on the old stack is needed again.
    unsafe {
        core::arch::asm!("mov rsp, {stack}", "xor ebp, ebp", "call {entry}", stack = in(reg) stack, entry = in(reg) entry, options(noreturn))
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    bare::serial::print_unlocked(format_args!("\nPANIC: {info}\n"));
    td::report_fatal(td::fatal_code::PANIC);
    bare::exit::qemu_exit(bare::exit::EXIT_FAILURE)
}
