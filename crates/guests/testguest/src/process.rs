//! The guest's processes: a record per process (laid out as `ihmi_abi::guest_os::process_layout` says,
//! so the monitor can read it), an address space per process (the kernel's identity map shared in
//! PML4 slot 0, private user pages in slot 1), SYSCALL/SYSRET with a system-call table, and a creation
//! path (`spawn`). Processes run to completion: `spawn` runs the child before it returns to the parent,
//! which keeps the kernel free of a scheduler while giving a real process tree.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU64, Ordering};

use ihmi_abi::guest_os::{COMM_LEN, ENOSYS, EPERM, SYS_EXIT, SYS_GETPID, SYS_SPAWN, SYS_WRITE};
use ihmi_addr::{Gpa, Gva, PAGE_SIZE};
use ihmi_paging::{MapFlags, PageTable, PageTableBuilder, PageTableEntry, TableAlloc};
use ihmi_rt::tables::{CODE_SELECTOR, SYSRET_BASE};

use crate::{hooks, say};

/// Where user programs are mapped in every process (PML4 slot 1, away from the kernel's identity map).
pub const USER_BASE: u64 = 0x0000_0080_0000_0000;
/// One page of user stack per process, just below this address.
pub const USER_STACK_TOP: u64 = USER_BASE + 0x20_0000;
const MAX_PROCESSES: usize = 16;
const KSTACK_SIZE: usize = 16 * 1024;
const POOL_PAGES: usize = 96;

/// The process record, as the monitor reads it (`ihmi_abi::guest_os::process_layout`).
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Process {
    pub pid: u32,
    pub ppid: u32,
    pub comm: [u8; COMM_LEN],
    pub cr3: u64,
}
const _: () =
    assert!(core::mem::size_of::<Process>() == ihmi_abi::guest_os::process_layout::SIZE as usize);
const _: () = assert!(
    core::mem::offset_of!(Process, comm) == ihmi_abi::guest_os::process_layout::COMM as usize
);
const _: () = assert!(
    core::mem::offset_of!(Process, cr3) == ihmi_abi::guest_os::process_layout::CR3 as usize
);

/// What `ihmi_enter_user` saves so `ihmi_leave_user` can return to the kernel (callee-saved registers
/// and the stack pointer of the caller).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct KernelContext {
    regs: [u64; 7],
}

#[repr(C, align(4096))]
struct Page([u8; 4096]);

#[repr(C, align(16))]
struct KStack([u8; KSTACK_SIZE]);

struct Kernel {
    processes: [Process; MAX_PROCESSES],
    contexts: [KernelContext; MAX_PROCESSES],
    kstacks: [KStack; MAX_PROCESSES],
    count: usize,
    pool: [Page; POOL_PAGES],
    pool_used: usize,
}

struct KernelCell(UnsafeCell<Kernel>);
// SAFETY: the guest has one CPU and runs system calls with interrupts off (SFMASK clears IF), so kernel
// state is never touched by two paths at once.
unsafe impl Sync for KernelCell {}

const EMPTY: Process = Process {
    pid: 0,
    ppid: 0,
    comm: [0; COMM_LEN],
    cr3: 0,
};
static KERNEL: KernelCell = KernelCell(UnsafeCell::new(Kernel {
    processes: [EMPTY; MAX_PROCESSES],
    contexts: [KernelContext { regs: [0; 7] }; MAX_PROCESSES],
    kstacks: [const { KStack([0; KSTACK_SIZE]) }; MAX_PROCESSES],
    count: 0,
    pool: [const { Page([0; 4096]) }; POOL_PAGES],
    pool_used: 0,
}));

/// GVA of the current process record: the kernel global the monitor's OS profile points at.
#[no_mangle]
pub static CURRENT_PROCESS: AtomicU64 = AtomicU64::new(0);
/// Top of the current process's kernel stack; the SYSCALL entry switches to it.
#[no_mangle]
static SYSCALL_KSTACK_TOP: AtomicU64 = AtomicU64::new(0);
#[no_mangle]
static SYSCALL_USER_RSP: AtomicU64 = AtomicU64::new(0);

fn kernel() -> &'static mut Kernel {
    // SAFETY: see `KernelCell`: one CPU, interrupts off in the kernel; callers do not keep two
    // references alive across a call that takes another.
    unsafe { &mut *KERNEL.0.get() }
}

