//! Nested VMX: the VMX instructions a guest executes. They exit unconditionally in VMX non-root
//! operation (SDM 26.1.2), so this is where L0 will emulate VMX for a guest hypervisor (L1) once it
//! offers VMX (NESTED.md Part A: VMXON ... INVVPID, VMCS12, the VMCS02 merge, exit reflection).
//!
//! Today L0 offers no VMX: CPUID hides it and CR4.VMXE reads as 0 through the read shadow. A guest
//! that executes a VMX instruction anyway gets what a CPU without VMX enabled gives it: #UD (SDM Vol.
//! 3C, chapter 31, each instruction's "IF (not in VMX operation) ... THEN #UD"). The guest goes on.
//!
//! What is built of nested VMX so far, host-tested and not yet wired into the exit policy:
//! [`caps`], the capability MSRs L0 will offer L1 for each milestone, checked against a replay of
//! Linux 6.1's `kvm_intel` acceptance.

pub mod caps;
#[cfg(test)]
mod tests;

use ihmi_arch::vector::UD;
use ihmi_vmcs::VmxInstruction;

use crate::{inject_exception, Action, Vcpu};

/// A VMX instruction from a guest that L0 offers no VMX: #UD, and the guest continues at the
/// instruction (faults leave RIP where it is).
pub fn on_vmx_instruction(vcpu: &mut impl Vcpu, _instruction: VmxInstruction) -> Action {
    inject_exception(vcpu, UD, None);
    Action::Resume
}
