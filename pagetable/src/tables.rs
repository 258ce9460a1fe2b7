//! The walker, the splitter and the entry updates, over page-table memory
//! reached through [`TableMemory`]. The crate's unsafe edge: every raw
//! access goes through three private helpers of [`PageTables`], which name
//! only frames of the hierarchy its (unsafe) constructor vouched for.
#![allow(unsafe_code)]

use crate::addr::{PhysAddr, VirtAddr, PAGE_SIZE};
use crate::entry::{leaf_addr_field, CcMask, Pte, PteFlags, ADDR_FIELD, PAT_4K, PAT_LARGE};
use crate::level::{Level, PagingMode, ENTRIES_PER_TABLE};

/// Page-table memory, addressed physically. A kernel implements it over its
/// direct map with 64-bit atomic accesses ([`crate::OffsetTableMemory`]
/// does); host tests over simulated memory.
///
/// # Safety
/// Implementations behave as memory: `load` returns what the entry holds
/// (what was last stored or exchanged there, with the A/D bits the CPU may
/// have set), and the three methods act on entry `index` of the table at
/// `table` alone, atomically. [`PageTables`] follows the table pointers it
/// reads, so a lying implementation would send it anywhere.
pub unsafe trait TableMemory {
    /// Reads entry `index` of the table at `table`.
    ///
    /// # Safety
    /// `table` is a page-table frame of the hierarchy this memory holds (a
    /// root a [`PageTables`] was made with, a frame a table pointer of it
    /// names, or a frame a [`TableAllocator`] handed out for it), and
    /// `index` is below 512. The same holds for the other two methods.
    unsafe fn load(&self, table: PhysAddr, index: usize) -> u64;
    /// Atomically replaces entry `index` with `new` if it still holds
    /// `current`; returns the previous value either way (`Err` on mismatch).
    /// Atomic because the CPU sets A/D bits in live entries concurrently.
    ///
    /// # Safety
    /// As [`TableMemory::load`].
    unsafe fn compare_exchange(
        &self,
        table: PhysAddr,
        index: usize,
        current: u64,
        new: u64,
    ) -> Result<u64, u64>;
    /// Writes entry `index` of a table no CPU can reach yet (being filled
    /// before it is linked in).
    ///
    /// # Safety
    /// As [`TableMemory::load`].
    unsafe fn store_unpublished(&self, table: PhysAddr, index: usize, value: u64);
}

/// Frames for new page tables. A returned frame is page-aligned; its contents
/// are overwritten entirely before use.
///
/// # Safety
/// A frame `allocate_table` returns is page-aligned memory of the
/// [`TableMemory`] it is used with, and nothing else uses it until it is
/// given back: the tables write all of it and link it in.
pub unsafe trait TableAllocator {
    /// A free frame, or `None` when out of memory.
    fn allocate_table(&self) -> Option<PhysAddr>;
    /// Returns a frame that was allocated and never linked into the tables.
    ///
    /// # Safety
    /// `frame` came from this allocator's `allocate_table`, is not linked
    /// into any table, and was not given back since.
    unsafe fn free_table(&self, frame: PhysAddr);
}

// SAFETY: forwards to `T`, which is memory (its own `unsafe impl`).
unsafe impl<T: TableMemory + ?Sized> TableMemory for &T {
    unsafe fn load(&self, table: PhysAddr, index: usize) -> u64 {
        // SAFETY: the caller's promise, passed on.
        unsafe { (**self).load(table, index) }
    }
    unsafe fn compare_exchange(
        &self,
        table: PhysAddr,
        index: usize,
        current: u64,
        new: u64,
    ) -> Result<u64, u64> {
        // SAFETY: the caller's promise, passed on.
        unsafe { (**self).compare_exchange(table, index, current, new) }
    }
    unsafe fn store_unpublished(&self, table: PhysAddr, index: usize, value: u64) {
        // SAFETY: the caller's promise, passed on.
        unsafe { (**self).store_unpublished(table, index, value) }
    }
}

