//! `make run` until the guest kernel boots: the real engine converting
//! simulated memory, printing each of the seven steps, the state of the
//! entries at that moment, and every TDCALL the fake TDX module received.

use coco_pagetable::sim::SimMemory;
use coco_pagetable::{Level, PageTables, PagingMode, PhysAddr, PteFlags, VirtAddr, PAGE_SIZE};
use set_memory_enc::platform::Tdx;
use set_memory_enc::{Converter, Direction, GpaRun, Machine, Step};
use std::sync::{Arc, Mutex};
use tdx_hypercall::sim::{Call, FakeTdxModule};

const MIB2: u64 = 2 << 20;
const DIRECT_MAP: u64 = 0xffff_8880_0000_0000;

/// Prints each step as it starts, what the hooks and the TDX module saw
/// during it, and the entries of the range once it is done.
struct Narrator {
    tables: Mutex<Option<PageTables<&'static SimMemory>>>,
    range: Mutex<(u64, u64)>,
    tdx: Arc<FakeTdxModule>,
    seen_calls: Mutex<usize>,
    in_step: Mutex<bool>,
}

impl Narrator {
    fn new_tdcalls(&self) {
        let calls = self.tdx.calls();
        let mut seen = self.seen_calls.lock().unwrap();
        for call in &calls[*seen..] {
            match call {
                Call::MapGpa { r12, r13 } => println!(
                    "        TDVMCALL MapGPA start {r12:#x} ({}) size {r13:#x}",
                    if r12 & self.tdx.shared_bit() != 0 {
                        "shared bit set: to shared"
                    } else {
                        "to private"
                    }
                ),
                Call::Accept { gpa, size } => {
                    println!("        TDG.MEM.PAGE.ACCEPT {:#x} {size:?}", gpa.0)
                }
                other => println!("        TDCALL {other:?}"),
            }
        }
        *seen = calls.len();
    }

    /// Closes the step in progress, if any: its TDCALLs, then the entries.
    fn step_done(&self) {
        self.new_tdcalls();
        let mut in_step = self.in_step.lock().unwrap();
        if *in_step {
            println!("        entries now [{}]", self.entries());
            *in_step = false;
        }
    }

    fn entries(&self) -> String {
        let tables = self.tables.lock().unwrap();
        let Some(pt) = tables.as_ref() else {
            return String::new();
        };
        let (start, end) = *self.range.lock().unwrap();
        let cc = pt.cc_mask();
        let mut parts = Vec::new();
        let mut va = start;
        while va < end && parts.len() < 4 {
            let leaf = pt.lookup_address(VirtAddr(va)).expect("mapped");
            parts.push(format!(
                "{} {}{}",
                leaf.level().page_size_name(),
                if leaf.entry.is_present() { "P" } else { "-" },
                if cc.is_shared(leaf.entry) { "S" } else { "p" }
            ));
            va = leaf.end();
        }
        if va < end {
            parts.push("...".into());
        }
        parts.join(" ")
    }
}

impl Machine for &Narrator {
    fn remove_aliases(&self, run: &GpaRun) {
        println!(
            "        aliases of GPA {}..{} removed",
            run.gpa,
            run.gpa_end()
        );
    }
    fn flush_tlb_all(&self) {
        println!("        TLB flushed on all CPUs (one shootdown for the whole call)");
    }
    fn flush_caches(&self, run: &GpaRun, _direction: Direction) {
        println!(
            "        caches written back for GPA {}..{}",
            run.gpa,
            run.gpa_end()
        );
    }
    fn on_step(&self, step: Step, _direction: Direction, _va: VirtAddr, _pages: u64) {
        self.step_done();
        let what = match step {
            Step::RemoveAliases => "remove aliasing mappings",
            Step::ClearPresent => "clear PRESENT in every leaf",
            Step::FlushTlb => "flush TLBs on all CPUs and wait",
            Step::FlushCaches => "flush caches (TDX, going shared)",
            Step::FlipEncoding => "flip the shared bit in the non-present entries",
            Step::NotifyHypervisor => "notify the TDX module, GPAs read from non-present entries",
            Step::SetPresent => "set PRESENT again",
        };
        println!("  step {} {what}", step as u8);
        *self.in_step.lock().unwrap() = true;
    }
}

