//! The GHCB page as a guest fills and reads it (Linux `struct ghcb`,
//! arch/x86/include/asm/svm.h; the GHCB specification): the save-area
//! fields the hypervisor may use only when their bit in the valid bitmap is
//! set, the shared buffer a page state change descriptor goes into, and the
//! protocol version and usage. The kernel maps the page shared, registers
//! it, and lends it here ([`Ghcb::from_raw`]). The hypervisor writes the
//! page during a VMGEXIT (and a hostile one at any time), so every access
//! is volatile and no Rust reference to the page is made.

#![allow(unsafe_code)] // volatile accesses to the shared page, each with its SAFETY.

use crate::psc::{PscDesc, PscEntry, PSC_MAX_ENTRIES};
use core::marker::PhantomData;
use core::ptr::NonNull;

/// Byte offsets of the save-area fields a guest sets or reads.
pub mod field {
    /// RAX.
    pub const RAX: usize = 0x1f8;
    /// RCX.
    pub const RCX: usize = 0x308;
    /// RDX.
    pub const RDX: usize = 0x310;
    /// RBX.
    pub const RBX: usize = 0x318;
    /// The exit code (a hardware one, or 0x8000_xxxx for software NAEs).
    pub const SW_EXITCODE: usize = 0x390;
    /// Request details; the answer's status (low 32 bits: 0 ok, 1 event to
    /// raise in SW_EXITINFO2, 2 malformed with the reason in SW_EXITINFO2).
    pub const SW_EXITINFO1: usize = 0x398;
    /// More details; the answer's reason or result.
    pub const SW_EXITINFO2: usize = 0x3a0;
    /// The GPA of the data a request carries (the shared buffer here).
    pub const SW_SCRATCH: usize = 0x3a8;
    /// XCR0 (for CPUID leaf 0xD).
    pub const XCR0: usize = 0x3e8;
}

/// NAE exit codes a kernel uses.
pub mod exit_code {
    /// CPUID.
    pub const CPUID: u64 = 0x72;
    /// IN / OUT.
    pub const IOIO: u64 = 0x7b;
    /// RDMSR / WRMSR.
    pub const MSR: u64 = 0x7c;
    /// WBINVD.
    pub const WBINVD: u64 = 0x89;
    /// Page state change through the shared buffer.
    pub const PSC: u64 = 0x8000_0010;
    /// AP creation from a VMSA.
    pub const AP_CREATION: u64 = 0x8000_0013;
}

const VALID_BITMAP: usize = 0x3f0;
/// Where the shared buffer starts, and its size.
pub const SHARED_BUFFER: usize = 0x800;
/// Bytes of the shared buffer.
pub const SHARED_BUFFER_BYTES: usize = 2032;
const VERSION_AND_USAGE: usize = 0xff8;
/// The protocol version SNP needs.
pub const PROTOCOL_VERSION: u16 = 2;

/// Qwords in the page.
const QWORDS: usize = 512;

/// A GHCB page lent by the kernel.
pub struct Ghcb<'a> {
    page: NonNull<u64>,
    _page: PhantomData<&'a mut [u64; QWORDS]>,
}

impl<'a> Ghcb<'a> {
    /// A page the caller owns outright (host tests, or a copy).
    pub fn new(page: &'a mut [u64; QWORDS]) -> Self {
        Ghcb {
            page: NonNull::from(page).cast(),
            _page: PhantomData,
        }
    }

    /// The kernel's GHCB page.
    ///
    /// # Safety
    /// `page` is valid for volatile reads and writes of 4096 bytes and
    /// 8-aligned for `'a`, and no Rust reference to that memory exists
    /// meanwhile (only volatile accesses: the hypervisor's writes are then
    /// no data race on Rust memory).
    pub unsafe fn from_raw(page: NonNull<[u64; QWORDS]>) -> Self {
        Ghcb {
            page: page.cast(),
            _page: PhantomData,
        }
    }

    fn load(&self, qword: usize) -> u64 {
        if qword >= QWORDS {
            return 0;
        }
        // SAFETY: inside the page (checked), which `new` or `from_raw`'s
        // caller made valid for volatile reads for 'a.
        unsafe { self.page.as_ptr().add(qword).read_volatile() }
    }

    fn store(&mut self, qword: usize, value: u64) {
        if qword >= QWORDS {
            return;
        }
        // SAFETY: as `load`, for writes.
        unsafe { self.page.as_ptr().add(qword).write_volatile(value) }
    }

