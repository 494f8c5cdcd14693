#![doc = include_str!("../README.md")]
#![no_std]

use core::fmt;
use core::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

use ihmi_addr::Hpa;
use ihmi_frames::Frame;
use ihmi_hv::{GuestRegs, Vcpu};
use ihmi_vmcs::fields::ro;
use ihmi_vmcs::{
    field_name, ArenaError, VmExit, VmInstructionError, VmcsArena, VmcsField, VmcsId,
    VmxCapabilities,
};

/// IA32_FEATURE_CONTROL and its bits (SDM Vol. 4, Table 2-2; SDM 24.7 "Enabling and entering VMX").
const IA32_FEATURE_CONTROL: u32 = 0x3a;
const FEATURE_CONTROL_LOCK: u64 = 1 << 0;
const FEATURE_CONTROL_VMX_OUTSIDE_SMX: u64 = 1 << 2;
/// CR4.VMXE (SDM 2.5).
const CR4_VMXE: u64 = 1 << 13;

/// Why VMX could not be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmxError {
    /// CPUID.1:ECX.VMX is clear: this CPU (or Bochs CPU model) has no VMX.
    NoVmx,
    /// Firmware locked IA32_FEATURE_CONTROL with VMX disabled.
    DisabledByFirmware,
    /// VMXON failed (VMfailInvalid: bad region or already in VMX operation).
    VmxonFailed,
    /// VMCLEAR failed on the given region.
    VmclearFailed(Hpa),
    /// VMPTRLD failed on the given region.
    VmptrldFailed(Hpa),
    /// The VMCS arena refused (full, or an id it does not hold).
    Arena(ArenaError),
    /// VMWRITE failed; the current VMCS gives the reason.
    VmwriteFailed {
        field: VmcsField,
        error: VmInstructionError,
    },
}

impl fmt::Display for VmxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoVmx => {
                f.write_str("this CPU has no VMX (CPUID.1:ECX.VMX=0); pick a VMX-capable CPU model")
            }
            Self::DisabledByFirmware => {
                f.write_str("VMX is disabled and locked in IA32_FEATURE_CONTROL by the firmware")
            }
            Self::VmxonFailed => f.write_str("VMXON failed"),
            Self::VmclearFailed(a) => write!(f, "VMCLEAR of {a} failed"),
            Self::VmptrldFailed(a) => write!(f, "VMPTRLD of {a} failed"),
            Self::Arena(e) => write!(f, "VMCS arena: {e}"),
            Self::VmwriteFailed { field, error } => {
                write!(f, "VMWRITE of {} failed: {error}", field_name(*field))
            }
        }
    }
}

/// Enters VMX root operation.
///
/// # Safety
/// 1. `vmxon` is a frame that L0 owns, mapped at its physical address, and stays reserved (the caller
///    keeps it) for as long as VMX is on.
/// 2. The caller runs at CPL 0 with interrupts off and is not yet in VMX operation.
pub unsafe fn enable(vmxon: &Frame, caps: &VmxCapabilities) -> Result<(), VmxError> {
    let vmxon_region = vmxon.start();
    if ihmi_rt::cpu::cpuid(1, 0)[2] & (1 << 5) == 0 {
        return Err(VmxError::NoVmx);
    }
    // SAFETY: CPUID says VMX exists, so IA32_FEATURE_CONTROL exists (SDM 24.7).
    let fc = unsafe { ihmi_rt::cpu::rdmsr(IA32_FEATURE_CONTROL) };
    if fc & FEATURE_CONTROL_LOCK == 0 {
        // SAFETY: the MSR is unlocked, so firmware left the choice to us; enabling VMX and locking is
        // exactly what firmware would have done.
        unsafe {
            ihmi_rt::cpu::wrmsr(
                IA32_FEATURE_CONTROL,
                fc | FEATURE_CONTROL_LOCK | FEATURE_CONTROL_VMX_OUTSIDE_SMX,
            )
        };
    } else if fc & FEATURE_CONTROL_VMX_OUTSIDE_SMX == 0 {
        return Err(VmxError::DisabledByFirmware);
    }
    let cr0 = caps.fix_cr0(ihmi_rt::cpu::read_cr0(), false);
    let cr4 = caps.fix_cr4(ihmi_rt::cpu::read_cr4() | CR4_VMXE);
    // SAFETY: the fixed bits only force features VMX requires (PE, PG, NE) that L0 already runs with.
    unsafe { ihmi_rt::cpu::write_cr0(cr0) };
    // SAFETY: VMXE and the other CR4 fixed bits leave paging and L0's memory view unchanged.
    unsafe { ihmi_rt::cpu::write_cr4(cr4) };
    write_revision(vmxon_region, caps.revision_id());
    // SAFETY: precondition 1 gives a valid, owned VMXON region carrying the revision id; CR0/CR4 now satisfy
    // the fixed bits and precondition 2 says we are not in VMX operation yet.
    unsafe { x86::bits64::vmx::vmxon(vmxon_region.raw()) }.map_err(|_| VmxError::VmxonFailed)
}

