//! What VMLAUNCH and VMRESUME check in a VMCS12 before anything is loaded from it (SDM 27.1-27.2):
//! the launch state, the VM-execution, VM-exit and VM-entry control fields against what L0 offers,
//! and the host-state area, which becomes L1's state again at every exit from L2. A failure is
//! VMfailValid with the SDM's number (4, 5, 7, 8) and the guest hypervisor goes on after the
//! instruction. The guest-state checks (27.3) fail differently, with a VM exit to L1, and come with
//! the entry itself.
//!
//! The offer decides what is allowed: each control word must set every bit its capability MSR's
//! allowed-0 half sets and no bit its allowed-1 half clears (SDM A.3, with the TRUE MSRs, which L0
//! offers).

use ihmi_arch::cr::CR4_PAE;
use ihmi_arch::msr;
use ihmi_vmcs::fields::{control, host};
use ihmi_vmcs::VmcsField;

use super::caps::VirtualVmx;
use super::vmcs12::Vmcs12;

/// Why an entry was refused before it began.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryRefusal {
    /// VMLAUNCH of a launched VMCS (error 4).
    NotClear,
    /// VMRESUME of a clear VMCS (error 5).
    NotLaunched,
    /// A control field is invalid (error 7): which rule.
    Controls(&'static str),
    /// A host-state field is invalid (error 8): which rule.
    HostState(&'static str),
}

impl EntryRefusal {
    /// The VM-instruction error number (SDM 31.4).
    #[must_use]
    pub const fn instruction_error(self) -> u32 {
        match self {
            Self::NotClear => 4,
            Self::NotLaunched => 5,
            Self::Controls(_) => 7,
            Self::HostState(_) => 8,
        }
    }
}

/// Physical-address bits the offer allows in any address field.
const PHYS_ADDR_BITS: u32 = 46;

const PIN_NMI_EXITING: u64 = 1 << 3;
const PIN_VIRTUAL_NMIS: u64 = 1 << 5;
const PROC_NMI_WINDOW: u64 = 1 << 22;
const PROC_USE_IO_BITMAPS: u64 = 1 << 25;
const PROC_USE_MSR_BITMAPS: u64 = 1 << 28;
const PROC_SECONDARY: u64 = 1 << 31;
const EXIT_HOST_ADDRESS_SPACE_SIZE: u64 = 1 << 9;
const EXIT_LOAD_EFER: u64 = 1 << 21;
const ENTRY_IA32E_GUEST: u64 = 1 << 9;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

fn read(v: &Vmcs12, f: VmcsField) -> u64 {
    // Every field named here is one a VMCS12 keeps.
    v.read(f).unwrap_or(0)
}

/// `value` within the capability MSR `cap` (allowed-0 in bits 31:0, allowed-1 in 63:32).
const fn within(value: u64, cap: u64) -> bool {
    let (must, may) = (cap & 0xffff_ffff, cap >> 32);
    value & must == must && value & !may == 0
}

/// A page address: 4 KiB aligned, within the physical-address width.
const fn page_address(a: u64) -> bool {
    a & 0xfff == 0 && a >> PHYS_ADDR_BITS == 0
}

/// An MSR area of `count` 16-byte entries at `a`: 16-byte aligned, all of it within the width.
fn msr_area(a: u64, count: u64) -> bool {
    count == 0
        || (a & 0xf == 0
            && count
                .checked_mul(16)
                .and_then(|n| a.checked_add(n - 1))
                .is_some_and(|last| last >> PHYS_ADDR_BITS == 0))
}

/// Canonical in 48-bit linear addresses.
pub(crate) const fn canonical(a: u64) -> bool {
    let top = a >> 47;
    top == 0 || top == 0x1_ffff
}

/// The checks of SDM 27.1 (launch state) and 27.2 on `v`, for VMLAUNCH (`launch`) or VMRESUME.
/// `l1_in_ia32e`: L1 itself runs in IA-32e mode (its IA32_EFER.LMA), which the host-state checks
/// depend on.
pub fn check(
    v: &Vmcs12,
    offer: &VirtualVmx,
    launch: bool,
    l1_in_ia32e: bool,
) -> Result<(), EntryRefusal> {
    if launch && v.launched {
        return Err(EntryRefusal::NotClear);
    }
    if !launch && !v.launched {
        return Err(EntryRefusal::NotLaunched);
    }
    check_controls(v, offer).map_err(EntryRefusal::Controls)?;
    check_host_state(v, offer, l1_in_ia32e).map_err(EntryRefusal::HostState)
}

fn check_controls(v: &Vmcs12, offer: &VirtualVmx) -> Result<(), &'static str> {
    let cap = |m: u32| offer.read_msr(m).unwrap_or(0);
    let pin = read(v, control::PINBASED_EXEC_CONTROLS);
    let proc = read(v, control::PRIMARY_PROCBASED_EXEC_CONTROLS);
    let exit = read(v, control::VMEXIT_CONTROLS);
    let entry = read(v, control::VMENTRY_CONTROLS);
    if !within(pin, cap(msr::IA32_VMX_TRUE_PINBASED_CTLS)) {
        return Err("pin-based controls outside the offer");
    }
    if !within(proc, cap(msr::IA32_VMX_TRUE_PROCBASED_CTLS)) {
        return Err("primary processor-based controls outside the offer");
    }
    if proc & PROC_SECONDARY != 0 {
        let proc2 = read(v, control::SECONDARY_PROCBASED_EXEC_CONTROLS);
        match offer.read_msr(msr::IA32_VMX_PROCBASED_CTLS2) {
            Some(c) if within(proc2, c) => {}
            _ => return Err("secondary processor-based controls outside the offer"),
        }
        let ept = u64::from(ihmi_vmcs::SecondaryControls::ENABLE_EPT.bits());
        if proc2 & ept != 0 && !super::ept::eptp_valid(read(v, control::EPTP_FULL)) {
            return Err("EPTP not one the offer supports (write-back, 4 levels, no A/D flags)");
        }
        let vpid = u64::from(ihmi_vmcs::SecondaryControls::ENABLE_VPID.bits());
        if proc2 & vpid != 0 && read(v, control::VPID) == 0 {
            return Err("VPID enabled with VPID 0 (SDM 27.2.1.1)");
        }
    }
    let cr3_targets = (cap(msr::IA32_VMX_MISC) >> 16) & 0x1ff;
    if read(v, control::CR3_TARGET_COUNT) > cr3_targets {
        return Err("CR3-target count above what the offer supports");
    }
    if proc & PROC_USE_IO_BITMAPS != 0
        && !(page_address(read(v, control::IO_BITMAP_A_ADDR_FULL))
            && page_address(read(v, control::IO_BITMAP_B_ADDR_FULL)))
    {
        return Err("I/O-bitmap address not page-aligned or too wide");
    }
    if proc & PROC_USE_MSR_BITMAPS != 0 && !page_address(read(v, control::MSR_BITMAPS_ADDR_FULL)) {
        return Err("MSR-bitmap address not page-aligned or too wide");
    }
    if pin & PIN_VIRTUAL_NMIS != 0 && pin & PIN_NMI_EXITING == 0 {
        return Err("virtual NMIs without NMI exiting");
    }
    if proc & PROC_NMI_WINDOW != 0 && pin & PIN_VIRTUAL_NMIS == 0 {
        return Err("NMI-window exiting without virtual NMIs");
    }
    if !within(exit, cap(msr::IA32_VMX_TRUE_EXIT_CTLS)) {
        return Err("VM-exit controls outside the offer");
    }
    for (count, addr) in [
        (
            control::VMEXIT_MSR_STORE_COUNT,
            control::VMEXIT_MSR_STORE_ADDR_FULL,
        ),
        (
            control::VMEXIT_MSR_LOAD_COUNT,
            control::VMEXIT_MSR_LOAD_ADDR_FULL,
        ),
        (
            control::VMENTRY_MSR_LOAD_COUNT,
            control::VMENTRY_MSR_LOAD_ADDR_FULL,
        ),
    ] {
        if !msr_area(read(v, addr), read(v, count)) {
            return Err("MSR-area address not 16-byte aligned or too wide");
        }
    }
    if !within(entry, cap(msr::IA32_VMX_TRUE_ENTRY_CTLS)) {
        return Err("VM-entry controls outside the offer");
    }
    check_injection(v)
}

