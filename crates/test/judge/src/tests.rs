//! The verdicts, fed the way L0 feeds them: exits through the exit policy with its recording mock,
//! monitor events straight into the log.

extern crate std;

use std::string::String;

use ihmi_abi::{CpuidRecord, Hypercall, Scenario, Status, BAD_HYPERCALL_CASES};
use ihmi_addr::Gpa;
use ihmi_hv::{Action, GuestEnd, Hypervisor, RegionKind};
use ihmi_hv_mock::{memory_with_l0_hole, MockPlatform, MockVcpu, L0_HOLE};
use ihmi_vmcs::ExitReason;

use crate::scenario::judge;
use crate::{BenchContext, FailReason, Judge, MonitorCounts, Verdict};

// Basic exit reasons (SDM Appendix C), as the VMCS reports them.
const EXIT_CPUID: u32 = 10;
const EXIT_VMCALL: u32 = 18;

/// One run: the exit policy, and the judge observing it.
struct Run {
    hv: Hypervisor,
    judge: Judge,
    /// What the judge printed (bench and attack lines).
    out: String,
}

impl Run {
    fn handle_exit(&mut self, v: &mut MockVcpu, p: &mut MockPlatform) -> Action {
        let mut obs = self.judge.observer(MonitorCounts::default(), &mut self.out);
        self.hv.handle_exit(v, p, &mut obs)
    }
}

fn hv(scenario: Scenario) -> Run {
    let m = memory_with_l0_hole();
    let ctx = BenchContext {
        mode: scenario.monitor_mode(),
        vmfuncs: 0,
        cr3_loads: 0,
    };
    Run {
        hv: Hypervisor::new(m),
        judge: Judge::new(scenario, ctx),
        out: String::new(),
    }
}

/// A Linux task as L0 reads it through the guest profile.
fn linux_task(pid: u32, ppid: u32, comm: &[u8]) -> ihmi_hv::linux::TaskInfo {
    let mut c = [0u8; 16];
    c[..comm.len()].copy_from_slice(comm);
    ihmi_hv::linux::TaskInfo {
        task: 0,
        pid,
        tgid: pid,
        ppid,
        comm: c,
    }
}

/// The compromised root of the Linux attack scenarios, as the running task.
fn attacker_task(pid: u32) -> ihmi_hv::linux::TaskInfo {
    linux_task(pid, 1, b"ihmi-attack")
}

/// A Linux run that ended the way /init ends it: a line on port 0xE9, then power-off by pid 1
/// `ihmi-poweroff`.
fn end_as_init_does(log: &mut crate::ScenarioLog) {
    log.debug_lines = 1;
    log.end = Some(GuestEnd::ShutdownRequest);
    log.end_task = Some(Ok(linux_task(1, 0, b"ihmi-poweroff")));
}

/// Guest page tables at 0x1000.. mapping GVA 0..1 GiB to GPA 0..1 GiB with 2 MiB pages.
fn platform_with_identity_paging() -> MockPlatform {
    let mut p = MockPlatform::default();
    p.write_u64(0x1000, 0x2000 | 0x3);
    p.write_u64(0x2000, 0x3000 | 0x3);
    for i in 0..512u64 {
        p.write_u64(0x3000 + i * 8, (i << 21) | 0x83);
    }
    p
}

fn vmcall(nr: u64, args: [u64; 4]) -> MockVcpu {
    let mut v = MockVcpu::exited(EXIT_VMCALL, 0x10_0000, 3);
    v.regs.rax = nr;
    v.regs.rbx = args[0];
    v.regs.rcx = args[1];
    v.regs.rdx = args[2];
    v.regs.rsi = args[3];
    v
}

#[test]
fn boot_verdict_requires_matching_cpuid_reports() {
    let mut h = hv(Scenario::Boot);
    let mut p = platform_with_identity_paging();
    let probe = Gpa::new(L0_HOLE);
    for leaf in [0u32, 1, 0x4000_0000, 0x4000_0001] {
        let mut v = MockVcpu::exited(EXIT_CPUID, 0x1000, 2);
        v.regs.rax = u64::from(leaf);
        h.handle_exit(&mut v, &mut p);
        let seen = [
            v.regs.rax as u32,
            v.regs.rbx as u32,
            v.regs.rcx as u32,
            v.regs.rdx as u32,
        ];
        let rec = CpuidRecord {
            leaf,
            subleaf: 0,
            regs: seen,
        };
        p.write_bytes(0x6000, &rec.encode());
        h.handle_exit(
            &mut vmcall(Hypercall::Report as u64, [1, 0x6000, 24, 0]),
            &mut p,
        );
    }
    h.handle_exit(&mut vmcall(Hypercall::Ping as u64, [0; 4]), &mut p);
    assert_eq!(
        judge(Scenario::Boot, &h.judge.log, &h.hv.counters, probe, None),
        Verdict::Fail(FailReason::NotEnded)
    );
    h.handle_exit(&mut vmcall(Hypercall::Done as u64, [0; 4]), &mut p);
    assert_eq!(
        judge(Scenario::Boot, &h.judge.log, &h.hv.counters, probe, None),
        Verdict::Pass
    );

    // A guest that saw something else than L0 returned fails the scenario.
    let bad = CpuidRecord {
        leaf: 1,
        subleaf: 0,
        regs: [0; 4],
    };
    let mut h2 = hv(Scenario::Boot);
    let mut v = MockVcpu::exited(EXIT_CPUID, 0x1000, 2);
    v.regs.rax = 1;
    h2.handle_exit(&mut v, &mut p);
    p.write_bytes(0x6000, &bad.encode());
    h2.handle_exit(
        &mut vmcall(Hypercall::Report as u64, [1, 0x6000, 24, 0]),
        &mut p,
    );
    h2.handle_exit(&mut vmcall(Hypercall::Done as u64, [0; 4]), &mut p);
    assert!(matches!(
        judge(Scenario::Boot, &h2.judge.log, &h2.hv.counters, probe, None),
        Verdict::Fail(_)
    ));
}

#[test]
fn bad_hypercall_verdict_follows_the_statuses_l0_returned() {
    let mut h = hv(Scenario::BadHypercall);
    let mut p = MockPlatform::default();
    for (_, status) in BAD_HYPERCALL_CASES {
        h.judge.log.record_hypercall(0, *status);
        // The guest's progress lines between the cases do not count.
        h.judge
            .log
            .record_hypercall(Hypercall::ConsoleWrite as u64, Status::Ok);
    }
    h.handle_exit(&mut vmcall(Hypercall::Ping as u64, [0; 4]), &mut p);
    h.handle_exit(&mut vmcall(Hypercall::Done as u64, [0; 4]), &mut p);
    assert_eq!(
        judge(
            Scenario::BadHypercall,
            &h.judge.log,
            &h.hv.counters,
            Gpa::new(0),
            None
        ),
        Verdict::Pass
    );

    let mut h = hv(Scenario::BadHypercall);
    h.judge.log.record_hypercall(0, Status::Ok); // case 0 accepted: a validation hole
    h.handle_exit(&mut vmcall(Hypercall::Done as u64, [0; 4]), &mut p);
    assert_eq!(
        judge(
            Scenario::BadHypercall,
            &h.judge.log,
            &h.hv.counters,
            Gpa::new(0),
            None
        ),
        Verdict::Fail(FailReason::HypercallStatus {
            index: 0,
            expected: Status::UnknownCall,
            got: Some(Status::Ok)
        })
    );
}

#[test]
fn entry_failures_pass_only_where_expected() {
    use crate::scenario::{judge_entry_failure, EntryFailure};
    use ihmi_vmcs::VmInstructionError;
    let control = EntryFailure::FailValid(VmInstructionError::EntryInvalidControlFields);
    let guest_state = EntryFailure::Exit(ExitReason::EntryFailInvalidGuestState);
    assert_eq!(
        judge_entry_failure(Scenario::EntryBadControl, control),
        Verdict::Pass
    );
    assert_eq!(
        judge_entry_failure(Scenario::EntryBadGuestState, guest_state),
        Verdict::Pass
    );
    assert!(matches!(
        judge_entry_failure(Scenario::EntryBadControl, guest_state),
        Verdict::Fail(_)
    ));
    assert!(matches!(
        judge_entry_failure(Scenario::Boot, control),
        Verdict::Fail(_)
    ));
    assert!(matches!(
        judge_entry_failure(Scenario::EntryBadGuestState, EntryFailure::FailInvalid),
        Verdict::Fail(_)
    ));
    // A guest that ran in an entry-failure scenario is a failure too.
    let mut h = hv(Scenario::EntryBadControl);
    h.handle_exit(
        &mut vmcall(Hypercall::Done as u64, [0; 4]),
        &mut MockPlatform::default(),
    );
    assert_eq!(
        judge(
            Scenario::EntryBadControl,
            &h.judge.log,
            &h.hv.counters,
            Gpa::new(0),
            None
        ),
        Verdict::Fail(FailReason::EntryDidNotFail)
    );
}

/// The monitor events the sim workload must produce, built from the expectation table itself.
fn sim_events() -> std::vec::Vec<ihmi_monitor::Event> {
    crate::scenario::SIM_WORKLOAD
        .iter()
        .enumerate()
        .map(|(i, x)| {
            let mut e = ihmi_monitor::Event {
                seq: i as u64,
                kind: x.kind as u16,
                pid: x.pid,
                ppid: x.ppid,
                nr: x.nr,
                verdict: x.verdict as i32,
                ..ihmi_monitor::Event::EMPTY
            };
            e.comm[..x.comm.len()].copy_from_slice(x.comm.as_bytes());
            e
        })
        .collect()
}

fn sim_verdict(events: &[ihmi_monitor::Event], dropped: u64) -> Verdict {
    let mut h = hv(Scenario::Sim);
    h.handle_exit(
        &mut vmcall(Hypercall::Done as u64, [0; 4]),
        &mut MockPlatform::default(),
    );
    for e in events {
        h.judge.log.record_monitor_event(e);
    }
    h.judge.log.monitor_dropped = dropped;
    judge(
        Scenario::Sim,
        &h.judge.log,
        &h.hv.counters,
        Gpa::new(0),
        None,
    )
}

#[test]
fn sim_verdict_requires_exactly_the_workload_events() {
    let good = sim_events();
    assert_eq!(sim_verdict(&good, 0), Verdict::Pass);

    // The intruder allowed instead of denied.
    let mut allowed = good.clone();
    allowed[9].verdict = ihmi_abi::monitor::Verdict::Allow as i32;
    assert!(matches!(
        sim_verdict(&allowed, 0),
        Verdict::Fail(FailReason::MonitorEvent { index: 9, .. })
    ));
    // A missing event, an extra one, a wrong name, and a drop all fail.
    assert!(matches!(
        sim_verdict(&good[..10], 0),
        Verdict::Fail(FailReason::MonitorEvent {
            index: 10,
            got: None,
            ..
        })
    ));
    let mut extra = good.clone();
    extra.push(good[1]);
    assert_eq!(
        sim_verdict(&extra, 0),
        Verdict::Fail(FailReason::ExtraMonitorEvents(1))
    );
    let mut renamed = good.clone();
    renamed[1].comm[0] = b'I';
    assert!(matches!(
        sim_verdict(&renamed, 0),
        Verdict::Fail(FailReason::MonitorEvent { index: 1, .. })
    ));
    assert_eq!(
        sim_verdict(&good, 2),
        Verdict::Fail(FailReason::MonitorDropped(2))
    );
}

mod attack_judge {
    extern crate std;

    use ihmi_abi::attack::{Attack, FLOOD_REQUESTS, FORGED_REQUEST};
    use ihmi_abi::monitor::Verdict as MV;
    use ihmi_addr::{Gpa, GpaRange, Gva};
    use ihmi_ept::ViewId;
    use ihmi_monitor::{Event, EventKind, RejectReason};
    use ihmi_vmcs::EptViolationQualification;

    use ihmi_hv::{GuestEnd, RegionKind};

    use crate::attacks::{judge_attack, AttackContext, AttackLine, MonitorAudit};
    use crate::ScenarioLog;

    const GATE: u64 = 0xf80_0000;
    const CODE: GpaRange = GpaRange::new(Gpa::new(0x100_0000), Gpa::new(0x100_6000));
    const CODE_SLICE: &[GpaRange] = &[CODE];

