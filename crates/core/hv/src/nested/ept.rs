//! Nested EPT (NESTED.md A.2.8): when L1 gives its guest an EPT of its own (EPT12, in L1's memory,
//! translating L2-physical to L1-physical addresses), L2 runs on EPT02, which L0 builds from EPT12
//! and its own view of L1 (EPT01), a 4 KiB page at a time, on L2's EPT violations:
//!
//! 1. L0 walks EPT12 for the address L2 touched ([`walk`]), reading L1's tables from guest RAM only;
//! 2. where EPT12 does not allow the access, or is malformed, the exit is L1's: an EPT violation with
//!    EPT12's rights in its qualification ([`reflected_qualification`]), or an EPT misconfiguration;
//! 3. where it does, the L1-physical page must be one L0's view gives L1 (never an L0 or monitor
//!    frame), and EPT02 maps the L2 page to where EPT01 puts that page, with the rights of both;
//! 4. L1's INVEPT of the EPT12 (or of all) empties EPT02, as does a new EPTP12 at VM entry and a
//!    full table pool.
//!
//! EPT02 never holds more than EPT12 and EPT01 both allow, so L2 reaches only memory L1 could.

use ihmi_addr::{Gpa, Hpa, PAGE_SIZE};
use ihmi_ept::{EptAlloc, EptError, EptMapping, EptTable, EptView, Eptp, Perm};
use ihmi_vmcs::EptViolationQualification;

use crate::Platform;

/// The widest physical address L0 offers (IA32_VMX_BASIC bit 48 clear; CPUID's MAXPHYADDR on the
/// platforms we run on is at most this).
const PHYS_ADDR_BITS: u32 = 46;
const ADDR_MASK: u64 = ((1 << PHYS_ADDR_BITS) - 1) & !(PAGE_SIZE - 1);

// EPTP (SDM 25.6.11) and EPT entries (SDM 29.3.2).
const EPTP_MEMTYPE_WB: u64 = 6;
const EPTP_WALK_4: u64 = 3 << 3;
/// Bits of an EPTP12 that must be zero: 11:7 (6, accessed and dirty flags, is not offered either).
const EPTP_RESERVED: u64 = 0xfc0;
const ENTRY_LARGE: u64 = 1 << 7;

/// Whether L1's EPTP is one L0 offers to walk: write-back, 4 levels, no accessed/dirty flags,
/// nothing reserved, the table within the physical-address width (SDM 26.2.1.1).
#[must_use]
pub const fn eptp_valid(eptp: u64) -> bool {
    eptp & 0x7 == EPTP_MEMTYPE_WB
        && eptp & 0x38 == EPTP_WALK_4
        && eptp & EPTP_RESERVED == 0
        && eptp & !(ADDR_MASK | 0xfff) == 0
}

/// What EPT12 says of one L2-physical address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Walk {
    /// A present leaf: the L1-physical byte, and the rights of every entry on the way ANDed.
    Mapped { l1: Gpa, perm: Perm },
    /// An entry on the way is not present (no rights: nothing for the qualification's bits 5:3).
    NotPresent,
    /// An entry on the way is malformed (SDM 29.3.3.1): an EPT misconfiguration.
    Misconfig,
    /// A table of EPT12 is not in L1's RAM (L0 reads none elsewhere).
    Unreadable { table: Gpa },
}

/// Walks EPT12 (root in `eptp12`) for `l2`, reading its tables through `platform` (guest RAM
/// only).
pub fn walk(platform: &impl Platform, eptp12: u64, l2: Gpa) -> Walk {
    let mut table = eptp12 & ADDR_MASK;
    let mut perm = Perm::RWX;
    for level in (1..=4u32).rev() {
        let index = (l2.raw() >> (12 + 9 * (level - 1))) & 0x1ff;
        let at = Gpa::new(table + index * 8);
        let mut b = [0u8; 8];
        if platform.read_guest(at, &mut b).is_err() {
            return Walk::Unreadable {
                table: Gpa::new(table),
            };
        }
        let entry = u64::from_le_bytes(b);
        let rights = Perm::from_bits_truncate(entry & 0x7);
        if rights.is_empty() {
            return Walk::NotPresent;
        }
        if malformed(entry, level) {
            return Walk::Misconfig;
        }
        perm &= rights;
        if level == 1 {
            return Walk::Mapped {
                l1: Gpa::new((entry & ADDR_MASK) | (l2.raw() & (PAGE_SIZE - 1))),
                perm,
            };
        }
        table = entry & ADDR_MASK;
    }
    unreachable!("the loop returns at level 1")
}

