#![doc = include_str!("../README.md")]
#![no_std]
#![deny(unsafe_code)]

use core::fmt;

pub mod header;
pub mod image;
pub mod info;

pub use header::Header;
pub use image::KernelImage;

/// Which multiboot specification a kernel is booted by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// Multiboot 0.6.96.
    V1,
    /// Multiboot2 2.0.
    V2,
}

impl Protocol {
    /// The magic a kernel's header starts with.
    pub const fn header_magic(self) -> u32 {
        match self {
            Self::V1 => 0x1bad_b002,
            Self::V2 => 0xe852_50d6,
        }
    }

    /// The magic the loader leaves in EAX at the kernel's entry.
    pub const fn loader_magic(self) -> u32 {
        match self {
            Self::V1 => 0x2bad_b002,
            Self::V2 => 0x36d7_6289,
        }
    }

    /// How far into the file the header may start.
    pub const fn search_limit(self) -> usize {
        match self {
            Self::V1 => 8 * 1024,
            Self::V2 => 32 * 1024,
        }
    }

    /// The header's alignment in the file.
    pub const fn alignment(self) -> usize {
        match self {
            Self::V1 => 4,
            Self::V2 => 8,
        }
    }

    /// "multiboot 1" or "multiboot2", for messages.
    pub const fn name(self) -> &'static str {
        match self {
            Self::V1 => "multiboot 1",
            Self::V2 => "multiboot2",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a kernel cannot be booted by multiboot, each with what a user can do about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// No header of the protocol asked for (or of either, when none was asked for).
    NoHeader(Option<Protocol>),
    /// A header's magic was found but its checksum is wrong.
    BadChecksum { protocol: Protocol, offset: usize },
    /// A version 1 header requires features (bits 0..16 of its flags) this loader does not know.
    UnknownRequiredFlags(u32),
    /// A version 2 header is not for the i386 architecture (0).
    Architecture(u32),
    /// A version 2 header's length or a tag's size runs past the header or the file.
    MalformedHeader { offset: usize },
    /// A version 2 tag not marked optional that this loader does not know.
    UnknownRequiredTag(u16),
    /// A version 2 tag not marked optional that asks for what this loader cannot give.
    UnsupportedRequiredTag(&'static str),
    /// A required information request for a boot-information tag this loader does not write.
    UnsupportedInfoRequest(u32),
    /// The header's address fields are inconsistent with each other or with the file.
    BadAddressFields(&'static str),
    /// An address-field image without an entry point (version 2: no entry-address tag).
    NoEntry,
    /// Neither address fields nor an ELF32/ELF64 x86 image.
    NotElf,
    /// An ELF program header is inconsistent (outside the file, file larger than memory) or loads
    /// above 4 GiB, which a 32-bit entry with paging off cannot reach.
    BadSegment { paddr: u64 },
    /// More loadable segments than the plan holds.
    TooManySegments,
    /// Nothing to load.
    Empty,
    /// The entry point is not below 4 GiB.
    EntryAbove4G(u64),
    /// The boot information does not fit its buffer, or would end above 4 GiB.
    InfoTooLarge,
    /// The boot information's address is not 8-byte aligned.
    InfoMisaligned(u32),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoHeader(Some(p)) => write!(
                f,
                "no {p} header (magic {:#x}, {}-byte aligned in the first {} KiB)",
                p.header_magic(),
                p.alignment(),
                p.search_limit() / 1024
            ),
            Self::NoHeader(None) => f.write_str(
                "not a multiboot kernel: no multiboot 1 header in the first 8 KiB and no multiboot2 header in the first 32 KiB",
            ),
            Self::BadChecksum { protocol, offset } => {
                write!(f, "the {protocol} header at file offset {offset:#x} has a wrong checksum")
            }
            Self::UnknownRequiredFlags(bits) => write!(
                f,
                "the multiboot 1 header requires features this loader does not know (flags {bits:#x})"
            ),
            Self::Architecture(a) => write!(
                f,
                "the multiboot2 header is for architecture {a}, not i386 (0)"
            ),
            Self::MalformedHeader { offset } => write!(
                f,
                "the multiboot2 header is malformed at file offset {offset:#x} (a length runs past the header or the file)"
            ),
            Self::UnknownRequiredTag(t) => write!(
                f,
                "the multiboot2 header has a required tag of type {t} this loader does not know"
            ),
            Self::UnsupportedRequiredTag(what) => write!(
                f,
                "the multiboot2 header requires {what}, which this loader cannot give; mark the tag optional"
            ),
            Self::UnsupportedInfoRequest(t) => write!(
                f,
                "the multiboot2 header requires boot-information tag {t}, which this loader does not write (it writes 1, 2, 3, 4 and 6); mark the request optional"
            ),
            Self::BadAddressFields(why) => write!(f, "the header's address fields are wrong: {why}"),
            Self::NoEntry => f.write_str(
                "the header has address fields but no entry point (multiboot2: add an entry-address tag)",
            ),
            Self::NotElf => f.write_str(
                "the kernel is neither an x86 ELF32/ELF64 file nor has its header address fields",
            ),
            Self::BadSegment { paddr } => write!(
                f,
                "the ELF segment at physical address {paddr:#x} lies outside the file, is larger on file than in memory, or ends above 4 GiB"
            ),
            Self::TooManySegments => write!(
                f,
                "the kernel has more than {} loadable segments",
                image::MAX_SEGMENTS
            ),
            Self::Empty => f.write_str("the kernel has nothing to load"),
            Self::EntryAbove4G(e) => write!(f, "the entry point {e:#x} is not below 4 GiB"),
            Self::InfoMisaligned(at) => {
                write!(f, "the boot information's address {at:#x} is not 8-byte aligned")
            }
            Self::InfoTooLarge => f.write_str(
                "the boot information (command lines, modules, memory map) does not fit its area",
            ),
        }
    }
}

/// Little-endian reads that never panic.
pub(crate) fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

pub(crate) fn read_u16(bytes: &[u8], at: usize) -> Option<u16> {
    let b = bytes.get(at..at.checked_add(2)?)?;
    Some(u16::from_le_bytes([b[0], b[1]]))
}

#[cfg(test)]
mod tests;
