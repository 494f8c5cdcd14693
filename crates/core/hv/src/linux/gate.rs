//! The Linux system-call gate: L0 puts it in front of the kernel's SYSCALL entry when the kernel
//! installs that entry, opens it at the first system call (installing the process-creation hook
//! then, see [`super::hooks`]), and audits the mappings it depends on afterwards.
//!
//! 1. At the kernel's WRMSR to IA32_LSTAR (`syscall_init`: after the kernel has built its top-level
//!    page table, before any process exists to copy it), [`LinuxGuard::install`] records the
//!    kernel's entry in the gate page, maps the gate's PML4 slot in `init_top_pgt` (and its
//!    page-table-isolation user half), and LSTAR gets the gate's entry instead.
//! 2. The gate page is readable but not executable in the guest view until the first system call,
//!    whose EPT violation is where L0 installs the hook and opens the gate
//!    ([`Hypervisor::open_linux_gate`]).
//! 3. Out of the box the same entry is a stub whose VMCALL L0 takes as a system call for the
//!    monitor VM ([`Hypervisor::outbox_linux_syscall`]).
//!
//! A step that fails leaves the guest in a state the monitors can stand behind: the kernel's own
//! entry (unmonitored, and said so) if the gate cannot go in; no hook (said so) if the hook cannot
//! be made safe; a stopped guest if the gate cannot be opened, since its system calls would fault.

use ihmi_abi::monitor::SyscallEntry;
use ihmi_addr::{Gpa, GpaRange, Gva, PAGE_SIZE};
use ihmi_ept::Perm;
use ihmi_vmcs::fields::guest;
use ihmi_vmcs::{EptViolationQualification, Instruction};

use super::hooks::{self, ArmedCall, ArmedHook, ExecHook, HookSite};
use crate::guard::views::GUEST_VIEW;
use crate::memory::PlatformReader;
use crate::platform::read_guest_u64;
use crate::{
    skip_instruction, Action, GuestEnd, Hypervisor, MonitorWord, Platform, PlatformError, Vcpu,
};

/// The longest a monitored Linux guest runs without L0 auditing the gate's mapping, in TSC ticks: the
/// VMX-preemption timer forces an exit after this long without one. A kernel that changes the gate's
/// slot in the PGD of a process is noticed if that process is running at an exit, which comes at the
/// latest this many ticks into its run (Bochs counts one tick per instruction: 16.8 million guest
/// instructions; 5.6 ms at a 3 GHz TSC).
pub const AUDIT_PERIOD_TSC: u64 = 1 << 24;

/// One way into the kernel's system-call handling, as the gate takes it over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GateEntry {
    /// What the entry point (IA32_LSTAR, IA32_SYSENTER_EIP, the IDT's vector 0x80) gets instead of
    /// the kernel's: the gate's entry for it, or out of the box the stub whose VMCALL L0 takes.
    pub gate: Gva,
    /// Where the gate page keeps the kernel's own entry, to jump on to.
    pub kernel_slot: MonitorWord,
    /// Out of the box: the stub's VMCALL, which L0 takes as a system call through this entry for the
    /// monitor VM, leaving every register alone.
    pub outbox_vmcall: Option<Gva>,
}

/// The IDT vector of `int $0x80`.
const INT80: u64 = 0x80;

