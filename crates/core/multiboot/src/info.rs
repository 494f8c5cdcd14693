//! The boot information a multiboot loader hands the kernel (Multiboot 0.6.96 §3.3, Multiboot2 2.0
//! §3.6), written into a buffer that will sit at a given physical address below 4 GiB.

use crate::{Error, Protocol};

/// Memory-map types both versions share.
pub const MEMORY_AVAILABLE: u32 = 1;
pub const MEMORY_RESERVED: u32 = 2;
pub const MEMORY_ACPI_RECLAIMABLE: u32 = 3;
pub const MEMORY_NVS: u32 = 4;
pub const MEMORY_BAD: u32 = 5;

/// Version 1's `multiboot_info` is 116 bytes (through the framebuffer fields); the strings and
/// tables follow it.
const V1_INFO_SIZE: usize = 120;
const V1_FLAG_MEMORY: u32 = 1 << 0;
const V1_FLAG_CMDLINE: u32 = 1 << 2;
const V1_FLAG_MODULES: u32 = 1 << 3;
const V1_FLAG_MMAP: u32 = 1 << 6;
const V1_FLAG_LOADER_NAME: u32 = 1 << 9;
/// A memory-map entry: version 1's is a 4-byte size then 20 bytes; version 2's is 24 bytes.
const MMAP_ENTRY: usize = 24;
const ONE_MIB: u64 = 0x10_0000;
const LOW_MEMORY_END: u64 = 640 * 1024;

/// One range of the physical memory map.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryRange {
    pub base: u64,
    pub len: u64,
    /// [`MEMORY_AVAILABLE`], [`MEMORY_RESERVED`], ...
    pub kind: u32,
}

/// A module the loader put in memory: `[start, end)` and its command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Module<'a> {
    pub start: u32,
    pub end: u32,
    pub cmdline: &'a str,
}

/// What the kernel is told.
#[derive(Clone, Copy, Debug)]
pub struct BootInfo<'a> {
    pub cmdline: &'a str,
    pub loader_name: &'a str,
    pub modules: &'a [Module<'a>],
    /// The whole map, RAM and not.
    pub memory: &'a [MemoryRange],
}

impl BootInfo<'_> {
    /// KiB of RAM from address 0 (at most 640).
    pub fn mem_lower_kib(&self) -> u32 {
        self.memory
            .iter()
            .find(|r| r.kind == MEMORY_AVAILABLE && r.base == 0)
            .map_or(0, |r| (r.len.min(LOW_MEMORY_END) / 1024) as u32)
    }

    /// KiB of RAM from 1 MiB up to the first hole (adjacent RAM ranges run together).
    pub fn mem_upper_kib(&self) -> u32 {
        let mut end = ONE_MIB;
        while let Some(r) = self.memory.iter().find(|r| {
            r.kind == MEMORY_AVAILABLE && r.base <= end && r.base.saturating_add(r.len) > end
        }) {
            end = r.base.saturating_add(r.len);
        }
        ((end - ONE_MIB) / 1024).min(u64::from(u32::MAX)) as u32
    }

    /// Writes the boot information of `protocol` into `buf`, which the kernel will find at physical
    /// address `at` (8-byte aligned); returns how many bytes it took.
    pub fn write(&self, protocol: Protocol, buf: &mut [u8], at: u32) -> Result<usize, Error> {
        if !at.is_multiple_of(8) {
            return Err(Error::InfoMisaligned(at));
        }
        let mut out = Out { buf, len: 0, at };
        match protocol {
            Protocol::V1 => self.write_v1(&mut out)?,
            Protocol::V2 => self.write_v2(&mut out)?,
        }
        if u64::from(at) + out.len as u64 > 1 << 32 {
            return Err(Error::InfoTooLarge);
        }
        Ok(out.len)
    }

    fn write_v1(&self, out: &mut Out<'_>) -> Result<(), Error> {
        out.zeros(V1_INFO_SIZE)?;
        let cmdline = out.string(self.cmdline)?;
        let name = out.string(self.loader_name)?;
        out.align(4)?;
        let table = out.len;
        out.zeros(16 * self.modules.len())?;
        for (i, m) in self.modules.iter().enumerate() {
            let string = out.string(m.cmdline)?;
            let e = table + 16 * i;
            out.set_u32(e, m.start);
            out.set_u32(e + 4, m.end);
            out.set_u32(e + 8, string);
        }
        out.align(8)?;
        let mmap = out.len;
        for r in self.memory {
            out.u32((MMAP_ENTRY - 4) as u32)?;
            out.u64(r.base)?;
            out.u64(r.len)?;
            out.u32(r.kind)?;
        }
        let flags =
            V1_FLAG_MEMORY | V1_FLAG_CMDLINE | V1_FLAG_MODULES | V1_FLAG_MMAP | V1_FLAG_LOADER_NAME;
        out.set_u32(0, flags);
        out.set_u32(4, self.mem_lower_kib());
        out.set_u32(8, self.mem_upper_kib());
        out.set_u32(16, cmdline);
        out.set_u32(20, self.modules.len() as u32);
        out.set_u32(24, out.address(table));
        out.set_u32(44, (out.len - mmap) as u32);
        out.set_u32(48, out.address(mmap));
        out.set_u32(64, name);
        Ok(())
    }

    fn write_v2(&self, out: &mut Out<'_>) -> Result<(), Error> {
        // total_size, reserved.
        out.zeros(8)?;
        out.tag(1, |o| o.string(self.cmdline).map(drop))?;
        out.tag(2, |o| o.string(self.loader_name).map(drop))?;
        for m in self.modules {
            out.tag(3, |o| {
                o.u32(m.start)?;
                o.u32(m.end)?;
                o.string(m.cmdline).map(drop)
            })?;
        }
        out.tag(4, |o| {
            o.u32(self.mem_lower_kib())?;
            o.u32(self.mem_upper_kib())
        })?;
        out.tag(6, |o| {
            o.u32(MMAP_ENTRY as u32)?;
            o.u32(0)?;
            for r in self.memory {
                o.u64(r.base)?;
                o.u64(r.len)?;
                o.u32(r.kind)?;
                o.u32(0)?;
            }
            Ok(())
        })?;
        out.tag(0, |_| Ok(()))?;
        let total = out.len as u32;
        out.set_u32(0, total);
        Ok(())
    }
}

