//! The vCPU as the exit policy sees it: the decoded exit, the VMCS, the saved registers.

use ihmi_vmcs::fields::{control, guest};
use ihmi_vmcs::{Gpr, Instruction, InterruptionInfo, VmExit, VmcsField};

/// Guest general-purpose registers as the exit stub saves them (RSP and RIP live in the VMCS).
///
/// The field order is the stub's push order reversed; `ihmi-vmx` checks the layout at compile time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct GuestRegs {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
}

impl GuestRegs {
    /// EDX:EAX, the 64-bit operand of WRMSR and XSETBV.
    #[must_use]
    pub const fn edx_eax(&self) -> u64 {
        (self.rdx << 32) | (self.rax & 0xffff_ffff)
    }

    /// Puts `value` in EDX:EAX, as RDMSR returns it (the upper halves of RAX and RDX cleared).
    pub fn set_edx_eax(&mut self, value: u64) {
        self.rax = value & 0xffff_ffff;
        self.rdx = value >> 32;
    }
}

/// The current virtual CPU: its VMCS and saved registers.
pub trait Vcpu {
    /// The exit that just happened, decoded from its exit-information fields by the VMX layer (no
    /// handler reads an exit-reason number or an exit-information field itself).
    fn exit(&mut self) -> VmExit;
    /// VMREAD of a guest-state or control field of the current VMCS.
    fn read(&mut self, field: VmcsField) -> u64;
    /// VMWRITE of a guest-state or control field of the current VMCS.
    fn write(&mut self, field: VmcsField, value: u64);
    /// The guest registers saved at exit, restored at entry.
    fn regs(&mut self) -> &mut GuestRegs;
    /// VMCS shadowing: points the current VMCS's link pointer at the shadow VMCS L0 keeps for its
    /// guest (`linked`), or at nothing (all ones). Whether there is a shadow VMCS.
    fn link_shadow(&mut self, _linked: bool) -> bool {
        false
    }
    /// VMCS shadowing: runs `f` on the shadow VMCS's fields (L0 makes it current for that, then the
    /// current VMCS again). Whether there is a shadow VMCS (`f` runs only then).
    fn with_shadow(&mut self, _f: &mut dyn FnMut(&mut dyn ShadowFields)) -> bool {
        false
    }
}

/// The fields of the shadow VMCS, while [`Vcpu::with_shadow`] has it current.
pub trait ShadowFields {
    fn read(&mut self, field: VmcsField) -> u64;
    fn write(&mut self, field: VmcsField, value: u64);
}

/// The value of general-purpose register `r` at the exit (RSP from the guest-state area).
pub(crate) fn gpr(vcpu: &mut impl Vcpu, r: Gpr) -> u64 {
    let regs = *vcpu.regs();
    match r {
        Gpr::Rax => regs.rax,
        Gpr::Rcx => regs.rcx,
        Gpr::Rdx => regs.rdx,
        Gpr::Rbx => regs.rbx,
        Gpr::Rsp => vcpu.read(guest::RSP),
        Gpr::Rbp => regs.rbp,
        Gpr::Rsi => regs.rsi,
        Gpr::Rdi => regs.rdi,
        Gpr::R8 => regs.r8,
        Gpr::R9 => regs.r9,
        Gpr::R10 => regs.r10,
        Gpr::R11 => regs.r11,
        Gpr::R12 => regs.r12,
        Gpr::R13 => regs.r13,
        Gpr::R14 => regs.r14,
        Gpr::R15 => regs.r15,
    }
}

