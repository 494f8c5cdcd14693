//! Boot stage: the in-VM monitor. L0 carves its frames out of guest RAM, copies its image, builds its
//! address space (the one-way mapping: the monitor sees all guest RAM through a direct map, the guest
//! sees nothing of the monitor), patches the gates and writes the monitor's configuration. Where
//! everything goes and what the words are comes from `ihmi-layout`; this module only writes.

use ihmi_abi::monitor::{
    KvmOffsets, Mode, MonitorConfig, CONFIG_MAGIC, KERNEL_IMAGE_RANGES, OS_LINUX, OS_TESTGUEST,
};
use ihmi_addr::{Gpa, GpaRange, Gva, LARGE_PAGE_SIZE, PAGE_SIZE};
use ihmi_hv::guard::views::{LinuxGatePages, MonitorLayout};
use ihmi_hv::{MemoryMap, RegionKind};
use ihmi_layout::{GateTables, ImageSymbols, Placement};
use ihmi_monitor::{EventRing, OsProfile};
use ihmi_paging::{MapFlags, PageSize, PageTable, PageTableBuilder, TableAlloc};

use crate::elf_image::Image;
use crate::error::LoadError;
use crate::log;
use crate::ranges::Ranges;

/// Where guest-physical address 0 appears in the monitor's address space.
pub const DIRECT_MAP_BASE: u64 = 0xffff_8000_0000_0000;
/// PCID the monitor's address space uses (the guest's kernel uses its own).
const MONITOR_PCID: u64 = 1;
/// Process names the test guest's creation policy allows; `intruder` is deliberately absent.
pub const TESTGUEST_ALLOWED: &str = "init,worker,bench";

/// Which guest kernel the monitor watches.
// One value, made once when the monitor is loaded: the test guest's variant wastes nothing that
// matters.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Copy, Debug)]
pub enum MonitorOs {
    /// ihmi's test guest, whose `CURRENT_PROCESS` is at this address.
    TestGuest { current: Gva },
    /// A Linux kernel, described by the profile the host derived from its System.map and BTF, and
    /// where what it keeps of its image (text, read-only data, data, zero-initialised data) is in
    /// guest RAM.
    Linux(ihmi_linux::LinuxProfile, [GpaRange; KERNEL_IMAGE_RANGES]),
}

impl MonitorOs {
    fn current_ptr(&self) -> Gva {
        match self {
            Self::TestGuest { current } => *current,
            Self::Linux(p, _) => Gva::new(p.current_task),
        }
    }

    /// What a Linux kernel keeps of its image, guest-physical.
    const fn image(&self) -> Option<[GpaRange; KERNEL_IMAGE_RANGES]> {
        match self {
            Self::TestGuest { .. } => None,
            Self::Linux(_, image) => Some(*image),
        }
    }

