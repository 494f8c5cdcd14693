//! Reads of guest memory that never trust a guest pointer: bounded in size, translated through the
//! guest's own page tables in software, and failing with an error rather than a fault.

use core::cell::RefCell;
use core::fmt;

use ihmi_addr::{Gpa, Gva, PAGE_SIZE};
use ihmi_paging::{Cr3, GuestPhysRead, PhysReadError, WalkError};

/// Longest single read, so no request can make the monitor copy without bound.
pub const MAX_READ: usize = 4096;

/// The most words [`Introspector::each_u64`] hands on: the largest table the monitor holds (KVM's
/// exit handlers). Outside the windows it reads through a buffer of this size, or of
/// 16 words for a short range (a chunk of `kvm_x86_ops`), zeroed at every call.
pub const EACH_U64_MAX: usize = ihmi_abi::monitor::KVM_EXIT_HANDLERS_MAX;

/// Up to this many words (a chunk of `kvm_x86_ops`), [`Introspector::each_u64`]'s buffer is small.
const SMALL_WORDS: usize = crate::KVM_X86_OPS_CHUNK;

/// Why a read of guest memory failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IntrospectError {
    /// More than [`MAX_READ`] bytes were asked for.
    TooLong(usize),
    /// The guest's page tables do not map the address (or map it through a bad entry).
    Walk(WalkError),
    /// The address is not guest RAM.
    Phys(PhysReadError),
    /// A structure address without the alignment the structure has.
    Misaligned(Gva),
    /// An offset from a guest pointer ran past the top of the address space.
    Overflow(Gva),
    /// A pointer that must be a kernel (upper-half) address is not.
    NotKernel(Gva),
    /// A string at this address has no terminator within the length the caller allows.
    Unterminated(Gva),
}

impl From<WalkError> for IntrospectError {
    fn from(e: WalkError) -> Self {
        Self::Walk(e)
    }
}

impl From<PhysReadError> for IntrospectError {
    fn from(e: PhysReadError) -> Self {
        Self::Phys(e)
    }
}

impl fmt::Display for IntrospectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLong(n) => write!(f, "read of {n} bytes is over the {MAX_READ}-byte limit"),
            Self::Walk(e) => e.fmt(f),
            Self::Phys(e) => e.fmt(f),
            Self::Misaligned(gva) => write!(f, "{gva} is misaligned for its structure"),
            Self::Overflow(gva) => write!(f, "offset from {gva} overflows"),
            Self::NotKernel(gva) => write!(f, "{gva} is not a kernel address"),
            Self::Unterminated(gva) => write!(f, "the string at {gva} is not terminated"),
        }
    }
}

/// Entries of a [`TranslationCache`].
pub const TRANSLATION_CACHE_LEN: usize = 64;

/// Remembered translations of kernel (upper-half) pages, kept across invocations: the monitor's
/// software TLB. Only for a kernel whose upper half is one mapping shared by every address space and
/// does not move under the structures the monitor reads (Linux: every page table copies the kernel's
/// top-level entries, and task structures live in the direct map). A stale entry could mislead the
/// monitor only about data the guest kernel controls anyway, and every read through it is still
/// checked to be guest RAM by the reader underneath.
#[derive(Clone, Debug)]
pub struct TranslationCache {
    /// (guest-virtual page | 1, guest-physical page); 0 is an empty slot.
    entries: [(u64, u64); TRANSLATION_CACHE_LEN],
    hits: u64,
    misses: u64,
}

impl Default for TranslationCache {
    fn default() -> Self {
        Self::new()
    }
}

impl TranslationCache {
    /// An empty cache.
    #[must_use]
    pub const fn new() -> Self {
        Self {
            entries: [(0, 0); TRANSLATION_CACHE_LEN],
            hits: 0,
            misses: 0,
        }
    }

    fn slot(page: u64) -> usize {
        ((page >> 12) as usize) % TRANSLATION_CACHE_LEN
    }

    fn lookup(&mut self, page: u64) -> Option<u64> {
        let (tag, gpa) = self.entries[Self::slot(page)];
        if tag == page | 1 {
            self.hits += 1;
            Some(gpa)
        } else {
            self.misses += 1;
            None
        }
    }

    fn insert(&mut self, page: u64, gpa_page: u64) {
        self.entries[Self::slot(page)] = (page | 1, gpa_page);
    }

