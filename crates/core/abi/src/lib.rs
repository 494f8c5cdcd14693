#![doc = include_str!("../README.md")]
#![no_std]
#![deny(unsafe_code)]

use core::fmt;

pub mod attack;
pub mod bench;
pub mod guest_os;
pub mod monitor;
pub mod multiboot;

pub use attack::{Attack, LinuxAttack};

/// Version of this ABI, returned in EAX of CPUID leaf [`CPUID_LEAF_ABI`].
pub const ABI_VERSION: u32 = 1;
/// CPUID leaf with the hypervisor vendor signature (EBX, ECX, EDX) and the highest hypervisor leaf (EAX).
pub const CPUID_LEAF_SIGNATURE: u32 = 0x4000_0000;
/// CPUID leaf with [`ABI_VERSION`] in EAX.
pub const CPUID_LEAF_ABI: u32 = 0x4000_0001;
/// The 12-byte vendor signature of L0, as CPUID returns it in EBX, ECX, EDX.
pub const CPUID_SIGNATURE: &[u8; 12] = b"ihmiL0ihmiL0";
/// The value [`Hypercall::Ping`] returns in RBX ("ihmi L0" in ASCII).
pub const PING_REPLY: u64 = 0x0069_686d_6920_4c30;
/// Longest single console write, in bytes.
pub const CONSOLE_MAX: u64 = 256;
/// Longest report record, in bytes.
pub const REPORT_MAX: u64 = 256;

/// Hypercall numbers (RAX on VMCALL).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Hypercall {
    /// Liveness check; returns [`PING_REPLY`].
    Ping = 0,
    /// Print guest bytes on L0's console.
    ConsoleWrite = 1,
    /// Hand L0 a typed record for the running scenario to check.
    Report = 2,
    /// The guest is finished; L0 ends it and judges the scenario.
    Done = 3,
    /// Out-of-box monitoring: RBX = request code, RCX, RDX, RSI, RDI = its arguments; L0 runs the
    /// request in the monitor VM and returns the monitor's verdict in RAX.
    Monitor = 4,
    /// Benchmark window mark: RBX = [`bench::Bench`], RCX = 0 at the start, 1 at the end; at the end
    /// RDX = the guest's time-stamp-counter delta over the window and RSI = the calls measured.
    Bench = 5,
    /// The in-box monitor's event ring is past its high-water mark
    /// ([`monitor::RING_HIGH_WATER`]): the exit lets L0 drain it, as at every exit. Only the monitor
    /// makes it (from the monitor view); from the guest view it is refused.
    RingHighWater = 6,
}

impl Hypercall {
    /// Decodes RAX; `None` for numbers the ABI does not define.
    #[must_use]
    pub const fn from_raw(nr: u64) -> Option<Self> {
        Some(match nr {
            0 => Self::Ping,
            1 => Self::ConsoleWrite,
            2 => Self::Report,
            3 => Self::Done,
            4 => Self::Monitor,
            5 => Self::Bench,
            6 => Self::RingHighWater,
            _ => return None,
        })
    }
}

/// Hypercall status (RAX on return).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[repr(i64)]
pub enum Status {
    /// Done.
    #[default]
    Ok = 0,
    /// RAX held no known call number.
    UnknownCall = -1,
    /// An argument is out of range (length, kind).
    InvalidArgument = -2,
    /// A guest pointer does not translate to guest RAM.
    BadAddress = -3,
    /// The caller may not make this call (not ring 0).
    Denied = -4,
}

impl Status {
    /// The value placed in RAX.
    #[must_use]
    pub const fn to_raw(self) -> u64 {
        self as i64 as u64
    }

    /// Decodes RAX after a VMCALL; `None` for values L0 never returns.
    #[must_use]
    pub const fn from_raw(raw: u64) -> Option<Self> {
        Some(match raw as i64 {
            0 => Self::Ok,
            -1 => Self::UnknownCall,
            -2 => Self::InvalidArgument,
            -3 => Self::BadAddress,
            -4 => Self::Denied,
            _ => return None,
        })
    }

