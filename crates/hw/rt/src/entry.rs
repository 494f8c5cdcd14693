//! The 32-bit entry both multiboot loaders leave a kernel in (protected mode, paging off; multiboot
//! spec §3.2, multiboot2 spec §3.3), and the way from there to 64-bit Rust, shared by L0 and the
//! multiboot test kernel.

/// Defines `_start`: the 32-bit entry point a multiboot loader jumps to. It keeps what the loader
/// left (EAX, EBX, CR0 and EFLAGS, before touching any of them), identity-maps the first 4 GiB with
/// 2 MiB pages, turns on long mode with NX and SSE, and calls `$main(magic, info, cr0, eflags)`
/// (`extern "C" fn(u32, u32, u32, u32) -> !`) on a stack of `$stack` bytes. The code goes into
/// `$section` (the binary's linker script places it).
///
/// The multiboot header is the binary's own: this macro emits none.
#[macro_export]
macro_rules! long_mode_entry {
    (main = $main:path, stack = $stack:expr, section = $section:literal) => {
        core::arch::global_asm!(
            concat!(".section ", $section, ", \"ax\""),
            r#"
    .code32
    .global _start
_start:
    /* The loader gives no stack: take ours before PUSHF, which needs one. MOV changes no flag. */
    mov $ihmi_rt_boot_stack_top, %esp
    pushfl
    popl ihmi_rt_boot_eflags
    cli
    cld
    mov %eax, ihmi_rt_boot_magic
    mov %ebx, ihmi_rt_boot_info
    mov %cr0, %eax
    mov %eax, ihmi_rt_boot_cr0

    /* PML4[0] -> PDPT; PDPT[0..4] -> PD0..PD3; each PD maps 1 GiB with 2 MiB pages. */
    mov $ihmi_rt_boot_pdpt, %eax
    or $0x3, %eax
    mov %eax, ihmi_rt_boot_pml4
    xor %ecx, %ecx
1:  mov %ecx, %eax
    shl $12, %eax
    add $ihmi_rt_boot_pd, %eax
    or $0x3, %eax
    mov %eax, ihmi_rt_boot_pdpt(,%ecx,8)
    inc %ecx
    cmp $4, %ecx
    jne 1b
    xor %ecx, %ecx
2:  mov %ecx, %eax
    shl $21, %eax
    or $0x83, %eax                   /* present, writable, 2 MiB */
    mov %eax, ihmi_rt_boot_pd(,%ecx,8)
    mov %ecx, %eax
    shr $11, %eax                    /* high half of the physical address: (i * 2 MiB) >> 32 */
    mov %eax, ihmi_rt_boot_pd+4(,%ecx,8)
    inc %ecx
    cmp $2048, %ecx
    jne 2b

    mov $ihmi_rt_boot_pml4, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $((1 << 5) | (1 << 9) | (1 << 10)), %eax   /* PAE, OSFXSR, OSXMMEXCPT */
    mov %eax, %cr4
    mov $0xc0000080, %ecx
    rdmsr
    or $((1 << 8) | (1 << 11)), %eax               /* EFER.LME, EFER.NXE */
    wrmsr
    mov %cr0, %eax
    and $~((1 << 2) | (1 << 30) | (1 << 29)), %eax /* no x87 emulation, caches on */
    or $((1 << 31) | (1 << 1) | (1 << 0) | (1 << 5)), %eax  /* PG, MP, PE, NE */
    mov %eax, %cr0
    lgdt ihmi_rt_boot_gdt_ptr
    ljmp $0x08, $ihmi_rt_long_mode

    .code64
ihmi_rt_long_mode:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xor %ax, %ax
    mov %ax, %fs
    mov %ax, %gs
    mov $ihmi_rt_boot_stack_top, %rsp
    mov ihmi_rt_boot_magic(%rip), %edi
    mov ihmi_rt_boot_info(%rip), %esi
    mov ihmi_rt_boot_cr0(%rip), %edx
    mov ihmi_rt_boot_eflags(%rip), %ecx
    call {main}
3:  cli
    hlt
    jmp 3b

    .section .rodata
    .balign 16
ihmi_rt_boot_gdt:
    .quad 0
    .quad 0x00af9a000000ffff         /* 0x08: 64-bit code */
    .quad 0x00cf92000000ffff         /* 0x10: data */
ihmi_rt_boot_gdt_ptr:
    .short ihmi_rt_boot_gdt_ptr - ihmi_rt_boot_gdt - 1
    .quad ihmi_rt_boot_gdt

    .section .bss
    .balign 4096
ihmi_rt_boot_pml4: .skip 4096
ihmi_rt_boot_pdpt: .skip 4096
ihmi_rt_boot_pd:   .skip 4096 * 4
ihmi_rt_boot_stack: .skip {stack}
ihmi_rt_boot_stack_top:
ihmi_rt_boot_magic:  .long 0
ihmi_rt_boot_info:   .long 0
ihmi_rt_boot_cr0:    .long 0
ihmi_rt_boot_eflags: .long 0
"#,
            main = sym $main,
            stack = const $stack,
            options(att_syntax)
        );
    };
}
