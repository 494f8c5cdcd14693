#![doc = include_str!("../README.md")]
#![no_std]
#![deny(unsafe_code)]

use core::fmt;

use ihmi_abi::guest_os::COMM_LEN;
use ihmi_abi::monitor::MAX_ALLOWED;
use ihmi_addr::{Gpa, GpaRange, Gva, LARGE_PAGE_SIZE, PAGE_SIZE};
use ihmi_paging::{PageTableEntry, PteFlags};

/// Frames reserved after the image for the monitor's page tables (and, for Linux, the gate's pages).
pub const TABLE_FRAMES: u64 = 64;

/// The monitor image's layout symbols (its linker script), monitor-virtual.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageSymbols {
    /// `__gate_start`: the image's base; the gate page comes first.
    pub gate_start: u64,
    /// `__gate_end`: the end of the gate page, where the code starts.
    pub gate_end: u64,
    /// `__code_end`: the end of the code.
    pub code_end: u64,
    /// `__data_start`: the end of what never changes after load (code and read-only data).
    pub data_start: u64,
    /// `__image_end`.
    pub image_end: u64,
}

/// Why the monitor cannot be laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayoutError {
    /// The symbols are not in the order the linker script puts them, or not page-aligned.
    Symbols(ImageSymbols),
    /// The gate is not exactly one page.
    GateSize(u64),
    /// The gate's address would overlap the monitor's own image.
    GateCollides(Gva),
    /// An address is outside the image or the region.
    Outside(u64),
    /// The instruction L0 patches is not the `movabs $imm64, %rax` it expects.
    NotMovabs,
    /// The kernel's `_end` leaves no room for the trampoline's slot.
    NoHookSlot(u64),
}

impl fmt::Display for LayoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Symbols(s) => write!(
                f,
                "the monitor image's layout symbols are out of order or unaligned ({s:x?}); rebuild it with `ihmi build`"
            ),
            Self::GateSize(n) => write!(f, "the monitor's gate is {n:#x} bytes, not one page"),
            Self::GateCollides(g) => write!(f, "the gate's address {g} collides with the monitor image"),
            Self::Outside(a) => write!(f, "{a:#x} lies outside the monitor image or its region"),
            Self::NotMovabs => f.write_str(
                "a patched instruction is not a movabs to RAX; the monitor image and L0 disagree",
            ),
            Self::NoHookSlot(end) => {
                write!(f, "the kernel's _end {end:#x} leaves no room for the trampoline's slot")
            }
        }
    }
}

impl ImageSymbols {
    fn check(&self) -> Result<(), LayoutError> {
        let ordered = self.gate_start < self.gate_end
            && self.gate_end < self.code_end
            && self.code_end <= self.data_start
            && self.data_start <= self.image_end;
        let aligned = [
            self.gate_start,
            self.gate_end,
            self.code_end,
            self.data_start,
            self.image_end,
        ]
        .iter()
        .all(|a| a % PAGE_SIZE == 0);
        if !ordered || !aligned {
            return Err(LayoutError::Symbols(*self));
        }
        if self.gate_end - self.gate_start != PAGE_SIZE {
            return Err(LayoutError::GateSize(self.gate_end - self.gate_start));
        }
        Ok(())
    }

    /// The image's size in bytes.
    #[must_use]
    pub const fn image_len(&self) -> u64 {
        self.image_end - self.gate_start
    }

    /// How much guest RAM the monitor takes: its image and [`TABLE_FRAMES`], rounded up to 2 MiB (the
    /// region is placed 2 MiB-aligned so it never shares a large page with the guest).
    pub fn region_size(&self) -> Result<u64, LayoutError> {
        self.check()?;
        let size = self.image_len() + TABLE_FRAMES * PAGE_SIZE;
        size.checked_next_multiple_of(LARGE_PAGE_SIZE)
            .ok_or(LayoutError::Symbols(*self))
    }
}

/// The monitor placed in its region: where each monitor-virtual address of the image lands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    symbols: ImageSymbols,
    region: GpaRange,
}

impl Placement {
    /// The image at the start of `region` (which [`ImageSymbols::region_size`] sized).
    pub fn new(symbols: ImageSymbols, region: GpaRange) -> Result<Self, LayoutError> {
        let size = symbols.region_size()?;
        if region.len() < size || !region.start.is_aligned(PAGE_SIZE) {
            return Err(LayoutError::Outside(region.start.raw()));
        }
        Ok(Self { symbols, region })
    }

    /// The region.
    #[must_use]
    pub const fn region(&self) -> GpaRange {
        self.region
    }

