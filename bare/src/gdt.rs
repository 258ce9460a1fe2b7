//! Per-CPU GDT and TSS. The TSS carries the interrupt stacks (IST) that
//! #DF and NMI switch to, so they run even when the current stack is bad.

use core::arch::asm;
use core::mem::size_of;
use core::sync::atomic::{AtomicU64, Ordering};

/// Kernel code selector.
pub const KERNEL_CODE: u16 = 0x08;
/// Kernel data selector.
pub const KERNEL_DATA: u16 = 0x10;
/// TSS selector.
pub const TSS_SELECTOR: u16 = 0x18;
/// IST index (1-based, as in the IDT) used by #DF.
pub const IST_DOUBLE_FAULT: u8 = 1;
/// IST index used by NMI.
pub const IST_NMI: u8 = 2;

/// A 64-bit code descriptor (DPL 0, accessed preset so loading never writes it).
pub const CODE64_DESCRIPTOR: u64 = 0x00af_9b00_0000_ffff;
/// A flat read/write data descriptor, base 0 (DPL 0, accessed preset).
pub const DATA_DESCRIPTOR: u64 = 0x00cf_9300_0000_ffff;

/// [`DATA_DESCRIPTOR`] with base `base`. In 64-bit mode a data descriptor's base matters only
/// when loaded into FS or GS, which take its 32 bits (zero-extended) as their base.
pub const fn data_descriptor_with_base(base: u32) -> u64 {
    let base = base as u64;
    DATA_DESCRIPTOR | (base & 0xff_ffff) << 16 | (base >> 24) << 56
}

/// The 64-bit TSS.
#[repr(C, packed(4))]
#[derive(Default)]
pub struct Tss {
    reserved0: u32,
    rsp: [u64; 3],
    reserved1: u64,
    ist: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    iomap_base: u16,
}

/// One CPU's descriptor tables. Must live as long as the CPU runs (it is
/// referenced by GDTR and TR), so callers keep it in a `'static`. The GDT
/// words are atomics only because the TSS descriptor can be written once the
/// tables have their final address, through a shared reference.
#[repr(C, align(16))]
pub struct CpuTables {
    gdt: [AtomicU64; 5],
    tss: Tss,
}

#[repr(C, packed(2))]
struct Pointer {
    limit: u16,
    base: u64,
}

impl CpuTables {
    /// Tables whose IST1 and IST2 are the given stack tops.
    pub fn new(double_fault_stack_top: u64, nmi_stack_top: u64) -> CpuTables {
        let mut tss = Tss {
            iomap_base: size_of::<Tss>() as u16,
            ..Tss::default()
        };
        tss.ist[usize::from(IST_DOUBLE_FAULT) - 1] = double_fault_stack_top;
        tss.ist[usize::from(IST_NMI) - 1] = nmi_stack_top;
        CpuTables {
            gdt: [
                AtomicU64::new(0),
                AtomicU64::new(0x00af_9a00_0000_ffff),
                AtomicU64::new(0x00cf_9200_0000_ffff),
                AtomicU64::new(0),
                AtomicU64::new(0),
            ],
            tss,
        }
    }

    /// Loads GDTR, reloads the segments and loads TR. Once per CPU.
    pub fn load(&'static self) {
        let tss = &self.tss as *const Tss as u64;
        let limit = (size_of::<Tss>() - 1) as u64;
        // 64-bit available TSS descriptor (type 9, present), 16 bytes.
        let low = (limit & 0xffff)
            | ((tss & 0xff_ffff) << 16)
            | (0x89 << 40)
            | (((limit >> 16) & 0xf) << 48)
            | (((tss >> 24) & 0xff) << 56);
        self.gdt[3].store(low, Ordering::SeqCst);
        self.gdt[4].store(tss >> 32, Ordering::SeqCst);
        // SAFETY: the GDT is 'static (self is) with the kernel code and data
        // descriptors at KERNEL_CODE and KERNEL_DATA.
        unsafe {
            load_gdt(
                self.gdt.as_ptr() as u64,
                size_of::<[AtomicU64; 5]>() as u16 - 1,
            )
        };
        // SAFETY: the TSS descriptor just written points at this 'static,
        // not-yet-busy TSS.
        unsafe {
            asm!("ltr {tss:x}", tss = in(reg) u64::from(TSS_SELECTOR), options(nostack, preserves_flags));
        }
    }
}

