//! A recording mock of the vCPU, the platform and an observer (the vmi-rs mock-driver idea): tests
//! assert the exact sequence of VMCS accesses and platform calls an exit produces, and what it
//! reported. Compiled into this crate's tests, and as the crate `ihmi-hv-mock` (the same file) for
//! other crates' tests and the fuzz targets; a feature of this crate would pull `std` into L0 through
//! workspace feature unification.

#[allow(unused_extern_crates)] // needed inside no_std ihmi-hv, redundant in ihmi-hv-mock
extern crate std;

use core::cell::RefCell;
use core::fmt;
use std::collections::BTreeMap;
use std::string::{String, ToString};
use std::vec::Vec;

use ihmi_addr::{Gpa, GpaRange, Hpa};
use ihmi_ept::Perm;
use ihmi_vmcs::fields::{guest, ro};
use ihmi_vmcs::VmcsField;

use ihmi_hv::{
    Alert, GuestRegs, MemoryMap, MonitorWord, Observation, Observer, Platform, PlatformError,
    RegionKind, ShadowFields, Vcpu,
};

/// Where the test memory map's L0 hole starts: guest RAM is 0..16 MiB except 8..9 MiB, which L0 owns.
pub const L0_HOLE: u64 = 0x80_0000;

/// The memory map the exit policy's tests, the judges' tests and the hypercall fuzz target share:
/// guest RAM 0..16 MiB with an L0-owned hole at [`L0_HOLE`]..+1 MiB.
#[must_use]
pub fn memory_with_l0_hole() -> MemoryMap {
    let mut m = MemoryMap::default();
    let r = |a: u64, b: u64| GpaRange::new(Gpa::new(a), Gpa::new(b));
    m.add(r(0, L0_HOLE), RegionKind::GuestRam).unwrap();
    m.add(r(L0_HOLE, L0_HOLE + 0x10_0000), RegionKind::L0)
        .unwrap();
    m.add(r(L0_HOLE + 0x10_0000, 0x100_0000), RegionKind::GuestRam)
        .unwrap();
    m
}

/// One recorded call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    Read(VmcsField),
    Write(VmcsField, u64),
    HostCpuid(u32, u32),
    ReadPhys(Gpa, usize),
    Log(String),
    GuestText(String),
    WriteMsr(u32, u64),
    Xsetbv(u64),
    PortIn(u16),
    ReadMsr(u32),
    WritePhys(Gpa, Vec<u8>),
    PortOut(u16, u8),
    UnblockNmis,
    WriteMonitor(Gpa, u64),
    ProtectGuest(Gpa, u64, ihmi_ept::Perm),
    Invept(u64),
}

#[derive(Debug, Default)]
pub struct MockVcpu {
    pub fields: BTreeMap<VmcsField, u64>,
    pub regs: GuestRegs,
    pub calls: Vec<Call>,
    /// A shadow VMCS's fields, for VMCS shadowing (`None`: no shadow).
    pub shadow: Option<BTreeMap<VmcsField, u64>>,
}

/// The address the mock's link pointer names when its shadow VMCS is linked.
pub const MOCK_SHADOW_VMCS: u64 = 0x5ad0_0000;

struct MockShadow<'a>(&'a mut BTreeMap<VmcsField, u64>);

impl ShadowFields for MockShadow<'_> {
    fn read(&mut self, field: VmcsField) -> u64 {
        self.0.get(&field).copied().unwrap_or(0)
    }
    fn write(&mut self, field: VmcsField, value: u64) {
        self.0.insert(field, value);
    }
}

impl MockVcpu {
    /// A vCPU that just exited with `reason`, in ring 0 with paging on and interrupts enabled.
    pub fn exited(reason: u32, rip: u64, instruction_len: u64) -> Self {
        let mut v = Self::default();
        v.fields.insert(ro::EXIT_REASON, u64::from(reason));
        v.fields.insert(guest::RIP, rip);
        v.fields.insert(ro::VMEXIT_INSTRUCTION_LEN, instruction_len);
        v.fields.insert(guest::SS_ACCESS_RIGHTS, 0xc093);
        v.fields.insert(guest::CR0, 0x8000_0031);
        v.fields.insert(guest::CR3, 0x1000);
        v.fields.insert(guest::RFLAGS, 0x202);
        v
    }