    /// Where the image's monitor-virtual address `va` is, guest-physical.
    pub fn at(&self, va: u64) -> Result<Gpa, LayoutError> {
        let s = &self.symbols;
        if va < s.gate_start || va >= s.image_end {
            return Err(LayoutError::Outside(va));
        }
        Ok(Gpa::new(self.region.start.raw() + (va - s.gate_start)))
    }

    /// Where `[va, va + len)` of the image is, if it lies inside the image.
    pub fn range(&self, va: u64, len: u64) -> Result<GpaRange, LayoutError> {
        let end = va.checked_add(len).ok_or(LayoutError::Outside(va))?;
        if end > self.symbols.image_end {
            return Err(LayoutError::Outside(end));
        }
        let start = self.at(va)?;
        Ok(GpaRange::new(start, Gpa::new(start.raw() + len)))
    }

    /// The gate page.
    #[must_use]
    pub fn gate(&self) -> GpaRange {
        self.span(self.symbols.gate_start, self.symbols.gate_end)
    }

    /// The monitor's code (after the gate).
    #[must_use]
    pub fn code(&self) -> GpaRange {
        self.span(self.symbols.gate_end, self.symbols.code_end)
    }

    /// Gate, code and read-only data: what never changes after load.
    #[must_use]
    pub fn fixed_image(&self) -> GpaRange {
        self.span(self.symbols.gate_start, self.symbols.data_start)
    }

    /// Where the page-table frames start: right after the image, up to the end of the region.
    #[must_use]
    pub fn tables(&self) -> GpaRange {
        GpaRange::new(
            Gpa::new(self.region.start.raw() + self.symbols.image_len()),
            self.region.end,
        )
    }

    fn span(&self, from: u64, to: u64) -> GpaRange {
        let at = |va: u64| Gpa::new(self.region.start.raw() + (va - self.symbols.gate_start));
        GpaRange::new(at(from), at(to))
    }

    /// Refuses a gate address that would overlap the image in the monitor's own address space (the
    /// monitor maps the gate at the same address in both address spaces).
    pub fn check_gate_address(&self, gate: Gva) -> Result<(), LayoutError> {
        let s = &self.symbols;
        if gate.raw() < s.image_end && gate.raw().saturating_add(PAGE_SIZE) > s.gate_start {
            return Err(LayoutError::GateCollides(gate));
        }
        Ok(())
    }
}

/// The three page tables that map the Linux gate and its scratch page in the kernel's address
/// spaces, guest-physical (frames of the monitor region that the guest view shows read-only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GateTables {
    pub pdpt: Gpa,
    pub pd: Gpa,
    pub pt: Gpa,
}

/// Flags of the gate tables' upper entries: present, writable, accessed. Accessed (and dirty, in the
/// leaves) are set in advance: the guest view shows these tables read-only, so the CPU must never need
/// to write them.
const UPPER: PteFlags = PteFlags::PRESENT
    .union(PteFlags::WRITABLE)
    .union(PteFlags::ACCESSED);

/// The entries that map `gate` (read + execute, supervisor) at `gate_gva` and `scratch` (read/write,
/// never executable) on the page after it, through `tables`: each `(where, value)`, and the PML4
/// entry that points at the tables, which L0 puts into the kernel's top-level page table later.
#[must_use]
pub fn gate_table_entries(
    gate_gva: Gva,
    gate: Gpa,
    scratch: Gpa,
    tables: GateTables,
) -> ([(Gpa, u64); 4], u64) {
    let index = |level: u32| (gate_gva.raw() >> (12 + 9 * (level - 1))) & 0x1ff;
    let at = |table: Gpa, i: u64| Gpa::new(table.raw() + i * 8);
    let entry = |to: Gpa, flags: PteFlags| PageTableEntry::new(to, flags).raw();
    let scratch_flags = PteFlags::PRESENT
        | PteFlags::WRITABLE
        | PteFlags::ACCESSED
        | PteFlags::DIRTY
        | PteFlags::NO_EXECUTE;
    (
        [
            (at(tables.pdpt, index(3)), entry(tables.pd, UPPER)),
            (at(tables.pd, index(2)), entry(tables.pt, UPPER)),
            (
                at(tables.pt, index(1)),
                entry(gate, PteFlags::PRESENT | PteFlags::ACCESSED),
            ),
            (at(tables.pt, index(1) + 1), entry(scratch, scratch_flags)),
        ],
        entry(tables.pdpt, UPPER),
    )
}

/// The PML4 slot of an address.
#[must_use]
pub const fn pml4_slot(gva: Gva) -> u64 {
    (gva.raw() >> 39) & 0x1ff
}

