//! Booting an unmodified Linux kernel as the guest, with the 64-bit boot protocol (`ihmi-linux` holds
//! the protocol and the placement rules; this copies things into guest RAM). The kernel goes where it
//! asks (`pref_address`, or the lowest aligned free place for a relocatable kernel), the initrd as
//! high as the kernel allows, the zero page and the command line in low RAM, and the e820 map is the
//! firmware's with L0's and the monitor's frames marked reserved.

use core::fmt::Write;

use ihmi_addr::{Gpa, GpaRange, PAGE_SIZE};
use ihmi_hv::{MemoryMap, RegionKind};
use ihmi_linux::place::{self, FirmwareRange, Owner};
use ihmi_linux::profile::LinuxProfile;
use ihmi_linux::{BootParams, Kernel, BOOT_CS, BOOT_DS, E820_MAX};

use crate::boot_info::{BootInfo, Line};
use crate::error::LoadError;
use crate::guest::{self, GuestBoot, GuestRam};
use crate::log;
use crate::ranges::List;

/// The zero page and the command line, in low RAM next to the boot tables.
const ZERO_PAGE: Gpa = Gpa::new(0x2_2000);
const CMDLINE: Gpa = Gpa::new(0x2_3000);

/// A Linux guest, as far as L0 knows it before loading: the kernel (placed), its profile, its
/// command line and initramfs.
pub struct LinuxGuest {
    pub kernel: Kernel<'static>,
    pub profile: LinuxProfile,
    pub cmdline: Line,
    pub initrd: Option<&'static [u8]>,
}

impl LinuxGuest {
    /// The kernel of the `linux` module, placed once, before the monitor is carved out of guest RAM
    /// (which then avoids the kernel's span), with the profile of the `linux-profile` module.
    pub fn prepare(boot: &BootInfo, memory: &MemoryMap) -> Result<Self, LoadError> {
        let text = boot
            .modules
            .linux_profile
            .and_then(|b| core::str::from_utf8(b).ok())
            .ok_or(LoadError::MissingModule {
                name: "linux-profile",
                how: "the guest profile `ihmi` derives from System.map and BTF must be on the ISO",
            })?;
        let profile = LinuxProfile::parse(text).map_err(LoadError::Profile)?;
        log!(
            "linux: profile: current_task {:#x}, task_struct pid@{:#x} tgid@{:#x} comm@{:#x} real_parent@{:#x}, PTI PGD pairs {}",
            profile.current_task,
            profile.pid.offset,
            profile.tgid.offset,
            profile.comm.offset,
            profile.real_parent.offset,
            profile.pti_pgd_pair
        );
        let image = boot.modules.linux.ok_or(LoadError::MissingModule {
            name: "linux",
            how: "the ISO must load the kernel with `module2 /boot/bzImage linux <command line>`",
        })?;
        let mut kernel = Kernel::parse(image)?;
        if kernel
            .place(|at, span| memory.is_guest_ram(Gpa::new(at), span))
            .is_none()
        {
            return Err(LoadError::KernelPlacement {
                want: kernel.pref_address,
                span: kernel.span(),
                relocatable: kernel.relocatable,
            });
        }
        Ok(Self {
            kernel,
            profile,
            cmdline: boot.linux_cmdline,
            initrd: boot.modules.initrd,
        })
    }

    /// Where the kernel sits from its load address on, through its start-up area (`init_size`).
    pub fn span(&self) -> GpaRange {
        GpaRange::new(
            Gpa::new(self.kernel.load_address),
            Gpa::new(self.kernel.load_address + self.kernel.span()),
        )
    }

    /// The guest-physical address of a kernel-image symbol, which must be guest RAM.
    pub fn text_pa(&self, va: u64, memory: &MemoryMap) -> Result<Gpa, LoadError> {
        place::kernel_text_pa(va, self.kernel.phys_offset())
            .filter(|pa| memory.is_guest_ram(*pa, 8))
            .ok_or(LoadError::Linux(
                "a kernel symbol of the profile is not in the kernel image in guest RAM",
            ))
    }

    /// The guest-physical pages of the kernel-image span `[va[0], va[1])`, rounded out to whole pages,
    /// which must be guest RAM.
    pub fn image_pages(&self, va: [u64; 2], memory: &MemoryMap) -> Result<GpaRange, LoadError> {
        let start = self.text_pa(va[0], memory)?.align_down(PAGE_SIZE);
        let end = self
            .text_pa(va[1].saturating_sub(1), memory)?
            .align_down(PAGE_SIZE)
            .raw()
            + PAGE_SIZE;
        if va[1] <= va[0] || !memory.is_guest_ram(start, end - start.raw()) {
            return Err(LoadError::Linux(
                "a kernel section of the profile is empty or not in guest RAM",
            ));
        }
        Ok(GpaRange::new(start, Gpa::new(end)))
    }

