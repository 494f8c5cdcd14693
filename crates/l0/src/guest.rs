//! The guest: its EPT, its image, its first page tables and the boot information it starts with.

use ihmi_abi::{BootInfo, RamRange, Scenario, ABI_VERSION, BOOT_INFO_MAGIC, BOOT_INFO_MAX_RANGES};
use ihmi_addr::{Gpa, GpaRange, Gva, PAGE_SIZE};
use ihmi_hv::{MemoryMap, RegionKind};
use ihmi_paging::{MapFlags, PageSize, PageTable, PageTableBuilder, TableAlloc};

use crate::elf_image::Image;
pub use crate::ranges::Ranges;
use crate::{fail, log};

/// Guest-physical area where L0 builds the guest's first page tables (low RAM every PC has).
const BOOT_TABLES: Gpa = Gpa::new(0x1_0000);
const BOOT_TABLES_END: Gpa = Gpa::new(0x2_0000);
/// The guest's first GDT.
pub const BOOT_GDT: Gpa = Gpa::new(0x2_0000);
/// The [`BootInfo`] block.
const BOOT_INFO: Gpa = Gpa::new(0x2_1000);
/// The guest's first stack: [0x7_0000, 0x8_0000).
const BOOT_STACK_TOP: Gpa = Gpa::new(0x8_0000);
/// GVA range the first page tables identity-map.
const IDENTITY_LIMIT: u64 = 4 * 1024 * 1024 * 1024;

/// Where and how the guest starts.
#[derive(Debug)]
pub struct GuestBoot {
    pub entry: u64,
    pub cr3: Gpa,
    pub gdt: Gpa,
    pub gdt_limit: u16,
    pub stack_top: Gpa,
    /// Handed to the guest in RDI and RSI (our guest reads RDI, Linux's 64-bit entry RSI).
    pub boot_info: Gpa,
    pub code_selector: u16,
    pub data_selector: u16,
}

/// Guest-physical ranges of the guest image: all of it, and the executable part (kernel code, where the
/// hooks live; the guest view maps it read + execute only).
#[derive(Clone, Copy)]
pub struct Regions {
    pub all: Ranges,
    pub code: Ranges,
}

impl Regions {
    /// No ranges (a guest that is not our test guest).
    pub const fn empty() -> Self {
        Self {
            all: Ranges::new(),
            code: Ranges::new(),
        }
    }
}

/// Where the guest image will sit, plus the low 1 MiB where L0 puts the guest's boot structures.
pub fn regions(image: &Image<'_>) -> Regions {
    let mut all = Ranges::new();
    let mut code = Ranges::new();
    all.push(GpaRange::new(Gpa::new(0), Gpa::new(0x10_0000)));
    for ph in image.load_segments() {
        let start = Gpa::new(ph.p_paddr).align_down(PAGE_SIZE);
        let end = Gpa::new(ph.p_paddr.saturating_add(ph.p_memsz))
            .align_up(PAGE_SIZE)
            .unwrap_or(start);
        let r = GpaRange::new(start, end);
        all.push(r);
        if ph.p_flags & elf::abi::PF_X != 0 {
            code.push(r);
        }
    }
    Regions { all, code }
}

/// Tells the guest kernel's hooks how to reach the monitor: the mode into `IHMI_HOOK_MODE` and the
/// gate's address (0 out of the box) into `IHMI_HOOK_GATE`. Both must be aligned words of the kernel's
/// code, so the guest view keeps them read-only. Returns where the gate pointer is.
pub fn install_hook(
    image: &Image<'_>,
    memory: &MemoryMap,
    regions: &Regions,
    mode: ihmi_abi::monitor::Mode,
    gate: Option<Gva>,
) -> Gpa {
    let mode_at = hook_word(image, regions, "IHMI_HOOK_MODE");
    guest_bytes(memory, mode_at, 8).copy_from_slice(&(mode as u64).to_le_bytes());
    let gate_at = hook_word(image, regions, "IHMI_HOOK_GATE");
    let gate = gate.map_or(0, Gva::raw);
    guest_bytes(memory, gate_at, 8).copy_from_slice(&gate.to_le_bytes());
    gate_at
}

/// The guest-physical address of the hook word `name`, checked to lie in kernel code.
fn hook_word(image: &Image<'_>, regions: &Regions, name: &str) -> Gpa {
    let va = image.symbol(name);
    let Some(pa) = image.phys_of(va) else {
        fail(format_args!(
            "the guest's {name} ({va:#x}) is in no loadable segment"
        ));
    };
    let gpa = Gpa::new(pa);
    let in_code =
        regions.code.as_slice().iter().any(|r| {
            r.start.raw() <= pa && pa.checked_add(8).is_some_and(|end| end <= r.end.raw())
        });
    if !in_code || !gpa.is_aligned(8) {
        fail(format_args!(
            "the guest's {name} at {gpa} is not an aligned word of kernel code; the guest view could not protect it"
        ));
    }
    gpa
}

/// Guest RAM as the boot information and the monitor's configuration list it: at most
/// [`BOOT_INFO_MAX_RANGES`] ranges (what does not fit is left out, so never read, never handed out).
pub fn ram_ranges(memory: &MemoryMap) -> ([RamRange; BOOT_INFO_MAX_RANGES], u64) {
    let mut out = [RamRange::default(); BOOT_INFO_MAX_RANGES];
    let mut n = 0;
    for (slot, range) in out.iter_mut().zip(memory.of_kind(RegionKind::GuestRam)) {
        *slot = RamRange {
            start: range.start.raw(),
            len: range.len(),
        };
        n += 1;
    }
    (out, n)
}

