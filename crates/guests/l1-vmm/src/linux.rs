//! `--linux`: a Linux L2, booted by the 64-bit boot protocol (Documentation/x86/boot.rst) from a
//! bzImage and an initramfs, with KVM's in-kernel PIC, I/O APIC, local APIC and PIT, and one 16550
//! UART at COM1 whose lines go to L1's console with a prefix. L2's /init ends the run the way it
//! ends one under L0: a line on the debug port, then "Shutdown" on the power-off port.

use std::fs::File;
use std::io::{self, Write};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use ihmi_linux_workload::{DEBUG_PORT, SHUTDOWN_PORT};
use kvm_bindings::{
    kvm_msr_entry, kvm_pit_config, kvm_regs, kvm_userspace_memory_region, Msrs,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{bzimage::BzImage, load_cmdline, Cmdline, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::{vcpu, Console};

/// Seconds between status lines when the command line does not say.
pub const DEFAULT_STATUS_SECS: u64 = 10;
/// L2's memory when the command line does not say.
pub const DEFAULT_MEM_MIB: u64 = 64;
/// Enough for the tiny kernel (decompressed at 16 MiB) and an initramfs above it; the page tables
/// map 1 GiB.
pub const MEM_MIB: core::ops::RangeInclusive<u64> = 32..=1024;

// The guest-physical layout below 1 MiB: GDT, zero page, page tables, command line.
const GDT_ADDR: u64 = 0x500;
const ZERO_PAGE: u64 = 0x7000;
const PML4: u64 = 0x9000;
const CMDLINE: u64 = 0x2_0000;
/// Where conventional memory ends (the EBDA and the legacy holes above it are not RAM).
const EBDA: u64 = 0x9_fc00;
/// Where the protected-mode kernel goes and the second RAM range starts.
const HIGH_MEM: u64 = 0x10_0000;
const _: () = assert!(PML4 + 0x3000 <= CMDLINE && CMDLINE + 0x1_0000 <= EBDA);

/// xloadflags: the kernel has the 64-bit entry.
const XLF_KERNEL_64: u16 = 1 << 0;
/// The 64-bit entry's offset in the protected-mode kernel (boot.rst, "64-bit BOOT PROTOCOL").
const ENTRY_64: u64 = 0x200;
/// COM1's ports and IRQ (the PC's, which `console=ttyS0` names).
const COM1: u16 = 0x3f8;
const COM1_IRQ: u32 = 4;
/// The i8042's command port and its pulse-reset command (`reboot=k`, L2's panic path).
const I8042_COMMAND: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;
/// boot_params: a loader that has no ID of its own (boot.rst, `type_of_loader`).
const LOADER_OTHER: u8 = 0xff;
const E820_RAM: u32 = 1;
const IA32_MTRR_DEF_TYPE: u32 = 0x2ff;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_TYPE_WB: u64 = 6;
// The local APIC's LINT0 and LINT1 entries and their delivery modes (SDM 11.5.1): the PIC's
// interrupts come in as ExtINT on LINT0, as on a PC in virtual-wire mode; LINT1 is NMI.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0b111;
const APIC_MODE_NMI: u32 = 0b100;
/// A relayed line longer than this is cut (L2's kernel prints none this long).
const LINE_MAX: usize = 512;

/// What to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Boot {
    pub kernel: String,
    pub initrd: String,
    /// L2's kernel command line; what follows a `--` are its /init's arguments.
    pub cmdline: String,
    pub mem_mib: u64,
    /// Seconds of L1's time between two lines saying where L2 is.
    pub status_secs: u64,
}

/// How the run went, from what L2 did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinuxReport {
    /// Lines L2 wrote to its UART.
    pub console_lines: u64,
    /// Lines L2 wrote to the debug port (its /init's).
    pub debug_lines: u64,
    /// Port accesses to no device here (reads get all ones, writes are dropped).
    pub other_io: u64,
    /// MMIO accesses outside L2's RAM (the same).
    pub mmio: u64,
    /// KVM_RUN ioctls that returned with an exit (a status tick's EINTR is not one).
    pub kvm_runs: u64,
    /// L1's time from the first KVM_RUN to the power-off, in milliseconds.
    pub millis: u128,
}

