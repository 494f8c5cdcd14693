//! Loads the in-VM monitor: carves its frames out of guest RAM, copies its image, builds its address
//! space (the one-way mapping: the monitor sees all guest RAM through a direct map, the guest sees
//! nothing of the monitor), patches the gate and writes the monitor's configuration.

use ihmi_abi::monitor::{MonitorConfig, CONFIG_MAGIC, MAX_ALLOWED, OS_LINUX, OS_TESTGUEST};
use ihmi_abi::{RamRange, BOOT_INFO_MAX_RANGES};
use ihmi_addr::{Gpa, GpaRange, Gva, LARGE_PAGE_SIZE, PAGE_SIZE};
use ihmi_hv::guard::views::{LinuxGatePages, MonitorLayout};
use ihmi_hv::{MemoryMap, RegionKind};
use ihmi_paging::{MapFlags, PageSize, PageTable, PageTableBuilder, TableAlloc};

use ihmi_monitor::{EventRing, OsProfile};

use crate::elf_image::Image;
use crate::ranges::Ranges;
use crate::{fail, log};

/// Where guest-physical address 0 appears in the monitor's address space.
pub const DIRECT_MAP_BASE: u64 = 0xffff_8000_0000_0000;
/// PCID the monitor's address space uses (the guest's kernel uses its own).
const MONITOR_PCID: u64 = 1;
/// Frames reserved after the image for the monitor's page tables.
const TABLE_FRAMES: u64 = 64;
/// Process names the test guest's creation policy allows; `intruder` is deliberately absent.
pub const TESTGUEST_ALLOWED: &str = "init,worker,bench";

/// Which guest kernel the monitor watches.
#[derive(Clone, Copy, Debug)]
pub enum MonitorOs {
    /// ihmi's test guest, whose `CURRENT_PROCESS` is at this address.
    TestGuest { current: Gva },
    /// A Linux kernel, described by the profile the host derived from its System.map and BTF.
    Linux(ihmi_linux::LinuxProfile),
}

impl MonitorOs {
    fn current_ptr(&self) -> Gva {
        match self {
            Self::TestGuest { current } => *current,
            Self::Linux(p) => Gva::new(p.current_task),
        }
    }

    fn profile(&self) -> OsProfile {
        match self {
            Self::TestGuest { current } => OsProfile::testguest(*current),
            Self::Linux(p) => OsProfile::linux(
                Gva::new(p.current_task),
                p.tgid.offset,
                p.real_parent.offset,
                p.comm.offset,
                p.pti_pgd_pair,
                p.binprm_filename.offset,
            ),
        }
    }
}

/// Where the Linux system-call gate goes, for L0's guard to install when the kernel sets IA32_LSTAR.
#[derive(Clone, Copy, Debug)]
pub struct LinuxGateInfo {
    /// The gate's system-call entry, guest-virtual.
    pub gate_entry: u64,
    /// Where in the gate page the kernel's own entry is kept.
    pub kernel_entry_slot: Gpa,
    /// The PML4 slot and the entry that maps the gate's tables.
    pub slot: u64,
    pub pml4e: u64,
    /// The gate page, guest-physical.
    pub gate_page: Gpa,
    /// The process-creation trampoline: its 2 MiB slot in the kernel's image mapping, its entry
    /// there, and the page table (filled) that maps the slot's first page to the gate page.
    pub hook_slot: u64,
    pub hook_trampoline: u64,
    pub hook_table: Gpa,
    /// Out of the box: where the system-call stub's VMCALL is.
    pub outbox_syscall: Option<u64>,
}

/// Page-table entry bits (SDM 4.5): present, writable, accessed, dirty, execute-disable.
const PTE_P: u64 = 1 << 0;
const PTE_W: u64 = 1 << 1;
const PTE_A: u64 = 1 << 5;
const PTE_D: u64 = 1 << 6;
const PTE_NX: u64 = 1 << 63;

