//! Who owns each part of guest-physical space, and reads of guest RAM that respect it.

use ihmi_addr::{Address, Gpa, GpaRange, HpaRange, Range, PAGE_SIZE};
use ihmi_paging::{GuestPhysRead, PhysReadError};

use crate::Platform;

/// What a guest-physical range is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionKind {
    /// RAM the guest may use; mapped in its EPT.
    GuestRam,
    /// Memory L0 owns (its image, its frames, boot modules); never mapped for the guest.
    L0,
    /// Device memory passed through to the guest.
    Mmio,
    /// The in-VM monitor's frames: present only in the monitor view (the gate frame excepted).
    Monitor,
}

impl RegionKind {
    /// Short name for reports.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::GuestRam => "guest RAM",
            Self::L0 => "L0-owned",
            Self::Mmio => "MMIO",
            Self::Monitor => "monitor",
        }
    }
}

/// Capacity of a [`MemoryMap`].
pub const MAX_REGIONS: usize = 64;

/// Error adding a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    /// The map is full.
    Full,
    /// The new region overlaps one already in the map.
    Overlap,
    /// Empty range.
    Empty,
}

/// A fixed-capacity, non-overlapping list of guest-physical regions, sorted by address.
#[derive(Clone, Debug)]
pub struct MemoryMap {
    regions: [(GpaRange, RegionKind); MAX_REGIONS],
    count: usize,
}

impl Default for MemoryMap {
    fn default() -> Self {
        let empty = GpaRange::new(Gpa::new(0), Gpa::new(0));
        Self {
            regions: [(empty, RegionKind::L0); MAX_REGIONS],
            count: 0,
        }
    }
}

impl MemoryMap {
    /// Adds a region; regions never overlap.
    pub fn add(&mut self, range: GpaRange, kind: RegionKind) -> Result<(), MapError> {
        if range.is_empty() {
            return Err(MapError::Empty);
        }
        if self.regions().iter().any(|(r, _)| r.overlaps(&range)) {
            return Err(MapError::Overlap);
        }
        if self.count == MAX_REGIONS {
            return Err(MapError::Full);
        }
        let at = self
            .regions()
            .iter()
            .position(|(r, _)| r.start > range.start)
            .unwrap_or(self.count);
        self.regions.copy_within(at..self.count, at + 1);
        self.regions[at] = (range, kind);
        self.count += 1;
        Ok(())
    }

    /// Hands `range`, which must lie inside one guest-RAM region, to another owner (the monitor): the
    /// RAM region is split around it.
    pub fn reassign(&mut self, range: GpaRange, kind: RegionKind) -> Result<(), MapError> {
        let Some(i) = self.regions().iter().position(|(r, k)| {
            *k == RegionKind::GuestRam && r.start <= range.start && range.end <= r.end
        }) else {
            return Err(MapError::Overlap);
        };
        let (ram, _) = self.regions[i];
        self.regions.copy_within(i + 1..self.count, i);
        self.count -= 1;
        for (part, k) in [
            (GpaRange::new(ram.start, range.start), RegionKind::GuestRam),
            (range, kind),
            (GpaRange::new(range.end, ram.end), RegionKind::GuestRam),
        ] {
            if !part.is_empty() {
                self.add(part, k)?;
            }
        }
        Ok(())
    }

    /// Passes every address below `limit` that no region covers through to the guest as a device
    /// range: a commodity kernel owns the machine's devices and firmware tables, and only L0's and the
    /// monitor's frames are kept from it.
    pub fn fill_gaps_as_mmio(&mut self, limit: Gpa) -> Result<(), MapError> {
        let mut gaps = heapless_pieces::Pieces::new(GpaRange::new(Gpa::new(0), limit));
        for (r, _) in self.regions() {
            gaps.subtract(*r);
        }
        for gap in gaps.iter() {
            self.add(gap, RegionKind::Mmio)?;
        }
        Ok(())
    }

    /// All regions, sorted.
    #[must_use]
    pub fn regions(&self) -> &[(GpaRange, RegionKind)] {
        &self.regions[..self.count]
    }

