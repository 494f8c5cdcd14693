//! The guest's memory as L0 fills it before the first entry ([`GuestRam`]), and ihmi's own test
//! guest: its image, its first page tables and GDT, the boot information it starts with, and its
//! hooks' gate pointer.

use ihmi_abi::{BootInfo, RamRange, Scenario, ABI_VERSION, BOOT_INFO_MAGIC, BOOT_INFO_MAX_RANGES};
use ihmi_addr::{Gpa, GpaRange, Gva, PAGE_SIZE};
use ihmi_hv::{MemoryMap, RegionKind};
use ihmi_paging::{MapFlags, PageSize, PageTable, PageTableBuilder, TableAlloc};

use crate::elf_image::Image;
use crate::error::LoadError;
use crate::log;
use crate::ranges::Ranges;

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

/// Guest RAM as L0 writes it before the guest runs: only guest RAM, one slice at a time (a slice
/// borrows this writer, so two can never alias).
pub struct GuestRam<'m> {
    map: &'m MemoryMap,
}

impl<'m> GuestRam<'m> {
    /// The writer for `map`'s guest RAM.
    ///
    /// # Safety
    /// 1. The guest does not run yet: L0 is the only one touching its memory.
    /// 2. Guest RAM lies below 4 GiB and is identity-mapped for L0.
    /// 3. No other `GuestRam` exists, and L0 keeps no other reference into guest RAM.
    pub unsafe fn new(map: &'m MemoryMap) -> Self {
        Self { map }
    }

    /// The memory map.
    pub fn map(&self) -> &'m MemoryMap {
        self.map
    }

    /// `[gpa, gpa + len)`, which must be guest RAM.
    pub fn bytes(&mut self, gpa: Gpa, len: u64) -> Result<&mut [u8], LoadError> {
        if !self.map.is_guest_ram(gpa, len) {
            return Err(LoadError::NotGuestRam {
                gpa: gpa.raw(),
                len,
            });
        }
        // SAFETY: the range is guest RAM (checked) and the preconditions of `new` hold: identity-mapped,
        // not running, and this slice borrows `self` mutably, so it is the only one alive.
        Ok(unsafe { core::slice::from_raw_parts_mut(gpa.raw() as *mut u8, len as usize) })
    }

    /// The page-aligned page at `gpa` as a page table.
    fn table(&mut self, gpa: Gpa) -> Option<&mut PageTable> {
        if !gpa.is_aligned(PAGE_SIZE) {
            return None;
        }
        let bytes = self.bytes(gpa, PAGE_SIZE).ok()?;
        // SAFETY: a page-aligned, page-sized range of guest RAM borrowed exclusively from `self`;
        // `PageTable` is 512 plain `u64` entries (4 KiB, 4 KiB-aligned), valid for any bytes.
        Some(unsafe { &mut *(bytes.as_mut_ptr() as *mut PageTable) })
    }
}

/// The mode the guest starts in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// 64-bit mode with L0's page tables ([`GuestBoot::cr3`]), the boot information in RDI and RSI
    /// (our guest reads RDI, Linux's 64-bit entry RSI).
    Long,
    /// 32-bit protected mode with paging off (a multiboot kernel's entry): `eax` and `ebx` are the
    /// loader's magic and the boot information's address. Needs "unrestricted guest".
    Protected { eax: u32, ebx: u32 },
}

/// Where and how the guest starts.
#[derive(Debug)]
pub struct GuestBoot {
    pub mode: EntryMode,
    pub entry: u64,
    pub cr3: Gpa,
    pub gdt: Gpa,
    pub gdt_limit: u16,
    pub stack_top: Gpa,
    /// The boot information ([`EntryMode`] says in which register).
    pub boot_info: Gpa,
    pub code_selector: u16,
    pub data_selector: u16,
}

