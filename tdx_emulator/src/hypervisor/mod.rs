//! The emulator on the machine: boot, load the TD's kernel as TD firmware
//! would, and start one vCPU per CPU.

mod clock;
mod devices;
mod fwcfg;
mod memory;
mod svm;
mod vapic;
mod vcpu;

use bare::apic::Apic;
use bare::bootinfo::BootInfo;
use bare::println;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use memory::{TdMemory, FRAMES, MAX_TD_BYTES, PAGE_STATES};
use tdx_emulator::bzimage::{self, BzImage, E820Entry, KernelFormat};
use tdx_emulator::firmware;
use tdx_emulator::model::{exit_reason, Counters, Options, PageState, TdModel};
use tdx_emulator::snp_exits::VmsaState;
use tdx_emulator::snp_model::{RmpState, SnpCounters, SnpModel, SnpOptions};

/// Host-physical address of the TD's guest-physical 0.
const TD_BASE: u64 = 512 << 20;
/// TDX GPAW: shared bit 47.
const GPAW: u8 = 48;
/// The fw_cfg file that carries the TD's initramfs.
const INITRD_FILE: &str = "opt/tdx-emulator/initrd";

static COUNTERS: Counters = Counters::new();
static SNP_COUNTERS: SnpCounters = SnpCounters::new();
/// The SNP model, in SNP mode only (option `snp`).
static SNP: spin::Once<SnpModel<'static>> = spin::Once::new();
/// AP creation's hand-over: the state a VMGEXIT AP_CREATE gave each vCPU,
/// taken by the emulator CPU that runs it.
static AP_VMSA: [spin::Mutex<Option<VmsaState>>; vcpu::MAX_VCPUS] =
    [const { spin::Mutex::new(None) }; vcpu::MAX_VCPUS];
static AP_STARTED: [core::sync::atomic::AtomicBool; vcpu::MAX_VCPUS] =
    [const { core::sync::atomic::AtomicBool::new(false) }; vcpu::MAX_VCPUS];
static TD: spin::Once<TdModel<'static>> = spin::Once::new();
static MEMORY: spin::Once<TdMemory> = spin::Once::new();
static APIC: spin::Once<Apic> = spin::Once::new();
static CPU_TABLES: [spin::Once<bare::gdt::CpuTables>; vcpu::MAX_VCPUS] =
    [const { spin::Once::new() }; vcpu::MAX_VCPUS];
/// vCPUs of the TD (= emulator CPUs online).
pub static TD_VCPUS: AtomicUsize = AtomicUsize::new(1);
static IOPM: AtomicU64 = AtomicU64::new(0);
static MSRPM: AtomicU64 = AtomicU64::new(0);
/// This machine's APIC timer interrupt: ends guest mode or a HLT when a
/// vCPU's timer deadline comes.
pub const TIMER_VECTOR: u8 = 0xf3;

/// Where the firmware structures live in the TD: all in `[0xe0000,
/// 0x100000)`, which the memory map lists as ACPI NVS, so Linux maps it
/// private (arch/x86/mm/ioremap.c: NVS is IORES_DESC_ACPI_NV_STORAGE) and
/// never allocates from it.
#[derive(Clone, Copy)]
pub struct FirmwareLayout {
    /// RSDP, XSDT, MADT, FADT, DSDT (two pages).
    pub acpi: u64,
    pub mailbox: u64,
    /// The Linux boot_params ("zero page").
    pub boot_params: u64,
    pub command_line: u64,
    /// Two GDTs: the boot vCPU's (code 0x10, data 0x18, as the Linux 64-bit
    /// boot protocol requires) and the mailbox APs' (code 0x08, data 0x10).
    pub boot_gdt: u64,
    pub ap_gdt: u64,
    /// Identity map of the low 4 GiB (PML4, PDPT, four directories).
    pub ap_tables: u64,
}

