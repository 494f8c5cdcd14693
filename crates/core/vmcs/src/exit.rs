//! Exit reasons (SDM 25.9.1 "Basic VM-Exit Information", Appendix C "VMX Basic Exit Reasons").

use core::fmt;

/// Number of basic exit reasons this crate knows, 0 through 75; the size of a per-reason counter
/// array indexed by [`ExitReason::index`].
pub const EXIT_REASON_COUNT: usize = 76;

macro_rules! exit_reasons {
    ($( $(#[$meta:meta])* $variant:ident = $number:literal, $name:literal; )*) => {
        /// Basic exit reason, bits 15:0 of the exit-reason field (SDM Appendix C, table "Basic Exit
        /// Reasons"). Numbers Appendix C leaves unassigned (35, 38, 42, 71) and numbers above 75
        /// decode to [`Unknown`](Self::Unknown).
        #[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
        pub enum ExitReason {
            $( $(#[$meta])* #[doc = concat!($number, ": ", $name, ".")] $variant, )*
            /// A basic exit reason this crate does not name.
            Unknown(u16),
        }

        impl ExitReason {
            /// Decodes a basic exit reason number.
            pub const fn from_basic(number: u16) -> Self {
                match number {
                    $( $number => Self::$variant, )*
                    other => Self::Unknown(other),
                }
            }

            /// The basic exit-reason number (SDM Appendix C).
            pub const fn number(self) -> u16 {
                match self {
                    $( Self::$variant => $number, )*
                    Self::Unknown(n) => n,
                }
            }

            /// Short SDM name, such as `"EPT violation"`.
            pub const fn name(self) -> &'static str {
                match self {
                    $( Self::$variant => $name, )*
                    Self::Unknown(_) => "unknown exit reason",
                }
            }
        }
    };
}

exit_reasons! {
    /// Exception or non-maskable interrupt.
    ExceptionOrNmi = 0, "exception or NMI";
    ExternalInterrupt = 1, "external interrupt";
    TripleFault = 2, "triple fault";
    Init = 3, "INIT signal";
    Sipi = 4, "start-up IPI";
    IoSmi = 5, "I/O SMI";
    OtherSmi = 6, "other SMI";
    InterruptWindow = 7, "interrupt window";
    NmiWindow = 8, "NMI window";
    TaskSwitch = 9, "task switch";
    Cpuid = 10, "CPUID";
    Getsec = 11, "GETSEC";
    Hlt = 12, "HLT";
    Invd = 13, "INVD";
    Invlpg = 14, "INVLPG";
    Rdpmc = 15, "RDPMC";
    Rdtsc = 16, "RDTSC";
    Rsm = 17, "RSM";
    Vmcall = 18, "VMCALL";
    Vmclear = 19, "VMCLEAR";
    Vmlaunch = 20, "VMLAUNCH";
    Vmptrld = 21, "VMPTRLD";
    Vmptrst = 22, "VMPTRST";
    Vmread = 23, "VMREAD";
    Vmresume = 24, "VMRESUME";
    Vmwrite = 25, "VMWRITE";
    Vmxoff = 26, "VMXOFF";
    Vmxon = 27, "VMXON";
    CrAccess = 28, "control-register access";
    MovDr = 29, "MOV DR";
    IoInstruction = 30, "I/O instruction";
    Rdmsr = 31, "RDMSR";
    Wrmsr = 32, "WRMSR";
    EntryFailInvalidGuestState = 33, "VM-entry failure due to invalid guest state";
    EntryFailMsrLoading = 34, "VM-entry failure due to MSR loading";
    Mwait = 36, "MWAIT";
    MonitorTrapFlag = 37, "monitor trap flag";
    Monitor = 39, "MONITOR";
    Pause = 40, "PAUSE";
    EntryFailMachineCheck = 41, "VM-entry failure due to machine-check event";
    TprBelowThreshold = 43, "TPR below threshold";
    ApicAccess = 44, "APIC access";
    VirtualizedEoi = 45, "virtualized EOI";
    GdtrIdtrAccess = 46, "access to GDTR or IDTR";
    LdtrTrAccess = 47, "access to LDTR or TR";
    EptViolation = 48, "EPT violation";
    EptMisconfig = 49, "EPT misconfiguration";
    Invept = 50, "INVEPT";
    Rdtscp = 51, "RDTSCP";
    PreemptionTimer = 52, "VMX-preemption timer expired";
    Invvpid = 53, "INVVPID";
    Wbinvd = 54, "WBINVD or WBNOINVD";
    Xsetbv = 55, "XSETBV";
    ApicWrite = 56, "APIC write";
    Rdrand = 57, "RDRAND";
    Invpcid = 58, "INVPCID";
    Vmfunc = 59, "VMFUNC";
    Encls = 60, "ENCLS";
    Rdseed = 61, "RDSEED";
    PmlFull = 62, "page-modification log full";
    Xsaves = 63, "XSAVES";
    Xrstors = 64, "XRSTORS";
    Pconfig = 65, "PCONFIG";
    SppEvent = 66, "SPP-related event";
    Umwait = 67, "UMWAIT";
    Tpause = 68, "TPAUSE";
    Loadiwkey = 69, "LOADIWKEY";
    Enclv = 70, "ENCLV";
    EnqcmdPasidFailure = 72, "ENQCMD PASID translation failure";
    EnqcmdsPasidFailure = 73, "ENQCMDS PASID translation failure";
    BusLock = 74, "bus lock";
    InstructionTimeout = 75, "instruction timeout";
}

impl ExitReason {
    /// Slot in a `[_; EXIT_REASON_COUNT]` counter array: the basic exit reason number for every
    /// number below [`EXIT_REASON_COUNT`] (unassigned ones included, so they are still counted),
    /// `None` above.
    pub const fn index(self) -> Option<usize> {
        let n = self.number() as usize;
        if n < EXIT_REASON_COUNT {
            Some(n)
        } else {
            None
        }
    }

    /// The reason counted in slot `index`, the inverse of [`index`](Self::index).
    pub const fn from_index(index: usize) -> Option<Self> {
        if index < EXIT_REASON_COUNT {
            Some(Self::from_basic(index as u16))
        } else {
            None
        }
    }

    /// True for the three reasons a failed VM entry reports (SDM 27.8 "VM-Entry Failures During or
    /// After Loading Guest State").
    pub const fn is_entry_failure(self) -> bool {
        matches!(
            self,
            Self::EntryFailInvalidGuestState
                | Self::EntryFailMsrLoading
                | Self::EntryFailMachineCheck
        )
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unknown(n) => write!(f, "unknown exit reason {n}"),
            known => f.write_str(known.name()),
        }
    }
}

/// The 32-bit exit-reason field (SDM 25.9.1, table "Format of Exit Reason").
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct RawExitReason(u32);

impl RawExitReason {
    const ENCLAVE_MODE: u32 = 1 << 27;
    const PENDING_MTF: u32 = 1 << 28;
    const FROM_VMX_ROOT: u32 = 1 << 29;
    const ENTRY_FAILURE: u32 = 1 << 31;

    /// Wraps the value read from the exit-reason field.
    pub const fn from_raw(value: u32) -> Self {
        Self(value)
    }

    /// Basic exit reason, bits 15:0.
    pub const fn basic(self) -> ExitReason {
        ExitReason::from_basic(self.0 as u16)
    }

    /// Bit 31: VM entry failed (the basic reason is then 33, 34 or 41).
    pub const fn entry_failure(self) -> bool {
        self.0 & Self::ENTRY_FAILURE != 0
    }

    /// Bit 27: the VM exit was incident to enclave mode.
    pub const fn enclave_mode(self) -> bool {
        self.0 & Self::ENCLAVE_MODE != 0
    }

    /// Bit 28: a pending MTF VM exit.
    pub const fn pending_mtf(self) -> bool {
        self.0 & Self::PENDING_MTF != 0
    }

    /// Bit 29: the VM exit came from VMX root operation (SMM VM exits only).
    pub const fn from_vmx_root(self) -> bool {
        self.0 & Self::FROM_VMX_ROOT != 0
    }
}

impl fmt::Debug for RawExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawExitReason")
            .field("basic", &self.basic())
            .field("entry_failure", &self.entry_failure())
            .field("flags", &format_args!("{:#x}", self.0 & 0xFFFF_0000))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_numbers() {
        let cases = [
            (0, ExitReason::ExceptionOrNmi),
            (1, ExitReason::ExternalInterrupt),
            (2, ExitReason::TripleFault),
            (3, ExitReason::Init),
            (4, ExitReason::Sipi),
            (10, ExitReason::Cpuid),
            (12, ExitReason::Hlt),
            (18, ExitReason::Vmcall),
            (28, ExitReason::CrAccess),
            (30, ExitReason::IoInstruction),
            (31, ExitReason::Rdmsr),
            (32, ExitReason::Wrmsr),
            (33, ExitReason::EntryFailInvalidGuestState),
            (34, ExitReason::EntryFailMsrLoading),
            (41, ExitReason::EntryFailMachineCheck),
            (48, ExitReason::EptViolation),
            (49, ExitReason::EptMisconfig),
            (50, ExitReason::Invept),
            (59, ExitReason::Vmfunc),
            (75, ExitReason::InstructionTimeout),
        ];
        for (n, reason) in cases {
            assert_eq!(ExitReason::from_basic(n), reason);
            assert_eq!(reason.index(), Some(n as usize));
        }
    }

    #[test]
    fn round_trip_all_indices() {
        for i in 0..EXIT_REASON_COUNT {
            let reason = ExitReason::from_index(i).unwrap();
            assert_eq!(reason.index(), Some(i));
            assert_eq!(RawExitReason::from_raw(i as u32).basic(), reason);
        }
        assert_eq!(ExitReason::from_index(EXIT_REASON_COUNT), None);
    }

    #[test]
    fn unassigned_and_large_numbers_are_unknown() {
        for n in [35, 38, 42, 71, 76, 0xFFFF] {
            assert_eq!(ExitReason::from_basic(n), ExitReason::Unknown(n));
        }
        assert_eq!(ExitReason::Unknown(76).index(), None);
        let named = (0..EXIT_REASON_COUNT as u16)
            .filter(|n| !matches!(ExitReason::from_basic(*n), ExitReason::Unknown(_)))
            .count();
        assert_eq!(named, EXIT_REASON_COUNT - 4);
    }

    #[test]
    fn raw_exit_reason_bits() {
        let raw = RawExitReason::from_raw(0x8000_0021);
        assert!(raw.entry_failure());
        assert_eq!(raw.basic(), ExitReason::EntryFailInvalidGuestState);
        assert!(raw.basic().is_entry_failure());
        let raw = RawExitReason::from_raw((1 << 28) | 48);
        assert!(
            !raw.entry_failure()
                && raw.pending_mtf()
                && !raw.enclave_mode()
                && !raw.from_vmx_root()
        );
        assert_eq!(raw.basic(), ExitReason::EptViolation);
    }

    #[test]
    fn names_and_display() {
        assert_eq!(ExitReason::EptViolation.name(), "EPT violation");
        assert_eq!(std::format!("{}", ExitReason::Vmcall), "VMCALL");
        assert_eq!(
            std::format!("{}", ExitReason::Unknown(99)),
            "unknown exit reason 99"
        );
    }
}
