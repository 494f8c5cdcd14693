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

impl Gpa {
    /// The guest-physical address of a host-physical one in an identity-mapped region: L0 builds the
    /// guest's EPT as an identity map, so the guest's physical space mirrors the machine's.
    ///
    /// Only valid where L0 built the EPT as an identity map; callers say so by using this name.
    #[must_use]
    pub const fn from_identity_hpa(hpa: Hpa) -> Self {
        Gpa(hpa.0)
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

/// The address types, for code generic over them ([`Range`]). Implemented by [`Gpa`], [`Hpa`] and
/// [`Gva`] only.
pub trait Address: Copy + Ord + fmt::Debug + private::Sealed {
    /// Wraps a raw address.
    fn from_raw(raw: u64) -> Self;
    /// The raw value.
    fn to_raw(self) -> u64;
}

mod private {
    pub trait Sealed {}
}

macro_rules! address_impl {
    ($($t:ident),*) => {$(
        impl private::Sealed for $t {}
        impl Address for $t {
            fn from_raw(raw: u64) -> Self {
                Self(raw)
            }
            fn to_raw(self) -> u64 {
                self.0
            }
        }
    )*};
}
address_impl!(Gpa, Hpa, Gva);

/// A half-open range `[start, end)` of one kind of address: memory maps, ownership, layouts.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash, Default)]
pub struct Range<A> {
    /// First byte.
    pub start: A,
    /// One past the last byte.
    pub end: A,
}

/// A range of host-physical memory (what L0 owns, the firmware's map).
pub type HpaRange = Range<Hpa>;
/// A range of guest-physical memory (the guest's memory map, the monitor's region in it).
pub type GpaRange = Range<Gpa>;
/// A range of guest-virtual addresses.
pub type GvaRange = Range<Gva>;

impl<A: Address> Range<A> {
    /// `[start, end)`.
    #[must_use]
    pub const fn new(start: A, end: A) -> Self {
        Self { start, end }
    }

    /// A range from `start` of `len` bytes, or `None` on overflow.
    #[must_use]
    pub fn from_len(start: A, len: u64) -> Option<Self> {
        let end = start.to_raw().checked_add(len)?;
        Some(Self {
            start,
            end: A::from_raw(end),
        })
    }

    /// Length in bytes (0 for an inverted range).
    #[must_use]
    pub fn len(&self) -> u64 {
        self.end.to_raw().saturating_sub(self.start.to_raw())
    }

    /// Whether the range holds no byte.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `addr` lies inside.
    #[must_use]
    pub fn contains(&self, addr: A) -> bool {
        addr >= self.start && addr < self.end
    }

    /// Whether `[addr, addr + len)` lies inside (false on overflow).
    #[must_use]
    pub fn contains_range(&self, addr: A, len: u64) -> bool {
        addr.to_raw()
            .checked_add(len)
            .is_some_and(|end| addr >= self.start && end <= self.end.to_raw())
    }

    /// Whether the two ranges share a byte.
    #[must_use]
    pub fn overlaps(&self, other: &Self) -> bool {
        self.start < other.end && other.start < self.end
    }
}

impl GpaRange {
    /// The guest-physical range of an identity-mapped host range (see [`Gpa::from_identity_hpa`]).
    #[must_use]
    pub const fn from_identity(r: HpaRange) -> Self {
        Self {
            start: Gpa::from_identity_hpa(r.start),
            end: Gpa::from_identity_hpa(r.end),
        }
    }
}

impl HpaRange {
    /// The host-physical range behind an identity-mapped guest range (see [`Hpa::from_identity_gpa`]).
    #[must_use]
    pub const fn from_identity(r: GpaRange) -> Self {
        Self {
            start: Hpa::from_identity_gpa(r.start),
            end: Hpa::from_identity_gpa(r.end),
        }
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
        let a = HpaRange::from_len(Hpa::new(0x1000), 0x1000).unwrap();
        let b = HpaRange::from_len(Hpa::new(0x1fff), 2).unwrap();
        let c = HpaRange::from_len(Hpa::new(0x2000), 1).unwrap();
        assert!(a.overlaps(&b));
        assert!(!a.overlaps(&c));
        assert!(a.contains(Hpa::new(0x1fff)));
        assert!(!a.contains(Hpa::new(0x2000)));
        assert!(HpaRange::from_len(Hpa::new(u64::MAX), 2).is_none());
        assert!(a.contains_range(Hpa::new(0x1800), 0x800));
        assert!(!a.contains_range(Hpa::new(0x1800), 0x801));
        assert!(!a.contains_range(Hpa::new(u64::MAX), 2), "overflow");
        let g = GpaRange::from_identity(a);
        assert_eq!((g.start, g.len()), (Gpa::new(0x1000), 0x1000));
        assert_eq!(HpaRange::from_identity(g), a);
        let inverted = GvaRange::new(Gva::new(2), Gva::new(1));
        assert!(inverted.is_empty());
    }
}