/// Whether a present EPT12 entry at `level` (4 = PML4E .. 1 = PTE) is an EPT misconfiguration:
/// write without read, address bits beyond the width, a large page (not offered), reserved bits
/// 7:3 of a table entry, or a leaf's memory type 2, 3 or 7.
const fn malformed(entry: u64, level: u32) -> bool {
    let write_only = entry & 0b11 == 0b10;
    let wide = entry & !(ADDR_MASK | 0xfff) & !(0xfff << 52) != 0;
    let bad = if level == 1 {
        matches!((entry >> 3) & 7, 2 | 3 | 7)
    } else {
        entry & ENTRY_LARGE != 0 || entry & 0x78 != 0
    };
    write_only || wide || bad
}

/// The rights an access needs (qualification bits 2:0: read, write, instruction fetch).
#[must_use]
pub fn needed(qualification: EptViolationQualification) -> Perm {
    Perm::from_bits_truncate(qualification.raw() & 0x7)
}

/// The qualification of an EPT violation reflected to L1: the access and linear-address bits as
/// the CPU reported them (2:0, 7, 8, and 12, NMI unblocking), and in bits 5:3 EPT12's rights,
/// not EPT02's (SDM 28.2.1, table 28-7).
#[must_use]
pub fn reflected_qualification(qualification: EptViolationQualification, perm12: Perm) -> u64 {
    const KEPT: u64 = 0x7 | (1 << 7) | (1 << 8) | (1 << 12);
    (qualification.raw() & KEPT) | (perm12.bits() << 3)
}

/// The tables of EPT02: frames L0 keeps for them alone, handed out until [`reset`](Self::reset)
/// takes them all back.
pub trait Ept02Tables {
    /// A zeroed table, `None` when every frame is in use.
    fn alloc_zeroed(&mut self) -> Option<Hpa>;
    fn table_mut(&mut self, hpa: Hpa) -> Option<&mut EptTable>;
    fn table(&self, hpa: Hpa) -> Option<&EptTable>;
    /// Every table back: EPT02 is gone.
    fn reset(&mut self);
}

/// The allocator [`EptView`] takes, over L0's EPT02 tables.
struct Tables<'a>(&'a mut dyn Ept02Tables);

impl EptAlloc for Tables<'_> {
    fn alloc_zeroed(&mut self) -> Option<Hpa> {
        self.0.alloc_zeroed()
    }
    fn table_mut(&mut self, hpa: Hpa) -> Option<&mut EptTable> {
        self.0.table_mut(hpa)
    }
    fn table(&self, hpa: Hpa) -> Option<&EptTable> {
        self.0.table(hpa)
    }
}

/// EPT02 for one EPTP12, and what it cost so far.
#[derive(Debug)]
pub struct Ept02 {
    /// The EPTP12 it is built from.
    pub eptp12: u64,
    view: EptView,
    /// Pages mapped (or made more permissive) on L2's EPT violations.
    pub fills: u64,
    /// Times it was emptied (INVEPT, a new EPTP12, a full pool, a change of L0's view of L1).
    pub resets: u64,
    /// [`crate::Platform::guest_view_generation`] when it was last emptied: a later change of L0's
    /// view of L1 empties it again.
    pub view_generation: u64,
}

/// Why a page could not go into EPT02.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FillError {
    /// L0 has no tables for EPT02.
    NoTables,
    /// The pool is too small for even one page's tables.
    OutOfTables,
    /// EPT02 refused the mapping (a bug of L0's, reported as such).
    Ept(EptError),
}

impl Ept02 {
    /// An empty EPT02 for `eptp12`: every table of the last one taken back.
    pub fn new(
        tables: &mut dyn Ept02Tables,
        eptp12: u64,
        view_generation: u64,
    ) -> Result<Self, FillError> {
        tables.reset();
        let view = EptView::new(&mut Tables(tables)).map_err(|_| FillError::OutOfTables)?;
        Ok(Self {
            eptp12,
            view,
            fills: 0,
            resets: 0,
            view_generation,
        })
    }

    /// The EPTP VMCS02 runs with.
    #[must_use]
    pub const fn eptp(&self) -> Eptp {
        self.view.eptp()
    }

    /// Empties it (the caller invalidates what the CPU cached of the old one).
    pub fn reset(&mut self, tables: &mut dyn Ept02Tables) -> Result<(), FillError> {
        tables.reset();
        self.view = EptView::new(&mut Tables(tables)).map_err(|_| FillError::OutOfTables)?;
        self.resets += 1;
        Ok(())
    }

