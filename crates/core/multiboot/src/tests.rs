extern crate std;

use std::vec;
use std::vec::Vec;

use crate::header::AddressFields;
use crate::image::MAX_SEGMENTS;
use crate::info::{BootInfo, MemoryRange, Module, MEMORY_AVAILABLE, MEMORY_RESERVED};
use crate::{Error, Header, KernelImage, Protocol};

fn put(image: &mut [u8], at: usize, words: &[u32]) {
    for (i, w) in words.iter().enumerate() {
        image[at + 4 * i..at + 4 * i + 4].copy_from_slice(&w.to_le_bytes());
    }
}

/// A version 1 header (magic, flags, checksum, then `fields`) at `at`.
fn v1(image: &mut [u8], at: usize, flags: u32, fields: &[u32]) {
    let sum = 0u32.wrapping_sub(0x1bad_b002u32.wrapping_add(flags));
    put(image, at, &[0x1bad_b002, flags, sum]);
    put(image, at + 12, fields);
}

/// A version 2 header tag: type, flags, body words.
type Tag<'a> = (u16, u16, &'a [u32]);

/// A version 2 header at `at` with `tags` and the end tag; returns its length.
fn v2(image: &mut [u8], at: usize, tags: &[Tag<'_>]) -> usize {
    let mut body = Vec::new();
    for (typ, flags, words) in tags {
        let size = 8 + 4 * words.len();
        body.extend_from_slice(&typ.to_le_bytes());
        body.extend_from_slice(&flags.to_le_bytes());
        body.extend_from_slice(&(size as u32).to_le_bytes());
        for w in words.iter() {
            body.extend_from_slice(&w.to_le_bytes());
        }
        while body.len() % 8 != 0 {
            body.push(0);
        }
    }
    body.extend_from_slice(&[0, 0, 0, 0, 8, 0, 0, 0]);
    let len = 16 + body.len() as u32;
    let sum = 0u32.wrapping_sub(0xe852_50d6u32.wrapping_add(len));
    put(image, at, &[0xe852_50d6, 0, len, sum]);
    image[at + 16..at + 16 + body.len()].copy_from_slice(&body);
    len as usize
}

/// A program header: vaddr, paddr, file offset, file size, memory size.
type Ph = (u64, u64, u64, u64, u64);

/// An x86 ELF file of `len` bytes, 32- or 64-bit, with these PT_LOAD headers.
fn elf(class64: bool, entry: u64, phs: &[Ph], len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = if class64 { 2 } else { 1 };
    f[5] = 1; // little endian
    f[6] = 1; // version
    let w16 = |f: &mut Vec<u8>, at: usize, v: u16| f[at..at + 2].copy_from_slice(&v.to_le_bytes());
    let w32 = |f: &mut Vec<u8>, at: usize, v: u32| f[at..at + 4].copy_from_slice(&v.to_le_bytes());
    let w64 = |f: &mut Vec<u8>, at: usize, v: u64| f[at..at + 8].copy_from_slice(&v.to_le_bytes());
    w16(&mut f, 16, 2); // ET_EXEC
    w32(&mut f, 20, 1);
    if class64 {
        w16(&mut f, 18, 62); // EM_X86_64
        w64(&mut f, 24, entry);
        w64(&mut f, 32, 64); // e_phoff
        w16(&mut f, 52, 64); // e_ehsize
        w16(&mut f, 54, 56); // e_phentsize
        w16(&mut f, 56, phs.len() as u16);
        for (i, &(vaddr, paddr, offset, filesz, memsz)) in phs.iter().enumerate() {
            let p = 64 + 56 * i;
            w32(&mut f, p, 1); // PT_LOAD
            w32(&mut f, p + 4, 5);
            w64(&mut f, p + 8, offset);
            w64(&mut f, p + 16, vaddr);
            w64(&mut f, p + 24, paddr);
            w64(&mut f, p + 32, filesz);
            w64(&mut f, p + 40, memsz);
            w64(&mut f, p + 48, 0x1000);
        }
    } else {
        w16(&mut f, 18, 3); // EM_386
        w32(&mut f, 24, entry as u32);
        w32(&mut f, 28, 52); // e_phoff
        w16(&mut f, 40, 52); // e_ehsize
        w16(&mut f, 42, 32); // e_phentsize
        w16(&mut f, 44, phs.len() as u16);
        for (i, &(vaddr, paddr, offset, filesz, memsz)) in phs.iter().enumerate() {
            let p = 52 + 32 * i;
            w32(&mut f, p, 1);
            w32(&mut f, p + 4, offset as u32);
            w32(&mut f, p + 8, vaddr as u32);
            w32(&mut f, p + 12, paddr as u32);
            w32(&mut f, p + 16, filesz as u32);
            w32(&mut f, p + 20, memsz as u32);
            w32(&mut f, p + 24, 5);
            w32(&mut f, p + 28, 0x1000);
        }
    }
    f
}

#[test]
fn v1_address_fields_load_one_segment_from_the_header_back() {
    let mut image = vec![0u8; 0x3000];
    image[0x10] = 0xaa;
    // The header 0x40 into the file, loaded at 0x20_0040: the file's first byte goes to 0x20_0000.
    v1(
        &mut image,
        0x40,
        (1 << 16) | 0b11,
        &[0x20_0040, 0x20_0000, 0x20_2000, 0x20_4000, 0x20_0100],
    );
    let k = KernelImage::parse(&image, None).unwrap();
    assert_eq!(k.header.protocol, Protocol::V1);
    assert_eq!(k.header.offset, 0x40);
    assert!(k.header.page_align_modules);
    assert_eq!(k.entry, 0x20_0100);
    let s = k.segments();
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].paddr, 0x20_0000);
    assert_eq!(s[0].file.len(), 0x2000);
    assert_eq!(s[0].file[0x10], 0xaa);
    assert_eq!(s[0].mem_size, 0x4000);
    assert_eq!(k.span(), (0x20_0000, 0x20_4000));
}