/// How L0 puts the system-call gate in front of a Linux kernel's entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinuxGate {
    /// The gate's entries, in the order of [`SyscallEntry::ALL`].
    pub entries: [GateEntry; 3],
    /// The kernel's top-level page table (`init_top_pgt`), guest-physical.
    pub pgd: Gpa,
    /// The PML4 slot of the gate and the entry that maps it.
    pub slot: u64,
    pub pml4e: u64,
    /// Page-table isolation built in: the user half of the PGD pair gets the slot too.
    pub pti_pgd_pair: bool,
    /// The gate page, guest-physical: readable but not executable in the guest view until the first
    /// system call, when L0 installs the process-creation hook and opens it.
    pub gate_page: Gpa,
    /// The process-creation hook to install then, if the monitor has one.
    pub exec_hook: Option<ExecHook>,
    /// The io_uring hook, through the same slot, if the kernel has io_uring.
    pub io_uring_hook: Option<HookSite>,
    /// The in-hypervisor monitor's hook on KVM's L2-exit path (`vmx_handle_exit`), through the same
    /// slot, if the kernel has KVM built in.
    pub kvm_exit_hook: Option<HookSite>,
    /// Its hook on KVM's mapping path (`make_spte`), through the same slot, with the exit hook.
    pub l2_map_hook: Option<HookSite>,
    /// Its hooks on KVM's memslot commits (`kvm_arch_commit_memory_region`) and vCPU creation
    /// (`kvm_arch_vcpu_postcreate`), the same way.
    pub memslot_hook: Option<HookSite>,
    pub vcpu_create_hook: Option<HookSite>,
    /// And on vCPU destruction (`kvm_arch_vcpu_destroy`).
    pub vcpu_destroy_hook: Option<HookSite>,
    /// What of the booted kernel never changes again, guest-physical: L0 write-protects it in the
    /// guest view when the gate opens.
    pub kernel: KernelImage,
    /// Out of the box: the call stub's VMCALL, the only place the exec trampoline's `Monitor`
    /// hypercalls come from; one from anywhere else is passed on marked unverified.
    pub call_vmcall: Option<Gva>,
}

/// The parts of a booted Linux kernel that stay as they are until it stops, guest-physical: its text,
/// its read-only data (read-only after init included) and its interrupt descriptor table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelImage {
    pub text: GpaRange,
    pub rodata: GpaRange,
    pub idt: GpaRange,
}

/// What one write-protected range of a Linux guest is, for the alert a write to it raises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Locked {
    KernelText,
    KernelRodata,
    Idt,
    /// A page table on the translation path of the gate or of the process-creation trampoline.
    GatePath,
}

impl Locked {
    /// The name in alerts.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::KernelText => "kernel text",
            Self::KernelRodata => "kernel read-only data",
            Self::Idt => "interrupt descriptor table",
            Self::GatePath => "page table on the gate's path",
        }
    }
}

/// How many ranges L0 locks: text, read-only data, the IDT, and up to four page-table pages (the two
/// PGD halves, the trampoline's page-directory-pointer table and page directory).
const MAX_LOCKED: usize = 7;

impl LinuxGate {
    /// The gate's entry for `entry`.
    #[must_use]
    pub const fn entry(&self, entry: SyscallEntry) -> &GateEntry {
        &self.entries[entry as usize]
    }

    /// Where the gate's PML4 entry goes in the kernel half (0) or the user half (4096) of the PGD.
    fn slot_at(&self, half: u64) -> Option<Gpa> {
        self.pgd.checked_add(half)?.checked_add(self.slot * 8)
    }

    /// The PGD halves that get the slot: the kernel's, and with page-table isolation its user half.
    fn halves(&self) -> impl Iterator<Item = u64> {
        [Some(0), self.pti_pgd_pair.then_some(PAGE_SIZE)]
            .into_iter()
            .flatten()
    }
}

/// The gate's state in one guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinuxGuard {
    gate: LinuxGate,
    /// Whether the gate went in at the kernel's LSTAR write (its PML4 entries are then audited).
    installed: bool,
    /// Whether the first system call has opened the gate.
    open: bool,
    /// The process-creation hook, once installed.
    armed: Option<ArmedHook>,
    /// The io_uring hook's call, once installed.
    armed_io_uring: Option<ArmedCall>,
    /// The KVM exit hook's call, once installed.
    armed_kvm_exit: Option<ArmedCall>,
    /// The KVM mapping hook's call, once installed.
    armed_l2_map: Option<ArmedCall>,
    /// The KVM memslot and vCPU hooks' calls, once installed.
    armed_memslot: Option<ArmedCall>,
    armed_vcpu_create: Option<ArmedCall>,
    armed_vcpu_destroy: Option<ArmedCall>,
    /// What L0 write-protected when the gate opened.
    locked: [Option<(GpaRange, Locked)>; MAX_LOCKED],
    /// Whether the kernel runs with page-table isolation (its user halves in use), found when the
    /// gate opens.
    pti_in_use: bool,
    /// The IDTR base and limit the boot left, found when the gate opens.
    idtr: Option<(u64, u64)>,
}