    /// Writes recorded so far.
    pub fn writes(&self) -> Vec<(VmcsField, u64)> {
        self.calls
            .iter()
            .filter_map(|c| match c {
                Call::Write(f, v) => Some((*f, *v)),
                _ => None,
            })
            .collect()
    }
}

impl Vcpu for MockVcpu {
    /// Decoded from the fields the test set, as the VMX layer does; not recorded, since handlers never
    /// read exit-information fields themselves.
    fn exit(&mut self) -> ihmi_vmcs::VmExit {
        ihmi_vmcs::VmExit::decode(|f| self.fields.get(&f).copied().unwrap_or(0))
    }
    fn read(&mut self, field: VmcsField) -> u64 {
        self.calls.push(Call::Read(field));
        self.fields.get(&field).copied().unwrap_or(0)
    }
    fn write(&mut self, field: VmcsField, value: u64) {
        self.calls.push(Call::Write(field, value));
        self.fields.insert(field, value);
    }
    fn regs(&mut self) -> &mut GuestRegs {
        &mut self.regs
    }
    fn link_shadow(&mut self, linked: bool) -> bool {
        if self.shadow.is_none() {
            return false;
        }
        let link = if linked { MOCK_SHADOW_VMCS } else { u64::MAX };
        self.write(guest::LINK_PTR_FULL, link);
        true
    }
    fn with_shadow(&mut self, f: &mut dyn FnMut(&mut dyn ShadowFields)) -> bool {
        let Some(mut shadow) = self.shadow.take() else {
            return false;
        };
        f(&mut MockShadow(&mut shadow));
        self.shadow = Some(shadow);
        true
    }
}

/// The platform operations that can fail, for arming a fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Op {
    ReadGuest,
    WriteGuest,
    WriteMonitor,
    ProtectGuest,
}

#[derive(Debug, Default)]
pub struct MockPlatform {
    /// Guest-physical memory by page number.
    pub pages: BTreeMap<u64, [u8; 4096]>,
    /// MSR values `read_msr` returns.
    pub msrs: BTreeMap<u32, u64>,
    pub calls: RefCell<Vec<Call>>,
    /// Calls made so far of each fallible operation.
    counts: RefCell<BTreeMap<Op, usize>>,
    /// Armed faults: the operation fails on exactly this (1-based) call.
    faults: BTreeMap<Op, usize>,
    /// With a map, guest reads and writes outside its guest RAM are refused, as L0's platform does.
    pub fence: Option<MemoryMap>,
    /// An NMI L0 took while it ran, which `take_nmi` hands over once.
    pub host_nmi: bool,
    /// EPT02's tables, for nested EPT.
    pub ept02: Option<MockEpt02Tables>,
    /// `protect_guest` calls that changed the view.
    pub view_generation: u64,
    /// Guest pages (by address) L0's view keeps read + execute only, as `guest_mapping` says.
    pub read_only: Vec<u64>,
    /// The in-hypervisor monitor's VMCS registry, as `vmcs_registered` reads it: `None`, no monitor.
    pub vmcs_registry: Option<Vec<u64>>,
}

/// EPT02's tables in a vector, at made-up host-physical addresses from [`MockEpt02Tables::BASE`].
#[derive(Debug)]
pub struct MockEpt02Tables {
    tables: Vec<ihmi_ept::EptTable>,
    used: usize,
    /// Times every table was taken back.
    pub resets: usize,
}

impl MockEpt02Tables {
    /// Where the first table is.
    pub const BASE: u64 = 0x8000_0000;

    /// A pool of `n` tables.
    pub fn new(n: usize) -> Self {
        Self {
            tables: (0..n).map(|_| ihmi_ept::EptTable::default()).collect(),
            used: 0,
            resets: 0,
        }
    }