#[test]
fn v1_address_fields_zero_ends_mean_the_whole_file_and_no_bss() {
    let mut image = vec![0u8; 0x1800];
    v1(
        &mut image,
        0,
        1 << 16,
        &[0x40_0000, 0x40_0000, 0, 0, 0x40_000c],
    );
    let k = KernelImage::parse(&image, Some(Protocol::V1)).unwrap();
    assert_eq!(k.segments()[0].file.len(), 0x1800);
    assert_eq!(k.segments()[0].mem_size, 0x1800);
    assert!(!k.header.page_align_modules);
}

#[test]
fn v1_bad_address_fields_are_named() {
    let cases: [(&[u32], &str); 4] = [
        (&[0x1000, 0x2000, 0, 0, 0], "load_addr is above header_addr"),
        (
            &[0x10_1000, 0x10_0000, 0, 0, 0],
            "load_addr would start before the file",
        ),
        (
            &[0x10_0000, 0x10_0000, 0x20_0000, 0, 0],
            "load_end_addr lies past the end of the file",
        ),
        (
            &[0x10_0000, 0x10_0000, 0x10_0100, 0x10_0080, 0],
            "bss_end_addr is below the end of what is loaded",
        ),
    ];
    for (fields, why) in cases {
        let mut image = vec![0u8; 0x1000];
        v1(&mut image, 0, 1 << 16, fields);
        assert_eq!(
            KernelImage::parse(&image, None).unwrap_err(),
            Error::BadAddressFields(why)
        );
    }
    // The fields themselves cut off by the file's end.
    let mut image = vec![0u8; 20];
    v1(&mut image, 0, 1 << 16, &[0x10_0000, 0x10_0000]);
    assert!(matches!(
        KernelImage::parse(&image, None),
        Err(Error::BadAddressFields(_))
    ));
}

#[test]
fn v1_refuses_what_it_must() {
    // A video mode table (bit 2) and an unknown bit 5 are required features it does not give.
    for (flags, unknown) in [(1 << 2, 1 << 2), ((1 << 5) | 1, 1 << 5)] {
        let mut image = vec![0u8; 0x1000];
        v1(&mut image, 0x100, flags, &[]);
        assert_eq!(
            KernelImage::parse(&image, None).unwrap_err(),
            Error::UnknownRequiredFlags(unknown)
        );
    }
    // A wrong checksum, and a header past the first 8 KiB.
    let mut image = vec![0u8; 0x4000];
    put(&mut image, 0x200, &[0x1bad_b002, 0, 0]);
    assert_eq!(
        Header::find(&image, Some(Protocol::V1)).unwrap_err(),
        Error::BadChecksum {
            protocol: Protocol::V1,
            offset: 0x200
        }
    );
    let mut image = vec![0u8; 0x4000];
    v1(
        &mut image,
        0x2000,
        1 << 16,
        &[0x10_0000, 0x10_0000 - 0x2000, 0, 0, 0x10_0000],
    );
    assert_eq!(
        Header::find(&image, None).unwrap_err(),
        Error::NoHeader(None)
    );
    // Misaligned by 2: not a header.
    let mut image = vec![0u8; 0x1000];
    v1(&mut image, 0x102, 0, &[]);
    assert_eq!(
        Header::find(&image, Some(Protocol::V1)).unwrap_err(),
        Error::NoHeader(Some(Protocol::V1))
    );
    // A bad header first, then a good one: the good one.
    let mut image = vec![0u8; 0x1000];
    put(&mut image, 0x10, &[0x1bad_b002, 0, 0]);
    v1(&mut image, 0x20, 0, &[]);
    assert_eq!(Header::find(&image, None).unwrap().offset, 0x20);
}

