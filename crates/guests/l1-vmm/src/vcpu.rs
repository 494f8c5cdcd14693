//! What both modes do to a fresh vCPU: KVM's CPUID and the host's XCR0, long mode on identity-mapped
//! page tables, and the words for an exit neither expects.

use anyhow::{Context, Result};
use kvm_bindings::{kvm_segment, kvm_xcrs, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};

// SDM 4.5 4-level paging: present, writable, and (in a PDE) a 2 MiB page.
const PTE_P: u64 = 1 << 0;
const PTE_RW: u64 = 1 << 1;
const PDE_PS: u64 = 1 << 7;
// SDM 2.5 control registers, 2.2.1 IA32_EFER.
const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
// No OSXSAVE: with it clear, KVM leaves XCR0 alone around L2 entries (the Linux L2 sets its own).
const CR4_PAE: u64 = 1 << 5;
const EFER_SCE: u64 = 1 << 0;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Three pages KVM needs for the real-mode TSS when there is no unrestricted guest, out of the way
/// below 4 GiB (the address QEMU uses).
pub const TSS_ADDR: usize = 0xfffb_d000;

/// The code and data selectors of the Linux 64-bit boot protocol (`__BOOT_CS`, `__BOOT_DS`), which
/// the probe uses too.
pub const BOOT_CS: u16 = 0x10;
pub const BOOT_DS: u16 = 0x18;

/// A GDT with flat 64-bit code at [`BOOT_CS`] and flat data at [`BOOT_DS`] (SDM 3.4.5), as the
/// descriptors the segment registers' hidden parts get.
pub const GDT: [u64; 4] = [0, 0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];

/// Identity-maps the first `pages` × 2 MiB (at most 1 GiB) with large pages: the PML4 at `pml4`,
/// its PDPT and PD in the next two pages.
pub fn identity_map(mem: &mut [u8], pml4: u64, pages: u64) {
    assert!(pages <= 512, "one page directory maps 1 GiB");
    let (pdpt, pd) = (pml4 + 0x1000, pml4 + 0x2000);
    let mut entry = |at: u64, value: u64| {
        mem[at as usize..][..8].copy_from_slice(&value.to_le_bytes());
    };
    entry(pml4, pdpt | PTE_P | PTE_RW);
    entry(pdpt, pd | PTE_P | PTE_RW);
    for i in 0..pages {
        entry(pd + 8 * i, (i << 21) | PDE_PS | PTE_P | PTE_RW);
    }
}

/// KVM's supported CPUID and the host's XCR0 (as far as that CPUID offers it).
pub fn set_cpuid(kvm: &Kvm, vcpu: &VcpuFd) -> Result<()> {
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .context("KVM_GET_SUPPORTED_CPUID")?;
    vcpu.set_cpuid2(&cpuid).context("KVM_SET_CPUID2")?;
    if let Some(xcr0) = host_xcr0() {
        let mut xcrs = kvm_xcrs {
            nr_xcrs: 1,
            ..Default::default()
        };
        // KVM refuses bits its CPUID does not offer (AMX, unless this process asked for it).
        xcrs.xcrs[0].value = xcr0 & supported_xcr0(&cpuid);
        vcpu.set_xcrs(&xcrs).context("KVM_SET_XCRS")?;
    }
    Ok(())
}

/// Long mode with paging on `cr3`: flat segments [`BOOT_CS`] and [`BOOT_DS`] straight into the
/// hidden parts, and `gdt` (base, limit) in GDTR when the guest will load selectors itself.
pub fn set_long_mode(vcpu: &VcpuFd, cr3: u64, gdt: Option<(u64, u16)>) -> Result<()> {
    let mut sregs = vcpu.get_sregs().context("KVM_GET_SREGS")?;
    let code = kvm_segment {
        limit: 0xffff_ffff,
        selector: BOOT_CS,
        type_: 0xb,
        present: 1,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    };
    let data = kvm_segment {
        selector: BOOT_DS,
        type_: 0x3,
        db: 1,
        l: 0,
        ..code
    };
    sregs.cs = code;
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    if let Some((base, limit)) = gdt {
        (sregs.gdt.base, sregs.gdt.limit) = (base, limit);
    }
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = cr3;
    sregs.cr4 = CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).context("KVM_SET_SREGS")
}

