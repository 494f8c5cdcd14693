#![doc = include_str!("../README.md")]
#![no_std]
#![deny(unsafe_code)]

use core::{fmt, ops::Range};

use bitflags::bitflags;
use ihmi_addr::{Gpa, Hpa, LARGE_PAGE_SIZE, PAGE_SIZE};

/// Bits 51:12, the physical-address field of EPT entries and of the EPTP (SDM 29.3.2, 25.6.11).
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// A 4-level EPT translates 48-bit guest-physical addresses (SDM 29.3.2).
const GPA_LIMIT: u64 = 1 << 48;
/// The largest physical address width the architecture allows.
const HPA_LIMIT: u64 = 1 << 52;
const MEMTYPE_SHIFT: u32 = 3;
const MEMTYPE_MASK: u64 = 0b111 << MEMTYPE_SHIFT;
const ENTRIES: usize = 512;

bitflags! {
    /// Access rights in bits 2:0 of every EPT entry (SDM 29.3.2, Tables 29-1 to 29-6).
    ///
    /// An entry with none of them is not present. Write without read is an EPT misconfiguration
    /// (SDM 29.3.3.1), so [`EptView`] refuses it.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct Perm: u64 {
        /// Reads allowed.
        const READ = 1 << 0;
        /// Writes allowed.
        const WRITE = 1 << 1;
        /// Instruction fetches allowed (supervisor fetches, with mode-based execute control).
        const EXECUTE = 1 << 2;
    }
}

impl Perm {
    /// Read and execute: code and gate pages.
    pub const RX: Self = Self::READ.union(Self::EXECUTE);
    /// Read and write: data the viewer may not run.
    pub const RW: Self = Self::READ.union(Self::WRITE);
    /// Everything.
    pub const RWX: Self = Self::READ.union(Self::WRITE).union(Self::EXECUTE);

    /// Whether hardware accepts these rights in a present entry (SDM 29.3.3.1).
    const fn is_valid_for_mapping(self) -> bool {
        self.contains(Self::READ) || (!self.is_empty() && !self.contains(Self::WRITE))
    }
}

/// The EPT memory type in bits 5:3 of a leaf and bits 2:0 of the EPTP (SDM 29.3.7, 25.6.11).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MemType {
    /// UC, for MMIO.
    Uncacheable = 0,
    /// WC.
    WriteCombining = 1,
    /// WT.
    WriteThrough = 4,
    /// WP.
    WriteProtected = 5,
    /// WB, for RAM.
    WriteBack = 6,
}

impl MemType {
    /// Decodes a 3-bit memory type; `None` for the reserved encodings 2, 3 and 7.
    #[must_use]
    pub const fn from_bits(bits: u8) -> Option<Self> {
        match bits {
            0 => Some(Self::Uncacheable),
            1 => Some(Self::WriteCombining),
            4 => Some(Self::WriteThrough),
            5 => Some(Self::WriteProtected),
            6 => Some(Self::WriteBack),
            _ => None,
        }
    }
}

bitflags! {
    /// The EPT entry bits other than rights, memory type and address (SDM 29.3.2, Tables 29-1 to 29-6).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct EptFlags: u64 {
        /// Ignore the guest PAT type and use the EPT type alone (leaves).
        const IGNORE_PAT = 1 << 6;
        /// This PDE maps 2 MiB (or this PDPTE 1 GiB) instead of pointing at a table.
        const LARGE = 1 << 7;
        /// Set by the CPU when EPT A/D flags are on.
        const ACCESSED = 1 << 8;
        /// Set by the CPU on writes when EPT A/D flags are on (leaves).
        const DIRTY = 1 << 9;
        /// User-mode execute, with mode-based execute control.
        const USER_EXECUTE = 1 << 10;
        /// EPT violations here do not become #VE (SDM 26.5.7).
        const SUPPRESS_VE = 1 << 63;
    }
}

/// One entry of any EPT paging structure (SDM 29.3.2, Tables 29-1 to 29-6).
#[derive(Clone, Copy, PartialEq, Eq, Default)]
#[repr(transparent)]
pub struct EptEntry(u64);

impl EptEntry {
    /// An entry pointing at the next table at `hpa`.
    #[must_use]
    pub const fn new_table(hpa: Hpa, perm: Perm) -> Self {
        Self((hpa.raw() & ADDR_MASK) | perm.bits())
    }

    /// A leaf mapping the frame at `hpa`; `large` makes it a 2 MiB leaf in a PDE.
    #[must_use]
    pub const fn new_leaf(hpa: Hpa, perm: Perm, memtype: MemType, large: bool) -> Self {
        let large = if large { EptFlags::LARGE.bits() } else { 0 };
        Self((hpa.raw() & ADDR_MASK) | perm.bits() | ((memtype as u64) << MEMTYPE_SHIFT) | large)
    }

    /// An entry exactly as found in memory.
    #[must_use]
    pub const fn from_raw(raw: u64) -> Self {
        Self(raw)
    }

    /// The raw 64-bit value.
    #[must_use]
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// The access rights.
    #[must_use]
    pub const fn perm(self) -> Perm {
        Perm::from_bits_truncate(self.0)
    }

    /// The same entry with other access rights.
    #[must_use]
    pub const fn with_perm(self, perm: Perm) -> Self {
        Self((self.0 & !Perm::all().bits()) | perm.bits())
    }

    /// The other flag bits.
    #[must_use]
    pub const fn flags(self) -> EptFlags {
        EptFlags::from_bits_truncate(self.0)
    }

    /// The memory type of a leaf; `None` for a reserved encoding.
    #[must_use]
    pub const fn memtype(self) -> Option<MemType> {
        MemType::from_bits(((self.0 & MEMTYPE_MASK) >> MEMTYPE_SHIFT) as u8)
    }

