//! The two EPT views of in-VM monitoring (BRIEF.md §1), built from the memory map.
//!
//! - View 0, the guest view: guest RAM read/write/execute, devices read/write, the monitor's frames
//!   absent except the gate frame, which is read + execute like every frame holding hooks.
//! - View 1, the monitor view: guest RAM read/write but never executable, the monitor's data read/write,
//!   its code read + execute, the gate frame executable, devices absent.
//!
//! L0's own frames are absent from both. A VMFUNC to view 1 from anywhere but the gate lands on a
//! non-executable page and exits on the next instruction fetch; a CR3 load of the monitor's root in
//! view 0 cannot be walked because the monitor's page tables are not present there.

use ihmi_addr::GpaRange;
use ihmi_ept::{EptAlloc, EptError, EptView, MemType, Perm, ViewId};

use crate::{MemoryMap, RegionKind};

/// EPTP-list index of the guest view.
pub const GUEST_VIEW: ViewId = view(0);
/// EPTP-list index of the monitor view.
pub const MONITOR_VIEW: ViewId = view(1);

const fn view(index: u16) -> ViewId {
    match ViewId::new(index) {
        Some(v) => v,
        None => panic!("the EPTP list has 512 entries"),
    }
}

/// Where the monitor sits inside its region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MonitorLayout {
    /// Every monitor frame (image, page tables, stack, event ring), guest-physical.
    pub region: GpaRange,
    /// The monitor's code: executable in the monitor view only.
    pub code: GpaRange,
    /// The gate frame: the one page present in both views.
    pub gate: GpaRange,
    /// Linux: the per-CPU scratch page the system-call gate parks RAX and RCX in (read/write in the
    /// guest view, never executable) and the page tables that map the gate and it in the kernel's
    /// address spaces (read-only in the guest view: the CPU walks them, the kernel cannot change them).
    pub linux: Option<LinuxGatePages>,
}

/// The monitor frames a Linux guest's view shows besides the gate: the `setup_data` header that
/// makes the kernel keep them (reserved, and mapped in its direct map, where its page-table walkers
/// look), the scratch page, and the gate's page tables. One contiguous run, in that order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinuxGatePages {
    pub setup_data: GpaRange,
    pub scratch: GpaRange,
    pub tables: GpaRange,
}

impl LinuxGatePages {
    /// The whole run.
    #[must_use]
    pub fn all(&self) -> GpaRange {
        GpaRange::new(self.setup_data.start, self.tables.end)
    }
}

impl MonitorLayout {
    /// Whether `code` and `gate` lie inside `region`, page-aligned and disjoint.
    #[must_use]
    pub fn is_well_formed(&self) -> bool {
        let inside = |r: &GpaRange| {
            self.region.start <= r.start && r.end <= self.region.end && !r.is_empty()
        };
        let aligned = |r: &GpaRange| {
            r.start.is_aligned(ihmi_addr::PAGE_SIZE) && r.end.is_aligned(ihmi_addr::PAGE_SIZE)
        };
        let linux_ok = self.linux.is_none_or(|l| {
            [l.setup_data, l.scratch, l.tables].iter().all(|r| {
                inside(r) && aligned(r) && !r.overlaps(&self.code) && !r.overlaps(&self.gate)
            }) && l.setup_data.end == l.scratch.start
                && l.scratch.end == l.tables.start
        });
        inside(&self.code)
            && inside(&self.gate)
            && aligned(&self.code)
            && aligned(&self.gate)
            && !self.code.overlaps(&self.gate)
            && linux_ok
    }
}

/// The guest view. `read_exec_only` lists guest frames that must not be writable in it (the guest
/// kernel's code, where hooks live).
pub fn build_guest_view(
    alloc: &mut impl EptAlloc,
    memory: &MemoryMap,
    monitor: Option<&MonitorLayout>,
    read_exec_only: &[GpaRange],
) -> Result<EptView, EptError> {
    let mut view = EptView::new(alloc)?;
    for (range, kind) in memory.regions() {
        let (perm, memtype) = match kind {
            RegionKind::GuestRam => (Perm::RWX, MemType::WriteBack),
            RegionKind::Mmio => (Perm::RW, MemType::Uncacheable),
            RegionKind::L0 | RegionKind::Monitor => continue,
        };
        view.map_identity(alloc, range.start, range.len(), perm, memtype)?;
    }
    if let Some(m) = monitor {
        // A Linux guest's gate opens at its first system call (`crate::linux::gate`).
        let gate = if m.linux.is_some() {
            Perm::READ
        } else {
            Perm::RX
        };
        view.map_identity(alloc, m.gate.start, m.gate.len(), gate, MemType::WriteBack)?;
        if let Some(l) = m.linux {
            for (r, perm) in [
                (l.setup_data, Perm::READ),
                (l.scratch, Perm::RW),
                (l.tables, Perm::READ),
            ] {
                view.map_identity(alloc, r.start, r.len(), perm, MemType::WriteBack)?;
            }
        }
    }
    for r in read_exec_only {
        view.protect(alloc, r.start, r.len(), Perm::RX)?;
    }
    Ok(view)
}

