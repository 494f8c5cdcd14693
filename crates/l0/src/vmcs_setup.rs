//! Fills the VMCS for the guest (SDM 25.3 guest state, 25.5 host state, 25.6–25.8 controls, 27.2–27.3
//! the checks VM entry applies to them).

use core::cell::UnsafeCell;

use ihmi_addr::Hpa;
use ihmi_arch::cr::{
    CR0_ET, CR0_MP, CR0_NE, CR0_PE, CR0_PG, CR0_WP, CR4_OSFXSR, CR4_OSXMMEXCPT, CR4_PAE, CR4_VMXE,
};
use ihmi_arch::msr::{EFER_LMA, EFER_LME, EFER_NXE, IA32_EFER, IA32_PAT};
use ihmi_ept::Eptp;
use ihmi_hv::policy::{
    io::INTERCEPTED_PORTS,
    msr::{INTERCEPTED, READ_INTERCEPTED, WRITE_INTERCEPTED},
};
use ihmi_rt::tables::{TableBases, CODE_SELECTOR, DATA_SELECTOR, TSS_SELECTOR};
use ihmi_vmcs::fields::{control, guest, host};
use ihmi_vmcs::{
    ControlError, EntryControls, ExitControls, IoBitmaps, MsrBitmap, PinbasedControls,
    PrimaryControls, SecondaryControls, SegmentAccessRights, VmFuncControls, VmxCapabilities,
};
use ihmi_vmx::{ActiveVmcs, VmxError};

use crate::log;

use crate::error::LoadError;
use crate::frames::Pool;
use crate::guest::{EntryMode, GuestBoot};

/// CR0 and CR4 bits the guest starts with (SDM 2.5): protected mode, paging, FPU/SSE usable.
const GUEST_CR0: u64 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
const GUEST_CR4: u64 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
// CR4.VMXE must stay set in VMX non-root operation (the CR4 fixed bits); the guest's reads of it come
// from the read shadow, which says 0, and its writes to it exit.

/// Stack the exit stub and the exit handler run on.
const EXIT_STACK_SIZE: usize = 64 * 1024;
#[repr(C, align(16))]
struct ExitStack([u8; EXIT_STACK_SIZE]);
struct ExitStackCell(UnsafeCell<ExitStack>);
// SAFETY: only the CPU uses this memory, as the host stack on VM exits.
unsafe impl Sync for ExitStackCell {}
static EXIT_STACK: ExitStackCell = ExitStackCell(UnsafeCell::new(ExitStack([0; EXIT_STACK_SIZE])));

/// Why a VMCS could not be set up.
#[derive(Debug)]
pub enum SetupError {
    /// The CPU does not allow a control L0 needs.
    Controls {
        which: &'static str,
        error: ControlError,
    },
    /// An MSR of the policy's tables lies outside the MSR bitmap's ranges.
    MsrOutsideBitmap { msr: u32, policy: &'static str },
    /// The CPU refused a VMWRITE.
    Vmwrite(VmxError),
    /// No frame left for a bitmap.
    OutOfFrames,
}

impl From<VmxError> for SetupError {
    fn from(e: VmxError) -> Self {
        Self::Vmwrite(e)
    }
}

impl From<LoadError> for SetupError {
    /// The pool's one error: it is exhausted.
    fn from(_: LoadError) -> Self {
        Self::OutOfFrames
    }
}

impl core::fmt::Display for SetupError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Controls { which, error } => {
                write!(f, "this CPU lacks {which} L0 needs: {error}")
            }
            Self::MsrOutsideBitmap { msr, policy } => {
                write!(
                    f,
                    "MSR {msr:#x} in the {policy} policy is outside the bitmap"
                )
            }
            Self::Vmwrite(e) => write!(f, "{e}"),
            Self::OutOfFrames => f.write_str("L0's frame pool is exhausted"),
        }
    }
}

fn controls(which: &'static str) -> impl Fn(ControlError) -> SetupError {
    move |error| SetupError::Controls { which, error }
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
    /// The longest the guest may run without an exit, in TSC ticks, when L0 audits what the guest
    /// could change without one (a Linux guest's gate mapping): the VMX-preemption timer, where the
    /// CPU has it, is loaded with this at every entry.
    pub audit_period: Option<u64>,
    /// Whether L0 takes the VM's NMIs (NMI exiting with virtual NMIs): a guest with a monitor must
    /// never take one in the monitor's view, and the monitor VM has no handler for one. The
    /// VMX-preemption timer is then on as well, to bring a guest with a held NMI back soon.
    pub nmi_exiting: bool,
}

/// Writes the whole VMCS: controls, bitmaps, host state, guest state. Errors name what the CPU
/// refused.
pub fn configure(
    vmcs: &mut ActiveVmcs,
    caps: &VmxCapabilities,
    tables: &TableBases,
    frames: &mut Pool,
    vm: &VmParams<'_>,
) -> Result<(), SetupError> {
    let (exit, entry) = write_controls(vmcs, caps, vm)?;
    write_bitmaps(vmcs, frames)?;
    write_host_state(vmcs, tables, exit)?;
    write_guest_state(vmcs, caps, vm.boot, entry)
}

