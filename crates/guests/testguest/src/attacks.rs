//! The compromised kernel: in an `attack-*` scenario the test guest's kernel turns on the monitor and
//! tries one attack of BRIEF.md §4. It learns what a real attacker could: the gate's address (its own
//! hooks call it), the gate's bytes (the gate page is readable in view 0), and that monitor frames
//! follow the gate. L0 judges the outcome; the guest's return value only says whether the parts of the
//! attack it could check itself went as a blocked attack must (0 = yes).
//!
//! Attacks that a hardware view check stops end with an EPT violation and never return here.

use core::cell::UnsafeCell;

use ihmi_abi::attack::{Attack, FLOOD_REQUESTS, FORGED_REQUEST};
use ihmi_abi::monitor::{RequestCode, Verdict};
use ihmi_abi::BootInfo;
use ihmi_addr::{Gpa, Gva, PAGE_SIZE};
use ihmi_paging::{MapFlags, PageSize, PageTable, PageTableBuilder, PageTableEntry, TableAlloc};

use crate::{hooks, idt, process, say};

/// `VMFUNC` (0F 01 D4).
const VMFUNC: [u8; 3] = [0x0f, 0x01, 0xd4];
/// `call *%rax; mov %rax, %r10`: where the gate's exit half starts.
const EXIT_GATE: [u8; 5] = [0xff, 0xd0, 0x49, 0x89, 0xc2];
/// A virtual address the attacker maps for itself (PML4 slot 2, unused by the kernel).
const FORGED_VA: u64 = 0x0000_0100_0000_0000;
const IA32_LSTAR: u32 = 0xc000_0082;

extern "C" {
    /// The entry the attacker wants system calls to take instead of the hooked one.
    fn attack_syscall_entry();
}

core::arch::global_asm!(
    r#"
    .section .text, "ax"
    .global attack_syscall_entry
attack_syscall_entry:
    ud2
"#,
    options(att_syntax)
);

/// Runs one attack; see the module documentation.
pub fn run(attack: Attack, info: &BootInfo) -> u64 {
    let gate = info.gate_gva;
    if gate == 0 || !hooks::enabled() {
        say!("attack: no monitor gate configured");
        return 1;
    }
    // The monitor answers before the attack.
    if hooks::call(RequestCode::Null, [0; 4]) != Some(Verdict::Allow) {
        say!("attack: the monitor did not answer a null request");
        return 2;
    }
    say!("attack {}: starting", attack.name());
    let failures = match attack {
        Attack::ForgedPte => forged_pte(gate),
        Attack::Cr3Switch => cr3_switch(gate),
        Attack::VmfuncOutsideGate => {
            // SAFETY: none for the guest: this is the attack. VMFUNC(0, 1) switches to the monitor view,
            // where this code is not executable.
            unsafe { core::arch::asm!("vmfunc", in("eax") 0, in("ecx") 1, options(nostack)) };
            say!("attack: still running after VMFUNC outside the gate");
            1
        }
        Attack::VmfuncBadIndex => vmfunc_bad_index(),
        Attack::GateMiddle => gate_middle(gate),
        Attack::HookOverwrite => {
            let target = hooks::syscall as *const () as *mut u8;
            // SAFETY: none: the attack writes the kernel's own hook code, read + execute only in view 0.
            unsafe { core::ptr::write_volatile(target, 0xc3) };
            1
        }
        Attack::GateOverwrite => {
            // SAFETY: none: the attack writes the gate page, read + execute only in view 0.
            unsafe { core::ptr::write_volatile(gate as *mut u8, 0xc3) };
            1
        }
        Attack::GateRemap => gate_remap(gate),
        Attack::LstarRedirect => lstar_redirect(),
        Attack::TrapInMonitor => trap_in_monitor(gate),
        Attack::EventFlood => event_flood(),
        Attack::EventForge => {
            // The monitor's image follows the gate; its data (and event ring) lie a few pages in.
            let target = (gate + 2 * PAGE_SIZE) as *mut u64;
            // SAFETY: none: the attack writes a monitor frame, absent from view 0.
            unsafe { core::ptr::write_volatile(target, 0x4141_4141_4141_4141) };
            1
        }
        Attack::HookStarve => {
            let target = core::ptr::addr_of!(hooks::IHMI_HOOK_GATE) as *mut u64;
            // SAFETY: none: the attack clears the hooks' gate pointer, which sits in read + execute text.
            unsafe { core::ptr::write_volatile(target, 0) };
            1
        }
    };
    if failures == 0 && hooks::call(RequestCode::Null, [0; 4]) != Some(Verdict::Allow) {
        say!("attack: the monitor no longer answers");
        return 3;
    }
    failures
}

