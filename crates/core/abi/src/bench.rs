//! The invocation benchmark's shared numbers: what the guest measures and how it marks the windows.

/// One measured quantity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Bench {
    /// A null monitor request from the guest kernel, in a tight loop.
    InvokeNull = 0,
    /// A `getpid` system call from user mode, whose hook makes the monitor record a system-call event
    /// (reading the current process, its name and parent out of guest memory).
    InvokeSyscall = 1,
    /// Linux: one `getpid` and one 64-byte `read` of /dev/zero from a user process.
    LinuxSyscall = 2,
    /// Linux: `fork`, `execve` of /bin/true in the child, `wait4` in the parent.
    LinuxForkExec = 3,
}

impl Bench {
    /// The test guest's two, in the order it runs them.
    pub const ALL: [Bench; 2] = [Self::InvokeNull, Self::InvokeSyscall];
    /// The Linux guest's two (`ihmi-bench`), in the order it runs them.
    pub const LINUX: [Bench; 2] = [Self::LinuxSyscall, Self::LinuxForkExec];

    /// The name in reports.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::InvokeNull => "invoke-null",
            Self::InvokeSyscall => "invoke-syscall",
            Self::LinuxSyscall => "linux-syscall",
            Self::LinuxForkExec => "linux-fork-exec",
        }
    }

    /// Decodes the number.
    #[must_use]
    pub fn from_raw(raw: u64) -> Option<Self> {
        Self::ALL
            .into_iter()
            .chain(Self::LINUX)
            .find(|b| *b as u64 == raw)
    }

    /// Looks a bench up by its name.
    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .chain(Self::LINUX)
            .find(|b| b.name() == name)
    }

    /// Operations the guest measures in this window.
    #[must_use]
    pub const fn calls(self) -> u64 {
        match self {
            Self::InvokeNull => NULL_CALLS,
            Self::InvokeSyscall => SYSCALLS,
            Self::LinuxSyscall => LINUX_SYSCALL_OPS,
            Self::LinuxForkExec => LINUX_FORK_EXECS,
        }
    }
}

/// Iterations of the linux-syscall loop (two system calls each: 2,000 events, under the ring's size,
/// which an in-box window without exits cannot drain).
pub const LINUX_SYSCALL_OPS: u64 = 1_000;
/// Iterations of the linux-fork-exec loop.
pub const LINUX_FORK_EXECS: u64 = 20;
/// How the Linux benchmark program marks its windows: a line on port 0xE9, `PREFIX begin NAME` before
/// and `PREFIX end NAME OPS TSC` after (TSC: its own time stamp counter delta over the loop).
pub const LINUX_MARK_PREFIX: &str = "ihmi-bench: ";

/// Null requests in the invoke-null window.
pub const NULL_CALLS: u64 = 20_000;
/// System calls in the invoke-syscall window (under the ring's size, so no event is dropped).
pub const SYSCALLS: u64 = 2_000;
