//! What each Bochs scenario must observe. L0 prints `IHMI-PASS` only when [`judge`] says so.

use core::fmt;

use ihmi_abi::attack::IhmiAttack;
use ihmi_abi::monitor::SyscallEntry;
use ihmi_abi::{
    CpuidRecord, Hypercall, LinuxAttack, Scenario, Status, BAD_HYPERCALL_CASES, CPUID_LEAF_ABI,
    CPUID_LEAF_SIGNATURE,
};
use ihmi_addr::{Gpa, PAGE_SIZE};
use ihmi_arch::msr::{IA32_LSTAR, IA32_SYSENTER_EIP};
use ihmi_hv::nested::vmx::VmxOutcome;
use ihmi_vmcs::{ExitReason, VmInstructionError, VmxInstruction};

use ihmi_abi::monitor::RequestCode;
use ihmi_hv::linux::{TaskError, TaskInfo};
use ihmi_hv::policy::nmi::NmiCounts;
use ihmi_hv::{Alert, ExitCounters, GuestEnd, Locked, Observation, RegionKind};
use ihmi_monitor::{event::comm_bytes, Event, EventKind, RejectReason};

use crate::attacks::MonitorAudit;

const MAX_CPUID: usize = 32;
const MAX_REPORTS: usize = 16;
const MAX_HYPERCALLS: usize = 64;
/// Monitor events the scenario log keeps.
pub const MAX_MONITOR_EVENTS: usize = 128;
const MAX_ALERTS: usize = 16;
/// Emulated VMX instructions the log keeps.
const MAX_VMX: usize = 64;
/// Exits from L2 the log keeps, in order.
const MAX_L2_EXITS: usize = 64;

/// One exit from L2: its reason, and whether it went to L1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L2ExitStep(pub ExitReason, pub bool);

impl Default for L2ExitStep {
    fn default() -> Self {
        Self(ExitReason::Unknown(0), false)
    }
}

/// The nested path as L0 saw it: entries to L2, its exits, the cost of each reflected one.
#[derive(Clone, Debug, Default)]
pub struct NestedLog {
    pub launches: u64,
    pub resumes: u64,
    pub exits: heapless_table::Table<L2ExitStep, MAX_L2_EXITS>,
    /// L0 exits per reflected exit (the exit, L1's handling, the entry back): the largest and sum.
    pub round_trip_max: u64,
    pub round_trip_total: u64,
    pub round_trips: u64,
    /// Every exit from L2, and the reflected ones, by count (`exits` keeps only the first few).
    pub l2_exit_count: u64,
    pub reflected: u64,
    pub reflected_cpuid: u64,
    /// Nested EPT: L2's EPT violations reflected to L1 (EPT12 did not map the page yet), and those
    /// L0 kept (each an EPT02 fill).
    pub reflected_ept: u64,
    pub ept_fills: u64,
    /// L1's INVEPTs that succeeded.
    pub invepts: u64,
    /// L1's INVVPIDs that succeeded (a guest hypervisor that took the VPID offered with nested
    /// EPT makes them).
    pub invvpids: u64,
    /// L1's VMLAUNCHes of a launched VMCS, refused with VMfailValid 4.
    pub relaunches_refused: u64,
    /// Entries whose VMCS12 host state L0 compared with L1's live state (Linux + KVM as L1), and
    /// found equal.
    pub host_state_checked: u64,
    /// The reason of the last reflected exit: the round trip L0 reports at the next entry is its.
    last_reflected: Option<ExitReason>,
    /// The round trips of reflected CPUID exits alone (NESTED.md A.6's measure): count, sum,
    /// largest.
    pub cpuid_round_trips: u64,
    pub cpuid_round_trip_total: u64,
    pub cpuid_round_trip_max: u64,
}

/// How the in-hypervisor monitor's events follow L2's exits: every exit L0 reflected to L1 must
/// reach KVM's `vmx_handle_exit`, and so the monitor, as one `kvm_exit` event with the same basic
/// reason, before L1 enters L2 again (KVM handles every exit of its guest there, bar the fast-path
/// re-entries of 6.1's `vcpu_enter_guest`, which a CPUID and port I/O probe does not make).
#[derive(Clone, Copy, Debug, Default)]
pub struct KvmTrail {
    /// The reflected exit (basic reason) that has not had its event yet.
    pending: Option<u16>,
    /// `kvm_exit` events, those that named the pending exit, and those that did not (no exit was
    /// pending, or another reason).
    pub events: u64,
    pub matched: u64,
    pub unmatched: u64,
    /// Reflected exits after which L1 entered L2 again (or reflected another) with no event.
    pub missed: u64,
    /// The fewest and most exit-handler entries one event says the monitor checked.
    pub handlers_checked: Option<(u64, u64)>,
    /// Events that say some entry differs from the image; `integrity` events of the exit-handler
    /// table, and the first one's (index, address, expected, found).
    pub with_changed_handlers: u64,
    pub integrity: u64,
    pub first_integrity: Option<[u64; 4]>,
    /// `l2_map` events (KVM making a mapping for its guest), those onto memory not the VM's own, and
    /// which of the probe's 512 guest frames (its 2 MiB) they covered, a bit each.
    pub maps: u64,
    pub maps_wrong: u64,
    pub probe_frames_mapped: [u64; 8],
    /// `integrity` events of L2 memory isolation, and the first one's (guest frame, guest-physical
    /// address, the VMM's address, the frame found, its class).
    pub l2_memory: u64,
    pub first_l2_memory: Option<[u64; 5]>,
    /// `integrity` events of `kvm_x86_ops`, and the first one's (index, address, expected, found).
    pub x86_ops: u64,
    pub first_x86_ops: Option<[u64; 4]>,
    /// `vcpu_create` events (the first vCPU's address and id), `kvm_exit` events of a vCPU no such
    /// event named, and `memslot` creations of the probe's own slot (slot 0: its 2 MiB from 0).
    pub vcpus_created: u64,
    pub first_vcpu: Option<(u64, u64)>,
    pub exits_of_unknown_vcpu: u64,
    pub probe_slots: u64,
    /// The first vCPU's VMCS region (its `vcpu_create` event's `vmcs`), and L1's entries to L2
    /// (VMLAUNCHes and VMRESUMEs that entered) whose VMCS L0 found registered (P6): in all, and of a
    /// region other than that one. L0 checks the registry before anything else, so an instruction
    /// that then fails (a VMRESUME of a VMCS not yet launched) is found registered without entering:
    /// `registered` holds the region until the entry, or the failure, follows.
    pub first_vmcs: Option<u64>,
    pub registered_entries: u64,
    pub registered_other: u64,
    registered: Option<u64>,
    /// `vcpu_destroy` events, and those of the first vCPU with its region.
    pub vcpus_destroyed: u64,
    pub first_vcpu_destroyed: u64,
}

impl KvmTrail {
    fn reflected(&mut self, reason: ExitReason) {
        if self.pending.replace(reason.number()).is_some() {
            self.missed += 1;
        }
    }

    fn l2_entry(&mut self) {
        if self.pending.take().is_some() {
            self.missed += 1;
        }
    }

    fn follow(&mut self, event: &Event) {
        match event.kind() {
            Some(EventKind::KvmExit) => {
                self.events += 1;
                if self.first_vcpu.map(|(v, _)| v) != Some(event.args[0]) {
                    self.exits_of_unknown_vcpu += 1;
                }
                match self.pending.take() {
                    Some(r) if u64::from(r) == event.nr & 0xffff => self.matched += 1,
                    _ => self.unmatched += 1,
                }
                let n = event.args[1];
                self.handlers_checked = Some(match self.handlers_checked {
                    Some((lo, hi)) => (lo.min(n), hi.max(n)),
                    None => (n, n),
                });
                self.with_changed_handlers += u64::from(event.args[2] != 0);
            }
            Some(EventKind::Integrity)
                if event.detail == ihmi_monitor::IntegrityProperty::KvmExitHandlers as u16 =>
            {
                self.integrity += 1;
                if self.first_integrity.is_none() {
                    self.first_integrity =
                        Some([event.nr, event.args[0], event.args[1], event.args[2]]);
                }
            }
            Some(EventKind::Integrity)
                if event.detail == ihmi_monitor::IntegrityProperty::L2Memory as u16 =>
            {
                self.l2_memory += 1;
                if self.first_l2_memory.is_none() {
                    let [address, hva, found, class] = event.args;
                    self.first_l2_memory = Some([event.nr, address, hva, found, class]);
                }
            }
            Some(EventKind::Integrity)
                if event.detail == ihmi_monitor::IntegrityProperty::KvmX86Ops as u16 =>
            {
                self.x86_ops += 1;
                self.first_x86_ops.get_or_insert([
                    event.nr,
                    event.args[0],
                    event.args[1],
                    event.args[2],
                ]);
            }
            Some(EventKind::VcpuCreate) => {
                self.vcpus_created += 1;
                self.first_vcpu.get_or_insert((event.args[0], event.nr));
                self.first_vmcs.get_or_insert(event.args[2]);
            }
            Some(EventKind::VcpuDestroy) => {
                self.vcpus_destroyed += 1;
                let first = self.first_vcpu.map(|(v, _)| v) == Some(event.args[0])
                    && self.first_vmcs == Some(event.args[2]);
                self.first_vcpu_destroyed += u64::from(first);
            }
            // Created, slot 0 of address space 0, guest frames 0 to 511.
            Some(EventKind::Memslot)
                if event.detail == 0
                    && event.nr == 0
                    && event.args[1] == 512
                    && event.args[3] & 0xffff_ffff == 0 =>
            {
                self.probe_slots += 1;
            }
            Some(EventKind::L2Map) => {
                self.maps += 1;
                self.maps_wrong += u64::from(event.detail != ihmi_monitor::L2Memory::Ok as u16);
                // A level-2 mapping covers 512 frames, a level-3 one 512 * 512.
                let level = event.args[3].clamp(1, 3);
                let span = 1u64 << (9 * (level - 1));
                let first = event.nr.min(512);
                for gfn in first..event.nr.saturating_add(span).min(512) {
                    self.probe_frames_mapped[(gfn / 64) as usize] |= 1 << (gfn % 64);
                }
            }
            _ => {}
        }
    }
}

/// What `nested-kvm`'s L2 reported through the L1 VMM (`ihmi_abi::NESTED_KVM_L2_REPORT`): the
/// CPUIDs it made, the vendor the last one returned, the pages it wrote and those that read back
/// wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L2Report {
    pub cpuids: u64,
    pub vendor: [u8; 12],
    pub pages: u64,
    pub bad: u64,
}

impl L2Report {
    /// Parses `cpuid=N vendor=VVVVVVVVVVVV pages=N bad=N` (the line after the report's prefix).
    #[must_use]
    pub fn parse(line: &[u8]) -> Option<Self> {
        let rest = line.strip_prefix(b"cpuid=")?;
        let space = rest.iter().position(|&b| b == b' ')?;
        let cpuids = parse_decimal(&rest[..space])?;
        let rest = rest[space + 1..].strip_prefix(b"vendor=")?;
        let vendor: [u8; 12] = rest.get(..12)?.try_into().ok()?;
        let rest = rest[12..].strip_prefix(b" pages=")?;
        let space = rest.iter().position(|&b| b == b' ')?;
        let pages = parse_decimal(&rest[..space])?;
        let bad = parse_decimal(rest[space + 1..].strip_prefix(b"bad=")?)?;
        Some(Self {
            cpuids,
            vendor,
            pages,
            bad,
        })
    }
}

/// `nested-linux`: the lines the L1 VMM relayed from its Linux L2, and its own end.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct L2Linux {
    /// Lines of L2's UART.
    pub console_lines: u64,
    /// Whether one of them was the L2 kernel's banner (`Linux version ...`).
    pub banner: bool,
    /// Whether L2's /init's line came, after the banner.
    pub init: bool,
    /// Whether the VMM said L2 powered itself off, after /init's line.
    pub done: bool,
}

impl L2Linux {
    fn record(&mut self, line: &[u8]) {
        if let Some(text) = line.strip_prefix(ihmi_abi::NESTED_LINUX_CONSOLE.as_bytes()) {
            self.console_lines += 1;
            self.banner |= text.starts_with(b"Linux version ");
        } else if line == ihmi_abi::NESTED_LINUX_L2_INIT.as_bytes() {
            self.init |= self.banner;
        } else if line.starts_with(ihmi_abi::NESTED_LINUX_DONE.as_bytes()) {
            self.done |= self.init;
        }
    }
}

/// One emulated VMX instruction and what it came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmxStep(pub VmxInstruction, pub VmxOutcome);

impl Default for VmxStep {
    fn default() -> Self {
        Self(VmxInstruction::Vmxon, VmxOutcome::NotEmulated)
    }
}
/// Executions of the attacker's the log keeps.
pub const MAX_IDENTITY_RUNS: usize = 16;

/// One exec event of the attacker: the path, whether it was allowed, the program's digest (as the
/// event's words), if it had one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdentityRun {
    pub path: [u8; ihmi_abi::monitor::PATH_LEN],
    pub allowed: bool,
    pub digest: Option<[u64; 4]>,
}

impl Default for IdentityRun {
    fn default() -> Self {
        Self {
            path: [0; ihmi_abi::monitor::PATH_LEN],
            allowed: false,
            digest: None,
        }
    }
}