impl LinuxGuard {
    pub(crate) const fn new(gate: LinuxGate) -> Self {
        Self {
            gate,
            installed: false,
            open: false,
            armed: None,
            armed_io_uring: None,
            armed_kvm_exit: None,
            armed_l2_map: None,
            armed_memslot: None,
            armed_vcpu_create: None,
            armed_vcpu_destroy: None,
            locked: [None; MAX_LOCKED],
            pti_in_use: false,
            idtr: None,
        }
    }

    /// The locked range `gpa` is in, if any.
    #[must_use]
    pub fn locked_at(&self, gpa: Gpa) -> Option<Locked> {
        self.locked
            .iter()
            .flatten()
            .find(|(r, _)| r.contains(gpa))
            .map(|(_, what)| *what)
    }

    /// Write-protects, in the guest view, what of the booted kernel never changes (text and read-only
    /// data read + execute, the IDT read-only) and the page tables on the translation path of
    /// the gate and of the trampoline (read-only: the kernel's own entries there carry the accessed
    /// bit already, so the CPU never needs to write them). Called when the gate opens: by then the
    /// kernel has applied its alternatives, static keys and ftrace NOPs and made its read-only data
    /// read-only, and runs /init.
    fn lock_kernel(&mut self, platform: &mut impl Platform) -> Result<(), PlatformError> {
        let gate = self.gate;
        let page = |at: Gpa| {
            GpaRange::new(
                at.align_down(PAGE_SIZE),
                at.align_down(PAGE_SIZE)
                    .checked_add(PAGE_SIZE)
                    .unwrap_or(at),
            )
        };
        let k = gate.kernel;
        let mut ranges: [Option<(GpaRange, Locked)>; MAX_LOCKED] = [None; MAX_LOCKED];
        ranges[0] = Some((k.text, Locked::KernelText));
        ranges[1] = Some((k.rodata, Locked::KernelRodata));
        ranges[2] = Some((k.idt, Locked::Idt));
        for (i, half) in gate.halves().enumerate() {
            ranges[3 + i] = gate.slot_at(half).map(|at| (page(at), Locked::GatePath));
        }
        if let Some(hook) = gate.exec_hook.filter(|_| self.armed.is_some()) {
            let tables = PlatformReader(platform);
            for (i, level) in [3u8, 2].into_iter().enumerate() {
                let at = ihmi_paging::entry_address(&tables, hook.pgd, hook.slot_va, level)
                    .map_err(|_| PlatformError::Fenced {
                        gpa: hook.pgd,
                        len: PAGE_SIZE,
                    })?;
                ranges[5 + i] = Some((page(at), Locked::GatePath));
            }
        }
        for (range, what) in ranges.iter().flatten() {
            // Read-only data stays executable: the vDSO that user processes run is in it.
            let perm = match what {
                Locked::KernelText | Locked::KernelRodata => Perm::RX,
                Locked::Idt | Locked::GatePath => Perm::READ,
            };
            platform.protect_guest(*range, perm)?;
        }
        self.locked = ranges;
        Ok(())
    }

    /// The configuration.
    #[must_use]
    pub const fn gate(&self) -> &LinuxGate {
        &self.gate
    }

    /// Whether the gate is open (the first system call went through it).
    #[must_use]
    pub const fn is_open(&self) -> bool {
        self.open
    }

    /// The process-creation hook, once installed.
    #[must_use]
    pub const fn armed_hook(&self) -> Option<&ArmedHook> {
        self.armed.as_ref()
    }

    /// The io_uring hook's call, once installed.
    #[must_use]
    pub const fn armed_io_uring(&self) -> Option<&ArmedCall> {
        self.armed_io_uring.as_ref()
    }

