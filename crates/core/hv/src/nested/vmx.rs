//! VMX operation as L0 emulates it for its guest, the L1 hypervisor: entering and leaving it
//! (VMXON, VMXOFF), the current VMCS (VMCLEAR, VMPTRLD, VMPTRST) and its fields (VMREAD, VMWRITE),
//! each with the SDM's checks in the SDM's order (Vol. 3C, chapter 31, each instruction's
//! "Operation"), the guest's CR4.VMXE through the read shadow, and the operands decoded from the
//! exit's instruction information (SDM 28.2.5).
//!
//! VMLAUNCH and VMRESUME make the checks that come before the entry (the launch state, MOV SS
//! blocking, the controls and the host state: [`super::entry`]) and fail valid as the SDM says; then
//! the guest-state checks, which fail with an exit to L1; an entry that passes them all runs L2
//! ([`super::run`], [`super::l2`]). INVEPT empties EPT02 (`super::ept`) where the offer has nested
//! EPT and is #UD elsewhere; INVVPID, offered with it, checks its operands and succeeds (VPIDs are
//! emulated: `super::caps::EPT_VPID_CAP_VPID`).
//!
//! VMfail (SDM 31.2) is VMfailValid with the error number in the current VMCS12 when there is one,
//! VMfailInvalid otherwise.
//!
//! Every region pointer (VMXON, VMCLEAR, VMPTRLD) must be 4 KiB aligned, within 46 address bits and
//! a whole page of guest RAM; one in L0's or the monitor's memory is refused with an alert too.

use ihmi_addr::{Gpa, Gva, PAGE_SIZE};
use ihmi_arch::cr::{CR0_PE, CR4_VMXE};
use ihmi_arch::vector::{GP, UD};
use ihmi_vmcs::fields::{control, guest};
use ihmi_vmcs::{Gpr, VmcsField, VmxInstruction, VmxInstructionInfo};

use super::caps::{VirtualVmx, VMCS12_REVISION};
use super::l2::L0Controls;
use super::run::NestedStats;
use super::vmcs12::{FieldError, Vmcs12, Vmcs12Cache, SAVED_AT, SAVED_LEN, VM_INSTRUCTION_ERROR};
use crate::memory::GuestRamReader;
use crate::vcpu::{cpl, gpr, set_gpr};
use crate::{
    inject_exception, skip_instruction, Action, Alert, GuestEnd, Hypervisor, Observation, Observer,
    Platform, RegionKind, Vcpu,
};

/// RFLAGS bits VMsucceed clears and VMfail sets one of (SDM 31.2): CF, PF, AF, ZF, SF, OF.
const CF: u64 = 1 << 0;
const ZF: u64 = 1 << 6;
const STATUS_FLAGS: u64 = CF | 1 << 2 | 1 << 4 | ZF | 1 << 7 | 1 << 11;
/// RFLAGS.VM: virtual-8086 mode, where every VMX instruction is #UD.
const RFLAGS_VM: u64 = 1 << 17;
/// IA32_EFER.LMA, and the L bit of a code segment's access rights (64-bit code).
const EFER_LMA: u64 = 1 << 10;
const CS_L: u64 = 1 << 13;
/// Physical-address bits L0 accepts in a VMX region pointer (L0's guests see no wider memory).
const PHYS_ADDR_BITS: u32 = 46;

/// VM-instruction error numbers (SDM 31.4).
mod error {
    pub const VMCLEAR_INVALID_ADDRESS: u32 = 2;
    pub const VMCLEAR_VMXON_POINTER: u32 = 3;
    pub const VMPTRLD_INVALID_ADDRESS: u32 = 9;
    pub const VMPTRLD_VMXON_POINTER: u32 = 10;
    pub const VMPTRLD_INCORRECT_REVISION: u32 = 11;
    pub const UNSUPPORTED_COMPONENT: u32 = 12;
    pub const VMWRITE_READ_ONLY: u32 = 13;
    pub const VMXON_IN_ROOT: u32 = 15;
    pub const INVEPT_INVALID_OPERAND: u32 = 28;
    pub const ENTRY_INVALID_CONTROL_FIELDS: u32 = 7;
    pub const ENTRY_INVALID_HOST_STATE: u32 = 8;
    pub const ENTRY_BLOCKED_BY_MOV_SS: u32 = 26;
}

/// A VMX instruction's exit, as the VMX layer decoded it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct VmxExit {
    pub instruction: VmxInstruction,
    /// Its operands (SDM 28.2.5).
    pub info: VmxInstructionInfo,
    /// The displacement of a memory operand (the exit qualification).
    pub displacement: u64,
    pub len: u64,
}

/// What a VMX instruction came to, as the guest sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmxOutcome {
    /// VMsucceed: the status flags clear.
    Succeed,
    /// VMfailInvalid: CF set (no current VMCS to hold an error number).
    FailInvalid,
    /// VMfailValid: ZF set, this error number in the current VMCS12's VM-instruction error field.
    FailValid(u32),
    /// A fault instead of the instruction (#UD, #GP(0)).
    Fault { vector: u8 },
    /// VMLAUNCH or VMRESUME passed every check: L0 enters L2 (L1 goes on at its host state when L2
    /// exits to it).
    Entered,
    /// VMLAUNCH or VMRESUME failed the guest-state checks: an exit to L1 with reason 33, L1 at its
    /// host state.
    EntryFailed,
    /// An instruction L0 does not emulate yet: the guest was ended.
    NotEmulated,
}