// SAFETY: forwards to `T`, whose frames are free table memory.
unsafe impl<T: TableAllocator + ?Sized> TableAllocator for &T {
    fn allocate_table(&self) -> Option<PhysAddr> {
        (**self).allocate_table()
    }
    unsafe fn free_table(&self, frame: PhysAddr) {
        // SAFETY: the caller's promise, passed on.
        unsafe { (**self).free_table(frame) }
    }
}

/// A leaf found by [`PageTables::lookup_address`]: where its entry lives, what
/// it holds, and what it maps. It may be non-present.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
///
/// Where the entry lives (`table`, `index`, `level`) is readable but not
/// writable: the entry updates write there, so only a walk sets it.
pub struct Leaf {
    /// First virtual address the leaf maps (aligned to its size).
    pub va: VirtAddr,
    /// The entry's value when it was read.
    pub entry: Pte,
    level: Level,
    table: PhysAddr,
    index: usize,
    /// The root of the walk that found it.
    root: PhysAddr,
}

impl Leaf {
    /// Level of the leaf: [`Level::Pt`] 4K, [`Level::Pd`] 2M, [`Level::Pdpt`] 1G.
    pub const fn level(&self) -> Level {
        self.level
    }
    /// Physical address of the table that holds the entry.
    pub const fn table(&self) -> PhysAddr {
        self.table
    }
    /// Index of the entry in that table.
    pub const fn index(&self) -> usize {
        self.index
    }
    /// Bytes the leaf maps.
    pub const fn size(&self) -> u64 {
        self.level.entry_span()
    }
    /// One past the last virtual address the leaf maps (saturating at 2^64).
    pub const fn end(&self) -> u64 {
        self.va.0.saturating_add(self.size())
    }
    /// Number of 4K pages the leaf maps.
    pub const fn pages(&self) -> u64 {
        self.size() / PAGE_SIZE
    }
}

/// Leaves in consecutive entries of one table, found by a walk: a range's
/// later passes update them with no walk at all
/// ([`PageTables::update_span`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeafSpan {
    /// The table that holds the entries.
    table: PhysAddr,
    /// Index of the first entry.
    first: usize,
    /// Number of entries.
    count: usize,
    /// Their level.
    level: Level,
    /// First virtual address the first entry maps.
    va: VirtAddr,
    /// The root of the walk that found them.
    root: PhysAddr,
}

impl LeafSpan {
    /// The table that holds the entries.
    pub const fn table(&self) -> PhysAddr {
        self.table
    }
    /// Index of the first entry.
    pub const fn first(&self) -> usize {
        self.first
    }
    /// Number of entries.
    pub const fn count(&self) -> usize {
        self.count
    }
    /// Their level.
    pub const fn level(&self) -> Level {
        self.level
    }
    /// First virtual address the first entry maps.
    pub const fn va(&self) -> VirtAddr {
        self.va
    }

    /// The span of `leaf` alone.
    pub const fn of(leaf: &Leaf) -> LeafSpan {
        LeafSpan {
            table: leaf.table,
            first: leaf.index,
            count: 1,
            level: leaf.level,
            va: leaf.va,
            root: leaf.root,
        }
    }

    /// Adds `leaf` if it is the entry right after the span's last one in
    /// the same table; returns whether it did.
    pub fn extend(&mut self, leaf: &Leaf) -> bool {
        let next = self.first + self.count;
        let continues = leaf.root == self.root
            && leaf.table == self.table
            && leaf.level == self.level
            && leaf.index == next;
        if continues {
            self.count += 1;
        }
        continues
    }
}

/// Why a walk stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkError {
    /// The address is not canonical for the paging mode.
    NonCanonical(VirtAddr),
    /// An entry on the way is zero, or a non-present table pointer: nothing
    /// is mapped at `va`. `level` is where the walk stopped.
    NotMapped {
        /// The address walked.
        va: VirtAddr,
        /// The level whose entry is not present.
        level: Level,
    },
    /// PS set at a level that cannot hold a leaf (a reserved-bit fault).
    Reserved {
        /// The address walked.
        va: VirtAddr,
        /// The level whose entry has PS set.
        level: Level,
    },
}

