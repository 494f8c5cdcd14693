//! A multiboot kernel as the guest (multiboot spec 0.6.96, multiboot2 spec 2.0): L0 is its loader.
//! The kernel's header and load plan, and the boot information, are `ihmi-multiboot`'s; here they
//! meet guest RAM. The kernel's segments go to their physical addresses (guest RAM is 1:1), its
//! modules page-aligned after it, the boot information in low RAM, the memory map is the firmware's
//! with what L0 owns reserved, and the kernel starts in 32-bit protected mode with paging off and
//! the loader's magic in EAX, the boot information's address in EBX.

use ihmi_abi::multiboot::Handed;
use ihmi_addr::{Gpa, GpaRange, Hpa, HpaRange, PAGE_SIZE};
use ihmi_hv::memory::RoomError;
use ihmi_hv::MemoryMap;
use ihmi_linux::place::{self, FirmwareRange};
use ihmi_linux::E820_MAX;
use ihmi_multiboot::info::{self, MemoryRange, Module};
use ihmi_multiboot::{KernelImage, Protocol};

use crate::boot_info::{BootInfo, Line, MAX_KERNEL_MODULES};
use crate::error::LoadError;
use crate::guest::{self, EntryMode, GuestBoot, GuestRam, CODE32, DATA};
use crate::log;
use crate::ranges::List;

/// The name L0 gives itself in the boot information.
const LOADER_NAME: &str = "ihmi L0";
/// Where the boot information goes, and the most it may take: low RAM every PC has, which no
/// multiboot kernel may be loaded into (below 1 MiB).
const INFO_AT: Gpa = Gpa::new(0x2_1000);
const INFO_MAX: u64 = 0x4_0000 - 0x2_1000;
/// A multiboot kernel is loaded at or above 1 MiB (both specifications' loaders refuse lower).
const LOWEST_LOAD: u64 = 0x10_0000;

/// The protocol the kernel is booted by: the scenario's, else `multiboot=1|2` on L0's command line,
/// else `None` (its multiboot2 header if it has one, else its multiboot one).
pub fn protocol(boot: &BootInfo) -> Result<Option<Protocol>, LoadError> {
    let version = match boot.scenario.multiboot() {
        Some(v) => Some(v),
        None => match boot.cmdline.value("multiboot") {
            Some("1") => Some(1),
            Some("2") => Some(2),
            Some(_) => return Err(LoadError::MultibootProtocol),
            None => None,
        },
    };
    Ok(version.map(|v| if v == 1 { Protocol::V1 } else { Protocol::V2 }))
}

