//! The two ways into a bare-metal program of this project. Both end in the
//! same state and call the program's
//! `bare_main(boot_info: u64, protocol: u64)`, which must never return:
//!
//! - **PVH** (`pvh_start`, named by the `XEN_ELFNOTE_PHYS32_ENTRY` note):
//!   QEMU's `-kernel` jumps there in 32-bit protected mode, paging off,
//!   EBX = physical address of `hvm_start_info`. QEMU uses the note, not the
//!   ELF entry point.
//! - **The Linux 64-bit boot protocol** (`_start64`, the ELF entry point):
//!   TD firmware jumps there in 64-bit mode with an identity map of at least
//!   the low 4 GiB, interrupts off, RSP undefined and RSI = physical address
//!   of `struct boot_params`. A faithful TDX cannot run the PVH entry.
//!
//! The common state, reached through `boot_long_mode`: 64-bit mode with CS
//! 0x08 and DS = ES = SS 0x10 of the boot GDT below (the selectors of
//! [`crate::gdt`], which the IDT's gates use), FS = GS = 0, CR3 = the boot
//! identity map of the low 4 GiB in 2M pages (static, in the image), RSP =
//! the top of the 64 KiB boot stack, DF clear, interrupts off. RDI = the
//! boot information's physical address, RSI = the
//! [`BootProtocol`](crate::bootinfo::BootProtocol) as a raw number. The
//! program then builds its own page tables.
//!
//! `_start64` keeps the firmware's memory-encryption bits (an SEV guest's
//! C-bit, read from the firmware's entry for the code it runs) in every
//! entry of the boot map and in CR3.
//!
//! `_start64` writes only CR3 (no CR0, CR4 or EFER: the firmware's values
//! are kept, so paging stays 4-level, NX stays enabled and CR0.NE stays set)
//! and executes nothing that a TD turns into a #VE (no CPUID, MSR, port IO
//! or HLT), since there is no IDT yet and a #VE would be a triple fault.

use crate::bootinfo::BootProtocol;

// The boot GDT below puts its code and data descriptors where the IDT's
// gates and `gdt::load_gdt` expect them.
const _: () = assert!(crate::gdt::KERNEL_CODE == 0x08 && crate::gdt::KERNEL_DATA == 0x10);

