//! Booting an unmodified Linux kernel as the guest, with the 64-bit boot protocol (`ihmi-linux` holds
//! the protocol; this places things in guest RAM). The kernel goes where it asks (`pref_address`), the
//! initrd as high as the kernel allows, the zero page and the command line in low RAM, and the e820
//! map is the firmware's with L0's and the monitor's frames marked reserved.

use core::fmt::Write;

use ihmi_addr::{Gpa, GpaRange, PAGE_SIZE};
use ihmi_hv::{MemoryMap, RegionKind};
use ihmi_linux::{BootParams, E820Entry, E820Kind, Kernel, BOOT_CS, BOOT_DS, E820_MAX};

use crate::guest::{self, GuestBoot};
use crate::{fail, log};

/// The zero page and the command line, in low RAM next to the boot tables.
const ZERO_PAGE: Gpa = Gpa::new(0x2_2000);
const CMDLINE: Gpa = Gpa::new(0x2_3000);

/// What GRUB loaded for a Linux scenario (the kernel already [`placed`]).
#[derive(Clone, Copy, Debug)]
pub struct Modules<'a> {
    pub kernel: Kernel<'a>,
    pub cmdline: &'a str,
    pub initrd: Option<&'a [u8]>,
}

/// A command line being put together, without a heap (one byte is kept for the NUL).
struct LineBuf {
    bytes: [u8; 4096],
    len: usize,
}