/// The monitor view. `execute_only` says whether the CPU supports execute-only EPT pages (then the gate
/// frame is execute-only; otherwise read + execute).
pub fn build_monitor_view(
    alloc: &mut impl EptAlloc,
    memory: &MemoryMap,
    monitor: &MonitorLayout,
    execute_only: bool,
) -> Result<EptView, EptError> {
    let mut view = EptView::new(alloc)?;
    for (range, kind) in memory.regions() {
        match kind {
            RegionKind::GuestRam => view.map_identity(
                alloc,
                range.start,
                range.len(),
                Perm::RW,
                MemType::WriteBack,
            )?,
            RegionKind::Monitor | RegionKind::Mmio | RegionKind::L0 => {}
        }
    }
    let r = monitor.region;
    // Data everywhere first, then code and gate carved out of it with their own rights.
    view.map_identity(alloc, r.start, r.len(), Perm::RW, MemType::WriteBack)?;
    view.protect(alloc, monitor.code.start, monitor.code.len(), Perm::RX)?;
    let gate_perm = if execute_only {
        Perm::EXECUTE
    } else {
        Perm::RX
    };
    view.protect(alloc, monitor.gate.start, monitor.gate.len(), gate_perm)?;
    Ok(view)
}

/// The out-of-box monitor VM's only view: guest RAM read-only and never executable (it introspects,
/// never writes or runs guest memory), the monitor's own frames as in the monitor view, nothing else.
pub fn build_outbox_view(
    alloc: &mut impl EptAlloc,
    memory: &MemoryMap,
    monitor: &MonitorLayout,
) -> Result<EptView, EptError> {
    let mut view = EptView::new(alloc)?;
    for (range, kind) in memory.regions() {
        if *kind == RegionKind::GuestRam {
            view.map_identity(
                alloc,
                range.start,
                range.len(),
                Perm::READ,
                MemType::WriteBack,
            )?;
        }
    }
    let r = monitor.region;
    view.map_identity(alloc, r.start, r.len(), Perm::RW, MemType::WriteBack)?;
    let code = GpaRange::new(monitor.gate.start, monitor.code.end);
    view.protect(alloc, code.start, code.len(), Perm::RX)?;
    Ok(view)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::boxed::Box;
    use std::collections::HashMap;

    use ihmi_addr::{Gpa, Hpa, HpaRange};
    use ihmi_ept::EptTable;

    use super::*;

    #[derive(Default)]
    struct Tables {
        tables: HashMap<u64, Box<EptTable>>,
        next: u64,
    }

    impl EptAlloc for Tables {
        fn alloc_zeroed(&mut self) -> Option<Hpa> {
            self.next += 0x1000;
            let a = 0x7_0000_0000 + self.next;
            self.tables.insert(a, Box::new(EptTable::new()));
            Some(Hpa::new(a))
        }
        fn table_mut(&mut self, hpa: Hpa) -> Option<&mut EptTable> {
            self.tables.get_mut(&hpa.raw()).map(|b| &mut **b)
        }
        fn table(&self, hpa: Hpa) -> Option<&EptTable> {
            self.tables.get(&hpa.raw()).map(|b| &**b)
        }
    }

    fn r(a: u64, b: u64) -> GpaRange {
        GpaRange::new(Gpa::new(a), Gpa::new(b))
    }

    fn h(a: u64, b: u64) -> HpaRange {
        HpaRange::new(Hpa::new(a), Hpa::new(b))
    }

    fn setup() -> (MemoryMap, MonitorLayout) {
        let mut m = MemoryMap::build(
            &[h(0, 0x1000_0000)],
            &[h(0xf00_0000, 0x1000_0000)],
            &[h(0xfee0_0000, 0xfee0_1000)],
        )
        .unwrap();
        let layout = MonitorLayout {
            region: r(0x800_0000, 0x820_0000),
            gate: r(0x800_0000, 0x800_1000),
            code: r(0x800_1000, 0x801_0000),
            linux: None,
        };
        m.reassign(layout.region, RegionKind::Monitor).unwrap();
        (m, layout)
    }

    fn perm(view: &EptView, t: &Tables, addr: u64) -> Option<Perm> {
        view.lookup(t, Gpa::new(addr)).map(|m| m.perm)
    }

    #[test]
    fn guest_view_hides_monitor_and_l0_and_write_protects_code() {
        let (m, layout) = setup();
        let mut t = Tables::default();
        let v0 = build_guest_view(&mut t, &m, Some(&layout), &[r(0x100_0000, 0x100_4000)]).unwrap();
        assert_eq!(perm(&v0, &t, 0x10_0000), Some(Perm::RWX), "guest RAM");
        assert_eq!(
            perm(&v0, &t, 0x100_2000),
            Some(Perm::RX),
            "guest kernel code: no writes"
        );
        assert_eq!(
            perm(&v0, &t, 0x100_4000),
            Some(Perm::RWX),
            "next page untouched"
        );
        assert_eq!(perm(&v0, &t, 0x800_0000), Some(Perm::RX), "gate");
        assert_eq!(perm(&v0, &t, 0x800_1000), None, "monitor code");
        assert_eq!(perm(&v0, &t, 0x81f_f000), None, "monitor data");
        assert_eq!(perm(&v0, &t, 0xf00_0000), None, "L0");
        assert_eq!(perm(&v0, &t, 0xfee0_0000), Some(Perm::RW), "device");
    }

    #[test]
    fn monitor_view_reads_everything_and_executes_only_monitor_code_and_gate() {
        let (m, layout) = setup();
        assert!(layout.is_well_formed());
        let mut t = Tables::default();
        let v1 = build_monitor_view(&mut t, &m, &layout, true).unwrap();
        assert_eq!(
            perm(&v1, &t, 0x10_0000),
            Some(Perm::RW),
            "guest RAM, never executable"
        );
        assert_eq!(perm(&v1, &t, 0x100_2000), Some(Perm::RW));
        assert_eq!(
            perm(&v1, &t, 0x800_0000),
            Some(Perm::EXECUTE),
            "gate, execute-only"
        );
        assert_eq!(perm(&v1, &t, 0x800_1000), Some(Perm::RX), "monitor code");
        assert_eq!(perm(&v1, &t, 0x801_0000), Some(Perm::RW), "monitor data");
        assert_eq!(perm(&v1, &t, 0xf00_0000), None, "L0");
        assert_eq!(
            perm(&v1, &t, 0xfee0_0000),
            None,
            "devices stay out of the monitor view"
        );
        let v1_rx = build_monitor_view(&mut t, &m, &layout, false).unwrap();
        assert_eq!(
            perm(&v1_rx, &t, 0x800_0000),
            Some(Perm::RX),
            "gate without execute-only support"
        );
    }

    #[test]
    fn outbox_view_reads_guest_ram_and_never_writes_or_runs_it() {
        let (m, layout) = setup();
        let mut t = Tables::default();
        let v = build_outbox_view(&mut t, &m, &layout).unwrap();
        assert_eq!(
            perm(&v, &t, 0x10_0000),
            Some(Perm::READ),
            "guest RAM, read-only"
        );
        assert_eq!(perm(&v, &t, 0x800_1000), Some(Perm::RX), "monitor code");
        assert_eq!(perm(&v, &t, 0x801_0000), Some(Perm::RW), "monitor data");
        assert_eq!(perm(&v, &t, 0xf00_0000), None, "L0");
        assert_eq!(perm(&v, &t, 0xfee0_0000), None, "devices");
    }

    #[test]
    fn linux_guest_view_shows_the_scratch_writable_and_the_gate_tables_read_only() {
        let (m, mut layout) = setup();
        layout.linux = Some(LinuxGatePages {
            setup_data: r(0x80f_f000, 0x810_0000),
            scratch: r(0x810_0000, 0x810_1000),
            tables: r(0x810_1000, 0x810_4000),
        });
        assert!(layout.is_well_formed());
        let mut t = Tables::default();
        let v0 = build_guest_view(&mut t, &m, Some(&layout), &[]).unwrap();
        assert_eq!(perm(&v0, &t, 0x810_0000), Some(Perm::RW), "scratch");
        assert_eq!(perm(&v0, &t, 0x810_2000), Some(Perm::READ), "gate tables");
        assert_eq!(perm(&v0, &t, 0x810_4000), None, "the rest of the monitor");
        assert_eq!(
            perm(&v0, &t, 0x800_0000),
            Some(Perm::READ),
            "gate, closed until the first system call"
        );
        let mut bad = layout;
        bad.linux = Some(LinuxGatePages {
            setup_data: r(0x80f_f000, 0x800_0000),
            scratch: r(0x800_0000, 0x800_1000),
            tables: r(0x810_1000, 0x810_4000),
        });
        assert!(!bad.is_well_formed(), "scratch on the gate");
    }

    #[test]
    fn layouts_outside_their_region_are_rejected() {
        let (_, mut layout) = setup();
        layout.code = r(0x7ff_f000, 0x801_0000);
        assert!(!layout.is_well_formed());
        let (_, mut layout) = setup();
        layout.gate = layout.code;
        assert!(!layout.is_well_formed());
    }
}
