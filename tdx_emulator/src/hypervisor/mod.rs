//! The emulator on the machine: boot, set up the TD, start one vCPU per CPU.

mod memory;
mod svm;
mod vcpu;

use bare::apic::Apic;
use bare::bootinfo::BootInfo;
use bare::println;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use memory::{TdMemory, FRAMES, PAGE_STATES, TD_BYTES};
use tdx_emulator::firmware::{self, MemoryRange};
use tdx_emulator::model::{exit_reason, Counters, Options, PageState, TdModel};

/// Host-physical address of the TD's guest-physical 0.
const TD_BASE: u64 = 512 << 20;
/// TDX GPAW: shared bit 47.
const GPAW: u8 = 48;

static COUNTERS: Counters = Counters::new();
static TD: spin::Once<TdModel<'static>> = spin::Once::new();
static MEMORY: spin::Once<TdMemory> = spin::Once::new();
static APIC: spin::Once<Apic> = spin::Once::new();
static CPU_TABLES: [spin::Once<bare::gdt::CpuTables>; vcpu::MAX_VCPUS] =
    [const { spin::Once::new() }; vcpu::MAX_VCPUS];
/// vCPUs of the TD (= emulator CPUs online).
pub static TD_VCPUS: AtomicUsize = AtomicUsize::new(1);
static IOPM: AtomicU64 = AtomicU64::new(0);
static MSRPM: AtomicU64 = AtomicU64::new(0);

/// Where the firmware structures live in the TD (all in the reserved
/// `[0xe0000, 0x100000)` window of its memory map).
#[derive(Clone, Copy)]
pub struct FirmwareLayout {
    pub acpi: u64,
    pub mailbox: u64,
    pub start_info: u64,
    /// Identity map of the low 4 GiB for APs woken through the mailbox.
    pub ap_tables: u64,
    pub ap_gdt: u64,
}

const LAYOUT: FirmwareLayout = FirmwareLayout {
    acpi: 0xe_0000,
    mailbox: 0xe_1000,
    start_info: 0xe_2000,
    ap_tables: 0xe_3000,
    ap_gdt: 0xe_9000,
};

pub fn firmware_layout() -> FirmwareLayout {
    LAYOUT
}

pub fn td() -> &'static TdModel<'static> {
    TD.get().expect("TD set up before vCPUs run")
}

extern "C" {
    static __kernel_end: u8;
}

fn command_line(pa: u64) -> &'static str {
    if pa == 0 {
        return "";
    }
    let mut len = 0;
    // SAFETY: QEMU's NUL-terminated command line, identity-mapped; bounded.
    while len < 1024 && unsafe { core::ptr::read_volatile((pa + len) as *const u8) } != 0 {
        len += 1;
    }
    // SAFETY: the `len` bytes just scanned.
    let bytes = unsafe { core::slice::from_raw_parts(pa as *const u8, len as usize) };
    core::str::from_utf8(bytes).unwrap_or("")
}

/// Emulator options before `--`, the guest's command line after it.
fn parse_options(line: &'static str) -> (Options, &'static str) {
    let (ours, guest) = line.split_once("--").unwrap_or((line, ""));
    let mut options = Options::default();
    for word in ours.split_whitespace() {
        match word {
            "strict" => options.strict = true,
            "lazy" => options.strict = false,
            "mapgpa-retry-every-page" => options.map_gpa_retry_every_page = true,
            "refuse-large-accept" => options.refuse_large_accept = true,
            other => panic!("unknown emulator option {other:?}"),
        }
    }
    (options, guest.trim())
}

