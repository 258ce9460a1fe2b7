//! Boot, memory, exceptions, SMP, then the tests, reported on the serial
//! console for the host harness.

mod engine;
mod faults;
mod memory;
pub mod report;
mod shootdown;
mod tests;
mod vmalloc;

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
    0
}

/// Sends `vector` to every other CPU.
pub fn send_ipi_to_others(_vector: u8) {}

/// Acknowledges the interrupt being handled.
pub fn end_of_interrupt() {}

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
    let platform = set_memory_enc::platform::NoCc;
    let cc = set_memory_enc::Platform::cc_mask(&platform);
    let root = match memory::build_tables(ram, cc, 1) {
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
    faults::install();
    bare::idt::set_handler(shootdown::SHOOTDOWN_VECTOR, shootdown::handle_ipi);
    bare::idt::load();
    shootdown::cpu_online(0);
    let root = pagetable::PhysAddr(bare::cpu::read_cr3() & !0xfff);
    engine::init(root, set_memory_enc::platform::NoCc);
    println!("guest: {} CPU(s) online", shootdown::online_count());

    report::plan(tests::TESTS.len());
    for (name, test) in tests::TESTS {
        report::run(name, *test);
    }
    let ok = report::summary();
    bare::exit::qemu_exit(if ok {
        bare::exit::EXIT_SUCCESS
    } else {
        bare::exit::EXIT_FAILURE
    })
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
