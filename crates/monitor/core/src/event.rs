//! Events, the ring that carries them from the monitor to L0, and their JSON encoding.

use core::fmt;

use ihmi_abi::guest_os::COMM_LEN;
use ihmi_abi::monitor::{SyscallEntry, Verdict, PATH_LEN};
use ihmi_wire::{EventLine, Text};

use crate::os::OsProfile;

/// What an event records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum EventKind {
    /// A system call: `nr` and `args[..3]` are its number and first arguments; `detail` is the
    /// entry it came through (`SyscallEntry`), with [`SYSCALL_EXEC_MAPPING`] set for a call that
    /// maps memory executable.
    Syscall = 1,
    /// A process is being created: `pid`, `ppid` and `comm` describe the new process.
    ProcessCreate = 2,
    /// A request failed the invocation checkpoint: `detail` says why, `nr` and `args` are the raw
    /// request code and arguments.
    Rejected = 3,
    /// Linux: a process is about to run a new program (`execve`): `pid`, `ppid` and `comm` describe
    /// it as it is, `path` is the path it was given, `args` the SHA-256 of the file it runs (its four
    /// little-endian words in order). `detail` bit 0 is set when the path was longer than `path`
    /// holds; `detail >> EXEC_IDENTITY_SHIFT` is 0 with a digest, else the
    /// [`crate::IdentityError`] that left the program without one.
    Exec = 4,
    /// Linux: an operation submitted through an io_uring ring is being issued: `pid` and `comm` are
    /// the submitting process (or its io_uring worker thread), `nr` the operation (`IORING_OP_*`).
    IoUring = 5,
    /// Linux with KVM (the in-hypervisor monitor): KVM is about to handle an exit of its guest: `pid`
    /// and `comm` are the thread it runs in (the VMM's vCPU thread), `nr` the exit reason as KVM has
    /// it (basic reason in the low 16 bits), `args` = (the `kvm_vcpu`, exit-handler entries checked,
    /// entries that differ from the image, 0).
    KvmExit = 6,
    /// A property of the watched hypervisor that must hold does not: `detail` is the
    /// [`IntegrityProperty`], `nr` the index of what broke it (a table entry), `args` = (its address,
    /// the value it must have, the value found, 0); for [`IntegrityProperty::L2Memory`], `nr` is
    /// the guest frame and `args` = (the guest-physical address, the VMM's address of the guest's own
    /// memory there or 0, the frame found, the [`L2Memory`] class).
    Integrity = 7,
    /// Linux with KVM: KVM is about to map a page of its guest: `pid` and `comm` are the thread it
    /// runs in, `nr` the guest frame, `detail` the frame's [`L2Memory`] class, `args` = (the
    /// `kvm_vcpu`, the host frame, the VMM's address of the guest page, the mapping's level: 1 for
    /// 4 KiB, 2 for 2 MiB, 3 for 1 GiB).
    L2Map = 8,
    /// Linux with KVM: KVM commits a memslot change: `pid` and `comm` are the thread (the VMM's),
    /// `detail` the change (0 create, 1 delete, 2 move, 3 flags only), `nr` the slot's first guest
    /// frame, `args` = (the `kvm`, its frames, the VMM's address of them, id | as_id << 16 | flags
    /// << 32).
    Memslot = 9,
    /// Linux with KVM: KVM creates a vCPU: `nr` is its id, `args` = (the `kvm_vcpu`, its `kvm`, 0,
    /// 0).
    VcpuCreate = 10,
    VcpuDestroy = 11,
}

/// The name of a memslot change (`enum kvm_mr_change`).
#[must_use]
pub const fn memslot_change_name(change: u16) -> &'static str {
    match change {
        0 => "create",
        1 => "delete",
        2 => "move",
        3 => "flags",
        _ => "unknown",
    }
}

/// What the frame of a mapping KVM makes for its guest is (P4: only the VM's own memory is right).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum L2Memory {
    /// Guest RAM of the watched kernel outside its image, inside the memslot: the VM's own memory.
    Ok = 0,
    /// The frame (or a frame of a large mapping) is in the watched kernel's image.
    KernelImage = 1,
    /// A frame is not RAM the watched kernel has: a monitor or L0 frame, or memory it never had.
    NotRam = 2,
    /// The guest frame is outside the memslot KVM says it belongs to.
    OutsideSlot = 3,
}