/// Turns on SYSCALL for the vCPU (EFER.SCE), as a 64-bit kernel would: KVM then loads the guest's
/// system-call MSRs (STAR, LSTAR, SYSCALL_MASK) before each entry, and puts L1's back on the way to
/// user space, which is how a guest hypervisor writes IA32_LSTAR for its guest.
pub fn enable_syscall(vcpu: &VcpuFd) -> Result<()> {
    let mut sregs = vcpu.get_sregs().context("KVM_GET_SREGS")?;
    sregs.efer |= EFER_SCE;
    vcpu.set_sregs(&sregs).context("KVM_SET_SREGS")
}

/// An exit a mode does not expect, with what KVM said about it.
pub fn describe(exit: VcpuExit<'_>) -> String {
    match exit {
        VcpuExit::IoOut(port, d) => format!("IoOut of {} bytes to port {port:#x}", d.len()),
        VcpuExit::IoIn(port, d) => format!("IoIn of {} bytes from port {port:#x}", d.len()),
        VcpuExit::MmioRead(gpa, d) => format!("MmioRead of {} bytes at {gpa:#x}", d.len()),
        VcpuExit::MmioWrite(gpa, d) => format!("MmioWrite of {} bytes at {gpa:#x}", d.len()),
        VcpuExit::FailEntry(reason, cpu) => {
            format!("FailEntry, hardware entry failure reason {reason:#x} on cpu {cpu}")
        }
        other => format!("{other:?}"),
    }
}

/// The vCPU's RIP for an error message.
pub fn rip(vcpu: &VcpuFd) -> String {
    match vcpu.get_regs() {
        Ok(regs) => format!("RIP {:#x}", regs.rip),
        Err(e) => format!("unknown RIP (KVM_GET_REGS: {e})"),
    }
}

/// The host's XCR0, if the OS enabled XSAVE (CPUID.1:ECX.OSXSAVE[bit 27]; XGETBV is #UD otherwise).
fn host_xcr0() -> Option<u64> {
    if core::arch::x86_64::__cpuid(1).ecx & (1 << 27) == 0 {
        return None;
    }
    let (lo, hi): (u32, u32);
    // SAFETY: OSXSAVE is set, so XGETBV of XCR0 is defined; it only reads a register.
    unsafe {
        core::arch::asm!("xgetbv", in("ecx") 0, out("eax") lo, out("edx") hi,
            options(nomem, nostack, preserves_flags));
    }
    Some(u64::from(hi) << 32 | u64::from(lo))
}

/// The XCR0 bits KVM's CPUID leaf 0xD offers the guest.
fn supported_xcr0(cpuid: &CpuId) -> u64 {
    cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 0xd && e.index == 0)
        .map_or(0, |e| u64::from(e.edx) << 32 | u64::from(e.eax))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_map_with_large_pages() {
        let mut mem = vec![0u8; 0xc000];
        identity_map(&mut mem, 0x9000, 2);
        let entry = |at: usize| u64::from_le_bytes(mem[at..at + 8].try_into().unwrap());
        assert_eq!(entry(0x9000), 0xa003);
        assert_eq!(entry(0xa000), 0xb003);
        assert_eq!(entry(0xb000), 0x83);
        assert_eq!(entry(0xb008), 0x20_0083);
        assert_eq!(mem.iter().filter(|&&b| b != 0).count(), 7);
    }

    #[test]
    fn gdt_descriptors_are_flat_64_bit_code_and_data() {
        // Access byte: present, DPL 0, code execute/read accessed; data read/write accessed.
        assert_eq!(GDT[usize::from(BOOT_CS / 8)] >> 40 & 0xff, 0x9b);
        assert_eq!(GDT[usize::from(BOOT_DS / 8)] >> 40 & 0xff, 0x93);
        // L (bit 53) on code only; G on both; limit 0xfffff.
        assert_eq!(GDT[2] >> 53 & 1, 1);
        assert_eq!(GDT[3] >> 53 & 1, 0);
        assert!(GDT[2..]
            .iter()
            .all(|d| d & 0xffff == 0xffff && d >> 55 & 1 == 1));
    }
}
