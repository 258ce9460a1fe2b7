//! Private<->shared conversion of guest memory in a confidential VM, without
//! ever letting an access meet a page in the other state.
//!
//! A conversion changes two things that cannot change at once: the C/S bit in
//! the guest's page-table entries and the hypervisor's (or TDX module's) view
//! of the page. An access in between raises a CoCo exception (#VE on TDX), and
//! `load_unaligned_zeropad()` may make such an access at any moment, reading
//! across a page boundary into the page being converted. So every conversion
//! here makes the entries non-present first (Michael Kelley's design, merged in
//! Linux only for Hyper-V vTOM), and a racing access takes an ordinary #PF,
//! which the exception-table fixup handles:
//!
//! 1. remove aliasing mappings of the frames ([`Machine::remove_aliases`])
//! 2. clear PRESENT in every leaf entry of the range
//! 3. flush the TLB on all CPUs and wait ([`Machine::flush_tlb_all`])
//! 4. flush caches if the platform needs it ([`Platform::needs_cache_flush`])
//! 5. flip the C/S bit in the non-present entries
//! 6. notify the hypervisor ([`Platform::notify`]) with frames read back from
//!    the non-present entries
//! 7. set PRESENT again (adding permission needs no flush)
//!
//! See [`Converter::set_memory_shared`]. Failure policy: bad input changes
//! nothing; a hypervisor failure after step 2 leaves the pages whose state is
//! unknown non-present and returns them as [`Quarantine`]: never reuse them.
//!
//! # Example
//!
//! A kernel supplies its table memory, a frame allocator, a [`Machine`] and a
//! [`Platform`]. Here they are the host doubles, and the platform is an
//! ordinary VM ([`platform::NoCc`]); a TD would use
//! `platform::Tdx::new(unsafe { tdx_hypercall::TdcallInstruction::new() })`.
//!
//! ```
//! # #[cfg(feature = "sim")] {
//! use coco_pagetable::{sim::SimMemory, Level, PagingMode, PhysAddr, PteFlags, VirtAddr};
//! use set_memory_enc::{platform::NoCc, sim::RecordingMachine, ConvError, Converter};
//!
//! let memory = SimMemory::new(PhysAddr(0x10_0000_0000), 16);
//! let root = memory.allocate_zeroed();
//! // SAFETY: a zeroed root of the simulated memory, which also allocates.
//! let engine = unsafe {
//!     Converter::new(&memory, root, PagingMode::FourLevel, &memory,
//!                    RecordingMachine::default(), NoCc)
//! };
//! // A 2 MiB direct-map leaf.
//! let va = VirtAddr(0xffff_8880_0000_0000);
//! let flags = PteFlags::PRESENT | PteFlags::WRITABLE;
//! engine.tables().map_leaf(va, PhysAddr(0), Level::Pd, flags, false, &&memory).unwrap();
//!
//! // Share one page: the 2M leaf is split, only that page changes.
//! let stats = engine.set_memory_shared(VirtAddr(va.0 + 0x3000), 1).unwrap();
//! assert_eq!((stats.splits, stats.runs), (1, 1));
//! // Sharing it again is refused and changes nothing.
//! assert_eq!(engine.set_memory_shared(VirtAddr(va.0 + 0x3000), 1),
//!            Err(ConvError::AlreadyInTargetState(VirtAddr(va.0 + 0x3000))));
//! engine.set_memory_private(VirtAddr(va.0 + 0x3000), 1).unwrap();
//! # }
//! ```
//!
//! # In a kernel that uses the `x86_64` crate
//!
//! Feature `x86_64` (coco-pagetable's, forwarded): a blog_os-style kernel
//! has a physical-memory offset and a `FrameAllocator`, and that is all the
//! tables need: [`coco_pagetable::OffsetTableMemory`] and
//! [`coco_pagetable::x86_64_interop::LockedFrameAllocator`]. Two rules
//! (see `x86_64_interop`): no `OffsetPageTable` may change the tables while
//! a conversion runs, and the kernel's [`Machine::flush_tlb_all`] must drop
//! global entries, which `x86_64::instructions::tlb::flush_all` does not.
//! Here host memory stands in for RAM, and the test double
//! [`sim::RecordingMachine`] for the kernel's `Machine`.
//!
//! ```
//! # #[cfg(all(feature = "sim", feature = "x86_64"))] {
//! use coco_pagetable::{x86_64_interop::LockedFrameAllocator, OffsetTableMemory};
//! use coco_pagetable::{PagingMode, PhysAddr, TableAllocator, VirtAddr};
//! use set_memory_enc::{platform::NoCc, sim::RecordingMachine, Converter};
//! use x86_64::structures::paging::{
//!     FrameAllocator, Mapper, OffsetPageTable, Page, PageTable, PageTableFlags, PhysFrame,
//!     Size4KiB,
//! };
//!
//! // The kernel's frame allocator (blog_os: BootInfoFrameAllocator).
//! struct BootFrames { next: u64, end: u64 }
//! // SAFETY: each frame of [next, end) is unused RAM, handed out once.
//! unsafe impl FrameAllocator<Size4KiB> for BootFrames {
//!     fn allocate_frame(&mut self) -> Option<PhysFrame> {
//!         let frame = (self.next < self.end).then_some(self.next)?;
//!         self.next += 4096;
//!         PhysFrame::from_start_address(x86_64::PhysAddr::new(frame)).ok()
//!     }
//! }
//! # let layout = std::alloc::Layout::from_size_align(16 << 12, 4096).unwrap();
//! # // SAFETY: a valid, non-zero layout; never freed (the example ends).
//! # let host = unsafe { std::alloc::alloc_zeroed(layout) } as u64;
//! # let ram_start = 0x20_0000u64;
//! // From the bootloader (here: host memory playing RAM at `ram_start`).
//! let physical_memory_offset = x86_64::VirtAddr::new(host - ram_start);
//! // SAFETY: its frames are RAM mapped at the offset, like all of it.
//! let frames = unsafe {
//!     LockedFrameAllocator::new(BootFrames { next: ram_start, end: ram_start + (16 << 12) })
//! };
//! let root = frames.allocate_table().unwrap(); // a kernel: Cr3::read()
//!
//! // The kernel maps a buffer as it always does, then lets the mapper go.
//! let buffer = Page::<Size4KiB>::from_start_address(x86_64::VirtAddr::new(0xffff_c900_0000_0000)).unwrap();
//! let frame = PhysFrame::from_start_address(x86_64::PhysAddr::new(ram_start + (15 << 12))).unwrap();
//! {
//!     // SAFETY: the root is a page table at `physical_memory_offset`.
//!     let level_4 = unsafe { &mut *((root.0 + physical_memory_offset.as_u64()) as *mut PageTable) };
//!     // SAFETY: all RAM is mapped at the offset.
//!     let mut mapper = unsafe { OffsetPageTable::new(level_4, physical_memory_offset) };
//!     let flags = PageTableFlags::PRESENT | PageTableFlags::WRITABLE | PageTableFlags::NO_EXECUTE;
//!     // SAFETY: the frame is used for nothing else; a kernel flush()es.
//!     frames.with(|a| unsafe { mapper.map_to(buffer, frame, flags, a) }).unwrap().ignore();
//! }
//!
//! // SAFETY: all RAM, the tables' frames included, is mapped at the offset.
//! let memory = unsafe { OffsetTableMemory::new(physical_memory_offset.as_u64()) };
//! // In a TD: platform::Tdx::new(tdcall), and the kernel's own Machine.
//! // SAFETY: `root` is the kernel's tables, built by the mapper, now dropped:
//! // nothing but the engine changes them while it converts.
//! let engine = unsafe {
//!     Converter::new(memory, root, PagingMode::FourLevel, &frames,
//!                    RecordingMachine::default(), NoCc)
//! };
//! let va = VirtAddr::from(buffer.start_address());
//! engine.set_memory_shared(va, 1).unwrap();
//! // ... the device or the host reads the buffer ...
//! engine.set_memory_private(va, 1).unwrap();
//! assert_eq!(engine.tables().lookup_address(va).unwrap().entry.0 & 0xf_ffff_ffff_f000,
//!            PhysAddr::from(frame).0);
//! # }
//! ```
#![cfg_attr(not(any(test, feature = "sim")), no_std)]
#![deny(unsafe_code)]
#![warn(missing_docs)]

