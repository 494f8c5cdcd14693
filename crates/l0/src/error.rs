//! Why L0 could not start its guest. Each boot stage returns one of these; `l0_main` prints it once,
//! as the run's failure, and powers off. Every message says what to do about it.

use core::fmt;

use ihmi_ept::EptError;
use ihmi_hv::memory::MapError;
use ihmi_layout::{AllowError, LayoutError};
use ihmi_linux::profile::ProfileError;
use ihmi_linux::BootError;
use ihmi_vmx::VmxError;

/// A boot stage's failure.
#[derive(Debug)]
pub enum LoadError {
    /// EAX did not hold the multiboot2 magic.
    NotMultiboot { magic: u32 },
    /// The boot information structure could not be parsed.
    BootInformation { at: u32 },
    /// The boot loader gave no memory map.
    NoMemoryMap,
    /// `scenario=` names no scenario L0 knows.
    UnknownScenario(Name),
    /// More boot modules than L0 keeps track of.
    TooManyModules { max: usize },
    /// A module the scenario needs is missing.
    MissingModule {
        name: &'static str,
        how: &'static str,
    },
    /// No room for L0's frame pool.
    NoPool { mib: u64 },
    /// L0's frame pool is exhausted.
    OutOfFrames,
    /// The guest memory map could not be built.
    MemoryMap(MapError),
    /// The CPU lacks what L0 or the scenario needs.
    Cpu(&'static str),
    /// VMXON or a VMCS operation failed.
    Vmx { what: &'static str, error: VmxError },
    /// The CPU cannot back the VMX that the scenario has L0 offer its guest.
    NestedOffer(ihmi_hv::nested::caps::OfferError),
    /// A module is not the ELF image L0 expects.
    Image {
        what: &'static str,
        problem: ImageProblem,
    },
    /// The Linux guest profile cannot be read.
    Profile(ProfileError),
    /// The Linux kernel cannot be booted as given.
    Kernel(BootError),
    /// The kernel does not fit in guest RAM.
    KernelPlacement {
        want: u64,
        span: u64,
        relocatable: bool,
    },
    /// A Linux piece has no room, or is not where it must be.
    Linux(&'static str),
    /// The kernel command line does not fit.
    CmdlineTooLong,
    /// A multiboot kernel cannot be booted as given.
    Multiboot(ihmi_multiboot::Error),
    /// `multiboot=` on L0's command line is neither 1 nor 2.
    MultibootProtocol,
    /// A multiboot kernel would load below 1 MiB or outside guest RAM (over L0, or over a module
    /// GRUB loaded: `owner`).
    MultibootPlacement {
        start: u64,
        end: u64,
        owner: Option<ihmi_addr::GpaRange>,
    },
    /// A guest image or boot structure would land outside guest RAM.
    NotGuestRam { gpa: u64, len: u64 },
    /// No room for the monitor in guest RAM.
    NoMonitorRoom { kib: u64 },
    /// The monitor image cannot be laid out.
    Layout(LayoutError),
    /// The allow-list does not fit the monitor.
    Allow(AllowError),
    /// The monitor's page tables or the guest's first ones could not be built.
    PageTables(&'static str),
    /// A VMCS could not be filled in.
    VmcsSetup {
        which: &'static str,
        error: crate::vmcs_setup::SetupError,
    },
    /// An EPT view could not be built.
    View {
        which: &'static str,
        error: EptError,
    },
}

/// A short name from the boot information, copied (cut at 64 bytes).
#[derive(Clone, Copy, Debug)]
pub struct Name {
    bytes: [u8; 64],
    len: usize,
}

impl Name {
    pub fn copy(s: &str) -> Self {
        let mut bytes = [0u8; 64];
        let len = s.len().min(64);
        bytes[..len].copy_from_slice(&s.as_bytes()[..len]);
        Self { bytes, len }
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(core::str::from_utf8(&self.bytes[..self.len]).unwrap_or("?"))
    }
}

/// What is wrong with an ELF module.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageProblem {
    NotElf,
    NotX86_64,
    NoProgramHeaders,
    SegmentOutsideFile { vaddr: u64 },
    FileLargerThanMemory { vaddr: u64 },
    MissingSymbol(&'static str),
    Misaligned(&'static str),
    SymbolOutside(&'static str),
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotMultiboot { magic } => write!(
                f,
                "not started by a multiboot2 loader (magic {magic:#x}); boot the ISO with GRUB"
            ),
            Self::BootInformation { at } => {
                write!(f, "the multiboot2 boot information at {at:#x} is malformed")
            }
            Self::NoMemoryMap => f.write_str("the boot loader gave no memory map"),
            Self::UnknownScenario(name) => {
                write!(f, "unknown scenario '{name}' on the command line")
            }
            Self::TooManyModules { max } => {
                write!(f, "more boot modules than L0 can keep track of ({max})")
            }
            Self::MissingModule { name, how } => write!(f, "no '{name}' module; {how}"),
            Self::NoPool { mib } => write!(
                f,
                "no room for L0's {mib} MiB frame pool; give the machine more memory"
            ),
            Self::OutOfFrames => f.write_str("L0's frame pool is exhausted"),
            Self::MemoryMap(e) => write!(f, "cannot build the guest memory map: {e:?}"),
            Self::Cpu(what) => f.write_str(what),
            Self::Vmx { what, error } => write!(f, "{what}: {error}"),
            Self::NestedOffer(e) => write!(f, "cannot offer the guest nested VMX: {e}"),
            Self::Image { what, problem } => write!(f, "the {what} module: {problem}"),
            Self::Profile(e) => write!(f, "{e}"),
            Self::Kernel(e) => write!(f, "the linux module: {e}"),
            Self::KernelPlacement {
                want,
                span,
                relocatable,
            } => write!(
                f,
                "the kernel wants {want:#x}..{:#x} (init_size), which is not all guest RAM, and {}; give the guest more memory, or smaller boot modules (GRUB loads them below the kernel)",
                want + span,
                if *relocatable {
                    "no other aligned place below 4 GiB is"
                } else {
                    "it is not relocatable"
                }
            ),
            Self::Linux(what) => f.write_str(what),
            Self::CmdlineTooLong => f.write_str("the kernel command line is too long"),
            Self::Multiboot(e) => write!(f, "multiboot kernel: {e}"),
            Self::MultibootProtocol => f.write_str(
                "`multiboot=` on L0's command line must be 1 or 2 (or absent: the kernel's header decides)",
            ),
            Self::MultibootPlacement { start, end, owner } => {
                write!(f, "the multiboot kernel loads at {start:#x}..{end:#x}, which ")?;
                match owner {
                    Some(r) => write!(
                        f,
                        "overlaps {:#x}..{:#x}, L0's own memory or a module GRUB loaded",
                        r.start.raw(),
                        r.end.raw()
                    )?,
                    None => f.write_str("is below 1 MiB or not all RAM")?,
                }
                f.write_str("; link the kernel below 64 MiB (where L0 sits) or give it a smaller span, or give the machine more memory")
            }
            Self::NotGuestRam { gpa, len } => write!(
                f,
                "guest image or boot data at {gpa:#x}+{len:#x} is not in guest RAM"
            ),
            Self::NoMonitorRoom { kib } => {
                write!(f, "no room for the monitor's {kib} KiB in guest RAM")
            }
            Self::Layout(e) => write!(f, "monitor layout: {e}"),
            Self::Allow(e) => write!(f, "{e}"),
            Self::PageTables(what) => write!(f, "{what}: out of table frames"),
            Self::VmcsSetup { which, error } => write!(f, "VMCS setup of {which} failed: {error}"),
            Self::View { which, error } => write!(f, "{which}: {error}"),
        }
    }
}

impl fmt::Display for ImageProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotElf => f.write_str("not an ELF file"),
            Self::NotX86_64 => f.write_str("not an x86-64 ELF64 file"),
            Self::NoProgramHeaders => f.write_str("the ELF has no program headers"),
            Self::SegmentOutsideFile { vaddr } => {
                write!(f, "the segment at {vaddr:#x} lies outside the file")
            }
            Self::FileLargerThanMemory { vaddr } => {
                write!(f, "the segment at {vaddr:#x} has filesz > memsz")
            }
            Self::MissingSymbol(name) => write!(
                f,
                "symbol '{name}' not found; rebuild the images with `ihmi build`"
            ),
            Self::Misaligned(name) => write!(f, "'{name}' is misaligned"),
            Self::SymbolOutside(name) => write!(f, "'{name}' lies outside where it must be"),
        }
    }
}

impl From<MapError> for LoadError {
    fn from(e: MapError) -> Self {
        Self::MemoryMap(e)
    }
}

impl From<LayoutError> for LoadError {
    fn from(e: LayoutError) -> Self {
        Self::Layout(e)
    }
}

impl From<AllowError> for LoadError {
    fn from(e: AllowError) -> Self {
        Self::Allow(e)
    }
}

impl From<BootError> for LoadError {
    fn from(e: BootError) -> Self {
        Self::Kernel(e)
    }
}