/// User programs: (name, entry symbol). Program numbers are indexes into this table.
pub const PROGRAMS: [&str; 4] = ["init", "worker", "intruder", "bench"];

extern "C" {
    static __user_text_start: u8;
    static __user_text_end: u8;
    fn user_init();
    fn user_worker();
    fn user_intruder();
    fn user_bench();
    fn ihmi_syscall_entry();
    fn ihmi_enter_user(rip: u64, rsp: u64, arg: u64, ctx: *mut KernelContext) -> u64;
    fn ihmi_leave_user(ctx: *const KernelContext, code: u64) -> !;
}

fn program_entry(program: usize) -> Option<u64> {
    let f = match program {
        0 => user_init as *const (),
        1 => user_worker as *const (),
        2 => user_intruder as *const (),
        3 => user_bench as *const (),
        _ => return None,
    };
    let start = core::ptr::addr_of!(__user_text_start) as u64;
    Some(USER_BASE + (f as u64 - start))
}

/// Page-table frames for process address spaces, from a pool in the kernel image (GVA == GPA here).
struct Pool;

impl TableAlloc for Pool {
    fn alloc_zeroed(&mut self) -> Option<Gpa> {
        let k = kernel();
        let page = k.pool.get_mut(k.pool_used)?;
        page.0.fill(0);
        k.pool_used += 1;
        Some(Gpa::new(page.0.as_ptr() as u64))
    }

    fn table_mut(&mut self, gpa: Gpa) -> Option<&mut PageTable> {
        let k = kernel();
        let first = k.pool.as_ptr() as u64;
        let index = gpa.raw().checked_sub(first)? / PAGE_SIZE;
        if !gpa.is_aligned(PAGE_SIZE) || index as usize >= k.pool_used {
            return None;
        }
        let page = &mut k.pool[index as usize];
        // SAFETY: a page-aligned, page-sized pool frame handed out by `alloc_zeroed`, used only as a table.
        Some(unsafe { &mut *(page.0.as_mut_ptr() as *mut PageTable) })
    }
}

/// Sets up SYSCALL/SYSRET (SDM Vol. 2B SYSCALL): EFER.SCE, the selectors, the entry point, and a flag
/// mask that clears IF, TF, DF and AC on entry.
pub fn init() {
    const IA32_EFER: u32 = 0xc000_0080;
    const IA32_STAR: u32 = 0xc000_0081;
    const IA32_LSTAR: u32 = 0xc000_0082;
    const IA32_FMASK: u32 = 0xc000_0084;
    let efer = crate::rdmsr(IA32_EFER);
    crate::wrmsr(IA32_EFER, efer | 1);
    crate::wrmsr(
        IA32_STAR,
        (u64::from(SYSRET_BASE) << 48) | (u64::from(CODE_SELECTOR) << 32),
    );
    crate::wrmsr(IA32_LSTAR, ihmi_syscall_entry as *const () as u64);
    crate::wrmsr(IA32_FMASK, (1 << 8) | (1 << 9) | (1 << 10) | (1 << 18));
}

/// Creates a process record and address space for `program`; the monitor may refuse it.
fn create(program: usize, ppid: u32) -> Result<usize, i64> {
    let name = PROGRAMS.get(program).ok_or(ENOSYS)?;
    let k = kernel();
    if k.count == MAX_PROCESSES {
        return Err(EPERM);
    }
    let slot = k.count;
    let mut comm = [0u8; COMM_LEN];
    comm[..name.len()].copy_from_slice(name.as_bytes());
    let cr3 = address_space().ok_or(EPERM)?;
    k.processes[slot] = Process {
        pid: slot as u32 + 1,
        ppid,
        comm,
        cr3,
    };
    let record = core::ptr::addr_of!(k.processes[slot]) as u64;
    // The creation path asks the monitor before the process exists for anyone; a refusal undoes it.
    if !hooks::process_create(record, program as u64) {
        say!("kernel: creation of '{name}' refused by the monitor");
        return Err(EPERM);
    }
    k.count += 1;
    Ok(slot)
}

