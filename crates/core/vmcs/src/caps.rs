//! VMX capability reporting (SDM Appendix A "VMX Capability Reporting Facility").

use core::fmt;

use x86::msr;

use crate::controls::{
    adjust_controls, ControlError, ControlKind, EntryControls, ExitControls, PinbasedControls,
    PrimaryControls, SecondaryControls, VmFuncControls,
};

/// Number of entries in the EPTP list used by EPTP switching (SDM 25.6.14: a 4-KByte list of 512
/// 8-byte EPTP values).
pub const EPTP_LIST_ENTRIES: u16 = 512;

const CR0_PE: u64 = 1 << 0;
const CR0_PG: u64 = 1 << 31;

/// The VMX capability MSRs of one logical processor (SDM Appendix A.1-A.11).
///
/// Conditional MSRs that the processor does not have read as 0 here, which means "nothing allowed".
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct VmxCapabilities {
    basic: u64,
    pinbased: u64,
    procbased: u64,
    exit: u64,
    entry: u64,
    misc: u64,
    cr0_fixed0: u64,
    cr0_fixed1: u64,
    cr4_fixed0: u64,
    cr4_fixed1: u64,
    vmcs_enum: u64,
    procbased2: u64,
    ept_vpid_cap: u64,
    true_pinbased: u64,
    true_procbased: u64,
    true_exit: u64,
    true_entry: u64,
    vmfunc: u64,
}

// IA32_VMX_BASIC (SDM A.1).
const BASIC_REVISION_MASK: u64 = 0x7FFF_FFFF;
const BASIC_TRUE_CONTROLS: u64 = 1 << 55;

// Allowed-1 bits as they sit in the 64-bit control capability MSRs (bits 63:32).
const PROCBASED_MAY_ACTIVATE_SECONDARY: u64 =
    (PrimaryControls::SECONDARY_CONTROLS.bits() as u64) << 32;
const PROCBASED2_MAY_EPT: u64 = (SecondaryControls::ENABLE_EPT.bits() as u64) << 32;
const PROCBASED2_MAY_VPID: u64 = (SecondaryControls::ENABLE_VPID.bits() as u64) << 32;
const PROCBASED2_MAY_VMFUNC: u64 = (SecondaryControls::ENABLE_VM_FUNCTIONS.bits() as u64) << 32;

// IA32_VMX_EPT_VPID_CAP (SDM A.10).
const EPT_EXECUTE_ONLY: u64 = 1 << 0;
const EPT_WALK_4: u64 = 1 << 6;
const EPT_WB: u64 = 1 << 14;
const EPT_2M: u64 = 1 << 16;
const EPT_1G: u64 = 1 << 17;
const EPT_INVEPT: u64 = 1 << 20;
const EPT_AD: u64 = 1 << 21;
const EPT_INVEPT_SINGLE: u64 = 1 << 25;
const EPT_INVEPT_ALL: u64 = 1 << 26;
const VPID_INVVPID: u64 = 1 << 32;
const VPID_INVVPID_SINGLE: u64 = 1 << 41;
const VPID_INVVPID_ALL: u64 = 1 << 42;

