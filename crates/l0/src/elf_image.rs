//! ELF images L0 loads from multiboot2 modules: the test guest's kernel and the monitor.

use elf::endian::LittleEndian;
use elf::segment::ProgramHeader;
use elf::ElfBytes;

use crate::error::{ImageProblem, LoadError};

/// A parsed, checked x86-64 ELF64 image.
pub struct Image<'a> {
    file: ElfBytes<'a, LittleEndian>,
    bytes: &'a [u8],
    what: &'static str,
}

impl<'a> Image<'a> {
    /// Parses `bytes`; `what` names the module in errors.
    pub fn parse(bytes: &'a [u8], what: &'static str) -> Result<Self, LoadError> {
        let bad = |problem| LoadError::Image { what, problem };
        let file = ElfBytes::<LittleEndian>::minimal_parse(bytes)
            .map_err(|_| bad(ImageProblem::NotElf))?;
        if file.ehdr.class != elf::file::Class::ELF64 || file.ehdr.e_machine != elf::abi::EM_X86_64
        {
            return Err(bad(ImageProblem::NotX86_64));
        }
        let image = Self { file, bytes, what };
        // Every later use walks the program headers: check once that there are some.
        if image.file.segments().is_none() {
            return Err(bad(ImageProblem::NoProgramHeaders));
        }
        Ok(image)
    }

    fn problem(&self, problem: ImageProblem) -> LoadError {
        LoadError::Image {
            what: self.what,
            problem,
        }
    }

    /// The loadable segments.
    pub fn load_segments(&self) -> impl Iterator<Item = ProgramHeader> + '_ {
        self.file
            .segments()
            .into_iter()
            .flatten()
            .filter(|ph| ph.p_type == elf::abi::PT_LOAD)
    }

    /// Copies one segment into `dst` (its memory image: file bytes, then zeros).
    pub fn copy_segment(&self, ph: &ProgramHeader, dst: &mut [u8]) -> Result<(), LoadError> {
        let src = ph
            .p_offset
            .checked_add(ph.p_filesz)
            .and_then(|end| self.bytes.get(ph.p_offset as usize..end as usize))
            .ok_or(self.problem(ImageProblem::SegmentOutsideFile { vaddr: ph.p_vaddr }))?;
        if src.len() > dst.len() {
            return Err(self.problem(ImageProblem::FileLargerThanMemory { vaddr: ph.p_vaddr }));
        }
        dst[..src.len()].copy_from_slice(src);
        dst[src.len()..].fill(0);
        Ok(())
    }

    /// The value of a symbol from the image's own symbol table; a missing symbol is named.
    pub fn symbol(&self, name: &'static str) -> Result<u64, LoadError> {
        let found = match self.file.symbol_table() {
            Ok(Some((symbols, strings))) => symbols
                .iter()
                .find(|s| strings.get(s.st_name as usize).is_ok_and(|n| n == name))
                .map(|s| s.st_value),
            _ => None,
        };
        found.ok_or(self.problem(ImageProblem::MissingSymbol(name)))
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

    /// A problem with `name` in this image.
    pub fn misaligned(&self, name: &'static str) -> LoadError {
        self.problem(ImageProblem::Misaligned(name))
    }

    /// `name` lies outside where it must be.
    pub fn outside(&self, name: &'static str) -> LoadError {
        self.problem(ImageProblem::SymbolOutside(name))
    }
}