/// A new address space: the kernel's slot-0 identity map shared, user text and a user stack in slot 1.
fn address_space() -> Option<u64> {
    let mut pool = Pool;
    let mut tables = PageTableBuilder::new(&mut pool).ok()?;
    let start = core::ptr::addr_of!(__user_text_start) as u64;
    let end = core::ptr::addr_of!(__user_text_end) as u64;
    tables
        .map(
            &mut pool,
            Gva::new(USER_BASE),
            Gpa::new(start),
            end - start,
            MapFlags::USER | MapFlags::EXECUTABLE,
        )
        .ok()?;
    let stack = pool.alloc_zeroed()?;
    tables
        .map(
            &mut pool,
            Gva::new(USER_STACK_TOP - PAGE_SIZE),
            stack,
            PAGE_SIZE,
            MapFlags::USER | MapFlags::WRITABLE,
        )
        .ok()?;
    let kernel_pml4 = ihmi_paging::Cr3::new(ihmi_rt::cpu::read_cr3()).root();
    // SAFETY: the current CR3 is the kernel's first PML4, identity-mapped; entry 0 is read only.
    let shared = unsafe { (kernel_pml4.raw() as *const PageTable).as_ref() }?.entries[0];
    pool.table_mut(tables.root())?.entries[0] = PageTableEntry::from_raw(shared.raw());
    Some(tables.root().raw())
}

/// Runs `slot` in user mode until it exits; returns its exit code. Nests: a process that spawns runs its
/// child from inside its own `spawn` system call, on its own kernel stack.
fn run(slot: usize, arg: u64) -> u64 {
    let k = kernel();
    let saved_current = CURRENT_PROCESS.load(Ordering::SeqCst);
    let saved_kstack = SYSCALL_KSTACK_TOP.load(Ordering::SeqCst);
    let saved_cr3 = ihmi_rt::cpu::read_cr3();
    let process = k.processes[slot];
    let kstack_top = k.kstacks[slot].0.as_ptr() as u64 + KSTACK_SIZE as u64;
    CURRENT_PROCESS.store(
        core::ptr::addr_of!(k.processes[slot]) as u64,
        Ordering::SeqCst,
    );
    SYSCALL_KSTACK_TOP.store(kstack_top, Ordering::SeqCst);
    let program = PROGRAMS
        .iter()
        .position(|p| process.comm.starts_with(p.as_bytes()))
        .unwrap_or(0);
    let entry = program_entry(program).unwrap_or(USER_BASE);
    let ctx = core::ptr::addr_of_mut!(k.contexts[slot]);
    // SAFETY: the process's CR3 maps the kernel identically (shared slot 0), so the kernel keeps running.
    unsafe { core::arch::asm!("mov cr3, {}", in(reg) process.cr3, options(nostack)) };
    // SAFETY: `entry` and the stack are mapped user pages in the process's address space; `ctx` is this
    // process's context slot, used by `ihmi_leave_user` when the process exits.
    let code = unsafe { ihmi_enter_user(entry, USER_STACK_TOP - 16, arg, ctx) };
    // SAFETY: back to the address space we came from, which maps the kernel the same way.
    unsafe { core::arch::asm!("mov cr3, {}", in(reg) saved_cr3, options(nostack)) };
    CURRENT_PROCESS.store(saved_current, Ordering::SeqCst);
    SYSCALL_KSTACK_TOP.store(saved_kstack, Ordering::SeqCst);
    code
}

/// Creates and runs the first process; returns its exit code.
pub fn run_init(program: usize, arg: u64) -> Result<u64, i64> {
    let slot = create(program, 0)?;
    Ok(run(slot, arg))
}

fn current() -> &'static Process {
    let p = CURRENT_PROCESS.load(Ordering::SeqCst) as *const Process;
    // SAFETY: CURRENT_PROCESS always points at a live record in the kernel's process table while a
    // process runs, and system calls only happen while one runs.
    unsafe { &*p }
}

/// Copies a user buffer after checking it lies in the user half the process can reach.
fn user_bytes(ptr: u64, len: u64, out: &mut [u8]) -> Option<usize> {
    let len = usize::try_from(len).ok()?.min(out.len());
    let end = ptr.checked_add(len as u64)?;
    if ptr < USER_BASE || end > USER_STACK_TOP {
        return None;
    }
    // SAFETY: the range lies in this process's user mapping (checked above; mapped pages of user text
    // and stack), readable by the kernel through the same CR3.
    let src = unsafe { core::slice::from_raw_parts(ptr as *const u8, len) };
    out[..len].copy_from_slice(src);
    Some(len)
}

