//! The out-of-box baseline's monitor VM, as L0's exit policy sees it: the only exit it may make is the
//! VMCALL that hands back a verdict; an NMI (L0 takes them, they are the guest's) or the VMX-preemption
//! timer interrupts it and it goes on; anything else is a fault of the monitor VM, reported, never run
//! past.

use ihmi_abi::monitor::OUTBOX_DONE;
use ihmi_vmcs::fields::guest;
use ihmi_vmcs::{ExitReason, VmExit};

use crate::Vcpu;

/// What one exit of the monitor VM means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MonitorVmExit {
    /// The monitor answered: switch back to the guest with this verdict.
    Done {
        /// The verdict (RBX of the VMCALL).
        verdict: u64,
    },
    /// An NMI arrived (it belongs to the guest: `nmi`) or the timer ran out: resume the monitor VM.
    Interrupted {
        /// An NMI, for the guest.
        nmi: bool,
    },
    /// Anything else: the monitor VM is broken.
    Fault {
        /// The exit reason.
        reason: ExitReason,
        /// Where the monitor VM was.
        rip: u64,
        /// The exit qualification (for EPT exits, the guest-physical address).
        qualification: u64,
    },
}

/// Decodes an exit of the monitor VM (its VMCS is current).
pub fn decode_exit(vcpu: &mut impl Vcpu) -> MonitorVmExit {
    let exit = vcpu.exit();
    let regs = *vcpu.regs();
    if matches!(exit, VmExit::Vmcall(_)) && regs.rax == OUTBOX_DONE {
        return MonitorVmExit::Done { verdict: regs.rbx };
    }
    match exit {
        // The monitor VM takes no events of its own: nothing to re-inject.
        VmExit::Nmi { .. } => return MonitorVmExit::Interrupted { nmi: true },
        VmExit::PreemptionTimer => return MonitorVmExit::Interrupted { nmi: false },
        _ => {}
    }
    let qualification = match exit {
        VmExit::Other { qualification, .. } | VmExit::EntryFailure { qualification, .. } => {
            qualification
        }
        VmExit::EptViolation { gpa, .. } | VmExit::EptMisconfig { gpa } => gpa.raw(),
        _ => 0,
    };
    MonitorVmExit::Fault {
        reason: exit.reason(),
        rip: vcpu.read(guest::RIP),
        qualification,
    }
}
