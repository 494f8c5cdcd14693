//! The guest kernel's monitor hooks: the system-call path and the process-creation path call the
//! monitor through the gate L0 placed (in-box mode). The gate address lives in `IHMI_HOOK_GATE`, which
//! L0 writes before the guest runs and which sits in the kernel's text, read + execute only in view 0:
//! the kernel can use its hooks but cannot redirect or silence them, and L0 audits the value at every
//! exit besides.

use ihmi_abi::monitor::{RequestCode, Verdict};

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

/// Whether hooks reach a monitor.
pub fn enabled() -> bool {
    gate() != 0
}

/// Calls the monitor with a raw request code; the raw verdict, or `None` without a monitor.
pub fn call_raw(code: u64, args: [u64; 4]) -> Option<u64> {
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
