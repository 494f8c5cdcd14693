//! Running L1's guest (L2): the VMCS02 L0 enters it with, what is saved back into VMCS12 at an exit
//! from L2, the state L1 gets back at such an exit (its VMCS12's host state, SDM 28.5), and which
//! exits are L1's (SDM 25.1-25.2, with the controls as L1 set them in VMCS12).
//!
//! VMCS02 is VMCS12's guest state with L0's own controls merged in (NESTED.md A.2.4):
//! - the VM-execution controls are L0's OR L1's, except that VMCS02 never has VM functions (L2
//!   must not switch EPT views), never L1's TSC offset in L0's place (they add), and has
//!   unconditional I/O exiting and no MSR bitmap: every port and MSR access of L2 exits to L0,
//!   which reflects it if L1's controls or bitmaps ask for it and handles it as L1's own otherwise;
//! - the exception bitmap is L0's OR L1's (and L1's #PF error-code filter only when L0 does not
//!   take #PF itself);
//! - CR0 and CR4 are owned by whoever masks them: the masks are ORed; a bit only L0 masks (CR4.VMXE)
//!   reads as L2's own value, from VMCS12;
//! - the EPTP is L0's: L2 runs in L1's memory under L0's normal view (shadow paging in L1, milestone
//!   M2/M3), so it reaches nothing L1 cannot; or, when L1 gives L2 an EPT of its own, EPT02's
//!   (`super::ept`, M4), which maps nothing EPT12 and L0's view do not both allow;
//! - the VM-exit and VM-entry controls are L0's (64-bit host, IA32_EFER and IA32_PAT loaded), with
//!   L2's mode from VMCS12 and acknowledge-interrupt-on-exit when L1 asked for it.

use ihmi_arch::cr::{CR0_PG, CR4_VMXE};
use ihmi_vmcs::fields::{control, guest, host};
use ihmi_vmcs::{
    CrAccessQualification, CrAccessType, EntryControls, ExitControls, InterruptionInfo,
    InterruptionType, IoQualification, MsrBitmap, PinbasedControls, PrimaryControls,
    SecondaryControls, SegmentAccessRights, VmExit, VmcsField,
};

use super::vmcs12::Vmcs12;
use crate::vcpu::gpr;
use crate::{Platform, Vcpu};

const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const CR0_ET: u64 = 1 << 4;
/// The #PF vector, whose exits the error-code mask and match filter (SDM 25.2).
const PF: u8 = 14;

/// The guest-state fields VM entry loads and VM exit saves, each by its FULL encoding. IA32_EFER,
/// IA32_PAT, DR7 and IA32_DEBUGCTL are loaded and saved only as the controls say, so they are apart.
pub const GUEST_STATE: &[VmcsField] = &[
    guest::ES_SELECTOR,
    guest::CS_SELECTOR,
    guest::SS_SELECTOR,
    guest::DS_SELECTOR,
    guest::FS_SELECTOR,
    guest::GS_SELECTOR,
    guest::LDTR_SELECTOR,
    guest::TR_SELECTOR,
    guest::ES_LIMIT,
    guest::CS_LIMIT,
    guest::SS_LIMIT,
    guest::DS_LIMIT,
    guest::FS_LIMIT,
    guest::GS_LIMIT,
    guest::LDTR_LIMIT,
    guest::TR_LIMIT,
    guest::GDTR_LIMIT,
    guest::IDTR_LIMIT,
    guest::ES_ACCESS_RIGHTS,
    guest::CS_ACCESS_RIGHTS,
    guest::SS_ACCESS_RIGHTS,
    guest::DS_ACCESS_RIGHTS,
    guest::FS_ACCESS_RIGHTS,
    guest::GS_ACCESS_RIGHTS,
    guest::LDTR_ACCESS_RIGHTS,
    guest::TR_ACCESS_RIGHTS,
    guest::ES_BASE,
    guest::CS_BASE,
    guest::SS_BASE,
    guest::DS_BASE,
    guest::FS_BASE,
    guest::GS_BASE,
    guest::LDTR_BASE,
    guest::TR_BASE,
    guest::GDTR_BASE,
    guest::IDTR_BASE,
    guest::INTERRUPTIBILITY_STATE,
    guest::ACTIVITY_STATE,
    guest::PENDING_DBG_EXCEPTIONS,
    guest::IA32_SYSENTER_CS,
    guest::IA32_SYSENTER_ESP,
    guest::IA32_SYSENTER_EIP,
    guest::CR3,
    guest::RSP,
    guest::RIP,
    guest::RFLAGS,
];

