//! L0's own GDT, TSS and IDT (SDM 3.4.5, 7.2.3, 6.10). Every exception runs on an IST stack, so a fault
//! never lands on a broken stack and the red zone of the interrupted code is never overwritten. An
//! exception in L0 is always fatal: it prints the vector, RIP and registers, then the FAIL marker.

use core::mem::size_of;

/// Selectors in L0's GDT; the VMCS host-state area uses the same values.
pub const CODE_SELECTOR: u16 = 0x08;
/// Data selector.
pub const DATA_SELECTOR: u16 = 0x10;
/// Task-state segment selector.
pub const TSS_SELECTOR: u16 = 0x18;

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

/// One IDT gate descriptor for 64-bit mode (SDM 6.14.1, Figure 6-8).
#[derive(Clone, Copy)]
#[repr(C)]
struct IdtEntry {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    _reserved: u32,
}
const _: () = assert!(size_of::<IdtEntry>() == 16);

#[repr(C, align(16))]
struct Tables {
    gdt: [u64; 5],
    tss: Tss,
    idt: [IdtEntry; 32],
}

const IST_STACK_SIZE: usize = 16 * 1024;

#[repr(C, align(16))]
struct IstStack([u8; IST_STACK_SIZE]);

struct TablesCell(core::cell::UnsafeCell<Tables>);
// SAFETY: L0 runs on one CPU with interrupts off; the tables are written once in `init` before any
// exception can use them and only read by the CPU afterwards.
unsafe impl Sync for TablesCell {}

static TABLES: TablesCell = TablesCell(core::cell::UnsafeCell::new(Tables {
    gdt: [0; 5],
    tss: Tss {
        _reserved0: 0,
        rsp: [0; 3],
        _reserved1: 0,
        ist: [0; 7],
        _reserved2: 0,
        _reserved3: 0,
        iomap_base: 104,
    },
    idt: [IdtEntry {
        offset_low: 0,
        selector: 0,
        ist: 0,
        type_attr: 0,
        offset_mid: 0,
        offset_high: 0,
        _reserved: 0,
    }; 32],
}));

struct StackCell(core::cell::UnsafeCell<IstStack>);
// SAFETY: only the CPU uses this memory, as the IST1 stack.
unsafe impl Sync for StackCell {}
static IST1: StackCell = StackCell(core::cell::UnsafeCell::new(IstStack([0; IST_STACK_SIZE])));

/// Descriptor-table register image for LGDT/LIDT.
#[repr(C, packed)]
struct Dtr {
    limit: u16,
    base: u64,
}

/// Bases and limits L0 needs for the VMCS host-state area.
#[derive(Clone, Copy, Debug)]
pub struct HostTables {
    pub gdt_base: u64,
    pub idt_base: u64,
    pub tss_base: u64,
}

/// Installs the GDT, TSS and IDT and reloads every segment register.
pub fn init() -> HostTables {
    let t = TABLES.0.get();
    let ist_top = IST1.0.get() as u64 + IST_STACK_SIZE as u64;
    // SAFETY: single CPU, interrupts off, called once at boot: nothing else touches the tables yet.
    let tables = unsafe { &mut *t };
    tables.tss.ist[0] = ist_top;
    let tss_base = core::ptr::addr_of!(tables.tss) as u64;
    let tss_limit = (size_of::<Tss>() - 1) as u64;
    tables.gdt[0] = 0;
    tables.gdt[1] = 0x00af_9a00_0000_ffff; // 64-bit code, DPL 0
    tables.gdt[2] = 0x00cf_9200_0000_ffff; // data, DPL 0
                                           // 16-byte available 64-bit TSS descriptor (SDM 8.2.3, Figure 8-4).
    tables.gdt[3] = (tss_limit & 0xffff)
        | ((tss_base & 0xff_ffff) << 16)
        | (0x89 << 40)
        | (((tss_base >> 24) & 0xff) << 56);
    tables.gdt[4] = tss_base >> 32;
    for (vector, entry) in tables.idt.iter_mut().enumerate() {
        let handler = exception_stub_address(vector);
        *entry = IdtEntry {
            offset_low: handler as u16,
            selector: CODE_SELECTOR,
            ist: 1,
            type_attr: 0x8e, // present, DPL 0, 64-bit interrupt gate
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            _reserved: 0,
        };
    }
    let gdtr = Dtr {
        limit: (size_of::<[u64; 5]>() - 1) as u16,
        base: tables.gdt.as_ptr() as u64,
    };
    let idtr = Dtr {
        limit: (size_of::<[IdtEntry; 32]>() - 1) as u16,
        base: tables.idt.as_ptr() as u64,
    };
    // SAFETY: the GDT has the same code/data layout as the boot GDT, so reloading CS/SS/DS with the same
    // selectors keeps executing; the TSS descriptor is valid and not busy; the IDT entries point at the
    // stubs below, which run on the IST1 stack.
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
    HostTables {
        gdt_base: gdtr.base,
        idt_base: idtr.base,
        tss_base,
    }
}

/// Registers saved by the exception stubs, lowest address first.
#[repr(C)]
#[derive(Debug)]
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
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

fn exception_stub_address(vector: usize) -> u64 {
    extern "C" {
        static l0_exception_stubs: [u8; 32 * 16];
    }
    // Each stub is 16 bytes (see the asm below).
    (core::ptr::addr_of!(l0_exception_stubs) as u64) + 16 * vector as u64
}

#[no_mangle]
extern "C" fn l0_exception(frame: &ExceptionFrame) -> ! {
    crate::fatal_exception(frame)
}

// Each stub is exactly 16 bytes: an optional dummy error code, the vector, a jump to the common path.
// Vectors 8, 10-14, 17, 21, 29, 30 push an error code themselves (SDM 6.15).
core::arch::global_asm!(
    r#"
    .section .text.l0_exceptions, "ax"
    .balign 16
    .global l0_exception_stubs
l0_exception_stubs:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .balign 16
    .if (\v == 8) || (\v >= 10 && \v <= 14) || (\v == 17) || (\v == 21) || (\v == 29) || (\v == 30)
    .else
    push $0
    .endif
    push $\v
    jmp l0_exception_common
    .endr

l0_exception_common:
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
    and $-16, %rsp
    call l0_exception
    ud2
"#,
    options(att_syntax)
);