fn write_revision(region: Hpa, revision: u32) {
    let p = region.raw() as *mut u32;
    // SAFETY: callers pass a frame L0 owns and maps at its physical address (identity paging).
    unsafe { p.write_volatile(revision & 0x7fff_ffff) };
}

/// Proof that a VMCS is current on this CPU; VMREAD and VMWRITE need one. The [`Vmcss`] that owns
/// every VMCS hands it out.
#[derive(Debug)]
pub struct ActiveVmcs {
    region: Hpa,
}

/// Most VMCSs L0 keeps: the guest's and the out-of-box monitor VM's today, one per L2 with nested
/// VMX.
pub const MAX_VMCS: usize = 8;

/// Every VMCS L0 owns, by [`VmcsId`], and the one that is current (VMREAD and VMWRITE go to it).
#[derive(Debug, Default)]
pub struct Vmcss {
    arena: VmcsArena<Hpa, MAX_VMCS>,
    active: Option<ActiveVmcs>,
}

impl Vmcss {
    /// No VMCS yet.
    #[must_use]
    pub const fn new() -> Self {
        Self {
            arena: VmcsArena::new(),
            active: None,
        }
    }

    /// A VMCS at `region`: its revision id stamped, cleared (launch state clear) and made current, so
    /// the caller can fill it in.
    ///
    /// # Safety
    /// 1. VMX operation is on ([`enable`] succeeded).
    /// 2. `frame` is identity-mapped.
    /// 3. The caller makes the VMCS it wants to run current before the next VM entry.
    pub unsafe fn create(
        &mut self,
        frame: Frame,
        caps: &VmxCapabilities,
    ) -> Result<VmcsId, VmxError> {
        // The frame is the VMCS's for good: the arena keeps its address, nothing gives it back.
        let region = frame.start();
        write_revision(region, caps.revision_id());
        // SAFETY: preconditions 1 and 2: VMX is on and the region is ours and carries the revision id.
        unsafe { x86::bits64::vmx::vmclear(region.raw()) }
            .map_err(|_| VmxError::VmclearFailed(region))?;
        // SAFETY: as above; the region was just cleared, so it may be loaded.
        unsafe { x86::bits64::vmx::vmptrld(region.raw()) }
            .map_err(|_| VmxError::VmptrldFailed(region))?;
        let id = self.arena.add(region).map_err(VmxError::Arena)?;
        self.active = Some(ActiveVmcs { region });
        Ok(id)
    }

    /// Makes `id` current (VMPTRLD) for the next VM entry, which the exit stub makes a VMLAUNCH if
    /// this VMCS has never been entered (SDM 26.1: its launch state is clear) and a VMRESUME
    /// otherwise.
    ///
    /// # Safety
    /// 1. `id`'s VMCS is fully configured and is not current on another CPU.
    /// 2. Called from the exit handler: the caller's saved registers are the ones the next entry
    ///    loads, so they must be the new VM's.
    pub unsafe fn switch_to(&mut self, id: VmcsId) -> Result<(), VmxError> {
        let region = self
            .arena
            .region(id)
            .ok_or(VmxError::Arena(ArenaError::Unknown(id)))?;
        // SAFETY: VMX is on (a VMCS was created) and the region is a configured VMCS (precondition 1).
        unsafe { x86::bits64::vmx::vmptrld(region.raw()) }
            .map_err(|_| VmxError::VmptrldFailed(region))?;
        let entry = self.arena.enter(id).map_err(VmxError::Arena)?;
        self.active = Some(ActiveVmcs { region });
        IHMI_LAUNCH_NEXT.store(u8::from(entry.launch), Ordering::SeqCst);
        Ok(())
    }

