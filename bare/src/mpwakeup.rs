//! Starting APs through the ACPI multiprocessor wakeup mailbox (ACPI 6.4,
//! MADT entry type 0x10), which is how a TD starts them: it has no
//! INIT-SIPI-SIPI (and no real mode to run a trampoline in).
//!
//! # The mailbox
//! One 4 KiB page of firmware memory: Command (u16) at 0 (0 noop, 1
//! wakeup), a reserved u16, ApicId (u32) at 4, WakeupVector (u64) at 8, then
//! 2032 bytes for the OS and 2048 for the firmware. The OS writes ApicId and
//! WakeupVector, then Command = wakeup (release order), and waits until the
//! firmware sets Command back to noop: the AP with that APIC ID has taken
//! the command and jumps to WakeupVector. One command at a time. [`Mailbox`]
//! models the first 16 bytes, for both sides (the firmware side is what the
//! TDX-module emulator, and the host tests, play).
//!
//! # The AP's entry (bare metal)
//! [`start_aps`] wakes the APs one at a time. An AP arrives at the wakeup
//! vector, `bare_mpwakeup_ap_entry`, in 64-bit mode at CPL 0 with interrupts
//! off, the firmware's CR3 (identity map of the low 4 GiB), GDT (code 0x08,
//! data 0x10) and CR4, RSP undefined and RDI = its APIC ID. It records RDI
//! and its progress ([`crate::smp::ApStage`]) in a parameter block the BSP
//! filled, takes a small stack in the kernel image (one AP at a time uses
//! it), loads the kernel's IDT (so a #VE raised from here on is handled:
//! in a TD under the emulator even RDMSR may raise one), sets EFER.NXE if it
//! is clear (the kernel's tables use NX; a TD's EFER normally has it, and
//! then nothing is written), loads the kernel's CR3 and its own stack and
//! calls `ap_entry`, the same per-CPU setup as INIT-SIPI (GDT, GS base, the
//! online count) followed by the kernel's entry. The BSP waits, bounded by
//! the TSC ([`crate::tsc`]; a TD has no PIT), first for the firmware to take
//! the command, then for the AP to report online.

use core::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering};

/// Mailbox commands.
pub mod command {
    /// Nothing to do; also the firmware's "taken".
    pub const NOOP: u16 = 0;
    /// Wake the AP named by ApicId at WakeupVector.
    pub const WAKEUP: u16 = 1;
}

/// The OS/firmware interface at the start of the mailbox page (the rest of
/// the page is never touched here).
#[repr(C)]
#[derive(Debug)]
pub struct Mailbox {
    command: AtomicU16,
    reserved: AtomicU16,
    apic_id: AtomicU32,
    wakeup_vector: AtomicU64,
}

/// Why the mailbox did not wake an AP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WakeupError {
    /// Command was not noop before posting: the firmware has not taken the
    /// previous command (or the mailbox is not one).
    Busy {
        /// The command found.
        command: u16,
    },
    /// The firmware did not set Command back to noop in time.
    NotTaken,
}

impl Mailbox {
    /// An idle mailbox (Command = noop), for a firmware side and tests.
    pub const fn new() -> Mailbox {
        Mailbox {
            command: AtomicU16::new(command::NOOP),
            reserved: AtomicU16::new(0),
            apic_id: AtomicU32::new(0),
            wakeup_vector: AtomicU64::new(0),
        }
    }

    /// The mailbox at virtual address `address`.
    ///
    /// # Safety
    /// `address` must map the firmware's mailbox page (the MADT's, 4 KiB
    /// aligned), readable and writable, for the rest of the run, and nothing
    /// but [`Mailbox`] methods may write its first 16 bytes on this side.
    pub unsafe fn at(address: usize) -> &'static Mailbox {
        // SAFETY: by the caller's contract the page is mapped for 'static and
        // 4 KiB-aligned (more than the 8 bytes `Mailbox` needs); the firmware
        // side accesses the fields with the same atomic widths.
        unsafe { &*(address as *const Mailbox) }
    }

    /// OS side: asks the firmware to start the AP `apic_id` at
    /// `wakeup_vector`. ApicId and WakeupVector are written before Command
    /// (release), so the firmware that sees the command sees them too.
    pub fn post_wakeup(&self, apic_id: u32, wakeup_vector: u64) -> Result<(), WakeupError> {
        let current = self.command.load(Ordering::Acquire);
        if current != command::NOOP {
            return Err(WakeupError::Busy { command: current });
        }
        self.apic_id.store(apic_id, Ordering::Relaxed);
        self.wakeup_vector.store(wakeup_vector, Ordering::Relaxed);
        self.command.store(command::WAKEUP, Ordering::Release);
        Ok(())
    }

    /// OS side: whether the firmware has taken the last command (Command is
    /// noop again).
    pub fn taken(&self) -> bool {
        self.command.load(Ordering::Acquire) == command::NOOP
    }

    /// Firmware side, as each parked AP polls: if a wakeup for `apic_id` is
    /// posted, takes it (Command back to noop) and returns the vector to
    /// jump to.
    pub fn take_wakeup_for(&self, apic_id: u32) -> Option<u64> {
        if self.command.load(Ordering::Acquire) != command::WAKEUP
            || self.apic_id.load(Ordering::Relaxed) != apic_id
        {
            return None;
        }
        let vector = self.wakeup_vector.load(Ordering::Relaxed);
        self.command.store(command::NOOP, Ordering::Release);
        Some(vector)
    }
}