/// The interrupt line of the UART: an eventfd KVM's irqfd turns into IRQ 4.
struct Irq(EventFd);

impl Trigger for Irq {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Bytes from L2 cut into lines, each written to L1's console after a prefix.
struct Relay<'a> {
    console: &'a Console,
    prefix: &'static str,
    line: Vec<u8>,
    lines: u64,
}

impl<'a> Relay<'a> {
    fn new(console: &'a Console, prefix: &'static str) -> Self {
        Self {
            console,
            prefix,
            line: Vec::new(),
            lines: 0,
        }
    }

    fn byte(&mut self, b: u8) {
        match b {
            b'\n' => self.flush(),
            b'\r' => {}
            _ => {
                self.line.push(b);
                if self.line.len() == LINE_MAX {
                    self.flush();
                }
            }
        }
    }

    fn flush(&mut self) {
        let text = self.line.escape_ascii().to_string();
        self.console.line(self.prefix, &text);
        self.line.clear();
        self.lines += 1;
    }

    /// The last line, if L2 did not end it.
    fn finish(&mut self) {
        if !self.line.is_empty() {
            self.flush();
        }
    }
}

impl Write for Relay<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        buf.iter().for_each(|&b| self.byte(b));
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Boots `boot` and runs L2 until its /init powers it off.
pub fn run(boot: &Boot, console: &Console) -> Result<LinuxReport> {
    ensure!(
        MEM_MIB.contains(&boot.mem_mib),
        "L2 memory {} MiB is outside {MEM_MIB:?}",
        boot.mem_mib
    );
    let size = boot.mem_mib << 20;
    let mem: GuestMemoryMmap<()> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)])
            .context("mapping L2's memory")?;
    load(boot, &mem, size)?;

    let kvm = Kvm::new().context("cannot open /dev/kvm (is KVM built in and are we root?)")?;
    let vm = kvm.create_vm().context("KVM_CREATE_VM")?;
    vm.set_tss_address(vcpu::TSS_ADDR)
        .context("KVM_SET_TSS_ADDR")?;
    vm.create_irq_chip().context("KVM_CREATE_IRQCHIP")?;
    // The PIT Linux calibrates its clocks against; port 0x61's speaker bits answered in the kernel.
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).context("KVM_CREATE_PIT2")?;
    let host = mem
        .get_host_address(GuestAddress(0))
        .context("L2 memory's host address")?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: size,
        userspace_addr: host as u64,
    };
    // SAFETY: the region is `mem`'s one mapping, which outlives `vm` (declared before it).
    unsafe { vm.set_user_memory_region(region) }.context("KVM_SET_USER_MEMORY_REGION")?;
    let irq = EventFd::new(libc::EFD_NONBLOCK).context("eventfd for COM1's IRQ")?;
    vm.register_irqfd(&irq, COM1_IRQ)
        .context("KVM_IRQFD for COM1")?;

    let mut cpu = vm.create_vcpu(0).context("KVM_CREATE_VCPU")?;
    vcpu::set_cpuid(&kvm, &cpu)?;
    set_lint(&cpu)?;
    set_msrs(&cpu)?;
    let gdt_limit = (vcpu::GDT.len() * 8 - 1) as u16;
    vcpu::set_long_mode(&cpu, PML4, Some((GDT_ADDR, gdt_limit)))?;
    let regs = kvm_regs {
        rip: HIGH_MEM + ENTRY_64, // `load` checked the kernel is at HIGH_MEM
        rsi: ZERO_PAGE,
        rflags: 2,
        ..Default::default()
    };
    cpu.set_regs(&regs).context("KVM_SET_REGS")?;

    let mut serial = Serial::new(
        Irq(irq),
        Relay::new(console, ihmi_abi::NESTED_LINUX_CONSOLE),
    );
    let mut debug = Relay::new(console, ihmi_abi::NESTED_L2_DEBUG);
    let report = run_to_power_off(&mut cpu, &mut serial, &mut debug, boot.status_secs);
    serial.writer_mut().finish();
    debug.finish();
    report
}