    /// The current VMCS.
    ///
    /// # Panics
    /// If no VMCS was ever created: L0 creates its guest's before it enables exits, so an exit (or
    /// set-up code) without one is a broken invariant.
    pub fn active(&mut self) -> &mut ActiveVmcs {
        match self.active.as_mut() {
            Some(a) => a,
            None => panic!("no current VMCS"),
        }
    }

    /// The current VMCS, if any, for reading (a dump after a failure).
    #[must_use]
    pub fn active_ref(&self) -> Option<&ActiveVmcs> {
        self.active.as_ref()
    }

    /// Which VMCS is current.
    #[must_use]
    pub fn current(&self) -> Option<VmcsId> {
        self.arena.current()
    }
}

impl ActiveVmcs {
    /// The physical address of the VMCS.
    #[must_use]
    pub fn region(&self) -> Hpa {
        self.region
    }

    /// VMREAD; `None` if the field does not exist on this CPU.
    #[must_use]
    pub fn try_read(&self, field: VmcsField) -> Option<u64> {
        // SAFETY: `self` proves a VMCS is current; VMREAD of an unsupported field fails cleanly (VMfailValid).
        unsafe { x86::bits64::vmx::vmread(field.raw()) }.ok()
    }

    /// VMREAD of a field that must exist.
    ///
    /// # Panics
    /// If the field cannot be read: the VMCS is current, so that is a broken hardware invariant.
    #[must_use]
    pub fn read(&self, field: VmcsField) -> u64 {
        match self.try_read(field) {
            Some(v) => v,
            None => panic!("VMREAD of {} failed on the current VMCS", field_name(field)),
        }
    }

    /// VMWRITE.
    pub fn write(&mut self, field: VmcsField, value: u64) -> Result<(), VmxError> {
        // SAFETY: `self` proves a VMCS is current; a bad field or value fails cleanly and is reported.
        match unsafe { x86::bits64::vmx::vmwrite(field.raw(), value) } {
            Ok(()) => Ok(()),
            Err(_) => Err(VmxError::VmwriteFailed {
                field,
                error: self.instruction_error(),
            }),
        }
    }

    /// The VM-instruction error of the last failed VMX instruction (SDM 31.4).
    #[must_use]
    pub fn instruction_error(&self) -> VmInstructionError {
        VmInstructionError::from_raw(self.try_read(ro::VM_INSTRUCTION_ERROR).unwrap_or(0) as u32)
    }
}

/// A shadow VMCS (SDM 25.10) at `frame`: the revision identifier with bit 31 ("shadow VMCS") set,
/// cleared. It is never current for an entry: a VMCS's link pointer names it, and L1's VMREAD and
/// VMWRITE reach it without exits.
///
/// # Safety
/// VMX operation is on; `frame` is identity-mapped and L0's for good.
pub unsafe fn create_shadow(frame: Frame, caps: &VmxCapabilities) -> Result<Hpa, VmxError> {
    let region = frame.start();
    let p = region.raw() as *mut u32;
    // SAFETY: the frame is L0's and identity-mapped (precondition).
    unsafe { p.write_volatile((caps.revision_id() & 0x7fff_ffff) | 1 << 31) };
    // SAFETY: VMX is on; the region carries the revision identifier.
    unsafe { x86::bits64::vmx::vmclear(region.raw()) }
        .map_err(|_| VmxError::VmclearFailed(region))?;
    Ok(region)
}

/// The fields of a shadow VMCS while it is current (only [`HwVcpu::with_shadow`] makes it so).
struct ShadowVmcs;

impl ihmi_hv::ShadowFields for ShadowVmcs {
    fn read(&mut self, field: VmcsField) -> u64 {
        // SAFETY: the shadow VMCS is current; a field it lacks fails cleanly, and L0 checked at boot
        // that it has every shadowed field (`shadow_accepts`).
        unsafe { x86::bits64::vmx::vmread(field.raw()) }.unwrap_or(0)
    }
    fn write(&mut self, field: VmcsField, value: u64) {
        // SAFETY: as for `read`.
        let _ = unsafe { x86::bits64::vmx::vmwrite(field.raw(), value) };
    }
}

