//! The machine around the vCPU, as the exit policy reaches it: host CPUID, fenced guest memory, the
//! guest's EPT view, a few MSRs and ports, and L0's console.

use core::fmt;

use ihmi_addr::{Gpa, GpaRange};
use ihmi_ept::{EptMapping, Eptp, Perm};

use crate::nested::ept::Ept02Tables;

/// Why the platform did not do what the exit policy asked. The policy turns each into a refusal, a
/// message or a clean end of the guest: never an end of L0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlatformError {
    /// The range is not memory the operation may touch: guest RAM for guest reads and writes, the
    /// granted word for a monitor write.
    Fenced { gpa: Gpa, len: u64 },
    /// The guest's EPT view could not be changed as asked (no frame left for a table).
    View { gpa: Gpa, len: u64 },
}

impl fmt::Display for PlatformError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fenced { gpa, len } => {
                write!(f, "{gpa}+{len:#x} is not memory this operation may touch")
            }
            Self::View { gpa, len } => write!(f, "the guest view could not change {gpa}+{len:#x}"),
        }
    }
}

/// The one word of monitor memory the exit policy may have L0 write: where the Linux system-call
/// gate keeps the kernel's own entry. L0 names it when it loads the monitor, and L0's platform
/// refuses a monitor write anywhere else.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MonitorWord(Gpa);

impl MonitorWord {
    /// The word at `gpa` (8-byte aligned, inside the monitor's gate page).
    #[must_use]
    pub const fn new(gpa: Gpa) -> Self {
        Self(gpa)
    }

    /// Where it is.
    #[must_use]
    pub const fn gpa(self) -> Gpa {
        self.0
    }
}

/// The machine around the vCPU.
pub trait Platform {
    /// CPUID as the host CPU answers it.
    fn host_cpuid(&mut self, leaf: u32, subleaf: u32) -> [u32; 4];
    /// Reads guest RAM; a range that is not all guest RAM is refused.
    fn read_guest(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), PlatformError>;
    /// Writes guest RAM on the guest's behalf, once L0 has decided to (the kernel's page tables, the
    /// process-creation hook's call); a range that is not all guest RAM is refused.
    fn write_guest(&mut self, gpa: Gpa, bytes: &[u8]) -> Result<(), PlatformError>;
    /// Writes the monitor word L0 granted; any other word is refused.
    fn write_monitor(&mut self, word: MonitorWord, value: u64) -> Result<(), PlatformError>;
    /// With the in-hypervisor monitor watching L1's KVM: whether the monitor registered the VMCS
    /// region at `vmcs` as a vCPU's that KVM created (NESTED.md B.1.3 P6); `None` when no monitor
    /// keeps a registry, and nothing is checked.
    fn vmcs_registered(&self, vmcs: Gpa) -> Option<bool>;
    /// Sets the permissions of `range` in the guest's EPT view (view 0) and invalidates what the CPU
    /// cached of it.
    fn protect_guest(&mut self, range: GpaRange, perm: Perm) -> Result<(), PlatformError>;
    /// Prints one line of L0's own on its console (serial and 0xE9).
    fn log(&mut self, args: fmt::Arguments<'_>);
    /// Prints one line of guest text, already sanitised and prefixed. It must never reach the channel
    /// that carries L0's verdict markers.
    fn guest_text(&mut self, args: fmt::Arguments<'_>);
    /// Writes an MSR that holds guest state L0 does not switch (IA32_LSTAR, IA32_CSTAR, and a nested
    /// guest's guest's IA32_KERNEL_GS_BASE), once L0 has checked the value.
    fn write_msr(&mut self, msr: u32, value: u64);
    /// Reads an MSR that holds guest state L0 does not switch (IA32_KERNEL_GS_BASE, IA32_LSTAR,
    /// IA32_CSTAR).
    fn read_msr(&mut self, msr: u32) -> u64;
    /// Sets XCR0 to a value L0 has checked, on the guest's behalf (XSETBV always exits).
    fn xsetbv(&mut self, xcr0: u64);
    /// Reads a byte from a device port L0 intercepts but passes on (the keyboard controller).
    fn port_in(&mut self, port: u16) -> u8;
    /// Writes a byte to such a port, once L0 has checked it.
    fn port_out(&mut self, port: u16, value: u8);
    /// Whether an NMI arrived while L0 itself ran (or the out-of-box monitor VM did) since the last
    /// call: it belongs to the guest, and clears with this call.
    fn take_nmi(&mut self) -> bool;
    /// After an NMI exit: lifts the blocking of NMIs the exit left in L0 (the CPU's blocking lasts
    /// until an IRET), so the next NMI arrives at all.
    fn unblock_nmis(&mut self);
    /// L0's own translation of the guest's page at `gpa` in its view 0 (where it is, what the guest
    /// may do there, its memory type): what nested EPT intersects L1's EPT with. `None` for a page
    /// the guest does not have (L0's and the monitor's frames among them).
    fn guest_mapping(&self, gpa: Gpa) -> Option<EptMapping>;
    /// The tables of the guest's guest's EPT (EPT02, nested EPT), where L0 keeps some.
    fn ept02_tables(&mut self) -> Option<&mut dyn Ept02Tables>;
    /// Invalidates what the CPU cached of the EPT `eptp` (a single-context INVEPT).
    fn invept(&mut self, eptp: Eptp);
    /// How many times [`Platform::protect_guest`] has changed the guest's view so far: what nested
    /// EPT built from the view before is stale after.
    fn guest_view_generation(&self) -> u64;
}

/// Reads one little-endian word of guest RAM.
pub(crate) fn read_guest_u64(platform: &impl Platform, gpa: Gpa) -> Result<u64, PlatformError> {
    let mut b = [0u8; 8];
    platform.read_guest(gpa, &mut b)?;
    Ok(u64::from_le_bytes(b))
}