/// Why a split or a mapping was refused. Nothing was changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableError {
    /// The walk failed.
    Walk(WalkError),
    /// No frame for a new table.
    OutOfTableMemory,
    /// Another CPU changed the entry between our read and our write; re-walk.
    Raced,
    /// A 4K leaf cannot be split.
    NotSplittable,
    /// Something is already mapped where a new leaf was asked for.
    AlreadyMapped {
        /// Where the new leaf was asked for.
        va: VirtAddr,
        /// The level at which something is mapped already.
        level: Level,
    },
    /// The address or frame is not aligned to the leaf size, or the level
    /// cannot hold a leaf.
    BadLeaf,
}

impl From<WalkError> for TableError {
    fn from(e: WalkError) -> Self {
        TableError::Walk(e)
    }
}

/// One address space: its root, its paging mode, the CC bits, and the memory
/// its tables live in.
pub struct PageTables<M> {
    memory: M,
    root: PhysAddr,
    mode: PagingMode,
    cc: CcMask,
}

/// Flags for a table pointer made by this crate: permissive, as Linux's
/// _KERNPG_TABLE, because a leaf's own flags are the ones that restrict.
const TABLE_POINTER_FLAGS: u64 =
    PteFlags::PRESENT.bits() | PteFlags::WRITABLE.bits() | PteFlags::ACCESSED.bits();

impl<M: TableMemory> PageTables<M> {
    /// Wraps existing tables rooted at `root` (CR3's address).
    ///
    /// # Safety
    /// `root` is a page-table frame of `memory`, every table pointer
    /// reachable from it names one too, and while the value lives the
    /// hierarchy changes only by atomic writes that keep that so (this
    /// crate's, the CPU's A/D updates, another `PageTables` over the same
    /// root): the walks follow what they read.
    pub const unsafe fn new(memory: M, root: PhysAddr, mode: PagingMode, cc: CcMask) -> Self {
        PageTables {
            memory,
            root,
            mode,
            cc,
        }
    }

    // The three raw accesses. Their `table` is always one of: `self.root`;
    // a table pointer read from these tables by a walk; a `Leaf`'s or
    // `LeafSpan`'s table whose root is `self.root` (private fields, set only
    // by such walks); a frame a `TableAllocator` returned. Each is a frame of
    // this hierarchy by `new`'s contract and the allocator's; `index` is
    // always below 512 (`Level::index_of`, bounded loops, a walk's index).

    fn entry(&self, table: PhysAddr, index: usize) -> u64 {
        // SAFETY: see above.
        unsafe { self.memory.load(table, index) }
    }

    fn exchange(&self, table: PhysAddr, index: usize, current: u64, new: u64) -> Result<u64, u64> {
        // SAFETY: see above.
        unsafe { self.memory.compare_exchange(table, index, current, new) }
    }

    fn fill(&self, table: PhysAddr, index: usize, value: u64) {
        // SAFETY: see above; the frame is not linked in yet.
        unsafe { self.memory.store_unpublished(table, index, value) }
    }

    /// Whether `new` may be written where a leaf of `level` is: at 2M and
    /// 1G only a large leaf (PS set) or zero, never a table pointer, which
    /// the walks would follow.
    fn stays_leaf(new: u64, level: Level) -> bool {
        level == Level::Pt || new == 0 || new & PteFlags::HUGE_PAGE.bits() != 0
    }

    /// The table memory.
    pub fn memory(&self) -> &M {
        &self.memory
    }
    /// The root table.
    pub const fn root(&self) -> PhysAddr {
        self.root
    }
    /// The paging mode.
    pub const fn mode(&self) -> PagingMode {
        self.mode
    }
    /// The confidential-computing bits.
    pub const fn cc_mask(&self) -> CcMask {
        self.cc
    }

    /// Finds the leaf that maps `va`, **including a non-present one**: unlike
    /// the CPU, it does not stop at a leaf whose PRESENT bit is clear, so the
    /// conversion engine can recover the frame from entries it made
    /// non-present itself. Upper levels must be present (the engine never
    /// clears PRESENT in a table pointer). A zero entry means nothing is mapped.
    pub fn lookup_address(&self, va: VirtAddr) -> Result<Leaf, WalkError> {
        self.walk_from(va, self.root, self.mode.top())
    }