impl VmxOutcome {
    /// The outcome in reports (with the error number of a VMfailValid beside it).
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Succeed => "VMsucceed",
            Self::FailInvalid => "VMfailInvalid",
            Self::FailValid(_) => "VMfailValid",
            Self::Fault { vector: UD } => "#UD",
            Self::Fault { vector: GP } => "#GP(0)",
            Self::Fault { .. } => "fault",
            Self::Entered => "entered L2",
            Self::EntryFailed => "VM-entry failure (invalid guest state)",
            Self::NotEmulated => "not emulated",
        }
    }
}

/// Why a VMX region pointer was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionRefusal {
    /// Not 4 KiB aligned, or beyond the physical-address width.
    Malformed,
    /// Not guest RAM: the region kind it lies in, if any.
    NotGuestRam(Option<RegionKind>),
    /// The revision identifier is not L0's (or bit 31, "shadow VMCS", is set).
    Revision(u32),
    /// A VMCS region in guest RAM that L0 keeps read-only for the guest (a locked kernel page, the
    /// monitor's gate tables): L0 writes VMCS12 back into its region, which must not be a way
    /// around that lock.
    NotWritable,
}

impl core::fmt::Display for RegionRefusal {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Malformed => {
                f.write_str("not 4 KiB aligned, or beyond the physical-address width")
            }
            Self::NotGuestRam(Some(kind)) => write!(f, "not guest RAM ({})", kind.name()),
            Self::NotGuestRam(None) => f.write_str("not guest RAM"),
            Self::Revision(r) => write!(f, "revision identifier {r:#x}, not {VMCS12_REVISION:#x}"),
            Self::NotWritable => f.write_str("guest RAM that L0 keeps read-only for the guest"),
        }
    }
}

/// Which level runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// L1, the guest hypervisor, on VMCS01.
    L1,
    /// L1's guest, on VMCS02.
    L2,
}

/// The guest's VMX state: the capabilities L0 offers it, whether it is in VMX operation, its
/// current VMCS and the VMCS12s L0 holds, which level runs, and the nested path's costs.
#[derive(Debug)]
pub struct NestedVmx {
    offer: VirtualVmx,
    /// The VMXON region, while the guest is in VMX operation.
    vmxon: Option<Gpa>,
    /// The current VMCS (VMPTRLD's), a key of `cache`.
    current: Option<Gpa>,
    cache: Vmcs12Cache,
    pub(crate) level: Level,
    /// L0's controls in VMCS01 at the last entry to L2, merged into VMCS02.
    pub(crate) l0: L0Controls,
    /// Whether the entry in progress is a VMLAUNCH.
    pub(crate) launching: bool,
    pub(crate) stats: NestedStats,
    /// Whether L1's VMREADs and VMWRITEs of the shadowed fields go to L0's shadow VMCS.
    shadowing: bool,
    /// The VMX instructions that succeeded (or entered L2) and were logged: the first
    /// [`LOGGED_SUCCESSES`]; a failure is always logged.
    logged: u32,
    /// Nested EPT: EPT02, for the EPTP12 of the last entry that used one.
    pub(crate) ept02: Option<super::ept::Ept02>,
    /// The EPTP VMCS02 gets at the entry in progress: EPT02's, or `None` for L0's own view.
    pub(crate) vmcs02_eptp: Option<u64>,
    /// L2's system-call entry MSRs ([`L2_ENTRY_MSRS`]) where L1 set them in VMX operation to
    /// other values than the ones L0 locked for L1 (KVM loads its guest's IA32_LSTAR before it
    /// enters it): in the CPU only while L2 runs (NESTED.md A.2.9).
    pub(crate) l2_entry_msrs: [Option<u64>; 2],
    /// What the CPU had in them at the entry to L2, which it gets back at the exit to L1.
    pub(crate) l1_entry_msrs: [u64; 2],
    /// L1's values of the MSRs an MSR area may load ([`super::msr_area::AREA_MSRS`]) from before
    /// the last entry loaded its VM-entry MSR-load area: what they go back to if the CPU then
    /// fails that entry, which a CPU fails before it loads any MSR.
    pub(crate) l1_area_msrs: Option<[u64; super::msr_area::AREA_MSRS.len()]>,
}

/// The system-call entry MSRs a guest hypervisor sets for its guest with WRMSR and L0 locks for
/// L1 itself (IA32_SYSENTER_EIP is in the VMCS: VMCS02 has L2's own).
pub const L2_ENTRY_MSRS: [u32; 2] = [ihmi_arch::msr::IA32_LSTAR, ihmi_arch::msr::IA32_CSTAR];

/// How many successful VMX instructions L0 logs one line each (a guest hypervisor makes thousands:
/// a VMRESUME per exit of its guest); the end-of-run counters cover the rest.
pub const LOGGED_SUCCESSES: u32 = 64;

impl NestedVmx {
    /// Nested EPT: EPT02 and its costs, once an entry used it.
    #[must_use]
    pub fn ept02(&self) -> Option<&super::ept::Ept02> {
        self.ept02.as_ref()
    }

    /// A guest offered `offer`, not in VMX operation.
    #[must_use]
    pub fn new(offer: VirtualVmx) -> Self {
        Self {
            offer,
            vmxon: None,
            current: None,
            cache: Vmcs12Cache::default(),
            level: Level::L1,
            l0: L0Controls::default(),
            launching: false,
            stats: NestedStats::default(),
            shadowing: false,
            logged: 0,
            ept02: None,
            vmcs02_eptp: None,
            l2_entry_msrs: [None; 2],
            l1_entry_msrs: [0; 2],
            l1_area_msrs: None,
        }
    }

