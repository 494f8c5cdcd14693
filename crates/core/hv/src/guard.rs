//! What L0 enforces at exits to protect an in-box monitor: knowing which EPT view the guest was in,
//! refusing VMFUNCs that name no view, locking the system-call entry MSR once the kernel has set it,
//! auditing the hooks' gate pointer, and the alerts it raises for each.
//!
//! Most attacks never reach here: the EPT views stop them in hardware and L0 sees an EPT violation.
//! This module covers the attacks that arrive as other exits, and adds the audit that notices a hook
//! whose gate pointer has changed, whatever changed it.

use core::fmt;

use ihmi_addr::{Gpa, PAGE_SIZE};
use ihmi_vmcs::fields::{control, guest};
use ihmi_vmcs::{EptViolationQualification, Instruction};

use crate::linux_hooks::{self, ArmedHook, ExecHook};
use crate::{
    inject_exception, skip_instruction, Action, GuestEnd, Hypervisor, Observation, Observer,
    Platform, Vcpu,
};

/// IA32_LSTAR, the 64-bit SYSCALL entry point (SDM Vol. 4, Table 2-2).
pub const IA32_LSTAR: u32 = 0xc000_0082;
/// Invalid-opcode exception vector.
const UD: u8 = 6;

/// The EPTP values of the two views, to tell from the VMCS which one the guest was in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ViewEptps {
    /// View 0, the guest's.
    pub guest: u64,
    /// View 1, the monitor's; none when the monitor is out of the box (a Linux guest still needs the
    /// guard for its hooks).
    pub monitor: Option<u64>,
}

/// How L0 puts the system-call gate in front of a Linux kernel's SYSCALL entry, when the kernel
/// installs it (in `syscall_init`: after the kernel has built its top-level page table, before any
/// process exists to copy it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinuxGate {
    /// What IA32_LSTAR gets: the gate's system-call entry.
    pub gate_entry: u64,
    /// Where the gate page keeps the kernel's own entry, to jump on to.
    pub kernel_entry_slot: Gpa,
    /// The kernel's top-level page table (`init_top_pgt`), guest-physical.
    pub pgd: Gpa,
    /// The PML4 slot of the gate and the entry that maps it.
    pub slot: u64,
    pub pml4e: u64,
    /// Page-table isolation built in: the user half of the PGD pair gets the slot too.
    pub pti_pgd_pair: bool,
    /// The gate page, guest-physical: readable but not executable in the guest view until the first
    /// system call, when L0 installs the process-creation hook and opens it.
    pub gate_page: Gpa,
    /// The process-creation hook to install then, if the monitor has one.
    pub exec_hook: Option<ExecHook>,
    /// Out of the box: the address of the system-call stub's VMCALL, which L0 takes as a system call
    /// to show the monitor VM (RAX = number, RDI, RSI, RDX = arguments), leaving every register alone.
    pub outbox_syscall: Option<u64>,
}

/// L0's protection state for one guest with an in-box monitor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Guard {
    /// The views.
    pub views: ViewEptps,
    /// Where the guest kernel keeps the gate address its hooks call, and the value it must hold.
    pub hook: Option<(Gpa, u64)>,
    /// The system-call entry the kernel installed; later writes that change it are refused. The kernel
    /// is trusted while it boots (when it sets LSTAR once) and assumed compromised afterwards.
    lstar: Option<u64>,
    /// For a Linux guest: the system-call gate to put in front of the kernel's entry.
    pub linux_gate: Option<LinuxGate>,
    /// Linux: the gate's PML4 entry in the kernel's top-level table, audited once installed.
    linux_slot: Option<(Gpa, u64)>,
    /// Linux: whether the first system call has opened the gate (and the hook went in, if it did).
    gate_open: bool,
    armed_hook: Option<ArmedHook>,
}

impl Guard {
    /// A guard for these views; the hook is audited when given.
    #[must_use]
    pub const fn new(views: ViewEptps, hook: Option<(Gpa, u64)>) -> Self {
        Self {
            views,
            hook,
            lstar: None,
            linux_gate: None,
            linux_slot: None,
            gate_open: false,
            armed_hook: None,
        }
    }