    /// The KVM exit hook's call, once installed.
    #[must_use]
    pub const fn armed_kvm_exit(&self) -> Option<&ArmedCall> {
        self.armed_kvm_exit.as_ref()
    }

    /// The KVM mapping hook's call, once installed.
    #[must_use]
    pub const fn armed_l2_map(&self) -> Option<&ArmedCall> {
        self.armed_l2_map.as_ref()
    }

    /// What the audit checks: the gate's PML4 entry in every half it went into, and the hook's
    /// page-directory entry.
    pub(crate) fn audited(&self) -> impl Iterator<Item = (Gpa, u64)> + '_ {
        let slots = self
            .gate
            .halves()
            .filter(|_| self.installed)
            .filter_map(|half| self.gate.slot_at(half))
            .map(|at| (at, self.gate.pml4e));
        slots.chain(self.armed.map(|a| a.audited()))
    }

    /// The gate's slot in the PGD of the address space the guest runs on (`cr3`), in every half it
    /// uses, once the gate is open. Every process's PGD copies the kernel's upper half, the gate's slot
    /// included, when it is made (`pgd_alloc`); a kernel that changes one process's copy hides that
    /// process's system calls, so the copy in use is audited at each exit.
    ///
    /// A kernel built with page-table isolation allocates every PGD as a pair but may run without it
    /// (a CPU that reports it is not vulnerable): then the user halves stay empty and no CR3 ever
    /// points at one, so they are audited only when isolation is on ([`Self::detect_pti`]).
    pub(crate) fn running_slots(&self, cr3: u64) -> impl Iterator<Item = (Gpa, u64)> + '_ {
        // Runs at every exit: no copy of the gate's description (Bochs prices a copy by the byte).
        let pgd = Gpa::new(ihmi_linux::profile::kernel_pgd(cr3, self.gate.pti_pgd_pair));
        let (slot, pml4e) = (self.gate.slot, self.gate.pml4e);
        let pti_in_use = self.pti_in_use;
        let halves = self
            .gate
            .halves()
            .filter(move |&half| half == 0 || pti_in_use)
            .filter(|_| self.open);
        halves.filter_map(move |half| {
            let at = pgd.checked_add(half)?.checked_add(slot * 8)?;
            Some((at, pml4e))
        })
    }

    /// Whether the kernel runs with page-table isolation: then it has filled the upper half of
    /// `init_top_pgt`'s user half (entry text, CPU entry area) by the time /init runs; without it
    /// that half holds only the gate's slot, which L0 wrote. Called when the gate opens.
    fn detect_pti(&mut self, platform: &mut impl Platform) -> Result<(), PlatformError> {
        self.pti_in_use = false;
        if !self.gate.pti_pgd_pair {
            return Ok(());
        }
        let user = self
            .gate
            .pgd
            .checked_add(PAGE_SIZE)
            .ok_or(PlatformError::Fenced {
                gpa: self.gate.pgd,
                len: 2 * PAGE_SIZE,
            })?;
        let mut half = [0u8; 2048];
        platform.read_guest(user.checked_add(2048).unwrap_or(user), &mut half)?;
        let slot = self.gate.slot;
        self.pti_in_use = half
            .chunks_exact(8)
            .enumerate()
            .any(|(i, e)| i as u64 + 256 != slot && e.iter().any(|&b| b != 0));
        Ok(())
    }

    /// What opening the gate takes once the hook is in (or left out): learn whether page-table
    /// isolation is on, put the gate in front of `int $0x80`, lock the kernel, and make the gate
    /// page (`gate_range`) executable. A failed step is named; the caller takes the hook out.
    fn open_steps(
        &mut self,
        platform: &mut impl Platform,
        gate_range: GpaRange,
    ) -> Result<(), (&'static str, PlatformError)> {
        let named = |what: &'static str| move |e| (what, e);
        self.detect_pti(platform)
            .map_err(named("read the kernel's page table"))?;
        self.install_int80(platform)
            .map_err(named("put the gate in front of int $0x80"))?;
        // Unlocked, the kernel's code and the gate's mapping could be changed unseen.
        self.lock_kernel(platform).map_err(named(
            "write-protect the kernel's code and the gate's page tables",
        ))?;
        let k = self.gate.kernel;
        platform.log(format_args!(
            "linux: kernel text {}..{}, read-only data {}..{} and IDT {} now read-only in the guest view",
            k.text.start, k.text.end, k.rodata.start, k.rodata.end, k.idt.start
        ));
        // If this fails the gate stays closed and every system call would fault here again: the
        // guest is stopped rather than left to loop.
        platform
            .protect_guest(gate_range, Perm::RX)
            .map_err(named("open the system-call gate"))
    }

    /// Puts the gate in front of the kernel's entry `kernel_entry`: the gate page learns where to
    /// jump on, the kernel's PGD halves map the gate's slot. Returns what IA32_LSTAR gets: the gate's
    /// entry, or the kernel's own when the gate could not go in (said on the console).
    pub(crate) fn install(&mut self, platform: &mut impl Platform, kernel_entry: u64) -> u64 {
        let gate = self.gate;
        // The slot must be free in the kernel's table (and its user half): a kernel laid out otherwise
        // keeps its own mapping and goes unmonitored, rather than losing memory to the gate.
        for half in [0, PAGE_SIZE] {
            let entry = gate.slot_at(half).map(|at| read_guest_u64(platform, at));
            let why = match entry {
                Some(Ok(0)) => continue,
                Some(Ok(_)) => "is in use",
                Some(Err(_)) | None => "cannot be read",
            };
            platform.log(format_args!(
                "linux: PML4 slot {} of the kernel's page table {why}; system calls are not monitored",
                gate.slot
            ));
            return kernel_entry;
        }
        if let Err(e) = self.map_gate(platform, kernel_entry) {
            // Without the mapping, SYSCALL through the gate would fault: leave the kernel's entry.
            platform.log(format_args!(
                "linux: could not install the system-call gate ({e}); system calls are not monitored"
            ));
            return kernel_entry;
        }
        self.installed = true;
        let entry = gate.entry(SyscallEntry::Syscall).gate;
        platform.log(format_args!(
            "linux: system calls now enter through the gate at {entry} (the kernel's entry {kernel_entry:#x})"
        ));
        entry.raw()
    }

    /// Puts the gate in front of the kernel's SYSENTER entry `kernel_entry` once the SYSCALL gate is
    /// in (its mapping serves both). Returns what IA32_SYSENTER_EIP gets.
    pub(crate) fn install_sysenter(
        &mut self,
        platform: &mut impl Platform,
        kernel_entry: u64,
    ) -> u64 {
        let entry = *self.gate.entry(SyscallEntry::Sysenter);
        if !self.installed {
            platform.log(format_args!(
                "linux: no system-call gate, so SYSENTER calls are not monitored"
            ));
            return kernel_entry;
        }
        if let Err(e) = platform.write_monitor(entry.kernel_slot, kernel_entry) {
            platform.log(format_args!(
                "linux: SYSENTER calls are not monitored ({e})"
            ));
            return kernel_entry;
        }
        platform.log(format_args!(
            "linux: SYSENTER now enters through the gate at {} (the kernel's entry {kernel_entry:#x})",
            entry.gate
        ));
        entry.gate.raw()
    }

    /// Puts the gate in front of the kernel's `int $0x80` handler, in the IDT at `idt` (L0 writes
    /// the descriptor's offset; the kernel's own handler goes into the gate page). A kernel without
    /// the vector (no IA32 emulation) keeps its IDT. Called when the gate opens, before the IDT is
    /// locked; `Err` only when the IDT could not be read or written.
    fn install_int80(&mut self, platform: &mut impl Platform) -> Result<(), PlatformError> {
        let entry = *self.gate.entry(SyscallEntry::Int80);
        let at =
            self.gate
                .kernel
                .idt
                .start
                .checked_add(INT80 * 16)
                .ok_or(PlatformError::Fenced {
                    gpa: self.gate.kernel.idt.start,
                    len: 16,
                })?;
        let mut d = [0u8; 16];
        platform.read_guest(at, &mut d)?;
        let Some(handler) = idt_gate_offset(&d) else {
            platform.log(format_args!(
                "linux: the IDT has no int $0x80 gate (no IA32 emulation): nothing to monitor there"
            ));
            return Ok(());
        };
        platform.write_monitor(entry.kernel_slot, handler)?;
        platform.write_guest(at, &with_idt_gate_offset(d, entry.gate.raw()))?;
        platform.log(format_args!(
            "linux: int $0x80 now enters through the gate at {} (the kernel's handler {handler:#x})",
            entry.gate
        ));
        Ok(())
    }

    /// The writes of [`Self::install`]; a failure takes back the PML4 entries already written.
    fn map_gate(
        &self,
        platform: &mut impl Platform,
        kernel_entry: u64,
    ) -> Result<(), PlatformError> {
        let gate = &self.gate;
        platform.write_monitor(gate.entry(SyscallEntry::Syscall).kernel_slot, kernel_entry)?;
        let mut written = [None; 2];
        for (i, half) in gate.halves().enumerate() {
            let at = gate.slot_at(half).ok_or(PlatformError::Fenced {
                gpa: gate.pgd,
                len: PAGE_SIZE + 8 * 512,
            })?;
            if let Err(e) = platform.write_guest(at, &gate.pml4e.to_le_bytes()) {
                for done in written.iter().flatten() {
                    let _ = platform.write_guest(*done, &[0; 8]);
                }
                return Err(e);
            }
            written[i] = Some(at);
        }
        Ok(())
    }
}

