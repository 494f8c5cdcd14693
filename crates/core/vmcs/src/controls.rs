//! VMX control fields (SDM 25.6 "VM-Execution Control Fields", 25.7 "VM-Exit Control Fields", 25.8
//! "VM-Entry Control Fields") and their adjustment against the capability MSRs (SDM Appendix A.3-A.5).
//!
//! The flag values are taken from the `x86` crate's `x86::vmx::vmcs::control` bitflags. The types are
//! declared here (with bitflags 2) rather than re-exported because the `x86` types (bitflags 1) cannot
//! hold bits they do not name without `unsafe`, and the default1 class of reserved bits (SDM A.2) must
//! survive adjustment or VM entry fails with "invalid control field(s)".

use core::fmt;

use bitflags::bitflags;
use x86::vmx::vmcs::control as x86c;

bitflags! {
    /// Pin-based VM-execution controls (SDM 25.6.1, table "Definitions of Pin-Based VM-Execution
    /// Controls"). Unnamed bits are kept, so a value from [`adjust_pinbased`] can be written as is.
    ///
    /// [`adjust_pinbased`]: crate::VmxCapabilities::adjust_pinbased
    #[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
    pub struct PinbasedControls: u32 {
        /// External-interrupt exiting.
        const EXTERNAL_INTERRUPT_EXITING = x86c::PinbasedControls::EXTERNAL_INTERRUPT_EXITING.bits();
        /// NMI exiting.
        const NMI_EXITING = x86c::PinbasedControls::NMI_EXITING.bits();
        /// Virtual NMIs.
        const VIRTUAL_NMIS = x86c::PinbasedControls::VIRTUAL_NMIS.bits();
        /// Activate VMX-preemption timer.
        const VMX_PREEMPTION_TIMER = x86c::PinbasedControls::VMX_PREEMPTION_TIMER.bits();
        /// Process posted interrupts.
        const POSTED_INTERRUPTS = x86c::PinbasedControls::POSTED_INTERRUPTS.bits();
        const _ = !0;
    }
}

bitflags! {
    /// Primary processor-based VM-execution controls (SDM 25.6.2, table "Definitions of Primary
    /// Processor-Based VM-Execution Controls"). Unnamed bits are kept.
    #[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
    pub struct PrimaryControls: u32 {
        /// Interrupt-window exiting.
        const INTERRUPT_WINDOW_EXITING = x86c::PrimaryControls::INTERRUPT_WINDOW_EXITING.bits();
        /// Use TSC offsetting.
        const USE_TSC_OFFSETTING = x86c::PrimaryControls::USE_TSC_OFFSETTING.bits();
        /// HLT exiting.
        const HLT_EXITING = x86c::PrimaryControls::HLT_EXITING.bits();
        /// INVLPG exiting.
        const INVLPG_EXITING = x86c::PrimaryControls::INVLPG_EXITING.bits();
        /// MWAIT exiting.
        const MWAIT_EXITING = x86c::PrimaryControls::MWAIT_EXITING.bits();
        /// RDPMC exiting.
        const RDPMC_EXITING = x86c::PrimaryControls::RDPMC_EXITING.bits();
        /// RDTSC exiting.
        const RDTSC_EXITING = x86c::PrimaryControls::RDTSC_EXITING.bits();
        /// CR3-load exiting.
        const CR3_LOAD_EXITING = x86c::PrimaryControls::CR3_LOAD_EXITING.bits();
        /// CR3-store exiting.
        const CR3_STORE_EXITING = x86c::PrimaryControls::CR3_STORE_EXITING.bits();
        /// CR8-load exiting.
        const CR8_LOAD_EXITING = x86c::PrimaryControls::CR8_LOAD_EXITING.bits();
        /// CR8-store exiting.
        const CR8_STORE_EXITING = x86c::PrimaryControls::CR8_STORE_EXITING.bits();
        /// Use TPR shadow.
        const USE_TPR_SHADOW = x86c::PrimaryControls::USE_TPR_SHADOW.bits();
        /// NMI-window exiting.
        const NMI_WINDOW_EXITING = x86c::PrimaryControls::NMI_WINDOW_EXITING.bits();
        /// MOV-DR exiting.
        const MOV_DR_EXITING = x86c::PrimaryControls::MOV_DR_EXITING.bits();
        /// Unconditional I/O exiting.
        const UNCOND_IO_EXITING = x86c::PrimaryControls::UNCOND_IO_EXITING.bits();
        /// Use I/O bitmaps.
        const USE_IO_BITMAPS = x86c::PrimaryControls::USE_IO_BITMAPS.bits();
        /// Monitor trap flag.
        const MONITOR_TRAP_FLAG = x86c::PrimaryControls::MONITOR_TRAP_FLAG.bits();
        /// Use MSR bitmaps.
        const USE_MSR_BITMAPS = x86c::PrimaryControls::USE_MSR_BITMAPS.bits();
        /// MONITOR exiting.
        const MONITOR_EXITING = x86c::PrimaryControls::MONITOR_EXITING.bits();
        /// PAUSE exiting.
        const PAUSE_EXITING = x86c::PrimaryControls::PAUSE_EXITING.bits();
        /// Activate secondary controls.
        const SECONDARY_CONTROLS = x86c::PrimaryControls::SECONDARY_CONTROLS.bits();
        const _ = !0;
    }
}

