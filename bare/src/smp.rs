//! Starting the application processors (APs) and telling CPUs apart.
//!
//! Two ways to start APs share the bookkeeping here (CPU indices, per-CPU
//! blocks, the online count, one AP at a time, `ap_entry`): INIT-SIPI-SIPI
//! with a real-mode trampoline ([`start_aps`], below), and the ACPI
//! multiprocessor wakeup mailbox of a TD ([`crate::mpwakeup::start_aps`]).
//!
//! # Bring-up with INIT-SIPI-SIPI
//! [`start_aps`] copies the trampoline (the `global_asm!` below) to a page
//! below 1 MiB and starts the APs one at a time: it fills the trampoline's
//! parameter block (CR3, CR0, CR4, EFER, stack top, CPU index, entry), sends
//! INIT, waits 10 ms, sends STARTUP, and a second STARTUP if the AP has not
//! begun 200 us later. The AP goes 16-bit real mode -> 32-bit protected
//! mode (flat GDT in the trampoline page) -> long mode (CR4 with PAE, then
//! CR3, EFER.LME, CR0.PG; the values copy the BSP's, see [`start_aps`]) ->
//! 64-bit code in the trampoline that loads the AP's stack and calls
//! `ap_entry` in the kernel image. `ap_entry` loads a GDT of the kernel image
//! (so nothing refers to the trampoline page once [`start_aps`] returns),
//! points GS base at the AP's [`PerCpu`] block, reports the AP online and
//! calls the kernel's entry with the CPU index. The BSP waits (bounded) for
//! that report before it starts the next AP. Before paging is on the AP
//! records how far it got ([`ApStage`], for the error); with paging on it
//! only reads the trampoline page.
//!
//! # Delays
//! There is no timer yet, so waits use the 8254 PIT: channel 2 counts down
//! in mode 0 (gate on, speaker off, port 0x61) and the waiter polls its
//! output (port 0x61 bit 5), so it measures real time at 1.193182 MHz,
//! independent of CPU speed; under QEMU the PIT runs on the virtual clock.
//! Waits longer than one count (about 55 ms) chain counts. A PIT lock
//! serializes waiters. Not for interrupt handlers, and not for TDX (no PIT
//! there: APs start through the MADT wakeup mailbox instead).
//!
//! # Per-CPU index
//! Every CPU's GS base points at its own [`PerCpu`] block, whose first word
//! is the CPU's index, so [`cpu_index`] is one load. The BSP is index 0
//! ([`init_bsp`]); APs are 1, 2, ... in start order. Nothing else may change
//! GS base (a future user mode needs SWAPGS discipline). GS base is set by
//! loading GS from a descriptor ([`crate::gdt::load_gs_base_below_4g`]), not
//! by writing IA32_GS_BASE, when the block is below 4 GiB (it is in the
//! kernel image): that needs no MSR, which a TD may have to ask the VMM for.

use crate::apic::{Apic, ApicError};
use crate::cpu::{inb, outb, rdmsr, read_cr4, wrmsr};
use core::arch::{asm, global_asm};
use core::mem::{offset_of, size_of};
use core::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicUsize, Ordering};

/// CPUs (BSP included) this module can index.
pub const MAX_CPUS: usize = 256;
/// A conventional trampoline page: physical 0x8000, RAM below 1 MiB on
/// PC-compatible machines (check the memory map).
pub const DEFAULT_TRAMPOLINE_PHYSICAL: u64 = 0x8000;
/// A generous time for one AP to reach its kernel entry. Under
/// single-threaded TCG the vCPUs take turns, so an AP may wait for the BSP's
/// time slice to end.
pub const DEFAULT_AP_TIMEOUT_MS: u32 = 1000;

/// Wait after INIT before the first STARTUP (MP specification: 10 ms).
const INIT_DELAY_US: u64 = 10_000;
/// Wait after a STARTUP before deciding whether a second one is needed.
const STARTUP_DELAY_US: u64 = 200;

const MSR_EFER: u32 = 0xc000_0080;
const MSR_GS_BASE: u32 = 0xc000_0101;
const EFER_SCE: u64 = 1 << 0;
const EFER_LME: u64 = 1 << 8;
const EFER_NXE: u64 = 1 << 11;
const CR0_CACHE_DISABLE: u64 = 1 << 30;
const CR0_NOT_WRITE_THROUGH: u64 = 1 << 29;
const CR0_TASK_SWITCHED: u64 = 1 << 3;
const CR0_PE: u64 = 1 << 0;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
/// Can only be set in long mode (with CR3[11:0] = 0).
const CR4_PCIDE: u64 = 1 << 17;
/// Can only be set with CR0.WP already set.
const CR4_CET: u64 = 1 << 23;