    /// Lookups answered and missed so far.
    #[must_use]
    pub const fn stats(&self) -> (u64, u64) {
        (self.hits, self.misses)
    }
}

/// One linear mapping of a kernel: guest-virtual `[start, start + len)` is guest-physical
/// `[gpa, gpa + len)`. Empty (`len` 0) matches nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinearWindow {
    pub start: u64,
    pub len: u64,
    pub gpa: u64,
}

impl LinearWindow {
    /// Where `n` bytes at `gva` are, if all of them are in the window.
    #[inline(always)]
    const fn gpa_of(&self, gva: u64, n: u64) -> Option<u64> {
        let off = gva.wrapping_sub(self.start);
        if off < self.len && n <= self.len - off {
            Some(self.gpa + off)
        } else {
            None
        }
    }
}

/// Guest RAM by 64 KiB granule, for a reader's quick check that a read is RAM: bit `g` is set when
/// all of `[g << GRANULE_SHIFT, (g + 1) << GRANULE_SHIFT)` is RAM (so, for the monitor, none of it
/// is a monitor or L0 frame). A read in a granule RAM fills only in part, or above what the bitmap
/// covers ([`RamGranules::COVERS`]), is not held here and must be checked against the ranges
/// themselves; this only makes the common case one bit test.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamGranules([u64; GRANULE_WORDS]);

const GRANULE_SHIFT: u32 = 16;
/// 4 GiB in 64 KiB granules: an 8 KiB bitmap.
const GRANULE_WORDS: usize = 1024;
const GRANULES: u64 = GRANULE_WORDS as u64 * 64;

impl RamGranules {
    /// No granule: every read takes the slow check.
    pub const EMPTY: Self = Self([0; GRANULE_WORDS]);
    /// Bytes of guest-physical memory the bitmap describes, from 0.
    pub const COVERS: u64 = GRANULES << GRANULE_SHIFT;

    /// Marks the granules one of the ranges `[start, end)` covers whole (a granule only two of them
    /// cover together is left to the slow check, which also wants one range to hold a read).
    pub fn fill(&mut self, ranges: impl Iterator<Item = (u64, u64)>) {
        for (start, end) in ranges {
            // The granules from the first that starts in the range to the last that ends in it.
            let first = start.div_ceil(1 << GRANULE_SHIFT);
            let last = (end >> GRANULE_SHIFT).min(GRANULES);
            for g in first..last {
                self.0[(g / 64) as usize] |= 1 << (g % 64);
            }
        }
    }

    /// Whether the `len` bytes at `gpa` (none when `len` is 0) lie in one granule that is all RAM.
    #[inline(always)]
    #[must_use]
    pub fn holds(&self, gpa: Gpa, len: u64) -> bool {
        let g = gpa.raw() >> GRANULE_SHIFT;
        let last = gpa.raw().wrapping_add(len.wrapping_sub(1)) >> GRANULE_SHIFT;
        g == last && len != 0 && g < GRANULES && self.0[(g / 64) as usize] >> (g % 64) & 1 != 0
    }
}

/// Where a Linux kernel's linear mappings are, as [`LinearWindows::check`] found them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearHints {
    /// The kernel variable `page_offset_base` (its address): the direct map's start.
    pub page_offset_base: Gva,
    /// The kernel image's mapping, `[_stext, _end)`.
    pub image: [u64; 2],
    /// The end of the highest range of guest RAM: how far the direct map can reach.
    pub ram_top: u64,
}

/// Pages of the kernel image, at most, between two probes of its mapping.
const IMAGE_PROBE_STEP: u64 = 512 * PAGE_SIZE;
/// Probes of the direct map, at most.
const DIRECT_MAP_PROBES: u64 = 64;

/// The kernel's linear mappings the monitor reads without walking the guest's page tables: its direct
/// map of all RAM (`page_offset_base + pa`) and its image mapping (`_stext`.. at one offset from its
/// frames). An address in either is a subtraction and a bounds check away from its frame; every read
/// through it is still checked to be guest RAM by the reader underneath. Only the windows a walk of
/// the guest's own tables confirmed are used, and that walk happens once: a kernel that later remaps a
/// page of its direct map cannot make the monitor read another frame than the one the mapping names,
/// which is where the kernel's own allocator put the object.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinearWindows {
    /// The direct map, then the image mapping.
    pub windows: [LinearWindow; 2],
    /// The check has run (whatever it found).
    pub checked: bool,
}