impl L2Memory {
    /// Decodes a stored class.
    #[must_use]
    pub const fn from_raw(raw: u64) -> Option<Self> {
        Some(match raw {
            0 => Self::Ok,
            1 => Self::KernelImage,
            2 => Self::NotRam,
            3 => Self::OutsideSlot,
            _ => return None,
        })
    }

    /// The name in JSON.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Ok => "vm",
            Self::KernelImage => "kernel-image",
            Self::NotRam => "not-ram",
            Self::OutsideSlot => "outside-slot",
        }
    }
}

/// What an `integrity` event found broken (NESTED.md B.1.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum IntegrityProperty {
    /// P2: an entry of KVM's exit-handler table (`kvm_vmx_exit_handlers`) is not the image's value.
    KvmExitHandlers = 1,
    /// P4: KVM is mapping a page of its guest onto a frame that is not the VM's own memory.
    L2Memory = 2,
    /// P2: a word of KVM's `kvm_x86_ops` is not what it held when the boot was over.
    KvmX86Ops = 3,
}

impl IntegrityProperty {
    /// Decodes the stored property.
    #[must_use]
    pub const fn from_raw(raw: u16) -> Option<Self> {
        match raw {
            1 => Some(Self::KvmExitHandlers),
            2 => Some(Self::L2Memory),
            3 => Some(Self::KvmX86Ops),
            _ => None,
        }
    }

    /// The `"property"` value in JSON.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::KvmExitHandlers => "kvm_exit_handlers",
            Self::L2Memory => "l2_memory",
            Self::KvmX86Ops => "kvm_x86_ops",
        }
    }
}

impl EventKind {
    /// Decodes the stored kind.
    #[must_use]
    pub const fn from_raw(raw: u16) -> Option<Self> {
        Some(match raw {
            1 => Self::Syscall,
            2 => Self::ProcessCreate,
            3 => Self::Rejected,
            4 => Self::Exec,
            5 => Self::IoUring,
            6 => Self::KvmExit,
            7 => Self::Integrity,
            8 => Self::L2Map,
            9 => Self::Memslot,
            10 => Self::VcpuCreate,
            11 => Self::VcpuDestroy,
            _ => return None,
        })
    }

    /// The `"event"` value in JSON.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Syscall => "syscall",
            Self::ProcessCreate => "process_create",
            Self::Rejected => "rejected",
            Self::Exec => "exec",
            Self::IoUring => "io_uring",
            Self::KvmExit => "kvm_exit",
            Self::Integrity => "integrity",
            Self::L2Map => "l2_map",
            Self::Memslot => "memslot",
            Self::VcpuCreate => "vcpu_create",
            Self::VcpuDestroy => "vcpu_destroy",
        }
    }
}

/// In a system-call event's `detail`: the call makes memory executable at run time (`mmap`,
/// `mprotect` or `pkey_mprotect` with `PROT_EXEC`): code that no exec brought in, as a loader inside
/// an allowed program makes.
pub const SYSCALL_EXEC_MAPPING: u16 = 0x100;

/// Where an exec event's `detail` keeps why the program has no digest.
pub const EXEC_IDENTITY_SHIFT: u16 = 8;

/// A digest as an event's four argument words.
#[must_use]
pub fn digest_words(d: &crate::identity::Sha256Digest) -> [u64; 4] {
    let mut w = [0u64; 4];
    for (word, bytes) in w.iter_mut().zip(d.chunks_exact(8)) {
        let mut b = [0u8; 8];
        b.copy_from_slice(bytes);
        *word = u64::from_le_bytes(b);
    }
    w
}

/// Why the invocation checkpoint refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum RejectReason {
    /// The request code is not one the monitor serves.
    UnknownRequest = 1,
    /// An argument is out of range, misaligned, or contradicts the guest's own state.
    BadArgument = 2,
    /// A guest pointer did not translate to readable guest RAM.
    GuestMemory = 3,
    /// The monitor's own state failed its check (configuration or event ring).
    MonitorState = 4,
    /// A request that needs a running process came when the guest kernel has none.
    NoCurrentProcess = 5,
    /// The request came through an entry that does not make it (a Linux system-call request through
    /// the call gate, an exec request through anything but it): a forgery by code in the kernel.
    WrongEntry = 6,
    /// An exec request whose calling kernel stack does not show the process-creation hook's frame:
    /// made by kernel code other than the hooked function.
    NotFromHook = 7,
}