/// One CPU's block; GS base points at it.
#[repr(C, align(64))]
pub struct PerCpu {
    /// Must stay first: [`cpu_index`] reads `gs:[0]`.
    index: AtomicUsize,
    apic_id: AtomicU32,
    online: AtomicBool,
}

/// `PerCpu::apic_id` before it is known (an x2APIC ID no CPU has).
const APIC_ID_UNKNOWN: u32 = u32::MAX;

impl PerCpu {
    const fn new() -> PerCpu {
        PerCpu {
            index: AtomicUsize::new(0),
            apic_id: AtomicU32::new(APIC_ID_UNKNOWN),
            online: AtomicBool::new(false),
        }
    }
}

static PER_CPU: [PerCpu; MAX_CPUS] = [const { PerCpu::new() }; MAX_CPUS];
static ONLINE: AtomicUsize = AtomicUsize::new(0);
static APS_STARTED: AtomicBool = AtomicBool::new(false);

/// Why SMP setup stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SmpError {
    /// [`init_bsp`] was already called.
    AlreadyInitialized,
    /// [`start_aps`] needs [`init_bsp`] first.
    BspNotInitialized,
    /// [`start_aps`] was already called.
    AlreadyStarted,
    /// The trampoline page must be 4 KiB-aligned, below 1 MiB and outside
    /// 0xA0000-0xBFFFF (STARTUP vectors 0xA0-0xBF are reserved).
    BadTrampolineAddress(u64),
    /// `trampoline_virtual` must be 4 KiB-aligned.
    BadTrampolineMapping(usize),
    /// The APs load CR3 in 32-bit mode: the top-level table must be below
    /// 4 GiB.
    Cr3AboveFourGiB(u64),
    /// The same APIC ID is listed twice (a second INIT would reset a
    /// running CPU).
    DuplicateApicId(u32),
    /// More CPUs than [`MAX_CPUS`].
    TooManyCpus(usize),
    /// A stack top is 0 or not 16-byte aligned.
    BadStackTop {
        /// The CPU index it was given for.
        cpu_index: usize,
        /// The value.
        stack_top: u64,
    },
    /// No PIT answers on ports 0x42/0x43/0x61, so no delay can be measured.
    NoTimer,
    /// Sending an IPI failed.
    Apic {
        /// The destination.
        apic_id: u32,
        /// What the APIC driver reported.
        error: ApicError,
    },
    /// The wakeup mailbox refused or did not take a command.
    Wakeup {
        /// The AP it was for.
        apic_id: u32,
        /// What went wrong.
        error: crate::mpwakeup::WakeupError,
    },
    /// The AP that ran the wakeup vector reported another APIC ID (RDI)
    /// than the one the mailbox was given.
    WrongApWoke {
        /// The APIC ID written to the mailbox.
        asked: u32,
        /// The one the AP reported.
        woke: u32,
    },
    /// An AP did not report online in time. With INIT-SIPI it was sent INIT
    /// again, so it waits for STARTUP and will not run later; a mailbox AP
    /// cannot be stopped (it may still come up, unused).
    ApTimeout {
        /// The AP that did not come up.
        apic_id: u32,
        /// How far its trampoline got.
        reached: ApStage,
        /// CPUs online (BSP included) when it was given up.
        online: usize,
    },
}

/// How far an AP got in the trampoline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApStage {
    /// It never executed the trampoline (no STARTUP accepted?).
    NotStarted,
    /// Real mode: it started and stopped before protected mode.
    RealMode,
    /// Protected mode: stopped while loading CR4, CR3 or EFER.
    ProtectedMode,
    /// It was about to turn paging on and did not reach its kernel entry:
    /// suspect the tables at CR3 (trampoline page not identity-mapped
    /// executable, kernel image or stack not mapped). Usually such an AP
    /// triple-faults, which resets the whole machine.
    EnablingPaging,
    /// Mailbox wakeup: the AP ran the wakeup vector, then stopped loading
    /// the IDT or making sure of EFER.NXE.
    WokenUp,
    /// Mailbox wakeup: the AP was loading the kernel's CR3 and its stack and
    /// did not reach its kernel entry: suspect the tables at CR3 (kernel image
    /// not identity-mapped, stack not mapped).
    LoadingKernelTables,
}

/// The markers an AP writes as it goes ([`ApStage`]).
pub(crate) mod stage_marker {
    /// Mailbox: at the wakeup vector.
    pub const WOKEN_UP: u32 = 0x10;
    /// Mailbox: about to load the kernel's CR3.
    pub const LOADING_KERNEL_TABLES: u32 = 0x11;
}