    /// Maps L2's page at `l2` to where `l1` (L0's mapping of L1's page) is, with `perm`. A page
    /// already there is mapped anew (L1 may have given it more rights, or another page, without
    /// INVEPT after the violation, which the SDM allows: the violation dropped what the CPU had
    /// cached for it); a full pool empties EPT02 first. `Ok(true)` when EPT02 was emptied, so the
    /// caller invalidates the CPU's cached translations of it.
    pub fn fill(
        &mut self,
        tables: &mut dyn Ept02Tables,
        l2: Gpa,
        l1: EptMapping,
        perm: Perm,
    ) -> Result<bool, FillError> {
        let page = l2.align_down(PAGE_SIZE);
        let hpa = Hpa::new(l1.hpa.raw() & !(PAGE_SIZE - 1));
        let mut emptied = false;
        loop {
            let mut t = Tables(&mut *tables);
            let mut done = self
                .view
                .map(&mut t, page, hpa, PAGE_SIZE, perm, l1.memtype);
            if let Err(EptError::AlreadyMapped(_)) = done {
                // Never only the rights of the old entry: its frame may not be this one.
                done = self.view.unmap(&mut t, page, PAGE_SIZE).and_then(|()| {
                    self.view
                        .map(&mut t, page, hpa, PAGE_SIZE, perm, l1.memtype)
                });
            }
            match done {
                Ok(()) => {
                    self.fills += 1;
                    return Ok(emptied);
                }
                Err(EptError::OutOfMemory) if !emptied => {
                    self.reset(tables)?;
                    emptied = true;
                }
                Err(EptError::OutOfMemory) => return Err(FillError::OutOfTables),
                Err(e) => return Err(FillError::Ept(e)),
            }
        }
    }

    /// Drops EPT02's entry for L2's page at `l2`, if it has one: the violation there goes to L1,
    /// which may map the page anew without INVEPT.
    pub fn drop_page(&mut self, tables: &mut dyn Ept02Tables, l2: Gpa) {
        let page = l2.align_down(PAGE_SIZE);
        // Unmapping skips a page with no entry, and every table is one this view made.
        let _ = self.view.unmap(&mut Tables(tables), page, PAGE_SIZE);
    }