impl Hypervisor {
    /// Out of the box, the VMCALL of one of the Linux system-call stubs: a system call through that
    /// entry for the monitor VM (64-bit: RAX = number, RDI, RSI, RDX; 32-bit: EAX, EBX, ECX, EDX).
    /// Any other VMCALL is a hypercall. An attacker who jumps to a stub with chosen registers only
    /// reports a system call that did not happen, from the process the monitor reads itself.
    pub(crate) fn outbox_linux_syscall(
        &mut self,
        vcpu: &mut impl Vcpu,
        instruction: Instruction,
    ) -> Option<Action> {
        let gate = self.guard.as_ref()?.linux()?.gate();
        let rip = vcpu.read(guest::RIP);
        let entry = SyscallEntry::ALL.into_iter().find(|e| {
            gate.entry(*e)
                .outbox_vmcall
                .is_some_and(|at| at.raw() == rip)
        })?;
        let r = *vcpu.regs();
        skip_instruction(vcpu, instruction);
        let low = |v: u64| v & 0xffff_ffff;
        let args = if entry.is_compat() {
            [low(r.rax), low(r.rbx), low(r.rcx), low(r.rdx)]
        } else {
            [r.rax, r.rdi, r.rsi, r.rdx]
        };
        Some(Action::CallMonitor {
            code: entry.request() as u64,
            args,
            verdict_to_rax: false,
            entry: ihmi_abi::monitor::Entry::SyscallGate,
            caller_rsp: vcpu.read(guest::RSP),
        })
    }