impl ApStage {
    pub(crate) fn from_marker(marker: u32) -> ApStage {
        match marker {
            0 => ApStage::NotStarted,
            1 => ApStage::RealMode,
            2 => ApStage::ProtectedMode,
            stage_marker::WOKEN_UP => ApStage::WokenUp,
            stage_marker::LOADING_KERNEL_TABLES => ApStage::LoadingKernelTables,
            _ => ApStage::EnablingPaging,
        }
    }
}

/// The parameter block at `bare_smp_trampoline_params`. The assembly reads
/// it by the offsets below; the BSP writes it before each STARTUP.
#[repr(C)]
struct TrampolineParams {
    /// Written by the AP (before paging is on): 1 real mode, 2 protected
    /// mode, 3 about to turn paging on.
    stage: u32,
    /// CR3 (the tables must be below 4 GiB).
    cr3: u32,
    /// CR0 to set with paging (low 32 bits).
    cr0: u32,
    /// CR4 to set before paging.
    cr4: u32,
    /// EFER low half (LME and the BSP's NXE, SCE).
    efer: u32,
    reserved: u32,
    /// The AP's initial RSP.
    stack_top: u64,
    /// The AP's index, first argument of `ap_entry`.
    cpu_index: u64,
    /// The kernel's entry, second argument of `ap_entry`.
    kernel_entry: u64,
    /// Address of `ap_entry`.
    ap_entry: u64,
}

// The AP trampoline. Position-independent: in real mode CS = page >> 4, so
// the code derives the page's physical base (ESI) from CS and patches the
// GDT pointer and the two far-jump pointers before using them. Only one AP
// runs it at a time. It is copied, never executed in place, hence .rodata.
global_asm!(
    r#"
    .pushsection .rodata.bare_smp_trampoline, "a"
    .balign 16
    .global bare_smp_trampoline_start
bare_smp_trampoline_start:
    .code16
    jmp bare_smp_trampoline_16

    .balign 16
bare_smp_trampoline_gdt:
    .quad 0
    .quad 0x00cf9b000000ffff      /* 0x08: 32-bit code, accessed */
    .quad 0x00cf93000000ffff      /* 0x10: data, accessed */
    .quad 0x00af9b000000ffff      /* 0x18: 64-bit code, accessed */
bare_smp_trampoline_gdt_end:
bare_smp_trampoline_gdt_pointer:
    .word bare_smp_trampoline_gdt_end - bare_smp_trampoline_gdt - 1
    .long 0                       /* base, patched by the AP */
bare_smp_trampoline_far32:
    .long 0                       /* offset, patched by the AP */
    .word 0x08
bare_smp_trampoline_far64:
    .long 0                       /* offset, patched by the AP */
    .word 0x18
    .balign 8
    .global bare_smp_trampoline_params
bare_smp_trampoline_params:
    .skip {params_size}

    /* Offsets from the start of the page (absolute: labels above). */
    .set BARE_SMP_GDT, bare_smp_trampoline_gdt - bare_smp_trampoline_start
    .set BARE_SMP_GDT_POINTER, bare_smp_trampoline_gdt_pointer - bare_smp_trampoline_start
    .set BARE_SMP_FAR32, bare_smp_trampoline_far32 - bare_smp_trampoline_start
    .set BARE_SMP_FAR64, bare_smp_trampoline_far64 - bare_smp_trampoline_start
    .set BARE_SMP_PARAMS, bare_smp_trampoline_params - bare_smp_trampoline_start

bare_smp_trampoline_16:
    cli
    cld
    mov ax, cs
    mov ds, ax
    mov es, ax
    mov ss, ax
    movzx esi, ax
    shl esi, 4                    /* ESI = physical base of the page */
    mov dword ptr [BARE_SMP_PARAMS + {stage}], 1
    lea eax, [esi + BARE_SMP_GDT]
    mov dword ptr [BARE_SMP_GDT_POINTER + 2], eax
    lea eax, [esi + BARE_SMP_CODE32]
    mov dword ptr [BARE_SMP_FAR32], eax
    lgdt [BARE_SMP_GDT_POINTER]   /* 24-bit base: fine below 1 MiB */
    mov eax, cr0
    and eax, 0x9fffffff           /* caches on: clear CD, NW */
    or eax, 1                     /* PE */
    mov cr0, eax
    jmp fword ptr [BARE_SMP_FAR32]

    .code32
bare_smp_trampoline_32:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov fs, ax
    mov gs, ax
    mov dword ptr [esi + BARE_SMP_PARAMS + {stage}], 2
    mov eax, [esi + BARE_SMP_PARAMS + {cr4}]
    mov cr4, eax
    mov eax, [esi + BARE_SMP_PARAMS + {cr3}]
    mov cr3, eax
    mov ecx, 0xc0000080           /* EFER */
    mov eax, [esi + BARE_SMP_PARAMS + {efer}]
    xor edx, edx
    wrmsr
    lea eax, [esi + BARE_SMP_CODE64]
    mov [esi + BARE_SMP_FAR64], eax
    mov dword ptr [esi + BARE_SMP_PARAMS + {stage}], 3
    mov eax, [esi + BARE_SMP_PARAMS + {cr0}]
    mov cr0, eax                  /* paging on: compatibility mode */
    jmp fword ptr [esi + BARE_SMP_FAR64]

    .code64
bare_smp_trampoline_64:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor eax, eax
    mov fs, ax
    mov gs, ax
    mov esi, esi                  /* upper halves are undefined after 32-bit code */
    /* From here the page is only read: it need not be writable in CR3. */
    mov rsp, [rsi + BARE_SMP_PARAMS + {stack_top}]
    mov rdi, [rsi + BARE_SMP_PARAMS + {cpu_index}]
    mov rax, [rsi + BARE_SMP_PARAMS + {ap_entry}]
    mov rsi, [rsi + BARE_SMP_PARAMS + {kernel_entry}]
    xor ebp, ebp
    call rax
    ud2
    .set BARE_SMP_CODE32, bare_smp_trampoline_32 - bare_smp_trampoline_start
    .set BARE_SMP_CODE64, bare_smp_trampoline_64 - bare_smp_trampoline_start
    .global bare_smp_trampoline_end
bare_smp_trampoline_end:
    .popsection
"#,
    stage = const offset_of!(TrampolineParams, stage),
    cr3 = const offset_of!(TrampolineParams, cr3),
    cr0 = const offset_of!(TrampolineParams, cr0),
    cr4 = const offset_of!(TrampolineParams, cr4),
    efer = const offset_of!(TrampolineParams, efer),
    stack_top = const offset_of!(TrampolineParams, stack_top),
    cpu_index = const offset_of!(TrampolineParams, cpu_index),
    kernel_entry = const offset_of!(TrampolineParams, kernel_entry),
    ap_entry = const offset_of!(TrampolineParams, ap_entry),
    params_size = const size_of::<TrampolineParams>(),
);

