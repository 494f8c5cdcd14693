//! The MSR areas of VMCS12 (SDM 25.7.2, 25.8.2): the VM-entry MSR-load area, loaded as L0 enters L2
//! (26.4), and the VM-exit MSR-store and MSR-load areas, stored and loaded as L2 exits to L1
//! (28.4, 28.6). Each is `count` entries of 16 bytes in L1's memory: the MSR's index in bits 31:0,
//! bits 63:32 reserved (zero), the value in bits 127:64.
//!
//! L0 writes the real MSRs for L1, so it takes only those it never uses itself and which every
//! 64-bit CPU has, with values the CPU takes without a #GP ([`AREA_MSRS`]): a guest hypervisor's
//! index must never reach a WRMSR that faults in L0. Any other MSR in an area is refused as the
//! CPU refuses the ones it cannot load: at entry, a VM-entry failure (reason 34, the entry's number
//! as qualification); at exit, a VMX abort. That is stricter than the CPU, which would load MSRs
//! outside that list too; it is said where refused.

use ihmi_addr::Gpa;
use ihmi_arch::msr::{IA32_KERNEL_GSBASE, IA32_STAR};

use crate::{MemoryMap, Platform};

/// IA32_FMASK (the SYSCALL flag mask), which the `x86` crate names but `ihmi_arch` does not.
pub const IA32_FMASK: u32 = 0xc000_0084;

/// The MSRs an area may name: SYSCALL's segments and flag mask and SWAPGS's base, which L1 and L2
/// use and L0 does not. (LSTAR and CSTAR, which L0 may lock behind a monitor's gate, go through
/// WRMSR, where L0 keeps L2's apart from L1's.)
pub const AREA_MSRS: [u32; 3] = [IA32_STAR, IA32_FMASK, IA32_KERNEL_GSBASE];

/// Most entries an area may have: 512 × (IA32_VMX_MISC bits 27:25 + 1), the offer's bits being 0.
pub const MAX_ENTRIES: u64 = 512;

/// Bytes per entry.
const ENTRY: u64 = 16;

/// One entry of an area.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsrEntry {
    pub index: u32,
    pub reserved: u32,
    pub data: u64,
}

/// Whether `entry` may be loaded: reserved bits clear, an MSR of [`AREA_MSRS`], and a value its
/// WRMSR takes (a canonical SWAPGS base, the flag mask's bits 63:32 clear; STAR takes any).
#[must_use]
pub fn loadable(entry: &MsrEntry) -> bool {
    entry.reserved == 0
        && match entry.index {
            IA32_STAR => true,
            IA32_FMASK => entry.data >> 32 == 0,
            IA32_KERNEL_GSBASE => ihmi_arch::is_canonical(entry.data),
            _ => false,
        }
}

/// Whether `entry`'s MSR may be stored: reserved bits clear and an MSR of [`AREA_MSRS`].
#[must_use]
pub fn storable(entry: &MsrEntry) -> bool {
    entry.reserved == 0 && AREA_MSRS.contains(&entry.index)
}

/// One area: `count` entries at `base` in L1's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Area {
    pub base: u64,
    pub count: u64,
}

