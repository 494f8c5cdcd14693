#![doc = include_str!("../README.md")]
#![no_std]
#![deny(unsafe_code)]

pub mod event;
pub mod identity;
pub mod introspect;
pub mod os;
pub mod policy;

pub use ihmi_abi::monitor::Entry;
use ihmi_abi::monitor::{
    RequestCode, SyscallEntry, Verdict, KVM_EXIT_HANDLERS_MAX, KVM_X86_OPS_MAX, PATH_LEN, PATH_MAX,
};
use ihmi_addr::Gva;
use ihmi_paging::{Cr3, GuestPhysRead};

pub use event::{Event, EventKind, EventRing, IntegrityProperty, L2Memory, RejectReason};
pub use identity::{DigestCache, FileLayout, IdentityError};
pub use introspect::{
    IntrospectError, Introspector, LinearHints, LinearWindow, LinearWindows, RamGranules,
    TranslationCache,
};
pub use os::{IoUringHook, KvmHook, KvmMapHook, KvmOps, KvmVmHooks, OsProfile, ProcessInfo};
pub use policy::Policy;

/// Words of `kvm_x86_ops` the monitor checks at each KVM exit.
pub const KVM_X86_OPS_CHUNK: usize = 16;

/// What the caller of the entry point knows that the guest cannot forge: the guest's CR3 at the call
/// (saved by the gate, or read from the VMCS by L0) and the time stamp.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallContext {
    /// The guest's CR3 when it called.
    pub cr3: Cr3,
    /// Time stamp counter at entry.
    pub tsc: u64,
    /// The guest kernel's per-CPU base when it called (its GS base), for kernels that keep the
    /// running task per CPU.
    pub percpu_base: u64,
    /// Which way the request came in (recorded by the gate's code or by L0, never by the guest).
    pub entry: Entry,
    /// Through the call gate: the caller's stack pointer as the gate found it after saving RFLAGS (out
    /// of the box, after the call stub's push), so the return into the caller is 8 bytes above it.
    pub caller_rsp: u64,
}

/// Counts the monitor keeps about its own invocations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Every call of [`Monitor::handle`].
    pub invocations: u64,
    /// Calls the checkpoint refused.
    pub rejected: u64,
    /// Process creations (and, on Linux, program executions) the policy refused.
    pub denied: u64,
}

/// The monitor: an OS profile, a policy, its counts, and (for Linux) its kernel-page translations and
/// the kernel's linear mappings it confirmed.
#[derive(Clone, Debug)]
pub struct Monitor {
    state: State,
    tlb: core::cell::RefCell<TranslationCache>,
    linear: LinearWindows,
}

/// What the handlers change, apart from the translation cache they read through.
#[derive(Clone, Debug)]
struct State {
    os: OsProfile,
    policy: Policy,
    stats: Stats,
    /// The caller's per-CPU base, for this invocation.
    percpu_base: u64,
    /// Linux: the digests of the programs hashed last.
    digests: DigestCache,
    /// Linux with KVM: each exit-handler entry's value as last reported (the image's until a change
    /// is found), so a changed entry is reported once per new value, not at every exit.
    kvm_reported: [u64; KVM_EXIT_HANDLERS_MAX],
    /// The same for the words of `kvm_x86_ops`, and the next word to check (the struct is checked a
    /// chunk at each exit).
    kvm_ops_reported: [u64; KVM_X86_OPS_MAX],
    kvm_ops_next: usize,
    /// Linux with KVM: the vCPU created in this invocation and its VMCS region's guest-physical
    /// address, for the image's VMCS registry (L0's rogue-VMCS check, P6).
    created_vcpu: Option<[u64; 2]>,
}

impl Monitor {
    /// A monitor for the kernel `os` describes.
    #[must_use]
    pub const fn new(os: OsProfile, policy: Policy) -> Self {
        Self {
            state: State {
                os,
                policy,
                stats: Stats {
                    invocations: 0,
                    rejected: 0,
                    denied: 0,
                },
                percpu_base: 0,
                digests: DigestCache::new(),
                kvm_reported: match os.kvm {
                    Some(k) => k.expected,
                    None => [0; KVM_EXIT_HANDLERS_MAX],
                },
                kvm_ops_reported: match os.kvm {
                    Some(KvmHook { ops: Some(o), .. }) => o.expected,
                    _ => [0; KVM_X86_OPS_MAX],
                },
                kvm_ops_next: 0,
                created_vcpu: None,
            },
            tlb: core::cell::RefCell::new(TranslationCache::new()),
            linear: LinearWindows::NONE,
        }
    }

    /// Programs hashed so far, and exec identities answered from the digest cache.
    #[must_use]
    pub const fn identity_stats(&self) -> (u64, u64) {
        (self.state.digests.hashed, self.state.digests.hits)
    }

    /// The kernel-page translation cache's hits and misses so far.
    #[must_use]
    pub fn translation_stats(&self) -> (u64, u64) {
        self.tlb.borrow().stats()
    }

    /// The kernel's linear mappings the monitor reads without a walk (none until its first Linux
    /// invocation with [`OsProfile::linear`] checks them).
    #[must_use]
    pub const fn linear_windows(&self) -> &LinearWindows {
        &self.linear
    }

    /// The OS profile (for encoding events).
    #[must_use]
    pub const fn os(&self) -> &OsProfile {
        &self.state.os
    }