/// Fills the three tables that map the gate (read + execute) and the scratch page after it (read/write,
/// never executable) at `gate_gva` in a Linux kernel's address spaces; returns the PML4 entry that
/// points at them. Supervisor-only, and the accessed and dirty bits are set in advance: the guest view
/// shows these tables read-only, so the CPU must never need to write them. (The process-creation
/// trampoline's table, `hook_table`, is filled the same way: one entry, the gate page at the start of
/// its 2 MiB slot.)
fn build_linux_gate_tables(
    gate_gva: Gva,
    gate: Gpa,
    scratch: Gpa,
    pdpt: Gpa,
    pd: Gpa,
    ptab: Gpa,
) -> u64 {
    let index = |level: u32| ((gate_gva.raw() >> (12 + 9 * (level - 1))) & 0x1ff) as usize;
    let entry = |table: Gpa, i: usize, value: u64| {
        bytes_at(Gpa::new(table.raw() + i as u64 * 8), 8).copy_from_slice(&value.to_le_bytes());
    };
    let upper = PTE_P | PTE_W | PTE_A;
    entry(pdpt, index(3), pd.raw() | upper);
    entry(pd, index(2), ptab.raw() | upper);
    entry(ptab, index(1), gate.raw() | PTE_P | PTE_A);
    entry(
        ptab,
        index(1) + 1,
        scratch.raw() | PTE_P | PTE_W | PTE_A | PTE_D | PTE_NX,
    );
    pdpt.raw() | upper
}

/// A loaded monitor.
#[derive(Clone, Copy, Debug)]
pub struct Loaded {
    pub layout: MonitorLayout,
    /// Guest-virtual address of the gate's entry, the same in both address spaces.
    pub gate_gva: Gva,
    /// Guest-physical address of the event ring.
    ring: Gpa,
    /// The guest kernel as the monitor sees it (for naming system calls in events).
    pub os: OsProfile,
    /// Linux: how to put the system-call gate in front of the kernel's entry.
    pub linux_gate: Option<LinuxGateInfo>,
    /// The root of the monitor's page tables.
    pub root: Gpa,
    /// Where L0 enters the monitor when it runs as a VM of its own (out of the box).
    pub outbox_entry: u64,
    /// The top of the monitor's stack, monitor-virtual.
    pub stack_top: u64,
    /// The monitor's count of its own invocations.
    invocations: Gpa,
    /// VMFUNC and CR3-load instructions in the gate, counted in its code by L0 at load.
    pub gate_vmfuncs: u64,
    /// See `gate_vmfuncs`.
    pub gate_cr3_loads: u64,
    /// What never changes after loading: gate, code and read-only data; the configuration; the page
    /// tables.
    fixed: [GpaRange; 3],
    /// Their checksum when L0 finished loading.
    pub checksum_at_load: u64,
}

impl Loaded {
    /// How often the monitor's entry point has run.
    pub fn invocations(&self) -> u64 {
        // SAFETY: the monitor's `IHMI_INVOCATIONS` (an aligned u64, checked at load) in the identity-
        // mapped monitor region; the monitor is stopped while L0 runs.
        unsafe { core::ptr::read_volatile(self.invocations.raw() as *const u64) }
    }

    /// The checksum (FNV-1a, 64 bit) of the parts of the monitor that never change after loading. In the
    /// page tables the CPU's accessed and dirty bits (SDM 4.8) are left out: the CPU sets them itself.
    pub fn checksum(&self) -> u64 {
        const ACCESSED_DIRTY: u64 = (1 << 5) | (1 << 6);
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut feed = |bytes: &[u8]| {
            for &b in bytes {
                h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
            }
        };
        let [code, config, tables] = &self.fixed;
        for r in [code, config] {
            feed(bytes_at(r.start, r.len()));
        }
        for entry in bytes_at(tables.start, tables.len()).chunks_exact(8) {
            let mut word = [0u8; 8];
            word.copy_from_slice(entry);
            feed(&(u64::from_le_bytes(word) & !ACCESSED_DIRTY).to_le_bytes());
        }
        h
    }

    /// The monitor's event ring.
    pub fn ring(&self) -> &'static mut EventRing {
        // SAFETY: `ring` is the address of the monitor's `IHMI_EVENT_RING` symbol inside the monitor
        // region, identity-mapped for L0, aligned as the image laid it out. L0 runs only while the guest,
        // and so the monitor, is stopped, and callers do not keep two of these references alive.
        unsafe { &mut *(self.ring.raw() as *mut EventRing) }
    }
}

