//! Loading a Linux bzImage the way TD firmware hands a kernel over: the
//! 64-bit boot protocol.
//!
//! Sources: Linux `Documentation/arch/x86/boot.rst` ("The Real-Mode Kernel
//! Header", "Details of Header Fields", "64-bit Boot Protocol") and
//! `arch/x86/include/uapi/asm/bootparam.h` (`struct setup_header`,
//! `struct boot_params`, the `XLF_*` flags). Offsets below are file offsets
//! of the setup header, which are also its offsets in the zero page.
//!
//! What a loader does, and what this module gives it:
//! 1. [`detect`] the kind of file, [`BzImage::parse`] its header (protocol
//!    2.12 or later with `XLF_KERNEL_64`, every length checked against the
//!    file);
//! 2. copy [`BzImage::payload`] to [`BzImage::load_address`], after
//!    [`BzImage::check_fits`] says `[load_address, kernel_end())` lies in the
//!    TD's memory, and [`BzImage::check_cmdline`] says the command line fits;
//! 3. put the initrd where [`place_initrd`] says;
//! 4. fill the zero page with [`build_boot_params`];
//! 5. enter [`BzImage::entry_64`] in 64-bit mode with RSI = the zero page,
//!    an identity map over the kernel's `init_size`, the zero page and the
//!    command line, and a GDT with flat `__BOOT_CS` (0x10) / `__BOOT_DS`
//!    (0x18) (boot.rst, "64-bit Boot Protocol").
//!
//! Nothing here panics on any input: a bad image is a [`KernelError`].

use core::fmt;

/// What a kernel file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// A Linux bzImage (boot sector flag and "HdrS" setup header).
    BzImage,
    /// An ELF file ("\x7fELF"): the emulator's own guest, or a vmlinux.
    Elf,
}

/// Why a kernel, or what is to be loaded with it, was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelError {
    /// Neither an ELF file nor a bzImage (or too short to tell).
    Unrecognised,
    /// The file ends before a part its header says it has.
    Truncated {
        /// Bytes the header implies.
        needed: u64,
        /// Bytes the file has.
        available: u64,
    },
    /// Boot protocol older than 2.12, which introduced `xloadflags` and with
    /// it `XLF_KERNEL_64`, the only way to know the 64-bit entry exists.
    ProtocolTooOld {
        /// The header's `version` (0x206), e.g. 0x020f for 2.15.
        version: u16,
    },
    /// The setup header (its end is 0x202 + the byte at 0x201) stops before
    /// fields its protocol version has.
    HeaderTooShort {
        /// Where the header says it ends.
        end: u32,
    },
    /// `xloadflags` (0x236) lacks `XLF_KERNEL_64` (bit 0): no 64-bit entry
    /// at load address + 0x200.
    Not64Bit,
    /// `syssize` (0x1F4) is 0: there is no protected-mode kernel.
    EmptyPayload,
    /// The protected-mode kernel (`syssize` * 16 bytes) ends at or before
    /// its 64-bit entry, 0x200 bytes in: the entry would run whatever
    /// follows it in memory.
    PayloadTooShort {
        /// The payload's length in bytes.
        length: u64,
    },
    /// The kernel is not relocatable (`relocatable_kernel`, 0x234, is 0) and
    /// its `pref_address` cannot be used.
    NotRelocatable {
        /// The header's `pref_address` (0x258).
        pref_address: u64,
    },
    /// `[load_address, load_address + max(init_size, payload))` does not fit
    /// in the TD's memory.
    TooLarge {
        /// The end address the kernel needs.
        needed: u64,
        /// The TD's memory size.
        available: u64,
    },
    /// No 4 KiB-aligned place for the initrd below its limit that misses
    /// the kernel.
    InitrdTooLarge {
        /// The initrd's size.
        size: u64,
        /// The end address the initrd had to stay under.
        limit: u64,
    },
    /// The initrd given to [`build_boot_params`] ends above
    /// `initrd_addr_max` + 1 and the kernel cannot take it above 4 GiB.
    InitrdAboveLimit {
        /// The initrd's end address.
        end: u64,
        /// Its limit (exclusive).
        limit: u64,
    },
    /// The initrd given to [`build_boot_params`] overlaps
    /// `[load_address, kernel_end)`.
    InitrdOverlapsKernel {
        /// The initrd's start.
        initrd: u64,
        /// The kernel's load address.
        kernel: u64,
    },
    /// The command line or initrd lies (partly) above 4 GiB but the kernel
    /// lacks `XLF_CAN_BE_LOADED_ABOVE_4G` (xloadflags bit 1).
    AboveFourGiB {
        /// The offending address.
        address: u64,
    },
    /// The command line is longer than `cmdline_size` (0x238), which counts
    /// the bytes without the terminating NUL.
    CommandLineTooLong {
        /// The command line's length in bytes.
        length: usize,
        /// The kernel's `cmdline_size`.
        max: u32,
    },
    /// The zero page buffer is shorter than `struct boot_params` (4096).
    ZeroPageTooSmall {
        /// The buffer's length.
        length: usize,
    },
    /// More memory-map entries than the zero page's `e820_table` holds
    /// (`E820_MAX_ENTRIES_ZEROPAGE`, 128).
    TooManyE820Entries {
        /// The number given.
        count: usize,
    },
    /// The initrd's address plus size overflows.
    AddressOverflow,
}

impl KernelError {
    /// One line that says why, without the numbers (see the `Display` impl
    /// for those).
    pub fn describe(&self) -> &'static str {
        match self {
            Self::Unrecognised => "not a kernel: neither an ELF file nor a bzImage",
            Self::Truncated { .. } => "the file is shorter than its header says",
            Self::ProtocolTooOld { .. } => {
                "boot protocol older than 2.12: no 64-bit entry point advertised"
            }
            Self::HeaderTooShort { .. } => {
                "the setup header is shorter than its protocol version requires"
            }
            Self::Not64Bit => "the kernel has no 64-bit entry point (XLF_KERNEL_64 clear)",
            Self::EmptyPayload => "the bzImage has no protected-mode kernel (syssize 0)",
            Self::PayloadTooShort { .. } => {
                "the bzImage's protected-mode kernel ends before its 64-bit entry (0x200)"
            }
            Self::NotRelocatable { .. } => {
                "the kernel is not relocatable and its preferred address is unusable"
            }
            Self::TooLarge { .. } => "the kernel does not fit in the TD's memory",
            Self::InitrdTooLarge { .. } => "the initrd does not fit below its address limit",
            Self::InitrdAboveLimit { .. } => "the initrd ends above the kernel's initrd_addr_max",
            Self::InitrdOverlapsKernel { .. } => "the initrd overlaps the kernel's memory",
            Self::AboveFourGiB { .. } => {
                "command line or initrd above 4 GiB, which the kernel cannot reach"
            }
            Self::CommandLineTooLong { .. } => "the command line is longer than the kernel accepts",
            Self::ZeroPageTooSmall { .. } => "the zero page buffer is shorter than 4096 bytes",
            Self::TooManyE820Entries { .. } => "more than 128 memory-map entries",
            Self::AddressOverflow => "the initrd's address range overflows",
        }
    }
}