    /// The monitor's counts.
    #[must_use]
    pub const fn stats(&self) -> &Stats {
        &self.state.stats
    }

    /// The vCPU the last invocation saw KVM create, as `[its address, its VMCS region's
    /// guest-physical address]`, once: what the image registers for L0 (NESTED.md B.1.3 P6).
    pub fn take_created_vcpu(&mut self) -> Option<[u64; 2]> {
        self.state.created_vcpu.take()
    }

    /// The single entry point and its invocation checkpoint. `code` and `args` come from the guest and
    /// may be anything (a jump into the middle of a gate with forged registers ends here too): each is
    /// checked before the monitor acts, and a request that fails is answered [`Verdict::Rejected`] and
    /// recorded as a `rejected` event. Inlined into the image's entry point, its only caller there:
    /// a call would copy the request and the event through the stack, which Bochs prices by the byte.
    #[inline(always)]
    pub fn handle(
        &mut self,
        code: u64,
        args: [u64; 4],
        ctx: &CallContext,
        mem: &impl GuestPhysRead,
        ring: &mut EventRing,
    ) -> Verdict {
        let Self {
            state: st,
            tlb,
            linear,
        } = self;
        st.stats.invocations = st.stats.invocations.wrapping_add(1);
        st.percpu_base = ctx.percpu_base;
        if !ring.is_consistent() {
            // The ring cannot take an event; the refusal still counts.
            st.stats.rejected = st.stats.rejected.wrapping_add(1);
            return Verdict::Rejected;
        }
        let kernel_cr3 = Cr3::new(st.os.kernel_cr3(ctx.cr3.raw()));
        // Linux's upper half is one mapping in every address space: its translations are kept.
        let intro = if st.os.family == os::OsFamily::Linux {
            if let (Some(hints), false) = (st.os.linear, linear.checked) {
                // Once, through the guest's own tables: the windows they confirm are read linearly.
                *linear =
                    LinearWindows::check(&Introspector::with_cache(mem, kernel_cr3, tlb), &hints);
            }
            Introspector::with_cache(mem, kernel_cr3, tlb).with_linear(linear)
        } else {
            Introspector::new(mem, kernel_cr3)
        };
        let request = RequestCode::from_raw(code);
        let outcome = match request {
            None => Err(RejectReason::UnknownRequest),
            // On Linux each entry makes its own requests only: anything else is kernel code calling in.
            Some(r) if st.os.family == os::OsFamily::Linux && !linux_entry_makes(ctx.entry, r) => {
                Err(RejectReason::WrongEntry)
            }
            Some(RequestCode::Null) => {
                if args == [0; 4] {
                    Ok(None)
                } else {
                    Err(RejectReason::BadArgument)
                }
            }
            // One call site for the three entries, so the event is built once where it is pushed.
            Some(
                code @ (RequestCode::Syscall
                | RequestCode::SyscallInt80
                | RequestCode::SyscallSysenter),
            ) => {
                let entry = match code {
                    RequestCode::SyscallInt80 => SyscallEntry::Int80,
                    RequestCode::SyscallSysenter => SyscallEntry::Sysenter,
                    _ => SyscallEntry::Syscall,
                };
                st.on_syscall(&intro, args, entry).map(Some)
            }
            Some(RequestCode::ProcessCreate) => st.on_process_create(&intro, args).map(Some),
            Some(RequestCode::Exec) => st.on_exec(&intro, args, ctx).map(Some),
            Some(RequestCode::IoUring) => st.on_io_uring(&intro, args, ctx).map(Some),
            Some(RequestCode::KvmExit) => st.on_kvm_exit(&intro, args, ctx, ring).map(Some),
            Some(RequestCode::L2Map) => st.on_l2_map(&intro, args, ctx, ring).map(Some),
            Some(RequestCode::Memslot) => st.on_memslot(&intro, args, ctx).map(Some),
            Some(RequestCode::VcpuCreate) => st.on_vcpu_create(&intro, args, ctx).map(Some),
            Some(RequestCode::VcpuDestroy) => st.on_vcpu_destroy(&intro, args, ctx).map(Some),
        };
        match outcome {
            Ok(None) => Verdict::Allow,
            Ok(Some(mut event)) => {
                event.tsc = ctx.tsc;
                ring.push(event);
                Verdict::from_raw(event.verdict as i64 as u64).unwrap_or(Verdict::Rejected)
            }
            Err(reason) => {
                st.stats.rejected = st.stats.rejected.wrapping_add(1);
                ring.push(Event {
                    tsc: ctx.tsc,
                    kind: EventKind::Rejected as u16,
                    detail: reason as u16,
                    verdict: Verdict::Rejected as i32,
                    nr: code,
                    args,
                    ..Event::EMPTY
                });
                Verdict::Rejected
            }
        }
    }
}

/// Whether, on Linux, requests `r` may come through `entry`: system calls through the system-call
/// gates, exec requests through the call gate (the process-creation trampoline's).
const fn linux_entry_makes(entry: Entry, r: RequestCode) -> bool {
    match entry {
        Entry::SyscallGate => matches!(
            r,
            RequestCode::Syscall | RequestCode::SyscallInt80 | RequestCode::SyscallSysenter
        ),
        Entry::CallGate => matches!(
            r,
            RequestCode::Exec
                | RequestCode::IoUring
                | RequestCode::KvmExit
                | RequestCode::L2Map
                | RequestCode::Memslot
                | RequestCode::VcpuCreate
                | RequestCode::VcpuDestroy
        ),
        Entry::Unverified => false,
    }
}