    /// The leaf after `prev` (the one mapping `prev.end()`), like
    /// [`PageTables::lookup_address`] but without the walk from the root
    /// while the next entry is in `prev`'s table: a range's leaves cost one
    /// entry read each, and a walk only where a table ends. `prev` must come
    /// from this crate's walk of these tables.
    pub fn next_leaf(&self, prev: &Leaf) -> Result<Leaf, WalkError> {
        let va = VirtAddr(prev.end());
        if prev.root == self.root && prev.index + 1 < ENTRIES_PER_TABLE && prev.end() != u64::MAX {
            self.walk_from(va, prev.table, prev.level)
        } else {
            self.lookup_address(va)
        }
    }

    /// The walk for `va` from entry `level.index_of(va)` of `table` down.
    fn walk_from(
        &self,
        va: VirtAddr,
        mut table: PhysAddr,
        mut level: Level,
    ) -> Result<Leaf, WalkError> {
        if !self.mode.is_canonical(va) {
            return Err(WalkError::NonCanonical(va));
        }
        loop {
            let index = level.index_of(va);
            let entry = Pte(self.entry(table, index));
            if entry.is_unused() {
                return Err(WalkError::NotMapped { va, level });
            }
            let huge = entry.0 & PteFlags::HUGE_PAGE.bits() != 0;
            let lower = match level.lower() {
                None => None,
                Some(_) if huge && level.can_be_leaf() => None,
                Some(_) if huge => return Err(WalkError::Reserved { va, level }),
                Some(lower) => Some(lower),
            };
            match lower {
                None => {
                    return Ok(Leaf {
                        va: va.align_down(level.entry_span()),
                        level,
                        table,
                        index,
                        entry,
                        root: self.root,
                    })
                }
                Some(lower) => {
                    if !entry.is_present() {
                        return Err(WalkError::NotMapped { va, level });
                    }
                    table = self.cc.table_addr(entry);
                    level = lower;
                }
            }
        }
    }

    /// Like the CPU's walk: the leaf mapping `va` only if it is present.
    pub fn translate(&self, va: VirtAddr) -> Option<PhysAddr> {
        let leaf = self.lookup_address(va).ok()?;
        if !leaf.entry.is_present() {
            return None;
        }
        let offset = va.0 - leaf.va.0;
        Some(PhysAddr(
            self.cc.leaf_frame(leaf.entry, leaf.level).0 + offset,
        ))
    }

    /// Replaces the leaf's entry with `update(old)` atomically, retrying if
    /// the CPU set A/D in between. Returns the value written. `Raced` if the
    /// entry stopped being this leaf (another CPU split or unmapped it).
    /// The first attempt assumes the entry still holds `leaf.entry` (no
    /// read: the compare-exchange checks it).
    /// `BadLeaf` if `update` would make a 2M/1G leaf a table pointer, or
    /// the leaf came from other tables.
    pub fn update_leaf(&self, leaf: &Leaf, update: impl Fn(Pte) -> Pte) -> Result<Pte, TableError> {
        if leaf.root != self.root {
            return Err(TableError::BadLeaf);
        }
        let mut current = leaf.entry.0;
        loop {
            if !same_leaf(current, leaf.entry, leaf.level, self.cc) {
                return Err(TableError::Raced);
            }
            let new = update(Pte(current)).0;
            if !Self::stays_leaf(new, leaf.level) {
                return Err(TableError::BadLeaf);
            }
            match self.exchange(leaf.table, leaf.index, current, new) {
                Ok(_) => return Ok(Pte(new)),
                Err(seen) => current = seen,
            }
        }
    }

