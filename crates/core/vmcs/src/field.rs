//! VMCS component encodings (SDM 25.11.2 "VMREAD, VMWRITE, and Encodings of VMCS Fields").

use core::fmt;

/// Width of a VMCS field, bits 14:13 of its encoding (SDM 25.11.2, table "Structure of VMCS Component
/// Encoding").
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum FieldWidth {
    /// 16-bit field.
    Bits16,
    /// 64-bit field; its HIGH half has its own encoding (access type bit 0 set).
    Bits64,
    /// 32-bit field.
    Bits32,
    /// Natural-width field: 64 bits on processors that support Intel 64.
    Natural,
}

/// Area of the VMCS a field belongs to, bits 11:10 of its encoding (SDM 25.11.2).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum FieldKind {
    /// VM-execution, VM-exit and VM-entry control fields.
    Control,
    /// Read-only VM-exit information fields (the SDM's "VM-exit information" type).
    ReadOnly,
    /// Guest-state area.
    Guest,
    /// Host-state area.
    Host,
}

/// The 32-bit encoding of a VMCS component, as used by VMREAD and VMWRITE (SDM 25.11.2, table
/// "Structure of VMCS Component Encoding").
///
/// Bit 0 is the access type (0 = full, 1 = high half of a 64-bit field), bits 9:1 the index, bits
/// 11:10 the [`FieldKind`], bits 14:13 the [`FieldWidth`]. Named constants live in [`fields`](crate::fields).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash, PartialOrd, Ord)]
pub struct VmcsField(u32);

impl VmcsField {
    const ACCESS_HIGH: u32 = 1 << 0;
    /// Bit 12 and bits 31:15 are reserved and must be 0.
    const RESERVED: u32 = !0x6FFF;

    /// Wraps a raw encoding.
    pub const fn new(encoding: u32) -> Self {
        Self(encoding)
    }

    /// The encoding, as the VMREAD/VMWRITE operand.
    pub const fn raw(self) -> u32 {
        self.0
    }

    /// Width from bits 14:13.
    pub const fn width(self) -> FieldWidth {
        match (self.0 >> 13) & 0b11 {
            0 => FieldWidth::Bits16,
            1 => FieldWidth::Bits64,
            2 => FieldWidth::Bits32,
            _ => FieldWidth::Natural,
        }
    }

    /// Area from bits 11:10.
    pub const fn kind(self) -> FieldKind {
        match (self.0 >> 10) & 0b11 {
            0 => FieldKind::Control,
            1 => FieldKind::ReadOnly,
            2 => FieldKind::Guest,
            _ => FieldKind::Host,
        }
    }

    /// Index from bits 9:1.
    pub const fn index(self) -> u16 {
        ((self.0 >> 1) & 0x1FF) as u16
    }

    /// True for the HIGH half of a 64-bit field (access type, bit 0).
    pub const fn is_high(self) -> bool {
        matches!(self.width(), FieldWidth::Bits64) && self.0 & Self::ACCESS_HIGH != 0
    }

    /// The HIGH half of a 64-bit field, which 32-bit software uses for bits 63:32.
    pub const fn high(self) -> Option<Self> {
        match self.width() {
            FieldWidth::Bits64 => Some(Self(self.0 | Self::ACCESS_HIGH)),
            _ => None,
        }
    }

    /// True if no reserved bit is set and only 64-bit fields use the HIGH access type.
    pub const fn is_well_formed(self) -> bool {
        self.0 & Self::RESERVED == 0
            && (self.0 & Self::ACCESS_HIGH == 0 || matches!(self.width(), FieldWidth::Bits64))
    }
}

impl fmt::Display for VmcsField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({:#06x})", field_name(*self), self.0)
    }
}

/// Declares typed constants from the `x86` crate's raw encodings, the table of all of them, and the
/// name lookup, from one list so the three cannot drift apart.
macro_rules! vmcs_fields {
    ($( $(#[$group_meta:meta])* $group:ident { $( $name:ident, )* } )*) => {
        $(
            $(#[$group_meta])*
            pub mod $group {
                use crate::field::VmcsField;
                $(
                    #[doc = concat!("`", stringify!($group), "::", stringify!($name),
                        "`; the encoding comes from `x86::vmx::vmcs`.")]
                    pub const $name: VmcsField = VmcsField::new(x86::vmx::vmcs::$group::$name);
                )*
            }
        )*

        /// Every field above, in declaration order (controls, guest, host, exit information).
        pub static ALL: &[VmcsField] = ALL_FIELDS;

        pub(crate) const ALL_FIELDS: &[VmcsField] = &[ $( $( $group::$name, )* )* ];

        pub(crate) const fn name_of(field: VmcsField) -> Option<&'static str> {
            match field.raw() {
                $( $( x86::vmx::vmcs::$group::$name =>
                    Some(concat!(stringify!($group), "::", stringify!($name))), )* )*
                _ => None,
            }
        }
    };
}

