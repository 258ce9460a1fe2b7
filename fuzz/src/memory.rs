//! Physical memory for the parsers that read through [`PhysRead`]: the fuzz
//! input's bytes at address 0, 0xff everywhere else (like unbacked memory),
//! and a record of every byte range read, so a target can check that a
//! parser read nothing outside the structures it accepted.

use bare::bootinfo::PhysRead;
use std::cell::RefCell;
use std::ops::Range;

/// The input as memory, with its reads recorded.
pub struct Memory<'a> {
    bytes: &'a [u8],
    /// Ranges read, consecutive ones merged (a checksum loop is one range).
    reads: RefCell<Vec<Range<u64>>>,
}

impl<'a> Memory<'a> {
    /// `bytes` at physical address 0.
    pub fn new(bytes: &'a [u8]) -> Memory<'a> {
        Memory {
            bytes,
            reads: RefCell::new(Vec::new()),
        }
    }

    /// The byte at `pa` (0xff outside the input).
    pub fn byte(&self, pa: u64) -> u8 {
        usize::try_from(pa)
            .ok()
            .and_then(|at| self.bytes.get(at).copied())
            .unwrap_or(0xff)
    }

    /// The `N` bytes at `pa`, not recorded (for the targets' own checks);
    /// bytes past the top of the address space read as 0xff.
    pub fn peek<const N: usize>(&self, pa: u64) -> [u8; N] {
        // Fast paths: all inside the input, or all above it (a checksum
        // over a huge table length reads mostly there).
        if pa >= self.bytes.len() as u64 {
            return [0xff; N];
        }
        let at = pa as usize;
        if let Some(bytes) = at.checked_add(N).and_then(|end| self.bytes.get(at..end)) {
            let mut out = [0u8; N];
            out.copy_from_slice(bytes);
            return out;
        }
        core::array::from_fn(|i| pa.checked_add(i as u64).map_or(0xff, |at| self.byte(at)))
    }

    /// The little-endian u32 at `pa`, not recorded.
    pub fn peek_u32(&self, pa: u64) -> u32 {
        u32::from_le_bytes(self.peek(pa))
    }

    /// The little-endian u64 at `pa`, not recorded.
    pub fn peek_u64(&self, pa: u64) -> u64 {
        u64::from_le_bytes(self.peek(pa))
    }

    /// Forgets the reads so far.
    pub fn clear_reads(&self) {
        self.reads.borrow_mut().clear();
    }

    /// The ranges read since the last [`Memory::clear_reads`].
    pub fn reads(&self) -> Vec<Range<u64>> {
        self.reads.borrow().clone()
    }

    /// Panics unless every read since the last [`Memory::clear_reads`] lies
    /// inside one of `allowed`.
    pub fn assert_reads_within(&self, allowed: &[Range<u64>], what: &str) {
        assert_covered(&self.reads.borrow(), allowed, what);
    }

    fn record(&self, pa: u64, size: u64) {
        // A parser must never read across the top of the address space: on
        // the guest that access wraps to address 0.
        let end = pa
            .checked_add(size)
            .unwrap_or_else(|| panic!("read of {size} bytes at {pa:#x} wraps the address space"));
        let mut reads = self.reads.borrow_mut();
        if let Some(last) = reads.last_mut() {
            if last.start <= pa && pa <= last.end {
                last.end = last.end.max(end);
                return;
            }
        }
        reads.push(pa..end);
    }
}

impl PhysRead for Memory<'_> {
    fn read_u32(&self, pa: u64) -> u32 {
        self.record(pa, 4);
        self.peek_u32(pa)
    }
    fn read_u64(&self, pa: u64) -> u64 {
        self.record(pa, 8);
        self.peek_u64(pa)
    }
}

/// Whether the union of `allowed` covers `range` (adjacent reads are merged,
/// so one recorded range may span two adjacent or overlapping allowed ones).
pub fn covered(range: &Range<u64>, allowed: &[Range<u64>]) -> bool {
    let mut at = range.start;
    while at < range.end {
        match allowed
            .iter()
            .filter(|a| a.start <= at && at < a.end)
            .map(|a| a.end)
            .max()
        {
            Some(end) => at = end,
            None => return false,
        }
    }
    true
}

/// Panics unless the union of `allowed` covers every range of `reads`.
pub fn assert_covered(reads: &[Range<u64>], allowed: &[Range<u64>], what: &str) {
    for read in reads {
        assert!(
            covered(read, allowed),
            "{what}: read {read:#x?} outside {allowed:#x?}"
        );
    }
}

/// Little-endian reads from the start of a fuzz input that never fail:
/// missing bytes read as 0.
pub struct Input<'a> {
    bytes: &'a [u8],
}

impl<'a> Input<'a> {
    /// Reads `bytes` from the start.
    pub fn new(bytes: &'a [u8]) -> Input<'a> {
        Input { bytes }
    }

    /// The next `N` bytes, zero-padded past the end.
    pub fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.bytes.len());
        out[..n].copy_from_slice(&self.bytes[..n]);
        self.bytes = &self.bytes[n..];
        out
    }

    /// The next byte.
    pub fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }

    /// The next u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }

    /// The next u64.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }

    /// What is left.
    pub fn rest(&self) -> &'a [u8] {
        self.bytes
    }
}