impl VmxCapabilities {
    /// Reads the capability MSRs through `read_msr`, touching only MSRs that exist on this processor:
    /// IA32_VMX_PROCBASED_CTLS2 only if "activate secondary controls" may be 1, IA32_VMX_EPT_VPID_CAP
    /// only if EPT or VPID may be enabled, the TRUE_* MSRs only if IA32_VMX_BASIC bit 55 is set and
    /// IA32_VMX_VMFUNC only if "enable VM functions" may be 1 (SDM A.1, A.3.3, A.10, A.11).
    pub fn read(mut read_msr: impl FnMut(u32) -> u64) -> Self {
        let mut caps = Self {
            basic: read_msr(msr::IA32_VMX_BASIC),
            pinbased: read_msr(msr::IA32_VMX_PINBASED_CTLS),
            procbased: read_msr(msr::IA32_VMX_PROCBASED_CTLS),
            exit: read_msr(msr::IA32_VMX_EXIT_CTLS),
            entry: read_msr(msr::IA32_VMX_ENTRY_CTLS),
            misc: read_msr(msr::IA32_VMX_MISC),
            cr0_fixed0: read_msr(msr::IA32_VMX_CR0_FIXED0),
            cr0_fixed1: read_msr(msr::IA32_VMX_CR0_FIXED1),
            cr4_fixed0: read_msr(msr::IA32_VMX_CR4_FIXED0),
            cr4_fixed1: read_msr(msr::IA32_VMX_CR4_FIXED1),
            vmcs_enum: read_msr(msr::IA32_VMX_VMCS_ENUM),
            ..Self::default()
        };
        if caps.procbased & PROCBASED_MAY_ACTIVATE_SECONDARY != 0 {
            caps.procbased2 = read_msr(msr::IA32_VMX_PROCBASED_CTLS2);
        }
        if caps.procbased2 & (PROCBASED2_MAY_EPT | PROCBASED2_MAY_VPID) != 0 {
            caps.ept_vpid_cap = read_msr(msr::IA32_VMX_EPT_VPID_CAP);
        }
        if caps.true_controls() {
            caps.true_pinbased = read_msr(msr::IA32_VMX_TRUE_PINBASED_CTLS);
            caps.true_procbased = read_msr(msr::IA32_VMX_TRUE_PROCBASED_CTLS);
            caps.true_exit = read_msr(msr::IA32_VMX_TRUE_EXIT_CTLS);
            caps.true_entry = read_msr(msr::IA32_VMX_TRUE_ENTRY_CTLS);
        }
        if caps.procbased2 & PROCBASED2_MAY_VMFUNC != 0 {
            caps.vmfunc = read_msr(msr::IA32_VMX_VMFUNC);
        }
        caps
    }

    /// VMCS revision identifier, IA32_VMX_BASIC bits 30:0 (SDM A.1); write it to the VMXON region and
    /// every VMCS region.
    pub const fn revision_id(&self) -> u32 {
        (self.basic & BASIC_REVISION_MASK) as u32
    }

    /// Bytes to allocate for the VMXON and VMCS regions, IA32_VMX_BASIC bits 44:32 (SDM A.1).
    pub const fn vmcs_region_size(&self) -> u32 {
        ((self.basic >> 32) & 0x1FFF) as u32
    }

    /// IA32_VMX_BASIC bit 55: the TRUE_* control MSRs exist and some default1 controls may be 0.
    pub const fn true_controls(&self) -> bool {
        self.basic & BASIC_TRUE_CONTROLS != 0
    }

    /// IA32_VMX_MISC bits 4:0: the VMX-preemption timer counts down once every 2^N TSC ticks
    /// (SDM A.6).
    pub const fn preemption_timer_rate(&self) -> u8 {
        (self.misc & 0x1F) as u8
    }

    /// IA32_VMX_MISC bit 29: VMWRITE may write any supported field, the VM-exit information
    /// fields included (SDM A.6; VMCS shadowing needs it to put an exit's information into a
    /// shadow VMCS).
    pub const fn vmwrite_any_field(&self) -> bool {
        self.misc & (1 << 29) != 0
    }

    /// Highest index used in any VMCS encoding, IA32_VMX_VMCS_ENUM bits 9:1 (SDM A.9).
    pub const fn max_vmcs_index(&self) -> u16 {
        ((self.vmcs_enum >> 1) & 0x1FF) as u16
    }

