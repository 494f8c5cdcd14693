#![doc = include_str!("../README.md")]
#![no_std]
#![deny(unsafe_code)]

use core::fmt;

/// Size of a 4 KiB page, the base translation granule (SDM 4.5, 29.3.2).
pub const PAGE_SIZE: u64 = 4096;
/// Size of a 2 MiB large page.
pub const LARGE_PAGE_SIZE: u64 = 2 * 1024 * 1024;
/// Size of a 1 GiB huge page.
pub const HUGE_PAGE_SIZE: u64 = 1024 * 1024 * 1024;

macro_rules! address_type {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        #[repr(transparent)]
        pub struct $name(u64);

        impl $name {
            /// Wraps a raw address.
            #[must_use]
            pub const fn new(raw: u64) -> Self {
                Self(raw)
            }

            /// The raw value, for hardware registers and table entries.
            #[must_use]
            pub const fn raw(self) -> u64 {
                self.0
            }

            /// `self + offset`, or `None` on overflow.
            #[must_use]
            pub const fn checked_add(self, offset: u64) -> Option<Self> {
                match self.0.checked_add(offset) {
                    Some(v) => Some(Self(v)),
                    None => None,
                }
            }

            /// `self - offset`, or `None` on underflow.
            #[must_use]
            pub const fn checked_sub(self, offset: u64) -> Option<Self> {
                match self.0.checked_sub(offset) {
                    Some(v) => Some(Self(v)),
                    None => None,
                }
            }

            /// Distance from `base` up to `self`, or `None` if `self < base`.
            #[must_use]
            pub const fn offset_from(self, base: Self) -> Option<u64> {
                self.0.checked_sub(base.0)
            }

            /// Rounds down to a multiple of `align` (a power of two).
            #[must_use]
            pub const fn align_down(self, align: u64) -> Self {
                debug_assert!(align.is_power_of_two());
                Self(self.0 & !(align - 1))
            }

            /// Rounds up to a multiple of `align` (a power of two), or `None` on overflow.
            #[must_use]
            pub const fn align_up(self, align: u64) -> Option<Self> {
                debug_assert!(align.is_power_of_two());
                match self.0.checked_add(align - 1) {
                    Some(v) => Some(Self(v & !(align - 1))),
                    None => None,
                }
            }

            /// Whether the address is a multiple of `align` (a power of two).
            #[must_use]
            pub const fn is_aligned(self, align: u64) -> bool {
                self.0 & (align - 1) == 0
            }

            /// Offset inside the 4 KiB page.
            #[must_use]
            pub const fn page_offset(self) -> u64 {
                self.0 & (PAGE_SIZE - 1)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "({:#x})"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }

        impl fmt::LowerHex for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::LowerHex::fmt(&self.0, f)
            }
        }
    };
}

address_type!(
    /// Guest-physical address: what the guest's page tables produce and what EPT translates.
    Gpa,
    "Gpa"
);
address_type!(
    /// Host-physical address: what EPT produces, and what L0 itself uses.
    Hpa,
    "Hpa"
);
address_type!(
    /// Guest-virtual (linear) address: what the guest's page tables translate.
    Gva,
    "Gva"
);

impl Gpa {
    /// The guest frame that holds this address.
    #[must_use]
    pub const fn gfn(self) -> Gfn {
        Gfn(self.0 / PAGE_SIZE)
    }
}

impl Hpa {
    /// The host-physical address of a guest-physical one in an identity-mapped region.
    ///
    /// Only valid where L0 built the EPT as an identity map; callers say so by using this name.
    #[must_use]
    pub const fn from_identity_gpa(gpa: Gpa) -> Self {
        Hpa(gpa.0)
    }
}

impl Gva {
    /// Whether the address is canonical for 48-bit linear addresses (SDM 3.3.7.1).
    #[must_use]
    pub const fn is_canonical(self) -> bool {
        let top = self.0 >> 47;
        top == 0 || top == 0x1_ffff
    }
}

/// Guest frame number: a guest-physical address divided by [`PAGE_SIZE`].
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[repr(transparent)]
pub struct Gfn(u64);

impl Gfn {
    /// Wraps a raw frame number.
    #[must_use]
    pub const fn new(raw: u64) -> Self {
        Self(raw)
    }

