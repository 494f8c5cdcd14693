//! Fills the VMCS for the guest (SDM 25.3 guest state, 25.5 host state, 25.6–25.8 controls, 27.2–27.3
//! the checks VM entry applies to them).

use core::cell::UnsafeCell;

use ihmi_addr::Hpa;
use ihmi_ept::Eptp;
use ihmi_hv::policy::{
    io::INTERCEPTED_PORTS,
    msr::{INTERCEPTED, READ_INTERCEPTED, WRITE_INTERCEPTED},
};
use ihmi_rt::tables::{TableBases, CODE_SELECTOR, DATA_SELECTOR, TSS_SELECTOR};
use ihmi_vmcs::fields::{control, guest, host};
use ihmi_vmcs::{
    EntryControls, ExitControls, IoBitmaps, MsrBitmap, PinbasedControls, PrimaryControls,
    SecondaryControls, SegmentAccessRights, VmFuncControls, VmxCapabilities,
};
use ihmi_vmx::{ActiveVmcs, VmxError};

use crate::fail;
use crate::frames::Pool;
use crate::guest::GuestBoot;

/// IA32_EFER bits (SDM 2.2.1).
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;
const IA32_EFER: u32 = 0xc000_0080;
const IA32_PAT: u32 = 0x277;
/// CR0 and CR4 bits the guest starts with (SDM 2.5): protected mode, paging, FPU/SSE usable.
const GUEST_CR0: u64 = (1 << 0) | (1 << 1) | (1 << 4) | (1 << 5) | (1 << 16) | (1 << 31);
const GUEST_CR4: u64 = (1 << 5) | (1 << 9) | (1 << 10);
/// CR4.VMXE must stay set in VMX non-root operation (the CR4 fixed bits); the guest's reads of it come
/// from the read shadow, which says 0, and its writes to it exit.
const CR4_VMXE: u64 = 1 << 13;

/// Stack the exit stub and the exit handler run on.
const EXIT_STACK_SIZE: usize = 64 * 1024;
#[repr(C, align(16))]
struct ExitStack([u8; EXIT_STACK_SIZE]);
struct ExitStackCell(UnsafeCell<ExitStack>);
// SAFETY: only the CPU uses this memory, as the host stack on VM exits.
unsafe impl Sync for ExitStackCell {}
static EXIT_STACK: ExitStackCell = ExitStackCell(UnsafeCell::new(ExitStack([0; EXIT_STACK_SIZE])));

fn adjust_failed(what: &str, e: impl core::fmt::Display) -> ! {
    fail(format_args!("this CPU lacks {what} L0 needs: {e}"))
}

/// What differs between the VMs L0 runs (the guest, the out-of-box monitor VM).
#[derive(Debug)]
pub struct VmParams<'a> {
    /// The EPT the VM starts with.
    pub eptp: Eptp,
    /// The EPTP list for VMFUNC, when the VM switches views itself.
    pub eptp_list: Option<Hpa>,
    /// Where it starts: entry, CR3, GDT, stack.
    pub boot: &'a GuestBoot,
    /// The exception bitmap: which exceptions exit to L0.
    pub exceptions: u32,
    /// Whether HLT exits (the test guest's scenarios count it; Linux idles in it).
    pub hlt_exits: bool,
}

