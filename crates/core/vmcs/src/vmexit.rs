//! The vendor-neutral view of one VM exit: [`VmExit`], decoded from the exit-information fields (SDM
//! 28.2 "Recording VM-exit information") by [`VmExit::decode`]. Exit handlers match on this enum and
//! never read an exit-reason number or an exit-information field themselves; the one crate that
//! executes VMREAD (`ihmi-vmx`) feeds `decode`, and the tests feed it a map.

use ihmi_addr::{Gpa, Gva};

use crate::exit::{ExitReason, RawExitReason};
use crate::field::{fields::ro, VmcsField};
use crate::qual::{
    CrAccessQualification, EptViolationQualification, InterruptionInfo, InterruptionType,
    IoQualification,
};

/// The instruction that caused an instruction exit: its length, from the VM-exit instruction-length
/// field (SDM 28.2.5), which the handler adds to RIP to step past it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Instruction {
    /// Length in bytes (1 to 15 on real hardware; taken as the CPU reported it).
    pub len: u64,
}

/// The VMX instructions, which exit unconditionally in VMX non-root operation (SDM 26.1.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VmxInstruction {
    Vmxon,
    Vmxoff,
    Vmclear,
    Vmptrld,
    Vmptrst,
    Vmread,
    Vmwrite,
    Vmlaunch,
    Vmresume,
    Invept,
    Invvpid,
}

impl VmxInstruction {
    /// The instruction a basic exit reason names, if it is one of the VMX instructions.
    #[must_use]
    pub const fn from_reason(reason: ExitReason) -> Option<Self> {
        Some(match reason {
            ExitReason::Vmxon => Self::Vmxon,
            ExitReason::Vmxoff => Self::Vmxoff,
            ExitReason::Vmclear => Self::Vmclear,
            ExitReason::Vmptrld => Self::Vmptrld,
            ExitReason::Vmptrst => Self::Vmptrst,
            ExitReason::Vmread => Self::Vmread,
            ExitReason::Vmwrite => Self::Vmwrite,
            ExitReason::Vmlaunch => Self::Vmlaunch,
            ExitReason::Vmresume => Self::Vmresume,
            ExitReason::Invept => Self::Invept,
            ExitReason::Invvpid => Self::Invvpid,
            _ => return None,
        })
    }

    /// The basic exit reason this instruction exits with.
    #[must_use]
    pub const fn reason(self) -> ExitReason {
        match self {
            Self::Vmxon => ExitReason::Vmxon,
            Self::Vmxoff => ExitReason::Vmxoff,
            Self::Vmclear => ExitReason::Vmclear,
            Self::Vmptrld => ExitReason::Vmptrld,
            Self::Vmptrst => ExitReason::Vmptrst,
            Self::Vmread => ExitReason::Vmread,
            Self::Vmwrite => ExitReason::Vmwrite,
            Self::Vmlaunch => ExitReason::Vmlaunch,
            Self::Vmresume => ExitReason::Vmresume,
            Self::Invept => ExitReason::Invept,
            Self::Invvpid => ExitReason::Invvpid,
        }
    }
}

/// The VM-exit instruction-information field for the VMX instructions that take operands (SDM 28.2.5,
/// the tables for VMCLEAR/VMPTRLD/VMPTRST/VMXON, VMREAD/VMWRITE and INVEPT/INVVPID, which share this
/// layout; a field one instruction leaves undefined reads as whatever the CPU stored).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VmxInstructionInfo(u32);

impl VmxInstructionInfo {
    /// Wraps the field's value.
    #[must_use]
    pub const fn from_raw(value: u32) -> Self {
        Self(value)
    }

    /// The field's value.
    #[must_use]
    pub const fn raw(self) -> u32 {
        self.0
    }

    /// Bits 1:0: the index register's scale, as a shift (0 to 3).
    #[must_use]
    pub const fn scaling(self) -> u8 {
        (self.0 & 0b11) as u8
    }

    /// Bits 6:3: Reg1, the register operand of VMREAD and VMWRITE when bit 10 is set.
    #[must_use]
    pub const fn reg1(self) -> u8 {
        ((self.0 >> 3) & 0xf) as u8
    }

    /// Bits 9:7: the address size (0 = 16-bit, 1 = 32-bit, 2 = 64-bit).
    #[must_use]
    pub const fn address_size(self) -> u8 {
        ((self.0 >> 7) & 0b111) as u8
    }

