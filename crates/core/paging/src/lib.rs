#![doc = include_str!("../README.md")]
#![no_std]
#![deny(unsafe_code)]

use core::fmt;

use bitflags::bitflags;
use ihmi_addr::{Gpa, Gva, HUGE_PAGE_SIZE, LARGE_PAGE_SIZE, PAGE_SIZE};

/// Bits 51:12, the widest physical-address field of a paging entry (SDM 4.5.4).
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// The PAT bit of a 2 MiB or 1 GiB leaf, which sits where a 4 KiB frame address has its bit 12.
const LARGE_PAT: u64 = 1 << 12;
/// Width of linear addresses under 4-level paging.
const LINEAR_BITS: u32 = 48;
const ENTRIES: usize = 512;
/// MAXPHYADDR assumed by [`translate`]: the architectural maximum, so no address bit counts as reserved.
pub const MAX_PHYS_ADDR_BITS: u8 = 52;

bitflags! {
    /// Flag bits of a 4-level paging entry (SDM 4.5.4, Tables 4-15 to 4-20).
    ///
    /// `HUGE` is the PS bit: in a PDPTE it makes a 1 GiB leaf, in a PDE a 2 MiB leaf, in a PML4E it is
    /// reserved, and in a PTE bit 7 is PAT instead.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct PteFlags: u64 {
        /// P: the entry maps something.
        const PRESENT = 1 << 0;
        /// R/W: writes allowed (SDM 4.6).
        const WRITABLE = 1 << 1;
        /// U/S: user-mode accesses allowed (SDM 4.6).
        const USER = 1 << 2;
        /// PWT: write-through, one of the PAT index bits (SDM 4.9.2).
        const WRITE_THROUGH = 1 << 3;
        /// PCD: cache disable, one of the PAT index bits (SDM 4.9.2).
        const CACHE_DISABLE = 1 << 4;
        /// A: set by the CPU on first use.
        const ACCESSED = 1 << 5;
        /// D: set by the CPU on first write to a leaf.
        const DIRTY = 1 << 6;
        /// PS: this PDPTE/PDE is a leaf.
        const HUGE = 1 << 7;
        /// G: the translation survives CR3 loads (leaves only).
        const GLOBAL = 1 << 8;
        /// XD: instruction fetches are not allowed (needs `EFER.NXE`).
        const NO_EXECUTE = 1 << 63;
    }
}

/// One entry of any 4-level paging structure (SDM 4.5.4, Tables 4-15 to 4-20).
#[derive(Clone, Copy, PartialEq, Eq, Default)]
#[repr(transparent)]
pub struct PageTableEntry(u64);

impl PageTableEntry {
    /// An entry pointing at `addr` (bits 51:12 are kept, the rest dropped) with `flags`.
    #[must_use]
    pub const fn new(addr: Gpa, flags: PteFlags) -> Self {
        Self((addr.raw() & ADDR_MASK) | flags.bits())
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

    /// The flag bits this crate knows about.
    #[must_use]
    pub const fn flags(self) -> PteFlags {
        PteFlags::from_bits_truncate(self.0)
    }

    /// The table or frame address. For a PS leaf the PAT bit (bit 12) is not part of the address.
    #[must_use]
    pub const fn addr(self) -> Gpa {
        let mask = if self.is_huge() {
            ADDR_MASK & !LARGE_PAT
        } else {
            ADDR_MASK
        };
        Gpa::new(self.0 & mask)
    }

    /// Whether the P bit is set.
    #[must_use]
    pub const fn is_present(self) -> bool {
        self.0 & PteFlags::PRESENT.bits() != 0
    }

    /// Whether the PS bit is set (meaningful in PDPTEs and PDEs only).
    #[must_use]
    pub const fn is_huge(self) -> bool {
        self.0 & PteFlags::HUGE.bits() != 0
    }
}

impl fmt::Debug for PageTableEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PageTableEntry({:#x}, {:?})",
            self.addr().raw(),
            self.flags()
        )
    }
}

/// A PML4, page-directory-pointer table, page directory or page table: 512 entries in one 4 KiB frame
/// (SDM 4.5.4).
#[derive(Clone)]
#[repr(C, align(4096))]
pub struct PageTable {
    /// The entries, indexed by 9 bits of the linear address.
    pub entries: [PageTableEntry; ENTRIES],
}

const _: () = assert!(core::mem::size_of::<PageTable>() == 4096);

impl PageTable {
    /// A table with every entry zero (nothing present).
    #[must_use]
    pub const fn new() -> Self {
        Self {
            entries: [PageTableEntry(0); ENTRIES],
        }
    }
}

impl Default for PageTable {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for PageTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // 512 mostly-empty entries drown a log; show only the ones in use.
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

/// The CR3 register under 4-level paging (SDM 4.5.2, Table 4-12; PCID in SDM 4.10.1).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
#[repr(transparent)]
pub struct Cr3(u64);

impl Cr3 {
    /// Wraps a raw CR3 value.
    #[must_use]
    pub const fn new(raw: u64) -> Self {
        Self(raw)
    }

    /// CR3 for the PML4 at `root` with PCID 0 and default caching.
    #[must_use]
    pub const fn from_root(root: Gpa) -> Self {
        Self(root.raw() & ADDR_MASK)
    }

    /// The raw value.
    #[must_use]
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// The PML4 address (bits 51:12). The PCID or PWT/PCD bits below and bit 63 do not move it.
    #[must_use]
    pub const fn root(self) -> Gpa {
        Gpa::new(self.0 & ADDR_MASK)
    }

    /// Bits 11:0: the PCID when `CR4.PCIDE = 1`.
    #[must_use]
    pub const fn pcid(self) -> u16 {
        (self.0 & 0xfff) as u16
    }
}

impl fmt::Debug for Cr3 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cr3({:#x})", self.0)
    }
}

/// The size of a leaf translation (SDM 4.5.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PageSize {
    /// A PTE maps 4 KiB.
    Size4K,
    /// A PDE with PS maps 2 MiB.
    Size2M,
    /// A PDPTE with PS maps 1 GiB.
    Size1G,
}

impl PageSize {
    /// The page size in bytes.
    #[must_use]
    pub const fn bytes(self) -> u64 {
        match self {
            Self::Size4K => PAGE_SIZE,
            Self::Size2M => LARGE_PAGE_SIZE,
            Self::Size1G => HUGE_PAGE_SIZE,
        }
    }

