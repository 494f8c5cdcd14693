#![doc = include_str!("../README.md")]
#![no_std]
#![deny(unsafe_code)]

use core::fmt;

pub mod place;
pub mod profile;

pub use profile::{KvmProfile, LinuxProfile};

/// Offset of the setup header in a bzImage and in the zero page (boot.rst, "THE REAL-MODE KERNEL
/// HEADER").
pub const SETUP_HEADER: usize = 0x1f1;
/// The selectors the 64-bit boot protocol requires (boot.rst, "64-bit Boot Protocol").
pub const BOOT_CS: u16 = 0x10;
/// See [`BOOT_CS`].
pub const BOOT_DS: u16 = 0x18;
/// The 64-bit entry point is this far into the protected-mode kernel.
pub const ENTRY_64_OFFSET: u64 = 0x200;
/// Zero-page slots for e820 entries (zero-page.rst: 0x2d0, 0xa00 bytes of 20-byte entries).
pub const E820_MAX: usize = 128;

const MAGIC: u32 = 0x5372_6448; // "HdrS"
const MIN_VERSION: u16 = 0x020c; // 2.12: xloadflags
const XLF_KERNEL_64: u16 = 1 << 0;
const LOADED_HIGH: u8 = 1 << 0;
const CAN_USE_HEAP: u8 = 1 << 7;
/// "Undefined" boot loader id (boot.rst, type_of_loader).
const LOADER_UNDEFINED: u8 = 0xff;

/// Why a kernel image cannot be booted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootError {
    /// Shorter than its own header says.
    Truncated,
    /// No `HdrS` signature: not a bzImage.
    NotBzImage,
    /// Boot protocol older than 2.12.
    TooOld(u16),
    /// The kernel has no 64-bit entry point (XLF_KERNEL_64 clear).
    No64BitEntry,
    /// The command line is longer than the kernel accepts.
    CmdlineTooLong { len: usize, max: u32 },
    /// More memory-map entries than the zero page holds.
    TooManyE820,
}

impl fmt::Display for BootError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated => f.write_str("the kernel image is truncated"),
            Self::NotBzImage => f.write_str("not a bzImage (no HdrS signature at 0x202)"),
            Self::TooOld(v) => write!(
                f,
                "boot protocol {}.{} is older than 2.12",
                v >> 8,
                v & 0xff
            ),
            Self::No64BitEntry => f.write_str("the kernel has no 64-bit entry point"),
            Self::CmdlineTooLong { len, max } => {
                write!(
                    f,
                    "the command line has {len} bytes; the kernel takes {max}"
                )
            }
            Self::TooManyE820 => write!(f, "more than {E820_MAX} memory-map entries"),
        }
    }
}

fn u8_at(b: &[u8], off: usize) -> Result<u8, BootError> {
    b.get(off).copied().ok_or(BootError::Truncated)
}