impl RejectReason {
    /// Decodes the stored reason.
    #[must_use]
    pub const fn from_raw(raw: u16) -> Option<Self> {
        Some(match raw {
            1 => Self::UnknownRequest,
            2 => Self::BadArgument,
            3 => Self::GuestMemory,
            4 => Self::MonitorState,
            5 => Self::NoCurrentProcess,
            6 => Self::WrongEntry,
            7 => Self::NotFromHook,
            _ => return None,
        })
    }

    /// The `"reason"` value in JSON.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::UnknownRequest => "unknown-request",
            Self::BadArgument => "bad-argument",
            Self::GuestMemory => "guest-memory",
            Self::MonitorState => "monitor-state",
            Self::NoCurrentProcess => "no-current-process",
            Self::WrongEntry => "wrong-entry",
            Self::NotFromHook => "not-from-hook",
        }
    }
}

/// One event, as stored in the ring. Plain integers only, so a reader in another address space (L0)
/// can copy it out and decode it defensively.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct Event {
    /// Position in the monitor's stream, counting dropped events too: a gap is a loss.
    pub seq: u64,
    /// The guest's time stamp counter when the monitor was entered.
    pub tsc: u64,
    /// [`EventKind`] as a number.
    pub kind: u16,
    /// [`RejectReason`] for rejected requests, 0 otherwise.
    pub detail: u16,
    /// The [`Verdict`] the monitor returned, as a number.
    pub verdict: i32,
    /// The process the event is about (for a creation: the new process).
    pub pid: u32,
    /// Its parent.
    pub ppid: u32,
    /// Its name, NUL-padded, exactly as the guest stores it.
    pub comm: [u8; COMM_LEN],
    /// The system-call number, or the raw request code of a rejected request.
    pub nr: u64,
    /// System-call arguments, or the raw arguments of a rejected request.
    pub args: [u64; 4],
    /// The program an `exec` event is about, NUL-padded.
    pub path: [u8; PATH_LEN],
}

const _: () = assert!(core::mem::size_of::<Event>() == 88 + PATH_LEN);

impl Default for Event {
    fn default() -> Self {
        Self::EMPTY
    }
}

impl Event {
    /// An all-zero event (kind 0: never valid).
    pub const EMPTY: Self = Self {
        seq: 0,
        tsc: 0,
        kind: 0,
        detail: 0,
        verdict: 0,
        pid: 0,
        ppid: 0,
        comm: [0; COMM_LEN],
        nr: 0,
        args: [0; 4],
        path: [0; PATH_LEN],
    };

    /// The decoded kind.
    #[must_use]
    pub const fn kind(&self) -> Option<EventKind> {
        EventKind::from_raw(self.kind)
    }

    /// A system-call event's entry (its `detail` without the flags).
    #[must_use]
    pub const fn syscall_entry(&self) -> Option<SyscallEntry> {
        SyscallEntry::from_raw(self.detail & 0xff)
    }

    /// Whether two events say the same thing about the guest: everything but the time stamp. The
    /// in-box and out-of-box monitors must agree on this for the same workload.
    #[must_use]
    pub fn same_observation(&self, other: &Self) -> bool {
        Self { tsc: 0, ..*self } == Self { tsc: 0, ..*other }
    }

