#![doc = include_str!("../README.md")]
#![no_std]
#![deny(unsafe_code)]

// The exit policy, one folder per concern: what the guest is answered (policy), what protects an
// in-box monitor (guard), what L0 knows and changes of a Linux guest (linux), and VMX for a guest
// hypervisor (nested).
pub mod guard;
pub mod linux;
pub mod monitor_vm;
pub mod nested;
pub mod policy;

pub mod counters;
mod end;
pub mod memory;
pub mod observe;
mod platform;
mod vcpu;

// The mock names this crate as other crates do, so the same file also builds `ihmi-hv-mock`.
#[cfg(test)]
extern crate self as ihmi_hv;
#[cfg(test)]
mod mock;
#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;

use ihmi_addr::{Gpa, Gva};
use ihmi_vmcs::fields::guest;
use ihmi_vmcs::{EptViolationQualification, VmExit};

pub use counters::ExitCounters;
pub use end::{Action, GuestEnd, NestedSwitch};
pub use guard::{Alert, Guard, ViewEptps};
pub use linux::gate::{KernelImage, LinuxGate, Locked};
pub use memory::{MemoryMap, RegionKind};
pub use observe::{BenchMark, Observation, Observer, Unobserved};
pub use platform::{MonitorWord, Platform, PlatformError};
pub use vcpu::{GuestRegs, ShadowFields, Vcpu};

pub(crate) use vcpu::{cpl, gpr, inject_exception, skip_instruction};

/// The exception vectors L0 intercepts (the VMCS exception bitmap): #BP only, to count and reinject it.
pub const EXCEPTION_BITMAP: u32 = 1 << ihmi_arch::vector::BP;

/// L0's per-guest state and exit policy.
#[derive(Debug)]
pub struct Hypervisor {
    /// Guest-physical memory and who owns each part.
    pub memory: MemoryMap,
    /// Per-reason exit counts.
    pub counters: ExitCounters,
    /// Protection of an in-box monitor, when the guest has one (or a Linux guest's hooks).
    pub guard: Option<Guard>,
    /// Whether an out-of-box monitor VM serves [`ihmi_abi::Hypercall::Monitor`].
    pub outbox_monitor: bool,
    /// What the host found out about a Linux guest's kernel (System.map and BTF).
    pub linux: Option<ihmi_linux::LinuxProfile>,
    /// Nested VMX, when the scenario offers the guest VMX (none: VMX is hidden).
    pub nested: Option<nested::vmx::NestedVmx>,
    /// The benchmark window the guest has open, if any.
    bench: policy::bench::BenchWindow,
    /// The NMI waiting for the guest, and what happened to the others.
    nmi: policy::nmi::NmiState,
    e9_line: policy::io::LineBuffer,
    shutdown_port: policy::io::ShutdownMatcher,
}

impl Hypervisor {
    /// A hypervisor for one guest with the given memory map.
    #[must_use]
    pub fn new(memory: MemoryMap) -> Self {
        Self {
            memory,
            counters: ExitCounters::default(),
            guard: None,
            outbox_monitor: false,
            linux: None,
            nested: None,
            bench: policy::bench::BenchWindow::default(),
            nmi: policy::nmi::NmiState::default(),
            e9_line: policy::io::LineBuffer::default(),
            shutdown_port: policy::io::ShutdownMatcher::default(),
        }
    }

    /// Handles one VM exit, telling `obs` what it did. Never panics on guest input: anything
    /// unexpected ends the guest, and the end is observed with the task a Linux guest was running.
    pub fn handle_exit(
        &mut self,
        vcpu: &mut impl Vcpu,
        platform: &mut impl Platform,
        obs: &mut impl Observer,
    ) -> Action {
        let exit = vcpu.exit();
        self.counters.record(exit.reason());
        if self.in_l2() {
            // L0's audit and NMI delivery are L1's: they run when L1 does.
            let action = self.on_l2_exit(exit, vcpu, platform, obs);
            if let Action::End(end) = action {
                obs.observe(Observation::Ended { end, task: None });
            }
            return action;
        }
        self.count_l1_exit(exit.reason());
        let audit = self.audit(vcpu, platform, obs);
        if audit.is_none() {
            self.audit_idtr(vcpu, platform, obs);
        }
        let action = audit.unwrap_or_else(|| self.dispatch(exit, vcpu, platform, obs));
        if !matches!(action, Action::End(_)) {
            self.deliver_nmi(vcpu, platform, obs);
        }
        if let Action::End(end) = action {
            // Which task a Linux guest was running when it ended, read through its own structures.
            let task = self
                .linux
                .is_some()
                .then(|| self.current_linux_task(vcpu, platform));
            match &task {
                Some(Ok(t)) => platform.log(format_args!("linux: running task at the end: {t}")),
                Some(Err(e)) => platform.log(format_args!(
                    "linux: the running task could not be read: {e}"
                )),
                None => {}
            }
            obs.observe(Observation::Ended { end, task });
        }
        action
    }