    /// The table or frame address (bits 51:12).
    #[must_use]
    pub const fn addr(self) -> Hpa {
        Hpa::new(self.0 & ADDR_MASK)
    }

    /// Whether any of read, write or execute is allowed; otherwise the CPU ignores the entry.
    #[must_use]
    pub const fn is_present(self) -> bool {
        self.0 & Perm::all().bits() != 0
    }

    /// Whether bit 7 makes this PDE or PDPTE a leaf.
    #[must_use]
    pub const fn is_large(self) -> bool {
        self.0 & EptFlags::LARGE.bits() != 0
    }
}

impl fmt::Debug for EptEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "EptEntry({:#x}, {:?}, {:?})",
            self.addr().raw(),
            self.perm(),
            self.flags()
        )
    }
}

/// An EPT PML4, PDPT, page directory or page table: 512 entries in one 4 KiB frame (SDM 29.3.2).
#[derive(Clone)]
#[repr(C, align(4096))]
pub struct EptTable {
    /// The entries, indexed by 9 bits of the guest-physical address.
    pub entries: [EptEntry; ENTRIES],
}

const _: () = assert!(core::mem::size_of::<EptTable>() == 4096);

impl EptTable {
    /// A table with nothing present.
    #[must_use]
    pub const fn new() -> Self {
        Self {
            entries: [EptEntry(0); ENTRIES],
        }
    }
}

impl Default for EptTable {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for EptTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Show only the entries in use; 512 zeros hide the interesting ones.
        f.debug_map()
            .entries(
                self.entries
                    .iter()
                    .enumerate()
                    .filter(|(_, e)| e.raw() != 0),
            )
            .finish()
    }
}

/// The extended-page-table pointer VMCS field (SDM 25.6.11).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
#[repr(transparent)]
pub struct Eptp(u64);

impl Eptp {
    /// Bit 6: enable EPT accessed and dirty flags.
    const ACCESSED_DIRTY: u64 = 1 << 6;
    /// Bits 5:3 hold the page-walk length minus one.
    const WALK_SHIFT: u32 = 3;

    /// An EPTP for a 4-level hierarchy at `pml4`, the walk itself using `memtype`.
    #[must_use]
    pub const fn new(pml4: Hpa, memtype: MemType, accessed_dirty: bool) -> Self {
        let ad = if accessed_dirty {
            Self::ACCESSED_DIRTY
        } else {
            0
        };
        Self((pml4.raw() & ADDR_MASK) | (3 << Self::WALK_SHIFT) | ad | memtype as u64)
    }

    /// An EPTP exactly as read from the VMCS or an EPTP list.
    #[must_use]
    pub const fn from_raw(raw: u64) -> Self {
        Self(raw)
    }

    /// The raw value for the VMCS.
    #[must_use]
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// The PML4 address.
    #[must_use]
    pub const fn pml4(self) -> Hpa {
        Hpa::new(self.0 & ADDR_MASK)
    }

    /// The memory type used for the paging-structure accesses.
    #[must_use]
    pub const fn memtype(self) -> Option<MemType> {
        MemType::from_bits((self.0 & 0b111) as u8)
    }

    /// The page-walk length (4 for the EPTPs this crate makes).
    #[must_use]
    pub const fn walk_length(self) -> u8 {
        ((self.0 >> Self::WALK_SHIFT) & 0b111) as u8 + 1
    }

    /// Whether EPT accessed and dirty flags are enabled.
    #[must_use]
    pub const fn accessed_dirty(self) -> bool {
        self.0 & Self::ACCESSED_DIRTY != 0
    }
}

impl fmt::Debug for Eptp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Eptp({:#x})", self.0)
    }
}

/// An index into the EPTP list: the view VMFUNC leaf 0 switches to (SDM 26.5.6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ViewId(u16);

impl ViewId {
    /// The view with this index, or `None` past the list's 512 entries.
    #[must_use]
    pub const fn new(raw: u16) -> Option<Self> {
        if (raw as usize) < ENTRIES {
            Some(Self(raw))
        } else {
            None
        }
    }

    /// The index, as VMFUNC takes it in ECX.
    #[must_use]
    pub const fn raw(self) -> u16 {
        self.0
    }
}

/// The EPTP list that VMFUNC EPTP switching selects from: 512 EPTPs in one 4 KiB frame (SDM 25.6.14).
#[derive(Clone)]
#[repr(C, align(4096))]
pub struct EptpList {
    entries: [u64; ENTRIES],
}

const _: () = assert!(core::mem::size_of::<EptpList>() == 4096);

impl EptpList {
    /// A list with no view.
    #[must_use]
    pub const fn new() -> Self {
        Self {
            entries: [0; ENTRIES],
        }
    }

    /// Installs `eptp` as `view`.
    pub fn set(&mut self, view: ViewId, eptp: Eptp) {
        self.entries[usize::from(view.0)] = eptp.raw();
    }

    /// The EPTP of `view`, or `None` if the slot is empty.
    #[must_use]
    pub fn get(&self, view: ViewId) -> Option<Eptp> {
        match self.entries[usize::from(view.0)] {
            0 => None,
            raw => Some(Eptp(raw)),
        }
    }

    /// Empties the slot, so a VMFUNC to `view` fails with a VM exit.
    pub fn clear(&mut self, view: ViewId) {
        self.entries[usize::from(view.0)] = 0;
    }

    /// The raw list, as the CPU reads it.
    #[must_use]
    pub const fn entries(&self) -> &[u64; ENTRIES] {
        &self.entries
    }
}

impl Default for EptpList {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for EptpList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.entries.iter().enumerate().filter(|(_, e)| **e != 0))
            .finish()
    }
}

