//! The guest memory map L0 builds from the firmware's map and what it keeps: for any input, either
//! an error or a map whose regions are sorted and disjoint, in which nothing L0 keeps is guest RAM,
//! and whose answers (`classify`, `is_guest_ram`) agree with its regions. The monitor's region is
//! taken out of guest RAM the same way.
#![no_main]

use arbitrary::Arbitrary;
use ihmi_addr::{Gpa, GpaRange, Hpa, HpaRange, LARGE_PAGE_SIZE};
use ihmi_hv::{MemoryMap, RegionKind};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    available: Vec<(u32, u32)>,
    owned: Vec<(u32, u32)>,
    devices: Vec<(u32, u32)>,
    monitor_size: u32,
    gaps: bool,
}

fn ranges(v: &[(u32, u32)]) -> Vec<HpaRange> {
    v.iter()
        .take(ihmi_hv::memory::MAX_INPUT_RANGES)
        .map(|&(a, len)| {
            let start = u64::from(a);
            HpaRange::new(Hpa::new(start), Hpa::new(start + u64::from(len)))
        })
        .collect()
}

fuzz_target!(|input: Input| {
    let owned = ranges(&input.owned);
    let Ok(mut map) = MemoryMap::build(&ranges(&input.available), &owned, &ranges(&input.devices))
    else {
        return;
    };
    if input.gaps && map.fill_gaps_as_mmio(Gpa::new(1 << 32)).is_err() {
        return;
    }
    let ram: Vec<GpaRange> = map.of_kind(RegionKind::GuestRam).collect();
    let size = u64::from(input.monitor_size).next_multiple_of(LARGE_PAGE_SIZE);
    if let Some(monitor) =
        ihmi_hv::memory::choose_pool(&ram, &[], size.max(LARGE_PAGE_SIZE), LARGE_PAGE_SIZE)
    {
        map.reassign(monitor, RegionKind::Monitor)
            .expect("a region chosen inside guest RAM can be reassigned");
        assert_eq!(map.classify(monitor.start), Some(RegionKind::Monitor));
        assert!(!map.is_guest_ram(monitor.start, 1));
    }
    let regions = map.regions();
    for w in regions.windows(2) {
        assert!(w[0].0.end <= w[1].0.start, "sorted and disjoint: {w:?}");
    }
    for (r, kind) in regions {
        assert!(!r.is_empty());
        assert_eq!(map.classify(r.start), Some(*kind));
        assert_eq!(
            map.is_guest_ram(r.start, r.len()),
            *kind == RegionKind::GuestRam
        );
    }
    for o in &owned {
        let g = GpaRange::from_identity(*o);
        if !g.is_empty() {
            assert!(
                !map.is_guest_ram(g.start, 1),
                "L0's {o:?} is never guest RAM"
            );
        }
    }
});