    fn profile(&self) -> OsProfile {
        match self {
            Self::TestGuest { current } => OsProfile::testguest(*current),
            Self::Linux(p, _) => OsProfile::linux(
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

/// The monitor's frames, L0's to write while the guest does not run and L0's to read afterwards:
/// every access is bounds-checked against the region, and a slice borrows this handle.
pub struct MonitorMemory {
    region: GpaRange,
}

impl MonitorMemory {
    /// The handle for the monitor's region.
    ///
    /// # Safety
    /// 1. `region` is the monitor's: taken out of guest RAM (the memory map says `Monitor`), below
    ///    4 GiB and identity-mapped for L0.
    /// 2. No other handle for it exists.
    unsafe fn claim(region: GpaRange) -> Self {
        Self { region }
    }

    /// `range`, which must lie inside the region.
    fn bytes(&mut self, range: GpaRange) -> Result<&mut [u8], LoadError> {
        let r = self.check(range)?;
        // SAFETY: inside the region (checked), which `claim`'s preconditions make L0's to access;
        // the slice borrows `self` mutably, so it is the only one alive.
        Ok(unsafe { core::slice::from_raw_parts_mut(r.start.raw() as *mut u8, r.len() as usize) })
    }

    /// `range`, read-only.
    fn bytes_ref(&self, range: GpaRange) -> Result<&[u8], LoadError> {
        let r = self.check(range)?;
        // SAFETY: as in `bytes`, shared: no `&mut` slice of the region can be alive while `self` is
        // borrowed shared.
        Ok(unsafe { core::slice::from_raw_parts(r.start.raw() as *const u8, r.len() as usize) })
    }

    fn check(&self, range: GpaRange) -> Result<GpaRange, LoadError> {
        if self.region.contains_range(range.start, range.len()) && range.start <= range.end {
            Ok(range)
        } else {
            Err(LoadError::Layout(ihmi_layout::LayoutError::Outside(
                range.start.raw(),
            )))
        }
    }

    fn word(&mut self, at: Gpa) -> Result<&mut [u8], LoadError> {
        self.bytes(GpaRange::new(at, Gpa::new(at.raw() + 8)))
    }

    /// The page at `gpa` (page-aligned, inside the region) as a page table.
    fn table(&mut self, gpa: Gpa) -> Option<&mut PageTable> {
        if !gpa.is_aligned(PAGE_SIZE) {
            return None;
        }
        let bytes = self
            .bytes(GpaRange::new(gpa, Gpa::new(gpa.raw() + PAGE_SIZE)))
            .ok()?;
        // SAFETY: a page-aligned page of the region borrowed exclusively from `self`; `PageTable` is
        // 512 plain `u64` entries (4 KiB, 4 KiB-aligned), valid for any bytes.
        Some(unsafe { &mut *(bytes.as_mut_ptr() as *mut PageTable) })
    }
}

/// Where the Linux system-call gate goes, for L0's guard to install when the kernel sets IA32_LSTAR.
#[derive(Clone, Copy, Debug)]
pub struct LinuxGateInfo {
    /// The gate's entries (out of the box: the VMCALL stubs), in the order of `SyscallEntry::ALL`:
    /// where the CPU enters, where the gate page keeps the kernel's own entry, and out of the box
    /// the stub's VMCALL.
    pub entries: [(Gva, Gpa, Option<Gva>); 3],
    /// The PML4 slot and the entry that maps the gate's tables.
    pub slot: u64,
    pub pml4e: u64,
    /// The gate page, guest-physical.
    pub gate_page: Gpa,
    /// The process-creation trampoline: its 2 MiB slot in the kernel's image mapping, its entry
    /// there, and the page table (filled) that maps the slot's first page to the gate page.
    pub hook_slot: Gva,
    pub hook_trampoline: Gva,
    pub hook_table: Gpa,
    /// Where the trampoline's call of the gate returns, in the slot (the monitor checks it on every
    /// exec request's stack).
    pub hook_return: Gva,
    /// The same for the io_uring hook's trampoline.
    pub io_uring_trampoline: Gva,
    pub io_uring_return: Gva,
    /// The same for the KVM exit hook's trampoline.
    pub kvm_exit_trampoline: Gva,
    pub kvm_exit_return: Gva,
    /// The same for the KVM mapping hook's trampoline, and the memslot and vCPU hooks'.
    pub l2_map_trampoline: Gva,
    pub l2_map_return: Gva,
    pub memslot_trampoline: Gva,
    pub memslot_return: Gva,
    pub vcpu_create_trampoline: Gva,
    pub vcpu_create_return: Gva,
    pub vcpu_destroy_trampoline: Gva,
    pub vcpu_destroy_return: Gva,
    /// Out of the box: the call stub's VMCALL, the only place a `Monitor` hypercall of a Linux guest
    /// may come from.
    pub call_vmcall: Option<Gva>,
}

impl LinuxGateInfo {
    /// The gate-page words L0 may write (the kernel's own entries), one per entry.
    pub fn kernel_slots(&self) -> [Gpa; 3] {
        self.entries.map(|(_, slot, _)| slot)
    }
}

/// A loaded monitor.
pub struct Loaded {
    memory: MonitorMemory,
    pub layout: MonitorLayout,
    /// Guest-virtual address of the gate's entry, the same in both address spaces.
    pub gate_gva: Gva,
    /// The event ring, inside the region (checked at load: aligned, whole).
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
    /// The monitor's count of its own invocations (an aligned `u64`, checked at load).
    invocations: Gpa,
    /// And of the KVM exits it served (the in-hypervisor monitor's hook).
    kvm_exits: Gpa,
    /// Its hook counts (`IHMI_HOOK_COUNTS`, an aligned `[u64; 3]`).
    hook_counts: Gpa,
    /// What it found of the kernel's linear mappings (`IHMI_LINEAR`, an aligned `[u64; 3]`).
    linear: Gpa,
    /// With KVM in the watched kernel: the monitor's VMCS registry (`IHMI_KVM_VMCSS`, a
    /// `KvmVmcsRegistry`, aligned, checked at load), which L0 holds L1's VMLAUNCHes and VMRESUMEs
    /// to (P6).
    pub vmcs_registry: Option<Gpa>,
    /// With KVM in the watched kernel: `kvm_x86_ops`, for L0 to copy into the configuration when the
    /// kernel's boot is over ([`Loaded::copy_kvm_ops`]); `None` once copied, or without KVM.
    kvm_ops: Option<KvmOpsCopy>,
    /// VMFUNC and CR3-load instructions in the gate, counted in its code by L0 at load.
    pub gate_vmfuncs: u64,
    /// See `gate_vmfuncs`.
    pub gate_cr3_loads: u64,
    /// What never changes after loading: gate, code and read-only data; the configuration; the page
    /// tables (and for Linux the `setup_data` page before them).
    fixed: Fixed,
    /// Their checksum when L0 finished loading.
    pub checksum_at_load: u64,
}

/// Where the watched kernel keeps `kvm_x86_ops` (guest-physical) and how many words it has.
#[derive(Clone, Copy, Debug)]
struct KvmOpsCopy {
    from: Gpa,
    words: u64,
}

/// The parts of the monitor region that must never change after loading, and the two holes in them:
/// the Linux scratch page, which the gate writes in view 0 by design, and the word of the gate page
/// L0 writes when the kernel installs its system-call entry (checked against what L0 wrote instead).
#[derive(Clone, Copy, Debug)]
struct Fixed {
    image: GpaRange,
    config: GpaRange,
    /// Linux: the `setup_data` page, read-only in view 0 (none for the test guest).
    setup: Option<GpaRange>,
    /// The page tables (for Linux those after the scratch page).
    tables: GpaRange,
    /// The granted words inside `image` (none for the test guest).
    words: Option<[Gpa; 3]>,
}

/// The monitor as L0 found it: every fixed byte as at load, and the granted words as L0 last wrote
/// them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Integrity {
    pub checksum: u64,
    pub at_load: u64,
    /// The granted words: what each holds, and what L0 wrote there.
    pub words: Option<[(u64, u64); 3]>,
}

impl Integrity {
    pub fn intact(&self) -> bool {
        self.checksum == self.at_load
            && self
                .words
                .is_none_or(|w| w.iter().all(|(found, wrote)| found == wrote))
    }
}

impl Loaded {
    /// How often the monitor's entry point has run.
    pub fn invocations(&self) -> u64 {
        self.counter(self.invocations)
    }

    /// How many KVM exits the monitor served (`IHMI_KVM_EXITS`).
    pub fn kvm_exits(&self) -> u64 {
        self.counter(self.kvm_exits)
    }

    /// What the monitor counted of its in-hypervisor hooks (`IHMI_HOOK_COUNTS`): the TSC ticks it spent
    /// handling the KVM exits it served, the mappings it checked, and the ticks it spent on those.
    pub fn hook_counts(&self) -> [u64; 3] {
        [0, 1, 2].map(|i| self.counter(Gpa::new(self.hook_counts.raw() + 8 * i)))
    }

    /// The kernel's linear mappings the monitor reads without a walk (`IHMI_LINEAR`): `None` before
    /// it checked them (or when it does not: out of the box, the test guest), else the bytes of the
    /// direct map and of the image mapping it holds (0: that window did not pass the check).
    pub fn linear_windows(&self) -> Option<[u64; 2]> {
        let at = |i: u64| self.counter(Gpa::new(self.linear.raw() + 8 * i));
        (at(0) == 1).then(|| [at(1), at(2)])
    }

    /// One of the monitor's `u64` counters, at `at`.
    fn counter(&self, at: Gpa) -> u64 {
        self.memory
            .bytes_ref(GpaRange::new(at, Gpa::new(at.raw() + 8)))
            .map_or(0, |b| {
                // SAFETY: 8 bytes of the region, aligned (checked at load); a volatile read, since the
                // monitor writes the counter behind the compiler's back (it is stopped now).
                unsafe { core::ptr::read_volatile(b.as_ptr() as *const u64) }
            })
    }

    /// The checksum of the parts of the monitor that never change after loading ([`Fixed`]).
    fn checksum(&self) -> u64 {
        let f = &self.fixed;
        let bytes = |r: GpaRange| self.memory.bytes_ref(r).unwrap_or(&[]);
        // The image without the granted words (three in a row): before them, and after them.
        let (before, after) = match f.words {
            Some(w) => (
                GpaRange::new(f.image.start, w[0]),
                GpaRange::new(Gpa::new(w[2].raw() + 8), f.image.end),
            ),
            None => (f.image, GpaRange::new(f.image.end, f.image.end)),
        };
        let setup = f.setup.unwrap_or(GpaRange::new(f.config.end, f.config.end));
        ihmi_layout::checksum([before, after, f.config, setup].map(bytes), bytes(f.tables))
    }

    /// Whether `kvm_x86_ops` is still to be copied ([`Self::copy_kvm_ops`]).
    pub const fn kvm_ops_pending(&self) -> bool {
        self.kvm_ops.is_some()
    }

    /// Copies KVM's `kvm_x86_ops` into the monitor's configuration, once: L0 calls this when the
    /// watched kernel's boot is over (its first system call, where L0 opens the gate and arms the
    /// hooks, before any can fire), when the vendor module has filled the struct in and no process has
    /// run. The monitor holds the live struct to this copy (P2). The configuration is fixed from
    /// then on: its checksum is taken again, but only from a monitor that is still as L0 loaded it
    /// (else nothing is copied and the audit goes on reporting the difference, never laundered into
    /// a new checksum). `read` reads guest RAM; the words copied, or why not.
    pub fn copy_kvm_ops(
        &mut self,
        read: impl FnOnce(Gpa, &mut [u8]) -> Result<(), ihmi_hv::PlatformError>,
    ) -> Result<u64, &'static str> {
        let copy = self.kvm_ops.take().ok_or("nothing to copy")?;
        if self.checksum() != self.checksum_at_load {
            return Err("the monitor is not as L0 loaded it; nothing copied");
        }
        let words = copy.words.min(ihmi_abi::monitor::KVM_X86_OPS_MAX as u64);
        let mut bytes = [0u8; ihmi_abi::monitor::KVM_X86_OPS_MAX * 8];
        let bytes = &mut bytes[..words as usize * 8];
        read(copy.from, bytes).map_err(|_| "kvm_x86_ops is not readable guest RAM")?;
        let kvm = core::mem::offset_of!(MonitorConfig, kvm);
        let at = |field: usize| Gpa::new(self.fixed.config.start.raw() + (kvm + field) as u64);
        let count = GpaRange::new(
            at(core::mem::offset_of!(KvmOffsets, x86_ops_words)),
            Gpa::new(at(core::mem::offset_of!(KvmOffsets, x86_ops_words)).raw() + 8),
        );
        let values = at(core::mem::offset_of!(KvmOffsets, x86_ops_values));
        let values = GpaRange::new(values, Gpa::new(values.raw() + bytes.len() as u64));
        self.memory
            .bytes(values)
            .map_err(|_| "the configuration has no room")?
            .copy_from_slice(bytes);
        self.memory
            .bytes(count)
            .map_err(|_| "the configuration has no room")?
            .copy_from_slice(&words.to_le_bytes());
        self.checksum_at_load = self.checksum();
        Ok(words)
    }

    /// The value of an aligned word of the region.
    fn word(&self, at: Gpa) -> Option<u64> {
        let b = self
            .memory
            .bytes_ref(GpaRange::new(at, Gpa::new(at.raw() + 8)))
            .ok()?;
        // SAFETY: 8 bytes of the region, aligned (the granted word is checked at load); volatile, as
        // the gate and L0 write it behind the compiler's back.
        Some(unsafe { core::ptr::read_volatile(b.as_ptr() as *const u64) })
    }

    /// The granted words and their values at load (L0 expects them there until it writes them).
    pub fn granted_words_at_load(&self) -> Option<[(Gpa, u64); 3]> {
        let w = self.fixed.words?;
        Some([
            (w[0], self.word(w[0])?),
            (w[1], self.word(w[1])?),
            (w[2], self.word(w[2])?),
        ])
    }

    /// The monitor as L0 finds it now; `wrote` is what L0 last wrote into each granted word.
    pub fn integrity(&self, wrote: Option<[u64; 3]>) -> Integrity {
        let words = self.fixed.words.zip(wrote).map(|(at, wrote)| {
            [0, 1, 2].map(|i| (self.word(at[i]).unwrap_or(!wrote[i]), wrote[i]))
        });
        Integrity {
            checksum: self.checksum(),
            at_load: self.checksum_at_load,
            words,
        }
    }

    /// The monitor's event ring.
    pub fn ring(&mut self) -> &mut EventRing {
        self.ring_and_os().0
    }

    /// The event ring and the guest kernel as the monitor sees it, for decoding what the ring holds
    /// (borrowed, not copied: L0 drains at every exit, and Bochs prices a copy by the byte).
    pub fn ring_and_os(&mut self) -> (&mut EventRing, &OsProfile) {
        let size = core::mem::size_of::<EventRing>() as u64;
        let ring = self.ring;
        match self
            .memory
            .bytes(GpaRange::new(ring, Gpa::new(ring.raw() + size)))
        {
            Ok(b) => {
                // SAFETY: `size_of::<EventRing>()` bytes of the region at the monitor's
                // `IHMI_EVENT_RING`, aligned (checked at load), borrowed exclusively from `self`; the
                // ring is counters and events of plain integers and bytes, valid for any contents;
                // the monitor is stopped.
                let ring = unsafe { &mut *(b.as_mut_ptr() as *mut EventRing) };
                (ring, &self.os)
            }
            // Checked at load: the ring lies inside the region.
            Err(_) => panic!("the monitor's event ring left its region"),
        }
    }
}

/// Bump allocator for the monitor's page tables, inside its own region.
struct RegionTables<'m> {
    memory: &'m mut MonitorMemory,
    start: Gpa,
    next: Gpa,
    end: Gpa,
}

impl TableAlloc for RegionTables<'_> {
    fn alloc_zeroed(&mut self) -> Option<Gpa> {
        let frame = self.next;
        let next = frame.checked_add(PAGE_SIZE)?;
        if next > self.end {
            return None;
        }
        self.memory.bytes(GpaRange::new(frame, next)).ok()?.fill(0);
        self.next = next;
        Some(frame)
    }

