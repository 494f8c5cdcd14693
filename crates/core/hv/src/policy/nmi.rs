//! NMIs, which L0 takes itself while a monitor is present (NMI exiting with virtual NMIs, SDM 25.6.1
//! and 26.3): an NMI must never be delivered while the guest is in the monitor's view, where the
//! kernel's handler is neither executable (view 1 maps the guest non-executable) nor mapped (the gate
//! runs on the monitor's CR3), so the guest would fault its way to a triple fault. L0 holds it and
//! injects it once the guest is back in its own view and can take an NMI; until then the
//! VMX-preemption timer makes the guest exit every [`NMI_POLL_TIMER`] timer ticks so L0 can look
//! again. At most one NMI waits: one arriving while another waits is merged into it, as the CPU
//! itself latches only one (SDM 6.7.1).
//!
//! NMIs L0 takes while it runs (in VMX root operation, or while the out-of-box monitor VM runs) reach
//! the guest the same way: the platform hands them over ([`crate::Platform::take_nmi`]).

use ihmi_ept::ViewId;
use ihmi_vmcs::fields::{control, guest};
use ihmi_vmcs::{InterruptionInfo, Vectored};

use crate::guard::views::MONITOR_VIEW;
use crate::{Hypervisor, Observation, Observer, Platform, Vcpu};

/// The VMX-preemption timer value (in timer ticks, the TSC divided by the CPU's rate) while an NMI
/// waits: short enough that a held NMI reaches the guest a few hundred instructions after it leaves
/// the monitor's view, long enough that the guest makes progress between two looks.
pub const NMI_POLL_TIMER: u64 = 64;

/// Guest interruptibility (SDM 25.4.2, Table 25-3): blocking by STI, by MOV SS, and (virtual-)NMI
/// blocking. NMI injection needs the last two clear; some CPUs also refuse it under STI blocking, so L0
/// waits for all three.
const BLOCKS_NMI: u64 = 0b1011;

/// What happened to the NMIs of one run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NmiCounts {
    /// NMIs L0 took, from the guest or while it ran itself.
    pub taken: u64,
    /// Of those, the ones that found the guest in the monitor's view.
    pub in_monitor_view: u64,
    /// Of those, the ones merged into an NMI that was already waiting.
    pub merged: u64,
    /// NMIs injected into the guest.
    pub delivered: u64,
}

/// L0's NMI state for one guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct NmiState {
    /// An NMI waits for the guest.
    pending: bool,
    /// The VMX-preemption timer value L0 set before it started polling, restored when the NMI is
    /// delivered.
    saved_timer: Option<u64>,
    counts: NmiCounts,
}

impl Hypervisor {
    /// What happened to the NMIs so far.
    #[must_use]
    pub const fn nmi_counts(&self) -> NmiCounts {
        self.nmi.counts
    }

    /// An NMI exit: the NMI waits for the guest. An event whose delivery the NMI interrupted is
    /// re-injected first, as it would have been delivered.
    pub(crate) fn on_nmi_exit(
        &mut self,
        vcpu: &mut impl Vcpu,
        platform: &mut impl Platform,
        obs: &mut impl Observer,
        vectoring: Option<Vectored>,
    ) {
        platform.unblock_nmis();
        if let Some(event) = vectoring {
            if let Some(code) = event.error_code {
                vcpu.write(control::VMENTRY_EXCEPTION_ERR_CODE, u64::from(code));
            }
            if event.instruction_len != 0 {
                vcpu.write(control::VMENTRY_INSTRUCTION_LEN, event.instruction_len);
            }
            // Bit 12 is undefined in the IDT-vectoring information and reserved at entry.
            let info = event.info.raw() & !(1 << 12);
            vcpu.write(control::VMENTRY_INTERRUPTION_INFO_FIELD, u64::from(info));
        }
        let view = self.current_view(vcpu);
        self.nmi_arrived(view, obs);
    }

    fn nmi_arrived(&mut self, view: Option<ViewId>, obs: &mut impl Observer) {
        let in_monitor_view = view == Some(MONITOR_VIEW);
        let merged = self.nmi.pending;
        self.nmi.pending = true;
        let c = &mut self.nmi.counts;
        c.taken += 1;
        c.in_monitor_view += u64::from(in_monitor_view);
        c.merged += u64::from(merged);
        obs.observe(Observation::NmiTaken {
            in_monitor_view,
            merged,
        });
    }

    /// Before the guest runs again: takes over an NMI L0 took while it ran, and delivers the waiting
    /// NMI if the guest can take it now (its own view, no NMI blocking, nothing else being injected);
    /// otherwise has the timer bring the guest back soon to try again.
    pub(crate) fn deliver_nmi(
        &mut self,
        vcpu: &mut impl Vcpu,
        platform: &mut impl Platform,
        obs: &mut impl Observer,
    ) {
        if platform.take_nmi() {
            let view = self.current_view(vcpu);
            self.nmi_arrived(view, obs);
        }
        if !self.nmi.pending {
            return;
        }
        let in_monitor_view = self.current_view(vcpu) == Some(MONITOR_VIEW);
        let blocked = vcpu.read(guest::INTERRUPTIBILITY_STATE) & BLOCKS_NMI != 0;
        // Every VM exit clears the field's valid bit (SDM 28.2): set now, it holds what a handler of
        // this exit injects, and only one event goes in per entry.
        let injecting =
            InterruptionInfo::from_raw(vcpu.read(control::VMENTRY_INTERRUPTION_INFO_FIELD) as u32)
                .valid();
        if in_monitor_view || blocked || injecting {
            if self.nmi.saved_timer.is_none() {
                self.nmi.saved_timer = Some(vcpu.read(guest::VMX_PREEMPTION_TIMER_VALUE));
                vcpu.write(guest::VMX_PREEMPTION_TIMER_VALUE, NMI_POLL_TIMER);
            }
            return;
        }
        vcpu.write(
            control::VMENTRY_INTERRUPTION_INFO_FIELD,
            u64::from(InterruptionInfo::nmi().raw()),
        );
        if let Some(t) = self.nmi.saved_timer.take() {
            vcpu.write(guest::VMX_PREEMPTION_TIMER_VALUE, t);
        }
        self.nmi.pending = false;
        self.nmi.counts.delivered += 1;
        obs.observe(Observation::NmiDelivered);
    }
}