/// Where an [`EptView`] gets and edits its table frames.
pub trait EptAlloc {
    /// A zeroed 4 KiB frame for a table.
    fn alloc_zeroed(&mut self) -> Option<Hpa>;
    /// The table in the frame at `hpa`, for writing.
    fn table_mut(&mut self, hpa: Hpa) -> Option<&mut EptTable>;
    /// The table in the frame at `hpa`.
    fn table(&self, hpa: Hpa) -> Option<&EptTable>;
}

/// Why an [`EptView`] operation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EptError {
    /// No frame left for a table. Changes made before this point stay.
    OutOfMemory,
    /// An address or the length is not a multiple of 4 KiB.
    Unaligned,
    /// The range ends beyond 2^48 (guest-physical) or 2^52 (host-physical).
    AddressTooLarge,
    /// This page of the range is already mapped; nothing was changed.
    AlreadyMapped(Gpa),
    /// This page of the range has no mapping; nothing was changed.
    NotMapped(Gpa),
    /// The allocator cannot reach the table at this address.
    BadTable(Hpa),
    /// The rights are empty or write without read (an EPT misconfiguration, SDM 29.3.3.1); use
    /// `unmap` to remove access.
    InvalidPerm(Perm),
}

impl fmt::Display for EptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OutOfMemory => f.write_str("no frame left for an EPT table"),
            Self::Unaligned => f.write_str("address or length not 4 KiB aligned"),
            Self::AddressTooLarge => f.write_str("range beyond the EPT address width"),
            Self::AlreadyMapped(gpa) => write!(f, "guest-physical {gpa} is already mapped"),
            Self::NotMapped(gpa) => write!(f, "guest-physical {gpa} is not mapped"),
            Self::BadTable(hpa) => write!(f, "EPT table at {hpa} is not reachable"),
            Self::InvalidPerm(p) => write!(
                f,
                "rights {p:?} cannot be mapped; use unmap to remove access"
            ),
        }
    }
}

/// One page's translation, as [`EptView::lookup`] finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EptMapping {
    /// The host-physical byte (page offset included).
    pub hpa: Hpa,
    /// The leaf's access rights.
    pub perm: Perm,
    /// The leaf's memory type.
    pub memtype: MemType,
    /// Whether a 2 MiB (or larger) leaf maps it.
    pub large: bool,
}

#[derive(Clone, Copy)]
enum Edit {
    Unmap,
    Protect(Perm),
}

/// One EPT hierarchy: a view of guest-physical memory (SDM 29.3).
///
/// Table entries allow read, write and execute, so the leaf alone decides a page's rights.
#[derive(Debug)]
pub struct EptView {
    root: Hpa,
    splits: u64,
}

impl EptView {
    /// Allocates an empty PML4.
    pub fn new(alloc: &mut impl EptAlloc) -> Result<Self, EptError> {
        let root = alloc.alloc_zeroed().ok_or(EptError::OutOfMemory)?;
        Ok(Self { root, splits: 0 })
    }

    /// The PML4 address.
    #[must_use]
    pub const fn root(&self) -> Hpa {
        self.root
    }

    /// The EPTP for this view: write-back walks, no A/D flags.
    #[must_use]
    pub const fn eptp(&self) -> Eptp {
        Eptp::new(self.root, MemType::WriteBack, false)
    }

    /// How many 2 MiB leaves were split so far.
    #[must_use]
    pub const fn split_count(&self) -> u64 {
        self.splits
    }

    /// Maps [gpa, gpa+len) to [hpa, hpa+len): 2 MiB leaves where both are 2 MiB-aligned and the range
    /// covers the page, else 4 KiB. Page-aligned inputs required. Errors if any page is already mapped,
    /// before changing anything.
    pub fn map(
        &mut self,
        alloc: &mut impl EptAlloc,
        gpa: Gpa,
        hpa: Hpa,
        len: u64,
        perm: Perm,
        memtype: MemType,
    ) -> Result<(), EptError> {
        if !perm.is_valid_for_mapping() {
            return Err(EptError::InvalidPerm(perm));
        }
        let (start, end) = gpa_range(gpa, len)?;
        if !hpa.is_aligned(PAGE_SIZE) {
            return Err(EptError::Unaligned);
        }
        match hpa.checked_add(len) {
            Some(e) if e.raw() <= HPA_LIMIT => {}
            _ => return Err(EptError::AddressTooLarge),
        }
        if start == end {
            return Ok(());
        }
        if let Some(hit) = first_matching(alloc, self.root, 4, 0, start, end, true)? {
            return Err(EptError::AlreadyMapped(Gpa::new(hit)));
        }
        let mut off = 0;
        while off < len {
            let (ga, ha) = (start + off, hpa.raw() + off);
            let large_fits = (ga | ha) & (LARGE_PAGE_SIZE - 1) == 0 && len - off >= LARGE_PAGE_SIZE;
            if large_fits && self.place(alloc, ga, Hpa::new(ha), 2, perm, memtype)? {
                off += LARGE_PAGE_SIZE;
            } else {
                // The range was checked free, so a 4 KiB slot always takes the leaf.
                self.place(alloc, ga, Hpa::new(ha), 1, perm, memtype)?;
                off += PAGE_SIZE;
            }
        }
        Ok(())
    }

    /// [`map`](Self::map) with guest-physical == host-physical.
    pub fn map_identity(
        &mut self,
        alloc: &mut impl EptAlloc,
        gpa: Gpa,
        len: u64,
        perm: Perm,
        memtype: MemType,
    ) -> Result<(), EptError> {
        self.map(alloc, gpa, Hpa::from_identity_gpa(gpa), len, perm, memtype)
    }