/// What the guest did, as far as the scenarios care.
#[derive(Clone, Debug, Default)]
pub struct ScenarioLog {
    cpuid_returned: heapless_table::Table<(u32, u32, [u32; 4]), MAX_CPUID>,
    cpuid_reports: heapless_table::Table<CpuidRecord, MAX_REPORTS>,
    hypercalls: heapless_table::Table<(u64, Status), MAX_HYPERCALLS>,
    /// Whole lines the guest wrote to the debug port (0xE9).
    pub debug_lines: u64,
    /// The task a Linux guest was running when it ended (read with the guest profile).
    pub end_task: Option<Result<TaskInfo, TaskError>>,
    /// How far the monitor's events follow the Linux workload program's system calls.
    pub linux_trail: LinuxTrail,
    /// How the guest ended, once it has.
    pub end: Option<GuestEnd>,
    monitor_events: heapless_table::Table<Event, MAX_MONITOR_EVENTS>,
    alerts: heapless_table::Table<Alert, MAX_ALERTS>,
    /// Events the monitor's ring dropped (its own count, read when L0 drained it).
    pub monitor_dropped: u64,
    /// The kernel's linear mappings the monitor reads without a walk, as it reported them at the end:
    /// `None` when it never checked them, else the bytes of the direct map and of the image mapping
    /// it holds (0: that window failed the check).
    pub linear_reads: Option<[u64; 2]>,
    /// Events L0 drained from the ring (the log keeps only the first [`MAX_MONITOR_EVENTS`]).
    pub monitor_drained: u64,
    /// Of those, requests the monitor's checkpoint rejected.
    pub monitor_rejected: u64,
    /// Of those, the Linux flood attack's calls (`getpid` by `ihmi-attack`).
    pub flood_calls: u64,
    /// And the compat attack's (`getpid` by `ihmi-attack` in the i386 table), per 32-bit entry
    /// (indexed by `SyscallEntry`).
    pub compat_calls: [u64; 3],
    /// Times the in-box monitor asked L0 to drain its ring (and L0 did).
    pub ring_drains: u64,
    /// Rejected requests of the `forge` attack: its system call through the call gate (wrong
    /// entry), its exec without the hook's frame (not from the hook).
    pub forged_rejected: [u64; 2],
    /// io_uring events of the attacker (or its io_uring worker threads), per operation of
    /// [`ihmi_abi::attack::LINUX_IO_URING_OPS`].
    pub io_uring_ops: [u64; 4],
    /// What L0 did with NMIs, counted from its observations.
    pub nmis: NmiCounts,
    /// The NMIs the guest kernel says it took, from the `nmi` attack's report line.
    pub guest_nmis: Option<u64>,
    /// The programs the attacker's children were about to run (the `identity` attack's), in order.
    pub identity_runs: heapless_table::Table<IdentityRun, MAX_IDENTITY_RUNS>,
    /// System calls of the attacker the monitor flagged as making memory executable.
    pub exec_mappings: u64,
    /// What the `identity` attack's loaded code returned, from its report line.
    pub identity_loaded: Option<u64>,
    /// The guest's VMX instructions L0 emulated, and what each came to, in order.
    pub vmx: heapless_table::Table<VmxStep, MAX_VMX>,
    /// Nested VMX: L2's entries and exits.
    pub nested: NestedLog,
    /// VMXOFFs of the guest that succeeded.
    pub vmxoffs: u64,
    /// `nested-kvm`: the L2's report as the L1 VMM relayed it (the last one).
    pub l2_report: Option<L2Report>,
    /// `nested-mini-ept`: how many of its own checks L1 says failed before its last step.
    pub l1_checks_failed: Option<u64>,
    /// `nested-linux`: what the L1 VMM relayed of its Linux L2.
    pub l2_linux: L2Linux,
    /// L1's writes of its guest's LSTAR or CSTAR in VMX operation, kept as L2's (L1's own locked).
    pub l2_entry_msr_writes: u64,
    /// `ihmi-kvm`: the in-hypervisor monitor's KVM exit events against the exits L0 reflected.
    pub kvm_trail: KvmTrail,
    /// `ihmi-attack-exit-handler`: the entry the attacker says it rewrote (address, value before,
    /// value written).
    pub exit_handler_attack: Option<[u64; 3]>,
    /// `ihmi-attack-kvm-text`: where the attacker says it writes; `ihmi-attack-vmcs12-region`: how
    /// many VMCS regions it says it overwrote; `ihmi-attack-l2-map`: where it says its guest writes.
    pub kvm_text_attack: Option<u64>,
    pub vmcs12_regions_overwritten: Option<u64>,
    pub l2_map_attack: Option<u64>,
    /// `ihmi-attack-l2-map-monitor`: where in the monitor's page the attacker says its guest writes.
    pub l2_map_monitor_attack: Option<u64>,
    /// `ihmi-attack-l2-vmfunc`: the #UD faults the guest's handler reported (through the L1 VMM),
    /// and the exits from L2 L0 saw with reason VMFUNC (there must be none: VMCS02 has no VM
    /// functions).
    pub l2_vmfunc_faults: Option<u64>,
    pub l2_vmfunc_exits: u64,
    /// `ihmi-attack-host-state`: what the attacker says its VMWRITE put in HOST_RIP.
    pub host_state_attack: Option<u64>,
    /// `ihmi-attack-rogue-vmcs`: what the attacker says of its VMLAUNCH: its region, RFLAGS after
    /// the VMLAUNCH, the VM-instruction error, RFLAGS after KVM's VMCS was made current again.
    pub rogue_vmcs_attack: Option<[u64; 4]>,
    /// `ihmi-attack-starve`: what the attacker says of running KVM's guest from its own code: the
    /// VMCS, the exits it took, the last one's basic reason, the RFLAGS bits of its putting KVM's
    /// fields back.
    pub starve_attack: Option<[u64; 4]>,
    /// `ihmi-attack-kvm-ops`: the word the attacker says it rewrote: its index, address, value before
    /// and value written.
    pub kvm_ops_attack: Option<[u64; 4]>,
    /// `linux-attack-forge`: the IDT base the attacker's ring-0 code loaded, and IDTR's base before
    /// and after the exit it made.
    pub idt_attack: Option<[u64; 3]>,
    /// `nested-kvm-sim`: the exec monitor let the L1 VMM start (allowed executions of it), and the
    /// system-call monitor saw its `ioctl`s (to KVM).
    pub vmm_execs_allowed: u64,
    pub vmm_ioctls: u64,
    /// `multiboot1`/`multiboot2`: the digest of what L0 handed the kernel (L0 sets it at boot)...
    pub multiboot_handed: Option<u64>,
    /// How many modules L0 moved out of the multiboot kernel's way (L0 sets it at boot).
    pub multiboot_moved: u32,
    /// ...the digest the kernel reported of what it found, and how many of its own checks failed.
    pub multiboot_found: Option<u64>,
    pub multiboot_checks_failed: Option<u64>,
    bench_results: heapless_table::Table<crate::bench::BenchResult, 4>,
}

impl ScenarioLog {
    /// Remembers what the exit policy reported, as far as a verdict needs it.
    pub fn record(&mut self, observation: &Observation<'_>) {
        match *observation {
            Observation::Cpuid {
                leaf,
                subleaf,
                regs,
            } => self.record_cpuid(leaf, subleaf, regs),
            Observation::CpuidReport(record) => self.record_cpuid_report(record),
            Observation::Hypercall { nr, status } => {
                if nr == Hypercall::RingHighWater as u64 && status == Status::Ok {
                    self.ring_drains += 1;
                }
                self.record_hypercall(nr, status);
            }
            Observation::DebugLine { line, .. } => {
                self.debug_lines += 1;
                let report = ihmi_abi::attack::LINUX_NMI_REPORT.as_bytes();
                if let Some(n) = line.strip_prefix(report).and_then(parse_decimal) {
                    self.guest_nmis = Some(n);
                }
                let loaded = ihmi_abi::attack::LINUX_IDENTITY_LOADER_REPORT.as_bytes();
                if let Some(n) = line.strip_prefix(loaded).and_then(parse_decimal) {
                    self.identity_loaded = Some(n);
                }
                let l1 = ihmi_abi::NESTED_MINI_EPT_REPORT.as_bytes();
                if let Some(n) = line.strip_prefix(l1).and_then(parse_decimal) {
                    self.l1_checks_failed = Some(n);
                }
                let l2 = ihmi_abi::NESTED_KVM_L2_REPORT.as_bytes();
                if let Some(report) = line.strip_prefix(l2).and_then(L2Report::parse) {
                    self.l2_report = Some(report);
                }
                self.l2_linux.record(line);
                let rewritten = ihmi_abi::attack::IHMI_EXIT_HANDLER_LINE.as_bytes();
                if let Some(words) = line.strip_prefix(rewritten).and_then(parse_hex_words::<3>) {
                    self.exit_handler_attack = Some(words);
                }
                if let Some(at) = hex_after(line, ihmi_abi::attack::IHMI_KVM_TEXT_LINE) {
                    self.kvm_text_attack = Some(at);
                }
                if let Some(at) = hex_after(line, ihmi_abi::attack::IHMI_L2_MAP_LINE) {
                    self.l2_map_attack = Some(at);
                }
                if let Some(at) = hex_after(line, ihmi_abi::attack::IHMI_L2_MAP_MONITOR_LINE) {
                    self.l2_map_monitor_attack = Some(at);
                }
                if let Some(at) = hex_after(line, ihmi_abi::attack::IHMI_HOST_STATE_LINE) {
                    self.host_state_attack = Some(at);
                }
                let rogue = ihmi_abi::attack::IHMI_ROGUE_VMCS_LINE.as_bytes();
                if let Some(words) = line.strip_prefix(rogue).and_then(parse_hex_words::<4>) {
                    self.rogue_vmcs_attack = Some(words);
                }
                let idt = ihmi_abi::attack::LINUX_IDT_LINE.as_bytes();
                if let Some(words) = line.strip_prefix(idt).and_then(parse_hex_words::<3>) {
                    self.idt_attack = Some(words);
                }
                let ops = ihmi_abi::attack::IHMI_KVM_OPS_LINE.as_bytes();
                if let Some(words) = line.strip_prefix(ops).and_then(parse_hex_words::<4>) {
                    self.kvm_ops_attack = Some(words);
                }
                let starve = ihmi_abi::attack::IHMI_STARVE_LINE.as_bytes();
                if let Some(words) = line.strip_prefix(starve).and_then(parse_hex_words::<4>) {
                    self.starve_attack = Some(words);
                }
                let faults = ihmi_abi::attack::IHMI_L2_VMFUNC_REPORT.as_bytes();
                if let Some(n) = line.strip_prefix(faults).and_then(parse_decimal) {
                    self.l2_vmfunc_faults = Some(n);
                }
                let regions = ihmi_abi::attack::IHMI_VMCS12_REGION_LINE.as_bytes();
                if let Some(n) = line.strip_prefix(regions).and_then(parse_decimal) {
                    self.vmcs12_regions_overwritten = Some(n);
                }
                let handed = ihmi_abi::multiboot::HANDED.as_bytes();
                if let Some(d) = line.strip_prefix(handed).and_then(parse_hex16) {
                    self.multiboot_found = Some(d);
                }
                let failed = ihmi_abi::multiboot::CHECKS_FAILED.as_bytes();
                if let Some(n) = line.strip_prefix(failed).and_then(parse_decimal) {
                    self.multiboot_checks_failed = Some(n);
                }
            }
            Observation::NmiTaken {
                in_monitor_view,
                merged,
            } => {
                self.nmis.taken += 1;
                self.nmis.in_monitor_view += u64::from(in_monitor_view);
                self.nmis.merged += u64::from(merged);
            }
            Observation::NmiDelivered => self.nmis.delivered += 1,
            Observation::Vmx {
                instruction,
                outcome,
            } => {
                match (instruction, outcome) {
                    (VmxInstruction::Vmxoff, VmxOutcome::Succeed) => self.vmxoffs += 1,
                    (VmxInstruction::Invept, VmxOutcome::Succeed) => self.nested.invepts += 1,
                    (VmxInstruction::Invvpid, VmxOutcome::Succeed) => self.nested.invvpids += 1,
                    (VmxInstruction::Vmlaunch, VmxOutcome::FailValid(4)) => {
                        self.nested.relaunches_refused += 1;
                    }
                    _ => {}
                }
                if matches!(
                    instruction,
                    VmxInstruction::Vmlaunch | VmxInstruction::Vmresume
                ) && outcome != VmxOutcome::Entered
                {
                    self.kvm_trail.registered = None;
                }
                self.vmx.push(VmxStep(instruction, outcome));
            }
            Observation::L2Entry { launch, round_trip } => {
                self.kvm_trail.l2_entry();
                let t = &mut self.kvm_trail;
                if let Some(gpa) = t.registered.take() {
                    t.registered_entries += 1;
                    t.registered_other += u64::from(t.first_vmcs != Some(gpa));
                }
                let n = &mut self.nested;
                if launch {
                    n.launches += 1;
                } else {
                    n.resumes += 1;
                }
                if let Some(r) = round_trip {
                    n.round_trips += 1;
                    n.round_trip_total += r;
                    n.round_trip_max = n.round_trip_max.max(r);
                    if n.last_reflected == Some(ExitReason::Cpuid) {
                        n.cpuid_round_trips += 1;
                        n.cpuid_round_trip_total += r;
                        n.cpuid_round_trip_max = n.cpuid_round_trip_max.max(r);
                    }
                }
            }
            Observation::L2Exit { reason, reflected } => {
                self.l2_vmfunc_exits += u64::from(reason == ExitReason::Vmfunc);
                let n = &mut self.nested;
                n.exits.push(L2ExitStep(reason, reflected));
                n.l2_exit_count += 1;
                if reason == ExitReason::EptViolation {
                    if reflected {
                        n.reflected_ept += 1;
                    } else {
                        n.ept_fills += 1;
                    }
                }
                if reflected {
                    self.kvm_trail.reflected(reason);
                    n.reflected += 1;
                    n.reflected_cpuid += u64::from(reason == ExitReason::Cpuid);
                    n.last_reflected = Some(reason);
                }
            }
            Observation::Alert(alert) => self.record_alert(alert),
            Observation::L2EntryMsr { .. } => self.l2_entry_msr_writes += 1,
            Observation::L1HostStateChecked => self.nested.host_state_checked += 1,
            Observation::L1VmcsRegistered { gpa } => self.kvm_trail.registered = Some(gpa.raw()),
            Observation::Ended { end, task } => {
                self.end = Some(end);
                self.end_task = task;
            }
            Observation::Msr { .. }
            | Observation::Xsetbv { .. }
            | Observation::Io { .. }
            | Observation::BenchMark(_) => {}
        }
    }

    /// Remembers what L0 returned for a CPUID leaf (the latest answer per leaf).
    pub fn record_cpuid(&mut self, leaf: u32, subleaf: u32, regs: [u32; 4]) {
        let known = self
            .cpuid_returned
            .as_slice()
            .iter()
            .position(|e| e.0 == leaf && e.1 == subleaf);
        match known {
            Some(i) => self.cpuid_returned.set(i, (leaf, subleaf, regs)),
            None => self.cpuid_returned.push((leaf, subleaf, regs)),
        }
    }

    /// Remembers what the guest says it saw.
    pub fn record_cpuid_report(&mut self, record: CpuidRecord) {
        self.cpuid_reports.push(record);
    }

    /// Remembers a hypercall and the status L0 gave it.
    pub fn record_hypercall(&mut self, nr: u64, status: Status) {
        self.hypercalls.push((nr, status));
    }