    /// The value read from a capability MSR, `None` if [`read`](Self::read) skipped it because the
    /// processor does not have it (or the index is not a VMX capability MSR). Meant for diagnostics.
    pub const fn raw_msr(&self, index: u32) -> Option<u64> {
        let have_true = self.true_controls();
        match index {
            msr::IA32_VMX_BASIC => Some(self.basic),
            msr::IA32_VMX_PINBASED_CTLS => Some(self.pinbased),
            msr::IA32_VMX_PROCBASED_CTLS => Some(self.procbased),
            msr::IA32_VMX_EXIT_CTLS => Some(self.exit),
            msr::IA32_VMX_ENTRY_CTLS => Some(self.entry),
            msr::IA32_VMX_MISC => Some(self.misc),
            msr::IA32_VMX_CR0_FIXED0 => Some(self.cr0_fixed0),
            msr::IA32_VMX_CR0_FIXED1 => Some(self.cr0_fixed1),
            msr::IA32_VMX_CR4_FIXED0 => Some(self.cr4_fixed0),
            msr::IA32_VMX_CR4_FIXED1 => Some(self.cr4_fixed1),
            msr::IA32_VMX_VMCS_ENUM => Some(self.vmcs_enum),
            msr::IA32_VMX_PROCBASED_CTLS2
                if self.procbased & PROCBASED_MAY_ACTIVATE_SECONDARY != 0 =>
            {
                Some(self.procbased2)
            }
            msr::IA32_VMX_EPT_VPID_CAP
                if self.procbased2 & (PROCBASED2_MAY_EPT | PROCBASED2_MAY_VPID) != 0 =>
            {
                Some(self.ept_vpid_cap)
            }
            msr::IA32_VMX_TRUE_PINBASED_CTLS if have_true => Some(self.true_pinbased),
            msr::IA32_VMX_TRUE_PROCBASED_CTLS if have_true => Some(self.true_procbased),
            msr::IA32_VMX_TRUE_EXIT_CTLS if have_true => Some(self.true_exit),
            msr::IA32_VMX_TRUE_ENTRY_CTLS if have_true => Some(self.true_entry),
            msr::IA32_VMX_VMFUNC if self.procbased2 & PROCBASED2_MAY_VMFUNC != 0 => {
                Some(self.vmfunc)
            }
            _ => None,
        }
    }

    // The TRUE MSRs, when present, report the real allowed-0 settings of the default1 controls
    // (SDM A.2); their allowed-1 settings equal the legacy MSRs'.
    const fn pinbased_msr(&self) -> u64 {
        if self.true_controls() {
            self.true_pinbased
        } else {
            self.pinbased
        }
    }

    const fn procbased_msr(&self) -> u64 {
        if self.true_controls() {
            self.true_procbased
        } else {
            self.procbased
        }
    }

    const fn exit_msr(&self) -> u64 {
        if self.true_controls() {
            self.true_exit
        } else {
            self.exit
        }
    }

    const fn entry_msr(&self) -> u64 {
        if self.true_controls() {
            self.true_entry
        } else {
            self.entry
        }
    }

    /// Pin-based controls with the must-be-one bits, `required` and the allowed part of `optional`
    /// (SDM A.3.1).
    pub fn adjust_pinbased(
        &self,
        required: PinbasedControls,
        optional: PinbasedControls,
    ) -> Result<PinbasedControls, ControlError> {
        adjust(
            self.pinbased_msr(),
            ControlKind::Pinbased,
            required.bits(),
            optional.bits(),
        )
        .map(PinbasedControls::from_bits_retain)
    }

    /// Primary processor-based controls, as [`adjust_pinbased`](Self::adjust_pinbased) (SDM A.3.2).
    pub fn adjust_primary(
        &self,
        required: PrimaryControls,
        optional: PrimaryControls,
    ) -> Result<PrimaryControls, ControlError> {
        adjust(
            self.procbased_msr(),
            ControlKind::Primary,
            required.bits(),
            optional.bits(),
        )
        .map(PrimaryControls::from_bits_retain)
    }

    /// Secondary processor-based controls (SDM A.3.3). Without IA32_VMX_PROCBASED_CTLS2 nothing is
    /// allowed, so any `required` bit is an error.
    pub fn adjust_secondary(
        &self,
        required: SecondaryControls,
        optional: SecondaryControls,
    ) -> Result<SecondaryControls, ControlError> {
        adjust(
            self.procbased2,
            ControlKind::Secondary,
            required.bits(),
            optional.bits(),
        )
        .map(SecondaryControls::from_bits_retain)
    }

    /// VM-exit controls (SDM A.4.1).
    pub fn adjust_exit(
        &self,
        required: ExitControls,
        optional: ExitControls,
    ) -> Result<ExitControls, ControlError> {
        adjust(
            self.exit_msr(),
            ControlKind::Exit,
            required.bits(),
            optional.bits(),
        )
        .map(ExitControls::from_bits_retain)
    }