mod inflight;
pub mod platform;
#[cfg(any(test, feature = "sim"))]
pub mod sim;

use coco_pagetable::{
    CcMask, Leaf, LeafSpan, PageTables, PhysAddr, Pte, PteFlags, TableAllocator, TableError,
    TableMemory, VirtAddr, WalkError, PAGE_SIZE,
};
pub use inflight::MAX_IN_FLIGHT;
use inflight::{InFlight, ReserveError};

/// Which way a conversion goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Private -> shared (Linux: `set_memory_decrypted`).
    ToShared,
    /// Shared -> private (Linux: `set_memory_encrypted`).
    ToPrivate,
}

/// A piece of the range that is contiguous both virtually and physically: the
/// unit the hypervisor is told about, once each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpaRun {
    /// First virtual address.
    pub va: VirtAddr,
    /// First guest-physical address, without the C/S bit.
    pub gpa: PhysAddr,
    /// Length in bytes (a multiple of 4K).
    pub bytes: u64,
}

impl GpaRun {
    /// One past the last guest-physical address.
    pub const fn gpa_end(&self) -> PhysAddr {
        PhysAddr(self.gpa.0.saturating_add(self.bytes))
    }
    /// Whether the run is what the engine hands a platform: non-empty,
    /// 4K-aligned, and inside the 52-bit physical address space. A
    /// platform refuses anything else before it tells the hypervisor.
    pub const fn is_well_formed(&self) -> bool {
        self.bytes != 0
            && self.gpa.0.is_multiple_of(PAGE_SIZE)
            && self.bytes.is_multiple_of(PAGE_SIZE)
            && match self.gpa.0.checked_add(self.bytes) {
                Some(end) => end <= 1 << 52,
                None => false,
            }
    }
    /// Number of 4K pages.
    pub const fn pages(&self) -> u64 {
        self.bytes / PAGE_SIZE
    }
}