/// Puts the kernel, initramfs, command line, zero page, GDT and page tables in L2's memory.
fn load(boot: &Boot, mem: &GuestMemoryMmap<()>, size: u64) -> Result<()> {
    let mut kernel =
        File::open(&boot.kernel).with_context(|| format!("cannot open {}", boot.kernel))?;
    let loaded = BzImage::load(mem, None, &mut kernel, Some(GuestAddress(HIGH_MEM)))
        .with_context(|| format!("{} is not a bzImage this can load", boot.kernel))?;
    ensure!(
        loaded.kernel_load.0 == HIGH_MEM,
        "{} wants loading at {:#x}, not at 1 MiB",
        boot.kernel,
        loaded.kernel_load.0
    );
    let mut hdr = loaded
        .setup_header
        .context("the bzImage has no setup header")?;
    // boot.rst: protocol 2.12 added xloadflags, whose XLF_KERNEL_64 says the 64-bit entry at
    // 0x200 is there.
    let (version, xloadflags) = (hdr.version, hdr.xloadflags);
    ensure!(
        version >= 0x20c && xloadflags & XLF_KERNEL_64 != 0,
        "{} has no 64-bit entry (boot protocol {version:#x}, xloadflags {xloadflags:#x})",
        boot.kernel,
    );

    let initrd =
        std::fs::read(&boot.initrd).with_context(|| format!("cannot read {}", boot.initrd))?;
    // The kernel decompresses itself at its preferred address, up to init_size from there; the
    // initramfs goes at the top of memory, below the highest address the kernel takes one at.
    let (pref, init_size, initrd_max) = (hdr.pref_address, hdr.init_size, hdr.initrd_addr_max);
    let kernel_top = (pref + u64::from(init_size)).max(loaded.kernel_end);
    let top = size.min(u64::from(initrd_max) + 1);
    let initrd_addr = top
        .checked_sub(initrd.len() as u64)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= kernel_top)
        .with_context(|| {
            format!(
                "{} MiB is too little for the kernel (up to {kernel_top:#x}) and a {}-byte initramfs",
                boot.mem_mib,
                initrd.len()
            )
        })?;
    mem.write_slice(&initrd, GuestAddress(initrd_addr))
        .context("writing the initramfs")?;

    let cmdline_size = hdr.cmdline_size as usize;
    let mut cmdline = Cmdline::new(cmdline_size + 1).context("command line buffer")?;
    cmdline.insert_str(&boot.cmdline).map_err(|e| {
        anyhow::anyhow!("L2's command line: {e} (this kernel takes {cmdline_size} bytes)")
    })?;
    load_cmdline(mem, GuestAddress(CMDLINE), &cmdline).context("writing the command line")?;

    hdr.type_of_loader = LOADER_OTHER;
    hdr.cmd_line_ptr = CMDLINE as u32;
    hdr.ramdisk_image = initrd_addr as u32;
    hdr.ramdisk_size = initrd.len() as u32;
    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    for (i, (addr, size)) in [(0, EBDA), (HIGH_MEM, size - HIGH_MEM)]
        .into_iter()
        .enumerate()
    {
        params.e820_table[i] = boot_e820_entry {
            addr,
            size,
            r#type: E820_RAM,
        };
        params.e820_entries = i as u8 + 1;
    }
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE)),
        mem,
    )
    .context("writing the zero page")?;

    for (i, descriptor) in vcpu::GDT.iter().enumerate() {
        mem.write_obj(*descriptor, GuestAddress(GDT_ADDR + 8 * i as u64))
            .context("writing the GDT")?;
    }
    let mut tables = vec![0u8; PML4 as usize + 0x3000];
    vcpu::identity_map(&mut tables, PML4, size.div_ceil(2 << 20));
    mem.write_slice(&tables[PML4 as usize..], GuestAddress(PML4))
        .context("writing the page tables")?;
    Ok(())
}

/// LINT0 takes the PIC's interrupts (ExtINT) and LINT1 NMIs, as firmware leaves a PC's BSP.
fn set_lint(cpu: &VcpuFd) -> Result<()> {
    let mut lapic = cpu.get_lapic().context("KVM_GET_LAPIC")?;
    for (offset, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let reg = &mut lapic.regs[offset..offset + 4];
        let bytes: [u8; 4] = core::array::from_fn(|i| reg[i] as u8);
        let value = (u32::from_le_bytes(bytes) & !0x700) | mode << 8;
        for (r, b) in reg.iter_mut().zip(value.to_le_bytes()) {
            *r = b as _;
        }
    }
    cpu.set_lapic(&lapic).context("KVM_SET_LAPIC")
}

