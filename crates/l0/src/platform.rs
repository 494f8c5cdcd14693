//! The machine as the exit policy reaches it ([`ihmi_hv::Platform`]): guest RAM behind the memory
//! map's fence, one granted word of monitor memory, the guest's EPT view, and the few MSRs, ports and
//! CPU instructions L0 performs on the guest's behalf.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

use ihmi_addr::{Gpa, GpaRange};
use ihmi_ept::{EptMapping, EptView, Eptp, Perm};
use ihmi_hv::nested::ept::Ept02Tables;
use ihmi_hv::{MemoryMap, MonitorWord, Platform, PlatformError};
use ihmi_rt::console::{Console, Sink};

use crate::frames::Pool;
use crate::log;
use crate::state::GrantedWord;

/// An NMI arrived while L0 ran (its handler on vector 2 sets this) or while the out-of-box monitor VM
/// ran (its NMI exit does): it belongs to the guest, which the exit policy gives it to.
pub(crate) static NMI_FOR_GUEST: AtomicBool = AtomicBool::new(false);

/// Physical memory and CPU as the exit policy sees them.
pub(crate) struct HwPlatform<'a> {
    pub(crate) guest_view: &'a mut EptView,
    pub(crate) frames: &'a mut Pool,
    /// The guest's memory map: reads and writes on its behalf must land in guest RAM.
    pub(crate) fence: &'a MemoryMap,
    /// The monitor words the exit policy may have written (the Linux gate's kernel entries).
    pub(crate) monitor_words: Option<&'a mut [GrantedWord; 3]>,
    /// The in-hypervisor monitor's VMCS registry, in its frames.
    pub(crate) vmcs_registry: Option<Gpa>,
    /// EPT02's tables, with nested EPT.
    pub(crate) ept02: Option<&'a mut crate::frames::Ept02Pool>,
    /// How many times `protect_guest` changed the guest's view.
    pub(crate) view_generation: &'a mut u64,
}

impl HwPlatform<'_> {
    fn fenced(&self, gpa: Gpa, len: u64) -> Result<(), PlatformError> {
        if self.fence.is_guest_ram(gpa, len) {
            Ok(())
        } else {
            Err(PlatformError::Fenced { gpa, len })
        }
    }
}

