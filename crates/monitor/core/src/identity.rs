//! A Linux program's identity: the SHA-256 of the file the kernel is about to run, read from the
//! kernel's page cache, so that what is allowed is content, not a name. A copy, a hard link or a
//! symbolic link to a program is that program; a script is run by its interpreter, and the kernel's
//! `linux_binprm` names the interpreter's file by the time the exec hook fires, so the interpreter is
//! what is checked.
//!
//! The walk: `linux_binprm.file` → `file.f_mapping` (the `address_space`) → its `i_pages` XArray,
//! one slot per 4 KiB page of the file (include/linux/xarray.h: a node entry is an internal entry,
//! low bits `10`, above 4096; a sibling entry, internal below the chunk size, points at the slot of
//! the same multi-page folio; a value entry, bit 0 set, is a page that is not in memory) → the
//! `struct page` in the kernel's virtual memory map → its frame number (`(page - vmemmap_base) /
//! sizeof(struct page)`) → the frame through the monitor's guest-physical reads. The length is
//! `inode.i_size`.
//!
//! Digests are kept per file version (the inode's address and number, size, and change and
//! modification times): any write through the kernel's file interfaces changes the times, so the
//! next exec hashes again. A write straight into the page-cache frames (from ring 0, or through
//! `/dev/mem` on a kernel without `STRICT_DEVMEM`) leaves the times alone and is not seen until the
//! file's entry leaves the cache.

use ihmi_addr::{Gpa, Gva};
use ihmi_paging::GuestPhysRead;
use sha2::{Digest, Sha256};

use crate::introspect::{IntrospectError, Introspector};

/// A SHA-256 digest.
pub type Sha256Digest = [u8; 32];

/// The largest program the monitor hashes: 64 MiB (a static program of ours is about 1 MiB, busybox 2).
pub const MAX_PROGRAM_BYTES: u64 = 64 << 20;

/// Where the kernel keeps what the walk reads (offsets from its BTF).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileLayout {
    /// `linux_binprm.file`: the file being run (for a script, its interpreter's).
    pub binprm_file: u64,
    /// `file.f_mapping`.
    pub file_mapping: u64,
    /// `address_space.host`: the inode.
    pub mapping_host: u64,
    /// `address_space.i_pages` plus `xarray.xa_head`: the XArray's root entry.
    pub mapping_pages: u64,
    /// `inode.i_ino`, `inode.i_size`, `inode.i_ctime`, `inode.i_mtime` (each time 16 bytes).
    pub inode_ino: u64,
    pub inode_size: u64,
    pub inode_ctime: u64,
    pub inode_mtime: u64,
    /// `xa_node.shift` (one byte) and `xa_node.slots`.
    pub node_shift: u64,
    pub node_slots: u64,
    /// log2 of the slots per node: 6, or 4 on a kernel built with `CONFIG_BASE_SMALL`.
    pub chunk_shift: u32,
    /// `sizeof(struct page)`.
    pub page_struct_size: u64,
    /// The address of the kernel variable `vmemmap_base` (where the `struct page` array starts).
    pub vmemmap_base: Gva,
}

/// Why a program has no digest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum IdentityError {
    /// A pointer on the way did not translate to guest RAM.
    Unreadable = 1,
    /// A page of the file is not in memory (evicted, or never read: a disk file the kernel has read
    /// only the head of). The monitor cannot read a disk.
    NotResident = 2,
    /// Larger than [`MAX_PROGRAM_BYTES`].
    TooLarge = 3,
    /// The page cache is not shaped as the kernel's code makes it (a bad node, a frame outside the
    /// memory map): the kernel's data was tampered with, or the profile is wrong.
    Malformed = 4,
    /// The guest profile does not say where the kernel keeps files.
    NoLayout = 5,
}

impl IdentityError {
    /// Decodes a stored reason.
    #[must_use]
    pub const fn from_raw(raw: u16) -> Option<Self> {
        Some(match raw {
            1 => Self::Unreadable,
            2 => Self::NotResident,
            3 => Self::TooLarge,
            4 => Self::Malformed,
            5 => Self::NoLayout,
            _ => return None,
        })
    }

    /// The reason in event lines.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Unreadable => "unreadable",
            Self::NotResident => "not-resident",
            Self::TooLarge => "too-large",
            Self::Malformed => "malformed",
            Self::NoLayout => "no-layout",
        }
    }
}

