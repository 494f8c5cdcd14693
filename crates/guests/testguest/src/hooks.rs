//! The guest kernel's monitor hooks: the system-call path and the process-creation path call the
//! monitor, in-box through the gate L0 placed, out of the box with the `Monitor` hypercall. How, and
//! where the gate is, L0 writes into `IHMI_HOOK_MODE` and `IHMI_HOOK_GATE` before the guest runs; both
//! sit in the kernel's text, read + execute only in the guest's view: the kernel can use its hooks but
//! cannot redirect or silence them, and L0 audits the gate pointer at every exit besides.

use ihmi_abi::monitor::{Mode, RequestCode, Verdict};
use ihmi_abi::Hypercall;

/// `ihmi_abi::monitor::Mode` as a number. Written by L0 only.
#[no_mangle]
#[used]
#[link_section = ".ihmi_hooks"]
pub static IHMI_HOOK_MODE: u64 = 0;

/// The gate's entry, or 0 when no monitor is configured. Written by L0 only.
#[no_mangle]
#[used]
#[link_section = ".ihmi_hooks"]
pub static IHMI_HOOK_GATE: u64 = 0;

type GateFn = extern "C" fn(code: u64, a0: u64, a1: u64, a2: u64, a3: u64) -> u64;

/// The gate address L0 installed (read afresh every time: L0 wrote it behind the compiler's back).
pub fn gate() -> u64 {
    // SAFETY: a plain aligned read of a static; volatile so the compiler does not fold in its initial 0.
    unsafe { core::ptr::read_volatile(core::ptr::addr_of!(IHMI_HOOK_GATE)) }
}

/// How the hooks reach the monitor (read afresh, as [`gate`] is).
pub fn mode() -> Mode {
    // SAFETY: as in `gate`.
    let raw = unsafe { core::ptr::read_volatile(core::ptr::addr_of!(IHMI_HOOK_MODE)) };
    u32::try_from(raw)
        .ok()
        .and_then(Mode::from_raw)
        .unwrap_or(Mode::None)
}

/// Whether hooks reach a monitor.
pub fn enabled() -> bool {
    match mode() {
        Mode::None => false,
        Mode::InBox => gate() != 0,
        Mode::OutBox => true,
    }
}

/// Calls the monitor with a raw request code; the raw verdict, or `None` without a monitor.
pub fn call_raw(code: u64, args: [u64; 4]) -> Option<u64> {
    match mode() {
        Mode::None => None,
        Mode::InBox => call_gate(code, args),
        Mode::OutBox => {
            let verdict: u64;
            // SAFETY: VMCALL exits to L0, which runs the request in the monitor VM and returns its
            // verdict in RAX; it changes no other register. RBX is reserved by the compiler, so the
            // request code is swapped in and out around the call.
            unsafe {
                core::arch::asm!(
                    "xchg {b}, rbx",
                    "vmcall",
                    "xchg {b}, rbx",
                    b = inout(reg) code => _,
                    inout("rax") Hypercall::Monitor as u64 => verdict,
                    in("rcx") args[0],
                    in("rdx") args[1],
                    in("rsi") args[2],
                    in("rdi") args[3],
                    options(nostack),
                );
            }
            Some(verdict)
        }
    }
}

fn call_gate(code: u64, args: [u64; 4]) -> Option<u64> {
    let gate = gate();
    if gate == 0 {
        return None;
    }
    // SAFETY: L0 mapped the gate at this address (identity-mapped guest-physical memory), executable in
    // the guest view, and it follows the C calling convention: five integer arguments, result in RAX.
    let gate: GateFn = unsafe { core::mem::transmute::<usize, GateFn>(gate as usize) };
    Some(gate(code, args[0], args[1], args[2], args[3]))
}

/// Calls the monitor; `None` without one.
pub fn call(code: RequestCode, args: [u64; 4]) -> Option<Verdict> {
    call_raw(code as u64, args).and_then(Verdict::from_raw)
}

/// The system-call hook, at the top of the dispatcher.
pub fn syscall(nr: u64, a0: u64, a1: u64, a2: u64) {
    let _ = call(RequestCode::Syscall, [nr, a0, a1, a2]);
}

/// The process-creation hook: the new record is filled in but not yet live. `false` means refuse.
pub fn process_create(record: u64, program: u64) -> bool {
    match call(RequestCode::ProcessCreate, [record, program, 0, 0]) {
        None | Some(Verdict::Allow) => true,
        Some(Verdict::Deny | Verdict::Rejected) => false,
    }
}