#[test]
fn v1_elf32_loads_at_physical_addresses_and_moves_the_entry() {
    // Linked at 0xc010_0000, loaded at 0x10_0000 (a higher-half kernel), plus a bss-only segment.
    let mut image = elf(
        false,
        0xc010_0010,
        &[
            (0xc010_0000, 0x10_0000, 0x1000, 0x800, 0x1000),
            (0xc020_0000, 0x20_0000, 0, 0, 0x3000),
            (0xc030_0000, 0x30_0000, 0, 0, 0),
        ],
        0x2000,
    );
    v1(&mut image, 0x1000, 0b10, &[]);
    image[0x1010] = 0x90;
    let k = KernelImage::parse(&image, None).unwrap();
    assert_eq!(k.entry, 0x10_0010);
    let s = k.segments();
    assert_eq!(s.len(), 2, "the empty segment is left out");
    assert_eq!(
        (s[0].paddr, s[0].file.len(), s[0].mem_size),
        (0x10_0000, 0x800, 0x1000)
    );
    assert_eq!(s[0].file[0x10], 0x90);
    assert_eq!(
        (s[1].paddr, s[1].file.len(), s[1].mem_size),
        (0x20_0000, 0, 0x3000)
    );
    assert_eq!(k.span(), (0x10_0000, 0x20_3000));
}

#[test]
fn elf64_as_kvm_unit_tests_builds_it() {
    // An ELF64 kernel with a flags-0 version 1 header and its entry outside every segment: the
    // entry is taken as it is.
    let mut image = elf(
        true,
        0x40_0000,
        &[(0x40_0000, 0x40_0000, 0, 0x1800, 0x5000)],
        0x1800,
    );
    v1(&mut image, 0x400, 0, &[]);
    let k = KernelImage::parse(&image, None).unwrap();
    assert_eq!(k.entry, 0x40_0000);
    assert_eq!(k.segments()[0].mem_size, 0x5000);
    // The same with its entry above 4 GiB: refused.
    let mut image = elf(
        true,
        0x1_0000_0000,
        &[(0x40_0000, 0x40_0000, 0, 0x1800, 0x5000)],
        0x1800,
    );
    v1(&mut image, 0x400, 0, &[]);
    assert_eq!(
        KernelImage::parse(&image, None).unwrap_err(),
        Error::EntryAbove4G(0x1_0000_0000)
    );
}

#[test]
fn bad_elf_segments_are_refused() {
    let bad: [Ph; 4] = [
        // Outside the file.
        (0x10_0000, 0x10_0000, 0x1000, 0x2000, 0x2000),
        // Larger on file than in memory.
        (0x10_0000, 0x10_0000, 0, 0x800, 0x400),
        // Ends above 4 GiB.
        (0xffff_f000, 0xffff_f000, 0, 0, 0x2000),
        // 4 GiB long.
        (0, 0, 0, 0, 1 << 32),
    ];
    for ph in bad {
        let mut image = elf(true, 0x10_0000, &[ph], 0x1800);
        v1(&mut image, 0x400, 0, &[]);
        assert_eq!(
            KernelImage::parse(&image, None).unwrap_err(),
            Error::BadSegment { paddr: ph.1 }
        );
    }
    let phs = [(0x10_0000, 0x10_0000, 0, 0, 0x1000); MAX_SEGMENTS + 1];
    let mut image = elf(true, 0x10_0000, &phs, 0x1800);
    v1(&mut image, 0x1000, 0, &[]);
    assert_eq!(
        KernelImage::parse(&image, None).unwrap_err(),
        Error::TooManySegments
    );
    // Not ELF, no address fields.
    let mut image = vec![0u8; 0x1000];
    v1(&mut image, 0, 0, &[]);
    assert_eq!(KernelImage::parse(&image, None).unwrap_err(), Error::NotElf);
    // ELF without a loadable byte.
    let mut image = elf(false, 0x10_0000, &[], 0x1000);
    v1(&mut image, 0x100, 0, &[]);
    assert_eq!(KernelImage::parse(&image, None).unwrap_err(), Error::Empty);
}