    /// Remembers an event L0 drained from the monitor's ring.
    pub fn record_monitor_event(&mut self, event: &Event) {
        self.monitor_drained += 1;
        self.kvm_trail.follow(event);
        self.linux_trail.follow(event);
        if event.kind() == Some(EventKind::Rejected) {
            self.monitor_rejected += 1;
            let forged = match (
                RejectReason::from_raw(event.detail),
                RequestCode::from_raw(event.nr),
            ) {
                (Some(RejectReason::WrongEntry), Some(RequestCode::Syscall))
                    if event.args[0] == ihmi_abi::attack::LINUX_FORGED_SYSCALL_NR =>
                {
                    Some(0)
                }
                (Some(RejectReason::NotFromHook), Some(RequestCode::Exec)) => Some(1),
                _ => None,
            };
            if let Some(i) = forged {
                self.forged_rejected[i] += 1;
            }
        }
        let comm = comm_bytes(&event.comm);
        if event.kind() == Some(EventKind::IoUring)
            && (comm == b"ihmi-attack" || comm.starts_with(b"iou-wrk-"))
        {
            let ops = ihmi_abi::attack::LINUX_IO_URING_OPS;
            if let Some(i) = ops.iter().position(|&op| u64::from(op) == event.nr) {
                self.io_uring_ops[i] += 1;
            }
        }
        if event.kind() == Some(EventKind::Exec) && comm == b"ihmi-attack" {
            self.identity_runs.push(IdentityRun {
                path: event.path,
                allowed: event.verdict == ihmi_abi::monitor::Verdict::Allow as i32,
                digest: (event.detail >> ihmi_monitor::event::EXEC_IDENTITY_SHIFT == 0)
                    .then_some(event.args),
            });
        }
        if event.kind() == Some(EventKind::Exec)
            && ihmi_monitor::event::nul_padded(&event.path) == LINUX_L1_VMM_PATH
            && event.verdict == ihmi_abi::monitor::Verdict::Allow as i32
        {
            self.vmm_execs_allowed += 1;
        }
        if event.kind() == Some(EventKind::Syscall)
            && comm == LINUX_L1_VMM
            && event.nr == LINUX_IOCTL_NR
        {
            self.vmm_ioctls += 1;
        }
        let by_attacker = event.kind() == Some(EventKind::Syscall) && comm == b"ihmi-attack";
        if by_attacker && event.detail & ihmi_monitor::event::SYSCALL_EXEC_MAPPING != 0 {
            self.exec_mappings += 1;
        }
        match event.syscall_entry() {
            Some(SyscallEntry::Syscall)
                if by_attacker && event.nr == ihmi_abi::attack::LINUX_FLOOD_NR =>
            {
                self.flood_calls += 1;
            }
            Some(e)
                if by_attacker
                    && e.is_compat()
                    && event.nr == ihmi_abi::attack::LINUX_COMPAT_NR =>
            {
                self.compat_calls[e as usize] += 1;
            }
            _ => {}
        }
        self.monitor_events.push(*event);
    }

    /// Remembers a finished benchmark window.
    pub fn record_bench(&mut self, result: crate::bench::BenchResult) {
        self.bench_results.push(result);
    }

    /// The finished benchmark windows.
    #[must_use]
    pub fn bench_results(&self) -> &[crate::bench::BenchResult] {
        self.bench_results.as_slice()
    }

    /// Remembers an alert L0 raised.
    pub fn record_alert(&mut self, alert: Alert) {
        self.alerts.push(alert);
    }

    /// The alerts so far, in order.
    #[must_use]
    pub fn alerts(&self) -> &[Alert] {
        self.alerts.as_slice()
    }

    /// The monitor's events so far, in order.
    #[must_use]
    pub fn monitor_events(&self) -> &[Event] {
        self.monitor_events.as_slice()
    }

    /// The hypercalls so far, in order.
    #[must_use]
    pub fn hypercalls(&self) -> &[(u64, Status)] {
        self.hypercalls.as_slice()
    }
}

/// Tiny fixed-capacity vector; extra pushes are counted, not stored.
mod heapless_table {
    #[derive(Clone, Debug)]
    pub struct Table<T: Copy + Default, const N: usize> {
        items: [T; N],
        len: usize,
        pub dropped: u64,
    }

    impl<T: Copy + Default, const N: usize> Default for Table<T, N> {
        fn default() -> Self {
            Self {
                items: [T::default(); N],
                len: 0,
                dropped: 0,
            }
        }
    }

    impl<T: Copy + Default, const N: usize> Table<T, N> {
        pub fn push(&mut self, item: T) {
            if self.len < N {
                self.items[self.len] = item;
                self.len += 1;
            } else {
                self.dropped += 1;
            }
        }
        pub fn as_slice(&self) -> &[T] {
            &self.items[..self.len]
        }
        pub fn set(&mut self, i: usize, item: T) {
            if i < self.len {
                self.items[i] = item;
            }
        }
    }
}

/// The outcome of a scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Everything the scenario requires was observed.
    Pass,
    /// Something was missing or wrong.
    Fail(FailReason),
}

/// Why a scenario failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailReason {
    /// The guest has not ended (L0 judged too early: a bug).
    NotEnded,
    /// The guest ended the wrong way.
    WrongEnd {
        expected: &'static str,
        got: GuestEnd,
    },
    /// The guest's own checks failed (it called `Done` with this non-zero code).
    GuestCheckFailed(u64),
    /// The guest never reported what it saw for this leaf.
    MissingCpuidReport(u32),
    /// The guest saw something other than what L0 returned.
    CpuidMismatch(u32),
    /// CPUID leaf 1 showed VMX, or did not show the hypervisor bit.
    CpuidPolicyNotApplied,
    /// Hypercall number `index` of the battery got the wrong status (None: it never happened).
    HypercallStatus {
        index: usize,
        expected: Status,
        got: Option<Status>,
    },
    /// The scenario needs at least one exit of this kind and saw none.
    MissingExit(ExitReason),
    /// An intercepted #BP was not seen.
    MissingException(u8),
    /// The probe address is not L0-owned in L0's own map: the scenario could prove nothing.
    ProbeNotL0Owned,
    /// The monitor's event `index` differs from what the workload must produce (None: it is missing).
    MonitorEvent {
        index: usize,
        expected: ExpectedEvent,
        got: Option<SeenEvent>,
    },
    /// The monitor produced more events than the workload explains (this many).
    ExtraMonitorEvents(usize),
    /// The monitor's ring dropped events.
    MonitorDropped(u64),
    /// Attack scenarios are judged by `attacks::judge_attack`, not here.
    AttackScenario,
    /// An attack scenario ran without an in-box monitor to attack.
    NoMonitor,
    /// The monitor's fixed parts or its ring's counters are not as at load after the run.
    MonitorChanged(MonitorAudit),
    /// The attack was not blocked, not reported, or left the monitor damaged.
    Attack(crate::attacks::AttackOutcome),
    /// A Linux guest ended from another task than the scenario's.
    WrongTask(TaskInfo),
    /// The running Linux task could not be read.
    NoTask(TaskError),
    /// An attack step was not refused (which one).
    AttackNotBlocked(&'static str),
    /// Calls through one way into the kernel did not all reach the monitor.
    EntryNotMonitored {
        entry: &'static str,
        made: u64,
        seen: u64,
    },
    /// NMIs were not all delivered to the guest, or the attack made too few of them (or none in the
    /// monitor's view) to show anything.
    NmisLost {
        /// What L0 did with them.
        l0: NmiCounts,
        /// What the guest kernel counted.
        guest: Option<u64>,
    },
    /// A request forged by ring-0 code was not rejected for the reason it should have been: how many
    /// of each (system call through the call gate; exec without the hook's frame) were.
    ForgeryNotRejected {
        wrong_entry: u64,
        not_from_hook: u64,
    },
    /// An operation the attacker submitted through io_uring (`IORING_OP_*`) made no event.
    IoUringNotSeen { opcode: u8 },
    /// The `identity` attack's executions were not judged by what they run (what was wrong).
    IdentityNotJudged(&'static str),
    /// The guest's VMX instructions did not come to the outcomes the SDM gives them.
    VmxSteps,
    /// L2 did not run as the scenario has it: which part.
    NestedRun(&'static str),
    /// A flood of events was not all kept.
    EventsLost {
        expected: u64,
        seen: u64,
        dropped: u64,
        drains: u64,
    },
    /// Blocked, but L0 raised no alert saying what it was.
    AttackNotReported(&'static str),
    /// The monitor's events did not show the Linux workload's system calls (how far they got).
    WorkloadNotSeen(LinuxTrail),
    /// In the box the monitor must read the kernel's direct map and image mapping without a walk;
    /// out of the box it must not (the baseline walks by definition). What it reported.
    LinearReads {
        inbox: bool,
        found: Option<[u64; 2]>,
    },
    /// The benchmark's counts do not have the structure its mode must give.
    Bench(crate::bench::BenchFault),
    /// VM entry failed in a way the scenario did not ask for.
    UnexpectedEntryFailure(EntryFailure),
    /// The scenario is about VM-entry failure, but the guest ran.
    EntryDidNotFail,
    /// The multiboot kernel found other boot information than L0 handed it (the two digests; None:
    /// not reported or not set).
    MultibootHanded {
        handed: Option<u64>,
        found: Option<u64>,
    },
    /// The multiboot kernel's own checks of its entry and boot information failed (this many; None:
    /// it never said).
    MultibootChecks(Option<u64>),
    /// No module lay where the test kernel loads, so L0 moved none: the scenario no longer tests
    /// moving them (GRUB placed them elsewhere).
    MultibootNothingMoved,
}

impl fmt::Display for FailReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotEnded => f.write_str("guest has not ended"),
            Self::MultibootHanded { handed, found } => write!(
                f,
                "the multiboot kernel found boot information with digest {} but L0 handed {}",
                Hex16(*found),
                Hex16(*handed)
            ),
            Self::MultibootChecks(Some(n)) => {
                write!(f, "{n} of the multiboot kernel's own checks failed")
            }
            Self::MultibootChecks(None) => {
                f.write_str("the multiboot kernel never reported its checks")
            }
            Self::MultibootNothingMoved => f.write_str(
                "no module lay where the multiboot test kernel loads, so L0 moved none: the scenario no longer tests moving them",
            ),
            Self::WrongEnd { expected, got } => write!(f, "expected {expected}, but {got}"),
            Self::GuestCheckFailed(code) => {
                write!(f, "the guest's own checks failed (Done({code}))")
            }
            Self::MissingCpuidReport(leaf) => {
                write!(f, "no report of CPUID leaf {leaf:#x} from the guest")
            }
            Self::CpuidMismatch(leaf) => write!(
                f,
                "guest saw other values than L0 returned for CPUID leaf {leaf:#x}"
            ),
            Self::CpuidPolicyNotApplied => {
                f.write_str("CPUID leaf 1 shows VMX or lacks the hypervisor bit")
            }
            Self::HypercallStatus {
                index,
                expected,
                got,
            } => match got {
                Some(got) => write!(
                    f,
                    "hypercall case {index} returned {got}, expected {expected}"
                ),
                None => write!(
                    f,
                    "hypercall case {index} never happened (expected {expected})"
                ),
            },
            Self::MissingExit(r) => write!(f, "no {} exit was handled", r.name()),
            Self::MissingException(v) => write!(f, "no intercepted exception with vector {v}"),
            Self::ProbeNotL0Owned => f.write_str("the probe address is not L0-owned"),
            Self::UnexpectedEntryFailure(EntryFailure::FailInvalid) => {
                f.write_str("unexpected VM entry failure: VMfailInvalid")
            }
            Self::UnexpectedEntryFailure(EntryFailure::FailValid(e)) => {
                write!(f, "unexpected VM entry failure: {e}")
            }
            Self::UnexpectedEntryFailure(EntryFailure::Exit(r)) => {
                write!(f, "unexpected VM entry failure: {}", r.name())
            }
            Self::MonitorEvent {
                index,
                expected,
                got,
            } => {
                write!(f, "monitor event {index}: expected {expected}, got ")?;
                match got {
                    Some(e) => write!(
                        f,
                        "kind {} pid {} ppid {} nr {} verdict {}",
                        e.kind, e.pid, e.ppid, e.nr, e.verdict
                    ),
                    None => f.write_str("nothing"),
                }
            }
            Self::ExtraMonitorEvents(n) => {
                write!(
                    f,
                    "the monitor produced {n} events the workload does not explain"
                )
            }
            Self::MonitorDropped(n) => write!(f, "the monitor's ring dropped {n} events"),
            Self::AttackScenario => {
                f.write_str("attack scenarios are judged by attacks::judge_attack")
            }
            Self::NoMonitor => f.write_str("the attack scenario ran without a monitor"),
            Self::MonitorChanged(a) => write!(
                f,
                "the monitor changed during the run: fixed parts intact={}, ring consistent={}",
                a.image_intact, a.ring_consistent
            ),
            Self::Attack(o) => write!(
                f,
                "attack {}: blocked={} reported={} monitor_intact={}",
                o.attack.name(),
                o.blocked,
                o.reported,
                o.monitor_intact
            ),
            Self::Bench(fault) => write!(f, "benchmark structure: {fault:?}"),
            Self::WrongTask(t) => write!(f, "the guest ended from the wrong task: {t}"),
            Self::NoTask(e) => write!(f, "cannot read the running task: {e}"),
            Self::AttackNotBlocked(what) => write!(f, "not blocked: {what}"),
            Self::AttackNotReported(what) => write!(f, "blocked but not reported: {what}"),
            Self::EntryNotMonitored { entry, made, seen } => write!(
                f,
                "{made} system calls through {entry} gave {seen} events"
            ),
            Self::ForgeryNotRejected {
                wrong_entry,
                not_from_hook,
            } => write!(
                f,
                "the forged system call was rejected for its entry {wrong_entry} times and the forged exec for its frame {not_from_hook} times (1 each expected)"
            ),
            Self::IdentityNotJudged(what) => write!(f, "program identity: {what}"),
            Self::NestedRun(what) => write!(f, "nested VMX, L2: {what} (see L0's `nested:` lines)"),
            Self::VmxSteps => f.write_str(
                "the guest's VMX instructions did not come to the SDM's outcomes, in order (see L0's `nested:` lines)",
            ),
            Self::IoUringNotSeen { opcode } => write!(
                f,
                "the io_uring operation {opcode} the attacker submitted made no io_uring event"
            ),
            Self::NmisLost { l0, guest } => write!(
                f,
                "L0 took {} NMIs ({} in the monitor's view, {} merged) and delivered {}; the guest counted {}",
                l0.taken,
                l0.in_monitor_view,
                l0.merged,
                l0.delivered,
                guest.map_or(-1, |g| g as i64)
            ),
            Self::EventsLost {
                expected,
                seen,
                dropped,
                drains,
            } => write!(
                f,
                "the flood's {expected} calls gave {seen} events, {dropped} dropped, after {drains} high-water drains"
            ),
            Self::LinearReads { inbox: true, found } => write!(
                f,
                "in the box the monitor must hold both linear windows (direct map, kernel image) after its check; it reported {found:?} (bytes held, None: never checked)"
            ),
            Self::LinearReads { inbox: false, found } => write!(
                f,
                "out of the box the monitor must walk every read; it reported linear windows {found:?}"
            ),
            Self::WorkloadNotSeen(t) => write!(
                f,
                "the monitor saw {} of the workload's {} system calls ({} events named {}; pid {}, parent {}; its exec by pid {}); the intruder refused {} times, ran: {}",
                t.matched,
                LINUX_WORKLOAD.1.len(),
                t.events,
                LINUX_WORKLOAD.0,
                t.pid,
                t.ppid,
                t.workload_exec_pid,
                t.intruder_refused,
                t.intruder_ran
            ),
            Self::EntryDidNotFail => {
                f.write_str("VM entry was expected to fail, but the guest ran")
            }
        }
    }
}