    /// The event as its `event|` line (`ihmi_wire::EventLine`). `mode` names how the monitor was
    /// reached (`"inbox"`, `"outbox"`). Guest-supplied bytes (process and file names) are
    /// [`Text::Bytes`], which the encoder escapes, so no guest can end the line, close the object or
    /// add a field.
    #[must_use]
    pub fn line<'a>(&'a self, mode: &'a str, os: &'a OsProfile) -> EventLine<Text<'a>> {
        let (seq, tsc, mode) = (self.seq, self.tsc, Text::Str(mode));
        let verdict = Text::Str(match Verdict::from_raw(self.verdict as i64 as u64) {
            Some(Verdict::Allow) => "allow",
            Some(Verdict::Deny) => "deny",
            Some(Verdict::Rejected) => "rejected",
            None => "invalid",
        });
        let comm = Text::Bytes(comm_bytes(&self.comm));
        let Some(kind) = self.kind() else {
            return EventLine::Invalid {
                seq,
                tsc,
                mode,
                kind: u64::from(self.kind),
            };
        };
        match kind {
            EventKind::Syscall => {
                let entry = self.syscall_entry();
                let name = match entry {
                    Some(e) if e.is_compat() => os.compat_syscall_name(self.nr),
                    Some(_) => os.syscall_name(self.nr),
                    None => None,
                };
                EventLine::Syscall {
                    seq,
                    tsc,
                    mode,
                    pid: self.pid,
                    comm,
                    entry: Text::Str(entry.map_or("invalid", SyscallEntry::name)),
                    nr: self.nr,
                    name: name.map(Text::Str),
                    args: [self.args[0], self.args[1], self.args[2]],
                    exec_mapping: self.detail & SYSCALL_EXEC_MAPPING != 0,
                    verdict,
                }
            }
            EventKind::ProcessCreate => EventLine::ProcessCreate {
                seq,
                tsc,
                mode,
                pid: self.pid,
                ppid: self.ppid,
                comm,
                verdict,
            },
            EventKind::Exec => EventLine::Exec {
                seq,
                tsc,
                mode,
                pid: self.pid,
                ppid: self.ppid,
                comm,
                filename: Text::Bytes(nul_padded(&self.path)),
                filename_truncated: self.detail & 1 != 0,
                sha256: match self.detail >> EXEC_IDENTITY_SHIFT {
                    0 => Some(Text::HexWords(&self.args)),
                    _ => None,
                },
                unhashed: match self.detail >> EXEC_IDENTITY_SHIFT {
                    0 => None,
                    why => Some(Text::Str(
                        crate::IdentityError::from_raw(why).map_or("unknown", |e| e.name()),
                    )),
                },
                verdict,
            },
            EventKind::IoUring => EventLine::IoUring {
                seq,
                tsc,
                mode,
                pid: self.pid,
                comm,
                opcode: self.nr,
                op: os.io_uring_op_name(self.nr).map(Text::Str),
                verdict,
            },
            EventKind::KvmExit => EventLine::KvmExit {
                seq,
                tsc,
                mode,
                pid: self.pid,
                comm,
                vcpu: self.args[0],
                reason: self.nr,
                handlers_checked: self.args[1],
                handlers_changed: self.args[2],
                verdict,
            },
            EventKind::Integrity => EventLine::Integrity {
                seq,
                tsc,
                mode,
                property: Text::Str(
                    IntegrityProperty::from_raw(self.detail)
                        .map_or("unknown", IntegrityProperty::name),
                ),
                index: self.nr,
                address: self.args[0],
                expected: self.args[1],
                found: self.args[2],
                what: match IntegrityProperty::from_raw(self.detail) {
                    Some(IntegrityProperty::L2Memory) => Some(Text::Str(
                        L2Memory::from_raw(self.args[3]).map_or("unknown", L2Memory::name),
                    )),
                    _ => None,
                },
            },
            EventKind::Memslot => EventLine::Memslot {
                seq,
                tsc,
                mode,
                pid: self.pid,
                comm,
                kvm: self.args[0],
                change: Text::Str(memslot_change_name(self.detail)),
                slot: self.args[3] & 0xffff,
                as_id: (self.args[3] >> 16) & 0xffff,
                base_gfn: self.nr,
                npages: self.args[1],
                hva: self.args[2],
                flags: self.args[3] >> 32,
                verdict,
            },
            EventKind::VcpuDestroy => EventLine::VcpuDestroy {
                seq,
                tsc,
                mode,
                pid: self.pid,
                comm,
                vcpu: self.args[0],
                kvm: self.args[1],
                vcpu_id: self.nr,
                vmcs: self.args[2],
                verdict,
            },
            EventKind::VcpuCreate => EventLine::VcpuCreate {
                seq,
                tsc,
                mode,
                pid: self.pid,
                comm,
                vcpu: self.args[0],
                kvm: self.args[1],
                vcpu_id: self.nr,
                vmcs: self.args[2],
                verdict,
            },
            EventKind::L2Map => EventLine::L2Map {
                seq,
                tsc,
                mode,
                pid: self.pid,
                comm,
                vcpu: self.args[0],
                gfn: self.nr,
                pfn: self.args[1],
                hva: self.args[2],
                level: self.args[3],
                memory: Text::Str(
                    L2Memory::from_raw(u64::from(self.detail)).map_or("unknown", L2Memory::name),
                ),
                verdict,
            },
            EventKind::Rejected => EventLine::Rejected {
                seq,
                tsc,
                mode,
                reason: Text::Str(
                    RejectReason::from_raw(self.detail).map_or("unknown", RejectReason::name),
                ),
                code: self.nr,
                args: self.args,
                verdict,
            },
        }
    }
}