    /// The paging level (1 = PT, 2 = PD, 3 = PDPT) whose entries map pages of this size.
    const fn level(self) -> u8 {
        match self {
            Self::Size4K => 1,
            Self::Size2M => 2,
            Self::Size1G => 3,
        }
    }
}

/// A guest-physical read failed: nothing backs `gpa`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PhysReadError {
    /// The first address that could not be read.
    pub gpa: Gpa,
}

impl fmt::Display for PhysReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "guest-physical {} is not readable", self.gpa)
    }
}

/// Guest-physical memory as the walker sees it (the L0 implements it over identity-mapped RAM, tests
/// over a `HashMap`).
pub trait GuestPhysRead {
    /// Fills `buf` from `gpa` onwards.
    fn read_bytes(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), PhysReadError>;

    /// Reads one little-endian `u64`, the size of a paging entry.
    fn read_u64(&self, gpa: Gpa) -> Result<u64, PhysReadError> {
        let mut buf = [0u8; 8];
        self.read_bytes(gpa, &mut buf)?;
        Ok(u64::from_le_bytes(buf))
    }

    /// Reads one little-endian `u32`.
    fn read_u32(&self, gpa: Gpa) -> Result<u32, PhysReadError> {
        let mut buf = [0u8; 4];
        self.read_bytes(gpa, &mut buf)?;
        Ok(u32::from_le_bytes(buf))
    }

    /// Hands `f` each of the `n` little-endian `u64` at `gpa` with its index, in order, without a
    /// buffer; all of them must be readable before `f` sees the first. This default reads them
    /// twice (a reader that can check the range once overrides it).
    fn each_u64<F: FnMut(usize, u64)>(
        &self,
        gpa: Gpa,
        n: usize,
        mut f: F,
    ) -> Result<(), PhysReadError>
    where
        Self: Sized,
    {
        let at = |i: usize| {
            (i as u64)
                .checked_mul(8)
                .and_then(|o| gpa.raw().checked_add(o))
                .map(Gpa::new)
                .ok_or(PhysReadError { gpa })
        };
        for i in 0..n {
            self.read_u64(at(i)?)?;
        }
        for i in 0..n {
            f(i, self.read_u64(at(i)?)?);
        }
        Ok(())
    }
}

/// A successful walk: where the address goes and the rights combined over all levels (SDM 4.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    /// The guest-physical byte the address maps to (page offset included).
    pub gpa: Gpa,
    /// The size of the leaf that mapped it.
    pub size: PageSize,
    /// R/W set at every level.
    pub writable: bool,
    /// U/S set at every level.
    pub user: bool,
    /// XD clear at every level.
    pub executable: bool,
}

/// Why a walk failed. `level` is 4 for the PML4E, 3 for the PDPTE, 2 for the PDE and 1 for the PTE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkError {
    /// Bits 63:47 are not all equal (SDM 3.3.7.1); the CPU raises #GP, not #PF.
    NonCanonical(Gva),
    /// An entry on the way has P = 0.
    NotPresent {
        /// The address being translated.
        gva: Gva,
        /// The level of the entry.
        level: u8,
    },
    /// An entry on the way sets a reserved bit (a #PF with RSVD = 1, SDM 4.7).
    ReservedBits {
        /// The address being translated.
        gva: Gva,
        /// The level of the entry.
        level: u8,
    },
    /// An entry on the way maps a large page, so there is no table below it (see
    /// [`entry_address`]).
    LargePage {
        /// The address being walked.
        gva: Gva,
        /// The level of the entry.
        level: u8,
    },
    /// A paging structure or the data could not be read.
    Phys(PhysReadError),
    /// The translation exists but does not allow the requested access.
    Protection {
        /// The address being accessed.
        gva: Gva,
    },
}

impl From<PhysReadError> for WalkError {
    fn from(e: PhysReadError) -> Self {
        Self::Phys(e)
    }
}

impl fmt::Display for WalkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NonCanonical(gva) => write!(f, "{gva} is not canonical"),
            Self::NotPresent { gva, level } => write!(f, "{gva}: level-{level} entry not present"),
            Self::ReservedBits { gva, level } => {
                write!(f, "{gva}: level-{level} entry sets reserved bits")
            }
            Self::LargePage { gva, level } => {
                write!(
                    f,
                    "{gva}: level-{level} entry maps a large page, not a table"
                )
            }
            Self::Phys(e) => e.fmt(f),
            Self::Protection { gva } => write!(f, "{gva}: access not allowed"),
        }
    }
}

/// An access to check against a translation (SDM 4.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    /// A write rather than a read.
    pub write: bool,
    /// Made with CPL 3.
    pub user: bool,
    /// An instruction fetch.
    pub execute: bool,
}

impl Access {
    /// A supervisor data read.
    pub const READ: Self = Self {
        write: false,
        user: false,
        execute: false,
    };
    /// A supervisor data write.
    pub const WRITE: Self = Self {
        write: true,
        user: false,
        execute: false,
    };
    /// A supervisor instruction fetch.
    pub const EXEC: Self = Self {
        write: false,
        user: false,
        execute: true,
    };

    /// The same access made from user mode.
    #[must_use]
    pub const fn from_user(self) -> Self {
        Self { user: true, ..self }
    }
}

/// Translates `gva` through the tables under `cr3`, treating no physical-address bit as reserved.
pub fn translate(mem: &impl GuestPhysRead, cr3: Cr3, gva: Gva) -> Result<Translation, WalkError> {
    translate_with_maxphyaddr(mem, cr3, gva, MAX_PHYS_ADDR_BITS)
}