/// ihmi's test guest: its image and where it sits.
pub struct TestGuest<'a> {
    pub image: Image<'a>,
    /// All of it, with the low 1 MiB where L0 puts the boot structures.
    pub all: Ranges,
    /// The executable part (kernel code, where the hooks live; read + execute only in the guest view).
    pub code: Ranges,
}

impl<'a> TestGuest<'a> {
    /// The test guest of the `testguest` module.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, LoadError> {
        let image = Image::parse(bytes, "testguest")?;
        let mut all = Ranges::new();
        let mut code = Ranges::new();
        let full = || LoadError::Image {
            what: "testguest",
            problem: crate::error::ImageProblem::NoProgramHeaders,
        };
        all.push(GpaRange::new(Gpa::new(0), Gpa::new(0x10_0000)))
            .map_err(|_| full())?;
        for ph in image.load_segments() {
            let start = Gpa::new(ph.p_paddr).align_down(PAGE_SIZE);
            let end = Gpa::new(ph.p_paddr.saturating_add(ph.p_memsz))
                .align_up(PAGE_SIZE)
                .unwrap_or(start);
            let r = GpaRange::new(start, end);
            all.push(r).map_err(|_| full())?;
            if ph.p_flags & elf::abi::PF_X != 0 {
                code.push(r).map_err(|_| full())?;
            }
        }
        Ok(Self { image, all, code })
    }

    /// Tells the guest kernel's hooks how to reach the monitor: the mode into `IHMI_HOOK_MODE` and
    /// the gate's address (0 out of the box) into `IHMI_HOOK_GATE`. Both must be aligned words of the
    /// kernel's code, so the guest view keeps them read-only. Returns where the gate pointer is.
    pub fn install_hook(
        &self,
        ram: &mut GuestRam<'_>,
        mode: ihmi_abi::monitor::Mode,
        gate: Option<Gva>,
    ) -> Result<Gpa, LoadError> {
        let mode_at = self.hook_word("IHMI_HOOK_MODE")?;
        ram.bytes(mode_at, 8)?
            .copy_from_slice(&(mode as u64).to_le_bytes());
        let gate_at = self.hook_word("IHMI_HOOK_GATE")?;
        let gate = gate.map_or(0, Gva::raw);
        ram.bytes(gate_at, 8)?.copy_from_slice(&gate.to_le_bytes());
        Ok(gate_at)
    }

    /// The guest-physical address of the hook word `name`, checked to lie in kernel code.
    fn hook_word(&self, name: &'static str) -> Result<Gpa, LoadError> {
        let va = self.image.symbol(name)?;
        let pa = self.image.phys_of(va).ok_or(self.image.outside(name))?;
        let gpa = Gpa::new(pa);
        let in_code = self
            .code
            .as_slice()
            .iter()
            .any(|r| r.contains_range(gpa, 8));
        if !in_code {
            return Err(self.image.outside(name));
        }
        if !gpa.is_aligned(8) {
            return Err(self.image.misaligned(name));
        }
        Ok(gpa)
    }

    /// Loads the image into guest RAM and prepares its page tables, GDT, stack and boot information.
    pub fn load(
        &self,
        ram: &mut GuestRam<'_>,
        scenario: Scenario,
        probe: Gpa,
        monitor: ihmi_abi::monitor::Mode,
        gate: Option<Gva>,
        page_1g: bool,
    ) -> Result<GuestBoot, LoadError> {
        for ph in self.image.load_segments() {
            let dst = ram.bytes(Gpa::new(ph.p_paddr), ph.p_memsz)?;
            self.image.copy_segment(&ph, dst)?;
            log!("guest: loaded {:#x} bytes at {:#x}", ph.p_memsz, ph.p_paddr);
        }
        let cr3 = identity_tables(ram, page_1g)?;
        // GDT: null, 64-bit code (0x08), data (0x10).
        let gdt_limit = write_gdt(ram, &[0, CODE64, DATA])?;
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
        (info.ram, info.ram_count) = ram_ranges(ram.map());
        let dst = ram.bytes(BOOT_INFO, core::mem::size_of::<BootInfo>() as u64)?;
        // SAFETY: `dst` is guest RAM of exactly size_of::<BootInfo>() bytes; the write is
        // unaligned-safe.
        unsafe { core::ptr::write_unaligned(dst.as_mut_ptr() as *mut BootInfo, info) };
        // The stack must be guest RAM too.
        ram.bytes(Gpa::new(BOOT_STACK_TOP.raw() - 0x1_0000), 0x1_0000)?;
        Ok(GuestBoot {
            mode: EntryMode::Long,
            entry: self.image.entry(),
            cr3,
            gdt: BOOT_GDT,
            gdt_limit,
            stack_top: BOOT_STACK_TOP,
            boot_info: BOOT_INFO,
            code_selector: 0x08,
            data_selector: 0x10,
        })
    }
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