/// Leaves the guest must report in `boot` and `demo`.
const REPORTED_LEAVES: [u32; 4] = [0, 1, CPUID_LEAF_SIGNATURE, CPUID_LEAF_ABI];

fn check_cpuid(log: &ScenarioLog) -> Result<(), FailReason> {
    for leaf in REPORTED_LEAVES {
        let report = log
            .cpuid_reports
            .as_slice()
            .iter()
            .find(|r| r.leaf == leaf && r.subleaf == 0)
            .ok_or(FailReason::MissingCpuidReport(leaf))?;
        let returned = log
            .cpuid_returned
            .as_slice()
            .iter()
            .find(|e| e.0 == leaf && e.1 == 0)
            .ok_or(FailReason::CpuidMismatch(leaf))?;
        if returned.2 != report.regs {
            return Err(FailReason::CpuidMismatch(leaf));
        }
        if leaf == 1 && (report.regs[2] & (1 << 5) != 0 || report.regs[2] & (1 << 31) == 0) {
            return Err(FailReason::CpuidPolicyNotApplied);
        }
    }
    Ok(())
}

fn expect_done_zero(log: &ScenarioLog) -> Result<(), FailReason> {
    match log.end {
        None => Err(FailReason::NotEnded),
        Some(GuestEnd::Done(0)) => Ok(()),
        Some(GuestEnd::Done(code)) => Err(FailReason::GuestCheckFailed(code)),
        Some(got) => Err(FailReason::WrongEnd {
            expected: "the guest to call Done(0)",
            got,
        }),
    }
}

fn expect_ping(log: &ScenarioLog) -> Result<(), FailReason> {
    let ping = Hypercall::Ping as u64;
    if log
        .hypercalls()
        .iter()
        .any(|&(nr, s)| nr == ping && s == Status::Ok)
    {
        Ok(())
    } else {
        Err(FailReason::MissingExit(ExitReason::Vmcall))
    }
}

fn check(
    scenario: Scenario,
    log: &ScenarioLog,
    counters: &ExitCounters,
    probe: Gpa,
    probe_region: Option<RegionKind>,
) -> Result<(), FailReason> {
    match scenario {
        Scenario::Boot => {
            expect_done_zero(log)?;
            check_cpuid(log)?;
            expect_ping(log)
        }
        Scenario::EptGuard => check_ept_guard(log, probe, probe_region),
        Scenario::BadHypercall => check_bad_hypercalls(log),
        Scenario::Demo => check_demo(log, counters),
        Scenario::EntryBadControl | Scenario::EntryBadGuestState => {
            Err(FailReason::EntryDidNotFail)
        }
        Scenario::Attack(_) => Err(FailReason::AttackScenario),
        // Linux booted, ran our /init, and /init's last program wrote its line on the debug port and
        // asked for the power-off L0 intercepts.
        Scenario::LinuxBoot => linux_run_ended_well(log),
        Scenario::LinuxSim => check_linux_sim(log, true),
        Scenario::LinuxSimOutbox => check_linux_sim(log, false),
        Scenario::LinuxAttack(LinuxAttack::Root) => check_linux_attack(log),
        Scenario::LinuxAttack(LinuxAttack::KernelText) => {
            check_locked_write(log, Locked::KernelText, "patching kernel text")
        }
        Scenario::LinuxAttack(LinuxAttack::ProcessPgd) => check_process_pgd(log),
        Scenario::LinuxAttack(LinuxAttack::Flood) => check_flood(log),
        Scenario::LinuxAttack(LinuxAttack::Compat) => check_compat(log),
        Scenario::LinuxAttack(LinuxAttack::Nmi) => check_nmi(log),
        Scenario::LinuxAttack(LinuxAttack::Forge) => check_forge(log),
        Scenario::LinuxAttack(LinuxAttack::IoUring) => check_io_uring(log),
        Scenario::LinuxAttack(LinuxAttack::Identity) => check_identity(log),
        Scenario::LinuxAttack(LinuxAttack::GatePgd) => check_locked_write(
            log,
            Locked::GatePath,
            "redirecting the gate's slot in the kernel's PGD",
        ),
        Scenario::NestedVmxon => {
            check_vmx_steps(log, &NESTED_VMXON_STEPS, "a VMXON region in L0's memory")
        }
        Scenario::NestedVmcs => check_vmx_steps(log, &NESTED_VMCS_STEPS, "a VMCS in L0's memory"),
        Scenario::NestedMini => check_nested_mini(log, NESTED_MAX_ROUND_TRIP),
        Scenario::NestedMiniShadow => check_nested_mini(log, NESTED_MAX_ROUND_TRIP_SHADOW),
        Scenario::NestedMiniEpt => check_nested_mini_ept(log),
        Scenario::NestedKvm => check_nested_kvm(log, NESTED_MAX_ROUND_TRIP),
        Scenario::NestedKvmShadow => check_nested_kvm(log, NESTED_MAX_ROUND_TRIP_SHADOW),
        Scenario::NestedKvmEpt => {
            check_nested_kvm(log, NESTED_MAX_ROUND_TRIP_SHADOW)?;
            check_nested_ept(log)?;
            // KVM took the VPID offered with nested EPT: it invalidates by VPID.
            if log.nested.invvpids == 0 {
                return Err(FailReason::NestedRun(
                    "KVM made no INVVPID: it did not take the VPID L0 offers with nested EPT",
                ));
            }
            Ok(())
        }
        // The in-box monitors saw L1's workload as in `linux-sim`, and KVM ran its L2 as in
        // `nested-kvm-shadow`: one does not get in the other's way.
        Scenario::NestedKvmSim => {
            check_linux_sim(log, true)?;
            check_nested_kvm(log, NESTED_MAX_ROUND_TRIP_SHADOW)?;
            if log.vmm_execs_allowed == 0 || log.vmm_ioctls == 0 {
                return Err(FailReason::NestedRun(
                    "the in-box monitors did not see the L1 VMM start (allowed) and drive KVM (ioctl)",
                ));
            }
            // The probe's L2 has EFER.SCE, so KVM loads its LSTAR before entering it while L1's own
            // stays locked behind the gate.
            if log.l2_entry_msr_writes == 0 {
                return Err(FailReason::NestedRun(
                    "KVM wrote no L2 LSTAR or CSTAR beside L1's locked ones",
                ));
            }
            Ok(())
        }
        Scenario::IhmiKvm | Scenario::IhmiKvmOutbox => check_ihmi_kvm(log, None),
        // The monitor reported exactly the entry the attacker rewrote, as it was and as it became,
        // and went on seeing every exit.
        Scenario::IhmiAttack(IhmiAttack::ExitHandler) => match log.exit_handler_attack {
            None => Err(FailReason::NestedRun(
                "the attacker did not say it rewrote an exit-handler entry (see the guest's console)",
            )),
            Some([at, was, new]) => check_ihmi_kvm(
                log,
                Some(Rewritten::ExitHandler([
                    ihmi_abi::attack::IHMI_EXIT_HANDLER_INDEX,
                    at,
                    was,
                    new,
                ])),
            ),
        },
        // The monitor reported exactly the word of `kvm_x86_ops` the attacker rewrote, against L0's
        // copy from the end of the boot, and went on seeing every exit.
        Scenario::IhmiAttack(IhmiAttack::KvmOps) => match log.kvm_ops_attack {
            None => Err(FailReason::NestedRun(
                "the attacker did not say it rewrote a word of kvm_x86_ops (see the guest's console)",
            )),
            Some(word) => check_ihmi_kvm(log, Some(Rewritten::X86Ops(word))),
        },
        // The write onto KVM's text (the monitor's call in `vmx_handle_exit`) was the one L0's
        // lock on L1's text stopped, at the address the attacker named.
        Scenario::IhmiAttack(IhmiAttack::KvmText) => {
            check_locked_write(log, Locked::KernelText, "overwriting the monitor's call in KVM")?;
            match (log.kvm_text_attack, log.end) {
                (Some(at), Some(GuestEnd::EptViolation { gpa, .. })) if gpa.raw() == at => Ok(()),
                _ => Err(FailReason::AttackNotBlocked(
                    "overwriting the monitor's call in KVM (the write L0 stopped was another)",
                )),
            }
        }
        // L1's copy of VMCS12 was overwritten while KVM's guest ran, to no effect: the run is
        // `ihmi-kvm`'s in every respect.
        // L2's VMFUNC faulted in L2 (its handler said so once, through the VMM), never reached L0
        // as a VMFUNC exit, and the run is otherwise `ihmi-kvm`'s (KVM reflected the #UD to its
        // guest: one more exception exit, which the monitor saw like every other).
        Scenario::IhmiAttack(IhmiAttack::L2Vmfunc) => {
            if log.l2_vmfunc_exits != 0 {
                return Err(FailReason::AttackNotBlocked(
                    "VMFUNC from KVM's guest (L0 saw a VMFUNC exit: VMCS02 had VM functions)",
                ));
            }
            if log.l2_vmfunc_faults != Some(1) {
                return Err(FailReason::AttackNotBlocked(
                    "VMFUNC from KVM's guest (its #UD handler did not report exactly one fault)",
                ));
            }
            check_ihmi_kvm(log, None)
        }
        // The VMWRITE of HOST_RIP went through (host state is L1's to write), and L0 refused KVM's
        // next entry for it, naming the field and the value; L1 ran on to /init's end.
        Scenario::IhmiAttack(IhmiAttack::HostState) => {
            let Some(evil) = log.host_state_attack else {
                return Err(FailReason::NestedRun(
                    "the attacker did not say its VMWRITE went through (see the guest's console)",
                ));
            };
            let refused = log.alerts().iter().any(|a| {
                matches!(a, Alert::Vmcs12HostState { field: "HOST_RIP", found, .. } if *found == evil)
            });
            if !refused {
                return Err(FailReason::AttackNotBlocked(
                    "rewriting VMCS12's HOST_RIP (no entry refused with a vmcs12-host-state alert naming it)",
                ));
            }
            linux_run_ended_well(log)
        }
        // The attacker's VMLAUNCH of its own region failed valid with error 7, refused by L0 with
        // exactly one `rogue-vmcs` alert naming that region; KVM's VMCS came back as current, and
        // the run is otherwise `ihmi-kvm`'s (KVM's guest ran on untouched).
        Scenario::IhmiAttack(IhmiAttack::RogueVmcs) => {
            let Some([region, rflags, error, restored]) = log.rogue_vmcs_attack else {
                return Err(FailReason::NestedRun(
                    "the attacker did not say it ran its VMLAUNCH (see the guest's console)",
                ));
            };
            let refused = matches!(
                log.alerts(),
                [Alert::RogueVmcs { gpa, launch: true, .. }] if gpa.raw() == region
            );
            if !refused || rflags & 0x41 != 0x40 || error != 7 {
                return Err(FailReason::AttackNotBlocked(
                    "a VMLAUNCH of a VMCS no KVM vCPU has (not one VMfailValid 7 with one rogue-vmcs alert naming it)",
                ));
            }
            if restored & 0x41 != 0 {
                return Err(FailReason::NestedRun(
                    "the attacker could not make KVM's VMCS current again",
                ));
            }
            check_ihmi_kvm_allowing(log, None, 0, &|a| {
                matches!(a, Alert::RogueVmcs { gpa, .. } if gpa.raw() == region)
            })
        }
        // The attacker ran KVM's own VMCS from its code: every one of its entries passed P3 and P6,
        // and the exits it kept from `vmx_handle_exit` (at least two liveness windows) made L0 say
        // exactly once that the hook had stopped (P7). KVM's fields came back, and the run is
        // otherwise `ihmi-kvm`'s: every other exit reached the monitor, the probe's L2 ran to its end.
        Scenario::IhmiAttack(IhmiAttack::Starve) => {
            let Some([vmcs, kept, reason, restored]) = log.starve_attack else {
                return Err(FailReason::NestedRun(
                    "the attacker did not say it ran KVM's guest from its own code (see the guest's console)",
                ));
            };
            if vmcs != log.kvm_trail.first_vmcs.unwrap_or(u64::MAX) {
                return Err(FailReason::NestedRun(
                    "the attacker's VMRESUMEs were not of the VMCS the monitor registered for KVM's vCPU",
                ));
            }
            if kept < 2 * ihmi_hv::nested::liveness::WINDOW || !(reason == 7 || reason == 1) {
                return Err(FailReason::NestedRun(
                    "the attacker did not keep two liveness windows of exits from KVM, each before L2's first instruction",
                ));
            }
            if !matches!(log.alerts(), [Alert::MonitorStarved { .. }]) {
                return Err(FailReason::AttackNotReported(
                    "exits of KVM's guest kept from vmx_handle_exit (not one monitor-starved alert)",
                ));
            }
            if restored != 0 {
                return Err(FailReason::NestedRun(
                    "the attacker could not put KVM's VMCS fields back",
                ));
            }
            check_ihmi_kvm_allowing(log, None, kept, &|a| {
                matches!(a, Alert::MonitorStarved { .. })
            })
        }
        Scenario::IhmiAttack(a @ (IhmiAttack::L2Map | IhmiAttack::L2MapMonitor)) => {
            check_ihmi_l2_map(log, a == IhmiAttack::L2MapMonitor)
        }
        Scenario::IhmiAttack(IhmiAttack::Vmcs12Region) => match log.vmcs12_regions_overwritten {
            Some(n) if n >= 1 => check_ihmi_kvm(log, None),
            _ => Err(FailReason::NestedRun(
                "the attacker did not say it overwrote VMCS regions (see the guest's console)",
            )),
        },
        Scenario::NestedLinux => check_nested_linux(log),
        Scenario::Multiboot1 | Scenario::Multiboot2 => check_multiboot(log),
        Scenario::Kernel | Scenario::KernelNested => check_user_kernel(log),
        Scenario::Bench(mode) => {
            expect_done_zero(log)?;
            crate::bench::check(mode, log.bench_results()).map_err(FailReason::Bench)
        }
        // The Linux benchmark ran to its end and its windows have the structure of their mode.
        Scenario::LinuxBench(mode) => {
            linux_run_ended_well(log)?;
            expect_nothing_rejected(log)?;
            crate::bench::check_linux(mode, log.bench_results()).map_err(FailReason::Bench)
        }
        // The same workload must give the same stream whether the monitor is in the box or out of it.
        Scenario::Sim | Scenario::SimOutbox => {
            expect_done_zero(log)?;
            check_monitor_events(log, &SIM_WORKLOAD)
        }
    }
}