/// Like [`translate`], with address bits at and above `maxphyaddr` (`CPUID.80000008H:EAX[7:0]`) reserved,
/// as the real CPU treats them. Values outside 32..=52 are clamped into that range.
#[inline]
pub fn translate_with_maxphyaddr(
    mem: &impl GuestPhysRead,
    cr3: Cr3,
    gva: Gva,
    maxphyaddr: u8,
) -> Result<Translation, WalkError> {
    if !gva.is_canonical() {
        return Err(WalkError::NonCanonical(gva));
    }
    let phys_bits = u32::from(maxphyaddr.clamp(32, MAX_PHYS_ADDR_BITS));
    let rsvd_phys = ADDR_MASK & !((1u64 << phys_bits) - 1);
    let mut table = cr3.root();
    let (mut writable, mut user, mut executable) = (true, true, true);
    for level in (1..=4u8).rev() {
        let entry_addr = entry_in(table, gva, level).ok_or(WalkError::NotPresent { gva, level })?;
        let entry = PageTableEntry(mem.read_u64(entry_addr)?);
        if !entry.is_present() {
            return Err(WalkError::NotPresent { gva, level });
        }
        let leaf_size = match level {
            1 => Some(PageSize::Size4K),
            2 if entry.is_huge() => Some(PageSize::Size2M),
            3 if entry.is_huge() => Some(PageSize::Size1G),
            _ => None,
        };
        let reserved = match (level, leaf_size) {
            // PS must be 0 in a PML4E.
            (4, _) => rsvd_phys | PteFlags::HUGE.bits(),
            // Between the PAT bit and the frame address of a large leaf.
            (_, Some(size @ (PageSize::Size2M | PageSize::Size1G))) => {
                rsvd_phys | ((size.bytes() - 1) & !(LARGE_PAT | (PAGE_SIZE - 1)))
            }
            _ => rsvd_phys,
        };
        if entry.raw() & reserved != 0 {
            return Err(WalkError::ReservedBits { gva, level });
        }
        let flags = entry.flags();
        writable &= flags.contains(PteFlags::WRITABLE);
        user &= flags.contains(PteFlags::USER);
        executable &= !flags.contains(PteFlags::NO_EXECUTE);
        if let Some(size) = leaf_size {
            let frame = entry.raw() & ADDR_MASK & !(size.bytes() - 1);
            let gpa = Gpa::new(frame | (gva.raw() & (size.bytes() - 1)));
            return Ok(Translation {
                gpa,
                size,
                writable,
                user,
                executable,
            });
        }
        table = entry.addr();
    }
    // Level 1 always returns above.
    Err(WalkError::NotPresent { gva, level: 1 })
}

/// Where the entry for `gva` at `level` (1 = PT ... 4 = PML4) sits in the tables under `root`: the
/// walk follows the entries above it, which must be present and point at tables, not large pages.
/// Used to find (and then write or audit) one entry of the guest's own page tables.
pub fn entry_address(
    mem: &impl GuestPhysRead,
    root: Gpa,
    gva: Gva,
    level: u8,
) -> Result<Gpa, WalkError> {
    if !gva.is_canonical() {
        return Err(WalkError::NonCanonical(gva));
    }
    let level = level.clamp(1, 4);
    let mut table = root;
    for upper in (level + 1..=4).rev() {
        let at = entry_in(table, gva, upper).ok_or(WalkError::NotPresent { gva, level: upper })?;
        let entry = PageTableEntry(mem.read_u64(at)?);
        if !entry.is_present() {
            return Err(WalkError::NotPresent { gva, level: upper });
        }
        if entry.is_huge() {
            return Err(WalkError::LargePage { gva, level: upper });
        }
        table = entry.addr();
    }
    entry_in(table, gva, level).ok_or(WalkError::NotPresent { gva, level })
}

/// The address of the entry for `gva` in the level-`level` table at `table`.
fn entry_in(table: Gpa, gva: Gva, level: u8) -> Option<Gpa> {
    table.checked_add(index(gva.raw(), level) as u64 * 8)
}

/// [`translate`], then a [`WalkError::Protection`] error unless `access` is allowed.
pub fn translate_checked(
    mem: &impl GuestPhysRead,
    cr3: Cr3,
    gva: Gva,
    access: Access,
) -> Result<Translation, WalkError> {
    let t = translate(mem, cr3, gva)?;
    // With CR0.WP = 1 a supervisor write needs R/W too, so the write check ignores the mode.
    let denied = (access.write && !t.writable)
        || (access.user && !t.user)
        || (access.execute && !t.executable);
    if denied {
        return Err(WalkError::Protection { gva });
    }
    Ok(t)
}

/// Copies `buf.len()` bytes starting at `gva`, crossing page boundaries, each page translated separately.
pub fn read_virt(
    mem: &impl GuestPhysRead,
    cr3: Cr3,
    gva: Gva,
    buf: &mut [u8],
) -> Result<(), WalkError> {
    let mut cur = gva;
    let mut done = 0usize;
    while done < buf.len() {
        let t = translate(mem, cr3, cur)?;
        let chunk = ((PAGE_SIZE - cur.page_offset()) as usize).min(buf.len() - done);
        mem.read_bytes(t.gpa, &mut buf[done..done + chunk])?;
        done += chunk;
        if done < buf.len() {
            // Past the top of the address space there is nothing canonical to read.
            cur = cur
                .checked_add(chunk as u64)
                .ok_or(WalkError::NonCanonical(cur))?;
        }
    }
    Ok(())
}

/// The 9-bit table index of `addr` at `level` (1 = PT ... 4 = PML4).
const fn index(addr: u64, level: u8) -> usize {
    ((addr >> (12 + 9 * (level as u32 - 1))) & 0x1ff) as usize
}

/// Bytes one entry at `level` covers.
const fn level_span(level: u8) -> u64 {
    PAGE_SIZE << (9 * (level as u32 - 1))
}

bitflags! {
    /// What a [`PageTableBuilder`] mapping allows. Reads are always allowed.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct MapFlags: u32 {
        /// Writes allowed.
        const WRITABLE = 1 << 0;
        /// User-mode accesses allowed.
        const USER = 1 << 1;
        /// Instruction fetches allowed (otherwise XD is set).
        const EXECUTABLE = 1 << 2;
        /// The translation is global.
        const GLOBAL = 1 << 3;
        /// Uncacheable, for MMIO.
        const UNCACHED = 1 << 4;
    }
}

impl MapFlags {
    fn leaf(self, huge: bool) -> PteFlags {
        let mut f = PteFlags::PRESENT;
        f.set(PteFlags::WRITABLE, self.contains(Self::WRITABLE));
        f.set(PteFlags::USER, self.contains(Self::USER));
        f.set(PteFlags::GLOBAL, self.contains(Self::GLOBAL));
        // PCD + PWT with PAT = 0 selects PAT entry 3, which is UC in the power-on PAT (SDM 11.12.4).
        f.set(
            PteFlags::CACHE_DISABLE | PteFlags::WRITE_THROUGH,
            self.contains(Self::UNCACHED),
        );
        f.set(PteFlags::NO_EXECUTE, !self.contains(Self::EXECUTABLE));
        f.set(PteFlags::HUGE, huge);
        f
    }
}