/// The VM-entry interruption-information field, when valid (SDM 27.2.1.3).
fn check_injection(v: &Vmcs12) -> Result<(), &'static str> {
    let info = read(v, control::VMENTRY_INTERRUPTION_INFO_FIELD);
    if info & (1 << 31) == 0 {
        return Ok(());
    }
    let vector = info & 0xff;
    let kind = (info >> 8) & 7;
    let deliver_error = info & (1 << 11) != 0;
    if info & 0x7fff_f000 != 0 {
        return Err("event injection: reserved bits set");
    }
    match kind {
        // Reserved; "other event" needs monitor-trap flag support, which the offer does not have.
        1 | 7 => return Err("event injection: a type the offer does not support"),
        2 if vector != 2 => return Err("event injection: an NMI that is not vector 2"),
        3 if vector > 31 => return Err("event injection: a hardware exception above vector 31"),
        _ => {}
    }
    // Only these exceptions push an error code (SDM 27.2.1.3; unrestricted guest is not offered, so
    // the guest is always in protected mode).
    let pushes_error = kind == 3 && matches!(vector, 8 | 10..=14 | 17);
    if deliver_error != pushes_error {
        return Err("event injection: the error-code bit does not match the exception");
    }
    if deliver_error && read(v, control::VMENTRY_EXCEPTION_ERR_CODE) >> 15 != 0 {
        return Err("event injection: error code above 15 bits");
    }
    if matches!(kind, 4..=6) && !(1..=15).contains(&read(v, control::VMENTRY_INSTRUCTION_LEN)) {
        return Err("event injection: a software event's instruction length not 1 to 15");
    }
    Ok(())
}