    /// Regions of one kind.
    pub fn of_kind(&self, kind: RegionKind) -> impl Iterator<Item = GpaRange> + '_ {
        self.regions()
            .iter()
            .filter(move |(_, k)| *k == kind)
            .map(|(r, _)| *r)
    }

    /// The kind of the region holding `gpa`, if any.
    #[must_use]
    pub fn classify(&self, gpa: Gpa) -> Option<RegionKind> {
        self.regions()
            .iter()
            .find(|(r, _)| r.contains(gpa))
            .map(|(_, k)| *k)
    }

    /// Whether every byte of `[gpa, gpa + len)` is guest RAM.
    #[must_use]
    pub fn is_guest_ram(&self, gpa: Gpa, len: u64) -> bool {
        let Some(end) = gpa.checked_add(len) else {
            return false;
        };
        let mut at = gpa;
        while at < end {
            let Some((r, _)) = self
                .regions()
                .iter()
                .find(|(r, k)| *k == RegionKind::GuestRam && r.contains(at))
            else {
                return false;
            };
            // Adjacent RAM regions are fine: continue from the end of this one.
            at = r.end;
        }
        true
    }
}

/// Largest number of ranges [`MemoryMap::build`] takes in each input list.
pub const MAX_INPUT_RANGES: usize = 32;

impl MemoryMap {
    /// Builds the guest's view of physical memory from the firmware memory map. L0 gives the guest
    /// an identity-mapped EPT, so each host range becomes the guest range with the same addresses:
    /// this is the one place the two kinds of address meet.
    ///
    /// `available` is the RAM the firmware reports free, `l0_owned` what L0 keeps for itself (its image,
    /// boot modules, its frame pool), `devices` the device and firmware ranges passed through. Guest RAM is
    /// `available` minus `l0_owned`, shrunk to whole pages; L0 ranges are grown to whole pages, so a
    /// partly used page always belongs to L0.
    pub fn build(
        available: &[HpaRange],
        l0_owned: &[HpaRange],
        devices: &[HpaRange],
    ) -> Result<Self, MapError> {
        let mut map = Self::default();
        for l0 in l0_owned.iter().map(|r| GpaRange::from_identity(*r)) {
            let grown = GpaRange::new(
                l0.start.align_down(PAGE_SIZE),
                l0.end.align_up(PAGE_SIZE).unwrap_or(l0.end),
            );
            map.add_merging_l0(grown)?;
        }
        for ram in available.iter().map(|r| GpaRange::from_identity(*r)) {
            let Some(start) = ram.start.align_up(PAGE_SIZE) else {
                continue;
            };
            let end = ram.end.align_down(PAGE_SIZE);
            if start >= end {
                continue;
            }
            // Cut out every L0 range; what is left is guest RAM.
            let mut rest = heapless_pieces::Pieces::new(GpaRange::new(start, end));
            for (l0, kind) in map.regions() {
                if *kind == RegionKind::L0 {
                    rest.subtract(*l0);
                }
            }
            for piece in rest.iter() {
                map.add(piece, RegionKind::GuestRam)?;
            }
        }
        for dev in devices.iter().map(|r| GpaRange::from_identity(*r)) {
            // A device range may overlap what the firmware calls RAM only by mistake; RAM wins.
            if map.regions().iter().all(|(r, _)| !r.overlaps(&dev)) {
                map.add(dev, RegionKind::Mmio)?;
            }
        }
        Ok(map)
    }

    fn add_merging_l0(&mut self, range: GpaRange) -> Result<(), MapError> {
        // L0 ranges may touch or overlap each other (a module right after the image): merge them.
        let mut merged = range;
        while let Some(i) = self.regions().iter().position(|(r, k)| {
            *k == RegionKind::L0 && r.start <= merged.end && merged.start <= r.end
        }) {
            let (r, _) = self.regions[i];
            merged = GpaRange::new(r.start.min(merged.start), r.end.max(merged.end));
            self.regions.copy_within(i + 1..self.count, i);
            self.count -= 1;
        }
        self.add(merged, RegionKind::L0)
    }
}