/// Whether Linux system call `nr` through `entry`, with `prot` its third argument, maps memory
/// executable: `mmap` (`mmap2` in the i386 table), `mprotect` or `pkey_mprotect` with `PROT_EXEC`.
const fn makes_executable(entry: SyscallEntry, nr: u64, prot: u64) -> bool {
    const PROT_EXEC: u64 = 4;
    let maps = if entry.is_compat() {
        matches!(nr, 192 | 125 | 380)
    } else {
        matches!(nr, 9 | 10 | 329)
    };
    maps && prot & PROT_EXEC != 0
}

/// Where kernel addresses start (the upper half).
const KERNEL_HALF: u64 = 0xffff_8000_0000_0000;

/// Where a hooked call's frame words sit above the caller's stack pointer at the gate: RFLAGS (or the call
/// stub's RBX), the return into the trampoline, its pushes (R11 lowest, then R10, R9, R8, RDI, RSI,
/// RDX, RCX, RAX), the return into the hooked function.
const HOOK_FRAME_RETURN: u64 = 8;
const HOOK_FRAME_ARG: u64 = 16 + 4 * 8;
const HOOK_FRAME_SITE_RETURN: u64 = 16 + 9 * 8;
/// The trampoline's saved R9, R8, RSI, RDX and RCX in the same frame.
const HOOK_FRAME_R9: u64 = 16 + 2 * 8;
const HOOK_FRAME_R8: u64 = 16 + 3 * 8;
const HOOK_FRAME_RSI: u64 = 16 + 5 * 8;
const HOOK_FRAME_RDX: u64 = 16 + 6 * 8;
const HOOK_FRAME_RCX: u64 = 16 + 7 * 8;

/// The highest level a leaf mapping has on x86 (1 GiB; KVM's shadow pages go to 5, but its leaves
/// stop here) and the frames a leaf of level `level` maps.
const MAX_LEAF_LEVEL: u64 = 3;
const fn frames_at_level(level: u64) -> u64 {
    1 << (9 * (level - 1))
}

impl State {
    fn current<M: GuestPhysRead>(
        &self,
        intro: &Introspector<'_, M>,
    ) -> Result<Option<ProcessInfo>, RejectReason> {
        let Some(record) = self
            .os
            .current_process(intro, self.percpu_base)
            .map_err(|_| RejectReason::GuestMemory)?
        else {
            return Ok(None);
        };
        self.os
            .read_process(intro, record)
            .map(Some)
            .map_err(|_| RejectReason::GuestMemory)
    }

    /// args = (number, arg0, arg1, arg2), through `entry` (a 32-bit entry: i386 number and registers,
    /// Linux only). Who made the call is read from the guest kernel.
    fn on_syscall<M: GuestPhysRead>(
        &mut self,
        intro: &Introspector<'_, M>,
        args: [u64; 4],
        entry: SyscallEntry,
    ) -> Result<Event, RejectReason> {
        if entry.is_compat()
            && (self.os.family != os::OsFamily::Linux
                || args.iter().any(|&a| a > u64::from(u32::MAX)))
        {
            return Err(RejectReason::BadArgument);
        }
        let who = self.current(intro)?.ok_or(RejectReason::NoCurrentProcess)?;
        let flags =
            if self.os.family == os::OsFamily::Linux && makes_executable(entry, args[0], args[3]) {
                event::SYSCALL_EXEC_MAPPING
            } else {
                0
            };
        Ok(Event {
            kind: EventKind::Syscall as u16,
            detail: entry as u16 | flags,
            verdict: Verdict::Allow as i32,
            pid: who.pid,
            ppid: who.ppid,
            comm: who.comm,
            nr: args[0],
            args: [args[1], args[2], args[3], 0],
            ..Event::EMPTY
        })
    }

    /// args = (GVA of the kernel's `linux_binprm`, 0, 0, 0): the running process is about to run the
    /// program the record names. Linux only; the record and the path it points at must be readable
    /// kernel memory, and the path terminated within the kernel's PATH_MAX. The program is judged by
    /// its identity, the SHA-256 of the file the record's `file` is ([`identity`]); the path is
    /// recorded for the reader.
    fn on_exec<M: GuestPhysRead>(
        &mut self,
        intro: &Introspector<'_, M>,
        args: [u64; 4],
        ctx: &CallContext,
    ) -> Result<Event, RejectReason> {
        if self.os.family != os::OsFamily::Linux || args[1..] != [0; 3] {
            return Err(RejectReason::BadArgument);
        }
        if let Some(returns) = self.os.exec_returns {
            self.check_hook_frame(intro, args[0], ctx.caller_rsp, returns)?;
        }
        let who = self.current(intro)?.ok_or(RejectReason::NoCurrentProcess)?;
        let mut path = [0u8; PATH_MAX];
        let len = self
            .os
            .exec_path(intro, Gva::new(args[0]), &mut path)
            .map_err(|e| match e {
                IntrospectError::Walk(_) | IntrospectError::Phys(_) => RejectReason::GuestMemory,
                _ => RejectReason::BadArgument,
            })?;
        if len == 0 {
            return Err(RejectReason::BadArgument);
        }
        let path = &path[..len];
        let identity = match &self.os.files {
            Some(files) => {
                identity::program_digest(intro, files, Gva::new(args[0]), &mut self.digests)
            }
            None => Err(IdentityError::NoLayout),
        };
        let verdict = self
            .policy
            .check_identity(identity.as_ref().map_err(|e| *e));
        if verdict == Verdict::Deny {
            self.stats.denied = self.stats.denied.wrapping_add(1);
        }
        let mut kept = [0u8; PATH_LEN];
        let n = len.min(PATH_LEN);
        kept[..n].copy_from_slice(&path[..n]);
        let (digest, why) = match identity {
            Ok(d) => (event::digest_words(&d), 0),
            Err(e) => ([0; 4], e as u16),
        };
        Ok(Event {
            kind: EventKind::Exec as u16,
            detail: u16::from(len > PATH_LEN) | why << event::EXEC_IDENTITY_SHIFT,
            verdict: verdict as i32,
            pid: who.pid,
            ppid: who.ppid,
            comm: who.comm,
            args: digest,
            path: kept,
            ..Event::EMPTY
        })
    }

