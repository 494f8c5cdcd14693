//! The guest kernel's monitor hooks: the system-call path and the process-creation path call the
//! monitor through the gate L0 placed (in-box mode). The gate address comes from L0 at boot; the hook
//! code lives in kernel text, which the guest view maps read + execute only.

use core::sync::atomic::{AtomicU64, Ordering};

use ihmi_abi::monitor::{Mode, RequestCode, Verdict};

/// The gate's entry, or 0 when no monitor is configured.
static GATE: AtomicU64 = AtomicU64::new(0);

type GateFn = extern "C" fn(code: u64, a0: u64, a1: u64, a2: u64, a3: u64) -> u64;

/// Records how to reach the monitor.
pub fn init(mode: Option<Mode>, gate_gva: u64) {
    if mode == Some(Mode::InBox) && gate_gva != 0 {
        GATE.store(gate_gva, Ordering::SeqCst);
    }
}

/// Whether hooks reach a monitor.
pub fn enabled() -> bool {
    GATE.load(Ordering::SeqCst) != 0
}

/// Calls the monitor; `None` without one.
pub fn call(code: RequestCode, args: [u64; 4]) -> Option<Verdict> {
    let gate = GATE.load(Ordering::SeqCst);
    if gate == 0 {
        return None;
    }
    // SAFETY: L0 mapped the gate at this address (identity-mapped guest-physical memory), executable in
    // the guest view, and it follows the C calling convention: five integer arguments, result in RAX.
    let gate: GateFn = unsafe { core::mem::transmute::<usize, GateFn>(gate as usize) };
    Verdict::from_raw(gate(code as u64, args[0], args[1], args[2], args[3]))
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
