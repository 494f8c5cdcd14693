//! The attack suite (BRIEF.md §4, items 1–11): what the compromised test-guest kernel tries in each
//! `attack-*` scenario. L0 judges each run and prints one `attack|` JSON line per attack.

/// One attack. The number is the item of BRIEF.md §4 it belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Attack {
    /// 1. Read monitor code through a page-table entry the guest forged for it.
    ForgedPte = 1,
    /// 2. `mov cr3` to the monitor's page-table root (read out of the gate's code).
    Cr3Switch = 2,
    /// 3. `VMFUNC(0, 1)` from the guest's own code instead of the gate.
    VmfuncOutsideGate = 3,
    /// 4. `VMFUNC(0, n)` with indexes that are not views.
    VmfuncBadIndex = 4,
    /// 5. Jump into the middle of the entry gate with forged registers, then into the exit gate.
    GateMiddle = 5,
    /// 6. Overwrite the hook in the guest kernel's code.
    HookOverwrite = 6,
    /// 6. Overwrite the gate page.
    GateOverwrite = 7,
    /// 7. Remap the gate's virtual address to an attacker frame holding a copy of the gate.
    GateRemap = 8,
    /// 8. Point `MSR_LSTAR` at an entry that skips the system-call hook.
    LstarRedirect = 9,
    /// 9. Single-step (RFLAGS.TF) into the gate, so a #DB arrives in the monitor view.
    TrapInMonitor = 10,
    /// 10. Flood the monitor with requests until its event ring overflows.
    EventFlood = 11,
    /// 10. Write a forged event into the monitor's event ring.
    EventForge = 12,
    /// 11. Starve the monitor: clear the hook's gate pointer so hooks stop firing.
    HookStarve = 13,
}

impl Attack {
    /// Every attack, in the order `ihmi attacks` runs them.
    pub const ALL: [Attack; 13] = [
        Self::ForgedPte,
        Self::Cr3Switch,
        Self::VmfuncOutsideGate,
        Self::VmfuncBadIndex,
        Self::GateMiddle,
        Self::HookOverwrite,
        Self::GateOverwrite,
        Self::GateRemap,
        Self::LstarRedirect,
        Self::TrapInMonitor,
        Self::EventFlood,
        Self::EventForge,
        Self::HookStarve,
    ];

    /// The attack's short name (the scenario is `attack-<name>`).
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::ForgedPte => "forged-pte",
            Self::Cr3Switch => "cr3-switch",
            Self::VmfuncOutsideGate => "vmfunc-outside-gate",
            Self::VmfuncBadIndex => "vmfunc-bad-index",
            Self::GateMiddle => "gate-middle",
            Self::HookOverwrite => "hook-overwrite",
            Self::GateOverwrite => "gate-overwrite",
            Self::GateRemap => "gate-remap",
            Self::LstarRedirect => "lstar-redirect",
            Self::TrapInMonitor => "trap-in-monitor",
            Self::EventFlood => "event-flood",
            Self::EventForge => "event-forge",
            Self::HookStarve => "hook-starve",
        }
    }

    /// The scenario name, `attack-<name>`.
    #[must_use]
    pub const fn scenario_name(self) -> &'static str {
        match self {
            Self::ForgedPte => "attack-forged-pte",
            Self::Cr3Switch => "attack-cr3-switch",
            Self::VmfuncOutsideGate => "attack-vmfunc-outside-gate",
            Self::VmfuncBadIndex => "attack-vmfunc-bad-index",
            Self::GateMiddle => "attack-gate-middle",
            Self::HookOverwrite => "attack-hook-overwrite",
            Self::GateOverwrite => "attack-gate-overwrite",
            Self::GateRemap => "attack-gate-remap",
            Self::LstarRedirect => "attack-lstar-redirect",
            Self::TrapInMonitor => "attack-trap-in-monitor",
            Self::EventFlood => "attack-event-flood",
            Self::EventForge => "attack-event-forge",
            Self::HookStarve => "attack-hook-starve",
        }
    }

    /// The item of BRIEF.md §4 the attack belongs to.
    #[must_use]
    pub const fn brief_item(self) -> u32 {
        match self {
            Self::ForgedPte => 1,
            Self::Cr3Switch => 2,
            Self::VmfuncOutsideGate => 3,
            Self::VmfuncBadIndex => 4,
            Self::GateMiddle => 5,
            Self::HookOverwrite | Self::GateOverwrite => 6,
            Self::GateRemap => 7,
            Self::LstarRedirect => 8,
            Self::TrapInMonitor => 9,
            Self::EventFlood | Self::EventForge => 10,
            Self::HookStarve => 11,
        }
    }

    /// Decodes the number.
    #[must_use]
    pub fn from_raw(raw: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|a| *a as u32 == raw)
    }
}