/// The one entry of the trampoline slot's page table: the gate page at the start of the slot.
#[must_use]
pub fn trampoline_entry(gate: Gpa) -> u64 {
    PageTableEntry::new(gate, PteFlags::PRESENT | PteFlags::ACCESSED).raw()
}

/// The trampoline's 2 MiB slot in the kernel's image mapping: the kernel maps its image up to `_end`
/// rounded up to 2 MiB; one slot is left between as a margin.
pub fn hook_slot(kernel_end: u64) -> Result<Gva, LayoutError> {
    kernel_end
        .checked_next_multiple_of(LARGE_PAGE_SIZE)
        .and_then(|e| e.checked_add(LARGE_PAGE_SIZE))
        .map(Gva::new)
        .filter(|g| g.is_canonical())
        .ok_or(LayoutError::NoHookSlot(kernel_end))
}

/// The `setup_data` header (the kernel's boot protocol, `boot.rst`): no next entry, a type the kernel
/// does not know (so it reserves the data and leaves it alone), and the length of what follows.
#[must_use]
pub fn setup_data_header(kind: u32, len: u32) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[8..12].copy_from_slice(&kind.to_le_bytes());
    h[12..16].copy_from_slice(&len.to_le_bytes());
    h
}

/// Writes `value` into the immediate of a `movabs $imm64, %rax` (48 B8 imm64).
pub fn patch_movabs(insn: &mut [u8], value: u64) -> Result<(), LayoutError> {
    match insn {
        [0x48, 0xb8, imm @ ..] if imm.len() >= 8 => {
            imm[..8].copy_from_slice(&value.to_le_bytes());
            Ok(())
        }
        _ => Err(LayoutError::NotMovabs),
    }
}

/// Counts `VMFUNC` (0F 01 D4) and `mov %reg, %cr3` (0F 22 with ModRM mod = 11, reg = 3) in the gate's
/// code: the view and address-space switches one pass through the gate makes.
#[must_use]
pub fn count_switches(code: &[u8]) -> (u64, u64) {
    let vmfuncs = code.windows(3).filter(|w| *w == [0x0f, 0x01, 0xd4]).count();
    let cr3 = code
        .windows(3)
        .filter(|w| w[0] == 0x0f && w[1] == 0x22 && w[2] & 0xf8 == 0xd8)
        .count();
    (vmfuncs as u64, cr3 as u64)
}

/// Why an allow-list cannot be the monitor's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllowError {
    /// More names, or more identities, than the monitor's table holds.
    TooMany,
    /// A name longer than a process name.
    TooLong,
    /// `sha256:` not followed by 64 hexadecimal digits.
    BadDigest,
    /// A name where the guest needs identities (Linux programs are allowed by content).
    NameNotIdentity,
}

impl fmt::Display for AllowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooMany => write!(f, "the allow-list has more than {MAX_ALLOWED} entries of a kind"),
            Self::TooLong => write!(
                f,
                "an allow-list name is longer than a process name ({COMM_LEN} bytes)"
            ),
            Self::BadDigest => {
                f.write_str("an allow-list `sha256:` entry is not 64 hexadecimal digits")
            }
            Self::NameNotIdentity => f.write_str(
                "a Linux allow-list takes program identities (`sha256:` and 64 hexadecimal digits), not names",
            ),
        }
    }
}

/// An allow-list as the monitor's tables: process names and program identities.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllowList {
    pub names: [[u8; COMM_LEN]; MAX_ALLOWED],
    pub name_count: u64,
    pub digests: [[u8; 32]; MAX_ALLOWED],
    pub digest_count: u64,
}

/// Parses an allow-list: comma-separated entries, each a process name or `sha256:` and a program's
/// digest in hexadecimal; empty: allow everything.
pub fn allow_list(entries: &str) -> Result<AllowList, AllowError> {
    let mut list = AllowList {
        names: [[0u8; COMM_LEN]; MAX_ALLOWED],
        name_count: 0,
        digests: [[0u8; 32]; MAX_ALLOWED],
        digest_count: 0,
    };
    for entry in entries.split(',').filter(|n| !n.is_empty()) {
        if let Some(hex) = entry.strip_prefix("sha256:") {
            let slot = list
                .digests
                .get_mut(list.digest_count as usize)
                .ok_or(AllowError::TooMany)?;
            if hex.len() != 64 {
                return Err(AllowError::BadDigest);
            }
            for (byte, pair) in slot.iter_mut().zip(hex.as_bytes().chunks_exact(2)) {
                let digit = |c: u8| (c as char).to_digit(16).ok_or(AllowError::BadDigest);
                *byte = (digit(pair[0])? << 4 | digit(pair[1])?) as u8;
            }
            list.digest_count += 1;
            continue;
        }
        let slot = list
            .names
            .get_mut(list.name_count as usize)
            .ok_or(AllowError::TooMany)?;
        if entry.len() > COMM_LEN {
            return Err(AllowError::TooLong);
        }
        slot[..entry.len()].copy_from_slice(entry.as_bytes());
        list.name_count += 1;
    }
    Ok(list)
}