/// Where a [`PageTableBuilder`] gets and edits its table frames.
pub trait TableAlloc {
    /// A zeroed 4 KiB frame for a table.
    fn alloc_zeroed(&mut self) -> Option<Gpa>;
    /// The table stored in the frame at `gpa`, if this allocator can reach it.
    fn table_mut(&mut self, gpa: Gpa) -> Option<&mut PageTable>;
}

/// Why the builder refused a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildError {
    /// The allocator has no frame left for a table. Pages mapped before this point stay mapped.
    OutOfMemory,
    /// An address or the length is not a multiple of 4 KiB.
    Unaligned,
    /// The range touches a non-canonical address.
    NonCanonical(Gva),
    /// This address in the range is already mapped; nothing was changed.
    AlreadyMapped(Gva),
    /// The allocator cannot reach the table at this address.
    BadTable(Gpa),
    /// The range wraps around or the physical end is beyond 52 bits.
    Overflow,
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OutOfMemory => f.write_str("no frame left for a page table"),
            Self::Unaligned => f.write_str("address or length not 4 KiB aligned"),
            Self::NonCanonical(gva) => write!(f, "{gva} is not canonical"),
            Self::AlreadyMapped(gva) => write!(f, "{gva} is already mapped"),
            Self::BadTable(gpa) => write!(f, "page table at {gpa} is not reachable"),
            Self::Overflow => f.write_str("range overflows the address space"),
        }
    }
}

/// Writes 4-level page tables rooted at one PML4 (SDM 4.5).
///
/// Intermediate entries allow everything (P, R/W, U/S, no XD) so that the leaf alone decides the rights.
#[derive(Debug)]
pub struct PageTableBuilder {
    root: Gpa,
}

impl PageTableBuilder {
    /// Allocates an empty PML4.
    pub fn new(alloc: &mut impl TableAlloc) -> Result<Self, BuildError> {
        let root = alloc.alloc_zeroed().ok_or(BuildError::OutOfMemory)?;
        Ok(Self { root })
    }

    /// Continues building on the existing PML4 at `root`.
    #[must_use]
    pub const fn from_root(root: Gpa) -> Self {
        Self { root }
    }

    /// The PML4 address.
    #[must_use]
    pub const fn root(&self) -> Gpa {
        self.root
    }

    /// CR3 for these tables, PCID 0.
    #[must_use]
    pub const fn cr3(&self) -> Cr3 {
        Cr3::from_root(self.root)
    }

    /// Maps [gva, gva+len) to [gpa, gpa+len); uses 1 GiB or 2 MiB pages wherever both addresses are
    /// aligned and the rest of the range covers the page, else 4 KiB. Errors on overlap with an
    /// existing mapping, before changing anything.
    pub fn map(
        &mut self,
        alloc: &mut impl TableAlloc,
        gva: Gva,
        gpa: Gpa,
        len: u64,
        flags: MapFlags,
    ) -> Result<(), BuildError> {
        self.map_with(alloc, gva, gpa, len, flags, PageSize::Size1G)
    }

    /// [`map`](Self::map) with pages no larger than `largest`, e.g. where a CPU lacks 1 GiB pages or a
    /// range will later need 4 KiB granularity.
    pub fn map_with(
        &mut self,
        alloc: &mut impl TableAlloc,
        gva: Gva,
        gpa: Gpa,
        len: u64,
        flags: MapFlags,
        largest: PageSize,
    ) -> Result<(), BuildError> {
        if !gva.is_aligned(PAGE_SIZE) || !gpa.is_aligned(PAGE_SIZE) || len & (PAGE_SIZE - 1) != 0 {
            return Err(BuildError::Unaligned);
        }
        if len == 0 {
            return Ok(());
        }
        if !gva.is_canonical() {
            return Err(BuildError::NonCanonical(gva));
        }
        let last = gva.checked_add(len - 1).ok_or(BuildError::Overflow)?;
        if !last.is_canonical() || (last.raw() >> 47) != (gva.raw() >> 47) {
            // The first address past the lower half is the first non-canonical one in the range.
            return Err(BuildError::NonCanonical(Gva::new(1 << 47)));
        }
        match gpa.checked_add(len) {
            Some(end) if end.raw() <= 1 << MAX_PHYS_ADDR_BITS => {}
            _ => return Err(BuildError::Overflow),
        }
        let start = gva.raw() & linear_mask();
        if let Some(hit) = self.first_mapped(alloc, self.root, 4, 0, start, start + len)? {
            return Err(BuildError::AlreadyMapped(sign_extend(hit)));
        }
        let mut off = 0;
        while off < len {
            let (va, pa, rest) = (start + off, gpa.raw() + off, len - off);
            let mut placed = None;
            for size in [PageSize::Size1G, PageSize::Size2M, PageSize::Size4K] {
                let mask = size.bytes() - 1;
                let fits = size <= largest && va & mask == 0 && pa & mask == 0;
                if fits
                    && rest >= size.bytes()
                    && self.place(alloc, va, Gpa::new(pa), size, flags)?
                {
                    placed = Some(size);
                    break;
                }
            }
            // A 4 KiB slot is free after `first_mapped`, so `place` always succeeds for it.
            off += placed.map_or(PAGE_SIZE, PageSize::bytes);
        }
        Ok(())
    }

    /// Writes one leaf of `size` for `va`, creating tables on the way. `Ok(false)` if the slot already
    /// holds a table, so the caller should use smaller pages there.
    fn place(
        &mut self,
        alloc: &mut impl TableAlloc,
        va: u64,
        pa: Gpa,
        size: PageSize,
        flags: MapFlags,
    ) -> Result<bool, BuildError> {
        let mut table = self.root;
        let leaf_level = size.level();
        for level in (leaf_level + 1..=4).rev() {
            let i = index(va, level);
            let entry = table_entry(alloc, table, i)?;
            table = if entry.is_present() {
                if level <= 3 && entry.is_huge() {
                    return Err(BuildError::AlreadyMapped(sign_extend(va)));
                }
                entry.addr()
            } else {
                let next = alloc.alloc_zeroed().ok_or(BuildError::OutOfMemory)?;
                let link = PteFlags::PRESENT | PteFlags::WRITABLE | PteFlags::USER;
                set_entry(alloc, table, i, PageTableEntry::new(next, link))?;
                next
            };
        }
        let i = index(va, leaf_level);
        let entry = table_entry(alloc, table, i)?;
        if entry.is_present() {
            if leaf_level > 1 && !entry.is_huge() {
                return Ok(false);
            }
            return Err(BuildError::AlreadyMapped(sign_extend(va)));
        }
        let leaf = PageTableEntry::new(pa, flags.leaf(leaf_level > 1));
        set_entry(alloc, table, i, leaf)?;
        Ok(true)
    }

