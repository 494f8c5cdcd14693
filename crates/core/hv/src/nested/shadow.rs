//! VMCS shadowing (SDM 25.10, 26.6.15): L1's VMREAD and VMWRITE of the fields here go to a shadow
//! VMCS without an exit; L0 keeps VMCS12 the one source of truth by copying:
//! - shadow → VMCS12 ([`store`]) before it uses VMCS12: at every VMX instruction of L1's that exits
//!   (VMREAD and VMWRITE of the other fields aside), so VMLAUNCH/VMRESUME check what L1 wrote;
//! - VMCS12 → shadow ([`load`]) whenever VMCS12 changed under L1: a VMPTRLD, an exit from L2 (the
//!   exit information and L2's state), an entry that failed.
//!
//! The shadowed fields are those every VMX CPU has and a hypervisor touches per exit: the guest and
//! host state, the controls L0 merges, the injection fields, and, for VMREAD only, the exit
//! information (L0 writes it into the shadow, which needs IA32_VMX_MISC bit 29). The VMREAD and
//! VMWRITE bitmaps are built from [`shadowed`].

use ihmi_vmcs::fields::{control, guest, host};
use ihmi_vmcs::{ExitInformation, FieldWidth, VmcsField};

use super::l2::GUEST_STATE;
use super::vmcs12::Vmcs12;
use crate::ShadowFields;

/// The fields L1 may write in the shadow (and read), besides [`GUEST_STATE`].
const WRITTEN: &[VmcsField] = &[
    guest::IA32_EFER_FULL,
    guest::IA32_PAT_FULL,
    guest::IA32_DEBUGCTL_FULL,
    guest::DR7,
    guest::CR0,
    guest::CR4,
    host::ES_SELECTOR,
    host::CS_SELECTOR,
    host::SS_SELECTOR,
    host::DS_SELECTOR,
    host::FS_SELECTOR,
    host::GS_SELECTOR,
    host::TR_SELECTOR,
    host::IA32_PAT_FULL,
    host::IA32_EFER_FULL,
    host::IA32_SYSENTER_CS,
    host::CR0,
    host::CR3,
    host::CR4,
    host::FS_BASE,
    host::GS_BASE,
    host::TR_BASE,
    host::GDTR_BASE,
    host::IDTR_BASE,
    host::IA32_SYSENTER_ESP,
    host::IA32_SYSENTER_EIP,
    host::RSP,
    host::RIP,
    control::PINBASED_EXEC_CONTROLS,
    control::PRIMARY_PROCBASED_EXEC_CONTROLS,
    control::EXCEPTION_BITMAP,
    control::PAGE_FAULT_ERR_CODE_MASK,
    control::PAGE_FAULT_ERR_CODE_MATCH,
    control::VMEXIT_CONTROLS,
    control::VMENTRY_CONTROLS,
    control::VMENTRY_INTERRUPTION_INFO_FIELD,
    control::VMENTRY_EXCEPTION_ERR_CODE,
    control::VMENTRY_INSTRUCTION_LEN,
    control::IO_BITMAP_A_ADDR_FULL,
    control::IO_BITMAP_B_ADDR_FULL,
    control::MSR_BITMAPS_ADDR_FULL,
    control::TSC_OFFSET_FULL,
    control::CR0_GUEST_HOST_MASK,
    control::CR4_GUEST_HOST_MASK,
    control::CR0_READ_SHADOW,
    control::CR4_READ_SHADOW,
];

/// Every shadowed field, and whether L1 may also write it (else VMWRITE of it exits, and L0 answers
/// VMfailValid 13 as for any read-only field). A 64-bit field stands for its HIGH encoding too.
pub fn shadowed() -> impl Iterator<Item = (VmcsField, bool)> {
    GUEST_STATE
        .iter()
        .chain(WRITTEN)
        .map(|&f| (f, true))
        .chain(ExitInformation::FIELDS.iter().map(|&f| (f, false)))
}

/// The encodings of a field that the bitmaps must let through: the field, and for a 64-bit field
/// its HIGH half.
pub fn encodings(f: VmcsField) -> impl Iterator<Item = u32> {
    let high = matches!(f.width(), FieldWidth::Bits64).then_some(f.raw() | 1);
    core::iter::once(f.raw()).chain(high)
}

/// What L1 wrote in the shadow into VMCS12.
pub fn store(v: &mut Vmcs12, shadow: &mut dyn ShadowFields) {
    for &f in GUEST_STATE.iter().chain(WRITTEN) {
        let value = shadow.read(f);
        // Every field named here is one a VMCS12 keeps.
        let _ = v.set(f, value);
    }
}

/// VMCS12 into the shadow, for L1 to read and write without exits.
pub fn load(v: &Vmcs12, shadow: &mut dyn ShadowFields) {
    for (f, _) in shadowed() {
        shadow.write(f, v.read(f).unwrap_or(0));
    }
}
