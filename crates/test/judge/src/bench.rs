//! The benchmark windows, as L0 counts them. The guest marks the start and end of each
//! window with the `Bench` hypercall; L0 counts the VM exits and monitor invocations in between, and
//! the guest's time stamp counter (which counts retired instructions under Bochs's `sync=none`) gives
//! the instructions. The cost model that turns counts into cycles lives in the host CLI, in one place.
//!
//! The scenario verdict checks only structure, never time: in-box and no-monitor windows make no VM
//! exit at all, out-of-box ones exactly two per monitor invocation.

use core::fmt::Write;

use ihmi_abi::bench::{Bench, LINUX_MARK_PREFIX};
use ihmi_abi::monitor::Mode;
use ihmi_hv::BenchMark;
use ihmi_wire::{BenchLine, BenchStart, BenchWindow, Json, Text};

/// What L0 counts besides the guest's exits at a mark.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MonitorCounts {
    /// Exits of the out-of-box monitor VM.
    pub monitor_vm_exits: u64,
    /// Calls of the monitor's entry point.
    pub invocations: u64,
}

/// What the in-hypervisor monitor counted of its hooks (its `IHMI_HOOK_COUNTS`: ticks handling KVM
/// exits, mappings checked, ticks on those), and the VMFUNCs and CR3 loads of one pass through its
/// gate in the box (none out of the box).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HookCounts {
    pub hook_counts: [u64; 3],
    pub gate_switches: [u64; 2],
}

/// One finished window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BenchResult {
    /// The window.
    pub bench: Bench,
    /// Calls the guest measured.
    pub calls: u64,
    /// The guest's TSC delta over them: instructions retired, each VM transition counting one.
    pub tsc: u64,
    /// VM exits in the window (the guest's and the monitor VM's), the marks' own left out.
    pub exits: u64,
    /// Monitor invocations in the window.
    pub invocations: u64,
}

impl Default for BenchResult {
    fn default() -> Self {
        Self {
            bench: Bench::InvokeNull,
            calls: 0,
            tsc: 0,
            exits: 0,
            invocations: 0,
        }
    }
}

/// Why a benchmark run's structure is wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchFault {
    /// A window never finished.
    Missing(Bench),
    /// The guest measured another number of calls.
    Calls { bench: Bench, got: u64 },
    /// Fewer monitor invocations than calls with a monitor, or some without one.
    Invocations { bench: Bench, got: u64 },
    /// VM exits where the mode must make none, or not exactly two per out-of-box invocation.
    Exits { bench: Bench, got: u64 },
}

/// What a benchmark line says besides the counts: the mode, and what one invocation costs in view
/// and address-space switches (counted in the gate's code when L0 loaded the monitor).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BenchContext {
    /// How the guest reaches the monitor.
    pub mode: Mode,
    /// VMFUNCs and CR3 loads per pass through the gate (in the box; 0 otherwise).
    pub vmfuncs: u64,
    pub cr3_loads: u64,
}

/// The benchmark windows of one run: the open one's start, and the context of its lines.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Windows {
    ctx: BenchContext,
    open: Option<(BenchMark, MonitorCounts)>,
}

impl Windows {
    pub(crate) const fn new(ctx: BenchContext) -> Self {
        Self { ctx, open: None }
    }

    /// A mark: a start opens a window (and says so on `out`), an end closes the open window of the
    /// same benchmark and reports it as one `bench|` JSON line. An end with no matching start (which
    /// only a guest's debug-port line can make; the hypercall refuses one) is said and ignored.
    pub(crate) fn mark(
        &mut self,
        mark: BenchMark,
        counts: MonitorCounts,
        out: &mut dyn Write,
    ) -> Option<BenchResult> {
        if !mark.end {
            self.open = Some((mark, counts));
            let start = BenchLine::Start(BenchStart {
                start: Text::Str(mark.bench.name()),
            });
            let _ = writeln!(out, "bench| {}", Json(&start));
            return None;
        }
        let Some(start) = self.open.take().filter(|(s, _)| s.bench == mark.bench) else {
            let _ = writeln!(
                out,
                "bench: the end of window {} without its start is ignored",
                mark.bench.name()
            );
            return None;
        };
        let r = window(start, (mark, counts));
        // Out of the box, two VMCS switches (to the monitor VM and back) per invocation.
        let vmcs_switches = if self.ctx.mode == Mode::OutBox { 2 } else { 0 };
        let line = BenchLine::Window(BenchWindow {
            bench: Text::Str(r.bench.name()),
            mode: Text::Str(self.ctx.mode.name()),
            calls: r.calls,
            tsc: r.tsc,
            exits: r.exits,
            invocations: r.invocations,
            vmfuncs_per_invocation: self.ctx.vmfuncs,
            cr3_loads_per_invocation: self.ctx.cr3_loads,
            vmcs_switches_per_invocation: vmcs_switches,
        });
        let _ = writeln!(out, "bench| {}", Json(&line));
        Some(r)
    }
}

