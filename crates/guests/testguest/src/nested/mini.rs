//! `nested-mini` (nested VMX, milestone M2): the test guest as a tiny hypervisor (L1) runs a 64-bit
//! guest of its own (L2) that shares its page tables, descriptor tables and handlers. L2 makes
//! `NESTED_MINI_CPUIDS` CPUIDs, an `int3` (L1's exception bitmap has #BP: reflected to L1, which
//! injects a #BP into L2 on its VMRESUME), a `ud2` (in no exception bitmap: L2's own handler takes
//! it), a port read L1's I/O bitmap selects, one it does not, and a VMCALL. Then L1 turns on
//! external-interrupt exiting with acknowledge-on-exit and runs L2 again, waiting with interrupts on
//! until the PIT's interrupt exits to L1 with its vector. L1 checks each exit's information and that
//! L2 saw what it should; L0 judges the exits and their cost (`ihmi_judge::scenario::
//! check_nested_mini`). `nested-mini-shadow` runs the same code with L0 shadowing the VMCS: the
//! guest cannot tell, only L0's exit counts differ.

use ihmi_abi::{BootInfo, NESTED_MINI_CPUIDS};

use super::{status, vmclear, vmptrld, vmread, vmwrite, vmxoff, vmxon, GOOD, VMCS};
use crate::{idt, rdmsr, say};

/// VMCS field encodings (SDM Appendix B).
mod field {
    pub const GUEST_SELECTORS: [u64; 8] = [0x800, 0x802, 0x804, 0x806, 0x808, 0x80a, 0x80c, 0x80e];
    pub const GUEST_LIMITS: [u64; 8] = [
        0x4800, 0x4802, 0x4804, 0x4806, 0x4808, 0x480a, 0x480c, 0x480e,
    ];
    pub const GUEST_ACCESS: [u64; 8] = [
        0x4814, 0x4816, 0x4818, 0x481a, 0x481c, 0x481e, 0x4820, 0x4822,
    ];
    pub const GUEST_BASES: [u64; 8] = [
        0x6806, 0x6808, 0x680a, 0x680c, 0x680e, 0x6810, 0x6812, 0x6814,
    ];
    pub const GUEST_GDTR_LIMIT: u64 = 0x4810;
    pub const GUEST_IDTR_LIMIT: u64 = 0x4812;
    pub const GUEST_GDTR_BASE: u64 = 0x6816;
    pub const GUEST_IDTR_BASE: u64 = 0x6818;
    pub const GUEST_LINK_POINTER: u64 = 0x2800;
    pub const GUEST_EFER: u64 = 0x2806;
    pub const GUEST_CR0: u64 = 0x6800;
    pub const GUEST_CR3: u64 = 0x6802;
    pub const GUEST_CR4: u64 = 0x6804;
    pub const GUEST_DR7: u64 = 0x681a;
    pub const GUEST_RSP: u64 = 0x681c;
    pub const GUEST_RIP: u64 = 0x681e;
    pub const GUEST_RFLAGS: u64 = 0x6820;
    pub const HOST_SELECTORS: [u64; 7] = [0xc00, 0xc02, 0xc04, 0xc06, 0xc08, 0xc0a, 0xc0c];
    pub const HOST_EFER: u64 = 0x2c02;
    pub const HOST_CR0: u64 = 0x6c00;
    pub const HOST_CR3: u64 = 0x6c02;
    pub const HOST_CR4: u64 = 0x6c04;
    pub const HOST_FS_BASE: u64 = 0x6c06;
    pub const HOST_GS_BASE: u64 = 0x6c08;
    pub const HOST_TR_BASE: u64 = 0x6c0a;
    pub const HOST_GDTR_BASE: u64 = 0x6c0c;
    pub const HOST_IDTR_BASE: u64 = 0x6c0e;
    pub const PIN: u64 = 0x4000;
    pub const PROC: u64 = 0x4002;
    pub const EXCEPTION_BITMAP: u64 = 0x4004;
    pub const EXIT: u64 = 0x400c;
    pub const ENTRY: u64 = 0x4012;
    pub const ENTRY_INTERRUPTION: u64 = 0x4016;
    pub const IO_BITMAP_A: u64 = 0x2000;
    pub const IO_BITMAP_B: u64 = 0x2002;
    pub const EXIT_REASON: u64 = 0x4402;
    pub const EXIT_INTERRUPTION: u64 = 0x4404;
    pub const EXIT_INSTRUCTION_LEN: u64 = 0x440c;
    pub const EXIT_QUALIFICATION: u64 = 0x6400;
    pub const SECONDARY: u64 = 0x401e;
    pub const EPTP: u64 = 0x201a;
    pub const GUEST_PHYSICAL: u64 = 0x2400;
    pub const INSTRUCTION_ERROR: u64 = 0x4400;
    pub const IDT_VECTORING: u64 = 0x4408;
    pub const EXIT_MSR_STORE_COUNT: u64 = 0x400e;
    pub const EXIT_MSR_LOAD_COUNT: u64 = 0x4010;
    pub const ENTRY_MSR_LOAD_COUNT: u64 = 0x4014;
    pub const EXIT_MSR_STORE_ADDR: u64 = 0x2006;
    pub const EXIT_MSR_LOAD_ADDR: u64 = 0x2008;
    pub const ENTRY_MSR_LOAD_ADDR: u64 = 0x200a;
    pub const IDT_VECTORING_ERROR: u64 = 0x440a;
    pub const ENTRY_ERROR_CODE: u64 = 0x4018;
    pub const ENTRY_INSTRUCTION_LEN: u64 = 0x401a;
}

