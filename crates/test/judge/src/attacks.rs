//! Judging the attack suite: for each attack of BRIEF.md §4, was it blocked, was it reported, and is
//! the monitor intact? L0 prints the answer as one `attack|` JSON line and passes the scenario only when
//! all three hold.

use core::fmt;

use ihmi_abi::attack::{Attack, FLOOD_REQUESTS, FORGED_REQUEST};
use ihmi_abi::monitor::Verdict as MonitorVerdict;
use ihmi_addr::{Gpa, GpaRange};
use ihmi_arch::msr::IA32_LSTAR;
use ihmi_monitor::{EventKind, RejectReason};

use ihmi_ept::ViewId;
use ihmi_hv::guard::views::{GUEST_VIEW, MONITOR_VIEW};
use ihmi_hv::{Alert, GuestEnd, RegionKind};

use ihmi_wire::Text;

use crate::ScenarioLog;

/// What L0 measured of the monitor after the attack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MonitorAudit {
    /// The checksum of the monitor's code, configuration and page tables equals the one taken at load.
    pub image_intact: bool,
    /// The event ring's counters are consistent.
    pub ring_consistent: bool,
}

/// Where things are, for telling which frame an attack hit.
#[derive(Clone, Copy, Debug)]
pub struct AttackContext<'a> {
    /// The gate frame.
    pub gate: GpaRange,
    /// The guest kernel's code (where hooks live).
    pub guest_code: &'a [GpaRange],
    /// The hooks' gate pointer, guest-physical.
    pub hook: Option<Gpa>,
    /// The monitor, as L0 found it afterwards.
    pub audit: MonitorAudit,
}

/// The verdict on one attack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttackOutcome {
    /// The attack.
    pub attack: Attack,
    /// The attack did not get what it wanted.
    pub blocked: bool,
    /// L0 or the monitor reported it.
    pub reported: bool,
    /// The monitor's code, configuration, page tables and event stream are intact.
    pub monitor_intact: bool,
}

impl AttackOutcome {
    /// All three hold.
    #[must_use]
    pub const fn passed(&self) -> bool {
        self.blocked && self.reported && self.monitor_intact
    }
}

/// What each defence rests on, in one sentence (shown in the report's detail).
#[must_use]
pub const fn defence(attack: Attack) -> &'static str {
    match attack {
        Attack::ForgedPte => "monitor frames are not present in view 0, whatever the guest's page tables say",
        Attack::Cr3Switch => "the monitor's page tables are not present in view 0, so the walk faults in EPT",
        Attack::VmfuncOutsideGate => "guest memory is not executable in view 1; only the gate page is",
        Attack::VmfuncBadIndex => "the EPTP list holds only the two views; other indexes exit to L0, which injects #UD",
        Attack::GateMiddle => "the entry gate loads CR3 and the stack from immediates and the checkpoint validates every request; the exit gate grants nothing in view 0",
        Attack::HookOverwrite => "the guest kernel's code is read + execute only in view 0",
        Attack::GateOverwrite => "the gate frame is read + execute only in view 0",
        Attack::GateRemap => "a remapped gate runs VMFUNC from guest memory, which view 1 does not execute",
        Attack::LstarRedirect => "L0 intercepts WRMSR to IA32_LSTAR and refuses to move the locked entry",
        Attack::TrapInMonitor => "exceptions taken in view 1 are delivered to guest handlers that view 1 does not execute",
        Attack::EventFlood => "past its high-water mark the monitor has L0 drain the ring (one exit per 3,072 events), so nothing is lost; a drop would be counted and show as a sequence gap",
        Attack::EventForge => "the event ring lives in monitor frames, absent from view 0",
        Attack::HookStarve => "the hooks' gate pointer sits in read + execute kernel text, and L0 audits it at every exit",
    }
}

struct Ept {
    gpa: Gpa,
    region: Option<RegionKind>,
    view: Option<ViewId>,
    read: bool,
    write: bool,
    fetch: bool,
    rip: u64,
}

fn ept_end(log: &ScenarioLog) -> Option<Ept> {
    match log.end? {
        GuestEnd::EptViolation {
            gpa,
            region,
            view,
            qualification,
            rip,
            ..
        } => Some(Ept {
            gpa,
            region,
            view,
            read: qualification.read(),
            write: qualification.write(),
            fetch: qualification.fetch(),
            rip,
        }),
        _ => None,
    }
}

fn contains(r: &GpaRange, gpa: Gpa) -> bool {
    r.contains(gpa)
}

fn done_zero(log: &ScenarioLog) -> bool {
    log.end == Some(GuestEnd::Done(0))
}

/// Every drained event is well formed and the sequence numbers run on with no gap but the counted drops.
fn stream_intact(log: &ScenarioLog) -> bool {
    let events = log.monitor_events();
    let well_formed = events.iter().all(|e| e.kind().is_some());
    let gaps: u64 = events
        .windows(2)
        .map(|w| w[1].seq.wrapping_sub(w[0].seq).wrapping_sub(1))
        .sum();
    let starts_at_zero = events.first().is_none_or(|e| e.seq == 0);
    well_formed && starts_at_zero && gaps <= log.monitor_dropped
}