/// How many requests the `event-flood` guest sends: more than the ring holds between two drains.
pub const FLOOD_REQUESTS: u64 = crate::monitor::RING_LEN as u64 + 136;
/// The request code the forged calls use: no monitor request has it.
pub const FORGED_REQUEST: u64 = 0x00ba_d0c0_de00;

/// What the compromised root of a Linux guest tries in one `linux-attack*` scenario (issue 13's
/// classes). `ihmi-attack` reads which from the kernel command line (`ihmi.attack=<name>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum LinuxAttack {
    /// Move IA32_LSTAR off the gate through /dev/cpu/0/msr, then read the monitor through /dev/mem.
    Root = 0,
    /// Patch kernel text through a /dev/mem mapping: one byte in the page of the hooked function's
    /// caller (so later execs would skip the hook).
    KernelText = 1,
    /// Point the gate's PML4 slot in the user half of the kernel's PGD (which every new process
    /// copies) somewhere else through a /dev/mem mapping.
    GatePgd = 2,
    /// Point the gate's PML4 slot in the PGDs of running processes (their copies of the kernel's) at
    /// a copy of the gate's page tables in the attacker's own pages, through /dev/mem.
    ProcessPgd = 3,
    /// Make [`LINUX_FLOOD_CALLS`] system calls as fast as it can, more than the event ring holds
    /// between two exits, hoping the monitor drops what they would show.
    Flood = 4,
    /// Make [`LINUX_COMPAT_CALLS`] `getpid` calls through each 32-bit entry from a 64-bit program:
    /// `int $0x80`, and SYSENTER (in a child each, since SYSENTER's return lands in the 32-bit vDSO
    /// a 64-bit process does not have).
    Compat = 5,
    /// Turn a periodic device interrupt into NMIs (the RTC's, routed by the I/O APIC with delivery
    /// mode NMI, through /dev/mem and the RTC's ports) while making system calls, so NMIs arrive
    /// while the guest is inside the gate, in the monitor's view; then report on port 0xE9 how many
    /// NMIs the kernel counted ([`LINUX_NMI_REPORT`]).
    Nmi = 6,
    /// Run code in ring 0 without touching kernel text (a supervisor-executable mapping of the
    /// attacker's own page, added to the kernel's page tables through /dev/mem, reached through a
    /// sysctl handler pointer in kernel data), and from there: call the monitor's gate with a forged
    /// system-call request and a forged exec request, then clear CR4.SMEP and CR0.WP (each in a child
    /// process, since the refusal is a #GP the kernel answers by killing the task).
    Forge = 7,
    /// Do through an io_uring ring what a system-call monitor watches for: open (create) a file,
    /// write it, close it, make a directory ([`LINUX_IO_URING_OPS`]), with no system call but
    /// `io_uring_setup` and `io_uring_enter`.
    IoUring = 8,
    /// Run a refused program (`ihmi-intruder`) under the identities of allowed ones: a copy and a
    /// hard link under allowed names, a symbolic link, a script named like an allowed program with
    /// the intruder as its interpreter, and an allowed program changed by a byte (once as a fresh
    /// copy, once after it had run); run allowed programs under other names; and load code into
    /// its own memory, which no exec brings in ([`LINUX_IDENTITY_RUNS`]).
    Identity = 9,
}