#[no_mangle]
extern "C" fn bare_main(start_info: u64) -> ! {
    println!("emulator: booted");
    let info = BootInfo::parse(&bare::bootinfo::IdentityMapped, start_info)
        .unwrap_or_else(|e| panic!("start info: {e:?}"));
    let (options, guest_line) = parse_options(command_line(info.cmdline));
    let (module, module_size) = info
        .first_module
        .expect("no guest kernel: pass it with -initrd");
    // SAFETY: QEMU loaded the module there; identity-mapped, not written.
    let guest_elf =
        unsafe { core::slice::from_raw_parts(module as *const u8, module_size as usize) };
    assert!(
        svm::supported(),
        "this CPU has no SVM with nested paging (use -cpu qemu64,+svm,+npt)"
    );
    let td_ram = info
        .ram()
        .any(|r| r.start <= TD_BASE && TD_BASE + TD_BYTES <= r.end());
    assert!(
        td_ram,
        "the TD needs RAM at [{TD_BASE:#x}, {:#x}): use -m 1G",
        TD_BASE + TD_BYTES
    );
    assert!(
        module >= TD_BASE + TD_BYTES || module + module_size <= TD_BASE,
        "the guest image overlaps TD memory"
    );
    let image_end = core::ptr::addr_of!(__kernel_end) as u64;
    FRAMES.set_range(image_end.max(2 << 20), TD_BASE.min(module));

    let madt = bare::acpi::parse_madt(&bare::bootinfo::IdentityMapped, info.rsdp)
        .unwrap_or_else(|e| panic!("ACPI: {e:?}"));
    let mut apic_ids = [0u32; vcpu::MAX_VCPUS];
    let cpus = madt
        .enabled_apic_ids_into(&mut apic_ids)
        .min(vcpu::MAX_VCPUS);

    let memory = MEMORY.call_once(|| {
        TdMemory::new(TD_BASE, 1 << (GPAW - 1)).expect("no memory for nested tables")
    });
    let td = TD.call_once(|| TdModel::new(&PAGE_STATES, GPAW, cpus as u32, options, &COUNTERS));
    let image = tdx_emulator::elf::parse(guest_elf).unwrap_or_else(|e| panic!("guest ELF: {e:?}"));

    // Launch image: the low 1 MiB (firmware) and the kernel's segments are
    // accepted; the rest of RAM is pending in strict mode.
    let rest = if options.strict {
        PageState::Pending
    } else {
        PageState::Private
    };
    td.initialise(0, TD_BYTES, rest, memory);
    td.initialise(0, 1 << 20, PageState::Private, memory);
    for segment in &image.segments[..image.segment_count] {
        td.initialise(
            segment.paddr,
            segment.paddr + segment.memory_size,
            PageState::Private,
            memory,
        );
        let bytes =
            &guest_elf[segment.offset as usize..(segment.offset + segment.file_size) as usize];
        memory.write(segment.paddr, bytes);
        let zeros = memory.slice_mut(
            segment.paddr + segment.file_size,
            (segment.memory_size - segment.file_size) as usize,
        );
        zeros.fill(0);
    }
    build_firmware(memory, cpus, guest_line);
    println!(
        "emulator: TD of {} MiB, GPAW {GPAW}, {cpus} vCPU(s), {} mode{}{}; guest entry {:#x}, command line {guest_line:?}",
        TD_BYTES >> 20,
        if options.strict { "strict" } else { "lazy" },
        if options.map_gpa_retry_every_page { ", MapGPA RETRY every page" } else { "" },
        if options.refuse_large_accept { ", 2M/1G ACCEPT refused" } else { "" },
        image.pvh_entry
    );
    build_permission_maps(options.strict);

    start_cpus(&apic_ids[..cpus]);
    bare::cpu::enable_interrupts();
    vcpu::run(
        0,
        memory,
        vcpu::Start::Pvh {
            entry: image.pvh_entry,
            start_info: firmware_layout().start_info,
        },
    )
}

fn build_firmware(memory: &TdMemory, vcpus: usize, guest_line: &str) {
    let layout = firmware_layout();
    let ids: [u32; vcpu::MAX_VCPUS] = core::array::from_fn(|i| i as u32);
    let rsdp = firmware::build_acpi(
        memory.slice_mut(layout.acpi, 4096),
        layout.acpi,
        &ids[..vcpus],
        layout.mailbox,
    )
    .expect("ACPI tables fit a page");
    let map = [
        MemoryRange {
            start: 0,
            length: 0xa_0000,
            kind: 1,
        },
        MemoryRange {
            start: 0xe_0000,
            length: 0x2_0000,
            kind: 2,
        },
        MemoryRange {
            start: 0x10_0000,
            length: TD_BYTES - 0x10_0000,
            kind: 1,
        },
    ];
    firmware::build_start_info(
        memory.slice_mut(layout.start_info, 4096),
        layout.start_info,
        &map,
        rsdp,
        guest_line.as_bytes(),
    )
    .expect("start info fits a page");
    // APs woken through the mailbox run on an identity map of the low 4 GiB.
    let pml4 = layout.ap_tables;
    let pdpt = pml4 + 0x1000;
    let put = |gpa: u64, value: u64| memory.write(gpa, &value.to_le_bytes());
    put(pml4, pdpt | 3);
    for gib in 0..4 {
        let directory = pdpt + 0x1000 * (gib + 1);
        put(pdpt + gib * 8, directory | 3);
        for entry in 0..512 {
            put(directory + entry * 8, ((gib << 30) + (entry << 21)) | 0x83);
        }
    }
    for (i, descriptor) in [0u64, 0x00af_9a00_0000_ffff, 0x00cf_9200_0000_ffff]
        .iter()
        .enumerate()
    {
        put(layout.ap_gdt + i as u64 * 8, *descriptor);
    }
}