impl Default for Mailbox {
    fn default() -> Self {
        Mailbox::new()
    }
}

/// Posts a wakeup for `apic_id` at `wakeup_vector` and waits with
/// `wait_until` (a bounded poll: returns whether the condition it is given
/// came true) until the firmware has taken it.
pub fn wake(
    mailbox: &Mailbox,
    apic_id: u32,
    wakeup_vector: u64,
    wait_until: impl FnOnce(&mut dyn FnMut() -> bool) -> bool,
) -> Result<(), WakeupError> {
    mailbox.post_wakeup(apic_id, wakeup_vector)?;
    if wait_until(&mut || mailbox.taken()) {
        Ok(())
    } else {
        Err(WakeupError::NotTaken)
    }
}

#[cfg(target_os = "none")]
pub use ap::{start_aps, WakeupConfig};

#[cfg(target_os = "none")]
mod ap {
    use super::{wake, Mailbox};
    use crate::smp::{self, stage_marker, ApStage, SmpError};
    use core::arch::global_asm;
    use core::mem::offset_of;
    use core::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

    /// Size of the stack an AP uses between the wakeup vector and its own
    /// stack (enough for a #VE handler that reports a fatal error).
    const EARLY_STACK_BYTES: usize = 16 * 1024;
    /// EFER.NXE.
    const EFER_NXE_BIT: u32 = 11;
    /// `woken_apic_id` before an AP wrote it.
    const NOT_WOKEN: u32 = u32::MAX;

    /// What the AP entry reads (and writes: `stage`, `woken_apic_id`). In
    /// the kernel image, so identity-mapped in both address spaces the AP
    /// runs in; the assembly reads it by the offsets below.
    #[repr(C)]
    struct WakeupParams {
        /// Written by the AP: a [`stage_marker`] value (0 before).
        stage: AtomicU32,
        /// Written by the AP: RDI at the wakeup vector.
        woken_apic_id: AtomicU32,
        /// The kernel's CR3.
        cr3: AtomicU64,
        /// The AP's stack top.
        stack_top: AtomicU64,
        /// The AP's CPU index.
        cpu_index: AtomicU64,
        /// The kernel's AP entry.
        kernel_entry: AtomicU64,
    }

    static WAKEUP_PARAMS: WakeupParams = WakeupParams {
        stage: AtomicU32::new(0),
        woken_apic_id: AtomicU32::new(NOT_WOKEN),
        cr3: AtomicU64::new(0),
        stack_top: AtomicU64::new(0),
        cpu_index: AtomicU64::new(0),
        kernel_entry: AtomicU64::new(0),
    };

    /// Loads the kernel's IDT on an AP still on the early stack.
    extern "C" fn load_idt_on_ap() {
        crate::idt::load();
    }

