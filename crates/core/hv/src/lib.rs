#![doc = include_str!("../README.md")]
#![no_std]
#![deny(unsafe_code)]

mod bench;
pub mod counters;
mod cpuid;
pub mod guard;
mod hypercall;
pub mod io;
pub mod linux;
pub mod linux_hooks;
pub mod memory;
pub mod msr;
pub mod nested;
pub mod observe;
pub mod outbox;
pub mod views;
pub mod xsetbv;

// The mock names this crate as other crates do, so the same file also builds `ihmi-hv-mock`.
#[cfg(test)]
extern crate self as ihmi_hv;
#[cfg(test)]
mod mock;
#[cfg(test)]
mod tests;

use core::fmt;

use ihmi_addr::{Gpa, Gva};
use ihmi_vmcs::fields::{control, guest};
use ihmi_vmcs::{
    EptViolationQualification, ExitReason, Instruction, InterruptionInfo, InterruptionType, VmExit,
    VmcsField,
};

pub use counters::ExitCounters;
pub use guard::{Alert, Guard, LinuxGate, ViewEptps};
pub use memory::{MemoryMap, RegionKind};
pub use observe::{BenchMark, Observation, Observer, Unobserved};

/// Guest general-purpose registers as the exit stub saves them (RSP and RIP live in the VMCS).
///
/// The field order is the stub's push order reversed; `ihmi-vmx` checks the layout at compile time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct GuestRegs {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
}

/// The current virtual CPU: its VMCS and saved registers.
pub trait Vcpu {
    /// The exit that just happened, decoded from its exit-information fields by the VMX layer (no
    /// handler reads an exit-reason number or an exit-information field itself).
    fn exit(&mut self) -> VmExit;
    /// VMREAD of a field of the current VMCS.
    fn read(&mut self, field: VmcsField) -> u64;
    /// VMWRITE of a field of the current VMCS.
    fn write(&mut self, field: VmcsField, value: u64);
    /// The guest registers saved at exit, restored at entry.
    fn regs(&mut self) -> &mut GuestRegs;
}

