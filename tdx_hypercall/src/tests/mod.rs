//! Host tests against the fake TDX module.

mod accept;
mod info;
mod map_gpa;
mod regs;
mod ve;
mod vmcall;

use crate::{TdCall, TdcallRegs};

const KIB4: u64 = 4096;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Shared bit of a GPAW-48 TD.
const SB47: u64 = 1 << 47;

/// A `TdCall` answering with an arbitrary closure, for register files the fake never produces.
struct FnTdCall<F: Fn(&mut TdcallRegs)>(F);

impl<F: Fn(&mut TdcallRegs)> TdCall for FnTdCall<F> {
    fn tdcall(&self, regs: &mut TdcallRegs) {
        (self.0)(regs);
    }
}