/// The port L1's I/O bitmap selects, and one it leaves to L2.
const WATCHED_PORT: u16 = 0x80;
const FREE_PORT: u16 = 0x61;

/// L2's general-purpose registers while L1 runs (a VM exit saves none of them).
#[repr(C)]
struct L2Regs(core::cell::UnsafeCell<[u64; 16]>);
// SAFETY: only the entry stub below touches it, on the guest's one CPU.
unsafe impl Sync for L2Regs {}
#[no_mangle]
static IHMI_L2_REGS: L2Regs = L2Regs(core::cell::UnsafeCell::new([0; 16]));
/// Whether the next entry is a VMLAUNCH.
#[no_mangle]
static IHMI_L1_LAUNCH: core::sync::atomic::AtomicU8 = core::sync::atomic::AtomicU8::new(0);

/// L2's stack and L1's I/O bitmaps (A: ports 0-0x7FFF, B: the rest).
#[repr(C, align(4096))]
struct Page(core::cell::UnsafeCell<[u8; 4096]>);
// SAFETY: L2 uses its stack, L1 writes the bitmap once before the first entry.
unsafe impl Sync for Page {}
static L2_STACK: [Page; 2] = [
    Page(core::cell::UnsafeCell::new([0; 4096])),
    Page(core::cell::UnsafeCell::new([0; 4096])),
];
static IO_A: Page = Page(core::cell::UnsafeCell::new([0; 4096]));
static IO_B: Page = Page(core::cell::UnsafeCell::new([0; 4096]));

/// IA32_KERNEL_GS_BASE, which L1 gives L2 a value of its own through its MSR areas.
const KERNEL_GS_BASE: u32 = 0xc000_0102;
/// L2's value of it.
const L2_KERNEL_GS_BASE: u64 = 0xffff_8880_1234_5000;

/// One MSR-area entry (SDM 25.7.2): index, reserved, value; the areas are 16-byte aligned.
#[repr(C, align(16))]
struct MsrEntry(core::cell::UnsafeCell<[u64; 2]>);
// SAFETY: L1 writes the entries before the first entry; L0 writes the store area at L2's exits,
// while L1 does not run; L1 reads it after.
unsafe impl Sync for MsrEntry {}
/// The VM-entry MSR-load area (L2's value), the VM-exit MSR-store area (where L0 puts L2's value
/// at each exit) and the VM-exit MSR-load area (L1's own value back).
static ENTRY_LOAD: MsrEntry = MsrEntry(core::cell::UnsafeCell::new([0; 2]));
static EXIT_STORE: MsrEntry = MsrEntry(core::cell::UnsafeCell::new([0; 2]));
static EXIT_LOAD: MsrEntry = MsrEntry(core::cell::UnsafeCell::new([0; 2]));

/// Fills the three areas, each one entry for IA32_KERNEL_GS_BASE: L2's value in, L1's `own` back;
/// their addresses (identity: L1's physical ones).
fn msr_areas(own: u64) -> [u64; 3] {
    let areas = [
        (&ENTRY_LOAD, L2_KERNEL_GS_BASE),
        (&EXIT_STORE, 0),
        (&EXIT_LOAD, own),
    ];
    for (area, value) in areas {
        // SAFETY: nothing else touches the areas before the first entry.
        unsafe { *area.0.get() = [u64::from(KERNEL_GS_BASE), value] };
    }
    areas.map(|(a, _)| a.0.get() as u64)
}

/// What L0 stored into the VM-exit MSR-store area at L2's last exit.
fn stored_kernel_gs_base() -> u64 {
    // SAFETY: L1 runs: L0 wrote the area at the last exit and does not now.
    let entry: [u64; 2] = unsafe { core::ptr::read_volatile(EXIT_STORE.0.get()) };
    entry[1]
}