fn u16_at(b: &[u8], off: usize) -> Result<u16, BootError> {
    let s = b.get(off..off + 2).ok_or(BootError::Truncated)?;
    Ok(u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, BootError> {
    let s = b.get(off..off + 4).ok_or(BootError::Truncated)?;
    Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn u64_at(b: &[u8], off: usize) -> Result<u64, BootError> {
    Ok(u64::from(u32_at(b, off)?) | (u64::from(u32_at(b, off + 4)?) << 32))
}

/// A checked bzImage.
#[derive(Clone, Copy, Debug)]
pub struct Kernel<'a> {
    /// The setup header as in the image, from 0x1f1 to its declared end.
    header: &'a [u8],
    /// The protected-mode kernel, loaded at [`Kernel::load_address`].
    pub payload: &'a [u8],
    /// Boot protocol version.
    pub version: u16,
    /// Where the kernel wants to be loaded.
    pub pref_address: u64,
    /// Where it will be loaded: `pref_address` unless [`Kernel::place`] moved it.
    pub load_address: u64,
    /// Whether it may be loaded elsewhere (`relocatable_kernel`), and at what alignment.
    pub relocatable: bool,
    pub kernel_alignment: u32,
    /// Memory it needs from there during start-up (decompression included).
    pub init_size: u32,
    /// The highest address the initrd may end below.
    pub initrd_addr_max: u32,
    /// The longest command line, without its NUL.
    pub cmdline_size: u32,
}

impl<'a> Kernel<'a> {
    /// Checks `image` and splits it.
    pub fn parse(image: &'a [u8]) -> Result<Self, BootError> {
        if u32_at(image, 0x202)? != MAGIC {
            return Err(BootError::NotBzImage);
        }
        let version = u16_at(image, 0x206)?;
        if version < MIN_VERSION {
            return Err(BootError::TooOld(version));
        }
        if u16_at(image, 0x236)? & XLF_KERNEL_64 == 0 {
            return Err(BootError::No64BitEntry);
        }
        // 0 setup sectors means 4 (boot.rst, setup_sects).
        let setup_sects = match u8_at(image, SETUP_HEADER)? {
            0 => 4,
            n => usize::from(n),
        };
        let header_end = 0x202 + usize::from(u8_at(image, 0x201)?);
        let header = image
            .get(SETUP_HEADER..header_end)
            .ok_or(BootError::Truncated)?;
        let payload = image
            .get((setup_sects + 1) * 512..)
            .ok_or(BootError::Truncated)?;
        Ok(Self {
            header,
            payload,
            version,
            pref_address: u64_at(image, 0x258)?,
            load_address: u64_at(image, 0x258)?,
            relocatable: u8_at(image, 0x234)? != 0,
            kernel_alignment: u32_at(image, 0x230)?,
            init_size: u32_at(image, 0x260)?,
            initrd_addr_max: u32_at(image, 0x22c)?,
            cmdline_size: u32_at(image, 0x238)?,
        })
    }

    /// Bytes the kernel occupies from its load address while it starts: its start-up area (`init_size`,
    /// decompression included), or the payload itself if that is larger.
    #[must_use]
    pub fn span(&self) -> u64 {
        u64::from(self.init_size).max(self.payload.len() as u64)
    }

    /// The 64-bit entry point once loaded at `load_address`.
    #[must_use]
    pub const fn entry_64(&self) -> u64 {
        self.load_address + ENTRY_64_OFFSET
    }

    /// Chooses the load address: `pref_address` if `fits(address, span)`, else, for a relocatable
    /// kernel, the lowest address above it at the kernel's alignment (at least 2 MiB) that fits
    /// (below 4 GiB). `None`
    /// if nothing fits. A relocated 64-bit kernel keeps its virtual addresses: its image mapping then
    /// starts at `load_address - pref_address` ([`Kernel::phys_offset`]).
    pub fn place(&mut self, fits: impl Fn(u64, u64) -> bool) -> Option<u64> {
        let span = self.span();
        if fits(self.pref_address, span) {
            self.load_address = self.pref_address;
            return Some(self.load_address);
        }
        let align = u64::from(self.kernel_alignment);
        if !self.relocatable || !align.is_power_of_two() {
            return None;
        }
        // Candidates step by at least 2 MiB (a multiple of any smaller power of two, and the least
        // alignment an x86-64 kernel is built with), so a header claiming 1-byte alignment cannot
        // make the search billions of steps long.
        let step = align.max(MIN_RELOCATION_STEP);
        let mut at = self.pref_address.checked_next_multiple_of(step)?;
        while at.checked_add(span).is_some_and(|end| end <= 1 << 32) {
            if fits(at, span) {
                self.load_address = at;
                return Some(at);
            }
            at += step;
        }
        None
    }

    /// How far the kernel was moved from where it asked to be.
    #[must_use]
    pub const fn phys_offset(&self) -> u64 {
        self.load_address - self.pref_address
    }
}

/// The smallest step [`Kernel::place`] searches by: x86-64's `CONFIG_PHYSICAL_ALIGN` is a multiple of
/// 2 MiB.
pub const MIN_RELOCATION_STEP: u64 = 0x20_0000;

/// The `setup_data` type ihmi uses for the gate's pages: not one the kernel knows (boot.rst lists 1 to
/// 9 and `SETUP_INDIRECT`), so it only reserves the range and keeps it in its direct map.
pub const SETUP_IHMI: u32 = 0x6968_6d69; // "ihmi"

/// The kind of an e820 range (zero-page.rst; ACPI's address range types).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[repr(u32)]
pub enum E820Kind {
    /// Usable RAM.
    Ram = 1,
    /// Reserved: not RAM for the kernel.
    #[default]
    Reserved = 2,
    /// ACPI tables the kernel may reclaim once read.
    Acpi = 3,
    /// ACPI non-volatile storage.
    Nvs = 4,
    /// Faulty memory.
    Unusable = 5,
}

/// One e820 range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// First byte.
    pub addr: u64,
    /// Length.
    pub size: u64,
    /// What it is.
    pub kind: E820Kind,
}

/// The zero page.
#[derive(Clone)]
pub struct BootParams {
    bytes: [u8; 4096],
}

impl fmt::Debug for BootParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BootParams")
            .field("e820_entries", &self.bytes[0x1e8])
            .finish_non_exhaustive()
    }
}