fn check_host_state(v: &Vmcs12, offer: &VirtualVmx, l1_in_ia32e: bool) -> Result<(), &'static str> {
    let cap = |m: u32| offer.read_msr(m).unwrap_or(0);
    let exit = read(v, control::VMEXIT_CONTROLS);
    let entry = read(v, control::VMENTRY_CONTROLS);
    let cr0 = read(v, host::CR0);
    let cr4 = read(v, host::CR4);
    let (cr0_fixed0, cr0_fixed1) = (cap(msr::IA32_VMX_CR0_FIXED0), cap(msr::IA32_VMX_CR0_FIXED1));
    let (cr4_fixed0, cr4_fixed1) = (cap(msr::IA32_VMX_CR4_FIXED0), cap(msr::IA32_VMX_CR4_FIXED1));
    if cr0 & cr0_fixed0 != cr0_fixed0 || cr0 & !cr0_fixed1 != 0 {
        return Err("host CR0 outside the fixed bits");
    }
    if cr4 & cr4_fixed0 != cr4_fixed0 || cr4 & !cr4_fixed1 != 0 {
        return Err("host CR4 outside the fixed bits");
    }
    if read(v, host::CR3) >> PHYS_ADDR_BITS != 0 {
        return Err("host CR3 beyond the physical-address width");
    }
    for (f, what) in [
        (
            host::IA32_SYSENTER_ESP,
            "host IA32_SYSENTER_ESP not canonical",
        ),
        (
            host::IA32_SYSENTER_EIP,
            "host IA32_SYSENTER_EIP not canonical",
        ),
        (host::FS_BASE, "host FS base not canonical"),
        (host::GS_BASE, "host GS base not canonical"),
        (host::TR_BASE, "host TR base not canonical"),
        (host::GDTR_BASE, "host GDTR base not canonical"),
        (host::IDTR_BASE, "host IDTR base not canonical"),
    ] {
        if !canonical(read(v, f)) {
            return Err(what);
        }
    }
    if exit & EXIT_LOAD_EFER != 0 {
        let efer = read(v, host::IA32_EFER_FULL);
        let size = exit & EXIT_HOST_ADDRESS_SPACE_SIZE != 0;
        if efer & !(1 | EFER_LME | EFER_LMA | 1 << 11) != 0
            || (efer & EFER_LMA != 0) != size
            || (efer & EFER_LME != 0) != size
        {
            return Err("host IA32_EFER reserved bits, or LMA/LME against the address-space size");
        }
    }
    for (f, what) in [
        (host::ES_SELECTOR, "host ES selector has RPL or TI set"),
        (host::CS_SELECTOR, "host CS selector has RPL or TI set"),
        (host::SS_SELECTOR, "host SS selector has RPL or TI set"),
        (host::DS_SELECTOR, "host DS selector has RPL or TI set"),
        (host::FS_SELECTOR, "host FS selector has RPL or TI set"),
        (host::GS_SELECTOR, "host GS selector has RPL or TI set"),
        (host::TR_SELECTOR, "host TR selector has RPL or TI set"),
    ] {
        if read(v, f) & 7 != 0 {
            return Err(what);
        }
    }
    if read(v, host::CS_SELECTOR) == 0 || read(v, host::TR_SELECTOR) == 0 {
        return Err("host CS or TR selector null");
    }
    let size = exit & EXIT_HOST_ADDRESS_SPACE_SIZE != 0;
    if !size && read(v, host::SS_SELECTOR) == 0 {
        return Err("host SS selector null outside IA-32e mode");
    }
    // L1 in IA-32e mode must return to IA-32e mode; a 64-bit host needs PAE and a canonical RIP.
    if l1_in_ia32e != size {
        return Err("host address-space size differs from L1's mode");
    }
    if size && (cr4 & CR4_PAE == 0 || !canonical(read(v, host::RIP))) {
        return Err("64-bit host without CR4.PAE or with a non-canonical RIP");
    }
    if !size && (entry & ENTRY_IA32E_GUEST != 0 || read(v, host::RIP) >> 32 != 0) {
        return Err("an IA-32e guest, or RIP above 32 bits, under a 32-bit host");
    }
    Ok(())
}