    /// args = (GVA of the kernel's `io_kiocb`, 0, 0, 0), from the hook in `io_issue_sqe`, with its
    /// frame on the calling stack as for exec requests. Every operation is allowed; the event names it.
    fn on_io_uring<M: GuestPhysRead>(
        &mut self,
        intro: &Introspector<'_, M>,
        args: [u64; 4],
        ctx: &CallContext,
    ) -> Result<Event, RejectReason> {
        let hook = self.os.io_uring.ok_or(RejectReason::UnknownRequest)?;
        if args[1..] != [0; 3] {
            return Err(RejectReason::BadArgument);
        }
        self.check_hook_frame(intro, args[0], ctx.caller_rsp, hook.returns)?;
        let who = self.current(intro)?.ok_or(RejectReason::NoCurrentProcess)?;
        let req = Gva::new(args[0]);
        if !req.is_canonical() || args[0] < KERNEL_HALF {
            return Err(RejectReason::BadArgument);
        }
        let at = Gva::new(
            args[0]
                .checked_add(hook.opcode)
                .ok_or(RejectReason::BadArgument)?,
        );
        let mut opcode = [0u8; 1];
        intro
            .read_gva(at, &mut opcode)
            .map_err(|_| RejectReason::GuestMemory)?;
        Ok(Event {
            kind: EventKind::IoUring as u16,
            verdict: Verdict::Allow as i32,
            pid: who.pid,
            comm: who.comm,
            nr: u64::from(opcode[0]),
            ..Event::EMPTY
        })
    }

    /// args = (GVA of the `kvm_vcpu`, 0, 0, 0), from the hook in KVM's `vmx_handle_exit`, with its
    /// frame on the calling stack as for exec requests: KVM is about to handle an exit of its guest.
    /// The event names the exit (its reason, as KVM reads it from the VMCS L0 wrote for it) and the
    /// process KVM runs in (the VMM's vCPU thread). On the way, the monitor holds KVM's exit-handler
    /// table to its image values (integrity property P2 of NESTED.md B.1.3): a changed entry is an
    /// `integrity` event, pushed before the exit's, once per new value. KVM goes on either way: it has
    /// no path that fails an exit safely.
    fn on_kvm_exit<M: GuestPhysRead>(
        &mut self,
        intro: &Introspector<'_, M>,
        args: [u64; 4],
        ctx: &CallContext,
        ring: &mut EventRing,
    ) -> Result<Event, RejectReason> {
        // Borrowed, not copied: `KvmHook` holds the expected tables (2 KiB), which a copy at every
        // exit would cost Bochs a tick a byte.
        let hook = self.os.kvm.as_ref().ok_or(RejectReason::UnknownRequest)?;
        if args[1..] != [0; 3] {
            return Err(RejectReason::BadArgument);
        }
        self.check_hook_frame(intro, args[0], ctx.caller_rsp, hook.returns)?;
        if !is_kernel_pointer(args[0]) {
            return Err(RejectReason::BadArgument);
        }
        let who = self.current(intro)?.ok_or(RejectReason::NoCurrentProcess)?;
        let reason_at = args[0]
            .checked_add(hook.exit_reason)
            .ok_or(RejectReason::BadArgument)?;
        let reason = intro
            .read_u32(Gva::new(reason_at))
            .map_err(|_| RejectReason::GuestMemory)?;
        // The whole table, held word by word where it lies: a page or two of KVM's data.
        let expected = hook.expected();
        let changed = hold_words(
            intro,
            IntegrityProperty::KvmExitHandlers,
            hook.handlers,
            0..expected.len(),
            expected,
            &mut self.kvm_reported,
            ctx,
            ring,
        )?;
        if let Some(ops) = &hook.ops {
            check_kvm_ops(
                &mut self.kvm_ops_reported,
                &mut self.kvm_ops_next,
                intro,
                ops,
                ctx,
                ring,
            )?;
        }
        Ok(Event {
            kind: EventKind::KvmExit as u16,
            verdict: Verdict::Allow as i32,
            pid: who.pid,
            comm: who.comm,
            nr: u64::from(reason),
            args: [args[0], expected.len() as u64, changed, 0],
            ..Event::EMPTY
        })
    }

