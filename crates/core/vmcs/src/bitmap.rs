//! MSR bitmaps (SDM 25.6.9 "MSR-Bitmap Address") and I/O bitmaps (SDM 25.6.4 "I/O-Bitmap
//! Addresses").

use core::fmt;

const PAGE_SIZE: usize = 4096;

/// An MSR outside the two ranges an MSR bitmap covers (0..=0x1FFF and 0xC000_0000..=0xC000_1FFF);
/// RDMSR/WRMSR of such an MSR always exits.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub struct MsrOutOfRange {
    /// The MSR index.
    pub msr: u32,
}

impl fmt::Display for MsrOutOfRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "MSR {:#x} is outside the MSR-bitmap ranges and always exits",
            self.msr
        )
    }
}

/// The 4-KByte MSR-bitmap page (SDM 25.6.9): read bitmap for low MSRs at byte 0, read bitmap for high
/// MSRs at 1024, write bitmap for low MSRs at 2048, write bitmap for high MSRs at 3072. A set bit makes
/// the access exit.
#[repr(C, align(4096))]
#[derive(Clone, PartialEq, Eq)]
pub struct MsrBitmap([u8; PAGE_SIZE]);

const _: () = assert!(core::mem::size_of::<MsrBitmap>() == PAGE_SIZE);
const _: () = assert!(core::mem::align_of::<MsrBitmap>() == PAGE_SIZE);

#[derive(Clone, Copy)]
enum MsrAccess {
    Read = 0,
    Write = 2048,
}

impl MsrBitmap {
    const LOW_END: u32 = 0x1FFF;
    const HIGH_BASE: u32 = 0xC000_0000;
    const HIGH_END: u32 = 0xC000_1FFF;

    /// A bitmap that intercepts nothing in the covered ranges.
    pub const fn new() -> Self {
        Self([0; PAGE_SIZE])
    }

    /// Where the bit for RDMSR (or, with `write`, WRMSR) of `msr` is in any MSR-bitmap page, such as
    /// a guest hypervisor's in its own memory: byte offset and bit mask; `None` outside the covered
    /// ranges, where every access exits.
    pub const fn bit_of(msr: u32, write: bool) -> Option<(usize, u8)> {
        Self::locate(
            msr,
            if write {
                MsrAccess::Write
            } else {
                MsrAccess::Read
            },
        )
    }

    /// Byte offset and bit of `msr` for `access`, or `None` outside the covered ranges.
    const fn locate(msr: u32, access: MsrAccess) -> Option<(usize, u8)> {
        let (half, n) = match msr {
            0..=Self::LOW_END => (0, msr),
            Self::HIGH_BASE..=Self::HIGH_END => (1024, msr - Self::HIGH_BASE),
            _ => return None,
        };
        Some((access as usize + half + (n / 8) as usize, 1 << (n % 8)))
    }

    fn set(&mut self, msr: u32, access: MsrAccess, on: bool) -> Result<(), MsrOutOfRange> {
        let (byte, bit) = Self::locate(msr, access).ok_or(MsrOutOfRange { msr })?;
        if on {
            self.0[byte] |= bit;
        } else {
            self.0[byte] &= !bit;
        }
        Ok(())
    }

    const fn get(&self, msr: u32, access: MsrAccess) -> bool {
        match Self::locate(msr, access) {
            Some((byte, bit)) => self.0[byte] & bit != 0,
            None => true,
        }
    }

    /// Makes RDMSR of `msr` exit.
    pub fn intercept_read(&mut self, msr: u32) -> Result<(), MsrOutOfRange> {
        self.set(msr, MsrAccess::Read, true)
    }

    /// Makes WRMSR of `msr` exit.
    pub fn intercept_write(&mut self, msr: u32) -> Result<(), MsrOutOfRange> {
        self.set(msr, MsrAccess::Write, true)
    }

    /// Lets RDMSR of `msr` run without an exit.
    pub fn allow_read(&mut self, msr: u32) -> Result<(), MsrOutOfRange> {
        self.set(msr, MsrAccess::Read, false)
    }

    /// Lets WRMSR of `msr` run without an exit.
    pub fn allow_write(&mut self, msr: u32) -> Result<(), MsrOutOfRange> {
        self.set(msr, MsrAccess::Write, false)
    }

    /// True if RDMSR of `msr` exits (always, outside the covered ranges).
    pub const fn is_read_intercepted(&self, msr: u32) -> bool {
        self.get(msr, MsrAccess::Read)
    }

