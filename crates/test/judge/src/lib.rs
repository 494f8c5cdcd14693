#![doc = include_str!("../README.md")]
#![no_std]
#![deny(unsafe_code)]

pub mod attacks;
pub mod bench;
pub mod scenario;
pub mod setup;

#[cfg(test)]
mod tests;

use core::fmt::{self, Write};

use ihmi_abi::Scenario;
use ihmi_addr::Gpa;
use ihmi_hv::{ExitCounters, Observation, Observer, RegionKind};
use ihmi_monitor::Event;

pub use attacks::{AttackContext, AttackOutcome, MonitorAudit};
pub use bench::{BenchContext, MonitorCounts};
pub use scenario::{judge_entry_failure, EntryFailure, FailReason, ScenarioLog, Verdict};

/// What L0 knows about the run that the observations do not say, for the verdict.
#[derive(Clone, Copy, Debug)]
pub struct Facts<'a> {
    /// The frame L0 handed the test guest as a probe (the `ept-guard` scenario reads it), and what
    /// L0's own memory map says it is.
    pub probe: Gpa,
    pub probe_region: Option<RegionKind>,
    /// For a run with a monitor: how L0 found it after the run. Every such run must leave it intact.
    pub monitor: Option<MonitorAudit>,
    /// For an attack run: where the monitor's parts are, and the same audit.
    pub attack: Option<AttackContext<'a>>,
}

/// The judge of one scenario run: it keeps what the exit policy and the monitor reported, counts
/// the benchmark windows, and gives the verdict at the end.
#[derive(Debug)]
pub struct Judge {
    scenario: Scenario,
    /// What was observed.
    pub log: ScenarioLog,
    bench: bench::Windows,
}

impl Judge {
    /// A judge for `scenario`; `bench` says what a benchmark line reports besides the counts.
    #[must_use]
    pub fn new(scenario: Scenario, bench: BenchContext) -> Self {
        Self {
            scenario,
            log: ScenarioLog::default(),
            bench: bench::Windows::new(bench),
        }
    }

    /// The scenario judged.
    #[must_use]
    pub const fn scenario(&self) -> Scenario {
        self.scenario
    }

    /// The observer for one exit: observations go into the log; a benchmark mark is counted with
    /// `counts` (the monitor's counts at this exit) and reported as a `bench|` line on `out`.
    pub fn observer<'a>(
        &'a mut self,
        counts: MonitorCounts,
        out: &'a mut dyn Write,
    ) -> ExitObserver<'a> {
        ExitObserver {
            judge: self,
            counts,
            out,
        }
    }

    /// An event L0 drained from the monitor's ring.
    pub fn record_monitor_event(&mut self, event: &Event) {
        self.log.record_monitor_event(event);
    }

    /// How the guest ended, when L0 ended it itself (the exit policy's ends are observed).
    pub fn record_end(&mut self, end: ihmi_hv::GuestEnd) {
        self.log.end = Some(end);
    }

    /// The monitor ring's own count of the events it dropped.
    pub fn set_monitor_dropped(&mut self, dropped: u64) {
        self.log.monitor_dropped = dropped;
    }

    /// What the monitor reported of the kernel's linear mappings at the end of the run
    /// ([`ScenarioLog::linear_reads`]).
    pub fn set_linear_reads(&mut self, found: Option<[u64; 2]>) {
        self.log.linear_reads = found;
    }

    /// The verdict on the finished run. An attack scenario also reports its `attack|` line on `out`.
    pub fn verdict(
        &self,
        counters: &ExitCounters,
        facts: &Facts<'_>,
        out: &mut dyn Write,
    ) -> Verdict {
        if let Some(attack) = self.scenario.attack() {
            let Some(ctx) = &facts.attack else {
                return Verdict::Fail(FailReason::NoMonitor);
            };
            let outcome = attacks::judge_attack(attack, &self.log, ctx);
            let _ = writeln!(out, "attack| {}", attacks::AttackLine(&outcome, &self.log));
            return if outcome.passed() {
                Verdict::Pass
            } else {
                Verdict::Fail(FailReason::Attack(outcome))
            };
        }
        if let Some(audit) = facts.monitor {
            if !(audit.image_intact && audit.ring_consistent) {
                return Verdict::Fail(FailReason::MonitorChanged(audit));
            }
        }
        scenario::judge(
            self.scenario,
            &self.log,
            counters,
            facts.probe,
            facts.probe_region,
        )
    }
}

/// [`Judge::observer`]: records one exit's observations.
pub struct ExitObserver<'a> {
    judge: &'a mut Judge,
    counts: MonitorCounts,
    out: &'a mut dyn Write,
}

impl fmt::Debug for ExitObserver<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExitObserver")
            .field("counts", &self.counts)
            .finish_non_exhaustive()
    }
}

impl Observer for ExitObserver<'_> {
    fn observe(&mut self, observation: Observation<'_>) {
        let mark = match observation {
            Observation::BenchMark(m) => Some(m),
            // The Linux benchmark program marks its windows with lines on the debug port.
            Observation::DebugLine { line, exits }
                if matches!(self.judge.scenario, Scenario::LinuxBench(_)) =>
            {
                bench::parse_linux_mark(line, exits)
            }
            _ => None,
        };
        self.judge.log.record(&observation);
        if let Some(mark) = mark {
            if let Some(result) = self.judge.bench.mark(mark, self.counts, self.out) {
                self.judge.log.record_bench(result);
            }
        }
    }
}