    fn dispatch(
        &mut self,
        exit: VmExit,
        vcpu: &mut impl Vcpu,
        platform: &mut impl Platform,
        obs: &mut impl Observer,
    ) -> Action {
        match exit {
            VmExit::Cpuid(i) => self.on_cpuid(vcpu, platform, obs, i),
            VmExit::Vmcall(i) => self.on_vmcall(vcpu, platform, obs, i),
            VmExit::Io {
                qualification,
                instruction,
            } => self.on_io(vcpu, platform, obs, qualification, instruction),
            VmExit::Rdmsr(i) => self.on_rdmsr(vcpu, platform, obs, i),
            VmExit::Wrmsr(i) => self.on_wrmsr(vcpu, platform, obs, i),
            VmExit::Vmfunc(_) => self.on_vmfunc(vcpu, platform, obs),
            VmExit::Xsetbv(i) => self.on_xsetbv(vcpu, platform, obs, i),
            VmExit::Hlt(i) => policy::exception::on_hlt(vcpu, i),
            VmExit::Nmi { vectoring } => {
                self.counters.record_exception(ihmi_arch::vector::NMI);
                self.on_nmi_exit(vcpu, platform, obs, vectoring);
                Action::Resume
            }
            VmExit::Exception {
                info,
                error_code,
                instruction_len,
            } => {
                self.counters.record_exception(info.vector());
                policy::exception::reinject(vcpu, info, error_code, instruction_len)
            }
            VmExit::EptViolation {
                gpa,
                gla,
                qualification,
            } => self.on_ept_violation(vcpu, platform, obs, gpa, gla, qualification),
            VmExit::EptMisconfig { gpa } => Action::End(GuestEnd::EptMisconfig { gpa }),
            VmExit::TripleFault => Action::End(GuestEnd::TripleFault {
                rip: vcpu.read(guest::RIP),
                view: self.current_view(vcpu),
            }),
            VmExit::Init => Action::End(GuestEnd::Init),
            // The timer only makes the audit above run while the guest makes no exits of its own.
            VmExit::PreemptionTimer => Action::Resume,
            VmExit::Vmx {
                instruction,
                info,
                displacement,
                instruction_len,
            } => self.on_vmx(
                vcpu,
                platform,
                obs,
                nested::vmx::VmxExit {
                    instruction,
                    info,
                    displacement,
                    len: instruction_len,
                },
            ),
            VmExit::CrAccess {
                qualification,
                instruction,
            } => self.on_cr_access(vcpu, platform, obs, qualification, instruction),
            VmExit::ExternalInterrupt { .. }
            | VmExit::EntryFailure { .. }
            | VmExit::Other { .. } => {
                let qualification = match exit {
                    VmExit::EntryFailure { qualification, .. }
                    | VmExit::Other { qualification, .. } => qualification,
                    _ => 0,
                };
                Action::End(GuestEnd::Unhandled {
                    reason: exit.reason(),
                    qualification,
                    rip: vcpu.read(guest::RIP),
                })
            }
        }
    }

    /// An EPT violation is a guest touching what its view does not allow, which ends it; the one
    /// planned violation is a Linux guest's first system call, which opens the gate. A write to what
    /// L0 locked in a Linux kernel is also an alert.
    fn on_ept_violation(
        &mut self,
        vcpu: &mut impl Vcpu,
        platform: &mut impl Platform,
        obs: &mut impl Observer,
        gpa: Gpa,
        gla: Option<Gva>,
        qualification: EptViolationQualification,
    ) -> Action {
        if let Some(action) = self.open_linux_gate(vcpu, platform, gpa, &qualification) {
            return action;
        }
        let locked = self
            .guard
            .as_ref()
            .and_then(Guard::linux)
            .and_then(|l| l.locked_at(gpa))
            .filter(|_| qualification.write());
        if let Some(what) = locked {
            let rip = vcpu.read(guest::RIP);
            self.alert(platform, obs, Alert::LockedWrite { what, gpa, rip });
        }
        Action::End(GuestEnd::EptViolation {
            gpa,
            gla,
            rip: vcpu.read(guest::RIP),
            qualification,
            region: self.memory.classify(gpa),
            view: self.current_view(vcpu),
        })
    }
}