const LAYOUT: FirmwareLayout = FirmwareLayout {
    acpi: 0xe_0000,
    mailbox: 0xe_2000,
    boot_params: 0xe_3000,
    command_line: 0xe_4000,
    boot_gdt: 0xe_5000,
    ap_gdt: 0xe_5040,
    ap_tables: 0xe_6000,
};
const FIRMWARE_START: u64 = 0xe_0000;
const FIRMWARE_END: u64 = 0x10_0000;
const ACPI_BYTES: usize = 2 * 4096;
const COMMAND_LINE_BYTES: usize = 4096;

pub fn firmware_layout() -> FirmwareLayout {
    LAYOUT
}

/// The SNP model, if the guest is an SNP guest.
pub fn snp() -> Option<&'static SnpModel<'static>> {
    SNP.get()
}

/// Hands vCPU `apic_id` the state AP creation read from its VMSA; false
/// if there is no such vCPU, it is this one, or it runs already.
pub fn post_vmsa(apic_id: u64, me: usize, state: VmsaState) -> bool {
    let Ok(vcpu) = usize::try_from(apic_id) else {
        return false;
    };
    if vcpu >= TD_VCPUS.load(Ordering::SeqCst)
        || vcpu == me
        || vcpu == 0
        || AP_STARTED[vcpu].swap(true, Ordering::SeqCst)
    {
        return false;
    }
    *AP_VMSA[vcpu].lock() = Some(state);
    true
}

pub fn td() -> &'static TdModel<'static> {
    TD.get().expect("TD set up before vCPUs run")
}

extern "C" {
    static __kernel_end: u8;
}

/// Refuses the emulator's input with one line and QEMU status 37.
fn refuse(what: &str, why: impl core::fmt::Display) -> ! {
    println!("emulator: error: {what}: {why}");
    bare::exit::qemu_exit(bare::exit::EXIT_BAD_INPUT)
}

fn command_line(pa: u64) -> &'static str {
    if pa == 0 {
        return "";
    }
    let mut len = 0;
    // SAFETY: QEMU's NUL-terminated command line, identity-mapped; bounded.
    while len < 4096 && unsafe { core::ptr::read_volatile((pa + len) as *const u8) } != 0 {
        len += 1;
    }
    // SAFETY: the `len` bytes just scanned.
    let bytes = unsafe { core::slice::from_raw_parts(pa as *const u8, len as usize) };
    core::str::from_utf8(bytes).unwrap_or_else(|_| refuse("command line", "not UTF-8"))
}

/// Emulator options before the first `--` word, the kernel's command line
/// (every word) after it. With the word `snp` the guest is an SEV-SNP
/// guest, and only the SNP words and `memory=` apply.
fn parse_options(line: &'static str) -> (Options, Option<SnpOptions>, &'static str) {
    let (ours, kernel) = split_at_separator(line);
    let mut options = Options::default();
    let snp = ours.split_whitespace().any(|word| word == "snp");
    let mut snp_options = SnpOptions::default();
    for word in ours.split_whitespace() {
        if snp && word == "snp" {
            continue;
        }
        if snp && !word.starts_with("memory=") {
            if let Err(e) = snp_options.parse_word(word) {
                refuse("option", e);
            }
        } else if let Err(e) = options.parse_word(word) {
            refuse("option", e);
        }
    }
    (options, snp.then_some(snp_options), kernel.trim())
}

/// `line` before and after its first word `--` (all of it before if none).
fn split_at_separator(line: &str) -> (&str, &str) {
    let mut at = 0;
    for word in line.split(' ') {
        if word == "--" {
            return (&line[..at], &line[at + 2..]);
        }
        at += word.len() + 1;
    }
    (line, "")
}

/// What the TD boots.
struct Kernel {
    entry: u64,
    /// Guest-physical ranges the launch image occupies (accepted even when
    /// the rest of RAM starts pending).
    image: (u64, u64),
    bz: Option<BzImage<'static>>,
}

