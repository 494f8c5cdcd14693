//! Where a guest kernel keeps what the monitor reads: its current-process pointer, the layout of a
//! process record, the names of its system calls. The monitor reads the guest's own structures
//! through these and takes nothing about the guest from its caller.

use ihmi_abi::guest_os::{process_layout, COMM_LEN};
use ihmi_abi::monitor::{KVM_EXIT_HANDLERS_MAX, KVM_X86_OPS_MAX};
use ihmi_addr::Gva;
use ihmi_paging::GuestPhysRead;

use crate::introspect::{IntrospectError, Introspector};

/// Per-CPU symbols are offsets into the per-CPU area below this; kernel addresses are far above it.
const PER_CPU_LIMIT: u64 = 1 << 32;

/// Which kernel family the profile describes (for system-call names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OsFamily {
    /// ihmi's own test guest (`ihmi_abi::guest_os`).
    TestGuest,
    /// Linux on x86-64.
    Linux,
}

/// How to find the parent's pid from a process record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParentField {
    /// A `u32` pid stored in the record at this offset.
    Pid(u64),
    /// A pointer at `pointer` to the parent's record, whose `u32` pid is at the profile's `pid`.
    Pointer(u64),
}

/// Offsets and addresses of one guest kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OsProfile {
    /// The kernel family.
    pub family: OsFamily,
    /// Address of the kernel global that points at the current process record (0 = none running).
    pub current_ptr: Gva,
    /// Offset of the `u32` pid.
    pub pid: u64,
    /// Where the parent is.
    pub parent: ParentField,
    /// Offset of the NUL-padded name of [`COMM_LEN`] bytes.
    pub comm: u64,
    /// Alignment every record address must have.
    pub record_align: u64,
    /// Linux with page-table isolation built in: kernel addresses are read through the even (kernel)
    /// page of the CR3's 8 KiB PGD pair.
    pub pti_pgd_pair: bool,
    /// Linux: offset of the program's path pointer in the kernel's `linux_binprm`.
    pub binprm_filename: u64,
    /// Linux: the two return addresses a real exec request has on its stack (the trampoline's call
    /// of the gate, the hooked function's call of the trampoline), when the monitor checks them.
    pub exec_returns: Option<[u64; 2]>,
    /// Linux: the same for the io_uring hook, and where `io_kiocb` keeps its one-byte `opcode`
    /// (none without the hook).
    pub io_uring: Option<IoUringHook>,
    /// Linux: how to find the bytes of the file an exec runs, for its identity (none: no digests,
    /// and a program list refuses every exec).
    pub files: Option<crate::identity::FileLayout>,
    /// Linux with KVM built in: the hook on KVM's L2-exit path and what it audits (none without it).
    pub kvm: Option<KvmHook>,
    /// Linux, in the box: where the kernel's linear mappings are, for reads without a walk (none: every
    /// read walks the guest's tables, as out of the box).
    pub linear: Option<crate::introspect::LinearHints>,
}

/// What the in-hypervisor monitor needs for the hook in KVM's `vmx_handle_exit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvmHook {
    /// The two returns a real request has on its stack, as for exec requests.
    pub returns: [u64; 2],
    /// Offset of the exit reason (4 bytes) from the `kvm_vcpu` pointer.
    pub exit_reason: u64,
    /// `kvm_vmx_exit_handlers`: where, how many entries, and each entry's value in the kernel image.
    pub handlers: u64,
    pub handler_count: usize,
    pub expected: [u64; KVM_EXIT_HANDLERS_MAX],
    /// The hook in `make_spte` and what it checks, if L0 put it in.
    pub map: Option<KvmMapHook>,
    /// The hooks on memslot changes and vCPU creation, if L0 put them in.
    pub vm: Option<KvmVmHooks>,
    /// `kvm_x86_ops` and its words when the boot was over, if L0 copied them.
    pub ops: Option<KvmOps>,
}

/// KVM's `kvm_x86_ops`, held to the copy L0 took when the kernel's boot was over (P2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvmOps {
    /// Its address, its words, and their values then.
    pub at: u64,
    pub words: usize,
    pub expected: [u64; KVM_X86_OPS_MAX],
}