/// Writes the whole VMCS. Errors name the field that the CPU refused.
pub fn configure(
    vmcs: &mut ActiveVmcs,
    caps: &VmxCapabilities,
    tables: &TableBases,
    frames: &mut Pool,
    vm: &VmParams<'_>,
) -> Result<(), VmxError> {
    let VmParams {
        eptp,
        eptp_list,
        boot,
        exceptions,
        hlt_exits,
    } = *vm;
    // Controls: ask for what L0 needs, take what the CPU forces.
    let pin = caps
        .adjust_pinbased(PinbasedControls::empty(), PinbasedControls::empty())
        .unwrap_or_else(|e| adjust_failed("pin-based controls", e));
    let hlt = if hlt_exits {
        PrimaryControls::HLT_EXITING
    } else {
        PrimaryControls::empty()
    };
    let primary = caps
        .adjust_primary(
            hlt | PrimaryControls::USE_IO_BITMAPS
                | PrimaryControls::USE_MSR_BITMAPS
                | PrimaryControls::SECONDARY_CONTROLS,
            PrimaryControls::empty(),
        )
        .unwrap_or_else(|e| adjust_failed("processor-based controls", e));
    // In-box monitoring switches EPT views with VMFUNC: VM functions and EPTP switching are then required.
    let vmfunc_required = if eptp_list.is_some() {
        SecondaryControls::ENABLE_VM_FUNCTIONS
    } else {
        SecondaryControls::empty()
    };
    let secondary = caps
        .adjust_secondary(
            SecondaryControls::ENABLE_EPT | vmfunc_required,
            SecondaryControls::ENABLE_RDTSCP
                | SecondaryControls::ENABLE_INVPCID
                | SecondaryControls::ENABLE_XSAVES_XRSTORS,
        )
        .unwrap_or_else(|e| adjust_failed("secondary controls", e));
    let exit = caps
        .adjust_exit(
            ExitControls::HOST_ADDRESS_SPACE_SIZE
                | ExitControls::SAVE_IA32_EFER
                | ExitControls::LOAD_IA32_EFER,
            ExitControls::SAVE_IA32_PAT | ExitControls::LOAD_IA32_PAT,
        )
        .unwrap_or_else(|e| adjust_failed("VM-exit controls", e));
    let entry = caps
        .adjust_entry(
            EntryControls::IA32E_MODE_GUEST | EntryControls::LOAD_IA32_EFER,
            EntryControls::LOAD_IA32_PAT,
        )
        .unwrap_or_else(|e| adjust_failed("VM-entry controls", e));
    vmcs.write(control::PINBASED_EXEC_CONTROLS, u64::from(pin.bits()))?;
    vmcs.write(
        control::PRIMARY_PROCBASED_EXEC_CONTROLS,
        u64::from(primary.bits()),
    )?;
    vmcs.write(
        control::SECONDARY_PROCBASED_EXEC_CONTROLS,
        u64::from(secondary.bits()),
    )?;
    vmcs.write(control::VMEXIT_CONTROLS, u64::from(exit.bits()))?;
    vmcs.write(control::VMENTRY_CONTROLS, u64::from(entry.bits()))?;
    vmcs.write(control::EXCEPTION_BITMAP, u64::from(exceptions))?;
    vmcs.write(control::CR3_TARGET_COUNT, 0)?;
    vmcs.write(control::CR0_GUEST_HOST_MASK, 0)?;
    vmcs.write(control::CR4_GUEST_HOST_MASK, CR4_VMXE)?;
    vmcs.write(control::CR4_READ_SHADOW, GUEST_CR4)?;
    vmcs.write(control::EPTP_FULL, eptp.raw())?;
    if let Some(list) = eptp_list {
        let vmfunc = caps
            .adjust_vmfunc(VmFuncControls::EPTP_SWITCHING)
            .unwrap_or_else(|e| adjust_failed("VM-function controls", e));
        vmcs.write(control::VM_FUNCTION_CONTROLS_FULL, vmfunc.bits())?;
        vmcs.write(control::EPTP_LIST_ADDR_FULL, list.raw())?;
    }

    // Bitmaps: built from the same tables the exit policy uses.
    let msr_frame = frames.alloc_zeroed();
    // SAFETY: a fresh, zeroed, page-aligned pool frame, identity-mapped; MsrBitmap is a 4 KiB page layout.
    let msr_bitmap = unsafe { &mut *(msr_frame.raw() as *mut MsrBitmap) };
    // Each policy table, with which accesses it intercepts and its name for the message.
    for (table, read, write, policy) in [
        (INTERCEPTED, true, true, "intercept"),
        (READ_INTERCEPTED, true, false, "read-intercept"),
        (WRITE_INTERCEPTED, false, true, "write-intercept"),
    ] {
        for &(first, last) in table {
            for msr in first..=last {
                let read_ok = !read || msr_bitmap.intercept_read(msr).is_ok();
                let write_ok = !write || msr_bitmap.intercept_write(msr).is_ok();
                if !(read_ok && write_ok) {
                    fail(format_args!(
                        "MSR {msr:#x} in the {policy} policy is outside the bitmap"
                    ));
                }
            }
        }
    }
    vmcs.write(control::MSR_BITMAPS_ADDR_FULL, msr_frame.raw())?;
    let io_frames = frames.alloc_contiguous_zeroed(2);
    // SAFETY: two fresh, zeroed, contiguous, page-aligned pool frames; IoBitmaps is exactly two pages.
    let io_bitmaps = unsafe { &mut *(io_frames.raw() as *mut IoBitmaps) };
    for &port in INTERCEPTED_PORTS {
        io_bitmaps.intercept(port);
    }
    vmcs.write(control::IO_BITMAP_A_ADDR_FULL, io_frames.raw())?;
    vmcs.write(control::IO_BITMAP_B_ADDR_FULL, io_frames.raw() + 4096)?;

    // Host state: what L0 runs with now.
    vmcs.write(host::CR0, ihmi_rt::cpu::read_cr0())?;
    vmcs.write(host::CR3, ihmi_rt::cpu::read_cr3())?;
    vmcs.write(host::CR4, ihmi_rt::cpu::read_cr4())?;
    vmcs.write(host::CS_SELECTOR, u64::from(CODE_SELECTOR))?;
    for f in [host::SS_SELECTOR, host::DS_SELECTOR, host::ES_SELECTOR] {
        vmcs.write(f, u64::from(DATA_SELECTOR))?;
    }
    vmcs.write(host::FS_SELECTOR, 0)?;
    vmcs.write(host::GS_SELECTOR, 0)?;
    vmcs.write(host::TR_SELECTOR, u64::from(TSS_SELECTOR))?;
    vmcs.write(host::FS_BASE, 0)?;
    vmcs.write(host::GS_BASE, 0)?;
    vmcs.write(host::TR_BASE, tables.tss)?;
    vmcs.write(host::GDTR_BASE, tables.gdt)?;
    vmcs.write(host::IDTR_BASE, tables.idt)?;
    vmcs.write(host::IA32_SYSENTER_CS, 0)?;
    vmcs.write(host::IA32_SYSENTER_ESP, 0)?;
    vmcs.write(host::IA32_SYSENTER_EIP, 0)?;
    // SAFETY: IA32_EFER exists on every x86-64 CPU.
    let efer = unsafe { ihmi_rt::cpu::rdmsr(IA32_EFER) };
    // SAFETY: IA32_PAT exists on every x86-64 CPU.
    let pat = unsafe { ihmi_rt::cpu::rdmsr(IA32_PAT) };
    vmcs.write(host::IA32_EFER_FULL, efer)?;
    if exit.contains(ExitControls::LOAD_IA32_PAT) {
        vmcs.write(host::IA32_PAT_FULL, pat)?;
    }
    let stack_top = EXIT_STACK.0.get() as u64 + EXIT_STACK_SIZE as u64;
    vmcs.write(host::RSP, stack_top & !0xf)?;
    vmcs.write(host::RIP, ihmi_vmx::exit_stub_address())?;

    // Guest state: 64-bit mode with the page tables, GDT and stack L0 prepared.
    vmcs.write(guest::CR0, caps.fix_cr0(GUEST_CR0, false))?;
    vmcs.write(guest::CR3, boot.cr3.raw())?;
    vmcs.write(guest::CR4, caps.fix_cr4(GUEST_CR4 | CR4_VMXE))?;
    vmcs.write(guest::DR7, 0x400)?;
    vmcs.write(guest::RSP, boot.stack_top.raw())?;
    vmcs.write(guest::RIP, boot.entry)?;
    vmcs.write(guest::RFLAGS, 0x2)?;
    let code = SegmentAccessRights::code64().raw();
    let data = SegmentAccessRights::data().raw();
    vmcs.write(guest::CS_SELECTOR, u64::from(boot.code_selector))?;
    vmcs.write(guest::CS_BASE, 0)?;
    vmcs.write(guest::CS_LIMIT, 0xffff_ffff)?;
    vmcs.write(guest::CS_ACCESS_RIGHTS, u64::from(code))?;
    for (sel, base, limit, ar) in [
        (
            guest::SS_SELECTOR,
            guest::SS_BASE,
            guest::SS_LIMIT,
            guest::SS_ACCESS_RIGHTS,
        ),
        (
            guest::DS_SELECTOR,
            guest::DS_BASE,
            guest::DS_LIMIT,
            guest::DS_ACCESS_RIGHTS,
        ),
        (
            guest::ES_SELECTOR,
            guest::ES_BASE,
            guest::ES_LIMIT,
            guest::ES_ACCESS_RIGHTS,
        ),
        (
            guest::FS_SELECTOR,
            guest::FS_BASE,
            guest::FS_LIMIT,
            guest::FS_ACCESS_RIGHTS,
        ),
        (
            guest::GS_SELECTOR,
            guest::GS_BASE,
            guest::GS_LIMIT,
            guest::GS_ACCESS_RIGHTS,
        ),
    ] {
        vmcs.write(sel, u64::from(boot.data_selector))?;
        vmcs.write(base, 0)?;
        vmcs.write(limit, 0xffff_ffff)?;
        vmcs.write(ar, u64::from(data))?;
    }
    // No TSS in the guest yet, but VM entry requires a usable busy TSS (SDM 27.3.1.2).
    vmcs.write(guest::TR_SELECTOR, 0)?;
    vmcs.write(guest::TR_BASE, 0)?;
    vmcs.write(guest::TR_LIMIT, 0x67)?;
    vmcs.write(
        guest::TR_ACCESS_RIGHTS,
        u64::from(SegmentAccessRights::tss_busy64().raw()),
    )?;
    vmcs.write(guest::LDTR_SELECTOR, 0)?;
    vmcs.write(guest::LDTR_BASE, 0)?;
    vmcs.write(guest::LDTR_LIMIT, 0)?;
    vmcs.write(
        guest::LDTR_ACCESS_RIGHTS,
        u64::from(SegmentAccessRights::unusable().raw()),
    )?;
    vmcs.write(guest::GDTR_BASE, boot.gdt.raw())?;
    vmcs.write(guest::GDTR_LIMIT, u64::from(boot.gdt_limit))?;
    vmcs.write(guest::IDTR_BASE, 0)?;
    vmcs.write(guest::IDTR_LIMIT, 0)?;
    vmcs.write(guest::IA32_EFER_FULL, EFER_LME | EFER_LMA | EFER_NXE)?;
    if entry.contains(EntryControls::LOAD_IA32_PAT) {
        vmcs.write(guest::IA32_PAT_FULL, pat)?;
    }
    vmcs.write(guest::IA32_DEBUGCTL_FULL, 0)?;
    vmcs.write(guest::IA32_SYSENTER_CS, 0)?;
    vmcs.write(guest::IA32_SYSENTER_ESP, 0)?;
    vmcs.write(guest::IA32_SYSENTER_EIP, 0)?;
    vmcs.write(guest::LINK_PTR_FULL, u64::MAX)?;
    vmcs.write(guest::INTERRUPTIBILITY_STATE, 0)?;
    vmcs.write(guest::ACTIVITY_STATE, 0)?;
    vmcs.write(guest::PENDING_DBG_EXCEPTIONS, 0)?;
    Ok(())
}