/// Page-table frames for the guest's first page tables, carved from guest RAM at [`BOOT_TABLES`].
struct BootTableAlloc<'r, 'm> {
    ram: &'r mut GuestRam<'m>,
    next: Gpa,
}

impl TableAlloc for BootTableAlloc<'_, '_> {
    fn alloc_zeroed(&mut self) -> Option<Gpa> {
        let frame = self.next;
        let next = frame.checked_add(PAGE_SIZE)?;
        if next > BOOT_TABLES_END {
            return None;
        }
        self.ram.bytes(frame, PAGE_SIZE).ok()?.fill(0);
        self.next = next;
        Some(frame)
    }

    fn table_mut(&mut self, gpa: Gpa) -> Option<&mut PageTable> {
        if gpa < BOOT_TABLES || gpa >= self.next {
            return None;
        }
        self.ram.table(gpa)
    }
}

/// A flat 64-bit code segment and a flat data segment (SDM 3.4.5).
pub const CODE64: u64 = 0x00af_9a00_0000_ffff;
/// See [`CODE64`].
pub const DATA: u64 = 0x00cf_9200_0000_ffff;
/// A flat 32-bit code segment (a multiboot kernel's CS).
pub const CODE32: u64 = 0x00cf_9a00_0000_ffff;

/// The guest's first page tables, in low RAM: the first 4 GiB identity-mapped, writable and
/// executable. The guest's page tables may map anything: the EPT, not the guest's tables, is what
/// protects L0. Returns the root.
pub fn identity_tables(ram: &mut GuestRam<'_>, page_1g: bool) -> Result<Gpa, LoadError> {
    let mut alloc = BootTableAlloc {
        ram,
        next: BOOT_TABLES,
    };
    let tables_error = |_| LoadError::PageTables("the guest's first page tables");
    let mut tables = PageTableBuilder::new(&mut alloc).map_err(tables_error)?;
    // 1 GiB pages only where the CPU has them.
    let largest = if page_1g {
        PageSize::Size1G
    } else {
        PageSize::Size2M
    };
    tables
        .map_with(
            &mut alloc,
            Gva::new(0),
            Gpa::new(0),
            IDENTITY_LIMIT,
            MapFlags::WRITABLE | MapFlags::EXECUTABLE,
            largest,
        )
        .map_err(tables_error)?;
    Ok(tables.root())
}

/// Writes the guest's first GDT at [`BOOT_GDT`]; returns its limit.
pub fn write_gdt(ram: &mut GuestRam<'_>, descriptors: &[u64]) -> Result<u16, LoadError> {
    let len = descriptors.len() * 8;
    let gdt = ram.bytes(BOOT_GDT, len as u64)?;
    for (slot, desc) in gdt.chunks_exact_mut(8).zip(descriptors) {
        slot.copy_from_slice(&desc.to_le_bytes());
    }
    Ok((len - 1) as u16)
}

/// Where the guest's first stack ends.
pub const fn boot_stack() -> Gpa {
    BOOT_STACK_TOP
}