impl KvmOps {
    /// The words the struct must hold.
    #[must_use]
    pub fn expected(&self) -> &[u64] {
        &self.expected[..self.words.min(KVM_X86_OPS_MAX)]
    }
}

/// What the in-hypervisor monitor needs for the hooks in `kvm_arch_commit_memory_region` and
/// `kvm_arch_vcpu_postcreate`: their returns, and the members it reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvmVmHooks {
    pub memslot_returns: [u64; 2],
    pub vcpu_returns: [u64; 2],
    /// The two returns of the hook in `kvm_arch_vcpu_destroy`.
    pub vcpu_destroy_returns: [u64; 2],
    /// Offsets of `kvm_memory_slot.base_gfn`, `.npages`, `.userspace_addr`, `.id`, `.as_id`,
    /// `.flags`, of `kvm_vcpu.kvm`, `.vcpu_id`, and of `vcpu_vmx.vmcs01` and `.loaded_vmcs` from the
    /// `kvm_vcpu` pointer.
    pub slot_base_gfn: u64,
    pub slot_npages: u64,
    pub slot_userspace_addr: u64,
    pub slot_id: u64,
    pub slot_as_id: u64,
    pub slot_flags: u64,
    pub vcpu_kvm: u64,
    pub vcpu_id: u64,
    pub vcpu_vmcs01: u64,
    pub vcpu_loaded_vmcs: u64,
}

/// What the in-hypervisor monitor needs for the hook in KVM's `make_spte` (L2 memory isolation,
/// NESTED.md B.1.3 P4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvmMapHook {
    /// The two returns a real request has on its stack, as for exec requests.
    pub returns: [u64; 2],
    /// Offsets of `kvm_memory_slot.base_gfn`, `.npages`, `.userspace_addr` and `kvm_mmu_page.role`.
    pub slot_base_gfn: u64,
    pub slot_npages: u64,
    pub slot_userspace_addr: u64,
    pub role: u64,
    /// What the watched kernel keeps of its image (text, read-only data, data, zero-initialised
    /// data), guest-physical `[start, end)` each.
    pub image: [[u64; 2]; ihmi_abi::monitor::KERNEL_IMAGE_RANGES],
}

impl KvmHook {
    /// The entries the table must hold.
    #[must_use]
    pub fn expected(&self) -> &[u64] {
        &self.expected[..self.handler_count.min(KVM_EXIT_HANDLERS_MAX)]
    }
}

/// What the monitor needs for a Linux kernel's io_uring hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoUringHook {
    /// The two returns a real request has on its stack, as for exec requests.
    pub returns: [u64; 2],
    /// Offset of `io_kiocb.opcode`.
    pub opcode: u64,
}

/// What the monitor knows of one process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessInfo {
    /// Process id.
    pub pid: u32,
    /// Parent's process id.
    pub ppid: u32,
    /// Name, NUL-padded.
    pub comm: [u8; COMM_LEN],
}

impl OsProfile {
    /// The test guest, whose current-process pointer is the kernel symbol `CURRENT_PROCESS` (L0 finds
    /// its address in the guest image's symbol table).
    #[must_use]
    pub const fn testguest(current_ptr: Gva) -> Self {
        Self {
            family: OsFamily::TestGuest,
            current_ptr,
            pid: process_layout::PID,
            parent: ParentField::Pid(process_layout::PPID),
            comm: process_layout::COMM,
            record_align: 8,
            pti_pgd_pair: false,
            binprm_filename: 0,
            exec_returns: None,
            io_uring: None,
            files: None,
            kvm: None,
            linear: None,
        }
    }

    /// A Linux kernel: `current_ptr` is its `current_task`, the offsets are `task_struct`'s (from its
    /// BTF): `pid` is the process id (`tgid`), `parent` the `real_parent` pointer; `binprm_filename`
    /// is `linux_binprm.filename`'s.
    #[must_use]
    pub const fn linux(
        current_ptr: Gva,
        pid: u64,
        parent: u64,
        comm: u64,
        pti_pgd_pair: bool,
        binprm_filename: u64,
    ) -> Self {
        Self {
            family: OsFamily::Linux,
            current_ptr,
            pid,
            parent: ParentField::Pointer(parent),
            comm,
            record_align: 8,
            pti_pgd_pair,
            binprm_filename,
            exec_returns: None,
            io_uring: None,
            files: None,
            kvm: None,
            linear: None,
        }
    }