/// The `identity` attack's executions, in order: the path it runs, and whether the allow-list
/// must let it. Each refused disguise but the changed ones is the intruder's content; the renamed
/// copy is `ihmi-workload`'s; the script at `/tmp/script` runs `/bin/sh` (busybox). Every changed
/// program is `ihmi-workload` changed, so nothing that runs by mistake can do harm.
pub const LINUX_IDENTITY_RUNS: [(&str, bool); 11] = [
    ("/bin/ihmi-intruder", false),
    ("/bin/ihmi-workload", true),
    ("/tmp/ihmi-workload", false), // a copy of the intruder
    ("/tmp/busybox", false),       // a hard link to it
    ("/tmp/ihmi-bench", false),    // a symbolic link to it
    ("/tmp/ihmi-poweroff", false), // `#!/bin/ihmi-intruder`
    ("/tmp/ihmi-attack", false),   // ihmi-workload with a byte appended
    ("/tmp/renamed", true),        // a copy of ihmi-workload
    ("/tmp/renamed", true),        // again: its digest from the monitor's cache
    ("/tmp/script", true),         // `#!/bin/sh`
    ("/tmp/renamed", false),       // the same copy, after a byte was appended to it
];
/// Where in [`LINUX_IDENTITY_RUNS`] the intruder's disguises are (its content, other names).
pub const LINUX_IDENTITY_INTRUDER: [usize; 4] = [2, 3, 4, 5];
/// The start of the `identity` attack's line on port 0xE9 saying what its loaded code returned, in
/// decimal ([`LINUX_IDENTITY_LOADED`] when it ran).
pub const LINUX_IDENTITY_LOADER_REPORT: &str = "ihmi-identity loaded=";
/// The start of its line on port 0xE9 with the time stamp counter's ticks over the first run of
/// `/tmp/renamed` (hashed) and the second (cached): `first=N cached=M`.
pub const LINUX_IDENTITY_TIMING_REPORT: &str = "ihmi-identity exec-tsc ";
/// What the code it loads into its own memory returns.
pub const LINUX_IDENTITY_LOADED: u64 = 0x1d_1d;

/// The operations the `io-uring` attack submits, in order (`IORING_OP_*`: openat, write, close,
/// mkdirat).
pub const LINUX_IO_URING_OPS: [u8; 4] = [18, 23, 19, 37];

/// The `forge` attack's forged system-call request: `execve`, as if the running process had made it.
pub const LINUX_FORGED_SYSCALL_NR: u64 = 59;

/// How the `forge` attacker's line starts once its ring-0 code loaded another IDT (the direct-map
/// alias of `idt_table`) and made an exit (a CPUID): then, in hex, the base it loaded, the IDTR base
/// before, and the one after the exit.
pub const LINUX_IDT_LINE: &str = "ihmi-attack: LIDT from ring 0, then an exit: ";

/// How many `getpid` calls the `nmi` attack makes while the NMIs arrive.
pub const LINUX_NMI_CALLS: u64 = 4_000;
/// The fewest NMIs the `nmi` attack must have caused for its run to count.
pub const LINUX_NMI_MIN: u64 = 20;
/// The start of the `nmi` attack's report line on port 0xE9; the NMIs the kernel counted over the
/// attack (the `NMI:` line of /proc/interrupts) follow in decimal.
pub const LINUX_NMI_REPORT: &str = "ihmi-nmi seen=";

/// How many calls the `compat` attack makes through each 32-bit entry.
pub const LINUX_COMPAT_CALLS: u64 = 50;
/// The call it makes: `getpid` in the i386 table.
pub const LINUX_COMPAT_NR: u64 = 20;

/// How many `getpid` calls the `flood` attack makes: nearly five rings' worth.
pub const LINUX_FLOOD_CALLS: u64 = 20_000;
/// The call it floods with (`getpid`, x86-64).
pub const LINUX_FLOOD_NR: u64 = 39;

impl LinuxAttack {
    /// Every Linux attack, in the order `ihmi test` runs them.
    pub const ALL: [LinuxAttack; 10] = [
        Self::Root,
        Self::KernelText,
        Self::GatePgd,
        Self::ProcessPgd,
        Self::Flood,
        Self::Compat,
        Self::Nmi,
        Self::Forge,
        Self::IoUring,
        Self::Identity,
    ];