    fn slot(&self, hpa: Hpa) -> Option<usize> {
        let i = hpa.raw().checked_sub(Self::BASE)? / 4096;
        (i < self.used as u64).then_some(i as usize)
    }
}

impl ihmi_hv::nested::ept::Ept02Tables for MockEpt02Tables {
    fn alloc_zeroed(&mut self) -> Option<Hpa> {
        let t = self.tables.get_mut(self.used)?;
        *t = ihmi_ept::EptTable::default();
        self.used += 1;
        Some(Hpa::new(Self::BASE + (self.used as u64 - 1) * 4096))
    }
    fn table_mut(&mut self, hpa: Hpa) -> Option<&mut ihmi_ept::EptTable> {
        let i = self.slot(hpa)?;
        self.tables.get_mut(i)
    }
    fn table(&self, hpa: Hpa) -> Option<&ihmi_ept::EptTable> {
        self.tables.get(self.slot(hpa)?)
    }
    fn reset(&mut self) {
        self.used = 0;
        self.resets += 1;
    }
}

impl MockPlatform {
    pub fn write_u64(&mut self, gpa: u64, value: u64) {
        self.write_bytes(gpa, &value.to_le_bytes());
    }
    pub fn write_bytes(&mut self, gpa: u64, bytes: &[u8]) {
        for (i, b) in bytes.iter().enumerate() {
            let a = gpa + i as u64;
            self.pages.entry(a / 4096).or_insert([0; 4096])[(a % 4096) as usize] = *b;
        }
    }
    pub fn read_u64(&self, gpa: u64) -> u64 {
        let mut b = [0u8; 8];
        for (i, byte) in b.iter_mut().enumerate() {
            let a = gpa + i as u64;
            *byte = self
                .pages
                .get(&(a / 4096))
                .map_or(0, |p| p[(a % 4096) as usize]);
        }
        u64::from_le_bytes(b)
    }
    /// Makes the `n`-th call (counting from 1, from now) of `op` fail.
    pub fn fail_on(&mut self, op: Op, n: usize) {
        let done = self.counts.borrow().get(&op).copied().unwrap_or(0);
        self.faults.insert(op, done + n);
    }
    /// Counts a call of `op`; an error if it is the armed one.
    fn attempt(&self, op: Op, gpa: Gpa, len: u64) -> Result<(), PlatformError> {
        let mut counts = self.counts.borrow_mut();
        let n = counts.entry(op).or_insert(0);
        *n += 1;
        if self.faults.get(&op) == Some(n) {
            return Err(match op {
                Op::ProtectGuest => PlatformError::View { gpa, len },
                _ => PlatformError::Fenced { gpa, len },
            });
        }
        Ok(())
    }
    fn fenced(&self, gpa: Gpa, len: u64) -> Result<(), PlatformError> {
        match &self.fence {
            Some(map) if !map.is_guest_ram(gpa, len) => Err(PlatformError::Fenced { gpa, len }),
            _ => Ok(()),
        }
    }
    /// Guest text L0 printed, and a check that none of it went through L0's own log channel.
    pub fn guest_texts(&self) -> Vec<String> {
        let calls = self.calls.borrow();
        assert!(!calls
            .iter()
            .any(|c| matches!(c, Call::Log(s) if s.starts_with("guest|"))));
        calls
            .iter()
            .filter_map(|c| match c {
                Call::GuestText(s) => Some(s.clone()),
                _ => None,
            })
            .collect()
    }
    /// L0's own console lines.
    pub fn logs(&self) -> Vec<String> {
        self.calls
            .borrow()
            .iter()
            .filter_map(|c| match c {
                Call::Log(s) => Some(s.clone()),
                _ => None,
            })
            .collect()
    }
    pub fn phys_reads(&self) -> Vec<(Gpa, usize)> {
        self.calls
            .borrow()
            .iter()
            .filter_map(|c| match c {
                Call::ReadPhys(g, n) => Some((*g, *n)),
                _ => None,
            })
            .collect()
    }
    /// Every call that changed guest memory, the monitor word or the guest view, in order.
    pub fn changes(&self) -> Vec<Call> {
        self.calls
            .borrow()
            .iter()
            .filter(|c| {
                matches!(
                    c,
                    Call::WritePhys(..) | Call::WriteMonitor(..) | Call::ProtectGuest(..)
                )
            })
            .cloned()
            .collect()
    }
}