    /// The same profile, checking that every exec request's kernel stack holds the process-creation
    /// hook's frame with these returns (the trampoline's call of the gate, the hooked function's call
    /// of the trampoline).
    #[must_use]
    pub const fn with_exec_returns(self, hook_return: u64, site_return: u64) -> Self {
        Self {
            exec_returns: Some([hook_return, site_return]),
            ..self
        }
    }

    /// The same profile, serving io_uring requests from the hook in `io_issue_sqe`.
    #[must_use]
    pub const fn with_io_uring(self, hook: IoUringHook) -> Self {
        Self {
            io_uring: Some(hook),
            ..self
        }
    }

    /// The same profile, serving KVM exit requests from the hook in `vmx_handle_exit`.
    #[must_use]
    pub const fn with_kvm(self, hook: KvmHook) -> Self {
        Self {
            kvm: Some(hook),
            ..self
        }
    }

    /// The same profile, reading the kernel's linear mappings `hints` describes without a walk, once
    /// the guest's tables confirm them.
    #[must_use]
    pub const fn with_linear(self, hints: crate::introspect::LinearHints) -> Self {
        Self {
            linear: Some(hints),
            ..self
        }
    }

    /// The same profile, hashing the programs execs run through the page cache as `files` says.
    #[must_use]
    pub const fn with_files(self, files: crate::identity::FileLayout) -> Self {
        Self {
            files: Some(files),
            ..self
        }
    }

    /// The page-table root to read kernel memory through, from the CR3 the guest had.
    #[must_use]
    pub const fn kernel_cr3(&self, cr3: u64) -> u64 {
        ihmi_linux::profile::kernel_pgd(cr3, self.pti_pgd_pair)
    }

