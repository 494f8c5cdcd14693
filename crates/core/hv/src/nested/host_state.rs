//! Integrity property P3 of the in-hypervisor monitor (NESTED.md B.1.3): when L1 is Linux with KVM
//! built in, the host state of every VMCS12 it enters is L1's own live state, and the exit from L2
//! returns to KVM's `vmx_vmexit`. KVM writes the host-state area from what the CPU has at that
//! moment (`vmx_set_constant_host_state`, `vmx_vcpu_load_vmcs`, `vmx_prepare_switch_to_guest`, and
//! HOST_RSP just before VMLAUNCH/VMRESUME in `__vmx_vcpu_run`, with no stack change in between), so a
//! field that differs from L1's state at the VMLAUNCH or VMRESUME was put there by something else:
//! an attacker in L1's kernel who wants the next exit from L2 to land in code of its choosing, on a
//! stack or page tables of its choosing. L0 is on that path already (every entry to L2 is its
//! emulation), so the check costs no exit; an entry that fails it is refused with VMfailValid 8
//! (invalid host-state field), which KVM reports as a failed entry, and an alert.
//!
//! What is compared, with L1's state read from VMCS01 at the instruction (CR0 and CR4 as L1 reads
//! them, through their read shadows): HOST_RIP with `vmx_vmexit`; HOST_RSP, HOST_CR3, HOST_CR0,
//! HOST_CR4, the FS, GS, TR, GDTR and IDTR bases and the CS and TR selectors with L1's own. Not
//! compared: the SYSENTER MSRs, IA32_EFER and IA32_PAT (KVM writes what RDMSR gives it, and L0 shows
//! a monitored L1 other values there than VMCS01 holds), the data-segment selectors (KVM writes 0
//! for DS, ES and SS where the kernel may run with other ones).

use ihmi_vmcs::fields::{control, guest, host};
use ihmi_vmcs::VmcsField;

use super::vmcs12::Vmcs12;
use crate::vcpu::Vcpu;

/// A host-state field of VMCS12 that is not what L1 has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostStateMismatch {
    /// The field's name, as the SDM and KVM spell it (`HOST_RIP`).
    pub field: &'static str,
    /// What L1 has (for HOST_RIP: KVM's `vmx_vmexit`), and what VMCS12 holds.
    pub expected: u64,
    pub found: u64,
}

/// The host-state fields compared, each with its name and where L1's own value comes from.
const COMPARED: [(&str, VmcsField, Live); 12] = [
    ("HOST_RIP", host::RIP, Live::VmxVmexit),
    ("HOST_RSP", host::RSP, Live::Field(guest::RSP)),
    ("HOST_CR0", host::CR0, Live::Cr0),
    ("HOST_CR3", host::CR3, Live::Field(guest::CR3)),
    ("HOST_CR4", host::CR4, Live::Cr4),
    ("HOST_FS_BASE", host::FS_BASE, Live::Field(guest::FS_BASE)),
    ("HOST_GS_BASE", host::GS_BASE, Live::Field(guest::GS_BASE)),
    ("HOST_TR_BASE", host::TR_BASE, Live::Field(guest::TR_BASE)),
    (
        "HOST_GDTR_BASE",
        host::GDTR_BASE,
        Live::Field(guest::GDTR_BASE),
    ),
    (
        "HOST_IDTR_BASE",
        host::IDTR_BASE,
        Live::Field(guest::IDTR_BASE),
    ),
    (
        "HOST_CS_SELECTOR",
        host::CS_SELECTOR,
        Live::Field(guest::CS_SELECTOR),
    ),
    (
        "HOST_TR_SELECTOR",
        host::TR_SELECTOR,
        Live::Field(guest::TR_SELECTOR),
    ),
];

/// Where L1's value of a compared field comes from.
#[derive(Clone, Copy)]
enum Live {
    /// KVM's `vmx_vmexit`, from the kernel's System.map.
    VmxVmexit,
    /// CR0 or CR4 as L1 reads it: the read shadow in the bits L0 owns, the register elsewhere.
    Cr0,
    Cr4,
    /// A VMCS01 guest-state field as it is.
    Field(VmcsField),
}

fn as_read(vcpu: &mut impl Vcpu, register: VmcsField, mask: VmcsField, shadow: VmcsField) -> u64 {
    let mask = vcpu.read(mask);
    vcpu.read(register) & !mask | vcpu.read(shadow) & mask
}