impl Area {
    /// Entry `i` (from 0), read from L1's RAM; `None` where it is not guest RAM (the entry checks
    /// made sure it is, but L1's memory map is L0's to check each time).
    pub fn entry(&self, platform: &impl Platform, memory: &MemoryMap, i: u64) -> Option<MsrEntry> {
        let gpa = Gpa::new(self.base.checked_add(i.checked_mul(ENTRY)?)?);
        if !memory.is_guest_ram(gpa, ENTRY) {
            return None;
        }
        let mut b = [0u8; 16];
        platform.read_guest(gpa, &mut b).ok()?;
        let word = |at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(w)
        };
        Some(MsrEntry {
            index: word(0) as u32,
            reserved: (word(0) >> 32) as u32,
            data: word(8),
        })
    }

    /// Loads the area into the CPU's MSRs, each entry checked first: `Err(n)` names the first entry
    /// (from 1, as the SDM numbers them) that cannot be loaded, and then none is. What is loaded is
    /// the copy that was checked, never L1's memory read again (a device of L1's could write it in
    /// between).
    pub fn load(&self, platform: &mut impl Platform, memory: &MemoryMap) -> Result<(), u64> {
        if self.count > MAX_ENTRIES {
            return Err(MAX_ENTRIES + 1);
        }
        let mut checked = [(0u32, 0u64); MAX_ENTRIES as usize];
        for (i, slot) in (0..self.count).zip(checked.iter_mut()) {
            match self.entry(&*platform, memory, i) {
                Some(e) if loadable(&e) => *slot = (e.index, e.data),
                _ => return Err(i + 1),
            }
        }
        for &(index, data) in &checked[..self.count as usize] {
            platform.write_msr(index, data);
        }
        Ok(())
    }

    /// Stores the CPU's values of the area's MSRs into it: `Err(n)` for the first entry (from 1)
    /// that names one L0 does not store, or that it cannot write back: also one on a page L0's view
    /// keeps read-only for L1 (a locked kernel page, the gate's tables), which L0 must not write for
    /// L1 either.
    pub fn store(&self, platform: &mut impl Platform, memory: &MemoryMap) -> Result<(), u64> {
        if self.count > MAX_ENTRIES {
            return Err(MAX_ENTRIES + 1);
        }
        for i in 0..self.count {
            let e = self
                .entry(&*platform, memory, i)
                .filter(storable)
                .ok_or(i + 1)?;
            let value = platform.read_msr(e.index);
            let at = Gpa::new(self.base + i * ENTRY + 8);
            let writable = platform
                .guest_mapping(at)
                .is_some_and(|m| m.perm.contains(ihmi_ept::Perm::WRITE));
            if !writable {
                return Err(i + 1);
            }
            platform
                .write_guest(at, &value.to_le_bytes())
                .map_err(|_| i + 1)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use crate::mock::{memory_with_l0_hole, Call, MockPlatform, L0_HOLE};

    fn put(p: &mut MockPlatform, at: u64, index: u32, reserved: u32, data: u64) {
        p.write_u64(at, u64::from(index) | u64::from(reserved) << 32);
        p.write_u64(at + 8, data);
    }

    #[test]
    fn entries_are_loaded_only_when_every_one_can_be() {
        let memory = memory_with_l0_hole();
        let mut p = MockPlatform::default();
        put(&mut p, 0x5000, IA32_STAR, 0, 0x0023_0010_0000_0000);
        put(&mut p, 0x5010, IA32_KERNEL_GSBASE, 0, 0xffff_8880_0000_0000);
        let area = Area {
            base: 0x5000,
            count: 2,
        };
        assert_eq!(area.load(&mut p, &memory), Ok(()));
        let writes: std::vec::Vec<_> = p
            .calls
            .borrow()
            .iter()
            .filter_map(|c| match c {
                Call::WriteMsr(m, v) => Some((*m, *v)),
                _ => None,
            })
            .collect();
        assert_eq!(
            writes,
            [
                (IA32_STAR, 0x0023_0010_0000_0000),
                (IA32_KERNEL_GSBASE, 0xffff_8880_0000_0000)
            ]
        );
        // Each wrong entry: the entry's number, and nothing loaded.
        for (index, reserved, data) in [
            (IA32_KERNEL_GSBASE, 0, 0x0000_8000_0000_0000), // not canonical
            (IA32_FMASK, 0, 1 << 32),                       // reserved bits of the mask
            (IA32_STAR, 1, 0),                              // reserved bits of the entry
            (0x0808, 0, 0),                                 // x2APIC TPR: not in the list
            (0xc000_0100, 0, 0),                            // FS base: the VMCS's
            (0x3a, 0, 0),                                   // IA32_FEATURE_CONTROL: L0's
        ] {
            let mut p = MockPlatform::default();
            put(&mut p, 0x5000, IA32_STAR, 0, 0);
            put(&mut p, 0x5010, index, reserved, data);
            assert_eq!(area.load(&mut p, &memory), Err(2), "{index:#x}");
            assert!(
                !p.calls
                    .borrow()
                    .iter()
                    .any(|c| matches!(c, Call::WriteMsr(..))),
                "nothing loaded: {index:#x}"
            );
        }
        // Too many entries, and an area in L0's memory.
        let big = Area {
            base: 0x5000,
            count: MAX_ENTRIES + 1,
        };
        assert_eq!(big.load(&mut p, &memory), Err(MAX_ENTRIES + 1));
        let l0 = Area {
            base: L0_HOLE,
            count: 1,
        };
        assert_eq!(l0.load(&mut p, &memory), Err(1));
    }

    #[test]
    fn stores_write_the_cpu_s_values_back_into_each_entry() {
        let memory = memory_with_l0_hole();
        let mut p = MockPlatform::default();
        p.msrs.insert(IA32_STAR, 0x1111);
        p.msrs.insert(IA32_FMASK, 0x4700);
        put(&mut p, 0x6000, IA32_STAR, 0, 0xdead);
        put(&mut p, 0x6010, IA32_FMASK, 0, 0xdead);
        let area = Area {
            base: 0x6000,
            count: 2,
        };
        assert_eq!(area.store(&mut p, &memory), Ok(()));
        assert_eq!(p.read_u64(0x6008), 0x1111);
        assert_eq!(p.read_u64(0x6018), 0x4700);
        put(&mut p, 0x6010, 0xc000_0082, 0, 0);
        assert_eq!(
            area.store(&mut p, &memory),
            Err(2),
            "LSTAR is not stored here"
        );
        // An area on a page L0 keeps read-only for L1: nothing written there.
        put(&mut p, 0x6010, IA32_FMASK, 0, 0xdead);
        p.write_u64(0x6008, 0x2222);
        p.read_only.push(0x6000);
        assert_eq!(area.store(&mut p, &memory), Err(1));
        assert_eq!(p.read_u64(0x6008), 0x2222, "not written");
    }
}