/// Boot stage 1½, for a multiboot kernel: GRUB loaded the modules (the kernel's file among them)
/// wherever it liked, often right where the kernel is linked to load (kvm-unit-tests' tests load
/// at 4 MiB and span 12 MiB of BSS). Each module in the way of the kernel or of the modules' copies
/// after it is moved to free RAM high up, and the boot information's copy is let go (everything in
/// it was copied out already). Returns that span, which the frame pool must avoid as well. L0's own image in the way is an
/// error: guest RAM is 1:1, and L0 cannot move.
pub fn make_room(boot: &mut BootInfo) -> Result<HpaRange, LoadError> {
    let image = boot.modules.kernel.ok_or(LoadError::MissingModule {
        name: "kernel",
        how: "the ISO must load the multiboot kernel with `module2 FILE kernel <command line>`",
    })?;
    let plan = KernelImage::parse(image, protocol(boot)?).map_err(LoadError::Multiboot)?;
    let (low, high) = plan.span();
    // The kernel, then its modules page-aligned after it (where `MultibootGuest::load` puts them).
    let modules: u64 = boot
        .modules
        .kernel_modules
        .as_slice()
        .iter()
        .map(|m| (m.bytes.len() as u64).div_ceil(PAGE_SIZE) * PAGE_SIZE)
        .sum();
    let end = Hpa::new(high)
        .align_up(PAGE_SIZE)
        .and_then(|e| e.raw().checked_add(modules))
        .ok_or(LoadError::MultibootPlacement {
            start: low,
            end: high,
            owner: None,
        })?;
    let span = HpaRange::new(Hpa::new(low).align_down(PAGE_SIZE), Hpa::new(end));
    // The boot information (index 1) was read and copied already: it may simply go.
    if boot
        .owned
        .as_slice()
        .get(1)
        .is_some_and(|r| r.overlaps(&span))
    {
        boot.owned.remove(1);
        log!("multiboot: the kernel loads over GRUB's boot information; L0 has read it");
    }
    let owned = boot.owned;
    let in_the_way = |i: usize| {
        let r = owned.as_slice()[i];
        LoadError::MultibootPlacement {
            start: low,
            end: high,
            owner: Some(GpaRange::new(
                Gpa::new(r.start.raw()),
                Gpa::new(r.end.raw()),
            )),
        }
    };
    // L0's image (index 0) cannot move.
    let moves = ihmi_hv::memory::make_room::<Hpa, { crate::boot_info::MAX_OWNED }>(
        boot.available.as_slice(),
        owned.as_slice(),
        span,
        PAGE_SIZE,
        &[0],
    )
    .map_err(|e| match e {
        RoomError::Fixed(i) | RoomError::NoRoom(i) => in_the_way(i),
        RoomError::TooMany => LoadError::TooManyModules {
            max: crate::boot_info::MAX_OWNED - 3,
        },
    })?;
    for (i, to) in moves.iter().enumerate() {
        let (Some(to), Some(r)) = (to, owned.as_slice().get(i)) else {
            continue;
        };
        let len = r.len() as usize;
        let (from, dst) = (r.start.raw() as *const u8, to.start.raw() as *mut u8);
        // SAFETY: `r` is a module GRUB loaded, L0's (in `owned`), read only through the slices in
        // `boot.modules`, which `relocate` replaces below; `to` is free RAM below 4 GiB (available,
        // clear of everything owned, of the span and of the other moves; identity-mapped), so the
        // two do not overlap and nothing else refers to `to`.
        unsafe { core::ptr::copy_nonoverlapping(from, dst, len) };
        // SAFETY: `to` now holds the module's `len` bytes, L0's from here on (in `owned`), never
        // written again.
        let moved: &'static [u8] = unsafe { core::slice::from_raw_parts(dst.cast_const(), len) };
        boot.modules.relocate(r.start.raw(), moved);
        boot.modules_moved += 1;
        boot.owned.set(i, *to);
        log!(
            "multiboot: module {:#x}..{:#x} moved to {:#x} (the kernel loads there)",
            r.start.raw(),
            r.end.raw(),
            to.start.raw()
        );
    }
    Ok(span)
}

/// The kernel, its load plan, and what it is handed.
pub struct MultibootGuest {
    pub plan: KernelImage<'static>,
    protocol: Protocol,
    cmdline: Line,
    modules: List<crate::boot_info::KernelModule, MAX_KERNEL_MODULES>,
}

impl MultibootGuest {
    /// The `kernel` module as a multiboot kernel booted by `protocol` (`None`: by its multiboot2
    /// header if it has one, else its multiboot one), checked to load into guest RAM.
    pub fn prepare(
        boot: &BootInfo,
        memory: &MemoryMap,
        protocol: Option<Protocol>,
    ) -> Result<Self, LoadError> {
        let image = boot.modules.kernel.ok_or(LoadError::MissingModule {
            name: "kernel",
            how: "the ISO must load the multiboot kernel with `module2 FILE kernel <command line>`",
        })?;
        let plan = KernelImage::parse(image, protocol).map_err(LoadError::Multiboot)?;
        let protocol = plan.header.protocol;
        let (low, high) = plan.span();
        log!(
            "multiboot: {protocol} kernel at {low:#x}..{high:#x}, entry {:#x}, {} segments",
            plan.entry,
            plan.segments().len()
        );
        if low < LOWEST_LOAD || !memory.is_guest_ram(Gpa::new(low), high - low) {
            return Err(LoadError::MultibootPlacement {
                start: low,
                end: high,
                owner: memory.regions().iter().find_map(|(r, kind)| {
                    (r.start.raw() < high
                        && low < r.end.raw()
                        && *kind != ihmi_hv::RegionKind::GuestRam)
                        .then_some(*r)
                }),
            });
        }
        Ok(Self {
            plan,
            protocol,
            cmdline: boot.kernel_cmdline,
            modules: boot.modules.kernel_modules,
        })
    }

    /// What the kernel loads into, rounded out to whole pages.
    pub fn span(&self) -> GpaRange {
        let (low, high) = self.plan.span();
        GpaRange::new(
            Gpa::new(low).align_down(PAGE_SIZE),
            Gpa::new(high).align_up(PAGE_SIZE).unwrap_or(Gpa::new(high)),
        )
    }