    /// [`PageTables::update_leaf`] for every entry of `span`, in order, with
    /// one read and one compare-exchange each and no walk. Stops at the
    /// first entry that is no longer a leaf of the span's level (zero, or a
    /// table pointer where a large leaf was) and returns the address it
    /// maps: the span is stale, someone changed the tables under it. So also
    /// for an `update` that would make a large leaf a table pointer, and
    /// (at the span's first address) for a span of other tables.
    pub fn update_span(
        &self,
        span: &LeafSpan,
        update: impl Fn(Pte) -> Pte,
    ) -> Result<(), VirtAddr> {
        let huge = PteFlags::HUGE_PAGE.bits();
        let want_huge = if span.level == Level::Pt { 0 } else { huge };
        let size = span.level.entry_span();
        if span.root != self.root {
            return Err(span.va);
        }
        let end = span.first.saturating_add(span.count).min(ENTRIES_PER_TABLE);
        for (n, index) in (span.first..end).enumerate() {
            let mut current = self.entry(span.table, index);
            loop {
                let still_leaf =
                    current != 0 && (span.level == Level::Pt || current & huge == want_huge);
                let new = update(Pte(current)).0;
                if !still_leaf || !Self::stays_leaf(new, span.level) {
                    return Err(VirtAddr(span.va.0.wrapping_add(n as u64 * size)));
                }
                match self.exchange(span.table, index, current, new) {
                    Ok(_) => break,
                    Err(seen) => current = seen,
                }
            }
        }
        Ok(())
    }

    /// Splits a present or non-present 2M/1G leaf into a table of 512 leaves
    /// of the next size with the same attributes and C/S bits (PAT moved to
    /// its 4K position when going to 4K). The translation is unchanged, so
    /// no flush is needed for correctness of the new entries; stale large
    /// TLB entries are the caller's to flush (the engine's step 3 does).
    pub fn split(&self, leaf: &Leaf, alloc: &impl TableAllocator) -> Result<(), TableError> {
        if leaf.root != self.root {
            return Err(TableError::BadLeaf);
        }
        let child_level = match leaf.level {
            Level::Pd => Level::Pt,
            Level::Pdpt => Level::Pd,
            _ => return Err(TableError::NotSplittable),
        };
        let frame = alloc.allocate_table().ok_or(TableError::OutOfTableMemory)?;
        let entry = leaf.entry.0;
        let base = self.cc.leaf_frame(leaf.entry, leaf.level).0;
        let cc_bits = entry & self.cc.all();
        // Flags live outside the address field; PAT and PS need moving.
        let flags = entry & !ADDR_FIELD;
        let pat = entry & PAT_LARGE != 0;
        let child_flags = if child_level == Level::Pt {
            (flags & !PteFlags::HUGE_PAGE.bits()) | if pat { PAT_4K } else { 0 }
        } else {
            flags | if pat { PAT_LARGE } else { 0 }
        };
        let span = child_level.entry_span();
        for i in 0..ENTRIES_PER_TABLE {
            let child = child_flags | cc_bits | (base + i as u64 * span);
            self.fill(frame, i, child);
        }
        let user = entry & PteFlags::USER.bits();
        let pointer = frame.0 | self.cc.private_bits() | TABLE_POINTER_FLAGS | user;
        match self.exchange(leaf.table, leaf.index, entry, pointer) {
            Ok(_) => Ok(()),
            Err(_) => {
                // SAFETY: the frame came from `alloc` above and the
                // exchange that would have linked it failed.
                unsafe { alloc.free_table(frame) };
                Err(TableError::Raced)
            }
        }
    }

    /// How many splits it takes until a leaf starts exactly at `va` (4K
    /// aligned); 0 when `va` is unmapped, as there is nothing to split.
    pub fn splits_needed_at(&self, va: VirtAddr) -> Result<u32, WalkError> {
        let leaf = match self.lookup_address(va) {
            Ok(leaf) => leaf,
            Err(WalkError::NotMapped { .. }) => return Ok(0),
            Err(e) => return Err(e),
        };
        let mut level = leaf.level;
        let mut splits = 0;
        while !va.is_aligned(level.entry_span()) {
            splits += 1;
            match level.lower() {
                Some(lower) => level = lower,
                None => break,
            }
        }
        Ok(splits)
    }

