//! The JSON lines L0 prints and the host reads back. One type per line, generic over the string type:
//! the writer uses [`Text`], the reader `String`. See README.md.

#![no_std]

#[cfg(test)]
extern crate std;

#[cfg(feature = "std")]
extern crate alloc;

use core::fmt;

use serde::{Deserialize, Serialize, Serializer};

/// The longest line [`Json`] prints: the largest `event|` line (a 64-byte file name and a 16-byte
/// process name, every byte escaped to six characters) takes well under half of it.
pub const LINE_MAX: usize = 4096;

/// A string on the writer's side.
#[derive(Clone, Copy)]
pub enum Text<'a> {
    Str(&'a str),
    /// Bytes a guest chose: each byte is written as the character of the same number, so every byte
    /// string is valid text and reads back unchanged (as U+0000..=U+00FF).
    Bytes(&'a [u8]),
    /// Whatever a `Display` value prints (a verdict's explanation built from parts).
    Display(&'a dyn fmt::Display),
    /// The bytes of little-endian words in hexadecimal, lowercase (a digest kept as words).
    HexWords(&'a [u64]),
}

impl fmt::Debug for Text<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", DisplayText(self))
    }
}

impl<'a> From<&'a str> for Text<'a> {
    fn from(s: &'a str) -> Self {
        Self::Str(s)
    }
}

/// A [`Text`]'s characters, for `collect_str`.
struct DisplayText<'t, 'a>(&'t Text<'a>);

impl fmt::Display for DisplayText<'_, '_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self.0 {
            Text::Str(s) => f.write_str(s),
            Text::Bytes(b) => b
                .iter()
                .try_for_each(|&b| fmt::Write::write_char(f, char::from(b))),
            Text::Display(d) => d.fmt(f),
            Text::HexWords(w) => w
                .iter()
                .flat_map(|w| w.to_le_bytes())
                .try_for_each(|b| write!(f, "{b:02x}")),
        }
    }
}

impl fmt::Debug for DisplayText<'_, '_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

impl Serialize for Text<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&DisplayText(self))
    }
}

/// A line's value as compact JSON, for `write!`. The value is encoded into a stack buffer first, so a
/// line is printed whole or, if it would not fit [`LINE_MAX`], as `{"error":"line-too-long"}`.
pub struct Json<'a, T: Serialize>(pub &'a T);

impl<T: Serialize> fmt::Debug for Json<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl<T: Serialize> fmt::Display for Json<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; LINE_MAX];
        match serde_json_core::to_slice(self.0, &mut buf) {
            Ok(n) => f.write_str(core::str::from_utf8(&buf[..n]).map_err(|_| fmt::Error)?),
            Err(_) => f.write_str(TOO_LONG),
        }
    }
}

/// What [`Json`] prints for a value that does not fit.
pub const TOO_LONG: &str = r#"{"error":"line-too-long"}"#;

/// The line an attack scenario ends with (`attack| {...}`), after L0's judge has seen the run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttackLine<S> {
    /// The attack's name (`ihmi_abi::Attack::name`).
    pub attack: S,
    /// Its item number in BRIEF.md §4.
    pub item: u64,
    pub blocked: bool,
    pub reported: bool,
    pub monitor_intact: bool,
    /// The defence and what happened: alerts, drops, refusals and how the guest ended.
    pub detail: S,
}

impl<S> AttackLine<S> {
    /// All three hold.
    pub const fn passed(&self) -> bool {
        self.blocked && self.reported && self.monitor_intact
    }
}

/// A benchmark window's first mark (`bench| {"start":...}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BenchStart<S> {
    pub start: S,
}

/// A benchmark window's result (`bench| {...}`), the counts L0 measured between the two marks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BenchWindow<S> {
    /// The benchmark (`ihmi_abi::Bench::name`).
    pub bench: S,
    /// How the monitor was reached (`ihmi_abi::monitor::Mode::name`).
    pub mode: S,
    /// Operations in the window.
    pub calls: u64,
    /// The guest's time-stamp-counter delta over the window (Bochs: instructions retired).
    pub tsc: u64,
    pub exits: u64,
    /// Monitor invocations the monitor counted.
    pub invocations: u64,
    pub vmfuncs_per_invocation: u64,
    pub cr3_loads_per_invocation: u64,
    pub vmcs_switches_per_invocation: u64,
}

