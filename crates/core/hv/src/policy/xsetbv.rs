//! XSETBV, which exits unconditionally (SDM 26.1.2): L0 checks the new XCR0 as the CPU would and sets it
//! on the guest's behalf. A value the CPU would refuse gets the guest the #GP(0) the CPU would give.

use ihmi_arch::vector::GP;
use ihmi_arch::xcr0::{AVX, AVX512, SSE, X87};
use ihmi_vmcs::Instruction;

use crate::{
    inject_exception, skip_instruction, Action, Hypervisor, Observation, Observer, Platform, Vcpu,
};

// XCR0 rules (SDM 13.3): x87 must be set; AVX needs SSE; the AVX-512 trio needs AVX and comes whole.

/// Whether `value` is an XCR0 the CPU accepts, given the bits it supports (CPUID.(EAX=0DH,ECX=0):EDX:EAX).
#[must_use]
pub fn valid_xcr0(value: u64, supported: u64) -> bool {
    value & X87 != 0
        && value & !supported == 0
        && (value & AVX == 0 || value & SSE != 0)
        && (value & AVX512 == 0 || (value & AVX512 == AVX512 && value & AVX != 0))
}

impl Hypervisor {
    pub(crate) fn on_xsetbv(
        &mut self,
        vcpu: &mut impl Vcpu,
        platform: &mut impl Platform,
        obs: &mut impl Observer,
        instruction: Instruction,
    ) -> Action {
        let regs = *vcpu.regs();
        let index = regs.rcx as u32;
        let value = regs.edx_eax();
        let leaf = platform.host_cpuid(0xd, 0);
        let supported = u64::from(leaf[0]) | (u64::from(leaf[3]) << 32);
        let faulted = index != 0 || !valid_xcr0(value, supported);
        obs.observe(Observation::Xsetbv {
            xcr0: value,
            faulted,
        });
        if faulted {
            inject_exception(vcpu, GP, Some(0));
            return Action::Resume;
        }
        platform.xsetbv(value);
        skip_instruction(vcpu, instruction);
        Action::Resume
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xcr0_rules() {
        let all = 0xe7; // x87, SSE, AVX, AVX-512
        assert!(valid_xcr0(X87, all));
        assert!(valid_xcr0(X87 | SSE | AVX, all));
        assert!(!valid_xcr0(SSE, all), "x87 must be on");
        assert!(!valid_xcr0(X87 | AVX, all), "AVX without SSE");
        assert!(!valid_xcr0(X87 | SSE | AVX, X87 | SSE), "unsupported bit");
        assert!(!valid_xcr0(X87 | SSE | (1 << 5), all), "AVX-512 piecemeal");
        assert!(valid_xcr0(all, all));
    }
}