    /// VM-entry controls (SDM A.5).
    pub fn adjust_entry(
        &self,
        required: EntryControls,
        optional: EntryControls,
    ) -> Result<EntryControls, ControlError> {
        adjust(
            self.entry_msr(),
            ControlKind::Entry,
            required.bits(),
            optional.bits(),
        )
        .map(EntryControls::from_bits_retain)
    }

    /// VM-function controls (SDM A.11): IA32_VMX_VMFUNC is a plain allowed-1 bitmap with no
    /// must-be-one bits.
    pub fn adjust_vmfunc(&self, required: VmFuncControls) -> Result<VmFuncControls, ControlError> {
        let missing = required.bits() & !self.vmfunc;
        if missing != 0 {
            return Err(ControlError {
                kind: ControlKind::VmFunc,
                missing,
            });
        }
        Ok(required)
    }

    /// Feature summary derived from the allowed-1 settings and IA32_VMX_EPT_VPID_CAP.
    pub fn features(&self) -> VmxFeatures {
        let primary = (self.procbased_msr() >> 32) as u32;
        let primary = PrimaryControls::from_bits_retain(primary);
        let secondary = SecondaryControls::from_bits_retain((self.procbased2 >> 32) as u32);
        let pin = PinbasedControls::from_bits_retain((self.pinbased_msr() >> 32) as u32);
        let ept = secondary.contains(SecondaryControls::ENABLE_EPT);
        let vpid = secondary.contains(SecondaryControls::ENABLE_VPID);
        let vmfunc = secondary.contains(SecondaryControls::ENABLE_VM_FUNCTIONS);
        let ept_cap = |bit: u64| ept && self.ept_vpid_cap & bit != 0;
        let vpid_cap = |bit: u64| vpid && self.ept_vpid_cap & bit != 0;
        let eptp_switching = vmfunc && self.vmfunc & VmFuncControls::EPTP_SWITCHING.bits() != 0;
        VmxFeatures {
            ept,
            vpid,
            unrestricted_guest: secondary.contains(SecondaryControls::UNRESTRICTED_GUEST),
            vmfunc,
            eptp_switching,
            eptp_list_entries: if eptp_switching { EPTP_LIST_ENTRIES } else { 0 },
            ept_violation_ve: secondary.contains(SecondaryControls::EPT_VIOLATION_VE),
            ept_execute_only: ept_cap(EPT_EXECUTE_ONLY),
            ept_2m_pages: ept_cap(EPT_2M),
            ept_1g_pages: ept_cap(EPT_1G),
            ept_wb: ept_cap(EPT_WB),
            ept_4level_walk: ept_cap(EPT_WALK_4),
            ept_ad_bits: ept_cap(EPT_AD),
            invept: ept_cap(EPT_INVEPT),
            invept_single_context: ept_cap(EPT_INVEPT) && ept_cap(EPT_INVEPT_SINGLE),
            invept_all_context: ept_cap(EPT_INVEPT) && ept_cap(EPT_INVEPT_ALL),
            invvpid: vpid_cap(VPID_INVVPID),
            invvpid_single_context: vpid_cap(VPID_INVVPID) && vpid_cap(VPID_INVVPID_SINGLE),
            invvpid_all_context: vpid_cap(VPID_INVVPID) && vpid_cap(VPID_INVVPID_ALL),
            vmcs_shadowing: secondary.contains(SecondaryControls::VMCS_SHADOWING),
            msr_bitmaps: primary.contains(PrimaryControls::USE_MSR_BITMAPS),
            io_bitmaps: primary.contains(PrimaryControls::USE_IO_BITMAPS),
            secondary_controls: primary.contains(PrimaryControls::SECONDARY_CONTROLS),
            true_controls: self.true_controls(),
            preemption_timer: pin.contains(PinbasedControls::VMX_PREEMPTION_TIMER),
            mode_based_execute: secondary.contains(SecondaryControls::MODE_BASED_EPT),
        }
    }

    /// `value` with the CR0 bits fixed by IA32_VMX_CR0_FIXED0/1 (SDM A.7). With "unrestricted guest",
    /// PE and PG may be 0 (SDM 27.3.1.1), so they are left as given.
    pub const fn fix_cr0(&self, value: u64, unrestricted_guest: bool) -> u64 {
        (value | self.cr0_must_be_one(unrestricted_guest)) & self.cr0_fixed1
    }