/// The nested-VMX path's costs at the end of a run (`nested| {...}`): exits from L2, the reflected
/// ones, and the L0 exits their round trips took (the exit, L1's handling, its VMRESUME), by kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NestedLine {
    pub l2_exits: u64,
    pub reflected: u64,
    /// Reflected exits L1 resumed from (completed round trips).
    pub round_trips: u64,
    /// L0 exits in those round trips, and the most in one.
    pub round_trip_exits: u64,
    pub round_trip_max: u64,
    /// Of those, L1's VMREADs and VMWRITEs, and its other exits besides the VMRESUMEs.
    pub vmread_vmwrite: u64,
    pub other: u64,
    /// The round trips of reflected CPUID exits alone, their L0 exits, and the most in one.
    pub cpuid_round_trips: u64,
    pub cpuid_round_trip_exits: u64,
    pub cpuid_round_trip_max: u64,
    /// The same for reflected page faults (L2 touching a page its shadow-paging hypervisor had not
    /// mapped yet): how many, their L0 exits.
    #[serde(default)]
    pub page_fault_round_trips: u64,
    #[serde(default)]
    pub page_fault_round_trip_exits: u64,
    /// Whether L1's VMCS was shadowed.
    pub shadowing: bool,
    /// With a monitor (the in-hypervisor monitor in L1's KVM): its invocations (L1's system calls
    /// and program starts included), the KVM exits it served (its hook in `vmx_handle_exit`), and
    /// out of the box the monitor VM's own exits (one per invocation, the VMCALL that hands the
    /// verdict back), which the round trips above do not count.
    #[serde(default)]
    pub monitor_invocations: u64,
    #[serde(default)]
    pub kvm_exits_served: u64,
    #[serde(default)]
    pub monitor_vm_exits: u64,
    /// The monitor's own count of what its in-hypervisor hooks cost: the TSC ticks (instructions,
    /// under Bochs) it spent handling the KVM exits it served, the mappings it checked (its hook in
    /// `make_spte`) and the ticks spent on those; and in the box, the VMFUNCs and CR3 loads of one
    /// pass through its gate (0 out of the box, where the passes are the VMCALLs counted above).
    #[serde(default)]
    pub kvm_exit_ticks: u64,
    #[serde(default)]
    pub l2_maps_checked: u64,
    #[serde(default)]
    pub l2_map_ticks: u64,
    #[serde(default)]
    pub gate_vmfuncs: u64,
    #[serde(default)]
    pub gate_cr3_loads: u64,
}

/// Either `bench|` line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "std", derive(Deserialize))]
#[serde(untagged)]
pub enum BenchLine<S> {
    Start(BenchStart<S>),
    Window(BenchWindow<S>),
}