/// The guest-state checks of SDM 27.3.1 on `v` (the controls passed [`check`]), the ones that
/// apply without unrestricted guest, virtual-8086 mode or SMM, none of which the offer has. A
/// failure is not VMfail: it is a VM exit to L1 with reason 33 ("VM-entry failure due to invalid
/// guest state"), L1 back at its host state.
pub fn check_guest_state(v: &Vmcs12, offer: &VirtualVmx) -> Result<(), &'static str> {
    use ihmi_vmcs::fields::guest;
    let cap = |m: u32| offer.read_msr(m).unwrap_or(0);
    let entry = read(v, control::VMENTRY_CONTROLS);
    let ia32e = entry & ENTRY_IA32E_GUEST != 0;
    let cr0 = read(v, guest::CR0);
    let cr4 = read(v, guest::CR4);
    let (cr0_fixed0, cr0_fixed1) = (cap(msr::IA32_VMX_CR0_FIXED0), cap(msr::IA32_VMX_CR0_FIXED1));
    let (cr4_fixed0, cr4_fixed1) = (cap(msr::IA32_VMX_CR4_FIXED0), cap(msr::IA32_VMX_CR4_FIXED1));
    if cr0 & cr0_fixed0 != cr0_fixed0 || cr0 & !cr0_fixed1 != 0 {
        return Err("guest CR0 outside the fixed bits");
    }
    if cr4 & cr4_fixed0 != cr4_fixed0 || cr4 & !cr4_fixed1 != 0 {
        return Err("guest CR4 outside the fixed bits");
    }
    const CR0_PG: u64 = 1 << 31;
    const CR4_PCIDE: u64 = 1 << 17;
    if ia32e && (cr0 & CR0_PG == 0 || cr4 & CR4_PAE == 0) {
        return Err("IA-32e mode guest without CR0.PG or CR4.PAE");
    }
    if !ia32e && cr4 & CR4_PCIDE != 0 {
        return Err("CR4.PCIDE outside IA-32e mode");
    }
    if read(v, guest::CR3) >> PHYS_ADDR_BITS != 0 {
        return Err("guest CR3 beyond the physical-address width");
    }
    const ENTRY_LOAD_DEBUG: u64 = 1 << 2;
    if entry & ENTRY_LOAD_DEBUG != 0 {
        // IA32_DEBUGCTL: LBR, BTF, TR, BTS, BTINT, BTS_OFF_OS/USR, FREEZE_*, RTM (bits 0-1, 6-15).
        if read(v, guest::IA32_DEBUGCTL_FULL) & !0xffc3 != 0 {
            return Err("guest IA32_DEBUGCTL reserved bits");
        }
        if read(v, guest::DR7) >> 32 != 0 {
            return Err("guest DR7 bits 63:32 set");
        }
    }
    for (f, what) in [
        (
            guest::IA32_SYSENTER_ESP,
            "guest IA32_SYSENTER_ESP not canonical",
        ),
        (
            guest::IA32_SYSENTER_EIP,
            "guest IA32_SYSENTER_EIP not canonical",
        ),
        (guest::FS_BASE, "guest FS base not canonical"),
        (guest::GS_BASE, "guest GS base not canonical"),
        (guest::TR_BASE, "guest TR base not canonical"),
        (guest::LDTR_BASE, "guest LDTR base not canonical"),
        (guest::GDTR_BASE, "guest GDTR base not canonical"),
        (guest::IDTR_BASE, "guest IDTR base not canonical"),
    ] {
        if !canonical(read(v, f)) {
            return Err(what);
        }
    }
    const ENTRY_LOAD_PAT: u64 = 1 << 14;
    if entry & ENTRY_LOAD_PAT != 0
        && read(v, guest::IA32_PAT_FULL)
            .to_le_bytes()
            .iter()
            .any(|t| !matches!(t, 0 | 1 | 4..=7))
    {
        return Err("guest IA32_PAT with a reserved memory type");
    }
    const ENTRY_LOAD_EFER: u64 = 1 << 15;
    if entry & ENTRY_LOAD_EFER != 0 {
        let efer = read(v, guest::IA32_EFER_FULL);
        if efer & !(1 | EFER_LME | EFER_LMA | 1 << 11) != 0
            || (efer & EFER_LMA != 0) != ia32e
            || (cr0 & CR0_PG != 0 && (efer & EFER_LME != 0) != (efer & EFER_LMA != 0))
        {
            return Err(
                "guest IA32_EFER reserved bits, or LMA/LME against the IA-32e mode guest control",
            );
        }
    }
    check_segments(v, ia32e)?;
    for (f, what) in [
        (guest::GDTR_LIMIT, "guest GDTR limit above 16 bits"),
        (guest::IDTR_LIMIT, "guest IDTR limit above 16 bits"),
    ] {
        if read(v, f) >> 16 != 0 {
            return Err(what);
        }
    }
    let cs_l = read(v, guest::CS_ACCESS_RIGHTS) & (1 << 13) != 0;
    let rip = read(v, guest::RIP);
    if (ia32e && cs_l && !canonical(rip)) || (!(ia32e && cs_l) && rip >> 32 != 0) {
        return Err("guest RIP not canonical (64-bit code) or above 32 bits");
    }
    let rflags = read(v, guest::RFLAGS);
    const RFLAGS_RESERVED: u64 = !0x3f_ffff | 1 << 15 | 1 << 5 | 1 << 3;
    if rflags & RFLAGS_RESERVED != 0 || rflags & 2 == 0 {
        return Err("guest RFLAGS reserved bits");
    }
    if ia32e && rflags & (1 << 17) != 0 {
        return Err("guest RFLAGS.VM in IA-32e mode");
    }
    let injection = read(v, control::VMENTRY_INTERRUPTION_INFO_FIELD);
    let injects_interrupt = injection & (1 << 31) != 0 && (injection >> 8) & 7 == 0;
    if injects_interrupt && rflags & (1 << 9) == 0 {
        return Err("an external interrupt injected with RFLAGS.IF clear");
    }
    // Activity states: active, or those IA32_VMX_MISC bits 8:6 name (HLT, shutdown, wait-for-SIPI).
    let activity = read(v, guest::ACTIVITY_STATE);
    let misc = cap(msr::IA32_VMX_MISC);
    if activity > 3 || (activity != 0 && misc & (1 << (5 + activity)) == 0) {
        return Err("guest activity state not supported");
    }
    let ss_dpl = (read(v, guest::SS_ACCESS_RIGHTS) >> 5) & 3;
    if activity == 1 && ss_dpl != 0 {
        return Err("HLT activity state with SS.DPL not 0");
    }
    let blocking = read(v, guest::INTERRUPTIBILITY_STATE);
    if blocking >> 5 != 0 {
        return Err("guest interruptibility reserved bits");
    }
    if blocking & 0b11 == 0b11 {
        return Err("blocking by STI and by MOV SS both set");
    }
    if rflags & (1 << 9) == 0 && blocking & 1 != 0 {
        return Err("blocking by STI with RFLAGS.IF clear");
    }
    if injects_interrupt && blocking & 0b11 != 0 {
        return Err("an external interrupt injected under blocking by STI or MOV SS");
    }
    if blocking & (1 << 2) != 0 {
        return Err("blocking by SMI outside SMM");
    }
    let pending = read(v, guest::PENDING_DBG_EXCEPTIONS);
    if pending & !(0xf | 1 << 12 | 1 << 14 | 1 << 16) != 0 {
        return Err("guest pending debug exceptions reserved bits");
    }
    // No shadow VMCS is offered: the link pointer must be all ones (SDM 27.3.1.5 lets another value
    // name a VMCS with the right revision; without VMCS shadowing KVM and every known L1 set ~0).
    if read(v, guest::LINK_PTR_FULL) != u64::MAX {
        return Err("VMCS link pointer not all ones (no shadow VMCS is offered)");
    }
    Ok(())
}

