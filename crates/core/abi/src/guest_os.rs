//! The test guest's kernel ABI: its system calls and the layout of its process record. The monitor
//! introspects these structures from outside the guest's trust, exactly as it will read Linux's
//! `task_struct` from offsets found in `System.map`/BTF; here the offsets come from this one definition.

/// `write(buf, len)`: prints user bytes on the console. Returns the length written.
pub const SYS_WRITE: u64 = 1;
/// `getpid()`.
pub const SYS_GETPID: u64 = 39;
/// `spawn(program)`: creates a child process running program number `program`, runs it to completion,
/// and returns its pid, or a negative error (`-EPERM` if the monitor's policy refused it).
pub const SYS_SPAWN: u64 = 57;
/// `exit(code)`: ends the calling process.
pub const SYS_EXIT: u64 = 60;
/// Error return of `spawn` when creation was refused.
pub const EPERM: i64 = -1;
/// Error return of an unknown system call.
pub const ENOSYS: i64 = -38;

/// Length of a process name, NUL-padded.
pub const COMM_LEN: usize = 16;

/// Byte offsets inside the guest's process record (`#[repr(C)]` in the guest; fixed here for readers).
pub mod process_layout {
    /// `u32` process id.
    pub const PID: u64 = 0;
    /// `u32` parent process id (0 for the first process).
    pub const PPID: u64 = 4;
    /// `[u8; COMM_LEN]` name.
    pub const COMM: u64 = 8;
    /// `u64` page-table root (CR3) of the process.
    pub const CR3: u64 = 24;
    /// Size of the record.
    pub const SIZE: u64 = 32;
}