/// Bump allocator for the monitor's page tables, inside its own region.
struct RegionTables {
    start: Gpa,
    next: Gpa,
    end: Gpa,
}

impl TableAlloc for RegionTables {
    fn alloc_zeroed(&mut self) -> Option<Gpa> {
        let frame = self.next;
        let next = frame.checked_add(PAGE_SIZE)?;
        if next > self.end {
            return None;
        }
        // SAFETY: the frame is inside the monitor region, which L0 took from guest RAM before the guest
        // runs; it is identity-mapped for L0 and used for nothing else.
        unsafe { core::ptr::write_bytes(frame.raw() as *mut u8, 0, PAGE_SIZE as usize) };
        self.next = next;
        Some(frame)
    }

    fn table_mut(&mut self, gpa: Gpa) -> Option<&mut PageTable> {
        if gpa < self.start || gpa >= self.next || !gpa.is_aligned(PAGE_SIZE) {
            return None;
        }
        // SAFETY: a frame this allocator handed out (in [start, next)), page aligned, identity-mapped,
        // used only as a page table.
        Some(unsafe { &mut *(gpa.raw() as *mut PageTable) })
    }
}

fn bytes_at(gpa: Gpa, len: u64) -> &'static mut [u8] {
    // SAFETY: callers pass ranges inside the monitor region, which L0 owns until the guest runs and which
    // the guest can never map afterwards (absent from its view).
    unsafe { core::slice::from_raw_parts_mut(gpa.raw() as *mut u8, len as usize) }
}