    fn table_mut(&mut self, gpa: Gpa) -> Option<&mut PageTable> {
        if gpa < self.start || gpa >= self.next {
            return None;
        }
        self.memory.table(gpa)
    }
}

impl RegionTables<'_> {
    fn frame(&mut self) -> Result<Gpa, LoadError> {
        self.alloc_zeroed()
            .ok_or(LoadError::PageTables("the monitor's page tables"))
    }
}

/// The Linux gate's pages in the monitor region: the `setup_data` header, the scratch page, the
/// gate's three tables and the trampoline's, one contiguous run (allocated first among the tables).
#[derive(Clone, Copy)]
struct LinuxPages {
    setup: Gpa,
    scratch: Gpa,
    tables: GateTables,
    hook_table: Gpa,
}

/// Loads the monitor image into frames taken from guest RAM; `taken` lists guest-physical ranges that
/// must stay guest RAM (the guest image, its boot structures, a Linux kernel's span).
pub fn load(
    image_bytes: &[u8],
    memory: &mut MemoryMap,
    taken: &[GpaRange],
    os: &MonitorOs,
    allowed: &str,
    mode: Mode,
    page_1g: bool,
) -> Result<Loaded, LoadError> {
    let image = Image::parse(image_bytes, "monitor")?;
    let symbols = ImageSymbols {
        gate_start: image.symbol("__gate_start")?,
        gate_end: image.symbol("__gate_end")?,
        code_end: image.symbol("__code_end")?,
        data_start: image.symbol("__data_start")?,
        image_end: image.symbol("__image_end")?,
    };
    let (place, mut mem) = take_region(memory, taken, symbols)?;
    for ph in image.load_segments() {
        let dst = mem.bytes(place.range(ph.p_vaddr, ph.p_memsz)?)?;
        image.copy_segment(&ph, dst)?;
    }
    let gate = place.gate();
    // The test guest reaches the gate at its guest-physical address (it identity-maps low memory); a
    // Linux kernel at a fixed address in a PML4 slot reserved for hypervisors. The monitor's address
    // space maps it at the same address, so the gate continues after its CR3 load.
    let gate_gva = match os {
        MonitorOs::TestGuest { .. } => Gva::new(gate.start.raw()),
        MonitorOs::Linux(..) => Gva::new(ihmi_abi::monitor::LINUX_GATE_GVA),
    };
    place.check_gate_address(gate_gva)?;

    // The monitor's address space, in the frames after the image.
    let table_area = place.tables();
    let mut tables = RegionTables {
        memory: &mut mem,
        start: table_area.start,
        next: table_area.start,
        end: table_area.end,
    };
    let linux_pages = match os {
        MonitorOs::Linux(..) => Some(linux_pages(&mut tables)?),
        MonitorOs::TestGuest { .. } => None,
    };
    let layout = MonitorLayout {
        region: place.region(),
        code: place.code(),
        gate,
        linux: linux_pages.map(|l| {
            let pages = |a: Gpa, n: u64| GpaRange::new(a, Gpa::new(a.raw() + n * PAGE_SIZE));
            LinuxGatePages {
                setup_data: pages(l.setup, 1),
                scratch: pages(l.scratch, 1),
                tables: pages(l.tables.pdpt, 4),
            }
        }),
    };
    if !layout.is_well_formed() {
        return Err(LoadError::Layout(ihmi_layout::LayoutError::Outside(
            place.region().start.raw(),
        )));
    }
    let root = address_space(
        &mut tables,
        &image,
        &place,
        gate_gva,
        memory,
        linux_pages,
        page_1g,
    )?;
    let linux_gate = match (linux_pages, os) {
        (Some(pages), MonitorOs::Linux(p, _)) => Some(linux_gate(
            tables.memory,
            &image,
            &place,
            gate_gva,
            pages,
            p.kernel_end,
            mode,
        )?),
        _ => None,
    };
    let tables_used = GpaRange::new(table_area.start, tables.next);
    let monitor_cr3 = root.raw() | MONITOR_PCID;
    // The gates' CR3 immediates.
    for symbol in [
        "ihmi_gate_cr3_imm",
        "ihmi_gate_syscall_cr3_imm",
        "ihmi_gate_sysenter_cr3_imm",
        "ihmi_gate_int80_cr3_imm",
    ] {
        patch_movabs(&mut mem, &place, &image, symbol, monitor_cr3)?;
    }
    let config = write_config(
        &mut mem,
        &image,
        &place,
        memory,
        os,
        allowed,
        linux_gate.as_ref(),
        mode,
    )?;
    log!(
        "monitor: {} KiB at {:#x}, gate at {gate_gva}, CR3 {monitor_cr3:#x}, {} table frames",
        place.region().len() >> 10,
        place.region().start.raw(),
        tables_used.len() / PAGE_SIZE
    );
    let ring = place.range(
        image.symbol("IHMI_EVENT_RING")?,
        core::mem::size_of::<EventRing>() as u64,
    )?;
    if !ring
        .start
        .is_aligned(core::mem::align_of::<EventRing>() as u64)
    {
        return Err(image.misaligned("IHMI_EVENT_RING"));
    }
    let invocations = place.at(image.symbol("IHMI_INVOCATIONS")?)?;
    if !invocations.is_aligned(8) {
        return Err(image.misaligned("IHMI_INVOCATIONS"));
    }
    let kvm_exits = place.at(image.symbol("IHMI_KVM_EXITS")?)?;
    if !kvm_exits.is_aligned(8) {
        return Err(image.misaligned("IHMI_KVM_EXITS"));
    }
    let hook_counts = place.range(image.symbol("IHMI_HOOK_COUNTS")?, 3 * 8)?.start;
    if !hook_counts.is_aligned(8) {
        return Err(image.misaligned("IHMI_HOOK_COUNTS"));
    }
    let linear = place.range(image.symbol("IHMI_LINEAR")?, 3 * 8)?.start;
    if !linear.is_aligned(8) {
        return Err(image.misaligned("IHMI_LINEAR"));
    }
    let vmcs_registry = match os {
        MonitorOs::Linux(p, _) if p.kvm.is_some() => {
            let size = core::mem::size_of::<ihmi_abi::monitor::KvmVmcsRegistry>() as u64;
            let at = place.range(image.symbol("IHMI_KVM_VMCSS")?, size)?.start;
            if !at.is_aligned(8) {
                return Err(image.misaligned("IHMI_KVM_VMCSS"));
            }
            Some(at)
        }
        _ => None,
    };
    let (gate_vmfuncs, gate_cr3_loads) = gate_switches(&mem, &image, &place, symbols.gate_end)?;
    let mut loaded = Loaded {
        memory: mem,
        layout,
        gate_gva,
        ring: ring.start,
        os: os.profile(),
        linux_gate,
        root,
        outbox_entry: image.symbol("ihmi_outbox_entry")?,
        stack_top: image.symbol("IHMI_MONITOR_STACK_TOP")?,
        invocations,
        kvm_exits,
        hook_counts,
        linear,
        vmcs_registry,
        kvm_ops: kvm_ops_in(os),
        gate_vmfuncs,
        gate_cr3_loads,
        fixed: Fixed {
            image: place.fixed_image(),
            config,
            // Linux: the setup_data page, the scratch page, then tables (`linux_pages`).
            setup: linux_pages.map(|l| GpaRange::new(l.setup, l.scratch)),
            tables: match linux_pages {
                Some(l) => GpaRange::new(Gpa::new(l.scratch.raw() + PAGE_SIZE), tables_used.end),
                None => tables_used,
            },
            words: linux_gate.map(|g| g.kernel_slots()),
        },
        checksum_at_load: 0,
    };
    loaded.checksum_at_load = loaded.checksum();
    Ok(loaded)
}