/// A hypervisor notification that failed part-way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotifyError<E> {
    /// `[run.gpa, consistent_up_to)` fully reached the target state; nothing
    /// is known of the rest of the run.
    pub consistent_up_to: PhysAddr,
    /// What the platform saw.
    pub cause: E,
}

/// What differs between confidential-computing platforms. The engine calls
/// nothing else, so SEV-SNP (PSC + PVALIDATE through a temporary private
/// mapping) and Hyper-V vTOM (host-visibility hypercall) fit behind it.
pub trait Platform {
    /// The platform's failure report.
    type Error: core::fmt::Debug + Clone + Copy;
    /// The C/S bits of this platform's entries.
    fn cc_mask(&self) -> CcMask;
    /// Step 4: whether caches must be written back before the pages change
    /// state in `direction`.
    fn needs_cache_flush(&self, direction: Direction) -> bool;
    /// Step 6: make the hypervisor's view of `run` match `direction` (TDX:
    /// MapGPA, then ACCEPT when going private). Called while every entry of
    /// the run is non-present and already carries the new C/S bit.
    fn notify(&self, run: &GpaRun, direction: Direction) -> Result<(), NotifyError<Self::Error>>;
}

/// The steps, numbered as in the design.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// 1: remove aliasing mappings.
    RemoveAliases = 1,
    /// 2: clear PRESENT.
    ClearPresent = 2,
    /// 3: flush TLBs on all CPUs.
    FlushTlb = 3,
    /// 4: flush caches (only when the platform needs it).
    FlushCaches = 4,
    /// 5: flip the C/S bit.
    FlipEncoding = 5,
    /// 6: notify the hypervisor.
    NotifyHypervisor = 6,
    /// 7: set PRESENT.
    SetPresent = 7,
}

/// What the kernel provides: the CPU-wide operations the steps need.
pub trait Machine {
    /// Step 1: remove every other mapping of the frames of `run` (lazily
    /// freed vmalloc-style aliases); their TLB entries go in step 3.
    fn remove_aliases(&self, run: &GpaRun);
    /// Step 3: invalidate all TLBs on all CPUs (global entries included) and
    /// return only when every CPU has acknowledged.
    fn flush_tlb_all(&self);
    /// Step 4: write back and invalidate the caches for `run`'s frames. Their
    /// entries are non-present, and the frames are still in the state
    /// `direction` leaves: a flush that needs a mapping (CLFLUSH) must map
    /// them in that state, privately to this CPU. WBINVD would do without a
    /// mapping, but it is a #VE in a TD.
    fn flush_caches(&self, run: &GpaRun, direction: Direction);
    /// Called as each step starts, for tracing. Default: nothing.
    fn on_step(&self, step: Step, direction: Direction, va: VirtAddr, pages: u64) {
        let _ = (step, direction, va, pages);
    }
}

/// Memory a failed conversion leaves behind in an unknown state. Its entries
/// stay non-present. **It must never be reused**: not freed, not mapped again
/// (Linux and COCONUT-SVSM leak such memory; freeing it was CVE-2024-35939).
/// Pages of the call before `va` reached the target state and are usable;
/// pages after it were rolled back to their original state and are usable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quarantine<E> {
    /// First virtual address that is quarantined.
    pub va: VirtAddr,
    /// Its guest-physical address.
    pub gpa: PhysAddr,
    /// Quarantined bytes, from `va`.
    pub bytes: u64,
    /// What the platform reported.
    pub cause: E,
}

/// Why a conversion did not happen. Every variant but [`ConvError::Quarantined`],
/// [`ConvError::QuarantinedAndTablesChanged`] and [`ConvError::TablesChanged`]
/// means no entry was changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvError<E> {
    /// The address is not 4K aligned.
    Unaligned(VirtAddr),
    /// Zero pages asked for.
    ZeroLength,
    /// The range wraps around the address space.
    Overflow,
    /// Part of the range is not canonical.
    NonCanonical(VirtAddr),
    /// Part of the range is not mapped.
    NotMapped(VirtAddr),
    /// Part of the range is mapped non-present (quarantined, or not ours).
    NotPresent(VirtAddr),
    /// Part of the range is already in the target state.
    AlreadyInTargetState(VirtAddr),
    /// The page maps frame 0 with no flag but PRESENT (and PS): without
    /// PRESENT its entry would be all zero, which every walk reads as
    /// "nothing mapped", so the mapping would be lost at step 2. Map it
    /// with any other flag (ACCESSED, say) to convert it.
    ZeroWhenNotPresent(VirtAddr),
    /// The range overlaps a conversion in progress on another CPU.
    Busy {
        /// Start of the conversion in progress.
        start: VirtAddr,
        /// Its end.
        end: VirtAddr,
    },
    /// Conversions were stopped ([`Converter::stop_conversions`]).
    Stopped,
    /// [`Converter::retire`]: the range maps more than one contiguous run of
    /// frames; the second starts here.
    Discontiguous(VirtAddr),
    /// More than [`MAX_IN_FLIGHT`] conversions in progress.
    TooManyInFlight,
    /// No memory for the page tables a split needs.
    OutOfTableMemory,
    /// The hypervisor failed mid-way; see [`Quarantine`].
    Quarantined(Quarantine<E>),
    /// The hypervisor failed mid-way (`quarantine`), and then restoring
    /// the pages around the quarantine stopped at `at` because the tables
    /// had changed under the engine: every page from `at` to the end of the
    /// range is left non-present too, in an unknown state. Never reuse any
    /// of them.
    QuarantinedAndTablesChanged {
        /// What the hypervisor's failure left.
        quarantine: Quarantine<E>,
        /// Where restoring stopped.
        at: VirtAddr,
    },
    /// An entry of the reserved range changed under the engine: someone broke
    /// the rule that only the engine touches a range while converting it.
    TablesChanged(VirtAddr),
}