fn read(v: &Vmcs12, f: VmcsField) -> u64 {
    // Every field named here is one a VMCS12 keeps.
    v.read(f).unwrap_or(0)
}

fn set(v: &mut Vmcs12, f: VmcsField, value: u64) {
    // As above.
    let _ = v.set(f, value);
}

/// What L0 has in its own VMCS (VMCS01) when L1 enters L2: its controls, to merge into VMCS02, and
/// the L1 state that L2 keeps when VMCS12 does not load its own (IA32_EFER, IA32_PAT, DR7,
/// IA32_DEBUGCTL, SDM 27.3.2.1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct L0Controls {
    pub pin: u64,
    pub primary: u64,
    pub secondary: u64,
    pub exit: u64,
    pub entry: u64,
    pub exceptions: u64,
    pub eptp: u64,
    pub cr0_mask: u64,
    pub cr4_mask: u64,
    pub tsc_offset: u64,
    pub preemption_timer: u64,
    pub l1_efer: u64,
    pub l1_pat: u64,
    pub l1_dr7: u64,
    pub l1_debugctl: u64,
}

impl L0Controls {
    /// Reads them from VMCS01 (current).
    pub fn read(vcpu: &mut impl Vcpu) -> Self {
        Self {
            pin: vcpu.read(control::PINBASED_EXEC_CONTROLS),
            primary: vcpu.read(control::PRIMARY_PROCBASED_EXEC_CONTROLS),
            secondary: vcpu.read(control::SECONDARY_PROCBASED_EXEC_CONTROLS),
            exit: vcpu.read(control::VMEXIT_CONTROLS),
            entry: vcpu.read(control::VMENTRY_CONTROLS),
            exceptions: vcpu.read(control::EXCEPTION_BITMAP),
            eptp: vcpu.read(control::EPTP_FULL),
            cr0_mask: vcpu.read(control::CR0_GUEST_HOST_MASK),
            cr4_mask: vcpu.read(control::CR4_GUEST_HOST_MASK),
            tsc_offset: vcpu.read(control::TSC_OFFSET_FULL),
            preemption_timer: vcpu.read(guest::VMX_PREEMPTION_TIMER_VALUE),
            l1_efer: vcpu.read(guest::IA32_EFER_FULL),
            l1_pat: vcpu.read(guest::IA32_PAT_FULL),
            l1_dr7: vcpu.read(guest::DR7),
            l1_debugctl: vcpu.read(guest::IA32_DEBUGCTL_FULL),
        }
    }

    fn pin(&self) -> PinbasedControls {
        PinbasedControls::from_bits_retain(self.pin as u32)
    }

    fn primary(&self) -> PrimaryControls {
        PrimaryControls::from_bits_retain(self.primary as u32)
    }
}

fn pin12(v: &Vmcs12) -> PinbasedControls {
    PinbasedControls::from_bits_retain(read(v, control::PINBASED_EXEC_CONTROLS) as u32)
}

fn primary12(v: &Vmcs12) -> PrimaryControls {
    PrimaryControls::from_bits_retain(read(v, control::PRIMARY_PROCBASED_EXEC_CONTROLS) as u32)
}

/// L1's secondary controls, none unless it activated them.
fn secondary12(v: &Vmcs12) -> SecondaryControls {
    if primary12(v).contains(PrimaryControls::SECONDARY_CONTROLS) {
        SecondaryControls::from_bits_retain(
            read(v, control::SECONDARY_PROCBASED_EXEC_CONTROLS) as u32
        )
    } else {
        SecondaryControls::empty()
    }
}

/// The secondary controls of L1's that VMCS02 takes as they are: instructions L2 then runs
/// without an exit (EPT is L0's own in VMCS02 whatever L1 says: `ept02` is its translation).
const PASSED_SECONDARY: SecondaryControls = SecondaryControls::ENABLE_RDTSCP
    .union(SecondaryControls::ENABLE_INVPCID)
    .union(SecondaryControls::ENABLE_XSAVES_XRSTORS);

