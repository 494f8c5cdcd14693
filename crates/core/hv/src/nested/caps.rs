//! The VMX capability MSRs L0 offers a guest hypervisor (L1), SDM Appendix A: what L1's VMCS12 may ask
//! for. Each control MSR's allowed-1 half is L0's policy for the milestone intersected with what the
//! real CPU allows (a control L0 passes through into VMCS02 must exist underneath); its allowed-0 half
//! is the architectural default-1 set (the TRUE MSRs with the bits the SDM lets be 0). Everything L0
//! does not emulate is left out: no VM functions and no VMCS shadowing for L2 ever, EPT only in the
//! nested-EPT offer (4 KiB pages, no accessed/dirty flags), no posted interrupts, no preemption timer
//! (Linux 6.1's KVM turns it off on Bochs anyway), no unrestricted guest, no VPID.
//!
//! `tests.rs` replays Linux 6.1's `setup_vmcs_config` acceptance on every offer, so a table that would
//! make `kvm_intel` refuse to load fails `cargo test` (NESTED.md A.1.2, A.1.4).

use core::fmt;

use ihmi_arch::cr::{CR0_NE, CR0_PE, CR0_PG, CR4_VMXE};
use ihmi_arch::msr::{self, FEATURE_CONTROL_LOCK, FEATURE_CONTROL_VMX_OUTSIDE_SMX};
use ihmi_vmcs::{
    fields, EntryControls, ExitControls, PinbasedControls, PrimaryControls, SecondaryControls,
    VmxCapabilities,
};

/// What L0 offers L1, by milestone (NESTED.md A.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NestedFeatures {
    /// L1 runs its guests on shadow page tables under L0's EPT: no secondary controls (M1-M3).
    ShadowPaging,
    /// L1 gets EPT for its guests (EPT02 built from EPT12): secondary controls with EPT and the
    /// instructions that only pass through (M4).
    NestedEpt,
}

/// The VMCS revision identifier of L0's VMCS12 ("IHM1"; bit 31 clear, as the SDM requires): a VMCS
/// region with any other is refused at VMPTRLD.
pub const VMCS12_REVISION: u32 = 0x494d_4931;
/// The size of a VMCS12 region, and so of the VMXON region: one page.
pub const VMCS12_SIZE: u64 = 4096;

/// IA32_FEATURE_CONTROL as L0 shows it: locked, VMX enabled outside SMX (writes are refused: it is
/// locked).
pub const FEATURE_CONTROL: u64 = FEATURE_CONTROL_LOCK | FEATURE_CONTROL_VMX_OUTSIDE_SMX;

// The controls' default-1 bits (SDM A.2-A.5): the low halves of the non-TRUE MSRs, and of the TRUE
// ones, where CR3-load/store exiting and save/load-debug-controls may be 0.
const PIN_DEFAULT1: u32 = 0x16;
const PROC_DEFAULT1: u32 = 0x0401_e172;
const PROC_TRUE_DEFAULT1: u32 = 0x0400_6172;
const EXIT_DEFAULT1: u32 = 0x0003_6dff;
const EXIT_TRUE_DEFAULT1: u32 = 0x0003_6dfb;
const ENTRY_DEFAULT1: u32 = 0x0000_11ff;
const ENTRY_TRUE_DEFAULT1: u32 = 0x0000_11fb;