#[test]
fn v2_elf_with_entry_tag_and_optional_requests() {
    let mut image = elf(
        true,
        0x20_0000,
        &[(0x20_0000, 0x20_0000, 0, 0x2000, 0x2000)],
        0x2000,
    );
    v2(
        &mut image,
        0x200,
        &[
            // Required: command line, modules, memory map; optional: a framebuffer tag (8).
            (1, 0, &[1, 3, 6]),
            (1, 1, &[8, 14]),
            (3, 0, &[0x20_0040]),
            (4, 0, &[0b11]),
            (5, 1, &[1024, 768, 32]),
            (6, 0, &[]),
            (10, 1, &[0x10_0000, 0x1000_0000, 0x1000, 0]),
            (77, 1, &[1, 2, 3]),
        ],
    );
    let k = KernelImage::parse(&image, None).unwrap();
    assert_eq!(k.header.protocol, Protocol::V2);
    assert_eq!(k.entry, 0x20_0040, "the entry tag wins over ELF's");
    assert!(k.header.page_align_modules);
    assert_eq!(k.segments().len(), 1);
}

#[test]
fn v2_address_tag_including_load_from_file_start() {
    let mut image = vec![0u8; 0x2000];
    v2(
        &mut image,
        0x18,
        &[
            (2, 0, &[0x30_0018, 0x30_0000, 0x30_1000, 0x30_8000]),
            (3, 0, &[0x30_0100]),
        ],
    );
    let k = KernelImage::parse(&image, Some(Protocol::V2)).unwrap();
    let s = k.segments()[0];
    assert_eq!(
        (s.paddr, s.file.len(), s.mem_size, k.entry),
        (0x30_0000, 0x1000, 0x8000, 0x30_0100)
    );
    // load_addr -1: from the file's start, at header_addr - the header's offset.
    let mut image = vec![0u8; 0x2000];
    v2(
        &mut image,
        0x18,
        &[(2, 0, &[0x30_0018, u32::MAX, 0, 0]), (3, 0, &[0x30_0100])],
    );
    let s = KernelImage::parse(&image, None).unwrap().segments()[0];
    assert_eq!((s.paddr, s.file.len()), (0x30_0000, 0x2000));
    // An address tag without an entry tag.
    let mut image = vec![0u8; 0x2000];
    v2(&mut image, 0x18, &[(2, 0, &[0x30_0018, 0x30_0000, 0, 0])]);
    assert_eq!(
        KernelImage::parse(&image, None).unwrap_err(),
        Error::NoEntry
    );
}