fn load_kernel(file: &'static [u8], memory: &TdMemory) -> Kernel {
    let what = "kernel file (-initrd)";
    match bzimage::detect(file).unwrap_or_else(|e| refuse(what, e)) {
        KernelFormat::BzImage => {
            let bz = BzImage::parse(file).unwrap_or_else(|e| refuse(what, e));
            bz.check_fits(memory.bytes)
                .unwrap_or_else(|e| refuse(what, e));
            let load = bz.load_address();
            memory.write(load, bz.payload());
            Kernel {
                entry: bz.entry_64(),
                image: (load, bz.kernel_end()),
                bz: Some(bz),
            }
        }
        KernelFormat::Elf => {
            let image = tdx_emulator::elf::parse(file).unwrap_or_else(|e| refuse(what, e));
            let (mut low, mut high) = (u64::MAX, 0);
            for segment in &image.segments[..image.segment_count] {
                let end = segment.paddr.saturating_add(segment.memory_size);
                if end > memory.bytes || segment.paddr < FIRMWARE_END {
                    refuse(what, "an ELF segment lies outside TD RAM above 1 MiB");
                }
                let bytes =
                    &file[segment.offset as usize..(segment.offset + segment.file_size) as usize];
                memory.write(segment.paddr, bytes);
                memory
                    .slice_mut(
                        segment.paddr + segment.file_size,
                        (segment.memory_size - segment.file_size) as usize,
                    )
                    .fill(0);
                low = low.min(segment.paddr);
                high = high.max(end);
            }
            Kernel {
                entry: image.entry,
                image: (low, high),
                bz: None,
            }
        }
    }
}

/// The TD's memory map: RAM below 640 KiB (Linux puts its real-mode
/// trampoline there, arch/x86/realmode/init.c), the firmware window as ACPI
/// NVS, RAM from 1 MiB to the end of TD memory.
fn memory_map(bytes: u64) -> [E820Entry; 3] {
    [
        E820Entry {
            addr: 0,
            size: 0xa_0000,
            kind: bzimage::E820_RAM,
        },
        E820Entry {
            addr: FIRMWARE_START,
            size: FIRMWARE_END - FIRMWARE_START,
            kind: bzimage::E820_NVS,
        },
        E820Entry {
            addr: FIRMWARE_END,
            size: bytes - FIRMWARE_END,
            kind: bzimage::E820_RAM,
        },
    ]
}