    /// With VMCS shadowing (L0 has a shadow VMCS for the guest, [`super::shadow`]).
    #[must_use]
    pub fn with_shadowing(mut self) -> Self {
        self.shadowing = true;
        self
    }

    /// Whether VMCS shadowing is on.
    #[must_use]
    pub const fn shadowing(&self) -> bool {
        self.shadowing
    }

    /// The capability MSRs the guest reads.
    #[must_use]
    pub const fn offer(&self) -> &VirtualVmx {
        &self.offer
    }

    /// The VMXON region, while the guest is in VMX operation.
    #[must_use]
    pub const fn vmxon_region(&self) -> Option<Gpa> {
        self.vmxon
    }

    /// The current VMCS, if any.
    #[must_use]
    pub const fn current_vmcs(&self) -> Option<Gpa> {
        self.current
    }

    /// The current VMCS12.
    pub(crate) fn current_mut(&mut self) -> Option<&mut Vmcs12> {
        let gpa = self.current?;
        self.cache.get_mut(gpa)
    }

    /// Puts `v` in the cache as the current VMCS at `gpa` (tests of the paths that need one).
    #[cfg(test)]
    pub(crate) fn test_make_current(&mut self, gpa: Gpa, v: Vmcs12) {
        self.vmxon = Some(Gpa::new(0x6000));
        let _ = self.cache.insert(gpa, v);
        self.current = Some(gpa);
    }

    /// The current VMCS12 (tests).
    #[cfg(test)]
    pub(crate) fn test_current(&mut self) -> Option<&mut Vmcs12> {
        self.current_mut()
    }

    /// VMfail(`n`): VMfailValid into the current VMCS12, else VMfailInvalid.
    fn fail(&mut self, n: u32) -> VmxOutcome {
        match self.current_mut() {
            Some(v) => {
                // The field is one a VMCS12 keeps.
                let _ = v.set(VM_INSTRUCTION_ERROR, u64::from(n));
                VmxOutcome::FailValid(n)
            }
            None => VmxOutcome::FailInvalid,
        }
    }
}

/// The guest's CR0 and CR4 as it sees them: the masked bits from the read shadows.
fn guest_view(vcpu: &mut impl Vcpu) -> (u64, u64) {
    let view = |real: u64, mask: u64, shadow: u64| (real & !mask) | (shadow & mask);
    let cr0 = view(
        vcpu.read(guest::CR0),
        vcpu.read(control::CR0_GUEST_HOST_MASK),
        vcpu.read(control::CR0_READ_SHADOW),
    );
    let cr4 = view(
        vcpu.read(guest::CR4),
        vcpu.read(control::CR4_GUEST_HOST_MASK),
        vcpu.read(control::CR4_READ_SHADOW),
    );
    (cr0, cr4)
}

/// Whether the guest runs 64-bit code (IA32_EFER.LMA and CS.L).
fn long_mode(vcpu: &mut impl Vcpu) -> bool {
    vcpu.read(guest::IA32_EFER_FULL) & EFER_LMA != 0
        && vcpu.read(guest::CS_ACCESS_RIGHTS) & CS_L != 0
}

/// The linear address of a VMX instruction's memory operand (SDM 28.2.5, tables "Format of the
/// VM-Exit Instruction-Information Field as Used for VMCLEAR, VMPTRLD, VMPTRST, VMXON, XRSTORS,
/// and XSAVES" and "... for VMREAD and VMWRITE"): base + index << scale + displacement, cut to the
/// address size, plus the segment's base (in 64-bit mode only FS's and GS's count).
fn operand_address(vcpu: &mut impl Vcpu, info: VmxInstructionInfo, displacement: u64) -> Gva {
    let reg = |vcpu: &mut _, n: u8| gpr(vcpu, Gpr::from_number(n));
    let mut addr = displacement;
    if let Some(b) = info.base() {
        addr = addr.wrapping_add(reg(vcpu, b));
    }
    if let Some(i) = info.index() {
        addr = addr.wrapping_add(reg(vcpu, i) << info.scaling());
    }
    addr = match info.address_size() {
        0 => addr & 0xffff,
        1 => addr & 0xffff_ffff,
        _ => addr,
    };
    let segment = info.segment();
    if !long_mode(vcpu) || segment >= 4 {
        let base = match segment {
            0 => guest::ES_BASE,
            1 => guest::CS_BASE,
            2 => guest::SS_BASE,
            3 => guest::DS_BASE,
            4 => guest::FS_BASE,
            _ => guest::GS_BASE,
        };
        addr = addr.wrapping_add(vcpu.read(base));
    }
    Gva::new(addr)
}

