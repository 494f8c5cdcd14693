//! Boot stage 1: what the multiboot2 loader handed L0 (multiboot2 spec §3.6): the command line (the
//! scenario and the allow-list), the modules (the guests' images, the monitor, the Linux pieces) and
//! the firmware's memory map. Everything is copied or checked here, once.

use ihmi_abi::Scenario;
use ihmi_addr::{Gpa, GpaRange, Hpa, HpaRange};
use ihmi_linux::place::FirmwareRange;
use ihmi_linux::{E820Kind, E820_MAX};

use crate::error::{LoadError, Name};
use crate::ranges::List;

/// Multiboot2 boot-loader magic in EAX (multiboot2 spec §3.3).
const MULTIBOOT2_MAGIC: u32 = 0x36d7_6289;
/// Only the first 4 GiB are identity-mapped by the boot page tables.
pub const MAPPED_LIMIT: u64 = 4 * 1024 * 1024 * 1024;
/// Memory areas L0 takes from the map (more are left out: Bochs reports a handful).
pub const MAX_AREAS: usize = ihmi_hv::memory::MAX_INPUT_RANGES;
/// Ranges L0 keeps for itself: its image, the boot information, the modules (and later its pool).
pub const MAX_OWNED: usize = 12;
/// Longest command line kept (L0's own, and the Linux kernel's from its module line).
const LINE_MAX: usize = 1024;

/// A command line, copied out of the boot information.
#[derive(Clone, Copy)]
pub struct Line {
    bytes: [u8; LINE_MAX],
    len: usize,
}

impl Line {
    fn copy(s: &str) -> Self {
        let mut bytes = [0u8; LINE_MAX];
        let len = s.len().min(LINE_MAX);
        bytes[..len].copy_from_slice(&s.as_bytes()[..len]);
        Self { bytes, len }
    }

    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.bytes[..self.len]).unwrap_or("")
    }

    /// The value of `key=` on the line, if it is there.
    pub fn value(&self, key: &str) -> Option<&str> {
        self.as_str()
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key).and_then(|rest| rest.strip_prefix('=')))
    }
}

/// The modules GRUB loaded (each names itself on its module line).
#[derive(Clone, Copy, Default)]
pub struct Modules {
    pub testguest: Option<&'static [u8]>,
    pub monitor: Option<&'static [u8]>,
    pub initrd: Option<&'static [u8]>,
    pub linux_profile: Option<&'static [u8]>,
    /// The Linux kernel, whose module line is `linux` then the kernel's command line.
    pub linux: Option<&'static [u8]>,
    /// A multiboot kernel, whose module line is `kernel` then its command line.
    pub kernel: Option<&'static [u8]>,
    /// The multiboot kernel's modules, in order, each from a module line `kmodule` then the
    /// module's command line.
    pub kernel_modules: List<KernelModule, MAX_KERNEL_MODULES>,
}

impl Modules {
    /// Every module that starts at `old` now reads `moved` (L0 moved it: `multiboot::make_room`).
    pub fn relocate(&mut self, old: u64, moved: &'static [u8]) {
        let at = |m: &[u8]| m.as_ptr() as u64 == old;
        for slot in [
            &mut self.testguest,
            &mut self.monitor,
            &mut self.initrd,
            &mut self.linux_profile,
            &mut self.linux,
            &mut self.kernel,
        ] {
            if slot.is_some_and(at) {
                *slot = Some(moved);
            }
        }
        let mut modules = self.kernel_modules;
        for (i, m) in self.kernel_modules.as_slice().iter().enumerate() {
            if at(m.bytes) {
                modules.set(i, KernelModule { bytes: moved, ..*m });
            }
        }
        self.kernel_modules = modules;
    }
}

/// Most modules L0 hands a multiboot kernel.
pub const MAX_KERNEL_MODULES: usize = 4;

/// A module for the multiboot kernel, as GRUB loaded it (L0 copies it into guest RAM).
#[derive(Clone, Copy)]
pub struct KernelModule {
    pub bytes: &'static [u8],
    pub cmdline: Line,
    /// The digest of the bytes as GRUB loaded them (`ihmi_abi::multiboot::Handed::contents`),
    /// taken before L0 moves or copies them: what the multiboot kernel must find.
    pub digest: u64,
}

impl Default for KernelModule {
    fn default() -> Self {
        Self {
            bytes: &[],
            cmdline: Line::copy(""),
            digest: 0,
        }
    }
}

/// What the boot loader gave L0.
pub struct BootInfo {
    pub scenario: Scenario,
    /// L0's command line (`scenario=`, `allow=`).
    pub cmdline: Line,
    pub modules: Modules,
    /// The Linux kernel's command line, from its module line.
    pub linux_cmdline: Line,
    /// The multiboot kernel's command line, from its module line.
    pub kernel_cmdline: Line,
    /// Modules L0 moved out of the multiboot kernel's way (`multiboot::make_room`).
    pub modules_moved: u32,
    /// RAM the firmware reports free, below [`MAPPED_LIMIT`].
    pub available: List<HpaRange, MAX_AREAS>,
    /// The firmware's whole map below [`MAPPED_LIMIT`], as the guest sees it (1:1).
    pub firmware: List<FirmwareRange, E820_MAX>,
    /// What L0 owns so far: its image, the boot information, the modules.
    pub owned: List<HpaRange, MAX_OWNED>,
}