    /// Short lower-case name, for logs.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::UnknownCall => "unknown-call",
            Self::InvalidArgument => "invalid-argument",
            Self::BadAddress => "bad-address",
            Self::Denied => "denied",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Kinds of [`Hypercall::Report`] records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum ReportKind {
    /// A [`CpuidRecord`]: what the guest saw for one CPUID leaf.
    Cpuid = 1,
}

impl ReportKind {
    /// Decodes the kind argument.
    #[must_use]
    pub const fn from_raw(raw: u64) -> Option<Self> {
        match raw {
            1 => Some(Self::Cpuid),
            _ => None,
        }
    }

    /// The exact record length this kind requires.
    #[must_use]
    pub const fn record_len(self) -> usize {
        match self {
            Self::Cpuid => CpuidRecord::LEN,
        }
    }
}

/// What the guest saw when it executed CPUID, so L0 can compare with what it returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CpuidRecord {
    /// EAX input.
    pub leaf: u32,
    /// ECX input.
    pub subleaf: u32,
    /// Outputs EAX, EBX, ECX, EDX.
    pub regs: [u32; 4],
}

impl CpuidRecord {
    /// Length of the encoded record.
    pub const LEN: usize = 24;

    /// Little-endian encoding: leaf, subleaf, eax, ebx, ecx, edx.
    #[must_use]
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        let words = [
            self.leaf,
            self.subleaf,
            self.regs[0],
            self.regs[1],
            self.regs[2],
            self.regs[3],
        ];
        for (chunk, w) in out.chunks_exact_mut(4).zip(words) {
            chunk.copy_from_slice(&w.to_le_bytes());
        }
        out
    }

    /// Decodes a record; `None` unless `bytes` has exactly [`Self::LEN`] bytes.
    #[must_use]
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != Self::LEN {
            return None;
        }
        let mut w = [0u32; 6];
        for (slot, chunk) in w.iter_mut().zip(bytes.chunks_exact(4)) {
            *slot = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        }
        Some(Self {
            leaf: w[0],
            subleaf: w[1],
            regs: [w[2], w[3], w[4], w[5]],
        })
    }
}