/// The guest-physical ranges an entry with VMCS12 `v` uses (start, length): the I/O bitmaps and the
/// MSR bitmap when their controls are on, the MSR-load and -store areas with entries, EPT12's root.
pub fn entry_pointers(v: &Vmcs12) -> impl Iterator<Item = (u64, u64)> + '_ {
    let primary = primary12(v);
    let page = |on: bool, f| on.then(|| (read(v, f), PAGE));
    let area = |count, addr| {
        let n = read(v, count);
        (n != 0).then(|| (read(v, addr), n.saturating_mul(16)))
    };
    let io = primary.contains(PrimaryControls::USE_IO_BITMAPS);
    [
        page(io, control::IO_BITMAP_A_ADDR_FULL),
        page(io, control::IO_BITMAP_B_ADDR_FULL),
        page(
            primary.contains(PrimaryControls::USE_MSR_BITMAPS),
            control::MSR_BITMAPS_ADDR_FULL,
        ),
        area(
            control::VMENTRY_MSR_LOAD_COUNT,
            control::VMENTRY_MSR_LOAD_ADDR_FULL,
        ),
        area(
            control::VMEXIT_MSR_STORE_COUNT,
            control::VMEXIT_MSR_STORE_ADDR_FULL,
        ),
        area(
            control::VMEXIT_MSR_LOAD_COUNT,
            control::VMEXIT_MSR_LOAD_ADDR_FULL,
        ),
        l1_eptp(v).map(|e| (e & !0xfff & ((1 << 52) - 1), PAGE)),
    ]
    .into_iter()
    .flatten()
}

const PAGE: u64 = 4096;

/// L1's EPTP, when it gives L2 an EPT of its own (nested EPT).
#[must_use]
pub fn l1_eptp(v: &Vmcs12) -> Option<u64> {
    secondary12(v)
        .contains(SecondaryControls::ENABLE_EPT)
        .then(|| read(v, control::EPTP_FULL))
}

fn exit12(v: &Vmcs12) -> ExitControls {
    ExitControls::from_bits_retain(read(v, control::VMEXIT_CONTROLS) as u32)
}

fn entry12(v: &Vmcs12) -> EntryControls {
    EntryControls::from_bits_retain(read(v, control::VMENTRY_CONTROLS) as u32)
}

/// The CR0 or CR4 bits only L0 masks: L2 cannot change them without an exit to L0, so VMCS12 keeps
/// L2's own value of them.
const fn l0_only(l0_mask: u64, l1_mask: u64) -> u64 {
    l0_mask & !l1_mask
}