/// The MSRs firmware leaves set: MTRRs on with write-back as the default type (SDM 12.11.2.1;
/// with IA32_MTRR_DEF_TYPE.E clear all memory is uncacheable, which a hypervisor that honours
/// guest MTRRs makes slow).
fn set_msrs(cpu: &VcpuFd) -> Result<()> {
    let entries = [kvm_msr_entry {
        index: IA32_MTRR_DEF_TYPE,
        data: MTRR_ENABLE | MTRR_TYPE_WB,
        ..Default::default()
    }];
    let msrs = Msrs::from_entries(&entries).context("MSR list")?;
    let set = cpu.set_msrs(&msrs).context("KVM_SET_MSRS")?;
    ensure!(
        set == entries.len(),
        "KVM took {set} of {} MSRs",
        entries.len()
    );
    Ok(())
}

/// The run loop: COM1 to the UART, the debug port to its relay, the power-off port ends it; other
/// ports and MMIO read as all ones and drop writes. A reset, a triple fault or any other exit is
/// an error.
fn run_to_power_off(
    cpu: &mut VcpuFd,
    serial: &mut Serial<Irq, vm_superio::serial::NoEvents, Relay<'_>>,
    debug: &mut Relay<'_>,
    status_secs: u64,
) -> Result<LinuxReport> {
    let start = Instant::now();
    let (mut kvm_runs, mut other_io, mut mmio) = (0u64, 0u64, 0u64);
    let mut shutdown = Vec::new();
    status_ticks(status_secs)?;
    loop {
        let exit = match cpu.run() {
            Ok(exit) => exit,
            // The status tick: where L2 is, then on.
            Err(e) if e.errno() == libc::EINTR => {
                debug.console.line(
                    ihmi_abi::NESTED_L1_VMM,
                    &format!(
                        "L2 after {} s: {}, {kvm_runs} KVM_RUN returns, {} console lines",
                        start.elapsed().as_secs(),
                        status(cpu),
                        serial.writer().lines
                    ),
                );
                continue;
            }
            Err(e) => return Err(e).context("KVM_RUN"),
        };
        kvm_runs += 1;
        let what = match exit {
            VcpuExit::IoOut(port, &[value]) if (COM1..COM1 + 8).contains(&port) => {
                serial
                    .write((port - COM1) as u8, value)
                    .map_err(|e| anyhow::anyhow!("COM1's interrupt: {e:?}"))?;
                continue;
            }
            VcpuExit::IoIn(port, data) if (COM1..COM1 + 8).contains(&port) && data.len() == 1 => {
                data[0] = serial.read((port - COM1) as u8);
                continue;
            }
            VcpuExit::IoOut(DEBUG_PORT, bytes) => {
                bytes.iter().for_each(|&b| debug.byte(b));
                continue;
            }
            VcpuExit::IoOut(SHUTDOWN_PORT, bytes) => {
                // The last eight bytes are all the match needs.
                shutdown.extend_from_slice(bytes);
                let keep = shutdown.len().saturating_sub(8);
                shutdown.drain(..keep);
                if shutdown == b"Shutdown" {
                    break;
                }
                continue;
            }
            VcpuExit::IoOut(I8042_COMMAND, &[I8042_RESET]) => {
                format!("L2 reset itself through the i8042 at {}", vcpu::rip(cpu))
            }
            VcpuExit::IoIn(_, data) => {
                data.fill(0xff);
                other_io += 1;
                continue;
            }
            VcpuExit::IoOut(..) => {
                other_io += 1;
                continue;
            }
            VcpuExit::MmioRead(_, data) => {
                data.fill(0xff);
                mmio += 1;
                continue;
            }
            VcpuExit::MmioWrite(..) => {
                mmio += 1;
                continue;
            }
            VcpuExit::Shutdown => format!("Shutdown (triple fault) at {}", vcpu::rip(cpu)),
            VcpuExit::InternalError => format!("InternalError at {}", vcpu::rip(cpu)),
            other => vcpu::describe(other),
        };
        bail!("L2 stopped: {what} (KVM_RUN return {kvm_runs})");
    }
    Ok(LinuxReport {
        console_lines: serial.writer().lines,
        debug_lines: debug.lines,
        other_io,
        mmio,
        kvm_runs,
        millis: start.elapsed().as_millis(),
    })
}