    /// The lowest address in `[start, end)` (48-bit linear) that a leaf under `table` already maps.
    fn first_mapped(
        &self,
        alloc: &mut impl TableAlloc,
        table: Gpa,
        level: u8,
        table_base: u64,
        start: u64,
        end: u64,
    ) -> Result<Option<u64>, BuildError> {
        let span = level_span(level);
        let first = ((start - table_base) / span) as usize;
        let last = ((end - 1 - table_base) / span) as usize;
        for i in first..=last {
            let entry = table_entry(alloc, table, i)?;
            if !entry.is_present() {
                continue;
            }
            let entry_base = table_base + i as u64 * span;
            let lo = start.max(entry_base);
            if level == 1 || (level <= 3 && entry.is_huge()) {
                return Ok(Some(lo));
            }
            let hi = end.min(entry_base + span);
            if let Some(hit) =
                self.first_mapped(alloc, entry.addr(), level - 1, entry_base, lo, hi)?
            {
                return Ok(Some(hit));
            }
        }
        Ok(None)
    }
}

fn table_entry(
    alloc: &mut impl TableAlloc,
    table: Gpa,
    i: usize,
) -> Result<PageTableEntry, BuildError> {
    Ok(alloc
        .table_mut(table)
        .ok_or(BuildError::BadTable(table))?
        .entries[i])
}

fn set_entry(
    alloc: &mut impl TableAlloc,
    table: Gpa,
    i: usize,
    entry: PageTableEntry,
) -> Result<(), BuildError> {
    alloc
        .table_mut(table)
        .ok_or(BuildError::BadTable(table))?
        .entries[i] = entry;
    Ok(())
}

const fn linear_mask() -> u64 {
    (1 << LINEAR_BITS) - 1
}

/// The canonical form of a 48-bit linear address.
const fn sign_extend(va: u64) -> Gva {
    Gva::new((((va << 16) as i64) >> 16) as u64)
}

#[cfg(test)]
mod tests {
    extern crate std;

    use std::{boxed::Box, collections::HashMap, vec};

    use super::*;

    /// Guest-physical memory made of page tables and data pages, with a cap on table frames.
    struct TestMem {
        tables: HashMap<u64, Box<PageTable>>,
        data: HashMap<u64, Box<[u8; 4096]>>,
        next: u64,
        table_limit: usize,
    }

    impl TestMem {
        fn new() -> Self {
            Self {
                tables: HashMap::new(),
                data: HashMap::new(),
                next: 0x1_0000_0000,
                table_limit: usize::MAX,
            }
        }

        fn fill(&mut self, gpa: u64, byte_base: u8) {
            let mut page = Box::new([0u8; 4096]);
            for (i, b) in page.iter_mut().enumerate() {
                *b = byte_base.wrapping_add(i as u8);
            }
            self.data.insert(gpa, page);
        }

        /// The entry at `level` on the way to `gva`, assuming the walk reaches that level.
        fn entry_mut(&mut self, root: Gpa, gva: u64, level: u8) -> &mut PageTableEntry {
            let mut table = root;
            for l in (level + 1..=4).rev() {
                table = self.tables[&table.raw()].entries[index(gva, l)].addr();
            }
            &mut self.tables.get_mut(&table.raw()).unwrap().entries[index(gva, level)]
        }
    }

    impl TableAlloc for TestMem {
        fn alloc_zeroed(&mut self) -> Option<Gpa> {
            if self.tables.len() >= self.table_limit {
                return None;
            }
            let gpa = self.next;
            self.next += PAGE_SIZE;
            self.tables.insert(gpa, Box::new(PageTable::new()));
            Some(Gpa::new(gpa))
        }

        fn table_mut(&mut self, gpa: Gpa) -> Option<&mut PageTable> {
            self.tables.get_mut(&gpa.raw()).map(|t| &mut **t)
        }
    }

    impl GuestPhysRead for TestMem {
        fn read_bytes(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), PhysReadError> {
            for (i, b) in buf.iter_mut().enumerate() {
                let addr = gpa.raw() + i as u64;
                let (page, off) = (addr & !0xfff, (addr & 0xfff) as usize);
                *b = if let Some(t) = self.tables.get(&page) {
                    t.entries[off / 8].raw().to_le_bytes()[off % 8]
                } else if let Some(d) = self.data.get(&page) {
                    d[off]
                } else {
                    return Err(PhysReadError {
                        gpa: Gpa::new(addr),
                    });
                };
            }
            Ok(())
        }
    }

    const RWX: MapFlags = MapFlags::WRITABLE.union(MapFlags::EXECUTABLE);

    fn setup() -> (TestMem, PageTableBuilder) {
        let mut mem = TestMem::new();
        let b = PageTableBuilder::new(&mut mem).unwrap();
        (mem, b)
    }

    #[test]
    fn entry_encoding() {
        let e = PageTableEntry::new(
            Gpa::new(0x1234_5678_9abc),
            PteFlags::PRESENT | PteFlags::NO_EXECUTE,
        );
        assert_eq!(e.raw(), 0x8000_1234_5678_9001);
        assert_eq!(e.addr(), Gpa::new(0x1234_5678_9000));
        assert!(e.is_present() && !e.is_huge());
        // For a PS leaf bit 12 is PAT, not address.
        let large = PageTableEntry::from_raw(0x4000_1000 | PteFlags::HUGE.bits() | 1);
        assert_eq!(large.addr(), Gpa::new(0x4000_0000));
        assert_eq!(large.flags(), PteFlags::PRESENT | PteFlags::HUGE);
    }

    #[test]
    fn cr3_ignores_pcid_for_root() {
        let cr3 = Cr3::new(0x8000_0000_0123_4005);
        assert_eq!(cr3.root(), Gpa::new(0x123_4000));
        assert_eq!(cr3.pcid(), 5);
        assert_eq!(PageSize::Size2M.bytes(), LARGE_PAGE_SIZE);

        let (mut mem, mut b) = setup();
        b.map(&mut mem, Gva::new(0x40_0000), Gpa::new(0x9000), 0x1000, RWX)
            .unwrap();
        let with_pcid = Cr3::new(b.root().raw() | 0xabc);
        assert_eq!(
            translate(&mem, with_pcid, Gva::new(0x40_0123)).unwrap().gpa,
            Gpa::new(0x9123)
        );
    }