/// Writes VMCS02 (current) for an entry to L2 from `v` (checked) and L0's controls.
pub fn write_vmcs02(v: &Vmcs12, l0: &L0Controls, ept02: Option<u64>, vcpu: &mut impl Vcpu) {
    for &f in GUEST_STATE {
        vcpu.write(f, read(v, f));
    }
    let entry = entry12(v);
    let ia32e = entry.contains(EntryControls::IA32E_MODE_GUEST);
    vcpu.write(guest::CR0, read(v, guest::CR0) | CR0_ET);
    // CR4.VMXE stays set in VMX non-root operation; VMCS12's guest CR4 has it too (the offer's fixed0).
    vcpu.write(guest::CR4, read(v, guest::CR4) | CR4_VMXE);
    let efer = if entry.contains(EntryControls::LOAD_IA32_EFER) {
        read(v, guest::IA32_EFER_FULL)
    } else {
        // L1's, with LMA from the IA-32e mode guest control, and LME too when paging is on (SDM
        // 27.3.2.1).
        let bit = |b: u64| if ia32e { b } else { 0 };
        let mut efer = (l0.l1_efer & !EFER_LMA) | bit(EFER_LMA);
        if read(v, guest::CR0) & CR0_PG != 0 {
            efer = (efer & !EFER_LME) | bit(EFER_LME);
        }
        efer
    };
    vcpu.write(guest::IA32_EFER_FULL, efer);
    let l0_entry = EntryControls::from_bits_retain(l0.entry as u32);
    if l0_entry.contains(EntryControls::LOAD_IA32_PAT) {
        let pat = if entry.contains(EntryControls::LOAD_IA32_PAT) {
            read(v, guest::IA32_PAT_FULL)
        } else {
            l0.l1_pat
        };
        vcpu.write(guest::IA32_PAT_FULL, pat);
    }
    let (dr7, debugctl) = if entry.contains(EntryControls::LOAD_DEBUG_CONTROLS) {
        (read(v, guest::DR7), read(v, guest::IA32_DEBUGCTL_FULL))
    } else {
        (l0.l1_dr7, l0.l1_debugctl)
    };
    vcpu.write(guest::DR7, dr7);
    vcpu.write(guest::IA32_DEBUGCTL_FULL, debugctl);
    // No shadow VMCS for L2.
    vcpu.write(guest::LINK_PTR_FULL, u64::MAX);

    // Controls.
    let pin = l0.pin() | pin12(v);
    vcpu.write(control::PINBASED_EXEC_CONTROLS, u64::from(pin.bits()));
    if pin.contains(PinbasedControls::VMX_PREEMPTION_TIMER) {
        vcpu.write(guest::VMX_PREEMPTION_TIMER_VALUE, l0.preemption_timer);
    }
    let primary = (l0.primary() | primary12(v) | PrimaryControls::UNCOND_IO_EXITING)
        & !(PrimaryControls::USE_IO_BITMAPS | PrimaryControls::USE_MSR_BITMAPS);
    vcpu.write(
        control::PRIMARY_PROCBASED_EXEC_CONTROLS,
        u64::from(primary.bits()),
    );
    // L0's secondary controls (EPT among them), and the instructions L1 lets L2 run that only pass
    // through; never VM functions.
    let l1_secondary = secondary12(v) & PASSED_SECONDARY;
    let mut secondary = (SecondaryControls::from_bits_retain(l0.secondary as u32) | l1_secondary)
        & !SecondaryControls::ENABLE_VM_FUNCTIONS;
    if ept02.is_some() {
        secondary |= SecondaryControls::ENABLE_EPT;
    }
    vcpu.write(
        control::SECONDARY_PROCBASED_EXEC_CONTROLS,
        u64::from(secondary.bits()),
    );
    let tsc = if primary12(v).contains(PrimaryControls::USE_TSC_OFFSETTING) {
        l0.tsc_offset
            .wrapping_add(read(v, control::TSC_OFFSET_FULL))
    } else {
        l0.tsc_offset
    };
    vcpu.write(control::TSC_OFFSET_FULL, tsc);
    let l1_exceptions = read(v, control::EXCEPTION_BITMAP);
    vcpu.write(control::EXCEPTION_BITMAP, l0.exceptions | l1_exceptions);
    let (mask, matching) = if l0.exceptions & (1 << PF) == 0 {
        (
            read(v, control::PAGE_FAULT_ERR_CODE_MASK),
            read(v, control::PAGE_FAULT_ERR_CODE_MATCH),
        )
    } else {
        // L0 takes every #PF; it passes on the ones L1's filter selects.
        (0, 0)
    };
    vcpu.write(control::PAGE_FAULT_ERR_CODE_MASK, mask);
    vcpu.write(control::PAGE_FAULT_ERR_CODE_MATCH, matching);
    vcpu.write(control::CR3_TARGET_COUNT, 0);
    for (guest_cr, mask_f, shadow_f, l0_mask) in [
        (
            guest::CR0,
            control::CR0_GUEST_HOST_MASK,
            control::CR0_READ_SHADOW,
            l0.cr0_mask,
        ),
        (
            guest::CR4,
            control::CR4_GUEST_HOST_MASK,
            control::CR4_READ_SHADOW,
            l0.cr4_mask,
        ),
    ] {
        let l1_mask = read(v, mask_f);
        let shadow =
            (read(v, shadow_f) & l1_mask) | (read(v, guest_cr) & l0_only(l0_mask, l1_mask));
        vcpu.write(mask_f, l0_mask | l1_mask);
        vcpu.write(shadow_f, shadow);
    }
    if secondary.contains(SecondaryControls::ENABLE_XSAVES_XRSTORS) {
        // L1's XSS-exiting bitmap when it enabled XSAVES; none when only L0 did (L0 intercepts
        // no XSAVES component).
        let xss = if l1_secondary.contains(SecondaryControls::ENABLE_XSAVES_XRSTORS) {
            read(v, control::XSS_EXITING_BITMAP_FULL)
        } else {
            0
        };
        vcpu.write(control::XSS_EXITING_BITMAP_FULL, xss);
    }
    // L1's own EPT: EPT02, built from it and L0's view (`super::ept`); else L0's view itself.
    vcpu.write(control::EPTP_FULL, ept02.unwrap_or(l0.eptp));
    let mut exit = ExitControls::from_bits_retain(l0.exit as u32)
        & !(ExitControls::ACK_INTERRUPT_ON_EXIT | ExitControls::SAVE_VMX_PREEMPTION_TIMER);
    if exit12(v).contains(ExitControls::ACK_INTERRUPT_ON_EXIT) {
        exit |= ExitControls::ACK_INTERRUPT_ON_EXIT;
    }
    vcpu.write(control::VMEXIT_CONTROLS, u64::from(exit.bits()));
    let mut entry02 = l0_entry & !EntryControls::IA32E_MODE_GUEST;
    if ia32e {
        entry02 |= EntryControls::IA32E_MODE_GUEST;
    }
    vcpu.write(control::VMENTRY_CONTROLS, u64::from(entry02.bits()));
    // The event L1 injects, delivered by this entry (VMCS12's copy is marked delivered at the exit).
    vcpu.write(
        control::VMENTRY_INTERRUPTION_INFO_FIELD,
        read(v, control::VMENTRY_INTERRUPTION_INFO_FIELD),
    );
    vcpu.write(
        control::VMENTRY_EXCEPTION_ERR_CODE,
        read(v, control::VMENTRY_EXCEPTION_ERR_CODE),
    );
    vcpu.write(
        control::VMENTRY_INSTRUCTION_LEN,
        read(v, control::VMENTRY_INSTRUCTION_LEN),
    );
}