/// Loads GDTR with the table at `base` (`limit` = size - 1) and reloads CS,
/// SS, DS and ES with [`KERNEL_CODE`] and [`KERNEL_DATA`].
///
/// # Safety
/// The table must stay valid for as long as the CPU uses it (normally
/// `'static`) and hold a 64-bit code descriptor at `KERNEL_CODE` and a data
/// descriptor at `KERNEL_DATA`.
pub unsafe fn load_gdt(base: u64, limit: u16) {
    let pointer = Pointer { limit, base };
    // SAFETY: the caller guarantees the table and its descriptors; the far
    // return reloads CS with the code selector, then the data segments.
    unsafe {
        asm!(
            "lgdt [{pointer}]",
            "push {code}",
            "lea {scratch}, [rip + 2f]",
            "push {scratch}",
            "retfq",
            "2:",
            "mov ss, {data:x}",
            "mov ds, {data:x}",
            "mov es, {data:x}",
            pointer = in(reg) &pointer,
            code = const KERNEL_CODE as u64,
            data = in(reg) u64::from(KERNEL_DATA),
            scratch = out(reg) _,
        );
    }
}

/// Sets this CPU's GS base to `base` by loading GS from a descriptor, not through the
/// IA32_GS_BASE MSR: in a TD under the emulator that MSR write raises #VE (on an AP before it
/// has an IDT, fatally), while a segment load is an ordinary instruction everywhere. GDTR
/// points at a three-entry table for the load and is restored; GS's selector then names the
/// data descriptor of the restored table, which matters only if something reloaded GS (nothing
/// may: that would also reset the base).
///
/// The temporary table keeps a code descriptor at [`KERNEL_CODE`] and its data descriptor at
/// [`KERNEL_DATA`], so an exception or NMI taken in between is delivered and returns normally.
#[cfg(target_os = "none")]
pub fn load_gs_base_below_4g(base: u32) {
    let temporary = [0, CODE64_DESCRIPTOR, data_descriptor_with_base(base)];
    let temporary_pointer = Pointer {
        limit: size_of::<[u64; 3]>() as u16 - 1,
        base: temporary.as_ptr() as u64,
    };
    let mut saved = Pointer { limit: 0, base: 0 };
    // SAFETY: SGDT stores 10 bytes into `saved`, which has that layout; LGDT then loads a valid
    // table that lives until the GDTR is restored from `saved` two instructions later (the
    // outer table, which the caller keeps loaded, is left as it was). Loading GS with a
    // present DPL-0 data descriptor at CPL 0 cannot fault; only GS changes.
    unsafe {
        asm!(
            "sgdt [{saved}]",
            "lgdt [{temporary}]",
            "mov gs, {selector:x}",
            "lgdt [{saved}]",
            saved = in(reg) &mut saved,
            temporary = in(reg) &temporary_pointer,
            selector = in(reg) u64::from(KERNEL_DATA),
            options(nostack, preserves_flags),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_descriptor_base_is_split_as_the_cpu_reads_it() {
        assert_eq!(data_descriptor_with_base(0), DATA_DESCRIPTOR);
        let d = data_descriptor_with_base(0x1234_5678);
        // Base 15:0 in bits 31:16, base 23:16 in bits 39:32, base 31:24 in bits 63:56.
        assert_eq!((d >> 16) & 0xffff, 0x5678);
        assert_eq!((d >> 32) & 0xff, 0x34);
        assert_eq!(d >> 56, 0x12);
        // Limit, type, flags untouched.
        assert_eq!(d & 0x00ff_ff00_0000_ffff, DATA_DESCRIPTOR);
    }
}