    /// EPT02's translation of `l2`.
    pub fn lookup(&self, tables: &mut dyn Ept02Tables, l2: Gpa) -> Option<EptMapping> {
        self.view.lookup(&Tables(tables), l2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock::{MockEpt02Tables, MockPlatform};
    use ihmi_ept::MemType;

    const ROOT: u64 = 0x10_0000;
    const EPTP12: u64 = ROOT | EPTP_WALK_4 | EPTP_MEMTYPE_WB;

    /// EPT12 in the mock's memory mapping `l2` to `l1` with `leaf` rights (tables RWX).
    fn ept12(p: &mut MockPlatform, l2: u64, l1: u64, leaf: u64) {
        let (pdpt, pd, pt) = (ROOT + 0x1000, ROOT + 0x2000, ROOT + 0x3000);
        let ix = |level: u32| (l2 >> (12 + 9 * (level - 1))) & 0x1ff;
        p.write_u64(ROOT + ix(4) * 8, pdpt | 7);
        p.write_u64(pdpt + ix(3) * 8, pd | 7);
        p.write_u64(pd + ix(2) * 8, pt | 7);
        p.write_u64(pt + ix(1) * 8, l1 | leaf);
    }

    #[test]
    fn eptp12_must_be_write_back_four_levels_and_nothing_else() {
        assert!(eptp_valid(EPTP12));
        assert!(
            !eptp_valid(ROOT | EPTP_WALK_4),
            "uncached walks are not offered"
        );
        assert!(!eptp_valid(ROOT | EPTP_MEMTYPE_WB | 2 << 3), "3-level walk");
        assert!(
            !eptp_valid(EPTP12 | 1 << 6),
            "accessed and dirty flags are not offered"
        );
        assert!(!eptp_valid(EPTP12 | 1 << 9), "reserved bit");
        assert!(!eptp_valid(EPTP12 | 1 << 50), "beyond the address width");
    }

    #[test]
    fn walks_end_at_the_leaf_the_first_hole_or_the_first_malformed_entry() {
        let mut p = MockPlatform::default();
        // Read and execute (WB memory type in bits 5:3 of the leaf).
        ept12(&mut p, 0x4000_2000, 0x30_5000, 0x5 | 6 << 3);
        assert_eq!(
            walk(&p, EPTP12, Gpa::new(0x4000_2abc)),
            Walk::Mapped {
                l1: Gpa::new(0x30_5abc),
                perm: Perm::RX
            }
        );
        // The neighbouring page has no leaf.
        assert_eq!(walk(&p, EPTP12, Gpa::new(0x4000_3000)), Walk::NotPresent);
        // Write without read, memory type 2, a large page in the PD: misconfigurations.
        ept12(&mut p, 0x4000_2000, 0x30_5000, 0x2 | 6 << 3);
        assert_eq!(walk(&p, EPTP12, Gpa::new(0x4000_2000)), Walk::Misconfig);
        ept12(&mut p, 0x4000_2000, 0x30_5000, 0x7 | 2 << 3);
        assert_eq!(walk(&p, EPTP12, Gpa::new(0x4000_2000)), Walk::Misconfig);
        ept12(&mut p, 0x4000_2000, 0x30_5000, 0x7 | 6 << 3);
        // 0x4000_2000 is under the PD's first entry.
        let pd_entry = ROOT + 0x2000;
        p.write_u64(pd_entry, 0x20_0000 | ENTRY_LARGE | 7);
        assert_eq!(walk(&p, EPTP12, Gpa::new(0x4000_2000)), Walk::Misconfig);
        // A table outside L1's RAM is not read.
        let mut fenced = MockPlatform::default();
        ept12(&mut fenced, 0x4000_2000, 0x30_5000, 0x7 | 6 << 3);
        fenced.fence = Some(crate::memory::MemoryMap::default());
        assert_eq!(
            walk(&fenced, EPTP12, Gpa::new(0x4000_2000)),
            Walk::Unreadable {
                table: Gpa::new(ROOT)
            }
        );
    }

    #[test]
    fn a_reflected_violation_carries_ept12_s_rights() {
        // A write (bit 1) with a linear address (bits 7, 8) that EPT02 allowed read and execute
        // of (bits 3, 5): L1 sees its own EPT12's read-only right instead.
        let hw = EptViolationQualification::from_raw(0x2 | 0x28 | 0x180);
        assert_eq!(needed(hw), Perm::WRITE);
        assert_eq!(reflected_qualification(hw, Perm::READ), 0x2 | 0x8 | 0x180);
    }

    fn ram(at: u64) -> EptMapping {
        EptMapping {
            hpa: Hpa::new(at),
            perm: Perm::RWX,
            memtype: MemType::WriteBack,
            large: false,
        }
    }

    #[test]
    fn fills_map_upgrade_and_start_over_when_the_pool_is_full() {
        // A root and three tables for the first page; the second page, 2 MiB on, needs a new PT.
        let mut pool = MockEpt02Tables::new(5);
        let mut e = Ept02::new(&mut pool, EPTP12, 0).unwrap();
        assert_eq!(
            e.fill(&mut pool, Gpa::new(0x1234), ram(0x30_5000), Perm::READ),
            Ok(false)
        );
        let m = e.lookup(&mut pool, Gpa::new(0x1234)).unwrap();
        assert_eq!((m.hpa, m.perm), (Hpa::new(0x30_5234), Perm::READ));
        // L1 made it writable without INVEPT: the same page gets the new rights.
        assert_eq!(
            e.fill(&mut pool, Gpa::new(0x1000), ram(0x30_5000), Perm::RW),
            Ok(false)
        );
        assert_eq!(
            e.lookup(&mut pool, Gpa::new(0x1000)).unwrap().perm,
            Perm::RW
        );
        // L1 pointed the page at another frame without INVEPT: the entry takes the new frame,
        // never the old frame with the new rights.
        assert_eq!(
            e.fill(&mut pool, Gpa::new(0x1000), ram(0x31_0000), Perm::RW),
            Ok(false)
        );
        let m = e.lookup(&mut pool, Gpa::new(0x1000)).unwrap();
        assert_eq!((m.hpa.raw(), m.perm), (0x31_0000, Perm::RW));
        e.drop_page(&mut pool, Gpa::new(0x1abc));
        assert!(e.lookup(&mut pool, Gpa::new(0x1000)).is_none());
        // A page under another PD entry needs a fifth table: the last one.
        assert_eq!(
            e.fill(&mut pool, Gpa::new(0x20_0000), ram(0x40_0000), Perm::RWX),
            Ok(false)
        );
        // Another 2 MiB on, the pool is full: EPT02 starts over with that page alone.
        assert_eq!(
            e.fill(&mut pool, Gpa::new(0x40_0000), ram(0x50_0000), Perm::RWX),
            Ok(true)
        );
        assert_eq!((e.fills, e.resets), (5, 1));
        assert!(e.lookup(&mut pool, Gpa::new(0x1000)).is_none());
        assert!(e.lookup(&mut pool, Gpa::new(0x40_0000)).is_some());
        // A pool without room for one page's tables.
        let mut tiny = MockEpt02Tables::new(2);
        let mut e = Ept02::new(&mut tiny, EPTP12, 0).unwrap();
        assert_eq!(
            e.fill(&mut tiny, Gpa::new(0), ram(0), Perm::RWX),
            Err(FillError::OutOfTables)
        );
    }
}
