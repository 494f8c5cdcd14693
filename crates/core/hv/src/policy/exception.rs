//! HLT and the exceptions L0 intercepts (the exception bitmap: #BP), which it counts and reflects.

use ihmi_vmcs::fields::{control, guest};
use ihmi_vmcs::{Instruction, InterruptionInfo, InterruptionType};

use crate::{skip_instruction, Action, GuestEnd, Vcpu};

/// HLT with interrupts off never wakes: the guest is stopped. With interrupts on, L0 wakes it at
/// once: no interrupt source is virtualised, so that is a legal spurious wake-up.
pub fn on_hlt(vcpu: &mut impl Vcpu, instruction: Instruction) -> Action {
    if vcpu.read(guest::RFLAGS) & ihmi_arch::rflags::IF == 0 {
        return Action::End(GuestEnd::HaltedForever {
            rip: vcpu.read(guest::RIP),
        });
    }
    skip_instruction(vcpu, instruction);
    Action::Resume
}

/// Reflects an intercepted exception back into the guest exactly as it arrived.
pub fn reinject(
    vcpu: &mut impl Vcpu,
    info: InterruptionInfo,
    error_code: Option<u32>,
    instruction_len: u64,
) -> Action {
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