// IA32_VMX_BASIC (SDM A.1): the region size, write-back memory type, the TRUE MSRs exist.
const BASIC_SIZE_SHIFT: u32 = 32;
const BASIC_MEMTYPE_WB: u64 = 6 << 50;
const BASIC_INS_OUTS_INFO: u64 = 1 << 54;
const BASIC_TRUE_CONTROLS: u64 = 1 << 55;
// IA32_VMX_MISC (SDM A.6): IA32_EFER.LMA is stored on exits; no CR3 targets, no preemption timer.
const MISC_STORE_LMA: u64 = 1 << 5;
// IA32_VMX_EPT_VPID_CAP (SDM A.10) for nested EPT: execute-only pages, 4-level walks, write-back
// paging structures, INVEPT with single- and all-context types. No large pages, no accessed/dirty
// flags: EPT02 is built 4 KiB at a time.
const EPT_CAP_NESTED: u64 = (1 << 0) | (1 << 6) | (1 << 14) | (1 << 20) | (1 << 25) | (1 << 26);
/// The VPID half of IA32_VMX_EPT_VPID_CAP offered with it: INVVPID (bit 32) with all four types
/// (individual-address 40, single-context 41, all-context 42, single-context retaining globals 43).
/// VPIDs are emulated, not the CPU's: L0 runs every VMCS, VMCS02 included, without VPID, so every
/// VM entry and exit already flushes the linear and combined mappings L2 could have left (SDM
/// 29.4.3.3); L1's INVVPID then only has to be checked, and L2 never sees a stale translation.
pub const EPT_VPID_CAP_VPID: u64 = (1 << 32) | (1 << 40) | (1 << 41) | (1 << 42) | (1 << 43);

/// The pin-based controls L0 offers: what it forwards to L2's VMCS (external interrupts, NMIs,
/// virtual NMIs).
fn pin_policy() -> PinbasedControls {
    PinbasedControls::EXTERNAL_INTERRUPT_EXITING
        | PinbasedControls::NMI_EXITING
        | PinbasedControls::VIRTUAL_NMIS
}

/// The primary processor-based controls L0 offers: every exit L1 may ask for that L0 can forward,
/// the I/O and MSR bitmaps (which L0 merges), and the secondary controls with nested EPT.
fn proc_policy(features: NestedFeatures) -> PrimaryControls {
    let base = PrimaryControls::INTERRUPT_WINDOW_EXITING
        | PrimaryControls::USE_TSC_OFFSETTING
        | PrimaryControls::HLT_EXITING
        | PrimaryControls::INVLPG_EXITING
        | PrimaryControls::MWAIT_EXITING
        | PrimaryControls::RDPMC_EXITING
        | PrimaryControls::RDTSC_EXITING
        | PrimaryControls::CR3_LOAD_EXITING
        | PrimaryControls::CR3_STORE_EXITING
        | PrimaryControls::CR8_LOAD_EXITING
        | PrimaryControls::CR8_STORE_EXITING
        | PrimaryControls::NMI_WINDOW_EXITING
        | PrimaryControls::MOV_DR_EXITING
        | PrimaryControls::UNCOND_IO_EXITING
        | PrimaryControls::USE_IO_BITMAPS
        | PrimaryControls::MONITOR_TRAP_FLAG
        | PrimaryControls::USE_MSR_BITMAPS
        | PrimaryControls::MONITOR_EXITING
        | PrimaryControls::PAUSE_EXITING;
    match features {
        NestedFeatures::ShadowPaging => base,
        NestedFeatures::NestedEpt => base | PrimaryControls::SECONDARY_CONTROLS,
    }
}

/// The secondary controls L0 offers with nested EPT: EPT, VPID (emulated: see [`EPT_VPID_CAP_VPID`]),
/// and the instructions that only pass through (RDTSCP, INVPCID, XSAVES/XRSTORS). Never VM functions
/// or VMCS shadowing.
fn proc2_policy() -> SecondaryControls {
    SecondaryControls::ENABLE_EPT
        | SecondaryControls::ENABLE_VPID
        | SecondaryControls::ENABLE_RDTSCP
        | SecondaryControls::ENABLE_INVPCID
        | SecondaryControls::ENABLE_XSAVES_XRSTORS
}

fn exit_policy() -> ExitControls {
    ExitControls::SAVE_DEBUG_CONTROLS
        | ExitControls::HOST_ADDRESS_SPACE_SIZE
        | ExitControls::ACK_INTERRUPT_ON_EXIT
        | ExitControls::SAVE_IA32_PAT
        | ExitControls::LOAD_IA32_PAT
        | ExitControls::SAVE_IA32_EFER
        | ExitControls::LOAD_IA32_EFER
}