extern "C" {
    static bare_smp_trampoline_start: u8;
    static bare_smp_trampoline_params: u8;
    static bare_smp_trampoline_end: u8;
}

/// The GDT an AP switches to in `ap_entry`, in the kernel image so the
/// trampoline page can be reused. Same selectors as [`crate::gdt`]; accessed
/// bits preset so loading never writes it.
static AP_GDT: [u64; 3] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];

/// What [`start_aps`] needs besides the APIC and the CPU list.
pub struct ApStartConfig<'a> {
    /// Physical address of the trampoline page: 4 KiB-aligned, below 1 MiB,
    /// RAM that nothing else uses during [`start_aps`] (free again after).
    pub trampoline_physical: u64,
    /// Where the BSP writes that page in the current address space
    /// (`trampoline_physical` itself under the boot identity map).
    pub trampoline_virtual: *mut u8,
    /// The CR3 the APs load (below 4 GiB; see [`start_aps`] for what it
    /// must map).
    pub cr3: u64,
    /// Called on each AP with its CPU index, on its stack, IF = 0.
    pub entry: extern "C" fn(usize) -> !,
    /// The stack top for CPU index `i` (16-byte aligned, owned by that CPU).
    pub stack_top_for: &'a dyn Fn(usize) -> u64,
    /// How long to wait for each AP to reach `entry`.
    pub timeout_ms: u32,
}

/// This CPU's index: 0 on the BSP, 1.. on the APs in start order. One load
/// through GS, usable in exception and interrupt handlers. Meaningless on a
/// CPU before [`init_bsp`] / its AP start set its GS base.
#[inline]
pub fn cpu_index() -> usize {
    let index: usize;
    // SAFETY: GS base is this CPU's `PerCpu` block (set by `init_bsp` or
    // `ap_entry` and never changed), whose first field is the index. Before
    // that it is 0 and this only reads linear address 0 (no write).
    unsafe {
        asm!("mov {}, qword ptr gs:[0]", out(reg) index, options(nostack, preserves_flags, readonly))
    }
    index
}