    #[test]
    fn round_trip_4k() {
        let (mut mem, mut b) = setup();
        b.map(
            &mut mem,
            Gva::new(0x40_0000),
            Gpa::new(0x20_0000),
            0x3000,
            RWX,
        )
        .unwrap();
        for page in 0..3u64 {
            let t = translate(&mem, b.cr3(), Gva::new(0x40_0000 + page * 0x1000 + 0x18)).unwrap();
            assert_eq!(t.gpa, Gpa::new(0x20_0000 + page * 0x1000 + 0x18));
            assert_eq!(t.size, PageSize::Size4K);
            assert!(t.writable && t.executable && !t.user);
        }
        // PML4, PDPT, PD, PT: 2 MiB alignment of both sides is not enough without 2 MiB of length.
        assert_eq!(mem.tables.len(), 4);
    }

    #[test]
    fn round_trip_2m_and_mixed() {
        let (mut mem, mut b) = setup();
        b.map(
            &mut mem,
            Gva::new(0x1f_f000),
            Gpa::new(0x3f_f000),
            0x20_2000,
            MapFlags::empty(),
        )
        .unwrap();
        let cr3 = b.cr3();
        let t = translate(&mem, cr3, Gva::new(0x1f_f010)).unwrap();
        assert_eq!((t.gpa, t.size), (Gpa::new(0x3f_f010), PageSize::Size4K));
        let t = translate(&mem, cr3, Gva::new(0x2a_bcde)).unwrap();
        assert_eq!((t.gpa, t.size), (Gpa::new(0x4a_bcde), PageSize::Size2M));
        assert!(!t.writable && !t.executable && !t.user);
        let t = translate(&mem, cr3, Gva::new(0x40_0fff)).unwrap();
        assert_eq!((t.gpa, t.size), (Gpa::new(0x60_0fff), PageSize::Size4K));
        assert!(matches!(
            translate(&mem, cr3, Gva::new(0x40_1000)),
            Err(WalkError::NotPresent { level: 1, .. })
        ));
    }

    #[test]
    fn round_trip_1g_in_upper_half() {
        let (mut mem, mut b) = setup();
        let base = 0xffff_8000_0000_0000;
        b.map(
            &mut mem,
            Gva::new(base),
            Gpa::new(0x4000_0000),
            HUGE_PAGE_SIZE,
            MapFlags::GLOBAL,
        )
        .unwrap();
        let t = translate(&mem, b.cr3(), Gva::new(base + 0x1234_5678)).unwrap();
        assert_eq!((t.gpa, t.size), (Gpa::new(0x5234_5678), PageSize::Size1G));
        assert!(mem
            .entry_mut(b.root(), base, 3)
            .flags()
            .contains(PteFlags::GLOBAL | PteFlags::HUGE));
        // PML4 and PDPT only.
        assert_eq!(mem.tables.len(), 2);
    }

    #[test]
    fn largest_page_size_is_honoured() {
        let (mut mem, mut b) = setup();
        let len = 2 * LARGE_PAGE_SIZE;
        b.map_with(
            &mut mem,
            Gva::new(0),
            Gpa::new(0),
            len,
            RWX,
            PageSize::Size4K,
        )
        .unwrap();
        assert_eq!(
            translate(&mem, b.cr3(), Gva::new(0x30_0000)).unwrap().size,
            PageSize::Size4K
        );
        b.map_with(
            &mut mem,
            Gva::new(HUGE_PAGE_SIZE),
            Gpa::new(0),
            HUGE_PAGE_SIZE,
            RWX,
            PageSize::Size2M,
        )
        .unwrap();
        assert_eq!(
            translate(&mem, b.cr3(), Gva::new(HUGE_PAGE_SIZE))
                .unwrap()
                .size,
            PageSize::Size2M
        );
    }

    #[test]
    fn huge_page_falls_back_when_slot_holds_a_table() {
        let (mut mem, mut b) = setup();
        // The PD for [0, 1 GiB) exists because of this page, so [2 MiB, 4 MiB) cannot be one PDPTE...
        b.map(
            &mut mem,
            Gva::new(0x3fe0_0000),
            Gpa::new(0),
            LARGE_PAGE_SIZE,
            RWX,
        )
        .unwrap();
        // ...and a 1 GiB request over the rest falls back to 2 MiB pages in that PD.
        b.map(
            &mut mem,
            Gva::new(0),
            Gpa::new(0x4000_0000),
            0x3fe0_0000,
            RWX,
        )
        .unwrap();
        let t = translate(&mem, b.cr3(), Gva::new(0x1234_5678)).unwrap();
        assert_eq!((t.gpa, t.size), (Gpa::new(0x5234_5678), PageSize::Size2M));
    }

    #[test]
    fn permissions_accumulate_over_levels() {
        let (mut mem, mut b) = setup();
        let va = 0x7f00_0000_0000;
        b.map(
            &mut mem,
            Gva::new(va),
            Gpa::new(0x5000),
            0x1000,
            RWX | MapFlags::USER,
        )
        .unwrap();
        let root = b.root();
        let cr3 = b.cr3();
        let t = translate(&mem, cr3, Gva::new(va)).unwrap();
        assert!(t.writable && t.user && t.executable);

        let pdpte = mem.entry_mut(root, va, 3);
        *pdpte = PageTableEntry::from_raw(pdpte.raw() & !PteFlags::WRITABLE.bits());
        let pde = mem.entry_mut(root, va, 2);
        *pde = PageTableEntry::from_raw(pde.raw() | PteFlags::NO_EXECUTE.bits());
        let t = translate(&mem, cr3, Gva::new(va)).unwrap();
        assert!(!t.writable && t.user && !t.executable);

        let gva = Gva::new(va + 8);
        assert!(translate_checked(&mem, cr3, gva, Access::READ).is_ok());
        assert!(translate_checked(&mem, cr3, gva, Access::READ.from_user()).is_ok());
        assert_eq!(
            translate_checked(&mem, cr3, gva, Access::WRITE),
            Err(WalkError::Protection { gva })
        );
        assert_eq!(
            translate_checked(&mem, cr3, gva, Access::EXEC),
            Err(WalkError::Protection { gva })
        );

        let pml4e = mem.entry_mut(root, va, 4);
        *pml4e = PageTableEntry::from_raw(pml4e.raw() & !PteFlags::USER.bits());
        assert!(!translate(&mem, cr3, gva).unwrap().user);
        let user_read = Access::READ.from_user();
        assert_eq!(
            translate_checked(&mem, cr3, gva, user_read),
            Err(WalkError::Protection { gva })
        );
    }

