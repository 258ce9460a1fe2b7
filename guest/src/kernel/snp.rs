//! Running as an AMD SEV-SNP guest: detection, one GHCB per CPU, the #VC
//! handler, validating RAM at boot, starting APs through AP creation, and
//! what the `Snp` platform borrows from this kernel (the GHCB calls and a
//! per-CPU PVALIDATE window). Outside SNP nothing here does anything.
//!
//! Order at boot (the IDT with the #VC handler is loaded first): CPUID
//! says SEV, SEV_STATUS (never intercepted) says SNP, CPUID 0x8000_001F
//! gives the C-bit. Until a GHCB is registered a #VC can only be a CPUID,
//! which goes through the GHCB MSR protocol (as Linux's early handler
//! does); so the GHCBs come next, before anything prints: each is a page
//! of low RAM (which the frame allocator never hands out) that is
//! rescinded, made shared with an MSR-protocol page state change, mapped
//! C=0 (in the boot map by splitting its first 2M leaf, later in the direct
//! map) and registered by its CPU.
//!
//! Sources: AMD APM vol. 2 15.35-15.36; the GHCB specification as Linux
//! spells it (arch/x86/include/asm/sev-common.h, svm.h); Linux
//! arch/x86/coco/sev (the #VC handler, `snp_set_vmsa`, AP creation).

use super::cacheflush::Window;
use super::memory::{
    align_up, phys_to_virt, RamRegion, DIRECT_MAP, DIRECT_MAP_BASE, LOW_MEMORY_END,
};
use super::shootdown::MAX_CPUS;
use bare::idt::Frame;
use coco_pagetable::{
    CcMask, Level, PageTables, PagingMode, PhysAddr, TableAllocator, VirtAddr, PAGE_SIZE,
};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use set_memory_enc::platform::snp::WindowUnavailable;
use set_memory_enc::platform::PrivateWindow;
use snp_hypercall::ghcb::{exit_code, field, Ghcb};
use snp_hypercall::msr::{self, GhcbMsr, PageOp};
use snp_hypercall::psc::{GhcbPsc, PscDesc};
use snp_hypercall::pvalidate::{pvalidate, PageSize, PvalidateError, PvalidateInstruction};

const MSR_GHCB: u32 = 0xc001_0130;
const MSR_SEV_STATUS: u32 = 0xc001_0131;
const SEV_STATUS_SNP: u64 = 1 << 2;
/// CPU n's GHCB is the page at `GHCB_BASE + n * 4K`: low RAM, below
/// [`LOW_MEMORY_END`] and above what boot code uses.
pub const GHCB_BASE: u64 = 0x5_0000;
const _: () = assert!(GHCB_BASE + MAX_CPUS as u64 * PAGE_SIZE <= 0xa_0000);
/// SEV_FEATURES of every VMSA: SNP_ACTIVE.
const SEV_FEATURES: u64 = 1;

/// The C-bit position (0: not an SNP guest).
static C_BIT: AtomicU8 = AtomicU8::new(0);
/// CPUID 0x8000_001F EAX bit 10: caches coherent across keys.
static COHERENT: AtomicBool = AtomicBool::new(false);
static REGISTERED: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];

/// #VC taken, by error code: CPUID, IOIO, MSR, and 0x404 (a C=1 access to
/// an unvalidated page, which the non-present window never makes).
pub static VC_CPUID: AtomicU64 = AtomicU64::new(0);
pub static VC_IOIO: AtomicU64 = AtomicU64::new(0);
pub static VC_MSR: AtomicU64 = AtomicU64::new(0);
pub static VC_NOT_VALIDATED: AtomicU64 = AtomicU64::new(0);
/// What boot asked of the hypervisor and the CPU: PVALIDATEs at 4K and 2M
/// (the GHCBs' rescinds included), 2M ones retried at 4K, pages found
/// validated already (the launch image), MSR-protocol page state changes.
pub static BOOT_PVALIDATE: [AtomicU64; 2] = [const { AtomicU64::new(0) }; 2];
pub static BOOT_SIZE_FALLBACKS: AtomicU64 = AtomicU64::new(0);
pub static BOOT_ALREADY_VALIDATED: AtomicU64 = AtomicU64::new(0);
pub static BOOT_MSR_PSC: AtomicU64 = AtomicU64::new(0);

/// Whether this kernel runs as an SNP guest.
pub fn active() -> bool {
    C_BIT.load(Ordering::Relaxed) != 0
}

/// The C-bit position, in an SNP guest.
pub fn c_bit() -> Option<u8> {
    Some(C_BIT.load(Ordering::Relaxed)).filter(|&bit| bit != 0)
}

/// Whether the CPU keeps caches coherent across encryption keys.
pub fn coherent_caches() -> bool {
    COHERENT.load(Ordering::Relaxed)
}