#[no_mangle]
extern "C" fn bare_main(start_info: u64) -> ! {
    println!("emulator: booted");
    let info = BootInfo::parse(&bare::bootinfo::IdentityMapped, start_info)
        .unwrap_or_else(|e| panic!("start info: {e:?}"));
    let (options, snp_options, kernel_line) = parse_options(command_line(info.cmdline));
    let (module, module_size) = info.first_module.unwrap_or_else(|| {
        refuse(
            "kernel file",
            "none given: pass the TD's kernel with -initrd",
        )
    });
    // SAFETY: QEMU loaded the module there; identity-mapped, not written.
    let kernel_file =
        unsafe { core::slice::from_raw_parts(module as *const u8, module_size as usize) };
    assert!(
        svm::supported(),
        "this CPU has no SVM with nested paging (use -cpu qemu64,+svm,+npt)"
    );
    let td_bytes = u64::from(options.memory_mib) << 20;
    assert!(
        td_bytes <= MAX_TD_BYTES,
        "memory option checked when parsed"
    );
    let td_ram = info
        .ram()
        .any(|r| r.start <= TD_BASE && TD_BASE + td_bytes <= r.end());
    if !td_ram {
        refuse(
            "memory",
            format_args!(
                "a TD of {} MiB needs host RAM at [{TD_BASE:#x}, {:#x}): give QEMU -m {}M or more",
                td_bytes >> 20,
                TD_BASE + td_bytes,
                (td_bytes >> 20) + 1024
            ),
        );
    }
    if module < TD_BASE + td_bytes && module + module_size > TD_BASE {
        refuse(
            "kernel file",
            "QEMU placed it inside TD memory: give QEMU more memory (-m)",
        );
    }
    let image_end = core::ptr::addr_of!(__kernel_end) as u64;
    FRAMES.set_range(image_end.max(2 << 20), TD_BASE.min(module));

    let madt = bare::acpi::parse_madt(&bare::bootinfo::IdentityMapped, info.rsdp)
        .unwrap_or_else(|e| panic!("ACPI: {e:?}"));
    let mut apic_ids = [0u32; 256];
    let cpus = madt.enabled_apic_ids_into(&mut apic_ids);
    if cpus > vcpu::MAX_VCPUS {
        refuse(
            "vCPUs",
            format_args!("{cpus} CPUs (-smp), at most {} vCPUs", vcpu::MAX_VCPUS),
        );
    }

    if let Some(snp) = snp_options {
        // TCG walks the guest's tables with the L1 CPU's phys-bits: a C-bit
        // at or above them is a reserved bit, not an address bit.
        let phys_bits = (bare::cpu::cpuid(0x8000_0008, 0).eax & 0xff) as u8;
        if snp.c_bit >= phys_bits {
            refuse(
                "option",
                format_args!(
                    "c-bit={} needs QEMU phys-bits above it (this CPU has {phys_bits}: -cpu ...,phys-bits={})",
                    snp.c_bit,
                    snp.c_bit + 1
                ),
            );
        }
    }
    let memory = MEMORY.call_once(|| {
        let mut memory =
            TdMemory::new(TD_BASE, td_bytes, 1 << (GPAW - 1)).expect("no memory for nested tables");
        if let Some(snp) = snp_options {
            memory
                .enable_snp(1 << snp.c_bit)
                .expect("no memory for the ciphertext frame");
        }
        memory
    });
    let pages = (td_bytes / 4096) as usize;
    // The launch state of RAM, then of what the launch loads (the first
    // MiB, the image, the initramfs), which is accepted in a TD and
    // validated in an SNP guest (as SNP_LAUNCH_UPDATE leaves what it
    // measured).
    let launch = match snp_options {
        Some(snp_options) => {
            let snp =
                SNP.call_once(|| SnpModel::new(&PAGE_STATES[..pages], snp_options, &SNP_COUNTERS));
            // Assigned and unvalidated (`strict`) or shared (`lazy`).
            let rest = if snp_options.strict {
                RmpState::Unvalidated
            } else {
                RmpState::Shared
            };
            snp.initialise(0, td_bytes, rest, memory);
            Launch::Snp(snp)
        }
        None => {
            let td = TD.call_once(|| {
                TdModel::new(&PAGE_STATES[..pages], GPAW, cpus as u32, options, &COUNTERS)
            });
            // All of RAM accepted (as TD firmware leaves it for a kernel
            // without an EFI unaccepted-memory table), or pending but for
            // the launch image.
            let rest = if options.pending_ram {
                PageState::Pending
            } else {
                PageState::Private
            };
            td.initialise(0, td_bytes, rest, memory);
            Launch::Td(td)
        }
    };
    launch.loaded(0, FIRMWARE_END, memory);
    let kernel = load_kernel(kernel_file, memory);
    launch.loaded(kernel.image.0, kernel.image.1, memory);
    let initrd = load_initrd(kernel.bz.as_ref(), kernel.image.1, memory);
    if let Some((start, size)) = initrd {
        launch.loaded(start, start + size, memory);
    }
    // An SNP guest's boot map has the C-bit in every entry.
    build_firmware(
        memory,
        cpus,
        kernel_line,
        kernel.bz.as_ref(),
        initrd,
        memory.c_bit,
    );
    let format = if kernel.bz.is_some() {
        "bzImage"
    } else {
        "ELF"
    };
    match snp_options {
        Some(snp) => println!(
            "emulator: SNP guest of {} MiB, C-bit {}, {cpus} vCPU(s), RAM {}, RMP-violation policy {:?}{}{}{}; entry {:#x}, {format} kernel of {} KiB, command line {kernel_line:?}",
            td_bytes >> 20,
            snp.c_bit,
            if snp.strict { "unvalidated" } else { "shared" },
            snp.policy,
            match snp.psc_pages_per_call {
                0 => "",
                _ => ", PSC partial progress",
            },
            if snp.psc_lie { ", PSC lies" } else { "" },
            if snp.refuse_2m_pvalidate { ", 2M PVALIDATE refused" } else { "" },
            kernel.entry,
            module_size >> 10,
        ),
        None => println!(
            "emulator: TD of {} MiB, GPAW {GPAW}, {cpus} vCPU(s), RAM {}, wrong-state policy {:?}{}{}; entry {:#x}, {format} kernel of {} KiB, initramfs {} KiB, command line {kernel_line:?}",
            td_bytes >> 20,
            if options.pending_ram { "pending" } else { "accepted" },
            options.wrong_state,
            if options.map_gpa_retry_every_page { ", MapGPA RETRY every page" } else { "" },
            if options.refuse_large_accept { ", 2M/1G ACCEPT refused" } else { "" },
            kernel.entry,
            module_size >> 10,
            initrd.map_or(0, |(_, size)| size >> 10),
        ),
    }
    build_permission_maps();
    start_vcpus(memory, &apic_ids[..cpus], kernel.entry)
}

