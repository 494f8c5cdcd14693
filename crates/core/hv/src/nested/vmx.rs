//! VMX operation as L0 emulates it for its guest, the L1 hypervisor: entering and leaving it
//! (VMXON, VMXOFF) with the SDM's checks in the SDM's order (Vol. 3C, chapter 31, each
//! instruction's "Operation"), the guest's CR4.VMXE through the read shadow, and the operand of a
//! VMX instruction decoded from the exit's instruction information (SDM 28.2.5).
//!
//! The rest of the instruction set (VMCLEAR, VMPTRLD, VMPTRST, VMREAD, VMWRITE, VMLAUNCH,
//! VMRESUME, INVEPT, INVVPID) gets its architectural faults outside VMX operation (#UD) and at
//! CPL > 0 (#GP); inside VMX operation it is not emulated yet (NESTED.md, milestone M2), and the
//! guest is ended with that said, rather than given an answer no CPU would give.
//!
//! VMfail when there is no current VMCS is VMfailInvalid (SDM 31.2, "VMfail(ErrorNumber)"). L0
//! offers no VMPTRLD yet, so a VMXON in VMX operation fails invalid, not with error 15.

use ihmi_addr::{Gpa, Gva};
use ihmi_arch::cr::{CR0_PE, CR4_VMXE};
use ihmi_arch::vector::{GP, UD};
use ihmi_vmcs::fields::{control, guest};
use ihmi_vmcs::{Gpr, VmxInstruction, VmxInstructionInfo};

use super::caps::{VirtualVmx, VMCS12_REVISION};
use crate::memory::GuestRamReader;
use crate::vcpu::{cpl, gpr};
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

/// A VMX instruction's exit, as the VMX layer decoded it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct VmxExit {
    pub instruction: VmxInstruction,
    /// Its operand (SDM 28.2.5).
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
    /// A fault instead of the instruction (#UD, #GP(0)).
    Fault { vector: u8 },
    /// In VMX operation, an instruction L0 does not emulate yet: the guest was ended.
    NotEmulated,
}

impl VmxOutcome {
    /// The outcome in reports.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Succeed => "VMsucceed",
            Self::FailInvalid => "VMfailInvalid",
            Self::Fault { vector: UD } => "#UD",
            Self::Fault { vector: GP } => "#GP(0)",
            Self::Fault { .. } => "fault",
            Self::NotEmulated => "not emulated",
        }
    }
}

/// Why a VMX region pointer was refused (VMfailInvalid).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionRefusal {
    /// Not 4 KiB aligned, or beyond the physical-address width.
    Malformed,
    /// Not guest RAM: the region kind it lies in, if any.
    NotGuestRam(Option<RegionKind>),
    /// The revision identifier is not L0's (or bit 31, "shadow VMCS", is set).
    Revision(u32),
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
        }
    }
}

/// The guest's VMX state: the capabilities L0 offers it, and whether it is in VMX operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NestedVmx {
    offer: VirtualVmx,
    /// The VMXON region, while the guest is in VMX operation.
    vmxon: Option<Gpa>,
}