    fn ctx(intact: bool) -> AttackContext<'static> {
        AttackContext {
            gate: GpaRange::new(Gpa::new(GATE), Gpa::new(GATE + 0x1000)),
            guest_code: CODE_SLICE,
            hook: Some(Gpa::new(0x100_5ff8)),
            audit: MonitorAudit {
                image_intact: intact,
                ring_consistent: true,
            },
        }
    }

    /// Qualification bits (SDM Table 28-7): 0 read, 1 write, 2 fetch.
    fn ept(gpa: u64, q: u64, region: Option<RegionKind>, view: u16, rip: u64) -> GuestEnd {
        GuestEnd::EptViolation {
            gpa: Gpa::new(gpa),
            gla: Some(Gva::new(gpa)),
            rip,
            qualification: EptViolationQualification::from_raw(q),
            region,
            view: ViewId::new(view),
        }
    }

    fn log_ending(end: GuestEnd) -> ScenarioLog {
        let mut log = ScenarioLog::default();
        log.end = Some(end);
        log
    }

    fn verdict(a: Attack, log: &ScenarioLog, intact: bool) -> (bool, bool, bool) {
        let o = judge_attack(a, log, &ctx(intact));
        (o.blocked, o.reported, o.monitor_intact)
    }

    #[test]
    fn hardware_blocked_attacks_need_the_right_violation() {
        let monitor_read = log_ending(ept(
            GATE + 0x1000,
            1,
            Some(RegionKind::Monitor),
            0,
            0x100_0629,
        ));
        assert_eq!(
            verdict(Attack::ForgedPte, &monitor_read, true),
            (true, true, true)
        );
        assert_eq!(
            verdict(Attack::Cr3Switch, &monitor_read, true),
            (true, true, true)
        );
        // The same violation does not prove other attacks were stopped.
        assert!(!verdict(Attack::VmfuncOutsideGate, &monitor_read, true).0);
        assert!(!verdict(Attack::GateOverwrite, &monitor_read, true).0);
        // A guest that simply finished proves nothing about an EPT-blocked attack.
        let done = log_ending(GuestEnd::Done(0));
        assert_eq!(
            verdict(Attack::ForgedPte, &done, true),
            (false, false, true)
        );
        // A changed monitor fails the third column whatever happened.
        assert!(!verdict(Attack::ForgedPte, &monitor_read, false).2);

        let fetch_in_monitor_view = log_ending(ept(
            0x100_13af,
            4,
            Some(RegionKind::GuestRam),
            1,
            0x100_13af,
        ));
        for a in [
            Attack::VmfuncOutsideGate,
            Attack::GateRemap,
            Attack::TrapInMonitor,
        ] {
            assert_eq!(
                verdict(a, &fetch_in_monitor_view, true),
                (true, true, true),
                "{a:?}"
            );
        }
        let hook_write = log_ending(ept(
            0x100_3b40,
            2,
            Some(RegionKind::GuestRam),
            0,
            0x100_1417,
        ));
        assert_eq!(
            verdict(Attack::HookOverwrite, &hook_write, true),
            (true, true, true)
        );
        assert!(
            !verdict(Attack::HookStarve, &hook_write, true).0,
            "not the hook pointer"
        );
        let starve = log_ending(ept(
            0x100_5ff8,
            2,
            Some(RegionKind::GuestRam),
            0,
            0x100_138b,
        ));
        assert_eq!(
            verdict(Attack::HookStarve, &starve, true),
            (true, true, true)
        );
        let gate_write = log_ending(ept(GATE, 2, Some(RegionKind::Monitor), 0, 0x100_1420));
        assert_eq!(
            verdict(Attack::GateOverwrite, &gate_write, true),
            (true, true, true)
        );
        assert!(
            !verdict(Attack::EventForge, &gate_write, true).0,
            "the gate is not the ring"
        );
    }

    fn rejected(seq: u64) -> Event {
        Event {
            seq,
            kind: EventKind::Rejected as u16,
            detail: RejectReason::UnknownRequest as u16,
            verdict: MV::Rejected as i32,
            nr: FORGED_REQUEST,
            ..Event::EMPTY
        }
    }

    #[test]
    fn flood_must_be_accounted_for_event_by_event() {
        // The monitor asked for a drain at its high-water mark: every request is an event.
        let mut log = log_ending(GuestEnd::Done(0));
        for seq in 0..FLOOD_REQUESTS {
            log.record_monitor_event(&rejected(seq));
        }
        log.ring_drains = 1;
        assert_eq!(verdict(Attack::EventFlood, &log, true), (true, true, true));
        // Without the drain the ring drops what it cannot hold: counted (blocked), but lost.
        let mut lossy = log_ending(GuestEnd::Done(0));
        let stored = ihmi_abi::monitor::RING_LEN as u64;
        for seq in 0..stored {
            lossy.record_monitor_event(&rejected(seq));
        }
        lossy.monitor_dropped = FLOOD_REQUESTS - stored;
        assert_eq!(
            verdict(Attack::EventFlood, &lossy, true),
            (true, false, true)
        );
        // One event unaccounted for: neither blocked nor reported.
        lossy.monitor_dropped -= 1;
        assert_eq!(
            verdict(Attack::EventFlood, &lossy, true),
            (false, false, true)
        );
        // A gap larger than the counted drops means the stream was tampered with.
        let mut gappy = log_ending(GuestEnd::Done(0));
        gappy.record_monitor_event(&rejected(0));
        gappy.record_monitor_event(&rejected(5));
        assert!(!verdict(Attack::EventFlood, &gappy, true).2);
    }

    #[test]
    fn gate_middle_needs_both_the_rejection_and_the_stopped_exit_gate() {
        let mut log = log_ending(ept(0x6000_6620, 1, None, 0, GATE + 0x74));
        assert!(
            !verdict(Attack::GateMiddle, &log, true).0,
            "no rejection seen"
        );
        log.record_monitor_event(&rejected(0));
        assert_eq!(verdict(Attack::GateMiddle, &log, true), (true, true, true));
        let outcome = judge_attack(Attack::GateMiddle, &log, &ctx(true));
        let json = std::format!("{}", AttackLine(&outcome, &log));
        let v: std::vec::Vec<&str> = json.split('"').collect();
        assert!(json.starts_with(r#"{"attack":"gate-middle","item":5,"blocked":true,"reported":true,"monitor_intact":true,"detail":""#), "{json}");
        assert!(v.len() % 2 == 1, "quotes balanced: {json}");
    }

    #[test]
    fn alert_based_attacks_need_the_alert_and_a_healthy_guest() {
        let mut log = log_ending(GuestEnd::Done(0));
        assert_eq!(
            verdict(Attack::VmfuncBadIndex, &log, true),
            (true, false, true)
        );
        for index in [7, 600] {
            log.record_alert(ihmi_hv::Alert::VmfuncRefused {
                function: 0,
                index,
                rip: 0,
            });
        }
        assert_eq!(
            verdict(Attack::VmfuncBadIndex, &log, true),
            (true, true, true)
        );
        let mut lstar = log_ending(GuestEnd::Done(0));
        lstar.record_alert(ihmi_hv::Alert::EntryMsrWriteRefused {
            msr: 0xc000_0082,
            value: 1,
            locked: 2,
            rip: 0,
        });
        assert_eq!(
            verdict(Attack::LstarRedirect, &lstar, true),
            (false, true, true),
            "no syscall reached the monitor afterwards"
        );
        lstar.record_monitor_event(&Event {
            kind: EventKind::Syscall as u16,
            ..Event::EMPTY
        });
        assert_eq!(
            verdict(Attack::LstarRedirect, &lstar, true),
            (true, true, true)
        );
    }
}

#[test]
fn linux_boot_passes_only_for_init_s_last_program() {
    use ihmi_hv::linux::{TaskError, TaskInfo};
    let task = |pid: u32, ppid: u32, comm: &[u8]| {
        let mut c = [0u8; 16];
        c[..comm.len()].copy_from_slice(comm);
        TaskInfo {
            task: 0xffff_8880_0000_0000,
            pid,
            tgid: pid,
            ppid,
            comm: c,
        }
    };
    let verdict = |end: GuestEnd, lines: u64, t: Option<Result<TaskInfo, TaskError>>| {
        let mut h = hv(Scenario::LinuxBoot);
        h.judge.log.end = Some(end);
        h.judge.log.debug_lines = lines;
        h.judge.log.end_task = t;
        judge(
            Scenario::LinuxBoot,
            &h.judge.log,
            &h.hv.counters,
            Gpa::new(0),
            None,
        )
    };
    let good = Some(Ok(task(1, 0, b"ihmi-poweroff")));
    assert_eq!(verdict(GuestEnd::ShutdownRequest, 1, good), Verdict::Pass);
    // Another task, another parent, no line on the debug port, no profile, another ending: all fail.
    for (end, lines, t) in [
        (
            GuestEnd::ShutdownRequest,
            1,
            Some(Ok(task(42, 1, b"ihmi-poweroff"))),
        ),
        (
            GuestEnd::ShutdownRequest,
            1,
            Some(Ok(task(1, 5, b"ihmi-poweroff"))),
        ),
        (GuestEnd::ShutdownRequest, 1, Some(Ok(task(1, 0, b"sh")))),
        (GuestEnd::ShutdownRequest, 0, good),
        (
            GuestEnd::ShutdownRequest,
            1,
            Some(Err(TaskError::NoProfile)),
        ),
        (GuestEnd::ShutdownRequest, 1, None),
        (GuestEnd::ResetRequest, 1, good),
    ] {
        assert!(
            matches!(verdict(end, lines, t), Verdict::Fail(_)),
            "{end:?} {t:?}"
        );
    }
}

#[test]
fn the_linux_workload_trail_needs_its_calls_in_order_from_one_child_of_init() {
    use crate::scenario::LINUX_WORKLOAD;
    let ev = |pid: u32, ppid: u32, comm: &[u8], nr: u64| {
        let mut e = ihmi_monitor::Event {
            kind: ihmi_monitor::EventKind::Syscall as u16,
            pid,
            ppid,
            nr,
            ..ihmi_monitor::Event::EMPTY
        };
        e.comm[..comm.len()].copy_from_slice(comm);
        e
    };
    let exec = |pid: u32, path: &[u8], verdict: ihmi_abi::monitor::Verdict| {
        let mut e = ihmi_monitor::Event {
            kind: ihmi_monitor::EventKind::Exec as u16,
            pid,
            ppid: 1,
            verdict: verdict as i32,
            ..ihmi_monitor::Event::EMPTY
        };
        e.path[..path.len()].copy_from_slice(path);
        e
    };
    use ihmi_abi::monitor::Verdict::{Allow, Deny};
    let name = LINUX_WORKLOAD.0.as_bytes();
    let mut log = crate::ScenarioLog::default();
    for e in [
        exec(26, b"/bin/ihmi-workload", Allow),
        ev(1, 0, b"init", 110),
        ev(26, 1, name, 12),
        ev(26, 1, name, 110),
        ev(27, 1, name, 102), // another process by the same name does not count
        ev(26, 1, name, 102),
        ev(26, 1, name, 104),
    ] {
        log.record_monitor_event(&e);
    }
    assert!(
        !log.linux_trail.complete(),
        "the intruder has not been refused yet"
    );
    log.record_monitor_event(&exec(28, b"/bin/ihmi-intruder", Deny));
    assert!(log.linux_trail.complete(), "{:?}", log.linux_trail);
    // Had the intruder made a system call, it ran.
    let mut ran = log.clone();
    ran.record_monitor_event(&ev(28, 1, b"ihmi-intruder", 39));
    assert!(!ran.linux_trail.complete());
    // The workload's calls must come from the process the exec monitor saw start it.
    let mut other = crate::ScenarioLog::default();
    for e in [
        exec(30, b"/bin/ihmi-workload", Allow),
        ev(26, 1, name, 110),
        ev(26, 1, name, 102),
        ev(26, 1, name, 104),
        exec(28, b"/bin/ihmi-intruder", Deny),
    ] {
        other.record_monitor_event(&e);
    }
    assert!(!other.linux_trail.complete());
    let mut out_of_order = crate::ScenarioLog::default();
    for nr in [102, 110, 104] {
        out_of_order.record_monitor_event(&ev(26, 1, name, nr));
    }
    assert!(!out_of_order.linux_trail.complete());
}

#[test]
fn linux_attack_needs_the_refused_lstar_write_and_the_stopped_monitor_read() {
    use ihmi_hv::linux::TaskInfo;
    use ihmi_vmcs::EptViolationQualification;
    let attacker = attacker_task(25);
    let monitor_read = GuestEnd::EptViolation {
        gpa: Gpa::new(0xf80_1000),
        gla: None,
        rip: 0xffff_ffff_810e_f702,
        qualification: EptViolationQualification::from_raw(1),
        region: Some(RegionKind::Monitor),
        view: Some(ihmi_hv::guard::views::GUEST_VIEW),
    };
    let verdict_of = |msrs: &[u32], end: GuestEnd, task: TaskInfo| {
        let mut h = hv(Scenario::LinuxAttack(ihmi_abi::LinuxAttack::Root));
        for &msr in msrs {
            h.judge
                .log
                .record_alert(ihmi_hv::Alert::EntryMsrWriteRefused {
                    msr,
                    value: 1,
                    locked: 2,
                    rip: 3,
                });
        }
        h.judge.log.end = Some(end);
        h.judge.log.end_task = Some(Ok(task));
        judge(
            Scenario::LinuxAttack(ihmi_abi::LinuxAttack::Root),
            &h.judge.log,
            &h.hv.counters,
            Gpa::new(0),
            None,
        )
    };
    // LSTAR and SYSENTER_EIP both refused, or one of them not.
    let verdict = |alerts: bool, end: GuestEnd, task: TaskInfo| {
        let both: &[u32] = if alerts { &[0xc000_0082, 0x176] } else { &[] };
        verdict_of(both, end, task)
    };
    assert_eq!(verdict(true, monitor_read, attacker), Verdict::Pass);
    assert!(matches!(
        verdict(false, monitor_read, attacker),
        Verdict::Fail(FailReason::AttackNotBlocked(_))
    ));
    for only in [0xc000_0082, 0x176] {
        assert!(matches!(
            verdict_of(&[only], monitor_read, attacker),
            Verdict::Fail(FailReason::AttackNotBlocked(_))
        ));
    }
    assert!(matches!(
        verdict(true, GuestEnd::ShutdownRequest, attacker),
        Verdict::Fail(FailReason::WrongEnd { .. })
    ));
    let mut other = attacker;
    other.comm[0] = b'X';
    assert!(matches!(
        verdict(true, monitor_read, other),
        Verdict::Fail(FailReason::WrongTask(_))
    ));
    let l0_read = GuestEnd::EptViolation {
        gpa: Gpa::new(0xfa0_0000),
        gla: None,
        rip: 0xffff_ffff_810e_f702,
        qualification: EptViolationQualification::from_raw(1),
        region: Some(RegionKind::L0),
        view: Some(ihmi_hv::guard::views::GUEST_VIEW),
    };
    assert!(matches!(verdict(true, l0_read, attacker), Verdict::Fail(_)));
}

#[test]
fn ept_guard_passes_only_on_a_read_of_the_l0_probe_frame() {
    use ihmi_vmcs::EptViolationQualification;
    let probe = Gpa::new(L0_HOLE + 0x2000);
    let end = |gpa: u64, q: u64, region: Option<RegionKind>| GuestEnd::EptViolation {
        gpa: Gpa::new(gpa),
        gla: None,
        rip: 0x4000,
        qualification: EptViolationQualification::from_raw(q),
        region,
        view: None,
    };
    let verdict = |end: GuestEnd, probe_region: Option<RegionKind>| {
        let mut h = hv(Scenario::EptGuard);
        h.judge.log.end = Some(end);
        judge(
            Scenario::EptGuard,
            &h.judge.log,
            &h.hv.counters,
            probe,
            probe_region,
        )
    };
    let l0 = Some(RegionKind::L0);
    assert_eq!(verdict(end(probe.raw() + 8, 1, l0), l0), Verdict::Pass);
    assert_eq!(
        verdict(end(probe.raw(), 1, l0), Some(RegionKind::GuestRam)),
        Verdict::Fail(FailReason::ProbeNotL0Owned)
    );
    for wrong in [
        end(probe.raw() + 0x1000, 1, l0),
        end(probe.raw(), 2, l0),
        end(probe.raw(), 1, Some(RegionKind::Monitor)),
        GuestEnd::ShutdownRequest,
    ] {
        assert!(
            matches!(
                verdict(wrong, l0),
                Verdict::Fail(FailReason::WrongEnd { .. })
            ),
            "{wrong:?}"
        );
    }
}

#[test]
fn benchmark_windows_are_counted_between_their_marks_and_reported() {
    use ihmi_abi::bench::Bench;
    let mut h = hv(Scenario::Bench(ihmi_abi::monitor::Mode::InBox));
    let mut p = MockPlatform::default();
    let mark = |end: u64, tsc: u64, calls: u64| {
        vmcall(
            Hypercall::Bench as u64,
            [Bench::InvokeNull as u64, end, tsc, calls],
        )
    };
    h.handle_exit(&mut mark(0, 0, 0), &mut p);
    // Two exits inside the window.
    for _ in 0..2 {
        h.handle_exit(&mut MockVcpu::exited(EXIT_CPUID, 0x1000, 2), &mut p);
    }
    let mut obs = h.judge.observer(
        MonitorCounts {
            monitor_vm_exits: 0,
            invocations: 7,
        },
        &mut h.out,
    );
    h.hv.handle_exit(&mut mark(1, 5000, 7), &mut p, &mut obs);
    let results = h.judge.log.bench_results();
    assert_eq!(results.len(), 1);
    assert_eq!(
        (
            results[0].calls,
            results[0].tsc,
            results[0].exits,
            results[0].invocations
        ),
        (7, 5000, 2, 7)
    );
    assert!(
        h.out.starts_with("bench| {\"start\":\"invoke-null\"}\n"),
        "{}",
        h.out
    );
    assert!(
        h.out.contains(r#""bench":"invoke-null","mode":"inbox","calls":7,"tsc":5000,"exits":2,"invocations":7,"#),
        "{}",
        h.out
    );
}

#[test]
fn linux_marks_come_from_debug_lines_of_the_linux_benchmark_only() {
    let io_out = |byte: u8| {
        let mut v = MockVcpu::exited(30, 0x2000, 1);
        v.fields
            .insert(ihmi_vmcs::fields::ro::EXIT_QUALIFICATION, 0xe9 << 16);
        v.regs.rax = u64::from(byte);
        v
    };
    let lines = b"ihmi-bench: begin linux-syscall\nihmi-bench: end linux-syscall 1000 99\n";
    let mut p = MockPlatform::default();
    let mut bench = hv(Scenario::LinuxBench(ihmi_abi::monitor::Mode::None));
    let mut other = hv(Scenario::LinuxSim);
    for &b in lines {
        bench.handle_exit(&mut io_out(b), &mut p);
        other.handle_exit(&mut io_out(b), &mut p);
    }
    let r = bench.judge.log.bench_results();
    assert_eq!(r.len(), 1);
    assert_eq!((r[0].calls, r[0].tsc, r[0].exits), (1000, 99, 0));
    assert!(other.judge.log.bench_results().is_empty());
    assert!(other.out.is_empty());
    // An end line with no begin is said and ignored.
    let mut unpaired = hv(Scenario::LinuxBench(ihmi_abi::monitor::Mode::None));
    for &b in b"ihmi-bench: end linux-syscall 1000 99\n" {
        unpaired.handle_exit(&mut io_out(b), &mut p);
    }
    assert!(unpaired.judge.log.bench_results().is_empty());
    assert!(
        unpaired.out.contains("without its start"),
        "{}",
        unpaired.out
    );
}

#[test]
fn a_run_that_leaves_the_monitor_changed_fails_whatever_the_scenario_says() {
    use crate::{Facts, MonitorAudit};
    let h = hv(Scenario::LinuxSim);
    let facts = |image_intact: bool, ring_consistent: bool| Facts {
        probe: Gpa::new(0),
        probe_region: None,
        monitor: Some(MonitorAudit {
            image_intact,
            ring_consistent,
        }),
        attack: None,
    };
    let mut out = String::new();
    for (image, ring) in [(false, true), (true, false)] {
        assert!(matches!(
            h.judge
                .verdict(&h.hv.counters, &facts(image, ring), &mut out),
            Verdict::Fail(FailReason::MonitorChanged(_))
        ));
    }
    // Intact, the scenario's own judge decides (this log never ended).
    assert_eq!(
        h.judge
            .verdict(&h.hv.counters, &facts(true, true), &mut out),
        Verdict::Fail(FailReason::NotEnded)
    );
}

#[test]
fn a_locked_write_attack_needs_the_refused_write_its_alert_and_the_attacker_running() {
    use ihmi_abi::LinuxAttack;
    use ihmi_hv::{Alert, Locked};
    use ihmi_vmcs::EptViolationQualification;
    let attacker = attacker_task(30);
    let write_at = |gpa: u64, q: u64| GuestEnd::EptViolation {
        gpa: Gpa::new(gpa),
        gla: None,
        rip: 0x40_1000,
        qualification: EptViolationQualification::from_raw(q),
        region: Some(RegionKind::GuestRam),
        view: Some(ihmi_hv::guard::views::GUEST_VIEW),
    };
    let verdict = |alert: Option<(Locked, u64)>, end: GuestEnd| {
        let s = Scenario::LinuxAttack(LinuxAttack::KernelText);
        let mut h = hv(s);
        if let Some((what, gpa)) = alert {
            h.judge.log.record_alert(Alert::LockedWrite {
                what,
                gpa: Gpa::new(gpa),
                rip: 0x40_1000,
            });
        }
        h.judge.log.end = Some(end);
        h.judge.log.end_task = Some(Ok(attacker));
        judge(s, &h.judge.log, &h.hv.counters, Gpa::new(0), None)
    };
    let text = Some((Locked::KernelText, 0x112_6000));
    assert_eq!(verdict(text, write_at(0x112_6000, 0x2)), Verdict::Pass);
    assert!(matches!(
        verdict(None, write_at(0x112_6000, 0x2)),
        Verdict::Fail(FailReason::AttackNotReported(_))
    ));
    assert!(matches!(
        verdict(Some((Locked::Idt, 0x112_6000)), write_at(0x112_6000, 0x2)),
        Verdict::Fail(FailReason::AttackNotReported(_))
    ));
    // A read, or a clean power-off, is not the refused write.
    assert!(matches!(
        verdict(text, write_at(0x112_6000, 0x1)),
        Verdict::Fail(FailReason::WrongEnd { .. })
    ));
    assert!(matches!(
        verdict(text, GuestEnd::ShutdownRequest),
        Verdict::Fail(FailReason::WrongEnd { .. })
    ));
}

#[test]
fn a_process_pgd_attack_needs_the_audit_to_stop_the_attacker_and_say_where() {
    use ihmi_abi::LinuxAttack;
    use ihmi_hv::Alert;
    let attacker = attacker_task(25);
    let s = Scenario::LinuxAttack(LinuxAttack::ProcessPgd);
    let verdict = |alert_at: Option<u64>, end: GuestEnd| {
        let mut h = hv(s);
        if let Some(at) = alert_at {
            h.judge.log.record_alert(Alert::HookTampered {
                gpa: Gpa::new(at),
                found: 1,
                expected: 2,
            });
        }
        h.judge.log.end = Some(end);
        h.judge.log.end_task = Some(Ok(attacker));
        judge(s, &h.judge.log, &h.hv.counters, Gpa::new(0), None)
    };
    let tampered = GuestEnd::HookTampered {
        gpa: Gpa::new(0xfed_2e90),
    };
    assert_eq!(verdict(Some(0xfed_2e90), tampered), Verdict::Pass);
    assert!(matches!(
        verdict(Some(0x1000), tampered),
        Verdict::Fail(FailReason::AttackNotReported(_))
    ));
    assert!(matches!(
        verdict(None, GuestEnd::ShutdownRequest),
        Verdict::Fail(FailReason::WrongEnd { .. })
    ));
}

#[test]
fn the_linux_flood_passes_only_with_every_call_seen_and_nothing_dropped() {
    use ihmi_abi::attack::{LINUX_FLOOD_CALLS, LINUX_FLOOD_NR};
    use ihmi_abi::LinuxAttack;
    use ihmi_monitor::{Event, EventKind};
    let s = Scenario::LinuxAttack(LinuxAttack::Flood);
    let run = |calls: u64, dropped: u64, drains: u64| {
        let mut h = hv(s);
        let mut e = Event {
            kind: EventKind::Syscall as u16,
            nr: LINUX_FLOOD_NR,
            ..Event::EMPTY
        };
        e.comm[..11].copy_from_slice(b"ihmi-attack");
        for _ in 0..calls {
            h.judge.log.record_monitor_event(&e);
        }
        h.judge.log.monitor_dropped = dropped;
        h.judge.log.ring_drains = drains;
        end_as_init_does(&mut h.judge.log);
        judge(s, &h.judge.log, &h.hv.counters, Gpa::new(0), None)
    };
    assert_eq!(run(LINUX_FLOOD_CALLS, 0, 6), Verdict::Pass);
    for (calls, dropped, drains) in [
        (LINUX_FLOOD_CALLS - 1, 1, 6),
        (LINUX_FLOOD_CALLS, 0, 0),
        (LINUX_FLOOD_CALLS - 10, 0, 6),
    ] {
        assert!(matches!(
            run(calls, dropped, drains),
            Verdict::Fail(FailReason::EventsLost { .. })
        ));
    }
}

#[test]
fn the_compat_attack_needs_every_32_bit_call_seen_through_its_own_entry() {
    use ihmi_abi::attack::{LINUX_COMPAT_CALLS, LINUX_COMPAT_NR};
    use ihmi_abi::monitor::SyscallEntry;
    use ihmi_abi::LinuxAttack;
    use ihmi_monitor::{Event, EventKind};
    let s = Scenario::LinuxAttack(LinuxAttack::Compat);
    let run = |int80: u64, sysenter: u64| {
        let mut h = hv(s);
        for (entry, n) in [
            (SyscallEntry::Int80, int80),
            (SyscallEntry::Sysenter, sysenter),
        ] {
            let mut e = Event {
                kind: EventKind::Syscall as u16,
                detail: entry as u16,
                nr: LINUX_COMPAT_NR,
                ..Event::EMPTY
            };
            e.comm[..11].copy_from_slice(b"ihmi-attack");
            for _ in 0..n {
                h.judge.log.record_monitor_event(&e);
            }
        }
        // A 64-bit getpid (39) or a 64-bit call numbered 20 (writev) counts for neither.
        let mut other = Event {
            kind: EventKind::Syscall as u16,
            nr: LINUX_COMPAT_NR,
            ..Event::EMPTY
        };
        other.comm[..11].copy_from_slice(b"ihmi-attack");
        h.judge.log.record_monitor_event(&other);
        end_as_init_does(&mut h.judge.log);
        judge(s, &h.judge.log, &h.hv.counters, Gpa::new(0), None)
    };
    let n = LINUX_COMPAT_CALLS;
    assert_eq!(run(n, n), Verdict::Pass);
    for (int80, sysenter) in [(0, n), (n, 0), (n - 1, n), (n, n + 1)] {
        assert!(matches!(
            run(int80, sysenter),
            Verdict::Fail(FailReason::EntryNotMonitored { .. })
        ));
    }
}

#[test]
fn the_nmi_attack_needs_nmis_in_the_monitor_view_and_every_one_delivered_and_counted() {
    use ihmi_abi::attack::{LINUX_NMI_MIN, LINUX_NMI_REPORT};
    use ihmi_abi::LinuxAttack;
    use ihmi_hv::Observation;
    use std::string::ToString;
    let s = Scenario::LinuxAttack(LinuxAttack::Nmi);
    // `taken` NMIs, the first `in_monitor` of them in the monitor's view, `merged` of those merged,
    // `lost` never delivered; the guest reports `report`.
    let run = |taken: u64, in_monitor: u64, merged: u64, lost: u64, report: Option<&str>| {
        let mut h = hv(s);
        for i in 0..taken {
            let merge = i < merged;
            h.judge.log.record(&Observation::NmiTaken {
                in_monitor_view: i < in_monitor,
                merged: merge,
            });
            if !merge && i >= lost {
                h.judge.log.record(&Observation::NmiDelivered);
            }
        }
        if let Some(r) = report {
            let line = std::format!("{LINUX_NMI_REPORT}{r}");
            h.judge.log.record(&Observation::DebugLine {
                line: line.as_bytes(),
                exits: 1,
            });
        }
        end_as_init_does(&mut h.judge.log);
        judge(s, &h.judge.log, &h.hv.counters, Gpa::new(0), None)
    };
    let n = LINUX_NMI_MIN * 2;
    let all = n.to_string();
    assert_eq!(run(n, 5, 0, 0, Some(&all)), Verdict::Pass);
    // Two merged into waiting ones: the guest took two fewer, as it would on bare metal.
    assert_eq!(run(n, 5, 2, 0, Some(&(n - 2).to_string())), Verdict::Pass);
    let few = (LINUX_NMI_MIN - 1).to_string();
    for (taken, in_monitor, lost, report) in [
        (n, 0, 0, Some(all.as_str())), // none hit the gate: nothing was shown
        (LINUX_NMI_MIN - 1, 5, 0, Some(few.as_str())), // too few to count
        (n, 5, 1, Some(all.as_str())), // one never delivered
        (n, 5, 0, Some("7")),          // the guest counted other than L0 delivered
        (n, 5, 0, Some("4x")),         // not a count
        (n, 5, 0, None),               // no report
    ] {
        assert!(matches!(
            run(taken, in_monitor, 0, lost, report),
            Verdict::Fail(FailReason::NmisLost { .. })
        ));
    }
}

#[test]
fn the_forge_attack_needs_both_forgeries_rejected_for_their_reason_and_both_pins_kept() {
    use ihmi_abi::attack::LINUX_FORGED_SYSCALL_NR;
    use ihmi_abi::monitor::RequestCode;
    use ihmi_abi::LinuxAttack;
    use ihmi_arch::cr::{CR0_WP, CR4_SMEP};
    use ihmi_monitor::{Event, EventKind, RejectReason};
    let s = Scenario::LinuxAttack(LinuxAttack::Forge);
    let rejected = |why: RejectReason, code: RequestCode, a0: u64| Event {
        kind: EventKind::Rejected as u16,
        detail: why as u16,
        nr: code as u64,
        args: [a0, 0, 0, 0],
        ..Event::EMPTY
    };
    let syscall = rejected(
        RejectReason::WrongEntry,
        RequestCode::Syscall,
        LINUX_FORGED_SYSCALL_NR,
    );
    let exec = rejected(
        RejectReason::NotFromHook,
        RequestCode::Exec,
        0xffff_88ff_8000_0080,
    );
    let pin = |cr: u8, cleared: u64| ihmi_hv::Alert::CrPinRefused {
        cr,
        value: 0,
        cleared,
        rip: 0xffff_88ff_8000_0050,
    };
    // The IDT the attacker loads (the direct-map alias of `idt_table`) and the boot's (the CPU
    // entry area's read-only alias).
    const LOADED: u64 = 0xffff_8880_01dd_c000;
    const BOOT: u64 = 0xffff_fe00_0000_0000;
    let idt_line = |after: u64| {
        std::format!(
            "{}{LOADED:#x} {BOOT:#x} {after:#x}",
            ihmi_abi::attack::LINUX_IDT_LINE
        )
    };
    let moved = ihmi_hv::Alert::IdtMoved {
        found: LOADED,
        expected: BOOT,
        rip: 0xffff_88ff_8000_0120,
    };
    let run_idt = |events: &[Event], alerts: &[ihmi_hv::Alert], line: Option<&str>| {
        let mut h = hv(s);
        for e in events {
            h.judge.log.record_monitor_event(e);
        }
        for a in alerts {
            h.judge.log.record_alert(*a);
        }
        if let Some(line) = line {
            h.judge.log.record(&ihmi_hv::Observation::DebugLine {
                line: line.as_bytes(),
                exits: 0,
            });
        }
        end_as_init_does(&mut h.judge.log);
        judge(s, &h.judge.log, &h.hv.counters, Gpa::new(0), None)
    };
    let restored = idt_line(BOOT);
    let run = |events: &[Event], alerts: &[ihmi_hv::Alert]| {
        let mut all = alerts.to_vec();
        all.push(moved);
        run_idt(events, &all, Some(&restored))
    };
    let pins = [pin(4, CR4_SMEP), pin(0, CR0_WP)];
    assert_eq!(run(&[syscall, exec], &pins), Verdict::Pass);
    // The IDT: no line, no alert, an alert for another table, or the loaded one still there after
    // the exit, fails.
    let stayed = idt_line(LOADED);
    let other = ihmi_hv::Alert::IdtMoved {
        found: LOADED + 0x1000,
        expected: BOOT,
        rip: 0xffff_88ff_8000_0120,
    };
    for (alerts, line) in [
        (&[pins[0], pins[1], moved][..], None),
        (&pins[..], Some(restored.as_str())),
        (&[pins[0], pins[1], other][..], Some(restored.as_str())),
        (&[pins[0], pins[1], moved][..], Some(stayed.as_str())),
    ] {
        assert!(
            matches!(
                run_idt(&[syscall, exec], alerts, line),
                Verdict::Fail(FailReason::AttackNotReported(_) | FailReason::AttackNotBlocked(_))
            ),
            "{line:?}"
        );
    }
    // A forgery accepted (no rejection), or rejected for another reason, fails.
    let other = rejected(RejectReason::BadArgument, RequestCode::Exec, 0);
    for events in [
        &[syscall][..],
        &[exec][..],
        &[syscall, other][..],
        &[syscall, exec, exec][..],
    ] {
        assert!(matches!(
            run(events, &pins),
            Verdict::Fail(FailReason::ForgeryNotRejected { .. })
        ));
    }
    // A pin that did not hold (no alert for it) fails.
    for alerts in [
        &pins[..1],
        &pins[1..],
        &[pin(4, ihmi_arch::cr::CR4_SMAP), pins[1]][..],
    ] {
        assert!(matches!(
            run(&[syscall, exec], alerts),
            Verdict::Fail(FailReason::AttackNotReported(_))
        ));
    }
}

#[test]
fn the_io_uring_attack_needs_an_event_for_every_operation_it_submitted() {
    use ihmi_abi::attack::LINUX_IO_URING_OPS;
    use ihmi_abi::LinuxAttack;
    use ihmi_monitor::{Event, EventKind};
    let s = Scenario::LinuxAttack(LinuxAttack::IoUring);
    let run = |ops: &[u8], comm: &[u8]| {
        let mut h = hv(s);
        for &op in ops {
            let mut e = Event {
                kind: EventKind::IoUring as u16,
                nr: u64::from(op),
                ..Event::EMPTY
            };
            e.comm[..comm.len()].copy_from_slice(comm);
            h.judge.log.record_monitor_event(&e);
        }
        end_as_init_does(&mut h.judge.log);
        judge(s, &h.judge.log, &h.hv.counters, Gpa::new(0), None)
    };
    assert_eq!(run(&LINUX_IO_URING_OPS, b"ihmi-attack"), Verdict::Pass);
    assert_eq!(run(&LINUX_IO_URING_OPS, b"iou-wrk-25"), Verdict::Pass);
    assert!(matches!(
        run(&LINUX_IO_URING_OPS[..3], b"ihmi-attack"),
        Verdict::Fail(FailReason::IoUringNotSeen { opcode: 37 })
    ));
    assert!(matches!(
        run(&LINUX_IO_URING_OPS, b"sh"),
        Verdict::Fail(FailReason::IoUringNotSeen { .. })
    ));
}

#[test]
fn the_identity_attack_needs_every_run_judged_by_content_and_the_loader_flagged() {
    use ihmi_abi::attack::{
        LINUX_IDENTITY_LOADED, LINUX_IDENTITY_LOADER_REPORT, LINUX_IDENTITY_RUNS,
    };
    use ihmi_abi::monitor::{SyscallEntry, Verdict as Says};
    use ihmi_abi::LinuxAttack;
    use ihmi_monitor::event::{EXEC_IDENTITY_SHIFT, SYSCALL_EXEC_MAPPING};
    use ihmi_monitor::{Event, EventKind, IdentityError};
    let s = Scenario::LinuxAttack(LinuxAttack::Identity);
    let (intruder, workload, other) = ([1u64; 4], [2u64; 4], [3u64; 4]);
    // The digests a correct monitor reports, run by run.
    let good = [
        intruder, workload, intruder, intruder, intruder, intruder, other, workload, workload,
        [4; 4], other,
    ];
    let exec = |(path, allowed): (&str, bool), digest: [u64; 4]| {
        let mut e = Event {
            kind: EventKind::Exec as u16,
            verdict: if allowed { Says::Allow } else { Says::Deny } as i32,
            comm: *b"ihmi-attack\0\0\0\0\0",
            args: digest,
            ..Event::EMPTY
        };
        e.path[..path.len()].copy_from_slice(path.as_bytes());
        e
    };
    let mapping = Event {
        kind: EventKind::Syscall as u16,
        detail: SyscallEntry::Syscall as u16 | SYSCALL_EXEC_MAPPING,
        comm: *b"ihmi-attack\0\0\0\0\0",
        nr: 10,
        args: [0x7f00_0000_0000, 4096, 5, 0],
        ..Event::EMPTY
    };
    let run = |events: &[Event], loaded: Option<u64>| {
        let mut h = hv(s);
        for e in events {
            h.judge.log.record_monitor_event(e);
        }
        if let Some(n) = loaded {
            let line = std::format!("{LINUX_IDENTITY_LOADER_REPORT}{n}");
            h.judge.log.record(&ihmi_hv::Observation::DebugLine {
                line: line.as_bytes(),
                exits: 1,
            });
        }
        end_as_init_does(&mut h.judge.log);
        judge(s, &h.judge.log, &h.hv.counters, Gpa::new(0), None)
    };
    let runs: std::vec::Vec<Event> = LINUX_IDENTITY_RUNS
        .iter()
        .zip(good)
        .map(|(&r, d)| exec(r, d))
        .collect();
    let with = |extra: &[Event]| [runs.as_slice(), extra].concat();
    assert_eq!(
        run(&with(&[mapping]), Some(LINUX_IDENTITY_LOADED)),
        Verdict::Pass
    );
    // The loader not flagged, or its code not run.
    assert!(matches!(
        run(&runs, Some(LINUX_IDENTITY_LOADED)),
        Verdict::Fail(FailReason::IdentityNotJudged(_))
    ));
    assert!(matches!(
        run(&with(&[mapping]), None),
        Verdict::Fail(FailReason::IdentityNotJudged(_))
    ));
    // A disguise allowed (judged by name), a run missing, one without a digest, a copy whose digest
    // is not its original's, a change not seen.
    let mut allowed = runs.clone();
    allowed[2].verdict = Says::Allow as i32;
    let mut unhashed = runs.clone();
    unhashed[3].detail = (IdentityError::NotResident as u16) << EXEC_IDENTITY_SHIFT;
    let mut copy = runs.clone();
    copy[7].args = other;
    let mut unchanged = runs.clone();
    unchanged[10].args = workload;
    for bad in [allowed, runs[1..].to_vec(), unhashed, copy, unchanged] {
        let mut events = bad;
        events.push(mapping);
        assert!(matches!(
            run(&events, Some(LINUX_IDENTITY_LOADED)),
            Verdict::Fail(FailReason::IdentityNotJudged(_))
        ));
    }
}

#[test]
fn the_nested_scenarios_need_every_step_s_outcome_in_order_and_the_l0_region_alert() {
    use crate::scenario::{NESTED_VMCS_STEPS, NESTED_VMXON_STEPS};
    for (s, steps) in [
        (Scenario::NestedVmxon, NESTED_VMXON_STEPS.as_slice()),
        (Scenario::NestedVmcs, NESTED_VMCS_STEPS.as_slice()),
    ] {
        nested_steps_judged(s, steps);
    }
}

fn nested_steps_judged(s: Scenario, expected: &[crate::scenario::VmxStep]) {
    use crate::scenario::VmxStep;
    use ihmi_hv::nested::vmx::VmxOutcome;
    use ihmi_hv::{Alert, RegionKind};
    use ihmi_vmcs::VmxInstruction;
    let alert = Alert::VmxRegionRefused {
        gpa: Gpa::new(0xfa0_0000),
        region: RegionKind::L0,
        rip: 0x100_4d76,
    };
    let run = |steps: &[VmxStep], alerts: &[Alert]| {
        let mut h = hv(s);
        for &VmxStep(instruction, outcome) in steps {
            h.judge.log.record(&ihmi_hv::Observation::Vmx {
                instruction,
                outcome,
            });
        }
        for a in alerts {
            h.judge.log.record_alert(*a);
        }
        h.judge.log.end = Some(GuestEnd::Done(0));
        judge(s, &h.judge.log, &h.hv.counters, Gpa::new(0), None)
    };
    assert_eq!(run(expected, &[alert]), Verdict::Pass);
    assert!(matches!(
        run(expected, &[]),
        Verdict::Fail(FailReason::AttackNotReported(_))
    ));
    // A step missing, one more, one answered otherwise.
    let mut other = expected.to_vec();
    other[1] = VmxStep(VmxInstruction::Vmxon, VmxOutcome::Succeed);
    let more = [
        expected,
        &[VmxStep(VmxInstruction::Vmxoff, VmxOutcome::Succeed)],
    ]
    .concat();
    for steps in [&expected[1..], more.as_slice(), other.as_slice()] {
        assert_eq!(run(steps, &[alert]), Verdict::Fail(FailReason::VmxSteps));
    }
}

#[test]
fn nested_mini_needs_exactly_its_exits_one_launch_a_resume_per_reflection_and_cheap_round_trips() {
    use crate::scenario::{NESTED_MAX_ROUND_TRIP, NESTED_MAX_ROUND_TRIP_SHADOW};
    nested_mini_judged(Scenario::NestedMini, NESTED_MAX_ROUND_TRIP);
    nested_mini_judged(Scenario::NestedMiniShadow, NESTED_MAX_ROUND_TRIP_SHADOW);
}

fn nested_mini_judged(s: Scenario, max_round_trip: u64) {
    use crate::scenario::{L2ExitStep, NESTED_MINI_EXITS};
    use ihmi_hv::Observation;
    // What L0 sees when L2 runs as it should: the launch, then each exit, then (after each reflected
    // one but the last) a VMRESUME with the round trip.
    let run_with = |exits: &[L2ExitStep], round_trip: u64, end: GuestEnd, relaunches: usize| {
        let mut h = hv(s);
        let rec = |h: &mut Run, o: Observation<'_>| h.judge.log.record(&o);
        rec(
            &mut h,
            Observation::L2Entry {
                launch: true,
                round_trip: None,
            },
        );
        for (i, &L2ExitStep(reason, reflected)) in exits.iter().enumerate() {
            rec(&mut h, Observation::L2Exit { reason, reflected });
            if reflected && i + 1 < exits.len() {
                rec(
                    &mut h,
                    Observation::L2Entry {
                        launch: false,
                        round_trip: Some(round_trip),
                    },
                );
            }
        }
        for _ in 0..relaunches {
            rec(
                &mut h,
                Observation::Vmx {
                    instruction: ihmi_vmcs::VmxInstruction::Vmlaunch,
                    outcome: ihmi_hv::nested::vmx::VmxOutcome::FailValid(4),
                },
            );
        }
        h.judge.log.end = Some(end);
        judge(s, &h.judge.log, &h.hv.counters, Gpa::new(0), None)
    };
    let run =
        |exits: &[L2ExitStep], round_trip: u64, end: GuestEnd| run_with(exits, round_trip, end, 1);
    let ok = GuestEnd::Done(0);
    assert_eq!(run(&NESTED_MINI_EXITS, 2, ok), Verdict::Pass);
    // VMLAUNCH of the launched VMCS not refused, or refused twice.
    for relaunches in [0, 2] {
        assert!(matches!(
            run_with(&NESTED_MINI_EXITS, 2, ok, relaunches),
            Verdict::Fail(FailReason::NestedRun(_))
        ));
    }
    assert_eq!(run(&NESTED_MINI_EXITS, max_round_trip, ok), Verdict::Pass);
    let nested = |r: Verdict| matches!(r, Verdict::Fail(FailReason::NestedRun(_)));
    assert!(nested(run(&NESTED_MINI_EXITS, max_round_trip + 1, ok)));
    // One CPUID fewer, the free port reflected, one exit more.
    let fewer = &NESTED_MINI_EXITS[1..];
    let mut wrong = NESTED_MINI_EXITS.to_vec();
    let free = wrong.iter().position(|s| !s.1).unwrap();
    wrong[free].1 = true;
    let more = [
        NESTED_MINI_EXITS.as_slice(),
        &[L2ExitStep(ihmi_vmcs::ExitReason::Hlt, false)],
    ]
    .concat();
    for exits in [fewer, wrong.as_slice(), more.as_slice()] {
        assert!(nested(run(exits, 2, ok)), "{exits:?}");
    }
    // L1's own checks failed.
    assert!(matches!(
        run(&NESTED_MINI_EXITS, 2, GuestEnd::Done(3)),
        Verdict::Fail(_)
    ));
}

/// `nested-kvm`'s verdict from what L0 observes: the relayed report, the reflected CPUIDs and their
/// round trips, KVM's VMXOFF, no alert.
#[test]
fn nested_kvm_passes_only_for_the_whole_probe_at_the_target_cost() {
    use crate::scenario::L2Report;
    use ihmi_hv::nested::vmx::VmxOutcome;
    use ihmi_hv::Observation;
    use ihmi_vmcs::VmxInstruction;

    assert_eq!(
        L2Report::parse(b"cpuid=1000 vendor=GenuineIntel pages=256 bad=0"),
        Some(L2Report {
            cpuids: 1000,
            vendor: *b"GenuineIntel",
            pages: 256,
            bad: 0
        })
    );
    for bad in [
        &b"cpuid=1000 vendor=Genuine pages=256 bad=0"[..],
        b"cpuid=x vendor=GenuineIntel pages=256 bad=0",
        b"cpuid=1000 vendor=GenuineIntel pages=256 bad=",
        b"cpuid=1000 vendor=GenuineIntel pages=256",
    ] {
        assert_eq!(L2Report::parse(bad), None, "{}", bad.escape_ascii());
    }

    // `cpuids` CPUID exits reflected, each `per` L0 exits to its VMRESUME; a report line; KVM's
    // VMXOFF; an alert if asked.
    // With nested EPT, `(reflected, filled, invepts)`: EPT violations of L2's and L1's INVEPTs.
    let run_ept =
        |scenario: Scenario,
         report: &str,
         cpuids: u64,
         per: u64,
         vmxoff: bool,
         (reflected_ept, fills, invepts, invvpids): (u64, u64, u64, u64)| {
            let mut h = hv(scenario);
            let log = &mut h.judge.log;
            let task = ihmi_hv::linux::TaskInfo {
                task: 0xffff_8880_0000_0000,
                pid: 1,
                tgid: 1,
                ppid: 0,
                comm: *b"ihmi-poweroff\0\0\0",
            };
            log.record(&Observation::DebugLine {
                line: report.as_bytes(),
                exits: 0,
            });
            log.record(&Observation::L2Entry {
                launch: true,
                round_trip: None,
            });
            for _ in 0..cpuids {
                log.record(&Observation::L2Exit {
                    reason: ExitReason::Cpuid,
                    reflected: true,
                });
                log.record(&Observation::L2Entry {
                    launch: false,
                    round_trip: Some(per),
                });
            }
            // A #PF of KVM's shadow paging costs more; it is not a CPUID's.
            log.record(&Observation::L2Exit {
                reason: ExitReason::ExceptionOrNmi,
                reflected: true,
            });
            log.record(&Observation::L2Entry {
                launch: false,
                round_trip: Some(40),
            });
            for (count, reflected) in [(reflected_ept, true), (fills, false)] {
                for _ in 0..count {
                    log.record(&Observation::L2Exit {
                        reason: ExitReason::EptViolation,
                        reflected,
                    });
                }
            }
            for _ in 0..invepts {
                log.record(&Observation::Vmx {
                    instruction: VmxInstruction::Invept,
                    outcome: VmxOutcome::Succeed,
                });
            }
            if vmxoff {
                log.record(&Observation::Vmx {
                    instruction: VmxInstruction::Vmxoff,
                    outcome: VmxOutcome::Succeed,
                });
            }
            for _ in 0..invvpids {
                log.record(&Observation::Vmx {
                    instruction: VmxInstruction::Invvpid,
                    outcome: VmxOutcome::Succeed,
                });
            }
            log.end = Some(GuestEnd::ShutdownRequest);
            log.end_task = Some(Ok(task));
            judge(scenario, log, &h.hv.counters, Gpa::new(0), None)
        };
    let run = |scenario: Scenario, report: &str, cpuids: u64, per: u64, vmxoff: bool| {
        run_ept(scenario, report, cpuids, per, vmxoff, (0, 0, 0, 0))
    };
    let good = "l2: ihmi-l2: cpuid=1000 vendor=GenuineIntel pages=256 bad=0";
    let n = ihmi_abi::NESTED_KVM_CPUIDS;
    assert_eq!(run(Scenario::NestedKvm, good, n, 9, true), Verdict::Pass);
    assert_eq!(
        run(Scenario::NestedKvmShadow, good, n, 2, true),
        Verdict::Pass
    );
    let pages = ihmi_abi::NESTED_KVM_PAGES;
    let ept = |v: (u64, u64, u64, u64)| run_ept(Scenario::NestedKvmEpt, good, n, 2, true, v);
    assert_eq!(ept((pages + 4, pages + 5, 1, 1)), Verdict::Pass);
    for short in [
        (pages - 1, pages, 1, 1),
        (pages, pages - 1, 1, 1),
        (pages, pages, 0, 1),
        (pages, pages, 1, 0),
    ] {
        assert!(matches!(ept(short), Verdict::Fail(_)), "{short:?}");
    }
    let fails = [
        // Over the shadowed target of 3 on average.
        run(Scenario::NestedKvmShadow, good, n, 4, true),
        run(Scenario::NestedKvm, good, n, 13, true),
        // Fewer reflected CPUIDs than the L2 made.
        run(Scenario::NestedKvm, good, n - 1, 9, true),
        // No VMXOFF.
        run(Scenario::NestedKvm, good, n, 9, false),
        // A report of another count, a bad page, none at all.
        run(
            Scenario::NestedKvm,
            "l2: ihmi-l2: cpuid=999 vendor=GenuineIntel pages=256 bad=0",
            n,
            9,
            true,
        ),
        run(
            Scenario::NestedKvm,
            "l2: ihmi-l2: cpuid=1000 vendor=GenuineIntel pages=256 bad=1",
            n,
            9,
            true,
        ),
        run(Scenario::NestedKvm, "ihmi-init: done", n, 9, true),
    ];
    for (i, v) in fails.iter().enumerate() {
        assert!(matches!(v, Verdict::Fail(_)), "case {i}: {v:?}");
    }
}

/// `nested-mini-ept`: nested-mini's exits with EPT violations among them, L1's report of its checks,
/// both attacks alerted, the end at L0's frame.
#[test]
fn nested_mini_ept_passes_only_with_both_attacks_refused_and_l1_s_checks_passed() {
    use crate::scenario::NESTED_MINI_EXITS;
    use ihmi_hv::{Alert, Observation};

    let run = |report: &str, alerts: &[Alert], end: GuestEnd| {
        let mut h = hv(Scenario::NestedMiniEpt);
        let log = &mut h.judge.log;
        log.record(&Observation::L2Entry {
            launch: true,
            round_trip: None,
        });
        for (i, step) in NESTED_MINI_EXITS.iter().enumerate() {
            if i % 4 == 0 {
                for reflected in [true, false] {
                    log.record(&Observation::L2Exit {
                        reason: ExitReason::EptViolation,
                        reflected,
                    });
                }
            }
            log.record(&Observation::L2Exit {
                reason: step.0,
                reflected: step.1,
            });
            if step.1 {
                log.record(&Observation::L2Entry {
                    launch: false,
                    round_trip: Some(8),
                });
            }
        }
        log.record(&Observation::DebugLine {
            line: report.as_bytes(),
            exits: 0,
        });
        for &a in alerts {
            log.record(&Observation::Alert(a));
        }
        log.end = Some(end);
        judge(
            Scenario::NestedMiniEpt,
            log,
            &h.hv.counters,
            Gpa::new(0),
            None,
        )
    };
    let pointer = Alert::VmxPointerRefused {
        gpa: Gpa::new(0xfa0_0000),
        region: RegionKind::L0,
        rip: 0x100_2bd8,
    };
    let mapping = Alert::Ept12MappingRefused {
        l2: Gpa::new(0x104_1000),
        l1: Gpa::new(0xfa0_0000),
        region: RegionKind::L0,
    };
    let at_l0 = GuestEnd::EptViolation {
        gpa: Gpa::new(0xfa0_0000),
        gla: None,
        rip: 0x100_2c58,
        qualification: ihmi_vmcs::EptViolationQualification::from_raw(1),
        region: Some(RegionKind::L0),
        view: None,
    };
    let ok = "nested-mini-ept: L1's checks failed: 0";
    assert_eq!(run(ok, &[pointer, mapping], at_l0), Verdict::Pass);
    for v in [
        run(
            "nested-mini-ept: L1's checks failed: 1",
            &[pointer, mapping],
            at_l0,
        ),
        run(ok, &[mapping], at_l0),
        run(ok, &[pointer], at_l0),
        run(ok, &[pointer, mapping], GuestEnd::ShutdownRequest),
    ] {
        assert!(matches!(v, Verdict::Fail(_)), "{v:?}");
    }
}

#[test]
fn nested_linux_passes_only_for_a_whole_relayed_boot_on_nested_ept() {
    use ihmi_hv::nested::vmx::VmxOutcome;
    use ihmi_hv::Observation;
    use ihmi_vmcs::VmxInstruction;

    let banner = std::format!(
        "{}Linux version 6.1.192 (ihmi)",
        ihmi_abi::NESTED_LINUX_CONSOLE
    );
    let other = std::format!(
        "{}Run /init as init process",
        ihmi_abi::NESTED_LINUX_CONSOLE
    );
    let init = String::from(ihmi_abi::NESTED_LINUX_L2_INIT);
    let done = std::format!("{}L2 powered off", ihmi_abi::NESTED_LINUX_DONE);
    // The relayed lines in order; L2's exits (reflected EPT violations and fills); INVEPTs;
    // whether KVM left VMX operation.
    let run = |lines: &[&str], (reflected_ept, fills, invepts): (u64, u64, u64), vmxoff: bool| {
        let mut h = hv(Scenario::NestedLinux);
        let log = &mut h.judge.log;
        for line in lines {
            log.record(&Observation::DebugLine {
                line: line.as_bytes(),
                exits: 0,
            });
        }
        log.record(&Observation::L2Entry {
            launch: true,
            round_trip: None,
        });
        // Some CPUIDs, reflected: L2's reflected exits are not only its EPT violations.
        for _ in 0..3 {
            log.record(&Observation::L2Exit {
                reason: ExitReason::Cpuid,
                reflected: true,
            });
        }
        for (count, reflected) in [(reflected_ept, true), (fills, false)] {
            for _ in 0..count {
                log.record(&Observation::L2Exit {
                    reason: ExitReason::EptViolation,
                    reflected,
                });
            }
        }
        for _ in 0..invepts {
            log.record(&Observation::Vmx {
                instruction: VmxInstruction::Invept,
                outcome: VmxOutcome::Succeed,
            });
        }
        if vmxoff {
            log.record(&Observation::Vmx {
                instruction: VmxInstruction::Vmxoff,
                outcome: VmxOutcome::Succeed,
            });
        }
        end_as_init_does(log);
        let l2 = log.l2_linux;
        (
            judge(
                Scenario::NestedLinux,
                log,
                &h.hv.counters,
                Gpa::new(0),
                None,
            ),
            l2,
        )
    };
    let whole = [&banner[..], &other, &init, &done];
    let (verdict, l2) = run(&whole, (300, 400, 2), true);
    assert_eq!(verdict, Verdict::Pass);
    assert_eq!(l2.console_lines, 2);
    let fails = [
        // Out of order: /init's line before the banner, the end before /init's line.
        run(&[&init[..], &banner, &done], (300, 400, 2), true).0,
        run(&[&banner[..], &done, &init], (300, 400, 2), true).0,
        // A line missing.
        run(&[&banner[..], &init], (300, 400, 2), true).0,
        run(&[&other[..], &init, &done], (300, 400, 2), true).0,
        // No reflected EPT violation, no fill, no INVEPT, no VMXOFF.
        run(&whole, (0, 400, 2), true).0,
        run(&whole, (300, 0, 2), true).0,
        run(&whole, (300, 400, 0), true).0,
        run(&whole, (300, 400, 2), false).0,
    ];
    for (i, v) in fails.iter().enumerate() {
        assert!(matches!(v, Verdict::Fail(_)), "case {i}: {v:?}");
    }
}

#[test]
fn multiboot_passes_only_when_the_kernel_found_what_l0_handed_and_its_checks_held() {
    use ihmi_abi::multiboot::{CHECKS_FAILED, HANDED};
    use ihmi_hv::Observation;
    let verdict = |handed: Option<u64>, lines: &[String], end: Option<GuestEnd>| {
        let mut h = hv(Scenario::Multiboot2);
        h.judge.log.multiboot_handed = handed;
        h.judge.log.multiboot_moved = 1;
        for line in lines {
            h.judge.log.record(&Observation::DebugLine {
                line: line.as_bytes(),
                exits: 0,
            });
        }
        h.judge.log.end = end;
        judge(
            Scenario::Multiboot2,
            &h.judge.log,
            &h.hv.counters,
            Gpa::new(0),
            None,
        )
    };
    let report = |digest: &str, failed: u64| {
        [
            std::format!("{HANDED}{digest} modules=2 ram=1 map=3"),
            std::format!("{CHECKS_FAILED}{failed}"),
        ]
    };
    let off = Some(GuestEnd::ShutdownRequest);
    let d = 0x25e8_48cd_9d3c_4f78;
    assert_eq!(
        verdict(Some(d), &report("25e848cd9d3c4f78", 0), off),
        Verdict::Pass
    );
    assert_eq!(
        verdict(Some(d), &report("25e848cd9d3c4f79", 0), off),
        Verdict::Fail(FailReason::MultibootHanded {
            handed: Some(d),
            found: Some(d + 1)
        }),
        "a digest that differs"
    );
    assert_eq!(
        verdict(Some(d), &report("25e848cd9d3c4f78", 1), off),
        Verdict::Fail(FailReason::MultibootChecks(Some(1))),
        "a check of the kernel's own failed"
    );
    assert_eq!(
        verdict(Some(d), &report("25e848cd9d3c4f78", 0)[..1], off),
        Verdict::Fail(FailReason::MultibootChecks(None)),
        "no line with the checks"
    );
    assert!(
        matches!(
            verdict(None, &report("25e848cd9d3c4f78", 0), off),
            Verdict::Fail(FailReason::MultibootHanded { handed: None, .. })
        ),
        "L0 handed nothing it could compare"
    );
    for bad in ["25e848cd9d3c4f7", "25e848cd9d3c4f78x", "25e848cd9d3c4fzz"] {
        assert!(
            matches!(
                verdict(Some(d), &report(bad, 0), off),
                Verdict::Fail(FailReason::MultibootHanded { found: None, .. })
            ),
            "a digest that is not 16 hex digits: {bad}"
        );
    }
    assert!(matches!(
        verdict(
            Some(d),
            &report("25e848cd9d3c4f78", 0),
            Some(GuestEnd::Done(0))
        ),
        Verdict::Fail(FailReason::WrongEnd { .. })
    ));
    assert_eq!(
        verdict(Some(d), &report("25e848cd9d3c4f78", 0), None),
        Verdict::Fail(FailReason::NotEnded)
    );
    // All well, but no module was in the kernel's way: the move was not tested.
    let mut h = hv(Scenario::Multiboot1);
    h.judge.log.multiboot_handed = Some(d);
    for line in report("25e848cd9d3c4f78", 0) {
        h.judge.log.record(&Observation::DebugLine {
            line: line.as_bytes(),
            exits: 0,
        });
    }
    h.judge.log.end = off;
    assert_eq!(
        judge(
            Scenario::Multiboot1,
            &h.judge.log,
            &h.hv.counters,
            Gpa::new(0),
            None
        ),
        Verdict::Fail(FailReason::MultibootNothingMoved)
    );
}

#[test]
fn a_user_kernel_passes_when_it_ends_itself_with_success() {
    let verdict = |end: Option<GuestEnd>| {
        let mut h = hv(Scenario::Kernel);
        h.judge.log.end = end;
        judge(
            Scenario::Kernel,
            &h.judge.log,
            &h.hv.counters,
            Gpa::new(0),
            None,
        )
    };
    assert_eq!(verdict(Some(GuestEnd::ShutdownRequest)), Verdict::Pass);
    assert_eq!(verdict(Some(GuestEnd::DebugExit(0))), Verdict::Pass);
    assert_eq!(verdict(None), Verdict::Fail(FailReason::NotEnded));
    for end in [
        GuestEnd::DebugExit(1),
        GuestEnd::HaltedForever { rip: 0x10_0000 },
        GuestEnd::TripleFault {
            rip: 0x10_0000,
            view: None,
        },
        GuestEnd::ResetRequest,
    ] {
        assert!(
            matches!(verdict(Some(end)), Verdict::Fail(FailReason::WrongEnd { got, .. }) if got == end),
            "{end:?}"
        );
    }
}

#[test]
fn nested_kvm_sim_counts_the_vmm_start_and_its_ioctls_only() {
    use crate::scenario::{LINUX_IOCTL_NR, LINUX_L1_VMM, LINUX_L1_VMM_PATH};
    use ihmi_monitor::event::EventKind;
    let mut log = crate::ScenarioLog::default();
    let event = |kind: EventKind, comm: &[u8], path: &[u8], nr: u64, allow: bool| {
        let mut e = ihmi_monitor::Event {
            kind: kind as u16,
            nr,
            verdict: if allow {
                ihmi_abi::monitor::Verdict::Allow as i32
            } else {
                ihmi_abi::monitor::Verdict::Deny as i32
            },
            ..ihmi_monitor::Event::EMPTY
        };
        e.comm[..comm.len()].copy_from_slice(comm);
        e.path[..path.len()].copy_from_slice(path);
        e
    };
    for e in [
        event(EventKind::Exec, b"init", LINUX_L1_VMM_PATH, 0, true),
        event(EventKind::Exec, b"init", LINUX_L1_VMM_PATH, 0, false),
        event(EventKind::Exec, b"init", b"/bin/ihmi-l1-vmmx", 0, true),
        event(EventKind::Syscall, LINUX_L1_VMM, b"", LINUX_IOCTL_NR, true),
        event(
            EventKind::Syscall,
            LINUX_L1_VMM,
            b"",
            LINUX_IOCTL_NR + 1,
            true,
        ),
        event(
            EventKind::Syscall,
            b"ihmi-workload",
            b"",
            LINUX_IOCTL_NR,
            true,
        ),
    ] {
        log.record_monitor_event(&e);
    }
    assert_eq!((log.vmm_execs_allowed, log.vmm_ioctls), (1, 1));
}

/// `ihmi-kvm`: one `kvm_exit` event per reflected exit, each with the reason L0 reflected and before
/// L1 enters L2 again, the whole exit-handler table checked at each and found unchanged; anything
/// else fails.
#[test]
fn ihmi_kvm_passes_only_with_one_matching_event_per_reflected_exit() {
    use ihmi_hv::nested::vmx::VmxOutcome;
    use ihmi_hv::Observation;
    use ihmi_monitor::{Event, EventKind, IntegrityProperty};
    use ihmi_vmcs::VmxInstruction;

    const VCPU: u64 = 0xffff_8880_0400_0000;
    const VMCS: u64 = 0x2e1_8000;
    // How the run goes wrong, if it does.
    #[derive(Clone, Copy, PartialEq)]
    enum Fault {
        None,
        MissedEvent,
        WrongReason,
        ExtraEvent,
        PartialCheck,
        Integrity,
        HostUnchecked,
        /// A page the probe wrote without its `l2_map` event.
        UnmappedPage,
        /// A mapping onto memory not the VM's own.
        WrongMemory,
        /// No `vcpu_create` event, or an exit of a vCPU no such event named.
        NoVcpu,
        OtherVcpu,
        /// No `memslot` event for the probe's slot.
        NoSlot,
        /// An entry L0 did not find registered (P6 unchecked), or found registered for a region
        /// not the vCPU's.
        Unregistered,
        OtherVmcs,
        /// No `vcpu_destroy` event for the probe's vCPU.
        NoDestroy,
        /// Not a fault: the `vmcs12-region` attacker's line, which that scenario needs.
        RegionLine,
        /// Not a fault: the L1 VMM's line for the `kvm-l2-vmfunc` guest's one #UD.
        VmfuncLine,
        /// That line, and a VMFUNC exit from L2 (VMCS02 with VM functions).
        VmfuncExit,
        /// Not a fault but for its values: the `rogue-vmcs` attacker's line (its region, the
        /// VM-instruction error, RFLAGS after KVM's VMCS came back) and the region of L0's
        /// `rogue-vmcs` alert (none if 0).
        Rogue {
            error: u64,
            restored: u64,
            alert: u64,
        },
        /// Not a fault but for its values: the `starve` attacker's line (the VMCS it ran, the
        /// exits it says it kept, RFLAGS bits of putting KVM's fields back), that many exits run
        /// from its code (each entry checked and registered, no `kvm_exit` event), and L0's
        /// `monitor-starved` alert if `alert`.
        Starve {
            vmcs: u64,
            kept: u64,
            ran: u64,
            restored: u64,
            alert: bool,
        },
        /// Not a fault but for its values: the `kvm-ops` attacker's line (if `said`: index 0x2d,
        /// its address, the value before and the one written) and the monitor's `kvm_x86_ops`
        /// integrity event (if any).
        X86Ops {
            said: bool,
            reported: Option<[u64; 4]>,
        },
    }
    const OPS_WORD: [u64; 4] = [
        0x2d,
        0xffff_ffff_81d1_5888,
        0xffff_ffff_8106_ec47,
        0xffff_ffff_8106_9a10,
    ];
    const ROGUE: u64 = 0x35_7000;
    const AT: u64 = 0xffff_ffff_81c4_79d0;
    const WAS: u64 = 0xffff_ffff_8106_1000;
    const NEW: u64 = 0xffff_ffff_8106_2000;
    // Under attack (`attack`: the attacker's line), every exit finds one entry changed, and the
    // integrity event names `reported` (index, address, expected, found).
    let run_attacked = |scenario: Scenario, fault: Fault, attack: Option<(&str, [u64; 4])>| {
        let mut h = hv(scenario);
        let log = &mut h.judge.log;
        let region_line = std::format!("{}2", ihmi_abi::attack::IHMI_VMCS12_REGION_LINE);
        if fault == Fault::RegionLine {
            log.record(&Observation::DebugLine {
                line: region_line.as_bytes(),
                exits: 0,
            });
        }
        let vmfunc_line = std::format!("{}1", ihmi_abi::attack::IHMI_L2_VMFUNC_REPORT);
        if matches!(fault, Fault::VmfuncLine | Fault::VmfuncExit) {
            log.record(&Observation::DebugLine {
                line: vmfunc_line.as_bytes(),
                exits: 0,
            });
        }
        if fault == Fault::VmfuncExit {
            log.record(&Observation::L2Exit {
                reason: ExitReason::Vmfunc,
                reflected: false,
            });
        }
        if let Fault::Rogue {
            error,
            restored,
            alert,
        } = fault
        {
            let line = std::format!(
                "{}{ROGUE:#x} 0x46 {error:#x} {restored:#x}",
                ihmi_abi::attack::IHMI_ROGUE_VMCS_LINE
            );
            log.record(&Observation::DebugLine {
                line: line.as_bytes(),
                exits: 0,
            });
            if alert != 0 {
                log.record(&Observation::Alert(ihmi_hv::Alert::RogueVmcs {
                    gpa: Gpa::new(alert),
                    launch: true,
                    rip: 0xffff_8887_8000_0000,
                }));
            }
        }
        if let Fault::X86Ops { said, reported } = fault {
            if said {
                let [i, at, was, new] = OPS_WORD;
                let line = std::format!(
                    "{}{i:#x} {at:#x} {was:#x} {new:#x}",
                    ihmi_abi::attack::IHMI_KVM_OPS_LINE
                );
                log.record(&Observation::DebugLine {
                    line: line.as_bytes(),
                    exits: 0,
                });
            }
            if let Some([i, at, expected, found]) = reported {
                log.record_monitor_event(&Event {
                    kind: EventKind::Integrity as u16,
                    detail: IntegrityProperty::KvmX86Ops as u16,
                    nr: i,
                    args: [at, expected, found, 0],
                    ..Event::EMPTY
                });
            }
        }
        if let Some((line, _)) = attack {
            log.record(&Observation::DebugLine {
                line: line.as_bytes(),
                exits: 0,
            });
        }
        log.record(&Observation::DebugLine {
            line: b"l2: ihmi-l2: cpuid=1000 vendor=GenuineIntel pages=256 bad=0",
            exits: 0,
        });
        // KVM creates the probe's vCPU (the monitor registers its VMCS), then launches it.
        if fault != Fault::NoVcpu {
            log.record_monitor_event(&Event {
                kind: EventKind::VcpuCreate as u16,
                nr: 0,
                args: [VCPU, 0xffff_8880_0500_0000, VMCS, 0],
                ..Event::EMPTY
            });
        }
        log.record(&Observation::L1HostStateChecked);
        log.record(&Observation::L1VmcsRegistered {
            gpa: Gpa::new(VMCS),
        });
        log.record(&Observation::L2Entry {
            launch: true,
            round_trip: None,
        });
        let changed = u64::from(attack.is_some());
        let kvm_exit = |reason: ExitReason, checked: u64| Event {
            kind: EventKind::KvmExit as u16,
            nr: u64::from(reason.number()),
            args: [VCPU, checked, changed, 0],
            ..Event::EMPTY
        };
        let integrity = |[index, at, expected, found]: [u64; 4]| Event {
            kind: EventKind::Integrity as u16,
            detail: IntegrityProperty::KvmExitHandlers as u16,
            nr: index,
            args: [at, expected, found, 0],
            ..Event::EMPTY
        };
        if let Some((_, reported)) = attack {
            log.record_monitor_event(&integrity(reported));
        }
        // KVM makes the probe's memslot.
        if fault != Fault::NoSlot {
            log.record_monitor_event(&Event {
                kind: EventKind::Memslot as u16,
                detail: 0,
                nr: 0,
                args: [0xffff_8880_0500_0000, 512, 0x7f00_0000_0000, 0],
                ..Event::EMPTY
            });
        }
        // KVM maps the pages the probe writes, each onto the VM's own memory.
        let first = ihmi_abi::NESTED_KVM_TOUCH_BASE >> 12;
        for gfn in first..first + ihmi_abi::NESTED_KVM_PAGES {
            let last = gfn == first + ihmi_abi::NESTED_KVM_PAGES - 1;
            if fault == Fault::UnmappedPage && last {
                continue;
            }
            let class = if fault == Fault::WrongMemory && last {
                ihmi_monitor::L2Memory::NotRam
            } else {
                ihmi_monitor::L2Memory::Ok
            };
            log.record_monitor_event(&Event {
                kind: EventKind::L2Map as u16,
                detail: class as u16,
                nr: gfn,
                args: [VCPU, 0x3000 + gfn, 0x7f00_0000_0000 + (gfn << 12), 1],
                ..Event::EMPTY
            });
        }
        let n = ihmi_abi::NESTED_KVM_CPUIDS;
        for i in 0..n {
            log.record(&Observation::L2Exit {
                reason: ExitReason::Cpuid,
                reflected: true,
            });
            let last = i == n - 1;
            match fault {
                Fault::MissedEvent if last => {}
                Fault::WrongReason if last => {
                    log.record_monitor_event(&kvm_exit(ExitReason::Hlt, 76));
                }
                Fault::PartialCheck if last => {
                    log.record_monitor_event(&kvm_exit(ExitReason::Cpuid, 75));
                }
                Fault::Integrity if last => {
                    log.record_monitor_event(&integrity([10, AT - 64, WAS, 0xdead]));
                    log.record_monitor_event(&kvm_exit(ExitReason::Cpuid, 76));
                }
                Fault::OtherVcpu if last => {
                    let mut e = kvm_exit(ExitReason::Cpuid, 76);
                    e.args[0] = VCPU + 0x4000;
                    log.record_monitor_event(&e);
                }
                _ => log.record_monitor_event(&kvm_exit(ExitReason::Cpuid, 76)),
            }
            if fault == Fault::ExtraEvent && last {
                log.record_monitor_event(&kvm_exit(ExitReason::Cpuid, 76));
            }
            // Half-way, between an exit KVM handled and its next entry, the attacker runs KVM's
            // VMCS from its own code: interrupt-window exits that never reach KVM.
            if let (
                Fault::Starve {
                    vmcs,
                    kept,
                    ran,
                    restored,
                    alert,
                },
                true,
            ) = (fault, i == n / 2)
            {
                let line = std::format!(
                    "{}{vmcs:#x} {kept:#x} 0x7 {restored:#x}",
                    ihmi_abi::attack::IHMI_STARVE_LINE
                );
                log.record(&Observation::DebugLine {
                    line: line.as_bytes(),
                    exits: 0,
                });
                // A first try the attacker made too early: found registered, then refused (the
                // VMCS not launched yet): no entry, and nothing off in the count of entries.
                log.record(&Observation::L1VmcsRegistered {
                    gpa: Gpa::new(VMCS),
                });
                log.record(&Observation::Vmx {
                    instruction: VmxInstruction::Vmresume,
                    outcome: VmxOutcome::FailValid(5),
                });
                for _ in 0..ran {
                    log.record(&Observation::L1HostStateChecked);
                    log.record(&Observation::L1VmcsRegistered {
                        gpa: Gpa::new(VMCS),
                    });
                    log.record(&Observation::L2Entry {
                        launch: false,
                        round_trip: None,
                    });
                    log.record(&Observation::L2Exit {
                        reason: ExitReason::InterruptWindow,
                        reflected: true,
                    });
                }
                if alert {
                    log.record(&Observation::Alert(ihmi_hv::Alert::MonitorStarved {
                        reflected: 600,
                        served: 500,
                    }));
                }
            }
            if !(fault == Fault::HostUnchecked && last) {
                log.record(&Observation::L1HostStateChecked);
            }
            match fault {
                Fault::Unregistered if last => {}
                Fault::OtherVmcs if last => log.record(&Observation::L1VmcsRegistered {
                    gpa: Gpa::new(VMCS + 0x1000),
                }),
                _ => log.record(&Observation::L1VmcsRegistered {
                    gpa: Gpa::new(VMCS),
                }),
            }
            log.record(&Observation::L2Entry {
                launch: false,
                round_trip: Some(2),
            });
        }
        // The VMM exits, and KVM destroys the vCPU.
        if fault != Fault::NoDestroy {
            log.record_monitor_event(&Event {
                kind: EventKind::VcpuDestroy as u16,
                nr: 0,
                args: [VCPU, 0xffff_8880_0500_0000, VMCS, 0],
                ..Event::EMPTY
            });
        }
        log.record(&Observation::Vmx {
            instruction: VmxInstruction::Vmxoff,
            outcome: VmxOutcome::Succeed,
        });
        end_as_init_does(log);
        judge(scenario, log, &h.hv.counters, Gpa::new(0), None)
    };
    let run = |fault: Fault| run_attacked(Scenario::IhmiKvm, fault, None);
    assert_eq!(run(Fault::None), Verdict::Pass);
    for fault in [
        Fault::MissedEvent,
        Fault::WrongReason,
        Fault::ExtraEvent,
        Fault::PartialCheck,
        Fault::Integrity,
        Fault::HostUnchecked,
        Fault::UnmappedPage,
        Fault::WrongMemory,
        Fault::NoVcpu,
        Fault::OtherVcpu,
        Fault::NoSlot,
        Fault::Unregistered,
        Fault::OtherVmcs,
        Fault::NoDestroy,
    ] {
        assert!(
            matches!(run(fault), Verdict::Fail(FailReason::NestedRun(_))),
            "a faulty run passed"
        );
    }

    // The attack: the monitor must name exactly the entry the attacker says it rewrote.
    let line = std::format!(
        "{}{AT:#x} {WAS:#x} {NEW:#x}",
        ihmi_abi::attack::IHMI_EXIT_HANDLER_LINE
    );
    let index = ihmi_abi::attack::IHMI_EXIT_HANDLER_INDEX;
    let attack = |reported: [u64; 4]| {
        run_attacked(
            Scenario::IhmiAttack(ihmi_abi::attack::IhmiAttack::ExitHandler),
            Fault::None,
            Some((&line, reported)),
        )
    };
    assert_eq!(attack([index, AT, WAS, NEW]), Verdict::Pass);
    for wrong in [
        [index + 1, AT, WAS, NEW],
        [index, AT + 8, WAS, NEW],
        [index, AT, WAS, NEW + 1],
    ] {
        assert!(
            matches!(
                attack(wrong),
                Verdict::Fail(FailReason::AttackNotReported(_))
            ),
            "{wrong:x?} passed"
        );
    }
    // TOCTOU on VMCS12: a run as clean as ihmi-kvm's, with the attacker's line, passes; without the
    // line (the attack did not happen) it fails, and so does a changed table.
    let region = Scenario::IhmiAttack(ihmi_abi::attack::IhmiAttack::Vmcs12Region);
    assert_eq!(run_attacked(region, Fault::RegionLine, None), Verdict::Pass);
    assert!(matches!(
        run_attacked(region, Fault::None, None),
        Verdict::Fail(FailReason::NestedRun(_))
    ));
    assert!(matches!(
        run_attacked(
            region,
            Fault::RegionLine,
            Some((&line, [index, AT, WAS, NEW]))
        ),
        Verdict::Fail(FailReason::NestedRun(_))
    ));
    // A rogue VMCS: the attacker's VMLAUNCH refused (error 7) with one alert naming its region,
    // KVM's VMCS current again, and the run otherwise ihmi-kvm's, passes; no alert, an alert for
    // another region, another error, no line, or the rogue alert in a run nobody attacked, fails.
    let rogue = Scenario::IhmiAttack(ihmi_abi::attack::IhmiAttack::RogueVmcs);
    let attacked = |error, restored, alert| Fault::Rogue {
        error,
        restored,
        alert,
    };
    assert_eq!(
        run_attacked(rogue, attacked(7, 0x2, ROGUE), None),
        Verdict::Pass
    );
    for fault in [
        attacked(7, 0x2, 0),
        attacked(7, 0x2, ROGUE + 0x1000),
        attacked(8, 0x2, ROGUE),
    ] {
        assert!(
            matches!(
                run_attacked(rogue, fault, None),
                Verdict::Fail(FailReason::AttackNotBlocked(_))
            ),
            "a rogue VMLAUNCH not refused as such passed"
        );
    }
    for (scenario, fault) in [
        (rogue, attacked(7, 0x43, ROGUE)),
        (rogue, Fault::None),
        (Scenario::IhmiKvm, attacked(7, 0x2, ROGUE)),
    ] {
        assert!(matches!(
            run_attacked(scenario, fault, None),
            Verdict::Fail(FailReason::NestedRun(_))
        ));
    }
    // kvm_x86_ops: the word the attacker names, reported once as it was and as it became, passes;
    // no report, another word or value, no line, or a report in a run nobody attacked, fails.
    let ops = Scenario::IhmiAttack(ihmi_abi::attack::IhmiAttack::KvmOps);
    let x86 = |said, reported| Fault::X86Ops { said, reported };
    assert_eq!(
        run_attacked(ops, x86(true, Some(OPS_WORD)), None),
        Verdict::Pass
    );
    let [i, at, was, new] = OPS_WORD;
    for reported in [
        None,
        Some([i + 1, at + 8, was, new]),
        Some([i, at, was, new + 1]),
    ] {
        assert!(matches!(
            run_attacked(ops, x86(true, reported), None),
            Verdict::Fail(FailReason::AttackNotReported(_))
        ));
    }
    for (scenario, fault) in [
        (ops, x86(false, Some(OPS_WORD))),
        (Scenario::IhmiKvm, x86(false, Some(OPS_WORD))),
    ] {
        assert!(matches!(
            run_attacked(scenario, fault, None),
            Verdict::Fail(FailReason::NestedRun(_))
        ));
    }
    // Starving the monitor: 160 exits run from the attacker's code, each entry of KVM's registered
    // VMCS with its host state checked, none with a kvm_exit event, one monitor-starved alert, KVM's
    // fields back, passes. No alert, too few exits for two windows, another VMCS, fields not put
    // back, exits kept that the attacker does not own up to (or one it claims but did not take), or
    // the alert in a run nobody attacked, fails.
    let starve = Scenario::IhmiAttack(ihmi_abi::attack::IhmiAttack::Starve);
    let starved = |vmcs, kept, ran, restored, alert| Fault::Starve {
        vmcs,
        kept,
        ran,
        restored,
        alert,
    };
    assert_eq!(
        run_attacked(starve, starved(VMCS, 160, 160, 0, true), None),
        Verdict::Pass
    );
    assert!(matches!(
        run_attacked(starve, starved(VMCS, 160, 160, 0, false), None),
        Verdict::Fail(FailReason::AttackNotReported(_))
    ));
    for (scenario, fault) in [
        (starve, starved(VMCS, 100, 100, 0, true)),
        (starve, starved(VMCS + 0x1000, 160, 160, 0, true)),
        (starve, starved(VMCS, 160, 160, 0x1, true)),
        (starve, starved(VMCS, 160, 161, 0, true)),
        (starve, starved(VMCS, 161, 160, 0, true)),
        (starve, Fault::None),
        (Scenario::IhmiKvm, starved(VMCS, 160, 160, 0, true)),
    ] {
        assert!(matches!(
            run_attacked(scenario, fault, None),
            Verdict::Fail(FailReason::NestedRun(_))
        ));
    }
    // VMFUNC from L2: one #UD reported and no VMFUNC exit passes; no report, or a VMFUNC exit, fails.
    let vmfunc = Scenario::IhmiAttack(ihmi_abi::attack::IhmiAttack::L2Vmfunc);
    assert_eq!(run_attacked(vmfunc, Fault::VmfuncLine, None), Verdict::Pass);
    for fault in [Fault::None, Fault::VmfuncExit] {
        assert!(matches!(
            run_attacked(vmfunc, fault, None),
            Verdict::Fail(FailReason::AttackNotBlocked(_))
        ));
    }
    // No line from the attacker, or an integrity event in a run nobody attacked: both fail.
    assert!(matches!(
        run_attacked(
            Scenario::IhmiAttack(ihmi_abi::attack::IhmiAttack::ExitHandler),
            Fault::None,
            None
        ),
        Verdict::Fail(FailReason::NestedRun(_))
    ));
    assert!(matches!(
        run_attacked(
            Scenario::IhmiKvm,
            Fault::None,
            Some((&line, [index, AT, WAS, NEW]))
        ),
        Verdict::Fail(FailReason::NestedRun(_))
    ));
}

/// `ihmi-attack-l2-map`: the monitor must report KVM's mapping of the very page the attacker's VMM gave
/// its guest, as the kernel image's, and L0 must stop the guest's write at the address announced.
#[test]
fn the_l2_map_attack_needs_the_mapping_reported_and_the_write_refused() {
    use ihmi_abi::attack::{IhmiAttack, IHMI_L2_MAP_GPA, IHMI_L2_MAP_LINE};
    use ihmi_hv::{Alert, Locked, Observation};
    use ihmi_monitor::{Event, EventKind, IntegrityProperty, L2Memory};
    use ihmi_vmcs::EptViolationQualification;
    const SITE: u64 = 0x106_ec47;
    let s = Scenario::IhmiAttack(IhmiAttack::L2Map);
    let verdict = |announced: bool, found: u64, class: L2Memory, refused_at: u64| {
        let mut h = hv(s);
        let log = &mut h.judge.log;
        let line = std::format!("{IHMI_L2_MAP_LINE}{SITE:#x}");
        if announced {
            log.record(&Observation::DebugLine {
                line: line.as_bytes(),
                exits: 0,
            });
        }
        let gfn = IHMI_L2_MAP_GPA >> 12;
        log.record_monitor_event(&Event {
            kind: EventKind::Integrity as u16,
            detail: IntegrityProperty::L2Memory as u16,
            nr: gfn,
            args: [IHMI_L2_MAP_GPA, 0x7f00_0000_0000, found, class as u64],
            ..Event::EMPTY
        });
        log.record_monitor_event(&Event {
            kind: EventKind::L2Map as u16,
            detail: class as u16,
            nr: gfn,
            args: [0xffff_8880_0400_0000, found >> 12, 0x7f00_0000_0000, 1],
            ..Event::EMPTY
        });
        log.record_alert(Alert::LockedWrite {
            what: Locked::KernelText,
            gpa: Gpa::new(refused_at),
            rip: 0x1005,
        });
        log.end = Some(GuestEnd::EptViolation {
            gpa: Gpa::new(refused_at),
            gla: None,
            rip: 0x1005,
            qualification: EptViolationQualification::from_raw(0x2),
            region: Some(RegionKind::GuestRam),
            view: Some(ihmi_hv::guard::views::GUEST_VIEW),
        });
        judge(s, log, &h.hv.counters, Gpa::new(0), None)
    };
    let page = SITE & !0xfff;
    assert_eq!(
        verdict(true, page, L2Memory::KernelImage, SITE),
        Verdict::Pass
    );
    // The monitor named another frame, or called it something else: not reported.
    for (found, class) in [
        (page + 0x1000, L2Memory::KernelImage),
        (page, L2Memory::NotRam),
    ] {
        assert!(matches!(
            verdict(true, found, class, SITE),
            Verdict::Fail(FailReason::AttackNotReported(_))
        ));
    }
    // Another write refused: not this attack stopped; no announcement: no attack made.
    assert!(matches!(
        verdict(true, page, L2Memory::KernelImage, SITE + 8),
        Verdict::Fail(FailReason::AttackNotBlocked(_))
    ));
    assert!(matches!(
        verdict(false, page, L2Memory::KernelImage, SITE),
        Verdict::Fail(FailReason::NestedRun(_))
    ));
}

/// `ihmi-attack-l2-map-monitor`: the mapping reported as not L1's RAM, at the monitor frame the
/// attacker named, and the guest's write ending at L0 in that frame (no alert: it is not L1's).
#[test]
fn the_l2_map_monitor_attack_needs_the_frame_reported_and_the_write_ending_there() {
    use ihmi_abi::attack::{IhmiAttack, IHMI_L2_MAP_GPA, IHMI_L2_MAP_MONITOR_LINE};
    use ihmi_hv::Observation;
    use ihmi_monitor::{Event, EventKind, IntegrityProperty, L2Memory};
    use ihmi_vmcs::EptViolationQualification;
    const SITE: u64 = 0xf9f_f800;
    let s = Scenario::IhmiAttack(IhmiAttack::L2MapMonitor);
    let verdict = |class: L2Memory, region: RegionKind, at: u64| {
        let mut h = hv(s);
        let log = &mut h.judge.log;
        let line = std::format!("{IHMI_L2_MAP_MONITOR_LINE}{SITE:#x}");
        log.record(&Observation::DebugLine {
            line: line.as_bytes(),
            exits: 0,
        });
        log.record_monitor_event(&Event {
            kind: EventKind::Integrity as u16,
            detail: IntegrityProperty::L2Memory as u16,
            nr: IHMI_L2_MAP_GPA >> 12,
            args: [
                IHMI_L2_MAP_GPA,
                0x7f00_0000_0000,
                SITE & !0xfff,
                class as u64,
            ],
            ..Event::EMPTY
        });
        log.end = Some(GuestEnd::EptViolation {
            gpa: Gpa::new(at),
            gla: None,
            rip: 0x1005,
            qualification: EptViolationQualification::from_raw(0x2),
            region: Some(region),
            view: Some(ihmi_hv::guard::views::GUEST_VIEW),
        });
        judge(s, log, &h.hv.counters, Gpa::new(0), None)
    };
    assert_eq!(
        verdict(L2Memory::NotRam, RegionKind::Monitor, SITE),
        Verdict::Pass
    );
    assert!(matches!(
        verdict(L2Memory::KernelImage, RegionKind::Monitor, SITE),
        Verdict::Fail(FailReason::AttackNotReported(_))
    ));
    assert!(matches!(
        verdict(L2Memory::NotRam, RegionKind::GuestRam, SITE),
        Verdict::Fail(FailReason::WrongEnd { .. })
    ));
    assert!(matches!(
        verdict(L2Memory::NotRam, RegionKind::Monitor, SITE + 8),
        Verdict::Fail(FailReason::AttackNotBlocked(_))
    ));
}

/// `ihmi-attack-kvm-text`: the refused write onto L1's text must be the one the attacker announced
/// (the monitor's call in `vmx_handle_exit`), with its alert, while the attacker ran.
#[test]
fn the_kvm_text_attack_needs_the_refused_write_at_the_call_it_named() {
    use ihmi_abi::attack::{IhmiAttack, IHMI_KVM_TEXT_LINE};
    use ihmi_hv::{Alert, Locked, Observation};
    use ihmi_vmcs::EptViolationQualification;
    const CALL: u64 = 0x106_ec47;
    let s = Scenario::IhmiAttack(IhmiAttack::KvmText);
    let verdict = |announced: Option<u64>, refused_at: u64| {
        let mut h = hv(s);
        let line = announced.map(|at| std::format!("{IHMI_KVM_TEXT_LINE}{at:#x}"));
        if let Some(line) = &line {
            h.judge.log.record(&Observation::DebugLine {
                line: line.as_bytes(),
                exits: 0,
            });
        }
        h.judge.log.record_alert(Alert::LockedWrite {
            what: Locked::KernelText,
            gpa: Gpa::new(refused_at),
            rip: 0x7f96_5c35_cc95,
        });
        h.judge.log.end = Some(GuestEnd::EptViolation {
            gpa: Gpa::new(refused_at),
            gla: None,
            rip: 0x7f96_5c35_cc95,
            qualification: EptViolationQualification::from_raw(0x2),
            region: Some(RegionKind::GuestRam),
            view: Some(ihmi_hv::guard::views::GUEST_VIEW),
        });
        h.judge.log.end_task = Some(Ok(attacker_task(25)));
        judge(s, &h.judge.log, &h.hv.counters, Gpa::new(0), None)
    };
    assert_eq!(verdict(Some(CALL), CALL), Verdict::Pass);
    // Another text write refused, or no announcement: not this attack stopped.
    assert!(matches!(
        verdict(Some(CALL), CALL + 0x1000),
        Verdict::Fail(FailReason::AttackNotBlocked(_))
    ));
    assert!(matches!(
        verdict(None, CALL),
        Verdict::Fail(FailReason::AttackNotBlocked(_))
    ));
}

/// `ihmi-attack-host-state`: the attacker's VMWRITE of HOST_RIP must meet an entry L0 refused with
/// an alert naming that value, and L1 must run on to /init's end.
#[test]
fn the_host_state_attack_needs_the_entry_refused_for_the_value_written() {
    use ihmi_abi::attack::{IhmiAttack, IHMI_HOST_STATE_LINE};
    use ihmi_hv::{Alert, Observation};
    const EVIL: u64 = 0xffff_ffff_8100_0000;
    let s = Scenario::IhmiAttack(IhmiAttack::HostState);
    let verdict = |announced: bool, found: Option<u64>, survived: bool| {
        let mut h = hv(s);
        let log = &mut h.judge.log;
        let line = std::format!("{IHMI_HOST_STATE_LINE}{EVIL:#x}");
        if announced {
            log.record(&Observation::DebugLine {
                line: line.as_bytes(),
                exits: 0,
            });
        }
        if let Some(found) = found {
            log.record_alert(Alert::Vmcs12HostState {
                field: "HOST_RIP",
                expected: 0xffff_ffff_8127_7a0d,
                found,
                rip: 0xffff_ffff_8127_79fd,
            });
        }
        if survived {
            end_as_init_does(log);
        } else {
            log.end = Some(GuestEnd::L0Stopped { why: "test" });
        }
        judge(s, log, &h.hv.counters, Gpa::new(0), None)
    };
    assert_eq!(verdict(true, Some(EVIL), true), Verdict::Pass);
    for found in [None, Some(EVIL + 1)] {
        assert!(matches!(
            verdict(true, found, true),
            Verdict::Fail(FailReason::AttackNotBlocked(_))
        ));
    }
    assert!(matches!(
        verdict(false, Some(EVIL), true),
        Verdict::Fail(FailReason::NestedRun(_))
    ));
    assert!(matches!(
        verdict(true, Some(EVIL), false),
        Verdict::Fail(FailReason::WrongEnd { .. })
    ));
}
