//! The conversion engine on this machine: the kernel's tables, its frame
//! allocator, and hooks that do the real thing (vmalloc purge, IPI TLB
//! shootdown, CLFLUSH through a per-CPU window).

use super::memory::{DirectMap, FrameAllocator, DIRECT_MAP, FRAMES};
use super::{cacheflush, shootdown, snp, td, vmalloc};
use bare::println;
use coco_pagetable::VirtAddr;
use coco_pagetable::{CcMask, PagingMode, PhysAddr};
use core::sync::atomic::{AtomicBool, Ordering};
use set_memory_enc::platform::{NoCc, SnpError, Tdx, TdxError};
use set_memory_enc::{Converter, Direction, GpaRun, Machine, NotifyError, Platform, Step};
use tdx_hypercall::TdcallInstruction;

/// Hooks for this kernel.
pub struct GuestMachine;

impl Machine for GuestMachine {
    fn remove_aliases(&self, run: &GpaRun) {
        vmalloc::purge_lazy_aliases(run.gpa.0, run.gpa_end().0, engine().platform().cc_mask());
    }
    fn flush_tlb_all(&self) {
        shootdown::flush_all_cpus();
    }
    fn flush_caches(&self, run: &GpaRun, direction: Direction) {
        // Until step 6 the frames are in the state the conversion leaves.
        let shared_now = direction == Direction::ToPrivate;
        cacheflush::flush_frames(run, shared_now, engine().platform().cc_mask());
    }
    fn on_step(&self, step: Step, direction: Direction, va: VirtAddr, pages: u64) {
        if TRACE.load(Ordering::Relaxed) {
            trace_entry(
                &format_args!("step={} {step:?}", step as u8),
                direction,
                va,
                pages,
            );
        }
    }
}

/// Print each step of conversions while set (for `make run`).
pub static TRACE: AtomicBool = AtomicBool::new(false);

/// One `TRACE` line: the leaf entry of `va` as it is now (value, present,
/// shared, frame), and in a TD or an SNP guest the emulator's state of its
/// page right after (its page-state probe, port 0xfc, prints a `TDXEMU
/// page=` or `SNPEMU page=` line).
pub fn trace_entry(what: &dyn core::fmt::Display, direction: Direction, va: VirtAddr, pages: u64) {
    let cc = engine().platform().cc_mask();
    match engine().tables().lookup_address(va) {
        Ok(leaf) => {
            let frame = cc.leaf_frame(leaf.entry, leaf.level()).0 + (va.0 - leaf.va.0);
            println!(
                "TRACE {what} direction={direction:?} pages={pages} va={va} entry={:#018x} present={} shared={} frame={frame:#x}",
                leaf.entry.0,
                u8::from(leaf.entry.is_present()),
                u8::from(cc.is_shared(leaf.entry))
            );
            if super::confidential() {
                // SAFETY: port 0xfc is the emulator's page-state probe; the
                // write changes nothing (a #VE the handler turns into the
                // IO TDVMCALL, or a #VC it turns into the GHCB's IOIO).
                unsafe { bare::cpu::outl(0xfc, (frame >> 12) as u32) };
            }
        }
        Err(e) => println!("TRACE {what} va={va} not mapped: {e:?}"),
    }
}

/// The platform this kernel runs on, chosen at boot: an ordinary VM, a TD
/// or an SEV-SNP guest. One type for all, so the engine and everything that
/// names it is the same code either way.
pub enum GuestPlatform {
    /// An ordinary VM.
    NoCc(NoCc),
    /// A TD: MapGPA and ACCEPT, the shared bit from TDG.VP.INFO.
    Tdx(Tdx<&'static TdcallInstruction>),
    /// An SNP guest: page state change through the GHCB, PVALIDATE through
    /// this CPU's window, the C-bit from CPUID.
    Snp(snp::SnpPlatform),
}

/// Why a notification failed, on whichever platform this is.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum GuestError {
    /// The TDX platform's.
    Tdx(TdxError),
    /// The SNP platform's.
    Snp(SnpError),
}

/// The platform's own error as it is: reports read `MapGpa(...)` or
/// `Pvalidate { .. }`, whatever the platform.
impl core::fmt::Debug for GuestError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            GuestError::Tdx(e) => e.fmt(f),
            GuestError::Snp(e) => e.fmt(f),
        }
    }
}

impl GuestPlatform {
    /// The TDX platform in a TD ([`td::enter_if_td`] ran), the SNP one in an
    /// SNP guest ([`snp::enter_if_snp`] ran), else `NoCc`.
    pub fn for_this_machine() -> GuestPlatform {
        if let Some(snp) = snp::platform() {
            return GuestPlatform::Snp(snp);
        }
        match td::tdcall() {
            None => GuestPlatform::NoCc(NoCc),
            Some(tdcall) => match Tdx::new(tdcall) {
                Ok(tdx) => GuestPlatform::Tdx(tdx),
                Err(e) => panic!("TDX platform: {e:?}"),
            },
        }
    }