    /// Bit 10: the operand is a register (VMREAD and VMWRITE only; memory otherwise).
    #[must_use]
    pub const fn is_register(self) -> bool {
        self.0 & (1 << 10) != 0
    }

    /// Bits 17:15: the segment register of a memory operand (0 = ES ... 5 = GS).
    #[must_use]
    pub const fn segment(self) -> u8 {
        ((self.0 >> 15) & 0b111) as u8
    }

    /// Bits 21:18 and 22: the index register of a memory operand, if it has one.
    #[must_use]
    pub const fn index(self) -> Option<u8> {
        if self.0 & (1 << 22) != 0 {
            None
        } else {
            Some(((self.0 >> 18) & 0xf) as u8)
        }
    }

    /// Bits 26:23 and 27: the base register of a memory operand, if it has one.
    #[must_use]
    pub const fn base(self) -> Option<u8> {
        if self.0 & (1 << 27) != 0 {
            None
        } else {
            Some(((self.0 >> 23) & 0xf) as u8)
        }
    }

    /// Bits 31:28: Reg2, the register holding the VMCS-field encoding (VMREAD, VMWRITE) or the
    /// invalidation type (INVEPT, INVVPID).
    #[must_use]
    pub const fn reg2(self) -> u8 {
        ((self.0 >> 28) & 0xf) as u8
    }
}

/// An event whose delivery through the guest's IDT a VM exit interrupted: what re-injecting it needs
/// (the error code, and for software interrupts and exceptions the instruction length).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Vectored {
    /// The IDT-vectoring information (valid).
    pub info: InterruptionInfo,
    pub error_code: Option<u32>,
    pub instruction_len: u64,
}

/// The exit-information fields of one exit as the CPU wrote them, undecoded: what a hypervisor
/// passes on when the exit belongs to a guest hypervisor (nested VMX: L0 copies them into L1's
/// VMCS12, SDM 28.2). The fields an exit does not define hold whatever the CPU left there.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitInformation {
    pub reason: u32,
    pub qualification: u64,
    pub guest_linear: u64,
    pub guest_physical: u64,
    pub interruption_info: u32,
    pub interruption_error: u32,
    pub idt_vectoring_info: u32,
    pub idt_vectoring_error: u32,
    pub instruction_len: u32,
    pub instruction_info: u32,
}

impl ExitInformation {
    /// The exit-information fields, in the order of [`ExitInformation::fields`].
    pub const FIELDS: [VmcsField; 10] = [
        ro::EXIT_REASON,
        ro::EXIT_QUALIFICATION,
        ro::GUEST_LINEAR_ADDR,
        ro::GUEST_PHYSICAL_ADDR_FULL,
        ro::VMEXIT_INTERRUPTION_INFO,
        ro::VMEXIT_INTERRUPTION_ERR_CODE,
        ro::IDT_VECTORING_INFO,
        ro::IDT_VECTORING_ERR_CODE,
        ro::VMEXIT_INSTRUCTION_LEN,
        ro::VMEXIT_INSTRUCTION_INFO,
    ];

    /// Reads the current exit's information fields (`read` is a VMREAD of the current VMCS).
    pub fn read(mut read: impl FnMut(VmcsField) -> u64) -> Self {
        Self {
            reason: read(ro::EXIT_REASON) as u32,
            qualification: read(ro::EXIT_QUALIFICATION),
            guest_linear: read(ro::GUEST_LINEAR_ADDR),
            guest_physical: read(ro::GUEST_PHYSICAL_ADDR_FULL),
            interruption_info: read(ro::VMEXIT_INTERRUPTION_INFO) as u32,
            interruption_error: read(ro::VMEXIT_INTERRUPTION_ERR_CODE) as u32,
            idt_vectoring_info: read(ro::IDT_VECTORING_INFO) as u32,
            idt_vectoring_error: read(ro::IDT_VECTORING_ERR_CODE) as u32,
            instruction_len: read(ro::VMEXIT_INSTRUCTION_LEN) as u32,
            instruction_info: read(ro::VMEXIT_INSTRUCTION_INFO) as u32,
        }
    }

    /// The information fields with their values, to write into another VMCS.
    #[must_use]
    pub fn fields(&self) -> [(VmcsField, u64); 10] {
        let values = [
            u64::from(self.reason),
            self.qualification,
            self.guest_linear,
            self.guest_physical,
            u64::from(self.interruption_info),
            u64::from(self.interruption_error),
            u64::from(self.idt_vectoring_info),
            u64::from(self.idt_vectoring_error),
            u64::from(self.instruction_len),
            u64::from(self.instruction_info),
        ];
        core::array::from_fn(|i| (Self::FIELDS[i], values[i]))
    }

