//! The guest's exception policy. The tables themselves come from `ihmi_rt::tables` (every vector on an
//! IST stack); this decides what each exception means for the scenarios.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use ihmi_rt::tables::ExceptionFrame;

use crate::{done, say};

static BREAKPOINTS: AtomicU64 = AtomicU64::new(0);
/// The vector `expect_fault` waits for (0 = none), and the length of the instruction to skip.
static EXPECT_VECTOR: AtomicU64 = AtomicU64::new(0);
static EXPECT_SKIP: AtomicU64 = AtomicU64::new(0);
static FAULT_SEEN: AtomicBool = AtomicBool::new(false);
/// Single-step traps (#DB) the handler lets through while an attack steps into the gate.
static STEPS_ALLOWED: AtomicBool = AtomicBool::new(false);
static STEPS: AtomicU64 = AtomicU64::new(0);

/// Installs the guest's GDT, TSS and IDT.
pub fn init() {
    ihmi_rt::tables::init(on_exception);
}

/// Breakpoints the guest's #BP handler has taken.
pub fn breakpoints() -> u64 {
    BREAKPOINTS.load(Ordering::SeqCst)
}

/// Runs `f`, which must raise #GP on a 2-byte instruction (RDMSR/WRMSR); returns whether it did.
pub fn expect_gp(f: impl FnOnce()) -> bool {
    expect_fault(13, 2, f)
}

/// Runs `f`, which must raise exception `vector` on an instruction `len` bytes long; the handler skips
/// that instruction. Returns whether the exception came.
pub fn expect_fault(vector: u64, len: u64, f: impl FnOnce()) -> bool {
    FAULT_SEEN.store(false, Ordering::SeqCst);
    EXPECT_SKIP.store(len, Ordering::SeqCst);
    EXPECT_VECTOR.store(vector, Ordering::SeqCst);
    f();
    EXPECT_VECTOR.store(0, Ordering::SeqCst);
    FAULT_SEEN.load(Ordering::SeqCst)
}

/// From now on, single-step traps return to the stepped code (an attack steps into the gate).
pub fn allow_single_steps() {
    STEPS_ALLOWED.store(true, Ordering::SeqCst);
}

/// Single-step traps taken so far.
pub fn steps() -> u64 {
    STEPS.load(Ordering::SeqCst)
}

fn on_exception(frame: &mut ExceptionFrame) {
    match frame.vector {
        3 => {
            BREAKPOINTS.fetch_add(1, Ordering::SeqCst);
        }
        v if v != 0 && v == EXPECT_VECTOR.load(Ordering::SeqCst) => {
            FAULT_SEEN.store(true, Ordering::SeqCst);
            EXPECT_VECTOR.store(0, Ordering::SeqCst);
            frame.rip += EXPECT_SKIP.load(Ordering::SeqCst);
        }
        1 if STEPS_ALLOWED.load(Ordering::SeqCst) => {
            STEPS.fetch_add(1, Ordering::SeqCst);
        }
        v => {
            say!(
                "testguest: unexpected exception {v} (error {:#x}) at rip={:#x}",
                frame.error_code,
                frame.rip
            );
            done(100 + v);
        }
    }
}