    /// The TDX platform, in a TD.
    pub fn tdx(&self) -> Option<&Tdx<&'static TdcallInstruction>> {
        match self {
            GuestPlatform::Tdx(tdx) => Some(tdx),
            _ => None,
        }
    }

    /// The SNP platform, in an SNP guest.
    pub fn snp(&self) -> Option<&snp::SnpPlatform> {
        match self {
            GuestPlatform::Snp(snp) => Some(snp),
            _ => None,
        }
    }

    /// `td`, `snp` or `plain`.
    pub fn name(&self) -> &'static str {
        match self {
            GuestPlatform::NoCc(_) => "plain",
            GuestPlatform::Tdx(_) => "td",
            GuestPlatform::Snp(_) => "snp",
        }
    }
}

fn with_cause<E: Copy>(
    e: NotifyError<E>,
    wrap: impl Fn(E) -> GuestError,
) -> NotifyError<GuestError> {
    NotifyError {
        consistent_up_to: e.consistent_up_to,
        cause: wrap(e.cause),
    }
}

impl Platform for GuestPlatform {
    type Error = GuestError;

    fn cc_mask(&self) -> CcMask {
        match self {
            GuestPlatform::NoCc(p) => p.cc_mask(),
            GuestPlatform::Tdx(p) => p.cc_mask(),
            GuestPlatform::Snp(p) => p.cc_mask(),
        }
    }
    fn needs_cache_flush(&self, direction: Direction) -> bool {
        match self {
            GuestPlatform::NoCc(p) => p.needs_cache_flush(direction),
            GuestPlatform::Tdx(p) => p.needs_cache_flush(direction),
            GuestPlatform::Snp(p) => p.needs_cache_flush(direction),
        }
    }
    fn notify(&self, run: &GpaRun, direction: Direction) -> Result<(), NotifyError<GuestError>> {
        match self {
            GuestPlatform::NoCc(p) => p.notify(run, direction).map_err(|e| match e.cause {}),
            GuestPlatform::Tdx(p) => p
                .notify(run, direction)
                .map_err(|e| with_cause(e, GuestError::Tdx)),
            GuestPlatform::Snp(p) => p
                .notify(run, direction)
                .map_err(|e| with_cause(e, GuestError::Snp)),
        }
    }
}

/// The engine type.
pub type Engine = Converter<DirectMap, &'static FrameAllocator, GuestMachine, GuestPlatform>;

static ENGINE: spin::Once<Engine> = spin::Once::new();

/// Creates the engine over the live tables rooted at `root`.
pub fn init(root: PhysAddr, platform: GuestPlatform) -> &'static Engine {
    if let Err(e) = cacheflush::init(platform.cc_mask()) {
        panic!("flush windows: {e:?}");
    }
    ENGINE.call_once(|| {
        // SAFETY: `root` is the live kernel tables (`memory::build_tables`),
        // whose frames DIRECT_MAP reaches and FRAMES hands out, changed only
        // by atomic writes: this engine's and the kernel's own.
        unsafe {
            Converter::new(
                DIRECT_MAP,
                root,
                PagingMode::FourLevel,
                &FRAMES,
                GuestMachine,
                platform,
            )
        }
    })
}

/// The engine, if `init` ran (for fault handlers, which may run before).
pub fn try_engine() -> Option<&'static Engine> {
    ENGINE.get()
}

/// The engine (after `init`).
pub fn engine() -> &'static Engine {
    ENGINE.get().expect("engine used before init")
}

/// What conversions cost this kernel, from its own counters: shootdowns
/// and their IPIs, MapGPA calls, successful ACCEPTs of any size, pages step
/// 4 flushed (the last three zero outside a TD).
#[derive(Clone, Copy, Default)]
pub struct ConversionWork {
    pub shootdowns: u64,
    pub ipis: u64,
    pub map_gpa: u64,
    pub accepts: u64,
    pub flushed_pages: u64,
}

impl ConversionWork {
    /// The counters now.
    pub fn now() -> ConversionWork {
        let load = |counter: &core::sync::atomic::AtomicU64| counter.load(Ordering::SeqCst);
        let sent = engine().platform().tdx().map(|tdx| tdx.counters());
        ConversionWork {
            shootdowns: load(&shootdown::SHOOTDOWNS),
            ipis: load(&shootdown::IPIS_SENT),
            map_gpa: sent.map_or(0, |c| load(&c.map_gpa_calls)),
            accepts: sent.map_or(0, |c| c.accepted.iter().map(load).sum()),
            flushed_pages: load(&cacheflush::FLUSHED_PAGES),
        }
    }

    /// What happened between `before` and `self`.
    pub fn since(self, before: ConversionWork) -> ConversionWork {
        ConversionWork {
            shootdowns: self.shootdowns - before.shootdowns,
            ipis: self.ipis - before.ipis,
            map_gpa: self.map_gpa - before.map_gpa,
            accepts: self.accepts - before.accepts,
            flushed_pages: self.flushed_pages - before.flushed_pages,
        }
    }

    /// Adds `other` to these totals.
    pub fn add(&mut self, other: ConversionWork) {
        self.shootdowns += other.shootdowns;
        self.ipis += other.ipis;
        self.map_gpa += other.map_gpa;
        self.accepts += other.accepts;
        self.flushed_pages += other.flushed_pages;
    }
}