/// `nested-mini-ept`: L1's EPT for L2 (EPT12), built a page at a time on L2's EPT violations,
/// identity (L2 shares L1's memory): its tables, the first the root.
const EPT12_TABLES: usize = 32;
static EPT12: [Page; EPT12_TABLES] =
    [const { Page(core::cell::UnsafeCell::new([0; 4096])) }; EPT12_TABLES];
static EPT12_USED: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(1);
/// The page L2 reads in the last step, which L1's EPT12 then maps onto a frame of L0's.
static TARGET: Page = Page(core::cell::UnsafeCell::new([0; 4096]));

/// EPTP of EPT12: write-back, 4-level walks.
fn eptp12() -> u64 {
    EPT12[0].0.get() as u64 | 0x1e
}

/// Maps L2's page at `gpa` onto L1's `target` in EPT12 with read, write and execute (write-back
/// memory), making the tables on the way. Whether the tables had room.
fn ept12_map(gpa: u64, target: u64) -> bool {
    // The entry for `gpa` at `level` in the table at `table` (an address of one of EPT12's pages).
    let entry = |table: u64, level: u64| {
        let i = (gpa >> (12 + 9 * (level - 1))) & 0x1ff;
        (table + i * 8) as *mut u64
    };
    let mut table = EPT12[0].0.get() as u64;
    for level in [4u64, 3, 2] {
        let e = entry(table, level);
        // SAFETY: `e` is an entry of one of EPT12's pages, which only L1 writes, while L2 is not
        // running.
        let mut value = unsafe { e.read_volatile() };
        if value & 7 == 0 {
            let n = EPT12_USED.fetch_add(1, core::sync::atomic::Ordering::SeqCst);
            let Some(next) = EPT12.get(n) else {
                return false;
            };
            value = next.0.get() as u64 | 7;
            // SAFETY: as above; `next` is a fresh table, zero since boot.
            unsafe { e.write_volatile(value) };
        }
        table = value & !0xfff;
    }
    // SAFETY: as above: the page table just found or made.
    unsafe { entry(table, 1).write_volatile((target & !0xfff) | 7 | 6 << 3) };
    true
}

/// INVEPT of all contexts; RFLAGS after it.
fn invept_all() -> u64 {
    let descriptor = [eptp12(), 0u64];
    let rflags: u64;
    // SAFETY: INVEPT reads the 16-byte descriptor, which is ours, and changes no memory.
    unsafe {
        core::arch::asm!(
            "invept {t}, xmmword ptr [{d}]",
            "pushfq",
            "pop {f}",
            t = in(reg) 2u64,
            d = in(reg) descriptor.as_ptr(),
            f = out(reg) rflags,
        )
    };
    rflags
}

/// The line L1 writes to L0's debug port before its last step (which L0 ends): how many of its own
/// checks failed up to there.
fn report(failures: u64) {
    /// Port 0xE9, a byte per OUT: L0's debug port, whose lines L0's judge reads.
    struct DebugPort;
    impl core::fmt::Write for DebugPort {
        fn write_str(&mut self, s: &str) -> core::fmt::Result {
            s.bytes().for_each(|b| outb(0xe9, b));
            Ok(())
        }
    }
    let _ = core::fmt::Write::write_fmt(
        &mut DebugPort,
        format_args!("{}{failures}\n", ihmi_abi::NESTED_MINI_EPT_REPORT),
    );
}

extern "C" {
    /// Enters L2 (VMLAUNCH if `IHMI_L1_LAUNCH`, else VMRESUME) with `IHMI_L2_REGS`; returns 0 at
    /// the next VM exit (L2's registers saved back), or RFLAGS if the entry failed.
    fn ihmi_l1_enter() -> u64;
    fn ihmi_l2_entry();
    fn ihmi_l2_wait();
    fn ihmi_l2_touch();
}