/// At an exit from L2 that goes to L1: L2's state from VMCS02 (current) into `v` (SDM 28.3), with
/// the bits only L0 masks kept as VMCS12 has them, and the injection field marked delivered.
pub fn save_l2_state(v: &mut Vmcs12, l0: &L0Controls, vcpu: &mut impl Vcpu) {
    for &f in GUEST_STATE {
        let value = vcpu.read(f);
        set(v, f, value);
    }
    for (cr, mask_f, l0_mask) in [
        (guest::CR0, control::CR0_GUEST_HOST_MASK, l0.cr0_mask),
        (guest::CR4, control::CR4_GUEST_HOST_MASK, l0.cr4_mask),
    ] {
        let keep = l0_only(l0_mask, read(v, mask_f));
        let value = (vcpu.read(cr) & !keep) | (read(v, cr) & keep);
        set(v, cr, value);
    }
    let exit = exit12(v);
    if exit.contains(ExitControls::SAVE_IA32_EFER) {
        let efer = vcpu.read(guest::IA32_EFER_FULL);
        set(v, guest::IA32_EFER_FULL, efer);
    }
    if exit.contains(ExitControls::SAVE_IA32_PAT) {
        let pat = vcpu.read(guest::IA32_PAT_FULL);
        set(v, guest::IA32_PAT_FULL, pat);
    }
    if exit.contains(ExitControls::SAVE_DEBUG_CONTROLS) {
        let (dr7, debugctl) = (vcpu.read(guest::DR7), vcpu.read(guest::IA32_DEBUGCTL_FULL));
        set(v, guest::DR7, dr7);
        set(v, guest::IA32_DEBUGCTL_FULL, debugctl);
    }
    // The IA-32e mode guest control follows IA32_EFER.LMA at every exit (SDM 28.3).
    let mut entry = entry12(v) & !EntryControls::IA32E_MODE_GUEST;
    if vcpu.read(guest::IA32_EFER_FULL) & EFER_LMA != 0 {
        entry |= EntryControls::IA32E_MODE_GUEST;
    }
    set(v, control::VMENTRY_CONTROLS, u64::from(entry.bits()));
    clear_injection(v);
}

/// Every VM exit clears the valid bit of the VM-entry interruption-information field (SDM 28.2).
pub fn clear_injection(v: &mut Vmcs12) {
    let info = read(v, control::VMENTRY_INTERRUPTION_INFO_FIELD);
    set(
        v,
        control::VMENTRY_INTERRUPTION_INFO_FIELD,
        info & !(1 << 31),
    );
}