    /// The information of a VM-entry failure the hypervisor found itself (a guest-state check,
    /// SDM 27.8): the basic reason with bit 31 set, and the qualification.
    #[must_use]
    pub fn entry_failure(reason: ExitReason, qualification: u64) -> Self {
        Self {
            reason: reason.number() as u32 | 1 << 31,
            qualification,
            ..Self::default()
        }
    }
}

/// One VM exit, with the information each kind needs, decoded once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// An exception or NMI the exception bitmap (or NMI exiting) sent to the hypervisor. The
    /// instruction length matters for software exceptions (INT3, INTO), which are re-injected with it.
    Exception {
        info: InterruptionInfo,
        error_code: Option<u32>,
        instruction_len: u64,
    },
    /// An NMI, with NMI exiting on. When it arrived while the CPU was delivering another event, that
    /// event (the IDT-vectoring information, SDM 28.2.4) must be re-injected.
    Nmi { vectoring: Option<Vectored> },
    /// An external interrupt (external-interrupt exiting).
    ExternalInterrupt { info: InterruptionInfo },
    /// The VMX-preemption timer counted down to zero (SDM 26.5.1): the guest ran that long without
    /// another exit.
    PreemptionTimer,
    /// The guest triple-faulted.
    TripleFault,
    /// The guest received INIT.
    Init,
    /// HLT with HLT exiting on.
    Hlt(Instruction),
    /// CPUID, which always exits.
    Cpuid(Instruction),
    /// VMCALL.
    Vmcall(Instruction),
    /// RDMSR of an intercepted MSR (or one outside the bitmap's ranges).
    Rdmsr(Instruction),
    /// WRMSR of an intercepted MSR (or one outside the bitmap's ranges).
    Wrmsr(Instruction),
    /// XSETBV, which always exits.
    Xsetbv(Instruction),
    /// VMFUNC with a function or EPTP-list index that is not enabled (SDM 26.5.6).
    Vmfunc(Instruction),
    /// IN, OUT, INS or OUTS on an intercepted port.
    Io {
        qualification: IoQualification,
        instruction: Instruction,
    },
    /// A MOV to or from a control register, CLTS or LMSW that the masks make exit.
    CrAccess {
        qualification: CrAccessQualification,
        instruction: Instruction,
    },
    /// A guest-physical access its EPT does not allow.
    EptViolation {
        gpa: Gpa,
        /// The linear address, when the CPU reports one (qualification bit 7).
        gla: Option<Gva>,
        qualification: EptViolationQualification,
    },
    /// The EPT itself is malformed.
    EptMisconfig { gpa: Gpa },
    /// A VMX instruction, with its operand information and the displacement of a memory operand
    /// (the exit qualification, SDM 28.2.1).
    Vmx {
        instruction: VmxInstruction,
        info: VmxInstructionInfo,
        displacement: u64,
        instruction_len: u64,
    },
    /// VM entry failed while or after loading guest state (SDM 27.8): exit-reason bit 31 set.
    EntryFailure {
        reason: ExitReason,
        qualification: u64,
    },
    /// Any other exit, for the handler to report: its reason and qualification.
    Other {
        reason: ExitReason,
        qualification: u64,
    },
}