fn entry_policy() -> EntryControls {
    EntryControls::LOAD_DEBUG_CONTROLS
        | EntryControls::IA32E_MODE_GUEST
        | EntryControls::LOAD_IA32_PAT
        | EntryControls::LOAD_IA32_EFER
}

/// Why L0 cannot offer VMX: the CPU underneath lacks a control L0 must pass through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OfferError {
    /// The capability MSR that lacks them.
    pub msr: u32,
    /// The allowed-1 bits L0 needs that it does not have.
    pub missing: u32,
}

impl fmt::Display for OfferError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the CPU's VMX capability MSR {:#x} does not allow the controls {:#x}, which L0 passes through to a nested guest",
            self.msr, self.missing
        )
    }
}

/// The controls a guest hypervisor needs at all: those Linux 6.1's KVM requires (NESTED.md A.1.1).
/// L0 cannot offer VMX without them underneath.
const REQUIRED: [(u32, u32); 4] = [
    (msr::IA32_VMX_PINBASED_CTLS, 0x9),
    (msr::IA32_VMX_PROCBASED_CTLS, 0x2199_8e8c),
    (msr::IA32_VMX_EXIT_CTLS, 0x8204),
    (msr::IA32_VMX_ENTRY_CTLS, 0x204),
];

/// The capability MSRs L0 shows its guest when it offers VMX.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtualVmx {
    features: NestedFeatures,
    basic: u64,
    pin: u64,
    proc: u64,
    exit: u64,
    entry: u64,
    true_proc: u64,
    true_exit: u64,
    true_entry: u64,
    misc: u64,
    cr0_fixed1: u64,
    cr4_fixed1: u64,
    vmcs_enum: u64,
    proc2: u64,
    ept_vpid_cap: u64,
}

/// A control MSR's value: allowed-1 in bits 63:32, allowed-0 (default-1) in 31:0.
const fn control(allowed1: u32, allowed0: u32) -> u64 {
    ((allowed1 | allowed0) as u64) << 32 | allowed0 as u64
}