/// A cursor over the buffer; `at` is the buffer's physical address.
struct Out<'b> {
    buf: &'b mut [u8],
    len: usize,
    at: u32,
}

impl Out<'_> {
    fn bytes(&mut self, b: &[u8]) -> Result<(), Error> {
        let end = self.len.checked_add(b.len()).ok_or(Error::InfoTooLarge)?;
        self.buf
            .get_mut(self.len..end)
            .ok_or(Error::InfoTooLarge)?
            .copy_from_slice(b);
        self.len = end;
        Ok(())
    }

    fn zeros(&mut self, n: usize) -> Result<(), Error> {
        let end = self.len.checked_add(n).ok_or(Error::InfoTooLarge)?;
        self.buf
            .get_mut(self.len..end)
            .ok_or(Error::InfoTooLarge)?
            .fill(0);
        self.len = end;
        Ok(())
    }

    fn u32(&mut self, v: u32) -> Result<(), Error> {
        self.bytes(&v.to_le_bytes())
    }

    fn u64(&mut self, v: u64) -> Result<(), Error> {
        self.bytes(&v.to_le_bytes())
    }

    fn align(&mut self, n: usize) -> Result<(), Error> {
        self.zeros(self.len.next_multiple_of(n) - self.len)
    }

    /// A NUL-terminated string; returns its physical address.
    fn string(&mut self, s: &str) -> Result<u32, Error> {
        let address = self.address(self.len);
        self.bytes(s.as_bytes())?;
        self.bytes(&[0])?;
        Ok(address)
    }

    /// The physical address of buffer offset `offset` (what [`BootInfo::write`] checks fits).
    fn address(&self, offset: usize) -> u32 {
        self.at.wrapping_add(offset as u32)
    }

    /// Overwrites a word already written.
    fn set_u32(&mut self, offset: usize, v: u32) {
        self.buf[offset..offset + 4].copy_from_slice(&v.to_le_bytes());
    }

    /// A version 2 tag: type, size, then what `body` writes, padded to 8 bytes.
    fn tag(
        &mut self,
        typ: u32,
        body: impl FnOnce(&mut Self) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let start = self.len;
        self.u32(typ)?;
        self.u32(0)?;
        body(self)?;
        let size = (self.len - start) as u32;
        self.set_u32(start + 4, size);
        self.align(8)
    }
}