impl VmExit {
    /// Decodes the current exit by reading only the fields its reason defines. `read` performs a
    /// VMREAD of the current VMCS (a test passes a map).
    pub fn decode(mut read: impl FnMut(VmcsField) -> u64) -> Self {
        let raw = RawExitReason::from_raw(read(ro::EXIT_REASON) as u32);
        let reason = raw.basic();
        if raw.entry_failure() {
            return Self::EntryFailure {
                reason,
                qualification: read(ro::EXIT_QUALIFICATION),
            };
        }
        let instruction = |read: &mut dyn FnMut(VmcsField) -> u64| Instruction {
            len: read(ro::VMEXIT_INSTRUCTION_LEN),
        };
        match reason {
            ExitReason::ExceptionOrNmi => {
                let info = InterruptionInfo::from_raw(read(ro::VMEXIT_INTERRUPTION_INFO) as u32);
                if info.interruption_type() == InterruptionType::Nmi {
                    let vectoring = InterruptionInfo::from_raw(read(ro::IDT_VECTORING_INFO) as u32);
                    return Self::Nmi {
                        vectoring: vectoring.valid().then(|| Vectored {
                            info: vectoring,
                            error_code: vectoring
                                .error_code_valid()
                                .then(|| read(ro::IDT_VECTORING_ERR_CODE) as u32),
                            instruction_len: if matches!(
                                vectoring.interruption_type(),
                                InterruptionType::SoftwareInterrupt
                                    | InterruptionType::SoftwareException
                                    | InterruptionType::PrivilegedSoftwareException
                            ) {
                                read(ro::VMEXIT_INSTRUCTION_LEN)
                            } else {
                                0
                            },
                        }),
                    };
                }
                let error_code = info
                    .error_code_valid()
                    .then(|| read(ro::VMEXIT_INTERRUPTION_ERR_CODE) as u32);
                let software = matches!(
                    info.interruption_type(),
                    InterruptionType::SoftwareException
                        | InterruptionType::PrivilegedSoftwareException
                );
                let instruction_len = if software {
                    read(ro::VMEXIT_INSTRUCTION_LEN)
                } else {
                    0
                };
                Self::Exception {
                    info,
                    error_code,
                    instruction_len,
                }
            }
            ExitReason::ExternalInterrupt => Self::ExternalInterrupt {
                info: InterruptionInfo::from_raw(read(ro::VMEXIT_INTERRUPTION_INFO) as u32),
            },
            ExitReason::TripleFault => Self::TripleFault,
            ExitReason::PreemptionTimer => Self::PreemptionTimer,
            ExitReason::Init => Self::Init,
            ExitReason::Hlt => Self::Hlt(instruction(&mut read)),
            ExitReason::Cpuid => Self::Cpuid(instruction(&mut read)),
            ExitReason::Vmcall => Self::Vmcall(instruction(&mut read)),
            ExitReason::Rdmsr => Self::Rdmsr(instruction(&mut read)),
            ExitReason::Wrmsr => Self::Wrmsr(instruction(&mut read)),
            ExitReason::Xsetbv => Self::Xsetbv(instruction(&mut read)),
            ExitReason::Vmfunc => Self::Vmfunc(instruction(&mut read)),
            ExitReason::IoInstruction => {
                let qualification = IoQualification::from_raw(read(ro::EXIT_QUALIFICATION));
                Self::Io {
                    qualification,
                    instruction: instruction(&mut read),
                }
            }
            ExitReason::CrAccess => {
                let qualification = CrAccessQualification::from_raw(read(ro::EXIT_QUALIFICATION));
                Self::CrAccess {
                    qualification,
                    instruction: instruction(&mut read),
                }
            }
            ExitReason::EptViolation => {
                let qualification =
                    EptViolationQualification::from_raw(read(ro::EXIT_QUALIFICATION));
                let gpa = Gpa::new(read(ro::GUEST_PHYSICAL_ADDR_FULL));
                let gla = qualification
                    .gla_valid()
                    .then(|| Gva::new(read(ro::GUEST_LINEAR_ADDR)));
                Self::EptViolation {
                    gpa,
                    gla,
                    qualification,
                }
            }
            ExitReason::EptMisconfig => Self::EptMisconfig {
                gpa: Gpa::new(read(ro::GUEST_PHYSICAL_ADDR_FULL)),
            },
            other => match VmxInstruction::from_reason(other) {
                Some(instruction) => Self::Vmx {
                    instruction,
                    info: VmxInstructionInfo::from_raw(read(ro::VMEXIT_INSTRUCTION_INFO) as u32),
                    displacement: read(ro::EXIT_QUALIFICATION),
                    instruction_len: read(ro::VMEXIT_INSTRUCTION_LEN),
                },
                None => Self::Other {
                    reason: other,
                    qualification: read(ro::EXIT_QUALIFICATION),
                },
            },
        }
    }