    /// The name of an io_uring operation (`IORING_OP_*`, user-space ABI), where the profile knows it.
    #[must_use]
    pub const fn io_uring_op_name(&self, op: u64) -> Option<&'static str> {
        match self.family {
            OsFamily::TestGuest => None,
            OsFamily::Linux => linux_io_uring_op_name(op),
        }
    }

    /// The name of a 32-bit system call (i386 numbers), where the profile knows it.
    #[must_use]
    pub const fn compat_syscall_name(&self, nr: u64) -> Option<&'static str> {
        match self.family {
            OsFamily::TestGuest => None,
            OsFamily::Linux => linux_compat_syscall_name(nr),
        }
    }

    /// The system call's name, where the profile knows it.
    #[must_use]
    pub const fn syscall_name(&self, nr: u64) -> Option<&'static str> {
        use ihmi_abi::guest_os::{SYS_EXIT, SYS_GETPID, SYS_SPAWN, SYS_WRITE};
        match self.family {
            OsFamily::TestGuest => match nr {
                SYS_WRITE => Some("write"),
                SYS_GETPID => Some("getpid"),
                SYS_SPAWN => Some("spawn"),
                SYS_EXIT => Some("exit"),
                _ => None,
            },
            OsFamily::Linux => linux_syscall_name(nr),
        }
    }

    /// Where the running task pointer is: `current_ptr` itself, or for a kernel that keeps it per CPU
    /// (`current_ptr` is then an offset below 4 GiB, as System.map gives per-CPU symbols) that offset
    /// from the caller's per-CPU base.
    #[must_use]
    pub const fn current_ptr_at(&self, percpu_base: u64) -> Gva {
        if self.current_ptr.raw() < PER_CPU_LIMIT {
            Gva::new(percpu_base.wrapping_add(self.current_ptr.raw()))
        } else {
            self.current_ptr
        }
    }

    /// The record of the running process, or `None` when the kernel runs none.
    pub fn current_process<M: GuestPhysRead>(
        &self,
        intro: &Introspector<'_, M>,
        percpu_base: u64,
    ) -> Result<Option<Gva>, IntrospectError> {
        let ptr = intro.read_u64(self.current_ptr_at(percpu_base))?;
        Ok((ptr != 0).then_some(Gva::new(ptr)))
    }

    /// The path a Linux `execve` was given, read from the kernel's `linux_binprm` at `bprm` into `buf`;
    /// returns its length. The record must be a kernel address (upper half) and 8-byte aligned, the
    /// path a kernel address too; a path without a terminator within `buf` is refused.
    pub fn exec_path<M: GuestPhysRead>(
        &self,
        intro: &Introspector<'_, M>,
        bprm: Gva,
        buf: &mut [u8],
    ) -> Result<usize, IntrospectError> {
        let kernel = |a: Gva| a.is_canonical() && a.raw() >> 63 == 1;
        if !kernel(bprm) {
            return Err(IntrospectError::NotKernel(bprm));
        }
        if !bprm.is_aligned(8) {
            return Err(IntrospectError::Misaligned(bprm));
        }
        let field = bprm
            .checked_add(self.binprm_filename)
            .ok_or(IntrospectError::Overflow(bprm))?;
        let path = Gva::new(intro.read_u64(field)?);
        if !kernel(path) {
            return Err(IntrospectError::NotKernel(path));
        }
        intro.read_c_string(path, buf)
    }

    /// Reads a process record. A misaligned address is refused before anything is read.
    pub fn read_process<M: GuestPhysRead>(
        &self,
        intro: &Introspector<'_, M>,
        record: Gva,
    ) -> Result<ProcessInfo, IntrospectError> {
        if !record.is_aligned(self.record_align) {
            return Err(IntrospectError::Misaligned(record));
        }
        let at = |off: u64| {
            record
                .checked_add(off)
                .ok_or(IntrospectError::Overflow(record))
        };
        let pid = intro.read_u32(at(self.pid)?)?;
        let ppid = match self.parent {
            ParentField::Pid(off) => intro.read_u32(at(off)?)?,
            ParentField::Pointer(off) => {
                let parent = Gva::new(intro.read_u64(at(off)?)?);
                let pid_at = parent
                    .checked_add(self.pid)
                    .ok_or(IntrospectError::Overflow(parent))?;
                intro.read_u32(pid_at)?
            }
        };
        let comm = intro.read_array::<COMM_LEN>(at(self.comm)?)?;
        Ok(ProcessInfo { pid, ppid, comm })
    }
}

/// Names of the x86-64 Linux system calls the events name (numbers from the kernel's
/// arch/x86/entry/syscalls/syscall_64.tbl, a stable ABI); others are reported by number.
const fn linux_syscall_name(nr: u64) -> Option<&'static str> {
    Some(match nr {
        0 => "read",
        1 => "write",
        2 => "open",
        3 => "close",
        4 => "stat",
        5 => "fstat",
        6 => "lstat",
        7 => "poll",
        8 => "lseek",
        9 => "mmap",
        10 => "mprotect",
        11 => "munmap",
        12 => "brk",
        13 => "rt_sigaction",
        14 => "rt_sigprocmask",
        15 => "rt_sigreturn",
        16 => "ioctl",
        17 => "pread64",
        20 => "writev",
        21 => "access",
        22 => "pipe",
        32 => "dup",
        33 => "dup2",
        39 => "getpid",
        56 => "clone",
        57 => "fork",
        58 => "vfork",
        59 => "execve",
        60 => "exit",
        61 => "wait4",
        62 => "kill",
        63 => "uname",
        72 => "fcntl",
        79 => "getcwd",
        80 => "chdir",
        83 => "mkdir",
        87 => "unlink",
        88 => "symlink",
        89 => "readlink",
        95 => "umask",
        96 => "gettimeofday",
        97 => "getrlimit",
        98 => "getrusage",
        99 => "sysinfo",
        102 => "getuid",
        104 => "getgid",
        107 => "geteuid",
        108 => "getegid",
        109 => "setpgid",
        110 => "getppid",
        111 => "getpgrp",
        112 => "setsid",
        131 => "sigaltstack",
        157 => "prctl",
        158 => "arch_prctl",
        165 => "mount",
        173 => "ioperm",
        186 => "gettid",
        217 => "getdents64",
        218 => "set_tid_address",
        228 => "clock_gettime",
        231 => "exit_group",
        257 => "openat",
        262 => "newfstatat",
        273 => "set_robust_list",
        302 => "prlimit64",
        318 => "getrandom",
        334 => "rseq",
        425 => "io_uring_setup",
        426 => "io_uring_enter",
        427 => "io_uring_register",
        _ => return None,
    })
}