/// CPUs online: 0 before [`init_bsp`], then 1 + the APs that reached their
/// entry.
pub fn online_cpus() -> usize {
    ONLINE.load(Ordering::Acquire)
}

/// The APIC ID of the CPU with `cpu_index`, if it is online and its ID is
/// known (the BSP's is recorded by [`start_aps`]).
pub fn apic_id_of(cpu_index: usize) -> Option<u32> {
    PER_CPU
        .get(cpu_index)
        .filter(|cpu| cpu.online.load(Ordering::Acquire))
        .map(|cpu| cpu.apic_id.load(Ordering::Acquire))
        .filter(|&id| id != APIC_ID_UNKNOWN)
}

/// Points this CPU's GS base at `block`: by a descriptor load when the
/// block is below 4 GiB (no MSR access, see the module doc), else through
/// IA32_GS_BASE.
fn set_gs_base(block: &'static PerCpu) {
    let address = block as *const PerCpu as u64;
    match u32::try_from(address) {
        Ok(below_4g) => crate::gdt::load_gs_base_below_4g(below_4g),
        // SAFETY: IA32_GS_BASE exists on every x86-64 CPU; this module is the
        // only user of GS, and the block is 'static.
        Err(_) => unsafe { wrmsr(MSR_GS_BASE, address) },
    }
}

/// Makes the calling CPU (the BSP) CPU index 0: sets its GS base, so
/// [`cpu_index`] works on it from here on, and counts it online. Call it
/// once, early (before handlers that use [`cpu_index`] can run); it needs no
/// APIC.
pub fn init_bsp() -> Result<(), SmpError> {
    if ONLINE
        .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return Err(SmpError::AlreadyInitialized);
    }
    let block = &PER_CPU[0];
    block.index.store(0, Ordering::Relaxed);
    block.online.store(true, Ordering::Release);
    set_gs_base(block);
    Ok(())
}

/// Where each AP lands from the trampoline or the wakeup vector: RDI =
/// index, RSI = the kernel's entry; RSP = its stack top, IF = 0, CS/DS still
/// the trampoline's (or the firmware's) GDT.
pub(crate) extern "C" fn ap_entry(cpu_index: usize, kernel_entry: extern "C" fn(usize) -> !) -> ! {
    // SAFETY: AP_GDT is 'static with a 64-bit code descriptor at KERNEL_CODE
    // and a data descriptor at KERNEL_DATA; after this nothing refers to the
    // trampoline page.
    unsafe { crate::gdt::load_gdt(AP_GDT.as_ptr() as u64, size_of::<[u64; 3]>() as u16 - 1) };
    let Some(block) = PER_CPU.get(cpu_index) else {
        // The BSP only hands out indices below MAX_CPUS.
        crate::cpu::halt_forever();
    };
    set_gs_base(block);
    // Count first, then report: once the BSP sees `online` it also sees the
    // count (release/acquire), so `online_cpus()` includes this CPU.
    ONLINE.fetch_add(1, Ordering::AcqRel);
    block.online.store(true, Ordering::Release);
    kernel_entry(cpu_index)
}

/// The 8254 PIT, channel 2, as a stopwatch (see the module doc).
mod pit {
    use super::{inb, outb};

    const FREQUENCY_HZ: u64 = 1_193_182;
    const CHANNEL_2_DATA: u16 = 0x42;
    const COMMAND: u16 = 0x43;
    const PORT_B: u16 = 0x61;
    const PORT_B_GATE_2: u8 = 1 << 0;
    const PORT_B_SPEAKER: u8 = 1 << 1;
    const PORT_B_OUT_2: u8 = 1 << 5;
    /// Channel 2, low then high byte, mode 0 (interrupt on terminal count),
    /// binary.
    const CHANNEL_2_MODE_0: u8 = 0b1011_0000;
    /// Polls per PIT tick before a countdown is taken as over even though
    /// OUT never rose (a broken PIT must not hang the caller).
    const POLLS_PER_TICK_LIMIT: u64 = 256;

    static LOCK: spin::Mutex<()> = spin::Mutex::new(());

    fn start_countdown(ticks: u16) {
        // SAFETY: ports 0x42/0x43/0x61 are the PIT's channel 2 and its gate,
        // which nothing else in this project uses; the speaker stays off.
        unsafe {
            let port_b = inb(PORT_B);
            outb(PORT_B, (port_b & !PORT_B_SPEAKER) | PORT_B_GATE_2);
            outb(COMMAND, CHANNEL_2_MODE_0);
            outb(CHANNEL_2_DATA, ticks as u8);
            outb(CHANNEL_2_DATA, (ticks >> 8) as u8);
        }
    }