/// A few page-table frames of the attacker's own (identity-mapped kernel memory).
#[repr(C, align(4096))]
struct Frames([[u8; 4096]; 8]);
struct FrameCell(UnsafeCell<Frames>);
// SAFETY: one CPU, and the attack code that uses it never runs twice at once.
unsafe impl Sync for FrameCell {}
static FRAMES: FrameCell = FrameCell(UnsafeCell::new(Frames([[0; 4096]; 8])));

struct Bump {
    used: usize,
}

impl Bump {
    fn frame(i: usize) -> *mut [u8; 4096] {
        // SAFETY: `i` < 8, checked by callers; a pointer into the static, no reference is formed.
        unsafe { core::ptr::addr_of_mut!((*FRAMES.0.get()).0[i]) }
    }
}

impl TableAlloc for Bump {
    fn alloc_zeroed(&mut self) -> Option<Gpa> {
        // Frame 7 is kept for data (the remapped gate's copy).
        if self.used == 7 {
            return None;
        }
        let f = Self::frame(self.used);
        // SAFETY: a page of the static that no one else uses.
        unsafe { (*f).fill(0) };
        self.used += 1;
        Some(Gpa::new(f as u64))
    }

    fn table_mut(&mut self, gpa: Gpa) -> Option<&mut PageTable> {
        let first = Self::frame(0) as u64;
        let i = (gpa.raw().checked_sub(first)? / PAGE_SIZE) as usize;
        if i >= self.used || !gpa.is_aligned(PAGE_SIZE) {
            return None;
        }
        // SAFETY: a page-aligned frame this allocator handed out, used only as a page table.
        Some(unsafe { &mut *(Self::frame(i) as *mut PageTable) })
    }
}

/// A new PML4 sharing the running kernel's slot 0, plus whatever `extra` maps.
fn address_space(
    extra: impl FnOnce(&mut PageTableBuilder, &mut Bump) -> Option<()>,
) -> Option<u64> {
    let mut alloc = Bump { used: 0 };
    let mut pt = PageTableBuilder::new(&mut alloc).ok()?;
    extra(&mut pt, &mut alloc)?;
    let root = pt.root();
    let kernel = ihmi_paging::Cr3::new(ihmi_rt::cpu::read_cr3()).root();
    // SAFETY: the running PML4 is identity-mapped kernel memory; entry 0 is only read.
    let shared = unsafe { (*(kernel.raw() as *const PageTable)).entries[0] };
    alloc.table_mut(root)?.entries[0] = PageTableEntry::from_raw(shared.raw());
    Some(root.raw())
}

/// Attack 1: A PTE of the attacker's maps the monitor's first code frame; read through it.
fn forged_pte(gate: u64) -> u64 {
    let monitor_code = Gpa::new(gate + PAGE_SIZE);
    let Some(root) = address_space(|pt, a| {
        pt.map(
            a,
            Gva::new(FORGED_VA),
            monitor_code,
            PAGE_SIZE,
            MapFlags::WRITABLE,
        )
        .ok()
    }) else {
        say!("attack: could not build the forged mapping");
        return 1;
    };
    // SAFETY: none for the guest: the attack. The new tables map the kernel as before (slot 0).
    unsafe { core::arch::asm!("mov cr3, {}", in(reg) root, options(nostack)) };
    // SAFETY: none: reads a monitor frame through the forged entry.
    let stolen = unsafe { core::ptr::read_volatile(FORGED_VA as *const u64) };
    say!("attack: read {stolen:#x} from monitor code");
    1
}

/// Finds `pattern` in the gate page.
fn find_in_gate(gate: u64, pattern: &[u8]) -> Option<u64> {
    // SAFETY: the gate page is readable in view 0 (read + execute) and identity-mapped.
    let page = unsafe { core::slice::from_raw_parts(gate as *const u8, PAGE_SIZE as usize) };
    page.windows(pattern.len())
        .position(|w| w == pattern)
        .map(|i| gate + i as u64)
}