impl fmt::Display for KernelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())?;
        match *self {
            Self::Truncated { needed, available } | Self::TooLarge { needed, available } => {
                write!(f, " (needs {needed:#x}, has {available:#x})")
            }
            Self::ProtocolTooOld { version } => {
                write!(f, " (version {}.{:02})", version >> 8, version & 0xff)
            }
            Self::HeaderTooShort { end } => write!(f, " (ends at {end:#x})"),
            Self::PayloadTooShort { length } => write!(f, " ({length:#x} bytes)"),
            Self::NotRelocatable { pref_address } => write!(f, " ({pref_address:#x})"),
            Self::InitrdTooLarge { size, limit } => {
                write!(f, " (size {size:#x}, limit {limit:#x})")
            }
            Self::InitrdAboveLimit { end, limit } => write!(f, " (end {end:#x}, limit {limit:#x})"),
            Self::InitrdOverlapsKernel { initrd, kernel } => {
                write!(f, " (initrd {initrd:#x}, kernel {kernel:#x})")
            }
            Self::AboveFourGiB { address } => write!(f, " ({address:#x})"),
            Self::CommandLineTooLong { length, max } => write!(f, " ({length} > {max})"),
            Self::ZeroPageTooSmall { length } => write!(f, " ({length})"),
            Self::TooManyE820Entries { count } => write!(f, " ({count})"),
            Self::Unrecognised | Self::Not64Bit | Self::EmptyPayload | Self::AddressOverflow => {
                Ok(())
            }
        }
    }
}

/// Setup-header offsets (bootparam.h `struct setup_header`, placed at 0x1F1
/// of both the image and `struct boot_params`; boot.rst "The Real-Mode
/// Kernel Header").
mod hdr {
    pub const START: usize = 0x1f1;
    pub const SETUP_SECTS: usize = 0x1f1;
    pub const SYSSIZE: usize = 0x1f4;
    pub const BOOT_FLAG: usize = 0x1fe;
    pub const JUMP: usize = 0x200;
    pub const HEADER: usize = 0x202;
    pub const VERSION: usize = 0x206;
    pub const TYPE_OF_LOADER: usize = 0x210;
    pub const RAMDISK_IMAGE: usize = 0x218;
    pub const RAMDISK_SIZE: usize = 0x21c;
    pub const CMD_LINE_PTR: usize = 0x228;
    pub const INITRD_ADDR_MAX: usize = 0x22c;
    pub const KERNEL_ALIGNMENT: usize = 0x230;
    pub const RELOCATABLE_KERNEL: usize = 0x234;
    pub const XLOADFLAGS: usize = 0x236;
    pub const CMDLINE_SIZE: usize = 0x238;
    pub const PREF_ADDRESS: usize = 0x258;
    pub const INIT_SIZE: usize = 0x260;
    /// End of `handover_offset`, the last field of protocol 2.12.
    pub const END_2_12: usize = 0x268;
    /// `struct boot_params` reserves 0x1F1..0x290 for the setup header
    /// (`_pad7` fills the rest; `edd_mbr_sig_buffer` starts at 0x290).
    pub const MAX_END: usize = 0x290;
}

/// `struct boot_params` offsets outside the setup header (bootparam.h).
mod zp {
    pub const SIZE: usize = 4096;
    pub const ACPI_RSDP_ADDR: usize = 0x070;
    pub const EXT_RAMDISK_IMAGE: usize = 0x0c0;
    pub const EXT_RAMDISK_SIZE: usize = 0x0c4;
    pub const EXT_CMD_LINE_PTR: usize = 0x0c8;
    pub const E820_ENTRIES: usize = 0x1e8;
    pub const E820_TABLE: usize = 0x2d0;
    pub const E820_ENTRY_SIZE: usize = 20;
}

/// "\x7fELF".
const ELF_MAGIC: [u8; 4] = *b"\x7fELF";
/// The boot sector signature at 0x1FE.
const BOOT_FLAG: u16 = 0xaa55;
/// The setup header magic at 0x202 ("HdrS").
const HDRS: [u8; 4] = *b"HdrS";
/// The oldest protocol with `xloadflags` (boot.rst: "Protocol 2.12: ...
/// Added the xloadflags field").
pub const MIN_PROTOCOL: u16 = 0x020c;
/// The version written into a zero page built for a non-Linux guest.
pub const SYNTHETIC_PROTOCOL: u16 = 0x020f;
/// `type_of_loader` for a loader without an assigned id (boot.rst).
pub const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// xloadflags bit 0: a 64-bit entry point at load address + 0x200.
pub const XLF_KERNEL_64: u16 = 1 << 0;
/// xloadflags bit 1: kernel, boot_params, command line and ramdisk may be
/// above 4 GiB.
pub const XLF_CAN_BE_LOADED_ABOVE_4G: u16 = 1 << 1;
/// Where a kernel goes when its `pref_address` is unusable: 16 MiB, Linux's
/// default `CONFIG_PHYSICAL_START` (`LOAD_PHYSICAL_ADDR`), rounded up to the
/// kernel's alignment.
pub const DEFAULT_LOAD_ADDRESS: u64 = 0x100_0000;
/// A `pref_address` below 1 MiB would cover the real-mode area Linux needs
/// for its trampoline; it is not used.
pub const LOWEST_LOAD_ADDRESS: u64 = 0x10_0000;
/// The 64-bit entry is 0x200 bytes into the protected-mode kernel (boot.rst,
/// "64-bit Boot Protocol").
pub const ENTRY_64_OFFSET: u64 = 0x200;
/// The initrd limit for protocols before 2.03 (inclusive last address).
pub const OLD_INITRD_ADDR_MAX: u32 = 0x37ff_ffff;
/// Command line limit before protocol 2.06 (without the NUL).
pub const OLD_CMDLINE_SIZE: u32 = 255;
/// `E820_MAX_ENTRIES_ZEROPAGE`.
pub const MAX_E820_ENTRIES: usize = 128;
/// No physical address is at or above 2^52 (the architectural MAXPHYADDR
/// limit); a `pref_address` whose kernel would reach past it is unusable.
const PHYS_LIMIT: u64 = 1 << 52;
const FOUR_GIB: u64 = 1 << 32;
const PAGE: u64 = 4096;