    /// The process-creation hook, once installed.
    #[must_use]
    pub const fn armed_hook(&self) -> Option<&ArmedHook> {
        self.armed_hook.as_ref()
    }

    /// Every word L0 audits at each exit, with the value it must hold: the test guest's gate pointer,
    /// and for Linux the gate's PML4 entry and the hook trampoline's page-directory entry.
    fn audited(&self) -> impl Iterator<Item = (Gpa, u64)> {
        [
            self.hook,
            self.linux_slot,
            self.armed_hook.map(|a| a.audited()),
        ]
        .into_iter()
        .flatten()
    }

    /// The system-call entry the guest kernel installed, once it has.
    #[must_use]
    pub const fn kernel_lstar(&self) -> Option<u64> {
        self.lstar
    }

    /// The view whose EPTP is `eptp`, if it is one of ours.
    #[must_use]
    pub const fn view_of(&self, eptp: u64) -> Option<u16> {
        if eptp == self.views.guest {
            Some(crate::views::GUEST_VIEW)
        } else if matches!(self.views.monitor, Some(m) if m == eptp) {
            Some(crate::views::MONITOR_VIEW)
        } else {
            None
        }
    }
}

/// Something the guest tried that L0 refused or noticed, while the guest may keep running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alert {
    /// VMFUNC named a function or an EPTP-list index that is not enabled (SDM 26.5.6: a VM exit).
    VmfuncRefused {
        /// EAX: the VM function.
        function: u64,
        /// ECX: the EPTP-list index.
        index: u64,
        /// Where the guest executed it.
        rip: u64,
    },
    /// WRMSR tried to move the system-call entry away from the one the kernel installed.
    LstarWriteRefused {
        /// The value the guest tried to write.
        value: u64,
        /// The locked value.
        locked: u64,
        /// Where the guest executed it.
        rip: u64,
    },
    /// The hooks' gate pointer no longer holds the gate address.
    HookTampered {
        /// Where the pointer lives.
        gpa: Gpa,
        /// What it holds now.
        found: u64,
        /// What it must hold.
        expected: u64,
    },
}

impl Default for Alert {
    fn default() -> Self {
        Self::VmfuncRefused {
            function: 0,
            index: 0,
            rip: 0,
        }
    }
}

impl Alert {
    /// The alert's name in reports.
    #[must_use]
    pub const fn name(&self) -> &'static str {
        match self {
            Self::VmfuncRefused { .. } => "vmfunc-refused",
            Self::LstarWriteRefused { .. } => "lstar-write-refused",
            Self::HookTampered { .. } => "hook-tampered",
        }
    }
}

/// One JSON object per alert: `{"alert":"...",...}`.
impl fmt::Display for Alert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{{\"alert\":\"{}\"", self.name())?;
        match *self {
            Self::VmfuncRefused {
                function,
                index,
                rip,
            } => write!(
                f,
                ",\"function\":{function},\"index\":{index},\"rip\":\"{rip:#x}\",\"action\":\"#UD injected\""
            )?,
            Self::LstarWriteRefused { value, locked, rip } => write!(
                f,
                ",\"value\":\"{value:#x}\",\"locked\":\"{locked:#x}\",\"rip\":\"{rip:#x}\",\"action\":\"#GP injected\""
            )?,
            Self::HookTampered {
                gpa,
                found,
                expected,
            } => write!(
                f,
                ",\"gpa\":\"{gpa}\",\"found\":\"{found:#x}\",\"expected\":\"{expected:#x}\",\"action\":\"guest stopped\""
            )?,
        }
        f.write_str("}")
    }
}

impl Hypervisor {
    /// The view the guest was in at this exit: `None` without a monitor (one view only).
    pub fn current_view(&self, vcpu: &mut impl Vcpu) -> Option<u16> {
        let guard = self.guard.as_ref()?;
        guard.view_of(vcpu.read(control::EPTP_FULL))
    }

    fn alert(&mut self, platform: &mut impl Platform, obs: &mut impl Observer, alert: Alert) {
        platform.log(format_args!("alert| {alert}"));
        obs.observe(Observation::Alert(alert));
    }