/// VMGEXIT (`rep vmmcall`): the hypervisor reads and writes the GHCB (or
/// the GHCB MSR), hence no `nomem`.
fn vmgexit() {
    // SAFETY: in an SNP guest (callers check `active` or run the MSR
    // protocol only after CPUID said SEV) VMGEXIT hands control to the
    // hypervisor, which changes only the GHCB and the GHCB MSR.
    unsafe { core::arch::asm!(".byte 0xf3, 0x0f, 0x01, 0xd9", options(nostack)) }
}

/// This CPU's index, 0 before `bare::smp::init_bsp` (only the boot CPU
/// runs then, and its GS base is not set up yet).
fn this_cpu() -> usize {
    if bare::smp::online_cpus() == 0 {
        0
    } else {
        super::cpu_index()
    }
}

fn ghcb_gpa(cpu: usize) -> u64 {
    GHCB_BASE + cpu as u64 * PAGE_SIZE
}

/// The hypervisor interface of this kernel: the GHCB MSR protocol and this
/// CPU's GHCB page.
#[derive(Clone, Copy, Debug, Default)]
pub struct GuestGhcb;

impl GhcbMsr for GuestGhcb {
    fn exchange(&self, request: u64) -> u64 {
        bare::cpu::without_interrupts(|| {
            let cpu = this_cpu();
            // SAFETY: the GHCB MSR exists in an SNP guest (CPUID said SEV
            // before the first exchange); only this CPU, with interrupts
            // off, uses its value meanwhile.
            unsafe {
                bare::cpu::wrmsr(MSR_GHCB, request);
                vmgexit();
                let response = bare::cpu::rdmsr(MSR_GHCB);
                if REGISTERED[cpu].load(Ordering::Relaxed) {
                    bare::cpu::wrmsr(MSR_GHCB, ghcb_gpa(cpu));
                }
                response
            }
        })
    }
}

/// One NAE through this CPU's GHCB: `fill` sets the request (given the
/// GHCB's GPA), `read` takes the answer. Interrupts off throughout.
fn ghcb_call<R>(fill: impl FnOnce(&mut Ghcb, u64), read: impl FnOnce(&Ghcb) -> R) -> R {
    bare::cpu::without_interrupts(|| {
        let cpu = this_cpu();
        if !REGISTERED[cpu].load(Ordering::Relaxed) {
            // Nothing can be printed without a GHCB (the console is IO).
            msr::terminate(&GuestGhcb, 1, 0);
            bare::cpu::halt_forever();
        }
        let gpa = ghcb_gpa(cpu);
        let Some(page) = core::ptr::NonNull::new(phys_to_virt(gpa) as *mut [u64; 512]) else {
            bare::cpu::halt_forever();
        };
        // SAFETY: CPU `cpu`'s GHCB page, mapped shared at phys_to_virt (the
        // boot map's split leaf, later the direct map) for the whole run,
        // page-aligned; this kernel makes no Rust reference to it (only
        // Ghcb's volatile accesses), and only this CPU, with interrupts
        // off, uses it.
        let mut ghcb = unsafe { Ghcb::from_raw(page) };
        ghcb.begin();
        fill(&mut ghcb, gpa);
        core::sync::atomic::compiler_fence(Ordering::SeqCst);
        vmgexit();
        core::sync::atomic::compiler_fence(Ordering::SeqCst);
        read(&ghcb)
    })
}

impl GhcbPsc for GuestGhcb {
    fn page_state_change(&self, desc: &mut PscDesc) -> u64 {
        let sent = desc.clone();
        ghcb_call(
            |ghcb, gpa| {
                ghcb.set_exit(exit_code::PSC, 0, 0);
                ghcb.put_psc(&sent, gpa);
            },
            |ghcb| {
                ghcb.take_psc(desc);
                // Unanswered counts as an error: all ones.
                ghcb.get(field::SW_EXITINFO2).unwrap_or(u64::MAX)
            },
        )
    }
}

/// The PVALIDATE window: this CPU's private writable window
/// (`cacheflush::Window::map_for_validation`), with interrupts off while a
/// frame is mapped there.
#[derive(Clone, Copy, Debug, Default)]
pub struct ValidationWindow;

impl PrivateWindow for ValidationWindow {
    fn with_frame(
        &self,
        frame: PhysAddr,
        size: PageSize,
        f: &mut dyn FnMut(VirtAddr),
    ) -> Result<(), WindowUnavailable> {
        let level = match size {
            PageSize::Size4K => Level::Pt,
            PageSize::Size2M => Level::Pd,
        };
        let cc = cc_mask().ok_or(WindowUnavailable)?;
        bare::cpu::without_interrupts(|| {
            let window = Window::map_for_validation(super::cpu_index(), frame, level, cc)
                .map_err(|_| WindowUnavailable)?;
            bare::cpu::invlpg(window.address());
            f(VirtAddr(window.address()));
            // Dropping the window unmaps it and invalidates this CPU's entry.
            drop(window);
            Ok(())
        })
    }