/// Typed constants for every VMCS field the `x86` crate defines (SDM Appendix B "Field Encoding in
/// VMCS"), grouped and named like `x86::vmx::vmcs`. 64-bit fields keep the `_FULL`/`_HIGH` pair.
pub mod fields {
    use super::VmcsField;

    vmcs_fields! {
        /// VM-execution, VM-exit and VM-entry control fields (SDM 25.6-25.8).
        control {
            VPID,
            POSTED_INTERRUPT_NOTIFICATION_VECTOR,
            EPTP_INDEX,
            IO_BITMAP_A_ADDR_FULL,
            IO_BITMAP_A_ADDR_HIGH,
            IO_BITMAP_B_ADDR_FULL,
            IO_BITMAP_B_ADDR_HIGH,
            MSR_BITMAPS_ADDR_FULL,
            MSR_BITMAPS_ADDR_HIGH,
            VMEXIT_MSR_STORE_ADDR_FULL,
            VMEXIT_MSR_STORE_ADDR_HIGH,
            VMEXIT_MSR_LOAD_ADDR_FULL,
            VMEXIT_MSR_LOAD_ADDR_HIGH,
            VMENTRY_MSR_LOAD_ADDR_FULL,
            VMENTRY_MSR_LOAD_ADDR_HIGH,
            EXECUTIVE_VMCS_PTR_FULL,
            EXECUTIVE_VMCS_PTR_HIGH,
            PML_ADDR_FULL,
            PML_ADDR_HIGH,
            TSC_OFFSET_FULL,
            TSC_OFFSET_HIGH,
            VIRT_APIC_ADDR_FULL,
            VIRT_APIC_ADDR_HIGH,
            APIC_ACCESS_ADDR_FULL,
            APIC_ACCESS_ADDR_HIGH,
            POSTED_INTERRUPT_DESC_ADDR_FULL,
            POSTED_INTERRUPT_DESC_ADDR_HIGH,
            VM_FUNCTION_CONTROLS_FULL,
            VM_FUNCTION_CONTROLS_HIGH,
            EPTP_FULL,
            EPTP_HIGH,
            EOI_EXIT0_FULL,
            EOI_EXIT0_HIGH,
            EOI_EXIT1_FULL,
            EOI_EXIT1_HIGH,
            EOI_EXIT2_FULL,
            EOI_EXIT2_HIGH,
            EOI_EXIT3_FULL,
            EOI_EXIT3_HIGH,
            EPTP_LIST_ADDR_FULL,
            EPTP_LIST_ADDR_HIGH,
            VMREAD_BITMAP_ADDR_FULL,
            VMREAD_BITMAP_ADDR_HIGH,
            VMWRITE_BITMAP_ADDR_FULL,
            VMWRITE_BITMAP_ADDR_HIGH,
            VIRT_EXCEPTION_INFO_ADDR_FULL,
            VIRT_EXCEPTION_INFO_ADDR_HIGH,
            XSS_EXITING_BITMAP_FULL,
            XSS_EXITING_BITMAP_HIGH,
            ENCLS_EXITING_BITMAP_FULL,
            ENCLS_EXITING_BITMAP_HIGH,
            SUBPAGE_PERM_TABLE_PTR_FULL,
            SUBPAGE_PERM_TABLE_PTR_HIGH,
            TSC_MULTIPLIER_FULL,
            TSC_MULTIPLIER_HIGH,
            PINBASED_EXEC_CONTROLS,
            PRIMARY_PROCBASED_EXEC_CONTROLS,
            EXCEPTION_BITMAP,
            PAGE_FAULT_ERR_CODE_MASK,
            PAGE_FAULT_ERR_CODE_MATCH,
            CR3_TARGET_COUNT,
            VMEXIT_CONTROLS,
            VMEXIT_MSR_STORE_COUNT,
            VMEXIT_MSR_LOAD_COUNT,
            VMENTRY_CONTROLS,
            VMENTRY_MSR_LOAD_COUNT,
            VMENTRY_INTERRUPTION_INFO_FIELD,
            VMENTRY_EXCEPTION_ERR_CODE,
            VMENTRY_INSTRUCTION_LEN,
            TPR_THRESHOLD,
            SECONDARY_PROCBASED_EXEC_CONTROLS,
            PLE_GAP,
            PLE_WINDOW,
            CR0_GUEST_HOST_MASK,
            CR4_GUEST_HOST_MASK,
            CR0_READ_SHADOW,
            CR4_READ_SHADOW,
            CR3_TARGET_VALUE0,
            CR3_TARGET_VALUE1,
            CR3_TARGET_VALUE2,
            CR3_TARGET_VALUE3,
        }
        /// Guest-state area (SDM 25.4).
        guest {
            ES_SELECTOR,
            CS_SELECTOR,
            SS_SELECTOR,
            DS_SELECTOR,
            FS_SELECTOR,
            GS_SELECTOR,
            LDTR_SELECTOR,
            TR_SELECTOR,
            INTERRUPT_STATUS,
            PML_INDEX,
            LINK_PTR_FULL,
            LINK_PTR_HIGH,
            IA32_DEBUGCTL_FULL,
            IA32_DEBUGCTL_HIGH,
            IA32_PAT_FULL,
            IA32_PAT_HIGH,
            IA32_EFER_FULL,
            IA32_EFER_HIGH,
            IA32_PERF_GLOBAL_CTRL_FULL,
            IA32_PERF_GLOBAL_CTRL_HIGH,
            PDPTE0_FULL,
            PDPTE0_HIGH,
            PDPTE1_FULL,
            PDPTE1_HIGH,
            PDPTE2_FULL,
            PDPTE2_HIGH,
            PDPTE3_FULL,
            PDPTE3_HIGH,
            IA32_BNDCFGS_FULL,
            IA32_BNDCFGS_HIGH,
            IA32_RTIT_CTL_FULL,
            IA32_RTIT_CTL_HIGH,
            ES_LIMIT,
            CS_LIMIT,
            SS_LIMIT,
            DS_LIMIT,
            FS_LIMIT,
            GS_LIMIT,
            LDTR_LIMIT,
            TR_LIMIT,
            GDTR_LIMIT,
            IDTR_LIMIT,
            ES_ACCESS_RIGHTS,
            CS_ACCESS_RIGHTS,
            SS_ACCESS_RIGHTS,
            DS_ACCESS_RIGHTS,
            FS_ACCESS_RIGHTS,
            GS_ACCESS_RIGHTS,
            LDTR_ACCESS_RIGHTS,
            TR_ACCESS_RIGHTS,
            INTERRUPTIBILITY_STATE,
            ACTIVITY_STATE,
            SMBASE,
            IA32_SYSENTER_CS,
            VMX_PREEMPTION_TIMER_VALUE,
            CR0,
            CR3,
            CR4,
            ES_BASE,
            CS_BASE,
            SS_BASE,
            DS_BASE,
            FS_BASE,
            GS_BASE,
            LDTR_BASE,
            TR_BASE,
            GDTR_BASE,
            IDTR_BASE,
            DR7,
            RSP,
            RIP,
            RFLAGS,
            PENDING_DBG_EXCEPTIONS,
            IA32_SYSENTER_ESP,
            IA32_SYSENTER_EIP,
        }
        /// Host-state area (SDM 25.5).
        host {
            ES_SELECTOR,
            CS_SELECTOR,
            SS_SELECTOR,
            DS_SELECTOR,
            FS_SELECTOR,
            GS_SELECTOR,
            TR_SELECTOR,
            IA32_PAT_FULL,
            IA32_PAT_HIGH,
            IA32_EFER_FULL,
            IA32_EFER_HIGH,
            IA32_PERF_GLOBAL_CTRL_FULL,
            IA32_PERF_GLOBAL_CTRL_HIGH,
            IA32_SYSENTER_CS,
            CR0,
            CR3,
            CR4,
            FS_BASE,
            GS_BASE,
            TR_BASE,
            GDTR_BASE,
            IDTR_BASE,
            IA32_SYSENTER_ESP,
            IA32_SYSENTER_EIP,
            RSP,
            RIP,
        }
        /// Read-only VM-exit information fields (SDM 25.9).
        ro {
            GUEST_PHYSICAL_ADDR_FULL,
            GUEST_PHYSICAL_ADDR_HIGH,
            VM_INSTRUCTION_ERROR,
            EXIT_REASON,
            VMEXIT_INTERRUPTION_INFO,
            VMEXIT_INTERRUPTION_ERR_CODE,
            IDT_VECTORING_INFO,
            IDT_VECTORING_ERR_CODE,
            VMEXIT_INSTRUCTION_LEN,
            VMEXIT_INSTRUCTION_INFO,
            EXIT_QUALIFICATION,
            IO_RCX,
            IO_RSI,
            IO_RDI,
            IO_RIP,
            GUEST_LINEAR_ADDR,
        }
    }
}