/// An [`Event`] as its JSON line, for `format_args!`.
#[derive(Debug)]
pub struct Json<'a> {
    event: &'a Event,
    mode: &'a str,
    os: &'a OsProfile,
}

impl fmt::Display for Json<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        ihmi_wire::Json(&self.event.line(self.mode, self.os)).fmt(f)
    }
}

impl Event {
    /// The event as a [`fmt::Display`] JSON line (see [`Event::line`]).
    #[must_use]
    pub const fn json<'a>(&'a self, mode: &'a str, os: &'a OsProfile) -> Json<'a> {
        Json {
            event: self,
            mode,
            os,
        }
    }
}

/// The name up to its first NUL.
#[must_use]
pub fn comm_bytes(comm: &[u8; COMM_LEN]) -> &[u8] {
    nul_padded(comm)
}

/// Bytes up to the first NUL (all of them without one).
#[must_use]
pub fn nul_padded(bytes: &[u8]) -> &[u8] {
    let len = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    &bytes[..len]
}

/// Slots in the ring.
pub const RING_LEN: usize = ihmi_abi::monitor::RING_LEN;

/// A single-producer (the monitor), single-consumer (L0) ring in monitor memory. The guest can neither
/// read nor write it; L0 reads it only while the guest is stopped, so no atomics are needed.
#[derive(Clone, Debug)]
#[repr(C)]
pub struct EventRing {
    /// Events produced, stored or not: the next sequence number.
    produced: u64,
    /// Events stored.
    written: u64,
    /// Events the consumer has taken.
    consumed: u64,
    /// Events lost to a full ring.
    dropped: u64,
    entries: [Event; RING_LEN],
}

impl Default for EventRing {
    fn default() -> Self {
        Self::new()
    }
}

impl EventRing {
    /// An empty ring.
    #[must_use]
    pub const fn new() -> Self {
        Self {
            produced: 0,
            written: 0,
            consumed: 0,
            dropped: 0,
            entries: [Event::EMPTY; RING_LEN],
        }
    }

    /// Whether the counters are consistent (the monitor's self-check before it acts).
    #[must_use]
    pub fn is_consistent(&self) -> bool {
        self.consumed <= self.written
            && self.written - self.consumed <= RING_LEN as u64
            && self.written.checked_add(self.dropped) == Some(self.produced)
    }

    /// Stores `event` with the next sequence number; a full ring counts a drop instead. Returns whether
    /// it was stored.
    pub fn push(&mut self, mut event: Event) -> bool {
        event.seq = self.produced;
        self.produced = self.produced.wrapping_add(1);
        if self.written.wrapping_sub(self.consumed) >= RING_LEN as u64 {
            self.dropped = self.dropped.wrapping_add(1);
            return false;
        }
        self.entries[(self.written % RING_LEN as u64) as usize] = event;
        self.written = self.written.wrapping_add(1);
        true
    }

    /// Hands every stored, unconsumed event to `f`, oldest first, and marks them consumed. Returns how
    /// many. Defensive against corrupt counters: it never reads more than one ring's worth.
    pub fn drain(&mut self, mut f: impl FnMut(&Event)) -> usize {
        let pending = self
            .written
            .wrapping_sub(self.consumed)
            .min(RING_LEN as u64);
        let first = self.written.wrapping_sub(pending);
        for i in 0..pending {
            f(&self.entries[(first.wrapping_add(i) % RING_LEN as u64) as usize]);
        }
        self.consumed = self.written;
        pending as usize
    }

    /// Events lost to a full ring so far.
    #[must_use]
    pub const fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Makes the counters inconsistent, as a stray write into monitor memory would.
    #[cfg(test)]
    pub(crate) fn corrupt_for_test(&mut self) {
        self.consumed = self.written.wrapping_add(1);
    }

    /// Events stored and not yet drained.
    #[must_use]
    pub const fn pending(&self) -> u64 {
        self.written.wrapping_sub(self.consumed)
    }

    /// Whether the ring is past its high-water mark and should be drained now.
    #[must_use]
    pub const fn wants_drain(&self) -> bool {
        self.pending() >= ihmi_abi::monitor::RING_HIGH_WATER as u64
    }