/// `ept-guard`: the guest read the L0-owned probe frame and was ended by an EPT violation on it.
fn check_ept_guard(
    log: &ScenarioLog,
    probe: Gpa,
    probe_region: Option<RegionKind>,
) -> Result<(), FailReason> {
    if probe_region != Some(RegionKind::L0) {
        return Err(FailReason::ProbeNotL0Owned);
    }
    match log.end {
        None => Err(FailReason::NotEnded),
        Some(GuestEnd::EptViolation {
            gpa,
            region: Some(RegionKind::L0),
            qualification,
            ..
        }) if gpa.align_down(PAGE_SIZE) == probe.align_down(PAGE_SIZE) && qualification.read() => {
            Ok(())
        }
        Some(got) => Err(FailReason::WrongEnd {
            expected: "an EPT violation reading the L0-owned probe frame",
            got,
        }),
    }
}

/// `bad-hypercall`: every case of the battery got its status, and L0 answered a ping after it.
fn check_bad_hypercalls(log: &ScenarioLog) -> Result<(), FailReason> {
    expect_done_zero(log)?;
    // The guest prints between the cases; its successful console writes are not part of the battery
    // (every case in it must be rejected), so they are left out before comparing.
    let console_ok = (Hypercall::ConsoleWrite as u64, Status::Ok);
    let mut calls = [(0u64, Status::Ok); MAX_HYPERCALLS];
    let mut n = 0;
    for call in log.hypercalls().iter().filter(|c| **c != console_ok) {
        calls[n] = *call;
        n += 1;
    }
    let calls = &calls[..n];
    for (index, &(_, expected)) in BAD_HYPERCALL_CASES.iter().enumerate() {
        let got = calls.get(index).map(|c| c.1);
        if got != Some(expected) {
            return Err(FailReason::HypercallStatus {
                index,
                expected,
                got,
            });
        }
    }
    // After the battery L0 must still answer a well-formed call.
    let next = calls.get(BAD_HYPERCALL_CASES.len()).copied();
    if next != Some((Hypercall::Ping as u64, Status::Ok)) {
        return Err(FailReason::HypercallStatus {
            index: BAD_HYPERCALL_CASES.len(),
            expected: Status::Ok,
            got: next.map(|c| c.1),
        });
    }
    Ok(())
}

/// `testguest-demo`: the guest asked to power off after causing every exit kind it can.
fn check_demo(log: &ScenarioLog, counters: &ExitCounters) -> Result<(), FailReason> {
    match log.end {
        None => return Err(FailReason::NotEnded),
        Some(GuestEnd::ShutdownRequest) => {}
        Some(GuestEnd::Done(code)) if code != 0 => return Err(FailReason::GuestCheckFailed(code)),
        Some(got) => {
            return Err(FailReason::WrongEnd {
                expected: "a shutdown request on port 0x8900",
                got,
            })
        }
    }
    check_cpuid(log)?;
    expect_ping(log)?;
    for reason in [
        ExitReason::Cpuid,
        ExitReason::Vmcall,
        ExitReason::IoInstruction,
        ExitReason::Rdmsr,
        ExitReason::Wrmsr,
        ExitReason::Hlt,
        ExitReason::ExceptionOrNmi,
    ] {
        if counters.get(reason) == 0 {
            return Err(FailReason::MissingExit(reason));
        }
    }
    if counters.exceptions(3) == 0 {
        return Err(FailReason::MissingException(3));
    }
    Ok(())
}

/// The monitor refused no request.
fn expect_nothing_rejected(log: &ScenarioLog) -> Result<(), FailReason> {
    if log.monitor_rejected == 0 {
        Ok(())
    } else {
        Err(FailReason::ExtraMonitorEvents(
            log.monitor_rejected as usize,
        ))
    }
}

/// `linux-sim`, in the box or out of it: the monitors (in front of the kernel's SYSCALL entry, and in
/// its exec path) saw the workload's program start and its calls, from the right process, and
/// refused the intruder, with nothing rejected; in the box it read the kernel's linear mappings
/// without a walk, out of it with one.
fn check_linux_sim(log: &ScenarioLog, inbox: bool) -> Result<(), FailReason> {
    linux_run_ended_well(log)?;
    expect_nothing_rejected(log)?;
    let linear_ok = match log.linear_reads {
        Some([direct, image]) => inbox && direct != 0 && image != 0,
        None => !inbox,
    };
    if !linear_ok {
        return Err(FailReason::LinearReads {
            inbox,
            found: log.linear_reads,
        });
    }
    if log.linux_trail.complete() {
        Ok(())
    } else {
        Err(FailReason::WorkloadNotSeen(log.linux_trail))
    }
}

/// `linux-attack`: the compromised root's moves failed. The LSTAR and SYSENTER_EIP writes were
/// refused by L0 (an alert each), and the /dev/mem read of the monitor was stopped by the guest view (an EPT violation on a
/// monitor frame, in view 0, which ends the guest) while the attacker was the running task.
fn check_linux_attack(log: &ScenarioLog) -> Result<(), FailReason> {
    let refused = |which: u32| {
        log.alerts()
            .iter()
            .any(|a| matches!(a, Alert::EntryMsrWriteRefused { msr, .. } if *msr == which))
    };
    if !refused(IA32_LSTAR) {
        return Err(FailReason::AttackNotBlocked(
            "moving IA32_LSTAR off the gate",
        ));
    }
    if !refused(IA32_SYSENTER_EIP) {
        return Err(FailReason::AttackNotBlocked(
            "moving IA32_SYSENTER_EIP off the gate",
        ));
    }
    match log.end {
        None => Err(FailReason::NotEnded),
        Some(GuestEnd::EptViolation {
            region: Some(RegionKind::Monitor),
            qualification,
            view: Some(ihmi_hv::guard::views::GUEST_VIEW),
            ..
        }) if qualification.read() => {
            expect_end_task(log, |t| comm_bytes(&t.comm) == b"ihmi-attack")
        }
        Some(got) => Err(FailReason::WrongEnd {
            expected: "an EPT violation reading a monitor frame in the guest view",
            got,
        }),
    }
}

/// A Linux attack on what L0 locked when the gate opened: the write was refused by the guest view
/// (an EPT violation writing guest RAM in view 0, which ends the guest), L0 said what it was (an
/// alert naming `what`), and the attacker was the running task.
fn check_locked_write(
    log: &ScenarioLog,
    what: Locked,
    attack: &'static str,
) -> Result<(), FailReason> {
    let end_gpa = match log.end {
        None => return Err(FailReason::NotEnded),
        Some(GuestEnd::EptViolation {
            gpa,
            region: Some(RegionKind::GuestRam),
            qualification,
            view: Some(ihmi_hv::guard::views::GUEST_VIEW),
            ..
        }) if qualification.write() => gpa,
        Some(got) => {
            return Err(FailReason::WrongEnd {
                expected: "an EPT violation writing locked guest RAM in the guest view",
                got,
            })
        }
    };
    let reported = log.alerts().iter().any(
        |a| matches!(a, Alert::LockedWrite { what: w, gpa, .. } if *w == what && *gpa == end_gpa),
    );
    if !reported {
        return Err(FailReason::AttackNotReported(attack));
    }
    expect_end_task(log, |t| comm_bytes(&t.comm) == b"ihmi-attack")
}

/// `linux-attack-process-pgd`: the gate's slot in a process's PGD was changed (pages the kernel owns,
/// which L0 cannot lock); L0's audit of the PGD the guest runs on found it (an alert), at the latest
/// one audit period into that process's run, and stopped the guest while the attacker ran.
fn check_process_pgd(log: &ScenarioLog) -> Result<(), FailReason> {
    let gpa = match log.end {
        None => return Err(FailReason::NotEnded),
        Some(GuestEnd::HookTampered { gpa }) => gpa,
        Some(got) => {
            return Err(FailReason::WrongEnd {
                expected: "L0's audit finding the gate's slot changed",
                got,
            })
        }
    };
    let reported = log
        .alerts()
        .iter()
        .any(|a| matches!(a, Alert::HookTampered { gpa: at, .. } if *at == gpa));
    if !reported {
        return Err(FailReason::AttackNotReported(
            "redirecting the gate in a process's PGD",
        ));
    }
    expect_end_task(log, |t| comm_bytes(&t.comm) == b"ihmi-attack")
}

/// `linux-attack-flood`: every one of the flood's calls reached L0 as an event and none was dropped,
/// because the monitor asked for the ring to be drained each time it passed its high-water mark.
fn check_flood(log: &ScenarioLog) -> Result<(), FailReason> {
    linux_run_ended_well(log)?;
    let calls = ihmi_abi::attack::LINUX_FLOOD_CALLS;
    let drains = calls / ihmi_abi::monitor::RING_HIGH_WATER as u64;
    if log.monitor_dropped != 0 || log.flood_calls != calls || log.ring_drains < drains {
        return Err(FailReason::EventsLost {
            expected: calls,
            seen: log.flood_calls,
            dropped: log.monitor_dropped,
            drains: log.ring_drains,
        });
    }
    Ok(())
}

/// `linux-attack-compat`: every call the attacker made through `int $0x80` and SYSENTER reached the
/// monitor as an event naming its entry (and no more than it made: the gate saw each once).
fn check_compat(log: &ScenarioLog) -> Result<(), FailReason> {
    linux_run_ended_well(log)?;
    let calls = ihmi_abi::attack::LINUX_COMPAT_CALLS;
    for entry in [SyscallEntry::Int80, SyscallEntry::Sysenter] {
        let seen = log.compat_calls[entry as usize];
        if seen != calls {
            return Err(FailReason::EntryNotMonitored {
                entry: entry.name(),
                made: calls,
                seen,
            });
        }
    }
    Ok(())
}

/// `linux-attack-nmi`: NMIs arrived, some of them while the guest was in the monitor's view, and
/// every one reached the guest kernel (once it was back in its own view): L0 delivered one per NMI
/// it took (less those merged into one already waiting, as the CPU would) and the kernel counted
/// exactly as many. Before L0 took NMIs, the first one in the monitor's view ended the guest.
fn check_nmi(log: &ScenarioLog) -> Result<(), FailReason> {
    linux_run_ended_well(log)?;
    let n = log.nmis;
    let all_delivered = n.delivered + n.merged == n.taken;
    let made_enough = n.taken >= ihmi_abi::attack::LINUX_NMI_MIN && n.in_monitor_view > 0;
    if !(all_delivered && made_enough && log.guest_nmis == Some(n.delivered)) {
        return Err(FailReason::NmisLost {
            l0: n,
            guest: log.guest_nmis,
        });
    }
    Ok(())
}

/// `linux-attack-forge`: ring-0 code (the attacker's page, mapped supervisor-executable) called the
/// gate with a forged system-call request and a forged exec request, and the monitor rejected each
/// for the reason that gives it away (the entry; the missing hook frame); it then tried to clear
/// CR4.SMEP and CR0.WP and L0 refused both with an alert (SMEP rather than SMAP: every model this
/// runs on has SMEP; `corei7_haswell_4770` has no SMAP to clear). The run goes on to its normal end.
fn check_forge(log: &ScenarioLog) -> Result<(), FailReason> {
    linux_run_ended_well(log)?;
    let [wrong_entry, not_from_hook] = log.forged_rejected;
    if (wrong_entry, not_from_hook) != (1, 1) {
        return Err(FailReason::ForgeryNotRejected {
            wrong_entry,
            not_from_hook,
        });
    }
    for (cr, bit, what) in [
        (4, ihmi_arch::cr::CR4_SMEP, "clearing CR4.SMEP"),
        (0, ihmi_arch::cr::CR0_WP, "clearing CR0.WP"),
    ] {
        let refused = log.alerts().iter().any(|a| {
            matches!(a, Alert::CrPinRefused { cr: c, cleared, .. } if *c == cr && *cleared == bit)
        });
        if !refused {
            return Err(FailReason::AttackNotReported(what));
        }
    }
    // Another IDT, loaded from ring 0: L0 found it at the exit that followed, said so and put the
    // boot's back, which the attacker read after that exit.
    let Some([loaded, before, after]) = log.idt_attack else {
        return Err(FailReason::AttackNotReported(
            "loading another IDT from ring 0 (the attacker did not say it ran)",
        ));
    };
    let moved = log.alerts().iter().any(|a| {
        matches!(a, Alert::IdtMoved { found, expected, .. } if *found == loaded && *expected == before)
    });
    if !moved || after != before || loaded == before {
        return Err(FailReason::AttackNotBlocked(
            "loading another IDT from ring 0 (no idt-moved alert naming it, or the IDT stayed)",
        ));
    }
    Ok(())
}

/// `linux-attack-io-uring`: every operation the attacker submitted through its ring (and which took
/// effect: the attacker checks and fails otherwise) reached the monitor as an io_uring event naming it,
/// made by the attacker or one of its io_uring worker threads.
fn check_io_uring(log: &ScenarioLog) -> Result<(), FailReason> {
    linux_run_ended_well(log)?;
    let ops = ihmi_abi::attack::LINUX_IO_URING_OPS;
    match ops
        .iter()
        .zip(log.io_uring_ops)
        .find(|(_, seen)| *seen == 0)
    {
        Some((&opcode, _)) => Err(FailReason::IoUringNotSeen { opcode }),
        None => Ok(()),
    }
}

