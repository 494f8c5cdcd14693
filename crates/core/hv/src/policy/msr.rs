//! MSR policy. The same table drives the VMCS MSR bitmap (what exits) and the handler (what happens).

use ihmi_arch::msr::{
    FEATURE_CONTROL_LOCK, IA32_CSTAR, IA32_FEATURE_CONTROL, IA32_LSTAR, IA32_SYSENTER_EIP,
    IA32_VMX_BASIC, IA32_VMX_VMFUNC,
};
use ihmi_arch::vector::GP;
use ihmi_vmcs::Instruction;

use crate::{
    inject_exception, skip_instruction, Action, Hypervisor, Observation, Observer, Platform, Vcpu,
};

/// Feature-control value the guest reads: locked, VMX off inside and outside SMX.
const FEATURE_CONTROL_LOCKED_NO_VMX: u64 = FEATURE_CONTROL_LOCK;

/// MSRs whose reads and writes exit to L0 (everything else in the bitmap's ranges goes straight through).
pub const INTERCEPTED: &[(u32, u32)] = &[
    (IA32_FEATURE_CONTROL, IA32_FEATURE_CONTROL),
    (IA32_VMX_BASIC, IA32_VMX_VMFUNC),
];

/// MSRs whose writes exit to L0: the system-call entries, which L0 locks once the guest kernel has
/// installed them and, for a Linux guest with a monitor, points at the gate (see `guard`).
pub const WRITE_INTERCEPTED: &[(u32, u32)] = &[
    (IA32_LSTAR, IA32_CSTAR),
    (IA32_SYSENTER_EIP, IA32_SYSENTER_EIP),
];
/// MSRs whose reads exit to L0: the entries the gate stands in front of, so a guest reads the
/// kernel's own value even while the MSR holds the gate's.
pub const READ_INTERCEPTED: &[(u32, u32)] = &[
    (IA32_LSTAR, IA32_LSTAR),
    (IA32_SYSENTER_EIP, IA32_SYSENTER_EIP),
];

/// Whether the policy intercepts `msr`.
#[must_use]
pub fn is_intercepted(msr: u32) -> bool {
    INTERCEPTED.iter().any(|&(a, b)| (a..=b).contains(&msr))
}

impl Hypervisor {
    pub(crate) fn on_rdmsr(
        &mut self,
        vcpu: &mut impl Vcpu,
        platform: &mut impl Platform,
        obs: &mut impl Observer,
        instruction: Instruction,
    ) -> Action {
        let msr = vcpu.regs().rcx as u32;
        let value = match msr {
            // With nested VMX: locked with VMX on outside SMX, and the offer's capabilities (an MSR
            // the offered CPU does not have faults).
            IA32_FEATURE_CONTROL | IA32_VMX_BASIC..=IA32_VMX_VMFUNC if self.nested.is_some() => {
                self.nested.as_ref().and_then(|n| n.offer().read_msr(msr))
            }
            IA32_FEATURE_CONTROL => Some(FEATURE_CONTROL_LOCKED_NO_VMX),
            IA32_LSTAR => Some(
                self.guard
                    .as_ref()
                    .and_then(crate::Guard::kernel_lstar)
                    .unwrap_or_else(|| platform.read_msr(IA32_LSTAR)),
            ),
            IA32_SYSENTER_EIP => Some(
                self.guard
                    .as_ref()
                    .and_then(|g| g.kernel_entry_msr(IA32_SYSENTER_EIP))
                    .unwrap_or_else(|| vcpu.read(ihmi_vmcs::fields::guest::IA32_SYSENTER_EIP)),
            ),
            // VMX is hidden, so its capability MSRs do not exist; so does every MSR we do not know
            // (reads outside the bitmap ranges always exit).
            _ => None,
        };
        obs.observe(Observation::Msr {
            msr,
            write: false,
            faulted: value.is_none(),
        });
        match value {
            Some(v) => {
                vcpu.regs().set_edx_eax(v);
                skip_instruction(vcpu, instruction);
            }
            None => inject_exception(vcpu, GP, Some(0)),
        }
        Action::Resume
    }

    pub(crate) fn on_wrmsr(
        &mut self,
        vcpu: &mut impl Vcpu,
        platform: &mut impl Platform,
        obs: &mut impl Observer,
        instruction: Instruction,
    ) -> Action {
        let regs = *vcpu.regs();
        let msr = regs.rcx as u32;
        if crate::guard::ENTRY_MSRS.contains(&msr) {
            let value = regs.edx_eax();
            return self.on_entry_msr_write(vcpu, platform, obs, msr, value, instruction);
        }
        // Every other intercepted MSR is read-only to the guest (feature control is locked; VMX MSRs do
        // not exist), and so is any MSR outside the bitmap's ranges.
        obs.observe(Observation::Msr {
            msr,
            write: true,
            faulted: true,
        });
        inject_exception(vcpu, GP, Some(0));
        Action::Resume
    }
}