// The entry stub keeps L1's callee-saved registers on its stack, points the host RSP and RIP of the
// VMCS at that stack and at the exit label, loads L2's registers and enters. Slots of IHMI_L2_REGS:
// rax 0, rbx 8, rcx 16, rdx 24, rbp 32, rdi 40, r8 48 ... r15 104, rsi 112.
core::arch::global_asm!(
    ".global ihmi_l1_enter",
    "ihmi_l1_enter:",
    "push rbp",
    "push rbx",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "mov rdx, 0x6c14",
    "vmwrite rdx, rsp",
    "lea rax, [rip + 2f]",
    "mov rdx, 0x6c16",
    "vmwrite rdx, rax",
    "lea rsi, [rip + IHMI_L2_REGS]",
    "mov rax, [rsi]",
    "mov rbx, [rsi + 8]",
    "mov rcx, [rsi + 16]",
    "mov rdx, [rsi + 24]",
    "mov rbp, [rsi + 32]",
    "mov rdi, [rsi + 40]",
    "mov r8, [rsi + 48]",
    "mov r9, [rsi + 56]",
    "mov r10, [rsi + 64]",
    "mov r11, [rsi + 72]",
    "mov r12, [rsi + 80]",
    "mov r13, [rsi + 88]",
    "mov r14, [rsi + 96]",
    "mov r15, [rsi + 104]",
    "test byte ptr [rip + IHMI_L1_LAUNCH], 1",
    "mov rsi, [rsi + 112]",
    "jnz 3f",
    "vmresume",
    "jmp 4f",
    "3:",
    "vmlaunch",
    "4:",
    "pushfq",
    "pop rax",
    "jmp 5f",
    "2:",
    "push rsi",
    "lea rsi, [rip + IHMI_L2_REGS]",
    "mov [rsi], rax",
    "mov [rsi + 8], rbx",
    "mov [rsi + 16], rcx",
    "mov [rsi + 24], rdx",
    "mov [rsi + 32], rbp",
    "mov [rsi + 40], rdi",
    "mov [rsi + 48], r8",
    "mov [rsi + 56], r9",
    "mov [rsi + 64], r10",
    "mov [rsi + 72], r11",
    "mov [rsi + 80], r12",
    "mov [rsi + 88], r13",
    "mov [rsi + 96], r14",
    "mov [rsi + 104], r15",
    "pop rax",
    "mov [rsi + 112], rax",
    "xor eax, eax",
    "5:",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbx",
    "pop rbp",
    "ret",
    // L2: the CPUIDs, int3, ud2 (skipped by L2's handler), the two port reads, VMCALL.
    ".global ihmi_l2_entry",
    "ihmi_l2_entry:",
    "mov r12d, {cpuids}",
    "6:",
    "xor eax, eax",
    "xor ecx, ecx",
    "cpuid",
    "dec r12d",
    "jnz 6b",
    "int3",
    "ud2",
    "in al, {watched}",
    "in al, {free}",
    "vmcall",
    "7:",
    "hlt",
    "jmp 7b",
    // L2's second run: interrupts on, waiting for the timer's (external-interrupt exiting).
    ".global ihmi_l2_wait",
    "ihmi_l2_wait:",
    "sti",
    "8:",
    "pause",
    "jmp 8b",
    // `nested-mini-ept`'s last step: L2 reads the page at RDI, then VMCALL.
    ".global ihmi_l2_touch",
    "ihmi_l2_touch:",
    "mov rax, [rdi]",
    "vmcall",
    "9:",
    "hlt",
    "jmp 9b",
    cpuids = const NESTED_MINI_CPUIDS,
    watched = const WATCHED_PORT,
    free = const FREE_PORT,
);

/// L1's descriptor-table registers and selectors as the CPU holds them now.
struct Tables {
    gdt: (u64, u16),
    idt: (u64, u16),
    /// ES, CS, SS, DS, FS, GS, TR.
    selectors: [u16; 7],
    tss: u64,
}

fn tables() -> Tables {
    let mut gdtr = [0u8; 10];
    let mut idtr = [0u8; 10];
    let (es, cs, ss, ds, fs, gs, tr): (u16, u16, u16, u16, u16, u16, u16);
    // SAFETY: SGDT stores 10 bytes into our buffer.
    unsafe { core::arch::asm!("sgdt [{}]", in(reg) gdtr.as_mut_ptr(), options(nostack)) };
    // SAFETY: SIDT stores 10 bytes into our buffer.
    unsafe { core::arch::asm!("sidt [{}]", in(reg) idtr.as_mut_ptr(), options(nostack)) };
    // SAFETY: reading segment registers and TR has no effect.
    unsafe {
        core::arch::asm!(
            "mov {0:x}, es", "mov {1:x}, cs", "mov {2:x}, ss", "mov {3:x}, ds",
            "mov {4:x}, fs", "mov {5:x}, gs", "str {6:x}",
            out(reg) es, out(reg) cs, out(reg) ss, out(reg) ds, out(reg) fs, out(reg) gs,
            out(reg) tr, options(nomem, nostack)
        );
    }
    let split = |r: [u8; 10]| {
        let limit = u16::from_le_bytes([r[0], r[1]]);
        let mut b = [0u8; 8];
        b.copy_from_slice(&r[2..]);
        (u64::from_le_bytes(b), limit)
    };
    let gdt = split(gdtr);
    // The TSS descriptor (16 bytes in long mode) holds the base in four pieces.
    let d = (gdt.0 + u64::from(tr & !7)) as *const [u64; 2];
    // SAFETY: TR names a 16-byte descriptor within the GDT the CPU uses, which is mapped.
    let [lo, hi] = unsafe { d.read_volatile() };
    let tss = ((lo >> 16) & 0xff_ffff) | ((lo >> 56) << 24) | ((hi & 0xffff_ffff) << 32);
    Tables {
        gdt,
        idt: split(idtr),
        selectors: [es, cs, ss, ds, fs, gs, tr],
        tss,
    }
}