/// The scenarios L0 and the test guest know. The name travels on L0's command line (`scenario=NAME`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// The guest runs, calls CPUID and VMCALL; L0 checks the values the guest saw.
    Boot,
    /// The guest reads a frame L0 owns; L0 must report an EPT violation and end the guest.
    EptGuard,
    /// The guest makes malformed hypercalls; each must be rejected with the right status.
    BadHypercall,
    /// Everything the guest can exercise, with L0's banner, features and exit counters.
    Demo,
    /// L0 breaks a VM-execution control on purpose: VMLAUNCH must fail (VMfailValid) and L0 must report
    /// the decoded VM-instruction error and a VMCS dump instead of hanging.
    EntryBadControl,
    /// L0 breaks the guest state on purpose: VM entry must fail with a VM-entry-failure exit, reported
    /// with its decoded reason and a VMCS dump.
    EntryBadGuestState,
    /// In-VM monitoring: the guest's processes run with the monitor in-box; L0 checks the monitor's
    /// event stream against the workload.
    Sim,
    /// The same workload with the same monitor out of the box: in a monitor VM of its own, reached
    /// by VMCALL. Its event stream must be the in-box one.
    SimOutbox,
    /// The compromised guest kernel tries one attack on the in-box monitor; L0 judges whether it was
    /// blocked and reported, and whether the monitor is intact.
    Attack(Attack),
    /// The invocation benchmark with the monitor reached this way (or not at all, for `None`).
    Bench(monitor::Mode),
    /// An unmodified Linux kernel (the `linux` module) boots with its initramfs (`initrd`) and runs
    /// its /init, which ends the run through L0's debug and power-off ports.
    LinuxBoot,
    /// The same with the in-box system-call monitor on: the kernel's SYSCALL entry goes through the
    /// gate, and L0 checks the monitor's events against the workload.
    LinuxSim,
    /// The same with a compromised root in the Linux guest, which tries one attack
    /// ([`LinuxAttack`]); L0 judges whether it was blocked and reported.
    LinuxAttack(LinuxAttack),
    /// `LinuxSim` with the same two monitors out of the box: the system-call and exec hooks make a
    /// VMCALL and L0 runs the request in the monitor VM.
    LinuxSimOutbox,
    /// The Linux overhead benchmark (`ihmi-bench` instead of the workload), with the monitors reached
    /// this way (or none).
    LinuxBench(monitor::Mode),
    /// Nested VMX, milestone M1: L0 offers the test guest VMX, and the guest enters and leaves VMX
    /// operation, with the faults and failures of the SDM for each wrong way of doing it.
    NestedVmxon,
    /// Nested VMX, the first half of milestone M2: in VMX operation, the guest makes a VMCS current,
    /// writes and reads its fields, clears it and loads it again, with the SDM's VMfailValid errors
    /// for each wrong way.
    NestedVmcs,
    /// Nested VMX, milestone M2: the test guest as a tiny hypervisor runs a 64-bit guest of its own
    /// (L2), which makes the exits L1 asked for and some it did not; L1 injects an event into it.
    NestedMini,
    /// `NestedMini` with VMCS shadowing: L1's VMREADs and VMWRITEs of the common fields make no
    /// exits.
    NestedMiniShadow,
    /// Nested VMX, milestone M4 with the test guest as L1: `NestedMini` with an EPT of L1's for L2
    /// (EPT12, filled on L2's EPT violations), then two attacks of a compromised L1 on L0 through
    /// it: an entry with EPT12's root in L0's memory, and an EPT12 leaf onto L0's frame.
    NestedMiniEpt,
    /// Nested VMX, milestone M3: Linux with KVM built in (the `l1` kernel, `kvm_intel.ept=0`) is L1;
    /// its /init runs `ihmi-l1-vmm --probe`, whose 64-bit L2 makes CPUIDs (each handled by KVM),
    /// touches memory under KVM's shadow page tables and reports through port I/O the VMM relays.
    NestedKvm,
    /// `NestedKvm` with VMCS shadowing.
    NestedKvmShadow,
    /// Nested VMX, milestone M4: `NestedKvmShadow` with EPT offered to L1 (`kvm_intel.ept=1`): L2
    /// runs on EPT02, which L0 builds from KVM's EPT12 and its own view of L1.
    NestedKvmEpt,
    /// `NestedKvmShadow` with both Linux monitors in the box in L1 (the system-call gate and the
    /// exec hook, as `LinuxSim`): L1's /init runs the workload, then the L1 VMM's probe. The in-VM
    /// monitor of a Linux guest that is also a guest hypervisor.
    NestedKvmSim,
    /// In-hypervisor memory introspection (IHMI, NESTED.md Part B): `NestedKvmShadow` with the
    /// monitor in the box in L1 and hooked into KVM's L2-exit path (`vmx_handle_exit`): one event per
    /// exit KVM handles, each checked against the exit L0 reflected, and KVM's exit-handler table held
    /// to the kernel image's values at every one.
    IhmiKvm,
    /// `IhmiKvm` under one attack of L1's compromised root ([`attack::IhmiAttack`], NESTED.md B.3).
    IhmiAttack(attack::IhmiAttack),
    /// `IhmiKvm` with the same monitor out of the box (CloudVisor-style, NESTED.md B.4): in a VM of
    /// its own under L0, reached from the same hook by VMCALL, reading L1's memory by walking L1's
    /// page tables in software. `ihmi test` compares its events with `IhmiKvm`'s.
    IhmiKvmOutbox,
    /// Nested VMX, milestone M5: `NestedKvmEpt` with a Linux L2 (`ihmi-l1-vmm --linux`, the `l1`
    /// kernel again with a one-program initramfs), which boots to its /init and powers itself off.
    /// Minutes under Bochs: in [`Scenario::SLOW`], not in `ihmi test`'s default set.
    NestedLinux,
    /// L0 boots a multiboot kernel (ours, `ihmi-mbkernel`) as its guest by the first multiboot
    /// protocol: 32-bit protected mode, paging off, the boot information of the multiboot spec with
    /// the kernel's command line, its modules and the memory map. The kernel checks how it was
    /// entered and reports a digest of what it was handed, which L0 compares with what it handed.
    Multiboot1,
    /// The same by the multiboot2 protocol.
    Multiboot2,
    /// A user's multiboot kernel (`ihmi run --kernel FILE`), by the protocol `multiboot=1|2` on L0's
    /// command line names, else by its multiboot2 header if it has one, else by its first one. It
    /// passes if it powers off (port 0x8900) or exits with status 0 through the isa-debug-exit port
    /// (0xF4, as kvm-unit-tests do). Not in [`Scenario::ALL`]: it needs the user's file.
    Kernel,
    /// The same with VMX offered to the kernel as to a guest hypervisor (`--nested`): nested EPT and
    /// VMCS shadowing, as in `nested-kvm-ept`.
    KernelNested,
}

