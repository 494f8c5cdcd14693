//! Reads of guest memory that never trust a guest pointer: bounded in size, translated through the
//! guest's own page tables in software, and failing with an error rather than a fault.

use core::cell::RefCell;
use core::fmt;

use ihmi_addr::{Gpa, Gva, PAGE_SIZE};
use ihmi_paging::{Cr3, GuestPhysRead, PhysReadError, WalkError};

/// Longest single read, so no request can make the monitor copy without bound.
pub const MAX_READ: usize = 4096;

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

/// Guest memory as one address space (one guest CR3) sees it.
#[derive(Debug)]
pub struct Introspector<'m, M> {
    mem: &'m M,
    cr3: Cr3,
    cache: Option<&'m RefCell<TranslationCache>>,
}

impl<'m, M: GuestPhysRead> Introspector<'m, M> {
    /// Reads through `mem` (guest-physical memory) with the guest's page tables at `cr3`.
    pub const fn new(mem: &'m M, cr3: Cr3) -> Self {
        Self {
            mem,
            cr3,
            cache: None,
        }
    }

    /// The same, remembering kernel-page translations in `cache` (see [`TranslationCache`]).
    pub const fn with_cache(mem: &'m M, cr3: Cr3, cache: &'m RefCell<TranslationCache>) -> Self {
        Self {
            mem,
            cr3,
            cache: Some(cache),
        }
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

    /// Guest-virtual read, each page translated through the guest's own tables (or the cache).
    pub fn read_gva(&self, gva: Gva, buf: &mut [u8]) -> Result<(), IntrospectError> {
        if buf.len() > MAX_READ {
            return Err(IntrospectError::TooLong(buf.len()));
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

    /// A little-endian `u32` at `gva`.
    pub fn read_u32(&self, gva: Gva) -> Result<u32, IntrospectError> {
        let mut b = [0u8; 4];
        self.read_gva(gva, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// A little-endian `u64` at `gva`.
    pub fn read_u64(&self, gva: Gva) -> Result<u64, IntrospectError> {
        let mut b = [0u8; 8];
        self.read_gva(gva, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
}