/// `linux-attack-identity`: every execution of the attacker's was judged by what it runs, not what
/// it is called: the monitor saw each path of [`ihmi_abi::attack::LINUX_IDENTITY_RUNS`] in order
/// with the verdict it lists, every one with a digest; the intruder's disguises have the
/// intruder's digest, the renamed copy the allowed program's, each changed program another. The
/// code the attacker loaded into its own memory ran (no exec brings it in, so nothing can refuse
/// it) and the call that made it executable was flagged.
fn check_identity(log: &ScenarioLog) -> Result<(), FailReason> {
    use ihmi_abi::attack::{LINUX_IDENTITY_INTRUDER, LINUX_IDENTITY_LOADED, LINUX_IDENTITY_RUNS};
    linux_run_ended_well(log)?;
    let runs = log.identity_runs.as_slice();
    let as_listed = runs.len() == LINUX_IDENTITY_RUNS.len()
        && log.identity_runs.dropped == 0
        && runs
            .iter()
            .zip(LINUX_IDENTITY_RUNS)
            .all(|(r, (path, allowed))| {
                ihmi_monitor::event::nul_padded(&r.path) == path.as_bytes() && r.allowed == allowed
            });
    if !as_listed {
        return Err(FailReason::IdentityNotJudged(
            "the executions or their verdicts are not the ones listed",
        ));
    }
    let mut d = [[0u64; 4]; MAX_IDENTITY_RUNS];
    for (slot, r) in d.iter_mut().zip(runs) {
        *slot = r
            .digest
            .ok_or(FailReason::IdentityNotJudged("a program had no digest"))?;
    }
    if LINUX_IDENTITY_INTRUDER.iter().any(|&i| d[i] != d[0]) {
        return Err(FailReason::IdentityNotJudged(
            "a disguise of the intruder has another digest than the intruder",
        ));
    }
    // 1: ihmi-workload; 6: it with a byte appended; 7, 8: a copy of it; 10: that copy, changed.
    if d[6] == d[1] || d[7] != d[1] || d[8] != d[1] || d[10] == d[7] {
        return Err(FailReason::IdentityNotJudged(
            "a copy's digest differs from its original's, or a changed program's does not",
        ));
    }
    if log.identity_loaded != Some(LINUX_IDENTITY_LOADED) || log.exec_mappings == 0 {
        return Err(FailReason::IdentityNotJudged(
            "the loaded code did not run, or making it executable was not flagged",
        ));
    }
    Ok(())
}

/// What `nested-vmxon`'s guest does with VMX, in order, and what each step must come to
/// (`crates/guests/testguest`, `nested_vmxon`): VMXON with CR4.VMXE clear, VMXOFF outside VMX
/// operation, VMXON of a region without L0's revision, of a region in L0's memory (refused with an
/// alert), of a misaligned pointer, then VMXON, VMXON again (no current VMCS: VMfailInvalid), VMXOFF,
/// and VMXOFF again (outside VMX operation: #UD).
pub const NESTED_VMXON_STEPS: [VmxStep; 9] = [
    VmxStep(VmxInstruction::Vmxon, VmxOutcome::Fault { vector: 6 }),
    VmxStep(VmxInstruction::Vmxoff, VmxOutcome::Fault { vector: 6 }),
    VmxStep(VmxInstruction::Vmxon, VmxOutcome::FailInvalid),
    VmxStep(VmxInstruction::Vmxon, VmxOutcome::FailInvalid),
    VmxStep(VmxInstruction::Vmxon, VmxOutcome::FailInvalid),
    VmxStep(VmxInstruction::Vmxon, VmxOutcome::Succeed),
    VmxStep(VmxInstruction::Vmxon, VmxOutcome::FailInvalid),
    VmxStep(VmxInstruction::Vmxoff, VmxOutcome::Succeed),
    VmxStep(VmxInstruction::Vmxoff, VmxOutcome::Fault { vector: 6 }),
];

/// What `nested-vmcs`'s guest does in VMX operation, in order (`crates/guests/testguest`,
/// `run_vmcs`): VMXON; VMREAD and VMPTRST with no current VMCS; VMPTRLD of the VMXON region then (no
/// current VMCS: VMfailInvalid); VMPTRLD; VMPTRST; VMPTRLD of the VMXON region, of a region without
/// the revision identifier and of L0's memory (VMfailValid 10, 11, 9, each followed by the VMREAD of
/// the error field); VMWRITE and VMREAD of guest RIP; VMWRITE and VMREAD of a 16-bit field; VMREAD of
/// no field (12) and VMWRITE of a read-only one (13), each with its VMREAD of the error; VMREAD to
/// memory; VMCLEAR; VMREAD with no current VMCS; VMPTRLD and VMREAD again; the checks before a VM
/// entry: VMRESUME of the clear VMCS (5), VMLAUNCH with every control zero (7), four VMWRITEs of
/// valid control words, VMLAUNCH with a zero host state (8), each error read back; VMCLEAR of the
/// VMXON region (3) and its error; VMXOFF.
pub const NESTED_VMCS_STEPS: [VmxStep; 38] = {
    use VmxInstruction::{
        Vmclear, Vmlaunch, Vmptrld, Vmptrst, Vmread, Vmresume, Vmwrite, Vmxoff, Vmxon,
    };
    use VmxOutcome::{FailInvalid, FailValid, Succeed};
    [
        VmxStep(Vmxon, Succeed),
        VmxStep(Vmread, FailInvalid),
        VmxStep(Vmptrst, Succeed),
        VmxStep(Vmptrld, FailInvalid),
        VmxStep(Vmptrld, Succeed),
        VmxStep(Vmptrst, Succeed),
        VmxStep(Vmptrld, FailValid(10)),
        VmxStep(Vmread, Succeed),
        VmxStep(Vmptrld, FailValid(11)),
        VmxStep(Vmread, Succeed),
        VmxStep(Vmptrld, FailValid(9)),
        VmxStep(Vmread, Succeed),
        VmxStep(Vmwrite, Succeed),
        VmxStep(Vmread, Succeed),
        VmxStep(Vmwrite, Succeed),
        VmxStep(Vmread, Succeed),
        VmxStep(Vmread, FailValid(12)),
        VmxStep(Vmread, Succeed),
        VmxStep(Vmwrite, FailValid(13)),
        VmxStep(Vmread, Succeed),
        VmxStep(Vmread, Succeed),
        VmxStep(Vmclear, Succeed),
        VmxStep(Vmread, FailInvalid),
        VmxStep(Vmptrld, Succeed),
        VmxStep(Vmread, Succeed),
        VmxStep(Vmresume, FailValid(5)),
        VmxStep(Vmread, Succeed),
        VmxStep(Vmlaunch, FailValid(7)),
        VmxStep(Vmread, Succeed),
        VmxStep(Vmwrite, Succeed),
        VmxStep(Vmwrite, Succeed),
        VmxStep(Vmwrite, Succeed),
        VmxStep(Vmwrite, Succeed),
        VmxStep(Vmlaunch, FailValid(8)),
        VmxStep(Vmread, Succeed),
        VmxStep(Vmclear, FailValid(3)),
        VmxStep(Vmread, Succeed),
        VmxStep(Vmxoff, Succeed),
    ]
};

pub use ihmi_abi::NESTED_MINI_CPUIDS;

/// The most L0 exits one reflected exit may cost (the exit from L2, L1's VMREADs and VMWRITEs, its
/// VMRESUME) without VMCS shadowing: NESTED.md's M2 target.
pub const NESTED_MAX_ROUND_TRIP: u64 = 12;

/// The same with VMCS shadowing, where L1's VMREADs and VMWRITEs make no exits: NESTED.md's target.
pub const NESTED_MAX_ROUND_TRIP_SHADOW: u64 = 3;

/// `nested-mini`'s L2 exits in order (`crates/guests/testguest`, `run_mini`): the CPUIDs, its
/// `int3` (L1's exception bitmap has #BP), a port read L1's I/O bitmap selects, one it does not
/// (L0 passes it through: L1 let L2 have the port), the VMCALL that ends its first run, and the
/// timer interrupt of its second (L1 asked for external-interrupt exiting with acknowledge on
/// exit). Its `ud2` makes no exit at all: neither L0's nor L1's bitmap has #UD, so L2's own
/// handler takes it.
pub const NESTED_MINI_EXITS: [L2ExitStep; NESTED_MINI_CPUIDS + 5] = {
    let mut steps = [L2ExitStep(ExitReason::Cpuid, true); NESTED_MINI_CPUIDS + 5];
    steps[NESTED_MINI_CPUIDS] = L2ExitStep(ExitReason::ExceptionOrNmi, true);
    steps[NESTED_MINI_CPUIDS + 1] = L2ExitStep(ExitReason::IoInstruction, true);
    steps[NESTED_MINI_CPUIDS + 2] = L2ExitStep(ExitReason::IoInstruction, false);
    steps[NESTED_MINI_CPUIDS + 3] = L2ExitStep(ExitReason::Vmcall, true);
    steps[NESTED_MINI_CPUIDS + 4] = L2ExitStep(ExitReason::ExternalInterrupt, true);
    steps
};

/// `nested-mini`: L1's own checks passed (`Done(0)`: every exit it saw had the reason, the
/// qualification or interruption information and the guest state it expected; the event it injected
/// reached L2's handler; L2's `ud2` was taken in L2), L0 entered L2 once by VMLAUNCH and once by
/// VMRESUME after each reflected exit but the last, L2's exits were exactly [`NESTED_MINI_EXITS`],
/// and no reflected exit cost more than `max_round_trip` L0 exits ([`NESTED_MAX_ROUND_TRIP`], or
/// [`NESTED_MAX_ROUND_TRIP_SHADOW`] with VMCS shadowing).
fn check_nested_mini(log: &ScenarioLog, max_round_trip: u64) -> Result<(), FailReason> {
    expect_done_zero(log)?;
    let n = &log.nested;
    if n.exits.dropped != 0 || n.exits.as_slice() != NESTED_MINI_EXITS {
        return Err(FailReason::NestedRun(
            "its exits were not the expected ones, reflected or kept as expected, in order",
        ));
    }
    let reflected = NESTED_MINI_EXITS.iter().filter(|s| s.1).count() as u64;
    if n.launches != 1 || n.resumes != reflected - 1 {
        return Err(FailReason::NestedRun(
            "not one VMLAUNCH and one VMRESUME per reflected exit but the last",
        ));
    }
    if n.round_trips != reflected - 1 || n.round_trip_max > max_round_trip {
        return Err(FailReason::NestedRun(
            "a reflected exit cost more L0 exits than the target",
        ));
    }
    // After L2's runs, L1 tries VMLAUNCH of the launched VMCS: VMfailValid 4, and nothing runs.
    if n.relaunches_refused != 1 {
        return Err(FailReason::NestedRun(
            "VMLAUNCH of the launched VMCS was not refused with VMfailValid 4, once",
        ));
    }
    Ok(())
}

/// `nested-kvm`: Linux booted as L1, its /init ran the L1 VMM's probe and powered off; the L2's
/// report came back through KVM and the VMM (its CPUIDs, its pages written and read back intact);
/// L0 saw at least that many CPUID exits of L2 reflected to L1, at no more than `max_round_trip` L0
/// exits each on average (the exit, KVM's handling, its VMRESUME: NESTED.md A.6's targets,
/// [`NESTED_MAX_ROUND_TRIP`] or [`NESTED_MAX_ROUND_TRIP_SHADOW`] with VMCS shadowing); KVM left VMX
/// operation (VMXOFF) when the VM was gone; and nothing alerted.
fn check_nested_kvm(log: &ScenarioLog, max_round_trip: u64) -> Result<(), FailReason> {
    check_nested_kvm_allowing(log, max_round_trip, &|_| false)
}

/// [`check_nested_kvm`], with the alerts `expected` says an attack raised (and nothing else).
fn check_nested_kvm_allowing(
    log: &ScenarioLog,
    max_round_trip: u64,
    expected: &dyn Fn(&Alert) -> bool,
) -> Result<(), FailReason> {
    linux_run_ended_well(log)?;
    let Some(report) = log.l2_report else {
        return Err(FailReason::NestedRun(
            "the L1 VMM relayed no report of its L2 (see the guest's console)",
        ));
    };
    if report.cpuids != ihmi_abi::NESTED_KVM_CPUIDS
        || report.pages != ihmi_abi::NESTED_KVM_PAGES
        || report.bad != 0
    {
        return Err(FailReason::NestedRun(
            "the L2's report is not the probe's CPUIDs and pages, all read back intact",
        ));
    }
    let n = &log.nested;
    if n.reflected_cpuid < ihmi_abi::NESTED_KVM_CPUIDS {
        return Err(FailReason::NestedRun(
            "fewer CPUID exits of L2 reached L1 than the L2 made",
        ));
    }
    if n.cpuid_round_trips == 0 || n.cpuid_round_trip_total > max_round_trip * n.cpuid_round_trips {
        return Err(FailReason::NestedRun(
            "a reflected CPUID exit cost more L0 exits on average than the target",
        ));
    }
    kvm_left_vmx_without_alert(log, expected)
}

/// `ihmi-kvm`: KVM ran its L2 as in `nested-kvm-shadow`, and the in-hypervisor monitor saw every exit
/// KVM handled, each as the exit L0 reflected ([`KvmTrail`]), with the whole exit-handler table
/// checked at each and found as the kernel image has it; L0 found VMCS12's host state to be L1's own
/// at every entry (P3); nothing rejected or dropped. Under attack
/// (`attacked`: the entry's index, address, value in the image and value written), the table was
/// found changed and exactly that one `integrity` event says so.
fn check_ihmi_kvm(log: &ScenarioLog, attacked: Option<Rewritten>) -> Result<(), FailReason> {
    check_ihmi_kvm_allowing(log, attacked, 0, &|_| false)
}

/// What an attacker says it rewrote in KVM's control data (P2): an entry of the exit-handler table
/// or a word of `kvm_x86_ops`, each as (index, address, value before, value written).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rewritten {
    ExitHandler([u64; 4]),
    X86Ops([u64; 4]),
}