    /// args = (GVA of the `kvm_vcpu`, GVA of the `kvm_memory_slot`, guest frame, host frame), from the
    /// hook in KVM's `make_spte`, with its frame on the calling stack as for exec requests (the
    /// trampoline's saved RDX, R8 and R9 must be the arguments, its saved RSI is the shadow page): KVM
    /// is about to map a page of its guest. The monitor holds the mapping to P4 of NESTED.md B.1.3:
    /// the guest frame is inside the memslot, and every frame the mapping reaches (512 for a 2 MiB
    /// one) is RAM of the watched kernel outside its image, and all of them are inside the memslot. The event names the mapping and its
    /// class; a mapping that breaks P4 is also an `integrity` event, pushed before it. KVM goes on
    /// either way (`make_spte` has no way to fail; L0 refuses what its own view does not allow, at
    /// L2's first access).
    fn on_l2_map<M: GuestPhysRead>(
        &mut self,
        intro: &Introspector<'_, M>,
        args: [u64; 4],
        ctx: &CallContext,
        ring: &mut EventRing,
    ) -> Result<Event, RejectReason> {
        // The mapping hook's part only (see `on_memslot`).
        let hook = self
            .os
            .kvm
            .as_ref()
            .and_then(|k| k.map)
            .ok_or(RejectReason::UnknownRequest)?;
        let [vcpu, slot, gfn, pfn] = args;
        self.check_hook_frame(intro, vcpu, ctx.caller_rsp, hook.returns)?;
        let frame = |offset| hook_frame_word(intro, ctx.caller_rsp, offset);
        if frame(HOOK_FRAME_RDX)? != slot
            || frame(HOOK_FRAME_R8)? != gfn
            || frame(HOOK_FRAME_R9)? != pfn
        {
            return Err(RejectReason::NotFromHook);
        }
        let sp = frame(HOOK_FRAME_RSI)?;
        if !is_kernel_pointer(vcpu) || !is_kernel_pointer(slot) || !is_kernel_pointer(sp) {
            return Err(RejectReason::BadArgument);
        }
        let read = |base: u64, offset: u64| -> Result<u64, RejectReason> {
            intro
                .read_u64(member(base, offset)?)
                .map_err(|_| RejectReason::GuestMemory)
        };
        let base_gfn = read(slot, hook.slot_base_gfn)?;
        let npages = read(slot, hook.slot_npages)?;
        let userspace = read(slot, hook.slot_userspace_addr)?;
        let role_at = sp.checked_add(hook.role).ok_or(RejectReason::BadArgument)?;
        let level = u64::from(
            intro
                .read_u32(Gva::new(role_at))
                .map_err(|_| RejectReason::GuestMemory)?
                & 0xf,
        );
        if !(1..=MAX_LEAF_LEVEL).contains(&level) {
            return Err(RejectReason::BadArgument);
        }
        let who = self.current(intro)?.ok_or(RejectReason::NoCurrentProcess)?;
        let span = frames_at_level(level);
        // A large mapping lies within its memslot whole (KVM maps one only where it does).
        let in_slot = gfn >= base_gfn
            && (gfn - base_gfn)
                .checked_add(span)
                .is_some_and(|end| end <= npages);
        let hva = if in_slot {
            userspace.wrapping_add((gfn - base_gfn) << 12)
        } else {
            0
        };
        let end = pfn.checked_add(span).ok_or(RejectReason::BadArgument)?;
        let in_image = hook
            .image
            .iter()
            .any(|&[start, stop]| pfn < stop.div_ceil(4096) && start >> 12 < end);
        let class = if !in_slot {
            L2Memory::OutsideSlot
        } else if in_image {
            L2Memory::KernelImage
        } else if !frames_are_ram(intro, pfn, span) {
            L2Memory::NotRam
        } else {
            L2Memory::Ok
        };
        if class != L2Memory::Ok {
            ring.push(Event {
                tsc: ctx.tsc,
                kind: EventKind::Integrity as u16,
                detail: IntegrityProperty::L2Memory as u16,
                verdict: Verdict::Allow as i32,
                nr: gfn,
                args: [gfn << 12, hva, pfn << 12, class as u64],
                ..Event::EMPTY
            });
        }
        Ok(Event {
            kind: EventKind::L2Map as u16,
            detail: class as u16,
            verdict: Verdict::Allow as i32,
            pid: who.pid,
            comm: who.comm,
            nr: gfn,
            args: [vcpu, pfn, hva, level],
            ..Event::EMPTY
        })
    }

