//! Where a Linux guest's pieces go in guest RAM, and the memory map it is told: the initrd as high as
//! the kernel allows, the kernel's own symbols at their physical addresses, the e820 map as the
//! firmware's with what L0 and the monitor keep marked reserved. Pure: L0 copies the bytes itself.

use ihmi_addr::{Gpa, GpaRange, PAGE_SIZE};

use crate::{BootError, E820Entry, E820Kind, E820_MAX};

/// Where the kernel's image mapping starts (`__START_KERNEL_map`): it maps physical address 0.
pub const START_KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;

/// The guest-physical address of a kernel-image symbol `va`, for a kernel loaded `phys_offset` bytes
/// above where it asked (its physical load is the only thing that moves with KASLR off). `None` if
/// `va` is not in the image mapping.
#[must_use]
pub fn kernel_text_pa(va: u64, phys_offset: u64) -> Option<Gpa> {
    va.checked_sub(START_KERNEL_MAP)
        .and_then(|p| p.checked_add(phys_offset))
        .map(Gpa::new)
}

/// The highest page-aligned place for `len` bytes of initrd in `ram`, ending at or below `max` (the
/// kernel's `initrd_addr_max`) and clear of `avoid` (the kernel's start-up area).
pub fn initrd_place(
    ram: impl IntoIterator<Item = GpaRange>,
    len: u64,
    max: u64,
    avoid: GpaRange,
) -> Option<Gpa> {
    let need = len.checked_next_multiple_of(PAGE_SIZE)?;
    let mut best: Option<u64> = None;
    for r in ram {
        let top = r.end.raw().min(max.saturating_add(1)) & !(PAGE_SIZE - 1);
        let Some(start) = top.checked_sub(need) else {
            continue;
        };
        let candidate = GpaRange::new(Gpa::new(start), Gpa::new(top));
        if start >= r.start.raw() && !candidate.overlaps(&avoid) && best.is_none_or(|b| start > b) {
            best = Some(start);
        }
    }
    best.map(Gpa::new)
}

/// One range of the firmware's memory map, with its e820 type (the guest sees the machine's physical
/// layout 1:1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FirmwareRange {
    pub range: GpaRange,
    pub kind: E820Kind,
}

/// Who has a piece of what the firmware calls RAM, as far as the guest's e820 map cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Owner {
    /// The guest's RAM.
    Guest,
    /// The monitor's frames: reserved, but for the gate's pages, which the kernel must see as RAM.
    Monitor,
    /// L0's frames or a device range: reserved.
    #[default]
    Other,
}