    /// True if WRMSR of `msr` exits (always, outside the covered ranges).
    pub const fn is_write_intercepted(&self, msr: u32) -> bool {
        self.get(msr, MsrAccess::Write)
    }

    /// The page as bytes, in hardware layout.
    pub const fn as_bytes(&self) -> &[u8; PAGE_SIZE] {
        &self.0
    }
}

impl Default for MsrBitmap {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MsrBitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set: u32 = self.0.iter().map(|b| b.count_ones()).sum();
        write!(f, "MsrBitmap {{ intercepted_bits: {set} }}")
    }
}

/// One 4-KByte I/O bitmap (SDM 25.6.4): bit n stands for port n of its half of the port space.
#[repr(C, align(4096))]
#[derive(Clone, PartialEq, Eq)]
pub struct IoBitmapPage([u8; PAGE_SIZE]);

const _: () = assert!(core::mem::size_of::<IoBitmapPage>() == PAGE_SIZE);
const _: () = assert!(core::mem::align_of::<IoBitmapPage>() == PAGE_SIZE);

impl IoBitmapPage {
    /// A page with no port intercepted.
    pub const fn new() -> Self {
        Self([0; PAGE_SIZE])
    }

    /// The page as bytes, in hardware layout.
    pub const fn as_bytes(&self) -> &[u8; PAGE_SIZE] {
        &self.0
    }
}

impl Default for IoBitmapPage {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for IoBitmapPage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set: u32 = self.0.iter().map(|b| b.count_ones()).sum();
        write!(f, "IoBitmapPage {{ intercepted_ports: {set} }}")
    }
}

/// A port range that runs past port 0xFFFF.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub struct PortRangeError {
    /// First port of the range.
    pub first: u16,
    /// Number of ports asked for.
    pub count: u32,
}

impl fmt::Display for PortRangeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ports from {:#x} run past port 0xffff",
            self.count, self.first
        )
    }
}

/// I/O bitmaps A (ports 0..=0x7FFF) and B (ports 0x8000..=0xFFFF) (SDM 25.6.4); used when "use I/O
/// bitmaps" is 1. A set bit makes an access to the port exit.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct IoBitmaps {
    /// Bitmap A, ports 0..=0x7FFF.
    pub a: IoBitmapPage,
    /// Bitmap B, ports 0x8000..=0xFFFF.
    pub b: IoBitmapPage,
}

impl IoBitmaps {
    /// Bitmaps with no port intercepted.
    pub const fn new() -> Self {
        Self {
            a: IoBitmapPage::new(),
            b: IoBitmapPage::new(),
        }
    }

    const fn locate(port: u16) -> (bool, usize, u8) {
        let n = port & 0x7FFF;
        (port >= 0x8000, (n / 8) as usize, 1 << (n % 8))
    }

    fn page_mut(&mut self, in_b: bool) -> &mut IoBitmapPage {
        if in_b {
            &mut self.b
        } else {
            &mut self.a
        }
    }

    /// Makes accesses to `port` exit.
    pub fn intercept(&mut self, port: u16) {
        let (in_b, byte, bit) = Self::locate(port);
        self.page_mut(in_b).0[byte] |= bit;
    }

    /// Lets accesses to `port` run without an exit.
    pub fn allow(&mut self, port: u16) {
        let (in_b, byte, bit) = Self::locate(port);
        self.page_mut(in_b).0[byte] &= !bit;
    }

    /// Intercepts `count` ports starting at `first`; nothing changes if the range runs past 0xFFFF.
    pub fn intercept_range(&mut self, first: u16, count: u32) -> Result<(), PortRangeError> {
        let end = u32::from(first) + count;
        if end > 0x1_0000 {
            return Err(PortRangeError { first, count });
        }
        for port in u32::from(first)..end {
            self.intercept(port as u16);
        }
        Ok(())
    }

    /// True if accesses to `port` exit.
    pub const fn is_intercepted(&self, port: u16) -> bool {
        let (in_b, byte, bit) = Self::locate(port);
        let page = if in_b { &self.b } else { &self.a };
        page.0[byte] & bit != 0
    }
}

#[cfg(test)]
mod tests {
    use std::boxed::Box;

    use super::*;