/// Picks `size` bytes of `available` memory: the highest `align`-aligned block (a power of two) that
/// overlaps none of `taken`. L0's frame pool (host memory) and the monitor's region (guest RAM) are
/// placed this way: high memory keeps them away from where guests are loaded.
#[must_use]
pub fn choose_pool<A: Address>(
    available: &[Range<A>],
    taken: &[Range<A>],
    size: u64,
    align: u64,
) -> Option<Range<A>> {
    let down = |a: u64| a & !(align - 1);
    let mut best: Option<Range<A>> = None;
    for ram in available {
        let mut end = down(ram.end.to_raw());
        while let Some(start) = end.checked_sub(size) {
            if start < ram.start.to_raw() {
                break;
            }
            let cand = Range::new(A::from_raw(start), A::from_raw(end));
            match taken.iter().find(|t| t.overlaps(&cand)) {
                None => {
                    if best.is_none_or(|b| cand.start > b.start) {
                        best = Some(cand);
                    }
                    break;
                }
                // Slide below the obstacle and try again.
                Some(t) => end = down(t.start.to_raw()),
            }
        }
    }
    best
}

/// Why [`make_room`] could not free a span.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoomError {
    /// `taken[index]` overlaps the span and may not move.
    Fixed(usize),
    /// No free place of `taken[index]`'s size is left for it.
    NoRoom(usize),
    /// More ranges than [`MAX_INPUT_RANGES`] to keep apart.
    TooMany,
}

/// Frees `span` of what `taken` holds (a multiboot kernel's load span, where the boot loader put
/// its modules): every range of `taken` that overlaps `span` gets a new place of its size (rounded
/// up to `align`) in `available`, the highest free one ([`choose_pool`]), clear of `taken`, of
/// `span` and of the places already given. `fixed` ranges (by index) cannot move: one in the way
/// is an error. Returns the new place of each range of `taken` by index (`None`: it stays); at
/// most `N` ranges are looked at, and `taken` must have no more.
pub fn make_room<A: Address, const N: usize>(
    available: &[Range<A>],
    taken: &[Range<A>],
    span: Range<A>,
    align: u64,
    fixed: &[usize],
) -> Result<[Option<Range<A>>; N], RoomError> {
    let empty = Range::new(A::from_raw(0), A::from_raw(0));
    let mut moves = [None; N];
    // What no new place may overlap: `taken` as it was (a move copies from there), the span, the
    // places already given.
    let mut busy = heapless_pieces::Busy::<A>::new(empty);
    for r in taken.iter().copied().chain([span]) {
        busy.push(r).ok_or(RoomError::TooMany)?;
    }
    for (i, r) in taken.iter().enumerate().take(N) {
        if r.start >= r.end || !r.overlaps(&span) {
            continue;
        }
        if fixed.contains(&i) {
            return Err(RoomError::Fixed(i));
        }
        let len = r.end.to_raw() - r.start.to_raw();
        let size = len.div_ceil(align) * align;
        let to =
            choose_pool(available, busy.as_slice(), size, align).ok_or(RoomError::NoRoom(i))?;
        busy.push(to).ok_or(RoomError::NoRoom(i))?;
        moves[i] = Some(Range::new(to.start, A::from_raw(to.start.to_raw() + len)));
    }
    Ok(moves)
}

mod heapless_pieces {
    use ihmi_addr::{Address, GpaRange as PhysRange, Range};

    /// Ranges no new place may overlap, for [`super::make_room`]: twice the input ranges and one.
    pub struct Busy<A> {
        items: [Range<A>; 2 * super::MAX_INPUT_RANGES + 1],
        len: usize,
    }

    impl<A: Address> Busy<A> {
        pub fn new(empty: Range<A>) -> Self {
            Self {
                items: [empty; 2 * super::MAX_INPUT_RANGES + 1],
                len: 0,
            }
        }

        /// Adds `r`; `None` if full.
        pub fn push(&mut self, r: Range<A>) -> Option<()> {
            *self.items.get_mut(self.len)? = r;
            self.len += 1;
            Some(())
        }

        pub fn as_slice(&self) -> &[Range<A>] {
            &self.items[..self.len]
        }
    }

    /// As many pieces as a map has regions: cutting a map's regions out of one range never needs more.
    const MAX: usize = super::MAX_REGIONS;

    /// What is left of one range after cutting holes out of it.
    pub struct Pieces {
        items: [PhysRange; MAX],
        len: usize,
    }