/// [`check_ihmi_kvm`], with the alerts `expected` says an attack raised (and nothing else), and
/// `kept` reflected exits an attacker kept from KVM (each one with no `kvm_exit` event, L2 entered
/// again after it).
fn check_ihmi_kvm_allowing(
    log: &ScenarioLog,
    attacked: Option<Rewritten>,
    kept: u64,
    expected: &dyn Fn(&Alert) -> bool,
) -> Result<(), FailReason> {
    check_nested_kvm_allowing(log, NESTED_MAX_ROUND_TRIP_SHADOW, expected)?;
    expect_nothing_rejected(log)?;
    if log.monitor_dropped != 0 {
        return Err(FailReason::MonitorDropped(log.monitor_dropped));
    }
    let n = &log.nested;
    if n.host_state_checked == 0 || n.host_state_checked != n.launches + n.resumes {
        return Err(FailReason::NestedRun(
            "L0 did not compare VMCS12's host state with L1's at every entry to L2",
        ));
    }
    let t = &log.kvm_trail;
    if t.events == 0 || t.events + kept != log.nested.reflected {
        return Err(FailReason::NestedRun(
            "the in-hypervisor monitor's kvm_exit events are not one per exit L0 reflected to KVM",
        ));
    }
    if t.matched != t.events || t.unmatched != 0 || t.missed != kept {
        return Err(FailReason::NestedRun(
            "a kvm_exit event did not follow its reflected exit (another reason, or none before L2 ran again)",
        ));
    }
    match t.handlers_checked {
        Some((lo, hi)) if lo == hi && lo > 0 => {}
        _ => {
            return Err(FailReason::NestedRun(
                "the monitor did not check the whole exit-handler table at every exit",
            ))
        }
    }
    // The probe's one vCPU and its one memslot were seen made, and every exit KVM handled was that
    // vCPU's.
    if t.vcpus_created != 1 || t.first_vcpu.map(|(_, id)| id) != Some(0) {
        return Err(FailReason::NestedRun(
            "the monitor did not see KVM create the probe's one vCPU (vcpu_create, id 0)",
        ));
    }
    if t.exits_of_unknown_vcpu != 0 {
        return Err(FailReason::NestedRun(
            "a kvm_exit event named a vCPU no vcpu_create event did",
        ));
    }
    if t.vcpus_destroyed != 1 || t.first_vcpu_destroyed != 1 {
        return Err(FailReason::NestedRun(
            "the monitor did not see KVM destroy the probe's vCPU, with its VMCS, once (vcpu_destroy)",
        ));
    }
    // P6: every entry KVM made was of the VMCS the monitor registered for that vCPU.
    if t.first_vmcs.is_none_or(|v| v == 0 || v & 0xfff != 0)
        || t.registered_entries != n.launches + n.resumes
        || t.registered_other != 0
    {
        return Err(FailReason::NestedRun(
            "L0 did not find every VMLAUNCH and VMRESUME to be of the VMCS the monitor registered for the probe's vCPU",
        ));
    }
    if t.probe_slots != 1 {
        return Err(FailReason::NestedRun(
            "the monitor did not see KVM commit the probe's memslot (slot 0, 512 frames from 0)",
        ));
    }
    // Every page the probe wrote came to it through a mapping the monitor checked, each onto the
    // VM's own memory.
    let touched = ihmi_abi::NESTED_KVM_TOUCH_BASE >> 12
        ..(ihmi_abi::NESTED_KVM_TOUCH_BASE >> 12) + ihmi_abi::NESTED_KVM_PAGES;
    let mapped = |gfn: u64| t.probe_frames_mapped[(gfn / 64) as usize] & (1 << (gfn % 64)) != 0;
    if t.maps == 0 || !touched.clone().all(mapped) {
        return Err(FailReason::NestedRun(
            "a page the probe wrote had no l2_map event (KVM's make_spte unwatched)",
        ));
    }
    if t.maps_wrong != 0 || t.l2_memory != 0 {
        return Err(FailReason::NestedRun(
            "the monitor found a mapping of KVM's onto memory not the VM's own, with nobody attacking",
        ));
    }
    match attacked {
        Some(Rewritten::X86Ops(word)) if t.x86_ops != 1 || t.first_x86_ops != Some(word) => {
            return Err(FailReason::AttackNotReported(
                "rewriting a word of kvm_x86_ops (one integrity event naming it)",
            ))
        }
        Some(Rewritten::X86Ops(_)) => {}
        _ if t.x86_ops != 0 => {
            return Err(FailReason::NestedRun(
                "the monitor found kvm_x86_ops changed, with nobody attacking it",
            ))
        }
        _ => {}
    }
    let handler = match attacked {
        Some(Rewritten::ExitHandler(entry)) => Some(entry),
        _ => None,
    };
    match handler {
        None if t.integrity != 0 || t.with_changed_handlers != 0 => Err(FailReason::NestedRun(
            "the monitor found KVM's exit-handler table changed, with nobody attacking it",
        )),
        None => Ok(()),
        Some(entry) if t.integrity != 1 || t.first_integrity != Some(entry) => {
            Err(FailReason::AttackNotReported(
                "rewriting an entry of KVM's exit-handler table (one integrity event naming it)",
            ))
        }
        Some(_) if t.with_changed_handlers == 0 => Err(FailReason::AttackNotReported(
            "rewriting an entry of KVM's exit-handler table (no exit found it changed)",
        )),
        Some(_) => Ok(()),
    }
}

/// `ihmi-attack-l2-map`: the compromised root's VMM gave its guest the page of `vmx_handle_exit`
/// (a /dev/mem mapping as guest memory). The monitor reported KVM's mapping of it, as the kernel
/// image's frame the attacker named, when KVM made it; the guest's write there (from L2) was stopped
/// by L0's lock on L1's text, at the address the attacker named, with a locked-write alert; nothing
/// the monitor was asked was refused and no event was lost. `ihmi-attack-l2-map-monitor` (`monitor`):
/// the same with a page of the monitor's, reported as not L1's RAM, the write ending at L0 in that
/// monitor frame.
fn check_ihmi_l2_map(log: &ScenarioLog, monitor: bool) -> Result<(), FailReason> {
    use ihmi_abi::attack::IHMI_L2_MAP_GPA;
    let announced = if monitor {
        log.l2_map_monitor_attack
    } else {
        log.l2_map_attack
    };
    let Some(site) = announced else {
        return Err(FailReason::NestedRun(
            "the attacker did not say which page it gives its guest (see the guest's console)",
        ));
    };
    expect_nothing_rejected(log)?;
    if log.monitor_dropped != 0 {
        return Err(FailReason::MonitorDropped(log.monitor_dropped));
    }
    let t = &log.kvm_trail;
    let reported = [
        IHMI_L2_MAP_GPA >> 12,
        IHMI_L2_MAP_GPA,
        site & !0xfff,
        if monitor {
            ihmi_monitor::L2Memory::NotRam
        } else {
            ihmi_monitor::L2Memory::KernelImage
        } as u64,
    ];
    match t.first_l2_memory {
        Some([gfn, address, _hva, found, class]) if [gfn, address, found, class] == reported => {}
        _ => return Err(FailReason::AttackNotReported(
            "mapping a page not the VM's into KVM's guest (no l2_memory integrity event naming it)",
        )),
    }
    let region = if monitor {
        RegionKind::Monitor
    } else {
        RegionKind::GuestRam
    };
    let end_gpa = match log.end {
        Some(GuestEnd::EptViolation {
            gpa,
            region: Some(r),
            qualification,
            ..
        }) if qualification.write() && r == region => gpa,
        Some(got) => {
            return Err(FailReason::WrongEnd {
                expected: if monitor {
                    "an EPT violation writing a monitor frame"
                } else {
                    "an EPT violation writing locked guest RAM"
                },
                got,
            })
        }
        None => return Err(FailReason::NotEnded),
    };
    // Guest RAM that is L1's text is locked, and L0 says so; a monitor frame is not L1's at all.
    let locked = monitor
        || log.alerts().iter().any(|a| {
            matches!(a, Alert::LockedWrite { what: Locked::KernelText, gpa, .. } if *gpa == end_gpa)
        });
    if end_gpa.raw() != site || !locked {
        return Err(FailReason::AttackNotBlocked(
            "KVM's guest writing a page not the VM's through its memory (the write L0 stopped was another)",
        ));
    }
    Ok(())
}

/// The end both KVM scenarios share: KVM's VMXOFF succeeded, and L0 raised no alert.
fn kvm_left_vmx_without_alert(
    log: &ScenarioLog,
    expected: &dyn Fn(&Alert) -> bool,
) -> Result<(), FailReason> {
    if log.vmxoffs == 0 {
        return Err(FailReason::NestedRun("KVM never left VMX operation"));
    }
    if !log.alerts().iter().all(expected) {
        return Err(FailReason::NestedRun("L0 raised an alert"));
    }
    Ok(())
}

/// `nested-linux`: L1's /init ended well; the L1 VMM relayed its L2's boot (the kernel's banner
/// among the UART's lines), then the line L2's /init wrote on its debug port, then its own end
/// when L2 powered itself off; L2's exits reached L1, its memory came through EPT02 after EPT
/// violations L1 handled, and L1 invalidated EPT12 with an INVEPT L0 emulated; no alert.
fn check_nested_linux(log: &ScenarioLog) -> Result<(), FailReason> {
    linux_run_ended_well(log)?;
    let l2 = &log.l2_linux;
    if !l2.banner {
        return Err(FailReason::NestedRun(
            "the L1 VMM relayed no `Linux version` line from its L2's UART",
        ));
    }
    if !l2.init {
        return Err(FailReason::NestedRun(
            "the L2's /init line did not come after its kernel's banner",
        ));
    }
    if !l2.done {
        return Err(FailReason::NestedRun(
            "the L1 VMM did not say its L2 powered off after /init's line",
        ));
    }
    let n = &log.nested;
    if n.reflected == 0 || n.reflected_ept == 0 || n.ept_fills == 0 || n.invepts == 0 {
        return Err(FailReason::NestedRun(
            "L2's exits, EPT violations, EPT02 fills or L1's INVEPTs are missing",
        ));
    }
    kvm_left_vmx_without_alert(log, &|_| false)
}

/// `nested-mini-ept`: L1's own checks passed up to its last step (its report line: the exits it
/// saw, its EPT12 filled on L2's EPT violations, the VMfailValid 7 of an entry with EPT12's root
/// in L0's memory, INVEPT); L2's exits were `nested-mini`'s once its EPT violations are left out,
/// with at least one reflected to L1 and one EPT02 fill, no reflected CPUID over the target of
/// L0 exits ([`NESTED_MAX_ROUND_TRIP`]); both attacks on L0 were refused with
/// their alerts (`vmx-pointer-refused` and `ept12-mapping-refused`, both at L0's memory); and
/// the guest ended at L0's EPT violation in its own memory, where EPT12 pointed L2.
fn check_nested_mini_ept(log: &ScenarioLog) -> Result<(), FailReason> {
    match log.end {
        None => return Err(FailReason::NotEnded),
        Some(GuestEnd::EptViolation {
            region: Some(RegionKind::L0),
            ..
        }) => {}
        Some(got) => {
            return Err(FailReason::WrongEnd {
                expected: "an EPT violation in L0's memory, where L1's EPT12 pointed L2",
                got,
            })
        }
    }
    if log.l1_checks_failed != Some(0) {
        return Err(FailReason::NestedRun(
            "L1's own checks did not all pass before its last step (its report line)",
        ));
    }
    let n = &log.nested;
    let mut mini = n
        .exits
        .as_slice()
        .iter()
        .filter(|s| s.0 != ExitReason::EptViolation);
    let same = n.exits.dropped == 0
        && NESTED_MINI_EXITS
            .iter()
            .all(|expected| mini.next() == Some(expected))
        && mini.next().is_none();
    if !same {
        return Err(FailReason::NestedRun(
            "its exits, EPT violations left out, were not nested-mini's",
        ));
    }
    if n.reflected_ept == 0 || n.ept_fills == 0 {
        return Err(FailReason::NestedRun(
            "no EPT violation went to L1, or L0 filled EPT02 for none",
        ));
    }
    // CPUIDs: after the others, L1 runs its checks (console hypercalls) before it resumes L2.
    if n.cpuid_round_trips == 0 || n.cpuid_round_trip_max > NESTED_MAX_ROUND_TRIP {
        return Err(FailReason::NestedRun(
            "a reflected CPUID cost more L0 exits than the target",
        ));
    }
    let alerted = |f: &dyn Fn(&Alert) -> bool| log.alerts().iter().any(f);
    if !alerted(&|a| {
        matches!(
            a,
            Alert::VmxPointerRefused {
                region: RegionKind::L0,
                ..
            }
        )
    }) {
        return Err(FailReason::AttackNotReported(
            "a VM entry with EPT12's root in L0's memory",
        ));
    }
    if !alerted(&|a| {
        matches!(
            a,
            Alert::Ept12MappingRefused {
                region: RegionKind::L0,
                ..
            }
        )
    }) {
        return Err(FailReason::AttackNotReported(
            "an EPT12 leaf onto L0's memory",
        ));
    }
    Ok(())
}

/// `nested-kvm-ept`, on top of [`check_nested_kvm`]: KVM built its EPT12 on L2's first touches (at
/// least one reflected EPT violation per page the probe wrote), L0 filled EPT02 from it (at least one
/// fill per page), and L1's INVEPTs succeeded (KVM flushes its EPT context when it loads it).
fn check_nested_ept(log: &ScenarioLog) -> Result<(), FailReason> {
    let n = &log.nested;
    if n.reflected_ept < ihmi_abi::NESTED_KVM_PAGES {
        return Err(FailReason::NestedRun(
            "fewer EPT violations reached L1 than the pages L2 touched",
        ));
    }
    if n.ept_fills < ihmi_abi::NESTED_KVM_PAGES {
        return Err(FailReason::NestedRun(
            "L0 filled EPT02 fewer times than the pages L2 touched",
        ));
    }
    if n.invepts == 0 {
        return Err(FailReason::NestedRun("no INVEPT of L1's succeeded"));
    }
    Ok(())
}

/// `nested-vmxon`, `nested-vmcs`: the guest saw VMX offered and its checks passed (`Done(0)`), L0
/// emulated exactly `steps`, and the region in L0's memory was refused with an alert.
fn check_vmx_steps(
    log: &ScenarioLog,
    steps: &[VmxStep],
    l0_region: &'static str,
) -> Result<(), FailReason> {
    expect_done_zero(log)?;
    if log.vmx.dropped != 0 || log.vmx.as_slice() != steps {
        return Err(FailReason::VmxSteps);
    }
    let alerted = log.alerts().iter().any(|a| {
        matches!(
            a,
            Alert::VmxRegionRefused {
                region: ihmi_hv::RegionKind::L0,
                ..
            }
        )
    });
    if !alerted {
        return Err(FailReason::AttackNotReported(l0_region));
    }
    Ok(())
}

