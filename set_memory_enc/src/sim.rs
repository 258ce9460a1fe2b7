//! Test doubles for the engine's hooks: a machine and a platform wrapper that
//! record every hook call, in order, into one shared log, and can run a
//! callback at each call (to inspect the page tables at that moment, or to
//! hand control to a model checker). Std-based; enabled by the `sim` feature.

use crate::{Direction, GpaRun, Machine, NotifyError, Platform, Step};
use coco_pagetable::VirtAddr;
use std::sync::{Arc, Mutex};

/// One hook call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// [`Machine::on_step`].
    Step(Step, Direction),
    /// [`Machine::remove_aliases`].
    RemoveAliases(GpaRun),
    /// [`Machine::flush_tlb_all`].
    FlushTlb,
    /// [`Machine::flush_caches`].
    FlushCaches(GpaRun, Direction),
    /// [`Platform::notify`].
    Notify(GpaRun, Direction),
}

/// Run at each event, before the hook acts.
pub type EventHook = Arc<dyn Fn(&Event) + Send + Sync>;

/// The shared, ordered record of hook calls.
#[derive(Clone, Default)]
pub struct EventLog {
    events: Arc<Mutex<Vec<Event>>>,
    hook: Arc<Mutex<Option<EventHook>>>,
}

impl EventLog {
    /// Appends `event`, after running the hook on it.
    pub fn record(&self, event: Event) {
        let hook = self.hook.lock().unwrap().clone();
        if let Some(hook) = hook {
            hook(&event);
        }
        self.events.lock().unwrap().push(event);
    }
    /// Everything recorded so far.
    pub fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }
    /// Forgets what was recorded.
    pub fn clear(&self) {
        self.events.lock().unwrap().clear();
    }
    /// Sets (or removes) the hook.
    pub fn set_hook(&self, hook: Option<EventHook>) {
        *self.hook.lock().unwrap() = hook;
    }
    /// The step numbers traced so far, in order.
    pub fn steps(&self) -> Vec<u8> {
        self.events()
            .iter()
            .filter_map(|e| match e {
                Event::Step(step, _) => Some(*step as u8),
                _ => None,
            })
            .collect()
    }
}

/// A machine whose hooks only record.
#[derive(Clone, Default)]
pub struct RecordingMachine {
    /// Where calls go.
    pub log: EventLog,
}

impl Machine for RecordingMachine {
    fn remove_aliases(&self, run: &GpaRun) {
        self.log.record(Event::RemoveAliases(*run));
    }
    fn flush_tlb_all(&self) {
        self.log.record(Event::FlushTlb);
    }
    fn flush_caches(&self, run: &GpaRun, direction: Direction) {
        self.log.record(Event::FlushCaches(*run, direction));
    }
    fn on_step(&self, step: Step, direction: Direction, _va: VirtAddr, _pages: u64) {
        self.log.record(Event::Step(step, direction));
    }
}

/// Wraps a platform and records its notifications in `log`.
pub struct RecordingPlatform<P> {
    /// The real (or fake-backed) platform.
    pub inner: P,
    /// Where calls go.
    pub log: EventLog,
}

impl<P: Platform> Platform for RecordingPlatform<P> {
    type Error = P::Error;
    fn cc_mask(&self) -> coco_pagetable::CcMask {
        self.inner.cc_mask()
    }
    fn needs_cache_flush(&self, direction: Direction) -> bool {
        self.inner.needs_cache_flush(direction)
    }
    fn notify(&self, run: &GpaRun, direction: Direction) -> Result<(), NotifyError<P::Error>> {
        self.log.record(Event::Notify(*run, direction));
        self.inner.notify(run, direction)
    }
}

/// The SNP platform's private window over the fake SNP machine
/// (`snp_hypercall::sim::FakeSnp`): one window address per size, as one
/// CPU's, mapped and unmapped around each use. `refuse_2m`: no 2M window,
/// as a kernel without one answers.
pub struct SimWindow<'a> {
    /// The fake machine, whose PVALIDATE reads the window's mapping.
    pub snp: &'a snp_hypercall::sim::FakeSnp,
    /// Answer every 2M request with `WindowUnavailable`.
    pub refuse_2m: bool,
}

/// Where [`SimWindow`] maps a 4K frame (after a guard page) and a 2M one.
pub const SIM_WINDOW_4K: u64 = 0xffff_fe00_0000_1000;
/// See [`SIM_WINDOW_4K`].
pub const SIM_WINDOW_2M: u64 = 0xffff_fe00_0020_0000;

#[allow(unsafe_code)]
impl crate::platform::PrivateWindow for SimWindow<'_> {
    fn with_frame(
        &self,
        frame: coco_pagetable::PhysAddr,
        size: snp_hypercall::pvalidate::PageSize,
        f: &mut dyn FnMut(VirtAddr),
    ) -> Result<(), crate::platform::snp::WindowUnavailable> {
        use snp_hypercall::pvalidate::PageSize;
        let va = match size {
            PageSize::Size4K => SIM_WINDOW_4K,
            PageSize::Size2M if self.refuse_2m => {
                return Err(crate::platform::snp::WindowUnavailable)
            }
            PageSize::Size2M => SIM_WINDOW_2M,
        };
        self.snp.map_window(va, frame.0, size);
        f(VirtAddr(va));
        self.snp.unmap_window(va);
        Ok(())
    }
    /// Safe in fact: the fake's window is bookkeeping.
    unsafe fn zero(&self, va: VirtAddr, bytes: u64) {
        self.snp.zero_window(va.0, bytes);
    }
}
