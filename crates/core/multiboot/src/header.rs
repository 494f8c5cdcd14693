//! Finding and checking a kernel's multiboot header (Multiboot 0.6.96 §3.1, Multiboot2 2.0 §3.1).

use crate::{read_u16, read_u32, Error, Protocol};

/// Version 1 flags a loader must honour (bits 0..16): page-aligned modules, memory information.
/// Bit 2 (a video mode table) is required information this loader does not give.
const V1_KNOWN_REQUIRED: u32 = (1 << 0) | (1 << 1);
const V1_PAGE_ALIGN_MODULES: u32 = 1 << 0;
/// Version 1: the address fields at offsets 12..32 are valid and take precedence over ELF.
const V1_ADDRESS_FIELDS: u32 = 1 << 16;
/// Version 2 tag flag: the loader may ignore the tag.
const V2_OPTIONAL: u16 = 1 << 0;
/// Boot-information tag types [`crate::info`] writes: command line, boot-loader name, module,
/// basic memory information, memory map.
pub const V2_INFO_GIVEN: [u32; 5] = [1, 2, 3, 4, 6];

/// The header's address fields (version 1 flag 16, version 2 address tag): where the image is loaded
/// without reading its ELF headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddressFields {
    /// The physical address the header itself is loaded at.
    pub header_addr: u32,
    /// The physical address of the first byte loaded (version 2: `u32::MAX` means the file's start).
    pub load_addr: u32,
    /// The end of what is loaded from the file; 0: the rest of the file.
    pub load_end_addr: u32,
    /// The end of the zeroed area after it; 0: none.
    pub bss_end_addr: u32,
}

/// A checked multiboot header: what the loader must do for the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub protocol: Protocol,
    /// Where the header starts in the file.
    pub offset: usize,
    /// Address fields, when the header has them.
    pub address: Option<AddressFields>,
    /// The entry point the header names (version 1 with address fields; version 2's entry tag).
    pub entry: Option<u32>,
    /// Modules must start on a 4 KiB boundary.
    pub page_align_modules: bool,
}

impl Header {
    /// The header of `image` of protocol `want`; with `None`, version 2 if the image has a version 2
    /// header, else version 1.
    pub fn find(image: &[u8], want: Option<Protocol>) -> Result<Self, Error> {
        match want {
            Some(p) => scan(image, p),
            None => match scan(image, Protocol::V2) {
                Err(Error::NoHeader(_)) => scan(image, Protocol::V1).map_err(|e| match e {
                    Error::NoHeader(_) => Error::NoHeader(None),
                    e => e,
                }),
                found => found,
            },
        }
    }
}

/// The first header of protocol `p` with a right checksum; a magic with a wrong one is reported if
/// no good header follows.
fn scan(image: &[u8], p: Protocol) -> Result<Header, Error> {
    let limit = image.len().min(p.search_limit());
    let mut bad = None;
    for offset in (0..limit).step_by(p.alignment()) {
        if read_u32(image, offset) != Some(p.header_magic()) {
            continue;
        }
        let sum_ok = match p {
            Protocol::V1 => match (read_u32(image, offset + 4), read_u32(image, offset + 8)) {
                (Some(flags), Some(sum)) => {
                    p.header_magic().wrapping_add(flags).wrapping_add(sum) == 0
                }
                _ => false,
            },
            Protocol::V2 => match (
                read_u32(image, offset + 4),
                read_u32(image, offset + 8),
                read_u32(image, offset + 12),
            ) {
                (Some(arch), Some(len), Some(sum)) => {
                    p.header_magic()
                        .wrapping_add(arch)
                        .wrapping_add(len)
                        .wrapping_add(sum)
                        == 0
                }
                _ => false,
            },
        };
        if !sum_ok {
            bad.get_or_insert(offset);
            continue;
        }
        return match p {
            Protocol::V1 => parse_v1(image, offset),
            Protocol::V2 => parse_v2(image, offset),
        };
    }
    Err(match bad {
        Some(offset) => Error::BadChecksum {
            protocol: p,
            offset,
        },
        None => Error::NoHeader(Some(p)),
    })
}