#[test]
fn v2_refuses_what_it_must() {
    let cases: [(&[Tag<'_>], Error); 5] = [
        (&[(1, 0, &[1, 8])], Error::UnsupportedInfoRequest(8)),
        (
            &[(5, 0, &[1024, 768, 32])],
            Error::UnsupportedRequiredTag("a framebuffer"),
        ),
        (
            &[(7, 0, &[])],
            Error::UnsupportedRequiredTag("EFI boot services"),
        ),
        (&[(77, 0, &[])], Error::UnknownRequiredTag(77)),
        (&[(2, 0, &[1])], Error::MalformedHeader { offset: 0x210 }),
    ];
    for (tags, error) in cases {
        let mut image = vec![0u8; 0x1000];
        v2(&mut image, 0x200, tags);
        assert_eq!(Header::find(&image, None).unwrap_err(), error);
    }
    // Not i386.
    let mut image = vec![0u8; 0x1000];
    let sum = 0u32.wrapping_sub(0xe852_50d6u32.wrapping_add(4).wrapping_add(24));
    put(&mut image, 0, &[0xe852_50d6, 4, 24, sum, 0, 8]);
    assert_eq!(
        Header::find(&image, None).unwrap_err(),
        Error::Architecture(4)
    );
    // A header with no end tag, and one longer than the file.
    let mut image = vec![0u8; 0x1000];
    let len = v2(&mut image, 0x200, &[(6, 0, &[])]);
    image[0x200 + len - 8] = 6;
    assert!(matches!(
        Header::find(&image, None),
        Err(Error::MalformedHeader { .. })
    ));
    let mut image = vec![0u8; 0x1000];
    let sum = 0u32.wrapping_sub(0xe852_50d6u32.wrapping_add(0x2000));
    put(&mut image, 0x800, &[0xe852_50d6, 0, 0x2000, sum]);
    assert_eq!(
        Header::find(&image, None).unwrap_err(),
        Error::MalformedHeader { offset: 0x800 }
    );
}

#[test]
fn both_headers_choose_version_2_unless_told() {
    let mut image = elf(
        false,
        0x10_0000,
        &[(0x10_0000, 0x10_0000, 0, 0x1000, 0x1000)],
        0x1000,
    );
    v1(&mut image, 0x100, 0, &[]);
    v2(&mut image, 0x200, &[]);
    assert_eq!(Header::find(&image, None).unwrap().protocol, Protocol::V2);
    assert_eq!(
        Header::find(&image, Some(Protocol::V1)).unwrap().protocol,
        Protocol::V1
    );
    assert_eq!(
        Header::find(&image, Some(Protocol::V2)).unwrap().offset,
        0x200
    );
}

fn sample_memory() -> [MemoryRange; 5] {
    [
        MemoryRange {
            base: 0,
            len: 0x9f000,
            kind: MEMORY_AVAILABLE,
        },
        MemoryRange {
            base: 0xf0000,
            len: 0x10000,
            kind: MEMORY_RESERVED,
        },
        MemoryRange {
            base: 0x10_0000,
            len: 0x30_0000,
            kind: MEMORY_AVAILABLE,
        },
        MemoryRange {
            base: 0x40_0000,
            len: 0x40_0000,
            kind: MEMORY_AVAILABLE,
        },
        MemoryRange {
            base: 0x80_0000,
            len: 0x10_0000,
            kind: MEMORY_RESERVED,
        },
    ]
}

#[test]
fn memory_sizes_follow_the_map() {
    let memory = sample_memory();
    let info = BootInfo {
        cmdline: "",
        loader_name: "",
        modules: &[],
        memory: &memory,
    };
    assert_eq!(info.mem_lower_kib(), 0x9f000 / 1024);
    // 1 MiB .. 8 MiB: two ranges that touch, then a reserved one.
    assert_eq!(info.mem_upper_kib(), 7 * 1024);
    let holed = [MemoryRange {
        base: 0x20_0000,
        len: 0x10_0000,
        kind: MEMORY_AVAILABLE,
    }];
    let info = BootInfo {
        memory: &holed,
        ..info
    };
    assert_eq!((info.mem_lower_kib(), info.mem_upper_kib()), (0, 0));
}

#[repr(C, align(8))]
struct Area([u8; 4096]);

#[test]
fn v2_information_reads_back_with_the_multiboot2_crate() {
    let memory = sample_memory();
    let modules = [
        Module {
            start: 0x50_0000,
            end: 0x50_1234,
            cmdline: "first module",
        },
        Module {
            start: 0x51_0000,
            end: 0x51_0001,
            cmdline: "",
        },
    ];
    let info = BootInfo {
        cmdline: "console=ttyS0 hello",
        loader_name: "ihmi L0",
        modules: &modules,
        memory: &memory,
    };
    let mut area = Area([0xee; 4096]);
    let len = info.write(Protocol::V2, &mut area.0, 0x9000).unwrap();
    assert_eq!(len % 8, 0);
    assert_eq!(
        u32::from_le_bytes(area.0[..4].try_into().unwrap()) as usize,
        len
    );
    // SAFETY: `area` is 8-byte aligned and holds the `len` bytes just written, which the reader
    // checks against their own total size; nothing writes it while `mbi` lives.
    #[allow(unsafe_code)]
    let mbi = unsafe { multiboot2::BootInformation::load(area.0.as_ptr().cast()) }.unwrap();
    assert_eq!(mbi.total_size(), len);
    assert_eq!(
        mbi.command_line_tag().unwrap().cmdline().unwrap(),
        "console=ttyS0 hello"
    );
    assert_eq!(
        mbi.boot_loader_name_tag().unwrap().name().unwrap(),
        "ihmi L0"
    );
    let got: Vec<_> = mbi
        .module_tags()
        .map(|m| (m.start_address(), m.end_address(), m.cmdline().unwrap()))
        .collect();
    assert_eq!(
        got,
        [
            (0x50_0000, 0x50_1234, "first module"),
            (0x51_0000, 0x51_0001, "")
        ]
    );
    let basic = mbi.basic_memory_info_tag().unwrap();
    assert_eq!(
        (basic.memory_lower(), basic.memory_upper()),
        (636, 7 * 1024)
    );
    let areas: Vec<_> = mbi
        .memory_map_tag()
        .unwrap()
        .memory_areas()
        .iter()
        .map(|a| (a.start_address(), a.size(), u32::from(a.typ())))
        .collect();
    let want: Vec<_> = memory.iter().map(|r| (r.base, r.len, r.kind)).collect();
    assert_eq!(areas, want);
}

fn word(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn c_string(b: &[u8], base: u32, address: u32) -> &str {
    let start = (address - base) as usize;
    let end = start + b[start..].iter().position(|&c| c == 0).unwrap();
    core::str::from_utf8(&b[start..end]).unwrap()
}

#[test]
fn v1_information_has_every_field_it_flags() {
    let memory = sample_memory();
    let modules = [Module {
        start: 0x50_0000,
        end: 0x50_2000,
        cmdline: "initrd",
    }];
    let info = BootInfo {
        cmdline: "kernel args",
        loader_name: "ihmi L0",
        modules: &modules,
        memory: &memory,
    };
    let base = 0x9000;
    let mut area = Area([0xee; 4096]);
    let len = info.write(Protocol::V1, &mut area.0, base).unwrap();
    let b = &area.0[..len];
    let flags = word(b, 0);
    assert_eq!(flags, (1 << 0) | (1 << 2) | (1 << 3) | (1 << 6) | (1 << 9));
    assert_eq!((word(b, 4), word(b, 8)), (636, 7 * 1024));
    assert_eq!(word(b, 12), 0, "no boot device");
    assert_eq!(c_string(b, base, word(b, 16)), "kernel args");
    assert_eq!(c_string(b, base, word(b, 64)), "ihmi L0");
    assert_eq!(word(b, 20), 1);
    let table = (word(b, 24) - base) as usize;
    assert_eq!(table % 4, 0);
    assert_eq!((word(b, table), word(b, table + 4)), (0x50_0000, 0x50_2000));
    assert_eq!(c_string(b, base, word(b, table + 8)), "initrd");
    // The memory map: entries of a size word (20) then base, length, type, walked as a kernel does.
    let (mmap_len, mmap) = (word(b, 44) as usize, (word(b, 48) - base) as usize);
    let mut at = mmap;
    let mut got = Vec::new();
    while at < mmap + mmap_len {
        let size = word(b, at) as usize;
        let q = |o: usize| u64::from(word(b, at + o)) | u64::from(word(b, at + o + 4)) << 32;
        got.push(MemoryRange {
            base: q(4),
            len: q(12),
            kind: word(b, at + 20),
        });
        at += size + 4;
    }
    assert_eq!(got, memory);
    // The unused fields are zero: no symbols, drives, APM, VBE or framebuffer.
    assert!(b[28..44]
        .iter()
        .chain(&b[52..64])
        .chain(&b[68..116])
        .all(|&x| x == 0));
}

#[test]
fn information_that_does_not_fit_is_refused() {
    let memory = sample_memory();
    let info = BootInfo {
        cmdline: "x",
        loader_name: "y",
        modules: &[],
        memory: &memory,
    };
    let mut small = [0u8; 64];
    for p in [Protocol::V1, Protocol::V2] {
        assert_eq!(info.write(p, &mut small, 0x9000), Err(Error::InfoTooLarge));
        let mut area = Area([0; 4096]);
        assert_eq!(
            info.write(p, &mut area.0, 0xffff_ff80),
            Err(Error::InfoTooLarge)
        );
        assert_eq!(
            info.write(p, &mut area.0, 0x9004),
            Err(Error::InfoMisaligned(0x9004))
        );
    }
}

#[test]
fn address_fields_record_what_the_header_said() {
    let mut image = vec![0u8; 0x1000];
    v1(
        &mut image,
        8,
        1 << 16,
        &[0x10_0008, 0x10_0000, 0x10_0800, 0x10_1000, 0x10_0020],
    );
    let h = Header::find(&image, None).unwrap();
    assert_eq!(
        h.address,
        Some(AddressFields {
            header_addr: 0x10_0008,
            load_addr: 0x10_0000,
            load_end_addr: 0x10_0800,
            bss_end_addr: 0x10_1000,
        })
    );
    assert_eq!(h.entry, Some(0x10_0020));
}