    unsafe fn zero(&self, va: VirtAddr, bytes: u64) {
        // SAFETY: the caller's contract: `va` is the window, mapped
        // writable for `bytes`, used only by this CPU.
        unsafe { core::ptr::write_bytes(va.0 as *mut u8, 0, bytes as usize) }
    }
}

/// The C-bit as the engine's mask, in an SNP guest.
pub fn cc_mask() -> Option<CcMask> {
    CcMask::with_private_bit(u32::from(c_bit()?)).ok()
}

/// The platform of an SNP guest.
pub type SnpPlatform =
    set_memory_enc::platform::Snp<GuestGhcb, PvalidateInstruction, ValidationWindow>;

/// The `Snp` platform, in an SNP guest.
pub fn platform() -> Option<SnpPlatform> {
    let bit = c_bit()?;
    // SAFETY: this is an SNP guest (enter_if_snp) and the kernel runs at
    // CPL 0: PVALIDATE is defined.
    let instruction = unsafe { PvalidateInstruction::new() };
    match SnpPlatform::new(bit, GuestGhcb, instruction, ValidationWindow) {
        Ok(platform) => Some(platform.with_coherent_caches(coherent_caches())),
        Err(e) => panic!("SNP platform: {e:?}"),
    }
}

/// The one page table the boot map's first 2M leaf is split into, so the
/// GHCB pages can be mapped C=0 before the kernel's own tables exist.
#[repr(C, align(4096))]
struct BootSplitTable(UnsafeCell<[u64; 512]>);
// SAFETY: written only through the page-table code, once, by the boot CPU
// before any other CPU runs (`share_ghcbs_in_boot_map`).
unsafe impl Sync for BootSplitTable {}
static BOOT_SPLIT_TABLE: BootSplitTable = BootSplitTable(UnsafeCell::new([0; 512]));
static BOOT_SPLIT_TAKEN: AtomicBool = AtomicBool::new(false);

struct BootSplitAllocator;

// SAFETY: hands out BOOT_SPLIT_TABLE once: a zeroed, 4K-aligned page of
// the image (identity-mapped: its address is its physical address, which
// DIRECT_MAP reaches at offset 0 while the boot map is live), used by
// nothing else.
unsafe impl TableAllocator for BootSplitAllocator {
    fn allocate_table(&self) -> Option<PhysAddr> {
        (!BOOT_SPLIT_TAKEN.swap(true, Ordering::SeqCst))
            .then(|| PhysAddr(BOOT_SPLIT_TABLE.0.get() as u64))
    }
    unsafe fn free_table(&self, _frame: PhysAddr) {}
}

/// Detects an SNP guest and, in one, sets up every CPU's GHCB and
/// registers the boot CPU's. Runs right after the IDT is loaded, before
/// anything prints. False outside SNP (and in a TD, which the caller
/// checked first).
pub fn enter_if_snp() -> bool {
    if bare::cpu::cpuid(0x8000_0000, 0).eax < snp_hypercall::MEMORY_ENCRYPTION_CPUID_LEAF {
        return false;
    }
    let leaf = bare::cpu::cpuid(snp_hypercall::MEMORY_ENCRYPTION_CPUID_LEAF, 0);
    if leaf.eax & 0b10 == 0 {
        return false;
    }
    // SAFETY: CPUID says SEV, so SEV_STATUS exists (read-only, never
    // intercepted).
    let status = unsafe { bare::cpu::rdmsr(MSR_SEV_STATUS) };
    if status & 1 == 0 {
        // A CPU with SEV, and this VM not encrypted: an ordinary VM.
        return false;
    }
    if status & SEV_STATUS_SNP == 0 {
        // SEV or SEV-ES without SNP: not served (and with SEV-ES nothing
        // can be printed before a GHCB). GHCB spec: reason set 0, code 2,
        // SNP unsupported.
        msr::terminate(&GuestGhcb, 0, 2);
        bare::cpu::halt_forever();
    }
    let bit = match snp_hypercall::c_bit_from_cpuid(leaf.eax, leaf.ebx) {
        Ok(bit) => bit,
        Err(_) => {
            msr::terminate(&GuestGhcb, 0, 2);
            bare::cpu::halt_forever()
        }
    };
    let hypervisor_says = msr::sev_info(&GuestGhcb).map(|info| info.c_bit);
    let features = msr::hv_features(&GuestGhcb).unwrap_or(0);
    // The hypervisor must agree on the C-bit and offer SNP and AP creation.
    if hypervisor_says != Ok(bit) || features & 0b11 != 0b11 {
        msr::terminate(&GuestGhcb, 0, 1);
        bare::cpu::halt_forever();
    }
    COHERENT.store(leaf.eax & (1 << 10) != 0, Ordering::Relaxed);
    C_BIT.store(bit, Ordering::SeqCst);
    share_ghcbs_in_boot_map();
    register_ghcb_of(0);
    true
}