    fn countdown_over() -> bool {
        // SAFETY: reading port B has no side effect.
        unsafe { inb(PORT_B) & PORT_B_OUT_2 != 0 }
    }

    /// Whether a PIT answers: right after a countdown starts its output is
    /// low; with no device the port reads 0xff.
    pub fn present() -> bool {
        let _guard = LOCK.lock();
        start_countdown(u16::MAX);
        !countdown_over()
    }

    /// Polls `condition` until it holds (true) or `timeout_us` passed
    /// (false).
    pub fn wait_until(timeout_us: u64, mut condition: impl FnMut() -> bool) -> bool {
        let _guard = LOCK.lock();
        let mut remaining = timeout_us.saturating_mul(FREQUENCY_HZ) / 1_000_000;
        loop {
            if condition() {
                return true;
            }
            if remaining == 0 {
                return false;
            }
            let ticks = remaining.clamp(1, u64::from(u16::MAX));
            start_countdown(ticks as u16);
            let mut polls = 0;
            while !countdown_over() && polls < ticks * POLLS_PER_TICK_LIMIT {
                if condition() {
                    return true;
                }
                polls += 1;
                core::hint::spin_loop();
            }
            remaining -= ticks;
        }
    }
}

/// Polls `condition` until it holds (returns true) or `timeout_us`
/// microseconds of PIT time passed (false). Serialized across CPUs; not for
/// interrupt handlers.
pub fn wait_until(timeout_us: u64, condition: impl FnMut() -> bool) -> bool {
    pit::wait_until(timeout_us, condition)
}

/// Waits `us` microseconds of PIT time.
pub fn delay_us(us: u64) {
    pit::wait_until(us, || false);
}

/// One AP, as the shared bookkeeping hands it to a start method.
pub(crate) struct ApSlot {
    /// Its CPU index.
    pub index: usize,
    /// Its APIC ID.
    pub apic_id: u32,
    /// Its stack top (checked: non-zero, 16-byte aligned).
    pub stack_top: u64,
    /// CPUs online before it (BSP included).
    pub online_before: usize,
    block: &'static PerCpu,
}

impl ApSlot {
    /// Whether it reached `ap_entry` and reported online.
    pub fn is_online(&self) -> bool {
        self.block.online.load(Ordering::Acquire)
    }
}

/// The checks both start methods make, and the claim that makes starting
/// APs one-shot: the BSP is set up, no APIC ID is listed twice, the CPUs fit
/// [`MAX_CPUS`], then `method_ready` (the method's own last check), then no
/// start ran before. Records the BSP's APIC ID.
pub(crate) fn claim_ap_start(
    bsp_apic_id: u32,
    apic_ids: &[u32],
    method_ready: impl FnOnce() -> Result<(), SmpError>,
) -> Result<(), SmpError> {
    if ONLINE.load(Ordering::Acquire) == 0 {
        return Err(SmpError::BspNotInitialized);
    }
    let mut ap_count = 0;
    for (i, &id) in apic_ids.iter().enumerate() {
        if apic_ids[..i].contains(&id) {
            return Err(SmpError::DuplicateApicId(id));
        }
        if id != bsp_apic_id {
            ap_count += 1;
        }
    }
    if ap_count + 1 > MAX_CPUS {
        return Err(SmpError::TooManyCpus(ap_count + 1));
    }
    method_ready()?;
    if APS_STARTED.swap(true, Ordering::AcqRel) {
        return Err(SmpError::AlreadyStarted);
    }
    PER_CPU[0].apic_id.store(bsp_apic_id, Ordering::Release);
    Ok(())
}

/// Starts the APs of `apic_ids` (the BSP's skipped) one at a time, with CPU
/// indices 1, 2, ... in list order: prepares each one's [`PerCpu`] block,
/// then `start_one` must start it and return once [`ApSlot::is_online`]
/// (or fail, which stops here). Returns the CPUs online, BSP included.
/// Call after [`claim_ap_start`].
pub(crate) fn start_one_by_one(
    bsp_apic_id: u32,
    apic_ids: &[u32],
    stack_top_for: &dyn Fn(usize) -> u64,
    mut start_one: impl FnMut(&ApSlot) -> Result<(), SmpError>,
) -> Result<usize, SmpError> {
    let aps = apic_ids.iter().filter(|&&id| id != bsp_apic_id);
    let mut online = 1;
    for (index, &apic_id) in (1..).zip(aps) {
        let stack_top = stack_top_for(index);
        if stack_top == 0 || stack_top & 0xf != 0 {
            return Err(SmpError::BadStackTop {
                cpu_index: index,
                stack_top,
            });
        }
        let block = &PER_CPU[index];
        block.index.store(index, Ordering::Relaxed);
        block.apic_id.store(apic_id, Ordering::Relaxed);
        block.online.store(false, Ordering::Relaxed);
        start_one(&ApSlot {
            index,
            apic_id,
            stack_top,
            online_before: online,
            block,
        })?;
        online += 1;
    }
    Ok(online)
}