impl LinearWindows {
    /// No window: every read walks.
    pub const NONE: Self = Self {
        windows: [LinearWindow {
            start: 0,
            len: 0,
            gpa: 0,
        }; 2],
        checked: false,
    };

    /// Finds the windows `hints` describes and keeps each that the guest's own page tables (walked
    /// by `intro`, which must have no windows itself) map as described: its first page must be mapped
    /// there, and so must every probe the tables map at all (the kernel unmaps what it frees of its
    /// image, and its direct map has RAM's holes; a linear read there still reaches only RAM).
    pub fn check<M: GuestPhysRead>(intro: &Introspector<'_, M>, hints: &LinearHints) -> Self {
        let walk = |gva: u64| {
            ihmi_paging::translate(intro.mem, intro.cr3, Gva::new(gva))
                .ok()
                .map(|t| t.gpa.raw())
        };
        // `must` must be mapped there; every probe the tables map at all, too.
        let holds = |w: &LinearWindow, must: u64, probes: &mut dyn Iterator<Item = u64>| {
            if walk(w.start + must) != Some(w.gpa + must) {
                return false;
            }
            for off in probes {
                if walk(w.start + off).is_some_and(|gpa| gpa != w.gpa + off) {
                    return false;
                }
            }
            true
        };
        // The image: `_stext` is page-aligned; probed every 2 MiB and at its last page.
        let [start, end] = hints.image;
        let end = end.saturating_add(PAGE_SIZE - 1) & !(PAGE_SIZE - 1);
        let image = match walk(start) {
            Some(gpa) if start.is_multiple_of(PAGE_SIZE) && start >> 63 == 1 && end > start => {
                let w = LinearWindow {
                    start,
                    len: end - start,
                    gpa,
                };
                let mut probes = (0..w.len)
                    .step_by(IMAGE_PROBE_STEP as usize)
                    .chain([w.len - PAGE_SIZE]);
                holds(&w, 0, &mut probes).then_some(w)
            }
            _ => None,
        };
        // The direct map: where `page_offset_base` says, as far as the top of RAM; probed evenly up
        // to RAM's last page and at the image's first frame.
        let base = intro.read_u64(hints.page_offset_base).unwrap_or(0);
        let top = hints.ram_top & !(PAGE_SIZE - 1);
        let direct = if base.is_multiple_of(PAGE_SIZE)
            && base >> 63 == 1
            && Gva::new(base).is_canonical()
            && top > 0
            && base.checked_add(top).is_some()
        {
            let w = LinearWindow {
                start: base,
                len: top,
                gpa: 0,
            };
            let step = ((top / DIRECT_MAP_PROBES) & !(PAGE_SIZE - 1)).max(PAGE_SIZE);
            let mut probes = (step..=top).step_by(step as usize).map(|o| o - PAGE_SIZE);
            // The kernel's own first frame is RAM the direct map must cover.
            let must = image.map_or(0, |i| i.gpa);
            (must < top && holds(&w, must, &mut probes)).then_some(w)
        } else {
            None
        };
        Self {
            windows: [direct.unwrap_or_default(), image.unwrap_or_default()],
            checked: true,
        }
    }

    /// The windows that held: the direct map, the image mapping.
    #[must_use]
    pub const fn held(&self) -> [bool; 2] {
        [self.windows[0].len != 0, self.windows[1].len != 0]
    }

    /// Where `n` bytes at `gva` are, if one window holds them all.
    #[inline(always)]
    fn gpa_of(&self, gva: u64, n: u64) -> Option<u64> {
        match self.windows[0].gpa_of(gva, n) {
            Some(gpa) => Some(gpa),
            None => self.windows[1].gpa_of(gva, n),
        }
    }
}

/// Guest memory as one address space (one guest CR3) sees it.
#[derive(Debug)]
pub struct Introspector<'m, M> {
    mem: &'m M,
    cr3: Cr3,
    cache: Option<&'m RefCell<TranslationCache>>,
    linear: &'m LinearWindows,
}

impl<'m, M: GuestPhysRead> Introspector<'m, M> {
    /// Reads through `mem` (guest-physical memory) with the guest's page tables at `cr3`.
    pub const fn new(mem: &'m M, cr3: Cr3) -> Self {
        Self {
            mem,
            cr3,
            cache: None,
            linear: &LinearWindows::NONE,
        }
    }