    /// Removes mappings in the range; splits a 2 MiB leaf that is only partly inside into 512 4 KiB
    /// leaves keeping the rest intact. Unmapped pages inside the range are skipped. Emptied tables stay
    /// allocated.
    pub fn unmap(&mut self, alloc: &mut impl EptAlloc, gpa: Gpa, len: u64) -> Result<(), EptError> {
        let (start, end) = gpa_range(gpa, len)?;
        if start == end {
            return Ok(());
        }
        self.edit(alloc, self.root, 4, 0, start..end, Edit::Unmap)
    }

    /// Changes permissions of every page in the range, splitting 2 MiB leaves at the edges; NotMapped if
    /// any page in the range has no mapping, before changing anything.
    pub fn protect(
        &mut self,
        alloc: &mut impl EptAlloc,
        gpa: Gpa,
        len: u64,
        perm: Perm,
    ) -> Result<(), EptError> {
        if !perm.is_valid_for_mapping() {
            return Err(EptError::InvalidPerm(perm));
        }
        let (start, end) = gpa_range(gpa, len)?;
        if start == end {
            return Ok(());
        }
        if let Some(hole) = first_matching(alloc, self.root, 4, 0, start, end, false)? {
            return Err(EptError::NotMapped(Gpa::new(hole)));
        }
        self.edit(alloc, self.root, 4, 0, start..end, Edit::Protect(perm))
    }

    /// The translation of `gpa`, if a leaf with a valid memory type maps it.
    pub fn lookup(&self, alloc: &impl EptAlloc, gpa: Gpa) -> Option<EptMapping> {
        if gpa.raw() >= GPA_LIMIT {
            return None;
        }
        let mut table = self.root;
        for level in (1..=4u8).rev() {
            let entry = alloc.table(table)?.entries[index(gpa.raw(), level)];
            if !entry.is_present() {
                return None;
            }
            if is_leaf(entry, level) {
                let span = level_span(level);
                let hpa = Hpa::new((entry.addr().raw() & !(span - 1)) | (gpa.raw() & (span - 1)));
                let memtype = entry.memtype()?;
                return Some(EptMapping {
                    hpa,
                    perm: entry.perm(),
                    memtype,
                    large: level > 1,
                });
            }
            table = entry.addr();
        }
        None
    }

    /// Writes one leaf at `leaf_level` (1 = 4 KiB, 2 = 2 MiB) for `gpa`, creating tables on the way.
    /// `Ok(false)` if a 2 MiB slot already holds a table, so the caller should use 4 KiB leaves there.
    fn place(
        &mut self,
        alloc: &mut impl EptAlloc,
        gpa: u64,
        hpa: Hpa,
        leaf_level: u8,
        perm: Perm,
        memtype: MemType,
    ) -> Result<bool, EptError> {
        let mut table = self.root;
        for level in (leaf_level + 1..=4).rev() {
            let i = index(gpa, level);
            let entry = read_entry(alloc, table, i)?;
            table = if !entry.is_present() {
                let next = alloc.alloc_zeroed().ok_or(EptError::OutOfMemory)?;
                write_entry(alloc, table, i, EptEntry::new_table(next, Perm::RWX))?;
                next
            } else if is_leaf(entry, level) {
                return Err(EptError::AlreadyMapped(Gpa::new(gpa)));
            } else {
                entry.addr()
            };
        }
        let i = index(gpa, leaf_level);
        let entry = read_entry(alloc, table, i)?;
        if entry.is_present() {
            if !is_leaf(entry, leaf_level) {
                return Ok(false);
            }
            return Err(EptError::AlreadyMapped(Gpa::new(gpa)));
        }
        write_entry(
            alloc,
            table,
            i,
            EptEntry::new_leaf(hpa, perm, memtype, leaf_level > 1),
        )?;
        Ok(true)
    }

    /// Applies `edit` to `range` within `table`, whose entries at `level` start at `base`.
    fn edit(
        &mut self,
        alloc: &mut impl EptAlloc,
        table: Hpa,
        level: u8,
        base: u64,
        range: Range<u64>,
        edit: Edit,
    ) -> Result<(), EptError> {
        let span = level_span(level);
        let Range { start, end } = range;
        for i in index_range(base, span, start, end) {
            let entry = read_entry(alloc, table, i)?;
            if !entry.is_present() {
                continue;
            }
            let entry_base = base + i as u64 * span;
            let (lo, hi) = (start.max(entry_base), end.min(entry_base + span));
            let leaf = is_leaf(entry, level);
            if leaf && lo == entry_base && hi == entry_base + span {
                let new = match edit {
                    Edit::Unmap => EptEntry(0),
                    Edit::Protect(perm) => entry.with_perm(perm),
                };
                write_entry(alloc, table, i, new)?;
                continue;
            }
            let child = if leaf {
                let child = self.split(alloc, entry, level)?;
                write_entry(alloc, table, i, EptEntry::new_table(child, Perm::RWX))?;
                child
            } else {
                entry.addr()
            };
            self.edit(alloc, child, level - 1, entry_base, lo..hi, edit)?;
        }
        Ok(())
    }

    /// A new, fully written table holding the 512 next-smaller leaves equivalent to the large `leaf` at
    /// `level`. It is complete before the caller links it in, so a CPU walking a live view never sees a
    /// half-filled table: the old and the new translation agree everywhere.
    fn split(
        &mut self,
        alloc: &mut impl EptAlloc,
        leaf: EptEntry,
        level: u8,
    ) -> Result<Hpa, EptError> {
        let child_span = level_span(level - 1);
        let mut keep = leaf.raw() & !ADDR_MASK;
        if level - 1 == 1 {
            keep &= !EptFlags::LARGE.bits();
        }
        let frame = leaf.addr().raw() & !(level_span(level) - 1);
        let hpa = alloc.alloc_zeroed().ok_or(EptError::OutOfMemory)?;
        let table = alloc.table_mut(hpa).ok_or(EptError::BadTable(hpa))?;
        for (j, e) in table.entries.iter_mut().enumerate() {
            *e = EptEntry(keep | (frame + j as u64 * child_span));
        }
        self.splits += 1;
        Ok(hpa)
    }
}