/// The VM-execution, VM-exit and VM-entry controls (SDM 25.6-25.8): what L0 needs, adjusted to
/// what the CPU allows and forces. Returns the exit and entry controls, which decide what else is
/// loaded and saved.
fn write_controls(
    vmcs: &mut ActiveVmcs,
    caps: &VmxCapabilities,
    vm: &VmParams<'_>,
) -> Result<(ExitControls, EntryControls), SetupError> {
    let VmParams {
        eptp,
        eptp_list,
        boot,
        exceptions,
        hlt_exits,
        audit_period,
        nmi_exiting,
    } = *vm;
    // A guest entered with paging off (a multiboot kernel) runs as an unrestricted guest (SDM 26.6).
    let protected = matches!(boot.mode, EntryMode::Protected { .. });
    let timer = if audit_period.is_some() || nmi_exiting {
        PinbasedControls::VMX_PREEMPTION_TIMER
    } else {
        PinbasedControls::empty()
    };
    // L0 needs virtual NMIs to know when the guest can take an NMI it injects (SDM 25.4.2: blocking by
    // NMI then tracks the guest's own handler, up to its IRET).
    let nmis = if nmi_exiting {
        PinbasedControls::NMI_EXITING | PinbasedControls::VIRTUAL_NMIS
    } else {
        PinbasedControls::empty()
    };
    let pin = caps
        .adjust_pinbased(nmis, timer)
        .map_err(controls("pin-based controls"))?;
    if nmi_exiting && !pin.contains(PinbasedControls::VMX_PREEMPTION_TIMER) {
        log!("vmx: no VMX-preemption timer: an NMI held for the guest waits for its next exit");
    }
    if nmi_exiting && audit_period.is_none() && pin.contains(PinbasedControls::VMX_PREEMPTION_TIMER)
    {
        // On only for held NMIs, which set it short while they wait: otherwise as long as it goes.
        vmcs.write(guest::VMX_PREEMPTION_TIMER_VALUE, u64::from(u32::MAX))?;
    }
    if let Some(ticks) = audit_period {
        if pin.contains(PinbasedControls::VMX_PREEMPTION_TIMER) {
            // Without "save VMX-preemption timer value" the field keeps this value, so every entry
            // starts a full period again (SDM 26.7.4).
            let rate = caps.preemption_timer_rate();
            let value = (ticks >> rate).clamp(1, u64::from(u32::MAX));
            vmcs.write(guest::VMX_PREEMPTION_TIMER_VALUE, value)?;
            log!(
                "vmx: audit every {} TSC ticks without an exit (VMX-preemption timer {value}, rate 2^{rate})",
                value << rate
            );
        } else {
            log!("vmx: no VMX-preemption timer: L0 audits at the guest's own exits only");
        }
    }
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
        .map_err(controls("processor-based controls"))?;
    // In-box monitoring switches EPT views with VMFUNC: VM functions and EPTP switching are then required.
    let vmfunc_required = if eptp_list.is_some() {
        SecondaryControls::ENABLE_VM_FUNCTIONS
    } else {
        SecondaryControls::empty()
    };
    let unrestricted = if protected {
        SecondaryControls::UNRESTRICTED_GUEST
    } else {
        SecondaryControls::empty()
    };
    let secondary = caps
        .adjust_secondary(
            SecondaryControls::ENABLE_EPT | vmfunc_required | unrestricted,
            SecondaryControls::ENABLE_RDTSCP
                | SecondaryControls::ENABLE_INVPCID
                | SecondaryControls::ENABLE_XSAVES_XRSTORS,
        )
        .map_err(controls("secondary controls"))?;
    let exit = exit_controls(caps)?;
    // The CPU keeps "IA-32e mode guest" equal to the guest's EFER.LMA at every exit (SDM 28.3), so a
    // guest that turns on long mode itself is entered in it from then on.
    let long = if protected {
        EntryControls::empty()
    } else {
        EntryControls::IA32E_MODE_GUEST
    };
    let entry = caps
        .adjust_entry(
            long | EntryControls::LOAD_IA32_EFER,
            EntryControls::LOAD_IA32_PAT,
        )
        .map_err(controls("VM-entry controls"))?;
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
            .map_err(controls("VM-function controls"))?;
        vmcs.write(control::VM_FUNCTION_CONTROLS_FULL, vmfunc.bits())?;
        vmcs.write(control::EPTP_LIST_ADDR_FULL, list.raw())?;
    }

    Ok((exit, entry))
}