/// MSRs a TD reaches natively even in strict mode (context-switched by the
/// TDX module, no #VE).
const NATIVE_MSRS: [u32; 13] = [
    0x10,
    0x174,
    0x175,
    0x176,
    0x277,
    0xc000_0080,
    0xc000_0081,
    0xc000_0082,
    0xc000_0083,
    0xc000_0084,
    0xc000_0100,
    0xc000_0101,
    0xc000_0102,
];

pub fn is_apic_msr(msr: u32) -> bool {
    msr == 0x1b || (0x800..=0x8ff).contains(&msr)
}

fn build_permission_maps(strict: bool) {
    // Every port is intercepted: lazy mode emulates, strict mode raises #VE.
    let iopm = FRAMES.allocate_contiguous(3).expect("IOPM");
    // SAFETY: the three frames just allocated, identity-mapped.
    unsafe { core::ptr::write_bytes(iopm as *mut u8, 0xff, 3 * 4096) };
    IOPM.store(iopm, Ordering::SeqCst);
    let msrpm = FRAMES.allocate_contiguous(2).expect("MSRPM");
    let intercept = |msr: u32| {
        let (base, index) = match msr {
            0..=0x1fff => (0, msr),
            0xc000_0000..=0xc000_1fff => (0x800, msr - 0xc000_0000),
            0xc001_0000..=0xc001_1fff => (0x1000, msr - 0xc001_0000),
            _ => return,
        };
        let byte = msrpm + base + u64::from(index) * 2 / 8;
        let bits = 0b11 << ((index * 2) % 8);
        // SAFETY: inside the two MSRPM frames just allocated.
        unsafe { *(byte as *mut u8) |= bits };
    };
    for msr in (0..=0x1fffu32)
        .chain(0xc000_0000..=0xc000_1fff)
        .chain(0xc001_0000..=0xc001_1fff)
    {
        if is_apic_msr(msr) || (strict && !NATIVE_MSRS.contains(&msr)) {
            intercept(msr);
        }
    }
    MSRPM.store(msrpm, Ordering::SeqCst);
}

pub fn io_permission_map() -> u64 {
    IOPM.load(Ordering::SeqCst)
}

pub fn msr_permission_map() -> u64 {
    MSRPM.load(Ordering::SeqCst)
}

/// Performs a port access on the real (QEMU) device.
///
/// # Safety
/// The port's device must be one the TD may drive.
pub unsafe fn port_io(port: u16, size: u8, write: bool, value: u32) -> Option<u32> {
    use core::arch::asm;
    // SAFETY: the caller vouches for the device; port IO does not touch memory.
    unsafe {
        match (write, size) {
            (true, 1) => {
                asm!("out dx, al", in("dx") port, in("al") value as u8, options(nomem, nostack))
            }
            (true, 2) => {
                asm!("out dx, ax", in("dx") port, in("ax") value as u16, options(nomem, nostack))
            }
            (true, _) => {
                asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack))
            }
            (false, 1) => {
                let v: u8;
                asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack));
                return Some(v.into());
            }
            (false, 2) => {
                let v: u16;
                asm!("in ax, dx", in("dx") port, out("ax") v, options(nomem, nostack));
                return Some(v.into());
            }
            (false, _) => {
                let v: u32;
                asm!("in eax, dx", in("dx") port, out("eax") v, options(nomem, nostack));
                return Some(v);
            }
        }
    }
    None
}

/// The TD's virtual x2APIC state.
static APIC_SVR: [AtomicU64; vcpu::MAX_VCPUS] = [const { AtomicU64::new(0xff) }; vcpu::MAX_VCPUS];
static APIC_TPR: [AtomicU64; vcpu::MAX_VCPUS] = [const { AtomicU64::new(0) }; vcpu::MAX_VCPUS];

/// What a write to an APIC MSR asks for.
pub enum ApicWrite {
    Done,
    Refused,
    /// Fixed interrupt `vector` to the vCPUs in `targets`.
    Ipi {
        targets: VcpuSet,
        vector: u8,
    },
}

/// A set of vCPUs.
#[derive(Clone, Copy)]
pub struct VcpuSet(u64);