/// E820 types (`arch/x86/include/asm/e820/types.h`).
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;
pub const E820_ACPI: u32 = 3;
pub const E820_NVS: u32 = 4;

/// One entry of the zero page's `e820_table` (`struct boot_e820_entry`,
/// packed: addr u64, size u64, type u32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

fn u8_at(bytes: &[u8], at: usize) -> Option<u8> {
    bytes.get(at).copied()
}

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        bytes.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        bytes.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        bytes.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

fn has_bzimage_magic(bytes: &[u8]) -> bool {
    u16_at(bytes, hdr::BOOT_FLAG) == Some(BOOT_FLAG)
        && bytes.get(hdr::HEADER..hdr::HEADER + 4) == Some(&HDRS[..])
}

/// Tells the formats apart by magic: ELF "\x7fELF" at 0; bzImage: boot_flag
/// 0xAA55 at 0x1FE and "HdrS" at 0x202 (boot.rst). Anything else, including
/// a file too short to hold either, is [`KernelError::Unrecognised`].
pub fn detect(bytes: &[u8]) -> Result<KernelFormat, KernelError> {
    if bytes.get(..4) == Some(&ELF_MAGIC[..]) {
        Ok(KernelFormat::Elf)
    } else if has_bzimage_magic(bytes) {
        Ok(KernelFormat::BzImage)
    } else {
        Err(KernelError::Unrecognised)
    }
}

/// A parsed bzImage. Every field read is inside the file and the setup
/// header; the payload lies wholly in the file.
#[derive(Clone, Copy, Debug)]
pub struct BzImage<'a> {
    /// The setup header as the image has it (0x1F1 up to its end).
    header: &'a [u8],
    payload: &'a [u8],
    version: u16,
    xloadflags: u16,
    kernel_alignment: u32,
    relocatable: bool,
    pref_address: u64,
    init_size: u32,
    initrd_addr_max: u32,
    cmdline_size: u32,
    load_address: u64,
}

impl<'a> BzImage<'a> {
    /// Parses and validates the setup header: magic, protocol >= 2.12, a
    /// header long enough for 2.12, `XLF_KERNEL_64`, and a payload
    /// (`(setup_sects + 1) * 512` on, `syssize * 16` bytes) inside the file
    /// and longer than 0x200 bytes, so that [`Self::entry_64`] lies in it.
    /// Also chooses the load address (see [`Self::load_address`]).
    ///
    /// Whether the kernel fits the TD is a separate question, since the
    /// image does not know the TD: [`Self::check_fits`].
    pub fn parse(bytes: &'a [u8]) -> Result<Self, KernelError> {
        let truncated = |needed: usize| KernelError::Truncated {
            needed: needed as u64,
            available: bytes.len() as u64,
        };
        if !has_bzimage_magic(bytes) {
            return Err(KernelError::Unrecognised);
        }
        let version = u16_at(bytes, hdr::VERSION).ok_or(truncated(hdr::VERSION + 2))?;
        if version < MIN_PROTOCOL {
            return Err(KernelError::ProtocolTooOld { version });
        }
        // boot.rst: "The end of setup header can be calculated as follows:
        // 0x0202 + byte value at offset 0x0201". The byte is the signed
        // displacement of a short jump; a backward one is no header at all.
        let jump = u8_at(bytes, hdr::JUMP + 1).ok_or(truncated(hdr::JUMP + 2))?;
        let end = hdr::HEADER + usize::from(jump);
        if jump >= 0x80 || end < hdr::END_2_12 {
            return Err(KernelError::HeaderTooShort { end: end as u32 });
        }
        // A header can never extend past its room in boot_params.
        let end = end.min(hdr::MAX_END);
        let header = bytes.get(hdr::START..end).ok_or(truncated(end))?;
        // All reads below are inside `header`'s range of `bytes`, which the
        // check above proved present; `?`s only satisfy the types.
        let field32 = |at: usize| u32_at(bytes, at).ok_or(truncated(at + 4));

        let xloadflags = u16_at(bytes, hdr::XLOADFLAGS).ok_or(truncated(hdr::XLOADFLAGS + 2))?;
        if xloadflags & XLF_KERNEL_64 == 0 {
            return Err(KernelError::Not64Bit);
        }

        // boot.rst, setup_sects: "If this field is 0, the real value is 4."
        let setup_sects = match u8_at(bytes, hdr::SETUP_SECTS).unwrap_or(0) {
            0 => 4,
            n => usize::from(n),
        };
        let payload_start = (setup_sects + 1) * 512;
        // syssize: "The size of the protected-mode code in units of 16-byte
        // paragraphs" (a dword since 2.04).
        let syssize = field32(hdr::SYSSIZE)?;
        if syssize == 0 {
            return Err(KernelError::EmptyPayload);
        }
        let payload_len = u64::from(syssize) * 16;
        if payload_len <= ENTRY_64_OFFSET {
            return Err(KernelError::PayloadTooShort {
                length: payload_len,
            });
        }
        let payload_end = payload_start as u64 + payload_len;
        let payload = usize::try_from(payload_end)
            .ok()
            .and_then(|payload_end| bytes.get(payload_start..payload_end))
            .ok_or(KernelError::Truncated {
                needed: payload_end,
                available: bytes.len() as u64,
            })?;

        let kernel_alignment = field32(hdr::KERNEL_ALIGNMENT)?;
        let relocatable = u8_at(bytes, hdr::RELOCATABLE_KERNEL).unwrap_or(0) != 0;
        let pref_address =
            u64_at(bytes, hdr::PREF_ADDRESS).ok_or(truncated(hdr::PREF_ADDRESS + 8))?;
        let init_size = field32(hdr::INIT_SIZE)?;
        let initrd_addr_max = field32(hdr::INITRD_ADDR_MAX)?;
        let cmdline_size = field32(hdr::CMDLINE_SIZE)?;

        let footprint = u64::from(init_size).max(payload_len);
        let alignment_ok = kernel_alignment.is_power_of_two();
        let pref_usable = pref_address >= LOWEST_LOAD_ADDRESS
            && alignment_ok
            && pref_address % u64::from(kernel_alignment) == 0
            && pref_address
                .checked_add(footprint)
                .is_some_and(|end| end <= PHYS_LIMIT);
        let load_address = if pref_usable {
            pref_address
        } else if !relocatable {
            return Err(KernelError::NotRelocatable { pref_address });
        } else if alignment_ok {
            // A power of two of at most 2^31: no overflow.
            let mask = u64::from(kernel_alignment) - 1;
            (DEFAULT_LOAD_ADDRESS + mask) & !mask
        } else {
            DEFAULT_LOAD_ADDRESS
        };

        Ok(Self {
            header,
            payload,
            version,
            xloadflags,
            kernel_alignment,
            relocatable,
            pref_address,
            init_size,
            initrd_addr_max,
            cmdline_size,
            load_address,
        })
    }