    /// Splits whatever leaf straddles `va` until a leaf starts at `va`.
    /// `va` must be 4K aligned. Concurrent splitters are tolerated: a lost
    /// race re-walks and finds the other CPU's split.
    pub fn split_at(&self, va: VirtAddr, alloc: &impl TableAllocator) -> Result<u32, TableError> {
        let mut splits = 0;
        loop {
            let leaf = match self.lookup_address(va) {
                Ok(leaf) => leaf,
                Err(WalkError::NotMapped { .. }) => return Ok(splits),
                Err(e) => return Err(e.into()),
            };
            if leaf.va == va || leaf.level == Level::Pt {
                return Ok(splits);
            }
            match self.split(&leaf, alloc) {
                Ok(()) => splits += 1,
                Err(TableError::Raced) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Maps one leaf of `level` at `va` to `frame` with `flags` (PRESENT is
    /// not implied) and, for a shared mapping, the C/S bits from `shared`.
    /// Creates intermediate tables. Refuses to replace anything mapped.
    pub fn map_leaf(
        &self,
        va: VirtAddr,
        frame: PhysAddr,
        level: Level,
        flags: PteFlags,
        shared: bool,
        alloc: &impl TableAllocator,
    ) -> Result<(), TableError> {
        let span = level.entry_span();
        if !level.can_be_leaf()
            || !va.is_aligned(span)
            || !frame.is_aligned(span)
            || frame.0 & !leaf_addr_field(level) != 0
            || frame.0 & self.cc.all() != 0
        {
            return Err(TableError::BadLeaf);
        }
        if !self.mode.is_canonical(va) {
            return Err(WalkError::NonCanonical(va).into());
        }
        let mut table = self.root;
        let mut current = self.mode.top();
        while current != level {
            let index = current.index_of(va);
            let entry = Pte(self.entry(table, index));
            // A user leaf needs U at every level above it (nested tables are
            // walked as user accesses, so they always do).
            let user = flags.bits() & PteFlags::USER.bits();
            if entry.is_unused() {
                let new_table = alloc.allocate_table().ok_or(TableError::OutOfTableMemory)?;
                for i in 0..ENTRIES_PER_TABLE {
                    self.fill(new_table, i, 0);
                }
                let pointer = new_table.0 | self.cc.private_bits() | TABLE_POINTER_FLAGS | user;
                if self.exchange(table, index, 0, pointer).is_err() {
                    // SAFETY: the frame came from `alloc` above and the
                    // exchange that would have linked it failed.
                    unsafe { alloc.free_table(new_table) };
                    continue;
                }
                table = new_table;
            } else if !entry.is_present() || entry.0 & PteFlags::HUGE_PAGE.bits() != 0 {
                return Err(TableError::AlreadyMapped { va, level: current });
            } else {
                if entry.0 & user != user {
                    // Retried by the loop if the entry changed meanwhile.
                    let _ = self.exchange(table, index, entry.0, entry.0 | user);
                    continue;
                }
                table = self.cc.table_addr(entry);
            }
            current = match current.lower() {
                Some(lower) => lower,
                None => return Err(TableError::BadLeaf),
            };
        }
        let huge = if level == Level::Pt {
            0
        } else {
            PteFlags::HUGE_PAGE.bits()
        };
        let cc_bits = if shared {
            self.cc.shared_bits()
        } else {
            self.cc.private_bits()
        };
        let entry = frame.0 | cc_bits | flags.bits() | huge;
        self.exchange(table, level.index_of(va), 0, entry)
            .map(|_| ())
            .map_err(|_| TableError::AlreadyMapped { va, level })
    }

    /// Clears the leaf mapping `va` (zeroes the entry) and returns what it
    /// held. The caller flushes the TLB. Empty tables are not freed.
    pub fn unmap_leaf(&self, va: VirtAddr) -> Result<Leaf, TableError> {
        loop {
            let leaf = self.lookup_address(va)?;
            if self
                .exchange(leaf.table, leaf.index, leaf.entry.0, 0)
                .is_ok()
            {
                return Ok(leaf);
            }
        }
    }
}

/// Whether `current` is still the same leaf as `seen` (same frame, same
/// kind), ignoring bits the CPU or the engine may legitimately change.
fn same_leaf(current: u64, seen: Pte, level: Level, cc: CcMask) -> bool {
    let current = Pte(current);
    let huge = PteFlags::HUGE_PAGE.bits();
    !current.is_unused()
        && cc.leaf_frame(current, level) == cc.leaf_frame(seen, level)
        && (level == Level::Pt || (current.0 & huge) == (seen.0 & huge))
}