/// CPUIDs `nested-mini`'s L2 makes; each is reflected to L1 (the test guest and L0's judge agree on
/// it here).
pub const NESTED_MINI_CPUIDS: usize = 8;

/// `nested-mini-ept`: how the test guest's line on L0's debug port starts, before its last step
/// (which L0 ends): then the number of its own checks that failed up to there.
pub const NESTED_MINI_EPT_REPORT: &str = "nested-mini-ept: L1's checks failed: ";

/// `nested-kvm`: the CPUIDs the L1 VMM's probe L2 makes (each an exit KVM handles in L1's kernel),
/// and the pages it writes and reads back (each a fault KVM's shadow paging fills in first).
pub const NESTED_KVM_CPUIDS: u64 = 1000;
pub const NESTED_KVM_PAGES: u64 = 256;
/// Where the pages it writes start, guest-physical (one after the other from there).
pub const NESTED_KVM_TOUCH_BASE: u64 = 0x10_0000;
/// How the L1 VMM's relayed line of its L2's report starts on L0's debug port: the VMM's prefix
/// for what its L2 wrote, then the L2's own.
pub const NESTED_KVM_L2_REPORT: &str = "l2: ihmi-l2: ";

/// The longest line L0 takes from a guest's debug port (0xE9): more bytes before the newline start
/// a line of their own.
pub const DEBUG_LINE_MAX: usize = 120;

/// How the L1 VMM relays each line its L2 writes on the debug port (the probe's report and the
/// Linux L2 init's line).
pub const NESTED_L2_DEBUG: &str = "l2: ";
/// How the L1 VMM's own lines start.
pub const NESTED_L1_VMM: &str = "ihmi-l1-vmm: ";

/// `nested-linux`: the line L2's /init writes on its debug port, as the L1 VMM relays it (its
/// prefix for L2's debug port, then the words after `--` on L2's kernel command line).
pub const NESTED_LINUX_L2_INIT: &str = "l2: ihmi-l2-init: a Linux L2 ran its /init";
/// How the L1 VMM relays each line of its L2's UART.
pub const NESTED_LINUX_CONSOLE: &str = "l2 console: ";
/// How the L1 VMM's last line starts when its Linux L2 powered itself off.
pub const NESTED_LINUX_DONE: &str = "ihmi-l1-vmm: linux done: ";

/// Raw numbers of the attack scenarios start here (`ATTACK_BASE + attack number`).
const ATTACK_BASE: u32 = 100;
/// And those of the Linux attacks after the first (`LINUX_ATTACK_BASE + attack number`).
const LINUX_ATTACK_BASE: u32 = 40;
/// And those of the in-hypervisor monitor's attacks (`IHMI_ATTACK_BASE + attack number`).
const IHMI_ATTACK_BASE: u32 = 70;