    #[test]
    fn non_canonical_addresses() {
        let (mut mem, mut b) = setup();
        let bad = Gva::new(0x8000_0000_0000);
        assert_eq!(
            translate(&mem, b.cr3(), bad),
            Err(WalkError::NonCanonical(bad))
        );
        assert_eq!(
            b.map(&mut mem, bad, Gpa::new(0), 0x1000, RWX),
            Err(BuildError::NonCanonical(bad))
        );
        // Starts canonical, runs into the hole.
        let top = Gva::new(0x7fff_ffff_f000);
        assert_eq!(
            b.map(&mut mem, top, Gpa::new(0), 0x2000, RWX),
            Err(BuildError::NonCanonical(bad))
        );
        let mut buf = [0u8; 2];
        b.map(&mut mem, top, Gpa::new(0x7000), 0x1000, RWX).unwrap();
        mem.fill(0x7000, 0);
        assert_eq!(
            read_virt(&mem, b.cr3(), Gva::new(0x7fff_ffff_ffff), &mut buf),
            Err(WalkError::NonCanonical(bad))
        );
    }

    #[test]
    fn not_present_reports_the_level() {
        let (mut mem, mut b) = setup();
        let cr3 = b.cr3();
        let gva = Gva::new(0x1000);
        assert_eq!(
            translate(&mem, cr3, gva),
            Err(WalkError::NotPresent { gva, level: 4 })
        );
        b.map(
            &mut mem,
            Gva::new(0x20_0000),
            Gpa::new(0x20_0000),
            LARGE_PAGE_SIZE,
            RWX,
        )
        .unwrap();
        assert_eq!(
            translate(&mem, cr3, gva),
            Err(WalkError::NotPresent { gva, level: 2 })
        );
        let far = Gva::new(0x40_0000_0000);
        assert_eq!(
            translate(&mem, cr3, far),
            Err(WalkError::NotPresent { gva: far, level: 3 })
        );
    }

    #[test]
    fn entry_addresses_follow_the_tables_down_to_the_level_asked() {
        let (mut mem, mut b) = setup();
        let root = b.root();
        // A 4 KiB page and a 2 MiB page, in different page directories' reach.
        b.map_with(
            &mut mem,
            Gva::new(0x40_1000),
            Gpa::new(0x9000),
            PAGE_SIZE,
            RWX,
            PageSize::Size4K,
        )
        .unwrap();
        b.map(
            &mut mem,
            Gva::new(0x20_0000),
            Gpa::new(0x20_0000),
            LARGE_PAGE_SIZE,
            RWX,
        )
        .unwrap();
        let small = Gva::new(0x40_1000);
        for level in 1..=4u8 {
            let at = entry_address(&mem, root, small, level).unwrap();
            let expected = mem.entry_mut(root, small.raw(), level) as *mut PageTableEntry;
            let table = mem.tables.values().find(|t| {
                let p = t.entries.as_ptr() as usize;
                (p..p + 4096).contains(&(expected as usize))
            });
            assert!(table.is_some());
            assert_eq!(at.raw() % 8, 0);
            assert_eq!(
                at.page_offset(),
                index(small.raw(), level) as u64 * 8,
                "level {level}"
            );
        }
        let large = Gva::new(0x20_0000);
        assert!(entry_address(&mem, root, large, 2).is_ok());
        assert_eq!(
            entry_address(&mem, root, large, 1),
            Err(WalkError::LargePage {
                gva: large,
                level: 2
            })
        );
        let far = Gva::new(0x40_0000_0000);
        assert_eq!(
            entry_address(&mem, root, far, 2),
            Err(WalkError::NotPresent { gva: far, level: 3 })
        );
        let bad = Gva::new(0x8000_0000_0000);
        assert_eq!(
            entry_address(&mem, root, bad, 4),
            Err(WalkError::NonCanonical(bad))
        );
    }

    #[test]
    fn reserved_bits_fault() {
        let (mut mem, mut b) = setup();
        b.map(
            &mut mem,
            Gva::new(0),
            Gpa::new(0x20_0000),
            LARGE_PAGE_SIZE,
            RWX,
        )
        .unwrap();
        b.map(
            &mut mem,
            Gva::new(0x4000_0000),
            Gpa::new(0x1000),
            0x1000,
            RWX,
        )
        .unwrap();
        let (root, cr3) = (b.root(), b.cr3());
        let g0 = Gva::new(0x10);
        let g1 = Gva::new(0x4000_0010);

        // Bit 13 sits between PAT and the frame address of a 2 MiB leaf.
        let pde = mem.entry_mut(root, 0, 2);
        *pde = PageTableEntry::from_raw(pde.raw() | 1 << 13);
        assert_eq!(
            translate(&mem, cr3, g0),
            Err(WalkError::ReservedBits { gva: g0, level: 2 })
        );
        // PAT of a 2 MiB leaf is fine.
        *mem.entry_mut(root, 0, 2) = PageTableEntry::from_raw(pde_raw_with_pat());
        assert_eq!(translate(&mem, cr3, g0).unwrap().gpa, Gpa::new(0x20_0010));

        // Address bits above MAXPHYADDR are reserved only when the caller says MAXPHYADDR is small.
        let pte = mem.entry_mut(root, g1.raw(), 1);
        *pte = PageTableEntry::from_raw(pte.raw() | 1 << 45);
        assert_eq!(
            translate(&mem, cr3, g1).unwrap().gpa,
            Gpa::new(0x2000_0000_1010)
        );
        assert_eq!(
            translate_with_maxphyaddr(&mem, cr3, g1, 40),
            Err(WalkError::ReservedBits { gva: g1, level: 1 })
        );

        // PS in a PML4E is reserved.
        let pml4e = mem.entry_mut(root, 0, 4);
        *pml4e = PageTableEntry::from_raw(pml4e.raw() | PteFlags::HUGE.bits());
        assert_eq!(
            translate(&mem, cr3, g0),
            Err(WalkError::ReservedBits { gva: g0, level: 4 })
        );
    }