    /// The name on the kernel command line (`ihmi.attack=<name>`).
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Root => "root",
            Self::KernelText => "kernel-text",
            Self::GatePgd => "gate-pgd",
            Self::ProcessPgd => "process-pgd",
            Self::Flood => "flood",
            Self::Compat => "compat",
            Self::Nmi => "nmi",
            Self::Forge => "forge",
            Self::IoUring => "io-uring",
            Self::Identity => "identity",
        }
    }

    /// The scenario's name.
    #[must_use]
    pub const fn scenario_name(self) -> &'static str {
        match self {
            Self::Root => "linux-attack",
            Self::KernelText => "linux-attack-kernel-text",
            Self::GatePgd => "linux-attack-gate-pgd",
            Self::ProcessPgd => "linux-attack-process-pgd",
            Self::Flood => "linux-attack-flood",
            Self::Compat => "linux-attack-compat",
            Self::Nmi => "linux-attack-nmi",
            Self::Forge => "linux-attack-forge",
            Self::IoUring => "linux-attack-io-uring",
            Self::Identity => "linux-attack-identity",
        }
    }

    /// What the scenario adds to the kernel command line.
    #[must_use]
    pub const fn kernel_arg(self) -> &'static str {
        match self {
            Self::Root => "ihmi.attack=root",
            Self::KernelText => "ihmi.attack=kernel-text",
            Self::GatePgd => "ihmi.attack=gate-pgd",
            Self::ProcessPgd => "ihmi.attack=process-pgd",
            Self::Flood => "ihmi.attack=flood",
            Self::Compat => "ihmi.attack=compat",
            Self::Nmi => "ihmi.attack=nmi",
            Self::Forge => "ihmi.attack=forge",
            Self::IoUring => "ihmi.attack=io-uring",
            Self::Identity => "ihmi.attack=identity",
        }
    }

    /// The attack named `name` on the command line.
    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == name)
    }
}

/// The attacks on the in-hypervisor monitor's watch over KVM (NESTED.md B.3), each by L1's
/// compromised root through /dev/mem, on the `l1` kernel (KVM built in), each a scenario
/// `ihmi-attack-<name>` with `ihmi.attack=kvm-<name>` on L1's command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum IhmiAttack {
    /// 12.5, a data-only hijack of KVM: rewrite one entry of KVM's exit-handler table
    /// (`kvm_vmx_exit_handlers`, writable kernel data), run the L1 VMM's probe under it, put the
    /// entry back. The monitor must report the entry at the next exit.
    ExitHandler = 0,
    /// 12.4 and 12.12: take the monitor's hook out of KVM's exit path by writing a 5-byte NOP over
    /// the call at the start of `vmx_handle_exit` (kernel text). L0's lock on L1's text must stop
    /// the write.
    KvmText = 1,
    /// 12.11, TOCTOU on VMCS12: while the L1 VMM's probe runs, overwrite every VMCS region of L1's
    /// (the pages that start with L0's VMCS revision identifier) but their first word. VMCS12 lives
    /// in L0's memory, so KVM's guest must run on as if nothing happened.
    Vmcs12Region = 2,
    /// 12.1, remap an L2 page onto L1 kernel memory: the compromised root's VMM gives its guest a
    /// page of memory that is a `/dev/mem` mapping of KVM's own text (the page of `vmx_handle_exit`),
    /// and the guest writes a NOP over the monitor's call there. The monitor must report the mapping
    /// when KVM makes it (`make_spte`), and L0's lock on L1's text must stop the write.
    L2Map = 3,
    /// 12.3 through KVM: the same VMM gives its guest a page of the monitor's (its last, which view 0
    /// never maps), and the guest writes there. The monitor must report the mapping (not RAM of L1's),
    /// and the guest's access must end at L0, in the monitor frame it named.
    L2MapMonitor = 4,
    /// 12.8, VMFUNC from L2: KVM's guest (the probe, with an IDT for #UD) executes VMFUNC leaf 0
    /// with EPTP index 1, the monitor's view in L1's EPTP list. VMCS02 never has VM functions, so
    /// the CPU raises #UD in L2 (KVM passes it back to its guest) and nothing switches.
    L2Vmfunc = 5,
    /// 12.6, rewrite VMCS12's host state: from ring 0 (the `forge` foothold: a page of its own made
    /// supervisor-executable and run as a sysctl handler), VMWRITE HOST_RIP of the VMCS KVM made
    /// current for its vCPU to the address of `_text`, as if to take the next exit of L2 there. L0's
    /// host-state check must refuse KVM's next entry (VMfailValid 8) with a `vmcs12-host-state`
    /// alert, and L1 must run on.
    HostState = 6,
    /// 12.10, a rogue L2: from ring 0 (the same foothold), while KVM runs its guest, VMCLEAR and
    /// VMPTRLD a VMCS region of the attacker's own (a page of its process with the revision
    /// identifier) and VMLAUNCH it, then make KVM's VMCS current again. L0 must refuse the
    /// VMLAUNCH (VMfailValid 7) with a `rogue-vmcs` alert naming the region, since no vCPU the
    /// monitor saw KVM create has it, and KVM's guest must run on untouched.
    RogueVmcs = 7,
    /// 12.12, starve the monitor: from ring 0 (the same foothold), run KVM's guest from code of the
    /// attacker's own, so that its exits never reach `vmx_handle_exit`. With interrupts off it makes
    /// the VMCS KVM left current exit before L2's first instruction (interrupt-window exiting, L2's
    /// IF set), gives it the host state L0 checks (its own stack, CR3 and FS base; HOST_RIP stays
    /// KVM's `vmx_vmexit`) and VMRESUMEs it again and again, a frame of `__vmx_vcpu_run`'s forged on
    /// its stack so that each exit returns to it; then it puts every field back. Every entry passes
    /// P3 and P6; L0's liveness check (P7) must say `monitor-starved`, and KVM's guest must run on.
    Starve = 8,
    /// 12.5's second half, a data-only hijack of `kvm_x86_ops`: rewrite its word that holds
    /// `vmx_handle_exit` (the vendor's exit handler) with the next word's value, run the probe under
    /// it, put it back. The struct is filled in at boot and never again; the monitor must report the
    /// word, against the copy L0 took when the boot was over, within one pass of its checks.
    KvmOps = 9,
}