/// The lowest page in `[start, end)` under `table` that is mapped (`want_mapped`) or unmapped.
fn first_matching(
    alloc: &impl EptAlloc,
    table: Hpa,
    level: u8,
    base: u64,
    start: u64,
    end: u64,
    want_mapped: bool,
) -> Result<Option<u64>, EptError> {
    let span = level_span(level);
    for i in index_range(base, span, start, end) {
        let entry = read_entry(alloc, table, i)?;
        let entry_base = base + i as u64 * span;
        let lo = start.max(entry_base);
        if !entry.is_present() {
            if !want_mapped {
                return Ok(Some(lo));
            }
            continue;
        }
        if is_leaf(entry, level) {
            if want_mapped {
                return Ok(Some(lo));
            }
            continue;
        }
        let hi = end.min(entry_base + span);
        if let Some(hit) = first_matching(
            alloc,
            entry.addr(),
            level - 1,
            entry_base,
            lo,
            hi,
            want_mapped,
        )? {
            return Ok(Some(hit));
        }
    }
    Ok(None)
}

/// Checks a guest-physical range and returns it as `[start, end)`.
fn gpa_range(gpa: Gpa, len: u64) -> Result<(u64, u64), EptError> {
    if !gpa.is_aligned(PAGE_SIZE) || len & (PAGE_SIZE - 1) != 0 {
        return Err(EptError::Unaligned);
    }
    match gpa.raw().checked_add(len) {
        Some(end) if end <= GPA_LIMIT => Ok((gpa.raw(), end)),
        _ => Err(EptError::AddressTooLarge),
    }
}

/// Whether `entry` at `level` maps memory rather than pointing at a table. Bit 7 of a PML4E is
/// reserved, so it never makes a leaf there.
const fn is_leaf(entry: EptEntry, level: u8) -> bool {
    level == 1 || (level <= 3 && entry.is_large())
}

/// The 9-bit index of `gpa` in a table at `level` (1 = PT ... 4 = PML4).
const fn index(gpa: u64, level: u8) -> usize {
    ((gpa >> (12 + 9 * (level as u32 - 1))) & 0x1ff) as usize
}

/// Bytes one entry at `level` covers.
const fn level_span(level: u8) -> u64 {
    PAGE_SIZE << (9 * (level as u32 - 1))
}

/// The entries of a table starting at `base` with entries of `span` bytes that `[start, end)` touches.
fn index_range(base: u64, span: u64, start: u64, end: u64) -> core::ops::RangeInclusive<usize> {
    (((start - base) / span) as usize)..=(((end - 1 - base) / span) as usize)
}

fn read_entry(alloc: &impl EptAlloc, table: Hpa, i: usize) -> Result<EptEntry, EptError> {
    Ok(alloc.table(table).ok_or(EptError::BadTable(table))?.entries[i])
}

fn write_entry(
    alloc: &mut impl EptAlloc,
    table: Hpa,
    i: usize,
    entry: EptEntry,
) -> Result<(), EptError> {
    alloc
        .table_mut(table)
        .ok_or(EptError::BadTable(table))?
        .entries[i] = entry;
    Ok(())
}

#[cfg(test)]
mod tests {
    extern crate std;

    use std::{boxed::Box, collections::HashMap};

    use super::*;

    const MIB: u64 = 1 << 20;

    /// Table frames live far above the guest RAM the tests map, as L0's own frames would.
    struct TestAlloc {
        tables: HashMap<u64, Box<EptTable>>,
        next: u64,
        limit: usize,
    }

    impl TestAlloc {
        fn new() -> Self {
            Self {
                tables: HashMap::new(),
                next: 0x10_0000_0000,
                limit: usize::MAX,
            }
        }
    }

    impl EptAlloc for TestAlloc {
        fn alloc_zeroed(&mut self) -> Option<Hpa> {
            if self.tables.len() >= self.limit {
                return None;
            }
            let hpa = self.next;
            self.next += PAGE_SIZE;
            self.tables.insert(hpa, Box::new(EptTable::new()));
            Some(Hpa::new(hpa))
        }

        fn table_mut(&mut self, hpa: Hpa) -> Option<&mut EptTable> {
            self.tables.get_mut(&hpa.raw()).map(|t| &mut **t)
        }

        fn table(&self, hpa: Hpa) -> Option<&EptTable> {
            self.tables.get(&hpa.raw()).map(|t| &**t)
        }
    }

    fn identity_64m() -> (TestAlloc, EptView) {
        let mut a = TestAlloc::new();
        let mut v = EptView::new(&mut a).unwrap();
        v.map_identity(&mut a, Gpa::new(0), 64 * MIB, Perm::RWX, MemType::WriteBack)
            .unwrap();
        (a, v)
    }

    fn mapping(hpa: u64, perm: Perm, large: bool) -> Option<EptMapping> {
        Some(EptMapping {
            hpa: Hpa::new(hpa),
            perm,
            memtype: MemType::WriteBack,
            large,
        })
    }