impl Platform for HwPlatform<'_> {
    fn host_cpuid(&mut self, leaf: u32, subleaf: u32) -> [u32; 4] {
        ihmi_rt::cpu::cpuid(leaf, subleaf)
    }

    fn read_guest(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), PlatformError> {
        self.fenced(gpa, buf.len() as u64)?;
        // SAFETY: the range is guest RAM (checked against the map just now), which lies below 4 GiB,
        // is identity-mapped for L0 and is not L0's own memory; the guest is stopped while L0 runs, so
        // nothing writes it meanwhile.
        unsafe {
            core::ptr::copy_nonoverlapping(gpa.raw() as *const u8, buf.as_mut_ptr(), buf.len())
        };
        Ok(())
    }

    fn write_guest(&mut self, gpa: Gpa, bytes: &[u8]) -> Result<(), PlatformError> {
        self.fenced(gpa, bytes.len() as u64)?;
        // SAFETY: as in `read_guest`: guest RAM, checked, identity-mapped, not L0's; no reference to
        // it is alive in L0 while the exit policy runs.
        unsafe {
            core::ptr::copy_nonoverlapping(bytes.as_ptr(), gpa.raw() as *mut u8, bytes.len())
        };
        Ok(())
    }

    fn write_monitor(&mut self, word: MonitorWord, value: u64) -> Result<(), PlatformError> {
        let gpa = word.gpa();
        let granted = self
            .monitor_words
            .as_deref_mut()
            .and_then(|w| w.iter_mut().find(|g| g.at == gpa))
            .filter(|_| gpa.is_aligned(8))
            .ok_or(PlatformError::Fenced { gpa, len: 8 })?;
        granted.value = value;
        // SAFETY: the one aligned word of the monitor's gate page L0 granted when it loaded the
        // monitor (checked just now): identity-mapped, monitor memory that the monitor never writes,
        // and no reference to it is alive in L0.
        unsafe { core::ptr::write_volatile(gpa.raw() as *mut u64, value) };
        Ok(())
    }

    fn vmcs_registered(&self, vmcs: Gpa) -> Option<bool> {
        let at = self.vmcs_registry?;
        // SAFETY: the registry lies in the monitor's region, aligned (checked when L0 loaded the
        // monitor), identity-mapped for L0; the monitor writes it only while it runs, and it is
        // stopped now. A volatile read: it changes behind the compiler's back.
        let registry = unsafe {
            core::ptr::read_volatile(at.raw() as *const ihmi_abi::monitor::KvmVmcsRegistry)
        };
        Some(registry.holds(vmcs.raw()))
    }

    fn protect_guest(&mut self, range: GpaRange, perm: Perm) -> Result<(), PlatformError> {
        let view_error = PlatformError::View {
            gpa: range.start,
            len: range.len(),
        };
        if let Err(e) = self
            .guest_view
            .protect(self.frames, range.start, range.len(), perm)
        {
            log!(
                "EPT view 0: cannot change {}+{:#x} to {perm:?}: {e}",
                range.start,
                range.len()
            );
            return Err(view_error);
        }
        // SAFETY: VMX is on and the view's EPTP is the one the guest runs with in view 0; a
        // single-context invalidation drops what the CPU cached of the old permissions.
        unsafe { ihmi_vmx::invept_single(self.guest_view.eptp().raw()) };
        *self.view_generation += 1;
        Ok(())
    }

    fn log(&mut self, args: fmt::Arguments<'_>) {
        log!("{args}");
    }

    fn guest_text(&mut self, args: fmt::Arguments<'_>) {
        // Serial only: port 0xE9 carries L0's own lines (and its verdict markers) and nothing a guest wrote.
        let _ = writeln!(Console(Sink::Serial), "{args}");
    }

    fn read_msr(&mut self, msr: u32) -> u64 {
        // SAFETY: ihmi-hv asks only for IA32_KERNEL_GS_BASE, IA32_LSTAR, IA32_CSTAR and (for a
        // nested guest's MSR areas) IA32_STAR and IA32_FMASK, which every x86-64 CPU has; L0 changes
        // them only for the guest (never runs SWAPGS or SYSCALL), so they hold the guest's values.
        unsafe { ihmi_rt::cpu::rdmsr(msr) }
    }

    fn write_msr(&mut self, msr: u32, value: u64) {
        // SAFETY: the exit policy passes only IA32_LSTAR, IA32_CSTAR and (for a nested guest's guest)
        // IA32_KERNEL_GS_BASE, IA32_STAR and IA32_FMASK here, with a value it checked WRMSR takes
        // (canonical addresses, FMASK's reserved half clear: `ihmi_hv::nested::msr_area`) and that it
        // decided the guest (or its guest) may have. L0 never executes SYSCALL or SWAPGS, so the
        // guest's value can live in the real MSR while L0 runs.
        unsafe { ihmi_rt::cpu::wrmsr(msr, value) };
    }

    fn xsetbv(&mut self, xcr0: u64) {
        // SAFETY: ihmi-hv checked the value against what the CPU supports (as XSETBV itself would) and
        // L0 set CR4.OSXSAVE at boot where the CPU has XSAVE; L0's own code never depends on XCR0.
        unsafe {
            core::arch::asm!("xsetbv", in("ecx") 0u32, in("eax") xcr0 as u32, in("edx") (xcr0 >> 32) as u32, options(nostack, nomem))
        };
    }

    fn guest_mapping(&self, gpa: Gpa) -> Option<EptMapping> {
        self.guest_view.lookup(&*self.frames, gpa)
    }

    fn ept02_tables(&mut self) -> Option<&mut dyn Ept02Tables> {
        self.ept02.as_deref_mut().map(|t| t as &mut dyn Ept02Tables)
    }

    fn guest_view_generation(&self) -> u64 {
        *self.view_generation
    }

    fn invept(&mut self, eptp: Eptp) {
        // SAFETY: VMX is on; a single-context INVEPT of any EPTP only drops cached translations.
        unsafe { ihmi_vmx::invept_single(eptp.raw()) };
    }

    fn port_in(&mut self, port: u16) -> u8 {
        // SAFETY: only the keyboard controller's port is passed on, and reading its status has no side
        // effect L0 depends on.
        unsafe { x86::io::inb(port) }
    }

    fn port_out(&mut self, port: u16, value: u8) {
        // SAFETY: a keyboard-controller command other than the reset pulse, which ihmi-hv filtered out.
        unsafe { x86::io::outb(port, value) }
    }

    fn take_nmi(&mut self) -> bool {
        NMI_FOR_GUEST.swap(false, Ordering::SeqCst)
    }

    fn unblock_nmis(&mut self) {
        ihmi_rt::cpu::unblock_nmis();
    }
}