    /// A Linux guest's first system call, which finds the gate not yet executable: installs the
    /// process-creation hook (when it can be made safe), opens the gate, and lets the SYSCALL run
    /// again. `None` for any other EPT violation.
    pub(crate) fn open_linux_gate(
        &mut self,
        vcpu: &mut impl Vcpu,
        platform: &mut impl Platform,
        gpa: Gpa,
        q: &EptViolationQualification,
    ) -> Option<Action> {
        let view = self.current_view(vcpu);
        let linux = self.guard.as_mut()?.linux_mut()?;
        let gate = linux.gate;
        let on_gate = gpa.align_down(PAGE_SIZE) == gate.gate_page;
        if linux.open || !linux.installed || !q.fetch() || !on_gate || view != Some(GUEST_VIEW) {
            return None;
        }
        let gate_range = GpaRange::new(gate.gate_page, gate.gate_page.checked_add(PAGE_SIZE)?);
        let rip = vcpu.read(guest::RIP);
        linux.armed = match gate.exec_hook.as_ref() {
            Some(hook) => match arm_hook(platform, hook, rip) {
                Ok(armed) => armed,
                Err(error) => {
                    return Some(Action::End(GuestEnd::GuardFailed {
                        what: "take out the process-creation hook it could not write-protect",
                        error,
                    }))
                }
            },
            None => None,
        };
        // The io_uring and KVM hooks go through the slot the process-creation hook mapped.
        let sites = [
            (gate.io_uring_hook, "io_uring"),
            (gate.kvm_exit_hook, "KVM's exit path"),
            (gate.l2_map_hook, "KVM's mapping path"),
            (gate.memslot_hook, "KVM's memslot commits"),
            (gate.vcpu_create_hook, "KVM's vCPU creation"),
            (gate.vcpu_destroy_hook, "KVM's vCPU destruction"),
        ];
        let mut armed_sites = [None; 6];
        for (i, (site, what)) in sites.into_iter().enumerate() {
            armed_sites[i] = match (linux.armed, site) {
                (Some(_), Some(site)) => match arm_site(platform, &site, what) {
                    Ok(armed) => armed,
                    Err(error) => {
                        for armed in armed_sites.iter().flatten() {
                            let _ = hooks::remove_site(platform, armed);
                        }
                        return Some(Action::End(GuestEnd::GuardFailed {
                            what: "take out a hook it could not write-protect",
                            error,
                        }));
                    }
                },
                _ => None,
            };
        }
        [
            linux.armed_io_uring,
            linux.armed_kvm_exit,
            linux.armed_l2_map,
            linux.armed_memslot,
            linux.armed_vcpu_create,
            linux.armed_vcpu_destroy,
        ] = armed_sites;
        if let Err((what, error)) = linux.open_steps(platform, gate_range) {
            // Whatever step failed, the hooks would call a gate that is not safely open: take them
            // out.
            for armed in [
                linux.armed_io_uring.take(),
                linux.armed_kvm_exit.take(),
                linux.armed_l2_map.take(),
                linux.armed_memslot.take(),
                linux.armed_vcpu_create.take(),
                linux.armed_vcpu_destroy.take(),
            ]
            .iter()
            .flatten()
            {
                let _ = hooks::remove_site(platform, armed);
            }
            if let Some(armed) = linux.armed.take() {
                let _ = hooks::remove(platform, &armed);
            }
            return Some(Action::End(GuestEnd::GuardFailed { what, error }));
        }
        linux.open = true;
        linux.idtr = Some((vcpu.read(guest::IDTR_BASE), vcpu.read(guest::IDTR_LIMIT)));
        self.pin_control_registers(vcpu, platform);
        Some(Action::Resume)
    }

