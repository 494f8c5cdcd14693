//! Multiboot2 entry: GRUB leaves us in 32-bit protected mode with paging off (multiboot2 spec §3.3).
//! L0's header is here; the way to 64-bit mode is `ihmi_rt::long_mode_entry!`'s, which calls
//! `l0_main(magic, info, …)` on a 256 KiB boot stack (the boot stages move L0's state, whose judge's
//! log is ~20 KiB, by value).

core::arch::global_asm!(
    r#"
    .section .multiboot2, "a"
    .balign 8
mb2_header:
    .long 0xe85250d6                 /* magic */
    .long 0                          /* architecture: i386 protected mode */
    .long mb2_header_end - mb2_header
    .long 0x100000000 - (0xe85250d6 + (mb2_header_end - mb2_header))
    .short 0                         /* end tag */
    .short 0
    .long 8
mb2_header_end:
"#,
    options(att_syntax)
);

ihmi_rt::long_mode_entry!(
    main = crate::l0_main,
    stack = 256 * 1024,
    section = ".text.boot"
);