impl Scenario {
    /// Every scenario, in the order `ihmi test` runs them (and the host's scenario table lists them):
    /// the test guest's, Linux's, the two benchmarks', the attack suite, then nested VMX's.
    /// The last [`Scenario::SLOW`]`.len()` are too slow for the default set.
    pub const ALL: [Scenario;
        18 + LinuxAttack::ALL.len() - 1 + Attack::ALL.len() + 14 + attack::IhmiAttack::ALL.len()] = {
        let mut all = [Self::Boot;
            18 + LinuxAttack::ALL.len() - 1
                + Attack::ALL.len()
                + 14
                + attack::IhmiAttack::ALL.len()];
        let fixed = [
            Self::Boot,
            Self::EptGuard,
            Self::BadHypercall,
            Self::Demo,
            Self::EntryBadControl,
            Self::EntryBadGuestState,
            Self::Sim,
            Self::SimOutbox,
            Self::LinuxBoot,
            Self::LinuxSim,
            Self::LinuxAttack(LinuxAttack::Root),
            Self::LinuxSimOutbox,
            Self::Bench(monitor::Mode::None),
            Self::Bench(monitor::Mode::InBox),
            Self::Bench(monitor::Mode::OutBox),
            Self::LinuxBench(monitor::Mode::None),
            Self::LinuxBench(monitor::Mode::InBox),
            Self::LinuxBench(monitor::Mode::OutBox),
        ];
        let mut i = 0;
        while i < fixed.len() {
            all[i] = fixed[i];
            i += 1;
        }
        // The other Linux attacks, then the test guest's.
        let mut k = 1;
        while k < LinuxAttack::ALL.len() {
            all[i] = Self::LinuxAttack(LinuxAttack::ALL[k]);
            i += 1;
            k += 1;
        }
        let mut j = 0;
        while j < Attack::ALL.len() {
            all[i + j] = Self::Attack(Attack::ALL[j]);
            j += 1;
        }
        // Then multiboot kernels, and nested VMX's milestones.
        all[i + j] = Self::Multiboot1;
        all[i + j + 1] = Self::Multiboot2;
        all[i + j + 2] = Self::NestedVmxon;
        all[i + j + 3] = Self::NestedVmcs;
        all[i + j + 4] = Self::NestedMini;
        all[i + j + 5] = Self::NestedMiniShadow;
        all[i + j + 6] = Self::NestedMiniEpt;
        all[i + j + 7] = Self::NestedKvm;
        all[i + j + 8] = Self::NestedKvmShadow;
        all[i + j + 9] = Self::NestedKvmEpt;
        all[i + j + 10] = Self::NestedKvmSim;
        all[i + j + 11] = Self::IhmiKvm;
        all[i + j + 12] = Self::IhmiKvmOutbox;
        let mut k = 0;
        while k < attack::IhmiAttack::ALL.len() {
            all[i + j + 13 + k] = Self::IhmiAttack(attack::IhmiAttack::ALL[k]);
            k += 1;
        }
        all[i + j + 13 + k] = Self::NestedLinux;
        all
    };

    /// The scenarios that take minutes under Bochs, last in [`Scenario::ALL`]: `ihmi test` runs
    /// them when named, not by default.
    pub const SLOW: [Scenario; 1] = [Self::NestedLinux];

