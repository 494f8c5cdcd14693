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
const fn canonical(a: u64) -> bool {
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