/// Loads the monitor image into frames taken from guest RAM; `taken` lists guest-physical ranges that
/// must stay guest RAM (the guest image, its boot structures). `current_process_ptr` comes from the
/// guest kernel's own symbol table.
pub fn load(
    image_bytes: &[u8],
    memory: &mut MemoryMap,
    taken: &[GpaRange],
    os: &MonitorOs,
    allowed: &str,
    mode: ihmi_abi::monitor::Mode,
    page_1g: bool,
) -> Loaded {
    let image = Image::parse(image_bytes, "monitor");
    let base = image.symbol("__gate_start");
    let gate_end = image.symbol("__gate_end");
    let code_end = image.symbol("__code_end");
    let image_end = image.symbol("__image_end");
    let size = image_end
        .checked_sub(base)
        .unwrap_or_else(|| fail(format_args!("monitor image ends before it starts")));
    let region_size = (size + TABLE_FRAMES * PAGE_SIZE).next_multiple_of(LARGE_PAGE_SIZE);

    let ram: Ranges = memory.of_kind(RegionKind::GuestRam).collect();
    let Some(region) =
        ihmi_hv::memory::choose_pool(ram.as_slice(), taken, region_size, LARGE_PAGE_SIZE)
    else {
        fail(format_args!(
            "no room for the monitor's {} KiB in guest RAM",
            region_size >> 10
        ));
    };
    if let Err(e) = memory.reassign(region, RegionKind::Monitor) {
        fail(format_args!("cannot reserve monitor memory: {e:?}"));
    }
    let at = |va: u64| Gpa::new(region.start.raw() + (va - base));

    for ph in image.load_segments() {
        if ph.p_vaddr < base || ph.p_vaddr.saturating_add(ph.p_memsz) > image_end {
            fail(format_args!(
                "monitor segment at {:#x} lies outside the image",
                ph.p_vaddr
            ));
        }
        image.copy_segment(&ph, bytes_at(at(ph.p_vaddr), ph.p_memsz));
    }
    let gate = GpaRange::new(at(base), at(gate_end));
    let code = GpaRange::new(at(gate_end), at(code_end));
    let mut layout = MonitorLayout {
        region,
        code,
        gate,
        linux: None,
    };
    // The test guest reaches the gate at its guest-physical address (it identity-maps low memory); a
    // Linux kernel at a fixed address in a PML4 slot reserved for hypervisors. The monitor's address
    // space maps it at the same address, so the gate continues after its CR3 load.
    let gate_gva = match os {
        MonitorOs::TestGuest { .. } => Gva::new(gate.start.raw()),
        MonitorOs::Linux(_) => Gva::new(ihmi_abi::monitor::LINUX_GATE_GVA),
    };
    if gate_gva.raw() < image_end && gate_gva.raw() + PAGE_SIZE > base {
        fail(format_args!(
            "the gate's address {gate_gva} collides with the monitor image"
        ));
    }

    // The monitor's address space.
    let table_start = at(image_end);
    let mut tables = RegionTables {
        start: table_start,
        next: table_start,
        end: region.end,
    };
    // Linux: the scratch page and the three tables that map gate and scratch in the kernel's address
    // spaces, allocated first so they are one contiguous run the guest view can show.
    let linux_pages = match os {
        MonitorOs::Linux(_) => {
            let mut frame = || {
                tables
                    .alloc_zeroed()
                    .unwrap_or_else(|| fail(format_args!("no room for the gate's pages")))
            };
            let setup = frame();
            let (scratch, pdpt, pd, ptab, hook) = (frame(), frame(), frame(), frame(), frame());
            let range =
                |a: Gpa, pages: u64| GpaRange::new(a, Gpa::new(a.raw() + pages * PAGE_SIZE));
            layout.linux = Some(LinuxGatePages {
                setup_data: range(setup, 1),
                scratch: range(scratch, 1),
                tables: range(pdpt, 4),
            });
            // The setup_data header (boot.rst): next = 0, an unassigned type the kernel ignores, and
            // the length of everything after the header up to the last table.
            let len = 6 * PAGE_SIZE - 16;
            let header = bytes_at(setup, 16);
            header[..8].copy_from_slice(&0u64.to_le_bytes());
            header[8..12].copy_from_slice(&ihmi_linux::SETUP_IHMI.to_le_bytes());
            header[12..16].copy_from_slice(&(len as u32).to_le_bytes());
            Some((scratch, pdpt, pd, ptab, hook))
        }
        MonitorOs::TestGuest { .. } => None,
    };
    if !layout.is_well_formed() || gate.len() != PAGE_SIZE {
        fail(format_args!(
            "monitor image layout is malformed: {layout:?}"
        ));
    }
    let mut pt = PageTableBuilder::new(&mut tables)
        .unwrap_or_else(|e| fail(format_args!("monitor page tables: {e}")));
    let largest = if page_1g {
        PageSize::Size1G
    } else {
        PageSize::Size2M
    };
    for ph in image.load_segments() {
        let mut flags = MapFlags::empty();
        if ph.p_flags & elf::abi::PF_W != 0 {
            flags |= MapFlags::WRITABLE;
        }
        if ph.p_flags & elf::abi::PF_X != 0 {
            flags |= MapFlags::EXECUTABLE;
        }
        let len = ph.p_memsz.next_multiple_of(PAGE_SIZE);
        if let Err(e) = pt.map(
            &mut tables,
            Gva::new(ph.p_vaddr),
            at(ph.p_vaddr),
            len,
            flags,
        ) {
            fail(format_args!(
                "monitor page tables, segment {:#x}: {e}",
                ph.p_vaddr
            ));
        }
    }
    if let Err(e) = pt.map(
        &mut tables,
        gate_gva,
        gate.start,
        PAGE_SIZE,
        MapFlags::EXECUTABLE,
    ) {
        fail(format_args!("monitor page tables, gate: {e}"));
    }
    for r in memory.of_kind(RegionKind::GuestRam) {
        let va = Gva::new(DIRECT_MAP_BASE + r.start.raw());
        if let Err(e) = pt.map_with(
            &mut tables,
            va,
            r.start,
            r.len(),
            MapFlags::WRITABLE,
            largest,
        ) {
            fail(format_args!(
                "monitor direct map of {:#x}: {e}",
                r.start.raw()
            ));
        }
    }
    let mut linux_gate = None;
    if let (Some((scratch, pdpt, pd, ptab, hook_table)), MonitorOs::Linux(p)) = (linux_pages, os) {
        if let Err(e) = pt.map(
            &mut tables,
            Gva::new(ihmi_abi::monitor::LINUX_SCRATCH_GVA),
            scratch,
            PAGE_SIZE,
            MapFlags::WRITABLE,
        ) {
            fail(format_args!("monitor page tables, scratch page: {e}"));
        }
        let pml4e = build_linux_gate_tables(gate_gva, gate.start, scratch, pdpt, pd, ptab);
        // The trampoline's slot: the kernel's image mapping ends at `_end`, rounded up to 2 MiB; one
        // slot is left between as a margin.
        let hook_slot = p
            .kernel_end
            .checked_next_multiple_of(LARGE_PAGE_SIZE)
            .and_then(|e| e.checked_add(LARGE_PAGE_SIZE))
            .unwrap_or_else(|| fail(format_args!("the kernel's _end is out of range")));
        bytes_at(hook_table, 8).copy_from_slice(&(gate.start.raw() | PTE_P | PTE_A).to_le_bytes());
        // In the box the hooks go through the gates; out of the box through the VMCALL stubs.
        let outbox = mode == ihmi_abi::monitor::Mode::OutBox;
        let in_gate = |symbol: &str| gate_gva.raw() + (image.symbol(symbol) - base);
        let (syscall_entry, hook_call) = if outbox {
            ("ihmi_outbox_syscall", "ihmi_outbox_call")
        } else {
            ("ihmi_gate_syscall", "ihmi_gate_entry")
        };
        patch_movabs(&image, at, "ihmi_hook_gate_imm", in_gate(hook_call));
        linux_gate = Some(LinuxGateInfo {
            gate_entry: in_gate(syscall_entry),
            outbox_syscall: outbox.then(|| in_gate("ihmi_outbox_syscall_vmcall")),
            kernel_entry_slot: at(image.symbol("ihmi_gate_kernel_entry")),
            slot: (gate_gva.raw() >> 39) & 0x1ff,
            pml4e,
            gate_page: gate.start,
            hook_slot,
            hook_trampoline: hook_slot + (image.symbol("ihmi_hook_exec") - base),
            hook_table,
        });
    }
    let monitor_cr3 = pt.root().raw() | MONITOR_PCID;

    // The gates' CR3 immediates.
    for symbol in ["ihmi_gate_cr3_imm", "ihmi_gate_syscall_cr3_imm"] {
        patch_movabs(&image, at, symbol, monitor_cr3);
    }

    // The configuration.
    let mut config = MonitorConfig {
        magic: CONFIG_MAGIC,
        direct_map_base: DIRECT_MAP_BASE,
        ram: [RamRange::default(); BOOT_INFO_MAX_RANGES],
        ram_count: 0,
        current_process_ptr: os.current_ptr().raw(),
        allowed: [[0; ihmi_abi::guest_os::COMM_LEN]; MAX_ALLOWED],
        allowed_count: 0,
        os: OS_TESTGUEST,
        pid_offset: 0,
        parent_offset: 0,
        comm_offset: 0,
        pti_pgd_pair: 0,
        binprm_filename_offset: 0,
    };
    if let MonitorOs::Linux(p) = os {
        config.os = OS_LINUX;
        config.pid_offset = p.tgid.offset;
        config.parent_offset = p.real_parent.offset;
        config.comm_offset = p.comm.offset;
        config.pti_pgd_pair = u64::from(p.pti_pgd_pair);
        config.binprm_filename_offset = p.binprm_filename.offset;
    }
    let (ram, count) = crate::guest::ram_ranges(memory);
    config.ram = ram;
    config.ram_count = count;
    for name in allowed.split(',').filter(|n| !n.is_empty()) {
        let Some(slot) = config.allowed.get_mut(config.allowed_count as usize) else {
            fail(format_args!(
                "the allow-list has more than {MAX_ALLOWED} names"
            ));
        };
        if name.len() > slot.len() {
            fail(format_args!(
                "allow-list name '{name}' is longer than a process name ({} bytes)",
                slot.len()
            ));
        }
        slot[..name.len()].copy_from_slice(name.as_bytes());
        config.allowed_count += 1;
    }
    if config.allowed_count > 0 {
        log!("monitor: allow-list {allowed}");
    } else {
        log!("monitor: no allow-list; every process creation is allowed");
    }
    let config_at = bytes_at(
        at(image.symbol("IHMI_MONITOR_CONFIG")),
        core::mem::size_of::<MonitorConfig>() as u64,
    );
    // SAFETY: `config_at` is exactly size_of::<MonitorConfig>() bytes of monitor data; unaligned-safe.
    unsafe { core::ptr::write_unaligned(config_at.as_mut_ptr() as *mut MonitorConfig, config) };

    log!(
        "monitor: {} KiB at {:#x}, gate at {gate_gva}, CR3 {monitor_cr3:#x}, {} table frames",
        region.len() >> 10,
        region.start.raw(),
        (tables.next.raw() - table_start.raw()) / PAGE_SIZE
    );
    let ring = at(image.symbol("IHMI_EVENT_RING"));
    if !ring.is_aligned(core::mem::align_of::<EventRing>() as u64) {
        fail(format_args!(
            "the monitor's event ring at {ring} is misaligned"
        ));
    }
    let phys = GpaRange::new;
    let config_start = at(image.symbol("IHMI_MONITOR_CONFIG"));
    let config_end = config_start
        .checked_add(core::mem::size_of::<MonitorConfig>() as u64)
        .unwrap_or(config_start);
    let invocations = at(image.symbol("IHMI_INVOCATIONS"));
    if !invocations.is_aligned(8) {
        fail(format_args!(
            "the monitor's invocation counter at {invocations} is misaligned"
        ));
    }
    // One pass through a gate: its switches, counted in its own code. Both gates must agree, since
    // the benchmark reports one figure per invocation whichever gate made it.
    let switches_in = |start: &str, end: &str| {
        let (s, e) = (image.symbol(start), image.symbol(end));
        if e <= s || e > gate_end {
            fail(format_args!(
                "the gate's {start}..{end} is not inside the gate page"
            ));
        }
        count_switches(bytes_at(at(s), e - s))
    };
    let (gate_vmfuncs, gate_cr3_loads) = switches_in("ihmi_gate_entry", "ihmi_gate_entry_end");
    let syscall_gate = switches_in("ihmi_gate_syscall", "ihmi_gate_syscall_end");
    if syscall_gate != (gate_vmfuncs, gate_cr3_loads) {
        fail(format_args!(
            "the system-call gate makes {syscall_gate:?} (VMFUNC, CR3) switches, the call gate ({gate_vmfuncs}, {gate_cr3_loads})"
        ));
    }
    log!("gate: {gate_vmfuncs} VMFUNC and {gate_cr3_loads} CR3 loads per pass (each gate)");
    let mut loaded = Loaded {
        layout,
        gate_gva,
        ring,
        os: os.profile(),
        linux_gate,
        root: pt.root(),
        outbox_entry: image.symbol("ihmi_outbox_entry"),
        stack_top: image.symbol("IHMI_MONITOR_STACK_TOP"),
        invocations,
        gate_vmfuncs,
        gate_cr3_loads,
        fixed: [
            phys(at(base), at(image.symbol("__data_start"))),
            phys(config_start, config_end),
            phys(table_start, tables.next),
        ],
        checksum_at_load: 0,
    };
    loaded.checksum_at_load = loaded.checksum();
    loaded
}

/// Writes `value` into the immediate of the `movabs $imm64, %rax` (48 B8 imm64) at the image symbol
/// `symbol`, which `at` places in the monitor region.
fn patch_movabs(image: &Image<'_>, at: impl Fn(u64) -> Gpa, symbol: &str, value: u64) {
    let insn = bytes_at(at(image.symbol(symbol)), 10);
    if insn[..2] != [0x48, 0xb8] {
        fail(format_args!(
            "{symbol} is not a movabs to RAX; the monitor image and L0 disagree"
        ));
    }
    insn[2..].copy_from_slice(&value.to_le_bytes());
}

/// Counts `VMFUNC` (0F 01 D4) and `mov %reg, %cr3` (0F 22 with ModRM mod = 11, reg = 3) in the gate's
/// code: the view and address-space switches one pass through the gate makes.
fn count_switches(code: &[u8]) -> (u64, u64) {
    let vmfuncs = code.windows(3).filter(|w| *w == [0x0f, 0x01, 0xd4]).count();
    let cr3 = code
        .windows(3)
        .filter(|w| w[0] == 0x0f && w[1] == 0x22 && w[2] & 0xf8 == 0xd8)
        .count();
    (vmfuncs as u64, cr3 as u64)
}