    /// `value` with the CR4 bits fixed by IA32_VMX_CR4_FIXED0/1 (SDM A.8).
    pub const fn fix_cr4(&self, value: u64) -> u64 {
        (value | self.cr4_fixed0) & self.cr4_fixed1
    }

    /// True if `value` satisfies IA32_VMX_CR0_FIXED0/1 (SDM A.7) and, as VM entry checks, does not set
    /// PG without PE (SDM 27.3.1.1).
    pub const fn cr0_valid(&self, value: u64, unrestricted_guest: bool) -> bool {
        let must = self.cr0_must_be_one(unrestricted_guest);
        value & must == must
            && value & !self.cr0_fixed1 == 0
            && !(value & CR0_PG != 0 && value & CR0_PE == 0)
    }

    /// True if `value` satisfies IA32_VMX_CR4_FIXED0/1 (SDM A.8).
    pub const fn cr4_valid(&self, value: u64) -> bool {
        value & self.cr4_fixed0 == self.cr4_fixed0 && value & !self.cr4_fixed1 == 0
    }

    const fn cr0_must_be_one(&self, unrestricted_guest: bool) -> u64 {
        if unrestricted_guest {
            self.cr0_fixed0 & !(CR0_PE | CR0_PG)
        } else {
            self.cr0_fixed0
        }
    }
}

fn adjust(
    cap_msr: u64,
    kind: ControlKind,
    required: u32,
    optional: u32,
) -> Result<u32, ControlError> {
    adjust_controls(cap_msr, required, optional).map_err(|missing| ControlError {
        kind,
        missing: missing.into(),
    })
}

/// What this processor's VMX supports, derived from [`VmxCapabilities`].
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
#[allow(clippy::struct_excessive_bools)] // A flat list of capability bits is what this is.
pub struct VmxFeatures {
    /// "Enable EPT" may be 1.
    pub ept: bool,
    /// "Enable VPID" may be 1.
    pub vpid: bool,
    /// "Unrestricted guest" may be 1.
    pub unrestricted_guest: bool,
    /// "Enable VM functions" may be 1.
    pub vmfunc: bool,
    /// VM function 0 (EPTP switching) is available.
    pub eptp_switching: bool,
    /// Entries in the EPTP list when EPTP switching is available, else 0 (the list size is fixed by
    /// the SDM, not reported by an MSR).
    pub eptp_list_entries: u16,
    /// "EPT-violation #VE" may be 1.
    pub ept_violation_ve: bool,
    /// EPT entries may be execute-only.
    pub ept_execute_only: bool,
    /// EPT PDEs may map 2-MByte pages.
    pub ept_2m_pages: bool,
    /// EPT PDPTEs may map 1-GByte pages.
    pub ept_1g_pages: bool,
    /// The EPT paging structures may use write-back memory type.
    pub ept_wb: bool,
    /// 4-level EPT page walks are supported.
    pub ept_4level_walk: bool,
    /// EPT accessed and dirty flags are supported.
    pub ept_ad_bits: bool,
    /// INVEPT is supported.
    pub invept: bool,
    /// Single-context INVEPT is supported.
    pub invept_single_context: bool,
    /// All-context INVEPT is supported.
    pub invept_all_context: bool,
    /// INVVPID is supported.
    pub invvpid: bool,
    /// Single-context INVVPID is supported.
    pub invvpid_single_context: bool,
    /// All-context INVVPID is supported.
    pub invvpid_all_context: bool,
    /// "VMCS shadowing" may be 1.
    pub vmcs_shadowing: bool,
    /// "Use MSR bitmaps" may be 1.
    pub msr_bitmaps: bool,
    /// "Use I/O bitmaps" may be 1.
    pub io_bitmaps: bool,
    /// "Activate secondary controls" may be 1.
    pub secondary_controls: bool,
    /// The TRUE_* capability MSRs exist.
    pub true_controls: bool,
    /// "Activate VMX-preemption timer" may be 1.
    pub preemption_timer: bool,
    /// "Mode-based execute control for EPT" may be 1 (separate supervisor and user execute rights).
    pub mode_based_execute: bool,
}