/// L1's state after an exit from L2: VMCS12's host state into VMCS01 (current), SDM 28.5.
pub fn load_l1_host_state(v: &Vmcs12, vcpu: &mut impl Vcpu) {
    let exit = exit12(v);
    let long = exit.contains(ExitControls::HOST_ADDRESS_SPACE_SIZE);
    vcpu.write(guest::CR0, read(v, host::CR0) | CR0_ET);
    vcpu.write(guest::CR3, read(v, host::CR3));
    vcpu.write(guest::CR4, read(v, host::CR4) | CR4_VMXE);
    vcpu.write(guest::DR7, 0x400);
    vcpu.write(guest::IA32_DEBUGCTL_FULL, 0);
    vcpu.write(guest::IA32_SYSENTER_CS, read(v, host::IA32_SYSENTER_CS));
    vcpu.write(guest::IA32_SYSENTER_ESP, read(v, host::IA32_SYSENTER_ESP));
    vcpu.write(guest::IA32_SYSENTER_EIP, read(v, host::IA32_SYSENTER_EIP));
    if exit.contains(ExitControls::LOAD_IA32_EFER) {
        vcpu.write(guest::IA32_EFER_FULL, read(v, host::IA32_EFER_FULL));
    } else {
        let efer = vcpu.read(guest::IA32_EFER_FULL) & !(EFER_LMA | EFER_LME);
        let mode = if long { EFER_LMA | EFER_LME } else { 0 };
        vcpu.write(guest::IA32_EFER_FULL, efer | mode);
    }
    if exit.contains(ExitControls::LOAD_IA32_PAT) {
        vcpu.write(guest::IA32_PAT_FULL, read(v, host::IA32_PAT_FULL));
    }
    let code = if long {
        SegmentAccessRights::code64().raw()
    } else {
        // 32-bit code: D set, L clear.
        (SegmentAccessRights::code64().raw() & !(1 << 13)) | 1 << 14
    };
    vcpu.write(guest::CS_SELECTOR, read(v, host::CS_SELECTOR));
    vcpu.write(guest::CS_BASE, 0);
    vcpu.write(guest::CS_LIMIT, 0xffff_ffff);
    vcpu.write(guest::CS_ACCESS_RIGHTS, u64::from(code));
    let data = u64::from(SegmentAccessRights::data().raw());
    let unusable = u64::from(SegmentAccessRights::unusable().raw());
    for (sel_h, sel, base, limit, ar, base_h) in [
        (
            host::SS_SELECTOR,
            guest::SS_SELECTOR,
            guest::SS_BASE,
            guest::SS_LIMIT,
            guest::SS_ACCESS_RIGHTS,
            None,
        ),
        (
            host::DS_SELECTOR,
            guest::DS_SELECTOR,
            guest::DS_BASE,
            guest::DS_LIMIT,
            guest::DS_ACCESS_RIGHTS,
            None,
        ),
        (
            host::ES_SELECTOR,
            guest::ES_SELECTOR,
            guest::ES_BASE,
            guest::ES_LIMIT,
            guest::ES_ACCESS_RIGHTS,
            None,
        ),
        (
            host::FS_SELECTOR,
            guest::FS_SELECTOR,
            guest::FS_BASE,
            guest::FS_LIMIT,
            guest::FS_ACCESS_RIGHTS,
            Some(host::FS_BASE),
        ),
        (
            host::GS_SELECTOR,
            guest::GS_SELECTOR,
            guest::GS_BASE,
            guest::GS_LIMIT,
            guest::GS_ACCESS_RIGHTS,
            Some(host::GS_BASE),
        ),
    ] {
        let selector = read(v, sel_h);
        vcpu.write(sel, selector);
        vcpu.write(base, base_h.map_or(0, |b| read(v, b)));
        vcpu.write(limit, 0xffff_ffff);
        vcpu.write(ar, if selector == 0 { unusable } else { data });
    }
    vcpu.write(guest::TR_SELECTOR, read(v, host::TR_SELECTOR));
    vcpu.write(guest::TR_BASE, read(v, host::TR_BASE));
    vcpu.write(guest::TR_LIMIT, 0x67);
    vcpu.write(
        guest::TR_ACCESS_RIGHTS,
        u64::from(SegmentAccessRights::tss_busy64().raw()),
    );
    vcpu.write(guest::LDTR_SELECTOR, 0);
    vcpu.write(guest::LDTR_BASE, 0);
    vcpu.write(guest::LDTR_LIMIT, 0);
    vcpu.write(guest::LDTR_ACCESS_RIGHTS, unusable);
    vcpu.write(guest::GDTR_BASE, read(v, host::GDTR_BASE));
    vcpu.write(guest::GDTR_LIMIT, 0xffff);
    vcpu.write(guest::IDTR_BASE, read(v, host::IDTR_BASE));
    vcpu.write(guest::IDTR_LIMIT, 0xffff);
    vcpu.write(guest::RIP, read(v, host::RIP));
    vcpu.write(guest::RSP, read(v, host::RSP));
    vcpu.write(guest::RFLAGS, 0x2);
    // Blocking by STI and MOV SS ends with the exit; NMI blocking is kept (virtual NMIs aside).
    let blocking = vcpu.read(guest::INTERRUPTIBILITY_STATE) & 0b1000;
    vcpu.write(guest::INTERRUPTIBILITY_STATE, blocking);
    vcpu.write(guest::ACTIVITY_STATE, 0);
    vcpu.write(guest::PENDING_DBG_EXCEPTIONS, 0);
    let mut entry = EntryControls::from_bits_retain(vcpu.read(control::VMENTRY_CONTROLS) as u32)
        & !EntryControls::IA32E_MODE_GUEST;
    if long {
        entry |= EntryControls::IA32E_MODE_GUEST;
    }
    vcpu.write(control::VMENTRY_CONTROLS, u64::from(entry.bits()));
    vcpu.write(control::VMENTRY_INTERRUPTION_INFO_FIELD, 0);
}