/// Where a Linux kernel with KVM keeps `kvm_x86_ops`, guest-physical: in its data, which L0 found in
/// guest RAM (`MonitorOs::Linux`'s third range starts at the page of the data's first byte).
fn kvm_ops_in(os: &MonitorOs) -> Option<KvmOpsCopy> {
    let MonitorOs::Linux(p, image) = os else {
        return None;
    };
    let k = p.kvm.as_ref()?;
    let (data, words) = (p.data, k.x86_ops_size / 8);
    let end = k.x86_ops.checked_add(k.x86_ops_size)?;
    if k.x86_ops < data[0] || end > data[1] {
        log!("monitor: kvm_x86_ops is not in the kernel's data; it goes unwatched");
        return None;
    }
    let from = image[2].start.raw() + (k.x86_ops - (data[0] & !(PAGE_SIZE - 1)));
    Some(KvmOpsCopy {
        from: Gpa::new(from),
        words,
    })
}

/// The monitor's region: sized for the image and its tables, placed high in guest RAM clear of
/// `taken`, taken out of guest RAM in the memory map, and claimed.
fn take_region(
    memory: &mut MemoryMap,
    taken: &[GpaRange],
    symbols: ImageSymbols,
) -> Result<(Placement, MonitorMemory), LoadError> {
    let region_size = symbols.region_size()?;
    let ram = Ranges::collect(memory.of_kind(RegionKind::GuestRam))
        .map_err(|_| LoadError::MemoryMap(ihmi_hv::memory::MapError::Full))?;
    let region = ihmi_hv::memory::choose_pool(ram.as_slice(), taken, region_size, LARGE_PAGE_SIZE)
        .ok_or(LoadError::NoMonitorRoom {
            kib: region_size >> 10,
        })?;
    memory.reassign(region, RegionKind::Monitor)?;
    let place = Placement::new(symbols, region)?;
    // SAFETY: `region` was just taken out of guest RAM for the monitor (the map now says so); guest
    // RAM is below 4 GiB and identity-mapped for L0; this is the one handle for it.
    Ok((place, unsafe { MonitorMemory::claim(region) }))
}