/// A whole line of ASCII digits as a number; `None` for anything else or an overflow.
/// Exactly 16 hex digits (what the multiboot kernel prints a digest as), then a space or the end.
/// Three `0x`-prefixed hexadecimal numbers separated by single spaces, and nothing else.
fn parse_hex_words<const N: usize>(text: &[u8]) -> Option<[u64; N]> {
    let mut out = [0u64; N];
    let mut words = text.split(|&b| b == b' ');
    for slot in &mut out {
        *slot = parse_hex(words.next()?.strip_prefix(b"0x")?)?;
    }
    words.next().is_none().then_some(out)
}

/// 1 to 16 hexadecimal digits, and nothing else.
/// The `0x`-prefixed hexadecimal number after `prefix` at the start of `line`, as the attackers end
/// their announcements.
fn hex_after(line: &[u8], prefix: &str) -> Option<u64> {
    line.strip_prefix(prefix.as_bytes())
        .and_then(|hex| hex.strip_prefix(b"0x"))
        .and_then(parse_hex)
}

fn parse_hex(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 16 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        let v = (d as char).to_digit(16)?;
        Some(n << 4 | u64::from(v))
    })
}

fn parse_hex16(text: &[u8]) -> Option<u64> {
    let (digits, rest) = text.split_at_checked(16)?;
    if !(rest.is_empty() || rest[0] == b' ') {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        let v = (d as char).to_digit(16)?;
        Some(n << 4 | u64::from(v))
    })
}

/// A digest or "none", for [`FailReason::MultibootHanded`].
struct Hex16(Option<u64>);

impl fmt::Display for Hex16 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(v) => write!(f, "{v:016x}"),
            None => f.write_str("none"),
        }
    }
}

/// `multiboot1`/`multiboot2`: the kernel powered off after its report, none of its own checks of
/// its entry state and boot information failed, the digest of what it found is the one of what L0
/// handed it, and L0 moved at least one of GRUB's modules out of its way to get there.
fn check_multiboot(log: &ScenarioLog) -> Result<(), FailReason> {
    match log.end {
        None => return Err(FailReason::NotEnded),
        Some(GuestEnd::ShutdownRequest) => {}
        Some(got) => {
            return Err(FailReason::WrongEnd {
                expected:
                    "the multiboot kernel to report on port 0xE9 and power off through port 0x8900",
                got,
            })
        }
    }
    if log.multiboot_checks_failed != Some(0) {
        return Err(FailReason::MultibootChecks(log.multiboot_checks_failed));
    }
    match (log.multiboot_handed, log.multiboot_found) {
        (Some(h), Some(f)) if h == f => {}
        (handed, found) => return Err(FailReason::MultibootHanded { handed, found }),
    }
    if log.multiboot_moved == 0 {
        return Err(FailReason::MultibootNothingMoved);
    }
    Ok(())
}

/// A user's multiboot kernel (`ihmi run --kernel`): it ended itself with success, by powering off
/// or through the isa-debug-exit port with 0 (kvm-unit-tests' success); any other end is its failure,
/// reported as it happened.
fn check_user_kernel(log: &ScenarioLog) -> Result<(), FailReason> {
    match log.end {
        None => Err(FailReason::NotEnded),
        Some(GuestEnd::ShutdownRequest | GuestEnd::DebugExit(0)) => Ok(()),
        Some(got) => Err(FailReason::WrongEnd {
            expected: "the kernel to power off (port 0x8900) or exit with 0 through port 0xf4",
            got,
        }),
    }
}

fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        d.is_ascii_digit()
            .then(|| n.checked_mul(10)?.checked_add(u64::from(d - b'0')))
            .flatten()
    })
}

/// The Linux workload program (`crates/guests/linux-workload`, `ihmi-workload`) and the system calls it
/// makes, in order: getppid, getuid, getgid (x86-64 numbers).
pub const LINUX_WORKLOAD: (&str, [u64; 3]) = ("ihmi-workload", [110, 102, 104]);
/// Where /init runs it from.
pub const LINUX_WORKLOAD_PATH: &[u8] = b"/bin/ihmi-workload";
/// The guest hypervisor's VMM, where /init runs it from and its name once running, and the system
/// call it drives KVM with (`ioctl`, x86-64).
pub const LINUX_L1_VMM_PATH: &[u8] = b"/bin/ihmi-l1-vmm";
pub const LINUX_L1_VMM: &[u8] = b"ihmi-l1-vmm";
pub const LINUX_IOCTL_NR: u64 = 16;
/// The program /init runs that the allow-list does not name, and its name once running.
pub const LINUX_INTRUDER_PATH: &[u8] = b"/bin/ihmi-intruder";
pub const LINUX_INTRUDER: &[u8] = b"ihmi-intruder";

/// How far the monitor's events follow /init's workload: [`LINUX_WORKLOAD`] run from its path and making
/// its calls, and [`LINUX_INTRUDER`] refused. Events stream past (a Linux guest makes thousands), so the
/// log keeps this state, not the events.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinuxTrail {
    /// System-call events named like the workload program.
    pub events: u64,
    /// How many of its expected calls came, in order, from one process.
    pub matched: usize,
    /// That process and its parent.
    pub pid: u32,
    pub ppid: u32,
    /// The process the exec monitor saw start the workload program (allowed), 0 before.
    pub workload_exec_pid: u32,
    /// Refused executions of the intruder.
    pub intruder_refused: u64,
    /// Whether anything says the intruder ran: an allowed execution, or a system call by its name.
    pub intruder_ran: bool,
}

impl LinuxTrail {
    fn follow(&mut self, e: &Event) {
        if e.kind() == Some(EventKind::Exec) {
            let path = ihmi_monitor::event::nul_padded(&e.path);
            let allowed = e.verdict == ihmi_abi::monitor::Verdict::Allow as i32;
            if path == LINUX_WORKLOAD_PATH && allowed {
                self.workload_exec_pid = e.pid;
            }
            if path == LINUX_INTRUDER_PATH {
                if allowed {
                    self.intruder_ran = true;
                } else if e.verdict == ihmi_abi::monitor::Verdict::Deny as i32 {
                    self.intruder_refused += 1;
                }
            }
            return;
        }
        if e.kind() == Some(EventKind::Syscall) && comm_bytes(&e.comm) == LINUX_INTRUDER {
            self.intruder_ran = true;
        }
        let (name, calls) = LINUX_WORKLOAD;
        if e.kind() != Some(EventKind::Syscall) || comm_bytes(&e.comm) != name.as_bytes() {
            return;
        }
        self.events += 1;
        if self.matched == calls.len() || e.nr != calls[self.matched] {
            return;
        }
        if self.matched == 0 {
            (self.pid, self.ppid) = (e.pid, e.ppid);
        }
        if e.pid == self.pid {
            self.matched += 1;
        }
    }

    /// The workload's calls all came, from a child of init that the exec monitor saw start the
    /// workload program; the intruder was refused and never ran.
    #[must_use]
    pub fn complete(&self) -> bool {
        self.matched == LINUX_WORKLOAD.1.len()
            && self.pid > 1
            && self.ppid == 1
            && self.workload_exec_pid == self.pid
            && self.intruder_refused > 0
            && !self.intruder_ran
    }
}

/// The fields of a monitor event a failure report shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeenEvent {
    /// Raw kind.
    pub kind: u16,
    /// Process.
    pub pid: u32,
    /// Parent.
    pub ppid: u32,
    /// System-call number or raw request code.
    pub nr: u64,
    /// Raw verdict.
    pub verdict: i32,
}

impl From<&Event> for SeenEvent {
    fn from(e: &Event) -> Self {
        Self {
            kind: e.kind,
            pid: e.pid,
            ppid: e.ppid,
            nr: e.nr,
            verdict: e.verdict,
        }
    }
}

/// One event the workload must produce, by what it says about the guest (the time stamp and the
/// system-call arguments are left out: they depend on the build).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExpectedEvent {
    /// The kind.
    pub kind: EventKind,
    /// The process.
    pub pid: u32,
    /// Its parent (process creation only; 0 otherwise).
    pub ppid: u32,
    /// Its name.
    pub comm: &'static str,
    /// The system-call number (system calls only).
    pub nr: u64,
    /// The verdict.
    pub verdict: ihmi_abi::monitor::Verdict,
}

impl ExpectedEvent {
    fn matches(&self, e: &Event) -> bool {
        let ppid_ok = self.kind != EventKind::ProcessCreate || e.ppid == self.ppid;
        let nr_ok = self.kind != EventKind::Syscall || e.nr == self.nr;
        e.kind() == Some(self.kind)
            && e.pid == self.pid
            && ppid_ok
            && nr_ok
            && comm_bytes(&e.comm) == self.comm.as_bytes()
            && e.verdict == self.verdict as i32
    }
}

impl fmt::Display for ExpectedEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} by {}:{} (ppid {}, nr {}, {:?})",
            self.kind.name(),
            self.comm,
            self.pid,
            self.ppid,
            self.nr,
            self.verdict
        )
    }
}

const fn create(pid: u32, ppid: u32, comm: &'static str, allow: bool) -> ExpectedEvent {
    ExpectedEvent {
        kind: EventKind::ProcessCreate,
        pid,
        ppid,
        comm,
        nr: 0,
        verdict: if allow {
            ihmi_abi::monitor::Verdict::Allow
        } else {
            ihmi_abi::monitor::Verdict::Deny
        },
    }
}

const fn syscall(pid: u32, comm: &'static str, nr: u64) -> ExpectedEvent {
    ExpectedEvent {
        kind: EventKind::Syscall,
        pid,
        ppid: 0,
        comm,
        nr,
        verdict: ihmi_abi::monitor::Verdict::Allow,
    }
}

/// What the test guest's process workload (`user_programs.rs`) must make the monitor see, in order:
/// init writes, asks its pid, spawns worker (which writes, asks its pid and exits), tries to spawn
/// intruder (refused by the allow-list), and exits.
pub const SIM_WORKLOAD: [ExpectedEvent; 11] = {
    use ihmi_abi::guest_os::{SYS_EXIT, SYS_GETPID, SYS_SPAWN, SYS_WRITE};
    [
        create(1, 0, "init", true),
        syscall(1, "init", SYS_WRITE),
        syscall(1, "init", SYS_GETPID),
        syscall(1, "init", SYS_SPAWN),
        create(2, 1, "worker", true),
        syscall(2, "worker", SYS_WRITE),
        syscall(2, "worker", SYS_GETPID),
        syscall(2, "worker", SYS_EXIT),
        syscall(1, "init", SYS_SPAWN),
        create(3, 1, "intruder", false),
        syscall(1, "init", SYS_EXIT),
    ]
};

/// The monitor's stream must be exactly `expected`, with nothing dropped.
fn check_monitor_events(log: &ScenarioLog, expected: &[ExpectedEvent]) -> Result<(), FailReason> {
    if log.monitor_dropped != 0 {
        return Err(FailReason::MonitorDropped(log.monitor_dropped));
    }
    let got = log.monitor_events();
    for (index, exp) in expected.iter().enumerate() {
        let e = got.get(index);
        if !e.is_some_and(|e| exp.matches(e)) {
            return Err(FailReason::MonitorEvent {
                index,
                expected: *exp,
                got: e.map(SeenEvent::from),
            });
        }
    }
    let extra = got.len().saturating_sub(expected.len()) + log.monitor_events.dropped as usize;
    if extra != 0 {
        return Err(FailReason::ExtraMonitorEvents(extra));
    }
    Ok(())
}

/// The task a Linux guest was running when it ended must be the one `expected` describes.
fn expect_end_task(
    log: &ScenarioLog,
    expected: impl Fn(&TaskInfo) -> bool,
) -> Result<(), FailReason> {
    match log.end_task {
        Some(Ok(t)) if expected(&t) => Ok(()),
        Some(Ok(t)) => Err(FailReason::WrongTask(t)),
        Some(Err(e)) => Err(FailReason::NoTask(e)),
        None => Err(FailReason::NoTask(TaskError::NoProfile)),
    }
}

/// A Linux run ended through L0's ports from /init's last program: pid 1 (init exec'd it), named
/// ihmi-poweroff, child of the idle task (tgid 0), as the kernel's own task_struct says.
fn linux_run_ended_well(log: &ScenarioLog) -> Result<(), FailReason> {
    match log.end {
        None => Err(FailReason::NotEnded),
        Some(GuestEnd::ShutdownRequest) if log.debug_lines > 0 => expect_end_task(log, |t| {
            t.pid == 1 && t.ppid == 0 && comm_bytes(&t.comm) == b"ihmi-poweroff"
        }),
        Some(got) => Err(FailReason::WrongEnd {
            expected: "the guest's /init to print on port 0xE9 and power off through port 0x8900",
            got,
        }),
    }
}

/// How a VM entry failed (SDM 27.8: VMfailInvalid, VMfailValid, or a VM-entry-failure exit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryFailure {
    /// VMfailInvalid: no valid current VMCS.
    FailInvalid,
    /// VMfailValid with this VM-instruction error.
    FailValid(VmInstructionError),
    /// The entry got as far as loading guest state and exited with this reason.
    Exit(ExitReason),
}

/// Judges a failed VM entry: only the two entry-failure scenarios expect one, each a specific kind.
#[must_use]
pub fn judge_entry_failure(scenario: Scenario, failure: EntryFailure) -> Verdict {
    let expected = match scenario {
        Scenario::EntryBadControl => {
            EntryFailure::FailValid(VmInstructionError::EntryInvalidControlFields)
        }
        Scenario::EntryBadGuestState => EntryFailure::Exit(ExitReason::EntryFailInvalidGuestState),
        _ => return Verdict::Fail(FailReason::UnexpectedEntryFailure(failure)),
    };
    if failure == expected {
        Verdict::Pass
    } else {
        Verdict::Fail(FailReason::UnexpectedEntryFailure(failure))
    }
}

/// Judges a finished scenario.
#[must_use]
pub fn judge(
    scenario: Scenario,
    log: &ScenarioLog,
    counters: &ExitCounters,
    probe: Gpa,
    probe_region: Option<RegionKind>,
) -> Verdict {
    match check(scenario, log, counters, probe, probe_region) {
        Ok(()) => Verdict::Pass,
        Err(reason) => Verdict::Fail(reason),
    }
}