/// The e820 map: the firmware's, with its RAM split by who owns it now (`owners`, sorted or not),
/// the gate's pages inside the monitor's region reported as RAM (claimed by a `setup_data` entry, so
/// the kernel reserves them and maps them in its direct map), in address order.
pub fn e820_map(
    firmware: &[FirmwareRange],
    owners: &[(GpaRange, Owner)],
    gate_pages: Option<GpaRange>,
) -> Result<([E820Entry; E820_MAX], usize), BootError> {
    let mut out = [E820Entry {
        addr: 0,
        size: 0,
        kind: E820Kind::Reserved,
    }; E820_MAX];
    let mut n = 0;
    let mut push = |range: GpaRange, kind: E820Kind| -> Result<(), BootError> {
        if range.is_empty() {
            return Ok(());
        }
        let slot = out.get_mut(n).ok_or(BootError::TooManyE820)?;
        *slot = E820Entry {
            addr: range.start.raw(),
            size: range.len(),
            kind,
        };
        n += 1;
        Ok(())
    };
    for fw in firmware {
        if fw.kind != E820Kind::Ram {
            push(fw.range, fw.kind)?;
            continue;
        }
        for (r, owner) in owners {
            let part = GpaRange::new(r.start.max(fw.range.start), r.end.min(fw.range.end));
            if part.start >= part.end {
                continue;
            }
            let gate = gate_pages.filter(|g| *owner == Owner::Monitor && part.overlaps(g));
            match (owner, gate) {
                (Owner::Guest, _) => push(part, E820Kind::Ram)?,
                (_, Some(g)) => {
                    let (lo, hi) = (g.start.max(part.start), g.end.min(part.end));
                    push(GpaRange::new(part.start, lo), E820Kind::Reserved)?;
                    push(GpaRange::new(lo, hi), E820Kind::Ram)?;
                    push(GpaRange::new(hi, part.end), E820Kind::Reserved)?;
                }
                _ => push(part, E820Kind::Reserved)?,
            }
        }
    }
    out[..n].sort_unstable_by_key(|e| e.addr);
    Ok((out, n))
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;

    fn r(a: u64, b: u64) -> GpaRange {
        GpaRange::new(Gpa::new(a), Gpa::new(b))
    }

    #[test]
    fn kernel_symbols_move_with_the_physical_load_only() {
        assert_eq!(
            kernel_text_pa(0xffff_ffff_8100_0000, 0),
            Some(Gpa::new(0x100_0000))
        );
        assert_eq!(
            kernel_text_pa(0xffff_ffff_8100_0000, 0x20_0000),
            Some(Gpa::new(0x120_0000))
        );
        assert_eq!(
            kernel_text_pa(0xffff_8880_0000_0000, 0),
            None,
            "the direct map"
        );
    }

    #[test]
    fn the_initrd_goes_high_below_its_limit_and_clear_of_the_kernel() {
        let ram = [r(0, 0x9f000), r(0x10_0000, 0x1000_0000)];
        let kernel = r(0x100_0000, 0x200_0000);
        assert_eq!(
            initrd_place(ram, 0x1800, 0x7fff_ffff, kernel),
            Some(Gpa::new(0x1000_0000 - 0x2000))
        );
        assert_eq!(
            initrd_place(ram, 0x1000, 0x0fff_ffff, kernel),
            Some(Gpa::new(0x0fff_f000)),
            "ends at initrd_addr_max"
        );
        // Only room would be over the kernel: refused there, found below it.
        let tight = [r(0x100_0000, 0x210_0000)];
        assert_eq!(
            initrd_place(tight, 0x10_0000, u64::MAX, kernel),
            Some(Gpa::new(0x200_0000))
        );
        assert_eq!(initrd_place([r(0, 0x1000)], 0x2000, u64::MAX, kernel), None);
    }

    #[test]
    fn the_e820_map_keeps_the_firmware_s_and_reserves_what_l0_keeps() {
        let firmware = [
            FirmwareRange {
                range: r(0, 0x9f000),
                kind: E820Kind::Ram,
            },
            FirmwareRange {
                range: r(0xf0000, 0x10_0000),
                kind: E820Kind::Reserved,
            },
            FirmwareRange {
                range: r(0x10_0000, 0x1000_0000),
                kind: E820Kind::Ram,
            },
        ];
        let owners = [
            (r(0, 0x9f000), Owner::Guest),
            (r(0x10_0000, 0x20_0000), Owner::Other),
            (r(0x20_0000, 0xf80_0000), Owner::Guest),
            (r(0xf80_0000, 0xfa0_0000), Owner::Monitor),
            (r(0xfa0_0000, 0x1000_0000), Owner::Other),
        ];
        let gate = Some(r(0xf81_0000, 0xf81_6000));
        let (map, n) = e820_map(&firmware, &owners, gate).unwrap();
        let got: std::vec::Vec<_> = map[..n]
            .iter()
            .map(|e| (e.addr, e.addr + e.size, e.kind))
            .collect();
        assert_eq!(
            got,
            [
                (0, 0x9f000, E820Kind::Ram),
                (0xf0000, 0x10_0000, E820Kind::Reserved),
                (0x10_0000, 0x20_0000, E820Kind::Reserved),
                (0x20_0000, 0xf80_0000, E820Kind::Ram),
                (0xf80_0000, 0xf81_0000, E820Kind::Reserved),
                (0xf81_0000, 0xf81_6000, E820Kind::Ram),
                (0xf81_6000, 0xfa0_0000, E820Kind::Reserved),
                (0xfa0_0000, 0x1000_0000, E820Kind::Reserved),
            ]
        );
        // A map that does not fit the zero page is an error, not a cut.
        let many: std::vec::Vec<_> = (0..E820_MAX as u64 + 1)
            .map(|i| (r(i * 0x1000, i * 0x1000 + 0x1000), Owner::Guest))
            .collect();
        let all = [FirmwareRange {
            range: r(0, 0x1000_0000),
            kind: E820Kind::Ram,
        }];
        assert_eq!(
            e820_map(&all, &many, None).err(),
            Some(BootError::TooManyE820)
        );
    }
}
