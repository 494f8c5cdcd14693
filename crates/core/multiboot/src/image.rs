//! A multiboot kernel as a load plan: its segments and its 32-bit entry point.

use elf::endian::LittleEndian;
use elf::ElfBytes;

use crate::header::{AddressFields, Header};
use crate::{Error, Protocol};

/// The most loadable segments a kernel may have.
pub const MAX_SEGMENTS: usize = 16;
const FOUR_GIB: u64 = 1 << 32;

/// One piece of the kernel in memory: `file` copied to `paddr`, then zeros up to `mem_size`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment<'a> {
    pub paddr: u32,
    pub file: &'a [u8],
    /// At least `file.len()`.
    pub mem_size: u32,
}

impl Segment<'_> {
    /// The first address after the segment (at most 4 GiB).
    pub fn end(&self) -> u64 {
        u64::from(self.paddr) + u64::from(self.mem_size)
    }
}

const NO_SEGMENT: Segment<'static> = Segment {
    paddr: 0,
    file: &[],
    mem_size: 0,
};

/// A kernel a multiboot loader can start: header, segments, entry.
#[derive(Clone, Copy, Debug)]
pub struct KernelImage<'a> {
    pub header: Header,
    /// The physical address the loader jumps to, in 32-bit protected mode.
    pub entry: u32,
    segments: [Segment<'a>; MAX_SEGMENTS],
    count: usize,
}

impl<'a> KernelImage<'a> {
    /// The load plan of `image`, booted by `protocol` (`None`: version 2 if it has a version 2
    /// header, else version 1). The header's address fields win over ELF headers, as both
    /// specifications say.
    pub fn parse(image: &'a [u8], protocol: Option<Protocol>) -> Result<Self, Error> {
        let header = Header::find(image, protocol)?;
        let mut plan = Self {
            header,
            entry: 0,
            segments: [NO_SEGMENT; MAX_SEGMENTS],
            count: 0,
        };
        let entry = match header.address {
            Some(fields) => {
                plan.push(address_segment(image, &header, fields)?)?;
                u64::from(header.entry.ok_or(Error::NoEntry)?)
            }
            None => plan.elf(image)?,
        };
        if plan.count == 0 {
            return Err(Error::Empty);
        }
        plan.entry = u32::try_from(entry).map_err(|_| Error::EntryAbove4G(entry))?;
        Ok(plan)
    }

    /// The segments, in file order.
    pub fn segments(&self) -> &[Segment<'a>] {
        &self.segments[..self.count]
    }

    /// The lowest address loaded and the first one after everything loaded.
    pub fn span(&self) -> (u64, u64) {
        let low = self.segments().iter().map(|s| u64::from(s.paddr)).min();
        let high = self.segments().iter().map(Segment::end).max();
        (low.unwrap_or(0), high.unwrap_or(0))
    }

    fn push(&mut self, segment: Segment<'a>) -> Result<(), Error> {
        let slot = self
            .segments
            .get_mut(self.count)
            .ok_or(Error::TooManySegments)?;
        *slot = segment;
        self.count += 1;
        Ok(())
    }

    /// The ELF32 or ELF64 program headers' loadable segments at their physical addresses; returns
    /// the entry: the header's entry tag if it has one, else the ELF entry, moved from its virtual
    /// to its physical address when a segment holds it (as GRUB does for kernels linked high).
    fn elf(&mut self, image: &'a [u8]) -> Result<u64, Error> {
        let file = ElfBytes::<LittleEndian>::minimal_parse(image).map_err(|_| Error::NotElf)?;
        if !matches!(file.ehdr.e_machine, elf::abi::EM_386 | elf::abi::EM_X86_64) {
            return Err(Error::NotElf);
        }
        let segments = file.segments().ok_or(Error::NotElf)?;
        let mut entry = None;
        for ph in segments.iter().filter(|ph| ph.p_type == elf::abi::PT_LOAD) {
            if ph.p_memsz == 0 {
                continue;
            }
            let bad = Error::BadSegment { paddr: ph.p_paddr };
            let file_bytes = ph
                .p_offset
                .checked_add(ph.p_filesz)
                .and_then(|end| image.get(ph.p_offset as usize..usize::try_from(end).ok()?))
                .ok_or(bad)?;
            let end = ph.p_paddr.checked_add(ph.p_memsz).ok_or(bad)?;
            if ph.p_filesz > ph.p_memsz || end > FOUR_GIB || ph.p_memsz >= FOUR_GIB {
                return Err(bad);
            }
            let e = file.ehdr.e_entry;
            if e >= ph.p_vaddr && e - ph.p_vaddr < ph.p_memsz {
                entry.get_or_insert(e - ph.p_vaddr + ph.p_paddr);
            }
            self.push(Segment {
                paddr: ph.p_paddr as u32,
                file: file_bytes,
                mem_size: ph.p_memsz as u32,
            })?;
        }
        Ok(match self.header.entry {
            Some(tag) => u64::from(tag),
            None => entry.unwrap_or(file.ehdr.e_entry),
        })
    }
}

/// The one segment the header's address fields describe.
fn address_segment<'a>(
    image: &'a [u8],
    header: &Header,
    f: AddressFields,
) -> Result<Segment<'a>, Error> {
    let bad = Error::BadAddressFields;
    // Version 2's load_addr -1: load from the file's start.
    let (load_addr, load_offset) = if header.protocol == Protocol::V2 && f.load_addr == u32::MAX {
        let at = f
            .header_addr
            .checked_sub(header.offset as u32)
            .ok_or(bad("header_addr is below the header's offset in the file"))?;
        (at, 0usize)
    } else {
        let before = f
            .header_addr
            .checked_sub(f.load_addr)
            .ok_or(bad("load_addr is above header_addr"))? as usize;
        let offset = header
            .offset
            .checked_sub(before)
            .ok_or(bad("load_addr would start before the file"))?;
        (f.load_addr, offset)
    };
    let rest = image.len() - load_offset;
    let file_len = if f.load_end_addr == 0 {
        rest
    } else {
        let len = f
            .load_end_addr
            .checked_sub(load_addr)
            .filter(|&l| l > 0)
            .ok_or(bad("load_end_addr is not above load_addr"))? as usize;
        if len > rest {
            return Err(bad("load_end_addr lies past the end of the file"));
        }
        len
    };
    let load_end = u64::from(load_addr) + file_len as u64;
    let mem_end = if f.bss_end_addr == 0 {
        load_end
    } else if u64::from(f.bss_end_addr) < load_end {
        return Err(bad("bss_end_addr is below the end of what is loaded"));
    } else {
        u64::from(f.bss_end_addr)
    };
    if mem_end > FOUR_GIB || mem_end - u64::from(load_addr) >= FOUR_GIB {
        return Err(bad("the image would end above 4 GiB"));
    }
    Ok(Segment {
        paddr: load_addr,
        file: &image[load_offset..load_offset + file_len],
        mem_size: (mem_end - u64::from(load_addr)) as u32,
    })
}