    impl Pieces {
        pub fn new(r: PhysRange) -> Self {
            Self {
                items: [r; MAX],
                len: 1,
            }
        }

        pub fn subtract(&mut self, hole: PhysRange) {
            let mut out = [self.items[0]; MAX];
            let mut n = 0;
            for p in &self.items[..self.len] {
                if !p.overlaps(&hole) {
                    out[n] = *p;
                    n += 1;
                    continue;
                }
                for part in [
                    PhysRange {
                        start: p.start,
                        end: hole.start,
                    },
                    PhysRange {
                        start: hole.end,
                        end: p.end,
                    },
                ] {
                    if part.start < part.end
                        && n < MAX
                        && part.start >= p.start
                        && part.end <= p.end
                    {
                        out[n] = part;
                        n += 1;
                    }
                }
            }
            self.items = out;
            self.len = n;
        }

        pub fn iter(&self) -> impl Iterator<Item = PhysRange> + '_ {
            self.items[..self.len].iter().copied()
        }
    }
}

/// Guest-physical reads for page walks on behalf of the guest: only guest RAM is readable, so a guest
/// cannot make L0 read its own frames by pointing a page table or a buffer at them.
pub(crate) struct GuestRamReader<'a, P: Platform> {
    pub map: &'a MemoryMap,
    pub platform: &'a P,
}

impl<P: Platform> GuestPhysRead for GuestRamReader<'_, P> {
    fn read_bytes(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), PhysReadError> {
        if !self.map.is_guest_ram(gpa, buf.len() as u64) {
            return Err(PhysReadError { gpa });
        }
        self.platform
            .read_guest(gpa, buf)
            .map_err(|_| PhysReadError { gpa })
    }
}

/// Guest-physical reads straight through the platform, whose own fence refuses anything but guest
/// RAM: for walking tables whose location L0 chose itself (the kernel's top-level table).
pub(crate) struct PlatformReader<'a, P: Platform>(pub &'a P);