    /// The default test set: [`Scenario::ALL`] without [`Scenario::SLOW`].
    #[must_use]
    pub fn default_set() -> &'static [Scenario] {
        &Self::ALL[..Self::ALL.len() - Self::SLOW.len()]
    }

    /// How the guest reaches the monitor in this scenario.
    #[must_use]
    pub const fn monitor_mode(self) -> monitor::Mode {
        match self {
            Self::Sim
            | Self::Attack(_)
            | Self::LinuxSim
            | Self::LinuxAttack(_)
            | Self::NestedKvmSim
            | Self::IhmiKvm
            | Self::IhmiAttack(_) => monitor::Mode::InBox,
            Self::SimOutbox | Self::LinuxSimOutbox | Self::IhmiKvmOutbox => monitor::Mode::OutBox,
            Self::Bench(mode) | Self::LinuxBench(mode) => mode,
            _ => monitor::Mode::None,
        }
    }

    /// Whether the guest is a Linux kernel rather than the test guest.
    #[must_use]
    pub const fn is_linux(self) -> bool {
        matches!(
            self,
            Self::LinuxBoot
                | Self::LinuxSim
                | Self::LinuxAttack(_)
                | Self::LinuxSimOutbox
                | Self::LinuxBench(_)
                | Self::NestedKvm
                | Self::NestedKvmShadow
                | Self::NestedKvmEpt
                | Self::NestedKvmSim
                | Self::IhmiKvm
                | Self::IhmiAttack(_)
                | Self::IhmiKvmOutbox
                | Self::NestedLinux
        )
    }

    /// The attack this scenario runs, if it is one.
    #[must_use]
    pub const fn attack(self) -> Option<Attack> {
        match self {
            Self::Attack(a) => Some(a),
            _ => None,
        }
    }

    /// The Linux attack this scenario runs, if it is one.
    #[must_use]
    pub const fn linux_attack(self) -> Option<LinuxAttack> {
        match self {
            Self::LinuxAttack(a) => Some(a),
            _ => None,
        }
    }

    /// The command-line name.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Boot => "boot",
            Self::EptGuard => "ept-guard",
            Self::BadHypercall => "bad-hypercall",
            Self::Demo => "testguest-demo",
            Self::EntryBadControl => "entry-bad-control",
            Self::EntryBadGuestState => "entry-bad-guest-state",
            Self::Sim => "sim",
            Self::SimOutbox => "sim-outbox",
            Self::Bench(monitor::Mode::None) => "bench-none",
            Self::Bench(monitor::Mode::InBox) => "bench-inbox",
            Self::Bench(monitor::Mode::OutBox) => "bench-outbox",
            Self::LinuxBoot => "linux-boot",
            Self::LinuxSim => "linux-sim",
            Self::LinuxAttack(a) => a.scenario_name(),
            Self::LinuxSimOutbox => "linux-sim-outbox",
            Self::LinuxBench(monitor::Mode::None) => "linux-bench-none",
            Self::LinuxBench(monitor::Mode::InBox) => "linux-bench-inbox",
            Self::LinuxBench(monitor::Mode::OutBox) => "linux-bench-outbox",
            Self::Attack(a) => a.scenario_name(),
            Self::NestedVmxon => "nested-vmxon",
            Self::NestedVmcs => "nested-vmcs",
            Self::NestedMini => "nested-mini",
            Self::NestedMiniShadow => "nested-mini-shadow",
            Self::NestedMiniEpt => "nested-mini-ept",
            Self::NestedKvm => "nested-kvm",
            Self::NestedKvmShadow => "nested-kvm-shadow",
            Self::NestedKvmEpt => "nested-kvm-ept",
            Self::NestedKvmSim => "nested-kvm-sim",
            Self::IhmiKvm => "ihmi-kvm",
            Self::IhmiAttack(a) => a.scenario_name(),
            Self::IhmiKvmOutbox => "ihmi-kvm-outbox",
            Self::NestedLinux => "nested-linux",
            Self::Multiboot1 => "multiboot1",
            Self::Multiboot2 => "multiboot2",
            Self::Kernel => "kernel",
            Self::KernelNested => "kernel-nested",
        }
    }

    /// Whether the guest is a multiboot kernel.
    #[must_use]
    pub const fn is_multiboot(self) -> bool {
        matches!(
            self,
            Self::Multiboot1 | Self::Multiboot2 | Self::Kernel | Self::KernelNested
        )
    }

    /// The multiboot protocol (1 or 2) this scenario boots its kernel by, when the scenario fixes it.
    #[must_use]
    pub const fn multiboot(self) -> Option<u8> {
        match self {
            Self::Multiboot1 => Some(1),
            Self::Multiboot2 => Some(2),
            _ => None,
        }
    }

    /// The scenarios that boot a user's file (`ihmi run --kernel`), which [`Scenario::ALL`] leaves
    /// out; [`Scenario::from_name`] and [`Scenario::from_raw`] know them.
    pub const USER: [Scenario; 2] = [Self::Kernel, Self::KernelNested];

    /// Whether L0 offers the guest VMX (nested VMX, NESTED.md Part A).
    #[must_use]
    pub const fn offers_vmx(self) -> bool {
        matches!(
            self,
            Self::NestedVmxon
                | Self::NestedVmcs
                | Self::NestedMini
                | Self::NestedMiniShadow
                | Self::NestedMiniEpt
                | Self::NestedKvm
                | Self::NestedKvmShadow
                | Self::NestedKvmEpt
                | Self::NestedKvmSim
                | Self::IhmiKvm
                | Self::IhmiAttack(_)
                | Self::IhmiKvmOutbox
                | Self::NestedLinux
                | Self::KernelNested
        )
    }

    /// Whether L0 offers the guest EPT for its own guests (nested EPT, NESTED.md A.2.8).
    #[must_use]
    pub const fn offers_nested_ept(self) -> bool {
        matches!(
            self,
            Self::NestedMiniEpt | Self::NestedKvmEpt | Self::NestedLinux | Self::KernelNested
        )
    }

    /// Whether L0 shadows the guest's VMCS12 (VMCS shadowing, NESTED.md A.2.5).
    #[must_use]
    pub const fn shadows_vmcs(self) -> bool {
        matches!(
            self,
            Self::NestedMiniShadow
                | Self::NestedKvmShadow
                | Self::NestedKvmSim
                | Self::IhmiKvm
                | Self::IhmiAttack(_)
                | Self::IhmiKvmOutbox
                | Self::NestedKvmEpt
                | Self::NestedLinux
                | Self::KernelNested
        )
    }

    /// The number stored in [`BootInfo::scenario`].
    #[must_use]
    pub const fn to_raw(self) -> u32 {
        match self {
            Self::Boot => 1,
            Self::EptGuard => 2,
            Self::BadHypercall => 3,
            Self::Demo => 4,
            Self::EntryBadControl => 5,
            Self::EntryBadGuestState => 6,
            Self::Sim => 7,
            Self::SimOutbox => 8,
            Self::Bench(mode) => 9 + mode as u32,
            Self::LinuxBoot => 12,
            Self::LinuxSim => 13,
            Self::LinuxAttack(LinuxAttack::Root) => 14,
            Self::LinuxAttack(a) => LINUX_ATTACK_BASE + a as u32,
            Self::LinuxSimOutbox => 15,
            Self::LinuxBench(mode) => 16 + mode as u32,
            Self::Attack(a) => ATTACK_BASE + a as u32,
            Self::NestedVmxon => 19,
            Self::NestedVmcs => 20,
            Self::NestedMini => 21,
            Self::NestedMiniShadow => 22,
            Self::NestedKvm => 23,
            Self::NestedKvmShadow => 24,
            Self::NestedKvmEpt => 25,
            Self::NestedMiniEpt => 26,
            Self::NestedLinux => 27,
            Self::Multiboot1 => 28,
            Self::Multiboot2 => 29,
            Self::Kernel => 30,
            Self::KernelNested => 31,
            Self::NestedKvmSim => 32,
            Self::IhmiKvm => 33,
            Self::IhmiKvmOutbox => 34,
            Self::IhmiAttack(a) => IHMI_ATTACK_BASE + a as u32,
        }
    }

    /// Looks a scenario up by its command-line name.
    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .chain(Self::USER)
            .find(|s| s.name() == name)
    }

    /// Decodes the number stored in [`BootInfo::scenario`].
    #[must_use]
    pub fn from_raw(raw: u32) -> Option<Self> {
        Self::ALL
            .into_iter()
            .chain(Self::USER)
            .find(|s| s.to_raw() == raw)
    }
}