    /// args = (GVA of the `kvm`, the old slot or 0, the new slot or 0, the change), from the hook in
    /// `kvm_arch_commit_memory_region`, its frame checked as for exec requests (the saved RSI, RDX
    /// and RCX must be the other arguments): KVM commits a memslot change it accepted. The event
    /// names the VM, the change and the slot as it is now (the old one for a deletion): its id and
    /// address space, guest frames, the VMM's address of them and its flags.
    fn on_memslot<M: GuestPhysRead>(
        &mut self,
        intro: &Introspector<'_, M>,
        args: [u64; 4],
        ctx: &CallContext,
    ) -> Result<Event, RejectReason> {
        // The hooks' part only: copying all of `KvmHook` (its expected tables, 2 KiB) would cost
        // Bochs a tick a byte at every call.
        let hook = self
            .os
            .kvm
            .as_ref()
            .and_then(|k| k.vm)
            .ok_or(RejectReason::UnknownRequest)?;
        let [kvm, old, new, change] = args;
        self.check_hook_frame(intro, kvm, ctx.caller_rsp, hook.memslot_returns)?;
        let frame = |offset| hook_frame_word(intro, ctx.caller_rsp, offset);
        if frame(HOOK_FRAME_RSI)? != old
            || frame(HOOK_FRAME_RDX)? != new
            || frame(HOOK_FRAME_RCX)? != change
        {
            return Err(RejectReason::NotFromHook);
        }
        // An `enum` (32 bits of RCX): KVM_MR_CREATE, _DELETE, _MOVE, _FLAGS_ONLY; only a deletion
        // has no new slot.
        let change = change & 0xffff_ffff;
        let slot = match change {
            1 => old,
            0 | 2 | 3 => new,
            _ => return Err(RejectReason::BadArgument),
        };
        if !is_kernel_pointer(kvm) || !is_kernel_pointer(slot) {
            return Err(RejectReason::BadArgument);
        }
        let at = |offset: u64| member(slot, offset);
        let read64 = |offset| {
            intro
                .read_u64(at(offset)?)
                .map_err(|_| RejectReason::GuestMemory)
        };
        let read32 = |offset| {
            intro
                .read_u32(at(offset)?)
                .map_err(|_| RejectReason::GuestMemory)
        };
        let base_gfn = read64(hook.slot_base_gfn)?;
        let npages = read64(hook.slot_npages)?;
        let hva = read64(hook.slot_userspace_addr)?;
        let id = read32(hook.slot_id)? & 0xffff;
        let as_id = read32(hook.slot_as_id)? & 0xffff;
        let flags = read32(hook.slot_flags)?;
        let who = self.current(intro)?.ok_or(RejectReason::NoCurrentProcess)?;
        Ok(Event {
            kind: EventKind::Memslot as u16,
            detail: change as u16,
            verdict: Verdict::Allow as i32,
            pid: who.pid,
            comm: who.comm,
            nr: base_gfn,
            args: [
                kvm,
                npages,
                hva,
                u64::from(id) | u64::from(as_id) << 16 | u64::from(flags) << 32,
            ],
            ..Event::EMPTY
        })
    }

    /// What the vCPU hooks share: args = (GVA of the `kvm_vcpu`, 0, 0, 0), its frame checked as for
    /// exec requests against the hook's `returns`, the vCPU a kernel pointer, its `kvm` and
    /// `vcpu_id` read from it; with the hooks' members for what the caller reads next.
    fn vcpu_request<M: GuestPhysRead>(
        &self,
        intro: &Introspector<'_, M>,
        args: [u64; 4],
        ctx: &CallContext,
        returns: fn(&os::KvmVmHooks) -> [u64; 2],
    ) -> Result<(os::KvmVmHooks, VcpuSeen), RejectReason> {
        // The hooks' part only: copying all of `KvmHook` (its expected tables, 2 KiB) would cost
        // Bochs a tick a byte at every call.
        let hook = self
            .os
            .kvm
            .as_ref()
            .and_then(|k| k.vm)
            .ok_or(RejectReason::UnknownRequest)?;
        if args[1..] != [0; 3] {
            return Err(RejectReason::BadArgument);
        }
        let vcpu = args[0];
        self.check_hook_frame(intro, vcpu, ctx.caller_rsp, returns(&hook))?;
        if !is_kernel_pointer(vcpu) {
            return Err(RejectReason::BadArgument);
        }
        let kvm = intro
            .read_u64(member(vcpu, hook.vcpu_kvm)?)
            .map_err(|_| RejectReason::GuestMemory)?;
        let id = intro
            .read_u32(member(vcpu, hook.vcpu_id)?)
            .map_err(|_| RejectReason::GuestMemory)?;
        Ok((hook, VcpuSeen { vcpu, kvm, id }))
    }

    /// args = (GVA of the `kvm_vcpu`, 0, 0, 0), from the hook in `kvm_arch_vcpu_postcreate`, its
    /// frame checked as for exec requests: KVM has created a vCPU (its `kvm`, `vcpu_id` and VMCS
    /// set) and its VMM cannot run it yet. The event names it, its VM, its id, its VMCS region and
    /// the thread that asked (the VMM's); the vCPU and region are kept for the image to register
    /// (P6: L0 refuses a VMLAUNCH or VMRESUME of any other region). The region is the one
    /// `vcpu_vmx.vmcs01` points to, with `vcpu_vmx.loaded_vmcs` pointing at `vmcs01` as KVM leaves
    /// it after creation; anything else is refused as a bad argument, and nothing is registered.
    fn on_vcpu_create<M: GuestPhysRead>(
        &mut self,
        intro: &Introspector<'_, M>,
        args: [u64; 4],
        ctx: &CallContext,
    ) -> Result<Event, RejectReason> {
        let (hook, seen) = self.vcpu_request(intro, args, ctx, |h| h.vcpu_returns)?;
        let vmcs01 = member(seen.vcpu, hook.vcpu_vmcs01)?;
        let loaded = intro
            .read_u64(member(seen.vcpu, hook.vcpu_loaded_vmcs)?)
            .map_err(|_| RejectReason::GuestMemory)?;
        let vmcs = intro
            .read_u64(vmcs01)
            .map_err(|_| RejectReason::GuestMemory)?;
        if loaded != vmcs01.raw() || !is_kernel_pointer(vmcs) || vmcs & 0xfff != 0 {
            return Err(RejectReason::BadArgument);
        }
        let region = intro
            .translate(Gva::new(vmcs))
            .map_err(|_| RejectReason::GuestMemory)?
            .raw();
        let event = self.vcpu_event(intro, EventKind::VcpuCreate, seen, region)?;
        self.created_vcpu = Some([seen.vcpu, region]);
        Ok(event)
    }