/// What a successful conversion did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConvStats {
    /// 4K pages converted.
    pub pages: u64,
    /// Leaf entries changed (a 2M leaf counts once).
    pub leaves: u64,
    /// Large leaves split because the range covered them partially.
    pub splits: u32,
    /// Hypervisor notifications (one per contiguous GPA run).
    pub runs: u64,
}

/// The conversion engine for one address space. Share it between CPUs:
/// conversions of disjoint ranges run concurrently.
pub struct Converter<M, A, K, P> {
    tables: PageTables<M>,
    allocator: A,
    machine: K,
    platform: P,
    in_flight: InFlight,
}

/// A validated `[start, end)`.
#[derive(Clone, Copy)]
struct Range {
    start: u64,
    end: u64,
}

impl<M, A, K, P> Converter<M, A, K, P>
where
    M: TableMemory,
    A: TableAllocator,
    K: Machine,
    P: Platform,
{
    /// An engine over the tables rooted at `root`. The tables' C/S bits are
    /// taken from the platform, so the two cannot disagree.
    ///
    /// # Safety
    /// As [`PageTables::new`] for `memory` and `root`; `allocator` hands out
    /// frames of `memory` (its `TableAllocator` contract).
    #[allow(unsafe_code)]
    pub unsafe fn new(
        memory: M,
        root: PhysAddr,
        mode: coco_pagetable::PagingMode,
        allocator: A,
        machine: K,
        platform: P,
    ) -> Self {
        // SAFETY: this function's contract.
        let tables = unsafe { PageTables::new(memory, root, mode, platform.cc_mask()) };
        Converter {
            tables,
            allocator,
            machine,
            platform,
            in_flight: InFlight::new(),
        }
    }

    /// The page tables (for walks, mappings and tests).
    pub fn tables(&self) -> &PageTables<M> {
        &self.tables
    }
    /// The kernel hooks.
    pub fn machine(&self) -> &K {
        &self.machine
    }
    /// The platform.
    pub fn platform(&self) -> &P {
        &self.platform
    }

    /// Makes `pages` 4K pages from `va` shared with the hypervisor.
    pub fn set_memory_shared(
        &self,
        va: VirtAddr,
        pages: u64,
    ) -> Result<ConvStats, ConvError<P::Error>> {
        self.convert(va, pages, Direction::ToShared)
    }

    /// Makes `pages` 4K pages from `va` private again.
    pub fn set_memory_private(
        &self,
        va: VirtAddr,
        pages: u64,
    ) -> Result<ConvStats, ConvError<P::Error>> {
        self.convert(va, pages, Direction::ToPrivate)
    }

    /// Stops all conversions (before kexec: the next kernel must find the
    /// memory states the tables say). Waits for those in progress; later
    /// calls fail with [`ConvError::Stopped`].
    pub fn stop_conversions(&self) {
        self.in_flight.stop();
    }

    /// Whether [`Converter::stop_conversions`] was called.
    pub fn conversions_stopped(&self) -> bool {
        self.in_flight.is_stopped()
    }

    /// The seven steps, in order. Everything before step 1 only reads, except
    /// splitting large leaves that straddle the range's ends, which cannot
    /// fail once its memory is allocated.
    pub fn convert(
        &self,
        va: VirtAddr,
        pages: u64,
        direction: Direction,
    ) -> Result<ConvStats, ConvError<P::Error>> {
        let (range, _reservation, mut stats, runs) = self.prepare(va, pages, direction)?;
        let cc = self.tables.cc_mask();
        let trace = |step| self.machine.on_step(step, direction, va, pages);

        trace(Step::RemoveAliases);
        self.for_each_run(range, &runs, |run| {
            self.machine.remove_aliases(run);
            Ok(())
        })?;

        // The leaves are final now (the boundaries are split): step 2 finds
        // where their entries are, and steps 5 and 7 write them there.
        trace(Step::ClearPresent);
        let mut spans = Spans::default();
        self.for_each_leaf(range, |leaf| {
            stats.leaves += 1;
            spans.add(LeafSpan::of(leaf), |last, _| last.extend(leaf));
            self.update(leaf, |e| Pte(e.0 & !PteFlags::PRESENT.bits()))
        })?;

        trace(Step::FlushTlb);
        self.machine.flush_tlb_all();

        if self.platform.needs_cache_flush(direction) {
            trace(Step::FlushCaches);
            self.for_each_run(range, &runs, |run| {
                self.machine.flush_caches(run, direction);
                Ok(())
            })?;
        }

        trace(Step::FlipEncoding);
        self.update_leaves(range, &spans, |e| reencode(cc, e, direction))?;

        // The frames come from the entries we just made non-present. That is
        // sound only because the range is reserved: no one else may change
        // or reuse these entries until step 7 (lookup_address() style).
        trace(Step::NotifyHypervisor);
        let failure = self.notify_runs(range, &runs, direction, &mut stats)?;

        trace(Step::SetPresent);
        match failure {
            None => {
                self.update_leaves(range, &spans, |e| Pte(e.0 | PteFlags::PRESENT.bits()))?;
                Ok(stats)
            }
            Some(quarantine) => match self.finish_after_failure(range, &quarantine, direction) {
                Ok(()) => Err(ConvError::Quarantined(quarantine)),
                Err(at) => Err(ConvError::QuarantinedAndTablesChanged { quarantine, at }),
            },
        }
    }

    /// Takes `pages` pages at `va` out of service for good, telling the
    /// hypervisor nothing: steps 1 to 3, after which the entries stay
    /// non-present. For memory the platform reports lost behind the
    /// kernel's back (TDX: an EPT-violation #VE on a private GPA, the VMM
    /// took the page; SEV-SNP: #VC 0x404, the hypervisor unvalidated it):
    /// its contents are gone and its state is the hypervisor's choice, so it
    /// is quarantined as a failed conversion's leftovers are, with `cause`
    /// saying why. The pages may be in either state, and must map one
    /// contiguous run of frames (a quarantine names one): retire each run on
    /// its own. A large leaf the range covers partly is split first.
    pub fn retire(
        &self,
        va: VirtAddr,
        pages: u64,
        cause: P::Error,
    ) -> Result<Quarantine<P::Error>, ConvError<P::Error>> {
        let range = self.check_arguments(va, pages)?;
        let _reservation = self.reserve(range)?;
        let runs = self.check_source_state(range, None)?;
        match runs.all().map(|mut all| all.nth(1).copied()) {
            Some(None) => {}
            Some(Some(second)) => return Err(ConvError::Discontiguous(second.va)),
            None => return Err(ConvError::Discontiguous(va)),
        }
        self.split_boundaries(range)?;
        self.for_each_run(range, &runs, |run| {
            self.machine.remove_aliases(run);
            Ok(())
        })?;
        let cc = self.tables.cc_mask();
        let mut gpa = None;
        self.for_each_leaf(range, |leaf| {
            // The walk visits the leaf at `va` first (split to start there).
            gpa.get_or_insert_with(|| {
                cc.leaf_frame(leaf.entry, leaf.level()).0 + (va.0 - leaf.va.0)
            });
            self.update(leaf, |e| Pte(e.0 & !PteFlags::PRESENT.bits()))
        })?;
        self.machine.flush_tlb_all();
        Ok(Quarantine {
            va,
            gpa: PhysAddr(gpa.unwrap_or_default()),
            bytes: range.end - range.start,
            cause,
        })
    }

    /// The legacy order, kept only as a negative control for tests: flip the
    /// C/S bit in the live entries, flush TLBs (and caches, where the
    /// platform needs it, as Linux does: so that a cost comparison measures
    /// only the non-present window's work), notify. Between the flip and
    /// the notification an access meets a page in the other state.
    #[cfg(feature = "negative-control")]
    pub fn convert_in_legacy_order(
        &self,
        va: VirtAddr,
        pages: u64,
        direction: Direction,
    ) -> Result<ConvStats, ConvError<P::Error>> {
        let (range, _reservation, mut stats, runs) = self.prepare(va, pages, direction)?;
        let cc = self.tables.cc_mask();
        self.for_each_leaf(range, |leaf| {
            stats.leaves += 1;
            self.update(leaf, |e| reencode(cc, e, direction))
        })?;
        self.machine.flush_tlb_all();
        if self.platform.needs_cache_flush(direction) {
            self.for_each_run(range, &runs, |run| {
                self.machine.flush_caches(run, direction);
                Ok(())
            })?;
        }
        match self.notify_runs(range, &runs, direction, &mut stats)? {
            None => Ok(stats),
            Some(quarantine) => Err(ConvError::Quarantined(quarantine)),
        }
    }

    /// Everything before step 1: validation (read-only), the reservation
    /// that keeps other conversions off the range until it is dropped, the
    /// GPA runs (found by the validation's walk), and the boundary splits.
    #[allow(clippy::type_complexity)]
    fn prepare(
        &self,
        va: VirtAddr,
        pages: u64,
        direction: Direction,
    ) -> Result<(Range, inflight::Reservation<'_>, ConvStats, Runs), ConvError<P::Error>> {
        let range = self.check_arguments(va, pages)?;
        let reservation = self.reserve(range)?;
        let runs = self.check_source_state(range, Some(direction))?;
        let splits = self.split_boundaries(range)?;
        let stats = ConvStats {
            pages,
            splits,
            ..ConvStats::default()
        };
        Ok((range, reservation, stats, runs))
    }

    /// Tells the platform about each GPA run, stopping at the first failure,
    /// which comes back as the quarantine it implies.
    fn notify_runs(
        &self,
        range: Range,
        runs: &Runs,
        direction: Direction,
        stats: &mut ConvStats,
    ) -> Result<Option<Quarantine<P::Error>>, ConvError<P::Error>> {
        let mut failure = None;
        self.for_each_run(range, runs, |run| {
            if failure.is_none() {
                stats.runs += 1;
                if let Err(e) = self.platform.notify(run, direction) {
                    failure = Some(self.quarantine_of(run, e));
                }
            }
            Ok(())
        })?;
        Ok(failure)
    }

    fn check_arguments(&self, va: VirtAddr, pages: u64) -> Result<Range, ConvError<P::Error>> {
        if !va.is_aligned(PAGE_SIZE) {
            return Err(ConvError::Unaligned(va));
        }
        if pages == 0 {
            return Err(ConvError::ZeroLength);
        }
        let end = pages
            .checked_mul(PAGE_SIZE)
            .and_then(|bytes| va.0.checked_add(bytes))
            .ok_or(ConvError::Overflow)?;
        let mode = self.tables.mode();
        let last = VirtAddr(end - 1);
        if !mode.is_canonical(va) {
            return Err(ConvError::NonCanonical(va));
        }
        // Both ends canonical but in different halves: the range crosses the
        // non-canonical hole.
        if !mode.is_canonical(last) || (va.0 >> 63) != (last.0 >> 63) {
            return Err(ConvError::NonCanonical(last));
        }
        Ok(Range { start: va.0, end })
    }

    fn reserve(&self, range: Range) -> Result<inflight::Reservation<'_>, ConvError<P::Error>> {
        self.in_flight
            .reserve(range.start, range.end)
            .map_err(|e| match e {
                ReserveError::Overlaps { start, end } => ConvError::Busy {
                    start: VirtAddr(start),
                    end: VirtAddr(end),
                },
                ReserveError::Stopped => ConvError::Stopped,
                ReserveError::Full => ConvError::TooManyInFlight,
            })
    }

    /// Every page mapped, present, and in the source state of `direction`
    /// (either state for `None`); on the way, the GPA runs, so that steps 1,
    /// 4 and 6 need no walk of their own.
    fn check_source_state(
        &self,
        range: Range,
        direction: Option<Direction>,
    ) -> Result<Runs, ConvError<P::Error>> {
        let cc = self.tables.cc_mask();
        let mut runs = Runs::default();
        self.for_each_leaf(range, |leaf| {
            let first = leaf.va.0.max(range.start);
            if !leaf.entry.is_present() {
                return Err(ConvError::NotPresent(VirtAddr(first)));
            }
            let already = match direction {
                Some(Direction::ToShared) => cc.is_shared(leaf.entry),
                Some(Direction::ToPrivate) => !cc.is_shared(leaf.entry),
                None => false,
            };
            if already {
                return Err(ConvError::AlreadyInTargetState(VirtAddr(first)));
            }
            // The part of the leaf inside the range (a leaf that straddles
            // an end is split later, which leaves its frames as they are).
            let gpa = cc.leaf_frame(leaf.entry, leaf.level()).0 + (first - leaf.va.0);
            // Made non-present (and, in one of the two states, without C/S
            // bits), only frame 0's entry with no other flag is zero; for a
            // large leaf, the 4K entry a split gives its first page.
            let flags = leaf.entry.0
                & !(PteFlags::PRESENT.bits() | PteFlags::HUGE_PAGE.bits() | cc.all())
                & !coco_pagetable::leaf_addr_field(leaf.level());
            if gpa == 0 && flags == 0 {
                return Err(ConvError::ZeroWhenNotPresent(VirtAddr(first)));
            }
            runs.add(
                GpaRun {
                    va: VirtAddr(first),
                    gpa: PhysAddr(gpa),
                    bytes: leaf.end().min(range.end) - first,
                },
                |last, next| {
                    let contiguous = last.gpa_end() == next.gpa;
                    if contiguous {
                        last.bytes += next.bytes;
                    }
                    contiguous
                },
            );
            Ok(())
        })?;
        Ok(runs)
    }

    /// Splits the large leaves that straddle the range's ends, so every leaf
    /// touched afterwards lies wholly inside the range. Leaves the range
    /// covers wholly stay large. All table frames are allocated before the
    /// first split, so running out of memory changes nothing.
    fn split_boundaries(&self, range: Range) -> Result<u32, ConvError<P::Error>> {
        let walk = |e: WalkError| walk_error(e);
        // A range may end exactly at the non-canonical hole (its last byte
        // is canonical, check_arguments): no leaf straddles that end.
        let mode = self.tables.mode();
        let boundaries = [range.start, range.end].map(VirtAddr);
        let inner = |va: &VirtAddr| mode.is_canonical(*va);
        let mut needed = 0;
        for boundary in boundaries.iter().filter(|va| inner(va)) {
            needed += self.tables.splits_needed_at(*boundary).map_err(walk)?;
        }
        if needed == 0 {
            return Ok(0);
        }
        let reserve = FrameReserve::default();
        for _ in 0..needed {
            match self.allocator.allocate_table() {
                Some(frame) => reserve.push(frame),
                None => {
                    reserve.release_to(&self.allocator);
                    return Err(ConvError::OutOfTableMemory);
                }
            }
        }
        let mut splits = 0;
        for boundary in boundaries.iter().filter(|va| inner(va)) {
            match self.tables.split_at(*boundary, &reserve) {
                Ok(n) => splits += n,
                // Cannot run out: `needed` frames were reserved and another
                // CPU's split only lowers the need. A walk failure here
                // means the tables changed under us.
                Err(_) => {
                    reserve.release_to(&self.allocator);
                    return Err(ConvError::TablesChanged(*boundary));
                }
            }
        }
        reserve.release_to(&self.allocator);
        Ok(splits)
    }

    /// Calls `visit` for each leaf overlapping `range`, present or not. One
    /// walk from the root, then one entry read per leaf
    /// ([`PageTables::next_leaf`]) and a new walk only where a table ends.
    fn for_each_leaf(
        &self,
        range: Range,
        mut visit: impl FnMut(&Leaf) -> Result<(), ConvError<P::Error>>,
    ) -> Result<(), ConvError<P::Error>> {
        let mut leaf = self
            .tables
            .lookup_address(VirtAddr(range.start))
            .map_err(walk_error)?;
        loop {
            visit(&leaf)?;
            if leaf.end() >= range.end {
                return Ok(());
            }
            leaf = self.tables.next_leaf(&leaf).map_err(walk_error)?;
        }
    }

    /// Calls `visit` for each maximal run of leaves in `range` whose frames
    /// are contiguous: the runs the validation found, or, when there were
    /// more than [`Runs`] keeps, runs found by a walk reading the frames
    /// from the entries whether present or not. Only valid after the
    /// boundaries were split.
    fn for_each_run(
        &self,
        range: Range,
        runs: &Runs,
        mut visit: impl FnMut(&GpaRun) -> Result<(), ConvError<P::Error>>,
    ) -> Result<(), ConvError<P::Error>> {
        if let Some(mut kept) = runs.all() {
            return kept.try_for_each(visit);
        }
        let cc = self.tables.cc_mask();
        let mut current: Option<GpaRun> = None;
        self.for_each_leaf(range, |leaf| {
            let gpa = cc.leaf_frame(leaf.entry, leaf.level());
            match current.as_mut() {
                Some(run) if run.gpa_end() == gpa => run.bytes += leaf.size(),
                _ => {
                    if let Some(done) = current.take() {
                        visit(&done)?;
                    }
                    current = Some(GpaRun {
                        va: leaf.va,
                        gpa,
                        bytes: leaf.size(),
                    });
                }
            }
            Ok(())
        })?;
        match current {
            Some(run) => visit(&run),
            None => Ok(()),
        }
    }

    /// Applies `change` to every leaf entry of `range`: through the spans
    /// step 2 found (no walk), or, when there were more than [`Spans`]
    /// keeps, through a walk.
    fn update_leaves(
        &self,
        range: Range,
        spans: &Spans,
        change: impl Fn(Pte) -> Pte,
    ) -> Result<(), ConvError<P::Error>> {
        match spans.all() {
            Some(mut kept) => kept.try_for_each(|span| {
                self.tables
                    .update_span(span, &change)
                    .map_err(ConvError::TablesChanged)
            }),
            None => self.for_each_leaf(range, |leaf| self.update(leaf, &change)),
        }
    }

    fn update(&self, leaf: &Leaf, change: impl Fn(Pte) -> Pte) -> Result<(), ConvError<P::Error>> {
        self.tables
            .update_leaf(leaf, change)
            .map(|_| ())
            .map_err(|e| match e {
                TableError::Walk(WalkError::NotMapped { va, .. }) => ConvError::NotMapped(va),
                _ => ConvError::TablesChanged(leaf.va),
            })
    }

    /// The part of `run` whose state is unknown after a failed notification,
    /// rounded out to whole leaves (a leaf is present or not as a whole).
    fn quarantine_of(&self, run: &GpaRun, error: NotifyError<P::Error>) -> Quarantine<P::Error> {
        let reached = error.consistent_up_to.0.clamp(run.gpa.0, run.gpa_end().0) & !(PAGE_SIZE - 1);
        let mut va = run.va.0 + (reached - run.gpa.0);
        if va < run.va.0 + run.bytes {
            if let Ok(leaf) = self.tables.lookup_address(VirtAddr(va)) {
                va = leaf.va.0.max(run.va.0);
            }
        }
        let skipped = va - run.va.0;
        Quarantine {
            va: VirtAddr(va),
            gpa: PhysAddr(run.gpa.0 + skipped),
            bytes: run.bytes - skipped,
            cause: error.cause,
        }
    }

    /// Step 7 after a failure: pages before the quarantine reached the target
    /// state and become present; the quarantine stays non-present; pages after
    /// it were never shown to the hypervisor, so they get their old C/S bit
    /// back and become present. If the tables changed under the engine, the
    /// error is where restoring stopped: nothing from there on was restored.
    fn finish_after_failure(
        &self,
        range: Range,
        quarantine: &Quarantine<P::Error>,
        direction: Direction,
    ) -> Result<(), VirtAddr> {
        let cc = self.tables.cc_mask();
        let back = match direction {
            Direction::ToShared => Direction::ToPrivate,
            Direction::ToPrivate => Direction::ToShared,
        };
        let quarantine_end = quarantine.va.0 + quarantine.bytes;
        let mut restored_to = range.start;
        self.for_each_leaf(range, |leaf| {
            let present = PteFlags::PRESENT.bits();
            if leaf.va.0 < quarantine.va.0 {
                self.update(leaf, |e| Pte(e.0 | present))?;
            } else if leaf.va.0 >= quarantine_end {
                self.update(leaf, |e| Pte(reencode(cc, e, back).0 | present))?;
            }
            restored_to = leaf.end().min(range.end);
            Ok(())
        })
        .map_err(|_| VirtAddr(restored_to))
    }
}