/// Fills the current VMCS for L2 (guest state: L1's own, at `ihmi_l2_entry` on its own stack) and
/// for L1's return (host state: L1's now). Whether every VMWRITE succeeded.
fn write_vmcs(t: &Tables, ept: bool) -> bool {
    use field::*;
    let efer = rdmsr(0xc000_0080);
    let must = |m: u32| rdmsr(m) & 0xffff_ffff;
    let stack_top = L2_STACK[1].0.get() as u64 + 4096;
    let code = 0xa09b; // present, DPL 0, code, execute/read, accessed, L, G
    let data = 0xc093; // present, DPL 0, data, read/write, accessed, D/B, G
    let unusable = 1 << 16;
    let [es, cs, ss, ds, fs, gs, tr] = t.selectors;
    let mut writes: heapless_writes::List = heapless_writes::List::default();
    for (i, sel) in [es, cs, ss, ds, fs, gs, 0, tr].into_iter().enumerate() {
        let access = match i {
            1 => code,
            6 => unusable,
            7 => 0x8b, // present busy 64-bit TSS
            _ if sel == 0 => unusable,
            _ => data,
        };
        let (base, limit) = match i {
            7 => (t.tss, 0x67),
            4 => (rdmsr(0xc000_0100), 0xffff_ffff),
            5 => (rdmsr(0xc000_0101), 0xffff_ffff),
            6 => (0, 0),
            _ => (0, 0xffff_ffff),
        };
        writes.push(GUEST_SELECTORS[i], u64::from(sel));
        writes.push(GUEST_ACCESS[i], access);
        writes.push(GUEST_LIMITS[i], limit);
        writes.push(GUEST_BASES[i], base);
    }
    for (f, v) in [
        (GUEST_GDTR_BASE, t.gdt.0),
        (GUEST_GDTR_LIMIT, u64::from(t.gdt.1)),
        (GUEST_IDTR_BASE, t.idt.0),
        (GUEST_IDTR_LIMIT, u64::from(t.idt.1)),
        (GUEST_LINK_POINTER, u64::MAX),
        (GUEST_EFER, efer),
        (GUEST_CR0, ihmi_rt::cpu::read_cr0()),
        (GUEST_CR3, ihmi_rt::cpu::read_cr3()),
        (GUEST_CR4, super::read_cr4()),
        (GUEST_DR7, 0x400),
        (GUEST_RSP, stack_top),
        (GUEST_RIP, ihmi_l2_entry as *const () as u64),
        (GUEST_RFLAGS, 0x2),
        (HOST_EFER, efer),
        (HOST_CR0, ihmi_rt::cpu::read_cr0()),
        (HOST_CR3, ihmi_rt::cpu::read_cr3()),
        (HOST_CR4, super::read_cr4()),
        (HOST_FS_BASE, rdmsr(0xc000_0100)),
        (HOST_GS_BASE, rdmsr(0xc000_0101)),
        (HOST_TR_BASE, t.tss),
        (HOST_GDTR_BASE, t.gdt.0),
        (HOST_IDTR_BASE, t.idt.0),
        (PIN, must(0x48d)),
        (PROC, must(0x48e) | 1 << 25 | u64::from(ept) << 31), // I/O bitmaps, secondary
        (EXCEPTION_BITMAP, 1 << 3),                           // #BP
        (EXIT, must(0x48f) | 1 << 9 | 1 << 20 | 1 << 21),     // 64-bit host, save/load EFER
        (ENTRY, must(0x490) | 1 << 9 | 1 << 15),              // IA-32e guest, load EFER
        (IO_BITMAP_A, IO_A.0.get() as u64),
        (IO_BITMAP_B, IO_B.0.get() as u64),
    ] {
        writes.push(f, v);
    }
    for (i, &f) in HOST_SELECTORS.iter().enumerate() {
        writes.push(f, u64::from(t.selectors[i]));
    }
    if ept {
        writes.push(SECONDARY, 1 << 1); // enable EPT
        writes.push(EPTP, eptp12());
    }
    // L2's own IA32_KERNEL_GS_BASE, in through the VM-entry MSR-load area, stored at each exit,
    // and L1's back through the VM-exit MSR-load area.
    let [entry_load, exit_store, exit_load] = msr_areas(rdmsr(KERNEL_GS_BASE));
    for (f, v) in [
        (ENTRY_MSR_LOAD_COUNT, 1),
        (ENTRY_MSR_LOAD_ADDR, entry_load),
        (EXIT_MSR_STORE_COUNT, 1),
        (EXIT_MSR_STORE_ADDR, exit_store),
        (EXIT_MSR_LOAD_COUNT, 1),
        (EXIT_MSR_LOAD_ADDR, exit_load),
    ] {
        writes.push(f, v);
    }
    writes.all(|f, v| status(vmwrite(f, v)).is_ok())
}