/// Name of a known field, such as `"guest::RIP"`, or `"unknown"`.
pub const fn field_name(field: VmcsField) -> &'static str {
    match fields::name_of(field) {
        Some(name) => name,
        None => "unknown",
    }
}

const fn dump_len(all: &[VmcsField]) -> usize {
    let mut n = 0;
    let mut i = 0;
    while i < all.len() {
        if !all[i].is_high() {
            n += 1;
        }
        i += 1;
    }
    n
}

const fn dump_select<const N: usize>(all: &[VmcsField]) -> [VmcsField; N] {
    let mut out = [VmcsField::new(0); N];
    let (mut i, mut n) = (0, 0);
    while i < all.len() {
        if !all[i].is_high() {
            out[n] = all[i];
            n += 1;
        }
        i += 1;
    }
    out
}

/// How many fields [`DUMP_FIELDS`] holds.
pub const DUMP_LEN: usize = dump_len(fields::ALL_FIELDS);

/// Fields worth printing after a failed VM entry: all controls, guest state, host state and exit
/// information, with only the FULL encoding of each 64-bit field (64-bit software reads all 64 bits
/// through it). Some fields exist only on newer processors; a dumper should skip those whose VMREAD
/// fails.
pub static DUMP_FIELDS: &[VmcsField] = &dump_select::<DUMP_LEN>(fields::ALL_FIELDS);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_rip_is_natural_guest() {
        let f = fields::guest::RIP;
        assert_eq!(f.raw(), 0x681E);
        assert_eq!(f.width(), FieldWidth::Natural);
        assert_eq!(f.kind(), FieldKind::Guest);
        assert!(!f.is_high());
        assert_eq!(field_name(f), "guest::RIP");
    }

    #[test]
    fn eptp_is_64bit_control() {
        let f = fields::control::EPTP_FULL;
        assert_eq!(f.raw(), 0x201A);
        assert_eq!(f.width(), FieldWidth::Bits64);
        assert_eq!(f.kind(), FieldKind::Control);
        assert!(!f.is_high());
        assert_eq!(f.high(), Some(fields::control::EPTP_HIGH));
        assert!(fields::control::EPTP_HIGH.is_high());
    }

    #[test]
    fn widths_and_kinds_of_known_encodings() {
        let cases = [
            (
                fields::control::VPID,
                FieldWidth::Bits16,
                FieldKind::Control,
            ),
            (
                fields::control::PINBASED_EXEC_CONTROLS,
                FieldWidth::Bits32,
                FieldKind::Control,
            ),
            (
                fields::ro::EXIT_REASON,
                FieldWidth::Bits32,
                FieldKind::ReadOnly,
            ),
            (
                fields::ro::EXIT_QUALIFICATION,
                FieldWidth::Natural,
                FieldKind::ReadOnly,
            ),
            (
                fields::ro::GUEST_PHYSICAL_ADDR_FULL,
                FieldWidth::Bits64,
                FieldKind::ReadOnly,
            ),
            (
                fields::guest::CS_SELECTOR,
                FieldWidth::Bits16,
                FieldKind::Guest,
            ),
            (
                fields::guest::LINK_PTR_FULL,
                FieldWidth::Bits64,
                FieldKind::Guest,
            ),
            (fields::host::RSP, FieldWidth::Natural, FieldKind::Host),
            (
                fields::host::IA32_SYSENTER_CS,
                FieldWidth::Bits32,
                FieldKind::Host,
            ),
        ];
        for (f, w, k) in cases {
            assert_eq!((f.width(), f.kind()), (w, k), "{f}");
            assert!(f.is_well_formed(), "{f}");
        }
    }

    #[test]
    fn high_only_for_64bit_and_reserved_bits_rejected() {
        assert!(!VmcsField::new(0x4001).is_high());
        assert!(!VmcsField::new(0x4001).is_well_formed());
        assert!(!VmcsField::new(0x1_0000).is_well_formed());
        assert_eq!(fields::guest::RIP.high(), None);
        assert_eq!(fields::guest::RIP.index(), 0xF);
    }

    #[test]
    fn all_fields_well_formed_named_and_unique() {
        for (i, f) in fields::ALL.iter().enumerate() {
            assert!(f.is_well_formed(), "{f}");
            assert_ne!(field_name(*f), "unknown");
            assert!(!fields::ALL[..i].contains(f), "duplicate {f}");
        }
        assert_eq!(field_name(VmcsField::new(0x7FFE)), "unknown");
    }

    #[test]
    fn dump_fields_are_full_encodings_only() {
        let highs = fields::ALL.iter().filter(|f| f.is_high()).count();
        assert_eq!(DUMP_FIELDS.len() + highs, fields::ALL.len());
        assert!(DUMP_FIELDS.iter().all(|f| !f.is_high()));
        for f in [
            fields::control::PINBASED_EXEC_CONTROLS,
            fields::control::EPTP_FULL,
            fields::guest::RIP,
            fields::host::RSP,
            fields::ro::EXIT_REASON,
            fields::ro::VM_INSTRUCTION_ERROR,
        ] {
            assert!(DUMP_FIELDS.contains(&f), "{f}");
        }
        assert!(!DUMP_FIELDS.contains(&fields::control::EPTP_HIGH));
    }
}
