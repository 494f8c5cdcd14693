#![doc = include_str!("../README.md")]
#![no_std]
#![deny(unsafe_code)]

/// Model-specific registers (SDM Vol. 4, chapter 2), by the `x86` crate's numbers.
pub mod msr {
    pub use x86::msr::{
        IA32_CSTAR, IA32_EFER, IA32_FEATURE_CONTROL, IA32_FS_BASE, IA32_GS_BASE,
        IA32_KERNEL_GSBASE, IA32_LSTAR, IA32_PAT, IA32_STAR, IA32_SYSENTER_CS, IA32_SYSENTER_EIP,
        IA32_SYSENTER_ESP, IA32_VMX_BASIC, IA32_VMX_CR0_FIXED0, IA32_VMX_CR0_FIXED1,
        IA32_VMX_CR4_FIXED0, IA32_VMX_CR4_FIXED1, IA32_VMX_ENTRY_CTLS, IA32_VMX_EPT_VPID_CAP,
        IA32_VMX_EXIT_CTLS, IA32_VMX_MISC, IA32_VMX_PINBASED_CTLS, IA32_VMX_PROCBASED_CTLS,
        IA32_VMX_PROCBASED_CTLS2, IA32_VMX_TRUE_ENTRY_CTLS, IA32_VMX_TRUE_EXIT_CTLS,
        IA32_VMX_TRUE_PINBASED_CTLS, IA32_VMX_TRUE_PROCBASED_CTLS, IA32_VMX_VMCS_ENUM,
        IA32_VMX_VMFUNC,
    };

    /// The VMX capability MSRs, IA32_VMX_BASIC through IA32_VMX_VMFUNC (SDM Appendix A).
    pub const VMX_CAPABILITIES: core::ops::RangeInclusive<u32> = IA32_VMX_BASIC..=IA32_VMX_VMFUNC;

    /// IA32_FEATURE_CONTROL bits (SDM Vol. 4, Table 2-2): the lock, and VMX outside SMX.
    pub const FEATURE_CONTROL_LOCK: u64 = 1 << 0;
    pub const FEATURE_CONTROL_VMX_OUTSIDE_SMX: u64 = 1 << 2;

    /// IA32_EFER bits (SDM 2.2.1): long mode enable, long mode active, no-execute enable.
    pub const EFER_LME: u64 = 1 << 8;
    pub const EFER_LMA: u64 = 1 << 10;
    pub const EFER_NXE: u64 = 1 << 11;
}

/// Control-register bits (SDM 2.5).
pub mod cr {
    /// CR0: protected mode, monitor coprocessor, extension type, numeric error, write protect,
    /// paging.
    pub const CR0_PE: u64 = 1 << 0;
    pub const CR0_MP: u64 = 1 << 1;
    pub const CR0_ET: u64 = 1 << 4;
    pub const CR0_NE: u64 = 1 << 5;
    pub const CR0_WP: u64 = 1 << 16;
    pub const CR0_PG: u64 = 1 << 31;

    /// CR4: physical-address extension, OS FXSAVE support, OS SIMD exceptions, VMX enable, PCIDs,
    /// OS XSAVE support, supervisor-mode execution and access prevention, protection keys.
    pub const CR4_PAE: u64 = 1 << 5;
    pub const CR4_OSFXSR: u64 = 1 << 9;
    pub const CR4_OSXMMEXCPT: u64 = 1 << 10;
    pub const CR4_VMXE: u64 = 1 << 13;
    pub const CR4_PCIDE: u64 = 1 << 17;
    pub const CR4_OSXSAVE: u64 = 1 << 18;
    pub const CR4_SMEP: u64 = 1 << 20;
    pub const CR4_SMAP: u64 = 1 << 21;
    pub const CR4_PKE: u64 = 1 << 22;
}

/// RFLAGS bits (SDM 3.4.3): the always-one bit 1, the trap flag, the interrupt flag.
pub mod rflags {
    pub const RESERVED_1: u64 = 1 << 1;
    pub const TF: u64 = 1 << 8;
    pub const IF: u64 = 1 << 9;
}

/// XCR0 state-component bits (SDM 13.3).
pub mod xcr0 {
    pub const X87: u64 = 1 << 0;
    pub const SSE: u64 = 1 << 1;
    pub const AVX: u64 = 1 << 2;
    /// The three AVX-512 components, which are enabled together or not at all.
    pub const AVX512: u64 = 0b111 << 5;
}

/// Exception vectors (SDM 6.3.1) the exit policy injects or intercepts.
pub mod vector {
    pub const DB: u8 = 1;
    pub const NMI: u8 = 2;
    pub const BP: u8 = 3;
    pub const UD: u8 = 6;
    pub const GP: u8 = 13;
}

/// Whether `addr` is canonical for 48-bit linear addresses (SDM 3.3.7.1): an MSR that holds a
/// linear address (IA32_LSTAR, the GS bases) refuses any other value with #GP.
#[must_use]
pub const fn is_canonical(addr: u64) -> bool {
    let top = addr >> 47;
    top == 0 || top == 0x1_ffff
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bits_agree_with_the_x86_crate() {
        use x86::controlregs::{Cr0, Cr4};
        assert_eq!(cr::CR0_PG, Cr0::CR0_ENABLE_PAGING.bits() as u64);
        assert_eq!(cr::CR0_WP, Cr0::CR0_WRITE_PROTECT.bits() as u64);
        assert_eq!(cr::CR4_VMXE, Cr4::CR4_ENABLE_VMX.bits() as u64);
        assert_eq!(cr::CR4_SMEP, Cr4::CR4_ENABLE_SMEP.bits() as u64);
        assert_eq!(cr::CR4_SMAP, Cr4::CR4_ENABLE_SMAP.bits() as u64);
        assert_eq!(cr::CR4_OSXSAVE, Cr4::CR4_ENABLE_OS_XSAVE.bits() as u64);
        assert_eq!(cr::CR4_PKE, Cr4::CR4_ENABLE_PROTECTION_KEY.bits() as u64);
        assert_eq!(cr::CR4_PCIDE, Cr4::CR4_ENABLE_PCID.bits() as u64);
        assert_eq!(rflags::IF, x86::bits64::rflags::RFlags::FLAGS_IF.bits());
        assert_eq!(msr::VMX_CAPABILITIES, 0x480..=0x491);
        assert!(is_canonical(0xffff_8000_0000_0000) && is_canonical(0x7fff_ffff_ffff));
        assert!(!is_canonical(0x8000_0000_0000));
    }
}