/// One monitor event (`event| {...}`), as L0 prints it while draining the monitor's ring. `seq` is the
/// monitor's sequence number, `tsc` and `mode` say when and how it was observed (not what happened).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "std", derive(Deserialize))]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum EventLine<S> {
    /// A system call the system-call monitor saw.
    Syscall {
        seq: u64,
        tsc: u64,
        mode: S,
        pid: u32,
        comm: S,
        /// Which way into the kernel it came (`syscall`, or the 32-bit `sysenter` and `int80`, whose
        /// numbers are the i386 table's).
        entry: S,
        nr: u64,
        /// The call's name in the guest's profile, `null` for a number it does not know.
        name: Option<S>,
        args: [u64; 3],
        /// The call makes memory executable (`mmap`, `mprotect`, `pkey_mprotect` with `PROT_EXEC`).
        #[serde(default, skip_serializing_if = "is_false")]
        exec_mapping: bool,
        verdict: S,
    },
    /// A process the process-creation monitor saw created.
    ProcessCreate {
        seq: u64,
        tsc: u64,
        mode: S,
        pid: u32,
        ppid: u32,
        comm: S,
        verdict: S,
    },
    /// A program start (execve) and the allow-list's verdict.
    Exec {
        seq: u64,
        tsc: u64,
        mode: S,
        pid: u32,
        ppid: u32,
        comm: S,
        filename: S,
        /// The file name was longer than the event holds.
        #[serde(default, skip_serializing_if = "is_false")]
        filename_truncated: bool,
        /// The SHA-256 of the file the kernel runs (for a script, its interpreter), in hexadecimal:
        /// what the allow-list judges. `null` when the monitor could not read it all.
        sha256: Option<S>,
        /// Why there is no digest.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        unhashed: Option<S>,
        verdict: S,
    },
    /// An operation a process submitted through an io_uring ring, as the kernel issues it.
    IoUring {
        seq: u64,
        tsc: u64,
        mode: S,
        pid: u32,
        comm: S,
        /// The operation's number (`IORING_OP_*`) and name, `null` for a number the profile does
        /// not know.
        opcode: u64,
        op: Option<S>,
        verdict: S,
    },
    /// KVM (watched by the in-hypervisor monitor) is about to handle an exit of its guest.
    KvmExit {
        seq: u64,
        tsc: u64,
        mode: S,
        /// The thread KVM runs in (the VMM's vCPU thread).
        pid: u32,
        comm: S,
        /// The `kvm_vcpu` (a kernel address) and the exit reason as KVM has it.
        vcpu: u64,
        reason: u64,
        /// The exit-handler table's entries the monitor checked on the way, and those that differ
        /// from the kernel image's (each reported once as an `integrity` event).
        handlers_checked: u64,
        handlers_changed: u64,
        verdict: S,
    },
    /// A property of the watched hypervisor that must hold does not: what was found, where.
    Integrity {
        seq: u64,
        tsc: u64,
        mode: S,
        property: S,
        index: u64,
        address: u64,
        expected: u64,
        found: u64,
        /// What the found value is, for a property that tells kinds apart (`l2_memory`: the frame is
        /// in the `kernel-image`, is `not-ram`, or the page is `outside-slot`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        what: Option<S>,
    },
    /// KVM (watched by the in-hypervisor monitor) commits a memslot change its VMM asked for.
    Memslot {
        seq: u64,
        tsc: u64,
        mode: S,
        pid: u32,
        comm: S,
        /// The VM (`struct kvm`), the change (`create`, `delete`, `move`, `flags`), and the slot as
        /// it is now: id, address space, first guest frame, frames, the VMM's address, flags.
        kvm: u64,
        change: S,
        slot: u64,
        as_id: u64,
        base_gfn: u64,
        npages: u64,
        hva: u64,
        flags: u64,
        verdict: S,
    },
    /// KVM (watched by the in-hypervisor monitor) destroys a vCPU (its VMCS leaves the monitor's
    /// registry).
    VcpuDestroy {
        seq: u64,
        tsc: u64,
        mode: S,
        pid: u32,
        comm: S,
        vcpu: u64,
        kvm: u64,
        vcpu_id: u64,
        vmcs: u64,
        verdict: S,
    },
    /// KVM (watched by the in-hypervisor monitor) creates a vCPU.
    VcpuCreate {
        seq: u64,
        tsc: u64,
        mode: S,
        pid: u32,
        comm: S,
        vcpu: u64,
        kvm: u64,
        vcpu_id: u64,
        /// The guest-physical address of the vCPU's VMCS region, which the monitor registered.
        vmcs: u64,
        verdict: S,
    },
    /// KVM (watched by the in-hypervisor monitor) is about to map a page of its guest.
    L2Map {
        seq: u64,
        tsc: u64,
        mode: S,
        /// The thread KVM runs in (the VMM's vCPU thread, or the VMM's own).
        pid: u32,
        comm: S,
        /// The `kvm_vcpu`; the guest frame and the frame of the watched kernel's memory it is mapped
        /// to; the VMM's address of the guest page; the mapping's level (1: 4 KiB, 2: 2 MiB).
        vcpu: u64,
        gfn: u64,
        pfn: u64,
        hva: u64,
        level: u64,
        /// What the frame is: `vm` (the VM's own memory) or what makes it wrong (each also an
        /// `integrity` event).
        memory: S,
        verdict: S,
    },
    /// A request the monitor's checkpoint refused.
    Rejected {
        seq: u64,
        tsc: u64,
        mode: S,
        reason: S,
        code: u64,
        args: [u64; 4],
        verdict: S,
    },
    /// A ring slot whose kind the writer does not know.
    Invalid {
        seq: u64,
        tsc: u64,
        mode: S,
        kind: u64,
    },
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
const fn is_false(b: &bool) -> bool {
    !*b
}