    /// Starts a request: no field valid, standard usage, version 2.
    pub fn begin(&mut self) {
        self.store(VALID_BITMAP / 8, 0);
        self.store(VALID_BITMAP / 8 + 1, 0);
        // u16 version at 0xFFA, u32 usage (0) at 0xFFC, in the last qword.
        self.store(VERSION_AND_USAGE / 8, u64::from(PROTOCOL_VERSION) << 16);
    }

    fn valid_bit(offset: usize) -> (usize, u64) {
        let qword = offset / 8;
        (VALID_BITMAP / 8 + qword / 64, 1 << (qword % 64))
    }

    /// Sets a field (8-aligned offset inside the save area) and its valid
    /// bit; other offsets are ignored.
    pub fn set(&mut self, offset: usize, value: u64) {
        if !offset.is_multiple_of(8) || offset >= VALID_BITMAP {
            return;
        }
        self.store(offset / 8, value);
        let (at, bit) = Self::valid_bit(offset);
        let bits = self.load(at);
        self.store(at, bits | bit);
    }

    /// A field the hypervisor marked valid.
    pub fn get(&self, offset: usize) -> Option<u64> {
        if !offset.is_multiple_of(8) || offset >= VALID_BITMAP {
            return None;
        }
        let (at, bit) = Self::valid_bit(offset);
        (self.load(at) & bit != 0).then(|| self.load(offset / 8))
    }

    /// The three fields every NAE sets.
    pub fn set_exit(&mut self, code: u64, info1: u64, info2: u64) {
        self.set(field::SW_EXITCODE, code);
        self.set(field::SW_EXITINFO1, info1);
        self.set(field::SW_EXITINFO2, info2);
    }

    /// Puts `desc` in the shared buffer and points SW_SCRATCH at it (`gpa`
    /// is the GHCB's own GPA).
    pub fn put_psc(&mut self, desc: &PscDesc, gpa: u64) {
        let at = SHARED_BUFFER / 8;
        self.store(
            at,
            u64::from(desc.cur_entry)
                | (u64::from(desc.end_entry) << 16)
                | (u64::from(desc.reserved) << 32),
        );
        for (i, entry) in desc.entries.iter().enumerate() {
            self.store(at + 1 + i, entry.0);
        }
        self.set(field::SW_SCRATCH, gpa + SHARED_BUFFER as u64);
    }

    /// Reads the descriptor back from the shared buffer.
    pub fn take_psc(&self, desc: &mut PscDesc) {
        let at = SHARED_BUFFER / 8;
        let header = self.load(at);
        desc.cur_entry = header as u16;
        desc.end_entry = (header >> 16) as u16;
        desc.reserved = (header >> 32) as u32;
        for i in 0..PSC_MAX_ENTRIES {
            desc.entries[i] = PscEntry(self.load(at + 1 + i));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msr::PageOp;

    #[test]
    fn fields_are_valid_only_when_set_and_the_psc_descriptor_round_trips() {
        let mut page = [0xffff_ffff_ffff_ffffu64; 512];
        let mut ghcb = Ghcb::new(&mut page);
        ghcb.begin();
        assert_eq!(ghcb.get(field::RAX), None, "begin clears the bitmap");
        ghcb.set_exit(exit_code::CPUID, 0, 0);
        ghcb.set(field::RAX, 0x8000_001f);
        assert_eq!(ghcb.get(field::SW_EXITCODE), Some(0x72));
        assert_eq!(ghcb.get(field::RAX), Some(0x8000_001f));
        assert_eq!(ghcb.get(field::RBX), None);
        ghcb.set(field::RAX + 1, 5);
        ghcb.set(0x800, 5);
        assert_eq!(ghcb.get(0x800), None, "outside the save area");
        let mut desc = PscDesc {
            end_entry: 1,
            ..PscDesc::default()
        };
        desc.entries[0] = PscEntry::new(0x123, PageOp::Shared, false);
        desc.entries[1] = PscEntry::new(0x200, PageOp::Private, true);
        ghcb.put_psc(&desc, 0x7_0000);
        assert_eq!(ghcb.get(field::SW_SCRATCH), Some(0x7_0800));
        let mut back = PscDesc::default();
        ghcb.take_psc(&mut back);
        assert_eq!(back, desc);
        // SW_EXITCODE is qword 0x72 (114): bit 50 of the second bitmap qword.
        assert_ne!(page[VALID_BITMAP / 8 + 1] & (1 << 50), 0);
        assert_eq!(page[0xff8 / 8], 2 << 16, "version 2 at 0xFFA, usage 0");
    }
}