/// Linux: the gate's pages, allocated first among the tables so they are one contiguous run the guest
/// view can show, with the `setup_data` header that makes the kernel keep them.
fn linux_pages(tables: &mut RegionTables<'_>) -> Result<LinuxPages, LoadError> {
    let setup = tables.frame()?;
    let scratch = tables.frame()?;
    let gate_tables = GateTables {
        pdpt: tables.frame()?,
        pd: tables.frame()?,
        pt: tables.frame()?,
    };
    let hook_table = tables.frame()?;
    // Everything after the header, up to the last table.
    let len = (6 * PAGE_SIZE - 16) as u32;
    tables
        .memory
        .bytes(GpaRange::new(setup, Gpa::new(setup.raw() + 16)))?
        .copy_from_slice(&ihmi_layout::setup_data_header(ihmi_linux::SETUP_IHMI, len));
    Ok(LinuxPages {
        setup,
        scratch,
        tables: gate_tables,
        hook_table,
    })
}

/// The monitor's own address space: its image with the rights its segments ask for, the gate at
/// the guest's address for it, all guest RAM through the direct map (never executable), and for
/// Linux the scratch page. Returns the root.
fn address_space(
    tables: &mut RegionTables<'_>,
    image: &Image<'_>,
    place: &Placement,
    gate_gva: Gva,
    memory: &MemoryMap,
    linux: Option<LinuxPages>,
    page_1g: bool,
) -> Result<Gpa, LoadError> {
    let pt_error = |_| LoadError::PageTables("the monitor's page tables");
    let mut pt = PageTableBuilder::new(tables).map_err(pt_error)?;
    for ph in image.load_segments() {
        let mut flags = MapFlags::empty();
        if ph.p_flags & elf::abi::PF_W != 0 {
            flags |= MapFlags::WRITABLE;
        }
        if ph.p_flags & elf::abi::PF_X != 0 {
            flags |= MapFlags::EXECUTABLE;
        }
        let len = ph.p_memsz.next_multiple_of(PAGE_SIZE);
        pt.map(
            tables,
            Gva::new(ph.p_vaddr),
            place.at(ph.p_vaddr)?,
            len,
            flags,
        )
        .map_err(pt_error)?;
    }
    pt.map(
        tables,
        gate_gva,
        place.gate().start,
        PAGE_SIZE,
        MapFlags::EXECUTABLE,
    )
    .map_err(pt_error)?;
    let largest = if page_1g {
        PageSize::Size1G
    } else {
        PageSize::Size2M
    };
    for r in memory.of_kind(RegionKind::GuestRam) {
        let va = Gva::new(DIRECT_MAP_BASE + r.start.raw());
        pt.map_with(tables, va, r.start, r.len(), MapFlags::WRITABLE, largest)
            .map_err(pt_error)?;
    }
    if let Some(l) = linux {
        pt.map(
            tables,
            Gva::new(ihmi_abi::monitor::LINUX_SCRATCH_GVA),
            l.scratch,
            PAGE_SIZE,
            MapFlags::WRITABLE,
        )
        .map_err(pt_error)?;
    }
    Ok(pt.root())
}