/// Whose an exit from L2 is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    /// L1 asked for it (or it always exits to L1): it is reflected.
    L1,
    /// L0's own, for its own controls (its EPT, its timer, its exception bitmap): L0 handles it and
    /// L2 goes on.
    L0,
}

/// Whether L1's controls, bitmaps and masks in `v` make this exit L1's (SDM 25.1-25.2). `read_l1`
/// reads L1's guest-physical memory (its I/O and MSR bitmaps); an unreadable bitmap counts as asking
/// for the exit.
pub fn owner(
    exit: &VmExit,
    v: &Vmcs12,
    vcpu: &mut impl Vcpu,
    platform: &impl Platform,
    read_l1: impl Fn(&dyn Platform, u64) -> Option<u8>,
) -> Owner {
    let pin = pin12(v);
    let primary = primary12(v);
    let l1 = |b: bool| if b { Owner::L1 } else { Owner::L0 };
    match *exit {
        VmExit::Exception {
            info, error_code, ..
        } => l1(exception_wanted(v, info, error_code)),
        VmExit::Nmi { .. } => l1(pin.contains(PinbasedControls::NMI_EXITING)),
        VmExit::ExternalInterrupt { .. } => {
            l1(pin.contains(PinbasedControls::EXTERNAL_INTERRUPT_EXITING))
        }
        VmExit::Hlt(_) => l1(primary.contains(PrimaryControls::HLT_EXITING)),
        VmExit::Io { qualification, .. } => {
            l1(io_wanted(v, qualification, |a| read_l1(platform, a)))
        }
        VmExit::Rdmsr(_) | VmExit::Wrmsr(_) => {
            let write = matches!(exit, VmExit::Wrmsr(_));
            let msr = gpr(vcpu, ihmi_vmcs::Gpr::Rcx) as u32;
            l1(msr_wanted(v, msr, write, |a| read_l1(platform, a)))
        }
        VmExit::CrAccess { qualification, .. } => l1(cr_wanted(v, qualification, vcpu)),
        // L2 runs under L0's EPT; L0's timer; L0's VM functions (never enabled in VMCS02).
        VmExit::EptViolation { .. }
        | VmExit::EptMisconfig { .. }
        | VmExit::PreemptionTimer
        | VmExit::Vmfunc(_) => Owner::L0,
        // CPUID, VMCALL, XSETBV, the VMX instructions, triple fault, INIT, a failed entry and the
        // exits only L1's controls enable (window exiting, RDTSC, MOV DR, ...).
        _ => Owner::L1,
    }
}