/// The registers an AP that the kernel creates itself starts with (SEV-SNP
/// AP creation takes them all from a VMSA): 64-bit mode at `rip` with the
/// kernel's CR3, a GDT with 64-bit code at `gdt::KERNEL_CODE` and data at
/// `gdt::KERNEL_DATA`, interrupts off, and these `rdi`, `rsi`, `rsp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApRegisters {
    /// The CPU index it gets.
    pub cpu_index: usize,
    /// Its APIC ID.
    pub apic_id: u32,
    pub rip: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rsp: u64,
}

/// Starts every CPU in `apic_ids` but the BSP through `create`, one at a
/// time, with indices 1, 2, ... in list order: `create` gets the registers
/// the AP must begin with, and `wait` polls until it is online (false: it
/// did not come up in time, which stops here). The AP reaches
/// `entry(index)` on `stack_top_for(index)` as with [`start_aps`]. Returns
/// the CPUs online, BSP included.
///
/// # Safety
/// What `create` starts runs this module's code: the tables at the CR3 it
/// gives map the kernel image and every AP's stack as the current ones do,
/// and each `stack_top_for(i)` is a stack only CPU `i` uses.
pub unsafe fn start_aps_directly(
    bsp_apic_id: u32,
    apic_ids: &[u32],
    entry: extern "C" fn(usize) -> !,
    stack_top_for: &dyn Fn(usize) -> u64,
    mut create: impl FnMut(&ApRegisters) -> Result<(), SmpError>,
    wait: &dyn Fn(&dyn Fn() -> bool) -> bool,
) -> Result<usize, SmpError> {
    claim_ap_start(bsp_apic_id, apic_ids, || Ok(()))?;
    start_one_by_one(bsp_apic_id, apic_ids, stack_top_for, |slot| {
        create(&ApRegisters {
            cpu_index: slot.index,
            apic_id: slot.apic_id,
            rip: ap_entry as extern "C" fn(usize, extern "C" fn(usize) -> !) -> ! as usize as u64,
            rdi: slot.index as u64,
            rsi: entry as usize as u64,
            // As if `ap_entry` had been called: the return address slot.
            rsp: slot.stack_top - 8,
        })?;
        if wait(&|| slot.is_online()) {
            Ok(())
        } else {
            Err(SmpError::ApTimeout {
                apic_id: slot.apic_id,
                reached: ApStage::NotStarted,
                online: slot.online_before,
            })
        }
    })
}