    /// Loads the kernel and its modules into guest RAM and writes the boot information. Returns how
    /// the kernel starts, and the digest of what it was handed ([`Handed`]), computed here from
    /// L0's own inputs (the modules as GRUB loaded them), for the judge to compare with the kernel's.
    pub fn load(
        &self,
        ram: &mut GuestRam<'_>,
        firmware: &[FirmwareRange],
    ) -> Result<(GuestBoot, u64), LoadError> {
        for s in self.plan.segments() {
            let dst = ram.bytes(Gpa::new(u64::from(s.paddr)), u64::from(s.mem_size))?;
            let (file, zero) = dst.split_at_mut(s.file.len());
            file.copy_from_slice(s.file);
            zero.fill(0);
        }
        // The modules, each page-aligned (whether the header asks or not), after the kernel.
        let mut at = self.span().end;
        let mut placed = [Module {
            start: 0,
            end: 0,
            cmdline: "",
        }; MAX_KERNEL_MODULES];
        let modules = self.modules.as_slice();
        for (m, slot) in modules.iter().zip(placed.iter_mut()) {
            let len = m.bytes.len() as u64;
            ram.bytes(at, len)?.copy_from_slice(m.bytes);
            let end = at.raw() + len;
            let (Ok(start), Ok(end32)) = (u32::try_from(at.raw()), u32::try_from(end)) else {
                return Err(LoadError::NotGuestRam { gpa: at.raw(), len });
            };
            *slot = Module {
                start,
                end: end32,
                cmdline: m.cmdline.as_str(),
            };
            log!(
                "multiboot: module {:#x}..{end:#x} '{}'",
                at.raw(),
                m.cmdline.as_str()
            );
            at = Gpa::new(end)
                .align_up(PAGE_SIZE)
                .ok_or(LoadError::NotGuestRam { gpa: end, len: 0 })?;
        }
        let placed = &placed[..modules.len()];

        // The memory map: the firmware's, with what is not the guest's RAM reserved.
        let owners = crate::linux::owners(ram.map())?;
        let (e820, n) = place::e820_map(firmware, owners.as_slice(), None)?;
        let mut memory = [MemoryRange::default(); E820_MAX];
        for (dst, e) in memory.iter_mut().zip(&e820[..n]) {
            *dst = MemoryRange {
                base: e.addr,
                len: e.size,
                kind: e.kind as u32,
            };
        }
        let memory = &memory[..n.min(E820_MAX)];
        let info = info::BootInfo {
            cmdline: self.cmdline.as_str(),
            loader_name: LOADER_NAME,
            modules: placed,
            memory,
        };
        let buf = ram.bytes(INFO_AT, INFO_MAX)?;
        let len = info
            .write(self.protocol, buf, INFO_AT.raw() as u32)
            .map_err(LoadError::Multiboot)?;
        log!(
            "multiboot: {len} bytes of {} boot information at {INFO_AT}, {} memory ranges, lower {} KiB, upper {} KiB",
            self.protocol,
            memory.len(),
            info.mem_lower_kib(),
            info.mem_upper_kib()
        );

        let protocol = match self.protocol {
            Protocol::V1 => 1,
            Protocol::V2 => 2,
        };
        let mut handed = Handed::new(
            protocol,
            self.cmdline.as_str().as_bytes(),
            LOADER_NAME.as_bytes(),
        );
        // Each module by its digest from GRUB's copy, not from the copies L0 made since: a move or
        // a copy that changed a byte shows.
        for m in modules {
            handed.module_digest(
                m.bytes.len() as u64,
                m.digest,
                m.cmdline.as_str().as_bytes(),
            );
        }
        let ram_bytes = memory
            .iter()
            .filter(|r| r.kind == info::MEMORY_AVAILABLE)
            .map(|r| r.len)
            .sum();
        let digest = handed.memory(
            info.mem_lower_kib(),
            info.mem_upper_kib(),
            ram_bytes,
            memory.len() as u64,
        );
        log!("multiboot: handed digest={digest:016x} ram={ram_bytes}");

        // A GDT with a flat 32-bit code segment, which the kernel may use until it loads its own
        // (the specifications leave GDTR undefined).
        let gdt_limit = guest::write_gdt(ram, &[0, CODE32, DATA])?;
        Ok((
            GuestBoot {
                mode: EntryMode::Protected {
                    eax: self.protocol.loader_magic(),
                    ebx: INFO_AT.raw() as u32,
                },
                entry: u64::from(self.plan.entry),
                cr3: Gpa::new(0),
                gdt: guest::BOOT_GDT,
                gdt_limit,
                stack_top: Gpa::new(0),
                boot_info: INFO_AT,
                code_selector: 0x08,
                data_selector: 0x10,
            },
            digest,
        ))
    }
}
