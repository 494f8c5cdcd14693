//! The guest's exception policy. The tables themselves come from `ihmi_rt::tables` (every vector on an
//! IST stack); this decides what each exception means for the scenarios.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use ihmi_rt::tables::ExceptionFrame;

use crate::{done, say};

static BREAKPOINTS: AtomicU64 = AtomicU64::new(0);
static EXPECT_GP: AtomicBool = AtomicBool::new(false);
static GP_SEEN: AtomicBool = AtomicBool::new(false);

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
    GP_SEEN.store(false, Ordering::SeqCst);
    EXPECT_GP.store(true, Ordering::SeqCst);
    f();
    EXPECT_GP.store(false, Ordering::SeqCst);
    GP_SEEN.load(Ordering::SeqCst)
}

fn on_exception(frame: &mut ExceptionFrame) {
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
                frame.error_code,
                frame.rip
            );
            done(100 + v);
        }
    }
}
