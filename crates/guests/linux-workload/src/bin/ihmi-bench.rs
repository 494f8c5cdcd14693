//! The Linux overhead benchmark's guest side (`ihmi bench --linux`): two loops, each between two marks
//! on port 0xE9 that L0 turns into a window (`ihmi_judge::bench::parse_linux_mark`):
//! - linux-syscall: `getpid` and a 64-byte `read` of /dev/zero, `LINUX_SYSCALL_OPS` times;
//! - linux-fork-exec: `fork`, `execv("/bin/true")` in the child, `waitpid` in the parent,
//!   `LINUX_FORK_EXECS` times.
//!
//! Each end mark carries this process's own time stamp counter delta over the loop, which under
//! Bochs's `sync=none` counts retired instructions (the marks themselves are outside it).

use std::ffi::CString;
use std::fs::File;
use std::io::Read;
use std::process::ExitCode;

use ihmi_abi::bench::{Bench, LINUX_MARK_PREFIX};
use ihmi_linux_workload::DebugPort;

fn tsc() -> u64 {
    // SAFETY: RDTSC has no side effects; Linux leaves it enabled in user mode.
    unsafe { core::arch::x86_64::_rdtsc() }
}

fn syscalls() -> Result<u64, String> {
    let mut zero = File::open("/dev/zero").map_err(|e| format!("/dev/zero: {e}"))?;
    let mut buf = [0u8; 64];
    let t0 = tsc();
    for _ in 0..Bench::LinuxSyscall.calls() {
        // SAFETY: getpid takes no arguments and cannot fail; the raw call keeps the C library from
        // answering it without the kernel.
        unsafe { libc::syscall(libc::SYS_getpid) };
        zero.read_exact(&mut buf)
            .map_err(|e| format!("read /dev/zero: {e}"))?;
    }
    Ok(tsc() - t0)
}

fn fork_execs() -> Result<u64, String> {
    let path = CString::new("/bin/true").map_err(|e| e.to_string())?;
    let argv = [path.as_ptr(), core::ptr::null()];
    let t0 = tsc();
    for _ in 0..Bench::LinuxForkExec.calls() {
        // SAFETY: the child only calls execv and _exit, both async-signal-safe, with memory prepared
        // before the fork.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(format!("fork: {}", std::io::Error::last_os_error()));
        }
        if pid == 0 {
            // SAFETY: a NUL-terminated path and a NULL-terminated argv, both alive.
            unsafe { libc::execv(path.as_ptr(), argv.as_ptr()) };
            // SAFETY: execv failed; leave the child without running the parent's exit handlers.
            unsafe { libc::_exit(127) };
        }
        let mut status = 0;
        // SAFETY: waits for the child just forked; `status` is a valid out-pointer.
        if unsafe { libc::waitpid(pid, &mut status, 0) } != pid {
            return Err(format!("waitpid: {}", std::io::Error::last_os_error()));
        }
        if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
            return Err(format!("/bin/true ended with status {status:#x}"));
        }
    }
    Ok(tsc() - t0)
}

fn run() -> Result<(), String> {
    let port = DebugPort::open().map_err(|e| format!("port 0xE9: {e}"))?;
    for (bench, body) in [
        (Bench::LinuxSyscall, syscalls as fn() -> Result<u64, String>),
        (Bench::LinuxForkExec, fork_execs),
    ] {
        let name = bench.name();
        port.line(&format!("{LINUX_MARK_PREFIX}begin {name}"));
        let delta = body()?;
        port.line(&format!(
            "{LINUX_MARK_PREFIX}end {name} {} {delta}",
            bench.calls()
        ));
        println!(
            "ihmi-bench: {name}: {} operations, {delta} TSC ticks",
            bench.calls()
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ihmi-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