    fn pde_raw_with_pat() -> u64 {
        PageTableEntry::new(
            Gpa::new(0x20_0000),
            MapFlags::WRITABLE.union(MapFlags::EXECUTABLE).leaf(true),
        )
        .raw()
            | LARGE_PAT
    }

    #[test]
    fn unreadable_tables_report_the_address() {
        let mem = TestMem::new();
        let e = translate(&mem, Cr3::new(0x5000), Gva::new(0x100_0000_0000)).unwrap_err();
        assert_eq!(
            e,
            WalkError::Phys(PhysReadError {
                gpa: Gpa::new(0x5000 + 2 * 8)
            })
        );
    }

    #[test]
    fn read_virt_crosses_pages() {
        let (mut mem, mut b) = setup();
        b.map(&mut mem, Gva::new(0x1000), Gpa::new(0x9000), 0x1000, RWX)
            .unwrap();
        b.map(&mut mem, Gva::new(0x2000), Gpa::new(0x5000), 0x1000, RWX)
            .unwrap();
        mem.fill(0x9000, 0);
        mem.fill(0x5000, 100);
        let mut buf = [0u8; 16];
        read_virt(&mem, b.cr3(), Gva::new(0x1ff8), &mut buf).unwrap();
        let want: std::vec::Vec<u8> = (0xf8..=0xffu8).chain(100..108).collect();
        assert_eq!(buf[..], want[..]);

        let mut long = vec![0u8; 0x1001];
        let gva = Gva::new(0x3000);
        assert_eq!(
            read_virt(&mem, b.cr3(), Gva::new(0x2000), &mut long),
            Err(WalkError::NotPresent { gva, level: 1 })
        );
        read_virt(&mem, b.cr3(), Gva::new(0x1234), &mut []).unwrap();
    }

    #[test]
    fn overlap_is_refused_without_changes() {
        let (mut mem, mut b) = setup();
        b.map(
            &mut mem,
            Gva::new(0x20_0000),
            Gpa::new(0),
            LARGE_PAGE_SIZE,
            RWX,
        )
        .unwrap();
        b.map(&mut mem, Gva::new(0x50_0000), Gpa::new(0), 0x1000, RWX)
            .unwrap();
        let tables = mem.tables.len();
        let r = b.map(&mut mem, Gva::new(0x1f_0000), Gpa::new(0), 0x2_0000, RWX);
        assert_eq!(r, Err(BuildError::AlreadyMapped(Gva::new(0x20_0000))));
        let r = b.map(
            &mut mem,
            Gva::new(0x40_0000),
            Gpa::new(0),
            LARGE_PAGE_SIZE,
            RWX,
        );
        assert_eq!(r, Err(BuildError::AlreadyMapped(Gva::new(0x50_0000))));
        assert_eq!(mem.tables.len(), tables);
        assert!(matches!(
            translate(&mem, b.cr3(), Gva::new(0x1f_0000)),
            Err(WalkError::NotPresent { .. })
        ));
        assert!(matches!(
            translate(&mem, b.cr3(), Gva::new(0x40_0000)),
            Err(WalkError::NotPresent { .. })
        ));
        // The AlreadyMapped address comes back canonical in the upper half too.
        let hi = Gva::new(0xffff_ffff_8000_0000);
        b.map(&mut mem, hi, Gpa::new(0), 0x1000, RWX).unwrap();
        assert_eq!(
            b.map(&mut mem, hi, Gpa::new(0), 0x1000, RWX),
            Err(BuildError::AlreadyMapped(hi))
        );
    }

    #[test]
    fn bad_input_and_exhaustion() {
        let (mut mem, mut b) = setup();
        let u = Err(BuildError::Unaligned);
        assert_eq!(b.map(&mut mem, Gva::new(0x10), Gpa::new(0), 0x1000, RWX), u);
        assert_eq!(b.map(&mut mem, Gva::new(0), Gpa::new(0x10), 0x1000, RWX), u);
        assert_eq!(b.map(&mut mem, Gva::new(0), Gpa::new(0), 0x10, RWX), u);
        assert_eq!(b.map(&mut mem, Gva::new(0), Gpa::new(0), 0, RWX), Ok(()));
        let top = Gpa::new((1 << 52) - 0x1000);
        assert_eq!(
            b.map(&mut mem, Gva::new(0), top, 0x2000, RWX),
            Err(BuildError::Overflow)
        );
        let wrap = Gva::new(0xffff_ffff_ffff_f000);
        assert_eq!(
            b.map(&mut mem, wrap, Gpa::new(0), 0x2000, RWX),
            Err(BuildError::Overflow)
        );

        mem.table_limit = 2;
        assert_eq!(
            b.map(&mut mem, Gva::new(0), Gpa::new(0), 0x1000, RWX),
            Err(BuildError::OutOfMemory)
        );
        let mut empty = TestMem::new();
        empty.table_limit = 0;
        assert_eq!(
            PageTableBuilder::new(&mut empty).unwrap_err(),
            BuildError::OutOfMemory
        );

        let mut stray = PageTableBuilder::from_root(Gpa::new(0xdead_0000));
        let r = stray.map(&mut mem, Gva::new(0), Gpa::new(0), 0x1000, RWX);
        assert_eq!(r, Err(BuildError::BadTable(Gpa::new(0xdead_0000))));
    }

    #[test]
    fn uncached_leaf_selects_uc() {
        let (mut mem, mut b) = setup();
        b.map(
            &mut mem,
            Gva::new(0xfee0_0000),
            Gpa::new(0xfee0_0000),
            0x1000,
            MapFlags::UNCACHED,
        )
        .unwrap();
        let f = mem.entry_mut(b.root(), 0xfee0_0000, 1).flags();
        assert!(
            f.contains(PteFlags::CACHE_DISABLE | PteFlags::WRITE_THROUGH | PteFlags::NO_EXECUTE)
        );
    }

    #[test]
    fn errors_display() {
        let s = std::format!(
            "{}",
            WalkError::NotPresent {
                gva: Gva::new(0x1000),
                level: 2
            }
        );
        assert_eq!(s, "0x1000: level-2 entry not present");
        assert_eq!(
            std::format!("{}", BuildError::AlreadyMapped(Gva::new(0x2000))),
            "0x2000 is already mapped"
        );
    }
}
