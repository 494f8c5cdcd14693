//! Exit qualifications (SDM 28.2.1 "Basic VM-Exit Information") and the interruption-information
//! format (SDM 25.8.3, 25.9.2, 25.9.3).

use core::fmt;

/// Defines one `const fn name(self) -> bool` per bit.
macro_rules! bits {
    ($( $(#[$meta:meta])* $name:ident = $bit:literal; )*) => {
        $(
            $(#[$meta])*
            pub const fn $name(self) -> bool {
                (self.0 >> $bit) & 1 != 0
            }
        )*
    };
}

/// Exit qualification for EPT violations (SDM 28.2.1, table "Exit Qualification for EPT
/// Violations").
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub struct EptViolationQualification(u64);

impl EptViolationQualification {
    /// Wraps the exit-qualification value.
    pub const fn from_raw(value: u64) -> Self {
        Self(value)
    }

    /// The exit-qualification value.
    pub const fn raw(self) -> u64 {
        self.0
    }

    bits! {
        /// Bit 0: the access was a data read.
        read = 0;
        /// Bit 1: the access was a data write.
        write = 1;
        /// Bit 2: the access was an instruction fetch.
        fetch = 2;
        /// Bit 3: the guest-physical address was readable (AND of the read bits of the EPT entries).
        readable = 3;
        /// Bit 4: the guest-physical address was writable.
        writable = 4;
        /// Bit 5: the guest-physical address was executable (for supervisor-mode linear addresses
        /// when mode-based execute control is on).
        executable = 5;
        /// Bit 6: the guest-physical address was executable for user-mode linear addresses
        /// (mode-based execute control only).
        user_executable = 6;
        /// Bit 7: the guest-linear-address field is valid.
        gla_valid = 7;
        /// Bit 12: the violation was caused by an IRET that unblocked NMIs (virtual NMIs on).
        nmi_unblocking = 12;
    }

    /// Bit 8 with bit 7 set: the access was to the translation of a linear address, not to a guest
    /// paging-structure entry.
    pub const fn caused_by_translation(self) -> bool {
        self.gla_valid() && (self.0 >> 8) & 1 != 0
    }

    /// Bit 8 clear with bit 7 set: the access was to a guest paging-structure entry during a walk.
    pub const fn caused_by_paging_walk(self) -> bool {
        self.gla_valid() && (self.0 >> 8) & 1 == 0
    }
}

/// Exit qualification for I/O instructions (SDM 28.2.1, table "Exit Qualification for I/O
/// Instructions").
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub struct IoQualification(u64);

impl IoQualification {
    /// Wraps the exit-qualification value.
    pub const fn from_raw(value: u64) -> Self {
        Self(value)
    }

    /// The exit-qualification value.
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// Access size in bytes from bits 2:0 (0 = 1 byte, 1 = 2 bytes, 3 = 4 bytes).
    pub const fn size(self) -> u8 {
        (self.0 & 0b111) as u8 + 1
    }

    bits! {
        /// Bit 3: IN/INS (else OUT/OUTS).
        is_in = 3;
        /// Bit 4: string instruction (INS/OUTS).
        is_string = 4;
        /// Bit 5: REP prefixed.
        is_rep = 5;
        /// Bit 6: the port was an immediate operand (else DX).
        immediate_operand = 6;
    }

    /// Port number, bits 31:16.
    pub const fn port(self) -> u16 {
        (self.0 >> 16) as u16
    }
}

/// How a control register was accessed, bits 5:4 of [`CrAccessQualification`].
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum CrAccessType {
    /// MOV to CR.
    MovToCr = 0,
    /// MOV from CR.
    MovFromCr = 1,
    /// CLTS.
    Clts = 2,
    /// LMSW.
    Lmsw = 3,
}

/// General-purpose register in the SDM's encoding order (SDM 28.2.1, table "Exit Qualification for
/// Control-Register Accesses", bits 11:8).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash, PartialOrd, Ord)]
#[allow(missing_docs)]
pub enum Gpr {
    Rax = 0,
    Rcx = 1,
    Rdx = 2,
    Rbx = 3,
    Rsp = 4,
    Rbp = 5,
    Rsi = 6,
    Rdi = 7,
    R8 = 8,
    R9 = 9,
    R10 = 10,
    R11 = 11,
    R12 = 12,
    R13 = 13,
    R14 = 14,
    R15 = 15,
}

impl Gpr {
    const ALL: [Self; 16] = [
        Self::Rax,
        Self::Rcx,
        Self::Rdx,
        Self::Rbx,
        Self::Rsp,
        Self::Rbp,
        Self::Rsi,
        Self::Rdi,
        Self::R8,
        Self::R9,
        Self::R10,
        Self::R11,
        Self::R12,
        Self::R13,
        Self::R14,
        Self::R15,
    ];

    /// The register with SDM number `n & 0xF`.
    pub const fn from_number(n: u8) -> Self {
        Self::ALL[(n & 0xF) as usize]
    }

    /// The SDM number, 0 (RAX) to 15 (R15).
    pub const fn number(self) -> u8 {
        self as u8
    }
}

/// Exit qualification for control-register accesses (SDM 28.2.1, table "Exit Qualification for
/// Control-Register Accesses").
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub struct CrAccessQualification(u64);

impl CrAccessQualification {
    /// Wraps the exit-qualification value.
    pub const fn from_raw(value: u64) -> Self {
        Self(value)
    }

    /// The exit-qualification value.
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// Control register number, bits 3:0 (0 for CLTS and LMSW).
    pub const fn cr(self) -> u8 {
        (self.0 & 0xF) as u8
    }

    /// Access type, bits 5:4.
    pub const fn access_type(self) -> CrAccessType {
        match (self.0 >> 4) & 0b11 {
            0 => CrAccessType::MovToCr,
            1 => CrAccessType::MovFromCr,
            2 => CrAccessType::Clts,
            _ => CrAccessType::Lmsw,
        }
    }

    /// Bit 6: the LMSW operand was in memory (else a register).
    pub const fn lmsw_memory_operand(self) -> bool {
        (self.0 >> 6) & 1 != 0
    }

    /// Source or destination register of MOV CR, bits 11:8.
    pub const fn gpr(self) -> Gpr {
        Gpr::from_number((self.0 >> 8) as u8)
    }

    /// LMSW source data, bits 31:16.
    pub const fn lmsw_source_data(self) -> u16 {
        (self.0 >> 16) as u16
    }
}

/// Interruption type, bits 10:8 of [`InterruptionInfo`] (SDM 25.8.3, table "Format of the VM-Entry
/// Interruption-Information Field").
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum InterruptionType {
    /// External interrupt.
    ExternalInterrupt = 0,
    /// Type 1, reserved by the SDM.
    Reserved = 1,
    /// Non-maskable interrupt.
    Nmi = 2,
    /// Hardware exception (faults and aborts, and #DB/#BP/#OF not from INT1/INT3/INTO).
    HardwareException = 3,
    /// Software interrupt (INT n).
    SoftwareInterrupt = 4,
    /// Privileged software exception (INT1).
    PrivilegedSoftwareException = 5,
    /// Software exception (INT3, INTO).
    SoftwareException = 6,
    /// Other event (MTF injection).
    Other = 7,
}

impl InterruptionType {
    const fn from_bits(bits: u32) -> Self {
        match bits & 0b111 {
            0 => Self::ExternalInterrupt,
            1 => Self::Reserved,
            2 => Self::Nmi,
            3 => Self::HardwareException,
            4 => Self::SoftwareInterrupt,
            5 => Self::PrivilegedSoftwareException,
            6 => Self::SoftwareException,
            _ => Self::Other,
        }
    }
}

/// The interruption-information format shared by the VM-entry interruption-information field
/// (SDM 25.8.3), the VM-exit interruption information (SDM 25.9.2) and the IDT-vectoring information
/// (SDM 25.9.3).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct InterruptionInfo(u32);

impl InterruptionInfo {
    const TYPE_SHIFT: u32 = 8;
    const ERROR_CODE_VALID: u32 = 1 << 11;
    const NMI_UNBLOCKING: u32 = 1 << 12;
    const VALID: u32 = 1 << 31;

    const fn event(vector: u8, kind: InterruptionType, error_code: bool) -> Self {
        let ec = if error_code {
            Self::ERROR_CODE_VALID
        } else {
            0
        };
        Self(Self::VALID | ec | ((kind as u32) << Self::TYPE_SHIFT) | vector as u32)
    }

    /// Wraps a value read from one of the three fields.
    pub const fn from_raw(value: u32) -> Self {
        Self(value)
    }

    /// The value to write to the VM-entry interruption-information field.
    pub const fn raw(self) -> u32 {
        self.0
    }

    /// A hardware exception to inject; write the error code to the VM-entry exception error code field
    /// when `has_error_code` (see [`exception_has_error_code`]).
    pub const fn hardware_exception(vector: u8, has_error_code: bool) -> Self {
        Self::event(vector, InterruptionType::HardwareException, has_error_code)
    }

    /// A software exception (#BP from INT3, #OF from INTO) to inject; it needs the VM-entry instruction
    /// length.
    pub const fn software_exception(vector: u8) -> Self {
        Self::event(vector, InterruptionType::SoftwareException, false)
    }

    /// An NMI (vector 2) to inject.
    pub const fn nmi() -> Self {
        Self::event(2, InterruptionType::Nmi, false)
    }

    /// An external interrupt to inject.
    pub const fn external_interrupt(vector: u8) -> Self {
        Self::event(vector, InterruptionType::ExternalInterrupt, false)
    }

    /// Vector, bits 7:0.
    pub const fn vector(self) -> u8 {
        self.0 as u8
    }

    /// Interruption type, bits 10:8.
    pub const fn interruption_type(self) -> InterruptionType {
        InterruptionType::from_bits(self.0 >> Self::TYPE_SHIFT)
    }

    /// Bit 11: an error code is delivered (entry) or was saved (exit).
    pub const fn error_code_valid(self) -> bool {
        self.0 & Self::ERROR_CODE_VALID != 0
    }

    /// Bit 12 (exit information only): NMI unblocking due to IRET.
    pub const fn nmi_unblocking(self) -> bool {
        self.0 & Self::NMI_UNBLOCKING != 0
    }

    /// Bit 31: the field holds an event.
    pub const fn valid(self) -> bool {
        self.0 & Self::VALID != 0
    }
}

impl fmt::Debug for InterruptionInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InterruptionInfo")
            .field("valid", &self.valid())
            .field("vector", &self.vector())
            .field("type", &self.interruption_type())
            .field("error_code_valid", &self.error_code_valid())
            .field("nmi_unblocking", &self.nmi_unblocking())
            .finish()
    }
}

/// True for the exceptions that push an error code: #DF (8), #TS (10), #NP (11), #SS (12), #GP (13),
/// #PF (14), #AC (17) and #CP (21) (SDM Vol. 3A 6.15, table "Exceptions and Interrupts"). VM entry
/// requires "deliver error code" to match for hardware exceptions in protected mode (SDM 27.2.1.3).
pub const fn exception_has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10 | 11 | 12 | 13 | 14 | 17 | 21)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ept_violation_write_to_read_only_page() {
        // Data write, GPA readable+executable, linear address valid and translated.
        let q = EptViolationQualification::from_raw(0x1AA);
        assert!(!q.read() && q.write() && !q.fetch());
        assert!(q.readable() && !q.writable() && q.executable() && !q.user_executable());
        assert!(q.gla_valid() && q.caused_by_translation() && !q.caused_by_paging_walk());
        assert!(!q.nmi_unblocking());
        assert_eq!(q.raw(), 0x1AA);
    }

    #[test]
    fn ept_violation_fetch_during_walk_with_nmi_unblocking() {
        let q = EptViolationQualification::from_raw((1 << 12) | (1 << 7) | (1 << 6) | (1 << 2));
        assert!(q.fetch() && q.user_executable() && q.gla_valid());
        assert!(q.caused_by_paging_walk() && !q.caused_by_translation());
        assert!(q.nmi_unblocking());
        let no_gla = EptViolationQualification::from_raw(1 << 8);
        assert!(!no_gla.caused_by_translation() && !no_gla.caused_by_paging_walk());
    }

    #[test]
    fn io_out_dx_byte() {
        // OUT DX, AL to port 0x3F8.
        let q = IoQualification::from_raw(0x03F8_0000);
        assert_eq!(
            (q.size(), q.is_in(), q.is_string(), q.is_rep()),
            (1, false, false, false)
        );
        assert_eq!(q.port(), 0x3F8);
        assert!(!q.immediate_operand());
    }

    #[test]
    fn io_rep_insd_and_in_imm_word() {
        let q = IoQualification::from_raw(0x0060_0000 | 0b11_1011);
        assert_eq!(
            (q.size(), q.is_in(), q.is_string(), q.is_rep()),
            (4, true, true, true)
        );
        assert_eq!(q.port(), 0x60);
        let q = IoQualification::from_raw(0x0071_0049);
        assert_eq!(
            (q.size(), q.is_in(), q.immediate_operand(), q.port()),
            (2, true, true, 0x71)
        );
    }

    #[test]
    fn cr_access_mov_to_cr3_from_r9() {
        let q = CrAccessQualification::from_raw(0x903);
        assert_eq!(q.cr(), 3);
        assert_eq!(q.access_type(), CrAccessType::MovToCr);
        assert_eq!(q.gpr(), Gpr::R9);
        assert_eq!(q.gpr().number(), 9);
    }

    #[test]
    fn cr_access_mov_from_cr4_clts_lmsw() {
        let q = CrAccessQualification::from_raw(0x014);
        assert_eq!(
            (q.cr(), q.access_type(), q.gpr()),
            (4, CrAccessType::MovFromCr, Gpr::Rax)
        );
        assert_eq!(
            CrAccessQualification::from_raw(0x20).access_type(),
            CrAccessType::Clts
        );
        let q = CrAccessQualification::from_raw(0x000F_0070);
        assert_eq!(q.access_type(), CrAccessType::Lmsw);
        assert!(q.lmsw_memory_operand());
        assert_eq!(q.lmsw_source_data(), 0xF);
    }

    #[test]
    fn interruption_info_decoding() {
        // #PF with error code, as saved on exit with NMI unblocking.
        let info = InterruptionInfo::from_raw(0x8000_1B0E);
        assert!(info.valid() && info.error_code_valid() && info.nmi_unblocking());
        assert_eq!(info.vector(), 14);
        assert_eq!(
            info.interruption_type(),
            InterruptionType::HardwareException
        );
        assert!(!InterruptionInfo::from_raw(0x30E).valid());
        for t in 0..8u32 {
            assert_eq!(
                InterruptionInfo::from_raw(t << 8).interruption_type() as u32,
                t
            );
        }
    }

    #[test]
    fn interruption_info_constructors() {
        assert_eq!(
            InterruptionInfo::hardware_exception(13, true).raw(),
            0x8000_0B0D
        );
        assert_eq!(
            InterruptionInfo::hardware_exception(6, false).raw(),
            0x8000_0306
        );
        assert_eq!(InterruptionInfo::software_exception(3).raw(), 0x8000_0603);
        assert_eq!(InterruptionInfo::nmi().raw(), 0x8000_0202);
        assert_eq!(
            InterruptionInfo::external_interrupt(0x20).raw(),
            0x8000_0020
        );
    }

    #[test]
    fn error_code_vectors() {
        let with: std::vec::Vec<u8> = (0..=255).filter(|v| exception_has_error_code(*v)).collect();
        assert_eq!(with, [8, 10, 11, 12, 13, 14, 17, 21]);
    }
}