impl<S> EventLine<S> {
    /// The process the event is about (none for a refused request or an unknown kind).
    pub const fn pid(&self) -> Option<u32> {
        match self {
            Self::Syscall { pid, .. }
            | Self::ProcessCreate { pid, .. }
            | Self::Exec { pid, .. }
            | Self::IoUring { pid, .. }
            | Self::KvmExit { pid, .. }
            | Self::L2Map { pid, .. }
            | Self::Memslot { pid, .. }
            | Self::VcpuCreate { pid, .. }
            | Self::VcpuDestroy { pid, .. } => Some(*pid),
            Self::Rejected { .. } | Self::Integrity { .. } | Self::Invalid { .. } => None,
        }
    }

    /// The event's sequence number.
    pub const fn seq(&self) -> u64 {
        match self {
            Self::Syscall { seq, .. }
            | Self::ProcessCreate { seq, .. }
            | Self::Exec { seq, .. }
            | Self::IoUring { seq, .. }
            | Self::KvmExit { seq, .. }
            | Self::L2Map { seq, .. }
            | Self::Memslot { seq, .. }
            | Self::VcpuCreate { seq, .. }
            | Self::VcpuDestroy { seq, .. }
            | Self::Integrity { seq, .. }
            | Self::Rejected { seq, .. }
            | Self::Invalid { seq, .. } => *seq,
        }
    }
}

#[cfg(feature = "std")]
impl EventLine<alloc::string::String> {
    /// What the event says about the guest, with how, when and in which order it was observed
    /// (`tsc`, `mode`, `seq`) set aside, and with the arguments set aside too when `args_aside` (two
    /// monitors that read them at different points may disagree on them).
    #[must_use]
    pub fn observation(&self, args_aside: bool) -> Self {
        let mut e = self.clone();
        let clear = |seq: &mut u64, tsc: &mut u64, mode: &mut alloc::string::String| {
            (*seq, *tsc) = (0, 0);
            mode.clear();
        };
        match &mut e {
            Self::Syscall {
                seq,
                tsc,
                mode,
                args,
                ..
            } => {
                clear(seq, tsc, mode);
                if args_aside {
                    *args = [0; 3];
                }
            }
            Self::Rejected {
                seq,
                tsc,
                mode,
                args,
                ..
            } => {
                clear(seq, tsc, mode);
                if args_aside {
                    *args = [0; 4];
                }
            }
            Self::ProcessCreate { seq, tsc, mode, .. }
            | Self::Exec { seq, tsc, mode, .. }
            | Self::IoUring { seq, tsc, mode, .. }
            | Self::Integrity { seq, tsc, mode, .. }
            | Self::Invalid { seq, tsc, mode, .. } => clear(seq, tsc, mode),
            Self::KvmExit {
                seq,
                tsc,
                mode,
                vcpu,
                ..
            } => {
                clear(seq, tsc, mode);
                // Where KVM allocated the vCPU is the allocator's choice, as a user pointer is.
                if args_aside {
                    *vcpu = 0;
                }
            }
            Self::Memslot {
                seq,
                tsc,
                mode,
                kvm,
                hva,
                ..
            } => {
                clear(seq, tsc, mode);
                if args_aside {
                    (*kvm, *hva) = (0, 0);
                }
            }
            Self::VcpuCreate {
                seq,
                tsc,
                mode,
                vcpu,
                kvm,
                vmcs,
                ..
            }
            | Self::VcpuDestroy {
                seq,
                tsc,
                mode,
                vcpu,
                kvm,
                vmcs,
                ..
            } => {
                clear(seq, tsc, mode);
                if args_aside {
                    (*vcpu, *kvm, *vmcs) = (0, 0, 0);
                }
            }
            Self::L2Map {
                seq,
                tsc,
                mode,
                vcpu,
                pfn,
                hva,
                ..
            } => {
                clear(seq, tsc, mode);
                // The frames behind the guest's memory and the VMM's addresses of it are the
                // allocators' choice.
                if args_aside {
                    (*vcpu, *pfn, *hva) = (0, 0, 0);
                }
            }
        }
        e
    }
}

#[cfg(test)]
mod tests;
