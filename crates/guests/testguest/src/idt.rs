//! The guest's GDT, TSS and IDT. Every vector runs on IST1, so no handler depends on the interrupted
//! stack (and the red zone of interrupted code survives).

use core::cell::UnsafeCell;
use core::mem::size_of;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::{done, say};

#[repr(C, packed)]
struct Tss {
    _r0: u32,
    rsp: [u64; 3],
    _r1: u64,
    ist: [u64; 7],
    _r2: u64,
    _r3: u16,
    iomap: u16,
}

#[derive(Clone, Copy)]
#[repr(C)]
struct Gate {
    off_lo: u16,
    sel: u16,
    ist: u8,
    attr: u8,
    off_mid: u16,
    off_hi: u32,
    _r: u32,
}

#[repr(C, align(16))]
struct Tables {
    gdt: [u64; 5],
    tss: Tss,
    idt: [Gate; 32],
    stack: [u8; 16384],
}

struct Cell(UnsafeCell<Tables>);
// SAFETY: one CPU; written once in `init` before any exception can use the tables.
unsafe impl Sync for Cell {}
static TABLES: Cell = Cell(UnsafeCell::new(Tables {
    gdt: [0; 5],
    tss: Tss {
        _r0: 0,
        rsp: [0; 3],
        _r1: 0,
        ist: [0; 7],
        _r2: 0,
        _r3: 0,
        iomap: 104,
    },
    idt: [Gate {
        off_lo: 0,
        sel: 0,
        ist: 0,
        attr: 0,
        off_mid: 0,
        off_hi: 0,
        _r: 0,
    }; 32],
    stack: [0; 16384],
}));

static BREAKPOINTS: AtomicU64 = AtomicU64::new(0);
static EXPECT_GP: AtomicBool = AtomicBool::new(false);
static GP_SEEN: AtomicBool = AtomicBool::new(false);

#[repr(C, packed)]
struct Dtr {
    limit: u16,
    base: u64,
}

pub fn init() {
    // SAFETY: called once at start on the only CPU; nothing else references the tables yet.
    let t = unsafe { &mut *TABLES.0.get() };
    t.tss.ist[0] = t.stack.as_ptr() as u64 + t.stack.len() as u64;
    let tss = core::ptr::addr_of!(t.tss) as u64;
    t.gdt = [
        0,
        0x00af_9a00_0000_ffff,
        0x00cf_9200_0000_ffff,
        (size_of::<Tss>() as u64 - 1)
            | ((tss & 0xff_ffff) << 16)
            | (0x89 << 40)
            | (((tss >> 24) & 0xff) << 56),
        tss >> 32,
    ];
    extern "C" {
        static guest_vector_stubs: [u8; 32 * 16];
    }
    let stubs = core::ptr::addr_of!(guest_vector_stubs) as u64;
    for (v, gate) in t.idt.iter_mut().enumerate() {
        let h = stubs + 16 * v as u64;
        *gate = Gate {
            off_lo: h as u16,
            sel: 0x08,
            ist: 1,
            attr: 0x8e,
            off_mid: (h >> 16) as u16,
            off_hi: (h >> 32) as u32,
            _r: 0,
        };
    }
    let gdtr = Dtr {
        limit: (size_of::<[u64; 5]>() - 1) as u16,
        base: t.gdt.as_ptr() as u64,
    };
    let idtr = Dtr {
        limit: (size_of::<[Gate; 32]>() - 1) as u16,
        base: t.idt.as_ptr() as u64,
    };
    // SAFETY: the new GDT keeps the code (0x08) and data (0x10) layout L0 started us with, the TSS
    // descriptor is valid and available, and the IDT gates point at the stubs below.
    unsafe {
        core::arch::asm!(
            "lgdt [{g}]",
            "lidt [{i}]",
            "push 0x08",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov {d:e}, 0x10",
            "mov ds, {d:e}",
            "mov es, {d:e}",
            "mov ss, {d:e}",
            "mov {d:e}, 0x18",
            "ltr {d:x}",
            g = in(reg) &gdtr,
            i = in(reg) &idtr,
            tmp = out(reg) _,
            d = out(reg) _,
        );
    }
}

/// Breakpoints the guest's #BP handler has taken.
pub fn breakpoints() -> u64 {
    BREAKPOINTS.load(Ordering::SeqCst)
}

/// Runs `f`, which must raise #GP on a 2-byte instruction (RDMSR/WRMSR); returns whether it did.
pub fn expect_gp(f: impl FnOnce()) -> bool {
    GP_SEEN.store(false, Ordering::SeqCst);
    EXPECT_GP.store(true, Ordering::SeqCst);
    f();
    EXPECT_GP.store(false, Ordering::SeqCst);
    GP_SEEN.load(Ordering::SeqCst)
}

#[repr(C)]
pub struct Frame {
    regs: [u64; 15],
    vector: u64,
    error: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

#[no_mangle]
extern "C" fn guest_vector(frame: &mut Frame) {
    match frame.vector {
        3 => {
            BREAKPOINTS.fetch_add(1, Ordering::SeqCst);
        }
        13 if EXPECT_GP.load(Ordering::SeqCst) => {
            GP_SEEN.store(true, Ordering::SeqCst);
            EXPECT_GP.store(false, Ordering::SeqCst);
            frame.rip += 2; // RDMSR and WRMSR are two bytes long
        }
        v => {
            say!(
                "testguest: unexpected exception {v} (error {:#x}) at rip={:#x}",
                frame.error,
                frame.rip
            );
            done(100 + v);
        }
    }
}

core::arch::global_asm!(
    r#"
    .section .text.guest_vectors, "ax"
    .balign 16
    .global guest_vector_stubs
guest_vector_stubs:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .balign 16
    .if (\v == 8) || (\v >= 10 && \v <= 14) || (\v == 17) || (\v == 21) || (\v == 29) || (\v == 30)
    .else
    push $0
    .endif
    push $\v
    jmp guest_vector_common
    .endr

guest_vector_common:
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
    call guest_vector
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
