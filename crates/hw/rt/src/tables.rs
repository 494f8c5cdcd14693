//! GDT, TSS and IDT for a bare-metal binary (SDM 3.4.5, 8.7, 6.10–6.14), shared by L0 and our guests.
//!
//! Every exception vector runs on IST1, so a handler never depends on the interrupted stack and the red
//! zone of interrupted code survives. The stubs save all general-purpose registers into an
//! [`ExceptionFrame`] and call the handler given to [`init`]; if it returns, the interrupted code resumes
//! with the (possibly edited) frame.

use core::cell::UnsafeCell;
use core::mem::size_of;
use core::sync::atomic::{AtomicUsize, Ordering};

/// 64-bit code segment selector.
pub const CODE_SELECTOR: u16 = 0x08;
/// Data segment selector.
pub const DATA_SELECTOR: u16 = 0x10;
/// Task-state segment selector (a 16-byte descriptor: slots 0x18 and 0x20).
pub const TSS_SELECTOR: u16 = 0x18;
/// The base SYSRET derives user selectors from (IA32_STAR[63:48], SDM Vol. 2B SYSRET): 64-bit SYSRET
/// loads SS = base + 8 and CS = base + 16, both with RPL 3.
pub const SYSRET_BASE: u16 = 0x28;
/// User data selector (RPL 3), as SYSRET loads it.
pub const USER_DATA_SELECTOR: u16 = SYSRET_BASE + 8 + 3;
/// User 64-bit code selector (RPL 3), as SYSRET loads it.
pub const USER_CODE_SELECTOR: u16 = SYSRET_BASE + 16 + 3;

/// 64-bit task-state segment (SDM 8.7, Figure 8-11).
#[repr(C, packed)]
struct Tss {
    _reserved0: u32,
    rsp: [u64; 3],
    _reserved1: u64,
    ist: [u64; 7],
    _reserved2: u64,
    _reserved3: u16,
    iomap_base: u16,
}
const _: () = assert!(size_of::<Tss>() == 104);

/// 64-bit IDT gate descriptor (SDM 6.14.1, Figure 6-8).
#[derive(Clone, Copy)]
#[repr(C)]
struct IdtGate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    _reserved: u32,
}
const _: () = assert!(size_of::<IdtGate>() == 16);

const IST_STACK_SIZE: usize = 16 * 1024;

#[repr(C, align(16))]
struct Tables {
    gdt: [u64; 8],
    tss: Tss,
    idt: [IdtGate; 32],
    ist1: [u8; IST_STACK_SIZE],
}

struct TablesCell(UnsafeCell<Tables>);
// SAFETY: the binaries using this run on one CPU; the tables are written once by `init`, before any
// exception can use them, and afterwards only the CPU reads them.
unsafe impl Sync for TablesCell {}

const EMPTY_GATE: IdtGate = IdtGate {
    offset_low: 0,
    selector: 0,
    ist: 0,
    type_attr: 0,
    offset_mid: 0,
    offset_high: 0,
    _reserved: 0,
};
static TABLES: TablesCell = TablesCell(UnsafeCell::new(Tables {
    gdt: [0; 8],
    tss: Tss {
        _reserved0: 0,
        rsp: [0; 3],
        _reserved1: 0,
        ist: [0; 7],
        _reserved2: 0,
        _reserved3: 0,
        iomap_base: 104,
    },
    idt: [EMPTY_GATE; 32],
    ist1: [0; IST_STACK_SIZE],
}));

/// Registers at the exception, as the stubs save them (lowest address first).
#[repr(C)]
#[derive(Debug)]
#[allow(missing_docs)]
pub struct ExceptionFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    /// The vector the stub was entered through.
    pub vector: u64,
    /// The CPU's error code, or 0 for vectors without one.
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

/// Called for every exception; returning resumes the interrupted code with the frame's values.
pub type ExceptionHandler = fn(&mut ExceptionFrame);

static HANDLER: AtomicUsize = AtomicUsize::new(0);

/// Where the tables live, for a VMCS host-state area.
#[derive(Clone, Copy, Debug)]
pub struct TableBases {
    /// GDTR base.
    pub gdt: u64,
    /// IDTR base.
    pub idt: u64,
    /// TR base.
    pub tss: u64,
}