impl From<IntrospectError> for IdentityError {
    fn from(e: IntrospectError) -> Self {
        match e {
            IntrospectError::Walk(_) | IntrospectError::Phys(_) => Self::Unreadable,
            _ => Self::Malformed,
        }
    }
}

/// One version of one file: what a write through the kernel changes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct FileVersion {
    inode: u64,
    ino: u64,
    size: u64,
    ctime: [u64; 2],
    mtime: [u64; 2],
}

/// Slots in the digest cache.
pub const CACHE_SLOTS: usize = 32;

/// Digests of the file versions hashed last, replaced oldest first.
#[derive(Clone, Debug)]
pub struct DigestCache {
    slots: [(FileVersion, Sha256Digest); CACHE_SLOTS],
    used: usize,
    next: usize,
    /// Programs hashed, and answered from the cache.
    pub hashed: u64,
    pub hits: u64,
}

impl DigestCache {
    /// Empty.
    #[must_use]
    pub const fn new() -> Self {
        Self {
            slots: [(
                FileVersion {
                    inode: 0,
                    ino: 0,
                    size: 0,
                    ctime: [0; 2],
                    mtime: [0; 2],
                },
                [0; 32],
            ); CACHE_SLOTS],
            used: 0,
            next: 0,
            hashed: 0,
            hits: 0,
        }
    }

    fn get(&self, v: &FileVersion) -> Option<Sha256Digest> {
        self.slots[..self.used]
            .iter()
            .find(|(k, _)| k == v)
            .map(|&(_, d)| d)
    }

    fn put(&mut self, v: FileVersion, d: Sha256Digest) {
        // A file's older versions are dead: its slot is reused.
        let slot = self.slots[..self.used]
            .iter()
            .position(|(k, _)| k.inode == v.inode && k.ino == v.ino)
            .unwrap_or_else(|| {
                let at = self.next;
                self.next = (self.next + 1) % CACHE_SLOTS;
                self.used = (self.used + 1).min(CACHE_SLOTS);
                at
            });
        self.slots[slot] = (v, d);
    }
}