impl Hypervisor {
    /// A VMX instruction from the guest: #UD without nested VMX, as on a CPU without VMX enabled;
    /// else the emulation above.
    pub(crate) fn on_vmx(
        &mut self,
        vcpu: &mut impl Vcpu,
        platform: &mut impl Platform,
        obs: &mut impl Observer,
        exit: VmxExit,
    ) -> Action {
        if self.nested.is_none() {
            inject_exception(vcpu, UD, None);
            return Action::Resume;
        }
        let rip = vcpu.read(guest::RIP);
        let mut entry = Action::Resume;
        // With VMCS shadowing, what L1 wrote in the shadow comes into VMCS12 before it is used.
        let before = self.nested.as_ref().and_then(|n| n.current);
        if !matches!(
            exit.instruction,
            VmxInstruction::Vmread | VmxInstruction::Vmwrite
        ) {
            self.shadow_store(vcpu);
        }
        let outcome = self.vmx_outcome(vcpu, platform, obs, exit, &mut entry);
        let after = self.nested.as_ref().and_then(|n| n.current);
        if after != before {
            self.shadow_load(vcpu);
        }
        let instruction = exit.instruction;
        let logged = self.nested.as_mut().map_or(LOGGED_SUCCESSES, |n| {
            let before = n.logged;
            if matches!(outcome, VmxOutcome::Succeed | VmxOutcome::Entered) {
                n.logged = n.logged.saturating_add(1);
            }
            before
        });
        match outcome {
            VmxOutcome::FailValid(n) => platform.log(format_args!(
                "nested: {instruction:?} at {rip:#x}: VMfailValid({n})"
            )),
            VmxOutcome::Succeed | VmxOutcome::Entered if logged >= LOGGED_SUCCESSES => {}
            _ => platform.log(format_args!(
                "nested: {instruction:?} at {rip:#x}: {}{}",
                outcome.name(),
                if logged == LOGGED_SUCCESSES - 1 {
                    " (later successes are counted, not logged)"
                } else {
                    ""
                }
            )),
        }
        obs.observe(Observation::Vmx {
            instruction,
            outcome,
        });
        let rflags = vcpu.read(guest::RFLAGS) & !STATUS_FLAGS;
        let flags = match outcome {
            VmxOutcome::Succeed => 0,
            VmxOutcome::FailInvalid => CF,
            VmxOutcome::FailValid(_) => ZF,
            VmxOutcome::Fault { vector } => {
                inject_exception(vcpu, vector, (vector == GP).then_some(0));
                return Action::Resume;
            }
            // L1 goes on at its host state, now or when L2 exits: nothing to skip.
            VmxOutcome::Entered | VmxOutcome::EntryFailed => return entry,
            VmxOutcome::NotEmulated => {
                return Action::End(GuestEnd::Unhandled {
                    reason: instruction.reason(),
                    qualification: exit.displacement,
                    rip,
                })
            }
        };
        vcpu.write(guest::RFLAGS, rflags | flags);
        skip_instruction(vcpu, ihmi_vmcs::Instruction { len: exit.len });
        Action::Resume
    }

