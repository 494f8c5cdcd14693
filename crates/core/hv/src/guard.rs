//! What L0 enforces at exits to protect an in-box monitor: knowing which EPT view the guest was in,
//! refusing VMFUNCs that name no view, locking the system-call entry MSR once the kernel has set it,
//! auditing the hooks' gate pointer, and the alerts it raises for each.
//!
//! Most attacks never reach here: the EPT views stop them in hardware and L0 sees an EPT violation.
//! This module covers the attacks that arrive as other exits, and adds the audit that notices a hook
//! whose gate pointer has changed, whatever changed it.

use core::fmt;

use ihmi_addr::Gpa;
use ihmi_vmcs::fields::{control, guest};

use crate::{inject_exception, skip_instruction, Action, GuestEnd, Hypervisor, Platform, Vcpu};

/// IA32_LSTAR, the 64-bit SYSCALL entry point (SDM Vol. 4, Table 2-2).
pub const IA32_LSTAR: u32 = 0xc000_0082;
/// Invalid-opcode exception vector.
const UD: u8 = 6;

/// The EPTP values of the two views, to tell from the VMCS which one the guest was in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ViewEptps {
    /// View 0, the guest's.
    pub guest: u64,
    /// View 1, the monitor's.
    pub monitor: u64,
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
}

impl Guard {
    /// A guard for these views; the hook is audited when given.
    #[must_use]
    pub const fn new(views: ViewEptps, hook: Option<(Gpa, u64)>) -> Self {
        Self {
            views,
            hook,
            lstar: None,
        }
    }

    /// The view whose EPTP is `eptp`, if it is one of ours.
    #[must_use]
    pub const fn view_of(&self, eptp: u64) -> Option<u16> {
        if eptp == self.views.guest {
            Some(crate::views::GUEST_VIEW)
        } else if eptp == self.views.monitor {
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

    fn alert(&mut self, platform: &mut impl Platform, alert: Alert) {
        platform.log(format_args!("alert| {alert}"));
        self.log.record_alert(alert);
    }

    /// VMFUNC exits only when the function or the index is not enabled: no view changes, the guest
    /// gets the #UD it would get without VM functions, and L0 says so.
    pub(crate) fn on_vmfunc(
        &mut self,
        vcpu: &mut impl Vcpu,
        platform: &mut impl Platform,
    ) -> Action {
        let regs = *vcpu.regs();
        let rip = vcpu.read(guest::RIP);
        self.alert(
            platform,
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
        value: u64,
    ) -> Action {
        let locked = self.guard.as_ref().and_then(|g| g.lstar);
        match locked {
            Some(l) if l != value => {
                let rip = vcpu.read(guest::RIP);
                self.alert(
                    platform,
                    Alert::LstarWriteRefused {
                        value,
                        locked: l,
                        rip,
                    },
                );
                self.log.injected_gp += 1;
                inject_exception(vcpu, crate::GP, Some(0));
                return Action::Resume;
            }
            Some(_) => {}
            None => {
                platform.write_msr(IA32_LSTAR, value);
                if let Some(g) = self.guard.as_mut() {
                    g.lstar = Some(value);
                }
            }
        }
        skip_instruction(vcpu);
        Action::Resume
    }

    /// Checks the hooks' gate pointer; a changed pointer is an alert and ends the guest.
    pub(crate) fn audit_hook(&mut self, platform: &mut impl Platform) -> Option<Action> {
        let (gpa, expected) = self.guard.as_ref()?.hook?;
        let mut buf = [0u8; 8];
        let found = if platform.read_phys(gpa, &mut buf) {
            u64::from_le_bytes(buf)
        } else {
            0
        };
        if found == expected {
            return None;
        }
        let alert = Alert::HookTampered {
            gpa,
            found,
            expected,
        };
        self.alert(platform, alert);
        Some(Action::End(GuestEnd::HookTampered { gpa }))
    }
}