impl Platform for MockPlatform {
    fn guest_mapping(&self, gpa: Gpa) -> Option<ihmi_ept::EptMapping> {
        // L0's view of the guest: its RAM, identity-mapped, everything allowed.
        self.fenced(gpa.align_down(4096), 4096).ok()?;
        let page = gpa.align_down(4096).raw();
        Some(ihmi_ept::EptMapping {
            hpa: Hpa::new(gpa.raw()),
            perm: if self.read_only.contains(&page) {
                Perm::READ | Perm::EXECUTE
            } else {
                Perm::RWX
            },
            memtype: ihmi_ept::MemType::WriteBack,
            large: false,
        })
    }
    fn ept02_tables(&mut self) -> Option<&mut dyn ihmi_hv::nested::ept::Ept02Tables> {
        self.ept02
            .as_mut()
            .map(|t| t as &mut dyn ihmi_hv::nested::ept::Ept02Tables)
    }
    fn invept(&mut self, eptp: ihmi_ept::Eptp) {
        self.calls.borrow_mut().push(Call::Invept(eptp.raw()));
    }
    fn guest_view_generation(&self) -> u64 {
        self.view_generation
    }
    fn host_cpuid(&mut self, leaf: u32, subleaf: u32) -> [u32; 4] {
        self.calls.borrow_mut().push(Call::HostCpuid(leaf, subleaf));
        // A host that has VMX (leaf 1 ECX bit 5) and nothing in the hypervisor range.
        match leaf {
            1 => [0x906ea, 0x0010_0800, 0x7ffa_fbbf, 0xbfeb_fbff],
            // FSRM (EDX bit 4) and MD_CLEAR (bit 10).
            7 => [0, 0, 0, (1 << 10) | (1 << 4)],
            0x4000_0000 => [0xdead, 0xbeef, 0xdead, 0xbeef],
            _ => [leaf, 0, 0, 0],
        }
    }
    fn read_guest(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), PlatformError> {
        self.calls.borrow_mut().push(Call::ReadPhys(gpa, buf.len()));
        self.attempt(Op::ReadGuest, gpa, buf.len() as u64)?;
        self.fenced(gpa, buf.len() as u64)?;
        for (i, b) in buf.iter_mut().enumerate() {
            let a = gpa.raw() + i as u64;
            *b = self
                .pages
                .get(&(a / 4096))
                .map_or(0, |p| p[(a % 4096) as usize]);
        }
        Ok(())
    }
    fn write_guest(&mut self, gpa: Gpa, bytes: &[u8]) -> Result<(), PlatformError> {
        self.calls
            .borrow_mut()
            .push(Call::WritePhys(gpa, bytes.to_vec()));
        self.attempt(Op::WriteGuest, gpa, bytes.len() as u64)?;
        self.fenced(gpa, bytes.len() as u64)?;
        self.write_bytes(gpa.raw(), bytes);
        Ok(())
    }
    fn vmcs_registered(&self, vmcs: Gpa) -> Option<bool> {
        self.vmcs_registry.as_ref().map(|r| r.contains(&vmcs.raw()))
    }

