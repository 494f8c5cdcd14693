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
}

impl Bench {
    /// Both, in the order the guest runs them.
    pub const ALL: [Bench; 2] = [Self::InvokeNull, Self::InvokeSyscall];

    /// The name in reports.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::InvokeNull => "invoke-null",
            Self::InvokeSyscall => "invoke-syscall",
        }
    }

    /// Decodes the number.
    #[must_use]
    pub fn from_raw(raw: u64) -> Option<Self> {
        Self::ALL.into_iter().find(|b| *b as u64 == raw)
    }
}

/// Null requests in the invoke-null window.
pub const NULL_CALLS: u64 = 20_000;
/// System calls in the invoke-syscall window (under the ring's size, so no event is dropped).
pub const SYSCALLS: u64 = 2_000;