bitflags! {
    /// Secondary processor-based VM-execution controls (SDM 25.6.2, table "Definitions of Secondary
    /// Processor-Based VM-Execution Controls"). Unnamed bits are kept.
    #[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
    pub struct SecondaryControls: u32 {
        /// Virtualize APIC accesses.
        const VIRTUALIZE_APIC = x86c::SecondaryControls::VIRTUALIZE_APIC.bits();
        /// Enable EPT.
        const ENABLE_EPT = x86c::SecondaryControls::ENABLE_EPT.bits();
        /// Descriptor-table exiting.
        const DTABLE_EXITING = x86c::SecondaryControls::DTABLE_EXITING.bits();
        /// Enable RDTSCP.
        const ENABLE_RDTSCP = x86c::SecondaryControls::ENABLE_RDTSCP.bits();
        /// Virtualize x2APIC mode.
        const VIRTUALIZE_X2APIC = x86c::SecondaryControls::VIRTUALIZE_X2APIC.bits();
        /// Enable VPID.
        const ENABLE_VPID = x86c::SecondaryControls::ENABLE_VPID.bits();
        /// WBINVD exiting.
        const WBINVD_EXITING = x86c::SecondaryControls::WBINVD_EXITING.bits();
        /// Unrestricted guest.
        const UNRESTRICTED_GUEST = x86c::SecondaryControls::UNRESTRICTED_GUEST.bits();
        /// APIC-register virtualization.
        const VIRTUALIZE_APIC_REGISTER = x86c::SecondaryControls::VIRTUALIZE_APIC_REGISTER.bits();
        /// Virtual-interrupt delivery.
        const VIRTUAL_INTERRUPT_DELIVERY = x86c::SecondaryControls::VIRTUAL_INTERRUPT_DELIVERY.bits();
        /// PAUSE-loop exiting.
        const PAUSE_LOOP_EXITING = x86c::SecondaryControls::PAUSE_LOOP_EXITING.bits();
        /// RDRAND exiting.
        const RDRAND_EXITING = x86c::SecondaryControls::RDRAND_EXITING.bits();
        /// Enable INVPCID.
        const ENABLE_INVPCID = x86c::SecondaryControls::ENABLE_INVPCID.bits();
        /// Enable VM functions.
        const ENABLE_VM_FUNCTIONS = x86c::SecondaryControls::ENABLE_VM_FUNCTIONS.bits();
        /// VMCS shadowing.
        const VMCS_SHADOWING = x86c::SecondaryControls::VMCS_SHADOWING.bits();
        /// Enable ENCLS exiting.
        const ENCLS_EXITING = x86c::SecondaryControls::ENCLS_EXITING.bits();
        /// RDSEED exiting.
        const RDSEED_EXITING = x86c::SecondaryControls::RDSEED_EXITING.bits();
        /// Enable PML.
        const ENABLE_PML = x86c::SecondaryControls::ENABLE_PML.bits();
        /// EPT-violation #VE.
        const EPT_VIOLATION_VE = x86c::SecondaryControls::EPT_VIOLATION_VE.bits();
        /// Conceal VMX from PT.
        const CONCEAL_VMX_FROM_PT = x86c::SecondaryControls::CONCEAL_VMX_FROM_PT.bits();
        /// Enable XSAVES/XRSTORS.
        const ENABLE_XSAVES_XRSTORS = x86c::SecondaryControls::ENABLE_XSAVES_XRSTORS.bits();
        /// Mode-based execute control for EPT.
        const MODE_BASED_EPT = x86c::SecondaryControls::MODE_BASED_EPT.bits();
        /// Sub-page write permissions for EPT.
        const SUB_PAGE_EPT = x86c::SecondaryControls::SUB_PAGE_EPT.bits();
        /// Intel PT uses guest physical addresses.
        const INTEL_PT_GUEST_PHYSICAL = x86c::SecondaryControls::INTEL_PT_GUEST_PHYSICAL.bits();
        /// Use TSC scaling.
        const USE_TSC_SCALING = x86c::SecondaryControls::USE_TSC_SCALING.bits();
        /// Enable user wait and pause.
        const ENABLE_USER_WAIT_PAUSE = x86c::SecondaryControls::ENABLE_USER_WAIT_PAUSE.bits();
        /// Enable ENCLV exiting.
        const ENCLV_EXITING = x86c::SecondaryControls::ENCLV_EXITING.bits();
        const _ = !0;
    }
}