/// Interrupts this thread's KVM_RUN every `secs` seconds of L1's time (SIGUSR1, with a handler that does
/// nothing and no SA_RESTART: the ioctl returns EINTR), so that a slow or stuck L2 is seen.
fn status_ticks(secs: u64) -> Result<()> {
    extern "C" fn nothing(_: libc::c_int) {}
    // SAFETY: all-zero is a valid sigaction (no flags, an empty mask, the default handler).
    let mut action: libc::sigaction = unsafe { core::mem::zeroed() };
    action.sa_sigaction = nothing as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the action is initialised and its handler touches nothing; the result is checked.
    let set = unsafe { libc::sigaction(libc::SIGUSR1, &action, core::ptr::null_mut()) };
    ensure!(set == 0, "sigaction: {}", io::Error::last_os_error());
    // SAFETY: pthread_self has no preconditions.
    let vcpu_thread = unsafe { libc::pthread_self() };
    std::thread::spawn(move || loop {
        std::thread::sleep(std::time::Duration::from_secs(secs));
        // SAFETY: the vCPU thread lives as long as the process (it is the main thread).
        unsafe { libc::pthread_kill(vcpu_thread, libc::SIGUSR1) };
    });
    Ok(())
}

/// L2's RIP, RFLAGS and pending events, for a status line.
fn status(cpu: &VcpuFd) -> String {
    let regs = match cpu.get_regs() {
        Ok(r) => format!("RIP {:#x} RFLAGS {:#x}", r.rip, r.rflags),
        Err(e) => format!("no registers (KVM_GET_REGS: {e})"),
    };
    let events = match cpu.get_vcpu_events() {
        Ok(e) => format!(
            "interrupt injected {} vector {:#x}, interrupt shadow {}, NMI pending {}",
            e.interrupt.injected, e.interrupt.nr, e.interrupt.shadow, e.nmi.pending
        ),
        Err(e) => format!("no events (KVM_GET_VCPU_EVENTS: {e})"),
    };
    let mp = cpu
        .get_mp_state()
        .map_or_else(|e| format!("? ({e})"), |m| m.mp_state.to_string());
    format!("{regs}, {events}, MP state {mp}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bzImage of one setup sector and `payload` as the protected-mode kernel, with the header
    /// fields the loader reads (boot.rst's offsets).
    fn bzimage(payload: &[u8], xloadflags: u16) -> Vec<u8> {
        let mut image = vec![0u8; 1024];
        let mut put = |at: usize, bytes: &[u8]| image[at..at + bytes.len()].copy_from_slice(bytes);
        put(0x1f1, &[1]); // setup_sects
        put(0x1fe, &0xaa55u16.to_le_bytes());
        put(0x202, b"HdrS");
        put(0x206, &0x20fu16.to_le_bytes());
        put(0x211, &[1]); // loadflags: LOADED_HIGH
        put(0x214, &0x10_0000u32.to_le_bytes()); // code32_start
        put(0x22c, &0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
        put(0x236, &xloadflags.to_le_bytes());
        put(0x238, &2048u32.to_le_bytes()); // cmdline_size
        put(0x258, &0x100_0000u64.to_le_bytes()); // pref_address
        put(0x260, &0x80_0000u32.to_le_bytes()); // init_size
        image.extend_from_slice(payload);
        image
    }

    fn boot_files(name: &str, image: &[u8], initrd: &[u8]) -> (Boot, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("ihmi-l1-vmm-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (kernel, ramdisk) = (dir.join("bzImage"), dir.join("initrd"));
        std::fs::write(&kernel, image).unwrap();
        std::fs::write(&ramdisk, initrd).unwrap();
        let boot = Boot {
            kernel: kernel.display().to_string(),
            initrd: ramdisk.display().to_string(),
            cmdline: "console=ttyS0 -- hello".into(),
            mem_mib: 32,
            status_secs: 1,
        };
        (boot, dir)
    }

    #[test]
    fn loads_kernel_initrd_command_line_and_zero_page() {
        let (boot, dir) = boot_files("load", &bzimage(b"KERNEL", XLF_KERNEL_64), &[7u8; 5000]);
        let size = 32 << 20;
        let mem: GuestMemoryMmap<()> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap();
        load(&boot, &mem, size).unwrap();
        let read = |at: u64, len: usize| {
            let mut buf = vec![0u8; len];
            mem.read_slice(&mut buf, GuestAddress(at)).unwrap();
            buf
        };
        let u32_at = |at: u64| u32::from_le_bytes(read(at, 4).try_into().unwrap());
        assert_eq!(read(HIGH_MEM, 6), b"KERNEL");
        assert_eq!(read(CMDLINE, 23), b"console=ttyS0 -- hello\0");
        // The zero page: the header with the loader's fields, and two RAM ranges.
        assert_eq!(read(ZERO_PAGE + 0x202, 4), b"HdrS");
        assert_eq!(read(ZERO_PAGE + 0x210, 1), [LOADER_OTHER]);
        assert_eq!(u32_at(ZERO_PAGE + 0x228), CMDLINE as u32);
        let (ramdisk, ramdisk_len) = (u32_at(ZERO_PAGE + 0x218), u32_at(ZERO_PAGE + 0x21c));
        assert_eq!(ramdisk_len, 5000);
        assert_eq!(
            u64::from(ramdisk),
            (size - 5000) & !0xfff,
            "page-aligned, at the top"
        );
        assert_eq!(read(u64::from(ramdisk), 5000), vec![7u8; 5000]);
        assert_eq!(read(ZERO_PAGE + 0x1e8, 1), [2]);
        let e820 = read(ZERO_PAGE + 0x2d0, 40);
        let field = |at: usize| u64::from_le_bytes(e820[at..at + 8].try_into().unwrap());
        assert_eq!((field(0), field(8)), (0, EBDA));
        assert_eq!((field(20), field(28)), (HIGH_MEM, size - HIGH_MEM));
        // The GDT and the page tables (16 large pages for 32 MiB).
        assert_eq!(read(GDT_ADDR + 16, 8), vcpu::GDT[2].to_le_bytes());
        assert_eq!(u32_at(PML4 + 0x2000 + 15 * 8), (15 << 21) | 0x83);
        assert_eq!(u32_at(PML4 + 0x2000 + 16 * 8), 0);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn refuses_kernels_and_sizes_it_cannot_boot() {
        let size = 32 << 20;
        let mem: GuestMemoryMmap<()> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap();
        // No 64-bit entry.
        let (boot, dir) = boot_files("no64", &bzimage(b"K", 0), b"i");
        let err = load(&boot, &mem, size).unwrap_err().to_string();
        assert!(err.contains("no 64-bit entry"), "{err}");
        // An initramfs that would overlap the decompressed kernel (16 MiB + 8 MiB).
        let (boot, dir2) = boot_files("big", &bzimage(b"K", XLF_KERNEL_64), &vec![0u8; 9 << 20]);
        let err = load(&boot, &mem, size).unwrap_err().to_string();
        assert!(err.contains("too little"), "{err}");
        // Not a bzImage at all.
        let (boot, dir3) = boot_files("none", &[0u8; 2048], b"i");
        assert!(load(&boot, &mem, size).is_err());
        for d in [dir, dir2, dir3] {
            let _ = std::fs::remove_dir_all(d);
        }
    }

    #[test]
    fn relay_cuts_lines_and_escapes() {
        let console = Console(None);
        let mut r = Relay::new(&console, "p: ");
        r.write_all(b"one\r\ntw\x01o\n").unwrap();
        assert_eq!(r.lines, 2);
        r.write_all(&[b'x'; LINE_MAX]).unwrap();
        assert_eq!((r.lines, r.line.len()), (3, 0));
        r.write_all(b"tail").unwrap();
        r.finish();
        assert_eq!(r.lines, 4);
        r.finish();
        assert_eq!(r.lines, 4, "nothing left to end");
    }
}