    /// args = (GVA of the `kvm_vcpu`, 0, 0, 0), from the hook in `kvm_arch_vcpu_destroy`, its frame
    /// checked as for exec requests: KVM is destroying a vCPU, whose VMCS it frees. The event names
    /// it, its VM, its id and the region its `vmcs01` still points to; the image takes the vCPU out
    /// of its VMCS registry (allowed requests only: a forged one leaves the registry as it is).
    fn on_vcpu_destroy<M: GuestPhysRead>(
        &mut self,
        intro: &Introspector<'_, M>,
        args: [u64; 4],
        ctx: &CallContext,
    ) -> Result<Event, RejectReason> {
        let (hook, seen) = self.vcpu_request(intro, args, ctx, |h| h.vcpu_destroy_returns)?;
        // The region as KVM still has it (0 if it cannot be translated: the vCPU goes regardless).
        let vmcs = intro
            .read_u64(member(seen.vcpu, hook.vcpu_vmcs01)?)
            .map_err(|_| RejectReason::GuestMemory)?;
        let region = intro.translate(Gva::new(vmcs)).map_or(0, |g| g.raw());
        self.vcpu_event(intro, EventKind::VcpuDestroy, seen, region)
    }

    /// A vCPU hook's event: the vCPU, its VM, its id and VMCS region, and the thread that asked.
    fn vcpu_event<M: GuestPhysRead>(
        &self,
        intro: &Introspector<'_, M>,
        kind: EventKind,
        seen: VcpuSeen,
        region: u64,
    ) -> Result<Event, RejectReason> {
        let who = self.current(intro)?.ok_or(RejectReason::NoCurrentProcess)?;
        Ok(Event {
            kind: kind as u16,
            verdict: Verdict::Allow as i32,
            pid: who.pid,
            comm: who.comm,
            nr: u64::from(seen.id),
            args: [seen.vcpu, seen.kvm, region, 0],
            ..Event::EMPTY
        })
    }

    /// The calling kernel stack must hold the frame a real hooked call leaves (see
    /// `IHMI_HOOK_TRAMPOLINE` in the monitor image): the return into the trampoline above the gate's
    /// saved RFLAGS, the trampoline's nine saved registers with RDI the argument it passed (the
    /// `linux_binprm`, the `io_kiocb`), then the return into the hooked function past its call site.
    fn check_hook_frame<M: GuestPhysRead>(
        &self,
        intro: &Introspector<'_, M>,
        arg: u64,
        caller_rsp: u64,
        [hook_return, site_return]: [u64; 2],
    ) -> Result<(), RejectReason> {
        let at = |offset| hook_frame_word(intro, caller_rsp, offset);
        if at(HOOK_FRAME_RETURN)? != hook_return || at(HOOK_FRAME_ARG)? != arg {
            return Err(RejectReason::NotFromHook);
        }
        // L0 puts the call after the function's ENDBR64 when it has one (a kernel built for indirect
        // branch tracking), which it sees only once the kernel has booted: 4 bytes further then.
        let site = at(HOOK_FRAME_SITE_RETURN)?;
        if site != site_return && site != site_return.wrapping_add(4) {
            return Err(RejectReason::NotFromHook);
        }
        Ok(())
    }

    /// args = (GVA of the new, not yet live, process record, program number, 0, 0). The record must be
    /// readable and well formed, and its parent must be the running process (or none, for the first).
    fn on_process_create<M: GuestPhysRead>(
        &mut self,
        intro: &Introspector<'_, M>,
        args: [u64; 4],
    ) -> Result<Event, RejectReason> {
        if args[2] != 0 || args[3] != 0 {
            return Err(RejectReason::BadArgument);
        }
        let record = Gva::new(args[0]);
        if !record.is_canonical() || record.raw() == 0 {
            return Err(RejectReason::BadArgument);
        }
        let new = self.os.read_process(intro, record).map_err(|e| match e {
            IntrospectError::Misaligned(_) | IntrospectError::Overflow(_) => {
                RejectReason::BadArgument
            }
            _ => RejectReason::GuestMemory,
        })?;
        let parent_pid = self.current(intro)?.map_or(0, |p| p.pid);
        if new.pid == 0 || new.ppid != parent_pid || new.comm[0] == 0 {
            return Err(RejectReason::BadArgument);
        }
        let verdict = self.policy.check_create(&new.comm);
        if verdict == Verdict::Deny {
            self.stats.denied = self.stats.denied.wrapping_add(1);
        }
        Ok(Event {
            kind: EventKind::ProcessCreate as u16,
            verdict: verdict as i32,
            pid: new.pid,
            ppid: new.ppid,
            comm: new.comm,
            ..Event::EMPTY
        })
    }
}