    /// The SDM's checks, in its order, and what a successful instruction changes.
    fn vmx_outcome(
        &mut self,
        vcpu: &mut impl Vcpu,
        platform: &mut impl Platform,
        obs: &mut impl Observer,
        exit: VmxExit,
        entry: &mut Action,
    ) -> VmxOutcome {
        let VmxExit {
            instruction,
            info,
            displacement,
            ..
        } = exit;
        let ud = VmxOutcome::Fault { vector: UD };
        let gp = VmxOutcome::Fault { vector: GP };
        let Some(nested) = self.nested.as_ref() else {
            return ud;
        };
        let (cr0, cr4) = guest_view(vcpu);
        let in_vmx = nested.vmxon.is_some();
        let compat_mode = vcpu.read(guest::IA32_EFER_FULL) & EFER_LMA != 0
            && vcpu.read(guest::CS_ACCESS_RIGHTS) & CS_L == 0;
        // Common to all: no VMX outside protected mode, in virtual-8086 mode or compatibility mode
        // (the CPU checks those, and a register operand of VMXON, before it exits; they are checked
        // again here for the state the guest sees); VMXON also needs CR4.VMXE as the guest set it,
        // the others VMX operation. INVEPT and INVVPID exist only with nested EPT offered (VPID
        // comes with it).
        let ept_offered = nested.offer().features() == super::caps::NestedFeatures::NestedEpt;
        let entered = match instruction {
            VmxInstruction::Vmxon => cr4 & CR4_VMXE != 0,
            VmxInstruction::Invept | VmxInstruction::Invvpid => in_vmx && ept_offered,
            _ => in_vmx,
        };
        if !entered || cr0 & CR0_PE == 0 || vcpu.read(guest::RFLAGS) & RFLAGS_VM != 0 || compat_mode
        {
            return ud;
        }
        if cpl(vcpu) > 0 {
            return gp;
        }
        match instruction {
            VmxInstruction::Vmxon if in_vmx => self.fail_nested(error::VMXON_IN_ROOT),
            VmxInstruction::Vmxon => {
                let offer = nested.offer();
                let fixed0_cr0 = offer
                    .read_msr(ihmi_arch::msr::IA32_VMX_CR0_FIXED0)
                    .unwrap_or(0);
                let fixed1_cr0 = offer
                    .read_msr(ihmi_arch::msr::IA32_VMX_CR0_FIXED1)
                    .unwrap_or(0);
                let fixed1_cr4 = offer
                    .read_msr(ihmi_arch::msr::IA32_VMX_CR4_FIXED1)
                    .unwrap_or(0);
                if cr0 & fixed0_cr0 != fixed0_cr0
                    || cr0 & !fixed1_cr0 != 0
                    || cr4 & !fixed1_cr4 != 0
                {
                    return gp;
                }
                let Some(pointer) = self.read_operand(vcpu, platform, info, displacement, 8) else {
                    // The operand does not translate to guest RAM. A CPU would raise #PF; L0 cannot
                    // set the guest's CR2 from here, so it raises #GP(0).
                    return gp;
                };
                match self.check_region(vcpu, platform, obs, instruction, pointer, true) {
                    Ok(gpa) => {
                        if let Some(n) = self.nested.as_mut() {
                            n.vmxon = Some(gpa);
                            n.current = None;
                        }
                        VmxOutcome::Succeed
                    }
                    // Outside VMX operation there is no current VMCS.
                    Err(_) => VmxOutcome::FailInvalid,
                }
            }
            VmxInstruction::Vmxoff => {
                if let Some(n) = self.nested.as_mut() {
                    n.vmxon = None;
                    n.current = None;
                    // Out of VMX operation there is no L2: LSTAR and CSTAR writes are L1's again.
                    n.l2_entry_msrs = [None; 2];
                }
                VmxOutcome::Succeed
            }
            VmxInstruction::Vmclear | VmxInstruction::Vmptrld => {
                let Some(pointer) = self.read_operand(vcpu, platform, info, displacement, 8) else {
                    return gp;
                };
                let clear = instruction == VmxInstruction::Vmclear;
                let (invalid, vmxon_pointer) = if clear {
                    (error::VMCLEAR_INVALID_ADDRESS, error::VMCLEAR_VMXON_POINTER)
                } else {
                    (error::VMPTRLD_INVALID_ADDRESS, error::VMPTRLD_VMXON_POINTER)
                };
                // The SDM's order: the address, the VMXON pointer, then (VMPTRLD) the revision.
                let Ok(gpa) = self.check_region(vcpu, platform, obs, instruction, pointer, false)
                else {
                    return self.fail_nested(invalid);
                };
                if Some(gpa) == self.nested.as_ref().and_then(|n| n.vmxon) {
                    return self.fail_nested(vmxon_pointer);
                }
                if !clear
                    && self
                        .check_region(vcpu, platform, obs, instruction, pointer, true)
                        .is_err()
                {
                    return self.fail_nested(error::VMPTRLD_INCORRECT_REVISION);
                }
                if clear {
                    self.vmclear(platform, gpa);
                } else {
                    self.vmptrld(platform, gpa);
                }
                VmxOutcome::Succeed
            }
            VmxInstruction::Vmptrst => {
                let current = nested.current.map_or(u64::MAX, Gpa::raw);
                let at = operand_address(vcpu, info, displacement);
                if !self.write_guest_virt(vcpu, platform, at, &current.to_le_bytes()) {
                    return gp;
                }
                VmxOutcome::Succeed
            }
            VmxInstruction::Vmread | VmxInstruction::Vmwrite => {
                if nested.current.is_none() {
                    return VmxOutcome::FailInvalid;
                }
                self.vmread_vmwrite(vcpu, platform, instruction, info, displacement)
            }
            VmxInstruction::Vmlaunch | VmxInstruction::Vmresume => {
                if nested.current.is_none() {
                    return VmxOutcome::FailInvalid;
                }
                // Events blocked by MOV SS: VMfailValid(26) (SDM 31.3, VMLAUNCH/VMRESUME).
                if vcpu.read(guest::INTERRUPTIBILITY_STATE) & 0b10 != 0 {
                    return self.fail_nested(error::ENTRY_BLOCKED_BY_MOV_SS);
                }
                let l1_ia32e = vcpu.read(guest::IA32_EFER_FULL) & EFER_LMA != 0;
                let launch = instruction == VmxInstruction::Vmlaunch;
                let offer = *nested.offer();
                // With the in-hypervisor monitor in L1's KVM, only a vCPU's own VMCS runs
                // (NESTED.md B.1.3 P6), whatever else it holds: refused first, with an alert.
                if self.rogue_vmcs_refused(vcpu, platform, obs, launch) {
                    return self.fail_nested(error::ENTRY_INVALID_CONTROL_FIELDS);
                }
                let refused = self
                    .current_vmcs12()
                    .and_then(|v| super::entry::check(v, &offer, launch, l1_ia32e).err());
                // Every address the entry will use must be L1's memory: one in L0's or the
                // monitor's is refused with an alert (NESTED.md B.3 12.7).
                if refused.is_none() && self.entry_pointers_refused(vcpu, platform, obs) {
                    return self.fail_nested(error::ENTRY_INVALID_CONTROL_FIELDS);
                }
                // With KVM as L1, its host state must be its own (NESTED.md B.1.3 P3).
                if refused.is_none() && self.host_state_refused(vcpu, platform, obs) {
                    return self.fail_nested(error::ENTRY_INVALID_HOST_STATE);
                }
                match refused {
                    Some(why) => {
                        platform.log(format_args!("nested: {instruction:?} refused: {why:?}"));
                        self.fail_nested(why.instruction_error())
                    }
                    None => match self.nested_entry(vcpu, platform, launch) {
                        Ok(Action::Resume) => VmxOutcome::EntryFailed,
                        Ok(action) => {
                            *entry = action;
                            VmxOutcome::Entered
                        }
                        Err(why) => {
                            platform.log(format_args!("nested: {instruction:?}: {why}"));
                            VmxOutcome::NotEmulated
                        }
                    },
                }
            }
            VmxInstruction::Invept => {
                // The type first: an unsupported one fails before the descriptor is read.
                let kind = gpr(vcpu, Gpr::from_number(info.reg2()));
                if !matches!(kind, 1 | 2) {
                    return self.fail_nested(error::INVEPT_INVALID_OPERAND);
                }
                let Some(eptp) = self.read_operand(vcpu, platform, info, displacement, 8) else {
                    return gp;
                };
                self.invept(platform, kind, eptp)
            }
            VmxInstruction::Invvpid => {
                // The type first (SDM 31.3 INVVPID: a type the capability MSR lacks fails before
                // the descriptor is read), then the descriptor: VPID in bits 15:0, bits 63:16 zero,
                // the linear address in bits 127:64.
                let kind = gpr(vcpu, Gpr::from_number(info.reg2()));
                if kind > 3 || super::caps::EPT_VPID_CAP_VPID & (1 << (40 + kind)) == 0 {
                    return self.fail_nested(error::INVEPT_INVALID_OPERAND);
                }
                let low = self.read_operand(vcpu, platform, info, displacement, 8);
                let high = self.read_operand(vcpu, platform, info, displacement.wrapping_add(8), 8);
                let (Some(low), Some(address)) = (low, high) else {
                    return gp;
                };
                invvpid(kind, low, address)
                    .map_or_else(|e| self.fail_nested(e), |()| VmxOutcome::Succeed)
            }
        }
    }