/// Linux: fills the gate's tables and the trampoline's, points the exec trampoline at the gate (in
/// the box) or at the VMCALL stub (out of it), and says where everything is for the guard.
fn linux_gate(
    mem: &mut MonitorMemory,
    image: &Image<'_>,
    place: &Placement,
    gate_gva: Gva,
    pages: LinuxPages,
    kernel_end: u64,
    mode: Mode,
) -> Result<LinuxGateInfo, LoadError> {
    let gate = place.gate().start;
    let (entries, pml4e) =
        ihmi_layout::gate_table_entries(gate_gva, gate, pages.scratch, pages.tables);
    for (at, value) in entries {
        mem.word(at)?.copy_from_slice(&value.to_le_bytes());
    }
    let hook_slot = ihmi_layout::hook_slot(kernel_end)?;
    mem.word(pages.hook_table)?
        .copy_from_slice(&ihmi_layout::trampoline_entry(gate).to_le_bytes());
    let base = image.symbol("__gate_start")?;
    let in_gate = |symbol: &'static str| -> Result<Gva, LoadError> {
        Ok(Gva::new(gate_gva.raw() + (image.symbol(symbol)? - base)))
    };
    // In the box the hooks go through the gates; out of the box through the VMCALL stubs.
    let outbox = mode == Mode::OutBox;
    let hook_call = if outbox {
        "ihmi_outbox_call"
    } else {
        "ihmi_gate_entry"
    };
    // Per entry (`SyscallEntry::ALL`): the gate, the stub, its VMCALL, the kernel's word.
    const ENTRIES: [[&str; 4]; 3] = [
        [
            "ihmi_gate_syscall",
            "ihmi_outbox_syscall",
            "ihmi_outbox_syscall_vmcall",
            "ihmi_gate_kernel_entry",
        ],
        [
            "ihmi_gate_sysenter",
            "ihmi_outbox_sysenter",
            "ihmi_outbox_sysenter_vmcall",
            "ihmi_gate_kernel_sysenter",
        ],
        [
            "ihmi_gate_int80",
            "ihmi_outbox_int80",
            "ihmi_outbox_int80_vmcall",
            "ihmi_gate_kernel_int80",
        ],
    ];
    let mut entries = [(Gva::new(0), Gpa::new(0), None); 3];
    for (out, [gate_entry, stub, vmcall, word]) in entries.iter_mut().zip(ENTRIES) {
        let slot = place.at(image.symbol(word)?)?;
        if !slot.is_aligned(8) {
            return Err(image.misaligned(word));
        }
        *out = if outbox {
            (in_gate(stub)?, slot, Some(in_gate(vmcall)?))
        } else {
            (in_gate(gate_entry)?, slot, None)
        };
    }
    // The three words are one run, which the integrity check leaves out as a whole.
    let [a, b, c] = entries.map(|(_, slot, _)| slot.raw());
    if b != a + 8 || c != b + 8 {
        return Err(image.misaligned("ihmi_gate_kernel_entry"));
    }
    for imm in [
        "ihmi_hook_exec_gate_imm",
        "ihmi_hook_io_uring_gate_imm",
        "ihmi_hook_kvm_exit_gate_imm",
        "ihmi_hook_l2_map_gate_imm",
        "ihmi_hook_memslot_gate_imm",
        "ihmi_hook_vcpu_create_gate_imm",
        "ihmi_hook_vcpu_destroy_gate_imm",
    ] {
        patch_movabs(mem, place, image, imm, in_gate(hook_call)?.raw())?;
    }
    // Where each trampoline is in the slot, and where its call of the gate returns.
    let in_slot = |symbol: &'static str| -> Result<Gva, LoadError> {
        Ok(Gva::new(hook_slot.raw() + (image.symbol(symbol)? - base)))
    };
    Ok(LinuxGateInfo {
        entries,
        slot: ihmi_layout::pml4_slot(gate_gva),
        pml4e,
        gate_page: gate,
        hook_slot,
        hook_trampoline: in_slot("ihmi_hook_exec")?,
        hook_return: in_slot("ihmi_hook_exec_gate_return")?,
        io_uring_trampoline: in_slot("ihmi_hook_io_uring")?,
        io_uring_return: in_slot("ihmi_hook_io_uring_gate_return")?,
        kvm_exit_trampoline: in_slot("ihmi_hook_kvm_exit")?,
        kvm_exit_return: in_slot("ihmi_hook_kvm_exit_gate_return")?,
        l2_map_trampoline: in_slot("ihmi_hook_l2_map")?,
        l2_map_return: in_slot("ihmi_hook_l2_map_gate_return")?,
        memslot_trampoline: in_slot("ihmi_hook_memslot")?,
        memslot_return: in_slot("ihmi_hook_memslot_gate_return")?,
        vcpu_create_trampoline: in_slot("ihmi_hook_vcpu_create")?,
        vcpu_create_return: in_slot("ihmi_hook_vcpu_create_gate_return")?,
        vcpu_destroy_trampoline: in_slot("ihmi_hook_vcpu_destroy")?,
        vcpu_destroy_return: in_slot("ihmi_hook_vcpu_destroy_gate_return")?,
        hook_table: pages.hook_table,
        call_vmcall: if outbox {
            Some(in_gate("ihmi_outbox_call_vmcall")?)
        } else {
            None
        },
    })
}