/// Sets general-purpose register `r` (RSP in the guest-state area).
pub(crate) fn set_gpr(vcpu: &mut impl Vcpu, r: Gpr, value: u64) {
    if r == Gpr::Rsp {
        vcpu.write(guest::RSP, value);
        return;
    }
    let regs = vcpu.regs();
    let slot = match r {
        Gpr::Rax => &mut regs.rax,
        Gpr::Rcx => &mut regs.rcx,
        Gpr::Rdx => &mut regs.rdx,
        Gpr::Rbx => &mut regs.rbx,
        Gpr::Rbp => &mut regs.rbp,
        Gpr::Rsi => &mut regs.rsi,
        Gpr::Rdi => &mut regs.rdi,
        Gpr::R8 => &mut regs.r8,
        Gpr::R9 => &mut regs.r9,
        Gpr::R10 => &mut regs.r10,
        Gpr::R11 => &mut regs.r11,
        Gpr::R12 => &mut regs.r12,
        Gpr::R13 => &mut regs.r13,
        Gpr::R14 => &mut regs.r14,
        Gpr::Rsp | Gpr::R15 => &mut regs.r15,
    };
    *slot = value;
}

/// The guest's current privilege level: the DPL of SS in the guest-state area (SDM 25.4.1).
pub(crate) fn cpl(vcpu: &mut impl Vcpu) -> u64 {
    (vcpu.read(guest::SS_ACCESS_RIGHTS) >> 5) & 3
}

/// Moves the guest past the instruction that exited, dropping STI/MOV-SS blocking as the CPU would.
pub(crate) fn skip_instruction(vcpu: &mut impl Vcpu, instruction: Instruction) {
    let rip = vcpu.read(guest::RIP);
    vcpu.write(guest::RIP, rip.wrapping_add(instruction.len));
    let blocking = vcpu.read(guest::INTERRUPTIBILITY_STATE);
    if blocking & 0b11 != 0 {
        vcpu.write(guest::INTERRUPTIBILITY_STATE, blocking & !0b11);
    }
}

/// Injects a hardware exception (#GP, #UD, ...) into the guest at its current instruction. An
/// unrestricted guest in real mode (CR0.PE clear: a multiboot kernel may go there) takes it without
/// an error code, which VM entry would refuse there (SDM 27.2.1.3).
pub(crate) fn inject_exception(vcpu: &mut impl Vcpu, vector: u8, error_code: Option<u32>) {
    let unrestricted = u64::from(ihmi_vmcs::SecondaryControls::UNRESTRICTED_GUEST.bits());
    let real_mode = vcpu.read(control::SECONDARY_PROCBASED_EXEC_CONTROLS) & unrestricted != 0
        && vcpu.read(guest::CR0) & ihmi_arch::cr::CR0_PE == 0;
    let error_code = error_code.filter(|_| !real_mode);
    if let Some(code) = error_code {
        vcpu.write(control::VMENTRY_EXCEPTION_ERR_CODE, u64::from(code));
    }
    let info = InterruptionInfo::hardware_exception(vector, error_code.is_some());
    vcpu.write(
        control::VMENTRY_INTERRUPTION_INFO_FIELD,
        u64::from(info.raw()),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock::MockVcpu;

    #[test]
    fn an_unrestricted_guest_in_real_mode_gets_exceptions_without_an_error_code() {
        let gp = |secondary: u64, cr0: u64| {
            let mut v = MockVcpu::exited(31, 0x1000, 2);
            v.fields
                .insert(control::SECONDARY_PROCBASED_EXEC_CONTROLS, secondary);
            v.fields.insert(guest::CR0, cr0);
            inject_exception(&mut v, 13, Some(0));
            InterruptionInfo::from_raw(v.fields[&control::VMENTRY_INTERRUPTION_INFO_FIELD] as u32)
        };
        let unrestricted = u64::from(ihmi_vmcs::SecondaryControls::UNRESTRICTED_GUEST.bits());
        assert!(
            gp(unrestricted, 0x8000_0031).error_code_valid(),
            "protected mode"
        );
        assert!(gp(0, 0x10).error_code_valid(), "not an unrestricted guest");
        let real = gp(unrestricted, 0x10);
        assert!(real.valid() && !real.error_code_valid(), "real mode");
    }
}