    /// Events produced so far (stored or dropped).
    #[must_use]
    pub const fn produced(&self) -> u64 {
        self.produced
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;

    fn ev(kind: EventKind, pid: u32) -> Event {
        Event {
            kind: kind as u16,
            pid,
            ..Event::EMPTY
        }
    }

    #[test]
    fn ring_keeps_order_and_counts_drops_with_visible_gaps() {
        let mut ring = EventRing::new();
        for pid in 0..RING_LEN as u32 + 3 {
            let stored = ring.push(ev(EventKind::Syscall, pid));
            assert_eq!(stored, (pid as usize) < RING_LEN);
        }
        assert_eq!(ring.dropped(), 3);
        assert_eq!(ring.produced(), RING_LEN as u64 + 3);
        assert!(ring.is_consistent());
        assert!(ring.wants_drain(), "a full ring wants draining");
        let mut seen = std::vec::Vec::new();
        assert_eq!(ring.drain(|e| seen.push((e.seq, e.pid))), RING_LEN);
        assert_eq!(seen.first(), Some(&(0, 0)));
        assert_eq!(
            seen.last(),
            Some(&(RING_LEN as u64 - 1, RING_LEN as u32 - 1))
        );
        // After the drain there is room again, and the next event's sequence shows the 3 lost ones.
        assert!(ring.push(ev(EventKind::Syscall, 99)));
        let mut next = None;
        ring.drain(|e| next = Some(e.seq));
        assert_eq!(next, Some(RING_LEN as u64 + 3));
        assert_eq!(ring.drain(|_| panic!("nothing left")), 0);
        assert_eq!(ring.pending(), 0);
        assert!(!ring.wants_drain());
    }

    #[test]
    fn the_high_water_mark_is_three_quarters_of_the_ring() {
        let mut ring = EventRing::new();
        for pid in 0..ihmi_abi::monitor::RING_HIGH_WATER as u32 - 1 {
            ring.push(ev(EventKind::Syscall, pid));
        }
        assert!(!ring.wants_drain());
        ring.push(ev(EventKind::Syscall, 0));
        assert!(ring.wants_drain());
        assert_eq!(ring.pending(), RING_LEN as u64 * 3 / 4);
    }

    #[test]
    fn drain_survives_corrupt_counters() {
        let mut ring = EventRing::new();
        ring.written = 3 * RING_LEN as u64;
        assert!(!ring.is_consistent());
        assert_eq!(ring.drain(|_| {}), RING_LEN);
    }

    #[test]
    fn json_escapes_guest_bytes_so_no_line_can_be_forged() {
        let mut e = ev(EventKind::ProcessCreate, 7);
        e.ppid = 1;
        e.comm[..10].copy_from_slice(b"a\"}\n{\"x\\\x01\xff");
        let os = OsProfile::testguest(ihmi_addr::Gva::new(0));
        let out = std::format!("{}", e.json("inbox", &os));
        assert!(!out.contains('\n'));
        assert_eq!(
            out,
            "{\"event\":\"process_create\",\"seq\":0,\"tsc\":0,\"mode\":\"inbox\",\"pid\":7,\"ppid\":1,\"comm\":\"a\\\"}\\n{\\\"x\\\\\\u0001\u{ff}\",\"verdict\":\"allow\"}"
        );
    }

    #[test]
    fn syscall_and_rejected_json() {
        let os = OsProfile::testguest(ihmi_addr::Gva::new(0));
        let mut e = ev(EventKind::Syscall, 1);
        e.comm[..4].copy_from_slice(b"init");
        e.nr = 39;
        e.args = [1, 2, 3, 4];
        e.seq = 5;
        e.tsc = 77;
        let mut out = std::format!("{}", e.json("outbox", &os));
        assert_eq!(
            out,
            r#"{"event":"syscall","seq":5,"tsc":77,"mode":"outbox","pid":1,"comm":"init","entry":"syscall","nr":39,"name":"getpid","args":[1,2,3],"verdict":"allow"}"#
        );
        let mut r = ev(EventKind::Rejected, 0);
        r.detail = RejectReason::UnknownRequest as u16;
        r.nr = 0xdead;
        r.verdict = -1;
        out = std::format!("{}", r.json("inbox", &os));
        assert_eq!(
            out,
            r#"{"event":"rejected","seq":0,"tsc":0,"mode":"inbox","reason":"unknown-request","code":57005,"args":[0,0,0,0],"verdict":"rejected"}"#
        );
    }

    #[test]
    fn same_observation_ignores_only_the_time_stamp() {
        let a = ev(EventKind::Syscall, 1);
        let b = Event { tsc: 5, ..a };
        assert!(a.same_observation(&b));
        assert!(!a.same_observation(&Event { pid: 2, ..b }));
    }
}