/// Attack 2: The monitor's CR3 is an immediate in the gate's code (`movabs $imm, %rax` after the VMFUNC):
/// read it and load it.
fn cr3_switch(gate: u64) -> u64 {
    let Some(vmfunc) = find_in_gate(gate, &VMFUNC) else {
        say!("attack: no VMFUNC in the gate");
        return 1;
    };
    // SAFETY: the gate page is readable in view 0.
    let after = unsafe { core::slice::from_raw_parts((vmfunc + 3) as *const u8, 32) };
    let Some(at) = after.windows(2).position(|w| w == [0x48, 0xb8]) else {
        say!("attack: no movabs after the gate's VMFUNC");
        return 1;
    };
    let mut imm = [0u8; 8];
    imm.copy_from_slice(&after[at + 2..at + 10]);
    let monitor_cr3 = u64::from_le_bytes(imm) & !0xfff;
    say!("attack: loading the monitor's CR3 {monitor_cr3:#x}");
    // SAFETY: none: the attack.
    unsafe { core::arch::asm!("mov cr3, {}", in(reg) monitor_cr3, options(nostack)) };
    say!("attack: still running on the monitor's page tables");
    1
}

/// Attack 4: VMFUNC with EPTP-list indexes that hold no view: #UD each time, then the monitor still answers.
fn vmfunc_bad_index() -> u64 {
    let mut failures = 0;
    for index in [7u32, 600] {
        let ud = idt::expect_fault(6, 3, || {
            // SAFETY: the attack; L0 turns the VM exit into a #UD that `expect_fault` skips.
            unsafe { core::arch::asm!("vmfunc", in("eax") 0, in("ecx") index, options(nostack)) };
        });
        say!("attack: VMFUNC(0, {index}) raised #UD: {ud}");
        if !ud {
            failures += 1;
        }
    }
    failures
}

/// Attack 5: Jump straight to the gate's VMFUNC with forged registers (a request code no one serves), then
/// into the gate's exit half from view 0.
fn gate_middle(gate: u64) -> u64 {
    let (Some(vmfunc), Some(exit)) = (find_in_gate(gate, &VMFUNC), find_in_gate(gate, &EXIT_GATE))
    else {
        say!("attack: could not find the gate's VMFUNC and exit");
        return 1;
    };
    // The forged registers: VMFUNC's EAX = 0 and ECX = 1 (the monitor view), then a request code no
    // one serves and junk arguments.
    let verdict = jump_with_frame(
        vmfunc,
        [0, 1, FORGED_REQUEST, 0x1111, 0x2222, 0x4444, 0x3333],
    );
    let rejected = Verdict::from_raw(verdict) == Some(Verdict::Rejected);
    say!("attack: mid-gate entry answered {verdict:#x} (rejected: {rejected})");
    if !rejected {
        return 1;
    }
    // The exit half starts after the `call *%rax` (2 bytes) the pattern begins with.
    let exit = exit + 2;
    say!("attack: jumping into the exit gate at {exit:#x}");
    jump_with_frame(exit, [0; 7]);
    say!("attack: the exit gate returned");
    1
}

/// Jumps to `target` inside the gate with RAX, RCX, RDI, RSI, RDX, R8, R10 = `regs` and the frame the
/// gate's exit pops (flags, then a return address) on the stack; returns RAX when control comes back.
fn jump_with_frame(target: u64, regs: [u64; 7]) -> u64 {
    let rax: u64;
    // SAFETY: none for the guest: this is how the attacks enter the gate past its first instructions.
    // 128 bytes are skipped first so the pushes cannot hit the red zone; the gate's exit pops exactly
    // the two words pushed here.
    unsafe {
        core::arch::asm!(
            "sub rsp, 128",
            "lea r11, [rip + 2f]",
            "push r11",
            "push 2",
            "jmp {target}",
            "2:",
            "add rsp, 128",
            target = in(reg) target,
            inout("rax") regs[0] => rax,
            inout("rcx") regs[1] => _,
            inout("rdi") regs[2] => _,
            inout("rsi") regs[3] => _,
            inout("rdx") regs[4] => _,
            inout("r8") regs[5] => _,
            inout("r10") regs[6] => _,
            out("r9") _, out("r11") _,
        );
    }
    rax
}