/// A fixed list of VMWRITEs (the guest has no allocator).
mod heapless_writes {
    pub struct List {
        items: [(u64, u64); 96],
        len: usize,
    }

    impl Default for List {
        fn default() -> Self {
            Self {
                items: [(0, 0); 96],
                len: 0,
            }
        }
    }

    impl List {
        pub fn push(&mut self, field: u64, value: u64) {
            self.items[self.len] = (field, value);
            self.len += 1;
        }

        pub fn all(&self, mut f: impl FnMut(u64, u64) -> bool) -> bool {
            self.items[..self.len].iter().all(|&(a, b)| f(a, b))
        }
    }
}

/// The PIT and the primary PIC (ports as the PC has them).
const PIT_COMMAND: u16 = 0x43;
const PIT_CHANNEL0: u16 = 0x40;
const PIC_COMMAND: u16 = 0x20;
const PIC_DATA: u16 = 0x21;

fn outb(port: u16, value: u8) {
    // SAFETY: the ports are the PIT's and the PIC's, which the guest owns and L0 passes through,
    // and L0's debug port (0xE9), which L0 intercepts; none changes memory.
    unsafe { x86::io::outb(port, value) }
}

fn inb(port: u16) -> u8 {
    // SAFETY: as for `outb`.
    unsafe { x86::io::inb(port) }
}

/// L2's second run: with external-interrupt exiting and acknowledge-interrupt-on-exit added to the
/// `pin` and `exit` controls of the first (read before it, so that no MSR read adds to the VMCALL's
/// round trip), L2 waits
/// with interrupts on while the PIT counts 1 ms; the interrupt exits to L1 with its vector. L1
/// sends the PIC its end of interrupt and puts the PIC's mask back. The exit's interruption
/// information, or `None` if the exit was something else.
fn external_interrupt(pin: u64, exit: u64, ept_faults: &mut u64) -> Option<u64> {
    let mask = inb(PIC_DATA);
    // Channel 0, lobyte/hibyte, mode 2 (rate generator), 1193 ticks of 1.193 MHz.
    outb(PIT_COMMAND, 0x34);
    outb(PIT_CHANNEL0, (1193 & 0xff) as u8);
    outb(PIT_CHANNEL0, (1193 >> 8) as u8);
    outb(PIC_DATA, mask & !1);
    let ok = [
        (field::PIN, pin | 1),         // external-interrupt exiting
        (field::EXIT, exit | 1 << 15), // acknowledge interrupt on exit
        (field::GUEST_RIP, ihmi_l2_wait as *const () as u64),
    ]
    .iter()
    .all(|&(f, v)| status(vmwrite(f, v)).is_ok());
    let (failed, reason) = loop {
        // SAFETY: as for the first run; the VMCS is launched, so this is a VMRESUME.
        let failed = ok.then(|| unsafe { ihmi_l1_enter() });
        let reason = vmread(field::EXIT_REASON).0;
        // With EPT12, L2's first touch of a page is an EPT violation L1 maps it on.
        if failed == Some(0) && reason == 48 && ept_map_faulting(ept_faults) {
            continue;
        }
        break (failed, reason);
    };
    let info = vmread(field::EXIT_INTERRUPTION).0;
    outb(PIC_COMMAND, 0x20); // end of interrupt
    outb(PIC_DATA, mask);
    (failed == Some(0) && reason == 1).then_some(info)
}

