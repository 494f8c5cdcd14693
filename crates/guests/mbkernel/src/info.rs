//! Reads the boot information by hand, independently of the writer in L0 (`ihmi-multiboot`): version
//! 1's fixed structure with its pointers (multiboot spec §3.3), version 2's tags (multiboot2 spec
//! §3.6). Every read is checked to lie below 4 GiB (the entry's identity map), and every module
//! against the kernel's own image.

use ihmi_abi::multiboot::Handed;

use crate::Checks;

extern "C" {
    static __kernel_start: u8;
    static __kernel_end: u8;
}

/// What the boot information held.
pub struct Found {
    pub cmdline: &'static str,
    pub digest: u64,
    pub modules: u32,
    /// Bytes of available RAM in the memory map, and its entries.
    pub ram: u64,
    pub entries: u64,
}

const LIMIT: u64 = 1 << 32;
/// Longest string taken (a longer one fails a check).
const STRING_MAX: u64 = 4096;
/// Most modules read.
const MODULES_MAX: usize = 16;
const MEMORY_AVAILABLE: u32 = 1;
/// Version 1 flags: memory fields, command line, modules, memory map, loader name.
const V1_NEEDED: u32 = (1 << 0) | (1 << 2) | (1 << 3) | (1 << 6) | (1 << 9);

fn inside(addr: u64, len: u64) -> bool {
    addr != 0 && addr.checked_add(len).is_some_and(|end| end <= LIMIT)
}

fn kernel() -> (u64, u64) {
    // Only the symbols' addresses are taken; the linker script defines both.
    (
        core::ptr::addr_of!(__kernel_start) as u64,
        core::ptr::addr_of!(__kernel_end) as u64,
    )
}

fn overlaps_kernel(start: u64, end: u64) -> bool {
    let (k0, k1) = kernel();
    start < k1 && k0 < end
}

/// Physical memory below 4 GiB, which the entry identity-maps: every read is checked to lie there,
/// and a read that does not is `None`.
#[derive(Clone, Copy)]
struct Phys(());

impl Phys {
    /// # Safety
    /// The first 4 GiB are identity-mapped, and nothing writes what is read while the values and
    /// slices handed out live (the loader's boot information and modules, which nothing else uses).
    unsafe fn new() -> Self {
        Self(())
    }

    fn u32(self, addr: u64) -> Option<u32> {
        // SAFETY: `new`'s contract; below 4 GiB (checked); unaligned reads are allowed.
        inside(addr, 4).then(|| unsafe { core::ptr::read_unaligned(addr as *const u32) })
    }

    fn u64(self, addr: u64) -> Option<u64> {
        // SAFETY: as `u32`.
        inside(addr, 8).then(|| unsafe { core::ptr::read_unaligned(addr as *const u64) })
    }

    /// `[start, end)`.
    fn bytes(self, start: u64, end: u64) -> Option<&'static [u8]> {
        if end < start || !inside(start, end - start) {
            return None;
        }
        // SAFETY: `new`'s contract; below 4 GiB (checked).
        Some(unsafe { core::slice::from_raw_parts(start as *const u8, (end - start) as usize) })
    }

    /// The NUL-terminated string at `addr`, without its NUL, if it ends within [`STRING_MAX`] bytes
    /// and below `limit`.
    fn string(self, addr: u64, limit: u64) -> Option<&'static [u8]> {
        let limit = limit.min(addr.saturating_add(STRING_MAX)).min(LIMIT);
        let bytes = self.bytes(addr, limit.max(addr))?;
        let len = bytes.iter().position(|&b| b == 0)?;
        Some(&bytes[..len])
    }
}

struct Module {
    start: u64,
    end: u64,
    cmdline: &'static [u8],
}

/// What both versions give, gathered before the digest folds it in its order.
struct Gathered {
    cmdline: &'static [u8],
    loader: &'static [u8],
    modules: [Option<Module>; MODULES_MAX],
    count: usize,
    lower: u32,
    upper: u32,
    ram: u64,
    entries: u64,
}

impl Gathered {
    const fn new() -> Self {
        Self {
            cmdline: b"",
            loader: b"",
            modules: [const { None }; MODULES_MAX],
            count: 0,
            lower: 0,
            upper: 0,
            ram: 0,
            entries: 0,
        }
    }

    fn module(&mut self, checks: &mut Checks, m: Module) {
        checks.check(
            m.start.is_multiple_of(4096),
            "a module is page-aligned, as asked",
        );
        checks.check(m.start <= m.end, "a module's end is not below its start");
        checks.check(
            !overlaps_kernel(m.start, m.end),
            "a module lies outside the kernel",
        );
        match self.modules.get_mut(self.count) {
            Some(slot) => *slot = Some(m),
            None => checks.check(false, "at most 16 modules"),
        }
        self.count += 1;
    }

    fn memory(&mut self, len: u64, kind: u32) {
        if kind == MEMORY_AVAILABLE {
            self.ram += len;
        }
        self.entries += 1;
    }

    fn finish(self, phys: Phys, protocol: u8, checks: &mut Checks) -> Found {
        let mut handed = Handed::new(protocol, self.cmdline, self.loader);
        for m in self.modules.iter().flatten() {
            match phys.bytes(m.start, m.end) {
                Some(contents) => handed.module(contents, m.cmdline),
                None => checks.check(false, "a module lies below 4 GiB"),
            }
        }
        Found {
            cmdline: core::str::from_utf8(self.cmdline).unwrap_or("(not UTF-8)"),
            digest: handed.memory(self.lower, self.upper, self.ram, self.entries),
            modules: self.count as u32,
            ram: self.ram,
            entries: self.entries,
        }
    }
}

