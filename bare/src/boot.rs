//! PVH entry: QEMU's `-kernel` finds the `XEN_ELFNOTE_PHYS32_ENTRY` note and
//! jumps to `pvh_start` in 32-bit protected mode, paging off, EBX = physical
//! address of `hvm_start_info`. We build a temporary identity map of the low
//! 4 GiB with 2M pages, enter long mode and call the program's
//! `bare_main(start_info: u64)`, which must never return. The program then
//! builds its own page tables.

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

    .pushsection .bss.boot, "aw", @nobits
    .balign 4096
boot_pml4:  .skip 4096
boot_pdpt:  .skip 4096
boot_pd:    .skip 4 * 4096
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
    /* PML4[0] -> PDPT, PDPT[0..4] -> 4 page directories of 2M pages. */
    lea eax, [boot_pdpt + 0x3]
    mov [boot_pml4], eax
    xor ecx, ecx
1:  lea eax, [boot_pd + 0x3]
    mov edx, ecx
    shl edx, 12
    add eax, edx
    mov [boot_pdpt + ecx * 8], eax
    inc ecx
    cmp ecx, 4
    jne 1b
    xor ecx, ecx
2:  mov eax, ecx
    shl eax, 21
    or eax, 0x83                  /* present, writable, 2M */
    mov [boot_pd + ecx * 8], eax
    mov eax, ecx
    shr eax, 11                   /* high half of (ecx << 21) */
    mov [boot_pd + ecx * 8 + 4], eax
    inc ecx
    cmp ecx, 2048
    jne 2b

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
    or eax, 0x80010001            /* PG | WP | PE */
    mov cr0, eax
    lgdt [boot_gdt_pointer]
    push 0x08
    lea eax, [3f]
    push eax
    retf

    .code64
3:  mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor eax, eax
    mov fs, ax
    mov gs, ax
    lea rsp, [rip + boot_stack_top]
    mov edi, esi
    xor ebp, ebp
    call bare_main
4:  hlt
    jmp 4b
    .popsection
"#
);
