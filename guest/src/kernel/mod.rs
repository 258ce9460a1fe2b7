//! Boot, memory, exceptions, SMP, then the tests, reported on the serial
//! console for the host harness.

mod engine;
mod faults;
mod memory;
pub mod report;
mod shootdown;
mod stress;
mod tests;
mod vmalloc;

use bare::apic::Apic;
use bare::bootinfo::{BootInfo, PhysRead};
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

/// Reads the boot info through the identity map the PVH entry built.
struct IdentityMap;

impl PhysRead for IdentityMap {
    fn read_u32(&self, pa: u64) -> u32 {
        // SAFETY: only called before our tables are loaded, while the boot
        // identity map covers the low 4 GiB, for structures QEMU placed there.
        unsafe { core::ptr::read_unaligned(pa as *const u32) }
    }
    fn read_u64(&self, pa: u64) -> u64 {
        // SAFETY: as read_u32.
        unsafe { core::ptr::read_unaligned(pa as *const u64) }
    }
}

/// This CPU's index (0 = the boot CPU).
pub fn cpu_index() -> usize {
    bare::smp::cpu_index()
}

/// The local APIC driver, shared by all CPUs (set on the BSP before any AP
/// starts).
static APIC: spin::Once<Apic> = spin::Once::new();
const SPURIOUS_VECTOR: u8 = 0xff;
/// Wakes idle CPUs to look for work (the stress).
const WAKE_VECTOR: u8 = 0xf1;
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

#[no_mangle]
extern "C" fn bare_main(start_info: u64) -> ! {
    println!("guest: booted (PVH), start info at {start_info:#x}");
    let info = match BootInfo::parse(&IdentityMap, start_info) {
        Ok(info) => info,
        Err(e) => panic!("bad PVH start info: {e:?}"),
    };
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
    let madt = match bare::acpi::parse_madt(&IdentityMap, info.rsdp) {
        Ok(madt) => madt,
        Err(e) => panic!("ACPI: {e:?}"),
    };
    let (_, cpus) = CPU_APIC_IDS.call_once(|| {
        let mut ids = [0; shootdown::MAX_CPUS];
        let count = madt.enabled_apic_ids_into(&mut ids);
        (ids, count)
    });
    let platform = set_memory_enc::platform::NoCc;
    let cc = set_memory_enc::Platform::cc_mask(&platform);
    let root = match memory::build_tables(ram, cc, *cpus) {
        Ok(root) => root,
        Err(e) => panic!("building page tables: {e:?}"),
    };
    // SAFETY: `root` comes from build_tables, which maps the kernel image
    // (this code, the boot stack) identically.
    unsafe { memory::switch_to(root) };
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
    faults::install();
    bare::idt::set_handler(shootdown::SHOOTDOWN_VECTOR, shootdown::handle_ipi);
    bare::idt::set_handler(SPURIOUS_VECTOR, spurious_interrupt);
    bare::idt::set_handler(WAKE_VECTOR, wake_interrupt);
    bare::idt::load();
    // SAFETY: ports 0x21/0xa1 mask the 8259s: legacy IRQs stay off.
    unsafe {
        bare::cpu::outb(0x21, 0xff);
        bare::cpu::outb(0xa1, 0xff);
    }
    // SAFETY: build_tables identity-maps the APIC page uncached.
    let apic = match unsafe { Apic::new(memory::LAPIC_BASE as usize, true) } {
        Ok(apic) => APIC.call_once(|| apic),
        Err(e) => panic!("APIC: {e:?}"),
    };
    if let Err(e) = apic.enable_on_this_cpu(SPURIOUS_VECTOR) {
        panic!("APIC enable: {e:?}");
    }
    shootdown::cpu_online(0);
    let (apic_ids, cpus) = CPU_APIC_IDS.get().expect("read at boot");
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
    let online = match unsafe { bare::smp::start_aps(apic, &apic_ids[..*cpus], &config) } {
        Ok(online) => online,
        Err(e) => panic!("starting APs: {e:?}"),
    };
    let all_taking_shootdowns =
        bare::smp::wait_until(1_000_000, || shootdown::online_count() as usize == online);
    assert!(all_taking_shootdowns, "APs did not get ready");
    let root = pagetable::PhysAddr(bare::cpu::read_cr3() & !0xfff);
    engine::init(root, set_memory_enc::platform::NoCc);
    println!("guest: {} CPU(s) online", shootdown::online_count());

    match command_line()
        .split_whitespace()
        .find_map(|arg| arg.strip_prefix("fault="))
    {
        None => {}
        Some("unmapped-read") => fault_unmapped_read(),
        Some("stack-overflow") => fault_stack_overflow(),
        Some(other) => panic!("unknown fault= selector {other:?}"),
    }

    trace_one_conversion();
    report::plan(tests::TESTS.len());
    for (name, test) in tests::TESTS {
        report::run(name, *test);
    }
    let stress_page = test_area().0 + (TEST_AREA_BLOCKS - 1) * (2 << 20);
    let stress_ok = stress::run(online, stress_page, || send_ipi_to_others(WAKE_VECTOR));
    let ok = report::summary() && stress_ok;
    bare::exit::qemu_exit(if ok {
        bare::exit::EXIT_SUCCESS
    } else {
        bare::exit::EXIT_FAILURE
    })
}

/// Shows the seven steps once, on a test-area page.
fn trace_one_conversion() {
    let va = pagetable::VirtAddr(memory::DIRECT_MAP_BASE + test_area().0 + 6 * (2 << 20) + 0x5000);
    println!("guest: one conversion, step by step (a 4K page inside a 2M leaf):");
    engine::TRACE.store(true, core::sync::atomic::Ordering::SeqCst);
    let shared = engine::engine().set_memory_shared(va, 1);
    println!("  => {shared:?}");
    let private = engine::engine().set_memory_private(va, 1);
    println!("  => {private:?}");
    engine::TRACE.store(false, core::sync::atomic::Ordering::SeqCst);
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
    bare::exit::qemu_exit(bare::exit::EXIT_FAILURE)
}