extern "C" {
    static __l0_start: u8;
    static __l0_end: u8;
}

/// Reads the boot information at `info` that a loader which put `magic` in EAX passed.
pub fn read(magic: u32, info: u32) -> Result<BootInfo, LoadError> {
    if magic != MULTIBOOT2_MAGIC {
        return Err(LoadError::NotMultiboot { magic });
    }
    // SAFETY: a multiboot2 loader passed `info` (magic checked above); it points at a valid boot
    // information structure in memory that nothing has reused yet (L0 keeps it in `owned`).
    let mbi = unsafe {
        multiboot2::BootInformation::load(info as usize as *const multiboot2::BootInformationHeader)
    }
    .map_err(|_| LoadError::BootInformation { at: info })?;
    let cmdline = Line::copy(
        mbi.command_line_tag()
            .and_then(|t| t.cmdline().ok())
            .unwrap_or(""),
    );
    let name = cmdline.value("scenario").unwrap_or("testguest-demo");
    let scenario =
        Scenario::from_name(name).ok_or_else(|| LoadError::UnknownScenario(Name::copy(name)))?;

    let mmap = mbi.memory_map_tag().ok_or(LoadError::NoMemoryMap)?;
    let mut available = List::new();
    let mut firmware = List::new();
    for area in mmap.memory_areas() {
        let start = area.start_address();
        let end = area.end_address().min(MAPPED_LIMIT);
        if start >= end {
            continue;
        }
        let kind = match area.typ() {
            multiboot2::MemoryAreaType::Available => E820Kind::Ram,
            multiboot2::MemoryAreaType::AcpiAvailable => E820Kind::Acpi,
            multiboot2::MemoryAreaType::ReservedHibernate => E820Kind::Nvs,
            multiboot2::MemoryAreaType::Defective => E820Kind::Unusable,
            _ => E820Kind::Reserved,
        };
        // More areas than the lists hold are left out: what is not listed is never RAM for anyone.
        let _ = firmware.push(FirmwareRange {
            range: GpaRange::new(Gpa::new(start), Gpa::new(end)),
            kind,
        });
        if kind == E820Kind::Ram {
            let _ = available.push(HpaRange::new(Hpa::new(start), Hpa::new(end)));
        }
    }

    let too_many = || LoadError::TooManyModules { max: MAX_OWNED - 3 };
    let mut owned = List::new();
    owned
        .push(HpaRange::new(
            Hpa::new(core::ptr::addr_of!(__l0_start) as u64),
            Hpa::new(core::ptr::addr_of!(__l0_end) as u64),
        ))
        .map_err(|_| too_many())?;
    owned
        .push(HpaRange::new(
            Hpa::new(mbi.start_address() as u64),
            Hpa::new(mbi.end_address() as u64),
        ))
        .map_err(|_| too_many())?;
    let mut modules = Modules::default();
    let mut linux_cmdline = Line::copy("");
    let mut kernel_cmdline = Line::copy("");
    for module in mbi.module_tags() {
        let range = HpaRange::new(
            Hpa::new(u64::from(module.start_address())),
            Hpa::new(u64::from(module.end_address())),
        );
        // One slot stays free for the frame pool. A module L0 could not record would become guest RAM.
        if owned.as_slice().len() >= MAX_OWNED - 1 {
            return Err(too_many());
        }
        owned.push(range).map_err(|_| too_many())?;
        // SAFETY: GRUB loaded the module at [start, end) in RAM; L0 owns that range (it is in `owned`,
        // so never mapped for the guest) and never writes it.
        let bytes: &'static [u8] = unsafe {
            core::slice::from_raw_parts(range.start.raw() as *const u8, range.len() as usize)
        };
        match module.cmdline().ok() {
            Some("testguest") => modules.testguest = Some(bytes),
            Some("monitor") => modules.monitor = Some(bytes),
            Some("initrd") => modules.initrd = Some(bytes),
            Some("linux-profile") => modules.linux_profile = Some(bytes),
            // `linux` then the kernel's command line.
            Some(c) if c == "linux" || c.starts_with("linux ") => {
                modules.linux = Some(bytes);
                linux_cmdline = Line::copy(c.strip_prefix("linux").unwrap_or("").trim());
            }
            Some(c) if c == "kernel" || c.starts_with("kernel ") => {
                modules.kernel = Some(bytes);
                kernel_cmdline = Line::copy(c.strip_prefix("kernel").unwrap_or("").trim());
            }
            Some(c) if c == "kmodule" || c.starts_with("kmodule ") => {
                let cmdline = Line::copy(c.strip_prefix("kmodule").unwrap_or("").trim());
                let digest = ihmi_abi::multiboot::Handed::contents(bytes);
                modules
                    .kernel_modules
                    .push(KernelModule {
                        bytes,
                        cmdline,
                        digest,
                    })
                    .map_err(|_| LoadError::TooManyModules {
                        max: MAX_KERNEL_MODULES,
                    })?;
            }
            _ => {}
        }
    }
    Ok(BootInfo {
        scenario,
        cmdline,
        modules,
        linux_cmdline,
        kernel_cmdline,
        modules_moved: 0,
        available,
        firmware,
        owned,
    })
}