/// Writes into guest RAM that L0 has checked is guest RAM.
pub(crate) fn guest_bytes(memory: &MemoryMap, gpa: Gpa, len: u64) -> &'static mut [u8] {
    if !memory.is_guest_ram(gpa, len) {
        fail(format_args!(
            "guest image or boot data at {gpa}+{len:#x} is not in guest RAM"
        ));
    }
    // SAFETY: the range is guest RAM (checked): identity-mapped below 4 GiB, owned by the guest, and the
    // guest is not running yet, so L0 is the only writer.
    unsafe { core::slice::from_raw_parts_mut(gpa.raw() as *mut u8, len as usize) }
}

/// Page-table frames for the guest's first page tables, carved from guest RAM at [`BOOT_TABLES`].
struct BootTableAlloc<'a> {
    memory: &'a MemoryMap,
    next: Gpa,
}

impl TableAlloc for BootTableAlloc<'_> {
    fn alloc_zeroed(&mut self) -> Option<Gpa> {
        let frame = self.next;
        let next = frame.checked_add(PAGE_SIZE)?;
        if next > BOOT_TABLES_END {
            return None;
        }
        guest_bytes(self.memory, frame, PAGE_SIZE).fill(0);
        self.next = next;
        Some(frame)
    }

    fn table_mut(&mut self, gpa: Gpa) -> Option<&mut PageTable> {
        if gpa < BOOT_TABLES || gpa >= self.next || !gpa.is_aligned(PAGE_SIZE) {
            return None;
        }
        let bytes = guest_bytes(self.memory, gpa, PAGE_SIZE);
        // SAFETY: a page-aligned, page-sized frame of guest RAM that this allocator handed out.
        Some(unsafe { &mut *(bytes.as_mut_ptr() as *mut PageTable) })
    }
}

/// Loads the guest ELF into guest RAM and prepares its page tables, GDT, stack and boot information.
pub fn load(
    image: &Image<'_>,
    memory: &MemoryMap,
    scenario: Scenario,
    probe: Gpa,
    monitor: ihmi_abi::monitor::Mode,
    gate: Option<Gva>,
    page_1g: bool,
) -> GuestBoot {
    for ph in image.load_segments() {
        let dst = guest_bytes(memory, Gpa::new(ph.p_paddr), ph.p_memsz);
        image.copy_segment(&ph, dst);
        log!("guest: loaded {:#x} bytes at {:#x}", ph.p_memsz, ph.p_paddr);
    }

    let cr3 = identity_tables(memory, page_1g);
    // GDT: null, 64-bit code (0x08), data (0x10).
    let gdt_limit = write_gdt(memory, &[0, CODE64, DATA]);
    let mut info = BootInfo {
        magic: BOOT_INFO_MAGIC,
        abi_version: ABI_VERSION,
        scenario: scenario.to_raw(),
        ram_count: 0,
        ram: [RamRange::default(); BOOT_INFO_MAX_RANGES],
        probe_gpa: probe.raw(),
        monitor_mode: monitor as u32,
        _reserved: 0,
        gate_gva: gate.map_or(0, Gva::raw),
    };
    (info.ram, info.ram_count) = ram_ranges(memory);
    let dst = guest_bytes(memory, BOOT_INFO, core::mem::size_of::<BootInfo>() as u64);
    // SAFETY: `dst` is guest RAM of exactly size_of::<BootInfo>() bytes; the write is unaligned-safe.
    unsafe { core::ptr::write_unaligned(dst.as_mut_ptr() as *mut BootInfo, info) };
    let _ = guest_bytes(memory, Gpa::new(BOOT_STACK_TOP.raw() - 0x1_0000), 0x1_0000);

    GuestBoot {
        entry: image.entry(),
        cr3,
        gdt: BOOT_GDT,
        gdt_limit,
        stack_top: BOOT_STACK_TOP,
        boot_info: BOOT_INFO,
        code_selector: 0x08,
        data_selector: 0x10,
    }
}

/// A flat 64-bit code segment and a flat data segment (SDM 3.4.5).
pub const CODE64: u64 = 0x00af_9a00_0000_ffff;
/// See [`CODE64`].
pub const DATA: u64 = 0x00cf_9200_0000_ffff;

/// The guest's first page tables, in low RAM: the first 4 GiB identity-mapped, writable and
/// executable. The guest's page tables may map anything: the EPT, not the guest's tables, is what
/// protects L0. Returns the root.
pub fn identity_tables(memory: &MemoryMap, page_1g: bool) -> Gpa {
    let mut alloc = BootTableAlloc {
        memory,
        next: BOOT_TABLES,
    };
    let mut tables = match PageTableBuilder::new(&mut alloc) {
        Ok(t) => t,
        Err(e) => fail(format_args!("guest page tables: {e}")),
    };
    // 1 GiB pages only where the CPU has them.
    let largest = if page_1g {
        PageSize::Size1G
    } else {
        PageSize::Size2M
    };
    let flags = MapFlags::WRITABLE | MapFlags::EXECUTABLE;
    if let Err(e) = tables.map_with(
        &mut alloc,
        Gva::new(0),
        Gpa::new(0),
        IDENTITY_LIMIT,
        flags,
        largest,
    ) {
        fail(format_args!("guest page tables: {e}"));
    }
    tables.root()
}

/// Writes the guest's first GDT at [`BOOT_GDT`]; returns its limit.
pub fn write_gdt(memory: &MemoryMap, descriptors: &[u64]) -> u16 {
    let len = descriptors.len() * 8;
    let gdt = guest_bytes(memory, BOOT_GDT, len as u64);
    for (slot, desc) in gdt.chunks_exact_mut(8).zip(descriptors) {
        slot.copy_from_slice(&desc.to_le_bytes());
    }
    (len - 1) as u16
}

/// Where and how big the guest's first stack is.
pub const fn boot_stack() -> Gpa {
    BOOT_STACK_TOP
}