/// Makes every CPU's GHCB page shared (rescind, then the MSR-protocol page
/// state change, then a C=0 entry in the boot map) and zeroes it.
fn share_ghcbs_in_boot_map() {
    let cc = cc_mask().expect("called in an SNP guest");
    let root = bare::cpu::read_cr3() & 0x000f_ffff_ffff_f000 & !cc.all();
    // SAFETY: CR3 is bare::boot's static identity map, changed only here by
    // the boot CPU before any other runs; DIRECT_MAP reaches it at offset 0
    // (the boot map is live), and the split table comes from the image.
    let tables = unsafe { PageTables::new(DIRECT_MAP, PhysAddr(root), PagingMode::FourLevel, cc) };
    if tables
        .split_at(VirtAddr(GHCB_BASE), &BootSplitAllocator)
        .is_err()
    {
        msr::terminate(&GuestGhcb, 1, 0);
        bare::cpu::halt_forever();
    }
    // SAFETY: this is an SNP guest at CPL 0.
    let instruction = unsafe { PvalidateInstruction::new() };
    for cpu in 0..MAX_CPUS {
        let gpa = ghcb_gpa(cpu);
        // SAFETY: the boot map maps the page private (C=1) at VA == PA, and
        // nothing uses it (low RAM the kernel never allocates).
        let rescinded = unsafe { pvalidate(&instruction, gpa, PageSize::Size4K, false) };
        BOOT_PVALIDATE[0].fetch_add(1, Ordering::Relaxed);
        let shared = msr::page_state_change(&GuestGhcb, gpa >> 12, PageOp::Shared);
        BOOT_MSR_PSC.fetch_add(1, Ordering::Relaxed);
        let mapped = map_4k_leaf_shared(&tables, VirtAddr(gpa), cc);
        if rescinded.is_err() || shared.is_err() || !mapped {
            msr::terminate(&GuestGhcb, 1, 1);
            bare::cpu::halt_forever();
        }
        bare::cpu::invlpg(gpa);
        // SAFETY: the page is now shared and mapped C=0 at VA == PA; no one
        // else uses it.
        unsafe { core::ptr::write_bytes(gpa as *mut u8, 0, PAGE_SIZE as usize) };
    }
}

/// Makes the 4K leaf that maps `va` shared (C=0); false if there is none.
fn map_4k_leaf_shared(
    tables: &PageTables<super::memory::DirectMap>,
    va: VirtAddr,
    cc: CcMask,
) -> bool {
    tables
        .lookup_address(va)
        .ok()
        .filter(|leaf| leaf.level() == Level::Pt)
        .is_some_and(|leaf| {
            tables
                .update_leaf(&leaf, |entry| cc.make_shared(entry))
                .is_ok()
        })
}

/// Registers CPU `cpu`'s GHCB (MSR protocol) and puts its GPA in the MSR.
fn register_ghcb_of(cpu: usize) {
    let gpa = ghcb_gpa(cpu);
    if msr::register_ghcb(&GuestGhcb, gpa).is_err() {
        msr::terminate(&GuestGhcb, 1, 0);
        bare::cpu::halt_forever();
    }
    bare::cpu::without_interrupts(|| {
        // SAFETY: the GHCB MSR exists in an SNP guest; it now names this
        // CPU's registered, shared GHCB.
        unsafe { bare::cpu::wrmsr(MSR_GHCB, gpa) };
        REGISTERED[cpu].store(true, Ordering::SeqCst);
    });
}

/// First thing on each AP: its GHCB (before anything that could #VC).
pub fn register_this_cpu() {
    if active() {
        register_ghcb_of(super::cpu_index());
    }
}

/// The kernel's own tables map the GHCB pages C=0 in the direct map too
/// (its 4K leaves below 1 MiB), so that nothing reaches them C=1.
pub fn share_ghcbs_in(tables: &PageTables<super::memory::DirectMap>) {
    let Some(cc) = cc_mask() else {
        return;
    };
    for cpu in 0..MAX_CPUS {
        let va = VirtAddr(DIRECT_MAP_BASE + ghcb_gpa(cpu));
        if !map_4k_leaf_shared(tables, va, cc) {
            panic!(
                "the direct map has no 4K leaf for GHCB page {:#x}",
                ghcb_gpa(cpu)
            );
        }
    }
}