impl BootParams {
    /// A zero page for `kernel`: zeroed, with its setup header copied in and the loader fields set
    /// (an undefined loader, the kernel loaded high, the heap usable).
    #[must_use]
    pub fn new(kernel: &Kernel<'_>) -> Self {
        let mut bytes = [0u8; 4096];
        bytes[SETUP_HEADER..SETUP_HEADER + kernel.header.len()].copy_from_slice(kernel.header);
        let mut p = Self { bytes };
        p.bytes[0x210] = LOADER_UNDEFINED;
        p.bytes[0x211] |= LOADED_HIGH | CAN_USE_HEAP;
        p.put_u32(0x214, kernel.load_address as u32);
        p
    }

    /// The first `setup_data` header, guest-physical (boot.rst, `setup_data`).
    pub fn set_setup_data(&mut self, pa: u64) {
        self.bytes[0x250..0x258].copy_from_slice(&pa.to_le_bytes());
    }

    fn put_u32(&mut self, off: usize, v: u32) {
        self.bytes[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn put_u64(&mut self, off: usize, v: u64) {
        self.bytes[off..off + 8].copy_from_slice(&v.to_le_bytes());
    }

    /// Where the NUL-terminated command line of `len` bytes (NUL excluded) is.
    pub fn set_cmdline(
        &mut self,
        kernel: &Kernel<'_>,
        addr: u64,
        len: usize,
    ) -> Result<(), BootError> {
        if len > kernel.cmdline_size as usize {
            return Err(BootError::CmdlineTooLong {
                len,
                max: kernel.cmdline_size,
            });
        }
        self.put_u32(0x228, addr as u32);
        self.put_u32(0x0c8, (addr >> 32) as u32);
        Ok(())
    }

    /// Where the initrd is.
    pub fn set_initrd(&mut self, addr: u64, size: u64) {
        self.put_u32(0x218, addr as u32);
        self.put_u32(0x21c, size as u32);
        self.put_u32(0x0c0, (addr >> 32) as u32);
        self.put_u32(0x0c4, (size >> 32) as u32);
    }

    /// The physical address of the ACPI RSDP, when the loader knows it.
    pub fn set_acpi_rsdp(&mut self, addr: u64) {
        self.put_u64(0x070, addr);
    }

    /// The memory map the kernel will use.
    pub fn set_e820(&mut self, entries: &[E820Entry]) -> Result<(), BootError> {
        if entries.len() > E820_MAX {
            return Err(BootError::TooManyE820);
        }
        for (i, e) in entries.iter().enumerate() {
            let off = 0x2d0 + i * 20;
            self.put_u64(off, e.addr);
            self.put_u64(off + 8, e.size);
            self.put_u32(off + 16, e.kind as u32);
        }
        self.bytes[0x1e8] = entries.len() as u8;
        Ok(())
    }

    /// The page as the kernel reads it.
    #[must_use]
    pub const fn as_bytes(&self) -> &[u8; 4096] {
        &self.bytes
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec;
    use std::vec::Vec;

    use super::*;

    /// A bzImage with 2 setup sectors, protocol 2.15 and a 64-bit entry.
    fn image() -> Vec<u8> {
        let mut b = vec![0u8; 3 * 512 + 100];
        b[SETUP_HEADER] = 2;
        b[0x201] = 0x6a; // header ends at 0x26c
        b[0x202..0x206].copy_from_slice(b"HdrS");
        b[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        b[0x211] = 0x01;
        b[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
        b[0x236..0x238].copy_from_slice(&0x0003u16.to_le_bytes());
        b[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes());
        b[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes());
        b[0x260..0x264].copy_from_slice(&0x80_0000u32.to_le_bytes());
        b[3 * 512] = 0xaa; // first payload byte
        b
    }

    #[test]
    fn a_relocatable_kernel_moves_to_the_first_aligned_place_that_fits() {
        let mut img = image();
        // Free from 0x1500000 on: the preferred 0x1000000 is taken (by the boot loader's modules).
        let fits = |at: u64, span: u64| at >= 0x150_0000 && at + span <= 0x1000_0000;
        let mut k = Kernel::parse(&img).unwrap();
        assert_eq!(k.place(fits), None, "not relocatable");
        img[0x234] = 1;
        img[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes());
        let mut k = Kernel::parse(&img).unwrap();
        assert_eq!(k.place(fits), Some(0x160_0000));
        assert_eq!((k.load_address, k.phys_offset()), (0x160_0000, 0x60_0000));
        assert_eq!(k.entry_64(), 0x160_0200);
        assert_eq!(
            u32::from_le_bytes(
                BootParams::new(&k).as_bytes()[0x214..0x218]
                    .try_into()
                    .unwrap()
            ),
            0x160_0000,
            "code32_start says where it is"
        );
        // Where it asked to be, when that fits.
        let mut k = Kernel::parse(&img).unwrap();
        assert_eq!(k.place(|_, _| true), Some(0x100_0000));
        assert_eq!(k.phys_offset(), 0);
        // A header claiming 1-byte alignment is searched in 2 MiB steps (the fuzzer found the
        // byte-by-byte search taking seconds), and nothing that fits is a refusal, quickly.
        img[0x230..0x234].copy_from_slice(&1u32.to_le_bytes());
        let mut k = Kernel::parse(&img).unwrap();
        assert_eq!(k.place(fits), Some(0x160_0000));
        let mut k = Kernel::parse(&img).unwrap();
        assert_eq!(k.place(|_, _| false), None);
    }

    #[test]
    fn parses_the_header_and_finds_the_payload() {
        let img = image();
        let k = Kernel::parse(&img).unwrap();
        assert_eq!(k.version, 0x020f);
        assert_eq!(k.pref_address, 0x100_0000);
        assert_eq!(k.entry_64(), 0x100_0200);
        assert_eq!(k.init_size, 0x80_0000);
        assert_eq!(k.payload.len(), 100);
        assert_eq!(k.span(), 0x80_0000, "init_size, larger than the payload");
        assert_eq!(k.payload[0], 0xaa);
    }

    #[test]
    fn refuses_what_it_cannot_boot() {
        let mut img = image();
        img[0x202] = b'X';
        assert_eq!(Kernel::parse(&img).unwrap_err(), BootError::NotBzImage);
        let mut img = image();
        img[0x206..0x208].copy_from_slice(&0x0209u16.to_le_bytes());
        assert_eq!(Kernel::parse(&img).unwrap_err(), BootError::TooOld(0x0209));
        let mut img = image();
        img[0x236] = 0;
        assert_eq!(Kernel::parse(&img).unwrap_err(), BootError::No64BitEntry);
        assert_eq!(
            Kernel::parse(&image()[..0x300]).unwrap_err(),
            BootError::Truncated
        );
        assert_eq!(Kernel::parse(&[]).unwrap_err(), BootError::Truncated);
    }

    #[test]
    fn zero_page_fields_land_where_the_kernel_reads_them() {
        let img = image();
        let k = Kernel::parse(&img).unwrap();
        let mut p = BootParams::new(&k);
        let b = p.as_bytes();
        assert_eq!(&b[0x202..0x206], b"HdrS", "setup header copied");
        assert_eq!(b[0x210], 0xff, "loader type");
        assert_eq!(b[0x211] & 0x81, 0x81, "loaded high, heap usable");
        p.set_cmdline(&k, 0x2_0000, 30).unwrap();
        assert_eq!(
            p.set_cmdline(&k, 0x2_0000, 3000),
            Err(BootError::CmdlineTooLong {
                len: 3000,
                max: 2047
            })
        );
        p.set_initrd(0x1_2345_6000, 0x20_0000);
        p.set_acpi_rsdp(0xf_5a10);
        p.set_e820(&[
            E820Entry {
                addr: 0,
                size: 0x9_f000,
                kind: E820Kind::Ram,
            },
            E820Entry {
                addr: 0xf_0000,
                size: 0x1_0000,
                kind: E820Kind::Reserved,
            },
        ])
        .unwrap();
        let b = p.as_bytes();
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        assert_eq!(u32_at(0x228), 0x2_0000);
        assert_eq!(
            (u32_at(0x218), u32_at(0x0c0)),
            (0x2345_6000, 1),
            "initrd split at 4 GiB"
        );
        assert_eq!(u32_at(0x21c), 0x20_0000);
        assert_eq!(u32_at(0x070), 0xf_5a10);
        assert_eq!(b[0x1e8], 2);
        assert_eq!(u32_at(0x2d0 + 20 + 16), 2, "second entry reserved");
        assert_eq!(u32_at(0x2d0 + 8), 0x9_f000);
        let too_many = [E820Entry {
            addr: 0,
            size: 1,
            kind: E820Kind::Ram,
        }; E820_MAX + 1];
        assert_eq!(p.set_e820(&too_many), Err(BootError::TooManyE820));
    }
}