    /// VMFUNC exits only when the function or the index is not enabled: no view changes, the guest
    /// gets the #UD it would get without VM functions, and L0 says so.
    pub(crate) fn on_vmfunc(
        &mut self,
        vcpu: &mut impl Vcpu,
        platform: &mut impl Platform,
        obs: &mut impl Observer,
    ) -> Action {
        let regs = *vcpu.regs();
        let rip = vcpu.read(guest::RIP);
        self.alert(
            platform,
            obs,
            Alert::VmfuncRefused {
                function: regs.rax & 0xffff_ffff,
                index: regs.rcx & 0xffff_ffff,
                rip,
            },
        );
        inject_exception(vcpu, UD, None);
        Action::Resume
    }

    /// WRMSR to IA32_LSTAR (the only write-intercepted MSR L0 lets through): the first value is
    /// installed and, with a monitor, locked; a different one later is refused with #GP.
    pub(crate) fn on_lstar_write(
        &mut self,
        vcpu: &mut impl Vcpu,
        platform: &mut impl Platform,
        obs: &mut impl Observer,
        value: u64,
        instruction: Instruction,
    ) -> Action {
        let locked = self.guard.as_ref().and_then(|g| g.lstar);
        let refused = locked.is_some_and(|l| l != value);
        obs.observe(Observation::Msr {
            msr: IA32_LSTAR,
            write: true,
            faulted: refused,
        });
        match locked {
            Some(l) if refused => {
                let rip = vcpu.read(guest::RIP);
                self.alert(
                    platform,
                    obs,
                    Alert::LstarWriteRefused {
                        value,
                        locked: l,
                        rip,
                    },
                );
                inject_exception(vcpu, crate::GP, Some(0));
                return Action::Resume;
            }
            Some(_) => {}
            None => {
                let gate = self.guard.as_ref().and_then(|g| g.linux_gate);
                let installed = match gate {
                    Some(gate) => install_linux_gate(platform, &gate, value),
                    None => value,
                };
                platform.write_msr(IA32_LSTAR, installed);
                if let Some(g) = self.guard.as_mut() {
                    g.lstar = Some(value);
                    if let Some(gate) = gate.filter(|_| installed != value) {
                        g.linux_slot = gate
                            .pgd
                            .checked_add(gate.slot * 8)
                            .map(|at| (at, gate.pml4e));
                    }
                }
                // Only when the gate went in: install_linux_gate has said why when it did not.
                if gate.is_some() && installed != value {
                    platform.log(format_args!(
                        "linux: system calls now enter through the gate at {installed:#x} (the kernel's entry {value:#x})"
                    ));
                }
            }
        }
        skip_instruction(vcpu, instruction);
        Action::Resume
    }

    /// Checks every audited word (see [`Guard::audited`]); a changed one is an alert and ends the
    /// guest.
    pub(crate) fn audit_hook(
        &mut self,
        platform: &mut impl Platform,
        obs: &mut impl Observer,
    ) -> Option<Action> {
        let guard = self.guard.as_ref()?;
        let (gpa, found, expected) = guard.audited().find_map(|(gpa, expected)| {
            let mut buf = [0u8; 8];
            let found = if platform.read_phys(gpa, &mut buf) {
                u64::from_le_bytes(buf)
            } else {
                0
            };
            (found != expected).then_some((gpa, found, expected))
        })?;
        let alert = Alert::HookTampered {
            gpa,
            found,
            expected,
        };
        self.alert(platform, obs, alert);
        Some(Action::End(GuestEnd::HookTampered { gpa }))
    }

    /// Out of the box, the VMCALL of the Linux system-call stub: a system call for the monitor VM. Any
    /// other VMCALL is a hypercall. An attacker who jumps to the stub with chosen registers only
    /// reports a system call that did not happen, from the process the monitor reads itself.
    pub(crate) fn outbox_linux_syscall(
        &mut self,
        vcpu: &mut impl Vcpu,
        instruction: Instruction,
    ) -> Option<Action> {
        let site = self.guard.as_ref()?.linux_gate?.outbox_syscall?;
        if vcpu.read(guest::RIP) != site {
            return None;
        }
        let r = *vcpu.regs();
        skip_instruction(vcpu, instruction);
        Some(Action::CallMonitor {
            code: ihmi_abi::monitor::RequestCode::Syscall as u64,
            args: [r.rax, r.rdi, r.rsi, r.rdx],
            verdict_to_rax: false,
        })
    }