#[no_mangle]
extern "C" fn ihmi_syscall_dispatch(nr: u64, a0: u64, a1: u64, a2: u64) -> u64 {
    hooks::syscall(nr, a0, a1, a2);
    let result: i64 = match nr {
        SYS_WRITE => {
            let mut buf = [0u8; 128];
            match user_bytes(a0, a1, &mut buf) {
                Some(n) => {
                    let name = core::str::from_utf8(&current().comm)
                        .unwrap_or("?")
                        .trim_end_matches('\0');
                    let text = core::str::from_utf8(&buf[..n]).unwrap_or("<binary>");
                    say!("[{name}:{}] {}", current().pid, text.trim_end());
                    n as i64
                }
                None => EPERM,
            }
        }
        SYS_GETPID => i64::from(current().pid),
        SYS_SPAWN => match create(a0 as usize, current().pid) {
            Ok(slot) => {
                run(slot, a1);
                i64::from(kernel().processes[slot].pid)
            }
            Err(e) => e,
        },
        SYS_EXIT => {
            let slot = (current().pid - 1) as usize;
            let ctx = core::ptr::addr_of!(kernel().contexts[slot]);
            // SAFETY: `ctx` holds the kernel context `run` saved when it entered this process.
            unsafe { ihmi_leave_user(ctx, a0) }
        }
        _ => ENOSYS,
    };
    result as u64
}

// The SYSCALL entry (SDM Vol. 2B SYSCALL): RCX = user RIP, R11 = user RFLAGS, RSP still the user's.
// Everything but RAX, RCX and R11 is preserved for the user, as on Linux.
core::arch::global_asm!(
    r#"
    .section .text.ihmi_syscall, "ax"
    .global ihmi_syscall_entry
ihmi_syscall_entry:
    mov %rsp, SYSCALL_USER_RSP(%rip)
    mov SYSCALL_KSTACK_TOP(%rip), %rsp
    push SYSCALL_USER_RSP(%rip)
    push %rcx
    push %r11
    push %rdi
    push %rsi
    push %rdx
    push %r8
    push %r9
    push %r10
    sub $8, %rsp
    mov %rdx, %rcx
    mov %rsi, %rdx
    mov %rdi, %rsi
    mov %rax, %rdi
    call ihmi_syscall_dispatch
    add $8, %rsp
    pop %r10
    pop %r9
    pop %r8
    pop %rdx
    pop %rsi
    pop %rdi
    pop %r11
    pop %rcx
    pop %rsp
    sysretq

    /* u64 ihmi_enter_user(rip, rsp, arg, ctx): saves the kernel's callee-saved state in ctx and enters
       user mode; returns the exit code when ihmi_leave_user(ctx, code) runs. */
    .global ihmi_enter_user
ihmi_enter_user:
    mov %rbx, 0(%rcx)
    mov %rbp, 8(%rcx)
    mov %r12, 16(%rcx)
    mov %r13, 24(%rcx)
    mov %r14, 32(%rcx)
    mov %r15, 40(%rcx)
    mov %rsp, 48(%rcx)
    mov %rdi, %rcx              /* user RIP for SYSRET */
    mov %rsi, %rsp              /* user stack */
    mov %rdx, %rdi              /* the program's argument */
    mov $0x2, %r11              /* user RFLAGS: interrupts stay off, the guest has no interrupt sources */
    xor %eax, %eax              /* leak no kernel values into user registers */
    xor %ebx, %ebx
    xor %ebp, %ebp
    xor %esi, %esi
    xor %edx, %edx
    xor %r8d, %r8d
    xor %r9d, %r9d
    xor %r10d, %r10d
    xor %r12d, %r12d
    xor %r13d, %r13d
    xor %r14d, %r14d
    xor %r15d, %r15d
    sysretq

    .global ihmi_leave_user
ihmi_leave_user:
    mov 0(%rdi), %rbx
    mov 8(%rdi), %rbp
    mov 16(%rdi), %r12
    mov 24(%rdi), %r13
    mov 32(%rdi), %r14
    mov 40(%rdi), %r15
    mov 48(%rdi), %rsp
    mov %rsi, %rax
    ret
"#,
    options(att_syntax)
);