    /// The same, remembering kernel-page translations in `cache` (see [`TranslationCache`]).
    pub const fn with_cache(mem: &'m M, cr3: Cr3, cache: &'m RefCell<TranslationCache>) -> Self {
        Self {
            mem,
            cr3,
            cache: Some(cache),
            linear: &LinearWindows::NONE,
        }
    }

    /// The same, reading addresses in `linear`'s windows without a walk.
    #[must_use]
    pub const fn with_linear(self, linear: &'m LinearWindows) -> Self {
        Self { linear, ..self }
    }

    /// The guest-physical page of the page at `page` (page-aligned), through the cache for kernel
    /// pages when there is one.
    fn page_gpa(&self, page: Gva) -> Result<Gpa, IntrospectError> {
        let kernel = page.raw() >> 63 == 1;
        let cache = self.cache.filter(|_| kernel);
        if let Some(c) = cache {
            if let Some(gpa) = c.borrow_mut().lookup(page.raw()) {
                return Ok(Gpa::new(gpa));
            }
        }
        let t = ihmi_paging::translate(self.mem, self.cr3, page)?;
        let gpa = t.gpa.raw() & !(PAGE_SIZE - 1);
        if let Some(c) = cache {
            c.borrow_mut().insert(page.raw(), gpa);
        }
        Ok(Gpa::new(gpa))
    }

    /// Guest-physical read.
    pub fn read_gpa(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), IntrospectError> {
        if buf.len() > MAX_READ {
            return Err(IntrospectError::TooLong(buf.len()));
        }
        Ok(self.mem.read_bytes(gpa, buf)?)
    }

    /// Where `gva` goes in guest-physical memory.
    pub fn translate(&self, gva: Gva) -> Result<Gpa, IntrospectError> {
        Ok(ihmi_paging::translate(self.mem, self.cr3, gva)?.gpa)
    }

    /// Guest-virtual read: in one linear window, straight from the frames it names; otherwise each
    /// page translated through the guest's own tables (or the cache).
    pub fn read_gva(&self, gva: Gva, buf: &mut [u8]) -> Result<(), IntrospectError> {
        if buf.len() > MAX_READ {
            return Err(IntrospectError::TooLong(buf.len()));
        }
        if let Some(gpa) = self.linear.gpa_of(gva.raw(), buf.len() as u64) {
            return Ok(self.mem.read_bytes(Gpa::new(gpa), buf)?);
        }
        if !gva.is_canonical() {
            return Err(IntrospectError::Walk(WalkError::NonCanonical(gva)));
        }
        let mut done = 0usize;
        while done < buf.len() {
            let at = gva
                .checked_add(done as u64)
                .filter(|a| a.is_canonical())
                .ok_or(IntrospectError::Walk(WalkError::NonCanonical(gva)))?;
            let offset = at.raw() & (PAGE_SIZE - 1);
            let page = self.page_gpa(Gva::new(at.raw() - offset))?;
            let chunk = ((PAGE_SIZE - offset) as usize).min(buf.len() - done);
            self.mem
                .read_bytes(Gpa::new(page.raw() + offset), &mut buf[done..done + chunk])?;
            done += chunk;
        }
        Ok(())
    }

    /// A NUL-terminated string at `gva` into `buf`, a page at most per read so that nothing past the
    /// terminator is touched; returns its length. No terminator within `buf` is an error.
    pub fn read_c_string(&self, gva: Gva, buf: &mut [u8]) -> Result<usize, IntrospectError> {
        let mut len = 0;
        while len < buf.len() {
            let at = gva
                .checked_add(len as u64)
                .ok_or(IntrospectError::Overflow(gva))?;
            let to_page_end = (PAGE_SIZE - (at.raw() & (PAGE_SIZE - 1))) as usize;
            let chunk = to_page_end.min(64).min(buf.len() - len);
            self.read_gva(at, &mut buf[len..len + chunk])?;
            if let Some(nul) = buf[len..len + chunk].iter().position(|&b| b == 0) {
                return Ok(len + nul);
            }
            len += chunk;
        }
        Err(IntrospectError::Unterminated(gva))
    }

