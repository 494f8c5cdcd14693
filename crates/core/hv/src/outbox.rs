//! The out-of-box baseline's monitor VM, as L0's exit policy sees it: the only exit it may make is the
//! VMCALL that hands back a verdict; anything else is a fault of the monitor VM, reported, never run
//! past.

use ihmi_abi::monitor::OUTBOX_DONE;
use ihmi_vmcs::fields::{guest, ro};
use ihmi_vmcs::{ExitReason, RawExitReason};

use crate::Vcpu;

/// What one exit of the monitor VM means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MonitorVmExit {
    /// The monitor answered: switch back to the guest with this verdict.
    Done {
        /// The verdict (RBX of the VMCALL).
        verdict: u64,
    },
    /// Anything else: the monitor VM is broken.
    Fault {
        /// The exit reason.
        reason: ExitReason,
        /// Where the monitor VM was.
        rip: u64,
        /// The exit qualification.
        qualification: u64,
    },
}

/// Decodes an exit of the monitor VM (its VMCS is current).
pub fn decode_exit(vcpu: &mut impl Vcpu) -> MonitorVmExit {
    let reason = RawExitReason::from_raw(vcpu.read(ro::EXIT_REASON) as u32).basic();
    let regs = *vcpu.regs();
    if reason == ExitReason::Vmcall && regs.rax == OUTBOX_DONE {
        return MonitorVmExit::Done { verdict: regs.rbx };
    }
    MonitorVmExit::Fault {
        reason,
        rip: vcpu.read(guest::RIP),
        qualification: vcpu.read(ro::EXIT_QUALIFICATION),
    }
}