impl fmt::Display for VmxFeatures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let items = [
            ("EPT", self.ept),
            ("VPID", self.vpid),
            ("unrestricted", self.unrestricted_guest),
            ("VMFUNC", self.vmfunc),
            ("EPTP-switching", self.eptp_switching),
            ("#VE", self.ept_violation_ve),
            ("XO", self.ept_execute_only),
            ("2M", self.ept_2m_pages),
            ("1G", self.ept_1g_pages),
            ("WB", self.ept_wb),
            ("4-level", self.ept_4level_walk),
            ("A/D", self.ept_ad_bits),
            ("INVEPT", self.invept),
            ("INVEPT-single", self.invept_single_context),
            ("INVEPT-all", self.invept_all_context),
            ("INVVPID", self.invvpid),
            ("INVVPID-single", self.invvpid_single_context),
            ("INVVPID-all", self.invvpid_all_context),
            ("shadow-VMCS", self.vmcs_shadowing),
            ("MSR-bitmaps", self.msr_bitmaps),
            ("IO-bitmaps", self.io_bitmaps),
            ("secondary", self.secondary_controls),
            ("true-ctls", self.true_controls),
            ("preempt-timer", self.preemption_timer),
            ("MBEC", self.mode_based_execute),
        ];
        for (i, (name, on)) in items.iter().enumerate() {
            let sep = if i == 0 { "" } else { " " };
            write!(f, "{sep}{name}={}", if *on { "yes" } else { "no" })?;
        }
        write!(f, " EPTP-list={}", self.eptp_list_entries)
    }
}

#[cfg(test)]
mod tests {
    use std::vec::Vec;

    use super::*;

    const fn cap(allowed0: u32, allowed1: u32) -> u64 {
        (allowed1 as u64) << 32 | allowed0 as u64
    }

    /// A recorded set of MSR values; unknown MSRs read as a poison value the tests can spot.
    struct FakeMsrs(&'static [(u32, u64)]);

    impl FakeMsrs {
        fn read(&self, log: &mut Vec<u32>) -> VmxCapabilities {
            VmxCapabilities::read(|index| {
                log.push(index);
                self.0
                    .iter()
                    .find(|(i, _)| *i == index)
                    .map_or(0xDEAD, |(_, v)| *v)
            })
        }
    }

    const BASE: u32 = 0x480;
    const PRIMARY_ALL: u32 = 0xFFFF_FFFF;
    const SECONDARY_EPT_VPID_VMFUNC: u32 = (1 << 1) | (1 << 5) | (1 << 7) | (1 << 13) | (1 << 18);

    /// A processor with everything this hypervisor wants.
    static FULL: FakeMsrs = FakeMsrs(&[
        (0x480, (1 << 55) | (6 << 50) | (0x1000 << 32) | 0x12),
        (0x481, cap(0x16, 0x7F)),
        (0x482, cap(0x0401_E172, PRIMARY_ALL)),
        (0x483, cap(0x0003_6DFF, 0x00FF_FFFF)),
        (0x484, cap(0x0000_11FF, 0x0003_FFFF)),
        (0x485, 0x5),
        (0x486, 0x8000_0021),
        (0x487, 0xFFFF_FFFF),
        (0x488, 0x2000),
        (0x489, 0x003F_FFFF),
        (0x48A, 0x2E),
        (0x48B, cap(0, SECONDARY_EPT_VPID_VMFUNC)),
        (
            0x48C,
            EPT_EXECUTE_ONLY
                | EPT_WALK_4
                | EPT_WB
                | EPT_2M
                | EPT_INVEPT
                | EPT_AD
                | EPT_INVEPT_SINGLE
                | EPT_INVEPT_ALL
                | VPID_INVVPID
                | VPID_INVVPID_ALL,
        ),
        (0x48D, cap(0x16, 0x7F)),
        (0x48E, cap(0x0400_6172, PRIMARY_ALL)),
        (0x48F, cap(0x0003_6DFB, 0x00FF_FFFF)),
        (0x490, cap(0x0000_11FB, 0x0003_FFFF)),
        (0x491, 1),
    ]);

    #[test]
    fn reads_every_msr_when_all_exist() {
        let mut log = Vec::new();
        let caps = FULL.read(&mut log);
        let expected: Vec<u32> = (BASE..=0x491).collect();
        let mut sorted = log.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, expected);
        assert_eq!(caps.revision_id(), 0x12);
        assert_eq!(caps.vmcs_region_size(), 0x1000);
        assert_eq!(caps.preemption_timer_rate(), 5);
        assert_eq!(caps.max_vmcs_index(), 0x17);
        assert_eq!(caps.raw_msr(0x491), Some(1));
        assert_eq!(caps.raw_msr(0x3A), None);
    }

