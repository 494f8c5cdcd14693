//! What L0 enforces at exits to protect an in-box monitor: knowing which EPT view the guest was in,
//! refusing VMFUNCs that name no view, locking the system-call entry MSR once the kernel has set it,
//! auditing the words the hooks depend on, and the alerts it raises for each.
//!
//! Most attacks never reach here: the EPT views ([`views`]) stop them in hardware and L0 sees an
//! EPT violation. This module covers the attacks that arrive as other exits, and adds the audit that
//! notices a hook whose gate pointer or mapping has changed, whatever changed it.

pub mod cr;
pub mod views;

#[cfg(test)]
mod tests;

use core::fmt;

use ihmi_addr::Gpa;
use ihmi_arch::msr::{IA32_CSTAR, IA32_LSTAR, IA32_SYSENTER_EIP};
use ihmi_arch::vector::{GP, UD};
use ihmi_ept::{Eptp, ViewId};
use ihmi_vmcs::fields::{control, guest};
use ihmi_vmcs::Instruction;

use crate::linux::gate::{LinuxGuard, Locked};
use crate::platform::read_guest_u64;
use crate::{
    inject_exception, skip_instruction, Action, GuestEnd, Hypervisor, LinuxGate, Observation,
    Observer, Platform, Vcpu,
};

/// The EPTP values of the two views, to tell from the VMCS which one the guest was in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ViewEptps {
    /// View 0, the guest's.
    pub guest: Eptp,
    /// View 1, the monitor's; none when the monitor is out of the box (a Linux guest still needs the
    /// guard for its hooks).
    pub monitor: Option<Eptp>,
}

/// L0's protection state for one guest with a monitor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Guard {
    /// The views.
    pub views: ViewEptps,
    /// Where the guest kernel keeps the gate address its hooks call, and the value it must hold.
    pub hook: Option<(Gpa, u64)>,
    /// The system-call entries the kernel installed, one per [`ENTRY_MSRS`]; later writes that change
    /// one are refused. The kernel is trusted while it boots (when it sets each once) and assumed
    /// compromised afterwards.
    entry_msrs: [Option<u64>; ENTRY_MSRS.len()],
    /// For a Linux guest: the system-call gate, and the process-creation hook it brings.
    linux: Option<LinuxGuard>,
    /// The protection bits of CR0 and CR4 pinned since the gate opened.
    pub(crate) pins: cr::CrPins,
}

impl Guard {
    /// A guard for these views; the hook is audited when given.
    #[must_use]
    pub const fn new(views: ViewEptps, hook: Option<(Gpa, u64)>) -> Self {
        Self {
            views,
            hook,
            entry_msrs: [None; ENTRY_MSRS.len()],
            linux: None,
            pins: cr::CrPins { cr0: 0, cr4: 0 },
        }
    }

    /// The same guard, for a Linux guest whose system-call gate goes in front of the kernel's entry.
    #[must_use]
    pub const fn with_linux_gate(self, gate: LinuxGate) -> Self {
        Self {
            linux: Some(LinuxGuard::new(gate)),
            ..self
        }
    }

    /// The Linux gate's state, for a Linux guest.
    #[must_use]
    pub const fn linux(&self) -> Option<&LinuxGuard> {
        self.linux.as_ref()
    }

    pub(crate) fn linux_mut(&mut self) -> Option<&mut LinuxGuard> {
        self.linux.as_mut()
    }

    /// Every word L0 audits at each exit, with the value it must hold: the test guest's gate pointer,
    /// and for Linux the gate's PML4 entry and the hook trampoline's page-directory entry.
    fn audited(&self) -> impl Iterator<Item = (Gpa, u64)> + '_ {
        self.hook
            .into_iter()
            .chain(self.linux.iter().flat_map(LinuxGuard::audited))
    }

    /// The protection bits of CR0 and CR4 L0 pinned (none before the Linux gate opens).
    #[must_use]
    pub const fn pins(&self) -> cr::CrPins {
        self.pins
    }

    /// The system-call entry the guest kernel installed, once it has.
    #[must_use]
    pub const fn kernel_lstar(&self) -> Option<u64> {
        self.entry_msrs[0]
    }

    /// The value the guest kernel installed in the entry MSR `msr` (one of [`ENTRY_MSRS`]), once it
    /// has.
    #[must_use]
    pub fn kernel_entry_msr(&self, msr: u32) -> Option<u64> {
        let i = ENTRY_MSRS.iter().position(|&m| m == msr)?;
        self.entry_msrs[i]
    }

    /// The view whose EPTP is `eptp`, if it is one of ours.
    #[must_use]
    pub fn view_of(&self, eptp: Eptp) -> Option<ViewId> {
        if eptp == self.views.guest {
            Some(views::GUEST_VIEW)
        } else if self.views.monitor == Some(eptp) {
            Some(views::MONITOR_VIEW)
        } else {
            None
        }
    }
}