    #[test]
    fn eptp_encoding() {
        let e = Eptp::new(Hpa::new(0x123_4000), MemType::WriteBack, false);
        assert_eq!(e.raw(), 0x123_401e);
        assert_eq!(
            Eptp::new(Hpa::new(0x123_4000), MemType::WriteBack, true).raw(),
            0x123_405e
        );
        assert_eq!(
            Eptp::new(Hpa::new(0x123_4fff), MemType::Uncacheable, false).raw(),
            0x123_4018
        );
        let back = Eptp::from_raw(e.raw());
        assert_eq!(back, e);
        assert_eq!(back.pml4(), Hpa::new(0x123_4000));
        assert_eq!(back.memtype(), Some(MemType::WriteBack));
        assert_eq!(back.walk_length(), 4);
        assert!(!back.accessed_dirty());
    }

    #[test]
    fn entry_encoding() {
        let leaf = EptEntry::new_leaf(Hpa::new(0x20_0000), Perm::RX, MemType::WriteBack, true);
        assert_eq!(leaf.raw(), 0x20_0000 | 0b101 | 6 << 3 | 1 << 7);
        assert_eq!(leaf.perm(), Perm::RX);
        assert_eq!(leaf.memtype(), Some(MemType::WriteBack));
        assert_eq!(leaf.addr(), Hpa::new(0x20_0000));
        assert!(leaf.is_present() && leaf.is_large());
        assert_eq!(leaf.flags(), EptFlags::LARGE);
        assert_eq!(leaf.with_perm(Perm::READ).raw(), leaf.raw() & !0b100);

        let table = EptEntry::new_table(Hpa::new(0x5000), Perm::RWX);
        assert_eq!(table.raw(), 0x5007);
        assert!(!table.is_large());
        assert!(!EptEntry::new_table(Hpa::new(0x5000), Perm::empty()).is_present());
        assert_eq!(EptEntry::from_raw(2 << 3).memtype(), None);
        assert_eq!(EptEntry::from_raw(1 << 63).flags(), EptFlags::SUPPRESS_VE);
    }

    #[test]
    fn identity_uses_2m_leaves() {
        let (a, v) = identity_64m();
        // PML4, PDPT, one PD: no page table at all.
        assert_eq!(a.tables.len(), 3);
        assert_eq!(
            v.lookup(&a, Gpa::new(0x123_4567)),
            mapping(0x123_4567, Perm::RWX, true)
        );
        assert_eq!(
            v.lookup(&a, Gpa::new(64 * MIB - 1)),
            mapping(64 * MIB - 1, Perm::RWX, true)
        );
        assert_eq!(v.lookup(&a, Gpa::new(64 * MIB)), None);
        assert_eq!(v.lookup(&a, Gpa::new(1 << 48)), None);
        assert_eq!(v.eptp().pml4(), v.root());
        assert_eq!(v.eptp().raw() & 0xfff, 0x1e);
    }

    #[test]
    fn unmap_one_frame_splits_its_leaf_only() {
        let (mut a, mut v) = identity_64m();
        let frame = 0x180_5000;
        v.unmap(&mut a, Gpa::new(frame), PAGE_SIZE).unwrap();
        assert_eq!(v.split_count(), 1);
        assert_eq!(v.lookup(&a, Gpa::new(frame)), None);
        assert_eq!(v.lookup(&a, Gpa::new(frame + 0xfff)), None);
        assert_eq!(
            v.lookup(&a, Gpa::new(frame - 1)),
            mapping(frame - 1, Perm::RWX, false)
        );
        assert_eq!(
            v.lookup(&a, Gpa::new(frame + PAGE_SIZE)),
            mapping(frame + PAGE_SIZE, Perm::RWX, false)
        );
        assert_eq!(
            v.lookup(&a, Gpa::new(0x180_0000)),
            mapping(0x180_0000, Perm::RWX, false)
        );
        assert_eq!(
            v.lookup(&a, Gpa::new(0x17f_ffff)),
            mapping(0x17f_ffff, Perm::RWX, true)
        );
        assert_eq!(
            v.lookup(&a, Gpa::new(0x1a0_0000)),
            mapping(0x1a0_0000, Perm::RWX, true)
        );
        let mapped_4k =
            (0..512u64).filter(|p| v.lookup(&a, Gpa::new(0x180_0000 + p * PAGE_SIZE)).is_some());
        assert_eq!(mapped_4k.count(), 511);

        // Already gone: skipped, nothing split again.
        v.unmap(&mut a, Gpa::new(frame), PAGE_SIZE).unwrap();
        assert_eq!(v.split_count(), 1);
        // The hole can be filled again.
        v.map(
            &mut a,
            Gpa::new(frame),
            Hpa::new(0x7000),
            PAGE_SIZE,
            Perm::RW,
            MemType::WriteBack,
        )
        .unwrap();
        assert_eq!(
            v.lookup(&a, Gpa::new(frame + 8)),
            mapping(0x7008, Perm::RW, false)
        );
    }

    #[test]
    fn unmap_range_across_leaves() {
        let (mut a, mut v) = identity_64m();
        v.unmap(&mut a, Gpa::new(0x1f_f000), 0x20_2000).unwrap();
        // The leaves at 0 and 4 MiB are split; the one at 2 MiB is removed whole.
        assert_eq!(v.split_count(), 2);
        assert_eq!(
            v.lookup(&a, Gpa::new(0x1f_e000)),
            mapping(0x1f_e000, Perm::RWX, false)
        );
        assert_eq!(v.lookup(&a, Gpa::new(0x1f_f000)), None);
        assert_eq!(v.lookup(&a, Gpa::new(0x30_0000)), None);
        assert_eq!(v.lookup(&a, Gpa::new(0x40_0000)), None);
        assert_eq!(
            v.lookup(&a, Gpa::new(0x40_1000)),
            mapping(0x40_1000, Perm::RWX, false)
        );
        // The freed 2 MiB slot takes a large leaf again.
        v.map_identity(
            &mut a,
            Gpa::new(0x20_0000),
            2 * MIB,
            Perm::RX,
            MemType::WriteBack,
        )
        .unwrap();
        assert_eq!(
            v.lookup(&a, Gpa::new(0x20_0000)),
            mapping(0x20_0000, Perm::RX, true)
        );
        // Unmapping beyond what is mapped is fine.
        v.unmap(&mut a, Gpa::new(60 * MIB), 1 << 30).unwrap();
        assert_eq!(v.lookup(&a, Gpa::new(60 * MIB)), None);
        assert_eq!(
            v.lookup(&a, Gpa::new(60 * MIB - 1)),
            mapping(60 * MIB - 1, Perm::RWX, true)
        );
    }