fn reencode(cc: CcMask, entry: Pte, direction: Direction) -> Pte {
    match direction {
        Direction::ToShared => cc.make_shared(entry),
        Direction::ToPrivate => cc.make_private(entry),
    }
}

fn walk_error<E>(error: WalkError) -> ConvError<E> {
    match error {
        WalkError::NonCanonical(va) => ConvError::NonCanonical(va),
        WalkError::NotMapped { va, .. } | WalkError::Reserved { va, .. } => {
            ConvError::NotMapped(va)
        }
    }
}

/// What one walk of a conversion found, kept for later steps while it fits
/// in `N` items (almost always one: a direct-map range is physically
/// contiguous and inside one table); beyond that the later steps walk again.
#[derive(Clone, Copy)]
struct Kept<T: Copy, const N: usize> {
    items: [Option<T>; N],
    len: usize,
    /// More than `N` items: none of them is used.
    overflowed: bool,
}

impl<T: Copy, const N: usize> Default for Kept<T, N> {
    fn default() -> Self {
        Kept {
            items: [None; N],
            len: 0,
            overflowed: false,
        }
    }
}

impl<T: Copy, const N: usize> Kept<T, N> {
    /// Adds `item` after what was added before: folded into the last item
    /// when `merge` does so (and says so), else kept as a new one.
    fn add(&mut self, item: T, merge: impl FnOnce(&mut T, &T) -> bool) {
        if self.overflowed {
            return;
        }
        if let Some(Some(last)) = self.len.checked_sub(1).map(|i| &mut self.items[i]) {
            if merge(last, &item) {
                return;
            }
        }
        match self.items.get_mut(self.len) {
            Some(slot) => {
                *slot = Some(item);
                self.len += 1;
            }
            None => self.overflowed = true,
        }
    }