    fn write_monitor(&mut self, word: MonitorWord, value: u64) -> Result<(), PlatformError> {
        self.calls
            .borrow_mut()
            .push(Call::WriteMonitor(word.gpa(), value));
        self.attempt(Op::WriteMonitor, word.gpa(), 8)?;
        self.write_u64(word.gpa().raw(), value);
        Ok(())
    }
    fn read_msr(&mut self, msr: u32) -> u64 {
        self.calls.borrow_mut().push(Call::ReadMsr(msr));
        self.msrs.get(&msr).copied().unwrap_or(0)
    }
    fn port_in(&mut self, port: u16) -> u8 {
        self.calls.borrow_mut().push(Call::PortIn(port));
        0x1c
    }
    fn port_out(&mut self, port: u16, value: u8) {
        self.calls.borrow_mut().push(Call::PortOut(port, value));
    }
    fn take_nmi(&mut self) -> bool {
        core::mem::take(&mut self.host_nmi)
    }
    fn unblock_nmis(&mut self) {
        self.calls.borrow_mut().push(Call::UnblockNmis);
    }
    fn protect_guest(
        &mut self,
        range: GpaRange,
        perm: ihmi_ept::Perm,
    ) -> Result<(), PlatformError> {
        self.calls
            .borrow_mut()
            .push(Call::ProtectGuest(range.start, range.len(), perm));
        self.attempt(Op::ProtectGuest, range.start, range.len())?;
        self.view_generation += 1;
        Ok(())
    }
    fn xsetbv(&mut self, xcr0: u64) {
        self.calls.borrow_mut().push(Call::Xsetbv(xcr0));
    }
    fn write_msr(&mut self, msr: u32, value: u64) {
        self.calls.borrow_mut().push(Call::WriteMsr(msr, value));
    }
    fn log(&mut self, args: fmt::Arguments<'_>) {
        self.calls.borrow_mut().push(Call::Log(args.to_string()));
    }
    fn guest_text(&mut self, args: fmt::Arguments<'_>) {
        self.calls
            .borrow_mut()
            .push(Call::GuestText(args.to_string()));
    }
}

/// One observation, owned (a debug line is copied out).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seen {
    /// Any observation but a debug line, as it came.
    Other(Observation<'static>),
    /// A debug-port line and the exit count with it.
    DebugLine(Vec<u8>, u64),
}

/// An observer that keeps everything, in order.
#[derive(Debug, Default)]
pub struct Recorder {
    pub seen: Vec<Seen>,
}

impl Observer for Recorder {
    fn observe(&mut self, observation: Observation<'_>) {
        let seen = match observation {
            Observation::DebugLine { line, exits } => Seen::DebugLine(line.to_vec(), exits),
            Observation::Cpuid {
                leaf,
                subleaf,
                regs,
            } => Seen::Other(Observation::Cpuid {
                leaf,
                subleaf,
                regs,
            }),
            Observation::CpuidReport(r) => Seen::Other(Observation::CpuidReport(r)),
            Observation::NmiTaken {
                in_monitor_view,
                merged,
            } => Seen::Other(Observation::NmiTaken {
                in_monitor_view,
                merged,
            }),
            Observation::NmiDelivered => Seen::Other(Observation::NmiDelivered),
            Observation::Vmx {
                instruction,
                outcome,
            } => Seen::Other(Observation::Vmx {
                instruction,
                outcome,
            }),
            Observation::Hypercall { nr, status } => {
                Seen::Other(Observation::Hypercall { nr, status })
            }
            Observation::Msr {
                msr,
                write,
                faulted,
            } => Seen::Other(Observation::Msr {
                msr,
                write,
                faulted,
            }),
            Observation::Xsetbv { xcr0, faulted } => {
                Seen::Other(Observation::Xsetbv { xcr0, faulted })
            }
            Observation::L2EntryMsr { msr } => Seen::Other(Observation::L2EntryMsr { msr }),
            Observation::L1HostStateChecked => Seen::Other(Observation::L1HostStateChecked),
            Observation::L1VmcsRegistered { gpa } => {
                Seen::Other(Observation::L1VmcsRegistered { gpa })
            }
            Observation::Io { port, write } => Seen::Other(Observation::Io { port, write }),
            Observation::Alert(a) => Seen::Other(Observation::Alert(a)),
            Observation::L2Entry { launch, round_trip } => {
                Seen::Other(Observation::L2Entry { launch, round_trip })
            }
            Observation::L2Exit { reason, reflected } => {
                Seen::Other(Observation::L2Exit { reason, reflected })
            }
            Observation::BenchMark(m) => Seen::Other(Observation::BenchMark(m)),
            Observation::Ended { end, task } => Seen::Other(Observation::Ended { end, task }),
        };
        self.seen.push(seen);
    }
}