/// Which model keeps the guest's page states.
#[derive(Clone, Copy)]
enum Launch {
    Td(&'static TdModel<'static>),
    Snp(&'static SnpModel<'static>),
}

impl Launch {
    /// `[start, end)` holds what the launch loaded: accepted, or validated.
    fn loaded(self, start: u64, end: u64, memory: &TdMemory) {
        match self {
            Launch::Td(td) => td.initialise(start, end, PageState::Private, memory),
            Launch::Snp(snp) => snp.initialise(start, end, RmpState::Validated, memory),
        }
    }
}

fn start_vcpus(memory: &'static TdMemory, apic_ids: &[u32], entry: u64) -> ! {
    start_cpus(apic_ids);
    clock::calibrate(APIC.get().expect("APIC set up by start_cpus"));
    println!(
        "emulator: TSC {} MHz, APIC timer {} MHz",
        clock::tsc_hz() / 1_000_000,
        clock::apic_timer_hz() / 1_000_000
    );
    bare::cpu::enable_interrupts();
    vcpu::run(
        0,
        memory,
        vcpu::Start::Boot64 {
            entry,
            boot_params: LAYOUT.boot_params,
        },
    )
}

/// The initramfs from fw_cfg, placed where the boot protocol allows.
fn load_initrd(bz: Option<&BzImage>, kernel_end: u64, memory: &TdMemory) -> Option<(u64, u64)> {
    let file = fwcfg::find(INITRD_FILE)?;
    let size = u64::from(file.size);
    let gpa = bzimage::place_initrd(bz, memory.bytes, kernel_end, size)
        .unwrap_or_else(|e| refuse(INITRD_FILE, e));
    // SAFETY: `[gpa, gpa + size)` is TD memory (place_initrd keeps it below
    // memory.bytes), identity-mapped, and no vCPU runs yet.
    unsafe { fwcfg::read_to(file, memory.base + gpa) }.unwrap_or_else(|e| refuse(INITRD_FILE, e));
    Some((gpa, size))
}