bitflags! {
    /// VM-exit controls (SDM 25.7.1, table "Definitions of Primary VM-Exit Controls"). Unnamed bits are
    /// kept.
    #[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
    pub struct ExitControls: u32 {
        /// Save debug controls.
        const SAVE_DEBUG_CONTROLS = x86c::ExitControls::SAVE_DEBUG_CONTROLS.bits();
        /// Host address-space size (64-bit host).
        const HOST_ADDRESS_SPACE_SIZE = x86c::ExitControls::HOST_ADDRESS_SPACE_SIZE.bits();
        /// Load IA32_PERF_GLOBAL_CTRL.
        const LOAD_IA32_PERF_GLOBAL_CTRL = x86c::ExitControls::LOAD_IA32_PERF_GLOBAL_CTRL.bits();
        /// Acknowledge interrupt on exit.
        const ACK_INTERRUPT_ON_EXIT = x86c::ExitControls::ACK_INTERRUPT_ON_EXIT.bits();
        /// Save IA32_PAT.
        const SAVE_IA32_PAT = x86c::ExitControls::SAVE_IA32_PAT.bits();
        /// Load IA32_PAT.
        const LOAD_IA32_PAT = x86c::ExitControls::LOAD_IA32_PAT.bits();
        /// Save IA32_EFER.
        const SAVE_IA32_EFER = x86c::ExitControls::SAVE_IA32_EFER.bits();
        /// Load IA32_EFER.
        const LOAD_IA32_EFER = x86c::ExitControls::LOAD_IA32_EFER.bits();
        /// Save VMX-preemption timer value.
        const SAVE_VMX_PREEMPTION_TIMER = x86c::ExitControls::SAVE_VMX_PREEMPTION_TIMER.bits();
        /// Clear IA32_BNDCFGS.
        const CLEAR_IA32_BNDCFGS = x86c::ExitControls::CLEAR_IA32_BNDCFGS.bits();
        /// Conceal VMX from PT.
        const CONCEAL_VMX_FROM_PT = x86c::ExitControls::CONCEAL_VMX_FROM_PT.bits();
        /// Clear IA32_RTIT_CTL.
        const CLEAR_IA32_RTIT_CTL = x86c::ExitControls::CLEAR_IA32_RTIT_CTL.bits();
        const _ = !0;
    }
}

bitflags! {
    /// VM-entry controls (SDM 25.8.1, table "Definitions of VM-Entry Controls"). Unnamed bits are kept.
    #[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
    pub struct EntryControls: u32 {
        /// Load debug controls.
        const LOAD_DEBUG_CONTROLS = x86c::EntryControls::LOAD_DEBUG_CONTROLS.bits();
        /// IA-32e mode guest.
        const IA32E_MODE_GUEST = x86c::EntryControls::IA32E_MODE_GUEST.bits();
        /// Entry to SMM.
        const ENTRY_TO_SMM = x86c::EntryControls::ENTRY_TO_SMM.bits();
        /// Deactivate dual-monitor treatment.
        const DEACTIVATE_DUAL_MONITOR = x86c::EntryControls::DEACTIVATE_DUAL_MONITOR.bits();
        /// Load IA32_PERF_GLOBAL_CTRL.
        const LOAD_IA32_PERF_GLOBAL_CTRL = x86c::EntryControls::LOAD_IA32_PERF_GLOBAL_CTRL.bits();
        /// Load IA32_PAT.
        const LOAD_IA32_PAT = x86c::EntryControls::LOAD_IA32_PAT.bits();
        /// Load IA32_EFER.
        const LOAD_IA32_EFER = x86c::EntryControls::LOAD_IA32_EFER.bits();
        /// Load IA32_BNDCFGS.
        const LOAD_IA32_BNDCFGS = x86c::EntryControls::LOAD_IA32_BNDCFGS.bits();
        /// Conceal VMX from PT.
        const CONCEAL_VMX_FROM_PT = x86c::EntryControls::CONCEAL_VMX_FROM_PT.bits();
        /// Load IA32_RTIT_CTL.
        const LOAD_IA32_RTIT_CTL = x86c::EntryControls::LOAD_IA32_RTIT_CTL.bits();
        const _ = !0;
    }
}