core::arch::global_asm!(
    r#"
    .pushsection .note.Xen, "a", @note
    .balign 4
    .long 4              /* name size: "Xen\0" */
    .long 4              /* descriptor size: a 32-bit address */
    .long 18             /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long pvh_start
    .popsection

    /* The boot identity map of [0, 4 GiB): PML4[0] -> PDPT, PDPT[0..4] ->
       four page directories of 2M pages, present and writable. Static, so
       both entries load it as it is. */
    .pushsection .data.boot, "aw"
    .balign 4096
boot_pml4:
    .quad boot_pdpt + 0x3
    .fill 511, 8, 0
boot_pdpt:
    .quad boot_pd + 0x3
    .quad boot_pd + 0x1003
    .quad boot_pd + 0x2003
    .quad boot_pd + 0x3003
    .fill 508, 8, 0
boot_pd:
    .set boot_pd_index, 0
    .rept 2048
    .quad (boot_pd_index << 21) | 0x83      /* present, writable, 2M */
    .set boot_pd_index, boot_pd_index + 1
    .endr
    .popsection

    .pushsection .bss.boot, "aw", @nobits
    .balign 16
boot_stack_bottom: .skip 64 * 1024
    .global boot_stack_top
boot_stack_top:
    .popsection

    .pushsection .rodata.boot, "a"
    .balign 16
boot_gdt:
    .quad 0
    .quad 0x00af9a000000ffff      /* 0x08: 64-bit code */
    .quad 0x00cf92000000ffff      /* 0x10: data */
boot_gdt_end:
boot_gdt_pointer:
    .word boot_gdt_end - boot_gdt - 1
    .quad boot_gdt
    .popsection

    .pushsection .text.boot, "ax"
    .code32
    .global pvh_start
pvh_start:
    cli
    /* The PVH ABI leaves ESP undefined: the far return below needs a stack. */
    lea esp, [boot_stack_top]
    mov esi, ebx                  /* hvm_start_info, kept for bare_main */

    mov eax, cr4
    or eax, 0x20                  /* PAE */
    mov cr4, eax
    lea eax, [boot_pml4]
    mov cr3, eax
    mov ecx, 0xC0000080           /* EFER */
    rdmsr
    mov ebx, eax                  /* (EBX is free: ESI keeps the start info) */
    and ebx, 0x900
    cmp ebx, 0x900                /* LME | NXE */
    je 5f                         /* already set (a TD's may be): no needless write */
    or eax, 0x900
    wrmsr
5:
    mov eax, cr0
    or eax, 0x80010001            /* PG | WP | PE (NE and the rest kept) */
    mov cr0, eax
    lgdt [boot_gdt_pointer]
    push 0x08
    lea eax, [3f]
    push eax
    retf

    .code64
    /* Entered from compatibility mode: the upper halves of the registers
       are undefined, so the start info is zero-extended. */
3:  mov edi, esi
    mov esi, {pvh}
    jmp boot_long_mode

    /* The Linux 64-bit boot protocol: 64-bit mode, paging on with an
       identity map covering this image, the boot stack and the low 4 GiB;
       RSI = boot_params; RSP undefined; interrupts off. Writes no control
       register but CR3 and makes no access that can #VE in a TD. */
    .global _start64
_start64:
    cli
    lea rsp, [rip + boot_stack_top]
    mov rdi, rsi                  /* boot_params, all 64 bits */
    mov esi, {linux64}
    /* Our identity map instead of the firmware's (which lives in memory
       that is not RAM to us): the image is mapped the same in both, with
       the firmware's memory-encryption bits. Those are the address bits
       from 32 up of the firmware's leaf for this code (loaded below 4 GiB):
       the C-bit of an SEV guest, nothing in a TD or an ordinary VM. Its
       tables are below 4 GiB too, so the low 32 bits of each pointer reach
       them through its identity map. */
    lea r8, [rip + _start64]
    mov rax, cr3
    mov ecx, 39
7:  mov rdx, r8
    shr rdx, cl
    and edx, 511
    mov r9d, eax
    and r9d, 0xfffff000
    mov rax, [r9 + rdx * 8]
    cmp ecx, 12
    je 8f                         /* a 4K leaf */
    cmp ecx, 39
    je 9f                         /* PML4 entries are never leaves */
    test al, 0x80
    jnz 8f                        /* a 1G or 2M leaf */
9:  sub ecx, 9
    jmp 7b
8:  movabs rdx, 0x000fffff00000000
    and rdx, rax
    lea rcx, [rip + boot_pml4]
    or [rcx], rdx
    lea rcx, [rip + boot_pdpt]
    or [rcx], rdx
    or [rcx + 8], rdx
    or [rcx + 16], rdx
    or [rcx + 24], rdx
    lea rcx, [rip + boot_pd]
    mov r9d, 2048
7:  or [rcx], rdx
    add rcx, 8
    dec r9d
    jnz 7b
    lea rax, [rip + boot_pml4]
    or rax, rdx
    mov cr3, rax
    lgdt [rip + boot_gdt_pointer]
    push 0x08
    lea rax, [rip + boot_long_mode]
    push rax
    retfq

    /* Both entries: CS = 0x08 of boot_gdt, CR3 = boot_pml4,
       RDI = boot information, RSI = BootProtocol. */
boot_long_mode:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor eax, eax
    mov fs, ax
    mov gs, ax
    lea rsp, [rip + boot_stack_top]
    xor ebp, ebp
    cld
    call bare_main
4:  hlt
    jmp 4b
    .popsection
"#,
    pvh = const BootProtocol::Pvh.raw(),
    linux64 = const BootProtocol::Linux64.raw(),
);