impl Recorder {
    /// The alerts, in order.
    pub fn alerts(&self) -> Vec<Alert> {
        self.seen
            .iter()
            .filter_map(|s| match s {
                Seen::Other(Observation::Alert(a)) => Some(*a),
                _ => None,
            })
            .collect()
    }

    /// The hypercalls and their statuses, in order.
    pub fn hypercalls(&self) -> Vec<(u64, ihmi_abi::Status)> {
        self.seen
            .iter()
            .filter_map(|s| match s {
                Seen::Other(Observation::Hypercall { nr, status }) => Some((*nr, *status)),
                _ => None,
            })
            .collect()
    }

    /// MSR accesses and XSETBVs L0 answered with #GP.
    pub fn gp_faults(&self) -> usize {
        self.seen
            .iter()
            .filter(|s| {
                matches!(
                    s,
                    Seen::Other(
                        Observation::Msr { faulted: true, .. }
                            | Observation::Xsetbv { faulted: true, .. }
                    )
                )
            })
            .count()
    }

    /// The debug-port lines, as text.
    pub fn debug_lines(&self) -> Vec<String> {
        self.seen
            .iter()
            .filter_map(|s| match s {
                Seen::DebugLine(l, _) => Some(String::from_utf8_lossy(l).into_owned()),
                _ => None,
            })
            .collect()
    }
}

/// A host CPU that allows every control L0 uses, as a VMX CPU with EPT, VPID and VM functions reports
/// them (Bochs 2.7's `corei7_skylake_x`), with `overrides` taking precedence: the host the nested-VMX
/// offer is made from, for the exit policy's tests and the fuzz targets.
#[must_use]
pub fn vmx_host_caps(overrides: &[(u32, u64)]) -> ihmi_vmcs::VmxCapabilities {
    use ihmi_arch::msr;
    let table = [
        (msr::IA32_VMX_BASIC, 0x00d8_1000_0000_0001),
        (msr::IA32_VMX_PINBASED_CTLS, 0x0000_007f_0000_0016),
        (msr::IA32_VMX_PROCBASED_CTLS, 0xfff9_fffe_0401_e172),
        (msr::IA32_VMX_EXIT_CTLS, 0x01ff_ffff_0003_6dff),
        (msr::IA32_VMX_ENTRY_CTLS, 0x0003_ffff_0000_11ff),
        (msr::IA32_VMX_MISC, 0x0000_0000_0000_0005),
        (msr::IA32_VMX_CR0_FIXED0, 0x8000_0021),
        (msr::IA32_VMX_CR0_FIXED1, 0xffff_ffff),
        (msr::IA32_VMX_CR4_FIXED0, 0x2000),
        (msr::IA32_VMX_CR4_FIXED1, 0x0037_67ff),
        (msr::IA32_VMX_VMCS_ENUM, 0x2e),
        (msr::IA32_VMX_PROCBASED_CTLS2, 0x0017_b0ff_0000_0000),
        (msr::IA32_VMX_EPT_VPID_CAP, 0x0000_0f01_0673_4141),
        (msr::IA32_VMX_TRUE_PINBASED_CTLS, 0x0000_007f_0000_0016),
        (msr::IA32_VMX_TRUE_PROCBASED_CTLS, 0xfff9_fffe_0400_6172),
        (msr::IA32_VMX_TRUE_EXIT_CTLS, 0x01ff_ffff_0003_6dfb),
        (msr::IA32_VMX_TRUE_ENTRY_CTLS, 0x0003_ffff_0000_11fb),
        (msr::IA32_VMX_VMFUNC, 1),
    ];
    ihmi_vmcs::VmxCapabilities::read(|index| {
        overrides
            .iter()
            .chain(&table)
            .find(|(i, _)| *i == index)
            .map_or(0, |(_, v)| *v)
    })
}