impl Write for LineBuf {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let end = self.len + s.len();
        if end >= self.bytes.len() {
            return Err(core::fmt::Error);
        }
        self.bytes[self.len..end].copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// One range of the firmware's memory map, with its e820 type, as the guest sees it (identity).
#[derive(Clone, Copy, Debug)]
pub struct FirmwareRange {
    pub range: GpaRange,
    pub kind: E820Kind,
}

/// Loads the kernel, the initrd and the boot structures; returns how to start the guest.
pub fn load(
    m: &Modules<'_>,
    memory: &MemoryMap,
    firmware: &[FirmwareRange],
    monitor: Option<Gpa>,
    gate_pages: Option<GpaRange>,
    page_1g: bool,
) -> GuestBoot {
    let kernel = m.kernel;
    let load_at = Gpa::new(kernel.load_address);
    let span = kernel.span();
    guest::guest_bytes(memory, load_at, kernel.payload.len() as u64)
        .copy_from_slice(kernel.payload);
    log!(
        "linux: boot protocol {}.{}, {} KiB kernel at {load_at}, needs {} KiB there{}",
        kernel.version >> 8,
        kernel.version & 0xff,
        kernel.payload.len() >> 10,
        kernel.init_size >> 10,
        if kernel.phys_offset() != 0 {
            " (relocated: its preferred address is not free guest RAM)"
        } else {
            ""
        }
    );

    let mut params = BootParams::new(&kernel);
    // With a monitor, the command line also says where it is: the attack scenario aims there, and the
    // threat model assumes an attacker can find it anyway (hiding it would be obscurity, not defence).
    let mut line = LineBuf {
        bytes: [0; 4096],
        len: 0,
    };
    let written = match monitor {
        Some(at) => write!(line, "{} ihmi.monitor={:#x}", m.cmdline, at.raw()),
        None => line.write_str(m.cmdline),
    };
    if written.is_err() {
        fail(format_args!("the kernel command line is too long"));
    }
    let cmdline = &line.bytes[..line.len];
    if let Err(e) = params.set_cmdline(&kernel, CMDLINE.raw(), cmdline.len()) {
        fail(format_args!("kernel command line: {e}"));
    }
    let dst = guest::guest_bytes(memory, CMDLINE, cmdline.len() as u64 + 1);
    dst[..cmdline.len()].copy_from_slice(cmdline);
    dst[cmdline.len()] = 0;
    log!(
        "linux: command line \"{}\"",
        core::str::from_utf8(cmdline).unwrap_or("?")
    );

    if let Some(initrd) = m.initrd {
        let avoid = GpaRange::new(load_at, Gpa::new(load_at.raw() + span));
        let at = place_initrd(
            memory,
            initrd.len() as u64,
            u64::from(kernel.initrd_addr_max),
            avoid,
        );
        guest::guest_bytes(memory, at, initrd.len() as u64).copy_from_slice(initrd);
        params.set_initrd(at.raw(), initrd.len() as u64);
        log!("linux: {} KiB initrd at {at}", initrd.len() >> 10);
    }

    // The gate's pages: RAM in the e820 map, claimed by a setup_data entry, so the kernel reserves
    // them and maps them in its direct map (its page-table walkers, e.g. the W^X check of kernels
    // built with CONFIG_DEBUG_WX, read every table the gate's PML4 slot leads to through it).
    if let Some(pages) = gate_pages {
        params.set_setup_data(pages.start.raw());
    }
    let (e820, n) = e820_map(memory, firmware, gate_pages);
    if let Err(e) = params.set_e820(&e820[..n]) {
        fail(format_args!("e820 map: {e}"));
    }
    for e in &e820[..n] {
        log!(
            "linux: e820 {:#011x}-{:#011x} {:?}",
            e.addr,
            e.addr + e.size,
            e.kind
        );
    }
    guest::guest_bytes(memory, ZERO_PAGE, 4096).copy_from_slice(params.as_bytes());

    let cr3 = guest::identity_tables(memory, page_1g);
    // The 64-bit boot protocol's GDT: __BOOT_CS at 0x10, __BOOT_DS at 0x18.
    let gdt_limit = guest::write_gdt(memory, &[0, 0, guest::CODE64, guest::DATA]);
    GuestBoot {
        entry: kernel.entry_64(),
        cr3,
        gdt: guest::BOOT_GDT,
        gdt_limit,
        stack_top: guest::boot_stack(),
        boot_info: ZERO_PAGE,
        code_selector: BOOT_CS,
        data_selector: BOOT_DS,
    }
}

/// The highest page-aligned place for `len` bytes of initrd in guest RAM, ending at or below `max`
/// (the kernel's `initrd_addr_max`) and clear of `avoid` (the kernel's start-up area).
fn place_initrd(memory: &MemoryMap, len: u64, max: u64, avoid: GpaRange) -> Gpa {
    let need = len.next_multiple_of(PAGE_SIZE);
    let mut best: Option<u64> = None;
    for r in memory.of_kind(RegionKind::GuestRam) {
        let top = r.end.raw().min(max.saturating_add(1)) & !(PAGE_SIZE - 1);
        let Some(start) = top.checked_sub(need) else {
            continue;
        };
        let candidate = GpaRange::new(Gpa::new(start), Gpa::new(top));
        if start >= r.start.raw() && !candidate.overlaps(&avoid) && best.is_none_or(|b| start > b) {
            best = Some(start);
        }
    }
    match best {
        Some(at) => Gpa::new(at),
        None => fail(format_args!(
            "no room for the {} KiB initrd in guest RAM below {max:#x}; boot with more memory",
            len >> 10
        )),
    }
}

/// The e820 map: the firmware's, with its available RAM split as L0's map has it (L0's and the
/// monitor's frames reserved), in address order.
fn e820_map(
    memory: &MemoryMap,
    firmware: &[FirmwareRange],
    gate_pages: Option<GpaRange>,
) -> ([E820Entry; E820_MAX], usize) {
    let mut out = [E820Entry {
        addr: 0,
        size: 0,
        kind: E820Kind::Reserved,
    }; E820_MAX];
    let mut n = 0;
    let mut push = |range: GpaRange, kind: E820Kind| {
        if range.is_empty() {
            return;
        }
        if n == E820_MAX {
            fail(format_args!("more than {E820_MAX} e820 entries"));
        }
        out[n] = E820Entry {
            addr: range.start.raw(),
            size: range.len(),
            kind,
        };
        n += 1;
    };
    for fw in firmware {
        if fw.kind != E820Kind::Ram {
            push(fw.range, fw.kind);
            continue;
        }
        // Split what the firmware calls RAM by who owns it now.
        for (r, kind) in memory.regions() {
            let part = GpaRange {
                start: r.start.max(fw.range.start),
                end: r.end.min(fw.range.end),
            };
            if part.start >= part.end {
                continue;
            }
            let e820_kind = match kind {
                RegionKind::GuestRam => E820Kind::Ram,
                RegionKind::L0 | RegionKind::Monitor | RegionKind::Mmio => E820Kind::Reserved,
            };
            // The gate's pages inside the monitor's region are RAM (claimed by setup_data).
            match gate_pages.filter(|g| *kind == RegionKind::Monitor && part.overlaps(g)) {
                Some(g) => {
                    let (lo, hi) = (g.start.max(part.start), g.end.min(part.end));
                    push(
                        GpaRange {
                            start: part.start,
                            end: lo,
                        },
                        E820Kind::Reserved,
                    );
                    push(GpaRange { start: lo, end: hi }, E820Kind::Ram);
                    push(
                        GpaRange {
                            start: hi,
                            end: part.end,
                        },
                        E820Kind::Reserved,
                    );
                }
                None => push(part, e820_kind),
            }
        }
    }
    out[..n].sort_unstable_by_key(|e| e.addr);
    (out, n)
}

/// The kernel, placed: where it asks to be if that is all guest RAM, else (a relocatable kernel
/// such as Debian's, when the boot loader's modules sit there) the lowest aligned place that is.
/// Decided once, before the monitor is carved out of guest RAM (which then avoids the kernel's span).
pub fn placed<'a>(image: &'a [u8], memory: &MemoryMap) -> Kernel<'a> {
    let mut kernel =
        Kernel::parse(image).unwrap_or_else(|e| fail(format_args!("the linux module: {e}")));
    if kernel
        .place(|at, span| memory.is_guest_ram(Gpa::new(at), span))
        .is_none()
    {
        fail(format_args!(
            "the kernel wants {:#x}..{:#x} (init_size), which is not all guest RAM, and {}; boot with more memory",
            kernel.pref_address,
            kernel.pref_address + kernel.span(),
            if kernel.relocatable {
                "no other aligned place below 4 GiB is"
            } else {
                "it is not relocatable"
            }
        ));
    }
    kernel
}

/// Where the kernel will sit from its load address on, through its start-up area (`init_size`).
pub fn kernel_span(kernel: &Kernel<'_>) -> GpaRange {
    GpaRange::new(
        Gpa::new(kernel.load_address),
        Gpa::new(kernel.load_address + kernel.span()),
    )
}

/// The guest-physical address of a kernel-image symbol: the kernel text mapping starts at
/// `__START_KERNEL_map` and maps physical address 0, plus `phys_offset` for a kernel that was loaded
/// elsewhere than it asked ([`placed`]); KASLR is off (`nokaslr`), so nothing else moves it.
pub fn kernel_text_pa(va: u64, phys_offset: u64, memory: &MemoryMap) -> Gpa {
    const START_KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;
    let Some(pa) = va
        .checked_sub(START_KERNEL_MAP)
        .and_then(|p| p.checked_add(phys_offset))
    else {
        fail(format_args!("{va:#x} is not in the kernel image"));
    };
    if !memory.is_guest_ram(Gpa::new(pa), 8) {
        fail(format_args!(
            "kernel symbol {va:#x} (physical {pa:#x}) is not in guest RAM"
        ));
    }
    Gpa::new(pa)
}