    global_asm!(
        r#"
    .pushsection .bss.bare_mpwakeup_early_stack, "aw", @nobits
    .balign 16
    .skip {early_stack_bytes}
bare_mpwakeup_early_stack_top:
    .popsection

    .pushsection .text.bare_mpwakeup, "ax"
    .code64
    .balign 16
    .global bare_mpwakeup_ap_entry
bare_mpwakeup_ap_entry:
    cli
    cld
    lea rsi, [rip + {params}]
    mov dword ptr [rsi + {woken_apic_id}], edi
    mov dword ptr [rsi + {stage}], {stage_woken_up}
    lea rsp, [rip + bare_mpwakeup_early_stack_top]
    xor ebp, ebp
    call {load_idt}
    /* The kernel's tables set NX: without EFER.NXE that bit is reserved. */
    mov ecx, 0xc0000080
    rdmsr
    bt eax, {efer_nxe_bit}
    jc 2f
    bts eax, {efer_nxe_bit}
    wrmsr
2:
    lea rsi, [rip + {params}]
    mov dword ptr [rsi + {stage}], {stage_loading_kernel_tables}
    mov rax, [rsi + {cr3}]
    mov cr3, rax
    mov rsp, [rsi + {stack_top}]
    mov rdi, [rsi + {cpu_index}]
    mov rsi, [rsi + {kernel_entry}]
    xor ebp, ebp
    call {ap_entry}
    ud2
    .popsection
"#,
        early_stack_bytes = const EARLY_STACK_BYTES,
        params = sym WAKEUP_PARAMS,
        stage = const offset_of!(WakeupParams, stage),
        woken_apic_id = const offset_of!(WakeupParams, woken_apic_id),
        cr3 = const offset_of!(WakeupParams, cr3),
        stack_top = const offset_of!(WakeupParams, stack_top),
        cpu_index = const offset_of!(WakeupParams, cpu_index),
        kernel_entry = const offset_of!(WakeupParams, kernel_entry),
        stage_woken_up = const stage_marker::WOKEN_UP,
        stage_loading_kernel_tables = const stage_marker::LOADING_KERNEL_TABLES,
        efer_nxe_bit = const EFER_NXE_BIT,
        load_idt = sym load_idt_on_ap,
        ap_entry = sym smp::ap_entry,
    );

    extern "C" {
        fn bare_mpwakeup_ap_entry();
    }