/// The VM-exit controls of every VMCS L0 runs: a 64-bit host, IA32_EFER saved and loaded, and
/// IA32_PAT where the CPU can.
fn exit_controls(caps: &VmxCapabilities) -> Result<ExitControls, SetupError> {
    caps.adjust_exit(
        ExitControls::HOST_ADDRESS_SPACE_SIZE
            | ExitControls::SAVE_IA32_EFER
            | ExitControls::LOAD_IA32_EFER,
        ExitControls::SAVE_IA32_PAT | ExitControls::LOAD_IA32_PAT,
    )
    .map_err(controls("VM-exit controls"))
}

/// VMCS02, the VMCS L2 runs on: L0's host state, and no MSR areas. Its controls and guest state
/// come from the exit policy at every entry to L2 (`ihmi_hv::nested::l2::write_vmcs02`).
pub fn configure_nested(
    vmcs: &mut ActiveVmcs,
    caps: &VmxCapabilities,
    tables: &TableBases,
) -> Result<(), SetupError> {
    let exit = exit_controls(caps)?;
    write_host_state(vmcs, tables, exit)?;
    for count in [
        control::VMEXIT_MSR_STORE_COUNT,
        control::VMEXIT_MSR_LOAD_COUNT,
        control::VMENTRY_MSR_LOAD_COUNT,
        control::CR3_TARGET_COUNT,
    ] {
        vmcs.write(count, 0)?;
    }
    Ok(())
}

/// The MSR and I/O bitmaps, built from the same tables the exit policy uses.
fn write_bitmaps(vmcs: &mut ActiveVmcs, frames: &mut Pool) -> Result<(), SetupError> {
    let mut outside = None;
    let msr_bitmap = frames.page(|bitmap: &mut MsrBitmap| {
        // Each policy table, with which accesses it intercepts and its name for the message.
        for (table, read, write, policy) in [
            (INTERCEPTED, true, true, "intercept"),
            (READ_INTERCEPTED, true, false, "read-intercept"),
            (WRITE_INTERCEPTED, false, true, "write-intercept"),
        ] {
            for msr in table.iter().flat_map(|&(first, last)| first..=last) {
                let read_ok = !read || bitmap.intercept_read(msr).is_ok();
                let write_ok = !write || bitmap.intercept_write(msr).is_ok();
                if !(read_ok && write_ok) && outside.is_none() {
                    outside = Some(SetupError::MsrOutsideBitmap { msr, policy });
                }
            }
        }
    })?;
    if let Some(e) = outside {
        return Err(e);
    }
    vmcs.write(control::MSR_BITMAPS_ADDR_FULL, msr_bitmap.raw())?;
    let io_bitmaps = frames.page(|bitmaps: &mut IoBitmaps| {
        for &port in INTERCEPTED_PORTS {
            bitmaps.intercept(port);
        }
    })?;
    vmcs.write(control::IO_BITMAP_A_ADDR_FULL, io_bitmaps.raw())?;
    vmcs.write(control::IO_BITMAP_B_ADDR_FULL, io_bitmaps.raw() + 4096)?;

    Ok(())
}

/// The host state (SDM 25.5): what L0 runs with now, and the exit stub on L0's exit stack.
fn write_host_state(
    vmcs: &mut ActiveVmcs,
    tables: &TableBases,
    exit: ExitControls,
) -> Result<(), SetupError> {
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

    Ok(())
}

/// The guest state (SDM 25.4): 64-bit mode with the page tables, GDT and stack L0 prepared, or
/// for [`EntryMode::Protected`] the state a multiboot loader leaves (multiboot spec §3.2, multiboot2
/// spec §3.3): protected mode with paging off, flat 32-bit segments, EFLAGS.IF and VM clear.
fn write_guest_state(
    vmcs: &mut ActiveVmcs,
    caps: &VmxCapabilities,
    boot: &GuestBoot,
    entry: EntryControls,
) -> Result<(), SetupError> {
    // SAFETY: IA32_PAT exists on every x86-64 CPU.
    let pat = unsafe { ihmi_rt::cpu::rdmsr(IA32_PAT) };
    let protected = matches!(boot.mode, EntryMode::Protected { .. });
    let (cr0, cr4, efer, code) = if protected {
        (
            caps.fix_cr0(CR0_PE | CR0_ET | CR0_NE, true),
            caps.fix_cr4(CR4_VMXE),
            0,
            SegmentAccessRights::code32(),
        )
    } else {
        (
            caps.fix_cr0(GUEST_CR0, false),
            caps.fix_cr4(GUEST_CR4 | CR4_VMXE),
            EFER_LME | EFER_LMA | EFER_NXE,
            SegmentAccessRights::code64(),
        )
    };
    vmcs.write(guest::CR0, cr0)?;
    vmcs.write(guest::CR3, boot.cr3.raw())?;
    vmcs.write(guest::CR4, cr4)?;
    vmcs.write(guest::DR7, 0x400)?;
    vmcs.write(guest::RSP, boot.stack_top.raw())?;
    vmcs.write(guest::RIP, boot.entry)?;
    vmcs.write(guest::RFLAGS, 0x2)?;
    let code = code.raw();
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
    vmcs.write(guest::IA32_EFER_FULL, efer)?;
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