/// The machine around the vCPU.
pub trait Platform {
    /// CPUID as the host CPU answers it.
    fn host_cpuid(&mut self, leaf: u32, subleaf: u32) -> [u32; 4];
    /// Reads guest-physical memory that the caller has already checked is guest RAM.
    fn read_phys(&self, gpa: Gpa, buf: &mut [u8]) -> bool;
    /// Prints one line of L0's own on its console (serial and 0xE9).
    fn log(&mut self, args: fmt::Arguments<'_>);
    /// Prints one line of guest text, already sanitised and prefixed. It must never reach the channel
    /// that carries L0's verdict markers.
    fn guest_text(&mut self, args: fmt::Arguments<'_>);
    /// Writes an MSR the guest owns but L0 intercepts (IA32_LSTAR), once L0 has allowed the write.
    fn write_msr(&mut self, msr: u32, value: u64);
    /// Sets XCR0 to a value L0 has checked, on the guest's behalf (XSETBV always exits).
    fn xsetbv(&mut self, xcr0: u64);
    /// Writes `bytes` at `gpa` (guest RAM or monitor memory), once L0 has decided to; false if the
    /// range is not memory L0 can reach.
    fn write_phys(&mut self, gpa: Gpa, bytes: &[u8]) -> bool;
    /// Reads an MSR that holds guest state L0 does not switch (IA32_KERNEL_GS_BASE).
    fn read_msr(&mut self, msr: u32) -> u64;
    /// Reads a byte from a device port L0 intercepts but passes on (the keyboard controller).
    fn port_in(&mut self, port: u16) -> u8;
    /// Writes a byte to such a port, once L0 has checked it.
    fn port_out(&mut self, port: u16, value: u8);
    /// Sets the permissions of guest-physical `[gpa, gpa + len)` in the guest's EPT view (view 0) and
    /// invalidates what the CPU cached of it; false if L0 could not.
    fn protect_guest(&mut self, gpa: Gpa, len: u64, perm: ihmi_ept::Perm) -> bool;
}

/// What L0 does after an exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Enter the guest again.
    Resume,
    /// Stop the guest for the given reason; L0 judges the scenario and stays up.
    End(GuestEnd),
    /// Run this monitor request in the out-of-box monitor VM, then resume the guest (whose VMCALL has
    /// been skipped already) with the verdict in RAX, or, for a Linux system call on its way to the
    /// kernel (`verdict_to_rax` false), with every register as it was.
    CallMonitor {
        code: u64,
        args: [u64; 4],
        verdict_to_rax: bool,
    },
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
    /// The guest touched guest-physical memory its EPT does not allow.
    EptViolation {
        gpa: Gpa,
        gla: Option<Gva>,
        rip: u64,
        qualification: EptViolationQualification,
        region: Option<RegionKind>,
        /// The EPT view the guest was in (with an in-box monitor).
        view: Option<u16>,
    },
    /// The hooks' gate pointer changed (L0's audit noticed it).
    HookTampered { gpa: Gpa },
    /// The EPT itself is malformed: an L0 bug.
    EptMisconfig { gpa: Gpa },
    /// The guest triple-faulted.
    TripleFault { rip: u64, view: Option<u16> },
    /// The guest received INIT.
    Init,
    /// The guest executed HLT with interrupts disabled: it can never wake up.
    HaltedForever { rip: u64 },
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
            Self::ResetRequest => f.write_str("guest requested reset (port 0xcf9)"),
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
            Self::HookTampered { gpa } => {
                write!(f, "the hooks' gate pointer at {gpa} was changed")
            }
            Self::EptMisconfig { gpa } => write!(f, "EPT misconfiguration at gpa={gpa} (L0 bug)"),
            Self::TripleFault { rip, view } => {
                write!(f, "guest triple fault at rip={rip:#x}")?;
                write_view(f, *view)
            }
            Self::Init => f.write_str("guest received INIT"),
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

fn write_view(f: &mut fmt::Formatter<'_>, view: Option<u16>) -> fmt::Result {
    match view {
        Some(views::GUEST_VIEW) => f.write_str(" in view 0 (guest)"),
        Some(views::MONITOR_VIEW) => f.write_str(" in view 1 (monitor)"),
        Some(v) => write!(f, " in view {v}"),
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

/// The exception vectors L0 intercepts (the VMCS exception bitmap): #BP only, to count and reinject it.
pub const EXCEPTION_BITMAP: u32 = 1 << 3;

/// L0's per-guest state and exit policy.
#[derive(Debug)]
pub struct Hypervisor {
    /// Guest-physical memory and who owns each part.
    pub memory: MemoryMap,
    /// Per-reason exit counts.
    pub counters: ExitCounters,
    /// Protection of an in-box monitor, when the guest has one.
    pub guard: Option<Guard>,
    /// Whether an out-of-box monitor VM serves [`ihmi_abi::Hypercall::Monitor`].
    pub outbox_monitor: bool,
    /// The benchmark window the guest has open, if any.
    bench: bench::BenchWindow,
    /// What the host found out about a Linux guest's kernel (System.map and BTF).
    pub linux: Option<ihmi_linux::LinuxProfile>,
    e9_line: io::LineBuffer,
    shutdown_port: io::ShutdownMatcher,
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
            bench: bench::BenchWindow::default(),
            linux: None,
            e9_line: io::LineBuffer::default(),
            shutdown_port: io::ShutdownMatcher::default(),
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
        let audit = self.audit_hook(platform, obs);
        let action = audit.unwrap_or_else(|| self.dispatch(exit, vcpu, platform, obs));
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
            VmExit::Hlt(i) => self.on_hlt(vcpu, i),
            VmExit::Exception {
                info,
                error_code,
                instruction_len,
            } => self.on_exception(vcpu, info, error_code, instruction_len),
            VmExit::EptViolation {
                gpa,
                gla,
                qualification,
            } => self.on_ept_violation(vcpu, platform, gpa, gla, qualification),
            VmExit::EptMisconfig { gpa } => Action::End(GuestEnd::EptMisconfig { gpa }),
            VmExit::TripleFault => Action::End(GuestEnd::TripleFault {
                rip: vcpu.read(guest::RIP),
                view: self.current_view(vcpu),
            }),
            VmExit::Init => Action::End(GuestEnd::Init),
            VmExit::Vmx { instruction, .. } => nested::on_vmx_instruction(vcpu, instruction),
            VmExit::ExternalInterrupt { .. }
            | VmExit::CrAccess { .. }
            | VmExit::EntryFailure { .. }
            | VmExit::Other { .. } => {
                let qualification = match exit {
                    VmExit::CrAccess { qualification, .. } => qualification.raw(),
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

    fn on_hlt(&mut self, vcpu: &mut impl Vcpu, instruction: Instruction) -> Action {
        const RFLAGS_IF: u64 = 1 << 9;
        if vcpu.read(guest::RFLAGS) & RFLAGS_IF == 0 {
            return Action::End(GuestEnd::HaltedForever {
                rip: vcpu.read(guest::RIP),
            });
        }
        // No interrupt source is virtualised yet, so waking at once is a legal spurious wake-up.
        skip_instruction(vcpu, instruction);
        Action::Resume
    }

    fn on_exception(
        &mut self,
        vcpu: &mut impl Vcpu,
        info: InterruptionInfo,
        error_code: Option<u32>,
        instruction_len: u64,
    ) -> Action {
        self.counters.record_exception(info.vector());
        // Reflect the event back into the guest exactly as it arrived.
        let reinject = match info.interruption_type() {
            InterruptionType::SoftwareException | InterruptionType::PrivilegedSoftwareException => {
                vcpu.write(control::VMENTRY_INSTRUCTION_LEN, instruction_len);
                InterruptionInfo::software_exception(info.vector())
            }
            InterruptionType::Nmi => InterruptionInfo::nmi(),
            _ => {
                if let Some(code) = error_code {
                    vcpu.write(control::VMENTRY_EXCEPTION_ERR_CODE, u64::from(code));
                }
                InterruptionInfo::hardware_exception(info.vector(), error_code.is_some())
            }
        };
        vcpu.write(
            control::VMENTRY_INTERRUPTION_INFO_FIELD,
            u64::from(reinject.raw()),
        );
        Action::Resume
    }

    fn on_ept_violation(
        &mut self,
        vcpu: &mut impl Vcpu,
        platform: &mut impl Platform,
        gpa: Gpa,
        gla: Option<Gva>,
        qualification: EptViolationQualification,
    ) -> Action {
        if let Some(action) = self.open_linux_gate(vcpu, platform, gpa, &qualification) {
            return action;
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

/// Moves the guest past the instruction that exited, dropping STI/MOV-SS blocking as the CPU would.
pub(crate) fn skip_instruction(vcpu: &mut impl Vcpu, instruction: Instruction) {
    let rip = vcpu.read(guest::RIP);
    vcpu.write(guest::RIP, rip.wrapping_add(instruction.len));
    let blocking = vcpu.read(guest::INTERRUPTIBILITY_STATE);
    if blocking & 0b11 != 0 {
        vcpu.write(guest::INTERRUPTIBILITY_STATE, blocking & !0b11);
    }
}

/// Injects a hardware exception (#GP, #UD, ...) into the guest at its current instruction.
pub(crate) fn inject_exception(vcpu: &mut impl Vcpu, vector: u8, error_code: Option<u32>) {
    if let Some(code) = error_code {
        vcpu.write(control::VMENTRY_EXCEPTION_ERR_CODE, u64::from(code));
    }
    let info = InterruptionInfo::hardware_exception(vector, error_code.is_some());
    vcpu.write(
        control::VMENTRY_INTERRUPTION_INFO_FIELD,
        u64::from(info.raw()),
    );
}

/// General-protection fault vector.
pub(crate) const GP: u8 = 13;