    fn only_set_bit(bytes: &[u8; PAGE_SIZE]) -> Option<(usize, u8)> {
        let mut set = bytes.iter().enumerate().filter(|(_, b)| **b != 0);
        let first = set.next().map(|(i, b)| (i, *b));
        assert!(set.next().is_none(), "more than one byte set");
        first
    }

    #[test]
    fn new_intercepts_nothing_in_range() {
        let bitmap = MsrBitmap::new();
        for msr in [0, 0x10, 0x1FFF, 0xC000_0080, 0xC000_1FFF] {
            assert!(!bitmap.is_read_intercepted(msr) && !bitmap.is_write_intercepted(msr));
        }
    }

    #[test]
    fn out_of_range_msrs_always_exit() {
        let mut bitmap = MsrBitmap::new();
        for msr in [0x2000, 0x4000_0000, 0xBFFF_FFFF, 0xC000_2000, u32::MAX] {
            assert!(bitmap.is_read_intercepted(msr) && bitmap.is_write_intercepted(msr));
            assert_eq!(bitmap.intercept_read(msr), Err(MsrOutOfRange { msr }));
            assert_eq!(bitmap.allow_write(msr), Err(MsrOutOfRange { msr }));
        }
        assert_eq!(only_set_bit(bitmap.as_bytes()), None);
    }

    #[test]
    fn write_of_lstar_sets_high_write_bitmap_bit() {
        let mut bitmap = Box::new(MsrBitmap::new());
        bitmap.intercept_write(0xC000_0082).unwrap();
        assert_eq!(
            only_set_bit(bitmap.as_bytes()),
            Some((3072 + 0x82 / 8, 1 << (0x82 % 8)))
        );
        assert!(bitmap.is_write_intercepted(0xC000_0082));
        assert!(!bitmap.is_read_intercepted(0xC000_0082));
        bitmap.allow_write(0xC000_0082).unwrap();
        assert_eq!(only_set_bit(bitmap.as_bytes()), None);
    }

    #[test]
    fn each_quarter_lands_where_the_sdm_says() {
        let cases: [(u32, bool, usize); 4] = [
            (0x174, false, 0x174 / 8),
            (0xC000_0100, false, 1024 + 0x100 / 8),
            (0x1FFF, true, 2048 + 0x1FFF / 8),
            (0xC000_0080, true, 3072 + 0x80 / 8),
        ];
        for (msr, write, byte) in cases {
            let mut bitmap = MsrBitmap::new();
            if write {
                bitmap.intercept_write(msr).unwrap();
            } else {
                bitmap.intercept_read(msr).unwrap();
            }
            assert_eq!(
                only_set_bit(bitmap.as_bytes()),
                Some((byte, 1 << (msr % 8))),
                "{msr:#x}"
            );
            assert_eq!(bitmap.is_write_intercepted(msr), write);
            assert_eq!(bitmap.is_read_intercepted(msr), !write);
        }
    }

    #[test]
    fn io_ports_split_between_a_and_b() {
        let mut io = Box::new(IoBitmaps::new());
        io.intercept(0x3F8);
        assert_eq!(
            only_set_bit(io.a.as_bytes()),
            Some((0x3F8 / 8, 1 << (0x3F8 % 8)))
        );
        assert_eq!(only_set_bit(io.b.as_bytes()), None);
        io.allow(0x3F8);
        io.intercept(0x8001);
        assert_eq!(only_set_bit(io.a.as_bytes()), None);
        assert_eq!(only_set_bit(io.b.as_bytes()), Some((0, 1 << 1)));
        assert!(io.is_intercepted(0x8001) && !io.is_intercepted(0x0001));
    }

    #[test]
    fn io_range_across_the_a_b_boundary() {
        let mut io = Box::new(IoBitmaps::new());
        io.intercept_range(0x7FFE, 4).unwrap();
        for port in [0x7FFE, 0x7FFF, 0x8000, 0x8001] {
            assert!(io.is_intercepted(port), "{port:#x}");
        }
        assert!(!io.is_intercepted(0x7FFD) && !io.is_intercepted(0x8002));
        assert_eq!(
            io.intercept_range(0xFFFF, 2),
            Err(PortRangeError {
                first: 0xFFFF,
                count: 2
            })
        );
        assert!(!io.is_intercepted(0xFFFF));
        io.intercept_range(0, 0x1_0000).unwrap();
        assert!((0..=0xFFFF).all(|p| io.is_intercepted(p)));
    }
}
