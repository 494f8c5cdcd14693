//! `--probe`: one VM with 2 MiB of memory and one vCPU that starts in 64-bit long mode (L1's KVM runs
//! with `ept=0`, so there is no unrestricted guest to start it in real mode), runs the [`l2`]
//! program to its end and returns what that program reported.
//!
//! `--attack-alias PHYS` makes it the VMM of L1's compromised root (NESTED.md B.3, 12.1): a second
//! memslot of one page at [`ihmi_abi::attack::IHMI_L2_MAP_GPA`] is a shared `/dev/mem` mapping of
//! the L1 page that holds `PHYS`, and the L2 program's first act is a 4-byte write of a NOP there,
//! at `PHYS`'s offset (KVM's text, where the monitor's call is, in the `kvm-l2-map` scenario).

use std::ptr::NonNull;

use anyhow::{bail, ensure, Context, Result};
use kvm_bindings::{kvm_regs, kvm_userspace_memory_region, KVM_API_VERSION};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};

use crate::{l2, vcpu};

// The guest-physical layout: code, stack below the page tables, the touched pages from 1 MiB.
const MEM_SIZE: usize = 2 << 20;
const CODE: u64 = 0x1000;
const STACK_TOP: u64 = 0x8000;
const PML4: u64 = 0x9000;
// The `--attack-vmfunc` guest's descriptor tables: the boot GDT, and an IDT of 16 gates (only #UD's
// present).
const GDT: u64 = 0x500;
const IDT: u64 = 0x600;
const IDT_GATES: u64 = 16;
const _: () = assert!(l2::TOUCH_END <= MEM_SIZE as u64 && PML4 + 0x3000 <= 0x10_0000);

/// What the L2 program sent, and how many KVM_RUN returns it took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeReport {
    /// The CPUIDs L2 says it made.
    pub cpuids: u32,
    /// The last CPUID's vendor string (non-ASCII bytes escaped).
    pub vendor: String,
    /// The pages L2 says it wrote and read back.
    pub pages: u32,
    /// The pages that read back wrong.
    pub bad: u32,
    /// The KVM_RUN ioctls that returned to this process.
    pub kvm_runs: u64,
    /// The #UD exceptions L2's handler reported.
    pub ud_faults: u64,
}

impl ProbeReport {
    /// L2's report as one line, built only from what L2 sent.
    pub fn l2_line(&self) -> String {
        format!(
            "ihmi-l2: cpuid={} vendor={} pages={} bad={}",
            self.cpuids, self.vendor, self.pages, self.bad
        )
    }
}

/// The first four bytes of a 5-byte NOP (`nopl 0x0(%rax,%rax,1)`), which the attacking L2 writes.
const NOP4: u32 = u32::from_le_bytes([0x0f, 0x1f, 0x44, 0x00]);