/// An exception or NMI: the exception bitmap, with #PF filtered by the error-code mask and match.
fn exception_wanted(v: &Vmcs12, info: InterruptionInfo, error_code: Option<u32>) -> bool {
    if info.interruption_type() == InterruptionType::Nmi {
        return pin12(v).contains(PinbasedControls::NMI_EXITING);
    }
    let vector = info.vector();
    let bitmap = read(v, control::EXCEPTION_BITMAP);
    let bit = vector < 32 && bitmap & (1 << vector) != 0;
    if vector != PF {
        return bit;
    }
    let code = u64::from(error_code.unwrap_or(0));
    let matches = code & read(v, control::PAGE_FAULT_ERR_CODE_MASK)
        == read(v, control::PAGE_FAULT_ERR_CODE_MATCH);
    bit == matches
}

/// Port I/O: unconditional I/O exiting, or the I/O bitmaps for every port the access touches
/// (SDM 25.1.3); a port past 0xFFFF always exits.
fn io_wanted(v: &Vmcs12, q: IoQualification, read_l1: impl Fn(u64) -> Option<u8>) -> bool {
    let primary = primary12(v);
    if !primary.contains(PrimaryControls::USE_IO_BITMAPS) {
        return primary.contains(PrimaryControls::UNCOND_IO_EXITING);
    }
    let first = u32::from(q.port());
    (first..first + u32::from(q.size())).any(|port| {
        if port > 0xffff {
            return true;
        }
        let (bitmap, index) = if port < 0x8000 {
            (control::IO_BITMAP_A_ADDR_FULL, port)
        } else {
            (control::IO_BITMAP_B_ADDR_FULL, port - 0x8000)
        };
        let at = read(v, bitmap) + u64::from(index / 8);
        read_l1(at).is_none_or(|b| b & (1 << (index % 8)) != 0)
    })
}

/// RDMSR or WRMSR: every MSR without MSR bitmaps; with them, the bit for the MSR if it is in the
/// bitmap's two ranges, else always (SDM 25.1.3).
fn msr_wanted(v: &Vmcs12, msr: u32, write: bool, read_l1: impl Fn(u64) -> Option<u8>) -> bool {
    if !primary12(v).contains(PrimaryControls::USE_MSR_BITMAPS) {
        return true;
    }
    let Some((byte, bit)) = MsrBitmap::bit_of(msr, write) else {
        return true;
    };
    let at = read(v, control::MSR_BITMAPS_ADDR_FULL) + byte as u64;
    read_l1(at).is_none_or(|b| b & bit != 0)
}

/// A control-register access: CR0 and CR4 writes that change a bit L1 masks against its shadow,
/// CLTS and LMSW by the same rule, CR3 and CR8 by their exiting controls (SDM 25.1.3). CR3-target
/// values do not count: VMCS02 has none, so L0 checks them here.
fn cr_wanted(v: &Vmcs12, q: CrAccessQualification, vcpu: &mut impl Vcpu) -> bool {
    let primary = primary12(v);
    let cr = q.cr();
    let (mask, shadow) = match cr {
        0 => (
            read(v, control::CR0_GUEST_HOST_MASK),
            read(v, control::CR0_READ_SHADOW),
        ),
        _ => (
            read(v, control::CR4_GUEST_HOST_MASK),
            read(v, control::CR4_READ_SHADOW),
        ),
    };
    match q.access_type() {
        CrAccessType::MovToCr => {
            let value = gpr(vcpu, q.gpr());
            match cr {
                0 | 4 => (value ^ shadow) & mask != 0,
                3 => {
                    primary.contains(PrimaryControls::CR3_LOAD_EXITING)
                        && !(0..read(v, control::CR3_TARGET_COUNT).min(4)).any(|i| {
                            let f = VmcsField::new(control::CR3_TARGET_VALUE0.raw() + 2 * i as u32);
                            read(v, f) == value
                        })
                }
                8 => primary.contains(PrimaryControls::CR8_LOAD_EXITING),
                _ => true,
            }
        }
        CrAccessType::MovFromCr => match cr {
            3 => primary.contains(PrimaryControls::CR3_STORE_EXITING),
            8 => primary.contains(PrimaryControls::CR8_STORE_EXITING),
            _ => true,
        },
        // CLTS exits when L1 owns CR0.TS and its shadow says TS is set.
        CrAccessType::Clts => mask & shadow & (1 << 3) != 0,
        CrAccessType::Lmsw => {
            let src = u64::from(q.lmsw_source_data());
            (mask & 1 != 0 && shadow & 1 == 0 && src & 1 != 0)
                || (mask & 0b1110) & (shadow ^ src) != 0
        }
    }
}