// The profile's exit-handler table fits the monitor's configuration as it is.
const _: () =
    assert!(ihmi_linux::profile::MAX_EXIT_HANDLERS == ihmi_abi::monitor::KVM_EXIT_HANDLERS_MAX);

/// Writes the monitor's configuration (what it watches, where guest RAM is, the allow-list);
/// returns where it is.
#[allow(clippy::too_many_arguments)]
fn write_config(
    mem: &mut MonitorMemory,
    image: &Image<'_>,
    place: &Placement,
    memory: &MemoryMap,
    os: &MonitorOs,
    allowed: &str,
    linux_gate: Option<&LinuxGateInfo>,
    mode: Mode,
) -> Result<GpaRange, LoadError> {
    let list = ihmi_layout::allow_list(allowed)?;
    let (ram, ram_count) = crate::guest::ram_ranges(memory);
    let mut config = MonitorConfig {
        magic: CONFIG_MAGIC,
        direct_map_base: DIRECT_MAP_BASE,
        ram,
        ram_count,
        current_process_ptr: os.current_ptr().raw(),
        allowed: list.names,
        allowed_count: list.name_count,
        os: OS_TESTGUEST,
        pid_offset: 0,
        parent_offset: 0,
        comm_offset: 0,
        pti_pgd_pair: 0,
        binprm_filename_offset: 0,
        exec_hook_return: 0,
        exec_site_return: 0,
        io_uring_hook_return: 0,
        io_uring_site_return: 0,
        io_kiocb_opcode_offset: 0,
        allowed_digests: list.digests,
        allowed_digest_count: list.digest_count,
        files: ihmi_abi::monitor::FileOffsets::default(),
        kvm: ihmi_abi::monitor::KvmOffsets::default(),
        linear: ihmi_abi::monitor::LinearMaps::default(),
    };
    if let MonitorOs::Linux(p, _) = os {
        // Linux programs are allowed by what they are, never by what they are called.
        if list.name_count > 0 {
            return Err(ihmi_layout::AllowError::NameNotIdentity.into());
        }
        let f = &p.files;
        config.files = ihmi_abi::monitor::FileOffsets {
            binprm_file: f.binprm_file.offset,
            file_mapping: f.file_mapping.offset,
            mapping_host: f.mapping_host.offset,
            mapping_pages: f.mapping_pages.offset + f.xa_head.offset,
            inode_ino: f.inode_ino.offset,
            inode_size: f.inode_size.offset,
            inode_ctime: f.inode_ctime.offset,
            inode_mtime: f.inode_mtime.offset,
            node_shift: f.node_shift.offset,
            node_slots: f.node_slots.offset,
            // The slots array is 8 bytes a slot, a power of two of them.
            chunk_shift: u64::from((f.node_slots.size / 8).trailing_zeros()),
            page_struct_size: f.page_size,
            vmemmap_base: f.vmemmap_base,
        };
        config.os = OS_LINUX;
        // In the box the monitor reads the kernel's linear mappings as native loads; out of it, as
        // a monitor outside the guest, it walks the guest's tables for every page.
        if mode == Mode::InBox {
            config.linear = ihmi_abi::monitor::LinearMaps {
                page_offset_base: p.page_offset_base,
                image: [p.text[0], p.kernel_end],
            };
        }
        config.pid_offset = p.tgid.offset;
        config.parent_offset = p.real_parent.offset;
        config.comm_offset = p.comm.offset;
        config.pti_pgd_pair = u64::from(p.pti_pgd_pair);
        config.binprm_filename_offset = p.binprm_filename.offset;
        if let Some(g) = linux_gate {
            // The hook's call at the hooked site is a 5-byte CALL: the function goes on past it.
            config.exec_hook_return = g.hook_return.raw();
            config.exec_site_return = p.exec_hook + 5;
            if let Some((site, opcode)) = p.io_uring {
                config.io_uring_hook_return = g.io_uring_return.raw();
                config.io_uring_site_return = site + 5;
                config.io_kiocb_opcode_offset = opcode.offset;
            }
            if let Some(k) = &p.kvm {
                let values = k.exit_handler_values();
                let kvm = &mut config.kvm;
                kvm.hook_return = g.kvm_exit_return.raw();
                kvm.site_return = k.handle_exit + 5;
                kvm.exit_reason_offset = k.exit_reason.offset;
                kvm.exit_handlers = k.exit_handlers;
                kvm.exit_handler_count = values.len() as u64;
                kvm.exit_handler_values[..values.len()].copy_from_slice(values);
                kvm.map_hook_return = g.l2_map_return.raw();
                kvm.map_site_return = k.make_spte + 5;
                kvm.slot_base_gfn_offset = k.slot_base_gfn.offset;
                kvm.slot_npages_offset = k.slot_npages.offset;
                kvm.slot_userspace_addr_offset = k.slot_userspace_addr.offset;
                kvm.mmu_page_role_offset = k.mmu_page_role.offset;
                if let Some(image) = os.image() {
                    kvm.image = image.map(|r| [r.start.raw(), r.end.raw()]);
                }
                kvm.memslot_hook_return = g.memslot_return.raw();
                kvm.memslot_site_return = k.commit_memory_region + 5;
                kvm.vcpu_hook_return = g.vcpu_create_return.raw();
                kvm.vcpu_site_return = k.vcpu_create + 5;
                kvm.vcpu_destroy_hook_return = g.vcpu_destroy_return.raw();
                kvm.vcpu_destroy_site_return = k.vcpu_destroy + 5;
                kvm.slot_id_offset = k.slot_id.offset;
                kvm.slot_as_id_offset = k.slot_as_id.offset;
                kvm.slot_flags_offset = k.slot_flags.offset;
                kvm.vcpu_kvm_offset = k.vcpu_kvm.offset;
                kvm.vcpu_id_offset = k.vcpu_id.offset;
                kvm.vcpu_vmcs01_offset = k.vcpu_vmcs01.offset;
                kvm.vcpu_loaded_vmcs_offset = k.vcpu_loaded_vmcs.offset;
                // Its words come when the boot is over (`Loaded::copy_kvm_ops`).
                kvm.x86_ops = k.x86_ops;
            }
        }
    }
    if list.name_count > 0 {
        log!("monitor: allow-list {allowed}");
    } else if list.digest_count > 0 {
        log!(
            "monitor: allow-list of {} program identities (SHA-256)",
            list.digest_count
        );
    } else {
        log!("monitor: no allow-list; every process creation is allowed");
    }
    let range = place.range(
        image.symbol("IHMI_MONITOR_CONFIG")?,
        core::mem::size_of::<MonitorConfig>() as u64,
    )?;
    let at = mem.bytes(range)?;
    // SAFETY: `at` is exactly size_of::<MonitorConfig>() bytes of monitor data; unaligned-safe.
    unsafe { core::ptr::write_unaligned(at.as_mut_ptr() as *mut MonitorConfig, config) };
    Ok(range)
}