impl NestedVmx {
    /// A guest offered `offer`, not in VMX operation.
    #[must_use]
    pub const fn new(offer: VirtualVmx) -> Self {
        Self { offer, vmxon: None }
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

/// The linear address of a VMX instruction's memory operand (SDM 28.2.5, table "Format of the
/// VM-Exit Instruction-Information Field as Used for VMCLEAR, VMPTRLD, VMPTRST, VMXON, XRSTORS,
/// and XSAVES"): base + index << scale + displacement, cut to the address size, plus the segment's
/// base (in 64-bit mode only FS's and GS's count).
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
    let long_mode = vcpu.read(guest::IA32_EFER_FULL) & EFER_LMA != 0
        && vcpu.read(guest::CS_ACCESS_RIGHTS) & CS_L != 0;
    let segment = info.segment();
    if !long_mode || segment >= 4 {
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
        let VmxExit {
            instruction,
            displacement,
            len,
            ..
        } = exit;
        let Some(nested) = self.nested else {
            inject_exception(vcpu, UD, None);
            return Action::Resume;
        };
        let rip = vcpu.read(guest::RIP);
        let outcome = self.vmx_outcome(vcpu, platform, obs, nested, exit);
        platform.log(format_args!(
            "nested: {instruction:?} at {rip:#x}: {}",
            outcome.name()
        ));
        obs.observe(Observation::Vmx {
            instruction,
            outcome,
        });
        let rflags = vcpu.read(guest::RFLAGS) & !STATUS_FLAGS;
        match outcome {
            VmxOutcome::Succeed | VmxOutcome::FailInvalid => {
                let fail = if outcome == VmxOutcome::FailInvalid {
                    CF
                } else {
                    0
                };
                vcpu.write(guest::RFLAGS, rflags | fail);
                skip_instruction(vcpu, ihmi_vmcs::Instruction { len });
                Action::Resume
            }
            VmxOutcome::Fault { vector } => {
                inject_exception(vcpu, vector, (vector == GP).then_some(0));
                Action::Resume
            }
            VmxOutcome::NotEmulated => Action::End(GuestEnd::Unhandled {
                reason: instruction.reason(),
                qualification: displacement,
                rip,
            }),
        }
    }

    /// The SDM's checks, in its order, and the state change of a successful VMXON or VMXOFF.
    fn vmx_outcome(
        &mut self,
        vcpu: &mut impl Vcpu,
        platform: &mut impl Platform,
        obs: &mut impl Observer,
        nested: NestedVmx,
        exit: VmxExit,
    ) -> VmxOutcome {
        let VmxExit {
            instruction,
            info,
            displacement,
            ..
        } = exit;
        let ud = VmxOutcome::Fault { vector: UD };
        let gp = VmxOutcome::Fault { vector: GP };
        let (cr0, cr4) = guest_view(vcpu);
        let in_vmx = nested.vmxon.is_some();
        let efer = vcpu.read(guest::IA32_EFER_FULL);
        let compat_mode = efer & EFER_LMA != 0 && vcpu.read(guest::CS_ACCESS_RIGHTS) & CS_L == 0;
        // Common to all: no VMX outside protected mode, in virtual-8086 mode or compatibility mode
        // (the CPU checks those, and a register operand of VMXON, before it exits; they are checked
        // again here for the state the guest sees); VMXON also needs CR4.VMXE as the guest set it,
        // the others VMX operation.
        let entered = match instruction {
            VmxInstruction::Vmxon => cr4 & CR4_VMXE != 0,
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
            VmxInstruction::Vmxon if in_vmx => {
                // VMfail(VMXON executed in VMX root operation), with no current VMCS.
                VmxOutcome::FailInvalid
            }
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
                let Some(region) = self.read_operand_u64(vcpu, platform, info, displacement) else {
                    // The operand does not translate to guest RAM. A CPU would raise #PF; L0 cannot
                    // set the guest's CR2 from here, so it raises #GP(0).
                    return gp;
                };
                match self.check_region(platform, region) {
                    Ok(gpa) => {
                        if let Some(n) = self.nested.as_mut() {
                            n.vmxon = Some(gpa);
                        }
                        VmxOutcome::Succeed
                    }
                    Err(why) => {
                        if let RegionRefusal::NotGuestRam(Some(
                            kind @ (RegionKind::L0 | RegionKind::Monitor),
                        )) = why
                        {
                            let rip = vcpu.read(guest::RIP);
                            self.alert(
                                platform,
                                obs,
                                Alert::VmxRegionRefused {
                                    gpa: Gpa::new(region),
                                    region: kind,
                                    rip,
                                },
                            );
                        }
                        platform.log(format_args!(
                            "nested: VMXON region {region:#x} refused: {why}"
                        ));
                        VmxOutcome::FailInvalid
                    }
                }
            }
            VmxInstruction::Vmxoff => {
                if let Some(n) = self.nested.as_mut() {
                    n.vmxon = None;
                }
                VmxOutcome::Succeed
            }
            _ => VmxOutcome::NotEmulated,
        }
    }

    /// The 64-bit memory operand of a VMX instruction, read through the guest's page tables from
    /// guest RAM only.
    fn read_operand_u64(
        &self,
        vcpu: &mut impl Vcpu,
        platform: &impl Platform,
        info: VmxInstructionInfo,
        displacement: u64,
    ) -> Option<u64> {
        let at = operand_address(vcpu, info, displacement);
        let reader = GuestRamReader {
            map: &self.memory,
            platform,
        };
        let mut b = [0u8; 8];
        let cr3 = ihmi_paging::Cr3::new(vcpu.read(guest::CR3));
        ihmi_paging::read_virt(&reader, cr3, at, &mut b).ok()?;
        Some(u64::from_le_bytes(b))
    }

    /// A VMX region pointer (SDM 31.3, VMXON): 4 KiB aligned, within the physical-address width,
    /// a whole page of guest RAM (never an L0 or monitor frame), holding L0's revision identifier.
    fn check_region(&self, platform: &impl Platform, pointer: u64) -> Result<Gpa, RegionRefusal> {
        if pointer & 0xfff != 0 || pointer >> PHYS_ADDR_BITS != 0 {
            return Err(RegionRefusal::Malformed);
        }
        let gpa = Gpa::new(pointer);
        if !self.memory.is_guest_ram(gpa, 4096) {
            return Err(RegionRefusal::NotGuestRam(self.memory.classify(gpa)));
        }
        let mut rev = [0u8; 4];
        platform
            .read_guest(gpa, &mut rev)
            .map_err(|_| RegionRefusal::NotGuestRam(None))?;
        let rev = u32::from_le_bytes(rev);
        if rev != VMCS12_REVISION {
            return Err(RegionRefusal::Revision(rev));
        }
        Ok(gpa)
    }
}
