//! CPUID policy: the host's answers, with VMX and fast short REP MOVSB hidden and ihmi's hypervisor
//! leaves added.

use ihmi_abi::{ABI_VERSION, CPUID_LEAF_ABI, CPUID_LEAF_SIGNATURE, CPUID_SIGNATURE};
use ihmi_arch::cr;
use ihmi_vmcs::Instruction;

use crate::{skip_instruction, Action, Hypervisor, Observation, Observer, Platform, Vcpu};

/// CPUID.1:ECX.VMX (SDM Vol. 2A, CPUID, Table 3-10). Hidden unless the scenario offers nested VMX.
const LEAF1_ECX_VMX: u32 = 1 << 5;
/// CPUID.1:ECX bit 31, reserved by Intel for hypervisors to announce themselves.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.1:ECX.OSXSAVE and CPUID.(7,0):ECX.OSPKE mirror CR4.OSXSAVE and CR4.PKE (SDM Vol. 2A, CPUID):
/// the guest's CR4, not L0's, which CPUID executed in L0 would show.
const LEAF1_ECX_OSXSAVE: u32 = 1 << 27;
const LEAF7_ECX_OSPKE: u32 = 1 << 4;
/// CPUID.(7,0):EDX.FSRM, fast short REP MOVSB (SDM Vol. 2A, CPUID). Hidden: Linux 6.1 takes FSRM to
/// imply ERMS and drops memmove's short-copy check (`memmove_64.S`), yet clears ERMS whenever
/// IA32_MISC_ENABLE.FAST_STRING reads 0, which it always does on Bochs 2.7 (MSR 0x1a0 is not
/// implemented). A forward memmove of under 32 bytes then copies over all memory: Linux on the
/// `tigerlake` and `corei7_icelake_u` models, the two that report FSRM, wiped its own page tables at
/// its first short printk, on bare Bochs as under L0. FSRM only lets a kernel skip a length check,
/// so hiding it costs a guest nothing.
const LEAF7_EDX_FSRM: u32 = 1 << 4;
/// Last hypervisor leaf we define.
const LAST_HV_LEAF: u32 = CPUID_LEAF_ABI;

fn mirror(value: u32, bit: u32, on: bool) -> u32 {
    if on {
        value | bit
    } else {
        value & !bit
    }
}

/// The answer a guest whose CR4 is `guest_cr4` gets for one leaf; `vmx`: L0 offers it nested VMX.
pub(crate) fn policy(
    platform: &mut impl Platform,
    leaf: u32,
    subleaf: u32,
    guest_cr4: u64,
    vmx: bool,
) -> [u32; 4] {
    match leaf {
        1 => {
            let mut r = platform.host_cpuid(leaf, subleaf);
            r[2] = mirror(r[2], LEAF1_ECX_VMX, vmx) | LEAF1_ECX_HYPERVISOR;
            // Only where the CPU has XSAVE at all does the bit mean anything.
            if r[2] & (1 << 26) != 0 {
                r[2] = mirror(r[2], LEAF1_ECX_OSXSAVE, guest_cr4 & cr::CR4_OSXSAVE != 0);
            }
            r
        }
        7 if subleaf == 0 => {
            let mut r = platform.host_cpuid(leaf, subleaf);
            if r[2] & (1 << 3) != 0 {
                r[2] = mirror(r[2], LEAF7_ECX_OSPKE, guest_cr4 & cr::CR4_PKE != 0);
            }
            r[3] &= !LEAF7_EDX_FSRM;
            r
        }
        CPUID_LEAF_SIGNATURE => {
            let s = CPUID_SIGNATURE;
            let word = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
            [LAST_HV_LEAF, word(0), word(4), word(8)]
        }
        CPUID_LEAF_ABI => [ABI_VERSION, 0, 0, 0],
        // The rest of the hypervisor range is reserved and reads as zero, so the guest does not see
        // whatever the host CPU (or an outer hypervisor) puts there.
        0x4000_0002..=0x4fff_ffff => [0; 4],
        _ => platform.host_cpuid(leaf, subleaf),
    }
}

impl Hypervisor {
    pub(crate) fn on_cpuid(
        &mut self,
        vcpu: &mut impl Vcpu,
        platform: &mut impl Platform,
        obs: &mut impl Observer,
        instruction: Instruction,
    ) -> Action {
        let regs = vcpu.regs();
        let (leaf, subleaf) = (regs.rax as u32, regs.rcx as u32);
        let guest_cr4 = vcpu.read(ihmi_vmcs::fields::guest::CR4);
        let r = policy(platform, leaf, subleaf, guest_cr4, self.nested.is_some());
        let regs = vcpu.regs();
        regs.rax = u64::from(r[0]);
        regs.rbx = u64::from(r[1]);
        regs.rcx = u64::from(r[2]);
        regs.rdx = u64::from(r[3]);
        obs.observe(Observation::Cpuid {
            leaf,
            subleaf,
            regs: r,
        });
        skip_instruction(vcpu, instruction);
        Action::Resume
    }
}
