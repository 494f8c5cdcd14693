//! Nested VMX: the VMX instructions a guest executes. They exit unconditionally in VMX non-root
//! operation (SDM 26.1.2), so this is where L0 will emulate VMX for a guest hypervisor (L1) once it
//! offers VMX (NESTED.md Part A: VMXON ... INVVPID, VMCS12, the VMCS02 merge, exit reflection).
//!
//! Unless a scenario offers nested VMX ([`crate::Hypervisor::nested`]), L0 hides VMX: CPUID hides
//! it and CR4.VMXE reads as 0 through the read shadow, and a guest that executes a VMX instruction
//! anyway gets what a CPU without VMX enabled gives it: #UD (SDM Vol. 3C, chapter 31, each
//! instruction's "IF (not in VMX operation) ... THEN #UD"). The guest goes on.
//!
//! What is built of nested VMX so far:
//! - [`caps`], the capability MSRs L0 offers L1 for each milestone, checked against a replay of Linux
//!   6.1's `kvm_intel` acceptance;
//! - [`vmx`], VMX operation itself: CPUID.VMX, IA32_FEATURE_CONTROL and the capability MSRs read from
//!   the offer, CR4.VMXE through the read shadow, VMXON and VMXOFF with the SDM's checks (milestone
//!   M1), and the current VMCS and its fields: VMCLEAR, VMPTRLD, VMPTRST, VMREAD, VMWRITE (the first
//!   half of M2);
//! - [`vmcs12`], the VMCS12s L0 keeps in its own memory;
//! - [`entry`], what VMLAUNCH and VMRESUME check: the launch state, controls and host state before
//!   anything is loaded (VMfailValid 4, 5, 7, 8), then the guest state (a failure is an exit to L1
//!   with reason 33);
//! - [`host_state`], the in-hypervisor monitor's property P3 with KVM as L1: VMCS12's host state is
//!   L1's live state at every VMLAUNCH and VMRESUME, returning to `vmx_vmexit` (VMfailValid 8);
//! - [`liveness`], P7: the monitor's hook in KVM keeps firing, within a window of reflected exits;
//! - [`l2`], VMCS02 as VMCS12's guest state merged with L0's own controls, what an exit from L2 saves
//!   into VMCS12, L1's host state loaded back, and whose each exit from L2 is (L1's or L0's);
//! - [`run`], the entry and exit paths on the hypervisor, and their costs;
//! - [`shadow`], VMCS shadowing: which fields L1 reads and writes without exits, and the copies
//!   between the shadow VMCS and VMCS12.
//!
//! Next: Linux + KVM as L1 (NESTED.md milestone M3).

pub mod caps;
pub mod entry;
pub mod ept;
pub mod host_state;
pub mod l2;
pub mod liveness;
pub mod msr_area;
pub mod run;
pub mod shadow;
#[cfg(test)]
mod tests;
pub mod vmcs12;
pub mod vmx;