/// Validates every page of `ram` from 1 MiB up (PVALIDATE through the boot
/// map, 2M where a whole aligned block is RAM, 4K after a size mismatch
/// and at the edges). The launch image is validated already: PVALIDATE
/// says so (CF = 1), which at boot, and only here, is expected. Any other
/// failure stops the kernel: with RAM in an unknown state it cannot run.
pub fn validate_boot_ram(ram: &[RamRegion]) {
    // SAFETY: an SNP guest at CPL 0.
    let instruction = unsafe { PvalidateInstruction::new() };
    let one = |gpa: u64, size: PageSize| {
        // SAFETY: the boot map maps RAM (below 4 GiB) private at VA == PA;
        // nothing uses these pages before they are validated.
        let result = unsafe { pvalidate(&instruction, gpa, size, true) };
        let pages = size.bytes() / PAGE_SIZE;
        match result {
            Ok(()) => {
                BOOT_PVALIDATE[usize::from(size == PageSize::Size2M)]
                    .fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(PvalidateError::Unchanged) => {
                BOOT_ALREADY_VALIDATED.fetch_add(pages, Ordering::Relaxed);
                true
            }
            Err(PvalidateError::SizeMismatch) if size == PageSize::Size2M => false,
            Err(e) => panic!("PVALIDATE of RAM at {gpa:#x}: {e:?}"),
        }
    };
    let block = 2 << 20;
    for region in ram {
        let mut at = align_up(region.start.max(LOW_MEMORY_END), PAGE_SIZE);
        // The boot map covers the low 4 GiB, and so does the frame
        // allocator (memory::IDENTITY_MAPPED_END); the emulator offers less.
        let end = region.end.min(super::memory::IDENTITY_MAPPED_END) & !(PAGE_SIZE - 1);
        while at < end {
            if at.is_multiple_of(block) && end - at >= block {
                if !one(at, PageSize::Size2M) {
                    BOOT_SIZE_FALLBACKS.fetch_add(1, Ordering::Relaxed);
                    for page in 0..block / PAGE_SIZE {
                        one(at + page * PAGE_SIZE, PageSize::Size4K);
                    }
                }
                at += block;
            } else {
                one(at, PageSize::Size4K);
                at += PAGE_SIZE;
            }
        }
    }
}

/// The #VC handler (vector 29): CPUID, port IO, MSRs and WBINVD through the
/// GHCB (CPUID through the MSR protocol before one is registered); a C=1
/// access to an unvalidated page (0x404) is counted and fixed up only for
/// load_unaligned_zeropad; anything else is fatal.
pub fn handle_vc(frame: &mut Frame) {
    match frame.error_code {
        0x72 => vc_cpuid(frame),
        0x7b => vc_ioio(frame),
        0x7c => vc_msr(frame),
        0x89 => {
            ghcb_call(|g, _| g.set_exit(exit_code::WBINVD, 0, 0), |_| ());
            frame.rip += 2;
        }
        0x404 => {
            VC_NOT_VALIDATED.fetch_add(1, Ordering::SeqCst);
            // The faulting address is in CR2 (APM 15.36.10). The emulator
            // leaves 0 for an instruction it does not decode: a zeropad
            // load that crossed into the page met it at the next word.
            let address = match bare::cpu::read_cr2() {
                0 => (frame.rdi & !7).wrapping_add(8),
                address => address,
            };
            if address.is_multiple_of(PAGE_SIZE) && bare::extable::fixup_page_fault(frame, address)
            {
                return;
            }
            super::faults::fatal_vc(
                frame,
                "a C=1 access met a page that is not validated (#VC 0x404)",
            );
        }
        _ => super::faults::fatal_vc(frame, "a #VC this kernel does not handle"),
    }
}

fn vc_cpuid(frame: &mut Frame) {
    VC_CPUID.fetch_add(1, Ordering::Relaxed);
    let (leaf, subleaf) = (frame.rax as u32, frame.rcx as u32);
    let registered = REGISTERED[this_cpu()].load(Ordering::Relaxed);
    let answer = if registered {
        ghcb_call(
            |g, _| {
                g.set_exit(exit_code::CPUID, 0, 0);
                g.set(field::RAX, u64::from(leaf));
                g.set(field::RCX, u64::from(subleaf));
                g.set(field::XCR0, 1);
            },
            |g| {
                [field::RAX, field::RBX, field::RCX, field::RDX].map(|f| g.get(f).map(|v| v as u32))
            },
        )
    } else {
        // The MSR protocol has no sub-leaf: early CPUIDs are sub-leaf 0.
        [0u64, 1, 2, 3].map(|register| {
            let request = (u64::from(leaf) << 32) | (register << 30) | 0x004;
            let response = GuestGhcb.exchange(request);
            (response & 0xfff == 0x005).then_some((response >> 32) as u32)
        })
    };
    let [Some(a), Some(b), Some(c), Some(d)] = answer else {
        super::faults::fatal_vc(frame, "the hypervisor did not answer CPUID");
    };
    (frame.rax, frame.rbx, frame.rcx, frame.rdx) = (a.into(), b.into(), c.into(), d.into());
    frame.rip += 2;
}

fn vc_ioio(frame: &mut Frame) {
    VC_IOIO.fetch_add(1, Ordering::Relaxed);
    if frame.cs & 3 != 0 {
        super::faults::fatal_vc(frame, "#VC for IO outside the kernel");
    }
    // SAFETY: RIP is the kernel's own code (the #VC came from CPL 0, checked
    // above), mapped and readable; at most 3 bytes of the instruction are
    // read.
    let byte = |at: u64| unsafe { core::ptr::read_volatile((frame.rip + at) as *const u8) };
    let (prefix, opcode) = match byte(0) {
        0x66 => (1, byte(1)),
        other => (0, other),
    };
    let (port, length) = match opcode {
        0xe4..=0xe7 => (u16::from(byte(prefix + 1)), prefix + 2),
        0xec..=0xef => (frame.rdx as u16, prefix + 1),
        _ => super::faults::fatal_vc(
            frame,
            "#VC for an IO instruction this kernel does not decode",
        ),
    };
    let size: u64 = match (opcode & 1, prefix) {
        (0, _) => 1,
        (_, 1) => 2,
        _ => 4,
    };
    let is_in = matches!(opcode, 0xe4 | 0xe5 | 0xec | 0xed);
    let mask = (1u64 << (size * 8)) - 1;
    let info1 = (u64::from(port) << 16) | (size << 4) | u64::from(is_in);
    let value = frame.rax & mask;
    let read = ghcb_call(
        |g, _| {
            g.set_exit(exit_code::IOIO, info1, 0);
            g.set(field::RAX, value);
        },
        |g| g.get(field::RAX),
    );
    if is_in {
        let Some(read) = read else {
            super::faults::fatal_vc(frame, "the hypervisor did not answer an IN");
        };
        frame.rax = if size == 4 {
            read & mask
        } else {
            (frame.rax & !mask) | (read & mask)
        };
    }
    frame.rip += length;
}

fn vc_msr(frame: &mut Frame) {
    VC_MSR.fetch_add(1, Ordering::Relaxed);
    if frame.cs & 3 != 0 {
        super::faults::fatal_vc(frame, "#VC for an MSR access outside the kernel");
    }
    // SAFETY: as in vc_ioio (CPL 0 checked above): two bytes of the
    // kernel's own code.
    let opcode = unsafe { core::ptr::read_volatile((frame.rip + 1) as *const u8) };
    let write = match opcode {
        0x30 => true,
        0x32 => false,
        _ => super::faults::fatal_vc(
            frame,
            "#VC for an MSR instruction this kernel does not decode",
        ),
    };
    let msr = frame.rcx & 0xffff_ffff;
    let (status, rax, rdx) = ghcb_call(
        |g, _| {
            g.set_exit(exit_code::MSR, u64::from(write), 0);
            g.set(field::RCX, msr);
            if write {
                g.set(field::RAX, frame.rax & 0xffff_ffff);
                g.set(field::RDX, frame.rdx & 0xffff_ffff);
            }
        },
        |g| {
            (
                g.get(field::SW_EXITINFO1).unwrap_or(u64::MAX),
                g.get(field::RAX),
                g.get(field::RDX),
            )
        },
    );
    if status & 0xffff_ffff != 0 {
        super::faults::fatal_vc(frame, "the hypervisor refused an MSR access (#GP)");
    }
    if !write {
        let (Some(rax), Some(rdx)) = (rax, rdx) else {
            super::faults::fatal_vc(frame, "the hypervisor did not answer an RDMSR");
        };
        (frame.rax, frame.rdx) = (rax & 0xffff_ffff, rdx & 0xffff_ffff);
    }
    frame.rip += 2;
}

/// RMPADJUST (`F3 0F 01 FE`) of the 4K page at `va` with `attributes`;
/// EAX as the instruction returns it.
///
/// # Safety
/// An SNP guest at CPL 0; `va` maps a page this kernel owns, private.
unsafe fn rmpadjust(va: u64, attributes: u64) -> u32 {
    let rc: u64;
    // SAFETY: the caller's promise; RMPADJUST changes only the RMP entry's
    // permissions (and VMSA bit), not memory.
    unsafe {
        core::arch::asm!(
            ".byte 0xf3, 0x0f, 0x01, 0xfe",
            inout("rax") va => rc,
            in("rcx") 0u64,
            in("rdx") attributes,
            options(nostack)
        )
    };
    rc as u32
}

/// Starts the APs through AP creation: for each, a VMSA page (zeroed,
/// filled with the long-mode state `bare::smp::ApRegisters` says, marked a
/// VMSA with RMPADJUST) and the AP creation NAE. Returns the CPUs online.
pub fn start_aps(
    bsp_apic_id: u32,
    apic_ids: &[u32],
    entry: extern "C" fn(usize) -> !,
    timeout_us: u64,
) -> Result<usize, bare::smp::SmpError> {
    let (gdtr, idtr) = (bare::cpu::read_gdtr(), bare::cpu::read_idtr());
    // SAFETY: reading EFER (the CPU's for an SNP guest: no #VC) has no side
    // effect.
    let efer = unsafe { bare::cpu::rdmsr(0xc000_0080) };
    let (cr0, cr4) = (bare::cpu::read_cr0(), bare::cpu::read_cr4());
    let cr3 = bare::cpu::read_cr3();
    let create = |regs: &bare::smp::ApRegisters| {
        let mut vmsa = super::memory::FRAMES.allocate_zeroed();
        // A 2M-aligned VMSA can hit an erratum (Linux avoids it too).
        if vmsa.is_some_and(|pa| pa % (2 << 20) == 0) {
            vmsa = super::memory::FRAMES.allocate_zeroed();
        }
        let Some(vmsa) = vmsa else {
            panic!("no frame for CPU {}'s VMSA", regs.cpu_index);
        };
        let va = phys_to_virt(vmsa);
        // SAFETY: a zeroed frame just allocated, mapped private at `va`.
        let page = unsafe { &mut *(va as *mut [u8; 4096]) };
        let mut put =
            |at: usize, value: u64| page[at..at + 8].copy_from_slice(&value.to_le_bytes());
        let segment = |selector: u64, attributes: u64, limit: u64, base: u64| {
            (selector | (attributes << 16) | (limit << 32), base)
        };
        let code = segment(u64::from(bare::gdt::KERNEL_CODE), 0x29b, 0xffff_ffff, 0);
        let data = segment(u64::from(bare::gdt::KERNEL_DATA), 0xc93, 0xffff_ffff, 0);
        for (at, (low, base)) in [
            (0x00, data),
            (0x10, code),
            (0x20, data),
            (0x30, data),
            (0x40, data),
            (0x50, data),
            (0x60, segment(0, 0, u64::from(gdtr.limit), gdtr.base)),
            (0x70, segment(0, 0x82, 0xffff, 0)),
            (0x80, segment(0, 0, u64::from(idtr.limit), idtr.base)),
            (0x90, segment(0, 0x8b, 0xffff, 0)),
        ] {
            put(at, low);
            put(at + 8, base);
        }
        put(0xd0, efer);
        put(0x148, cr4);
        put(0x150, cr3);
        put(0x158, cr0);
        put(0x160, 0x400);
        put(0x168, 0xffff_0ff0);
        put(0x170, 2);
        put(0x178, regs.rip);
        put(0x1d8, regs.rsp);
        put(0x268, 0x0007_0406_0007_0406);
        put(0x330, regs.rsi);
        put(0x338, regs.rdi);
        put(0x3b0, SEV_FEATURES);
        put(0x3e8, 1);
        // SAFETY: an SNP guest at CPL 0; `va` maps the VMSA page private.
        // Target VMPL 1, VMSA bit (16): what AP creation requires.
        let rc = unsafe { rmpadjust(va, (1 << 16) | 1) };
        if rc != 0 {
            panic!(
                "RMPADJUST of CPU {}'s VMSA at {vmsa:#x}: {rc}",
                regs.cpu_index
            );
        }
        let status = ghcb_call(
            |g, _| {
                g.set_exit(
                    exit_code::AP_CREATION,
                    (u64::from(regs.apic_id) << 32) | 1,
                    vmsa,
                );
                g.set(field::RAX, SEV_FEATURES);
            },
            |g| g.get(field::SW_EXITINFO1).unwrap_or(u64::MAX),
        );
        if status & 0xffff_ffff != 0 {
            panic!(
                "AP creation of APIC ID {} refused: SW_EXITINFO1 {status:#x}",
                regs.apic_id
            );
        }
        Ok(())
    };
    let stack_top = |cpu: usize| super::memory::stack_tops(cpu).0;
    let wait = |online: &dyn Fn() -> bool| bare::tsc::wait_until(timeout_us, online);
    // SAFETY: the VMSAs give CR3 = the kernel's tables, which map the image
    // and every AP's stack (build_tables); each stack is its CPU's.
    unsafe {
        bare::smp::start_aps_directly(bsp_apic_id, apic_ids, entry, &stack_top, create, &wait)
    }
}

/// `fault=snp-...`: malformed requests the hypervisor must refuse with a
/// clear answer (or stop the guest with a one-line report), never act on.
/// Prints `SNPBAD kind=<kind> ...`; true if the answer was the refusal.
pub fn send_bad_request(kind: &str) -> bool {
    let info = |ghcb: &Ghcb| {
        (
            ghcb.get(field::SW_EXITINFO1).unwrap_or(u64::MAX),
            ghcb.get(field::SW_EXITINFO2).unwrap_or(u64::MAX),
        )
    };
    let (info1, info2) = match kind {
        // end_entry past the 253 a descriptor holds: an invalid header.
        "snp-psc-too-long" => ghcb_call(
            |g, gpa| {
                let mut desc = PscDesc {
                    end_entry: 300,
                    ..PscDesc::default()
                };
                desc.entries[0] = snp_hypercall::psc::PscEntry::new(0x8000, PageOp::Shared, false);
                g.set_exit(exit_code::PSC, 0, 0);
                g.put_psc(&desc, gpa);
            },
            info,
        ),
        // An entry with operation 7 (none such): an invalid entry.
        "snp-psc-bad-entry" => ghcb_call(
            |g, gpa| {
                let mut desc = PscDesc::default();
                desc.entries[0] = snp_hypercall::psc::PscEntry((0x8000 << 12) | (7 << 52));
                g.set_exit(exit_code::PSC, 0, 0);
                g.put_psc(&desc, gpa);
            },
            info,
        ),
        // A VMSA in real mode (CR0 = ET only) for APIC ID 1.
        "snp-bad-vmsa" => {
            let Some(vmsa) = super::memory::FRAMES.allocate_zeroed() else {
                return false;
            };
            let va = phys_to_virt(vmsa);
            // SAFETY: a zeroed frame just allocated, mapped private at `va`.
            let page = unsafe { &mut *(va as *mut [u8; 4096]) };
            page[0x158..0x160].copy_from_slice(&0x10u64.to_le_bytes());
            page[0x3b0..0x3b8].copy_from_slice(&SEV_FEATURES.to_le_bytes());
            // SAFETY: an SNP guest at CPL 0; `va` maps the page private.
            if unsafe { rmpadjust(va, (1 << 16) | 1) } != 0 {
                return false;
            }
            ghcb_call(
                |g, _| {
                    g.set_exit(exit_code::AP_CREATION, (1 << 32) | 1, vmsa);
                    g.set(field::RAX, SEV_FEATURES);
                },
                info,
            )
        }
        // A private page offered as a GHCB: the hypervisor cannot read it
        // and must refuse the registration (answer no echo of the GFN).
        "snp-ghcb-private" => {
            let Some(private) = super::memory::FRAMES.allocate_zeroed() else {
                return false;
            };
            let refused = msr::register_ghcb(&GuestGhcb, private).is_err();
            bare::println!(
                "SNPBAD kind={kind} refused={} page={private:#x}",
                u8::from(refused)
            );
            return refused;
        }
        // A GHCB this CPU never registered (the next CPU's page, shared):
        // the hypervisor must stop the guest (KVM does), not use it.
        "snp-ghcb-unregistered" => {
            let other = ghcb_gpa(super::cpu_index() + 1);
            bare::println!("SNPBAD kind={kind}: VMGEXIT with GHCB {other:#x}");
            bare::cpu::without_interrupts(|| {
                // SAFETY: the GHCB MSR of an SNP guest; deliberately wrong
                // (the hypervisor is expected to stop the guest here).
                unsafe { bare::cpu::wrmsr(MSR_GHCB, other) };
                vmgexit();
            });
            (0, 0)
        }
        other => panic!(
            "fault={other}: want snp-psc-too-long, snp-psc-bad-entry, snp-bad-vmsa, \
             snp-ghcb-private or snp-ghcb-unregistered"
        ),
    };
    if kind.starts_with("snp-psc-") {
        // The page the refused entry named: the emulator's probe prints its
        // state, which must still be the one it had (validated).
        // SAFETY: port 0xfc is the emulator's page-state probe; the write
        // changes nothing (a #VC the handler turns into the GHCB's IOIO).
        unsafe { bare::cpu::outl(0xfc, 0x8000) };
    }
    let refused = match kind {
        // KVM's VMGEXIT_PSC_ERROR_INVALID_HDR / _ENTRY in SW_EXITINFO2.
        "snp-psc-too-long" => info2 == (1 << 32) | 1,
        "snp-psc-bad-entry" => info2 == (1 << 32) | 2,
        "snp-bad-vmsa" => info1 & 0xffff_ffff == 2 && info2 == 5,
        // Still running after an unregistered GHCB: the hypervisor used it.
        _ => false,
    };
    bare::println!(
        "SNPBAD kind={kind} refused={} sw_exitinfo1={info1:#x} sw_exitinfo2={info2:#x}",
        u8::from(refused)
    );
    refused
}