impl VirtualVmx {
    /// What L0 offers with `features` on the CPU `host` describes.
    pub fn offer(host: &VmxCapabilities, features: NestedFeatures) -> Result<Self, OfferError> {
        // A missing MSR allows nothing.
        let allowed1 = |index: u32| (host.raw_msr(index).unwrap_or(0) >> 32) as u32;
        for (index, required) in REQUIRED {
            let missing = required & !allowed1(index);
            if missing != 0 {
                return Err(OfferError {
                    msr: index,
                    missing,
                });
            }
        }
        let pin = pin_policy().bits() & allowed1(msr::IA32_VMX_PINBASED_CTLS);
        let proc = proc_policy(features).bits() & allowed1(msr::IA32_VMX_PROCBASED_CTLS);
        let exit = exit_policy().bits() & allowed1(msr::IA32_VMX_EXIT_CTLS);
        let entry = entry_policy().bits() & allowed1(msr::IA32_VMX_ENTRY_CTLS);
        let (proc2, ept_vpid_cap) = match features {
            NestedFeatures::ShadowPaging => (0, 0),
            NestedFeatures::NestedEpt => {
                // VPID is offered whatever the CPU has: L0 emulates it without the CPU's.
                let proc2 = (proc2_policy().bits() & allowed1(msr::IA32_VMX_PROCBASED_CTLS2))
                    | SecondaryControls::ENABLE_VPID.bits();
                let needed = SecondaryControls::ENABLE_EPT.bits();
                let cap = host.raw_msr(msr::IA32_VMX_EPT_VPID_CAP).unwrap_or(0);
                if proc2 & needed == 0 || cap & EPT_CAP_NESTED != EPT_CAP_NESTED {
                    return Err(OfferError {
                        msr: msr::IA32_VMX_PROCBASED_CTLS2,
                        missing: needed,
                    });
                }
                (control(proc2, 0), EPT_CAP_NESTED | EPT_VPID_CAP_VPID)
            }
        };
        let max_index = fields::ALL.iter().map(|f| f.index()).max().unwrap_or(0);
        let host_basic = host.raw_msr(msr::IA32_VMX_BASIC).unwrap_or(0);
        Ok(Self {
            features,
            basic: u64::from(VMCS12_REVISION)
                | VMCS12_SIZE << BASIC_SIZE_SHIFT
                | BASIC_MEMTYPE_WB
                | (host_basic & BASIC_INS_OUTS_INFO)
                | BASIC_TRUE_CONTROLS,
            pin: control(pin, PIN_DEFAULT1),
            proc: control(proc, PROC_DEFAULT1),
            exit: control(exit, EXIT_DEFAULT1),
            entry: control(entry, ENTRY_DEFAULT1),
            true_proc: control(proc, PROC_TRUE_DEFAULT1),
            true_exit: control(exit, EXIT_TRUE_DEFAULT1),
            true_entry: control(entry, ENTRY_TRUE_DEFAULT1),
            misc: MISC_STORE_LMA,
            cr0_fixed1: host.raw_msr(msr::IA32_VMX_CR0_FIXED1).unwrap_or(0),
            cr4_fixed1: host.raw_msr(msr::IA32_VMX_CR4_FIXED1).unwrap_or(0),
            vmcs_enum: u64::from(max_index) << 1,
            proc2,
            ept_vpid_cap,
        })
    }

    /// What the offer is.
    #[must_use]
    pub const fn features(&self) -> NestedFeatures {
        self.features
    }

    /// RDMSR of a VMX capability MSR (or IA32_FEATURE_CONTROL) by the guest: `None` for one the
    /// guest's CPU does not have, which gets #GP as on hardware (SDM A.3.3, A.10, A.11: the secondary
    /// controls only with "activate secondary controls" allowed, EPT/VPID capabilities only with EPT
    /// or VPID allowed, VM functions only with "enable VM functions" allowed, never here).
    #[must_use]
    pub const fn read_msr(&self, index: u32) -> Option<u64> {
        let secondary = self.proc2 != 0;
        Some(match index {
            msr::IA32_FEATURE_CONTROL => FEATURE_CONTROL,
            msr::IA32_VMX_BASIC => self.basic,
            msr::IA32_VMX_PINBASED_CTLS | msr::IA32_VMX_TRUE_PINBASED_CTLS => self.pin,
            msr::IA32_VMX_PROCBASED_CTLS => self.proc,
            msr::IA32_VMX_EXIT_CTLS => self.exit,
            msr::IA32_VMX_ENTRY_CTLS => self.entry,
            msr::IA32_VMX_TRUE_PROCBASED_CTLS => self.true_proc,
            msr::IA32_VMX_TRUE_EXIT_CTLS => self.true_exit,
            msr::IA32_VMX_TRUE_ENTRY_CTLS => self.true_entry,
            msr::IA32_VMX_MISC => self.misc,
            msr::IA32_VMX_CR0_FIXED0 => CR0_PE | CR0_NE | CR0_PG,
            msr::IA32_VMX_CR0_FIXED1 => self.cr0_fixed1,
            msr::IA32_VMX_CR4_FIXED0 => CR4_VMXE,
            msr::IA32_VMX_CR4_FIXED1 => self.cr4_fixed1,
            msr::IA32_VMX_VMCS_ENUM => self.vmcs_enum,
            msr::IA32_VMX_PROCBASED_CTLS2 if secondary => self.proc2,
            msr::IA32_VMX_EPT_VPID_CAP if secondary => self.ept_vpid_cap,
            _ => return None,
        })
    }
}