    /// INVEPT of `kind` (1: the EPT `eptp` names, 2: all) for L1: the EPT02 built from that EPT12
    /// (or any) is emptied and the CPU forgets it; a type the offer lacks, or a single-context
    /// EPTP L0 would not enter with, is VMfailValid 28 (SDM 31.3 INVEPT).
    fn invept(&mut self, platform: &mut impl Platform, kind: u64, eptp: u64) -> VmxOutcome {
        let single = match kind {
            1 if super::ept::eptp_valid(eptp) => true,
            2 => false,
            _ => return self.fail_nested(error::INVEPT_INVALID_OPERAND),
        };
        let Some(n) = self.nested.as_mut() else {
            return VmxOutcome::FailInvalid;
        };
        let root = |e: u64| e & !0xfff;
        if let Some(e) = n
            .ept02
            .as_mut()
            .filter(|e| !single || root(e.eptp12) == root(eptp))
        {
            let Some(tables) = platform.ept02_tables() else {
                return VmxOutcome::NotEmulated;
            };
            if e.reset(tables).is_err() {
                return VmxOutcome::NotEmulated;
            }
            platform.invept(e.eptp());
        }
        VmxOutcome::Succeed
    }

    /// VMCS shadowing: the shadow's fields into the current VMCS12.
    fn shadow_store(&mut self, vcpu: &mut impl Vcpu) {
        let Some(n) = self.nested.as_mut().filter(|n| n.shadowing) else {
            return;
        };
        if let Some(v) = n.current_mut() {
            vcpu.with_shadow(&mut |shadow| super::shadow::store(v, shadow));
        }
    }

    /// VMCS shadowing: the current VMCS12 into the shadow, linked from VMCS01 (current); without a
    /// current VMCS12 the link is all ones, so a shadowed VMREAD or VMWRITE fails invalid.
    pub(crate) fn shadow_load(&mut self, vcpu: &mut impl Vcpu) {
        let Some(n) = self.nested.as_mut().filter(|n| n.shadowing) else {
            return;
        };
        match n.current_mut() {
            Some(v) => {
                vcpu.with_shadow(&mut |shadow| super::shadow::load(v, shadow));
                vcpu.link_shadow(true);
            }
            None => {
                vcpu.link_shadow(false);
            }
        }
    }

    fn fail_nested(&mut self, n: u32) -> VmxOutcome {
        self.nested
            .as_mut()
            .map_or(VmxOutcome::FailInvalid, |v| v.fail(n))
    }

    /// VMCLEAR of a checked region: its VMCS12 (L0's, or what the region holds) goes back to the
    /// region with the launch state clear, and is current no more.
    fn vmclear(&mut self, platform: &mut impl Platform, gpa: Gpa) {
        let Some(n) = self.nested.as_mut() else {
            return;
        };
        let mut v = match n.cache.take(gpa) {
            Some(v) => v,
            None => load_region(platform, gpa),
        };
        v.launched = false;
        save_region(platform, gpa, &v);
        if n.current == Some(gpa) {
            n.current = None;
        }
    }

    /// VMPTRLD of a checked region: its VMCS12 comes into L0's cache (from the region if not there;
    /// the one it displaces goes back to its own region) and becomes current.
    fn vmptrld(&mut self, platform: &mut impl Platform, gpa: Gpa) {
        let Some(n) = self.nested.as_mut() else {
            return;
        };
        if n.cache.get_mut(gpa).is_none() {
            let v = load_region(platform, gpa);
            if let Some((old, evicted)) = n.cache.insert(gpa, v) {
                save_region(platform, old, &evicted);
            }
        }
        n.current = Some(gpa);
    }

    /// VMREAD (field in Reg2, destination Reg1 or memory) and VMWRITE (field in Reg2, source Reg1 or
    /// memory) on the current VMCS12. Memory operands are 64 bits in 64-bit mode, 32 otherwise.
    fn vmread_vmwrite(
        &mut self,
        vcpu: &mut impl Vcpu,
        platform: &mut impl Platform,
        instruction: VmxInstruction,
        info: VmxInstructionInfo,
        displacement: u64,
    ) -> VmxOutcome {
        let wide = long_mode(vcpu);
        let size = if wide { 8 } else { 4 };
        let encoding = gpr(vcpu, Gpr::from_number(info.reg2()));
        let field = if encoding >> 32 == 0 {
            Some(VmcsField::new(encoding as u32))
        } else {
            None
        };
        let field_error = |e: FieldError| match e {
            FieldError::Unsupported => error::UNSUPPORTED_COMPONENT,
            FieldError::ReadOnly => error::VMWRITE_READ_ONLY,
        };
        if instruction == VmxInstruction::Vmread {
            let value = match field.map(|f| self.current_vmcs12().map(|v| v.read(f))) {
                Some(Some(Ok(value))) => value,
                Some(Some(Err(e))) => return self.fail_nested(field_error(e)),
                Some(None) => return VmxOutcome::FailInvalid,
                None => return self.fail_nested(error::UNSUPPORTED_COMPONENT),
            };
            let value = if wide { value } else { value & 0xffff_ffff };
            if info.is_register() {
                set_gpr(vcpu, Gpr::from_number(info.reg1()), value);
            } else {
                let at = operand_address(vcpu, info, displacement);
                if !self.write_guest_virt(vcpu, platform, at, &value.to_le_bytes()[..size]) {
                    return VmxOutcome::Fault { vector: GP };
                }
            }
            return VmxOutcome::Succeed;
        }
        let value = if info.is_register() {
            gpr(vcpu, Gpr::from_number(info.reg1()))
        } else {
            match self.read_operand(vcpu, platform, info, displacement, size) {
                Some(v) => v,
                None => return VmxOutcome::Fault { vector: GP },
            }
        };
        let value = if wide { value } else { value & 0xffff_ffff };
        let Some(field) = field else {
            return self.fail_nested(error::UNSUPPORTED_COMPONENT);
        };
        match self.current_vmcs12().map(|v| v.write(field, value)) {
            Some(Ok(())) => VmxOutcome::Succeed,
            Some(Err(e)) => self.fail_nested(field_error(e)),
            None => VmxOutcome::FailInvalid,
        }
    }

