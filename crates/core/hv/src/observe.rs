//! What the exit policy tells the world about what it did: typed [`Observation`]s, delivered to an
//! [`Observer`] that the caller of [`crate::Hypervisor::handle_exit`] passes in (vmi-rs's
//! `VmiHandler` is the model). The hypervisor reports and never asks back: it does not know whether
//! anyone judges a run, counts a benchmark or only logs. The Bochs scenarios' judges (`ihmi-judge`)
//! are one observer; [`Unobserved`] is another.

use ihmi_abi::bench::Bench;
use ihmi_abi::{CpuidRecord, Status};

use crate::linux::{TaskError, TaskInfo};
use crate::{Alert, GuestEnd};

/// A benchmark window mark the guest made with the `Bench` hypercall, already checked: a start
/// opens a window, an end closes the one that is open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BenchMark {
    /// The window.
    pub bench: Bench,
    /// End (true) or start.
    pub end: bool,
    /// At the end: the guest's time-stamp-counter delta over the window.
    pub tsc: u64,
    /// At the end: the calls measured.
    pub calls: u64,
    /// The guest's VM exits so far, this mark's own exit included.
    pub guest_exits: u64,
}

/// One thing the exit policy did or saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Observation<'a> {
    /// CPUID answered the guest with these values.
    Cpuid {
        leaf: u32,
        subleaf: u32,
        regs: [u32; 4],
    },
    /// The guest reported what it saw for a CPUID leaf (`Report` hypercall).
    CpuidReport(CpuidRecord),
    /// A hypercall and the status L0 gave it.
    Hypercall { nr: u64, status: Status },
    /// An intercepted RDMSR or WRMSR; `faulted` when L0 answered it with #GP.
    Msr {
        msr: u32,
        write: bool,
        faulted: bool,
    },
    /// A guest hypervisor in VMX operation wrote its guest's value of a system-call entry MSR that
    /// L0 locks for it, another than the locked one (KVM loading L2's LSTAR or CSTAR): kept as
    /// L2's, loaded only while L2 runs.
    L2EntryMsr { msr: u32 },
    /// XSETBV; `faulted` when the value was refused with #GP.
    Xsetbv { xcr0: u64, faulted: bool },
    /// An intercepted port access.
    Io { port: u16, write: bool },
    /// A whole line the guest wrote on the debug port (without its newline), and the guest's exit
    /// count so far, the newline's own exit included.
    DebugLine { line: &'a [u8], exits: u64 },
    /// Something L0 refused or noticed while the guest keeps running (or not: see `Ended`).
    Alert(Alert),
    /// A VMX instruction of the guest's, emulated (nested VMX offered) and what it came to.
    Vmx {
        instruction: ihmi_vmcs::VmxInstruction,
        outcome: crate::nested::vmx::VmxOutcome,
    },
    /// Nested VMX: L0 entered L2 for L1 (VMLAUNCH or VMRESUME). `round_trip`, after an exit L1
    /// handled: the L0 exits from that exit from L2 up to this entry, both included (NESTED.md A.1.6:
    /// the cost of one reflected exit).
    L2Entry {
        launch: bool,
        round_trip: Option<u64>,
    },
    /// Nested VMX with Linux + KVM as L1: the VMCS12 host state of a VMLAUNCH or VMRESUME was L1's
    /// live state, returning to KVM's `vmx_vmexit` ([`crate::nested::host_state`]); a mismatch is
    /// an alert instead.
    L1HostStateChecked,
    /// Nested VMX with the in-hypervisor monitor's VMCS registry: the VMCS of a VMLAUNCH or
    /// VMRESUME was one the monitor registered as a KVM vCPU's (P6); any other is an alert instead.
    L1VmcsRegistered { gpa: ihmi_addr::Gpa },
    /// Nested VMX: an exit from L2, and whether it went to L1 (`reflected`) or was L0's own.
    L2Exit {
        reason: ihmi_vmcs::ExitReason,
        reflected: bool,
    },
    /// L0 took an NMI (see [`crate::policy::nmi`]): `in_monitor_view` when it found the guest in the
    /// monitor's view, `merged` when another NMI was already waiting.
    NmiTaken { in_monitor_view: bool, merged: bool },
    /// L0 injected the waiting NMI into the guest.
    NmiDelivered,
    /// A benchmark window opened or closed.
    BenchMark(BenchMark),
    /// The guest ended; for a Linux guest, the task it was running then, read through the kernel's
    /// own structures.
    Ended {
        end: GuestEnd,
        task: Option<Result<TaskInfo, TaskError>>,
    },
}

/// Receives what the exit policy reports.
pub trait Observer {
    /// One observation; called while the exit is handled, in the order things happened.
    fn observe(&mut self, observation: Observation<'_>);
}

/// The observer that keeps nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct Unobserved;

impl Observer for Unobserved {
    fn observe(&mut self, _: Observation<'_>) {}
}