/// The `bad-hypercall` battery: each malformed call the test guest makes, in order, with the status L0
/// must return. L0 judges from the statuses it actually returned; the guest checks what it saw.
pub const BAD_HYPERCALL_CASES: &[(&str, Status)] = &[
    ("unknown number 0xdead", Status::UnknownCall),
    ("unknown number u64::MAX", Status::UnknownCall),
    ("console write of 0 bytes", Status::InvalidArgument),
    ("console write over CONSOLE_MAX", Status::InvalidArgument),
    (
        "console write from a non-canonical address",
        Status::BadAddress,
    ),
    ("console write from an unmapped address", Status::BadAddress),
    ("console write from an L0-owned frame", Status::BadAddress),
    (
        "console write crossing out of guest RAM",
        Status::BadAddress,
    ),
    ("report of an unknown kind", Status::InvalidArgument),
    ("report with a wrong length", Status::InvalidArgument),
    ("report from an unmapped address", Status::BadAddress),
    (
        "benchmark end mark without its start",
        Status::InvalidArgument,
    ),
];

/// Magic value at the start of [`BootInfo`] ("IHMIBOOT").
pub const BOOT_INFO_MAGIC: u64 = 0x544f_4f42_494d_4849;
/// Largest number of RAM ranges in [`BootInfo`].
pub const BOOT_INFO_MAX_RANGES: usize = 16;