    /// Where the `n` bytes at `gva` are, when they are in one page (or one window): a fixed-size read
    /// then needs no copy. `None`: they cross a page outside the windows.
    #[inline(always)]
    fn fixed_gpa(&self, gva: Gva, n: u64) -> Result<Option<Gpa>, IntrospectError> {
        if let Some(gpa) = self.linear.gpa_of(gva.raw(), n) {
            return Ok(Some(Gpa::new(gpa)));
        }
        let offset = gva.raw() & (PAGE_SIZE - 1);
        if offset + n > PAGE_SIZE {
            return Ok(None);
        }
        if !gva.is_canonical() {
            return Err(IntrospectError::Walk(WalkError::NonCanonical(gva)));
        }
        let page = self.page_gpa(Gva::new(gva.raw() - offset))?;
        Ok(Some(Gpa::new(page.raw() + offset)))
    }

    /// A little-endian `u32` at `gva`. In a linear window this is inlined into the caller: the
    /// window's bounds check and the reader's RAM check, then one load.
    #[inline(always)]
    pub fn read_u32(&self, gva: Gva) -> Result<u32, IntrospectError> {
        match self.linear.gpa_of(gva.raw(), 4) {
            Some(gpa) => Ok(self.mem.read_u32(Gpa::new(gpa))?),
            None => self.read_u32_walked(gva),
        }
    }

    /// A little-endian `u64` at `gva` (inlined in a window, as [`Self::read_u32`]).
    #[inline(always)]
    pub fn read_u64(&self, gva: Gva) -> Result<u64, IntrospectError> {
        match self.linear.gpa_of(gva.raw(), 8) {
            Some(gpa) => Ok(self.mem.read_u64(Gpa::new(gpa))?),
            None => self.read_u64_walked(gva),
        }
    }

    /// `N` bytes at `gva` (a fixed-size field, such as a task's name): in a window one fixed-size
    /// copy, inlined; elsewhere through [`Self::read_gva`].
    #[inline(always)]
    pub fn read_array<const N: usize>(&self, gva: Gva) -> Result<[u8; N], IntrospectError> {
        const { assert!(N <= MAX_READ) };
        let mut b = [0u8; N];
        match self.linear.gpa_of(gva.raw(), N as u64) {
            Some(gpa) => self.mem.read_bytes(Gpa::new(gpa), &mut b)?,
            None => self.read_gva(gva, &mut b)?,
        }
        Ok(b)
    }

    /// Hands `f` each of the `n` little-endian `u64` at `gva` with its index, in order, once all of
    /// them are known readable (a table of KVM's held word by word): in a window one RAM check for
    /// the lot and a load each, with no copy; elsewhere read into a buffer first, a page at a time.
    /// At most [`EACH_U64_MAX`] words.
    pub fn each_u64<F: FnMut(usize, u64)>(
        &self,
        gva: Gva,
        n: usize,
        mut f: F,
    ) -> Result<(), IntrospectError> {
        if n > EACH_U64_MAX {
            return Err(IntrospectError::TooLong(n.saturating_mul(8)));
        }
        let bytes = n as u64 * 8;
        if let Some(gpa) = self.linear.gpa_of(gva.raw(), bytes) {
            return Ok(self.mem.each_u64(Gpa::new(gpa), n, f)?);
        }
        // No larger a buffer than needed: zeroing it is paid a tick a byte under Bochs.
        let mut small = [0u8; SMALL_WORDS * 8];
        let mut full;
        let buf: &mut [u8] = if n <= SMALL_WORDS {
            &mut small[..n * 8]
        } else {
            full = [0u8; EACH_U64_MAX * 8];
            &mut full[..n * 8]
        };
        self.read_gva(gva, buf)?;
        for (i, w) in buf.chunks_exact(8).enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(w);
            f(i, u64::from_le_bytes(b));
        }
        Ok(())
    }

    /// [`Self::read_u32`] outside the windows: one page's translation (or a split read).
    #[inline(never)]
    fn read_u32_walked(&self, gva: Gva) -> Result<u32, IntrospectError> {
        if let Some(gpa) = self.fixed_gpa(gva, 4)? {
            return Ok(self.mem.read_u32(gpa)?);
        }
        let mut b = [0u8; 4];
        self.read_gva(gva, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// [`Self::read_u64`] outside the windows.
    #[inline(never)]
    fn read_u64_walked(&self, gva: Gva) -> Result<u64, IntrospectError> {
        if let Some(gpa) = self.fixed_gpa(gva, 8)? {
            return Ok(self.mem.read_u64(gpa)?);
        }
        let mut b = [0u8; 8];
        self.read_gva(gva, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
}