/// Starts every CPU in `apic_ids` except the calling BSP (listing it is
/// allowed, it is skipped), one at a time, giving them indices 1, 2, ... in
/// list order. Each AP runs `config.entry(index)` on
/// `config.stack_top_for(index)` once it is up. Returns the CPUs online,
/// BSP included. Stops at the first AP that fails (the earlier ones keep
/// running).
///
/// The APs copy the BSP's control registers: CR0 (CD, NW, TS cleared; PG,
/// WP, PE set), CR4 (PAE set; PCIDE and CET cleared: set them on the AP if
/// wanted), EFER (LME, plus the BSP's NXE and SCE).
///
/// An AP enters `config.entry` with interrupts disabled, a GDT of this
/// module (code 0x08, data 0x10, no TSS), no IDT (IDTR still the real-mode
/// one: an NMI there is fatal), GS base at its [`PerCpu`] block. The entry
/// should load its `CpuTables` and the IDT first, then enable its APIC.
///
/// # Safety
/// - `config.trampoline_virtual` maps `config.trampoline_physical` writable
///   here, and that page is RAM nothing else uses until this returns.
/// - The tables at `config.cr3` (below 4 GiB: the AP loads CR3 in 32-bit
///   mode) identity-map the trampoline page, present and executable (paging
///   turns on while the AP executes there; it need not be writable), and
///   map, at the addresses the current tables use, the kernel image (this
///   module's code and data, `config.entry` and what it touches) and every
///   AP's stack. They are used with the BSP's CR4 (paging mode, PGE).
/// - Each `stack_top_for(i)` is the top of a stack of enough size that only
///   CPU `i` uses, for as long as it runs.
/// - Nothing else sends INIT or STARTUP IPIs meanwhile.
pub unsafe fn start_aps(
    apic: &Apic,
    apic_ids: &[u32],
    config: &ApStartConfig<'_>,
) -> Result<usize, SmpError> {
    if ONLINE.load(Ordering::Acquire) == 0 {
        return Err(SmpError::BspNotInitialized);
    }
    let trampoline = config.trampoline_physical;
    let reserved = (0xa_0000..0xc_0000).contains(&trampoline);
    if trampoline & 0xfff != 0 || trampoline >= 0x10_0000 || reserved {
        return Err(SmpError::BadTrampolineAddress(trampoline));
    }
    let mapping = config.trampoline_virtual as usize;
    if mapping & 0xfff != 0 {
        return Err(SmpError::BadTrampolineMapping(mapping));
    }
    if config.cr3 > u64::from(u32::MAX) {
        return Err(SmpError::Cr3AboveFourGiB(config.cr3));
    }
    let bsp_apic_id = apic.id();
    claim_ap_start(bsp_apic_id, apic_ids, || {
        if pit::present() {
            Ok(())
        } else {
            Err(SmpError::NoTimer)
        }
    })?;

    // The three symbols delimit the trampoline in .rodata.
    let start = core::ptr::addr_of!(bare_smp_trampoline_start);
    let params_at = core::ptr::addr_of!(bare_smp_trampoline_params) as usize;
    let end = core::ptr::addr_of!(bare_smp_trampoline_end) as usize;
    let length = end - start as usize;
    // SAFETY: the caller guarantees the page is writable and unused; the
    // trampoline (about 250 bytes, far below 4 KiB) is in the kernel image.
    unsafe { core::ptr::copy_nonoverlapping(start, config.trampoline_virtual, length) };
    let params = config
        .trampoline_virtual
        .wrapping_add(params_at - start as usize) as *mut TrampolineParams;

    let cr0 = (crate::cpu::read_cr0()
        & !(CR0_CACHE_DISABLE | CR0_NOT_WRITE_THROUGH | CR0_TASK_SWITCHED))
        | CR0_PG
        | CR0_WP
        | CR0_PE;
    let bsp_cr4 = read_cr4();
    let cr4 = (bsp_cr4 & !(CR4_PCIDE | CR4_CET)) | CR4_PAE;
    // With PCIDE, CR3[11:0] is a PCID; without it (as on the AP) they would
    // be read as cache-control bits.
    let cr3 = if bsp_cr4 & CR4_PCIDE != 0 {
        config.cr3 & !0xfff
    } else {
        config.cr3
    };
    // SAFETY: EFER exists on every x86-64 CPU; reading it has no side effect.
    let efer = (unsafe { rdmsr(MSR_EFER) } & (EFER_SCE | EFER_NXE)) | EFER_LME;

    start_one_by_one(bsp_apic_id, apic_ids, config.stack_top_for, |ap| {
        let apic_id = ap.apic_id;
        // SAFETY: `params` is inside the copied trampoline, 8-aligned (the
        // page is 4 KiB-aligned, the block 8-aligned in it); no AP runs the
        // trampoline now (the previous one is past it or was sent INIT).
        unsafe {
            params.write_volatile(TrampolineParams {
                stage: 0,
                cr3: cr3 as u32,
                cr0: cr0 as u32,
                cr4: cr4 as u32,
                efer: efer as u32,
                reserved: 0,
                stack_top: ap.stack_top,
                cpu_index: ap.index as u64,
                kernel_entry: config.entry as *const () as u64,
                ap_entry: ap_entry as *const () as u64,
            })
        };
        fence(Ordering::SeqCst);
        // SAFETY: as above; the AP writes `stage` concurrently, hence volatile.
        let stage = || unsafe { core::ptr::addr_of!((*params).stage).read_volatile() };
        let ipi_error = |error| SmpError::Apic { apic_id, error };

        apic.send_init(apic_id).map_err(ipi_error)?;
        delay_us(INIT_DELAY_US);
        apic.send_startup(apic_id, trampoline).map_err(ipi_error)?;
        if !wait_until(STARTUP_DELAY_US, || stage() != 0) {
            apic.send_startup(apic_id, trampoline).map_err(ipi_error)?;
        }
        let timeout_us = u64::from(config.timeout_ms) * 1000;
        if !wait_until(timeout_us, || ap.is_online()) {
            let reached = ApStage::from_marker(stage());
            let _ = apic.send_init(apic_id);
            return Err(SmpError::ApTimeout {
                apic_id,
                reached,
                online: ap.online_before,
            });
        }
        Ok(())
    })
}
