//! VM-instruction errors (SDM 31.4 "VM Instruction Error Numbers").

use core::fmt;

macro_rules! instruction_errors {
    ($( $variant:ident = $number:literal, $text:literal; )*) => {
        /// The VM-instruction error field after a VMfailValid (SDM 31.4, table "VM-Instruction Error
        /// Numbers"). Numbers the table leaves unassigned (14, 21, 27) decode to
        /// [`Unknown`](Self::Unknown).
        #[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
        pub enum VmInstructionError {
            $( #[doc = concat!($number, ": ", $text, ".")] $variant, )*
            /// An error number this crate does not name.
            Unknown(u32),
        }

        impl VmInstructionError {
            /// Decodes the VM-instruction error field.
            pub const fn from_raw(number: u32) -> Self {
                match number {
                    $( $number => Self::$variant, )*
                    other => Self::Unknown(other),
                }
            }

            /// The error number.
            pub const fn raw(self) -> u32 {
                match self {
                    $( Self::$variant => $number, )*
                    Self::Unknown(n) => n,
                }
            }

            /// The SDM's description.
            pub const fn description(self) -> &'static str {
                match self {
                    $( Self::$variant => $text, )*
                    Self::Unknown(_) => "unknown VM-instruction error",
                }
            }
        }
    };
}

instruction_errors! {
    VmcallInRoot = 1, "VMCALL executed in VMX root operation";
    VmclearInvalidAddress = 2, "VMCLEAR with invalid physical address";
    VmclearVmxonPointer = 3, "VMCLEAR with VMXON pointer";
    VmlaunchNonClearVmcs = 4, "VMLAUNCH with non-clear VMCS";
    VmresumeNonLaunchedVmcs = 5, "VMRESUME with non-launched VMCS";
    VmresumeAfterVmxoff = 6, "VMRESUME after VMXOFF (VMXOFF and VMXON between VMLAUNCH and VMRESUME)";
    EntryInvalidControlFields = 7, "VM entry with invalid control field(s)";
    EntryInvalidHostState = 8, "VM entry with invalid host-state field(s)";
    VmptrldInvalidAddress = 9, "VMPTRLD with invalid physical address";
    VmptrldVmxonPointer = 10, "VMPTRLD with VMXON pointer";
    VmptrldIncorrectRevision = 11, "VMPTRLD with incorrect VMCS revision identifier";
    UnsupportedComponent = 12, "VMREAD/VMWRITE from/to unsupported VMCS component";
    VmwriteReadOnlyComponent = 13, "VMWRITE to read-only VMCS component";
    VmxonInRoot = 15, "VMXON executed in VMX root operation";
    EntryInvalidExecutiveVmcsPointer = 16, "VM entry with invalid executive-VMCS pointer";
    EntryNonLaunchedExecutiveVmcs = 17, "VM entry with non-launched executive VMCS";
    EntryExecutiveVmcsNotVmxon = 18, "VM entry with executive-VMCS pointer not VMXON pointer";
    VmcallNonClearVmcs = 19, "VMCALL with non-clear VMCS";
    VmcallInvalidExitControls = 20, "VMCALL with invalid VM-exit control fields";
    VmcallIncorrectMsegRevision = 22, "VMCALL with incorrect MSEG revision identifier";
    VmxoffUnderDualMonitor = 23, "VMXOFF under dual-monitor treatment of SMIs and SMM";
    VmcallInvalidSmmMonitorFeatures = 24, "VMCALL with invalid SMM-monitor features";
    EntryInvalidExecutiveControls = 25, "VM entry with invalid VM-execution control fields in executive VMCS";
    EntryEventsBlockedByMovSs = 26, "VM entry with events blocked by MOV SS";
    InvalidInveptInvvpidOperand = 28, "invalid operand to INVEPT/INVVPID";
}

impl fmt::Display for VmInstructionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unknown(n) => write!(f, "unknown VM-instruction error {n}"),
            known => f.write_str(known.description()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_every_number() {
        for n in 0..64 {
            let e = VmInstructionError::from_raw(n);
            assert_eq!(e.raw(), n);
            let unassigned = matches!(n, 0 | 14 | 21 | 27) || n > 28;
            assert_eq!(
                matches!(e, VmInstructionError::Unknown(_)),
                unassigned,
                "{n}"
            );
        }
    }

    #[test]
    fn sdm_texts() {
        assert_eq!(
            std::format!("{}", VmInstructionError::from_raw(7)),
            "VM entry with invalid control field(s)"
        );
        assert_eq!(
            VmInstructionError::from_raw(8).description(),
            "VM entry with invalid host-state field(s)"
        );
        assert_eq!(
            VmInstructionError::from_raw(26),
            VmInstructionError::EntryEventsBlockedByMovSs
        );
        assert_eq!(
            std::format!("{}", VmInstructionError::Unknown(14)),
            "unknown VM-instruction error 14"
        );
    }
}