/// The MSRs that hold a system-call entry point, which L0 locks once the kernel has set them: the
/// 64-bit SYSCALL entry, the SYSENTER entry, and the compatibility-mode SYSCALL entry (unused on
/// Intel CPUs, where that SYSCALL faults, but locked all the same).
pub const ENTRY_MSRS: [u32; 3] = [IA32_LSTAR, IA32_SYSENTER_EIP, IA32_CSTAR];

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
    /// WRMSR tried to move a system-call entry ([`ENTRY_MSRS`]) away from the one the kernel
    /// installed.
    EntryMsrWriteRefused {
        /// The MSR.
        msr: u32,
        /// The value the guest tried to write.
        value: u64,
        /// The locked value.
        locked: u64,
        /// Where the guest executed it.
        rip: u64,
    },
    /// A MOV to CR0 or CR4 would have cleared a protection bit L0 pinned ([`cr`]); it did not happen
    /// and the guest got #GP.
    CrPinRefused {
        /// The control register, 0 or 4.
        cr: u8,
        /// The value the guest tried to load.
        value: u64,
        /// The pinned bits it would have cleared.
        cleared: u64,
        /// Where the guest executed it.
        rip: u64,
    },
    /// A booted Linux kernel's IDTR base was not where its boot left it at an exit (an LIDT of
    /// another table, P5 in part): L0 put the boot's IDTR back.
    IdtMoved {
        /// The base L0 found, the boot's, and where the guest was at that exit.
        found: u64,
        expected: u64,
        rip: u64,
    },
    /// The guest wrote to what L0 locked when a Linux kernel's gate opened (its text, read-only
    /// data, IDT, or a page table on the gate's path); the write did not happen.
    LockedWrite { what: Locked, gpa: Gpa, rip: u64 },
    /// A VMX instruction named a region (VMXON, VMCS) in L0's or the monitor's memory: refused
    /// with VMfailInvalid.
    VmxRegionRefused {
        /// The pointer the guest gave.
        gpa: Gpa,
        /// Whose memory it is.
        region: crate::RegionKind,
        /// Where the guest executed it.
        rip: u64,
    },
    /// The in-hypervisor monitor's hook in KVM's exit path stopped firing: a whole window of exits
    /// reflected to L1 went by with no KVM exit served (`crate::nested::liveness`).
    MonitorStarved {
        /// Reflected exits in all, and KVM exits the monitor served in all.
        reflected: u64,
        served: u64,
    },
    /// VMLAUNCH or VMRESUME of a VMCS12 whose host state is not L1's live state, with Linux + KVM
    /// as L1 (`crate::nested::host_state`): refused with VMfailValid 8.
    Vmcs12HostState {
        /// The field (`HOST_RIP`), L1's value (for HOST_RIP, KVM's `vmx_vmexit`), VMCS12's.
        field: &'static str,
        expected: u64,
        found: u64,
        /// Where L1 executed the VMLAUNCH or VMRESUME.
        rip: u64,
    },
    /// VMLAUNCH or VMRESUME of a VMCS region that is no vCPU's KVM created, with the in-hypervisor
    /// monitor's registry in place (`crate::nested` P6, no rogue VMs): refused with VMfailValid 7
    /// before anything else of it is looked at.
    RogueVmcs {
        /// The region (VMCS12's guest-physical address).
        gpa: Gpa,
        /// VMLAUNCH (else VMRESUME).
        launch: bool,
        /// Where L1 executed it.
        rip: u64,
    },
    /// VMLAUNCH or VMRESUME of a VMCS12 with an address the entry would use (a bitmap, an MSR
    /// area, EPT12's root) in L0's or the monitor's memory: refused with VMfailValid 7.
    VmxPointerRefused {
        gpa: Gpa,
        region: crate::RegionKind,
        rip: u64,
    },
    /// L1's EPT12 maps a page of L2's onto L0's or the monitor's memory: nothing was mapped, and
    /// the guest is stopped.
    Ept12MappingRefused {
        /// L2's page, and the L1-physical page EPT12 names for it.
        l2: Gpa,
        l1: Gpa,
        region: crate::RegionKind,
    },
    /// A word the hooks depend on no longer holds what L0 put there.
    HookTampered {
        /// Where the word lives.
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
            Self::EntryMsrWriteRefused { .. } => "entry-msr-write-refused",
            Self::HookTampered { .. } => "hook-tampered",
            Self::LockedWrite { .. } => "locked-write",
            Self::CrPinRefused { .. } => "cr-pin-refused",
            Self::IdtMoved { .. } => "idt-moved",
            Self::VmxRegionRefused { .. } => "vmx-region-refused",
            Self::VmxPointerRefused { .. } => "vmx-pointer-refused",
            Self::Vmcs12HostState { .. } => "vmcs12-host-state",
            Self::RogueVmcs { .. } => "rogue-vmcs",
            Self::MonitorStarved { .. } => "monitor-starved",
            Self::Ept12MappingRefused { .. } => "ept12-mapping-refused",
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
            Self::EntryMsrWriteRefused {
                msr,
                value,
                locked,
                rip,
            } => write!(
                f,
                ",\"msr\":\"{msr:#x}\",\"value\":\"{value:#x}\",\"locked\":\"{locked:#x}\",\"rip\":\"{rip:#x}\",\"action\":\"#GP injected\""
            )?,
            Self::CrPinRefused {
                cr,
                value,
                cleared,
                rip,
            } => write!(
                f,
                ",\"cr\":{cr},\"value\":\"{value:#x}\",\"cleared\":\"{}\",\"rip\":\"{rip:#x}\",\"action\":\"#GP injected\"",
                cr::PinNames { cr, bits: cleared }
            )?,
            Self::IdtMoved {
                found,
                expected,
                rip,
            } => write!(
                f,
                ",\"found\":\"{found:#x}\",\"expected\":\"{expected:#x}\",\"rip\":\"{rip:#x}\",\"action\":\"restored\""
            )?,
            Self::LockedWrite { what, gpa, rip } => write!(
                f,
                ",\"what\":\"{}\",\"gpa\":\"{gpa}\",\"rip\":\"{rip:#x}\",\"action\":\"write refused, guest stopped\"",
                what.name()
            )?,
            Self::VmxRegionRefused { gpa, region, rip } => write!(
                f,
                ",\"gpa\":\"{gpa}\",\"region\":\"{}\",\"rip\":\"{rip:#x}\",\"action\":\"VMfailInvalid\"",
                region.name()
            )?,
            Self::VmxPointerRefused { gpa, region, rip } => write!(
                f,
                ",\"gpa\":\"{gpa}\",\"region\":\"{}\",\"rip\":\"{rip:#x}\",\"action\":\"VMfailValid(7)\"",
                region.name()
            )?,
            Self::MonitorStarved { reflected, served } => write!(
                f,
                ",\"reflected\":{reflected},\"served\":{served},\"window\":{},\"action\":\"reported\"",
                crate::nested::liveness::WINDOW
            )?,
            Self::Vmcs12HostState {
                field,
                expected,
                found,
                rip,
            } => write!(
                f,
                ",\"field\":\"{field}\",\"expected\":\"{expected:#x}\",\"found\":\"{found:#x}\",\"rip\":\"{rip:#x}\",\"action\":\"VMfailValid(8)\""
            )?,
            Self::RogueVmcs { gpa, launch, rip } => write!(
                f,
                ",\"gpa\":\"{gpa}\",\"instruction\":\"{}\",\"rip\":\"{rip:#x}\",\"action\":\"VMfailValid(7)\"",
                if launch { "VMLAUNCH" } else { "VMRESUME" }
            )?,
            Self::Ept12MappingRefused { l2, l1, region } => write!(
                f,
                ",\"l2\":\"{l2}\",\"l1\":\"{l1}\",\"region\":\"{}\",\"action\":\"not mapped, guest stopped\"",
                region.name()
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
    pub fn current_view(&self, vcpu: &mut impl Vcpu) -> Option<ViewId> {
        let guard = self.guard.as_ref()?;
        guard.view_of(Eptp::from_raw(vcpu.read(control::EPTP_FULL)))
    }

    pub(crate) fn alert(
        &mut self,
        platform: &mut impl Platform,
        obs: &mut impl Observer,
        alert: Alert,
    ) {
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

    /// WRMSR to a system-call entry MSR ([`ENTRY_MSRS`], the only write-intercepted MSRs L0 lets
    /// through): a non-canonical value gets the #GP the CPU would give; the first value is installed
    /// (behind the Linux gate, when there is one: LSTAR and SYSENTER_EIP) and, with a monitor, locked;
    /// a different one later is refused with #GP.
    pub(crate) fn on_entry_msr_write(
        &mut self,
        vcpu: &mut impl Vcpu,
        platform: &mut impl Platform,
        obs: &mut impl Observer,
        msr: u32,
        value: u64,
        instruction: Instruction,
    ) -> Action {
        let index = ENTRY_MSRS.iter().position(|&m| m == msr);
        let locked = self
            .guard
            .as_ref()
            .zip(index)
            .and_then(|(g, i)| g.entry_msrs[i]);
        let canonical = ihmi_arch::is_canonical(value);
        // A guest hypervisor in VMX operation sets its guest's LSTAR and CSTAR: L2's values, which
        // the CPU holds only while L2 runs; L1's own stay locked (NESTED.md A.2.9). (L2's own
        // accesses that L1 lets through never come here: `l2_entry_msr`.)
        let l2_slot = crate::nested::vmx::L2_ENTRY_MSRS
            .iter()
            .position(|&m| m == msr)
            .zip(self.nested.as_mut())
            .filter(|(_, n)| n.vmxon_region().is_some() && locked.is_some() && canonical);
        if let Some((i, n)) = l2_slot {
            n.l2_entry_msrs[i] = (locked != Some(value)).then_some(value);
            // L2's own value, or L1's locked one back (KVM on its way to user space).
            obs.observe(if locked == Some(value) {
                Observation::Msr {
                    msr,
                    write: true,
                    faulted: false,
                }
            } else {
                Observation::L2EntryMsr { msr }
            });
            skip_instruction(vcpu, instruction);
            return Action::Resume;
        }
        let refused = locked.is_some_and(|l| l != value);
        obs.observe(Observation::Msr {
            msr,
            write: true,
            faulted: refused || !canonical,
        });
        if !canonical {
            // The CPU refuses a non-canonical address in these MSRs (SDM Vol. 4; WRMSR #GP); L0 must
            // not try to install one itself.
            inject_exception(vcpu, GP, Some(0));
            return Action::Resume;
        }
        match locked {
            Some(l) if refused => {
                let rip = vcpu.read(guest::RIP);
                self.alert(
                    platform,
                    obs,
                    Alert::EntryMsrWriteRefused {
                        msr,
                        value,
                        locked: l,
                        rip,
                    },
                );
                inject_exception(vcpu, GP, Some(0));
                return Action::Resume;
            }
            Some(_) => {}
            None => {
                let linux = self.guard.as_mut().and_then(Guard::linux_mut);
                let installed = match (msr, linux) {
                    (IA32_LSTAR, Some(l)) => l.install(platform, value),
                    (IA32_SYSENTER_EIP, Some(l)) => l.install_sysenter(platform, value),
                    _ => value,
                };
                // SYSENTER_EIP lives in the VMCS's guest state; the others are the CPU's own MSRs,
                // which L0 does not use.
                if msr == IA32_SYSENTER_EIP {
                    vcpu.write(guest::IA32_SYSENTER_EIP, installed);
                } else {
                    platform.write_msr(msr, installed);
                }
                if let Some((g, i)) = self.guard.as_mut().zip(index) {
                    g.entry_msrs[i] = Some(value);
                }
            }
        }
        skip_instruction(vcpu, instruction);
        Action::Resume
    }

    /// Checks every audited word (see [`Guard::audited`]), and for a Linux guest in its own view the
    /// gate's slot in the PGD it runs on; a changed one, or one L0 cannot read any more, is an alert
    /// and ends the guest.
    pub(crate) fn audit(
        &mut self,
        vcpu: &mut impl Vcpu,
        platform: &mut impl Platform,
        obs: &mut impl Observer,
    ) -> Option<Action> {
        let in_guest_view = self.current_view(vcpu) == Some(views::GUEST_VIEW)
            || self.guard.as_ref()?.views.monitor.is_none();
        let cr3 = vcpu.read(guest::CR3);
        let guard = self.guard.as_ref()?;
        let running = guard
            .linux
            .iter()
            .filter(|_| in_guest_view)
            .flat_map(|l| l.running_slots(cr3));
        let (gpa, found, expected) =
            guard.audited().chain(running).find_map(|(gpa, expected)| {
                // An unreadable word cannot be vouched for: it counts as changed.
                let found = read_guest_u64(platform, gpa).unwrap_or(!expected);
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
}