    /// L1's dispatch through its IDT (P5, in part): once the boot is over (the gate open), the IDTR
    /// base stays where the boot left it. A kernel that has loaded another table (an LIDT from code
    /// of an attacker's, which does not exit) is found at its next exit, which the audit period's
    /// timer bounds: said as an `idt-moved` alert and its IDTR put back, base and limit. Checked in
    /// the guest's own view only; the limit alone is not held (every VM exit L0 emulates for L1 sets
    /// it to 0xFFFF, SDM 28.5.2, and a larger limit adds no vector).
    pub(crate) fn audit_idtr(
        &mut self,
        vcpu: &mut impl Vcpu,
        platform: &mut impl Platform,
        obs: &mut impl crate::Observer,
    ) {
        let Some(guard) = self.guard.as_ref() else {
            return;
        };
        let in_guest_view =
            guard.views.monitor.is_none() || self.current_view(vcpu) == Some(GUEST_VIEW);
        let Some((base, limit)) = guard.linux().and_then(|l| l.idtr) else {
            return;
        };
        let found = vcpu.read(guest::IDTR_BASE);
        if !in_guest_view || found == base {
            return;
        }
        let rip = vcpu.read(guest::RIP);
        vcpu.write(guest::IDTR_BASE, base);
        vcpu.write(guest::IDTR_LIMIT, limit);
        self.alert(
            platform,
            obs,
            crate::Alert::IdtMoved {
                found,
                expected: base,
                rip,
            },
        );
    }
}