    /// The protected-mode kernel (file offset `(setup_sects + 1) * 512`,
    /// `syssize * 16` bytes), to be copied to [`Self::load_address`].
    pub fn payload(&self) -> &'a [u8] {
        self.payload
    }

    /// The setup header as the image has it, from 0x1F1 to its end
    /// (0x202 + the byte at 0x201, at most 0x290).
    pub fn setup_header(&self) -> &'a [u8] {
        self.header
    }

    /// Where the payload goes: `pref_address` (0x258, protocol >= 2.10)
    /// when it is at least 1 MiB, a multiple of `kernel_alignment` (0x230,
    /// a power of two) and the kernel's footprint from it stays below 2^52;
    /// otherwise [`DEFAULT_LOAD_ADDRESS`] (16 MiB) rounded up to
    /// `kernel_alignment` (parse refuses a non-relocatable kernel then).
    pub fn load_address(&self) -> u64 {
        self.load_address
    }

    /// The 64-bit entry point: load address + 0x200, inside the payload
    /// once loaded ([`Self::parse`] refuses a shorter one).
    pub fn entry_64(&self) -> u64 {
        self.load_address + ENTRY_64_OFFSET
    }

    /// The header's `init_size` (0x260, >= 2.10): the memory the kernel
    /// needs from its load address on, for decompression and its own
    /// image. Bounds checks use [`Self::memory_needed`].
    pub fn init_size(&self) -> u64 {
        u64::from(self.init_size)
    }

    /// max(init_size, payload length).
    pub fn memory_needed(&self) -> u64 {
        self.init_size().max(self.payload.len() as u64)
    }

    /// End (exclusive) of the memory the kernel takes:
    /// load address + [`Self::memory_needed`].
    pub fn kernel_end(&self) -> u64 {
        // parse() checked this stays below 2^52 for pref_address; the
        // default address is 16 MiB-ish plus at most a u32 or file length.
        self.load_address.saturating_add(self.memory_needed())
    }

    /// [`KernelError::TooLarge`] unless `[load_address, kernel_end())` lies
    /// inside a TD memory of `memory_bytes` bytes from address 0.
    pub fn check_fits(&self, memory_bytes: u64) -> Result<(), KernelError> {
        let needed = self.kernel_end();
        if needed > memory_bytes {
            return Err(KernelError::TooLarge {
                needed,
                available: memory_bytes,
            });
        }
        Ok(())
    }

    /// The longest command line the kernel takes, without the NUL:
    /// `cmdline_size` (0x238) since 2.06, 255 before.
    pub fn cmdline_size(&self) -> u32 {
        if self.version >= 0x0206 {
            self.cmdline_size
        } else {
            OLD_CMDLINE_SIZE
        }
    }

    /// [`KernelError::CommandLineTooLong`] if `cmdline` (without its NUL) is
    /// longer than [`Self::cmdline_size`].
    pub fn check_cmdline(&self, cmdline: &[u8]) -> Result<(), KernelError> {
        let max = self.cmdline_size();
        if cmdline.len() as u64 > u64::from(max) {
            return Err(KernelError::CommandLineTooLong {
                length: cmdline.len(),
                max,
            });
        }
        Ok(())
    }

    /// The boot protocol version (0x206), e.g. 0x020f for 2.15.
    pub fn version(&self) -> u16 {
        self.version
    }

    /// The header's `xloadflags` (0x236).
    pub fn xloadflags(&self) -> u16 {
        self.xloadflags
    }

    /// `XLF_CAN_BE_LOADED_ABOVE_4G`.
    pub fn can_be_above_4g(&self) -> bool {
        self.xloadflags & XLF_CAN_BE_LOADED_ABOVE_4G != 0
    }

    /// The header's `pref_address` (0x258), used or not.
    pub fn pref_address(&self) -> u64 {
        self.pref_address
    }

    /// The header's `kernel_alignment` (0x230).
    pub fn kernel_alignment(&self) -> u32 {
        self.kernel_alignment
    }

    /// The header's `relocatable_kernel` (0x234) is nonzero.
    pub fn relocatable(&self) -> bool {
        self.relocatable
    }

    /// The highest address the initrd may occupy, inclusive:
    /// `initrd_addr_max` (0x22C) since 2.03, 0x37FFFFFF before.
    pub fn initrd_addr_max(&self) -> u32 {
        if self.version >= 0x0203 {
            self.initrd_addr_max
        } else {
            OLD_INITRD_ADDR_MAX
        }
    }
}

fn put(zero_page: &mut [u8], at: usize, bytes: &[u8]) {
    // Callers only write at fixed offsets inside the 4096 bytes that
    // build_boot_params checked are there; a miss writes nothing.
    if let Some(slot) = at
        .checked_add(bytes.len())
        .and_then(|end| zero_page.get_mut(at..end))
    {
        slot.copy_from_slice(bytes);
    }
}