/// Names of the same calls in the i386 table (the kernel's arch/x86/entry/syscalls/syscall_32.tbl),
/// which 32-bit entries (`int $0x80`, SYSENTER) use even from 64-bit programs.
const fn linux_compat_syscall_name(nr: u64) -> Option<&'static str> {
    Some(match nr {
        1 => "exit",
        2 => "fork",
        3 => "read",
        4 => "write",
        5 => "open",
        6 => "close",
        10 => "unlink",
        11 => "execve",
        12 => "chdir",
        19 => "lseek",
        20 => "getpid",
        21 => "mount",
        24 => "getuid",
        33 => "access",
        37 => "kill",
        39 => "mkdir",
        41 => "dup",
        42 => "pipe",
        45 => "brk",
        47 => "getgid",
        49 => "geteuid",
        50 => "getegid",
        54 => "ioctl",
        55 => "fcntl",
        57 => "setpgid",
        60 => "umask",
        63 => "dup2",
        64 => "getppid",
        65 => "getpgrp",
        66 => "setsid",
        76 => "getrlimit",
        77 => "getrusage",
        78 => "gettimeofday",
        83 => "symlink",
        85 => "readlink",
        90 => "mmap",
        91 => "munmap",
        101 => "ioperm",
        106 => "stat",
        107 => "lstat",
        108 => "fstat",
        114 => "wait4",
        116 => "sysinfo",
        120 => "clone",
        122 => "uname",
        125 => "mprotect",
        146 => "writev",
        168 => "poll",
        172 => "prctl",
        173 => "rt_sigreturn",
        174 => "rt_sigaction",
        175 => "rt_sigprocmask",
        180 => "pread64",
        183 => "getcwd",
        186 => "sigaltstack",
        190 => "vfork",
        192 => "mmap2",
        220 => "getdents64",
        224 => "gettid",
        252 => "exit_group",
        258 => "set_tid_address",
        265 => "clock_gettime",
        295 => "openat",
        300 => "fstatat64",
        311 => "set_robust_list",
        340 => "prlimit64",
        355 => "getrandom",
        384 => "arch_prctl",
        386 => "rseq",
        _ => return None,
    })
}

/// Linux 6.1's io_uring operations (`enum io_uring_op` in its `include/uapi/linux/io_uring.h`),
/// lower-cased without the `IORING_OP_` prefix.
const fn linux_io_uring_op_name(op: u64) -> Option<&'static str> {
    Some(match op {
        0 => "nop",
        1 => "readv",
        2 => "writev",
        3 => "fsync",
        4 => "read_fixed",
        5 => "write_fixed",
        6 => "poll_add",
        7 => "poll_remove",
        8 => "sync_file_range",
        9 => "sendmsg",
        10 => "recvmsg",
        11 => "timeout",
        12 => "timeout_remove",
        13 => "accept",
        14 => "async_cancel",
        15 => "link_timeout",
        16 => "connect",
        17 => "fallocate",
        18 => "openat",
        19 => "close",
        20 => "files_update",
        21 => "statx",
        22 => "read",
        23 => "write",
        24 => "fadvise",
        25 => "madvise",
        26 => "send",
        27 => "recv",
        28 => "openat2",
        29 => "epoll_ctl",
        30 => "splice",
        31 => "provide_buffers",
        32 => "remove_buffers",
        33 => "tee",
        34 => "shutdown",
        35 => "renameat",
        36 => "unlinkat",
        37 => "mkdirat",
        38 => "symlinkat",
        39 => "linkat",
        40 => "msg_ring",
        41 => "fsetxattr",
        42 => "setxattr",
        43 => "fgetxattr",
        44 => "getxattr",
        45 => "socket",
        46 => "uring_cmd",
        47 => "send_zc",
        48 => "sendmsg_zc",
        _ => return None,
    })
}