    /// Every item, unless there were too many to keep.
    fn all(&self) -> Option<impl Iterator<Item = &T>> {
        (!self.overflowed).then(|| self.items[..self.len].iter().flatten())
    }
}

/// The GPA runs of one conversion, from the validation's walk (steps 1, 4
/// and 6 use them).
type Runs = Kept<GpaRun, 8>;

/// Where the leaf entries of one conversion are, from step 2's walk (steps
/// 5 and 7 write there): a range inside one 2M block of 4K leaves is one
/// span.
type Spans = Kept<LeafSpan, 8>;

/// Frames set aside for the splits of one conversion (at most two splits at
/// each end: 1G -> 2M -> 4K).
#[derive(Default)]
struct FrameReserve {
    frames: core::cell::Cell<[Option<PhysAddr>; 4]>,
}

impl FrameReserve {
    fn push(&self, frame: PhysAddr) {
        let mut frames = self.frames.get();
        if let Some(slot) = frames.iter_mut().find(|f| f.is_none()) {
            *slot = Some(frame);
        }
        self.frames.set(frames);
    }

    /// Gives the frames still held back to `allocator`, which they came from.
    #[allow(unsafe_code)]
    fn release_to(&self, allocator: &impl TableAllocator) {
        for frame in self.frames.take().into_iter().flatten() {
            // SAFETY: the reserve holds only frames `allocator` handed out
            // for this conversion (split_boundaries) that no split linked
            // (a split takes its frame out of the reserve), each once.
            unsafe { allocator.free_table(frame) };
        }
    }
}

// SAFETY: it hands out only frames the engine's allocator gave it (table
// frames of the engine's memory, unused), each once, and takes back only
// what a split of these tables failed to link.
#[allow(unsafe_code)]
unsafe impl TableAllocator for FrameReserve {
    fn allocate_table(&self) -> Option<PhysAddr> {
        let mut frames = self.frames.get();
        let frame = frames.iter_mut().find_map(|f| f.take());
        self.frames.set(frames);
        frame
    }

    unsafe fn free_table(&self, frame: PhysAddr) {
        self.push(frame);
    }
}

#[cfg(test)]
#[allow(unsafe_code)]
mod tests;