impl VcpuSet {
    pub fn iter(self) -> impl Iterator<Item = usize> {
        (0..64).filter(move |i| self.0 & (1 << i) != 0)
    }
}

pub fn apic_read(vcpu: usize, msr: u32) -> Option<u64> {
    let bsp = if vcpu == 0 { 1 << 8 } else { 0 };
    match msr {
        0x1b => Some(0xfee0_0000 | (1 << 11) | (1 << 10) | bsp),
        0x802 => Some(vcpu as u64),
        0x803 => Some(0x5_0014),
        0x808 => Some(APIC_TPR[vcpu].load(Ordering::SeqCst)),
        0x80f => Some(APIC_SVR[vcpu].load(Ordering::SeqCst)),
        0x800..=0x8ff => Some(0),
        _ => None,
    }
}

pub fn apic_write(vcpu: usize, msr: u32, value: u64) -> ApicWrite {
    let vcpus = TD_VCPUS.load(Ordering::SeqCst);
    let all = if vcpus >= 64 {
        u64::MAX
    } else {
        (1u64 << vcpus) - 1
    };
    match msr {
        0x1b | 0x80b => ApicWrite::Done,
        0x808 => {
            APIC_TPR[vcpu].store(value & 0xff, Ordering::SeqCst);
            ApicWrite::Done
        }
        0x80f => {
            APIC_SVR[vcpu].store(value, Ordering::SeqCst);
            ApicWrite::Done
        }
        0x830 => {
            let vector = value as u8;
            let delivery = (value >> 8) & 7;
            if delivery != 0 || vector < 16 {
                // Only fixed interrupts: a TD starts APs through the mailbox.
                return ApicWrite::Refused;
            }
            let targets = match (value >> 18) & 3 {
                0 => {
                    let destination = value >> 32;
                    if destination >= vcpus as u64 {
                        return ApicWrite::Done;
                    }
                    1 << destination
                }
                1 => 1 << vcpu,
                2 => all,
                _ => all & !(1 << vcpu),
            };
            ApicWrite::Ipi {
                targets: VcpuSet(targets),
                vector,
            }
        }
        0x800..=0x8ff => ApicWrite::Done,
        _ => ApicWrite::Refused,
    }
}

/// Sends the emulator-internal kick to the CPU running `vcpu`.
pub fn send_kick(vcpu: usize) {
    if let (Some(apic), Some(apic_id)) = (APIC.get(), bare::smp::apic_id_of(vcpu)) {
        let _ = apic.send_ipi(apic_id, vcpu::KICK_VECTOR);
    }
}

fn kick_interrupt(_frame: &mut bare::idt::Frame) {
    if let Some(apic) = APIC.get() {
        apic.eoi();
    }
}

fn spurious_interrupt(_frame: &mut bare::idt::Frame) {}

fn emulator_fault(frame: &mut bare::idt::Frame) {
    bare::serial::print_unlocked(format_args!(
        "\nFATAL: emulator exception {} error {:#x} at RIP {:#x} CR2 {:#x}\n",
        frame.vector,
        frame.error_code,
        frame.rip,
        bare::cpu::read_cr2()
    ));
    bare::exit::qemu_exit(bare::exit::EXIT_FAILURE)
}

const SPURIOUS_VECTOR: u8 = 0xff;

fn load_cpu_tables(cpu: usize) {
    let stack = || FRAMES.allocate_contiguous(4).expect("IST stack") + 4 * 4096;
    CPU_TABLES[cpu]
        .call_once(|| bare::gdt::CpuTables::new(stack(), stack()))
        .load();
    bare::idt::load();
}