impl IhmiAttack {
    /// Every attack, in the order `ihmi test` runs them.
    pub const ALL: [Self; 10] = [
        Self::ExitHandler,
        Self::KvmText,
        Self::Vmcs12Region,
        Self::L2Map,
        Self::L2MapMonitor,
        Self::L2Vmfunc,
        Self::HostState,
        Self::RogueVmcs,
        Self::Starve,
        Self::KvmOps,
    ];

    /// The name in the scenario's (`ihmi-attack-` and this).
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::ExitHandler => "exit-handler",
            Self::KvmText => "kvm-text",
            Self::Vmcs12Region => "vmcs12-region",
            Self::L2Map => "l2-map",
            Self::L2MapMonitor => "l2-map-monitor",
            Self::L2Vmfunc => "l2-vmfunc",
            Self::HostState => "host-state",
            Self::RogueVmcs => "rogue-vmcs",
            Self::Starve => "starve",
            Self::KvmOps => "kvm-ops",
        }
    }

    /// The scenario's name.
    #[must_use]
    pub const fn scenario_name(self) -> &'static str {
        match self {
            Self::ExitHandler => "ihmi-attack-exit-handler",
            Self::KvmText => "ihmi-attack-kvm-text",
            Self::Vmcs12Region => "ihmi-attack-vmcs12-region",
            Self::L2Map => "ihmi-attack-l2-map",
            Self::L2MapMonitor => "ihmi-attack-l2-map-monitor",
            Self::L2Vmfunc => "ihmi-attack-l2-vmfunc",
            Self::HostState => "ihmi-attack-host-state",
            Self::RogueVmcs => "ihmi-attack-rogue-vmcs",
            Self::Starve => "ihmi-attack-starve",
            Self::KvmOps => "ihmi-attack-kvm-ops",
        }
    }

    /// What L1's command line says for it (the attacker looks for this word).
    #[must_use]
    pub const fn kernel_arg(self) -> &'static str {
        match self {
            Self::ExitHandler => "ihmi.attack=kvm-exit-handler",
            Self::KvmText => "ihmi.attack=kvm-text",
            Self::Vmcs12Region => "ihmi.attack=kvm-vmcs12-region",
            Self::L2Map => "ihmi.attack=kvm-l2-map",
            Self::L2MapMonitor => "ihmi.attack=kvm-l2-map-monitor",
            Self::L2Vmfunc => "ihmi.attack=kvm-l2-vmfunc",
            Self::HostState => "ihmi.attack=kvm-host-state",
            Self::RogueVmcs => "ihmi.attack=kvm-rogue-vmcs",
            Self::Starve => "ihmi.attack=kvm-starve",
            Self::KvmOps => "ihmi.attack=kvm-ops",
        }
    }

    /// The attack a command-line word names.
    #[must_use]
    pub fn from_kernel_arg(word: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.kernel_arg() == word)
    }
}