    #[test]
    fn protect_one_frame_rx() {
        let (mut a, mut v) = identity_64m();
        v.protect(&mut a, Gpa::new(0x200_3000), PAGE_SIZE, Perm::RX)
            .unwrap();
        assert_eq!(v.split_count(), 1);
        assert_eq!(
            v.lookup(&a, Gpa::new(0x200_3abc)),
            mapping(0x200_3abc, Perm::RX, false)
        );
        assert_eq!(
            v.lookup(&a, Gpa::new(0x200_2000)),
            mapping(0x200_2000, Perm::RWX, false)
        );
        assert_eq!(
            v.lookup(&a, Gpa::new(0x200_4000)),
            mapping(0x200_4000, Perm::RWX, false)
        );
        // A whole leaf changes in place.
        v.protect(&mut a, Gpa::new(0x40_0000), 2 * MIB, Perm::READ)
            .unwrap();
        assert_eq!(v.split_count(), 1);
        assert_eq!(
            v.lookup(&a, Gpa::new(0x40_0000)),
            mapping(0x40_0000, Perm::READ, true)
        );
        // Execute-only is valid EPT; write without read is not.
        v.protect(&mut a, Gpa::new(0), PAGE_SIZE, Perm::EXECUTE)
            .unwrap();
        let bad = Perm::WRITE;
        assert_eq!(
            v.protect(&mut a, Gpa::new(0), PAGE_SIZE, bad),
            Err(EptError::InvalidPerm(bad))
        );
        let none = Perm::empty();
        assert_eq!(
            v.protect(&mut a, Gpa::new(0), PAGE_SIZE, none),
            Err(EptError::InvalidPerm(none))
        );
    }

    #[test]
    fn protect_refuses_holes_without_changes() {
        let (mut a, mut v) = identity_64m();
        v.unmap(&mut a, Gpa::new(0x300_5000), PAGE_SIZE).unwrap();
        let r = v.protect(&mut a, Gpa::new(0x2e0_0000), 4 * MIB, Perm::RX);
        assert_eq!(r, Err(EptError::NotMapped(Gpa::new(0x300_5000))));
        assert_eq!(v.split_count(), 1);
        assert_eq!(
            v.lookup(&a, Gpa::new(0x2e0_0000)),
            mapping(0x2e0_0000, Perm::RWX, true)
        );
        let r = v.protect(&mut a, Gpa::new(63 * MIB), 2 * MIB, Perm::RX);
        assert_eq!(r, Err(EptError::NotMapped(Gpa::new(64 * MIB))));
        let mut empty = TestAlloc::new();
        let mut e = EptView::new(&mut empty).unwrap();
        let r = e.protect(&mut empty, Gpa::new(0x1000), PAGE_SIZE, Perm::RX);
        assert_eq!(r, Err(EptError::NotMapped(Gpa::new(0x1000))));
    }

    #[test]
    fn lookup_keeps_offsets_and_memtype() {
        let mut a = TestAlloc::new();
        let mut v = EptView::new(&mut a).unwrap();
        v.map(
            &mut a,
            Gpa::new(0x1000_0000),
            Hpa::new(0x5000_0000),
            0x3000,
            Perm::RW,
            MemType::WriteBack,
        )
        .unwrap();
        v.map(
            &mut a,
            Gpa::new(0xfee0_0000),
            Hpa::new(0xfee0_0000),
            PAGE_SIZE,
            Perm::RW,
            MemType::Uncacheable,
        )
        .unwrap();
        assert_eq!(
            v.lookup(&a, Gpa::new(0x1000_1abc)),
            mapping(0x5000_1abc, Perm::RW, false)
        );
        let uc = v.lookup(&a, Gpa::new(0xfee0_00f0)).unwrap();
        assert_eq!(uc.memtype, MemType::Uncacheable);
        assert_eq!(uc.hpa, Hpa::new(0xfee0_00f0));
        // A 2 MiB-aligned GPA with a 4 KiB-aligned HPA cannot use a large leaf.
        v.map(
            &mut a,
            Gpa::new(0x4000_0000),
            Hpa::new(0x7000_1000),
            2 * MIB,
            Perm::RX,
            MemType::WriteThrough,
        )
        .unwrap();
        let m = v.lookup(&a, Gpa::new(0x401f_f123)).unwrap();
        assert_eq!(
            (m.hpa, m.large, m.memtype),
            (Hpa::new(0x7020_0123), false, MemType::WriteThrough)
        );
    }