/// Runs the probe L2 with `cpuids` CPUIDs to its end; with `alias`, as the attacker's VMM; with
/// `vmfunc`, as a guest that executes VMFUNC first.
pub fn run(cpuids: u32, alias: Option<u64>, vmfunc: bool) -> Result<ProbeReport> {
    // Declared before the VM so that they are unmapped after the VM is gone.
    let mut mem = GuestMemory::new(MEM_SIZE)?;
    let aliased = alias.map(GuestMemory::dev_mem).transpose()?;
    let kvm = Kvm::new().context("cannot open /dev/kvm (is KVM built in and are we root?)")?;
    let api = kvm.get_api_version();
    ensure!(
        api == KVM_API_VERSION as i32,
        "KVM API version {api}, expected {KVM_API_VERSION}"
    );
    let vm = kvm.create_vm().context("KVM_CREATE_VM")?;
    vm.set_tss_address(vcpu::TSS_ADDR)
        .context("KVM_SET_TSS_ADDR")?;
    // KVM's in-kernel PIC, I/O APIC and local APIC: without them, creating the vCPU counts one
    // without a local APIC in a static key (`kvm_has_noapic_vcpu`), a patch of L1's kernel text,
    // which a monitor that protects that text refuses.
    vm.create_irq_chip().context("KVM_CREATE_IRQCHIP")?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: mem.ptr.as_ptr() as u64,
    };
    // SAFETY: the region is `mem`'s whole mapping, which outlives `vm` (declared before it).
    unsafe { vm.set_user_memory_region(region) }.context("KVM_SET_USER_MEMORY_REGION")?;
    if let Some(page) = &aliased {
        let region = kvm_userspace_memory_region {
            slot: 1,
            flags: 0,
            guest_phys_addr: ihmi_abi::attack::IHMI_L2_MAP_GPA,
            memory_size: page.len as u64,
            userspace_addr: page.ptr.as_ptr() as u64,
        };
        // SAFETY: the region is `page`'s whole mapping, which outlives `vm` (declared before it).
        unsafe { vm.set_user_memory_region(region) }
            .context("KVM_SET_USER_MEMORY_REGION of the /dev/mem page")?;
    }

    let mem = mem.as_mut_slice();
    // The first 2 MiB, with one large page (and the next 2 MiB, where the attacker's page is).
    vcpu::identity_map(mem, PML4, 1 + u64::from(aliased.is_some()));
    let program = l2::program();
    mem[CODE as usize..][..program.len()].copy_from_slice(program);

    let gdt = if vmfunc {
        // Exception delivery and IRETQ load CS from the GDT: it must be in memory then.
        for (i, d) in vcpu::GDT.iter().enumerate() {
            mem[GDT as usize + 8 * i..][..8].copy_from_slice(&d.to_le_bytes());
        }
        let handler = CODE + l2::ud_handler_offset();
        let at = (IDT + 16 * 6) as usize;
        mem[at..][..8].copy_from_slice(&interrupt_gate(handler).to_le_bytes());
        mem[at + 8..][..8].copy_from_slice(&(handler >> 32).to_le_bytes());
        Some((GDT, (vcpu::GDT.len() * 8 - 1) as u16))
    } else {
        None
    };

    let mut vcpu = vm.create_vcpu(0).context("KVM_CREATE_VCPU")?;
    vcpu::set_cpuid(&kvm, &vcpu)?;
    // No GDT in memory unless the guest takes exceptions: the probe loads no selector.
    vcpu::set_long_mode(&vcpu, PML4, gdt)?;
    if vmfunc {
        let mut sregs = vcpu.get_sregs().context("KVM_GET_SREGS")?;
        (sregs.idt.base, sregs.idt.limit) = (IDT, (IDT_GATES * 16 - 1) as u16);
        vcpu.set_sregs(&sregs).context("KVM_SET_SREGS")?;
    }
    // SYSCALL on, though the probe makes none: KVM loads its LSTAR (0) around each entry, a write
    // of L2's LSTAR beside L1's, which L0 must keep apart when it locks L1's.
    vcpu::enable_syscall(&vcpu)?;
    let regs = kvm_regs {
        rip: CODE,
        rsp: STACK_TOP,
        rflags: 2,
        rdi: cpuids.into(),
        rsi: alias.map_or(0, |pa| ihmi_abi::attack::IHMI_L2_MAP_GPA + pa % 0x1000),
        rdx: NOP4.into(),
        r15: vmfunc.into(),
        ..Default::default()
    };
    vcpu.set_regs(&regs).context("KVM_SET_REGS")?;
    run_to_halt(&mut vcpu)
}

/// The run loop: L2's OUTs collected, its OUT to the done port ends it, any other exit is an
/// error.
fn run_to_halt(vcpu: &mut VcpuFd) -> Result<ProbeReport> {
    let (mut vendor, mut values, mut kvm_runs) = (Vec::new(), Vec::new(), 0);
    let mut ud_faults = 0;
    loop {
        let exit = vcpu.run().context("KVM_RUN")?;
        kvm_runs += 1;
        let what = match exit {
            VcpuExit::IoOut(l2::DEBUG_PORT, &[byte]) => {
                vendor.push(byte);
                continue;
            }
            VcpuExit::IoOut(l2::VALUE_PORT, &[a, b, c, d]) => {
                values.push(u32::from_le_bytes([a, b, c, d]));
                continue;
            }
            VcpuExit::IoOut(l2::UD_PORT, &[6]) => {
                ud_faults += 1;
                continue;
            }
            VcpuExit::IoOut(l2::DONE_PORT, _) => break,
            VcpuExit::Shutdown => format!("Shutdown (triple fault) at {}", vcpu::rip(vcpu)),
            VcpuExit::InternalError => format!("InternalError at {}", vcpu::rip(vcpu)),
            other => vcpu::describe(other),
        };
        bail!("unexpected exit {what} (KVM_RUN return {kvm_runs})");
    }
    let [cpuids, pages, bad] = values[..] else {
        bail!(
            "L2 sent {} values to port {:#x}, not 3",
            values.len(),
            l2::VALUE_PORT
        );
    };
    ensure!(
        vendor.len() == 12,
        "L2 sent a {}-byte vendor, not 12",
        vendor.len()
    );
    let vendor = vendor.escape_ascii().to_string();
    Ok(ProbeReport {
        cpuids,
        vendor,
        pages,
        bad,
        kvm_runs,
        ud_faults,
    })
}