/// Builds `struct boot_params` (the 4096-byte zero page) in `zero_page`
/// (boot.rst "64-bit Boot Protocol" and "Details of Header Fields";
/// bootparam.h for the offsets):
/// - zeroed, then the image's setup header copied to 0x1F1 (up to 0x202 +
///   the byte at 0x201);
/// - `type_of_loader` (0x210) = 0xFF;
/// - `e820_entries` (0x1E8) and `e820_table` (0x2D0, 20 bytes an entry, at
///   most 128);
/// - `cmd_line_ptr` (0x228) / `ext_cmd_line_ptr` (0x0C8) = `cmdline_gpa`
///   (0 for none);
/// - `ramdisk_image` (0x218), `ramdisk_size` (0x21C), `ext_ramdisk_image`
///   (0x0C0), `ext_ramdisk_size` (0x0C4) = `initrd`'s `(gpa, size)`, all 0
///   with `initrd = None` (never the values of the image's header);
/// - `acpi_rsdp_addr` (0x070) = `rsdp_gpa`.
///
/// With `image = None` (a non-Linux ELF guest) a minimal setup header is
/// written instead: boot_flag 0xAA55 (0x1FE), the jump 0xEB 0x6A (0x200:
/// header end 0x26C, as protocol 2.15 has it), "HdrS" (0x202), version
/// 0x020F (0x206); the guest validates it as Linux would.
///
/// For a Linux image the command line and initrd must be below 4 GiB unless
/// the kernel has `XLF_CAN_BE_LOADED_ABOVE_4G`, the initrd must end by
/// `initrd_addr_max` + 1 unless it has, and must miss
/// `[load_address, kernel_end)`. Nothing is written on an error.
pub fn build_boot_params(
    zero_page: &mut [u8],
    image: Option<&BzImage>,
    e820: &[E820Entry],
    cmdline_gpa: u64,
    initrd: Option<(u64, u64)>,
    rsdp_gpa: u64,
) -> Result<(), KernelError> {
    if zero_page.len() < zp::SIZE {
        return Err(KernelError::ZeroPageTooSmall {
            length: zero_page.len(),
        });
    }
    if e820.len() > MAX_E820_ENTRIES {
        return Err(KernelError::TooManyE820Entries { count: e820.len() });
    }
    let initrd_end = match initrd {
        Some((gpa, size)) => Some(gpa.checked_add(size).ok_or(KernelError::AddressOverflow)?),
        None => None,
    };
    if let Some(image) = image {
        if !image.can_be_above_4g() {
            // The command line is NUL-terminated; its first byte must be
            // reachable, and `cmd_line_ptr` alone holds 32 bits.
            if cmdline_gpa >= FOUR_GIB {
                return Err(KernelError::AboveFourGiB {
                    address: cmdline_gpa,
                });
            }
            if let (Some((gpa, _)), Some(end)) = (initrd, initrd_end) {
                if end > FOUR_GIB {
                    return Err(KernelError::AboveFourGiB { address: gpa });
                }
                let limit = u64::from(image.initrd_addr_max()) + 1;
                if end > limit {
                    return Err(KernelError::InitrdAboveLimit { end, limit });
                }
            }
        }
        if let (Some((gpa, size)), Some(end)) = (initrd, initrd_end) {
            if size != 0 && gpa < image.kernel_end() && image.load_address() < end {
                return Err(KernelError::InitrdOverlapsKernel {
                    initrd: gpa,
                    kernel: image.load_address(),
                });
            }
        }
    }

    let page = &mut zero_page[..zp::SIZE];
    page.fill(0);
    match image {
        Some(image) => put(page, hdr::START, image.setup_header()),
        None => {
            put(page, hdr::BOOT_FLAG, &BOOT_FLAG.to_le_bytes());
            put(page, hdr::JUMP, &[0xeb, 0x6a]);
            put(page, hdr::HEADER, &HDRS);
            put(page, hdr::VERSION, &SYNTHETIC_PROTOCOL.to_le_bytes());
        }
    }
    put(page, hdr::TYPE_OF_LOADER, &[LOADER_TYPE_UNDEFINED]);

    put(page, zp::E820_ENTRIES, &[e820.len() as u8]);
    for (i, entry) in e820.iter().enumerate() {
        let at = zp::E820_TABLE + i * zp::E820_ENTRY_SIZE;
        put(page, at, &entry.addr.to_le_bytes());
        put(page, at + 8, &entry.size.to_le_bytes());
        put(page, at + 16, &entry.kind.to_le_bytes());
    }

    put(page, hdr::CMD_LINE_PTR, &(cmdline_gpa as u32).to_le_bytes());
    put(
        page,
        zp::EXT_CMD_LINE_PTR,
        &((cmdline_gpa >> 32) as u32).to_le_bytes(),
    );
    // Written with or without an initrd: boot.rst has ramdisk_image and
    // ramdisk_size "write (obligatory)", 0 for none, and the copied header
    // holds whatever the file had there.
    let (gpa, size) = initrd.unwrap_or((0, 0));
    put(page, hdr::RAMDISK_IMAGE, &(gpa as u32).to_le_bytes());
    put(page, hdr::RAMDISK_SIZE, &(size as u32).to_le_bytes());
    put(
        page,
        zp::EXT_RAMDISK_IMAGE,
        &((gpa >> 32) as u32).to_le_bytes(),
    );
    put(
        page,
        zp::EXT_RAMDISK_SIZE,
        &((size >> 32) as u32).to_le_bytes(),
    );
    put(page, zp::ACPI_RSDP_ADDR, &rsdp_gpa.to_le_bytes());
    Ok(())
}

/// The highest 4 KiB-aligned start in `[low, high)` for `size` bytes.
fn highest_fit(low: u64, high: u64, size: u64) -> Option<u64> {
    let start = high.checked_sub(size)? & !(PAGE - 1);
    (start >= low).then_some(start)
}