/// Reads the boot information of `protocol` at `info`.
///
/// # Safety
/// A multiboot loader of that protocol handed `info`, the first 4 GiB are identity-mapped, and the
/// memory the boot information and its pointers name is not written while this runs.
pub unsafe fn read(protocol: u8, info: u32, checks: &mut Checks) -> Option<Found> {
    // SAFETY: this function's contract.
    let phys = unsafe { Phys::new() };
    let info = u64::from(info);
    let mut g = Gathered::new();
    let read = if protocol == 1 { read_v1 } else { read_v2 };
    match read(phys, info, &mut g, checks) {
        Some(()) => Some(g.finish(phys, protocol, checks)),
        None => {
            checks.check(false, "the boot information can be read to its end");
            None
        }
    }
}

/// Version 1: the fixed structure, then the tables and strings its fields point at. `None`: a
/// pointer or table that does not lie below 4 GiB, or a malformed memory map.
fn read_v1(phys: Phys, info: u64, g: &mut Gathered, checks: &mut Checks) -> Option<()> {
    const SIZE: u64 = 116;
    if !inside(info, SIZE) {
        return None;
    }
    checks.check(
        !overlaps_kernel(info, info + SIZE),
        "the boot information lies outside the kernel",
    );
    let field = |offset: u64| phys.u32(info + offset).map(u64::from);
    let flags = field(0)? as u32;
    checks.check(
        flags & V1_NEEDED == V1_NEEDED,
        "flags give memory, command line, modules, memory map and loader name",
    );
    if flags & V1_NEEDED != V1_NEEDED {
        return None;
    }
    let string = |addr: u64, what: &str, checks: &mut Checks| {
        let s = phys.string(addr, LIMIT);
        checks.check(s.is_some(), what);
        s.unwrap_or(b"")
    };
    g.lower = field(4)? as u32;
    g.upper = field(8)? as u32;
    g.cmdline = string(field(16)?, "the command line is a string", checks);
    g.loader = string(field(64)?, "the loader's name is a string", checks);
    let (count, table) = (field(20)?, field(24)?);
    if count > 0 && !inside(table, count.checked_mul(16)?) {
        return None;
    }
    for i in 0..count {
        let e = table + 16 * i;
        let cmdline = string(
            u64::from(phys.u32(e + 8)?),
            "a module's command line is a string",
            checks,
        );
        let m = Module {
            start: u64::from(phys.u32(e)?),
            end: u64::from(phys.u32(e + 4)?),
            cmdline,
        };
        g.module(checks, m);
    }
    let (len, map) = (field(44)?, field(48)?);
    if !inside(map, len) {
        return None;
    }
    let mut at = map;
    while at + 24 <= map + len {
        let size = u64::from(phys.u32(at)?);
        checks.check(size >= 20, "a memory-map entry holds base, length and type");
        if size < 20 {
            return None;
        }
        g.memory(phys.u64(at + 12)?, phys.u32(at + 20)?);
        at += size + 4;
    }
    checks.check(at == map + len, "the memory map ends at its length");
    Some(())
}

/// Version 2: the tags, each inside the total size, up to the end tag. `None`: a tag that runs past
/// the total size, or none that ends the list.
fn read_v2(phys: Phys, info: u64, g: &mut Gathered, checks: &mut Checks) -> Option<()> {
    let total = u64::from(phys.u32(info)?);
    if total < 16 || !inside(info, total) {
        return None;
    }
    let end = info + total;
    checks.check(
        !overlaps_kernel(info, end),
        "the boot information lies outside the kernel",
    );
    let mut seen = [false; 7];
    let mut at = info + 8;
    loop {
        if at + 8 > end {
            return None;
        }
        let kind = phys.u32(at)?;
        let size = u64::from(phys.u32(at + 4)?);
        if size < 8 || at + size > end {
            return None;
        }
        let tag_end = at + size;
        let string = |from: u64, what: &str, checks: &mut Checks| {
            let s = phys.string(from, tag_end);
            checks.check(s.is_some(), what);
            s.unwrap_or(b"")
        };
        match kind {
            0 => {
                checks.check(size == 8, "the end tag is 8 bytes");
                checks.check(tag_end == end, "the end tag ends the boot information");
                break;
            }
            1 => g.cmdline = string(at + 8, "the command line is a string", checks),
            2 => g.loader = string(at + 8, "the loader's name is a string", checks),
            3 if size >= 17 => {
                let cmdline = string(at + 16, "a module's command line is a string", checks);
                let m = Module {
                    start: u64::from(phys.u32(at + 8)?),
                    end: u64::from(phys.u32(at + 12)?),
                    cmdline,
                };
                g.module(checks, m);
            }
            4 if size >= 16 => {
                g.lower = phys.u32(at + 8)?;
                g.upper = phys.u32(at + 12)?;
            }
            6 if size >= 16 => {
                let entry = u64::from(phys.u32(at + 8)?);
                checks.check(entry >= 24, "memory-map entries hold base, length and type");
                if entry < 24 {
                    return None;
                }
                let mut e = at + 16;
                while e + entry <= tag_end {
                    g.memory(phys.u64(e + 8)?, phys.u32(e + 16)?);
                    e += entry;
                }
            }
            _ => {}
        }
        if let Some(s) = seen.get_mut(kind as usize) {
            *s = true;
        }
        at = (tag_end + 7) & !7;
    }
    for (kind, what) in [
        (1, "a command-line tag"),
        (2, "a loader-name tag"),
        (4, "a basic-memory tag"),
        (6, "a memory-map tag"),
    ] {
        checks.check(seen[kind], what);
    }
    Some(())
}