/// The window between two marks.
#[must_use]
pub fn window(start: (BenchMark, MonitorCounts), end: (BenchMark, MonitorCounts)) -> BenchResult {
    let (s, sm) = start;
    let (e, em) = end;
    // The end mark's own exit is counted in `e.guest_exits`; the start mark's in `s.guest_exits`.
    let guest = e
        .guest_exits
        .saturating_sub(s.guest_exits)
        .saturating_sub(1);
    BenchResult {
        bench: e.bench,
        calls: e.calls,
        tsc: e.tsc,
        exits: guest + em.monitor_vm_exits.saturating_sub(sm.monitor_vm_exits),
        invocations: em.invocations.saturating_sub(sm.invocations),
    }
}

/// A Linux benchmark mark, from a complete line the guest wrote on port 0xE9 (without its newline);
/// `exits` is the guest's exit count so far, the newline's own exit included. Each byte of the line
/// was an exit of its own: at the end mark they happened inside the window and are taken out, so the
/// window counts only the loop's exits (the newline's is the mark's own, which [`window`] leaves out).
#[must_use]
pub fn parse_linux_mark(line: &[u8], exits: u64) -> Option<BenchMark> {
    let text = core::str::from_utf8(line).ok()?;
    let mut words = text.strip_prefix(LINUX_MARK_PREFIX)?.split(' ');
    let phase = words.next()?;
    let bench = Bench::from_name(words.next()?).filter(|b| Bench::LINUX.contains(b))?;
    let mark = match phase {
        "begin" => BenchMark {
            bench,
            end: false,
            tsc: 0,
            calls: 0,
            guest_exits: exits,
        },
        "end" => BenchMark {
            bench,
            end: true,
            calls: words.next()?.parse().ok()?,
            tsc: words.next()?.parse().ok()?,
            guest_exits: exits.saturating_sub(line.len() as u64),
        },
        _ => return None,
    };
    words.next().is_none().then_some(mark)
}

/// The window of `bench`, which must have measured the operations the guest program makes.
fn finished(bench: Bench, results: &[BenchResult]) -> Result<&BenchResult, BenchFault> {
    let r = results
        .iter()
        .find(|r| r.bench == bench)
        .ok_or(BenchFault::Missing(bench))?;
    if r.calls == bench.calls() {
        Ok(r)
    } else {
        Err(BenchFault::Calls {
            bench,
            got: r.calls,
        })
    }
}

/// The structural verdict on a Linux benchmark run in `mode`: both windows with the operations the
/// program measured; no monitor invocation without a monitor, and with one at least one per system
/// call of the system-call loop (two per operation) and one exec event per fork-exec; no exit in the
/// system-call loop but the out-of-box monitor's two per invocation. (The fork-exec loop's new
/// processes make exits of their own, CPUID in the C library's start-up, in every mode.)
pub fn check_linux(mode: Mode, results: &[BenchResult]) -> Result<(), BenchFault> {
    for bench in Bench::LINUX {
        let r = finished(bench, results)?;
        let per_op = if bench == Bench::LinuxSyscall { 2 } else { 1 };
        let invocations_ok = match mode {
            Mode::None => r.invocations == 0,
            Mode::InBox | Mode::OutBox => r.invocations >= per_op * r.calls,
        };
        if !invocations_ok {
            return Err(BenchFault::Invocations {
                bench,
                got: r.invocations,
            });
        }
        let exits_ok = match (bench, mode) {
            (Bench::LinuxSyscall, Mode::None | Mode::InBox) => r.exits == 0,
            (Bench::LinuxSyscall, Mode::OutBox) => r.exits == 2 * r.invocations,
            (_, Mode::OutBox) => r.exits >= 2 * r.invocations,
            _ => true,
        };
        if !exits_ok {
            return Err(BenchFault::Exits {
                bench,
                got: r.exits,
            });
        }
    }
    Ok(())
}