    fn current_vmcs12(&mut self) -> Option<&mut Vmcs12> {
        self.nested.as_mut()?.current_mut()
    }

    /// The `size`-byte memory operand of a VMX instruction (little-endian, zero-extended), read
    /// through the guest's page tables from guest RAM only.
    fn read_operand(
        &self,
        vcpu: &mut impl Vcpu,
        platform: &impl Platform,
        info: VmxInstructionInfo,
        displacement: u64,
        size: usize,
    ) -> Option<u64> {
        let at = operand_address(vcpu, info, displacement);
        let reader = GuestRamReader {
            map: &self.memory,
            platform,
        };
        let mut b = [0u8; 8];
        let cr3 = ihmi_paging::Cr3::new(vcpu.read(guest::CR3));
        ihmi_paging::read_virt(&reader, cr3, at, &mut b[..size]).ok()?;
        Some(u64::from_le_bytes(b))
    }

    /// Stores `bytes` at `gva` through the guest's page tables, as the guest's own store would:
    /// only to writable guest RAM, each page translated. Whether it could.
    fn write_guest_virt(
        &self,
        vcpu: &mut impl Vcpu,
        platform: &mut impl Platform,
        gva: Gva,
        bytes: &[u8],
    ) -> bool {
        let cr3 = ihmi_paging::Cr3::new(vcpu.read(guest::CR3));
        let mut done = 0usize;
        while done < bytes.len() {
            let Some(at) = gva.checked_add(done as u64) else {
                return false;
            };
            let reader = GuestRamReader {
                map: &self.memory,
                platform: &*platform,
            };
            let Ok(t) = ihmi_paging::translate(&reader, cr3, at) else {
                return false;
            };
            let in_page = (PAGE_SIZE - (at.raw() & (PAGE_SIZE - 1))) as usize;
            let n = in_page.min(bytes.len() - done);
            if !t.writable
                || !self.memory.is_guest_ram(t.gpa, n as u64)
                || platform.write_guest(t.gpa, &bytes[done..done + n]).is_err()
            {
                return false;
            }
            done += n;
        }
        true
    }

    /// With the in-hypervisor monitor's VMCS registry (P6): whether the current VMCS12 is no vCPU's
    /// that KVM created, with an alert if so.
    fn rogue_vmcs_refused(
        &mut self,
        vcpu: &mut impl Vcpu,
        platform: &mut impl Platform,
        obs: &mut impl Observer,
        launch: bool,
    ) -> bool {
        let Some(gpa) = self.nested.as_ref().and_then(|n| n.current) else {
            return false;
        };
        match platform.vmcs_registered(gpa) {
            None => return false,
            Some(true) => {
                obs.observe(Observation::L1VmcsRegistered { gpa });
                return false;
            }
            Some(false) => {}
        }
        let rip = vcpu.read(guest::RIP);
        platform.log(format_args!(
            "nested: VM entry refused: the VMCS at {gpa} is no vCPU's that KVM created"
        ));
        self.alert(platform, obs, Alert::RogueVmcs { gpa, launch, rip });
        true
    }

    /// Whether a physical address the current VMCS12's entry would use (the I/O and MSR bitmaps,
    /// the MSR-load and -store areas, EPT12's root) lies in L0's or the monitor's memory: each such
    /// one is an alert.
    /// With Linux + KVM as L1 (its profile names `vmx_vmexit`): whether the current VMCS12's host
    /// state differs from L1's live state ([`super::host_state`]), with an alert naming the field
    /// if it does; an observation that it matched if not.
    fn host_state_refused(
        &mut self,
        vcpu: &mut impl Vcpu,
        platform: &mut impl Platform,
        obs: &mut impl Observer,
    ) -> bool {
        let Some(vmx_vmexit) = self.linux.and_then(|p| p.kvm).map(|k| k.vmx_vmexit) else {
            return false;
        };
        let Some(v) = self.current_vmcs12() else {
            return false;
        };
        match super::host_state::check(v, vcpu, vmx_vmexit) {
            Ok(()) => {
                obs.observe(Observation::L1HostStateChecked);
                false
            }
            Err(m) => {
                let rip = vcpu.read(guest::RIP);
                platform.log(format_args!(
                    "nested: VM entry refused: VMCS12's {} is {:#x}, L1's is {:#x}",
                    m.field, m.found, m.expected
                ));
                self.alert(
                    platform,
                    obs,
                    Alert::Vmcs12HostState {
                        field: m.field,
                        expected: m.expected,
                        found: m.found,
                        rip,
                    },
                );
                true
            }
        }
    }