impl<P: Platform> GuestPhysRead for PlatformReader<'_, P> {
    fn read_bytes(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), PhysReadError> {
        self.0
            .read_guest(gpa, buf)
            .map_err(|_| PhysReadError { gpa })
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    use ihmi_addr::Hpa;

    /// A guest range, as the map keeps them.
    fn range(start: u64, end: u64) -> GpaRange {
        GpaRange::new(Gpa::new(start), Gpa::new(end))
    }

    /// A host range, as the firmware and L0 report them.
    fn hrange(start: u64, end: u64) -> HpaRange {
        HpaRange::new(Hpa::new(start), Hpa::new(end))
    }

    #[test]
    fn gaps_below_the_limit_become_devices_and_nothing_else_moves() {
        let mut m = MemoryMap::build(
            &[hrange(0, 0x9_f000), hrange(0x10_0000, 0x1000_0000)],
            &[hrange(0x10_0000, 0x14_0000)],
            &[hrange(0xfee0_0000, 0xfee0_1000)],
        )
        .unwrap();
        let before: std::vec::Vec<_> = m.regions().to_vec();
        m.fill_gaps_as_mmio(Gpa::new(0x1_0000_0000)).unwrap();
        let mmio: std::vec::Vec<_> = m.of_kind(RegionKind::Mmio).collect();
        assert_eq!(
            mmio,
            [
                range(0x9_f000, 0x10_0000),
                range(0x1000_0000, 0xfee0_0000),
                range(0xfee0_0000, 0xfee0_1000),
                range(0xfee0_1000, 0x1_0000_0000),
            ]
        );
        for r in before {
            assert!(m.regions().contains(&r), "{r:?} kept");
        }
        // Everything below the limit is now something.
        let covered: u64 = m.regions().iter().map(|(r, _)| r.len()).sum();
        assert_eq!(covered, 0x1_0000_0000);
    }

    #[test]
    fn regions_stay_sorted_and_disjoint() {
        let mut m = MemoryMap::default();
        m.add(range(0x20_0000, 0x30_0000), RegionKind::L0).unwrap();
        m.add(range(0, 0x20_0000), RegionKind::GuestRam).unwrap();
        m.add(range(0x30_0000, 0x100_0000), RegionKind::GuestRam)
            .unwrap();
        assert_eq!(
            m.add(range(0x2f_f000, 0x30_1000), RegionKind::Mmio),
            Err(MapError::Overlap)
        );
        assert_eq!(m.add(range(5, 5), RegionKind::Mmio), Err(MapError::Empty));
        let starts: [u64; 3] = core::array::from_fn(|i| m.regions()[i].0.start.raw());
        assert_eq!(starts, [0, 0x20_0000, 0x30_0000]);
        assert_eq!(m.classify(Gpa::new(0x20_1000)), Some(RegionKind::L0));
        assert_eq!(m.classify(Gpa::new(0x100_0000)), None);
    }

    #[test]
    fn guest_ram_spans_must_not_touch_other_regions() {
        let mut m = MemoryMap::default();
        m.add(range(0, 0x1000), RegionKind::GuestRam).unwrap();
        m.add(range(0x1000, 0x2000), RegionKind::GuestRam).unwrap();
        m.add(range(0x2000, 0x3000), RegionKind::L0).unwrap();
        assert!(
            m.is_guest_ram(Gpa::new(0xff0), 0x20),
            "adjacent RAM regions join"
        );
        assert!(
            !m.is_guest_ram(Gpa::new(0x1ff0), 0x20),
            "crossing into L0 memory"
        );
        assert!(!m.is_guest_ram(Gpa::new(u64::MAX - 4), 8), "overflow");
        assert!(m.is_guest_ram(Gpa::new(0x10), 0));
    }

    #[test]
    fn build_cuts_l0_out_of_ram_at_page_granularity() {
        let available = [hrange(0, 0x9f000), hrange(0x10_0000, 0x1000_0000)];
        let l0 = [
            hrange(0x10_0000, 0x11_8123),
            hrange(0x11_8123, 0x12_0000),
            hrange(0xf00_0000, 0x1000_0000),
        ];
        let devices = [
            hrange(0xa_0000, 0xc_0000),
            hrange(0xfee0_0000, 0xfee0_1000),
            hrange(0x10_0000, 0x10_1000),
        ];
        let m = MemoryMap::build(&available, &l0, &devices).unwrap();
        let got: std::vec::Vec<_> = m
            .regions()
            .iter()
            .map(|(r, k)| (r.start.raw(), r.end.raw(), *k))
            .collect();
        assert_eq!(
            got,
            [
                (0, 0x9f000, RegionKind::GuestRam),
                (0xa_0000, 0xc_0000, RegionKind::Mmio),
                (0x10_0000, 0x12_0000, RegionKind::L0),
                (0x12_0000, 0xf00_0000, RegionKind::GuestRam),
                (0xf00_0000, 0x1000_0000, RegionKind::L0),
                (0xfee0_0000, 0xfee0_1000, RegionKind::Mmio),
            ]
        );
        assert!(!m.is_guest_ram(Gpa::new(0x11_f000), 1));
    }

    #[test]
    fn build_keeps_partial_pages_for_l0_and_splits_ram_around_holes() {
        let m =
            MemoryMap::build(&[hrange(0x1000, 0x10000)], &[hrange(0x4800, 0x4900)], &[]).unwrap();
        let got: std::vec::Vec<_> = m
            .regions()
            .iter()
            .map(|(r, k)| (r.start.raw(), r.end.raw(), *k))
            .collect();
        assert_eq!(
            got,
            [
                (0x1000, 0x4000, RegionKind::GuestRam),
                (0x4000, 0x5000, RegionKind::L0),
                (0x5000, 0x10000, RegionKind::GuestRam)
            ]
        );
    }

    #[test]
    fn pool_is_the_highest_free_aligned_block() {
        let available = [range(0, 0x9f000), range(0x10_0000, 0x1000_0000)];
        let taken = [range(0xfe0_0000, 0xff0_1000)];
        let pool = choose_pool(&available, &taken, 0x40_0000, 0x20_0000).unwrap();
        assert_eq!(
            (pool.start.raw(), pool.end.raw()),
            (0xfa0_0000, 0xfe0_0000),
            "just below the taken range"
        );
        assert!(choose_pool(&[range(0, 0x10_0000)], &[], 0x40_0000, 0x20_0000).is_none());
    }

    #[test]
    fn reassign_splits_ram_and_refuses_anything_else() {
        let mut m = MemoryMap::default();
        m.add(range(0, 0x100_0000), RegionKind::GuestRam).unwrap();
        m.add(range(0x100_0000, 0x110_0000), RegionKind::L0)
            .unwrap();
        m.reassign(range(0x20_0000, 0x40_0000), RegionKind::Monitor)
            .unwrap();
        let got: std::vec::Vec<_> = m
            .regions()
            .iter()
            .map(|(r, k)| (r.start.raw(), r.end.raw(), *k))
            .collect();
        assert_eq!(
            got,
            [
                (0, 0x20_0000, RegionKind::GuestRam),
                (0x20_0000, 0x40_0000, RegionKind::Monitor),
                (0x40_0000, 0x100_0000, RegionKind::GuestRam),
                (0x100_0000, 0x110_0000, RegionKind::L0),
            ]
        );
        assert!(
            !m.is_guest_ram(Gpa::new(0x30_0000), 1),
            "monitor memory is not guest RAM"
        );
        assert_eq!(
            m.reassign(range(0xf0_0000, 0x101_0000), RegionKind::Monitor),
            Err(MapError::Overlap)
        );
        assert_eq!(
            m.reassign(range(0x30_0000, 0x31_0000), RegionKind::Monitor),
            Err(MapError::Overlap)
        );
    }

    #[test]
    fn full_map_is_an_error() {
        let mut m = MemoryMap::default();
        for i in 0..MAX_REGIONS as u64 {
            m.add(range(i * 0x1000, i * 0x1000 + 0x1000), RegionKind::GuestRam)
                .unwrap();
        }
        assert_eq!(
            m.add(range(0x100_0000, 0x100_1000), RegionKind::GuestRam),
            Err(MapError::Full)
        );
    }

    #[test]
    fn make_room_moves_what_lies_in_the_span_high_up_and_nothing_else() {
        use ihmi_addr::{Hpa, HpaRange};
        let r = |a: u64, b: u64| HpaRange::new(Hpa::new(a), Hpa::new(b));
        let ram = [r(0x10_0000, 0x1000_0000)];
        // L0 at 1 MiB, two modules inside the span [4 MiB, 16 MiB), one above it.
        let taken = [
            r(0x10_0000, 0x1c_0000),
            r(0x4c_2000, 0x4f_cd80),
            r(0x4f_d000, 0x4f_d016),
            r(0x2000_0000, 0x2000_1000),
        ];
        let span = r(0x40_0000, 0x100_0000);
        let moves = make_room::<Hpa, 8>(&ram, &taken, span, PAGE_SIZE, &[0]).unwrap();
        let with_empty = [taken[0], r(0x50_0000, 0x50_0000)];
        assert_eq!(
            make_room::<Hpa, 8>(&ram, &with_empty, span, PAGE_SIZE, &[0]).unwrap()[1],
            None,
            "an empty range is in nobody's way"
        );
        assert_eq!(moves[0], None);
        assert_eq!(moves[3], None, "not in the way");
        let a = moves[1].unwrap();
        let b = moves[2].unwrap();
        assert_eq!(
            a.end.raw() - a.start.raw(),
            0x4f_cd80 - 0x4c_2000,
            "its own length"
        );
        assert_eq!(b.end.raw() - b.start.raw(), 0x16);
        assert_eq!(
            a.start.raw(),
            0x1000_0000 - 0x3b000,
            "the highest page-aligned place"
        );
        for m in [a, b] {
            assert!(m.start.is_aligned(PAGE_SIZE));
            assert!(!m.overlaps(&span) && taken.iter().all(|t| !m.overlaps(t)));
        }
        assert!(!a.overlaps(&b), "two moves never share a place");
        // L0 itself in the way cannot move; no room left is an error too.
        assert_eq!(
            make_room::<Hpa, 8>(&ram, &taken, r(0x18_0000, 0x20_0000), PAGE_SIZE, &[0]),
            Err(RoomError::Fixed(0))
        );
        let tight = [r(0x40_0000, 0x100_0000)];
        assert_eq!(
            make_room::<Hpa, 8>(&tight, &taken, span, PAGE_SIZE, &[0]),
            Err(RoomError::NoRoom(1))
        );
    }
}