fn build_firmware(
    memory: &TdMemory,
    vcpus: usize,
    kernel_line: &str,
    bz: Option<&BzImage>,
    initrd: Option<(u64, u64)>,
    c_bit: u64,
) {
    let layout = firmware_layout();
    let ids: [u32; vcpu::MAX_VCPUS] = core::array::from_fn(|i| i as u32);
    let acpi = firmware::build_acpi(
        memory.slice_mut(layout.acpi, ACPI_BYTES),
        layout.acpi,
        &ids[..vcpus],
        layout.mailbox,
    )
    .expect("ACPI tables for 16 vCPUs fit two pages");
    let line = kernel_line.as_bytes();
    if line.len() >= COMMAND_LINE_BYTES {
        refuse("command line", "longer than 4095 bytes");
    }
    if let Some(bz) = bz {
        bz.check_cmdline(line)
            .unwrap_or_else(|e| refuse("command line", e));
    }
    memory.write(layout.command_line, line);
    memory.write(layout.command_line + line.len() as u64, &[0]);
    bzimage::build_boot_params(
        memory.slice_mut(layout.boot_params, 4096),
        bz,
        &memory_map(memory.bytes),
        layout.command_line,
        initrd,
        acpi.rsdp,
    )
    .unwrap_or_else(|e| refuse("command line", e));
    // APs woken through the mailbox, and the boot vCPU until it loads its
    // own, run on an identity map of the low 4 GiB (for an SNP guest with
    // the C-bit in every entry, as its firmware's map has it).
    let pml4 = layout.ap_tables;
    let pdpt = pml4 + 0x1000;
    let put = |gpa: u64, value: u64| memory.write(gpa, &value.to_le_bytes());
    put(pml4, pdpt | c_bit | 3);
    for gib in 0..4 {
        let directory = pdpt + 0x1000 * (gib + 1);
        put(pdpt + gib * 8, directory | c_bit | 3);
        for entry in 0..512 {
            put(
                directory + entry * 8,
                ((gib << 30) + (entry << 21)) | c_bit | 0x83,
            );
        }
    }
    const CODE64: u64 = 0x00af_9a00_0000_ffff;
    const DATA: u64 = 0x00cf_9200_0000_ffff;
    for (i, descriptor) in [0, 0, CODE64, DATA].iter().enumerate() {
        put(layout.boot_gdt + i as u64 * 8, *descriptor);
    }
    for (i, descriptor) in [0, CODE64, DATA, 0].iter().enumerate() {
        put(layout.ap_gdt + i as u64 * 8, *descriptor);
    }
}