/// L2's EPT violation at the guest-physical address the exit names: L1 maps that page, identity,
/// in EPT12, and an event the violation interrupted the delivery of (an injected #BP reaching
/// L2's handler's page, say) is injected again, as the SDM asks of a hypervisor (28.2.4). Whether
/// EPT12 had room.
fn ept_map_faulting(faults: &mut u64) -> bool {
    *faults += 1;
    let gpa = vmread(field::GUEST_PHYSICAL).0 & !0xfff;
    let vectoring = vmread(field::IDT_VECTORING).0;
    if vectoring >> 31 == 1 {
        // Bit 12 is undefined in the vectoring information and reserved in the injection field.
        vmwrite(field::ENTRY_INTERRUPTION, vectoring & !(1 << 12));
        if vectoring & (1 << 11) != 0 {
            vmwrite(
                field::ENTRY_ERROR_CODE,
                vmread(field::IDT_VECTORING_ERROR).0,
            );
        }
        vmwrite(
            field::ENTRY_INSTRUCTION_LEN,
            vmread(field::EXIT_INSTRUCTION_LEN).0,
        );
    }
    ept12_map(gpa, gpa)
}

pub fn run(info: &BootInfo) -> u64 {
    run_with(info, false)
}

/// `nested-mini-ept`: the same with an EPT of L1's for L2, then the two attacks on L0 through it.
pub fn run_ept(info: &BootInfo) -> u64 {
    run_with(info, true)
}

