//! What a scenario asks of L0 besides booting its guest: a VMCS made invalid on purpose (the two
//! entry-failure scenarios), and whether the monitor's events are printed as they are drained (a
//! benchmark counts them instead: printing thousands would dwarf what is measured).

use ihmi_abi::Scenario;
use ihmi_vmcs::fields::{control, guest};
use ihmi_vmcs::VmcsField;

/// One VMCS field L0 sets to a value VM entry must refuse, so the failure paths run for real.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmcsFault {
    /// The field and the value it gets.
    pub field: VmcsField,
    pub value: u64,
    /// Why VM entry refuses it.
    pub why: &'static str,
}

/// The fault the scenario injects: a CR3-target count above 4 is an invalid control field (SDM
/// 27.2.1.1), RFLAGS bit 1 clear is invalid guest state (SDM 27.3.1.4).
#[must_use]
pub const fn vmcs_fault(scenario: Scenario) -> Option<VmcsFault> {
    match scenario {
        Scenario::EntryBadControl => Some(VmcsFault {
            field: control::CR3_TARGET_COUNT,
            value: 5,
            why: "a CR3-target count above 4 (SDM 27.2.1.1)",
        }),
        Scenario::EntryBadGuestState => Some(VmcsFault {
            field: guest::RFLAGS,
            value: 0,
            why: "RFLAGS bit 1 clear (SDM 27.3.1.4)",
        }),
        _ => None,
    }
}

/// Whether L0 prints each event it drains from the monitor (the benchmarks, the Linux flood and the
/// NMI attack's thousands of calls only count them).
#[must_use]
pub const fn prints_events(scenario: Scenario) -> bool {
    !matches!(
        scenario,
        Scenario::Bench(_)
            | Scenario::LinuxBench(_)
            | Scenario::LinuxAttack(ihmi_abi::LinuxAttack::Flood | ihmi_abi::LinuxAttack::Nmi)
    )
}
