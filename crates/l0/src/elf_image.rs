//! ELF images L0 loads from multiboot2 modules: the guest kernel and the monitor.

use elf::endian::LittleEndian;
use elf::segment::ProgramHeader;
use elf::ElfBytes;

use crate::fail;

/// A parsed, checked x86-64 ELF64 image.
pub struct Image<'a> {
    pub file: ElfBytes<'a, LittleEndian>,
    bytes: &'a [u8],
    what: &'static str,
}

impl<'a> Image<'a> {
    /// Parses `bytes`; `what` names the module in errors.
    pub fn parse(bytes: &'a [u8], what: &'static str) -> Self {
        let file = match ElfBytes::<LittleEndian>::minimal_parse(bytes) {
            Ok(f) => f,
            Err(_) => fail(format_args!("the {what} module is not an ELF file")),
        };
        if file.ehdr.class != elf::file::Class::ELF64 || file.ehdr.e_machine != elf::abi::EM_X86_64
        {
            fail(format_args!(
                "the {what} module is not an x86-64 ELF64 file"
            ));
        }
        Self { file, bytes, what }
    }

    /// The loadable segments.
    pub fn load_segments(&self) -> impl Iterator<Item = ProgramHeader> + '_ {
        let segments = match self.file.segments() {
            Some(s) => s,
            None => fail(format_args!("the {} ELF has no program headers", self.what)),
        };
        segments
            .into_iter()
            .filter(|ph| ph.p_type == elf::abi::PT_LOAD)
    }

    /// Copies one segment into `dst` (its memory image: file bytes, then zeros).
    pub fn copy_segment(&self, ph: &ProgramHeader, dst: &mut [u8]) {
        let Some(src) = ph
            .p_offset
            .checked_add(ph.p_filesz)
            .and_then(|end| self.bytes.get(ph.p_offset as usize..end as usize))
        else {
            fail(format_args!(
                "{} ELF segment at {:#x} lies outside the file",
                self.what, ph.p_vaddr
            ));
        };
        if src.len() > dst.len() {
            fail(format_args!(
                "{} ELF segment at {:#x} has filesz > memsz",
                self.what, ph.p_vaddr
            ));
        }
        dst[..src.len()].copy_from_slice(src);
        dst[src.len()..].fill(0);
    }

    /// The value of a symbol from the image's own symbol table; a missing symbol is fatal and named.
    pub fn symbol(&self, name: &str) -> u64 {
        let found = match self.file.symbol_table() {
            Ok(Some((symbols, strings))) => symbols
                .iter()
                .find(|s| strings.get(s.st_name as usize).is_ok_and(|n| n == name))
                .map(|s| s.st_value),
            _ => None,
        };
        match found {
            Some(v) => v,
            None => fail(format_args!(
                "symbol '{name}' not found in the {} image; rebuild it with `ihmi build`",
                self.what
            )),
        }
    }

    /// The load (physical) address of virtual address `va`, from the segment that contains it.
    pub fn phys_of(&self, va: u64) -> Option<u64> {
        self.load_segments()
            .find(|ph| va >= ph.p_vaddr && va - ph.p_vaddr < ph.p_memsz)
            .map(|ph| ph.p_paddr + (va - ph.p_vaddr))
    }

    /// The entry point.
    pub fn entry(&self) -> u64 {
        self.file.ehdr.e_entry
    }
}