fn run_with(info: &BootInfo, ept: bool) -> u64 {
    let mut failures = 0u64;
    let mut check = super::checker(&mut failures);
    let revision = rdmsr(0x480) as u32 & 0x7fff_ffff;
    let (vmxon_region, vmcs) = (GOOD.prepare(revision), VMCS.prepare(revision));
    // SAFETY: nothing else uses the bitmap yet; one bit: the watched port.
    unsafe {
        (*IO_A.0.get())[usize::from(WATCHED_PORT / 8)] |= 1 << (WATCHED_PORT % 8);
    }
    super::write_cr4(super::read_cr4() | super::CR4_VMXE);
    check(status(vmxon(&vmxon_region)).is_ok(), "VMXON");
    check(
        status(vmclear(&vmcs)).is_ok() && status(vmptrld(&vmcs)).is_ok(),
        "VMCLEAR and VMPTRLD of L2's VMCS",
    );
    check(
        write_vmcs(&tables(), ept),
        "the VMWRITEs of L2's guest state, L1's host state, the controls",
    );
    let (pin, exit) = (vmread(field::PIN).0, vmread(field::EXIT).0);
    let l1_kernel_gs_base = rdmsr(KERNEL_GS_BASE);
    let breakpoints = idt::breakpoints();
    let mut cpuids = 0usize;
    let mut ept_faults = 0u64;
    let mut seen = [false; 3]; // int3, the watched port, VMCALL
    let mut wrong = None;
    IHMI_L1_LAUNCH.store(1, core::sync::atomic::Ordering::SeqCst);
    let ud_in_l2 = idt::expect_fault(6, 2, || loop {
        // SAFETY: the VMCS is complete; the stub keeps L1's registers and stack.
        let failed = unsafe { ihmi_l1_enter() };
        IHMI_L1_LAUNCH.store(0, core::sync::atomic::Ordering::SeqCst);
        if failed != 0 {
            wrong = Some(("the entry failed", failed, vmread(0x4400).0));
            break;
        }
        let reason = vmread(field::EXIT_REASON).0;
        let len = vmread(field::EXIT_INSTRUCTION_LEN).0;
        let rip = vmread(field::GUEST_RIP).0;
        match reason {
            48 if ept => {
                if !ept_map_faulting(&mut ept_faults) {
                    wrong = Some(("no room in EPT12", ept_faults, rip));
                    break;
                }
                // Not past anything: L2 makes the access again.
                continue;
            }
            10 => cpuids += 1,
            0 => {
                let info = vmread(field::EXIT_INTERRUPTION).0;
                if info != 0x8000_0603 || len != 1 {
                    wrong = Some(("int3's interruption information", info, len));
                    break;
                }
                seen[0] = true;
                // On to the next instruction, with a #BP (hardware exception, vector 3) injected.
                vmwrite(field::ENTRY_INTERRUPTION, 0x8000_0303);
            }
            30 => {
                let q = vmread(field::EXIT_QUALIFICATION).0;
                // 1 byte, IN, not string, immediate operand, the port in bits 31:16.
                if q != (u64::from(WATCHED_PORT) << 16) | 1 << 3 | 1 << 6 {
                    wrong = Some(("the port read's qualification", q, len));
                    break;
                }
                seen[1] = true;
            }
            18 => {
                seen[2] = true;
                break;
            }
            other => {
                wrong = Some(("an exit L1 did not expect", other, rip));
                break;
            }
        }
        vmwrite(field::GUEST_RIP, rip + len);
    });
    let interrupt = if wrong.is_none() {
        external_interrupt(pin, exit, &mut ept_faults)
    } else {
        None
    };
    check(
        interrupt.is_some_and(|info| info >> 31 == 1 && (info >> 8) & 7 == 0),
        "a timer interrupt during L2 exited to L1, acknowledged (its vector in the exit information)",
    );
    if let Some(info) = interrupt {
        say!(
            "testguest: L2's external interrupt: vector {:#x}",
            info & 0xff
        );
    }
    if let Some((what, a, b)) = wrong {
        say!("testguest: L2: {what}: {a:#x} {b:#x}");
    }
    check(wrong.is_none(), "every exit from L2 was one L1 expected");
    check(
        cpuids == NESTED_MINI_CPUIDS,
        "each of L2's CPUIDs exited to L1",
    );
    check(
        seen == [true; 3],
        "int3, the watched port and VMCALL exited to L1",
    );
    check(ud_in_l2, "L2's ud2 was taken by L2's own handler");
    check(
        stored_kernel_gs_base() == L2_KERNEL_GS_BASE,
        "L2's IA32_KERNEL_GS_BASE, loaded by the VM-entry MSR-load area, in the VM-exit MSR-store area",
    );
    check(
        rdmsr(KERNEL_GS_BASE) == l1_kernel_gs_base,
        "L1's IA32_KERNEL_GS_BASE back after L2's exits (the VM-exit MSR-load area)",
    );
    check(
        idt::breakpoints() == breakpoints + 1,
        "the #BP L1 injected reached L2's handler",
    );
    if ept {
        check(
            ept_faults > 0,
            "L2's first touches of its pages were EPT violations L1 mapped in EPT12",
        );
        say!("testguest: L2's EPT violations L1 took: {ept_faults}");
        let l0_frame = info.probe_gpa & !0xfff;
        // An EPT12 root in L0's memory: L0 refuses the entry (VMfailValid 7) and alerts.
        vmwrite(field::EPTP, l0_frame | 0x1e);
        // SAFETY: the VMCS is launched; the entry fails, L1's state stays.
        let failed = unsafe { ihmi_l1_enter() };
        check(
            status(failed) == Err(false) && vmread(field::INSTRUCTION_ERROR).0 == 7,
            "VMRESUME with EPT12's root in L0's memory: VMfailValid 7",
        );
        vmwrite(field::EPTP, eptp12());
        check(status(invept_all()).is_ok(), "INVEPT of all contexts");
        // Last: EPT12 maps TARGET onto L0's frame and L2 reads it; L0 refuses the mapping and
        // stops the guest, so L1 reports its checks first.
        let target = TARGET.0.get() as u64;
        check(ept12_map(target, l0_frame), "EPT12 remapped");
        drop(check);
        report(failures);
        // SAFETY: slot 5 is RDI, which L2 reads from.
        unsafe { (*IHMI_L2_REGS.0.get())[5] = target };
        vmwrite(field::GUEST_RIP, ihmi_l2_touch as *const () as u64);
        // Without the second run's interrupt exiting, and with interrupts off in L2: the PIT
        // still ticks, faster than L1 handles an exit under Bochs.
        vmwrite(field::PIN, pin);
        vmwrite(field::GUEST_RFLAGS, 0x2);
        let back = loop {
            // SAFETY: as above; L0 ends the guest at L2's read.
            let back = unsafe { ihmi_l1_enter() };
            if back == 0 && vmread(field::EXIT_REASON).0 == 48 && ept_map_faulting(&mut ept_faults)
            {
                continue;
            }
            break back;
        };
        say!(
            "testguest: L2 read L0's frame through EPT12 and L1 runs again (exit {:#x}, {back:#x})",
            vmread(field::EXIT_REASON).0
        );
        return failures + 1;
    }
    // VMLAUNCH of the VMCS L2 ran on, launched: VMfailValid 4, L1 goes on.
    IHMI_L1_LAUNCH.store(1, core::sync::atomic::Ordering::SeqCst);
    // SAFETY: the VMCS is complete and launched; the VMLAUNCH fails and L1's state stays.
    let relaunch = unsafe { ihmi_l1_enter() };
    IHMI_L1_LAUNCH.store(0, core::sync::atomic::Ordering::SeqCst);
    check(
        status(relaunch) == Err(false) && vmread(field::INSTRUCTION_ERROR).0 == 4,
        "VMLAUNCH of the launched VMCS: VMfailValid 4",
    );
    check(status(vmclear(&vmcs)).is_ok(), "VMCLEAR");
    check(status(vmxoff()).is_ok(), "VMXOFF");
    super::write_cr4(super::read_cr4() & !super::CR4_VMXE);
    drop(check);
    failures
}