/// The checksum (FNV-1a, 64 bit) of the parts of the monitor that never change after loading: the
/// `fixed` byte ranges as they are, and the page-table frames `tables` without the CPU's accessed and
/// dirty bits (SDM 4.8), which the CPU sets itself.
#[must_use]
pub fn checksum<'a>(fixed: impl IntoIterator<Item = &'a [u8]>, tables: &[u8]) -> u64 {
    let a_d = (PteFlags::ACCESSED | PteFlags::DIRTY).bits();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for &b in bytes {
            h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for part in fixed {
        feed(part);
    }
    for entry in tables.chunks_exact(8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(entry);
        feed(&(u64::from_le_bytes(word) & !a_d).to_le_bytes());
    }
    h
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    const SYMS: ImageSymbols = ImageSymbols {
        gate_start: 0x6000_0000,
        gate_end: 0x6000_1000,
        code_end: 0x6000_9000,
        data_start: 0x6000_b000,
        image_end: 0x6002_0000,
    };

    fn region(start: u64, len: u64) -> GpaRange {
        GpaRange::new(Gpa::new(start), Gpa::new(start + len))
    }

    #[test]
    fn the_region_holds_the_image_and_its_tables_in_whole_large_pages() {
        assert_eq!(SYMS.region_size(), Ok(LARGE_PAGE_SIZE));
        let p = Placement::new(SYMS, region(0xf80_0000, LARGE_PAGE_SIZE)).unwrap();
        assert_eq!(p.gate(), region(0xf80_0000, 0x1000));
        assert_eq!(p.code(), region(0xf80_1000, 0x8000));
        assert_eq!(p.fixed_image(), region(0xf80_0000, 0xb000));
        assert_eq!(p.tables().start, Gpa::new(0xf82_0000));
        assert_eq!(p.at(0x6000_b010), Ok(Gpa::new(0xf80_b010)));
        assert_eq!(p.at(0x6002_0000), Err(LayoutError::Outside(0x6002_0000)));
        assert!(p.range(0x6001_fff8, 8).is_ok());
        assert!(p.range(0x6001_fff8, 9).is_err());
        assert!(
            Placement::new(SYMS, region(0xf80_0000, 0x10_0000)).is_err(),
            "too small"
        );
    }

    #[test]
    fn malformed_images_and_colliding_gates_are_refused() {
        let mut wide_gate = SYMS;
        wide_gate.gate_end = 0x6000_2000;
        assert_eq!(wide_gate.region_size(), Err(LayoutError::GateSize(0x2000)));
        let mut backwards = SYMS;
        backwards.image_end = 0x6000_0000;
        assert!(matches!(
            backwards.region_size(),
            Err(LayoutError::Symbols(_))
        ));
        let p = Placement::new(SYMS, region(0x20_0000, LARGE_PAGE_SIZE)).unwrap();
        assert!(p
            .check_gate_address(Gva::new(0xffff_e900_0000_0000))
            .is_ok());
        assert!(p.check_gate_address(Gva::new(0x6001_0000)).is_err());
        assert!(
            p.check_gate_address(Gva::new(0x5fff_f800)).is_err(),
            "overlaps the start"
        );
    }

    #[test]
    fn the_gate_tables_map_the_gate_executable_and_the_scratch_page_not() {
        let t = GateTables {
            pdpt: Gpa::new(0x10_1000),
            pd: Gpa::new(0x10_2000),
            pt: Gpa::new(0x10_3000),
        };
        let gva = Gva::new(ihmi_abi::monitor::LINUX_GATE_GVA);
        let (entries, pml4e) = gate_table_entries(gva, Gpa::new(0x20_0000), Gpa::new(0x20_1000), t);
        assert_eq!(pml4e, 0x10_1000 | 0x23);
        assert_eq!(pml4_slot(gva), 466);
        // The gate's address is the first of its PDPT, PD and page table: indexes 0.
        assert_eq!(entries[0], (Gpa::new(0x10_1000), 0x10_2000 | 0x23));
        assert_eq!(entries[1], (Gpa::new(0x10_2000), 0x10_3000 | 0x23));
        assert_eq!(
            entries[2],
            (Gpa::new(0x10_3000), 0x20_0000 | 0x21),
            "read-only, executable"
        );
        let (at, scratch) = entries[3];
        assert_eq!(at, Gpa::new(0x10_3008));
        assert_eq!(scratch & 0x7fff_ffff_ffff_f000, 0x20_1000);
        assert_ne!(scratch & (1 << 63), 0, "the scratch page never executes");
        assert_ne!(scratch & 0b10, 0, "it is writable");
        assert_eq!(trampoline_entry(Gpa::new(0x20_0000)), 0x20_0021);
    }

    #[test]
    fn the_hook_slot_leaves_a_margin_after_the_kernel() {
        assert_eq!(
            hook_slot(0xffff_ffff_81e3_5000),
            Ok(Gva::new(0xffff_ffff_8220_0000))
        );
        assert_eq!(
            hook_slot(0xffff_ffff_8200_0000),
            Ok(Gva::new(0xffff_ffff_8220_0000))
        );
        assert!(hook_slot(u64::MAX - 10).is_err());
    }

    #[test]
    fn allow_lists_fit_the_monitor_s_table_or_are_refused() {
        let l = allow_list("busybox,,exe").unwrap();
        assert_eq!((l.name_count, l.digest_count), (2, 0));
        assert_eq!(&l.names[0][..7], b"busybox");
        assert_eq!(&l.names[1][..4], b"exe\0");
        let empty = allow_list("").unwrap();
        assert_eq!((empty.name_count, empty.digest_count), (0, 0));
        assert_eq!(allow_list("a23456789012345678"), Err(AllowError::TooLong));
        let many = "a,".repeat(MAX_ALLOWED + 1);
        assert_eq!(allow_list(&many), Err(AllowError::TooMany));
        // Identities: 64 hexadecimal digits, either case, each table full at MAX_ALLOWED.
        let d: std::string::String = "00ff".repeat(15) + "A1b2";
        let l = allow_list(&std::format!("sha256:{d},init")).unwrap();
        assert_eq!((l.name_count, l.digest_count), (1, 1));
        assert_eq!(l.digests[0][..2], [0x00, 0xff]);
        assert_eq!(l.digests[0][30..], [0xa1, 0xb2]);
        for bad in [&d[1..], &(d.clone() + "0"), &d.replace('A', "g")] {
            assert_eq!(
                allow_list(&std::format!("sha256:{bad}")),
                Err(AllowError::BadDigest),
                "{bad}"
            );
        }
        let many = std::format!("sha256:{d},").repeat(MAX_ALLOWED + 1);
        assert_eq!(allow_list(&many), Err(AllowError::TooMany));
    }

    #[test]
    fn the_checksum_ignores_accessed_and_dirty_bits_only() {
        let code = [1u8, 2, 3];
        let mut tables = [0u8; 16];
        tables[..8].copy_from_slice(&0x1003u64.to_le_bytes());
        let before = checksum([&code[..]], &tables);
        tables[..8].copy_from_slice(&0x1063u64.to_le_bytes()); // A and D set by the CPU
        assert_eq!(checksum([&code[..]], &tables), before);
        tables[..8].copy_from_slice(&0x1007u64.to_le_bytes()); // U/S: a real change
        assert_ne!(checksum([&code[..]], &tables), before);
        assert_ne!(checksum([&[1u8, 2, 4][..]], &tables), before);
    }

    #[test]
    fn movabs_is_patched_and_anything_else_refused() {
        let mut insn = [0x48, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0];
        patch_movabs(&mut insn, 0x1122_3344_5566_7788).unwrap();
        assert_eq!(
            u64::from_le_bytes(insn[2..].try_into().unwrap()),
            0x1122_3344_5566_7788
        );
        assert_eq!(
            patch_movabs(&mut [0x90; 10], 1),
            Err(LayoutError::NotMovabs)
        );
        assert_eq!(
            patch_movabs(&mut [0x48, 0xb8, 0], 1),
            Err(LayoutError::NotMovabs)
        );
    }

    #[test]
    fn switches_are_counted_in_the_gate_s_code() {
        // vmfunc; mov %rax, %cr3; mov %cr3, %rax (a read, not counted); vmfunc
        let code = [
            0x0f, 0x01, 0xd4, 0x0f, 0x22, 0xd8, 0x0f, 0x20, 0xd8, 0x0f, 0x01, 0xd4,
        ];
        assert_eq!(count_switches(&code), (2, 1));
        assert_eq!(
            setup_data_header(0x1000, 5)[8..],
            [0, 0x10, 0, 0, 5, 0, 0, 0]
        );
    }
}