/// The low 8 bytes of a 64-bit interrupt gate to `handler` through [`vcpu::BOOT_CS`], present, DPL 0,
/// no IST (SDM 6.14.1); the high 8 are the handler's bits 63:32.
fn interrupt_gate(handler: u64) -> u64 {
    const PRESENT_INTERRUPT_GATE: u64 = 0x8e;
    (handler & 0xffff)
        | u64::from(vcpu::BOOT_CS) << 16
        | PRESENT_INTERRUPT_GATE << 40
        | (handler >> 16 & 0xffff) << 48
}

/// Anonymous memory for the guest, unmapped on drop.
#[derive(Debug)]
struct GuestMemory {
    ptr: NonNull<u8>,
    len: usize,
}

impl GuestMemory {
    fn new(len: usize) -> Result<Self> {
        // SAFETY: a fresh anonymous mapping aliases nothing; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mmap of the guest's memory");
        }
        let ptr = NonNull::new(ptr.cast()).context("mmap returned null")?;
        Ok(Self { ptr, len })
    }

    /// The page of physical memory that holds `pa`, mapped shared and writable through /dev/mem.
    fn dev_mem(pa: u64) -> Result<Self> {
        use std::os::fd::AsRawFd;
        let mem = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/mem")
            .context("/dev/mem (the attacker's VMM runs as root)")?;
        let len = 0x1000;
        // SAFETY: a fresh shared mapping of /dev/mem aliases nothing of this process; the result is
        // checked. The mapping outlives the file, as mappings do.
        let ptr = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                mem.as_raw_fd(),
                (pa & !0xfff) as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("mmap of /dev/mem at {:#x}", pa & !0xfff));
        }
        let ptr = NonNull::new(ptr.cast()).context("mmap returned null")?;
        Ok(Self { ptr, len })
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is `len` bytes, readable and writable, and lives as long as `self`;
        // the vCPU is not running while this borrow is alive.
        unsafe { core::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: this is the mapping `new` made, and nothing uses it after drop.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_line() {
        let report = ProbeReport {
            cpuids: 1000,
            vendor: "GenuineIntel".into(),
            pages: 256,
            bad: 0,
            kvm_runs: 16,
            ud_faults: 0,
        };
        let line = report.l2_line();
        assert_eq!(
            line,
            "ihmi-l2: cpuid=1000 vendor=GenuineIntel pages=256 bad=0"
        );
        assert!(format!("l2: {line}").starts_with(ihmi_abi::NESTED_KVM_L2_REPORT));
    }

    #[test]
    fn program_fits_below_the_stack() {
        let program = l2::program();
        assert!(!program.is_empty() && CODE + program.len() as u64 <= STACK_TOP - 0x1000);
        assert!(
            program.windows(4).any(|w| w == [0xee, 0xf4, 0xeb, 0xfd]),
            "its OUT to the done port, hlt and a jmp back to it"
        );
        // The #UD handler is last, inside the program, and returns with IRETQ.
        let ud = l2::ud_handler_offset() as usize;
        assert!(ud < program.len() && program.ends_with(&[0x48, 0xcf]));
    }

    #[test]
    fn the_ud_gate_points_at_the_handler_through_the_boot_code_segment() {
        let gate = interrupt_gate(0x1234_5678_9abc);
        assert_eq!(gate & 0xffff, 0x9abc);
        assert_eq!(gate >> 16 & 0xffff, u64::from(vcpu::BOOT_CS));
        assert_eq!(gate >> 40 & 0xff, 0x8e);
        assert_eq!(gate >> 48, 0x5678);
    }

    /// Needs /dev/kvm (root): `cargo test -p ihmi-l1-vmm -- --ignored`.
    #[test]
    #[ignore = "needs /dev/kvm"]
    fn probe_on_kvm() {
        let report = run(10, None, false).unwrap();
        assert_eq!(
            (report.cpuids, report.pages, report.bad),
            (10, l2::PAGES, 0)
        );
        assert_eq!(report.vendor.len(), 12);
        // 3 counts + 12 vendor bytes + the end: the CPUIDs and page faults stay in the kernel.
        assert_eq!(report.kvm_runs, 16);
    }
}