/// Judges one attack run.
#[must_use]
pub fn judge_attack(attack: Attack, log: &ScenarioLog, ctx: &AttackContext<'_>) -> AttackOutcome {
    let ept = ept_end(log);
    let in_view = |v: ViewId| ept.as_ref().is_some_and(|e| e.view == Some(v));
    // An EPT violation is blocked and reported at once: the access never happened, and L0 printed it.
    let (blocked, reported) = match attack {
        Attack::ForgedPte => {
            let hit = ept.as_ref().is_some_and(|e| {
                e.region == Some(RegionKind::Monitor) && e.read && in_view(GUEST_VIEW)
            });
            (hit, hit)
        }
        Attack::Cr3Switch | Attack::EventForge => {
            let write_needed = attack == Attack::EventForge;
            let hit = ept.as_ref().is_some_and(|e| {
                e.region == Some(RegionKind::Monitor)
                    && in_view(GUEST_VIEW)
                    && (!write_needed || e.write)
                    && !contains(&ctx.gate, e.gpa)
            });
            (hit, hit)
        }
        Attack::VmfuncOutsideGate | Attack::GateRemap => {
            let hit = ept.as_ref().is_some_and(|e| {
                e.fetch && e.region == Some(RegionKind::GuestRam) && in_view(MONITOR_VIEW)
            });
            (hit, hit)
        }
        Attack::TrapInMonitor => {
            let ept_hit = ept
                .as_ref()
                .is_some_and(|e| e.fetch && in_view(MONITOR_VIEW));
            let triple = matches!(
                log.end,
                Some(GuestEnd::TripleFault {
                    view: Some(MONITOR_VIEW),
                    ..
                })
            );
            (ept_hit || triple, ept_hit || triple)
        }
        Attack::VmfuncBadIndex => {
            let refused: usize = log
                .alerts()
                .iter()
                .filter(|a| matches!(a, Alert::VmfuncRefused { .. }))
                .count();
            (done_zero(log), refused >= 2)
        }
        Attack::GateMiddle => {
            let rejected = log.monitor_events().iter().any(|e| {
                e.kind() == Some(EventKind::Rejected)
                    && e.nr == FORGED_REQUEST
                    && e.verdict == MonitorVerdict::Rejected as i32
            });
            let exit_gate_stopped = ept
                .as_ref()
                .is_some_and(|e| in_view(GUEST_VIEW) && contains(&ctx.gate, Gpa::new(e.rip)));
            (rejected && exit_gate_stopped, rejected && exit_gate_stopped)
        }
        Attack::HookOverwrite => {
            let hit = ept.as_ref().is_some_and(|e| {
                e.write && in_view(GUEST_VIEW) && ctx.guest_code.iter().any(|r| contains(r, e.gpa))
            });
            (hit, hit)
        }
        Attack::GateOverwrite => {
            let hit = ept
                .as_ref()
                .is_some_and(|e| e.write && in_view(GUEST_VIEW) && contains(&ctx.gate, e.gpa));
            (hit, hit)
        }
        Attack::HookStarve => {
            let hook = ctx.hook;
            let ept_hit = ept.as_ref().is_some_and(|e| {
                e.write && hook.is_some_and(|h| h.align_down(8) == e.gpa.align_down(8))
            });
            let audit_hit = matches!(log.end, Some(GuestEnd::HookTampered { .. }));
            (ept_hit || audit_hit, ept_hit || audit_hit)
        }
        Attack::LstarRedirect => {
            let refused = log.alerts().iter().any(|a| {
                matches!(
                    a,
                    Alert::EntryMsrWriteRefused {
                        msr: IA32_LSTAR,
                        ..
                    }
                )
            });
            let still_hooked = log
                .monitor_events()
                .iter()
                .any(|e| e.kind() == Some(EventKind::Syscall));
            (done_zero(log) && still_hooked, refused)
        }
        Attack::EventFlood => {
            let drained = log.monitor_events();
            let all_forged = drained.iter().all(|e| {
                e.kind() == Some(EventKind::Rejected)
                    && e.nr == FORGED_REQUEST
                    && RejectReason::from_raw(e.detail) == Some(RejectReason::UnknownRequest)
            });
            let accounted = log.monitor_drained + log.monitor_dropped == FLOOD_REQUESTS;
            // Reported: every forged request is an event L0 drained, none lost (the monitor asked for
            // a drain at its high-water mark).
            (
                done_zero(log) && all_forged && accounted,
                log.monitor_dropped == 0 && log.ring_drains > 0 && accounted,
            )
        }
    };
    AttackOutcome {
        attack,
        blocked,
        reported,
        monitor_intact: ctx.audit.image_intact && ctx.audit.ring_consistent && stream_intact(log),
    }
}

/// The `attack|` line's JSON object for one outcome, with what the log says happened.
#[derive(Clone, Copy, Debug)]
pub struct AttackLine<'a>(pub &'a AttackOutcome, pub &'a ScenarioLog);

impl fmt::Display for AttackLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (outcome, log) = (self.0, self.1);
        let detail = Detail(outcome.attack, log);
        let line = ihmi_wire::AttackLine {
            attack: Text::Str(outcome.attack.name()),
            item: u64::from(outcome.attack.brief_item()),
            blocked: outcome.blocked,
            reported: outcome.reported,
            monitor_intact: outcome.monitor_intact,
            detail: Text::Display(&detail),
        };
        ihmi_wire::Json(&line).fmt(f)
    }
}

/// The line's `detail`: the defence, then what the log says happened.
struct Detail<'a>(Attack, &'a ScenarioLog);

impl fmt::Display for Detail<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let log = self.1;
        write!(f, "{}", defence(self.0))?;
        for alert in log.alerts() {
            write!(f, "; L0 alert {}", alert.name())?;
        }
        if log.monitor_dropped > 0 {
            write!(
                f,
                "; the monitor's ring dropped {} events",
                log.monitor_dropped
            )?;
        }
        let rejected = log.monitor_rejected;
        if rejected > 0 {
            write!(f, "; the monitor rejected {rejected} requests")?;
        }
        match &log.end {
            Some(end) => write!(f, "; {end}"),
            None => f.write_str("; the guest has not ended"),
        }
    }
}