    #[test]
    fn skips_conditional_msrs_that_do_not_exist() {
        // No bit 55, no "activate secondary controls": only 0x480..=0x48A exist.
        static OLD: FakeMsrs = FakeMsrs(&[
            (0x480, (0x400 << 32) | 0x7),
            (0x481, cap(0x16, 0x3F)),
            (0x482, cap(0x0401_E172, 0x7FFF_FFFF)),
        ]);
        let mut log = Vec::new();
        let caps = OLD.read(&mut log);
        assert_eq!(log, (BASE..=0x48A).collect::<Vec<_>>());
        assert_eq!(caps.raw_msr(0x48B), None);
        assert_eq!(caps.raw_msr(0x48D), None);
        assert!(!caps.features().ept);
    }

    #[test]
    fn secondary_without_ept_vpid_or_vmfunc_skips_their_msrs() {
        static MID: FakeMsrs = FakeMsrs(&[
            (0x480, (1 << 55) | (0x1000 << 32) | 0x1),
            (0x482, cap(0, 0x8000_0000)),
            (0x48B, cap(0, 1 << 7)),
        ]);
        let mut log = Vec::new();
        MID.read(&mut log);
        assert!(log.contains(&0x48B));
        assert!(log.contains(&0x490));
        assert!(!log.contains(&0x48C));
        assert!(!log.contains(&0x491));
    }

    #[test]
    fn adjust_uses_true_msrs_when_basic_bit_55_set() {
        let caps = FULL.read(&mut Vec::new());
        // TRUE_PROCBASED allows CR3-load/store exiting (bits 15, 16) to be 0; the legacy MSR does not.
        let primary = caps
            .adjust_primary(PrimaryControls::empty(), PrimaryControls::empty())
            .unwrap();
        assert_eq!(primary.bits(), 0x0400_6172);
        assert!(!primary.contains(PrimaryControls::CR3_LOAD_EXITING));
        let exit = caps
            .adjust_exit(ExitControls::HOST_ADDRESS_SPACE_SIZE, ExitControls::empty())
            .unwrap();
        assert_eq!(exit.bits(), 0x0003_6FFB);
        let entry = caps
            .adjust_entry(EntryControls::IA32E_MODE_GUEST, EntryControls::empty())
            .unwrap();
        assert_eq!(entry.bits(), 0x0000_13FB);
    }

    #[test]
    fn adjust_uses_legacy_msrs_without_bit_55() {
        static LEGACY: FakeMsrs = FakeMsrs(&[
            (0x480, 0x1),
            (0x482, cap(0x0401_E172, 0x7FFF_FFFF)),
            (0x48E, cap(0, 0)),
        ]);
        let caps = LEGACY.read(&mut Vec::new());
        let primary = caps
            .adjust_primary(PrimaryControls::HLT_EXITING, PrimaryControls::empty())
            .unwrap();
        assert_eq!(primary.bits(), 0x0401_E1F2);
    }

    #[test]
    fn pinbased_must_be_one_kept_and_optional_dropped() {
        static PIN: FakeMsrs = FakeMsrs(&[(0x480, 0x1), (0x481, cap(0x16, 0x1F))]);
        let caps = PIN.read(&mut Vec::new());
        let pin = caps
            .adjust_pinbased(
                PinbasedControls::NMI_EXITING,
                PinbasedControls::VIRTUAL_NMIS | PinbasedControls::EXTERNAL_INTERRUPT_EXITING,
            )
            .unwrap();
        assert_eq!(pin.bits(), 0x16 | 0x8 | 0x1);
        assert!(!pin.contains(PinbasedControls::VIRTUAL_NMIS));
    }