/// Installs the process-creation hook and write-protects the page that holds its call. A hook that
/// cannot go in is left out, and one whose page cannot be protected is taken out again (the guest
/// could rewrite it unseen); the console says so and the guest runs without process-creation
/// monitoring. `Err` only when such a hook could not be taken out either.
fn arm_hook(
    platform: &mut impl Platform,
    hook: &ExecHook,
    rip: u64,
) -> Result<Option<ArmedHook>, PlatformError> {
    let armed = match hooks::install(platform, hook) {
        Ok(a) => a,
        Err(e) => {
            platform.log(format_args!(
                "linux: process creation is not monitored: {e}"
            ));
            return Ok(None);
        }
    };
    if !protect_call(platform, &armed.call, "process creation", |p| {
        hooks::remove(p, &armed)
    })? {
        return Ok(None);
    }
    platform.log(format_args!(
        "linux: first system call (rip {rip:#x}): begin_new_exec at {} now calls the process-creation trampoline at {}",
        hook.site, hook.trampoline
    ));
    Ok(Some(armed))
}

/// Makes the page of a hook's call read + execute only in the guest view; if it cannot, takes the
/// hook out again (`remove`: the guest could rewrite the call unseen) and says that `what` is not
/// monitored. `Ok(false)` then; `Err` only when the hook could not be taken out either.
fn protect_call<P: Platform>(
    platform: &mut P,
    call: &ArmedCall,
    what: &str,
    remove: impl FnOnce(&mut P) -> Result<(), PlatformError>,
) -> Result<bool, PlatformError> {
    let Err(e) = platform.protect_guest(call.call_page(), Perm::RX) else {
        return Ok(true);
    };
    remove(platform)?;
    platform.log(format_args!(
        "linux: {what} is not monitored: the page of the hook's call cannot be write-protected ({e})"
    ));
    Ok(false)
}

/// Installs the io_uring hook and write-protects the page of its call, as [`arm_hook`] does: one
/// that cannot go in or be protected is left out, with a line on the console.
fn arm_site(
    platform: &mut impl Platform,
    site: &HookSite,
    what: &str,
) -> Result<Option<ArmedCall>, PlatformError> {
    let armed = match hooks::install_site(platform, site) {
        Ok(a) => a,
        Err(e) => {
            platform.log(format_args!("linux: {what} is not monitored: {e}"));
            return Ok(None);
        }
    };
    if !protect_call(platform, &armed, what, |p| hooks::remove_site(p, &armed))? {
        return Ok(None);
    }
    platform.log(format_args!(
        "linux: the function at {} now calls the trampoline for {what} at {}",
        site.site, site.trampoline
    ));
    Ok(Some(armed))
}

/// The handler offset of a present 64-bit interrupt or trap gate descriptor (SDM 6.14.1), `None` for
/// anything else.
fn idt_gate_offset(d: &[u8; 16]) -> Option<u64> {
    let kind = d[5] & 0x0f;
    let present = d[5] & 0x80 != 0;
    if !present || !(kind == 0xe || kind == 0xf) {
        return None;
    }
    let lo = u64::from(u16::from_le_bytes([d[0], d[1]]));
    let mid = u64::from(u16::from_le_bytes([d[6], d[7]]));
    let hi = u64::from(u32::from_le_bytes([d[8], d[9], d[10], d[11]]));
    Some(lo | mid << 16 | hi << 32)
}

/// The descriptor with its handler offset replaced, everything else (selector, IST, type, DPL) kept.
fn with_idt_gate_offset(mut d: [u8; 16], offset: u64) -> [u8; 16] {
    d[0..2].copy_from_slice(&(offset as u16).to_le_bytes());
    d[6..8].copy_from_slice(&((offset >> 16) as u16).to_le_bytes());
    d[8..12].copy_from_slice(&((offset >> 32) as u32).to_le_bytes());
    d
}