/// Attack 7: A new address space in which the gate's address maps a copy of the gate; then a hook fires.
fn gate_remap(gate: u64) -> u64 {
    let copy = Bump::frame(7) as u64;
    let Some(root) = remapped_space(gate, copy) else {
        say!("attack: could not build the remapped address space");
        return 1;
    };
    // SAFETY: `copy` is one of the attacker's frames; the gate page is readable in view 0.
    unsafe {
        core::ptr::copy_nonoverlapping(gate as *const u8, copy as *mut u8, PAGE_SIZE as usize)
    };
    // SAFETY: none: the attack switches to tables that map everything as before but the gate.
    unsafe { core::arch::asm!("mov cr3, {}", in(reg) root, options(nostack)) };
    say!("attack: the gate's address now maps a copy; calling the hook");
    let v = hooks::call(RequestCode::Null, [0; 4]);
    say!("attack: the remapped gate returned {v:?}");
    1
}

/// Identity map of the first 4 GiB with the gate page redirected to `copy` (the last attacker frame,
/// which the tables never use: they need one PML4, one PDPT, four PDs and one PT).
fn remapped_space(gate: u64, copy: u64) -> Option<u64> {
    const GIB4: u64 = 4 << 30;
    let mut alloc = Bump { used: 0 };
    let mut pt = PageTableBuilder::new(&mut alloc).ok()?;
    let flags = MapFlags::WRITABLE | MapFlags::EXECUTABLE;
    pt.map_with(
        &mut alloc,
        Gva::new(0),
        Gpa::new(0),
        gate,
        flags,
        PageSize::Size2M,
    )
    .ok()?;
    pt.map(&mut alloc, Gva::new(gate), Gpa::new(copy), PAGE_SIZE, flags)
        .ok()?;
    let rest = gate + PAGE_SIZE;
    pt.map_with(
        &mut alloc,
        Gva::new(rest),
        Gpa::new(rest),
        GIB4 - rest,
        flags,
        PageSize::Size2M,
    )
    .ok()?;
    Some(pt.root().raw())
}

/// Attack 8: Move the system-call entry past the hook: refused with #GP; system calls still reach the monitor.
fn lstar_redirect() -> u64 {
    process::init();
    let bypass = attack_syscall_entry as *const () as u64;
    let gp = idt::expect_gp(|| crate::wrmsr(IA32_LSTAR, bypass));
    say!("attack: WRMSR(LSTAR, {bypass:#x}) raised #GP: {gp}");
    let lstar = crate::rdmsr(IA32_LSTAR);
    let moved = lstar == bypass;
    let init = process::run_init(0, 0);
    say!("attack: LSTAR moved: {moved}; a workload afterwards: {init:?}");
    u64::from(!gp || moved || init != Ok(0))
}

/// Attack 9: Enter the gate with RFLAGS.TF set: each gate instruction traps, and the trap after the VMFUNC is
/// delivered in the monitor view.
fn trap_in_monitor(gate: u64) -> u64 {
    idt::allow_single_steps();
    // SAFETY: none for the guest: the attack. A null request through the gate, single-stepped; 128
    // bytes are skipped so the flag pushes cannot hit the red zone.
    unsafe {
        core::arch::asm!(
            "sub rsp, 128",
            "pushfq",
            "or qword ptr [rsp], 0x100",
            "popfq",
            "call {gate}",
            "pushfq",
            "and qword ptr [rsp], ~0x100",
            "popfq",
            "add rsp, 128",
            gate = in(reg) gate,
            in("rdi") 0, in("rsi") 0, in("rdx") 0, in("rcx") 0, in("r8") 0,
            clobber_abi("C"),
        );
    }
    say!(
        "attack: single-stepped through the gate ({} traps)",
        idt::steps()
    );
    1
}

/// Attack 10: More forged requests than the ring holds between two drains; every one must be refused.
fn event_flood() -> u64 {
    let mut refused = 0;
    for i in 0..FLOOD_REQUESTS {
        if hooks::call_raw(FORGED_REQUEST, [i, 0, 0, 0]).and_then(Verdict::from_raw)
            == Some(Verdict::Rejected)
        {
            refused += 1;
        }
    }
    say!("attack: {refused} of {FLOOD_REQUESTS} flooding requests refused");
    u64::from(refused != FLOOD_REQUESTS)
}