/// The first compared field of `v`'s host state that is not L1's state in `vcpu` (VMCS01, at L1's
/// VMLAUNCH or VMRESUME), with `vmx_vmexit` the address every exit from L2 must return to.
pub fn check(v: &Vmcs12, vcpu: &mut impl Vcpu, vmx_vmexit: u64) -> Result<(), HostStateMismatch> {
    for (name, field, live) in COMPARED {
        let expected = match live {
            Live::VmxVmexit => vmx_vmexit,
            Live::Cr0 => as_read(
                vcpu,
                guest::CR0,
                control::CR0_GUEST_HOST_MASK,
                control::CR0_READ_SHADOW,
            ),
            Live::Cr4 => as_read(
                vcpu,
                guest::CR4,
                control::CR4_GUEST_HOST_MASK,
                control::CR4_READ_SHADOW,
            ),
            Live::Field(f) => vcpu.read(f),
        };
        // Every compared field is one a VMCS12 keeps; one it does not have reads as 0.
        let found = v.read(field).unwrap_or(0);
        if found != expected {
            return Err(HostStateMismatch {
                field: name,
                expected,
                found,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock::MockVcpu;

    const VMX_VMEXIT: u64 = 0xffff_ffff_8127_7a0d;

    /// L1 at a VMRESUME as KVM leaves it, and the VMCS12 KVM wrote for it.
    fn kvm_at_vmresume() -> (Vmcs12, MockVcpu) {
        let mut vcpu = MockVcpu::default();
        let mut v = Vmcs12::default();
        let l1 = [
            (guest::RSP, host::RSP, 0xffff_c900_0040_bd48),
            (guest::CR3, host::CR3, 0x0234_5001),
            (guest::FS_BASE, host::FS_BASE, 0x7f12_3456_7000),
            (guest::GS_BASE, host::GS_BASE, 0xffff_8880_0f60_0000),
            (guest::TR_BASE, host::TR_BASE, 0xffff_fe00_0000_3000),
            (guest::GDTR_BASE, host::GDTR_BASE, 0xffff_fe00_0000_1000),
            (guest::IDTR_BASE, host::IDTR_BASE, 0xffff_fe00_0000_0000),
            (guest::CS_SELECTOR, host::CS_SELECTOR, 0x10),
            (guest::TR_SELECTOR, host::TR_SELECTOR, 0x40),
        ];
        for (g, h, value) in l1 {
            vcpu.fields.insert(g, value);
            v.write(h, value).unwrap();
        }
        // L0 keeps CR4.VMXE and CR0.NE in its masks: L1 reads its own values through the shadows,
        // and KVM writes what it reads.
        vcpu.fields.insert(guest::CR0, 0x8005_0033);
        vcpu.fields.insert(control::CR0_GUEST_HOST_MASK, 0x20);
        vcpu.fields.insert(control::CR0_READ_SHADOW, 0x0);
        vcpu.fields.insert(guest::CR4, 0x3726f0);
        vcpu.fields.insert(control::CR4_GUEST_HOST_MASK, 0x2000);
        vcpu.fields.insert(control::CR4_READ_SHADOW, 0x2000);
        v.write(host::CR0, 0x8005_0013).unwrap();
        v.write(host::CR4, 0x3726f0).unwrap();
        v.write(host::RIP, VMX_VMEXIT).unwrap();
        (v, vcpu)
    }

    #[test]
    fn kvm_s_own_host_state_passes() {
        let (v, mut vcpu) = kvm_at_vmresume();
        assert_eq!(check(&v, &mut vcpu, VMX_VMEXIT), Ok(()));
    }

    #[test]
    fn every_compared_field_that_is_not_l1_s_is_named() {
        for (name, field, _) in COMPARED {
            let (mut v, mut vcpu) = kvm_at_vmresume();
            let was = v.read(field).unwrap();
            v.write(field, was ^ 0x1000).unwrap();
            let found = v.read(field).unwrap();
            assert_eq!(
                check(&v, &mut vcpu, VMX_VMEXIT),
                Err(HostStateMismatch {
                    field: name,
                    expected: was,
                    found,
                }),
                "{name}"
            );
        }
        // L1 reading CR0.NE as set (its shadow) makes KVM's HOST_CR0 without it wrong.
        let (v, mut vcpu) = kvm_at_vmresume();
        vcpu.fields.insert(control::CR0_READ_SHADOW, 0x20);
        assert_eq!(
            check(&v, &mut vcpu, VMX_VMEXIT).map_err(|m| m.field),
            Err("HOST_CR0")
        );
        // An exit returning anywhere but `vmx_vmexit` is refused however the rest looks.
        let (v, mut vcpu) = kvm_at_vmresume();
        assert_eq!(
            check(&v, &mut vcpu, VMX_VMEXIT + 1),
            Err(HostStateMismatch {
                field: "HOST_RIP",
                expected: VMX_VMEXIT + 1,
                found: VMX_VMEXIT,
            })
        );
    }
}