/// How the `kvm-l2-map` attacker's line on the debug port starts before it starts its VMM; then the
/// physical address of the call its guest will overwrite, in hex.
pub const IHMI_L2_MAP_LINE: &str =
    "ihmi-attack: giving KVM's guest the page of vmx_handle_exit, to write at ";

/// The same for `kvm-l2-map-monitor`: then the physical address in the monitor's page its guest will
/// write at, in hex.
pub const IHMI_L2_MAP_MONITOR_LINE: &str =
    "ihmi-attack: giving KVM's guest the monitor's last page, to write at ";

/// How the L1 VMM's line reporting the `kvm-l2-vmfunc` guest's faults starts (after the L2 prefix the
/// VMM puts on what its guest sent): then the #UD exceptions the guest's handler reported, in
/// decimal.
pub const IHMI_L2_VMFUNC_REPORT: &str = "l2: ihmi-l2: VMFUNC raised #UD, times: ";

/// How the `kvm-host-state` attacker's line starts once its VMWRITE went through: then the value it
/// wrote into HOST_RIP, in hex.
pub const IHMI_HOST_STATE_LINE: &str = "ihmi-attack: VMWRITE of KVM's HOST_RIP from ring 0 took ";

/// How the `kvm-rogue-vmcs` attacker's line starts once it ran its VMLAUNCH: then, in hex, its
/// region's physical address, RFLAGS after the VMLAUNCH, the VM-instruction error VMREAD gave, and
/// RFLAGS after it made KVM's VMCS current again.
pub const IHMI_ROGUE_VMCS_LINE: &str = "ihmi-attack: VMLAUNCH of my own VMCS from ring 0: ";

/// How the `kvm-starve` attacker's line starts once it ran KVM's guest from its own code: then, in
/// hex, the VMCS (KVM's, from VMPTRST), the exits of L2 it took, the basic reason of the last one,
/// and the RFLAGS bits (CF, ZF) of the VMWRITEs that put KVM's fields back, OR-ed (0: all went
/// through).
pub const IHMI_STARVE_LINE: &str = "ihmi-attack: KVM's guest run from my own code, exits kept: ";

/// How the `kvm-ops` attacker's line starts once it rewrote the word: then, in hex, the word's index
/// in `kvm_x86_ops`, its address, its value before and the value written.
pub const IHMI_KVM_OPS_LINE: &str = "ihmi-attack: kvm_x86_ops word rewritten: ";

/// How many exits of L2 the `kvm-starve` attacker takes in its own code: two windows of L0's
/// liveness check (`ihmi_hv::nested::liveness::WINDOW`, 64), so that one whole window falls inside.
pub const IHMI_STARVE_EXITS: u64 = 160;

/// Where the `kvm-l2-map` attacker's VMM puts the page in its guest's physical memory (past the
/// probe's own 2 MiB).
pub const IHMI_L2_MAP_GPA: u64 = 0x20_0000;

/// How the `kvm-text` attacker's line on the debug port starts before it writes; then the physical
/// address of the call it overwrites, in hex.
pub const IHMI_KVM_TEXT_LINE: &str = "ihmi-attack: overwriting the call in vmx_handle_exit at ";

/// How the `vmcs12-region` attacker's line on the debug port starts once it has overwritten the
/// regions; then how many, in decimal.
pub const IHMI_VMCS12_REGION_LINE: &str = "ihmi-attack: VMCS regions overwritten: ";
/// The entry it rewrites: EXIT_REASON_VMCALL's, which the probe's L2 never makes, so KVM goes on
/// running it; and the entry whose value it writes there: EXIT_REASON_HLT's (existing kernel code:
/// the attack needs no code of its own in ring 0).
pub const IHMI_EXIT_HANDLER_INDEX: u64 = 18;
pub const IHMI_EXIT_HANDLER_SOURCE: u64 = 12;
/// How the attacker's line on the debug port starts once it has rewritten the entry; then the entry's
/// address, its value before and the value written, in hex.
pub const IHMI_EXIT_HANDLER_LINE: &str = "ihmi-attack: exit handler rewritten: ";
