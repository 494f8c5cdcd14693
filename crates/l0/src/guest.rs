//! The guest: its EPT, its image, its first page tables and the boot information it starts with.

use ihmi_abi::{BootInfo, RamRange, Scenario, ABI_VERSION, BOOT_INFO_MAGIC, BOOT_INFO_MAX_RANGES};
use ihmi_addr::{Gpa, Gva, PAGE_SIZE};
use ihmi_ept::EptView;
use ihmi_hv::{MemoryMap, RegionKind};
use ihmi_paging::{MapFlags, PageSize, PageTable, PageTableBuilder, TableAlloc};

use crate::frames::Pool;
use crate::{fail, log};

/// Guest-physical area where L0 builds the guest's first page tables (low RAM every PC has).
const BOOT_TABLES: Gpa = Gpa::new(0x1_0000);
const BOOT_TABLES_END: Gpa = Gpa::new(0x2_0000);
/// The guest's first GDT.
const BOOT_GDT: Gpa = Gpa::new(0x2_0000);
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
    pub boot_info: Gpa,
}

/// The guest's EPT (the guest view of `ihmi_hv::views`): guest RAM read/write/execute and write-back,
/// devices read/write uncached, nothing else. Every L0 frame is absent, so any guest access to one is an
/// EPT violation.
pub fn build_ept(memory: &MemoryMap, frames: &mut Pool) -> EptView {
    match ihmi_hv::views::build_guest_view(frames, memory, None, &[]) {
        Ok(view) => {
            log!(
                "EPT: root {} ({} 2 MiB pages split)",
                view.root(),
                view.split_count()
            );
            view
        }
        Err(e) => fail(format_args!("EPT: {e}")),
    }
}

/// Writes into guest RAM that L0 has checked is guest RAM.
fn guest_bytes(memory: &MemoryMap, gpa: Gpa, len: u64) -> &'static mut [u8] {
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
pub fn load(image: &[u8], memory: &MemoryMap, scenario: Scenario, probe: Gpa) -> GuestBoot {
    use elf::endian::LittleEndian;
    let file = match elf::ElfBytes::<LittleEndian>::minimal_parse(image) {
        Ok(f) => f,
        Err(_) => fail(format_args!("the guest module is not an ELF file")),
    };
    if file.ehdr.class != elf::file::Class::ELF64 || file.ehdr.e_machine != elf::abi::EM_X86_64 {
        fail(format_args!("the guest module is not an x86-64 ELF64 file"));
    }
    let Some(segments) = file.segments() else {
        fail(format_args!("the guest ELF has no program headers"))
    };
    for ph in segments.iter().filter(|ph| ph.p_type == elf::abi::PT_LOAD) {
        let dst = guest_bytes(memory, Gpa::new(ph.p_paddr), ph.p_memsz);
        let Some(src) = ph
            .p_offset
            .checked_add(ph.p_filesz)
            .and_then(|end| image.get(ph.p_offset as usize..end as usize))
        else {
            fail(format_args!(
                "guest ELF segment at {:#x} lies outside the file",
                ph.p_paddr
            ));
        };
        if src.len() > dst.len() {
            fail(format_args!(
                "guest ELF segment at {:#x} has filesz > memsz",
                ph.p_paddr
            ));
        }
        dst[..src.len()].copy_from_slice(src);
        dst[src.len()..].fill(0);
        log!("guest: loaded {:#x} bytes at {:#x}", ph.p_memsz, ph.p_paddr);
    }

    let mut alloc = BootTableAlloc {
        memory,
        next: BOOT_TABLES,
    };
    let mut tables = match PageTableBuilder::new(&mut alloc) {
        Ok(t) => t,
        Err(e) => fail(format_args!("guest page tables: {e}")),
    };
    // The guest's page tables may map anything: the EPT, not the guest's tables, is what protects L0.
    // 1 GiB pages only where the CPU has them (CPUID.80000001H:EDX.Page1GB, SDM 4.1.4).
    let largest = if ihmi_rt::cpu::cpuid(0x8000_0001, 0)[3] & (1 << 26) != 0 {
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

    // GDT: null, 64-bit code (0x08), data (0x10).
    let gdt = guest_bytes(memory, BOOT_GDT, 24);
    for (slot, desc) in
        gdt.chunks_exact_mut(8)
            .zip([0u64, 0x00af_9a00_0000_ffff, 0x00cf_9200_0000_ffff])
    {
        slot.copy_from_slice(&desc.to_le_bytes());
    }

    let mut info = BootInfo {
        magic: BOOT_INFO_MAGIC,
        abi_version: ABI_VERSION,
        scenario: scenario as u32,
        ram_count: 0,
        ram: [RamRange::default(); BOOT_INFO_MAX_RANGES],
        probe_gpa: probe.raw(),
    };
    for range in memory
        .of_kind(RegionKind::GuestRam)
        .take(BOOT_INFO_MAX_RANGES)
    {
        info.ram[info.ram_count as usize] = RamRange {
            start: range.start.raw(),
            len: range.len(),
        };
        info.ram_count += 1;
    }
    let dst = guest_bytes(memory, BOOT_INFO, core::mem::size_of::<BootInfo>() as u64);
    // SAFETY: `dst` is guest RAM of exactly size_of::<BootInfo>() bytes; the write is unaligned-safe.
    unsafe { core::ptr::write_unaligned(dst.as_mut_ptr() as *mut BootInfo, info) };
    let _ = guest_bytes(memory, Gpa::new(BOOT_STACK_TOP.raw() - 0x1_0000), 0x1_0000);

    GuestBoot {
        entry: file.ehdr.e_entry,
        cr3: tables.root(),
        gdt: BOOT_GDT,
        gdt_limit: 23,
        stack_top: BOOT_STACK_TOP,
        boot_info: BOOT_INFO,
    }
}