/// One pass through a gate: its VMFUNCs and CR3 loads, counted in its own code. Both gates must
/// agree, since the benchmark reports one figure per invocation whichever gate made it.
fn gate_switches(
    mem: &MonitorMemory,
    image: &Image<'_>,
    place: &Placement,
    gate_end: u64,
) -> Result<(u64, u64), LoadError> {
    let switches_in = |start: &'static str, end: &'static str| {
        let (s, e) = (image.symbol(start)?, image.symbol(end)?);
        if e <= s || e > gate_end {
            return Err(image.outside(end));
        }
        Ok(ihmi_layout::count_switches(
            mem.bytes_ref(place.range(s, e - s)?)?,
        ))
    };
    let call_gate = switches_in("ihmi_gate_entry", "ihmi_gate_entry_end")?;
    for (start, end) in [
        ("ihmi_gate_syscall", "ihmi_gate_syscall_end"),
        ("ihmi_gate_sysenter", "ihmi_gate_sysenter_end"),
        ("ihmi_gate_int80", "ihmi_gate_int80_end"),
    ] {
        if switches_in(start, end)? != call_gate {
            return Err(image.outside(end));
        }
    }
    log!(
        "gate: {} VMFUNC and {} CR3 loads per pass (each gate)",
        call_gate.0,
        call_gate.1
    );
    Ok(call_gate)
}

/// Writes `value` into the immediate of the `movabs $imm64, %rax` at the image symbol `symbol`.
fn patch_movabs(
    mem: &mut MonitorMemory,
    place: &Placement,
    image: &Image<'_>,
    symbol: &'static str,
    value: u64,
) -> Result<(), LoadError> {
    let insn = mem.bytes(place.range(image.symbol(symbol)?, 10)?)?;
    ihmi_layout::patch_movabs(insn, value)?;
    Ok(())
}