    /// What [`start_aps`] needs besides the mailbox and the CPU list.
    pub struct WakeupConfig<'a> {
        /// The CR3 the APs switch to (any address: they load it in 64-bit
        /// mode).
        pub cr3: u64,
        /// Called on each AP with its CPU index, on its stack, IF = 0.
        pub entry: extern "C" fn(usize) -> !,
        /// The stack top for CPU index `i` (16-byte aligned, owned by that CPU).
        pub stack_top_for: &'a dyn Fn(usize) -> u64,
        /// How long to wait, at least, for the firmware to take each command
        /// and then for the AP to reach `entry` (TSC-timed, see
        /// [`crate::tsc`]).
        pub timeout_us: u64,
    }

    /// Starts every CPU in `apic_ids` except the BSP (`bsp_apic_id`; listing
    /// it is allowed, it is skipped) through `mailbox`, one at a time, giving
    /// them indices 1, 2, ... in list order. Each AP runs
    /// `config.entry(index)` on `config.stack_top_for(index)`, in the state
    /// [`crate::smp::start_aps`] describes, except that CR0 and CR4 are the
    /// firmware's. Returns the CPUs online, BSP included. Stops at the first
    /// AP that fails (the earlier ones keep running). Never uses the PIT.
    ///
    /// # Safety
    /// - `mailbox` is the firmware's wakeup mailbox, and nothing else posts
    ///   commands to it meanwhile.
    /// - The kernel image (this module's code and data, the IDT and the
    ///   handlers reachable from it) is identity-mapped (virtual = physical)
    ///   below 4 GiB, so the wakeup vector (its address) is valid under the
    ///   firmware's tables as under `config.cr3`; the IDT's handlers can run
    ///   there, on a 16 KiB stack (they are for whatever the AP entry may
    ///   raise, such as a #VE for RDMSR in a TD).
    /// - `config.cr3` maps the kernel image at the same addresses,
    ///   `config.entry` and what it touches, and every AP's stack; CR4 is
    ///   the firmware's (PAE, 4-level paging).
    /// - Each `stack_top_for(i)` is the top of a stack of enough size that
    ///   only CPU `i` uses, for as long as it runs.
    pub unsafe fn start_aps(
        mailbox: &Mailbox,
        bsp_apic_id: u32,
        apic_ids: &[u32],
        config: &WakeupConfig<'_>,
    ) -> Result<usize, SmpError> {
        smp::claim_ap_start(bsp_apic_id, apic_ids, || Ok(()))?;
        let vector = bare_mpwakeup_ap_entry as *const () as u64;
        let params = &WAKEUP_PARAMS;
        smp::start_one_by_one(bsp_apic_id, apic_ids, config.stack_top_for, |ap| {
            let apic_id = ap.apic_id;
            params.stage.store(0, Ordering::Relaxed);
            params.woken_apic_id.store(NOT_WOKEN, Ordering::Relaxed);
            params.cr3.store(config.cr3, Ordering::Relaxed);
            params.stack_top.store(ap.stack_top, Ordering::Relaxed);
            params.cpu_index.store(ap.index as u64, Ordering::Relaxed);
            params
                .kernel_entry
                .store(config.entry as *const () as u64, Ordering::Relaxed);
            // The AP reads the block after the firmware saw the command,
            // which was stored after this fence.
            fence(Ordering::SeqCst);
            wake(mailbox, apic_id, vector, |taken| {
                crate::tsc::wait_until(config.timeout_us, taken)
            })
            .map_err(|error| SmpError::Wakeup { apic_id, error })?;
            if !crate::tsc::wait_until(config.timeout_us, || ap.is_online()) {
                return Err(SmpError::ApTimeout {
                    apic_id,
                    reached: ApStage::from_marker(params.stage.load(Ordering::Acquire)),
                    online: ap.online_before,
                });
            }
            let woke = params.woken_apic_id.load(Ordering::Acquire);
            if woke != apic_id {
                return Err(SmpError::WrongApWoke {
                    asked: apic_id,
                    woke,
                });
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::time::{Duration, Instant};

    /// A bounded wait on the host clock.
    fn wait_up_to(limit: Duration) -> impl FnOnce(&mut dyn FnMut() -> bool) -> bool {
        move |condition| {
            let start = Instant::now();
            while start.elapsed() < limit {
                if condition() {
                    return true;
                }
                std::thread::yield_now();
            }
            condition()
        }
    }

    #[test]
    fn layout_is_the_acpi_one() {
        use core::mem::{offset_of, size_of};
        assert_eq!(offset_of!(Mailbox, command), 0);
        assert_eq!(offset_of!(Mailbox, reserved), 2);
        assert_eq!(offset_of!(Mailbox, apic_id), 4);
        assert_eq!(offset_of!(Mailbox, wakeup_vector), 8);
        assert_eq!(size_of::<Mailbox>(), 16);
        assert_eq!((command::NOOP, command::WAKEUP), (0, 1));
    }

    #[test]
    fn a_posted_wakeup_is_taken_only_by_its_ap() {
        let mailbox = Mailbox::new();
        assert!(mailbox.taken());
        mailbox.post_wakeup(3, 0x10_2000).unwrap();
        assert!(!mailbox.taken());
        assert_eq!(mailbox.take_wakeup_for(2), None);
        assert!(!mailbox.taken());
        assert_eq!(mailbox.take_wakeup_for(3), Some(0x10_2000));
        assert!(mailbox.taken());
        // Taken once: the same AP does not see it again.
        assert_eq!(mailbox.take_wakeup_for(3), None);
    }

    #[test]
    fn posting_over_a_command_not_taken_is_refused_and_changes_nothing() {
        let mailbox = Mailbox::new();
        mailbox.post_wakeup(1, 0x1000).unwrap();
        assert_eq!(
            mailbox.post_wakeup(2, 0x2000),
            Err(WakeupError::Busy {
                command: command::WAKEUP
            })
        );
        assert_eq!(mailbox.take_wakeup_for(1), Some(0x1000));
    }

    #[test]
    fn wake_returns_once_the_firmware_took_the_command() {
        let mailbox = Mailbox::new();
        let started = AtomicBool::new(false);
        std::thread::scope(|scope| {
            scope.spawn(|| loop {
                if let Some(vector) = mailbox.take_wakeup_for(7) {
                    assert_eq!(vector, 0xabc000);
                    started.store(true, Ordering::SeqCst);
                    break;
                }
                std::thread::yield_now();
            });
            let woken = wake(&mailbox, 7, 0xabc000, wait_up_to(Duration::from_secs(10)));
            assert_eq!(woken, Ok(()));
        });
        assert!(started.load(Ordering::SeqCst));
    }

    #[test]
    fn wake_times_out_when_no_firmware_answers() {
        let mailbox = Mailbox::new();
        assert_eq!(
            wake(&mailbox, 7, 0xabc000, wait_up_to(Duration::from_millis(20))),
            Err(WakeupError::NotTaken)
        );
        // The command stays posted: the next wakeup is refused, not lost.
        assert_eq!(
            wake(&mailbox, 8, 0xabc000, wait_up_to(Duration::from_millis(20))),
            Err(WakeupError::Busy {
                command: command::WAKEUP
            })
        );
    }
}
