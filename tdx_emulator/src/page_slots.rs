//! One state byte per 4K page of guest memory, shared by every vCPU: the
//! TD model's and the SNP model's. A page is changed only by whoever holds
//! it (the BUSY bit), so a mapping change and the state byte that describes
//! it are never seen apart.

use core::sync::atomic::{AtomicU8, Ordering};

/// The holder's bit in a state byte.
pub(crate) const BUSY: u8 = 0x80;

/// Takes the page if no one holds it; its state byte (BUSY clear) then.
pub(crate) fn try_hold(slot: &AtomicU8) -> Option<u8> {
    let byte = slot.load(Ordering::SeqCst);
    if byte & BUSY != 0 {
        return None;
    }
    slot.compare_exchange(byte, byte | BUSY, Ordering::SeqCst, Ordering::SeqCst)
        .ok()
}

/// Takes the page, waiting while someone else holds it (a hypervisor
/// action blocks rather than fails); its state byte then.
pub(crate) fn hold(slot: &AtomicU8) -> u8 {
    loop {
        if let Some(state) = try_hold(slot) {
            return state;
        }
        core::hint::spin_loop();
        // In host tests vCPUs are threads, and the holder may not be
        // running: let it.
        #[cfg(test)]
        std::thread::yield_now();
    }
}

/// Releases a held page with state byte `state`.
pub(crate) fn release(slot: &AtomicU8, state: u8) {
    slot.store(state & !BUSY, Ordering::SeqCst);
}

/// Releases a held page unchanged.
pub(crate) fn release_unchanged(slot: &AtomicU8) {
    slot.fetch_and(!BUSY, Ordering::SeqCst);
}