impl Default for DigestCache {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether `raw` is a kernel (upper-half, canonical) address.
fn kernel(raw: u64) -> bool {
    let a = Gva::new(raw);
    a.is_canonical() && raw >> 63 == 1
}

fn at(base: u64, offset: u64) -> Result<Gva, IdentityError> {
    base.checked_add(offset)
        .map(Gva::new)
        .ok_or(IdentityError::Malformed)
}

/// The SHA-256 of the program the `linux_binprm` at `bprm` is about to run, from `cache` when the
/// file's version is there.
pub fn program_digest<M: GuestPhysRead>(
    intro: &Introspector<'_, M>,
    l: &FileLayout,
    bprm: Gva,
    cache: &mut DigestCache,
) -> Result<Sha256Digest, IdentityError> {
    let ptr = |base: u64, offset: u64| -> Result<u64, IdentityError> {
        let v = intro.read_u64(at(base, offset)?)?;
        if kernel(v) {
            Ok(v)
        } else {
            Err(IdentityError::Malformed)
        }
    };
    let file = ptr(bprm.raw(), l.binprm_file)?;
    let mapping = ptr(file, l.file_mapping)?;
    let inode = ptr(mapping, l.mapping_host)?;
    let word =
        |offset: u64| -> Result<u64, IdentityError> { Ok(intro.read_u64(at(inode, offset)?)?) };
    let version = FileVersion {
        inode,
        ino: word(l.inode_ino)?,
        size: word(l.inode_size)?,
        ctime: [word(l.inode_ctime)?, word(l.inode_ctime + 8)?],
        mtime: [word(l.inode_mtime)?, word(l.inode_mtime + 8)?],
    };
    if version.size > MAX_PROGRAM_BYTES {
        // Also a negative `loff_t`.
        return Err(IdentityError::TooLarge);
    }
    if let Some(d) = cache.get(&version) {
        cache.hits = cache.hits.wrapping_add(1);
        return Ok(d);
    }
    let pages = PageCache {
        intro,
        l,
        head: intro.read_u64(at(mapping, l.mapping_pages)?)?,
        vmemmap: intro.read_u64(l.vmemmap_base)?,
    };
    let mut h = Sha256::new();
    let mut buf = [0u8; 1024];
    let mut done = 0u64;
    while done < version.size {
        let frame = pages.frame(done >> 12)?;
        let in_page = (version.size - done).min(4096);
        let mut off = 0;
        while off < in_page {
            let n = (in_page - off).min(buf.len() as u64) as usize;
            intro
                .read_gpa(Gpa::new((frame << 12) + off), &mut buf[..n])
                .map_err(|_| IdentityError::Malformed)?;
            h.update(&buf[..n]);
            off += n as u64;
        }
        done += in_page;
    }
    let digest: Sha256Digest = h.finalize().into();
    cache.hashed = cache.hashed.wrapping_add(1);
    cache.put(version, digest);
    Ok(digest)
}

/// One file's page cache.
struct PageCache<'a, 'm, M> {
    intro: &'a Introspector<'m, M>,
    l: &'a FileLayout,
    head: u64,
    vmemmap: u64,
}

/// An XArray internal entry (low bits `10`).
const fn internal(entry: u64) -> bool {
    entry & 3 == 2
}

impl<M: GuestPhysRead> PageCache<'_, '_, M> {
    /// The frame holding page `index` of the file.
    fn frame(&self, index: u64) -> Result<u64, IdentityError> {
        let chunk_shift = self.l.chunk_shift;
        let chunk = 1u64 << chunk_shift;
        let mut entry = self.head;
        if !(internal(entry) && entry > 4096) {
            // No node: the head is the only entry, page 0's.
            return if index == 0 {
                self.page_frame(entry, 0)
            } else {
                Err(IdentityError::NotResident)
            };
        }
        let mut expect: Option<u64> = None;
        // Each level takes `chunk_shift` bits of the index: 64 bits need at most 16 levels.
        for _ in 0..=64 / chunk_shift {
            let node = entry - 2;
            let mut shift = [0u8];
            self.intro
                .read_gva(at(node, self.l.node_shift)?, &mut shift)?;
            let shift = u64::from(shift[0]);
            // Shifts are whole levels, and go down by one level per step.
            if shift % u64::from(chunk_shift) != 0
                || shift >= 64
                || expect.is_some_and(|e| e != shift)
            {
                return Err(IdentityError::Malformed);
            }
            let above = index >> shift;
            if expect.is_none() && above >= chunk {
                // Past the root's reach: the file has no such page.
                return Err(IdentityError::NotResident);
            }
            let mut slot = above & (chunk - 1);
            entry = self
                .intro
                .read_u64(at(node, self.l.node_slots + 8 * slot)?)?;
            if internal(entry) && (entry >> 2) < chunk - 1 {
                // A sibling: the folio's first slot holds it.
                slot = entry >> 2;
                entry = self
                    .intro
                    .read_u64(at(node, self.l.node_slots + 8 * slot)?)?;
            }
            if internal(entry) && entry > 4096 {
                if shift == 0 {
                    return Err(IdentityError::Malformed);
                }
                expect = Some(shift - u64::from(chunk_shift));
                continue;
            }
            // A folio covering from the first index of `slot` in this node.
            let span = shift + u64::from(chunk_shift);
            let node_base = if span >= 64 {
                0
            } else {
                index & !((1u64 << span) - 1)
            };
            return self.page_frame(entry, index - (node_base + (slot << shift)));
        }
        Err(IdentityError::Malformed)
    }

    /// The frame of page `n` of the folio `entry` names.
    fn page_frame(&self, entry: u64, n: u64) -> Result<u64, IdentityError> {
        if entry == 0 || entry & 1 == 1 || internal(entry) {
            // Empty, a value (a page that was evicted), or a retry or zero entry.
            return Err(IdentityError::NotResident);
        }
        let size = self.l.page_struct_size;
        let page = n
            .checked_mul(size)
            .and_then(|o| entry.checked_add(o))
            .ok_or(IdentityError::Malformed)?;
        let offset = page
            .checked_sub(self.vmemmap)
            .ok_or(IdentityError::Malformed)?;
        if size == 0 || offset % size != 0 {
            return Err(IdentityError::Malformed);
        }
        Ok(offset / size)
    }
}