fn start_cpus(apic_ids: &[u32]) {
    bare::idt::set_default_handler(emulator_fault);
    bare::idt::set_handler(vcpu::KICK_VECTOR, kick_interrupt);
    bare::idt::set_handler(SPURIOUS_VECTOR, spurious_interrupt);
    load_cpu_tables(0);
    bare::smp::init_bsp().unwrap_or_else(|e| panic!("init_bsp: {e:?}"));
    // SAFETY: masking the 8259s keeps legacy IRQs off.
    unsafe {
        bare::cpu::outb(0x21, 0xff);
        bare::cpu::outb(0xa1, 0xff);
    }
    // SAFETY: the boot identity map covers the APIC page (QEMU maps it UC).
    let apic = APIC.call_once(|| {
        unsafe { Apic::new(0xfee0_0000, true) }.unwrap_or_else(|e| panic!("APIC: {e:?}"))
    });
    apic.enable_on_this_cpu(SPURIOUS_VECTOR)
        .unwrap_or_else(|e| panic!("APIC: {e:?}"));
    let config = bare::smp::ApStartConfig {
        trampoline_physical: bare::smp::DEFAULT_TRAMPOLINE_PHYSICAL,
        trampoline_virtual: bare::smp::DEFAULT_TRAMPOLINE_PHYSICAL as *mut u8,
        cr3: bare::cpu::read_cr3(),
        entry: emulator_ap_main,
        stack_top_for: &|_| FRAMES.allocate_contiguous(16).expect("AP stack") + 16 * 4096,
        timeout_ms: bare::smp::DEFAULT_AP_TIMEOUT_MS,
    };
    // SAFETY: the boot identity map (CR3, below 4 GiB) maps the trampoline
    // page, this image and the stacks; frames come from above 2 MiB, so the
    // trampoline page is free.
    let online = unsafe { bare::smp::start_aps(apic, apic_ids, &config) }
        .unwrap_or_else(|e| panic!("starting CPUs: {e:?}"));
    TD_VCPUS.store(online, Ordering::SeqCst);
}

/// Each emulator AP: wait for the TD to wake its vCPU through the mailbox,
/// then run it.
extern "C" fn emulator_ap_main(cpu: usize) -> ! {
    load_cpu_tables(cpu);
    if let Some(apic) = APIC.get() {
        apic.enable_on_this_cpu(SPURIOUS_VECTOR)
            .unwrap_or_else(|e| panic!("APIC: {e:?}"));
    }
    bare::cpu::enable_interrupts();
    let memory = MEMORY.get().expect("TD memory set up before the APs");
    let mailbox = memory.base + firmware_layout().mailbox;
    // SAFETY: the mailbox is TD memory, identity-mapped, naturally aligned;
    // the TD writes it concurrently, hence atomics.
    let (command, apic_id, vector) = unsafe {
        (
            core::sync::atomic::AtomicU16::from_ptr(mailbox as *mut u16),
            core::sync::atomic::AtomicU32::from_ptr((mailbox + 4) as *mut u32),
            AtomicU64::from_ptr((mailbox + 8) as *mut u64),
        )
    };
    loop {
        if command.load(Ordering::Acquire) == 1 && apic_id.load(Ordering::Acquire) as usize == cpu {
            let entry = vector.load(Ordering::Acquire);
            // The command is taken: the TD may wake the next AP.
            command.store(0, Ordering::Release);
            vcpu::run(cpu, memory, vcpu::Start::Mailbox { vector: entry });
        }
        core::hint::spin_loop();
    }
}

/// One line the harness parses.
pub fn print_counters() {
    let c = &COUNTERS;
    let load = |a: &AtomicU64| a.load(Ordering::SeqCst);
    println!(
        "TDXEMU ve_ept_violation={} ve_io={} ve_cpuid={} ve_rdmsr={} ve_wrmsr={} ve_hlt={} ve_wbinvd={} ve_invd={} double_faults={} tdcall_vmcall={} tdcall_vp_info={} tdcall_veinfo_get={} tdcall_accept={} map_gpa_calls={} map_gpa_retries={} pages_to_shared={} pages_to_private={} accept_4k={} accept_2m={} accept_1g={} accept_size_mismatch={} ipis={} nested_page_faults={}",
        c.ve(exit_reason::EPT_VIOLATION),
        c.ve(exit_reason::IO),
        c.ve(exit_reason::CPUID),
        c.ve(exit_reason::RDMSR),
        c.ve(exit_reason::WRMSR),
        c.ve(exit_reason::HLT),
        c.ve(exit_reason::WBINVD),
        c.ve(exit_reason::INVD),
        load(&c.double_faults),
        load(&c.tdcalls_by_leaf[0]),
        load(&c.tdcalls_by_leaf[1]),
        load(&c.tdcalls_by_leaf[3]),
        load(&c.tdcalls_by_leaf[6]),
        load(&c.map_gpa_calls),
        load(&c.map_gpa_retries),
        load(&c.pages_to_shared),
        load(&c.pages_to_private),
        load(&c.accepts[0]),
        load(&c.accepts[1]),
        load(&c.accepts[2]),
        load(&c.accept_size_mismatches),
        load(&c.ipis),
        load(&c.nested_page_faults),
    );
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    bare::serial::print_unlocked(format_args!("\nPANIC: emulator: {info}\n"));
    bare::exit::qemu_exit(bare::exit::EXIT_FAILURE)
}