/// Intercepts every port (port IO always #VEs in a TD) and every MSR but
/// those the TDX module leaves to the CPU and TCG implements as it would
/// (tdx_emulator::msr::passes_through).
fn build_permission_maps() {
    let iopm = FRAMES.allocate_contiguous(3).expect("IOPM");
    // SAFETY: the three frames just allocated, identity-mapped.
    unsafe { core::ptr::write_bytes(iopm as *mut u8, 0xff, 3 * 4096) };
    IOPM.store(iopm, Ordering::SeqCst);
    let msrpm = FRAMES.allocate_contiguous(2).expect("MSRPM");
    // SAFETY: the two frames just allocated, identity-mapped: every MSR
    // access intercepted, including those outside the bitmap's ranges.
    unsafe { core::ptr::write_bytes(msrpm as *mut u8, 0xff, 2 * 4096) };
    let pass = |msr: u32, write: bool| {
        let (base, index) = match msr {
            0..=0x1fff => (0, msr),
            0xc000_0000..=0xc000_1fff => (0x800, msr - 0xc000_0000),
            0xc001_0000..=0xc001_1fff => (0x1000, msr - 0xc001_0000),
            _ => return,
        };
        let byte = msrpm + base + u64::from(index) * 2 / 8;
        let bit = 1 << ((index * 2) % 8 + u32::from(write));
        // SAFETY: inside the two MSRPM frames just allocated.
        unsafe { *(byte as *mut u8) &= !bit };
    };
    for msr in (0..=0x1fffu32)
        .chain(0xc000_0000..=0xc000_1fff)
        .chain(0xc001_0000..=0xc001_1fff)
    {
        for write in [false, true] {
            if tdx_emulator::msr::passes_through(msr, write) {
                pass(msr, write);
            }
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
    // The timer only has to end guest mode or a HLT: the vCPU loop looks at
    // its deadline on the way back in.
    bare::idt::set_handler(TIMER_VECTOR, kick_interrupt);
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
    if snp().is_some() {
        // An SNP guest starts its APs through AP creation.
        loop {
            if let Some(state) = AP_VMSA[cpu].lock().take() {
                vcpu::run(cpu, memory, vcpu::Start::Vmsa(state));
            }
            core::hint::spin_loop();
        }
    }
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

/// One line the harness parses: `TDXEMU name=value ...`.
pub fn print_counters() {
    print_counters_tagged(None)
}

/// The counters line, with `snapshot=<tag>` first when a TD asked for it
/// through devices::SNAPSHOT_PORT.
pub fn print_counters_tagged(tag: Option<u32>) {
    let c = &COUNTERS;
    if snp().is_some() {
        let load = |a: &AtomicU64| a.load(Ordering::SeqCst);
        let tag = TagWord(tag);
        println!(
            "SNPEMU{tag}{} ipis={} nested_page_faults={} reflected_ud={} absent_device_accesses={}",
            SNP_COUNTERS.fields(),
            load(&c.ipis),
            load(&c.nested_page_faults),
            load(&vcpu::REFLECTED_UD),
            load(&devices::ABSENT_IO) + load(&devices::ABSENT_MMIO),
        );
        return;
    }
    let load = |a: &AtomicU64| a.load(Ordering::SeqCst);
    let ve = |reason| c.ve(reason);
    let leaf = |n: usize| load(&c.tdcalls_by_leaf[n]);
    let counters: [(&str, u64); 37] = [
        ("ve_ept_violation", ve(exit_reason::EPT_VIOLATION)),
        ("ve_io", ve(exit_reason::IO)),
        ("ve_cpuid", ve(exit_reason::CPUID)),
        ("ve_rdmsr", ve(exit_reason::RDMSR)),
        ("ve_wrmsr", ve(exit_reason::WRMSR)),
        ("ve_hlt", ve(exit_reason::HLT)),
        ("ve_wbinvd", ve(exit_reason::WBINVD)),
        ("ve_invd", ve(exit_reason::INVD)),
        ("ve_cr_access", ve(exit_reason::CR_ACCESS)),
        ("ve_total", c.ve_by_reason.iter().map(load).sum()),
        ("double_faults", load(&c.double_faults)),
        ("tdcall_vmcall", leaf(0)),
        ("tdcall_vp_info", leaf(1)),
        ("tdcall_veinfo_get", leaf(3)),
        ("tdcall_accept", leaf(6)),
        ("tdcall_vm_rd", leaf(7)),
        ("tdcall_vm_wr", leaf(8)),
        ("tdcall_unmodelled", load(&c.tdcalls_unmodelled)),
        ("tdvmcall_unsupported", load(&c.tdvmcalls_unsupported)),
        ("map_gpa_calls", load(&c.map_gpa_calls)),
        ("map_gpa_retries", load(&c.map_gpa_retries)),
        ("pages_to_shared", load(&c.pages_to_shared)),
        ("pages_to_private", load(&c.pages_to_private)),
        ("accept_4k", load(&c.accepts[0])),
        ("accept_2m", load(&c.accepts[1])),
        ("accept_1g", load(&c.accepts[2])),
        ("accept_size_mismatch", load(&c.accept_size_mismatches)),
        ("accept_busy", load(&c.accept_busy)),
        ("wrong_state", load(&c.wrong_state_accesses)),
        ("quarantine_accesses", load(&c.quarantine_accesses)),
        ("implicit_conversions", load(&c.implicit_conversions)),
        ("mmio_faults", load(&c.mmio_faults)),
        ("spurious_faults", load(&c.spurious_faults)),
        ("reflected_ud", load(&vcpu::REFLECTED_UD)),
        ("ipis", load(&c.ipis)),
        ("nested_page_faults", load(&c.nested_page_faults)),
        (
            "absent_device_accesses",
            load(&devices::ABSENT_IO) + load(&devices::ABSENT_MMIO),
        ),
    ];
    match tag {
        Some(tag) => println!("TDXEMU snapshot={tag}{}", CounterLine(&counters)),
        None => println!("TDXEMU{}", CounterLine(&counters)),
    }
}

/// ` snapshot=<tag>` when there is one.
struct TagWord(Option<u32>);

impl core::fmt::Display for TagWord {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            Some(tag) => write!(f, " snapshot={tag}"),
            None => Ok(()),
        }
    }
}

struct CounterLine<'a>(&'a [(&'a str, u64)]);

impl core::fmt::Display for CounterLine<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        self.0
            .iter()
            .try_for_each(|(name, value)| write!(f, " {name}={value}"))
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    bare::serial::print_unlocked(format_args!("\nPANIC: emulator: {info}\n"));
    bare::exit::qemu_exit(bare::exit::EXIT_FAILURE)
}