/// One range of guest RAM, `[start, start + len)` guest-physical.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[repr(C)]
pub struct RamRange {
    /// First byte.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
}

/// What L0 tells one of our own guests at boot. Linux guests get the Linux boot protocol instead.
///
/// Raw `u64` fields are used here because this is a wire format shared with guest code; both sides wrap
/// them in address types at the boundary.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BootInfo {
    /// [`BOOT_INFO_MAGIC`].
    pub magic: u64,
    /// [`ABI_VERSION`].
    pub abi_version: u32,
    /// The scenario, as [`Scenario::to_raw`].
    pub scenario: u32,
    /// Number of valid entries in `ram`.
    pub ram_count: u64,
    /// Guest RAM, sorted by address.
    pub ram: [RamRange; BOOT_INFO_MAX_RANGES],
    /// A guest-physical address that L0 owns (not guest RAM), for scenarios that probe the EPT.
    pub probe_gpa: u64,
    /// How to reach the monitor (`monitor::Mode as u32`).
    pub monitor_mode: u32,
    /// Reserved, zero.
    pub _reserved: u32,
    /// Guest-virtual address of the gate's entry point, in in-box mode.
    pub gate_gva: u64,
}

impl BootInfo {
    /// The RAM ranges L0 filled in.
    #[must_use]
    pub fn ram(&self) -> &[RamRange] {
        let n = (self.ram_count as usize).min(BOOT_INFO_MAX_RANGES);
        &self.ram[..n]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hypercall_numbers_round_trip() {
        for nr in 0..7 {
            assert_eq!(Hypercall::from_raw(nr).map(|h| h as u64), Some(nr));
        }
        assert_eq!(Hypercall::from_raw(7), None);
        assert_eq!(Hypercall::from_raw(u64::MAX), None);
    }

    #[test]
    fn status_is_sign_extended() {
        assert_eq!(Status::BadAddress.to_raw(), u64::MAX - 2);
        for s in [
            Status::Ok,
            Status::UnknownCall,
            Status::InvalidArgument,
            Status::BadAddress,
            Status::Denied,
        ] {
            assert_eq!(Status::from_raw(s.to_raw()), Some(s));
        }
        assert_eq!(Status::from_raw(1), None);
    }

    #[test]
    fn cpuid_record_round_trip_and_length_check() {
        let r = CpuidRecord {
            leaf: 0x4000_0000,
            subleaf: 0,
            regs: [1, 2, 3, 0xdead_beef],
        };
        let bytes = r.encode();
        assert_eq!(CpuidRecord::decode(&bytes), Some(r));
        assert_eq!(CpuidRecord::decode(&bytes[..23]), None);
        assert_eq!(
            ReportKind::from_raw(1).map(ReportKind::record_len),
            Some(CpuidRecord::LEN)
        );
        assert_eq!(ReportKind::from_raw(0), None);
    }

    #[test]
    fn scenario_names_round_trip() {
        for s in Scenario::ALL.into_iter().chain(Scenario::USER) {
            assert_eq!(Scenario::from_name(s.name()), Some(s));
            assert_eq!(Scenario::from_raw(s.to_raw()), Some(s));
        }
        assert_eq!(Scenario::from_name("nope"), None);
        let slow = &Scenario::ALL[Scenario::default_set().len()..];
        assert_eq!(slow, Scenario::SLOW, "the slow ones last");
        assert!(Scenario::default_set().contains(&Scenario::NestedKvmEpt));
        for a in LinuxAttack::ALL {
            let n = Scenario::ALL.iter().filter(|s| s.linux_attack() == Some(a));
            assert_eq!(n.count(), 1, "{a:?} once");
            assert_eq!(LinuxAttack::from_name(a.name()), Some(a));
        }
    }

    #[test]
    fn signature_is_twelve_bytes_and_ping_reply_is_ascii() {
        assert_eq!(CPUID_SIGNATURE.len(), 12);
        assert_eq!(&PING_REPLY.to_be_bytes()[1..], b"ihmi L0");
    }
}
