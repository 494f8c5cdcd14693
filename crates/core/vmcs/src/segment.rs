//! Guest segment access rights (SDM 25.4.1 "Guest Register State", table "Format of Access Rights").

/// The 32-bit access-rights field of a guest segment register (SDM 25.4.1, table "Format of Access
/// Rights"): bits 3:0 type, 4 S, 6:5 DPL, 7 P, 12 AVL, 13 L, 14 D/B, 15 G, 16 segment unusable.
///
/// VM entry ties G to the limit (SDM 27.3.1.2): the constructors that set G expect a limit of
/// 0xFFFF_FFFF, those that clear it expect a limit below 1 MByte.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub struct SegmentAccessRights(u32);

impl SegmentAccessRights {
    const S: u32 = 1 << 4;
    const DPL_SHIFT: u32 = 5;
    const P: u32 = 1 << 7;
    const AVL: u32 = 1 << 12;
    const L: u32 = 1 << 13;
    const DB: u32 = 1 << 14;
    const G: u32 = 1 << 15;
    const UNUSABLE: u32 = 1 << 16;

    /// Wraps a raw access-rights value.
    pub const fn from_raw(value: u32) -> Self {
        Self(value)
    }

    /// The value to write to a guest access-rights field.
    pub const fn raw(self) -> u32 {
        self.0
    }

    /// 64-bit ring-0 code segment: type 0xB (execute/read, accessed), S, P, L, G (0xA09B).
    pub const fn code64() -> Self {
        Self(0xB | Self::S | Self::P | Self::L | Self::G)
    }

    /// 32-bit ring-0 code segment: type 0xB (execute/read, accessed), S, P, D/B, G (0xC09B), the CS
    /// a multiboot kernel is entered with.
    pub const fn code32() -> Self {
        Self(0xB | Self::S | Self::P | Self::DB | Self::G)
    }

    /// Flat ring-0 data segment: type 3 (read/write, accessed), S, P, D/B, G (0xC093).
    pub const fn data() -> Self {
        Self(0x3 | Self::S | Self::P | Self::DB | Self::G)
    }

    /// Busy 64-bit TSS: type 0xB, system segment, P (0x8B).
    pub const fn tss_busy64() -> Self {
        Self(0xB | Self::P)
    }

    /// LDT: type 2, system segment, P (0x82).
    pub const fn ldt() -> Self {
        Self(0x2 | Self::P)
    }

    /// Unusable segment (bit 16); VM entry ignores the other bits.
    pub const fn unusable() -> Self {
        Self(Self::UNUSABLE)
    }

    /// The same rights with descriptor privilege level `dpl & 3`.
    pub const fn with_dpl(self, dpl: u8) -> Self {
        Self((self.0 & !(0b11 << Self::DPL_SHIFT)) | (((dpl & 0b11) as u32) << Self::DPL_SHIFT))
    }

    /// Segment type, bits 3:0.
    pub const fn segment_type(self) -> u8 {
        (self.0 & 0xF) as u8
    }

    /// Bit 4: code or data segment (else system).
    pub const fn code_or_data(self) -> bool {
        self.0 & Self::S != 0
    }

    /// Descriptor privilege level, bits 6:5.
    pub const fn dpl(self) -> u8 {
        ((self.0 >> Self::DPL_SHIFT) & 0b11) as u8
    }

    /// Bit 7: present.
    pub const fn present(self) -> bool {
        self.0 & Self::P != 0
    }

    /// Bit 12: available for system software.
    pub const fn avl(self) -> bool {
        self.0 & Self::AVL != 0
    }

    /// Bit 13: 64-bit code segment.
    pub const fn long_mode(self) -> bool {
        self.0 & Self::L != 0
    }

    /// Bit 14: default operation size / big.
    pub const fn default_big(self) -> bool {
        self.0 & Self::DB != 0
    }

    /// Bit 15: granularity (limit in 4-KByte units).
    pub const fn granularity(self) -> bool {
        self.0 & Self::G != 0
    }

    /// Bit 16: segment unusable.
    pub const fn is_unusable(self) -> bool {
        self.0 & Self::UNUSABLE != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constructors_match_conventional_values() {
        assert_eq!(SegmentAccessRights::code64().raw(), 0xA09B);
        assert_eq!(SegmentAccessRights::data().raw(), 0xC093);
        assert_eq!(SegmentAccessRights::tss_busy64().raw(), 0x8B);
        assert_eq!(SegmentAccessRights::ldt().raw(), 0x82);
        assert_eq!(SegmentAccessRights::unusable().raw(), 0x1_0000);
    }

    #[test]
    fn getters_and_dpl() {
        let cs = SegmentAccessRights::code64();
        assert_eq!(cs.segment_type(), 0xB);
        assert!(cs.code_or_data() && cs.present() && cs.long_mode() && cs.granularity());
        assert!(!cs.default_big() && !cs.avl() && !cs.is_unusable());
        let user = SegmentAccessRights::data().with_dpl(3);
        assert_eq!(user.raw(), 0xC0F3);
        assert_eq!(user.dpl(), 3);
        assert_eq!(user.with_dpl(0), SegmentAccessRights::data());
        assert!(!SegmentAccessRights::tss_busy64().code_or_data());
        assert!(SegmentAccessRights::unusable().is_unusable());
    }
}