/// The structural verdict on one benchmark run in `mode`.
pub fn check(mode: Mode, results: &[BenchResult]) -> Result<(), BenchFault> {
    for bench in Bench::ALL {
        let r = finished(bench, results)?;
        let invocations_ok = match mode {
            Mode::None => r.invocations == 0,
            Mode::InBox | Mode::OutBox => r.invocations >= r.calls,
        };
        if !invocations_ok {
            return Err(BenchFault::Invocations {
                bench,
                got: r.invocations,
            });
        }
        let exits_ok = match mode {
            Mode::None | Mode::InBox => r.exits == 0,
            Mode::OutBox => r.exits == 2 * r.invocations,
        };
        if !exits_ok {
            return Err(BenchFault::Exits {
                bench,
                got: r.exits,
            });
        }
    }
    Ok(())
}

/// The `nested|` line of a run with nested VMX (for `ihmi bench --nested`), from L0's counts.
pub fn nested_line(
    stats: &ihmi_hv::nested::run::NestedStats,
    shadowing: bool,
    monitor: MonitorCounts,
    kvm_exits_served: u64,
    hooks: HookCounts,
    out: &mut impl core::fmt::Write,
) {
    let line = ihmi_wire::NestedLine {
        l2_exits: stats.l2_exits,
        reflected: stats.reflected,
        round_trips: stats.round_trips,
        round_trip_exits: stats.round_trip_total,
        round_trip_max: stats.round_trip_max,
        vmread_vmwrite: stats.round_trip_vmread_vmwrite,
        other: stats.round_trip_other,
        cpuid_round_trips: stats.cpuid_round_trips,
        cpuid_round_trip_exits: stats.cpuid_round_trip_total,
        cpuid_round_trip_max: stats.cpuid_round_trip_max,
        page_fault_round_trips: stats.page_fault_round_trips,
        page_fault_round_trip_exits: stats.page_fault_round_trip_total,
        shadowing,
        monitor_invocations: monitor.invocations,
        kvm_exits_served,
        monitor_vm_exits: monitor.monitor_vm_exits,
        kvm_exit_ticks: hooks.hook_counts[0],
        l2_maps_checked: hooks.hook_counts[1],
        l2_map_ticks: hooks.hook_counts[2],
        gate_vmfuncs: hooks.gate_switches[0],
        gate_cr3_loads: hooks.gate_switches[1],
    };
    let _ = writeln!(out, "nested| {}", ihmi_wire::Json(&line));
}

#[cfg(test)]
mod tests {
    use super::*;

    use ihmi_abi::bench::{NULL_CALLS, SYSCALLS};

    fn mark(bench: Bench, end: bool, guest_exits: u64) -> BenchMark {
        BenchMark {
            bench,
            end,
            tsc: 1000,
            calls: bench.calls(),
            guest_exits,
        }
    }

    #[test]
    fn linux_marks_leave_their_own_bytes_out_of_the_window() {
        let begin = parse_linux_mark(b"ihmi-bench: begin linux-syscall", 100).unwrap();
        assert_eq!(
            (begin.bench, begin.end, begin.guest_exits),
            (Bench::LinuxSyscall, false, 100)
        );
        let line = b"ihmi-bench: end linux-syscall 1000 123456";
        // The loop made no exit: 100 at the start, then the end line's bytes and its newline.
        let end = parse_linux_mark(line, 100 + line.len() as u64 + 1).unwrap();
        assert_eq!((end.calls, end.tsc), (1000, 123_456));
        let r = window(
            (begin, MonitorCounts::default()),
            (end, MonitorCounts::default()),
        );
        assert_eq!(r.exits, 0);
        for bad in [
            &b"ihmi-bench: end linux-syscall 1000"[..],
            b"ihmi-bench: begin invoke-null",
            b"ihmi-bench: middle linux-syscall",
            b"ihmi-bench: begin linux-syscall extra",
            b"bench: begin linux-syscall",
        ] {
            assert_eq!(parse_linux_mark(bad, 5), None, "{bad:?}");
        }
    }

