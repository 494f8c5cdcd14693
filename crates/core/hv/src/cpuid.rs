//! CPUID policy: the host's answers, with VMX hidden and ihmi's hypervisor leaves added.

use crate::{skip_instruction, Action, Hypervisor, Platform, Vcpu};
use ihmi_abi::{ABI_VERSION, CPUID_LEAF_ABI, CPUID_LEAF_SIGNATURE, CPUID_SIGNATURE};

/// CPUID.1:ECX.VMX (SDM Vol. 2A, CPUID, Table 3-10). Hidden: the guest gets no nested VMX from L0.
const LEAF1_ECX_VMX: u32 = 1 << 5;
/// CPUID.1:ECX bit 31, reserved by Intel for hypervisors to announce themselves.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Last hypervisor leaf we define.
const LAST_HV_LEAF: u32 = CPUID_LEAF_ABI;

/// The answer the guest gets for one leaf.
pub(crate) fn policy(platform: &mut impl Platform, leaf: u32, subleaf: u32) -> [u32; 4] {
    match leaf {
        1 => {
            let mut r = platform.host_cpuid(leaf, subleaf);
            r[2] = (r[2] & !LEAF1_ECX_VMX) | LEAF1_ECX_HYPERVISOR;
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
    ) -> Action {
        let regs = vcpu.regs();
        let (leaf, subleaf) = (regs.rax as u32, regs.rcx as u32);
        let r = policy(platform, leaf, subleaf);
        let regs = vcpu.regs();
        regs.rax = u64::from(r[0]);
        regs.rbx = u64::from(r[1]);
        regs.rcx = u64::from(r[2]);
        regs.rdx = u64::from(r[3]);
        self.log.record_cpuid(leaf, subleaf, r);
        skip_instruction(vcpu);
        Action::Resume
    }
}