fn parse_v1(image: &[u8], offset: usize) -> Result<Header, Error> {
    let flags = read_u32(image, offset + 4).ok_or(Error::MalformedHeader { offset })?;
    let unknown = flags & 0xffff & !V1_KNOWN_REQUIRED;
    if unknown != 0 {
        return Err(Error::UnknownRequiredFlags(unknown));
    }
    let (address, entry) = if flags & V1_ADDRESS_FIELDS != 0 {
        let field = |i: usize| {
            read_u32(image, offset + 12 + 4 * i).ok_or(Error::BadAddressFields(
                "the header ends before its address fields",
            ))
        };
        (
            Some(AddressFields {
                header_addr: field(0)?,
                load_addr: field(1)?,
                load_end_addr: field(2)?,
                bss_end_addr: field(3)?,
            }),
            Some(field(4)?),
        )
    } else {
        (None, None)
    };
    Ok(Header {
        protocol: Protocol::V1,
        offset,
        address,
        entry,
        page_align_modules: flags & V1_PAGE_ALIGN_MODULES != 0,
    })
}

fn parse_v2(image: &[u8], offset: usize) -> Result<Header, Error> {
    let malformed = Error::MalformedHeader { offset };
    let arch = read_u32(image, offset + 4).ok_or(malformed)?;
    if arch != 0 {
        return Err(Error::Architecture(arch));
    }
    let len = read_u32(image, offset + 8).ok_or(malformed)? as usize;
    let end = offset.checked_add(len).ok_or(malformed)?;
    if len < 16 || end > image.len() {
        return Err(malformed);
    }
    let mut header = Header {
        protocol: Protocol::V2,
        offset,
        address: None,
        entry: None,
        page_align_modules: false,
    };
    let mut at = offset + 16;
    loop {
        let tag_malformed = Error::MalformedHeader { offset: at };
        if at + 8 > end {
            // No end tag before the header's end.
            return Err(tag_malformed);
        }
        let typ = read_u16(image, at).ok_or(tag_malformed)?;
        let flags = read_u16(image, at + 2).ok_or(tag_malformed)?;
        let size = read_u32(image, at + 4).ok_or(tag_malformed)? as usize;
        let tag_end = at.checked_add(size).ok_or(tag_malformed)?;
        if size < 8 || tag_end > end {
            return Err(tag_malformed);
        }
        let optional = flags & V2_OPTIONAL != 0;
        let field = |i: usize| {
            if at + 8 + 4 * (i + 1) > tag_end {
                return Err(tag_malformed);
            }
            read_u32(image, at + 8 + 4 * i).ok_or(tag_malformed)
        };
        match typ {
            0 => return Ok(header),
            // Information request: the boot-information tags the kernel wants.
            1 => {
                for i in 0..(size - 8) / 4 {
                    let wanted = field(i)?;
                    if !optional && wanted != 0 && !V2_INFO_GIVEN.contains(&wanted) {
                        return Err(Error::UnsupportedInfoRequest(wanted));
                    }
                }
            }
            2 => {
                header.address = Some(AddressFields {
                    header_addr: field(0)?,
                    load_addr: field(1)?,
                    load_end_addr: field(2)?,
                    bss_end_addr: field(3)?,
                });
            }
            3 => header.entry = Some(field(0)?),
            // Console flags: the kernel gets the firmware's text console, which is all this loader has.
            4 => {}
            5 if !optional => return Err(Error::UnsupportedRequiredTag("a framebuffer")),
            6 => header.page_align_modules = true,
            7 if !optional => return Err(Error::UnsupportedRequiredTag("EFI boot services")),
            // EFI entry points (8, 9) apply to an EFI boot only; relocatable (10): loading at the
            // linked address is always allowed.
            5 | 7 | 8 | 9 | 10 => {}
            _ if optional => {}
            _ => return Err(Error::UnknownRequiredTag(typ)),
        }
        // Tags are 8-byte aligned.
        at = tag_end.checked_add(7).ok_or(tag_malformed)? & !7;
    }
}