/// Whether the shadow VMCS at `shadow` takes a VMWRITE of each of `fields` (L0's boot check before
/// it turns VMCS shadowing on); the first it refuses, if any. `current` is made current again.
///
/// # Safety
/// VMX operation is on; `shadow` came from [`create_shadow`]; `current` is the current VMCS.
pub unsafe fn shadow_accepts(
    shadow: Hpa,
    current: &ActiveVmcs,
    fields: impl Iterator<Item = VmcsField>,
) -> Result<(), Option<VmcsField>> {
    // SAFETY: preconditions.
    unsafe { x86::bits64::vmx::vmptrld(shadow.raw()) }.map_err(|_| None)?;
    let mut refused = None;
    for f in fields {
        // SAFETY: the shadow is current.
        if unsafe { x86::bits64::vmx::vmwrite(f.raw(), 0) }.is_err() && refused.is_none() {
            refused = Some(f);
        }
    }
    // SAFETY: `current` was current before and is a configured VMCS.
    unsafe { x86::bits64::vmx::vmptrld(current.region.raw()) }.map_err(|_| None)?;
    refused.map_or(Ok(()), |f| Err(Some(f)))
}

/// The vCPU as the exit handler sees it: the current VMCS and the registers the exit stub saved.
#[derive(Debug)]
pub struct HwVcpu<'a> {
    vmcs: &'a mut ActiveVmcs,
    regs: &'a mut GuestRegs,
    /// The shadow VMCS L0 keeps for this guest, with nested VMX and VMCS shadowing.
    shadow: Option<Hpa>,
}

impl<'a> HwVcpu<'a> {
    /// Wraps the current VMCS and the saved registers of one exit.
    pub fn new(vmcs: &'a mut ActiveVmcs, regs: &'a mut GuestRegs) -> Self {
        Self {
            vmcs,
            regs,
            shadow: None,
        }
    }

    /// With the guest's shadow VMCS (from [`create_shadow`]).
    #[must_use]
    pub fn with_shadow_vmcs(mut self, shadow: Option<Hpa>) -> Self {
        self.shadow = shadow;
        self
    }
}

impl Vcpu for HwVcpu<'_> {
    fn exit(&mut self) -> VmExit {
        VmExit::decode(|field| self.vmcs.read(field))
    }

    fn read(&mut self, field: VmcsField) -> u64 {
        self.vmcs.read(field)
    }

    fn write(&mut self, field: VmcsField, value: u64) {
        if let Err(e) = self.vmcs.write(field, value) {
            // The exit handler only writes fields that exist with values it computed from the VMCS itself.
            panic!("{e}");
        }
    }

    fn regs(&mut self) -> &mut GuestRegs {
        self.regs
    }

    fn link_shadow(&mut self, linked: bool) -> bool {
        let Some(shadow) = self.shadow else {
            return false;
        };
        let link = if linked { shadow.raw() } else { u64::MAX };
        self.write(ihmi_vmcs::fields::guest::LINK_PTR_FULL, link);
        true
    }

    fn with_shadow(&mut self, f: &mut dyn FnMut(&mut dyn ihmi_hv::ShadowFields)) -> bool {
        let Some(shadow) = self.shadow else {
            return false;
        };
        // SAFETY: VMX is on and the shadow came from `create_shadow`; the current VMCS is made
        // current again before anything else reads or writes a field.
        if unsafe { x86::bits64::vmx::vmptrld(shadow.raw()) }.is_err() {
            return false;
        }
        f(&mut ShadowVmcs);
        // SAFETY: `self.vmcs` was current before and is a configured VMCS.
        if unsafe { x86::bits64::vmx::vmptrld(self.vmcs.region.raw()) }.is_err() {
            panic!("VMPTRLD of the current VMCS failed after its shadow's");
        }
        true
    }
}

/// INVEPT single-context for one EPTP (SDM 31.3, INVEPT), after changing the tables behind it.
///
/// # Safety
/// VMX operation is on and the CPU supports single-context INVEPT.
pub unsafe fn invept_single(eptp: u64) {
    let descriptor: [u64; 2] = [eptp, 0];
    // SAFETY: the descriptor is a valid 16-byte INVEPT descriptor on our stack; type 1 = single context.
    unsafe {
        core::arch::asm!("invept {0}, [{1}]", in(reg) 1u64, in(reg) &descriptor, options(nostack));
    }
}

// The exit stub's frame must match `GuestRegs`: 15 pushed registers.
const _: () = assert!(core::mem::size_of::<GuestRegs>() == 15 * 8);

/// Handler the exit stub calls with the saved registers; returning resumes the guest.
pub type ExitHandler = extern "C" fn(&mut GuestRegs);
/// Handler for a VMLAUNCH/VMRESUME that failed; gets RFLAGS right after the instruction.
pub type EntryFailedHandler = extern "C" fn(rflags: u64) -> !;