    /// Loads the kernel, the initrd and the boot structures; returns how to start the guest.
    /// `monitor` is where the monitor is (said on the command line), `gate_pages` the gate's pages
    /// the kernel must see as RAM.
    pub fn load(
        &self,
        ram: &mut GuestRam<'_>,
        firmware: &[FirmwareRange],
        monitor: Option<Gpa>,
        gate_pages: Option<GpaRange>,
        page_1g: bool,
    ) -> Result<GuestBoot, LoadError> {
        let kernel = &self.kernel;
        let load_at = Gpa::new(kernel.load_address);
        ram.bytes(load_at, kernel.payload.len() as u64)?
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

        let mut params = BootParams::new(kernel);
        // With a monitor, the command line also says where it is: the attack scenario aims there, and
        // the threat model assumes an attacker can find it anyway (hiding it would be obscurity).
        let mut line = LineBuf {
            bytes: [0; 4096],
            len: 0,
        };
        let written = match monitor {
            Some(at) => write!(
                line,
                "{} ihmi.monitor={:#x}",
                self.cmdline.as_str(),
                at.raw()
            ),
            None => line.write_str(self.cmdline.as_str()),
        };
        written.map_err(|_| LoadError::CmdlineTooLong)?;
        let cmdline = &line.bytes[..line.len];
        params.set_cmdline(kernel, CMDLINE.raw(), cmdline.len())?;
        let dst = ram.bytes(CMDLINE, cmdline.len() as u64 + 1)?;
        dst[..cmdline.len()].copy_from_slice(cmdline);
        dst[cmdline.len()] = 0;
        log!(
            "linux: command line \"{}\"",
            core::str::from_utf8(cmdline).unwrap_or("?")
        );

        if let Some(initrd) = self.initrd {
            let rams = ram.map().of_kind(RegionKind::GuestRam);
            let at = place::initrd_place(
                rams,
                initrd.len() as u64,
                u64::from(kernel.initrd_addr_max),
                self.span(),
            )
            .ok_or(LoadError::Linux(
                "no room for the initrd in guest RAM below the kernel's initrd_addr_max; boot with more memory",
            ))?;
            ram.bytes(at, initrd.len() as u64)?.copy_from_slice(initrd);
            params.set_initrd(at.raw(), initrd.len() as u64);
            log!("linux: {} KiB initrd at {at}", initrd.len() >> 10);
        }

        // The gate's pages: RAM in the e820 map, claimed by a setup_data entry, so the kernel reserves
        // them and maps them in its direct map (its page-table walkers, e.g. the W^X check of kernels
        // built with CONFIG_DEBUG_WX, read every table the gate's PML4 slot leads to through it).
        if let Some(pages) = gate_pages {
            params.set_setup_data(pages.start.raw());
        }
        let owners = owners(ram.map())?;
        let (e820, n) = place::e820_map(firmware, owners.as_slice(), gate_pages)?;
        params.set_e820(&e820[..n.min(E820_MAX)])?;
        for e in &e820[..n] {
            log!(
                "linux: e820 {:#011x}-{:#011x} {:?}",
                e.addr,
                e.addr + e.size,
                e.kind
            );
        }
        ram.bytes(ZERO_PAGE, 4096)?
            .copy_from_slice(params.as_bytes());

        let cr3 = guest::identity_tables(ram, page_1g)?;
        // The 64-bit boot protocol's GDT: __BOOT_CS at 0x10, __BOOT_DS at 0x18.
        let gdt_limit = guest::write_gdt(ram, &[0, 0, guest::CODE64, guest::DATA])?;
        Ok(GuestBoot {
            mode: crate::guest::EntryMode::Long,
            entry: kernel.entry_64(),
            cr3,
            gdt: guest::BOOT_GDT,
            gdt_limit,
            stack_top: guest::boot_stack(),
            boot_info: ZERO_PAGE,
            code_selector: BOOT_CS,
            data_selector: BOOT_DS,
        })
    }
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

/// Who owns each region of `map`, as the guest's e820 map (or multiboot memory map) reports it.
pub fn owners(
    map: &ihmi_hv::MemoryMap,
) -> Result<List<(GpaRange, Owner), { ihmi_hv::memory::MAX_REGIONS }>, LoadError> {
    List::collect(map.regions().iter().map(|(r, kind)| {
        let owner = match kind {
            RegionKind::GuestRam => Owner::Guest,
            RegionKind::Monitor => Owner::Monitor,
            RegionKind::L0 | RegionKind::Mmio => Owner::Other,
        };
        (*r, owner)
    }))
    .map_err(|_| LoadError::Linux("more memory regions than the e820 map takes"))
}