/// Where the initrd goes: the highest 4 KiB-aligned address at or above
/// `kernel_end` whose end is at most the limit, and that misses the
/// bzImage's `[load_address, kernel_end())`.
///
/// `kernel_end` is the end of everything already placed low (firmware,
/// zero page, command line; for an ELF guest its image): the initrd goes
/// above it. RAM is taken to be contiguous from there to `ram_top`.
///
/// The limit is `ram_top`, lowered to `initrd_addr_max` + 1 (0x22C, an
/// inclusive last address; 0x37FFFFFF before 2.03) unless the kernel has
/// `XLF_CAN_BE_LOADED_ABOVE_4G` and `ram_top` is above 4 GiB. With
/// `image = None` it is `ram_top`.
pub fn place_initrd(
    image: Option<&BzImage>,
    ram_top: u64,
    kernel_end: u64,
    size: u64,
) -> Result<u64, KernelError> {
    let limit = match image {
        Some(image) if !(image.can_be_above_4g() && ram_top > FOUR_GIB) => {
            ram_top.min(u64::from(image.initrd_addr_max()) + 1)
        }
        _ => ram_top,
    };
    let found = match image {
        None => highest_fit(kernel_end, limit, size),
        Some(image) => {
            // Above the bzImage's memory first, then below it.
            highest_fit(kernel_end.max(image.kernel_end()), limit, size)
                .or_else(|| highest_fit(kernel_end, limit.min(image.load_address()), size))
        }
    };
    found.ok_or(KernelError::InitrdTooLarge { size, limit })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// A synthetic bzImage header: protocol 2.15, setup_sects 3, a
    /// 0x1000-byte payload, pref_address 16 MiB, 2 MiB alignment,
    /// relocatable, 64-bit, init_size 32 MiB, cmdline_size 2047.
    struct Builder {
        bytes: Vec<u8>,
    }

    impl Builder {
        fn new() -> Self {
            let setup_sects = 3u8;
            let payload = 0x1000usize;
            let mut bytes = vec![0u8; (usize::from(setup_sects) + 1) * 512 + payload];
            let mut b = Builder { bytes: Vec::new() };
            bytes[0x1f1] = setup_sects;
            bytes[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
            bytes[0x200] = 0xeb;
            bytes[0x201] = 0x6a;
            bytes[0x202..0x206].copy_from_slice(b"HdrS");
            b.bytes = bytes;
            b.u16(0x206, 0x020f)
                .u32(0x1f4, (payload / 16) as u32)
                .u8(0x211, 1) // LOADED_HIGH
                .u32(0x22c, 0x7fff_ffff)
                .u32(0x230, 0x20_0000)
                .u8(0x234, 1)
                .u8(0x235, 21)
                .u16(0x236, 0x7f)
                .u32(0x238, 2047)
                .u64(0x258, 0x100_0000)
                .u32(0x260, 0x200_0000)
        }
        fn u8(mut self, at: usize, v: u8) -> Self {
            self.bytes[at] = v;
            self
        }
        fn u16(mut self, at: usize, v: u16) -> Self {
            self.bytes[at..at + 2].copy_from_slice(&v.to_le_bytes());
            self
        }
        fn u32(mut self, at: usize, v: u32) -> Self {
            self.bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
            self
        }
        fn u64(mut self, at: usize, v: u64) -> Self {
            self.bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
            self
        }
    }

    fn le16(page: &[u8], at: usize) -> u16 {
        u16::from_le_bytes(page[at..at + 2].try_into().unwrap())
    }
    fn le32(page: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(page[at..at + 4].try_into().unwrap())
    }
    fn le64(page: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(page[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn a_good_header_parses() {
        let b = Builder::new().bytes;
        assert_eq!(detect(&b), Ok(KernelFormat::BzImage));
        let image = BzImage::parse(&b).unwrap();
        assert_eq!(image.version(), 0x020f);
        assert_eq!(image.load_address(), 0x100_0000);
        assert_eq!(image.entry_64(), 0x100_0200);
        assert_eq!(image.init_size(), 0x200_0000);
        assert_eq!(image.kernel_end(), 0x300_0000);
        assert_eq!(image.cmdline_size(), 2047);
        assert_eq!(image.payload().len(), 0x1000);
        assert_eq!(image.payload().as_ptr(), b[4 * 512..].as_ptr());
        assert_eq!(image.setup_header().len(), 0x26c - 0x1f1);
        assert!(image.can_be_above_4g());
    }

    #[test]
    fn setup_sects_zero_means_four() {
        let mut b = Builder::new().u8(0x1f1, 0).bytes;
        b.resize(5 * 512 + 0x1000, 0);
        let image = BzImage::parse(&b).unwrap();
        assert_eq!(image.payload().as_ptr(), b[5 * 512..].as_ptr());
    }

    #[test]
    fn not_a_kernel_at_all() {
        assert_eq!(detect(&[]), Err(KernelError::Unrecognised));
        assert_eq!(BzImage::parse(&[]).err(), Some(KernelError::Unrecognised));
        // Deterministic pseudo-random bytes (xorshift), 8 KiB.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let random: Vec<u8> = (0..8192)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert_eq!(detect(&random), Err(KernelError::Unrecognised));
        assert_eq!(
            BzImage::parse(&random).err(),
            Some(KernelError::Unrecognised)
        );
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        assert_eq!(detect(&elf), Ok(KernelFormat::Elf));
        assert_eq!(BzImage::parse(&elf).err(), Some(KernelError::Unrecognised));
        // Only the boot flag, no "HdrS".
        let mut mbr = vec![0u8; 1024];
        mbr[0x1fe..0x200].copy_from_slice(&[0x55, 0xaa]);
        assert_eq!(detect(&mbr), Err(KernelError::Unrecognised));
    }

    #[test]
    fn every_prefix_is_an_error_not_a_panic() {
        let b = Builder::new().bytes;
        for len in 0..b.len() {
            assert!(BzImage::parse(&b[..len]).is_err(), "prefix {len}");
        }
    }

    #[test]
    fn truncated_header() {
        let b = Builder::new().bytes;
        assert_eq!(
            BzImage::parse(&b[..0x240]).err(),
            Some(KernelError::Truncated {
                needed: 0x26c,
                available: 0x240
            })
        );
        assert!(matches!(
            BzImage::parse(&b[..0x207]),
            Err(KernelError::Truncated { .. })
        ));
    }

    #[test]
    fn truncated_payload() {
        let b = Builder::new().bytes;
        let cut = b.len() - 1;
        assert_eq!(
            BzImage::parse(&b[..cut]).err(),
            Some(KernelError::Truncated {
                needed: b.len() as u64,
                available: cut as u64
            })
        );
        // syssize far beyond the file.
        let big = Builder::new().u32(0x1f4, u32::MAX).bytes;
        assert!(matches!(
            BzImage::parse(&big),
            Err(KernelError::Truncated { .. })
        ));
        let empty = Builder::new().u32(0x1f4, 0).bytes;
        assert_eq!(
            BzImage::parse(&empty).err(),
            Some(KernelError::EmptyPayload)
        );
    }

    /// Found by the `kernel_image` fuzz target: a bzImage whose payload is
    /// at most 0x200 bytes (syssize 1 here) was accepted, and its 64-bit
    /// entry, load address + 0x200, lay past the bytes the loader copies.
    #[test]
    fn a_payload_that_ends_before_the_64_bit_entry_is_refused() {
        for (syssize, length) in [(1u32, 0x10u64), (0x20, 0x200)] {
            let b = Builder::new().u32(0x1f4, syssize).bytes;
            assert_eq!(
                BzImage::parse(&b).err(),
                Some(KernelError::PayloadTooShort { length })
            );
        }
        // One byte of code at the entry is enough.
        let mut b = Builder::new().u32(0x1f4, 0x21).bytes;
        b.truncate(4 * 512 + 0x210);
        let image = BzImage::parse(&b).unwrap();
        assert!(image.entry_64() < image.load_address() + image.payload().len() as u64);
        assert_eq!(
            KernelError::PayloadTooShort { length: 0x10 }.to_string(),
            "the bzImage's protected-mode kernel ends before its 64-bit entry (0x200) (0x10 bytes)"
        );
    }

    /// Found by the `kernel_image` fuzz target (the zero page read back by
    /// the guest's parser): without an initrd, `build_boot_params` left the
    /// image header's `ramdisk_image`/`ramdisk_size` in the zero page, so
    /// the kernel was told of an initrd nobody loaded.
    #[test]
    fn no_initrd_clears_the_header_ramdisk_fields() {
        let image_bytes = Builder::new()
            .u32(0x218, 0xffff_ffff)
            .u32(0x21c, 0xffff)
            .bytes;
        let image = BzImage::parse(&image_bytes).unwrap();
        let mut page = vec![0xccu8; 4096];
        build_boot_params(&mut page, Some(&image), &[], 0x2_0000, None, 0).unwrap();
        assert_eq!(le32(&page, 0x218), 0);
        assert_eq!(le32(&page, 0x21c), 0);
        assert_eq!(le32(&page, 0x0c0), 0);
        assert_eq!(le32(&page, 0x0c4), 0);
    }

    #[test]
    fn protocol_before_2_12_is_too_old() {
        let b = Builder::new().u16(0x206, 0x020b).bytes;
        assert_eq!(
            BzImage::parse(&b).err(),
            Some(KernelError::ProtocolTooOld { version: 0x020b })
        );
        assert!(BzImage::parse(&Builder::new().u16(0x206, 0x020c).bytes).is_ok());
    }

    #[test]
    fn a_header_shorter_than_2_12_is_refused() {
        let b = Builder::new().u8(0x201, 0x60).bytes;
        assert_eq!(
            BzImage::parse(&b).err(),
            Some(KernelError::HeaderTooShort { end: 0x262 })
        );
        let back = Builder::new().u8(0x201, 0xfe).bytes;
        assert!(matches!(
            BzImage::parse(&back),
            Err(KernelError::HeaderTooShort { .. })
        ));
    }

    #[test]
    fn no_64_bit_entry() {
        let b = Builder::new().u16(0x236, 0x7e).bytes;
        assert_eq!(BzImage::parse(&b).err(), Some(KernelError::Not64Bit));
    }

    #[test]
    fn too_large_for_the_td() {
        let image_bytes = Builder::new().bytes;
        let image = BzImage::parse(&image_bytes).unwrap();
        assert_eq!(image.check_fits(48 * MIB), Ok(()));
        assert_eq!(image.check_fits(0x300_0000), Ok(()));
        assert_eq!(
            image.check_fits(32 * MIB),
            Err(KernelError::TooLarge {
                needed: 0x300_0000,
                available: 32 * MIB
            })
        );
        // The payload counts when it is larger than init_size.
        let small_init = Builder::new().u32(0x260, 0x10).bytes;
        let image = BzImage::parse(&small_init).unwrap();
        assert_eq!(image.kernel_end(), 0x100_0000 + 0x1000);
    }

    #[test]
    fn unusable_pref_address_falls_back_or_is_refused() {
        // Unaligned: the default, aligned to 2 MiB.
        let b = Builder::new().u64(0x258, 0x100_1000).bytes;
        assert_eq!(
            BzImage::parse(&b).unwrap().load_address(),
            DEFAULT_LOAD_ADDRESS
        );
        // Alignment larger than the default: rounded up.
        let b = Builder::new()
            .u64(0x258, 0x100_1000)
            .u32(0x230, 0x400_0000)
            .bytes;
        assert_eq!(BzImage::parse(&b).unwrap().load_address(), 0x400_0000);
        // Alignment not a power of two.
        let b = Builder::new().u32(0x230, 0x30_0000).bytes;
        assert_eq!(
            BzImage::parse(&b).unwrap().load_address(),
            DEFAULT_LOAD_ADDRESS
        );
        // Huge pref_address: no overflow anywhere.
        let b = Builder::new().u64(0x258, 0xffff_ffff_ffe0_0000).bytes;
        let image = BzImage::parse(&b).unwrap();
        assert_eq!(image.load_address(), DEFAULT_LOAD_ADDRESS);
        assert!(image.check_fits(u64::MAX).is_ok());
        // Not relocatable and unusable: refused.
        let b = Builder::new().u64(0x258, 0x100_1000).u8(0x234, 0).bytes;
        assert_eq!(
            BzImage::parse(&b).err(),
            Some(KernelError::NotRelocatable {
                pref_address: 0x100_1000
            })
        );
        // Not relocatable, usable pref_address: fine.
        let b = Builder::new().u8(0x234, 0).bytes;
        assert_eq!(BzImage::parse(&b).unwrap().load_address(), 0x100_0000);
    }

    #[test]
    fn command_line_too_long() {
        let b = Builder::new().u32(0x238, 16).bytes;
        let image = BzImage::parse(&b).unwrap();
        assert_eq!(image.check_cmdline(b"console=ttyS0 ab"), Ok(()));
        assert_eq!(
            image.check_cmdline(b"console=ttyS0 abc"),
            Err(KernelError::CommandLineTooLong {
                length: 17,
                max: 16
            })
        );
    }

    #[test]
    fn zero_page_for_a_bzimage() {
        let image_bytes = Builder::new().bytes;
        let image = BzImage::parse(&image_bytes).unwrap();
        let mut page = vec![0xccu8; 4096];
        let e820 = [
            E820Entry {
                addr: 0,
                size: 0xa_0000,
                kind: E820_RAM,
            },
            E820Entry {
                addr: 0xe_0000,
                size: 0x2_0000,
                kind: E820_ACPI,
            },
            E820Entry {
                addr: MIB,
                size: 255 * MIB,
                kind: E820_RAM,
            },
        ];
        build_boot_params(
            &mut page,
            Some(&image),
            &e820,
            0x2_0000,
            Some((0x1_2345_6000, 0x1_0000_1000)),
            0xe_0000,
        )
        .unwrap();
        // The header as the image has it, except type_of_loader.
        assert_eq!(&page[0x1f1..0x210], &image_bytes[0x1f1..0x210]);
        assert_eq!(page[0x210], 0xff);
        assert_eq!(&page[0x211..0x218], &image_bytes[0x211..0x218]);
        assert_eq!(&page[0x22c..0x26c], &image_bytes[0x22c..0x26c]);
        assert_eq!(le16(&page, 0x1fe), 0xaa55);
        assert_eq!(&page[0x202..0x206], b"HdrS");
        // Zero outside what was written.
        assert!(page[..0x70].iter().all(|&b| b == 0));
        assert!(page[0x26c..0x2d0].iter().all(|&b| b == 0));
        assert!(page[0x2d0 + 3 * 20..].iter().all(|&b| b == 0));
        // Memory map.
        assert_eq!(page[0x1e8], 3);
        assert_eq!(le64(&page, 0x2d0 + 20), 0xe_0000);
        assert_eq!(le64(&page, 0x2d0 + 28), 0x2_0000);
        assert_eq!(le32(&page, 0x2d0 + 36), E820_ACPI);
        assert_eq!(le64(&page, 0x2d0 + 48), 255 * MIB);
        // Command line, initrd (split 32/32), RSDP.
        assert_eq!(le32(&page, 0x228), 0x2_0000);
        assert_eq!(le32(&page, 0x0c8), 0);
        assert_eq!(le32(&page, 0x218), 0x2345_6000);
        assert_eq!(le32(&page, 0x0c0), 1);
        assert_eq!(le32(&page, 0x21c), 0x1000);
        assert_eq!(le32(&page, 0x0c4), 1);
        assert_eq!(le64(&page, 0x070), 0xe_0000);
    }

    #[test]
    fn zero_page_for_an_elf_guest() {
        let mut page = vec![0xccu8; 4096];
        let e820 = [E820Entry {
            addr: 0,
            size: 0xa_0000,
            kind: E820_RAM,
        }];
        build_boot_params(&mut page, None, &e820, 0x5_0000_0000, None, 0xe_0000).unwrap();
        assert_eq!(le16(&page, 0x1fe), 0xaa55);
        assert_eq!(&page[0x202..0x206], b"HdrS");
        assert_eq!(le16(&page, 0x206), 0x020f);
        assert_eq!(0x202 + usize::from(page[0x201]), 0x26c);
        assert_eq!(page[0x210], 0xff);
        assert_eq!(le32(&page, 0x228), 0);
        assert_eq!(le32(&page, 0x0c8), 5);
        assert_eq!(le32(&page, 0x218), 0);
        assert_eq!(page[0x1e8], 1);
        assert_eq!(le64(&page, 0x070), 0xe_0000);
    }

    #[test]
    fn zero_page_errors() {
        let mut short = vec![0u8; 4095];
        assert_eq!(
            build_boot_params(&mut short, None, &[], 0, None, 0),
            Err(KernelError::ZeroPageTooSmall { length: 4095 })
        );
        let mut page = vec![0u8; 4096];
        let many = [E820Entry {
            addr: 0,
            size: 0,
            kind: 1,
        }; 129];
        assert_eq!(
            build_boot_params(&mut page, None, &many, 0, None, 0),
            Err(KernelError::TooManyE820Entries { count: 129 })
        );
        assert!(build_boot_params(&mut page, None, &many[..128], 0, None, 0).is_ok());
        assert_eq!(
            build_boot_params(&mut page, None, &[], 0, Some((u64::MAX, 2)), 0),
            Err(KernelError::AddressOverflow)
        );

        // A kernel that must stay below 4 GiB.
        let low = Builder::new().u16(0x236, 0x01).bytes;
        let image = BzImage::parse(&low).unwrap();
        assert_eq!(
            build_boot_params(&mut page, Some(&image), &[], 1 << 32, None, 0),
            Err(KernelError::AboveFourGiB { address: 1 << 32 })
        );
        assert_eq!(
            build_boot_params(
                &mut page,
                Some(&image),
                &[],
                0x2_0000,
                Some((0x8000_0000, 0x1000)),
                0
            ),
            Err(KernelError::InitrdAboveLimit {
                end: 0x8000_1000,
                limit: 0x8000_0000
            })
        );
        assert_eq!(
            build_boot_params(
                &mut page,
                Some(&image),
                &[],
                0x2_0000,
                Some((0x7fff_f000, 0x1000)),
                0
            ),
            Ok(())
        );
        assert_eq!(
            build_boot_params(
                &mut page,
                Some(&image),
                &[],
                0x2_0000,
                Some((0x2ff_f000, 0x2000)),
                0
            ),
            Err(KernelError::InitrdOverlapsKernel {
                initrd: 0x2ff_f000,
                kernel: 0x100_0000
            })
        );
    }

    #[test]
    fn initrd_placement() {
        let b = Builder::new().bytes;
        let image = BzImage::parse(&b).unwrap();
        // 256 MiB of RAM: right under the top, 4K-aligned down.
        assert_eq!(
            place_initrd(Some(&image), 256 * MIB, 0x10_0000, 0x1800),
            Ok(256 * MIB - 0x2000)
        );
        // initrd_addr_max (inclusive 0x7FFFFFFF) caps it below 4 GiB RAM.
        assert_eq!(
            place_initrd(Some(&image), 3 << 30, 0x10_0000, 0x1000),
            Ok(0x7fff_f000)
        );
        // Above 4 GiB, XLF_CAN_BE_LOADED_ABOVE_4G lifts the cap...
        assert_eq!(
            place_initrd(Some(&image), 8 << 30, 0x10_0000, 0x1000),
            Ok((8 << 30) - 0x1000)
        );
        // ...but not for a kernel without it.
        let low = Builder::new().u16(0x236, 0x01).bytes;
        let low = BzImage::parse(&low).unwrap();
        assert_eq!(
            place_initrd(Some(&low), 8 << 30, 0x10_0000, 0x1000),
            Ok(0x7fff_f000)
        );
        // Not over the kernel: RAM ends where the kernel's memory ends,
        // so the initrd goes below the kernel.
        assert_eq!(
            place_initrd(Some(&image), 0x300_0000, 0x10_0000, 0x1000),
            Ok(0x100_0000 - 0x1000)
        );
        // Too big either way.
        assert_eq!(
            place_initrd(Some(&image), 0x300_0000, 0x10_0000, 0x100_0000),
            Err(KernelError::InitrdTooLarge {
                size: 0x100_0000,
                limit: 0x300_0000
            })
        );
        assert!(place_initrd(Some(&image), 256 * MIB, 0, u64::MAX).is_err());
        // ELF guest: only ram_top and kernel_end.
        assert_eq!(place_initrd(None, 16 * MIB, 15 * MIB, MIB), Ok(15 * MIB));
        assert_eq!(
            place_initrd(None, 16 * MIB, 15 * MIB + 1, MIB),
            Err(KernelError::InitrdTooLarge {
                size: MIB,
                limit: 16 * MIB
            })
        );
    }

    #[test]
    fn errors_describe_themselves() {
        let e = KernelError::ProtocolTooOld { version: 0x020b };
        assert_eq!(
            e.to_string(),
            "boot protocol older than 2.12: no 64-bit entry point advertised (version 2.11)"
        );
        assert!(!KernelError::Not64Bit.describe().is_empty());
    }

    /// Debian's 6.12 cloud kernel, when it has been unpacked here.
    #[test]
    fn a_real_debian_kernel_parses() {
        let path = "/tmp/k/img/boot/vmlinuz-6.12.117+deb12-cloud-amd64";
        let Ok(bytes) = std::fs::read(path) else {
            eprintln!("skipped: {path} is not there");
            return;
        };
        assert_eq!(detect(&bytes), Ok(KernelFormat::BzImage));
        let image = BzImage::parse(&bytes).unwrap();
        assert_eq!(image.version(), 0x020f);
        assert_eq!(image.pref_address(), 0x100_0000);
        assert_eq!(image.load_address(), 0x100_0000);
        assert_eq!(image.entry_64(), 0x100_0200);
        assert_eq!(image.kernel_alignment(), 0x20_0000);
        assert!(image.relocatable() && image.can_be_above_4g());
        assert_eq!(image.cmdline_size(), 2047);
        assert_eq!(image.init_size(), 0x37d_c000);
        assert_eq!(image.initrd_addr_max(), 0x7fff_ffff);
        assert!(image.init_size() > image.payload().len() as u64);
        assert_eq!(image.check_fits(256 * MIB), Ok(()));
        assert!(image.check_fits(64 * MIB).is_err());
    }
}
