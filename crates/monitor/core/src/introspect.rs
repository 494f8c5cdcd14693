//! Reads of guest memory that never trust a guest pointer: bounded in size, translated through the
//! guest's own page tables in software, and failing with an error rather than a fault.

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

/// Guest memory as one address space (one guest CR3) sees it.
#[derive(Debug)]
pub struct Introspector<'m, M> {
    mem: &'m M,
    cr3: Cr3,
}

impl<'m, M: GuestPhysRead> Introspector<'m, M> {
    /// Reads through `mem` (guest-physical memory) with the guest's page tables at `cr3`.
    pub const fn new(mem: &'m M, cr3: Cr3) -> Self {
        Self { mem, cr3 }
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

    /// Guest-virtual read, each page translated through the guest's own tables.
    pub fn read_gva(&self, gva: Gva, buf: &mut [u8]) -> Result<(), IntrospectError> {
        if buf.len() > MAX_READ {
            return Err(IntrospectError::TooLong(buf.len()));
        }
        Ok(ihmi_paging::read_virt(self.mem, self.cr3, gva, buf)?)
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
