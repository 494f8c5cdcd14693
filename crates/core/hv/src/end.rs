//! What the exit policy decides after an exit, and why a guest stops.

use core::fmt;

use ihmi_addr::{Gpa, Gva};
use ihmi_ept::ViewId;
use ihmi_vmcs::{EptViolationQualification, ExitReason};

use crate::guard::views::{GUEST_VIEW, MONITOR_VIEW};
use crate::{PlatformError, RegionKind};

/// What L0 does after an exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Enter the guest again.
    Resume,
    /// Stop the guest for the given reason; L0 reports the end to its observer and stays up.
    End(GuestEnd),
    /// Nested VMX: make the other VMCS current (VMCS02 to enter L2, VMCS01 to go back to L1), call
    /// [`crate::Hypervisor::on_vmcs_switched`] with it, and enter it.
    SwitchVmcs(NestedSwitch),
    /// Run this monitor request in the out-of-box monitor VM, then resume the guest (whose VMCALL has
    /// been skipped already) with the verdict in RAX, or, for a Linux system call on its way to the
    /// kernel (`verdict_to_rax` false), with every register as it was.
    CallMonitor {
        code: u64,
        args: [u64; 4],
        verdict_to_rax: bool,
        /// Which way the request came in, as L0 saw it (the VMCALL's address).
        entry: ihmi_abi::monitor::Entry,
        /// The guest's RSP at its VMCALL.
        caller_rsp: u64,
    },
}

/// Which way a nested-VMX switch goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NestedSwitch {
    /// L1's VMLAUNCH or VMRESUME passed its checks: into L2, on VMCS02.
    ToL2,
    /// An exit from L2 is L1's: back to L1, on VMCS01, at its VMCS12's host state.
    ToL1,
}

/// Why a guest stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestEnd {
    /// The guest called `Done` with this code.
    Done(u64),
    /// The guest wrote "Shutdown" to port 0x8900 (its power-off path).
    ShutdownRequest,
    /// The guest asked for a reset through port 0xCF9.
    ResetRequest,
    /// The guest wrote this value to the isa-debug-exit port (0xF4): QEMU would exit with status
    /// `(value << 1) | 1`, and kvm-unit-tests write 0 for success.
    DebugExit(u32),
    /// The guest touched guest-physical memory its EPT does not allow.
    EptViolation {
        gpa: Gpa,
        gla: Option<Gva>,
        rip: u64,
        qualification: EptViolationQualification,
        region: Option<RegionKind>,
        /// The EPT view the guest was in (with an in-box monitor).
        view: Option<ViewId>,
    },
    /// A word the hooks depend on changed (L0's audit noticed it): the test guest's gate pointer, or
    /// a Linux guest's gate mapping (a PML4 slot, the trampoline's page-directory entry).
    HookTampered { gpa: Gpa },
    /// The EPT itself is malformed: an L0 bug.
    EptMisconfig { gpa: Gpa },
    /// The guest triple-faulted.
    TripleFault { rip: u64, view: Option<ViewId> },
    /// The guest received INIT.
    Init,
    /// The guest executed HLT with interrupts disabled: it can never wake up.
    HaltedForever { rip: u64 },
    /// L0 could not put a protection in place that the guest's next step depends on (the EPT view
    /// would not change), so it stops the guest rather than let it run unprotected.
    GuardFailed {
        what: &'static str,
        error: PlatformError,
    },
    /// The out-of-box monitor VM stopped with something other than its verdict: L0 ends the guest
    /// whose request it was serving.
    MonitorVmFault {
        reason: ExitReason,
        rip: u64,
        qualification: u64,
    },
    /// Going back to L1 (an exit from L2, or a failed entry to it), storing or loading an MSR of
    /// L1's VM-exit MSR areas failed (the SDM's VMX abort, indicator 1 or 4; `entry` from 1): a CPU
    /// would shut down, L0 ends the guest.
    VmxAbort { indicator: u32, entry: u64 },
    /// L0 could not go on serving the guest (a VMX instruction of its own failed: an L0 or hardware
    /// fault, not the guest's), so it stopped the guest rather than itself.
    L0Stopped { why: &'static str },
    /// An exit this handler does not support.
    Unhandled {
        reason: ExitReason,
        qualification: u64,
        rip: u64,
    },
}

impl fmt::Display for GuestEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Done(code) => write!(f, "guest called Done({code})"),
            Self::ShutdownRequest => f.write_str("guest requested shutdown (port 0x8900)"),
            Self::VmxAbort { indicator, entry } => write!(
                f,
                "VMX abort for L1 (indicator {indicator}): {} entry {entry} of its VM-exit MSR {} area failed (L0 stores and loads only STAR, FMASK and KERNEL_GS_BASE, on pages L1 may write)",
                if *indicator == 1 { "storing" } else { "loading" },
                if *indicator == 1 { "store" } else { "load" }
            ),
            Self::ResetRequest => f.write_str("guest requested reset (port 0xcf9)"),
            Self::DebugExit(v) => write!(
                f,
                "guest exited through the isa-debug-exit port 0xf4 with {v} (status {})",
                u64::from(*v) << 1 | 1
            ),
            Self::EptViolation {
                gpa,
                gla,
                rip,
                qualification,
                region,
                view,
            } => {
                write!(
                    f,
                    "EPT violation: gpa={gpa} ({}) access={} rip={rip:#x}",
                    region_name(*region),
                    access_name(qualification)
                )?;
                if let Some(gla) = gla {
                    write!(f, " gva={gla}")?;
                }
                write_view(f, *view)
            }
            Self::HookTampered { gpa } => write!(
                f,
                "a word the hooks depend on (a gate pointer, or the gate's mapping) at {gpa} was changed"
            ),
            Self::EptMisconfig { gpa } => write!(f, "EPT misconfiguration at gpa={gpa} (L0 bug)"),
            Self::TripleFault { rip, view } => {
                write!(f, "guest triple fault at rip={rip:#x}")?;
                write_view(f, *view)
            }
            Self::Init => f.write_str("guest received INIT"),
            Self::L0Stopped { why } => write!(f, "L0 stopped the guest: {why}"),
            Self::GuardFailed { what, error } => {
                write!(f, "L0 could not {what} ({error}); the guest is stopped")
            }
            Self::MonitorVmFault {
                reason,
                rip,
                qualification,
            } => write!(
                f,
                "the monitor VM stopped with {} at rip={rip:#x} (qualification {qualification:#x})",
                reason.name()
            ),
            Self::HaltedForever { rip } => {
                write!(f, "guest halted with interrupts off at rip={rip:#x}")
            }
            Self::Unhandled {
                reason,
                qualification,
                rip,
            } => {
                write!(
                    f,
                    "unhandled exit {} (qualification {qualification:#x}) at rip={rip:#x}",
                    reason.name()
                )
            }
        }
    }
}

fn write_view(f: &mut fmt::Formatter<'_>, view: Option<ViewId>) -> fmt::Result {
    match view {
        Some(GUEST_VIEW) => f.write_str(" in view 0 (guest)"),
        Some(MONITOR_VIEW) => f.write_str(" in view 1 (monitor)"),
        Some(v) => write!(f, " in view {}", v.raw()),
        None => Ok(()),
    }
}

fn region_name(region: Option<RegionKind>) -> &'static str {
    match region {
        Some(r) => r.name(),
        None => "unmapped",
    }
}

fn access_name(q: &EptViolationQualification) -> &'static str {
    if q.fetch() {
        "execute"
    } else if q.write() {
        "write"
    } else {
        "read"
    }
}