    #[test]
    fn required_missing_is_an_error_naming_kind_and_bits() {
        static NO_EPT: FakeMsrs = FakeMsrs(&[
            (0x480, 0x1),
            (0x482, cap(0, 0x8000_0000)),
            (0x48B, cap(0, 1 << 5)),
        ]);
        let caps = NO_EPT.read(&mut Vec::new());
        let err = caps
            .adjust_secondary(
                SecondaryControls::ENABLE_EPT | SecondaryControls::ENABLE_VPID,
                SecondaryControls::empty(),
            )
            .unwrap_err();
        assert_eq!(
            err,
            ControlError {
                kind: ControlKind::Secondary,
                missing: 1 << 1
            }
        );
        assert_eq!(
            caps.adjust_vmfunc(VmFuncControls::EPTP_SWITCHING),
            Err(ControlError {
                kind: ControlKind::VmFunc,
                missing: 1
            })
        );
    }

    #[test]
    fn secondary_without_msr_allows_nothing() {
        static OLD: FakeMsrs = FakeMsrs(&[
            (0x480, 0x1),
            (0x482, cap(0, 0x7FFF_FFFF)),
            (0x48B, cap(0, !0)),
        ]);
        let caps = OLD.read(&mut Vec::new());
        assert_eq!(
            caps.adjust_secondary(SecondaryControls::empty(), SecondaryControls::ENABLE_EPT),
            Ok(SecondaryControls::empty())
        );
        assert!(caps
            .adjust_secondary(SecondaryControls::ENABLE_EPT, SecondaryControls::empty())
            .is_err());
    }

    #[test]
    fn vmfunc_allowed_when_reported() {
        let caps = FULL.read(&mut Vec::new());
        assert_eq!(
            caps.adjust_vmfunc(VmFuncControls::EPTP_SWITCHING),
            Ok(VmFuncControls::EPTP_SWITCHING)
        );
    }

    #[test]
    fn features_of_full_processor() {
        let f = FULL.read(&mut Vec::new()).features();
        assert!(f.ept && f.vpid && f.unrestricted_guest && f.vmfunc && f.eptp_switching);
        assert!(
            f.ept_violation_ve
                && f.ept_2m_pages
                && !f.ept_1g_pages
                && f.ept_wb
                && f.ept_4level_walk
        );
        assert!(f.ept_ad_bits && f.invept && f.invept_single_context && f.invept_all_context);
        assert!(f.invvpid && !f.invvpid_single_context && f.invvpid_all_context);
        assert!(!f.vmcs_shadowing && f.msr_bitmaps && f.io_bitmaps && f.secondary_controls);
        assert!(f.true_controls && f.preemption_timer);
        assert_eq!(f.eptp_list_entries, 512);
        let line = std::format!("{f}");
        assert!(
            line.starts_with(
                "EPT=yes VPID=yes unrestricted=yes VMFUNC=yes EPTP-switching=yes #VE=yes"
            ),
            "{line}"
        );
        assert!(
            line.contains("1G=no") && line.ends_with("EPTP-list=512"),
            "{line}"
        );
    }

    #[test]
    fn cr_fixed_bits() {
        let caps = FULL.read(&mut Vec::new());
        // FIXED0 = PE | NE | PG.
        assert_eq!(caps.fix_cr0(0, false), 0x8000_0021);
        assert_eq!(caps.fix_cr0(0, true), 0x20);
        assert_eq!(caps.fix_cr0(0x1_0000_0000, false), 0x8000_0021);
        assert!(caps.cr0_valid(0x8000_0031, false));
        assert!(!caps.cr0_valid(0x20, false));
        assert!(caps.cr0_valid(0x20, true));
        assert!(!caps.cr0_valid(0x8000_0020, true), "PG without PE");
        assert!(!caps.cr0_valid(0x1_8000_0021, false));
        // FIXED0 = VMXE.
        assert_eq!(caps.fix_cr4(0x20), 0x2020);
        assert_eq!(caps.fix_cr4(0x8000_0000), 0x2000);
        assert!(caps.cr4_valid(0x2020));
        assert!(!caps.cr4_valid(0x20));
        assert!(!caps.cr4_valid(0x0040_2000));
    }
}