/// The segment registers (SDM 27.3.1.2), without virtual-8086 mode or unrestricted guest.
fn check_segments(v: &Vmcs12, ia32e: bool) -> Result<(), &'static str> {
    use ihmi_vmcs::fields::guest;
    const UNUSABLE: u64 = 1 << 16;
    let ar = |f| read(v, f);
    let (cs, ss, tr, ldtr) = (
        ar(guest::CS_ACCESS_RIGHTS),
        ar(guest::SS_ACCESS_RIGHTS),
        ar(guest::TR_ACCESS_RIGHTS),
        ar(guest::LDTR_ACCESS_RIGHTS),
    );
    let kind = |a: u64| a & 0xf;
    let s = |a: u64| a & (1 << 4) != 0;
    let dpl = |a: u64| (a >> 5) & 3;
    let present = |a: u64| a & (1 << 7) != 0;
    let reserved = |a: u64| a & (0xf00 | 0xfffe_0000) != 0;
    let granular = |a: u64, limit: u64| {
        let g = a & (1 << 15) != 0;
        (limit & 0xfff == 0xfff || !g) && (limit >> 20 == 0 || g)
    };
    if read(v, guest::TR_SELECTOR) & 4 != 0 {
        return Err("guest TR selector with TI set");
    }
    if ldtr & UNUSABLE == 0 && read(v, guest::LDTR_SELECTOR) & 4 != 0 {
        return Err("guest LDTR selector with TI set");
    }
    if read(v, guest::SS_SELECTOR) & 3 != read(v, guest::CS_SELECTOR) & 3 {
        return Err("guest SS and CS selectors with different RPLs");
    }
    if cs & UNUSABLE != 0 || !matches!(kind(cs), 9 | 11 | 13 | 15) || !s(cs) || !present(cs) {
        return Err("guest CS not a usable, present, accessed code segment");
    }
    if reserved(cs) || !granular(cs, read(v, guest::CS_LIMIT)) {
        return Err("guest CS access-rights reserved bits or limit against granularity");
    }
    if matches!(kind(cs), 9 | 11) && dpl(cs) != dpl(ss) {
        return Err("guest CS (non-conforming) DPL differs from SS DPL");
    }
    if ia32e && cs & (1 << 13) != 0 && cs & (1 << 14) != 0 {
        return Err("guest CS with both L and D/B set in IA-32e mode");
    }
    if dpl(ss) != read(v, guest::SS_SELECTOR) & 3 {
        return Err("guest SS DPL differs from its RPL");
    }
    if ss & UNUSABLE == 0 && (!matches!(kind(ss), 3 | 7) || !s(ss) || !present(ss)) {
        return Err("guest SS not a present read/write data segment");
    }
    for (a, limit) in [
        (ss, guest::SS_LIMIT),
        (ar(guest::DS_ACCESS_RIGHTS), guest::DS_LIMIT),
        (ar(guest::ES_ACCESS_RIGHTS), guest::ES_LIMIT),
        (ar(guest::FS_ACCESS_RIGHTS), guest::FS_LIMIT),
        (ar(guest::GS_ACCESS_RIGHTS), guest::GS_LIMIT),
    ] {
        if a & UNUSABLE != 0 {
            continue;
        }
        let readable = kind(a) & 8 == 0 || kind(a) & 2 != 0;
        if kind(a) & 1 == 0 || !readable || !s(a) || !present(a) {
            return Err(
                "a usable data segment (SS, DS, ES, FS, GS) not accessed, readable, present",
            );
        }
        if reserved(a) || !granular(a, read(v, limit)) {
            return Err(
                "a data segment's access-rights reserved bits or limit against granularity",
            );
        }
    }
    let tr_kind_ok = if ia32e {
        kind(tr) == 11
    } else {
        matches!(kind(tr), 3 | 11)
    };
    if tr & UNUSABLE != 0 || !tr_kind_ok || s(tr) || !present(tr) || reserved(tr) {
        return Err("guest TR not a usable, present, busy TSS");
    }
    if !granular(tr, read(v, guest::TR_LIMIT)) {
        return Err("guest TR limit against granularity");
    }
    if ldtr & UNUSABLE == 0 && (kind(ldtr) != 2 || s(ldtr) || !present(ldtr) || reserved(ldtr)) {
        return Err("guest LDTR usable but not a present LDT");
    }
    Ok(())
}