    /// The raw frame number.
    #[must_use]
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// First guest-physical address of the frame, or `None` if it does not fit in 64 bits.
    #[must_use]
    pub const fn checked_gpa(self) -> Option<Gpa> {
        match self.0.checked_mul(PAGE_SIZE) {
            Some(v) => Some(Gpa(v)),
            None => None,
        }
    }

    /// The next frame, or `None` on overflow.
    #[must_use]
    pub const fn checked_next(self) -> Option<Self> {
        match self.0.checked_add(1) {
            Some(v) => Some(Self(v)),
            None => None,
        }
    }
}

impl fmt::Debug for Gfn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Gfn({:#x})", self.0)
    }
}

/// A half-open physical range `[start, end)`, used for memory maps and ownership.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct PhysRange {
    /// First byte.
    pub start: Hpa,
    /// One past the last byte.
    pub end: Hpa,
}

impl PhysRange {
    /// A range from `start` of `len` bytes, or `None` on overflow.
    #[must_use]
    pub const fn from_len(start: Hpa, len: u64) -> Option<Self> {
        match start.checked_add(len) {
            Some(end) => Some(Self { start, end }),
            None => None,
        }
    }

    /// Length in bytes.
    #[must_use]
    pub const fn len(&self) -> u64 {
        self.end.raw().saturating_sub(self.start.raw())
    }

    /// Whether the range holds no byte.
    #[must_use]
    pub const fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `addr` lies inside.
    #[must_use]
    pub const fn contains(&self, addr: Hpa) -> bool {
        addr.raw() >= self.start.raw() && addr.raw() < self.end.raw()
    }

    /// Whether the two ranges share a byte.
    #[must_use]
    pub const fn overlaps(&self, other: &PhysRange) -> bool {
        self.start.raw() < other.end.raw() && other.start.raw() < self.end.raw()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_arithmetic_reports_overflow() {
        assert_eq!(Gpa::new(u64::MAX).checked_add(1), None);
        assert_eq!(Gpa::new(0x1000).checked_add(0x10), Some(Gpa::new(0x1010)));
        assert_eq!(Hpa::new(0).checked_sub(1), None);
        assert_eq!(Gpa::new(0x1000).offset_from(Gpa::new(0x2000)), None);
        assert_eq!(Gpa::new(0x2010).offset_from(Gpa::new(0x2000)), Some(0x10));
    }

    #[test]
    fn alignment() {
        assert_eq!(Gpa::new(0x1fff).align_down(PAGE_SIZE), Gpa::new(0x1000));
        assert_eq!(Gpa::new(0x1001).align_up(PAGE_SIZE), Some(Gpa::new(0x2000)));
        assert_eq!(Gpa::new(u64::MAX).align_up(PAGE_SIZE), None);
        assert!(Hpa::new(0x20_0000).is_aligned(LARGE_PAGE_SIZE));
        assert_eq!(Gpa::new(0x1234).page_offset(), 0x234);
    }

    #[test]
    fn frames_and_canonical_form() {
        assert_eq!(Gpa::new(0x5123).gfn(), Gfn::new(5));
        assert_eq!(Gfn::new(5).checked_gpa(), Some(Gpa::new(0x5000)));
        assert_eq!(Gfn::new(u64::MAX).checked_gpa(), None);
        assert!(Gva::new(0xffff_8000_0000_0000).is_canonical());
        assert!(Gva::new(0x0000_7fff_ffff_ffff).is_canonical());
        assert!(!Gva::new(0x0000_8000_0000_0000).is_canonical());
    }

    #[test]
    fn ranges() {
        let a = PhysRange::from_len(Hpa::new(0x1000), 0x1000).unwrap();
        let b = PhysRange::from_len(Hpa::new(0x1fff), 2).unwrap();
        let c = PhysRange::from_len(Hpa::new(0x2000), 1).unwrap();
        assert!(a.overlaps(&b));
        assert!(!a.overlaps(&c));
        assert!(a.contains(Hpa::new(0x1fff)));
        assert!(!a.contains(Hpa::new(0x2000)));
        assert!(PhysRange::from_len(Hpa::new(u64::MAX), 2).is_none());
    }
}