    #[test]
    fn overlap_is_refused_without_changes() {
        let (mut a, mut v) = identity_64m();
        let tables = a.tables.len();
        let r = v.map_identity(
            &mut a,
            Gpa::new(0x200_0000),
            PAGE_SIZE,
            Perm::RX,
            MemType::WriteBack,
        );
        assert_eq!(r, Err(EptError::AlreadyMapped(Gpa::new(0x200_0000))));
        let r = v.map_identity(
            &mut a,
            Gpa::new(63 * MIB),
            4 * MIB,
            Perm::RX,
            MemType::WriteBack,
        );
        assert_eq!(r, Err(EptError::AlreadyMapped(Gpa::new(63 * MIB))));
        assert_eq!(a.tables.len(), tables);
        assert_eq!(v.lookup(&a, Gpa::new(64 * MIB)), None);

        let mut a = TestAlloc::new();
        let mut v = EptView::new(&mut a).unwrap();
        v.map_identity(
            &mut a,
            Gpa::new(0x3f_f000),
            PAGE_SIZE,
            Perm::RX,
            MemType::WriteBack,
        )
        .unwrap();
        let r = v.map_identity(
            &mut a,
            Gpa::new(0x20_0000),
            2 * MIB,
            Perm::RX,
            MemType::WriteBack,
        );
        assert_eq!(r, Err(EptError::AlreadyMapped(Gpa::new(0x3f_f000))));
        // Around it, the PD slot already holds a table, so the builder falls back to 4 KiB leaves.
        v.map_identity(
            &mut a,
            Gpa::new(0x20_0000),
            2 * MIB - PAGE_SIZE,
            Perm::RX,
            MemType::WriteBack,
        )
        .unwrap();
        assert!(!v.lookup(&a, Gpa::new(0x20_0000)).unwrap().large);
    }

    #[test]
    fn bad_input() {
        let mut a = TestAlloc::new();
        let mut v = EptView::new(&mut a).unwrap();
        let (wb, rw) = (MemType::WriteBack, Perm::RW);
        let u = Err(EptError::Unaligned);
        assert_eq!(
            v.map(&mut a, Gpa::new(0x10), Hpa::new(0), PAGE_SIZE, rw, wb),
            u
        );
        assert_eq!(
            v.map(&mut a, Gpa::new(0), Hpa::new(0x10), PAGE_SIZE, rw, wb),
            u
        );
        assert_eq!(v.map(&mut a, Gpa::new(0), Hpa::new(0), 0x10, rw, wb), u);
        assert_eq!(v.unmap(&mut a, Gpa::new(0x10), PAGE_SIZE), u);
        assert_eq!(v.protect(&mut a, Gpa::new(0), 0x800, rw), u);
        let big = Err(EptError::AddressTooLarge);
        assert_eq!(
            v.map_identity(
                &mut a,
                Gpa::new((1 << 48) - PAGE_SIZE),
                2 * PAGE_SIZE,
                rw,
                wb
            ),
            big
        );
        assert_eq!(
            v.map(
                &mut a,
                Gpa::new(0),
                Hpa::new((1 << 52) - PAGE_SIZE),
                2 * PAGE_SIZE,
                rw,
                wb
            ),
            big
        );
        assert_eq!(v.unmap(&mut a, Gpa::new(!0xfff), 2 * PAGE_SIZE), big);
        assert_eq!(
            v.map(&mut a, Gpa::new(0), Hpa::new(0), PAGE_SIZE, Perm::WRITE, wb),
            Err(EptError::InvalidPerm(Perm::WRITE))
        );
        assert_eq!(v.map(&mut a, Gpa::new(0), Hpa::new(0), 0, rw, wb), Ok(()));
        // The top page below 2^48 is fine.
        v.map_identity(&mut a, Gpa::new((1 << 48) - PAGE_SIZE), PAGE_SIZE, rw, wb)
            .unwrap();
        assert!(v.lookup(&a, Gpa::new((1 << 48) - 1)).is_some());
    }

    #[test]
    fn exhaustion_and_unreachable_tables() {
        let mut a = TestAlloc::new();
        a.limit = 0;
        assert_eq!(EptView::new(&mut a).unwrap_err(), EptError::OutOfMemory);
        let (mut a, mut v) = identity_64m();
        a.limit = a.tables.len();
        assert_eq!(
            v.unmap(&mut a, Gpa::new(0x1000), PAGE_SIZE),
            Err(EptError::OutOfMemory)
        );
        assert_eq!(v.split_count(), 0);
        assert_eq!(
            v.lookup(&a, Gpa::new(0x1000)),
            mapping(0x1000, Perm::RWX, true)
        );

        let root = v.root().raw();
        a.tables.remove(&root);
        assert_eq!(
            v.unmap(&mut a, Gpa::new(0), PAGE_SIZE),
            Err(EptError::BadTable(Hpa::new(root)))
        );
        assert_eq!(v.lookup(&a, Gpa::new(0)), None);
    }

    #[test]
    fn eptp_list_slots() {
        assert_eq!(ViewId::new(512), None);
        let last = ViewId::new(511).unwrap();
        let normal = ViewId::new(0).unwrap();
        let monitor = ViewId::new(1).unwrap();
        assert!(normal < monitor);
        assert_eq!(monitor.raw(), 1);

        let mut list = Box::new(EptpList::new());
        assert_eq!(list.get(normal), None);
        let e0 = Eptp::new(Hpa::new(0x1000), MemType::WriteBack, false);
        let e1 = Eptp::new(Hpa::new(0x2000), MemType::WriteBack, true);
        list.set(normal, e0);
        list.set(monitor, e1);
        list.set(last, e1);
        assert_eq!(list.get(normal), Some(e0));
        assert_eq!(list.get(monitor), Some(e1));
        assert_eq!(list.entries()[1], e1.raw());
        assert_eq!(list.entries()[511], e1.raw());
        list.clear(monitor);
        assert_eq!(list.get(monitor), None);
        assert_eq!(list.entries()[1], 0);
    }

    #[test]
    fn errors_display() {
        let s = std::format!("{}", EptError::NotMapped(Gpa::new(0x3000)));
        assert_eq!(s, "guest-physical 0x3000 is not mapped");
    }
}
