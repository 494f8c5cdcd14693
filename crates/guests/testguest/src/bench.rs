//! The invocation benchmark, guest side: two windows, each marked for L0 with the `Bench` hypercall.
//! The guest's time stamp counter counts retired instructions under Bochs (`clock: sync=none`), so
//! the deltas it reports are instruction counts, not time.

use ihmi_abi::bench::{Bench, NULL_CALLS, SYSCALLS};
use ihmi_abi::monitor::RequestCode;
use ihmi_abi::Hypercall;

use crate::hypercall::hypercall;
use crate::{hooks, process, say};

/// Program number of `bench` in `process::PROGRAMS`.
const BENCH_PROGRAM: usize = 3;

fn mark(bench: Bench, end: bool, tsc: u64, calls: u64) {
    let _ = hypercall(
        Hypercall::Bench as u64,
        [bench as u64, u64::from(end), tsc, calls],
    );
}

/// Runs both windows; 0 when each ran as it must (L0 judges the counts).
pub fn run() -> u64 {
    // invoke-null: the kernel calls the monitor with a null request (without a monitor: the hook site
    // finds none and returns).
    mark(Bench::InvokeNull, false, 0, 0);
    let t0 = ihmi_rt::cpu::rdtsc();
    let mut refused = 0u64;
    for _ in 0..NULL_CALLS {
        let v = hooks::call(RequestCode::Null, [0; 4]);
        if core::hint::black_box(v).is_some_and(|v| v != ihmi_abi::monitor::Verdict::Allow) {
            refused += 1;
        }
    }
    let t1 = ihmi_rt::cpu::rdtsc();
    mark(Bench::InvokeNull, true, t1 - t0, NULL_CALLS);

    // invoke-syscall: a user process makes getpid calls and measures them itself (its exit code is
    // its own TSC delta over the loop), each one hooked into the monitor.
    process::init();
    mark(Bench::InvokeSyscall, false, 0, 0);
    let result = process::run_init(BENCH_PROGRAM, SYSCALLS);
    let Ok(tsc) = result else {
        say!("bench: could not run the bench process: {result:?}");
        return 1;
    };
    mark(Bench::InvokeSyscall, true, tsc, SYSCALLS);
    say!("bench: done ({refused} null requests refused)");
    u64::from(refused != 0)
}