    /// A Linux guest's first system call, which finds the gate not yet executable (see
    /// [`crate::linux_hooks`]): installs the process-creation hook, opens the gate, and lets the
    /// SYSCALL run again. `None` for any other EPT violation.
    pub(crate) fn open_linux_gate(
        &mut self,
        vcpu: &mut impl Vcpu,
        platform: &mut impl Platform,
        gpa: Gpa,
        q: &EptViolationQualification,
    ) -> Option<Action> {
        let view = self.current_view(vcpu);
        let guard = self.guard.as_mut()?;
        let gate = guard.linux_gate?;
        let on_gate = gpa.raw() & !(PAGE_SIZE - 1) == gate.gate_page.raw();
        if guard.gate_open || !q.fetch() || !on_gate || view != Some(crate::views::GUEST_VIEW) {
            return None;
        }
        guard.gate_open = true;
        let rip = vcpu.read(guest::RIP);
        let armed = match gate.exec_hook.as_ref() {
            Some(hook) => match linux_hooks::install(platform, hook) {
                Ok(a) => {
                    platform.log(format_args!(
                        "linux: first system call (rip {rip:#x}): begin_new_exec at {:#x} now calls the process-creation trampoline at {:#x}",
                        hook.site, hook.trampoline
                    ));
                    Some(a)
                }
                Err(e) => {
                    platform.log(format_args!(
                        "linux: process creation is not monitored: {e}"
                    ));
                    None
                }
            },
            None => None,
        };
        guard.armed_hook = armed;
        for (page, perm) in linux_hooks::view_changes(gate.gate_page, armed.as_ref())
            .into_iter()
            .flatten()
        {
            if !platform.protect_guest(page, PAGE_SIZE, perm) {
                platform.log(format_args!(
                    "linux: L0 could not change the guest view at {page}"
                ));
                return None;
            }
        }
        Some(Action::Resume)
    }
}

/// Puts the gate in front of the kernel's entry `kernel_entry`: the gate page learns where to jump on,
/// the kernel's PGD (and its user half) map the gate's slot. Returns what IA32_LSTAR gets.
fn install_linux_gate(platform: &mut impl Platform, gate: &LinuxGate, kernel_entry: u64) -> u64 {
    let slot_at = |pgd: Gpa| pgd.checked_add(gate.slot * 8);
    // The slot must be free in the kernel's table (and its user half): a kernel laid out otherwise
    // keeps its own mapping and goes unmonitored, rather than losing memory to the gate.
    let mut free = true;
    for half in [0, 4096] {
        let mut entry = [0u8; 8];
        let read = gate
            .pgd
            .checked_add(half)
            .and_then(slot_at)
            .is_some_and(|at| platform.read_phys(at, &mut entry));
        free &= read && entry == [0; 8];
    }
    if !free {
        platform.log(format_args!(
            "linux: PML4 slot {} of the kernel's page table is in use; system calls are not monitored",
            gate.slot
        ));
        return kernel_entry;
    }
    let mut ok = platform.write_phys(gate.kernel_entry_slot, &kernel_entry.to_le_bytes());
    for (half, wanted) in [(0, true), (4096, gate.pti_pgd_pair)] {
        if !wanted {
            continue;
        }
        ok &= gate
            .pgd
            .checked_add(half)
            .and_then(slot_at)
            .is_some_and(|at| platform.write_phys(at, &gate.pml4e.to_le_bytes()));
    }
    if ok {
        gate.gate_entry
    } else {
        // Without the mapping, SYSCALL through the gate would fault: leave the kernel's entry, say so.
        platform.log(format_args!(
            "linux: could not install the system-call gate; system calls are not monitored"
        ));
        kernel_entry
    }
}