fn main() {
    let tdx = Arc::new(FakeTdxModule::new(48, 1 << 30));
    let mem: &'static SimMemory = Box::leak(Box::new(SimMemory::new(PhysAddr(0x10_0000_0000), 32)));
    let root = mem.allocate_zeroed();
    let narrator: &'static Narrator = Box::leak(Box::new(Narrator {
        tables: Mutex::new(None),
        range: Mutex::new((0, 0)),
        tdx: tdx.clone(),
        seen_calls: Mutex::new(0),
        in_step: Mutex::new(false),
    }));
    let platform = Tdx::new(tdx.clone()).expect("TDG.VP.INFO");
    // SAFETY: a zeroed root of the simulated memory, which also allocates;
    // the narrator's view below reads the same tables.
    let engine =
        unsafe { Converter::new(mem, root, PagingMode::FourLevel, mem, narrator, platform) };
    let cc = engine.tables().cc_mask();
    // SAFETY: as above.
    *narrator.tables.lock().unwrap() =
        Some(unsafe { PageTables::new(mem, root, PagingMode::FourLevel, cc) });
    narrator.step_done();
    println!(
        "TD with GPAW 48: shared bit {:#x} (from TDG.VP.INFO); 16 MiB direct map of 2M leaves",
        cc.shared_bits()
    );
    let flags = PteFlags::PRESENT | PteFlags::WRITABLE | PteFlags::NO_EXECUTE;
    for i in 0..8 {
        engine
            .tables()
            .map_leaf(
                VirtAddr(DIRECT_MAP + i * MIB2),
                PhysAddr(i * MIB2),
                Level::Pd,
                flags,
                false,
                &mem,
            )
            .expect("map");
    }
    println!("entries shown as <size> <P present|- not present><S shared|p private>\n");

    let conversions = [
        (
            "one 4K page inside a 2M leaf",
            DIRECT_MAP + MIB2 + 3 * PAGE_SIZE,
            1,
            Direction::ToShared,
        ),
        (
            "the same page back",
            DIRECT_MAP + MIB2 + 3 * PAGE_SIZE,
            1,
            Direction::ToPrivate,
        ),
        (
            "a whole aligned 2M leaf (stays 2M)",
            DIRECT_MAP + 4 * MIB2,
            512,
            Direction::ToShared,
        ),
        (
            "the same 2M back (ACCEPT at 2M)",
            DIRECT_MAP + 4 * MIB2,
            512,
            Direction::ToPrivate,
        ),
    ];
    for (what, va, pages, direction) in conversions {
        *narrator.range.lock().unwrap() = (va, va + pages * PAGE_SIZE);
        println!("{direction:?}: {what}, {pages} page(s) at {va:#x}");
        let result = engine.convert(VirtAddr(va), pages, direction);
        narrator.step_done();
        println!("  => {result:?}\n");
        result.expect("conversion");
    }
    println!("Refused, with nothing changed:");
    let already = engine.set_memory_private(VirtAddr(DIRECT_MAP + 4 * MIB2), 1);
    println!("  private -> private: {already:?}");
    let unaligned = engine.set_memory_shared(VirtAddr(DIRECT_MAP + 8), 1);
    println!("  unaligned address:  {unaligned:?}");
    let unmapped = engine.set_memory_shared(VirtAddr(DIRECT_MAP + 16 * MIB2), 1);
    println!("  unmapped range:     {unmapped:?}");
    assert!(already.is_err() && unaligned.is_err() && unmapped.is_err());
}