    fn entry_pointers_refused(
        &mut self,
        vcpu: &mut impl Vcpu,
        platform: &mut impl Platform,
        obs: &mut impl Observer,
    ) -> bool {
        let Some(v) = self.nested.as_mut().and_then(|n| n.current_mut()) else {
            return false;
        };
        let mut used = [(0u64, 0u64); 7];
        let mut n = 0;
        for (start, len) in super::l2::entry_pointers(v) {
            if let Some(slot) = used.get_mut(n) {
                *slot = (start, len);
                n += 1;
            }
        }
        let mut refused = false;
        for &(start, len) in &used[..n] {
            let last = start.saturating_add(len.max(1) - 1);
            let foreign =
                [start, last]
                    .into_iter()
                    .find_map(|a| match self.memory.classify(Gpa::new(a)) {
                        Some(kind @ (RegionKind::L0 | RegionKind::Monitor)) => Some((a, kind)),
                        _ => None,
                    });
            if let Some((at, region)) = foreign {
                let rip = vcpu.read(guest::RIP);
                platform.log(format_args!(
                    "nested: VM entry refused: VMCS12 points at {at:#x}, {region:?} memory"
                ));
                self.alert(
                    platform,
                    obs,
                    Alert::VmxPointerRefused {
                        gpa: Gpa::new(at),
                        region,
                        rip,
                    },
                );
                refused = true;
            }
        }
        refused
    }

    /// A VMX region pointer: 4 KiB aligned, within the physical-address width, a whole page of
    /// guest RAM (never an L0 or monitor frame: refused with an alert), and, when `revision` says so,
    /// holding L0's revision identifier.
    fn check_region(
        &mut self,
        vcpu: &mut impl Vcpu,
        platform: &mut impl Platform,
        obs: &mut impl Observer,
        instruction: VmxInstruction,
        pointer: u64,
        revision: bool,
    ) -> Result<Gpa, RegionRefusal> {
        let checked = (|| {
            if pointer & 0xfff != 0 || pointer >> PHYS_ADDR_BITS != 0 {
                return Err(RegionRefusal::Malformed);
            }
            let gpa = Gpa::new(pointer);
            if !self.memory.is_guest_ram(gpa, PAGE_SIZE) {
                return Err(RegionRefusal::NotGuestRam(self.memory.classify(gpa)));
            }
            // A VMCS region gets L0's copy of VMCS12 written back into it (VMCLEAR, eviction).
            let written = instruction != VmxInstruction::Vmxon;
            let writable = platform
                .guest_mapping(gpa)
                .is_some_and(|m| m.perm.contains(ihmi_ept::Perm::WRITE));
            if written && !writable {
                return Err(RegionRefusal::NotWritable);
            }
            if revision {
                let mut rev = [0u8; 4];
                platform
                    .read_guest(gpa, &mut rev)
                    .map_err(|_| RegionRefusal::NotGuestRam(None))?;
                let rev = u32::from_le_bytes(rev);
                if rev != VMCS12_REVISION {
                    return Err(RegionRefusal::Revision(rev));
                }
            }
            Ok(gpa)
        })();
        if let Err(why) = checked {
            let alerted = match why {
                RegionRefusal::NotGuestRam(Some(kind @ (RegionKind::L0 | RegionKind::Monitor))) => {
                    Some(kind)
                }
                // Guest RAM L0 locks: a compromised L1 trying to write it through L0.
                RegionRefusal::NotWritable => Some(RegionKind::GuestRam),
                _ => None,
            };
            if let Some(kind) = alerted {
                let rip = vcpu.read(guest::RIP);
                self.alert(
                    platform,
                    obs,
                    Alert::VmxRegionRefused {
                        gpa: Gpa::new(pointer),
                        region: kind,
                        rip,
                    },
                );
            }
            platform.log(format_args!(
                "nested: {instruction:?} region {pointer:#x} refused: {why}"
            ));
        }
        checked
    }
}

/// What a checked VMCS region holds of L0's copy (a clear VMCS12 if nothing, or if it cannot be read).
fn load_region(platform: &impl Platform, gpa: Gpa) -> Vmcs12 {
    let mut saved = [0u8; SAVED_LEN];
    match platform.read_guest(Gpa::new(gpa.raw() + SAVED_AT as u64), &mut saved) {
        Ok(()) => Vmcs12::load(&saved),
        Err(_) => Vmcs12::default(),
    }
}

/// Writes L0's copy of a VMCS12 back into its (checked) region.
fn save_region(platform: &mut impl Platform, gpa: Gpa, v: &Vmcs12) {
    // The region is a whole page of guest RAM (checked when it was loaded or cleared).
    let _ = platform.write_guest(Gpa::new(gpa.raw() + SAVED_AT as u64), &v.save());
}

/// INVVPID's descriptor checks for `kind` (SDM 31.3 INVVPID, "Operation"): bits 63:16 of the
/// descriptor's first quadword must be zero; an individual-address invalidation needs a VPID and a
/// canonical address, the single-context ones a VPID. Nothing is left to invalidate after them:
/// VPIDs are emulated (`super::caps::EPT_VPID_CAP_VPID`). The error is the VMfail number.
pub(crate) fn invvpid(kind: u64, descriptor: u64, address: u64) -> Result<(), u32> {
    let vpid = descriptor & 0xffff;
    let ok = descriptor >> 16 == 0
        && match kind {
            0 => vpid != 0 && ihmi_arch::is_canonical(address),
            1 | 3 => vpid != 0,
            2 => true,
            _ => false,
        };
    if ok {
        Ok(())
    } else {
        Err(error::INVEPT_INVALID_OPERAND)
    }
}