/// Installs the GDT (null, code 0x08, data 0x10, TSS 0x18, user segments from [`SYSRET_BASE`]), the TSS
/// and the IDT, reloads every segment
/// register, and routes all 32 exception vectors to `handler` on IST1.
///
/// Call once, at boot, with interrupts off, while running on a GDT with the same code and data selectors.
pub fn init(handler: ExceptionHandler) -> TableBases {
    HANDLER.store(handler as usize, Ordering::SeqCst);
    // SAFETY: called once at boot on the only CPU with interrupts off, so nothing else references the
    // tables (the CPU does not use them until the LGDT/LIDT below).
    let t = unsafe { &mut *TABLES.0.get() };
    t.tss.ist[0] = t.ist1.as_ptr() as u64 + IST_STACK_SIZE as u64;
    let tss = core::ptr::addr_of!(t.tss) as u64;
    let tss_limit = (size_of::<Tss>() - 1) as u64;
    t.gdt = [
        0,
        0x00af_9a00_0000_ffff, // 64-bit code, DPL 0
        0x00cf_9200_0000_ffff, // data, DPL 0
        // 16-byte available 64-bit TSS descriptor (SDM 8.2.3, Figure 8-4).
        tss_limit | ((tss & 0xff_ffff) << 16) | (0x89 << 40) | (((tss >> 24) & 0xff) << 56),
        tss >> 32,
        0x00cf_fa00_0000_ffff, // 0x28: 32-bit user code (SYSRET's base; never loaded)
        0x00cf_f200_0000_ffff, // 0x30: user data, DPL 3
        0x00af_fa00_0000_ffff, // 0x38: 64-bit user code, DPL 3
    ];
    let stubs = core::ptr::addr_of!(ihmi_rt_exception_stubs) as u64;
    for (vector, gate) in t.idt.iter_mut().enumerate() {
        let h = stubs + STUB_SIZE * vector as u64;
        *gate = IdtGate {
            offset_low: h as u16,
            selector: CODE_SELECTOR,
            ist: 1,
            type_attr: 0x8e, // present, DPL 0, 64-bit interrupt gate
            offset_mid: (h >> 16) as u16,
            offset_high: (h >> 32) as u32,
            _reserved: 0,
        };
    }
    let gdtr = DescriptorRegister {
        limit: (size_of::<[u64; 8]>() - 1) as u16,
        base: t.gdt.as_ptr() as u64,
    };
    let idtr = DescriptorRegister {
        limit: (size_of::<[IdtGate; 32]>() - 1) as u16,
        base: t.idt.as_ptr() as u64,
    };
    // SAFETY: the new GDT keeps the code and data selectors the caller already runs with, so reloading CS,
    // SS, DS and ES keeps executing; the TSS descriptor is valid and available; the IDT gates point at the
    // stubs below, which run on the IST1 stack set in the TSS.
    unsafe {
        core::arch::asm!(
            "lgdt [{gdtr}]",
            "lidt [{idtr}]",
            "push {cs}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov ds, {ds:x}",
            "mov es, {ds:x}",
            "mov ss, {ds:x}",
            "ltr {tr:x}",
            gdtr = in(reg) &gdtr,
            idtr = in(reg) &idtr,
            cs = in(reg) u64::from(CODE_SELECTOR),
            ds = in(reg) u64::from(DATA_SELECTOR),
            tr = in(reg) u64::from(TSS_SELECTOR),
            tmp = out(reg) _,
        );
    }
    TableBases {
        gdt: gdtr.base,
        idt: idtr.base,
        tss,
    }
}

/// LGDT/LIDT operand.
#[repr(C, packed)]
struct DescriptorRegister {
    limit: u16,
    base: u64,
}

/// Each stub is 16 bytes (an optional dummy error code, the vector, a jump), so stub `v` is at `16 * v`.
const STUB_SIZE: u64 = 16;

extern "C" {
    static ihmi_rt_exception_stubs: [u8; 32 * 16];
}

#[no_mangle]
extern "C" fn ihmi_rt_exception(frame: &mut ExceptionFrame) {
    let h = HANDLER.load(Ordering::SeqCst);
    if h == 0 {
        crate::cpu::halt_forever();
    }
    // SAFETY: HANDLER only ever holds 0 or an `ExceptionHandler` stored by `init`.
    let handler: ExceptionHandler = unsafe { core::mem::transmute::<usize, ExceptionHandler>(h) };
    handler(frame);
}

// Vectors 8, 10-14, 17, 21, 29 and 30 push an error code themselves (SDM 6.15); the others get a dummy 0.
core::arch::global_asm!(
    r#"
    .section .text.ihmi_rt_exceptions, "ax"
    .balign 16
    .global ihmi_rt_exception_stubs
ihmi_rt_exception_stubs:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .balign 16
    .if (\v == 8) || (\v >= 10 && \v <= 14) || (\v == 17) || (\v == 21) || (\v == 29) || (\v == 30)
    .else
    push $0
    .endif
    push $\v
    jmp ihmi_rt_exception_common
    .endr

ihmi_rt_exception_common:
    push %rax
    push %rbx
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %rbp
    push %r8
    push %r9
    push %r10
    push %r11
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, %rdi
    mov %rsp, %rbp
    and $-16, %rsp
    call ihmi_rt_exception
    mov %rbp, %rsp
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rbp
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rbx
    pop %rax
    add $16, %rsp
    iretq
"#,
    options(att_syntax)
);
