//! QEMU's firmware configuration device (docs/specs/fw_cfg.rst in QEMU):
//! how the emulator receives the TD's initramfs (`-fw_cfg
//! name=opt/tdx-emulator/initrd,file=...`). The kernel file itself comes as
//! the PVH module (`-initrd`).

const SELECTOR_PORT: u16 = 0x510;
const DATA_PORT: u16 = 0x511;
/// DMA address register: high 32 bits at 0x514, low at 0x518 (big endian);
/// writing the low half starts the transfer.
const DMA_PORT_HIGH: u16 = 0x514;
const DMA_PORT_LOW: u16 = 0x518;
const KEY_SIGNATURE: u16 = 0x0000;
const KEY_ID: u16 = 0x0001;
const KEY_FILE_DIR: u16 = 0x0019;
const ID_DMA: u32 = 1 << 1;
const DMA_ERROR: u32 = 1 << 0;
const DMA_READ: u32 = 1 << 1;
const DMA_SELECT: u32 = 1 << 3;

/// A file in the fw_cfg directory.
#[derive(Clone, Copy, Debug)]
pub struct File {
    pub select: u16,
    pub size: u32,
}

fn select(key: u16) {
    // SAFETY: the fw_cfg selector port on QEMU's PC machines; no memory.
    unsafe { bare::cpu::outw(SELECTOR_PORT, key) };
}

fn read_bytes(into: &mut [u8]) {
    for byte in into {
        // SAFETY: the fw_cfg data port; reading it advances the item.
        *byte = unsafe { bare::cpu::inb(DATA_PORT) };
    }
}

fn read_be32() -> u32 {
    let mut word = [0; 4];
    read_bytes(&mut word);
    u32::from_be_bytes(word)
}

/// Whether the device is there and speaks DMA.
fn present_with_dma() -> bool {
    select(KEY_SIGNATURE);
    let mut signature = [0; 4];
    read_bytes(&mut signature);
    if &signature != b"QEMU" {
        return false;
    }
    select(KEY_ID);
    let mut id = [0; 4];
    read_bytes(&mut id);
    u32::from_le_bytes(id) & ID_DMA != 0
}

/// Looks `name` up in the file directory.
pub fn find(name: &str) -> Option<File> {
    if !present_with_dma() {
        return None;
    }
    select(KEY_FILE_DIR);
    let count = read_be32();
    for _ in 0..count.min(4096) {
        let size = read_be32();
        let mut select_reserved = [0; 4];
        read_bytes(&mut select_reserved);
        let mut file_name = [0u8; 56];
        read_bytes(&mut file_name);
        let len = file_name.iter().position(|&b| b == 0).unwrap_or(56);
        if &file_name[..len] == name.as_bytes() {
            return Some(File {
                select: u16::from_be_bytes([select_reserved[0], select_reserved[1]]),
                size,
            });
        }
    }
    None
}

#[repr(C, align(16))]
struct DmaAccess {
    control: u32,
    length: u32,
    address: u64,
}

/// Reads all of `file` to host-physical `destination` by DMA.
///
/// # Safety
/// `[destination, destination + file.size)` is identity-mapped RAM that
/// nothing else uses while this runs.
pub unsafe fn read_to(file: File, destination: u64) -> Result<(), &'static str> {
    let mut access = DmaAccess {
        control: ((u32::from(file.select) << 16) | DMA_SELECT | DMA_READ).to_be(),
        length: file.size.to_be(),
        address: destination.to_be(),
    };
    let pointer = core::ptr::addr_of_mut!(access) as u64;
    // SAFETY: the DMA registers of the device found by `find`; the access
    // structure lives on this stack (identity-mapped) until the device
    // clears its control word, which the loop below waits for; the
    // destination is the caller's.
    unsafe {
        bare::cpu::outl(DMA_PORT_HIGH, ((pointer >> 32) as u32).to_be());
        bare::cpu::outl(DMA_PORT_LOW, (pointer as u32).to_be());
    }
    loop {
        // SAFETY: the structure above; the device writes it, hence volatile.
        let control = u32::from_be(unsafe { core::ptr::read_volatile(&access.control) });
        if control & DMA_ERROR != 0 {
            return Err("fw_cfg DMA error");
        }
        if control == 0 {
            return Ok(());
        }
        core::hint::spin_loop();
    }
}
