//! The probe's L2: position-independent 64-bit code the VMM copies into guest memory. It starts in
//! long mode with the CPUID count in RDI (and, when RSI is not 0, first writes EDX at RSI: the
//! attacker VMM's), and reports only through port I/O (every OUT is an exit
//! to the VMM): the CPUIDs it made, the pages it checked and the mismatches as 4-byte OUTs to
//! [`VALUE_PORT`], in that order, then the last CPUID's vendor as 12 byte OUTs to [`DEBUG_PORT`],
//! then one OUT to [`DONE_PORT`] (its end: with KVM's in-kernel interrupt controller a HLT stays
//! in the kernel), then HLT. It references nothing outside itself, and only guest-physical
//! addresses below 2 MiB (and the one the attacker gives it).

/// Where L2 writes the vendor string, a byte at a time.
pub const DEBUG_PORT: u16 = 0xe9;
/// Where L2 writes its counts, 4 bytes at a time.
pub const VALUE_PORT: u16 = 0xea;
/// Where L2 says it is done.
pub const DONE_PORT: u16 = 0xeb;
/// Where L2's #UD handler says it took one (the byte is the vector, 6).
pub const UD_PORT: u16 = 0xec;
/// The pages L2 writes and reads back, one 64-bit pattern each.
pub const PAGES: u32 = ihmi_abi::NESTED_KVM_PAGES as u32;
/// The end of the guest-physical range L2 touches (from 1 MiB, 4 KiB a page).
pub const TOUCH_END: u64 = TOUCH_BASE + PAGES as u64 * 0x1000;
const TOUCH_BASE: u64 = ihmi_abi::NESTED_KVM_TOUCH_BASE;
/// Xored with each page's index, so a page that reads back another page's value is a mismatch.
const PATTERN: u64 = 0x6968_6d69_6c32_0000;

core::arch::global_asm!(
    // Read-only data, not code: the VMM copies it, nothing in L1 executes it.
    ".pushsection .rodata.ihmi_l2_probe, \"a\"",
    ".globl ihmi_l2_probe_start",
    ".globl ihmi_l2_probe_end",
    "ihmi_l2_probe_start:",
    // 0. The attacker's write, if it asked for one.
    "    test rsi, rsi",
    "    jz .Lno_write",
    "    mov [rsi], edx",
    ".Lno_write:",
    // 0b. The attacker's VMFUNC, if it asked for one: leaf 0 (EPTP switching) to index 1. It must
    //     fault (#UD, which the handler below reports and steps over) and change nothing.
    "    test r15, r15",
    "    jz .Lno_vmfunc",
    "    xor eax, eax",
    "    mov ecx, 1",
    "    vmfunc",
    ".Lno_vmfunc:",
    // a. CPUID leaf 0, RDI times (at least once); R8D counts them, R10-R12 keep the vendor.
    "    xor r8d, r8d",
    "    mov r9, rdi",
    ".Lcpuid:",
    "    xor eax, eax",
    "    xor ecx, ecx",
    "    cpuid",
    "    inc r8d",
    "    dec r9",
    "    jg .Lcpuid",
    "    mov r10d, ebx",
    "    mov r11d, edx",
    "    mov r12d, ecx",
    // b. One pattern a page, then read them all back: R13D counts mismatches, R14D pages read.
    "    movabs rax, {pattern}",
    "    mov rsi, {base}",
    "    xor ecx, ecx",
    ".Lwrite:",
    "    mov rdx, rcx",
    "    xor rdx, rax",
    "    mov [rsi], rdx",
    "    add rsi, 0x1000",
    "    inc ecx",
    "    cmp ecx, {pages}",
    "    jne .Lwrite",
    "    mov rsi, {base}",
    "    xor ecx, ecx",
    "    xor r13d, r13d",
    "    xor r14d, r14d",
    ".Lread:",
    "    mov rdx, rcx",
    "    xor rdx, rax",
    "    cmp [rsi], rdx",
    "    je .Lsame",
    "    inc r13d",
    ".Lsame:",
    "    inc r14d",
    "    add rsi, 0x1000",
    "    inc ecx",
    "    cmp ecx, {pages}",
    "    jne .Lread",
    // c. The report: counts, then the vendor from the stack, byte by byte.
    "    mov dx, {value_port}",
    "    mov eax, r8d",
    "    out dx, eax",
    "    mov eax, r14d",
    "    out dx, eax",
    "    mov eax, r13d",
    "    out dx, eax",
    "    sub rsp, 16",
    "    mov [rsp], r10d",
    "    mov [rsp + 4], r11d",
    "    mov [rsp + 8], r12d",
    "    mov dx, {debug_port}",
    "    xor ecx, ecx",
    ".Lvendor:",
    "    mov al, [rsp + rcx]",
    "    out dx, al",
    "    inc ecx",
    "    cmp ecx, 12",
    "    jne .Lvendor",
    // d. Done; a spurious wake-up halts again.
    "    mov dx, {done_port}",
    "    out dx, al",
    ".Lhalt:",
    "    hlt",
    "    jmp .Lhalt",
    // The #UD handler (IDT vector 6, when the VMM gives L2 an IDT): report, step over the 3-byte
    // VMFUNC, return.
    ".globl ihmi_l2_probe_ud",
    "ihmi_l2_probe_ud:",
    "    push rax",
    "    push rdx",
    "    mov dx, {ud_port}",
    "    mov al, 6",
    "    out dx, al",
    "    pop rdx",
    "    pop rax",
    "    add qword ptr [rsp], 3",
    "    iretq",
    "ihmi_l2_probe_end:",
    ".popsection",
    pattern = const PATTERN,
    base = const TOUCH_BASE,
    pages = const PAGES,
    value_port = const VALUE_PORT,
    debug_port = const DEBUG_PORT,
    done_port = const DONE_PORT,
    ud_port = const UD_PORT,
);

extern "C" {
    static ihmi_l2_probe_start: u8;
    static ihmi_l2_probe_ud: u8;
    static ihmi_l2_probe_end: u8;
}

/// Where the #UD handler is in [`program`].
pub fn ud_handler_offset() -> u64 {
    let start = &raw const ihmi_l2_probe_start;
    let ud = &raw const ihmi_l2_probe_ud;
    ud as u64 - start as u64
}

/// The L2 program's machine code.
pub fn program() -> &'static [u8] {
    let start = &raw const ihmi_l2_probe_start;
    let end = &raw const ihmi_l2_probe_end;
    // SAFETY: both labels are in the one read-only block above, end after start, and nothing
    // writes it.
    unsafe { core::slice::from_raw_parts(start, end as usize - start as usize) }
}