    #[test]
    fn linux_structure_per_mode() {
        let r = |bench: Bench, exits: u64, invocations: u64| BenchResult {
            bench,
            calls: bench.calls(),
            tsc: 1,
            exits,
            invocations,
        };
        let ops = Bench::LinuxSyscall.calls();
        let forks = Bench::LinuxForkExec.calls();
        let none = [r(Bench::LinuxSyscall, 0, 0), r(Bench::LinuxForkExec, 60, 0)];
        assert_eq!(check_linux(Mode::None, &none), Ok(()));
        let inbox = [
            r(Bench::LinuxSyscall, 0, 2 * ops),
            r(Bench::LinuxForkExec, 60, 40 * forks),
        ];
        assert_eq!(check_linux(Mode::InBox, &inbox), Ok(()));
        assert!(check_linux(Mode::None, &inbox).is_err());
        let outbox = [
            r(Bench::LinuxSyscall, 4 * ops, 2 * ops),
            r(Bench::LinuxForkExec, 60 + 80 * forks, 40 * forks),
        ];
        assert_eq!(check_linux(Mode::OutBox, &outbox), Ok(()));
        let an_exit_in_the_loop = [r(Bench::LinuxSyscall, 1, 2 * ops), inbox[1]];
        assert!(matches!(
            check_linux(Mode::InBox, &an_exit_in_the_loop),
            Err(BenchFault::Exits { .. })
        ));
        assert_eq!(
            check_linux(Mode::InBox, &inbox[..1]),
            Err(BenchFault::Missing(Bench::LinuxForkExec))
        );
    }

    fn result(bench: Bench, exits: u64, invocations: u64) -> BenchResult {
        let start = (mark(bench, false, 10), MonitorCounts::default());
        let end = (
            mark(bench, true, 11 + exits / 2),
            MonitorCounts {
                monitor_vm_exits: exits - exits / 2,
                invocations,
            },
        );
        window(start, end)
    }

    #[test]
    fn windows_leave_out_the_marks_and_add_the_monitor_vm() {
        let r = result(Bench::InvokeNull, 0, NULL_CALLS);
        assert_eq!((r.exits, r.invocations, r.tsc), (0, NULL_CALLS, 1000));
        let r = result(Bench::InvokeNull, 2 * NULL_CALLS, NULL_CALLS);
        assert_eq!(r.exits, 2 * NULL_CALLS);
    }

    #[test]
    fn structure_per_mode() {
        let inbox = [
            result(Bench::InvokeNull, 0, NULL_CALLS),
            result(Bench::InvokeSyscall, 0, SYSCALLS + 2),
        ];
        assert_eq!(check(Mode::InBox, &inbox), Ok(()));
        assert!(matches!(
            check(Mode::OutBox, &inbox),
            Err(BenchFault::Exits { .. })
        ));
        assert!(matches!(
            check(Mode::None, &inbox),
            Err(BenchFault::Invocations { .. })
        ));
        let outbox = [
            result(Bench::InvokeNull, 2 * NULL_CALLS, NULL_CALLS),
            result(Bench::InvokeSyscall, 2 * (SYSCALLS + 2), SYSCALLS + 2),
        ];
        assert_eq!(check(Mode::OutBox, &outbox), Ok(()));
        let one_exit_more = [
            outbox[0],
            result(Bench::InvokeSyscall, 2 * SYSCALLS + 5, SYSCALLS + 2),
        ];
        assert!(matches!(
            check(Mode::OutBox, &one_exit_more),
            Err(BenchFault::Exits { .. })
        ));
        assert_eq!(
            check(Mode::InBox, &inbox[..1]),
            Err(BenchFault::Missing(Bench::InvokeSyscall))
        );
    }
}