bitflags! {
    /// VM-function controls (SDM 25.6.14 "VM-Function Controls"), a 64-bit field.
    #[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
    pub struct VmFuncControls: u64 {
        /// VM function 0: EPTP switching.
        const EPTP_SWITCHING = 1;
        const _ = !0;
    }
}

macro_rules! from_x86 {
    ($($ty:ident),*) => {$(
        impl From<x86c::$ty> for $ty {
            fn from(value: x86c::$ty) -> Self {
                Self::from_bits_retain(value.bits())
            }
        }
    )*};
}
from_x86!(
    PinbasedControls,
    PrimaryControls,
    SecondaryControls,
    ExitControls,
    EntryControls
);

/// Which control field a [`ControlError`] is about.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum ControlKind {
    /// Pin-based VM-execution controls.
    Pinbased,
    /// Primary processor-based VM-execution controls.
    Primary,
    /// Secondary processor-based VM-execution controls.
    Secondary,
    /// VM-exit controls.
    Exit,
    /// VM-entry controls.
    Entry,
    /// VM-function controls.
    VmFunc,
}

impl fmt::Display for ControlKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Pinbased => "pin-based VM-execution",
            Self::Primary => "primary processor-based VM-execution",
            Self::Secondary => "secondary processor-based VM-execution",
            Self::Exit => "VM-exit",
            Self::Entry => "VM-entry",
            Self::VmFunc => "VM-function",
        })
    }
}

/// Required control bits that this processor does not allow to be 1 (SDM Appendix A.3-A.5, A.11).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub struct ControlError {
    /// The control field.
    pub kind: ControlKind,
    /// The required bits whose allowed-1 setting is 0.
    pub missing: u64,
}

impl fmt::Display for ControlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} controls: required bits {:#x} are not supported by this processor",
            self.kind, self.missing
        )
    }
}

/// Adjusts a 32-bit control value against a capability MSR (SDM Appendix A.3-A.5).
///
/// Bits 31:0 of `cap_msr` are the allowed-0 settings (a 1 means the control must be 1); bits 63:32 are
/// the allowed-1 settings (a 0 means the control must be 0). The result has every must-be-one bit, every
/// `required` bit and the `optional` bits that may be 1. `Err` holds the `required` bits that may not be
/// 1.
pub const fn adjust_controls(cap_msr: u64, required: u32, optional: u32) -> Result<u32, u32> {
    let must_be_one = cap_msr as u32;
    let may_be_one = (cap_msr >> 32) as u32;
    let missing = required & !may_be_one;
    if missing != 0 {
        return Err(missing);
    }
    Ok(must_be_one | required | (optional & may_be_one))
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn cap(allowed0: u32, allowed1: u32) -> u64 {
        (allowed1 as u64) << 32 | allowed0 as u64
    }

    #[test]
    fn must_be_one_bits_are_forced() {
        assert_eq!(adjust_controls(cap(0x16, 0x7F), 0, 0), Ok(0x16));
        assert_eq!(adjust_controls(cap(0x16, 0x7F), 0x8, 0), Ok(0x1E));
    }

    #[test]
    fn required_but_not_allowed_names_the_bits() {
        assert_eq!(adjust_controls(cap(0, 0x0F), 0x31, 0), Err(0x30));
    }

    #[test]
    fn optional_bits_dropped_where_not_allowed() {
        assert_eq!(adjust_controls(cap(0, 0x0F), 0x1, 0xF0 | 0x4), Ok(0x5));
    }

    #[test]
    fn flags_match_x86_and_keep_unnamed_bits() {
        assert_eq!(PinbasedControls::NMI_EXITING.bits(), 1 << 3);
        assert_eq!(PrimaryControls::SECONDARY_CONTROLS.bits(), 1 << 31);
        assert_eq!(SecondaryControls::ENABLE_EPT.bits(), 1 << 1);
        assert_eq!(ExitControls::HOST_ADDRESS_SPACE_SIZE.bits(), 1 << 9);
        assert_eq!(EntryControls::IA32E_MODE_GUEST.bits(), 1 << 9);
        // Bits 1, 2 and 4 are default1 reserved bits (SDM A.3.1): they must survive.
        assert_eq!(PinbasedControls::from_bits_retain(0x16).bits(), 0x16);
        let from_x86: PrimaryControls = x86c::PrimaryControls::HLT_EXITING.into();
        assert_eq!(from_x86, PrimaryControls::HLT_EXITING);
    }

    #[test]
    fn error_display_names_kind_and_bits() {
        let e = ControlError {
            kind: ControlKind::Secondary,
            missing: 0x2,
        };
        assert_eq!(
            std::format!("{e}"),
            "secondary processor-based VM-execution controls: required bits 0x2 are not supported by this processor"
        );
    }
}