    /// The basic exit reason, for counting and reports.
    #[must_use]
    pub const fn reason(&self) -> ExitReason {
        match self {
            Self::Exception { .. } | Self::Nmi { .. } => ExitReason::ExceptionOrNmi,
            Self::ExternalInterrupt { .. } => ExitReason::ExternalInterrupt,
            Self::TripleFault => ExitReason::TripleFault,
            Self::PreemptionTimer => ExitReason::PreemptionTimer,
            Self::Init => ExitReason::Init,
            Self::Hlt(_) => ExitReason::Hlt,
            Self::Cpuid(_) => ExitReason::Cpuid,
            Self::Vmcall(_) => ExitReason::Vmcall,
            Self::Rdmsr(_) => ExitReason::Rdmsr,
            Self::Wrmsr(_) => ExitReason::Wrmsr,
            Self::Xsetbv(_) => ExitReason::Xsetbv,
            Self::Vmfunc(_) => ExitReason::Vmfunc,
            Self::Io { .. } => ExitReason::IoInstruction,
            Self::CrAccess { .. } => ExitReason::CrAccess,
            Self::EptViolation { .. } => ExitReason::EptViolation,
            Self::EptMisconfig { .. } => ExitReason::EptMisconfig,
            Self::Vmx { instruction, .. } => instruction.reason(),
            Self::EntryFailure { reason, .. } | Self::Other { reason, .. } => *reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::vec::Vec;

    use super::*;

    /// A VMCS that answers from a map and records which fields were read.
    struct Fields {
        values: BTreeMap<VmcsField, u64>,
        read: Vec<VmcsField>,
    }

    impl Fields {
        fn new(pairs: &[(VmcsField, u64)]) -> Self {
            Self {
                values: pairs.iter().copied().collect(),
                read: Vec::new(),
            }
        }

        fn decode(&mut self) -> VmExit {
            VmExit::decode(|f| {
                self.read.push(f);
                self.values.get(&f).copied().unwrap_or(0)
            })
        }
    }

    #[test]
    fn instruction_exits_carry_their_length_and_read_nothing_else() {
        let mut f = Fields::new(&[(ro::EXIT_REASON, 10), (ro::VMEXIT_INSTRUCTION_LEN, 2)]);
        assert_eq!(f.decode(), VmExit::Cpuid(Instruction { len: 2 }));
        assert_eq!(f.read, [ro::EXIT_REASON, ro::VMEXIT_INSTRUCTION_LEN]);
        assert_eq!(
            VmExit::Cpuid(Instruction { len: 2 }).reason(),
            ExitReason::Cpuid
        );
    }

    #[test]
    fn ept_violations_read_the_linear_address_only_when_valid() {
        let mut f = Fields::new(&[
            (ro::EXIT_REASON, 48),
            (ro::EXIT_QUALIFICATION, 0b1),
            (ro::GUEST_PHYSICAL_ADDR_FULL, 0x8000),
            (ro::GUEST_LINEAR_ADDR, 0xdead),
        ]);
        let VmExit::EptViolation { gpa, gla, .. } = f.decode() else {
            panic!("not an EPT violation");
        };
        assert_eq!((gpa, gla), (Gpa::new(0x8000), None));
        assert!(!f.read.contains(&ro::GUEST_LINEAR_ADDR));
        let mut f = Fields::new(&[
            (ro::EXIT_REASON, 48),
            (ro::EXIT_QUALIFICATION, 0b1000_0100),
            (ro::GUEST_LINEAR_ADDR, 0xdead),
        ]);
        let VmExit::EptViolation {
            gla, qualification, ..
        } = f.decode()
        else {
            panic!("not an EPT violation");
        };
        assert_eq!(gla, Some(Gva::new(0xdead)));
        assert!(qualification.fetch());
    }

    #[test]
    fn exceptions_read_the_error_code_and_length_only_when_they_have_them() {
        // #GP, a hardware exception with an error code.
        let mut f = Fields::new(&[
            (ro::EXIT_REASON, 0),
            (ro::VMEXIT_INTERRUPTION_INFO, 0x8000_0b0d),
            (ro::VMEXIT_INTERRUPTION_ERR_CODE, 0x18),
        ]);
        let VmExit::Exception {
            info,
            error_code,
            instruction_len,
        } = f.decode()
        else {
            panic!("not an exception");
        };
        assert_eq!(
            (info.vector(), error_code, instruction_len),
            (13, Some(0x18), 0)
        );
        assert!(!f.read.contains(&ro::VMEXIT_INSTRUCTION_LEN));
        // #BP from INT3, a software exception: no error code, a length.
        let mut f = Fields::new(&[
            (ro::EXIT_REASON, 0),
            (ro::VMEXIT_INTERRUPTION_INFO, 0x8000_0603),
            (ro::VMEXIT_INSTRUCTION_LEN, 1),
        ]);
        assert!(matches!(
            f.decode(),
            VmExit::Exception {
                error_code: None,
                instruction_len: 1,
                ..
            }
        ));
        assert!(!f.read.contains(&ro::VMEXIT_INTERRUPTION_ERR_CODE));
    }

    #[test]
    fn an_nmi_brings_the_event_whose_delivery_it_interrupted() {
        // No event in delivery: nothing more is read.
        let mut f = Fields::new(&[
            (ro::EXIT_REASON, 0),
            (ro::VMEXIT_INTERRUPTION_INFO, 0x8000_0202),
        ]);
        assert_eq!(f.decode(), VmExit::Nmi { vectoring: None });
        assert!(!f.read.contains(&ro::IDT_VECTORING_ERR_CODE));
        // INT 0x80 in delivery: its length comes along, no error code.
        let mut f = Fields::new(&[
            (ro::EXIT_REASON, 0),
            (ro::VMEXIT_INTERRUPTION_INFO, 0x8000_0202),
            (ro::IDT_VECTORING_INFO, 0x8000_0480),
            (ro::VMEXIT_INSTRUCTION_LEN, 2),
        ]);
        let VmExit::Nmi { vectoring: Some(v) } = f.decode() else {
            panic!("not an NMI with an event in delivery");
        };
        assert_eq!(
            (v.info.vector(), v.error_code, v.instruction_len),
            (0x80, None, 2)
        );
        // A #PF in delivery: its error code, no length.
        let mut f = Fields::new(&[
            (ro::EXIT_REASON, 0),
            (ro::VMEXIT_INTERRUPTION_INFO, 0x8000_0202),
            (ro::IDT_VECTORING_INFO, 0x8000_0b0e),
            (ro::IDT_VECTORING_ERR_CODE, 2),
        ]);
        let VmExit::Nmi { vectoring: Some(v) } = f.decode() else {
            panic!("not an NMI with an event in delivery");
        };
        assert_eq!((v.error_code, v.instruction_len), (Some(2), 0));
        assert_eq!(
            v.info.interruption_type(),
            InterruptionType::HardwareException
        );
    }

    #[test]
    fn entry_failures_are_told_apart_from_exits() {
        let mut f = Fields::new(&[(ro::EXIT_REASON, 0x8000_0021), (ro::EXIT_QUALIFICATION, 3)]);
        assert_eq!(
            f.decode(),
            VmExit::EntryFailure {
                reason: ExitReason::EntryFailInvalidGuestState,
                qualification: 3
            }
        );
    }

    #[test]
    fn vmx_instructions_carry_their_operand_information() {
        // VMREAD rax <- encoding in rcx (register form): Reg1 = 0, Reg2 = 1, bit 10.
        let info = (1 << 28) | (1 << 10);
        let mut f = Fields::new(&[
            (ro::EXIT_REASON, 23),
            (ro::VMEXIT_INSTRUCTION_INFO, info),
            (ro::VMEXIT_INSTRUCTION_LEN, 3),
        ]);
        let exit = f.decode();
        let VmExit::Vmx {
            instruction,
            info,
            instruction_len,
            ..
        } = exit
        else {
            panic!("not a VMX instruction");
        };
        assert_eq!(instruction, VmxInstruction::Vmread);
        assert!(info.is_register());
        assert_eq!((info.reg1(), info.reg2(), instruction_len), (0, 1, 3));
        assert_eq!(exit.reason(), ExitReason::Vmread);
        // VMPTRLD [rsp + 8]: memory, 64-bit addresses, base RSP (4), no index, segment SS.
        let mem = VmxInstructionInfo::from_raw((2 << 7) | (2 << 15) | (1 << 22) | (4 << 23));
        assert!(!mem.is_register());
        assert_eq!(
            (mem.address_size(), mem.segment(), mem.index(), mem.base()),
            (2, 2, None, Some(4))
        );
        for n in 0..=u16::MAX {
            let reason = ExitReason::from_basic(n);
            if let Some(i) = VmxInstruction::from_reason(reason) {
                assert_eq!(i.reason(), reason);
            }
        }
    }

    #[test]
    fn unknown_reasons_are_other_with_their_qualification() {
        let mut f = Fields::new(&[(ro::EXIT_REASON, 71), (ro::EXIT_QUALIFICATION, 9)]);
        assert_eq!(
            f.decode(),
            VmExit::Other {
                reason: ExitReason::Unknown(71),
                qualification: 9
            }
        );
    }
}