#[no_mangle]
static IHMI_EXIT_HANDLER: AtomicUsize = AtomicUsize::new(0);
#[no_mangle]
static IHMI_ENTRY_FAILED: AtomicUsize = AtomicUsize::new(0);
/// Set by [`ActiveVmcs::switch_to`] for a VMCS never launched; the exit stub then enters with VMLAUNCH.
#[no_mangle]
static IHMI_LAUNCH_NEXT: AtomicU8 = AtomicU8::new(0);

/// The host RIP to put in the VMCS: the exit stub.
#[must_use]
pub fn exit_stub_address() -> u64 {
    extern "C" {
        fn ihmi_vmx_exit_stub();
    }
    ihmi_vmx_exit_stub as *const () as u64
}

/// Enters the current VMCS's guest for the first time. Never returns: exits run `on_exit`, failures
/// `on_failure`.
///
/// # Safety
/// 1. The current VMCS is fully set up and has never been entered: host RIP = [`exit_stub_address`], host RSP = the 16-byte-aligned top of a
///    stack reserved for exits, host and guest state valid.
/// 2. `on_exit` and `on_failure` are safe to call on that stack at any exit.
pub unsafe fn launch(
    vmcss: &mut Vmcss,
    regs: &GuestRegs,
    on_exit: ExitHandler,
    on_failure: EntryFailedHandler,
) -> ! {
    // The current VMCS is entered now, by VMLAUNCH; later entries of it resume.
    if let Some(id) = vmcss.current() {
        let _ = vmcss.arena.enter(id);
    }
    IHMI_EXIT_HANDLER.store(on_exit as usize, Ordering::SeqCst);
    IHMI_ENTRY_FAILED.store(on_failure as usize, Ordering::SeqCst);
    // SAFETY: preconditions 1 and 2; `regs` is a valid GuestRegs for the stub to load.
    unsafe { ihmi_vmx_launch(regs) }
}

extern "C" {
    fn ihmi_vmx_launch(regs: *const GuestRegs) -> !;
}

core::arch::global_asm!(
    r#"
    .section .text.ihmi_vmx, "ax"
    .global ihmi_vmx_launch
ihmi_vmx_launch:
    mov 0x00(%rdi), %r15
    mov 0x08(%rdi), %r14
    mov 0x10(%rdi), %r13
    mov 0x18(%rdi), %r12
    mov 0x20(%rdi), %r11
    mov 0x28(%rdi), %r10
    mov 0x30(%rdi), %r9
    mov 0x38(%rdi), %r8
    mov 0x40(%rdi), %rbp
    mov 0x50(%rdi), %rsi
    mov 0x58(%rdi), %rdx
    mov 0x60(%rdi), %rcx
    mov 0x68(%rdi), %rbx
    mov 0x70(%rdi), %rax
    mov 0x48(%rdi), %rdi
    vmlaunch
    pushfq
    pop %rdi
    and $-16, %rsp
    call *IHMI_ENTRY_FAILED(%rip)
    ud2

    /* VM exits land here on the exit stack (host RSP). Push order is the reverse of GuestRegs. */
    .global ihmi_vmx_exit_stub
ihmi_vmx_exit_stub:
    push %rax
    push %rbx
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %rbp
    push %r8
    push %r9
    push %r10
    push %r11
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, %rbx              /* &mut GuestRegs; rbx survives the call */
    sub $520, %rsp              /* 512 for FXSAVE, realigned to 16 after 15 pushes */
    fxsave64 (%rsp)             /* L0's Rust code may use SSE; the guest's state must survive it */
    mov %rbx, %rdi
    call *IHMI_EXIT_HANDLER(%rip)
    fxrstor64 (%rsp)
    add $520, %rsp
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rbp
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rbx
    pop %rax
    /* A VMCS the handler just made current for the first time needs VMLAUNCH (SDM 26.1: its launch
       state is clear). The test and the store touch no register the guest sees. */
    testb $1, IHMI_LAUNCH_NEXT(%rip)
    jnz 1f
    vmresume
    jmp 2f
1:  movb $0, IHMI_LAUNCH_NEXT(%rip)
    vmlaunch
2:  pushfq
    pop %rdi
    and $-16, %rsp
    call *IHMI_ENTRY_FAILED(%rip)
    ud2
"#,
    options(att_syntax)
);