/// A vCPU a KVM hook named, and what every vCPU hook reads of it.
#[derive(Clone, Copy)]
struct VcpuSeen {
    vcpu: u64,
    kvm: u64,
    id: u32,
}

/// The address of the member `offset` bytes into the kernel structure at `base`; past the top of
/// the address space is a bad argument.
fn member(base: u64, offset: u64) -> Result<Gva, RejectReason> {
    base.checked_add(offset)
        .map(Gva::new)
        .ok_or(RejectReason::BadArgument)
}

/// The next [`KVM_X86_OPS_CHUNK`] words of `kvm_x86_ops`, held to their values when the boot was over
/// (P2: the struct is filled in once, at boot; some of KVM's calls still go through it, `nested_ops`
/// among them): a changed word is an `integrity` event, once per new value (`reported` holds each
/// word's value as last reported, `next` the next word to check). A whole pass takes
/// `words / KVM_X86_OPS_CHUNK` exits, rounded up (8 for 6.1's 121 words).
fn check_kvm_ops<M: GuestPhysRead>(
    reported: &mut [u64; KVM_X86_OPS_MAX],
    next: &mut usize,
    intro: &Introspector<'_, M>,
    ops: &KvmOps,
    ctx: &CallContext,
    ring: &mut EventRing,
) -> Result<(), RejectReason> {
    let expected = ops.expected();
    let first = if *next < expected.len() { *next } else { 0 };
    let end = (first + KVM_X86_OPS_CHUNK).min(expected.len());
    hold_words(
        intro,
        IntegrityProperty::KvmX86Ops,
        ops.at,
        first..end,
        expected,
        reported,
        ctx,
        ring,
    )?;
    *next = end;
    Ok(())
}

/// Holds words `words` of KVM's control data (P2) to what they must be: the table at `table`, read
/// in guest memory, against `expected` (the whole table's). A word that differs is an `integrity`
/// event of `property` (its index, address, the value it must have and the one found), once per
/// new value: `reported` holds each word's value as last reported. Nothing is compared unless all
/// the words can be read. Returns how many of them differ.
#[allow(clippy::too_many_arguments)]
fn hold_words<M: GuestPhysRead>(
    intro: &Introspector<'_, M>,
    property: IntegrityProperty,
    table: u64,
    words: core::ops::Range<usize>,
    expected: &[u64],
    reported: &mut [u64],
    ctx: &CallContext,
    ring: &mut EventRing,
) -> Result<u64, RejectReason> {
    let first = words.start;
    let at = table
        .checked_add(first as u64 * 8)
        .ok_or(RejectReason::GuestMemory)?;
    let expected = &expected[words.clone()];
    let reported = &mut reported[words.clone()];
    let mut changed = 0;
    intro
        .each_u64(Gva::new(at), words.len(), |k, found| {
            let want = expected[k];
            if found == want {
                reported[k] = want;
                return;
            }
            changed += 1;
            if found != reported[k] {
                reported[k] = found;
                let i = first + k;
                ring.push(Event {
                    tsc: ctx.tsc,
                    kind: EventKind::Integrity as u16,
                    detail: property as u16,
                    verdict: Verdict::Allow as i32,
                    nr: i as u64,
                    args: [table.wrapping_add(i as u64 * 8), want, found, 0],
                    ..Event::EMPTY
                });
            }
        })
        .map_err(|_| RejectReason::GuestMemory)?;
    Ok(changed)
}

/// The word `offset` bytes above the caller's stack pointer at the gate, in a hooked call's frame (see
/// `HOOK_FRAME_RETURN`); one that cannot be read is not a hook's frame.
fn hook_frame_word<M: GuestPhysRead>(
    intro: &Introspector<'_, M>,
    caller_rsp: u64,
    offset: u64,
) -> Result<u64, RejectReason> {
    let at = caller_rsp
        .checked_add(offset)
        .ok_or(RejectReason::NotFromHook)?;
    intro
        .read_u64(Gva::new(at))
        .map_err(|_| RejectReason::NotFromHook)
}

/// Whether `p` can be a pointer to one of the kernel's structures: canonical, in the upper half,
/// 8-byte aligned.
fn is_kernel_pointer(p: u64) -> bool {
    Gva::new(p).is_canonical() && p >= KERNEL_HALF && p.is_multiple_of(8)
}

/// Whether the `frames` frames from `pfn` on are all RAM of the watched kernel, as the monitor's reader
/// has it (guest RAM only: a monitor or L0 frame, or an address the kernel never had, fails): one
/// byte read at each frame's start, a 2 MiB step at a time for a large mapping (the regions L0 takes
/// out of guest RAM are 2 MiB-aligned), and its last frame.
fn frames_are_ram<M: GuestPhysRead>(intro: &Introspector<'_, M>, pfn: u64, frames: u64) -> bool {
    const STEP: u64 = 512;
    let mut byte = [0u8; 1];
    let last = pfn + frames - 1;
    let mut at = pfn;
    loop {
        if intro
            .read_gpa(ihmi_addr::Gpa::new(at << 12), &mut byte)
            .is_err()
        {
            return false;
        }
        if at == last {
            return true;
        }
        at = (at + STEP).min(last);
    }
}

#[cfg(test)]
mod tests;
